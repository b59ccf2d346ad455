//! Random sequences of append / roll / truncate / retention / close-and-reopen on tiny
//! segments, checked against a simple in-memory model after every step (in the spirit of
//! Redpanda's storage opfuzz).

mod common;

use common::{batch_at, check_records, run, timestamp_for, tmp, Rng};
use skein_storage::{FsyncPolicy, Log, LogConfig};

/// What the log must hold: the batches, as (base offset, record count), oldest first.
#[derive(Debug, Default)]
struct Model {
    batches: Vec<(u64, u64)>,
    start: u64,
    next: u64,
}

impl Model {
    fn append(&mut self, count: u64) {
        self.batches.push((self.next, count));
        self.next += count;
    }

    /// Kafka-style: the batch holding `offset` goes entirely.
    fn truncate(&mut self, offset: u64) -> u64 {
        if offset >= self.next {
            return self.next;
        }
        let keep = self.batches.partition_point(|&(base, count)| base + count <= offset);
        self.batches.truncate(keep);
        self.next = self.batches.last().map_or(self.start, |&(base, count)| base + count);
        self.next
    }

    /// The log moved its start forward to `start` (retention): it must be a batch boundary.
    fn drop_before(&mut self, start: u64) {
        assert!(start >= self.start, "the start offset never goes back");
        assert!(
            start == self.next || self.batches.iter().any(|&(base, _)| base == start),
            "start {start} is a batch boundary"
        );
        self.batches.retain(|&(base, _)| base >= start);
        self.start = start;
    }
}

fn config(seed: u64) -> LogConfig {
    LogConfig {
        fsync: if seed.is_multiple_of(2) { FsyncPolicy::Always } else { FsyncPolicy::Never },
        retention_bytes_max: Some(48 << 10),
        ..LogConfig::tiny()
    }
}

async fn check(log: &Log, model: &Model, rng: &mut Rng) {
    assert_eq!(log.start_offset(), model.start, "start offset");
    assert_eq!(log.next_offset(), model.next, "next offset");
    assert_eq!(log.visible_offset(), model.next, "everything acknowledged is visible");
    // Read everything in random-sized steps.
    let mut next = model.start;
    let mut seen = Vec::new();
    while next < model.next {
        let (bytes, after) = log.read_verified(next, 1 + rng.below(6000) as usize).await.unwrap();
        assert!(after > next);
        seen.extend(check_records(bytes).into_iter().filter(|&o| o >= next));
        next = after;
    }
    assert_eq!(seen, (model.start..model.next).collect::<Vec<_>>());
    // A random read starts at the batch holding the offset.
    if model.next > model.start {
        let offset = model.start + rng.below(model.next - model.start);
        let slice = log.read(offset, 1).await.unwrap();
        let &(base, count) =
            model.batches.iter().find(|&&(base, count)| base <= offset && offset < base + count).unwrap();
        assert_eq!((slice.first_offset, slice.next_offset), (base, base + count));
        // Timestamp lookups agree with a linear scan of the model.
        let target = timestamp_for(offset);
        let expected = (model.start..model.next).find(|&o| timestamp_for(o) >= target);
        assert_eq!(log.offset_for_timestamp(target).await.unwrap(), expected);
    }
}

fn run_sequence(seed: u64, steps: usize) {
    let dir = tmp();
    let path = dir.path().join("p0");
    run(move || async move {
        let mut rng = Rng(seed);
        let mut model = Model::default();
        let mut log = Some(Log::open(&path, config(seed)).await.unwrap());
        for step in 0..steps {
            let current = log.as_ref().unwrap();
            let op = rng.below(100);
            let context = format!("seed {seed} step {step} op {op}");
            match op {
                0..=59 => {
                    let count = 1 + rng.below(12);
                    let appended = current.append(batch_at(model.next, count)).await.expect(&context);
                    assert_eq!(appended.base_offset, model.next, "{context}");
                    appended.ack.await.expect(&context);
                    model.append(count);
                }
                60..=67 => current.roll().await.expect(&context),
                68..=77 => {
                    let offset = model.start + rng.below(model.next - model.start + 2);
                    let expected = model.truncate(offset);
                    assert_eq!(current.truncate(offset).await.expect(&context), expected, "{context}");
                }
                78..=85 => {
                    let outcome = current.enforce_retention(skein_storage::now_ms()).await.expect(&context);
                    model.drop_before(outcome.start_offset);
                    assert!(current.size_bytes() <= 48 << 10 || current.segment_count() == 1, "{context}");
                }
                _ => {
                    log.take().unwrap().close().await.expect(&context);
                    log = Some(Log::open(&path, config(seed)).await.expect(&context));
                }
            }
            check(log.as_ref().unwrap(), &model, &mut rng).await;
        }
        log.take().unwrap().close().await.unwrap();
    });
}

#[test]
fn random_operation_sequences_match_the_model() {
    let seeds: u64 = std::env::var("SKEIN_OPSEQ_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    for seed in 0..seeds {
        run_sequence(seed, 150);
    }
}
