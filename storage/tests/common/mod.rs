//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use skein_storage::batch::{Batch, BatchBuilder, BatchSplitter};
use skein_storage::{Log, LogConfig};

/// Runs `make()`'s future on a fresh glommio executor thread and returns its output. Fails the
/// test (instead of hanging it) if the future takes longer than two minutes.
pub fn run<T, F>(make: impl FnOnce() -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: Future<Output = T> + 'static,
{
    let (sender, receiver) = std::sync::mpsc::channel();
    // glommio 0.9 can park an executor that still has runnable work (see the broker's
    // `keep_awake`); a timer that is always armed wakes it again within 10 ms.
    let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(2 << 20)
        .spawn(move || async move {
            let done = std::rc::Rc::new(std::cell::Cell::new(false));
            let ticker = glommio::spawn_local({
                let done = done.clone();
                async move {
                    while !done.get() {
                        glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            });
            let output = make().await;
            done.set(true);
            ticker.await;
            let _ = sender.send(());
            output
        })
        .expect("executor starts");
    match receiver.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            handle.join().expect("executor thread")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("the test's executor did not finish in 120 s")
        }
    }
}

/// A temporary directory on a real filesystem (O_DIRECT does not work on tmpfs).
pub fn tmp() -> tempfile::TempDir {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&root).unwrap();
    tempfile::tempdir_in(root).unwrap()
}

/// SplitMix64: small, seedable, good enough for tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

/// The value every test writes at `offset`: its size and content follow from the offset, so
/// any reader can tell a right record from a wrong or invented one.
pub fn value_for(offset: u64) -> Vec<u8> {
    let size = (offset.wrapping_mul(7919) % 300) as usize + 1;
    let tag = format!("v{offset}:");
    tag.bytes().cycle().take(size.max(tag.len())).collect()
}

/// A timestamp for `offset` that is mostly increasing but not strictly.
pub fn timestamp_for(offset: u64) -> i64 {
    1_700_000_000_000 + (offset as i64) * 10 - ((offset % 7) as i64) * 13
}

/// A batch of `count` records meant for offsets `first..first + count`.
pub fn batch_at(first: u64, count: u64) -> BytesMut {
    let mut builder = BatchBuilder::new();
    for offset in first..first + count {
        let key = format!("k{}", offset % 5);
        builder.push(
            timestamp_for(offset),
            Some(key.as_bytes()),
            Some(&value_for(offset)),
            &[("h", Some(b"1"))],
        );
    }
    builder.finish()
}

/// Decodes the batches in `bytes` and checks every record against `value_for`; returns the
/// offsets seen, in order.
pub fn check_records(bytes: Bytes) -> Vec<u64> {
    let mut offsets = Vec::new();
    for batch in BatchSplitter::new(bytes, 1 << 24) {
        let batch: Batch = batch.expect("valid batch");
        for record in batch.records() {
            let record = record.expect("valid record");
            assert_eq!(
                record.value.as_deref(),
                Some(&value_for(record.offset)[..]),
                "offset {}",
                record.offset
            );
            assert_eq!(record.timestamp, timestamp_for(record.offset));
            offsets.push(record.offset);
        }
    }
    offsets
}

/// Old data comes from the file: a cache of one block, segments larger than the data, an index
/// entry every `index_interval_bytes`.
pub fn file_read_config(index_interval_bytes: u32) -> LogConfig {
    LogConfig {
        segment_bytes: 64 << 20,
        cache_bytes_max: 4096,
        batch_bytes_max: 1 << 20,
        write_buffer_bytes: 1 << 20,
        write_buffered_bytes_max: 8 << 20,
        index_interval_bytes,
        ..LogConfig::tiny()
    }
}

/// One read of `log` from `offset` (whole batches, at most `bytes_max`) as a fetch makes it:
/// the bytes handed out (a file range read with `read_range_parts`), how many of them came
/// from a file range (0: from memory), and where the next read starts.
pub async fn read_next(log: &Log, offset: u64, bytes_max: usize) -> (Bytes, u64, u64) {
    use skein_storage::{LogData, PartitionLog};
    let read = PartitionLog::read(log, offset, bytes_max, u64::MAX).await.unwrap();
    let (bytes, from_file) = match read.data.clone() {
        LogData::File(range) => {
            (log.read_range_parts(&range).await.unwrap().concat().into(), range.len() as u64)
        }
        LogData::Memory(chunks) => (chunks.concat().into(), 0),
        LogData::Empty => panic!("an empty read below the end at {offset}"),
    };
    (bytes, from_file, read.next_offset)
}
