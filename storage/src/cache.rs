//! The tail cache: the most recent batches of one partition, in memory, bounded in bytes.
//!
//! Consumers that keep up read from here without touching the disk. It also holds every batch
//! that overlaps the active segment's last, not yet stable, block (see `appender`): those are
//! never evicted, so the file is only ever read where its bytes are final.

use std::collections::VecDeque;

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

#[derive(Debug)]
pub(crate) struct TailCache {
    entries: VecDeque<CacheEntry>,
    bytes: usize,
    bytes_max: usize,
}

impl TailCache {
    pub fn new(bytes_max: usize) -> TailCache {
        TailCache { entries: VecDeque::new(), bytes: 0, bytes_max }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn push(&mut self, entry: CacheEntry) {
        if let Some(last) = self.entries.back() {
            assert_eq!(last.next_offset, entry.base_offset, "cached batches are contiguous");
        }
        self.bytes += entry.data.len();
        self.entries.push_back(entry);
    }

    /// Evicts the oldest batches while over budget, keeping every batch of the active segment
    /// that ends after `stable_position`.
    pub fn evict(&mut self, active_base: u64, stable_position: u64) {
        while self.bytes > self.bytes_max {
            let Some(front) = self.entries.front() else { break };
            if front.segment_base == active_base && front.end_position() > stable_position {
                break;
            }
            self.bytes -= front.data.len();
            self.entries.pop_front();
        }
    }

    /// Drops every batch that may be read from the file instead, keeping those of the active
    /// segment that end after `stable_position`, each in its own allocation.
    pub fn shrink_to_unstable(&mut self, active_base: u64, stable_position: u64) {
        while let Some(front) = self.entries.front() {
            if front.segment_base == active_base && front.end_position() > stable_position {
                break;
            }
            self.bytes -= front.data.len();
            self.entries.pop_front();
        }
        for entry in &mut self.entries {
            entry.data = Bytes::copy_from_slice(&entry.data);
        }
        self.entries.shrink_to_fit();
    }

    /// The first cached batch, if any.
    pub fn first(&self) -> Option<&CacheEntry> {
        self.entries.front()
    }

    /// Whole batches from the one holding `offset`, while under `bytes_max` (at least one),
    /// none reaching past `visible_offset`. `None` if the cache does not hold `offset`.
    pub fn read(&self, offset: u64, bytes_max: usize, visible_offset: u64) -> Option<(Vec<Bytes>, u64, u64)> {
        let front = self.entries.front()?;
        if offset < front.base_offset {
            return None;
        }
        let index = self.entries.partition_point(|entry| entry.next_offset <= offset);
        let first = self.entries.get(index)?;
        if first.next_offset > visible_offset {
            return None;
        }
        let mut chunks = Vec::new();
        let mut total = 0usize;
        let mut next_offset = first.base_offset;
        for entry in self.entries.range(index..) {
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
    pub fn truncate(&mut self, offset: u64) {
        while let Some(back) = self.entries.back() {
            if back.base_offset < offset {
                break;
            }
            self.bytes -= back.data.len();
            self.entries.pop_back();
        }
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

    #[test]
    fn read_evict_truncate() {
        let mut cache = TailCache::new(250);
        cache.push(entry(0, 2, 4096, 100));
        cache.push(entry(2, 3, 4196, 100));
        cache.push(entry(5, 1, 4296, 100));
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
    }
}
