//! The metadata image: what the records applied so far say exists. Every shard keeps one (on
//! one node the controller shard's is the authority; in a cluster each node's follows the Raft
//! log). Only [`super::apply`] changes it.

use std::collections::BTreeMap;

use skein_net::types::{BrokerEpoch, NodeId, TopicId, TopicPartition};

use crate::metadata::record::PartitionState;
use crate::metadata::topic::TopicConfig;

/// A registered broker, as the records say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerImage {
    pub epoch: BrokerEpoch,
    pub fenced: bool,
    pub shutting_down: bool,
    pub unclean: bool,
}

/// Topics and their settings, and the producer-id blocks reserved, after `applied` records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataImage {
    /// Records applied so far (the position in the record log this image stands for).
    pub applied: u64,
    pub topics: BTreeMap<String, TopicConfig>,
    /// Each topic's id (KIP-516; [`TopicId::NONE`] for a topic from before ids).
    pub topic_ids: BTreeMap<String, TopicId>,
    /// Producer ids below this may have been handed out.
    pub producer_ids_next_block: i64,
    /// The cluster: brokers and each partition's replication state (empty on a single node,
    /// which needs neither).
    pub brokers: BTreeMap<NodeId, BrokerImage>,
    pub partitions: BTreeMap<TopicPartition, PartitionState>,
}

impl MetadataImage {
    pub fn topic(&self, name: &str) -> Option<&TopicConfig> {
        self.topics.get(name)
    }
}
