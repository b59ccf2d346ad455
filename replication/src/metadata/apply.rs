//! The one pure function that changes a metadata image.

use crate::metadata::delta::Delta;
use crate::metadata::image::MetadataImage;
use crate::metadata::record::MetadataRecord;

/// Why a batch of records cannot be applied to an image. A controller never commits such a
/// batch; seeing one means the log and the image disagree, and the node must not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("record {index}: topic {name} already exists")]
    TopicExists { index: usize, name: String },
    #[error("record {index}: topic {name} does not exist")]
    UnknownTopic { index: usize, name: String },
    #[error(
        "record {index}: producer ids reserved up to {next_block}, below the {current} already reserved"
    )]
    ProducerIdsBackwards { index: usize, next_block: i64, current: i64 },
}

/// Applies a batch of records, all or nothing: if any record does not fit the image as the
/// earlier ones of the batch left it, the image is unchanged and the error names the record.
/// Returns what changed, in record order.
pub fn apply(image: &mut MetadataImage, records: &[MetadataRecord]) -> Result<Vec<Delta>, ApplyError> {
    let mut next = image.clone();
    let mut deltas = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        match record {
            MetadataRecord::TopicCreated { name, config } => {
                if next.topics.contains_key(name) {
                    return Err(ApplyError::TopicExists { index, name: name.clone() });
                }
                next.topics.insert(name.clone(), config.clone());
                deltas.push(Delta::TopicCreated { name: name.clone(), config: config.clone() });
            }
            MetadataRecord::TopicDeleted { name } => {
                let Some(config) = next.topics.remove(name) else {
                    return Err(ApplyError::UnknownTopic { index, name: name.clone() });
                };
                deltas.push(Delta::TopicDeleted { name: name.clone(), config });
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
        MetadataRecord::TopicCreated { name: name.into(), config: config(partitions) }
    }

    #[test]
    fn records_build_the_image_and_say_what_changed() {
        let mut image = MetadataImage::default();
        let deltas = apply(&mut image, &[created("a", 2), created("b", 3)]).unwrap();
        assert_eq!(deltas.len(), 2);
        assert_eq!(image.applied, 2);
        assert_eq!(image.topic("b").map(|c| c.partitions), Some(3));
        let deltas = apply(&mut image, &[MetadataRecord::TopicDeleted { name: "a".into() }]).unwrap();
        assert_eq!(deltas, vec![Delta::TopicDeleted { name: "a".into(), config: config(2) }]);
        assert!(image.topic("a").is_none());
        assert_eq!(image.applied, 3);
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
