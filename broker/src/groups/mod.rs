//! Consumer groups: membership, KIP-848-style incremental assignment, commit fencing, and the
//! committed offsets, durably.
//!
//! * [`state`]: the pure state machine (groups, members, the assignor, commit checks) and the
//!   wire form of committed offsets; no I/O, no clock.
//! * [`offsets`]: committed offsets in the internal offsets log, compacted by snapshot.
//! * [`service`]: [`GroupService`], serving a [`GroupOp`] on the group's coordinator shard from
//!   the state the shard holds.
//! * [`coordinator`]: the shard side: opening the offsets partitions, forwarding requests to
//!   the coordinator shard, listing groups, expiring members and compacting offsets logs.
//!
//! Dependencies point one way: `offsets` uses `state`; `service` uses both; `shard.rs` uses
//! those three (the state it holds, the requests it serves); only `coordinator` uses `shard.rs`.

pub mod coordinator;
pub mod offsets;
pub mod service;
pub mod state;

pub use coordinator::{coordinator_loop, open_offsets, request_group_op, request_list_groups};
pub use service::{GroupOp, GroupService};
pub use state::{Committed, Coordinator};
