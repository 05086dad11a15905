//! What several of the client's test files need.

use std::time::Duration;

use sluice_client::{ConsumedRecord, Consumer};
use tokio_stream::StreamExt;

/// Reads `count` records from the consumer, failing after 30 s of silence.
pub async fn take(consumer: &mut Consumer, count: usize) -> Vec<ConsumedRecord> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} records arrived", out.len()))
            .expect("assigned")
            .expect("no error");
        out.push(record);
    }
    out
}
