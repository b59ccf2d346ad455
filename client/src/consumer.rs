//! The consumer: reads assigned partitions from any offset, the beginning, the end or a
//! timestamp. Pull-based: each [`Consumer::poll`] returns the records that arrived; while the
//! caller works on them, the next fetch is already in flight (prefetch).
//!
//! Every batch's CRC is checked before its records are returned; a batch that fails is an
//! error ([`ClientError::Corrupt`]), never skipped.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use skein_net::{
    ErrorCode, FetchPartition, FetchRequest, FetchResponse, ListOffsetsPartition, ListOffsetsRequest,
    ListOffsetsResponse, Request, TopicData, EARLIEST_TIMESTAMP, LATEST_TIMESTAMP,
};
use skein_storage::batch::BatchSplitter;
use tokio::task::JoinHandle;

use crate::group::GroupState;
use crate::{decode, Client, ClientError, Result};

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Bound on a fetch response's records.
    pub fetch_bytes_max: u32,
    /// Bound per partition per fetch.
    pub partition_bytes_max: u32,
    /// The broker answers once this many bytes are available…
    pub fetch_bytes_min: u32,
    /// …or after this long (long poll).
    pub fetch_wait_max: Duration,
    /// Where to start a partition that has no position.
    pub start_from: SeekTo,
    /// Largest batch accepted from the broker.
    pub batch_bytes_max: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            fetch_bytes_max: 16 << 20,
            partition_bytes_max: 4 << 20,
            fetch_bytes_min: 1,
            fetch_wait_max: Duration::from_millis(500),
            start_from: SeekTo::Beginning,
            batch_bytes_max: 256 << 20,
        }
    }
}

/// Where to read a partition from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekTo {
    Offset(u64),
    /// The first record held.
    Beginning,
    /// After the last record: only new records.
    End,
    /// The first record whose timestamp (ms since the epoch) is at or after this one; the end if
    /// there is none.
    Timestamp(i64),
}

/// A record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// A topic and a partition.
pub type TopicPartition = (String, u32);

/// A fetch in flight: the positions it asked for, and its task.
type Prefetch = (HashMap<TopicPartition, u64>, JoinHandle<Result<FetchResponse<Bytes>>>);

/// Reads partitions: assigned by the caller ([`Consumer::assign`]) or by a consumer group
/// ([`Consumer::subscribe`], see [`crate::group`]).
pub struct Consumer {
    pub(crate) client: Client,
    pub(crate) config: ConsumerConfig,
    pub(crate) assignment: Vec<TopicPartition>,
    pub(crate) positions: HashMap<TopicPartition, u64>,
    pub(crate) buffered: VecDeque<ConsumerRecord>,
    prefetch: Option<Prefetch>,
    pub(crate) group: Option<GroupState>,
}

impl Consumer {
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer {
            client,
            config,
            assignment: Vec::new(),
            positions: HashMap::new(),
            buffered: VecDeque::new(),
            prefetch: None,
            group: None,
        }
    }

    /// Forgets the assignment, positions and buffered records.
    pub(crate) fn clear_assignment(&mut self) {
        self.assignment.clear();
        self.positions.clear();
        self.buffered.clear();
        self.cancel_prefetch();
    }

    /// Adds partitions of a topic to the assignment (checked against the topic's metadata).
    /// Not for a consumer that subscribed to a group (the group assigns its partitions).
    pub async fn assign(&mut self, topic: &str, partitions: &[u32]) -> Result<()> {
        if self.group.is_some() {
            return Err(ClientError::Config("a consumer in a group cannot assign partitions itself"));
        }
        let info = self.client.topic(topic).await?;
        for &partition in partitions {
            if partition >= info.partitions {
                return Err(ClientError::UnknownPartition { topic: topic.to_owned(), partition });
            }
            let key = (topic.to_owned(), partition);
            if !self.assignment.contains(&key) {
                self.assignment.push(key);
            }
        }
        self.cancel_prefetch();
        Ok(())
    }

    /// Assigns every partition of a topic.
    pub async fn assign_all(&mut self, topic: &str) -> Result<()> {
        let info = self.client.topic(topic).await?;
        let partitions: Vec<u32> = (0..info.partitions).collect();
        self.assign(topic, &partitions).await
    }

    pub fn assignment(&self) -> &[TopicPartition] {
        &self.assignment
    }

    /// The offset of the next record `poll` returns for a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.positions.get(&(topic.to_owned(), partition)).copied()
    }

    pub(crate) fn cancel_prefetch(&mut self) {
        if let Some((_, handle)) = self.prefetch.take() {
            handle.abort();
        }
    }

    /// Moves one partition's position.
    pub async fn seek(&mut self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        let offset = self.resolve(&[(topic.to_owned(), partition)], to).await?[0];
        self.positions.insert((topic.to_owned(), partition), offset);
        self.buffered.retain(|r| !(r.topic == topic && r.partition == partition));
        self.cancel_prefetch();
        Ok(())
    }

    /// Moves every assigned partition's position.
    pub async fn seek_all(&mut self, to: SeekTo) -> Result<()> {
        let assignment = self.assignment.clone();
        let offsets = self.resolve(&assignment, to).await?;
        for (key, offset) in assignment.into_iter().zip(offsets) {
            self.positions.insert(key, offset);
        }
        self.buffered.clear();
        self.cancel_prefetch();
        Ok(())
    }

    /// Offsets for partitions from a seek target (ListOffsets).
    pub(crate) async fn resolve(&self, partitions: &[TopicPartition], to: SeekTo) -> Result<Vec<u64>> {
        let timestamp = match to {
            SeekTo::Offset(offset) => return Ok(vec![offset; partitions.len()]),
            SeekTo::Beginning => EARLIEST_TIMESTAMP,
            SeekTo::End => LATEST_TIMESTAMP,
            SeekTo::Timestamp(t) => t,
        };
        let mut topics: Vec<TopicData<ListOffsetsPartition>> = Vec::new();
        for (topic, partition) in partitions {
            let entry = ListOffsetsPartition { partition: *partition, timestamp };
            match topics.iter_mut().find(|t| &t.name == topic) {
                Some(t) => t.partitions.push(entry),
                None => topics.push(TopicData { name: topic.clone(), partitions: vec![entry] }),
            }
        }
        let body = self.client.request(&Request::ListOffsets(ListOffsetsRequest { topics })).await?;
        let response = decode(&body, ListOffsetsResponse::decode)?;
        let mut offsets = Vec::with_capacity(partitions.len());
        for (topic, partition) in partitions {
            let answer = response
                .topics
                .iter()
                .filter(|t| &t.name == topic)
                .flat_map(|t| t.partitions.iter())
                .find(|p| p.partition == *partition)
                .ok_or_else(|| ClientError::Protocol(format!("no offset for {topic}/{partition}")))?;
            if !answer.error.is_ok() {
                return Err(ClientError::broker(
                    answer.error,
                    format!("listing offsets of {topic}/{partition}"),
                ));
            }
            let offset = if answer.offset >= 0 {
                answer.offset as u64
            } else {
                // No record at or after the timestamp: the end.
                Box::pin(self.resolve(&[(topic.clone(), *partition)], SeekTo::End)).await?[0]
            };
            offsets.push(offset);
        }
        Ok(offsets)
    }

    /// Gives positions to assigned partitions that have none (per `start_from`).
    async fn initialise_positions(&mut self) -> Result<()> {
        let missing: Vec<TopicPartition> =
            self.assignment.iter().filter(|key| !self.positions.contains_key(*key)).cloned().collect();
        if missing.is_empty() {
            return Ok(());
        }
        let offsets = self.resolve(&missing, self.config.start_from).await?;
        for (key, offset) in missing.into_iter().zip(offsets) {
            self.positions.insert(key, offset);
        }
        Ok(())
    }

    fn start_fetch(
        &self,
        positions: HashMap<TopicPartition, u64>,
        wait: Duration,
    ) -> JoinHandle<Result<FetchResponse<Bytes>>> {
        let mut topics: Vec<TopicData<FetchPartition>> = Vec::new();
        for (topic, partition) in &self.assignment {
            let Some(&offset) = positions.get(&(topic.clone(), *partition)) else { continue };
            let entry = FetchPartition {
                partition: *partition,
                fetch_offset: offset,
                partition_bytes_max: self.config.partition_bytes_max,
            };
            match topics.iter_mut().find(|t| &t.name == topic) {
                Some(t) => t.partitions.push(entry),
                None => topics.push(TopicData { name: topic.clone(), partitions: vec![entry] }),
            }
        }
        let request = Request::Fetch(FetchRequest {
            max_wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            min_bytes: self.config.fetch_bytes_min,
            max_bytes: self.config.fetch_bytes_max,
            topics,
        });
        let client = self.client.clone();
        tokio::spawn(async move {
            let body = client.request(&request).await?;
            let response = decode(&body, FetchResponse::decode)?;
            Ok(response.map_records(|range| body.slice(range)))
        })
    }

    /// Returns the records available now or within `timeout` (possibly none). Starts the next
    /// fetch before returning, so it is in flight while the caller processes these.
    ///
    /// In a group, each call first applies the coordinator's latest assignment and commits
    /// automatically if it is time (see [`crate::group`]); a long poll returns at least every
    /// `fetch_wait_max` to do so.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.auto_commit().await?;
        self.reconcile_group().await?;
        if !self.buffered.is_empty() {
            return Ok(self.buffered.drain(..).collect());
        }
        while self.assignment.is_empty() {
            let now = tokio::time::Instant::now();
            if self.group.is_none() || now >= deadline {
                tokio::time::sleep_until(deadline).await;
                return Ok(Vec::new());
            }
            tokio::time::sleep(Duration::from_millis(20).min(deadline - now)).await;
            self.reconcile_group().await?;
        }
        self.initialise_positions().await?;
        loop {
            let (asked, mut handle) = match self.prefetch.take() {
                Some(prefetch) => prefetch,
                None => {
                    let wait = deadline
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(self.config.fetch_wait_max);
                    let positions = self.positions.clone();
                    (positions.clone(), self.start_fetch(positions, wait))
                }
            };
            // A fetch still on its way at the deadline (a broker being restarted, or paused)
            // stays in flight for the next poll.
            let joined = tokio::select! {
                joined = &mut handle => joined,
                _ = tokio::time::sleep_until(deadline) => {
                    self.prefetch = Some((asked, handle));
                    return Ok(Vec::new());
                }
            };
            match joined {
                Ok(Ok(response)) => {
                    // A response to positions that moved since (a seek) is stale.
                    if asked.iter().all(|(key, offset)| self.positions.get(key) == Some(offset)) {
                        self.absorb(response).await?;
                    }
                }
                Ok(Err(error)) if error.is_retriable() => {
                    // The client already reconnected and retried for `retry_timeout`; keep
                    // polling (a consumer rides over broker restarts) until the deadline.
                    tracing::debug!(%error, "fetch failed; fetching again");
                    let pause = Duration::from_millis(100);
                    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)).await;
                }
                Ok(Err(error)) => return Err(error),
                Err(join_error) => return Err(ClientError::ConnectionLost(join_error.to_string())),
            }
            if !self.buffered.is_empty() {
                let positions = self.positions.clone();
                self.prefetch =
                    Some((positions.clone(), self.start_fetch(positions, self.config.fetch_wait_max)));
                return Ok(self.buffered.drain(..).collect());
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            if self.group.is_some() {
                self.reconcile_group().await?;
                if self.assignment.is_empty() {
                    return Ok(Vec::new());
                }
            }
        }
    }

    /// Decodes a fetch response into the buffer and advances positions.
    async fn absorb(&mut self, response: FetchResponse<Bytes>) -> Result<()> {
        for topic in response.topics {
            for partition in topic.partitions {
                let key = (topic.name.clone(), partition.partition);
                let Some(&position) = self.positions.get(&key) else { continue };
                match partition.error {
                    ErrorCode::None => {}
                    ErrorCode::OffsetOutOfRange => {
                        let reset = if position < partition.log_start_offset {
                            SeekTo::Beginning
                        } else {
                            SeekTo::End
                        };
                        tracing::warn!(
                            topic = topic.name,
                            partition = partition.partition,
                            position,
                            ?reset,
                            "offset out of range; resetting"
                        );
                        // A failure here is retried at the next fetch; the records of the other
                        // partitions already taken from this response stay buffered.
                        match self.resolve(std::slice::from_ref(&key), reset).await {
                            Ok(offsets) => {
                                self.positions.insert(key, offsets[0]);
                            }
                            Err(error) => tracing::warn!(%error, "resetting an out-of-range position failed"),
                        }
                        continue;
                    }
                    code if code.needs_metadata_refresh() => {
                        let _ = self.client.refresh_topic(&topic.name).await;
                        continue;
                    }
                    code if code.is_retriable() => continue,
                    code => {
                        return Err(ClientError::broker(
                            code,
                            format!("fetching {}/{}", topic.name, partition.partition),
                        ))
                    }
                }
                let mut next = position;
                for batch in BatchSplitter::new(partition.records, self.config.batch_bytes_max) {
                    let batch = batch.map_err(|error| ClientError::Corrupt {
                        topic: topic.name.clone(),
                        partition: partition.partition,
                        offset: next,
                        error,
                    })?;
                    if batch.header().next_offset() <= next {
                        continue;
                    }
                    for record in batch.records() {
                        let record = record.map_err(|error| ClientError::Corrupt {
                            topic: topic.name.clone(),
                            partition: partition.partition,
                            offset: next,
                            error,
                        })?;
                        if record.offset < position {
                            continue;
                        }
                        self.buffered.push_back(ConsumerRecord {
                            topic: topic.name.clone(),
                            partition: partition.partition,
                            offset: record.offset,
                            timestamp: record.timestamp,
                            key: record.key,
                            value: record.value,
                            headers: record.headers,
                        });
                    }
                    next = batch.header().next_offset();
                }
                self.positions.insert(key, next);
            }
        }
        Ok(())
    }
}
