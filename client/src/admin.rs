//! Topic administration.

use skein_net::{
    CreateTopicsRequest, DeleteTopicsRequest, ErrorCode, ListOffsetsPartition, ListOffsetsRequest,
    ListOffsetsResponse, NewTopic, Request, TopicData, TopicResults, EARLIEST_TIMESTAMP, LATEST_TIMESTAMP,
};

use crate::{decode, Client, ClientError, Result};

/// Creates, deletes, lists and describes topics.
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
        let offset = |response: &ListOffsetsResponse, partition: u32| {
            response
                .topics
                .iter()
                .flat_map(|t| t.partitions.iter())
                .find(|p| p.partition == partition && p.error.is_ok())
                .map_or(0, |p| p.offset.max(0) as u64)
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
}
