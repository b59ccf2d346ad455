//! Every request, decoded and encoded: the [`Request`] enum over the bodies of
//! [`crate::messages`] and [`crate::groups`], and the checks of a request frame's API and
//! version.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::common::{get_configs, get_topics, put_configs, put_topics, TopicData};
use crate::error::ErrorCode;
use crate::frame::{self, RequestHeader};
use crate::groups::{
    DeleteGroupRequest, DescribeGroupRequest, HeartbeatRequest, InitProducerIdRequest, OffsetCommitRequest,
    OffsetFetchRequest,
};
use crate::messages::{
    AlterConfigsRequest, AlterTopicConfig, ApiKey, ApiVersionsRequest, CreatePartitionsRequest,
    CreateTopicsRequest, DeleteTopicsRequest, FetchPartition, FetchRequest, ListOffsetsPartition,
    ListOffsetsRequest, MetadataRequest, NewTopic, ProducePartition, ProduceRequest,
};
use crate::wire::{DecodeError, Reader, Writer};

/// Every request, decoded. `R` holds produce records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<R> {
    ApiVersions(ApiVersionsRequest),
    Metadata(MetadataRequest),
    CreateTopics(CreateTopicsRequest),
    DeleteTopics(DeleteTopicsRequest),
    Produce(ProduceRequest<R>),
    Fetch(FetchRequest),
    ListOffsets(ListOffsetsRequest),
    InitProducerId(InitProducerIdRequest),
    ConsumerGroupHeartbeat(HeartbeatRequest),
    OffsetCommit(OffsetCommitRequest),
    OffsetFetch(OffsetFetchRequest),
    ListGroups,
    DescribeGroup(DescribeGroupRequest),
    DeleteGroup(DeleteGroupRequest),
    CreatePartitions(CreatePartitionsRequest),
    AlterConfigs(AlterConfigsRequest),
}

/// Why a request frame's body could not be turned into a [`Request`]. The broker answers each
/// with a frame-level error and keeps the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown API key {0}")]
    UnknownApi(u16),
    #[error("API {api:?} does not support version {version}")]
    UnsupportedVersion { api: ApiKey, version: u16 },
    #[error("malformed {api:?} request: {error}")]
    Malformed { api: ApiKey, error: DecodeError },
}

impl RequestError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RequestError::UnknownApi(_) => ErrorCode::UnknownApi,
            RequestError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            RequestError::Malformed { .. } => ErrorCode::MalformedRequest,
        }
    }
}

/// Encodes produce records (anything that is bytes).
pub trait RecordsBytes {
    fn as_record_bytes(&self) -> &[u8];
}

impl RecordsBytes for Bytes {
    fn as_record_bytes(&self) -> &[u8] {
        self
    }
}

impl RecordsBytes for BytesMut {
    fn as_record_bytes(&self) -> &[u8] {
        self
    }
}

impl<R> Request<R> {
    /// The same request with its produce records turned into something else (for example the
    /// decoded ranges into shared byte slices of the frame).
    pub fn map_records<T>(self, mut f: impl FnMut(R) -> T) -> Request<T> {
        match self {
            Request::Produce(p) => Request::Produce(ProduceRequest {
                acks: p.acks,
                timeout_ms: p.timeout_ms,
                topics: p
                    .topics
                    .into_iter()
                    .map(|t| TopicData {
                        name: t.name,
                        partitions: t
                            .partitions
                            .into_iter()
                            .map(|p| ProducePartition { partition: p.partition, records: f(p.records) })
                            .collect(),
                    })
                    .collect(),
            }),
            Request::ApiVersions(r) => Request::ApiVersions(r),
            Request::Metadata(r) => Request::Metadata(r),
            Request::CreateTopics(r) => Request::CreateTopics(r),
            Request::DeleteTopics(r) => Request::DeleteTopics(r),
            Request::Fetch(r) => Request::Fetch(r),
            Request::ListOffsets(r) => Request::ListOffsets(r),
            Request::InitProducerId(r) => Request::InitProducerId(r),
            Request::ConsumerGroupHeartbeat(r) => Request::ConsumerGroupHeartbeat(r),
            Request::OffsetCommit(r) => Request::OffsetCommit(r),
            Request::OffsetFetch(r) => Request::OffsetFetch(r),
            Request::ListGroups => Request::ListGroups,
            Request::DescribeGroup(r) => Request::DescribeGroup(r),
            Request::DeleteGroup(r) => Request::DeleteGroup(r),
            Request::CreatePartitions(r) => Request::CreatePartitions(r),
            Request::AlterConfigs(r) => Request::AlterConfigs(r),
        }
    }

    pub fn api_key(&self) -> ApiKey {
        match self {
            Request::ApiVersions(_) => ApiKey::ApiVersions,
            Request::Metadata(_) => ApiKey::Metadata,
            Request::CreateTopics(_) => ApiKey::CreateTopics,
            Request::DeleteTopics(_) => ApiKey::DeleteTopics,
            Request::Produce(_) => ApiKey::Produce,
            Request::Fetch(_) => ApiKey::Fetch,
            Request::ListOffsets(_) => ApiKey::ListOffsets,
            Request::InitProducerId(_) => ApiKey::InitProducerId,
            Request::ConsumerGroupHeartbeat(_) => ApiKey::ConsumerGroupHeartbeat,
            Request::OffsetCommit(_) => ApiKey::OffsetCommit,
            Request::OffsetFetch(_) => ApiKey::OffsetFetch,
            Request::ListGroups => ApiKey::ListGroups,
            Request::DescribeGroup(_) => ApiKey::DescribeGroup,
            Request::DeleteGroup(_) => ApiKey::DeleteGroup,
            Request::CreatePartitions(_) => ApiKey::CreatePartitions,
            Request::AlterConfigs(_) => ApiKey::AlterConfigs,
        }
    }
}

impl<R: RecordsBytes> Request<R> {
    pub fn encode_body(&self, w: &mut Writer) {
        match self {
            Request::ApiVersions(request) => {
                w.str(&request.client_id);
            }
            Request::Metadata(request) => match &request.topics {
                None => {
                    w.u32(crate::wire::NULL_LEN);
                }
                Some(topics) => {
                    w.array(topics, |w, t| {
                        w.str(t);
                    });
                }
            },
            Request::CreateTopics(request) => {
                w.array(&request.topics, |w, t| {
                    w.str(&t.name).u32(t.partitions);
                    put_configs(w, &t.configs);
                });
                w.u32(request.timeout_ms);
            }
            Request::DeleteTopics(request) => {
                w.array(&request.names, |w, t| {
                    w.str(t);
                });
                w.u32(request.timeout_ms);
            }
            Request::Produce(request) => {
                w.i8(request.acks).u32(request.timeout_ms);
                put_topics(w, &request.topics, |w, p| {
                    w.u32(p.partition).bytes(p.records.as_record_bytes());
                });
            }
            Request::Fetch(request) => {
                w.u32(request.max_wait_ms).u32(request.min_bytes).u32(request.max_bytes);
                put_topics(w, &request.topics, |w, p| {
                    w.u32(p.partition).u64(p.fetch_offset).u32(p.partition_bytes_max);
                });
            }
            Request::ListOffsets(request) => {
                put_topics(w, &request.topics, |w, p| {
                    w.u32(p.partition).i64(p.timestamp);
                });
            }
            Request::InitProducerId(request) => request.encode(w),
            Request::ConsumerGroupHeartbeat(request) => request.encode(w),
            Request::OffsetCommit(request) => request.encode(w),
            Request::OffsetFetch(request) => request.encode(w),
            Request::ListGroups => {}
            Request::DescribeGroup(request) => request.encode(w),
            Request::DeleteGroup(request) => request.encode(w),
            Request::CreatePartitions(request) => {
                w.array(&request.topics, |w, (name, total)| {
                    w.str(name).u32(*total);
                });
            }
            Request::AlterConfigs(request) => {
                w.array(&request.topics, |w, topic| {
                    w.str(&topic.name);
                    w.array(&topic.set, |w, (key, value)| {
                        w.str(key).str(value);
                    });
                    w.array(&topic.reset, |w, key| {
                        w.str(key);
                    });
                });
                w.bool(request.validate_only);
            }
        }
    }

    /// A whole request frame as pieces to write one after the other (a vectored write): the
    /// records of a produce request stay in their own buffers instead of being copied into the
    /// frame; every other request is one piece.
    pub fn to_frame_parts(&self, correlation_id: u32, flags: u16, version: u16) -> Vec<Bytes>
    where
        R: Clone + Into<Bytes>,
    {
        let Request::Produce(request) = self else {
            return vec![self.to_frame_at(correlation_id, flags, version).freeze()];
        };
        let api = self.api_key();
        let header = RequestHeader { api_key: api as u16, api_version: version, flags, correlation_id };
        let mut head = frame::encode_request(&header, |w| {
            w.i8(request.acks).u32(request.timeout_ms).u32(request.topics.len() as u32);
        });
        let mut parts: Vec<Bytes> = Vec::with_capacity(2 * request.topics.len() + 2);
        let mut w = Writer::with_buffer(BytesMut::with_capacity(64));
        for topic in &request.topics {
            w.str(&topic.name).u32(topic.partitions.len() as u32);
            for p in &topic.partitions {
                let records: Bytes = p.records.clone().into();
                w.u32(p.partition).u32(records.len() as u32);
                parts.push(w.buf.split().freeze());
                parts.push(records);
            }
        }
        parts.push(w.buf.split().freeze());
        let total: usize = head.len() + parts.iter().map(Bytes::len).sum::<usize>();
        head[..frame::LENGTH_BYTES].copy_from_slice(&((total - frame::LENGTH_BYTES) as u32).to_le_bytes());
        parts.insert(0, head.freeze());
        parts.retain(|part| !part.is_empty());
        parts
    }

    /// A whole request frame at the newest version this build speaks of its API.
    pub fn to_frame(&self, correlation_id: u32, flags: u16) -> BytesMut {
        self.to_frame_at(correlation_id, flags, self.api_key().versions().1)
    }

    /// A whole request frame at `version` of its API (every request body is the same at every
    /// version listed today: the v1s changed responses only).
    pub fn to_frame_at(&self, correlation_id: u32, flags: u16, version: u16) -> BytesMut {
        let header =
            RequestHeader { api_key: self.api_key() as u16, api_version: version, flags, correlation_id };
        frame::encode_request(&header, |w| self.encode_body(w))
    }
}

impl Request<Range<usize>> {
    /// Decodes a request body; produce records come back as ranges of `body`.
    pub fn decode(header: &RequestHeader, body: &[u8]) -> Result<Request<Range<usize>>, RequestError> {
        let api = ApiKey::from_u16(header.api_key).ok_or(RequestError::UnknownApi(header.api_key))?;
        let (min, max) = api.versions();
        if header.api_version < min || header.api_version > max {
            return Err(RequestError::UnsupportedVersion { api, version: header.api_version });
        }
        let mut r = Reader::new(body);
        let request = Self::decode_body(api, &mut r).and_then(|request| r.finish().map(|()| request));
        request.map_err(|error| RequestError::Malformed { api, error })
    }

    fn decode_body(api: ApiKey, r: &mut Reader<'_>) -> Result<Request<Range<usize>>, DecodeError> {
        Ok(match api {
            ApiKey::ApiVersions => {
                Request::ApiVersions(ApiVersionsRequest { client_id: r.str("client id")? })
            }
            ApiKey::Metadata => {
                let mut peek = r.clone();
                if peek.u32("topics")? == crate::wire::NULL_LEN {
                    r.u32("topics")?;
                    Request::Metadata(MetadataRequest { topics: None })
                } else {
                    Request::Metadata(MetadataRequest {
                        topics: Some(r.array("topics", 2, |r| r.str("topic"))?),
                    })
                }
            }
            ApiKey::CreateTopics => Request::CreateTopics(CreateTopicsRequest {
                topics: r.array("topics", 10, |r| {
                    Ok(NewTopic {
                        name: r.str("topic name")?,
                        partitions: r.u32("partitions")?,
                        configs: get_configs(r)?,
                    })
                })?,
                timeout_ms: r.u32("timeout")?,
            }),
            ApiKey::DeleteTopics => Request::DeleteTopics(DeleteTopicsRequest {
                names: r.array("topics", 2, |r| r.str("topic"))?,
                timeout_ms: r.u32("timeout")?,
            }),
            ApiKey::Produce => Request::Produce(ProduceRequest {
                acks: r.i8("acks")?,
                timeout_ms: r.u32("timeout")?,
                topics: get_topics(r, 8, |r| {
                    Ok(ProducePartition { partition: r.u32("partition")?, records: r.blob("records")? })
                })?,
            }),
            ApiKey::Fetch => Request::Fetch(FetchRequest {
                max_wait_ms: r.u32("max wait")?,
                min_bytes: r.u32("min bytes")?,
                max_bytes: r.u32("max bytes")?,
                topics: get_topics(r, 16, |r| {
                    Ok(FetchPartition {
                        partition: r.u32("partition")?,
                        fetch_offset: r.u64("fetch offset")?,
                        partition_bytes_max: r.u32("partition max bytes")?,
                    })
                })?,
            }),
            ApiKey::ListOffsets => Request::ListOffsets(ListOffsetsRequest {
                topics: get_topics(r, 12, |r| {
                    Ok(ListOffsetsPartition {
                        partition: r.u32("partition")?,
                        timestamp: r.i64("timestamp")?,
                    })
                })?,
            }),
            ApiKey::InitProducerId => Request::InitProducerId(InitProducerIdRequest::decode(r)?),
            ApiKey::ConsumerGroupHeartbeat => Request::ConsumerGroupHeartbeat(HeartbeatRequest::decode(r)?),
            ApiKey::OffsetCommit => Request::OffsetCommit(OffsetCommitRequest::decode(r)?),
            ApiKey::OffsetFetch => Request::OffsetFetch(OffsetFetchRequest::decode(r)?),
            ApiKey::ListGroups => Request::ListGroups,
            ApiKey::DescribeGroup => Request::DescribeGroup(DescribeGroupRequest::decode(r)?),
            ApiKey::DeleteGroup => Request::DeleteGroup(DeleteGroupRequest::decode(r)?),
            ApiKey::CreatePartitions => Request::CreatePartitions(CreatePartitionsRequest {
                topics: r.array("topics", 6, |r| Ok((r.str("topic")?, r.u32("partitions")?)))?,
            }),
            ApiKey::AlterConfigs => Request::AlterConfigs(AlterConfigsRequest {
                topics: r.array("topics", 10, |r| {
                    Ok(AlterTopicConfig {
                        name: r.str("topic")?,
                        set: r.array("set", 4, |r| Ok((r.str("key")?, r.str("value")?)))?,
                        reset: r.array("reset", 2, |r| r.str("key"))?,
                    })
                })?,
                validate_only: r.bool("validate only")?,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{FetchResponse, MetadataResponse, ProduceResponse, EARLIEST_TIMESTAMP};
    use proptest::prelude::*;

    fn round_trip(request: Request<Bytes>) {
        let frame = request.to_frame(9, 0);
        let header = frame::decode_request_header(&frame).unwrap();
        let body = &frame[frame::REQUEST_HEADER_BYTES..];
        let decoded = Request::decode(&header, body).unwrap();
        let frozen = Bytes::copy_from_slice(body);
        let decoded = decoded.map_records(|range| frozen.slice(range));
        assert_eq!(decoded, request);
        // The same frame in pieces, for a vectored write.
        let parts: Vec<u8> = request
            .to_frame_parts(9, 0, request.api_key().versions().1)
            .iter()
            .flat_map(|p| p.iter().copied())
            .collect();
        assert_eq!(parts, frame.to_vec(), "to_frame_parts writes the bytes of to_frame");
    }

    #[test]
    fn every_request_round_trips() {
        round_trip(Request::ApiVersions(ApiVersionsRequest { client_id: "cli".into() }));
        round_trip(Request::Metadata(MetadataRequest { topics: None }));
        round_trip(Request::Metadata(MetadataRequest { topics: Some(vec!["a".into(), "b".into()]) }));
        round_trip(Request::CreatePartitions(CreatePartitionsRequest {
            topics: vec![("a".into(), 7), ("b".into(), 2)],
        }));
        round_trip(Request::AlterConfigs(AlterConfigsRequest {
            topics: vec![AlterTopicConfig {
                name: "a".into(),
                set: vec![("retention.ms".into(), "1000".into())],
                reset: vec!["segment.bytes".into()],
            }],
            validate_only: true,
        }));
        round_trip(Request::CreateTopics(CreateTopicsRequest {
            topics: vec![NewTopic {
                name: "t".into(),
                partitions: 4,
                configs: vec![("retention.ms".into(), "5".into())],
            }],
            timeout_ms: 100,
        }));
        round_trip(Request::DeleteTopics(DeleteTopicsRequest { names: vec!["t".into()], timeout_ms: 7 }));
        round_trip(Request::Produce(ProduceRequest {
            acks: -1,
            timeout_ms: 30,
            topics: vec![TopicData {
                name: "t".into(),
                partitions: vec![
                    ProducePartition { partition: 0, records: Bytes::from_static(b"batch-bytes") },
                    ProducePartition { partition: 3, records: Bytes::new() },
                ],
            }],
        }));
        round_trip(Request::Fetch(FetchRequest {
            max_wait_ms: 500,
            min_bytes: 1,
            max_bytes: 1 << 20,
            topics: vec![TopicData {
                name: "t".into(),
                partitions: vec![FetchPartition {
                    partition: 1,
                    fetch_offset: 99,
                    partition_bytes_max: 4096,
                }],
            }],
        }));
        round_trip(Request::ListOffsets(ListOffsetsRequest {
            topics: vec![TopicData {
                name: "t".into(),
                partitions: vec![ListOffsetsPartition { partition: 0, timestamp: EARLIEST_TIMESTAMP }],
            }],
        }));
    }

    #[test]
    fn version_and_api_checks() {
        let header = RequestHeader { api_key: 99, api_version: 0, flags: 0, correlation_id: 1 };
        assert_eq!(Request::decode(&header, &[]), Err(RequestError::UnknownApi(99)));
        let header = RequestHeader { api_key: 4, api_version: 7, flags: 0, correlation_id: 1 };
        assert!(matches!(Request::decode(&header, &[]), Err(RequestError::UnsupportedVersion { .. })));
        let header = RequestHeader { api_key: 4, api_version: 0, flags: 0, correlation_id: 1 };
        assert!(matches!(Request::decode(&header, &[1, 2]), Err(RequestError::Malformed { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(api in 0u16..8, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let header = RequestHeader { api_key: api, api_version: 0, flags: 0, correlation_id: 1 };
            let _ = Request::decode(&header, &body);
            let mut r = Reader::new(&body);
            let _ = FetchResponse::decode(&mut r);
            let mut r = Reader::new(&body);
            let _ = MetadataResponse::decode(&mut r, 0);
            let mut r = Reader::new(&body);
            let _ = MetadataResponse::decode(&mut r, 1);
            let mut r = Reader::new(&body);
            let _ = ProduceResponse::decode(&mut r);
        }

        #[test]
        fn huge_counts_are_refused_without_allocating(count in 1_000u32..u32::MAX) {
            let header = RequestHeader { api_key: ApiKey::Fetch as u16, api_version: 0, flags: 0, correlation_id: 1 };
            let body = [&[0u8; 12][..], &count.to_le_bytes()[..]].concat();
            prop_assert!(Request::decode(&header, &body).is_err());
        }
    }
}
