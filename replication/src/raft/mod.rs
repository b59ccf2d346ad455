//! The consensus shard's Raft, as a state machine around raft-rs 0.7 (`RawNode` over an
//! in-memory log): proposals, ticks and messages in; entries and hard state to persist,
//! messages to send and committed entries out. No I/O and no clock: the shell persists, sends
//! and ticks.
//!
//! **Persistence before send.** Messages that depend on what this node must make durable (its
//! vote, its term, appended entries: raft-rs's `persisted_messages`) are held back by the core
//! and handed out only by [`RaftCore::persisted`], which the shell calls once the entries and
//! hard state of the last [`RaftCore::ready`] are durable. Messages that depend on nothing
//! unpersisted (a leader's appends to followers) come out of `ready` at once.
//!
//! **Seeded elections.** raft-rs draws its randomized election timeout from `thread_rng` at
//! every reset (a new term or role). The core re-draws it from its own seeded [`Rng`] after
//! every event that changed the term or the role, so one seed gives one history.

use ::raft::eraftpb::{ConfState, Entry, EntryType, HardState, Message};
use ::raft::storage::MemStorage;
use ::raft::{Config, RawNode, StateRole};

use crate::rng::Rng;

/// How one Raft member is set up.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub id: u64,
    pub voters: Vec<u64>,
    /// Ticks without a leader before a member campaigns (randomized in `[n, 2n)`).
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub seed: u64,
    /// Test-only switch (always on outside tests): messages that depend on what the last
    /// ready must make durable wait for [`RaftCore::persisted`]. Off, they leave with the
    /// ready, so the simulator can show that its check of the rule catches a breach.
    #[doc(hidden)]
    pub persist_before_send: bool,
}

/// What the shell must do after an event.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RaftOutput {
    /// Append these to the durable Raft log (and overwrite from their first index).
    pub persist_entries: Vec<Entry>,
    /// Make this the durable hard state (term, vote, commit).
    pub persist_hard_state: Option<HardState>,
    /// Send now.
    pub send: Vec<Message>,
    /// Committed entries to apply, in order (empty `Normal` entries of new leaders excluded);
    /// only [`RaftCore::ready`] hands them out.
    pub committed: Vec<Entry>,
}

impl RaftOutput {
    pub fn is_empty(&self) -> bool {
        self.persist_entries.is_empty()
            && self.persist_hard_state.is_none()
            && self.send.is_empty()
            && self.committed.is_empty()
    }
}

pub use ::raft::eraftpb;
pub use ::raft::Error as RaftError;

/// One member of the consensus shard.
pub struct RaftCore {
    raw: RawNode<MemStorage>,
    rng: Rng,
    election_tick: usize,
    /// The number of the last ready handed out, until the shell persisted it.
    pending: Option<u64>,
    /// Messages that may leave only once `pending` is persisted.
    held: Vec<Message>,
    persist_before_send: bool,
    seen: (u64, StateRole),
    /// The index of the last committed entry handed out (empty ones included).
    applied: u64,
}

impl RaftCore {
    pub fn new(settings: &RaftSettings) -> Result<RaftCore, RaftError> {
        RaftCore::restart(settings, HardState::default(), &[])
    }

    /// A member restarted from what it had made durable: its hard state (term, vote, commit)
    /// and its log. Every committed entry is handed out again (from index 1: there are no
    /// snapshots yet), so the shell rebuilds its state machine from them.
    pub fn restart(
        settings: &RaftSettings,
        hard_state: HardState,
        entries: &[Entry],
    ) -> Result<RaftCore, RaftError> {
        let config = Config {
            id: settings.id,
            election_tick: settings.election_tick,
            heartbeat_tick: settings.heartbeat_tick,
            pre_vote: true,
            check_quorum: true,
            ..Config::default()
        };
        let storage = MemStorage::new_with_conf_state(ConfState::from((settings.voters.clone(), vec![])));
        if !entries.is_empty() {
            storage.wl().append(entries)?;
        }
        storage.wl().set_hardstate(hard_state);
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&config, storage, &logger)?;
        let seen = (raw.raft.term, raw.raft.state);
        let mut core = RaftCore {
            raw,
            rng: Rng::new(settings.seed),
            election_tick: settings.election_tick,
            pending: None,
            held: Vec::new(),
            persist_before_send: settings.persist_before_send,
            seen,
            applied: 0,
        };
        core.redraw_timeout();
        Ok(core)
    }

    pub fn id(&self) -> u64 {
        self.raw.raft.id
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this member knows (0: none).
    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// The index of the last entry in this member's log (durable or not).
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// The index of the last committed entry handed out to the shell.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// A leader whose own first entry of its term is committed and handed out: every entry of
    /// earlier terms it holds is then committed and applied, so its state machine is complete
    /// and it may decide (KRaft's active controller). A leader that is not active yet must
    /// not decide from its state, which may lack committed entries of its predecessors.
    pub fn is_active_leader(&self) -> bool {
        self.is_leader() && self.raw.raft.raft_log.term(self.applied).unwrap_or(0) == self.raw.raft.term
    }

    /// The election timeout in force, in ticks.
    pub fn election_timeout(&self) -> usize {
        self.raw.raft.randomized_election_timeout()
    }

    pub fn tick(&mut self) {
        self.raw.tick();
        self.after_event();
    }

    pub fn step(&mut self, message: Message) -> Result<(), RaftError> {
        let result = self.raw.step(message);
        self.after_event();
        result
    }

    /// Proposes an entry; only the leader takes proposals (requests reach the leader at the
    /// application level: a broker forwards them to the controller), so a follower refuses
    /// instead of relaying it as raft-rs would.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<(), RaftError> {
        if !self.is_leader() {
            return Err(RaftError::ProposalDropped);
        }
        let result = self.raw.propose(Vec::new(), data);
        self.after_event();
        result
    }

    /// What to persist, send and apply now; `None` while nothing is ready or the last ready is
    /// not persisted yet.
    ///
    /// Uses raft-rs's asynchronous persistence (`advance_append_async`, then
    /// `on_persist_ready`): the member keeps taking ticks, messages and proposals while the
    /// shell's disk write is under way (the synchronous `advance` must not see a message
    /// stepped between `ready` and itself: raft-rs panics on a follower that did).
    pub fn ready(&mut self) -> Option<RaftOutput> {
        if self.pending.is_some() || !self.raw.has_ready() {
            return None;
        }
        let mut ready = self.raw.ready();
        let mut output = RaftOutput { send: ready.take_messages(), ..RaftOutput::default() };
        if !ready.snapshot().is_empty() {
            // Snapshots come with the controller's snapshotting (not yet): nothing sends one.
            let snapshot = ready.snapshot().clone();
            self.raw.mut_store().wl().apply_snapshot(snapshot).expect("an in-memory log takes a snapshot");
        }
        output.committed = self.meaningful(ready.take_committed_entries());
        let entries = ready.take_entries();
        if !entries.is_empty() {
            self.raw.mut_store().wl().append(&entries).expect("an in-memory log takes entries");
        }
        output.persist_entries = entries;
        if let Some(hard_state) = ready.hs() {
            self.raw.mut_store().wl().set_hardstate(hard_state.clone());
            output.persist_hard_state = Some(hard_state.clone());
        }
        self.held = ready.take_persisted_messages();
        if !self.persist_before_send {
            output.send.append(&mut self.held);
        }
        self.pending = Some(ready.number());
        self.raw.advance_append_async(ready);
        self.raw.advance_apply_to(self.applied);
        self.after_event();
        Some(output)
    }

    /// The shell made the last ready's entries and hard state durable: the messages that
    /// waited for that. What this makes committable comes out of the next [`RaftCore::ready`].
    pub fn persisted(&mut self) -> RaftOutput {
        let Some(number) = self.pending.take() else {
            return RaftOutput::default();
        };
        self.raw.on_persist_ready(number);
        let output = RaftOutput { send: std::mem::take(&mut self.held), ..RaftOutput::default() };
        self.after_event();
        output
    }

    fn after_event(&mut self) {
        let now = (self.raw.raft.term, self.raw.raft.state);
        if now != self.seen {
            self.seen = now;
            self.redraw_timeout();
        }
    }

    /// Committed entries without the empty entry every new leader appends; notes how far
    /// the shell was handed entries.
    fn meaningful(&mut self, entries: Vec<Entry>) -> Vec<Entry> {
        if let Some(last) = entries.last() {
            self.applied = last.index;
        }
        entries
            .into_iter()
            .filter(|e| !(e.get_entry_type() == EntryType::EntryNormal && e.data.is_empty()))
            .collect()
    }

    fn redraw_timeout(&mut self) {
        let n = self.election_tick as u64;
        let timeout = self.rng.range(n, 2 * n) as usize;
        self.raw.raft.set_randomized_election_timeout(timeout);
    }
}

#[cfg(test)]
mod tests;
