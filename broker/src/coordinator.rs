//! The consumer-group side of a shard: serving group requests for the groups it coordinates
//! (state in [`crate::groups`], durable offsets in [`crate::offsets`]), expiring members and
//! compacting the offsets logs it owns.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use skein_net::{
    encode_response, ErrorCode, GroupListing, ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse,
    OffsetFetchRequest, OffsetFetchResponse, PartitionError, TopicData, Writer,
};
use skein_storage::StorageError;

use crate::groups::{self, Committed, Tp};
use crate::mesh;
use crate::offsets::{
    self, OffsetChange, OffsetsPartition, OffsetsState, OFFSETS_LOG_NAME, OFFSETS_PARTITIONS,
};
use crate::router::place;
use crate::shard::{GroupOp, Shard};

/// How often each shard looks for expired members and offsets logs to compact.
const COORDINATOR_TICK: Duration = Duration::from_millis(100);

fn body(encode: impl FnOnce(&mut Writer)) -> BytesMut {
    let mut w = Writer::new();
    encode(&mut w);
    w.buf
}

impl Shard {
    /// The shard that coordinates `group`.
    pub fn group_owner(&self, group: &str) -> usize {
        place(OFFSETS_LOG_NAME, offsets::partition_for_group(group), self.shards).index()
    }

    /// Opens the offsets partitions this shard owns and restores their groups' offsets.
    pub async fn open_offsets(&self) -> Result<(), StorageError> {
        for partition in 0..OFFSETS_PARTITIONS {
            if place(OFFSETS_LOG_NAME, partition, self.shards).index() != self.id {
                continue;
            }
            let (opened, state) = OffsetsPartition::open(&self.config.data_dir, partition).await?;
            let mut coordinator = self.coordinator.borrow_mut();
            for (group, offsets) in state {
                coordinator.group_mut(&group).offsets = offsets;
            }
            self.offsets.borrow_mut().insert(partition, Rc::new(opened));
        }
        Ok(())
    }

    fn partition_count(&self, topic: &str) -> Option<u32> {
        self.topics().get(topic).map(|config| config.partitions)
    }

    /// Runs a group request on this (the coordinator) shard; returns the encoded body.
    pub async fn group_op(self: &Rc<Self>, op: GroupOp) -> BytesMut {
        match op {
            GroupOp::Heartbeat(request) => {
                let sizes = |topic: &str| self.partition_count(topic);
                let response = self.coordinator.borrow_mut().heartbeat(&request, &sizes, Instant::now());
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
        let tps: Vec<Tp> = request
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(move |p| (t.name.clone(), p.partition)))
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
                if codes[index].is_ok() && self.partition_count(&topic.name).is_none_or(|n| p.partition >= n)
                {
                    codes[index] = ErrorCode::UnknownTopicOrPartition;
                }
                if codes[index].is_ok() && p.metadata.len() > offsets::METADATA_BYTES_MAX {
                    codes[index] = ErrorCode::InvalidConfig;
                }
                if codes[index].is_ok() {
                    let committed =
                        Committed { offset: p.offset, metadata: p.metadata.clone(), commit_ms: now };
                    changes.push(((topic.name.clone(), p.partition), Some(committed)));
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
                let code = crate::shard::storage_error_code(&error);
                return respond_all(code);
            }
        }
        respond(&codes, ErrorCode::None)
    }

    fn fetch_offsets(&self, request: &OffsetFetchRequest) -> OffsetFetchResponse {
        if let Err(error) = groups::validate_group_id(&request.group_id) {
            return OffsetFetchResponse { error, topics: Vec::new() };
        }
        let coordinator = self.coordinator.borrow();
        let empty = BTreeMap::new();
        let committed = coordinator.group(&request.group_id).map_or(&empty, |g| &g.offsets);
        let topics = match &request.topics {
            None => offsets::committed_to_wire(committed.iter()),
            Some(wanted) => wanted
                .iter()
                .map(|t| TopicData {
                    name: t.topic.clone(),
                    partitions: t
                        .partitions
                        .iter()
                        .map(|&p| offsets::committed_offset(p, committed.get(&(t.topic.clone(), p))))
                        .collect(),
                })
                .collect(),
        };
        OffsetFetchResponse { error: ErrorCode::None, topics }
    }

    /// Forwards a group request to the group's coordinator shard; returns the response frame.
    pub async fn request_group_op(self: &Rc<Self>, correlation_id: u32, op: GroupOp) -> BytesMut {
        let target = self.group_owner(op.group_id());
        match self.call(target, mesh::Group(op)).await {
            Ok(body) => encode_response(correlation_id, |w| w.buf.extend_from_slice(&body)),
            Err(error) => {
                tracing::debug!(%error, "a group request did not reach its coordinator");
                skein_net::frame::encode_error_response(correlation_id, error.code())
            }
        }
    }

    /// Every group of every shard.
    pub async fn request_list_groups(self: &Rc<Self>) -> ListGroupsResponse {
        let calls: Vec<_> = (0..self.shards).map(|target| self.call(target, mesh::ListGroups)).collect();
        let mut groups: Vec<GroupListing> = Vec::new();
        for (target, reply) in futures::future::join_all(calls).await.into_iter().enumerate() {
            match reply {
                Ok(found) => groups.extend(found),
                Err(error) => {
                    // A stopping shard's groups are left out; say so rather than pretend.
                    tracing::warn!(shard = target, %error, "listing groups: a shard did not answer");
                    return ListGroupsResponse { error: error.code(), groups: Vec::new() };
                }
            }
        }
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        ListGroupsResponse { error: ErrorCode::None, groups }
    }

    /// The live offsets of one offsets partition.
    fn offsets_state(&self, partition: u32) -> OffsetsState {
        self.coordinator
            .borrow()
            .groups
            .values()
            .filter(|g| offsets::partition_for_group(&g.id) == partition && !g.offsets.is_empty())
            .map(|g| (g.id.clone(), g.offsets.clone()))
            .collect()
    }
}

/// Expires members and compacts offsets logs, until the shard shuts down.
pub async fn coordinator_loop(shard: Rc<Shard>) {
    loop {
        glommio::timer::sleep(COORDINATOR_TICK).await;
        if shard.shutting_down.get() {
            return;
        }
        {
            let sizes = |topic: &str| shard.topics().get(topic).map(|c| c.partitions);
            shard.coordinator.borrow_mut().expire(&sizes, Instant::now());
        }
        let partitions: Vec<Rc<OffsetsPartition>> = shard.offsets.borrow().values().cloned().collect();
        for partition in partitions {
            if partition.needs_compaction() {
                let id = partition.partition;
                if let Err(error) = partition.compact(|| shard.offsets_state(id)).await {
                    tracing::warn!(partition = id, %error, "compacting the offsets log failed");
                }
            }
        }
    }
}
