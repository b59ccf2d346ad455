//! Sends keyed records and prints where each landed.
//!
//! `SKEIN_BOOTSTRAP=127.0.0.1:9400 cargo run -p skein-client --example producer -- orders 10`

use skein_client::{Admin, Client, ClientConfig, Producer, ProducerConfig, ProducerRecord};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bootstrap = std::env::var("SKEIN_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9400".into());
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "orders".into());
    let count: u32 = args.next().map_or(Ok(10), |n| n.parse())?;

    let client = Client::connect(ClientConfig::new(bootstrap)).await?;
    // Create the topic if it is not there yet.
    if client.topic(&topic).await.is_err() {
        Admin::new(client.clone()).create_topic(&topic, 3, &[]).await?;
    }
    let producer = Producer::new(client, ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in 0..count {
        let record = ProducerRecord::new(topic.as_str(), format!("order-{i}"))
            .key(format!("customer-{}", i % 4))
            .header("source", "example");
        deliveries.push(producer.send(record).await?);
    }
    for delivery in deliveries {
        let metadata = delivery.await?;
        println!("partition {} offset {}", metadata.partition, metadata.offset.expect("acks=all"));
    }
    producer.flush().await?;
    Ok(())
}
