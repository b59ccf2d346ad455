//! Named domain types shared by the broker, the client and (later) replication: which
//! partition, which broker, which shard, which epoch, which offset.
//!
//! They live here, in the lowest crate every other one already uses, so that no crate has to
//! reach sideways or up for them (the client must not depend on the broker or on replication).

use std::fmt;
use std::sync::Arc;

/// A position in a partition's log (the offset of a record, or of the next one to be written).
pub type Offset = u64;

/// A broker of a cluster (`node_id` in the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub u32);

/// One of a broker's shards (a core).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ShardId(pub u16);

impl ShardId {
    /// Its position in per-shard tables.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    pub fn from_index(index: usize) -> ShardId {
        ShardId(u16::try_from(index).expect("fewer than 65536 shards"))
    }
}

/// A partition leader's term: bumped each time leadership of the partition changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LeaderEpoch(pub u32);

/// Bumped by every change of a partition's replica set or ISR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PartitionEpoch(pub u32);

/// A broker's registration term: bumped each time the broker registers with the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BrokerEpoch(pub u64);

/// A topic's identity (Kafka's topic id, KIP-516): 16 random bytes the controller gives a
/// topic when it is created. A topic deleted and created again under the same name gets
/// another, so a replica left from the old topic is never taken for one of the new.
/// [`TopicId::NONE`] (all zero) is no id: a topic from before ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TopicId(pub [u8; 16]);

impl TopicId {
    pub const NONE: TopicId = TopicId([0; 16]);

    pub fn is_none(&self) -> bool {
        *self == TopicId::NONE
    }
}

impl fmt::Display for TopicId {
    /// 32 lowercase hexadecimal digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A topic's name and one of its partitions. The name is shared (cloning is a reference count),
/// since the same topic appears in every request and table entry of its partitions.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<Arc<str>>, partition: u32) -> TopicPartition {
        TopicPartition { topic: topic.into(), partition }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.0)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_partitions_order_by_topic_then_partition_and_print_as_a_path() {
        let mut tps = [TopicPartition::new("b", 0), TopicPartition::new("a", 2), TopicPartition::new("a", 1)];
        tps.sort();
        assert_eq!(tps.iter().map(ToString::to_string).collect::<Vec<_>>(), ["a/1", "a/2", "b/0"]);
        assert_eq!(ShardId::from_index(3).index(), 3);
        assert!(LeaderEpoch(2) > LeaderEpoch(1));
    }
}
