//! The broker's settings as an operator writes them: a TOML file (`skein broker --config
//! skein.toml`), environment overrides, and flags.
//!
//! # Precedence
//! flags > environment (`SKEIN_<SECTION>_<KEY>`, e.g. `SKEIN_NETWORK_LISTEN=0.0.0.0:9400`,
//! `SKEIN_STORAGE_FSYNC=always`) > file > built-in defaults. Each flag of `skein broker` is one
//! key (`--frame-bytes-max` is `network.frame_bytes_max`). An unknown key in the file, or an
//! environment variable of a known section with an unknown key, is an error naming it; other
//! `SKEIN_*` variables (the CLI's `SKEIN_BOOTSTRAP`) are not broker settings and are left alone.
//! An environment value is read as a TOML value when it is one (`4`, `true`) and as a string
//! otherwise (`never`, `0.0.0.0:9400`, `/var/lib/skein`).
//!
//! `skein broker --print-config` prints the effective settings in this format (a valid file).
//!
//! # Keys
//! | key | default | meaning |
//! |---|---|---|
//! | `broker.node_id` | 0 | this broker's id |
//! | `broker.data_dir` | `./skein-data` | where partitions, offsets and metadata live |
//! | `broker.cores` | 0 | shards (pinned executors); 0: one per CPU |
//! | `broker.preempt_timer_us` | 250 | the shards' time slice (I/O is submitted between slices) |
//! | `network.listen` | `127.0.0.1:9400` | client address (TCP) |
//! | `network.quic_listen` | unset | client address (QUIC over UDP); unset: no QUIC |
//! | `network.quic_cert_file`, `network.quic_key_file` | unset | QUIC certificate chain and key (PEM); unset: a self-signed development certificate written to the data directory |
//! | `network.quic_receive_window` | 16777216 | bytes a QUIC client may send on one connection ahead of what the broker read (quinn holds them in the broker's memory: connections × this at most); one stream gets at most half of it, and at most 8 MiB |
//! | `network.frame_bytes_max` | 67108864 | largest request frame |
//! | `network.connections_max` | 10000 | client connections, all shards together |
//! | `network.in_flight_max` | 64 | requests in flight per connection before reading stops |
//! | `network.request_memory_max` | 0 | memory the frames of requests in progress hold, all shards together (a connection whose next frame does not fit waits, unread); 0: a thirty-second of the memory, 32–128 MiB per shard |
//! | `network.idle_timeout_s` | 600 | idle connections are closed after this |
//! | `network.frame_timeout_ms` | 30000 | a started frame must be complete within this |
//! | `storage.fsync` | `never` | `always`, `never` or `interval:MS` |
//! | `storage.segment_bytes` | 1073741824 | default segment size of new topics |
//! | `storage.retention_hours` | 168 | default retention of new topics (0: forever) |
//! | `storage.retention_check_ms` | 60000 | how often retention runs |
//! | `storage.cache_bytes_max` | 0 | memory for all partitions' tail caches; 0: an eighth of the memory, 16–256 MiB per shard |
//! | `storage.cache_bytes` | 0 | the most one partition's tail cache holds; 0: no bound of its own |
//! | `storage.open_files_max` | 0 | segment files kept open; 0: from `RLIMIT_NOFILE` |
//! | `storage.preallocate_bytes_max` | 1073741824 | disk allocated ahead of data, all partitions |
//! | `storage.read_in_flight_bytes_max` | 4194304 | O_DIRECT reads of segment data in flight while segments are written, all shards (each at least 128 KiB; 0: no bound) |
//! | `storage.max_message_bytes` | 8388608 | default largest batch of new topics |
//! | `metrics.listen` | unset | `HOST:PORT` for `/metrics`, `/health`, `/ready` |
//! | `metrics.partition_series_max` | 1000 | per-partition series up to this many partitions (0: none) |
//! | `log.format` | `text` | `text` or `json` |
//! | `log.level` | `info` | a `tracing` filter (`RUST_LOG`, when set, wins) |
//! | `log.requests` | false | log every request at `info` (with `handle_micros`, the part before its response could wait) |

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skein_storage::FsyncPolicy;

use crate::config::BrokerConfig;

/// Everything `skein broker` can be told, by section.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub broker: BrokerSection,
    pub network: NetworkSection,
    pub storage: StorageSection,
    pub metrics: MetricsSection,
    pub log: LogSection,
}

/// The sections, as the environment names them.
pub const SECTIONS: [&str; 5] = ["broker", "network", "storage", "metrics", "log"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    pub node_id: u32,
    pub data_dir: PathBuf,
    /// 0: one shard per CPU.
    pub cores: usize,
    /// glommio time slice of the shards' work, microseconds (I/O is submitted between slices).
    pub preempt_timer_us: u64,
}

impl Default for BrokerSection {
    fn default() -> Self {
        BrokerSection { node_id: 0, data_dir: PathBuf::from("./skein-data"), cores: 0, preempt_timer_us: 250 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    pub listen: SocketAddr,
    pub quic_listen: Option<SocketAddr>,
    pub quic_cert_file: Option<PathBuf>,
    pub quic_key_file: Option<PathBuf>,
    pub quic_receive_window: u64,
    pub frame_bytes_max: usize,
    pub connections_max: usize,
    pub in_flight_max: usize,
    /// 0: sized from memory.
    pub request_memory_max: u64,
    pub idle_timeout_s: u64,
    pub frame_timeout_ms: u64,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
            quic_listen: None,
            quic_cert_file: None,
            quic_key_file: None,
            quic_receive_window: 16 << 20,
            frame_bytes_max: 64 << 20,
            connections_max: 10_000,
            in_flight_max: 64,
            request_memory_max: 0,
            idle_timeout_s: 600,
            frame_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// `always`, `never` or `interval:MS`.
    pub fsync: String,
    pub segment_bytes: u64,
    /// 0: keep forever.
    pub retention_hours: u64,
    pub retention_check_ms: u64,
    /// 0: no bound of its own (the broker's `cache_bytes_max` bounds it).
    pub cache_bytes: usize,
    /// 0: sized from memory.
    pub cache_bytes_max: u64,
    /// 0: derived from `RLIMIT_NOFILE`.
    pub open_files_max: usize,
    pub preallocate_bytes_max: u64,
    /// 0: no bound.
    pub read_in_flight_bytes_max: u64,
    /// Default largest batch of new topics (their `max.message.bytes`).
    pub max_message_bytes: u32,
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            fsync: "never".to_owned(),
            segment_bytes: 1 << 30,
            retention_hours: 168,
            retention_check_ms: 60_000,
            cache_bytes: 0,
            cache_bytes_max: 0,
            open_files_max: 0,
            preallocate_bytes_max: 1 << 30,
            read_in_flight_bytes_max: 4 << 20,
            max_message_bytes: 8 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Unset: no metrics endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    pub partition_series_max: usize,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection { listen: None, partition_series_max: 1000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub format: LogFormat,
    pub level: String,
    pub requests: bool,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { format: LogFormat::Text, level: "info".to_owned(), requests: false }
    }
}

/// Why the settings could not be read; the message names the file, variable or key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// One override: `section.key` and its value.
pub type Override = (String, toml::Value);

impl Settings {
    /// Defaults, then the file, then the environment, then the flags (each a `section.key`).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &[Override],
    ) -> Result<Settings, SettingsError> {
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| SettingsError::Read { path: path.to_owned(), source })?;
            let file_error = |message: String| SettingsError::File { path: path.to_owned(), message };
            // Parsed as settings first: the error names the line and the unknown key.
            toml::from_str::<Settings>(&text).map_err(|e| file_error(e.to_string()))?;
            let parsed: toml::Table = toml::from_str(&text).map_err(|e| file_error(e.to_string()))?;
            for (section, keys) in parsed {
                if let toml::Value::Table(keys) = keys {
                    for (key, value) in keys {
                        set(&mut table, &section, &key, value);
                    }
                }
            }
        }
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.sort();
        for (name, text) in env {
            let Some((section, key)) = env_key(&name) else { continue };
            let value = env_value(&section, &key, &text)
                .map_err(|message| SettingsError::Env { name: name.clone(), message })?;
            set(&mut table, &section, &key, value);
        }
        for (path, value) in flags {
            let (section, key) = path.split_once('.').expect("flags are section.key");
            set(&mut table, section, key, value.clone());
        }
        Settings::deserialize(toml::Value::Table(table))
            .map_err(|e| SettingsError::Invalid { key: "settings".to_owned(), message: e.to_string() })
    }

    /// The effective settings as a TOML file (what `--print-config` prints).
    pub fn to_toml(&self) -> String {
        let mut text = toml::to_string(self).expect("settings serialise");
        if self.metrics.listen.is_none() {
            text = text.replace(
                "[metrics]\n",
                "[metrics]\n# listen = \"127.0.0.1:9401\"  # unset: no /metrics, /health or /ready\n",
            );
        }
        text
    }

    /// The broker configuration these settings describe.
    pub fn to_broker_config(&self) -> Result<BrokerConfig, SettingsError> {
        let invalid = |key: &str, message: String| SettingsError::Invalid { key: key.to_owned(), message };
        let mut config = BrokerConfig::new(self.broker.data_dir.clone(), self.network.listen);
        if self.broker.cores > 0 {
            config.cores = self.broker.cores;
        }
        config.node_id = self.broker.node_id;
        config.fsync =
            self.storage.fsync.parse::<FsyncPolicy>().map_err(|e| invalid("storage.fsync", e.to_string()))?;
        if self.network.frame_bytes_max < 1024 {
            return Err(invalid("network.frame_bytes_max", "must be at least 1024".into()));
        }
        config.frame_bytes_max = self.network.frame_bytes_max;
        config.connections_max = self.network.connections_max.max(1);
        config.in_flight_max = self.network.in_flight_max.max(1);
        config.request_memory_max =
            (self.network.request_memory_max > 0).then_some(self.network.request_memory_max);
        config.idle_timeout = Duration::from_secs(self.network.idle_timeout_s.max(1));
        config.frame_timeout = Duration::from_millis(self.network.frame_timeout_ms.max(10));
        config.retention_check = Duration::from_millis(self.storage.retention_check_ms.max(10));
        if self.storage.segment_bytes < 4096 {
            return Err(invalid("storage.segment_bytes", "must be at least 4096".into()));
        }
        config.default_segment_bytes = self.storage.segment_bytes;
        config.default_retention = (self.storage.retention_hours > 0)
            .then(|| Duration::from_secs(self.storage.retention_hours * 3600));
        config.cache_bytes_per_partition =
            if self.storage.cache_bytes == 0 { usize::MAX } else { self.storage.cache_bytes };
        config.cache_bytes_max = (self.storage.cache_bytes_max > 0).then_some(self.storage.cache_bytes_max);
        config.open_files_max = (self.storage.open_files_max > 0).then_some(self.storage.open_files_max);
        config.preallocate_bytes_max = self.storage.preallocate_bytes_max;
        config.read_in_flight_bytes_max = self.storage.read_in_flight_bytes_max;
        if self.storage.max_message_bytes < 1024 {
            return Err(invalid("storage.max_message_bytes", "must be at least 1024".into()));
        }
        config.default_max_message_bytes = self.storage.max_message_bytes;
        if !(10..=100_000).contains(&self.broker.preempt_timer_us) {
            return Err(invalid("broker.preempt_timer_us", "must be within 10..=100000".into()));
        }
        config.preempt_timer = Duration::from_micros(self.broker.preempt_timer_us);
        config.metrics_listen = self.metrics.listen;
        config.quic_listen = self.network.quic_listen;
        config.quic_cert_file = self.network.quic_cert_file.clone();
        config.quic_key_file = self.network.quic_key_file.clone();
        if !(64 << 10..=1 << 30).contains(&self.network.quic_receive_window) {
            return Err(invalid("network.quic_receive_window", "must be within 65536..=1073741824".into()));
        }
        config.quic_receive_window = self.network.quic_receive_window;
        if config.quic_cert_file.is_some() != config.quic_key_file.is_some() {
            return Err(invalid(
                "network.quic_cert_file",
                "give both quic_cert_file and quic_key_file, or neither".into(),
            ));
        }
        config.partition_series_max = self.metrics.partition_series_max;
        config.log_requests = self.log.requests;
        Ok(config)
    }
}

fn set(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table.entry(section.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(keys) = entry {
        keys.insert(key.to_owned(), value);
    }
}

/// `SKEIN_NETWORK_FRAME_BYTES_MAX` → (`network`, `frame_bytes_max`), for known sections only.
fn env_key(name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix("SKEIN_")?.to_ascii_lowercase();
    let (section, key) = rest.split_once('_')?;
    SECTIONS.contains(&section).then(|| (section.to_owned(), key.to_owned()))
}

/// An environment value as TOML: typed when it parses as a value the key accepts, else a
/// string. Errors say what the key expects (or that it does not exist).
fn env_value(section: &str, key: &str, text: &str) -> Result<toml::Value, String> {
    let check = |value: &toml::Value| {
        let mut table = toml::Table::new();
        set(&mut table, section, key, value.clone());
        Settings::deserialize(toml::Value::Table(table)).map(|_| ()).map_err(|e| e.to_string())
    };
    let string = toml::Value::String(text.to_owned());
    let typed = toml::from_str::<toml::Table>(&format!("v = {text}")).ok().and_then(|mut t| t.remove("v"));
    match typed {
        Some(value) => match check(&value) {
            Ok(()) => Ok(value),
            Err(typed_error) => check(&string).map(|()| string).map_err(|_| typed_error),
        },
        None => check(&string).map(|()| string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn defaults_match_the_broker_defaults() {
        let config = Settings::default().to_broker_config().unwrap();
        let defaults = BrokerConfig::new(PathBuf::from("./skein-data"), "127.0.0.1:9400".parse().unwrap());
        assert_eq!(config.frame_bytes_max, defaults.frame_bytes_max);
        assert_eq!(config.default_segment_bytes, defaults.default_segment_bytes);
        assert_eq!(config.default_retention, defaults.default_retention);
        assert_eq!(config.cache_bytes_per_partition, defaults.cache_bytes_per_partition);
        assert_eq!(config.idle_timeout, defaults.idle_timeout);
        assert_eq!(config.frame_timeout, defaults.frame_timeout);
        assert_eq!(config.cores, defaults.cores);
        assert_eq!(config.preempt_timer, defaults.preempt_timer);
        assert_eq!(config.default_max_message_bytes, defaults.default_max_message_bytes);
        assert_eq!(config.metrics_listen, None);
    }

    #[test]
    fn flags_beat_environment_beats_file_beats_defaults() {
        let f = file(
            "[storage]\nfsync = \"always\"\ncache_bytes = 1000\nsegment_bytes = 8192\n[broker]\ncores = 3\n",
        );
        let settings = Settings::load(
            Some(f.path()),
            env(&[
                ("SKEIN_STORAGE_CACHE_BYTES", "2000"),
                ("SKEIN_BROKER_CORES", "5"),
                ("SKEIN_BOOTSTRAP", "x:1"),
            ]),
            &[("broker.cores".to_owned(), toml::Value::Integer(7))],
        )
        .unwrap();
        assert_eq!(settings.storage.fsync, "always", "from the file");
        assert_eq!(settings.storage.segment_bytes, 8192, "from the file");
        assert_eq!(settings.storage.cache_bytes, 2000, "the environment beats the file");
        assert_eq!(settings.broker.cores, 7, "the flag beats both");
        assert_eq!(settings.network.in_flight_max, 64, "the default");
        let config = settings.to_broker_config().unwrap();
        assert!(config.fsync.is_always());
        assert_eq!(config.cores, 7);
    }

    #[test]
    fn environment_strings_and_typed_values() {
        let settings = Settings::load(
            None,
            env(&[
                ("SKEIN_NETWORK_LISTEN", "0.0.0.0:9500"),
                ("SKEIN_METRICS_LISTEN", "127.0.0.1:9501"),
                ("SKEIN_LOG_FORMAT", "json"),
                ("SKEIN_LOG_REQUESTS", "true"),
                ("SKEIN_LOG_LEVEL", "123"),
                ("SKEIN_BROKER_DATA_DIR", "/srv/skein"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(settings.network.listen, "0.0.0.0:9500".parse::<SocketAddr>().unwrap());
        assert_eq!(settings.metrics.listen, Some("127.0.0.1:9501".parse().unwrap()));
        assert_eq!(settings.log.format, LogFormat::Json);
        assert!(settings.log.requests);
        assert_eq!(settings.log.level, "123", "a number is a string where the key wants one");
        assert_eq!(settings.broker.data_dir, PathBuf::from("/srv/skein"));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let f = file("[network]\nlisten = \"127.0.0.1:1\"\nlisten_backlog = 5\n");
        let error = Settings::load(Some(f.path()), Vec::new(), &[]).unwrap_err().to_string();
        assert!(error.contains("listen_backlog"), "{error}");
        let f = file("[netwrok]\nlisten = \"127.0.0.1:1\"\n");
        let error = Settings::load(Some(f.path()), Vec::new(), &[]).unwrap_err().to_string();
        assert!(error.contains("netwrok"), "{error}");
        let error =
            Settings::load(None, env(&[("SKEIN_STORAGE_FSYNCH", "always")]), &[]).unwrap_err().to_string();
        assert!(error.contains("SKEIN_STORAGE_FSYNCH") && error.contains("fsynch"), "{error}");
        let error =
            Settings::load(None, env(&[("SKEIN_BROKER_CORES", "many")]), &[]).unwrap_err().to_string();
        assert!(error.contains("SKEIN_BROKER_CORES"), "{error}");
        let settings = Settings::load(None, env(&[("SKEIN_STORAGE_FSYNC", "sometimes")]), &[]).unwrap();
        let error = settings.to_broker_config().unwrap_err().to_string();
        assert!(error.contains("storage.fsync"), "{error}");
        let settings =
            Settings::load(None, env(&[("SKEIN_NETWORK_QUIC_RECEIVE_WINDOW", "100")]), &[]).unwrap();
        let error = settings.to_broker_config().unwrap_err().to_string();
        assert!(error.contains("network.quic_receive_window"), "{error}");
    }

    #[test]
    fn memory_bounds_reach_the_broker_config() {
        let settings = Settings::load(
            None,
            env(&[
                ("SKEIN_NETWORK_REQUEST_MEMORY_MAX", "33554432"),
                ("SKEIN_NETWORK_QUIC_RECEIVE_WINDOW", "1048576"),
            ]),
            &[],
        )
        .unwrap();
        let config = settings.to_broker_config().unwrap();
        assert_eq!(config.request_memory_max, Some(32 << 20));
        assert_eq!(config.quic_receive_window, 1 << 20);
        let defaults = Settings::default().to_broker_config().unwrap();
        assert_eq!(defaults.request_memory_max, None, "0: sized from memory");
        assert_eq!(defaults.quic_receive_window, 16 << 20);
        // Sized from memory: a thirty-second, 32..=128 MiB per shard.
        let mut config = defaults;
        config.cores = 2;
        let budget = |memory| crate::preflight::request_memory_budget(&config, memory);
        assert_eq!(budget(1 << 30), 64 << 20, "a small machine: the floor per shard");
        assert_eq!(budget(4 << 30), 128 << 20);
        assert_eq!(budget(64 << 30), 256 << 20, "a large machine: the ceiling per shard");
    }

    #[test]
    fn printed_settings_read_back_the_same() {
        let mut settings = Settings::default();
        settings.storage.fsync = "interval:50".into();
        settings.log.format = LogFormat::Json;
        let printed = settings.to_toml();
        assert!(printed.contains("# listen ="), "{printed}");
        let f = file(&printed);
        assert_eq!(Settings::load(Some(f.path()), Vec::new(), &[]).unwrap(), settings);
        settings.metrics.listen = Some("127.0.0.1:9401".parse().unwrap());
        let f = file(&settings.to_toml());
        assert_eq!(Settings::load(Some(f.path()), Vec::new(), &[]).unwrap(), settings);
    }
}
