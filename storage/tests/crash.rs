//! Crash recovery: torn tails, flipped bytes, damaged indexes and checkpoints, and a process
//! killed with SIGKILL while appending with `fsync=always`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{batch_at, check_records, run, tmp, Rng};
use skein_storage::{CorruptionKind, FsyncPolicy, Log, LogConfig, StorageError};

/// Batches written by `write_batches`: (base offset, record count, position, bytes).
type Written = Vec<(u64, u64, u64, u64)>;

/// Appends `count` batches and returns where each landed. With `close` false the log is
/// dropped without closing, as a crash would leave it (writes done, no final checkpoint).
fn write_batches(path: &Path, config: LogConfig, count: usize, seed: u64, close: bool) -> Written {
    let path = path.to_path_buf();
    run(move || async move {
        let log = Log::open(&path, config).await.unwrap();
        let mut rng = Rng(seed);
        let mut written = Vec::new();
        let mut position = 4096u64;
        let mut segment = 0u64;
        for _ in 0..count {
            let first = log.next_offset();
            let records = 1 + rng.below(6);
            let batch = batch_at(first, records);
            let len = batch.len() as u64;
            let appended = log.append(batch).await.unwrap();
            appended.ack.await.unwrap();
            let base = *log.segment_bases().last().unwrap();
            if base != segment {
                segment = base;
                position = 4096;
            }
            written.push((first, records, position, len));
            position += len;
        }
        if close {
            log.close().await.unwrap();
        } else {
            drop(log);
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        written
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// Opens the log and returns every offset it serves (checking each record's value) and its
/// next offset, or the open error.
fn open_and_read(path: &Path, config: LogConfig) -> Result<(Vec<u64>, u64), StorageError> {
    let path = path.to_path_buf();
    run(move || async move {
        let log = Log::open(&path, config).await?;
        let mut offsets = Vec::new();
        let mut next = log.start_offset();
        while next < log.visible_offset() {
            let (bytes, after) = log.read_verified(next, 1 << 16).await?;
            offsets.extend(check_records(bytes).into_iter().filter(|&o| o >= next));
            next = after;
        }
        let end = log.next_offset();
        // The log takes appends again where it ends.
        let appended = log.append(batch_at(end, 1)).await?;
        assert_eq!(appended.base_offset, end);
        appended.ack.await?;
        log.close().await?;
        Ok((offsets, end))
    })
}

fn lenient_config() -> LogConfig {
    // One segment, never synced: the whole tail is past the recovery point.
    LogConfig { fsync: FsyncPolicy::Never, segment_bytes: 1 << 20, ..LogConfig::tiny() }
}

#[test]
fn a_tail_cut_anywhere_recovers_to_the_last_whole_batch() {
    let dir = tmp();
    let original = dir.path().join("original");
    let written = write_batches(&original, lenient_config(), 40, 7, false);
    let log_file = segment_path(&original, 0);
    let data_end = written.last().map(|&(_, _, position, len)| position + len).unwrap();
    let mut rng = Rng(99);
    let mut cuts: Vec<u64> = (0..25).map(|_| 4096 + rng.below(data_end - 4096 + 1)).collect();
    cuts.extend([4096, data_end, written[3].2, written[3].2 + 1]);
    for (round, cut) in cuts.into_iter().enumerate() {
        let copy = dir.path().join(format!("cut-{round}"));
        copy_dir(&original, &copy);
        let file = std::fs::OpenOptions::new().write(true).open(segment_path(&copy, 0)).unwrap();
        file.set_len(cut).unwrap();
        let whole: Vec<&(u64, u64, u64, u64)> =
            written.iter().filter(|&&(_, _, p, len)| p + len <= cut).collect();
        let expected_end = whole.last().map_or(0, |&&(base, count, _, _)| base + count);
        let (offsets, end) =
            open_and_read(&copy, lenient_config()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(end, expected_end, "cut at {cut}");
        assert_eq!(offsets, (0..expected_end).collect::<Vec<_>>(), "cut at {cut}");
    }
    assert!(std::fs::metadata(&log_file).is_ok());
}

#[test]
fn flipped_bytes_in_the_unsynced_tail_end_the_log_at_the_damaged_batch() {
    let dir = tmp();
    let original = dir.path().join("original");
    let written = write_batches(&original, lenient_config(), 30, 8, false);
    let mut rng = Rng(5);
    for round in 0..30 {
        let &(base, _, position, len) = &written[rng.below(written.len() as u64) as usize];
        // Any byte but the 4 leader-epoch bytes (12..16), which the leader stamps outside the
        // CRC and which nothing can check (as in Kafka).
        let mut at = rng.below(len);
        if (12..16).contains(&at) {
            at = 20;
        }
        let copy = dir.path().join(format!("flip-{round}"));
        copy_dir(&original, &copy);
        let path = segment_path(&copy, 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(position + at) as usize] ^= 1 << rng.below(8);
        std::fs::write(&path, &bytes).unwrap();
        let (offsets, end) = open_and_read(&copy, lenient_config()).unwrap();
        assert_eq!(end, base, "flip at byte {at} of the batch at {position}: the log ends before it");
        assert_eq!(offsets, (0..base).collect::<Vec<_>>());
    }
}

fn strict_config() -> LogConfig {
    LogConfig { fsync: FsyncPolicy::Always, segment_bytes: 1 << 20, ..LogConfig::tiny() }
}

#[test]
fn damage_before_the_recovery_point_is_refused_with_file_and_position() {
    let dir = tmp();
    let original = dir.path().join("original");
    // Closed cleanly: the checkpoint covers the whole tail.
    let written = write_batches(&original, strict_config(), 30, 9, true);
    // Without the index a clean close leaves (see below for what it changes), every batch of
    // the tail is scanned.
    remove_indexes(&original);
    let &(_, _, position, len) = &written[12];
    let copy = dir.path().join("flip");
    copy_dir(&original, &copy);
    let path = segment_path(&copy, 0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(position + len / 2) as usize] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    match open_and_read(&copy, strict_config()) {
        Err(StorageError::Corruption { path: reported, position: at, kind: CorruptionKind::Batch(_) }) => {
            assert_eq!(reported, path);
            assert_eq!(at, position, "the error names the damaged batch");
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
    // A file cut short of its recovery point is refused as well.
    let copy = dir.path().join("short");
    copy_dir(&original, &copy);
    let path = segment_path(&copy, 0);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(written[20].2).unwrap();
    assert!(matches!(
        open_and_read(&copy, strict_config()),
        Err(StorageError::Corruption { kind: CorruptionKind::Shorter { .. }, .. })
    ));
    // The untouched copy opens and serves everything.
    let (offsets, end) = open_and_read(&original, strict_config()).unwrap();
    assert_eq!(offsets.len() as u64, end);
}

fn many_segments() -> LogConfig {
    LogConfig { fsync: FsyncPolicy::Always, ..LogConfig::tiny() }
}

#[test]
fn sealed_segments_are_strict_and_their_indexes_are_rebuilt() {
    let dir = tmp();
    let original = dir.path().join("original");
    let written = write_batches(&original, many_segments(), 80, 10, true);
    let total = written.last().map(|&(base, count, _, _)| base + count).unwrap();
    assert!(
        std::fs::read_dir(&original)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
            .count()
            > 3
    );

    // Missing and damaged index files are rebuilt from the log.
    let copy = dir.path().join("index");
    copy_dir(&original, &copy);
    std::fs::remove_file(copy.join(format!("{:020}.index", 0))).unwrap();
    let time_index = copy.join(format!("{:020}.timeindex", 0));
    let mut bytes = std::fs::read(copy.join(format!("{:020}.timeindex", 0))).unwrap();
    bytes[70] ^= 0xff;
    let some_index = std::fs::read_dir(&copy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "index") && !p.ends_with(format!("{:020}.index", 0)))
        .max()
        .unwrap();
    std::fs::write(&time_index, &bytes).unwrap();
    std::fs::write(&some_index, b"SKIX not really").unwrap();
    let (offsets, end) = open_and_read(&copy, many_segments()).unwrap();
    assert_eq!(end, total);
    assert_eq!(offsets, (0..total).collect::<Vec<_>>());
    assert!(copy.join(format!("{:020}.index", 0)).exists(), "the index was written again");

    // A flipped byte inside a sealed segment whose index is missing: refused at open, naming
    // the file and the batch.
    let &(_, _, position, len) = &written[3];
    let copy = dir.path().join("sealed-scan");
    copy_dir(&original, &copy);
    std::fs::remove_file(copy.join(format!("{:020}.index", 0))).unwrap();
    let path = segment_path(&copy, 0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(position + len - 3) as usize] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    match open_and_read(&copy, many_segments()) {
        Err(StorageError::Corruption { path: reported, position: at, .. }) => {
            assert_eq!(reported, path);
            assert_eq!(at, position);
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }

    // The same flip with the index intact: the log opens (sealed segments are not rescanned),
    // but reading the damaged batch reports the corruption instead of serving it, and the
    // batches around it are still served.
    let copy = dir.path().join("sealed-read");
    copy_dir(&original, &copy);
    let path = segment_path(&copy, 0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(position + len - 3) as usize] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let damaged_base = written[3].0;
    let after_damage = written[4].0;
    let copy2 = copy.clone();
    run(move || async move {
        let log = Log::open(&copy2, many_segments()).await.unwrap();
        let (bytes, _) = log.read_verified(0, 1).await.unwrap();
        assert_eq!(check_records(bytes)[0], 0);
        match log.read_verified(damaged_base, 1).await {
            Err(StorageError::Corruption { path: reported, position: at, .. }) => {
                assert_eq!(reported, path);
                assert_eq!(at, position);
            }
            other => panic!("expected a corruption error, got {other:?}"),
        }
        let (bytes, _) = log.read_verified(after_damage, 1).await.unwrap();
        assert_eq!(check_records(bytes)[0], after_damage);
        log.close().await.unwrap();
    });

    // A damaged segment header.
    let copy = dir.path().join("header");
    copy_dir(&original, &copy);
    let path = segment_path(&copy, 0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[9] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        open_and_read(&copy, many_segments()),
        Err(StorageError::Corruption { position: 0, kind: CorruptionKind::Format(_), .. })
    ));

    // A missing segment in the middle is lost data: refused.
    let copy = dir.path().join("gap");
    copy_dir(&original, &copy);
    let middle = std::fs::read_dir(&copy)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .filter(|p| !p.ends_with(format!("{:020}.log", 0)))
        .min()
        .unwrap();
    std::fs::remove_file(&middle).unwrap();
    assert!(matches!(
        open_and_read(&copy, many_segments()),
        Err(StorageError::Corruption { kind: CorruptionKind::SegmentGap { .. }, .. })
    ));

    // A garbage checkpoint is ignored (recovery just gets more lenient).
    let copy = dir.path().join("checkpoint");
    copy_dir(&original, &copy);
    std::fs::write(copy.join("checkpoint"), b"not a checkpoint at all").unwrap();
    let (offsets, end) = open_and_read(&copy, many_segments()).unwrap();
    assert_eq!((offsets.len() as u64, end), (total, total));
}

#[test]
fn damage_in_a_segment_after_the_recovery_point_ends_the_log_there() {
    // fsync=never: rolled segments are synced in the background; without a checkpoint nothing
    // is known synced, so every segment is rescanned and the first damage ends the log.
    let config = LogConfig { fsync: FsyncPolicy::Never, ..LogConfig::tiny() };
    let dir = tmp();
    let original = dir.path().join("original");
    let written = write_batches(&original, config, 80, 11, false);
    let mut bases: Vec<u64> = std::fs::read_dir(&original)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".log").map(|b| b.parse().unwrap()))
        .collect();
    bases.sort_unstable();
    assert!(bases.len() > 4, "{bases:?}");
    // Damage a batch in the middle of the third segment.
    let victim_base = bases[2];
    let victim = written.iter().filter(|w| w.0 >= victim_base && w.0 < bases[3]).nth(1).copied().unwrap();
    let copy = dir.path().join("damaged");
    copy_dir(&original, &copy);
    std::fs::remove_file(copy.join("checkpoint")).unwrap();
    let path = segment_path(&copy, victim_base);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(victim.2 + victim.3 / 2) as usize] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let (offsets, end) = open_and_read(&copy, config).unwrap();
    assert_eq!(end, victim.0, "the log ends before the damaged batch");
    assert_eq!(offsets, (0..victim.0).collect::<Vec<_>>());
    for later in &bases[3..] {
        assert!(!segment_path(&copy, *later).exists(), "segment {later} after the tear is gone");
    }
    // The same damage with the checkpoint in place (it points past the victim): refused.
    let copy = dir.path().join("damaged-strict");
    copy_dir(&original, &copy);
    let path = segment_path(&copy, victim_base);
    std::fs::write(&path, &bytes).unwrap();
    match open_and_read(&copy, config) {
        Err(StorageError::Corruption { path: reported, position, .. }) => {
            assert_eq!(reported, path);
            assert_eq!(position, victim.2);
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

const CHILD_DIR: &str = "SKEIN_CRASH_CHILD_DIR";
const CHILD_SEED: &str = "SKEIN_CRASH_CHILD_SEED";

fn child_config() -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Always,
        segment_bytes: 256 << 10,
        batch_bytes_max: 64 << 10,
        ..LogConfig::tiny()
    }
}

/// Not a test on its own: when the crash test starts this binary with `CHILD_DIR` set, this
/// appends forever with `fsync=always`, printing `ACK base last` for every acknowledged batch,
/// until it is killed. Without the variable it returns at once.
#[test]
fn crash_child_appender() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else { return };
    let seed: u64 = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
    run(move || async move {
        let log = std::rc::Rc::new(Log::open(PathBuf::from(dir), child_config()).await.unwrap());
        let mut rng = Rng(seed);
        let mut pending = std::collections::VecDeque::new();
        loop {
            let first = log.next_offset();
            let count = 1 + rng.below(20);
            let appended = log.append(batch_at(first, count)).await.unwrap();
            assert_eq!(appended.base_offset, first);
            pending.push_back(appended);
            // Several appends in flight, so group commit is exercised.
            if pending.len() > rng.below(8) as usize {
                let appended = pending.pop_front().unwrap();
                appended.ack.await.unwrap();
                println!("ACK {} {}", appended.base_offset, appended.last_offset);
            }
        }
    });
}

#[test]
fn sigkill_during_fsync_always_appends_loses_no_acknowledged_record() {
    let dir = tmp();
    let path = dir.path().join("p0");
    let mut acknowledged: Vec<(u64, u64)> = Vec::new();
    let mut rng = Rng(2024);
    for round in 0..5 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child_appender", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, &path)
            .env(CHILD_SEED, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut parts = rest.split(' ').map(|p| p.parse::<u64>().unwrap());
                    acks.push((parts.next().unwrap(), parts.next().unwrap()));
                }
            }
            acks
        });
        // Let it run until it has acknowledged something, then a random moment more.
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
        child.kill().unwrap();
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        assert!(
            !acks.is_empty() || started.elapsed() > Duration::from_secs(30),
            "round {round}: the child acknowledged nothing"
        );
        acknowledged.extend(acks);
        // Reopen (recovery) and check every acknowledged record, at its offset.
        let check_path = path.clone();
        let acked = acknowledged.clone();
        let (present, checked) = run(move || async move {
            let log = Log::open(&check_path, child_config()).await.unwrap();
            let mut offsets = Vec::new();
            let mut next = log.start_offset();
            while next < log.visible_offset() {
                let (bytes, after) = log.read_verified(next, 1 << 20).await.unwrap();
                offsets.extend(check_records(bytes).into_iter().filter(|&o| o >= next));
                next = after;
            }
            assert_eq!(offsets, (0..log.next_offset()).collect::<Vec<_>>(), "no gap, nothing invented");
            // The scan above read every offset from 0 to the end and checked each record's
            // value; an acknowledged batch must lie inside it, at the offsets it was given.
            let mut checked = 0u64;
            for &(base, last) in &acked {
                assert!(
                    last < log.next_offset(),
                    "acknowledged offset {last} lost (log ends at {})",
                    log.next_offset()
                );
                let slice = log.read(base, 1).await.unwrap();
                assert_eq!(
                    slice.first_offset, base,
                    "acknowledged batch {base}..={last} is still one batch at {base}"
                );
                assert_eq!(slice.next_offset, last + 1);
                checked += last - base + 1;
            }
            log.close().await.unwrap();
            (offsets.len(), checked)
        });
        eprintln!("round {round}: {checked} acknowledged records checked, {present} records in the log");
    }
    assert!(acknowledged.len() > 10, "the child acknowledged {} batches in all", acknowledged.len());
}

/// What opening the log in `path` scanned batch by batch, its next offset, and what it
/// answers for a few timestamp lookups (which need the index and the largest timestamps).
fn open_scanned(path: &Path, config: LogConfig) -> (u64, u64, Vec<Option<u64>>) {
    let path = path.to_path_buf();
    run(move || async move {
        let before = skein_storage::metrics::snapshot().recovery_scanned_bytes;
        let log = Log::open(&path, config).await.unwrap();
        let scanned = skein_storage::metrics::snapshot().recovery_scanned_bytes - before;
        let end = log.next_offset();
        let mut lookups = Vec::new();
        for offset in [0, end / 3, end / 2, end - 1, end + 10] {
            lookups.push(log.offset_for_timestamp(common::timestamp_for(offset)).await.unwrap());
        }
        log.close().await.unwrap();
        (scanned, end, lookups)
    })
}

fn remove_indexes(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "index" || e == "timeindex") {
            std::fs::remove_file(path).unwrap();
        }
    }
}

#[test]
fn after_a_clean_close_the_next_open_scans_only_what_the_tails_index_does_not_cover() {
    let dir = tmp();
    let original = dir.path().join("original");
    let written = write_batches(&original, strict_config(), 400, 11, true);
    let data_end = written.last().map(|&(_, _, position, len)| position + len).unwrap();
    let largest_batch = written.iter().map(|&(_, _, _, len)| len).max().unwrap();
    assert!(segment_path(&original, 0).with_extension("index").exists(), "close writes the tail's index");
    // A copy without the index is scanned whole, as every tail was before.
    let full = dir.path().join("full");
    copy_dir(&original, &full);
    remove_indexes(&full);
    let (full_scanned, full_end, full_lookups) = open_scanned(&full, strict_config());
    assert_eq!(full_scanned, data_end - 4096, "without an index the whole tail is scanned");
    // With it, only the last indexed batch onward (the index has an entry every 256 bytes).
    let (scanned, end, lookups) = open_scanned(&original, strict_config());
    assert!(scanned <= 256 + largest_batch, "scanned {scanned} of {} bytes", data_end - 4096);
    assert_eq!(end, full_end);
    assert_eq!(lookups, full_lookups, "timestamp lookups agree with a full scan's index");
    // It serves everything and takes appends; closed again, its next open is cheap again.
    let (offsets, end) = open_and_read(&original, strict_config()).unwrap();
    assert_eq!(offsets, (0..end).collect::<Vec<_>>());
    let (scanned, after, _) = open_scanned(&original, strict_config());
    assert_eq!(after, end + 1, "the record open_and_read appended is there");
    assert!(scanned <= 256 + largest_batch);
}

#[test]
fn a_tail_index_that_does_not_match_its_log_is_not_believed() {
    let dir = tmp();
    let original = dir.path().join("original");
    let written = write_batches(&original, strict_config(), 200, 12, true);
    let stale = dir.path().join("stale-index");
    copy_dir(&original, &stale);
    // Truncate to the middle and append other batches (other sizes, so the batch boundaries
    // move), close, then put the old index back: it describes bytes that are no longer there.
    let cut = written[100].0;
    let path = original.clone();
    run(move || async move {
        let log = Log::open(&path, strict_config()).await.unwrap();
        assert_eq!(log.truncate(cut).await.unwrap(), cut);
        assert!(
            !segment_path(&path, 0).with_extension("index").exists(),
            "a truncation removes the tail's index"
        );
        for i in 0..150 {
            let first = log.next_offset();
            log.append(batch_at(first, 7 + i % 3)).await.unwrap().ack.await.unwrap();
        }
        log.close().await.unwrap();
    });
    for extension in ["index", "timeindex"] {
        let (from, to) = (segment_path(&stale, 0), segment_path(&original, 0));
        std::fs::copy(from.with_extension(extension), to.with_extension(extension)).unwrap();
    }
    let file_bytes = std::fs::metadata(segment_path(&original, 0)).unwrap().len();
    let (scanned, _, _) = open_scanned(&original, strict_config());
    assert!(
        scanned >= file_bytes - 4096,
        "the stale index was dropped for a scan of the whole tail: {scanned}"
    );
    let (offsets, end) = open_and_read(&original, strict_config()).unwrap();
    assert_eq!(offsets, (0..end).collect::<Vec<_>>(), "every record once, in order");
    assert!(
        end > written.last().map(|&(base, count, _, _)| base + count).unwrap(),
        "the new batches are there"
    );
    // An index that vouches for more bytes than the file holds is not used either.
    let short = dir.path().join("short");
    copy_dir(&stale, &short);
    let file = std::fs::OpenOptions::new().write(true).open(segment_path(&short, 0)).unwrap();
    file.set_len(written[150].2).unwrap();
    assert!(matches!(
        open_and_read(&short, strict_config()),
        Err(StorageError::Corruption { kind: CorruptionKind::Shorter { .. }, .. })
    ));
}

#[test]
fn damage_inside_what_a_clean_close_vouched_for_is_found_when_read() {
    let dir = tmp();
    let original = dir.path().join("original");
    let written = write_batches(&original, strict_config(), 60, 13, true);
    let &(base, _, position, len) = &written[10];
    let path = segment_path(&original, 0);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(position + len / 2) as usize] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    // The open trusts what the index vouches for, as it does a sealed segment's bytes (and as
    // Kafka does after a clean shutdown); a read that checks the batches names the damage.
    let reported = path.clone();
    run(move || async move {
        let log = Log::open(&original, strict_config()).await.unwrap();
        match log.read_verified(base, 1 << 16).await {
            Err(StorageError::Corruption { path, position: at, kind: CorruptionKind::Batch(_) }) => {
                assert_eq!(path, reported);
                assert_eq!(at, position, "the error names the damaged batch");
            }
            other => panic!("expected a corruption error, got {other:?}"),
        }
        log.close().await.unwrap();
    });
}
