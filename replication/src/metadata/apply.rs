//! The one pure function that changes a metadata image.

use skein_net::types::TopicId;

use crate::metadata::delta::Delta;
use crate::metadata::image::{BrokerImage, MetadataImage};
use crate::metadata::record::MetadataRecord;

/// Why a batch of records cannot be applied to an image. A controller never commits such a
/// batch; seeing one means the log and the image disagree, and the node must not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("record {index}: topic {name} already exists")]
    TopicExists { index: usize, name: String },
    #[error("record {index}: topic id {id} is already the id of topic {other}")]
    TopicIdInUse { index: usize, id: TopicId, other: String },
    #[error("record {index}: topic {name} does not exist")]
    UnknownTopic { index: usize, name: String },
    #[error(
        "record {index}: producer ids reserved up to {next_block}, below the {current} already reserved"
    )]
    ProducerIdsBackwards { index: usize, next_block: i64, current: i64 },
    #[error("record {index}: broker {node} registers at epoch {epoch}, not above its current {current}")]
    StaleBrokerEpoch { index: usize, node: u32, epoch: u64, current: u64 },
    #[error("record {index}: broker {node} is not registered")]
    UnknownBroker { index: usize, node: u32 },
    #[error("record {index}: topic {name} would shrink from {from} to {to} partitions")]
    PartitionsShrink { index: usize, name: String, from: u32, to: u32 },
    #[error("record {index}: partition {tp}: {reason}")]
    InvalidPartitionChange { index: usize, tp: String, reason: &'static str },
}

/// Applies a batch of records, all or nothing: if any record does not fit the image as the
/// earlier ones of the batch left it, the image is unchanged and the error names the record.
/// Returns what changed, in record order.
pub fn apply(image: &mut MetadataImage, records: &[MetadataRecord]) -> Result<Vec<Delta>, ApplyError> {
    let mut next = image.clone();
    let mut deltas = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        match record {
            MetadataRecord::TopicCreated { name, id, config } => {
                if next.topics.contains_key(name) {
                    return Err(ApplyError::TopicExists { index, name: name.clone() });
                }
                if let Some((other, _)) = next.topic_ids.iter().find(|(_, used)| !id.is_none() && *used == id)
                {
                    return Err(ApplyError::TopicIdInUse { index, id: *id, other: other.clone() });
                }
                next.topics.insert(name.clone(), config.clone());
                next.topic_ids.insert(name.clone(), *id);
                deltas.push(Delta::TopicCreated { name: name.clone(), id: *id, config: config.clone() });
            }
            MetadataRecord::TopicDeleted { name } => {
                let Some(config) = next.topics.remove(name) else {
                    return Err(ApplyError::UnknownTopic { index, name: name.clone() });
                };
                let id = next.topic_ids.remove(name).unwrap_or(TopicId::NONE);
                next.partitions.retain(|tp, _| tp.topic() != name);
                deltas.push(Delta::TopicDeleted { name: name.clone(), id, config });
            }
            MetadataRecord::TopicChanged { name, config } => {
                let Some(before) = next.topics.get(name).cloned() else {
                    return Err(ApplyError::UnknownTopic { index, name: name.clone() });
                };
                if config.partitions < before.partitions {
                    return Err(ApplyError::PartitionsShrink {
                        index,
                        name: name.clone(),
                        from: before.partitions,
                        to: config.partitions,
                    });
                }
                next.topics.insert(name.clone(), config.clone());
                deltas.push(Delta::TopicChanged { name: name.clone(), before, after: config.clone() });
            }
            MetadataRecord::ProducerIdsReserved { next_block } => {
                if *next_block < next.producer_ids_next_block {
                    return Err(ApplyError::ProducerIdsBackwards {
                        index,
                        next_block: *next_block,
                        current: next.producer_ids_next_block,
                    });
                }
                next.producer_ids_next_block = *next_block;
                deltas.push(Delta::ProducerIdsReserved { next_block: *next_block });
            }
            MetadataRecord::BrokerRegistered { node, epoch, unclean } => {
                if let Some(current) = next.brokers.get(node).filter(|b| b.epoch >= *epoch) {
                    return Err(ApplyError::StaleBrokerEpoch {
                        index,
                        node: node.0,
                        epoch: epoch.0,
                        current: current.epoch.0,
                    });
                }
                let broker =
                    BrokerImage { epoch: *epoch, fenced: true, shutting_down: false, unclean: *unclean };
                next.brokers.insert(*node, broker);
                deltas.push(Delta::BrokerChanged { node: *node });
            }
            MetadataRecord::BrokerChanged { node, fenced, shutting_down } => {
                let Some(broker) = next.brokers.get_mut(node) else {
                    return Err(ApplyError::UnknownBroker { index, node: node.0 });
                };
                broker.fenced = *fenced;
                broker.shutting_down = *shutting_down;
                deltas.push(Delta::BrokerChanged { node: *node });
            }
            MetadataRecord::PartitionChanged { tp, state } => {
                let invalid =
                    |reason| ApplyError::InvalidPartitionChange { index, tp: tp.to_string(), reason };
                if next.topics.get(tp.topic()).is_none_or(|t| tp.partition >= t.partitions) {
                    return Err(invalid("no such topic or partition"));
                }
                if state.isr.iter().chain(&state.elr).any(|n| !state.replicas.contains(n)) {
                    return Err(invalid("an ISR or ELR member is not a replica"));
                }
                if state.leader.is_some_and(|l| !state.isr.contains(&l)) {
                    return Err(invalid("the leader is not in the ISR"));
                }
                if let Some(before) = next.partitions.get(tp) {
                    if state.partition_epoch <= before.partition_epoch {
                        return Err(invalid("the partition epoch does not rise"));
                    }
                    if state.leader_epoch < before.leader_epoch
                        || (state.leader != before.leader && state.leader_epoch == before.leader_epoch)
                    {
                        return Err(invalid("a new leader without a higher leader epoch"));
                    }
                }
                next.partitions.insert(tp.clone(), state.clone());
                deltas.push(Delta::PartitionChanged { tp: tp.clone(), state: state.clone() });
            }
        }
    }
    next.applied += records.len() as u64;
    *image = next;
    Ok(deltas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::topic::TopicConfig;

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

    fn created(name: &str, partitions: u32) -> MetadataRecord {
        let mut id = [name.as_bytes()[0]; 16];
        id[0] = partitions as u8;
        let id = TopicId(id);
        MetadataRecord::TopicCreated { name: name.into(), id, config: config(partitions) }
    }

    #[test]
    fn records_build_the_image_and_say_what_changed() {
        let mut image = MetadataImage::default();
        let deltas = apply(&mut image, &[created("a", 2), created("b", 3)]).unwrap();
        let image_id_of_a = image.topic_ids["a"];
        assert_eq!(deltas.len(), 2);
        assert_eq!(image.applied, 2);
        assert_eq!(image.topic("b").map(|c| c.partitions), Some(3));
        let deltas = apply(&mut image, &[MetadataRecord::TopicDeleted { name: "a".into() }]).unwrap();
        assert_eq!(
            deltas,
            vec![Delta::TopicDeleted { name: "a".into(), id: image_id_of_a, config: config(2) }]
        );
        assert!(image.topic("a").is_none());
        assert_eq!(image.applied, 3);
    }

    #[test]
    fn a_topic_id_names_one_topic_and_a_recreated_topic_has_another() {
        let mut image = MetadataImage::default();
        let first = TopicId([1; 16]);
        let create =
            |name: &str, id| MetadataRecord::TopicCreated { name: name.into(), id, config: config(1) };
        apply(&mut image, &[create("a", first)]).unwrap();
        assert_eq!(image.topic_ids["a"], first);
        let error = apply(&mut image, &[create("b", first)]).unwrap_err();
        assert_eq!(error, ApplyError::TopicIdInUse { index: 0, id: first, other: "a".into() });
        // Topics from before ids may share the empty id.
        apply(&mut image, &[create("c", TopicId::NONE), create("d", TopicId::NONE)]).unwrap();
        // Deleted and created again: the delta carries each incarnation's id.
        let second = TopicId([2; 16]);
        let deltas =
            apply(&mut image, &[MetadataRecord::TopicDeleted { name: "a".into() }, create("a", second)])
                .unwrap();
        assert!(matches!(&deltas[0], Delta::TopicDeleted { id, .. } if *id == first));
        assert!(matches!(&deltas[1], Delta::TopicCreated { id, .. } if *id == second));
        assert_eq!(image.topic_ids["a"], second);
    }

    #[test]
    fn a_batch_that_does_not_fit_changes_nothing() {
        let mut image = MetadataImage::default();
        apply(&mut image, &[created("a", 1)]).unwrap();
        let before = image.clone();
        let error = apply(&mut image, &[created("b", 1), created("a", 1)]).unwrap_err();
        assert_eq!(error, ApplyError::TopicExists { index: 1, name: "a".into() });
        assert_eq!(image, before, "b was not created either");
        let error = apply(&mut image, &[MetadataRecord::TopicDeleted { name: "zz".into() }]).unwrap_err();
        assert_eq!(error, ApplyError::UnknownTopic { index: 0, name: "zz".into() });
        apply(&mut image, &[MetadataRecord::ProducerIdsReserved { next_block: 2000 }]).unwrap();
        let error =
            apply(&mut image, &[MetadataRecord::ProducerIdsReserved { next_block: 1000 }]).unwrap_err();
        assert!(matches!(error, ApplyError::ProducerIdsBackwards { current: 2000, .. }));
        assert_eq!(image.producer_ids_next_block, 2000);
    }

    #[test]
    fn partition_changes_only_move_epochs_forward() {
        use crate::metadata::record::PartitionState;
        use skein_net::types::{BrokerEpoch, LeaderEpoch, NodeId, PartitionEpoch, TopicPartition};
        let mut image = MetadataImage::default();
        let tp = TopicPartition::new("t", 0);
        let state = |leader: u32, le: u32, pe: u32| PartitionState {
            leader: Some(NodeId(leader)),
            leader_epoch: LeaderEpoch(le),
            partition_epoch: PartitionEpoch(pe),
            replicas: vec![NodeId(1), NodeId(2)],
            isr: vec![NodeId(1), NodeId(2)],
            elr: vec![],
        };
        let change = |leader, le, pe| MetadataRecord::PartitionChanged {
            tp: tp.clone(),
            state: state(leader, le, pe),
        };
        let refused = apply(&mut image, &[change(1, 0, 0)]).unwrap_err();
        assert!(matches!(refused, ApplyError::InvalidPartitionChange { .. }), "no topic yet");
        apply(&mut image, &[created("t", 1), change(1, 0, 0)]).unwrap();
        assert!(apply(&mut image, &[change(1, 0, 0)]).is_err(), "the same partition epoch again");
        assert!(apply(&mut image, &[change(2, 0, 1)]).is_err(), "a new leader in the same epoch");
        let deltas = apply(&mut image, &[change(2, 1, 1)]).unwrap();
        assert_eq!(deltas, vec![Delta::PartitionChanged { tp: tp.clone(), state: state(2, 1, 1) }]);
        let mut outside = state(2, 1, 2);
        outside.isr.push(NodeId(9));
        assert!(apply(&mut image, &[MetadataRecord::PartitionChanged { tp: tp.clone(), state: outside }])
            .is_err());
        // Brokers: registration fenced, epochs only rise.
        let register = |epoch| MetadataRecord::BrokerRegistered {
            node: NodeId(1),
            epoch: BrokerEpoch(epoch),
            unclean: false,
        };
        apply(&mut image, &[register(5)]).unwrap();
        assert!(image.brokers[&NodeId(1)].fenced);
        assert!(matches!(apply(&mut image, &[register(5)]), Err(ApplyError::StaleBrokerEpoch { .. })));
        apply(
            &mut image,
            &[MetadataRecord::BrokerChanged { node: NodeId(1), fenced: false, shutting_down: false }],
        )
        .unwrap();
        assert!(!image.brokers[&NodeId(1)].fenced);
        // Deleting the topic drops its partitions.
        apply(&mut image, &[MetadataRecord::TopicDeleted { name: "t".into() }]).unwrap();
        assert!(image.partitions.is_empty());
    }

    /// Deleting and creating a topic of the same name in one batch is a new topic.
    #[test]
    fn a_name_can_be_reused_after_its_deletion() {
        let mut image = MetadataImage::default();
        apply(&mut image, &[created("t", 1)]).unwrap();
        let deltas =
            apply(&mut image, &[MetadataRecord::TopicDeleted { name: "t".into() }, created("t", 4)]).unwrap();
        assert_eq!(deltas.len(), 2);
        assert_eq!(image.topic("t").map(|c| c.partitions), Some(4));
    }
}
