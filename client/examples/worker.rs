//! A group worker: run several copies and they share the topic's
//! partitions; stop one and the others take its partitions over. Records
//! whose value is not a number are nacked and, after the topic's
//! `max_deliveries`, land in `<topic>.workers.dlq` (Ctrl-C to stop).
//!
//! `cargo run -p sluice-client --example worker -- orders [instance-id]`

use sluice_client::{ClientConfig, GroupConfig, GroupConsumer, GroupEvent};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "orders".into());
    let config = ClientConfig::new(
        std::env::var("SLUICE_BROKER").unwrap_or_else(|_| "http://127.0.0.1:7070".into()),
    );
    let mut settings = GroupConfig::new("workers", [topic]);
    settings.instance_id = args.next();
    let mut consumer = GroupConsumer::new(&config, settings)?;
    let mut events = consumer.events();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                GroupEvent::Assigned(p) => eprintln!("assigned {p:?}"),
                GroupEvent::Revoked(p) => eprintln!("revoked {p:?}"),
                GroupEvent::Lost(p) => eprintln!("lost {p:?}"),
            }
        }
    });
    let handle = async {
        loop {
            consumer
                .handle_next(|record| async move {
                    let text = String::from_utf8_lossy(&record.value).into_owned();
                    let amount: i64 = text
                        .trim()
                        .parse()
                        .map_err(|e| format!("{text:?} is not an amount: {e}"))?;
                    println!(
                        "{}/{} attempt {}: {amount}",
                        record.partition, record.offset, record.attempt
                    );
                    Ok::<(), String>(())
                })
                .await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), sluice_client::Error>(())
    };
    tokio::select! {
        result = handle => result?,
        _ = tokio::signal::ctrl_c() => {}
    }
    consumer.close().await?;
    Ok(())
}
