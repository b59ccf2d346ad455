//! Opening a log: crash recovery of its segments (see the module docs of `log`).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use glommio::sync::Semaphore;

use super::flusher::Flusher;
use super::{Active, Log, Mark, Sealed, Shared, State, FREE_BUFFERS_MAX, PREALLOCATE_STEP_MIN};
use crate::appender::Appender;
use crate::cache::TailCache;
use crate::config::LogConfig;
use crate::error::{CorruptionKind, Result, StorageError};
use crate::files::{
    self, Checkpoint, FormatError, IndexEntry, SegmentSummary, CHECKPOINT_FILE, SEGMENT_HEADER_BYTES,
};
use crate::io::{self as dio, align_down, now_ms};
use crate::notify::Notify;
use crate::partition_log::EpochCache;
use crate::segment::{self, SegmentFile};

impl Log {
    /// Opens (or creates) the log in `dir`, running crash recovery (see the module docs).
    pub async fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log> {
        // Absolute: glommio's `Directory::open` fails (EBADF) on a relative path.
        let dir =
            std::path::absolute(dir.as_ref()).map_err(|e| StorageError::io("resolving", dir.as_ref(), e))?;
        config.validate().map_err(StorageError::Config)?;
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::io("creating directory", &dir, e))?;
        dio::prime_executor(&dir).await?;

        let mut bases = Vec::new();
        let mut index_files = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| StorageError::io("listing", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("listing", &dir, e))?;
            let name = entry.file_name();
            let Some((base, extension)) = name.to_str().and_then(files::parse_segment_file_name) else {
                continue;
            };
            match extension {
                "log" => bases.push(base),
                "index" | "timeindex" => index_files.push((base, entry.path())),
                _ => {}
            }
        }
        bases.sort_unstable();
        for (base, path) in index_files {
            if bases.binary_search(&base).is_err() {
                tracing::info!(path = %path.display(), "removing an index file without its log");
                dio::remove_file(&path)?;
            }
        }

        let checkpoint_path = dir.join(CHECKPOINT_FILE);
        let checkpoint = match dio::read_small_file(&checkpoint_path).await? {
            None => None,
            Some(bytes) => match Checkpoint::decode(&bytes) {
                Ok(checkpoint) => Some(checkpoint),
                Err(error) => {
                    tracing::warn!(path = %checkpoint_path.display(), %error, "ignoring an invalid recovery checkpoint");
                    None
                }
            },
        };

        if bases.is_empty() {
            let segment = SegmentFile::create(&dir, 0, now_ms()).await?;
            segment.sync().await?;
            dio::sync_dir(&dir)?;
            drop(segment);
            bases.push(0);
        }
        if let Some(checkpoint) = checkpoint {
            let last = *bases.last().expect("at least one segment");
            if checkpoint.tail_base_offset > last {
                return Err(StorageError::Corruption {
                    path: segment::log_path(&dir, checkpoint.tail_base_offset),
                    position: 0,
                    kind: CorruptionKind::SegmentGap { expected: checkpoint.tail_base_offset, found: last },
                });
            }
        }

        // Segments before the checkpoint's segment were synced before it existed: they are
        // sealed and strict. From the checkpoint's segment on (every segment when there is no
        // checkpoint), segments are scanned: strict up to the recovery position, lenient after.
        let first_scanned = match checkpoint {
            Some(c) if bases.binary_search(&c.tail_base_offset).is_ok() => c.tail_base_offset,
            _ => bases[0],
        };
        let mut sealed = BTreeMap::new();
        let mut expected_base: Option<u64> = None;
        for &base in bases.iter().filter(|&&b| b < first_scanned) {
            let item = open_sealed(&dir, base, &config).await?;
            check_continuity(&dir, base, expected_base)?;
            expected_base = Some(item.summary.next_offset);
            sealed.insert(base, item);
        }
        let scanned: Vec<u64> = bases.iter().copied().filter(|&b| b >= first_scanned).collect();
        let mut tail: Option<RecoveredSegment> = None;
        // Whether the previous scanned segment was covered by the checkpoint to its end.
        let mut previous_strict = true;
        for (index, &base) in scanned.iter().enumerate() {
            if let Some(expected) = expected_base {
                if expected != base {
                    if tail.is_some() && !previous_strict {
                        // The segment before ends early, in bytes never synced, yet a later one
                        // exists: what came after was lost too; the earlier segment is the tail.
                        remove_torn_segments(&dir, &scanned[index..], "an earlier segment lost its end")?;
                        break;
                    }
                    check_continuity(&dir, base, expected_base)?;
                }
            }
            let strict_end = match checkpoint {
                Some(c) if c.tail_base_offset == base => c.recovery_position.max(SEGMENT_HEADER_BYTES),
                _ => SEGMENT_HEADER_BYTES,
            };
            let recovered = recover_segment(&dir, base, strict_end, &config).await?;
            let last = index + 1 == scanned.len();
            if recovered.torn && !last {
                remove_torn_segments(&dir, &scanned[index + 1..], "they follow a torn segment")?;
            }
            if let Some(previous) = tail.take() {
                let item = seal_recovered(previous).await?;
                sealed.insert(item.file.base_offset(), item);
            }
            expected_base = Some(recovered.next_offset);
            previous_strict = strict_end >= recovered.end;
            let torn = recovered.torn;
            tail = Some(recovered);
            if torn {
                break;
            }
        }
        let recovered = tail.expect("at least one segment is scanned");
        let tail_block = if recovered.end.is_multiple_of(files::BLOCK_BYTES as u64) {
            Vec::new()
        } else {
            let block = align_down(recovered.end);
            recovered.file.read(block, (recovered.end - block) as usize).await?.to_vec()
        };
        let active = Active {
            file: Rc::new(recovered.file),
            allocated: recovered.end,
            created_ms: recovered.created_ms,
            max_timestamp: recovered.max_timestamp,
            index: recovered.entries,
            appender: Appender::new(config.write_buffer_bytes, FREE_BUFFERS_MAX, recovered.end, tail_block),
        };
        let mark = Mark {
            offset: recovered.next_offset,
            position: active.appender.end(),
            max_timestamp: active.max_timestamp,
        };
        let loaded: VecDeque<u64> =
            sealed.iter().filter(|(_, s): &(&u64, &Sealed)| s.index.is_some()).map(|(&b, _)| b).collect();
        let state = State {
            sealed,
            active,
            next_offset: mark.offset,
            written: mark,
            synced: mark,
            visible: mark,
            acks: VecDeque::new(),
            barriers: Vec::new(),
            cache: TailCache::new(config.cache_bytes_max),
            loaded,
            failed: None,
            closing: false,
            flusher_exited: false,
            last_sync: Instant::now(),
            last_checkpoint: None,
            generation: 0,
            epochs: EpochCache::default(),
        };
        let shared = Rc::new(Shared {
            directory_sync_pending: Cell::new(false),
            index_writes: RefCell::new(Vec::new()),
            checkpoint_mark: Cell::new(
                checkpoint.map_or((0, 0), |c| (c.tail_base_offset, c.recovery_position)),
            ),
            checkpoint_gate: Semaphore::new(1),
            previous_seal: RefCell::new(None),
            seals_pending: Cell::new(0),
            dir,
            config: Cell::new(config),
            state: RefCell::new(state),
            wake_flusher: Notify::default(),
            progress: Notify::default(),
            gate: Semaphore::new(1),
            checkpoint_path,
            checkpoint_busy: Cell::new(false),
            preallocate_step: Cell::new(PREALLOCATE_STEP_MIN),
            preallocated_at: Cell::new(None),
            allocated_ahead: Cell::new(0),
            read_ahead: RefCell::new(Default::default()),
            read_cursors: RefCell::new(VecDeque::new()),
        });
        {
            let mut state = shared.state.borrow_mut();
            let max = shared.config.get().loaded_indexes_max;
            while state.loaded.len() > max {
                let base = state.loaded.front().copied().expect("non-empty");
                state.touch_loaded(base, max);
            }
        }
        let flusher = Flusher::new(shared.clone());
        glommio::spawn_local(flusher.run()).detach();
        Ok(Log { shared })
    }
}

fn check_continuity(dir: &Path, base: u64, expected: Option<u64>) -> Result<()> {
    match expected {
        Some(expected) if expected != base => Err(StorageError::Corruption {
            path: segment::log_path(dir, base),
            position: 0,
            kind: CorruptionKind::SegmentGap { expected, found: base },
        }),
        _ => Ok(()),
    }
}

/// Rebuilds a sealed segment's index by scanning it; every batch must be valid.
pub(super) async fn rebuild_index(
    segment: &SegmentFile,
    config: &LogConfig,
    reason: &str,
) -> Result<(SegmentSummary, Vec<IndexEntry>)> {
    tracing::warn!(path = %segment.path().display(), reason, "rebuilding the segment index from the log");
    let outcome =
        segment::scan(segment, config.index_interval_bytes, crate::batch::BATCH_BYTES_LIMIT).await?;
    if let Some((position, kind)) = outcome.invalid {
        return Err(segment.corruption(position, kind));
    }
    if outcome.zero_tail {
        // Space allocated ahead whose trimming at seal time did not reach the disk.
        segment.truncate(outcome.end_position).await?;
        segment.sync().await?;
    }
    let summary = SegmentSummary {
        base_offset: segment.base_offset(),
        log_bytes: outcome.end_position,
        next_offset: outcome.next_offset,
        max_timestamp: outcome.max_timestamp,
    };
    segment::write_index(segment, &summary, &outcome.entries).await?;
    Ok((summary, outcome.entries))
}

async fn open_sealed(dir: &Path, base: u64, config: &LogConfig) -> Result<Sealed> {
    let file = SegmentFile::open(dir, base).await?;
    if let Err(error) = file.read_header().await? {
        return Err(file.corruption(0, CorruptionKind::Format(error)));
    }
    let size = file.size().await?;
    let (summary, index) = match segment::load_index(&file, size).await? {
        Ok((summary, _entries)) => (summary, None),
        Err(reason) => {
            let (summary, entries) = rebuild_index(&file, config, &reason).await?;
            (summary, Some(Rc::new(entries)))
        }
    };
    Ok(Sealed { file: Rc::new(file), summary, index })
}

/// A segment after recovery: valid up to `end`.
struct RecoveredSegment {
    file: SegmentFile,
    created_ms: i64,
    end: u64,
    next_offset: u64,
    max_timestamp: i64,
    entries: Vec<IndexEntry>,
    /// The scan stopped at a torn batch (after the strict region): nothing after it is kept.
    torn: bool,
}

/// Scans one segment: every invalid batch before `strict_end` is an error; the first invalid
/// batch after it ends the log there (the file is cut and the rest logged as torn).
async fn recover_segment(
    dir: &Path,
    base: u64,
    strict_end: u64,
    config: &LogConfig,
) -> Result<RecoveredSegment> {
    let file = SegmentFile::open(dir, base).await?;
    let size = file.size().await?;
    let created_ms = match file.read_header().await? {
        Ok(header) => header.created_ms,
        Err(FormatError::Zero | FormatError::Truncated { .. }) if strict_end <= SEGMENT_HEADER_BYTES => {
            // Created, but the header never reached the disk (it is synced together with the
            // segment's first records): write it again and recover the rest as usual.
            tracing::warn!(path = %file.path().display(), size, "rewriting the lost header of a segment");
            let created_ms = now_ms();
            let header = files::SegmentHeader { base_offset: base, created_ms }.encode();
            dio::write_block_padded(&*file.file().await?, file.path(), 0, &header).await?;
            file.sync().await?;
            created_ms
        }
        Err(error) => return Err(file.corruption(0, CorruptionKind::Format(error))),
    };
    let size_max = crate::batch::BATCH_BYTES_LIMIT;
    let outcome = match tail_index_start(&file, size, strict_end).await? {
        Some(start) => {
            let vouched = start.verify_at.map_or(0, |(position, _)| position);
            let outcome = segment::scan_from(&file, config.index_interval_bytes, size_max, start).await?;
            if outcome.passed_through {
                tracing::debug!(
                    path = %file.path().display(), vouched, scanned = outcome.end_position.saturating_sub(vouched),
                    "recovered the tail from the index written when it was closed"
                );
                outcome
            } else {
                tracing::warn!(
                    path = %file.path().display(), vouched,
                    "the tail's index does not match its log; scanning the whole segment"
                );
                segment::scan(&file, config.index_interval_bytes, size_max).await?
            }
        }
        None => segment::scan(&file, config.index_interval_bytes, size_max).await?,
    };
    let end = outcome.end_position;
    let mut torn = false;
    if let Some((position, kind)) = &outcome.invalid {
        if *position < strict_end {
            return Err(file.corruption(*position, kind.clone()));
        }
        tracing::warn!(
            path = %file.path().display(), position, dropped_bytes = outcome.file_bytes - position, reason = %kind,
            next_offset = outcome.next_offset,
            "torn tail: truncating the segment to its last valid batch"
        );
        file.truncate(end).await?;
        file.sync().await?;
        torn = true;
    } else if end < strict_end {
        return Err(file.corruption(end, CorruptionKind::Shorter { expected: strict_end, found: end }));
    }
    if outcome.zero_tail {
        tracing::debug!(path = %file.path().display(), end, "trimming space allocated ahead of the last batch");
        file.truncate(end).await?;
    }
    Ok(RecoveredSegment {
        file,
        created_ms,
        end,
        next_offset: outcome.next_offset,
        max_timestamp: outcome.max_timestamp,
        entries: outcome.entries,
        torn,
    })
}

/// Where the scan of a tail can start: the last batch that the index written when the log was
/// last closed ([`Log::close`]) names, if that index is whole (CRC), describes no more bytes
/// than the file holds and than the checkpoint says were synced (`strict_end`). The bytes
/// before that batch are taken as the index describes them, as a sealed segment's are; the
/// scan checks the rest and must pass through the end the index describes, with its next
/// offset, or the caller scans the whole segment. A truncation removes the index first.
async fn tail_index_start(
    file: &SegmentFile,
    size: u64,
    strict_end: u64,
) -> Result<Option<segment::ScanStart>> {
    let (summary, mut entries) = match segment::read_index(file).await? {
        segment::IndexFiles::Missing(_) => return Ok(None),
        segment::IndexFiles::Loaded(summary, entries) => (summary, entries),
        segment::IndexFiles::Invalid(error) => {
            tracing::warn!(path = %file.paths().index.display(), %error, "ignoring the tail's invalid index");
            return Ok(None);
        }
    };
    let Some(last) = entries.pop() else {
        return Ok(None);
    };
    let vouched = summary.log_bytes;
    if vouched > size || vouched > strict_end || u64::from(last.position) >= vouched {
        return Ok(None);
    }
    Ok(Some(segment::ScanStart {
        position: u64::from(last.position),
        next_offset: file.base_offset() + u64::from(last.relative_offset),
        max_timestamp: last.max_timestamp_before,
        entries,
        verify_at: Some((vouched, summary.next_offset)),
    }))
}

/// A scanned segment that is not the tail: sync its trimmed size, write its index files.
async fn seal_recovered(recovered: RecoveredSegment) -> Result<Sealed> {
    recovered.file.sync().await?;
    let summary = SegmentSummary {
        base_offset: recovered.file.base_offset(),
        log_bytes: recovered.end,
        next_offset: recovered.next_offset,
        max_timestamp: recovered.max_timestamp,
    };
    segment::write_index(&recovered.file, &summary, &recovered.entries).await?;
    Ok(Sealed { file: Rc::new(recovered.file), summary, index: Some(Rc::new(recovered.entries)) })
}

/// Deletes segments that follow a torn one: none of their bytes was ever synced.
fn remove_torn_segments(dir: &Path, bases: &[u64], reason: &str) -> Result<()> {
    for &base in bases {
        let paths = files::SegmentPaths::new(dir, base);
        tracing::warn!(path = %paths.log.display(), reason, "removing a segment written after a torn write");
        segment::remove_files(&paths)?;
    }
    dio::sync_dir(dir)
}
