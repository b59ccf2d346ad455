//! The producer's sequence rules against a scripted broker (a plain TCP server speaking the
//! Skein protocol, whose answers each test chooses): what a refusal does to a batch and to the
//! batches of its partition behind it; and how records are batched while every request slot is
//! taken. The real broker's side is tested in skein-broker.
//!
//! The scripted broker speaks only version 0 of every API, as a broker built before any v1
//! existed: it refuses a request at any other version at the frame level. So every test here
//! also shows that this client falls back to version 0 against an old broker (ApiVersions
//! first, then Metadata in the v0 layout).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use skein_client::{Acks, Client, ClientConfig, ClientError, Producer, ProducerConfig, ProducerRecord};
use skein_net::frame::{self, RequestHeader};
use skein_net::{
    encode_response, ApiVersionsResponse, BrokerInfo, ErrorCode, InitProducerIdResponse, MetadataResponse,
    PartitionMetadata, ProducePartitionResponse, ProduceResponse, Request, TopicData, TopicMetadata,
};
use skein_storage::batch::BatchHeader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One produced batch as the scripted broker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    epoch: i16,
    sequence: i32,
    records: u32,
}

/// The broker's idempotence rule for one producer on one partition (as skein-broker's
/// producer table applies it).
#[derive(Debug, Default)]
struct Sequences {
    epoch: i16,
    /// The sequence the next batch must start at; `None`: the producer is unknown here.
    next: Option<i32>,
}

impl Sequences {
    fn check(&mut self, seen: &Seen) -> ErrorCode {
        let accepted = match self.next {
            None => seen.sequence == 0,
            Some(_) if seen.epoch < self.epoch => return ErrorCode::ProducerFenced,
            Some(_) if seen.epoch > self.epoch => seen.sequence == 0,
            Some(next) => seen.sequence == next,
        };
        if !accepted {
            return ErrorCode::OutOfOrderSequence;
        }
        self.epoch = seen.epoch;
        self.next = Some(seen.sequence + seen.records as i32);
        ErrorCode::None
    }
}

/// What the broker answers to the n-th produced batch (counting from 0): `Some` overrides the
/// idempotence rule (nothing is written), `None` applies it.
type Script = Arc<dyn Fn(usize, &Seen, &mut Sequences) -> Option<ErrorCode> + Send + Sync>;

#[derive(Default)]
struct Log {
    batches: Vec<Seen>,
    /// Answers given, in the order of `batches`.
    answers: Vec<ErrorCode>,
    /// Epochs handed out by InitProducerId, in order.
    epochs: Vec<i16>,
    sequences: Sequences,
    next_offset: u64,
    /// Requests refused for their version: (api key, version).
    refused_versions: Vec<(u16, u16)>,
}

/// A broker with one topic `t` of one partition that answers produce requests per `script`,
/// each after `delay` (so that a client has several requests in flight).
async fn scripted_broker(script: Script, delay: Duration) -> (String, Arc<Mutex<Log>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log = Arc::new(Mutex::new(Log::default()));
    let shared = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let (log, script) = (shared.clone(), script.clone());
            tokio::spawn(async move {
                let mut buffer = BytesMut::new();
                loop {
                    while let Ok(Some(len)) = frame::request_frame_len(&buffer, 64 << 20) {
                        let whole = buffer.split_to(len);
                        let header: RequestHeader = frame::decode_request_header(&whole).unwrap();
                        let body = &whole[frame::REQUEST_HEADER_BYTES..];
                        if header.api_version != 0 {
                            log.lock().unwrap().refused_versions.push((header.api_key, header.api_version));
                            let refusal = frame::encode_error_response(
                                header.correlation_id,
                                ErrorCode::UnsupportedVersion,
                            );
                            if stream.write_all(&refusal).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let request = Request::decode(&header, body).unwrap();
                        let is_produce = matches!(request, Request::Produce(_));
                        let response = answer(request, body, &log, &script);
                        if is_produce {
                            tokio::time::sleep(delay).await;
                        }
                        if header.expects_response() {
                            let frame = encode_response(header.correlation_id, |w| response(w));
                            if stream.write_all(&frame).await.is_err() {
                                return;
                            }
                        }
                    }
                    match stream.read_buf(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    (addr, log)
}

type Body = Box<dyn FnOnce(&mut skein_net::Writer) + Send>;

fn answer(request: Request<std::ops::Range<usize>>, body: &[u8], log: &Mutex<Log>, script: &Script) -> Body {
    match request {
        Request::ApiVersions(_) => {
            let response = ApiVersionsResponse {
                error: ErrorCode::None,
                broker_version: "scripted".into(),
                apis: skein_net::ApiKey::ALL
                    .iter()
                    .map(|api| skein_net::ApiVersion { api_key: *api as u16, min_version: 0, max_version: 0 })
                    .collect(),
                frame_bytes_max: 64 << 20,
                batch_bytes_max: 8 << 20,
                node_id: 0,
                build_commit: String::new(),
            };
            Box::new(move |w| response.encode(w, 0))
        }
        Request::Metadata(_) => {
            let response = MetadataResponse {
                brokers: vec![BrokerInfo::new(0, "127.0.0.1", 0)],
                controller_id: 0,
                topics: vec![TopicMetadata {
                    name: "t".into(),
                    error: ErrorCode::None,
                    partitions: vec![PartitionMetadata {
                        partition: 0,
                        error: ErrorCode::None,
                        leader: 0,
                        leader_epoch: 0,
                        replicas: Vec::new(),
                        isr: Vec::new(),
                        shard: None,
                    }],
                    configs: Vec::new(),
                }],
            };
            Box::new(move |w| response.encode(w, 0))
        }
        Request::InitProducerId(request) => {
            let epoch = if request.producer_id < 0 { 0 } else { request.producer_epoch + 1 };
            log.lock().unwrap().epochs.push(epoch);
            let response =
                InitProducerIdResponse { error: ErrorCode::None, producer_id: 7, producer_epoch: epoch };
            Box::new(move |w| response.encode(w))
        }
        Request::Produce(request) => {
            let mut topics = Vec::new();
            for topic in request.topics {
                let mut partitions = Vec::new();
                for partition in topic.partitions {
                    let header = BatchHeader::parse(&body[partition.records.clone()], usize::MAX).unwrap();
                    let seen = Seen {
                        epoch: header.producer_epoch,
                        sequence: header.base_sequence,
                        records: header.record_count,
                    };
                    let mut log = log.lock().unwrap();
                    let index = log.batches.len();
                    log.batches.push(seen);
                    let error = match script(index, &seen, &mut log.sequences) {
                        Some(error) => error,
                        None => log.sequences.check(&seen),
                    };
                    log.answers.push(error);
                    let base_offset = log.next_offset;
                    if error.is_ok() {
                        log.next_offset += u64::from(seen.records);
                    }
                    partitions.push(ProducePartitionResponse {
                        partition: partition.partition,
                        error,
                        base_offset,
                        last_offset: base_offset + u64::from(seen.records) - 1,
                        log_start_offset: 0,
                    });
                }
                topics.push(TopicData { name: topic.name, partitions });
            }
            let response = ProduceResponse { topics };
            Box::new(move |w| response.encode(w))
        }
        other => panic!("the scripted broker does not expect {:?}", other.api_key()),
    }
}

fn config() -> ProducerConfig {
    ProducerConfig::default()
        .acks(Acks::All)
        .linger(Duration::from_millis(1))
        .retry_backoff(Duration::from_millis(5))
        .retry_backoff_max(Duration::from_millis(20))
}

async fn send_one_by_one(producer: &Producer, count: usize) -> Vec<Result<u64, ClientError>> {
    let mut outcomes = Vec::new();
    for i in 0..count {
        let delivery = producer.send(ProducerRecord::new("t", format!("r{i}"))).await.unwrap();
        outcomes.push(delivery.await.map(|m| m.offset.unwrap()));
    }
    outcomes
}

#[tokio::test]
async fn a_gap_before_the_first_unacknowledged_batch_moves_the_partition_to_a_new_epoch() {
    // The broker acknowledges two batches, then behaves as if it had lost them (or forgotten
    // the producer): it refuses the third as out of order until it comes with a new epoch.
    let script: Script = Arc::new(|index, _, sequences| {
        if index == 2 {
            sequences.next = None;
        }
        None
    });
    let (addr, log) = scripted_broker(script, Duration::ZERO).await;
    let producer = Producer::new(Client::connect(ClientConfig::new(addr)).await.unwrap(), config());
    let outcomes = send_one_by_one(&producer, 4).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let (epochs, seen) = {
        let log = log.lock().unwrap();
        (log.epochs.clone(), log.batches.iter().map(|s| (s.epoch, s.sequence)).collect::<Vec<(i16, i32)>>())
    };
    assert_eq!(epochs, vec![0, 1], "one new epoch was asked for");
    assert_eq!(
        seen,
        vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)],
        "the refused batch is resent at once under the new epoch from sequence 0, and the next follows"
    );
    assert_eq!(producer.producer_id().await.unwrap(), Some((7, 1)));
    // Against this version-0 broker the client asked for ApiVersions v1 once, was refused,
    // and sent everything after at version 0 (any other version would be refused and logged).
    assert_eq!(log.lock().unwrap().refused_versions, vec![(skein_net::ApiKey::ApiVersions as u16, 1)]);
}

#[tokio::test]
async fn refusals_caused_by_an_earlier_batch_cost_no_attempt() {
    // One retry allowed. The first batch times out once; the batches behind it, in flight at
    // the same time, are refused as out of order because of it. Those refusals must cost
    // nothing: all six get through, in order, with no new epoch.
    let script: Script = Arc::new(|index, _, _| (index == 0).then_some(ErrorCode::RequestTimedOut));
    let (addr, log) = scripted_broker(script, Duration::from_millis(30)).await;
    let producer = Producer::new(
        Client::connect(ClientConfig::new(addr)).await.unwrap(),
        // One record per batch (a batch is sealed once it reaches 64 bytes).
        config().retries(1).batch_bytes(64),
    );
    let mut deliveries = Vec::new();
    for i in 0..6 {
        deliveries.push(producer.send(ProducerRecord::new("t", format!("record-{i}"))).await.unwrap());
    }
    producer.flush().await.unwrap();
    let mut offsets = Vec::new();
    for delivery in deliveries {
        offsets.push(delivery.await.expect("acknowledged").offset.unwrap());
    }
    assert_eq!(offsets, (0..6).collect::<Vec<u64>>(), "in order, each once");
    let log = log.lock().unwrap();
    assert_eq!(log.epochs, vec![0], "no gap, no new epoch");
    let refused = log.answers.iter().filter(|a| **a == ErrorCode::OutOfOrderSequence).count();
    assert!(refused >= 3, "batches behind the first were in flight and refused ({refused})");
    let written: Vec<i32> = log
        .batches
        .iter()
        .zip(&log.answers)
        .filter(|(_, answer)| answer.is_ok())
        .map(|(seen, _)| seen.sequence)
        .collect();
    assert_eq!(written, (0..6).collect::<Vec<i32>>(), "resent in sequence order, oldest first");
}

#[tokio::test]
async fn a_batch_refused_for_good_fails_alone_and_the_rest_get_through() {
    // The broker refuses the second batch for good (corrupt): that record fails, the third is
    // refused because of the gap it leaves, and is repaired under a new epoch.
    let script: Script = Arc::new(|index, _, _| (index == 1).then_some(ErrorCode::CorruptBatch));
    let (addr, log) = scripted_broker(script, Duration::ZERO).await;
    let producer = Producer::new(Client::connect(ClientConfig::new(addr)).await.unwrap(), config());
    let outcomes = send_one_by_one(&producer, 3).await;
    assert!(outcomes[0].is_ok());
    assert_eq!(outcomes[1].as_ref().unwrap_err().code(), Some(ErrorCode::CorruptBatch));
    assert!(outcomes[2].is_ok(), "{:?}", outcomes[2]);
    assert_eq!(log.lock().unwrap().epochs, vec![0, 1]);
}

#[tokio::test]
async fn a_record_fails_with_the_delivery_timeout_and_the_last_error() {
    let script: Script = Arc::new(|_, _, _| Some(ErrorCode::NotEnoughSpace));
    let (addr, _log) = scripted_broker(script, Duration::ZERO).await;
    let producer = Producer::new(
        Client::connect(ClientConfig::new(addr)).await.unwrap(),
        config().delivery_timeout(Duration::from_millis(300)),
    );
    let started = std::time::Instant::now();
    let outcome = producer.send(ProducerRecord::new("t", "x")).await.unwrap().await;
    let elapsed = started.elapsed();
    match outcome {
        Err(ClientError::DeliveryTimeout { last_error, .. }) => {
            assert!(last_error.contains("not enough space"), "{last_error}")
        }
        other => panic!("expected a delivery timeout, got {other:?}"),
    }
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(5), "{elapsed:?}");
}

/// With linger 0 and every request slot taken, the records sent meanwhile go on filling the
/// partition's open batch instead of each being sealed into a tiny batch of its own: a batch
/// whose linger is over is sealed when a request can carry it, as Kafka's accumulator drains
/// a ready batch only when it sends it. (Sealed at once, a producer under load sent a stream of
/// batches of a few records, each with its own header, CRC, append and consumer wake-up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_sent_while_every_request_slot_is_taken_fill_one_batch() {
    let script: Script = Arc::new(|_, _, _| None);
    let (addr, log) = scripted_broker(script, Duration::from_millis(200)).await;
    let config = config().linger(Duration::ZERO).max_in_flight(1);
    let producer = Producer::new(Client::connect(ClientConfig::new(addr)).await.unwrap(), config);
    let first = producer.send(ProducerRecord::new("t", "first")).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while log.lock().unwrap().batches.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the first batch never reached the broker");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut deliveries = Vec::new();
    for i in 0..1000 {
        deliveries.push(producer.send(ProducerRecord::new("t", format!("r{i}"))).await.unwrap());
    }
    first.await.expect("acknowledged");
    for delivery in deliveries {
        delivery.await.expect("acknowledged");
    }
    let batches = log.lock().unwrap().batches.clone();
    assert_eq!(batches.iter().map(|b| b.records).sum::<u32>(), 1001, "every record was sent once");
    assert_eq!(
        batches.len(),
        2,
        "the first record alone, then the 1000 sent while it was in flight in one batch: {batches:?}"
    );
}
