//! One suite of behaviour checks for [`PartitionLog`], written once as generic functions and run
//! against both backends: the real [`Log`] (O_DIRECT files in a temporary directory on a real
//! filesystem, tiny segments so reads cross segment files) and [`MemLog`], each under
//! `fsync=always` and `fsync=never`. Then the faults only `MemLog` can inject, and what the real
//! log keeps across a reopen.

mod common;

use std::future::Future;

use bytes::{Bytes, BytesMut};
use common::{batch_at, check_records, run, tmp};
use skein_storage::batch::{self, Batch, BatchSplitter};
use skein_storage::mem::{Crash, MemLog};
use skein_storage::{EpochEntry, FsyncPolicy, Log, LogConfig, LogData, LogRead, PartitionLog, StorageError};

// ---------------------------------------------------------------------------------------------
// Helpers

fn config(fsync: FsyncPolicy) -> LogConfig {
    LogConfig { fsync, ..LogConfig::tiny() }
}

/// Runs `check` on a fresh real log in a temporary directory.
fn on_log<F: Future<Output = ()> + 'static>(fsync: FsyncPolicy, check: fn(Log) -> F) {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let log = Log::open(&path, config(fsync)).await.unwrap();
        check(log).await;
    });
}

/// Runs `check` on a fresh in-memory log (on the same kind of executor, though it needs none).
fn on_mem<F: Future<Output = ()> + 'static>(fsync: FsyncPolicy, check: fn(MemLog) -> F) {
    run(move || async move {
        check(MemLog::with_batch_bytes_max(fsync, config(fsync).batch_bytes_max)).await;
    });
}

/// Appends one batch per count as the leader of `epoch`, checking the offsets assigned, and
/// waits for every ack. Returns each batch's (base, next) offsets.
async fn append_acked<L: PartitionLog>(log: &L, counts: &[u64], epoch: u32) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut acks = Vec::new();
    for &count in counts {
        let end = log.end_offset();
        let appended = log.append_leader(batch_at(end, count), epoch).await.unwrap();
        assert_eq!(appended.base_offset, end, "the log assigns the next offset");
        assert_eq!(appended.last_offset, end + count - 1);
        assert_eq!(log.end_offset(), end + count);
        assert!(log.acked_offset() <= log.end_offset(), "acked {} > end", log.acked_offset());
        ranges.push((end, end + count));
        acks.push(appended.ack);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    assert_eq!(log.acked_offset(), log.end_offset(), "every append acknowledged");
    ranges
}

/// The bytes of a read, and the batches in them (checked: each continues the one before, the
/// first starts at `read.first_offset`, the last ends at `read.next_offset`).
async fn read_batches<L: PartitionLog>(log: &L, read: LogRead) -> (Bytes, Vec<Batch>) {
    let (first, next) = (read.first_offset, read.next_offset);
    let len = read.len();
    let bytes = log.read_bytes(read).await.unwrap();
    assert_eq!(bytes.len(), len);
    let batches: Vec<Batch> =
        BatchSplitter::new(bytes.clone(), 1 << 24).map(|b| b.expect("a whole, valid batch")).collect();
    let mut expected = first;
    for b in &batches {
        assert_eq!(b.header().base_offset, expected, "batches are contiguous");
        expected = b.header().next_offset();
    }
    assert_eq!(expected, next, "next_offset is the end of the last batch");
    (bytes, batches)
}

/// Reads everything from `from` below `bound`, in steps of `bytes_max`; returns every record
/// offset seen at or after `from` (values checked against `common::value_for`).
async fn read_all<L: PartitionLog>(log: &L, from: u64, bytes_max: usize, bound: u64) -> Vec<u64> {
    let mut offsets = Vec::new();
    let mut next = from;
    loop {
        let read = log.read(next, bytes_max, bound).await.unwrap();
        if read.is_empty() {
            assert_eq!(read.next_offset, next, "an empty read does not move");
            return offsets;
        }
        assert!(read.next_offset > next && read.next_offset <= bound);
        let after = read.next_offset;
        let (bytes, _) = read_batches(log, read).await;
        offsets.extend(check_records(bytes).into_iter().filter(|&o| o >= next));
        next = after;
    }
}

/// Batches for offsets `first..`, one per count, as a leader of `epochs[i]` would have stamped
/// them, back to back (what a fetch returns).
fn follower_batches(first: u64, counts: &[u64], epochs: &[u32]) -> Bytes {
    let mut all = BytesMut::new();
    let mut base = first;
    for (&count, &epoch) in counts.iter().zip(epochs) {
        let mut b = batch_at(base, count);
        batch::set_base_offset(&mut b, base);
        batch::set_leader_epoch(&mut b, epoch);
        all.extend_from_slice(&b);
        base += count;
    }
    all.freeze()
}

fn epochs(pairs: &[(u32, u64)]) -> Vec<EpochEntry> {
    pairs.iter().map(|&(epoch, start_offset)| EpochEntry { epoch, start_offset }).collect()
}

fn is_out_of_range<T: std::fmt::Debug>(result: &Result<T, StorageError>) -> bool {
    matches!(result, Err(StorageError::OffsetOutOfRange { .. }))
}

/// Batch sizes that vary, so batch boundaries land everywhere.
fn counts(n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| 1 + (i * 7) % 9).collect()
}

// ---------------------------------------------------------------------------------------------
// The checks, generic over the backend

async fn offsets_are_contiguous_from_the_start<L: PartitionLog>(log: L) {
    assert_eq!((log.start_offset(), log.end_offset(), log.acked_offset()), (0, 0, 0));
    let ranges = append_acked(&log, &counts(40), 0).await;
    for pair in ranges.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "no gap, no overlap");
    }
    let end = log.end_offset();
    assert_eq!(end, ranges.last().unwrap().1);
    assert_eq!(read_all(&log, 0, 2000, u64::MAX).await, (0..end).collect::<Vec<_>>());
    log.close().await.unwrap();
}

async fn reads_return_whole_batches_from_the_one_holding_the_offset<L: PartitionLog>(log: L) {
    let ranges = append_acked(&log, &counts(30), 0).await;
    let end = log.end_offset();
    for offset in 0..end {
        let &(base, next) = ranges.iter().find(|&&(base, next)| base <= offset && offset < next).unwrap();
        // A tiny bytes_max still returns the whole batch holding the offset, and only it.
        let one = log.read(offset, 1, u64::MAX).await.unwrap();
        assert_eq!((one.first_offset, one.next_offset), (base, next), "offset {offset}");
        let (_, batches) = read_batches(&log, one).await;
        assert_eq!(batches.len(), 1);
        // A larger one: whole batches from the same one, within bytes_max (or just one batch).
        let some = log.read(offset, 1500, u64::MAX).await.unwrap();
        assert_eq!(some.first_offset, base, "offset {offset}");
        let (bytes, batches) = read_batches(&log, some).await;
        assert!(
            bytes.len() <= 1500 || batches.len() == 1,
            "{} bytes in {} batches",
            bytes.len(),
            batches.len()
        );
    }
    let at_end = log.read(end, 1000, u64::MAX).await.unwrap();
    assert!(at_end.is_empty() && matches!(at_end.data, LogData::Empty));
    assert_eq!((at_end.first_offset, at_end.next_offset), (end, end));
    assert!(is_out_of_range(&log.read(end + 1, 1000, u64::MAX).await), "past the end");
    log.close().await.unwrap();
}

async fn reads_never_reach_the_upper_bound<L: PartitionLog>(log: L) {
    let ranges = append_acked(&log, &counts(30), 0).await;
    let end = log.end_offset();
    for bound in [0, 1, ranges[3].0, ranges[3].0 + 1, ranges[10].1, end / 2, end - 1, end] {
        for offset in (0..end).step_by(3) {
            let holding = *ranges.iter().find(|&&(base, next)| base <= offset && offset < next).unwrap();
            let read = log.read(offset, 4000, bound).await.unwrap();
            if holding.1 > bound {
                assert!(read.is_empty(), "offset {offset} bound {bound}: its batch reaches the bound");
                continue;
            }
            assert_eq!(read.first_offset, holding.0, "offset {offset} bound {bound}");
            assert!(read.next_offset <= bound, "offset {offset} bound {bound}: next {}", read.next_offset);
            let (bytes, _) = read_batches(&log, read).await;
            assert!(check_records(bytes).into_iter().all(|o| o < bound), "offset {offset} bound {bound}");
        }
        // Reading on up to the bound ends exactly at the last batch boundary below it.
        let last_boundary = ranges.iter().map(|r| r.1).filter(|&n| n <= bound).max().unwrap_or(0);
        assert_eq!(read_all(&log, 0, 700, bound).await, (0..last_boundary).collect::<Vec<_>>());
    }
    log.close().await.unwrap();
}

async fn truncate_to_drops_the_batch_holding_the_offset_and_after<L: PartitionLog>(log: L) {
    let ranges = append_acked(&log, &counts(20), 1).await;
    let end = log.end_offset();
    assert_eq!(log.truncate_to(end).await.unwrap(), end, "at the end: nothing to do");
    assert_eq!(log.truncate_to(end + 10).await.unwrap(), end, "past the end: nothing to do");
    // Into the middle of batch 12: it goes entirely.
    let (base, next) = ranges[12];
    assert!(next - base > 1, "batch 12 holds several records");
    assert_eq!(log.truncate_to(base + 1).await.unwrap(), base);
    assert_eq!((log.end_offset(), log.acked_offset()), (base, base));
    assert_eq!(read_all(&log, 0, 3000, u64::MAX).await, (0..base).collect::<Vec<_>>());
    assert!(is_out_of_range(&log.read(base + 1, 100, u64::MAX).await));
    // At a batch boundary: that batch and after go.
    let (base5, _) = ranges[5];
    assert_eq!(log.truncate_to(base5).await.unwrap(), base5);
    // Offsets are handed out again from there.
    let again = append_acked(&log, &[4, 4], 2).await;
    assert_eq!(again[0].0, base5);
    assert_eq!(read_all(&log, 0, 3000, u64::MAX).await, (0..base5 + 8).collect::<Vec<_>>());
    assert_eq!(log.epochs(), epochs(&[(1, 0), (2, base5)]));
    assert_eq!(log.truncate_to(0).await.unwrap(), 0);
    assert_eq!((log.start_offset(), log.end_offset(), log.acked_offset()), (0, 0, 0));
    assert!(log.epochs().is_empty());
    log.close().await.unwrap();
}

async fn reset_to_restarts_an_empty_log_at_the_given_offset<L: PartitionLog>(log: L) {
    append_acked(&log, &counts(15), 3).await;
    let old_end = log.end_offset();
    // Far ahead (a follower behind its leader's start offset).
    log.reset_to(old_end + 1000).await.unwrap();
    let start = old_end + 1000;
    assert_eq!((log.start_offset(), log.end_offset(), log.acked_offset()), (start, start, start));
    assert!(log.epochs().is_empty(), "reset forgets the epochs");
    assert!(log.read(start, 1000, u64::MAX).await.unwrap().is_empty());
    assert!(is_out_of_range(&log.read(0, 1000, u64::MAX).await), "the old records are gone");
    assert!(is_out_of_range(&log.truncate_to(start - 1).await), "below the start");
    let ranges = append_acked(&log, &[3, 5], 4).await;
    assert_eq!(ranges[0].0, start);
    assert_eq!(read_all(&log, start, 1000, u64::MAX).await, (start..start + 8).collect::<Vec<_>>());
    assert_eq!(log.epochs(), epochs(&[(4, start)]));
    // Back below the old offsets, and to a follower's batches there.
    log.reset_to(7).await.unwrap();
    assert_eq!((log.start_offset(), log.end_offset()), (7, 7));
    log.append_follower(follower_batches(7, &[2, 3], &[5, 6])).await.unwrap().ack.await.unwrap();
    assert_eq!(read_all(&log, 7, 1000, u64::MAX).await, (7..12).collect::<Vec<_>>());
    assert_eq!(log.epochs(), epochs(&[(5, 7), (6, 9)]));
    log.close().await.unwrap();
}

async fn append_follower_keeps_offsets_and_epochs_and_refuses_a_gap<L: PartitionLog>(log: L) {
    let appended = log.append_follower(follower_batches(0, &[3, 2, 4], &[1, 1, 2])).await.unwrap();
    assert_eq!((appended.base_offset, appended.last_offset), (0, 8));
    assert_eq!(log.end_offset(), 9);
    appended.ack.await.unwrap();
    assert_eq!(log.acked_offset(), 9);
    let read = log.read(0, 1 << 20, u64::MAX).await.unwrap();
    let (bytes, batches) = read_batches(&log, read).await;
    let headers: Vec<(u64, u32)> =
        batches.iter().map(|b| (b.header().base_offset, b.header().leader_epoch)).collect();
    assert_eq!(headers, [(0, 1), (3, 1), (5, 2)], "offsets and epochs kept");
    assert_eq!(check_records(bytes), (0..9).collect::<Vec<_>>());
    assert_eq!(log.epochs(), epochs(&[(1, 0), (2, 5)]));

    // A gap, an overlap, a discontinuity inside the batches, a bad CRC: refused, nothing appended.
    let gap = log.append_follower(follower_batches(10, &[2], &[2])).await;
    assert!(is_out_of_range(&gap), "a gap: {gap:?}");
    let overlap = log.append_follower(follower_batches(8, &[2], &[2])).await;
    assert!(is_out_of_range(&overlap), "an overlap: {overlap:?}");
    let mut broken = BytesMut::from(&follower_batches(9, &[2], &[2])[..]);
    broken.extend_from_slice(&follower_batches(12, &[2], &[2]));
    let inside = log.append_follower(broken.freeze()).await;
    assert!(matches!(inside, Err(StorageError::Corruption { .. })), "a gap inside: {inside:?}");
    let mut bad = BytesMut::from(&follower_batches(9, &[2], &[2])[..]);
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let bad_crc = log.append_follower(bad.freeze()).await;
    assert!(matches!(bad_crc, Err(StorageError::InvalidBatch(_))), "a bad CRC: {bad_crc:?}");
    assert!(log.append_follower(Bytes::new()).await.is_err(), "no batch");
    assert_eq!((log.end_offset(), log.acked_offset()), (9, 9), "nothing appended");

    // The continuation goes in; then a leader append continues after it.
    log.append_follower(follower_batches(9, &[1, 6], &[2, 4])).await.unwrap().ack.await.unwrap();
    assert_eq!(log.end_offset(), 16);
    assert_eq!(append_acked(&log, &[2], 5).await, [(16, 18)]);
    assert_eq!(read_all(&log, 0, 500, u64::MAX).await, (0..18).collect::<Vec<_>>());
    assert_eq!(log.epochs(), epochs(&[(1, 0), (2, 5), (4, 10), (5, 16)]));
    log.close().await.unwrap();
}

async fn epochs_are_recorded_by_append_leader<L: PartitionLog>(log: L) {
    assert!(log.epochs().is_empty());
    append_acked(&log, &[2, 3], 3).await;
    append_acked(&log, &[4], 5).await;
    append_acked(&log, &[1, 1], 7).await;
    assert_eq!(log.epochs(), epochs(&[(3, 0), (5, 5), (7, 9)]));
    // The epoch is stamped into each batch.
    let read = log.read(0, 1 << 20, u64::MAX).await.unwrap();
    let (_, batches) = read_batches(&log, read).await;
    let stamped: Vec<u32> = batches.iter().map(|b| b.header().leader_epoch).collect();
    assert_eq!(stamped, [3, 3, 5, 7, 7]);
    // Truncation drops the epochs that start in what it removes.
    assert_eq!(log.truncate_to(9).await.unwrap(), 9);
    assert_eq!(log.epochs(), epochs(&[(3, 0), (5, 5)]));
    assert_eq!(log.truncate_to(6).await.unwrap(), 5);
    assert_eq!(log.epochs(), epochs(&[(3, 0)]));
    append_acked(&log, &[2], 8).await;
    assert_eq!(log.epochs(), epochs(&[(3, 0), (8, 5)]));
    log.close().await.unwrap();
}

async fn flush_acknowledges_everything_appended<L: PartitionLog>(log: L) {
    let mut acks = Vec::new();
    for _ in 0..10 {
        let end = log.end_offset();
        acks.push(log.append_leader(batch_at(end, 3), 1).await.unwrap().ack);
        assert!(log.acked_offset() <= log.end_offset());
    }
    log.flush().await.unwrap();
    assert_eq!(log.acked_offset(), 30, "flushed: everything written and synced");
    for ack in acks {
        ack.await.unwrap();
    }
    assert_eq!(read_all(&log, 0, 1000, 30).await, (0..30).collect::<Vec<_>>());
    log.close().await.unwrap();
}

/// One `#[test]` per check and backend.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod real_log_fsync_always {
            $(#[test] fn $check() { super::on_log(skein_storage::FsyncPolicy::Always, super::$check); })*
        }
        mod real_log_fsync_never {
            $(#[test] fn $check() { super::on_log(skein_storage::FsyncPolicy::Never, super::$check); })*
        }
        mod mem_log_fsync_always {
            $(#[test] fn $check() { super::on_mem(skein_storage::FsyncPolicy::Always, super::$check); })*
        }
        mod mem_log_fsync_never {
            $(#[test] fn $check() { super::on_mem(skein_storage::FsyncPolicy::Never, super::$check); })*
        }
    };
}

conformance!(
    offsets_are_contiguous_from_the_start,
    reads_return_whole_batches_from_the_one_holding_the_offset,
    reads_never_reach_the_upper_bound,
    truncate_to_drops_the_batch_holding_the_offset_and_after,
    reset_to_restarts_an_empty_log_at_the_given_offset,
    append_follower_keeps_offsets_and_epochs_and_refuses_a_gap,
    epochs_are_recorded_by_append_leader,
    flush_acknowledges_everything_appended,
);

// ---------------------------------------------------------------------------------------------
// Faults: MemLog only

fn mem(fsync: FsyncPolicy) -> MemLog {
    MemLog::with_batch_bytes_max(fsync, config(fsync).batch_bytes_max)
}

#[test]
fn a_failed_write_loses_nothing_acknowledged_and_leaves_the_log_usable() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Never] {
        run(move || async move {
            let log = mem(fsync);
            append_acked(&log, &[3, 4, 2], 1).await;
            log.fail_next_write();
            let doomed = log.append_leader(batch_at(9, 5), 1).await.unwrap();
            assert_eq!(doomed.base_offset, 9);
            let error = doomed.ack.await.unwrap_err();
            assert!(
                matches!(&error, StorageError::WriteAborted(inner) if matches!(**inner, StorageError::NoSpace { .. })),
                "{error:?}"
            );
            assert_eq!((log.end_offset(), log.acked_offset()), (9, 9), "the offsets are given back");
            assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..9).collect::<Vec<_>>());
            // A write job of several appends fails as a whole.
            log.hold_writes();
            let first = log.append_leader(batch_at(9, 1), 1).await.unwrap();
            let second = log.append_leader(batch_at(10, 1), 2).await.unwrap();
            assert_eq!(log.acked_offset(), 9, "held: not acknowledged");
            log.fail_next_write();
            log.release_writes();
            assert!(matches!(first.ack.await, Err(StorageError::WriteAborted(_))));
            assert!(matches!(second.ack.await, Err(StorageError::WriteAborted(_))));
            assert_eq!(log.end_offset(), 9);
            assert_eq!(log.epochs(), epochs(&[(1, 0)]), "the aborted epoch is forgotten");
            // Usable: the same offsets go to the next appends.
            assert_eq!(append_acked(&log, &[5], 1).await, [(9, 14)]);
            assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..14).collect::<Vec<_>>());
            log.close().await.unwrap();
        });
    }
}

#[test]
fn a_failed_sync_fails_the_log_until_recovery() {
    run(|| async {
        let log = mem(FsyncPolicy::Always);
        append_acked(&log, &[3, 3], 1).await;
        log.fail_next_sync();
        let unsynced = log.append_leader(batch_at(6, 2), 1).await.unwrap();
        assert!(matches!(unsynced.ack.await, Err(StorageError::Failed(_))));
        assert!(log.is_failed());
        assert_eq!(log.acked_offset(), 6, "what failed to sync is not acknowledged");
        assert!(matches!(log.append_leader(batch_at(8, 1), 1).await, Err(StorageError::Failed(_))));
        assert!(matches!(log.flush().await, Err(StorageError::Failed(_))));
        assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..6).collect::<Vec<_>>(), "reads still work");
        // Recovery: the acknowledged records are there, and the log takes writes again.
        let recovered = log.crash(Crash::default());
        assert_eq!(recovered.end_offset, 6);
        assert!(!log.is_failed());
        assert_eq!(append_acked(&log, &[2], 2).await, [(6, 8)]);
        assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..8).collect::<Vec<_>>());
        // Under fsync=never a failed sync shows at flush.
        let log = mem(FsyncPolicy::Never);
        append_acked(&log, &[3], 1).await;
        log.fail_next_sync();
        assert!(matches!(log.flush().await, Err(StorageError::Failed(_))));
        assert!(log.is_failed());
    });
}

#[test]
fn a_crash_loses_only_the_unacknowledged_suffix() {
    run(|| async {
        // fsync=always: acknowledged means synced, so no crash takes it back.
        let log = mem(FsyncPolicy::Always);
        append_acked(&log, &[2, 3, 4], 1).await;
        log.hold_writes();
        let pending: Vec<_> = [(9, 2), (11, 3), (14, 1)]
            .into_iter()
            .map(|(first, count)| log.append_leader(batch_at(first, count), 2))
            .collect();
        let mut acks = Vec::new();
        for append in pending {
            acks.push(append.await.unwrap().ack);
        }
        assert_eq!((log.acked_offset(), log.end_offset()), (9, 15));
        let recovered = log.crash(Crash::default());
        assert_eq!((recovered.end_offset, recovered.batches_lost, recovered.torn_bytes_dropped), (9, 3, 0));
        for ack in acks {
            assert!(matches!(ack.await, Err(StorageError::Closed)), "the process died: no ack");
        }
        assert_eq!((log.end_offset(), log.acked_offset()), (9, 9));
        assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..9).collect::<Vec<_>>());
        assert_eq!(log.epochs(), epochs(&[(1, 0)]), "rebuilt from the recovered batches");
        // Some of the unsynced batches may survive too: never more than were appended.
        log.hold_writes();
        for (first, count) in [(9, 2), (11, 3)] {
            drop(log.append_leader(batch_at(first, count), 2).await.unwrap());
        }
        let recovered = log.crash(Crash { keep_unsynced: 1, torn: false });
        assert_eq!((recovered.end_offset, recovered.batches_lost), (11, 1));
        assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..11).collect::<Vec<_>>());
        assert_eq!(log.epochs(), epochs(&[(1, 0), (2, 9)]));

        // fsync=never: acknowledged means written. A crash of the process keeps it; a power
        // loss loses what was not synced yet (the documented limit of that policy).
        let log = mem(FsyncPolicy::Never);
        append_acked(&log, &[2, 3], 1).await;
        log.flush().await.unwrap();
        append_acked(&log, &[4, 1], 1).await;
        assert_eq!((log.synced_offset(), log.acked_offset()), (5, 10));
        let recovered = log.crash_process();
        assert_eq!((recovered.end_offset, recovered.batches_lost), (10, 0));
        append_acked(&log, &[4], 1).await;
        assert_eq!(log.synced_offset(), 10, "recovered records count as synced, as after the real recovery");
        let recovered = log.crash(Crash::default());
        assert_eq!((recovered.end_offset, recovered.batches_lost), (10, 1));
        assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..10).collect::<Vec<_>>());
    });
}

#[test]
fn a_torn_batch_is_dropped_on_recovery() {
    run(|| async {
        let log = mem(FsyncPolicy::Always);
        append_acked(&log, &[3, 3], 1).await;
        log.hold_writes();
        let mut sizes = Vec::new();
        for (first, count) in [(6, 2), (8, 5), (13, 2)] {
            let batch = batch_at(first, count);
            sizes.push(batch.len());
            drop(log.append_leader(batch, 1).await.unwrap());
        }
        // The first held batch landed whole, the second torn, the third not at all.
        let recovered = log.crash(Crash { keep_unsynced: 1, torn: true });
        assert_eq!(recovered.end_offset, 8);
        assert_eq!(recovered.batches_lost, 2);
        assert_eq!(recovered.torn_bytes_dropped, sizes[1], "the torn batch is dropped whole");
        assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..8).collect::<Vec<_>>());
        // The log continues cleanly after the cut.
        assert_eq!(append_acked(&log, &[5], 2).await, [(8, 13)]);
        assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..13).collect::<Vec<_>>());
        // Torn with nothing unsynced: nothing to tear, nothing lost.
        let recovered = log.crash(Crash { keep_unsynced: 0, torn: true });
        assert_eq!((recovered.end_offset, recovered.batches_lost, recovered.torn_bytes_dropped), (13, 0, 0));
    });
}

// ---------------------------------------------------------------------------------------------
// The real log across a reopen

#[test]
fn real_log_keeps_a_reset_and_follower_offsets_across_a_reopen() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let log = Log::open(&path, config(FsyncPolicy::Always)).await.unwrap();
        append_acked(&log, &counts(40), 1).await;
        assert!(log.segment_count() > 2, "several segments to remove");
        log.reset_to(5000).await.unwrap();
        assert_eq!(log.segment_bases(), [5000]);
        log.append_follower(follower_batches(5000, &[3, 4], &[6, 7])).await.unwrap().ack.await.unwrap();
        log.close().await.unwrap();

        let log = Log::open(&path, config(FsyncPolicy::Always)).await.unwrap();
        assert_eq!(
            (PartitionLog::start_offset(&log), log.end_offset(), log.acked_offset()),
            (5000, 5007, 5007)
        );
        assert_eq!(read_all(&log, 5000, 1000, u64::MAX).await, (5000..5007).collect::<Vec<_>>());
        assert!(log.epochs().is_empty(), "epochs are not persisted yet");
        // A reset that is never closed (a crash right after it) recovers too.
        log.reset_to(9).await.unwrap();
        append_acked(&log, &[2], 8).await;
        drop(log);
        let log = Log::open(&path, config(FsyncPolicy::Always)).await.unwrap();
        assert_eq!((PartitionLog::start_offset(&log), log.end_offset()), (9, 11));
        assert_eq!(read_all(&log, 9, 1000, u64::MAX).await, (9..11).collect::<Vec<_>>());
        log.close().await.unwrap();
    });
}

/// With `checkpoint_interval` 0 every sync is followed by a checkpoint write that the ack does
/// not wait for, so each reset and truncation below starts while one may be in flight. In CI a
/// reset once removed the checkpoint file between that write's open and glommio's `statfs` of
/// the path, and the executor panicked (glommio patch 4 asks the descriptor instead); and a
/// write from before a reset or truncation could land after it, pointing recovery at files
/// that were gone (writes now carry the log's generation). The interleaving is rare (400
/// rounds here did not hit it on this machine); the rounds check what every interleaving must
/// leave. Every round ends in a crash (the log is dropped, not closed).
#[test]
fn resets_and_truncations_racing_checkpoint_writes_recover_what_they_left() {
    // Under `interval` a sync may still be in flight when a roll and a truncation pass it: its
    // completion used to move the synced mark and the checkpoint past the truncated end, and
    // the log then refused to open ("shorter than its recovery position"). That interleaving
    // (found in review) needs a sync to outlast a roll; these rounds did not hit it with the
    // fix disabled, so they check what every policy must leave, not that one race.
    for fsync in
        [FsyncPolicy::Always, FsyncPolicy::Interval(std::time::Duration::from_millis(1)), FsyncPolicy::Never]
    {
        racing_rounds(fsync);
    }
}

fn racing_rounds(fsync: FsyncPolicy) {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let mut start = 0;
        for round in 0..100u64 {
            let log = Log::open(&path, config(fsync)).await.unwrap();
            assert_eq!(PartitionLog::start_offset(&log), start, "round {round}: the start survives");
            let end = log.end_offset();
            append_acked(&log, &counts(6), 1).await;
            let expected_end = if round % 2 == 0 {
                // Below everything written so far, or far above it.
                start = if round % 4 == 0 { 3 + round } else { 100_000 + round * 1000 };
                log.reset_to(start).await.unwrap();
                append_acked(&log, &[2], 2).await;
                start + 2
            } else {
                let kept = log.truncate(end + 1).await.unwrap();
                assert!(kept <= end + 1);
                kept
            };
            drop(log);
            let log = Log::open(&path, config(fsync)).await.unwrap();
            assert_eq!(
                (PartitionLog::start_offset(&log), log.end_offset()),
                (start, expected_end),
                "{fsync:?} round {round}"
            );
            let offsets = read_all(&log, start, 1000, u64::MAX).await;
            assert_eq!(offsets, (start..expected_end).collect::<Vec<_>>(), "round {round}");
            drop(log);
        }
    });
}

/// A sync that a roll and then a truncation overtake (found in review): with the sync held in
/// flight, the log rolls and is truncated back into the segment that sync covered. The sync's
/// completion used to move the synced mark and the recovery checkpoint to its old position,
/// past the new end, and the log then refused to open ("shorter than its recovery position").
#[test]
fn a_sync_overtaken_by_a_truncation_moves_nothing() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let fsync = FsyncPolicy::Interval(std::time::Duration::from_millis(1));
        let config = LogConfig { checkpoint_interval: std::time::Duration::ZERO, ..config(fsync) };
        let log = Log::open(&path, config).await.unwrap();
        append_acked(&log, &[3, 3], 1).await;
        skein_storage::handles::set_flusher_sync_delay(std::time::Duration::from_millis(200));
        append_acked(&log, &[3, 3], 1).await;
        // The interval sync of everything so far starts and waits (200 ms).
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
        log.roll().await.unwrap();
        assert_eq!(log.truncate(4).await.unwrap(), 3, "the batch holding offset 4 goes");
        skein_storage::handles::set_flusher_sync_delay(std::time::Duration::ZERO);
        // The held sync completes after the truncation.
        glommio::timer::sleep(std::time::Duration::from_millis(400)).await;
        assert_eq!(log.end_offset(), 3);
        drop(log);
        let log = Log::open(&path, config).await.expect("opens after the overtaken sync");
        assert_eq!(log.end_offset(), 3);
        assert_eq!(read_all(&log, 0, 1000, u64::MAX).await, (0..3).collect::<Vec<_>>());
        log.close().await.unwrap();
    });
}
