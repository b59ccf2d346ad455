//! The producer: per-partition batching by size and linger time, partitioning by key,
//! bounded memory and requests in flight, retries with backoff, a future per record.
//!
//! # Delivery
//! * `acks=0`: the request is written to the socket and forgotten; the record's future resolves
//!   with no offset. At-most-once, fastest.
//! * `acks=1` / `acks=all`: the future resolves with the record's offset once the broker's log
//!   acknowledged it (after `fdatasync` on a broker started with `--fsync always`).
//!   Retriable errors (a full disk, a timeout, a lost connection) are retried up to `retries`
//!   times with `retry_backoff` between tries: at-least-once, so a retry after a lost response
//!   may write a record twice, and with more than one request in flight a retried batch may
//!   land after a later one, unless the producer is idempotent.
//! * **Idempotent** (`idempotence: true`, the default with `acks=1`/`all`): the producer gets a
//!   producer id from the broker, and every batch carries it with a per-partition sequence
//!   number. The broker writes each sequence once and in order: a retry of a batch already
//!   written is answered with its original offsets, a batch that arrives before an earlier
//!   one being retried is refused (`OutOfOrderSequence`) and retried after it. So retries
//!   never duplicate or reorder records, even with `max_in_flight > 1`, across lost responses,
//!   reconnections and broker restarts. A producer whose id was given a newer epoch elsewhere
//!   is fenced (`ProducerFenced`, not retried).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use skein_net::{
    acks, ErrorCode, InitProducerIdRequest, InitProducerIdResponse, ProducePartition, ProduceRequest,
    ProduceResponse, Request, TopicData,
};
use skein_storage::batch::{BatchBuilder, BATCH_HEADER_BYTES};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::{decode, now_ms, Client, ClientError, Result};

/// How many acknowledgements a produce waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// No response (at most once).
    None,
    /// The partition leader's log acknowledged.
    Leader,
    /// Every in-sync replica (the leader alone on a single node).
    All,
}

impl Acks {
    fn wire(self) -> i8 {
        match self {
            Acks::None => acks::NONE,
            Acks::Leader => acks::LEADER,
            Acks::All => acks::ALL,
        }
    }
}

impl std::str::FromStr for Acks {
    type Err = String;
    fn from_str(text: &str) -> std::result::Result<Acks, String> {
        match text {
            "0" => Ok(Acks::None),
            "1" => Ok(Acks::Leader),
            "all" | "-1" => Ok(Acks::All),
            other => Err(format!("acks must be 0, 1 or all (got {other:?})")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProducerConfig {
    pub acks: Acks,
    /// A partition's batch is sent once it reaches this size…
    pub batch_bytes: usize,
    /// …or once its first record waited this long.
    pub linger: Duration,
    /// Produce requests in flight at once.
    pub max_in_flight: usize,
    /// Retries of a retriable failure before the record's future fails.
    pub retries: u32,
    pub retry_backoff: Duration,
    /// Bytes of records buffered or in flight; `send` waits beyond this.
    pub buffer_bytes: usize,
    /// Largest produce request.
    pub request_bytes_max: usize,
    /// Exactly-once writes per partition (see the module docs). Ignored with `acks=0`.
    pub idempotence: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            batch_bytes: 256 << 10,
            linger: Duration::from_millis(5),
            max_in_flight: 5,
            retries: 10,
            retry_backoff: Duration::from_millis(100),
            buffer_bytes: 64 << 20,
            request_bytes_max: 8 << 20,
            idempotence: true,
        }
    }
}

/// A record to send.
#[derive(Debug, Clone)]
pub struct ProducerRecord {
    /// Shared: pass an `Arc<str>` you keep to avoid an allocation per record.
    pub topic: Arc<str>,
    /// `None`: chosen from the key (same key, same partition), or spread when there is no key.
    pub partition: Option<u32>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Milliseconds since the epoch; `None`: now.
    pub timestamp: Option<i64>,
}

impl ProducerRecord {
    pub fn new(topic: impl Into<Arc<str>>, value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord {
            topic: topic.into(),
            partition: None,
            key: None,
            value: Some(value.into()),
            headers: Vec::new(),
            timestamp: None,
        }
    }

    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((key.into(), Some(value.into())));
        self
    }

    pub fn timestamp(mut self, timestamp: i64) -> Self {
        self.timestamp = Some(timestamp);
        self
    }

    fn encoded_size(&self) -> usize {
        let headers: Vec<(&str, Option<&[u8]>)> =
            self.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        BatchBuilder::record_size(0, 0, self.key.as_deref(), self.value.as_deref(), &headers) + 16
    }
}

/// Where an acknowledged record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    pub partition: u32,
    /// `None` with `acks=0` (the broker does not answer).
    pub offset: Option<u64>,
    pub timestamp: i64,
}

/// Resolves when the record is acknowledged (or failed for good).
pub struct DeliveryFuture {
    receiver: oneshot::Receiver<Result<RecordMetadata>>,
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receiver).poll(cx).map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// How a record's outcome is delivered.
enum Completion {
    Future(oneshot::Sender<Result<RecordMetadata>>),
    Callback(Box<dyn FnOnce(Result<RecordMetadata>) + Send>),
}

struct Waiter {
    completion: Completion,
    timestamp: i64,
}

impl Waiter {
    fn complete(self, result: Result<RecordMetadata>) {
        match self.completion {
            Completion::Future(sender) => {
                let _ = sender.send(result);
            }
            Completion::Callback(callback) => callback(result),
        }
    }
}

struct OpenBatch {
    builder: BatchBuilder,
    created: Instant,
    waiters: Vec<Waiter>,
    /// Buffer memory held by the batch's records.
    memory: usize,
}

struct SealedBatch {
    sequence: u64,
    topic: String,
    partition: u32,
    bytes: Bytes,
    waiters: Vec<Waiter>,
    memory: usize,
}

/// FNV-1a: topic names are short and trusted, and this runs once per record.
#[derive(Default, Clone, Copy)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// The record accumulator: open batches per partition and sealed batches waiting to be sent.
/// `send` appends here directly (under one short lock); the sender task drains it.
#[derive(Default)]
struct Accumulator {
    /// Open batches by topic, indexed by partition.
    open: FastMap<String, Vec<Option<OpenBatch>>>,
    ready: VecDeque<SealedBatch>,
    next_sequence: u64,
    /// Sealed batches not yet completed (sent and answered, or failed).
    outstanding: BTreeSet<u64>,
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    /// Records without a key stick to one partition per topic until a batch's worth was sent.
    sticky: FastMap<String, (u32, usize)>,
    closed: bool,
    /// The idempotent producer's id and epoch, and the next sequence number per partition
    /// (cleared whenever the id or epoch changes).
    producer: Option<(i64, i16)>,
    sequences: FastMap<(String, u32), i32>,
    /// Set when the broker fenced this producer: every later send fails with it.
    fenced: Option<ClientError>,
}

impl Accumulator {
    fn seal(&mut self, topic: &str, partition: u32, mut batch: OpenBatch) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.outstanding.insert(sequence);
        if let Some((producer_id, epoch)) = self.producer {
            let next = self.sequences.entry((topic.to_owned(), partition)).or_insert(0);
            batch.builder.set_producer(producer_id, epoch, *next);
            *next = next.wrapping_add(batch.builder.record_count() as i32);
        }
        self.ready.push_back(SealedBatch {
            sequence,
            topic: topic.to_owned(),
            partition,
            bytes: batch.builder.finish().freeze(),
            waiters: batch.waiters,
            memory: batch.memory,
        });
    }

    /// Seals the batches that waited `linger` (all of them with `force`); returns the earliest
    /// deadline of those still open.
    fn seal_expired(&mut self, linger: Duration, force: bool) -> Option<Instant> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        for (topic, partitions) in &self.open {
            for (partition, batch) in partitions.iter().enumerate() {
                if let Some(batch) = batch {
                    let due = batch.created + linger;
                    if force || due <= now {
                        expired.push((topic.clone(), partition as u32));
                    } else {
                        next = Some(next.map_or(due, |n| n.min(due)));
                    }
                }
            }
        }
        for (topic, partition) in expired {
            let batch =
                self.open.get_mut(&topic).and_then(|p| p[partition as usize].take()).expect("listed above");
            self.seal(&topic, partition, batch);
        }
        next
    }
}

struct Shared {
    client: Client,
    config: ProducerConfig,
    accumulator: Mutex<Accumulator>,
    /// Wakes the sender task: a batch was sealed, a batch was opened (linger starts), flush,
    /// close.
    wake: tokio::sync::Notify,
    /// Bytes of records buffered or in flight.
    memory: Semaphore,
    topics: Mutex<FastMap<String, Arc<crate::TopicInfo>>>,
    /// An idempotent producer needs a producer id (before its first record), or a new epoch
    /// (a batch failed for good, leaving a gap in its partition's sequence). `init` serialises
    /// asking for it; the id itself lives in the accumulator.
    needs_id: std::sync::atomic::AtomicBool,
    init: tokio::sync::Mutex<()>,
}

/// Sends records to a Skein broker. `send` takes `&self`: share it behind an `Arc`. Dropping
/// the producer sends what is buffered and stops its background task.
pub struct Producer {
    shared: Arc<Shared>,
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.shared.accumulator.lock().expect("not poisoned").closed = true;
        self.shared.wake.notify_one();
    }
}

impl Producer {
    pub fn new(client: Client, config: ProducerConfig) -> Producer {
        let idempotent = config.idempotence && config.acks != Acks::None;
        let shared = Arc::new(Shared {
            client,
            memory: Semaphore::new(config.buffer_bytes),
            config,
            accumulator: Mutex::new(Accumulator::default()),
            wake: tokio::sync::Notify::new(),
            topics: Mutex::new(FastMap::default()),
            needs_id: std::sync::atomic::AtomicBool::new(idempotent),
            init: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(run_sender(shared.clone()));
        Producer { shared }
    }

    async fn topic(&self, name: &str) -> Result<Arc<crate::TopicInfo>> {
        if let Some(info) = self.shared.topics.lock().expect("not poisoned").get(name) {
            return Ok(info.clone());
        }
        let info = self.shared.client.topic(name).await?;
        self.shared.topics.lock().expect("not poisoned").insert(name.to_owned(), info.clone());
        Ok(info)
    }

    /// Queues a record; the returned future resolves once it is acknowledged. Waits if
    /// `buffer_bytes` of records are already buffered or in flight.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        let (sender, receiver) = oneshot::channel();
        self.enqueue(record, Completion::Future(sender)).await?;
        Ok(DeliveryFuture { receiver })
    }

    /// Queues a record; `callback` runs with its outcome once it is acknowledged or failed
    /// for good. Cheaper than a future per record when sending millions (no task is woken per
    /// record); keep the callback short, it runs on the producer's response path.
    pub async fn send_with_callback(
        &self,
        record: ProducerRecord,
        callback: impl FnOnce(Result<RecordMetadata>) + Send + 'static,
    ) -> Result<()> {
        self.enqueue(record, Completion::Callback(Box::new(callback))).await
    }

    /// The idempotent producer's id and epoch (`None` when idempotence is off).
    ///
    /// When a batch failed for good (retries exhausted), its partition's sequence has a gap the
    /// broker would refuse forever: the producer then asks for the next epoch of its id, and
    /// sequences start again at 0 (as Kafka does since KIP-360). Batches of the old epoch still
    /// queued fail (`ProducerFenced` or `OutOfOrderSequence`); nothing is written twice.
    pub async fn producer_id(&self) -> Result<Option<(i64, i16)>> {
        self.ensure_producer_id().await?;
        let accumulator = self.shared.accumulator.lock().expect("not poisoned");
        match &accumulator.fenced {
            Some(error) => Err(error.clone()),
            None => Ok(accumulator.producer),
        }
    }

    /// Asks the broker for an id, or for the next epoch of the current one, if needed.
    async fn ensure_producer_id(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let shared = &self.shared;
        if !shared.needs_id.load(Ordering::Relaxed) {
            return Ok(());
        }
        let _init = shared.init.lock().await;
        if !shared.needs_id.load(Ordering::Relaxed) {
            return Ok(()); // another sender did it meanwhile
        }
        let current = shared.accumulator.lock().expect("not poisoned").producer;
        let (producer_id, producer_epoch) = current.unwrap_or((-1, -1));
        let request = Request::InitProducerId(InitProducerIdRequest { producer_id, producer_epoch });
        let body = shared.client.request(&request).await?;
        let response = decode(&body, InitProducerIdResponse::decode)?;
        if !response.error.is_ok() {
            return Err(ClientError::broker(response.error, "getting a producer id"));
        }
        let id = (response.producer_id, response.producer_epoch);
        if current.is_some() {
            tracing::warn!(producer_id = id.0, epoch = id.1, "a batch failed for good; new producer epoch");
        } else {
            tracing::debug!(producer_id = id.0, epoch = id.1, "idempotent producer");
        }
        {
            // A new id or epoch: every partition's sequence starts again at 0.
            let mut accumulator = shared.accumulator.lock().expect("not poisoned");
            accumulator.producer = Some(id);
            accumulator.sequences.clear();
        }
        shared.needs_id.store(false, Ordering::Relaxed);
        Ok(())
    }

    async fn enqueue(&self, record: ProducerRecord, completion: Completion) -> Result<()> {
        let shared = &self.shared;
        self.ensure_producer_id().await?;
        let topic = self.topic(&record.topic).await?;
        let size = record.encoded_size();
        let limit = topic.max_message_bytes().unwrap_or(8 << 20).min(shared.config.buffer_bytes);
        if size + BATCH_HEADER_BYTES > limit {
            return Err(ClientError::RecordTooLarge { size, limit });
        }
        let batch_bytes = shared.config.batch_bytes.min(limit);
        if let Some(partition) = record.partition {
            if partition >= topic.partitions {
                return Err(ClientError::UnknownPartition { topic: record.topic.to_string(), partition });
            }
        }
        match shared.memory.try_acquire_many(size as u32) {
            Ok(permit) => permit.forget(),
            Err(_) => {
                shared.memory.acquire_many(size as u32).await.map_err(|_| ClientError::Closed)?.forget()
            }
        }
        let timestamp = record.timestamp.unwrap_or_else(now_ms);
        let headers: Vec<(&str, Option<&[u8]>)> =
            record.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        let wake = {
            let mut accumulator = shared.accumulator.lock().expect("not poisoned");
            if accumulator.closed {
                drop(accumulator);
                shared.memory.add_permits(size);
                return Err(ClientError::Closed);
            }
            if let Some(error) = accumulator.fenced.clone() {
                drop(accumulator);
                shared.memory.add_permits(size);
                return Err(error);
            }
            let partition = match (record.partition, &record.key) {
                (Some(partition), _) => partition,
                (None, Some(key)) => crc32c::crc32c(key) % topic.partitions,
                (None, None) => {
                    let spread = &shared.config;
                    if !accumulator.sticky.contains_key(&*record.topic) {
                        let start = (now_ms() as u64 % u64::from(topic.partitions)) as u32;
                        accumulator.sticky.insert(record.topic.to_string(), (start, 0));
                    }
                    let entry = accumulator.sticky.get_mut(&*record.topic).expect("inserted above");
                    if entry.1 >= batch_bytes.min(spread.batch_bytes) || entry.0 >= topic.partitions {
                        entry.0 = (entry.0 + 1) % topic.partitions;
                        entry.1 = 0;
                    }
                    entry.1 += size;
                    entry.0
                }
            };
            if !accumulator.open.contains_key(&*record.topic) {
                accumulator.open.insert(record.topic.to_string(), Vec::new());
            }
            let slots = accumulator.open.get_mut(&*record.topic).expect("inserted above");
            if slots.len() < topic.partitions as usize {
                slots.resize_with(topic.partitions as usize, || None);
            }
            let mut wake = false;
            if slots[partition as usize].as_ref().is_some_and(|b| b.builder.size_bytes() + size > batch_bytes)
            {
                let full = slots[partition as usize].take().expect("checked");
                accumulator.seal(&record.topic, partition, full);
                wake = true;
            }
            let slots = accumulator.open.get_mut(&*record.topic).expect("inserted above");
            let batch = slots[partition as usize].get_or_insert_with(|| {
                wake = true; // a new batch: its linger starts
                OpenBatch {
                    builder: BatchBuilder::with_capacity(batch_bytes.min(1 << 20)),
                    created: Instant::now(),
                    waiters: Vec::new(),
                    memory: 0,
                }
            });
            batch.builder.push(timestamp, record.key.as_deref(), record.value.as_deref(), &headers);
            batch.waiters.push(Waiter { completion, timestamp });
            batch.memory += size;
            if batch.builder.size_bytes() >= batch_bytes {
                let full = slots[partition as usize].take().expect("just used");
                accumulator.seal(&record.topic, partition, full);
                wake = true;
            }
            wake
        };
        if wake {
            shared.wake.notify_one();
        }
        Ok(())
    }

    /// Sends every buffered record now and waits until all records sent before this call are
    /// acknowledged (or failed).
    pub async fn flush(&self) -> Result<()> {
        let (sender, receiver) = oneshot::channel();
        {
            let mut accumulator = self.shared.accumulator.lock().expect("not poisoned");
            accumulator.seal_expired(Duration::ZERO, true);
            let target = accumulator.next_sequence;
            accumulator.flushes.push((target, sender));
        }
        self.shared.wake.notify_one();
        receiver.await.map_err(|_| ClientError::Closed)
    }
}

/// The producer's background task: seals lingering batches, sends sealed ones in order
/// (bounded by `max_in_flight`), and tracks completion for `flush`.
async fn run_sender(shared: Arc<Shared>) {
    let config = &shared.config;
    let idempotent = config.idempotence && config.acks != Acks::None;
    let max_in_flight = if idempotent {
        config.max_in_flight.clamp(1, skein_net::IDEMPOTENCE_WINDOW)
    } else {
        config.max_in_flight.max(1)
    };
    // With idempotence, at most IDEMPOTENCE_WINDOW batches of a partition are in flight, so the
    // broker still remembers any batch that is retried.
    let per_partition_max =
        if idempotent { skein_net::IDEMPOTENCE_WINDOW / max_in_flight } else { usize::MAX };
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let (done_sender, mut done) = mpsc::unbounded_channel::<u64>();
    loop {
        // Take what is ready, and learn when the next open batch expires.
        let (ready, next_deadline, finished) = {
            let mut accumulator = shared.accumulator.lock().expect("not poisoned");
            let closing = accumulator.closed;
            let next = accumulator.seal_expired(config.linger, closing);
            let ready: Vec<SealedBatch> = accumulator.ready.drain(..).collect();
            let first_outstanding = accumulator.outstanding.first().copied().unwrap_or(u64::MAX);
            let mut index = 0;
            while index < accumulator.flushes.len() {
                if first_outstanding >= accumulator.flushes[index].0 {
                    let (_, reply) = accumulator.flushes.swap_remove(index);
                    let _ = reply.send(());
                } else {
                    index += 1;
                }
            }
            let finished = closing && accumulator.outstanding.is_empty() && ready.is_empty();
            (ready, next, finished)
        };
        if finished {
            return;
        }
        let mut ready: VecDeque<SealedBatch> = ready.into();
        while !ready.is_empty() {
            // Written to the connection here, in seal order, so batches of a partition reach
            // the broker in the order they were made; only the wait for the answer is spawned.
            let permit = in_flight.clone().acquire_owned().await.expect("never closed");
            let mut request: Vec<SealedBatch> = Vec::new();
            let mut bytes = 0usize;
            let mut per_partition: FastMap<(String, u32), usize> = FastMap::default();
            while let Some(batch) = ready.front() {
                if !request.is_empty() && bytes + batch.bytes.len() > config.request_bytes_max {
                    break;
                }
                if idempotent {
                    let count = per_partition.entry((batch.topic.clone(), batch.partition)).or_default();
                    if *count >= per_partition_max {
                        break;
                    }
                    *count += 1;
                }
                bytes += batch.bytes.len();
                request.push(ready.pop_front().expect("front exists"));
            }
            let (produce, _) = produce_request(config.acks.wire(), &request);
            let first_try = submit(&shared.client, config.acks.wire(), produce).await;
            let (shared, done) = (shared.clone(), done_sender.clone());
            tokio::spawn(async move {
                let sequences: Vec<u64> = request.iter().map(|b| b.sequence).collect();
                send_with_retries(&shared, request, first_try).await;
                drop(permit);
                for sequence in sequences {
                    let _ = done.send(sequence);
                }
            });
        }
        let sleep = async {
            match next_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = sleep => {}
            Some(sequence) = done.recv() => {
                let mut accumulator = shared.accumulator.lock().expect("not poisoned");
                accumulator.outstanding.remove(&sequence);
                while let Ok(sequence) = done.try_recv() {
                    accumulator.outstanding.remove(&sequence);
                }
            }
        }
    }
}

fn produce_request(acks: i8, batches: &[SealedBatch]) -> (Request<Bytes>, Vec<(usize, usize)>) {
    let mut topics: Vec<TopicData<ProducePartition<Bytes>>> = Vec::new();
    let mut places = Vec::with_capacity(batches.len());
    for batch in batches {
        let partition = ProducePartition { partition: batch.partition, records: batch.bytes.clone() };
        let topic_index = match topics.iter().position(|t| t.name == batch.topic) {
            Some(index) => index,
            None => {
                topics.push(TopicData { name: batch.topic.clone(), partitions: Vec::new() });
                topics.len() - 1
            }
        };
        places.push((topic_index, topics[topic_index].partitions.len()));
        topics[topic_index].partitions.push(partition);
    }
    (Request::Produce(ProduceRequest { acks, timeout_ms: 30_000, topics }), places)
}

fn resolve(shared: &Shared, batch: SealedBatch, result: std::result::Result<Option<u64>, ClientError>) {
    if let (Err(error), true) = (&result, shared.config.idempotence && shared.config.acks != Acks::None) {
        let epoch =
            skein_storage::batch::BatchHeader::parse(&batch.bytes, usize::MAX).map(|h| h.producer_epoch).ok();
        let mut accumulator = shared.accumulator.lock().expect("not poisoned");
        // A batch of an epoch this producer already left behind changes nothing.
        if epoch.is_some() && epoch == accumulator.producer.map(|(_, epoch)| epoch) {
            if error.code() == Some(ErrorCode::ProducerFenced) {
                accumulator.fenced = Some(error.clone());
            } else {
                shared.needs_id.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    for (index, waiter) in batch.waiters.into_iter().enumerate() {
        let outcome = match &result {
            Ok(base) => Ok(RecordMetadata {
                partition: batch.partition,
                offset: base.map(|b| b + index as u64),
                timestamp: waiter.timestamp,
            }),
            Err(error) => Err(error.clone()),
        };
        waiter.complete(outcome);
    }
    shared.memory.add_permits(batch.memory);
}

/// How a produce request went out: with `acks=0` it is done once written; otherwise the
/// response is still to come.
enum Submitted {
    Written,
    Waiting(crate::connection::ResponseFuture),
}

async fn submit(client: &Client, acks: i8, request: Request<Bytes>) -> Result<Submitted> {
    let connection = client.connection().await?;
    if acks == skein_net::acks::NONE {
        connection.send_only(&request).await.map(|()| Submitted::Written)
    } else {
        connection.submit(&request).await.map(Submitted::Waiting)
    }
}

/// Waits for a request's outcome, retrying the retriable failures; resolves every record.
async fn send_with_retries(shared: &Shared, mut batches: Vec<SealedBatch>, first_try: Result<Submitted>) {
    let (client, config) = (&shared.client, &shared.config);
    let acks = config.acks.wire();
    let mut attempt = 0u32;
    let mut submitted = Some(first_try);
    loop {
        let outcome = match submitted.take() {
            Some(outcome) => outcome,
            None => submit(client, acks, produce_request(acks, &batches).0).await,
        };
        let response = match outcome {
            Ok(Submitted::Written) => {
                for batch in batches {
                    resolve(shared, batch, Ok(None));
                }
                return;
            }
            Ok(Submitted::Waiting(response)) => {
                response.await.and_then(|body| decode(&body, ProduceResponse::decode))
            }
            Err(error) => Err(error),
        };
        match response {
            Err(error) if error.is_retriable() && attempt < config.retries => {
                tracing::debug!(%error, attempt, "produce failed; retrying");
            }
            Err(error) => {
                for batch in batches {
                    resolve(shared, batch, Err(error.clone()));
                }
                return;
            }
            Ok(response) => {
                let (_, places) = produce_request(acks, &batches);
                let mut retry = Vec::new();
                for (batch, (topic_index, partition_index)) in batches.into_iter().zip(places) {
                    let answer = response
                        .topics
                        .get(topic_index)
                        .filter(|t| t.name == batch.topic)
                        .and_then(|t| t.partitions.get(partition_index))
                        .filter(|p| p.partition == batch.partition);
                    match answer {
                        Some(p) if p.error.is_ok() => {
                            let base = p.base_offset;
                            resolve(shared, batch, Ok(Some(base)));
                        }
                        Some(p) if p.error == ErrorCode::DuplicateSequence => {
                            // Written long ago (too long for the broker to remember where).
                            resolve(shared, batch, Ok(None));
                        }
                        Some(p) if p.error.is_retriable() && attempt < config.retries => {
                            if p.error.needs_metadata_refresh() {
                                let _ = client.refresh_topic(&batch.topic).await;
                            }
                            retry.push(batch);
                        }
                        Some(p) => {
                            let context = format!("producing to {}/{}", batch.topic, batch.partition);
                            resolve(shared, batch, Err(ClientError::broker(p.error, context)));
                        }
                        None => {
                            let context = format!("producing to {}/{}", batch.topic, batch.partition);
                            resolve(
                                shared,
                                batch,
                                Err(ClientError::broker(ErrorCode::Unknown, context + ": no answer")),
                            );
                        }
                    }
                }
                if retry.is_empty() {
                    return;
                }
                batches = retry;
            }
        }
        attempt += 1;
        tokio::time::sleep(config.retry_backoff * attempt.min(10)).await;
    }
}
