//! The sender task: the one owner of every sealed batch until it is resolved. It groups
//! batches into produce requests, writes them to the connection in order, and decides what a
//! failure means for each batch and for the batches of its partition behind it.
//!
//! # Per partition
//! Each partition has a queue of unresolved batches in seal order. A batch is *waiting* (to be
//! sent, or sent again), *in flight* (in a request whose answer has not arrived) or *done*
//! (acknowledged, or failed for good). The invariants, which together guarantee that an
//! idempotent producer rides over broker restarts, lost connections and lost responses
//! without writing anything twice, reordering a partition, or stalling:
//!
//! 1. **Sequence numbers are given at send time**, in queue order: a batch that never left the
//!    producer holds none, so a batch that failed before it was sent leaves no gap.
//! 2. **Resends are ordered.** After a failure, a partition sends nothing until every one of
//!    its batches in flight is answered (a lost connection fails all of them together); then,
//!    after one backoff shared by the partition, its unresolved batches go out again in
//!    sequence order, and only then anything newer. The broker answers a batch it already
//!    holds with its original offsets, so a resent batch is never written twice.
//! 3. **A refusal caused by an earlier batch costs nothing.** `OutOfOrderSequence` for a batch
//!    that is not first in its partition's queue means that an earlier one is being resent: it
//!    costs no attempt. Only failures of the first batch count towards `retries`.
//! 4. **A real gap is repaired at once.** `OutOfOrderSequence` for the *first* unresolved batch
//!    means the broker does not hold the batch before it (it was never written, the broker lost
//!    it, or forgot this producer): nothing behind it can have been written either. Once none
//!    of the partition's batches is in flight, the producer moves the partition to a newer
//!    epoch of its id (asking the broker for one if needed), and the partition's unresolved
//!    batches get new sequence numbers from 0 (as Kafka does since KIP-360).
//! 5. **The budget is a deadline**, not a count: a batch fails for good once it was not
//!    acknowledged within `delivery_timeout` of its first record being queued (longer than a
//!    broker restart), or when the broker refused it for good. A batch whose outcome is unknown
//!    when its deadline passes (sent, never answered) fails with
//!    [`ClientError::DeliveryTimeout`]: it may still be in the log, once.
//! 6. **Acknowledgement delivery is O(1) per record** and happens here, as answers arrive; at
//!    most [`IDEMPOTENCE_WINDOW`] batches of a partition are in flight beyond its first
//!    unresolved one, so the broker still remembers any batch that is resent.
//!
//! # Connections
//! Each partition's batches go on a connection of the broker shard that holds it
//! ([`Client::shard_connection`]). The sender never waits for one to be made: a partition
//! whose shard has no connection yet waits, unlisted, while a task makes it
//! (`Sender::connected`, `Event::ShardConnected`), and every other partition keeps sending.
//! A partition's shard is looked up again whenever the client learnt a new placement
//! ([`Client::placement`]: a broker restarted with another number of shards), before the
//! partition's next batches go out, once none of its batches is in flight on the old shard's
//! connection (`Sender::replace`).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use skein_net::{
    ErrorCode, InitProducerIdRequest, InitProducerIdResponse, ProducePartition, ProduceRequest,
    ProduceResponse, Request, TopicData, IDEMPOTENCE_WINDOW,
};
use skein_storage::batch::BatchBuilder;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::accumulator::{FastMap, PartitionSlot, SealedBatch};
use super::{Acks, Identity, RecordMetadata, Shared, Waiter};
use crate::{decode, Client, ClientError, Result};

/// How often batches that cannot be sent now are checked against their deadline.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Timer slot of the producer-id request (not a partition).
const ID_TIMER: usize = usize::MAX;

enum Payload {
    /// Never sent: finished (header, producer fields, CRC) when first sent.
    Unsent(BatchBuilder),
    Sent(Bytes),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    InFlight,
    Done,
}

struct Entry {
    id: u64,
    payload: Payload,
    len: usize,
    records: u32,
    waiters: Vec<Waiter>,
    memory: usize,
    deadline: Instant,
    state: State,
    /// The epoch and base sequence the batch was sent with; `None` while it never went out
    /// (or after its partition's sequence was reset): it takes the next one when sent.
    sequence: Option<(i16, i32)>,
}

struct PartitionQueue {
    topic: Arc<str>,
    partition: u32,
    /// The broker's shard holding the partition, as the client's metadata said at
    /// `placement`: its batches go on that shard's connection ([`Client::shard_connection`]).
    /// Looked up again when the client learns of a new placement (the broker restarted with
    /// another number of shards); a stale shard costs a hop inside the broker, nothing else.
    shard: Option<u16>,
    /// [`Client::placement`] when `shard` was looked up.
    placement: u64,
    /// Unresolved batches in seal order; the front is never done (done ones are popped).
    entries: VecDeque<Entry>,
    in_flight: usize,
    /// A failure was seen: nothing is sent until every batch in flight is answered.
    retrying: bool,
    /// Failed attempts of the first batch in a row.
    attempts: u32,
    backoff_until: Option<Instant>,
    /// A sequence gap: the unresolved batches get new sequence numbers under a newer epoch.
    resequence: bool,
    /// The epoch this partition's sequence numbers belong to (−1: none given yet).
    epoch: i16,
    next_sequence: i32,
    /// In `Sender::ready`.
    listed: bool,
    last_error: Option<ClientError>,
}

impl PartitionQueue {
    fn pop_done(&mut self) {
        while self.entries.front().is_some_and(|e| e.state == State::Done) {
            self.entries.pop_front();
        }
    }

    /// Index of the first batch waiting to be sent, if it may be sent within the window.
    fn first_waiting(&self, idempotent: bool) -> Option<usize> {
        let index = self.entries.iter().position(|e| e.state == State::Waiting)?;
        (!idempotent || index < IDEMPOTENCE_WINDOW).then_some(index)
    }
}

/// What the sender hears back.
enum Event {
    Answered {
        batches: Vec<Sent>,
        outcome: Result<ProduceResponse>,
    },
    ProducerId(Result<(i64, i16)>),
    /// The connection of this shard was made (or could not be: its partitions then go on the
    /// general connection).
    ShardConnected(u16),
}

/// A batch in a request: its queue and id, and where its answer sits in the response.
struct Sent {
    queue: usize,
    id: u64,
    topic_index: usize,
    partition_index: usize,
}

/// What happened to one batch.
enum Outcome {
    /// Written at this base offset (`None`: acks=0, or written too long ago to say where).
    Written(Option<u64>),
    Failed(ClientError),
}

/// How a produce request went out: with `acks=0` it is done once written; otherwise the
/// response is still to come.
enum Submitted {
    Written,
    Waiting(crate::connection::ResponseFuture),
}

async fn submit(client: &Client, shard: Option<u16>, acks: i8, request: Request<Bytes>) -> Result<Submitted> {
    let connection = client.shard_connection(shard).await?;
    if acks == skein_net::acks::NONE {
        connection.send_only(&request).await.map(|()| Submitted::Written)
    } else {
        connection.submit(&request).await.map(Submitted::Waiting)
    }
}

pub(crate) async fn run(shared: Arc<Shared>) {
    Sender::new(shared).run().await
}

struct Sender {
    shared: Arc<Shared>,
    idempotent: bool,
    max_in_flight: usize,
    queues: Vec<PartitionQueue>,
    by_partition: FastMap<(Arc<str>, u32), usize>,
    /// Partitions that may send now, in round-robin order.
    ready: VecDeque<usize>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Ids of sealed batches not yet resolved (for `flush`).
    outstanding: BTreeSet<u64>,
    requests_in_flight: usize,
    producer: Option<(i64, i16)>,
    id_in_flight: bool,
    id_attempts: u32,
    id_retry_at: Option<Instant>,
    fatal: Option<ClientError>,
    next_sweep: Instant,
    events: mpsc::UnboundedSender<Event>,
    incoming: mpsc::UnboundedReceiver<Event>,
    /// Shards whose connection a task of its own is making, with the partitions waiting for
    /// it: the sender never waits for a handshake itself, so one slow or unanswering shard
    /// holds up only its own partitions.
    connecting: FastMap<u16, Vec<usize>>,
}

impl Sender {
    fn new(shared: Arc<Shared>) -> Sender {
        let config = &shared.config;
        let idempotent = config.idempotence && config.acks != Acks::None;
        let max_in_flight = config.max_in_flight.max(1);
        let (events, incoming) = mpsc::unbounded_channel();
        Sender {
            idempotent,
            max_in_flight,
            shared,
            queues: Vec::new(),
            by_partition: FastMap::default(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            outstanding: BTreeSet::new(),
            requests_in_flight: 0,
            producer: None,
            id_in_flight: false,
            id_attempts: 0,
            id_retry_at: None,
            fatal: None,
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            events,
            incoming,
            connecting: FastMap::default(),
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        if attempts == 0 {
            return Duration::ZERO;
        }
        let config = &self.shared.config;
        let factor = 1u32 << (attempts - 1).min(16);
        config.retry_backoff.saturating_mul(factor).min(config.retry_backoff_max.max(config.retry_backoff))
    }

    async fn run(mut self) {
        if self.idempotent {
            self.request_producer_id();
        }
        loop {
            let (next_linger, closing) = self.take_sealed();
            let now = Instant::now();
            let ran_us = now.duration_since(self.shared.started).as_micros() as u64;
            self.shared.sender_ran_us.store(ran_us, std::sync::atomic::Ordering::Relaxed);
            self.fire_timers(now);
            if now >= self.next_sweep {
                self.sweep(now);
                self.next_sweep = now + SWEEP_INTERVAL;
            }
            self.finish_flushes();
            if closing && self.outstanding.is_empty() {
                let accumulator = self.shared.accumulator.lock().expect("not poisoned");
                if accumulator.ready.is_empty()
                    && accumulator.open.values().flatten().all(|slot| slot.batch.is_none())
                {
                    return;
                }
                continue;
            }
            while self.requests_in_flight < self.max_in_flight && self.send_request().await {}
            // Sending may have resolved batches (acks=0, or a connection that could not be made).
            self.finish_flushes();
            let mut next = next_linger;
            if let Some(Reverse((at, _))) = self.timers.peek() {
                next = Some(next.map_or(*at, |n| n.min(*at)));
            }
            if !self.outstanding.is_empty() {
                next = Some(next.map_or(self.next_sweep, |n| n.min(self.next_sweep)));
            }
            let sleep = async {
                match next {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.shared.wake.notified() => {}
                _ = sleep => {}
                Some(event) = self.incoming.recv() => {
                    self.handle(event);
                    while let Ok(event) = self.incoming.try_recv() {
                        self.handle(event);
                    }
                }
            }
        }
    }

    /// Seals lingering batches and moves sealed ones into their partition queues. Returns the
    /// next linger deadline (`None` while no request could go out) and whether the producer is
    /// closing.
    ///
    /// A batch whose linger is over is sealed only when a request can go out
    /// (`max_in_flight` not reached), as Kafka's accumulator drains a ready batch only when the
    /// sender sends it: until then it keeps taking records (up to `batch_bytes`). Sealing it
    /// at once made a producer with a short linger under load send a stream of tiny batches,
    /// each with its own header, CRC, append, index entry and consumer wake-up: at 580 K
    /// records/s with linger 0, end-to-end p99 45-144 ms in four runs (`skein-bench e2e
    /// --embedded --rate 580000 --linger-ms 0 --duration 10 --warmup 3 --client-threads 2`)
    /// where linger 2 ms gave 11.5 ms, and 10.5-18.8 ms with linger 0 after the change.
    fn take_sealed(&mut self) -> (Option<Instant>, bool) {
        let can_send = self.requests_in_flight < self.max_in_flight;
        let (sealed, next, closing) = {
            let mut accumulator = self.shared.accumulator.lock().expect("not poisoned");
            let closing = accumulator.closed;
            let next = if can_send || closing {
                accumulator.seal_expired(self.shared.config.linger, closing)
            } else {
                // An answer frees a request slot and wakes the sender (`incoming`); the open
                // batches are sealed then.
                None
            };
            let sealed: Vec<SealedBatch> = accumulator.ready.drain(..).collect();
            (sealed, next, closing)
        };
        for batch in sealed {
            self.enqueue(batch);
        }
        (next, closing)
    }

    fn enqueue(&mut self, batch: SealedBatch) {
        let deadline = batch.created + self.shared.config.delivery_timeout;
        let entry = Entry {
            id: batch.id,
            len: batch.builder.size_bytes(),
            records: batch.builder.record_count(),
            payload: Payload::Unsent(batch.builder),
            waiters: batch.waiters,
            memory: batch.memory,
            deadline,
            state: State::Waiting,
            sequence: None,
        };
        self.outstanding.insert(entry.id);
        if let Some(error) = self.fatal.clone() {
            self.complete(entry.id, entry.waiters, entry.memory, batch.partition, Outcome::Failed(error));
            return;
        }
        let key = (batch.topic, batch.partition);
        let queue = match self.by_partition.get(&key) {
            Some(&queue) => queue,
            None => {
                let (shard, placement) = self.shard_of(&key.0, key.1);
                self.queues.push(PartitionQueue {
                    topic: key.0.clone(),
                    partition: key.1,
                    shard,
                    placement,
                    entries: VecDeque::new(),
                    in_flight: 0,
                    retrying: false,
                    attempts: 0,
                    backoff_until: None,
                    resequence: false,
                    epoch: -1,
                    next_sequence: 0,
                    listed: false,
                    last_error: None,
                });
                self.by_partition.insert(key, self.queues.len() - 1);
                self.queues.len() - 1
            }
        };
        self.queues[queue].entries.push_back(entry);
        self.list(queue);
    }

    /// The shard that holds `topic`/`partition` as the client knows it now, and the placement
    /// that answer belongs to.
    fn shard_of(&self, topic: &str, partition: u32) -> (Option<u16>, u64) {
        let client = &self.shared.client;
        let placement = client.placement();
        let shard = if client.routes_by_shard() {
            client.cached_topic(topic).and_then(|t| t.shard_of(partition))
        } else {
            None
        };
        (shard, placement)
    }

    /// Looks `queue`'s shard up again if the placement changed since it was, once none of its
    /// batches is in flight: while some are, the partition stays on the connection they went
    /// on (a stale shard costs a hop inside the broker). Moved at once, its next batch could
    /// overtake them on the other connection and be refused as out of order, to be resent.
    fn replace(&mut self, queue: usize) {
        let q = &self.queues[queue];
        if q.in_flight == 0 && q.placement != self.shared.client.placement() {
            let (shard, placement) = self.shard_of(&q.topic, q.partition);
            let q = &mut self.queues[queue];
            if q.shard != shard {
                tracing::debug!(topic = %q.topic, partition = q.partition, from = ?q.shard, to = ?shard, "partition moved to another shard");
            }
            (q.shard, q.placement) = (shard, placement);
        }
    }

    fn sendable(&self, queue: usize, now: Instant) -> bool {
        let q = &self.queues[queue];
        if q.retrying || q.resequence || q.backoff_until.is_some_and(|t| t > now) {
            return false;
        }
        if self.idempotent && self.producer.is_none() {
            return false;
        }
        q.first_waiting(self.idempotent).is_some()
    }

    /// Puts a partition on the ready list if it may send now.
    fn list(&mut self, queue: usize) {
        if !self.queues[queue].listed && self.sendable(queue, Instant::now()) {
            self.queues[queue].listed = true;
            self.ready.push_back(queue);
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, slot))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if slot == ID_TIMER {
                self.id_retry_at = None;
                if self.needs_producer_id() {
                    self.request_producer_id();
                }
            } else {
                self.list(slot);
            }
        }
    }

    /// Fails the waiting batches whose delivery deadline passed (those in flight wait for
    /// their answer).
    fn sweep(&mut self, now: Instant) {
        for queue in 0..self.queues.len() {
            let mut index = 0;
            while index < self.queues[queue].entries.len() {
                let entry = &self.queues[queue].entries[index];
                if entry.deadline > now {
                    break;
                }
                if entry.state == State::Waiting {
                    self.expire(queue, index);
                }
                index += 1;
            }
            self.queues[queue].pop_done();
        }
    }

    fn expire(&mut self, queue: usize, index: usize) {
        let timeout = self.shared.config.delivery_timeout;
        let q = &mut self.queues[queue];
        let last_error = q.last_error.as_ref().map(|e| e.to_string());
        let sent =
            q.entries[index].sequence.is_some() || matches!(q.entries[index].payload, Payload::Sent(_));
        let error = ClientError::DeliveryTimeout {
            topic: q.topic.to_string(),
            partition: q.partition,
            timeout,
            last_error: last_error.unwrap_or_else(|| {
                if sent {
                    "no answer".to_owned()
                } else {
                    "not sent (partition blocked)".to_owned()
                }
            }),
        };
        self.finish(queue, index, Outcome::Failed(error));
    }

    /// Resolves the batch at `index` of `queue` for good.
    fn finish(&mut self, queue: usize, index: usize, outcome: Outcome) {
        let q = &mut self.queues[queue];
        let partition = q.partition;
        let entry = &mut q.entries[index];
        entry.state = State::Done;
        entry.payload = Payload::Sent(Bytes::new());
        let (id, waiters, memory) =
            (entry.id, std::mem::take(&mut entry.waiters), std::mem::take(&mut entry.memory));
        self.complete(id, waiters, memory, partition, outcome);
    }

    /// Hands the outcome to every record of a batch and releases its memory.
    fn complete(&mut self, id: u64, waiters: Vec<Waiter>, memory: usize, partition: u32, outcome: Outcome) {
        self.outstanding.remove(&id);
        for (index, waiter) in waiters.into_iter().enumerate() {
            let result = match &outcome {
                Outcome::Written(base) => Ok(RecordMetadata {
                    partition,
                    offset: base.map(|b| b + index as u64),
                    timestamp: waiter.timestamp,
                }),
                Outcome::Failed(error) => Err(error.clone()),
            };
            waiter.complete(result);
        }
        self.shared.memory.add_permits(memory);
    }

    fn finish_flushes(&mut self) {
        let first_outstanding = self.outstanding.first().copied().unwrap_or(u64::MAX);
        let mut accumulator = self.shared.accumulator.lock().expect("not poisoned");
        let mut index = 0;
        while index < accumulator.flushes.len() {
            if first_outstanding >= accumulator.flushes[index].0 {
                let (_, reply) = accumulator.flushes.swap_remove(index);
                let _ = reply.send(());
            } else {
                index += 1;
            }
        }
    }

    /// Gives a batch its producer fields (a sequence number at first send, or a new one after
    /// the partition's sequence was reset) and returns the bytes to send.
    fn stamp(&mut self, queue: usize, index: usize) -> Bytes {
        let producer = self.producer;
        let idempotent = self.idempotent;
        let q = &mut self.queues[queue];
        let stamp = match (idempotent, producer) {
            (true, Some((producer_id, epoch))) => {
                if q.epoch < 0 {
                    q.epoch = epoch;
                    q.next_sequence = 0;
                }
                let entry = &q.entries[index];
                match entry.sequence {
                    Some((epoch, _)) if epoch == q.epoch => None,
                    _ => {
                        let sequence = q.next_sequence;
                        q.next_sequence = q.next_sequence.wrapping_add(entry.records as i32);
                        Some((producer_id, q.epoch, sequence))
                    }
                }
            }
            _ => None,
        };
        let entry = &mut q.entries[index];
        if let Some((_, epoch, sequence)) = stamp {
            entry.sequence = Some((epoch, sequence));
        }
        let payload = std::mem::replace(&mut entry.payload, Payload::Sent(Bytes::new()));
        let bytes = match (payload, stamp) {
            (Payload::Unsent(mut builder), stamp) => {
                if let Some((producer_id, epoch, sequence)) = stamp {
                    builder.set_producer(producer_id, epoch, sequence);
                }
                builder.finish().freeze()
            }
            (Payload::Sent(bytes), None) => bytes,
            (Payload::Sent(bytes), Some((producer_id, epoch, sequence))) => {
                let mut copy = BytesMut::from(&bytes[..]);
                skein_storage::batch::set_producer(&mut copy, producer_id, epoch, sequence);
                copy.freeze()
            }
        };
        entry.payload = Payload::Sent(bytes.clone());
        bytes
    }

    /// Builds one request from the ready partitions of one shard (the first ready partition's)
    /// and writes it to that shard's connection. Returns whether a request went out.
    async fn send_request(&mut self) -> bool {
        let now = Instant::now();
        let request_bytes_max = self.shared.config.request_bytes_max;
        let mut batches: Vec<(usize, u64, Bytes)> = Vec::new();
        let mut bytes = 0usize;
        let mut full = false;
        // The shard this request is for, once its first batch is in; ready partitions of other
        // shards wait for the next request, in their order.
        let mut target: Option<Option<u16>> = None;
        let mut other_shards = Vec::new();
        while !full {
            let Some(queue) = self.ready.pop_front() else { break };
            self.replace(queue);
            if target.is_some_and(|shard| shard != self.queues[queue].shard) {
                other_shards.push(queue);
                continue;
            }
            self.queues[queue].listed = false;
            if target.is_none() && !self.connected(queue) {
                continue;
            }
            if !self.sendable(queue, now) {
                continue;
            }
            while let Some(index) = self.queues[queue].first_waiting(self.idempotent) {
                let entry = &self.queues[queue].entries[index];
                if entry.deadline <= now {
                    self.expire(queue, index);
                    continue;
                }
                if !batches.is_empty() && bytes + entry.len > request_bytes_max {
                    full = true;
                    break;
                }
                let id = entry.id;
                bytes += entry.len;
                let payload = self.stamp(queue, index);
                let q = &mut self.queues[queue];
                q.entries[index].state = State::InFlight;
                q.in_flight += 1;
                target = Some(q.shard);
                batches.push((queue, id, payload));
            }
            self.queues[queue].pop_done();
            if self.sendable(queue, now) {
                self.queues[queue].listed = true;
                if full {
                    self.ready.push_front(queue);
                } else {
                    self.ready.push_back(queue);
                }
            }
        }
        for queue in other_shards.into_iter().rev() {
            self.ready.push_front(queue);
        }
        if batches.is_empty() {
            return false;
        }
        let acks = self.shared.config.acks.wire();
        let (request, sent) = self.produce_request(acks, batches);
        match submit(&self.shared.client, target.flatten(), acks, request).await {
            Ok(Submitted::Written) => {
                for batch in sent {
                    self.on_outcome(batch.queue, batch.id, Outcome::Written(None));
                }
            }
            Ok(Submitted::Waiting(response)) => {
                self.requests_in_flight += 1;
                let events = self.events.clone();
                tokio::spawn(async move {
                    let outcome = match response.await {
                        Ok(body) => decode(&body, ProduceResponse::decode),
                        Err(error) => Err(error),
                    };
                    let _ = events.send(Event::Answered { batches: sent, outcome });
                });
            }
            Err(error) => {
                for batch in sent {
                    self.on_outcome(batch.queue, batch.id, Outcome::Failed(error.clone()));
                }
            }
        }
        true
    }

    /// Whether `queue`'s shard connection is ready to take a request at once; if not, the
    /// queue waits (unlisted) until a task has made it, which is started here if none is.
    fn connected(&mut self, queue: usize) -> bool {
        let shard = self.queues[queue].shard;
        if self.shared.client.shard_connection_ready(shard, crate::Purpose::General) {
            return true;
        }
        let Some(shard) = shard else { return true };
        let waiting = self.connecting.entry(shard).or_default();
        if waiting.is_empty() {
            let client = self.shared.client.clone();
            let events = self.events.clone();
            tokio::spawn(async move {
                if let Err(error) = client.shard_connection(Some(shard)).await {
                    tracing::debug!(shard, %error, "no connection for the shard");
                }
                let _ = events.send(Event::ShardConnected(shard));
            });
        }
        waiting.push(queue);
        false
    }

    fn produce_request(&self, acks: i8, batches: Vec<(usize, u64, Bytes)>) -> (Request<Bytes>, Vec<Sent>) {
        let mut topics: Vec<TopicData<ProducePartition<Bytes>>> = Vec::new();
        let mut sent = Vec::with_capacity(batches.len());
        for (queue, id, records) in batches {
            let q = &self.queues[queue];
            let topic_index = match topics.iter().position(|t| *t.name == *q.topic) {
                Some(index) => index,
                None => {
                    topics.push(TopicData { name: q.topic.to_string(), partitions: Vec::new() });
                    topics.len() - 1
                }
            };
            sent.push(Sent { queue, id, topic_index, partition_index: topics[topic_index].partitions.len() });
            topics[topic_index].partitions.push(ProducePartition { partition: q.partition, records });
        }
        (Request::Produce(ProduceRequest { acks, timeout_ms: 30_000, topics }), sent)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Answered { batches, outcome } => {
                self.requests_in_flight -= 1;
                match outcome {
                    Err(error) => {
                        for batch in batches {
                            self.on_outcome(batch.queue, batch.id, Outcome::Failed(error.clone()));
                        }
                    }
                    Ok(response) => {
                        for batch in batches {
                            let q = &self.queues[batch.queue];
                            let answer = response
                                .topics
                                .get(batch.topic_index)
                                .filter(|t| *t.name == *q.topic)
                                .and_then(|t| t.partitions.get(batch.partition_index))
                                .filter(|p| p.partition == q.partition);
                            let context = || format!("producing to {}/{}", q.topic, q.partition);
                            let outcome = match answer {
                                Some(p) if p.error.is_ok() => Outcome::Written(Some(p.base_offset)),
                                // Written long ago (too long for the broker to remember where).
                                Some(p) if p.error == ErrorCode::DuplicateSequence => Outcome::Written(None),
                                Some(p) => Outcome::Failed(ClientError::broker(p.error, context())),
                                None => Outcome::Failed(ClientError::broker(
                                    ErrorCode::UnknownServerError,
                                    context() + ": no answer",
                                )),
                            };
                            self.on_outcome(batch.queue, batch.id, outcome);
                        }
                    }
                }
            }
            Event::ProducerId(outcome) => self.on_producer_id(outcome),
            Event::ShardConnected(shard) => {
                for queue in self.connecting.remove(&shard).unwrap_or_default() {
                    self.list(queue);
                }
            }
        }
    }

    /// What one batch's answer means for it and for its partition (see the module docs).
    fn on_outcome(&mut self, queue: usize, id: u64, outcome: Outcome) {
        let Ok(index) = self.queues[queue].entries.binary_search_by_key(&id, |e| e.id) else {
            return;
        };
        debug_assert_eq!(self.queues[queue].entries[index].state, State::InFlight);
        self.queues[queue].in_flight -= 1;
        let first = index == 0;
        match outcome {
            Outcome::Written(base) => {
                let q = &mut self.queues[queue];
                q.attempts = 0;
                q.last_error = None;
                self.finish(queue, index, Outcome::Written(base));
            }
            Outcome::Failed(error) => {
                let code = error.code();
                if let Some(fatal) = self.fatal.clone() {
                    self.finish(queue, index, Outcome::Failed(fatal));
                } else if code == Some(ErrorCode::ProducerFenced) {
                    self.finish(queue, index, Outcome::Failed(error.clone()));
                    self.fail_all(error);
                } else if code == Some(ErrorCode::OutOfOrderSequence) && self.idempotent {
                    let q = &mut self.queues[queue];
                    q.entries[index].state = State::Waiting;
                    q.retrying = true;
                    if first && !q.resequence {
                        q.resequence = true;
                        tracing::warn!(
                            topic = %q.topic,
                            partition = q.partition,
                            "the broker does not hold the batch before this producer's oldest unacknowledged one; its unwritten batches get new sequence numbers"
                        );
                    }
                } else if error.is_retriable() {
                    let retries = self.shared.config.retries;
                    if code.is_some_and(ErrorCode::needs_metadata_refresh) {
                        let (client, topic) = (self.shared.client.clone(), self.queues[queue].topic.clone());
                        tokio::spawn(async move {
                            let _ = client.refresh_topic(&topic).await;
                        });
                    }
                    let q = &mut self.queues[queue];
                    q.entries[index].state = State::Waiting;
                    q.retrying = true;
                    tracing::debug!(topic = %q.topic, partition = q.partition, %error, first, "produce failed; will resend in order");
                    q.last_error = Some(error.clone());
                    if first {
                        q.attempts += 1;
                        if q.attempts > retries {
                            q.attempts = 0;
                            self.finish(queue, index, Outcome::Failed(error));
                        }
                    }
                } else {
                    // Refused for good: the broker did not write it. Batches behind it come back
                    // refused as out of order, and the first of them repairs the sequence.
                    self.queues[queue].retrying = true;
                    self.finish(queue, index, Outcome::Failed(error));
                }
            }
        }
        self.settle(queue);
    }

    /// After an answer: drops resolved batches from the front and, once nothing of the
    /// partition is in flight, repairs its sequence or schedules the ordered resend.
    fn settle(&mut self, queue: usize) {
        self.queues[queue].pop_done();
        if self.queues[queue].in_flight == 0 {
            if self.queues[queue].resequence {
                self.resequence(queue);
            }
            let q = &mut self.queues[queue];
            if q.retrying && !q.resequence {
                q.retrying = false;
                let backoff = self.backoff(self.queues[queue].attempts);
                if !backoff.is_zero() {
                    let at = Instant::now() + backoff;
                    self.queues[queue].backoff_until = Some(at);
                    self.timers.push(Reverse((at, queue)));
                }
            }
        }
        self.list(queue);
    }

    /// Moves a partition whose sequence has a gap to a newer epoch (asking for one if the
    /// producer has none newer than the partition's), giving its unresolved batches new
    /// sequence numbers from 0.
    fn resequence(&mut self, queue: usize) {
        let Some((_, epoch)) = self.producer else { return };
        if epoch <= self.queues[queue].epoch {
            self.request_producer_id();
            return;
        }
        let q = &mut self.queues[queue];
        tracing::warn!(topic = %q.topic, partition = q.partition, from = q.epoch, to = epoch, "sequence gap repaired with a new producer epoch");
        q.epoch = epoch;
        q.next_sequence = 0;
        for entry in q.entries.iter_mut().filter(|e| e.state != State::Done) {
            entry.sequence = None;
        }
        q.resequence = false;
        q.retrying = false;
        q.attempts = 0;
        q.backoff_until = None;
    }

    fn needs_producer_id(&self) -> bool {
        match self.producer {
            None => self.idempotent && self.fatal.is_none(),
            Some((_, epoch)) => {
                self.queues.iter().any(|q| q.resequence && q.in_flight == 0 && q.epoch >= epoch)
            }
        }
    }

    /// Asks the broker for a producer id, or for the next epoch of the current one.
    fn request_producer_id(&mut self) {
        if self.id_in_flight || self.id_retry_at.is_some() || self.fatal.is_some() {
            return;
        }
        self.id_in_flight = true;
        let (producer_id, producer_epoch) = self.producer.unwrap_or((-1, -1));
        let (client, events) = (self.shared.client.clone(), self.events.clone());
        tokio::spawn(async move {
            let request = Request::InitProducerId(InitProducerIdRequest { producer_id, producer_epoch });
            let outcome = async {
                let body = client.request(&request).await?;
                let response = decode(&body, InitProducerIdResponse::decode)?;
                if !response.error.is_ok() {
                    return Err(ClientError::broker(response.error, "getting a producer id"));
                }
                Ok((response.producer_id, response.producer_epoch))
            }
            .await;
            let _ = events.send(Event::ProducerId(outcome));
        });
    }

    fn on_producer_id(&mut self, outcome: Result<(i64, i16)>) {
        self.id_in_flight = false;
        match outcome {
            Ok(id) => {
                if self.producer.is_some() {
                    tracing::info!(producer_id = id.0, epoch = id.1, "new producer epoch");
                } else {
                    tracing::debug!(producer_id = id.0, epoch = id.1, "idempotent producer");
                }
                self.producer = Some(id);
                self.id_attempts = 0;
                self.shared.identity.send_replace(Identity::Known(id));
                for queue in 0..self.queues.len() {
                    if self.queues[queue].resequence && self.queues[queue].in_flight == 0 {
                        self.resequence(queue);
                    }
                    self.list(queue);
                }
            }
            Err(error) if error.is_retriable() => {
                self.id_attempts += 1;
                tracing::debug!(%error, attempt = self.id_attempts, "getting a producer id failed; retrying");
                let at = Instant::now() + self.backoff(self.id_attempts);
                self.id_retry_at = Some(at);
                self.timers.push(Reverse((at, ID_TIMER)));
            }
            Err(error) => {
                tracing::error!(%error, "no producer id: the producer stops");
                self.fail_all(error);
            }
        }
    }

    /// The producer can go on no more: every batch not in flight fails now, those in flight
    /// when answered, and every later send fails.
    fn fail_all(&mut self, error: ClientError) {
        if self.fatal.is_some() {
            return;
        }
        self.fatal = Some(error.clone());
        self.shared.identity.send_replace(Identity::Failed(error.clone()));
        self.shared.accumulator.lock().expect("not poisoned").fatal = Some(error.clone());
        for queue in 0..self.queues.len() {
            for index in 0..self.queues[queue].entries.len() {
                if self.queues[queue].entries[index].state == State::Waiting {
                    self.finish(queue, index, Outcome::Failed(error.clone()));
                }
            }
            self.queues[queue].pop_done();
        }
        // Batches sealed or still open in the accumulator.
        let (sealed, open) = {
            let mut accumulator = self.shared.accumulator.lock().expect("not poisoned");
            let sealed: Vec<SealedBatch> = accumulator.ready.drain(..).collect();
            let open: Vec<_> = accumulator
                .open
                .values_mut()
                .flat_map(|partitions| partitions.iter_mut())
                .filter_map(PartitionSlot::take)
                .collect();
            (sealed, open)
        };
        for batch in sealed {
            self.enqueue(batch);
        }
        for batch in open {
            for waiter in batch.waiters {
                waiter.complete(Err(error.clone()));
            }
            self.shared.memory.add_permits(batch.memory);
        }
    }
}
