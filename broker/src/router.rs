//! Where a partition lives: an explicit table, filled from metadata, consulted by every request.
//!
//! Each shard keeps its own [`PartitionTable`] (no sharing, no locks). An entry is written when
//! the shard learns of a topic (at start-up from the stored metadata, or when the controller
//! applies a creation) and removed when the topic goes; requests look partitions up with
//! [`PartitionTable::route`] instead of hashing at each call. Today every partition is led by
//! this node, so a location is a shard of this node; in a cluster the same table will say
//! which node leads a partition, and that no one does during an election.
//!
//! The CRC32C hash of the topic name survives only as the *placement* of a new partition on a
//! shard of this node ([`place`]): stable across restarts as long as the shard count is
//! unchanged.

use std::collections::HashMap;
use std::sync::Arc;

use skein_net::types::{ShardId, TopicPartition};

/// The shard of this node that holds `partition` of `topic`: consecutive partitions of a topic
/// go to consecutive shards, starting from a shard picked by the topic name's CRC32C.
pub fn place(topic: &str, partition: u32, shards: usize) -> ShardId {
    ShardId::from_index((crc32c::crc32c(topic.as_bytes()) as usize).wrapping_add(partition as usize) % shards)
}

/// The partitions of a topic of `partitions` that [`place`] puts on `shard`.
pub fn placed_on(topic: &str, partitions: u32, shards: usize, shard: ShardId) -> Vec<u32> {
    (0..partitions).filter(|&p| place(topic, p, shards) == shard).collect()
}

/// The partitions this node knows, topic by topic, with the shard holding each.
#[derive(Debug, Default)]
pub struct PartitionTable {
    topics: HashMap<Arc<str>, Vec<ShardId>>,
}

impl PartitionTable {
    /// Places a topic's partitions on the node's `shards` shards and records where.
    pub fn assign(&mut self, topic: &str, partitions: u32, shards: usize) {
        let owners = (0..partitions).map(|p| place(topic, p, shards)).collect();
        self.topics.insert(Arc::from(topic), owners);
    }

    pub fn remove(&mut self, topic: &str) {
        self.topics.remove(topic);
    }

    /// The shard holding a partition this node knows, with the partition's shared
    /// topic-partition (one lookup on the request path).
    pub fn route(&self, topic: &str, partition: u32) -> Option<(ShardId, TopicPartition)> {
        let (name, owners) = self.topics.get_key_value(topic)?;
        let shard = *owners.get(partition as usize)?;
        Some((shard, TopicPartition { topic: name.clone(), partition }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_spreads_a_topic_over_every_shard_and_is_stable() {
        let shards = 4;
        let mut counts = [0usize; 4];
        for partition in 0..400 {
            counts[place("orders", partition, shards).index()] += 1;
        }
        assert_eq!(counts, [100; 4], "consecutive partitions on consecutive shards");
        assert_eq!(place("t", 3, 4), place("t", 3, 4));
    }

    #[test]
    fn the_table_answers_from_what_was_assigned_not_from_a_hash() {
        let mut table = PartitionTable::default();
        assert_eq!(table.route("t", 0), None);
        table.assign("t", 3, 2);
        for p in 0..3 {
            assert_eq!(table.route("t", p).map(|r| r.0), Some(place("t", p, 2)));
        }
        assert_eq!(table.route("t", 3), None, "past the partition count");
        let on_0 = placed_on("t", 3, 2, ShardId(0));
        let on_1 = placed_on("t", 3, 2, ShardId(1));
        assert_eq!(on_0.len() + on_1.len(), 3);
        assert_eq!(table.route("t", 2).map(|r| r.1.to_string()), Some("t/2".to_owned()));
        table.remove("t");
        assert_eq!(table.route("t", 0), None);
    }
}
