//! The load: producer and consumer tasks on the native client.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use skein_client::{
    Acks, Client, ClientConfig, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig,
    ProducerRecord, SeekTo,
};

use crate::stats::{new_histogram, Counters};

/// What one run does.
#[derive(Debug, Clone)]
pub struct Workload {
    pub bootstrap: String,
    /// TCP, or QUIC with the certificate authority to trust.
    pub transport: skein_client::Transport,
    /// A connection per broker shard (the client's default), or one for everything.
    pub connection_per_shard: bool,
    pub topic: String,
    pub partitions: u32,
    pub producers: usize,
    pub consumers: usize,
    pub message_size: usize,
    pub batch_bytes: usize,
    pub linger: Duration,
    pub acks: Acks,
    pub max_in_flight: usize,
    /// Total records (warm-up included), or run for `duration`.
    pub messages: Option<u64>,
    pub duration: Option<Duration>,
    /// Records sent in the first `warmup` are not measured.
    pub warmup: Duration,
    /// Records/s cap for all producers together.
    pub rate: Option<f64>,
    /// Keys drawn from this many distinct keys; none without.
    pub keys: Option<u64>,
}

/// When the measured part of the run starts, and the stop condition.
#[derive(Debug, Clone)]
pub struct Clock {
    pub started: Instant,
    pub measure_from: Instant,
    pub deadline: Option<Instant>,
}

impl Clock {
    pub fn new(workload: &Workload) -> Clock {
        let started = Instant::now();
        Clock {
            started,
            measure_from: started + workload.warmup,
            deadline: workload.duration.map(|d| started + workload.warmup + d),
        }
    }

    pub fn expired(&self) -> bool {
        self.expired_at(Instant::now())
    }

    pub fn expired_at(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}

pub async fn connect(workload: &Workload) -> Result<Client, ClientError> {
    let mut config = ClientConfig::new(workload.bootstrap.clone());
    config.transport = workload.transport.clone();
    config.connection_per_shard = workload.connection_per_shard;
    config.client_id = "skein-bench".into();
    Client::connect(config).await
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A small deterministic generator for keys and payload bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What a producer task measured.
pub struct ProducerOutcome {
    pub latency: Histogram<u64>,
    pub sent: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// Shared by a producer task and its records' callbacks: one lock per acknowledged record.
/// The shared [`Counters`] (read each second by the progress line and the timeline) are fed
/// from here at most [`COUNTERS_EVERY`] late (by the callbacks, and by a ticker while none
/// come), not one record at a time: five atomic operations per record on counters that other
/// threads read were a few % of a flat-out producer's CPU.
struct ProducerStats {
    inner: Mutex<StatsInner>,
    counters: Arc<Counters>,
    measure_from: Instant,
    message_size: u64,
}

/// How long acknowledged records may wait in a [`ProducerStats`] before a callback hands them
/// to the shared counters.
const COUNTERS_EVERY: Duration = Duration::from_millis(1);

/// How often a producer's ticker hands over what the callbacks left pending once no more
/// come (a stall, the end of a burst). A 1 ms ticker woke every producer task 1,000 times a
/// second, 100,000 wake-ups a second with `--producers 100`, for counters read once a second:
/// at 10 ms, the records acknowledged just before a stall reach the second they belong to at
/// most 10 ms late (a second's figure then lands in the next one only for the acknowledgements
/// of its last 10 ms before a stall).
const TICKER_EVERY: Duration = Duration::from_millis(10);

struct StatsInner {
    latency: Histogram<u64>,
    failed: u64,
    first_error: Option<String>,
    /// Not yet added to the shared counters.
    pending: Pending,
    pending_since: Instant,
}

/// Acknowledgements a [`ProducerStats`] has not yet added to the shared counters.
#[derive(Default)]
struct Pending {
    records: u64,
    /// Of them, sent after the warm-up.
    measured: u64,
    worst_us: u64,
}

impl StatsInner {
    fn flush(&mut self, counters: &Counters, message_size: u64, now: Instant) {
        self.pending_since = now;
        let Pending { records, measured, worst_us } = std::mem::take(&mut self.pending);
        if records > 0 {
            counters.add(records - measured, (records - measured) * message_size, false);
            counters.add(measured, measured * message_size, true);
            counters.note_latency(worst_us);
        }
    }
}

impl ProducerStats {
    fn record(&self, sent_at: Instant, result: Result<skein_client::RecordMetadata, ClientError>) {
        let mut inner = self.inner.lock().expect("not poisoned");
        match result {
            Ok(_) => {
                let now = Instant::now();
                inner.pending.records += 1;
                if sent_at >= self.measure_from {
                    let micros = now.saturating_duration_since(sent_at).as_micros().max(1) as u64;
                    inner.pending.measured += 1;
                    inner.pending.worst_us = inner.pending.worst_us.max(micros);
                    let _ = inner.latency.record(micros);
                }
                if now.saturating_duration_since(inner.pending_since) >= COUNTERS_EVERY {
                    inner.flush(&self.counters, self.message_size, now);
                }
            }
            Err(error) => {
                inner.failed += 1;
                inner.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

/// Aborts a helper task when its owner returns, by any path.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `share` records (or until the deadline), pacing at `rate` if set. With `stamp`, each
/// value starts with the send time (ns since the epoch) for end-to-end latency. Each record's
/// acknowledgement is timed in its delivery callback.
pub async fn produce(
    workload: Arc<Workload>,
    clock: Clock,
    index: usize,
    share: Option<u64>,
    counters: Arc<Counters>,
    stamp: bool,
) -> Result<ProducerOutcome, ClientError> {
    let client = connect(&workload).await?;
    let config = ProducerConfig::default()
        .acks(workload.acks)
        .batch_bytes(workload.batch_bytes)
        .linger(workload.linger)
        .max_in_flight(workload.max_in_flight);
    let producer = Producer::new(client, config);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1));
    let payload: Bytes = (0..workload.message_size).map(|_| rng.next() as u8).collect::<Vec<u8>>().into();
    let interval = workload.rate.map(|rate| Duration::from_secs_f64(workload.producers as f64 / rate));
    let stats = Arc::new(ProducerStats {
        inner: Mutex::new(StatsInner {
            latency: new_histogram(),
            failed: 0,
            first_error: None,
            pending: Pending::default(),
            pending_since: Instant::now(),
        }),
        counters,
        measure_from: clock.measure_from,
        message_size: workload.message_size as u64,
    });
    // Hands the counters what the callbacks left pending when no more come (a stall, the end).
    let ticker = AbortOnDrop(tokio::spawn({
        let stats = stats.clone();
        async move {
            let mut tick = tokio::time::interval(TICKER_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut inner = stats.inner.lock().expect("not poisoned");
                if inner.pending.records > 0 {
                    inner.flush(&stats.counters, stats.message_size, Instant::now());
                }
            }
        }
    }));
    let paced_from = Instant::now();
    let mut sent = 0u64;
    let topic: Arc<str> = workload.topic.as_str().into();
    // The clock is read once per `CLOCK_EVERY` records, and after every wait: a flat-out
    // producer read it three times per record (deadline, pacing, send time), 9 % of its CPU
    // samples in `clock_gettime`. A record's send time is then up to `CLOCK_EVERY - 1` sends
    // (a few µs) earlier than its real one, so its latency reads a few µs long, never short.
    const CLOCK_EVERY: u64 = 16;
    let mut now = Instant::now();
    // The stamp is the wall clock at `now`, from one reading of each clock here: a wall-clock
    // read per record was 2.5 % of an end-to-end run's CPU samples (`__vdso_clock_gettime`),
    // the load generator's, not the broker's. Like the send time, it is a few µs early.
    let (wall_base, instant_base) = (now_ns(), now);
    loop {
        if share.is_some_and(|share| sent >= share) {
            break;
        }
        if sent.is_multiple_of(CLOCK_EVERY) {
            now = Instant::now();
            if clock.expired_at(now) {
                break;
            }
        }
        if let Some(interval) = interval {
            let due = paced_from + interval.mul_f64(sent as f64);
            if now < due {
                now = Instant::now();
                if now < due {
                    tokio::time::sleep_until(due.into()).await;
                    now = Instant::now();
                }
            }
        }
        let value = if stamp {
            let mut value = BytesMut::with_capacity(payload.len().max(8));
            value.put_u64_le(wall_base + now.duration_since(instant_base).as_nanos() as u64);
            value.extend_from_slice(&payload[8.min(payload.len())..]);
            value.freeze()
        } else {
            payload.clone()
        };
        let mut message = ProducerRecord::new(topic.clone(), value);
        if let Some(keys) = workload.keys {
            message = message.key(format!("key-{}", rng.next() % keys));
        }
        let sent_at = now;
        let stats = stats.clone();
        // The send may wait (for buffer memory, a broker, metadata): the clock is read again
        // after one that did, so no later record inherits the wait.
        let send = producer.send_with_callback(message, move |result| stats.record(sent_at, result));
        let mut send = std::pin::pin!(send);
        match futures::poll!(send.as_mut()) {
            std::task::Poll::Ready(result) => result?,
            std::task::Poll::Pending => {
                send.await?;
                now = Instant::now();
            }
        }
        sent += 1;
    }
    producer.flush().await?;
    drop(producer);
    drop(ticker);
    let mut inner = stats.inner.lock().expect("not poisoned");
    inner.flush(&stats.counters, stats.message_size, Instant::now());
    let latency = std::mem::replace(&mut inner.latency, new_histogram());
    Ok(ProducerOutcome { latency, sent, failed: inner.failed, first_error: inner.first_error.clone() })
}

/// What a consumer task measured.
pub struct ConsumerOutcome {
    pub latency: Histogram<u64>,
    pub received: u64,
}

/// Where a consumer starts and when it stops.
pub enum ConsumeUntil {
    /// Read from the beginning until these end offsets (consume mode).
    Offsets(Vec<(u32, u64)>),
    /// Read new records, counting them in `received`, until `stop` is set (end-to-end mode).
    Stop { received: Arc<AtomicU64>, stop: Arc<std::sync::atomic::AtomicBool> },
}

pub async fn consume(
    workload: Arc<Workload>,
    clock: Clock,
    partitions: Vec<u32>,
    until: ConsumeUntil,
    counters: Arc<Counters>,
    stamped: bool,
) -> Result<ConsumerOutcome, ClientError> {
    let client = connect(&workload).await?;
    let config = ConsumerConfig::default()
        .fetch_wait_max(Duration::from_millis(100))
        .partition_bytes_max(4 << 20)
        .fetch_bytes_max(32 << 20);
    let mut consumer = Consumer::new(client, config);
    consumer.assign(&workload.topic, &partitions).await?;
    match &until {
        ConsumeUntil::Offsets(_) => consumer.seek_all(SeekTo::Beginning).await?,
        ConsumeUntil::Stop { .. } => consumer.seek_all(SeekTo::End).await?,
    }
    let mut outcome = ConsumerOutcome { latency: new_histogram(), received: 0 };
    // The partitions not yet read to their end, looked at after a poll only where it returned
    // records (all of them after an empty one): looking at every partition after every poll
    // was most of the load generator's time with 10,000 partitions.
    let reached = |consumer: &Consumer, partition: u32, end: u64| {
        consumer.position(&workload.topic, partition).is_some_and(|at| at >= end)
    };
    let mut unread: HashMap<u32, u64> = match &until {
        ConsumeUntil::Offsets(ends) => {
            ends.iter().copied().filter(|&(p, end)| !reached(&consumer, p, end)).collect()
        }
        ConsumeUntil::Stop { .. } => HashMap::new(),
    };
    let mut returned: Vec<u32> = Vec::new();
    loop {
        let finished = match &until {
            ConsumeUntil::Offsets(_) => unread.is_empty(),
            ConsumeUntil::Stop { stop, .. } => stop.load(Ordering::Relaxed),
        };
        if finished || (matches!(until, ConsumeUntil::Offsets(_)) && clock.expired()) {
            break;
        }
        let records = consumer.poll(Duration::from_millis(100)).await?;
        let now = now_ns();
        let arrived = Instant::now();
        let mut bytes = 0u64;
        for record in &records {
            let value = record.value.as_deref().unwrap_or_default();
            bytes += value.len() as u64;
            if stamped && value.len() >= 8 && arrived >= clock.measure_from {
                let sent = u64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
                let micros = (now.saturating_sub(sent) / 1000).max(1);
                counters.note_latency(micros);
                let _ = outcome.latency.record(micros);
            }
        }
        if matches!(until, ConsumeUntil::Offsets(_)) {
            returned.clear();
            returned.extend(records.iter().map(|r| r.partition));
            returned.dedup();
            if records.is_empty() {
                returned.extend(unread.keys().copied());
            }
            for &partition in &returned {
                if unread.get(&partition).is_some_and(|&end| reached(&consumer, partition, end)) {
                    unread.remove(&partition);
                }
            }
        }
        outcome.received += records.len() as u64;
        counters.add(records.len() as u64, bytes, arrived >= clock.measure_from);
        if let ConsumeUntil::Stop { received, .. } = &until {
            received.fetch_add(records.len() as u64, Ordering::Relaxed);
        }
    }
    Ok(outcome)
}
