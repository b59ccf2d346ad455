//! A consumer-group member with manual commits (at-least-once): process, then commit. Exits
//! after reading the number of records it is told to, leaving the group cleanly.
//!
//! `SKEIN_BOOTSTRAP=127.0.0.1:9400 cargo run -p skein-client --example group_consumer -- orders billing 10`

use std::time::{Duration, Instant};

use skein_client::{Client, ClientConfig, Consumer, ConsumerConfig, GroupConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bootstrap = std::env::var("SKEIN_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9400".into());
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "orders".into());
    let group = args.next().unwrap_or_else(|| "billing".into());
    let wanted: usize = args.next().map_or(Ok(10), |n| n.parse())?;

    let client = Client::connect(ClientConfig::new(bootstrap)).await?;
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    // No automatic commit: this member commits after processing.
    consumer.subscribe(&[topic.as_str()], GroupConfig::new(group).auto_commit(None)).await?;
    let mut processed = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while processed < wanted && Instant::now() < deadline {
        for record in consumer.poll(Duration::from_millis(500)).await? {
            println!("{}/{} @{}", record.topic, record.partition, record.offset); // process
            processed += 1;
        }
        consumer.commit().await?;
        for event in consumer.rebalance_events() {
            eprintln!("rebalance: {event:?}");
        }
    }
    consumer.close().await?; // commits and leaves: the partitions move to the others at once
    if processed < wanted {
        return Err(format!("read {processed} of {wanted} records within 60 s").into());
    }
    Ok(())
}
