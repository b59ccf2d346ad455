//! TCP connections steered to shards by source port, against the real broker process (2
//! shards): a connection made from a port the rule maps to a shard is served by that shard; a
//! producer and a consumer of the native client send every partition's requests on a
//! connection of the partition's shard (the broker forwards nothing between its cores), and
//! held to one connection they make it forward (so the counter can tell); after a restart with
//! another number of shards they follow the partitions to their new shards.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    assert_each_partition_in_order, read_all, request_shards, scrape, settled_request_shards, Broker,
};
use skein_client::{
    Admin, Client, ClientConfig, Connection, Consumer, ConsumerConfig, Producer, ProducerConfig,
    ProducerRecord, Transport,
};
use skein_net::{ApiVersionsRequest, Request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_from_a_port_of_a_shard_is_served_by_that_shard() {
    let broker = Broker::start(&["--log-format", "json", "--log-requests"]);
    let (_, mut seen) = request_shards(&broker, 0);
    for round in 0..3 {
        for shard in [1usize, 0] {
            let connection = Connection::connect(
                &broker.addr,
                Duration::from_secs(5),
                Duration::from_secs(5),
                8,
                &Transport::Tcp,
                Some((shard, 2)),
            )
            .await
            .unwrap();
            assert_eq!(connection.tcp_shard(2), Some(shard), "the port chosen steers to shard {shard}");
            let request = Request::ApiVersions(ApiVersionsRequest { client_id: "steered".into() });
            connection.request(&request).await.expect("answered");
            drop(connection);
            let shards = settled_request_shards(&broker, &mut seen).await;
            assert_eq!(shards, BTreeSet::from([shard as u64]), "round {round}: served by shard {shard}");
        }
    }
}

fn hops(metrics: &str, api: &str) -> f64 {
    scrape(metrics)
        .get(&format!("skein_forwarded_partitions_total{{api={api}}}"))
        .copied()
        .expect("the counter is served")
}

/// Sends records `from..to` to partition `i mod partitions` (value `i`) and waits for every
/// acknowledgement.
async fn send(producer: &Producer, topic: &str, partitions: u32, from: u32, to: u32) {
    let mut pending = Vec::new();
    for i in from..to {
        let record = ProducerRecord::new(topic, format!("{i}")).partition(i % partitions);
        pending.push(producer.send(record).await.expect("accepted"));
    }
    for delivery in pending {
        delivery.await.expect("acknowledged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_producer_and_consumer_send_each_partition_to_the_shard_that_holds_it() {
    let broker = Broker::start(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = broker.metrics_addr.clone().expect("the metrics address");
    let client = Client::connect(ClientConfig::new(broker.addr.clone())).await.unwrap();
    Admin::new(client.clone()).create_topic("steered", 4, &[]).await.unwrap();
    let info = client.refresh_topic("steered").await.unwrap();
    let shards: BTreeSet<Option<u16>> = info.shards.iter().copied().collect();
    assert_eq!(shards, BTreeSet::from([Some(0), Some(1)]), "the partitions are on both shards: {info:?}");
    assert!(client.routes_by_shard(), "a TCP client routes by shard by default");

    let producer = Producer::new(client.clone(), ProducerConfig::default().linger(Duration::from_millis(2)));
    send(&producer, "steered", 4, 0, 4000).await;
    assert_eq!(hops(&metrics, "produce"), 0.0, "no produce partition hopped between shards");
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("steered", &[0, 1, 2, 3]).await.unwrap();
    consumer.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    let records = read_all(&mut consumer, 4000).await;
    assert_each_partition_in_order(&records, 4, 4000);
    assert_eq!(hops(&metrics, "fetch"), 0.0, "each shard's partitions were fetched on its connection");

    // Held to one connection, on whichever shard its port steers to, half the partitions hop.
    let single =
        Client::connect(ClientConfig::new(broker.addr.clone()).connection_per_shard(false)).await.unwrap();
    assert!(!single.routes_by_shard());
    let producer = Producer::new(single.clone(), ProducerConfig::default().linger(Duration::from_millis(2)));
    send(&producer, "steered", 4, 4000, 4400).await;
    assert!(hops(&metrics, "produce") > 0.0, "the other shard's partitions were forwarded");
    let mut consumer = Consumer::new(single, ConsumerConfig::default());
    consumer.assign("steered", &[0, 1, 2, 3]).await.unwrap();
    consumer.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    assert_eq!(read_all(&mut consumer, 4400).await.len(), 4400);
    assert!(hops(&metrics, "fetch") > 0.0, "the other shard's reads hopped");
}

/// A broker restarted with another number of shards holds its partitions on other shards, and
/// a port that steered to one shard of two may steer to another of three: the same producer
/// and consumer reconnect, learn the new placement, and once the requests on their way at the
/// restart are answered, none hops between shards. Nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_with_more_shards_tcp_requests_follow_the_partitions() {
    let broker = Broker::start(&["--metrics-listen", "127.0.0.1:0"]);
    common::requests_follow_the_partitions_after_a_restart_with_more_shards(broker, |broker| {
        ClientConfig::new(broker.addr.clone())
    })
    .await;
}
