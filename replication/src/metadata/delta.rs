//! What applying records changed: each shard turns these into opening and closing partitions
//! (the broker's reconciler), rather than re-reading the whole image.

use crate::metadata::topic::TopicConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    TopicCreated {
        name: String,
        config: TopicConfig,
    },
    /// The topic is gone; `config` is what it was (its partition count says what to close).
    TopicDeleted {
        name: String,
        config: TopicConfig,
    },
    ProducerIdsReserved {
        next_block: i64,
    },
}
