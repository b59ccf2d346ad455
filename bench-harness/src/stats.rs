//! Latency histograms and the throughput timeline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency histogram in microseconds, 1 µs to 1 hour, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: histogram.len(),
            mean: (histogram.mean() * 10.0).round() / 10.0,
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            p9999: histogram.value_at_quantile(0.9999),
            max: histogram.max(),
        }
    }
}

/// The percentile curve for charts: (percentile, latency µs) from p0 up to p99.999.
pub fn percentile_curve(histogram: &Histogram<u64>) -> Vec<(f64, u64)> {
    let mut points = Vec::new();
    if histogram.is_empty() {
        return points;
    }
    // Evenly spaced in "nines": 0, 90, 99, 99.9 … with steps in between.
    let mut nines = 0.0f64;
    while nines <= 5.0 {
        let quantile = 1.0 - 10f64.powf(-nines);
        points.push((quantile * 100.0, histogram.value_at_quantile(quantile)));
        nines += 0.1;
    }
    points
}

/// Counters shared by workers: everything (sampled once a second for the timeline) and what
/// falls in the measured window (after warm-up).
#[derive(Debug, Default)]
pub struct Counters {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub measured_records: AtomicU64,
    pub measured_bytes: AtomicU64,
    /// The worst latency (µs) seen since the timeline last sampled it: produce-ack in produce
    /// mode, end-to-end in e2e mode. One stall of the broker or of the load generator shows
    /// here as one bad second, where the run's percentiles only say that something was slow.
    pub worst_us: AtomicU64,
    /// The latest the load generator's own timer fired (µs) since the timeline last sampled
    /// it, see [`probe_lag`].
    pub lag_us: AtomicU64,
}

impl Counters {
    pub fn add(&self, records: u64, bytes: u64, measured: bool) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if measured {
            self.measured_records.fetch_add(records, Ordering::Relaxed);
            self.measured_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub fn note_latency(&self, micros: u64) {
        self.worst_us.fetch_max(micros, Ordering::Relaxed);
    }

    pub fn get(&self) -> (u64, u64) {
        (self.records.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }

    pub fn measured(&self) -> (u64, u64) {
        (self.measured_records.load(Ordering::Relaxed), self.measured_bytes.load(Ordering::Relaxed))
    }
}

/// The machine's CPU time so far, from the first line of `/proc/stat` (clock ticks of all
/// CPUs): `None` where there is no such file.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    total: u64,
    idle: u64,
    iowait: u64,
    steal: u64,
}

impl CpuTimes {
    pub fn now() -> Option<CpuTimes> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`; guest time is
    /// already counted in user and nice.
    fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().next()?;
        let mut fields = line.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        let values: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
        if values.len() < 8 {
            return None;
        }
        Some(CpuTimes { total: values.iter().sum(), idle: values[3], iowait: values[4], steal: values[7] })
    }

    /// What the machine's CPUs did between `earlier` and `self`.
    pub fn since(&self, earlier: &CpuTimes) -> HostCpu {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        let pct = |now: u64, then: u64| (now.saturating_sub(then) as f64 / total * 1000.0).round() / 10.0;
        let busy = |t: &CpuTimes| t.total - t.idle - t.iowait;
        HostCpu {
            busy_pct: pct(busy(self), busy(earlier)),
            iowait_pct: pct(self.iowait, earlier.iowait),
            steal_pct: pct(self.steal, earlier.steal),
        }
    }
}

/// Shares of the machine's CPU time over a stretch of the run, all CPUs and all processes.
/// `steal_pct` is time the hypervisor gave to other guests while this one wanted to run: on a
/// shared VM it is the first thing to look at when a latency figure moves between runs.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct HostCpu {
    /// Not idle (steal included).
    pub busy_pct: f64,
    pub iowait_pct: f64,
    pub steal_pct: f64,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub second: f64,
    pub records_per_s: f64,
    pub mib_per_s: f64,
    /// The worst latency of the second in µs (0: none measured), see [`Counters::worst_us`].
    pub worst_latency_us: u64,
    /// The machine's CPU over the second (`None` without `/proc/stat`).
    pub host_cpu: Option<HostCpu>,
    /// How late the load generator's 5 ms timer fired at worst in the second (µs): when a
    /// latency stall shows here too, the load generator's runtime was not running (its thread
    /// descheduled or busy), so the stall is on the client's side, not the broker's.
    pub client_lag_us: u64,
    /// The same for the shards of an embedded broker, from their 10 ms wake-up timers (µs;
    /// absent when the broker runs in another process).
    pub broker_lag_us: Option<u64>,
    /// The slowest O_DIRECT segment write of an embedded broker that completed in the second
    /// (µs, handed to the ring to completion seen; absent when the broker runs in another
    /// process or nothing was written): a latency stall that shows here too waited on the disk.
    pub broker_write_max_us: Option<u64>,
}

/// How often [`probe_lag`] wakes.
pub const LAG_PROBE_PERIOD: Duration = Duration::from_millis(5);

/// Sleeps [`LAG_PROBE_PERIOD`] again and again on the load generator's runtime until `done`,
/// noting in `counters.lag_us` how much later than asked each wake-up came. Tokio timers have
/// a 1 ms resolution, so up to about 1 ms of lateness is the timer's, not a stall.
pub async fn probe_lag(counters: Arc<Counters>, done: Arc<AtomicU64>) {
    while done.load(Ordering::Relaxed) == 0 {
        let asked = Instant::now();
        tokio::time::sleep(LAG_PROBE_PERIOD).await;
        let late = asked.elapsed().saturating_sub(LAG_PROBE_PERIOD);
        counters.lag_us.fetch_max(late.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Samples the counters every second, printing progress to stderr unless quiet.
pub async fn sample_timeline(
    counters: Arc<Counters>,
    label: &'static str,
    quiet: bool,
    done: Arc<AtomicU64>,
) -> Vec<Sample> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut last = (0u64, 0u64);
    let mut last_at = started;
    let mut last_cpu = CpuTimes::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while done.load(Ordering::Relaxed) == 0 {
        ticker.tick().await;
        let now = Instant::now();
        let current = counters.get();
        let cpu = CpuTimes::now();
        let host_cpu = cpu.zip(last_cpu).map(|(now, then)| now.since(&then));
        last_cpu = cpu;
        let seconds = (now - last_at).as_secs_f64();
        let sample = Sample {
            second: (now - started).as_secs_f64(),
            records_per_s: (current.0 - last.0) as f64 / seconds,
            mib_per_s: (current.1 - last.1) as f64 / seconds / (1 << 20) as f64,
            worst_latency_us: counters.worst_us.swap(0, Ordering::Relaxed),
            host_cpu,
            client_lag_us: counters.lag_us.swap(0, Ordering::Relaxed),
            broker_lag_us: skein_broker::metrics::take_in_process_reactor_lag()
                .map(|lag| lag.as_micros() as u64),
            broker_write_max_us: skein_storage::metrics::take_in_process_write_max()
                .map(|write| write.as_micros() as u64),
        };
        if !quiet {
            let steal =
                host_cpu.map_or(String::new(), |cpu| format!(", host steal {:>4.1} %", cpu.steal_pct));
            let broker = sample
                .broker_lag_us
                .map_or(String::new(), |lag| format!(", broker lag {:>6.1} ms", lag as f64 / 1000.0));
            let write = sample
                .broker_write_max_us
                .map_or(String::new(), |us| format!(", slowest write {:>6.1} ms", us as f64 / 1000.0));
            eprintln!(
                "[{:>6.1}s] {label}: {:>12.0} records/s {:>9.1} MiB/s, worst latency {:>9.1} ms, client lag {:>6.1} ms{broker}{write}{steal} ({} records so far)",
                sample.second,
                sample.records_per_s,
                sample.mib_per_s,
                sample.worst_latency_us as f64 / 1000.0,
                sample.client_lag_us as f64 / 1000.0,
                current.0
            );
        }
        samples.push(sample);
        last = current;
        last_at = now;
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime thread that blocks for 40 ms shows as about 40 ms of lag; one that does not, as
    /// about the timer's resolution.
    #[test]
    fn the_lag_probe_sees_a_blocked_runtime() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        let (quiet, blocked) = runtime.block_on(async {
            let counters = Arc::new(Counters::default());
            let done = Arc::new(AtomicU64::new(0));
            let probe = tokio::spawn(probe_lag(counters.clone(), done.clone()));
            tokio::time::sleep(Duration::from_millis(50)).await;
            let quiet = counters.lag_us.swap(0, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(1)).await;
            std::thread::sleep(Duration::from_millis(40));
            tokio::time::sleep(Duration::from_millis(20)).await;
            done.store(1, Ordering::Relaxed);
            probe.await.expect("probe");
            (quiet, counters.lag_us.load(Ordering::Relaxed))
        });
        assert!(blocked >= 30_000, "a 40 ms block is seen: {blocked} µs");
        assert!(quiet < blocked, "an idle runtime lags less: {quiet} vs {blocked} µs");
    }

    #[test]
    fn host_cpu_shares_come_from_proc_stat() {
        let earlier = CpuTimes::parse("cpu  100 0 50 800 20 0 0 30 0 0\ncpu0 1 2 3\n").expect("parses");
        let later = CpuTimes::parse("cpu  160 0 70 880 40 0 0 50 5 0\n").expect("parses");
        // 200 ticks passed: 60 user, 20 system, 80 idle, 20 iowait, 20 steal.
        let cpu = later.since(&earlier);
        assert_eq!(cpu, HostCpu { busy_pct: 50.0, iowait_pct: 10.0, steal_pct: 10.0 });
        assert!(CpuTimes::parse("intr 1 2 3\n").is_none());
        assert!(CpuTimes::parse("cpu  1 2 3\n").is_none(), "too few fields");
        // This machine's own file parses, where there is one.
        if std::path::Path::new("/proc/stat").exists() {
            assert!(CpuTimes::now().is_some());
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut histogram = new_histogram();
        for value in 1..=10_000u64 {
            histogram.record(value).unwrap();
        }
        let p = Percentiles::of(&histogram);
        assert_eq!(p.count, 10_000);
        assert!((4990..=5010).contains(&p.p50), "{p:?}");
        assert!((9890..=9910).contains(&p.p99), "{p:?}");
        assert!(p.max >= 9990);
        let curve = percentile_curve(&histogram);
        assert!(curve.windows(2).all(|w| w[0].1 <= w[1].1), "monotonic");
        assert!(curve.last().unwrap().0 > 99.99);
    }
}
