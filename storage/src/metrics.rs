//! What this shard's logs did, for the broker's metrics: counted per shard (a thread-local, as
//! the logs themselves are), without atomics or locks, and read by the shard that owns them
//! with [`snapshot`] when a scrape asks.
//!
//! [`Histogram`] is the latency histogram every Skein metric uses (fixed buckets, so shards'
//! histograms add up bucket by bucket).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets: 50 µs to 10 s, roughly ×2–2.5 apart.
pub const LATENCY_BUCKETS_S: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// A latency histogram over [`LATENCY_BUCKETS_S`]: per bucket the observations at or below its
/// bound and above the previous one (not cumulative), plus one bucket above the last bound.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Histogram {
    pub buckets: [u64; LATENCY_BUCKETS_S.len() + 1],
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&mut self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket =
            LATENCY_BUCKETS_S.iter().position(|bound| seconds <= *bound).unwrap_or(LATENCY_BUCKETS_S.len());
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum_seconds += seconds;
    }

    /// Adds another histogram's observations (another shard's).
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum_seconds += other.sum_seconds;
    }
}

/// What one shard's logs did since the shard started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StorageCounters {
    /// Active segments sealed and replaced by a new one.
    pub segment_rolls: u64,
    /// `fdatasync` calls of data segments and how long each took.
    pub fsync: Histogram,
    /// O_DIRECT writes of data segments, from being handed to the flusher's ring to their
    /// completion being seen by the shard: the device's time, plus any wait for the kernel
    /// (io_uring's workers) or for the shard to reap it. A produce with `fsync never` is
    /// acknowledged after its writes, so their tail is its tail.
    pub writes: Histogram,
    /// Reads answered from a log's tail cache (memory).
    pub cache_reads: u64,
    /// Reads answered with a range of a segment file (page cache or disk).
    pub file_reads: u64,
    /// Bytes read from segment files with O_DIRECT (cold reads, read-ahead, and the header
    /// lookups that find where a read starts).
    pub direct_read_bytes: u64,
    /// Reads that waited for room in the bound on reads in flight (segments were being
    /// written; see `handles`).
    pub read_in_flight_waits: u64,
    /// Bytes of segment files scanned batch by batch to recover a tail or rebuild an index: on
    /// open, a tail's bytes after what its index vouched for (every byte of a tail without one,
    /// as after a crash); and a sealed segment's whose index files are missing or stale, at
    /// open or when a read first needs its index.
    pub recovery_scanned_bytes: u64,
}

thread_local! {
    static COUNTERS: RefCell<StorageCounters> = RefCell::new(StorageCounters::default());
}

/// This shard's counters now.
pub fn snapshot() -> StorageCounters {
    COUNTERS.try_with(|counters| *counters.borrow()).unwrap_or_default()
}

pub(crate) fn count(f: impl FnOnce(&mut StorageCounters)) {
    let _ = COUNTERS.try_with(|counters| f(&mut counters.borrow_mut()));
}

/// The longest of some durations noted by any thread of the process since the last
/// [`MaxSince::take`]: one relaxed `fetch_max` per note, for diagnostics read once a second
/// (the bench harness's per-second timeline). Holds µs plus one, so 0 means none noted.
pub struct MaxSince(AtomicU64);

impl MaxSince {
    pub const fn new() -> MaxSince {
        MaxSince(AtomicU64::new(0))
    }

    pub fn note(&self, elapsed: Duration) {
        self.0.fetch_max(elapsed.as_micros() as u64 + 1, Ordering::Relaxed);
    }

    /// The longest noted since the last call (`None` if nothing was).
    pub fn take(&self) -> Option<Duration> {
        match self.0.swap(0, Ordering::Relaxed) {
            0 => None,
            plus_one => Some(Duration::from_micros(plus_one - 1)),
        }
    }
}

impl Default for MaxSince {
    fn default() -> MaxSince {
        MaxSince::new()
    }
}

/// The slowest segment write of any shard in this process (thousands of writes a second).
static IN_PROCESS_WRITE_MAX: MaxSince = MaxSince::new();

/// Notes one segment write's time (from being handed to the ring to its completion seen).
pub(crate) fn note_write(elapsed: Duration) {
    count(|c| c.writes.observe(elapsed));
    IN_PROCESS_WRITE_MAX.note(elapsed);
}

/// The slowest segment write of the logs in this process since the last call (`None` if none
/// completed since). For a load generator with an embedded broker: a latency stall that
/// shows here too was spent waiting on the disk (the device, or the kernel's I/O path).
pub fn take_in_process_write_max() -> Option<Duration> {
    IN_PROCESS_WRITE_MAX.take()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slowest_write_is_seen_in_process_once() {
        note_write(Duration::from_millis(2));
        note_write(Duration::from_millis(9));
        note_write(Duration::from_millis(4));
        // Other tests' logs may write too: the worst is at least this one's.
        let worst = take_in_process_write_max().expect("writes were noted");
        assert!(worst >= Duration::from_millis(9), "{worst:?}");
        assert!(COUNTERS.with(|c| c.borrow().writes.count) >= 3);
    }

    #[test]
    fn observations_land_in_their_bucket_and_merge() {
        let mut histogram = Histogram::default();
        histogram.observe(Duration::from_micros(10)); // ≤ 50 µs
        histogram.observe(Duration::from_micros(50)); // ≤ 50 µs (bounds are inclusive)
        histogram.observe(Duration::from_millis(3)); // ≤ 5 ms
        histogram.observe(Duration::from_secs(60)); // above every bound
        assert_eq!(histogram.count, 4);
        assert_eq!(histogram.buckets[0], 2);
        assert_eq!(histogram.buckets[6], 1);
        assert_eq!(histogram.buckets[LATENCY_BUCKETS_S.len()], 1);
        let mut merged = histogram;
        merged.merge(&histogram);
        assert_eq!(merged.count, 8);
        assert_eq!(merged.buckets[0], 4);
        assert!((merged.sum_seconds - 2.0 * histogram.sum_seconds).abs() < 1e-9);
    }
}
