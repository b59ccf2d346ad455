//! `skein`: runs a broker, manages topics, produces and consumes from the command line.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use skein_client::{
    Acks, Admin, Client, ClientConfig, ClientError, Consumer, ConsumerConfig, GroupConfig, Producer,
    ProducerConfig, ProducerRecord, SeekTo, TopicPartition,
};

#[derive(Parser, Debug)]
#[command(name = "skein", version, about = "Skein: a thread-per-core commit log")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a broker.
    Broker(Box<BrokerArgs>),
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce one record per line of standard input.
    Produce(ProduceArgs),
    /// Print the records of a topic.
    Consume(ConsumeArgs),
    /// List, describe and reset consumer groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Every group, with its state and member count.
    List {
        #[command(flatten)]
        connect: Connect,
    },
    /// Members, their partitions, and the committed offset and lag of each partition.
    Describe {
        group: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Set the committed offsets of every partition of a topic (only while the group is empty).
    ResetOffsets {
        group: String,
        #[arg(long)]
        topic: String,
        /// earliest, latest, an offset, or time:EPOCH_MS
        #[arg(long, value_parser = parse_from)]
        to: SeekTo,
        #[command(flatten)]
        connect: Connect,
    },
}

/// `skein broker`: every flag is one key of the config file (`--frame-bytes-max` is
/// `network.frame_bytes_max`); flags beat `SKEIN_<SECTION>_<KEY>` variables, which beat the
/// file, which beats the defaults (see skein_broker::settings).
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  skein broker\n  skein broker --config /etc/skein/skein.toml --metrics-listen 0.0.0.0:9401\n  SKEIN_STORAGE_FSYNC=always skein broker --print-config"
)]
struct BrokerArgs {
    /// A TOML config file (sections broker, network, storage, metrics, log).
    #[arg(long, short = 'c', env = "SKEIN_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective settings (file, environment and flags applied) as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Where the data lives [broker.data_dir; default ./skein-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Client address [network.listen; default 127.0.0.1:9400].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Shards, one pinned executor each [broker.cores; default 0: every CPU].
    #[arg(long)]
    cores: Option<usize>,
    /// always, never or interval:MS [storage.fsync; default never].
    #[arg(long)]
    fsync: Option<String>,
    /// [broker.node_id; default 0]
    #[arg(long)]
    node_id: Option<u32>,
    /// Largest request frame, bytes [network.frame_bytes_max; default 64 MiB].
    #[arg(long)]
    frame_bytes_max: Option<usize>,
    /// [network.connections_max; default 10000]
    #[arg(long)]
    connections_max: Option<usize>,
    /// Requests in flight per connection before the broker stops reading it
    /// [network.in_flight_max; default 64].
    #[arg(long)]
    in_flight_max: Option<usize>,
    /// Close connections idle this long, seconds [network.idle_timeout_s; default 600].
    #[arg(long)]
    idle_timeout_s: Option<u64>,
    /// A frame must arrive completely within this time once started (slow-loris protection),
    /// milliseconds [network.frame_timeout_ms; default 30000].
    #[arg(long)]
    frame_timeout_ms: Option<u64>,
    /// How often retention runs, milliseconds [storage.retention_check_ms; default 60000].
    #[arg(long)]
    retention_check_ms: Option<u64>,
    /// Default segment size of new topics, bytes [storage.segment_bytes; default 1 GiB].
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// Default retention of new topics, hours; 0: forever [storage.retention_hours; default 168].
    #[arg(long)]
    retention_hours: Option<u64>,
    /// Tail cache per partition, bytes [storage.cache_bytes; default 4 MiB].
    #[arg(long)]
    cache_bytes: Option<usize>,
    /// Segment files the broker keeps open at most (idle ones are closed and reopened when
    /// used); 0: three quarters of what RLIMIT_NOFILE leaves [storage.open_files_max].
    #[arg(long)]
    open_files_max: Option<usize>,
    /// Disk space all partitions together may have allocated ahead of their data, bytes
    /// [storage.preallocate_bytes_max; default 1 GiB].
    #[arg(long)]
    preallocate_bytes_max: Option<u64>,
    /// Default largest batch of new topics, bytes [storage.max_message_bytes; default 8 MiB].
    #[arg(long)]
    max_message_bytes: Option<u32>,
    /// The shards' time slice, microseconds [broker.preempt_timer_us; default 250].
    #[arg(long)]
    preempt_timer_us: Option<u64>,
    /// Serve Prometheus /metrics, /health and /ready on HOST:PORT [metrics.listen; default off].
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Per-partition metric series only up to this many partitions; 0: none
    /// [metrics.partition_series_max; default 1000].
    #[arg(long)]
    partition_series_max: Option<usize>,
    /// text or json [log.format; default text].
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// A tracing filter such as info or skein_broker=debug; RUST_LOG wins when set
    /// [log.level; default info].
    #[arg(long)]
    log_level: Option<String>,
    /// Log every request (API, correlation id, response size, time) [log.requests].
    #[arg(long)]
    log_requests: bool,
    /// Check what the broker needs (locked memory, open files, io_uring, an O_DIRECT-capable
    /// data directory), print each check with ok / warning / FAILED, and exit (non-zero on a
    /// failure) without starting.
    #[arg(long)]
    check: bool,
}

impl BrokerArgs {
    /// The flags given, as `section.key` overrides.
    fn overrides(&self) -> Vec<skein_broker::settings::Override> {
        use toml::Value;
        let int = |v: u64| Value::Integer(v.min(i64::MAX as u64) as i64);
        let text = |v: &dyn std::fmt::Display| Value::String(v.to_string());
        let given: [(&str, Option<Value>); 23] = [
            ("broker.data_dir", self.data_dir.as_ref().map(|v| text(&v.display()))),
            ("network.listen", self.listen.map(|v| text(&v))),
            ("broker.cores", self.cores.map(|v| int(v as u64))),
            ("storage.fsync", self.fsync.as_ref().map(|v| text(v))),
            ("broker.node_id", self.node_id.map(|v| int(v.into()))),
            ("network.frame_bytes_max", self.frame_bytes_max.map(|v| int(v as u64))),
            ("network.connections_max", self.connections_max.map(|v| int(v as u64))),
            ("network.in_flight_max", self.in_flight_max.map(|v| int(v as u64))),
            ("network.idle_timeout_s", self.idle_timeout_s.map(int)),
            ("network.frame_timeout_ms", self.frame_timeout_ms.map(int)),
            ("storage.retention_check_ms", self.retention_check_ms.map(int)),
            ("storage.segment_bytes", self.segment_bytes.map(int)),
            ("storage.retention_hours", self.retention_hours.map(int)),
            ("storage.cache_bytes", self.cache_bytes.map(|v| int(v as u64))),
            ("storage.open_files_max", self.open_files_max.map(|v| int(v as u64))),
            ("storage.preallocate_bytes_max", self.preallocate_bytes_max.map(int)),
            ("storage.max_message_bytes", self.max_message_bytes.map(|v| int(v.into()))),
            ("broker.preempt_timer_us", self.preempt_timer_us.map(int)),
            ("metrics.listen", self.metrics_listen.map(|v| text(&v))),
            ("metrics.partition_series_max", self.partition_series_max.map(|v| int(v as u64))),
            ("log.format", self.log_format.as_ref().map(|v| text(v))),
            ("log.level", self.log_level.as_ref().map(|v| text(v))),
            ("log.requests", self.log_requests.then_some(Value::Boolean(true))),
        ];
        given.into_iter().filter_map(|(key, value)| Some((key.to_owned(), value?))).collect()
    }
}

#[derive(Args, Debug, Clone)]
struct Connect {
    /// Broker address.
    #[arg(long, env = "SKEIN_BOOTSTRAP", default_value = "127.0.0.1:9400", global = true)]
    bootstrap: String,
}

#[derive(Subcommand, Debug)]
enum TopicCommand {
    Create {
        name: String,
        #[arg(long)]
        partitions: u32,
        /// Topic setting, e.g. retention.ms=86400000 (repeatable).
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
        #[command(flatten)]
        connect: Connect,
    },
    List {
        #[command(flatten)]
        connect: Connect,
    },
    Describe {
        name: String,
        #[command(flatten)]
        connect: Connect,
    },
    Delete {
        name: String,
        #[command(flatten)]
        connect: Connect,
    },
}

#[derive(Args, Debug)]
struct ProduceArgs {
    topic: String,
    #[arg(long)]
    partition: Option<u32>,
    /// Split each line into KEY SEP VALUE at the first SEP.
    #[arg(long)]
    key_separator: Option<String>,
    /// 0, 1 or all
    #[arg(long, default_value = "all")]
    acks: Acks,
    /// Print "PARTITION OFFSET" for each acknowledged record, in acknowledgement order.
    #[arg(long)]
    report: bool,
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// A record not acknowledged this long after it was read fails (the command then exits
    /// non-zero); retries in between ride over broker restarts (milliseconds).
    #[arg(long, default_value_t = 120_000)]
    delivery_timeout_ms: u64,
    #[command(flatten)]
    connect: Connect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Value,
    Full,
}

#[derive(Args, Debug)]
struct ConsumeArgs {
    topic: String,
    #[arg(long)]
    partition: Option<u32>,
    /// beginning, end, an offset, or time:EPOCH_MS. With --group: where partitions without a
    /// committed offset start (beginning or end).
    #[arg(long, default_value = "beginning", value_parser = parse_from)]
    from: SeekTo,
    /// Join this consumer group: consume the partitions it assigns, from the committed offsets,
    /// and commit what was printed.
    #[arg(long, conflicts_with = "partition")]
    group: Option<String>,
    /// With --group: the session timeout (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// Exit after this many records.
    #[arg(long)]
    max_messages: Option<u64>,
    /// Exit when nothing arrives for this long (milliseconds).
    #[arg(long)]
    timeout_ms: Option<u64>,
    #[arg(long, value_enum, default_value = "value")]
    format: Format,
    #[command(flatten)]
    connect: Connect,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

fn parse_from(text: &str) -> Result<SeekTo, String> {
    match text {
        "beginning" | "earliest" => Ok(SeekTo::Beginning),
        "end" | "latest" => Ok(SeekTo::End),
        other => {
            if let Some(ms) = other.strip_prefix("time:") {
                ms.parse().map(SeekTo::Timestamp).map_err(|_| format!("invalid timestamp {ms:?}"))
            } else {
                other
                    .parse()
                    .map(SeekTo::Offset)
                    .map_err(|_| format!("expected beginning, end, OFFSET or time:MS, got {other:?}"))
            }
        }
    }
}

/// `skein --version`: the release and the git commit the binary was built from.
fn version() -> &'static str {
    let text = format!("{} (commit {})", env!("CARGO_PKG_VERSION"), skein_broker::BUILD_COMMIT);
    Box::leak(text.into_boxed_str())
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().version(version()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let result = match cli.command {
        Command::Broker(args) => run_broker(*args),
        command => {
            init_logging("warn");
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            runtime.block_on(run_client(command))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(default: &str) {
    init_logging_as(default, skein_broker::settings::LogFormat::Text);
}

/// Logs to stderr; `RUST_LOG`, when set, wins over `default`. With JSON, one object per line
/// (timestamp, level, fields, and the spans: `shard.id` on every shard's lines).
fn init_logging_as(default: &str, format: skein_broker::settings::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        skein_broker::settings::LogFormat::Json => {
            builder.json().with_current_span(true).with_span_list(false).try_init()
        }
        skein_broker::settings::LogFormat::Text => {
            builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init()
        }
    };
}

fn run_broker(args: BrokerArgs) -> Result<(), String> {
    let settings =
        skein_broker::settings::Settings::load(args.config.as_deref(), std::env::vars(), &args.overrides())
            .map_err(|e| e.to_string())?;
    if args.print_config {
        print!("{}", settings.to_toml());
        return Ok(());
    }
    let config = settings.to_broker_config().map_err(|e| e.to_string())?;
    init_logging_as(&settings.log.level, settings.log.format);
    if args.check {
        let report = skein_broker::preflight::run(&config);
        for line in report.lines() {
            println!("{line}");
        }
        let failed = report.failures().count();
        return match failed {
            0 => Ok(()),
            n => Err(format!("{n} check(s) failed")),
        };
    }
    skein_broker::run(config).map_err(|e| e.to_string())
}

async fn connect(connect: &Connect) -> Result<Client, String> {
    let mut config = ClientConfig::new(connect.bootstrap.clone());
    config.client_id = "skein-cli".into();
    config.connect_timeout = Duration::from_secs(5);
    Client::connect(config).await.map_err(|e| e.to_string())
}

async fn run_client(command: Command) -> Result<(), String> {
    match command {
        Command::Broker(_) => unreachable!("handled by main"),
        Command::Topic { command } => topic(command).await,
        Command::Produce(args) => produce(args).await,
        Command::Consume(args) => consume(args).await,
        Command::Group { command } => group(command).await,
    }
}

async fn group(command: GroupCommand) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| e.to_string();
    match command {
        GroupCommand::List { connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            for group in admin.list_groups().await.map_err(|e| e.to_string())? {
                writeln!(out, "{}\t{}\t{} members", group.group_id, group.state, group.members)
                    .map_err(io)?;
            }
            Ok(())
        }
        GroupCommand::Describe { group, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            let description = admin.describe_group(&group).await.map_err(|e| e.to_string())?;
            writeln!(
                out,
                "group {} state {} epoch {} members {}",
                description.group_id,
                description.state,
                description.group_epoch,
                description.members.len()
            )
            .map_err(io)?;
            for member in &description.members {
                let owned: Vec<String> = member
                    .assigned
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(move |p| format!("{}/{p}", t.topic)))
                    .collect();
                writeln!(
                    out,
                    "member {} client {} epoch {} partitions {}",
                    member.member_id,
                    member.client_id,
                    member.member_epoch,
                    if owned.is_empty() { "-".to_owned() } else { owned.join(",") }
                )
                .map_err(io)?;
            }
            writeln!(out, "TOPIC\tPARTITION\tCOMMITTED\tEND\tLAG\tOWNER").map_err(io)?;
            let unknown = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
            for p in &description.offsets {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    p.topic,
                    p.partition,
                    p.committed,
                    unknown(p.end_offset),
                    unknown(p.lag),
                    p.owner.as_deref().unwrap_or("-")
                )
                .map_err(io)?;
            }
            Ok(())
        }
        GroupCommand::ResetOffsets { group, topic, to, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            let offsets = admin.reset_offsets(&group, &topic, to).await.map_err(|e| e.to_string())?;
            for (partition, offset) in offsets {
                writeln!(out, "{topic}\t{partition}\t{offset}").map_err(io)?;
            }
            Ok(())
        }
    }
}

async fn topic(command: TopicCommand) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match command {
        TopicCommand::Create { name, partitions, configs, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            let configs: Vec<(&str, &str)> = configs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            admin.create_topic(&name, partitions, &configs).await.map_err(|e| e.to_string())?;
            writeln!(out, "created topic {name} with {partitions} partitions").map_err(|e| e.to_string())
        }
        TopicCommand::List { connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            for name in admin.list_topics().await.map_err(|e| e.to_string())? {
                writeln!(out, "{name}").map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        TopicCommand::Describe { name, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            let description = admin.describe_topic(&name).await.map_err(|e| e.to_string())?;
            let configs: Vec<String> = description.configs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(
                out,
                "topic {} partitions {} {}",
                description.name,
                description.partitions.len(),
                configs.join(" ")
            )
            .map_err(|e| e.to_string())?;
            for p in &description.partitions {
                writeln!(
                    out,
                    "  partition {} leader {} start {} end {} records {}",
                    p.partition,
                    p.leader,
                    p.start_offset,
                    p.end_offset,
                    p.end_offset - p.start_offset
                )
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        TopicCommand::Delete { name, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            admin.delete_topic(&name).await.map_err(|e| e.to_string())?;
            writeln!(out, "deleted topic {name}").map_err(|e| e.to_string())
        }
    }
}

async fn produce(args: ProduceArgs) -> Result<(), String> {
    let client = connect(&args.connect).await?;
    client.topic(&args.topic).await.map_err(|e| e.to_string())?;
    let config = ProducerConfig {
        acks: args.acks,
        linger: Duration::from_millis(args.linger_ms),
        delivery_timeout: Duration::from_millis(args.delivery_timeout_ms.max(1)),
        ..ProducerConfig::default()
    };
    let producer = Producer::new(client, config);
    // Lines are read on a blocking thread and handed over one by one.
    let (lines, mut incoming) = tokio::sync::mpsc::channel::<std::io::Result<String>>(1024);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if lines.blocking_send(line).is_err() {
                break;
            }
        }
    });
    // Each record's outcome arrives in a callback on the producer's response path, which only
    // hands it to the printing thread: O(1) per record, and a slow standard output never
    // holds up the producer.
    let (outcomes, printed) = std::sync::mpsc::channel::<Result<skein_client::RecordMetadata, ClientError>>();
    let report = args.report;
    let printer = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let (mut failed, mut first_failure) = (0u64, None::<ClientError>);
        for outcome in printed {
            match outcome {
                Ok(metadata) if report => {
                    let offset = metadata.offset.map_or("-".to_owned(), |o| o.to_string());
                    let _ = writeln!(out, "{} {}", metadata.partition, offset);
                }
                Ok(_) => {}
                Err(error) => {
                    failed += 1;
                    first_failure.get_or_insert(error);
                }
            }
        }
        let _ = out.flush();
        (failed, first_failure)
    });
    let mut sent = 0u64;
    while let Some(line) = incoming.recv().await {
        let line = line.map_err(|e| format!("reading standard input: {e}"))?;
        let mut record = match args.key_separator.as_deref().and_then(|sep| line.split_once(sep)) {
            Some((key, value)) => {
                ProducerRecord::new(args.topic.clone(), value.to_owned()).key(key.to_owned())
            }
            None => ProducerRecord::new(args.topic.clone(), line),
        };
        if let Some(partition) = args.partition {
            record = record.partition(partition);
        }
        let outcomes = outcomes.clone();
        producer
            .send_with_callback(record, move |outcome| {
                let _ = outcomes.send(outcome);
            })
            .await
            .map_err(|e| e.to_string())?;
        sent += 1;
    }
    producer.flush().await.map_err(|e| e.to_string())?;
    drop(producer);
    drop(outcomes);
    let (failed, first_failure) = printer.join().map_err(|_| "the printing thread failed".to_owned())?;
    match first_failure {
        Some(error) => Err(format!("{failed} of {sent} records were not acknowledged; the first: {error}")),
        None => Ok(()),
    }
}

fn printable(bytes: &Option<bytes::Bytes>) -> String {
    match bytes {
        Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        None => "(null)".to_owned(),
    }
}

async fn consume(args: ConsumeArgs) -> Result<(), String> {
    let client = connect(&args.connect).await?;
    let mut config = ConsumerConfig::default();
    if args.group.is_some() {
        config.start_from = match args.from {
            SeekTo::Beginning | SeekTo::End => args.from,
            _ => {
                return Err(
                    "with --group, --from is beginning or end (for partitions without a commit)".into()
                )
            }
        };
    }
    let mut consumer = Consumer::new(client, config);
    match (&args.group, args.partition) {
        (Some(group), _) => {
            let group = GroupConfig {
                session_timeout: Duration::from_millis(args.session_timeout_ms),
                // Commits are made here, after printing (at-least-once).
                auto_commit: None,
                ..GroupConfig::new(group.clone())
            };
            consumer.subscribe(&[&args.topic], group).await
        }
        (None, Some(partition)) => consumer.assign(&args.topic, &[partition]).await,
        (None, None) => consumer.assign_all(&args.topic).await,
    }
    .map_err(|e| e.to_string())?;
    if args.group.is_none() {
        consumer.seek_all(args.from).await.map_err(|e| e.to_string())?;
    }
    // With a group: the offset after the last printed record of each partition, committed
    // once printed.
    let mut printed: std::collections::BTreeMap<TopicPartition, u64> = std::collections::BTreeMap::new();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut seen = 0u64;
    let idle = args.timeout_ms.map(Duration::from_millis);
    let mut last_record = tokio::time::Instant::now();
    loop {
        if args.max_messages.is_some_and(|max| seen >= max) {
            break;
        }
        let wait = match idle {
            Some(idle) => {
                let left = idle.saturating_sub(last_record.elapsed());
                if left.is_zero() {
                    break;
                }
                left
            }
            None => Duration::from_secs(1),
        };
        let records = consumer.poll(wait).await.map_err(|e| e.to_string())?;
        if !records.is_empty() {
            last_record = tokio::time::Instant::now();
        }
        for record in records {
            if args.max_messages.is_some_and(|max| seen >= max) {
                break;
            }
            let line = match args.format {
                Format::Value => printable(&record.value),
                Format::Full => format!(
                    "{}\t{}\t{}\t{}\t{}",
                    record.partition,
                    record.offset,
                    record.timestamp,
                    printable(&record.key),
                    printable(&record.value)
                ),
            };
            writeln!(out, "{line}").map_err(|e| e.to_string())?;
            printed.insert(TopicPartition::new(record.topic.as_str(), record.partition), record.offset + 1);
            seen += 1;
        }
        out.flush().map_err(|e| e.to_string())?;
        if args.group.is_some() && !printed.is_empty() {
            let offsets: Vec<(TopicPartition, u64)> = std::mem::take(&mut printed).into_iter().collect();
            if let Err(error) = consumer.commit_offsets(&offsets).await {
                // Printed but not committed: another member may print these again.
                eprintln!("warning: commit failed: {error}");
            }
        }
    }
    out.flush().map_err(|e| e.to_string())?;
    consumer.close().await.map_err(|e| e.to_string())
}
