//! Idempotent producers: the per-partition table of producer ids, their epochs and the last
//! batches they wrote, which turns a retried batch into its original offsets instead of a
//! duplicate.
//!
//! # Rules (checked on the partition's shard before a batch is appended)
//! * A batch with `producer_id = -1` is not idempotent and is always appended.
//! * Unknown producer id: the batch must start at sequence 0 (else `OutOfOrderSequence`: its
//!   first batch may still be on its way).
//! * Older epoch than the table's: `ProducerFenced`. Newer epoch: the sequence restarts at 0.
//! * Same epoch: a batch equal (first and last sequence) to one of the last
//!   [`BATCHES_KEPT`] batches is a **duplicate**: the original offsets are returned and nothing
//!   is written. A batch that starts right after the last one is appended. A batch older than
//!   those kept is `DuplicateSequence`; one with a gap is `OutOfOrderSequence` (retriable: an
//!   earlier batch is being retried).
//!
//! # Persistence
//! The table is a function of the log: every idempotent batch carries its producer id, epoch
//! and sequences in its header. On open, the table is loaded from the newest snapshot that the
//! log still covers and brought up to date by scanning the batch headers after it. Snapshots
//! are written every [`SNAPSHOT_INTERVAL_BYTES`] of appends and on shutdown, into the partition
//! directory as `<20-digit offset>.producers` (the table covers every batch below that offset);
//! the newest [`SNAPSHOTS_KEPT`] are kept. A snapshot that fails its checks is ignored (logged)
//! and the log is scanned from an older one or from its start: the table can always be rebuilt.
//!
//! | offset | size | field | notes |
//! |-------:|-----:|-------|-------|
//! | 0  | 4 | magic | `"SKPS"` |
//! | 4  | 2 | version u16 | 1 |
//! | 6  | 2 | reserved | 0 |
//! | 8  | 8 | offset u64 | the table covers every batch below it |
//! | 16 | 4 | entry count u32 | |
//! | 20 | 4 | crc u32 | CRC32C of bytes 0–19 and of every byte after the header |
//! | 24 | … | entries | per producer: id i64, epoch i16, batch count u16, last update ms i64, then per batch: first sequence i32, last sequence i32, base offset u64, last offset u64 |
//!
//! All integers little-endian.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use skein_net::ErrorCode;
use skein_storage::batch::{BatchHeader, BATCH_HEADER_BYTES};
use skein_storage::{Log, StorageError};

pub const SNAPSHOT_MAGIC: [u8; 4] = *b"SKPS";
pub const SNAPSHOT_VERSION: u16 = 1;
const HEADER_BYTES: usize = 24;
const EXTENSION: &str = "producers";
/// Batches remembered per producer and partition for duplicate detection. The client keeps at
/// most this many batches of a partition in flight (`skein_net::IDEMPOTENCE_WINDOW`), so any
/// retry finds its batch here (Kafka keeps 5, with at most 5 requests of one batch each).
pub const BATCHES_KEPT: usize = skein_net::IDEMPOTENCE_WINDOW;
/// Appended bytes between two snapshots: bounds the scan after a crash.
pub const SNAPSHOT_INTERVAL_BYTES: u64 = 64 << 20;
pub const SNAPSHOTS_KEPT: usize = 2;
/// A producer that wrote nothing for this long is forgotten (Kafka's default too); checked
/// with retention and at every snapshot.
pub const PRODUCER_EXPIRY_MS: i64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    pub first_sequence: i32,
    pub last_sequence: i32,
    pub base_offset: u64,
    pub last_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerEntry {
    pub epoch: i16,
    pub batches: VecDeque<BatchMeta>,
    pub last_update_ms: i64,
}

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Append,
    /// Already written at these offsets.
    Duplicate {
        base_offset: u64,
        last_offset: u64,
    },
    Reject(ErrorCode),
}

fn last_sequence(header: &BatchHeader) -> i32 {
    header.base_sequence.wrapping_add(header.last_offset_delta as i32)
}

/// The producer table of one partition. Lives on the partition's shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerTable {
    entries: HashMap<i64, ProducerEntry>,
    /// Bytes appended since the last snapshot.
    pub bytes_since_snapshot: u64,
}

impl ProducerTable {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.entries.get(&producer_id)
    }

    pub fn check(&self, header: &BatchHeader) -> Check {
        if header.producer_id < 0 {
            return Check::Append;
        }
        let Some(entry) = self.entries.get(&header.producer_id) else {
            // A later batch of a new producer can arrive before its first one (a reconnect
            // reorders retries): retriable; a producer the table really forgot gives up after
            // its retries and moves to a new epoch.
            return if header.base_sequence == 0 {
                Check::Append
            } else {
                Check::Reject(ErrorCode::OutOfOrderSequence)
            };
        };
        if header.producer_epoch < entry.epoch {
            return Check::Reject(ErrorCode::ProducerFenced);
        }
        if header.producer_epoch > entry.epoch {
            return if header.base_sequence == 0 {
                Check::Append
            } else {
                Check::Reject(ErrorCode::OutOfOrderSequence)
            };
        }
        let last = last_sequence(header);
        if let Some(batch) =
            entry.batches.iter().find(|b| b.first_sequence == header.base_sequence && b.last_sequence == last)
        {
            return Check::Duplicate { base_offset: batch.base_offset, last_offset: batch.last_offset };
        }
        let Some(newest) = entry.batches.back() else {
            return Check::Append;
        };
        if header.base_sequence == newest.last_sequence.wrapping_add(1) {
            Check::Append
        } else if header.base_sequence.wrapping_sub(newest.last_sequence) <= 0 {
            Check::Reject(ErrorCode::DuplicateSequence)
        } else {
            Check::Reject(ErrorCode::OutOfOrderSequence)
        }
    }

    /// Checks every batch of one request before any is appended, as if the earlier ones had
    /// been appended: a request is written whole or not at all. A batch that repeats an
    /// earlier one of the same request is refused.
    pub fn check_all(&self, headers: &[BatchHeader]) -> Vec<Check> {
        // Offsets of batches only appended in the overlay (far from any real offset, and far
        // enough from u64::MAX that `record` can add the batch length).
        const PENDING: u64 = u64::MAX / 2;
        let mut overlay = ProducerTable::default();
        for header in headers {
            if let Some(entry) = self.entries.get(&header.producer_id) {
                overlay.entries.entry(header.producer_id).or_insert_with(|| entry.clone());
            }
        }
        headers
            .iter()
            .map(|header| match overlay.check(header) {
                Check::Append => {
                    overlay.record(header, PENDING, 0);
                    Check::Append
                }
                Check::Duplicate { base_offset: PENDING, .. } => Check::Reject(ErrorCode::DuplicateSequence),
                other => other,
            })
            .collect()
    }

    /// Records a batch just appended at `base_offset` (or read back from the log).
    pub fn record(&mut self, header: &BatchHeader, base_offset: u64, now_ms: i64) {
        self.bytes_since_snapshot += header.total_bytes() as u64;
        if header.producer_id < 0 {
            return;
        }
        let entry = self.entries.entry(header.producer_id).or_insert_with(|| ProducerEntry {
            epoch: header.producer_epoch,
            batches: VecDeque::new(),
            last_update_ms: now_ms,
        });
        if header.producer_epoch != entry.epoch {
            entry.epoch = header.producer_epoch;
            entry.batches.clear();
        }
        entry.last_update_ms = entry.last_update_ms.max(now_ms);
        entry.batches.push_back(BatchMeta {
            first_sequence: header.base_sequence,
            last_sequence: last_sequence(header),
            base_offset,
            last_offset: base_offset + u64::from(header.last_offset_delta),
        });
        while entry.batches.len() > BATCHES_KEPT {
            entry.batches.pop_front();
        }
    }

    /// Forgets producers idle since before `now_ms - PRODUCER_EXPIRY_MS`.
    pub fn expire(&mut self, now_ms: i64) {
        self.entries.retain(|_, entry| entry.last_update_ms >= now_ms.saturating_sub(PRODUCER_EXPIRY_MS));
    }

    /// The snapshot file's bytes, for a table that covers every batch below `offset`.
    pub fn encode(&self, offset: u64) -> Vec<u8> {
        let mut body = Vec::new();
        let mut ids: Vec<&i64> = self.entries.keys().collect();
        ids.sort_unstable();
        for id in ids {
            let entry = &self.entries[id];
            body.extend_from_slice(&id.to_le_bytes());
            body.extend_from_slice(&entry.epoch.to_le_bytes());
            body.extend_from_slice(&(entry.batches.len() as u16).to_le_bytes());
            body.extend_from_slice(&entry.last_update_ms.to_le_bytes());
            for batch in &entry.batches {
                body.extend_from_slice(&batch.first_sequence.to_le_bytes());
                body.extend_from_slice(&batch.last_sequence.to_le_bytes());
                body.extend_from_slice(&batch.base_offset.to_le_bytes());
                body.extend_from_slice(&batch.last_offset.to_le_bytes());
            }
        }
        let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len());
        bytes.extend_from_slice(&SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes), &body);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&body);
        bytes
    }

    /// Decodes a snapshot file: the table and the offset it covers up to.
    pub fn decode(bytes: &[u8]) -> Result<(ProducerTable, u64), String> {
        if bytes.len() < HEADER_BYTES {
            return Err(format!("{} bytes, shorter than the {HEADER_BYTES}-byte header", bytes.len()));
        }
        if bytes[0..4] != SNAPSHOT_MAGIC {
            return Err("bad magic".into());
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != SNAPSHOT_VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let offset = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
        let body = &bytes[HEADER_BYTES..];
        if crc32c::crc32c_append(crc32c::crc32c(&bytes[..20]), body) != crc {
            return Err("CRC mismatch".into());
        }
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let slice =
                body.get(at..at + n).ok_or_else(|| format!("truncated at byte {}", HEADER_BYTES + at))?;
            at += n;
            Ok(slice)
        };
        let mut table = ProducerTable::default();
        for _ in 0..count {
            let id = i64::from_le_bytes(take(8)?.try_into().expect("8"));
            let epoch = i16::from_le_bytes(take(2)?.try_into().expect("2"));
            let batches = u16::from_le_bytes(take(2)?.try_into().expect("2")) as usize;
            let last_update_ms = i64::from_le_bytes(take(8)?.try_into().expect("8"));
            if batches > BATCHES_KEPT {
                return Err(format!("producer {id} has {batches} batches (at most {BATCHES_KEPT})"));
            }
            let mut entry =
                ProducerEntry { epoch, batches: VecDeque::with_capacity(batches), last_update_ms };
            for _ in 0..batches {
                entry.batches.push_back(BatchMeta {
                    first_sequence: i32::from_le_bytes(take(4)?.try_into().expect("4")),
                    last_sequence: i32::from_le_bytes(take(4)?.try_into().expect("4")),
                    base_offset: u64::from_le_bytes(take(8)?.try_into().expect("8")),
                    last_offset: u64::from_le_bytes(take(8)?.try_into().expect("8")),
                });
            }
            table.entries.insert(id, entry);
        }
        if at != body.len() {
            return Err(format!("{} bytes after the last entry", body.len() - at));
        }
        Ok((table, offset))
    }
}

fn snapshot_path(dir: &Path, offset: u64) -> PathBuf {
    dir.join(format!("{offset:020}.{EXTENSION}"))
}

/// Snapshot files in `dir`, by offset, oldest first.
fn snapshot_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(&format!(".{EXTENSION}")) else { continue };
            if stem.len() == 20 {
                if let Ok(offset) = stem.parse::<u64>() {
                    found.push((offset, entry.path()));
                }
            }
        }
    }
    found.sort();
    found
}

/// Writes a snapshot (atomically, through io_uring: a node writes thousands of them at
/// shutdown) and removes all but the newest [`SNAPSHOTS_KEPT`].
pub async fn write_snapshot(dir: &Path, offset: u64, bytes: &[u8]) -> Result<(), StorageError> {
    skein_storage::write_file_atomically(&snapshot_path(dir, offset), bytes).await?;
    let files = snapshot_files(dir);
    for (_, path) in files.iter().take(files.len().saturating_sub(SNAPSHOTS_KEPT)) {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Loads the table of a partition whose log was just opened: the newest valid snapshot the log
/// still covers, then every batch header after it.
pub async fn load(log: &Log) -> Result<ProducerTable, StorageError> {
    let dir = log.dir().to_path_buf();
    let end = log.next_offset();
    let mut table = ProducerTable::default();
    let mut from = log.start_offset();
    for (offset, path) in snapshot_files(&dir).into_iter().rev() {
        if offset > end {
            tracing::info!(path = %path.display(), end, "ignoring a producer snapshot past the recovered log end");
            let _ = std::fs::remove_file(&path);
            continue;
        }
        match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| ProducerTable::decode(&b)) {
            Ok((loaded, covered)) if covered == offset => {
                table = loaded;
                from = offset.max(log.start_offset());
                break;
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "producer snapshot names another offset; ignored")
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), reason, "producer snapshot damaged; ignored (the log is scanned instead)")
            }
        }
    }
    let now = skein_storage::now_ms();
    let mut scanned = 0u64;
    let mut next = from;
    while next < log.visible_offset() {
        let (bytes, after) = log.read_verified(next, 4 << 20).await?;
        let mut at = 0usize;
        while at + BATCH_HEADER_BYTES <= bytes.len() {
            let header = BatchHeader::parse(&bytes[at..], usize::MAX).map_err(StorageError::InvalidBatch)?;
            if header.base_offset >= next {
                table.record(&header, header.base_offset, now);
                scanned += 1;
            }
            at += header.total_bytes();
        }
        if after <= next {
            break;
        }
        next = after;
    }
    table.bytes_since_snapshot = 0;
    if scanned > 0 {
        tracing::info!(path = %dir.display(), from, batches = scanned, producers = table.len(), "producer state rebuilt from the log");
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(producer_id: i64, epoch: i16, sequence: i32, records: u32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            batch_length: 100,
            leader_epoch: 0,
            crc: 0,
            attributes: 0,
            producer_epoch: epoch,
            last_offset_delta: records - 1,
            first_timestamp: 0,
            max_timestamp: 0,
            producer_id,
            base_sequence: sequence,
            record_count: records,
        }
    }

    #[test]
    fn sequences_dedupe_fence_and_detect_gaps() {
        let mut table = ProducerTable::default();
        assert_eq!(table.check(&header(-1, -1, -1, 3)), Check::Append, "non-idempotent batches pass");
        assert_eq!(table.check(&header(7, 0, 5, 1)), Check::Reject(ErrorCode::OutOfOrderSequence));
        assert_eq!(table.check(&header(7, 0, 0, 3)), Check::Append);
        table.record(&header(7, 0, 0, 3), 100, 1);
        assert_eq!(table.check(&header(7, 0, 0, 3)), Check::Duplicate { base_offset: 100, last_offset: 102 });
        assert_eq!(table.check(&header(7, 0, 4, 1)), Check::Reject(ErrorCode::OutOfOrderSequence));
        assert_eq!(table.check(&header(7, 0, 3, 2)), Check::Append);
        let kept = BATCHES_KEPT as i32;
        for i in 0..kept + 1 {
            table.record(&header(7, 0, 3 + 2 * i, 2), 200 + 2 * i as u64, 1);
        }
        // The first batches fell out of the window: a retry of them is refused, not rewritten.
        assert_eq!(table.check(&header(7, 0, 0, 3)), Check::Reject(ErrorCode::DuplicateSequence));
        let newest = 3 + 2 * kept;
        let at = 200 + 2 * kept as u64;
        assert_eq!(
            table.check(&header(7, 0, newest, 2)),
            Check::Duplicate { base_offset: at, last_offset: at + 1 }
        );
        // A new epoch restarts at 0 and fences the old one.
        assert_eq!(table.check(&header(7, 1, 4, 1)), Check::Reject(ErrorCode::OutOfOrderSequence));
        table.record(&header(7, 1, 0, 1), 9000, 2);
        assert_eq!(table.check(&header(7, 0, newest + 2, 1)), Check::Reject(ErrorCode::ProducerFenced));
        assert_eq!(table.check(&header(7, 1, 1, 1)), Check::Append);
    }

    /// Runs `make` on a glommio executor with a ticker (glommio 0.9 park bug).
    fn run<F: std::future::Future<Output = ()> + 'static>(make: impl FnOnce() -> F + Send + 'static) {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(2 << 20)
            .spawn(move || async move {
                let done = std::rc::Rc::new(std::cell::Cell::new(false));
                let ticker = glommio::spawn_local({
                    let done = done.clone();
                    async move {
                        while !done.get() {
                            glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                        }
                    }
                });
                make().await;
                done.set(true);
                ticker.await;
            })
            .unwrap()
            .join()
            .unwrap();
    }

    async fn append(log: &Log, table: &mut ProducerTable, producer: i64, sequence: i32, records: u32) {
        let mut builder = skein_storage::batch::BatchBuilder::new().producer(producer, 0, sequence);
        for i in 0..records {
            builder.push(1_700_000_000_000, None, Some(format!("v{i}").as_bytes()), &[]);
        }
        let batch = builder.finish();
        let header = BatchHeader::parse(&batch, usize::MAX).unwrap();
        let appended = log.append(batch).await.unwrap();
        appended.ack.await.unwrap();
        table.record(&header, appended.base_offset, 1);
    }

    #[test]
    fn the_table_is_rebuilt_from_snapshots_and_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        run(move || async move {
            let config = skein_storage::LogConfig::tiny();
            let log = Log::open(&path, config).await.unwrap();
            let mut table = ProducerTable::default();
            for s in 0..10 {
                append(&log, &mut table, 1, s * 3, 3).await;
            }
            // A snapshot in the middle, then more batches only the log has.
            write_snapshot(&path, log.next_offset(), &table.encode(log.next_offset())).await.unwrap();
            for s in 0..8 {
                append(&log, &mut table, 2, s * 2, 2).await;
                append(&log, &mut table, 1, 30 + s, 1).await;
            }
            log.close().await.unwrap();
            let strip = |mut t: ProducerTable| {
                t.bytes_since_snapshot = 0;
                for entry in t.entries.values_mut() {
                    entry.last_update_ms = 0;
                }
                t
            };
            let log = Log::open(&path, config).await.unwrap();
            assert_eq!(strip(load(&log).await.unwrap()), strip(table.clone()), "snapshot + scan");
            log.close().await.unwrap();
            // A damaged snapshot is ignored: the whole log is scanned instead.
            let (_, snapshot) = snapshot_files(&path).pop().unwrap();
            let mut bytes = std::fs::read(&snapshot).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            std::fs::write(&snapshot, bytes).unwrap();
            let log = Log::open(&path, config).await.unwrap();
            let rebuilt = load(&log).await.unwrap();
            assert_eq!(strip(rebuilt.clone()), strip(table.clone()), "full scan");
            assert_eq!(
                rebuilt.check(&header(1, 0, 37, 1)),
                Check::Duplicate {
                    base_offset: rebuilt.get(1).unwrap().batches.back().unwrap().base_offset,
                    last_offset: rebuilt.get(1).unwrap().batches.back().unwrap().last_offset
                }
            );
            log.close().await.unwrap();
        });
    }

    #[test]
    fn a_request_is_checked_whole() {
        let mut table = ProducerTable::default();
        table.record(&header(7, 0, 0, 2), 10, 1);
        // A request of the next two batches passes; with a gap in the middle, the later one is
        // refused (so the caller writes nothing); a batch repeated inside a request is refused.
        let next = [header(7, 0, 2, 2), header(7, 0, 4, 1)];
        assert_eq!(table.check_all(&next), vec![Check::Append, Check::Append]);
        let gap = [header(7, 0, 2, 2), header(7, 0, 9, 1)];
        assert_eq!(table.check_all(&gap)[1], Check::Reject(ErrorCode::OutOfOrderSequence));
        let twice = [header(7, 0, 2, 2), header(7, 0, 2, 2)];
        assert_eq!(table.check_all(&twice)[1], Check::Reject(ErrorCode::DuplicateSequence));
        let retry = [header(7, 0, 0, 2), header(7, 0, 2, 1)];
        assert_eq!(
            table.check_all(&retry),
            vec![Check::Duplicate { base_offset: 10, last_offset: 11 }, Check::Append]
        );
        assert_eq!(table.get(7).unwrap().batches.len(), 1, "checking changes nothing");
    }

    #[test]
    fn snapshots_round_trip_and_damage_is_refused() {
        let mut table = ProducerTable::default();
        for id in 0..20 {
            for s in 0..7 {
                table.record(&header(id, 2, s * 10, 10), (id * 1000 + s as i64 * 10) as u64, 5);
            }
        }
        table.bytes_since_snapshot = 0;
        let bytes = table.encode(12345);
        let (decoded, offset) = ProducerTable::decode(&bytes).unwrap();
        assert_eq!(offset, 12345);
        assert_eq!(decoded, table);
        for at in [0, 5, 9, 17, 21, 30, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(ProducerTable::decode(&damaged).is_err(), "flip at {at} detected");
        }
        assert!(ProducerTable::decode(&bytes[..bytes.len() - 3]).is_err());
        table.expire(5 + PRODUCER_EXPIRY_MS + 1);
        assert!(table.is_empty());
    }
}
