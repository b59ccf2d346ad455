//! [`MemLog`]: a [`PartitionLog`] in memory, with faults injected by the caller (feature `mem`).
//!
//! It models what the real [`crate::Log`] guarantees, not how it does it: a *written* mark (an
//! O_DIRECT write completed: survives a crash of the process) and a *synced* mark (covered by a
//! completed `fdatasync`: survives a power loss), the ack point of the fsync policy between
//! them, and recovery after a crash that keeps the synced prefix, possibly some of what came
//! after it, and drops a torn last batch. It is the disk of the simulator and of tests that need
//! a full disk or a failed sync on demand.
//!
//! Deterministic: nothing happens that the caller did not ask for. No clock, no randomness, no
//! I/O; its futures complete without an executor's timers or reactor (any executor runs them).
//!
//! # The write model
//! An append is buffered and then *written* at once, unless writes are held
//! ([`MemLog::hold_writes`]): then it waits, unacknowledged, until [`MemLog::release_writes`] or
//! until something that waits for writes (`flush`, `truncate_to`, `reset_to`, `close`), as the
//! real log's flusher would get to it. Each time pending appends are written, they form one
//! write job (like the real flusher's group commit): an injected write failure fails the whole
//! job. Syncs: with [`FsyncPolicy::Always`] every write job is synced before its appends are
//! acknowledged; with `Never` (and `Interval`, which behaves as `Never` here: there is no clock)
//! only `flush`, `truncate_to`, `reset_to` and `close` sync.
//!
//! # Faults
//! * [`MemLog::fail_next_write`]: the next write job fails as a full disk does in the real log
//!   (ENOSPC): nothing of it is acknowledged, its appends' acks resolve with
//!   [`StorageError::WriteAborted`], their offsets are given back and the log stays usable.
//! * [`MemLog::fail_next_sync`]: the next sync fails (EIO): pending acks resolve with
//!   [`StorageError::Failed`], and the log refuses writes until a crash and recovery
//!   ([`MemLog::crash`]), as the real log does until it is reopened.
//! * [`MemLog::crash`]: the process dies and the log is recovered; see [`Crash`].

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;

use crate::batch::{self, ValidatedBatch};
use crate::config::{FsyncPolicy, LogConfig};
use crate::error::{Result, StorageError};
use crate::log::{AppendAck, Appended};
use crate::partition_log::{
    split_follower_batches, EpochCache, EpochEntry, FileRange, LogData, LogRead, PartitionLog,
};

/// The path named in the errors of a [`MemLog`].
const MEMORY_PATH: &str = "<memory>";

/// What survives a [`MemLog::crash`] beyond the synced prefix, which always does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Crash {
    /// How many of the batches after the last sync reached the disk whole, oldest first (a
    /// write in flight may or may not have landed). `0`: the whole unsynced suffix is lost, as
    /// in a power loss right after the last sync.
    pub keep_unsynced: usize,
    /// The batch after those reached the disk only in part: recovery finds it torn (its CRC no
    /// longer matches) and drops it with everything after it.
    pub torn: bool,
}

/// What recovery after a [`MemLog::crash`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// The end offset after recovery.
    pub end_offset: u64,
    /// Batches appended before the crash that are gone (lost or torn).
    pub batches_lost: usize,
    /// Bytes of a torn batch that recovery dropped (0 if none).
    pub torn_bytes_dropped: usize,
}

struct MemBatch {
    base_offset: u64,
    next_offset: u64,
    leader_epoch: u32,
    bytes: Bytes,
}

struct PendingAck {
    next_offset: u64,
    reply: oneshot::Sender<Result<()>>,
}

struct State {
    fsync: FsyncPolicy,
    batch_bytes_max: usize,
    batches: VecDeque<MemBatch>,
    start: u64,
    /// The next offset to assign.
    end: u64,
    /// Everything before it is written (survives a crash of the process).
    written: u64,
    /// Everything before it is synced (survives a power loss).
    synced: u64,
    acks: VecDeque<PendingAck>,
    hold_writes: bool,
    fail_next_write: bool,
    fail_next_sync: bool,
    failed: Option<Arc<StorageError>>,
    closed: bool,
    epochs: EpochCache,
}

/// A partition log in memory, with injected faults; see the [module docs](self).
///
/// Lives on one thread (`!Send`), like [`crate::Log`].
pub struct MemLog {
    state: RefCell<State>,
}

impl MemLog {
    /// An empty log starting at offset 0, acknowledging appends as `fsync` says (see the module
    /// docs), with the default largest batch ([`LogConfig::default`]).
    pub fn new(fsync: FsyncPolicy) -> MemLog {
        MemLog::with_batch_bytes_max(fsync, LogConfig::default().batch_bytes_max)
    }

    /// [`MemLog::new`] refusing batches larger than `batch_bytes_max`.
    pub fn with_batch_bytes_max(fsync: FsyncPolicy, batch_bytes_max: usize) -> MemLog {
        MemLog {
            state: RefCell::new(State {
                fsync,
                batch_bytes_max,
                batches: VecDeque::new(),
                start: 0,
                end: 0,
                written: 0,
                synced: 0,
                acks: VecDeque::new(),
                hold_writes: false,
                fail_next_write: false,
                fail_next_sync: false,
                failed: None,
                closed: false,
                epochs: EpochCache::default(),
            }),
        }
    }

    /// The offset after the last batch covered by a sync (what survives any crash).
    pub fn synced_offset(&self) -> u64 {
        self.state.borrow().synced
    }

    /// The offset after the last written batch (what survives a crash of the process).
    pub fn written_offset(&self) -> u64 {
        self.state.borrow().written
    }

    /// Whether a failed sync left the log refusing writes (until [`MemLog::crash`]).
    pub fn is_failed(&self) -> bool {
        self.state.borrow().failed.is_some()
    }

    /// From now on appends wait, unwritten and unacknowledged, until [`MemLog::release_writes`]
    /// (or an operation that waits for writes).
    pub fn hold_writes(&self) {
        self.state.borrow_mut().hold_writes = true;
    }

    /// Writes (and, per the policy, syncs) everything held, as one write job, and stops holding.
    pub fn release_writes(&self) {
        let mut state = self.state.borrow_mut();
        state.hold_writes = false;
        state.write_pending(true);
    }

    /// The next write job fails with a full disk (ENOSPC); see the module docs.
    pub fn fail_next_write(&self) {
        self.state.borrow_mut().fail_next_write = true;
    }

    /// The next sync fails (EIO); see the module docs.
    pub fn fail_next_sync(&self) {
        self.state.borrow_mut().fail_next_sync = true;
    }

    /// The process crashes and the log is recovered, as [`crate::Log::open`] recovers a
    /// directory: everything synced survives; of the batches after it, the first
    /// `crash.keep_unsynced` survive, then (if `crash.torn`) one batch survives torn, which
    /// recovery detects and drops with everything after it. Pending acks resolve with
    /// [`StorageError::Closed`]. Afterwards everything recovered counts as written and synced
    /// (as after the real recovery), the epochs are rebuilt from the recovered batches' headers,
    /// and held writes, armed faults and a failed state are cleared.
    pub fn crash(&self, crash: Crash) -> Recovered {
        let mut state = self.state.borrow_mut();
        for ack in state.acks.drain(..) {
            let _ = ack.reply.send(Err(StorageError::Closed));
        }
        let before = state.batches.len();
        let synced = state.synced;
        let durable = state.batches.partition_point(|b| b.next_offset <= synced);
        let mut on_disk: Vec<Bytes> = state.batches.iter().map(|b| b.bytes.clone()).collect();
        let survivors = (durable + crash.keep_unsynced).min(on_disk.len());
        if crash.torn && survivors < on_disk.len() {
            // The second half of the batch never reached the disk.
            let whole = &on_disk[survivors];
            let mut torn = BytesMut::from(&whole[..]);
            torn[whole.len() / 2..].fill(0);
            on_disk.truncate(survivors);
            on_disk.push(torn.freeze());
        } else {
            on_disk.truncate(survivors);
        }
        // Recovery: the synced prefix is trusted; after it, the first batch that is invalid or
        // does not continue the log ends it.
        let mut recovered: VecDeque<MemBatch> = state.batches.drain(..durable).collect();
        let mut next = recovered.back().map_or(state.start, |b| b.next_offset);
        let mut torn_bytes_dropped = 0;
        for bytes in on_disk.into_iter().skip(durable) {
            match batch::validate(&bytes, state.batch_bytes_max) {
                Ok(header) if header.base_offset == next && header.total_bytes() == bytes.len() => {
                    next = header.next_offset();
                    recovered.push_back(MemBatch {
                        base_offset: header.base_offset,
                        next_offset: header.next_offset(),
                        leader_epoch: header.leader_epoch,
                        bytes,
                    });
                }
                _ => {
                    torn_bytes_dropped = bytes.len();
                    break;
                }
            }
        }
        state.epochs.clear();
        for b in &recovered {
            state.epochs.assign(b.leader_epoch, b.base_offset);
        }
        let batches_lost = before - recovered.len();
        state.batches = recovered;
        state.end = next;
        state.written = next;
        state.synced = next;
        state.hold_writes = false;
        state.fail_next_write = false;
        state.fail_next_sync = false;
        state.failed = None;
        state.closed = false;
        Recovered { end_offset: next, batches_lost, torn_bytes_dropped }
    }

    /// A crash of the process alone: every completed write survives, nothing is torn.
    pub fn crash_process(&self) -> Recovered {
        let keep_unsynced = {
            let state = self.state.borrow();
            let (synced, written) = (state.synced, state.written);
            state.batches.iter().filter(|b| b.base_offset >= synced && b.next_offset <= written).count()
        };
        self.crash(Crash { keep_unsynced, torn: false })
    }
}

impl State {
    fn ack_point(&self) -> u64 {
        if self.fsync.is_always() {
            self.synced
        } else {
            self.written
        }
    }

    fn check_usable(&self) -> Result<()> {
        if let Some(error) = &self.failed {
            return Err(StorageError::Failed(error.clone()));
        }
        if self.closed {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    fn resolve_acks(&mut self) {
        let acked = self.ack_point();
        while self.acks.front().is_some_and(|ack| ack.next_offset <= acked) {
            let ack = self.acks.pop_front().expect("front exists");
            let _ = ack.reply.send(Ok(()));
        }
    }

    /// Writes every pending append as one write job (unless held and not `forced`), then syncs
    /// it under `fsync=always`.
    fn write_pending(&mut self, forced: bool) {
        if self.failed.is_some() || self.written == self.end || (self.hold_writes && !forced) {
            return;
        }
        if std::mem::take(&mut self.fail_next_write) {
            let written = self.written;
            while self.batches.back().is_some_and(|b| b.base_offset >= written) {
                self.batches.pop_back();
            }
            self.end = written;
            self.epochs.truncate_from_end(written);
            let aborted = StorageError::WriteAborted(Arc::new(StorageError::NoSpace {
                op: "writing",
                path: MEMORY_PATH.into(),
            }));
            while self.acks.back().is_some_and(|ack| ack.next_offset > written) {
                let ack = self.acks.pop_back().expect("back exists");
                let _ = ack.reply.send(Err(aborted.clone()));
            }
            return;
        }
        self.written = self.end;
        if self.fsync.is_always() {
            let _ = self.sync();
        }
        self.resolve_acks();
    }

    /// Syncs everything written.
    fn sync(&mut self) -> Result<()> {
        if let Some(error) = &self.failed {
            return Err(StorageError::Failed(error.clone()));
        }
        if self.synced == self.written {
            return Ok(());
        }
        if std::mem::take(&mut self.fail_next_sync) {
            let error = Arc::new(StorageError::Io {
                op: "syncing",
                path: MEMORY_PATH.into(),
                source: Arc::new(std::io::Error::from_raw_os_error(libc::EIO)),
            });
            for ack in self.acks.drain(..) {
                let _ = ack.reply.send(Err(StorageError::Failed(error.clone())));
            }
            self.failed = Some(error.clone());
            return Err(StorageError::Failed(error));
        }
        self.synced = self.written;
        self.resolve_acks();
        Ok(())
    }

    /// What the real log's barrier does: write and sync everything appended so far.
    fn barrier(&mut self) -> Result<()> {
        let end = self.end;
        self.write_pending(true);
        self.sync()?;
        if self.written < end {
            // The write job failed: the appends were not written (their offsets were given back).
            return Err(StorageError::WriteAborted(Arc::new(StorageError::NoSpace {
                op: "writing",
                path: MEMORY_PATH.into(),
            })));
        }
        Ok(())
    }

    fn push(&mut self, bytes: Bytes, header: &batch::BatchHeader) {
        self.epochs.assign(header.leader_epoch, header.base_offset);
        self.end = header.next_offset();
        self.batches.push_back(MemBatch {
            base_offset: header.base_offset,
            next_offset: header.next_offset(),
            leader_epoch: header.leader_epoch,
            bytes,
        });
    }

    fn queue_ack(&mut self, base_offset: u64) -> Appended {
        let (reply, receiver) = oneshot::channel();
        let next_offset = self.end;
        self.acks.push_back(PendingAck { next_offset, reply });
        self.write_pending(false);
        Appended { base_offset, last_offset: next_offset - 1, ack: AppendAck::new(receiver) }
    }
}

impl PartitionLog for MemLog {
    fn start_offset(&self) -> u64 {
        self.state.borrow().start
    }

    fn end_offset(&self) -> u64 {
        self.state.borrow().end
    }

    fn acked_offset(&self) -> u64 {
        self.state.borrow().ack_point()
    }

    fn epochs(&self) -> Vec<EpochEntry> {
        let state = self.state.borrow();
        state.epochs.view(state.start)
    }

    async fn append_leader(&self, batch: BytesMut, epoch: u32) -> Result<Appended> {
        let mut state = self.state.borrow_mut();
        let (mut batch, header) = ValidatedBatch::new(batch, state.batch_bytes_max)?.into_parts();
        state.check_usable()?;
        let base_offset = state.end;
        batch::set_base_offset(&mut batch, base_offset);
        batch::set_leader_epoch(&mut batch, epoch);
        let header = batch::BatchHeader { base_offset, leader_epoch: epoch, ..header };
        state.push(batch.freeze(), &header);
        Ok(state.queue_ack(base_offset))
    }

    async fn append_follower(&self, batches: Bytes) -> Result<Appended> {
        let mut state = self.state.borrow_mut();
        let batches = split_follower_batches(&batches, state.batch_bytes_max)?;
        state.check_usable()?;
        let first_offset = batches[0].1.base_offset;
        if first_offset != state.end {
            return Err(StorageError::OffsetOutOfRange {
                offset: first_offset,
                start: state.start,
                end: state.end,
            });
        }
        for (bytes, header) in batches {
            state.push(bytes, &header);
        }
        Ok(state.queue_ack(first_offset))
    }

    async fn read(&self, offset: u64, bytes_max: usize, upper_bound: u64) -> Result<LogRead> {
        let state = self.state.borrow();
        let acked = state.ack_point();
        if offset < state.start || offset > acked {
            return Err(StorageError::OffsetOutOfRange { offset, start: state.start, end: acked });
        }
        let bound = acked.min(upper_bound);
        let first = state.batches.partition_point(|b| b.next_offset <= offset);
        let mut chunks = Vec::new();
        let mut total = 0usize;
        let mut next_offset = offset;
        for b in state.batches.range(first..) {
            if b.next_offset > bound || (!chunks.is_empty() && total + b.bytes.len() > bytes_max) {
                break;
            }
            total += b.bytes.len();
            next_offset = b.next_offset;
            chunks.push(b.bytes.clone());
        }
        if chunks.is_empty() {
            return Ok(LogRead::empty(offset));
        }
        let first_offset = state.batches[first].base_offset;
        Ok(LogRead { first_offset, next_offset, data: LogData::Memory(chunks) })
    }

    async fn read_range(&self, range: &FileRange) -> Result<Bytes> {
        // A MemLog returns no file ranges; one from a real log still reads.
        range.read().await
    }

    async fn truncate_to(&self, offset: u64) -> Result<u64> {
        let mut state = self.state.borrow_mut();
        state.check_usable()?;
        state.barrier()?;
        let (start, end) = (state.start, state.end);
        if offset >= end {
            return Ok(end);
        }
        if offset < start {
            return Err(StorageError::OffsetOutOfRange { offset, start, end });
        }
        let keep = state.batches.partition_point(|b| b.next_offset <= offset);
        state.batches.truncate(keep);
        let end = state.batches.back().map_or(start, |b| b.next_offset);
        state.end = end;
        state.written = end;
        state.synced = end;
        state.epochs.truncate_from_end(end);
        Ok(end)
    }

    async fn reset_to(&self, start: u64) -> Result<()> {
        let mut state = self.state.borrow_mut();
        state.check_usable()?;
        state.barrier()?;
        state.batches.clear();
        state.start = start;
        state.end = start;
        state.written = start;
        state.synced = start;
        state.epochs.clear();
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let mut state = self.state.borrow_mut();
        state.barrier()?;
        state.check_usable()
    }

    async fn close(self) -> Result<()> {
        let mut state = self.state.borrow_mut();
        let flushed = state.barrier();
        state.closed = true;
        flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchBuilder;

    /// No glommio executor: any executor runs a MemLog's futures.
    #[test]
    fn runs_on_any_executor() {
        futures::executor::block_on(async {
            let log = MemLog::new(FsyncPolicy::Always);
            let mut builder = BatchBuilder::new();
            builder.push(1, None, Some(b"a"), &[]);
            builder.push(2, None, Some(b"b"), &[]);
            let appended = log.append_leader(builder.finish(), 4).await.unwrap();
            appended.ack.await.unwrap();
            assert_eq!((log.end_offset(), log.acked_offset(), log.synced_offset()), (2, 2, 2));
            let read = log.read(1, 1, u64::MAX).await.unwrap();
            assert_eq!((read.first_offset, read.next_offset), (0, 2));
            let bytes = log.read_bytes(read).await.unwrap();
            assert_eq!(batch::validate(&bytes, usize::MAX).unwrap().leader_epoch, 4);
            log.close().await.unwrap();
        });
    }
}
