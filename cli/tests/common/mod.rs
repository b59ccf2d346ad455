//! A real `skein broker` process for tests: temporary data directory, ephemeral port on
//! 127.0.0.1, killed when dropped (even when the test fails).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use skein_client::{Client, ClientConfig, Consumer, ConsumerRecord};

pub struct Broker {
    child: Option<Child>,
    pub addr: String,
    /// Where `/metrics` is served, when started with `--metrics-listen`.
    pub metrics_addr: Option<String>,
    /// Where QUIC is served, and the development certificate, when started with `--quic-listen`.
    pub quic_addr: Option<String>,
    pub quic_cert: Option<PathBuf>,
    pub data_dir: PathBuf,
    extra: Vec<String>,
    /// Resource limits (soft = hard) the process starts with.
    limits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// Environment variables the process starts with (test hooks), kept for every restart.
    env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

pub fn skein() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skein"))
}

fn test_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&root).unwrap();
    root
}

impl Broker {
    /// Starts a broker with 2 shards and `extra` flags.
    pub fn start(extra: &[&str]) -> Broker {
        let dir = tempfile::tempdir_in(test_root()).unwrap();
        let data_dir = dir.path().join("data");
        let mut broker = Broker {
            child: None,
            addr: String::new(),
            metrics_addr: None,
            quic_addr: None,
            quic_cert: None,
            data_dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            limits: Vec::new(),
            env: Vec::new(),
            _dir: Some(dir),
        };
        broker.launch("127.0.0.1:0");
        broker
    }

    /// Starts a broker with 2 shards, `extra` flags and these resource limits (soft = hard),
    /// kept for every restart.
    pub fn start_with_limits(extra: &[&str], limits: &[(libc::__rlimit_resource_t, u64)]) -> Broker {
        let dir = tempfile::tempdir_in(test_root()).unwrap();
        let data_dir = dir.path().join("data");
        let mut broker = Broker {
            child: None,
            addr: String::new(),
            metrics_addr: None,
            quic_addr: None,
            quic_cert: None,
            data_dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            limits: limits.to_vec(),
            env: Vec::new(),
            _dir: Some(dir),
        };
        broker.launch("127.0.0.1:0");
        broker
    }

    /// Starts a broker with 2 shards, `extra` flags and these environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Broker {
        let dir = tempfile::tempdir_in(test_root()).unwrap();
        let data_dir = dir.path().join("data");
        let mut broker = Broker {
            child: None,
            addr: String::new(),
            metrics_addr: None,
            quic_addr: None,
            quic_cert: None,
            data_dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            limits: Vec::new(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            _dir: Some(dir),
        };
        broker.launch("127.0.0.1:0");
        broker
    }

    /// Starts a broker with its data in `data_dir` (which the caller cleans up).
    pub fn start_at(data_dir: PathBuf, extra: &[&str]) -> Broker {
        let mut broker = Broker {
            child: None,
            addr: String::new(),
            metrics_addr: None,
            quic_addr: None,
            quic_cert: None,
            data_dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            limits: Vec::new(),
            env: Vec::new(),
            _dir: None,
        };
        broker.launch("127.0.0.1:0");
        broker
    }

    fn launch(&mut self, listen: &str) {
        let receiver = self.spawn(listen);
        let line = receiver.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let child = self.child.as_mut().expect("spawned");
            if std::env::var_os("SKEIN_DEBUG_HANG").is_some() {
                let out = Command::new("gdb")
                    .args(["-batch", "-ex", "thread apply all bt 30", "-p", &child.id().to_string()])
                    .output();
                if let Ok(out) = out {
                    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            self.child = None;
            panic!("the broker did not start; its log: {}", self.log())
        });
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .expect("listening address")
            .to_owned();
        self.addr = addr;
        if self.extra.iter().any(|arg| arg == "--quic-listen") {
            let line = receiver.recv_timeout(Duration::from_secs(10)).expect("the QUIC address line");
            let mut words = line.split_whitespace().skip_while(|w| *w != "on").skip(1);
            let quic_addr = words.next().expect("skein QUIC on ADDR").to_owned();
            // A restart serves QUIC on the same port, as it does TCP.
            if let Some(at) = self.extra.iter().position(|arg| arg == "--quic-listen") {
                if self.extra.get(at + 1).is_some_and(|value| value.ends_with(":0")) {
                    self.extra[at + 1] = quic_addr.clone();
                }
            }
            self.quic_addr = Some(quic_addr);
            self.quic_cert = line
                .split("development certificate: ")
                .nth(1)
                .map(|rest| PathBuf::from(rest.trim_end_matches(')')));
        }
        if self.extra.iter().any(|arg| arg == "--metrics-listen") {
            let line = receiver.recv_timeout(Duration::from_secs(10)).expect("the metrics address line");
            let at = line.find("http://").expect("skein metrics on http://ADDR/metrics") + "http://".len();
            self.metrics_addr = Some(line[at..].split('/').next().unwrap().to_owned());
        }
    }

    /// Starts the broker process again on the same data directory and address without waiting
    /// for it to be ready (the caller probes the port itself).
    pub fn restart_without_waiting(&mut self) {
        assert!(self.child.is_none(), "stop the broker first");
        let addr = self.addr.clone();
        let _ = self.spawn(&addr);
    }

    /// Spawns the process; its stderr goes to the log file, its stdout lines to the receiver.
    fn spawn(&mut self, listen: &str) -> std::sync::mpsc::Receiver<String> {
        let mut command = skein();
        let cores =
            if self.extra.iter().any(|arg| arg == "--cores") { &[][..] } else { &["--cores", "2"][..] };
        command
            .arg("broker")
            .args(cores)
            .args(["--listen", listen, "--data-dir"])
            .arg(&self.data_dir)
            .args(&self.extra)
            .env("RUST_LOG", "info,skein_broker::server=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let limits = self.limits.clone();
        if !limits.is_empty() {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit (async-signal-safe) between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    for (resource, value) in &limits {
                        let limit = libc::rlimit { rlim_cur: *value, rlim_max: *value };
                        if libc::setrlimit(*resource, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("skein broker starts");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log_path = self.data_dir.with_extension("log");
        std::thread::spawn(move || {
            let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).unwrap();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                use std::io::Write;
                let _ = writeln!(log, "{line}");
            }
        });
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        self.child = Some(child);
        receiver
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        Client::connect(ClientConfig::new(self.addr.clone())).await.expect("client connects")
    }

    /// SIGTERM and wait; returns the exit status's success.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, wait, and wait for the port to be released: the kernel tears a dead process's
    /// io_uring down in the background, and until then an accept in flight keeps the listening
    /// sockets alive (connections land there and are reset).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let started = Instant::now();
            while std::net::TcpListener::bind(&self.addr).is_err()
                && started.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts again on the same data directory and port.
    /// Runs the broker's next starts with `cores` shards (the data directory stays).
    pub fn set_cores(&mut self, cores: usize) {
        match self.extra.iter().position(|arg| arg == "--cores") {
            Some(at) => self.extra[at + 1] = cores.to_string(),
            None => self.extra.extend(["--cores".to_owned(), cores.to_string()]),
        }
    }

    pub fn restart(&mut self) {
        // A running child would be replaced here and never killed (its data directory's lock
        // then refuses every new start).
        assert!(self.child.is_none(), "stop or kill the broker before restarting it");
        let addr = self.addr.clone();
        for attempt in 0..50 {
            self.launch_checked(&addr);
            if self.child.is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
        }
        panic!("the broker did not restart on {addr}: {}", self.log());
    }

    fn launch_checked(&mut self, listen: &str) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.launch(listen)));
        if result.is_err() {
            self.child = None;
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Starts again on the same port once; `Err` with the broker's log if it did not start.
    pub fn try_restart(&mut self) -> Result<(), String> {
        let addr = self.addr.clone();
        self.launch_checked(&addr);
        if self.child.is_some() {
            Ok(())
        } else {
            Err(self.log())
        }
    }

    /// The process id of the running broker.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the broker on the same data directory expecting it to refuse (exit non-zero
    /// within 60 s); returns what it printed on stderr.
    pub fn start_refused(&mut self) -> String {
        assert!(self.child.is_none(), "stop the broker first");
        let mut child = skein()
            .args(["broker", "--cores", "2", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&self.data_dir)
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("skein broker starts");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
                assert!(!status.success(), "the broker exited successfully: {stderr}");
                return stderr;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the broker did not refuse to start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Descriptors a process holds (Linux `/proc`).
pub fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The resident memory of a process, in KiB (Linux `/proc`).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// The most resident memory a process had, in KiB (Linux `/proc`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the CLI with `args` against `broker`, feeding `stdin`; returns (success, stdout, stderr).
pub fn cli(broker: &Broker, args: &[&str], stdin: &str) -> (bool, String, String) {
    let (ok, out, err) = cli_bytes(broker, args, stdin.as_bytes());
    (ok, String::from_utf8_lossy(&out).into_owned(), err)
}

/// [`cli`] with bytes in and out (binary input and output).
pub fn cli_bytes(broker: &Broker, args: &[&str], stdin: &[u8]) -> (bool, Vec<u8>, String) {
    use std::io::Write;
    let mut child = skein()
        .args(args)
        .env("SKEIN_BOOTSTRAP", &broker.addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_owned();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    let output = match receiver.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // SAFETY: killing our own child process.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("skein {args:?} did not finish in 60 s");
        }
    };
    writer.join().unwrap();
    (output.status.success(), output.stdout, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Stops a test early, with a clear message, when the filesystem holding `path` has less than
/// `bytes` free: tests that write a lot check first instead of filling the disk.
pub fn require_free_space(path: &Path, bytes: u64) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs into a zeroed local struct with a NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) }, 0, "statvfs {}", path.display());
    let free = stat.f_bavail as u64 * stat.f_frsize as u64;
    assert!(
        free >= bytes,
        "{} has {} MiB free; this test needs {} MiB: free some space first",
        path.display(),
        free >> 20,
        bytes >> 20
    );
}

/// A `skein ARGS` process against a broker, running in the background: what it prints on
/// stdout is collected line by line; killed when dropped (even when the test fails).
pub struct Background {
    pub child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Background {
    pub fn start(broker: &Broker, args: &[&str]) -> Background {
        let mut child = skein()
            .args(args)
            .env("SKEIN_BOOTSTRAP", &broker.addr)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Background { child, lines }
    }

    /// The lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads every assigned partition until `expected` records arrived (or 30 s passed).
pub async fn read_all(consumer: &mut Consumer, expected: usize) -> Vec<ConsumerRecord> {
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while records.len() < expected && Instant::now() < deadline {
        records.extend(consumer.poll(Duration::from_millis(500)).await.unwrap());
    }
    records
}

/// A consumer of every partition of `topic` (short long-polls) reads it from the beginning
/// until `expected` records arrived (or 30 s passed).
pub async fn read_topic(client: Client, topic: &str, expected: usize) -> Vec<ConsumerRecord> {
    let mut consumer = Consumer::new(
        client,
        skein_client::ConsumerConfig::default().fetch_wait_max(Duration::from_millis(50)),
    );
    consumer.assign_all(topic).await.unwrap();
    read_all(&mut consumer, expected).await
}

/// A plain HTTP/1.1 GET: the status and the body.
pub fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Scrapes and parses `/metrics`; samples by name and labels (`name{k=v,...}`).
pub fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let (status, body) = get(addr, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let mut samples = BTreeMap::new();
    for sample in parsed.samples {
        let mut labels: Vec<String> = sample.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(buckets) => {
                let count = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
                samples.insert(format!("{}_count{{}}", sample.metric), count);
                continue;
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        samples.insert(format!("{}{{{}}}", sample.metric, labels.join(",")), value);
    }
    samples
}

pub fn sum_of(samples: &BTreeMap<String, f64>, family: &str) -> f64 {
    samples.iter().filter(|(k, _)| k.starts_with(&format!("{family}{{"))).map(|(_, v)| v).sum()
}

/// Frames that break the framing, each with its name, made from a `good` request frame: bad
/// magic, an unknown header version, unknown flag bits, a length shorter than a header, a length
/// above a 1 MiB frame limit, random bytes. The broker must end the connection (or QUIC stream)
/// that carries one, and nothing else.
pub fn bad_frames(good: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("bad magic", {
            let mut f = good.to_vec();
            f[4] = b'X';
            f
        }),
        ("unknown header version", {
            let mut f = good.to_vec();
            f[5] = 9;
            f
        }),
        ("unknown flag bits", {
            let mut f = good.to_vec();
            f[10] = 0x80;
            f
        }),
        ("length shorter than a header", vec![4, 0, 0, 0, b'S', 1, 0, 0]),
        ("length above the frame limit", {
            let mut f = good.to_vec();
            f[..4].copy_from_slice(&(1u32 << 30).to_le_bytes());
            f
        }),
        ("random bytes", (0..200u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()),
    ]
}

/// The shards of the request lines logged since line `from` (JSON logs, `--log-requests`).
pub fn request_shards(broker: &Broker, from: usize) -> (std::collections::BTreeSet<u64>, usize) {
    let log = broker.log();
    let lines: Vec<&str> = log.lines().collect();
    let mut shards = std::collections::BTreeSet::new();
    for line in &lines[from.min(lines.len())..] {
        if !line.contains("\"request\"") {
            continue;
        }
        let object: serde_json::Value = serde_json::from_str(line).unwrap();
        if object["fields"]["message"] == "request" {
            shards.insert(object["span"]["shard"].as_u64().expect("request lines name their shard"));
        }
    }
    (shards, lines.len())
}

/// The shards that served the request lines logged after line `seen`, once they stopped
/// coming; `seen` moves past them. The request lines reach the log file a moment after the
/// answers, not all at once: this waits until some came and none followed for 200 ms (at most
/// 10 s), so that none of one client's lines is counted with the next client's.
pub async fn settled_request_shards(broker: &Broker, seen: &mut usize) -> std::collections::BTreeSet<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = *seen;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (shards, lines) = request_shards(broker, *seen);
        if (!shards.is_empty() && lines == last) || Instant::now() > deadline {
            *seen = lines;
            return shards;
        }
        last = lines;
    }
}

/// Each of `partitions` partitions holds the records `i` (values) with `i mod partitions` equal to
/// it, for `i` below `total`: every record once, in order.
pub fn assert_each_partition_in_order(records: &[skein_client::ConsumerRecord], partitions: u32, total: u32) {
    for partition in 0..partitions {
        let values: Vec<u32> = records
            .iter()
            .filter(|r| r.partition == partition)
            .map(|r| std::str::from_utf8(r.value.as_deref().unwrap()).unwrap().parse().unwrap())
            .collect();
        let expected: Vec<u32> = (0..total).filter(|i| i % partitions == partition).collect();
        assert_eq!(values, expected, "partition {partition}: every record once, in order");
    }
}

/// A broker restarted with another number of shards (3 after 2) holds its partitions on other
/// shards: a client made with `config` learns the new placement when it reconnects, and the
/// same producer and consumer send each partition's requests to the shard that holds it now
/// (none hops between shards once the requests on their way at the restart are answered);
/// nothing is lost or repeated. `broker` serves `--metrics-listen`; `config` says how the
/// client connects to it.
pub async fn requests_follow_the_partitions_after_a_restart_with_more_shards(
    mut broker: Broker,
    config: impl Fn(&Broker) -> ClientConfig,
) {
    use skein_client::{Admin, ConsumerConfig, Producer, ProducerConfig, ProducerRecord};
    let client = Client::connect(config(&broker)).await.unwrap();
    Admin::new(client.clone()).create_topic("moving", 6, &[]).await.unwrap();
    let before = client.refresh_topic("moving").await.unwrap().shards.clone();
    let producer = Producer::new(client.clone(), ProducerConfig::default().linger(Duration::from_millis(1)));
    let send = |from: u32, to: u32| {
        let producer = &producer;
        async move {
            for i in from..to {
                producer.send(ProducerRecord::new("moving", format!("{i}")).partition(i % 6)).await.unwrap();
            }
            producer.flush().await.expect("every record acknowledged");
        }
    };
    send(0, 600).await;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign("moving", &[0, 1, 2, 3, 4, 5]).await.unwrap();
    consumer.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    let mut records = read_all(&mut consumer, 600).await;

    broker.kill();
    broker.set_cores(3);
    broker.restart();
    let metrics = broker.metrics_addr.clone().expect("the metrics address");
    let hops = |api: &str| scrape(&metrics)[&format!("skein_forwarded_partitions_total{{api={api}}}")];
    // The first requests after the restart may go to a partition's old shard: they were on
    // their way before the client heard of the new placement.
    send(600, 660).await;
    records.extend(read_all(&mut consumer, 60).await);
    let after = client.topic("moving").await.unwrap().shards.clone(); // the cached metadata
    assert_eq!(after.iter().flatten().max(), Some(&2), "the client knows the 3 shards: {after:?}");
    assert_ne!(before, after, "some partitions moved to other shards");
    // A fetch the consumer sent before it heard of the new placement may still be long-polling
    // at a partition's old shard (each pass counts as a hop): one more round of records
    // answers it (seen once in a full test run: 4 hops after the snapshot).
    send(660, 720).await;
    records.extend(read_all(&mut consumer, 60).await);
    let (produce_hops, fetch_hops) = (hops("produce"), hops("fetch"));
    send(720, 3000).await;
    records.extend(read_all(&mut consumer, 2280).await);
    assert_eq!(hops("produce"), produce_hops, "a produce request went to a partition's old shard");
    assert_eq!(hops("fetch"), fetch_hops, "a fetch went to a partition's old shard");
    assert_each_partition_in_order(&records, 6, 3000);
}

/// A Produce request frame for one partition (the newest version).
pub fn produce_frame(
    topic: &str,
    partition: u32,
    records: bytes::Bytes,
    acks: i8,
    correlation_id: u32,
) -> bytes::BytesMut {
    skein_net::Request::Produce(skein_net::ProduceRequest {
        acks,
        timeout_ms: 5000,
        topics: vec![skein_net::TopicData {
            name: topic.into(),
            partitions: vec![skein_net::ProducePartition { partition, records }],
        }],
    })
    .to_frame(correlation_id, 0)
}

/// A record batch of one record.
pub fn good_batch(value: &[u8]) -> bytes::Bytes {
    let mut builder = skein_storage::batch::BatchBuilder::new();
    builder.push(1, None, Some(value), &[]);
    builder.finish().freeze()
}
