//! Running Skein as an operator does: the config file with environment and flag overrides,
//! unknown keys, `/metrics` scraped after traffic (parsed as Prometheus text), `/health` and
//! `/ready` around a slow recovery, JSON logs, systemd readiness, and the install script.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{get, scrape, skein, sum_of, Broker};
use skein_client::{Admin, Consumer, ConsumerConfig, GroupConfig, Producer, ProducerConfig, ProducerRecord};

fn temp_dir() -> tempfile::TempDir {
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&root).unwrap();
    tempfile::tempdir_in(root).unwrap()
}

/// A GET over plain HTTP/1.1: (status code, body).
/// A broker process started by hand (for what `common::Broker` does not cover): its stdout
/// lines arrive on a channel; killed when dropped.
struct Process {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Process {
    fn spawn(mut command: std::process::Command) -> Process {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("skein starts");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        Process { child, lines }
    }

    /// The next stdout line containing `needle` (within 60 s).
    fn line_with(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no line with {needle:?} within 60 s");
    }

    fn terminate(&mut self) -> bool {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn address_after<'a>(line: &'a str, prefix: &str) -> &'a str {
    let at = line.find(prefix).expect("prefix") + prefix.len();
    line[at..].split(|c: char| c.is_whitespace() || c == '/').next().unwrap()
}

#[test]
fn flags_beat_environment_which_beats_the_config_file() {
    let dir = temp_dir();
    let config = dir.path().join("skein.toml");
    std::fs::write(
        &config,
        "[broker]\ncores = 3\n[network]\nin_flight_max = 7\nframe_timeout_ms = 1234\n[storage]\nfsync = \"always\"\n",
    )
    .unwrap();
    let out = skein()
        .args(["broker", "--print-config", "--cores", "1", "--config"])
        .arg(&config)
        .env("SKEIN_BROKER_CORES", "2")
        .env("SKEIN_NETWORK_IN_FLIGHT_MAX", "9")
        .env("SKEIN_BOOTSTRAP", "elsewhere:1") // a client variable, not a broker setting
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(printed["broker"]["cores"].as_integer(), Some(1), "the flag wins");
    assert_eq!(printed["network"]["in_flight_max"].as_integer(), Some(9), "the environment beats the file");
    assert_eq!(printed["network"]["frame_timeout_ms"].as_integer(), Some(1234), "from the file");
    assert_eq!(printed["storage"]["fsync"].as_str(), Some("always"), "from the file");
    assert_eq!(printed["network"]["idle_timeout_s"].as_integer(), Some(600), "the default");

    // The broker runs with what the file says: data directory, address, fsync policy.
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "[broker]\ndata_dir = {:?}\ncores = 1\n[network]\nlisten = \"127.0.0.1:0\"\n[storage]\nfsync = \"always\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let mut command = skein();
    command.args(["broker", "--config"]).arg(&config);
    let mut broker = Process::spawn(command);
    let line = broker.line_with("listening on");
    assert!(line.contains("fsync=always") && line.contains("1 shards"), "{line}");
    assert!(line.contains(&data.display().to_string()), "{line}");
    assert!(data.join(".lock").exists(), "the data went where the file said");
    assert!(broker.terminate(), "a clean stop");
}

#[test]
fn unknown_keys_and_bad_values_are_refused_by_name() {
    let dir = temp_dir();
    let config = dir.path().join("skein.toml");
    std::fs::write(&config, "[storage]\nfsync = \"never\"\nretention_days = 3\n").unwrap();
    let out = skein().args(["broker", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("retention_days") && stderr.contains("line 3"), "{stderr}");

    let out =
        skein().args(["broker", "--print-config"]).env("SKEIN_STORAGE_RETENTION_DAYS", "3").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("SKEIN_STORAGE_RETENTION_DAYS") && stderr.contains("retention_days"), "{stderr}");

    let out = skein().args(["broker", "--check"]).env("SKEIN_STORAGE_FSYNC", "sometimes").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("storage.fsync") && stderr.contains("sometimes"), "{stderr}");

    let out = skein().args(["broker", "--config"]).arg(dir.path().join("missing.toml")).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("missing.toml"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_traffic_have_every_family_and_the_right_figures() {
    let broker = Broker::start(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--log-requests",
        "--cache-bytes-max",
        "33554432",
    ]);
    let metrics = broker.metrics_addr.clone().expect("the broker printed its metrics address");
    let admin = Admin::new(broker.client().await);
    admin.create_topic("orders", 4, &[]).await.unwrap();
    let producer = Producer::new(broker.client().await, ProducerConfig::default());
    for i in 0..500 {
        producer
            .send(ProducerRecord::new("orders", format!("order-{i}")).key(format!("k{i}")))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let mut consumer = Consumer::new(broker.client().await, ConsumerConfig::default());
    consumer.subscribe(&["orders"], GroupConfig::new("billing").auto_commit(None)).await.unwrap();
    assert_eq!(common::read_all(&mut consumer, 500).await.len(), 500);
    consumer.commit().await.unwrap();
    // A bad request counts as an error of its API.
    assert!(admin.describe_topic("no-such-topic").await.is_err());

    let samples = scrape(&metrics);
    let value =
        |key: &str| *samples.get(key).unwrap_or_else(|| panic!("{key} missing: {:?}", samples.keys()));
    assert_eq!(value("skein_produced_records_total{}"), 500.0);
    assert!(value("skein_requests_total{api=Produce}") >= 1.0);
    assert!(value("skein_requests_total{api=Fetch}") >= 1.0);
    assert!(value("skein_requests_total{api=OffsetCommit}") >= 1.0);
    assert!(value("skein_produced_bytes_total{}") > 500.0 * 9.0);
    assert!(value("skein_fetched_bytes_total{}") >= value("skein_produced_bytes_total{}"));
    assert!(value("skein_request_bytes_total{}") > 0.0 && value("skein_response_bytes_total{}") > 0.0);
    assert!(value("skein_produce_latency_seconds_count{}") >= 1.0);
    assert!(value("skein_fetch_latency_seconds_count{}") >= 1.0);
    // Every produce waited for at least one O_DIRECT write.
    assert!(value("skein_write_latency_seconds_count{}") >= 1.0);
    assert!(value("skein_write_latency_seconds_sum{}") > 0.0);
    assert!(value("skein_connections_accepted_total{}") >= 3.0);
    assert!(value("skein_connections{}") >= 3.0, "admin, producer and consumer are connected");
    assert!(value("skein_open_files{}") > 0.0);
    // Split across the shards (each its share, rounded down).
    assert!((value("skein_tail_cache_bytes_max{}") - 33554432.0).abs() < 16.0);
    assert!(value("skein_tail_cache_bytes{}") <= value("skein_tail_cache_bytes_max{}"));
    assert_eq!(value("skein_tail_cache_evictions_total{}"), 0.0, "500 small records fit");
    assert!(sum_of(&samples, "skein_log_reads_total") >= 1.0);
    assert_eq!(value("skein_topic_partitions{topic=orders}"), 4.0);
    assert!(value("skein_topic_bytes{topic=orders}") > 0.0);
    assert_eq!(sum_of(&samples, "skein_partition_log_end_offset") as u64, 500);
    assert_eq!(value("skein_consumer_group_lag{group=billing}"), 0.0, "everything read was committed");
    assert_eq!(value("skein_consumer_group_members{group=billing}"), 1.0);
    assert_eq!(sum_of(&samples, "skein_shard_partitions") as u64, 4);
    assert_eq!(value("skein_ready{}"), 1.0);
    assert_eq!(value("skein_metrics_stale_shards{}"), 0.0);
    assert!(samples.contains_key("skein_reactor_stalls_total{shard=1}"));
    assert!(samples.contains_key("skein_reactor_lag_max_seconds{shard=1}"));
    assert!(samples.keys().any(|k| k.starts_with("skein_build_info{")));

    // More records, not read: the lag says how many.
    for i in 0..120 {
        producer.send(ProducerRecord::new("orders", format!("late-{i}"))).await.unwrap();
    }
    producer.flush().await.unwrap();
    let samples = scrape(&metrics);
    assert_eq!(samples["skein_consumer_group_lag{group=billing}"], 120.0);
    assert_eq!(samples["skein_produced_records_total{}"], 620.0);

    // Every metric the bundled Grafana dashboard queries is served.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/deploy/grafana-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let served: Vec<String> = samples.keys().map(|k| k.split('{').next().unwrap().to_owned()).collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("skein_") {
                    let name = format!(
                        "skein_{}",
                        name.strip_suffix("_bucket").map(|n| format!("{n}_count")).unwrap_or(name.to_owned())
                    );
                    assert!(
                        served.contains(&name),
                        "the dashboard queries {name}, which /metrics does not serve"
                    );
                    queried += 1;
                }
            }
        }
    }
    assert!(queried >= 15, "the dashboard queries {queried} metrics");

    // JSON logs: every line is an object, and the shards' lines name their shard.
    let log = broker.log();
    let (mut from_shards, mut produce_requests) = (0, 0);
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let object: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(object["level"].is_string() && object["fields"]["message"].is_string(), "{line}");
        if object["span"]["shard"].is_number() {
            from_shards += 1;
        }
        // --log-requests: one line per request, naming its API.
        if object["fields"]["message"] == "request" && object["fields"]["api"] == "Produce" {
            assert!(object["fields"]["micros"].is_number(), "{line}");
            produce_requests += 1;
        }
    }
    assert!(from_shards >= 2, "shard lines carry their shard: {log}");
    assert!(produce_requests >= 1, "every request is logged with --log-requests: {log}");
}

#[test]
fn ready_turns_200_only_once_every_shard_recovered() {
    let dir = temp_dir();
    // With a known metrics port: pick a free one first.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let mut command = skein();
    command
        .args([
            "broker",
            "--cores",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &metrics,
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env("SKEIN_TEST_RECOVERY_DELAY_MS", "3000");
    let started = Instant::now();
    let mut broker = Process::spawn(command);
    // /health answers while the shards recover; /ready says 503 and why.
    let mut health = None;
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok((status, _)) = get(&metrics, "/health") {
            health = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(health, Some(200), "/health answers during recovery");
    let (status, body) = get(&metrics, "/ready").unwrap();
    assert_eq!(status, 503, "not ready while recovering: {body}");
    assert!(body.contains("of 2 shards recovered"), "{body}");
    // Ready only once the client port serves.
    let mut ready_at = None;
    while started.elapsed() < Duration::from_secs(60) {
        if get(&metrics, "/ready").is_ok_and(|(s, _)| s == 200) {
            ready_at = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready_at = ready_at.expect("ready within 60 s");
    assert!(ready_at >= Duration::from_secs(3), "ready only after the 3 s recovery: {ready_at:?}");
    let line = broker.line_with("listening on");
    let addr = address_after(&line, "listening on ").to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = skein_client::Client::connect(skein_client::ClientConfig::new(addr)).await.unwrap();
        Admin::new(client).create_topic("t", 2, &[]).await.expect("the broker serves once ready");
    });
    assert!(broker.terminate());
}

#[test]
fn systemd_hears_ready_then_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = temp_dir();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut command = skein();
    command
        .args(["broker", "--cores", "2", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("NOTIFY_SOCKET", &socket_path);
    let mut broker = Process::spawn(command);
    let mut buffer = [0u8; 256];
    let n = socket.recv(&mut buffer).expect("a READY notification");
    let ready = String::from_utf8_lossy(&buffer[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Ready means serving.
    let line = broker.line_with("listening on");
    let addr = address_after(&line, "listening on ").to_owned();
    assert!(TcpStream::connect(&addr).is_ok());
    assert!(broker.terminate());
    let n = socket.recv(&mut buffer).expect("a STOPPING notification");
    assert_eq!(String::from_utf8_lossy(&buffer[..n]), "STOPPING=1");
}

#[test]
fn install_script_installs_a_binary_and_config_that_start() {
    let dir = temp_dir();
    let prefix = dir.path().join("prefix");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(["--no-systemd", "--binary", env!("CARGO_BIN_EXE_skein"), "--prefix"])
        .arg(&prefix)
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{log}");
    assert!(log.contains("io_uring") && log.contains("data directory"), "the pre-start checks ran: {log}");
    let binary = prefix.join("bin/skein");
    let config = prefix.join("etc/skein/skein.toml");
    let unit = std::fs::read_to_string(prefix.join("share/skein/skein.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("LimitMEMLOCK=infinity"), "{unit}");
    assert!(
        unit.contains(&format!("ExecStart={} broker --config {}", binary.display(), config.display())),
        "{unit}"
    );
    assert!(!unit.contains('@'), "every placeholder replaced: {unit}");
    let settings: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let data_dir = prefix.join("var/lib/skein");
    assert_eq!(settings["broker"]["data_dir"].as_str(), Some(data_dir.to_str().unwrap()));

    // Installing again keeps the operator's config and writes the new one beside it.
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(["--no-systemd", "--binary", env!("CARGO_BIN_EXE_skein"), "--prefix"])
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(prefix.join("etc/skein/skein.toml.new").exists());

    // The installed binary starts with the installed config (on ephemeral loopback ports).
    let mut command = std::process::Command::new(&binary);
    command
        .args(["broker", "--config"])
        .arg(&config)
        .env("SKEIN_NETWORK_LISTEN", "127.0.0.1:0")
        .env("SKEIN_METRICS_LISTEN", "127.0.0.1:0")
        .env("SKEIN_BROKER_CORES", "1");
    let mut broker = Process::spawn(command);
    let line = broker.line_with("listening on");
    assert!(line.contains(data_dir.to_str().unwrap()), "{line}");
    let metrics_line = broker.line_with("skein metrics on");
    let (status, _) = get(address_after(&metrics_line, "http://"), "/ready").unwrap();
    assert_eq!(status, 200);
    assert!(broker.terminate());
}
