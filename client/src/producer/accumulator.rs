//! The record accumulator: open batches per partition, filled by [`Producer::send`] under one
//! short lock, and the sealed batches waiting for the sender task.
//!
//! A sealed batch is not finished yet: its producer id, epoch and sequence number are given by
//! the sender when it first sends the batch (see [`super::sender`]), so a batch that never
//! reached the broker never holds a sequence number.
//!
//! [`Producer::send`]: super::Producer::send

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use skein_storage::batch::BatchBuilder;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Waiter;
use crate::ClientError;

/// FNV-1a: topic names are short and trusted, and this runs once per record.
#[derive(Default, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

pub(crate) struct OpenBatch {
    pub topic: Arc<str>,
    pub builder: BatchBuilder,
    pub created: Instant,
    pub waiters: Vec<Waiter>,
    /// Buffer memory held by the batch's records.
    pub memory: usize,
}

/// A batch closed for new records, on its way to the sender.
pub(crate) struct SealedBatch {
    /// Seal order, unique per producer: `flush` waits for every id below a mark.
    pub id: u64,
    pub topic: Arc<str>,
    pub partition: u32,
    pub builder: BatchBuilder,
    pub waiters: Vec<Waiter>,
    pub memory: usize,
    /// When its first record was queued: the delivery timeout counts from here.
    pub created: Instant,
}

#[derive(Default)]
pub(crate) struct Accumulator {
    /// Open batches by topic, indexed by partition.
    pub open: FastMap<String, Vec<Option<OpenBatch>>>,
    pub ready: VecDeque<SealedBatch>,
    pub next_id: u64,
    /// `flush` calls waiting until every batch sealed before their mark is resolved.
    pub flushes: Vec<(u64, oneshot::Sender<()>)>,
    /// Records without a key stick to one partition per topic until a batch's worth was sent.
    pub sticky: FastMap<String, (u32, usize)>,
    pub closed: bool,
    /// Set when the producer can go on no more (fenced by a newer epoch of its id, or refused
    /// a producer id): every later send fails with it.
    pub fatal: Option<ClientError>,
}

impl Accumulator {
    pub fn seal(&mut self, partition: u32, batch: OpenBatch) {
        let id = self.next_id;
        self.next_id += 1;
        self.ready.push_back(SealedBatch {
            id,
            topic: batch.topic,
            partition,
            builder: batch.builder,
            waiters: batch.waiters,
            memory: batch.memory,
            created: batch.created,
        });
    }

    /// Seals the batches that waited `linger` (all of them with `force`); returns the earliest
    /// deadline of those still open.
    pub fn seal_expired(&mut self, linger: Duration, force: bool) -> Option<Instant> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        for (topic, partitions) in &self.open {
            for (partition, batch) in partitions.iter().enumerate() {
                if let Some(batch) = batch {
                    let due = batch.created + linger;
                    if force || due <= now {
                        expired.push((topic.clone(), partition as u32));
                    } else {
                        next = Some(next.map_or(due, |n| n.min(due)));
                    }
                }
            }
        }
        for (topic, partition) in expired {
            let batch =
                self.open.get_mut(&topic).and_then(|p| p[partition as usize].take()).expect("listed above");
            self.seal(partition, batch);
        }
        next
    }
}
