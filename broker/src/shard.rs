//! One shard: a glommio executor pinned to one CPU, the partitions it owns, its copy of the
//! topic table, and its end of the cross-shard mesh.
//!
//! **Which core each structure lives on.** Everything in [`Shard`] lives on its own shard's
//! executor thread and is touched by no other thread: the partition logs it owns, the topic
//! table copy, the pending-reply table, the connection count. Only [`MeshMessage`]s cross
//! threads, through glommio's lock-free single-producer single-consumer channels (one per
//! ordered pair of shards). The controller's [`MetadataStore`] lives on shard 0 only.
//!
//! A partition is owned by exactly one shard, as this shard's [`PartitionTable`] says (filled
//! from the topic metadata, placed by [`crate::router::place`]); only that shard opens its log.
//! A request for a partition owned elsewhere is forwarded as a typed call through the
//! [`Mesh`] (see [`crate::mesh`]): fallible, with a deadline.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use glommio::channels::channel_mesh::Senders;
use skein_net::types::{ShardId, TopicPartition};
use skein_net::{
    ErrorCode, InitProducerIdRequest, InitProducerIdResponse, ListOffsetsPartitionResponse, NewTopic,
    ProducePartitionResponse, TopicResult,
};
use skein_storage::batch::{self, BatchError, ValidatedBatch};
use skein_storage::{AppendAck, Log, LogData, PartitionLog, StorageError};

use crate::config::BrokerConfig;
pub use crate::errors::storage_error_code;
use crate::groups::offsets::OffsetsPartition;
use crate::groups::service::GroupService;
use crate::groups::state::Coordinator;
use crate::mesh::{self, Call, Mesh, MeshError, MeshMessage, Op, Reply};
use crate::metadata::{
    FileMetadataStore, MetadataError, MetadataStore, ProducerIdAllocator, TopicConfig, TopicDefaults,
};
use crate::producers::{self, Check, ProducerTable};
use crate::reconcile;
use crate::router::PartitionTable;
use skein_replication::controller;
use skein_replication::metadata::{apply as metadata_apply, Delta, MetadataImage, MetadataRecord};

/// Where a partition's log lives.
pub fn partition_dir(data_dir: &std::path::Path, topic: &str, partition: u32) -> PathBuf {
    data_dir.join("topics").join(topic).join(partition.to_string())
}

/// Bytes of a cold read in a fetch response, counted in their shard's `fetch_memory` until
/// dropped (once sent, on whichever thread).
struct Counted {
    bytes: Bytes,
    held: Arc<AtomicUsize>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes.len(), Ordering::Relaxed);
    }
}

/// A part of a cold read shorter than this is copied out of the buffer it is a view of: a
/// short slice of a read-ahead piece (2 MiB) would keep the whole piece alive, counted as
/// its own length.
const COUNTED_COPY_BELOW_BYTES: usize = 256 << 10;

/// `bytes`, already counted in `held`, given back to it when the last view of them is dropped.
fn counted(bytes: Bytes, held: &Arc<AtomicUsize>) -> Bytes {
    let bytes = if bytes.len() < COUNTED_COPY_BELOW_BYTES { Bytes::copy_from_slice(&bytes) } else { bytes };
    Bytes::from_owner(Counted { bytes, held: held.clone() })
}

/// Records on their way to a socket, possibly from another shard (hence `Send`): shared memory
/// from a tail cache, or a stable range of a segment file (a duplicated descriptor, so it stays
/// valid even if the segment is deleted meanwhile).
#[derive(Debug)]
pub enum Records {
    Memory(Vec<Bytes>),
    File { fd: OwnedFd, position: u64, len: u32 },
}

impl Records {
    pub fn len(&self) -> usize {
        match self {
            Records::Memory(chunks) => chunks.iter().map(Bytes::len).sum(),
            Records::File { len, .. } => *len as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl skein_net::RecordsLen for Records {
    fn records_len(&self) -> usize {
        self.len()
    }
}

/// One partition's part of a fetch.
#[derive(Debug)]
pub struct FetchOutcome {
    pub error: ErrorCode,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub records: Records,
}

impl FetchOutcome {
    pub fn error(error: ErrorCode) -> FetchOutcome {
        FetchOutcome { error, high_watermark: 0, log_start_offset: 0, records: Records::Memory(Vec::new()) }
    }
}

/// Spends a fetch's byte budget over outcomes read at once, in request order, as reading them
/// one after another would have: each is kept while it fits what is left; a read always
/// returns at least one whole batch, so one larger than what is left is kept only if nothing
/// was kept before it (a fetch always makes progress), else its records are dropped (the
/// consumer fetches them next time); after that nothing more is kept. The high watermarks and
/// errors stay. The response is then at most `budget`, or one first batch larger than it.
pub fn spend_budget<'a>(outcomes: impl IntoIterator<Item = &'a mut FetchOutcome>, budget: usize) {
    let mut left = budget;
    let mut kept_any = false;
    for outcome in outcomes {
        let len = outcome.records.len();
        if len == 0 {
            continue;
        }
        if len <= left {
            left -= len;
            kept_any = true;
        } else if !kept_any {
            left = 0;
            kept_any = true;
        } else {
            outcome.records = Records::Memory(Vec::new());
            left = 0;
        }
    }
}

/// What reading `reads` one after another returns, each with its own limit or what the reads
/// before it left of `budget` if less, with up to `at_once` reads in flight.
///
/// `bound` gives a read's own limit, the most its log could return (the bytes it holds) and
/// its largest batch; `len` the bytes a read returned, which may exceed its limit (a first
/// batch is returned whole). Each read in flight holds a share of the budget, the most it can
/// return (its limit, or a first batch if larger, and never more than its log holds), which
/// its actual length replaces once it is done. A read starts once what is not held
/// covers its own limit or its whole log (it then returns what the sequential pass would
/// have), or once nothing is in flight (what is left is then exactly what the sequential pass
/// would give it). One read at a time made a fetch of thousands of small cold partitions wait
/// for each disk read in turn: a consumer of 10,000 partitions of 10 KiB on 2 shards, read
/// cold, took 1.54-1.80 s, and 0.63-0.83 s this way.
pub async fn read_within_budget<T, R, Read, Fut>(
    reads: Vec<T>,
    budget: usize,
    at_once: usize,
    bound: impl Fn(&T) -> (usize, usize, usize),
    read: Read,
    len: impl Fn(&R) -> usize,
    empty: impl Fn(&mut R),
) -> Vec<R>
where
    Read: Fn(T, usize) -> Fut,
    Fut: Future<Output = R>,
{
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut outcomes: Vec<Option<R>> = (0..reads.len()).map(|_| None).collect();
    // Each read's own limit and the limit it was started with.
    let mut limits = vec![(0usize, 0usize); reads.len()];
    let mut in_flight = FuturesUnordered::new();
    // Bytes of the budget held: shares of the reads in flight, lengths of the reads done.
    let mut held = 0usize;
    let mut reads = reads.into_iter().enumerate();
    // The next read to start, with its bounds (taken once, when it comes next).
    let mut head = None;
    loop {
        loop {
            if head.is_none() {
                head = reads.next().map(|(index, next)| {
                    let bounds = bound(&next);
                    (index, next, bounds)
                });
            }
            let Some((_, _, (own_limit, log_bytes, batch_max))) = head else {
                break;
            };
            let left = budget.saturating_sub(held);
            let fits = own_limit.min(log_bytes) <= left;
            if !(in_flight.is_empty() || (fits && in_flight.len() < at_once.max(1))) {
                break;
            }
            let (index, next, _) = head.take().expect("checked above");
            let limit = own_limit.min(left);
            let share = if limit == 0 { 0 } else { limit.max(batch_max).min(log_bytes) };
            held += share;
            limits[index] = (own_limit, limit);
            let reading = read(next, limit);
            in_flight.push(async move { (index, share, reading.await) });
        }
        let Some((index, share, outcome)) = in_flight.next().await else {
            break;
        };
        held = held - share + len(&outcome);
        outcomes[index] = Some(outcome);
    }
    let mut outcomes: Vec<R> = outcomes.into_iter().map(|o| o.expect("every read answered")).collect();
    // Where a read returned more than its share (its log grew during the read, or holds
    // batches larger than `batch_max`), the reads after it may have started with more than the
    // sequential pass would give them. Replayed in order against that pass's budget, such a
    // read's outcome is dropped if it goes past what is left, so the response stays within the
    // budget (and one first batch) as that pass's does.
    let mut left = budget;
    for (outcome, &(own_limit, started_with)) in outcomes.iter_mut().zip(&limits) {
        let bytes = len(outcome);
        if bytes > left && started_with > own_limit.min(left) {
            empty(outcome);
            continue;
        }
        left = left.saturating_sub(bytes);
    }
    outcomes
}

/// Reads of one budget-bound fetch a shard has in flight at once ([`Shard::fetch`]).
const FETCH_READS_AT_ONCE: usize = 32;

/// Offset lookups of one ListOffsets call a shard runs at once (a lookup by timestamp may read
/// a time index from disk).
const OFFSET_LOOKUPS_AT_ONCE: usize = 64;

/// A partition this shard owns: its log and its idempotent-producer table.
pub struct Partition {
    pub log: Rc<Log>,
    pub producers: RefCell<ProducerTable>,
    /// Serialises the check-append-record of idempotent batches (and producer snapshots).
    producer_gate: glommio::sync::Semaphore,
    snapshotting: Cell<bool>,
}

impl Partition {
    pub async fn open(
        dir: &std::path::Path,
        config: skein_storage::LogConfig,
    ) -> Result<Partition, StorageError> {
        let log = Log::open(dir, config).await?;
        let producers = producers::load(&log).await?;
        Ok(Partition {
            log: Rc::new(log),
            producers: RefCell::new(producers),
            producer_gate: glommio::sync::Semaphore::new(1),
            snapshotting: Cell::new(false),
        })
    }

    /// After a failed write the log handed the unwritten offsets back: the table may name
    /// batches that are gone, so it is rebuilt from what the log holds.
    pub async fn rebuild_producers(&self) {
        let Ok(_permit) = self.producer_gate.acquire_permit(1).await else { return };
        match producers::load(&self.log).await {
            Ok(table) => {
                *self.producers.borrow_mut() = table;
                tracing::info!(path = %self.log.dir().display(), "producer table rebuilt after a failed write");
            }
            Err(error) => {
                tracing::warn!(path = %self.log.dir().display(), %error, "rebuilding the producer table")
            }
        }
    }

    /// Writes a producer snapshot covering every batch appended so far, once they are all
    /// written (a snapshot never covers a batch a failed write could still drop).
    pub async fn snapshot_producers(&self) -> Result<(), String> {
        let (dir, offset, bytes) = {
            let _permit = self.producer_gate.acquire_permit(1).await.map_err(|_| "closed".to_owned())?;
            let offset = self.log.next_offset();
            if offset > 0 {
                self.log.wait_for_data(offset - 1, Duration::from_secs(10)).await;
            }
            if self.log.visible_offset() < offset {
                return Err("appends not written in 10 s; snapshot skipped".into());
            }
            let mut table = self.producers.borrow_mut();
            table.expire(skein_storage::now_ms());
            table.bytes_since_snapshot = 0;
            (self.log.dir().to_path_buf(), offset, table.encode(offset))
        };
        producers::write_snapshot(&dir, offset, &bytes).await.map_err(|e| e.to_string())
    }
}

/// What crosses threads.
pub type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// A produce whose batches are appended (offsets assigned, in order) and whose
/// acknowledgement can be awaited separately.
pub type ProduceCompletion = LocalFuture<ProducePartitionResponse>;

/// The state of one shard. Lives on that shard's executor only.
pub struct Shard {
    pub id: usize,
    pub shards: usize,
    pub config: Rc<BrokerConfig>,
    /// This shard's metadata image: every topic and its settings, as the records applied so
    /// far say (the controller shard's is the one new records are checked against).
    image: RefCell<MetadataImage>,
    /// Topics whose partitions are prepared here but not yet committed.
    preparing: RefCell<std::collections::HashSet<String>>,
    /// One reconciliation at a time: two would open the same partition twice.
    reconcile_gate: glommio::sync::Semaphore,
    /// The partitions this shard owns, by topic, indexed by partition.
    logs: RefCell<HashMap<String, Vec<Option<Rc<Partition>>>>>,
    /// The consumer groups this shard coordinates, and the offsets partitions it owns.
    pub coordinator: RefCell<Coordinator>,
    pub offsets: RefCell<HashMap<u32, Rc<OffsetsPartition>>>,
    /// Producer ids, on the controller shard (0) only.
    producer_ids: RefCell<Option<ProducerIdAllocator>>,
    /// This shard's end of the cross-shard mesh.
    pub mesh: Mesh,
    /// Which shard holds each partition of every topic this node knows.
    router: RefCell<PartitionTable>,
    /// The metadata store, on the controller shard (0) only.
    controller: RefCell<Option<FileMetadataStore>>,
    /// Serialises topic changes on the controller.
    controller_gate: glommio::sync::Semaphore,
    /// Connections this shard serves now.
    pub connections: Cell<usize>,
    /// The broker's connections against `connections_max`, every shard's together.
    pub connection_slots: std::sync::Arc<crate::config::ConnectionSlots>,
    /// The memory this shard's connections may hold for request frames in progress.
    pub request_memory: Rc<crate::request_memory::RequestMemory>,
    /// Bytes read from disk into fetch responses not yet sent (and dropped), whichever thread
    /// drops them; see [`Shard::fetch_partition`].
    pub fetch_memory: Arc<AtomicUsize>,
    /// What this shard did, for `/metrics` (see [`crate::metrics`]).
    pub metrics: crate::metrics::ShardMetrics,
    pub shutting_down: Cell<bool>,
    /// The address clients reach this broker at (Metadata responses).
    pub advertised: RefCell<(String, u16)>,
    /// The port of this broker's QUIC listener, once its endpoint is up (Metadata v2 says it).
    pub quic_port: Cell<Option<u16>>,
}

impl Shard {
    pub fn new(
        id: usize,
        config: Rc<BrokerConfig>,
        senders: Senders<MeshMessage>,
        controller: Option<(FileMetadataStore, ProducerIdAllocator)>,
        connection_slots: std::sync::Arc<crate::config::ConnectionSlots>,
    ) -> Shard {
        let advertised = (config.listen.ip().to_string(), config.listen.port());
        let (controller, producer_ids) = match controller {
            Some((store, ids)) => (Some(store), Some(ids)),
            None => (None, None),
        };
        let member_prefix = format!("{:x}-{id}", skein_storage::now_ms());
        let fetch_memory = Arc::new(AtomicUsize::new(0));
        // `server::start` resolves the budget from memory before any shard starts.
        let request_memory = crate::request_memory::RequestMemory::new(
            (config.request_memory_max.unwrap_or(crate::preflight::REQUEST_MEMORY_SHARD_MIN)
                / config.cores.max(1) as u64) as usize,
        );
        Shard {
            id,
            shards: config.cores,
            config,
            image: RefCell::new(MetadataImage::default()),
            preparing: RefCell::new(std::collections::HashSet::new()),
            reconcile_gate: glommio::sync::Semaphore::new(1),
            logs: RefCell::new(HashMap::new()),
            coordinator: RefCell::new(Coordinator::new(member_prefix)),
            offsets: RefCell::new(HashMap::new()),
            producer_ids: RefCell::new(producer_ids),
            mesh: Mesh::new(ShardId::from_index(id), senders),
            router: RefCell::new(PartitionTable::default()),
            controller: RefCell::new(controller),
            controller_gate: glommio::sync::Semaphore::new(1),
            connections: Cell::new(0),
            connection_slots,
            request_memory,
            fetch_memory,
            metrics: crate::metrics::ShardMetrics::default(),
            shutting_down: Cell::new(false),
            advertised: RefCell::new(advertised),
            quic_port: Cell::new(None),
        }
    }

    /// Every topic of this shard's metadata image, with its settings.
    pub fn topics(&self) -> std::cell::Ref<'_, BTreeMap<String, TopicConfig>> {
        std::cell::Ref::map(self.image.borrow(), |image| &image.topics)
    }

    /// The shard holding a partition this node knows, and its shared topic-partition (from
    /// the partition table, never a hash at the call).
    pub fn route(&self, topic: &str, partition: u32) -> Option<(usize, TopicPartition)> {
        self.router.borrow().route(topic, partition).map(|(shard, tp)| (shard.index(), tp))
    }

    /// The partitions of a topic placed on this shard.
    fn placed_here(&self, name: &str, partitions: u32) -> Vec<u32> {
        crate::router::placed_on(name, partitions, self.shards, ShardId::from_index(self.id))
    }

    /// A partition this shard owns.
    pub fn partition(&self, topic: &str, partition: u32) -> Option<Rc<Partition>> {
        self.logs.borrow().get(topic).and_then(|logs| logs.get(partition as usize).cloned().flatten())
    }

    /// The log of a partition this shard owns.
    pub fn log(&self, topic: &str, partition: u32) -> Option<Rc<Log>> {
        self.partition(topic, partition).map(|p| p.log.clone())
    }

    /// Every partition this shard owns.
    pub fn all_partitions(&self) -> Vec<(String, u32, Rc<Partition>)> {
        let logs = self.logs.borrow();
        let mut all = Vec::new();
        for (topic, partitions) in logs.iter() {
            for (partition, owned) in partitions.iter().enumerate() {
                if let Some(owned) = owned {
                    all.push((topic.clone(), partition as u32, owned.clone()));
                }
            }
        }
        all
    }

    /// Every log this shard owns.
    pub fn all_logs(&self) -> Vec<(String, u32, Rc<Log>)> {
        self.all_partitions()
            .into_iter()
            .map(|(topic, partition, owned)| (topic, partition, owned.log.clone()))
            .collect()
    }

    /// Applies a committed batch of metadata records to this shard's image (the one pure
    /// `apply` of skein-replication), updates the partition table from what changed, and
    /// reconciles the partitions open here with the new image. A record that does not fit the
    /// image is an error and changes nothing; a partition that fails to open is an error here
    /// and is retried by [`Shard::reconcile_loop`].
    pub async fn apply_records(&self, records: &[MetadataRecord]) -> Result<(), String> {
        let deltas = metadata_apply(&mut self.image.borrow_mut(), records).map_err(|e| e.to_string())?;
        for delta in &deltas {
            match delta {
                Delta::TopicCreated { name, config, .. } => {
                    self.router.borrow_mut().assign(name, config.partitions, self.shards);
                    self.preparing.borrow_mut().remove(name);
                }
                Delta::TopicDeleted { name, .. } => self.router.borrow_mut().remove(name),
                // More partitions: the table learns them; reconciling opens those placed here.
                // New settings take effect at once on the open partitions.
                Delta::TopicChanged { name, after, .. } => {
                    self.router.borrow_mut().assign(name, after.partitions, self.shards);
                    let log_config = self.config.log_config(after);
                    for partition in self.logs.borrow().get(name).into_iter().flatten().flatten() {
                        if let Err(error) = partition.log.set_config(log_config) {
                            // The controller checked the same rules; a mismatch is a bug.
                            tracing::error!(topic = name, %error, "new settings refused by a partition");
                        }
                    }
                }
                // A single node's controller makes no broker or partition records yet (every
                // partition is led here); the replica manager will act on these.
                Delta::ProducerIdsReserved { .. }
                | Delta::BrokerChanged { .. }
                | Delta::PartitionChanged { .. } => {}
            }
        }
        self.reconcile().await
    }

    /// Opens every partition of the image placed here that is not open, and closes (and
    /// removes) every open topic that is not in the image; see [`crate::reconcile`].
    pub async fn reconcile(&self) -> Result<(), String> {
        let _one_at_a_time = self.reconcile_gate.acquire_permit(1).await.map_err(|e| e.to_string())?;
        let plan = {
            let open: BTreeMap<String, Vec<u32>> = self
                .logs
                .borrow()
                .iter()
                .map(|(name, logs)| {
                    (name.clone(), (0..logs.len() as u32).filter(|&p| logs[p as usize].is_some()).collect())
                })
                .collect();
            reconcile::plan(
                &self.image.borrow(),
                ShardId::from_index(self.id),
                self.shards,
                &open,
                &self.preparing.borrow(),
            )
        };
        let mut failure = None;
        for (name, config, partitions) in plan.open {
            match self.open_partitions(&name, &config, partitions).await {
                Ok(opened) => {
                    // The topic's settings may have changed while the partitions opened (a
                    // TopicChanged applied meanwhile reached only the logs already installed).
                    let current = self.image.borrow().topics.get(&name).cloned();
                    if let Some(current) = current.filter(|c| *c != config) {
                        for (_, partition) in &opened {
                            if let Err(error) = partition.log.set_config(self.config.log_config(&current)) {
                                tracing::error!(topic = name, %error, "new settings refused by a partition");
                            }
                        }
                    }
                    self.install(&name, config.partitions, opened)
                }
                Err(error) => {
                    tracing::warn!(topic = name, shard = self.id, %error, "a partition could not be opened; retrying");
                    failure.get_or_insert(format!("opening topic {name}: {error}"));
                }
            }
        }
        for name in plan.close {
            self.close_topic(&name).await;
        }
        failure.map_or(Ok(()), Err)
    }

    /// Reconciles again every few seconds (retrying partitions that failed to open), until the
    /// shard shuts down.
    pub async fn reconcile_loop(self: Rc<Self>) {
        loop {
            glommio::timer::sleep(RECONCILE_EVERY).await;
            if self.shutting_down.get() {
                return;
            }
            let _ = self.reconcile().await;
        }
    }

    /// Opens (recovering them) the given partitions of a topic, all or nothing: on a failure
    /// those opened are closed again and the first error is returned.
    async fn open_partitions(
        &self,
        name: &str,
        config: &TopicConfig,
        partitions: Vec<u32>,
    ) -> Result<Vec<(u32, Rc<Partition>)>, StorageError> {
        use futures::stream::StreamExt;
        // Several at once: each open is mostly waiting for io_uring (reads, syncs).
        let results: Vec<(u32, Result<Partition, StorageError>)> = futures::stream::iter(partitions)
            .map(|partition| async move {
                let dir = partition_dir(&self.config.data_dir, name, partition);
                (partition, Partition::open(&dir, self.config.log_config(config)).await)
            })
            .buffer_unordered(OPENING_AT_ONCE)
            .collect()
            .await;
        let mut opened = Vec::with_capacity(results.len());
        let mut failure = None;
        for (partition, result) in results {
            match result {
                Ok(partition_log) => opened.push((partition, Rc::new(partition_log))),
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failure {
            for (_, partition) in opened {
                let _ = partition.log.shutdown().await;
            }
            return Err(error);
        }
        Ok(opened)
    }

    /// Puts opened partitions in the table of logs.
    fn install(&self, name: &str, partitions: u32, opened: Vec<(u32, Rc<Partition>)>) {
        let mut logs = self.logs.borrow_mut();
        let slots = logs.entry(name.to_owned()).or_default();
        if slots.len() < partitions as usize {
            slots.resize(partitions as usize, None);
        }
        for (partition, log) in opened {
            slots[partition as usize] = Some(log);
        }
    }

    /// Creates the partitions of a new topic placed on this shard, before the topic is
    /// committed (the prepare step of an all-or-nothing creation). If one cannot be created
    /// (no space, no descriptors, an I/O error), those created are closed and their directories
    /// removed, and the error names the cause. Until the topic's record is applied the
    /// partitions serve nothing (the partition table does not know them).
    async fn create_partitions(&self, name: &str, config: &TopicConfig) -> Result<(), StorageError> {
        let owned = self.placed_here(name, config.partitions);
        // The topic is new: anything in its directories is left from an earlier topic of that
        // name whose deletion did not finish.
        for &partition in &owned {
            let dir = partition_dir(&self.config.data_dir, name, partition);
            if dir.exists() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        self.preparing.borrow_mut().insert(name.to_owned());
        match self.open_partitions(name, config, owned.clone()).await {
            Ok(opened) => {
                self.install(name, config.partitions, opened);
                Ok(())
            }
            Err(error) => {
                self.preparing.borrow_mut().remove(name);
                for &partition in &owned {
                    let dir = partition_dir(&self.config.data_dir, name, partition);
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(error)
            }
        }
    }

    /// Undoes [`Shard::create_partitions`] of a creation that was called off (unless the topic
    /// made it into the image meanwhile).
    async fn drop_prepared(&self, name: &str) {
        self.preparing.borrow_mut().remove(name);
        if !self.image.borrow().topics.contains_key(name) {
            self.close_topic(name).await;
        }
    }

    /// Closes the logs of a topic this shard owns and deletes their directories.
    ///
    /// The logs close without making anything durable ([`Log::shutdown_for_removal`]),
    /// [`OPENING_AT_ONCE`] at a time, and the directories are removed on a thread of their own,
    /// so that the shard goes on serving its other partitions meanwhile. Before, a topic of
    /// 10,000 partitions took 16.9 s to delete (a sync and a checkpoint per partition, one
    /// after another, and every directory removed on the executor thread).
    async fn close_topic(&self, name: &str) {
        let logs = self.logs.borrow_mut().remove(name).unwrap_or_default();
        let open: Vec<(u32, Rc<Partition>)> =
            logs.into_iter().enumerate().filter_map(|(p, log)| Some((p as u32, log?))).collect();
        let dirs: Vec<PathBuf> = open
            .iter()
            .map(|(partition, _)| partition_dir(&self.config.data_dir, name, *partition))
            .collect();
        use futures::StreamExt;
        futures::stream::iter(open)
            .map(|(partition, log)| async move {
                if let Err(error) = log.log.shutdown_for_removal().await {
                    tracing::warn!(topic = name, partition, %error, "closing a deleted partition");
                }
            })
            .buffer_unordered(OPENING_AT_ONCE)
            .collect::<()>()
            .await;
        remove_dirs(dirs).await;
    }

    /// Runs `call` on shard `target` (here, if it is this shard) and waits for the answer, for
    /// at most `timeout`.
    pub async fn call_within<C: Call + 'static>(
        self: &Rc<Self>,
        target: usize,
        call: C,
        timeout: Duration,
    ) -> Result<C::Reply, MeshError>
    where
        C::Reply: 'static,
    {
        self.call_ordered_within(target, call, timeout).await?.await
    }

    /// [`Shard::call_within`] with the default deadline.
    pub async fn call<C: Call + 'static>(
        self: &Rc<Self>,
        target: usize,
        call: C,
    ) -> Result<C::Reply, MeshError>
    where
        C::Reply: 'static,
    {
        self.call_within(target, call, mesh::CALL_TIMEOUT_DEFAULT).await
    }

    /// Sends `call` to `target` and returns once it is *dispatched* there (for a produce: once
    /// its batches are appended, in order); the returned future gives the answer, by `timeout`
    /// at the latest. Calls from one task to one shard are dispatched in the order they were
    /// sent.
    pub async fn call_ordered_within<C: Call + 'static>(
        self: &Rc<Self>,
        target: usize,
        call: C,
        timeout: Duration,
    ) -> Result<LocalFuture<Result<C::Reply, MeshError>>, MeshError>
    where
        C::Reply: 'static,
    {
        let target_id = ShardId::from_index(target);
        if target == self.id {
            let completion = self.dispatch(call.into_op()).await;
            return Ok(Box::pin(async move {
                C::from_reply(completion.await)
                    .ok_or(MeshError::WrongReply { target: target_id, op: C::NAME })
            }));
        }
        self.mesh.send(target_id, call, timeout).await
    }

    /// Serves the messages from one peer shard until the peer's channel closes (it stopped);
    /// then the calls still waiting for that peer fail at once.
    pub async fn serve_peer(
        self: Rc<Self>,
        peer: usize,
        receiver: glommio::channels::shared_channel::ConnectedReceiver<MeshMessage>,
    ) {
        let peer_id = ShardId::from_index(peer);
        while let Some(message) = receiver.recv().await {
            match message {
                MeshMessage::Request { id, op } => {
                    // Dispatch inline, in arrival order (produce appends happen here); run the
                    // rest in its own task so this loop never waits on another shard.
                    let completion = self.dispatch(op).await;
                    let shard = self.clone();
                    glommio::spawn_local(async move {
                        let reply = completion.await;
                        shard.mesh.reply(peer_id, id, reply).await;
                    })
                    .detach();
                }
                MeshMessage::Reply { id, reply } => self.mesh.deliver(id, reply),
            }
        }
        self.mesh.peer_gone(peer_id);
    }

    /// Runs the ordered part of `op` now and returns the rest as a future.
    async fn dispatch(self: &Rc<Self>, op: Op) -> LocalFuture<Reply> {
        let shard = self.clone();
        match op {
            Op::Produce(mesh::Produce { tp, records, acks, timeout_ms }) => {
                let completion = self.produce(&tp.topic, tp.partition, records, acks, timeout_ms).await;
                Box::pin(async move { Reply::Produce(completion.await) })
            }
            Op::Fetch(mesh::Fetch { reads, bytes_max }) => {
                Box::pin(async move { Reply::Fetch(shard.fetch(reads, bytes_max).await) })
            }
            Op::WaitForData(mesh::WaitForData { partitions, timeout_ms }) => Box::pin(async move {
                shard.wait_for_data(partitions, Duration::from_millis(timeout_ms.into())).await;
                Reply::DataArrived
            }),
            Op::ListOffsets(mesh::ListOffsets { partitions }) => Box::pin(async move {
                use futures::StreamExt;
                // A lookup by timestamp may read a time index from disk: several at once.
                let answers = futures::stream::iter(partitions.into_iter().map(|(tp, timestamp)| {
                    let shard = shard.clone();
                    async move { shard.list_offsets(&tp.topic, tp.partition, timestamp).await }
                }))
                .buffered(OFFSET_LOOKUPS_AT_ONCE)
                .collect()
                .await;
                Reply::ListOffsets(answers)
            }),
            Op::CreateTopics(mesh::CreateTopics(topics)) => {
                Box::pin(async move { Reply::Topics(shard.create_topics(topics).await) })
            }
            Op::DeleteTopics(mesh::DeleteTopics(names)) => {
                Box::pin(async move { Reply::Topics(shard.delete_topics(names).await) })
            }
            Op::AlterConfigs(mesh::AlterConfigs(request)) => {
                Box::pin(async move { Reply::Topics(shard.alter_configs(request).await) })
            }
            Op::CreatePartitions(mesh::CreatePartitions(topics)) => {
                Box::pin(async move { Reply::Topics(shard.add_partitions(topics).await) })
            }
            Op::PrepareCreate(mesh::PrepareCreate { name, config }) => Box::pin(async move {
                match shard.create_partitions(&name, &config).await {
                    Ok(()) => Reply::Created(Ok(())),
                    Err(error) => {
                        tracing::warn!(topic = name, shard = shard.id, %error, "could not create a new topic's partitions");
                        Reply::Created(Err((storage_error_code(&error), error.to_string())))
                    }
                }
            }),
            Op::DropPrepared(mesh::DropPrepared { name }) => Box::pin(async move {
                shard.drop_prepared(&name).await;
                Reply::Applied(Ok(()))
            }),
            Op::ApplyRecords(mesh::ApplyRecords(records)) => {
                Box::pin(async move { Reply::Applied(shard.apply_records(&records).await) })
            }
            Op::InitProducerId(mesh::InitProducerId(request)) => {
                Box::pin(async move { Reply::ProducerId(shard.init_producer_id(request).await) })
            }
            Op::Group(mesh::Group(op)) => Box::pin(async move {
                let topics = |topic: &str| shard.topics().get(topic).map(|c| c.partitions);
                let service = GroupService {
                    coordinator: &shard.coordinator,
                    offsets: &shard.offsets,
                    topics: &topics,
                };
                Reply::Body(service.serve(op).await)
            }),
            Op::ListGroups(mesh::ListGroups) => {
                Box::pin(std::future::ready(Reply::Groups(self.coordinator.borrow().list())))
            }
        }
    }

    /// Appends a partition's records. Every batch is checked before any is appended, so bad
    /// input leaves the partition untouched. Batches of idempotent producers are checked against
    /// the partition's producer table first: a retry of a batch already written is answered
    /// with its original offsets and not appended again (see [`crate::producers`]). Returns once
    /// the batches are appended (offsets assigned); the future resolves with the response once
    /// they are acknowledged.
    pub async fn produce(
        &self,
        topic: &str,
        partition: u32,
        records: BytesMut,
        acks: i8,
        timeout_ms: u32,
    ) -> ProduceCompletion {
        let respond = move |error: ErrorCode, base_offset: u64, last_offset: u64, log_start_offset: u64| {
            ProducePartitionResponse { partition, error, base_offset, last_offset, log_start_offset }
        };
        let Some(owned) = self.partition(topic, partition) else {
            return Box::pin(std::future::ready(respond(ErrorCode::UnknownTopicOrPartition, 0, 0, 0)));
        };
        let log = owned.log.clone();
        let batches = match split_batches(records, log.config().batch_bytes_max) {
            Ok(batches) => batches,
            Err(error) => {
                tracing::info!(topic, partition, %error, "refused a produce batch");
                let code = match error {
                    BatchError::TooLarge { .. } => ErrorCode::BatchTooLarge,
                    _ => ErrorCode::CorruptBatch,
                };
                return Box::pin(std::future::ready(respond(code, 0, 0, log.start_offset())));
            }
        };
        let idempotent = batches.iter().any(|b| b.header().producer_id >= 0);
        let permit = if idempotent {
            match owned.producer_gate.acquire_permit(1).await {
                Ok(permit) => Some(permit),
                Err(_) => return Box::pin(std::future::ready(respond(ErrorCode::ShuttingDown, 0, 0, 0))),
            }
        } else {
            None
        };
        let mut acks_pending: Vec<AppendAck> = Vec::with_capacity(batches.len());
        let (mut base_offset, mut last_offset) = (None, 0);
        // The newest offset a duplicate refers to: its acknowledgement is awaited too.
        let mut duplicate_through: Option<u64> = None;
        // Every batch is checked before any is appended: the request is written whole or not.
        let checks = if idempotent {
            let headers: Vec<batch::BatchHeader> = batches.iter().map(|b| *b.header()).collect();
            owned.producers.borrow().check_all(&headers)
        } else {
            vec![Check::Append; batches.len()]
        };
        if let Some((header, code)) = batches.iter().zip(&checks).find_map(|(b, c)| match c {
            Check::Reject(code) => Some((*b.header(), *code)),
            _ => None,
        }) {
            tracing::info!(
                topic,
                partition,
                producer = header.producer_id,
                epoch = header.producer_epoch,
                sequence = header.base_sequence,
                %code,
                "refused an idempotent batch"
            );
            return Box::pin(std::future::ready(respond(code, 0, 0, log.start_offset())));
        }
        for (batch, check) in batches.into_iter().zip(checks) {
            let header = *batch.header();
            if let Check::Duplicate { base_offset: base, last_offset: last } = check {
                tracing::info!(
                    topic,
                    partition,
                    producer = header.producer_id,
                    base,
                    "duplicate batch answered with its offsets"
                );
                base_offset.get_or_insert(base);
                last_offset = last;
                duplicate_through = Some(duplicate_through.map_or(last, |d: u64| d.max(last)));
                continue;
            }
            let (records, bytes) = (header.record_count, batch.len());
            match log.append_validated(batch).await {
                Ok(appended) => {
                    self.metrics.produced(records, bytes);
                    owned.producers.borrow_mut().record(
                        &header,
                        appended.base_offset,
                        skein_storage::now_ms(),
                    );
                    base_offset.get_or_insert(appended.base_offset);
                    last_offset = appended.last_offset;
                    acks_pending.push(appended.ack);
                }
                Err(error) => {
                    let code = storage_error_code(&error);
                    tracing::warn!(topic, partition, %error, "append failed");
                    return Box::pin(std::future::ready(respond(code, 0, 0, log.start_offset())));
                }
            }
        }
        drop(permit);
        if owned.producers.borrow().bytes_since_snapshot >= producers::SNAPSHOT_INTERVAL_BYTES
            && !owned.snapshotting.replace(true)
        {
            let owned = owned.clone();
            glommio::spawn_local(async move {
                if let Err(error) = owned.snapshot_producers().await {
                    tracing::warn!(path = %owned.log.dir().display(), error, "writing a producer snapshot");
                }
                owned.snapshotting.set(false);
            })
            .detach();
        }
        let base_offset = base_offset.expect("at least one batch");
        let log_start = log.start_offset();
        if acks == skein_net::acks::NONE {
            return Box::pin(std::future::ready(respond(
                ErrorCode::None,
                base_offset,
                last_offset,
                log_start,
            )));
        }
        let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
        let owned = idempotent.then_some(owned);
        Box::pin(async move {
            let all = futures::future::try_join_all(acks_pending);
            let acknowledged = async {
                all.await?;
                // A duplicate is answered once the original is acknowledged.
                if let Some(through) = duplicate_through {
                    log.wait_for_data(through, timeout).await;
                    if log.visible_offset() <= through {
                        return Ok(false);
                    }
                }
                Ok(true)
            };
            match glommio::timer::timeout(timeout, async { Ok(acknowledged.await) }).await {
                Ok(Ok(true)) => respond(ErrorCode::None, base_offset, last_offset, log_start),
                Ok(Err(error)) => {
                    if let Some(owned) = owned {
                        owned.rebuild_producers().await;
                    }
                    respond(storage_error_code(&error), 0, 0, log_start)
                }
                Ok(Ok(false)) | Err(_) => {
                    tracing::warn!(state = log.describe_state(), "produce not acknowledged in time");
                    respond(ErrorCode::RequestTimedOut, 0, 0, log_start)
                }
            }
        })
    }

    /// Reads from partitions this shard owns, each within its own limit and all within
    /// `bytes_max` (the first partition with data always gets at least one batch).
    /// Reads each partition once for a fetch, spending `bytes_max` in request order. When the
    /// partitions' own limits together fit the budget (a consumer's usual fetch: 4 partitions
    /// of 4 MiB in 32 MiB), they are read at once, so the disk reads of cold ranges overlap,
    /// and then [`spend_budget`] drops what a read of a batch larger than its limit would
    /// carry past the budget; otherwise each is given what the ones before it leave, as if read
    /// one after another, with many in flight at once ([`read_within_budget`]).
    pub async fn fetch(&self, reads: Vec<mesh::FetchRead>, bytes_max: u32) -> Vec<FetchOutcome> {
        let wanted: u64 = reads.iter().map(|r| u64::from(r.partition_bytes_max)).sum();
        if wanted <= u64::from(bytes_max) {
            let all = reads.into_iter().map(|read| {
                let limit = read.partition_bytes_max as usize;
                self.fetch_partition(read, limit)
            });
            let mut outcomes = futures::future::join_all(all).await;
            spend_budget(outcomes.iter_mut(), bytes_max as usize);
            return outcomes;
        }
        self.fetch_within_budget(reads, bytes_max as usize).await
    }

    /// The reads of a fetch whose partitions' limits together exceed its budget
    /// ([`read_within_budget`]).
    async fn fetch_within_budget(&self, reads: Vec<mesh::FetchRead>, budget: usize) -> Vec<FetchOutcome> {
        // A log's batches are at most its topic's `max.message.bytes`, unless that was lowered
        // after larger ones were written (or a follower took larger ones from its leader): a
        // read may then return more than its share, and `read_within_budget` keeps the
        // response within the budget all the same.
        let bound = |read: &mesh::FetchRead| {
            let log = self.log(read.tp.topic(), read.tp.partition);
            let log_bytes =
                log.as_ref().map_or(0, |log| usize::try_from(log.size_bytes()).unwrap_or(usize::MAX));
            let batch_max = log.map_or(0, |log| log.config().batch_bytes_max);
            (read.partition_bytes_max as usize, log_bytes, batch_max)
        };
        read_within_budget(
            reads,
            budget,
            FETCH_READS_AT_ONCE,
            bound,
            |read, limit| self.fetch_partition(read, limit),
            |outcome| outcome.records.len(),
            |outcome| outcome.records = Records::Memory(Vec::new()),
        )
        .await
    }

    /// One partition's part of a fetch: at most `limit` bytes from `offset`.
    async fn fetch_partition(&self, read: mesh::FetchRead, limit: usize) -> FetchOutcome {
        let mesh::FetchRead { tp, offset, .. } = read;
        let (topic, partition) = (tp.topic(), tp.partition);
        let Some(log) = self.log(topic, partition) else {
            return FetchOutcome::error(ErrorCode::UnknownTopicOrPartition);
        };
        let high_watermark = log.visible_offset();
        let log_start_offset = log.start_offset();
        if limit == 0 || offset == high_watermark {
            return FetchOutcome {
                error: ErrorCode::None,
                high_watermark,
                log_start_offset,
                records: Records::Memory(Vec::new()),
            };
        }
        // Through the partition-log trait: never past the high watermark (on one node the
        // log's acked offset; in a cluster the replicas' high watermark).
        let outcome = match PartitionLog::read(&*log, offset, limit, high_watermark).await {
            Ok(slice) => {
                let records = match slice.data {
                    LogData::Empty => Ok(Records::Memory(Vec::new())),
                    LogData::Memory(chunks) => Ok(Records::Memory(chunks)),
                    LogData::File(range) => {
                        // Zero-copy from the page cache when the range is there; otherwise
                        // (every range written with O_DIRECT and not read since) read with
                        // O_DIRECT and read ahead: a cold `sendfile` reads in small pieces.
                        let (position, len) = (range.position(), range.len());
                        match range.open_buffered() {
                            Ok(fd)
                                if crate::sendfile::in_page_cache(
                                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                                    position,
                                    len,
                                ) =>
                            {
                                Ok(Records::File { fd, position, len: len as u32 })
                            }
                            // A cold range is read into memory that stays until the response
                            // is sent: as long as the consumer takes to read it, and a consumer
                            // that stops reading keeps its responses for as long as it stays
                            // connected. Over the shard's bound (its request memory), the range
                            // goes out from the page cache instead (`sendfile`, read ahead by
                            // the kernel), which holds no memory of the broker's: 40 stopped
                            // consumers of a cold topic held 1.0 GB of responses before.
                            Ok(fd) if !self.reserve_fetch_memory(len) => {
                                self.metrics.fetch_memory_fallback();
                                Ok(Records::File { fd, position, len: len as u32 })
                            }
                            Ok(_) => match log.read_range_parts(&range).await {
                                // `counted` copies a short part out of the read-ahead piece it
                                // is a view of, so that what is counted is what is held.
                                Ok(parts) => Ok(Records::Memory(
                                    parts.into_iter().map(|part| counted(part, &self.fetch_memory)).collect(),
                                )),
                                Err(error) => {
                                    self.fetch_memory.fetch_sub(len, Ordering::Relaxed);
                                    Err(error)
                                }
                            },
                            Err(error) => Err(error),
                        }
                    }
                };
                match records {
                    Ok(records) => {
                        FetchOutcome { error: ErrorCode::None, high_watermark, log_start_offset, records }
                    }
                    Err(error) => FetchOutcome::error(storage_error_code(&error)),
                }
            }
            Err(error) => {
                if !matches!(error, StorageError::OffsetOutOfRange { .. }) {
                    tracing::warn!(topic, partition, %error, "fetch failed");
                }
                FetchOutcome {
                    records: Records::Memory(Vec::new()),
                    ..FetchOutcome::error(storage_error_code(&error))
                }
            }
        };
        FetchOutcome { high_watermark, log_start_offset, ..outcome }
    }

    /// Counts `len` more bytes of cold reads into responses, if they fit in the shard's bound
    /// (its request memory's size); a fetch takes at least one range whatever its size when
    /// nothing else is held.
    fn reserve_fetch_memory(&self, len: usize) -> bool {
        let bound = self.request_memory.capacity();
        self.fetch_memory
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held == 0 || held + len <= bound).then_some(held + len)
            })
            .is_ok()
    }

    /// Waits until any listed partition has records after its offset, or `timeout` passes.
    pub async fn wait_for_data(&self, partitions: Vec<(TopicPartition, u64)>, timeout: Duration) {
        let waits: Vec<LocalFuture<u64>> = partitions
            .into_iter()
            .filter_map(|(tp, offset)| {
                let log = self.log(tp.topic(), tp.partition)?;
                Some(Box::pin(async move { log.wait_for_data(offset, timeout).await }) as LocalFuture<u64>)
            })
            .collect();
        if waits.is_empty() {
            glommio::timer::sleep(timeout).await;
            return;
        }
        futures::future::select_all(waits).await;
    }

    pub async fn list_offsets(
        &self,
        topic: &str,
        partition: u32,
        timestamp: i64,
    ) -> ListOffsetsPartitionResponse {
        let respond = |error, offset| ListOffsetsPartitionResponse { partition, error, offset };
        let Some(log) = self.log(topic, partition) else {
            return respond(ErrorCode::UnknownTopicOrPartition, -1);
        };
        match timestamp {
            skein_net::LATEST_TIMESTAMP => respond(ErrorCode::None, log.visible_offset() as i64),
            skein_net::EARLIEST_TIMESTAMP => respond(ErrorCode::None, log.start_offset() as i64),
            t if t < 0 => respond(ErrorCode::MalformedRequest, -1),
            t => match log.offset_for_timestamp(t).await {
                Ok(found) => respond(ErrorCode::None, found.map_or(-1, |o| o as i64)),
                Err(error) => respond(storage_error_code(&error), -1),
            },
        }
    }

    /// On the controller: each topic becomes a record (skein-replication's controller rules),
    /// is created all or nothing, persisted, and applied on every shard.
    async fn create_topics(self: &Rc<Self>, topics: Vec<NewTopic>) -> Vec<TopicResult> {
        let _permit = self.controller_gate.acquire_permit(1).await.expect("never closed");
        let defaults = self.topic_defaults();
        let mut results = Vec::with_capacity(topics.len());
        for topic in topics {
            let record = controller::create_topic(
                &self.image.borrow(),
                &topic.name,
                crate::metadata::random_topic_id(),
                topic.partitions,
                &topic.configs,
                &defaults,
                skein_storage::now_ms(),
            );
            let outcome = match record {
                Ok(record) => self.create_topic(record).await,
                Err(error) => Err((error.code(), error.to_string())),
            };
            match outcome {
                Ok(partitions) => {
                    tracing::info!(topic = topic.name, partitions, "topic created");
                    results.push(TopicResult {
                        name: topic.name,
                        error: ErrorCode::None,
                        message: String::new(),
                    });
                }
                Err((error, message)) => {
                    tracing::warn!(topic = topic.name, %error, message, "topic not created");
                    results.push(TopicResult { name: topic.name, error, message });
                }
            }
        }
        results
    }

    /// The settings a new topic gets for what its request leaves out (and a reset gets back).
    fn topic_defaults(&self) -> TopicDefaults {
        TopicDefaults {
            segment_bytes: self.config.default_segment_bytes,
            retention_ms: self.config.default_retention.map(|d| d.as_millis() as u64),
            max_message_bytes: self.config.default_max_message_bytes,
        }
    }

    /// On the controller: creates a topic all or nothing. Every shard creates its partitions
    /// first (prepare); only when all did is the topic written to the metadata (so a crash in
    /// between leaves directories that the next start removes, never a topic without
    /// partitions); then its record is applied on every shard. If any shard fails, or the
    /// metadata cannot be written, the partitions created are removed again and the error
    /// says why. Returns the partition count.
    async fn create_topic(self: &Rc<Self>, record: MetadataRecord) -> Result<u32, (ErrorCode, String)> {
        let MetadataRecord::TopicCreated { name, id, config } = &record else {
            unreachable!("controller::create_topic makes TopicCreated records")
        };
        let (name, id, config) = (name.clone(), *id, config.clone());
        check_space_for(&self.config.data_dir, config.partitions)?;
        let replies = {
            let calls: Vec<_> = (0..self.shards)
                .map(|target| {
                    self.call(target, mesh::PrepareCreate { name: name.clone(), config: config.clone() })
                })
                .collect();
            futures::future::join_all(calls).await
        };
        let mut failure = None;
        for (shard, reply) in replies.into_iter().enumerate() {
            match reply {
                Ok(Ok(())) => {}
                Ok(Err((code, message))) => {
                    failure.get_or_insert((
                        code,
                        format!("creating the partitions of {name} on shard {shard}: {message}"),
                    ));
                }
                Err(error) => {
                    failure
                        .get_or_insert((error.code(), format!("creating the partitions of {name}: {error}")));
                }
            }
        }
        if failure.is_none() {
            let (stored_name, stored) = (name.clone(), config.clone());
            if let Err(error) = self.persist(move |store| store.create_topic(&stored_name, id, stored)).await
            {
                failure = Some((error.code(), error.to_string()));
            }
        }
        if let Some(failure) = failure {
            self.broadcast(|| mesh::DropPrepared { name: name.clone() }).await;
            let _ = std::fs::remove_dir_all(self.config.data_dir.join("topics").join(&name));
            return Err(failure);
        }
        // Committed: every shard applies the record (the partitions are open already).
        self.broadcast(|| mesh::ApplyRecords(vec![record.clone()])).await;
        Ok(config.partitions)
    }

    /// On the controller: grows each topic to its partition count. The change is stored, then
    /// applied on every shard, which opens (creates) the new partitions placed on it; a shard
    /// that cannot yet retries every few seconds (its new partitions answer
    /// `UnknownTopicOrPartition`, retriable, meanwhile).
    async fn add_partitions(self: &Rc<Self>, topics: Vec<(String, u32)>) -> Vec<TopicResult> {
        let _permit = self.controller_gate.acquire_permit(1).await.expect("never closed");
        let mut results = Vec::with_capacity(topics.len());
        for (name, total) in topics {
            // The image is borrowed only to build the record, never across the await.
            let record = controller::add_partitions(&self.image.borrow(), &name, total);
            let change = format!("{total} partitions");
            results.push(self.change_topic(name, record, false, change).await);
        }
        results
    }

    /// On the controller: the answer for one topic of a CreatePartitions or AlterConfigs, from
    /// the controller rule's record (stored and applied unless `dry_run`) or its refusal.
    async fn change_topic(
        self: &Rc<Self>,
        name: String,
        record: Result<MetadataRecord, MetadataError>,
        dry_run: bool,
        change: String,
    ) -> TopicResult {
        let outcome = match record {
            Ok(_) if dry_run => Ok(()),
            Ok(record) => self.store_topic_change(record).await,
            Err(error) => Err((error.code(), error.to_string())),
        };
        match outcome {
            Ok(()) => {
                if !dry_run {
                    tracing::info!(topic = name, change, "topic changed");
                }
                TopicResult { name, error: ErrorCode::None, message: String::new() }
            }
            Err((error, message)) => {
                tracing::warn!(topic = name, change, %error, message, "topic not changed");
                TopicResult { name, error, message }
            }
        }
    }

    /// On the controller: stores a TopicChanged record, then has every shard apply it.
    async fn store_topic_change(self: &Rc<Self>, record: MetadataRecord) -> Result<(), (ErrorCode, String)> {
        let MetadataRecord::TopicChanged { name, config } = &record else {
            unreachable!("the controller makes TopicChanged records for topic changes")
        };
        let added = config.partitions - self.image.borrow().topics.get(name).map_or(0, |c| c.partitions);
        if added > 0 {
            check_space_for(&self.config.data_dir, added)?;
        }
        let (stored_name, stored) = (name.clone(), config.clone());
        self.persist(move |store| store.update_topic(&stored_name, stored))
            .await
            .map_err(|error| (error.code(), error.to_string()))?;
        self.broadcast(|| mesh::ApplyRecords(vec![record.clone()])).await;
        Ok(())
    }

    /// On the controller: changes each topic's settings (all of a topic's changes or none),
    /// stored, then applied on every shard; `validate_only` checks and changes nothing.
    async fn alter_configs(self: &Rc<Self>, request: skein_net::AlterConfigsRequest) -> Vec<TopicResult> {
        let _permit = self.controller_gate.acquire_permit(1).await.expect("never closed");
        let defaults = self.topic_defaults();
        let mut results = Vec::with_capacity(request.topics.len());
        for topic in request.topics {
            let record = controller::alter_topic_config(
                &self.image.borrow(),
                &topic.name,
                &topic.set,
                &topic.reset,
                &defaults,
            );
            let change = format!("set {:?}, reset {:?}", topic.set, topic.reset);
            results.push(self.change_topic(topic.name, record, request.validate_only, change).await);
        }
        results
    }

    pub async fn request_alter_configs(
        self: &Rc<Self>,
        request: skein_net::AlterConfigsRequest,
    ) -> Vec<TopicResult> {
        let names = request.topics.iter().map(|t| t.name.clone()).collect();
        self.topics_on_controller(names, mesh::AlterConfigs(request)).await
    }

    pub async fn request_create_partitions(self: &Rc<Self>, topics: Vec<(String, u32)>) -> Vec<TopicResult> {
        let names = topics.iter().map(|(name, _)| name.clone()).collect();
        self.topics_on_controller(names, mesh::CreatePartitions(topics)).await
    }

    async fn delete_topics(self: &Rc<Self>, names: Vec<String>) -> Vec<TopicResult> {
        let _permit = self.controller_gate.acquire_permit(1).await.expect("never closed");
        let mut results = Vec::with_capacity(names.len());
        for name in names {
            let record = match controller::delete_topic(&self.image.borrow(), &name) {
                Ok(record) => record,
                Err(error) => {
                    results.push(TopicResult { name, error: error.code(), message: error.to_string() });
                    continue;
                }
            };
            let deleted = name.clone();
            match self.persist(move |store| store.delete_topic(&deleted).map(|_| ())).await {
                Ok(()) => {
                    // Every shard applies it: closes and removes its partitions of the topic.
                    self.broadcast(|| mesh::ApplyRecords(vec![record.clone()])).await;
                    remove_dirs(vec![self.config.data_dir.join("topics").join(&name)]).await;
                    tracing::info!(topic = name, "topic deleted");
                    results.push(TopicResult { name, error: ErrorCode::None, message: String::new() });
                }
                Err(error) => {
                    results.push(TopicResult { name, error: error.code(), message: error.to_string() })
                }
            }
        }
        results
    }

    /// Runs a change on the metadata store off the executor thread (it writes and syncs files).
    async fn persist(
        &self,
        change: impl FnOnce(&mut FileMetadataStore) -> Result<(), MetadataError> + Send + 'static,
    ) -> Result<(), MetadataError> {
        off_executor(&self.controller, change).await
    }

    /// Sends a metadata change to every shard (this one included) and waits for all to apply
    /// it; a shard that cannot be reached or fails is logged (a stopping shard reads the
    /// metadata again when it starts; a partition that failed to open is retried by its
    /// shard's reconcile loop).
    async fn broadcast<C>(self: &Rc<Self>, change: impl Fn() -> C)
    where
        C: Call<Reply = Result<(), String>> + 'static,
    {
        let calls: Vec<_> = (0..self.shards).map(|target| self.call(target, change())).collect();
        for (target, result) in futures::future::join_all(calls).await.into_iter().enumerate() {
            match result {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(shard = target, %error, "a shard did not apply a metadata change")
                }
                Err(error) => {
                    tracing::warn!(shard = target, %error, "a shard did not apply a metadata change")
                }
            }
        }
    }

    /// Forwards topic creation to the controller shard.
    pub async fn request_create_topics(self: &Rc<Self>, topics: Vec<NewTopic>) -> Vec<TopicResult> {
        let names = topics.iter().map(|t| t.name.clone()).collect();
        self.topics_on_controller(names, mesh::CreateTopics(topics)).await
    }

    /// On the controller: a new producer id, or the next epoch of the one the client holds.
    async fn init_producer_id(&self, request: InitProducerIdRequest) -> InitProducerIdResponse {
        let respond = |error, producer_id, producer_epoch| InitProducerIdResponse {
            error,
            producer_id,
            producer_epoch,
        };
        if request.producer_id >= 0 && (0..i16::MAX).contains(&request.producer_epoch) {
            return respond(ErrorCode::None, request.producer_id, request.producer_epoch + 1);
        }
        let _permit = self.controller_gate.acquire_permit(1).await.expect("never closed");
        let needs_block =
            self.producer_ids.borrow().as_ref().expect("this shard is the controller").needs_block();
        if needs_block {
            if let Err(error) = off_executor(&self.producer_ids, ProducerIdAllocator::reserve_block).await {
                tracing::error!(%error, "could not reserve producer ids");
                return respond(error.code(), -1, -1);
            }
        }
        let id = self.producer_ids.borrow_mut().as_mut().expect("this shard is the controller").take();
        tracing::debug!(producer_id = id, "producer id handed out");
        respond(ErrorCode::None, id, 0)
    }

    pub async fn request_init_producer_id(
        self: &Rc<Self>,
        request: InitProducerIdRequest,
    ) -> InitProducerIdResponse {
        match self.call(0, mesh::InitProducerId(request)).await {
            Ok(response) => response,
            Err(error) => InitProducerIdResponse { error: error.code(), producer_id: -1, producer_epoch: -1 },
        }
    }

    pub async fn request_delete_topics(self: &Rc<Self>, names: Vec<String>) -> Vec<TopicResult> {
        self.topics_on_controller(names.clone(), mesh::DeleteTopics(names)).await
    }

    /// Forwards a topic operation to the controller shard; if it cannot be reached, every
    /// topic of the request fails with the reason.
    async fn topics_on_controller<C>(self: &Rc<Self>, names: Vec<String>, call: C) -> Vec<TopicResult>
    where
        C: Call<Reply = Vec<TopicResult>> + 'static,
    {
        match self.call(0, call).await {
            Ok(results) => results,
            Err(error) => names
                .into_iter()
                .map(|name| TopicResult { name, error: error.code(), message: error.to_string() })
                .collect(),
        }
    }
}

/// Runs `change` on a controller-owned value on the shard's blocking thread (it writes and
/// syncs files), lending the value out of its cell meanwhile. Callers hold `controller_gate`.
async fn off_executor<S: Send + 'static, R: Send + 'static>(
    cell: &RefCell<Option<S>>,
    change: impl FnOnce(&mut S) -> R + Send + 'static,
) -> R {
    let mut value = cell.borrow_mut().take().expect("this shard is the controller");
    let (value, result) = glommio::executor()
        .spawn_blocking(move || {
            let result = change(&mut value);
            (value, result)
        })
        .await;
    *cell.borrow_mut() = Some(value);
    result
}

/// Removes directories and everything in them on a blocking thread, not the executor's
/// (thousands of unlinks); a failure is logged. One that is gone already is no failure.
async fn remove_dirs(dirs: Vec<PathBuf>) {
    glommio::executor()
        .spawn_blocking(move || {
            for dir in dirs {
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => {
                        tracing::warn!(path = %dir.display(), %error, "removing a deleted directory")
                    }
                }
            }
        })
        .await
}

/// Partitions a shard opens (recovers or creates) at once.
const OPENING_AT_ONCE: usize = 16;
/// How often a shard reconciles its partitions with the metadata image when nothing changed.
const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// Disk a new partition takes before any record: its segment header, its recovery
/// checkpoint and directory entries (space ahead of data is allocated as records arrive).
const PARTITION_BYTES_MIN: u64 = 16 << 10;
/// Space left free beyond that.
const SPACE_RESERVE_BYTES: u64 = 1 << 20;

/// Refuses a topic whose empty partitions would not fit on the data directory's filesystem.
fn check_space_for(data_dir: &std::path::Path, partitions: u32) -> Result<(), (ErrorCode, String)> {
    let Ok(free) = skein_storage::free_bytes(data_dir) else { return Ok(()) };
    let needed = u64::from(partitions) * PARTITION_BYTES_MIN + SPACE_RESERVE_BYTES;
    if free < needed {
        return Err((
            ErrorCode::NotEnoughSpace,
            format!(
                "{partitions} partitions need about {} MiB on {} and {} MiB are free",
                needed >> 20,
                data_dir.display(),
                free >> 20
            ),
        ));
    }
    Ok(())
}

/// Splits a produce request's records into whole batches, checking each (header rules, CRC,
/// size) before any is appended.
pub fn split_batches(mut records: BytesMut, size_max: usize) -> Result<Vec<ValidatedBatch>, BatchError> {
    let mut batches = Vec::new();
    if records.is_empty() {
        return Err(BatchError::Truncated { needed: batch::BATCH_HEADER_BYTES, available: 0 });
    }
    while !records.is_empty() {
        let header = batch::BatchHeader::parse(&records, size_max)?;
        if header.total_bytes() > records.len() {
            return Err(BatchError::Truncated { needed: header.total_bytes(), available: records.len() });
        }
        let one = records.split_to(header.total_bytes());
        batches.push(ValidatedBatch::new(one, size_max)?);
    }
    Ok(batches)
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    fn outcome(len: usize) -> FetchOutcome {
        let records = if len == 0 { Vec::new() } else { vec![Bytes::from(vec![0u8; len])] };
        FetchOutcome {
            error: ErrorCode::None,
            high_watermark: 7,
            log_start_offset: 1,
            records: Records::Memory(records),
        }
    }

    fn spent(lens: &[usize], budget: usize) -> Vec<usize> {
        let mut outcomes: Vec<FetchOutcome> = lens.iter().map(|&len| outcome(len)).collect();
        spend_budget(outcomes.iter_mut(), budget);
        assert!(outcomes.iter().all(|o| o.high_watermark == 7 && o.log_start_offset == 1), "offsets kept");
        outcomes.iter().map(|o| o.records.len()).collect()
    }

    #[test]
    fn a_budget_is_spent_in_order_and_only_a_first_batch_may_exceed_it() {
        assert_eq!(spent(&[10, 5, 4], 20), vec![10, 5, 4], "all fit");
        assert_eq!(spent(&[10, 30, 5], 20), vec![10, 0, 0], "the one past the budget and all after it go");
        assert_eq!(spent(&[50, 5], 20), vec![50, 0], "a first batch larger than the budget stays");
        assert_eq!(spent(&[0, 50, 5], 20), vec![0, 50, 0], "first non-empty");
        assert_eq!(spent(&[8, 8, 8, 8], 16), vec![8, 8, 0, 0]);
    }

    /// A partition as the fetch sees it: its batches' sizes from the fetch offset on. A read
    /// returns the whole batches that fit its limit, and at least the first one if the limit
    /// is not 0.
    fn read_model(batches: &[usize], limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        let mut taken = 0;
        for &batch in batches {
            if taken + batch > limit && taken > 0 {
                break;
            }
            taken += batch;
            if taken >= limit {
                break;
            }
        }
        taken
    }

    fn sequential(partitions: &[(usize, Vec<usize>)], budget: usize) -> Vec<usize> {
        let mut left = budget;
        partitions
            .iter()
            .map(|(own_limit, batches)| {
                let len = read_model(batches, (*own_limit).min(left));
                left = left.saturating_sub(len);
                len
            })
            .collect()
    }

    /// Runs `read_within_budget` over the model partitions, each read finishing after a number
    /// of polls of its own (so they finish out of order); returns the lengths and the most
    /// reads that were in flight at once.
    ///
    /// `batch_max` is what the scheduler is told of the largest batch: `None` for the truth.
    fn windowed(
        partitions: &[(usize, Vec<usize>)],
        budget: usize,
        at_once: usize,
        batch_max: Option<usize>,
    ) -> (Vec<usize>, usize) {
        let in_flight = Cell::new(0usize);
        let most = Cell::new(0usize);
        let reads: Vec<usize> = (0..partitions.len()).collect();
        let lens = futures::executor::block_on(read_within_budget(
            reads,
            budget,
            at_once,
            |&i| {
                let batches = &partitions[i].1;
                let largest = batches.iter().copied().max().unwrap_or(0);
                (partitions[i].0, batches.iter().sum(), batch_max.unwrap_or(largest))
            },
            |i, limit| {
                // Counted when started, not when first polled.
                in_flight.set(in_flight.get() + 1);
                most.set(most.get().max(in_flight.get()));
                let in_flight = &in_flight;
                async move {
                    for _ in 0..(i * 7919) % 5 {
                        yield_now().await;
                    }
                    in_flight.set(in_flight.get() - 1);
                    read_model(&partitions[i].1, limit)
                }
            },
            |&len| len,
            |len| *len = 0,
        ));
        (lens, most.get())
    }

    /// Gives the executor back once (waking itself, so `block_on` polls again).
    async fn yield_now() {
        let mut yielded = false;
        std::future::poll_fn(|cx| {
            if yielded {
                return std::task::Poll::Ready(());
            }
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        })
        .await
    }

    #[test]
    fn reads_within_a_budget_return_what_one_after_another_would_with_many_in_flight() {
        // Many small partitions (10 KiB in batches of 1 KiB), limits of 4 MiB, 16 MiB budget:
        // everything fits, and up to `at_once` reads run together.
        let small: Vec<(usize, Vec<usize>)> = (0..300).map(|_| (4 << 20, vec![1024; 10])).collect();
        let (lens, most) = windowed(&small, 16 << 20, 32, None);
        assert_eq!(lens, sequential(&small, 16 << 20));
        assert!(lens.iter().all(|&len| len == 10 * 1024));
        assert_eq!(most, 32, "reads overlap, up to the bound");
        // Large partitions (8 MiB each): the budget holds four limits; the fifth read would
        // depend on what the ones in flight return, so it waits, and gets nothing.
        let large: Vec<(usize, Vec<usize>)> = (0..8).map(|_| (4 << 20, vec![1 << 20; 8])).collect();
        let (lens, most) = windowed(&large, 16 << 20, 32, None);
        assert_eq!(lens, sequential(&large, 16 << 20));
        assert_eq!(lens, vec![4 << 20, 4 << 20, 4 << 20, 4 << 20, 0, 0, 0, 0]);
        assert!(most <= 4, "never more in flight than the budget holds limits: {most}");
        // Mixed sizes, batches larger than limits, empty partitions and tight budgets, against
        // the sequential pass.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |below: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % below as u64) as usize
        };
        for _ in 0..300 {
            let partitions: Vec<(usize, Vec<usize>)> = (0..1 + next(40))
                .map(|_| {
                    let own_limit = [0, 100, 1000, 5000, 1 << 20][next(5)];
                    let batches = (0..next(6)).map(|_| 1 + next(3000)).collect();
                    (own_limit, batches)
                })
                .collect();
            let budget = [1, 500, 2000, 10_000, 50_000][next(5)];
            let at_once = 1 + next(8);
            let (lens, most) = windowed(&partitions, budget, at_once, None);
            assert_eq!(lens, sequential(&partitions, budget), "{partitions:?} budget {budget}");
            assert!(most <= at_once);
            // Told batches are smaller than they are (a lowered max.message.bytes): reads may
            // return more than their shares, and the response still stays within the budget
            // and one first batch, each partition within its limit or one whole first batch.
            let (lens, _) = windowed(&partitions, budget, at_once, Some(1));
            let largest = partitions.iter().flat_map(|(_, b)| b.iter().copied()).max().unwrap_or(0);
            let total: usize = lens.iter().sum();
            assert!(total <= budget + largest, "{lens:?} over {budget} + {largest}: {partitions:?}");
            assert!(lens
                .iter()
                .zip(&partitions)
                .all(|(&len, (own_limit, batches))| { len <= *own_limit || batches.first() == Some(&len) }));
        }
    }
}
