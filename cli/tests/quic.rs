//! QUIC against the real broker process (`--quic-listen`, 2 shards, its development
//! certificate): records round-trip through the native client with connections served by both
//! shards; a producer sends each partition's batches, and a consumer fetches each partition, on
//! a connection of the partition's shard, and a quiet shard's long poll holds up no other's;
//! a client whose address changes mid-connection keeps working; hostile datagrams leave QUIC and
//! TCP serving; a bad frame ends only its own stream; a connection over the limit is told
//! `TooManyConnections`; after `kill -9` and a restart (with the same or another number of
//! shards) producers and consumers carry on at once, on the shards that hold their partitions;
//! through a relay that loses and duplicates datagrams, or cuts the link for longer than the
//! idle timeout, every record arrives once and in order.

mod common;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    assert_each_partition_in_order, read_all, request_shards, scrape, settled_request_shards, Broker,
};
use skein_client::{
    Admin, Client, ClientConfig, ClientError, Consumer, ConsumerConfig, GroupConfig, Producer,
    ProducerConfig, ProducerRecord, Transport,
};
use skein_net::frame;
use skein_net::{ApiVersionsRequest, Request};

fn quic_broker(extra: &[&str]) -> Broker {
    let mut args = vec!["--quic-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let broker = Broker::start(&args);
    assert!(broker.quic_addr.is_some(), "the broker printed its QUIC address");
    assert!(
        broker.quic_cert.as_ref().is_some_and(|cert| cert.exists()),
        "and wrote its development certificate"
    );
    broker
}

fn quic_config(broker: &Broker) -> ClientConfig {
    ClientConfig::new(broker.quic_addr.clone().unwrap()).transport(Transport::Quic {
        server_name: None,
        ca_file: broker.quic_cert.clone().unwrap(),
        first_shard: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_round_trip_over_quic_with_connections_served_by_both_shards() {
    let broker = quic_broker(&["--log-format", "json", "--log-requests"]);
    let client = Client::connect(quic_config(&broker)).await.expect("a QUIC client connects");
    Admin::new(client.clone()).create_topic("over-quic", 4, &[]).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..2000 {
        producer
            .send(ProducerRecord::new("over-quic", format!("value-{i}")).key(format!("k{i}")))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.subscribe(&["over-quic"], GroupConfig::new("quic-readers")).await.unwrap();
    let seen: BTreeSet<Bytes> = read_all(&mut consumer, 2000)
        .await
        .into_iter()
        .map(|record| record.value.expect("a value"))
        .collect();
    let expected: BTreeSet<Bytes> = (0..2000).map(|i| Bytes::from(format!("value-{i}"))).collect();
    assert_eq!(seen, expected, "every record produced over QUIC is consumed over QUIC");

    // More connections: each lands on the shard its first datagram's connection id steers it to
    // (random), and stays there. 16 connections all on one of 2 shards: 1 in 32,768.
    for _ in 0..16 {
        let other = Client::connect(quic_config(&broker)).await.unwrap();
        Admin::new(other).describe_topic("over-quic").await.unwrap();
    }
    let mut shards = BTreeSet::new();
    for line in broker.log().lines().filter(|l| l.contains("\"request\"")) {
        let object: serde_json::Value = serde_json::from_str(line).unwrap();
        if object["fields"]["message"] == "request" {
            shards.insert(object["span"]["shard"].as_u64().expect("request lines name their shard"));
        }
    }
    assert_eq!(shards, BTreeSet::from([0, 1]), "QUIC connections were served by both shards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_data_from_segment_files_is_read_into_memory_and_sent_over_quic() {
    // A 16 KiB cache per partition and 64 KiB segments: almost everything comes from files,
    // which a QUIC stream cannot `sendfile`: the broker reads each range into memory.
    let broker = quic_broker(&["--cache-bytes", "16384"]);
    let client = Client::connect(quic_config(&broker)).await.unwrap();
    Admin::new(client.clone())
        .create_topic("history", 2, &[("segment.bytes", "65536"), ("max.message.bytes", "16384")])
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default().batch_bytes(8192));
    for i in 0..3000u32 {
        producer.send(ProducerRecord::new("history", format!("{i:0>500}")).partition(i % 2)).await.unwrap();
    }
    producer.flush().await.unwrap();
    let mut consumer = Consumer::new(client, ConsumerConfig::default().partition_bytes_max(100_000));
    consumer.assign_all("history").await.unwrap();
    let records = read_all(&mut consumer, 3000).await;
    assert_eq!(records.len(), 3000);
    for record in records {
        let i: u32 = String::from_utf8(record.value.unwrap().to_vec()).unwrap().parse().unwrap();
        assert_eq!((i % 2, u64::from(i / 2)), (record.partition, record.offset), "each record at its offset");
    }
}

/// A raw quinn client trusting the broker's development certificate.
fn raw_endpoint(broker: &Broker) -> quinn::Endpoint {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(broker.quic_cert.as_ref().unwrap()).unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"skein/0".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// One ApiVersions request on the stream; its response frame's correlation id.
async fn api_versions(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, correlation: u32) -> u32 {
    let request = Request::<Bytes>::ApiVersions(ApiVersionsRequest { client_id: "raw".into() });
    for part in request.to_frame_parts(correlation, 0, 0) {
        send.write_all(&part).await.unwrap();
    }
    let mut length = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut length))
        .await
        .expect("an answer")
        .unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(length) as usize];
    recv.read_exact(&mut body).await.unwrap();
    let mut whole = length.to_vec();
    whole.extend(body);
    frame::decode_response_header(&whole).correlation_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_address_changes_mid_connection_keeps_its_connection() {
    let broker = quic_broker(&[]);
    let endpoint = raw_endpoint(&broker);
    let target = broker.quic_addr.as_ref().unwrap().parse().unwrap();
    let connection = endpoint.connect(target, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    assert_eq!(api_versions(&mut send, &mut recv, 1).await, 1);
    let before = endpoint.local_addr().unwrap();
    // A NAT rebinding: the same connection from a new source port. Its packets now hash
    // differently, but carry the broker's connection ids, which steer them to the same shard.
    for round in 0..5u32 {
        endpoint.rebind(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        assert_ne!(endpoint.local_addr().unwrap(), before);
        assert_eq!(
            api_versions(&mut send, &mut recv, 10 + round).await,
            10 + round,
            "answered after rebinding"
        );
    }
    assert!(connection.close_reason().is_none(), "the connection survived: {:?}", connection.close_reason());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_datagrams_leave_quic_and_tcp_serving() {
    let broker = quic_broker(&[]);
    let target: std::net::SocketAddr = broker.quic_addr.as_ref().unwrap().parse().unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    // Random bytes of every size, short headers with ids of both shards and out of range, long
    // headers that claim to be Initials (bad versions, bad lengths, garbage crypto), empty
    // datagrams: a flood of 20,000.
    for i in 0..20_000usize {
        let mut datagram = random(1 + i % 1400);
        match i % 4 {
            0 => datagram[0] &= 0x7f,          // short header
            1 => datagram[0] |= 0xc0,          // long header, Initial-ish
            2 => datagram.truncate(1 + i % 7), // too short for any header
            _ => {
                // A real version with a garbage Initial.
                datagram[0] = 0xc0;
                if datagram.len() > 6 {
                    datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
                    datagram[5] = 8;
                }
            }
        }
        let _ = socket.send_to(&datagram, target);
    }
    let _ = socket.send_to(&[], target);
    // Whatever came back is no stateless reset for a connection of ours (there are none yet),
    // and the broker still serves a real QUIC client and a TCP one.
    let client = Client::connect(quic_config(&broker)).await.expect("QUIC still serves");
    Admin::new(client.clone()).create_topic("after-flood", 2, &[]).await.unwrap();
    let producer = Producer::new(client, ProducerConfig::default());
    producer.send(ProducerRecord::new("after-flood", "still here")).await.unwrap();
    producer.flush().await.unwrap();
    let tcp = broker.client().await;
    let topic = Admin::new(tcp).describe_topic("after-flood").await.expect("TCP still serves");
    assert_eq!(topic.partitions.len(), 2);
}

#[test]
fn the_cli_speaks_quic_and_says_what_it_needs() {
    let broker = quic_broker(&[]);
    let quic = broker.quic_addr.clone().unwrap();
    let cert = broker.quic_cert.clone().unwrap();
    let cert = cert.to_str().unwrap();
    let over_quic = |args: &[&str], stdin: &str| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-b", quic.as_str(), "--transport", "quic", "--quic-ca-file", cert]);
        common::cli(&broker, &all, stdin)
    };
    let (ok, _, err) = over_quic(&["topic", "create", "cli-quic", "--partitions", "2"], "");
    assert!(ok, "{err}");
    let (ok, _, err) = over_quic(&["produce", "cli-quic"], "alpha\nbeta\ngamma\n");
    assert!(ok, "{err}");
    let (ok, out, err) =
        over_quic(&["consume", "cli-quic", "--max-messages", "3", "--timeout-ms", "10000"], "");
    assert!(ok, "{err}");
    for value in ["alpha", "beta", "gamma"] {
        assert!(out.contains(value), "{value} consumed over QUIC: {out}");
    }
    let (ok, _, err) =
        common::cli(&broker, &["topic", "list", "-b", quic.as_str(), "--transport", "quic"], "");
    assert!(!ok && err.contains("--quic-ca-file"), "a missing CA file is named: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_picks_its_first_connection_id_lands_on_that_shard() {
    let broker = quic_broker(&["--log-format", "json", "--log-requests"]);
    let (_, mut seen) = request_shards(&broker, 0);
    for round in 0..3 {
        for shard in [1usize, 0] {
            let config = ClientConfig::new(broker.quic_addr.clone().unwrap()).transport(Transport::Quic {
                server_name: None,
                ca_file: broker.quic_cert.clone().unwrap(),
                first_shard: Some((shard, 2)),
            });
            let client = Client::connect(config).await.unwrap();
            Admin::new(client.clone()).list_topics().await.unwrap();
            drop(client);
            let shards = settled_request_shards(&broker, &mut seen).await;
            assert_eq!(
                shards,
                BTreeSet::from([shard as u64]),
                "round {round}: every request served by shard {shard}"
            );
        }
    }
    let refused = ClientConfig::new(broker.quic_addr.clone().unwrap()).transport(Transport::Quic {
        server_name: None,
        ca_file: broker.quic_cert.clone().unwrap(),
        first_shard: Some((2, 2)),
    });
    let Err(error) = Client::connect(refused).await else { panic!("shard 2 of 2 does not exist") };
    assert!(error.to_string().contains("first shard 2 of 2"), "{error}");
    assert!(matches!(error, ClientError::Transport(_)), "a settings error, not retried: {error:?}");
    let missing = broker.data_dir.join("no-such-ca.pem");
    let refused = ClientConfig::new(broker.quic_addr.clone().unwrap()).transport(Transport::Quic {
        server_name: None,
        ca_file: missing.clone(),
        first_shard: None,
    });
    let Err(error) = Client::connect(refused).await else { panic!("a missing CA file is refused") };
    assert!(
        matches!(&error, ClientError::Transport(reason) if reason.contains("no-such-ca.pem")),
        "the CA file is named: {error:?}"
    );
}

/// Metadata v2 says the broker's shard count and each partition's shard; a QUIC producer then
/// opens a connection per shard and sends every batch on its partition's shard: the broker
/// forwards no produce partition between its cores. So does a TCP producer (its connections
/// steered by source port, `tests/steering.rs`); one held to a single connection
/// (`connection_per_shard(false)`) makes the broker forward, so the counter can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_producer_sends_each_batch_to_the_shard_that_holds_its_partition() {
    let broker = quic_broker(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = broker.metrics_addr.clone().expect("the metrics address");
    let client = Client::connect(quic_config(&broker)).await.unwrap();
    Admin::new(client.clone()).create_topic("by-shard", 4, &[]).await.unwrap();
    let info = client.refresh_topic("by-shard").await.unwrap();
    let shards: BTreeSet<Option<u16>> = info.shards.iter().copied().collect();
    assert_eq!(shards, BTreeSet::from([Some(0), Some(1)]), "Metadata v2 places the partitions: {info:?}");
    let metadata = client.metadata(None).await.unwrap();
    let port = broker.quic_addr.as_ref().unwrap().rsplit(':').next().unwrap().parse().ok();
    assert_eq!((metadata.brokers[0].shards, metadata.brokers[0].quic_port), (Some(2), port));

    let produce = |client: Client, tag: &'static str| async move {
        let producer = Producer::new(client, ProducerConfig::default().linger(Duration::from_millis(2)));
        for i in 0..2000u32 {
            let record = ProducerRecord::new("by-shard", format!("{tag}-{i}")).partition(i % 4);
            producer.send(record).await.expect("accepted");
        }
        producer.flush().await.expect("every record acknowledged");
    };
    let forwarded_of = |samples: &std::collections::BTreeMap<String, f64>, api: &str| {
        samples
            .get(&format!("skein_forwarded_partitions_total{{api={api}}}"))
            .copied()
            .expect("the counter is served")
    };
    let forwarded = |samples: &std::collections::BTreeMap<String, f64>| forwarded_of(samples, "produce");
    produce(client.clone(), "quic").await;
    assert!(client.routes_by_shard(), "the QUIC client routes by shard");
    assert_eq!(forwarded(&scrape(&metrics)), 0.0, "no produce partition hopped between shards");

    let tcp =
        Client::connect(ClientConfig::new(broker.addr.clone()).connection_per_shard(false)).await.unwrap();
    produce(tcp.clone(), "tcp").await;
    assert!(!tcp.routes_by_shard());
    assert!(
        forwarded(&scrape(&metrics)) > 0.0,
        "on one TCP connection half the partitions are on the other shard"
    );

    // Everything arrived, each partition in order.
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("by-shard", &[0, 1, 2, 3]).await.unwrap();
    consumer.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    let records = read_all(&mut consumer, 4000).await;
    let fetch_hops = forwarded_of(&scrape(&metrics), "fetch");
    assert_eq!(
        fetch_hops, 0.0,
        "the QUIC consumer fetched each shard's partitions on that shard's connection"
    );
    let mut over_tcp = Consumer::new(tcp.clone(), ConsumerConfig::default());
    over_tcp.assign("by-shard", &[0, 1, 2, 3]).await.unwrap();
    over_tcp.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    assert_eq!(read_all(&mut over_tcp, 4000).await.len(), 4000);
    assert!(forwarded_of(&scrape(&metrics), "fetch") > 0.0, "on one connection the other shard's reads hop");
    for partition in 0..4u32 {
        for tag in ["quic", "tcp"] {
            let values: Vec<u32> = records
                .iter()
                .filter(|r| r.partition == partition)
                .filter_map(|r| {
                    let value = std::str::from_utf8(r.value.as_deref()?).ok()?;
                    value.strip_prefix(tag)?.strip_prefix('-')?.parse().ok()
                })
                .collect();
            let expected: Vec<u32> = (0..2000).filter(|i| i % 4 == partition).collect();
            assert_eq!(values, expected, "{tag} records of partition {partition}, in order");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_on_one_shard_is_returned_without_waiting_for_a_quiet_shards_long_poll() {
    let broker = quic_broker(&[]);
    let client = Client::connect(quic_config(&broker)).await.unwrap();
    Admin::new(client.clone()).create_topic("quiet", 4, &[]).await.unwrap();
    let info = client.refresh_topic("quiet").await.unwrap();
    let busy = (0..4u32).find(|&p| info.shard_of(p) == Some(0)).expect("a partition on shard 0");
    assert!((0..4u32).any(|p| info.shard_of(p) == Some(1)), "and one on shard 1: {info:?}");
    // Long polls of 20 s: a poll that waited for the quiet shard's to end would take that long.
    let config = ConsumerConfig::default().fetch_wait_max(Duration::from_secs(20));
    let mut consumer = Consumer::new(client.clone(), config);
    consumer.assign("quiet", &[0, 1, 2, 3]).await.unwrap();
    consumer.seek_all(skein_client::SeekTo::End).await.unwrap();
    // Both shards' polls are now in flight, with nothing to read.
    assert!(consumer.poll(Duration::from_millis(300)).await.unwrap().is_empty());
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    producer.send(ProducerRecord::new("quiet", "hello").partition(busy)).await.unwrap().await.unwrap();
    let started = Instant::now();
    let mut records = Vec::new();
    while records.is_empty() && started.elapsed() < Duration::from_secs(15) {
        records = consumer.poll(Duration::from_secs(15)).await.unwrap();
    }
    let waited = started.elapsed();
    assert_eq!(records.len(), 1, "the record came back");
    assert_eq!((records[0].partition, records[0].value.as_deref()), (busy, Some(&b"hello"[..])));
    assert!(waited < Duration::from_secs(10), "the poll waited {waited:?}, as if for the quiet shard");
    // The quiet shard's poll is still in flight, and a record there comes back as well.
    let quiet = (0..4u32).find(|&p| info.shard_of(p) == Some(1)).expect("checked above");
    producer.send(ProducerRecord::new("quiet", "there").partition(quiet)).await.unwrap().await.unwrap();
    let records = consumer.poll(Duration::from_secs(15)).await.unwrap();
    assert_eq!(records.iter().map(|r| r.partition).collect::<Vec<_>>(), vec![quiet]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_handshake_never_answers_holds_up_only_its_own_partitions() {
    let broker =
        Broker::start_with_env(&["--quic-listen", "127.0.0.1:0"], &[("SKEIN_TEST_QUIC_IGNORE_SHARD", "1")]);
    let connect_timeout = Duration::from_secs(6);
    // The general connection lands on shard 0, which answers; shard 1 never completes a
    // handshake, so a connection of its own waits for the connect timeout, then gives up.
    let config = ClientConfig::new(broker.quic_addr.clone().unwrap())
        .transport(Transport::Quic {
            server_name: None,
            ca_file: broker.quic_cert.clone().unwrap(),
            first_shard: Some((0, 2)),
        })
        .connect_timeout(connect_timeout);
    let client = Client::connect(config).await.unwrap();
    Admin::new(client.clone()).create_topic("stuck", 4, &[]).await.unwrap();
    let info = client.refresh_topic("stuck").await.unwrap();
    assert!(client.routes_by_shard());
    let on = |shard| (0..4u32).find(|&p| info.shard_of(p) == Some(shard)).expect("a partition on each shard");
    let (stuck, fine) = (on(1), on(0));
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    producer.producer_id().await.unwrap();
    let started = Instant::now();
    let first = producer.send(ProducerRecord::new("stuck", "first").partition(stuck)).await.unwrap();
    let second = producer.send(ProducerRecord::new("stuck", "second").partition(fine)).await.unwrap();
    let written = second.await.expect("the record for shard 0 is acknowledged");
    let waited = started.elapsed();
    assert_eq!(written.partition, fine);
    assert!(waited < connect_timeout / 2, "shard 0's record waited {waited:?} for shard 1's handshake");
    // Shard 1's record goes on the general connection once its own connection gave up.
    let written =
        tokio::time::timeout(Duration::from_secs(30), first).await.expect("in time").expect("acknowledged");
    assert_eq!((written.partition, written.offset), (stuck, Some(0)));
    assert!(started.elapsed() >= connect_timeout, "it waited for the shard's handshake first");
}

/// Records whose values are `0..total`, record `i` sent to partition `i % partitions`: every
/// one arrived once, each partition's in the order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_producer_and_consumer_carry_on_at_once_after_the_broker_is_killed() {
    let mut broker = quic_broker(&[]);
    let client = Client::connect(quic_config(&broker)).await.unwrap();
    Admin::new(client.clone()).create_topic("crash", 4, &[]).await.unwrap();
    client.refresh_topic("crash").await.unwrap();
    assert!(client.routes_by_shard(), "connections per shard, for produce and for fetch");
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let send = |from: u32, to: u32| {
        let producer = &producer;
        async move {
            let mut pending = Vec::new();
            for i in from..to {
                pending.push(
                    producer
                        .send(ProducerRecord::new("crash", format!("{i}")).partition(i % 4))
                        .await
                        .unwrap(),
                );
            }
            for delivery in pending {
                delivery.await.expect("acknowledged");
            }
        }
    };
    send(0, 2000).await;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("crash", &[0, 1, 2, 3]).await.unwrap();
    consumer.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    let mut records = read_all(&mut consumer, 2000).await;

    broker.kill();
    broker.restart();
    // Every connection the client holds (the general one, the fetch one, one of each per
    // shard) died with the process; the new one must tell the client so at once.
    let restarted = Instant::now();
    send(2000, 3000).await;
    let produced_in = restarted.elapsed();
    records.extend(read_all(&mut consumer, 1000).await);
    let read_in = restarted.elapsed();
    eprintln!("after the restart: produced in {produced_in:?}, read in {read_in:?}");
    assert_each_partition_in_order(&records, 4, 3000);
    // Without the kept reset key both waited for the idle timeout (the producer 30.1 s); with
    // it but a 5 s keep-alive the consumer's long poll waited up to 5 s on its dead connection.
    assert!(produced_in < Duration::from_secs(4), "the producer took {produced_in:?} to carry on");
    assert!(read_in < Duration::from_secs(4), "the consumer took {read_in:?} to carry on");
}

/// A broker restarted with another number of shards holds its partitions on other shards: the
/// client learns the new placement when it reconnects, and the same producer and consumer send
/// each partition's requests to the shard that holds it now (none hops between shards once
/// the first requests after the restart are answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_with_more_shards_requests_follow_the_partitions_to_their_new_shards() {
    let broker = quic_broker(&["--metrics-listen", "127.0.0.1:0"]);
    common::requests_follow_the_partitions_after_a_restart_with_more_shards(broker, quic_config).await;
}

/// Over the connection limit a QUIC connection gets the error a TCP one gets
/// (`TooManyConnections`, not a bare transport refusal), and the connections within the limit
/// keep serving. The limit is the broker's, whichever shards hold the connections: two on
/// shard 0 fill a limit of 2, and shard 1 then refuses too; a closed connection gives its place
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_a_quic_client_is_told_too_many_connections() {
    let broker = quic_broker(&["--connections-max", "2"]);
    let on_shard = |shard: usize| {
        ClientConfig::new(broker.quic_addr.clone().unwrap())
            .transport(Transport::Quic {
                server_name: None,
                ca_file: broker.quic_cert.clone().unwrap(),
                first_shard: Some((shard, 2)),
            })
            .connection_per_shard(false)
            .connect_timeout(Duration::from_secs(3))
    };
    let first = Client::connect(on_shard(0)).await.expect("within the limit");
    let second = Client::connect(on_shard(0)).await.expect("the limit is the broker's, not shard 0's");
    let refused = Client::connect(on_shard(1)).await.expect_err("the broker holds its two connections");
    assert_eq!(refused.code(), Some(skein_net::ErrorCode::TooManyConnections), "{refused}");
    for client in [&first, &second] {
        client.metadata(None).await.expect("still served");
    }
    drop(first);
    let started = std::time::Instant::now();
    let third = loop {
        match Client::connect(on_shard(1)).await {
            Ok(client) => break client,
            Err(error) => {
                assert_eq!(error.code(), Some(skein_net::ErrorCode::TooManyConnections), "{error}");
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the closed connection's place came back"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    third.metadata(None).await.expect("served in the place given back");
    second.metadata(None).await.expect("still served");
}

/// A bad frame on a QUIC stream ends that stream only, as it ends a TCP connection: the other
/// streams of the same connection, and the connection, keep being served, and nothing is
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_on_a_quic_stream_ends_only_that_stream() {
    let broker = quic_broker(&["--frame-bytes-max", "1048576"]);
    let endpoint = raw_endpoint(&broker);
    let target = broker.quic_addr.as_ref().unwrap().parse().unwrap();
    let connection = endpoint.connect(target, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    assert_eq!(api_versions(&mut send, &mut recv, 1).await, 1);
    let good = Request::<Bytes>::ApiVersions(ApiVersionsRequest { client_id: "bad".into() }).to_frame(7, 0);
    let cases = common::bad_frames(&good);
    for (round, (case, bytes)) in cases.into_iter().enumerate() {
        let (mut bad_send, mut bad_recv) = connection.open_bi().await.unwrap();
        bad_send.write_all(&bytes).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), bad_recv.read_to_end(1 << 20))
            .await
            .unwrap_or_else(|_| panic!("{case}: the stream was not ended"));
        assert!(
            !matches!(&answer, Ok(bytes) if !bytes.is_empty()),
            "{case}: no answer on the bad stream, it is ended: {answer:?}"
        );
        let correlation = 100 + round as u32;
        assert_eq!(
            api_versions(&mut send, &mut recv, correlation).await,
            correlation,
            "{case}: the good stream"
        );
        assert!(connection.close_reason().is_none(), "{case}: the connection lives");
    }
}

/// A UDP relay between QUIC clients and the broker, on loopback, that loses datagrams: each
/// way, `loss_per_mille` of them are dropped and `dup_per_mille` sent twice (decided by a
/// seeded generator), and every one is dropped while the link is `cut`. One upstream socket
/// per client address, so the broker sees each client as a peer of its own. Its threads stop
/// when it is dropped.
struct LossyRelay {
    addr: String,
    cut: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Datagrams dropped (by loss or by the cut) and forwarded, both ways together.
    dropped: Arc<std::sync::atomic::AtomicU64>,
    forwarded: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What one direction of a [`LossyRelay`] does to each datagram.
#[derive(Clone)]
struct Fate {
    loss_per_mille: u64,
    dup_per_mille: u64,
    cut: Arc<std::sync::atomic::AtomicBool>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    forwarded: Arc<std::sync::atomic::AtomicU64>,
    state: u64,
}

impl Fate {
    /// How many copies of the next datagram to send (0, 1 or 2).
    fn copies(&mut self) -> usize {
        use std::sync::atomic::Ordering;
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let roll = self.state % 1000;
        if self.cut.load(Ordering::Acquire) || roll < self.loss_per_mille {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        if roll >= 1000 - self.dup_per_mille {
            2
        } else {
            1
        }
    }
}

impl LossyRelay {
    fn start(broker: &Broker, loss_per_mille: u64, dup_per_mille: u64) -> LossyRelay {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let target: std::net::SocketAddr = broker.quic_addr.as_ref().unwrap().parse().unwrap();
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        front.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = front.local_addr().unwrap().to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let fate = Fate {
            loss_per_mille,
            dup_per_mille,
            cut: cut.clone(),
            dropped: dropped.clone(),
            forwarded: forwarded.clone(),
            state: 0x2545_f491_4f6c_dd1d,
        };
        let main = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut upstreams: std::collections::HashMap<std::net::SocketAddr, UdpSocket> =
                    std::collections::HashMap::new();
                let mut backs = Vec::new();
                let mut towards_broker = fate.clone();
                let mut buffer = vec![0u8; 65536];
                while !stop.load(Ordering::Acquire) {
                    let Ok((len, client)) = front.recv_from(&mut buffer) else { continue };
                    let upstream = upstreams.entry(client).or_insert_with(|| {
                        let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
                        upstream.connect(target).unwrap();
                        upstream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                        let (back, front, stop) =
                            (upstream.try_clone().unwrap(), front.try_clone().unwrap(), stop.clone());
                        let mut towards_client =
                            Fate { state: fate.state ^ backs.len() as u64 ^ 0x9e37, ..fate.clone() };
                        backs.push(std::thread::spawn(move || {
                            let mut buffer = vec![0u8; 65536];
                            while !stop.load(Ordering::Acquire) {
                                let Ok(len) = back.recv(&mut buffer) else { continue };
                                for _ in 0..towards_client.copies() {
                                    let _ = front.send_to(&buffer[..len], client);
                                }
                            }
                        }));
                        upstream
                    });
                    for _ in 0..towards_broker.copies() {
                        let _ = upstream.send(&buffer[..len]);
                    }
                }
                for back in backs {
                    let _ = back.join();
                }
            })
        };
        LossyRelay { addr, cut, stop, dropped, forwarded, threads: vec![main] }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Release);
    }

    fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (self.dropped.load(Ordering::Relaxed), self.forwarded.load(Ordering::Relaxed))
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn relayed_config(broker: &Broker, relay: &LossyRelay) -> ClientConfig {
    ClientConfig::new(relay.addr.clone()).transport(Transport::Quic {
        server_name: Some("localhost".into()),
        ca_file: broker.quic_cert.clone().unwrap(),
        first_shard: None,
    })
}

/// Sends `from..to` (record `i` to partition `i % partitions`, with a key of `key_bytes`) and
/// waits for every acknowledgement; any failed send fails the test.
async fn send_all(producer: &Producer, topic: &str, partitions: u32, from: u32, to: u32, key_bytes: usize) {
    let key = Bytes::from(vec![b'k'; key_bytes]);
    let mut pending = Vec::new();
    for i in from..to {
        let record =
            ProducerRecord::new(topic.to_owned(), format!("{i}")).partition(i % partitions).key(key.clone());
        pending.push(producer.send(record).await.unwrap_or_else(|e| panic!("send {i}: {e}")));
    }
    for (i, delivery) in (from..to).zip(pending) {
        delivery.await.unwrap_or_else(|e| panic!("record {i} was not acknowledged: {e}"));
    }
}

/// Over a link that loses 5 % of its datagrams each way and duplicates 2 %, an idempotent
/// producer's records are all acknowledged, and a consumer reads each of them once, in order:
/// QUIC's recovery and the producer's resends lose nothing and write nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_lossy_link_every_record_arrives_once_and_in_order() {
    let broker = quic_broker(&[]);
    let relay = LossyRelay::start(&broker, 50, 20);
    let started = Instant::now();
    let client =
        Client::connect(relayed_config(&broker, &relay)).await.expect("a handshake through the loss");
    Admin::new(client.clone()).create_topic("lossy", 4, &[]).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default().linger(Duration::from_millis(2)));
    tokio::time::timeout(Duration::from_secs(60), send_all(&producer, "lossy", 4, 0, 20_000, 1000))
        .await
        .expect("every record acknowledged within 60 s");
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("lossy", &[0, 1, 2, 3]).await.unwrap();
    consumer.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    let records = read_all(&mut consumer, 20_000).await;
    assert_each_partition_in_order(&records, 4, 20_000);
    let (dropped, forwarded) = relay.counts();
    assert!(
        dropped >= 200 && forwarded >= 10_000,
        "the relay carried the traffic and lost some: {dropped} dropped, {forwarded} forwarded"
    );
    eprintln!(
        "RELIABILITY quic-loss: 20,000 records of 1 KiB through 5 % loss and 2 % duplication each way ({dropped} datagrams dropped of {}), all once and in order, in {:.1} s",
        dropped + forwarded,
        started.elapsed().as_secs_f64()
    );
}

/// The link is cut for 5 s mid-produce, longer than the connections' idle timeout (2 s here):
/// the connections time out, the client makes new ones once the link heals, the producer
/// resends what it did not hear about, and the consumer carries on; every record is read once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_link_is_cut_for_longer_than_the_idle_timeout_producer_and_consumer_carry_on() {
    let broker = quic_broker(&["--idle-timeout-s", "2", "--metrics-listen", "127.0.0.1:0"]);
    let metrics = broker.metrics_addr.clone().expect("the metrics address");
    let accepted = || scrape(&metrics)["skein_connections_accepted_total{}"];
    let relay = LossyRelay::start(&broker, 0, 0);
    let client = Client::connect(relayed_config(&broker, &relay)).await.unwrap();
    Admin::new(client.clone()).create_topic("cut", 4, &[]).await.unwrap();
    let producer =
        Arc::new(Producer::new(client.clone(), ProducerConfig::default().linger(Duration::from_millis(2))));
    send_all(&producer, "cut", 4, 0, 3000, 100).await;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("cut", &[0, 1, 2, 3]).await.unwrap();
    consumer.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    let mut records = read_all(&mut consumer, 3000).await;
    assert_eq!(records.len(), 3000);

    relay.set_cut(true);
    let (dropped_before, _) = relay.counts();
    let accepted_before = accepted();
    let sending = {
        let producer = producer.clone();
        tokio::spawn(async move { send_all(&producer, "cut", 4, 3000, 6000, 100).await })
    };
    // The consumer polls into the cut as well (its long polls and keep-alives are lost).
    let polled = consumer.poll(Duration::from_secs(3)).await;
    assert!(polled.as_ref().map_or(true, |r| r.is_empty()), "nothing crosses a cut link: {polled:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (dropped_during, _) = relay.counts();
    assert!(dropped_during > dropped_before, "the cut dropped the client's datagrams");
    relay.set_cut(false);
    let healed = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), sending)
        .await
        .expect("every record acknowledged within 60 s of the heal")
        .expect("the sending task");
    let acknowledged_in = healed.elapsed();
    records.extend(read_all(&mut consumer, 3000).await);
    assert_each_partition_in_order(&records, 4, 6000);
    assert!(accepted() > accepted_before, "the connections timed out in the cut and were made anew");
    eprintln!(
        "RELIABILITY quic-cut: a 5 s cut (idle timeout 2 s); the 3,000 records sent into it acknowledged {:.1} s after the heal, all 6,000 read once and in order",
        acknowledged_in.as_secs_f64()
    );
}
