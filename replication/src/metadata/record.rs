//! Metadata records: every change to the cluster's metadata is one of these, and the metadata
//! image is what applying them in order gives ([`super::apply`]). On one node the controller
//! shard makes them and hands them to every shard; in a cluster they will be the entries of
//! the consensus shard's Raft log. Records outlive releases (a log written by one version is
//! read by the next), so their codec is written by hand, byte by byte, with a type and a
//! version per record, and not derived.
//!
//! # Byte tables (all integers little-endian)
//!
//! A record:
//!
//! | offset | size | field | notes |
//! |-------:|-----:|-------|-------|
//! | 0 | 2 | type u16 | see below |
//! | 2 | 2 | version u16 | of this type's body |
//! | 4 | 4 | body_bytes u32 | |
//! | 8 | … | body | per type and version |
//!
//! A batch of records (what one change commits, applied all or nothing):
//!
//! | offset | size | field | notes |
//! |-------:|-----:|-------|-------|
//! | 0 | 4 | magic | `"SKMR"` |
//! | 4 | 2 | batch version u16 | 1 |
//! | 6 | 2 | reserved | 0 |
//! | 8 | 4 | count u32 | records that follow |
//! | 12 | 4 | crc u32 | CRC32C of everything after this field |
//! | 16 | … | records | back to back |
//!
//! Record bodies (strings: `u16` length then UTF-8 bytes; an absent limit is −1):
//!
//! | type | name | version | body |
//! |-----:|------|--------:|------|
//! | 1 | TopicCreated | 2 | `name string`, `topic_id [16]u8`, then the settings: `partitions u32`, `retention_ms i64`, `retention_bytes i64`, `segment_bytes u64`, `segment_ms i64`, `max_message_bytes u32`, `created_ms i64` |
//! | 1 | TopicCreated | 1 | (read, not written) as version 2 without `topic_id`: the topic gets [`TopicId::NONE`] |
//! | 2 | TopicDeleted | 1 | `name string` |
//! | 3 | ProducerIdsReserved | 1 | `next_block i64`: ids below it may have been handed out |
//! | 4 | BrokerRegistered | 1 | `node u32`, `broker_epoch u64`, `unclean u8` (0 or 1): registered, fenced |
//! | 5 | BrokerChanged | 1 | `node u32`, `fenced u8`, `shutting_down u8` |
//! | 6 | PartitionChanged | 1 | `topic string`, `partition u32`, `leader i64` (−1: none), `leader_epoch u32`, `partition_epoch u32`, `replicas`, `isr`, `elr` (each `count u32` then `node u32`s) |
//! | 7 | TopicChanged | 1 | the body of TopicCreated version 1: the topic's whole new settings (partitions only grow) |
//!
//! A record of an unknown type, or of a known type at a version this build does not read, is
//! refused by name ([`RecordError`]): a node never applies metadata it does not understand.
//! A new field is a new version of its type; a reader keeps reading every older version.

use skein_net::types::{BrokerEpoch, LeaderEpoch, NodeId, PartitionEpoch, TopicId, TopicPartition};

use crate::metadata::topic::TopicConfig;

/// One metadata change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataRecord {
    TopicCreated {
        name: String,
        id: TopicId,
        config: TopicConfig,
    },
    TopicDeleted {
        name: String,
    },
    ProducerIdsReserved {
        next_block: i64,
    },
    BrokerRegistered {
        node: NodeId,
        epoch: BrokerEpoch,
        unclean: bool,
    },
    BrokerChanged {
        node: NodeId,
        fenced: bool,
        shutting_down: bool,
    },
    PartitionChanged {
        tp: TopicPartition,
        state: PartitionState,
    },
    /// A topic's settings changed (more partitions, other retention): the whole new config.
    TopicChanged {
        name: String,
        config: TopicConfig,
    },
}

/// A partition's replication state as a record carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    pub leader: Option<NodeId>,
    pub leader_epoch: LeaderEpoch,
    pub partition_epoch: PartitionEpoch,
    pub replicas: Vec<NodeId>,
    pub isr: Vec<NodeId>,
    pub elr: Vec<NodeId>,
}

pub const BATCH_MAGIC: [u8; 4] = *b"SKMR";
pub const BATCH_VERSION: u16 = 1;
const BATCH_HEADER_BYTES: usize = 16;
const RECORD_HEADER_BYTES: usize = 8;

const TOPIC_CREATED: u16 = 1;
const TOPIC_DELETED: u16 = 2;
const PRODUCER_IDS_RESERVED: u16 = 3;
const BROKER_REGISTERED: u16 = 4;
const BROKER_CHANGED: u16 = 5;
const PARTITION_CHANGED: u16 = 6;
const TOPIC_CHANGED: u16 = 7;

/// Why bytes are not a valid record batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("metadata batch: {0}")]
    Batch(String),
    #[error("metadata record type {kind} (version {version}) is unknown to this build")]
    UnknownType { kind: u16, version: u16 },
    #[error("metadata record {name} version {version} is newer than this build reads (up to {supported})")]
    UnsupportedVersion { name: &'static str, version: u16, supported: u16 },
    #[error("metadata record {name}: {reason}")]
    Malformed { name: &'static str, reason: String },
}

impl MetadataRecord {
    /// The record's type number and name.
    pub fn kind(&self) -> (u16, &'static str) {
        match self {
            MetadataRecord::TopicCreated { .. } => (TOPIC_CREATED, "TopicCreated"),
            MetadataRecord::TopicDeleted { .. } => (TOPIC_DELETED, "TopicDeleted"),
            MetadataRecord::ProducerIdsReserved { .. } => (PRODUCER_IDS_RESERVED, "ProducerIdsReserved"),
            MetadataRecord::BrokerRegistered { .. } => (BROKER_REGISTERED, "BrokerRegistered"),
            MetadataRecord::BrokerChanged { .. } => (BROKER_CHANGED, "BrokerChanged"),
            MetadataRecord::PartitionChanged { .. } => (PARTITION_CHANGED, "PartitionChanged"),
            MetadataRecord::TopicChanged { .. } => (TOPIC_CHANGED, "TopicChanged"),
        }
    }

    /// Appends the record (header and body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, _) = self.kind();
        let start = out.len();
        out.extend_from_slice(&kind.to_le_bytes());
        let version: u16 = if kind == TOPIC_CREATED { 2 } else { 1 };
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        match self {
            MetadataRecord::TopicCreated { name, config, .. }
            | MetadataRecord::TopicChanged { name, config } => {
                put_str(out, name);
                if let MetadataRecord::TopicCreated { id, .. } = self {
                    out.extend_from_slice(&id.0);
                }
                out.extend_from_slice(&config.partitions.to_le_bytes());
                out.extend_from_slice(&limit(config.retention_ms).to_le_bytes());
                out.extend_from_slice(&limit(config.retention_bytes).to_le_bytes());
                out.extend_from_slice(&config.segment_bytes.to_le_bytes());
                out.extend_from_slice(&limit(config.segment_ms).to_le_bytes());
                out.extend_from_slice(&config.max_message_bytes.to_le_bytes());
                out.extend_from_slice(&config.created_ms.to_le_bytes());
            }
            MetadataRecord::TopicDeleted { name } => put_str(out, name),
            MetadataRecord::ProducerIdsReserved { next_block } => {
                out.extend_from_slice(&next_block.to_le_bytes())
            }
            MetadataRecord::BrokerRegistered { node, epoch, unclean } => {
                out.extend_from_slice(&node.0.to_le_bytes());
                out.extend_from_slice(&epoch.0.to_le_bytes());
                out.push(u8::from(*unclean));
            }
            MetadataRecord::BrokerChanged { node, fenced, shutting_down } => {
                out.extend_from_slice(&node.0.to_le_bytes());
                out.push(u8::from(*fenced));
                out.push(u8::from(*shutting_down));
            }
            MetadataRecord::PartitionChanged { tp, state } => {
                put_str(out, tp.topic());
                out.extend_from_slice(&tp.partition.to_le_bytes());
                out.extend_from_slice(&state.leader.map_or(-1i64, |n| i64::from(n.0)).to_le_bytes());
                out.extend_from_slice(&state.leader_epoch.0.to_le_bytes());
                out.extend_from_slice(&state.partition_epoch.0.to_le_bytes());
                for nodes in [&state.replicas, &state.isr, &state.elr] {
                    out.extend_from_slice(&(nodes.len() as u32).to_le_bytes());
                    for node in nodes {
                        out.extend_from_slice(&node.0.to_le_bytes());
                    }
                }
            }
        }
        let body = (out.len() - start - RECORD_HEADER_BYTES) as u32;
        out[start + 4..start + 8].copy_from_slice(&body.to_le_bytes());
    }

    /// Decodes one record from the front of `bytes`; returns it and the bytes it took.
    pub fn decode(bytes: &[u8]) -> Result<(MetadataRecord, usize), RecordError> {
        if bytes.len() < RECORD_HEADER_BYTES {
            return Err(RecordError::Batch(format!("{} bytes left, a record header is 8", bytes.len())));
        }
        let kind = u16::from_le_bytes([bytes[0], bytes[1]]);
        let version = u16::from_le_bytes([bytes[2], bytes[3]]);
        let body_len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        let body = bytes
            .get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + body_len)
            .ok_or_else(|| RecordError::Batch(format!("a record of {body_len} bytes runs past the batch")))?;
        let name = match kind {
            TOPIC_CREATED => "TopicCreated",
            TOPIC_DELETED => "TopicDeleted",
            PRODUCER_IDS_RESERVED => "ProducerIdsReserved",
            BROKER_REGISTERED => "BrokerRegistered",
            BROKER_CHANGED => "BrokerChanged",
            PARTITION_CHANGED => "PartitionChanged",
            TOPIC_CHANGED => "TopicChanged",
            _ => return Err(RecordError::UnknownType { kind, version }),
        };
        let supported = if kind == TOPIC_CREATED { 2 } else { 1 };
        if version == 0 || version > supported {
            return Err(RecordError::UnsupportedVersion { name, version, supported });
        }
        let mut r = Body { bytes: body, name };
        let record = match kind {
            TOPIC_CREATED | TOPIC_CHANGED => {
                let name = r.str()?;
                let id = if kind == TOPIC_CREATED && version >= 2 {
                    TopicId(r.take(16, "topic_id")?.try_into().expect("16 bytes"))
                } else {
                    TopicId::NONE
                };
                let config = TopicConfig {
                    partitions: r.u32()?,
                    retention_ms: r.limit()?,
                    retention_bytes: r.limit()?,
                    segment_bytes: r.u64()?,
                    segment_ms: r.limit()?,
                    max_message_bytes: r.u32()?,
                    created_ms: r.u64()? as i64,
                };
                if kind == TOPIC_CREATED {
                    MetadataRecord::TopicCreated { name, id, config }
                } else {
                    MetadataRecord::TopicChanged { name, config }
                }
            }
            TOPIC_DELETED => MetadataRecord::TopicDeleted { name: r.str()? },
            PRODUCER_IDS_RESERVED => MetadataRecord::ProducerIdsReserved { next_block: r.u64()? as i64 },
            BROKER_REGISTERED => MetadataRecord::BrokerRegistered {
                node: NodeId(r.u32()?),
                epoch: BrokerEpoch(r.u64()?),
                unclean: r.flag()?,
            },
            BROKER_CHANGED => MetadataRecord::BrokerChanged {
                node: NodeId(r.u32()?),
                fenced: r.flag()?,
                shutting_down: r.flag()?,
            },
            _ => {
                let topic = r.str()?;
                let partition = r.u32()?;
                let leader = match r.u64()? as i64 {
                    -1 => None,
                    n if (0..=i64::from(u32::MAX)).contains(&n) => Some(NodeId(n as u32)),
                    n => return Err(RecordError::Malformed { name, reason: format!("leader {n}") }),
                };
                let leader_epoch = LeaderEpoch(r.u32()?);
                let partition_epoch = PartitionEpoch(r.u32()?);
                let (replicas, isr, elr) = (r.nodes()?, r.nodes()?, r.nodes()?);
                let state = PartitionState { leader, leader_epoch, partition_epoch, replicas, isr, elr };
                MetadataRecord::PartitionChanged { tp: TopicPartition::new(topic, partition), state }
            }
        };
        if !r.bytes.is_empty() {
            return Err(RecordError::Malformed {
                name,
                reason: format!("{} bytes after the body", r.bytes.len()),
            });
        }
        Ok((record, RECORD_HEADER_BYTES + body_len))
    }
}

/// A batch of records with its header and checksum.
pub fn encode_batch(records: &[MetadataRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BATCH_HEADER_BYTES + 64 * records.len());
    out.extend_from_slice(&BATCH_MAGIC);
    out.extend_from_slice(&BATCH_VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for record in records {
        record.encode(&mut out);
    }
    let crc = crc32c::crc32c(&out[BATCH_HEADER_BYTES..]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Checks and decodes a batch; the error says which rule broke.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<MetadataRecord>, RecordError> {
    let bad = |reason: String| Err(RecordError::Batch(reason));
    if bytes.len() < BATCH_HEADER_BYTES {
        return bad(format!("{} bytes, shorter than the 16-byte header", bytes.len()));
    }
    if bytes[0..4] != BATCH_MAGIC {
        return bad(format!("bad magic {:02x?}", &bytes[0..4]));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != BATCH_VERSION {
        return bad(format!("batch version {version} is not one this build reads ({BATCH_VERSION})"));
    }
    let count = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let stored = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&bytes[BATCH_HEADER_BYTES..]);
    if stored != computed {
        return bad(format!("crc mismatch: stored {stored:#010x}, computed {computed:#010x}"));
    }
    let mut records = Vec::with_capacity(count.min(1024));
    let mut at = BATCH_HEADER_BYTES;
    for _ in 0..count {
        let (record, used) = MetadataRecord::decode(&bytes[at..])?;
        records.push(record);
        at += used;
    }
    if at != bytes.len() {
        return bad(format!("{} bytes after the {count} records", bytes.len() - at));
    }
    Ok(records)
}

fn limit(value: Option<u64>) -> i64 {
    value.map_or(-1, |v| v as i64)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Body<'a> {
    bytes: &'a [u8],
    name: &'static str,
}

impl Body<'_> {
    fn take(&mut self, n: usize, field: &str) -> Result<&[u8], RecordError> {
        if self.bytes.len() < n {
            return Err(RecordError::Malformed { name: self.name, reason: format!("ends inside {field}") });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take(4, "a u32")?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.take(8, "a u64")?.try_into().expect("8 bytes")))
    }

    fn flag(&mut self) -> Result<bool, RecordError> {
        match self.take(1, "a flag")?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(RecordError::Malformed { name: self.name, reason: format!("flag {other}") }),
        }
    }

    fn nodes(&mut self) -> Result<Vec<NodeId>, RecordError> {
        let count = self.u32()? as usize;
        if count * 4 > self.bytes.len() {
            return Err(RecordError::Malformed {
                name: self.name,
                reason: format!("{count} nodes in {} bytes", self.bytes.len()),
            });
        }
        (0..count).map(|_| self.u32().map(NodeId)).collect()
    }

    fn limit(&mut self) -> Result<Option<u64>, RecordError> {
        match self.u64()? as i64 {
            -1 => Ok(None),
            n if n >= 0 => Ok(Some(n as u64)),
            n => Err(RecordError::Malformed { name: self.name, reason: format!("limit {n}") }),
        }
    }

    fn str(&mut self) -> Result<String, RecordError> {
        let len = u16::from_le_bytes(self.take(2, "a string length")?.try_into().expect("2 bytes")) as usize;
        let bytes = self.take(len, "a string")?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| RecordError::Malformed { name: self.name, reason: "a string is not UTF-8".into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn config(partitions: u32) -> TopicConfig {
        TopicConfig {
            partitions,
            retention_ms: Some(3_600_000),
            retention_bytes: None,
            segment_bytes: 1 << 30,
            segment_ms: None,
            max_message_bytes: 1 << 20,
            created_ms: 1_700_000_000_000,
        }
    }

    fn all_kinds() -> Vec<MetadataRecord> {
        vec![
            MetadataRecord::TopicCreated { name: "orders".into(), id: TopicId([7; 16]), config: config(12) },
            MetadataRecord::TopicDeleted { name: "orders".into() },
            MetadataRecord::ProducerIdsReserved { next_block: 2000 },
            MetadataRecord::BrokerRegistered { node: NodeId(3), epoch: BrokerEpoch(77), unclean: true },
            MetadataRecord::BrokerChanged { node: NodeId(3), fenced: false, shutting_down: true },
            MetadataRecord::PartitionChanged {
                tp: TopicPartition::new("orders", 4),
                state: PartitionState {
                    leader: Some(NodeId(2)),
                    leader_epoch: LeaderEpoch(5),
                    partition_epoch: PartitionEpoch(9),
                    replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
                    isr: vec![NodeId(2)],
                    elr: vec![NodeId(1)],
                },
            },
            MetadataRecord::PartitionChanged {
                tp: TopicPartition::new("orders", 5),
                state: PartitionState {
                    leader: None,
                    leader_epoch: LeaderEpoch(1),
                    partition_epoch: PartitionEpoch(2),
                    replicas: vec![NodeId(1)],
                    isr: vec![],
                    elr: vec![],
                },
            },
        ]
    }

    #[test]
    fn batches_round_trip() {
        let records = all_kinds();
        let bytes = encode_batch(&records);
        assert_eq!(&bytes[..4], b"SKMR");
        assert_eq!(decode_batch(&bytes).unwrap(), records);
        assert_eq!(decode_batch(&encode_batch(&[])).unwrap(), Vec::new());
    }

    /// The byte table above, checked field by field on one record.
    #[test]
    fn the_layout_is_the_documented_one() {
        let mut out = Vec::new();
        MetadataRecord::TopicDeleted { name: "ab".into() }.encode(&mut out);
        assert_eq!(out, [2, 0, 1, 0, 4, 0, 0, 0, 2, 0, b'a', b'b']);
    }

    #[test]
    fn unknown_types_and_versions_are_refused_by_name() {
        let mut record = Vec::new();
        MetadataRecord::TopicDeleted { name: "t".into() }.encode(&mut record);
        let mut unknown = record.clone();
        unknown[0] = 99;
        assert_eq!(MetadataRecord::decode(&unknown), Err(RecordError::UnknownType { kind: 99, version: 1 }));
        let mut newer = record.clone();
        newer[2] = 2;
        let error = MetadataRecord::decode(&newer).unwrap_err();
        assert_eq!(error, RecordError::UnsupportedVersion { name: "TopicDeleted", version: 2, supported: 1 });
        assert!(error.to_string().contains("TopicDeleted version 2"));
    }

    #[test]
    fn a_topic_created_record_of_version_1_is_read_without_an_id() {
        // Version 1 is version 2 without the id: build it from a version 2 record.
        let mut v2 = Vec::new();
        let record =
            MetadataRecord::TopicCreated { name: "t".into(), id: TopicId([9; 16]), config: config(3) };
        record.encode(&mut v2);
        assert_eq!(u16::from_le_bytes([v2[2], v2[3]]), 2);
        let name_end = 8 + 2 + 1;
        let mut v1 = v2[..name_end].to_vec();
        v1.extend_from_slice(&v2[name_end + 16..]);
        v1[2] = 1;
        let body = (v1.len() - 8) as u32;
        v1[4..8].copy_from_slice(&body.to_le_bytes());
        let (decoded, used) = MetadataRecord::decode(&v1).unwrap();
        assert_eq!(used, v1.len());
        assert_eq!(
            decoded,
            MetadataRecord::TopicCreated { name: "t".into(), id: TopicId::NONE, config: config(3) }
        );
        // A version this build does not know is refused by name.
        let mut v3 = v2.clone();
        v3[2] = 3;
        let error = MetadataRecord::decode(&v3).unwrap_err();
        assert_eq!(error, RecordError::UnsupportedVersion { name: "TopicCreated", version: 3, supported: 2 });
    }

    #[test]
    fn damage_is_refused() {
        let bytes = encode_batch(&all_kinds());
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(decode_batch(&flipped), Err(RecordError::Batch(reason)) if reason.contains("crc")));
        assert!(decode_batch(&bytes[..bytes.len() - 1]).is_err());
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(decode_batch(&magic).is_err());
        let mut version = bytes;
        version[4] = 9;
        assert!(
            matches!(decode_batch(&version), Err(RecordError::Batch(reason)) if reason.contains("version 9"))
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_batch(&bytes);
            let _ = MetadataRecord::decode(&bytes);
        }

        #[test]
        fn any_topic_round_trips(name in "[a-z0-9._-]{1,40}", partitions in 1u32..10_000, retention in proptest::option::of(1u64..u32::MAX as u64)) {
            let record = MetadataRecord::TopicCreated { name, id: TopicId([partitions as u8; 16]), config: TopicConfig { partitions, retention_ms: retention, ..config(1) } };
            let bytes = encode_batch(std::slice::from_ref(&record));
            prop_assert_eq!(decode_batch(&bytes).unwrap(), vec![record]);
        }
    }
}
