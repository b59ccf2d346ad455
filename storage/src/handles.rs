//! The shard's budget of open segment files, of disk space allocated ahead of the data, and of
//! tail-cache memory.
//!
//! # Open files
//! Every segment file is a [`FileSlot`]: a path and, while it is open, its O_DIRECT handle.
//! The slots of one shard (thread) share a budget ([`set_open_files_max`]); the slots used
//! least recently are closed to make room for the one being opened, and reopened when next
//! used. A handle that an operation holds (an `Rc` clone: a write or a read in flight, a
//! flusher with work) is never closed under it: only handles held by their slot alone are.
//! When every open handle is in use, the open goes ahead beyond the budget (nothing on the data
//! path waits on the budget); the budget is set below the process's descriptor limit with
//! head-room for that and for connections.
//!
//! So a partition holds no descriptor at rest: its active segment is open while it is written
//! or read, its sealed segments only while they are read, and the rest of its files (the
//! recovery checkpoint, index files, the directory) are opened for each use and closed after.
//!
//! # Space allocated ahead
//! The active segment is extended with `fallocate` ahead of the data, so that writes do not
//! extend the file one by one. The extension grows with the partition's write rate (see
//! `Log::preallocate`), and the bytes allocated ahead by all the shard's logs are bounded by
//! [`set_preallocate_bytes_max`]: beyond it a log allocates only what it writes.
//!
//! # Tail caches
//! All the tail caches of a shard's logs are bounded together too ([`set_cache_bytes_max`]):
//! over it the shard's oldest cached batch goes first, whichever log holds it (see `cache`).
//!
//! # Reads in flight
//! While segments are being written (any shard of the process wrote in the last
//! [`WRITES_RECENT`]), the bulk O_DIRECT reads of segment data a shard has in flight (the file
//! ranges of cold fetches, `Log::read_file`, and their read-ahead) are bounded in bytes
//! ([`set_read_in_flight_bytes_max`]): a read waits for room. Such a read is never longer than
//! the bound, writes or not (longer ones are split, read-ahead pieces are cut to it), though
//! an unaligned one reaches the device as up to two blocks more. Not bounded: the small reads
//! of batch headers when a fetch looks for its first batch, and the read of a batch that
//! reaches into the block the next write rewrites. Reads issued just before writes begin stay
//! in flight beside the bound until they complete. A device serves the reads queued ahead of a write first: on this project's test VM,
//! 1 MiB of reads in flight left a concurrent 1 MiB write's latency at 0.8 ms (p50) and 1.4 ms
//! (p99), 2 MiB or more at 8–11 ms (p50), while the reads ran as fast either way (fio). With
//! no writes, reads are not held back: a catch-up read alone keeps its queue depth.
//!
//! Lives on one shard (thread-local); nothing here is shared between threads but the time of
//! the last segment write (one atomic, stored at most once a millisecond).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::{Rc, Weak};

use glommio::io::DmaFile;

use crate::error::Result;
use crate::io as dio;

struct Registry {
    /// `None`: no budget (the default, for tests and tools).
    limit: Option<usize>,
    open: usize,
    tick: u64,
    /// Open slots by last use, oldest first.
    by_use: BTreeMap<u64, Weak<SlotInner>>,
    opened: u64,
    closed: u64,
    over_budget: u64,
    ahead_limit: Option<u64>,
    ahead: u64,
    read_ahead_limit: usize,
    read_ahead: usize,
    reads_in_flight: usize,
    reads_in_flight_peak: usize,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            limit: None,
            open: 0,
            tick: 0,
            by_use: BTreeMap::new(),
            opened: 0,
            closed: 0,
            over_budget: 0,
            ahead_limit: None,
            ahead: 0,
            read_ahead_limit: READ_AHEAD_BYTES_MAX_DEFAULT,
            read_ahead: 0,
            reads_in_flight: 0,
            reads_in_flight_peak: 0,
        }
    }
}

/// Memory a shard's logs may hold read ahead of consumers, unless set otherwise.
pub const READ_AHEAD_BYTES_MAX_DEFAULT: usize = 256 << 20;

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry::default());
}

fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> Option<R> {
    REGISTRY.try_with(|registry| f(&mut registry.borrow_mut())).ok()
}

/// Sets how many segment files this shard keeps open at most (`None`: no limit).
pub fn set_open_files_max(limit: Option<usize>) {
    with(|registry| registry.limit = limit.map(|l| l.max(1)));
}

/// Sets how many bytes this shard's logs may have allocated ahead of their data (`None`: no
/// limit beyond each log's own `preallocate_bytes`).
pub fn set_preallocate_bytes_max(limit: Option<u64>) {
    with(|registry| registry.ahead_limit = limit);
}

/// Sets how much memory this shard's logs may hold read ahead of consumers.
pub fn set_read_ahead_bytes_max(limit: usize) {
    with(|registry| registry.read_ahead_limit = limit);
}

/// Sets how many bytes all the tail caches of this shard's logs may hold together (`None`: each
/// log's own `cache_bytes_max` only); evicts down to it at once.
pub fn set_cache_bytes_max(limit: Option<usize>) {
    crate::cache::set_cache_bytes_max(limit);
}

/// How recent a segment write must be for reads to be bounded (see "Reads in flight").
pub const WRITES_RECENT: std::time::Duration = std::time::Duration::from_millis(500);

/// Milliseconds since [`epoch`] of the last segment write, by any shard.
static LAST_WRITE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// `at` in milliseconds since [`epoch`], from 1 (0 means no write yet).
fn millis(at: std::time::Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_millis() as u64 + 1
}

fn millis_now() -> u64 {
    millis(std::time::Instant::now())
}

/// A segment write is being issued at `issued` (the flusher calls it for each, with the time
/// it takes for the write's latency anyway).
pub(crate) fn note_segment_write(issued: std::time::Instant) {
    use std::sync::atomic::Ordering::Relaxed;
    let now = millis(issued);
    if LAST_WRITE_MS.load(Relaxed) != now {
        LAST_WRITE_MS.store(now, Relaxed);
    }
}

fn writes_recent() -> bool {
    let last = LAST_WRITE_MS.load(std::sync::atomic::Ordering::Relaxed);
    last != 0 && millis_now().saturating_sub(last) <= WRITES_RECENT.as_millis() as u64
}

thread_local! {
    /// The bound on reads in flight, in bytes, and its semaphore (`None`: no bound).
    static READS_IN_FLIGHT: RefCell<Option<(usize, Rc<glommio::sync::Semaphore>)>> = const { RefCell::new(None) };
}

/// Sets how many bytes of O_DIRECT reads of segment data (cold fetches, read-ahead) this shard
/// keeps in flight at most (`None`: no bound); rounded up to whole 4 KiB blocks.
pub fn set_read_in_flight_bytes_max(limit: Option<usize>) {
    let bound = limit.map(|bytes| {
        let bytes = dio::align_up(bytes.max(1) as u64) as usize;
        (bytes, Rc::new(glommio::sync::Semaphore::new(bytes as u64)))
    });
    READS_IN_FLIGHT.with(|reads| *reads.borrow_mut() = bound);
}

/// The bound on reads in flight (`None`: none); no single read is longer.
pub(crate) fn read_in_flight_max() -> Option<usize> {
    READS_IN_FLIGHT.try_with(|reads| reads.borrow().as_ref().map(|(bytes, _)| *bytes)).ok().flatten()
}

/// A read of segment data in flight: counted in [`HandleStats::reads_in_flight_bytes`] until
/// dropped, with its share of the bound if it had to take one.
pub(crate) struct ReadInFlight {
    bytes: usize,
    _permit: Option<glommio::sync::StaticPermit>,
}

impl Drop for ReadInFlight {
    fn drop(&mut self) {
        with(|registry| registry.reads_in_flight -= self.bytes);
    }
}

/// Waits until a read of `bytes` may go to the device: at once without a bound or recent
/// writes, otherwise once it fits in the bound on reads in flight.
pub(crate) async fn read_in_flight(bytes: usize) -> ReadInFlight {
    let bound = READS_IN_FLIGHT.try_with(|reads| reads.borrow().clone()).ok().flatten();
    let permit = match bound {
        Some((max, semaphore)) if writes_recent() => {
            let units = bytes.clamp(1, max) as u64;
            if semaphore.available() < units {
                crate::metrics::count(|c| c.read_in_flight_waits += 1);
            }
            semaphore.acquire_static_permit(units).await.ok()
        }
        _ => None,
    };
    with(|registry| {
        registry.reads_in_flight += bytes;
        registry.reads_in_flight_peak = registry.reads_in_flight_peak.max(registry.reads_in_flight);
    });
    ReadInFlight { bytes, _permit: permit }
}

/// Starts [`HandleStats::reads_in_flight_peak_bytes`] again from what is in flight now.
pub fn reset_reads_in_flight_peak() {
    with(|registry| registry.reads_in_flight_peak = registry.reads_in_flight);
}

/// Takes `bytes` from the read-ahead budget; `false` (and nothing taken) if they do not fit.
pub(crate) fn reserve_read_ahead(bytes: usize) -> bool {
    with(|registry| {
        let fits = registry.read_ahead + bytes <= registry.read_ahead_limit;
        if fits {
            registry.read_ahead += bytes;
        }
        fits
    })
    .unwrap_or(false)
}

pub(crate) fn release_read_ahead(bytes: usize) {
    with(|registry| registry.read_ahead = registry.read_ahead.saturating_sub(bytes));
}

/// What this shard's budgets hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandleStats {
    pub open_files: usize,
    pub open_files_max: Option<usize>,
    /// Files opened and closed by the budget since the shard started.
    pub opened: u64,
    pub closed: u64,
    /// Opens that went beyond the budget because every open file was in use.
    pub over_budget: u64,
    pub allocated_ahead_bytes: u64,
    /// Bytes read ahead of consumers (or being read), and the shard's bound for them.
    pub read_ahead_bytes: usize,
    pub read_ahead_bytes_max: usize,
    /// Bytes of O_DIRECT reads of segment data in flight now, and the most since the shard
    /// started (or [`reset_reads_in_flight_peak`]).
    pub reads_in_flight_bytes: usize,
    pub reads_in_flight_peak_bytes: usize,
    /// Bytes held by the shard's tail caches, their bound, and batches evicted for the bound.
    pub cache_bytes: usize,
    pub cache_bytes_max: Option<usize>,
    pub cache_evictions: u64,
}

pub fn stats() -> HandleStats {
    let (cache_bytes, cache_bytes_max, cache_evictions) = crate::cache::shard_stats();
    with(|r| HandleStats {
        open_files: r.open,
        open_files_max: r.limit,
        opened: r.opened,
        closed: r.closed,
        over_budget: r.over_budget,
        allocated_ahead_bytes: r.ahead,
        read_ahead_bytes: r.read_ahead,
        read_ahead_bytes_max: r.read_ahead_limit,
        reads_in_flight_bytes: r.reads_in_flight,
        reads_in_flight_peak_bytes: r.reads_in_flight_peak,
        cache_bytes,
        cache_bytes_max,
        cache_evictions,
    })
    .unwrap_or_default()
}

struct SlotInner {
    path: PathBuf,
    file: RefCell<Option<Rc<DmaFile>>>,
    /// Key in `Registry::by_use` while open.
    used: Cell<u64>,
}

impl Drop for SlotInner {
    fn drop(&mut self) {
        if self.file.get_mut().take().is_some() {
            let used = self.used.get();
            with(|registry| {
                registry.open -= 1;
                registry.by_use.remove(&used);
            });
        }
    }
}

/// One file under the shard's open-files budget.
pub(crate) struct FileSlot {
    inner: Rc<SlotInner>,
}

impl std::fmt::Debug for FileSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSlot")
            .field("path", &self.inner.path)
            .field("open", &self.inner.file.borrow().is_some())
            .finish()
    }
}

impl FileSlot {
    /// A slot for a file just opened (or created) by the caller.
    pub fn opened(path: PathBuf, file: DmaFile) -> FileSlot {
        let slot =
            FileSlot { inner: Rc::new(SlotInner { path, file: RefCell::new(None), used: Cell::new(0) }) };
        make_room();
        slot.install(Rc::new(file));
        slot
    }

    fn install(&self, file: Rc<DmaFile>) {
        *self.inner.file.borrow_mut() = Some(file);
        let weak = Rc::downgrade(&self.inner);
        let used = with(|registry| {
            registry.open += 1;
            registry.opened += 1;
            registry.tick += 1;
            registry.by_use.insert(registry.tick, weak);
            registry.tick
        })
        .unwrap_or(0);
        self.inner.used.set(used);
    }

    fn touch(&self) {
        let old = self.inner.used.get();
        let weak = Rc::downgrade(&self.inner);
        if let Some(new) = with(|registry| {
            registry.by_use.remove(&old);
            registry.tick += 1;
            registry.by_use.insert(registry.tick, weak);
            registry.tick
        }) {
            self.inner.used.set(new);
        }
    }

    /// The handle if it is open now (and marks it used).
    pub fn cached(&self) -> Option<Rc<DmaFile>> {
        let file = self.inner.file.borrow().clone();
        if file.is_some() {
            self.touch();
        }
        file
    }

    /// The handle, reopening the file if the budget closed it.
    pub async fn get(&self) -> Result<Rc<DmaFile>> {
        if let Some(file) = self.cached() {
            return Ok(file);
        }
        make_room();
        let file = Rc::new(dio::open_read_write(&self.inner.path, false).await?);
        // Another task may have reopened it meanwhile: keep that one.
        if let Some(existing) = self.cached() {
            return Ok(existing);
        }
        self.install(file.clone());
        Ok(file)
    }
}

/// Closes least-recently-used idle files until one more fits the budget.
fn make_room() {
    let evicted: Vec<Rc<DmaFile>> = with(|registry| {
        let Some(limit) = registry.limit else { return Vec::new() };
        let mut evicted = Vec::new();
        let mut busy = Vec::new();
        while registry.open >= limit {
            let Some((used, weak)) = registry.by_use.pop_first() else { break };
            let Some(slot) = weak.upgrade() else { continue };
            let idle = slot.file.borrow().as_ref().is_some_and(|file| Rc::strong_count(file) == 1);
            if idle {
                if let Some(file) = slot.file.borrow_mut().take() {
                    registry.open -= 1;
                    registry.closed += 1;
                    evicted.push(file);
                }
            } else {
                busy.push((used, weak));
            }
        }
        if registry.open >= limit {
            registry.over_budget += 1;
        }
        registry.by_use.extend(busy);
        evicted
    })
    .unwrap_or_default();
    // Dropped outside the registry borrow: glommio closes them asynchronously.
    drop(evicted);
}

/// Space allocated ahead of the data: `Log`s report the change of their own share.
pub(crate) fn adjust_ahead(previous: u64, now: u64) {
    with(|registry| registry.ahead = registry.ahead.saturating_sub(previous).saturating_add(now));
}

/// How much more this shard may allocate ahead of data (`None`: no node-wide limit).
pub(crate) fn ahead_room() -> Option<u64> {
    with(|registry| registry.ahead_limit.map(|limit| limit.saturating_sub(registry.ahead))).flatten()
}

thread_local! {
    static SYNC_DELAY: std::cell::Cell<std::time::Duration> = const { std::cell::Cell::new(std::time::Duration::ZERO) };
}

/// For tests: every `fdatasync` a log's flusher starts on this executor thread from now on
/// waits this long first, so a test can hold a sync in flight while it rolls, truncates or
/// resets. Zero (the default) waits for nothing.
#[doc(hidden)]
pub fn set_flusher_sync_delay(delay: std::time::Duration) {
    SYNC_DELAY.with(|cell| cell.set(delay));
}

pub(crate) fn flusher_sync_delay() -> std::time::Duration {
    SYNC_DELAY.with(std::cell::Cell::get)
}
