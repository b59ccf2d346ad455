//! The partition log seen by its owner: the narrow interface that the partition's owner (the
//! broker's shard today, a replica state machine later) needs from its storage, with two
//! backends: the real [`Log`] (O_DIRECT segment files) and, with the feature `mem`,
//! [`crate::mem::MemLog`] (in memory, with fault injection, for tests and simulation).
//!
//! The contract, which `storage/tests/conformance.rs` checks on both backends:
//! * Offsets are contiguous from [`PartitionLog::start_offset`] to
//!   [`PartitionLog::end_offset`] (the next offset to assign); `start <= acked <= end`.
//! * [`PartitionLog::acked_offset`] is the end of what is acknowledged and readable (the log's
//!   own ack point under its fsync policy: written, or synced under `fsync=always`). It is not
//!   the replication high watermark; the owner keeps that.
//! * A read returns whole batches, the first one holding the requested offset, at most
//!   `bytes_max` bytes unless the first batch alone is larger, and no batch that reaches
//!   `upper_bound` or past the acked offset.
//! * A leader appends one batch at a time and the log assigns its offsets
//!   ([`PartitionLog::append_leader`]); a follower appends batches that already carry their
//!   offsets and epochs, which are kept ([`PartitionLog::append_follower`]); a gap or an
//!   overlap with the log's end is refused and nothing is appended.
//! * [`PartitionLog::truncate_to`] removes the batch holding the offset and everything after;
//!   [`PartitionLog::reset_to`] empties the log and starts it again at a given offset.
//! * [`PartitionLog::epochs`] maps each leader epoch found in the log to its first offset.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use crate::batch::{self, BatchError, BatchHeader, BATCH_HEADER_BYTES};
use crate::error::{CorruptionKind, Result, StorageError};
use crate::log::{Appended, Log, ReadData, ReadSlice};
use crate::segment::SegmentFile;

/// A leader epoch and the first offset appended in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    pub epoch: u32,
    pub start_offset: u64,
}

/// What [`PartitionLog::read`] returns: whole batches, the first of which holds the requested
/// offset.
#[derive(Debug, Clone)]
pub struct LogRead {
    /// Base offset of the first batch (at or before the requested offset); the requested offset
    /// when nothing is returned.
    pub first_offset: u64,
    /// The offset after the last batch returned: where the next read continues.
    pub next_offset: u64,
    pub data: LogData,
}

/// The bytes of a [`LogRead`].
#[derive(Debug, Clone)]
pub enum LogData {
    /// Nothing to read below the bound.
    Empty,
    /// Whole batches in memory, shared, not copied.
    Memory(Vec<Bytes>),
    /// Whole batches in a segment file; [`PartitionLog::read_range`] turns it into bytes.
    File(FileRange),
}

/// Whole batches at a stable range of a segment file of a [`Log`]: no byte of it will be
/// written again (truncation aside). Opaque: read it with [`PartitionLog::read_range`] (O_DIRECT,
/// with read-ahead), or send it with `sendfile` from [`FileRange::open_buffered`] at
/// [`FileRange::position`].
#[derive(Debug, Clone)]
pub struct FileRange {
    segment: Rc<SegmentFile>,
    position: u64,
    len: u32,
}

impl FileRange {
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the range starts in its file.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The segment file's path (for diagnostics).
    pub fn path(&self) -> &Path {
        self.segment.path()
    }

    /// Base offset of the segment the range lies in.
    pub fn segment_base_offset(&self) -> u64 {
        self.segment.base_offset()
    }

    /// A new page-cache descriptor of the file, for `sendfile`; the caller owns it.
    pub fn open_buffered(&self) -> Result<OwnedFd> {
        self.segment.open_buffered()
    }

    /// Reads the range with one O_DIRECT read, without read-ahead.
    pub async fn read(&self) -> Result<Bytes> {
        self.segment.read(self.position, self.len()).await
    }
}

impl LogRead {
    pub(crate) fn empty(offset: u64) -> LogRead {
        LogRead { first_offset: offset, next_offset: offset, data: LogData::Empty }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            LogData::Empty => 0,
            LogData::Memory(chunks) => chunks.iter().map(Bytes::len).sum(),
            LogData::File(range) => range.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<ReadSlice> for LogRead {
    fn from(slice: ReadSlice) -> LogRead {
        let data = match slice.data {
            ReadData::Empty => LogData::Empty,
            ReadData::Memory(chunks) => LogData::Memory(chunks),
            ReadData::File { segment, position, len } => LogData::File(FileRange { segment, position, len }),
        };
        LogRead { first_offset: slice.first_offset, next_offset: slice.next_offset, data }
    }
}

/// The storage of one partition, as its owner uses it. Not object-safe (its async methods
/// return `impl Future`): use it generically, or through the concrete type. Implemented by
/// [`Log`] and [`crate::mem::MemLog`]; both live on one thread (`!Send` futures).
///
/// [`Log`] has inherent methods of the same names (`read`, `flush`, `close`, `start_offset`)
/// with its older signatures; with a concrete `Log`, call these as `PartitionLog::read(&log,
/// ..)`.
pub trait PartitionLog {
    /// Offset of the first record held.
    fn start_offset(&self) -> u64;

    /// The next offset the log will assign: the end of everything appended, acknowledged or not.
    fn end_offset(&self) -> u64;

    /// The offset after the last acknowledged, readable record (the log's ack point under its
    /// fsync policy; not the replication high watermark). `start <= acked <= end`.
    fn acked_offset(&self) -> u64;

    /// Each leader epoch in the log with its first offset, oldest first; epochs strictly
    /// increase, and so do their start offsets. The first entry starts at `start_offset` or
    /// later. Fed by every append (from the batches' `leader_epoch` field), trimmed by
    /// truncation and reset. [`Log`] keeps it in memory only, see [`Log::epochs`].
    fn epochs(&self) -> Vec<EpochEntry>;

    /// Appends one batch as the leader of `epoch`: stamps the epoch into its header (outside the
    /// CRC) and lets the log assign its offsets. Returns once it is buffered; await
    /// [`Appended::ack`] for the ack point.
    fn append_leader(&self, batch: BytesMut, epoch: u32) -> impl Future<Output = Result<Appended>>;

    /// Appends, as a follower, whole batches back to back (as a fetch returns them) that already
    /// carry their offsets and leader epochs; both are kept. Every batch is checked (CRC, header
    /// rules) and must continue the one before; the first must start at `end_offset`, else
    /// [`StorageError::OffsetOutOfRange`] (a gap or an overlap) and nothing is appended. The
    /// returned ack is the last batch's (acks resolve in offset order).
    fn append_follower(&self, batches: Bytes) -> impl Future<Output = Result<Appended>>;

    /// Whole batches from the one holding `offset`: at most `bytes_max` bytes unless the first
    /// batch alone is larger, none reaching `upper_bound` or the acked offset. Empty when the
    /// batch holding `offset` reaches past either; [`StorageError::OffsetOutOfRange`] when
    /// `offset` is below the start or above the acked offset.
    fn read(&self, offset: u64, bytes_max: usize, upper_bound: u64) -> impl Future<Output = Result<LogRead>>;

    /// The bytes of a file range that [`PartitionLog::read`] returned.
    fn read_range(&self, range: &FileRange) -> impl Future<Output = Result<Bytes>>;

    /// The bytes of a file range as consecutive parts, for a caller that writes them out in
    /// order (a fetch response) and so need not have them joined: the file log hands back the
    /// pieces its reads filled, without copying them into one buffer. One part by default.
    fn read_range_parts(&self, range: &FileRange) -> impl Future<Output = Result<Vec<Bytes>>> {
        async move { Ok(vec![self.read_range(range).await?]) }
    }

    /// The bytes of a read, joined (a file range is read with [`PartitionLog::read_range`]).
    fn read_bytes(&self, read: LogRead) -> impl Future<Output = Result<Bytes>> {
        async move {
            match read.data {
                LogData::Empty => Ok(Bytes::new()),
                LogData::Memory(chunks) => Ok(join(chunks)),
                LogData::File(range) => self.read_range(&range).await,
            }
        }
    }

    /// Removes the batch holding `offset` and everything after it (a batch is never split);
    /// returns the new end offset. At or past the end it changes nothing; below the start it is
    /// [`StorageError::OffsetOutOfRange`].
    fn truncate_to(&self, offset: u64) -> impl Future<Output = Result<u64>>;

    /// Removes every record and starts the log again, empty, at `start` (a follower far behind
    /// its leader's start offset). Forgets the epochs.
    fn reset_to(&self, start: u64) -> impl Future<Output = Result<()>>;

    /// Waits until everything appended so far is written and synced, whatever the fsync policy.
    fn flush(&self) -> impl Future<Output = Result<()>>;

    /// Flushes and closes the log.
    fn close(self) -> impl Future<Output = Result<()>>
    where
        Self: Sized;
}

impl PartitionLog for Log {
    fn start_offset(&self) -> u64 {
        Log::start_offset(self)
    }

    fn end_offset(&self) -> u64 {
        self.next_offset()
    }

    fn acked_offset(&self) -> u64 {
        self.visible_offset()
    }

    fn epochs(&self) -> Vec<EpochEntry> {
        Log::epochs(self)
    }

    async fn append_leader(&self, mut batch: BytesMut, epoch: u32) -> Result<Appended> {
        if batch.len() >= BATCH_HEADER_BYTES {
            batch::set_leader_epoch(&mut batch, epoch);
        }
        self.append(batch).await
    }

    async fn append_follower(&self, batches: Bytes) -> Result<Appended> {
        Log::append_follower(self, batches).await
    }

    async fn read(&self, offset: u64, bytes_max: usize, upper_bound: u64) -> Result<LogRead> {
        let slice = Log::read(self, offset, bytes_max).await?;
        if slice.next_offset <= upper_bound {
            return Ok(slice.into());
        }
        if offset >= upper_bound {
            return Ok(LogRead::empty(offset));
        }
        let size_max = crate::batch::BATCH_BYTES_LIMIT;
        let first_offset = slice.first_offset;
        match slice.data {
            ReadData::Empty => Ok(LogRead::empty(offset)),
            ReadData::Memory(chunks) => memory_below(chunks, first_offset, offset, upper_bound, size_max),
            ReadData::File { segment, position, len } => {
                // The batch that holds `upper_bound` starts where the range must end.
                let (cut, header) =
                    segment.find_batch(position, upper_bound, position + u64::from(len), size_max).await?;
                if cut == position {
                    return Ok(LogRead::empty(offset));
                }
                Ok(LogRead {
                    first_offset,
                    next_offset: header.base_offset,
                    data: LogData::File(FileRange { segment, position, len: (cut - position) as u32 }),
                })
            }
        }
    }

    async fn read_range(&self, range: &FileRange) -> Result<Bytes> {
        self.read_file(&range.segment, range.position, range.len()).await
    }

    async fn read_range_parts(&self, range: &FileRange) -> Result<Vec<Bytes>> {
        self.read_file_parts(&range.segment, range.position, range.len()).await
    }

    async fn truncate_to(&self, offset: u64) -> Result<u64> {
        self.truncate(offset).await
    }

    async fn reset_to(&self, start: u64) -> Result<()> {
        Log::reset_to(self, start).await
    }

    async fn flush(&self) -> Result<()> {
        Log::flush(self).await
    }

    async fn close(self) -> Result<()> {
        Log::close(self).await
    }
}

/// Joins chunks of bytes (no copy for one chunk).
pub(crate) fn join(chunks: Vec<Bytes>) -> Bytes {
    if chunks.len() == 1 {
        return chunks.into_iter().next().expect("one chunk");
    }
    let mut joined = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in chunks {
        joined.extend_from_slice(&chunk);
    }
    joined.freeze()
}

/// The whole batches of `chunks` (which start at `first_offset`) that end at or before `bound`;
/// empty if the first one does not.
fn memory_below(
    chunks: Vec<Bytes>,
    first_offset: u64,
    offset: u64,
    bound: u64,
    size_max: usize,
) -> Result<LogRead> {
    let mut kept = Vec::new();
    let mut next_offset = first_offset;
    'chunks: for chunk in chunks {
        let mut at = 0;
        while at < chunk.len() {
            let header =
                BatchHeader::parse(&chunk[at..], size_max).map_err(|e| StorageError::Corruption {
                    path: "<tail cache>".into(),
                    position: at as u64,
                    kind: CorruptionKind::Batch(e),
                })?;
            if header.next_offset() > bound {
                if at > 0 {
                    kept.push(chunk.slice(..at));
                }
                break 'chunks;
            }
            next_offset = header.next_offset();
            at += header.total_bytes();
        }
        kept.push(chunk);
    }
    if kept.is_empty() {
        return Ok(LogRead::empty(offset));
    }
    Ok(LogRead { first_offset, next_offset, data: LogData::Memory(kept) })
}

/// Splits `bytes` into whole batches, checking each one's header rules and CRC and that each
/// continues the one before. What both backends' `append_follower` accept.
pub(crate) fn split_follower_batches(bytes: &Bytes, size_max: usize) -> Result<Vec<(Bytes, BatchHeader)>> {
    if bytes.is_empty() {
        return Err(BatchError::Truncated { needed: BATCH_HEADER_BYTES, available: 0 }.into());
    }
    let mut batches = Vec::new();
    let mut at = 0usize;
    let mut expected: Option<u64> = None;
    while at < bytes.len() {
        let header = batch::validate(&bytes[at..], size_max)?;
        if let Some(expected) = expected.filter(|&e| e != header.base_offset) {
            return Err(StorageError::Corruption {
                path: "<append_follower input>".into(),
                position: at as u64,
                kind: CorruptionKind::OffsetGap { expected, found: header.base_offset },
            });
        }
        expected = Some(header.next_offset());
        let end = at + header.total_bytes();
        batches.push((bytes.slice(at..end), header));
        at = end;
    }
    Ok(batches)
}

/// Leader epochs and their start offsets (Kafka's leader-epoch cache), in memory.
#[derive(Debug, Clone, Default)]
pub(crate) struct EpochCache {
    entries: Vec<EpochEntry>,
}

impl EpochCache {
    /// Records that `epoch` starts at `offset` if it is newer than the latest epoch; an older or
    /// equal epoch changes nothing (as in Kafka).
    pub fn assign(&mut self, epoch: u32, offset: u64) {
        if self.entries.last().is_none_or(|last| epoch > last.epoch) {
            self.entries.push(EpochEntry { epoch, start_offset: offset });
        }
    }

    /// The log now ends at `end`: epochs starting at or after it are gone.
    pub fn truncate_from_end(&mut self, end: u64) {
        self.entries.retain(|entry| entry.start_offset < end);
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The entries as seen from a log that starts at `start`: of those starting before it, only
    /// the latest is kept, moved to `start` (retention deletes from the front).
    pub fn view(&self, start: u64) -> Vec<EpochEntry> {
        let below = self.entries.partition_point(|entry| entry.start_offset < start);
        let mut view = Vec::with_capacity(self.entries.len() - below.saturating_sub(1));
        let next_starts_at_start = self.entries.get(below).is_some_and(|entry| entry.start_offset == start);
        if below > 0 && !next_starts_at_start {
            view.push(EpochEntry { epoch: self.entries[below - 1].epoch, start_offset: start });
        }
        view.extend_from_slice(&self.entries[below..]);
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_cache_assigns_newer_epochs_and_trims() {
        let mut cache = EpochCache::default();
        cache.assign(1, 0);
        cache.assign(1, 5);
        cache.assign(3, 10);
        cache.assign(2, 12);
        cache.assign(4, 20);
        let entries = |v: Vec<EpochEntry>| v.iter().map(|e| (e.epoch, e.start_offset)).collect::<Vec<_>>();
        assert_eq!(entries(cache.view(0)), [(1, 0), (3, 10), (4, 20)]);
        assert_eq!(entries(cache.view(15)), [(3, 15), (4, 20)]);
        assert_eq!(entries(cache.view(20)), [(4, 20)]);
        cache.truncate_from_end(20);
        assert_eq!(entries(cache.view(0)), [(1, 0), (3, 10)]);
        cache.truncate_from_end(3);
        assert_eq!(entries(cache.view(0)), [(1, 0)]);
        cache.clear();
        assert!(cache.view(0).is_empty());
    }
}
