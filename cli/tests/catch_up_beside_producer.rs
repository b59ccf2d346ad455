//! A consumer catching up from disk while a producer writes, against a broker process with a
//! small bound on cold reads in flight (`--read-in-flight-bytes-max`): the consumer's reads wait
//! for room (the bound is on while segments are written), split into reads no longer than it,
//! and still hand out every record once, in order; the producer's records are all
//! acknowledged meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::{scrape, sum_of, Broker};
use skein_client::{Admin, Producer, ProducerConfig, ProducerRecord};

const OLD: &str = "old";
const NEW: &str = "new";
const PARTITIONS: u32 = 2;
const RECORDS: u32 = 120_000;
const VALUE_BYTES: usize = 1000;

/// A value of `VALUE_BYTES` that starts with its record's number and a colon.
fn value(i: u32) -> Vec<u8> {
    let mut value = format!("{i}:").into_bytes();
    value.resize(VALUE_BYTES, b'v');
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_read_beside_a_producer_keeps_within_the_read_bound_and_loses_nothing() {
    common::require_free_space(&std::env::temp_dir(), 1 << 30);
    // 2 shards: 128 KiB of reads in flight each.
    let mut broker =
        Broker::start(&["--read-in-flight-bytes-max", "262144", "--metrics-listen", "127.0.0.1:0"]);
    let admin = Admin::new(broker.client().await);
    admin.create_topic(OLD, PARTITIONS, &[]).await.unwrap();
    admin.create_topic(NEW, PARTITIONS, &[]).await.unwrap();
    let producer = Producer::new(broker.client().await, ProducerConfig::default());
    for i in 0..RECORDS {
        producer.send(ProducerRecord::new(OLD, value(i)).partition(i % PARTITIONS)).await.unwrap();
    }
    producer.flush().await.unwrap();
    // A restart: nothing of the topic is in memory, every read of it is cold.
    assert!(broker.stop(), "a clean stop");
    broker.restart();
    let metrics = broker.metrics_addr.clone().expect("metrics address");

    // The producer writes another topic for as long as the consumer reads.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producing = {
        let (client, stop) = (broker.client().await, stop.clone());
        tokio::spawn(async move {
            let producer = Producer::new(client, ProducerConfig::default().linger(Duration::from_millis(1)));
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..100 {
                    producer
                        .send(ProducerRecord::new(NEW, value(sent)).partition(sent % PARTITIONS))
                        .await
                        .unwrap();
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            producer.flush().await.expect("every record of the producer acknowledged");
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let records = common::read_topic(broker.client().await, OLD, RECORDS as usize).await;
    let read_in = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = producing.await.unwrap();
    assert!(sent > 0, "the producer wrote while the consumer read");

    assert_eq!(records.len(), RECORDS as usize, "the catch-up consumer got every record");
    for partition in 0..PARTITIONS {
        let numbers: Vec<u32> = records
            .iter()
            .filter(|record| record.partition == partition)
            .map(|record| {
                let value = record.value.as_deref().expect("a value");
                assert_eq!(value.len(), VALUE_BYTES);
                let end = value.iter().position(|&b| b == b':').expect("a number");
                std::str::from_utf8(&value[..end]).unwrap().parse().unwrap()
            })
            .collect();
        let expected: Vec<u32> = (0..RECORDS).filter(|i| i % PARTITIONS == partition).collect();
        assert_eq!(numbers, expected, "partition {partition}: every record once, in order");
    }
    let samples = scrape(&metrics);
    let waits = sum_of(&samples, "skein_read_in_flight_waits_total");
    let direct = sum_of(&samples, "skein_direct_read_bytes_total");
    assert!(direct > 100e6, "the catch-up read came from the disk: {direct} bytes");
    assert!(waits > 0.0, "with segments being written, cold reads waited for room in the bound");
    println!(
        "RELIABILITY catch-up beside a producer: {RECORDS} cold records read in {:.1} s, {waits} reads waited for room, \
         the producer had {sent} records acknowledged meanwhile",
        read_in.as_secs_f64()
    );
}
