//! Idempotent producers running flat out (full buffers, every request slot in use) while the
//! broker is SIGKILLed at random moments and restarted at once, stopped with SIGTERM, killed
//! and kept down for 6 s, then paused for 5 s with SIGSTOP: every producer must finish, every
//! record must be acknowledged (not one failed send is tolerated), and the log must hold each
//! record exactly once, in order per partition, at the offset it was acknowledged at.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Broker;
use skein_client::{
    Acks, Admin, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
};

const TOPIC: &str = "flat-out";
const PARTITIONS: u32 = 4;
const PRODUCERS: usize = 2;

/// How the broker goes down in a round, and how long it stays down.
#[derive(Debug, Clone, Copy)]
enum Nemesis {
    Kill { down: Duration },
    Terminate,
}

const ROUNDS: [Nemesis; 6] = [
    Nemesis::Kill { down: Duration::ZERO },
    Nemesis::Kill { down: Duration::ZERO },
    Nemesis::Terminate,
    Nemesis::Kill { down: Duration::from_secs(6) },
    Nemesis::Kill { down: Duration::ZERO },
    Nemesis::Kill { down: Duration::ZERO },
];

/// The outcome of one record, by producer and sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    Acknowledged { partition: u32, offset: u64 },
    Failed,
}

/// Outcomes of every record of every producer (compact: millions of records), and the first
/// errors.
#[derive(Default)]
struct Ledger {
    outcomes: Vec<Vec<Outcome>>,
    acknowledged: usize,
    errors: Vec<String>,
}

type Shared = Arc<Mutex<Ledger>>;

struct Run {
    sent: u64,
    flushed_in: Duration,
}

/// Sends records as fast as `send` takes them until `stop`, then flushes.
async fn produce(addr: String, producer_index: usize, stop: Arc<AtomicBool>, ledger: Shared) -> Run {
    let mut config = ClientConfig::new(addr);
    config.connect_timeout = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(10);
    let client = Client::connect(config).await.unwrap();
    let config = if producer_index == 0 {
        // Small batches and a small buffer: it is full all the time, every request slot in use.
        ProducerConfig::default()
            .acks(Acks::All)
            .linger(Duration::from_millis(1))
            .batch_bytes(16 << 10)
            .buffer_bytes(1 << 20)
            .max_in_flight(5)
    } else {
        // What `skein produce` uses: large batches, a 64 MiB buffer.
        ProducerConfig::default().acks(Acks::Leader)
    };
    let producer = Producer::new(client, config);
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let value = format!("{producer_index}:{sent:010}");
        let record = ProducerRecord::new(TOPIC, value).key(format!("k{}", sent % 16));
        ledger.lock().unwrap().outcomes[producer_index].push(Outcome::Pending);
        let ledger = ledger.clone();
        let sequence = sent as usize;
        producer
            .send_with_callback(record, move |outcome| {
                let mut ledger = ledger.lock().unwrap();
                ledger.outcomes[producer_index][sequence] = match outcome {
                    Ok(metadata) => {
                        ledger.acknowledged += 1;
                        let offset = metadata.offset.expect("acks=1/all report offsets");
                        Outcome::Acknowledged { partition: metadata.partition, offset }
                    }
                    Err(error) => {
                        if ledger.errors.len() < 5 {
                            ledger.errors.push(format!("{producer_index}:{sequence}: {error}"));
                        }
                        Outcome::Failed
                    }
                };
            })
            .await
            .unwrap_or_else(|e| panic!("producer {producer_index}: send failed: {e}"));
        sent += 1;
    }
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(90), producer.flush())
        .await
        .unwrap_or_else(|_| panic!("producer {producer_index} did not finish within 90 s of its last send"))
        .unwrap();
    Run { sent, flushed_in: started.elapsed() }
}

/// Reads the whole topic and checks every record against the ledger: at its acknowledged
/// offset, once, in send order within its partition. Returns the records read.
async fn check_log(addr: &str, ledger: &Ledger) -> u64 {
    let client = Client::connect(ClientConfig::new(addr.to_owned())).await.unwrap();
    let ends: Vec<u64> = Admin::new(client.clone())
        .describe_topic(TOPIC)
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.end_offset)
        .collect();
    let total: u64 = ends.iter().sum();
    let mut consumer =
        Consumer::new(client, ConsumerConfig::default().fetch_wait_max(Duration::from_millis(50)));
    consumer.assign_all(TOPIC).await.unwrap();
    let mut seen: Vec<Vec<bool>> = ledger.outcomes.iter().map(|o| vec![false; o.len()]).collect();
    let mut last: HashMap<(usize, u32), u64> = HashMap::new();
    let mut read = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while read < total && Instant::now() < deadline {
        for record in consumer.poll(Duration::from_millis(200)).await.unwrap() {
            let value = String::from_utf8(record.value.unwrap().to_vec()).unwrap();
            let (producer, sequence) = value.split_once(':').expect("a value this test wrote");
            let (producer, sequence): (usize, u64) = (producer.parse().unwrap(), sequence.parse().unwrap());
            let (partition, offset) = (record.partition, record.offset);
            assert_eq!(
                ledger.outcomes[producer].get(sequence as usize),
                Some(&Outcome::Acknowledged { partition, offset }),
                "record {value} at {partition}/{offset} is where it was acknowledged"
            );
            assert!(!std::mem::replace(&mut seen[producer][sequence as usize], true), "{value} read twice");
            if let Some(previous) = last.insert((producer, partition), sequence) {
                assert!(previous < sequence, "partition {partition}: {producer}:{previous} before {value}");
            }
            read += 1;
        }
    }
    assert_eq!(read, total, "every record up to the end offsets was read");
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_out_idempotent_producers_finish_through_kills_and_a_pause_with_every_record_once() {
    let mut broker = Broker::start(&["--fsync", "always"]);
    // About 30 bytes per record, some 20 million records on this machine.
    common::require_free_space(broker.data_dir(), 2 << 30);
    Admin::new(broker.client().await).create_topic(TOPIC, PARTITIONS, &[]).await.unwrap();
    let ledger: Shared =
        Arc::new(Mutex::new(Ledger { outcomes: vec![Vec::new(); PRODUCERS], ..Ledger::default() }));
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| tokio::spawn(produce(broker.addr.clone(), p, stop.clone(), ledger.clone())))
        .collect();

    // The nemesis: down at random moments (kill -9 or SIGTERM), up again at once or after a
    // while, then a 5 s pause.
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("nemesis seed {seed}");
    let mut state = seed;
    let mut random = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let acknowledged = || ledger.lock().unwrap().acknowledged;
    for (round, nemesis) in ROUNDS.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(300 + random(1200))).await;
        let before = acknowledged();
        match nemesis {
            Nemesis::Kill { down } => {
                broker.kill();
                tokio::time::sleep(*down).await;
            }
            Nemesis::Terminate => assert!(broker.stop(), "a clean stop"),
        }
        broker.restart();
        eprintln!("round {}: {nemesis:?} with {before} records acknowledged before it", round + 1);
    }
    tokio::time::sleep(Duration::from_millis(500 + random(500))).await;
    let pid = broker.pid().expect("running") as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    tokio::time::sleep(Duration::from_secs(5)).await;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let after_pause = acknowledged();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0u64;
    for (index, producer) in producers.into_iter().enumerate() {
        let run = producer.await.unwrap();
        eprintln!(
            "producer {index}: {} records sent, flushed {:?} after its last send",
            run.sent, run.flushed_in
        );
        total += run.sent;
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        ledger.errors.is_empty(),
        "records failed (a producer must ride over restarts): {:?}",
        ledger.errors
    );
    let pending = ledger.outcomes.iter().flatten().filter(|o| **o == Outcome::Pending).count();
    assert_eq!(pending, 0, "every record has an outcome once flushed");
    assert_eq!(ledger.acknowledged as u64, total, "every record was acknowledged");
    assert!(ledger.acknowledged > after_pause, "records were acknowledged after the pause");
    assert!(total >= 20_000, "only {total} records were sent: the nemesis hit idle producers");

    let read = check_log(&broker.addr, &ledger).await;
    let stored: u64 = walk_bytes(broker.data_dir());
    eprintln!("{} MiB in the data directory", stored >> 20);
    assert_eq!(read, total, "the log holds every acknowledged record, and nothing else");
    let log = broker.log();
    let refused = log.matches("refused an idempotent batch").count();
    let duplicates = log.matches("duplicate batch answered").count();
    eprintln!(
        "RELIABILITY producer-restarts: {total} records from {PRODUCERS} flat-out producers through {} kill -9 (one \
         down for 6 s), a SIGTERM and a 5 s SIGSTOP: all acknowledged, each once, in order; {refused} refusals, \
         {duplicates} duplicates answered",
        ROUNDS.iter().filter(|n| matches!(n, Nemesis::Kill { .. })).count()
    );
}

fn walk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
