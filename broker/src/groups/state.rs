//! The consumer-group coordinator: membership, server-side assignment with incremental
//! (cooperative) rebalancing in the spirit of Kafka's KIP-848, and the committed offsets held
//! in memory (their durable copy is the offsets log, `offsets.rs`), and how committed offsets
//! look on the wire.
//!
//! Pure state machine: no I/O, no clock of its own (callers pass `now`), so it is tested
//! directly. Each group lives on one shard (the one owning its offsets partition,
//! `offsets::partition_for_group`).
//!
//! # Protocol
//! * A member joins with epoch 0 and gets a member id. It heartbeats every
//!   `heartbeat_interval_ms`, reporting the partitions it owns; each answer carries the
//!   partitions it should own now.
//! * Any change of membership, of a subscription or of a subscribed topic's partition count
//!   bumps the **group epoch** and computes a new **target assignment** with a sticky,
//!   balanced assignor: a member that stays keeps its partitions up to its fair share.
//! * Each member then **reconciles** towards its target, one heartbeat at a time: first it is
//!   asked to give up the partitions it owns that are no longer its own (it stops consuming
//!   them, commits, and reports them gone); once it has none left to give up it moves to the new
//!   epoch and receives the new partitions that no other member still owns; partitions still
//!   owned by another member follow in later heartbeats, once that member released them.
//!   A partition is therefore never owned by two members at once.
//! * A member that sends no heartbeat for its session timeout is removed and its partitions go
//!   to the others; so is a member that keeps a revoked partition beyond its rebalance timeout.
//! * Commits from a member must carry its current epoch (or an older one) and name partitions
//!   it owns; a removed member (a zombie) is refused with `UnknownMemberId`. Commits from
//!   outside the group (admin tools, manually assigned consumers) are accepted only while the
//!   group has no members.
//!
//! Membership is held in memory only: after a broker restart members rejoin (their next
//! heartbeat is answered `UnknownMemberId`) and the group continues from its committed offsets,
//! which are durable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skein_net::{
    CommittedOffset, DescribeGroupResponse, ErrorCode, GroupListing, HeartbeatRequest, HeartbeatResponse,
    MemberDescription, TopicData, TopicPartition, TopicPartitions, JOIN_EPOCH, LEAVE_EPOCH,
};

pub const GROUP_ID_BYTES_MAX: usize = 249;
pub const SESSION_TIMEOUT_MIN: Duration = Duration::from_millis(500);
pub const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(300);
pub const MEMBERS_MAX: usize = 1000;

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub offset: u64,
    pub metadata: String,
    pub commit_ms: i64,
}

/// A partition's committed offset as the wire gives it (offset -1: no commit).
pub fn committed_offset(partition: u32, committed: Option<&Committed>) -> CommittedOffset {
    match committed {
        Some(c) => CommittedOffset {
            partition,
            offset: c.offset as i64,
            metadata: c.metadata.clone(),
            commit_ms: c.commit_ms,
        },
        None => CommittedOffset { partition, offset: -1, metadata: String::new(), commit_ms: -1 },
    }
}

/// One group's committed offsets as the wire lists them.
pub fn committed_to_wire<'a>(
    offsets: impl Iterator<Item = (&'a TopicPartition, &'a Committed)>,
) -> Vec<TopicData<CommittedOffset>> {
    let mut topics: Vec<TopicData<CommittedOffset>> = Vec::new();
    for (tp, committed) in offsets {
        let entry = committed_offset(tp.partition, Some(committed));
        match topics.last_mut() {
            Some(last) if last.name == tp.topic() => last.partitions.push(entry),
            _ => topics.push(TopicData { name: tp.topic().to_owned(), partitions: vec![entry] }),
        }
    }
    topics
}

#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    pub client_id: String,
    pub epoch: i32,
    pub subscribed: BTreeSet<String>,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    /// Partitions given to the member and not yet given back.
    pub owned: BTreeSet<TopicPartition>,
    /// The part of `owned` it was asked to give up, and by when.
    pub revoking: BTreeSet<TopicPartition>,
    pub revoke_deadline: Option<Instant>,
    pub last_heartbeat: Instant,
}

#[derive(Debug, Clone, Default)]
pub struct Group {
    pub id: String,
    pub epoch: i32,
    pub members: BTreeMap<String, Member>,
    /// The target assignment computed at `epoch`.
    pub target: BTreeMap<String, BTreeSet<TopicPartition>>,
    pub offsets: BTreeMap<TopicPartition, Committed>,
    /// Partition counts of the subscribed topics when the target was computed.
    topic_sizes: BTreeMap<String, u32>,
}

/// Partition counts of topics, as the shard knows them.
pub trait TopicSizes {
    fn partitions(&self, topic: &str) -> Option<u32>;
}

impl<F: Fn(&str) -> Option<u32>> TopicSizes for F {
    fn partitions(&self, topic: &str) -> Option<u32> {
        self(topic)
    }
}

pub fn validate_group_id(group: &str) -> Result<(), ErrorCode> {
    if group.is_empty() || group.len() > GROUP_ID_BYTES_MAX || group.chars().any(|c| c.is_control()) {
        Err(ErrorCode::InvalidGroupId)
    } else {
        Ok(())
    }
}

/// Sticky balanced assignment: every partition of a subscribed topic goes to one member
/// subscribed to it; members keep what they had (`previous`) up to their fair share; the rest
/// goes to the least loaded eligible member.
pub fn assign(
    members: &BTreeMap<String, BTreeSet<String>>,
    sizes: &BTreeMap<String, u32>,
    previous: &BTreeMap<String, BTreeSet<TopicPartition>>,
) -> BTreeMap<String, BTreeSet<TopicPartition>> {
    let mut result: BTreeMap<String, BTreeSet<TopicPartition>> =
        members.keys().map(|m| (m.clone(), BTreeSet::new())).collect();
    let all: Vec<TopicPartition> = sizes
        .iter()
        .flat_map(|(t, n)| {
            let topic: Arc<str> = t.as_str().into();
            (0..*n).map(move |partition| TopicPartition { topic: topic.clone(), partition })
        })
        .collect();
    let eligible =
        |member: &str, tp: &TopicPartition| members.get(member).is_some_and(|subs| subs.contains(tp.topic()));
    let active = members.values().filter(|subs| subs.iter().any(|t| sizes.contains_key(t))).count().max(1);
    let floor = all.len() / active;
    let mut extra = all.len() % active; // members allowed floor + 1
    let mut taken: BTreeSet<TopicPartition> = BTreeSet::new();
    // Sticky pass: keep previous partitions up to the fair share.
    for (member, had) in previous {
        if !members.contains_key(member) {
            continue;
        }
        for tp in had {
            if sizes.get(tp.topic()).is_none_or(|n| tp.partition >= *n)
                || !eligible(member, tp)
                || taken.contains(tp)
            {
                continue;
            }
            let count = result[member].len();
            if count < floor || (count == floor && extra > 0) {
                if count == floor {
                    extra -= 1;
                }
                result.get_mut(member).expect("listed").insert(tp.clone());
                taken.insert(tp.clone());
            }
        }
    }
    // Spread the rest over the least loaded eligible members.
    for tp in all {
        if taken.contains(&tp) {
            continue;
        }
        let best = result
            .iter()
            .filter(|(member, _)| eligible(member, &tp))
            .min_by_key(|(member, assigned)| (assigned.len(), (*member).clone()))
            .map(|(member, _)| member.clone());
        if let Some(member) = best {
            result.get_mut(&member).expect("listed").insert(tp);
        }
    }
    result
}

/// The groups of one shard.
#[derive(Debug, Default)]
pub struct Coordinator {
    pub groups: BTreeMap<String, Group>,
    next_member: u64,
    /// Prefix of generated member ids (unique per broker run).
    pub member_prefix: String,
}

impl Group {
    fn new(id: &str) -> Group {
        Group { id: id.to_owned(), ..Group::default() }
    }

    pub fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "empty"
        } else if self
            .members
            .values()
            .all(|m| m.epoch == self.epoch && self.target.get(&m.id).is_some_and(|t| *t == m.owned))
        {
            "stable"
        } else {
            "reconciling"
        }
    }

    /// Who owns a partition now (given, not yet given back).
    fn owner_of(&self, tp: &TopicPartition) -> Option<&str> {
        self.members.values().find(|m| m.owned.contains(tp)).map(|m| m.id.as_str())
    }

    fn sizes_changed(&self, sizes: &dyn TopicSizes) -> bool {
        let subscribed: BTreeSet<&String> = self.members.values().flat_map(|m| m.subscribed.iter()).collect();
        let now: BTreeMap<String, u32> =
            subscribed.into_iter().filter_map(|t| sizes.partitions(t).map(|n| (t.clone(), n))).collect();
        now != self.topic_sizes
    }

    /// Bumps the epoch and computes a new target assignment.
    fn rebalance(&mut self, sizes: &dyn TopicSizes) {
        self.epoch += 1;
        let subscribed: BTreeSet<&String> = self.members.values().flat_map(|m| m.subscribed.iter()).collect();
        self.topic_sizes =
            subscribed.into_iter().filter_map(|t| sizes.partitions(t).map(|n| (t.clone(), n))).collect();
        let members: BTreeMap<String, BTreeSet<String>> =
            self.members.iter().map(|(id, m)| (id.clone(), m.subscribed.clone())).collect();
        // Stickiness follows what members own now, then their previous target.
        let mut previous: BTreeMap<String, BTreeSet<TopicPartition>> = BTreeMap::new();
        for (id, member) in &self.members {
            let mut had = member.owned.clone();
            if let Some(target) = self.target.get(id) {
                had.extend(target.iter().cloned());
            }
            previous.insert(id.clone(), had);
        }
        self.target = assign(&members, &self.topic_sizes, &previous);
        tracing::info!(
            group = self.id,
            epoch = self.epoch,
            members = self.members.len(),
            "new target assignment"
        );
    }

    fn remove_member(&mut self, member_id: &str, sizes: &dyn TopicSizes, why: &str) {
        if self.members.remove(member_id).is_some() {
            tracing::info!(group = self.id, member = member_id, why, "member removed");
            self.target.remove(member_id);
            self.rebalance(sizes);
        }
    }

    /// Moves a member towards its target; returns what it should own now.
    fn reconcile(&mut self, member_id: &str, now: Instant) -> BTreeSet<TopicPartition> {
        let target = self.target.get(member_id).cloned().unwrap_or_default();
        let (owned, epoch) = {
            let member = &self.members[member_id];
            (member.owned.clone(), member.epoch)
        };
        let to_revoke: BTreeSet<TopicPartition> = owned.difference(&target).cloned().collect();
        if !to_revoke.is_empty() {
            let member = self.members.get_mut(member_id).expect("present");
            if member.revoking != to_revoke {
                member.revoking = to_revoke;
                member.revoke_deadline = Some(now + member.rebalance_timeout);
            }
            return owned.intersection(&target).cloned().collect();
        }
        let free: Vec<TopicPartition> =
            target.iter().filter(|tp| !owned.contains(*tp) && self.owner_of(tp).is_none()).cloned().collect();
        let group_epoch = self.epoch;
        let member = self.members.get_mut(member_id).expect("present");
        member.revoking.clear();
        member.revoke_deadline = None;
        member.owned.extend(free);
        if epoch != group_epoch {
            member.epoch = group_epoch;
        }
        member.owned.clone()
    }
}

/// How often members should heartbeat for a session timeout.
pub fn heartbeat_interval(session_timeout: Duration) -> Duration {
    (session_timeout / 10).clamp(Duration::from_millis(50), Duration::from_secs(3))
}

impl Coordinator {
    pub fn new(member_prefix: String) -> Coordinator {
        Coordinator { member_prefix, ..Coordinator::default() }
    }

    pub fn group(&self, id: &str) -> Option<&Group> {
        self.groups.get(id)
    }

    /// The group, created empty if it does not exist.
    pub fn group_mut(&mut self, id: &str) -> &mut Group {
        self.groups.entry(id.to_owned()).or_insert_with(|| Group::new(id))
    }

    pub fn heartbeat(
        &mut self,
        request: &HeartbeatRequest,
        sizes: &dyn TopicSizes,
        now: Instant,
    ) -> HeartbeatResponse {
        if let Err(code) = validate_group_id(&request.group_id) {
            return HeartbeatResponse::error(code, "group ids are 1 to 249 printable characters");
        }
        if request.member_epoch == LEAVE_EPOCH {
            if let Some(group) = self.groups.get_mut(&request.group_id) {
                group.remove_member(&request.member_id, sizes, "left the group");
            }
            return HeartbeatResponse {
                error: ErrorCode::None,
                error_message: String::new(),
                member_id: request.member_id.clone(),
                member_epoch: LEAVE_EPOCH,
                heartbeat_interval_ms: 0,
                assignment: Vec::new(),
            };
        }
        let session = Duration::from_millis(request.session_timeout_ms.into());
        if !(SESSION_TIMEOUT_MIN..=SESSION_TIMEOUT_MAX).contains(&session) {
            return HeartbeatResponse::error(
                ErrorCode::InvalidConfig,
                "session timeout must be 500 ms to 300 s",
            );
        }
        let rebalance_timeout = Duration::from_millis(request.rebalance_timeout_ms.into()).max(session);
        let subscribed: BTreeSet<String> = request.subscribed_topics.iter().cloned().collect();
        let member_id = if request.member_epoch == JOIN_EPOCH {
            let group =
                self.groups.entry(request.group_id.clone()).or_insert_with(|| Group::new(&request.group_id));
            if group.members.len() >= MEMBERS_MAX && !group.members.contains_key(&request.member_id) {
                return HeartbeatResponse::error(ErrorCode::TooManyConnections, "the group has 1000 members");
            }
            let id = if request.member_id.is_empty() {
                self.next_member += 1;
                format!("{}-{}", self.member_prefix, self.next_member)
            } else {
                request.member_id.clone()
            };
            let group = self.groups.get_mut(&request.group_id).expect("created above");
            // Rejoining with a known id starts over: what it owned is free again.
            group.members.remove(&id);
            group.members.insert(
                id.clone(),
                Member {
                    id: id.clone(),
                    client_id: request.client_id.clone(),
                    epoch: 0,
                    subscribed,
                    session_timeout: session,
                    rebalance_timeout,
                    owned: BTreeSet::new(),
                    revoking: BTreeSet::new(),
                    revoke_deadline: None,
                    last_heartbeat: now,
                },
            );
            tracing::info!(group = request.group_id, member = id, "member joined");
            group.rebalance(sizes);
            id
        } else {
            let Some(group) = self.groups.get_mut(&request.group_id) else {
                return HeartbeatResponse::error(ErrorCode::UnknownMemberId, "no such group member; rejoin");
            };
            let Some(member) = group.members.get_mut(&request.member_id) else {
                return HeartbeatResponse::error(ErrorCode::UnknownMemberId, "no such group member; rejoin");
            };
            if request.member_epoch > member.epoch {
                return HeartbeatResponse::error(
                    ErrorCode::FencedMemberEpoch,
                    "member epoch ahead of the group's",
                );
            }
            member.last_heartbeat = now;
            member.session_timeout = session;
            member.rebalance_timeout = rebalance_timeout;
            // Partitions it was asked to give up and no longer reports are released. A partition
            // it does not report but was not asked for stays its own: it may simply not have
            // applied the answer that gave it yet (the next answer lists it again).
            let reported = TopicPartitions::to_tps::<BTreeSet<TopicPartition>>(&request.owned);
            let revoking = member.revoking.clone();
            member.owned.retain(|tp| reported.contains(tp) || !revoking.contains(tp));
            member.revoking.retain(|tp| reported.contains(tp));
            let resubscribed = member.subscribed != subscribed;
            member.subscribed = subscribed;
            if resubscribed || group.sizes_changed(sizes) {
                group.rebalance(sizes);
            }
            request.member_id.clone()
        };
        let group = self.groups.get_mut(&request.group_id).expect("exists");
        let assignment = group.reconcile(&member_id, now);
        HeartbeatResponse {
            error: ErrorCode::None,
            error_message: String::new(),
            member_id: member_id.clone(),
            member_epoch: group.members[&member_id].epoch,
            heartbeat_interval_ms: heartbeat_interval(session).as_millis() as u32,
            assignment: TopicPartitions::from_tps(&assignment),
        }
    }

    /// Removes members whose session or revocation deadline passed.
    pub fn expire(&mut self, sizes: &dyn TopicSizes, now: Instant) {
        for group in self.groups.values_mut() {
            let expired: Vec<(String, &'static str)> = group
                .members
                .values()
                .filter_map(|m| {
                    if now.duration_since(m.last_heartbeat) > m.session_timeout {
                        Some((m.id.clone(), "session timed out"))
                    } else if m.revoke_deadline.is_some_and(|d| now > d) {
                        Some((m.id.clone(), "kept revoked partitions past its rebalance timeout"))
                    } else {
                        None
                    }
                })
                .collect();
            for (member, why) in expired {
                group.remove_member(&member, sizes, why);
            }
        }
        // A group with neither members nor offsets is forgotten.
        self.groups.retain(|_, g| !g.members.is_empty() || !g.offsets.is_empty());
    }

    /// Checks a commit; `Ok` per partition or the error for it. The caller writes the accepted
    /// ones to the offsets log.
    pub fn check_commit(
        &self,
        group_id: &str,
        member_id: &str,
        member_epoch: i32,
        partitions: &[TopicPartition],
    ) -> Result<Vec<ErrorCode>, ErrorCode> {
        validate_group_id(group_id)?;
        let group = self.groups.get(group_id);
        if member_id.is_empty() {
            if member_epoch != skein_net::ADMIN_EPOCH {
                return Err(ErrorCode::UnknownMemberId);
            }
            if group.is_some_and(|g| !g.members.is_empty()) {
                return Err(ErrorCode::GroupNotEmpty);
            }
            return Ok(vec![ErrorCode::None; partitions.len()]);
        }
        let member = group.and_then(|g| g.members.get(member_id)).ok_or(ErrorCode::UnknownMemberId)?;
        if member_epoch > member.epoch {
            return Err(ErrorCode::FencedMemberEpoch);
        }
        Ok(partitions
            .iter()
            .map(|tp| if member.owned.contains(tp) { ErrorCode::None } else { ErrorCode::StaleMemberEpoch })
            .collect())
    }

    pub fn list(&self) -> Vec<GroupListing> {
        self.groups
            .values()
            .map(|g| GroupListing {
                group_id: g.id.clone(),
                state: g.state().to_owned(),
                members: g.members.len() as u32,
            })
            .collect()
    }

    pub fn describe(&self, group_id: &str) -> DescribeGroupResponse {
        let Some(group) = self.groups.get(group_id) else {
            return DescribeGroupResponse {
                error: ErrorCode::GroupIdNotFound,
                group_id: group_id.to_owned(),
                state: "dead".into(),
                group_epoch: -1,
                members: Vec::new(),
                offsets: Vec::new(),
            };
        };
        DescribeGroupResponse {
            error: ErrorCode::None,
            group_id: group.id.clone(),
            state: group.state().to_owned(),
            group_epoch: group.epoch,
            members: group
                .members
                .values()
                .map(|m| MemberDescription {
                    member_id: m.id.clone(),
                    client_id: m.client_id.clone(),
                    member_epoch: m.epoch,
                    subscribed_topics: m.subscribed.iter().cloned().collect(),
                    assigned: TopicPartitions::from_tps(&m.owned),
                    revoking: TopicPartitions::from_tps(&m.revoking),
                })
                .collect(),
            offsets: committed_to_wire(group.offsets.iter()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(topic: &str) -> Option<u32> {
        match topic {
            "t" => Some(6),
            "u" => Some(3),
            _ => None,
        }
    }

    fn beat(member: &str, epoch: i32, owned: &BTreeSet<TopicPartition>) -> HeartbeatRequest {
        HeartbeatRequest {
            group_id: "g".into(),
            member_id: member.into(),
            member_epoch: epoch,
            client_id: "test".into(),
            session_timeout_ms: 3000,
            rebalance_timeout_ms: 3000,
            subscribed_topics: vec!["t".into()],
            owned: TopicPartitions::from_tps(owned),
        }
    }

    /// A simulated member: what it owns, as it tells the coordinator.
    struct Sim {
        id: String,
        epoch: i32,
        owned: BTreeSet<TopicPartition>,
    }

    impl Sim {
        fn join(c: &mut Coordinator, now: Instant) -> Sim {
            let r = c.heartbeat(&beat("", 0, &BTreeSet::new()), &sizes, now);
            assert_eq!(r.error, ErrorCode::None);
            Sim {
                id: r.member_id,
                epoch: r.member_epoch,
                owned: TopicPartitions::to_tps::<BTreeSet<TopicPartition>>(&r.assignment),
            }
        }

        fn beat(&mut self, c: &mut Coordinator, now: Instant) -> ErrorCode {
            let r = c.heartbeat(&beat(&self.id, self.epoch, &self.owned), &sizes, now);
            if r.error.is_ok() {
                self.epoch = r.member_epoch;
                self.owned = TopicPartitions::to_tps::<BTreeSet<TopicPartition>>(&r.assignment);
            }
            r.error
        }
    }

    fn no_double_ownership(sims: &[&Sim]) {
        let mut seen = BTreeSet::new();
        for sim in sims {
            for tp in &sim.owned {
                assert!(seen.insert(tp.clone()), "{tp:?} owned twice");
            }
        }
    }

    #[test]
    fn three_members_share_six_partitions_and_a_dead_one_is_replaced() {
        let mut c = Coordinator::new("m".into());
        let start = Instant::now();
        let mut sims = vec![Sim::join(&mut c, start)];
        sims.push(Sim::join(&mut c, start));
        sims.push(Sim::join(&mut c, start));
        let mut now = start;
        for _ in 0..6 {
            now += Duration::from_millis(100);
            for sim in sims.iter_mut() {
                assert_eq!(sim.beat(&mut c, now), ErrorCode::None);
            }
            no_double_ownership(&sims.iter().collect::<Vec<_>>());
        }
        for sim in &sims {
            assert_eq!(sim.owned.len(), 2, "{} owns {:?}", sim.id, sim.owned);
        }
        assert_eq!(c.group("g").unwrap().state(), "stable");
        let before: Vec<BTreeSet<TopicPartition>> = sims.iter().map(|s| s.owned.clone()).collect();
        // The third member dies: only the other two heartbeat.
        let dead = sims.pop().unwrap();
        for _ in 0..40 {
            now += Duration::from_millis(100);
            c.expire(&sizes, now);
            for sim in sims.iter_mut() {
                assert_eq!(sim.beat(&mut c, now), ErrorCode::None);
            }
            no_double_ownership(&sims.iter().collect::<Vec<_>>());
        }
        let owned: BTreeSet<TopicPartition> = sims.iter().flat_map(|s| s.owned.iter().cloned()).collect();
        assert_eq!(owned.len(), 6, "the survivors own every partition");
        for (sim, had) in sims.iter().zip(&before) {
            assert!(had.is_subset(&sim.owned), "a staying member keeps its partitions");
            assert_eq!(sim.owned.len(), 3);
        }
        assert_eq!(
            c.check_commit("g", &dead.id, dead.epoch, &[TopicPartition::new("t", 0)]),
            Err(ErrorCode::UnknownMemberId)
        );
    }

    #[test]
    fn a_new_member_gets_partitions_only_after_they_are_released() {
        let mut c = Coordinator::new("m".into());
        let now = Instant::now();
        let mut a = Sim::join(&mut c, now);
        assert_eq!(a.owned.len(), 6);
        let mut b = Sim::join(&mut c, now);
        assert!(b.owned.is_empty(), "a's partitions are not free yet");
        // b heartbeats before a released anything: still nothing.
        b.beat(&mut c, now);
        assert!(b.owned.is_empty());
        // a is told to give up three; it commits them (allowed while it still owns them)...
        let kept_before = a.owned.clone();
        let response = c.heartbeat(&beat(&a.id, a.epoch, &a.owned), &sizes, now);
        let keep = TopicPartitions::to_tps::<BTreeSet<TopicPartition>>(&response.assignment);
        assert_eq!(keep.len(), 3);
        let revoked: Vec<TopicPartition> = kept_before.difference(&keep).cloned().collect();
        assert_eq!(c.check_commit("g", &a.id, a.epoch, &revoked).unwrap(), vec![ErrorCode::None; 3]);
        a.owned = keep;
        a.epoch = response.member_epoch;
        // ...then reports them gone; now b gets them.
        a.beat(&mut c, now);
        b.beat(&mut c, now);
        assert_eq!(b.owned.len(), 3);
        no_double_ownership(&[&a, &b]);
        // a commit for a partition a gave up is refused.
        assert_eq!(
            c.check_commit("g", &a.id, a.epoch, &revoked[..1]).unwrap(),
            vec![ErrorCode::StaleMemberEpoch]
        );
        assert_eq!(c.check_commit("g", "", -1, &revoked[..1]), Err(ErrorCode::GroupNotEmpty));
        // Both leave: the group is empty and admin commits are accepted.
        for sim in [&a, &b] {
            c.heartbeat(&beat(&sim.id, LEAVE_EPOCH, &BTreeSet::new()), &sizes, now);
        }
        assert_eq!(c.group("g").unwrap().state(), "empty");
        assert!(c.check_commit("g", "", -1, &revoked[..1]).is_ok());
    }

    #[test]
    fn a_partition_not_yet_applied_is_not_given_to_another_member() {
        let mut c = Coordinator::new("m".into());
        let now = Instant::now();
        let a = Sim::join(&mut c, now);
        assert_eq!(a.owned.len(), 6);
        let mut b = Sim::join(&mut c, now);
        // a's heartbeat reports nothing: it has not applied its assignment yet. That releases
        // nothing, since nothing was asked back.
        let response = c.heartbeat(&beat(&a.id, a.epoch, &BTreeSet::new()), &sizes, now);
        assert_eq!(
            TopicPartitions::to_tps::<BTreeSet<TopicPartition>>(&response.assignment).len(),
            3,
            "told to keep three"
        );
        b.beat(&mut c, now);
        assert!(b.owned.is_empty(), "b gets nothing while a may still read them: {:?}", b.owned);
        // Once a reports the three it keeps, the other three are free for b.
        c.heartbeat(
            &beat(&a.id, a.epoch, &TopicPartitions::to_tps::<BTreeSet<TopicPartition>>(&response.assignment)),
            &sizes,
            now,
        );
        b.beat(&mut c, now);
        assert_eq!(b.owned.len(), 3);
        assert!(b
            .owned
            .is_disjoint(&TopicPartitions::to_tps::<BTreeSet<TopicPartition>>(&response.assignment)));
        // An empty group with no offsets is forgotten.
        for id in [&a.id, &b.id] {
            c.heartbeat(&beat(id, LEAVE_EPOCH, &BTreeSet::new()), &sizes, now);
        }
        c.expire(&sizes, now);
        assert!(c.group("g").is_none());
    }

    #[test]
    fn assignment_is_balanced_and_respects_subscriptions() {
        let members: BTreeMap<String, BTreeSet<String>> = [
            ("a".to_string(), ["t".to_string(), "u".to_string()].into()),
            ("b".to_string(), ["t".to_string()].into()),
            ("c".to_string(), ["u".to_string()].into()),
        ]
        .into();
        let sizes: BTreeMap<String, u32> = [("t".to_string(), 6), ("u".to_string(), 3)].into();
        let result = assign(&members, &sizes, &BTreeMap::new());
        let total: usize = result.values().map(BTreeSet::len).sum();
        assert_eq!(total, 9);
        assert!(result["b"].iter().all(|tp| tp.topic() == "t"));
        assert!(result["c"].iter().all(|tp| tp.topic() == "u"));
        assert!(result.values().all(|s| s.len() == 3), "{result:?}");
    }
}
