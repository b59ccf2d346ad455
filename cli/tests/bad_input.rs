//! Bad input over a raw socket: each case gets a numbered error (or the connection closed for
//! framing errors), nothing is written, and another client round-trips afterwards.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{good_batch, produce_frame, Broker};
use skein_client::{
    Admin, Client, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, SeekTo,
};
use skein_net::frame::{self, RequestHeader};
use skein_net::{
    ApiVersionsRequest, ErrorCode, FetchPartition, FetchRequest, FetchResponse, ProduceResponse, Reader,
    Request, TopicData,
};

fn connect(broker: &Broker) -> TcpStream {
    let stream = TcpStream::connect(&broker.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

/// Reads one response frame: `Some((header, body))`, or `None` if the broker closed.
fn read_response(stream: &mut TcpStream) -> Option<(frame::ResponseHeader, Bytes)> {
    let mut length = [0u8; 4];
    if stream.read_exact(&mut length).is_err() {
        return None;
    }
    let length = u32::from_le_bytes(length) as usize;
    let mut rest = vec![0u8; length];
    stream.read_exact(&mut rest).ok()?;
    let mut whole = BytesMut::new();
    whole.extend_from_slice(&(length as u32).to_le_bytes());
    whole.extend_from_slice(&rest);
    let header = frame::decode_response_header(&whole);
    Some((header, whole.freeze().slice(frame::RESPONSE_HEADER_BYTES..)))
}

fn assert_closed(stream: &mut TcpStream, case: &str) {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("{case}: expected the broker to close the connection, got {other:?}"),
    }
}

fn raw_header(api_key: u16, api_version: u16, flags: u16, correlation_id: u32) -> RequestHeader {
    RequestHeader { api_key, api_version, flags, correlation_id }
}

fn produce_error(stream: &mut TcpStream, frame: &[u8]) -> ErrorCode {
    stream.write_all(frame).unwrap();
    let (header, body) = read_response(stream).expect("a produce response");
    assert_eq!(header.error, 0);
    let response = ProduceResponse::decode(&mut Reader::new(&body)).unwrap();
    response.topics[0].partitions[0].error
}

/// Another client round-trips a record: the broker still serves everyone.
async fn round_trip(client: &Client, marker: &str) {
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let metadata =
        producer.send(ProducerRecord::new("t", marker.to_owned()).partition(0)).await.unwrap().await.unwrap();
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("t", &[0]).await.unwrap();
    consumer.seek("t", 0, SeekTo::Offset(metadata.offset.unwrap())).await.unwrap();
    let records = consumer.poll(Duration::from_secs(10)).await.unwrap();
    assert_eq!(records[0].value.as_deref(), Some(marker.as_bytes()), "round trip after {marker}");
}

async fn end_offset(client: &Client) -> u64 {
    Admin::new(client.clone()).describe_topic("t").await.unwrap().partitions[0].end_offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_own_connection() {
    let broker = Broker::start(&["--frame-bytes-max", "1048576"]);
    let client = broker.client().await;
    Admin::new(client.clone()).create_topic("t", 1, &[("max.message.bytes", "65536")]).await.unwrap();
    // A long-lived healthy connection that must survive every case.
    let mut healthy = connect(&broker);
    let api_versions = Request::<Bytes>::ApiVersions(ApiVersionsRequest { client_id: "healthy".into() });

    let good = api_versions.to_frame(1, 0);
    let cases = common::bad_frames(&good);
    for (case, bytes) in cases {
        let before = end_offset(&client).await;
        let mut stream = connect(&broker);
        stream.write_all(&bytes).unwrap();
        assert_closed(&mut stream, case);
        assert_eq!(end_offset(&client).await, before, "{case}: nothing written");
        round_trip(&client, case).await;
    }
    // A truncated frame followed by a close.
    let mut stream = connect(&broker);
    stream.write_all(&good[..good.len() - 3]).unwrap();
    drop(stream);
    round_trip(&client, "truncated").await;

    healthy.write_all(&api_versions.to_frame(77, 0)).unwrap();
    let (header, _) = read_response(&mut healthy).expect("the healthy connection still answers");
    assert_eq!(header.correlation_id, 77);
    let log = broker.log();
    assert!(log.contains("framing error"), "the broker logs framing errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_numbered_errors_and_write_nothing() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    Admin::new(client.clone()).create_topic("t", 1, &[("max.message.bytes", "65536")]).await.unwrap();
    round_trip(&client, "before").await;
    let before = end_offset(&client).await;
    let mut stream = connect(&broker);

    // Frame-level errors keep the connection.
    stream.write_all(&frame::encode_request(&raw_header(99, 0, 0, 5), |_| {})).unwrap();
    let (header, _) = read_response(&mut stream).unwrap();
    assert_eq!((header.correlation_id, header.error), (5, ErrorCode::UnknownApi.code()));
    stream.write_all(&frame::encode_request(&raw_header(4, 7, 0, 6), |_| {})).unwrap();
    let (header, _) = read_response(&mut stream).unwrap();
    assert_eq!((header.correlation_id, header.error), (6, ErrorCode::UnsupportedVersion.code()));
    stream
        .write_all(&frame::encode_request(&raw_header(4, 0, 0, 7), |w| {
            w.u8(1).u8(2).u8(3);
        }))
        .unwrap();
    let (header, _) = read_response(&mut stream).unwrap();
    assert_eq!((header.correlation_id, header.error), (7, ErrorCode::MalformedRequest.code()));

    // Partition-level errors.
    let mut bad_crc = good_batch(b"payload").to_vec();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 1;
    assert_eq!(
        produce_error(&mut stream, &produce_frame("t", 0, bad_crc.into(), -1, 8)),
        ErrorCode::CorruptBatch
    );
    assert_eq!(
        produce_error(&mut stream, &produce_frame("t", 0, Bytes::from_static(b"not a batch"), -1, 9)),
        ErrorCode::CorruptBatch
    );
    assert_eq!(
        produce_error(&mut stream, &produce_frame("t", 0, Bytes::new(), -1, 10)),
        ErrorCode::CorruptBatch
    );
    // A good batch followed by a bad one: neither is written.
    let mut mixed = good_batch(b"first").to_vec();
    mixed.extend_from_slice(b"garbage after");
    assert_eq!(
        produce_error(&mut stream, &produce_frame("t", 0, mixed.into(), -1, 11)),
        ErrorCode::CorruptBatch
    );
    let huge = good_batch(&vec![7u8; 100_000]);
    assert_eq!(produce_error(&mut stream, &produce_frame("t", 0, huge, -1, 12)), ErrorCode::BatchTooLarge);
    assert_eq!(
        produce_error(&mut stream, &produce_frame("missing", 0, good_batch(b"x"), -1, 13)),
        ErrorCode::UnknownTopicOrPartition
    );
    assert_eq!(
        produce_error(&mut stream, &produce_frame("t", 9, good_batch(b"x"), -1, 14)),
        ErrorCode::UnknownTopicOrPartition
    );
    assert_eq!(
        produce_error(&mut stream, &produce_frame("t", 0, good_batch(b"x"), 5, 15)),
        ErrorCode::InvalidRequiredAcks
    );
    assert_eq!(end_offset(&client).await, before, "nothing was written");

    // A fetch for a missing topic, and one beyond the end of the log.
    let fetch = Request::<Bytes>::Fetch(FetchRequest {
        max_wait_ms: 0,
        min_bytes: 1,
        max_bytes: 1 << 20,
        topics: vec![
            TopicData {
                name: "missing".into(),
                partitions: vec![FetchPartition { partition: 0, fetch_offset: 0, partition_bytes_max: 1024 }],
            },
            TopicData {
                name: "t".into(),
                partitions: vec![FetchPartition {
                    partition: 0,
                    fetch_offset: 1_000_000,
                    partition_bytes_max: 1024,
                }],
            },
        ],
    });
    stream.write_all(&fetch.to_frame(16, 0)).unwrap();
    let (header, body) = read_response(&mut stream).unwrap();
    assert_eq!(header.correlation_id, 16);
    let response = FetchResponse::decode(&mut Reader::new(&body)).unwrap();
    assert_eq!(response.topics[0].partitions[0].error, ErrorCode::UnknownTopicOrPartition);
    assert_eq!(response.topics[1].partitions[0].error, ErrorCode::OffsetOutOfRange);

    // Pipelined requests are answered in order.
    let mut pipelined = Vec::new();
    for id in 100..110u32 {
        pipelined.extend_from_slice(
            &Request::<Bytes>::ApiVersions(ApiVersionsRequest { client_id: "p".into() }).to_frame(id, 0),
        );
    }
    stream.write_all(&pipelined).unwrap();
    for id in 100..110u32 {
        assert_eq!(read_response(&mut stream).unwrap().0.correlation_id, id);
    }
    round_trip(&client, "after").await;
    assert!(broker.log().contains("refused"), "the broker logs refused input");
}

/// A version-0 client of this broker sends and receives exactly the version-0 bytes; a v1
/// request gets the v1 layout, a v2 one the v2 layout; an ApiVersions at a version the broker
/// does not speak is answered at version 0 with the versions it does speak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_version_is_answered_in_its_own_layout() {
    use skein_net::{ApiKey, ApiVersionsResponse, MetadataRequest, MetadataResponse};
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    Admin::new(client.clone()).create_topic("versions", 2, &[]).await.unwrap();
    let mut stream = connect(&broker);
    let api_versions = Request::<Bytes>::ApiVersions(ApiVersionsRequest { client_id: "old".into() });
    let metadata = Request::<Bytes>::Metadata(MetadataRequest { topics: Some(vec!["versions".into()]) });
    for version in [0u16, 1] {
        stream.write_all(&api_versions.to_frame_at(10 + version as u32, 0, version)).unwrap();
        let (header, body) = read_response(&mut stream).unwrap();
        assert_eq!((header.correlation_id, header.error), (10 + version as u32, 0));
        let mut r = Reader::new(&body);
        let answer = ApiVersionsResponse::decode(&mut r, version).unwrap();
        r.finish()
            .unwrap_or_else(|e| panic!("ApiVersions v{version} has exactly the v{version} fields: {e}"));
        assert_eq!(answer.versions_of(ApiKey::Metadata), Some((0, 2)));
        assert_eq!(answer.versions_of(ApiKey::Produce), Some((0, 0)));
        if version == 1 {
            assert_eq!(answer.node_id, 0);
            assert!(!answer.build_commit.is_empty(), "v1 carries the build commit");
        }

        stream.write_all(&metadata.to_frame_at(20 + version as u32, 0, version)).unwrap();
        let (header, body) = read_response(&mut stream).unwrap();
        assert_eq!((header.correlation_id, header.error), (20 + version as u32, 0));
        let mut r = Reader::new(&body);
        let answer = MetadataResponse::decode(&mut r, version).unwrap();
        r.finish().unwrap_or_else(|e| panic!("Metadata v{version} has exactly the v{version} fields: {e}"));
        let partitions = &answer.topics[0].partitions;
        assert_eq!(partitions.len(), 2);
        let replicas = if version == 1 { vec![0] } else { Vec::new() };
        assert!(partitions
            .iter()
            .all(|p| p.replicas == replicas && p.isr == replicas && p.leader_epoch == 0));
        assert!(partitions.iter().all(|p| p.shard.is_none()), "no shard before v2");
    }
    // Metadata v2: the broker's shard count, each partition's shard.
    stream.write_all(&metadata.to_frame_at(22, 0, 2)).unwrap();
    let (header, body) = read_response(&mut stream).unwrap();
    assert_eq!((header.correlation_id, header.error), (22, 0));
    let mut r = Reader::new(&body);
    let answer = MetadataResponse::decode(&mut r, 2).unwrap();
    r.finish().unwrap_or_else(|e| panic!("Metadata v2 has exactly the v2 fields: {e}"));
    assert_eq!((answer.brokers[0].shards, answer.brokers[0].quic_port), (Some(2), None), "2 shards, no QUIC");
    let shards: Vec<Option<u16>> = answer.topics[0].partitions.iter().map(|p| p.shard).collect();
    assert!(shards.iter().all(|s| s.is_some_and(|s| s < 2)) && shards[0] != shards[1], "{shards:?}");
    // A future client's ApiVersions v9: answered (not refused) at v0, with the versions.
    stream.write_all(&api_versions.to_frame_at(30, 0, 9)).unwrap();
    let (header, body) = read_response(&mut stream).unwrap();
    assert_eq!((header.correlation_id, header.error), (30, 0));
    let mut r = Reader::new(&body);
    let answer = ApiVersionsResponse::decode(&mut r, 0).unwrap();
    r.finish().unwrap();
    assert_eq!(answer.error, ErrorCode::UnsupportedVersion);
    assert_eq!(answer.versions_of(ApiKey::ApiVersions), Some((0, 1)));
    // Any other API at an unknown version is refused at the frame level, and the connection
    // stays usable.
    stream.write_all(&metadata.to_frame_at(31, 0, 3)).unwrap();
    let (header, _) = read_response(&mut stream).unwrap();
    assert_eq!((header.correlation_id, header.error), (31, ErrorCode::UnsupportedVersion.code()));
    // The client library negotiated v2 and sees the replicas and the shards.
    let described = client.metadata(Some(vec!["versions".into()])).await.unwrap();
    assert_eq!(described.topics[0].partitions[0].isr, vec![0]);
    assert_eq!(described.brokers[0].shards, Some(2));
}

/// A fetch's `max_bytes` is spent partition after partition (those of the connection's shard
/// first, then in request order): when it binds, the first partition read gets at least one
/// batch and the ones after it what is left (here nothing); when the partitions' own limits
/// fit it, every partition (on both shards) is answered in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_spends_its_byte_budget_in_request_order() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    Admin::new(client.clone()).create_topic("budget", 4, &[]).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let mut deliveries = Vec::new();
    for partition in 0..4u32 {
        for i in 0..50 {
            let record =
                ProducerRecord::new("budget", vec![b'x'; 1000]).partition(partition).key(format!("{i}"));
            deliveries.push(producer.send(record).await.unwrap());
        }
    }
    for delivery in deliveries {
        delivery.await.unwrap();
    }
    let fetch_with = |partition_bytes_max: u32, max_bytes: u32, correlation_id: u32| {
        let partitions = (0..4)
            .map(|partition| FetchPartition { partition, fetch_offset: 0, partition_bytes_max })
            .collect();
        Request::<Bytes>::Fetch(FetchRequest {
            max_wait_ms: 0,
            min_bytes: 1,
            max_bytes,
            topics: vec![TopicData { name: "budget".into(), partitions }],
        })
        .to_frame(correlation_id, 0)
    };
    let fetch = |max_bytes: u32, correlation_id: u32| fetch_with(1 << 20, max_bytes, correlation_id);
    let mut stream = connect(&broker);
    let answered = |stream: &mut TcpStream, frame: BytesMut| -> Vec<(ErrorCode, usize)> {
        stream.write_all(&frame).unwrap();
        let (_, body) = read_response(stream).unwrap();
        let response = FetchResponse::decode(&mut Reader::new(&body)).unwrap();
        response.topics[0].partitions.iter().map(|p| (p.error, p.records.len())).collect()
    };
    // Budget fits (4 x 1 MiB in 8 MiB): every partition in full (50 records of 1000 bytes).
    let full = answered(&mut stream, fetch(8 << 20, 1));
    assert_eq!(full.len(), 4);
    assert!(full.iter().all(|&(error, len)| error == ErrorCode::None && len >= 50_000), "{full:?}");
    // Budget binds (1 byte): the first partition read still gets a batch; the rest nothing.
    let tight = answered(&mut stream, fetch(1, 2));
    assert!(tight.iter().all(|&(error, _)| error == ErrorCode::None), "{tight:?}");
    assert_eq!(tight.iter().filter(|&&(_, len)| len > 0).count(), 1, "{tight:?}");
    // In between (1.5 partitions' worth): the total stays within the budget plus one batch.
    let half = answered(&mut stream, fetch(75_000, 3));
    let total: usize = half.iter().map(|&(_, len)| len).sum();
    let largest = full.iter().map(|&(_, len)| len).max().unwrap();
    assert!(total > 0 && total <= 75_000 + largest, "{half:?}");
    assert!(
        half.iter().zip(&full).any(|(h, f)| h.1 < f.1),
        "some partition gets less than in full: {half:?}"
    );
    // Batches larger than the partitions' limits (1 KiB; each partition's first batch holds
    // many 1000-byte records): the limits fit the budget (4 x 1 KiB), the partitions are read
    // at once, and each read returns a whole first batch; the response still carries only
    // one of them, not four.
    let oversized = answered(&mut stream, fetch_with(1024, 4096, 4));
    assert!(full.iter().all(|&(_, len)| len > 4096), "the set-up needs batches above 4 KiB: {full:?}");
    assert!(oversized.iter().all(|&(error, _)| error == ErrorCode::None), "{oversized:?}");
    assert_eq!(oversized.iter().filter(|&&(_, len)| len > 0).count(), 1, "{oversized:?}");
}
