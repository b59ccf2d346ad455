//! A topic's settings, their validation, and the errors of a refused metadata change.

use std::path::PathBuf;

use rkyv::{Archive, Deserialize, Serialize};
use skein_net::ErrorCode;

/// Limits on topics.
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
pub const PARTITIONS_MAX: u32 = 10_000;

/// One topic's settings. `None` means unbounded (no age or size limit).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct TopicConfig {
    pub partitions: u32,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
    pub segment_ms: Option<u64>,
    pub max_message_bytes: u32,
    pub created_ms: i64,
}

/// Why a metadata change was refused; each maps to a wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopic { name: String, reason: &'static str },
    #[error("topic {0} already exists")]
    TopicExists(String),
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("invalid partition count {0} (1 to 10000)")]
    InvalidPartitions(u32),
    #[error("invalid config {key}={value}: {reason}")]
    InvalidConfig { key: String, value: String, reason: &'static str },
    #[error("topic id {0} is empty or already in use")]
    InvalidTopicId(skein_net::types::TopicId),
    #[error("metadata file {path}: {reason}")]
    Storage { path: PathBuf, reason: String },
}

impl MetadataError {
    pub fn code(&self) -> ErrorCode {
        match self {
            MetadataError::InvalidTopic { .. } | MetadataError::InvalidTopicId(_) => ErrorCode::InvalidTopic,
            MetadataError::TopicExists(_) => ErrorCode::TopicAlreadyExists,
            MetadataError::UnknownTopic(_) => ErrorCode::UnknownTopicOrPartition,
            MetadataError::InvalidPartitions(_) => ErrorCode::InvalidPartitions,
            MetadataError::InvalidConfig { .. } => ErrorCode::InvalidConfig,
            MetadataError::Storage { .. } => ErrorCode::StorageError,
        }
    }
}

/// Checks a topic name: 1–249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), MetadataError> {
    let invalid = |reason| Err(MetadataError::InvalidTopic { name: name.to_owned(), reason });
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return invalid("longer than 249 characters");
    }
    if name == "." || name == ".." {
        return invalid("'.' and '..' are not allowed");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return invalid("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Defaults applied to settings a CreateTopics request leaves out.
#[derive(Debug, Clone)]
pub struct TopicDefaults {
    pub segment_bytes: u64,
    pub retention_ms: Option<u64>,
    pub max_message_bytes: u32,
}

impl TopicConfig {
    /// Builds a topic's settings from the key/value configs of a CreateTopics request.
    pub fn from_request(
        partitions: u32,
        configs: &[(String, String)],
        defaults: &TopicDefaults,
        created_ms: i64,
    ) -> Result<TopicConfig, MetadataError> {
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(MetadataError::InvalidPartitions(partitions));
        }
        let config = TopicConfig {
            partitions,
            retention_ms: defaults.retention_ms,
            retention_bytes: None,
            segment_bytes: defaults.segment_bytes,
            segment_ms: None,
            max_message_bytes: defaults.max_message_bytes,
            created_ms,
        };
        config.altered(configs, &[], defaults)
    }

    /// These settings with `set` applied and the `reset` keys back at their defaults (Kafka's
    /// IncrementalAlterConfigs SET and DELETE), after every rule of a new topic. The partition
    /// count and creation time are kept. An unknown key or a bad value is an error naming it.
    pub fn altered(
        &self,
        set: &[(String, String)],
        reset: &[String],
        defaults: &TopicDefaults,
    ) -> Result<TopicConfig, MetadataError> {
        let mut seen = std::collections::BTreeSet::new();
        for key in set.iter().map(|(key, _)| key).chain(reset) {
            if !seen.insert(key) {
                return Err(MetadataError::InvalidConfig {
                    key: key.clone(),
                    value: String::new(),
                    reason: "given more than once",
                });
            }
        }
        let mut config = self.clone();
        for key in reset {
            match key.as_str() {
                "retention.ms" => config.retention_ms = defaults.retention_ms,
                "retention.bytes" => config.retention_bytes = None,
                "segment.ms" => config.segment_ms = None,
                "segment.bytes" => config.segment_bytes = defaults.segment_bytes,
                "max.message.bytes" => config.max_message_bytes = defaults.max_message_bytes,
                _ => {
                    return Err(MetadataError::InvalidConfig {
                        key: key.clone(),
                        value: String::new(),
                        reason: "unknown setting",
                    })
                }
            }
        }
        for (key, value) in set {
            let invalid =
                |reason| MetadataError::InvalidConfig { key: key.clone(), value: value.clone(), reason };
            let number = value.parse::<i64>().map_err(|_| invalid("not an integer"))?;
            let optional = |number: i64| -> Result<Option<u64>, MetadataError> {
                match number {
                    -1 => Ok(None),
                    n if n > 0 => Ok(Some(n as u64)),
                    _ => Err(invalid("must be positive, or -1 for no limit")),
                }
            };
            match key.as_str() {
                "retention.ms" => config.retention_ms = optional(number)?,
                "retention.bytes" => config.retention_bytes = optional(number)?,
                "segment.ms" => config.segment_ms = optional(number)?,
                "segment.bytes" => {
                    if !(64 << 10..=(u32::MAX as i64)).contains(&number) {
                        return Err(invalid("must be between 65536 and 4294967295"));
                    }
                    config.segment_bytes = number as u64;
                }
                "max.message.bytes" => {
                    if !(1024..=(256 << 20)).contains(&number) {
                        return Err(invalid("must be between 1024 and 268435456"));
                    }
                    config.max_message_bytes = number as u32;
                }
                _ => return Err(invalid("unknown setting")),
            }
        }
        if config.segment_bytes < 4096 + u64::from(config.max_message_bytes) {
            return Err(MetadataError::InvalidConfig {
                key: "segment.bytes".into(),
                value: config.segment_bytes.to_string(),
                reason: "must hold the segment header and one batch of max.message.bytes",
            });
        }
        Ok(config)
    }

    /// The settings as key/value text (Metadata responses, `skein topic describe`).
    pub fn to_configs(&self) -> Vec<(String, String)> {
        let optional = |value: Option<u64>| value.map_or("-1".to_owned(), |v| v.to_string());
        vec![
            ("retention.ms".into(), optional(self.retention_ms)),
            ("retention.bytes".into(), optional(self.retention_bytes)),
            ("segment.bytes".into(), self.segment_bytes.to_string()),
            ("segment.ms".into(), optional(self.segment_ms)),
            ("max.message.bytes".into(), self.max_message_bytes.to_string()),
        ]
    }
}
