//! Turning one decoded request into its response.
//!
//! [`handle`] runs in the connection's reader task, in request order. It does the *ordered*
//! part of a request right away (a produce's appends, so requests on one connection reach each
//! partition in the order they were sent) and returns the rest as a future; the connection's
//! writer awaits those futures in order and writes their responses.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use skein_net::frame::{self, RequestHeader};
use skein_net::{
    acks, encode_response, ApiKey, ApiVersion, ApiVersionsResponse, BrokerInfo, ErrorCode,
    FetchPartitionResponse, FetchRequest, FetchResponse, ListOffsetsPartitionResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataRequest, MetadataResponse, Part, PartitionMetadata,
    ProducePartitionResponse, ProduceRequest, ProduceResponse, Request, RequestError, TopicData,
    TopicMetadata, TopicResults,
};

use crate::groups::{self, GroupOp};
use crate::mesh;
use crate::shard::{FetchOutcome, LocalFuture, Records, Shard};

/// What the connection's writer sends for one request.
pub enum Outgoing {
    /// Nothing (a produce with `acks=0`).
    None,
    Frame(BytesMut),
    /// A fetch response: encoded bytes and records parts.
    Parts(Vec<Part<Records>>),
}

/// Handles one request frame. `frame` is the whole frame, header included.
pub async fn handle(shard: &Rc<Shard>, header: RequestHeader, frame: BytesMut) -> LocalFuture<Outgoing> {
    let correlation_id = header.correlation_id;
    let expects_response = header.expects_response();
    let version = header.api_version;
    let request = match Request::decode(&header, &frame[frame::REQUEST_HEADER_BYTES..]) {
        Ok(request) => request,
        // An ApiVersions at a version this broker does not speak (a newer client) is still
        // answered, at version 0 (which every client reads), with the versions it does speak,
        // so the client can retry at one of them.
        Err(RequestError::UnsupportedVersion { api: ApiKey::ApiVersions, .. }) if expects_response => {
            shard.metrics.errors(header.api_key, 1);
            let response =
                ApiVersionsResponse { error: ErrorCode::UnsupportedVersion, ..api_versions(shard) };
            return Box::pin(std::future::ready(Outgoing::Frame(encode_response(correlation_id, |w| {
                response.encode(w, 0)
            }))));
        }
        Err(error) => {
            shard.metrics.errors(header.api_key, 1);
            tracing::info!(%error, correlation_id, "refused a request");
            let outgoing = if expects_response {
                Outgoing::Frame(frame::encode_error_response(correlation_id, error.code()))
            } else {
                Outgoing::None
            };
            return Box::pin(std::future::ready(outgoing));
        }
    };
    let respond = move |body: BytesMut| if expects_response { Outgoing::Frame(body) } else { Outgoing::None };
    match request {
        Request::ApiVersions(_) => {
            let response = api_versions(shard);
            ready(respond(encode_response(correlation_id, |w| response.encode(w, version))))
        }
        Request::Metadata(request) => {
            let response = metadata(shard, &request);
            ready(respond(encode_response(correlation_id, |w| response.encode(w, version))))
        }
        Request::CreateTopics(request) => {
            let shard = shard.clone();
            Box::pin(async move {
                let topics = shard.request_create_topics(request.topics).await;
                respond(topic_results(&shard, ApiKey::CreateTopics, correlation_id, topics))
            })
        }
        Request::DeleteTopics(request) => {
            let shard = shard.clone();
            Box::pin(async move {
                let topics = shard.request_delete_topics(request.names).await;
                respond(topic_results(&shard, ApiKey::DeleteTopics, correlation_id, topics))
            })
        }
        Request::CreatePartitions(request) => {
            let shard = shard.clone();
            Box::pin(async move {
                let topics = shard.request_create_partitions(request.topics).await;
                respond(topic_results(&shard, ApiKey::CreatePartitions, correlation_id, topics))
            })
        }
        Request::AlterConfigs(request) => {
            let shard = shard.clone();
            Box::pin(async move {
                let topics = shard.request_alter_configs(request).await;
                respond(topic_results(&shard, ApiKey::AlterConfigs, correlation_id, topics))
            })
        }
        Request::Produce(request) => {
            let completion = produce(shard, request, frame).await;
            let shard = shard.clone();
            Box::pin(async move {
                let response = completion.await;
                let failed =
                    response.topics.iter().flat_map(|t| &t.partitions).filter(|p| !p.error.is_ok()).count();
                shard.metrics.errors(ApiKey::Produce as u16, failed);
                respond(encode_response(correlation_id, |w| response.encode(w)))
            })
        }
        Request::Fetch(request) => {
            let shard = shard.clone();
            Box::pin(async move {
                let response = fetch(&shard, request).await;
                let partitions = response.topics.iter().flat_map(|t| &t.partitions);
                let (failed, bytes) = partitions.fold((0, 0), |(failed, bytes), p| {
                    (failed + usize::from(!p.error.is_ok()), bytes + p.records.len())
                });
                shard.metrics.errors(ApiKey::Fetch as u16, failed);
                shard.metrics.fetched(bytes);
                if expects_response {
                    Outgoing::Parts(response.encode_parts(correlation_id))
                } else {
                    Outgoing::None
                }
            })
        }
        Request::ListOffsets(request) => {
            let shard = shard.clone();
            Box::pin(async move {
                let response = list_offsets(&shard, request).await;
                let failed =
                    response.topics.iter().flat_map(|t| &t.partitions).filter(|p| !p.error.is_ok()).count();
                shard.metrics.errors(ApiKey::ListOffsets as u16, failed);
                respond(encode_response(correlation_id, |w| response.encode(w)))
            })
        }
        Request::InitProducerId(request) => {
            let shard = shard.clone();
            Box::pin(async move {
                let response = shard.request_init_producer_id(request).await;
                respond(encode_response(correlation_id, |w| response.encode(w)))
            })
        }
        Request::ConsumerGroupHeartbeat(request) => {
            group(shard, correlation_id, GroupOp::Heartbeat(request), respond)
        }
        Request::OffsetCommit(request) => group(shard, correlation_id, GroupOp::Commit(request), respond),
        Request::OffsetFetch(request) => {
            group(shard, correlation_id, GroupOp::FetchOffsets(request), respond)
        }
        Request::DescribeGroup(request) => {
            group(shard, correlation_id, GroupOp::Describe(request.group_id), respond)
        }
        Request::DeleteGroup(request) => {
            group(shard, correlation_id, GroupOp::Delete(request.group_id), respond)
        }
        Request::ListGroups => {
            let shard = shard.clone();
            Box::pin(async move {
                let response = groups::request_list_groups(&shard).await;
                respond(encode_response(correlation_id, |w| response.encode(w)))
            })
        }
    }
}

/// Runs a group request on the group's coordinator shard.
fn group(
    shard: &Rc<Shard>,
    correlation_id: u32,
    op: GroupOp,
    respond: impl FnOnce(BytesMut) -> Outgoing + 'static,
) -> LocalFuture<Outgoing> {
    let shard = shard.clone();
    Box::pin(async move { respond(groups::request_group_op(&shard, correlation_id, op).await) })
}

fn ready(outgoing: Outgoing) -> LocalFuture<Outgoing> {
    Box::pin(std::future::ready(outgoing))
}

/// The handshake's answer: every API with the versions this build speaks, the limits, and who
/// this broker is.
fn api_versions(shard: &Shard) -> ApiVersionsResponse {
    ApiVersionsResponse {
        error: ErrorCode::None,
        broker_version: env!("CARGO_PKG_VERSION").to_owned(),
        apis: ApiKey::ALL
            .iter()
            .map(|api| ApiVersion {
                api_key: *api as u16,
                min_version: api.versions().0,
                max_version: api.versions().1,
            })
            .collect(),
        frame_bytes_max: shard.config.frame_bytes_max as u32,
        batch_bytes_max: shard.config.default_max_message_bytes,
        node_id: shard.config.node_id,
        build_commit: crate::BUILD_COMMIT.to_owned(),
    }
}

fn metadata(shard: &Shard, request: &MetadataRequest) -> MetadataResponse {
    let topics = shard.topics();
    let (host, port) = shard.advertised.borrow().clone();
    let node_id = shard.config.node_id;
    let describe = |name: &str| match topics.get(name) {
        Some(config) => TopicMetadata {
            name: name.to_owned(),
            error: ErrorCode::None,
            partitions: (0..config.partitions)
                // One node: it holds the only replica, always in sync, led at epoch 0.
                .map(|partition| PartitionMetadata {
                    partition,
                    error: ErrorCode::None,
                    leader: node_id,
                    leader_epoch: 0,
                    replicas: vec![node_id],
                    isr: vec![node_id],
                    shard: shard.route(name, partition).map(|(owner, _)| owner as u16),
                })
                .collect(),
            configs: config.to_configs(),
        },
        None => TopicMetadata {
            name: name.to_owned(),
            error: ErrorCode::UnknownTopicOrPartition,
            partitions: Vec::new(),
            configs: Vec::new(),
        },
    };
    let described = match &request.topics {
        None => topics.keys().map(|name| describe(name)).collect(),
        Some(names) => names.iter().map(|name| describe(name)).collect(),
    };
    MetadataResponse {
        brokers: vec![BrokerInfo {
            quic_port: shard.quic_port.get(),
            shards: Some(shard.shards as u16),
            ..BrokerInfo::new(node_id, host, port)
        }],
        controller_id: node_id,
        topics: described,
    }
}

fn partition_exists(shard: &Shard, topic: &str, partition: u32) -> bool {
    shard.topics().get(topic).is_some_and(|config| partition < config.partitions)
}

/// Appends every partition's records (in request order, on their owning shards) and returns the
/// future of the response.
async fn produce(
    shard: &Rc<Shard>,
    request: ProduceRequest<std::ops::Range<usize>>,
    frame: BytesMut,
) -> LocalFuture<ProduceResponse> {
    let valid_acks = matches!(request.acks, acks::NONE | acks::LEADER | acks::ALL);
    // Carve each partition's records out of the frame, in order, without copying.
    let mut rest = frame;
    let mut consumed = 0usize;
    let mut completions: Vec<(usize, LocalFuture<ProducePartitionResponse>)> = Vec::new();
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for partition in topic.partitions {
            let start = partition.records.start + frame::REQUEST_HEADER_BYTES;
            let end = partition.records.end + frame::REQUEST_HEADER_BYTES;
            rest.advance(start - consumed);
            let records = rest.split_to(end - start);
            consumed = end;
            let partition_index = partition.partition;
            let immediate = move |error| ProducePartitionResponse {
                partition: partition_index,
                error,
                base_offset: 0,
                last_offset: 0,
                log_start_offset: 0,
            };
            let completion: LocalFuture<ProducePartitionResponse> = if !valid_acks {
                Box::pin(std::future::ready(immediate(ErrorCode::InvalidRequiredAcks)))
            } else if !partition_exists(shard, &topic.name, partition.partition) {
                Box::pin(std::future::ready(immediate(ErrorCode::UnknownTopicOrPartition)))
            } else {
                match shard.route(&topic.name, partition.partition) {
                    None => Box::pin(std::future::ready(immediate(ErrorCode::UnknownTopicOrPartition))),
                    Some((owner, _)) if owner == shard.id => {
                        shard
                            .produce(
                                &topic.name,
                                partition.partition,
                                records,
                                request.acks,
                                request.timeout_ms,
                            )
                            .await
                    }
                    Some((owner, tp)) => {
                        shard.metrics.forwarded(ApiKey::Produce);
                        let call =
                            mesh::Produce { tp, records, acks: request.acks, timeout_ms: request.timeout_ms };
                        // The produce's own timeout, plus time for the answer to come back.
                        let within = Duration::from_millis(request.timeout_ms.into()) + CALL_SLACK;
                        match shard.call_ordered_within(owner, call, within).await {
                            Ok(reply) => Box::pin(async move {
                                reply.await.unwrap_or_else(|error| immediate(error.code()))
                            }),
                            Err(error) => Box::pin(std::future::ready(immediate(error.code()))),
                        }
                    }
                }
            };
            completions.push((topics.len(), completion));
            partitions.push(());
        }
        topics.push((topic.name, partitions.len()));
    }
    Box::pin(async move {
        let mut by_topic: Vec<TopicData<ProducePartitionResponse>> = topics
            .iter()
            .map(|(name, count)| TopicData { name: name.clone(), partitions: Vec::with_capacity(*count) })
            .collect();
        let indexes: Vec<usize> = completions.iter().map(|(index, _)| *index).collect();
        let responses =
            futures::future::join_all(completions.into_iter().map(|(_, completion)| completion)).await;
        for (index, response) in indexes.into_iter().zip(responses) {
            by_topic[index].partitions.push(response);
        }
        ProduceResponse { topics: by_topic }
    })
}

/// Time a forwarded call gets beyond its own timeout for the answer to come back.
const CALL_SLACK: Duration = Duration::from_secs(5);

/// One partition of a fetch, with where its answer goes.
struct FetchSlot {
    topic_index: usize,
    topic: String,
    partition: u32,
    offset: u64,
    partition_bytes_max: u32,
}

/// Long-poll fetch: reads every partition (grouped by owning shard, this shard first), and if
/// fewer than `min_bytes` came back, waits for data on any of them, up to `max_wait_ms`.
async fn fetch(shard: &Rc<Shard>, request: FetchRequest) -> FetchResponse<Records> {
    let deadline = Instant::now() + Duration::from_millis(request.max_wait_ms.into());
    let mut slots = Vec::new();
    let topic_names: Vec<String> = request.topics.iter().map(|t| t.name.clone()).collect();
    for (topic_index, topic) in request.topics.into_iter().enumerate() {
        for partition in topic.partitions {
            slots.push(FetchSlot {
                topic_index,
                topic: topic.name.clone(),
                partition: partition.partition,
                offset: partition.fetch_offset,
                partition_bytes_max: partition.partition_bytes_max,
            });
        }
    }
    loop {
        let outcomes = read_pass(shard, &slots, request.max_bytes).await;
        let total: usize = outcomes.iter().map(|o| o.records.len()).sum();
        let failed = outcomes.iter().any(|o| !o.error.is_ok());
        let now = Instant::now();
        if total >= request.min_bytes.max(1) as usize
            || now >= deadline
            || failed
            || shard.shutting_down.get()
        {
            let mut topics: Vec<TopicData<FetchPartitionResponse<Records>>> = topic_names
                .iter()
                .map(|name| TopicData { name: name.clone(), partitions: Vec::new() })
                .collect();
            for (slot, outcome) in slots.iter().zip(outcomes) {
                topics[slot.topic_index].partitions.push(FetchPartitionResponse {
                    partition: slot.partition,
                    error: outcome.error,
                    high_watermark: outcome.high_watermark,
                    log_start_offset: outcome.log_start_offset,
                    records: outcome.records,
                });
            }
            return FetchResponse { topics };
        }
        drop(outcomes);
        // Wait for records on any of the partitions, on their shards.
        let remaining = (deadline - now).as_millis().max(1) as u32;
        let mut by_owner: BTreeMap<usize, Vec<(skein_net::TopicPartition, u64)>> = BTreeMap::new();
        for slot in &slots {
            if let Some((owner, tp)) = shard.route(&slot.topic, slot.partition) {
                by_owner.entry(owner).or_default().push((tp, slot.offset));
            }
        }
        let within = Duration::from_millis(remaining.into()) + CALL_SLACK;
        let waits: Vec<LocalFuture<()>> = by_owner
            .into_iter()
            .map(|(owner, partitions)| {
                let shard = shard.clone();
                Box::pin(async move {
                    let call = mesh::WaitForData { partitions, timeout_ms: remaining };
                    if shard.call_within(owner, call, within).await.is_err() {
                        // The owner is stopping or slow: wait out the fetch's time here, and
                        // the next read pass reports what is wrong.
                        glommio::timer::sleep(Duration::from_millis(remaining.into())).await;
                    }
                }) as LocalFuture<()>
            })
            .collect();
        if waits.is_empty() {
            glommio::timer::sleep(deadline - now).await;
        } else {
            futures::future::select_all(waits).await;
        }
    }
}

/// Reads every slot once; the response byte budget is spent in request order, one shard group
/// at a time (this shard's first).
async fn read_pass(shard: &Rc<Shard>, slots: &[FetchSlot], max_bytes: u32) -> Vec<FetchOutcome> {
    let mut outcomes: Vec<Option<FetchOutcome>> = (0..slots.len()).map(|_| None).collect();
    let mut reads: BTreeMap<(bool, usize), Vec<(usize, mesh::FetchRead)>> = BTreeMap::new();
    for (index, slot) in slots.iter().enumerate() {
        let Some((owner, tp)) = shard.route(&slot.topic, slot.partition) else {
            outcomes[index] = Some(FetchOutcome::error(ErrorCode::UnknownTopicOrPartition));
            continue;
        };
        let read = mesh::FetchRead { tp, offset: slot.offset, partition_bytes_max: slot.partition_bytes_max };
        let remote = owner != shard.id;
        if remote {
            shard.metrics.forwarded(ApiKey::Fetch);
        }
        reads.entry((remote, owner)).or_default().push((index, read));
    }
    let call = |owner: usize, reads: Vec<mesh::FetchRead>, bytes_max: u32| async move {
        let count = reads.len();
        match shard.call(owner, mesh::Fetch { reads, bytes_max }).await {
            Ok(results) => results,
            Err(error) => (0..count).map(|_| FetchOutcome::error(error.code())).collect(),
        }
    };
    // When the partitions' limits together fit the budget, every shard reads its part at once
    // (their disk reads overlap), and the budget is then spent over the groups in the order a
    // sequential pass would have used (`spend_budget`: a batch larger than its partition's
    // limit cannot take the response past the budget). Otherwise one shard group after
    // another, each given what is left (each shard reads its group with many reads in flight,
    // `shard::read_within_budget`; this shard cannot bound what another's partitions hold).
    let wanted: u64 = slots.iter().map(|s| u64::from(s.partition_bytes_max)).sum();
    if wanted <= u64::from(max_bytes) {
        let calls = reads.into_iter().map(|((_, owner), group)| {
            let (indexes, reads): (Vec<usize>, Vec<mesh::FetchRead>) = group.into_iter().unzip();
            async move { (indexes, call(owner, reads, max_bytes).await) }
        });
        let mut answered = futures::future::join_all(calls).await;
        crate::shard::spend_budget(
            answered.iter_mut().flat_map(|(_, results)| results.iter_mut()),
            max_bytes as usize,
        );
        for (indexes, results) in answered {
            for (index, outcome) in indexes.into_iter().zip(results) {
                outcomes[index] = Some(outcome);
            }
        }
    } else {
        let mut budget = max_bytes;
        for ((_, owner), group) in reads {
            let (indexes, reads): (Vec<usize>, Vec<mesh::FetchRead>) = group.into_iter().unzip();
            for (index, outcome) in indexes.into_iter().zip(call(owner, reads, budget).await) {
                budget = budget.saturating_sub(outcome.records.len() as u32);
                outcomes[index] = Some(outcome);
            }
        }
    }
    outcomes.into_iter().map(|o| o.expect("every slot answered")).collect()
}

/// The offsets of every partition asked for: one call per owning shard, all at once (one call
/// per partition, one after another, took half a second for a topic of 10,000 partitions on 2
/// shards, and a consumer's start or `skein topic describe` asks twice).
async fn list_offsets(shard: &Rc<Shard>, request: ListOffsetsRequest) -> ListOffsetsResponse {
    // Every answer starts as "unknown"; the owners' answers replace those of the partitions
    // they own.
    let mut topics: Vec<TopicData<ListOffsetsPartitionResponse>> = request
        .topics
        .iter()
        .map(|topic| TopicData {
            name: topic.name.clone(),
            partitions: topic
                .partitions
                .iter()
                .map(|p| ListOffsetsPartitionResponse {
                    partition: p.partition,
                    error: ErrorCode::UnknownTopicOrPartition,
                    offset: -1,
                })
                .collect(),
        })
        .collect();
    // Per owning shard: where each answer goes (topic, partition index) and what to ask.
    type Asked = (Vec<(usize, usize)>, Vec<(skein_net::TopicPartition, i64)>);
    let mut by_owner: BTreeMap<usize, Asked> = BTreeMap::new();
    for (t, topic) in request.topics.iter().enumerate() {
        for (p, partition) in topic.partitions.iter().enumerate() {
            if !partition_exists(shard, &topic.name, partition.partition) {
                continue;
            }
            if let Some((owner, tp)) = shard.route(&topic.name, partition.partition) {
                let (slots, asked) = by_owner.entry(owner).or_default();
                slots.push((t, p));
                asked.push((tp, partition.timestamp));
            }
        }
    }
    let calls = by_owner.into_iter().map(|(owner, (slots, asked))| async move {
        (slots, shard.call(owner, mesh::ListOffsets { partitions: asked }).await)
    });
    for (slots, answered) in futures::future::join_all(calls).await {
        match answered {
            // The owner answers every partition, in order.
            Ok(answered) => {
                for ((t, p), answer) in slots.into_iter().zip(answered) {
                    topics[t].partitions[p] = answer;
                }
            }
            Err(error) => {
                for (t, p) in slots {
                    topics[t].partitions[p].error = error.code();
                }
            }
        }
    }
    ListOffsetsResponse { topics }
}

/// Frame-level error with no body.
pub fn error_frame(correlation_id: u32, error: ErrorCode) -> Outgoing {
    Outgoing::Frame(frame::encode_error_response(correlation_id, error))
}

/// The answer of a per-topic admin API (CreateTopics, DeleteTopics, CreatePartitions,
/// AlterConfigs), its refused topics counted as errors of `api`.
fn topic_results(
    shard: &Shard,
    api: ApiKey,
    correlation_id: u32,
    topics: Vec<skein_net::TopicResult>,
) -> BytesMut {
    shard.metrics.errors(api as u16, topics.iter().filter(|t| !t.error.is_ok()).count());
    encode_response(correlation_id, |w| TopicResults { topics }.encode(w))
}
