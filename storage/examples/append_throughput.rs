//! Appends through the real engine (O_DIRECT segment files on io_uring) as fast as it can and
//! prints the throughput. The last line of output is one JSON object.
//!
//! ```text
//! cargo run --release -p skein-storage --example append_throughput -- \
//!     --dir DIR --record-size 1024 --batch-records 1000 --total-mib 1024 --fsync never
//! ```
//!
//! Each append copies a pre-built batch into a fresh buffer first (what receiving it from the
//! network would cost), then hands it to the log; up to `--in-flight` appends wait for their
//! acknowledgement at once, as a producer with several requests in flight would.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Parser;
use skein_storage::batch::BatchBuilder;
use skein_storage::{FsyncPolicy, Log, LogConfig};

#[derive(Parser, Debug)]
struct Args {
    /// Directory for the log (must be on a filesystem with O_DIRECT, not tmpfs).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    #[arg(long, default_value_t = 1000)]
    batch_records: usize,
    #[arg(long, default_value_t = 1024)]
    total_mib: u64,
    /// always, never or interval:MS
    #[arg(long, default_value = "never")]
    fsync: FsyncPolicy,
    #[arg(long, default_value_t = 128)]
    segment_mib: u64,
    /// Appends awaiting their acknowledgement at once.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Size of each aligned write buffer (KiB).
    #[arg(long, default_value_t = 256)]
    write_buffer_kib: usize,
    /// Bytes buffered before appends wait (MiB).
    #[arg(long, default_value_t = 16)]
    buffered_mib: usize,
    /// glommio time slice (µs).
    #[arg(long, default_value_t = 100)]
    preempt_us: u64,
    /// Keep the log directory afterwards.
    #[arg(long)]
    keep: bool,
    /// Then reopen the log and read everything back, as a catch-up consumer would: with
    /// `Log::read` and `Log::read_file` (O_DIRECT, read-ahead), in reads of this many MiB.
    #[arg(long)]
    read_back_mib: Option<usize>,
}

fn main() {
    let args = Args::parse();
    let dir = args.dir.join(format!("append-throughput-{}", std::process::id()));
    // glommio submits I/O and reaps completions between time slices: a short slice keeps the
    // device queue full while the producer is busy copying.
    let builder = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(0))
        .preempt_timer(Duration::from_micros(args.preempt_us));
    let result = builder
        .spawn(move || async move { run(&args, &dir).await })
        .expect("executor starts")
        .join()
        .expect("executor runs");
    println!("{result}");
}

fn log_config(args: &Args, batch_bytes_max: usize) -> LogConfig {
    LogConfig {
        fsync: args.fsync,
        segment_bytes: args.segment_mib << 20,
        batch_bytes_max,
        write_buffer_bytes: args.write_buffer_kib << 10,
        write_buffered_bytes_max: (args.buffered_mib << 20).max(batch_bytes_max * 2),
        retention_age_max: None,
        ..LogConfig::default()
    }
}

async fn run(args: &Args, dir: &std::path::Path) -> String {
    let batch_bytes_max = args.record_size * args.batch_records + (args.batch_records * 16) + 4096;
    let log = Log::open(dir, log_config(args, batch_bytes_max)).await.expect("log opens");
    let templates: Vec<BytesMut> = (0..8u8)
        .map(|seed| {
            let mut builder = BatchBuilder::with_capacity(batch_bytes_max);
            let value: Vec<u8> =
                (0..args.record_size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            let now = skein_storage::now_ms();
            for _ in 0..args.batch_records {
                builder.push(now, None, Some(&value), &[]);
            }
            builder.finish()
        })
        .collect();
    let batch_bytes = templates[0].len() as u64;
    let total_bytes = args.total_mib << 20;
    let batches = total_bytes.div_ceil(batch_bytes);
    let mut pending = VecDeque::new();
    let started = Instant::now();
    for index in 0..batches {
        let batch = BytesMut::from(&templates[index as usize % templates.len()][..]);
        let appended = log.append(batch).await.expect("append");
        pending.push_back(appended.ack);
        if pending.len() >= args.in_flight {
            pending.pop_front().expect("non-empty").await.expect("ack");
        }
    }
    for ack in pending {
        ack.await.expect("ack");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let written = batches * batch_bytes;
    let records = batches * args.batch_records as u64;
    let segments = log.segment_count();
    log.close().await.expect("close");
    let read_back = match args.read_back_mib {
        Some(mib) => {
            let log = Log::open(dir, log_config(args, batch_bytes_max)).await.expect("log reopens");
            let started = Instant::now();
            let mut next = log.start_offset();
            let mut bytes = 0u64;
            while next < log.visible_offset() {
                let slice = log.read(next, mib << 20).await.expect("read");
                let len = match slice.data {
                    skein_storage::ReadData::File { segment, position, len } => {
                        log.read_file(&segment, position, len as usize).await.expect("read_file").len()
                    }
                    skein_storage::ReadData::Memory(chunks) => chunks.iter().map(|c| c.len()).sum(),
                    skein_storage::ReadData::Empty => 0,
                };
                bytes += len as u64;
                next = slice.next_offset;
            }
            let seconds = started.elapsed().as_secs_f64();
            log.close().await.expect("close");
            let mib_per_s = bytes as f64 / (1 << 20) as f64 / seconds;
            eprintln!(
                "read back {:.1} MiB in {seconds:.3} s: {mib_per_s:.1} MiB/s",
                bytes as f64 / (1 << 20) as f64
            );
            format!(",\"read_mib_per_s\":{mib_per_s:.1}")
        }
        None => String::new(),
    };
    if !args.keep {
        let _ = std::fs::remove_dir_all(dir);
    }
    let mib_per_s = written as f64 / (1 << 20) as f64 / elapsed;
    eprintln!(
        "appended {records} records in {batches} batches ({:.1} MiB) in {elapsed:.3} s across {segments} segments",
        written as f64 / (1 << 20) as f64
    );
    format!(
        "{{\"mib_per_s\":{mib_per_s:.1},\"records_per_s\":{:.0},\"fsync\":\"{}\",\"record_size\":{},\"batch_records\":{},\"batch_bytes\":{batch_bytes},\"bytes\":{written},\"seconds\":{elapsed:.3},\"segments\":{segments}{read_back}}}",
        records as f64 / elapsed,
        args.fsync,
        args.record_size,
        args.batch_records,
    )
}
