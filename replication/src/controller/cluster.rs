//! The controller's cluster state and rules, without I/O: brokers (registration, epochs,
//! heartbeats, fencing on session expiry), partitions (replicas, ISR, eligible leader replicas,
//! leader, leader and partition epochs), placement of replicas, validation of every
//! `AlterPartition` in the order of DESIGN-CLUSTER.md section 4, and leader election from the
//! ISR, then the ELR, never from a fenced, shutting-down or unclean broker.
//!
//! Every decision returns the changes it made ([`PartitionChange`]); the Raft shell will turn
//! them into records and apply them after commit. Time is passed in.

use std::collections::BTreeMap;

use skein_net::types::{BrokerEpoch, LeaderEpoch, NodeId, PartitionEpoch, TopicPartition};

/// The controller's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerConfig {
    /// A broker silent for this long is fenced.
    pub session_timeout_ms: u64,
    pub min_insync: usize,
    /// Test-only switch (always on outside tests): `AlterPartition` is checked against the
    /// partition's leader epoch, leader and partition epoch (KIP-841). Off, a leader's stale
    /// proposal made before a leader change is applied after it, so a scenario can show what
    /// that loses.
    #[doc(hidden)]
    pub check_alter_epochs: bool,
}

impl Default for ControllerConfig {
    fn default() -> ControllerConfig {
        ControllerConfig { session_timeout_ms: 3_000, min_insync: 2, check_alter_epochs: true }
    }
}

/// One registered broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub epoch: BrokerEpoch,
    pub fenced: bool,
    pub shutting_down: bool,
    /// It came back from an unclean shutdown and has not caught up yet: in no ISR or ELR.
    pub unclean: bool,
    pub last_heartbeat_ms: u64,
}

impl Broker {
    fn eligible(&self) -> bool {
        !self.fenced && !self.shutting_down && !self.unclean
    }
}

/// One partition's replication state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub replicas: Vec<NodeId>,
    pub isr: Vec<NodeId>,
    /// Eligible leader replicas (KIP-966): removed from the ISR while it was below
    /// min.insync.replicas, so they hold everything below the frozen high watermark.
    pub elr: Vec<NodeId>,
    pub leader: Option<NodeId>,
    pub leader_epoch: LeaderEpoch,
    pub partition_epoch: PartitionEpoch,
}

/// A partition's state after a change (the record the Raft shell commits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionChange {
    pub tp: TopicPartition,
    pub partition: Partition,
}

impl PartitionChange {
    /// The metadata record that commits this change.
    pub fn to_record(&self) -> crate::metadata::MetadataRecord {
        let p = &self.partition;
        crate::metadata::MetadataRecord::PartitionChanged {
            tp: self.tp.clone(),
            state: crate::metadata::record::PartitionState {
                leader: p.leader,
                leader_epoch: p.leader_epoch,
                partition_epoch: p.partition_epoch,
                replicas: p.replicas.clone(),
                isr: p.isr.clone(),
                elr: p.elr.clone(),
            },
        }
    }
}

/// Why a request to the controller is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    #[error("unknown topic or partition")]
    UnknownTopicOrPartition,
    #[error("the request carries epochs newer than this controller's: it is not the controller")]
    NotController,
    #[error("the leader epoch is older than the partition's")]
    FencedLeaderEpoch,
    #[error("invalid request")]
    InvalidRequest,
    #[error("the partition epoch is older than the partition's")]
    InvalidUpdateVersion,
    #[error("a proposed ISR member is not registered, is fenced, shutting down or at a stale broker epoch")]
    IneligibleReplica,
    #[error("the broker epoch is not the broker's current one")]
    StaleBrokerEpoch,
    #[error("replication factor larger than the brokers available")]
    InvalidReplicationFactor,
}

/// Brokers and partitions, and the rules that change them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    pub config: ControllerConfig,
    pub brokers: BTreeMap<NodeId, Broker>,
    pub partitions: BTreeMap<TopicPartition, Partition>,
}

impl Cluster {
    pub fn new(config: ControllerConfig) -> Cluster {
        Cluster { config, ..Cluster::default() }
    }

    /// Registers (or re-registers) a broker, fenced, at `epoch` (the Raft index of its
    /// registration). `unclean`: it did not shut down cleanly and may have lost unsynced data.
    pub fn register(
        &mut self,
        node: NodeId,
        epoch: BrokerEpoch,
        unclean: bool,
        now_ms: u64,
    ) -> Vec<PartitionChange> {
        // A broker that registers again is a new incarnation (it restarted, perhaps before its
        // session expired): what it led or held in an ISR under its old epoch is taken from it
        // now, as if it had been fenced, so it never leads an epoch again with a log it may
        // have lost part of. (The simulator found this: a leader that crashed and re-registered
        // within its session led the same epoch twice, with different records.)
        let previous = self.brokers.insert(
            node,
            Broker { epoch, fenced: true, shutting_down: false, unclean, last_heartbeat_ms: now_ms },
        );
        if previous.is_some() || unclean {
            // Out of leadership and every ISR (and, unclean, the ELR) until it catches up.
            return self.change_all(|tp, p, cluster| cluster.without(tp, p, node));
        }
        Vec::new()
    }

    /// A heartbeat: the broker is unfenced once it has applied the metadata up to its own
    /// registration (`applied >= epoch`).
    pub fn heartbeat(
        &mut self,
        node: NodeId,
        epoch: BrokerEpoch,
        applied: u64,
        now_ms: u64,
    ) -> Result<Vec<PartitionChange>, ControllerError> {
        let broker = self.brokers.get_mut(&node).ok_or(ControllerError::StaleBrokerEpoch)?;
        if broker.epoch != epoch {
            return Err(ControllerError::StaleBrokerEpoch);
        }
        broker.last_heartbeat_ms = now_ms;
        if broker.fenced && applied >= epoch.0 {
            broker.fenced = false;
            // Partitions with no leader may elect it now.
            return Ok(self.change_all(|tp, p, cluster| cluster.reelect_if_offline(tp, p)));
        }
        Ok(Vec::new())
    }

    /// Fences the brokers whose session expired, moves leadership away from them and takes
    /// them out of every ISR.
    pub fn tick(&mut self, now_ms: u64) -> Vec<PartitionChange> {
        let timeout = self.config.session_timeout_ms;
        let expired: Vec<NodeId> = self
            .brokers
            .iter()
            .filter(|(_, b)| !b.fenced && now_ms.saturating_sub(b.last_heartbeat_ms) > timeout)
            .map(|(&node, _)| node)
            .collect();
        let mut changes = Vec::new();
        for node in expired {
            self.brokers.get_mut(&node).expect("listed").fenced = true;
            changes.extend(self.change_all(|tp, p, cluster| cluster.without(tp, p, node)));
        }
        changes
    }

    /// Places `count` partitions of `topic` with `replication_factor` replicas each over the
    /// unfenced brokers (consecutive partitions start on consecutive brokers) and elects their
    /// first leaders.
    pub fn create_partitions(
        &mut self,
        topic: &str,
        count: u32,
        replication_factor: usize,
    ) -> Result<Vec<PartitionChange>, ControllerError> {
        let brokers: Vec<NodeId> =
            self.brokers.iter().filter(|(_, b)| b.eligible()).map(|(&n, _)| n).collect();
        if replication_factor == 0 || replication_factor > brokers.len() {
            return Err(ControllerError::InvalidReplicationFactor);
        }
        let mut changes = Vec::new();
        for p in 0..count {
            let replicas: Vec<NodeId> =
                (0..replication_factor).map(|r| brokers[(p as usize + r) % brokers.len()]).collect();
            let partition = Partition {
                leader: replicas.first().copied(),
                isr: replicas.clone(),
                replicas,
                elr: Vec::new(),
                leader_epoch: LeaderEpoch(0),
                partition_epoch: PartitionEpoch(0),
            };
            let tp = TopicPartition::new(topic, p);
            self.partitions.insert(tp.clone(), partition.clone());
            changes.push(PartitionChange { tp, partition });
        }
        Ok(changes)
    }

    /// A leader's request to change a partition's ISR, checked in the design's order; the
    /// members come with the broker epochs the leader saw.
    pub fn alter_partition(
        &mut self,
        tp: &TopicPartition,
        from: NodeId,
        leader_epoch: LeaderEpoch,
        partition_epoch: PartitionEpoch,
        isr: &[(NodeId, BrokerEpoch)],
    ) -> Result<PartitionChange, ControllerError> {
        let partition = self.partitions.get(tp).ok_or(ControllerError::UnknownTopicOrPartition)?;
        let checked = self.config.check_alter_epochs;
        if checked && (leader_epoch > partition.leader_epoch || partition_epoch > partition.partition_epoch) {
            return Err(ControllerError::NotController);
        }
        if checked && leader_epoch < partition.leader_epoch {
            return Err(ControllerError::FencedLeaderEpoch);
        }
        if checked && partition.leader != Some(from) {
            return Err(ControllerError::InvalidRequest);
        }
        if checked && partition_epoch < partition.partition_epoch {
            return Err(ControllerError::InvalidUpdateVersion);
        }
        if isr.iter().any(|(node, _)| !partition.replicas.contains(node))
            || !isr.iter().any(|(node, _)| *node == from)
        {
            return Err(ControllerError::InvalidRequest);
        }
        let ineligible = isr.iter().any(|(node, epoch)| {
            self.brokers
                .get(node)
                .is_none_or(|b| b.fenced || b.shutting_down || b.unclean || b.epoch != *epoch)
        });
        if ineligible {
            return Err(ControllerError::IneligibleReplica);
        }
        let mut next = partition.clone();
        let new_isr: Vec<NodeId> =
            next.replicas.iter().copied().filter(|r| isr.iter().any(|(n, _)| n == r)).collect();
        self.move_to_elr(&mut next, &new_isr);
        next.isr = new_isr;
        next.partition_epoch = PartitionEpoch(next.partition_epoch.0 + 1);
        self.partitions.insert(tp.clone(), next.clone());
        Ok(PartitionChange { tp: tp.clone(), partition: next })
    }

    /// The leader to elect for a partition: from the ISR (the current leader first, then in
    /// replica order), or from the ELR when the ISR has no eligible member; never a fenced,
    /// shutting-down or unclean broker. `None`: the partition goes offline.
    pub fn elect(&self, partition: &Partition) -> Option<NodeId> {
        let eligible = |node: &NodeId| self.brokers.get(node).is_some_and(Broker::eligible);
        let in_order = |set: &[NodeId]| -> Option<NodeId> {
            if let Some(leader) = partition.leader.filter(|l| set.contains(l) && eligible(l)) {
                return Some(leader);
            }
            partition.replicas.iter().copied().find(|r| set.contains(r) && eligible(r))
        };
        in_order(&partition.isr).or_else(|| in_order(&partition.elr))
    }

    /// Members leaving the ISR while it is (or falls) below min ISR join the ELR; once the ISR
    /// reaches min ISR again the ELR empties.
    fn move_to_elr(&self, next: &mut Partition, new_isr: &[NodeId]) {
        if new_isr.len() >= self.config.min_insync {
            next.elr.clear();
            return;
        }
        for node in next.isr.clone() {
            if !new_isr.contains(&node) && !next.elr.contains(&node) {
                let clean = self.brokers.get(&node).is_some_and(|b| !b.unclean);
                if clean {
                    next.elr.push(node);
                }
            }
        }
        next.elr.retain(|n| !new_isr.contains(n));
    }

    /// `partition` without `node` in its ISR or leadership (a fenced or unclean broker).
    fn without(&self, _tp: &TopicPartition, partition: &Partition, node: NodeId) -> Option<Partition> {
        let unclean = self.brokers.get(&node).is_some_and(|b| b.unclean);
        let in_elr = unclean && partition.elr.contains(&node);
        if !partition.isr.contains(&node) && partition.leader != Some(node) && !in_elr {
            return None;
        }
        let mut next = partition.clone();
        let new_isr: Vec<NodeId> = next.isr.iter().copied().filter(|&n| n != node).collect();
        // KIP-966: a member leaving an ISR that is (or falls) below min ISR joins the ELR, the
        // last one standing too: the ISR may empty, and the ELR keeps those clean replicas
        // electable (they hold everything below the frozen high watermark).
        if new_isr.len() < next.isr.len() {
            self.move_to_elr(&mut next, &new_isr);
            next.isr = new_isr;
        }
        if unclean {
            next.elr.retain(|&n| n != node);
        }
        next.leader = partition.leader.filter(|&leader| leader != node);
        self.set_leader(&mut next, partition.leader);
        next.partition_epoch = PartitionEpoch(next.partition_epoch.0 + 1);
        Some(next)
    }

    /// Elects a leader for a partition that has none, if one is eligible now.
    fn reelect_if_offline(&self, _tp: &TopicPartition, partition: &Partition) -> Option<Partition> {
        if partition.leader.is_some() {
            return None;
        }
        self.elect(partition)?;
        let mut next = partition.clone();
        self.set_leader(&mut next, partition.leader);
        next.partition_epoch = PartitionEpoch(next.partition_epoch.0 + 1);
        Some(next)
    }

    /// Elects `next`'s leader; a change from `before` bumps the leader epoch. A leader taken
    /// from the ELR becomes the whole ISR (and leaves the ELR).
    fn set_leader(&self, next: &mut Partition, before: Option<NodeId>) {
        let leader = self.elect(next);
        if let Some(chosen) = leader {
            if !next.isr.contains(&chosen) {
                next.isr = vec![chosen];
                next.elr.retain(|&n| n != chosen);
            }
        }
        next.leader = leader;
        if leader != before {
            next.leader_epoch = LeaderEpoch(next.leader_epoch.0 + 1);
        }
    }

    /// The records that commit a decision made on this cluster: a broker registered (new, or
    /// at a new epoch) or fenced, unfenced or shut down since `before` (the brokers as they
    /// were before the decision), then the partition changes it returned. A controller that
    /// is not the only one (the consensus shard's leader) decides on its state and commits
    /// these through Raft; its followers [`Cluster::replay`] them.
    pub fn records_of(
        &self,
        before: &BTreeMap<NodeId, Broker>,
        changes: &[PartitionChange],
    ) -> Vec<crate::metadata::MetadataRecord> {
        use crate::metadata::MetadataRecord;
        let mut records = Vec::new();
        for (&node, broker) in &self.brokers {
            match before.get(&node) {
                Some(old) if old.epoch == broker.epoch => {
                    if (old.fenced, old.shutting_down) != (broker.fenced, broker.shutting_down) {
                        records.push(MetadataRecord::BrokerChanged {
                            node,
                            fenced: broker.fenced,
                            shutting_down: broker.shutting_down,
                        });
                    }
                }
                _ => {
                    records.push(MetadataRecord::BrokerRegistered {
                        node,
                        epoch: broker.epoch,
                        unclean: broker.unclean,
                    });
                    if !broker.fenced || broker.shutting_down {
                        records.push(MetadataRecord::BrokerChanged {
                            node,
                            fenced: broker.fenced,
                            shutting_down: broker.shutting_down,
                        });
                    }
                }
            }
        }
        records.extend(changes.iter().map(PartitionChange::to_record));
        records
    }

    /// Applies a committed record to this cluster (records of other kinds change nothing
    /// here). A registered broker's session starts at `now_ms`.
    pub fn replay(&mut self, record: &crate::metadata::MetadataRecord, now_ms: u64) {
        use crate::metadata::MetadataRecord;
        match record {
            MetadataRecord::BrokerRegistered { node, epoch, unclean } => {
                let broker = Broker {
                    epoch: *epoch,
                    fenced: true,
                    shutting_down: false,
                    unclean: *unclean,
                    last_heartbeat_ms: now_ms,
                };
                self.brokers.insert(*node, broker);
            }
            MetadataRecord::BrokerChanged { node, fenced, shutting_down } => {
                if let Some(broker) = self.brokers.get_mut(node) {
                    broker.fenced = *fenced;
                    broker.shutting_down = *shutting_down;
                }
            }
            MetadataRecord::PartitionChanged { tp, state } => {
                let partition = Partition {
                    replicas: state.replicas.clone(),
                    isr: state.isr.clone(),
                    elr: state.elr.clone(),
                    leader: state.leader,
                    leader_epoch: state.leader_epoch,
                    partition_epoch: state.partition_epoch,
                };
                self.partitions.insert(tp.clone(), partition);
            }
            MetadataRecord::TopicDeleted { name } => self.partitions.retain(|tp, _| tp.topic() != name),
            MetadataRecord::TopicCreated { .. }
            | MetadataRecord::TopicChanged { .. }
            | MetadataRecord::ProducerIdsReserved { .. } => {}
        }
    }

    /// A new controller leader gives every broker a fresh session: it cannot know when its
    /// predecessor last heard from them (KRaft does the same).
    pub fn restart_sessions(&mut self, now_ms: u64) {
        for broker in self.brokers.values_mut() {
            broker.last_heartbeat_ms = now_ms;
        }
    }

    fn change_all(
        &mut self,
        change: impl Fn(&TopicPartition, &Partition, &Cluster) -> Option<Partition>,
    ) -> Vec<PartitionChange> {
        let changed: Vec<(TopicPartition, Partition)> = self
            .partitions
            .iter()
            .filter_map(|(tp, p)| change(tp, p, self).map(|next| (tp.clone(), next)))
            .collect();
        let mut changes = Vec::with_capacity(changed.len());
        for (tp, partition) in changed {
            self.partitions.insert(tp.clone(), partition.clone());
            changes.push(PartitionChange { tp, partition });
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u32) -> NodeId {
        NodeId(id)
    }

    /// Three live brokers and a topic `t` of one partition replicated on all three, led by 1.
    fn cluster() -> (Cluster, TopicPartition) {
        let mut cluster = Cluster::new(ControllerConfig {
            session_timeout_ms: 3_000,
            min_insync: 2,
            ..ControllerConfig::default()
        });
        for id in 1..=3 {
            cluster.register(n(id), BrokerEpoch(10 + u64::from(id)), false, 0);
            cluster.heartbeat(n(id), BrokerEpoch(10 + u64::from(id)), 100, 0).unwrap();
        }
        let changes = cluster.create_partitions("t", 1, 3).unwrap();
        assert_eq!(changes[0].partition.replicas, vec![n(1), n(2), n(3)]);
        (cluster, TopicPartition::new("t", 0))
    }

    fn members(cluster: &Cluster, ids: &[u32]) -> Vec<(NodeId, BrokerEpoch)> {
        ids.iter().map(|&id| (n(id), cluster.brokers[&n(id)].epoch)).collect()
    }

    #[test]
    fn the_records_of_decisions_rebuild_the_same_cluster_on_a_follower() {
        let (mut leader, tp) = cluster();
        let mut follower = Cluster::new(leader.config);
        let mut log = Vec::new();
        let decide =
            |leader: &mut Cluster, log: &mut Vec<_>, f: &dyn Fn(&mut Cluster) -> Vec<PartitionChange>| {
                let before = leader.brokers.clone();
                let changes = f(leader);
                log.extend(leader.records_of(&before, &changes));
            };
        // The set-up's decisions, as records: three registrations, unfenced, the topic.
        let empty = Cluster::new(leader.config);
        let all: Vec<PartitionChange> = leader
            .partitions
            .iter()
            .map(|(tp, p)| PartitionChange { tp: tp.clone(), partition: p.clone() })
            .collect();
        log.extend(leader.records_of(&empty.brokers, &all));
        // A session expires, the broker registers again, it is unfenced; an ISR change.
        decide(&mut leader, &mut log, &|c| c.tick(10_000));
        decide(&mut leader, &mut log, &|c| c.register(n(2), BrokerEpoch(40), false, 10_000));
        decide(&mut leader, &mut log, &|c| {
            for id in 1..=3 {
                let epoch = c.brokers[&n(id)].epoch;
                c.heartbeat(n(id), epoch, 40, 10_001).unwrap();
            }
            Vec::new()
        });
        decide(&mut leader, &mut log, &|c| {
            let p = c.partitions[&TopicPartition::new("t", 0)].clone();
            let leader = p.leader.unwrap();
            let isr: Vec<_> = [leader]
                .iter()
                .chain(p.replicas.iter().filter(|&&r| r != leader))
                .map(|&r| (r, c.brokers[&r].epoch))
                .collect();
            vec![c
                .alter_partition(
                    &TopicPartition::new("t", 0),
                    leader,
                    p.leader_epoch,
                    p.partition_epoch,
                    &isr,
                )
                .unwrap()]
        });
        assert!(log
            .iter()
            .any(|r| matches!(r, crate::metadata::MetadataRecord::BrokerChanged { fenced: true, .. })));
        assert!(log.iter().any(|r| matches!(
            r,
            crate::metadata::MetadataRecord::BrokerRegistered { epoch: BrokerEpoch(40), .. }
        )));
        for record in &log {
            follower.replay(record, 7);
        }
        assert_eq!(follower.partitions, leader.partitions);
        assert_eq!(follower.partitions[&tp].isr.len(), 3);
        let without_sessions = |c: &Cluster| -> Vec<_> {
            c.brokers.iter().map(|(n, b)| (*n, b.epoch, b.fenced, b.shutting_down, b.unclean)).collect()
        };
        assert_eq!(without_sessions(&follower), without_sessions(&leader));
        // Every record applies to a metadata image (epochs rise, leaders in their ISR).
        let mut image = crate::metadata::MetadataImage::default();
        let topic = crate::metadata::MetadataRecord::TopicCreated {
            name: "t".into(),
            id: skein_net::types::TopicId([5; 16]),
            config: crate::metadata::TopicConfig {
                partitions: 1,
                retention_ms: None,
                retention_bytes: None,
                segment_bytes: 1 << 30,
                segment_ms: None,
                max_message_bytes: 1 << 20,
                created_ms: 0,
            },
        };
        crate::metadata::apply(&mut image, &[topic]).unwrap();
        for record in &log {
            crate::metadata::apply(&mut image, std::slice::from_ref(record)).unwrap();
        }
    }

    #[test]
    fn a_broker_is_unfenced_only_once_it_applied_its_registration() {
        let mut cluster = Cluster::new(ControllerConfig::default());
        cluster.register(n(1), BrokerEpoch(50), false, 0);
        cluster.heartbeat(n(1), BrokerEpoch(50), 49, 10).unwrap();
        assert!(cluster.brokers[&n(1)].fenced);
        cluster.heartbeat(n(1), BrokerEpoch(50), 50, 20).unwrap();
        assert!(!cluster.brokers[&n(1)].fenced);
        assert_eq!(cluster.heartbeat(n(1), BrokerEpoch(49), 60, 30), Err(ControllerError::StaleBrokerEpoch));
    }

    #[test]
    fn a_leader_that_registers_again_loses_its_epoch() {
        let (mut cluster, tp) = cluster();
        assert_eq!(cluster.partitions[&tp].leader, Some(n(1)));
        // Broker 1 restarts within its session: the new incarnation leads nothing of the old.
        let changes = cluster.register(n(1), BrokerEpoch(30), false, 100);
        assert_eq!(changes.len(), 1);
        let partition = &cluster.partitions[&tp];
        assert_eq!((partition.leader, partition.leader_epoch), (Some(n(2)), LeaderEpoch(1)));
        assert_eq!(partition.isr, vec![n(2), n(3)]);
    }

    #[test]
    fn replicas_are_spread_and_the_replication_factor_is_checked() {
        let (mut cluster, _) = cluster();
        let changes = cluster.create_partitions("u", 3, 2).unwrap();
        let leaders: Vec<_> = changes.iter().map(|c| c.partition.leader.unwrap()).collect();
        assert_eq!(leaders, vec![n(1), n(2), n(3)]);
        assert_eq!(cluster.create_partitions("v", 1, 4), Err(ControllerError::InvalidReplicationFactor));
    }

    #[test]
    fn alter_partition_is_checked_in_order() {
        let (mut cluster, tp) = cluster();
        let isr = members(&cluster, &[1, 2]);
        let (le, pe) = (LeaderEpoch(0), PartitionEpoch(0));
        let unknown = TopicPartition::new("nope", 0);
        assert_eq!(
            cluster.alter_partition(&unknown, n(1), le, pe, &isr),
            Err(ControllerError::UnknownTopicOrPartition)
        );
        assert_eq!(
            cluster.alter_partition(&tp, n(1), LeaderEpoch(1), pe, &isr),
            Err(ControllerError::NotController)
        );
        assert_eq!(
            cluster.alter_partition(&tp, n(2), le, pe, &isr),
            Err(ControllerError::InvalidRequest),
            "not the leader"
        );
        let outside = [(n(1), BrokerEpoch(11)), (n(9), BrokerEpoch(1))];
        assert_eq!(
            cluster.alter_partition(&tp, n(1), le, pe, &outside),
            Err(ControllerError::InvalidRequest)
        );
        let without_leader = members(&cluster, &[2, 3]);
        assert_eq!(
            cluster.alter_partition(&tp, n(1), le, pe, &without_leader),
            Err(ControllerError::InvalidRequest)
        );
        let stale = [(n(1), BrokerEpoch(11)), (n(2), BrokerEpoch(1))];
        assert_eq!(
            cluster.alter_partition(&tp, n(1), le, pe, &stale),
            Err(ControllerError::IneligibleReplica)
        );
        let change = cluster.alter_partition(&tp, n(1), le, pe, &isr).unwrap();
        assert_eq!(
            (change.partition.isr, change.partition.partition_epoch),
            (vec![n(1), n(2)], PartitionEpoch(1))
        );
        // The same request again is a stale partition epoch.
        assert_eq!(
            cluster.alter_partition(&tp, n(1), le, pe, &isr),
            Err(ControllerError::InvalidUpdateVersion)
        );
    }

    #[test]
    fn a_silent_leader_is_fenced_and_leadership_moves_within_the_isr() {
        let (mut cluster, tp) = cluster();
        cluster.heartbeat(n(2), BrokerEpoch(12), 100, 2_000).unwrap();
        cluster.heartbeat(n(3), BrokerEpoch(13), 100, 2_000).unwrap();
        let changes = cluster.tick(3_001);
        assert_eq!(changes.len(), 1);
        let partition = &cluster.partitions[&tp];
        assert_eq!((partition.leader, partition.leader_epoch), (Some(n(2)), LeaderEpoch(1)));
        assert_eq!(partition.isr, vec![n(2), n(3)]);
        assert!(cluster.brokers[&n(1)].fenced);
        assert!(partition.elr.is_empty(), "the ISR is still at min ISR");
    }

    /// KIP-966, last replica standing: fencing takes the ISR down to one member; the others go to
    /// the ELR; when the last ISR member dies too, an ELR member (which holds everything below
    /// the frozen HW) may lead, never an unclean one.
    #[test]
    fn the_elr_keeps_clean_replicas_electable_when_the_isr_is_gone() {
        let (mut cluster, tp) = cluster();
        // 3 dies: ISR {1, 2}; then 2 dies: ISR {1} < min ISR 2: 2 joins the ELR.
        cluster.heartbeat(n(1), BrokerEpoch(11), 100, 2_000).unwrap();
        cluster.heartbeat(n(2), BrokerEpoch(12), 100, 2_000).unwrap();
        cluster.tick(3_001);
        cluster.heartbeat(n(1), BrokerEpoch(11), 100, 4_000).unwrap();
        cluster.tick(5_001);
        let partition = cluster.partitions[&tp].clone();
        assert_eq!(
            (partition.isr.clone(), partition.elr.clone(), partition.leader),
            (vec![n(1)], vec![n(2)], Some(n(1)))
        );
        // 1 dies too: the ISR empties and 1 joins the ELR; nobody eligible is left.
        cluster.tick(7_001);
        let partition = cluster.partitions[&tp].clone();
        assert_eq!((partition.isr.clone(), partition.leader), (vec![], None), "offline, no unclean election");
        assert_eq!(partition.elr, vec![n(2), n(1)]);
        // 2 (in the ELR) comes back clean: it may lead.
        cluster.register(n(2), BrokerEpoch(20), false, 8_000);
        let changes = cluster.heartbeat(n(2), BrokerEpoch(20), 20, 8_000).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(cluster.partitions[&tp].leader, Some(n(2)));
        // 3 comes back unclean: it is in no ISR or ELR and is never elected.
        cluster.register(n(3), BrokerEpoch(21), true, 9_000);
        cluster.heartbeat(n(3), BrokerEpoch(21), 21, 9_000).unwrap();
        let partition = &cluster.partitions[&tp];
        assert!(!partition.isr.contains(&n(3)) && !partition.elr.contains(&n(3)));
        assert_ne!(cluster.elect(partition), Some(n(3)));
    }

    #[test]
    fn election_prefers_the_current_leader_then_replica_order_and_skips_the_fenced() {
        let (mut cluster, tp) = cluster();
        let mut partition = cluster.partitions[&tp].clone();
        assert_eq!(cluster.elect(&partition), Some(n(1)));
        partition.leader = Some(n(3));
        assert_eq!(cluster.elect(&partition), Some(n(3)));
        cluster.brokers.get_mut(&n(3)).unwrap().fenced = true;
        assert_eq!(cluster.elect(&partition), Some(n(1)));
        cluster.brokers.get_mut(&n(1)).unwrap().shutting_down = true;
        assert_eq!(cluster.elect(&partition), Some(n(2)));
    }
}
