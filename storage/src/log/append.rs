//! Appending: offsets, buffering, back-pressure, preallocation, rolling and flushing.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;

use super::{
    sync_directory, Active, AppendAck, Appended, Log, Mark, PendingAck, Sealed, PREALLOCATE_STEP_MIN,
};
use crate::batch::{self, BatchError};
use crate::cache::CacheEntry;
use crate::error::{glommio_io, Result, StorageError};
use crate::files::{IndexEntry, SegmentSummary, SEGMENT_HEADER_BYTES};
use crate::handles;
use crate::io::{self as dio, now_ms};
use crate::partition_log::split_follower_batches;
use crate::segment::{self, SegmentFile};

impl Log {
    /// Appends one batch (exactly one, as built by [`batch::BatchBuilder`]). The log assigns
    /// the offsets and writes the base offset into the batch; the leader epoch is left as the
    /// caller stamped it. Returns once the batch is buffered (waiting first if more than
    /// `write_buffered_bytes_max` is buffered); await [`Appended::ack`] for durability.
    pub async fn append(&self, batch: BytesMut) -> Result<Appended> {
        self.append_validated(batch::ValidatedBatch::new(batch, self.shared.config.get().batch_bytes_max)?)
            .await
    }

    /// [`Log::append`] for a batch the caller already validated (the broker checks every batch
    /// of a request before appending any, so that a bad one leaves the partition untouched).
    /// Its size was checked then, against the limit in force for the whole request: a limit
    /// lowered ([`Log::set_config`]) while the request's earlier batches were appended must not
    /// refuse its later ones and leave half a request written. Only the hard
    /// [`batch::BATCH_BYTES_LIMIT`] is checked again.
    pub async fn append_validated(&self, batch: batch::ValidatedBatch) -> Result<Appended> {
        let shared = &self.shared;
        if batch.len() > batch::BATCH_BYTES_LIMIT {
            return Err(BatchError::TooLarge { size: batch.len(), limit: batch::BATCH_BYTES_LIMIT }.into());
        }
        let (batch, header) = batch.into_parts();
        let _permit = shared.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        shared.check_usable()?;
        self.make_room(batch.len() as u64).await?;
        let appended = self.append_buffered(batch, &header);
        // glommio submits queued I/O and reaps completions only between time slices (its
        // preempt timer) or when idle: a producer that never waits must give way once its
        // slice is spent, or the flusher's writes would wait behind it.
        glommio::yield_if_needed().await;
        Ok(appended)
    }

    /// Appends batches that already carry their offsets and leader epochs (a follower copying
    /// its leader): both are kept. `batches` holds whole batches back to back, as a fetch returns
    /// them; each is checked (header rules, CRC) and must continue the one before, and the first
    /// must start at [`Log::next_offset`]: otherwise the append is refused with
    /// [`StorageError::OffsetOutOfRange`] (a gap or an overlap) and nothing is appended. The
    /// returned ack is the last batch's (acks resolve in offset order; a failed write aborts
    /// every ack after it). Should an error stop the append part way (a full disk while rolling
    /// or allocating), the batches before it stay appended: [`Log::next_offset`] says where.
    pub async fn append_follower(&self, batches: Bytes) -> Result<Appended> {
        let shared = &self.shared;
        let batches = split_follower_batches(&batches, batch::BATCH_BYTES_LIMIT)?;
        let _permit = shared.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        shared.check_usable()?;
        let first_offset = batches[0].1.base_offset;
        let mut last = None;
        for (batch, header) in batches {
            self.make_room(batch.len() as u64).await?;
            {
                // Checked after the waits: a failed write may have given offsets back meanwhile.
                let state = shared.state.borrow();
                if header.base_offset != state.next_offset {
                    return Err(StorageError::OffsetOutOfRange {
                        offset: header.base_offset,
                        start: state.start_offset(),
                        end: state.next_offset,
                    });
                }
            }
            last = Some(self.buffer_batch(
                batch,
                header.base_offset,
                header.next_offset(),
                header.max_timestamp,
                header.leader_epoch,
            ));
            glommio::yield_if_needed().await;
        }
        let last = last.expect("at least one batch");
        Ok(Appended { base_offset: first_offset, last_offset: last.last_offset, ack: last.ack })
    }

    /// Waits until the write buffers have room for `incoming` more bytes, then rolls the active
    /// segment if they do not fit in it, and allocates space for them. The caller holds the gate.
    async fn make_room(&self, incoming: u64) -> Result<()> {
        let shared = &self.shared;
        loop {
            let buffered = shared.state.borrow().active.appender.buffered();
            if buffered == 0 || buffered + incoming <= shared.config.get().write_buffered_bytes_max as u64 {
                break;
            }
            let progress = shared.progress.notified();
            shared.wake_flusher.notify_all();
            progress.await;
            shared.check_usable()?;
        }
        if self.should_roll(incoming) {
            self.roll_locked().await?;
        }
        self.preallocate(incoming).await
    }

    /// The synchronous part of an append: assigns the offsets, then [`Log::buffer_batch`].
    fn append_buffered(&self, mut batch: BytesMut, header: &batch::BatchHeader) -> Appended {
        let base_offset = self.shared.state.borrow().next_offset;
        batch::set_base_offset(&mut batch, base_offset);
        let next_offset = header.next_offset() - header.base_offset + base_offset;
        self.buffer_batch(batch.freeze(), base_offset, next_offset, header.max_timestamp, header.leader_epoch)
    }

    /// Puts a batch whose base offset is the log's next offset into the index, the write
    /// buffers, the tail cache and the epoch cache, and queues its ack. Synchronous.
    fn buffer_batch(
        &self,
        batch: Bytes,
        base_offset: u64,
        next_offset: u64,
        batch_max_timestamp: i64,
        leader_epoch: u32,
    ) -> Appended {
        let shared = &self.shared;
        let mut guard = shared.state.borrow_mut();
        let state = &mut *guard;
        debug_assert_eq!(base_offset, state.next_offset, "batches are buffered at the log's end");
        let active = &mut state.active;
        let segment_base = active.file.base_offset();
        let position = active.appender.end();
        if segment::wants_index_entry(&active.index, position, shared.config.get().index_interval_bytes) {
            active.index.push(IndexEntry {
                relative_offset: (base_offset - segment_base) as u32,
                position: position as u32,
                max_timestamp_before: active.max_timestamp,
            });
        }
        active.max_timestamp = active.max_timestamp.max(batch_max_timestamp);
        active.appender.append(&batch);
        state.next_offset = next_offset;
        state.epochs.assign(leader_epoch, base_offset);
        let stable = state.stable_position();
        state.cache.push(
            CacheEntry { base_offset, next_offset, segment_base, position, data: batch },
            segment_base,
            stable,
        );
        let (reply, receiver) = oneshot::channel();
        let (end_position, max_timestamp) = (state.active.appender.end(), state.active.max_timestamp);
        state.acks.push_back(PendingAck { next_offset, end_position, max_timestamp, reply });
        shared.wake_flusher.notify_all();
        Appended { base_offset, last_offset: next_offset - 1, ack: AppendAck { receiver } }
    }

    /// Extends the active file ahead of the data. The step follows the write rate: it starts at
    /// [`PREALLOCATE_STEP_MIN`], doubles each time the previous one was used up within a second
    /// (up to `LogConfig::preallocate_bytes`) and halves when it lasted more than ten; and the
    /// shard's logs together stay within the shard's `preallocate_bytes_max` (see
    /// [`crate::handles`]), beyond which a log allocates only what it writes.
    async fn preallocate(&self, incoming: u64) -> Result<()> {
        let shared = &self.shared;
        let config = shared.config.get();
        let (segment, target, end) = {
            let state = shared.state.borrow();
            let end = state.active.appender.end();
            let needed = end + incoming;
            if config.preallocate_bytes == 0 || needed <= state.active.allocated {
                return Ok(());
            }
            let max = config.preallocate_bytes.max(PREALLOCATE_STEP_MIN);
            let mut step = shared.preallocate_step.get();
            match shared.preallocated_at.get().map(|at| at.elapsed()) {
                Some(since) if since < Duration::from_secs(1) => step = (step * 2).min(max),
                Some(since) if since > Duration::from_secs(10) => step = (step / 2).max(PREALLOCATE_STEP_MIN),
                _ => {}
            }
            shared.preallocate_step.set(step);
            let ahead = handles::ahead_room().map_or(step, |room| {
                // The bytes this log already holds ahead count as its own.
                step.min(room + shared.allocated_ahead.get())
            });
            let target =
                (dio::align_up(needed) + dio::align_down(ahead)).min(dio::align_up(config.segment_bytes));
            (state.active.file.clone(), target.max(dio::align_up(needed)), end)
        };
        segment
            .file()
            .await?
            .pre_allocate(target, false)
            .await
            .map_err(|e| StorageError::io("allocating space for", segment.path(), glommio_io(e)))?;
        shared.preallocated_at.set(Some(Instant::now()));
        let mut state = shared.state.borrow_mut();
        if Rc::ptr_eq(&state.active.file, &segment) {
            state.active.allocated = state.active.allocated.max(target);
            shared.account_ahead(state.active.allocated.saturating_sub(end));
        }
        Ok(())
    }

    fn should_roll(&self, incoming: u64) -> bool {
        let state = self.shared.state.borrow();
        let config = self.shared.config.get();
        let end = state.active.appender.end();
        if end == SEGMENT_HEADER_BYTES {
            return false;
        }
        let too_big = end + incoming > config.segment_bytes;
        let too_old = config
            .segment_age_max
            .is_some_and(|age| now_ms().saturating_sub(state.active.created_ms) >= age.as_millis() as i64);
        too_big || too_old
    }

    /// Seals the active segment and starts a new one. The caller holds the gate.
    async fn roll_locked(&self) -> Result<()> {
        let shared = &self.shared;
        // Everything in the old segment is written before the new one takes data. With
        // fsync=always it is synced too, here; otherwise it is synced in the background (as
        // Kafka flushes rolled segments), and until that sync lands the recovery checkpoint
        // still points into it, so recovery rescans it leniently.
        let sync_now = shared.config.get().fsync.is_always();
        shared.wait_for(sync_now).await?;
        let (segment, summary, entries) = {
            let state = shared.state.borrow();
            let summary = SegmentSummary {
                base_offset: state.active.file.base_offset(),
                log_bytes: state.active.appender.end(),
                next_offset: state.next_offset,
                max_timestamp: state.active.max_timestamp,
            };
            (state.active.file.clone(), summary, Rc::new(state.active.index.clone()))
        };
        // Cut the space allocated ahead. Not synced: if the new size is lost in a crash, recovery
        // finds zeros after the last batch and trims them again.
        segment.truncate(summary.log_bytes).await?;
        shared.account_ahead(0);
        let created_ms = now_ms();
        let next = Rc::new(SegmentFile::create(&shared.dir, summary.next_offset, created_ms).await?);
        // The new file and its directory entry are synced by the flusher's next sync, before any
        // record in it is acknowledged under fsync=always.
        shared.directory_sync_pending.set(true);
        tracing::debug!(path = %segment.path().display(), bytes = summary.log_bytes, "segment sealed");
        // In the background: sync the sealed segment (unless done above), then record that the
        // log is synced up to the new segment, and write the index files (an optimisation,
        // rebuilt from the log when missing).
        let (sealed_segment, index_summary, index_entries) =
            (segment.clone(), summary.clone(), entries.clone());
        let background = self.shared.clone();
        let next_base = summary.next_offset;
        // Seal tasks run one after another in roll order: each waits for the one before (see
        // `Shared::previous_seal`), and until the last is done the flusher moves no checkpoint.
        let (done, done_here) = futures::channel::oneshot::channel::<()>();
        let previous = shared.previous_seal.replace(Some(done_here));
        shared.seals_pending.set(shared.seals_pending.get() + 1);
        let task = glommio::spawn_local(async move {
            if let Some(previous) = previous {
                // Cancelled only if that task was dropped, with the log.
                let _ = previous.await;
            }
            let synced = if sync_now { Ok(()) } else { sealed_segment.sync().await };
            // A checkpoint naming the new segment vouches for every segment before it: not
            // after an earlier seal's sync failed.
            let failed = background.state.borrow().failed.is_some();
            match synced {
                Ok(()) if failed => {}
                Ok(()) => {
                    // The checkpoint names the new segment: its directory entry goes first (one
                    // journal commit on ext4, which the segment's sync has mostly done already),
                    // and the checkpoint itself needs no sync (see `Shared::write_checkpoint`).
                    let written = match sync_directory(&background.dir).await {
                        Ok(()) => background.write_checkpoint(next_base, SEGMENT_HEADER_BYTES, false).await,
                        Err(error) => Err(error),
                    };
                    if let Err(error) = written {
                        tracing::warn!(%error, "could not write the recovery checkpoint");
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "fdatasync of a sealed segment failed; the log refuses further writes until reopened");
                    background.state.borrow_mut().fail(error);
                }
            }
            // An index vouches for the segment's bytes: only for a synced segment (a failed sync,
            // this one or an earlier one, has failed the log).
            if background.state.borrow().failed.is_none() {
                if let Err(error) =
                    segment::write_index(&sealed_segment, &index_summary, &index_entries).await
                {
                    tracing::warn!(%error, "could not write a sealed segment's index; it will be rebuilt on open");
                }
            }
            background.seals_pending.set(background.seals_pending.get() - 1);
            let _ = done.send(());
        });
        shared.index_writes.borrow_mut().push(task);
        let mut state = shared.state.borrow_mut();
        let mark =
            Mark { offset: summary.next_offset, position: SEGMENT_HEADER_BYTES, max_timestamp: i64::MIN };
        let base = summary.base_offset;
        state.active = Active::empty(next, created_ms, shared.config.get().write_buffer_bytes);
        state.sealed.insert(base, Sealed { file: segment, summary, index: Some(entries) });
        state.touch_loaded(base, shared.config.get().loaded_indexes_max);
        state.written = mark;
        state.synced = mark;
        state.visible = mark;
        crate::metrics::count(|c| c.segment_rolls += 1);
        Ok(())
    }

    /// Seals the active segment now (if it holds any batch) and starts a new one.
    pub async fn roll(&self) -> Result<()> {
        let _permit = self.shared.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        self.shared.check_usable()?;
        if self.shared.state.borrow().active.appender.end() == SEGMENT_HEADER_BYTES {
            return Ok(());
        }
        self.roll_locked().await
    }

    /// Waits until every append so far is written and synced, whatever the fsync policy
    /// (sealed segments still syncing in the background included).
    pub async fn flush(&self) -> Result<()> {
        self.shared.barrier().await?;
        self.shared.finish_index_writes().await;
        self.shared.check_usable()
    }
}
