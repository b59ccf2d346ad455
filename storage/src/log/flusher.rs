//! The flusher: the background task of one log that turns buffered appends into O_DIRECT
//! writes and `fdatasync` calls, resolves acks, and recovers from a failed write.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};

use super::{sync_directory, Mark, Shared, IDLE_RELEASE};
use crate::appender::WriteBuffer;
use crate::config::FsyncPolicy;
use crate::error::{glommio_io, Result, StorageError};
use crate::files::BLOCK_BYTES;
use crate::io::align_down;
use crate::segment::SegmentFile;

/// A write in flight, in file order.
struct InFlight {
    sequence: u64,
    data_end: u64,
    block_end: u64,
    /// `Some(true)` once completed, `Some(false)` if it failed.
    outcome: Option<bool>,
}

struct WriteDone {
    sequence: u64,
    result: Result<()>,
    shared: Option<Rc<glommio::io::DmaBuffer>>,
}

type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// A finished `fdatasync`: of which file, covering which mark.
/// The log's generation when the sync started: a truncation or reset since makes it stale.
type SyncDone = (Rc<SegmentFile>, Mark, u64, std::io::Result<()>);

/// The background task of one log: issues writes, syncs, checkpoints; resolves acks.
pub(super) struct Flusher {
    shared: Rc<Shared>,
    writes: FuturesUnordered<LocalFuture<WriteDone>>,
    in_flight: VecDeque<InFlight>,
    next_sequence: u64,
    sync: Option<LocalFuture<SyncDone>>,
    /// The first failed write, handled once no write is in flight any more.
    failure: Option<StorageError>,
}

enum Event {
    Write(WriteDone),
    Sync(Rc<SegmentFile>, Mark, u64, std::io::Result<()>),
    Wake,
}

impl Flusher {
    pub(super) fn new(shared: Rc<Shared>) -> Flusher {
        Flusher {
            shared,
            writes: FuturesUnordered::new(),
            in_flight: VecDeque::new(),
            next_sequence: 0,
            sync: None,
            failure: None,
        }
    }

    pub(super) async fn run(mut self) {
        // When the log last had nothing to write: its buffers go back after `IDLE_RELEASE`.
        let mut idle_since: Option<Instant> = None;
        let mut released = false;
        loop {
            let shared = self.shared.clone();
            let notified = shared.wake_flusher.notified();
            let reopen = {
                let state = shared.state.borrow();
                let segment = &state.active.file;
                (state.active.appender.has_untaken() && segment.cached_file().is_none())
                    .then(|| segment.clone())
            };
            if let Some(segment) = reopen {
                // The open-files budget closed the active segment while it was idle.
                if let Err(error) = segment.file().await {
                    self.failure.get_or_insert(error);
                }
            }
            self.submit_writes();
            self.start_sync();
            if self.failure.is_some() && self.in_flight.is_empty() && self.sync.is_none() {
                self.recover_from_write_failure().await;
                continue;
            }
            let quiet = {
                let state = shared.state.borrow();
                self.in_flight.is_empty()
                    && self.sync.is_none()
                    && state.barriers.is_empty()
                    && state.active.appender.buffered() == 0
            };
            let release_in = if quiet {
                let since = *idle_since.get_or_insert_with(Instant::now);
                let waited = since.elapsed();
                if waited >= IDLE_RELEASE {
                    if !released {
                        shared.state.borrow_mut().release_idle();
                        released = true;
                    }
                    None
                } else {
                    Some(IDLE_RELEASE - waited)
                }
            } else {
                idle_since = None;
                released = false;
                None
            };
            let sync_wait = {
                let state = shared.state.borrow();
                let idle = self.in_flight.is_empty() && self.sync.is_none();
                if state.closing && idle && state.barriers.is_empty() && !state.active.appender.has_untaken()
                {
                    break;
                }
                if state.failed.is_some() && idle {
                    if state.closing {
                        break;
                    }
                    None
                } else {
                    match shared.config.get().fsync {
                        FsyncPolicy::Interval(every)
                            if self.sync.is_none() && state.written.offset > state.synced.offset =>
                        {
                            Some(every.saturating_sub(state.last_sync.elapsed()))
                        }
                        _ => None,
                    }
                }
            };
            let mut notified = std::pin::pin!(notified);
            let wait = match (sync_wait, release_in) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut timer = wait.map(|wait| Box::pin(glommio::timer::sleep(wait)));
            let event = futures::future::poll_fn(|cx| {
                if !self.writes.is_empty() {
                    if let Poll::Ready(Some(done)) = self.writes.poll_next_unpin(cx) {
                        return Poll::Ready(Event::Write(done));
                    }
                }
                if let Some(sync) = self.sync.as_mut() {
                    if let Poll::Ready((segment, mark, generation, result)) = sync.as_mut().poll(cx) {
                        self.sync = None;
                        return Poll::Ready(Event::Sync(segment, mark, generation, result));
                    }
                }
                if notified.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Wake);
                }
                if let Some(timer) = timer.as_mut() {
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Wake);
                    }
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Write(done) => self.write_done(done),
                Event::Sync(segment, mark, generation, result) => {
                    self.sync_done(&segment, mark, generation, result).await
                }
                Event::Wake => {}
            }
        }
        self.shared.state.borrow_mut().flusher_exited = true;
        self.shared.progress.notify_all();
    }

    /// Issues every write the appender allows: full chunks at once, the partly filled one only
    /// when nothing else is in flight (under load it fills up first and goes without a copy).
    fn submit_writes(&mut self) {
        if self.failure.is_some() {
            return;
        }
        let mut state = self.shared.state.borrow_mut();
        if state.failed.is_some() {
            return;
        }
        let segment = state.active.file.clone();
        // Reopened by the run loop before this when the budget closed it.
        let Some(dma) = segment.cached_file() else { return };
        loop {
            let busy_until = self.in_flight.back().map_or(0, |write| write.block_end);
            let allow_partial = self.in_flight.is_empty();
            let Some(write) = state.active.appender.next_write(busy_until, allow_partial) else {
                break;
            };
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            self.in_flight.push_back(InFlight {
                sequence,
                data_end: write.data_end,
                block_end: write.block_end(),
                outcome: None,
            });
            let (segment, dma) = (segment.clone(), dma.clone());
            let issued = std::time::Instant::now();
            crate::handles::note_segment_write(issued);
            self.writes.push(Box::pin(async move {
                let expected = write.len();
                let (result, shared) = match write.buffer {
                    WriteBuffer::Shared(buffer) => {
                        (dma.write_rc_at(buffer.clone(), write.position).await, Some(buffer))
                    }
                    WriteBuffer::Owned(buffer) => (dma.write_at(buffer, write.position).await, None),
                    WriteBuffer::Rewrite { head, rest } => {
                        // Both go into the ring together (see `WriteBuffer::Rewrite`).
                        let (head, rest) = futures::join!(
                            dma.write_at(head, write.position),
                            dma.write_at(rest, write.position + BLOCK_BYTES as u64)
                        );
                        (head.and_then(|head| Ok(head + rest?)), None)
                    }
                };
                crate::metrics::note_write(issued.elapsed());
                let result = match result {
                    Ok(written) if written == expected => Ok(()),
                    // A short write: the device ran out of space part way.
                    Ok(_) => Err(StorageError::io(
                        "writing",
                        segment.path(),
                        std::io::Error::from_raw_os_error(libc::ENOSPC),
                    )),
                    Err(error) => Err(StorageError::io("writing", segment.path(), glommio_io(error))),
                };
                WriteDone { sequence, result, shared }
            }));
        }
    }

    fn write_done(&mut self, done: WriteDone) {
        let shared = self.shared.clone();
        let mut state = shared.state.borrow_mut();
        if let Some(buffer) = done.shared {
            state.active.appender.give_back(buffer);
        }
        let entry =
            self.in_flight.iter_mut().find(|w| w.sequence == done.sequence).expect("write is in flight");
        entry.outcome = Some(done.result.is_ok());
        if let Err(error) = done.result {
            tracing::warn!(%error, "segment write failed");
            self.failure.get_or_insert(error);
        }
        let mut prefix = None;
        while self.in_flight.front().is_some_and(|w| w.outcome == Some(true)) {
            prefix = Some(self.in_flight.pop_front().expect("front exists").data_end);
        }
        let Some(prefix) = prefix else { return };
        state.active.appender.written_to(prefix);
        let complete = state.acks.partition_point(|ack| ack.end_position <= prefix);
        if complete > 0 {
            let ack = &state.acks[complete - 1];
            let mark = Mark {
                offset: ack.next_offset,
                position: ack.end_position,
                max_timestamp: ack.max_timestamp,
            };
            if mark.offset > state.written.offset {
                state.written = mark;
                if !shared.config.get().fsync.is_always() {
                    state.advance_visible(mark);
                }
            }
        }
        let (active_base, stable) = (state.active.file.base_offset(), state.stable_position());
        state.cache.evict(active_base, stable);
        state.resolve_barriers();
        drop(state);
        shared.progress.notify_all();
    }

    /// Starts an `fdatasync` when the policy (or a barrier) asks for one and none is running.
    fn start_sync(&mut self) {
        if self.sync.is_some() || self.failure.is_some() {
            return;
        }
        let mut state = self.shared.state.borrow_mut();
        if state.failed.is_some() {
            return;
        }
        state.resolve_barriers();
        if state.written.offset <= state.synced.offset {
            return;
        }
        let due = state.barriers.iter().any(|b| b.sync)
            || match self.shared.config.get().fsync {
                FsyncPolicy::Always => true,
                FsyncPolicy::Interval(every) => state.last_sync.elapsed() >= every,
                FsyncPolicy::Never => false,
            };
        if !due {
            return;
        }
        let mark = state.written;
        let generation = state.generation;
        let segment = state.active.file.clone();
        let shared = self.shared.clone();
        self.sync = Some(Box::pin(async move {
            let mut result = Ok(());
            if shared.directory_sync_pending.get() {
                // Cleared first: a roll while this sync runs sets it again for its new entry.
                shared.directory_sync_pending.set(false);
                result = sync_directory(&shared.dir).await.map_err(StorageError::into_io);
                if result.is_err() {
                    shared.directory_sync_pending.set(true);
                }
            }
            let delay = crate::handles::flusher_sync_delay();
            if result.is_ok() && !delay.is_zero() {
                glommio::timer::sleep(delay).await;
            }
            if result.is_ok() {
                result = match segment.file().await {
                    Ok(file) => {
                        let started = Instant::now();
                        let synced = file.fdatasync().await.map_err(glommio_io);
                        crate::metrics::count(|c| c.fsync.observe(started.elapsed()));
                        synced
                    }
                    Err(error) => Err(error.into_io()),
                };
            }
            (segment, mark, generation, result)
        }));
    }

    async fn sync_done(
        &mut self,
        segment: &Rc<SegmentFile>,
        mark: Mark,
        generation: u64,
        result: std::io::Result<()>,
    ) {
        let shared = self.shared.clone();
        match result {
            // A truncation or reset replaced what this sync covered: its mark means nothing now
            // (it may lie past the new end, and a checkpoint from it past the file's end).
            Ok(()) if generation != shared.state.borrow().generation => {}
            Ok(()) => {
                let checkpoint_due = {
                    let mut state = shared.state.borrow_mut();
                    if mark.offset > state.synced.offset {
                        state.synced = mark;
                    }
                    state.last_sync = Instant::now();
                    if shared.config.get().fsync.is_always() {
                        state.advance_visible(mark);
                    }
                    state.resolve_barriers();
                    state
                        .last_checkpoint
                        .is_none_or(|at| at.elapsed() >= shared.config.get().checkpoint_interval)
                };
                if checkpoint_due
                    && shared.seals_pending.get() == 0
                    && Rc::ptr_eq(segment, &shared.state.borrow().active.file)
                {
                    shared.checkpoint_busy.set(true);
                    // Not synced: the sync just done covers the data, and the segment's directory
                    // entry was synced before it (`start_sync`, `directory_sync_pending`).
                    let result = shared.write_checkpoint(segment.base_offset(), mark.position, false).await;
                    shared.checkpoint_busy.set(false);
                    if let Err(error) = result {
                        // A stale checkpoint only makes recovery more lenient.
                        tracing::warn!(%error, "could not write the recovery checkpoint");
                    }
                }
            }
            Err(error) => {
                let error = StorageError::io("syncing", segment.path(), error);
                tracing::error!(%error, "fdatasync failed; the log refuses further writes until reopened");
                shared.state.borrow_mut().fail(error);
            }
        }
        shared.progress.notify_all();
    }

    /// A write failed (a full disk, an I/O error) and nothing is in flight any more. Nothing
    /// after the written mark was acknowledged: forget it all, give its offsets back and cut the
    /// file to the written mark, so the next append starts cleanly. The log stays usable.
    async fn recover_from_write_failure(&mut self) {
        let error = self.failure.take().expect("a failure to recover from");
        let shared = self.shared.clone();
        let (segment, written) = {
            let state = shared.state.borrow();
            (state.active.file.clone(), state.written)
        };
        let tail = async {
            let block = align_down(written.position);
            let tail = if block == written.position {
                Vec::new()
            } else {
                segment.read(block, (written.position - block) as usize).await?.to_vec()
            };
            segment.truncate(written.position).await?;
            Ok::<_, StorageError>(tail)
        }
        .await;
        let mut state = shared.state.borrow_mut();
        let tail_block = match tail {
            Ok(tail_block) => tail_block,
            Err(cleanup_error) => {
                tracing::error!(%cleanup_error, "could not cut the segment back after a failed write");
                state.fail(cleanup_error);
                drop(state);
                shared.progress.notify_all();
                return;
            }
        };
        tracing::warn!(path = %segment.path().display(), %error, offset = written.offset, "write failed; unacknowledged appends dropped");
        state.active.appender.reset(written.position, tail_block);
        state.active.allocated = written.position;
        shared.account_ahead(0);
        state.next_offset = written.offset;
        state.active.max_timestamp = written.max_timestamp;
        state.active.index.retain(|entry| u64::from(entry.position) < written.position);
        state.cache.truncate(written.offset);
        state.epochs.truncate_from_end(written.offset);
        let aborted = StorageError::WriteAborted(Arc::new(error));
        while state.acks.back().is_some_and(|ack| ack.next_offset > written.offset) {
            let ack = state.acks.pop_back().expect("back exists");
            let _ = ack.reply.send(Err(aborted.clone()));
        }
        let mut index = 0;
        while index < state.barriers.len() {
            if state.barriers[index].next_offset > written.offset {
                let barrier = state.barriers.swap_remove(index);
                let _ = barrier.reply.send(Err(aborted.clone()));
            } else {
                index += 1;
            }
        }
        drop(state);
        shared.progress.notify_all();
    }
}
