//! The idempotent producer (on by default): every record is written exactly once and in order
//! per partition, even when requests are retried after a lost connection or a broker restart.
//! Prints the producer id and the offsets, which are consecutive per partition.
//!
//! `SKEIN_BOOTSTRAP=127.0.0.1:9400 cargo run -p skein-client --example idempotent_producer -- payments 20`

use std::time::Duration;

use skein_client::{Acks, Admin, Client, ClientConfig, Producer, ProducerConfig, ProducerRecord};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bootstrap = std::env::var("SKEIN_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9400".into());
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "payments".into());
    let count: u32 = args.next().map_or(Ok(20), |n| n.parse())?;

    let client = Client::connect(ClientConfig::new(bootstrap)).await?;
    if client.topic(&topic).await.is_err() {
        Admin::new(client.clone()).create_topic(&topic, 1, &[]).await?;
    }
    let config = ProducerConfig::default()
        .idempotence(true) // the default, spelled out
        .acks(Acks::All) // required for idempotence
        // Keep retrying for as long as a broker restart may take.
        .delivery_timeout(Duration::from_secs(120));
    let producer = Producer::new(client, config);
    let mut deliveries = Vec::new();
    for i in 0..count {
        deliveries.push(
            producer.send(ProducerRecord::new(topic.as_str(), format!("payment-{i}")).partition(0)).await?,
        );
    }
    let (id, epoch) = producer.producer_id().await?.expect("idempotence is on");
    println!("producer id {id} epoch {epoch}");
    let mut previous: Option<u64> = None;
    for delivery in deliveries {
        let offset = delivery.await?.offset.expect("acks=all");
        if let Some(previous) = previous {
            assert_eq!(offset, previous + 1, "one partition, in order, no duplicates");
        }
        previous = Some(offset);
        println!("offset {offset}");
    }
    Ok(())
}
