//! The partition log: append, read, roll, retention, truncation and crash recovery.
//!
//! A [`Log`] lives on exactly one glommio executor (the shard that owns the partition); it is
//! `!Send` and uses no locks. Its state sits in a `RefCell` that is never borrowed across an
//! `.await`. One background task per log, the *flusher*, turns buffered appends into O_DIRECT
//! writes and `fdatasync` calls.
//!
//! # How an append travels
//! 1. [`Log::append`] checks the batch (header rules and CRC), assigns the next offsets, stamps
//!    the base offset into the header, copies the bytes into the active segment's aligned write
//!    buffers (see `appender`), puts the batch in the tail cache and wakes the flusher. It
//!    returns at once with the offsets and an [`AppendAck`].
//! 2. The flusher takes everything buffered as one *write job* and submits its writes through
//!    io_uring. Appends arriving meanwhile wait in the buffers for the next job: this is the
//!    group commit. With `fsync=always` each job is followed by one `fdatasync` covering it.
//! 3. When the policy's *ack point* is passed (written for `never`/`interval`, synced for
//!    `always`), the acks resolve in offset order and the records become visible to readers:
//!    a reader never sees a record that a crash could take back under the chosen policy.
//!
//! # Crash consistency
//! *What is synced when.* A new segment's header and directory entry are synced before any
//! record in it is acknowledged under `fsync=always`; its directory entry is synced before a
//! checkpoint names it (a header lost in a crash is written again by recovery). A
//! segment is sealed (rolled) once all its
//! data is written: its padding is truncated away and the next segment created; then, in the
//! background and in roll order (each seal waits for the one before), the sealed segment is
//! synced (with `fsync=always` it already was, before the roll), the directory synced, and the
//! checkpoint moved to the new segment, which vouches for every segment before it; after a
//! failed sync, no later seal moves it. Until then the checkpoint still points into an older
//! segment (the flusher moves none while a seal is pending) and recovery scans from there. A
//! sync that a truncation or reset overtook moves nothing. The tail segment is synced per the fsync
//! policy; after a sync the log rewrites, at most every `checkpoint_interval`, the `checkpoint`
//! file with the tail's *recovery position*: the number of its bytes covered by a completed
//! `fdatasync`. Forward checkpoints and index files are written without a sync of their own:
//! everything they vouch for is durable before they are written, a lost one leaves recovery an
//! older checkpoint (more lenient) or no index (rebuilt), and a torn one fails its CRC. (On
//! ext4 the journal folds the syncs of one roll into the same commits: a 10 s produce at
//! 325 K records/s made 199 device flushes before and 193–197 after, in groups at the rolls, so
//! this saves system calls, not flushes.)
//!
//! *Torn tail versus corruption.* Recovery scans the tail segment batch by batch (lengths,
//! CRCs, offset continuity). Bytes after the recovery position may be torn by a crash (a write
//! cut short, a later write landing before an earlier one): the first invalid batch there ends
//! the log, the file is truncated to it and a warning names the file, position and bytes
//! dropped. None of those bytes had been acknowledged under `fsync=always`, because an ack
//! waits for the sync, and the recovery position never passes a sync. An invalid batch
//! *before* the recovery position, in a sealed segment, or a file shorter than its recovery
//! position, cannot be a torn write: the log refuses to open with [`StorageError::Corruption`]
//! naming the file and byte position, and never skips over it. A missing or invalid index file
//! is not data: it is rebuilt from the log (checking every batch on the way).
//!
//! *After a clean close.* [`Log::close`] writes the tail's index files after the final sync and
//! before the checkpoint that covers the bytes they describe. The next open takes the bytes
//! before the index's last entry as the index describes them (as it takes a sealed segment's)
//! and scans from that batch on; the index counts only if it is whole, describes no more than
//! the file holds and the checkpoint's recovery position, and the scan ends a batch exactly at
//! the index's `log_bytes` with its `next_offset`. Otherwise (a stale index, or none after a
//! crash) the whole tail is scanned as above. A truncation removes the index before it cuts
//! the file; a later seal writes the segment's index anew. So a restart reads what the last
//! session wrote after its last index entry, not every batch of the active segments
//! (`StorageCounters::recovery_scanned_bytes`): 3.1 MB instead of 4.32 GB for a broker of 4
//! partitions of 1 GB, ready in 0.031 s instead of 1.35 s. Damage inside what the index
//! vouches for is reported by reads that check CRCs ([`Log::read_verified`], consumers), not
//! at open: the same as for sealed segments, and as Kafka after a clean shutdown.
//!
//! *Limits.* With `fsync=never`/`interval`, a power loss can lose acknowledged appends since the
//! last sync (a process crash cannot: the O_DIRECT write had completed). Bit rot in the tail
//! after the recovery position is indistinguishable from a torn write and is truncated, with
//! the warning; reads through [`Log::read_verified`] and consumers re-check CRCs everywhere.
//!
//! # Reads
//! [`Log::read`] returns whole batches from the batch that holds the requested offset: from the
//! tail cache when it holds them ([`ReadData::Memory`]), otherwise as a file range
//! ([`ReadData::File`]). A file range only ever covers *stable* bytes (blocks that will not be
//! written again) so no read sees a block while an O_DIRECT rewrite of it is in flight; the
//! newest bytes always come from the cache, which never evicts them.
//!
//! A file range goes out one of two ways (the broker decides, per range):
//! * **in the page cache** (rare: O_DIRECT writes never put anything there): `sendfile`, zero
//!   copies in user space;
//! * **not in the page cache** (a catch-up consumer, a lagging follower): [`Log::read_file`]
//!   reads it with O_DIRECT into buffers the returned bytes own, and keeps reading ahead of
//!   the consumer in the background (four times what it asked for, up to 16 MiB in reads of
//!   2 MiB, within a per-shard budget of 256 MiB), so the disk streams while the network
//!   sends. With 8 MiB, a quarter to a half of a cold consumer's fetches waited 1–10 ms for
//!   the disk and the CPUs sat a third idle; 16 MiB left fewer waiting (fetches answered
//!   within 100 µs: 357–450 of 514 against 203–376) and did 1931 MiB/s against 1792 (means of
//!   7 and 13 cold consumes of 4 M records from a broker process, alternating); 32 MiB did no
//!   better than 16. Measured here: the
//!   storage alone reads back at the speed of `fio --rw=read --direct=1` (805 vs 758 MiB/s);
//!   a cold `sendfile` reads synchronously in small pieces and reached about half that.
//!
//! Where a read starts: the sparse index gives the last indexed batch at or before the offset,
//! and the headers from there on are scanned to the batch that holds it. A consumer reading on
//! starts exactly where its last read ended, so the log keeps that end (a batch start and its
//! offset: the read cursor) and scans from there, in the bytes already read ahead for it: no
//! disk read. Looking the first header up on the disk was a small read queued behind the
//! read-ahead's large ones: 0.81 ms of the 0.87 ms a cold fetch spent per partition before its
//! bytes were ready (fetch time from request to response ready 1.46-1.77 ms before, 0.61-0.66
//! after; consume 1500 / 1515 / 1610 MiB/s before, 1575 / 1754 / 1624 after, 4 M records of
//! 1000 B read cold from a broker process, alternating builds), and with a coarse index it read
//! every header between the index entry and the offset again for each read.
//!
//! # Copies on the hot paths
//! * Produce: the request frame is received into one buffer (the kernel's copy); each batch is
//!   checked in place (CRC) and **copied once** into the active segment's aligned write
//!   buffers, from which O_DIRECT writes go to the device without another copy (a full buffer
//!   is written as it is; a partly filled last block is copied into a small buffer of its own).
//!   The tail cache shares the batch's bytes (no copy).
//! * Fetch from the tail cache: the cached bytes are written to the socket (the kernel's copy).
//! * Fetch from a file, cold: the device writes into DMA buffers that the returned `Bytes`
//!   own (glommio patch 5, `DmaFile::read_at_owned`: an aligned allocation of the read's own,
//!   not the ring's registered pool, so it may cross shards); **no copy** in user space, then
//!   the kernel's copy into the socket. A range that spans read-ahead pieces goes out as those
//!   pieces, in order (`PartitionLog::read_range_parts`, what the broker's fetch uses); only a
//!   caller that wants one buffer (`read_range`) has them joined, a copy.
//! * Fetch from a file in the page cache: `sendfile`, no copy in user space.

mod append;
mod flusher;
mod read;
mod recovery;
mod retention;
mod truncate;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;
use glommio::io::DmaFile;
use glommio::sync::Semaphore;

use crate::appender::Appender;
use crate::cache::TailCache;
use crate::config::LogConfig;
use crate::error::{glommio_io, Result, StorageError};
use crate::files::{Checkpoint, IndexEntry, SegmentSummary};
use crate::handles;
use crate::io::{self as dio, align_down, now_ms};
use crate::notify::Notify;
use crate::partition_log::{EpochCache, EpochEntry};
use crate::segment::{self, SegmentFile};

/// Free write buffers kept per log for reuse.
const FREE_BUFFERS_MAX: usize = 4;
/// A log with nothing to write for this long gives its write buffers back and keeps in its
/// tail cache only the batches it must (see [`State::release_idle`]): memory at rest stays small
/// however many partitions a node holds.
const IDLE_RELEASE: Duration = Duration::from_secs(2);
/// The most a log reads ahead of a consumer that reads its segment files (see
/// [`Log::read_file`]).
pub const READ_AHEAD_BYTES_MAX: usize = 16 << 20;
/// The background reads of a read-ahead.
const READ_AHEAD_PIECE_BYTES: usize = 2 << 20;
/// The least a log reads ahead of a consumer's read.
const READ_AHEAD_BYTES_MIN: usize = 512 << 10;

/// The first extension of an active segment ahead of its data (then it follows the write
/// rate; see `Log::preallocate`).
pub const PREALLOCATE_STEP_MIN: u64 = 64 << 10;

/// A point in the log: the offset after the last batch it covers, where that batch ends in the
/// active segment, and the largest timestamp up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    offset: u64,
    position: u64,
    max_timestamp: i64,
}

struct PendingAck {
    next_offset: u64,
    /// Where the batch ends in the active segment.
    end_position: u64,
    /// Largest timestamp in the segment once this batch is in.
    max_timestamp: i64,
    reply: oneshot::Sender<Result<()>>,
}

struct Barrier {
    next_offset: u64,
    /// Resolved at the synced mark; otherwise at the written mark.
    sync: bool,
    reply: oneshot::Sender<Result<()>>,
}

struct Sealed {
    file: Rc<SegmentFile>,
    summary: SegmentSummary,
    /// Loaded on demand; at most `loaded_indexes_max` at once.
    index: Option<Rc<Vec<IndexEntry>>>,
}

struct Active {
    file: Rc<SegmentFile>,
    /// The file's size as allocated by `fallocate`; data ends before it, zeros after.
    allocated: u64,
    created_ms: i64,
    /// Largest timestamp of every batch appended, visible or not.
    max_timestamp: i64,
    index: Vec<IndexEntry>,
    appender: Appender,
}

impl Active {
    /// A segment just created: nothing after its header, no index, empty write buffers.
    fn empty(file: Rc<SegmentFile>, created_ms: i64, write_buffer_bytes: usize) -> Active {
        Active {
            file,
            allocated: crate::files::SEGMENT_HEADER_BYTES,
            created_ms,
            max_timestamp: i64::MIN,
            index: Vec::new(),
            appender: Appender::new(
                write_buffer_bytes,
                FREE_BUFFERS_MAX,
                crate::files::SEGMENT_HEADER_BYTES,
                Vec::new(),
            ),
        }
    }
}

struct State {
    sealed: BTreeMap<u64, Sealed>,
    active: Active,
    /// The next offset to assign.
    next_offset: u64,
    /// Everything up to here has been written (O_DIRECT write completed).
    written: Mark,
    /// Everything up to here is covered by a completed `fdatasync`.
    synced: Mark,
    /// Acknowledged and readable: `synced` with `fsync=always`, `written` otherwise.
    visible: Mark,
    acks: VecDeque<PendingAck>,
    barriers: Vec<Barrier>,
    cache: TailCache,
    /// Sealed segments whose index is loaded, least recently used first.
    loaded: VecDeque<u64>,
    failed: Option<Arc<StorageError>>,
    closing: bool,
    flusher_exited: bool,
    last_sync: Instant,
    last_checkpoint: Option<Instant>,
    /// Bumped by every truncation, so a read that awaited across one starts over.
    generation: u64,
    /// Leader epochs of the batches appended since the log was opened (see [`Log::epochs`]).
    epochs: EpochCache,
}

struct Shared {
    dir: PathBuf,
    /// Replaced whole by [`Log::set_config`] (a topic's settings changed); read by value.
    config: Cell<LogConfig>,
    state: RefCell<State>,
    /// Wakes the flusher: new data, a barrier, closing.
    wake_flusher: Notify,
    /// Signalled by the flusher after every write or sync (back-pressure, close).
    progress: Notify,
    /// Serialises appends, rolls, truncation, retention and close. Never held by reads.
    gate: Semaphore,
    checkpoint_path: PathBuf,
    /// A segment was created since the directory was last synced: the next sync syncs it too.
    directory_sync_pending: Cell<bool>,
    /// Work on sealed segments running in the background (index files, syncs).
    index_writes: RefCell<Vec<glommio::Task<()>>>,
    /// The last checkpoint written, as (segment, position): it only moves forward, except when a
    /// truncation cuts below it.
    checkpoint_mark: Cell<(u64, u64)>,
    /// Serialises checkpoint writes (the flusher and background seals both write it).
    checkpoint_gate: Semaphore,
    /// Where the newest seal task says it is done: the next one waits for it, so seals run in
    /// roll order and a seal's checkpoint (which names the next segment and so vouches for
    /// every segment before it) is written only after every earlier sealed segment is synced.
    previous_seal: RefCell<Option<futures::channel::oneshot::Receiver<()>>>,
    /// Seal tasks not yet done. While any is, the flusher writes no checkpoint: one naming the
    /// active segment would vouch for a sealed segment not yet synced.
    seals_pending: Cell<u32>,
    /// Set when the flusher is waiting for the checkpoint write, so close waits for it.
    checkpoint_busy: Cell<bool>,
    /// The current preallocation step and when the last extension happened.
    preallocate_step: Cell<u64>,
    preallocated_at: Cell<Option<Instant>>,
    /// Bytes of the active segment allocated ahead of its data, as last counted in the shard's
    /// total (`handles`).
    allocated_ahead: Cell<u64>,
    /// What is being read ahead of the consumers that read from the segment files: a stream
    /// for each place being read.
    read_ahead: RefCell<ReadAheads>,
    /// Where the last file ranges handed out ended (at most [`READ_AHEAD_STREAMS_MAX`], the
    /// newest first): a consumer's next read starts at one, at a batch start the sparse index
    /// may not have.
    read_cursors: RefCell<VecDeque<ReadCursor>>,
}

/// The most read-ahead streams (and read cursors) a log keeps: so many consumers can read its
/// files at different places at once (replay by several groups, a lagging follower beside a
/// catch-up consumer) and each find its next range in memory. With one stream, each read at
/// another place dropped the other reader's read-ahead: three cold readers of one topic got
/// 305–361 MiB/s each where one alone got 1945.
pub const READ_AHEAD_STREAMS_MAX: usize = 8;

/// A read-ahead stream not read for this long is dropped, with what it holds: a consumer that
/// caught up (now reading the tail cache), moved on or left holds no read-ahead, and the
/// shard's budget stays for readers that read on.
pub const READ_AHEAD_IDLE: Duration = Duration::from_secs(2);

/// The read-ahead streams of a log, the most recently used first.
#[derive(Default)]
struct ReadAheads {
    streams: VecDeque<ReadAheadStream>,
    next_id: u64,
    /// Whether a task is waiting to drop the streams that go idle.
    sweeping: bool,
}

/// What is read ahead of one consumer: contiguous pieces in file order, of the segment based at
/// `segment_base`; `next` is where that consumer's last read ended (its next read starts there,
/// whether or not a piece is read ahead of it).
struct ReadAheadStream {
    id: u64,
    segment_base: u64,
    next: u64,
    pieces: VecDeque<ReadAhead>,
    /// When a read last continued it.
    used: Instant,
}

impl ReadAheadStream {
    fn continues_at(&self, segment_base: u64, position: u64) -> bool {
        self.segment_base == segment_base
            && (position == self.next
                || self.pieces.front().is_some_and(|first| first.start <= position)
                    && self.pieces.back().is_some_and(|last| position <= last.end))
    }
}

impl ReadAheads {
    fn clear(&mut self) {
        self.streams.clear();
    }

    /// The stream a read at `position` of the segment based at `segment_base` continues, moved
    /// to the front, with the pieces before `position` dropped; a new one if none does (the
    /// least recently used dropped, with its reads, past [`READ_AHEAD_STREAMS_MAX`]).
    fn stream_at(&mut self, segment_base: u64, position: u64) -> &mut ReadAheadStream {
        match self.streams.iter().position(|stream| stream.continues_at(segment_base, position)) {
            Some(0) => {}
            Some(at) => {
                let stream = self.streams.remove(at).expect("found");
                self.streams.push_front(stream);
            }
            None => {
                self.next_id += 1;
                let stream = ReadAheadStream {
                    id: self.next_id,
                    segment_base,
                    next: position,
                    pieces: VecDeque::new(),
                    used: Instant::now(),
                };
                self.streams.push_front(stream);
                self.streams.truncate(READ_AHEAD_STREAMS_MAX);
            }
        }
        let stream = self.streams.front_mut().expect("a stream");
        stream.used = Instant::now();
        while stream.pieces.front().is_some_and(|first| first.end <= position) {
            stream.pieces.pop_front();
        }
        stream
    }

    /// Drops the streams idle for [`READ_AHEAD_IDLE`]; returns how long until the next one
    /// would be (`None` when none is left).
    fn drop_idle(&mut self, now: Instant) -> Option<Duration> {
        self.streams.retain(|stream| now.duration_since(stream.used) < READ_AHEAD_IDLE);
        self.streams.iter().map(|stream| READ_AHEAD_IDLE - now.duration_since(stream.used)).min()
    }

    fn get(&mut self, id: u64) -> Option<&mut ReadAheadStream> {
        self.streams.iter_mut().find(|stream| stream.id == id)
    }

    /// The piece of any stream that holds `position` of the segment based at `segment_base`.
    fn piece_at(&self, segment_base: u64, position: u64) -> Option<(u64, SharedRead)> {
        self.streams
            .iter()
            .filter(|stream| stream.segment_base == segment_base)
            .flat_map(|stream| stream.pieces.iter())
            .find(|piece| piece.start <= position && position < piece.end)
            .map(|piece| (piece.start, piece.data.clone()))
    }
}

/// The end of the last file range [`Log::read`] returned: a batch start (`position`) and its
/// first offset, in the segment based at `segment_base`, valid while the log's truncation
/// generation is `generation`.
#[derive(Debug, Clone, Copy)]
struct ReadCursor {
    generation: u64,
    segment_base: u64,
    position: u64,
    next_offset: u64,
}

type SharedRead = futures::future::Shared<glommio::Task<std::result::Result<Bytes, Arc<StorageError>>>>;

/// Bytes of a segment read in the background, ahead of a consumer (counted in the shard's
/// read-ahead budget until dropped).
struct ReadAhead {
    start: u64,
    end: u64,
    data: SharedRead,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        handles::release_read_ahead((self.end - self.start) as usize);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        handles::adjust_ahead(self.allocated_ahead.get(), 0);
    }
}

/// The durable, append-only log of one partition.
///
/// Lives on the shard that owns the partition; `!Send`.
pub struct Log {
    shared: Rc<Shared>,
}

/// Offsets assigned to an appended batch, and the way to wait for its acknowledgement.
#[derive(Debug)]
pub struct Appended {
    pub base_offset: u64,
    pub last_offset: u64,
    pub ack: AppendAck,
}

/// Resolves when the append passed the log's ack point (see [`crate::FsyncPolicy`]): `Ok` means
/// it is written (and synced if the policy is `always`) and visible to readers.
#[derive(Debug)]
pub struct AppendAck {
    receiver: oneshot::Receiver<Result<()>>,
}

impl AppendAck {
    /// An ack resolved by whoever holds the sender (the in-memory backend).
    #[cfg(feature = "mem")]
    pub(crate) fn new(receiver: oneshot::Receiver<Result<()>>) -> AppendAck {
        AppendAck { receiver }
    }
}

impl Future for AppendAck {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        Pin::new(&mut self.receiver).poll(cx).map(|result| result.unwrap_or(Err(StorageError::Closed)))
    }
}

/// Bytes returned by [`Log::read`].
#[derive(Debug, Clone)]
pub enum ReadData {
    /// Nothing to read: the offset is the end of the visible log.
    Empty,
    /// Whole batches from the tail cache, shared, not copied.
    Memory(Vec<Bytes>),
    /// Whole batches at `[position, position + len)` of a segment file. The range is stable: no
    /// byte of it will be written again (truncation aside).
    File { segment: Rc<SegmentFile>, position: u64, len: u32 },
}

/// A read: whole batches, the first of which holds the requested offset.
#[derive(Debug, Clone)]
pub struct ReadSlice {
    /// Base offset of the first batch (at or before the requested offset).
    pub first_offset: u64,
    /// The offset after the last batch returned: where the next read continues.
    pub next_offset: u64,
    pub data: ReadData,
}

impl ReadSlice {
    fn empty(offset: u64) -> ReadSlice {
        ReadSlice { first_offset: offset, next_offset: offset, data: ReadData::Empty }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            ReadData::Empty => 0,
            ReadData::Memory(chunks) => chunks.iter().map(Bytes::len).sum(),
            ReadData::File { len, .. } => *len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, reading a file range with O_DIRECT (no copy); memory chunks are joined.
    pub async fn into_bytes(self) -> Result<Bytes> {
        match self.data {
            ReadData::Empty => Ok(Bytes::new()),
            ReadData::Memory(chunks) if chunks.len() == 1 => {
                Ok(chunks.into_iter().next().expect("one chunk"))
            }
            ReadData::Memory(chunks) => {
                let mut joined = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
                for chunk in chunks {
                    joined.extend_from_slice(&chunk);
                }
                Ok(joined.freeze())
            }
            ReadData::File { segment, position, len } => segment.read(position, len as usize).await,
        }
    }
}

/// What [`Log::enforce_retention`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionOutcome {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    pub start_offset: u64,
}

fn failed_error(error: &Arc<StorageError>) -> StorageError {
    StorageError::Failed(error.clone())
}

impl State {
    fn start_offset(&self) -> u64 {
        self.sealed.keys().next().copied().unwrap_or(self.active.file.base_offset())
    }

    fn size_bytes(&self) -> u64 {
        self.sealed.values().map(|s| s.summary.log_bytes).sum::<u64>() + self.active.appender.end()
    }

    /// Stable end of the active segment: blocks before it will not be written again.
    fn stable_position(&self) -> u64 {
        align_down(self.active.appender.written())
    }

    fn advance_visible(&mut self, mark: Mark) {
        self.visible = mark;
        while self.acks.front().is_some_and(|ack| ack.next_offset <= mark.offset) {
            let ack = self.acks.pop_front().expect("front exists");
            let _ = ack.reply.send(Ok(()));
        }
    }

    fn resolve_barriers(&mut self) {
        let (synced, written) = (self.synced.offset, self.written.offset);
        let mut index = 0;
        while index < self.barriers.len() {
            let barrier = &self.barriers[index];
            if barrier.next_offset <= if barrier.sync { synced } else { written } {
                let barrier = self.barriers.swap_remove(index);
                let _ = barrier.reply.send(Ok(()));
            } else {
                index += 1;
            }
        }
    }

    /// Fails the log until it is reopened: every waiting ack and barrier gets the error, and
    /// so does everything after ([`StorageError::Failed`]). Returns that error.
    fn fail(&mut self, error: StorageError) -> StorageError {
        let error = Arc::new(error);
        let failed = failed_error(&error);
        self.fail_everything(&failed);
        self.failed = Some(error);
        failed
    }

    fn fail_everything(&mut self, error: &StorageError) {
        for ack in self.acks.drain(..) {
            let _ = ack.reply.send(Err(error.clone()));
        }
        for barrier in self.barriers.drain(..) {
            let _ = barrier.reply.send(Err(error.clone()));
        }
    }

    fn touch_loaded(&mut self, base: u64, max: usize) {
        self.loaded.retain(|&b| b != base);
        self.loaded.push_back(base);
        while self.loaded.len() > max {
            let evicted = self.loaded.pop_front().expect("non-empty");
            if let Some(sealed) = self.sealed.get_mut(&evicted) {
                sealed.index = None;
            }
        }
    }
}

impl State {
    /// Everything is written: release the write buffers and the tail cache, but for the batches
    /// that overlap the last, not yet stable block (copied out, so they do not keep a whole
    /// request's buffer alive).
    fn release_idle(&mut self) {
        if !self.active.appender.release_idle() {
            return;
        }
        let (active_base, stable) = (self.active.file.base_offset(), self.stable_position());
        self.cache.shrink_to_unstable(active_base, stable);
    }
}

impl Shared {
    fn check_usable(&self) -> Result<()> {
        let state = self.state.borrow();
        if let Some(error) = &state.failed {
            return Err(failed_error(error));
        }
        if state.closing {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    /// Records this log's bytes allocated ahead of data in the shard's total.
    fn account_ahead(&self, bytes: u64) {
        handles::adjust_ahead(self.allocated_ahead.replace(bytes), bytes);
    }

    async fn sync_directory(&self) -> Result<()> {
        self.directory_sync_pending.set(false);
        sync_directory(&self.dir).await
    }

    /// Waits for the background index writes started so far.
    async fn finish_index_writes(&self) {
        let tasks: Vec<glommio::Task<()>> = self.index_writes.borrow_mut().drain(..).collect();
        for task in tasks {
            task.await;
        }
    }

    /// Records that everything before (`tail_base_offset`, `recovery_position`) is synced.
    /// Ignored if an equal or later point is already recorded, or if a truncation or reset
    /// replaced the log's files after this was called (the point describes files that are gone:
    /// a checkpoint written from it would point recovery past the log's end).
    ///
    /// With `sync` false the checkpoint is written but not synced: a lost or torn checkpoint
    /// (it carries a CRC) only leaves recovery an older one or none, which is more lenient,
    /// never wrong, provided everything it covers, the directory entry of its segment
    /// included, was durable before it was written. Callers that cannot promise that sync.
    async fn write_checkpoint(
        &self,
        tail_base_offset: u64,
        recovery_position: u64,
        sync: bool,
    ) -> Result<()> {
        let generation = self.state.borrow().generation;
        let _permit = self.checkpoint_gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        if generation != self.state.borrow().generation
            || (tail_base_offset, recovery_position) <= self.checkpoint_mark.get()
        {
            return Ok(());
        }
        self.put_checkpoint(tail_base_offset, recovery_position, sync).await
    }

    /// Writes the checkpoint, and syncs it if `sync`. The caller holds `checkpoint_gate`: a
    /// truncation or a reset holds it from before it touches the files until its generation is
    /// bumped, so no forward write from before it can land in between or after it. Their
    /// backward checkpoints are always synced: an older one left by a crash would point past
    /// the cut.
    async fn put_checkpoint(&self, tail_base_offset: u64, recovery_position: u64, sync: bool) -> Result<()> {
        let checkpoint = Checkpoint { tail_base_offset, recovery_position, written_ms: now_ms() };
        // Opened for each write (at most every `checkpoint_interval`) rather than held: a
        // partition at rest holds no descriptor.
        let file = open_checkpoint(&self.checkpoint_path).await?;
        let written = async {
            dio::write_block_padded(&file, &self.checkpoint_path, 0, &checkpoint.encode()).await?;
            if !sync {
                return Ok(());
            }
            file.fdatasync()
                .await
                .map_err(|e| StorageError::io("syncing", &self.checkpoint_path, glommio_io(e)))
        }
        .await;
        let _ = file.close().await;
        written?;
        self.state.borrow_mut().last_checkpoint = Some(Instant::now());
        self.checkpoint_mark.set((tail_base_offset, recovery_position));
        Ok(())
    }

    /// Waits until everything appended so far is written and synced.
    async fn barrier(&self) -> Result<()> {
        self.wait_for(true).await
    }

    /// Waits until everything appended so far is written (`sync`: and synced).
    async fn wait_for(&self, sync: bool) -> Result<()> {
        let receiver = {
            let mut state = self.state.borrow_mut();
            if let Some(error) = &state.failed {
                return Err(failed_error(error));
            }
            let reached = if sync { state.synced.offset } else { state.written.offset };
            if reached == state.next_offset && !state.active.appender.has_untaken() {
                return Ok(());
            }
            let (reply, receiver) = oneshot::channel();
            let next_offset = state.next_offset;
            state.barriers.push(Barrier { next_offset, sync, reply });
            receiver
        };
        self.wake_flusher.notify_all();
        receiver.await.unwrap_or(Err(StorageError::Closed))
    }
}

impl Log {
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The settings in force now.
    pub fn config(&self) -> LogConfig {
        self.shared.config.get()
    }

    /// Replaces the settings of an open log (a topic's settings were altered). Taken at once:
    /// appends check the new `batch_bytes_max`, the next append rolls by the new
    /// `segment_bytes` / `segment_age_max`, the next retention pass uses the new limits. Stored
    /// batches stay readable whatever the new limit ([`crate::batch::BATCH_BYTES_LIMIT`] bounds
    /// reads and recovery). Settings fixed when the log was opened (buffers, fsync policy,
    /// cache) keep their values; a config that fails [`LogConfig::validate`] changes nothing.
    pub fn set_config(&self, config: LogConfig) -> std::result::Result<(), &'static str> {
        config.validate()?;
        let current = self.shared.config.get();
        self.shared.config.set(LogConfig {
            segment_bytes: config.segment_bytes,
            segment_age_max: config.segment_age_max,
            retention_age_max: config.retention_age_max,
            retention_bytes_max: config.retention_bytes_max,
            batch_bytes_max: config.batch_bytes_max,
            preallocate_bytes: config.preallocate_bytes,
            ..current
        });
        Ok(())
    }

    /// Offset of the first record held (the log start offset).
    pub fn start_offset(&self) -> u64 {
        self.shared.state.borrow().start_offset()
    }

    /// The offset after the last acknowledged, readable record (the high watermark on a single
    /// node).
    pub fn visible_offset(&self) -> u64 {
        self.shared.state.borrow().visible.offset
    }

    /// The next offset the log will assign (includes appends not yet acknowledged).
    pub fn next_offset(&self) -> u64 {
        self.shared.state.borrow().next_offset
    }

    /// The offset after the last record covered by a completed `fdatasync`.
    pub fn synced_offset(&self) -> u64 {
        self.shared.state.borrow().synced.offset
    }

    /// Bytes of all segment files.
    pub fn size_bytes(&self) -> u64 {
        self.shared.state.borrow().size_bytes()
    }

    pub fn segment_count(&self) -> usize {
        self.shared.state.borrow().sealed.len() + 1
    }

    /// Base offsets of every segment, oldest first.
    pub fn segment_bases(&self) -> Vec<u64> {
        let state = self.shared.state.borrow();
        state.sealed.keys().copied().chain(std::iter::once(state.active.file.base_offset())).collect()
    }

    /// A one-line summary of the log's marks, for diagnostics.
    pub fn describe_state(&self) -> String {
        let state = self.shared.state.borrow();
        format!(
            "next={} written={} synced={} visible={} buffered={} untaken={} acks_pending={} barriers={} active_base={} failed={}",
            state.next_offset,
            state.written.offset,
            state.synced.offset,
            state.visible.offset,
            state.active.appender.buffered(),
            state.active.appender.has_untaken(),
            state.acks.len(),
            state.barriers.len(),
            state.active.file.base_offset(),
            state.failed.is_some()
        )
    }

    /// Each leader epoch with its first offset, oldest first (see
    /// [`crate::PartitionLog::epochs`]), from the `leader_epoch` field of every batch appended
    /// *since the log was opened*: it is kept in memory only, not yet in a
    /// `leader-epoch.checkpoint` file, so after [`Log::open`] it is empty until the next append,
    /// and the epochs of the batches already on disk are not in it.
    pub fn epochs(&self) -> Vec<EpochEntry> {
        let state = self.shared.state.borrow();
        state.epochs.view(state.start_offset())
    }

    /// Bytes held by the tail cache.
    pub fn cache_bytes(&self) -> usize {
        self.shared.state.borrow().cache.bytes()
    }

    /// Writes and syncs everything, trims the active segment's padding, writes its index files
    /// (so the next open scans little of it; see "After a clean close" above) and records a
    /// recovery checkpoint at its end, then stops the flusher. Appends after this fail with
    /// [`StorageError::Closed`].
    pub async fn close(self) -> Result<()> {
        self.shutdown().await
    }

    /// [`Log::close`] for a log still shared (`Rc`) with other tasks: they get
    /// [`StorageError::Closed`] from then on.
    pub async fn shutdown(&self) -> Result<()> {
        let shared = self.shared.clone();
        let permit = shared.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        self.stop_writing().await?;
        let (segment, end, summary, entries) = {
            let state = shared.state.borrow();
            let segment = state.active.file.clone();
            let end = state.active.appender.end();
            let summary = SegmentSummary {
                base_offset: segment.base_offset(),
                log_bytes: state.written.position,
                next_offset: state.written.offset,
                max_timestamp: state.written.max_timestamp,
            };
            // Everything appended is written (the barrier above); otherwise no index.
            let entries = if summary.log_bytes == end { state.active.index.clone() } else { Vec::new() };
            (segment, end, summary, entries)
        };
        segment.truncate(end).await?;
        shared.account_ahead(0);
        segment.sync().await?;
        // The tail's index, so that the next open scans only what it does not vouch for
        // (`recovery::tail_index_start`) instead of every batch of the tail. Written after the
        // sync and before the checkpoint that covers the bytes it describes: without that
        // checkpoint (a crash in between) recovery does not use it. A failed write (a full
        // disk) costs the next open a scan of the whole tail, nothing else: it must not cost
        // the checkpoint. A torn index fails its CRC; an older one left in place still
        // describes bytes that have not changed (a truncation removes it).
        if !entries.is_empty() {
            if let Err(error) = segment::write_index(&segment, &summary, &entries).await {
                tracing::warn!(
                    path = %segment.path().display(), %error,
                    "could not write the tail's index; the next open scans the whole tail"
                );
            }
        }
        shared.write_checkpoint(segment.base_offset(), end, true).await?;
        shared.gate.close();
        drop(permit);
        Ok(())
    }

    /// Closes a log whose files are about to be deleted (its topic was): the writes in flight
    /// finish and its tasks stop, but nothing is made durable (no truncation of the space
    /// allocated ahead, no sync, no tail index, no checkpoint), which [`Log::shutdown`] does
    /// for a log that opens again. Other tasks get [`StorageError::Closed`] from then on.
    /// Deleting a topic of 10,000 partitions closed each with a sync and a checkpoint, one
    /// after another: 16.9 s.
    pub async fn shutdown_for_removal(&self) -> Result<()> {
        let permit = self.shared.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        let stopped = self.stop_writing().await;
        self.shared.account_ahead(0);
        self.shared.gate.close();
        drop(permit);
        stopped
    }

    /// Waits for everything appended to be written and for the index writer, then stops the
    /// flusher (and its checkpoints); the first write error, if any.
    async fn stop_writing(&self) -> Result<()> {
        let shared = &self.shared;
        let flushed = shared.barrier().await;
        shared.finish_index_writes().await;
        {
            let mut state = shared.state.borrow_mut();
            state.closing = true;
        }
        shared.wake_flusher.notify_all();
        while !shared.state.borrow().flusher_exited || shared.checkpoint_busy.get() {
            let progress = shared.progress.notified();
            if shared.state.borrow().flusher_exited && !shared.checkpoint_busy.get() {
                break;
            }
            let sleep = std::pin::pin!(glommio::timer::sleep(Duration::from_millis(5)));
            futures::future::select(std::pin::pin!(progress), sleep).await;
        }
        flushed
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // Without close: the flusher still writes what is buffered, then exits.
        self.shared.state.borrow_mut().closing = true;
        self.shared.wake_flusher.notify_all();
    }
}

/// Makes a directory's entries durable (opened for the sync, not held).
async fn sync_directory(dir: &Path) -> Result<()> {
    let directory = glommio::io::Directory::open(dir)
        .await
        .map_err(|e| StorageError::io("opening", dir, glommio_io(e)))?;
    let synced =
        directory.sync().await.map_err(|e| StorageError::io("syncing directory", dir, glommio_io(e)));
    let _ = directory.close().await;
    synced
}

async fn open_checkpoint(path: &Path) -> Result<DmaFile> {
    let mut options = glommio::io::OpenOptions::new();
    options.read(true).write(true).create(true);
    options.dma_open(path).await.map_err(|e| StorageError::io("opening", path, glommio_io(e)))
}
