//! What a shard must open and close so that its partitions match the metadata image: a pure
//! plan, computed from the image and what is open, that the shard then carries out
//! (`Shard::reconcile`). It runs after every applied batch of metadata records and again every
//! few seconds, so a partition that failed to open (a full disk, too few descriptors) is
//! retried until it opens, and one whose topic is gone is closed, whatever message was lost.

use std::collections::{BTreeMap, HashSet};

use skein_net::types::ShardId;
use skein_replication::metadata::{MetadataImage, TopicConfig};

use crate::router::placed_on;

/// What to do on one shard.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Partitions to open, by topic (with its settings).
    pub open: Vec<(String, TopicConfig, Vec<u32>)>,
    /// Topics whose partitions here must be closed and removed.
    pub close: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.close.is_empty()
    }
}

/// The plan for `shard` (of `shards`), given the partitions open there by topic and the topics
/// being created right now (prepared, not yet in the image: kept).
pub fn plan(
    image: &MetadataImage,
    shard: ShardId,
    shards: usize,
    open: &BTreeMap<String, Vec<u32>>,
    preparing: &HashSet<String>,
) -> Plan {
    let mut plan = Plan::default();
    for (name, config) in &image.topics {
        let opened = open.get(name);
        let missing: Vec<u32> = placed_on(name, config.partitions, shards, shard)
            .into_iter()
            .filter(|p| opened.is_none_or(|o| !o.contains(p)))
            .collect();
        if !missing.is_empty() {
            plan.open.push((name.clone(), config.clone(), missing));
        }
    }
    for name in open.keys() {
        if !image.topics.contains_key(name) && !preparing.contains(name) {
            plan.close.push(name.clone());
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_replication::metadata::{apply, MetadataRecord};

    fn config(partitions: u32) -> TopicConfig {
        TopicConfig {
            partitions,
            retention_ms: None,
            retention_bytes: None,
            segment_bytes: 1 << 30,
            segment_ms: None,
            max_message_bytes: 1 << 20,
            created_ms: 0,
        }
    }

    #[test]
    fn a_shard_opens_what_is_placed_on_it_and_closes_what_is_gone() {
        let mut image = MetadataImage::default();
        apply(
            &mut image,
            &[MetadataRecord::TopicCreated {
                name: "t".into(),
                id: skein_net::types::TopicId([4; 16]),
                config: config(4),
            }],
        )
        .unwrap();
        let shard = ShardId(1);
        let placed = placed_on("t", 4, 2, shard);
        assert_eq!(placed.len(), 2);
        let nothing_open = BTreeMap::new();
        let plan = plan(&image, shard, 2, &nothing_open, &HashSet::new());
        assert_eq!(plan.open, vec![("t".to_owned(), config(4), placed.clone())]);
        assert!(plan.close.is_empty());

        // One of the two failed to open last time: only it is retried.
        let half: BTreeMap<String, Vec<u32>> = [("t".to_owned(), vec![placed[0]])].into();
        let retry = super::plan(&image, shard, 2, &half, &HashSet::new());
        assert_eq!(retry.open, vec![("t".to_owned(), config(4), vec![placed[1]])]);
        let all: BTreeMap<String, Vec<u32>> = [("t".to_owned(), placed)].into();
        assert!(super::plan(&image, shard, 2, &all, &HashSet::new()).is_empty());

        // A topic open here but not in the image is closed, unless it is being created.
        let stale: BTreeMap<String, Vec<u32>> = [("old".to_owned(), vec![0])].into();
        assert_eq!(super::plan(&MetadataImage::default(), shard, 2, &stale, &HashSet::new()).close, ["old"]);
        let preparing: HashSet<String> = ["old".to_owned()].into();
        assert!(super::plan(&MetadataImage::default(), shard, 2, &stale, &preparing).is_empty());
    }
}
