//! Consumers that ask for cold data and stop reading their sockets, against a broker process
//! with small memory bounds: the broker's memory stays within them (cold ranges go out from the
//! page cache once the shard's fetch memory is taken), and a normal consumer still reads every
//! record. Figures are printed as a `RELIABILITY …` line.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{rss_kib, scrape, sum_of, Broker};
use skein_client::{Admin, Producer, ProducerConfig, ProducerRecord};
use skein_net::{FetchPartition, FetchRequest, Request, TopicData};

const TOPIC: &str = "cold";
const PARTITIONS: u32 = 4;
const RECORDS: u32 = 160_000;
const VALUE_BYTES: usize = 1000;
const BOUND: u64 = 16 << 20;
const STALLED: usize = 16;
const FETCHES_EACH: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_that_stop_reading_do_not_grow_the_broker() {
    common::require_free_space(&std::env::temp_dir(), 1 << 30);
    let bound = BOUND.to_string();
    let mut broker = Broker::start(&[
        "--request-memory-max",
        &bound,
        "--cache-bytes-max",
        &bound,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    Admin::new(broker.client().await).create_topic(TOPIC, PARTITIONS, &[]).await.unwrap();
    let producer = Producer::new(broker.client().await, ProducerConfig::default());
    let value = vec![b'v'; VALUE_BYTES];
    for i in 0..RECORDS {
        producer.send(ProducerRecord::new(TOPIC, value.clone()).partition(i % PARTITIONS)).await.unwrap();
    }
    producer.flush().await.unwrap();
    // A restart: nothing of the topic is in memory, every read is cold.
    assert!(broker.stop(), "a clean stop");
    broker.restart();
    let pid = broker.pid().expect("running");
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    let baseline = rss_kib(pid);

    // Each stalled consumer asks for 16 MiB at a time from its own offsets and never reads an
    // answer: the broker's writes to it stop once the socket buffers are full.
    let per_partition = u64::from(RECORDS / PARTITIONS);
    let mut stalled = Vec::new();
    for consumer in 0..STALLED {
        let mut stream = TcpStream::connect(&broker.addr).unwrap();
        for fetch in 0..FETCHES_EACH {
            let at = (consumer as u64 * u64::from(FETCHES_EACH) + u64::from(fetch)) * 997 % per_partition;
            let request = Request::<bytes::Bytes>::Fetch(FetchRequest {
                max_wait_ms: 0,
                min_bytes: 1,
                max_bytes: 16 << 20,
                topics: vec![TopicData {
                    name: TOPIC.to_owned(),
                    partitions: (0..PARTITIONS)
                        .map(|partition| FetchPartition {
                            partition,
                            fetch_offset: at,
                            partition_bytes_max: 4 << 20,
                        })
                        .collect(),
                }],
            });
            stream.write_all(&request.to_frame(fetch, 0)).unwrap();
        }
        stalled.push(stream);
    }
    // Give the broker time to answer what it can.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = rss_kib(pid);
    let samples = scrape(&metrics);
    let fallbacks = sum_of(&samples, "skein_fetch_memory_fallbacks_total");
    let fetch_memory = sum_of(&samples, "skein_fetch_memory_bytes");
    assert!(
        fallbacks > 0.0,
        "the stalled consumers asked for more than the bound, so ranges went out from the page cache"
    );
    assert!(
        fetch_memory <= (BOUND + (4 << 20) * u64::from(PARTITIONS)) as f64,
        "held {fetch_memory} bytes of cold reads"
    );

    // A normal consumer reads the whole topic meanwhile.
    let started = Instant::now();
    let records = common::read_topic(broker.client().await, TOPIC, RECORDS as usize).await;
    assert_eq!(records.len(), RECORDS as usize, "a consumer that reads gets every record");
    let read_in = started.elapsed();
    let peak = rss_kib(pid).max(held);
    drop(stalled);
    // The bounds: 16 MiB of request memory (and as much for cold reads in responses), 16 MiB
    // of tail cache and as much read ahead, with room for the allocator. Without the fetch
    // bound the 64 stalled fetches held up to 16 MiB each.
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    assert!(grown_mib < 150, "the broker grew by {grown_mib} MiB (peak {peak} KiB, at start {baseline} KiB)");
    println!(
        "RELIABILITY stalled consumers: {STALLED} connections with {} cold fetches of 16 MiB unread; {fallbacks} ranges sent from the page cache; \
         {:.1} MiB of cold reads held; broker grew {grown_mib} MiB; a normal consumer read {RECORDS} records in {:.1} s",
        STALLED as u32 * FETCHES_EACH,
        fetch_memory / f64::from(1 << 20),
        read_in.as_secs_f64()
    );
}
