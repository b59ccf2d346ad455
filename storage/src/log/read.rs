//! Reads: the tail cache, stable file ranges, O_DIRECT reads with read-ahead, verified reads and
//! timestamp lookups.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::recovery::rebuild_index;
use super::{
    Log, ReadAhead, ReadData, ReadSlice, SharedRead, READ_AHEAD_BYTES_MAX, READ_AHEAD_BYTES_MIN,
    READ_AHEAD_PIECE_BYTES,
};
use crate::batch;
use crate::error::{glommio_io, CorruptionKind, Result, StorageError};
use crate::files::{IndexEntry, SEGMENT_HEADER_BYTES};
use crate::handles;
use crate::segment::{self, SegmentFile};

impl Log {
    /// Waits until the visible offset moves past `offset` or `timeout` passes; returns the
    /// visible offset. Long-poll fetches use it.
    pub async fn wait_for_data(&self, offset: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let visible = self.visible_offset();
            let now = Instant::now();
            if visible > offset || now >= deadline || self.shared.state.borrow().closing {
                return visible;
            }
            let progress = std::pin::pin!(self.shared.progress.notified());
            let sleep = std::pin::pin!(glommio::timer::sleep(deadline - now));
            futures::future::select(progress, sleep).await;
        }
    }

    pub(super) async fn sealed_index(&self, base: u64) -> Result<Rc<Vec<IndexEntry>>> {
        let shared = &self.shared;
        let (file, summary) = {
            let mut state = shared.state.borrow_mut();
            let sealed = state.sealed.get(&base).ok_or(StorageError::OffsetOutOfRange {
                offset: base,
                start: state.start_offset(),
                end: state.visible.offset,
            })?;
            if let Some(index) = sealed.index.clone() {
                state.touch_loaded(base, shared.config.get().loaded_indexes_max);
                return Ok(index);
            }
            (sealed.file.clone(), sealed.summary.clone())
        };
        let entries = match segment::load_index(&file, summary.log_bytes).await? {
            Ok((_, entries)) => entries,
            Err(reason) => rebuild_index(&file, &shared.config.get(), &reason).await?.1,
        };
        let entries = Rc::new(entries);
        let mut state = shared.state.borrow_mut();
        if let Some(sealed) = state.sealed.get_mut(&base) {
            sealed.index = Some(entries.clone());
            state.touch_loaded(base, shared.config.get().loaded_indexes_max);
        }
        Ok(entries)
    }

    /// Reads whole batches from the one that holds `offset`, up to `bytes_max` (but always at
    /// least that one batch). At the end of the visible log, returns an empty slice.
    pub async fn read(&self, offset: u64, bytes_max: usize) -> Result<ReadSlice> {
        loop {
            let generation = self.shared.state.borrow().generation;
            let slice = self.read_once(offset, bytes_max).await?;
            if self.shared.state.borrow().generation == generation {
                return Ok(slice);
            }
        }
    }

    /// The bytes of a file range that [`Log::read`] returned ([`ReadData::File`]), read with
    /// O_DIRECT in one read; and, in the background, the bytes after it, up to four times as
    /// much again (at most [`READ_AHEAD_BYTES_MAX`] ahead, within the shard's read-ahead
    /// budget). A consumer reading on finds its next range in memory while
    /// the disk is already busy with the one after; each byte is read once. This is the path for
    /// ranges not in the page cache, which with O_DIRECT writes is every range not read before:
    /// a `sendfile` of them reads synchronously in small pieces.
    ///
    /// No copy on the way: the returned bytes own the DMA buffers the device wrote (and may
    /// cross shards); one only when a range spans two read-ahead pieces (see
    /// [`Log::read_file_parts`], which leaves them apart).
    pub async fn read_file(&self, segment: &Rc<SegmentFile>, position: u64, len: usize) -> Result<Bytes> {
        let mut parts = self.read_file_parts(segment, position, len).await?;
        Ok(if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            let mut joined = BytesMut::with_capacity(len);
            for part in &parts {
                joined.extend_from_slice(part);
            }
            joined.freeze()
        })
    }

    /// [`Log::read_file`] as the consecutive parts the reads filled (slices of the read-ahead
    /// pieces, and of one read of what they did not hold), not joined: a fetch response writes
    /// them out in order. A fetch of 4 MiB at any offset spans three 2 MiB pieces, and joining
    /// them was a copy of every byte on the fetch's way, before its first byte could be sent
    /// (`perf`: `memmove` 7.6 % of a cold consume's samples on each shard).
    pub async fn read_file_parts(
        &self,
        segment: &Rc<SegmentFile>,
        position: u64,
        len: usize,
    ) -> Result<Vec<Bytes>> {
        let end = position + len as u64;
        let (stream, pieces): (u64, Vec<(u64, u64, SharedRead)>) = {
            let mut ahead = self.shared.read_ahead.borrow_mut();
            let stream = ahead.stream_at(segment.base_offset(), position);
            // Set now: a read pipelined behind this one (at `end`) continues this stream.
            stream.next = stream.next.max(end);
            let pieces = stream
                .pieces
                .iter()
                .filter(|r| r.start < end)
                .map(|r| (r.start, r.end, r.data.clone()))
                .collect();
            (stream.id, pieces)
        };
        tracing::trace!(position, len, pieces = pieces.len(), "read_file");
        let mut parts: Vec<Bytes> = Vec::new();
        let mut at = position;
        for (start, piece_end, data) in pieces {
            match data.await {
                Ok(bytes) if start <= at && at < piece_end => {
                    let upto = end.min(piece_end);
                    parts.push(bytes.slice((at - start) as usize..(upto - start) as usize));
                    at = upto;
                }
                _ => break,
            }
        }
        if at < end {
            // In reads no longer than the bound on reads in flight (a block multiple), cut at
            // block-aligned positions so that no two read the same block, issued together:
            // they go to the device as the bound lets them.
            let chunk = handles::read_in_flight_max().map_or(u64::MAX, |max| max as u64);
            let mut reads = Vec::new();
            let mut from = at;
            while from < end {
                let to = cut_after(from, chunk, end);
                reads.push(read_direct(segment, from, (to - from) as usize));
                from = to;
            }
            parts.extend(futures::future::try_join_all(reads).await?);
        }
        self.read_ahead(stream, segment, end, (4 * len).clamp(READ_AHEAD_BYTES_MIN, READ_AHEAD_BYTES_MAX));
        Ok(parts)
    }

    /// [`SegmentFile::find_batch`] within what was read ahead: the batch of the segment based at
    /// `base` that holds `offset`, scanning headers forward from `position` but not past `end`,
    /// in the read-ahead pieces (waiting for one still being read: its bytes are the ones the
    /// fetch sends next anyway). `None` when a header it needs is in no piece (or does not
    /// parse, or its read failed: the disk's scan then reports it, with its position).
    async fn find_batch_read_ahead(
        &self,
        base: u64,
        mut position: u64,
        offset: u64,
        end: u64,
        size_max: usize,
    ) -> Option<(u64, batch::BatchHeader)> {
        loop {
            if position >= end {
                return None;
            }
            let (start, data) = self.shared.read_ahead.borrow().piece_at(base, position)?;
            let bytes = data.await.ok()?;
            match segment::scan_headers(&bytes[(position - start) as usize..], offset, size_max) {
                segment::HeaderScan::Found(at, header) => return Some((position + at as u64, header)),
                // A header that straddles the piece's end is left to the disk.
                segment::HeaderScan::Beyond(0) | segment::HeaderScan::Bad(..) => return None,
                segment::HeaderScan::Beyond(at) => position += at as u64,
            }
        }
    }

    /// Drops the log's read-ahead streams as they go idle ([`super::READ_AHEAD_IDLE`]), in a
    /// task that ends when none is left (or the log is gone).
    fn sweep_read_ahead(&self) {
        let shared = Rc::downgrade(&self.shared);
        glommio::spawn_local(async move {
            loop {
                let wait = {
                    let Some(shared) = shared.upgrade() else { return };
                    let mut ahead = shared.read_ahead.borrow_mut();
                    match ahead.drop_idle(Instant::now()) {
                        Some(wait) => wait,
                        None => {
                            ahead.sweeping = false;
                            return;
                        }
                    }
                };
                glommio::timer::sleep(wait).await;
            }
        })
        .detach();
    }

    /// Extends what the read-ahead stream `stream` holds of `segment` to `want` bytes past
    /// `from`, in background reads of [`READ_AHEAD_PIECE_BYTES`], within the segment's stable
    /// bytes and the shard's read-ahead budget. Nothing if the stream was dropped meanwhile.
    fn read_ahead(&self, stream: u64, segment: &Rc<SegmentFile>, from: u64, want: usize) {
        let shared = &self.shared;
        let stable_end = {
            let state = shared.state.borrow();
            let base = segment.base_offset();
            match state.sealed.get(&base) {
                Some(sealed) => sealed.summary.log_bytes,
                None if state.active.file.base_offset() == base => state.stable_position(),
                None => 0,
            }
        };
        let target = (from + want as u64).min(stable_end);
        let mut ahead = shared.read_ahead.borrow_mut();
        let Some(stream) = ahead.get(stream) else { return };
        let mut frontier = stream.pieces.back().map_or(from, |last| last.end.max(from));
        let piece_bytes = READ_AHEAD_PIECE_BYTES.min(handles::read_in_flight_max().unwrap_or(usize::MAX));
        while frontier < target {
            let len = (cut_after(frontier, piece_bytes as u64, target) - frontier) as usize;
            if !handles::reserve_read_ahead(len) {
                break;
            }
            let file = segment.clone();
            let start = frontier;
            let task =
                glommio::spawn_local(async move { read_direct(&file, start, len).await.map_err(Arc::new) });
            stream.pieces.push_back(ReadAhead {
                start,
                end: start + len as u64,
                data: futures::FutureExt::shared(task),
            });
            frontier += len as u64;
        }
        // Whatever asked for them (a range read, or a cold read's start), the stream and its
        // pieces are dropped once idle, so they give their budget back.
        let start_sweeper = !std::mem::replace(&mut ahead.sweeping, true);
        drop(ahead);
        if start_sweeper {
            self.sweep_read_ahead();
        }
    }

    async fn read_once(&self, offset: u64, bytes_max: usize) -> Result<ReadSlice> {
        let shared = &self.shared;
        let size_max = batch::BATCH_BYTES_LIMIT;
        let sealed_base = {
            let state = shared.state.borrow();
            let start = state.start_offset();
            let visible = state.visible.offset;
            if offset < start || offset > visible {
                return Err(StorageError::OffsetOutOfRange { offset, start, end: visible });
            }
            if offset == visible {
                return Ok(ReadSlice::empty(offset));
            }
            if let Some((chunks, first_offset, next_offset)) = state.cache.read(offset, bytes_max, visible) {
                crate::metrics::count(|c| c.cache_reads += 1);
                return Ok(ReadSlice { first_offset, next_offset, data: ReadData::Memory(chunks) });
            }
            crate::metrics::count(|c| c.file_reads += 1);
            if offset >= state.active.file.base_offset() {
                None
            } else {
                Some(*state.sealed.range(..=offset).next_back().expect("offset ≥ start").0)
            }
        };
        // (segment, its index if sealed, where the readable data ends: position and offset,
        // where the bytes that will not be written again end). The active segment's index is
        // not copied: it is looked at in place, before and after the await (entries below the
        // readable end never change; a truncation bumps the generation and the read restarts).
        let (segment, sealed_index, data_end, stable) = match sealed_base {
            Some(base) => {
                let index = self.sealed_index(base).await?;
                let state = shared.state.borrow();
                let Some(sealed) = state.sealed.get(&base) else {
                    // Deleted by retention meanwhile.
                    return Err(StorageError::OffsetOutOfRange {
                        offset,
                        start: state.start_offset(),
                        end: state.visible.offset,
                    });
                };
                let end = (sealed.summary.log_bytes, sealed.summary.next_offset);
                (sealed.file.clone(), Some(index), end, end.0)
            }
            None => {
                let state = shared.state.borrow();
                let active_base = state.active.file.base_offset();
                let mut end = (state.visible.position, state.visible.offset);
                if let Some(first) = state.cache.first().filter(|first| first.segment_base == active_base) {
                    if first.position < end.0 {
                        end = (first.position, first.base_offset);
                    }
                }
                (state.active.file.clone(), None, end, state.stable_position())
            }
        };
        let with_index = |f: &mut dyn FnMut(&[IndexEntry]) -> (u64, u64)| -> (u64, u64) {
            match &sealed_index {
                Some(index) => f(index),
                None => {
                    let state = shared.state.borrow();
                    if Rc::ptr_eq(&state.active.file, &segment) {
                        f(&state.active.index)
                    } else {
                        // Rolled meanwhile: the index moved to the sealed segment.
                        let moved = state.sealed.get(&segment.base_offset()).and_then(|s| s.index.clone());
                        f(moved.as_deref().map_or(&[], |v| v.as_slice()))
                    }
                }
            }
        };
        let base = segment.base_offset();
        let relative = (offset - base) as u32;
        let (start_position, _) = with_index(&mut |index| {
            let entry_index = index.partition_point(|entry| entry.relative_offset <= relative);
            let position = if entry_index == 0 {
                SEGMENT_HEADER_BYTES
            } else {
                u64::from(index[entry_index - 1].position)
            };
            (position, 0)
        });
        // A consumer reading on starts where its last read ended (the cursor: a batch start
        // past the index entry), in bytes read ahead for it, so its first header comes from
        // memory. The disk's scan is for the rest: a header read queued behind the read-ahead's
        // large reads took 0.81 of the 0.87 ms per partition a cold fetch spent before its bytes
        // were ready.
        let generation = shared.state.borrow().generation;
        let index_position = start_position;
        let start_position = shared
            .read_cursors
            .borrow()
            .iter()
            .filter(|cursor| {
                cursor.generation == generation
                    && cursor.segment_base == base
                    && cursor.next_offset <= offset
                    && cursor.position > index_position
                    && cursor.position < data_end.0
            })
            .max_by_key(|cursor| cursor.next_offset)
            .map_or(index_position, |cursor| cursor.position);
        // Cold (nothing read ahead holds the start): the bytes from there on are read as the
        // start of a read-ahead stream, in which the header scan below finds the first batch and
        // which the fetch's range then comes from. A scan of the disk read the blocks at the
        // start on their own, and the range's read read them again: twice the bytes of a
        // partition of a few KiB (a consumer of 10,000 of them after a restart).
        if start_position < stable && self.shared.read_ahead.borrow().piece_at(base, start_position).is_none()
        {
            let stream = self.shared.read_ahead.borrow_mut().stream_at(base, start_position).id;
            self.read_ahead(
                stream,
                &segment,
                start_position,
                bytes_max.clamp(READ_AHEAD_BYTES_MIN, READ_AHEAD_BYTES_MAX),
            );
        }
        let found = self.find_batch_read_ahead(base, start_position, offset, data_end.0, size_max).await;
        let (position, header) = match found {
            Some(found) => found,
            None => segment.find_batch(start_position, offset, data_end.0, size_max).await?,
        };
        let first_end = (position + header.total_bytes() as u64, header.next_offset());
        if first_end.0 > stable {
            // The batch reaches into the block the next write will rewrite, and the cache does
            // not hold it (just after open or truncation): read it with O_DIRECT instead of
            // handing out a page-cache range.
            let end = with_index(&mut |index| {
                batch_boundary(index, base, position, bytes_max, data_end, first_end)
            });
            let bytes = segment.read(position, (end.0 - position) as usize).await?;
            return Ok(ReadSlice {
                first_offset: header.base_offset,
                next_offset: end.1,
                data: ReadData::Memory(vec![bytes]),
            });
        }
        if first_end.0 < data_end.0
            && data_end.0 > stable
            && data_end.0 <= position.saturating_add(bytes_max as u64)
        {
            // The rest of the data fits this read and ends in the block the next write will
            // rewrite, and the sparse index knows no batch start past the first batch below
            // the stable end (small batches since its last entry): a file range could only
            // cover the first batch, so a cold tail of small batches would go out one batch per
            // fetch. Read it all with O_DIRECT instead, as for a batch that reaches that block,
            // taking what the read-ahead already holds from there (the read of the range before
            // read ahead to the stable end: reading it again doubled the bytes read).
            let known = with_index(&mut |index| boundary_at_or_before(index, base, stable, first_end));
            if known == first_end {
                // Joined (`read_file`), not parts cut at blocks: memory chunks hold whole batches
                // (a reader below an upper bound parses each one). A copy of the first batch and
                // the few KiB after it at most: the index knows no batch start in between.
                let bytes = self.read_file(&segment, position, (data_end.0 - position) as usize).await?;
                return Ok(ReadSlice {
                    first_offset: header.base_offset,
                    next_offset: data_end.1,
                    data: ReadData::Memory(vec![bytes]),
                });
            }
        }
        let end = with_index(&mut |index| {
            let stable_end = if data_end.0 <= stable {
                data_end
            } else {
                boundary_at_or_before(index, base, stable, first_end)
            };
            batch_boundary(index, base, position, bytes_max, stable_end, first_end)
        });
        assert!(end.0 <= data_end.0 && end.0 <= stable, "a file range covers only readable, stable bytes");
        {
            // This consumer's cursor moves on (it started at one, or where its last read
            // ended); a new consumer's goes in front, the oldest beyond the most dropped.
            let mut cursors = shared.read_cursors.borrow_mut();
            cursors.retain(|cursor| {
                cursor.generation == generation
                    && !(cursor.segment_base == base && cursor.position == start_position)
            });
            cursors.push_front(super::ReadCursor {
                generation,
                segment_base: base,
                position: end.0,
                next_offset: end.1,
            });
            cursors.truncate(super::READ_AHEAD_STREAMS_MAX);
        }
        Ok(ReadSlice {
            first_offset: header.base_offset,
            next_offset: end.1,
            data: ReadData::File { segment, position, len: (end.0 - position) as u32 },
        })
    }

    /// Like [`Log::read`], but returns the bytes and checks every batch's CRC and offsets, so
    /// corruption on disk is reported (with file and position) instead of served.
    pub async fn read_verified(&self, offset: u64, bytes_max: usize) -> Result<(Bytes, u64)> {
        let slice = self.read(offset, bytes_max).await?;
        let next_offset = slice.next_offset;
        let origin = match &slice.data {
            ReadData::File { segment, position, .. } => Some((segment.clone(), *position)),
            _ => None,
        };
        let bytes = slice.clone().into_bytes().await?;
        let mut at = 0usize;
        let mut expected = slice.first_offset;
        while at < bytes.len() {
            let checked = batch::validate(&bytes[at..], batch::BATCH_BYTES_LIMIT)
                .map_err(CorruptionKind::Batch)
                .and_then(|header| {
                    if header.base_offset == expected {
                        Ok(header)
                    } else {
                        Err(CorruptionKind::OffsetGap { expected, found: header.base_offset })
                    }
                });
            match checked {
                Ok(header) => {
                    expected = header.next_offset();
                    at += header.total_bytes();
                }
                Err(kind) => {
                    let (path, position) = match &origin {
                        Some((segment, position)) => (segment.path().to_path_buf(), position + at as u64),
                        None => (PathBuf::from("<tail cache>"), at as u64),
                    };
                    return Err(StorageError::Corruption { path, position, kind });
                }
            }
        }
        Ok((bytes, next_offset))
    }

    /// The first offset whose record timestamp is at or after `timestamp` (Kafka's
    /// ListOffsets by time), or `None` if every visible record is older.
    pub async fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<u64>> {
        let size_max = batch::BATCH_BYTES_LIMIT;
        let candidates: Vec<(u64, bool)> = {
            let state = self.shared.state.borrow();
            state
                .sealed
                .iter()
                .filter(|(_, sealed)| sealed.summary.max_timestamp >= timestamp)
                .map(|(&base, _)| (base, true))
                .chain(
                    (state.active.max_timestamp >= timestamp)
                        .then_some((state.active.file.base_offset(), false)),
                )
                .collect()
        };
        for (base, is_sealed) in candidates {
            let (segment, index, end) = if is_sealed {
                let index = self.sealed_index(base).await?;
                let state = self.shared.state.borrow();
                let Some(sealed) = state.sealed.get(&base) else { continue };
                (sealed.file.clone(), index, sealed.summary.log_bytes)
            } else {
                let state = self.shared.state.borrow();
                if state.active.file.base_offset() != base {
                    continue;
                }
                (state.active.file.clone(), Rc::new(state.active.index.clone()), state.visible.position)
            };
            let from = index.partition_point(|entry| entry.max_timestamp_before < timestamp);
            let mut position =
                if from == 0 { SEGMENT_HEADER_BYTES } else { u64::from(index[from - 1].position) };
            while position < end {
                let (at, header) = segment.find_batch(position, 0, end, size_max).await?;
                if header.max_timestamp >= timestamp {
                    let bytes = segment.read(at, header.total_bytes()).await?;
                    let (batch, _) = batch::Batch::from_bytes(bytes, size_max)
                        .map_err(|e| segment.corruption(at, CorruptionKind::Batch(e)))?;
                    for record in batch.records() {
                        let record = record.map_err(|e| segment.corruption(at, CorruptionKind::Batch(e)))?;
                        if record.timestamp >= timestamp {
                            return Ok(Some(record.offset));
                        }
                    }
                }
                position = at + header.total_bytes() as u64;
            }
        }
        Ok(None)
    }
}

/// The end of a read that starts at `position`: whole batches, at most `bytes_max` bytes unless
/// the first batch alone is larger, never past `data_end`.
fn batch_boundary(
    index: &[IndexEntry],
    base: u64,
    position: u64,
    bytes_max: usize,
    data_end: (u64, u64),
    first_end: (u64, u64),
) -> (u64, u64) {
    let limit = position.saturating_add(bytes_max as u64);
    if data_end.0 <= limit {
        return data_end.max(first_end);
    }
    boundary_at_or_before(index, base, limit, first_end)
}

/// The last batch boundary at or before `limit` that the sparse index knows (its entries are
/// batch starts, so no header needs reading), but at least `first_end`.
fn boundary_at_or_before(index: &[IndexEntry], base: u64, limit: u64, first_end: (u64, u64)) -> (u64, u64) {
    let last = index.partition_point(|entry| u64::from(entry.position) <= limit);
    match last.checked_sub(1).map(|at| index[at]) {
        Some(entry) if u64::from(entry.position) > first_end.0 => {
            (u64::from(entry.position), base + u64::from(entry.relative_offset))
        }
        _ => first_end,
    }
}

/// Reads `[position, position + len)` of a segment with O_DIRECT, in one read into an aligned
/// buffer of its own (glommio patch 5, `DmaFile::read_at_owned`), which the returned bytes
/// keep: no copy out of the DMA buffer, and the bytes may cross shards. The kernel splits the
/// read into the device's largest requests and issues them together (`fio` on this machine:
/// 2 MiB reads at depth 2 as fast as 512 KiB reads at depth 8).
/// Where a read of at most `bytes` (a block multiple) from `from` ends, `end` at the latest: on
/// a block boundary unless at `end`, so that consecutive reads never read the same block.
fn cut_after(from: u64, bytes: u64, end: u64) -> u64 {
    crate::io::align_down(from).saturating_add(bytes).min(end)
}

async fn read_direct(segment: &SegmentFile, position: u64, len: usize) -> Result<Bytes> {
    if len == 0 {
        // No buffer to read into (an allocation of 0 bytes is refused).
        return Ok(Bytes::new());
    }
    let _in_flight = handles::read_in_flight(len).await;
    let file = segment.file().await?;
    crate::metrics::count(|c| c.direct_read_bytes += len as u64);
    let read = file
        .read_at_owned(position, len)
        .await
        .map_err(|e| StorageError::io("reading", segment.path(), glommio_io(e)))?;
    if read.as_bytes().len() < len {
        let short = position + read.as_bytes().len() as u64;
        return Err(segment.corruption(short, CorruptionKind::PastEnd { end: short }));
    }
    Ok(Bytes::from_owner(read))
}
