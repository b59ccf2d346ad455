//! The consumer-group side of a shard: opening the offsets partitions it owns, forwarding
//! group requests to the group's coordinator shard, listing the groups of every shard, and
//! expiring members and compacting offsets logs.
//!
//! Free functions over the [`Shard`]: this module depends on `shard.rs`, which does not depend
//! on it (the shard holds the group state as [`super::state::Coordinator`] and serves the
//! requests that reach it through [`super::service::GroupService`]).

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use skein_net::{encode_response, ErrorCode, GroupListing, ListGroupsResponse};
use skein_storage::StorageError;

use super::offsets::{self, OffsetsPartition, OFFSETS_LOG_NAME, OFFSETS_PARTITIONS};
use super::service::{GroupOp, GroupService};
use crate::mesh;
use crate::router::place;
use crate::shard::Shard;

/// How often each shard looks for expired members and offsets logs to compact.
const COORDINATOR_TICK: Duration = Duration::from_millis(100);

/// The shard that coordinates `group`.
pub fn group_owner(shard: &Shard, group: &str) -> usize {
    place(OFFSETS_LOG_NAME, offsets::partition_for_group(group), shard.shards).index()
}

/// Opens the offsets partitions `shard` owns and restores their groups' offsets.
pub async fn open_offsets(shard: &Shard) -> Result<(), StorageError> {
    for partition in 0..OFFSETS_PARTITIONS {
        if place(OFFSETS_LOG_NAME, partition, shard.shards).index() != shard.id {
            continue;
        }
        let (opened, state) = OffsetsPartition::open(&shard.config.data_dir, partition).await?;
        let mut coordinator = shard.coordinator.borrow_mut();
        for (group, offsets) in state {
            coordinator.group_mut(&group).offsets = offsets;
        }
        shard.offsets.borrow_mut().insert(partition, Rc::new(opened));
    }
    Ok(())
}

/// Forwards a group request to the group's coordinator shard; returns the response frame.
pub async fn request_group_op(shard: &Rc<Shard>, correlation_id: u32, op: GroupOp) -> BytesMut {
    let target = group_owner(shard, op.group_id());
    match shard.call(target, mesh::Group(op)).await {
        Ok(body) => encode_response(correlation_id, |w| w.buf.extend_from_slice(&body)),
        Err(error) => {
            tracing::debug!(%error, "a group request did not reach its coordinator");
            skein_net::frame::encode_error_response(correlation_id, error.code())
        }
    }
}

/// Every group of every shard.
pub async fn request_list_groups(shard: &Rc<Shard>) -> ListGroupsResponse {
    let calls: Vec<_> = (0..shard.shards).map(|target| shard.call(target, mesh::ListGroups)).collect();
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

/// Expires members and compacts offsets logs, until the shard shuts down.
pub async fn coordinator_loop(shard: Rc<Shard>) {
    let sizes = |topic: &str| shard.topics().get(topic).map(|c| c.partitions);
    let service = GroupService { coordinator: &shard.coordinator, offsets: &shard.offsets, topics: &sizes };
    loop {
        glommio::timer::sleep(COORDINATOR_TICK).await;
        if shard.shutting_down.get() {
            return;
        }
        service.expire(Instant::now());
        let partitions: Vec<Rc<OffsetsPartition>> = shard.offsets.borrow().values().cloned().collect();
        for partition in partitions {
            if partition.needs_compaction() {
                let id = partition.partition;
                if let Err(error) = partition.compact(|| service.offsets_state(id)).await {
                    tracing::warn!(partition = id, %error, "compacting the offsets log failed");
                }
            }
        }
    }
}
