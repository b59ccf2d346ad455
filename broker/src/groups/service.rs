//! Serving group requests on the group's coordinator shard: [`GroupService`] runs a
//! [`GroupOp`] against the groups the shard coordinates ([`super::state`]) and the offsets
//! partitions it owns ([`super::offsets`]).
//!
//! It borrows what it needs from the shard (the group state it holds, and the partition counts
//! of its topics) and does not know the shard itself: `shard.rs` dispatches a `GroupOp` that
//! arrived through the mesh to [`GroupService::serve`], and the shard-facing side (forwarding
//! to the coordinator shard, the expiry and compaction loop) is `coordinator.rs`.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Instant;

use bytes::BytesMut;
use skein_net::{
    ErrorCode, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    PartitionError, TopicData, TopicPartition, Writer,
};

use super::offsets::{self, OffsetChange, OffsetsPartition, OffsetsState};
use super::state::{self, Committed, Coordinator, TopicSizes};
use crate::errors::storage_error_code;

/// A consumer-group request, run on the group's coordinator shard.
#[derive(Debug)]
pub enum GroupOp {
    Heartbeat(skein_net::HeartbeatRequest),
    Commit(skein_net::OffsetCommitRequest),
    FetchOffsets(skein_net::OffsetFetchRequest),
    Describe(String),
    /// Remove an empty group and its committed offsets.
    Delete(String),
}

impl GroupOp {
    pub fn group_id(&self) -> &str {
        match self {
            GroupOp::Heartbeat(r) => &r.group_id,
            GroupOp::Commit(r) => &r.group_id,
            GroupOp::FetchOffsets(r) => &r.group_id,
            GroupOp::Describe(group) => group,
            GroupOp::Delete(group) => group,
        }
    }
}

fn body(encode: impl FnOnce(&mut Writer)) -> BytesMut {
    let mut w = Writer::new();
    encode(&mut w);
    w.buf
}

/// The groups one shard coordinates, as borrowed from that shard.
pub struct GroupService<'a> {
    /// The groups' state.
    pub coordinator: &'a RefCell<Coordinator>,
    /// The offsets partitions the shard owns, by partition.
    pub offsets: &'a RefCell<HashMap<u32, Rc<OffsetsPartition>>>,
    /// Partition counts of the shard's topics (asked afresh at each use).
    pub topics: &'a dyn TopicSizes,
}

impl GroupService<'_> {
    /// Runs a group request on this (the coordinator) shard; returns the encoded body.
    pub async fn serve(&self, op: GroupOp) -> BytesMut {
        match op {
            GroupOp::Heartbeat(request) => {
                let response = self.coordinator.borrow_mut().heartbeat(&request, self.topics, Instant::now());
                body(|w| response.encode(w))
            }
            GroupOp::Commit(request) => {
                let response = self.commit(request).await;
                body(|w| response.encode(w))
            }
            GroupOp::FetchOffsets(request) => {
                let response = self.fetch_offsets(&request);
                body(|w| response.encode(w))
            }
            GroupOp::Describe(group) => {
                let response = self.coordinator.borrow().describe(&group);
                body(|w| response.encode(w))
            }
            GroupOp::Delete(group) => {
                let response = skein_net::DeleteGroupResponse { error: self.delete(&group).await };
                body(|w| response.encode(w))
            }
        }
    }

    /// Deletes a group without members: tombstones for every committed offset (durable before
    /// the answer), then the group is forgotten. A member that joins while the tombstones are
    /// written keeps the group (without offsets).
    async fn delete(&self, group_id: &str) -> ErrorCode {
        if let Err(error) = state::validate_group_id(group_id) {
            return error;
        }
        let changes: Vec<OffsetChange> = {
            let coordinator = self.coordinator.borrow();
            let Some(group) = coordinator.groups.get(group_id) else { return ErrorCode::GroupIdNotFound };
            if !group.members.is_empty() {
                return ErrorCode::GroupNotEmpty;
            }
            group.offsets.keys().map(|tp| (tp.clone(), None)).collect()
        };
        let forget = || {
            let mut coordinator = self.coordinator.borrow_mut();
            if let Some(group) = coordinator.groups.get_mut(group_id) {
                group.offsets.clear();
                if group.members.is_empty() {
                    coordinator.groups.remove(group_id);
                }
            }
        };
        if changes.is_empty() {
            forget();
            return ErrorCode::None;
        }
        let partition = offsets::partition_for_group(group_id);
        let Some(log) = self.offsets.borrow().get(&partition).cloned() else {
            return ErrorCode::ShuttingDown;
        };
        match log.commit(group_id, &changes, forget).await {
            Ok(()) => {
                tracing::info!(group = group_id, offsets = changes.len(), "group deleted");
                ErrorCode::None
            }
            Err(error) => {
                tracing::warn!(group = group_id, %error, "deleting a group failed");
                storage_error_code(&error)
            }
        }
    }

    async fn commit(&self, request: OffsetCommitRequest) -> OffsetCommitResponse {
        // The response: one code per partition, in request order.
        let respond = |codes: &[ErrorCode], error: ErrorCode| {
            let mut codes = codes.iter();
            OffsetCommitResponse {
                error,
                topics: request
                    .topics
                    .iter()
                    .map(|t| TopicData {
                        name: t.name.clone(),
                        partitions: t
                            .partitions
                            .iter()
                            .map(|p| PartitionError {
                                partition: p.partition,
                                error: codes.next().copied().unwrap_or(error),
                            })
                            .collect(),
                    })
                    .collect(),
            }
        };
        let respond_all = |error: ErrorCode| respond(&[], error);
        let tps: Vec<TopicPartition> = request
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(move |p| TopicPartition::new(t.name.as_str(), p.partition)))
            .collect();
        let checked = self.coordinator.borrow().check_commit(
            &request.group_id,
            &request.member_id,
            request.member_epoch,
            &tps,
        );
        let mut codes = match checked {
            Ok(codes) => codes,
            Err(code) => return respond_all(code),
        };
        let now = skein_storage::now_ms();
        let mut changes: Vec<OffsetChange> = Vec::new();
        let mut index = 0;
        for topic in &request.topics {
            for p in &topic.partitions {
                if codes[index].is_ok()
                    && self.topics.partitions(&topic.name).is_none_or(|n| p.partition >= n)
                {
                    codes[index] = ErrorCode::UnknownTopicOrPartition;
                }
                if codes[index].is_ok() && p.metadata.len() > offsets::METADATA_BYTES_MAX {
                    codes[index] = ErrorCode::InvalidConfig;
                }
                if codes[index].is_ok() {
                    let committed =
                        Committed { offset: p.offset, metadata: p.metadata.clone(), commit_ms: now };
                    changes.push((tps[index].clone(), Some(committed)));
                }
                index += 1;
            }
        }
        if !changes.is_empty() {
            let partition = offsets::partition_for_group(&request.group_id);
            let Some(log) = self.offsets.borrow().get(&partition).cloned() else {
                return respond_all(ErrorCode::ShuttingDown);
            };
            let apply = || {
                let mut coordinator = self.coordinator.borrow_mut();
                let offsets = &mut coordinator.group_mut(&request.group_id).offsets;
                for (tp, committed) in &changes {
                    match committed {
                        Some(committed) => offsets.insert(tp.clone(), committed.clone()),
                        None => offsets.remove(tp),
                    };
                }
            };
            if let Err(error) = log.commit(&request.group_id, &changes, apply).await {
                tracing::warn!(group = request.group_id, %error, "committing offsets failed");
                let code = storage_error_code(&error);
                return respond_all(code);
            }
        }
        respond(&codes, ErrorCode::None)
    }

    fn fetch_offsets(&self, request: &OffsetFetchRequest) -> OffsetFetchResponse {
        if let Err(error) = state::validate_group_id(&request.group_id) {
            return OffsetFetchResponse { error, topics: Vec::new() };
        }
        let coordinator = self.coordinator.borrow();
        let empty = BTreeMap::new();
        let committed = coordinator.group(&request.group_id).map_or(&empty, |g| &g.offsets);
        let topics = match &request.topics {
            None => state::committed_to_wire(committed.iter()),
            Some(wanted) => wanted
                .iter()
                .map(|t| TopicData {
                    name: t.topic.clone(),
                    partitions: t
                        .partitions
                        .iter()
                        .map(|&p| {
                            state::committed_offset(
                                p,
                                committed.get(&TopicPartition::new(t.topic.as_str(), p)),
                            )
                        })
                        .collect(),
                })
                .collect(),
        };
        OffsetFetchResponse { error: ErrorCode::None, topics }
    }

    /// Removes members whose session or revocation deadline passed.
    pub fn expire(&self, now: Instant) {
        self.coordinator.borrow_mut().expire(self.topics, now);
    }

    /// The live offsets of one offsets partition.
    pub fn offsets_state(&self, partition: u32) -> OffsetsState {
        self.coordinator
            .borrow()
            .groups
            .values()
            .filter(|g| offsets::partition_for_group(&g.id) == partition && !g.offsets.is_empty())
            .map(|g| (g.id.clone(), g.offsets.clone()))
            .collect()
    }
}
