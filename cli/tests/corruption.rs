//! Torn and corrupted files under the real broker process: each case either recovers with a log
//! line saying what was done, or refuses to start with an error naming the file and position;
//! never a panic, never wrong bytes delivered.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Broker;
use skein_client::{
    Admin, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord, SeekTo,
    TopicPartition,
};
use skein_storage::batch::BatchHeader;
use skein_storage::files::SEGMENT_HEADER_BYTES;

fn partition_dir(broker: &Broker) -> PathBuf {
    broker.data_dir().join("topics").join("c").join("0")
}

/// The files of a directory with this extension, sorted.
fn files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    found.sort();
    found
}

/// (position, total bytes) of every batch of a segment file.
fn batches(path: &Path) -> Vec<(u64, usize)> {
    let bytes = std::fs::read(path).unwrap();
    let mut at = SEGMENT_HEADER_BYTES as usize;
    let mut found = Vec::new();
    while let Ok(header) = BatchHeader::parse(&bytes[at.min(bytes.len())..], usize::MAX) {
        if header.batch_length == 0 || at + header.total_bytes() > bytes.len() {
            break;
        }
        found.push((at as u64, header.total_bytes()));
        at += header.total_bytes();
    }
    found
}

fn flip(path: &Path, position: u64) -> u8 {
    let mut bytes = std::fs::read(path).unwrap();
    let old = bytes[position as usize];
    bytes[position as usize] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
    old
}

fn restore(path: &Path, position: u64, value: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[position as usize] = value;
    std::fs::write(path, bytes).unwrap();
}

async fn produce(broker: &Broker, from: u32, count: u32) {
    let producer = Producer::new(broker.client().await, ProducerConfig::default().batch_bytes(8 << 10));
    for i in from..from + count {
        producer.send(ProducerRecord::new("c", format!("value-{i:06}-{}", "x".repeat(80)))).await.unwrap();
    }
    producer.flush().await.unwrap();
}

/// Reads the partition from `from`; `Err` at the first batch that fails its check.
async fn read_from(broker: &Broker, from: u64) -> Result<Vec<(u64, String)>, ClientError> {
    let client = broker.client().await;
    let end = Admin::new(client.clone()).describe_topic("c").await.unwrap().partitions[0].end_offset;
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer.assign("c", &[0]).await.unwrap();
    consumer.seek("c", 0, SeekTo::Offset(from)).await.unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while records.last().is_none_or(|(o, _)| o + 1 < end) && Instant::now() < deadline {
        for record in consumer.poll(Duration::from_millis(200)).await? {
            records.push((record.offset, String::from_utf8(record.value.unwrap().to_vec()).unwrap()));
        }
    }
    Ok(records)
}

fn assert_values(records: &[(u64, String)]) {
    for (offset, value) in records {
        assert!(value.starts_with("value-") && value.len() == 93, "offset {offset} holds {value:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_are_recovered_or_refused_with_their_location() {
    // fsync=never: after a SIGKILL the tail of the active segment is past the last recovery
    // checkpoint, which is where a torn write can be (after a clean stop everything is synced
    // and checkpointed, so damage anywhere is corruption).
    let mut broker = Broker::start(&["--fsync", "never"]);
    let admin = Admin::new(broker.client().await);
    admin.create_topic("c", 1, &[("segment.bytes", "65536"), ("max.message.bytes", "16384")]).await.unwrap();
    produce(&broker, 0, 3000).await;
    for offset in [100, 200, 300] {
        admin.reset_offsets("g", "c", SeekTo::Offset(offset)).await.unwrap();
    }
    let dir = partition_dir(&broker);
    assert!(files(&dir, "log").len() >= 4, "several segments");
    broker.kill();

    // 1. A segment cut in the middle of its last batch (a torn write): truncated, logged.
    let tail = files(&dir, "log").pop().unwrap();
    let (last_at, last_len) = *batches(&tail).last().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&tail).unwrap();
    file.set_len(last_at + last_len as u64 / 2).unwrap();
    drop(file);
    broker.restart();
    assert!(broker.log().contains("torn tail: truncating the segment"), "{}", broker.log());
    let records = read_from(&broker, 0).await.unwrap();
    assert_values(&records);
    let kept = records.len() as u64;
    assert!(kept < 3000 && kept > 2900, "only the torn batch is gone ({kept} kept)");
    assert_eq!(records.iter().map(|r| r.0).collect::<Vec<_>>(), (0..kept).collect::<Vec<_>>());
    produce(&broker, 5000, 200).await; // and appends continue after it
    broker.kill();

    // 1b. A flipped byte in the last batch written before a crash: a torn write too.
    let tail = files(&dir, "log").pop().unwrap();
    let (last_at, last_len) = *batches(&tail).last().unwrap();
    flip(&tail, last_at + last_len as u64 - 10);
    broker.restart();
    assert_eq!(broker.log().matches("torn tail: truncating the segment").count(), 2, "{}", broker.log());
    let records = read_from(&broker, 0).await.unwrap();
    assert_values(&records);
    assert!(
        records.len() as u64 > kept && (records.len() as u64) < kept + 200,
        "only the damaged batch is gone"
    );
    assert!(broker.stop());

    // 2. A flipped byte in the tail batch after a clean shutdown is corruption (the checkpoint
    // says it was synced): refused, naming the file and the byte.
    let tail = files(&dir, "log").pop().unwrap();
    let (last_at, last_len) = *batches(&tail).last().unwrap();
    let at = last_at + last_len as u64 - 10;
    let old = flip(&tail, at);
    let refused = broker.start_refused();
    assert!(refused.contains(&tail.display().to_string()) && refused.contains("at byte"), "{refused}");
    restore(&tail, at, old);
    broker.restart();
    assert_values(&read_from(&broker, 0).await.unwrap());
    assert!(broker.stop());

    // 3. A flipped byte inside a sealed segment: sealed segments are not re-read at start, and
    // the broker's zero-copy path does not decode them, but no client is handed the record:
    // the batch fails its CRC check and the read stops with an error naming partition and offset.
    let first = files(&dir, "log")[0].clone();
    let (at, len) = batches(&first)[5];
    let position = at + len as u64 - 20;
    let damaged_base =
        BatchHeader::parse(&std::fs::read(&first).unwrap()[at as usize..], usize::MAX).unwrap().base_offset;
    let old = flip(&first, position);
    broker.restart();
    match read_from(&broker, 0).await {
        Err(ClientError::Corrupt { topic, partition, offset, .. }) => {
            assert_eq!((topic.as_str(), partition), ("c", 0));
            assert_eq!(offset, damaged_base, "the damaged batch's offset");
        }
        other => panic!("the damaged batch was not refused: {:?}", other.map(|r| r.len())),
    }
    // A consumer that polls on after the error is handed every record before the damaged batch
    // once and the error again, never a record past it: the fetch it sent for the offsets after
    // the batch (before checking it) is dropped as stale.
    let mut consumer = Consumer::new(broker.client().await, ConsumerConfig::default());
    consumer.assign("c", &[0]).await.unwrap();
    consumer.seek("c", 0, SeekTo::Offset(0)).await.unwrap();
    let (mut seen, mut refusals) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while refusals < 3 && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)).await {
            Ok(records) => seen.extend(records.iter().map(|r| r.offset)),
            Err(ClientError::Corrupt { offset, .. }) => {
                assert_eq!(offset, damaged_base, "the same batch is refused each time");
                refusals += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(refusals, 3, "the damaged batch is refused at every poll that reaches it");
    assert_eq!(seen, (0..damaged_base).collect::<Vec<_>>(), "each record before it once, none after");
    assert!(broker.stop());
    restore(&first, position, old);

    // 4. A damaged offset index: rebuilt from the log when first used, logged; reads stay exact.
    let index = files(&dir, "index")[1].clone();
    flip(&index, 70);
    broker.restart();
    let second_base: u64 = index.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let records = read_from(&broker, second_base + 3).await.unwrap();
    assert_eq!(records[0].0, second_base + 3);
    assert_values(&records);
    assert!(broker.log().contains("rebuilding the segment index from the log"), "{}", broker.log());
    assert!(broker.stop());

    // 5. Damaged topic metadata: refused, naming the file.
    let metadata = broker.data_dir().join("meta").join("topics.snapshot");
    let old = flip(&metadata, 20);
    let refused = broker.start_refused();
    assert!(refused.contains("topics.snapshot") && refused.contains("crc"), "{refused}");
    restore(&metadata, 20, old);

    // 6. A damaged committed-offsets log: refused, naming the file and the byte.
    let offsets_dir = broker.data_dir().join("internal").join("offsets");
    let group_log = std::fs::read_dir(&offsets_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .flat_map(|p| files(&p, "log"))
        .find(|log| !batches(log).is_empty())
        .expect("the group's offsets log");
    let (at, len) = *batches(&group_log).last().unwrap();
    let old = flip(&group_log, at + len as u64 - 3);
    let refused = broker.start_refused();
    assert!(refused.contains(&group_log.display().to_string()) && refused.contains("at byte"), "{refused}");
    restore(&group_log, at + len as u64 - 3, old);
    broker.restart();
    let committed = Admin::new(broker.client().await)
        .committed_offsets("g", &[TopicPartition::new("c", 0)])
        .await
        .unwrap();
    assert_eq!(committed, vec![Some(300)], "the last commit, intact");
    assert!(!broker.log().contains("panicked"));
}
