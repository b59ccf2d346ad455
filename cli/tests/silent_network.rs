//! A TCP link that goes silent: a proxy between the client and the real broker stops carrying
//! bytes, both ways, without closing anything (a black hole: a pulled cable, a firewall that
//! drops), for longer than the client's request timeout, and then carries on, delivering what
//! it held. The client must give up on the silent connections, make new ones once the link is
//! back, and resend; the bytes the old connections held arrive late at the broker. Every send
//! must be acknowledged (none is allowed to fail), and every record read back once, in order.
//! And a consumer-group member behind such a link: the broker expires it, another member takes
//! its partitions, and it rejoins once the link is back.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{read_all, Broker};
use skein_client::{
    Admin, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards 127.0.0.1:<port> to the broker; while `silent`, it holds whatever it reads instead
/// of writing it on (every connection, old and new, both ways) and writes it once the link is
/// back. Its tasks end when it is dropped.
struct SilentProxy {
    addr: String,
    silent: Arc<AtomicBool>,
    /// Connections accepted, and bytes that waited out a silence.
    accepted: Arc<AtomicU64>,
    held: Arc<AtomicU64>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Copies `from` to `to`, holding each chunk while the link is silent.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
    held: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if silent.load(Ordering::Acquire) {
            held.fetch_add(read as u64, Ordering::Relaxed);
            while silent.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl SilentProxy {
    async fn start(broker: String) -> SilentProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let silent = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let held = Arc::new(AtomicU64::new(0));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (silent, accepted, held, tasks) =
                (silent.clone(), accepted.clone(), held.clone(), tasks.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else { return };
                    let Ok(server) = TcpStream::connect(&broker).await else { continue };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = tokio::spawn(carry(client_read, server_write, silent.clone(), held.clone()));
                    let down = tokio::spawn(carry(server_read, client_write, silent.clone(), held.clone()));
                    tasks.lock().unwrap().extend([up, down]);
                }
            })
        };
        tasks.lock().unwrap().push(accept);
        SilentProxy { addr, silent, accepted, held, tasks }
    }

    fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::Release);
    }
}

/// Sends `from..to` (record `i` to partition `i % 4`) and waits for every acknowledgement; a
/// failed send fails the test.
async fn send_all(producer: &Producer, from: u32, to: u32) {
    let mut pending = Vec::new();
    for i in from..to {
        let record = ProducerRecord::new("silence", format!("{i}")).partition(i % 4).key(vec![b'k'; 200]);
        pending.push(producer.send(record).await.unwrap_or_else(|e| panic!("send {i}: {e}")));
    }
    for (i, delivery) in (from..to).zip(pending) {
        delivery.await.unwrap_or_else(|e| panic!("record {i} was not acknowledged: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_silent_link_outlasts_the_request_timeout_every_record_arrives_once_and_in_order() {
    let broker = Broker::start(&[]);
    let proxy = SilentProxy::start(broker.addr.clone()).await;
    let config = ClientConfig::new(proxy.addr.clone())
        .request_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2));
    let client = Client::connect(config).await.unwrap();
    Admin::new(client.clone()).create_topic("silence", 4, &[]).await.unwrap();
    let producer =
        Arc::new(Producer::new(client.clone(), ProducerConfig::default().linger(Duration::from_millis(2))));
    send_all(&producer, 0, 3000).await;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("silence", &[0, 1, 2, 3]).await.unwrap();
    consumer.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    let mut records = read_all(&mut consumer, 3000).await;
    assert_eq!(records.len(), 3000);

    // 6 s of silence: three request timeouts. Records keep being sent into it, and the consumer
    // keeps polling.
    let accepted_before = proxy.accepted.load(Ordering::Relaxed);
    proxy.set_silent(true);
    let sending = {
        let producer = producer.clone();
        tokio::spawn(async move { send_all(&producer, 3000, 6000).await })
    };
    let polled = consumer.poll(Duration::from_secs(3)).await;
    assert!(polled.as_ref().map_or(true, |r| r.is_empty()), "nothing crosses a silent link: {polled:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!sending.is_finished(), "no record can be acknowledged through the silence");
    proxy.set_silent(false);
    let back = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), sending)
        .await
        .expect("every record acknowledged within 60 s of the link's return")
        .expect("the sending task");
    let acknowledged_in = back.elapsed();
    records.extend(read_all(&mut consumer, 3000).await);

    common::assert_each_partition_in_order(&records, 4, 6000);
    let (accepted, held) = (proxy.accepted.load(Ordering::Relaxed), proxy.held.load(Ordering::Relaxed));
    assert!(accepted > accepted_before, "the client gave up on the silent connections and made new ones");
    assert!(held > 0, "the silence held bytes, delivered late");
    eprintln!(
        "RELIABILITY silent-link: 6 s of TCP silence (request timeout 2 s), {held} bytes held and delivered late, {} new connections; the 3,000 records sent into it acknowledged {:.1} s after the link came back, all 6,000 read once and in order",
        accepted - accepted_before,
        acknowledged_in.as_secs_f64()
    );
}

/// What a group member's polling task saw, shared with the test.
#[derive(Default)]
struct Seen {
    values: Vec<u32>,
    partitions: Vec<u32>,
    poll_errors: u64,
    commit_errors: u64,
}

/// Polls `consumer` (subscribed), and commits after each poll if `commit`, until `stop`,
/// noting what it read and which partitions it holds.
fn member(
    mut consumer: Consumer,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    commit: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Acquire) {
            let polled = consumer.poll(Duration::from_millis(200)).await;
            let committed = if commit { consumer.commit().await } else { Ok(()) };
            let mut seen = seen.lock().unwrap();
            match polled {
                Ok(records) => seen.values.extend(records.iter().map(|r| {
                    std::str::from_utf8(r.value.as_deref().unwrap()).unwrap().parse::<u32>().unwrap()
                })),
                Err(_) => seen.poll_errors += 1,
            }
            if committed.is_err() {
                seen.commit_errors += 1;
            }
            seen.partitions = consumer.assignment().iter().map(|tp| tp.partition).collect();
        }
    })
}

async fn produce_range(client: &Client, from: u32, to: u32) {
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    send_all_to(&producer, "work", from, to).await;
}

async fn send_all_to(producer: &Producer, topic: &str, from: u32, to: u32) {
    let mut pending = Vec::new();
    for i in from..to {
        let record = ProducerRecord::new(topic.to_owned(), format!("{i}")).partition(i % 4);
        pending.push(producer.send(record).await.unwrap());
    }
    for delivery in pending {
        delivery.await.expect("acknowledged");
    }
}

/// Waits until `check` holds, or panics with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within {limit:?}");
}

/// A group member behind a link that goes silent for longer than its session timeout: the
/// broker expires it and the other member takes all the partitions and reads everything
/// produced meanwhile, while the silenced member, its heartbeats unanswered for a session,
/// drops its partitions; once the link is back it rejoins and gets partitions again.
/// Nothing produced is missed by the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_a_silent_link_is_replaced_and_rejoins_once_it_is_back() {
    let broker = Broker::start(&[]);
    let proxy = SilentProxy::start(broker.addr.clone()).await;
    let direct = broker.client().await;
    Admin::new(direct.clone()).create_topic("work", 4, &[]).await.unwrap();
    produce_range(&direct, 0, 2000).await;

    let group = || skein_client::GroupConfig::new("workers").session_timeout(Duration::from_secs(2));
    let behind = Client::connect(
        ClientConfig::new(proxy.addr.clone())
            .request_timeout(Duration::from_secs(1))
            .connect_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let mut consumers = Vec::new();
    for client in [behind, direct.clone()] {
        let mut consumer = Consumer::new(client, ConsumerConfig::default());
        consumer.subscribe(&["work"], group()).await.unwrap();
        consumers.push(consumer);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (a, b) = (Arc::new(Mutex::new(Seen::default())), Arc::new(Mutex::new(Seen::default())));
    // The member behind the link does not commit: a commit into the silence would hold its
    // loop for the client's retry timeout, and with it this test's view of its partitions.
    let direct_member = member(consumers.pop().unwrap(), b.clone(), stop.clone(), true);
    let proxied_member = member(consumers.pop().unwrap(), a.clone(), stop.clone(), false);
    let held = |seen: &Arc<Mutex<Seen>>| seen.lock().unwrap().partitions.len();
    let union = |from: u32, to: u32| {
        let (a, b) = (a.lock().unwrap(), b.lock().unwrap());
        (from..to).all(|i| a.values.contains(&i) || b.values.contains(&i))
    };
    eventually(Duration::from_secs(30), "both members hold partitions and the group read 0..2000", || {
        held(&a) > 0 && held(&b) > 0 && union(0, 2000)
    })
    .await;

    // The link goes silent for 8 s, four session timeouts; records keep coming.
    proxy.set_silent(true);
    let silenced = Instant::now();
    produce_range(&direct, 2000, 4000).await;
    let took_over =
        eventually(Duration::from_secs(20), "the other member holds all 4 partitions", || held(&b) == 4)
            .await;
    // And the silenced member knows it is no member any more: it dropped its partitions
    // (it does not go on reading them beside the other member).
    let dropped =
        eventually(Duration::from_secs(20), "the silenced member dropped its partitions", || held(&a) == 0)
            .await;
    eventually(Duration::from_secs(20), "the other member read what came meanwhile", || {
        let b = b.lock().unwrap();
        (2000..4000).all(|i| b.values.contains(&i))
    })
    .await;
    let silent_for = Duration::from_secs(8).saturating_sub(silenced.elapsed());
    tokio::time::sleep(silent_for).await;
    proxy.set_silent(false);

    // Back: the member rejoins and gets partitions again; what comes next is read by the group.
    let rejoined =
        eventually(Duration::from_secs(30), "the member behind the link holds partitions again", || {
            held(&a) > 0 && held(&b) < 4
        })
        .await;
    produce_range(&direct, 4000, 6000).await;
    eventually(Duration::from_secs(30), "the group read everything produced", || union(0, 6000)).await;
    stop.store(true, Ordering::Release);
    let _ = tokio::time::timeout(Duration::from_secs(10), direct_member).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), proxied_member).await;
    let a = a.lock().unwrap();
    assert!(
        !(2000..4000).any(|i| a.values.contains(&i)),
        "the silenced member read none of the records produced in the silence: the other member read and committed them"
    );
    eprintln!(
        "RELIABILITY silent-member: session timeout 2 s, 8 s of silence: the other member held all 4 partitions {:.1} s after the silence began, the silenced one had dropped its own {:.1} s after it and held partitions again {:.1} s after the link came back ({} poll errors on its side meanwhile); the group read all 6,000 records",
        took_over.as_secs_f64(),
        (took_over + dropped).as_secs_f64(),
        rejoined.as_secs_f64(),
        a.poll_errors,
    );
}
