//! The controller's rules, without I/O: a request and the current image in, the records to
//! commit (or why not) out. On one node the controller shard runs them, persists, and hands
//! the records to every shard; in a cluster the consensus shard's leader will, and commit them
//! through Raft.

pub mod cluster;

use std::collections::BTreeMap;

use skein_net::types::TopicId;

use crate::metadata::record::MetadataRecord;
use crate::metadata::topic::{
    validate_topic_name, MetadataError, TopicConfig, TopicDefaults, PARTITIONS_MAX,
};
use crate::metadata::MetadataImage;

/// The record that creates a topic, after every rule: a valid name not in use, a valid
/// partition count and settings (defaults filling the rest), and `id`, which the caller drew
/// at random (16 bytes, as Kafka's UUIDs), neither empty nor the id of a topic that exists.
#[allow(clippy::too_many_arguments)]
pub fn create_topic(
    image: &MetadataImage,
    name: &str,
    id: TopicId,
    partitions: u32,
    configs: &[(String, String)],
    defaults: &TopicDefaults,
    now_ms: i64,
) -> Result<MetadataRecord, MetadataError> {
    validate_topic_name(name)?;
    if image.topics.contains_key(name) {
        return Err(MetadataError::TopicExists(name.to_owned()));
    }
    if id.is_none() || image.topic_ids.values().any(|used| *used == id) {
        return Err(MetadataError::InvalidTopicId(id));
    }
    let config = TopicConfig::from_request(partitions, configs, defaults, now_ms)?;
    Ok(MetadataRecord::TopicCreated { name: name.to_owned(), id, config })
}

/// The record that deletes a topic that exists.
pub fn delete_topic(image: &MetadataImage, name: &str) -> Result<MetadataRecord, MetadataError> {
    if !image.topics.contains_key(name) {
        return Err(MetadataError::UnknownTopic(name.to_owned()));
    }
    Ok(MetadataRecord::TopicDeleted { name: name.to_owned() })
}

/// The record that grows a topic to `total` partitions (Kafka's CreatePartitions): the topic
/// exists and `total` is more than it has, at most [`PARTITIONS_MAX`]. Existing partitions and
/// their data stay where they are; keyed records may map to other partitions from now on.
pub fn add_partitions(
    image: &MetadataImage,
    name: &str,
    total: u32,
) -> Result<MetadataRecord, MetadataError> {
    let Some(current) = image.topics.get(name) else {
        return Err(MetadataError::UnknownTopic(name.to_owned()));
    };
    if total <= current.partitions || total > PARTITIONS_MAX {
        return Err(MetadataError::InvalidPartitions(total));
    }
    Ok(MetadataRecord::TopicChanged {
        name: name.to_owned(),
        config: TopicConfig { partitions: total, ..current.clone() },
    })
}

/// The record that changes a topic's settings (Kafka's IncrementalAlterConfigs): `set` keys
/// take the given values, `reset` keys go back to the broker defaults, with the same rules as
/// at creation; the partition count is not a setting (see [`add_partitions`]).
pub fn alter_topic_config(
    image: &MetadataImage,
    name: &str,
    set: &[(String, String)],
    reset: &[String],
    defaults: &TopicDefaults,
) -> Result<MetadataRecord, MetadataError> {
    let Some(current) = image.topics.get(name) else {
        return Err(MetadataError::UnknownTopic(name.to_owned()));
    };
    let config = current.altered(set, reset, defaults)?;
    Ok(MetadataRecord::TopicChanged { name: name.to_owned(), config })
}

/// The records that rebuild an image holding these topics (with their ids; a topic missing
/// from `ids` has none) and producer-id reservation (a node's start-up from its stored
/// snapshot).
pub fn records_for<'a>(
    topics: impl IntoIterator<Item = (&'a String, &'a TopicConfig)>,
    ids: &BTreeMap<String, TopicId>,
    producer_ids_next_block: i64,
) -> Vec<MetadataRecord> {
    let mut records: Vec<MetadataRecord> = topics
        .into_iter()
        .map(|(name, config)| MetadataRecord::TopicCreated {
            name: name.clone(),
            id: ids.get(name).copied().unwrap_or(TopicId::NONE),
            config: config.clone(),
        })
        .collect();
    if producer_ids_next_block > 0 {
        records.push(MetadataRecord::ProducerIdsReserved { next_block: producer_ids_next_block });
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::apply;

    fn defaults() -> TopicDefaults {
        TopicDefaults { segment_bytes: 1 << 30, retention_ms: None, max_message_bytes: 1 << 20 }
    }

    #[test]
    fn requests_become_records_only_when_every_rule_holds() {
        let mut image = MetadataImage::default();
        let record = create_topic(&image, "orders", TopicId([1; 16]), 3, &[], &defaults(), 5).unwrap();
        apply(&mut image, &[record]).unwrap();
        assert_eq!(
            create_topic(&image, "orders", TopicId([1; 16]), 3, &[], &defaults(), 6),
            Err(MetadataError::TopicExists("orders".into()))
        );
        assert!(matches!(
            create_topic(&image, "bad/name", TopicId([2; 16]), 1, &[], &defaults(), 6),
            Err(MetadataError::InvalidTopic { .. })
        ));
        assert_eq!(
            create_topic(&image, "t", TopicId([2; 16]), 0, &[], &defaults(), 6),
            Err(MetadataError::InvalidPartitions(0))
        );
        let bad = [("retention.ms".to_owned(), "soon".to_owned())];
        assert!(matches!(
            create_topic(&image, "t", TopicId([2; 16]), 1, &bad, &defaults(), 6),
            Err(MetadataError::InvalidConfig { .. })
        ));
        // The id is the caller's random draw: never empty, never one in use.
        assert_eq!(
            create_topic(&image, "other", TopicId::NONE, 1, &[], &defaults(), 6),
            Err(MetadataError::InvalidTopicId(TopicId::NONE))
        );
        assert_eq!(
            create_topic(&image, "other", TopicId([1; 16]), 1, &[], &defaults(), 6),
            Err(MetadataError::InvalidTopicId(TopicId([1; 16])))
        );
        assert_eq!(delete_topic(&image, "nope"), Err(MetadataError::UnknownTopic("nope".into())));
        let delete = delete_topic(&image, "orders").unwrap();
        apply(&mut image, &[delete]).unwrap();
        assert!(image.topics.is_empty());
    }

    #[test]
    fn partitions_only_grow_on_a_topic_that_exists() {
        let mut image = MetadataImage::default();
        let created = create_topic(&image, "t", TopicId([3; 16]), 2, &[], &defaults(), 1).unwrap();
        apply(&mut image, &[created]).unwrap();
        assert_eq!(add_partitions(&image, "t", 2), Err(MetadataError::InvalidPartitions(2)));
        assert_eq!(add_partitions(&image, "t", 1), Err(MetadataError::InvalidPartitions(1)));
        assert_eq!(
            add_partitions(&image, "t", PARTITIONS_MAX + 1),
            Err(MetadataError::InvalidPartitions(PARTITIONS_MAX + 1))
        );
        assert_eq!(add_partitions(&image, "nope", 3), Err(MetadataError::UnknownTopic("nope".into())));
        let record = add_partitions(&image, "t", 5).unwrap();
        let deltas = apply(&mut image, std::slice::from_ref(&record)).unwrap();
        assert_eq!(image.topics["t"].partitions, 5);
        assert!(
            matches!(&deltas[..], [crate::metadata::Delta::TopicChanged { before, after, .. }] if before.partitions == 2 && after.partitions == 5)
        );
        // The record survives its byte encoding, and a shrinking one is refused by apply.
        let bytes = crate::metadata::record::encode_batch(std::slice::from_ref(&record));
        assert_eq!(crate::metadata::record::decode_batch(&bytes).unwrap(), vec![record]);
        let shrink = MetadataRecord::TopicChanged {
            name: "t".into(),
            config: TopicConfig { partitions: 3, ..image.topics["t"].clone() },
        };
        assert!(apply(&mut image, &[shrink]).is_err());
        assert_eq!(image.topics["t"].partitions, 5, "unchanged");
    }

    #[test]
    fn settings_are_altered_by_the_creation_rules_and_reset_to_the_defaults() {
        let mut image = MetadataImage::default();
        let created = create_topic(
            &image,
            "t",
            TopicId([3; 16]),
            3,
            &[("retention.bytes".into(), "5000".into())],
            &defaults(),
            7,
        )
        .unwrap();
        apply(&mut image, &[created]).unwrap();
        let set = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let record = alter_topic_config(
            &image,
            "t",
            &set(&[("retention.ms", "60000"), ("max.message.bytes", "2048")]),
            &["retention.bytes".to_owned()],
            &defaults(),
        )
        .unwrap();
        apply(&mut image, std::slice::from_ref(&record)).unwrap();
        let topic = &image.topics["t"];
        assert_eq!(topic.retention_ms, Some(60_000));
        assert_eq!(topic.max_message_bytes, 2048);
        assert_eq!(topic.retention_bytes, None, "reset to the default (no limit)");
        assert_eq!((topic.partitions, topic.created_ms), (3, 7), "kept");
        // Reset to the broker defaults.
        let reset = alter_topic_config(&image, "t", &[], &["max.message.bytes".to_owned()], &defaults());
        let MetadataRecord::TopicChanged { config, .. } = reset.unwrap() else { panic!() };
        assert_eq!(config.max_message_bytes, defaults().max_message_bytes);
        // Every rule of creation, a key once, a topic that exists.
        for (set_pairs, reset_keys, key) in [
            (set(&[("retention.ms", "-5")]), vec![], "retention.ms"),
            (set(&[("segment.bytes", "100")]), vec![], "segment.bytes"),
            (set(&[("colour", "blue")]), vec![], "colour"),
            (set(&[("retention.ms", "1")]), vec!["retention.ms".to_owned()], "retention.ms"),
            (set(&[]), vec!["partitions".to_owned()], "partitions"),
        ] {
            let error = alter_topic_config(&image, "t", &set_pairs, &reset_keys, &defaults()).unwrap_err();
            assert!(matches!(&error, MetadataError::InvalidConfig { key: k, .. } if k == key), "{error}");
        }
        assert_eq!(
            alter_topic_config(&image, "nope", &[], &[], &defaults()),
            Err(MetadataError::UnknownTopic("nope".into()))
        );
    }

    #[test]
    fn a_stored_snapshot_rebuilds_the_same_image() {
        let mut image = MetadataImage::default();
        for (name, partitions) in [("a", 1), ("b", 7)] {
            let record =
                create_topic(&image, name, TopicId([partitions as u8; 16]), partitions, &[], &defaults(), 1)
                    .unwrap();
            apply(&mut image, &[record]).unwrap();
        }
        apply(&mut image, &[MetadataRecord::ProducerIdsReserved { next_block: 3000 }]).unwrap();
        let mut rebuilt = MetadataImage::default();
        apply(&mut rebuilt, &records_for(&image.topics, &image.topic_ids, image.producer_ids_next_block))
            .unwrap();
        assert_eq!(rebuilt.topic_ids, image.topic_ids);
        assert_eq!((rebuilt.topics, rebuilt.producer_ids_next_block), (image.topics, 3000));
    }
}
