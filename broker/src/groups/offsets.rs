//! Committed offsets, durably: the internal offsets log.
//!
//! Groups are spread over [`OFFSETS_PARTITIONS`] partitions of an internal log (Kafka's
//! `__consumer_offsets`), stored with the storage engine in `<data-dir>/internal/offsets/<p>/`.
//! A group belongs to partition `crc32c(group) % 16`, and its coordinator runs on the shard that
//! owns that partition (the same stable hash as topic partitions), so the number of partitions
//! and the placement do not depend on `--cores`.
//!
//! Each commit is one record; the log is replayed in order on start, the last record per key
//! winning. The log does not grow forever: once [`COMPACT_AFTER_BYTES`] were appended since the
//! last compaction, the live offsets are written again as a snapshot after a segment roll and
//! every segment before the snapshot is deleted. Commits and the snapshot are serialised, so a
//! replay always ends with the newest value.
//!
//! # Record format (inside ordinary record batches, see `skein-storage`)
//! Key:
//!
//! | offset | size | field | notes |
//! |-------:|-----:|-------|-------|
//! | 0 | 1 | record type u8 | 1 = committed offset |
//! | 1 | 1 | key version u8 | 1 |
//! | 2 | 2+n | group id | u16 length, UTF-8 |
//! | … | 2+n | topic | u16 length, UTF-8 |
//! | … | 4 | partition u32 | |
//!
//! Value (absent: the commit is deleted, e.g. by a reset to "no commit"):
//!
//! | offset | size | field | notes |
//! |-------:|-----:|-------|-------|
//! | 0 | 1 | value version u8 | 1 |
//! | 1 | 8 | offset u64 | next record to consume |
//! | 9 | 8 | commit time i64 | ms since the epoch |
//! | 17 | 2+n | metadata | u16 length, UTF-8 |
//!
//! All integers little-endian. A record that does not decode stops the broker's start with an
//! error naming the log and the offset: committed offsets are never guessed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::BytesMut;
use skein_net::TopicPartition;
use skein_storage::batch::{Batch, BatchBuilder};
use skein_storage::{FsyncPolicy, Log, LogConfig, StorageError};

use super::state::Committed;

pub const OFFSETS_PARTITIONS: u32 = 16;
/// The name used to place offsets partitions on shards.
pub const OFFSETS_LOG_NAME: &str = "__consumer_offsets";
pub const RECORD_TYPE_OFFSET: u8 = 1;
pub const KEY_VERSION: u8 = 1;
pub const VALUE_VERSION: u8 = 1;
pub const COMPACT_AFTER_BYTES: u64 = 16 << 20;
const SEGMENT_BYTES: u64 = 8 << 20;
/// Commits are written in batches of about this size (each record is at most ~4.6 KiB).
const BATCH_BYTES: usize = 256 << 10;
/// Largest commit metadata accepted (Kafka's `offset.metadata.max.bytes`).
pub const METADATA_BYTES_MAX: usize = 4096;

pub fn partition_for_group(group: &str) -> u32 {
    crc32c::crc32c(group.as_bytes()) % OFFSETS_PARTITIONS
}

pub fn offsets_dir(data_dir: &Path, partition: u32) -> PathBuf {
    data_dir.join("internal").join("offsets").join(partition.to_string())
}

/// The storage settings of an offsets partition: small segments, and `fsync=always` whatever
/// the broker's policy, because a commit is acknowledged only when it is on disk.
pub fn log_config() -> LogConfig {
    let defaults = LogConfig::default();
    LogConfig {
        segment_bytes: SEGMENT_BYTES,
        fsync: FsyncPolicy::Always,
        cache_bytes_max: 1 << 20,
        // Commits are small: 16 partitions must not reserve much disk up front.
        preallocate_bytes: 64 << 10,
        retention_age_max: None,
        retention_bytes_max: None,
        batch_bytes_max: 1 << 20,
        ..defaults
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn get_str(bytes: &[u8], at: &mut usize) -> Option<String> {
    let len = u16::from_le_bytes(bytes.get(*at..*at + 2)?.try_into().ok()?) as usize;
    let s = std::str::from_utf8(bytes.get(*at + 2..*at + 2 + len)?).ok()?.to_owned();
    *at += 2 + len;
    Some(s)
}

pub fn encode_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut key = vec![RECORD_TYPE_OFFSET, KEY_VERSION];
    put_str(&mut key, group);
    put_str(&mut key, topic);
    key.extend_from_slice(&partition.to_le_bytes());
    key
}

pub fn encode_value(committed: &Committed) -> Vec<u8> {
    let mut value = vec![VALUE_VERSION];
    value.extend_from_slice(&committed.offset.to_le_bytes());
    value.extend_from_slice(&committed.commit_ms.to_le_bytes());
    put_str(&mut value, &committed.metadata);
    value
}

pub fn decode_key(key: &[u8]) -> Option<(String, String, u32)> {
    if key.len() < 2 || key[0] != RECORD_TYPE_OFFSET || key[1] != KEY_VERSION {
        return None;
    }
    let mut at = 2;
    let group = get_str(key, &mut at)?;
    let topic = get_str(key, &mut at)?;
    let partition = u32::from_le_bytes(key.get(at..at + 4)?.try_into().ok()?);
    (at + 4 == key.len()).then_some((group, topic, partition))
}

pub fn decode_value(value: &[u8]) -> Option<Committed> {
    if value.first() != Some(&VALUE_VERSION) || value.len() < 17 {
        return None;
    }
    let offset = u64::from_le_bytes(value[1..9].try_into().ok()?);
    let commit_ms = i64::from_le_bytes(value[9..17].try_into().ok()?);
    let mut at = 17;
    let metadata = get_str(value, &mut at)?;
    (at == value.len()).then_some(Committed { offset, metadata, commit_ms })
}

/// A change to one group's offsets: set or (`None`) delete.
pub type OffsetChange = (TopicPartition, Option<Committed>);

/// All committed offsets of one offsets partition, by group.
pub type OffsetsState = BTreeMap<String, BTreeMap<TopicPartition, Committed>>;

/// One offsets partition: its log and the serialisation of appends with compaction.
pub struct OffsetsPartition {
    pub partition: u32,
    pub log: Rc<Log>,
    gate: glommio::sync::Semaphore,
    bytes_since_compaction: std::cell::Cell<u64>,
}

impl OffsetsPartition {
    /// Opens the partition's log and replays it.
    pub async fn open(
        data_dir: &Path,
        partition: u32,
    ) -> Result<(OffsetsPartition, OffsetsState), StorageError> {
        let dir = offsets_dir(data_dir, partition);
        let log = Log::open(&dir, log_config()).await?;
        let mut state = OffsetsState::new();
        let mut next = log.start_offset();
        let mut records = 0u64;
        while next < log.visible_offset() {
            let (bytes, after) = log.read_verified(next, 4 << 20).await?;
            let mut rest = bytes;
            while !rest.is_empty() {
                let (batch, tail) =
                    Batch::from_bytes(rest, usize::MAX).map_err(StorageError::InvalidBatch)?;
                rest = tail;
                for record in batch.records() {
                    let record = record.map_err(StorageError::InvalidBatch)?;
                    if record.offset < next {
                        continue;
                    }
                    let bad = |what: &str| StorageError::Io {
                        op: "replaying",
                        path: dir.clone(),
                        source: std::sync::Arc::new(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("offsets record at offset {} has an invalid {what}", record.offset),
                        )),
                    };
                    let key = record.key.as_deref().ok_or_else(|| bad("key (none)"))?;
                    let (group, topic, p) = decode_key(key).ok_or_else(|| bad("key"))?;
                    let offsets = state.entry(group).or_default();
                    match record.value.as_deref() {
                        Some(value) => {
                            let committed = decode_value(value).ok_or_else(|| bad("value"))?;
                            offsets.insert(TopicPartition::new(topic, p), committed);
                        }
                        None => {
                            offsets.remove(&TopicPartition::new(topic, p));
                        }
                    }
                    records += 1;
                }
            }
            if after <= next {
                break;
            }
            next = after;
        }
        state.retain(|_, offsets| !offsets.is_empty());
        if records > 0 {
            tracing::info!(partition, records, groups = state.len(), "committed offsets restored");
        }
        let opened = OffsetsPartition {
            partition,
            log: Rc::new(log),
            gate: glommio::sync::Semaphore::new(1),
            bytes_since_compaction: std::cell::Cell::new(0),
        };
        Ok((opened, state))
    }

    fn encode(group: &str, changes: &[OffsetChange]) -> Vec<BytesMut> {
        let mut batches = Vec::new();
        let now = skein_storage::now_ms();
        let mut builder = BatchBuilder::new();
        for (tp, committed) in changes {
            let key = encode_key(group, tp.topic(), tp.partition);
            let value = committed.as_ref().map(encode_value);
            builder.push(now, Some(&key), value.as_deref(), &[]);
            if builder.size_bytes() >= BATCH_BYTES {
                batches.push(std::mem::take(&mut builder).finish());
            }
        }
        if builder.record_count() > 0 {
            batches.push(builder.finish());
        }
        batches
    }

    /// Appends a group's changes and waits until they are durable; `apply` then updates the
    /// in-memory state. The gate is held throughout, so memory follows the log's order and a
    /// commit that failed is never in memory (nor in a later compaction snapshot).
    pub async fn commit(
        &self,
        group: &str,
        changes: &[OffsetChange],
        apply: impl FnOnce(),
    ) -> Result<(), StorageError> {
        let _permit = self.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        let mut acks = Vec::new();
        for batch in Self::encode(group, changes) {
            self.bytes_since_compaction.set(self.bytes_since_compaction.get() + batch.len() as u64);
            acks.push(self.log.append(batch).await?.ack);
        }
        for ack in acks {
            ack.await?;
        }
        apply();
        Ok(())
    }

    pub fn needs_compaction(&self) -> bool {
        self.bytes_since_compaction.get() >= COMPACT_AFTER_BYTES
    }

    /// Writes the live offsets (`state`, captured under the gate) after a roll and deletes
    /// everything before them.
    pub async fn compact(&self, state: impl FnOnce() -> OffsetsState) -> Result<(), StorageError> {
        let _permit = self.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        let live = state();
        self.log.roll().await?;
        let start = self.log.next_offset();
        let mut acks = Vec::new();
        let mut records = 0usize;
        for (group, offsets) in &live {
            let changes: Vec<OffsetChange> =
                offsets.iter().map(|(tp, c)| (tp.clone(), Some(c.clone()))).collect();
            records += changes.len();
            for batch in Self::encode(group, &changes) {
                acks.push(self.log.append(batch).await?.ack);
            }
        }
        for ack in acks {
            ack.await?;
        }
        let outcome = self.log.delete_segments_before(start).await?;
        self.bytes_since_compaction.set(0);
        tracing::info!(
            partition = self.partition,
            records,
            segments_deleted = outcome.segments_deleted,
            "offsets log compacted"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_round_trip_and_bad_ones_are_refused() {
        let key = encode_key("group-1", "orders", 7);
        assert_eq!(decode_key(&key), Some(("group-1".into(), "orders".into(), 7)));
        let committed = Committed { offset: 42, metadata: "m".into(), commit_ms: 99 };
        let value = encode_value(&committed);
        assert_eq!(decode_value(&value), Some(committed));
        for cut in 0..key.len() {
            assert_eq!(decode_key(&key[..cut]), None);
        }
        for cut in 0..value.len() {
            assert_eq!(decode_value(&value[..cut]), None);
        }
        let mut wrong_version = key.clone();
        wrong_version[1] = 9;
        assert_eq!(decode_key(&wrong_version), None);
        assert_eq!(encode_key("g", "t", 1).len(), 2 + 3 + 3 + 4);
        assert!(partition_for_group("g") < OFFSETS_PARTITIONS);
    }
}
