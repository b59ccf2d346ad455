//! Consumer groups on the client: [`Consumer::subscribe`](crate::Consumer::subscribe) joins a group, a background task
//! heartbeats to the group's coordinator, and every [`Consumer::poll`](crate::Consumer::poll) applies the assignment
//! the coordinator sent (giving up revoked partitions, starting newly assigned ones from their
//! committed offsets), commits automatically if asked, and fetches.
//!
//! # Delivery semantics
//! * **At-least-once** (the default): commit *after* processing. With automatic commit, each
//!   `poll` first commits the positions of the records the previous `poll` returned, so a record
//!   is committed only once the caller came back for more; a crash re-delivers at most what was
//!   returned since the last commit. Manually: process, then [`Consumer::commit`](crate::Consumer::commit).
//! * **At-most-once**: commit *before* processing: call [`Consumer::commit`](crate::Consumer::commit) right after `poll`
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
//! consumer.subscribe(&["orders"], GroupConfig::new("billing").auto_commit(None)).await?;
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

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skein_net::{
    CommitPartition, ErrorCode, HeartbeatRequest, HeartbeatResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse, Request, TopicData, TopicPartition,
    TopicPartitions, JOIN_EPOCH, LEAVE_EPOCH,
};
use tokio::task::JoinHandle;

use crate::fetcher::Fetcher;
use crate::{decode, Client, ClientError, Result};

/// How a consumer takes part in a group: `GroupConfig::new("billing").auto_commit(None)`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GroupConfig {
    pub group_id: String,
    /// The coordinator removes the member if no heartbeat arrives for this long (its
    /// partitions go to the others).
    pub session_timeout: Duration,
    /// The coordinator removes the member if it keeps a revoked partition for this long
    /// (the caller did not `poll`).
    pub rebalance_timeout: Duration,
    /// Commit the returned records' positions at most this often (at the next `poll`);
    /// `None`: only [`Consumer::commit`](crate::Consumer::commit) commits.
    pub auto_commit: Option<Duration>,
    /// The member leaves the group if the caller does not `poll` for this long (Kafka's
    /// `max.poll.interval.ms`): a consumer stuck in its processing keeps heartbeating, and
    /// would otherwise hold its partitions from the other members for as long as it is stuck.
    /// Its next `poll` reports them [`RebalanceEvent::Lost`] and it joins again.
    pub max_poll_interval: Duration,
}

impl GroupConfig {
    pub fn new(group_id: impl Into<String>) -> GroupConfig {
        GroupConfig {
            group_id: group_id.into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(60),
            auto_commit: Some(Duration::from_secs(5)),
            max_poll_interval: Duration::from_secs(300),
        }
    }
}

crate::setters!(GroupConfig {
    group_id: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    auto_commit: Option<Duration>,
    max_poll_interval: Duration,
});

/// A change of the partitions this consumer owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// Newly assigned; reading starts at the committed offset (or `start_from`).
    Assigned(Vec<TopicPartition>),
    /// Given up in a rebalance (committed first with automatic commit).
    Revoked(Vec<TopicPartition>),
    /// The membership was lost (session expired, broker restarted, or no heartbeat answered
    /// for a session timeout): the partitions were dropped without a commit and the consumer
    /// rejoins.
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
    /// When the caller last polled (`None`: not yet joined).
    last_poll: Option<tokio::time::Instant>,
    /// The member left for not polling within `max_poll_interval`: the task rejoins only once
    /// the caller polls again.
    stalled: bool,
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
    // When the coordinator last answered a heartbeat: past the session timeout without an
    // answer, the coordinator has removed this member and handed its partitions to others.
    let mut answered = tokio::time::Instant::now();
    loop {
        let mut leaving = None;
        let request = {
            let mut state = shared.lock().expect("not poisoned");
            let unpolled = state.last_poll.is_some_and(|at| at.elapsed() > config.max_poll_interval);
            if state.lost || state.stalled {
                // Wait until the consumer dropped its partitions, or polls again.
                None
            } else if unpolled && !state.member_id.is_empty() {
                // Not polled within `max_poll_interval`: leave, so that the partitions go to
                // members that read them.
                tracing::warn!(
                    group = config.group_id,
                    "no poll for more than max_poll_interval ({:?}): leaving the group until the next poll",
                    config.max_poll_interval
                );
                let leave = HeartbeatRequest {
                    group_id: config.group_id.clone(),
                    member_id: std::mem::take(&mut state.member_id),
                    member_epoch: LEAVE_EPOCH,
                    client_id: client.config().client_id.clone(),
                    session_timeout_ms: config.session_timeout.as_millis() as u32,
                    rebalance_timeout_ms: config.rebalance_timeout.as_millis() as u32,
                    subscribed_topics: Vec::new(),
                    owned: TopicPartitions::from_tps(&state.owned),
                };
                state.member_epoch = JOIN_EPOCH;
                state.target.clear();
                state.lost = !state.owned.is_empty();
                state.stalled = true;
                leaving = Some(leave);
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
                    owned: TopicPartitions::from_tps(&state.owned),
                })
            }
        };
        if let Some(leave) = leaving {
            // If the leave is not heard, the coordinator removes the member after its session
            // timeout all the same (no more heartbeats come).
            let _ = tokio::time::timeout(config.session_timeout, heartbeat(&client, leave)).await;
        }
        if let Some(request) = request {
            // A heartbeat waits at most a session timeout for its answer (not the client's
            // request timeout, 30 s by default), so an unreachable coordinator is noticed
            // within about one session (`give_up_after_session`).
            let answer = tokio::time::timeout(config.session_timeout, heartbeat(&client, request))
                .await
                .unwrap_or(Err(ClientError::Timeout(config.session_timeout)));
            match answer {
                Ok(response) if response.error.is_ok() => {
                    answered = tokio::time::Instant::now();
                    let mut state = shared.lock().expect("not poisoned");
                    state.member_id = response.member_id;
                    state.member_epoch = response.member_epoch;
                    state.target = TopicPartitions::to_tps::<BTreeSet<TopicPartition>>(&response.assignment);
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
                Ok(response) if response.error.is_retriable() => {
                    interval = Duration::from_millis(200);
                    give_up_after_session(&shared, &config, answered);
                }
                Ok(response) => {
                    let context = format!("group {}: {}", config.group_id, response.error_message);
                    shared.lock().expect("not poisoned").fatal =
                        Some(ClientError::broker(response.error, context));
                    return;
                }
                Err(error) if error.is_retriable() => {
                    tracing::debug!(%error, "heartbeat failed; retrying");
                    interval = Duration::from_millis(200);
                    give_up_after_session(&shared, &config, answered);
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

/// A member whose heartbeats went unanswered for its whole session timeout (the coordinator
/// unreachable: a partition, a silent link) drops its partitions instead of waiting to hear
/// it was removed, as KIP-848 consumers do: the coordinator has removed it by then and given
/// them to other members, and records this member would still read from them are read by the
/// others as well. It rejoins as a new member once a heartbeat is answered.
fn give_up_after_session(shared: &Mutex<Membership>, config: &GroupConfig, answered: tokio::time::Instant) {
    if answered.elapsed() < config.session_timeout {
        return;
    }
    let mut state = shared.lock().expect("not poisoned");
    if state.member_id.is_empty() && state.owned.is_empty() {
        return;
    }
    tracing::warn!(
        group = config.group_id,
        "no heartbeat answered for the session timeout ({:?}): the partitions are dropped; rejoining",
        config.session_timeout
    );
    state.member_id.clear();
    state.member_epoch = JOIN_EPOCH;
    state.target.clear();
    state.lost = !state.owned.is_empty();
}

impl GroupState {
    /// The error of a group operation on a consumer that did not subscribe.
    pub(crate) const NOT_SUBSCRIBED: ClientError =
        ClientError::Config("commit needs a consumer that subscribed to a group");

    /// Joins `group.group_id` (see [`crate::Consumer::subscribe`]): checks the topics, clears
    /// the fetcher's assignment and starts the heartbeat task.
    pub(crate) async fn join(
        fetcher: &mut Fetcher,
        topics: &[&str],
        group: GroupConfig,
    ) -> Result<GroupState> {
        if group.group_id.is_empty() {
            return Err(ClientError::Config("the group id must not be empty"));
        }
        for topic in topics {
            fetcher.client.topic(topic).await?;
        }
        fetcher.clear_assignment();
        let shared = Arc::new(Mutex::new(Membership {
            last_poll: Some(tokio::time::Instant::now()),
            ..Membership::default()
        }));
        let wake = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(run_heartbeats(
            fetcher.client.clone(),
            group.clone(),
            topics.iter().map(|t| t.to_string()).collect(),
            shared.clone(),
            wake.clone(),
        ));
        Ok(GroupState {
            config: group,
            shared,
            wake,
            task,
            last_commit: Instant::now(),
            events: VecDeque::new(),
        })
    }

    /// The rebalance events since the last call, oldest first.
    pub(crate) fn take_events(&mut self) -> Vec<RebalanceEvent> {
        self.events.drain(..).collect()
    }

    /// The group member id (once joined).
    pub(crate) fn member_id(&self) -> Option<String> {
        let id = self.shared.lock().expect("not poisoned").member_id.clone();
        (!id.is_empty()).then_some(id)
    }

    fn push_event(&mut self, event: RebalanceEvent) {
        if self.events.len() >= EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Applies the coordinator's latest assignment to the fetcher; run by `poll`.
    pub(crate) async fn reconcile(&mut self, fetcher: &mut Fetcher) -> Result<()> {
        let (lost, target, owned) = {
            let mut state = self.shared.lock().expect("not poisoned");
            if let Some(error) = state.fatal.clone() {
                return Err(error);
            }
            state.last_poll = Some(tokio::time::Instant::now());
            if std::mem::take(&mut state.stalled) {
                self.wake.notify_one(); // the task may join again
            }
            (std::mem::take(&mut state.lost), state.target.clone(), state.owned.clone())
        };
        if lost {
            let dropped: Vec<TopicPartition> = owned.iter().cloned().collect();
            fetcher.drop_partitions(&dropped);
            self.set_owned(BTreeSet::new());
            self.push_event(RebalanceEvent::Lost(dropped));
            return Ok(());
        }
        if target == owned {
            return Ok(());
        }
        let revoked: Vec<TopicPartition> = owned.difference(&target).cloned().collect();
        if !revoked.is_empty() {
            if self.config.auto_commit.is_some() {
                if let Err(error) = self.commit_partitions(fetcher, &revoked).await {
                    tracing::warn!(%error, "committing revoked partitions failed");
                }
            }
            fetcher.drop_partitions(&revoked);
            self.push_event(RebalanceEvent::Revoked(revoked));
        }
        let added: Vec<TopicPartition> = target.difference(&owned).cloned().collect();
        if !added.is_empty() {
            let committed = self.committed(&fetcher.client, &added).await?;
            let mut fresh = Vec::new();
            for (key, offset) in added.iter().zip(committed) {
                match offset {
                    Some(offset) => {
                        fetcher.positions.insert(key.clone(), offset);
                    }
                    None => fresh.push(key.clone()),
                }
                if !fetcher.assignment.contains(key) {
                    fetcher.assignment.push(key.clone());
                }
            }
            if !fresh.is_empty() {
                let offsets = fetcher.resolve(&fresh, fetcher.config.start_from).await?;
                for (key, offset) in fresh.into_iter().zip(offsets) {
                    fetcher.positions.insert(key, offset);
                }
            }
            fetcher.cancel_prefetch();
            tracing::debug!(?added, positions = ?fetcher.positions, "partitions assigned");
            self.push_event(RebalanceEvent::Assigned(added));
        }
        self.set_owned(target);
        Ok(())
    }

    fn set_owned(&mut self, owned: BTreeSet<TopicPartition>) {
        self.shared.lock().expect("not poisoned").owned = owned;
        self.wake.notify_one();
    }

    /// Commits automatically if the interval passed; run by `poll`.
    pub(crate) async fn auto_commit(&mut self, fetcher: &Fetcher) -> Result<()> {
        let Some(every) = self.config.auto_commit else { return Ok(()) };
        if self.last_commit.elapsed() < every {
            return Ok(());
        }
        if let Err(error) = self.commit(fetcher).await {
            // Retried at the next poll; a rebalance may have moved a partition meanwhile.
            tracing::warn!(%error, "automatic commit failed");
        }
        Ok(())
    }

    /// Commits the position of every owned partition (see [`crate::Consumer::commit`]).
    pub(crate) async fn commit(&mut self, fetcher: &Fetcher) -> Result<()> {
        let partitions: Vec<TopicPartition> = fetcher.assignment.clone();
        self.commit_partitions(fetcher, &partitions).await?;
        self.last_commit = Instant::now();
        Ok(())
    }

    /// Like [`GroupState::commit`] but does not wait: the returned task resolves with the outcome.
    pub(crate) fn commit_async(&mut self, fetcher: &Fetcher) -> JoinHandle<Result<()>> {
        let offsets = committable(fetcher, &fetcher.assignment);
        let request = self.commit_request(&offsets);
        self.last_commit = Instant::now();
        let client = fetcher.client.clone();
        tokio::spawn(async move { send_commit(&client, request).await })
    }

    /// Commits explicit offsets (the offset of the next record to read) for owned partitions.
    pub(crate) async fn commit_offsets(
        &self,
        client: &Client,
        offsets: &[(TopicPartition, u64)],
    ) -> Result<()> {
        send_commit(client, self.commit_request(offsets)).await
    }

    async fn commit_partitions(&self, fetcher: &Fetcher, partitions: &[TopicPartition]) -> Result<()> {
        let offsets = committable(fetcher, partitions);
        self.commit_offsets(&fetcher.client, &offsets).await
    }

    fn commit_request(&self, offsets: &[(TopicPartition, u64)]) -> OffsetCommitRequest {
        let (member_id, member_epoch) = {
            let state = self.shared.lock().expect("not poisoned");
            (state.member_id.clone(), state.member_epoch)
        };
        let mut topics: Vec<TopicData<CommitPartition>> = Vec::new();
        for (tp, offset) in offsets {
            let entry = CommitPartition { partition: tp.partition, offset: *offset, metadata: String::new() };
            crate::fetcher::push_to_topic(&mut topics, tp.topic(), entry);
        }
        OffsetCommitRequest { group_id: self.config.group_id.clone(), member_id, member_epoch, topics }
    }

    /// The group's committed offsets of these partitions (`None`: no commit).
    pub(crate) async fn committed(
        &self,
        client: &Client,
        partitions: &[TopicPartition],
    ) -> Result<Vec<Option<u64>>> {
        fetch_committed(client, &self.config.group_id, partitions).await
    }

    /// Commits (with automatic commit), leaves the group and stops heartbeating (see
    /// [`crate::Consumer::close`]).
    pub(crate) async fn leave(mut self, fetcher: &Fetcher) -> Result<()> {
        if self.config.auto_commit.is_some() {
            self.commit(fetcher).await?;
        }
        self.task.abort();
        let (member_id, owned) = {
            let state = self.shared.lock().expect("not poisoned");
            (state.member_id.clone(), state.owned.clone())
        };
        if member_id.is_empty() {
            return Ok(());
        }
        let request = HeartbeatRequest {
            group_id: self.config.group_id.clone(),
            member_id,
            member_epoch: LEAVE_EPOCH,
            client_id: fetcher.client.config().client_id.clone(),
            session_timeout_ms: self.config.session_timeout.as_millis() as u32,
            rebalance_timeout_ms: self.config.rebalance_timeout.as_millis() as u32,
            subscribed_topics: Vec::new(),
            owned: TopicPartitions::from_tps(&owned),
        };
        let response = heartbeat(&fetcher.client, request).await?;
        if !response.error.is_ok() {
            return Err(ClientError::broker(response.error, "leaving the group"));
        }
        Ok(())
    }
}

/// What can be committed for each partition: the position, or the first record fetched but
/// not yet returned by `poll` (never past a record the caller did not get).
fn committable(fetcher: &Fetcher, partitions: &[TopicPartition]) -> Vec<(TopicPartition, u64)> {
    // Each partition's first buffered record, found in one pass over the buffer (a search of it
    // for each partition was partitions × buffered records).
    let mut first_buffered: HashMap<(&str, u32), u64> = HashMap::new();
    for record in &fetcher.buffered {
        first_buffered.entry((&*record.topic, record.partition)).or_insert(record.offset);
    }
    partitions
        .iter()
        .filter_map(|key| {
            let position = *fetcher.positions.get(key)?;
            let buffered = first_buffered.get(&(key.topic(), key.partition));
            Some((key.clone(), buffered.map_or(position, |&offset| offset.min(position))))
        })
        .collect()
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
        topics: Some(TopicPartitions::from_tps(&wanted)),
    });
    let body = client.request(&request).await?;
    let response = decode(&body, OffsetFetchResponse::decode)?;
    if !response.error.is_ok() {
        return Err(ClientError::broker(response.error, format!("fetching the offsets of group {group_id}")));
    }
    let answers = crate::fetcher::by_partition(&response.topics, |p| p.partition);
    Ok(partitions
        .iter()
        .map(|tp| {
            answers.get(&(tp.topic(), tp.partition)).and_then(|p| (p.offset >= 0).then_some(p.offset as u64))
        })
        .collect())
}
