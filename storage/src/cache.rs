//! The tail cache: the most recent batches of each partition, in memory, bounded in bytes per
//! log and per shard.
//!
//! Consumers that keep up read from here without touching the disk. It also holds every batch
//! that overlaps the active segment's last, not yet stable, block (see `appender`): those are
//! never evicted, so the file is only ever read where its bytes are final.
//!
//! # Two bounds
//! * **Per log** (`LogConfig::cache_bytes_max`): the most one partition's cache holds.
//! * **Per shard** ([`set_cache_bytes_max`]): the most all the caches of this shard (thread)
//!   hold together. Over it, the batch evicted is the oldest of the shard — whichever partition
//!   holds it — so the shard's memory holds the last *T* seconds of every partition's writes,
//!   with *T* = budget / the shard's write rate. A partition written at 125 MB/s then holds
//!   hundreds of MiB and 10,000 idle partitions next to nothing, where a fixed size per
//!   partition would give the fast one a few milliseconds of data (a consumer that hiccups
//!   falls off it and reads from disk while the producer writes: measured in issue 12) and
//!   the idle ones memory they do not use. Oldest-first over the shard also frees the batches
//!   that share one produce request's buffer together.
//!
//! The shard's account: every cache whose oldest batch may be evicted is in a map keyed by the
//! push tick of that batch (one tick counter per shard), so the shard-wide eviction takes the
//! first key, evicts one batch and re-keys that cache: O(log caches) per batch. A cache whose
//! oldest batch is unstable (all its batches then are) is out of the map until a write makes
//! it stable. Lives on one shard (thread-local); nothing here is shared between threads.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::{Rc, Weak};

use bytes::Bytes;

#[derive(Debug, Clone)]
pub(crate) struct CacheEntry {
    pub base_offset: u64,
    pub next_offset: u64,
    pub segment_base: u64,
    pub position: u64,
    pub data: Bytes,
}

impl CacheEntry {
    pub fn end_position(&self) -> u64 {
        self.position + self.data.len() as u64
    }
}

/// Where the oldest cached batch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheFront {
    pub base_offset: u64,
    pub segment_base: u64,
    pub position: u64,
}

#[derive(Debug)]
struct Inner {
    /// Each batch with the shard tick of its push.
    entries: VecDeque<(u64, CacheEntry)>,
    bytes: usize,
    bytes_max: usize,
    /// The active segment and its stable position as last told: batches of the active segment
    /// that end after it stay.
    active_base: u64,
    stable_position: u64,
    /// This cache's key in `Shard::by_age`, while it is there.
    key: Option<u64>,
}

impl Inner {
    fn front_evictable(&self) -> bool {
        self.entries.front().is_some_and(|(_, front)| {
            front.segment_base != self.active_base || front.end_position() <= self.stable_position
        })
    }

    /// Drops the oldest batch; its size.
    fn pop_front(&mut self) -> usize {
        let (_, entry) = self.entries.pop_front().expect("non-empty");
        self.bytes -= entry.data.len();
        entry.data.len()
    }
}

#[derive(Default)]
struct Shard {
    /// `None`: no shard-wide bound (the default, for tests and tools).
    limit: Option<usize>,
    bytes: usize,
    tick: u64,
    by_age: BTreeMap<u64, Weak<RefCell<Inner>>>,
    evicted_for_shard: u64,
}

thread_local! {
    static SHARD: RefCell<Shard> = RefCell::new(Shard::default());
}

fn with<R>(f: impl FnOnce(&mut Shard) -> R) -> Option<R> {
    SHARD.try_with(|shard| f(&mut shard.borrow_mut())).ok()
}

/// Sets how many bytes all tail caches of this shard may hold together (`None`: no bound but
/// each log's own), and evicts down to it.
pub(crate) fn set_cache_bytes_max(limit: Option<usize>) {
    with(|shard| shard.limit = limit);
    enforce_shard_limit();
}

/// What this shard's tail caches hold: bytes, the bound, batches evicted for the bound.
pub(crate) fn shard_stats() -> (usize, Option<usize>, u64) {
    with(|shard| (shard.bytes, shard.limit, shard.evicted_for_shard)).unwrap_or_default()
}

/// Evicts the shard's oldest evictable batches while over the shard's bound.
fn enforce_shard_limit() {
    loop {
        let victim = with(|shard| {
            let limit = shard.limit?;
            while shard.bytes > limit {
                let (key, weak) = shard.by_age.pop_first()?;
                match weak.upgrade() {
                    Some(inner) => return Some((key, inner)),
                    None => continue,
                }
            }
            None
        })
        .flatten();
        let Some((key, inner)) = victim else { return };
        // Borrowed only inside its own methods, which call this after letting go.
        let Ok(mut cache) = inner.try_borrow_mut() else {
            with(|shard| shard.by_age.insert(key, Rc::downgrade(&inner)));
            return;
        };
        debug_assert_eq!(cache.key, Some(key));
        cache.key = None;
        if !cache.front_evictable() {
            continue;
        }
        let freed = cache.pop_front();
        with(|shard| {
            shard.bytes -= freed;
            shard.evicted_for_shard += 1;
        });
        rekey(&inner, &mut cache);
    }
}

/// Puts the cache under the key of its oldest batch if that one may be evicted, else takes it
/// out of the shard's map.
fn rekey(rc: &Rc<RefCell<Inner>>, cache: &mut Inner) {
    let wanted = if cache.front_evictable() { cache.entries.front().map(|(tick, _)| *tick) } else { None };
    if wanted == cache.key {
        return;
    }
    let old = std::mem::replace(&mut cache.key, wanted);
    with(|shard| {
        if let Some(old) = old {
            shard.by_age.remove(&old);
        }
        if let Some(new) = wanted {
            shard.by_age.insert(new, Rc::downgrade(rc));
        }
    });
}

#[derive(Debug)]
pub(crate) struct TailCache {
    inner: Rc<RefCell<Inner>>,
}

impl Drop for TailCache {
    fn drop(&mut self) {
        let cache = self.inner.borrow();
        let (bytes, key) = (cache.bytes, cache.key);
        with(|shard| {
            shard.bytes -= bytes;
            if let Some(key) = key {
                shard.by_age.remove(&key);
            }
        });
    }
}

impl TailCache {
    pub fn new(bytes_max: usize) -> TailCache {
        TailCache {
            inner: Rc::new(RefCell::new(Inner {
                entries: VecDeque::new(),
                bytes: 0,
                bytes_max,
                active_base: 0,
                stable_position: 0,
                key: None,
            })),
        }
    }

    pub fn bytes(&self) -> usize {
        self.inner.borrow().bytes
    }

    /// Runs `f` on the cache, then re-keys it and applies the shard's bound. `f` returns how
    /// the cache's bytes changed.
    fn edit<R>(&self, f: impl FnOnce(&mut Inner) -> (isize, R)) -> R {
        let result = {
            let mut cache = self.inner.borrow_mut();
            let (change, result) = f(&mut cache);
            with(|shard| shard.bytes = shard.bytes.checked_add_signed(change).expect("cache account"));
            rekey(&self.inner, &mut cache);
            result
        };
        enforce_shard_limit();
        result
    }

    /// Adds a batch at the end, then evicts (this log's oldest while over its own bound, the
    /// shard's oldest while over the shard's), keeping every batch of the active segment
    /// `active_base` that ends after `stable_position`.
    pub fn push(&self, entry: CacheEntry, active_base: u64, stable_position: u64) {
        let tick = with(|shard| {
            shard.tick += 1;
            shard.tick
        })
        .unwrap_or(0);
        self.edit(|cache| {
            if let Some((_, last)) = cache.entries.back() {
                assert_eq!(last.next_offset, entry.base_offset, "cached batches are contiguous");
            }
            let added = entry.data.len();
            cache.bytes += added;
            cache.entries.push_back((tick, entry));
            let freed = Self::evict_own(cache, active_base, stable_position);
            (added as isize - freed as isize, ())
        })
    }

    /// The stable position moved (a write completed): evicts as `push` does.
    pub fn evict(&self, active_base: u64, stable_position: u64) {
        self.edit(|cache| (-(Self::evict_own(cache, active_base, stable_position) as isize), ()))
    }

    fn evict_own(cache: &mut Inner, active_base: u64, stable_position: u64) -> usize {
        cache.active_base = active_base;
        cache.stable_position = stable_position;
        let mut freed = 0;
        while cache.bytes > cache.bytes_max && cache.front_evictable() {
            freed += cache.pop_front();
        }
        freed
    }

    /// Drops every batch that may be read from the file instead, keeping those of the active
    /// segment that end after `stable_position`, each in its own allocation.
    pub fn shrink_to_unstable(&self, active_base: u64, stable_position: u64) {
        self.edit(|cache| {
            cache.active_base = active_base;
            cache.stable_position = stable_position;
            let mut freed = 0;
            while cache.front_evictable() {
                freed += cache.pop_front();
            }
            for (_, entry) in &mut cache.entries {
                entry.data = Bytes::copy_from_slice(&entry.data);
            }
            cache.entries.shrink_to_fit();
            (-(freed as isize), ())
        })
    }

    /// Where the first cached batch starts, if there is one.
    pub fn first(&self) -> Option<CacheFront> {
        self.inner.borrow().entries.front().map(|(_, entry)| CacheFront {
            base_offset: entry.base_offset,
            segment_base: entry.segment_base,
            position: entry.position,
        })
    }

    /// Whole batches from the one holding `offset`, while under `bytes_max` (at least one),
    /// none reaching past `visible_offset`. `None` if the cache does not hold `offset`.
    pub fn read(&self, offset: u64, bytes_max: usize, visible_offset: u64) -> Option<(Vec<Bytes>, u64, u64)> {
        let cache = self.inner.borrow();
        let (_, front) = cache.entries.front()?;
        if offset < front.base_offset {
            return None;
        }
        let index = cache.entries.partition_point(|(_, entry)| entry.next_offset <= offset);
        let (_, first) = cache.entries.get(index)?;
        if first.next_offset > visible_offset {
            return None;
        }
        let mut chunks = Vec::new();
        let mut total = 0usize;
        let mut next_offset = first.base_offset;
        for (_, entry) in cache.entries.range(index..) {
            if entry.next_offset > visible_offset
                || (!chunks.is_empty() && total + entry.data.len() > bytes_max)
            {
                break;
            }
            total += entry.data.len();
            next_offset = entry.next_offset;
            chunks.push(entry.data.clone());
        }
        Some((chunks, first.base_offset, next_offset))
    }

    /// Drops every batch at or after `offset`.
    pub fn truncate(&self, offset: u64) {
        self.edit(|cache| {
            let mut freed = 0;
            while let Some((_, back)) = cache.entries.back() {
                if back.base_offset < offset {
                    break;
                }
                freed += back.data.len();
                cache.entries.pop_back();
            }
            cache.bytes -= freed;
            (-(freed as isize), ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(base: u64, count: u64, position: u64, size: usize) -> CacheEntry {
        CacheEntry {
            base_offset: base,
            next_offset: base + count,
            segment_base: 0,
            position,
            data: Bytes::from(vec![base as u8; size]),
        }
    }

    fn read_offsets(cache: &TailCache) -> Option<(u64, u64)> {
        let front = cache.first()?;
        cache.read(front.base_offset, usize::MAX, u64::MAX).map(|(_, first, next)| (first, next))
    }

    #[test]
    fn read_evict_truncate() {
        let cache = TailCache::new(250);
        cache.push(entry(0, 2, 4096, 100), 0, 0);
        cache.push(entry(2, 3, 4196, 100), 0, 0);
        cache.push(entry(5, 1, 4296, 100), 0, 0);
        assert_eq!(cache.read(3, 1000, 6).map(|(c, first, next)| (c.len(), first, next)), Some((2, 2, 6)));
        assert_eq!(cache.read(3, 150, 6).map(|(c, first, next)| (c.len(), first, next)), Some((1, 2, 5)));
        assert_eq!(cache.read(3, 1000, 5).map(|(c, _, next)| (c.len(), next)), Some((1, 5)));
        assert!(cache.read(5, 1000, 5).is_none(), "not visible yet");
        // Over budget, but everything ends after the stable position: nothing goes.
        cache.evict(0, 4096);
        assert_eq!(cache.bytes(), 300);
        cache.evict(0, 8192);
        assert_eq!(cache.bytes(), 200);
        assert!(cache.read(1, 1000, 6).is_none());
        cache.truncate(5);
        assert_eq!(cache.read(2, 1000, 6).map(|(_, _, next)| next), Some(5));
        cache.truncate(0);
        assert!(cache.first().is_none());
        assert_eq!(shard_stats().0, 0, "the shard's account follows");
    }

    #[test]
    fn the_shard_bound_evicts_the_shards_oldest_batches_whichever_log_holds_them() {
        set_cache_bytes_max(Some(1000));
        let (fast, idle, unstable) =
            (TailCache::new(usize::MAX), TailCache::new(usize::MAX), TailCache::new(usize::MAX));
        idle.push(entry(0, 1, 0, 300), 7, 0); // another segment: evictable
        unstable.push(entry(0, 1, 0, 300), 0, 0); // not yet stable: stays
        let mut position = 0;
        for offset in 0..10 {
            fast.push(entry(offset, 1, position, 100), 1, u64::MAX);
            position += 100;
        }
        // 300 unstable + 700 of the fast log: the idle log's older batch went first, then the
        // fast log's oldest.
        assert_eq!((idle.bytes(), unstable.bytes(), fast.bytes()), (0, 300, 700));
        assert_eq!(read_offsets(&fast), Some((3, 10)));
        assert_eq!(shard_stats(), (1000, Some(1000), 4));
        // Once stable, the formerly unstable batch is the oldest and goes next.
        unstable.evict(0, u64::MAX);
        fast.push(entry(10, 1, position, 100), 1, u64::MAX);
        assert_eq!((unstable.bytes(), fast.bytes()), (0, 800));
        // A dropped cache gives its bytes back; a lower bound applies at once.
        drop(fast);
        assert_eq!(shard_stats().0, 0);
        let cache = TailCache::new(usize::MAX);
        for offset in 0..5 {
            cache.push(entry(offset, 1, offset * 100, 100), 1, u64::MAX);
        }
        set_cache_bytes_max(Some(250));
        assert_eq!(read_offsets(&cache), Some((3, 5)));
        set_cache_bytes_max(None);
        drop((idle, unstable, cache));
        assert_eq!(shard_stats().0, 0);
    }
}
