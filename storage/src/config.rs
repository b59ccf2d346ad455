//! Per-log settings.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// When the log calls `fdatasync`, and therefore when an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// An append resolves only after an `fdatasync` that covers it completed. Appends that
    /// arrive while a write or sync is in flight share the next one (group commit).
    Always,
    /// An append resolves once its O_DIRECT write completed (it survives a crash of the
    /// process); `fdatasync` runs at most this often, so a power loss can lose this window.
    Interval(Duration),
    /// An append resolves once its O_DIRECT write completed; `fdatasync` runs only when a segment
    /// is sealed and on close. Durability against power loss comes from replication.
    Never,
}

impl FsyncPolicy {
    pub fn is_always(&self) -> bool {
        matches!(self, FsyncPolicy::Always)
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Interval(every) => write!(f, "interval:{}", every.as_millis()),
        }
    }
}

/// `always`, `never` or `interval:MS`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fsync policy must be always, never or interval:MS (got {0:?})")]
pub struct ParseFsyncPolicyError(pub String);

impl FromStr for FsyncPolicy {
    type Err = ParseFsyncPolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            other => other
                .strip_prefix("interval:")
                .and_then(|ms| ms.parse::<u64>().ok())
                .filter(|&ms| ms > 0)
                .map(|ms| FsyncPolicy::Interval(Duration::from_millis(ms)))
                .ok_or_else(|| ParseFsyncPolicyError(other.to_owned())),
        }
    }
}

/// Settings of one partition log. [`LogConfig::default`] gives production defaults;
/// [`LogConfig::tiny`] gives a configuration that reaches edge cases quickly in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment rolls when the next batch would make it larger than this (bytes, header
    /// included). At most 4 GiB − 1 (positions are 32-bit).
    pub segment_bytes: u64,
    /// A non-empty segment rolls at the next append once it is older than this.
    pub segment_age_max: Option<Duration>,
    /// A sparse index entry is added for the first batch after every this many bytes.
    pub index_interval_bytes: u32,
    pub fsync: FsyncPolicy,
    /// Sealed segments whose newest record is older than this are deleted by
    /// [`crate::Log::enforce_retention`].
    pub retention_age_max: Option<Duration>,
    /// Oldest sealed segments are deleted while the log is larger than this.
    pub retention_bytes_max: Option<u64>,
    /// Bytes of the most recent batches this log keeps in memory to serve tail reads (the
    /// shard's bound, [`crate::handles::set_cache_bytes_max`], applies as well).
    pub cache_bytes_max: usize,
    /// Size of each aligned write buffer; full buffers are written without copying.
    pub write_buffer_bytes: usize,
    /// Appends wait (back-pressure) while more than this many bytes are buffered, not yet
    /// written.
    pub write_buffered_bytes_max: usize,
    /// Largest batch accepted, header included.
    pub batch_bytes_max: usize,
    /// How often the recovery checkpoint is rewritten after a sync.
    pub checkpoint_interval: Duration,
    /// Sealed segments whose index is kept in memory at once (the active one is always).
    pub loaded_indexes_max: usize,
    /// The active segment file is extended with `fallocate` this many bytes ahead of the
    /// data (0: never). On ext4, O_DIRECT writes that extend a file run synchronously in a
    /// kernel worker, one at a time; writes inside an allocated size stay asynchronous. A full
    /// disk is then reported by the `fallocate`, before any data is written.
    pub preallocate_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 128 << 20,
            segment_age_max: Some(Duration::from_secs(7 * 24 * 3600)),
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Never,
            retention_age_max: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes_max: None,
            cache_bytes_max: 4 << 20,
            write_buffer_bytes: 256 << 10,
            write_buffered_bytes_max: 8 << 20,
            batch_bytes_max: 8 << 20,
            checkpoint_interval: Duration::from_secs(1),
            loaded_indexes_max: 4,
            preallocate_bytes: 32 << 20,
        }
    }
}

impl LogConfig {
    /// Tiny segments, a tiny index interval and a tiny cache: every edge case comes quickly.
    pub fn tiny() -> LogConfig {
        LogConfig {
            segment_bytes: 16 << 10,
            segment_age_max: None,
            index_interval_bytes: 256,
            fsync: FsyncPolicy::Always,
            retention_age_max: None,
            retention_bytes_max: None,
            cache_bytes_max: 1024,
            write_buffer_bytes: 8192,
            write_buffered_bytes_max: 64 << 10,
            batch_bytes_max: 12 << 10,
            checkpoint_interval: Duration::from_millis(0),
            loaded_indexes_max: 2,
            preallocate_bytes: 8192,
        }
    }

    /// Checks the relationships between the settings.
    pub fn validate(&self) -> Result<(), &'static str> {
        use crate::files::{BLOCK_BYTES, SEGMENT_HEADER_BYTES};
        if self.segment_bytes > u64::from(u32::MAX) {
            return Err("segment_bytes must be below 4 GiB");
        }
        if self.segment_bytes < SEGMENT_HEADER_BYTES + self.batch_bytes_max as u64 {
            return Err("segment_bytes must hold the header and one batch of batch_bytes_max");
        }
        if self.write_buffer_bytes == 0 || !self.write_buffer_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err("write_buffer_bytes must be a non-zero multiple of 4096");
        }
        if self.write_buffered_bytes_max < self.write_buffer_bytes {
            return Err("write_buffered_bytes_max must be at least write_buffer_bytes");
        }
        if self.index_interval_bytes == 0 {
            return Err("index_interval_bytes must be positive");
        }
        if self.batch_bytes_max < crate::batch::BATCH_HEADER_BYTES {
            return Err("batch_bytes_max is smaller than a batch header");
        }
        if self.batch_bytes_max > crate::batch::BATCH_BYTES_LIMIT {
            return Err("batch_bytes_max is larger than 256 MiB");
        }
        if !self.preallocate_bytes.is_multiple_of(BLOCK_BYTES as u64) {
            return Err("preallocate_bytes must be a multiple of 4096");
        }
        if self.loaded_indexes_max == 0 {
            return Err("loaded_indexes_max must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses() {
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!("never".parse(), Ok(FsyncPolicy::Never));
        assert_eq!("interval:5".parse(), Ok(FsyncPolicy::Interval(Duration::from_millis(5))));
        assert!("interval:0".parse::<FsyncPolicy>().is_err());
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
        assert_eq!(FsyncPolicy::Interval(Duration::from_millis(7)).to_string(), "interval:7");
    }

    #[test]
    fn defaults_are_valid() {
        LogConfig::default().validate().unwrap();
        LogConfig::tiny().validate().unwrap();
        let bad = LogConfig { write_buffer_bytes: 1000, ..LogConfig::default() };
        assert!(bad.validate().is_err());
    }
}
