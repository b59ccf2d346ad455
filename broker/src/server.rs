//! Starting and stopping a broker: one pinned glommio executor per shard, a listener per shard
//! on the same port (SO_REUSEPORT), the cross-shard mesh, retention, and a clean shutdown.
//!
//! # Start-up
//! 1. [`crate::preflight`] checks locked memory, open files, io_uring and the data directory,
//!    and refuses to start with one line naming the fix when one fails.
//! 2. Every shard starts, joins the mesh and recovers its partitions and consumer groups. A
//!    shard that fails, or whose thread dies (glommio could not create its executor, or it
//!    panicked), stops the whole start within a moment, with its error; so does SIGINT or
//!    SIGTERM ([`run`]). A slow recovery is reported every 10 s.
//! 3. Only when every shard has recovered does the main thread bind the listeners, one per
//!    shard in one `SO_REUSEPORT` group steered by source port ([`crate::steering`]), and hand
//!    listener `k` to shard `k`: a client can never reach a shard whose partitions, or a
//!    peer's, are not open yet. [`start`] returns once every shard listens.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::BrokerConfig;
use crate::connection;
use crate::mesh::MeshMessage;
use crate::metadata::{FileMetadataStore, MetadataError, MetadataStore, ProducerIdAllocator, TopicConfig};
use crate::shard::Shard;

/// Why a broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("data directory {0} is in use by another broker")]
    Locked(PathBuf),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("shard {shard}: {reason}")]
    Shard { shard: usize, reason: String },
    /// A pre-start check failed (see [`crate::preflight`]).
    #[error("{0}")]
    Preflight(String),
    #[error("start-up interrupted by a signal")]
    Interrupted,
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Quic(String),
}

enum ShardEvent {
    /// Partitions and groups recovered; waiting to be told to listen.
    Recovered,
    Listening,
    Failed(String),
    /// The shard's thread ended without saying why (its executor could not be created, or it
    /// panicked): the join handle has the reason.
    Died,
}

/// Reports [`ShardEvent::Died`] when dropped without [`ShardGuard::disarm`]: moved into the
/// executor's closure, it is dropped when the thread ends early, whatever the cause.
struct ShardGuard {
    id: usize,
    events: mpsc::Sender<(usize, ShardEvent)>,
    armed: bool,
}

impl ShardGuard {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ShardGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.events.send((self.id, ShardEvent::Died));
        }
    }
}

/// The shared flags the main thread and the shards start and stop by.
struct Phase {
    /// Every shard recovered: the listeners are in `listeners`, take yours and accept.
    listen: AtomicBool,
    /// Listener `k` is shard `k`'s: one steered `SO_REUSEPORT` group (see [`crate::steering`]),
    /// bound by the main thread in shard order once every shard recovered.
    listeners: std::sync::Mutex<Vec<Option<std::net::TcpListener>>>,
    stop: Arc<AtomicBool>,
    /// Client connections, all shards together, against `connections_max`.
    connections: Arc<crate::config::ConnectionSlots>,
}

/// A running broker. Dropping it without [`RunningBroker::stop`] stops it too.
pub struct RunningBroker {
    pub addr: SocketAddr,
    /// Where QUIC clients connect, when `quic_listen` is set.
    pub quic_addr: Option<SocketAddr>,
    /// The development certificate QUIC clients must trust, when no certificate was configured.
    pub quic_dev_cert: Option<PathBuf>,
    /// Where `/metrics`, `/health` and `/ready` are served, when they are.
    pub metrics_addr: Option<SocketAddr>,
    metrics: Option<crate::metrics::MetricsThread>,
    stop: Arc<AtomicBool>,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
    _lock: std::fs::File,
}

impl RunningBroker {
    /// Stops accepting, lets in-flight requests finish briefly, flushes and closes every log.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(metrics) = &self.metrics {
            metrics.hub.set_ready(false);
        }
        self.stop.store(true, Ordering::SeqCst);
        for executor in self.executors.drain(..) {
            let _ = executor.join();
        }
        self.metrics = None;
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    use std::os::fd::AsRawFd;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartError::DataDir { path: path.clone(), source })?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(StartError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

/// Removes partition directories of topics the metadata does not know (a deletion that
/// crashed half way).
fn remove_unknown_topics(data_dir: &Path, topics: &BTreeMap<String, TopicConfig>) -> Result<(), StartError> {
    let dir = data_dir.join("topics");
    std::fs::create_dir_all(&dir).map_err(|source| StartError::DataDir { path: dir.clone(), source })?;
    let entries =
        std::fs::read_dir(&dir).map_err(|source| StartError::DataDir { path: dir.clone(), source })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !topics.contains_key(&name) {
            tracing::warn!(path = %entry.path().display(), "removing the data of a topic that no longer exists");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// Starts a broker and returns once every shard is listening.
pub fn start(config: BrokerConfig) -> Result<RunningBroker, StartError> {
    start_until(config, &AtomicBool::new(false))
}

/// Like [`start`], but gives up (with [`StartError::Interrupted`]) once `abort` is set.
pub fn start_until(config: BrokerConfig, abort: &AtomicBool) -> Result<RunningBroker, StartError> {
    let cores = config.cores.max(1);
    let config = BrokerConfig { cores, ..config };
    match crate::allocator::tune() {
        crate::allocator::Tuning::Tuned => {}
        crate::allocator::Tuning::LeftToTheEnvironment => {
            tracing::info!(
                "malloc is tuned by the environment (GLIBC_TUNABLES or MALLOC_*); its settings are kept"
            )
        }
        crate::allocator::Tuning::Unavailable => {
            tracing::info!(
                "the allocator's thresholds could not be set (not glibc?); request frames use fresh memory"
            )
        }
    }
    let report = crate::preflight::run(&config);
    for check in &report.checks {
        if let crate::preflight::Outcome::Warning(text) = &check.outcome {
            tracing::warn!(check = check.name, "{text}");
        }
    }
    if let Some(failure) = report.first_failure() {
        return Err(StartError::Preflight(failure));
    }
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .map_err(|source| StartError::DataDir { path: data_dir.clone(), source })?;
    let lock = lock_data_dir(&data_dir)?;
    let store = FileMetadataStore::open(&data_dir)?;
    let producer_ids = ProducerIdAllocator::open(&data_dir)?;
    let topics = store.snapshot().topics.clone();
    let topic_ids = store.snapshot().ids();
    remove_unknown_topics(&data_dir, &topics)?;

    let open_files = crate::preflight::open_files_budget(&config, crate::preflight::open_files_limit());
    let files_per_shard =
        (open_files / cores as u64).max(crate::preflight::OPEN_FILES_MIN_PER_SHARD) as usize;
    let preallocate_per_shard = config.preallocate_bytes_max / cores as u64;
    let reads_per_shard = (config.read_in_flight_bytes_max > 0)
        .then(|| (config.read_in_flight_bytes_max / cores as u64).max(READ_IN_FLIGHT_MIN_PER_SHARD) as usize);
    let memory = crate::preflight::memory_bytes();
    let cache_bytes_max = crate::preflight::tail_cache_budget(&config, memory);
    let cache_per_shard = (cache_bytes_max / cores as u64) as usize;
    let request_memory_max = crate::preflight::request_memory_budget(&config, memory);
    // Resolved once here: each shard takes its share from the config.
    let config = BrokerConfig { request_memory_max: Some(request_memory_max), ..config };
    tracing::info!(
        open_files,
        files_per_shard,
        preallocate_bytes_max = config.preallocate_bytes_max,
        read_in_flight_bytes_max = config.read_in_flight_bytes_max,
        cache_bytes_max,
        request_memory_max,
        "budgets: segment files kept open, disk allocated ahead of data, tail caches, request frames, reads in flight"
    );
    // Metrics first: `/health` answers (and `/ready` says why not) while the shards recover.
    let metrics = match config.metrics_listen {
        Some(listen) => Some(
            crate::metrics::MetricsThread::start(listen, cores, config.partition_series_max)
                .map_err(|source| StartError::Listen { addr: listen, source })?,
        ),
        None => None,
    };
    let hub = metrics.as_ref().map(|m| m.hub.clone());
    let config = Arc::new(config);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mesh: MeshBuilder<MeshMessage, _> = MeshBuilder::full(cores, 1024);
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(Phase {
        listen: AtomicBool::new(false),
        listeners: std::sync::Mutex::new(Vec::new()),
        stop: stop.clone(),
        connections: crate::config::ConnectionSlots::new(config.connections_max),
    });
    let (events, event_receiver) = mpsc::channel::<(usize, ShardEvent)>();
    let mut executors = Vec::with_capacity(cores);
    let mut store = Some((store, producer_ids));
    // Every shard listens on the same port with SO_REUSEPORT, which would also let this broker
    // share a port silently with another process that uses SO_REUSEPORT. Bind once without it
    // first: that fails if anything holds the port, and picks the port when asked for port 0.
    let addr = probe_listen_address(config.listen)?;
    // QUIC: the TLS settings, and one socket per shard in one steered group (see `quic`).
    let mut quic = match config.quic_listen {
        Some(quic_listen) => {
            let setup =
                crate::quic::ServerSetup::new(&config, quic_listen, cores).map_err(StartError::Quic)?;
            let group = crate::quic::SteeredGroup::bind(quic_listen, cores)
                .map_err(|source| StartError::Listen { addr: quic_listen, source })?;
            if let Some(warning) = group.buffer_warning() {
                tracing::warn!("{warning}");
            }
            Some((setup, group))
        }
        None => None,
    };
    let quic_addr = quic.as_ref().map(|(_, group)| group.addr);
    let quic_dev_cert = quic.as_ref().and_then(|(setup, _)| setup.dev_cert.clone());
    let mut quic_sockets: Vec<Option<std::net::UdpSocket>> =
        quic.as_mut().map(|(_, group)| group.sockets.drain(..).map(Some).collect()).unwrap_or_default();

    for id in 0..cores {
        let shard_config = Arc::clone(&config);
        let mesh = mesh.clone();
        let phase = phase.clone();
        let guard = ShardGuard { id, events: events.clone(), armed: true };
        let events = events.clone();
        let topics = topics.clone();
        let topic_ids = topic_ids.clone();
        let controller = if id == 0 { store.take() } else { None };
        let hub = hub.clone();
        let quic =
            quic.as_ref().and_then(|(setup, _)| Some((setup.clone(), quic_sockets.get_mut(id)?.take()?)));
        // The executor keeps glommio's long default time slice; the shard's work runs in a task
        // queue that asks for `preempt_timer` (see `keep_awake`).
        let builder =
            LocalExecutorBuilder::new(Placement::Fixed(id % cpus)).name(&format!("skein-shard-{id}"));
        let spawned = builder.spawn(move || async move {
            skein_storage::handles::set_open_files_max(Some(files_per_shard));
            skein_storage::handles::set_preallocate_bytes_max(Some(preallocate_per_shard));
            skein_storage::handles::set_read_in_flight_bytes_max(reads_per_shard);
            skein_storage::handles::set_cache_bytes_max(Some(cache_per_shard));
            // Bytes read ahead of consumers: as much as the tail cache holds (the two serve
            // readers at the tail and behind it), not a fixed 256 MiB a shard.
            skein_storage::handles::set_read_ahead_bytes_max(cache_per_shard);
            let awake = glommio::spawn_local(keep_awake());
            let queue = glommio::executor().create_task_queue(
                glommio::Shares::default(),
                glommio::Latency::Matters(shard_config.preempt_timer),
                "shard",
            );
            let work = glommio::spawn_local_into(
                async move {
                    // Every event logged on this executor's thread carries its shard.
                    let _shard_span = tracing::info_span!("shard", shard = id).entered();
                    let config = Rc::new(BrokerConfig::clone(&shard_config));
                    let shard = ShardStart { id, config, topics, topic_ids, mesh, controller, hub, quic };
                    if let Err(reason) = run_shard(shard, &phase, &events).await {
                        let _ = events.send((id, ShardEvent::Failed(reason)));
                    }
                },
                queue,
            )
            .expect("the queue was just created");
            work.await;
            drop(awake);
            guard.disarm();
        });
        match spawned {
            Ok(handle) => executors.push(Some(handle)),
            Err(error) => {
                return Err(fail(stop, executors, id, format!("starting its executor: {error}")));
            }
        }
    }
    // Wait until every shard recovered, then let them listen, then until every one listens.
    let started = std::time::Instant::now();
    let mut last_report = started;
    let (mut recovered, mut listening) = (vec![false; cores], 0);
    while listening < cores {
        if abort.load(Ordering::SeqCst) {
            fail(stop, executors, 0, String::new());
            return Err(StartError::Interrupted);
        }
        match event_receiver.recv_timeout(Duration::from_millis(50)) {
            Ok((shard, ShardEvent::Recovered)) => {
                recovered[shard] = true;
                if recovered.iter().all(|r| *r) {
                    // Only now: a connection accepted before every shard recovered could reach
                    // (or be forwarded to) a shard whose partitions are not open yet.
                    let listeners = match crate::steering::bind_tcp(addr, cores) {
                        Ok(listeners) => listeners,
                        Err(source) => {
                            fail(stop, executors, 0, String::new());
                            return Err(StartError::Listen { addr, source });
                        }
                    };
                    *phase.listeners.lock().expect("not poisoned") =
                        listeners.into_iter().map(Some).collect();
                    phase.listen.store(true, Ordering::SeqCst);
                }
            }
            Ok((_, ShardEvent::Listening)) => listening += 1,
            Ok((shard, ShardEvent::Failed(reason))) => return Err(fail(stop, executors, shard, reason)),
            Ok((shard, ShardEvent::Died)) => {
                let reason = match executors[shard].take().map(|handle| handle.join()) {
                    Some(Err(error)) => format!("its thread ended: {error}"),
                    _ => "its thread ended".to_owned(),
                };
                return Err(fail(stop, executors, shard, reason));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if last_report.elapsed() >= Duration::from_secs(10) {
                    last_report = std::time::Instant::now();
                    let waiting: Vec<usize> = (0..cores).filter(|&s| !recovered[s]).collect();
                    tracing::info!(
                        seconds = started.elapsed().as_secs(),
                        ?waiting,
                        "still starting: shards recovering their partitions"
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("this function holds a sender"),
        }
    }
    let executors = executors.into_iter().map(|handle| handle.expect("every shard is running")).collect();
    if let Some(metrics) = &metrics {
        metrics.hub.set_ready(true);
    }
    let metrics_addr = metrics.as_ref().map(|m| m.addr);
    Ok(RunningBroker { addr, quic_addr, quic_dev_cert, metrics_addr, metrics, stop, executors, _lock: lock })
}

/// Checks that nothing holds the address (and resolves port 0). After a crash the kernel may
/// hold the old listening sockets for a moment (io_uring teardown), so "in use" is retried for
/// a few seconds before giving up.
fn probe_listen_address(listen: SocketAddr) -> Result<SocketAddr, StartError> {
    let started = std::time::Instant::now();
    loop {
        match std::net::TcpListener::bind(listen) {
            Ok(probe) => {
                return probe.local_addr().map_err(|source| StartError::Listen { addr: listen, source })
            }
            Err(source)
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => return Err(StartError::Listen { addr: listen, source }),
        }
    }
}

/// Stops every shard after a failed start and returns the error. Waits at most 10 s for the
/// shards to end (a shard blocked in the kernel is left behind: the process is about to exit).
fn fail(
    stop: Arc<AtomicBool>,
    executors: Vec<Option<glommio::ExecutorJoinHandle<()>>>,
    shard: usize,
    reason: String,
) -> StartError {
    stop.store(true, Ordering::SeqCst);
    let (done, ended) = mpsc::channel();
    std::thread::spawn(move || {
        for executor in executors.into_iter().flatten() {
            let _ = executor.join();
        }
        let _ = done.send(());
    });
    if ended.recv_timeout(Duration::from_secs(10)).is_err() {
        tracing::warn!("shards did not stop within 10 s of a failed start");
    }
    StartError::Shard { shard, reason }
}

/// Waits until `flag` is set, or `stop` (then `false`), polling: these are plain atomics set by
/// the main thread.
async fn wait_for(flag: &AtomicBool, stop: &AtomicBool) -> bool {
    loop {
        if flag.load(Ordering::SeqCst) {
            return true;
        }
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// What one shard starts with.
struct ShardStart {
    id: usize,
    config: Rc<BrokerConfig>,
    topics: BTreeMap<String, TopicConfig>,
    topic_ids: BTreeMap<String, skein_net::types::TopicId>,
    mesh: MeshBuilder<MeshMessage, glommio::channels::channel_mesh::Full>,
    controller: Option<(FileMetadataStore, ProducerIdAllocator)>,
    hub: Option<Arc<crate::metrics::MetricsHub>>,
    /// The QUIC settings and this shard's socket of the steered group.
    quic: Option<(crate::quic::ServerSetup, std::net::UdpSocket)>,
}

async fn run_shard(
    start: ShardStart,
    phase: &Phase,
    events: &mpsc::Sender<(usize, ShardEvent)>,
) -> Result<(), String> {
    let ShardStart { id, config, topics, topic_ids, mesh, controller, hub, quic } = start;
    let stop = phase.stop.clone();
    tracing::debug!(shard = id, "priming");
    skein_storage::prime_executor(&config.data_dir).await.map_err(|e| e.to_string())?;
    tracing::debug!(shard = id, "joining the mesh");
    // A peer that failed never joins: give up when the start is called off.
    let never = AtomicBool::new(false);
    let joined = futures::future::select(Box::pin(mesh.join()), Box::pin(wait_for(&never, &stop))).await;
    let (senders, mut receivers) = match joined {
        futures::future::Either::Left((joined, _)) => {
            joined.map_err(|_| "joining the shard mesh".to_owned())?
        }
        futures::future::Either::Right(_) => return Err("start-up called off".to_owned()),
    };
    assert_eq!(senders.peer_id(), id, "mesh peers are numbered in executor creation order");
    tracing::debug!(shard = id, "joined");
    let shard = Rc::new(Shard::new(id, config.clone(), senders, controller, phase.connections.clone()));
    // Test builds only: a shard that dies during recovery (the start must stop and say so).
    #[cfg(debug_assertions)]
    if std::env::var("SKEIN_TEST_PANIC_SHARD").is_ok_and(|v| v == id.to_string()) {
        panic!("SKEIN_TEST_PANIC_SHARD: shard {id} panics during recovery");
    }
    // Test builds only: a slow recovery (to watch `/ready` say 503 before it says 200).
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("SKEIN_TEST_RECOVERY_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        glommio::timer::sleep(Duration::from_millis(ms)).await;
    }
    let recovery = async {
        // The stored topics as metadata records, applied one by one: each shard's image is
        // built by the same `apply` as later changes, and reconciling opens its partitions.
        for record in skein_replication::controller::records_for(&topics, &topic_ids, 0) {
            if stop.load(Ordering::SeqCst) {
                return Err("start-up called off".to_owned());
            }
            shard.apply_records(std::slice::from_ref(&record)).await?;
        }
        crate::groups::open_offsets(&shard).await.map_err(|e| format!("opening the committed offsets: {e}"))
    };
    if let Err(error) = recovery.await {
        close_logs(&shard).await;
        return Err(error);
    }
    for (peer, receiver) in receivers.streams() {
        glommio::spawn_local(shard.clone().serve_peer(peer, receiver)).detach();
    }
    glommio::spawn_local(retention_loop(shard.clone())).detach();
    glommio::spawn_local(shard.clone().reconcile_loop()).detach();
    glommio::spawn_local(crate::groups::coordinator_loop(shard.clone())).detach();
    if let Some(hub) = hub {
        hub.shard_recovered();
        glommio::spawn_local(crate::metrics::answer_scrapes(shard.clone(), hub)).detach();
    }
    let _ = events.send((id, ShardEvent::Recovered));
    tracing::debug!(shard = id, partitions = shard.all_logs().len(), "recovered");
    // Listen only once every shard recovered, so that no request reaches a shard (or is
    // forwarded to one) whose partitions are not open yet.
    if !wait_for(&phase.listen, &stop).await {
        shard.shutting_down.set(true);
        close_logs(&shard).await;
        return Ok(());
    }
    let mine = phase.listeners.lock().expect("not poisoned").get_mut(id).and_then(Option::take);
    let listener = match mine {
        // SAFETY: a bound, listening socket whose ownership moves to glommio.
        Some(listener) => unsafe {
            use std::os::fd::{FromRawFd, IntoRawFd};
            TcpListener::from_raw_fd(listener.into_raw_fd())
        },
        None => {
            shard.shutting_down.set(true);
            close_logs(&shard).await;
            return Err(format!("no listener for shard {id}"));
        }
    };
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let quic_endpoint = match quic {
        Some((setup, socket)) => match setup.endpoint(id, socket) {
            Ok(endpoint) => {
                shard.quic_port.set(endpoint.local_addr().ok().map(|addr| addr.port()));
                glommio::spawn_local(crate::quic::serve(shard.clone(), endpoint.clone())).detach();
                Some(endpoint)
            }
            Err(error) => {
                shard.shutting_down.set(true);
                close_logs(&shard).await;
                return Err(format!("starting its QUIC endpoint: {error}"));
            }
        },
        None => None,
    };
    *shard.advertised.borrow_mut() = advertised(bound);
    let _ = events.send((id, ShardEvent::Listening));
    tracing::info!(shard = id, %bound, partitions = shard.all_logs().len(), "shard ready");
    // Test builds only: a shard that dies while serving (the process must exit, not hang).
    #[cfg(debug_assertions)]
    if std::env::var("SKEIN_TEST_PANIC_SERVING_SHARD").is_ok_and(|v| v == id.to_string()) {
        glommio::spawn_local(async move {
            while !SERVING.load(Ordering::SeqCst) {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            glommio::timer::sleep(Duration::from_millis(200)).await;
            panic!("SKEIN_TEST_PANIC_SERVING_SHARD: shard {id} panics while serving");
        })
        .detach();
    }

    // Accept until told to stop.
    let accept = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if shard.shutting_down.get() {
                    break;
                }
                let peer = stream.peer_addr().ok();
                let Some(slot) = shard.connection_slots.take() else {
                    shard.metrics.connections_refused.set(shard.metrics.connections_refused.get() + 1);
                    glommio::spawn_local(connection::refuse(stream, peer)).detach();
                    continue;
                };
                shard.metrics.connections_accepted.set(shard.metrics.connections_accepted.get() + 1);
                shard.connections.set(shard.connections.get() + 1);
                let served = shard.clone();
                glommio::spawn_local(async move {
                    connection::serve(served.clone(), stream).await;
                    served.connections.set(served.connections.get() - 1);
                    drop(slot);
                })
                .detach();
            }
        })
    };
    while !stop.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    shard.shutting_down.set(true);
    drop(accept);
    if let Some(endpoint) = &quic_endpoint {
        endpoint.close(quinn::VarInt::from_u32(0), b"broker shutting down");
    }
    // Give connections a moment to finish what they started (they notice the flag within 1 s).
    for _ in 0..150 {
        if shard.connections.get() == 0 {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    close_logs(&shard).await;
    tracing::info!(shard = id, "shard stopped");
    Ok(())
}

/// The least of the bound on O_DIRECT reads in flight a shard gets (`read_in_flight_bytes_max`
/// split across many shards).
const READ_IN_FLIGHT_MIN_PER_SHARD: u64 = 128 << 10;

/// Descriptors one log's close may hold at once: its producer snapshot's temporary file and
/// its directory, then its segment file (reopened if the budget had closed it), its recovery
/// checkpoint and its directory.
const FILES_PER_CLOSE: u64 = 4;

/// Logs closed at once at shutdown (each writes, syncs and checkpoints through io_uring): as
/// many as the shard's allowance of transient descriptors covers, beside a budget of segment
/// files that may be full. 64 at once overran an open-files limit of 1024 with 2000 partitions
/// (`cli/tests/many_partitions.rs`, once in a full test run: EMFILE writing producer
/// snapshots at the stop).
const CLOSING_AT_ONCE: usize = (crate::preflight::FILES_TRANSIENT_PER_SHARD / FILES_PER_CLOSE) as usize;

/// Writes the producer snapshots and closes every log of the shard (flushed and synced).
async fn close_logs(shard: &Shard) {
    use futures::stream::StreamExt;
    futures::stream::iter(shard.all_partitions())
        .for_each_concurrent(CLOSING_AT_ONCE, |(topic, partition, owned)| async move {
            if let Err(error) = owned.snapshot_producers().await {
                tracing::warn!(topic, partition, error, "writing the producer snapshot");
            }
            if let Err(error) = owned.log.shutdown().await {
                tracing::warn!(topic, partition, %error, "closing a partition log");
            }
        })
        .await;
    let offsets: Vec<_> = shard.offsets.borrow().values().cloned().collect();
    for partition in offsets {
        if let Err(error) = partition.log.shutdown().await {
            tracing::warn!(partition = partition.partition, %error, "closing an offsets log");
        }
    }
}

/// A timer that never lets a shard sleep longer than 10 ms. glommio 0.9 can park an executor
/// that still has work: a shared channel whose other end connected while it slept (it only looks
/// again when its reactor wakes up), and, rarely, a task made runnable just as the time slice
/// expired (seen at start-up under CPU contention: a shard that never ran its first task). With
/// a timer always armed, the reactor always wakes up again.
///
/// It runs until the shard's work is done (the caller drops it then), shutdown included: a
/// shard that stops flushing its logs needs the wake-ups as much as one that serves.
///
/// How late it fires is the shard's reactor lag (`skein_reactor_stalls_total`: a task that ran
/// too long without yielding, or a starved CPU).
async fn keep_awake() {
    const PERIOD: Duration = Duration::from_millis(10);
    loop {
        let started = std::time::Instant::now();
        glommio::timer::sleep(PERIOD).await;
        crate::metrics::note_timer_lateness(started.elapsed().saturating_sub(PERIOD));
    }
}

fn advertised(bound: SocketAddr) -> (String, u16) {
    let host = if bound.ip().is_unspecified() { "127.0.0.1".to_owned() } else { bound.ip().to_string() };
    (host, bound.port())
}

async fn retention_loop(shard: Rc<Shard>) {
    loop {
        glommio::timer::sleep(shard.config.retention_check).await;
        if shard.shutting_down.get() {
            return;
        }
        for (_, _, owned) in shard.all_partitions() {
            owned.producers.borrow_mut().expire(skein_storage::now_ms());
        }
        for (topic, partition, log) in shard.all_logs() {
            match log.enforce_retention(skein_storage::now_ms()).await {
                Ok(outcome) if outcome.segments_deleted > 0 => tracing::info!(
                    topic,
                    partition,
                    segments = outcome.segments_deleted,
                    bytes = outcome.bytes_deleted,
                    start_offset = outcome.start_offset,
                    "retention deleted segments"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(topic, partition, %error, "retention failed"),
            }
        }
    }
}

/// Runs a broker until SIGINT or SIGTERM, then stops it cleanly. Prints the listening address
/// on stdout once ready. A signal during start-up stops the start.
/// Set once the broker serves (every shard listens); read by the panic hook.
pub static SERVING: AtomicBool = AtomicBool::new(false);
/// Set by the panic hook on any panic (before it looks at [`SERVING`]).
static PANICKED: AtomicBool = AtomicBool::new(false);
/// Whoever ends the process for a panic first (the hook, or [`serving`]).
static EXITING: AtomicBool = AtomicBool::new(false);

/// Once serving, a panic on any thread (a shard's executor above all) ends the process: a
/// shard that died would leave its partitions unanswered while the process looks alive, and a
/// supervisor (systemd's `Restart=on-failure`) can only restart a process that exited. The
/// default hook prints the panic and its backtrace first; recovery at the next start makes the
/// logs whole, as after `kill -9`. Before the broker serves, a panic is the start-up's to
/// report (the shard's thread dies and the start stops with its error).
fn exit_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        // PANICKED before SERVING, and the reverse in `serving`: one of the two sees the other.
        PANICKED.store(true, Ordering::SeqCst);
        if SERVING.load(Ordering::SeqCst) {
            let thread = std::thread::current().name().unwrap_or("unnamed").to_owned();
            exit_for_panic(&thread);
        }
    }));
}

/// Marks the broker serving; a panic that came between the last shard's start and now (which
/// the start-up no longer watches) ends the process as one while serving would.
fn serving() {
    SERVING.store(true, Ordering::SeqCst);
    if PANICKED.load(Ordering::SeqCst) {
        exit_for_panic("a shard");
    }
}

fn exit_for_panic(thread: &str) {
    if EXITING.swap(true, Ordering::SeqCst) {
        // The other path is ending the process already.
        loop {
            std::thread::park();
        }
    }
    tracing::error!(thread, "a thread panicked while serving; the broker exits");
    eprintln!(
        "skein broker: thread {thread} panicked while serving; exiting so that a supervisor restarts it"
    );
    std::process::exit(70);
}

pub fn run(config: BrokerConfig) -> Result<(), StartError> {
    // Block the signals before any thread starts, so only the waiting thread receives them.
    // SAFETY: plain libc signal-set manipulation on locals.
    let mut signals: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut signals);
        libc::sigaddset(&mut signals, libc::SIGINT);
        libc::sigaddset(&mut signals, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut());
    }
    let signalled = Arc::new(AtomicBool::new(false));
    let (signal_sender, signal_receiver) = mpsc::channel::<libc::c_int>();
    {
        let signalled = signalled.clone();
        std::thread::Builder::new()
            .name("skein-signals".into())
            .spawn(move || loop {
                let mut received: libc::c_int = 0;
                // SAFETY: waits for one of the blocked signals.
                if unsafe { libc::sigwait(&signals, &mut received) } == 0 {
                    signalled.store(true, Ordering::SeqCst);
                    if signal_sender.send(received).is_err() {
                        return;
                    }
                }
            })
            .expect("a thread for signals");
    }
    let fsync = config.fsync;
    let cores = config.cores;
    let data_dir = config.data_dir.clone();
    exit_on_panic();
    let broker = start_until(config, &signalled)?;
    println!(
        "skein broker listening on {} ({} shards, fsync={}, data in {})",
        broker.addr,
        cores,
        fsync,
        data_dir.display()
    );
    if let Some(quic) = broker.quic_addr {
        match &broker.quic_dev_cert {
            Some(cert) => println!("skein QUIC on {quic} (development certificate: {})", cert.display()),
            None => println!("skein QUIC on {quic}"),
        }
    }
    if let Some(metrics) = broker.metrics_addr {
        println!("skein metrics on http://{metrics}/metrics (/health, /ready)");
    }
    serving();
    notify_systemd("READY=1\nSTATUS=serving");
    let received = signal_receiver.recv().unwrap_or(libc::SIGTERM);
    tracing::info!(signal = received, "stopping");
    notify_systemd("STOPPING=1");
    broker.stop();
    eprintln!("skein broker stopped");
    Ok(())
}

/// Tells systemd (a `Type=notify` unit) how the broker stands: a datagram to `$NOTIFY_SOCKET`
/// (a path, or `@name` in the abstract namespace), the `sd_notify` protocol. Nothing happens
/// without the variable; a failure is logged, never fatal.
pub fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => UnixAddr::from_abstract_name(name)?,
            None => UnixAddr::from_pathname(&path)?,
        };
        socket.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(error) = sent {
        tracing::warn!(%error, socket = ?path, "could not notify systemd");
    }
}
