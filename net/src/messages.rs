//! Request and response bodies of the topic, produce and fetch APIs (0 to 6), with their
//! encoders and decoders. The group APIs are in `groups.rs`, the `Request` enum over both in
//! `request.rs`, the helpers they share in `common.rs`.
//!
//! Record data travels as opaque blobs of whole batches in the storage format; the generic
//! parameter `R` is what holds them: `Bytes` on a client, a byte range while decoding, a file
//! range on the broker's zero-copy path.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

pub use crate::common::TopicData;
use crate::common::{error_code, get_configs, get_topics, put_configs, put_topics};
use crate::error::ErrorCode;
use crate::frame;
use crate::wire::{DecodeError, Reader, Writer};

/// The APIs, by wire key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ApiKey {
    ApiVersions = 0,
    Metadata = 1,
    CreateTopics = 2,
    DeleteTopics = 3,
    Produce = 4,
    Fetch = 5,
    ListOffsets = 6,
    InitProducerId = 7,
    ConsumerGroupHeartbeat = 8,
    OffsetCommit = 9,
    OffsetFetch = 10,
    ListGroups = 11,
    DescribeGroup = 12,
    DeleteGroup = 13,
    CreatePartitions = 14,
    AlterConfigs = 15,
}

impl ApiKey {
    pub const ALL: [ApiKey; 16] = [
        ApiKey::ApiVersions,
        ApiKey::Metadata,
        ApiKey::CreateTopics,
        ApiKey::DeleteTopics,
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::InitProducerId,
        ApiKey::ConsumerGroupHeartbeat,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::ListGroups,
        ApiKey::DescribeGroup,
        ApiKey::DeleteGroup,
        ApiKey::CreatePartitions,
        ApiKey::AlterConfigs,
    ];

    pub fn from_u16(value: u16) -> Option<ApiKey> {
        ApiKey::ALL.get(value as usize).copied()
    }

    /// The versions this build speaks: `(min, max)`. A new version of an API is listed here
    /// and in PROTOCOL.md's API table together with what it changed; a broker keeps answering
    /// every version from `min` up.
    pub fn versions(self) -> (u16, u16) {
        match self {
            // v1: the response adds the broker's node id and build commit.
            ApiKey::ApiVersions => (0, 1),
            // v1: each partition adds its leader epoch, replicas and in-sync replicas; v2: each
            // broker its QUIC port and shard count, each partition its shard.
            ApiKey::Metadata => (0, 2),
            _ => (0, 0),
        }
    }

    /// The version to use with a broker that speaks `broker` (`(min, max)`) of this API: the
    /// highest both sides speak, or `None` when the ranges do not meet.
    pub fn negotiate(self, broker: (u16, u16)) -> Option<u16> {
        let (min, max) = self.versions();
        let version = max.min(broker.1);
        (version >= min.max(broker.0)).then_some(version)
    }
}

/// `ListOffsets` timestamp asking for the next offset to be written.
pub const LATEST_TIMESTAMP: i64 = -1;
/// `ListOffsets` timestamp asking for the first offset held.
pub const EARLIEST_TIMESTAMP: i64 = -2;

// ---------------------------------------------------------------------------------------------
// ApiVersions

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiVersionsRequest {
    pub client_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiVersion {
    pub api_key: u16,
    pub min_version: u16,
    pub max_version: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiVersionsResponse {
    pub error: ErrorCode,
    pub broker_version: String,
    pub apis: Vec<ApiVersion>,
    pub frame_bytes_max: u32,
    pub batch_bytes_max: u32,
    /// v1: the broker's node id (0 in a v0 response).
    pub node_id: u32,
    /// v1: the git commit the broker was built from (empty in a v0 response).
    pub build_commit: String,
}

impl ApiVersionsResponse {
    /// The body at `version` (v0 leaves out the v1 fields).
    pub fn encode(&self, w: &mut Writer, version: u16) {
        w.u16(self.error.code()).str(&self.broker_version);
        w.array(&self.apis, |w, api| {
            w.u16(api.api_key).u16(api.min_version).u16(api.max_version);
        });
        w.u32(self.frame_bytes_max).u32(self.batch_bytes_max);
        if version >= 1 {
            w.u32(self.node_id).str(&self.build_commit);
        }
    }

    /// The versions the broker speaks of `api`, from this response.
    pub fn versions_of(&self, api: ApiKey) -> Option<(u16, u16)> {
        self.apis.iter().find(|a| a.api_key == api as u16).map(|a| (a.min_version, a.max_version))
    }

    pub fn decode(r: &mut Reader<'_>, version: u16) -> Result<Self, DecodeError> {
        let mut response = ApiVersionsResponse::decode_v0(r)?;
        if version >= 1 {
            response.node_id = r.u32("node id")?;
            response.build_commit = r.str("build commit")?;
        }
        Ok(response)
    }

    fn decode_v0(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(ApiVersionsResponse {
            error: error_code(r, "error")?,
            broker_version: r.str("broker version")?,
            apis: r.array("apis", 6, |r| {
                Ok(ApiVersion {
                    api_key: r.u16("api key")?,
                    min_version: r.u16("min version")?,
                    max_version: r.u16("max version")?,
                })
            })?,
            frame_bytes_max: r.u32("frame bytes max")?,
            batch_bytes_max: r.u32("batch bytes max")?,
            node_id: 0,
            build_commit: String::new(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataRequest {
    /// `None`: every topic.
    pub topics: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerInfo {
    pub node_id: u32,
    pub host: String,
    pub port: u16,
    /// v2: the broker's QUIC port on the same host (`None`: no QUIC listener, or an older
    /// answer).
    pub quic_port: Option<u16>,
    /// v2: how many shards (cores) serve the broker (`None` in an older answer). A QUIC client
    /// can pick the shard a connection lands on ([`crate::quic::steering_dcid`]).
    pub shards: Option<u16>,
}

impl BrokerInfo {
    /// A broker as a version 0 or 1 answer describes it.
    pub fn new(node_id: u32, host: impl Into<String>, port: u16) -> BrokerInfo {
        BrokerInfo { node_id, host: host.into(), port, quic_port: None, shards: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionMetadata {
    pub partition: u32,
    pub error: ErrorCode,
    pub leader: u32,
    /// v1: the leader's epoch (0 in a v0 response).
    pub leader_epoch: u32,
    /// v1: the brokers holding a replica, and those in sync (empty in a v0 response).
    pub replicas: Vec<u32>,
    pub isr: Vec<u32>,
    /// v2: the leader's shard that holds the partition (`None` in an older answer): a request
    /// sent on a connection served by that shard takes no hop between cores.
    pub shard: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMetadata {
    pub name: String,
    pub error: ErrorCode,
    pub partitions: Vec<PartitionMetadata>,
    /// The topic's settings, as key/value text.
    pub configs: Vec<(String, String)>,
}

/// A partition's `shard` field when no shard holds it (v2).
const NO_SHARD: u16 = u16::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataResponse {
    pub brokers: Vec<BrokerInfo>,
    pub controller_id: u32,
    pub topics: Vec<TopicMetadata>,
}

impl MetadataResponse {
    /// The body at `version` (v0 leaves out the v1 fields).
    pub fn encode(&self, w: &mut Writer, version: u16) {
        w.array(&self.brokers, |w, b| {
            w.u32(b.node_id).str(&b.host).u16(b.port);
            if version >= 2 {
                w.u16(b.quic_port.unwrap_or(0)).u16(b.shards.unwrap_or(0));
            }
        });
        w.u32(self.controller_id);
        w.array(&self.topics, |w, t| {
            w.str(&t.name).u16(t.error.code());
            w.array(&t.partitions, |w, p| {
                w.u32(p.partition).u16(p.error.code()).u32(p.leader);
                if version >= 1 {
                    w.u32(p.leader_epoch);
                    w.array(&p.replicas, |w, node| {
                        w.u32(*node);
                    });
                    w.array(&p.isr, |w, node| {
                        w.u32(*node);
                    });
                }
                if version >= 2 {
                    w.u16(p.shard.unwrap_or(NO_SHARD));
                }
            });
            put_configs(w, &t.configs);
        });
    }

    pub fn decode(r: &mut Reader<'_>, version: u16) -> Result<Self, DecodeError> {
        Ok(MetadataResponse {
            brokers: r.array("brokers", 8, |r| {
                let mut broker = BrokerInfo::new(r.u32("node id")?, r.str("host")?, r.u16("port")?);
                if version >= 2 {
                    broker.quic_port = Some(r.u16("QUIC port")?).filter(|&port| port != 0);
                    broker.shards = Some(r.u16("shards")?).filter(|&shards| shards != 0);
                }
                Ok(broker)
            })?,
            controller_id: r.u32("controller id")?,
            topics: r.array("topics", 12, |r| {
                Ok(TopicMetadata {
                    name: r.str("topic name")?,
                    error: error_code(r, "topic error")?,
                    partitions: r.array("partitions", 10, |r| {
                        let partition = r.u32("partition")?;
                        let error = error_code(r, "partition error")?;
                        let leader = r.u32("leader")?;
                        let (leader_epoch, replicas, isr) = if version >= 1 {
                            (
                                r.u32("leader epoch")?,
                                r.array("replicas", 4, |r| r.u32("replica"))?,
                                r.array("in-sync replicas", 4, |r| r.u32("in-sync replica"))?,
                            )
                        } else {
                            (0, Vec::new(), Vec::new())
                        };
                        let shard = if version >= 2 {
                            Some(r.u16("shard")?).filter(|&shard| shard != NO_SHARD)
                        } else {
                            None
                        };
                        Ok(PartitionMetadata { partition, error, leader, leader_epoch, replicas, isr, shard })
                    })?,
                    configs: get_configs(r)?,
                })
            })?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// CreateTopics / DeleteTopics

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    pub configs: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTopicsRequest {
    pub topics: Vec<NewTopic>,
    pub timeout_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteTopicsRequest {
    pub names: Vec<String>,
    pub timeout_ms: u32,
}

/// CreatePartitions (14): grow topics to a partition count each (answered with [`TopicResults`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePartitionsRequest {
    /// (topic, the partition count it should have).
    pub topics: Vec<(String, u32)>,
}

/// AlterConfigs (15): change topics' settings (answered with [`TopicResults`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterConfigsRequest {
    pub topics: Vec<AlterTopicConfig>,
    /// Check every rule, change nothing.
    pub validate_only: bool,
}

/// One topic's changes in an [`AlterConfigsRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlterTopicConfig {
    pub name: String,
    /// Settings given a value.
    pub set: Vec<(String, String)>,
    /// Settings put back to the broker's defaults.
    pub reset: Vec<String>,
}

/// Per-topic outcome of CreateTopics, DeleteTopics, CreatePartitions and AlterConfigs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicResult {
    pub name: String,
    pub error: ErrorCode,
    /// Human-readable detail when `error` is not `None`.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicResults {
    pub topics: Vec<TopicResult>,
}

impl TopicResults {
    pub fn encode(&self, w: &mut Writer) {
        w.array(&self.topics, |w, t| {
            w.str(&t.name).u16(t.error.code()).str(&t.message);
        });
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(TopicResults {
            topics: r.array("topics", 6, |r| {
                Ok(TopicResult {
                    name: r.str("topic name")?,
                    error: error_code(r, "error")?,
                    message: r.str("message")?,
                })
            })?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Produce

/// `acks` values.
pub mod acks {
    pub const NONE: i8 = 0;
    pub const LEADER: i8 = 1;
    pub const ALL: i8 = -1;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartition<R> {
    pub partition: u32,
    /// One or more whole batches in the storage format.
    pub records: R,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceRequest<R> {
    pub acks: i8,
    pub timeout_ms: u32,
    pub topics: Vec<TopicData<ProducePartition<R>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartitionResponse {
    pub partition: u32,
    pub error: ErrorCode,
    /// Offset of the first record written (when `error` is `None`).
    pub base_offset: u64,
    /// Offset of the last record written.
    pub last_offset: u64,
    pub log_start_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceResponse {
    pub topics: Vec<TopicData<ProducePartitionResponse>>,
}

impl ProduceResponse {
    pub fn encode(&self, w: &mut Writer) {
        put_topics(w, &self.topics, |w, p| {
            w.u32(p.partition)
                .u16(p.error.code())
                .u64(p.base_offset)
                .u64(p.last_offset)
                .u64(p.log_start_offset);
        });
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(ProduceResponse {
            topics: get_topics(r, 30, |r| {
                Ok(ProducePartitionResponse {
                    partition: r.u32("partition")?,
                    error: error_code(r, "error")?,
                    base_offset: r.u64("base offset")?,
                    last_offset: r.u64("last offset")?,
                    log_start_offset: r.u64("log start offset")?,
                })
            })?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Fetch

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartition {
    pub partition: u32,
    pub fetch_offset: u64,
    pub partition_bytes_max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// Long poll: wait up to this long for `min_bytes`.
    pub max_wait_ms: u32,
    pub min_bytes: u32,
    /// Bound on the whole response's record bytes (at least one batch is always returned).
    pub max_bytes: u32,
    pub topics: Vec<TopicData<FetchPartition>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartitionResponse<R> {
    pub partition: u32,
    pub error: ErrorCode,
    /// The offset after the last readable record.
    pub high_watermark: u64,
    pub log_start_offset: u64,
    /// Whole batches from the one holding the fetch offset (it may start before it).
    pub records: R,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchResponse<R> {
    pub topics: Vec<TopicData<FetchPartitionResponse<R>>>,
}

/// Bytes of a fetch response before each partition's records: partition, error, high
/// watermark, log start offset, records length.
pub const FETCH_PARTITION_HEADER_BYTES: usize = 4 + 2 + 8 + 8 + 4;

/// Something that holds record bytes of a known length.
pub trait RecordsLen {
    fn records_len(&self) -> usize;
}

impl RecordsLen for Bytes {
    fn records_len(&self) -> usize {
        self.len()
    }
}

/// One piece of an encoded response: encoded bytes, or a records part the transport sends its
/// own way (from memory, or with `sendfile`).
#[derive(Debug)]
pub enum Part<R> {
    Bytes(Bytes),
    Records(R),
}

impl<R: RecordsLen> FetchResponse<R> {
    /// Encodes the whole response frame as parts, so records are never copied into the frame.
    pub fn encode_parts(self, correlation_id: u32) -> Vec<Part<R>> {
        let mut parts = Vec::new();
        let mut body_len = 4usize;
        for topic in &self.topics {
            body_len += 2 + topic.name.len() + 4;
            for partition in &topic.partitions {
                body_len += FETCH_PARTITION_HEADER_BYTES + partition.records.records_len();
            }
        }
        let mut buf = BytesMut::with_capacity(64 + self.topics.len() * 64);
        frame::put_response_header(
            &mut buf,
            &frame::ResponseHeader { correlation_id, error: 0, flags: 0 },
            body_len,
        );
        let mut w = Writer::with_buffer(buf);
        w.u32(self.topics.len() as u32);
        for topic in self.topics {
            w.str(&topic.name).u32(topic.partitions.len() as u32);
            for partition in topic.partitions {
                w.u32(partition.partition)
                    .u16(partition.error.code())
                    .u64(partition.high_watermark)
                    .u64(partition.log_start_offset)
                    .u32(partition.records.records_len() as u32);
                if partition.records.records_len() > 0 {
                    parts.push(Part::Bytes(w.buf.split().freeze()));
                    parts.push(Part::Records(partition.records));
                }
            }
        }
        if !w.buf.is_empty() {
            parts.push(Part::Bytes(w.buf.freeze()));
        }
        parts
    }
}

impl FetchResponse<Range<usize>> {
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(FetchResponse {
            topics: get_topics(r, FETCH_PARTITION_HEADER_BYTES, |r| {
                Ok(FetchPartitionResponse {
                    partition: r.u32("partition")?,
                    error: error_code(r, "error")?,
                    high_watermark: r.u64("high watermark")?,
                    log_start_offset: r.u64("log start offset")?,
                    records: r.blob("records")?,
                })
            })?,
        })
    }
}

impl<R> FetchResponse<R> {
    pub fn map_records<T>(self, mut f: impl FnMut(R) -> T) -> FetchResponse<T> {
        FetchResponse {
            topics: self
                .topics
                .into_iter()
                .map(|topic| TopicData {
                    name: topic.name,
                    partitions: topic
                        .partitions
                        .into_iter()
                        .map(|p| FetchPartitionResponse {
                            partition: p.partition,
                            error: p.error,
                            high_watermark: p.high_watermark,
                            log_start_offset: p.log_start_offset,
                            records: f(p.records),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ListOffsets

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsPartition {
    pub partition: u32,
    /// [`LATEST_TIMESTAMP`], [`EARLIEST_TIMESTAMP`], or ms since the epoch.
    pub timestamp: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsRequest {
    pub topics: Vec<TopicData<ListOffsetsPartition>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsPartitionResponse {
    pub partition: u32,
    pub error: ErrorCode,
    /// The offset found; −1 when no record is at or after the timestamp.
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsResponse {
    pub topics: Vec<TopicData<ListOffsetsPartitionResponse>>,
}

impl ListOffsetsResponse {
    pub fn encode(&self, w: &mut Writer) {
        put_topics(w, &self.topics, |w, p| {
            w.u32(p.partition).u16(p.error.code()).i64(p.offset);
        });
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(ListOffsetsResponse {
            topics: get_topics(r, 14, |r| {
                Ok(ListOffsetsPartitionResponse {
                    partition: r.u32("partition")?,
                    error: error_code(r, "error")?,
                    offset: r.i64("offset")?,
                })
            })?,
        })
    }
}

/// Encodes a response body behind its frame header.
pub fn encode_response(correlation_id: u32, body: impl FnOnce(&mut Writer)) -> BytesMut {
    let mut w = Writer::with_buffer(BytesMut::with_capacity(128));
    w.buf.extend_from_slice(&[0u8; frame::RESPONSE_HEADER_BYTES]);
    body(&mut w);
    let mut buf = w.buf;
    let body_len = buf.len() - frame::RESPONSE_HEADER_BYTES;
    let mut header = BytesMut::with_capacity(frame::RESPONSE_HEADER_BYTES);
    frame::put_response_header(
        &mut header,
        &frame::ResponseHeader { correlation_id, error: 0, flags: 0 },
        body_len,
    );
    buf[..frame::RESPONSE_HEADER_BYTES].copy_from_slice(&header);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata_v1() -> MetadataResponse {
        MetadataResponse {
            brokers: vec![BrokerInfo::new(1, "127.0.0.1", 9400)],
            controller_id: 1,
            topics: vec![TopicMetadata {
                name: "t".into(),
                error: ErrorCode::None,
                partitions: vec![PartitionMetadata {
                    partition: 0,
                    error: ErrorCode::None,
                    leader: 1,
                    leader_epoch: 7,
                    replicas: vec![1, 2, 3],
                    isr: vec![1, 3],
                    shard: None,
                }],
                configs: vec![("segment.bytes".into(), "1024".into())],
            }],
        }
    }

    fn metadata_v2() -> MetadataResponse {
        let mut metadata = metadata_v1();
        metadata.brokers[0].quic_port = Some(9401);
        metadata.brokers[0].shards = Some(4);
        metadata.topics[0].partitions[0].shard = Some(3);
        let mut unplaced = metadata.topics[0].partitions[0].clone();
        unplaced.partition = 1;
        unplaced.shard = None;
        metadata.topics[0].partitions.push(unplaced);
        metadata
    }

    /// v2 adds the broker's QUIC port and shard count and each partition's shard; v1 and v0
    /// readers of a v2-capable broker get their own layout, without them.
    #[test]
    fn version_2_carries_shards_and_older_versions_leave_them_out() {
        let metadata = metadata_v2();
        let mut v2 = Writer::new();
        metadata.encode(&mut v2, 2);
        let mut r = Reader::new(&v2.buf);
        assert_eq!(MetadataResponse::decode(&mut r, 2).unwrap(), metadata);
        r.finish().unwrap();
        let mut v1 = Writer::new();
        metadata.encode(&mut v1, 1);
        // Per broker: quic_port and shards (2 + 2); per partition: shard (2).
        assert_eq!(v2.buf.len() - v1.buf.len(), 4 + 2 * 2);
        let mut r = Reader::new(&v1.buf);
        let decoded = MetadataResponse::decode(&mut r, 1).unwrap();
        r.finish().unwrap();
        assert_eq!((decoded.brokers[0].quic_port, decoded.brokers[0].shards), (None, None));
        assert!(decoded.topics[0].partitions.iter().all(|p| p.shard.is_none()));
        // A broker without QUIC says port 0, read back as none.
        let mut without = metadata.clone();
        without.brokers[0].quic_port = None;
        let mut w = Writer::new();
        without.encode(&mut w, 2);
        let decoded = MetadataResponse::decode(&mut Reader::new(&w.buf), 2).unwrap();
        assert_eq!(decoded.brokers[0].quic_port, None);
    }

    #[test]
    fn responses_round_trip() {
        let metadata = metadata_v1();
        let frame = encode_response(5, |w| metadata.encode(w, 1));
        let header = frame::decode_response_header(&frame);
        assert_eq!(header.correlation_id, 5);
        assert_eq!(frame::response_frame_len(&frame, 1 << 20), Ok(Some(frame.len())));
        let mut r = Reader::new(&frame[frame::RESPONSE_HEADER_BYTES..]);
        assert_eq!(MetadataResponse::decode(&mut r, 1).unwrap(), metadata);
        r.finish().unwrap();

        let fetch = FetchResponse {
            topics: vec![TopicData {
                name: "t".into(),
                partitions: vec![
                    FetchPartitionResponse {
                        partition: 0,
                        error: ErrorCode::None,
                        high_watermark: 10,
                        log_start_offset: 0,
                        records: Bytes::from_static(b"abc"),
                    },
                    FetchPartitionResponse {
                        partition: 1,
                        error: ErrorCode::OffsetOutOfRange,
                        high_watermark: 3,
                        log_start_offset: 1,
                        records: Bytes::new(),
                    },
                ],
            }],
        };
        let mut joined = BytesMut::new();
        for part in fetch.clone().encode_parts(8) {
            match part {
                Part::Bytes(b) | Part::Records(b) => joined.extend_from_slice(&b),
            }
        }
        assert_eq!(frame::response_frame_len(&joined, 1 << 20), Ok(Some(joined.len())));
        let body = Bytes::copy_from_slice(&joined[frame::RESPONSE_HEADER_BYTES..]);
        let mut r = Reader::new(&body);
        let decoded = FetchResponse::decode(&mut r).unwrap().map_records(|range| body.slice(range));
        assert_eq!(decoded, fetch);
    }

    /// A v0 response leaves out every v1 field, and a v0 reader reads exactly the v0 bytes (an
    /// old client of a new broker sees what it always saw).
    #[test]
    fn version_0_bodies_have_the_version_0_layout() {
        let metadata = metadata_v1();
        let mut v0 = Writer::new();
        metadata.encode(&mut v0, 0);
        let mut v1 = Writer::new();
        metadata.encode(&mut v1, 1);
        // epoch (4) + two arrays (4 + 3 * 4, 4 + 2 * 4)
        assert_eq!(v1.buf.len() - v0.buf.len(), 4 + 16 + 12);
        let mut r = Reader::new(&v0.buf);
        let decoded = MetadataResponse::decode(&mut r, 0).unwrap();
        r.finish().unwrap();
        let p = &decoded.topics[0].partitions[0];
        assert_eq!((p.leader, p.leader_epoch, p.replicas.len(), p.isr.len()), (1, 0, 0, 0));

        let versions = ApiVersionsResponse {
            error: ErrorCode::None,
            broker_version: "0.1.0".into(),
            apis: vec![ApiVersion { api_key: 1, min_version: 0, max_version: 1 }],
            frame_bytes_max: 1 << 20,
            batch_bytes_max: 1 << 16,
            node_id: 3,
            build_commit: "abc123".into(),
        };
        for version in [0, 1] {
            let mut w = Writer::new();
            versions.encode(&mut w, version);
            let mut r = Reader::new(&w.buf);
            let decoded = ApiVersionsResponse::decode(&mut r, version).unwrap();
            r.finish().unwrap();
            if version == 1 {
                assert_eq!(decoded, versions);
            } else {
                assert_eq!((decoded.node_id, decoded.build_commit.as_str()), (0, ""));
                assert_eq!(decoded.apis, versions.apis);
            }
        }
        assert_eq!(versions.versions_of(ApiKey::Metadata), Some((0, 1)));
        assert_eq!(versions.versions_of(ApiKey::Fetch), None);
        assert_eq!(ApiKey::Metadata.negotiate((0, 1)), Some(1), "a v1 broker is asked at v1");
    }

    #[test]
    fn versions_are_negotiated_to_the_highest_both_speak() {
        assert_eq!(ApiKey::Metadata.negotiate((0, 1)), Some(1));
        assert_eq!(ApiKey::Metadata.negotiate((0, 0)), Some(0), "an old broker gets v0");
        assert_eq!(ApiKey::Metadata.negotiate((0, 9)), Some(2), "a newer broker gets our newest");
        assert_eq!(ApiKey::Fetch.negotiate((2, 5)), None, "no version in common");
    }

    /// An error code a newer broker added must not fail the decode of a response: it comes
    /// back as `Unknown(code)` where it stood, and the rest of the response is read.
    #[test]
    fn an_unknown_error_code_in_a_body_decodes_as_unknown() {
        let mut metadata = metadata_v1();
        metadata.topics[0].error = ErrorCode::Unknown(4242);
        metadata.topics[0].partitions[0].error = ErrorCode::Unknown(150);
        let mut w = Writer::new();
        metadata.encode(&mut w, 1);
        let mut r = Reader::new(&w.buf);
        let decoded = MetadataResponse::decode(&mut r, 1).unwrap();
        r.finish().unwrap();
        assert_eq!(decoded.topics[0].error, ErrorCode::Unknown(4242));
        assert_eq!(decoded.topics[0].partitions[0].error, ErrorCode::Unknown(150));
        assert_eq!(decoded.topics[0].configs, metadata.topics[0].configs, "read on past the unknown code");
        let produce = ProduceResponse {
            topics: vec![TopicData {
                name: "t".into(),
                partitions: vec![ProducePartitionResponse {
                    partition: 0,
                    error: ErrorCode::Unknown(333),
                    base_offset: 0,
                    last_offset: 0,
                    log_start_offset: 0,
                }],
            }],
        };
        let mut w = Writer::new();
        produce.encode(&mut w);
        let mut r = Reader::new(&w.buf);
        assert_eq!(ProduceResponse::decode(&mut r).unwrap(), produce);
    }
}
