//! Truncation: removing the tail of the log from an offset on.

use std::rc::Rc;

use super::{Active, Log, Mark, FREE_BUFFERS_MAX};
use crate::appender::Appender;
use crate::error::{CorruptionKind, Result, StorageError};
use crate::files::{self, IndexEntry, SEGMENT_HEADER_BYTES};
use crate::io::{self as dio, align_down, now_ms};
use crate::segment::{self, SegmentFile};

impl Log {
    /// Removes every record at or after `offset`. A batch is never split: if `offset` falls
    /// inside a batch, that whole batch goes. Returns the new next offset. Replication uses it
    /// to drop a diverged tail; it is the one way offsets can be handed out again.
    pub async fn truncate(&self, offset: u64) -> Result<u64> {
        // Bytes read ahead may be about to change.
        self.shared.read_ahead.borrow_mut().clear();
        let shared = &self.shared;
        let size_max = crate::batch::BATCH_BYTES_LIMIT;
        let _permit = shared.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        shared.check_usable()?;
        shared.barrier().await?;
        shared.finish_index_writes().await;
        let (start, next) = {
            let state = shared.state.borrow();
            (state.start_offset(), state.next_offset)
        };
        if offset >= next {
            return Ok(next);
        }
        if offset < start {
            return Err(StorageError::OffsetOutOfRange { offset, start, end: next });
        }
        // Held until the generation is bumped (see `Shared::put_checkpoint`); taken after the
        // barrier, which needs the flusher, and the flusher may wait for this gate.
        let _checkpoints =
            shared.checkpoint_gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        // The segment that keeps the truncation point becomes the active one.
        let sealed_target = {
            let state = shared.state.borrow();
            (offset < state.active.file.base_offset())
                .then(|| *state.sealed.range(..=offset).next_back().expect("offset ≥ start").0)
        };
        let sealed_index = match sealed_target {
            Some(base) => Some(self.sealed_index(base).await?),
            None => None,
        };
        let (target, index, data_end, doomed) = {
            let mut state = shared.state.borrow_mut();
            match (sealed_target, sealed_index) {
                (Some(base), Some(index)) => {
                    let later: Vec<u64> = state.sealed.range(base + 1..).map(|(&b, _)| b).collect();
                    let mut doomed = vec![state.active.file.clone()];
                    for b in later {
                        doomed.push(state.sealed.remove(&b).expect("listed").file);
                        state.loaded.retain(|&x| x != b);
                    }
                    let target = state.sealed.remove(&base).expect("exists");
                    state.loaded.retain(|&x| x != base);
                    (target.file, index, target.summary.log_bytes, doomed)
                }
                _ => {
                    let end = state.active.appender.end();
                    (state.active.file.clone(), Rc::new(state.active.index.clone()), end, Vec::new())
                }
            }
        };
        let base = target.base_offset();
        // From here the files change. An error part way leaves them not matching the state in
        // memory (segments already gone from it, or the active one cut): the log is failed
        // until a reopen recovers what the directory holds, as for a failed reset.
        let rebuilt = async {
            let relative = (offset - base) as u32;
            let entry_index = index.partition_point(|entry| entry.relative_offset <= relative);
            let from = if entry_index == 0 {
                SEGMENT_HEADER_BYTES
            } else {
                u64::from(index[entry_index - 1].position)
            };
            let (cut, new_next) = if offset == base {
                (SEGMENT_HEADER_BYTES, base)
            } else {
                let (position, header) = target.find_batch(from, offset, data_end, size_max).await?;
                (position, header.base_offset)
            };
            for file in &doomed {
                segment::remove_files(file.paths())?;
            }
            dio::remove_file(&target.paths().index)?;
            dio::remove_file(&target.paths().time_index)?;
            target.truncate(cut).await?;
            target.sync().await?;
            shared.sync_directory().await?;
            // Rebuild the in-memory state of the kept part.
            let kept: Vec<IndexEntry> =
                index.iter().copied().filter(|entry| u64::from(entry.position) < cut).collect();
            let mut max_timestamp = kept.last().map_or(i64::MIN, |entry| entry.max_timestamp_before);
            let mut position = kept.last().map_or(SEGMENT_HEADER_BYTES, |entry| u64::from(entry.position));
            while position < cut {
                let (at, header) = target.find_batch(position, 0, cut, size_max).await?;
                max_timestamp = max_timestamp.max(header.max_timestamp);
                position = at + header.total_bytes() as u64;
            }
            let tail_block = if cut.is_multiple_of(files::BLOCK_BYTES as u64) {
                Vec::new()
            } else {
                target.read(align_down(cut), (cut - align_down(cut)) as usize).await?.to_vec()
            };
            let created_ms = match target.read_header().await? {
                Ok(header) => header.created_ms,
                Err(error) => return Err(target.corruption(0, CorruptionKind::Format(error))),
            };
            shared.put_checkpoint(base, cut, true).await?;
            Ok::<_, StorageError>((cut, new_next, max_timestamp, kept, tail_block, created_ms))
        }
        .await;
        let (cut, new_next, max_timestamp, kept, tail_block, created_ms) = match rebuilt {
            Ok(rebuilt) => rebuilt,
            Err(error) => {
                tracing::error!(%error, "truncation failed part way; the log refuses further writes until reopened");
                return Err(shared.state.borrow_mut().fail(error));
            }
        };
        shared.account_ahead(0);
        let mut state = shared.state.borrow_mut();
        let mark = Mark { offset: new_next, position: cut, max_timestamp };
        state.active = Active {
            file: target,
            allocated: cut,
            created_ms,
            max_timestamp,
            index: kept,
            appender: Appender::new(
                shared.config.get().write_buffer_bytes,
                FREE_BUFFERS_MAX,
                cut,
                tail_block,
            ),
        };
        state.next_offset = new_next;
        state.written = mark;
        state.synced = mark;
        state.visible = mark;
        state.cache.truncate(new_next);
        state.epochs.truncate_from_end(new_next);
        state.generation += 1;
        // And again now: a cold read since the clear above may have read ahead bytes past
        // the cut, which new appends will replace at the same offsets.
        shared.read_ahead.borrow_mut().clear();
        tracing::info!(dir = %shared.dir.display(), offset = new_next, "log truncated");
        Ok(new_next)
    }

    /// Removes every record and starts the log again, empty, at `start` (which may be below,
    /// at or above the current offsets): a follower whose log ends below its leader's start
    /// offset restarts there. Everything appended before is written and synced first, as for
    /// [`Log::truncate`]. Forgets the leader epochs.
    ///
    /// *Crash consistency.* The checkpoint goes first, then the old segments oldest first (each
    /// intermediate state is a suffix of the old log, which recovery opens as it is), then the
    /// new segment is created and synced with its directory entry, and the checkpoint points at
    /// it. A crash after the last old segment is removed and before the new one is durable
    /// leaves no segment at all, which opens as an empty log at offset 0: never a corrupt log,
    /// and one still below the leader's start, so the follower resets again. An error part way
    /// leaves the log failed ([`StorageError::Failed`]) until it is reopened.
    pub async fn reset_to(&self, start: u64) -> Result<()> {
        // Bytes read ahead belong to segments about to go.
        self.shared.read_ahead.borrow_mut().clear();
        let shared = &self.shared;
        let _permit = shared.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        shared.check_usable()?;
        shared.barrier().await?;
        shared.finish_index_writes().await;
        // Held until the generation is bumped (see `Shared::put_checkpoint`); taken after the
        // barrier, which needs the flusher, and the flusher may wait for this gate.
        let _checkpoints =
            shared.checkpoint_gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        let doomed: Vec<Rc<SegmentFile>> = {
            let state = shared.state.borrow();
            state
                .sealed
                .values()
                .map(|sealed| sealed.file.clone())
                .chain([state.active.file.clone()])
                .collect()
        };
        let created_ms = now_ms();
        let replaced = async {
            // Without a checkpoint, recovery scans every segment leniently after its header:
            // right for every state on the way, all of whose bytes are synced.
            dio::remove_file(&shared.checkpoint_path)?;
            shared.sync_directory().await?;
            for file in &doomed {
                segment::remove_files(file.paths())?;
            }
            let segment = Rc::new(SegmentFile::create(&shared.dir, start, created_ms).await?);
            segment.sync().await?;
            shared.sync_directory().await?;
            shared.put_checkpoint(start, SEGMENT_HEADER_BYTES, true).await?;
            Ok::<_, StorageError>(segment)
        }
        .await;
        let segment = match replaced {
            Ok(segment) => segment,
            Err(error) => {
                // The files no longer match the state in memory: refuse writes until a reopen
                // recovers whatever the directory holds now.
                tracing::error!(%error, "reset failed part way; the log refuses further writes until reopened");
                return Err(shared.state.borrow_mut().fail(error));
            }
        };
        shared.account_ahead(0);
        let mut state = shared.state.borrow_mut();
        let mark = Mark { offset: start, position: SEGMENT_HEADER_BYTES, max_timestamp: i64::MIN };
        state.sealed.clear();
        state.loaded.clear();
        state.active = Active::empty(segment, created_ms, shared.config.get().write_buffer_bytes);
        state.next_offset = start;
        state.written = mark;
        state.synced = mark;
        state.visible = mark;
        state.cache.truncate(0);
        state.epochs.clear();
        state.generation += 1;
        // And again now: a read since the clear above may have read ahead bytes of the
        // segments removed.
        shared.read_ahead.borrow_mut().clear();
        tracing::info!(dir = %shared.dir.display(), offset = start, segments = doomed.len(), "log reset");
        Ok(())
    }
}
