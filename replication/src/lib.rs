//! # skein-replication: the I/O-free cores of the cluster
//!
//! No runtime, no clock, no sockets, no files: state machines that take events (records,
//! requests, time passed in) and return what to do. The broker runs them on its shards; the
//! simulator ([`sim`]) runs them under seeded faults.
//!
//! * [`metadata`]: metadata as versioned records, the image they build, the one pure `apply`
//!   function and the deltas each shard reconciles its partitions against.
//! * [`controller`]: the controller's rules (request + image → records or a refusal) and the
//!   cluster state ([`controller::cluster`]: brokers, fencing, ISR validation, elections, ELR).
//! * [`partition`]: one partition's replica ([`partition::ReplicaState`]): leader and follower,
//!   durable offsets, the high watermark, the leader-epoch cache and divergence, ISR proposals,
//!   `acks=all`.
//!
//! * `raft` (feature `raft`, on by default; raft-rs's build needs `protoc`): the consensus
//!   shard's Raft around raft-rs as a state machine, with the persistence-before-send rule and
//!   elections drawn from the caller's seed ([`rng`]). The workspace depends on this crate
//!   without default features, so the broker builds without protoc until it runs the
//!   consensus shard itself; `cargo test --workspace` (CI) builds and tests it.
//!
//! * `sim` (with `raft`): a deterministic simulator of a three-node cluster (every node a
//!   broker and a controller): three Raft members deciding the metadata with the real
//!   controller rules, brokers that register, heartbeat and pull the committed metadata over a
//!   lossy network, three partitions each replicated on the three brokers with the real
//!   `ReplicaState`, an idempotent producer and a consumer per partition, a simulated clock,
//!   network and disk, seeded faults; it checks the design's
//!   invariants after every step, and the rules of the shells around the cores
//!   (`sim::ShellRules`, which the broker's shells must keep). `skein-sim` runs it over many
//!   seeds.
//!
//! `tests/scenarios.rs` replays the published replication bugs (KIP-101 cases 1 and 2, KIP-279,
//! KIP-966, a zombie leader after a pause, Jepsen 2013, an ISR expansion during a leader
//! change) step by step; each must lose or diverge with its rule switched off
//! ([`partition::Rules`]) and not with every rule on.
//!
//! Still to come: the broker shells that run the cores over the network (replica manager and
//! fetcher, the consensus shard on shard 0, the metadata follower), which must keep the rules of
//! `sim::ShellRules`.

pub mod controller;
pub mod metadata;
pub mod partition;
#[cfg(feature = "raft")]
pub mod raft;
pub mod rng;
#[cfg(feature = "raft")]
pub mod sim;
