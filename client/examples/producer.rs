//! Publishes order events, keyed by order id so each order's events stay in
//! order, and waits for every acknowledgement.
//!
//! Run a broker (`cargo run --release -p sluice-broker`), then
//! `cargo run -p sluice-client --example producer`.

use sluice_client::{Admin, ClientConfig, Error, Producer, ProducerConfig, Record};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ClientConfig::new(
        std::env::var("SLUICE_BROKER").unwrap_or_else(|_| "http://127.0.0.1:7070".into()),
    );
    match Admin::new(&config)?.create_topic("orders", 3).await {
        Ok(_) => println!("created topic orders"),
        Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => {}
        Err(e) => return Err(e.into()),
    }
    let producer = Producer::new(&config, ProducerConfig::default())?;
    let mut deliveries = Vec::new();
    for order in 0..100 {
        for event in ["created", "paid", "shipped"] {
            let record = Record::new(format!("{{\"order\":{order},\"event\":\"{event}\"}}"))
                .with_key(format!("order-{order}"))
                .with_header("type", event);
            // Returns once the record is accepted (buffer room); the future
            // resolves when the broker has it on disk.
            deliveries.push(producer.enqueue("orders", record).await?);
        }
    }
    let mut last = None;
    for delivery in deliveries {
        match delivery.await {
            Ok(position) => last = Some(position),
            Err(error @ Error::Rejected(_)) => eprintln!("refused: {error}"),
            Err(error) => eprintln!(
                "not delivered (retryable: {}): {error}",
                error.is_retryable()
            ),
        }
    }
    producer.close().await?;
    println!("300 events produced; the last one is at {last:?}");
    Ok(())
}
