//! On-disk formats of the files in a partition directory, other than the batches themselves.
//!
//! A partition directory holds, for each segment, three files named by the segment's base
//! offset written as 20 decimal digits:
//!
//! * `<base>.log`: a 4096-byte [segment header](#segment-header-00000000000000000000log) and
//!   then record batches back to back ([`crate::batch`]);
//! * `<base>.index`: the sparse [offset index](#index-files) (relative offset → byte position);
//! * `<base>.timeindex`: the [time index](#index-files) (timestamp → relative offset);
//!
//! and one [`checkpoint`](#checkpoint-file) file. All integers are little-endian. Every file
//! starts with a magic number and a format version; an unknown version is refused, never
//! guessed at.
//!
//! # Segment header (`<base>.log`)
//!
//! The first 4096 bytes (one O_DIRECT block) of every log file:
//!
//! | offset | size | field | notes |
//! |-------:|-----:|-------|-------|
//! | 0  | 8 | magic | `"SKEINLOG"` |
//! | 8  | 2 | version u16 | 1 |
//! | 10 | 2 | reserved | 0 |
//! | 12 | 4 | header_bytes u32 | 4096: batches start here |
//! | 16 | 8 | base_offset u64 | must match the file name |
//! | 24 | 8 | created_ms i64 | wall clock when the segment was created (roll by age) |
//! | 32 | 4 | crc u32 | CRC32C of bytes `[0, 32)` |
//! | 36 | 4060 | zero | |
//!
//! # Index files
//!
//! Written once, when a segment is sealed (rolled or closed behind a newer segment); the active
//! segment's index lives in memory, and is written too when the log is closed, describing the
//! tail up to its end (`log_bytes`): the next open scans the tail only from its last indexed
//! batch on and checks that the scan passes through `log_bytes` with `next_offset`, else it
//! rebuilds the index from the whole segment (as it always does without the files, after a
//! crash). The same format either way. A 64-byte header and then `entry_count` fixed-size
//! entries:
//!
//! | offset | size | field | notes |
//! |-------:|-----:|-------|-------|
//! | 0  | 4 | magic | `"SKIX"` (offset index) or `"SKTI"` (time index) |
//! | 4  | 2 | version u16 | 1 |
//! | 6  | 2 | entry_bytes u16 | 8 (offset index) or 12 (time index) |
//! | 8  | 8 | base_offset u64 | the segment's base offset |
//! | 16 | 4 | entry_count u32 | |
//! | 20 | 4 | reserved | 0 |
//! | 24 | 8 | log_bytes u64 | size of the `.log` file this index describes |
//! | 32 | 8 | next_offset u64 | offset after the segment's last record |
//! | 40 | 8 | max_timestamp i64 | largest record timestamp in the segment (`i64::MIN` if empty) |
//! | 48 | 12 | reserved | 0 |
//! | 60 | 4 | crc u32 | CRC32C of bytes `[0, 60)` followed by all entries |
//!
//! Offset index entry (8 bytes): `relative_offset u32` (batch base offset − segment base),
//! `position u32` (byte position of that batch in the `.log` file). Time index entry (12
//! bytes): `timestamp i64` (the largest timestamp of every batch *before* that position),
//! `relative_offset u32`. Both have one entry per indexed batch, in the same order: the first
//! batch of the segment and then the first batch after every `index_interval_bytes`.
//!
//! # Checkpoint file
//!
//! `checkpoint`, 64 bytes (padded to 4096 on disk), rewritten in place:
//!
//! | offset | size | field | notes |
//! |-------:|-----:|-------|-------|
//! | 0  | 4 | magic | `"SKCP"` |
//! | 4  | 2 | version u16 | 1 |
//! | 6  | 2 | reserved | 0 |
//! | 8  | 8 | tail_base_offset u64 | the segment the recovery position refers to |
//! | 16 | 8 | recovery_position u64 | bytes of that segment covered by a completed `fdatasync` |
//! | 24 | 8 | written_ms i64 | when the checkpoint was written |
//! | 28 | 32 | reserved | 0 |
//! | 60 | 4 | crc u32 | CRC32C of bytes `[0, 60)` |
//!
//! A checkpoint that fails its CRC (a torn in-place write) is treated as absent, which only
//! makes recovery more lenient about the tail, never stricter.
//!
//! # Compatibility
//! * Version 1 of every file above is the first version.
//! * Index files of the tail written at close (since 2026-12-07) use the same format, so no
//!   version changed: a build without them scans the tail whole as before, and overwrites them
//!   when it seals the segment; a sealed segment's index is used only if its `log_bytes` is
//!   the file's size, so a tail index left behind never passes for a sealed one that grew.

use std::path::{Path, PathBuf};

/// The size of the segment header and the O_DIRECT alignment used for every write.
pub const BLOCK_BYTES: usize = 4096;
/// Batches in a `.log` file start here.
pub const SEGMENT_HEADER_BYTES: u64 = BLOCK_BYTES as u64;
pub const SEGMENT_MAGIC: [u8; 8] = *b"SKEINLOG";
pub const SEGMENT_VERSION: u16 = 1;
pub const OFFSET_INDEX_MAGIC: [u8; 4] = *b"SKIX";
pub const TIME_INDEX_MAGIC: [u8; 4] = *b"SKTI";
pub const INDEX_VERSION: u16 = 1;
pub const INDEX_HEADER_BYTES: usize = 64;
pub const OFFSET_INDEX_ENTRY_BYTES: usize = 8;
pub const TIME_INDEX_ENTRY_BYTES: usize = 12;
pub const CHECKPOINT_MAGIC: [u8; 4] = *b"SKCP";
pub const CHECKPOINT_VERSION: u16 = 1;
pub const CHECKPOINT_BYTES: usize = 64;
pub const CHECKPOINT_FILE: &str = "checkpoint";

const _: () = assert!(BLOCK_BYTES.is_power_of_two() && BLOCK_BYTES.is_multiple_of(512));

/// Why a file is not in the expected format. Each variant names the rule that broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("file too short: {needed} bytes needed, {available} present")]
    Truncated { needed: usize, available: usize },
    #[error("bad magic {found:02x?}")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("base offset {found} does not match the file name ({expected})")]
    BaseOffsetMismatch { expected: u64, found: u64 },
    #[error("unexpected {field} {found}")]
    Field { field: &'static str, found: u64 },
    #[error("all zero (never written)")]
    Zero,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// `<base>.log` and friends.
pub fn segment_file_name(base_offset: u64, extension: &str) -> String {
    format!("{base_offset:020}.{extension}")
}

/// Paths of one segment's three files.
#[derive(Debug, Clone)]
pub struct SegmentPaths {
    pub log: PathBuf,
    pub index: PathBuf,
    pub time_index: PathBuf,
}

impl SegmentPaths {
    pub fn new(dir: &Path, base_offset: u64) -> SegmentPaths {
        SegmentPaths {
            log: dir.join(segment_file_name(base_offset, "log")),
            index: dir.join(segment_file_name(base_offset, "index")),
            time_index: dir.join(segment_file_name(base_offset, "timeindex")),
        }
    }
}

/// Parses `00000000000000000042.log` into `(42, "log")`.
pub fn parse_segment_file_name(name: &str) -> Option<(u64, &str)> {
    let (stem, extension) = name.split_once('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((stem.parse().ok()?, extension))
}

/// The header block of a `.log` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub base_offset: u64,
    pub created_ms: i64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; BLOCK_BYTES] {
        let mut block = [0u8; BLOCK_BYTES];
        block[0..8].copy_from_slice(&SEGMENT_MAGIC);
        block[8..10].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        block[12..16].copy_from_slice(&(SEGMENT_HEADER_BYTES as u32).to_le_bytes());
        block[16..24].copy_from_slice(&self.base_offset.to_le_bytes());
        block[24..32].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&block[..32]);
        block[32..36].copy_from_slice(&crc.to_le_bytes());
        block
    }

    pub fn decode(block: &[u8], expected_base: u64) -> Result<SegmentHeader, FormatError> {
        if block.len() < 36 {
            return Err(FormatError::Truncated { needed: 36, available: block.len() });
        }
        if block[..36].iter().all(|&b| b == 0) {
            return Err(FormatError::Zero);
        }
        if block[0..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic { found: block[0..8].to_vec() });
        }
        let version = u16_at(block, 8);
        if version != SEGMENT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let stored = u32_at(block, 32);
        let computed = crc32c::crc32c(&block[..32]);
        if stored != computed {
            return Err(FormatError::CrcMismatch { stored, computed });
        }
        let header_bytes = u32_at(block, 12);
        if u64::from(header_bytes) != SEGMENT_HEADER_BYTES {
            return Err(FormatError::Field { field: "header_bytes", found: header_bytes.into() });
        }
        let base_offset = u64_at(block, 16);
        if base_offset != expected_base {
            return Err(FormatError::BaseOffsetMismatch { expected: expected_base, found: base_offset });
        }
        Ok(SegmentHeader { base_offset, created_ms: u64_at(block, 24) as i64 })
    }
}

/// One sparse index point: the batch at `position` starts at `base + relative_offset`, and
/// every batch before it has timestamps ≤ `max_timestamp_before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
    pub max_timestamp_before: i64,
}

/// What a sealed segment's index files say about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    pub base_offset: u64,
    pub log_bytes: u64,
    pub next_offset: u64,
    pub max_timestamp: i64,
}

fn index_header(
    magic: [u8; 4],
    entry_bytes: u16,
    summary: &SegmentSummary,
    count: usize,
) -> [u8; INDEX_HEADER_BYTES] {
    let mut header = [0u8; INDEX_HEADER_BYTES];
    header[0..4].copy_from_slice(&magic);
    header[4..6].copy_from_slice(&INDEX_VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&entry_bytes.to_le_bytes());
    header[8..16].copy_from_slice(&summary.base_offset.to_le_bytes());
    header[16..20].copy_from_slice(&(count as u32).to_le_bytes());
    header[24..32].copy_from_slice(&summary.log_bytes.to_le_bytes());
    header[32..40].copy_from_slice(&summary.next_offset.to_le_bytes());
    header[40..48].copy_from_slice(&summary.max_timestamp.to_le_bytes());
    header
}

fn finish_index(mut bytes: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..60]), &bytes[INDEX_HEADER_BYTES..]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Encodes the `.index` file of a sealed segment.
pub fn encode_offset_index(summary: &SegmentSummary, entries: &[IndexEntry]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(INDEX_HEADER_BYTES + entries.len() * OFFSET_INDEX_ENTRY_BYTES);
    bytes.extend_from_slice(&index_header(
        OFFSET_INDEX_MAGIC,
        OFFSET_INDEX_ENTRY_BYTES as u16,
        summary,
        entries.len(),
    ));
    for entry in entries {
        bytes.extend_from_slice(&entry.relative_offset.to_le_bytes());
        bytes.extend_from_slice(&entry.position.to_le_bytes());
    }
    finish_index(bytes)
}

/// Encodes the `.timeindex` file of a sealed segment.
pub fn encode_time_index(summary: &SegmentSummary, entries: &[IndexEntry]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(INDEX_HEADER_BYTES + entries.len() * TIME_INDEX_ENTRY_BYTES);
    bytes.extend_from_slice(&index_header(
        TIME_INDEX_MAGIC,
        TIME_INDEX_ENTRY_BYTES as u16,
        summary,
        entries.len(),
    ));
    for entry in entries {
        bytes.extend_from_slice(&entry.max_timestamp_before.to_le_bytes());
        bytes.extend_from_slice(&entry.relative_offset.to_le_bytes());
    }
    finish_index(bytes)
}

fn decode_index_file(
    bytes: &[u8],
    magic: [u8; 4],
    entry_bytes: usize,
    expected_base: u64,
) -> Result<(SegmentSummary, &[u8]), FormatError> {
    if bytes.len() < INDEX_HEADER_BYTES {
        return Err(FormatError::Truncated { needed: INDEX_HEADER_BYTES, available: bytes.len() });
    }
    if bytes[0..4] != magic {
        return Err(FormatError::BadMagic { found: bytes[0..4].to_vec() });
    }
    let version = u16_at(bytes, 4);
    if version != INDEX_VERSION {
        return Err(FormatError::UnsupportedVersion(version));
    }
    if usize::from(u16_at(bytes, 6)) != entry_bytes {
        return Err(FormatError::Field { field: "entry_bytes", found: u16_at(bytes, 6).into() });
    }
    let count = u32_at(bytes, 16) as usize;
    let needed = INDEX_HEADER_BYTES + count * entry_bytes;
    if bytes.len() < needed {
        return Err(FormatError::Truncated { needed, available: bytes.len() });
    }
    let entries = &bytes[INDEX_HEADER_BYTES..needed];
    let stored = u32_at(bytes, 60);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&bytes[..60]), entries);
    if stored != computed {
        return Err(FormatError::CrcMismatch { stored, computed });
    }
    let base_offset = u64_at(bytes, 8);
    if base_offset != expected_base {
        return Err(FormatError::BaseOffsetMismatch { expected: expected_base, found: base_offset });
    }
    let summary = SegmentSummary {
        base_offset,
        log_bytes: u64_at(bytes, 24),
        next_offset: u64_at(bytes, 32),
        max_timestamp: u64_at(bytes, 40) as i64,
    };
    Ok((summary, entries))
}

/// Decodes both index files of a sealed segment and checks that they agree.
pub fn decode_indexes(
    offset_index: &[u8],
    time_index: &[u8],
    expected_base: u64,
) -> Result<(SegmentSummary, Vec<IndexEntry>), FormatError> {
    let (summary, offsets) =
        decode_index_file(offset_index, OFFSET_INDEX_MAGIC, OFFSET_INDEX_ENTRY_BYTES, expected_base)?;
    let (time_summary, times) =
        decode_index_file(time_index, TIME_INDEX_MAGIC, TIME_INDEX_ENTRY_BYTES, expected_base)?;
    if time_summary != summary {
        return Err(FormatError::Field { field: "time index summary", found: time_summary.log_bytes });
    }
    if offsets.len() / OFFSET_INDEX_ENTRY_BYTES != times.len() / TIME_INDEX_ENTRY_BYTES {
        return Err(FormatError::Field {
            field: "time index entry count",
            found: (times.len() / TIME_INDEX_ENTRY_BYTES) as u64,
        });
    }
    let mut entries = Vec::with_capacity(offsets.len() / OFFSET_INDEX_ENTRY_BYTES);
    let mut previous: Option<IndexEntry> = None;
    for (offset_entry, time_entry) in
        offsets.chunks_exact(OFFSET_INDEX_ENTRY_BYTES).zip(times.chunks_exact(TIME_INDEX_ENTRY_BYTES))
    {
        let entry = IndexEntry {
            relative_offset: u32_at(offset_entry, 0),
            position: u32_at(offset_entry, 4),
            max_timestamp_before: u64_at(time_entry, 0) as i64,
        };
        if u32_at(time_entry, 8) != entry.relative_offset {
            return Err(FormatError::Field {
                field: "time index relative offset",
                found: u32_at(time_entry, 8).into(),
            });
        }
        if let Some(previous) = previous {
            if entry.relative_offset <= previous.relative_offset || entry.position <= previous.position {
                return Err(FormatError::Field { field: "index order", found: entry.position.into() });
            }
        }
        if u64::from(entry.position) >= summary.log_bytes {
            return Err(FormatError::Field { field: "index position", found: entry.position.into() });
        }
        previous = Some(entry);
        entries.push(entry);
    }
    Ok((summary, entries))
}

/// The recovery checkpoint of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub tail_base_offset: u64,
    pub recovery_position: u64,
    pub written_ms: i64,
}

impl Checkpoint {
    pub fn encode(&self) -> [u8; CHECKPOINT_BYTES] {
        let mut bytes = [0u8; CHECKPOINT_BYTES];
        bytes[0..4].copy_from_slice(&CHECKPOINT_MAGIC);
        bytes[4..6].copy_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.tail_base_offset.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.recovery_position.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.written_ms.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, FormatError> {
        if bytes.len() < CHECKPOINT_BYTES {
            return Err(FormatError::Truncated { needed: CHECKPOINT_BYTES, available: bytes.len() });
        }
        if bytes[0..4] != CHECKPOINT_MAGIC {
            return Err(FormatError::BadMagic { found: bytes[0..4].to_vec() });
        }
        let version = u16_at(bytes, 4);
        if version != CHECKPOINT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let stored = u32_at(bytes, 60);
        let computed = crc32c::crc32c(&bytes[..60]);
        if stored != computed {
            return Err(FormatError::CrcMismatch { stored, computed });
        }
        Ok(Checkpoint {
            tail_base_offset: u64_at(bytes, 8),
            recovery_position: u64_at(bytes, 16),
            written_ms: u64_at(bytes, 24) as i64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_header_round_trip_and_rules() {
        let header = SegmentHeader { base_offset: 42, created_ms: 1_700_000_000_000 };
        let block = header.encode();
        assert_eq!(SegmentHeader::decode(&block, 42), Ok(header));
        assert!(matches!(SegmentHeader::decode(&block, 43), Err(FormatError::BaseOffsetMismatch { .. })));
        assert_eq!(SegmentHeader::decode(&[0u8; 4096], 0), Err(FormatError::Zero));
        let mut bad = block;
        bad[8] = 9;
        assert_eq!(SegmentHeader::decode(&bad, 42), Err(FormatError::UnsupportedVersion(9)));
        let mut bad = block;
        bad[20] ^= 1;
        assert!(matches!(SegmentHeader::decode(&bad, 42), Err(FormatError::CrcMismatch { .. })));
        assert!(matches!(SegmentHeader::decode(&block[..10], 42), Err(FormatError::Truncated { .. })));
    }

    #[test]
    fn index_round_trip_and_damage() {
        let summary =
            SegmentSummary { base_offset: 100, log_bytes: 90_000, next_offset: 400, max_timestamp: 77 };
        let entries = vec![
            IndexEntry { relative_offset: 0, position: 4096, max_timestamp_before: i64::MIN },
            IndexEntry { relative_offset: 50, position: 9000, max_timestamp_before: 10 },
            IndexEntry { relative_offset: 120, position: 20000, max_timestamp_before: 60 },
        ];
        let offsets = encode_offset_index(&summary, &entries);
        let times = encode_time_index(&summary, &entries);
        assert_eq!(decode_indexes(&offsets, &times, 100), Ok((summary.clone(), entries.clone())));
        for at in 0..offsets.len() {
            let mut damaged = offsets.clone();
            damaged[at] ^= 0x10;
            assert!(decode_indexes(&damaged, &times, 100).is_err(), "flip at {at} undetected");
        }
        assert!(decode_indexes(&offsets[..70], &times, 100).is_err());
        assert!(decode_indexes(&offsets, &times, 101).is_err());
        assert!(decode_indexes(&times, &offsets, 100).is_err());
    }

    #[test]
    fn checkpoint_round_trip() {
        let checkpoint = Checkpoint { tail_base_offset: 9, recovery_position: 123_456, written_ms: 5 };
        let bytes = checkpoint.encode();
        assert_eq!(Checkpoint::decode(&bytes), Ok(checkpoint));
        let mut bad = bytes;
        bad[17] ^= 1;
        assert!(Checkpoint::decode(&bad).is_err());
    }

    #[test]
    fn file_names() {
        assert_eq!(segment_file_name(42, "log"), "00000000000000000042.log");
        assert_eq!(parse_segment_file_name("00000000000000000042.timeindex"), Some((42, "timeindex")));
        assert_eq!(parse_segment_file_name("42.log"), None);
        assert_eq!(parse_segment_file_name("checkpoint"), None);
    }
}
