//! Event sourcing: rebuilds account balances by replaying a topic of
//! deposits and withdrawals from the beginning, then reports them.
//!
//! It writes a few events first if the topic is new, so it runs on an empty
//! broker: `cargo run -p sluice-client --example replay`.

use std::collections::BTreeMap;

use sluice_client::{Admin, ClientConfig, Consumer, Producer, ProducerConfig, Record, StartFrom};
use tokio_stream::StreamExt;

const TOPIC: &str = "account-events";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ClientConfig::new(
        std::env::var("SLUICE_BROKER").unwrap_or_else(|_| "http://127.0.0.1:7070".into()),
    );
    let admin = Admin::new(&config)?;
    if admin.create_topic(TOPIC, 4).await.is_ok() {
        let producer = Producer::new(&config, ProducerConfig::default())?;
        for (account, amount) in [
            ("alice", 100),
            ("bob", 50),
            ("alice", -30),
            ("carol", 70),
            ("bob", -50),
        ] {
            // The account is the key: its events stay in order.
            producer
                .send(TOPIC, Record::new(amount.to_string()).with_key(account))
                .await?;
        }
        producer.close().await?;
    }

    // Replay up to the end the topic has now.
    let ends: BTreeMap<u32, u64> = admin
        .offsets(TOPIC, &[], StartFrom::Latest)
        .await?
        .into_iter()
        .collect();
    let mut remaining: BTreeMap<u32, u64> = ends.into_iter().filter(|(_, end)| *end > 0).collect();
    let mut consumer = Consumer::new(&config)?;
    consumer.assign(TOPIC, &[], StartFrom::Earliest).await?;
    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    while !remaining.is_empty() {
        let Some(record) = consumer.next().await else {
            break;
        };
        let record = record?;
        let account =
            String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned();
        let amount: i64 = std::str::from_utf8(&record.value)?.parse()?;
        *balances.entry(account).or_default() += amount;
        if remaining
            .get(&record.partition)
            .is_some_and(|end| record.offset + 1 >= *end)
        {
            remaining.remove(&record.partition);
        }
    }
    for (account, balance) in balances {
        println!("{account}: {balance}");
    }
    Ok(())
}
