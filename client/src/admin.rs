//! Topic and consumer-group administration.

use std::collections::HashMap;

use skein_net::{
    AlterConfigsRequest, AlterTopicConfig, CommitPartition, CreatePartitionsRequest, CreateTopicsRequest,
    DeleteGroupRequest, DeleteGroupResponse, DeleteTopicsRequest, DescribeGroupRequest,
    DescribeGroupResponse, ErrorCode, GroupListing, ListGroupsResponse, ListOffsetsPartition,
    ListOffsetsPartitionResponse, ListOffsetsRequest, ListOffsetsResponse, MemberDescription, NewTopic,
    OffsetCommitRequest, OffsetCommitResponse, Request, TopicData, TopicResults, ADMIN_EPOCH,
    EARLIEST_TIMESTAMP, LATEST_TIMESTAMP,
};

use crate::fetcher::by_partition;
use crate::{decode, Client, ClientError, Consumer, ConsumerConfig, Result, SeekTo, TopicPartition};

/// Creates, deletes, lists and describes topics; lists, describes and resets consumer groups.
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

/// One partition as `describe_topic` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDescription {
    pub partition: u32,
    pub leader: u32,
    /// First offset held.
    pub start_offset: u64,
    /// Offset after the last readable record.
    pub end_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    pub name: String,
    pub partitions: Vec<PartitionDescription>,
    pub configs: Vec<(String, String)>,
}

fn check(results: TopicResults, action: &str) -> Result<()> {
    for result in results.topics {
        if !result.error.is_ok() {
            let detail =
                if result.message.is_empty() { String::new() } else { format!(": {}", result.message) };
            return Err(ClientError::broker(result.error, format!("{action} {}{detail}", result.name)));
        }
    }
    Ok(())
}

impl Admin {
    pub fn new(client: Client) -> Admin {
        Admin { client }
    }

    /// Creates a topic. `configs` are topic settings such as `("retention.ms", "86400000")`.
    pub async fn create_topic(&self, name: &str, partitions: u32, configs: &[(&str, &str)]) -> Result<()> {
        let request = Request::CreateTopics(CreateTopicsRequest {
            topics: vec![NewTopic {
                name: name.to_owned(),
                partitions,
                configs: configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            }],
            timeout_ms: 30_000,
        });
        let body = self.client.request(&request).await?;
        check(decode(&body, TopicResults::decode)?, "creating topic")?;
        self.client.forget_topic(name);
        Ok(())
    }

    /// Grows a topic to `total` partitions (more than it has). Existing partitions keep their
    /// data; keyed records may map to other partitions from now on.
    pub async fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        let request =
            Request::CreatePartitions(CreatePartitionsRequest { topics: vec![(name.to_owned(), total)] });
        let body = self.client.request(&request).await?;
        self.client.forget_topic(name);
        check(decode(&body, TopicResults::decode)?, "adding partitions")
    }

    /// Changes a topic's settings (Kafka's incremental alter): each `set` key takes its value,
    /// each `reset` key goes back to the broker's default, the others keep theirs. With
    /// `validate_only` the broker checks every rule and changes nothing. Takes effect at once
    /// on the topic's partitions.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: &[(&str, &str)],
        reset: &[&str],
        validate_only: bool,
    ) -> Result<()> {
        let request = Request::AlterConfigs(AlterConfigsRequest {
            topics: vec![AlterTopicConfig {
                name: name.to_owned(),
                set: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                reset: reset.iter().map(|k| k.to_string()).collect(),
            }],
            validate_only,
        });
        let body = self.client.request(&request).await?;
        self.client.forget_topic(name);
        check(decode(&body, TopicResults::decode)?, "altering topic settings")
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let request =
            Request::DeleteTopics(DeleteTopicsRequest { names: vec![name.to_owned()], timeout_ms: 30_000 });
        let body = self.client.request(&request).await?;
        self.client.forget_topic(name);
        check(decode(&body, TopicResults::decode)?, "deleting topic")
    }

    /// Every topic's name.
    pub async fn list_topics(&self) -> Result<Vec<String>> {
        let metadata = self.client.metadata(None).await?;
        Ok(metadata.topics.into_iter().map(|t| t.name).collect())
    }

    /// A topic's partitions (with their offset ranges) and settings.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let metadata = self.client.metadata(Some(vec![name.to_owned()])).await?;
        let topic = metadata
            .topics
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| ClientError::UnknownTopic(name.to_owned()))?;
        if topic.error == ErrorCode::UnknownTopicOrPartition {
            return Err(ClientError::UnknownTopic(name.to_owned()));
        }
        if !topic.error.is_ok() {
            return Err(ClientError::broker(topic.error, format!("describing {name}")));
        }
        let query = |timestamp| {
            Request::ListOffsets(ListOffsetsRequest {
                topics: vec![TopicData {
                    name: name.to_owned(),
                    partitions: topic
                        .partitions
                        .iter()
                        .map(|p| ListOffsetsPartition { partition: p.partition, timestamp })
                        .collect(),
                }],
            })
        };
        let starts =
            decode(&self.client.request(&query(EARLIEST_TIMESTAMP)).await?, ListOffsetsResponse::decode)?;
        let ends =
            decode(&self.client.request(&query(LATEST_TIMESTAMP)).await?, ListOffsetsResponse::decode)?;
        let (starts, ends) =
            (by_partition(&starts.topics, |p| p.partition), by_partition(&ends.topics, |p| p.partition));
        let offset = |answers: &HashMap<(&str, u32), &ListOffsetsPartitionResponse>, partition: u32| {
            answers.get(&(name, partition)).filter(|p| p.error.is_ok()).map_or(0, |p| p.offset.max(0) as u64)
        };
        Ok(TopicDescription {
            name: topic.name,
            partitions: topic
                .partitions
                .iter()
                .map(|p| PartitionDescription {
                    partition: p.partition,
                    leader: p.leader,
                    start_offset: offset(&starts, p.partition),
                    end_offset: offset(&ends, p.partition),
                })
                .collect(),
            configs: topic.configs,
        })
    }

    /// Every consumer group the broker knows (with members, or with committed offsets only).
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let body = self.client.request(&Request::ListGroups).await?;
        let response = decode(&body, ListGroupsResponse::decode)?;
        if !response.error.is_ok() {
            return Err(ClientError::broker(response.error, "listing groups"));
        }
        Ok(response.groups)
    }

    /// Deletes a group and its committed offsets. Refused with `GroupNotEmpty` while it has
    /// members; `GroupIdNotFound` if the broker does not know it.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        let request = Request::DeleteGroup(DeleteGroupRequest { group_id: group.to_owned() });
        let body = self.client.request(&request).await?;
        let response = decode(&body, DeleteGroupResponse::decode)?;
        if !response.error.is_ok() {
            return Err(ClientError::broker(response.error, format!("deleting group {group}")));
        }
        Ok(())
    }

    /// A group's members and what they own, and its committed offsets with the lag of each
    /// partition (end offset minus committed offset).
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let request = Request::DescribeGroup(DescribeGroupRequest { group_id: group.to_owned() });
        let body = self.client.request(&request).await?;
        let response = decode(&body, DescribeGroupResponse::decode)?;
        if !response.error.is_ok() {
            return Err(ClientError::broker(response.error, format!("describing group {group}")));
        }
        let mut offsets = Vec::new();
        for topic in &response.offsets {
            let ends = match self.describe_topic(&topic.name).await {
                Ok(description) => description.partitions,
                Err(ClientError::UnknownTopic(_)) => Vec::new(),
                Err(error) => return Err(error),
            };
            let ends: HashMap<u32, u64> = ends.iter().map(|p| (p.partition, p.end_offset)).collect();
            // The first member that lists a partition owns it.
            let mut owners: HashMap<u32, &str> = HashMap::new();
            for member in &response.members {
                for assigned in member.assigned.iter().filter(|t| t.topic == topic.name) {
                    for &partition in &assigned.partitions {
                        owners.entry(partition).or_insert(&member.member_id);
                    }
                }
            }
            for committed in &topic.partitions {
                let end_offset = ends.get(&committed.partition).copied();
                let owner = owners.get(&committed.partition).map(|member| (*member).to_owned());
                let offset = committed.offset.max(0) as u64;
                offsets.push(PartitionLag {
                    topic: topic.name.clone(),
                    partition: committed.partition,
                    committed: offset,
                    end_offset,
                    lag: end_offset.map(|end| end.saturating_sub(offset)),
                    owner,
                });
            }
        }
        Ok(GroupDescription {
            group_id: response.group_id,
            state: response.state,
            group_epoch: response.group_epoch,
            members: response.members,
            offsets,
        })
    }

    /// Sets a group's committed offsets of every partition of `topic` (to the earliest or latest
    /// offset, an offset, or the first offset at a timestamp). Refused with `GroupNotEmpty` while
    /// the group has members. Returns `(partition, offset)` as committed.
    pub async fn reset_offsets(&self, group: &str, topic: &str, to: SeekTo) -> Result<Vec<(u32, u64)>> {
        let plan = self.plan_reset(group, topic, ResetTo::Seek(to), None).await?;
        self.apply_reset(group, topic, &plan).await?;
        Ok(plan.iter().map(|p| (p.partition, p.after)).collect())
    }

    /// What a reset would commit, without committing it (a dry run): per partition of `topic`
    /// (or of `partitions` only), the committed offset now and the one after. `ShiftBy` moves
    /// each committed offset (the log start where there is none) by N, kept within the log.
    pub async fn plan_reset(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
        partitions: Option<&[u32]>,
    ) -> Result<Vec<OffsetReset>> {
        let description = self.describe_topic(topic).await?;
        let chosen: Vec<u32> = match partitions {
            Some(list) => {
                for &partition in list {
                    if partition as usize >= description.partitions.len() {
                        return Err(ClientError::UnknownPartition { topic: topic.to_owned(), partition });
                    }
                }
                list.to_vec()
            }
            None => description.partitions.iter().map(|p| p.partition).collect(),
        };
        let keys: Vec<TopicPartition> = chosen.iter().map(|&p| TopicPartition::new(topic, p)).collect();
        let before = self.committed_offsets(group, &keys).await?;
        let after: Vec<u64> = match to {
            ResetTo::Seek(to) => {
                let mut reader = Consumer::new(self.client.clone(), ConsumerConfig::default());
                reader.assign(topic, &chosen).await?;
                reader.seek_all(to).await?;
                chosen.iter().map(|&p| reader.position(topic, p).expect("seeked")).collect()
            }
            ResetTo::ShiftBy(shift) => chosen
                .iter()
                .zip(&before)
                .map(|(&p, committed)| {
                    let range = &description.partitions[p as usize];
                    let from = committed.unwrap_or(range.start_offset) as i128;
                    (from + i128::from(shift)).clamp(range.start_offset as i128, range.end_offset as i128)
                        as u64
                })
                .collect(),
        };
        Ok(chosen
            .into_iter()
            .zip(before)
            .zip(after)
            .map(|((partition, before), after)| OffsetReset { partition, before, after })
            .collect())
    }

    /// Commits a planned reset ([`Admin::plan_reset`]). Refused with `GroupNotEmpty` while the
    /// group has members.
    pub async fn apply_reset(&self, group: &str, topic: &str, plan: &[OffsetReset]) -> Result<()> {
        let request = Request::OffsetCommit(OffsetCommitRequest {
            group_id: group.to_owned(),
            member_id: String::new(),
            member_epoch: ADMIN_EPOCH,
            topics: vec![TopicData {
                name: topic.to_owned(),
                partitions: plan
                    .iter()
                    .map(|p| CommitPartition {
                        partition: p.partition,
                        offset: p.after,
                        metadata: String::new(),
                    })
                    .collect(),
            }],
        });
        let body = self.client.request(&request).await?;
        let response = decode(&body, OffsetCommitResponse::decode)?;
        if !response.error.is_ok() {
            return Err(ClientError::broker(
                response.error,
                format!("resetting the offsets of group {group}"),
            ));
        }
        for p in response.topics.iter().flat_map(|t| t.partitions.iter()) {
            if !p.error.is_ok() {
                return Err(ClientError::broker(
                    p.error,
                    format!("resetting {topic}/{} for group {group}", p.partition),
                ));
            }
        }
        Ok(())
    }

    /// A group's committed offset of each partition (`None`: no commit).
    pub async fn committed_offsets(
        &self,
        group: &str,
        partitions: &[TopicPartition],
    ) -> Result<Vec<Option<u64>>> {
        crate::group::fetch_committed(&self.client, group, partitions).await
    }
}

/// Where [`Admin::plan_reset`] moves committed offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    Seek(SeekTo),
    /// By this many records (negative: back), from the committed offset.
    ShiftBy(i64),
}

/// One partition of a reset: the committed offset before (`None`: none) and after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetReset {
    pub partition: u32,
    pub before: Option<u64>,
    pub after: u64,
}

/// One partition of a group, as `describe_group` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: u32,
    pub committed: u64,
    /// `None` if the topic no longer exists.
    pub end_offset: Option<u64>,
    pub lag: Option<u64>,
    /// The member that owns the partition now.
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    /// `empty`, `reconciling` or `stable`.
    pub state: String,
    pub group_epoch: i32,
    pub members: Vec<MemberDescription>,
    pub offsets: Vec<PartitionLag>,
}
