//! Many producers at once, flat out, against a broker process with small memory budgets: every
//! record is acknowledged and read back once, and the broker's memory stays within its budgets
//! instead of growing with the connections (each of which reads its next large request while
//! the one before waits for the disk). Figures are printed as a `RELIABILITY …` line.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{peak_rss_kib, scrape, sum_of, Broker};
use skein_client::{
    Admin, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
};

const TOPIC: &str = "many";
const PARTITIONS: u32 = 4;
const PRODUCERS: usize = 40;
const RECORDS_EACH: usize = 12_000;
const VALUE_BYTES: usize = 1000;
const REQUEST_MEMORY: u64 = 16 << 20;
const CACHE: u64 = 16 << 20;

fn value(producer: usize, sequence: usize) -> String {
    let mut value = format!("{producer}:{sequence}:");
    value.extend(std::iter::repeat_n('x', VALUE_BYTES - value.len()));
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_producers_flat_out_wait_for_request_memory_instead_of_growing_the_broker() {
    let broker = Broker::start(&[
        "--request-memory-max",
        &REQUEST_MEMORY.to_string(),
        "--cache-bytes-max",
        &CACHE.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let pid = broker.pid().expect("running");
    let metrics = broker.metrics_addr.clone().expect("metrics address");
    Admin::new(broker.client().await).create_topic(TOPIC, PARTITIONS, &[]).await.unwrap();
    let baseline = common::rss_kib(pid);

    // Each producer its own client (two connections: one per shard), large batches and a
    // deep buffer, so that each connection has requests of several MiB to send at once.
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for index in 0..PRODUCERS {
        let addr = broker.addr.clone();
        producers.spawn(async move {
            let client = Client::connect(ClientConfig::new(addr)).await.unwrap();
            let config = ProducerConfig::default()
                .batch_bytes(1 << 20)
                .linger(Duration::from_millis(20))
                .buffer_bytes(8 << 20);
            let producer = Producer::new(client, config);
            let mut deliveries = Vec::with_capacity(RECORDS_EACH);
            for sequence in 0..RECORDS_EACH {
                let record = ProducerRecord::new(TOPIC, value(index, sequence));
                deliveries.push(producer.send(record).await.expect("send"));
            }
            for (sequence, delivery) in deliveries.into_iter().enumerate() {
                // No failure is tolerated: a stalled or refused send fails the test.
                delivery.await.unwrap_or_else(|e| panic!("producer {index}: record {sequence} failed: {e}"));
            }
        });
    }
    let all = async {
        while let Some(done) = producers.join_next().await {
            done.expect("a producer task");
        }
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("every record acknowledged within 120 s");
    let produced_in = started.elapsed();

    let samples = scrape(&metrics);
    let waits = sum_of(&samples, "skein_request_memory_waits_total");
    assert_eq!(
        sum_of(&samples, "skein_request_memory_bytes_max"),
        REQUEST_MEMORY as f64,
        "the budget the broker was given"
    );
    assert!(waits > 0.0, "the producers sent more than the budget at once, so connections waited");
    assert_eq!(sum_of(&samples, "skein_request_memory_bytes"), 0.0, "every grant was given back");
    let peak = peak_rss_kib(pid);
    // The budgets (16 MiB of requests, 16 MiB of tail cache), the write buffers (8 MiB a
    // partition at most) and the connections' read chunks, with room for the allocator:
    // 50-52 MiB in three runs. With a connection's leftover bytes keeping its last request's
    // memory alive (as before `read_loop` moved them), 200 MiB; with no request budget, 83 MiB
    // (and no waits, which the assertion above catches).
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    assert!(grown_mib < 120, "the broker grew by {grown_mib} MiB (peak {peak} KiB, at rest {baseline} KiB)");

    // Every record once, in order per producer within its partition.
    let total = PRODUCERS * RECORDS_EACH;
    let mut consumer = Consumer::new(
        broker.client().await,
        ConsumerConfig::default().fetch_wait_max(Duration::from_millis(50)),
    );
    consumer.assign_all(TOPIC).await.unwrap();
    let mut seen = HashSet::with_capacity(total);
    let mut last: std::collections::HashMap<(usize, u32), usize> = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < total && Instant::now() < deadline {
        for record in consumer.poll(Duration::from_millis(200)).await.unwrap() {
            let value = record.value.expect("a value");
            let text = std::str::from_utf8(&value).unwrap();
            let mut fields = text.split(':');
            let producer: usize = fields.next().unwrap().parse().unwrap();
            let sequence: usize = fields.next().unwrap().parse().unwrap();
            assert!(seen.insert((producer, sequence)), "record {producer}:{sequence} read twice");
            if let Some(before) = last.insert((producer, record.partition), sequence) {
                assert!(
                    before < sequence,
                    "producer {producer} out of order in partition {}",
                    record.partition
                );
            }
        }
    }
    assert_eq!(seen.len(), total, "every acknowledged record is read back");
    println!(
        "RELIABILITY many producers: {PRODUCERS} producers ({} connections), {total} records of {VALUE_BYTES} B in {:.1} s, \
         all acknowledged and read once; {waits} frames waited for request memory ({} MiB); broker grew {grown_mib} MiB (peak {} MiB)",
        PRODUCERS * 2,
        produced_in.as_secs_f64(),
        REQUEST_MEMORY >> 20,
        peak / 1024
    );
}
