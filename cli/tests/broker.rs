//! The broker process driven through the native client.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{read_all, Broker};
use skein_client::{
    Acks, Admin, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, SeekTo,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_across_four_partitions_on_two_shards_keeps_per_key_order() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    Admin::new(client.clone()).create_topic("orders", 4, &[]).await.unwrap();
    // The partitions land on both shards.
    let owners: Vec<usize> = (0..4).map(|p| skein_broker::router::place("orders", p, 2).index()).collect();
    assert!(owners.contains(&0) && owners.contains(&1), "{owners:?}");

    let producer = Producer::new(client.clone(), ProducerConfig::default().linger(Duration::from_millis(2)));
    let mut deliveries = Vec::new();
    for i in 0..2000u32 {
        let key = format!("customer-{}", i % 17);
        let record =
            ProducerRecord::new("orders", format!("{key}:{i}")).key(key.clone()).header("seq", i.to_string());
        deliveries.push((key, i, producer.send(record).await.unwrap()));
    }
    producer.flush().await.unwrap();
    let mut partition_of_key: HashMap<String, u32> = HashMap::new();
    let mut offsets_seen = std::collections::HashSet::new();
    for (key, _, delivery) in deliveries {
        let metadata = delivery.await.unwrap();
        let partition = *partition_of_key.entry(key).or_insert(metadata.partition);
        assert_eq!(partition, metadata.partition, "same key, same partition");
        assert!(offsets_seen.insert((metadata.partition, metadata.offset.unwrap())), "offsets are unique");
    }

    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer.assign_all("orders").await.unwrap();
    let records = read_all(&mut consumer, 2000).await;
    assert_eq!(records.len(), 2000);
    let mut by_key: HashMap<String, Vec<u32>> = HashMap::new();
    for record in &records {
        let value = String::from_utf8(record.value.clone().unwrap().to_vec()).unwrap();
        let (key, seq) = value.split_once(':').unwrap();
        assert_eq!(record.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(record.headers, vec![("seq".to_owned(), Some(bytes::Bytes::from(seq.to_owned())))]);
        assert_eq!(partition_of_key[key], record.partition);
        by_key.entry(key.to_owned()).or_default().push(seq.parse().unwrap());
    }
    assert_eq!(by_key.len(), 17);
    for (key, seqs) in by_key {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "records of {key} arrive in the order they were sent");
    }
    let used: std::collections::HashSet<u32> = partition_of_key.values().copied().collect();
    assert!(used.len() >= 3, "keys spread over the partitions: {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_an_offset_and_from_a_timestamp() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    Admin::new(client.clone()).create_topic("events", 1, &[]).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..100i64 {
        let record =
            ProducerRecord::new("events", format!("e{i}")).partition(0).timestamp(1_000_000 + i * 10);
        producer.send(record).await.unwrap();
    }
    producer.flush().await.unwrap();

    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("events", &[0]).await.unwrap();
    consumer.seek("events", 0, SeekTo::Offset(42)).await.unwrap();
    let records = read_all(&mut consumer, 58).await;
    assert_eq!(records.first().map(|r| r.offset), Some(42));
    assert_eq!(records.len(), 58);
    assert_eq!(records[0].value.as_deref(), Some(&b"e42"[..]));

    consumer.seek("events", 0, SeekTo::Timestamp(1_000_000 + 735)).await.unwrap();
    let records = read_all(&mut consumer, 26).await;
    assert_eq!(records.first().map(|r| (r.offset, r.timestamp)), Some((74, 1_000_740)));

    consumer.seek("events", 0, SeekTo::End).await.unwrap();
    assert!(consumer.poll(Duration::from_millis(200)).await.unwrap().is_empty());
    assert_eq!(consumer.position("events", 0), Some(100));
    consumer.seek("events", 0, SeekTo::Timestamp(9_999_999_999)).await.unwrap();
    assert_eq!(consumer.position("events", 0), Some(100), "no record after the timestamp: the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_fetch_wakes_up_when_data_arrives() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    Admin::new(client.clone()).create_topic("waits", 2, &[]).await.unwrap();
    let mut consumer =
        Consumer::new(client.clone(), ConsumerConfig::default().fetch_wait_max(Duration::from_secs(20)));
    consumer.assign_all("waits").await.unwrap();
    consumer.seek_all(SeekTo::End).await.unwrap();
    // Its own connection: responses on one connection come back in request order, so a
    // request behind the 20 s long poll would wait for it.
    let producer_client = broker.client().await;
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let producer = Producer::new(producer_client, ProducerConfig::default());
        producer.send(ProducerRecord::new("waits", "late").partition(1)).await.unwrap().await.unwrap();
    });
    let started = Instant::now();
    let records = consumer.poll(Duration::from_secs(20)).await.unwrap();
    let waited = started.elapsed();
    writer.await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value.as_deref(), Some(&b"late"[..]));
    assert!(waited >= Duration::from_millis(350), "it waited for the data ({waited:?})");
    assert!(waited < Duration::from_secs(10), "and woke up when it came ({waited:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_is_read_again_after_a_restart_and_after_a_kill() {
    let mut broker = Broker::start(&["--fsync", "always"]);
    let client = broker.client().await;
    Admin::new(client.clone())
        .create_topic("durable", 3, &[("segment.bytes", "65536"), ("max.message.bytes", "16384")])
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let mut acked = Vec::new();
    for i in 0..600u32 {
        acked.push(producer.send(ProducerRecord::new("durable", format!("{i:0>200}"))).await.unwrap());
    }
    producer.flush().await.unwrap();
    let mut positions = Vec::new();
    for delivery in acked {
        let metadata = delivery.await.unwrap();
        positions.push((metadata.partition, metadata.offset.unwrap()));
    }
    drop(producer);
    drop(client);

    for round in 0..2 {
        if round == 0 {
            assert!(broker.stop(), "SIGTERM exits cleanly");
        } else {
            broker.kill();
        }
        broker.restart();
        let client = broker.client().await;
        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
        consumer.assign_all("durable").await.unwrap();
        let records = read_all(&mut consumer, 600).await;
        assert_eq!(records.len(), 600, "round {round}");
        let mut read: Vec<(u32, u64)> = records.iter().map(|r| (r.partition, r.offset)).collect();
        read.sort_unstable();
        let mut expected = positions.clone();
        expected.sort_unstable();
        assert_eq!(read, expected, "every acknowledged record at its offset (round {round})");
        let description = Admin::new(client).describe_topic("durable").await.unwrap();
        assert_eq!(description.partitions.iter().map(|p| p.end_offset).sum::<u64>(), 600);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_data_is_served_from_segment_files_once_the_tail_cache_evicted_it() {
    // A 16 KiB cache per partition and 64 KiB segments: almost everything comes from files.
    let broker = Broker::start(&["--cache-bytes", "16384"]);
    let client = broker.client().await;
    Admin::new(client.clone())
        .create_topic("history", 2, &[("segment.bytes", "65536"), ("max.message.bytes", "16384")])
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default().batch_bytes(8192));
    for i in 0..3000u32 {
        producer.send(ProducerRecord::new("history", format!("{i:0>500}")).partition(i % 2)).await.unwrap();
    }
    producer.flush().await.unwrap();
    let data_files: usize = std::fs::read_dir(broker.data_dir().join("topics/history/0"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
        .count();
    assert!(data_files > 5, "the partition spans {data_files} segments");
    // Two passes: the first reads cold ranges (blocking-thread sendfile), the second warm ones.
    for pass in 0..2 {
        let mut consumer =
            Consumer::new(client.clone(), ConsumerConfig::default().partition_bytes_max(100_000));
        consumer.assign_all("history").await.unwrap();
        let records = read_all(&mut consumer, 3000).await;
        assert_eq!(records.len(), 3000, "pass {pass}");
        for record in records {
            let value = String::from_utf8(record.value.unwrap().to_vec()).unwrap();
            let i: u32 = value.parse().unwrap();
            assert_eq!(i % 2, record.partition);
            assert_eq!(u64::from(i / 2), record.offset, "pass {pass}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_zero_and_missing_topics() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    let admin = Admin::new(client.clone());
    admin.create_topic("fast", 1, &[]).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default().acks(Acks::None));
    let mut deliveries = Vec::new();
    for i in 0..100 {
        deliveries.push(producer.send(ProducerRecord::new("fast", format!("{i}"))).await.unwrap());
    }
    producer.flush().await.unwrap();
    for delivery in deliveries {
        assert_eq!(delivery.await.unwrap().offset, None, "acks=0 gets no offset back");
    }
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("fast", &[0]).await.unwrap();
    assert_eq!(read_all(&mut consumer, 100).await.len(), 100);

    // A missing topic is a typed error, for producers, consumers and admin alike.
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    assert!(matches!(
        producer.send(ProducerRecord::new("missing", "x")).await,
        Err(ClientError::UnknownTopic(_))
    ));
    assert!(matches!(consumer.assign("missing", &[0]).await, Err(ClientError::UnknownTopic(_))));
    assert!(matches!(consumer.assign("fast", &[3]).await, Err(ClientError::UnknownPartition { .. })));
    assert!(matches!(admin.describe_topic("missing").await, Err(ClientError::UnknownTopic(_))));
    let duplicate = admin.create_topic("fast", 1, &[]).await.unwrap_err();
    assert_eq!(duplicate.code(), Some(skein_client::BrokerErrorCode::TopicAlreadyExists));
    let invalid = admin.create_topic("bad/name", 1, &[]).await.unwrap_err();
    assert_eq!(invalid.code(), Some(skein_client::BrokerErrorCode::InvalidTopic));
    let invalid = admin.create_topic("zero", 0, &[]).await.unwrap_err();
    assert_eq!(invalid.code(), Some(skein_client::BrokerErrorCode::InvalidPartitions));
    let invalid = admin.create_topic("cfg", 1, &[("retention.ms", "soon")]).await.unwrap_err();
    assert_eq!(invalid.code(), Some(skein_client::BrokerErrorCode::InvalidConfig));

    // Deleting a topic removes its data; it can be created again, empty.
    admin.delete_topic("fast").await.unwrap();
    assert!(!broker.data_dir().join("topics/fast").exists());
    assert!(matches!(admin.delete_topic("fast").await, Err(ClientError::Broker { .. })));
    admin.create_topic("fast", 2, &[]).await.unwrap();
    let description = admin.describe_topic("fast").await.unwrap();
    assert_eq!(description.partitions.len(), 2);
    assert!(description.partitions.iter().all(|p| p.end_offset == 0));
    assert_eq!(admin.list_topics().await.unwrap(), vec!["fast".to_owned()]);
}

/// Sends `count` records of 1000 bytes to `topic` in batches of at most 64 KiB and waits for
/// every acknowledgement.
async fn produce_kilobytes(client: &skein_client::Client, topic: &str, count: u32) {
    let producer = Producer::new(client.clone(), ProducerConfig::default().batch_bytes(64 << 10));
    let mut acked = Vec::new();
    for _ in 0..count {
        acked.push(producer.send(ProducerRecord::new(topic.to_owned(), vec![b'r'; 1000])).await.unwrap());
    }
    producer.flush().await.unwrap();
    for delivery in acked {
        delivery.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_scans_little_of_the_active_segments_and_a_crash_scans_what_came_after() {
    let mut broker = Broker::start(&["--metrics-listen", "127.0.0.1:0"]);
    let client = broker.client().await;
    Admin::new(client.clone()).create_topic("restarts", 2, &[]).await.unwrap();
    produce_kilobytes(&client, "restarts", 8000).await;
    drop(client);
    let scanned = |broker: &Broker| {
        let samples = common::scrape(broker.metrics_addr.as_deref().expect("metrics address"));
        assert!(samples.contains_key("skein_recovery_scanned_bytes_total{}"), "the broker serves the metric");
        common::sum_of(&samples, "skein_recovery_scanned_bytes_total")
    };
    assert!(scanned(&broker) < 1e6, "a fresh data directory has next to nothing to scan");

    // Clean stop: each tail's index was written at close, so the start scans at most one
    // index interval and a batch (64 KiB) per partition, not the 8 MB the partitions hold.
    assert!(broker.stop(), "SIGTERM exits cleanly");
    broker.restart();
    let after_clean = scanned(&broker);
    assert!(after_clean < 1e6, "a clean restart scanned {after_clean} bytes of about 8 MB");

    // A crash after more records: what came after the index is scanned; everything is read.
    let client = broker.client().await;
    produce_kilobytes(&client, "restarts", 4000).await;
    drop(client);
    broker.kill();
    broker.restart();
    let after_crash = scanned(&broker);
    assert!(after_crash >= 4e6, "after a crash the 4 MB written since the index are scanned: {after_crash}");
    let client = broker.client().await;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign_all("restarts").await.unwrap();
    let records = read_all(&mut consumer, 12000).await;
    assert_eq!(records.len(), 12000, "every record after the crash");
    assert!(records.iter().all(|r| r.value.as_deref() == Some(&[b'r'; 1000][..])));
}

/// One ListOffsets request naming partitions of both shards in no particular order, twice the
/// same partition, a partition past the topic's count and a topic that does not exist: every
/// partition gets its own answer, in the order asked (the broker asks each owning shard once
/// for all of its partitions and puts the answers back in place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_offsets_answers_every_partition_in_the_order_asked() {
    use skein_net::{
        wire::Reader, ErrorCode, ListOffsetsPartition, ListOffsetsRequest, ListOffsetsResponse, Request,
        TopicData, EARLIEST_TIMESTAMP, LATEST_TIMESTAMP,
    };
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    Admin::new(client.clone()).create_topic("spread", 12, &[]).await.unwrap();
    let owners: Vec<usize> = (0..12).map(|p| skein_broker::router::place("spread", p, 2).index()).collect();
    assert!(owners.contains(&0) && owners.contains(&1), "{owners:?}");
    // Partition p holds p + 1 records, stamped 1,000,000 + 10 × offset.
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for p in 0..12u32 {
        for offset in 0..=i64::from(p) {
            let record = ProducerRecord::new("spread", format!("{p}:{offset}"))
                .partition(p)
                .timestamp(1_000_000 + offset * 10);
            producer.send(record).await.unwrap();
        }
    }
    producer.flush().await.unwrap();

    let mut asked: Vec<(u32, i64)> = (0..12u32).rev().map(|p| (p, LATEST_TIMESTAMP)).collect();
    asked.extend([
        (7, EARLIEST_TIMESTAMP),
        (12, LATEST_TIMESTAMP),
        (9, 1_000_000 + 45),
        (7, LATEST_TIMESTAMP),
    ]);
    // At or after a time past every record: none.
    asked.push((4, 2_000_000));
    let partitions = |list: &[(u32, i64)]| {
        list.iter().map(|&(partition, timestamp)| ListOffsetsPartition { partition, timestamp }).collect()
    };
    let request = Request::ListOffsets(ListOffsetsRequest {
        topics: vec![
            TopicData { name: "spread".into(), partitions: partitions(&asked) },
            TopicData { name: "absent".into(), partitions: partitions(&[(0, LATEST_TIMESTAMP)]) },
        ],
    });
    let body = client.request(&request).await.unwrap();
    let response = ListOffsetsResponse::decode(&mut Reader::new(&body)).unwrap();
    assert_eq!(response.topics.len(), 2);
    assert_eq!(response.topics[0].name, "spread");
    let answers = &response.topics[0].partitions;
    assert_eq!(answers.len(), asked.len());
    for (answer, &(partition, timestamp)) in answers.iter().zip(&asked) {
        assert_eq!(answer.partition, partition, "answers in the order asked");
        let expected = match (partition, timestamp) {
            (12, _) => (ErrorCode::UnknownTopicOrPartition, -1),
            (p, LATEST_TIMESTAMP) => (ErrorCode::None, i64::from(p) + 1),
            (_, EARLIEST_TIMESTAMP) => (ErrorCode::None, 0),
            // The first record at or after 1,000,045: offset 5 (stamped 1,000,050).
            (9, _) => (ErrorCode::None, 5),
            _ => (ErrorCode::None, -1),
        };
        assert_eq!((answer.error, answer.offset), expected, "partition {partition} at {timestamp}");
    }
    assert_eq!(response.topics[1].name, "absent");
    assert_eq!(response.topics[1].partitions.len(), 1);
    assert_eq!(response.topics[1].partitions[0].error, ErrorCode::UnknownTopicOrPartition);
}
