//! `skein-bench`: throughput and latency of a Skein broker. See the crate docs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use skein_bench::workload::Workload;
use skein_bench::{Embedded, Mode, Options};
use skein_client::Acks;
use skein_storage::FsyncPolicy;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Produce,
    Consume,
    E2e,
    /// What many partitions cost a node (a broker child process; see the crate docs).
    Partitions,
    /// quinn driven by a broker shard's glommio executor next to quinn on pinned tokio (see
    /// the crate docs, `quic_bulk`).
    QuicBulk,
    /// The most any broker could ingest here: loopback TCP and QUIC into O_DIRECT writes, no
    /// records (see the crate docs, `ceiling`).
    Ceiling,
}

#[derive(Parser, Debug)]
#[command(
    name = "skein-bench",
    version,
    about = "Benchmark a Skein broker: throughput and latency percentiles"
)]
struct Args {
    mode: ModeArg,
    #[arg(long, env = "SKEIN_BOOTSTRAP", default_value = "127.0.0.1:9400")]
    bootstrap: String,
    /// Start a broker in this process on a temporary data directory (removed afterwards).
    #[arg(long)]
    embedded: bool,
    /// Shards of the embedded broker (default: every CPU).
    #[arg(long)]
    cores: Option<usize>,
    /// fsync policy of the embedded broker: always, never or interval:MS.
    #[arg(long, default_value = "never")]
    fsync: FsyncPolicy,
    /// Where the embedded broker's temporary data directory goes (not tmpfs).
    #[arg(long, default_value = ".")]
    data_dir: PathBuf,
    /// Segment size of the embedded broker's topics (MiB).
    #[arg(long)]
    segment_mib: Option<u64>,
    /// Time slice of the embedded broker's shards (µs).
    #[arg(long)]
    preempt_us: Option<u64>,
    /// quic-bulk and ceiling: MiB sent per round.
    #[arg(long, default_value_t = 1024)]
    quic_mib: u64,
    /// quic-bulk: streams per connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// quic-bulk and ceiling: rounds per runtime or path (alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Memory of the embedded broker's tail caches, all shards (MiB; default: sized from memory).
    #[arg(long)]
    cache_mib: Option<u64>,
    /// The fsync policy of an external broker, for the report.
    #[arg(long)]
    broker_fsync: Option<String>,
    #[arg(long, default_value = "skein-bench")]
    topic: String,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    #[arg(long, default_value_t = 1)]
    producers: usize,
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    #[arg(long, default_value_t = 1024)]
    message_size: usize,
    /// Producer batch size (bytes).
    #[arg(long, default_value_t = 256 << 10)]
    batch_bytes: usize,
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// 0, 1 or all
    #[arg(long, default_value = "all")]
    acks: Acks,
    /// Produce requests in flight per producer.
    #[arg(long, default_value_t = 5)]
    max_in_flight: usize,
    /// Records to send (warm-up included).
    #[arg(long, conflicts_with = "duration")]
    messages: Option<u64>,
    /// Or: run for this many seconds after the warm-up.
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds at the start that are not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Cap on records/s for all producers together (measure latency at a fixed load).
    #[arg(long)]
    rate: Option<f64>,
    /// Draw keys from this many distinct keys (default: no keys).
    #[arg(long)]
    keys: Option<u64>,
    /// tcp or quic (an embedded broker then serves QUIC with its development certificate; an
    /// external one needs --quic-ca-file).
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// QUIC: PEM file of the certificate authorities to trust (the broker's
    /// `quic-dev-cert.pem` when it runs without a certificate).
    #[arg(long)]
    quic_ca_file: Option<PathBuf>,
    /// Every request on one connection (the client's default opens one per broker shard and
    /// sends each partition's requests on its shard's; the broker then forwards nothing).
    #[arg(long, alias = "quic-one-connection")]
    one_connection: bool,
    /// QUIC: the name the broker's certificate carries (default: the bootstrap host).
    #[arg(long)]
    quic_server_name: Option<String>,
    /// tokio worker threads of the load generator (default: every CPU; half of them with
    /// --rate, so that on a small machine the load generator does not crowd out the broker
    /// whose latency is being measured).
    #[arg(long)]
    client_threads: Option<usize>,
    /// Write every figure, the parameters, the git commit and the broker's settings as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput over time and the latency percentile curve (SVG).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
    /// partitions mode: a flag for the broker child, e.g. `--broker-arg=--fsync` (repeatable).
    #[arg(long = "broker-arg", allow_hyphen_values = true)]
    broker_arg: Vec<String>,
}

/// `skein-bench __broker --cores N --listen ADDR --data-dir DIR [--fsync P] [--open-files-max N]
/// [--preallocate-bytes-max B]`: the broker child
/// of the `partitions` scenario (not for users: `skein broker` is the broker).
fn run_child_broker(args: &[String]) -> ExitCode {
    let mut config =
        skein_broker::BrokerConfig::new(PathBuf::from("./skein-data"), "127.0.0.1:0".parse().unwrap());
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let Some(value) = rest.next() else {
            eprintln!("error: {flag} needs a value");
            return ExitCode::FAILURE;
        };
        let parsed = match flag.as_str() {
            "--cores" => value.parse().map(|v| config.cores = v).map_err(|e| e.to_string()),
            "--listen" => value.parse().map(|v| config.listen = v).map_err(|e| e.to_string()),
            "--data-dir" => {
                config.data_dir = PathBuf::from(value);
                Ok(())
            }
            "--fsync" => value.parse().map(|v| config.fsync = v).map_err(|e| e.to_string()),
            "--open-files-max" => {
                value.parse().map(|v| config.open_files_max = Some(v)).map_err(|e| e.to_string())
            }
            "--preallocate-bytes-max" => {
                value.parse().map(|v| config.preallocate_bytes_max = v).map_err(|e| e.to_string())
            }
            other => Err(format!("unknown flag {other}")),
        };
        if let Err(error) = parsed {
            eprintln!("error: {flag}: {error}");
            return ExitCode::FAILURE;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match skein_broker::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__broker") {
        return run_child_broker(&argv[2..]);
    }
    let args = Args::parse();
    // The load generator allocates and frees produce batches the way the broker does request
    // frames: with glibc's defaults each one is fresh pages (a page fault and a zeroed page per
    // 4 KiB; 4.4 % of a flat-out producer's CPU samples in `clear_page_erms`). An embedded
    // broker would tune the process anyway; a bench against an external broker did not.
    let _ = skein_broker::allocator::tune();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let transport = match args.transport.as_str() {
        "tcp" => skein_client::Transport::Tcp,
        "quic" => match (&args.quic_ca_file, args.embedded) {
            (Some(ca_file), _) => skein_client::Transport::Quic {
                server_name: args.quic_server_name.clone(),
                ca_file: ca_file.clone(),
                first_shard: None,
            },
            // Replaced by the embedded broker's own certificate once it runs.
            (None, true) => skein_client::Transport::Tcp,
            (None, false) => {
                eprintln!("error: --transport quic needs --quic-ca-file (or --embedded)");
                return ExitCode::FAILURE;
            }
        },
        other => {
            eprintln!("error: transport {other:?}: tcp or quic");
            return ExitCode::FAILURE;
        }
    };
    if args.messages.is_none()
        && args.duration.is_none()
        && !matches!(args.mode, ModeArg::Partitions | ModeArg::QuicBulk | ModeArg::Ceiling)
    {
        eprintln!("error: give --messages N or --duration SECONDS");
        return ExitCode::FAILURE;
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mode = match args.mode {
        ModeArg::Produce => Mode::Produce,
        ModeArg::Consume => Mode::Consume,
        ModeArg::E2e => Mode::E2e,
        ModeArg::Partitions => return run_partitions(&args, cpus),
        ModeArg::QuicBulk => return run_quic_bulk(&args),
        ModeArg::Ceiling => return run_ceiling(&args),
    };
    let options = Options {
        mode,
        workload: Workload {
            bootstrap: args.bootstrap.clone(),
            transport,
            connection_per_shard: !args.one_connection,
            topic: args.topic.clone(),
            partitions: args.partitions,
            producers: args.producers.max(1),
            consumers: args.consumers.max(1),
            message_size: args.message_size.max(if mode == Mode::E2e { 8 } else { 0 }),
            batch_bytes: args.batch_bytes,
            linger: Duration::from_millis(args.linger_ms),
            acks: args.acks,
            max_in_flight: args.max_in_flight.max(1),
            messages: args.messages,
            duration: args.duration.map(Duration::from_secs_f64),
            warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
            rate: args.rate,
            keys: args.keys,
        },
        embedded: args.embedded.then(|| Embedded {
            cores: args.cores.unwrap_or(cpus),
            fsync: args.fsync,
            data_parent: args.data_dir.clone(),
            preempt_timer: args.preempt_us.map(Duration::from_micros),
            segment_bytes: args.segment_mib.map(|mib| mib << 20),
            cache_bytes_max: args.cache_mib.map(|mib| mib << 20),
        }),
        broker_fsync: args.broker_fsync.clone(),
        transport: args.transport.clone(),
        client_threads: args.client_threads.unwrap_or(if args.rate.is_some() {
            (cpus / 2).max(1)
        } else {
            cpus
        }),
        quiet: args.quiet,
    };
    let report = match skein_bench::run(options) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", skein_bench::summary(&report));
    if !write_json(args.json.as_deref(), &report) {
        return ExitCode::FAILURE;
    }
    if let Some(path) = &args.chart {
        if let Err(error) = skein_bench::chart::draw(&report, path) {
            eprintln!("error: drawing {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.errors > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Writes the report as pretty JSON when `--json` was given; `false` (said on stderr) if that
/// failed.
fn write_json(path: Option<&std::path::Path>, report: &impl serde::Serialize) -> bool {
    let Some(path) = path else { return true };
    let json = serde_json::to_string_pretty(report).expect("a report serialises");
    if let Err(error) = std::fs::write(path, json + "\n") {
        eprintln!("error: writing {}: {error}", path.display());
        return false;
    }
    true
}

/// One round of `quic-bulk` or `ceiling`: what ran, and how fast.
fn print_round(what: impl std::fmt::Debug, bytes: u64, seconds: f64, mib_per_s: f64) {
    println!("{what:?}: {} MiB in {seconds:.2} s, {mib_per_s:.1} MiB/s", bytes >> 20);
}

fn run_quic_bulk(args: &Args) -> ExitCode {
    let options = skein_bench::quic_bulk::QuicBulkOptions {
        bytes: args.quic_mib << 20,
        streams: args.streams.max(1),
        rounds: args.rounds.max(1),
    };
    let report = match skein_bench::quic_bulk::run(options, skein_bench::git_commit()) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    for round in &report.rounds {
        print_round(round.runtime, round.bytes, round.seconds, round.mib_per_s);
    }
    println!(
        "quinn on a glommio shard {:.1} MiB/s, on pinned tokio {:.1} MiB/s (medians of {} rounds, {} streams): {:.2} (gate ≥ 0.8)",
        report.glommio_mib_per_s,
        report.tokio_mib_per_s,
        args.rounds.max(1),
        report.streams,
        report.ratio
    );
    if !write_json(args.json.as_deref(), &report) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run_ceiling(args: &Args) -> ExitCode {
    let options = skein_bench::ceiling::CeilingOptions {
        bytes: args.quic_mib << 20,
        rounds: args.rounds.max(1),
        data_dir: args.data_dir.clone(),
    };
    let report = match skein_bench::ceiling::run(options, skein_bench::git_commit()) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    for round in &report.rounds {
        print_round(round.path, round.bytes, round.seconds, round.mib_per_s);
    }
    println!(
        "medians of {} rounds: O_DIRECT alone {:.1}, tcp {:.1}, tcp into O_DIRECT {:.1}, quic {:.1}, quic into O_DIRECT {:.1} MiB/s",
        args.rounds.max(1),
        report.disk_mib_per_s,
        report.tcp_mib_per_s,
        report.tcp_disk_mib_per_s,
        report.quic_mib_per_s,
        report.quic_disk_mib_per_s
    );
    println!(
        "the way out: O_DIRECT reads alone {:.1}, tcp out {:.1}, O_DIRECT reads sent over tcp {:.1} MiB/s",
        report.read_mib_per_s, report.tcp_out_mib_per_s, report.read_tcp_mib_per_s
    );
    if !write_json(args.json.as_deref(), &report) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run_partitions(args: &Args, cpus: usize) -> ExitCode {
    let mut broker_args = vec!["--fsync".to_owned(), args.fsync.to_string()];
    broker_args.extend(args.broker_arg.iter().cloned());
    let options = skein_bench::partitions::PartitionsOptions {
        partitions: args.partitions,
        records_per_partition: args.messages.unwrap_or(1).clamp(1, u64::from(u32::MAX)) as u32,
        message_size: args.message_size,
        cores: args.cores.unwrap_or(cpus),
        data_parent: args.data_dir.clone(),
        broker_args,
    };
    let report = match skein_bench::partitions::run(options, skein_bench::git_commit()) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{} partitions, {} records of {} bytes each: {:.1} KiB of memory and {:.1} KiB of disk per partition at rest; restart to ready {:.2} s; {} records read after the restart; client peak RSS {} KiB",
        report.partitions,
        report.records_per_partition,
        report.message_size,
        report.rss_kib_per_partition,
        report.disk_bytes_per_partition / 1024.0,
        report.restart_to_ready_s,
        report.records_read_after_restart,
        report.client_rss_peak_kib
    );
    if !write_json(args.json.as_deref(), &report) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
