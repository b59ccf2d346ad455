//! The metadata image: what the records applied so far say exists. Every shard keeps one (on
//! one node the controller shard's is the authority; in a cluster each node's follows the Raft
//! log). Only [`super::apply`] changes it.

use std::collections::BTreeMap;

use crate::metadata::topic::TopicConfig;

/// Topics and their settings, and the producer-id blocks reserved, after `applied` records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataImage {
    /// Records applied so far (the position in the record log this image stands for).
    pub applied: u64,
    pub topics: BTreeMap<String, TopicConfig>,
    /// Producer ids below this may have been handed out.
    pub producer_ids_next_block: i64,
}

impl MetadataImage {
    pub fn topic(&self, name: &str) -> Option<&TopicConfig> {
        self.topics.get(name)
    }
}
