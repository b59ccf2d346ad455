//! Behaviour of the partition log through its public API, on real O_DIRECT files.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{batch_at, check_records, file_read_config, read_next, run, timestamp_for, tmp, Rng};
use skein_storage::batch::{self, BatchBuilder};
use skein_storage::{FsyncPolicy, Log, LogConfig, ReadData, StorageError};

async fn append_all(log: &Log, batches: &[u64]) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    for &count in batches {
        let first = log.next_offset();
        let appended = log.append(batch_at(first, count)).await.unwrap();
        assert_eq!(appended.base_offset, first);
        assert_eq!(appended.last_offset, first + count - 1);
        appended.ack.await.unwrap();
        ranges.push((appended.base_offset, appended.last_offset));
    }
    ranges
}

/// A log at `path` with `batches` (record counts) appended and closed: opened again, nothing is
/// in memory.
fn written_and_closed(path: &std::path::Path, config: LogConfig, batches: &[u64]) {
    let (path, batches) = (path.to_owned(), batches.to_vec());
    run(move || async move {
        let log = Log::open(&path, config).await.unwrap();
        append_all(&log, &batches).await;
        log.close().await.unwrap();
    });
}

async fn read_everything(log: &Log) -> Vec<u64> {
    let mut offsets = Vec::new();
    let mut next = log.start_offset();
    while next < log.visible_offset() {
        let (bytes, after) = log.read_verified(next, 2000).await.unwrap();
        assert!(after > next, "reads make progress");
        let seen = check_records(bytes);
        assert_eq!(seen.first().copied().map(|first| first <= next), Some(true));
        offsets.extend(seen.into_iter().filter(|&o| o >= next));
        next = after;
    }
    offsets
}

#[test]
fn offsets_are_assigned_in_order_and_read_back() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let log =
            Log::open(&path, LogConfig { fsync: FsyncPolicy::Always, ..LogConfig::tiny() }).await.unwrap();
        let mut rng = Rng(1);
        let counts: Vec<u64> = (0..60).map(|_| 1 + rng.below(9)).collect();
        let ranges = append_all(&log, &counts).await;
        let total: u64 = counts.iter().sum();
        assert_eq!(log.next_offset(), total);
        assert_eq!(log.visible_offset(), total);
        assert_eq!(log.synced_offset(), total, "fsync=always acknowledges only synced data");
        assert_eq!(read_everything(&log).await, (0..total).collect::<Vec<_>>());
        // A read from the middle of a batch starts at that batch.
        let (first, last) = ranges[10];
        if last > first {
            let slice = log.read(first + 1, 1).await.unwrap();
            assert_eq!(slice.first_offset, first);
            assert_eq!(slice.next_offset, last + 1, "at least one whole batch");
        }
        // The end of the log reads empty; past it is out of range.
        assert!(log.read(total, 100).await.unwrap().is_empty());
        assert!(matches!(log.read(total + 1, 100).await, Err(StorageError::OffsetOutOfRange { .. })));
        assert!(log.segment_count() > 3, "tiny segments roll: {}", log.segment_count());
        log.close().await.unwrap();
    });
}

#[test]
fn recent_batches_come_from_memory_older_ones_from_stable_file_ranges() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let config = LogConfig { segment_bytes: 1 << 20, cache_bytes_max: 2048, ..LogConfig::tiny() };
        let log = Log::open(&path, config).await.unwrap();
        append_all(&log, &[5; 40]).await;
        let newest = log.read(log.visible_offset() - 1, 100).await.unwrap();
        assert!(matches!(newest.data, ReadData::Memory(_)), "the tail is served from the cache");
        let oldest = log.read(0, 3000).await.unwrap();
        let ReadData::File { segment, position, len } = oldest.data.clone() else {
            panic!("old data is served from the segment file");
        };
        assert!(log.cache_bytes() <= 2048 + 4096 + 2048, "cache stays bounded: {}", log.cache_bytes());
        // The same bytes through the page cache (what sendfile would send) and through O_DIRECT.
        let fd = segment.open_buffered().unwrap();
        let mut buffer = vec![0u8; len as usize];
        let read = unsafe {
            libc::pread(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                position as libc::off_t,
            )
        };
        assert_eq!(read as usize, buffer.len());
        let direct = oldest.clone().into_bytes().await.unwrap();
        assert_eq!(&direct[..], &buffer[..]);
        let offsets = check_records(direct);
        assert_eq!(offsets.first(), Some(&0));
        assert_eq!(offsets.last().map(|o| o + 1), Some(oldest.next_offset));
        assert!(oldest.len() <= 3000 || offsets.len() == 5, "respects bytes_max unless one batch is larger");
        log.close().await.unwrap();
    });
}

#[test]
fn the_shards_logs_share_one_cache_bound_and_the_busiest_log_holds_most_of_it() {
    let dir = tmp();
    let (busy_path, idle_path) = (dir.path().join("busy"), dir.path().join("idle"));
    run(move || async move {
        const BOUND: usize = 64 << 10;
        skein_storage::handles::set_cache_bytes_max(Some(BOUND));
        let config = LogConfig { segment_bytes: 1 << 20, cache_bytes_max: usize::MAX, ..LogConfig::tiny() };
        let busy = Log::open(&busy_path, config).await.unwrap();
        let idle = Log::open(&idle_path, config).await.unwrap();
        append_all(&idle, &[5; 20]).await;
        let idle_before = idle.cache_bytes();
        assert!(idle_before > 2048, "the idle log cached its writes: {idle_before}");
        append_all(&busy, &[5; 400]).await;
        let stats = skein_storage::handles::stats();
        assert_eq!(stats.cache_bytes_max, Some(BOUND));
        assert!(stats.cache_bytes <= BOUND + 2 * 4096, "the shard stays bounded: {}", stats.cache_bytes);
        assert_eq!(stats.cache_bytes, busy.cache_bytes() + idle.cache_bytes());
        assert!(stats.cache_evictions > 0);
        // The idle log's batches were the shard's oldest: they went first (all but its last,
        // unstable block), and the busy log holds the rest of the bound, far more than any
        // fixed share per log would give it.
        assert!(
            idle.cache_bytes() <= 4096,
            "the idle log kept only its unstable block: {}",
            idle.cache_bytes()
        );
        assert!(
            busy.cache_bytes() >= BOUND - 2 * 4096,
            "the busy log holds most of the bound: {}",
            busy.cache_bytes()
        );
        // What the busy log holds is served from memory, from its oldest cached offset on.
        let visible = busy.visible_offset();
        let mut from_memory = 0;
        let mut next = visible;
        while next > 0 {
            match busy.read(next - 1, 1).await.unwrap().data {
                ReadData::Memory(chunks) => from_memory += chunks.iter().map(|c| c.len()).sum::<usize>(),
                _ => break,
            }
            next -= 5;
        }
        assert!(from_memory >= BOUND / 2, "recent reads come from memory: {from_memory}");
        assert_eq!(read_everything(&busy).await, (0..visible).collect::<Vec<_>>());
        busy.close().await.unwrap();
        idle.close().await.unwrap();
        assert_eq!(skein_storage::handles::stats().cache_bytes, 0, "closed logs hold nothing");
    });
}

#[test]
fn close_and_reopen_keeps_every_record_and_the_index() {
    let dir = tmp();
    let path = dir.path().join("p0");
    let path2 = path.clone();
    let total = run(move || async move {
        let log = Log::open(&path, LogConfig::tiny()).await.unwrap();
        append_all(&log, &[7; 80]).await;
        let total = log.next_offset();
        log.close().await.unwrap();
        total
    });
    // Every sealed segment has both index files; names are 20-digit base offsets.
    let mut names: Vec<String> =
        std::fs::read_dir(&path2).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let logs: Vec<&String> = names.iter().filter(|n| n.ends_with(".log")).collect();
    assert!(logs.len() > 3);
    for log_name in &logs[..logs.len() - 1] {
        let stem = log_name.trim_end_matches(".log");
        assert_eq!(stem.len(), 20);
        assert!(names.contains(&format!("{stem}.index")), "{stem}.index in {names:?}");
        assert!(names.contains(&format!("{stem}.timeindex")));
    }
    run(move || async move {
        let log = Log::open(&path2, LogConfig::tiny()).await.unwrap();
        assert_eq!(log.next_offset(), total);
        assert_eq!(log.visible_offset(), total);
        assert_eq!(read_everything(&log).await, (0..total).collect::<Vec<_>>());
        // Appending continues after the last offset.
        let appended = log.append(batch_at(total, 3)).await.unwrap();
        assert_eq!(appended.base_offset, total);
        appended.ack.await.unwrap();
        log.close().await.unwrap();
    });
}

#[test]
fn timestamp_lookup_finds_the_first_record_at_or_after() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let log = Log::open(&path, LogConfig::tiny()).await.unwrap();
        append_all(&log, &[4; 60]).await;
        let total = log.next_offset();
        for probe in [0u64, 1, 5, 17, 100, 123, 200, total - 1] {
            let target = timestamp_for(probe);
            let expected = (0..total).find(|&o| timestamp_for(o) >= target);
            assert_eq!(
                log.offset_for_timestamp(target).await.unwrap(),
                expected,
                "timestamp of offset {probe}"
            );
        }
        assert_eq!(log.offset_for_timestamp(i64::MIN).await.unwrap(), Some(0));
        assert_eq!(log.offset_for_timestamp(timestamp_for(total) + 1000).await.unwrap(), None);
        log.close().await.unwrap();
    });
}

#[test]
fn retention_deletes_whole_sealed_segments_by_size_and_by_age() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let config = LogConfig { retention_bytes_max: Some(40 << 10), ..LogConfig::tiny() };
        let log = Log::open(&path, config).await.unwrap();
        append_all(&log, &[8; 120]).await;
        let before = log.size_bytes();
        assert!(before > 40 << 10);
        let outcome = log.enforce_retention(skein_storage::now_ms()).await.unwrap();
        assert!(outcome.segments_deleted > 0);
        assert!(log.size_bytes() <= 40 << 10 || log.segment_count() == 1);
        assert_eq!(outcome.start_offset, log.start_offset());
        assert_eq!(log.segment_bases()[0], log.start_offset(), "the log starts at a segment base");
        assert!(matches!(log.read(0, 10).await, Err(StorageError::OffsetOutOfRange { .. })));
        let rest = read_everything(&log).await;
        assert_eq!(rest, (log.start_offset()..log.next_offset()).collect::<Vec<_>>());
        log.close().await.unwrap();
    });
    let dir = tmp();
    let path = dir.path().join("p1");
    run(move || async move {
        let config = LogConfig { retention_age_max: Some(Duration::from_secs(3600)), ..LogConfig::tiny() };
        let log = Log::open(&path, config).await.unwrap();
        append_all(&log, &[8; 40]).await;
        let sealed = log.segment_count() - 1;
        // Records carry timestamps from 2023: an hour later than the newest, all sealed go.
        let later = timestamp_for(log.next_offset()) + 3_600_001;
        let outcome = log.enforce_retention(later).await.unwrap();
        assert_eq!(outcome.segments_deleted, sealed);
        assert_eq!(log.segment_count(), 1, "the active segment is never deleted");
        // Nothing is old enough right after the newest record.
        let now = timestamp_for(log.next_offset());
        assert_eq!(log.enforce_retention(now).await.unwrap().segments_deleted, 0);
        log.close().await.unwrap();
    });
}

#[test]
fn delete_segments_before_keeps_every_segment_holding_a_later_record() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let log = Log::open(&path, LogConfig::tiny()).await.unwrap();
        append_all(&log, &[8; 60]).await;
        let bases = log.segment_bases();
        assert!(bases.len() >= 4, "tiny segments roll: {bases:?}");
        // A cut inside the third segment keeps it and everything after.
        let cut = bases[2] + 1;
        let outcome = log.delete_segments_before(cut).await.unwrap();
        assert_eq!(outcome.segments_deleted, 2);
        assert_eq!(log.start_offset(), bases[2]);
        assert_eq!(read_everything(&log).await, (bases[2]..log.next_offset()).collect::<Vec<_>>());
        // A cut past the end never removes the active segment.
        log.delete_segments_before(u64::MAX).await.unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.segment_bases()[0], *bases.last().unwrap());
        log.close().await.unwrap();
        // And the deletion survives reopening.
        let log = Log::open(&path, LogConfig::tiny()).await.unwrap();
        assert_eq!(log.start_offset(), *bases.last().unwrap());
        log.close().await.unwrap();
    });
}

#[test]
fn truncate_drops_whole_batches_and_appends_continue() {
    let dir = tmp();
    let path = dir.path().join("p0");
    let path2 = path.clone();
    run(move || async move {
        let log = Log::open(&path, LogConfig::tiny()).await.unwrap();
        let ranges = append_all(&log, &[5; 100]).await;
        let segments_before = log.segment_count();
        // Inside the active segment, in the middle of a batch: the whole batch goes.
        let (first, _) = ranges[98];
        assert_eq!(log.truncate(first + 2).await.unwrap(), first);
        assert_eq!(log.next_offset(), first);
        // Deep into a sealed segment.
        let (first, _) = ranges[20];
        assert_eq!(log.truncate(first + 1).await.unwrap(), first);
        assert!(log.segment_count() < segments_before);
        assert_eq!(read_everything(&log).await, (0..first).collect::<Vec<_>>());
        // The cut segment is active again: appends go on from the cut.
        append_all(&log, &[5; 30]).await;
        assert_eq!(read_everything(&log).await, (0..first + 150).collect::<Vec<_>>());
        // Truncating at or past the end changes nothing; below the start is refused.
        assert_eq!(log.truncate(10_000).await.unwrap(), first + 150);
        log.close().await.unwrap();
    });
    run(move || async move {
        let log = Log::open(&path2, LogConfig::tiny()).await.unwrap();
        let (_, expected) = (0, log.next_offset());
        assert_eq!(read_everything(&log).await, (0..expected).collect::<Vec<_>>());
        // Truncating to the very start empties the log.
        assert_eq!(log.truncate(0).await.unwrap(), 0);
        assert_eq!(log.next_offset(), 0);
        assert!(log.read(0, 100).await.unwrap().is_empty());
        append_all(&log, &[3]).await;
        log.close().await.unwrap();
    });
}

#[test]
fn invalid_batches_are_refused_and_nothing_is_written() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let log = Log::open(&path, LogConfig::tiny()).await.unwrap();
        append_all(&log, &[2]).await;
        let mut bad_crc = batch_at(2, 2);
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        assert!(matches!(
            log.append(bad_crc).await,
            Err(StorageError::InvalidBatch(batch::BatchError::CrcMismatch { .. }))
        ));
        let mut two = batch_at(2, 1);
        two.extend_from_slice(&batch_at(3, 1));
        assert!(matches!(
            log.append(two).await,
            Err(StorageError::InvalidBatch(batch::BatchError::TrailingBytes(_)))
        ));
        let mut huge = BatchBuilder::new();
        huge.push(0, None, Some(&vec![0u8; 20 << 10]), &[]);
        assert!(matches!(
            log.append(huge.finish()).await,
            Err(StorageError::InvalidBatch(batch::BatchError::TooLarge { .. }))
        ));
        assert!(log.append(BytesMut::from(&b"garbage"[..])).await.is_err());
        assert_eq!(log.next_offset(), 2, "nothing was written");
        append_all(&log, &[2]).await;
        assert_eq!(read_everything(&log).await, vec![0, 1, 2, 3]);
        log.close().await.unwrap();
    });
}

#[test]
fn fsync_policies_ack_at_their_point() {
    for policy in [FsyncPolicy::Never, FsyncPolicy::Interval(Duration::from_millis(20)), FsyncPolicy::Always]
    {
        let dir = tmp();
        let path = dir.path().join("p0");
        run(move || async move {
            let log =
                Log::open(&path, LogConfig { fsync: policy, segment_bytes: 1 << 20, ..LogConfig::tiny() })
                    .await
                    .unwrap();
            append_all(&log, &[3; 10]).await;
            assert_eq!(log.visible_offset(), 30);
            match policy {
                FsyncPolicy::Always => assert_eq!(log.synced_offset(), 30),
                FsyncPolicy::Interval(_) => {
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    assert_eq!(log.synced_offset(), 30, "the interval sync came");
                }
                FsyncPolicy::Never => {
                    log.flush().await.unwrap();
                    assert_eq!(log.synced_offset(), 30, "flush syncs whatever the policy");
                }
            }
            log.close().await.unwrap();
        });
    }
}

#[test]
fn many_appends_in_flight_respect_the_buffer_bound() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let config =
            LogConfig { write_buffered_bytes_max: 8192, fsync: FsyncPolicy::Never, ..LogConfig::tiny() };
        let log = Log::open(&path, config).await.unwrap();
        let mut acks = Vec::new();
        for _ in 0..300 {
            let first = log.next_offset();
            acks.push(log.append(batch_at(first, 4)).await.unwrap().ack);
        }
        for ack in acks {
            ack.await.unwrap();
        }
        assert_eq!(read_everything(&log).await, (0..1200).collect::<Vec<_>>());
        log.close().await.unwrap();
    });
}

#[test]
fn long_poll_wakes_when_data_arrives() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let log = std::rc::Rc::new(Log::open(&path, LogConfig::tiny()).await.unwrap());
        let started = std::time::Instant::now();
        assert_eq!(log.wait_for_data(0, Duration::from_millis(50)).await, 0);
        assert!(started.elapsed() >= Duration::from_millis(50));
        let writer = log.clone();
        let task = glommio::spawn_local(async move {
            glommio::timer::sleep(Duration::from_millis(30)).await;
            writer.append(batch_at(0, 2)).await.unwrap().ack.await.unwrap();
        });
        let started = std::time::Instant::now();
        assert_eq!(log.wait_for_data(0, Duration::from_secs(10)).await, 2);
        assert!(started.elapsed() < Duration::from_secs(5));
        task.await;
        let log = std::rc::Rc::try_unwrap(log).ok().unwrap();
        log.close().await.unwrap();
    });
}

#[test]
fn segments_roll_by_age() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let config = LogConfig {
            segment_age_max: Some(Duration::from_millis(50)),
            segment_bytes: 1 << 20,
            ..LogConfig::tiny()
        };
        let log = Log::open(&path, config).await.unwrap();
        append_all(&log, &[2]).await;
        append_all(&log, &[2]).await;
        assert_eq!(log.segment_count(), 1);
        glommio::timer::sleep(Duration::from_millis(60)).await;
        append_all(&log, &[2]).await;
        assert_eq!(log.segment_count(), 2);
        assert_eq!(log.segment_bases(), vec![0, 4]);
        assert_eq!(read_everything(&log).await, (0..6).collect::<Vec<_>>());
        log.close().await.unwrap();
    });
}

#[test]
#[should_panic(expected = "offset 0")]
fn the_value_check_catches_a_record_at_the_wrong_offset() {
    // Records built for offsets 40.. but stamped at 0: the helper every test relies on notices.
    check_records(batch_at(40, 3).freeze());
}

/// Descriptors this process holds now on files under `dir` (Linux `/proc`).
fn open_descriptors(dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target.starts_with(dir)))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn many_logs_live_within_the_open_files_budget() {
    let dir = tmp();
    let root = dir.path().to_path_buf();
    run(move || async move {
        const LOGS: usize = 60;
        const BUDGET: usize = 8;
        skein_storage::handles::set_open_files_max(Some(BUDGET));
        let config = LogConfig { fsync: FsyncPolicy::Never, ..LogConfig::tiny() };
        let mut logs = Vec::new();
        for index in 0..LOGS {
            logs.push(Log::open(root.join(format!("p{index}")), config).await.unwrap());
        }
        // Enough appends to seal several segments in every log (tiny segments are 16 KiB).
        for round in 0..120u64 {
            for log in &logs {
                append_all(log, &[1 + round % 7]).await;
            }
        }
        let stats = skein_storage::handles::stats();
        assert!(stats.open_files <= BUDGET, "at most the budget is open: {stats:?}");
        assert!(stats.closed > 0, "files were closed to stay within it: {stats:?}");
        let segments: usize = logs.iter().map(|log| log.segment_count()).sum();
        assert!(logs.iter().all(|log| log.segment_count() > 1), "segments were sealed ({segments} in all)");
        // Every log reads back whole, sealed segments included, reopening files as needed.
        for log in &logs {
            let total = log.visible_offset();
            assert_eq!(read_everything(log).await, (0..total).collect::<Vec<_>>());
        }
        let held = open_descriptors(&root);
        assert!(held <= BUDGET, "{held} descriptors held by {LOGS} logs with a budget of {BUDGET}");
        for log in logs {
            log.close().await.unwrap();
        }
        assert_eq!(skein_storage::handles::stats().open_files, 0, "closed logs hold nothing");
        // Reopened under the same budget: recovery too stays within it.
        let mut reopened = Vec::new();
        for index in 0..LOGS {
            reopened.push(Log::open(root.join(format!("p{index}")), config).await.unwrap());
        }
        assert!(skein_storage::handles::stats().open_files <= BUDGET);
        for log in &reopened {
            let total = log.visible_offset();
            assert!(total > 0);
            assert_eq!(read_everything(log).await, (0..total).collect::<Vec<_>>());
        }
        for log in reopened {
            log.close().await.unwrap();
        }
        skein_storage::handles::set_open_files_max(None);
    });
}

/// Bytes allocated on disk for a file.
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn preallocation_follows_the_write_rate_and_the_shard_limit() {
    let dir = tmp();
    let root = dir.path().to_path_buf();
    run(move || async move {
        let config = LogConfig {
            fsync: FsyncPolicy::Never,
            segment_bytes: 64 << 20,
            batch_bytes_max: 1 << 20,
            preallocate_bytes: 16 << 20,
            ..LogConfig::default()
        };
        // One small record: only the first step is allocated, not a whole preallocation.
        let quiet = Log::open(root.join("quiet"), config).await.unwrap();
        append_all(&quiet, &[1]).await;
        let segment = root.join("quiet").join(format!("{:020}.log", 0));
        assert!(
            allocated(&segment) <= 128 << 10,
            "a quiet partition allocates little: {}",
            allocated(&segment)
        );
        // A busy log: the step grows with the rate.
        let busy = Log::open(root.join("busy"), config).await.unwrap();
        for _ in 0..200 {
            let first = busy.next_offset();
            busy.append(big_batch(first, 64 << 10)).await.unwrap().ack.await.unwrap();
        }
        let busy_segment = root.join("busy").join(format!("{:020}.log", 0));
        let ahead = allocated(&busy_segment).saturating_sub(busy.size_bytes());
        assert!(ahead > 2 << 20, "a busy partition allocates ahead, more as it goes ({ahead} bytes)");
        // With the shard's limit at zero, a log allocates only what it writes.
        skein_storage::handles::set_preallocate_bytes_max(Some(0));
        let limited = Log::open(root.join("limited"), config).await.unwrap();
        for _ in 0..50 {
            let first = limited.next_offset();
            limited.append(big_batch(first, 64 << 10)).await.unwrap().ack.await.unwrap();
        }
        let limited_segment = root.join("limited").join(format!("{:020}.log", 0));
        assert!(
            allocated(&limited_segment) <= limited.size_bytes() + (1 << 20),
            "within the limit: {} allocated for {} bytes",
            allocated(&limited_segment),
            limited.size_bytes()
        );
        skein_storage::handles::set_preallocate_bytes_max(None);
        // A clean close gives the space ahead back.
        busy.close().await.unwrap();
        let (kept, len) = (allocated(&busy_segment), std::fs::metadata(&busy_segment).unwrap().len());
        assert!(kept <= len + (64 << 10), "{kept} bytes allocated for {len} after the close");
        quiet.close().await.unwrap();
        limited.close().await.unwrap();
        assert_eq!(skein_storage::handles::stats().allocated_ahead_bytes, 0);
    });
}

/// One batch of about `bytes` bytes whose first offset is `first`.
fn big_batch(first: u64, bytes: usize) -> BytesMut {
    let mut builder = BatchBuilder::new();
    let value = vec![b'v'; 1000];
    while builder.size_bytes() + 1100 < bytes {
        builder.push(1_700_000_000_000 + first as i64, None, Some(&value), &[]);
    }
    let _ = batch::BATCH_HEADER_BYTES;
    builder.finish()
}

#[test]
fn settings_change_on_an_open_log_and_lowering_a_limit_keeps_stored_batches_readable() {
    let dir = tmp();
    let path = dir.path().join("p0");
    let path2 = path.clone();
    let lowered = LogConfig { batch_bytes_max: 2048, ..LogConfig::tiny() };
    let total = run(move || async move {
        let log = Log::open(&path, LogConfig::tiny()).await.unwrap();
        // A batch near the old limit (12 KiB), stored before the limit is lowered.
        let big = batch_at(0, 50);
        assert!(big.len() > 2048 && big.len() < 12 << 10, "{}", big.len());
        log.append(big).await.unwrap().ack.await.unwrap();
        // A config that breaks a rule changes nothing.
        let broken = LogConfig { segment_bytes: 1024, ..LogConfig::tiny() };
        assert!(log.set_config(broken).is_err());
        assert_eq!(log.config(), LogConfig::tiny());
        // A batch validated under the old limit (a request being appended when the limit
        // changes) is still appended: a request is written whole or not at all.
        let in_flight = batch::ValidatedBatch::new(batch_at(50, 40), log.config().batch_bytes_max).unwrap();
        log.set_config(lowered).unwrap();
        assert_eq!(log.config().batch_bytes_max, 2048);
        log.append_validated(in_flight).await.unwrap().ack.await.unwrap();
        let refused = log.append(batch_at(90, 50)).await;
        assert!(
            matches!(refused, Err(StorageError::InvalidBatch(batch::BatchError::TooLarge { .. }))),
            "{refused:?}"
        );
        log.append(batch_at(90, 5)).await.unwrap().ack.await.unwrap();
        // The stored big batches are still read (and verified) under the lower limit.
        assert_eq!(read_everything(&log).await, (0..95).collect::<Vec<_>>());
        // Smaller segments from the next append on.
        let segments = log.segment_count();
        log.set_config(LogConfig { segment_bytes: 4096 + 2048, ..lowered }).unwrap();
        for first in (95..115).step_by(5) {
            log.append(batch_at(first, 5)).await.unwrap().ack.await.unwrap();
        }
        assert!(log.segment_count() > segments + 1, "{} segments, were {segments}", log.segment_count());
        // A retention limit set now applies at the next pass.
        let before = log.segment_count();
        log.set_config(LogConfig { retention_bytes_max: Some(1), segment_bytes: 4096 + 2048, ..lowered })
            .unwrap();
        let outcome = log.enforce_retention(skein_storage::now_ms()).await.unwrap();
        assert!(log.segment_count() < before, "{outcome:?}");
        assert_eq!(log.segment_count(), 1, "only the active segment stays");
        let total = log.next_offset();
        log.close().await.unwrap();
        total
    });
    // Reopened with the lowered limit: recovery keeps every batch (none looks torn). Retention
    // removed everything but the active segment, so check a log that kept the big batch too.
    run(move || async move {
        let log = Log::open(&path2, lowered).await.unwrap();
        assert_eq!(log.next_offset(), total);
        log.close().await.unwrap();
    });
    let dir = tmp();
    let path = dir.path().join("p1");
    let path2 = path.clone();
    run(move || async move {
        let log = Log::open(&path, LogConfig::tiny()).await.unwrap();
        log.append(batch_at(0, 50)).await.unwrap().ack.await.unwrap();
        log.close().await.unwrap();
    });
    run(move || async move {
        let log = Log::open(&path2, lowered).await.unwrap();
        assert_eq!(log.next_offset(), 50, "the batch stored under the old limit survives recovery");
        assert_eq!(read_everything(&log).await, (0..50).collect::<Vec<_>>());
        log.close().await.unwrap();
    });
}

#[test]
fn a_file_read_hands_back_the_read_ahead_pieces_unjoined_and_in_order() {
    use skein_storage::{LogData, PartitionLog};
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let log = Log::open(&path, file_read_config(LogConfig::tiny().index_interval_bytes)).await.unwrap();
        append_all(&log, &[1000; 60]).await;
        let end = log.visible_offset();
        // Consecutive reads of 3 MiB, as a consumer's fetches: from the second on each continues
        // the read-ahead, whose pieces are 2 MiB, so most span two pieces or more.
        let (mut next, mut split, mut file_reads, mut offsets) = (0, 0, 0, Vec::new());
        while next < end {
            let read = PartitionLog::read(&log, next, 3 << 20, u64::MAX).await.unwrap();
            let bytes = match read.data.clone() {
                LogData::File(range) => {
                    file_reads += 1;
                    let parts = log.read_range_parts(&range).await.unwrap();
                    assert!(parts.iter().all(|part| !part.is_empty()));
                    let joined = log.read_range(&range).await.unwrap();
                    assert_eq!(joined.len(), range.len());
                    let concatenated: Vec<u8> = parts.iter().flat_map(|part| part.iter().copied()).collect();
                    assert_eq!(&concatenated[..], &joined[..], "the parts are the range, in order");
                    if parts.len() > 1 {
                        split += 1;
                    }
                    joined
                }
                LogData::Memory(chunks) => chunks.concat().into(),
                LogData::Empty => panic!("an empty read below the end at {next}"),
            };
            offsets.extend(check_records(bytes).into_iter().filter(|&o| o >= next));
            next = read.next_offset;
        }
        assert_eq!(offsets, (0..end).collect::<Vec<_>>(), "every record once, in order");
        assert!(file_reads > 2, "the reads came from the file: {file_reads}");
        assert!(split > 0, "a read that spans read-ahead pieces gets them apart ({file_reads} file reads)");
        log.close().await.unwrap();
    });
}

#[test]
fn a_consumer_reading_on_finds_its_batches_in_the_read_ahead_and_reads_each_byte_once() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        // The sparse index has one entry every 32 MiB, so a read's first batch is found by
        // scanning headers from far behind it unless the log knows where the last read ended.
        let log = Log::open(&path, file_read_config(32 << 20)).await.unwrap();
        append_all(&log, &[1000; 60]).await;
        let end = log.visible_offset();
        let before = skein_storage::metrics::snapshot().direct_read_bytes;
        let (mut next, mut served, mut offsets) = (0, 0u64, Vec::new());
        while next < end {
            let (bytes, from_file, after) = read_next(&log, next, 1 << 20).await;
            served += from_file;
            offsets.extend(check_records(bytes).into_iter().filter(|&o| o >= next));
            next = after;
        }
        assert_eq!(offsets, (0..end).collect::<Vec<_>>(), "every record once, in order");
        let read_from_disk = skein_storage::metrics::snapshot().direct_read_bytes - before;
        assert!(served > 4 << 20, "the reads came from the file: {served} bytes");
        // The first read's header lookup (one 64 KiB window) and block alignment aside, every
        // byte came off the disk once: no read looked its first header up on the disk again.
        assert!(
            read_from_disk <= served + (256 << 10),
            "{read_from_disk} bytes read from the disk to serve {served}"
        );
        log.close().await.unwrap();
    });
}

#[test]
fn consumers_reading_at_different_places_each_keep_their_read_ahead() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        // Three consumers replay one log at once from three places (three groups, or a
        // follower beside two consumers), one read each in turn. Each read continues its own
        // read-ahead stream and cursor, so nothing read ahead for one is dropped by another's
        // read, and every byte each is served comes off the disk once.
        let log = Log::open(&path, file_read_config(1 << 20)).await.unwrap();
        append_all(&log, &[1000; 150]).await;
        let end = log.visible_offset();
        let before = skein_storage::metrics::snapshot().direct_read_bytes;
        let mut next = [0, end / 3, 2 * end / 3];
        let mut offsets: [Vec<u64>; 3] = Default::default();
        let mut served = 0u64;
        while next.iter().any(|&at| at < end) {
            for reader in 0..3 {
                if next[reader] >= end {
                    continue;
                }
                let from = next[reader];
                let (bytes, from_file, after) = read_next(&log, from, 1 << 20).await;
                served += from_file;
                offsets[reader].extend(check_records(bytes).into_iter().filter(|&o| o >= from));
                next[reader] = after;
            }
        }
        for (reader, from) in [0, end / 3, 2 * end / 3].into_iter().enumerate() {
            assert_eq!(
                offsets[reader],
                (from..end).collect::<Vec<_>>(),
                "reader {reader}: every record once, in order"
            );
        }
        let read_from_disk = skein_storage::metrics::snapshot().direct_read_bytes - before;
        assert!(served > 12 << 20, "the reads came from the file: {served} bytes");
        // Each reader's first header lookup (up to an index interval of 1 MiB, in 64 KiB windows)
        // and block alignment aside.
        assert!(
            read_from_disk <= served + 3 * (1 << 20),
            "{read_from_disk} bytes read from the disk to serve {served}"
        );
        log.close().await.unwrap();
    });
}

#[test]
fn read_ahead_left_unread_is_given_back() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        // A consumer reads a third of the log from the file and stops (it left, or caught up
        // and now reads the tail cache): what was read ahead for it goes back to the shard's
        // budget once its stream is idle, instead of staying until the log is read again.
        let log = Log::open(&path, file_read_config(1 << 20)).await.unwrap();
        append_all(&log, &[1000; 60]).await;
        let end = log.visible_offset();
        let mut next = 0;
        while next < end / 3 {
            next = read_next(&log, next, 1 << 20).await.2;
        }
        let held = skein_storage::handles::stats().read_ahead_bytes;
        assert!(held > 0, "the reads left bytes read ahead");
        let stopped = std::time::Instant::now();
        while skein_storage::handles::stats().read_ahead_bytes > 0 {
            assert!(
                stopped.elapsed() < skein_storage::READ_AHEAD_IDLE * 3,
                "{} bytes still read ahead {:?} after the last read",
                skein_storage::handles::stats().read_ahead_bytes,
                stopped.elapsed()
            );
            glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            stopped.elapsed() >= skein_storage::READ_AHEAD_IDLE / 2,
            "a reader that pauses keeps it a while"
        );
        // The log reads on as before after that.
        let read = skein_storage::PartitionLog::read(&log, next, 1 << 20, u64::MAX).await.unwrap();
        assert!(read.next_offset > next);
        log.close().await.unwrap();
    });
}

#[test]
fn file_reads_keep_their_bytes_after_the_executor_and_the_log_are_gone() {
    use skein_storage::{LogData, PartitionLog};
    let dir = tmp();
    let path = dir.path().join("p0");
    // The bytes of file reads land in DMA buffers that the returned `Bytes` own (no copy out of
    // them): they must stay valid on another thread after the log is closed, its files dropped
    // and the executor that read them has exited.
    let (reads, end) = run(move || async move {
        let log = Log::open(&path, file_read_config(LogConfig::tiny().index_interval_bytes)).await.unwrap();
        append_all(&log, &[1000; 30]).await;
        let end = log.visible_offset();
        let (mut next, mut reads) = (0, Vec::new());
        while next < end {
            let read = PartitionLog::read(&log, next, 700 << 10, u64::MAX).await.unwrap();
            match read.data.clone() {
                LogData::File(range) => reads.push((next, log.read_range_parts(&range).await.unwrap())),
                LogData::Memory(_) => {}
                LogData::Empty => panic!("an empty read below the end at {next}"),
            }
            next = read.next_offset;
        }
        log.close().await.unwrap();
        (reads, end)
    });
    drop(dir);
    let offsets: Vec<u64> = std::thread::spawn(move || {
        let mut offsets = Vec::new();
        for (from, parts) in reads {
            let bytes: bytes::Bytes = parts.concat().into();
            offsets.extend(check_records(bytes).into_iter().filter(|&o| o >= from));
        }
        offsets
    })
    .join()
    .unwrap();
    assert!(offsets.len() as u64 > end / 2, "most records came from file reads: {} of {end}", offsets.len());
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "the file reads' records are whole and in order");
}

#[test]
fn a_cold_tail_of_small_batches_is_read_in_few_reads_not_one_per_batch() {
    let dir = tmp();
    let path = dir.path().join("p0");
    written_and_closed(&path, file_read_config(4096), &[6; 12]);
    run(move || async move {
        // Reopened: nothing is in the tail cache, and the sparse index (an entry every 4 KiB)
        // has none past the first batches, so the tail is only known by scanning headers.
        let log = Log::open(&path, file_read_config(4096)).await.unwrap();
        let end = log.visible_offset();
        assert_eq!(end, 72);
        let before = skein_storage::metrics::snapshot().direct_read_bytes;
        let (mut next, mut reads, mut served, mut offsets) = (0, 0, 0, Vec::new());
        while next < end {
            let (bytes, _, after) = read_next(&log, next, 1 << 20).await;
            reads += 1;
            served += bytes.len() as u64;
            assert!(after > next, "reads make progress");
            offsets.extend(check_records(bytes).into_iter().filter(|&o| o >= next));
            next = after;
            assert!(reads <= 72, "bounded");
        }
        assert_eq!(offsets, (0..end).collect::<Vec<_>>(), "every record once, in order");
        assert!(reads <= 2, "a tail of 12 small batches that fits one fetch took {reads} reads");
        // Each byte from the disk once: the header scan finds the first batch in the bytes read
        // for the range (not in blocks of its own), and the tail's read takes what the read of
        // the range before it read ahead. Before, 25,346 bytes were read for these 12,673.
        let read = skein_storage::metrics::snapshot().direct_read_bytes - before;
        assert!(read <= served + 4096, "{read} bytes read from the disk to serve {served}");
        log.close().await.unwrap();
    });
}

#[test]
fn a_log_closed_for_removal_refuses_use_and_gives_back_its_space_ahead() {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let log = Log::open(&path, LogConfig::tiny()).await.unwrap();
        let before = skein_storage::handles::stats().allocated_ahead_bytes;
        // Appended and not yet synced (fsync on its interval): closing for removal still lets
        // the writes in flight finish, and makes nothing durable.
        for _ in 0..20 {
            let first = log.next_offset();
            log.append(batch_at(first, 5)).await.unwrap();
        }
        assert!(
            skein_storage::handles::stats().allocated_ahead_bytes > before,
            "the log allocated disk ahead of its data"
        );
        log.shutdown_for_removal().await.unwrap();
        assert_eq!(
            skein_storage::handles::stats().allocated_ahead_bytes,
            before,
            "the space allocated ahead is no longer counted"
        );
        assert!(matches!(log.append(batch_at(100, 1)).await, Err(StorageError::Closed)));
        assert!(matches!(log.shutdown().await, Err(StorageError::Closed)), "closed once");
        assert!(matches!(log.shutdown_for_removal().await, Err(StorageError::Closed)));
        drop(log);
        std::fs::remove_dir_all(&path).unwrap();
    });
}

#[test]
fn a_cold_read_during_a_truncation_leaves_no_stale_bytes_for_the_records_that_replace_the_cut() {
    use skein_storage::batch::{Batch, BatchSplitter};
    let dir = tmp();
    let path = dir.path().join("p0");
    written_and_closed(&path, file_read_config(4096), &[50; 40]);
    run(move || async move {
        // Reopened: every read is cold. A read runs while the log is being truncated (the two
        // interleave at the truncation's awaits), so it may read ahead the bytes being cut.
        let log = Log::open(&path, file_read_config(4096)).await.unwrap();
        let (truncated, _) = futures::join!(log.truncate(1000), async {
            let _ = log.read(1000, 1 << 20).await;
            let _ = log.read(1200, 1 << 20).await;
        });
        assert_eq!(truncated.unwrap(), 1000);
        // New records at the offsets cut, more than the tail cache holds (one block), so they
        // are read back from the file.
        for first in (1000..1400).step_by(50) {
            let mut builder = BatchBuilder::new();
            for offset in first..first + 50 {
                builder.push(timestamp_for(offset), None, Some(format!("new {offset}").as_bytes()), &[]);
            }
            log.append(builder.finish()).await.unwrap().ack.await.unwrap();
        }
        let mut next = 1000;
        while next < 1400 {
            let (bytes, _, after) = read_next(&log, next, 1 << 20).await;
            for batch in BatchSplitter::new(bytes, 1 << 24) {
                let batch: Batch = batch.expect("valid batch");
                for record in batch.records() {
                    let record = record.expect("valid record");
                    if record.offset >= next {
                        assert_eq!(
                            record.value.as_deref(),
                            Some(format!("new {}", record.offset).as_bytes()),
                            "offset {}: a record of the cut, not the one written after it",
                            record.offset
                        );
                    }
                }
            }
            assert!(after > next, "reads make progress");
            next = after;
        }
        log.close().await.unwrap();
    });
}
