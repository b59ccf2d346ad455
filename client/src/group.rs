//! Consumer groups on the client: [`Consumer::subscribe`] joins a group, a background task
//! heartbeats to the group's coordinator, and every [`Consumer::poll`] applies the assignment
//! the coordinator sent (giving up revoked partitions, starting newly assigned ones from their
//! committed offsets), commits automatically if asked, and fetches.
//!
//! # Delivery semantics
//! * **At-least-once** (the default): commit *after* processing. With automatic commit, each
//!   `poll` first commits the positions of the records the previous `poll` returned, so a record
//!   is committed only once the caller came back for more; a crash re-delivers at most what was
//!   returned since the last commit. Manually: process, then [`Consumer::commit`].
//! * **At-most-once**: commit *before* processing: call [`Consumer::commit`] right after `poll`
//!   returns, then process. A crash loses the records being processed, never re-delivers them.
//! * Revoked partitions are committed (with automatic commit) before they are given up, so the
//!   next owner starts where this member stopped.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use skein_client::{Client, ClientConfig, Consumer, ConsumerConfig, GroupConfig};
//! # async fn example() -> Result<(), skein_client::ClientError> {
//! let client = Client::connect(ClientConfig::new("127.0.0.1:9400")).await?;
//! let mut consumer = Consumer::new(client, ConsumerConfig::default());
//! // At-least-once, manual: commit after processing.
//! consumer.subscribe(&["orders"], GroupConfig { auto_commit: None, ..GroupConfig::new("billing") }).await?;
//! loop {
//!     let records = consumer.poll(Duration::from_secs(1)).await?;
//!     for record in &records {
//!         println!("{}/{} @{}", record.topic, record.partition, record.offset); // process
//!     }
//!     consumer.commit().await?;
//!     for event in consumer.rebalance_events() {
//!         println!("{event:?}");
//!     }
//! }
//! # }
//! ```

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skein_net::{
    CommitPartition, ErrorCode, HeartbeatRequest, HeartbeatResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, Request, TopicData, TopicPartitions,
    JOIN_EPOCH, LEAVE_EPOCH,
};
use tokio::task::JoinHandle;

use crate::consumer::TopicPartition;
use crate::{decode, Client, ClientError, Consumer, Result};

/// How a consumer takes part in a group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub group_id: String,
    /// The coordinator removes the member if no heartbeat arrives for this long (its
    /// partitions go to the others).
    pub session_timeout: Duration,
    /// The coordinator removes the member if it keeps a revoked partition for this long
    /// (the caller did not `poll`).
    pub rebalance_timeout: Duration,
    /// Commit the returned records' positions at most this often (at the next `poll`);
    /// `None`: only [`Consumer::commit`] commits.
    pub auto_commit: Option<Duration>,
}

impl GroupConfig {
    pub fn new(group_id: impl Into<String>) -> GroupConfig {
        GroupConfig {
            group_id: group_id.into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(60),
            auto_commit: Some(Duration::from_secs(5)),
        }
    }
}

/// A change of the partitions this consumer owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// Newly assigned; reading starts at the committed offset (or `start_from`).
    Assigned(Vec<TopicPartition>),
    /// Given up in a rebalance (committed first with automatic commit).
    Revoked(Vec<TopicPartition>),
    /// The membership was lost (session expired, broker restarted): the partitions were
    /// dropped without a commit and the consumer rejoins.
    Lost(Vec<TopicPartition>),
}

/// State shared by the heartbeat task and the consumer.
#[derive(Debug, Default)]
struct Membership {
    member_id: String,
    member_epoch: i32,
    /// The coordinator's latest answer: what the member should own now.
    target: BTreeSet<TopicPartition>,
    /// What the consumer owns now (applied by `poll`), as reported in heartbeats.
    owned: BTreeSet<TopicPartition>,
    /// The membership was lost: the consumer drops everything before the task rejoins.
    lost: bool,
    fatal: Option<ClientError>,
}

/// A consumer's group membership.
pub(crate) struct GroupState {
    config: GroupConfig,
    shared: Arc<Mutex<Membership>>,
    wake: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
    last_commit: Instant,
    events: VecDeque<RebalanceEvent>,
}

impl Drop for GroupState {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const EVENTS_KEPT: usize = 1000;

async fn heartbeat(client: &Client, request: HeartbeatRequest) -> Result<HeartbeatResponse> {
    let body = client.request(&Request::ConsumerGroupHeartbeat(request)).await?;
    decode(&body, HeartbeatResponse::decode)
}

/// The heartbeat task: joins, heartbeats, reports what the consumer owns, rejoins when the
/// membership is lost.
async fn run_heartbeats(
    client: Client,
    config: GroupConfig,
    topics: Vec<String>,
    shared: Arc<Mutex<Membership>>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut interval = Duration::from_millis(500);
    loop {
        let request = {
            let state = shared.lock().expect("not poisoned");
            if state.lost {
                // Wait until the consumer dropped its partitions.
                None
            } else {
                Some(HeartbeatRequest {
                    group_id: config.group_id.clone(),
                    member_id: state.member_id.clone(),
                    member_epoch: state.member_epoch,
                    client_id: client.config().client_id.clone(),
                    session_timeout_ms: config.session_timeout.as_millis() as u32,
                    rebalance_timeout_ms: config.rebalance_timeout.as_millis() as u32,
                    subscribed_topics: topics.clone(),
                    owned: TopicPartitions::from_pairs(&state.owned),
                })
            }
        };
        if let Some(request) = request {
            match heartbeat(&client, request).await {
                Ok(response) if response.error.is_ok() => {
                    let mut state = shared.lock().expect("not poisoned");
                    state.member_id = response.member_id;
                    state.member_epoch = response.member_epoch;
                    state.target =
                        TopicPartitions::to_pairs::<BTreeSet<TopicPartition>>(&response.assignment);
                    interval = Duration::from_millis(response.heartbeat_interval_ms.max(20).into());
                }
                Ok(response)
                    if matches!(
                        response.error,
                        ErrorCode::UnknownMemberId | ErrorCode::FencedMemberEpoch
                    ) =>
                {
                    tracing::info!(group = config.group_id, code = %response.error, "group membership lost; rejoining");
                    let mut state = shared.lock().expect("not poisoned");
                    state.member_id.clear();
                    state.member_epoch = JOIN_EPOCH;
                    state.target.clear();
                    state.lost = !state.owned.is_empty();
                    interval = Duration::ZERO;
                }
                Ok(response) if response.error.is_retriable() => interval = Duration::from_millis(200),
                Ok(response) => {
                    let context = format!("group {}: {}", config.group_id, response.error_message);
                    shared.lock().expect("not poisoned").fatal =
                        Some(ClientError::broker(response.error, context));
                    return;
                }
                Err(error) if error.is_retriable() => {
                    tracing::debug!(%error, "heartbeat failed; retrying");
                    interval = Duration::from_millis(200);
                }
                Err(error) => {
                    shared.lock().expect("not poisoned").fatal = Some(error);
                    return;
                }
            }
        }
        // While the membership is lost nothing is sent until the consumer dropped its
        // partitions (it wakes this task when it did).
        let wait = if interval.is_zero() && shared.lock().expect("not poisoned").lost {
            Duration::from_millis(100)
        } else {
            interval
        };
        let _ = tokio::time::timeout(wait, wake.notified()).await;
    }
}

impl Consumer {
    /// Joins `group.group_id` and consumes the partitions of `topics` the coordinator assigns
    /// to this consumer (replacing any manual assignment). Partitions without a committed
    /// offset start at `ConsumerConfig::start_from` (`Beginning` = earliest, `End` = latest).
    pub async fn subscribe(&mut self, topics: &[&str], group: GroupConfig) -> Result<()> {
        if group.group_id.is_empty() {
            return Err(ClientError::Config("the group id must not be empty"));
        }
        for topic in topics {
            self.client.topic(topic).await?;
        }
        self.clear_assignment();
        let shared = Arc::new(Mutex::new(Membership::default()));
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(run_heartbeats(
            self.client.clone(),
            group.clone(),
            topics.iter().map(|t| t.to_string()).collect(),
            shared.clone(),
            wake.clone(),
        ));
        self.group = Some(GroupState {
            config: group,
            shared,
            wake,
            task,
            last_commit: Instant::now(),
            events: VecDeque::new(),
        });
        Ok(())
    }

    /// The rebalance events since the last call, oldest first.
    pub fn rebalance_events(&mut self) -> Vec<RebalanceEvent> {
        self.group.as_mut().map(|g| g.events.drain(..).collect()).unwrap_or_default()
    }

    /// The group member id (once joined).
    pub fn member_id(&self) -> Option<String> {
        let group = self.group.as_ref()?;
        let id = group.shared.lock().expect("not poisoned").member_id.clone();
        (!id.is_empty()).then_some(id)
    }

    fn push_event(&mut self, event: RebalanceEvent) {
        if let Some(group) = self.group.as_mut() {
            if group.events.len() >= EVENTS_KEPT {
                group.events.pop_front();
            }
            group.events.push_back(event);
        }
    }

    /// Applies the coordinator's latest assignment; run by `poll`.
    pub(crate) async fn reconcile_group(&mut self) -> Result<()> {
        let Some(group) = self.group.as_ref() else { return Ok(()) };
        let (lost, target, owned) = {
            let mut state = group.shared.lock().expect("not poisoned");
            if let Some(error) = state.fatal.clone() {
                return Err(error);
            }
            (std::mem::take(&mut state.lost), state.target.clone(), state.owned.clone())
        };
        if lost {
            let dropped: Vec<TopicPartition> = owned.iter().cloned().collect();
            self.drop_partitions(&dropped);
            self.set_owned(BTreeSet::new());
            self.push_event(RebalanceEvent::Lost(dropped));
            return Ok(());
        }
        if target == owned {
            return Ok(());
        }
        let revoked: Vec<TopicPartition> = owned.difference(&target).cloned().collect();
        if !revoked.is_empty() {
            if self.group.as_ref().is_some_and(|g| g.config.auto_commit.is_some()) {
                if let Err(error) = self.commit_partitions(&revoked).await {
                    tracing::warn!(%error, "committing revoked partitions failed");
                }
            }
            self.drop_partitions(&revoked);
            self.push_event(RebalanceEvent::Revoked(revoked));
        }
        let added: Vec<TopicPartition> = target.difference(&owned).cloned().collect();
        if !added.is_empty() {
            let committed = self.committed(&added).await?;
            let mut fresh = Vec::new();
            for (key, offset) in added.iter().zip(committed) {
                match offset {
                    Some(offset) => {
                        self.positions.insert(key.clone(), offset);
                    }
                    None => fresh.push(key.clone()),
                }
                if !self.assignment.contains(key) {
                    self.assignment.push(key.clone());
                }
            }
            if !fresh.is_empty() {
                let offsets = self.resolve(&fresh, self.config.start_from).await?;
                for (key, offset) in fresh.into_iter().zip(offsets) {
                    self.positions.insert(key, offset);
                }
            }
            self.cancel_prefetch();
            self.push_event(RebalanceEvent::Assigned(added));
        }
        self.set_owned(target);
        Ok(())
    }

    fn set_owned(&mut self, owned: BTreeSet<TopicPartition>) {
        if let Some(group) = self.group.as_ref() {
            group.shared.lock().expect("not poisoned").owned = owned;
            group.wake.notify_one();
        }
    }

    fn drop_partitions(&mut self, partitions: &[TopicPartition]) {
        self.assignment.retain(|key| !partitions.contains(key));
        for key in partitions {
            self.positions.remove(key);
        }
        self.buffered.retain(|r| !partitions.iter().any(|(t, p)| &r.topic == t && r.partition == *p));
        self.cancel_prefetch();
    }

    /// Commits automatically if the interval passed; run by `poll`.
    pub(crate) async fn auto_commit(&mut self) -> Result<()> {
        let Some(group) = self.group.as_ref() else { return Ok(()) };
        let Some(every) = group.config.auto_commit else { return Ok(()) };
        if group.last_commit.elapsed() < every {
            return Ok(());
        }
        if let Err(error) = self.commit().await {
            // Retried at the next poll; a rebalance may have moved a partition meanwhile.
            tracing::warn!(%error, "automatic commit failed");
        }
        Ok(())
    }

    /// Commits the position of every owned partition (the offset after the last record
    /// `poll` returned) and waits until the broker has it on disk.
    pub async fn commit(&mut self) -> Result<()> {
        let partitions: Vec<TopicPartition> = self.assignment.clone();
        self.commit_partitions(&partitions).await?;
        if let Some(group) = self.group.as_mut() {
            group.last_commit = Instant::now();
        }
        Ok(())
    }

    /// Like [`Consumer::commit`] but does not wait: the returned task resolves with the outcome.
    pub fn commit_async(&mut self) -> JoinHandle<Result<()>> {
        let offsets = self.committable(&self.assignment);
        let request = self.commit_request(&offsets);
        if let Some(group) = self.group.as_mut() {
            group.last_commit = Instant::now();
        }
        let client = self.client.clone();
        tokio::spawn(async move {
            match request {
                Some(request) => send_commit(&client, request).await,
                None => Err(ClientError::Config("commit needs a consumer that subscribed to a group")),
            }
        })
    }

    /// Commits explicit offsets (the offset of the next record to read) for owned partitions.
    pub async fn commit_offsets(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        let request = self
            .commit_request(offsets)
            .ok_or(ClientError::Config("commit needs a consumer that subscribed to a group"))?;
        send_commit(&self.client, request).await
    }

    async fn commit_partitions(&mut self, partitions: &[TopicPartition]) -> Result<()> {
        let offsets = self.committable(partitions);
        self.commit_offsets(&offsets).await
    }

    /// What can be committed for each partition: the position, or the first record fetched but
    /// not yet returned by `poll` (never past a record the caller did not get).
    fn committable(&self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, u64)> {
        partitions
            .iter()
            .filter_map(|key| {
                let position = *self.positions.get(key)?;
                let buffered = self.buffered.iter().find(|r| r.topic == key.0 && r.partition == key.1);
                Some((key.clone(), buffered.map_or(position, |r| r.offset.min(position))))
            })
            .collect()
    }

    fn commit_request(&self, offsets: &[(TopicPartition, u64)]) -> Option<OffsetCommitRequest> {
        let group = self.group.as_ref()?;
        let (member_id, member_epoch) = {
            let state = group.shared.lock().expect("not poisoned");
            (state.member_id.clone(), state.member_epoch)
        };
        let mut topics: Vec<TopicData<CommitPartition>> = Vec::new();
        for ((topic, partition), offset) in offsets {
            let entry = CommitPartition { partition: *partition, offset: *offset, metadata: String::new() };
            match topics.iter_mut().find(|t| &t.name == topic) {
                Some(t) => t.partitions.push(entry),
                None => topics.push(TopicData { name: topic.clone(), partitions: vec![entry] }),
            }
        }
        Some(OffsetCommitRequest { group_id: group.config.group_id.clone(), member_id, member_epoch, topics })
    }

    /// The group's committed offsets of these partitions (`None`: no commit).
    pub async fn committed(&self, partitions: &[TopicPartition]) -> Result<Vec<Option<u64>>> {
        let group = self.group.as_ref().ok_or(ClientError::Config("not in a group"))?;
        fetch_committed(&self.client, &group.config.group_id, partitions).await
    }

    /// Commits (with automatic commit), leaves the group and stops heartbeating, so the
    /// partitions move to the other members at once instead of after the session timeout.
    pub async fn close(mut self) -> Result<()> {
        let Some(group) = self.group.as_ref() else { return Ok(()) };
        if group.config.auto_commit.is_some() {
            self.commit().await?;
        }
        let group = self.group.take().expect("checked");
        group.task.abort();
        let (member_id, owned) = {
            let state = group.shared.lock().expect("not poisoned");
            (state.member_id.clone(), state.owned.clone())
        };
        if member_id.is_empty() {
            return Ok(());
        }
        let request = HeartbeatRequest {
            group_id: group.config.group_id.clone(),
            member_id,
            member_epoch: LEAVE_EPOCH,
            client_id: self.client.config().client_id.clone(),
            session_timeout_ms: group.config.session_timeout.as_millis() as u32,
            rebalance_timeout_ms: group.config.rebalance_timeout.as_millis() as u32,
            subscribed_topics: Vec::new(),
            owned: TopicPartitions::from_pairs(&owned),
        };
        let response = heartbeat(&self.client, request).await?;
        if !response.error.is_ok() {
            return Err(ClientError::broker(response.error, "leaving the group"));
        }
        Ok(())
    }
}

async fn send_commit(client: &Client, request: OffsetCommitRequest) -> Result<()> {
    if request.topics.is_empty() {
        return Ok(());
    }
    let mut attempt = 0;
    loop {
        let outcome = async {
            let body = client.request(&Request::OffsetCommit(request.clone())).await?;
            decode(&body, OffsetCommitResponse::decode)
        }
        .await;
        match outcome {
            Ok(response) => {
                if !response.error.is_ok() {
                    return Err(ClientError::broker(
                        response.error,
                        format!("committing for group {}", request.group_id),
                    ));
                }
                for topic in &response.topics {
                    for p in &topic.partitions {
                        if !p.error.is_ok() {
                            let context = format!(
                                "committing {}/{} for group {}",
                                topic.name, p.partition, request.group_id
                            );
                            return Err(ClientError::broker(p.error, context));
                        }
                    }
                }
                return Ok(());
            }
            Err(error) if error.is_retriable() && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// A group's committed offsets of these partitions (`None`: no commit).
pub(crate) async fn fetch_committed(
    client: &Client,
    group_id: &str,
    partitions: &[TopicPartition],
) -> Result<Vec<Option<u64>>> {
    let wanted: BTreeSet<TopicPartition> = partitions.iter().cloned().collect();
    let request = Request::OffsetFetch(OffsetFetchRequest {
        group_id: group_id.to_owned(),
        topics: Some(TopicPartitions::from_pairs(&wanted)),
    });
    let body = client.request(&request).await?;
    let response = decode(&body, OffsetFetchResponse::decode)?;
    if !response.error.is_ok() {
        return Err(ClientError::broker(response.error, format!("fetching the offsets of group {group_id}")));
    }
    Ok(partitions
        .iter()
        .map(|(topic, partition)| {
            response
                .topics
                .iter()
                .filter(|t| &t.name == topic)
                .flat_map(|t| t.partitions.iter())
                .find(|p| p.partition == *partition)
                .and_then(|p| (p.offset >= 0).then_some(p.offset as u64))
        })
        .collect())
}
