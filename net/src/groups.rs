//! Bodies of the idempotent-producer and consumer-group APIs: InitProducerId (7),
//! ConsumerGroupHeartbeat (8), OffsetCommit (9), OffsetFetch (10), ListGroups (11) and
//! DescribeGroup (12), DeleteGroup (13). Byte layouts are in `PROTOCOL.md`.

use crate::common::{error_code, get_strings, put_strings, TopicData};
use crate::error::ErrorCode;
use crate::types::TopicPartition;
use crate::wire::{DecodeError, Reader, Writer};

fn put_topic_partitions(w: &mut Writer, topics: &[TopicPartitions]) {
    w.array(topics, |w, t| {
        w.str(&t.topic);
        w.array(&t.partitions, |w, p| {
            w.u32(*p);
        });
    });
}

fn get_topic_partitions(
    r: &mut Reader<'_>,
    field: &'static str,
) -> Result<Vec<TopicPartitions>, DecodeError> {
    r.array(field, 6, |r| {
        Ok(TopicPartitions {
            topic: r.str("topic")?,
            partitions: r.array("partitions", 4, |r| r.u32("partition"))?,
        })
    })
}

// ---------------------------------------------------------------------------------------------
// InitProducerId

/// Batches of one idempotent producer the broker remembers per partition; a producer keeps at
/// most this many batches of a partition in flight, so a retry always finds its original.
pub const IDEMPOTENCE_WINDOW: usize = 64;

/// Asks for a producer id (`producer_id = -1`), or for the next epoch of one the client holds
/// (after it lost track of its sequence numbers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitProducerIdRequest {
    pub producer_id: i64,
    pub producer_epoch: i16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitProducerIdResponse {
    pub error: ErrorCode,
    pub producer_id: i64,
    pub producer_epoch: i16,
}

impl InitProducerIdRequest {
    pub fn encode(&self, w: &mut Writer) {
        w.i64(self.producer_id).i16(self.producer_epoch);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(InitProducerIdRequest {
            producer_id: r.i64("producer id")?,
            producer_epoch: r.i16("producer epoch")?,
        })
    }
}

impl InitProducerIdResponse {
    pub fn encode(&self, w: &mut Writer) {
        w.u16(self.error.code()).i64(self.producer_id).i16(self.producer_epoch);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(InitProducerIdResponse {
            error: error_code(r, "error")?,
            producer_id: r.i64("producer id")?,
            producer_epoch: r.i16("producer epoch")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// ConsumerGroupHeartbeat

/// Partitions of one topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartitions {
    pub topic: String,
    pub partitions: Vec<u32>,
}

impl TopicPartitions {
    /// Groups sorted topic-partitions by topic (a set's order).
    pub fn from_tps<'a>(tps: impl IntoIterator<Item = &'a TopicPartition>) -> Vec<TopicPartitions> {
        let mut out: Vec<TopicPartitions> = Vec::new();
        for tp in tps {
            match out.last_mut() {
                Some(last) if *last.topic == *tp.topic => last.partitions.push(tp.partition),
                _ => {
                    out.push(TopicPartitions { topic: tp.topic().to_owned(), partitions: vec![tp.partition] })
                }
            }
        }
        out
    }

    /// The topic-partitions of a list (one shared name per topic).
    pub fn to_tps<C: FromIterator<TopicPartition>>(list: &[TopicPartitions]) -> C {
        list.iter()
            .flat_map(|t| {
                let topic: std::sync::Arc<str> = t.topic.as_str().into();
                t.partitions.iter().map(move |&partition| TopicPartition { topic: topic.clone(), partition })
            })
            .collect()
    }
}

/// `member_epoch` in a heartbeat: join the group.
pub const JOIN_EPOCH: i32 = 0;
/// `member_epoch` in a heartbeat: leave the group.
pub const LEAVE_EPOCH: i32 = -1;
/// `member_epoch` in an OffsetCommit from outside the group (admin tools, manually assigned
/// consumers): accepted only while the group has no members.
pub const ADMIN_EPOCH: i32 = -1;

/// A member's heartbeat: joins (epoch 0), keeps the membership alive and reports the partitions
/// the member owns now, or leaves (epoch -1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRequest {
    pub group_id: String,
    /// Empty when joining: the coordinator assigns one.
    pub member_id: String,
    pub member_epoch: i32,
    pub client_id: String,
    /// The member is removed if no heartbeat arrives for this long.
    pub session_timeout_ms: u32,
    /// The member is removed if it keeps a revoked partition for this long.
    pub rebalance_timeout_ms: u32,
    pub subscribed_topics: Vec<String>,
    /// Partitions the member owns now (it stopped consuming every partition not listed).
    pub owned: Vec<TopicPartitions>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatResponse {
    pub error: ErrorCode,
    pub error_message: String,
    pub member_id: String,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: u32,
    /// The partitions the member should own now: it stops consuming any partition it owns
    /// that is not listed, and starts on the listed ones it does not own.
    pub assignment: Vec<TopicPartitions>,
}

impl HeartbeatRequest {
    pub fn encode(&self, w: &mut Writer) {
        w.str(&self.group_id).str(&self.member_id).i32(self.member_epoch).str(&self.client_id);
        w.u32(self.session_timeout_ms).u32(self.rebalance_timeout_ms);
        put_strings(w, &self.subscribed_topics);
        put_topic_partitions(w, &self.owned);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(HeartbeatRequest {
            group_id: r.str("group id")?,
            member_id: r.str("member id")?,
            member_epoch: r.i32("member epoch")?,
            client_id: r.str("client id")?,
            session_timeout_ms: r.u32("session timeout")?,
            rebalance_timeout_ms: r.u32("rebalance timeout")?,
            subscribed_topics: get_strings(r, "subscribed topics")?,
            owned: get_topic_partitions(r, "owned partitions")?,
        })
    }
}

impl HeartbeatResponse {
    pub fn error(error: ErrorCode, message: impl Into<String>) -> HeartbeatResponse {
        HeartbeatResponse {
            error,
            error_message: message.into(),
            member_id: String::new(),
            member_epoch: -1,
            heartbeat_interval_ms: 0,
            assignment: Vec::new(),
        }
    }

    pub fn encode(&self, w: &mut Writer) {
        w.u16(self.error.code()).str(&self.error_message).str(&self.member_id).i32(self.member_epoch);
        w.u32(self.heartbeat_interval_ms);
        put_topic_partitions(w, &self.assignment);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(HeartbeatResponse {
            error: error_code(r, "error")?,
            error_message: r.str("error message")?,
            member_id: r.str("member id")?,
            member_epoch: r.i32("member epoch")?,
            heartbeat_interval_ms: r.u32("heartbeat interval")?,
            assignment: get_topic_partitions(r, "assignment")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// OffsetCommit / OffsetFetch

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPartition {
    pub partition: u32,
    /// The offset of the next record to consume.
    pub offset: u64,
    pub metadata: String,
}

/// Commits offsets for a group. From a member: `member_id` and its current `member_epoch`, and
/// only for partitions it owns. From outside the group: empty `member_id` and
/// [`ADMIN_EPOCH`], accepted only while the group has no members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommitRequest {
    pub group_id: String,
    pub member_id: String,
    pub member_epoch: i32,
    pub topics: Vec<TopicData<CommitPartition>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionError {
    pub partition: u32,
    pub error: ErrorCode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommitResponse {
    pub error: ErrorCode,
    pub topics: Vec<TopicData<PartitionError>>,
}

impl OffsetCommitRequest {
    pub fn encode(&self, w: &mut Writer) {
        w.str(&self.group_id).str(&self.member_id).i32(self.member_epoch);
        w.array(&self.topics, |w, t| {
            w.str(&t.name);
            w.array(&t.partitions, |w, p| {
                w.u32(p.partition).u64(p.offset).str(&p.metadata);
            });
        });
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(OffsetCommitRequest {
            group_id: r.str("group id")?,
            member_id: r.str("member id")?,
            member_epoch: r.i32("member epoch")?,
            topics: r.array("topics", 6, |r| {
                Ok(TopicData {
                    name: r.str("topic")?,
                    partitions: r.array("partitions", 14, |r| {
                        Ok(CommitPartition {
                            partition: r.u32("partition")?,
                            offset: r.u64("offset")?,
                            metadata: r.str("metadata")?,
                        })
                    })?,
                })
            })?,
        })
    }
}

impl OffsetCommitResponse {
    pub fn encode(&self, w: &mut Writer) {
        w.u16(self.error.code());
        w.array(&self.topics, |w, t| {
            w.str(&t.name);
            w.array(&t.partitions, |w, p| {
                w.u32(p.partition).u16(p.error.code());
            });
        });
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(OffsetCommitResponse {
            error: error_code(r, "error")?,
            topics: r.array("topics", 6, |r| {
                Ok(TopicData {
                    name: r.str("topic")?,
                    partitions: r.array("partitions", 6, |r| {
                        Ok(PartitionError { partition: r.u32("partition")?, error: error_code(r, "error")? })
                    })?,
                })
            })?,
        })
    }
}

/// Asks for a group's committed offsets: of the listed partitions, or all (`topics = None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetFetchRequest {
    pub group_id: String,
    pub topics: Option<Vec<TopicPartitions>>,
}

/// A committed offset; `offset = -1` when the partition has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub partition: u32,
    pub offset: i64,
    pub metadata: String,
    /// When it was committed (ms since the epoch; -1 when none).
    pub commit_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetFetchResponse {
    pub error: ErrorCode,
    pub topics: Vec<TopicData<CommittedOffset>>,
}

impl OffsetFetchRequest {
    pub fn encode(&self, w: &mut Writer) {
        w.str(&self.group_id);
        match &self.topics {
            None => {
                w.u32(crate::wire::NULL_LEN);
            }
            Some(topics) => put_topic_partitions(w, topics),
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group_id = r.str("group id")?;
        let mut peek = r.clone();
        let topics = if peek.u32("topics")? == crate::wire::NULL_LEN {
            r.u32("topics")?;
            None
        } else {
            Some(get_topic_partitions(r, "topics")?)
        };
        Ok(OffsetFetchRequest { group_id, topics })
    }
}

fn put_committed(w: &mut Writer, topics: &[TopicData<CommittedOffset>]) {
    w.array(topics, |w, t| {
        w.str(&t.name);
        w.array(&t.partitions, |w, p| {
            w.u32(p.partition).i64(p.offset).str(&p.metadata).i64(p.commit_ms);
        });
    });
}

fn get_committed(r: &mut Reader<'_>) -> Result<Vec<TopicData<CommittedOffset>>, DecodeError> {
    r.array("topics", 6, |r| {
        Ok(TopicData {
            name: r.str("topic")?,
            partitions: r.array("partitions", 22, |r| {
                Ok(CommittedOffset {
                    partition: r.u32("partition")?,
                    offset: r.i64("offset")?,
                    metadata: r.str("metadata")?,
                    commit_ms: r.i64("commit time")?,
                })
            })?,
        })
    })
}

impl OffsetFetchResponse {
    pub fn encode(&self, w: &mut Writer) {
        w.u16(self.error.code());
        put_committed(w, &self.topics);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(OffsetFetchResponse { error: error_code(r, "error")?, topics: get_committed(r)? })
    }
}

// ---------------------------------------------------------------------------------------------
// ListGroups / DescribeGroup

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    pub group_id: String,
    /// `empty` (offsets only), `reconciling` (members moving partitions) or `stable`.
    pub state: String,
    pub members: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListGroupsResponse {
    pub error: ErrorCode,
    pub groups: Vec<GroupListing>,
}

impl ListGroupsResponse {
    pub fn encode(&self, w: &mut Writer) {
        w.u16(self.error.code());
        w.array(&self.groups, |w, g| {
            w.str(&g.group_id).str(&g.state).u32(g.members);
        });
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(ListGroupsResponse {
            error: error_code(r, "error")?,
            groups: r.array("groups", 8, |r| {
                Ok(GroupListing {
                    group_id: r.str("group id")?,
                    state: r.str("state")?,
                    members: r.u32("members")?,
                })
            })?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeGroupRequest {
    pub group_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub client_id: String,
    pub member_epoch: i32,
    pub subscribed_topics: Vec<String>,
    /// Partitions the member owns now.
    pub assigned: Vec<TopicPartitions>,
    /// Partitions the member was asked to give up and has not yet.
    pub revoking: Vec<TopicPartitions>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeGroupResponse {
    pub error: ErrorCode,
    pub group_id: String,
    pub state: String,
    pub group_epoch: i32,
    pub members: Vec<MemberDescription>,
    pub offsets: Vec<TopicData<CommittedOffset>>,
}

/// DeleteGroup (13): removes an empty group and its committed offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteGroupRequest {
    pub group_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteGroupResponse {
    pub error: ErrorCode,
}

impl DeleteGroupRequest {
    pub fn encode(&self, w: &mut Writer) {
        w.str(&self.group_id);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DeleteGroupRequest { group_id: r.str("group id")? })
    }
}

impl DeleteGroupResponse {
    pub fn encode(&self, w: &mut Writer) {
        w.u16(self.error.code());
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DeleteGroupResponse { error: error_code(r, "error")? })
    }
}

impl DescribeGroupRequest {
    pub fn encode(&self, w: &mut Writer) {
        w.str(&self.group_id);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DescribeGroupRequest { group_id: r.str("group id")? })
    }
}

impl DescribeGroupResponse {
    pub fn encode(&self, w: &mut Writer) {
        w.u16(self.error.code()).str(&self.group_id).str(&self.state).i32(self.group_epoch);
        w.array(&self.members, |w, m| {
            w.str(&m.member_id).str(&m.client_id).i32(m.member_epoch);
            put_strings(w, &m.subscribed_topics);
            put_topic_partitions(w, &m.assigned);
            put_topic_partitions(w, &m.revoking);
        });
        put_committed(w, &self.offsets);
    }

    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DescribeGroupResponse {
            error: error_code(r, "error")?,
            group_id: r.str("group id")?,
            state: r.str("state")?,
            group_epoch: r.i32("group epoch")?,
            members: r.array("members", 20, |r| {
                Ok(MemberDescription {
                    member_id: r.str("member id")?,
                    client_id: r.str("client id")?,
                    member_epoch: r.i32("member epoch")?,
                    subscribed_topics: get_strings(r, "subscribed topics")?,
                    assigned: get_topic_partitions(r, "assigned")?,
                    revoking: get_topic_partitions(r, "revoking")?,
                })
            })?,
            offsets: get_committed(r)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: PartialEq + std::fmt::Debug>(
        value: &T,
        encode: impl Fn(&T, &mut Writer),
        decode: impl Fn(&mut Reader<'_>) -> Result<T, DecodeError>,
    ) {
        let mut w = Writer::new();
        encode(value, &mut w);
        let bytes = w.buf.freeze();
        let mut r = Reader::new(&bytes);
        assert_eq!(&decode(&mut r).unwrap(), value);
        r.finish().unwrap();
        // Every strict prefix fails to decode (or decodes to something else), never panics.
        for cut in 0..bytes.len() {
            let mut r = Reader::new(&bytes[..cut]);
            if let Ok(decoded) = decode(&mut r) {
                assert_ne!(&decoded, value, "a {cut}-byte prefix decoded to the whole value");
            }
        }
    }

    fn tp(topic: &str, partitions: &[u32]) -> TopicPartitions {
        TopicPartitions { topic: topic.into(), partitions: partitions.to_vec() }
    }

    #[test]
    fn group_bodies_round_trip() {
        round_trip(
            &InitProducerIdResponse { error: ErrorCode::None, producer_id: 7, producer_epoch: 2 },
            InitProducerIdResponse::encode,
            InitProducerIdResponse::decode,
        );
        round_trip(
            &HeartbeatRequest {
                group_id: "g".into(),
                member_id: "m-1".into(),
                member_epoch: 4,
                client_id: "c".into(),
                session_timeout_ms: 10_000,
                rebalance_timeout_ms: 30_000,
                subscribed_topics: vec!["a".into(), "b".into()],
                owned: vec![tp("a", &[0, 2]), tp("b", &[])],
            },
            HeartbeatRequest::encode,
            HeartbeatRequest::decode,
        );
        round_trip(
            &HeartbeatResponse {
                error: ErrorCode::None,
                error_message: String::new(),
                member_id: "m-1".into(),
                member_epoch: 5,
                heartbeat_interval_ms: 1000,
                assignment: vec![tp("a", &[1])],
            },
            HeartbeatResponse::encode,
            HeartbeatResponse::decode,
        );
        round_trip(
            &OffsetCommitRequest {
                group_id: "g".into(),
                member_id: String::new(),
                member_epoch: ADMIN_EPOCH,
                topics: vec![TopicData {
                    name: "a".into(),
                    partitions: vec![CommitPartition { partition: 3, offset: 99, metadata: "x".into() }],
                }],
            },
            OffsetCommitRequest::encode,
            OffsetCommitRequest::decode,
        );
        round_trip(
            &OffsetFetchRequest { group_id: "g".into(), topics: None },
            OffsetFetchRequest::encode,
            OffsetFetchRequest::decode,
        );
        round_trip(
            &OffsetFetchRequest { group_id: "g".into(), topics: Some(vec![tp("a", &[0])]) },
            OffsetFetchRequest::encode,
            OffsetFetchRequest::decode,
        );
        round_trip(
            &DescribeGroupResponse {
                error: ErrorCode::None,
                group_id: "g".into(),
                state: "stable".into(),
                group_epoch: 3,
                members: vec![MemberDescription {
                    member_id: "m".into(),
                    client_id: "c".into(),
                    member_epoch: 3,
                    subscribed_topics: vec!["a".into()],
                    assigned: vec![tp("a", &[0, 1])],
                    revoking: vec![],
                }],
                offsets: vec![TopicData {
                    name: "a".into(),
                    partitions: vec![CommittedOffset {
                        partition: 0,
                        offset: 5,
                        metadata: String::new(),
                        commit_ms: 1,
                    }],
                }],
            },
            DescribeGroupResponse::encode,
            DescribeGroupResponse::decode,
        );
        round_trip(
            &DeleteGroupRequest { group_id: "g".into() },
            DeleteGroupRequest::encode,
            DeleteGroupRequest::decode,
        );
        round_trip(
            &DeleteGroupResponse { error: ErrorCode::GroupNotEmpty },
            DeleteGroupResponse::encode,
            DeleteGroupResponse::decode,
        );
    }
}
