//! Many partitions within the limits a node is given: 2,000 partitions under an open-files
//! limit of 1,024 (about three descriptors per partition would need 6,000), a round trip, a
//! restart, and a topic creation that fails half way and leaves nothing behind.

mod common;

use std::time::{Duration, Instant};

use common::{open_files, Broker};
use skein_client::{
    Acks, Admin, Client, ClientConfig, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig,
    ProducerRecord,
};

const PARTITIONS: u32 = 2000;
const FILES_LIMIT: u64 = 1024;

async fn client(broker: &Broker) -> Client {
    let mut config = ClientConfig::new(broker.addr.clone());
    config.request_timeout = Duration::from_secs(120);
    Client::connect(config).await.unwrap()
}

/// Reads every partition of `topic` and returns the value read from each, by partition.
async fn read_each(broker: &Broker, topic: &str, records: usize) -> Vec<Vec<String>> {
    let mut consumer = Consumer::new(
        client(broker).await,
        ConsumerConfig::default().fetch_wait_max(Duration::from_millis(100)),
    );
    consumer.assign_all(topic).await.unwrap();
    let mut by_partition = vec![Vec::new(); PARTITIONS as usize];
    let mut read = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while read < records && Instant::now() < deadline {
        for record in consumer.poll(Duration::from_millis(500)).await.unwrap() {
            by_partition[record.partition as usize]
                .push(String::from_utf8(record.value.unwrap().to_vec()).unwrap());
            read += 1;
        }
    }
    assert_eq!(read, records, "every record was read");
    by_partition
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_partitions_under_a_small_open_files_limit_round_trip_and_restart() {
    let mut broker = Broker::start_with_limits(&[], &[(libc::RLIMIT_NOFILE, FILES_LIMIT)]);
    let admin = Admin::new(client(&broker).await);
    let started = Instant::now();
    admin.create_topic("wide", PARTITIONS, &[]).await.unwrap();
    let created_in = started.elapsed();
    // A keyed producer writing to every partition at once: one record per partition, by key.
    let producer = Producer::new(client(&broker).await, ProducerConfig::default().acks(Acks::All));
    let mut deliveries = Vec::new();
    for partition in 0..PARTITIONS {
        let record = ProducerRecord::new("wide", format!("value-{partition}")).partition(partition);
        deliveries.push((partition, producer.send(record).await.unwrap()));
    }
    for (partition, delivery) in deliveries {
        let written = delivery.await.unwrap_or_else(|e| panic!("partition {partition}: {e}"));
        assert_eq!((written.partition, written.offset), (partition, Some(0)));
    }
    let pid = broker.pid().unwrap();
    let held = open_files(pid);
    assert!((held as u64) < FILES_LIMIT, "{held} descriptors under a limit of {FILES_LIMIT}");
    let check = |by_partition: Vec<Vec<String>>| {
        for (partition, values) in by_partition.iter().enumerate() {
            assert_eq!(values, &vec![format!("value-{partition}")], "partition {partition}");
        }
    };
    check(read_each(&broker, "wide", PARTITIONS as usize).await);
    assert!(broker.stop(), "a clean stop");
    let restarted = Instant::now();
    broker.restart();
    let restart_in = restarted.elapsed();
    check(read_each(&broker, "wide", PARTITIONS as usize).await);
    let held_after = open_files(broker.pid().unwrap());
    assert!((held_after as u64) < FILES_LIMIT);
    let log = broker.log();
    assert!(!log.contains("Too many open files"), "no descriptor ran out: {log}");
    eprintln!(
        "{PARTITIONS} partitions under RLIMIT_NOFILE {FILES_LIMIT}: created in {created_in:?}, {held} descriptors \
         after writing each, restarted in {restart_in:?} with {held_after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_creation_that_fails_half_way_leaves_nothing_behind() {
    let mut broker = Broker::start(&[]);
    let admin = Admin::new(client(&broker).await);
    admin.create_topic("other", 2, &[]).await.unwrap();
    // Partition 5 of the new topic cannot be created: a file sits where its directory goes.
    let topic_dir = broker.data_dir().join("topics/half");
    std::fs::create_dir_all(&topic_dir).unwrap();
    std::fs::write(topic_dir.join("5"), b"in the way").unwrap();
    let error = admin.create_topic("half", 8, &[]).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("half") && message.contains("shard"), "the cause is named: {message}");
    assert!(matches!(error, ClientError::Broker { .. }), "{error:?}");
    assert_eq!(admin.list_topics().await.unwrap(), vec!["other".to_owned()], "no topic was created");
    let left: Vec<String> = std::fs::read_dir(&topic_dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.iter().all(|name| name == "5"), "no partition directory was left: {left:?}");
    assert!(matches!(
        Producer::new(client(&broker).await, ProducerConfig::default())
            .send(ProducerRecord::new("half", "x"))
            .await,
        Err(ClientError::UnknownTopic(_))
    ));
    // The broker restarts, and once the obstacle is gone the topic can be created.
    assert!(broker.stop());
    broker.restart();
    std::fs::remove_file(topic_dir.join("5")).ok();
    let admin = Admin::new(client(&broker).await);
    assert_eq!(admin.list_topics().await.unwrap(), vec!["other".to_owned()]);
    admin.create_topic("half", 8, &[]).await.unwrap();
    let described = admin.describe_topic("half").await.unwrap();
    assert_eq!(described.partitions.len(), 8);
    eprintln!("a creation failing half way: {message}");
}
