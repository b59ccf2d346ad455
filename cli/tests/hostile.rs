//! Hostile network input against the real broker: random bytes, truncated frames, huge length
//! prefixes, a slow-loris trickle and 1,000 idle connections at once; then a normal client must
//! still produce and consume, and the broker's memory must stay bounded. Also the limits:
//! connections and requests in flight. Figures are printed as `RELIABILITY …` lines.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{rss_kib, Broker};
use skein_client::{Admin, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord};
use skein_net::frame;
use skein_net::{ErrorCode, MetadataRequest, Request};

/// Lets this process (and the broker it starts) hold a few thousand sockets.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < 8192 {
            limit.rlim_cur = limit.rlim_max.min(8192);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn connect(broker: &Broker) -> TcpStream {
    let stream = TcpStream::connect(&broker.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

/// True once the broker closed the connection (EOF or reset), reading and discarding any
/// error response first.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

async fn round_trip(broker: &Broker, topic: &str, count: u32) {
    let producer = Producer::new(broker.client().await, ProducerConfig::default());
    for i in 0..count {
        producer.send(ProducerRecord::new(topic.to_owned(), format!("ok-{i}"))).await.unwrap();
    }
    producer.flush().await.unwrap();
    let mut consumer = Consumer::new(broker.client().await, ConsumerConfig::default());
    consumer.assign_all(topic).await.unwrap();
    let mut read = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while read < count && Instant::now() < deadline {
        read += consumer.poll(Duration::from_millis(200)).await.unwrap().len() as u32;
    }
    assert_eq!(read, count, "a normal client still produces and consumes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_leave_normal_clients_served_and_memory_bounded() {
    raise_fd_limit();
    let broker = Broker::start(&["--frame-timeout-ms", "1000"]);
    let admin = Admin::new(broker.client().await);
    admin.create_topic("calm", 2, &[]).await.unwrap();
    admin.create_topic("after", 2, &[]).await.unwrap();
    round_trip(&broker, "calm", 1000).await;
    let pid = broker.pid().unwrap();
    let baseline = rss_kib(pid);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut inputs = 0u64;

    // Random bytes: the framing breaks and the connection is closed.
    for _ in 0..200 {
        let mut stream = connect(&broker);
        let n = 16 + (rng.next() % 8192) as usize;
        let _ = stream.write_all(&rng.bytes(n));
        assert!(closed_within(&mut stream, Duration::from_secs(10)), "random bytes close the connection");
        inputs += 1;
    }
    // Truncated frames: a valid header, part of a body, then the client goes away.
    for i in 0..200u32 {
        let frame = Request::<bytes::Bytes>::Metadata(MetadataRequest { topics: Some(vec!["calm".into()]) })
            .to_frame(i, 0);
        let mut stream = connect(&broker);
        let cut = 1 + (rng.next() as usize % (frame.len() - 1));
        stream.write_all(&frame[..cut]).unwrap();
        drop(stream);
        inputs += 1;
    }
    // Huge length prefixes: refused at once, nothing allocated for them.
    for length in [u32::MAX, u32::MAX - 15, 1 << 31, (64 << 20) + 1] {
        let mut stream = connect(&broker);
        let mut bytes = length.to_le_bytes().to_vec();
        bytes.extend_from_slice(&rng.bytes(12));
        stream.write_all(&bytes).unwrap();
        assert!(closed_within(&mut stream, Duration::from_secs(10)), "length {length} closes the connection");
        inputs += 1;
    }
    // 1,000 idle connections at once, and 20 slow-loris senders announcing 64 MiB frames and
    // trickling a byte at a time: the trickles are cut by the frame timeout (1 s here).
    let idle: Vec<TcpStream> = (0..1000).map(|_| connect(&broker)).collect();
    let mut loris: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut stream = connect(&broker);
            let mut header = ((64u32 << 20) - 4).to_le_bytes().to_vec();
            header.extend_from_slice(&[0x53, 1, 4, 0, 0, 0, 0, 0]);
            header.extend_from_slice(&(i as u32).to_le_bytes());
            stream.write_all(&header).unwrap();
            stream
        })
        .collect();
    let started = Instant::now();
    let mut cut = vec![false; loris.len()];
    while cut.iter().any(|c| !c) && started.elapsed() < Duration::from_secs(15) {
        for (stream, cut) in loris.iter_mut().zip(cut.iter_mut()) {
            if !*cut && stream.write_all(&[0x42]).is_err() {
                *cut = true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for (stream, cut) in loris.iter_mut().zip(cut.iter_mut()) {
        *cut = *cut || closed_within(stream, Duration::from_millis(100));
    }
    assert!(cut.iter().all(|c| *c), "every slow-loris connection was cut (after {:?})", started.elapsed());
    inputs += 1020;

    // With the 1,000 idle connections still open: a normal client is served.
    round_trip(&broker, "after", 500).await;
    let peak = rss_kib(pid);
    drop(idle);
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!(
        "RELIABILITY hostile: {inputs} hostile connections, broker RSS {} MiB -> {} MiB with 1,000 idle connections",
        baseline / 1024,
        peak / 1024
    );
    assert!(growth_mib < 64, "memory stays bounded: grew {growth_mib} MiB");
    assert!(broker.log().contains("framing error"));
}

#[test]
fn the_connection_limit_answers_with_an_error() {
    raise_fd_limit();
    // 4 connections for the broker, whichever of its 2 shards the kernel hands each one to.
    let broker = Broker::start(&["--connections-max", "4"]);
    let mut open: Vec<TcpStream> = Vec::new();
    let mut refused = 0;
    for i in 0..12u32 {
        let mut stream = connect(&broker);
        let request = Request::<bytes::Bytes>::Metadata(MetadataRequest { topics: None }).to_frame(i, 0);
        stream.write_all(&request).unwrap();
        let mut header = [0u8; frame::RESPONSE_HEADER_BYTES];
        stream.read_exact(&mut header).unwrap();
        let response = frame::decode_response_header(&header);
        assert_eq!(response.correlation_id, i);
        if response.error == ErrorCode::TooManyConnections.code() {
            refused += 1;
            assert!(closed_within(&mut stream, Duration::from_secs(5)), "closed after the error");
        } else {
            assert_eq!(response.error, 0);
            open.push(stream);
        }
    }
    assert_eq!(open.len(), 4, "exactly the limit is served");
    assert_eq!(refused, 8);
    // A closed connection gives its place back (the broker notices the close by itself).
    drop(open.pop());
    let started = Instant::now();
    loop {
        let mut stream = connect(&broker);
        let request = Request::<bytes::Bytes>::Metadata(MetadataRequest { topics: None }).to_frame(99, 0);
        stream.write_all(&request).unwrap();
        let mut header = [0u8; frame::RESPONSE_HEADER_BYTES];
        stream.read_exact(&mut header).unwrap();
        let error = frame::decode_response_header(&header).error;
        if error == 0 {
            break;
        }
        assert_eq!(error, ErrorCode::TooManyConnections.code());
        assert!(started.elapsed() < Duration::from_secs(10), "the closed connection's place came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("RELIABILITY limits: connections-max 4, 12 tried, 8 refused with TooManyConnections");
}

#[test]
fn pipelined_requests_beyond_the_in_flight_limit_wait_and_are_all_answered() {
    // 4 requests in flight per connection: the broker stops reading beyond them (bounded
    // memory) and answers everything in order as the client reads.
    let broker = Broker::start(&["--in-flight-max", "4"]);
    let mut stream = connect(&broker);
    let mut all = Vec::new();
    for i in 0..2000u32 {
        all.extend_from_slice(
            &Request::<bytes::Bytes>::Metadata(MetadataRequest { topics: None }).to_frame(i, 0),
        );
    }
    let mut writer = stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || writer.write_all(&all).unwrap());
    for i in 0..2000u32 {
        let mut header = [0u8; frame::RESPONSE_HEADER_BYTES];
        stream.read_exact(&mut header).unwrap();
        let response = frame::decode_response_header(&header);
        assert_eq!((response.correlation_id, response.error), (i, 0), "in order, no error");
        let length = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        let mut body = vec![0u8; length + 4 - frame::RESPONSE_HEADER_BYTES];
        stream.read_exact(&mut body).unwrap();
    }
    sending.join().unwrap();
    eprintln!("RELIABILITY limits: 2,000 pipelined requests with in-flight-max 4, all answered in order");
}

/// Produces 3 MB in requests of about 1 MiB (each one needs request memory) and returns how
/// long until every record was acknowledged; fails if one is not within `limit`.
async fn produce_large_requests(broker: &Broker, topic: &str, limit: Duration) -> Duration {
    let config = ProducerConfig::default().batch_bytes(1 << 20).linger(Duration::from_millis(5));
    let producer = Producer::new(broker.client().await, config);
    let started = Instant::now();
    let mut deliveries = Vec::new();
    for _ in 0..300 {
        deliveries
            .push(producer.send(ProducerRecord::new(topic.to_owned(), vec![b'x'; 10_000])).await.unwrap());
    }
    for delivery in deliveries {
        tokio::time::timeout(limit, delivery)
            .await
            .unwrap_or_else(|_| panic!("not acknowledged within {limit:?}"))
            .expect("acknowledged");
    }
    started.elapsed()
}

/// A sender that announces a frame as long as the whole request memory and trickles it holds
/// that memory; while a producer's long frames wait for it, the broker cuts the sender after
/// its frame stops arriving for a stall window (2 s), not after the frame timeout (60 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sender_holding_request_memory_is_cut_while_others_wait() {
    let broker =
        Broker::start(&["--cores", "1", "--request-memory-max", "4194304", "--frame-timeout-ms", "60000"]);
    Admin::new(broker.client().await).create_topic("slow", 1, &[]).await.unwrap();
    let mut loris = connect(&broker);
    let mut header = ((4u32 << 20) - 4).to_le_bytes().to_vec();
    header.extend_from_slice(&[0x53, 1, 4, 0, 0, 0, 0, 0]);
    header.extend_from_slice(&7u32.to_le_bytes());
    loris.write_all(&header).unwrap();
    let trickle = std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(40) {
            if loris.write_all(&[0x42]).is_err() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    });
    std::thread::sleep(Duration::from_millis(500));

    // Requests of about 1 MiB: each needs request memory the slow sender holds.
    let acknowledged_in = produce_large_requests(&broker, "slow", Duration::from_secs(40)).await;
    let cut_after = trickle.join().unwrap().expect("the slow sender's connection was closed");
    eprintln!(
        "RELIABILITY hostile: a slow sender holding all the request memory was cut after {cut_after:?}; \
         3 MB of 1 MiB requests acknowledged in {acknowledged_in:?}"
    );
    assert!(acknowledged_in < Duration::from_secs(15), "the producer waited {acknowledged_in:?}");
    assert!(broker.log().contains("Stalled"), "the broker says why it closed the connection");
}

/// A client that asks for a large fetch and never reads the answer, then sends produce requests
/// on the same connection: their responses queue behind the unread one, but their request
/// memory goes back as each is done, so another producer's long requests are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_a_client_does_not_read_hold_no_request_memory() {
    let broker = Broker::start(&["--cores", "1", "--request-memory-max", "4194304"]);
    Admin::new(broker.client().await).create_topic("unread", 1, &[]).await.unwrap();
    let producer = Producer::new(broker.client().await, ProducerConfig::default());
    for _ in 0..2_000 {
        producer.send(ProducerRecord::new("unread", vec![b'f'; 10_000])).await.unwrap();
    }
    producer.flush().await.unwrap();

    let mut stalled = connect(&broker);
    let fetch = Request::<bytes::Bytes>::Fetch(skein_net::FetchRequest {
        max_wait_ms: 0,
        min_bytes: 1,
        max_bytes: 16 << 20,
        topics: vec![skein_net::TopicData {
            name: "unread".into(),
            partitions: vec![skein_net::FetchPartition {
                partition: 0,
                fetch_offset: 0,
                partition_bytes_max: 16 << 20,
            }],
        }],
    })
    .to_frame(1, 0);
    stalled.write_all(&fetch).unwrap();
    let batch = common::good_batch(&vec![b'p'; 1 << 20]);
    // Bounded: a broker that stops reading this connection (its requests' memory never given
    // back) would leave a blocking write here forever; the other producer then finds the
    // memory taken, which fails the test below.
    stalled.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..12 {
        if stalled.write_all(&common::produce_frame("unread", 0, batch.clone(), 1, 2 + i)).is_err() {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));

    let acknowledged_in = produce_large_requests(&broker, "unread", Duration::from_secs(20)).await;
    eprintln!(
        "RELIABILITY hostile: 12 produce requests of 1 MiB behind an unread fetch response; another producer's 3 MB acknowledged in {acknowledged_in:?}"
    );
    drop(stalled);
}
