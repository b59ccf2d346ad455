//! # skein-storage: the partition log
//!
//! This crate owns everything Skein keeps on disk for one partition: the record batch format
//! (shared with the wire), the segment files and their indexes, and the [`Log`] that appends to
//! them through glommio's O_DIRECT files on io_uring, serves reads, rolls and deletes segments,
//! truncates, and recovers after a crash.
//!
//! * [`batch`]: the record batch, its byte table, builder, validation and record iterator.
//!   Pure code, no I/O; also what the client and the wire protocol use (build with
//!   `default-features = false` to get only the format, without glommio).
//! * [`files`]: byte tables of the segment header, the index files and the checkpoint.
//! * [`metrics`] (feature `engine`): what a shard's logs did (rolls, fsync latency, cache and
//!   file reads), counted per shard for the broker's Prometheus metrics.
//! * [`Log`] (feature `engine`, on by default): the engine. Its module documentation holds the
//!   crash-consistency argument and the path of an append; the code is split along its seams
//!   (`log/{append, flusher, recovery, read, retention, truncate}.rs`).
//!
//! ## The partition log seam
//! [`PartitionLog`] is the narrow interface a partition's owner needs: start, end and acked
//! offsets, `append_leader` (the log assigns offsets, the epoch is stamped), `append_follower`
//! (offsets and epochs kept, a gap or overlap refused), bounded reads returning [`LogRead`]
//! (memory chunks, or an opaque [`FileRange`] turned into bytes by `read_range`), `truncate_to`,
//! `reset_to`, `epochs`, `flush` and `close`. Two backends implement it:
//! * [`Log`], the real one (its epoch cache is in memory only for now: see [`Log::epochs`]);
//! * `mem::MemLog` (feature `mem`), in memory and deterministic, which injects the faults a
//!   disk has: a failed write (ENOSPC), a failed sync (EIO), a crash that loses the unsynced
//!   suffix, a torn last batch found by recovery.
//!
//! `tests/conformance.rs` runs one suite of behaviour checks, written once over the trait,
//! against both (each under `fsync=always` and `never`), then the fault cases on `MemLog`. The
//! crate's dev-dependency on itself turns `mem` on, so a plain `cargo test` runs it.
//!
//! ## Invariants
//! * Offsets are assigned by the log, strictly increasing without gaps, and never handed out
//!   twice, except by an explicit [`Log::truncate`] or [`Log::reset_to`]. A follower's
//!   [`Log::append_follower`] keeps the offsets its leader assigned, and is refused unless they
//!   continue the log without a gap.
//! * A record is visible to readers only once it passed the fsync policy's ack point, so a
//!   reader never sees a record that a crash could take back under that policy.
//! * Recovery never skips bytes it cannot explain: a torn tail after the recovery point is
//!   truncated (and logged); anything else invalid is an error naming the file and position.
//! * Every on-disk format has a magic number and a version; unknown versions are refused.
//!
//! ## What this crate must never do
//! * Block the executor thread on I/O: every data-file read and write goes through io_uring.
//! * Share a [`Log`] across threads: it lives on the shard that owns the partition.
//!
//! ## Example
//! ```no_run
//! use skein_storage::{batch::BatchBuilder, FsyncPolicy, Log, LogConfig};
//! glommio::LocalExecutor::default().run(async {
//!     let config = LogConfig { fsync: FsyncPolicy::Always, ..LogConfig::default() };
//!     let log = Log::open("/var/lib/skein/orders-0", config).await.unwrap();
//!     let mut batch = BatchBuilder::new();
//!     batch.push(1_700_000_000_000, Some(b"key"), Some(b"value"), &[]);
//!     let appended = log.append(batch.finish()).await.unwrap();
//!     appended.ack.await.unwrap(); // synced: survives a crash
//!     let (bytes, next) = log.read_verified(appended.base_offset, 1 << 20).await.unwrap();
//!     assert_eq!(next, appended.last_offset + 1);
//!     # let _ = bytes;
//!     log.close().await.unwrap();
//! });
//! ```

pub mod batch;
/// CRC32C combine of a concatenation's parts (for `batch::BatchBuilder`).
mod crc;
pub mod files;
pub mod varint;

#[cfg(feature = "engine")]
mod appender;
#[cfg(feature = "engine")]
mod cache;
#[cfg(feature = "engine")]
mod config;
#[cfg(feature = "engine")]
mod error;
#[cfg(feature = "engine")]
pub mod handles;
#[cfg(feature = "engine")]
mod io;
#[cfg(feature = "engine")]
mod log;
#[cfg(feature = "mem")]
pub mod mem;
#[cfg(feature = "engine")]
pub mod metrics;
#[cfg(feature = "engine")]
mod notify;
#[cfg(feature = "engine")]
mod partition_log;
#[cfg(feature = "engine")]
mod segment;

#[cfg(feature = "engine")]
pub use crate::config::{FsyncPolicy, LogConfig, ParseFsyncPolicyError};
#[cfg(feature = "engine")]
pub use crate::error::{CorruptionKind, Result, StorageError};
#[cfg(feature = "engine")]
pub use crate::io::{free_bytes, now_ms, prime_executor, write_file_atomically};
#[cfg(feature = "engine")]
pub use crate::log::{
    AppendAck, Appended, Log, ReadData, ReadSlice, RetentionOutcome, READ_AHEAD_IDLE, READ_AHEAD_STREAMS_MAX,
};
#[cfg(feature = "engine")]
pub use crate::partition_log::{EpochEntry, FileRange, LogData, LogRead, PartitionLog};
#[cfg(feature = "engine")]
pub use crate::segment::SegmentFile;
