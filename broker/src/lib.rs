//! # skein-broker: the thread-per-core broker
//!
//! One glommio executor per core, each pinned to its CPU (a *shard*). Every partition is owned
//! by exactly one shard (its [`router::PartitionTable`] says which), and only that shard
//! touches its log; shards share nothing and talk through glommio's lock-free channel mesh. Each shard accepts connections on
//! the same port (SO_REUSEPORT) and forwards requests for partitions it does not own; the
//! answer comes back the same way. There is no `Mutex` or `RwLock` on the produce or fetch path.
//!
//! * [`allocator`]: glibc malloc's thresholds, so that request frames reuse freed memory
//!   instead of page-faulting fresh pages for every byte produced.
//! * [`server`]: start-up, the shards' main loops, shutdown on SIGINT/SIGTERM.
//! * [`shard`]: one shard's state; its module docs say which core each structure lives on.
//! * [`mesh`]: typed, fallible cross-shard calls with deadlines (each operation names its
//!   reply; a stopped shard or a missed deadline is a [`mesh::MeshError`], never a panic).
//! * [`router`]: the partition table each shard consults to find a partition's shard, filled
//!   from metadata; the hash survives only as placement of new partitions.
//! * [`connection`]: framing, pipelining and limits of one client connection.
//! * [`handlers`]: what each API does.
//! * [`sendfile`]: how records reach the socket (memory, or `sendfile` on the shard for ranges
//!   wholly in the page cache; cold ranges are read with O_DIRECT by the storage engine).
//! * [`metrics`]: Prometheus metrics counted per shard and merged on scrape, `/health`,
//!   `/ready` (an HTTP thread beside the shards).
//! * [`settings`]: the config file (`skein.toml`), its environment overrides, and how they
//!   and the flags make a [`BrokerConfig`].
//! * [`metadata`]: the stored snapshot of the topics and the producer-id blocks (the topic
//!   settings, records, image and controller rules themselves are in `skein-replication`).
//! * [`reconcile`]: what a shard opens and closes so that its partitions match its metadata
//!   image (a pure plan; the shard applies records, then carries it out).
//! * [`producers`]: idempotent producers: the per-partition table of sequences that turns a
//!   retried batch into its original offsets, its snapshots and its rebuild from the log.
//! * [`groups`]: consumer groups: the state machine (membership, KIP-848-style incremental
//!   assignment, commit fencing, [`groups::state`]), committed offsets in the internal offsets
//!   log, compacted by snapshot ([`groups::offsets`]), serving them on the group's coordinator
//!   shard ([`groups::service`]) and the shard side: forwarding, expiry, compaction
//!   ([`groups::coordinator`]).
//!
//! ## How a produced record travels
//! socket → the accepting shard's reader task frames the request ([`connection`]) → the records
//! of each partition are carved out of the frame without copying → the owning shard (local, or
//! through the mesh, a typed call with the produce's deadline) checks every batch and appends
//! it to the partition's `Log` (offsets
//! assigned, copied into O_DIRECT buffers) → the log's flusher writes (and syncs with
//! `--fsync always`) → the ack resolves → the response goes back through the mesh and out of
//! the connection's writer, in request order.
//!
//! ## Which core runs what
//! Every shard runs its connections, the partitions placed on it, its copy of the metadata
//! image and partition table, and the consumer groups whose offsets partition it holds. Shard 0
//! is also the controller: it turns topic requests into metadata records, persists them and
//! sends them to every shard (itself included).
//!
//! ## Must never
//! * block a shard on disk I/O (storage goes through io_uring; blocking calls go to
//!   `spawn_blocking`);
//! * let one client's bad input touch another client or any stored data.

pub mod allocator;
pub mod config;
pub mod connection;
mod errors;
pub mod groups;
pub mod handlers;
pub mod mesh;
pub mod metadata;
pub mod metrics;
mod oneshot;
pub mod preflight;
pub mod producers;
pub mod quic;
pub mod quic_runtime;
pub mod reconcile;
pub mod request_memory;
pub mod router;
pub mod sendfile;
pub mod server;
pub mod settings;
pub mod shard;
pub mod steering;

pub use config::BrokerConfig;

/// The git commit this broker was built from (`-dirty` with uncommitted changes; `unknown`
/// outside a git checkout).
pub const BUILD_COMMIT: &str = env!("SKEIN_GIT_COMMIT");
pub use server::{run, start, start_until, RunningBroker, StartError};
