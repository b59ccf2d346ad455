//! # skein-replication: the I/O-free cores of the cluster
//!
//! No runtime, no clock, no sockets, no files: state machines that take events (records,
//! requests, time passed in) and return what to do. The broker runs them on its shards; the
//! simulator (to come) runs them under seeded faults.
//!
//! * [`metadata`]: metadata as versioned records, the image they build, the one pure `apply`
//!   function and the deltas each shard reconciles its partitions against.
//! * [`controller`]: the controller's rules (request + image → records or a refusal).
//! * [`partition`]: one partition's replica ([`partition::ReplicaState`]): leader and follower,
//!   durable offsets, the high watermark, the leader-epoch cache and divergence, ISR proposals,
//!   `acks=all`.
//!
//! Still to come (issue 14): the controller's cluster state (brokers, ISR validation,
//! elections, ELR), the Raft wrapper, and the simulator that runs all of them under faults.

pub mod controller;
pub mod metadata;
pub mod partition;
