//! # skein-bench: the benchmark harness
//!
//! Drives a Skein broker through the native client and reports throughput and latency
//! percentiles (HdrHistogram):
//!
//! * `produce`: N producers send records; the latency is from `send` to the acknowledgement;
//! * `consume`: N consumers read a pre-filled topic from the beginning;
//! * `e2e`: producers and consumers together; the latency is from the record's send time
//!   (stamped in its value) to its arrival at a consumer;
//! * `partitions`: what many partitions cost a node ([`partitions`]): a broker child process,
//!   one topic of `--partitions` partitions, `--messages` records written to each, read back,
//!   a restart, read again; memory, descriptors and disk at each step, as JSON;
//! * `quic-bulk`: quinn on a broker shard's glommio executor next to quinn on pinned tokio
//!   ([`quic_bulk`]);
//! * `ceiling`: the most any broker could ingest here ([`ceiling`]): loopback TCP and QUIC into a
//!   shard-like executor that writes the bytes with O_DIRECT, no records, beside the same
//!   transfers without the disk.
//!
//! `--embedded` starts a broker in the same process on a temporary data directory and removes
//! it afterwards. `--json` writes every figure with the parameters, the git commit and the
//! broker's durability settings; `--chart` draws throughput over time and the latency curve.
//!
//! Latency at saturation says little; measure it at a fixed offered load with `--rate` (for
//! example half of the peak the same run measured). Latencies are measured from the actual
//! send, so a producer held back by back-pressure under-reports them (coordinated omission):
//! keep `--rate` below the peak.

pub mod ceiling;
pub mod chart;
pub mod partitions;
pub mod quic_bulk;
pub mod stats;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use skein_client::Admin;

use crate::stats::{new_histogram, Counters, HostCpu, Percentiles, Sample};
use crate::workload::{Clock, ConsumeUntil, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Produce,
    Consume,
    E2e,
}

/// An in-process broker for the run.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub cores: usize,
    pub fsync: skein_storage::FsyncPolicy,
    /// Parent of the temporary data directory (must not be tmpfs: O_DIRECT).
    pub data_parent: PathBuf,
    /// The shards' time slice (I/O is submitted and reaped between slices).
    pub preempt_timer: Option<Duration>,
    /// Segment size of the topics it creates.
    pub segment_bytes: Option<u64>,
    /// The tail caches' memory, all shards (`None`: the broker's default).
    pub cache_bytes_max: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub mode: Mode,
    pub workload: Workload,
    pub embedded: Option<Embedded>,
    /// What the external broker was started with, for the report (`--broker-fsync`).
    pub broker_fsync: Option<String>,
    pub transport: String,
    pub client_threads: usize,
    pub quiet: bool,
}

/// Everything a run measured, as written to `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub git_commit: String,
    pub host: Host,
    pub started_unix_ms: u128,
    pub parameters: Parameters,
    pub broker: BrokerInfo,
    /// Records and payload bytes in the measured window (after warm-up).
    pub records: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub records_per_s: f64,
    pub mib_per_s: f64,
    /// Produce acknowledgement latency (produce and e2e modes).
    pub latency_us: Option<Percentiles>,
    /// Send-to-consume latency (e2e mode).
    pub e2e_latency_us: Option<Percentiles>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// The machine's CPU while records were sent (warm-up included), all processes: a run whose
    /// `steal_pct` is high ran on a host busy with other guests.
    pub host_cpu: Option<HostCpu>,
    /// The worst lateness of the load generator's 5 ms timer over the run (µs; see
    /// [`Sample::client_lag_us`]), warm-up included.
    pub client_lag_max_us: u64,
    /// The same for an embedded broker's shards (`None` for a broker in another process).
    pub broker_lag_max_us: Option<u64>,
    /// The slowest segment write of an embedded broker over the run (µs; see
    /// [`Sample::broker_write_max_us`]), warm-up included.
    pub broker_write_max_us: Option<u64>,
    pub timeline: Vec<Sample>,
    #[serde(skip)]
    pub latency_curve: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Parameters {
    pub topic: String,
    pub partitions: u32,
    pub producers: usize,
    pub consumers: usize,
    pub message_size: usize,
    pub batch_bytes: usize,
    pub linger_ms: u64,
    pub acks: String,
    pub messages: Option<u64>,
    pub duration_s: Option<f64>,
    pub warmup_s: f64,
    pub rate: Option<f64>,
    pub keys: Option<u64>,
    pub transport: String,
    pub client_threads: usize,
    pub max_in_flight: usize,
    /// Clients open a connection per broker shard (false: `--one-connection`).
    pub connection_per_shard: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BrokerInfo {
    pub embedded: bool,
    pub bootstrap: String,
    pub cores: Option<usize>,
    /// The broker's fsync policy: acknowledged records are synced to disk only with `always`.
    pub fsync: String,
}

/// The commit the harness was built from (embedded at build time; `-dirty` when the tree had
/// uncommitted changes then).
pub fn git_commit() -> String {
    skein_broker::BUILD_COMMIT.to_owned()
}

/// The machine a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub memory_mib: u64,
}

impl Host {
    pub fn detect() -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, v)| v.trim())
            })
            .unwrap_or("unknown")
            .to_owned();
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next().and_then(|kib| kib.parse::<u64>().ok()))
            })
            .map_or(0, |kib| kib >> 10);
        Host {
            cpu_model,
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            kernel,
            memory_mib,
        }
    }
}

fn measured_window(clock: &Clock, finished: Instant) -> f64 {
    let from = if finished > clock.measure_from { clock.measure_from } else { clock.started };
    (finished - from).as_secs_f64().max(1e-6)
}

/// Runs a benchmark and returns its report.
pub fn run(options: Options) -> Result<Report, String> {
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut workload = options.workload.clone();
    let mut broker_info = BrokerInfo {
        embedded: options.embedded.is_some(),
        bootstrap: workload.bootstrap.clone(),
        cores: None,
        fsync: options.broker_fsync.clone().unwrap_or_else(|| "unknown (external broker)".into()),
    };
    // The in-process broker, if asked for; it stops and its data goes when these drop.
    let mut _data_dir = None;
    let mut broker = None;
    if let Some(embedded) = &options.embedded {
        std::fs::create_dir_all(&embedded.data_parent).map_err(|e| e.to_string())?;
        let dir = tempfile::Builder::new()
            .prefix("skein-bench-")
            .tempdir_in(&embedded.data_parent)
            .map_err(|e| format!("creating the data directory: {e}"))?;
        let mut config =
            skein_broker::BrokerConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().expect("address"));
        config.cores = embedded.cores;
        config.fsync = embedded.fsync;
        config.default_retention = None;
        config.cache_bytes_max = embedded.cache_bytes_max.or(config.cache_bytes_max);
        if let Some(segment_bytes) = embedded.segment_bytes {
            config.default_segment_bytes = segment_bytes;
        }
        if let Some(preempt) = embedded.preempt_timer {
            config.preempt_timer = preempt;
        }
        if options.transport == "quic" {
            config.quic_listen = Some("127.0.0.1:0".parse().expect("address"));
        }
        let running =
            skein_broker::start(config).map_err(|e| format!("starting the embedded broker: {e}"))?;
        workload.bootstrap = running.addr.to_string();
        if let (Some(quic), Some(cert)) = (running.quic_addr, running.quic_dev_cert.clone()) {
            workload.bootstrap = quic.to_string();
            workload.transport =
                skein_client::Transport::Quic { server_name: None, ca_file: cert, first_shard: None };
        }
        broker_info.bootstrap = workload.bootstrap.clone();
        broker_info.cores = Some(embedded.cores);
        broker_info.fsync = embedded.fsync.to_string();
        if !options.quiet {
            eprintln!(
                "embedded broker on {} ({} shards, fsync={})",
                running.addr, embedded.cores, embedded.fsync
            );
        }
        broker = Some(running);
        _data_dir = Some(dir);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.client_threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let workload = Arc::new(workload);
    let result = runtime.block_on(drive(options.mode, workload.clone(), options.quiet));
    drop(runtime);
    if let Some(broker) = broker {
        broker.stop();
    }
    let measured = result?;
    let parameters = Parameters {
        topic: workload.topic.clone(),
        partitions: workload.partitions,
        producers: workload.producers,
        consumers: workload.consumers,
        message_size: workload.message_size,
        batch_bytes: workload.batch_bytes,
        linger_ms: workload.linger.as_millis() as u64,
        acks: format!("{:?}", workload.acks).to_lowercase(),
        messages: workload.messages,
        duration_s: workload.duration.map(|d| d.as_secs_f64()),
        warmup_s: workload.warmup.as_secs_f64(),
        rate: workload.rate,
        keys: workload.keys,
        transport: options.transport.clone(),
        client_threads: options.client_threads,
        max_in_flight: workload.max_in_flight,
        connection_per_shard: workload.connection_per_shard,
    };
    // A figure without samples behind it is not a figure.
    if options.mode != Mode::Consume && measured.produce_latency.is_empty() {
        return Err(
            "no produce-ack latency sample in the measured part of the run (is it shorter than the warm-up?)"
                .to_owned(),
        );
    }
    if options.mode == Mode::E2e && measured.e2e_latency.is_empty() {
        return Err(
            "no end-to-end latency sample in the measured part of the run (is it shorter than the warm-up?)"
                .to_owned(),
        );
    }
    let curve_source =
        if options.mode == Mode::E2e { &measured.e2e_latency } else { &measured.produce_latency };
    Ok(Report {
        mode: options.mode,
        git_commit: git_commit(),
        host: Host::detect(),
        started_unix_ms,
        parameters,
        broker: broker_info,
        records: measured.records,
        bytes: measured.bytes,
        seconds: (measured.seconds * 1000.0).round() / 1000.0,
        records_per_s: (measured.records as f64 / measured.seconds).round(),
        mib_per_s: (measured.bytes as f64 / measured.seconds / (1 << 20) as f64 * 10.0).round() / 10.0,
        latency_us: (options.mode != Mode::Consume).then(|| Percentiles::of(&measured.produce_latency)),
        e2e_latency_us: (options.mode == Mode::E2e).then(|| Percentiles::of(&measured.e2e_latency)),
        errors: measured.errors,
        first_error: measured.first_error,
        host_cpu: measured.host_cpu,
        client_lag_max_us: measured.timeline.iter().map(|s| s.client_lag_us).max().unwrap_or(0),
        broker_lag_max_us: measured.timeline.iter().filter_map(|s| s.broker_lag_us).max(),
        broker_write_max_us: measured.timeline.iter().filter_map(|s| s.broker_write_max_us).max(),
        timeline: measured.timeline,
        latency_curve: stats::percentile_curve(curve_source),
    })
}

struct Measured {
    records: u64,
    bytes: u64,
    seconds: f64,
    produce_latency: Histogram<u64>,
    e2e_latency: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    timeline: Vec<Sample>,
    host_cpu: Option<HostCpu>,
}

async fn ensure_topic(workload: &Workload) -> Result<(), String> {
    let client = workload::connect(workload).await.map_err(|e| e.to_string())?;
    let admin = Admin::new(client);
    match admin.describe_topic(&workload.topic).await {
        Ok(description) => {
            if description.partitions.len() as u32 != workload.partitions {
                eprintln!(
                    "note: topic {} exists with {} partitions (asked for {}); using it as is",
                    workload.topic,
                    description.partitions.len(),
                    workload.partitions
                );
            }
            Ok(())
        }
        Err(skein_client::ClientError::UnknownTopic(_)) => admin
            .create_topic(&workload.topic, workload.partitions, &[("retention.ms", "-1")])
            .await
            .map_err(|e| format!("creating topic {}: {e}", workload.topic)),
        Err(error) => Err(error.to_string()),
    }
}

/// Splits `total` records over `workers` (the first ones take the remainder).
fn shares(total: Option<u64>, workers: usize) -> Vec<Option<u64>> {
    (0..workers)
        .map(|i| total.map(|t| t / workers as u64 + u64::from((i as u64) < t % workers as u64)))
        .collect()
}

async fn drive(mode: Mode, workload: Arc<Workload>, quiet: bool) -> Result<Measured, String> {
    ensure_topic(&workload).await?;
    let partitions = {
        let client = workload::connect(&workload).await.map_err(|e| e.to_string())?;
        Admin::new(client).describe_topic(&workload.topic).await.map_err(|e| e.to_string())?.partitions
    };
    let partition_ids: Vec<u32> = partitions.iter().map(|p| p.partition).collect();
    if mode == Mode::Consume {
        // Pre-fill: the topic must hold at least `messages` records (unmeasured).
        let held: u64 = partitions.iter().map(|p| p.end_offset - p.start_offset).sum();
        let wanted = workload.messages.unwrap_or(1_000_000);
        if held < wanted {
            if !quiet {
                eprintln!("pre-filling {} with {} records", workload.topic, wanted - held);
            }
            let counters = Arc::new(Counters::default());
            let clock = Clock {
                deadline: None,
                ..Clock::new(&Workload { warmup: Duration::ZERO, ..(*workload).clone() })
            };
            let tasks: Vec<_> = shares(Some(wanted - held), workload.producers.max(1))
                .into_iter()
                .enumerate()
                .map(|(i, share)| {
                    let w = Arc::new(Workload { rate: None, ..(*workload).clone() });
                    tokio::spawn(workload::produce(w, clock.clone(), i, share, counters.clone(), false))
                })
                .collect();
            for task in tasks {
                let outcome = task.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                if outcome.failed > 0 {
                    return Err(format!("pre-filling failed: {}", outcome.first_error.unwrap_or_default()));
                }
            }
        }
    }
    let counters = Arc::new(Counters::default());
    let done = Arc::new(AtomicU64::new(0));
    let label = match mode {
        Mode::Produce => "acknowledged",
        Mode::Consume => "consumed",
        Mode::E2e => "consumed",
    };
    let sampler = tokio::spawn(stats::sample_timeline(counters.clone(), label, quiet, done.clone()));
    let probe = tokio::spawn(stats::probe_lag(counters.clone(), done.clone()));
    let clock = Clock::new(&workload);

    let mut produce_latency = new_histogram();
    let mut e2e_latency = new_histogram();
    let mut errors = 0u64;
    let mut first_error = None;

    // Consumers (consume and e2e modes): partitions dealt round-robin.
    let mut consumer_tasks = Vec::new();
    let consumed_total = Arc::new(AtomicU64::new(0));
    let stop_consumers = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if mode != Mode::Produce {
        let consumers = workload.consumers.max(1).min(partition_ids.len());
        for c in 0..consumers {
            let mine: Vec<u32> = partition_ids.iter().copied().skip(c).step_by(consumers).collect();
            let mine_set: std::collections::HashSet<u32> = mine.iter().copied().collect();
            let until = match mode {
                Mode::Consume => {
                    // The ends as they are now (pre-filling moved them).
                    let client = workload::connect(&workload).await.map_err(|e| e.to_string())?;
                    let fresh = Admin::new(client)
                        .describe_topic(&workload.topic)
                        .await
                        .map_err(|e| e.to_string())?;
                    ConsumeUntil::Offsets(
                        fresh
                            .partitions
                            .iter()
                            .filter(|p| mine_set.contains(&p.partition))
                            .map(|p| (p.partition, p.end_offset))
                            .collect(),
                    )
                }
                _ => ConsumeUntil::Stop { received: consumed_total.clone(), stop: stop_consumers.clone() },
            };
            let counters = counters.clone();
            consumer_tasks.push(tokio::spawn(workload::consume(
                workload.clone(),
                clock.clone(),
                mine,
                until,
                counters,
                mode == Mode::E2e,
            )));
        }
        if mode == Mode::E2e {
            // Let the consumers take their positions at the end before anything is sent.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let clock = if mode == Mode::E2e { Clock::new(&workload) } else { clock };
    let cpu_started = stats::CpuTimes::now();
    // Producers (produce and e2e modes).
    let mut producer_tasks = Vec::new();
    // In end-to-end mode the producers' acknowledgements are counted apart: throughput there is
    // what the consumers received.
    let producer_side = Arc::new(Counters::default());
    if mode != Mode::Consume {
        let producer_counters = if mode == Mode::Produce { counters.clone() } else { producer_side.clone() };
        for (i, share) in shares(workload.messages, workload.producers.max(1)).into_iter().enumerate() {
            producer_tasks.push(tokio::spawn(workload::produce(
                workload.clone(),
                clock.clone(),
                i,
                share,
                producer_counters.clone(),
                mode == Mode::E2e,
            )));
        }
    }
    let mut sent = 0u64;
    for task in producer_tasks {
        let outcome = task.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        produce_latency.add(&outcome.latency).map_err(|e| e.to_string())?;
        sent += outcome.sent - outcome.failed;
        errors += outcome.failed;
        if first_error.is_none() {
            first_error = outcome.first_error;
        }
    }
    let mut finished = Instant::now();
    if mode == Mode::E2e {
        // Everything sent must arrive (or 30 s pass); the window ends with the last arrival.
        let deadline = Instant::now() + Duration::from_secs(30);
        while consumed_total.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        finished = Instant::now();
        let consumed = consumed_total.load(Ordering::Relaxed);
        if consumed < sent {
            errors += sent - consumed;
            first_error.get_or_insert_with(|| {
                format!("{} records sent but not consumed within 30 s", sent - consumed)
            });
        }
        stop_consumers.store(true, Ordering::Relaxed);
    }
    for task in consumer_tasks {
        let outcome = task.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        e2e_latency.add(&outcome.latency).map_err(|e| e.to_string())?;
    }
    if mode != Mode::E2e {
        finished = Instant::now();
    }
    let host_cpu = stats::CpuTimes::now().zip(cpu_started).map(|(now, then)| now.since(&then));
    done.store(1, Ordering::Relaxed);
    let timeline = sampler.await.map_err(|e| e.to_string())?;
    probe.await.map_err(|e| e.to_string())?;
    // Throughput over the measured window (after warm-up); a run shorter than its warm-up is
    // measured whole.
    let seconds = measured_window(&clock, finished);
    let (records, bytes) = if finished > clock.measure_from { counters.measured() } else { counters.get() };
    Ok(Measured {
        records,
        bytes,
        seconds,
        produce_latency,
        e2e_latency,
        errors,
        first_error,
        timeline,
        host_cpu,
    })
}

/// The human summary.
pub fn summary(report: &Report) -> String {
    let mut out = String::new();
    let p = &report.parameters;
    out.push_str(&format!(
        "skein-bench {:?}: {} producers, {} consumers, {} B records, {} partitions, acks={}, broker fsync={}\n",
        report.mode, p.producers, p.consumers, p.message_size, p.partitions, p.acks, report.broker.fsync
    ));
    out.push_str(&format!(
        "  {} records in {:.2} s: {:.0} records/s, {:.1} MiB/s\n",
        report.records, report.seconds, report.records_per_s, report.mib_per_s
    ));
    let line = |name: &str, l: &Percentiles| {
        format!(
            "  {name} latency (µs): p50 {} | p90 {} | p99 {} | p99.9 {} | p99.99 {} | max {} ({} samples)\n",
            l.p50, l.p90, l.p99, l.p999, l.p9999, l.max, l.count
        )
    };
    if let Some(latency) = &report.latency_us {
        out.push_str(&line("produce-ack", latency));
    }
    if let Some(latency) = &report.e2e_latency_us {
        out.push_str(&line("end-to-end", latency));
    }
    if let Some(cpu) = &report.host_cpu {
        out.push_str(&format!(
            "  host CPU (all processes): {:.1} % busy, {:.1} % iowait, {:.1} % stolen by the hypervisor\n",
            cpu.busy_pct, cpu.iowait_pct, cpu.steal_pct
        ));
    }
    out.push_str(&format!(
        "  load generator's 5 ms timer: at worst {:.1} ms late (a latency stall that shows here too was on the client's side)\n",
        report.client_lag_max_us as f64 / 1000.0
    ));
    if let Some(lag) = report.broker_lag_max_us {
        out.push_str(&format!(
            "  embedded broker's shard timers: at worst {:.1} ms late (a stall that shows here too was the broker's executors not running)\n",
            lag as f64 / 1000.0
        ));
    }
    if let Some(write) = report.broker_write_max_us {
        out.push_str(&format!(
            "  embedded broker's slowest segment write: {:.1} ms (a stall that shows here too waited on the disk)\n",
            write as f64 / 1000.0
        ));
    }
    if report.errors > 0 {
        out.push_str(&format!(
            "  {} records failed: {}\n",
            report.errors,
            report.first_error.clone().unwrap_or_default()
        ));
    }
    out
}
