//! Topic and group administration: create a topic with settings, describe it, list topics and
//! groups, and delete the topic.
//!
//! `SKEIN_BOOTSTRAP=127.0.0.1:9400 cargo run -p skein-client --example admin -- scratch`

use skein_client::{Admin, Client, ClientConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bootstrap = std::env::var("SKEIN_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9400".into());
    let topic = std::env::args().nth(1).unwrap_or_else(|| "scratch".into());

    let admin = Admin::new(Client::connect(ClientConfig::new(bootstrap)).await?);
    admin.create_topic(&topic, 4, &[("retention.ms", "3600000"), ("segment.bytes", "16777216")]).await?;
    let description = admin.describe_topic(&topic).await?;
    println!("topic {} has {} partitions", description.name, description.partitions.len());
    for (key, value) in &description.configs {
        println!("  {key} = {value}");
    }
    for partition in &description.partitions {
        println!(
            "  partition {} leader {} offsets {}..{}",
            partition.partition, partition.leader, partition.start_offset, partition.end_offset
        );
    }
    println!("topics: {:?}", admin.list_topics().await?);
    for group in admin.list_groups().await? {
        println!("group {} ({}, {} members)", group.group_id, group.state, group.members);
    }
    admin.delete_topic(&topic).await?;
    println!("deleted {topic}");
    Ok(())
}
