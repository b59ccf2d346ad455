//! The idempotent producer against the real broker, through a TCP proxy that swallows produce
//! responses (and then cuts the connection, as a network failure would): the client retries,
//! and every record must still appear exactly once, in order, across a broker restart.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Broker;
use skein_client::{
    Acks, Admin, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PRODUCE_API: u16 = 4;

/// Forwards 127.0.0.1:<port> to the broker. Every `drop_every`-th produce response is
/// swallowed, and the connection is then closed both ways (the broker wrote the batch; the
/// client never hears it).
struct Proxy {
    addr: String,
    swallowed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_frame(stream: &mut tokio::net::tcp::OwnedReadHalf) -> Option<Vec<u8>> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).await.ok()?;
    let mut frame = length.to_vec();
    frame.resize(4 + u32::from_le_bytes(length) as usize, 0);
    stream.read_exact(&mut frame[4..]).await.ok()?;
    Some(frame)
}

impl Proxy {
    async fn start(broker: String, drop_every: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let swallowed = Arc::new(AtomicU64::new(0));
        let produce_responses = Arc::new(AtomicU64::new(0));
        let counter = swallowed.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(server) = TcpStream::connect(&broker).await else { continue };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                // Correlation ids of produce requests on this connection.
                let produces = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
                let seen = produces.clone();
                let upstream = tokio::spawn(async move {
                    while let Some(frame) = read_frame(&mut client_read).await {
                        let api = u16::from_le_bytes([frame[6], frame[7]]);
                        let correlation = u32::from_le_bytes(frame[12..16].try_into().unwrap());
                        if api == PRODUCE_API {
                            seen.lock().unwrap().insert(correlation);
                        }
                        if server_write.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                });
                let (counter, produce_responses) = (counter.clone(), produce_responses.clone());
                tokio::spawn(async move {
                    while let Some(frame) = read_frame(&mut server_read).await {
                        let correlation = u32::from_le_bytes(frame[4..8].try_into().unwrap());
                        let is_produce = produces.lock().unwrap().remove(&correlation);
                        if is_produce
                            && produce_responses.fetch_add(1, Ordering::SeqCst) % drop_every == drop_every - 1
                        {
                            counter.fetch_add(1, Ordering::SeqCst);
                            break; // swallow it and cut the connection
                        }
                        if client_write.write_all(&frame).await.is_err() {
                            break;
                        }
                    }
                    upstream.abort();
                    let _ = client_write.shutdown().await;
                });
            }
        });
        Proxy { addr, swallowed, task }
    }
}

async fn send_range(producer: &Producer, from: u32, to: u32) -> Vec<skein_client::DeliveryFuture> {
    let mut deliveries = Vec::new();
    for i in from..to {
        let record = ProducerRecord::new("payments", format!("{i:06}")).key(format!("account-{}", i % 8));
        deliveries.push(producer.send(record).await.unwrap());
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    deliveries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_batches_are_written_exactly_once_and_in_order_across_a_restart() {
    let mut broker = Broker::start(&["--fsync", "always"]);
    Admin::new(broker.client().await).create_topic("payments", 3, &[]).await.unwrap();
    let proxy = Proxy::start(broker.addr.clone(), 4).await;

    let mut config = ClientConfig::new(proxy.addr.clone());
    config.request_timeout = Duration::from_secs(5);
    config.connect_timeout = Duration::from_secs(2);
    let client = Client::connect(config).await.unwrap();
    let producer = Producer::new(
        client,
        ProducerConfig::default()
            .acks(Acks::All)
            .linger(Duration::from_millis(2))
            .batch_bytes(2 << 10)
            .max_in_flight(5)
            .retries(100)
            .retry_backoff(Duration::from_millis(20))
            // Small requests: many of them, so many responses to lose.
            .request_bytes_max(4 << 10),
    );
    let total = 6000u32;
    let mut deliveries = send_range(&producer, 0, total / 2).await;
    // Restart the broker (SIGKILL) in the middle, with records in flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    broker.kill();
    broker.restart();
    deliveries.extend(send_range(&producer, total / 2, total).await);
    producer.flush().await.unwrap();
    let mut acknowledged: HashMap<(u32, u64), u32> = HashMap::new();
    for (i, delivery) in deliveries.into_iter().enumerate() {
        let metadata = delivery.await.unwrap_or_else(|e| panic!("record {i} failed: {e}"));
        let offset = metadata.offset.expect("acks=all reports offsets");
        assert!(
            acknowledged.insert((metadata.partition, offset), i as u32).is_none(),
            "one offset per record"
        );
    }
    let swallowed = proxy.swallowed.load(Ordering::SeqCst);
    assert!(swallowed >= 10, "the proxy lost {swallowed} responses");
    let duplicates = broker.log().matches("duplicate batch answered").count();
    assert!(duplicates > 0, "retries reached the broker as duplicates");
    eprintln!(
        "{total} records, {swallowed} produce responses lost, {duplicates} duplicate batches refused, \
         broker killed and restarted once"
    );

    // Read everything back directly from the broker.
    let mut consumer = Consumer::new(broker.client().await, ConsumerConfig::default());
    consumer.assign_all("payments").await.unwrap();
    let mut per_partition: HashMap<u32, Vec<(u64, u32)>> = HashMap::new();
    let mut read = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while read < total && Instant::now() < deadline {
        for record in consumer.poll(Duration::from_millis(300)).await.unwrap() {
            let value: u32 = std::str::from_utf8(record.value.as_ref().unwrap()).unwrap().parse().unwrap();
            per_partition.entry(record.partition).or_default().push((record.offset, value));
            read += 1;
        }
    }
    assert!(consumer.poll(Duration::from_millis(300)).await.unwrap().is_empty(), "no extra record");
    let mut seen = vec![0u32; total as usize];
    for (partition, records) in &per_partition {
        // In order: each key's records in send order, so values rise within a partition.
        for pair in records.windows(2) {
            assert!(pair[0].1 < pair[1].1, "partition {partition}: {} before {}", pair[0].1, pair[1].1);
        }
        for (offset, value) in records {
            seen[*value as usize] += 1;
            assert_eq!(
                acknowledged.get(&(*partition, *offset)),
                Some(value),
                "acknowledged where it was read"
            );
        }
    }
    let wrong: Vec<(usize, u32)> = seen.iter().copied().enumerate().filter(|(_, n)| *n != 1).collect();
    assert!(wrong.is_empty(), "records not exactly once: {:?}", &wrong[..wrong.len().min(10)]);
}
