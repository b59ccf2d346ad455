//! Reads a topic from the beginning as a stream of records, without a group, and stops at the
//! end it had when it started.
//!
//! `SKEIN_BOOTSTRAP=127.0.0.1:9400 cargo run -p skein-client --example consumer -- orders`

use std::time::Duration;

use futures::StreamExt;
use skein_client::{Admin, Client, ClientConfig, Consumer, ConsumerConfig, SeekTo};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bootstrap = std::env::var("SKEIN_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9400".into());
    let topic = std::env::args().nth(1).unwrap_or_else(|| "orders".into());

    let client = Client::connect(ClientConfig::new(bootstrap)).await?;
    let total: u64 = Admin::new(client.clone())
        .describe_topic(&topic)
        .await?
        .partitions
        .iter()
        .map(|p| p.end_offset - p.start_offset)
        .sum();
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer.assign_all(&topic).await?;
    consumer.seek_all(SeekTo::Beginning).await?;
    let mut records = std::pin::pin!(consumer.stream(Duration::from_millis(500)).take(total as usize));
    while let Some(record) = records.next().await {
        let record = record?;
        let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned();
        println!("{}/{} @{} {value}", record.topic, record.partition, record.offset);
    }
    Ok(())
}
