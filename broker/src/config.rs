//! Broker settings (the `skein broker` flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use skein_storage::{FsyncPolicy, LogConfig};

/// Everything a broker needs to start. Shared read-only by every shard.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Number of shards (one glommio executor each, pinned to CPUs `0..cores`).
    pub cores: usize,
    pub fsync: FsyncPolicy,
    pub node_id: u32,
    /// Largest request frame accepted.
    pub frame_bytes_max: usize,
    /// Connections accepted by the whole broker (split evenly across shards).
    pub connections_max: usize,
    /// Requests a connection may have in flight before the broker stops reading from it.
    pub in_flight_max: usize,
    /// A started frame must be complete within this time (slow-loris protection).
    pub frame_timeout: Duration,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// How often each shard applies retention to its partitions.
    pub retention_check: Duration,
    /// Defaults for new topics (the topic's own settings override them).
    pub default_segment_bytes: u64,
    pub default_retention: Option<Duration>,
    pub default_max_message_bytes: u32,
    /// The most one partition's tail cache holds (`usize::MAX`: bounded by the shard's only).
    pub cache_bytes_per_partition: usize,
    /// Memory all tail caches of the broker hold at most, split evenly across shards; over it
    /// a shard evicts its oldest cached batch first, whichever partition holds it. `None`: an
    /// eighth of the memory, 16 MiB..=256 MiB per shard (see
    /// [`crate::preflight::tail_cache_budget`]).
    pub cache_bytes_max: Option<u64>,
    /// Memory the frames of requests in progress hold at most, all shards together (split
    /// evenly); a connection whose next frame does not fit waits, unread (see
    /// [`crate::request_memory`]). `None`: a thirty-second of the memory, 32 MiB..=128 MiB per
    /// shard (see [`crate::preflight::request_memory_budget`]).
    pub request_memory_max: Option<u64>,
    /// glommio time slice: I/O is submitted and reaped between slices.
    pub preempt_timer: Duration,
    /// Segment files the whole broker keeps open at most (split evenly across shards; idle
    /// ones are closed and reopened on demand). `None`: derived from `RLIMIT_NOFILE` at start
    /// (see [`crate::preflight::open_files_budget`]).
    pub open_files_max: Option<usize>,
    /// Disk space the whole broker may have allocated ahead of its partitions' data (split
    /// evenly across shards).
    pub preallocate_bytes_max: u64,
    /// O_DIRECT reads of segment data (cold fetches, read-ahead) the whole broker keeps in
    /// flight at most, in bytes (split evenly across shards, at least 128 KiB each; 0: no
    /// bound). Reads queued in the device delay the writes behind them (see
    /// `skein_storage::handles`).
    pub read_in_flight_bytes_max: u64,
    /// Where QUIC clients connect (UDP; `None`: no QUIC).
    pub quic_listen: Option<SocketAddr>,
    /// The QUIC certificate chain and private key (PEM). Neither: a self-signed development
    /// certificate, written to the data directory.
    pub quic_cert_file: Option<PathBuf>,
    pub quic_key_file: Option<PathBuf>,
    /// The QUIC flow-control window of a connection: bytes a client may send ahead of what the
    /// broker read, which quinn holds in the broker's memory (so connections × this at most,
    /// beside the request memory). One stream gets at most half of it, and at most 8 MiB.
    pub quic_receive_window: u64,
    /// Where `/metrics`, `/health` and `/ready` are served (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// Per-partition metric series only while the broker holds at most this many partitions
    /// (0: never).
    pub partition_series_max: usize,
    /// Log every request (API, correlation id, size, time to respond) at `info`.
    pub log_requests: bool,
}

impl BrokerConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> BrokerConfig {
        BrokerConfig {
            data_dir,
            listen,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            fsync: FsyncPolicy::Never,
            node_id: 0,
            frame_bytes_max: 64 << 20,
            connections_max: 10_000,
            in_flight_max: 64,
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            retention_check: Duration::from_secs(60),
            default_segment_bytes: 1 << 30,
            default_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            default_max_message_bytes: 8 << 20,
            cache_bytes_per_partition: usize::MAX,
            cache_bytes_max: None,
            request_memory_max: None,
            preempt_timer: Duration::from_micros(250),
            open_files_max: None,
            preallocate_bytes_max: 1 << 30,
            read_in_flight_bytes_max: 4 << 20,
            quic_listen: None,
            quic_cert_file: None,
            quic_key_file: None,
            quic_receive_window: 16 << 20,
            metrics_listen: None,
            partition_series_max: 1000,
            log_requests: false,
        }
    }

    /// The storage settings of one partition of a topic.
    pub fn log_config(&self, topic: &crate::metadata::TopicConfig) -> LogConfig {
        let defaults = LogConfig::default();
        LogConfig {
            segment_bytes: topic.segment_bytes,
            segment_age_max: topic.segment_ms.map(Duration::from_millis),
            fsync: self.fsync,
            retention_age_max: topic.retention_ms.map(Duration::from_millis),
            retention_bytes_max: topic.retention_bytes,
            cache_bytes_max: self.cache_bytes_per_partition,
            batch_bytes_max: topic.max_message_bytes as usize,
            preallocate_bytes: defaults.preallocate_bytes.min(topic.segment_bytes / 4 / 4096 * 4096),
            ..defaults
        }
    }
}

/// The client connections of the whole broker against `connections_max`, TCP and QUIC
/// together, whichever shard accepted them. A shared count (one atomic add at accept and one
/// subtract at close, never on a request's path): a limit split evenly between shards would
/// refuse a connection while the broker is under its limit whenever the kernel's
/// `SO_REUSEPORT` hash lands more connections on one shard than on another.
#[derive(Debug)]
pub struct ConnectionSlots {
    open: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl ConnectionSlots {
    pub fn new(max: usize) -> std::sync::Arc<ConnectionSlots> {
        std::sync::Arc::new(ConnectionSlots { open: std::sync::atomic::AtomicUsize::new(0), max: max.max(1) })
    }

    /// A slot for one more connection, or `None` at the limit. The slot is given back when
    /// dropped.
    pub fn take(self: &std::sync::Arc<Self>) -> Option<ConnectionSlot> {
        use std::sync::atomic::Ordering;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < self.max).then_some(open + 1))
            .ok()
            .map(|_| ConnectionSlot(self.clone()))
    }

    /// Connections open now, all shards together.
    pub fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// One admitted connection's place under `connections_max`.
#[derive(Debug)]
pub struct ConnectionSlot(std::sync::Arc<ConnectionSlots>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod connection_slots_tests {
    use super::ConnectionSlots;

    #[test]
    fn slots_stop_at_the_limit_and_come_back_when_dropped() {
        let slots = ConnectionSlots::new(2);
        let first = slots.take().expect("first");
        let second = slots.take().expect("second");
        assert!(slots.take().is_none(), "a third is over the limit");
        assert_eq!(slots.open(), 2);
        drop(first);
        assert_eq!(slots.open(), 1);
        let third = slots.take().expect("a slot given back is taken again");
        assert!(slots.take().is_none());
        drop((second, third));
        assert_eq!(slots.open(), 0);
    }

    #[test]
    fn slots_are_shared_between_threads() {
        let slots = ConnectionSlots::new(1000);
        let taken: Vec<_> = (0..4)
            .map(|_| {
                let slots = slots.clone();
                std::thread::spawn(move || (0..400).filter_map(|_| slots.take()).collect::<Vec<_>>())
            })
            .collect();
        let taken: Vec<_> = taken.into_iter().flat_map(|t| t.join().unwrap()).collect();
        assert_eq!(taken.len(), 1000, "exactly the limit, across threads");
        assert_eq!(slots.open(), 1000);
        drop(taken);
        assert_eq!(slots.open(), 0);
    }
}
