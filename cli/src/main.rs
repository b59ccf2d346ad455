//! `skein`: runs a broker, manages topics, produces and consumes from the command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod format;
mod input;
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
    /// Describe the cluster (brokers, controller, topics) or check its health (for scripts).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Print a shell completion script: `skein completions bash > /etc/bash_completion.d/skein`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Every group, with its state and member count.
    #[command(after_help = "Example:\n  skein group list --output json")]
    List {
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        connect: Connect,
    },
    /// Members, their partitions, and the committed offset and lag of each partition.
    #[command(after_help = "Example:\n  skein group describe billing")]
    Describe {
        /// The group id.
        group: String,
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        connect: Connect,
    },
    /// Delete a group and its committed offsets (only while it has no members).
    #[command(after_help = "Example:\n  skein group delete old-billing")]
    Delete {
        /// The group id.
        group: String,
        #[command(flatten)]
        connect: Connect,
    },
    /// Move a group's committed offsets of a topic (only while the group has no members).
    /// Prints TOPIC PARTITION BEFORE AFTER per partition.
    #[command(
        group(clap::ArgGroup::new("target").required(true).args(["to", "shift_by"])),
        after_help = "Examples:\n  skein group reset-offsets billing --topic orders --to earliest --dry-run\n  \
            skein group reset-offsets billing --topic orders --shift-by -100 --partition 0 --partition 2"
    )]
    ResetOffsets {
        /// The group id.
        group: String,
        /// The topic whose offsets move.
        #[arg(long)]
        topic: String,
        /// earliest, latest, an offset, or time:EPOCH_MS.
        #[arg(long, value_parser = parse_from)]
        to: Option<SeekTo>,
        /// Move each committed offset by N records (negative: back), within the log.
        #[arg(long, allow_hyphen_values = true)]
        shift_by: Option<i64>,
        /// Only these partitions (repeatable; default: all).
        #[arg(short, long = "partition")]
        partitions: Vec<u32>,
        /// Print what would be committed, and commit nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        connect: Connect,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// The broker answering, the brokers and controller it knows, and the topics.
    #[command(after_help = "Example:\n  skein cluster describe --output json")]
    Describe {
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        connect: Connect,
    },
    /// Exit 0 when the cluster answers and every partition has a leader, 1 when it answers but
    /// something is wrong (each problem printed), 2 when no broker answers.
    #[command(after_help = "Example:\n  skein cluster health && echo healthy")]
    Health {
        #[command(flatten)]
        connect: Connect,
    },
}

/// `--output text|json` of describe and list commands.
#[derive(Args, Debug, Clone, Copy)]
struct OutputArg {
    /// text (for people) or json (one document, for scripts).
    #[arg(long = "output", value_enum, default_value = "text")]
    output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
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
    /// Memory the frames of requests in progress hold at most, bytes, all shards together
    /// (a connection whose next frame does not fit waits, unread); 0: a thirty-second of the
    /// memory, 32-128 MiB per shard [network.request_memory_max; default 0].
    #[arg(long)]
    request_memory_max: Option<u64>,
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
    /// The most one partition's tail cache holds, bytes; 0: no bound of its own
    /// [storage.cache_bytes; default 0].
    #[arg(long)]
    cache_bytes: Option<usize>,
    /// Memory all partitions' tail caches hold together, bytes (split across shards; the
    /// oldest batch goes first); 0: an eighth of the memory, 16-256 MiB per shard
    /// [storage.cache_bytes_max; default 0].
    #[arg(long)]
    cache_bytes_max: Option<u64>,
    /// Segment files the broker keeps open at most (idle ones are closed and reopened when
    /// used); 0: three quarters of what RLIMIT_NOFILE leaves [storage.open_files_max].
    #[arg(long)]
    open_files_max: Option<usize>,
    /// Disk space all partitions together may have allocated ahead of their data, bytes
    /// [storage.preallocate_bytes_max; default 1 GiB].
    #[arg(long)]
    preallocate_bytes_max: Option<u64>,
    /// O_DIRECT reads of segment data (cold fetches, read-ahead) all shards keep in flight at
    /// most, bytes; reads queued in the device delay the writes behind them; 0: no bound
    /// [storage.read_in_flight_bytes_max; default 4 MiB].
    #[arg(long)]
    read_in_flight_bytes_max: Option<u64>,
    /// Default largest batch of new topics, bytes [storage.max_message_bytes; default 8 MiB].
    #[arg(long)]
    max_message_bytes: Option<u32>,
    /// The shards' time slice, microseconds [broker.preempt_timer_us; default 250].
    #[arg(long)]
    preempt_timer_us: Option<u64>,
    /// Serve QUIC clients on HOST:PORT (UDP; every shard) [network.quic_listen; default off].
    #[arg(long)]
    quic_listen: Option<SocketAddr>,
    /// QUIC certificate chain, PEM [network.quic_cert_file; default: a self-signed development
    /// certificate written to the data directory].
    #[arg(long)]
    quic_cert_file: Option<PathBuf>,
    /// QUIC private key, PEM [network.quic_key_file].
    #[arg(long)]
    quic_key_file: Option<PathBuf>,
    /// Bytes a QUIC client may send on one connection ahead of what the broker has read
    /// (quinn buffers them in the broker's memory; one stream gets at most half, and at most
    /// 8 MiB) [network.quic_receive_window; default 16 MiB].
    #[arg(long)]
    quic_receive_window: Option<u64>,
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
        let given: [(&str, Option<Value>); 30] = [
            ("broker.data_dir", self.data_dir.as_ref().map(|v| text(&v.display()))),
            ("network.listen", self.listen.map(|v| text(&v))),
            ("network.quic_listen", self.quic_listen.map(|v| text(&v))),
            ("network.quic_cert_file", self.quic_cert_file.as_ref().map(|v| text(&v.display()))),
            ("network.quic_key_file", self.quic_key_file.as_ref().map(|v| text(&v.display()))),
            ("network.quic_receive_window", self.quic_receive_window.map(int)),
            ("broker.cores", self.cores.map(|v| int(v as u64))),
            ("storage.fsync", self.fsync.as_ref().map(|v| text(v))),
            ("broker.node_id", self.node_id.map(|v| int(v.into()))),
            ("network.frame_bytes_max", self.frame_bytes_max.map(|v| int(v as u64))),
            ("network.connections_max", self.connections_max.map(|v| int(v as u64))),
            ("network.in_flight_max", self.in_flight_max.map(|v| int(v as u64))),
            ("network.request_memory_max", self.request_memory_max.map(int)),
            ("network.idle_timeout_s", self.idle_timeout_s.map(int)),
            ("network.frame_timeout_ms", self.frame_timeout_ms.map(int)),
            ("storage.retention_check_ms", self.retention_check_ms.map(int)),
            ("storage.segment_bytes", self.segment_bytes.map(int)),
            ("storage.retention_hours", self.retention_hours.map(int)),
            ("storage.cache_bytes", self.cache_bytes.map(|v| int(v as u64))),
            ("storage.cache_bytes_max", self.cache_bytes_max.map(int)),
            ("storage.open_files_max", self.open_files_max.map(|v| int(v as u64))),
            ("storage.preallocate_bytes_max", self.preallocate_bytes_max.map(int)),
            ("storage.read_in_flight_bytes_max", self.read_in_flight_bytes_max.map(int)),
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
    #[arg(short = 'b', long, env = "SKEIN_BOOTSTRAP", default_value = "127.0.0.1:9400", global = true)]
    bootstrap: String,
    /// tcp, or quic (then --bootstrap is the broker's --quic-listen address).
    #[arg(long, env = "SKEIN_TRANSPORT", default_value = "tcp", global = true)]
    transport: String,
    /// QUIC: PEM file of the certificate authorities to trust (a broker without a configured
    /// certificate writes its own to quic-dev-cert.pem in its data directory).
    #[arg(long, env = "SKEIN_QUIC_CA_FILE", global = true)]
    quic_ca_file: Option<PathBuf>,
    /// QUIC: the name the broker's certificate carries (default: the bootstrap host).
    #[arg(long, global = true)]
    quic_server_name: Option<String>,
}

#[derive(Subcommand, Debug)]
enum TopicCommand {
    /// Create a topic.
    #[command(
        after_help = "Example:\n  skein topic create orders --partitions 6 --config retention.ms=86400000"
    )]
    Create {
        /// The topic name (letters, digits, `.`, `_`, `-`).
        name: String,
        /// How many partitions.
        #[arg(long)]
        partitions: u32,
        /// A topic setting KEY=VALUE (repeatable): retention.ms, retention.bytes,
        /// segment.bytes, segment.ms, max.message.bytes.
        #[arg(long = "config", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
        #[command(flatten)]
        connect: Connect,
    },
    /// The topics, one name per line.
    #[command(after_help = "Example:\n  skein topic list --output json")]
    List {
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        connect: Connect,
    },
    /// A topic's settings and each partition's leader and offset range.
    #[command(after_help = "Example:\n  skein topic describe orders")]
    Describe {
        /// The topic name.
        name: String,
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        connect: Connect,
    },
    /// Grow a topic to a partition count (existing partitions keep their data; keyed records
    /// may map to other partitions from then on).
    #[command(after_help = "Example:\n  skein topic add-partitions orders --total 12")]
    AddPartitions {
        /// The topic name.
        name: String,
        /// The partition count the topic should have (more than it has).
        #[arg(long)]
        total: u32,
        #[command(flatten)]
        connect: Connect,
    },
    /// Change a topic's settings while it serves: --set KEY=VALUE gives a value, --delete KEY
    /// puts the broker default back; the other settings keep theirs.
    #[command(
        after_help = "Examples:\n  skein topic alter-config orders --set retention.ms=86400000\n  skein topic alter-config orders --delete retention.bytes --set segment.bytes=268435456\n  skein topic alter-config orders --set max.message.bytes=1048576 --dry-run"
    )]
    AlterConfig {
        /// The topic name.
        name: String,
        /// A setting KEY=VALUE (repeatable): retention.ms, retention.bytes, segment.bytes,
        /// segment.ms, max.message.bytes (-1: no limit).
        #[arg(long = "set", value_parser = parse_key_value)]
        set: Vec<(String, String)>,
        /// A setting to put back to the broker's default (repeatable).
        #[arg(long = "delete")]
        delete: Vec<String>,
        /// Check the change with the broker and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        connect: Connect,
    },
    /// Delete a topic and its data.
    #[command(after_help = "Example:\n  skein topic delete scratch")]
    Delete {
        /// The topic name.
        name: String,
        #[command(flatten)]
        connect: Connect,
    },
}

/// `skein produce`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    printf 'a\\nb\\n' | skein produce orders\n  \
    printf 'alice:order-1\\n' | skein produce -t orders -K : -H source=cli --report\n  \
    skein produce images --file cat.png --file dog.png -k pets\n  \
    find . -print0 | skein produce paths -D '\\0'")]
struct ProduceArgs {
    /// The topic (or -t TOPIC).
    #[arg(value_name = "TOPIC")]
    topic_arg: Option<String>,
    /// The topic.
    #[arg(short = 't', long = "topic", conflicts_with = "topic_arg")]
    topic: Option<String>,
    /// Send every record to this partition (default: by key hash, or spread without a key).
    #[arg(short, long)]
    partition: Option<u32>,
    /// Split each record into KEY SEP VALUE at the first SEP.
    #[arg(short = 'K', long)]
    key_separator: Option<String>,
    /// The same key for every record.
    #[arg(short, long, conflicts_with = "key_separator")]
    key: Option<String>,
    /// A header NAME=VALUE on every record (repeatable).
    #[arg(short = 'H', long = "header", value_parser = input::parse_header)]
    headers: Vec<(String, String)>,
    /// What ends a record on standard input; escapes \n \t \r \0 \\ (default: newline).
    /// Input is bytes: no UTF-8 needed.
    #[arg(short = 'D', long, default_value = "\\n")]
    delimiter: String,
    /// Produce this file's bytes as one record (repeatable); standard input is not read.
    #[arg(long = "file")]
    files: Vec<PathBuf>,
    /// 0, 1 or all.
    #[arg(short, long, default_value = "all")]
    acks: Acks,
    /// Print "PARTITION OFFSET" for each acknowledged record, in acknowledgement order.
    #[arg(long)]
    report: bool,
    /// How long a batch waits for more records (milliseconds).
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// A record not acknowledged this long after it was read fails (the command then exits
    /// non-zero); retries in between ride over broker restarts (milliseconds).
    #[arg(long, default_value_t = 120_000)]
    delivery_timeout_ms: u64,
    #[command(flatten)]
    connect: Connect,
}

/// `skein consume`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    skein consume orders -o beginning -e\n  \
    skein consume orders -o -10 -f '%p %o %k=%v\\n'\n  \
    skein consume orders payments -o time:-1h -f json\n  \
    skein consume orders -g billing")]
struct ConsumeArgs {
    /// Topics to read (or -t TOPIC, repeatable).
    #[arg(value_name = "TOPIC")]
    topics_arg: Vec<String>,
    /// A topic to read (repeatable).
    #[arg(short = 't', long = "topic")]
    topics: Vec<String>,
    /// Read only this partition (with one topic).
    #[arg(short, long)]
    partition: Option<u32>,
    /// beginning, end, an OFFSET, -N (the last N records of each partition), time:EPOCH_MS,
    /// time:RFC3339 or time:-DURATION (time:-1h). With --group: where partitions without a
    /// committed offset start (beginning or end).
    #[arg(short = 'o', long, default_value = "beginning", value_parser = input::parse_start, allow_hyphen_values = true)]
    from: input::StartAt,
    /// Join this consumer group: consume the partitions it assigns, from the committed offsets,
    /// and commit what was printed. SIGINT/SIGTERM leave the group at once.
    #[arg(short, long, conflicts_with = "partition")]
    group: Option<String>,
    /// With --group: the session timeout (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// Exit after this many records.
    #[arg(short = 'c', long = "max-messages")]
    max_messages: Option<u64>,
    /// Exit when nothing arrives for this long (milliseconds).
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Exit once every partition read reached the end it had when reading started (kcat -e).
    #[arg(short = 'e', long = "exit")]
    exit: bool,
    /// value, full (partition, offset, timestamp, key, value; tab-separated), json (one object
    /// per line), or a template: %t topic, %p partition, %o offset, %k key, %v value,
    /// %h headers, %T timestamp, %K / %S key / value length, %%; escapes \n \t \r \0 \\.
    #[arg(short, long, default_value = "value")]
    format: String,
    /// How --format json writes bytes: utf8 (base64 for bytes that are not UTF-8, said in
    /// "<field>_encoding"), base64 or hex.
    #[arg(long, value_enum, default_value = "utf8")]
    encoding: format::Encoding,
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
    if let Command::Cluster { command: ClusterCommand::Health { connect } } = &cli.command {
        init_logging("error");
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        return runtime.block_on(cluster_health(connect));
    }
    let result = match cli.command {
        Command::Broker(args) => run_broker(*args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "skein", &mut std::io::stdout());
            Ok(())
        }
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
    config.transport = match (connect.transport.as_str(), &connect.quic_ca_file) {
        ("tcp", _) => skein_client::Transport::Tcp,
        ("quic", Some(ca_file)) => skein_client::Transport::Quic {
            server_name: connect.quic_server_name.clone(),
            ca_file: ca_file.clone(),
            first_shard: None,
        },
        ("quic", None) => return Err("--transport quic needs --quic-ca-file".to_owned()),
        (other, _) => return Err(format!("--transport {other}: tcp or quic")),
    };
    config.client_id = "skein-cli".into();
    config.connect_timeout = Duration::from_secs(5);
    Client::connect(config).await.map_err(|e| e.to_string())
}

async fn run_client(command: Command) -> Result<(), String> {
    match command {
        Command::Broker(_) | Command::Completions { .. } => unreachable!("handled by main"),
        Command::Topic { command } => topic(command).await,
        Command::Produce(args) => produce(args).await,
        Command::Consume(args) => consume(args).await,
        Command::Group { command } => group(command).await,
        Command::Cluster { command } => cluster(command).await,
    }
}

/// Prints a JSON document on one line.
fn print_json(out: &mut impl Write, value: &serde_json::Value) -> Result<(), String> {
    writeln!(out, "{value}").map_err(|e| e.to_string())
}

async fn group(command: GroupCommand) -> Result<(), String> {
    use serde_json::json;
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| e.to_string();
    match command {
        GroupCommand::List { output, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            let groups = admin.list_groups().await.map_err(|e| e.to_string())?;
            if output.output == Output::Json {
                let groups: Vec<_> = groups
                    .iter()
                    .map(|g| json!({"group": g.group_id, "state": g.state, "members": g.members}))
                    .collect();
                return print_json(&mut out, &json!(groups));
            }
            for group in groups {
                writeln!(out, "{}\t{}\t{} members", group.group_id, group.state, group.members)
                    .map_err(io)?;
            }
            Ok(())
        }
        GroupCommand::Describe { group, output, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            let description = admin.describe_group(&group).await.map_err(|e| e.to_string())?;
            let owned_of = |member: &skein_client::MemberDescription| -> Vec<String> {
                member
                    .assigned
                    .iter()
                    .flat_map(|t| t.partitions.iter().map(move |p| format!("{}/{p}", t.topic)))
                    .collect()
            };
            if output.output == Output::Json {
                let members: Vec<_> = description
                    .members
                    .iter()
                    .map(|m| {
                        json!({"member_id": m.member_id, "client_id": m.client_id, "member_epoch": m.member_epoch,
                               "subscribed_topics": m.subscribed_topics, "partitions": owned_of(m)})
                    })
                    .collect();
                let offsets: Vec<_> = description
                    .offsets
                    .iter()
                    .map(|p| {
                        json!({"topic": p.topic, "partition": p.partition, "committed": p.committed,
                               "end_offset": p.end_offset, "lag": p.lag, "owner": p.owner})
                    })
                    .collect();
                return print_json(
                    &mut out,
                    &json!({"group": description.group_id, "state": description.state,
                            "group_epoch": description.group_epoch, "members": members, "offsets": offsets}),
                );
            }
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
                let owned = owned_of(member);
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
        GroupCommand::Delete { group, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            admin.delete_group(&group).await.map_err(|e| e.to_string())?;
            writeln!(out, "deleted group {group}").map_err(io)
        }
        GroupCommand::ResetOffsets { group, topic, to, shift_by, partitions, dry_run, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            let target = match (to, shift_by) {
                (Some(to), None) => skein_client::ResetTo::Seek(to),
                (None, Some(shift)) => skein_client::ResetTo::ShiftBy(shift),
                _ => return Err("give one of --to and --shift-by".into()),
            };
            let only = (!partitions.is_empty()).then_some(partitions.as_slice());
            let plan = admin.plan_reset(&group, &topic, target, only).await.map_err(|e| e.to_string())?;
            if !dry_run {
                admin.apply_reset(&group, &topic, &plan).await.map_err(|e| e.to_string())?;
            }
            for p in &plan {
                let before = p.before.map_or("-".to_owned(), |o| o.to_string());
                writeln!(out, "{topic}\t{}\t{before}\t{}", p.partition, p.after).map_err(io)?;
            }
            if dry_run {
                eprintln!("dry run: nothing committed");
            }
            Ok(())
        }
    }
}

/// `skein cluster describe` and `skein cluster health`.
async fn cluster(command: ClusterCommand) -> Result<(), String> {
    use serde_json::json;
    let mut out = std::io::stdout().lock();
    match command {
        ClusterCommand::Describe { output, connect: c } => {
            let client = connect(&c).await?;
            let info = client.broker_info().ok_or("no handshake")?;
            let metadata = client.metadata(None).await.map_err(|e| e.to_string())?;
            let partitions: usize = metadata.topics.iter().map(|t| t.partitions.len()).sum();
            if output.output == Output::Json {
                let brokers: Vec<_> = metadata
                    .brokers
                    .iter()
                    .map(|b| json!({"node_id": b.node_id, "host": b.host, "port": b.port}))
                    .collect();
                let topics: Vec<_> = metadata
                    .topics
                    .iter()
                    .map(|t| json!({"name": t.name, "partitions": t.partitions.len()}))
                    .collect();
                return print_json(
                    &mut out,
                    &json!({"answered_by": {"node_id": info.node_id, "version": info.broker_version,
                                            "commit": info.build_commit, "frame_bytes_max": info.frame_bytes_max,
                                            "batch_bytes_max": info.batch_bytes_max},
                            "controller_id": metadata.controller_id, "brokers": brokers,
                            "topics": topics, "partitions": partitions}),
                );
            }
            let io = |e: std::io::Error| e.to_string();
            writeln!(
                out,
                "answered by node {} (skein {}, commit {})",
                info.node_id, info.broker_version, info.build_commit
            )
            .map_err(io)?;
            writeln!(out, "controller {}", metadata.controller_id).map_err(io)?;
            for broker in &metadata.brokers {
                writeln!(out, "broker {} {}:{}", broker.node_id, broker.host, broker.port).map_err(io)?;
            }
            writeln!(out, "{} topics, {partitions} partitions", metadata.topics.len()).map_err(io)
        }
        ClusterCommand::Health { .. } => unreachable!("main runs the health check for its exit code"),
    }
}

/// What is wrong with a cluster, as its metadata says: no broker, topic or partition errors, a
/// partition whose leader is not a listed broker.
fn health_problems(metadata: &skein_net::MetadataResponse) -> Vec<String> {
    let mut problems = Vec::new();
    if metadata.brokers.is_empty() {
        problems.push("no broker listed".to_owned());
    }
    let brokers: Vec<u32> = metadata.brokers.iter().map(|b| b.node_id).collect();
    for topic in &metadata.topics {
        if !topic.error.is_ok() {
            problems.push(format!("topic {}: {}", topic.name, topic.error));
        }
        for p in &topic.partitions {
            if !p.error.is_ok() {
                problems.push(format!("{}/{}: {}", topic.name, p.partition, p.error));
            } else if !brokers.contains(&p.leader) {
                problems
                    .push(format!("{}/{}: no live leader (leader {})", topic.name, p.partition, p.leader));
            }
        }
    }
    problems
}

/// `skein cluster health`: the exit code is the answer (0 healthy, 1 unhealthy, 2 unreachable).
async fn cluster_health(connect_to: &Connect) -> ExitCode {
    let client = match connect(connect_to).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("unreachable: {error}");
            return ExitCode::from(2);
        }
    };
    let metadata = match client.metadata(None).await {
        Ok(metadata) => metadata,
        Err(error) => {
            eprintln!("unreachable: {error}");
            return ExitCode::from(2);
        }
    };
    let problems = health_problems(&metadata);
    let brokers = &metadata.brokers;
    let partitions: usize = metadata.topics.iter().map(|t| t.partitions.len()).sum();
    if problems.is_empty() {
        println!(
            "healthy: {} brokers, {} topics, {partitions} partitions with a leader",
            brokers.len(),
            metadata.topics.len()
        );
        ExitCode::SUCCESS
    } else {
        for problem in &problems {
            println!("unhealthy: {problem}");
        }
        ExitCode::from(1)
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
        TopicCommand::List { output, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            let names = admin.list_topics().await.map_err(|e| e.to_string())?;
            if output.output == Output::Json {
                return print_json(&mut out, &serde_json::json!(names));
            }
            for name in names {
                writeln!(out, "{name}").map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        TopicCommand::Describe { name, output, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            let description = admin.describe_topic(&name).await.map_err(|e| e.to_string())?;
            if output.output == Output::Json {
                let configs: serde_json::Map<String, serde_json::Value> =
                    description.configs.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
                let partitions: Vec<_> = description
                    .partitions
                    .iter()
                    .map(|p| {
                        serde_json::json!({"partition": p.partition, "leader": p.leader,
                                           "start_offset": p.start_offset, "end_offset": p.end_offset})
                    })
                    .collect();
                return print_json(
                    &mut out,
                    &serde_json::json!({"name": description.name, "configs": configs, "partitions": partitions}),
                );
            }
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
        TopicCommand::AddPartitions { name, total, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            admin.add_partitions(&name, total).await.map_err(|e| e.to_string())?;
            writeln!(out, "topic {name} now has {total} partitions").map_err(|e| e.to_string())
        }
        TopicCommand::AlterConfig { name, set, delete, dry_run, connect: c } => {
            if set.is_empty() && delete.is_empty() {
                return Err("nothing to change: give --set KEY=VALUE or --delete KEY".into());
            }
            let admin = Admin::new(connect(&c).await?);
            let pairs: Vec<(&str, &str)> = set.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let reset: Vec<&str> = delete.iter().map(String::as_str).collect();
            admin.alter_topic_config(&name, &pairs, &reset, dry_run).await.map_err(|e| e.to_string())?;
            let changes: Vec<String> = set
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .chain(delete.iter().map(|k| format!("{k}=default")))
                .collect();
            let verb = if dry_run { "would change" } else { "changed" };
            writeln!(out, "topic {name}: {verb} {}", changes.join(" ")).map_err(|e| e.to_string())
        }
        TopicCommand::Delete { name, connect: c } => {
            let admin = Admin::new(connect(&c).await?);
            admin.delete_topic(&name).await.map_err(|e| e.to_string())?;
            writeln!(out, "deleted topic {name}").map_err(|e| e.to_string())
        }
    }
}

async fn produce(args: ProduceArgs) -> Result<(), String> {
    let topic = args.topic.clone().or(args.topic_arg.clone()).ok_or("name a topic (TOPIC or -t TOPIC)")?;
    let delimiter = format::unescape(&args.delimiter).map_err(|e| format!("--delimiter: {e}"))?;
    if delimiter.is_empty() {
        return Err("--delimiter cannot be empty".into());
    }
    let separator = args.key_separator.as_deref().map(format::unescape).transpose()?;
    let client = connect(&args.connect).await?;
    client.topic(&topic).await.map_err(|e| e.to_string())?;
    let config = ProducerConfig::default()
        .acks(args.acks)
        .linger(Duration::from_millis(args.linger_ms))
        .delivery_timeout(Duration::from_millis(args.delivery_timeout_ms.max(1)));
    let producer = Producer::new(client, config);
    // Records are read on a blocking thread and handed over one by one.
    let (records, mut incoming) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(1024);
    let files = args.files.clone();
    std::thread::spawn(move || {
        if files.is_empty() {
            for record in input::Records::new(std::io::stdin().lock(), delimiter) {
                if records.blocking_send(record).is_err() {
                    break;
                }
            }
        } else {
            for path in files {
                let read = std::fs::read(&path)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())));
                if records.blocking_send(read).is_err() {
                    break;
                }
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
    let topic: std::sync::Arc<str> = topic.into();
    let mut sent = 0u64;
    while let Some(bytes) = incoming.recv().await {
        let bytes = bytes.map_err(|e| format!("reading the input: {e}"))?;
        let mut record = match separator.as_deref().and_then(|sep| input::split_key(&bytes, sep)) {
            Some((key, value)) => ProducerRecord::new(topic.clone(), value).key(key),
            None => ProducerRecord::new(topic.clone(), bytes),
        };
        if let Some(key) = &args.key {
            record = record.key(key.clone());
        }
        for (name, value) in &args.headers {
            record = record.header(name.clone(), value.clone());
        }
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

async fn consume(args: ConsumeArgs) -> Result<(), String> {
    use input::StartAt;
    let mut topics: Vec<String> = args.topics_arg.clone();
    topics.extend(args.topics.iter().cloned());
    if topics.is_empty() {
        return Err("name a topic (TOPIC… or -t TOPIC)".into());
    }
    if args.partition.is_some() && topics.len() > 1 {
        return Err("--partition reads one topic".into());
    }
    let format = format::Format::parse(&args.format, args.encoding)?;
    let client = connect(&args.connect).await?;
    let admin = Admin::new(client.clone());
    let mut config = ConsumerConfig::default();
    if args.group.is_some() {
        config.start_from = match args.from {
            StartAt::Seek(to @ (SeekTo::Beginning | SeekTo::End)) => to,
            _ => {
                return Err(
                    "with --group, --from is beginning or end (for partitions without a commit)".into()
                )
            }
        };
    }
    // With --exit: every partition's end when reading started.
    let mut ends: std::collections::HashMap<TopicPartition, u64> = std::collections::HashMap::new();
    let mut starts: std::collections::HashMap<TopicPartition, u64> = std::collections::HashMap::new();
    for topic in &topics {
        let description = admin.describe_topic(topic).await.map_err(|e| e.to_string())?;
        for p in description.partitions {
            ends.insert(TopicPartition::new(topic.as_str(), p.partition), p.end_offset);
            starts.insert(TopicPartition::new(topic.as_str(), p.partition), p.start_offset);
        }
    }
    let mut consumer = Consumer::new(client, config);
    match (&args.group, args.partition) {
        (Some(group), _) => {
            let group = GroupConfig::new(group.clone())
                .session_timeout(Duration::from_millis(args.session_timeout_ms))
                // Commits are made here, after printing (at-least-once).
                .auto_commit(None);
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&names, group).await
        }
        (None, Some(partition)) => consumer.assign(&topics[0], &[partition]).await,
        (None, None) => {
            let mut assigned = Ok(());
            for topic in &topics {
                assigned = assigned.and(consumer.assign_all(topic).await);
            }
            assigned
        }
    }
    .map_err(|e| e.to_string())?;
    if args.group.is_none() {
        match args.from {
            StartAt::Seek(to) => consumer.seek_all(to).await.map_err(|e| e.to_string())?,
            StartAt::Last(count) => {
                for tp in consumer.assignment().to_vec() {
                    let end = ends.get(&tp).copied().unwrap_or(0);
                    let start = starts.get(&tp).copied().unwrap_or(0);
                    let from = end.saturating_sub(count).max(start);
                    consumer
                        .seek(tp.topic(), tp.partition, SeekTo::Offset(from))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    // SIGINT or SIGTERM: stop, commit what was printed, and leave the group at once.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| format!("installing the SIGINT handler: {e}"))?;
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
        let wait = if args.exit { wait.min(Duration::from_millis(200)) } else { wait };
        let records = tokio::select! {
            records = consumer.poll(wait) => records.map_err(|e| e.to_string())?,
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        };
        if !records.is_empty() {
            last_record = tokio::time::Instant::now();
        }
        for record in records {
            if args.max_messages.is_some_and(|max| seen >= max) {
                break;
            }
            format.write(&mut out, &record).map_err(|e| e.to_string())?;
            printed.insert(TopicPartition::new(record.topic.clone(), record.partition), record.offset + 1);
            seen += 1;
        }
        out.flush().map_err(|e| e.to_string())?;
        commit_printed(&mut consumer, &mut printed, args.group.is_some()).await;
        if args.exit && at_end(&consumer, &ends) {
            break;
        }
    }
    out.flush().map_err(|e| e.to_string())?;
    commit_printed(&mut consumer, &mut printed, args.group.is_some()).await;
    consumer.close().await.map_err(|e| e.to_string())
}

/// With a group: commits the offsets after the printed records.
async fn commit_printed(
    consumer: &mut Consumer,
    printed: &mut std::collections::BTreeMap<TopicPartition, u64>,
    in_group: bool,
) {
    if !in_group || printed.is_empty() {
        return;
    }
    let offsets: Vec<(TopicPartition, u64)> = std::mem::take(printed).into_iter().collect();
    if let Err(error) = consumer.commit_offsets(&offsets).await {
        // Printed but not committed: another member may print these again.
        eprintln!("warning: commit failed: {error}");
    }
}

/// Whether every assigned partition reached the end it had when reading started.
fn at_end(consumer: &Consumer, ends: &std::collections::HashMap<TopicPartition, u64>) -> bool {
    let assignment = consumer.assignment();
    !assignment.is_empty()
        && assignment.iter().all(|tp| {
            let end = ends.get(tp).copied().unwrap_or(0);
            consumer.position(tp.topic(), tp.partition).is_some_and(|position| position >= end)
        })
}

#[cfg(test)]
mod tests {
    use skein_net::{BrokerInfo, ErrorCode, MetadataResponse, PartitionMetadata, TopicMetadata};

    fn partition(partition: u32, leader: u32, error: ErrorCode) -> PartitionMetadata {
        PartitionMetadata {
            partition,
            error,
            leader,
            leader_epoch: 0,
            replicas: vec![leader],
            isr: vec![leader],
            shard: None,
        }
    }

    #[test]
    fn health_names_every_problem() {
        let broker = BrokerInfo::new(1, "h", 1);
        let topic = |name: &str, partitions| TopicMetadata {
            name: name.into(),
            error: ErrorCode::None,
            partitions,
            configs: Vec::new(),
        };
        let healthy = MetadataResponse {
            brokers: vec![broker.clone()],
            controller_id: 1,
            topics: vec![topic("a", vec![partition(0, 1, ErrorCode::None)])],
        };
        assert!(super::health_problems(&healthy).is_empty());
        let sick = MetadataResponse {
            brokers: vec![broker],
            controller_id: 1,
            topics: vec![topic(
                "a",
                vec![
                    partition(0, 1, ErrorCode::None),
                    partition(1, 7, ErrorCode::None),
                    partition(2, 1, ErrorCode::UnknownServerError),
                ],
            )],
        };
        let problems = super::health_problems(&sick);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("a/1") && problems[0].contains("no live leader"), "{problems:?}");
        assert!(problems[1].contains("a/2"), "{problems:?}");
        let empty = MetadataResponse { brokers: Vec::new(), controller_id: 0, topics: Vec::new() };
        assert_eq!(super::health_problems(&empty), vec!["no broker listed".to_owned()]);
    }
}
