//! One `Client` shared by a producer and a long-polling consumer, several bootstrap addresses,
//! and the consumer as a `Stream`, against a real broker.

mod embedded;

use std::time::{Duration, Instant};

use futures::StreamExt;
use skein_client::{
    Admin, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, SeekTo,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_does_not_hold_up_a_producer_on_the_same_client() {
    let broker = embedded::Embedded::start();
    let client = Client::connect(ClientConfig::new(broker.addr())).await.unwrap();
    let admin = Admin::new(client.clone());
    admin.create_topic("quiet", 1, &[]).await.unwrap();
    admin.create_topic("busy", 1, &[]).await.unwrap();
    // A consumer of an empty topic, long-polling for 10 s on the shared client.
    let config = ConsumerConfig::default().fetch_wait_max(Duration::from_secs(10));
    let mut consumer = Consumer::new(client.clone(), config);
    consumer.assign_all("quiet").await.unwrap();
    consumer.seek_all(SeekTo::End).await.unwrap();
    let polling = tokio::spawn(async move {
        let started = Instant::now();
        let records = consumer.poll(Duration::from_secs(10)).await.unwrap();
        (records.len(), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // the poll is at the broker now
                                                          // The producer's records are acknowledged while the poll still waits.
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let started = Instant::now();
    for i in 0..50 {
        producer.send(ProducerRecord::new("busy", format!("r{i}"))).await.unwrap().await.unwrap();
    }
    let produced_in = started.elapsed();
    assert!(!polling.is_finished(), "the long poll is still waiting");
    assert!(
        produced_in < Duration::from_secs(5),
        "50 acknowledged sends took {produced_in:?} behind a 10 s poll"
    );
    // Metadata and admin requests are not held up either.
    assert_eq!(admin.describe_topic("busy").await.unwrap().partitions[0].end_offset, 50);
    let (records, waited) = polling.await.unwrap();
    assert_eq!(records, 0);
    assert!(waited >= Duration::from_secs(9), "the poll waited its time: {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_bootstrap_address_that_answers_is_used() {
    let broker = embedded::Embedded::start();
    // A port nothing listens on (bound, then released), then the broker.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = ClientConfig::new(format!("{dead}, {}", broker.addr()));
    let client = Client::connect(config).await.expect("the second address answers");
    Admin::new(client).create_topic("t", 1, &[]).await.unwrap();
    let none = ClientConfig::new(format!("{dead}")).connect_timeout(Duration::from_millis(500));
    assert!(Client::connect(none).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_is_a_stream_of_records() {
    let broker = embedded::Embedded::start();
    let client = Client::connect(ClientConfig::new(broker.addr())).await.unwrap();
    Admin::new(client.clone()).create_topic("events", 3, &[]).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..90 {
        producer
            .send(ProducerRecord::new("events", format!("e{i}")).key(format!("k{}", i % 7)))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer.assign_all("events").await.unwrap();
    consumer.seek_all(SeekTo::Beginning).await.unwrap();
    let records: Vec<_> = consumer.stream(Duration::from_millis(200)).take(90).collect().await;
    let mut values: Vec<String> =
        records.into_iter().map(|r| String::from_utf8(r.unwrap().value.unwrap().to_vec()).unwrap()).collect();
    values.sort();
    let mut expected: Vec<String> = (0..90).map(|i| format!("e{i}")).collect();
    expected.sort();
    assert_eq!(values, expected);
}

/// A loop of sends that all find buffer room never waits, so on a current-thread runtime the
/// producer's sender task and connections (same thread) could not run until the loop ended
/// or the buffer filled: nothing sent, nothing acknowledged, for as long as the loop ran.
/// A send that seals a batch while the sender has been idle for 1 ms yields once, so records
/// are acknowledged while the loop still runs.
#[tokio::test(flavor = "current_thread")]
async fn a_tight_send_loop_lets_the_producer_send_and_acknowledge_meanwhile() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let broker = embedded::Embedded::start();
    let client = Client::connect(ClientConfig::new(broker.addr())).await.unwrap();
    Admin::new(client.clone()).create_topic("tight", 2, &[]).await.unwrap();
    let producer = Producer::new(client, ProducerConfig::default().linger(Duration::ZERO));
    let acked = Arc::new(AtomicU64::new(0));
    // 300,000 records of 100 bytes stay well within the 64 MiB buffer: no send waits for room.
    let records = 300_000u64;
    let started = Instant::now();
    for i in 0..records {
        let counter = acked.clone();
        producer
            .send_with_callback(ProducerRecord::new("tight", vec![i as u8; 100]), move |result| {
                result.expect("acknowledged");
                counter.fetch_add(1, Ordering::Relaxed);
            })
            .await
            .unwrap();
    }
    // Nothing awaited since the last send: what is acknowledged now was acknowledged during it.
    let acked_during_loop = acked.load(Ordering::Relaxed);
    let loop_took = started.elapsed();
    producer.flush().await.unwrap();
    assert_eq!(acked.load(Ordering::Relaxed), records, "every record acknowledged after the flush");
    assert!(
        acked_during_loop > 0,
        "no record was acknowledged during a send loop of {loop_took:?}: the loop kept the thread"
    );
}
