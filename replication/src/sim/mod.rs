//! A deterministic simulator of a three-node cluster: every node is a broker and a member of
//! the consensus shard (`--roles broker,controller`). It runs the real cores on a simulated
//! clock, network and disk, with faults drawn from one seed:
//!
//! * the **consensus shard**: three [`RaftCore`]s (raft-rs) exchanging Raft messages over the
//!   lossy network, each persisting its entries and hard state to a simulated disk before the
//!   messages that depend on them leave, and rebuilt from that disk after a crash. The active
//!   leader (its first entry of its term committed and applied) runs the controller's rules
//!   ([`Cluster`]) on its state plus its own proposals, and commits each decision as one batch
//!   of metadata records (the real byte codec); every member replays the committed batches;
//! * **brokers** that register (the broker epoch is the Raft index of the registration),
//!   heartbeat the controller they believe leads, and **pull** the committed metadata batches
//!   from any controller over the same lossy network, applying them to their own
//!   [`MetadataImage`]: a broker acts on metadata only as late as it hears it;
//! * **partitions**: a topic of three partitions, each replicated on the three brokers, every
//!   replica the real [`ReplicaState`]; leaders send `AlterPartition` to the controller and
//!   followers fetch from the leader their own metadata names;
//! * **faults**: messages dropped, duplicated and delayed (so reordered); network partitions
//!   (a node cut off both ways, or one link cut one way) that heal after 0.3–2 s; brokers crash (losing part of what
//!   they had not synced, perhaps with the next record half written, which recovery must cut,
//!   and their Raft state that was not durable) and restart; an `fdatasync` fails now and
//!   then (the broker stops and reopens its log from disk); brokers pause
//!   past their session and come back as zombies that still think they lead (clients with stale
//!   metadata produce to them); the leader of partition 0 and the controller leader are each
//!   killed once at a time drawn from the seed, so every run fails over both.
//!
//! After every step the invariants of DESIGN-CLUSTER.md section 9 are checked; then a healing
//! phase without faults must converge. One seed replays a run bit for bit.
//!
//! Checked:
//! * **I1** when an `acks=all` produce is acknowledged, every member of the committed ISR holds
//!   the record durably at its offset; after healing, the leader's log holds every acknowledged
//!   record at its offset.
//! * **I2** the offset a partition exposes to consumers never goes back across leaders.
//! * **I3** any two replicas hold the same records below the smaller of their high watermarks.
//! * **I4** at most one replica leads a partition in a given epoch.
//! * **I5** a new leader comes from the ISR, or from the ELR when no ISR member is eligible,
//!   and never leads while fenced or unclean.
//! * **I6** a leader's high watermark does not move while its ISR, as the leader holds it, is
//!   below min.insync.replicas.
//! * **I7** a follower never truncates below its high watermark.
//! * **I8** a fetch made in another leader epoch than the one the replica leads gets no records.
//! * **I9** the committed ISR is within the replicas, holds the leader and no fenced member.
//! * **I10** a broker is unfenced only once it has applied the metadata up to its own
//!   registration; no committed partition has a fenced leader.
//! * **I11** every partition has an idempotent producer that retries a failed or unanswered
//!   batch with the same sequence number, perhaps at another leader: a batch is acknowledged
//!   at one offset only, and after healing each log holds every batch once, in sequence order.
//! * **I12** nothing at or above the leader's high watermark is acknowledged under
//!   `acks=all`; consumers (reading from any broker that believes it leads, zombies included)
//!   read only below its high watermark, and everything they read is in the final log at its
//!   offset (no read of an uncommitted record).
//! * **Raft**: one leader per term; every member commits the same entry at each index; a
//!   broker applies exactly the committed batches, in order, none skipped (its image is a
//!   prefix of the log); a vote, a term and appended entries are durable before the messages
//!   that depend on them leave (votes granted, vote requests, append acknowledgements).
//! * **Records**: every committed batch applies to the image (epochs rise, the leader is in
//!   its ISR, the ISR within the replicas).
//! * **Liveness** after healing: one active controller, every broker registered, unfenced and
//!   at the log's last batch; per partition a leader, ISR = replicas, every replica with the
//!   leader's records, the high watermark at the log end, no acknowledgement left waiting.
//!
//! Not simulated (yet): topic deletion and re-creation (topic ids), snapshots of the Raft log,
//! controlled shutdown, unclean (reboot) restarts, clock skew and disk corruption.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use skein_net::types::{BrokerEpoch, LeaderEpoch, NodeId, Offset, PartitionEpoch, TopicPartition};

use crate::controller::cluster::{Cluster, ControllerConfig, ControllerError};
use crate::metadata::record::{decode_batch, encode_batch};
use crate::metadata::{MetadataImage, MetadataRecord, TopicConfig};
use crate::partition::{Command, EpochCache, Event, FetchAnswer, ReplicaConfig, ReplicaState, Rules};
use crate::raft::eraftpb::{Entry, HardState, Message, MessageType};
use crate::raft::{RaftCore, RaftSettings};
use crate::rng::Rng;

/// How a run is set up.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub seed: u64,
    /// Ticks (10 ms each) with faults, before the healing phase.
    pub steps: u64,
    /// The replica's rules.
    pub rules: Rules,
    /// The shells' rules.
    pub shell: ShellRules,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig { seed, steps: 3_000, rules: Rules::ALL, shell: ShellRules::ALL }
    }
}

/// Rules of the shells around the cores (the broker's and the controller's), each with a
/// switch so that a test can show what it prevents; every one is on outside tests, and the
/// broker's shells must keep them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShellRules {
    /// A broker acts on its metadata (leads, follows) only once its image holds its own
    /// registration: before it, a restarted broker reads leaderships granted to its previous
    /// incarnation, whose unsynced records it may have lost.
    pub wait_for_own_registration: bool,
    /// An `AlterPartition` without a final answer (a timeout; "not the controller", a newer
    /// leader epoch or partition epoch, which the controller decides before it compares the
    /// proposal with its state) is sent again, never taken as refused: an earlier copy may be
    /// accepted and commit, and a leader that dropped the member it proposed from its maximal
    /// ISR would acknowledge records that member does not hold. Only a refusal decided at the
    /// proposal's own partition epoch (ineligible member, ISR outside the replicas) is final.
    pub retry_ambiguous_isr: bool,
    /// The controller decides only once its first entry of its term is applied (KRaft's
    /// active controller), never from a state that may lack its predecessors' last changes.
    pub active_controller_only: bool,
    /// Raft messages that depend on a vote, a term or entries leave only once those are
    /// durable ([`RaftSettings::persist_before_send`]).
    pub persist_before_send: bool,
    /// A leader checks an idempotent batch's sequence number against its log (the broker's
    /// producer table): a retried batch it holds is answered with its original offset, not
    /// appended again.
    pub deduplicate_retries: bool,
    /// A restarted broker's recovery cuts its log at the first torn batch (a bad CRC: the write
    /// the power cut in the middle of), as `skein-storage`'s recovery scan does, rather than
    /// serve it.
    pub cut_torn_tail: bool,
    /// A failed `fdatasync` stops the log until it is reopened from disk (the broker's log
    /// refuses writes after one; here the broker restarts), never retried: after an error the
    /// kernel may have dropped the dirty pages and marked them clean, so a second fsync
    /// "succeeds" over records that are not on disk (PostgreSQL's fsyncgate).
    pub stop_on_fsync_error: bool,
    /// A follower applies a fetch answer only if it answers its current fetch (records from
    /// its log end; a divergence found for the offset and last epoch it fetches with now), as
    /// Kafka's fetcher checks the partition's fetch offset against the request's.
    pub ignore_stale_answers: bool,
}

impl ShellRules {
    pub const ALL: ShellRules = ShellRules {
        wait_for_own_registration: true,
        retry_ambiguous_isr: true,
        active_controller_only: true,
        persist_before_send: true,
        deduplicate_retries: true,
        cut_torn_tail: true,
        stop_on_fsync_error: true,
        ignore_stale_answers: true,
    };
}

/// What a run did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub steps: u64,
    pub faults: u64,
    pub checks: u64,
    pub acked: u64,
    /// Partition leaderships taken up (every partition's first leader counts).
    pub leader_changes: u64,
    /// Raft terms that had a leader.
    pub controller_leaders: u64,
    /// Metadata batches committed.
    pub metadata_batches: u64,
    pub truncations: u64,
    /// Retried batches the leader found in its log and answered with their original offsets.
    pub duplicates: u64,
    /// Records consumers read.
    pub consumed: u64,
    /// Batches a crash left half written on disk.
    pub torn_writes: u64,
    /// Failed fsyncs.
    pub fsync_errors: u64,
    /// Each broken invariant, with the time it broke and a line of context.
    pub violations: Vec<String>,
    /// The notable events (faults, leaderships) before the first violation, oldest first.
    pub trace: Vec<String>,
}

impl SimReport {
    /// Adds another run's counts to these (the violations and traces stay each run's own).
    pub fn add_counts(&mut self, other: &SimReport) {
        self.steps += other.steps;
        self.faults += other.faults;
        self.checks += other.checks;
        self.acked += other.acked;
        self.leader_changes += other.leader_changes;
        self.controller_leaders += other.controller_leaders;
        self.metadata_batches += other.metadata_batches;
        self.truncations += other.truncations;
        self.duplicates += other.duplicates;
        self.consumed += other.consumed;
        self.torn_writes += other.torn_writes;
        self.fsync_errors += other.fsync_errors;
    }

    /// A run that acknowledged nothing, injected no fault, or failed over neither a partition
    /// nor the controller proves nothing: its set-up failed.
    pub fn exercised(&self) -> bool {
        self.acked > 0
            && self.faults > 0
            && self.leader_changes > PARTITIONS as u64
            && self.controller_leaders > 1
            && self.consumed > 0
    }
}

const TICK_MS: u64 = 10;
/// What a torn write leaves of a record's value (some of its bytes, not all).
const TORN: u64 = 0xdead_0000_0000;
const HEAL_TICKS: u64 = 2_000;
const NODES: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];
const TOPIC: &str = "t";
const PARTITIONS: u32 = 3;
/// min.insync.replicas of the simulated partitions (3 replicas each).
const MIN_INSYNC: usize = 2;
/// Raft ticks every this many simulator ticks (20 ms); elections after 10–20 Raft ticks.
const RAFT_TICK_EVERY: u64 = 2;
const ELECTION_TICK: usize = 10;
const HEARTBEAT_TICK: usize = 2;
/// Brokers heartbeat (or register) every this many ticks, and pull metadata every
/// `METADATA_EVERY`.
const HEARTBEAT_EVERY: u64 = 5;
const METADATA_EVERY: u64 = 2;
const SESSION_TIMEOUT_MS: u64 = 400;
/// Batches per metadata answer.
const METADATA_BATCHES_MAX: usize = 32;

#[derive(Debug, Clone)]
enum Msg {
    // Partition replication.
    Fetch {
        partition: u32,
        from: NodeId,
        epoch: LeaderEpoch,
        fetch_offset: Offset,
        last: Option<LeaderEpoch>,
        durable: Offset,
    },
    Records {
        partition: u32,
        epoch: LeaderEpoch,
        from: Offset,
        records: Vec<(LeaderEpoch, u64)>,
        high_watermark: Offset,
    },
    Diverging {
        partition: u32,
        epoch: LeaderEpoch,
        diverging: LeaderEpoch,
        end: Offset,
        /// The fetch it answers: its offset and last fetched epoch.
        fetch_offset: Offset,
        last: Option<LeaderEpoch>,
    },
    Refused {
        partition: u32,
        epoch: LeaderEpoch,
    },
    // The consensus shard.
    Raft(Box<Message>),
    // Brokers and the controller.
    FetchMetadata {
        from: NodeId,
        after: u64,
    },
    /// The committed batches after index `after` (the fetch's position).
    MetadataBatches {
        after: u64,
        batches: Vec<(u64, Vec<u8>)>,
    },
    Register {
        from: NodeId,
        incarnation: u64,
    },
    Registered {
        incarnation: u64,
        epoch: BrokerEpoch,
    },
    Heartbeat {
        from: NodeId,
        epoch: BrokerEpoch,
        applied: u64,
    },
    /// The heartbeat's broker epoch is not the broker's current one: register again.
    StaleEpoch {
        epoch: BrokerEpoch,
    },
    HeartbeatOk,
    AlterPartition {
        partition: u32,
        from: NodeId,
        generation: u64,
        leader_epoch: LeaderEpoch,
        partition_epoch: PartitionEpoch,
        isr: Vec<(NodeId, BrokerEpoch)>,
    },
    /// The controller's final answer: committed, or refused (and why).
    AlterAnswer {
        partition: u32,
        generation: u64,
        refused: Option<ControllerError>,
    },
    /// This node is not the active controller; the Raft leader it knows (0: none).
    NotController {
        leader: u64,
    },
    /// An administrator creates the topic.
    CreateTopic,
}

#[derive(Debug, Clone)]
enum Ev {
    Tick,
    Deliver {
        to: NodeId,
        msg: Msg,
    },
    SendFetch {
        node: NodeId,
        partition: u32,
        epoch: LeaderEpoch,
    },
    /// A fetch sent as the partition's `generation`-th got no answer in time: send it again.
    FetchTimeout {
        node: NodeId,
        partition: u32,
        epoch: LeaderEpoch,
        generation: u64,
    },
    /// An `AlterPartition` got no answer in time: the leader may propose again.
    AlterTimeout {
        node: NodeId,
        partition: u32,
        generation: u64,
    },
    /// The disk finished writing a node's Raft entries and hard state (of that incarnation).
    RaftPersisted {
        node: NodeId,
        incarnation: u64,
    },
    Restart(NodeId),
    /// A paused broker runs again (a SIGSTOP or a long GC pause ends).
    Resume(NodeId),
    /// The network partition ends.
    Heal,
}

/// A notable event, kept for the short trace of a failing run (formatted only then).
#[derive(Debug, Clone, Copy)]
enum Notable {
    Crash(NodeId),
    Restart(NodeId),
    Pause(NodeId, u64),
    Resume(NodeId),
    Cut(NodeId, NodeId),
    Heal,
    Controller(NodeId, u64),
    Leads(NodeId, u32, LeaderEpoch),
}

/// How many notable events the short trace keeps.
const TRACE_EVENTS: usize = 12;

/// One partition's replica on a node.
struct Part {
    replica: ReplicaState,
    /// The log as it is in memory: (epoch, value) at each offset.
    log: Vec<(LeaderEpoch, u64)>,
    /// How much of it is on disk.
    synced: usize,
    /// The record a crash cut in the middle of its write: on disk after the log, with a
    /// checksum that does not match (until recovery cuts it, or serves it).
    torn: Option<(LeaderEpoch, u64)>,
    /// After an fsync error that was retried (rule off): records from here on are in memory
    /// but their pages were dropped, so they are not on disk whatever a later fsync says.
    dropped_from: Option<usize>,
    /// The (leader epoch, partition epoch) of the last metadata this broker acted on.
    known: Option<(LeaderEpoch, u32)>,
    /// Fetches sent (a timeout resends only if no answer came since).
    fetch_generation: u64,
    /// The leader this replica fetches from, as its metadata says.
    fetch_leader: Option<NodeId>,
    /// ISR proposals sent (an answer or a timeout counts only for the latest).
    alter_generation: u64,
    /// The proposal without a final answer yet: sent again at every timeout.
    alter_pending: Option<Msg>,
}

/// An idempotent producer: the next sequence number, and the batch in flight (sequence,
/// value, the acknowledgement its last attempt waits for).
#[derive(Default)]
struct Producer {
    next_seq: u64,
    inflight: Option<(u64, u64, Option<u64>)>,
}

/// What a node's Raft member made durable.
#[derive(Default, Clone)]
struct RaftDisk {
    hard_state: HardState,
    entries: Vec<Entry>,
}

/// What a node's Raft member handed out and the disk is still writing.
struct Persisting {
    entries: Vec<Entry>,
    hard_state: Option<HardState>,
}

struct Node {
    alive: bool,
    /// Paused (not running, not heartbeating, deaf) until this time.
    paused_until: u64,
    /// Starts of this node's process (a restart is a new incarnation).
    incarnation: u64,
    // The broker.
    broker_epoch: Option<BrokerEpoch>,
    image: MetadataImage,
    /// The Raft index of the last metadata batch applied.
    applied: u64,
    controller_hint: NodeId,
    answered: bool,
    parts: BTreeMap<u32, Part>,
    // The controller.
    raft: RaftCore,
    disk: RaftDisk,
    persisting: Option<Persisting>,
    /// The cluster as the committed records say.
    committed: Cluster,
    /// On the active leader: the committed cluster plus its own proposals, with sessions.
    deciding: Option<Cluster>,
    /// The committed metadata batches: (Raft index, encoded records).
    log: Vec<(u64, Vec<u8>)>,
    /// Answers sent once the entry at this index is committed.
    replies: BTreeMap<u64, (NodeId, Msg)>,
}

struct Sim {
    config: SimConfig,
    rng: Rng,
    now: u64,
    tick_count: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    nodes: Vec<Node>,
    faults_on: bool,
    /// Links the network partition of the moment cuts: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Each partition's idempotent producer.
    producers: BTreeMap<u32, Producer>,
    /// The last notable events, with their time (the short trace of a failing run).
    recent: std::collections::VecDeque<(u64, Notable)>,
    /// What consumers read: (partition, offset, value); and each partition's consumer position.
    consumed: Vec<(u32, Offset, u64)>,
    consumed_to: BTreeMap<u32, Offset>,
    /// The producer sequence number of each value.
    seq_of: BTreeMap<u64, u64>,
    /// The offset each (partition, sequence) was acknowledged at.
    acked_seq: BTreeMap<(u32, u64), Offset>,
    /// acks=all produces waiting: id → (partition, leader, offset, value).
    waiting: BTreeMap<u64, (u32, NodeId, Offset, u64)>,
    acked: Vec<(u32, Offset, u64)>,
    next_value: u64,
    next_ack: u64,
    /// The highest offset exposed per (partition, leader epoch).
    max_exposed: BTreeMap<(u32, u32), Offset>,
    leaders_by_epoch: BTreeMap<(u32, u32), NodeId>,
    /// When the nemesis kills partition 0's leader, and the controller leader.
    leader_crash_at: u64,
    controller_crash_at: u64,
    /// Every committed metadata batch, by Raft index: (term, bytes) — what every member must
    /// commit at that index.
    committed: BTreeMap<u64, (u64, Vec<u8>)>,
    /// The image the committed batches build, in index order.
    image: MetadataImage,
    /// The leader of each Raft term.
    raft_leaders: BTreeMap<u64, u64>,
    /// The highest metadata index each broker incarnation (node, broker epoch) applied.
    applied_by_epoch: BTreeMap<(NodeId, BrokerEpoch), u64>,
    report: SimReport,
}

fn replica_config(rules: Rules) -> ReplicaConfig {
    ReplicaConfig { min_insync: MIN_INSYNC, lag_time_max_ms: 300, rules }
}

fn controller_config() -> ControllerConfig {
    ControllerConfig {
        session_timeout_ms: SESSION_TIMEOUT_MS,
        min_insync: MIN_INSYNC,
        ..ControllerConfig::default()
    }
}

fn raft_settings(config: &SimConfig, id: NodeId, incarnation: u64) -> RaftSettings {
    let seed = config.seed;
    RaftSettings {
        id: u64::from(id.0),
        voters: NODES.iter().map(|n| u64::from(n.0)).collect(),
        election_tick: ELECTION_TICK,
        heartbeat_tick: HEARTBEAT_TICK,
        seed: seed.wrapping_mul(1_000_003).wrapping_add(u64::from(id.0) * 1_000 + incarnation),
        persist_before_send: config.shell.persist_before_send,
    }
}

fn topic_config() -> TopicConfig {
    TopicConfig {
        partitions: PARTITIONS,
        retention_ms: None,
        retention_bytes: None,
        segment_bytes: 1 << 30,
        segment_ms: None,
        max_message_bytes: 1 << 20,
        created_ms: 0,
    }
}

/// One line of the short trace.
fn describe(at: u64, event: Notable) -> String {
    let what = match event {
        Notable::Crash(id) => format!("{id} crashes"),
        Notable::Restart(id) => format!("{id} restarts"),
        Notable::Pause(id, ms) => format!("{id} pauses for {ms} ms"),
        Notable::Resume(id) => format!("{id} resumes"),
        Notable::Cut(from, to) => format!("the link {from} -> {to} is cut"),
        Notable::Heal => "the network heals".to_owned(),
        Notable::Controller(id, term) => format!("{id} leads the consensus shard (term {term})"),
        Notable::Leads(id, partition, epoch) => {
            format!("{id} leads {TOPIC}-{partition} in epoch {}", epoch.0)
        }
    };
    format!("t={at}ms {what}")
}

fn trace() -> bool {
    std::env::var_os("SKEIN_SIM_TRACE").is_some()
}

/// Runs one seed.
///
/// A panic inside a core (raft-rs asserts on a log that lost entries it acknowledged, for
/// one) ends the run with a violation naming it, at the simulated time it happened.
pub fn run(config: SimConfig) -> SimReport {
    let mut sim = Sim::new(config);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    if let Err(payload) = outcome {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        sim.violation("panic", message);
    }
    sim.report.steps = sim.tick_count;
    sim.report
}

impl Sim {
    /// The safety phase with faults, then the healing phase, then the liveness checks.
    fn run(&mut self) {
        self.faults_on = true;
        for _ in 0..self.config.steps {
            self.step();
        }
        self.faults_on = false;
        self.cut.clear();
        for id in NODES {
            if !self.node(id).alive {
                self.restart(id);
            }
            if self.node(id).paused_until > self.now {
                self.node_mut(id).paused_until = 0;
            }
        }
        for _ in 0..HEAL_TICKS {
            self.step();
        }
        self.check_healed();
    }
}

impl Part {
    fn new(node: NodeId, rules: Rules, log: Vec<(LeaderEpoch, u64)>) -> Part {
        let mut epochs = EpochCache::default();
        for (offset, (epoch, _)) in log.iter().enumerate() {
            epochs.assign(*epoch, offset as Offset);
        }
        let end = log.len() as Offset;
        Part {
            replica: ReplicaState::new(node, replica_config(rules), 0, end, end, epochs, 0),
            synced: log.len(),
            log,
            torn: None,
            dropped_from: None,
            known: None,
            fetch_generation: 0,
            fetch_leader: None,
            alter_generation: 0,
            alter_pending: None,
        }
    }
}

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let nodes = NODES
            .iter()
            .map(|&id| Node {
                alive: true,
                paused_until: 0,
                incarnation: 0,
                broker_epoch: None,
                image: MetadataImage::default(),
                applied: 0,
                controller_hint: id,
                answered: true,
                parts: (0..PARTITIONS).map(|p| (p, Part::new(id, config.rules, Vec::new()))).collect(),
                raft: RaftCore::new(&raft_settings(&config, id, 0)).expect("a valid Raft set-up"),
                disk: RaftDisk::default(),
                persisting: None,
                committed: Cluster::new(controller_config()),
                deciding: None,
                log: Vec::new(),
                replies: BTreeMap::new(),
            })
            .collect();
        let mut sim = Sim {
            config,
            rng: Rng::new(config.seed),
            now: 0,
            tick_count: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes,
            faults_on: false,
            waiting: BTreeMap::new(),
            cut: BTreeSet::new(),
            producers: BTreeMap::new(),
            recent: std::collections::VecDeque::with_capacity(TRACE_EVENTS),
            consumed: Vec::new(),
            consumed_to: BTreeMap::new(),
            seq_of: BTreeMap::new(),
            acked_seq: BTreeMap::new(),
            acked: Vec::new(),
            next_value: 1,
            next_ack: 1,
            max_exposed: BTreeMap::new(),
            leaders_by_epoch: BTreeMap::new(),
            leader_crash_at: 0,
            controller_crash_at: 0,
            committed: BTreeMap::new(),
            image: MetadataImage::default(),
            raft_leaders: BTreeMap::new(),
            applied_by_epoch: BTreeMap::new(),
            report: SimReport::default(),
        };
        let quarter = (config.steps / 4).max(1);
        sim.leader_crash_at = sim.rng.range(quarter, 2 * quarter + 1) * TICK_MS;
        sim.controller_crash_at = sim.rng.range(quarter, 3 * quarter + 1) * TICK_MS;
        sim
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0 as usize - 1]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.0 as usize - 1]
    }

    fn part(&self, id: NodeId, partition: u32) -> &Part {
        &self.node(id).parts[&partition]
    }

    fn part_mut(&mut self, id: NodeId, partition: u32) -> &mut Part {
        self.node_mut(id).parts.get_mut(&partition).expect("every node holds every partition")
    }

    /// Alive and not paused.
    fn running(&self, id: NodeId) -> bool {
        let node = self.node(id);
        node.alive && self.now >= node.paused_until
    }

    fn random_node(&mut self) -> NodeId {
        NODES[self.rng.range(0, NODES.len() as u64) as usize]
    }

    /// If `id` is paused, the event waits until it runs again; returns whether it waits.
    fn defer_if_paused(&mut self, id: NodeId, event: &Ev) -> bool {
        let node = self.node(id);
        if node.alive && self.now < node.paused_until {
            let delay = node.paused_until - self.now + 1;
            self.schedule(delay, event.clone());
            return true;
        }
        false
    }

    fn schedule(&mut self, delay_ms: u64, event: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay_ms, self.seq)));
        self.events.insert(self.seq, event);
    }

    fn violation(&mut self, rule: &str, detail: String) {
        if trace() {
            eprintln!("t={} VIOLATION {rule}: {detail}", self.now);
        }
        if self.report.violations.is_empty() {
            self.report.trace = self.recent.iter().map(|&(at, event)| describe(at, event)).collect();
        }
        self.report.violations.push(format!("t={}ms {rule}: {detail}", self.now));
    }

    fn notable(&mut self, event: Notable) {
        if self.recent.len() == TRACE_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back((self.now, event));
    }

    /// Sends a message over the network: delayed 1–40 ms; while faults are on, dropped 5% of
    /// the time, sent twice 1% of the time, and lost on a link the nemesis has cut.
    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        if self.faults_on {
            if from != to && self.cut.contains(&(from, to)) {
                return;
            }
            if self.rng.range(0, 100) < 5 {
                self.report.faults += 1;
                return;
            }
            if self.rng.range(0, 100) < 1 {
                self.report.faults += 1;
                let delay = self.rng.range(1, 80);
                self.schedule(delay, Ev::Deliver { to, msg: msg.clone() });
            }
        }
        let delay = self.rng.range(1, 40);
        self.schedule(delay, Ev::Deliver { to, msg });
    }

    /// One tick: the events due, then the tick's own work.
    fn step(&mut self) {
        let until = self.now + TICK_MS;
        while let Some(&Reverse((at, seq))) = self.queue.peek() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.now = at.max(self.now);
            let event = self.events.remove(&seq).expect("scheduled");
            self.handle(event);
        }
        self.now = until;
        self.tick_count += 1;
        self.handle(Ev::Tick);
        self.check();
    }

    fn handle(&mut self, event: Ev) {
        let target = match &event {
            Ev::Deliver { to, .. } => Some(*to),
            Ev::SendFetch { node, .. }
            | Ev::FetchTimeout { node, .. }
            | Ev::AlterTimeout { node, .. }
            | Ev::RaftPersisted { node, .. } => Some(*node),
            _ => None,
        };
        if let Some(id) = target {
            if !self.node(id).alive {
                return;
            }
            if self.defer_if_paused(id, &event) {
                return;
            }
        }
        match event {
            Ev::Tick => self.tick(),
            Ev::Deliver { to, msg } => self.deliver(to, msg),
            Ev::SendFetch { node, partition, epoch } => self.send_fetch(node, partition, epoch),
            Ev::FetchTimeout { node, partition, epoch, generation } => {
                if self.part(node, partition).fetch_generation == generation {
                    self.send_fetch(node, partition, epoch);
                }
            }
            Ev::AlterTimeout { node, partition, generation } => {
                // No answer is no answer: the proposal may be committed yet (a controller
                // failover delays it by seconds). Dropping it would let the leader leave the
                // member it proposed out of its high watermark while the controller has it in
                // the ISR (the simulator found this: acknowledgements a new ISR member did not
                // hold). The same proposal goes again until a final answer or new metadata.
                let part = self.part(node, partition);
                if part.alter_generation == generation && !self.config.shell.retry_ambiguous_isr {
                    self.part_mut(node, partition).alter_pending = None;
                    self.replica_event(node, partition, Event::IsrRejected);
                    return;
                }
                if part.alter_generation == generation {
                    if let Some(msg) = part.alter_pending.clone() {
                        let to = self.node(node).controller_hint;
                        self.send(node, to, msg);
                        self.schedule(500, Ev::AlterTimeout { node, partition, generation });
                    }
                }
            }
            Ev::RaftPersisted { node, incarnation } => {
                if self.node(node).incarnation == incarnation {
                    self.raft_persisted(node);
                }
            }
            Ev::Restart(id) => self.restart(id),
            Ev::Heal => {
                self.notable(Notable::Heal);
                self.cut.clear();
            }
            Ev::Resume(id) => {
                self.notable(Notable::Resume(id));
                self.node_mut(id).paused_until = 0;
                // It learns, late, what the controller decided meanwhile: from its next pull.
            }
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        let count = self.tick_count;
        for id in NODES {
            if !self.running(id) {
                continue;
            }
            // The consensus shard: Raft time, then the active controller's session checks.
            if count.is_multiple_of(RAFT_TICK_EVERY) {
                self.node_mut(id).raft.tick();
                self.drive_raft(id);
            }
            if let Some(deciding) = self.node_mut(id).deciding.as_mut() {
                let before = deciding.brokers.clone();
                let changes = deciding.tick(now);
                let records = deciding.records_of(&before, &changes);
                self.propose(id, records, None);
            }
            // The broker: registration or heartbeat, metadata pulls.
            if count % HEARTBEAT_EVERY == u64::from(id.0) % HEARTBEAT_EVERY {
                self.heartbeat(id);
            }
            if count.is_multiple_of(METADATA_EVERY) {
                let to = self.random_node();
                let after = self.node(id).applied;
                self.send(id, to, Msg::FetchMetadata { from: id, after });
            }
            // Disks sync now and then; replicas learn time passed.
            for partition in 0..PARTITIONS {
                if self.rng.range(0, 100) < 30 {
                    let part = self.part(id, partition);
                    let dirty = part.log.len() > part.synced;
                    if self.faults_on && dirty && self.rng.range(0, 2000) == 0 {
                        // fdatasync fails: the dirty pages may be gone.
                        self.report.faults += 1;
                        self.report.fsync_errors += 1;
                        if self.config.shell.stop_on_fsync_error {
                            self.crash(id);
                            break;
                        }
                        let part = self.part_mut(id, partition);
                        part.dropped_from = Some(part.dropped_from.unwrap_or(part.synced).min(part.synced));
                    }
                    let part = self.part_mut(id, partition);
                    part.synced = part.log.len();
                    let offset = part.synced as Offset;
                    self.replica_event(id, partition, Event::Durable { offset });
                }
                self.replica_event(id, partition, Event::Tick);
            }
        }
        // An administrator creates the topic until it exists.
        if !self.image.topics.contains_key(TOPIC) && count.is_multiple_of(10) {
            let to = self.random_node();
            self.send(to, to, Msg::CreateTopic);
        }
        // A client produces with acks=all to a leader, now and then; a consumer reads.
        if self.faults_on && self.rng.range(0, 100) < 40 {
            self.produce();
        }
        if self.faults_on && self.rng.range(0, 100) < 30 {
            self.consume();
        }
        if self.faults_on {
            self.nemesis();
        }
    }

    fn nemesis(&mut self) {
        let alive = |sim: &Sim| sim.nodes.iter().filter(|n| n.alive).count();
        // Partition 0's leader dies once, and the controller leader once, at times drawn from
        // the seed.
        if self.now == self.leader_crash_at {
            let tp = TopicPartition::new(TOPIC, 0);
            if let Some(leader) = self.image.partitions.get(&tp).and_then(|p| p.leader) {
                if self.node(leader).alive && alive(self) > 1 {
                    self.crash(leader);
                }
            }
        }
        if self.now == self.controller_crash_at {
            let leader = NODES.iter().copied().find(|&n| self.node(n).alive && self.node(n).raft.is_leader());
            if let Some(leader) = leader {
                if alive(self) > 1 {
                    self.crash(leader);
                }
            }
        }
        // A broker pauses for longer than its session (it comes back a zombie that still
        // thinks it leads, until it hears the metadata).
        if self.rng.range(0, 1000) < 3 {
            let id = self.random_node();
            if self.running(id) {
                self.report.faults += 1;
                let pause = self.rng.range(300, 900);
                self.node_mut(id).paused_until = self.now + pause;
                self.notable(Notable::Pause(id, pause));
                self.schedule(pause, Ev::Resume(id));
            }
        }
        // The network splits: one node cut off both ways, or one link one way; it heals after
        // 0.3–2 s.
        if self.cut.is_empty() && self.rng.range(0, 1000) < 2 {
            self.report.faults += 1;
            let a = self.random_node();
            if self.rng.range(0, 2) == 0 {
                for b in NODES.into_iter().filter(|&b| b != a) {
                    self.cut.insert((a, b));
                    self.cut.insert((b, a));
                }
            } else {
                let b = NODES[(a.0 as usize + self.rng.range(0, 2) as usize) % NODES.len()];
                self.cut.insert((a, b));
            }
            if trace() {
                eprintln!("t={} network cut {:?}", self.now, self.cut);
            }
            let cut: Vec<_> = self.cut.iter().copied().collect();
            for (from, to) in cut {
                self.notable(Notable::Cut(from, to));
            }
            let heal = self.rng.range(300, 2_000);
            self.schedule(heal, Ev::Heal);
        }
        // A broker crashes.
        if self.rng.range(0, 1000) < 4 {
            let id = self.random_node();
            if self.node(id).alive && alive(self) > 1 {
                self.crash(id);
            }
        }
    }

    /// The broker registers (until it has an epoch) or heartbeats, to the controller it
    /// believes leads; one that did not answer is replaced by a random one.
    fn heartbeat(&mut self, id: NodeId) {
        if !self.node(id).answered {
            let hint = self.random_node();
            self.node_mut(id).controller_hint = hint;
        }
        let node = self.node_mut(id);
        node.answered = false;
        let to = node.controller_hint;
        let msg = match node.broker_epoch {
            None => Msg::Register { from: id, incarnation: node.incarnation },
            Some(epoch) => Msg::Heartbeat { from: id, epoch, applied: node.applied },
        };
        self.send(id, to, msg);
    }

    /// The idempotent producer of a partition (one per partition, one batch in flight) sends
    /// its batch to a broker that believes it leads (with stale metadata it may be a zombie: a
    /// deposed leader that has not heard yet); an attempt that failed (refused, timed out, its
    /// leader died) is sent again with the same sequence number, perhaps to another leader.
    ///
    /// The leader's producer state is a function of its log, as the broker's table is (rebuilt
    /// from batch headers, so a truncation rebuilds it): the next sequence is one past its last
    /// record's; a batch whose sequence is among its last [`skein_net::IDEMPOTENCE_WINDOW`] is
    /// a duplicate, answered with its original offset once the high watermark passes it;
    /// another gap is out of order (retried).
    fn produce(&mut self) {
        let partition = self.rng.range(0, u64::from(PARTITIONS)) as u32;
        let producer = self.producers.entry(partition).or_default();
        let (seq, value) = match producer.inflight {
            Some((_, _, Some(ack))) if self.waiting.contains_key(&ack) => return,
            Some((seq, value, _)) => (seq, value),
            None => {
                let (seq, value) = (producer.next_seq, self.next_value);
                self.next_value += 1;
                self.seq_of.insert(value, seq);
                (seq, value)
            }
        };
        self.producers.get_mut(&partition).expect("made above").inflight = Some((seq, value, None));
        let Some(leader) = self.random_believer(partition) else { return };
        let now = self.now;
        let part = self.part(leader, partition);
        if part.replica.check_acks_all().is_err() {
            return;
        }
        let Some(epoch) = part.replica.leader_epoch() else { return };
        let seq_at = |offset: usize| self.seq_of[&part.log[offset].1];
        let end = part.log.len();
        let duplicate = (end.saturating_sub(skein_net::IDEMPOTENCE_WINDOW)..end)
            .rev()
            .find(|&offset| seq_at(offset) == seq);
        let expected = if end == 0 { 0 } else { seq_at(end - 1) + 1 };
        let dedupe = self.config.shell.deduplicate_retries;
        let (offset, mut commands) = match duplicate {
            Some(offset) if dedupe => {
                self.report.duplicates += 1;
                (offset as Offset, Vec::new())
            }
            _ if seq == expected || !dedupe => {
                let part = self.part_mut(leader, partition);
                part.log.push((epoch, value));
                let offset = end as Offset;
                (offset, part.replica.on(Event::Appended { end: offset + 1, epoch }, now))
            }
            // Out of order: an earlier batch is missing here; the producer tries again.
            _ => return,
        };
        let id = self.next_ack;
        self.next_ack += 1;
        self.waiting.insert(id, (partition, leader, offset, value));
        self.producers.get_mut(&partition).expect("made above").inflight = Some((seq, value, Some(id)));
        commands.extend(
            self.part_mut(leader, partition)
                .replica
                .on(Event::AwaitAck { id, end: offset + 1, deadline_ms: now + 2_000 }, now),
        );
        self.apply(leader, partition, commands);
    }

    /// One of the running brokers that believe they lead `partition` (a zombie among them,
    /// perhaps), as a client with stale metadata would pick: drawn from the seed.
    fn random_believer(&mut self, partition: u32) -> Option<NodeId> {
        let believers: Vec<NodeId> = NODES
            .iter()
            .copied()
            .filter(|&id| self.running(id) && self.part(id, partition).replica.is_leader())
            .collect();
        if believers.is_empty() {
            return None;
        }
        Some(believers[self.rng.range(0, believers.len() as u64) as usize])
    }

    /// A consumer of a partition fetches from a broker that believes it leads (perhaps a
    /// zombie) what that broker lets consumers read: below its high watermark, once a new
    /// leader's has reached its epoch start (I12). What it reads must never be lost or change
    /// (checked after healing): no read of a record that is not committed.
    fn consume(&mut self) {
        let partition = self.rng.range(0, u64::from(PARTITIONS)) as u32;
        let Some(leader) = self.random_believer(partition) else { return };
        let part = self.part(leader, partition);
        let Ok(end) = part.replica.readable_end() else { return };
        let above = end > part.replica.high_watermark();
        let position = self.consumed_to.get(&partition).copied().unwrap_or(0);
        let read: Vec<(Offset, u64)> = (position..end.min(part.log.len() as Offset))
            .map(|offset| (offset, part.log[offset as usize].1))
            .collect();
        if above {
            let detail = format!("{leader} lets consumers read to {end}, above its high watermark");
            self.violation("I12", detail);
        }
        self.report.consumed += read.len() as u64;
        for (offset, value) in read {
            self.consumed.push((partition, offset, value));
        }
        if end > position {
            self.consumed_to.insert(partition, end);
        }
    }

    fn replica_event(&mut self, id: NodeId, partition: u32, event: Event) {
        let now = self.now;
        let commands = self.part_mut(id, partition).replica.on(event, now);
        self.apply(id, partition, commands);
    }

    fn send_fetch(&mut self, node: NodeId, partition: u32, epoch: LeaderEpoch) {
        let part = self.part(node, partition);
        let Some((current, fetch_offset, last, durable)) = part.replica.next_fetch() else { return };
        if current != epoch {
            return;
        }
        let Some(leader) = part.fetch_leader else { return };
        let part = self.part_mut(node, partition);
        part.fetch_generation += 1;
        let generation = part.fetch_generation;
        self.send(node, leader, Msg::Fetch { partition, from: node, epoch, fetch_offset, last, durable });
        self.schedule(300, Ev::FetchTimeout { node, partition, epoch, generation });
    }

    fn deliver(&mut self, to: NodeId, msg: Msg) {
        match msg {
            Msg::Fetch { partition, from, epoch, fetch_offset, last, durable } => {
                self.leader_fetch(to, partition, from, epoch, fetch_offset, last, durable)
            }
            Msg::Records { partition, epoch, .. }
            | Msg::Diverging { partition, epoch, .. }
            | Msg::Refused { partition, epoch } => self.fetch_answered(to, partition, epoch, msg),
            Msg::Raft(message) => {
                // Messages to or from another term or a stale member are raft-rs's business.
                let _ = self.node_mut(to).raft.step(*message);
                self.drive_raft(to);
            }
            Msg::FetchMetadata { from, after } => {
                let log = &self.node(to).log;
                let start = log.partition_point(|(index, _)| *index <= after);
                let batches: Vec<_> = log[start..].iter().take(METADATA_BATCHES_MAX).cloned().collect();
                if !batches.is_empty() {
                    self.send(to, from, Msg::MetadataBatches { after, batches });
                }
            }
            Msg::MetadataBatches { after, batches } => {
                // An answer to a fetch from another position (an earlier one, or one sent
                // before this broker restarted) is not applied.
                if after == self.node(to).applied {
                    self.learn(to, batches);
                }
            }
            Msg::Register { from, incarnation } => {
                let Some(index) = self.active(to, from) else { return };
                let now = self.now;
                let deciding = self.node_mut(to).deciding.as_mut().expect("active");
                let before = deciding.brokers.clone();
                let epoch = BrokerEpoch(index);
                let changes = deciding.register(from, epoch, false, now);
                let records = deciding.records_of(&before, &changes);
                self.propose(to, records, Some((from, Msg::Registered { incarnation, epoch })));
            }
            Msg::Registered { incarnation, epoch } => {
                let node = self.node_mut(to);
                node.answered = true;
                if node.incarnation == incarnation && node.broker_epoch.is_none_or(|e| e < epoch) {
                    node.broker_epoch = Some(epoch);
                    let applied = node.applied;
                    let seen = self.applied_by_epoch.entry((to, epoch)).or_default();
                    *seen = (*seen).max(applied);
                    self.notify(to);
                }
            }
            Msg::Heartbeat { from, epoch, applied } => {
                if self.active(to, from).is_none() {
                    return;
                }
                let now = self.now;
                let deciding = self.node_mut(to).deciding.as_mut().expect("active");
                let before = deciding.brokers.clone();
                match deciding.heartbeat(from, epoch, applied, now) {
                    Ok(changes) => {
                        let records = deciding.records_of(&before, &changes);
                        self.propose(to, records, None);
                        self.send(to, from, Msg::HeartbeatOk);
                    }
                    Err(_) => self.send(to, from, Msg::StaleEpoch { epoch }),
                }
            }
            Msg::HeartbeatOk => self.node_mut(to).answered = true,
            Msg::StaleEpoch { epoch } => {
                let node = self.node_mut(to);
                node.answered = true;
                if node.broker_epoch == Some(epoch) {
                    node.broker_epoch = None;
                }
            }
            Msg::NotController { leader } => {
                let node = self.node_mut(to);
                node.answered = true;
                if let Some(&hint) = NODES.iter().find(|n| u64::from(n.0) == leader) {
                    node.controller_hint = hint;
                }
            }
            Msg::AlterPartition { partition, from, generation, leader_epoch, partition_epoch, isr } => {
                if self.active(to, from).is_none() {
                    return;
                }
                let tp = TopicPartition::new(TOPIC, partition);
                let deciding = self.node_mut(to).deciding.as_mut().expect("active");
                let before = deciding.brokers.clone();
                let decided = deciding.alter_partition(&tp, from, leader_epoch, partition_epoch, &isr);
                if trace() {
                    eprintln!("t={} {to} AlterPartition {tp} from {from} g{generation} le{} pe{} {isr:?}: {decided:?}", self.now, leader_epoch.0, partition_epoch.0);
                }
                let deciding = self.node_mut(to).deciding.as_mut().expect("active");
                match decided {
                    Ok(change) => {
                        let records = deciding.records_of(&before, &[change]);
                        let answer = Msg::AlterAnswer { partition, generation, refused: None };
                        self.propose(to, records, Some((from, answer)));
                    }
                    Err(error) => {
                        self.send(to, from, Msg::AlterAnswer { partition, generation, refused: Some(error) })
                    }
                }
            }
            Msg::AlterAnswer { partition, generation, refused } => {
                let retry = self.config.shell.retry_ambiguous_isr;
                let part = self.part_mut(to, partition);
                if part.alter_generation != generation {
                    return;
                }
                // Committed: the new ISR arrives with the metadata. A refusal is final only
                // when the controller decided it at the proposal's own partition epoch (an ISR
                // outside the replicas, an ineligible member): then no copy of the proposal is
                // in its state, and an active controller's state holds every entry that will
                // ever commit, so none ever will. A refusal decided before that check (not the
                // controller, a newer leader epoch, a newer partition epoch) may come from a
                // state that holds an earlier copy of this very proposal, accepted, perhaps
                // committed, its answer lost (the simulator found this: a retry refused as
                // fenced by a leader change not yet committed while the first copy's ISR
                // expansion committed). Then the leader keeps its maximal ISR and the timeout
                // sends the proposal again, until new metadata or a final answer settles it.
                let ambiguous = matches!(
                    refused,
                    Some(
                        ControllerError::NotController
                            | ControllerError::FencedLeaderEpoch
                            | ControllerError::InvalidUpdateVersion
                    )
                );
                match refused {
                    Some(_) if ambiguous && retry => {}
                    None => part.alter_pending = None,
                    Some(_) => {
                        part.alter_pending = None;
                        self.replica_event(to, partition, Event::IsrRejected);
                    }
                }
            }
            Msg::CreateTopic => {
                if self.active_quiet(to).is_none() {
                    return;
                }
                // The controller draws the topic's id at random (KIP-516).
                let mut id = [0; 16];
                id[..8].copy_from_slice(&self.rng.next_u64().to_le_bytes());
                id[8..].copy_from_slice(&self.rng.next_u64().to_le_bytes());
                let id = skein_net::types::TopicId(id);
                let deciding = self.node_mut(to).deciding.as_mut().expect("active");
                if deciding.partitions.keys().any(|tp| tp.topic() == TOPIC) {
                    return;
                }
                let before = deciding.brokers.clone();
                let Ok(changes) = deciding.create_partitions(TOPIC, PARTITIONS, NODES.len()) else {
                    return;
                };
                let mut records =
                    vec![MetadataRecord::TopicCreated { name: TOPIC.into(), id, config: topic_config() }];
                records.extend(deciding.records_of(&before, &changes));
                self.propose(to, records, None);
            }
        }
    }

    /// Whether `to` is the active controller; if not, `from` is told who leads. Returns the
    /// Raft index the next proposal will take.
    fn active(&mut self, to: NodeId, from: NodeId) -> Option<u64> {
        let index = self.active_quiet(to);
        if index.is_none() {
            let leader = self.node(to).raft.leader_id();
            self.send(to, from, Msg::NotController { leader });
        }
        index
    }

    fn active_quiet(&mut self, to: NodeId) -> Option<u64> {
        let node = self.node(to);
        node.deciding.as_ref()?;
        Some(node.raft.last_index() + 1)
    }

    /// The active controller commits a decision's records as one Raft entry; `reply` is sent
    /// once it is committed.
    fn propose(&mut self, id: NodeId, records: Vec<MetadataRecord>, reply: Option<(NodeId, Msg)>) {
        if records.is_empty() {
            if let Some((to, msg)) = reply {
                self.send(id, to, msg);
            }
            return;
        }
        let data = encode_batch(&records);
        let node = self.node_mut(id);
        let index = node.raft.last_index() + 1;
        match node.raft.propose(data) {
            Ok(()) => {
                debug_assert_eq!(node.raft.last_index(), index);
                if let Some(reply) = reply {
                    node.replies.insert(index, reply);
                }
            }
            Err(_) => {
                // Not leading any more: its decisions restart from the committed state.
                node.deciding = None;
                node.replies.clear();
            }
        }
        self.drive_raft(id);
    }

    /// Hands a node's Raft output to the network, the disk and the state machine, as long as
    /// nothing is waiting for the disk.
    fn drive_raft(&mut self, id: NodeId) {
        loop {
            if self.node(id).persisting.is_some() {
                break;
            }
            let Some(output) = self.node_mut(id).raft.ready() else { break };
            self.send_raft(id, output.send);
            self.apply_committed(id, output.committed);
            let persisting =
                Persisting { entries: output.persist_entries, hard_state: output.persist_hard_state };
            let node = self.node_mut(id);
            let incarnation = node.incarnation;
            node.persisting = Some(persisting);
            let delay = self.rng.range(1, 6);
            self.schedule(delay, Ev::RaftPersisted { node: id, incarnation });
        }
        self.update_role(id);
    }

    fn raft_persisted(&mut self, id: NodeId) {
        let node = self.node_mut(id);
        let Some(persisting) = node.persisting.take() else { return };
        if let Some(first) = persisting.entries.first() {
            let keep = (first.index - 1) as usize;
            assert!(keep <= node.disk.entries.len(), "raft-rs appends contiguously");
            node.disk.entries.truncate(keep);
            node.disk.entries.extend(persisting.entries);
        }
        if let Some(hard_state) = persisting.hard_state {
            node.disk.hard_state = hard_state;
        }
        let output = node.raft.persisted();
        self.send_raft(id, output.send);
        self.apply_committed(id, output.committed);
        self.drive_raft(id);
    }

    /// Sends Raft messages, checking that what each depends on is durable.
    fn send_raft(&mut self, id: NodeId, messages: Vec<Message>) {
        for message in messages {
            let disk = &self.node(id).disk;
            let hs = &disk.hard_state;
            let durable_last = disk.entries.last().map_or(0, |e| e.index);
            // A vote is durable when the durable hard state holds it, or holds a later term
            // (the member can never vote in that term again).
            let vote_durable =
                |voted_for: u64| hs.term > message.term || (hs.term == message.term && hs.vote == voted_for);
            let broken = match message.get_msg_type() {
                MessageType::MsgRequestVoteResponse if !message.reject => {
                    (!vote_durable(message.to)).then_some("a granted vote")
                }
                MessageType::MsgRequestVote => (!vote_durable(message.from)).then_some("a vote request"),
                MessageType::MsgAppendResponse if !message.reject => (durable_last < message.index
                    || hs.term < message.term)
                    .then_some("an append acknowledgement"),
                _ => None,
            };
            if let Some(what) = broken {
                let detail = format!(
                    "{id} sent {what} (term {}, index {}) before making it durable (term {}, vote {}, last entry {durable_last})",
                    message.term, message.index, hs.term, hs.vote
                );
                self.violation("Raft persistence", detail);
            }
            let Some(&to) = NODES.iter().find(|n| u64::from(n.0) == message.to) else { continue };
            self.send(id, to, Msg::Raft(Box::new(message)));
        }
    }

    /// A member's committed entries: checked against what every other member committed at the
    /// same index, replayed into its cluster state, kept for brokers to pull, and the answers
    /// waiting for them sent.
    fn apply_committed(&mut self, id: NodeId, entries: Vec<Entry>) {
        let now = self.now;
        for entry in entries {
            let data = entry.data.to_vec();
            match self.committed.get(&entry.index) {
                Some((term, bytes)) => {
                    if *term != entry.term || *bytes != data {
                        let detail = format!(
                            "{id} committed index {} (term {}) unlike the term {term} entry committed before",
                            entry.index, entry.term
                        );
                        self.violation("Raft", detail);
                    }
                }
                None => self.commit_globally(entry.index, entry.term, data.clone()),
            }
            let records = match decode_batch(&data) {
                Ok(records) => records,
                Err(error) => {
                    self.violation("records", format!("{id} committed an undecodable batch: {error}"));
                    continue;
                }
            };
            let node = self.node_mut(id);
            for record in &records {
                node.committed.replay(record, now);
            }
            node.log.push((entry.index, data));
            if let Some((to, msg)) = node.replies.remove(&entry.index) {
                self.send(id, to, msg);
            }
        }
    }

    /// The first member to commit an index: the batch joins the global log and its image,
    /// which the metadata invariants are checked on.
    fn commit_globally(&mut self, index: u64, term: u64, data: Vec<u8>) {
        if let Some((&last, _)) = self.committed.last_key_value() {
            if index <= last {
                self.violation("Raft", format!("index {index} committed after {last}"));
            }
        }
        self.committed.insert(index, (term, data.clone()));
        self.report.metadata_batches += 1;
        let Ok(records) = decode_batch(&data) else { return };
        let before = self.image.clone();
        if let Err(error) = crate::metadata::apply(&mut self.image, &records) {
            self.violation("records", format!("index {index}: {error}"));
            return;
        }
        self.check_metadata(&before, &records);
    }

    /// Follows a node's Raft role: a leader becomes the active controller once its own
    /// first entry is applied (its state is then complete) and starts every broker's session
    /// afresh; a node that stopped leading drops its decisions.
    fn update_role(&mut self, id: NodeId) {
        let now = self.now;
        let node = self.node_mut(id);
        if node.raft.is_leader() {
            let term = node.raft.term();
            match self.raft_leaders.get(&term) {
                Some(&other) if other != u64::from(id.0) => {
                    let detail = format!("{id} and node {other} both lead term {term}");
                    self.violation("Raft", detail);
                }
                Some(_) => {}
                None => {
                    self.raft_leaders.insert(term, u64::from(id.0));
                    self.report.controller_leaders += 1;
                    self.notable(Notable::Controller(id, term));
                }
            }
        }
        let active_only = self.config.shell.active_controller_only;
        let node = self.node_mut(id);
        let may_decide = if active_only { node.raft.is_active_leader() } else { node.raft.is_leader() };
        if may_decide {
            if node.deciding.is_none() {
                let mut deciding = node.committed.clone();
                deciding.restart_sessions(now);
                node.deciding = Some(deciding);
                if trace() {
                    eprintln!("t={now} {id} is the active controller (term {})", node.raft.term());
                }
            }
        } else if node.deciding.is_some() || !node.replies.is_empty() {
            node.deciding = None;
            node.replies.clear();
        }
    }

    /// A broker applies the metadata batches it pulled, in order from its own position.
    fn learn(&mut self, id: NodeId, batches: Vec<(u64, Vec<u8>)>) {
        let mut changed = false;
        for (index, data) in batches {
            let applied = self.node(id).applied;
            if index <= applied {
                continue;
            }
            // Its image must be a prefix of the log: the batch is the one committed there, and
            // no committed batch lies between its position and this one.
            if self.committed.get(&index).map(|(_, bytes)| bytes) != Some(&data) {
                self.violation("Raft", format!("{id} was sent batch {index}, not the committed one"));
                return;
            }
            if let Some((&skipped, _)) = self.committed.range(applied + 1..index).next() {
                self.violation("Raft", format!("{id} would skip batch {skipped} applying {index}"));
                return;
            }
            let records = decode_batch(&data).expect("committed batches decode (checked at commit)");
            let node = self.node_mut(id);
            if let Err(error) = crate::metadata::apply(&mut node.image, &records) {
                self.violation("records", format!("{id} cannot apply batch {index}: {error}"));
                return;
            }
            node.applied = index;
            if let Some(epoch) = node.broker_epoch {
                let seen = self.applied_by_epoch.entry((id, epoch)).or_default();
                *seen = (*seen).max(index);
            }
            changed = true;
        }
        if changed {
            self.notify(id);
        }
    }

    /// A broker acts on its metadata: for each partition whose leader or ISR changed since it
    /// last looked, the replica becomes leader or follower, or hears the committed ISR.
    ///
    /// Only once its image holds its own registration: a restarted broker reads, in the
    /// metadata before it, leaderships granted to its previous incarnation, whose log it may
    /// have lost part of. Its registration takes them away (the simulator found this: a
    /// restarted leader led its old epoch again from the stale metadata, with fewer records).
    fn notify(&mut self, id: NodeId) {
        let node = self.node(id);
        let registered = node.broker_epoch.is_some_and(|epoch| node.applied >= epoch.0);
        if !registered && self.config.shell.wait_for_own_registration {
            return;
        }
        for partition in 0..PARTITIONS {
            let tp = TopicPartition::new(TOPIC, partition);
            let Some(state) = self.node(id).image.partitions.get(&tp).cloned() else { continue };
            let known = self.part(id, partition).known;
            let current = (state.leader_epoch, state.partition_epoch.0);
            if known == Some(current) {
                continue;
            }
            let epoch_changed = known.map(|k| k.0) != Some(state.leader_epoch);
            let event = match state.leader {
                Some(leader) if leader == id && epoch_changed => {
                    self.report.leader_changes += 1;
                    self.notable(Notable::Leads(id, partition, state.leader_epoch));
                    match self.leaders_by_epoch.get(&(partition, state.leader_epoch.0)) {
                        Some(&other) if other != id => {
                            let detail =
                                format!("{id} and {other} both lead {tp} in epoch {}", state.leader_epoch.0);
                            self.violation("I4", detail);
                        }
                        _ => {}
                    }
                    self.leaders_by_epoch.insert((partition, state.leader_epoch.0), id);
                    Some(Event::BecomeLeader {
                        epoch: state.leader_epoch,
                        partition_epoch: state.partition_epoch,
                        replicas: state.replicas.clone(),
                        isr: state.isr.clone(),
                    })
                }
                Some(leader) if leader == id => Some(Event::IsrCommitted {
                    isr: state.isr.clone(),
                    partition_epoch: state.partition_epoch,
                }),
                Some(leader) if epoch_changed => {
                    self.part_mut(id, partition).fetch_leader = Some(leader);
                    Some(Event::BecomeFollower { leader, epoch: state.leader_epoch })
                }
                None if epoch_changed => Some(Event::Offline { epoch: state.leader_epoch }),
                _ => None,
            };
            let part = self.part_mut(id, partition);
            part.known = Some(current);
            // The partition changed: a proposal in flight is decided (committed, or refused for
            // its stale partition epoch).
            part.alter_pending = None;
            if trace() {
                eprintln!(
                    "t={} notify {id} {tp}: {event:?} (log {}, isr {:?}, elr {:?})",
                    self.now,
                    self.part(id, partition).log.len(),
                    state.isr,
                    state.elr
                );
            }
            if let Some(event) = event {
                self.replica_event(id, partition, event);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn leader_fetch(
        &mut self,
        to: NodeId,
        partition: u32,
        from: NodeId,
        epoch: LeaderEpoch,
        fetch_offset: Offset,
        last: Option<LeaderEpoch>,
        durable: Offset,
    ) {
        let now = self.now;
        let event = Event::FollowerFetch {
            from,
            current_leader_epoch: epoch,
            fetch_offset,
            last_fetched_epoch: last,
            durable,
        };
        let leading = self.part(to, partition).replica.leader_epoch();
        let commands = self.part_mut(to, partition).replica.on(event, now);
        // The answer carries the epoch the fetch was made in.
        for command in &commands {
            if let Command::AnswerFetch { to: follower, answer } = command {
                // I8: data only for a fetch in the epoch this replica leads.
                if matches!(answer, FetchAnswer::Records { .. }) && leading != Some(epoch) {
                    let detail = format!(
                        "{to} (leading {leading:?}) answered {follower}'s fetch of epoch {} with records",
                        epoch.0
                    );
                    self.violation("I8", detail);
                }
                let msg = match answer {
                    FetchAnswer::Records { from, to: end, high_watermark } => {
                        let log = &self.part(to, partition).log;
                        let records =
                            log[(*from as usize).min(log.len())..(*end as usize).min(log.len())].to_vec();
                        Msg::Records {
                            partition,
                            epoch,
                            from: *from,
                            records,
                            high_watermark: *high_watermark,
                        }
                    }
                    FetchAnswer::Diverging { epoch: diverging, end } => Msg::Diverging {
                        partition,
                        epoch,
                        diverging: *diverging,
                        end: *end,
                        fetch_offset,
                        last,
                    },
                    FetchAnswer::Refused(_) => Msg::Refused { partition, epoch },
                };
                self.send(to, *follower, msg);
            }
        }
        let rest = commands.into_iter().filter(|c| !matches!(c, Command::AnswerFetch { .. })).collect();
        self.apply(to, partition, rest);
    }

    fn fetch_answered(&mut self, to: NodeId, partition: u32, epoch: LeaderEpoch, msg: Msg) {
        // An answer in the epoch being fetched: the fetch it answers needs no resend, and the
        // next one is sent below. (An answer from an older epoch changes nothing: the current
        // fetch keeps its timeout.)
        let current = self.part(to, partition).replica.next_fetch();
        if current.map(|f| f.0) != Some(epoch) {
            return;
        }
        // A divergence answers the fetch it was made for: delayed or duplicated past a fetch
        // the follower made since (after truncating and fetching again), it would cut records
        // fetched meanwhile, acknowledged ones among them (found by the simulator).
        if let Msg::Diverging { fetch_offset, last, .. } = &msg {
            let stale = current.is_some_and(|(_, offset, epoch_of_last, _)| {
                (offset, epoch_of_last) != (*fetch_offset, *last)
            });
            if stale && self.config.shell.ignore_stale_answers {
                return;
            }
        }
        self.part_mut(to, partition).fetch_generation += 1;
        let now = self.now;
        match msg {
            Msg::Records { from, records, high_watermark, .. } => {
                let mut commands = Vec::new();
                let part = self.part_mut(to, partition);
                if from == part.log.len() as Offset {
                    for (record_epoch, value) in records {
                        part.log.push((record_epoch, value));
                        let end = part.log.len() as Offset;
                        commands.extend(part.replica.on(Event::Appended { end, epoch: record_epoch }, now));
                    }
                    commands.extend(part.replica.on(Event::LeaderHighWatermark { high_watermark }, now));
                }
                self.apply(to, partition, commands);
                let delay = if from == self.part(to, partition).log.len() as Offset { 20 } else { 1 };
                self.schedule(delay, Ev::SendFetch { node: to, partition, epoch });
            }
            Msg::Diverging { diverging, end, .. } => {
                self.replica_event(to, partition, Event::Diverged { epoch: diverging, end });
                self.schedule(1, Ev::SendFetch { node: to, partition, epoch });
            }
            _ => self.schedule(50, Ev::SendFetch { node: to, partition, epoch }),
        }
    }

    /// Carries out a replica's commands.
    fn apply(&mut self, id: NodeId, partition: u32, commands: Vec<Command>) {
        let tp = TopicPartition::new(TOPIC, partition);
        for command in commands {
            match command {
                Command::WriteEpochCheckpoint { .. } => {}
                Command::AnswerFetch { .. } => unreachable!("answered where fetches are delivered"),
                Command::HighWatermark { offset } => {
                    let replica = self.part(id, partition).replica.clone();
                    // I6: a leader's high watermark stays while its ISR is below min ISR.
                    if let Some(isr) = replica.isr() {
                        if isr.len() < MIN_INSYNC {
                            let detail =
                                format!("{id} moved {tp}'s high watermark to {offset} with ISR {isr:?}");
                            self.violation("I6", detail);
                        }
                    }
                    // I2: (leader epoch, exposed offset) only rises: no leader exposes less than
                    // it or a leader of an earlier epoch exposed. (A deposed leader that has
                    // not heard yet may still show its own, older, offset to a consumer that
                    // does not know the new epoch either: a stale read, not a lost one.)
                    if let (Ok(exposed), Some(epoch)) = (replica.readable_end(), replica.leader_epoch()) {
                        let before = self
                            .max_exposed
                            .range((partition, 0)..=(partition, epoch.0))
                            .map(|(_, &offset)| offset)
                            .max()
                            .unwrap_or(0);
                        if exposed < before {
                            let detail = format!(
                                "{id} exposes {exposed} of {tp} in epoch {} after {before} was exposed",
                                epoch.0
                            );
                            self.violation("I2", detail);
                        }
                        let max = self.max_exposed.entry((partition, epoch.0)).or_default();
                        *max = (*max).max(exposed);
                    }
                }
                Command::AckResolved { id: ack } => self.acknowledged(ack),
                Command::AckFailed { id: ack, .. } => {
                    self.waiting.remove(&ack);
                }
                Command::ProposeIsr { isr, leader_epoch, partition_epoch } => {
                    let node = self.node(id);
                    let members: Vec<(NodeId, BrokerEpoch)> = isr
                        .iter()
                        .map(|&n| (n, node.image.brokers.get(&n).map_or(BrokerEpoch(0), |b| b.epoch)))
                        .collect();
                    let to = node.controller_hint;
                    let part = self.part_mut(id, partition);
                    part.alter_generation += 1;
                    let generation = part.alter_generation;
                    let msg = Msg::AlterPartition {
                        partition,
                        from: id,
                        generation,
                        leader_epoch,
                        partition_epoch,
                        isr: members,
                    };
                    self.part_mut(id, partition).alter_pending = Some(msg.clone());
                    self.send(id, to, msg);
                    self.schedule(500, Ev::AlterTimeout { node: id, partition, generation });
                }
                Command::Truncate { offset } => {
                    self.report.truncations += 1;
                    // I7: never below the high watermark this replica has exposed (followers
                    // expose theirs to nothing, but it is what they would serve as leader).
                    let exposed = self.part(id, partition).replica.high_watermark();
                    if offset < exposed {
                        let detail =
                            format!("{id} truncated {tp} to {offset}, below its high watermark {exposed}");
                        self.violation("I7", detail);
                    }
                    let part = self.part_mut(id, partition);
                    part.log.truncate(offset as usize);
                    part.synced = part.synced.min(offset as usize);
                }
                Command::FetchFrom { epoch, .. } => {
                    self.schedule(1, Ev::SendFetch { node: id, partition, epoch })
                }
            }
        }
    }

    /// An `acks=all` produce is acknowledged: I12 and I1 at that moment.
    fn acknowledged(&mut self, ack: u64) {
        let Some((partition, leader, offset, value)) = self.waiting.remove(&ack) else { return };
        let tp = TopicPartition::new(TOPIC, partition);
        // I12: nothing at or above the high watermark is acknowledged.
        let high_watermark = self.part(leader, partition).replica.high_watermark();
        if offset >= high_watermark {
            let detail =
                format!("{leader} acknowledged {offset} of {tp} with its high watermark at {high_watermark}");
            self.violation("I12", detail);
        }
        self.report.acked += 1;
        self.acked.push((partition, offset, value));
        // I11: a batch is acknowledged at one offset only, however often it was sent; the
        // producer moves on to its next sequence.
        let seq = self.seq_of[&value];
        match self.acked_seq.get(&(partition, seq)) {
            Some(&first) if first != offset => {
                let detail = format!("{tp}: sequence {seq} acknowledged at {first} and at {offset}");
                self.violation("I11", detail);
            }
            Some(_) => {}
            None => {
                self.acked_seq.insert((partition, seq), offset);
            }
        }
        let producer = self.producers.entry(partition).or_default();
        if producer.inflight.is_some_and(|(s, _, _)| s == seq) {
            producer.inflight = None;
            producer.next_seq = seq + 1;
        }
        // I1: every member of the committed ISR holds it durably.
        let isr = self.image.partitions.get(&tp).map(|p| p.isr.clone()).unwrap_or_default();
        for member in isr {
            let part = self.part(member, partition);
            let held = part.log.get(offset as usize).map(|r| r.1);
            if held != Some(value) || part.synced <= offset as usize {
                let detail = format!(
                    "ack of {value} at {tp}@{offset} by {leader}: ISR member {member} holds {held:?}, synced to {} (committed {:?}; the leader's ISR {:?}, epoch {:?})",
                    part.synced,
                    self.image.partitions.get(&tp).map(|p| (p.leader, p.leader_epoch, p.partition_epoch, &p.isr)),
                    self.part(leader, partition).replica.isr(),
                    self.part(leader, partition).replica.leader_epoch(),
                );
                self.violation("I1", detail);
            }
        }
    }

    /// Checks a committed batch against the image before it. I5: a new leader comes from the
    /// ISR, or the ELR when no ISR member is eligible, and is neither fenced nor unclean. I9:
    /// the committed ISR is within the replicas, holds the leader, and no fenced or unclean
    /// member. I10: a broker is unfenced only once it applied the metadata up to its own
    /// registration, and no partition is led by a fenced broker.
    fn check_metadata(&mut self, before: &MetadataImage, records: &[MetadataRecord]) {
        for record in records {
            if let MetadataRecord::BrokerChanged { node, fenced: false, .. } = record {
                let was_fenced = before.brokers.get(node).is_none_or(|b| b.fenced);
                let epoch = self.image.brokers[node].epoch;
                let applied = self.applied_by_epoch.get(&(*node, epoch)).copied().unwrap_or(0);
                if was_fenced && applied < epoch.0 {
                    let detail = format!(
                        "{node} unfenced at epoch {} having applied metadata only to {applied}",
                        epoch.0
                    );
                    self.violation("I10", detail);
                }
            }
        }
        let image = &self.image;
        let mut found = Vec::new();
        for (tp, state) in &image.partitions {
            let previous = before.partitions.get(tp);
            if let (Some(before_state), Some(leader)) = (previous, state.leader) {
                if before_state.leader != Some(leader) {
                    let from_isr = before_state.isr.contains(&leader);
                    let isr_ineligible = before_state
                        .isr
                        .iter()
                        .all(|m| image.brokers.get(m).is_none_or(|b| b.fenced || b.unclean));
                    let from_elr = isr_ineligible && before_state.elr.contains(&leader);
                    if !(from_isr || from_elr) {
                        let detail = format!(
                            "{tp}: {leader} elected from neither the ISR {:?} nor the ELR {:?}",
                            before_state.isr, before_state.elr
                        );
                        found.push(("I5", detail));
                    }
                }
            }
            if let Some(leader) = state.leader {
                match image.brokers.get(&leader) {
                    Some(broker) if broker.fenced => {
                        found.push(("I10", format!("{tp} is led by {leader}, which is fenced")))
                    }
                    Some(broker) if broker.unclean => {
                        found.push(("I5", format!("{tp} is led by {leader}, which is unclean")))
                    }
                    None => found.push(("I5", format!("{tp} is led by {leader}, which is not registered"))),
                    _ => {}
                }
                if !state.isr.contains(&leader) {
                    found
                        .push(("I9", format!("{tp}: the leader {leader} is not in the ISR {:?}", state.isr)));
                }
            }
            for member in &state.isr {
                let outside = !state.replicas.contains(member);
                let ineligible = image.brokers.get(member).is_none_or(|b| b.fenced || b.unclean);
                if outside || ineligible {
                    let detail =
                        format!("{tp}: ISR {:?} holds {member}, outside the replicas or fenced", state.isr);
                    found.push(("I9", detail));
                }
            }
        }
        for (rule, detail) in found {
            self.violation(rule, detail);
        }
    }

    /// A node dies: what its partitions had not synced is partly lost (the page cache it sat
    /// in), and so is what its Raft member had not made durable.
    fn crash(&mut self, id: NodeId) {
        self.report.faults += 1;
        if trace() {
            eprintln!("t={} crash {id}", self.now);
        }
        self.notable(Notable::Crash(id));
        for partition in 0..PARTITIONS {
            let part = self.part(id, partition);
            let unsynced = (part.log.len() - part.synced) as u64;
            let keep_extra = self.rng.range(0, unsynced + 1) as usize;
            let torn = keep_extra < unsynced as usize && self.rng.range(0, 2) == 0;
            let part = self.part_mut(id, partition);
            // Pages an fsync error dropped never reach the disk.
            let keep = (part.synced + keep_extra).min(part.dropped_from.take().unwrap_or(usize::MAX));
            // The power went in the middle of the next record's write: part of it is on disk.
            part.torn = if torn { Some(part.log[keep]) } else { None };
            part.log.truncate(keep);
            part.synced = part.log.len();
            self.report.torn_writes += u64::from(torn);
        }
        let node = self.node_mut(id);
        node.alive = false;
        node.persisting = None;
        self.waiting.retain(|_, (_, leader, _, _)| *leader != id);
        let delay = self.rng.range(200, 800);
        self.schedule(delay, Ev::Restart(id));
    }

    /// A node starts again from its disk: its partitions' logs, its Raft log and hard state;
    /// its metadata image is pulled again from the start, and it registers anew.
    fn restart(&mut self, id: NodeId) {
        if self.node(id).alive {
            return;
        }
        self.notable(Notable::Restart(id));
        let (config, rules, shell) = (self.config, self.config.rules, self.config.shell);
        let node = self.node_mut(id);
        node.alive = true;
        node.paused_until = 0;
        node.incarnation += 1;
        node.broker_epoch = None;
        node.image = MetadataImage::default();
        node.applied = 0;
        node.answered = true;
        let mut garbage = Vec::new();
        for part in node.parts.values_mut() {
            let mut log = std::mem::take(&mut part.log);
            // Recovery: a torn record fails its checksum and is cut, or (rule off) it is taken
            // for a record, with the garbage its half write left.
            let torn = part.torn.take().filter(|_| !shell.cut_torn_tail);
            if let Some((epoch, value)) = torn {
                log.push((epoch, value ^ TORN));
                garbage.push(value ^ TORN);
            }
            *part = Part::new(id, rules, log);
        }
        let settings = raft_settings(&config, id, node.incarnation);
        node.raft = RaftCore::restart(&settings, node.disk.hard_state.clone(), &node.disk.entries)
            .expect("a durable Raft log restarts");
        node.committed = Cluster::new(controller_config());
        node.deciding = None;
        node.log.clear();
        node.replies.clear();
        for value in garbage {
            // No producer sent it: its "sequence number" follows nothing.
            self.seq_of.insert(value, TORN);
        }
        self.drive_raft(id);
        self.heartbeat(id);
    }

    fn check(&mut self) {
        self.report.checks += 1;
        // I3: replicas agree below the smaller of their high watermarks.
        for partition in 0..PARTITIONS {
            for (a, &x_id) in NODES.iter().enumerate() {
                for &y_id in &NODES[a + 1..] {
                    let (x, y) = (self.part(x_id, partition), self.part(y_id, partition));
                    let below = x.replica.high_watermark().min(y.replica.high_watermark()) as usize;
                    let below = below.min(x.log.len()).min(y.log.len());
                    if x.log[..below] != y.log[..below] {
                        let at = (0..below).find(|&i| x.log[i] != y.log[i]).unwrap_or(0);
                        let detail = format!(
                            "{x_id} and {y_id} differ on partition {partition} at {at}: {:?} vs {:?}",
                            x.log[at], y.log[at]
                        );
                        self.violation("I3", detail);
                    }
                }
            }
        }
    }

    fn check_healed(&mut self) {
        // The consensus shard and the brokers' metadata.
        let active: Vec<NodeId> =
            NODES.iter().copied().filter(|&n| self.node(n).deciding.is_some()).collect();
        if active.len() != 1 {
            self.violation(
                "liveness",
                format!("{} active controllers after healing: {active:?}", active.len()),
            );
        }
        let last = self.committed.last_key_value().map_or(0, |(&index, _)| index);
        for id in NODES {
            let node = self.node(id);
            let (applied, controller_applied) = (node.applied, node.log.last().map_or(0, |(i, _)| *i));
            let broker_epoch = node.broker_epoch;
            if applied != last || controller_applied != last {
                let detail = format!(
                    "{id} applied metadata to {applied} as a broker and {controller_applied} as a controller; the log ends at {last}"
                );
                self.violation("liveness", detail);
            }
            match (broker_epoch, self.image.brokers.get(&id).cloned()) {
                (Some(epoch), Some(broker)) if broker.epoch == epoch && !broker.fenced => {}
                (epoch, broker) => {
                    let detail = format!("{id} (epoch {epoch:?}) is not registered and unfenced: {broker:?}");
                    self.violation("liveness", detail);
                }
            }
        }
        // Every partition.
        for partition in 0..PARTITIONS {
            let tp = TopicPartition::new(TOPIC, partition);
            let Some(state) = self.image.partitions.get(&tp).cloned() else {
                self.violation("liveness", format!("{tp} was never created"));
                continue;
            };
            let Some(leader) = state.leader else {
                self.violation("liveness", format!("{tp} has no leader after healing"));
                continue;
            };
            if state.isr != state.replicas {
                let detail =
                    format!("{tp}: ISR {:?} is not all the replicas {:?}", state.isr, state.replicas);
                self.violation("liveness", detail);
            }
            let leader_part = self.part(leader, partition);
            let (hw, log) = (leader_part.replica.high_watermark(), leader_part.log.clone());
            if hw != log.len() as Offset {
                let detail = format!("{tp} on {leader}: high watermark {hw} below its log end {}", log.len());
                self.violation("liveness", detail);
            }
            let acked: Vec<(Offset, u64)> =
                self.acked.iter().filter(|a| a.0 == partition).map(|&(_, o, v)| (o, v)).collect();
            for (offset, value) in acked {
                if log.get(offset as usize).map(|r| r.1) != Some(value) {
                    self.violation(
                        "I1",
                        format!("acknowledged {value} at {tp}@{offset} is not in the final log"),
                    );
                }
            }
            // I12: what consumers read was committed: it is in the final log, at its offset.
            let read: Vec<(Offset, u64)> =
                self.consumed.iter().filter(|c| c.0 == partition).map(|&(_, o, v)| (o, v)).collect();
            for (offset, value) in read {
                if log.get(offset as usize).map(|r| r.1) != Some(value) {
                    let detail = format!("{value} read at {tp}@{offset} is not in the final log");
                    self.violation("I12", detail);
                }
            }
            // I11: every batch at most once, in sequence order.
            for (offset, pair) in log.windows(2).enumerate() {
                let (a, b) = (self.seq_of[&pair[0].1], self.seq_of[&pair[1].1]);
                if b != a + 1 {
                    let detail = format!("{tp}: sequence {b} at {} follows sequence {a}", offset + 1);
                    self.violation("I11", detail);
                }
            }
            for id in NODES {
                let part = self.part(id, partition);
                if part.log != log {
                    let same = part.log.iter().zip(&log).take_while(|(a, b)| a == b).count();
                    let detail = format!(
                        "{id} does not hold {tp}'s leader's log after healing: {} records (the leader {leader} has {}), same up to {same}, its high watermark {}, fetching in epoch {:?}; epochs: its {:?}, the leader's {:?}; metadata: leader epoch {:?}, ISR {:?}; the leader leads epoch {:?}",
                        part.log.len(),
                        log.len(),
                        part.replica.high_watermark(),
                        part.replica.next_fetch().map(|f| f.0),
                        part.replica.epochs().entries(),
                        self.part(leader, partition).replica.epochs().entries(),
                        state.leader_epoch,
                        state.isr,
                        self.part(leader, partition).replica.leader_epoch(),
                    );
                    self.violation("liveness", detail);
                }
            }
        }
        if !self.waiting.is_empty() {
            self.violation("liveness", format!("{} acknowledgements still waiting", self.waiting.len()));
        }
    }
}

#[cfg(test)]
mod tests;
