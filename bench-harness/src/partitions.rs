//! `skein-bench partitions`: what many partitions cost a node. A broker runs as a child process
//! (this binary, in its hidden `__broker` mode, so that its memory and descriptors are its
//! own); the scenario creates one topic of N partitions, writes one record to each, reads them
//! all back, stops the broker (SIGTERM), starts it again and reads everything again, and
//! reports at each step the broker's resident memory, open descriptors and the disk allocated
//! under its data directory, with the time each step took.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use skein_client::{
    Acks, Admin, Client, ClientConfig, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
};

/// How to run the scenario.
#[derive(Debug, Clone)]
pub struct PartitionsOptions {
    pub partitions: u32,
    /// Records written to each partition (of `message_size` bytes).
    pub records_per_partition: u32,
    pub message_size: usize,
    pub cores: usize,
    /// Parent of the broker's temporary data directory (not tmpfs).
    pub data_parent: PathBuf,
    /// Extra `skein broker` flags.
    pub broker_args: Vec<String>,
}

/// The broker process at one point of the scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub step: String,
    /// Seconds the step took.
    pub seconds: f64,
    pub rss_kib: u64,
    pub open_files: u64,
    /// Disk blocks allocated under the data directory.
    pub disk_allocated_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionsReport {
    pub git_commit: String,
    pub host: crate::Host,
    pub partitions: u32,
    pub records_per_partition: u32,
    pub message_size: usize,
    pub cores: usize,
    pub broker_args: Vec<String>,
    pub steps: Vec<Snapshot>,
    /// Resident memory per partition at rest (3 s after every partition was written and read),
    /// in KiB, beyond the broker's memory with no topic.
    pub rss_kib_per_partition: f64,
    pub disk_bytes_per_partition: f64,
    /// From spawning the broker on the written data directory to its listening line.
    pub restart_to_ready_s: f64,
    pub records_read_after_restart: u64,
    /// This process (the client: one producer writing to every partition at once, then a
    /// consumer of all of them) at its peak.
    pub client_rss_peak_kib: u64,
}

struct BrokerProcess {
    child: Child,
    addr: String,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_broker(data_dir: &Path, options: &PartitionsOptions) -> Result<(BrokerProcess, f64), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = Command::new(exe)
        .arg("__broker")
        .args(["--cores", &options.cores.to_string(), "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(&options.broker_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the broker: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let line = receiver.recv_timeout(Duration::from_secs(300)).map_err(|_| {
        let _ = child.kill();
        "the broker did not start within 300 s".to_owned()
    })?;
    let ready = started.elapsed().as_secs_f64();
    let addr = line
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .ok_or_else(|| format!("no address in {line:?}"))?
        .to_owned();
    Ok((BrokerProcess { child, addr }, ready))
}

fn stop_broker(mut broker: BrokerProcess) -> Result<f64, String> {
    let started = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(broker.child.id() as i32, libc::SIGTERM) };
    loop {
        if let Some(status) = broker.child.try_wait().map_err(|e| e.to_string())? {
            if !status.success() {
                return Err(format!("the broker exited with {status}"));
            }
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err("the broker did not stop within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next().and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

fn allocated(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => allocated(&e.path()) + m.blocks() * 512,
                    Ok(m) => m.blocks() * 512,
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn snapshot(step: &str, seconds: f64, broker: &BrokerProcess, data_dir: &Path) -> Snapshot {
    let pid = broker.child.id();
    let snapshot = Snapshot {
        step: step.to_owned(),
        seconds,
        rss_kib: rss_kib(pid),
        open_files: open_files(pid),
        disk_allocated_bytes: allocated(data_dir),
    };
    eprintln!(
        "{:<28} {:>8.2} s   rss {:>8} KiB   files {:>6}   disk {:>8} KiB",
        snapshot.step,
        snapshot.seconds,
        snapshot.rss_kib,
        snapshot.open_files,
        snapshot.disk_allocated_bytes >> 10
    );
    snapshot
}

const TOPIC: &str = "many";

async fn read_all(addr: &str, records: u64) -> Result<u64, String> {
    let mut config = ClientConfig::new(addr.to_owned());
    config.request_timeout = Duration::from_secs(120);
    let client = Client::connect(config).await.map_err(|e| e.to_string())?;
    let mut consumer =
        Consumer::new(client, ConsumerConfig::default().fetch_wait_max(Duration::from_millis(100)));
    consumer.assign_all(TOPIC).await.map_err(|e| e.to_string())?;
    let mut read = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while read < records {
        if Instant::now() > deadline {
            return Err(format!("read only {read} of {records} records in 300 s"));
        }
        read += consumer.poll(Duration::from_millis(500)).await.map_err(|e| e.to_string())?.len() as u64;
    }
    Ok(read)
}

/// Runs the scenario.
pub fn run(options: PartitionsOptions, git_commit: String) -> Result<PartitionsReport, String> {
    let dir = tempfile::tempdir_in(&options.data_parent).map_err(|e| e.to_string())?;
    let data_dir = dir.path().join("data");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let partitions = options.partitions;
    let mut steps = Vec::new();

    let (broker, ready) = spawn_broker(&data_dir, &options)?;
    let empty = snapshot("start (no topic)", ready, &broker, &data_dir);
    let base_rss = empty.rss_kib;
    let base_disk = empty.disk_allocated_bytes;
    steps.push(empty);

    let addr = broker.addr.clone();
    let timed = |future: std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, String>>>>| {
        let started = Instant::now();
        runtime.block_on(future).map(|v| (v, started.elapsed().as_secs_f64()))
    };
    let (_, seconds) = timed(Box::pin(async {
        let mut config = ClientConfig::new(addr.clone());
        config.request_timeout = Duration::from_secs(300);
        let client = Client::connect(config).await.map_err(|e| e.to_string())?;
        Admin::new(client).create_topic(TOPIC, partitions, &[]).await.map_err(|e| e.to_string())?;
        Ok(0)
    }))?;
    steps.push(snapshot("create topic", seconds, &broker, &data_dir));

    let (_, seconds) = timed(Box::pin(async {
        let client = Client::connect(ClientConfig::new(addr.clone())).await.map_err(|e| e.to_string())?;
        let producer = Producer::new(client, ProducerConfig::default().acks(Acks::All));
        let value = bytes::Bytes::from(vec![b'r'; options.message_size]);
        for _ in 0..options.records_per_partition {
            let mut deliveries = Vec::with_capacity(partitions as usize);
            for partition in 0..partitions {
                let record = ProducerRecord::new(TOPIC, value.clone()).partition(partition);
                deliveries.push(producer.send(record).await.map_err(|e| e.to_string())?);
            }
            for delivery in deliveries {
                delivery.await.map_err(|e| e.to_string())?;
            }
        }
        Ok(0)
    }))?;
    steps.push(snapshot("write every partition", seconds, &broker, &data_dir));

    let records = u64::from(partitions) * u64::from(options.records_per_partition);
    let (_, seconds) = timed(Box::pin(read_all(&addr, records)))?;
    steps.push(snapshot("read every partition", seconds, &broker, &data_dir));
    std::thread::sleep(Duration::from_secs(3));
    let rest = snapshot("at rest (3 s later)", 3.0, &broker, &data_dir);
    let rss_kib_per_partition = rest.rss_kib.saturating_sub(base_rss) as f64 / f64::from(partitions);
    let disk_bytes_per_partition =
        rest.disk_allocated_bytes.saturating_sub(base_disk) as f64 / f64::from(partitions);
    steps.push(rest);

    let stopped_in = stop_broker(broker)?;
    eprintln!("{:<28} {:>8.2} s", "stop (SIGTERM)", stopped_in);
    let (broker, restart_to_ready_s) = spawn_broker(&data_dir, &options)?;
    steps.push(snapshot("restart", restart_to_ready_s, &broker, &data_dir));
    let addr = broker.addr.clone();
    let (records_read_after_restart, seconds) = timed(Box::pin(read_all(&addr, records)))?;
    steps.push(snapshot("read every partition again", seconds, &broker, &data_dir));
    stop_broker(broker)?;
    Ok(PartitionsReport {
        git_commit,
        host: crate::Host::detect(),
        partitions,
        records_per_partition: options.records_per_partition,
        message_size: options.message_size,
        cores: options.cores,
        broker_args: options.broker_args,
        steps,
        rss_kib_per_partition,
        disk_bytes_per_partition,
        restart_to_ready_s,
        records_read_after_restart,
        client_rss_peak_kib: std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|rest| rest.split_whitespace().next().and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0),
    })
}
