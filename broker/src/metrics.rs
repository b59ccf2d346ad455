//! Prometheus metrics, `/health` and `/ready` (`--metrics-listen HOST:PORT`).
//!
//! # Gathered per shard, merged on scrape
//! Each shard counts what it does in its own [`ShardMetrics`] (plain `Cell`s: no atomics, no
//! locks on the produce or fetch path); its logs count theirs in `skein_storage::metrics`
//! (also per shard). Nothing is shared until a scrape: the HTTP thread (`skein-metrics`, not a
//! data core) bumps [`MetricsHub`]'s scrape number; every shard notices within 10 ms, takes a
//! [`ShardSnapshot`] of its counters, partitions and consumer groups, and sends it over a
//! channel; the HTTP thread waits up to [`SCRAPE_WAIT`] for all of them, merges them and
//! encodes the result with `prometheus-client` (OpenMetrics text). A shard that does not answer
//! in time is reported with its previous snapshot and counted in `skein_metrics_stale_shards`.
//!
//! # Endpoints
//! * `/metrics`: the metrics below.
//! * `/health`: 200 while the process runs (it answers during recovery too).
//! * `/ready`: 200 once every shard recovered its partitions and listens; 503 before, and from
//!   the moment the broker starts stopping.
//!
//! # Metrics
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `skein_build_info` | gauge | version, commit | always 1 |
//! | `skein_ready` | gauge | | 1 when `/ready` is 200 |
//! | `skein_requests_total` | counter | api | requests received |
//! | `skein_request_errors_total` | counter | api | requests refused, and partitions answered with an error |
//! | `skein_request_bytes_total`, `skein_response_bytes_total` | counter | | frame bytes in and out |
//! | `skein_produced_records_total`, `skein_produced_bytes_total` | counter | | records and batch bytes appended |
//! | `skein_fetched_bytes_total` | counter | | record bytes sent to consumers |
//! | `skein_forwarded_partitions_total` | counter | api = `produce` or `fetch` | partitions of produce requests, and partition reads of fetches (each pass of a long poll), that the connection's shard sent on to the shard holding them: a hop between cores (a QUIC producer of the Rust client takes none) |
//! | `skein_produce_latency_seconds`, `skein_fetch_latency_seconds` | histogram | | request received to response ready (a fetch includes its long-poll wait) |
//! | `skein_connections` | gauge | | open client connections |
//! | `skein_connections_accepted_total`, `skein_connections_refused_total` | counter | | (refused: over `connections_max`) |
//! | `skein_open_files`, `skein_open_files_max` | gauge | | segment files held open, and the budget |
//! | `skein_tail_cache_bytes`, `skein_tail_cache_bytes_max` | gauge | | memory held by the partitions' tail caches, and the bound |
//! | `skein_tail_cache_evictions_total` | counter | | cached batches evicted for the bound (oldest first, whichever partition) |
//! | `skein_read_ahead_bytes`, `skein_read_ahead_bytes_max` | gauge | | memory read ahead of consumers that read segment files (a stream per place a partition is read at, dropped after 2 s unread), and the bound |
//! | `skein_request_memory_bytes`, `skein_request_memory_bytes_max` | gauge | | memory held by the frames of requests in progress (those longer than a read chunk, 16 KiB), and the bound (`network.request_memory_max`) |
//! | `skein_request_memory_waits_total` | counter | | frames whose connection waited, unread, for request memory |
//! | `skein_fetch_memory_bytes` | gauge | | bytes read from disk into fetch responses not yet sent (bounded by the request memory's size per shard) |
//! | `skein_fetch_memory_fallbacks_total` | counter | | cold file ranges sent from the page cache (`sendfile`) because that bound was reached |
//! | `skein_segment_rolls_total` | counter | | active segments sealed |
//! | `skein_fsync_latency_seconds` | histogram | | `fdatasync` of data segments |
//! | `skein_write_latency_seconds` | histogram | | O_DIRECT writes of data segments, handed to the ring to completion seen (with `fsync never` a produce is acknowledged after its writes: their tail is its tail) |
//! | `skein_log_reads_total` | counter | source = `tail_cache` or `file` | reads by where they were answered from |
//! | `skein_cache_hit_ratio` | gauge | | tail-cache reads / all reads (0 before any read) |
//! | `skein_direct_read_bytes_total` | counter | | bytes read with O_DIRECT (cold reads, read-ahead) |
//! | `skein_read_in_flight_waits_total` | counter | | cold reads that waited for room in `storage.read_in_flight_bytes_max` while segments were being written |
//! | `skein_recovery_scanned_bytes_total` | counter | | bytes of segment files scanned batch by batch to recover a tail or rebuild an index (after a clean stop, only what a tail's index did not cover; after a crash, every tail; a sealed segment whose index is missing, at start or on its first read) |
//! | `skein_reactor_stalls_total` | counter | shard | a 10 ms timer that fired over 25 ms late |
//! | `skein_reactor_lag_max_seconds` | gauge | shard | the latest timer's worst lateness since start |
//! | `skein_shard_partitions` | gauge | shard | partitions owned |
//! | `skein_topic_partitions`, `skein_topic_bytes` | gauge | topic | per topic, always |
//! | `skein_partition_log_start_offset`, `skein_partition_log_end_offset`, `skein_partition_bytes` | gauge | topic, partition | only while the broker holds at most `partition_series_max` partitions (bounded cardinality; 0 turns them off) |
//! | `skein_consumer_group_members` | gauge | group | members |
//! | `skein_consumer_group_lag` | gauge | group | sum over its committed partitions of log end − committed offset |
//! | `skein_metrics_stale_shards` | gauge | | shards that missed this scrape |

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use skein_net::ApiKey;
use skein_storage::metrics::{Histogram, StorageCounters};

use crate::shard::Shard;

/// Request counters per API key, plus one slot for keys this build does not know.
const API_SLOTS: usize = ApiKey::ALL.len() + 1;

/// How long a scrape waits for the shards' snapshots.
pub const SCRAPE_WAIT: Duration = Duration::from_secs(1);

/// A timer that fires this much later than asked counts as a reactor stall.
pub const STALL_THRESHOLD: Duration = Duration::from_millis(25);

fn api_slot(api_key: u16) -> usize {
    (api_key as usize).min(API_SLOTS - 1)
}

/// An API's name as metrics and request logs give it (`Produce`; `Unknown` for keys this build
/// does not know).
pub fn api_name(api_key: u16) -> String {
    ApiKey::from_u16(api_key).map_or_else(|| "Unknown".to_owned(), |api| format!("{api:?}"))
}

/// One shard's counters, written only by that shard.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    requests: [Cell<u64>; API_SLOTS],
    errors: [Cell<u64>; API_SLOTS],
    request_bytes: Cell<u64>,
    response_bytes: Cell<u64>,
    produced_records: Cell<u64>,
    produced_bytes: Cell<u64>,
    fetched_bytes: Cell<u64>,
    /// Partitions of produce and fetch requests this shard sent on to the shard holding them.
    forwarded_produce: Cell<u64>,
    forwarded_fetch: Cell<u64>,
    produce_latency: RefCell<Histogram>,
    fetch_latency: RefCell<Histogram>,
    pub connections_accepted: Cell<u64>,
    pub connections_refused: Cell<u64>,
    /// Cold file ranges of fetches sent from the page cache because the shard's fetch memory
    /// was taken.
    fetch_memory_fallbacks: Cell<u64>,
}

fn add(cell: &Cell<u64>, n: u64) {
    cell.set(cell.get().wrapping_add(n));
}

impl ShardMetrics {
    /// A cold range of a fetch goes out from the page cache: the fetch memory was taken.
    pub fn fetch_memory_fallback(&self) {
        add(&self.fetch_memory_fallbacks, 1);
    }

    /// A request frame arrived.
    pub fn request(&self, api_key: u16, frame_bytes: usize) {
        add(&self.requests[api_slot(api_key)], 1);
        add(&self.request_bytes, frame_bytes as u64);
    }

    /// A request was refused, or `count` partitions (topics) of it answered with an error.
    pub fn errors(&self, api_key: u16, count: usize) {
        add(&self.errors[api_slot(api_key)], count as u64);
    }

    /// A response is ready `elapsed` after its request arrived.
    pub fn responded(&self, api_key: u16, elapsed: Duration) {
        if api_key == ApiKey::Produce as u16 {
            self.produce_latency.borrow_mut().observe(elapsed);
        } else if api_key == ApiKey::Fetch as u16 {
            self.fetch_latency.borrow_mut().observe(elapsed);
        }
    }

    pub fn response_bytes(&self, bytes: usize) {
        add(&self.response_bytes, bytes as u64);
    }

    /// A batch was appended on this shard.
    pub fn produced(&self, records: u32, bytes: usize) {
        add(&self.produced_records, u64::from(records));
        add(&self.produced_bytes, bytes as u64);
    }

    pub fn fetched(&self, bytes: usize) {
        add(&self.fetched_bytes, bytes as u64);
    }

    /// A partition of a produce request, or a partition read of a fetch, went to another shard.
    pub fn forwarded(&self, api: ApiKey) {
        add(if api == ApiKey::Produce { &self.forwarded_produce } else { &self.forwarded_fetch }, 1);
    }
}

thread_local! {
    /// (stalls, worst lateness) of this shard's reactor, from its wake-up timer.
    static REACTOR: Cell<(u64, Duration)> = const { Cell::new((0, Duration::ZERO)) };
}

/// Notes how late this shard's wake-up timer fired (see `server::keep_awake`).
pub fn note_timer_lateness(late: Duration) {
    let _ = REACTOR.try_with(|reactor| {
        let (stalls, worst) = reactor.get();
        reactor.set((stalls + u64::from(late >= STALL_THRESHOLD), worst.max(late)));
    });
    IN_PROCESS_LAG.note(late);
}

/// The worst lateness of any shard's wake-up timer in this process since the last take.
static IN_PROCESS_LAG: skein_storage::metrics::MaxSince = skein_storage::metrics::MaxSince::new();

/// How late, at worst, the wake-up timers of the shards running in this process fired since
/// the last call (`None` if none ticked since: no broker runs in this process). For a load
/// generator with an embedded broker: a latency stall that shows here was the broker's
/// executors not running (a long task, a blocking call, the thread descheduled).
pub fn take_in_process_reactor_lag() -> Option<Duration> {
    IN_PROCESS_LAG.take()
}

/// One partition as a scrape sees it.
#[derive(Debug, Clone)]
pub struct PartitionStats {
    pub topic: String,
    pub partition: u32,
    pub start_offset: u64,
    pub end_offset: u64,
    pub bytes: u64,
}

/// One consumer group as a scrape sees it (on its coordinator shard).
#[derive(Debug, Clone)]
pub struct GroupStats {
    pub group: String,
    pub members: usize,
    /// (topic, partition, committed offset).
    pub committed: Vec<(String, u32, u64)>,
}

/// Everything one shard reports to a scrape.
#[derive(Debug, Clone, Default)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub requests: [u64; API_SLOTS],
    pub errors: [u64; API_SLOTS],
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub produced_records: u64,
    pub produced_bytes: u64,
    pub fetched_bytes: u64,
    pub forwarded_produce: u64,
    pub forwarded_fetch: u64,
    pub produce_latency: Histogram,
    pub fetch_latency: Histogram,
    pub connections: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub open_files: u64,
    pub open_files_max: u64,
    pub cache_bytes: u64,
    pub cache_bytes_max: u64,
    pub cache_evictions: u64,
    pub read_ahead_bytes: u64,
    pub read_ahead_bytes_max: u64,
    pub request_memory_bytes: u64,
    pub request_memory_bytes_max: u64,
    pub request_memory_waits: u64,
    pub fetch_memory_bytes: u64,
    pub fetch_memory_fallbacks: u64,
    pub storage: StorageCounters,
    pub reactor_stalls: u64,
    pub reactor_lag_max: Duration,
    pub partitions: Vec<PartitionStats>,
    pub groups: Vec<GroupStats>,
}

impl ShardSnapshot {
    /// Takes the snapshot on the shard itself.
    pub fn take(shard: &Shard) -> ShardSnapshot {
        let metrics = &shard.metrics;
        let handles = skein_storage::handles::stats();
        let (reactor_stalls, reactor_lag_max) = REACTOR.try_with(Cell::get).unwrap_or_default();
        let partitions = shard
            .all_partitions()
            .into_iter()
            .map(|(topic, partition, owned)| PartitionStats {
                topic,
                partition,
                start_offset: owned.log.start_offset(),
                end_offset: owned.log.next_offset(),
                bytes: owned.log.size_bytes(),
            })
            .collect();
        let groups = shard
            .coordinator
            .borrow()
            .groups
            .values()
            .map(|group| GroupStats {
                group: group.id.clone(),
                members: group.members.len(),
                committed: group
                    .offsets
                    .iter()
                    .map(|(tp, committed)| (tp.topic().to_owned(), tp.partition, committed.offset))
                    .collect(),
            })
            .collect();
        ShardSnapshot {
            shard: shard.id,
            requests: std::array::from_fn(|i| metrics.requests[i].get()),
            errors: std::array::from_fn(|i| metrics.errors[i].get()),
            request_bytes: metrics.request_bytes.get(),
            response_bytes: metrics.response_bytes.get(),
            produced_records: metrics.produced_records.get(),
            produced_bytes: metrics.produced_bytes.get(),
            fetched_bytes: metrics.fetched_bytes.get(),
            forwarded_produce: metrics.forwarded_produce.get(),
            forwarded_fetch: metrics.forwarded_fetch.get(),
            produce_latency: *metrics.produce_latency.borrow(),
            fetch_latency: *metrics.fetch_latency.borrow(),
            connections: shard.connections.get() as u64,
            connections_accepted: metrics.connections_accepted.get(),
            connections_refused: metrics.connections_refused.get(),
            open_files: handles.open_files as u64,
            open_files_max: handles.open_files_max.unwrap_or(0) as u64,
            cache_bytes: handles.cache_bytes as u64,
            cache_bytes_max: handles.cache_bytes_max.unwrap_or(0) as u64,
            cache_evictions: handles.cache_evictions,
            read_ahead_bytes: handles.read_ahead_bytes as u64,
            read_ahead_bytes_max: handles.read_ahead_bytes_max as u64,
            request_memory_bytes: shard.request_memory.in_use() as u64,
            request_memory_bytes_max: shard.request_memory.capacity() as u64,
            request_memory_waits: shard.request_memory.waits(),
            fetch_memory_bytes: shard.fetch_memory.load(Ordering::Relaxed) as u64,
            fetch_memory_fallbacks: metrics.fetch_memory_fallbacks.get(),
            storage: skein_storage::metrics::snapshot(),
            reactor_stalls,
            reactor_lag_max,
            partitions,
            groups,
        }
    }
}

/// What the shards and the HTTP thread share: the scrape number, the channel the snapshots
/// come back on, and readiness.
#[derive(Debug)]
pub struct MetricsHub {
    shards: usize,
    /// Bumped by each scrape; a shard answers every number it has not answered yet.
    wanted: AtomicU64,
    replies: mpsc::Sender<(u64, Box<ShardSnapshot>)>,
    ready: AtomicBool,
    recovered: AtomicUsize,
    /// Per-partition series only while the broker holds at most this many partitions.
    partition_series_max: usize,
}

impl MetricsHub {
    pub fn new(
        shards: usize,
        partition_series_max: usize,
    ) -> (Arc<MetricsHub>, mpsc::Receiver<(u64, Box<ShardSnapshot>)>) {
        let (replies, receiver) = mpsc::channel();
        let hub = MetricsHub {
            shards,
            wanted: AtomicU64::new(0),
            replies,
            ready: AtomicBool::new(false),
            recovered: AtomicUsize::new(0),
            partition_series_max,
        };
        (Arc::new(hub), receiver)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// A shard finished recovering (for `/ready`'s explanation while not ready).
    pub fn shard_recovered(&self) {
        self.recovered.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs on every shard while metrics are on: answers each scrape with a snapshot.
pub async fn answer_scrapes(shard: Rc<Shard>, hub: Arc<MetricsHub>) {
    let mut answered = 0;
    loop {
        glommio::timer::sleep(Duration::from_millis(10)).await;
        if shard.shutting_down.get() {
            return;
        }
        let wanted = hub.wanted.load(Ordering::SeqCst);
        if wanted > answered {
            answered = wanted;
            if hub.replies.send((wanted, Box::new(ShardSnapshot::take(&shard)))).is_err() {
                return;
            }
        }
    }
}

/// The HTTP side: serves `/metrics`, `/health` and `/ready` on `listener` until `stop`.
pub struct MetricsServer {
    hub: Arc<MetricsHub>,
    replies: mpsc::Receiver<(u64, Box<ShardSnapshot>)>,
    /// The latest snapshot of each shard (a shard that misses a scrape is reported with it).
    latest: BTreeMap<usize, ShardSnapshot>,
}

impl MetricsServer {
    pub fn new(hub: Arc<MetricsHub>, replies: mpsc::Receiver<(u64, Box<ShardSnapshot>)>) -> MetricsServer {
        MetricsServer { hub, replies, latest: BTreeMap::new() }
    }

    /// Serves connections one at a time (a scrape is small and rare) until `stop` is set.
    pub fn run(mut self, listener: TcpListener, stop: Arc<AtomicBool>) {
        if let Err(error) = listener.set_nonblocking(true) {
            tracing::error!(%error, "metrics listener: cannot make it non-blocking; metrics are off");
            return;
        }
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(error) = self.serve(stream) {
                        tracing::debug!(%error, "metrics connection");
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics listener: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn serve(&mut self, mut stream: TcpStream) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let request = read_request_head(&mut stream)?;
        let (status, content_type, body) = match parse_request_line(&request) {
            Some(("GET", path)) => match path.split('?').next().unwrap_or("") {
                "/metrics" => {
                    ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", self.scrape())
                }
                "/health" => ("200 OK", "text/plain", "ok\n".to_owned()),
                "/ready" => {
                    if self.hub.is_ready() {
                        ("200 OK", "text/plain", "ready\n".to_owned())
                    } else {
                        let recovered = self.hub.recovered.load(Ordering::SeqCst).min(self.hub.shards);
                        let body =
                            format!("not ready: {recovered} of {} shards recovered\n", self.hub.shards);
                        ("503 Service Unavailable", "text/plain", body)
                    }
                }
                _ => {
                    ("404 Not Found", "text/plain", "not found: try /metrics, /health or /ready\n".to_owned())
                }
            },
            Some(_) => ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned()),
            None => ("400 Bad Request", "text/plain", "bad request\n".to_owned()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        stream.flush()
    }

    /// Asks every shard for a snapshot, waits for them (at most [`SCRAPE_WAIT`]), encodes.
    fn scrape(&mut self) -> String {
        let number = self.hub.wanted.fetch_add(1, Ordering::SeqCst) + 1;
        let deadline = Instant::now() + SCRAPE_WAIT;
        let mut fresh = std::collections::BTreeSet::new();
        while fresh.len() < self.hub.shards {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok((answered, snapshot)) => {
                    if answered == number {
                        fresh.insert(snapshot.shard);
                    }
                    self.latest.insert(snapshot.shard, *snapshot);
                }
                Err(_) => break,
            }
        }
        let stale = self.hub.shards - fresh.len();
        let snapshots: Vec<ShardSnapshot> = self.latest.values().cloned().collect();
        encode(&snapshots, stale, self.hub.is_ready(), self.hub.partition_series_max)
    }
}

/// The HTTP thread, stopped and joined when dropped.
#[derive(Debug)]
pub struct MetricsThread {
    pub addr: SocketAddr,
    pub hub: Arc<MetricsHub>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl MetricsThread {
    /// Binds `listen` and serves it on a thread of its own; `shards` will answer scrapes.
    pub fn start(
        listen: SocketAddr,
        shards: usize,
        partition_series_max: usize,
    ) -> std::io::Result<MetricsThread> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let (hub, replies) = MetricsHub::new(shards, partition_series_max);
        let stop = Arc::new(AtomicBool::new(false));
        let server = MetricsServer::new(hub.clone(), replies);
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name("skein-metrics".into())
            .spawn(move || server.run(listener, stopped))?;
        Ok(MetricsThread { addr, hub, stop, handle: Some(handle) })
    }
}

impl Drop for MetricsThread {
    fn drop(&mut self) {
        self.hub.set_ready(false);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Reads up to the end of the request head (a GET has no body); at most 16 KiB.
fn read_request_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
        if head.len() > 16 << 10 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let mut parts = head.lines().next()?.split_whitespace();
    let (method, path, version) = (parts.next()?, parts.next()?, parts.next()?);
    version.starts_with("HTTP/1.").then_some((method, path))
}

/// Encodes merged snapshots as OpenMetrics text with `prometheus-client`.
pub fn encode(snapshots: &[ShardSnapshot], stale: usize, ready: bool, partition_series_max: usize) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Merged {
        snapshots: snapshots.to_vec(),
        stale,
        ready,
        partition_series_max,
    }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String");
    text
}

/// The merged view a scrape encodes.
#[derive(Debug)]
struct Merged {
    snapshots: Vec<ShardSnapshot>,
    stale: usize,
    ready: bool,
    partition_series_max: usize,
}

/// A histogram already bucketed (shards' histograms summed).
#[derive(Debug)]
struct Buckets(Histogram);

impl EncodeMetric for Buckets {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // prometheus-client writes the bucket bounded by `f64::MAX` as `+Inf`.
        let bounds =
            skein_storage::metrics::LATENCY_BUCKETS_S.iter().copied().chain(std::iter::once(f64::MAX));
        let buckets: Vec<(f64, u64)> = bounds.zip(self.0.buckets.iter().copied()).collect();
        encoder.encode_histogram::<NoLabelSet>(self.0.sum_seconds, self.0.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: its descriptor, then a sample per label set.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(&labels)?;
        write_value(sample, kind, value)?;
    }
    Ok(())
}

fn write_value(mut sample: MetricEncoder, kind: MetricType, value: f64) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&(value as u64), None),
        // Whole numbers (offsets, bytes, counts) print as integers.
        _ if value.fract() == 0.0 && value.abs() < 9.0e15 => sample.encode_gauge(&(value as i64)),
        _ => sample.encode_gauge(&value),
    }
}

/// One sample without labels.
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, kind)?;
    write_value(metric, kind, value)
}

impl Collector for Merged {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let shards = &self.snapshots;
        let sum = |f: &dyn Fn(&ShardSnapshot) -> u64| shards.iter().map(f).sum::<u64>() as f64;
        let version = vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("commit", crate::BUILD_COMMIT.to_owned()),
        ];
        family(
            &mut encoder,
            "skein_build_info",
            "The running build (always 1).",
            None,
            Gauge,
            [(version, 1.0)],
        )?;
        single(
            &mut encoder,
            "skein_ready",
            "1 once every shard recovered and listens.",
            Gauge,
            f64::from(u8::from(self.ready)),
        )?;
        let per_api = |pick: &dyn Fn(&ShardSnapshot, usize) -> u64| {
            (0..API_SLOTS)
                .map(|slot| {
                    (
                        vec![("api", api_name(slot as u16))],
                        shards.iter().map(|s| pick(s, slot)).sum::<u64>() as f64,
                    )
                })
                .collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "skein_requests",
            "Requests received, by API.",
            None,
            Counter,
            per_api(&|s, i| s.requests[i]),
        )?;
        family(
            &mut encoder,
            "skein_request_errors",
            "Requests refused, and partitions answered with an error, by API.",
            None,
            Counter,
            per_api(&|s, i| s.errors[i]),
        )?;
        single(
            &mut encoder,
            "skein_request_bytes",
            "Request frame bytes received.",
            Counter,
            sum(&|s| s.request_bytes),
        )?;
        single(
            &mut encoder,
            "skein_response_bytes",
            "Response bytes sent (fetched records included).",
            Counter,
            sum(&|s| s.response_bytes),
        )?;
        single(
            &mut encoder,
            "skein_produced_records",
            "Records appended.",
            Counter,
            sum(&|s| s.produced_records),
        )?;
        single(
            &mut encoder,
            "skein_produced_bytes",
            "Record batch bytes appended.",
            Counter,
            sum(&|s| s.produced_bytes),
        )?;
        single(
            &mut encoder,
            "skein_fetched_bytes",
            "Record bytes sent to fetches.",
            Counter,
            sum(&|s| s.fetched_bytes),
        )?;
        for (name, help, pick) in [
            (
                "skein_produce_latency",
                "Produce: request received to response ready.",
                (|s: &ShardSnapshot| s.produce_latency) as fn(&ShardSnapshot) -> Histogram,
            ),
            (
                "skein_fetch_latency",
                "Fetch: request received to response ready (long-poll wait included).",
                |s| s.fetch_latency,
            ),
            ("skein_fsync_latency", "fdatasync of data segments.", |s| s.storage.fsync),
            (
                "skein_write_latency",
                "O_DIRECT writes of data segments: handed to the ring to completion seen.",
                |s| s.storage.writes,
            ),
        ] {
            let mut merged = Histogram::default();
            for shard in shards {
                merged.merge(&pick(shard));
            }
            let metric =
                encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
            Buckets(merged).encode(metric)?;
        }
        single(
            &mut encoder,
            "skein_connections",
            "Open client connections.",
            Gauge,
            sum(&|s| s.connections),
        )?;
        single(
            &mut encoder,
            "skein_connections_accepted",
            "Client connections accepted.",
            Counter,
            sum(&|s| s.connections_accepted),
        )?;
        single(
            &mut encoder,
            "skein_connections_refused",
            "Client connections refused (over connections_max).",
            Counter,
            sum(&|s| s.connections_refused),
        )?;
        single(&mut encoder, "skein_open_files", "Segment files held open.", Gauge, sum(&|s| s.open_files))?;
        single(
            &mut encoder,
            "skein_open_files_max",
            "Segment files the broker keeps open at most.",
            Gauge,
            sum(&|s| s.open_files_max),
        )?;
        single(
            &mut encoder,
            "skein_tail_cache_bytes",
            "Memory held by the partitions' tail caches.",
            Gauge,
            sum(&|s| s.cache_bytes),
        )?;
        single(
            &mut encoder,
            "skein_tail_cache_bytes_max",
            "Memory the tail caches hold at most.",
            Gauge,
            sum(&|s| s.cache_bytes_max),
        )?;
        single(
            &mut encoder,
            "skein_tail_cache_evictions",
            "Cached batches evicted for the memory bound.",
            Counter,
            sum(&|s| s.cache_evictions),
        )?;
        single(
            &mut encoder,
            "skein_read_ahead_bytes",
            "Memory read ahead of consumers that read segment files.",
            Gauge,
            sum(&|s| s.read_ahead_bytes),
        )?;
        single(
            &mut encoder,
            "skein_read_ahead_bytes_max",
            "Memory read ahead of consumers at most.",
            Gauge,
            sum(&|s| s.read_ahead_bytes_max),
        )?;
        single(
            &mut encoder,
            "skein_request_memory_bytes",
            "Memory held by the frames of requests in progress (those longer than a read chunk).",
            Gauge,
            sum(&|s| s.request_memory_bytes),
        )?;
        single(
            &mut encoder,
            "skein_request_memory_bytes_max",
            "Memory the frames of requests in progress hold at most.",
            Gauge,
            sum(&|s| s.request_memory_bytes_max),
        )?;
        single(
            &mut encoder,
            "skein_request_memory_waits",
            "Frames whose connection waited, unread, for request memory.",
            Counter,
            sum(&|s| s.request_memory_waits),
        )?;
        single(
            &mut encoder,
            "skein_fetch_memory_bytes",
            "Bytes read from disk into fetch responses not yet sent.",
            Gauge,
            sum(&|s| s.fetch_memory_bytes),
        )?;
        single(
            &mut encoder,
            "skein_fetch_memory_fallbacks",
            "Cold file ranges of fetches sent from the page cache because the fetch memory was taken.",
            Counter,
            sum(&|s| s.fetch_memory_fallbacks),
        )?;
        single(
            &mut encoder,
            "skein_segment_rolls",
            "Active segments sealed.",
            Counter,
            sum(&|s| s.storage.segment_rolls),
        )?;
        family(
            &mut encoder,
            "skein_forwarded_partitions",
            "Partitions of produce and fetch requests sent on to the shard holding them (a hop between cores).",
            None,
            Counter,
            [
                (vec![("api", "produce".to_owned())], sum(&|s| s.forwarded_produce)),
                (vec![("api", "fetch".to_owned())], sum(&|s| s.forwarded_fetch)),
            ],
        )?;
        let (cache, file) = (sum(&|s| s.storage.cache_reads), sum(&|s| s.storage.file_reads));
        family(
            &mut encoder,
            "skein_log_reads",
            "Log reads, by where they were answered from.",
            None,
            Counter,
            [(vec![("source", "tail_cache".to_owned())], cache), (vec![("source", "file".to_owned())], file)],
        )?;
        let ratio = if cache + file > 0.0 { cache / (cache + file) } else { 0.0 };
        single(&mut encoder, "skein_cache_hit_ratio", "Tail-cache reads over all log reads.", Gauge, ratio)?;
        single(
            &mut encoder,
            "skein_direct_read_bytes",
            "Bytes read from segment files with O_DIRECT.",
            Counter,
            sum(&|s| s.storage.direct_read_bytes),
        )?;
        single(
            &mut encoder,
            "skein_read_in_flight_waits",
            "Cold reads that waited for room in the bound on reads in flight while segments were written.",
            Counter,
            sum(&|s| s.storage.read_in_flight_waits),
        )?;
        single(
            &mut encoder,
            "skein_recovery_scanned_bytes",
            "Bytes of segment files scanned batch by batch to recover a tail or rebuild an index.",
            Counter,
            sum(&|s| s.storage.recovery_scanned_bytes),
        )?;
        let per_shard = |pick: &dyn Fn(&ShardSnapshot) -> f64| {
            shards.iter().map(|s| (vec![("shard", s.shard.to_string())], pick(s))).collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "skein_reactor_stalls",
            "Times a shard's 10 ms wake-up timer fired over 25 ms late.",
            None,
            Counter,
            per_shard(&|s| s.reactor_stalls as f64),
        )?;
        family(
            &mut encoder,
            "skein_reactor_lag_max",
            "Worst lateness of a shard's wake-up timer since start.",
            Some(&Unit::Seconds),
            Gauge,
            per_shard(&|s| s.reactor_lag_max.as_secs_f64()),
        )?;
        family(
            &mut encoder,
            "skein_shard_partitions",
            "Partitions owned by each shard.",
            None,
            Gauge,
            per_shard(&|s| s.partitions.len() as f64),
        )?;

        let mut partitions: Vec<&PartitionStats> = shards.iter().flat_map(|s| s.partitions.iter()).collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let mut topics: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for p in &partitions {
            let entry = topics.entry(p.topic.as_str()).or_default();
            entry.0 += 1;
            entry.1 += p.bytes;
        }
        let topic_labels = |t: &str| vec![("topic", t.to_owned())];
        family(
            &mut encoder,
            "skein_topic_partitions",
            "Partitions of each topic held here.",
            None,
            Gauge,
            topics.iter().map(|(t, (n, _))| (topic_labels(t), *n as f64)),
        )?;
        family(
            &mut encoder,
            "skein_topic_bytes",
            "Bytes of each topic's segments.",
            None,
            Gauge,
            topics.iter().map(|(t, (_, b))| (topic_labels(t), *b as f64)),
        )?;
        if !partitions.is_empty() && partitions.len() <= self.partition_series_max {
            let labels =
                |p: &PartitionStats| vec![("topic", p.topic.clone()), ("partition", p.partition.to_string())];
            for (name, help, pick) in [
                (
                    "skein_partition_log_start_offset",
                    "First offset held.",
                    (|p: &PartitionStats| p.start_offset) as fn(&PartitionStats) -> u64,
                ),
                ("skein_partition_log_end_offset", "Offset the next record gets.", |p| p.end_offset),
                ("skein_partition_bytes", "Bytes of the partition's segments.", |p| p.bytes),
            ] {
                family(
                    &mut encoder,
                    name,
                    help,
                    None,
                    Gauge,
                    partitions.iter().map(|p| (labels(p), pick(p) as f64)),
                )?;
            }
        }
        let ends: BTreeMap<(&str, u32), u64> =
            partitions.iter().map(|p| ((p.topic.as_str(), p.partition), p.end_offset)).collect();
        let groups: Vec<&GroupStats> = shards.iter().flat_map(|s| s.groups.iter()).collect();
        let group_labels = |g: &GroupStats| vec![("group", g.group.clone())];
        family(
            &mut encoder,
            "skein_consumer_group_members",
            "Members of each consumer group.",
            None,
            Gauge,
            groups.iter().map(|g| (group_labels(g), g.members as f64)),
        )?;
        family(
            &mut encoder,
            "skein_consumer_group_lag",
            "Records between each group's committed offsets and the log ends, summed over its partitions.",
            None,
            Gauge,
            groups.iter().map(|g| {
                let lag: u64 = g
                    .committed
                    .iter()
                    .map(|(topic, partition, offset)| {
                        ends.get(&(topic.as_str(), *partition)).map_or(0, |end| end.saturating_sub(*offset))
                    })
                    .sum();
                (group_labels(g), lag as f64)
            }),
        )?;
        single(
            &mut encoder,
            "skein_metrics_stale_shards",
            "Shards that did not answer this scrape in time.",
            Gauge,
            self.stale as f64,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_snapshots_encode_sums_per_family() {
        let mut one = ShardSnapshot { shard: 0, ..ShardSnapshot::default() };
        one.requests[ApiKey::Produce as usize] = 3;
        one.produce_latency.observe(Duration::from_millis(2));
        one.partitions.push(PartitionStats {
            topic: "t".into(),
            partition: 0,
            start_offset: 0,
            end_offset: 10,
            bytes: 100,
        });
        one.groups.push(GroupStats {
            group: "g".into(),
            members: 1,
            committed: vec![("t".into(), 0, 4), ("t".into(), 1, 5)],
        });
        let mut two = ShardSnapshot { shard: 1, ..ShardSnapshot::default() };
        two.requests[ApiKey::Produce as usize] = 4;
        two.requests[API_SLOTS - 1] = 1;
        two.produce_latency.observe(Duration::from_millis(20));
        two.partitions.push(PartitionStats {
            topic: "t".into(),
            partition: 1,
            start_offset: 2,
            end_offset: 7,
            bytes: 50,
        });
        let text = encode(&[one.clone(), two.clone()], 0, true, 10);
        assert!(text.contains("skein_requests_total{api=\"Produce\"} 7"), "{text}");
        assert!(text.contains("skein_requests_total{api=\"Unknown\"} 1"), "{text}");
        assert!(text.contains("skein_produce_latency_seconds_count 2"), "{text}");
        assert!(text.contains("skein_produce_latency_seconds_bucket{le=\"0.0025\"} 1"), "{text}");
        assert!(text.contains("skein_produce_latency_seconds_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("skein_topic_bytes{topic=\"t\"} 150"), "{text}");
        assert!(text.contains("skein_partition_log_end_offset{topic=\"t\",partition=\"1\"} 7"), "{text}");
        // Lag: (10 - 4) + (7 - 5).
        assert!(text.contains("skein_consumer_group_lag{group=\"g\"} 8"), "{text}");
        assert!(text.contains("skein_ready 1"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        // Over the bound, per-partition series go, per-topic ones stay.
        let bounded = encode(&[one, two], 1, false, 1);
        assert!(!bounded.contains("skein_partition_log_end_offset{"), "{bounded}");
        assert!(bounded.contains("skein_topic_partitions{topic=\"t\"} 2"), "{bounded}");
        assert!(bounded.contains("skein_metrics_stale_shards 1"), "{bounded}");
    }

    #[test]
    fn request_lines_are_parsed_strictly() {
        assert_eq!(parse_request_line("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(("GET", "/metrics")));
        assert_eq!(parse_request_line("POST /ready HTTP/1.0\r\n\r\n"), Some(("POST", "/ready")));
        assert_eq!(parse_request_line("GET /metrics\r\n\r\n"), None);
        assert_eq!(parse_request_line("\u{0}\u{1}garbage"), None);
    }

    #[test]
    fn a_late_shard_timer_is_seen_in_process() {
        note_timer_lateness(Duration::from_millis(7));
        // Other tests' shards may tick too: the worst is at least this one.
        let lag = take_in_process_reactor_lag().expect("a timer ticked in this process");
        assert!(lag >= Duration::from_millis(7), "{lag:?}");
    }

    #[test]
    fn late_timers_count_as_stalls() {
        note_timer_lateness(Duration::from_millis(1));
        note_timer_lateness(STALL_THRESHOLD);
        let (stalls, worst) = REACTOR.with(Cell::get);
        assert_eq!(stalls, 1);
        assert_eq!(worst, STALL_THRESHOLD);
    }
}
