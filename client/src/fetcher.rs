//! What a consumer reads and where it stands: the assigned partitions, their positions, the
//! records fetched and not yet returned, and the fetch in flight (prefetch); with the requests
//! that move them (ListOffsets, Fetch). [`crate::Consumer`] drives it, and so does the group
//! code (`group.rs`), which applies the coordinator's assignment to it; neither of those two
//! modules uses the other.
//!
//! Every batch's CRC is checked before its records are buffered; a batch that fails is an
//! error ([`ClientError::Corrupt`]), never skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use skein_net::{
    ErrorCode, FetchPartition, FetchRequest, FetchResponse, ListOffsetsPartition, ListOffsetsRequest,
    ListOffsetsResponse, Request, TopicData, TopicPartition, EARLIEST_TIMESTAMP, LATEST_TIMESTAMP,
};
use skein_storage::batch::BatchSplitter;
use tokio::task::JoinHandle;

use crate::{decode, Client, ClientError, Result};

/// How a consumer fetches: `ConsumerConfig::default().fetch_wait_max(Duration::from_secs(1))`.
#[derive(Debug, Clone)]
#[non_exhaustive]
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

crate::setters!(ConsumerConfig {
    fetch_bytes_max: u32,
    partition_bytes_max: u32,
    fetch_bytes_min: u32,
    fetch_wait_max: Duration,
    start_from: SeekTo,
    batch_bytes_max: usize,
});

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
    /// Shared by the records of a fetch (as a `ProducerRecord`'s is): a `String` per record
    /// was an allocation and a copy for every record consumed.
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// A fetch in flight for the partitions of one shard of the broker (`None`: partitions not
/// routed by shard, on the client's fetch connection): the positions it asked for, and its task.
pub(crate) struct SubFetch {
    pub(crate) shard: Option<u16>,
    pub(crate) asked: HashMap<TopicPartition, u64>,
    pub(crate) handle: JoinHandle<Result<FetchResponse<Bytes>>>,
}

/// A consumer's partitions, positions, buffered records and fetch in flight.
pub(crate) struct Fetcher {
    pub(crate) client: Client,
    pub(crate) config: ConsumerConfig,
    pub(crate) assignment: Vec<TopicPartition>,
    pub(crate) positions: HashMap<TopicPartition, u64>,
    pub(crate) buffered: VecDeque<ConsumerRecord>,
    /// The fetches in flight: at most one per shard (one in all unless the client routes by
    /// shard, see [`Fetcher::start_fetches`]).
    pub(crate) prefetch: Vec<SubFetch>,
}

impl Fetcher {
    pub(crate) fn new(client: Client, config: ConsumerConfig) -> Fetcher {
        Fetcher {
            client,
            config,
            assignment: Vec::new(),
            positions: HashMap::new(),
            buffered: VecDeque::new(),
            prefetch: Vec::new(),
        }
    }

    /// Forgets the assignment, positions and buffered records.
    pub(crate) fn clear_assignment(&mut self) {
        self.assignment.clear();
        self.positions.clear();
        self.buffered.clear();
        self.cancel_prefetch();
    }

    pub(crate) fn cancel_prefetch(&mut self) {
        for fetch in self.prefetch.drain(..) {
            fetch.handle.abort();
        }
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
        for tp in partitions {
            let entry = ListOffsetsPartition { partition: tp.partition, timestamp };
            push_to_topic(&mut topics, tp.topic(), entry);
        }
        let body = self.client.request(&Request::ListOffsets(ListOffsetsRequest { topics })).await?;
        let response = decode(&body, ListOffsetsResponse::decode)?;
        let answers = by_partition(&response.topics, |p| p.partition);
        let mut offsets = Vec::with_capacity(partitions.len());
        for tp in partitions {
            let (topic, partition) = (tp.topic(), tp.partition);
            let answer = answers
                .get(&(topic, partition))
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
                Box::pin(self.resolve(std::slice::from_ref(tp), SeekTo::End)).await?[0]
            };
            offsets.push(offset);
        }
        Ok(offsets)
    }

    /// Gives positions to assigned partitions that have none (per `start_from`).
    pub(crate) async fn initialise_positions(&mut self) -> Result<()> {
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

    /// Starts a fetch, long-polling up to `wait`, for the assigned partitions of every shard
    /// that has none in flight, from their current positions.
    ///
    /// To a broker of several shards ([`Client::routes_by_shard`]) each shard's
    /// partitions are fetched on a connection of that shard, so no read hops between the
    /// broker's cores, and the shards' long polls run side by side: a record is returned when
    /// its shard answers, without waiting for a quiet shard's poll to end. Each such fetch
    /// asks for up to `fetch_bytes_max`, as a Kafka consumer asks each broker. Otherwise there
    /// is one fetch, on the client's fetch connection.
    pub(crate) fn start_fetches(&mut self, wait: Duration) {
        let routed = self.client.routes_by_shard();
        let mut groups: std::collections::BTreeMap<Option<u16>, Vec<TopicData<FetchPartition>>> =
            std::collections::BTreeMap::new();
        let mut asked: HashMap<Option<u16>, HashMap<TopicPartition, u64>> = HashMap::new();
        for tp in &self.assignment {
            let Some(&offset) = self.positions.get(tp) else { continue };
            let shard = self.shard_of(tp, routed);
            if self.prefetch.iter().any(|fetch| fetch.shard == shard) {
                continue;
            }
            let entry = FetchPartition {
                partition: tp.partition,
                fetch_offset: offset,
                partition_bytes_max: self.config.partition_bytes_max,
            };
            let topics = groups.entry(shard).or_default();
            push_to_topic(topics, tp.topic(), entry);
            asked.entry(shard).or_default().insert(tp.clone(), offset);
        }
        for (shard, topics) in groups {
            let asked = asked.remove(&shard).unwrap_or_default();
            self.spawn_fetch(shard, topics, asked, wait);
        }
    }

    /// The shard whose connection fetches `tp` (`None`: the fetch connection), when `routed`
    /// ([`Client::routes_by_shard`]).
    fn shard_of(&self, tp: &TopicPartition, routed: bool) -> Option<u16> {
        if routed {
            self.client.cached_topic(tp.topic()).and_then(|info| info.shard_of(tp.partition))
        } else {
            None
        }
    }

    /// Sends a fetch of `topics` (the partitions of `shard`, from the offsets in `asked`) and
    /// lists it in flight.
    fn spawn_fetch(
        &mut self,
        shard: Option<u16>,
        topics: Vec<TopicData<FetchPartition>>,
        asked: HashMap<TopicPartition, u64>,
        wait: Duration,
    ) {
        let request = Request::Fetch(FetchRequest {
            max_wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            min_bytes: self.config.fetch_bytes_min,
            max_bytes: self.config.fetch_bytes_max,
            topics,
        });
        let client = self.client.clone();
        let handle = tokio::spawn(async move {
            let body = client.fetch_on_shard(shard, &request).await?;
            let response = decode(&body, FetchResponse::decode)?;
            Ok(response.map_records(|range| body.slice(range)))
        });
        self.prefetch.push(SubFetch { shard, asked, handle });
    }

    /// Starts the next fetch of a shard whose fetch (`asked`, answered with `response`) is about
    /// to be absorbed, from the offsets after the response's records, read from their batch
    /// headers alone (no CRC, no decoding): the broker reads and sends the next range while
    /// this one is checked and decoded. The new fetch's `asked` are those predicted positions;
    /// if absorbing ends anywhere else (a corrupt batch, an error, a seek, a poll cancelled
    /// half-way), its response no longer matches the positions when it arrives and is dropped
    /// as stale ([`crate::Consumer::poll`]). Nothing is started when a partition of the
    /// response carries an error or no partition got records (the usual path then fetches after
    /// the absorb, long-polling), or when the shard already has a fetch in flight.
    pub(crate) fn prefetch_after(
        &mut self,
        shard: Option<u16>,
        asked: &HashMap<TopicPartition, u64>,
        response: &FetchResponse<Bytes>,
    ) {
        if self.prefetch.iter().any(|fetch| fetch.shard == shard) {
            return;
        }
        // Only for the same partitions, still on that shard: a partition assigned since, or
        // moved to another shard (a restart with another shard count), waits for the usual
        // path, which groups the partitions anew.
        let routed = self.client.routes_by_shard();
        let same =
            asked.keys().all(|tp| self.positions.contains_key(tp) && self.shard_of(tp, routed) == shard)
                && self
                    .assignment
                    .iter()
                    .filter(|tp| self.positions.contains_key(*tp))
                    .all(|tp| asked.contains_key(tp) || self.shard_of(tp, routed) != shard);
        if !same {
            return;
        }
        let mut predicted = asked.clone();
        let mut advanced = false;
        for topic in &response.topics {
            for partition in &topic.partitions {
                if partition.error != ErrorCode::None {
                    return;
                }
                let key = TopicPartition::new(Arc::from(topic.name.as_str()), partition.partition);
                let Some(position) = predicted.get_mut(&key) else { continue };
                match next_offset_after(&partition.records, self.config.batch_bytes_max) {
                    Some(next) if next > *position => {
                        *position = next;
                        advanced = true;
                    }
                    Some(_) => {}
                    None => return,
                }
            }
        }
        if !advanced {
            return;
        }
        let mut topics: Vec<TopicData<FetchPartition>> = Vec::new();
        for (tp, &offset) in &predicted {
            let entry = FetchPartition {
                partition: tp.partition,
                fetch_offset: offset,
                partition_bytes_max: self.config.partition_bytes_max,
            };
            push_to_topic(&mut topics, tp.topic(), entry);
        }
        let wait = self.config.fetch_wait_max;
        self.spawn_fetch(shard, topics, predicted, wait);
    }

    /// Drops partitions from the assignment, with their positions and buffered records.
    pub(crate) fn drop_partitions(&mut self, partitions: &[TopicPartition]) {
        // Looked up in a set: a search of the dropped partitions for each assigned one and each
        // buffered record took seconds when a group moved 10,000 partitions.
        let dropped: std::collections::HashSet<(&str, u32)> =
            partitions.iter().map(|tp| (tp.topic(), tp.partition)).collect();
        self.assignment.retain(|key| !dropped.contains(&(key.topic(), key.partition)));
        self.buffered.retain(|r| !dropped.contains(&(&*r.topic, r.partition)));
        for key in partitions {
            self.positions.remove(key);
        }
        self.cancel_prefetch();
    }

    /// Decodes a fetch response into the buffer and advances positions.
    pub(crate) async fn absorb(&mut self, response: FetchResponse<Bytes>) -> Result<()> {
        for topic in response.topics {
            let name: Arc<str> = Arc::from(topic.name.as_str());
            for partition in topic.partitions {
                let key = TopicPartition::new(name.clone(), partition.partition);
                let Some(&position) = self.positions.get(&key) else { continue };
                tracing::trace!(
                    %key,
                    position,
                    error = ?partition.error,
                    high_watermark = partition.high_watermark,
                    bytes = partition.records.len(),
                    "fetched"
                );
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
                    let batch = match batch {
                        Ok(batch) => batch,
                        Err(error) => {
                            // The records before the damaged batch are buffered: the position
                            // is the damaged batch's, so a poll after the error returns them
                            // once and refuses the batch again, never skipping it.
                            self.positions.insert(key, next);
                            return Err(ClientError::Corrupt {
                                topic: topic.name.clone(),
                                partition: partition.partition,
                                offset: next,
                                error,
                            });
                        }
                    };
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
                            topic: name.clone(),
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

/// Adds `entry` to `topic`'s partitions in `topics`, the topic's entry made if missing (a
/// request lists each topic once).
/// The entries of a response's topics by (topic, partition), the first of each: one lookup per
/// partition asked for, where a search of the response for each partition was quadratic in them
/// (seconds for a topic of 10,000 partitions).
pub(crate) fn by_partition<P>(
    topics: &[TopicData<P>],
    partition: impl Fn(&P) -> u32,
) -> HashMap<(&str, u32), &P> {
    let mut entries = HashMap::new();
    for topic in topics {
        for entry in &topic.partitions {
            entries.entry((topic.name.as_str(), partition(entry))).or_insert(entry);
        }
    }
    entries
}

pub(crate) fn push_to_topic<T>(topics: &mut Vec<TopicData<T>>, topic: &str, entry: T) {
    match topics.iter_mut().find(|t| t.name == topic) {
        Some(t) => t.partitions.push(entry),
        None => topics.push(TopicData { name: topic.to_owned(), partitions: vec![entry] }),
    }
}

/// The offset after the last batch of `records` (whole batches, back to back), from their
/// headers alone; `records`' own start when it is empty; `None` when a header does not parse
/// or a batch runs past the end (absorbing will say what is wrong).
fn next_offset_after(records: &[u8], size_max: usize) -> Option<u64> {
    let mut at = 0usize;
    let mut next = None;
    while at < records.len() {
        let header = skein_storage::batch::BatchHeader::parse(&records[at..], size_max).ok()?;
        at = at.checked_add(header.total_bytes()).filter(|&end| end <= records.len())?;
        next = Some(header.next_offset());
    }
    Some(next.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::next_offset_after;
    use skein_storage::batch::{set_base_offset, BatchBuilder};

    fn batch(base: u64, records: usize) -> Vec<u8> {
        let mut builder = BatchBuilder::new();
        for i in 0..records {
            builder.push(0, None, Some(format!("v{i}").as_bytes()), &[]);
        }
        let mut bytes = builder.finish().to_vec();
        set_base_offset(&mut bytes, base);
        bytes
    }

    #[test]
    fn the_offset_after_a_response_comes_from_its_batch_headers() {
        let mut records = batch(10, 3);
        records.extend(batch(13, 5));
        assert_eq!(next_offset_after(&records, 1 << 20), Some(18), "after the last batch");
        assert_eq!(next_offset_after(&[], 1 << 20), Some(0), "no records: nothing to go by");
        assert_eq!(next_offset_after(&records[..records.len() - 1], 1 << 20), None, "a batch cut short");
        assert_eq!(next_offset_after(&records[..20], 1 << 20), None, "a header cut short");
    }
}
