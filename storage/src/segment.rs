//! One segment's files, the batch scanner used by recovery and index rebuilds, and header
//! lookups used by reads.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use glommio::io::DmaFile;

use crate::batch::{self, BatchError, BatchHeader, BATCH_HEADER_BYTES};
use crate::error::{glommio_io, CorruptionKind, Result, StorageError};
use crate::files::{self, IndexEntry, SegmentHeader, SegmentPaths, SegmentSummary, SEGMENT_HEADER_BYTES};
use crate::handles::FileSlot;
use crate::io::{self as dio, align_down};

/// Reads of at least this size refill the scanner's window.
const SCAN_WINDOW_BYTES: usize = 1 << 20;
/// Window read when looking for one batch header.
const LOOKUP_WINDOW_BYTES: usize = 64 << 10;

/// The files of one segment. Shared (`Rc`) with readers, so a segment deleted by retention
/// stays readable until the last reader drops it.
///
/// Its O_DIRECT handle is under the shard's open-files budget ([`crate::handles`]): it may be
/// closed while the segment is idle and is reopened on the next use.
///
/// Lives on the shard that owns the partition.
#[derive(Debug)]
pub struct SegmentFile {
    base_offset: u64,
    paths: SegmentPaths,
    file: FileSlot,
}

impl SegmentFile {
    /// Creates a new, empty segment and writes its header block. Nothing is synced: the caller
    /// syncs the file and the directory before the segment's first record is acknowledged.
    pub(crate) async fn create(dir: &Path, base_offset: u64, created_ms: i64) -> Result<SegmentFile> {
        let paths = SegmentPaths::new(dir, base_offset);
        // Left-over index files of an earlier segment with this base (after a truncation)
        // would describe other bytes.
        dio::remove_file(&paths.index)?;
        dio::remove_file(&paths.time_index)?;
        let dma = dio::open_read_write(&paths.log, true).await?;
        let header = SegmentHeader { base_offset, created_ms }.encode();
        dio::write_block_padded(&dma, &paths.log, 0, &header).await?;
        let file = FileSlot::opened(paths.log.clone(), dma);
        Ok(SegmentFile { base_offset, paths, file })
    }

    pub(crate) async fn sync(&self) -> Result<()> {
        let file = self.file().await?;
        file.fdatasync().await.map_err(|e| StorageError::io("syncing", &self.paths.log, glommio_io(e)))
    }

    pub(crate) async fn truncate(&self, size: u64) -> Result<()> {
        let file = self.file().await?;
        file.truncate(size).await.map_err(|e| StorageError::io("truncating", &self.paths.log, glommio_io(e)))
    }

    pub(crate) async fn open(dir: &Path, base_offset: u64) -> Result<SegmentFile> {
        let paths = SegmentPaths::new(dir, base_offset);
        let dma = dio::open_read_write(&paths.log, false).await?;
        let file = FileSlot::opened(paths.log.clone(), dma);
        Ok(SegmentFile { base_offset, paths, file })
    }

    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub fn path(&self) -> &Path {
        &self.paths.log
    }

    pub(crate) fn paths(&self) -> &SegmentPaths {
        &self.paths
    }

    /// The O_DIRECT handle (reads and writes through io_uring), reopened if the open-files
    /// budget closed it. Hold it for the duration of an operation: a held handle is not closed.
    pub async fn file(&self) -> Result<Rc<DmaFile>> {
        self.file.get().await
    }

    /// The handle if it is open now.
    pub(crate) fn cached_file(&self) -> Option<Rc<DmaFile>> {
        self.file.cached()
    }

    /// A new plain (page cache) read-only descriptor of the `.log` file, for `sendfile`/
    /// `splice`; the caller owns (and closes) it. Only stable ranges (see `appender`) are handed
    /// out for it.
    pub fn open_buffered(&self) -> Result<OwnedFd> {
        std::fs::File::open(&self.paths.log)
            .map(OwnedFd::from)
            .map_err(|e| StorageError::io("opening", &self.paths.log, e))
    }

    pub(crate) async fn size(&self) -> Result<u64> {
        let file = self.file().await?;
        file.file_size().await.map_err(|e| StorageError::io("sizing", &self.paths.log, glommio_io(e)))
    }

    /// Reads `len` bytes at `position` with O_DIRECT into a shared buffer (one copy).
    pub async fn read(&self, position: u64, len: usize) -> Result<Bytes> {
        let file = self.file().await?;
        crate::metrics::count(|c| c.direct_read_bytes += len as u64);
        let read = file
            .read_at(position, len)
            .await
            .map_err(|e| StorageError::io("reading", &self.paths.log, glommio_io(e)))?;
        if read.len() < len {
            return Err(self.corruption(
                position + read.len() as u64,
                CorruptionKind::PastEnd { end: position + read.len() as u64 },
            ));
        }
        Ok(Bytes::copy_from_slice(&read))
    }

    pub(crate) fn corruption(&self, position: u64, kind: CorruptionKind) -> StorageError {
        StorageError::Corruption { path: self.paths.log.clone(), position, kind }
    }

    /// Reads and checks the segment header block.
    pub(crate) async fn read_header(&self) -> Result<std::result::Result<SegmentHeader, files::FormatError>> {
        let file = self.file().await?;
        let read = file
            .read_at(0, SEGMENT_HEADER_BYTES as usize)
            .await
            .map_err(|e| StorageError::io("reading", &self.paths.log, glommio_io(e)))?;
        Ok(SegmentHeader::decode(&read, self.base_offset))
    }

    /// Finds the batch that holds `offset`, scanning headers forward from `position` (a batch
    /// start, from the index) but not past `end`. Returns its position and header.
    pub(crate) async fn find_batch(
        &self,
        mut position: u64,
        offset: u64,
        end: u64,
        size_max: usize,
    ) -> Result<(u64, BatchHeader)> {
        loop {
            if position >= end {
                return Err(self.corruption(position, CorruptionKind::PastEnd { end }));
            }
            let window = ((end - position) as usize).min(LOOKUP_WINDOW_BYTES);
            let bytes =
                self.read(position, window.max(BATCH_HEADER_BYTES.min((end - position) as usize))).await?;
            let at = match scan_headers(&bytes, offset, size_max) {
                HeaderScan::Found(at, header) => return Ok((position + at as u64, header)),
                HeaderScan::Beyond(at) => at,
                HeaderScan::Bad(at, e) => {
                    return Err(self.corruption(position + at as u64, CorruptionKind::Batch(e)))
                }
            };
            if at == 0 {
                return Err(self.corruption(
                    position,
                    CorruptionKind::Batch(BatchError::Truncated {
                        needed: BATCH_HEADER_BYTES,
                        available: bytes.len(),
                    }),
                ));
            }
            position += at as u64;
        }
    }
}

/// Where [`scan_headers`] stopped.
pub(crate) enum HeaderScan {
    /// The batch at this position of the bytes holds the offset.
    Found(usize, BatchHeader),
    /// Every batch whose header the bytes hold ends at or before the offset; the next header
    /// starts here (at or past the end of the bytes).
    Beyond(usize),
    /// The header at this position does not parse.
    Bad(usize, BatchError),
}

/// Walks the batch headers in `bytes` (a batch start first) to the batch that holds `offset`:
/// the one scan behind [`SegmentFile::find_batch`] (bytes read from the disk) and the log's
/// lookup in its read-ahead pieces.
pub(crate) fn scan_headers(bytes: &[u8], offset: u64, size_max: usize) -> HeaderScan {
    let mut at = 0usize;
    while at + BATCH_HEADER_BYTES <= bytes.len() {
        let header = match BatchHeader::parse(&bytes[at..], size_max) {
            Ok(header) => header,
            Err(error) => return HeaderScan::Bad(at, error),
        };
        if header.next_offset() > offset {
            return HeaderScan::Found(at, header);
        }
        at += header.total_bytes();
    }
    HeaderScan::Beyond(at)
}

/// What a scan found in one segment.
#[derive(Debug)]
pub(crate) struct ScanOutcome {
    /// End of the last valid batch.
    pub end_position: u64,
    pub next_offset: u64,
    pub max_timestamp: i64,
    pub entries: Vec<IndexEntry>,
    /// Where and why the scan stopped before the end of the file, if it did.
    pub invalid: Option<(u64, CorruptionKind)>,
    /// The file continues after the last batch with zeros only (space allocated ahead, or a
    /// seal whose truncation did not reach the disk): not data, not damage.
    pub zero_tail: bool,
    pub file_bytes: u64,
    /// A batch ended exactly at [`ScanStart::verify_at`]'s position, with its next offset
    /// (always false without one).
    pub passed_through: bool,
}

/// Where [`scan_from`] starts: at the segment's header with nothing known, or at a batch that
/// an index already describes, with the entries and the largest timestamp before it.
#[derive(Debug)]
pub(crate) struct ScanStart {
    pub position: u64,
    pub next_offset: u64,
    pub max_timestamp: i64,
    pub entries: Vec<IndexEntry>,
    /// A (position, next offset) the scan must pass through, as a batch boundary, for the
    /// start to be believed ([`ScanOutcome::passed_through`]).
    pub verify_at: Option<(u64, u64)>,
}

impl ScanStart {
    fn header(base_offset: u64) -> ScanStart {
        ScanStart {
            position: SEGMENT_HEADER_BYTES,
            next_offset: base_offset,
            max_timestamp: i64::MIN,
            entries: Vec::new(),
            verify_at: None,
        }
    }
}

/// Whether the batch at `position` gets an index entry.
pub(crate) fn wants_index_entry(entries: &[IndexEntry], position: u64, interval: u32) -> bool {
    entries.last().is_none_or(|last| position - u64::from(last.position) >= u64::from(interval))
}

/// Reads every batch of a segment from the header on, checking lengths, CRCs and offset
/// continuity, and rebuilds the index on the way. Stops at the first invalid batch.
pub(crate) async fn scan(segment: &SegmentFile, index_interval: u32, size_max: usize) -> Result<ScanOutcome> {
    scan_from(segment, index_interval, size_max, ScanStart::header(segment.base_offset)).await
}

/// [`scan`] from `start` on: the bytes before it are taken as the start describes them.
pub(crate) async fn scan_from(
    segment: &SegmentFile,
    index_interval: u32,
    size_max: usize,
    start: ScanStart,
) -> Result<ScanOutcome> {
    let file_bytes = segment.size().await?;
    let mut outcome = ScanOutcome {
        end_position: start.position,
        next_offset: start.next_offset,
        max_timestamp: start.max_timestamp,
        entries: start.entries,
        invalid: None,
        zero_tail: false,
        file_bytes,
        passed_through: false,
    };
    let mut window = Bytes::new();
    let mut window_start = 0u64;
    let mut position = start.position;
    while position < file_bytes {
        let needed_header = BATCH_HEADER_BYTES as u64;
        let in_window = |from: u64, len: u64, start: u64, window: &Bytes| {
            from >= start && from + len <= start + window.len() as u64
        };
        if !in_window(position, needed_header.min(file_bytes - position), window_start, &window) {
            window_start = align_down(position);
            let len = ((file_bytes - window_start) as usize).min(SCAN_WINDOW_BYTES);
            window = segment.read(window_start, len).await?;
        }
        let local = (position - window_start) as usize;
        let available = &window[local..];
        if available.iter().take(BATCH_HEADER_BYTES).all(|&b| b == 0) {
            if zeros_to_end(segment, position, file_bytes).await? {
                outcome.zero_tail = true;
            } else {
                outcome.invalid = Some((position, CorruptionKind::Batch(BatchError::BadMagic([0, 0]))));
            }
            break;
        }
        let header = match BatchHeader::parse(available, size_max) {
            Ok(header) => header,
            Err(error) => {
                outcome.invalid = Some((position, CorruptionKind::Batch(error)));
                break;
            }
        };
        let total = header.total_bytes() as u64;
        if position + total > file_bytes {
            outcome.invalid = Some((
                position,
                CorruptionKind::Batch(BatchError::Truncated {
                    needed: total as usize,
                    available: (file_bytes - position) as usize,
                }),
            ));
            break;
        }
        if !in_window(position, total, window_start, &window) {
            window_start = align_down(position);
            let len =
                ((file_bytes - window_start) as usize).min(SCAN_WINDOW_BYTES.max(total as usize + 4096));
            window = segment.read(window_start, len).await?;
        }
        let local = (position - window_start) as usize;
        let bytes = &window[local..local + total as usize];
        if let Err(error) = batch::validate(bytes, size_max) {
            outcome.invalid = Some((position, CorruptionKind::Batch(error)));
            break;
        }
        if header.base_offset != outcome.next_offset {
            outcome.invalid = Some((
                position,
                CorruptionKind::OffsetGap { expected: outcome.next_offset, found: header.base_offset },
            ));
            break;
        }
        if wants_index_entry(&outcome.entries, position, index_interval) {
            outcome.entries.push(IndexEntry {
                relative_offset: (header.base_offset - segment.base_offset) as u32,
                position: position as u32,
                max_timestamp_before: outcome.max_timestamp,
            });
        }
        outcome.max_timestamp = outcome.max_timestamp.max(header.max_timestamp);
        outcome.next_offset = header.next_offset();
        position += total;
        outcome.end_position = position;
        if start.verify_at == Some((position, outcome.next_offset)) {
            outcome.passed_through = true;
        }
    }
    crate::metrics::count(|c| c.recovery_scanned_bytes += outcome.end_position - start.position);
    Ok(outcome)
}

/// Whether every byte of the file from `position` on is zero.
async fn zeros_to_end(segment: &SegmentFile, mut position: u64, file_bytes: u64) -> Result<bool> {
    while position < file_bytes {
        let len = ((file_bytes - position) as usize).min(SCAN_WINDOW_BYTES);
        let bytes = segment.read(position, len).await?;
        if bytes.iter().any(|&b| b != 0) {
            return Ok(false);
        }
        position += len as u64;
    }
    Ok(true)
}

/// Loads a sealed segment's index files; `Ok(None)` when they are missing or invalid (the
/// caller rebuilds them from the log).
pub(crate) async fn load_index(
    segment: &SegmentFile,
    file_bytes: u64,
) -> Result<std::result::Result<(SegmentSummary, Vec<IndexEntry>), String>> {
    let paths = segment.paths();
    match read_index(segment).await? {
        IndexFiles::Missing(path) => Ok(Err(format!("{} is missing", path.display()))),
        IndexFiles::Loaded(summary, _) if summary.log_bytes != file_bytes => Ok(Err(format!(
            "{} describes {} bytes but the log holds {}",
            paths.index.display(),
            summary.log_bytes,
            file_bytes
        ))),
        IndexFiles::Loaded(summary, entries) => Ok(Ok((summary, entries))),
        IndexFiles::Invalid(error) => Ok(Err(format!("{}: {error}", paths.index.display()))),
    }
}

/// What [`read_index`] found.
pub(crate) enum IndexFiles {
    /// This one of the two files is not there.
    Missing(PathBuf),
    /// They do not decode, or do not agree.
    Invalid(files::FormatError),
    Loaded(SegmentSummary, Vec<IndexEntry>),
}

/// A segment's two index files, decoded: shared by [`load_index`] (a sealed segment's) and
/// recovery's use of the index a tail's close wrote.
pub(crate) async fn read_index(segment: &SegmentFile) -> Result<IndexFiles> {
    let paths = segment.paths();
    let Some(offsets) = dio::read_small_file(&paths.index).await? else {
        return Ok(IndexFiles::Missing(paths.index.clone()));
    };
    let Some(times) = dio::read_small_file(&paths.time_index).await? else {
        return Ok(IndexFiles::Missing(paths.time_index.clone()));
    };
    Ok(match files::decode_indexes(&offsets, &times, segment.base_offset) {
        Ok((summary, entries)) => IndexFiles::Loaded(summary, entries),
        Err(error) => IndexFiles::Invalid(error),
    })
}

/// Writes a sealed segment's two index files.
pub(crate) async fn write_index(
    segment: &SegmentFile,
    summary: &SegmentSummary,
    entries: &[IndexEntry],
) -> Result<()> {
    let paths = segment.paths();
    dio::write_small_file(&paths.index, &files::encode_offset_index(summary, entries), false).await?;
    dio::write_small_file(&paths.time_index, &files::encode_time_index(summary, entries), false).await?;
    Ok(())
}

/// Removes a segment's files: indexes first, so a crash in between leaves a log without
/// index (rebuilt on open) rather than an index without log.
pub(crate) fn remove_files(paths: &SegmentPaths) -> Result<()> {
    dio::remove_file(&paths.index)?;
    dio::remove_file(&paths.time_index)?;
    dio::remove_file(&paths.log)
}

pub(crate) fn log_path(dir: &Path, base_offset: u64) -> PathBuf {
    SegmentPaths::new(dir, base_offset).log
}
