//! What applying records changed: each shard turns these into opening and closing partitions
//! (the broker's reconciler), rather than re-reading the whole image.

use skein_net::types::{NodeId, TopicId, TopicPartition};

use crate::metadata::record::PartitionState;
use crate::metadata::topic::TopicConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    TopicCreated {
        name: String,
        id: TopicId,
        config: TopicConfig,
    },
    /// The topic is gone; `config` is what it was (its partition count says what to close).
    TopicDeleted {
        name: String,
        id: TopicId,
        config: TopicConfig,
    },
    ProducerIdsReserved {
        next_block: i64,
    },
    /// A topic's settings changed; `before` is what they were (fewer partitions, perhaps).
    TopicChanged {
        name: String,
        before: TopicConfig,
        after: TopicConfig,
    },
    /// A broker registered or changed (fenced, unfenced, shutting down).
    BrokerChanged {
        node: NodeId,
    },
    /// A partition's leader, epochs or replica sets changed: its replicas become leader or
    /// follower, or learn a new ISR.
    PartitionChanged {
        tp: TopicPartition,
        state: PartitionState,
    },
}
