//! The consumer: reads assigned partitions from any offset, the beginning, the end or a
//! timestamp. Pull-based: each [`Consumer::poll`] returns the records that arrived; while the
//! caller works on them, the next fetch is already in flight (prefetch); a shard's next fetch
//! goes out even before its last response is checked and decoded, from the offsets its batch
//! headers give (`Fetcher::prefetch_after`).
//!
//! What it reads and where it stands is a `Fetcher` (`fetcher.rs`); a consumer that
//! subscribed to a group also has a group membership (`group.rs`, see [`crate::group`]) that
//! moves the fetcher's assignment.
//!
//! Every batch's CRC is checked before its records are returned; a batch that fails is an
//! error ([`ClientError::Corrupt`]), never skipped.

use std::time::Duration;

use skein_net::TopicPartition;
use tokio::task::JoinHandle;

use crate::fetcher::{ConsumerConfig, ConsumerRecord, Fetcher, SeekTo};
use crate::group::{GroupConfig, GroupState, RebalanceEvent};
use crate::{Client, ClientError, Result};

/// Reads partitions: assigned by the caller ([`Consumer::assign`]) or by a consumer group
/// ([`Consumer::subscribe`], see [`crate::group`]).
pub struct Consumer {
    fetcher: Fetcher,
    group: Option<GroupState>,
}

impl Consumer {
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer { fetcher: Fetcher::new(client, config), group: None }
    }

    /// Adds partitions of a topic to the assignment (checked against the topic's metadata).
    /// Not for a consumer that subscribed to a group (the group assigns its partitions).
    pub async fn assign(&mut self, topic: &str, partitions: &[u32]) -> Result<()> {
        if self.group.is_some() {
            return Err(ClientError::Config("a consumer in a group cannot assign partitions itself"));
        }
        let info = self.fetcher.client.topic(topic).await?;
        if let Some(&partition) = partitions.iter().find(|&&p| p >= info.partitions) {
            return Err(ClientError::UnknownPartition { topic: topic.to_owned(), partition });
        }
        // A set of what is assigned already: a search of the assignment for each partition
        // took seconds to assign 10,000 partitions.
        let mut assigned: std::collections::HashSet<TopicPartition> =
            self.fetcher.assignment.iter().cloned().collect();
        for &partition in partitions {
            let key = TopicPartition::new(topic, partition);
            if assigned.insert(key.clone()) {
                self.fetcher.assignment.push(key);
            }
        }
        self.fetcher.cancel_prefetch();
        Ok(())
    }

    /// Assigns every partition of a topic.
    pub async fn assign_all(&mut self, topic: &str) -> Result<()> {
        let info = self.fetcher.client.topic(topic).await?;
        let partitions: Vec<u32> = (0..info.partitions).collect();
        self.assign(topic, &partitions).await
    }

    pub fn assignment(&self) -> &[TopicPartition] {
        &self.fetcher.assignment
    }

    /// The offset of the next record `poll` returns for a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.fetcher.positions.get(&TopicPartition::new(topic, partition)).copied()
    }

    /// Moves one partition's position.
    pub async fn seek(&mut self, topic: &str, partition: u32, to: SeekTo) -> Result<()> {
        let key = TopicPartition::new(topic, partition);
        let offset = self.fetcher.resolve(std::slice::from_ref(&key), to).await?[0];
        self.fetcher.positions.insert(key, offset);
        self.fetcher.buffered.retain(|r| !(*r.topic == *topic && r.partition == partition));
        self.fetcher.cancel_prefetch();
        Ok(())
    }

    /// Moves every assigned partition's position.
    pub async fn seek_all(&mut self, to: SeekTo) -> Result<()> {
        let assignment = self.fetcher.assignment.clone();
        let offsets = self.fetcher.resolve(&assignment, to).await?;
        for (key, offset) in assignment.into_iter().zip(offsets) {
            self.fetcher.positions.insert(key, offset);
        }
        self.fetcher.buffered.clear();
        self.fetcher.cancel_prefetch();
        Ok(())
    }

    /// Returns the records available now or within `timeout` (possibly none). Starts the next
    /// fetch before returning, so it is in flight while the caller processes these.
    ///
    /// In a group, each call first applies the coordinator's latest assignment and commits
    /// automatically if it is time (see [`crate::group`]); a long poll returns at least every
    /// `fetch_wait_max` to do so.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.auto_commit().await?;
        self.reconcile_group().await?;
        if !self.fetcher.buffered.is_empty() {
            return Ok(self.fetcher.buffered.drain(..).collect());
        }
        while self.fetcher.assignment.is_empty() {
            let now = tokio::time::Instant::now();
            if self.group.is_none() || now >= deadline {
                tokio::time::sleep_until(deadline).await;
                return Ok(Vec::new());
            }
            tokio::time::sleep(Duration::from_millis(20).min(deadline - now)).await;
            self.reconcile_group().await?;
        }
        self.fetcher.initialise_positions().await?;
        loop {
            let wait = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(self.fetcher.config.fetch_wait_max);
            self.fetcher.start_fetches(wait);
            if self.fetcher.prefetch.is_empty() {
                tokio::time::sleep_until(deadline).await;
                return Ok(Vec::new());
            }
            // Fetches still on their way at the deadline (a broker being restarted, or paused,
            // or a quiet shard's long poll) stay in flight for the next poll.
            let (index, joined) = tokio::select! {
                (joined, index, _) = futures::future::select_all(
                    self.fetcher.prefetch.iter_mut().map(|fetch| &mut fetch.handle),
                ) => (index, joined),
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
            };
            let first = self.fetcher.prefetch.swap_remove(index);
            let mut finished = vec![(first.shard, first.asked, joined)];
            // Other shards' fetches that are done too are taken with it.
            let mut next = 0;
            while next < self.fetcher.prefetch.len() {
                if self.fetcher.prefetch[next].handle.is_finished() {
                    let fetch = self.fetcher.prefetch.swap_remove(next);
                    finished.push((fetch.shard, fetch.asked, fetch.handle.await));
                } else {
                    next += 1;
                }
            }
            let mut pause = false;
            for (shard, asked, joined) in finished {
                match joined {
                    Ok(Ok(response)) => {
                        // A response to positions that moved since (a seek) is stale.
                        if asked.iter().all(|(key, offset)| self.fetcher.positions.get(key) == Some(offset)) {
                            self.fetcher.prefetch_after(shard, &asked, &response);
                            self.fetcher.absorb(response).await?;
                        } else {
                            tracing::trace!(?asked, positions = ?self.fetcher.positions, "stale fetch response dropped");
                        }
                    }
                    Ok(Err(error)) if error.is_retriable() => {
                        // The client already reconnected and retried for `retry_timeout`; keep
                        // polling (a consumer rides over broker restarts) until the deadline.
                        tracing::debug!(%error, "fetch failed; fetching again");
                        pause = true;
                    }
                    Ok(Err(error)) => return Err(error),
                    Err(join_error) => return Err(ClientError::ConnectionLost(join_error.to_string())),
                }
            }
            if pause {
                let pause = Duration::from_millis(100);
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)).await;
            }
            if !self.fetcher.buffered.is_empty() {
                self.fetcher.start_fetches(self.fetcher.config.fetch_wait_max);
                return Ok(self.fetcher.buffered.drain(..).collect());
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            if self.group.is_some() {
                self.reconcile_group().await?;
                if self.fetcher.assignment.is_empty() {
                    return Ok(Vec::new());
                }
            }
        }
    }

    /// The records as a [`futures::Stream`], one at a time, from repeated [`Consumer::poll`]s
    /// of `poll_timeout` each (in a group, each poll also keeps the membership up to date). It
    /// never ends by itself; a failed poll is yielded as an `Err` and the stream goes on.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use futures::StreamExt;
    /// # async fn example(mut consumer: skein_client::Consumer) {
    /// let mut records = std::pin::pin!(consumer.stream(Duration::from_millis(500)));
    /// while let Some(record) = records.next().await {
    ///     let record = record.expect("a poll failed");
    ///     println!("{}/{} @{}", record.topic, record.partition, record.offset);
    /// }
    /// # }
    /// ```
    pub fn stream(
        &mut self,
        poll_timeout: Duration,
    ) -> impl futures::Stream<Item = Result<ConsumerRecord>> + '_ {
        let buffered = std::collections::VecDeque::new();
        futures::stream::unfold((self, buffered), move |(consumer, mut buffered)| async move {
            loop {
                if let Some(record) = buffered.pop_front() {
                    return Some((Ok(record), (consumer, buffered)));
                }
                match consumer.poll(poll_timeout).await {
                    Ok(records) => buffered.extend(records),
                    Err(error) => return Some((Err(error), (consumer, buffered))),
                }
            }
        })
    }

    /// Applies the group coordinator's latest assignment (in a group); run by `poll`.
    async fn reconcile_group(&mut self) -> Result<()> {
        match self.group.as_mut() {
            Some(group) => group.reconcile(&mut self.fetcher).await,
            None => Ok(()),
        }
    }

    /// Commits automatically if the interval passed (in a group); run by `poll`.
    async fn auto_commit(&mut self) -> Result<()> {
        match self.group.as_mut() {
            Some(group) => group.auto_commit(&self.fetcher).await,
            None => Ok(()),
        }
    }

    /// Joins `group.group_id` and consumes the partitions of `topics` the coordinator assigns
    /// to this consumer (replacing any manual assignment). Partitions without a committed
    /// offset start at `ConsumerConfig::start_from` (`Beginning` = earliest, `End` = latest).
    pub async fn subscribe(&mut self, topics: &[&str], group: GroupConfig) -> Result<()> {
        self.group = Some(GroupState::join(&mut self.fetcher, topics, group).await?);
        Ok(())
    }

    /// The rebalance events since the last call, oldest first.
    pub fn rebalance_events(&mut self) -> Vec<RebalanceEvent> {
        self.group.as_mut().map(GroupState::take_events).unwrap_or_default()
    }

    /// The group member id (once joined).
    pub fn member_id(&self) -> Option<String> {
        self.group.as_ref()?.member_id()
    }

    /// Commits the position of every owned partition (the offset after the last record
    /// `poll` returned) and waits until the broker has it on disk.
    pub async fn commit(&mut self) -> Result<()> {
        match self.group.as_mut() {
            Some(group) => group.commit(&self.fetcher).await,
            None => Err(GroupState::NOT_SUBSCRIBED),
        }
    }

    /// Like [`Consumer::commit`] but does not wait: the returned task resolves with the outcome.
    pub fn commit_async(&mut self) -> JoinHandle<Result<()>> {
        match self.group.as_mut() {
            Some(group) => group.commit_async(&self.fetcher),
            None => tokio::spawn(async { Err(GroupState::NOT_SUBSCRIBED) }),
        }
    }

    /// Commits explicit offsets (the offset of the next record to read) for owned partitions.
    pub async fn commit_offsets(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        match self.group.as_ref() {
            Some(group) => group.commit_offsets(&self.fetcher.client, offsets).await,
            None => Err(GroupState::NOT_SUBSCRIBED),
        }
    }

    /// The group's committed offsets of these partitions (`None`: no commit).
    pub async fn committed(&self, partitions: &[TopicPartition]) -> Result<Vec<Option<u64>>> {
        let group = self.group.as_ref().ok_or(ClientError::Config("not in a group"))?;
        group.committed(&self.fetcher.client, partitions).await
    }

    /// Commits (with automatic commit), leaves the group and stops heartbeating, so the
    /// partitions move to the other members at once instead of after the session timeout.
    pub async fn close(mut self) -> Result<()> {
        match self.group.take() {
            Some(group) => group.leave(&self.fetcher).await,
            None => Ok(()),
        }
    }
}
