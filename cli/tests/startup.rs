//! Start-up as users break it: clients that arrive the moment a restarted broker accepts, and
//! starts that cannot succeed (too little locked memory, too few open files, a tmpfs data
//! directory, a shard that dies, a signal during start-up), each of which must end within
//! seconds with one line naming the cause.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{skein, Background, Broker};
use skein_client::{
    Acks, Admin, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
};

/// Runs `skein broker` on `data_dir` with `extra` arguments, environment and resource limits;
/// returns (exit success, stderr, seconds it took). Panics if it runs longer than `limit`.
fn run_broker(
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    limits: &[(libc::__rlimit_resource_t, u64)],
    limit: Duration,
) -> (bool, String, f64) {
    let mut command = skein();
    command
        .args(["broker", "--cores", "2", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let limits = limits.to_vec();
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
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
    let started = Instant::now();
    let mut child = command.spawn().expect("skein broker starts");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            return (status.success(), stderr, started.elapsed().as_secs_f64());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the broker was still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn data_dir() -> tempfile::TempDir {
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&root).unwrap();
    tempfile::tempdir_in(root).unwrap()
}

fn last_line(stderr: &str) -> &str {
    stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

#[test]
fn too_little_locked_memory_fails_at_once_naming_the_limit() {
    let dir = data_dir();
    let (ok, stderr, seconds) = run_broker(
        &dir.path().join("data"),
        &[],
        &[],
        &[(libc::RLIMIT_MEMLOCK, 64 << 10)],
        Duration::from_secs(10),
    );
    assert!(!ok);
    let line = last_line(&stderr);
    assert!(line.starts_with("error: locked memory:") && line.contains("ulimit -l"), "{stderr}");
    eprintln!("memlock 64 KiB: exit after {seconds:.2} s: {line}");
}

#[test]
fn too_few_open_files_fails_at_once_naming_the_limit() {
    let dir = data_dir();
    // Below what the process and two shards need before any partition.
    let (ok, stderr, seconds) = run_broker(
        &dir.path().join("data"),
        &[],
        &[],
        &[(libc::RLIMIT_NOFILE, 200)],
        Duration::from_secs(10),
    );
    assert!(!ok);
    let line = last_line(&stderr);
    assert!(line.starts_with("error: open files:") && line.contains("ulimit -n"), "{stderr}");
    eprintln!("nofile 200: exit after {seconds:.2} s: {line}");
}

/// A tmpfs directory: /dev/shm where it is one, else a tmpfs mounted here (needs root).
struct Tmpfs {
    path: std::path::PathBuf,
    mounted: bool,
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    fn new() -> Option<Tmpfs> {
        let is_tmpfs = |path: &Path| {
            let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: statfs into a zeroed local with a NUL-terminated path.
            let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
            unsafe { libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == 0x0102_1994 }
        };
        if is_tmpfs(Path::new("/dev/shm")) {
            let path = Path::new("/dev/shm").join(format!("skein-test-{}", std::process::id()));
            return Some(Tmpfs { path, mounted: false, _dir: None });
        }
        let dir = data_dir();
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(dir.path()).status();
        match status {
            Ok(status) if status.success() => {
                Some(Tmpfs { path: dir.path().join("data"), mounted: true, _dir: Some(dir) })
            }
            _ => None,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        if self.mounted {
            let _ = Command::new("umount").arg(self.path.parent().unwrap()).status();
        }
    }
}

#[test]
fn a_tmpfs_data_directory_is_refused_and_check_says_so() {
    let Some(tmpfs) = Tmpfs::new() else {
        eprintln!("SKIPPED: no tmpfs here (/dev/shm is not one and mounting one needs root)");
        return;
    };
    let (ok, stderr, seconds) = run_broker(&tmpfs.path, &[], &[], &[], Duration::from_secs(10));
    assert!(!ok);
    let line = last_line(&stderr);
    assert!(line.starts_with("error: data directory:") && line.contains("tmpfs"), "{stderr}");
    assert!(!tmpfs.path.exists(), "nothing was created in the refused directory");
    eprintln!("tmpfs: exit after {seconds:.2} s: {line}");

    let output = skein().args(["broker", "--check", "--data-dir"]).arg(&tmpfs.path).output().unwrap();
    assert!(!output.status.success(), "--check fails");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("FAILED") && l.contains("data directory")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("ok") && l.contains("io_uring")), "{stdout}");
}

#[test]
fn check_passes_on_a_disk_directory_and_creates_nothing() {
    let dir = data_dir();
    let data = dir.path().join("data");
    let output = skein().args(["broker", "--check", "--data-dir"]).arg(&data).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    for check in ["locked memory", "open files", "io_uring", "data directory"] {
        assert!(
            stdout.lines().any(|l| (l.starts_with("ok") || l.starts_with("warning")) && l.contains(check)),
            "{check}: {stdout}"
        );
    }
    assert!(!data.exists());
}

#[test]
fn a_shard_that_dies_during_start_up_stops_the_start_with_its_error() {
    let dir = data_dir();
    let (ok, stderr, seconds) = run_broker(
        &dir.path().join("data"),
        &[],
        &[("SKEIN_TEST_PANIC_SHARD", "1")],
        &[],
        Duration::from_secs(10),
    );
    assert!(!ok);
    let line = last_line(&stderr);
    assert!(line.starts_with("error: shard 1:"), "{stderr}");
    assert!(stderr.contains("SKEIN_TEST_PANIC_SHARD"), "the panic is printed: {stderr}");
    eprintln!("dead shard: exit after {seconds:.2} s: {line}");
}

#[test]
fn a_shard_that_dies_while_serving_ends_the_process() {
    // A process with a dead shard looks alive but leaves that shard's partitions unanswered;
    // it must exit so that its supervisor restarts it.
    let dir = data_dir();
    let (ok, stderr, seconds) = run_broker(
        &dir.path().join("data"),
        &[],
        &[("SKEIN_TEST_PANIC_SERVING_SHARD", "1")],
        &[],
        Duration::from_secs(20),
    );
    assert!(!ok);
    assert!(stderr.contains("SKEIN_TEST_PANIC_SERVING_SHARD: shard 1 panics while serving"), "{stderr}");
    assert!(
        last_line(&stderr).contains("panicked while serving; exiting so that a supervisor restarts it"),
        "{stderr}"
    );
    eprintln!("dead shard while serving: exit after {seconds:.2} s");
}

#[test]
fn a_shard_that_cannot_open_its_partition_stops_the_start_naming_it() {
    // Start once to create a topic whose partitions land on both shards, then make one of
    // them unreadable (a file where its directory was).
    let mut broker = Broker::start(&[]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime
        .block_on(async { Admin::new(broker.client().await).create_topic("broken", 4, &[]).await.unwrap() });
    assert!(broker.stop());
    let partition = broker.data_dir().join("topics/broken/3");
    std::fs::remove_dir_all(&partition).unwrap();
    std::fs::write(&partition, b"not a directory").unwrap();
    let (ok, stderr, seconds) = run_broker(broker.data_dir(), &[], &[], &[], Duration::from_secs(10));
    assert!(!ok);
    let line = last_line(&stderr);
    assert!(line.starts_with("error: shard ") && line.contains("topic broken"), "{stderr}");
    eprintln!("broken partition: exit after {seconds:.2} s: {line}");
}

#[test]
fn sigterm_during_start_up_stops_the_process() {
    let dir = data_dir();
    // Many shards on few CPUs: starting takes seconds here.
    let mut child = skein()
        .args(["broker", "--cores", "32", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the broker ignored SIGTERM for 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let seconds = signalled.elapsed().as_secs_f64();
    if stdout.contains("listening") {
        // It was faster than the signal: it stopped cleanly instead.
        assert!(status.success(), "{stderr}");
        eprintln!("SIGTERM arrived after start-up; clean stop {seconds:.2} s after it");
    } else {
        assert!(!status.success());
        assert!(last_line(&stderr).contains("interrupted"), "{stderr}");
        eprintln!("SIGTERM during start-up: exit {seconds:.2} s after it");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_arrive_the_moment_a_restarted_broker_accepts_succeed() {
    const RECORDS: u32 = 110_000;
    let mut broker = Broker::start(&["--fsync", "never"]);
    common::require_free_space(broker.data_dir(), 1 << 30);
    Admin::new(broker.client().await).create_topic("big", 4, &[]).await.unwrap();
    let producer = Producer::new(
        broker.client().await,
        ProducerConfig::default().acks(Acks::Leader).linger(Duration::from_millis(2)),
    );
    let value = vec![b'x'; 1000];
    for i in 0..RECORDS {
        producer.send(ProducerRecord::new("big", value.clone()).key(format!("{}", i % 64))).await.unwrap();
    }
    producer.flush().await.unwrap();
    drop(producer);
    let stored = walk_bytes(&broker.data_dir().join("topics/big"));
    assert!(stored >= 100 << 20, "a log of at least 100 MB ({} MB)", stored >> 20);

    // Killed, so the restart recovers the logs; the clients start the moment the port accepts.
    broker.kill();
    let spawned = Instant::now();
    broker.restart_without_waiting();
    let addr = broker.addr.clone();
    let deadline = spawned + Duration::from_secs(60);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the restarted broker never accepted: {}", broker.log());
        std::thread::sleep(Duration::from_millis(1));
    }
    let accepted_after = spawned.elapsed();
    let consumer = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let client = Client::connect(ClientConfig::new(addr)).await?;
            let mut consumer = Consumer::new(client, ConsumerConfig::default());
            consumer.assign_all("big").await?;
            let mut read = 0u32;
            let deadline = Instant::now() + Duration::from_secs(60);
            while read < RECORDS && Instant::now() < deadline {
                read += consumer.poll(Duration::from_millis(500)).await?.len() as u32;
            }
            Ok::<u32, skein_client::ClientError>(read)
        })
    };
    let producing = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let client = Client::connect(ClientConfig::new(addr)).await?;
            let producer = Producer::new(client, ProducerConfig::default());
            let mut deliveries = Vec::new();
            for i in 0..1000 {
                deliveries.push(producer.send(ProducerRecord::new("big", format!("after-{i}"))).await?);
            }
            for delivery in deliveries {
                delivery.await?;
            }
            Ok::<usize, skein_client::ClientError>(1000)
        })
    };
    let read = consumer.await.unwrap().expect("the consumer succeeds");
    let produced = producing.await.unwrap().expect("the producer succeeds");
    assert!(read >= RECORDS, "the consumer read {read} of {RECORDS}");
    assert_eq!(produced, 1000);
    eprintln!(
        "restart on {} MB: accepted {accepted_after:?} after spawn; the consumer read {read} records, the producer wrote {produced}",
        stored >> 20
    );
}

fn walk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Collects the lines `reader` prints after the first `*seen` until `wanted` distinct ones
/// were printed (or 60 s pass); returns them all, repeats included, and moves `*seen` past them.
fn until_distinct(reader: &Background, seen: &mut usize, wanted: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = reader.lines().split_off(*seen);
        let distinct: std::collections::HashSet<&String> = lines.iter().collect();
        if distinct.len() >= wanted || Instant::now() >= deadline {
            *seen += lines.len();
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skein_consume_keeps_reading_across_a_broker_restart() {
    let mut broker = Broker::start(&["--fsync", "always"]);
    Admin::new(broker.client().await).create_topic("events", 3, &[]).await.unwrap();
    let send = |addr: String, from: u32, to: u32| async move {
        let client = Client::connect(ClientConfig::new(addr)).await.unwrap();
        let producer = Producer::new(client, ProducerConfig::default());
        let mut deliveries = Vec::new();
        for i in from..to {
            deliveries.push(producer.send(ProducerRecord::new("events", format!("e{i:05}"))).await.unwrap());
        }
        for delivery in deliveries {
            delivery.await.unwrap();
        }
    };
    send(broker.addr.clone(), 0, 500).await;
    let mut plain = Background::start(&broker, &["consume", "events", "--from", "beginning"]);
    let mut grouped =
        Background::start(&broker, &["consume", "events", "--group", "g", "--from", "beginning"]);
    let (mut plain_seen, mut grouped_seen) = (0, 0);
    assert_eq!(
        until_distinct(&plain, &mut plain_seen, 500).len(),
        500,
        "the plain consumer read the first 500"
    );
    assert!(
        until_distinct(&grouped, &mut grouped_seen, 500).len() >= 500,
        "the group consumer read the first 500"
    );

    broker.kill();
    broker.restart();
    send(broker.addr.clone(), 500, 1000).await;
    let plain_after = until_distinct(&plain, &mut plain_seen, 500);
    let grouped_after = until_distinct(&grouped, &mut grouped_seen, 500);
    assert!(plain.still_running() && grouped.still_running(), "both consumers kept running");
    let expected: Vec<String> = (500..1000).map(|i| format!("e{i:05}")).collect();
    let mut sorted = plain_after.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "the plain consumer read the next 500, each once");
    let distinct: std::collections::BTreeSet<&String> = grouped_after.iter().collect();
    assert!(
        expected.iter().all(|e| distinct.contains(e)),
        "the group consumer read every record written after the restart (it read {} lines)",
        grouped_after.len()
    );
    eprintln!(
        "across a kill -9 restart: plain consumer {} records, group consumer {} lines ({} distinct)",
        plain_after.len(),
        grouped_after.len(),
        distinct.len()
    );
}
