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
//!   land after a later one. Set `max_in_flight = 1` for strict per-partition order.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use skein_net::{acks, ErrorCode, ProducePartition, ProduceRequest, ProduceResponse, Request, TopicData};
use skein_storage::batch::{BatchBuilder, BATCH_HEADER_BYTES};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
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
        }
    }
}

/// A record to send.
#[derive(Debug, Clone)]
pub struct ProducerRecord {
    pub topic: String,
    /// `None`: chosen from the key (same key, same partition), or spread when there is no key.
    pub partition: Option<u32>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Milliseconds since the epoch; `None`: now.
    pub timestamp: Option<i64>,
}

impl ProducerRecord {
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> ProducerRecord {
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

struct Waiter {
    reply: oneshot::Sender<Result<RecordMetadata>>,
    timestamp: i64,
    _memory: OwnedSemaphorePermit,
}

enum Command {
    /// `batch_bytes`: the batch size for this topic (the producer's, capped by the topic's
    /// `max.message.bytes`).
    Append {
        topic: String,
        partition: u32,
        record: ProducerRecord,
        waiter: Waiter,
        batch_bytes: usize,
    },
    Flush(oneshot::Sender<()>),
}

struct OpenBatch {
    builder: BatchBuilder,
    created: Instant,
    waiters: Vec<Waiter>,
}

struct SealedBatch {
    sequence: u64,
    topic: String,
    partition: u32,
    bytes: Bytes,
    waiters: Vec<Waiter>,
}

/// Sends records to a Skein broker. Cheap to share behind an `Arc`; `send` takes `&self`.
pub struct Producer {
    client: Client,
    config: Arc<ProducerConfig>,
    commands: mpsc::Sender<Command>,
    memory: Arc<Semaphore>,
    /// Records without a key stick to one partition per topic until a batch's worth was sent.
    sticky: Mutex<HashMap<String, (u32, usize)>>,
    spread: AtomicU64,
}

impl Producer {
    pub fn new(client: Client, config: ProducerConfig) -> Producer {
        let config = Arc::new(config);
        let (commands, receiver) = mpsc::channel(4096);
        let memory = Arc::new(Semaphore::new(config.buffer_bytes));
        tokio::spawn(run_sender(client.clone(), config.clone(), receiver));
        Producer {
            client,
            config,
            commands,
            memory,
            sticky: Mutex::new(HashMap::new()),
            spread: AtomicU64::new(0),
        }
    }

    fn choose_partition(
        &self,
        record: &ProducerRecord,
        partitions: u32,
        size: usize,
        batch_bytes: usize,
    ) -> Result<u32> {
        if let Some(partition) = record.partition {
            if partition >= partitions {
                return Err(ClientError::UnknownPartition { topic: record.topic.clone(), partition });
            }
            return Ok(partition);
        }
        if let Some(key) = &record.key {
            return Ok(crc32c::crc32c(key) % partitions);
        }
        let mut sticky = self.sticky.lock().expect("not poisoned");
        let entry = sticky.entry(record.topic.clone()).or_insert_with(|| {
            ((self.spread.fetch_add(1, Ordering::Relaxed) % u64::from(partitions)) as u32, 0)
        });
        if entry.1 >= batch_bytes || entry.0 >= partitions {
            entry.0 = (entry.0 + 1) % partitions;
            entry.1 = 0;
        }
        entry.1 += size;
        Ok(entry.0)
    }

    /// Queues a record; the returned future resolves once it is acknowledged. Waits if
    /// `buffer_bytes` of records are already buffered or in flight.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        let topic = self.client.topic(&record.topic).await?;
        let size = record.encoded_size();
        let limit = topic.max_message_bytes().unwrap_or(8 << 20).min(self.config.buffer_bytes);
        if size + BATCH_HEADER_BYTES > limit {
            return Err(ClientError::RecordTooLarge { size, limit });
        }
        let batch_bytes = self.config.batch_bytes.min(limit);
        let partition = self.choose_partition(&record, topic.partitions, size, batch_bytes)?;
        let memory =
            self.memory.clone().acquire_many_owned(size as u32).await.map_err(|_| ClientError::Closed)?;
        let (reply, receiver) = oneshot::channel();
        let timestamp = record.timestamp.unwrap_or_else(now_ms);
        let waiter = Waiter { reply, timestamp, _memory: memory };
        let command = Command::Append { topic: record.topic.clone(), partition, record, waiter, batch_bytes };
        self.commands.send(command).await.map_err(|_| ClientError::Closed)?;
        Ok(DeliveryFuture { receiver })
    }

    /// Sends every buffered record now and waits until all records sent before this call are
    /// acknowledged (or failed).
    pub async fn flush(&self) -> Result<()> {
        let (reply, receiver) = oneshot::channel();
        self.commands.send(Command::Flush(reply)).await.map_err(|_| ClientError::Closed)?;
        receiver.await.map_err(|_| ClientError::Closed)
    }
}

async fn run_sender(client: Client, config: Arc<ProducerConfig>, mut commands: mpsc::Receiver<Command>) {
    let mut open: HashMap<(String, u32), OpenBatch> = HashMap::new();
    let mut ready: VecDeque<SealedBatch> = VecDeque::new();
    let mut next_sequence = 0u64;
    let mut outstanding: BTreeSet<u64> = BTreeSet::new();
    let mut flushes: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    let (done_sender, mut done) = mpsc::unbounded_channel::<Vec<u64>>();
    let mut closing = false;

    let seal =
        |key: (String, u32), batch: OpenBatch, next_sequence: &mut u64, outstanding: &mut BTreeSet<u64>| {
            let sequence = *next_sequence;
            *next_sequence += 1;
            outstanding.insert(sequence);
            SealedBatch {
                sequence,
                topic: key.0,
                partition: key.1,
                bytes: batch.builder.finish().freeze(),
                waiters: batch.waiters,
            }
        };

    loop {
        let deadline = open.values().map(|b| b.created + config.linger).min();
        tokio::select! {
            command = commands.recv(), if !closing => match command {
                None => {
                    closing = true;
                    for (key, batch) in open.drain() {
                        ready.push_back(seal(key, batch, &mut next_sequence, &mut outstanding));
                    }
                }
                Some(Command::Append { topic, partition, record, waiter, batch_bytes }) => {
                    let key = (topic, partition);
                    let headers: Vec<(&str, Option<&[u8]>)> =
                        record.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
                    let size = record.encoded_size();
                    if let Some(batch) = open.get(&key) {
                        if batch.builder.size_bytes() + size > batch_bytes {
                            let batch = open.remove(&key).expect("present");
                            ready.push_back(seal(key.clone(), batch, &mut next_sequence, &mut outstanding));
                        }
                    }
                    let batch = open.entry(key.clone()).or_insert_with(|| OpenBatch {
                        builder: BatchBuilder::with_capacity(batch_bytes.min(1 << 20)),
                        created: Instant::now(),
                        waiters: Vec::new(),
                    });
                    batch.builder.push(waiter.timestamp, record.key.as_deref(), record.value.as_deref(), &headers);
                    batch.waiters.push(waiter);
                    if batch.builder.size_bytes() >= batch_bytes {
                        let batch = open.remove(&key).expect("present");
                        ready.push_back(seal(key, batch, &mut next_sequence, &mut outstanding));
                    }
                }
                Some(Command::Flush(reply)) => {
                    for (key, batch) in open.drain() {
                        ready.push_back(seal(key, batch, &mut next_sequence, &mut outstanding));
                    }
                    flushes.push((next_sequence, reply));
                }
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                let now = Instant::now();
                let expired: Vec<(String, u32)> =
                    open.iter().filter(|(_, b)| b.created + config.linger <= now).map(|(k, _)| k.clone()).collect();
                for key in expired {
                    let batch = open.remove(&key).expect("present");
                    ready.push_back(seal(key, batch, &mut next_sequence, &mut outstanding));
                }
            }
            Some(sequences) = done.recv() => {
                for sequence in sequences {
                    outstanding.remove(&sequence);
                }
            }
        }
        // Send what is ready while requests may be added.
        while !ready.is_empty() {
            let Ok(permit) = in_flight.clone().try_acquire_owned() else { break };
            let mut request = Vec::new();
            let mut bytes = 0usize;
            while let Some(batch) = ready.front() {
                if !request.is_empty() && bytes + batch.bytes.len() > config.request_bytes_max {
                    break;
                }
                bytes += batch.bytes.len();
                request.push(ready.pop_front().expect("front exists"));
            }
            // Written to the connection here, in seal order, so batches of a partition reach
            // the broker in the order they were made; only the wait for the answer is spawned.
            let first_try = submit(&client, config.acks.wire(), &request).await;
            let (client, config, done) = (client.clone(), config.clone(), done_sender.clone());
            tokio::spawn(async move {
                let sequences: Vec<u64> = request.iter().map(|b| b.sequence).collect();
                send_with_retries(&client, &config, request, first_try).await;
                drop(permit);
                let _ = done.send(sequences);
            });
        }
        let first_outstanding = outstanding.first().copied().unwrap_or(u64::MAX);
        let mut index = 0;
        while index < flushes.len() {
            if first_outstanding >= flushes[index].0 {
                let (_, reply) = flushes.swap_remove(index);
                let _ = reply.send(());
            } else {
                index += 1;
            }
        }
        if closing && outstanding.is_empty() && ready.is_empty() {
            return;
        }
    }
}

/// The request for `batches`, and where each batch sits in it (topic index, partition index):
/// the response lists topics and partitions in the same order, and a partition may appear more
/// than once (several batches of it in one request).
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

fn resolve(batch: SealedBatch, result: std::result::Result<Option<u64>, ClientError>) {
    for (index, waiter) in batch.waiters.into_iter().enumerate() {
        let outcome = match &result {
            Ok(base) => Ok(RecordMetadata {
                partition: batch.partition,
                offset: base.map(|b| b + index as u64),
                timestamp: waiter.timestamp,
            }),
            Err(error) => Err(error.clone()),
        };
        let _ = waiter.reply.send(outcome);
    }
}

/// How a produce request went out: with `acks=0` it is done once written; otherwise the
/// response is still to come.
enum Submitted {
    Written,
    Waiting(crate::connection::ResponseFuture),
}

async fn submit(client: &Client, acks: i8, batches: &[SealedBatch]) -> Result<Submitted> {
    let (request, _) = produce_request(acks, batches);
    let connection = client.connection().await?;
    if acks == skein_net::acks::NONE {
        connection.send_only(&request).await.map(|()| Submitted::Written)
    } else {
        connection.submit(&request).await.map(Submitted::Waiting)
    }
}

/// Waits for a request's outcome, retrying the retriable failures; resolves every record.
async fn send_with_retries(
    client: &Client,
    config: &ProducerConfig,
    mut batches: Vec<SealedBatch>,
    first_try: Result<Submitted>,
) {
    let acks = config.acks.wire();
    let mut attempt = 0u32;
    let mut submitted = Some(first_try);
    loop {
        let outcome = match submitted.take() {
            Some(outcome) => outcome,
            None => submit(client, acks, &batches).await,
        };
        let response = match outcome {
            Ok(Submitted::Written) => {
                for batch in batches {
                    resolve(batch, Ok(None));
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
                    resolve(batch, Err(error.clone()));
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
                            resolve(batch, Ok(Some(base)));
                        }
                        Some(p) if p.error.is_retriable() && attempt < config.retries => {
                            if p.error.needs_metadata_refresh() {
                                let _ = client.refresh_topic(&batch.topic).await;
                            }
                            retry.push(batch);
                        }
                        Some(p) => {
                            let context = format!("producing to {}/{}", batch.topic, batch.partition);
                            resolve(batch, Err(ClientError::broker(p.error, context)));
                        }
                        None => {
                            let context = format!("producing to {}/{}", batch.topic, batch.partition);
                            resolve(
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
