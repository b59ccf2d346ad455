//! One partition's replica as a state machine: events in ([`Event`]), commands out
//! ([`Command`]), time passed in, no I/O. The broker's replica manager will feed it the log's
//! appends and durability, follower fetches and metadata; the simulator feeds it the same under
//! faults. The rules are those of DESIGN-CLUSTER.md section 4.
//!
//! * A replica counts toward the high watermark only up to its **durable** offset (what it has
//!   written, and synced under `fsync always`), not its log end.
//! * The leader's **high watermark** is the minimum durable offset over the leader and the
//!   *maximal* ISR (the committed ISR plus a member whose addition is pending; a pending removal
//!   keeps the member), and never goes back. While the committed ISR is smaller than
//!   `min.insync.replicas` it does not move at all, and `acks=all` is refused.
//! * A new leader exposes nothing ([`ReplicaState::readable_end`] is `OffsetNotAvailable`)
//!   until its high watermark reaches the start of its epoch.
//! * A follower's fetch carries its current leader epoch, its log end and the epoch of its last
//!   record; the leader answers a stale epoch with `FencedLeaderEpoch`, a newer one with
//!   `UnknownLeaderEpoch`, and a log that parted from its own with the **diverging epoch** (the
//!   follower's last epoch as the leader knows it, and where it ends); the follower truncates to
//!   the smaller of that end and its own end of the epoch, never below its high watermark.
//! * The leader proposes ISR changes and never applies them alone: a follower that has not
//!   caught up for `lag_time_max_ms` is proposed for removal; a follower durable up to the high
//!   watermark and the epoch start is proposed for addition; one change in flight at a time. A
//!   refused addition still counts toward the high watermark until the partition epoch moves
//!   past the refusal (a copy of the proposal may yet commit).

pub mod epochs;

use std::collections::{BTreeMap, BTreeSet};

use skein_net::types::{LeaderEpoch, NodeId, Offset, PartitionEpoch};

pub use epochs::EpochCache;

/// Settings of a partition's replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// `min.insync.replicas`.
    pub min_insync: usize,
    /// `replica.lag.time.max.ms`: a follower not caught up for this long leaves the ISR.
    pub lag_time_max_ms: u64,
    /// Test-only switches that turn one rule off each, so a scenario can show the bug the rule
    /// prevents. Always [`Rules::ALL`] outside tests.
    #[doc(hidden)]
    pub rules: Rules,
}

impl Default for ReplicaConfig {
    fn default() -> ReplicaConfig {
        ReplicaConfig { min_insync: 2, lag_time_max_ms: 10_000, rules: Rules::ALL }
    }
}

/// The rules that can be switched off in tests (see [`ReplicaConfig::rules`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// A follower counts toward the high watermark only up to its durable offset (off: up to
    /// what it fetched, which a crash may take back).
    pub durable_counts: bool,
    /// The high watermark does not move while the ISR is below min.insync.replicas.
    pub freeze_below_min_isr: bool,
    /// A follower never truncates below its high watermark.
    pub no_truncation_below_hw: bool,
    /// A follower finds where its log parted from the leader's by epochs (its fetch carries
    /// the epoch of its last record; the leader answers with the diverging epoch) and never
    /// truncates to its high watermark when it starts following (off: the pre-KIP-101 rule,
    /// truncate to the high watermark on becoming a follower and fetch by offset alone).
    pub truncate_by_epoch: bool,
    /// On a diverging epoch, a follower truncates to the smaller of the leader's end of that
    /// epoch and its own (off: to the leader's end alone, keeping records of a later epoch of
    /// its own below it; KIP-279).
    pub own_epoch_end: bool,
    /// The leader proposes ISR changes to the controller and waits for the committed change
    /// (off: it applies its own shrink at once, so a zombie leader that lost its followers to
    /// a new leader shrinks the ISR to itself and acknowledges alone).
    pub isr_via_controller: bool,
    /// Consumers read only below the high watermark (off: up to the leader's log end, records
    /// not yet replicated that a failover may take back).
    pub reads_below_hw: bool,
    /// A member that a refused ISR expansion would have added keeps counting toward the high
    /// watermark until a committed partition epoch newer than the refusal's shows the ISR:
    /// another copy of the same proposal (a duplicate, a resend after a timeout) may still be
    /// accepted at that epoch once the member is eligible again, and it would then be in the
    /// committed ISR without the records acknowledged meanwhile. The leader moves the epoch on
    /// by proposing its committed ISR again. Off: a refusal drops the member at once (found by
    /// the simulator: 3 of 10000 seeds lost acknowledged records that way).
    pub settle_refused_additions: bool,
}

impl Rules {
    pub const ALL: Rules = Rules {
        durable_counts: true,
        freeze_below_min_isr: true,
        no_truncation_below_hw: true,
        truncate_by_epoch: true,
        own_epoch_end: true,
        isr_via_controller: true,
        reads_below_hw: true,
        settle_refused_additions: true,
    };
}

/// Why a request to the replica is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("this replica does not lead the partition")]
    NotLeader,
    #[error("the request's leader epoch is older than the leader's")]
    FencedLeaderEpoch,
    #[error("the request's leader epoch is newer than this replica knows")]
    UnknownLeaderEpoch,
    #[error("fewer in-sync replicas than min.insync.replicas")]
    NotEnoughReplicas,
    #[error("written, but the in-sync replicas fell below min.insync.replicas before it was replicated")]
    NotEnoughReplicasAfterAppend,
    #[error("not replicated in time")]
    RequestTimedOut,
    #[error("the new leader's high watermark has not reached its epoch start yet")]
    OffsetNotAvailable,
}

/// How often a leader proposes its committed ISR again while a refused expansion is unsettled
/// and its last such proposal was refused too.
const SEAL_RETRY_MS: u64 = 100;

/// An `acks=all` produce waiting for the high watermark.
pub type AckId = u64;

/// What a leader answers a follower's fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchAnswer {
    /// Send the records from `from` up to `to` (the leader's log end); the leader's high
    /// watermark is `high_watermark`.
    Records {
        from: Offset,
        to: Offset,
        high_watermark: Offset,
    },
    /// The follower's log parted from the leader's: its last epoch, as the leader knows it,
    /// ends at `end`.
    Diverging {
        epoch: LeaderEpoch,
        end: Offset,
    },
    Refused(ReplicaError),
}

/// What happens to the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Metadata made this replica the leader at `epoch`.
    BecomeLeader {
        epoch: LeaderEpoch,
        partition_epoch: PartitionEpoch,
        replicas: Vec<NodeId>,
        isr: Vec<NodeId>,
    },
    /// Metadata made `leader` the leader at `epoch`; this replica follows.
    BecomeFollower { leader: NodeId, epoch: LeaderEpoch },
    /// Metadata says the partition has no leader at `epoch` (no eligible replica): this replica
    /// leads nothing and fetches from no one.
    Offline { epoch: LeaderEpoch },
    /// Batches of `epoch` were appended locally; the log now ends at `end`.
    Appended { end: Offset, epoch: LeaderEpoch },
    /// Everything below `offset` is durable locally.
    Durable { offset: Offset },
    /// A follower's fetch reached the leader.
    FollowerFetch {
        from: NodeId,
        current_leader_epoch: LeaderEpoch,
        fetch_offset: Offset,
        /// The epoch of the follower's last record (`None`: its log is empty).
        last_fetched_epoch: Option<LeaderEpoch>,
        durable: Offset,
    },
    /// The leader answered this follower's fetch with its high watermark (the records, if
    /// any, were appended before this event: see [`Event::Appended`]).
    LeaderHighWatermark { high_watermark: Offset },
    /// The leader answered this follower's fetch with a diverging epoch.
    Diverged { epoch: LeaderEpoch, end: Offset },
    /// An `acks=all` produce whose records end at `end` waits, until `deadline_ms` at most.
    AwaitAck { id: AckId, end: Offset, deadline_ms: u64 },
    /// A committed ISR change arrived through metadata.
    IsrCommitted { isr: Vec<NodeId>, partition_epoch: PartitionEpoch },
    /// The controller refused the ISR change proposed last (an ineligible member, an ISR
    /// outside the replicas: decided at the proposal's partition epoch): the leader may propose
    /// again. Another copy of it may still commit at that epoch (a duplicate, or a resend, that
    /// reaches the controller once the member is eligible), so the members it would have added
    /// keep counting toward the high watermark until a newer partition epoch commits, and the
    /// leader proposes its committed ISR to get one. Not for a timeout or a refusal that may
    /// answer a retry of an accepted proposal (a newer leader or partition epoch): the shell
    /// sends the proposal again and the leader keeps its maximal ISR until metadata settles it.
    IsrRejected,
    /// Time passed.
    Tick,
}

/// What the replica asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Persist `(epoch, start)` to the leader-epoch checkpoint before appending anything.
    WriteEpochCheckpoint {
        epoch: LeaderEpoch,
        start: Offset,
    },
    /// Answer a follower's fetch.
    AnswerFetch {
        to: NodeId,
        answer: FetchAnswer,
    },
    /// The high watermark moved (consumers may read below it).
    HighWatermark {
        offset: Offset,
    },
    AckResolved {
        id: AckId,
    },
    AckFailed {
        id: AckId,
        error: ReplicaError,
    },
    /// Ask the controller to change the ISR (one change in flight at a time).
    ProposeIsr {
        isr: Vec<NodeId>,
        leader_epoch: LeaderEpoch,
        partition_epoch: PartitionEpoch,
    },
    /// Cut the local log at `offset` (a follower whose log parted from its leader's).
    Truncate {
        offset: Offset,
    },
    /// Start (or keep) fetching from `leader` at `epoch`.
    FetchFrom {
        leader: NodeId,
        epoch: LeaderEpoch,
    },
}

/// The leader's view of one follower.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Follower {
    fetch_offset: Offset,
    durable: Offset,
    /// When the follower was last caught up (its fetch reached the leader's log end as it
    /// stood at the follower's previous fetch).
    caught_up_ms: u64,
    /// The leader's log end when this follower last fetched.
    leader_end_at_last_fetch: Offset,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Leading {
    epoch: LeaderEpoch,
    epoch_start: Offset,
    partition_epoch: PartitionEpoch,
    isr: BTreeSet<NodeId>,
    /// The ISR proposed and not committed yet.
    proposed: Option<BTreeSet<NodeId>>,
    /// Members a refused expansion would have added: counted in the maximal ISR until a
    /// committed partition epoch newer than this one's (see [`Rules::settle_refused_additions`]).
    unsettled: BTreeSet<NodeId>,
    /// When the leader next proposes its committed ISR to move the partition epoch past a
    /// refusal (while `unsettled` is not empty).
    seal_at_ms: u64,
    followers: BTreeMap<NodeId, Follower>,
    waiting: BTreeMap<AckId, (Offset, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// No leader known yet.
    Idle,
    Leader(Leading),
    Follower {
        leader: NodeId,
        epoch: LeaderEpoch,
        leader_high_watermark: Offset,
    },
}

/// One partition's replica on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    node: NodeId,
    config: ReplicaConfig,
    log_start: Offset,
    log_end: Offset,
    durable: Offset,
    high_watermark: Offset,
    epochs: EpochCache,
    role: Role,
}

impl ReplicaState {
    /// A replica whose log (recovered from disk) holds `[log_start, log_end)`, durable up to
    /// `durable`, with these epochs and the last high watermark it knew.
    pub fn new(
        node: NodeId,
        config: ReplicaConfig,
        log_start: Offset,
        log_end: Offset,
        durable: Offset,
        epochs: EpochCache,
        high_watermark: Offset,
    ) -> ReplicaState {
        let durable = durable.min(log_end);
        ReplicaState {
            node,
            config,
            log_start,
            log_end,
            durable,
            high_watermark: high_watermark.clamp(log_start, durable.max(log_start)),
            epochs,
            role: Role::Idle,
        }
    }

    pub fn log_end(&self) -> Offset {
        self.log_end
    }

    pub fn durable(&self) -> Offset {
        self.durable
    }

    pub fn high_watermark(&self) -> Offset {
        self.high_watermark
    }

    pub fn epochs(&self) -> &EpochCache {
        &self.epochs
    }

    /// The epoch this replica leads in.
    pub fn leader_epoch(&self) -> Option<LeaderEpoch> {
        match &self.role {
            Role::Leader(leading) => Some(leading.epoch),
            _ => None,
        }
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }

    /// The committed ISR, on the leader.
    pub fn isr(&self) -> Option<Vec<NodeId>> {
        match &self.role {
            Role::Leader(leading) => Some(leading.isr.iter().copied().collect()),
            _ => None,
        }
    }

    /// Where consumers may read up to (exclusive): the high watermark, once a new leader's has
    /// reached its epoch start.
    pub fn readable_end(&self) -> Result<Offset, ReplicaError> {
        match &self.role {
            Role::Leader(leading) if self.high_watermark < leading.epoch_start => {
                Err(ReplicaError::OffsetNotAvailable)
            }
            Role::Leader(_) if !self.config.rules.reads_below_hw => Ok(self.log_end),
            Role::Leader(_) => Ok(self.high_watermark),
            _ => Err(ReplicaError::NotLeader),
        }
    }

    /// Whether an `acks=all` produce may be appended now.
    pub fn check_acks_all(&self) -> Result<(), ReplicaError> {
        match &self.role {
            Role::Leader(leading) if leading.isr.len() < self.config.min_insync => {
                Err(ReplicaError::NotEnoughReplicas)
            }
            Role::Leader(_) => Ok(()),
            _ => Err(ReplicaError::NotLeader),
        }
    }

    /// What a follower sends in its next fetch: current leader epoch, fetch offset, last
    /// fetched epoch, durable offset.
    pub fn next_fetch(&self) -> Option<(LeaderEpoch, Offset, Option<LeaderEpoch>, Offset)> {
        match &self.role {
            Role::Follower { epoch, .. } => {
                let last = if self.config.rules.truncate_by_epoch { self.epochs.latest() } else { None };
                Some((*epoch, self.log_end, last, self.durable))
            }
            _ => None,
        }
    }

    /// Handles one event at `now_ms`.
    pub fn on(&mut self, event: Event, now_ms: u64) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::BecomeLeader { epoch, partition_epoch, replicas, isr } => {
                self.fail_waiting(ReplicaError::NotLeader, &mut out);
                let followers = replicas
                    .iter()
                    .filter(|&&node| node != self.node)
                    .map(|&node| {
                        let follower = Follower {
                            fetch_offset: 0,
                            durable: 0,
                            caught_up_ms: now_ms,
                            leader_end_at_last_fetch: self.log_end,
                        };
                        (node, follower)
                    })
                    .collect();
                self.epochs.assign(epoch, self.log_end);
                out.push(Command::WriteEpochCheckpoint { epoch, start: self.log_end });
                self.role = Role::Leader(Leading {
                    epoch,
                    epoch_start: self.log_end,
                    partition_epoch,
                    isr: isr.into_iter().collect(),
                    proposed: None,
                    unsettled: BTreeSet::new(),
                    seal_at_ms: 0,
                    followers,
                    waiting: BTreeMap::new(),
                });
                self.advance_high_watermark(&mut out);
            }
            Event::BecomeFollower { leader, epoch } => {
                self.fail_waiting(ReplicaError::NotLeader, &mut out);
                self.role = Role::Follower { leader, epoch, leader_high_watermark: self.high_watermark };
                if !self.config.rules.truncate_by_epoch && self.high_watermark < self.log_end {
                    // The pre-KIP-101 rule, for scenarios only: whatever is above the high
                    // watermark is assumed not committed and dropped.
                    self.log_end = self.high_watermark;
                    self.durable = self.durable.min(self.log_end);
                    self.epochs.truncate_from_end(self.log_end);
                    out.push(Command::Truncate { offset: self.log_end });
                }
                out.push(Command::FetchFrom { leader, epoch });
            }
            Event::Offline { .. } => {
                self.fail_waiting(ReplicaError::NotLeader, &mut out);
                self.role = Role::Idle;
            }
            Event::Appended { end, epoch } => {
                if end > self.log_end {
                    self.epochs.assign(epoch, self.log_end);
                    self.log_end = end;
                }
            }
            Event::Durable { offset } => {
                self.durable = self.durable.max(offset.min(self.log_end));
                match &self.role {
                    Role::Leader(_) => self.advance_high_watermark(&mut out),
                    Role::Follower { leader_high_watermark, .. } => {
                        let hw = *leader_high_watermark;
                        self.follow_high_watermark(hw, &mut out);
                    }
                    Role::Idle => {}
                }
            }
            Event::FollowerFetch {
                from,
                current_leader_epoch,
                fetch_offset,
                last_fetched_epoch,
                durable,
            } => {
                let answer = self.answer_fetch(
                    from,
                    current_leader_epoch,
                    fetch_offset,
                    last_fetched_epoch,
                    durable,
                    now_ms,
                    &mut out,
                );
                out.insert(0, Command::AnswerFetch { to: from, answer });
            }
            Event::LeaderHighWatermark { high_watermark } => {
                if let Role::Follower { leader_high_watermark, .. } = &mut self.role {
                    *leader_high_watermark = (*leader_high_watermark).max(high_watermark);
                    self.follow_high_watermark(high_watermark, &mut out);
                }
            }
            Event::Diverged { epoch, end } => {
                if matches!(self.role, Role::Follower { .. }) {
                    let own_end = match self.epochs.end_offset_for(epoch, self.log_end) {
                        Some((own, own_end)) if own == epoch => own_end,
                        // We never had that epoch: cut where our epochs before it end.
                        Some((_, own_end)) => own_end.min(end),
                        None => self.high_watermark,
                    };
                    // Never below what this replica has exposed (I7).
                    let floor =
                        if self.config.rules.no_truncation_below_hw { self.high_watermark } else { 0 };
                    let own_end = if self.config.rules.own_epoch_end { own_end } else { end };
                    let to = end.min(own_end).max(floor).min(self.log_end);
                    if to < self.log_end {
                        self.log_end = to;
                        self.durable = self.durable.min(to);
                        out.push(Command::Truncate { offset: to });
                    }
                    // Epochs that start at the cut go even when no record does: an epoch this
                    // replica led without writing anything would otherwise be its "last fetched
                    // epoch" forever, and every fetch would diverge again (found by the
                    // simulator: a follower that fetched the same divergence in a loop).
                    self.epochs.truncate_from_end(to);
                }
            }
            Event::AwaitAck { id, end, deadline_ms } => match &mut self.role {
                Role::Leader(leading) => {
                    if self.high_watermark >= end {
                        out.push(Command::AckResolved { id });
                    } else {
                        leading.waiting.insert(id, (end, deadline_ms));
                    }
                }
                _ => out.push(Command::AckFailed { id, error: ReplicaError::NotLeader }),
            },
            Event::IsrCommitted { isr, partition_epoch } => {
                if let Role::Leader(leading) = &mut self.role {
                    if partition_epoch > leading.partition_epoch {
                        leading.isr = isr.into_iter().collect();
                        leading.partition_epoch = partition_epoch;
                        leading.proposed = None;
                        // No copy of a proposal refused at an older epoch can commit now.
                        leading.unsettled.clear();
                        self.advance_high_watermark(&mut out);
                    }
                }
            }
            Event::IsrRejected => {
                if let Role::Leader(leading) = &mut self.role {
                    if let Some(proposed) = leading.proposed.take() {
                        let added: Vec<NodeId> = proposed.difference(&leading.isr).copied().collect();
                        if self.config.rules.settle_refused_additions && !added.is_empty() {
                            leading.unsettled.extend(added);
                            leading.seal_at_ms = now_ms;
                        }
                    }
                }
            }
            Event::Tick => self.tick(now_ms, &mut out),
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn answer_fetch(
        &mut self,
        from: NodeId,
        current_leader_epoch: LeaderEpoch,
        fetch_offset: Offset,
        last_fetched_epoch: Option<LeaderEpoch>,
        durable: Offset,
        now_ms: u64,
        out: &mut Vec<Command>,
    ) -> FetchAnswer {
        let log_end = self.log_end;
        let Role::Leader(leading) = &mut self.role else {
            return FetchAnswer::Refused(ReplicaError::NotLeader);
        };
        if current_leader_epoch < leading.epoch {
            return FetchAnswer::Refused(ReplicaError::FencedLeaderEpoch);
        }
        if current_leader_epoch > leading.epoch {
            return FetchAnswer::Refused(ReplicaError::UnknownLeaderEpoch);
        }
        if let Some(last) = last_fetched_epoch {
            match self.epochs.end_offset_for(last, log_end) {
                Some((epoch, end)) if epoch != last || end < fetch_offset => {
                    return FetchAnswer::Diverging { epoch, end };
                }
                None => return FetchAnswer::Diverging { epoch: last, end: self.log_start },
                Some(_) => {}
            }
        } else if fetch_offset > log_end {
            return FetchAnswer::Diverging { epoch: LeaderEpoch(0), end: log_end };
        }
        let Some(follower) = leading.followers.get_mut(&from) else {
            return FetchAnswer::Refused(ReplicaError::NotLeader);
        };
        if fetch_offset >= follower.leader_end_at_last_fetch {
            follower.caught_up_ms = now_ms;
        }
        follower.fetch_offset = fetch_offset;
        follower.durable =
            if self.config.rules.durable_counts { durable.min(fetch_offset) } else { fetch_offset };
        follower.leader_end_at_last_fetch = log_end;
        // A follower out of the ISR that holds everything exposed and everything of this
        // epoch is proposed back in.
        let in_isr =
            leading.isr.contains(&from) || leading.proposed.as_ref().is_some_and(|p| p.contains(&from));
        // A member of a refused expansion waits until the partition epoch moved past the
        // refusal (the leader's proposal of its committed ISR goes first).
        if !in_isr
            && !leading.unsettled.contains(&from)
            && leading.proposed.is_none()
            && follower.durable >= self.high_watermark
            && follower.durable >= leading.epoch_start
        {
            let mut isr = leading.isr.clone();
            isr.insert(from);
            out.push(Command::ProposeIsr {
                isr: isr.iter().copied().collect(),
                leader_epoch: leading.epoch,
                partition_epoch: leading.partition_epoch,
            });
            leading.proposed = Some(isr);
        }
        self.advance_high_watermark(out);
        FetchAnswer::Records { from: fetch_offset, to: log_end, high_watermark: self.high_watermark }
    }

    /// Moves the leader's high watermark to the minimum durable offset over the leader and the
    /// maximal ISR, if the committed ISR is large enough; resolves the acks it passes.
    fn advance_high_watermark(&mut self, out: &mut Vec<Command>) {
        let Role::Leader(leading) = &mut self.role else { return };
        if leading.isr.len() < self.config.min_insync && self.config.rules.freeze_below_min_isr {
            return;
        }
        let mut maximal: BTreeSet<NodeId> = match &leading.proposed {
            Some(proposed) => leading.isr.union(proposed).copied().collect(),
            None => leading.isr.clone(),
        };
        maximal.extend(&leading.unsettled);
        let candidate = maximal
            .iter()
            .filter(|&&node| node != self.node)
            .map(|node| leading.followers.get(node).map_or(0, |f| f.durable))
            .fold(self.durable, Offset::min)
            .min(self.log_end);
        if candidate > self.high_watermark {
            self.high_watermark = candidate;
            out.push(Command::HighWatermark { offset: candidate });
            let resolved: Vec<AckId> =
                leading.waiting.iter().filter(|(_, &(end, _))| end <= candidate).map(|(&id, _)| id).collect();
            for id in resolved {
                leading.waiting.remove(&id);
                out.push(Command::AckResolved { id });
            }
        }
    }

    /// A follower's high watermark: the leader's, but never above what it holds durably.
    fn follow_high_watermark(&mut self, leader_high_watermark: Offset, out: &mut Vec<Command>) {
        let hw = leader_high_watermark.min(self.durable);
        if hw > self.high_watermark {
            self.high_watermark = hw;
            out.push(Command::HighWatermark { offset: hw });
        }
    }

    fn tick(&mut self, now_ms: u64, out: &mut Vec<Command>) {
        let min_insync = self.config.min_insync;
        let lag_max = self.config.lag_time_max_ms;
        let node = self.node;
        let Role::Leader(leading) = &mut self.role else { return };
        let expired: Vec<(AckId, Offset)> = leading
            .waiting
            .iter()
            .filter(|(_, &(_, deadline))| deadline <= now_ms)
            .map(|(&id, &(end, _))| (id, end))
            .collect();
        for (id, _) in expired {
            leading.waiting.remove(&id);
            let error = if leading.isr.len() < min_insync {
                ReplicaError::NotEnoughReplicasAfterAppend
            } else {
                ReplicaError::RequestTimedOut
            };
            out.push(Command::AckFailed { id, error });
        }
        if leading.proposed.is_none() {
            let lagging: Vec<NodeId> = leading
                .isr
                .iter()
                .filter(|&&member| member != node)
                .filter(|member| {
                    leading
                        .followers
                        .get(member)
                        .is_none_or(|f| now_ms.saturating_sub(f.caught_up_ms) > lag_max)
                })
                .copied()
                .collect();
            // A shrink; or, with none due, the committed ISR again to move the partition epoch
            // past a refused expansion.
            let seal = lagging.is_empty() && !leading.unsettled.is_empty() && now_ms >= leading.seal_at_ms;
            if seal {
                leading.seal_at_ms = now_ms + SEAL_RETRY_MS;
            }
            if seal || !lagging.is_empty() {
                let isr: BTreeSet<NodeId> =
                    leading.isr.iter().filter(|m| !lagging.contains(m)).copied().collect();
                out.push(Command::ProposeIsr {
                    isr: isr.iter().copied().collect(),
                    leader_epoch: leading.epoch,
                    partition_epoch: leading.partition_epoch,
                });
                // The maximal ISR keeps the members being removed until the change commits.
                leading.proposed = Some(leading.isr.clone());
                if !seal && !self.config.rules.isr_via_controller {
                    // For scenarios only: the pre-controller rule, the leader's word is final.
                    leading.isr = isr;
                    leading.proposed = None;
                    self.advance_high_watermark(out);
                }
            }
        }
    }

    fn fail_waiting(&mut self, error: ReplicaError, out: &mut Vec<Command>) {
        if let Role::Leader(leading) = &mut self.role {
            for id in std::mem::take(&mut leading.waiting).into_keys() {
                out.push(Command::AckFailed { id, error });
            }
        }
    }
}

#[cfg(test)]
mod tests;
