//! Follows a topic from its earliest record, printing each one as it
//! arrives (Ctrl-C to stop).
//!
//! `cargo run -p sluice-client --example consumer -- orders`

use sluice_client::{ClientConfig, Consumer, StartFrom};
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let topic = std::env::args().nth(1).unwrap_or_else(|| "orders".into());
    let config = ClientConfig::new(
        std::env::var("SLUICE_BROKER").unwrap_or_else(|_| "http://127.0.0.1:7070".into()),
    );
    let mut consumer = Consumer::new(&config)?;
    consumer.assign(&topic, &[], StartFrom::Earliest).await?;
    while let Some(record) = consumer.next().await {
        let record = record?;
        println!(
            "{}/{} {} {}",
            record.partition,
            record.offset,
            String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()),
            String::from_utf8_lossy(&record.value)
        );
    }
    Ok(())
}
