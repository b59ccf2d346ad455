//! A deterministic simulator of one partition replicated on three brokers: the real
//! [`ReplicaState`] on each, the real controller rules ([`Cluster`]) deciding leadership and ISR,
//! a simulated clock, network and disk, and faults drawn from one seed: messages dropped,
//! delayed and reordered, brokers crashing (losing part of what they had not synced) and
//! restarting, brokers pausing past their session and coming back as zombies that still think
//! they lead (clients with stale metadata produce to them). After every step the invariants of DESIGN-CLUSTER.md are checked; then a healing
//! phase without faults must converge. One seed replays a run bit for bit.
//!
//! What is simulated and what is not (yet): the controller here is an oracle that never fails
//! and whose metadata reaches brokers at once (the Raft-replicated controller and its delayed,
//! lossy metadata come with the consensus-shard work); records are single values, batches of
//! one; there is one partition.
//!
//! Checked:
//! * **I1** when an `acks=all` produce is acknowledged, every member of the committed ISR holds
//!   the record durably at its offset; after healing, the leader's log holds every acknowledged
//!   record at its offset.
//! * **I2** the offset exposed to consumers never goes back across leaders.
//! * **I3** any two replicas hold the same records below the smaller of their high watermarks.
//! * **I4** at most one replica leads in a given epoch.
//! * **I5** a new leader comes from the ISR, or from the ELR when no ISR member is eligible,
//!   and never leads while fenced.
//! * **I6** a leader's high watermark does not move while its ISR, as the leader holds it (the
//!   committed one; with the `isr-via-controller` switch off, the one it applied itself), is
//!   below min.insync.replicas.
//! * **I7** a follower never truncates below its high watermark.
//! * **I8** a fetch made in another leader epoch than the one the replica leads gets no records.
//! * **I9** the committed ISR is within the replicas, holds the leader and no fenced member.
//! * **I12** (the acknowledgement half) nothing at or above the leader's high watermark is
//!   acknowledged under `acks=all`.
//! * **Liveness** after healing: a leader, every replica alive with the leader's records, the
//!   high watermark at the log end, no acknowledgement left waiting.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use skein_net::types::{BrokerEpoch, LeaderEpoch, NodeId, Offset, TopicPartition};

use crate::controller::cluster::{Cluster, ControllerConfig, PartitionChange};
use crate::partition::{Command, EpochCache, Event, FetchAnswer, ReplicaConfig, ReplicaState, Rules};
use crate::rng::Rng;

/// How a run is set up.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub seed: u64,
    /// Ticks (10 ms each) with faults, before the healing phase.
    pub steps: u64,
    pub rules: Rules,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig { seed, steps: 3_000, rules: Rules::ALL }
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub steps: u64,
    pub faults: u64,
    pub checks: u64,
    pub acked: u64,
    pub leader_changes: u64,
    pub truncations: u64,
    /// Each broken invariant, with the time it broke and a line of context.
    pub violations: Vec<String>,
}

impl SimReport {
    /// A run that acknowledged nothing or injected no fault proves nothing: its set-up failed.
    pub fn exercised(&self) -> bool {
        self.acked > 0 && self.faults > 0 && self.leader_changes > 1
    }
}

const TICK_MS: u64 = 10;
const HEAL_TICKS: u64 = 2_000;
const NODES: [NodeId; 3] = [NodeId(1), NodeId(2), NodeId(3)];

#[derive(Debug, Clone)]
enum Msg {
    Fetch {
        from: NodeId,
        epoch: LeaderEpoch,
        fetch_offset: Offset,
        last: Option<LeaderEpoch>,
        durable: Offset,
    },
    Records {
        epoch: LeaderEpoch,
        from: Offset,
        records: Vec<(LeaderEpoch, u64)>,
        high_watermark: Offset,
    },
    Diverging {
        epoch: LeaderEpoch,
        diverging: LeaderEpoch,
        end: Offset,
    },
    Refused {
        epoch: LeaderEpoch,
    },
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
        epoch: LeaderEpoch,
    },
    /// A fetch sent as the node's `generation`-th got no answer in time: send it again.
    FetchTimeout {
        node: NodeId,
        epoch: LeaderEpoch,
        generation: u64,
    },
    Restart(NodeId),
    /// A paused broker runs again (a SIGSTOP or a long GC pause ends).
    Resume(NodeId),
}

struct Node {
    id: NodeId,
    replica: ReplicaState,
    /// The log as it is in memory: (epoch, value) at each offset.
    log: Vec<(LeaderEpoch, u64)>,
    /// How much of it is on disk.
    synced: usize,
    alive: bool,
    /// Paused (not running, not heartbeating, deaf) until this time.
    paused_until: u64,
    broker_epoch: BrokerEpoch,
    /// The leader epoch of the last metadata this broker applied.
    known: Option<(LeaderEpoch, u32)>,
    /// Fetches sent (a timeout resends only if no answer came since).
    fetch_generation: u64,
}

struct Sim {
    config: SimConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    nodes: Vec<Node>,
    cluster: Cluster,
    tp: TopicPartition,
    faults_on: bool,
    /// acks=all produces waiting: id → (leader, offset, value).
    waiting: BTreeMap<u64, (NodeId, Offset, u64)>,
    acked: Vec<(Offset, u64)>,
    next_value: u64,
    next_ack: u64,
    max_exposed: Offset,
    leaders_by_epoch: BTreeMap<u32, NodeId>,
    /// When the nemesis kills the leader (every run fails over at least once).
    leader_crash_at: u64,
    /// The metadata image built from the controller's changes as records (every change must
    /// apply: epochs rise, the leader is in the ISR, the ISR within the replicas).
    image: crate::metadata::MetadataImage,
    /// The partition as the brokers last saw it (I5 compares elections with it).
    last_partition: Option<crate::controller::cluster::Partition>,
    report: SimReport,
}

/// min.insync.replicas of the simulated partition (3 replicas).
const MIN_INSYNC: usize = 2;

fn replica_config(rules: Rules) -> ReplicaConfig {
    ReplicaConfig { min_insync: MIN_INSYNC, lag_time_max_ms: 300, rules }
}

/// Runs one seed.
pub fn run(config: SimConfig) -> SimReport {
    let mut sim = Sim::new(config);
    sim.faults_on = true;
    for _ in 0..config.steps {
        sim.step();
    }
    sim.faults_on = false;
    for id in NODES {
        if !sim.node(id).alive {
            sim.restart(id);
        }
        if sim.node(id).paused_until > sim.now {
            sim.node_mut(id).paused_until = 0;
            sim.notify();
        }
    }
    for _ in 0..HEAL_TICKS {
        sim.step();
    }
    sim.check_healed();
    sim.report.steps = config.steps + HEAL_TICKS;
    sim.report
}

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let mut cluster = Cluster::new(ControllerConfig {
            session_timeout_ms: 200,
            min_insync: MIN_INSYNC,
            ..ControllerConfig::default()
        });
        let nodes = NODES
            .iter()
            .map(|&id| {
                cluster.register(id, BrokerEpoch(1), false, 0);
                cluster.heartbeat(id, BrokerEpoch(1), u64::MAX, 0).expect("registered");
                Node {
                    id,
                    replica: ReplicaState::new(
                        id,
                        replica_config(config.rules),
                        0,
                        0,
                        0,
                        EpochCache::default(),
                        0,
                    ),
                    log: Vec::new(),
                    synced: 0,
                    alive: true,
                    paused_until: 0,
                    broker_epoch: BrokerEpoch(1),
                    known: None,
                    fetch_generation: 0,
                }
            })
            .collect();
        let created = cluster.create_partitions("t", 1, 3).expect("three brokers");
        let mut sim = Sim {
            config,
            rng: Rng::new(config.seed),
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes,
            cluster,
            tp: TopicPartition::new("t", 0),
            faults_on: false,
            waiting: BTreeMap::new(),
            acked: Vec::new(),
            next_value: 1,
            next_ack: 1,
            max_exposed: 0,
            leaders_by_epoch: BTreeMap::new(),
            leader_crash_at: 0,
            last_partition: None,
            image: crate::metadata::MetadataImage::default(),
            report: SimReport::default(),
        };
        let topic = crate::metadata::MetadataRecord::TopicCreated {
            name: "t".into(),
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
        crate::metadata::apply(&mut sim.image, &[topic]).expect("a new image takes a topic");
        sim.record(created);
        let quarter = (config.steps / 4).max(1);
        sim.leader_crash_at = sim.rng.range(quarter, 2 * quarter + 1) * TICK_MS;
        sim.notify();
        sim
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0 as usize - 1]
    }

    /// Alive and not paused.
    fn running(&self, id: NodeId) -> bool {
        let node = self.node(id);
        node.alive && self.now >= node.paused_until
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

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.0 as usize - 1]
    }

    fn schedule(&mut self, delay_ms: u64, event: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay_ms, self.seq)));
        self.events.insert(self.seq, event);
    }

    fn violation(&mut self, rule: &str, detail: String) {
        self.report.violations.push(format!("t={}ms {rule}: {detail}", self.now));
    }

    /// Sends a message over the network: delayed 1–40 ms, dropped 5% of the time while faults
    /// are on.
    fn send(&mut self, to: NodeId, msg: Msg) {
        if self.faults_on && self.rng.range(0, 100) < 5 {
            self.report.faults += 1;
            return;
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
        self.handle(Ev::Tick);
        self.check();
    }

    fn handle(&mut self, event: Ev) {
        let target = match &event {
            Ev::Deliver { to, .. } => Some(*to),
            Ev::SendFetch { node, .. } | Ev::FetchTimeout { node, .. } => Some(*node),
            _ => None,
        };
        if let Some(id) = target {
            if self.defer_if_paused(id, &event) {
                return;
            }
        }
        match event {
            Ev::Tick => self.tick(),
            Ev::Deliver { to, msg } => {
                if self.node(to).alive {
                    self.deliver(to, msg);
                }
            }
            Ev::SendFetch { node, epoch } => {
                let n = self.node(node);
                if !n.alive {
                    return;
                }
                let Some((current, fetch_offset, last, durable)) = n.replica.next_fetch() else { return };
                if current != epoch {
                    return;
                }
                let Some(leader) = self.cluster.partitions[&self.tp].leader else {
                    self.schedule(50, Ev::SendFetch { node, epoch });
                    return;
                };
                let n = self.node_mut(node);
                n.fetch_generation += 1;
                let generation = n.fetch_generation;
                self.send(leader, Msg::Fetch { from: node, epoch, fetch_offset, last, durable });
                self.schedule(300, Ev::FetchTimeout { node, epoch, generation });
            }
            Ev::FetchTimeout { node, epoch, generation } => {
                if self.node(node).alive && self.node(node).fetch_generation == generation {
                    self.handle(Ev::SendFetch { node, epoch });
                }
            }
            Ev::Restart(id) => self.restart(id),
            Ev::Resume(id) => {
                self.node_mut(id).paused_until = 0;
                // It learns, late, what the controller decided meanwhile.
                self.notify();
            }
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        // Heartbeats of live brokers, then the controller's session checks.
        for id in NODES {
            let (alive, epoch) = (self.running(id), self.node(id).broker_epoch);
            if alive {
                let changes = self.cluster.heartbeat(id, epoch, u64::MAX, now).unwrap_or_default();
                self.applied(changes);
            }
        }
        let changes = self.cluster.tick(now);
        self.applied(changes);
        // Disks sync now and then; replicas learn time passed.
        for id in NODES {
            if !self.running(id) {
                continue;
            }
            if self.rng.range(0, 100) < 30 {
                let node = self.node_mut(id);
                node.synced = node.log.len();
                let offset = node.synced as Offset;
                let commands = node.replica.on(Event::Durable { offset }, now);
                self.apply(id, commands);
            }
            let commands = self.node_mut(id).replica.on(Event::Tick, now);
            self.apply(id, commands);
        }
        // A client produces with acks=all to the leader, now and then.
        if self.faults_on && self.rng.range(0, 100) < 40 {
            self.produce();
        }
        // The nemesis: the leader dies once, at a time drawn from the seed.
        if self.faults_on && self.now == self.leader_crash_at {
            if let Some(leader) = self.cluster.partitions[&self.tp].leader {
                if self.node(leader).alive && self.nodes.iter().filter(|n| n.alive).count() > 1 {
                    self.crash(leader);
                }
            }
        }
        // Faults: a broker pauses for longer than its session (it comes back a zombie that
        // still thinks it leads, until it hears the metadata).
        if self.faults_on && self.rng.range(0, 1000) < 3 {
            let id = NODES[self.rng.range(0, 3) as usize];
            if self.running(id) {
                self.report.faults += 1;
                let pause = self.rng.range(300, 900);
                self.node_mut(id).paused_until = self.now + pause;
                self.schedule(pause, Ev::Resume(id));
            }
        }
        // Faults: a broker crashes.
        if self.faults_on && self.rng.range(0, 1000) < 4 {
            let id = NODES[self.rng.range(0, 3) as usize];
            if self.node(id).alive && self.nodes.iter().filter(|n| n.alive).count() > 1 {
                self.crash(id);
            }
        }
    }

    /// A client produces to a broker that believes it leads (with stale metadata it may be a
    /// zombie: a deposed leader that has not heard yet).
    fn produce(&mut self) {
        let believers: Vec<NodeId> = NODES
            .iter()
            .copied()
            .filter(|&id| self.running(id) && self.node(id).replica.is_leader())
            .collect();
        if believers.is_empty() {
            return;
        }
        let leader = believers[self.rng.range(0, believers.len() as u64) as usize];
        let now = self.now;
        let value = self.next_value;
        let node = self.node_mut(leader);
        if !node.alive || node.replica.check_acks_all().is_err() {
            return;
        }
        let Some(epoch) = node.replica.leader_epoch() else { return };
        let offset = node.log.len() as Offset;
        node.log.push((epoch, value));
        let mut commands = node.replica.on(Event::Appended { end: offset + 1, epoch }, now);
        self.next_value += 1;
        let id = self.next_ack;
        self.next_ack += 1;
        self.waiting.insert(id, (leader, offset, value));
        commands.extend(
            self.node_mut(leader)
                .replica
                .on(Event::AwaitAck { id, end: offset + 1, deadline_ms: now + 2_000 }, now),
        );
        self.apply(leader, commands);
    }

    fn deliver(&mut self, to: NodeId, msg: Msg) {
        let now = self.now;
        // An answer in the epoch being fetched: the fetch it answers needs no resend, and the
        // branch below sends the next one. (An answer from an older epoch changes nothing: the
        // current fetch keeps its timeout.)
        let answer_epoch = match &msg {
            Msg::Fetch { .. } => None,
            Msg::Records { epoch, .. } | Msg::Diverging { epoch, .. } | Msg::Refused { epoch } => {
                Some(*epoch)
            }
        };
        if answer_epoch.is_some() && self.node(to).replica.next_fetch().map(|f| f.0) == answer_epoch {
            self.node_mut(to).fetch_generation += 1;
        }
        match msg {
            Msg::Fetch { from, epoch, fetch_offset, last, durable } => {
                let event = Event::FollowerFetch {
                    from,
                    current_leader_epoch: epoch,
                    fetch_offset,
                    last_fetched_epoch: last,
                    durable,
                };
                let leading = self.node(to).replica.leader_epoch();
                let commands = self.node_mut(to).replica.on(event, now);
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
                                let log = &self.node(to).log;
                                let records = log
                                    [(*from as usize).min(log.len())..(*end as usize).min(log.len())]
                                    .to_vec();
                                Msg::Records { epoch, from: *from, records, high_watermark: *high_watermark }
                            }
                            FetchAnswer::Diverging { epoch: diverging, end } => {
                                Msg::Diverging { epoch, diverging: *diverging, end: *end }
                            }
                            FetchAnswer::Refused(_) => Msg::Refused { epoch },
                        };
                        self.send(*follower, msg);
                    }
                }
                let rest =
                    commands.into_iter().filter(|c| !matches!(c, Command::AnswerFetch { .. })).collect();
                self.apply(to, rest);
            }
            Msg::Records { epoch, from, records, high_watermark } => {
                if self.node(to).replica.next_fetch().map(|f| f.0) != Some(epoch) {
                    return;
                }
                let mut commands = Vec::new();
                let node = self.node_mut(to);
                if from == node.log.len() as Offset {
                    for (record_epoch, value) in records {
                        node.log.push((record_epoch, value));
                        let end = node.log.len() as Offset;
                        commands.extend(node.replica.on(Event::Appended { end, epoch: record_epoch }, now));
                    }
                    commands.extend(node.replica.on(Event::LeaderHighWatermark { high_watermark }, now));
                }
                self.apply(to, commands);
                let delay = if from == self.node(to).log.len() as Offset { 20 } else { 1 };
                self.schedule(delay, Ev::SendFetch { node: to, epoch });
            }
            Msg::Diverging { epoch, diverging, end } => {
                if self.node(to).replica.next_fetch().map(|f| f.0) != Some(epoch) {
                    return;
                }
                let commands = self.node_mut(to).replica.on(Event::Diverged { epoch: diverging, end }, now);
                self.apply(to, commands);
                self.schedule(1, Ev::SendFetch { node: to, epoch });
            }
            Msg::Refused { epoch } => {
                if self.node(to).replica.next_fetch().map(|f| f.0) == Some(epoch) {
                    self.schedule(50, Ev::SendFetch { node: to, epoch });
                }
            }
        }
    }

    /// Carries out a replica's commands.
    fn apply(&mut self, id: NodeId, commands: Vec<Command>) {
        for command in commands {
            match command {
                Command::WriteEpochCheckpoint { .. } => {}
                Command::AnswerFetch { .. } => unreachable!("answered where fetches are delivered"),
                Command::HighWatermark { offset } => {
                    // I6: a leader's high watermark stays while its ISR is below min ISR.
                    if let Some(isr) = self.node(id).replica.isr() {
                        if isr.len() < MIN_INSYNC {
                            let detail =
                                format!("{id} moved its high watermark to {offset} with ISR {isr:?}");
                            self.violation("I6", detail);
                        }
                    }
                    if std::env::var_os("SKEIN_SIM_TRACE").is_some() {
                        eprintln!(
                            "t={} {id} hw {offset} readable {:?} leader_epoch {:?} log {}",
                            self.now,
                            self.node(id).replica.readable_end(),
                            self.node(id).replica.leader_epoch(),
                            self.node(id).log.len()
                        );
                    }
                    if let Ok(exposed) = self.node(id).replica.readable_end() {
                        if exposed < self.max_exposed {
                            self.violation(
                                "I2",
                                format!("{id} exposes {exposed} after {} was exposed", self.max_exposed),
                            );
                        }
                        self.max_exposed = self.max_exposed.max(exposed);
                    }
                }
                Command::AckResolved { id: ack } => {
                    let Some((leader, offset, value)) = self.waiting.remove(&ack) else { continue };
                    // I12: nothing at or above the high watermark is acknowledged.
                    let high_watermark = self.node(leader).replica.high_watermark();
                    if offset >= high_watermark {
                        let detail = format!(
                            "{leader} acknowledged {offset} with its high watermark at {high_watermark}"
                        );
                        self.violation("I12", detail);
                    }
                    self.report.acked += 1;
                    self.acked.push((offset, value));
                    let isr = self.cluster.partitions[&self.tp].isr.clone();
                    for member in isr {
                        let node = self.node(member);
                        let held = node.log.get(offset as usize).map(|r| r.1);
                        if held != Some(value) || node.synced <= offset as usize {
                            let detail = format!(
                                "ack of {value} at {offset} by {leader}: ISR member {member} holds {held:?}, synced to {}",
                                node.synced
                            );
                            self.violation("I1", detail);
                        }
                    }
                }
                Command::AckFailed { id: ack, .. } => {
                    self.waiting.remove(&ack);
                }
                Command::ProposeIsr { isr, leader_epoch, partition_epoch } => {
                    let members: Vec<(NodeId, BrokerEpoch)> = isr
                        .iter()
                        .map(|&n| (n, self.cluster.brokers.get(&n).map_or(BrokerEpoch(0), |b| b.epoch)))
                        .collect();
                    let tp = self.tp.clone();
                    match self.cluster.alter_partition(&tp, id, leader_epoch, partition_epoch, &members) {
                        Ok(change) => self.applied(vec![change]),
                        Err(_) => {
                            // The leader hears the refusal and may propose again.
                            let now = self.now;
                            let commands = self.node_mut(id).replica.on(Event::IsrRejected, now);
                            self.apply(id, commands);
                        }
                    }
                }
                Command::Truncate { offset } => {
                    self.report.truncations += 1;
                    // I7: never below the high watermark this replica has exposed (followers
                    // expose theirs to nothing, but it is what they would serve as leader).
                    let exposed = self.node(id).replica.high_watermark();
                    if offset < exposed {
                        self.violation(
                            "I7",
                            format!("{id} truncated to {offset}, below its high watermark {exposed}"),
                        );
                    }
                    let node = self.node_mut(id);
                    node.log.truncate(offset as usize);
                    node.synced = node.synced.min(offset as usize);
                }
                Command::FetchFrom { epoch, .. } => self.schedule(1, Ev::SendFetch { node: id, epoch }),
            }
        }
    }

    /// The controller changed partitions: the changes become records (checked by `apply`),
    /// and every live broker applies the metadata at once.
    fn applied(&mut self, changes: Vec<PartitionChange>) {
        if !changes.is_empty() {
            self.record(changes);
            self.notify();
        }
    }

    fn record(&mut self, changes: Vec<PartitionChange>) {
        let records: Vec<_> = changes.iter().map(PartitionChange::to_record).collect();
        if let Err(error) = crate::metadata::apply(&mut self.image, &records) {
            self.violation("records", error.to_string());
        }
    }

    fn notify(&mut self) {
        let partition = self.cluster.partitions[&self.tp].clone();
        let now = self.now;
        self.check_metadata(&partition);
        for id in NODES {
            if !self.running(id) {
                continue;
            }
            let known = self.node(id).known;
            let current = (partition.leader_epoch, partition.partition_epoch.0);
            if known == Some(current) {
                continue;
            }
            let epoch_changed = known.map(|k| k.0) != Some(partition.leader_epoch);
            let event = match partition.leader {
                Some(leader) if leader == id && epoch_changed => {
                    self.report.leader_changes += 1;
                    if let Some(&other) = self.leaders_by_epoch.get(&partition.leader_epoch.0) {
                        if other != id {
                            self.violation(
                                "I4",
                                format!("{id} and {other} both lead epoch {}", partition.leader_epoch.0),
                            );
                        }
                    }
                    self.leaders_by_epoch.insert(partition.leader_epoch.0, id);
                    Some(Event::BecomeLeader {
                        epoch: partition.leader_epoch,
                        partition_epoch: partition.partition_epoch,
                        replicas: partition.replicas.clone(),
                        isr: partition.isr.clone(),
                    })
                }
                Some(leader) if leader == id => Some(Event::IsrCommitted {
                    isr: partition.isr.clone(),
                    partition_epoch: partition.partition_epoch,
                }),
                Some(leader) if epoch_changed => {
                    Some(Event::BecomeFollower { leader, epoch: partition.leader_epoch })
                }
                None if epoch_changed => Some(Event::Offline { epoch: partition.leader_epoch }),
                _ => None,
            };
            self.node_mut(id).known = Some(current);
            if std::env::var_os("SKEIN_SIM_TRACE").is_some() {
                eprintln!(
                    "t={} notify {id}: {event:?} (log {}, isr {:?}, elr {:?})",
                    self.now,
                    self.node(id).log.len(),
                    partition.isr,
                    partition.elr
                );
            }
            if let Some(event) = event {
                let commands = self.node_mut(id).replica.on(event, now);
                self.apply(id, commands);
            }
        }
    }

    /// I5: a new leader comes from the ISR, or the ELR when the ISR is empty, and is neither
    /// fenced nor unclean. I9: the committed ISR is within the replicas, holds the leader, and
    /// no fenced or unclean member.
    fn check_metadata(&mut self, partition: &crate::controller::cluster::Partition) {
        let previous = self.last_partition.replace(partition.clone());
        if let (Some(before), Some(leader)) = (&previous, partition.leader) {
            if before.leader != Some(leader) {
                let from_isr = before.isr.contains(&leader);
                let from_elr =
                    before.isr.iter().all(|m| self.cluster.brokers[m].fenced) && before.elr.contains(&leader);
                if !(from_isr || from_elr) {
                    let detail = format!(
                        "{leader} elected from neither the ISR {:?} nor the ELR {:?}",
                        before.isr, before.elr
                    );
                    self.violation("I5", detail);
                }
            }
        }
        if let Some(leader) = partition.leader {
            let broker = &self.cluster.brokers[&leader];
            if broker.fenced || broker.unclean {
                self.violation("I5", format!("{leader} leads while fenced or unclean"));
            }
            if !partition.isr.contains(&leader) {
                self.violation("I9", format!("the leader {leader} is not in the ISR {:?}", partition.isr));
            }
        }
        for member in &partition.isr {
            let outside = !partition.replicas.contains(member);
            let ineligible = self.cluster.brokers.get(member).is_none_or(|b| b.fenced || b.unclean);
            if outside || ineligible {
                self.violation(
                    "I9",
                    format!("ISR {:?} holds {member}, outside the replicas or fenced", partition.isr),
                );
            }
        }
    }

    /// A broker dies; what it had not synced is partly lost (the page cache it sat in).
    fn crash(&mut self, id: NodeId) {
        self.report.faults += 1;
        let keep_extra = {
            let node = self.node(id);
            let unsynced = (node.log.len() - node.synced) as u64;
            self.rng.range(0, unsynced + 1) as usize
        };
        let node = self.node_mut(id);
        node.alive = false;
        let keep = node.synced + keep_extra;
        node.log.truncate(keep);
        node.synced = node.log.len();
        node.known = None;
        self.waiting.retain(|_, (leader, _, _)| *leader != id);
        let delay = self.rng.range(200, 800);
        self.schedule(delay, Ev::Restart(id));
    }

    fn restart(&mut self, id: NodeId) {
        if self.node(id).alive {
            return;
        }
        let now = self.now;
        let rules = self.config.rules;
        let node = self.node_mut(id);
        node.alive = true;
        let mut epochs = EpochCache::default();
        for (offset, (epoch, _)) in node.log.iter().enumerate() {
            epochs.assign(*epoch, offset as Offset);
        }
        let end = node.log.len() as Offset;
        node.replica = ReplicaState::new(id, replica_config(rules), 0, end, end, epochs, 0);
        node.broker_epoch = BrokerEpoch(now + 1);
        let epoch = node.broker_epoch;
        let changes = self.cluster.register(id, epoch, false, now);
        self.applied(changes);
        let changes = self.cluster.heartbeat(id, epoch, u64::MAX, now).unwrap_or_default();
        self.applied(changes);
        self.notify();
    }

    fn check(&mut self) {
        self.report.checks += 1;
        // I3: replicas agree below the smaller of their high watermarks.
        for a in 0..NODES.len() {
            for b in a + 1..NODES.len() {
                let (x, y) = (&self.nodes[a], &self.nodes[b]);
                let below = x.replica.high_watermark().min(y.replica.high_watermark()) as usize;
                let below = below.min(x.log.len()).min(y.log.len());
                if x.log[..below] != y.log[..below] {
                    let at = (0..below).find(|&i| x.log[i] != y.log[i]).unwrap_or(0);
                    let detail =
                        format!("{} and {} differ at {at}: {:?} vs {:?}", x.id, y.id, x.log[at], y.log[at]);
                    self.violation("I3", detail);
                }
            }
        }
    }

    fn check_healed(&mut self) {
        let partition = self.cluster.partitions[&self.tp].clone();
        let Some(leader) = partition.leader else {
            self.violation("liveness", "no leader after healing".into());
            return;
        };
        let leader_node = self.node(leader);
        let (hw, log) = (leader_node.replica.high_watermark(), leader_node.log.clone());
        if hw != log.len() as Offset {
            self.violation(
                "liveness",
                format!("leader {leader}: high watermark {hw} below its log end {}", log.len()),
            );
        }
        for (offset, value) in self.acked.clone() {
            if log.get(offset as usize).map(|r| r.1) != Some(value) {
                self.violation("I1", format!("acknowledged {value} at {offset} is not in the final log"));
            }
        }
        for id in NODES {
            let node = self.node(id);
            if node.log != log {
                let same = node.log.iter().zip(&log).take_while(|(a, b)| a == b).count();
                let detail = format!(
                    "{id} does not hold the leader's log after healing: {} records (its replica says {}; the leader {} has {}), same up to {same}, its high watermark {}, fetching in epoch {:?}",
                    node.log.len(),
                    node.replica.log_end(),
                    leader,
                    log.len(),
                    node.replica.high_watermark(),
                    node.replica.next_fetch().map(|f| f.0),
                );
                let detail = format!(
                    "{detail}; epochs: its {:?}, the leader's {:?}",
                    node.replica.epochs().entries(),
                    self.node(leader).replica.epochs().entries()
                );
                let detail = format!(
                    "{detail}; metadata: leader epoch {:?}, ISR {:?}; the leader leads epoch {:?}; fetches pending for it: {}",
                    partition.leader_epoch,
                    partition.isr,
                    self.node(leader).replica.leader_epoch(),
                    self.pending_fetches(id),
                );
                self.violation("liveness", detail);
            }
        }
        if !self.waiting.is_empty() {
            self.violation("liveness", format!("{} acknowledgements still waiting", self.waiting.len()));
        }
    }
}

impl Sim {
    /// The fetch events of `id` still queued, for a liveness report: when, and what.
    fn pending_fetches(&self, id: NodeId) -> String {
        let mut pending = Vec::new();
        for Reverse((at, seq)) in &self.queue {
            let what = match self.events.get(seq) {
                Some(Ev::SendFetch { node, epoch }) if *node == id => format!("send e{}", epoch.0),
                Some(Ev::FetchTimeout { node, epoch, generation }) if *node == id => {
                    format!("timeout e{} g{generation} (now g{})", epoch.0, self.node(id).fetch_generation)
                }
                Some(Ev::Deliver { to, msg: Msg::Fetch { from, .. } }) if *from == id => {
                    format!("fetch to {to}")
                }
                _ => continue,
            };
            pending.push(format!("{at}:{what}"));
        }
        pending.join(", ")
    }
}

#[cfg(test)]
mod tests;
