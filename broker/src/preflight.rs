//! What a broker checks before it starts any shard, so that a start that cannot succeed fails
//! at once with one line naming the cause and the fix, instead of hanging or failing half way
//! (and what `skein broker --check` prints).
//!
//! | check | fails when | warns when |
//! |---|---|---|
//! | locked memory | `RLIMIT_MEMLOCK` (soft, raised to the hard limit first) is below the 512 KiB every glommio executor requires | without `CAP_IPC_LOCK`, the limit is below what the shards' io_uring registered buffers need (they then run without them, a little slower) |
//! | open files | `RLIMIT_NOFILE` (soft, raised to the hard limit first) leaves less than 16 segment files per shard after the process's own descriptors (or less than `--open-files-max`) | it leaves less than `connections_max` descriptors for connections |
//! | io_uring | the kernel refuses to set up a ring (not built in, `kernel.io_uring_disabled`, a seccomp filter) | |
//! | tail cache | | `storage.cache_bytes_max` is over half of the memory (or of the cgroup's limit) |
//! | data directory | it is on tmpfs or ramfs (O_DIRECT writes would never reach a disk), or an aligned O_DIRECT write and read-back fails there, or it is not writable | |
//!
//! The checks only read the system and the data directory (the O_DIRECT probe writes and
//! removes one 4 KiB file); raising a soft limit to its hard limit is the only change they make.

use std::path::{Path, PathBuf};

use crate::config::BrokerConfig;

/// The locked memory glommio refuses to start an executor without.
pub const GLOMMIO_MEMLOCK_MIN_BYTES: u64 = 512 << 10;
/// glommio's default registered-buffer pool per executor (`io_memory`), registered with each of
/// its three rings.
pub const IO_MEMORY_BYTES: u64 = 10 << 20;
const RINGS_PER_EXECUTOR: u64 = 3;
/// Descriptors a shard holds whatever its partitions: three io_uring rings, eventfds, the
/// listening socket, the blocking thread's pipes, with head-room.
const FILES_PER_SHARD: u64 = 16;
/// Descriptors of the process itself (standard streams, the lock file, the metadata files).
const FILES_BASE: u64 = 64;
/// The internal committed-offsets partitions.
const OFFSETS_PARTITIONS: u64 = 16;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const CAP_IPC_LOCK: u32 = 14;

/// How one check went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    /// The broker still starts, with the consequence named.
    Warning(String),
    /// The broker cannot start: what is wrong and how to fix it, in one line.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
}

/// Every check's outcome, in order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| matches!(c.outcome, Outcome::Failed(_)))
    }

    /// The first failure as one line, if any.
    pub fn first_failure(&self) -> Option<String> {
        self.failures().next().map(|check| match &check.outcome {
            Outcome::Failed(reason) => format!("{}: {reason}", check.name),
            _ => unreachable!("failures() yields failed checks"),
        })
    }

    /// Lines for `skein broker --check`: `ok`, `warning` or `FAILED`, the check, what was found.
    pub fn lines(&self) -> Vec<String> {
        self.checks
            .iter()
            .map(|check| match &check.outcome {
                Outcome::Ok(text) => format!("ok       {:<15} {text}", check.name),
                Outcome::Warning(text) => format!("warning  {:<15} {text}", check.name),
                Outcome::Failed(text) => format!("FAILED   {:<15} {text}", check.name),
            })
            .collect()
    }
}

/// Runs every check for a broker with this configuration.
pub fn run(config: &BrokerConfig) -> Report {
    let cores = config.cores.max(1) as u64;
    let mut report = Report::default();
    report.checks.push(Check { name: "locked memory", outcome: check_memlock(cores) });
    report.checks.push(Check { name: "open files", outcome: check_open_files(config, cores) });
    report.checks.push(Check { name: "io_uring", outcome: check_io_uring() });
    report.checks.push(Check { name: "tail cache", outcome: check_tail_cache(config) });
    report.checks.push(Check { name: "data directory", outcome: check_data_dir(&config.data_dir) });
    report
}

fn kib(bytes: u64) -> String {
    if bytes == libc::RLIM_INFINITY {
        "unlimited".to_owned()
    } else if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// Reads a resource limit and raises the soft limit to the hard one; returns (soft, hard).
fn raise_limit(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(resource, &mut limit) != 0 {
            return (0, 0);
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(resource, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    (limit.rlim_cur, limit.rlim_max)
}

fn has_capability(capability: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << capability) != 0)
}

fn check_memlock(cores: u64) -> Outcome {
    let (soft, hard) = raise_limit(libc::RLIMIT_MEMLOCK);
    if soft < GLOMMIO_MEMLOCK_MIN_BYTES {
        return Outcome::Failed(format!(
            "the locked-memory limit is {} (hard limit {}), below the {} each shard's io_uring executor needs; raise it (`ulimit -l {}`, or LimitMEMLOCK= in the systemd unit)",
            kib(soft),
            kib(hard),
            kib(GLOMMIO_MEMLOCK_MIN_BYTES),
            GLOMMIO_MEMLOCK_MIN_BYTES >> 10
        ));
    }
    let registered = cores * RINGS_PER_EXECUTOR * IO_MEMORY_BYTES;
    if has_capability(CAP_IPC_LOCK) {
        return Outcome::Ok(format!(
            "limit {} (CAP_IPC_LOCK: registered buffers are not counted)",
            kib(soft)
        ));
    }
    if soft != libc::RLIM_INFINITY && soft < registered {
        return Outcome::Warning(format!(
            "limit {}: {cores} shards need {} for io_uring registered buffers; they start without them (raise `ulimit -l` or LimitMEMLOCK= to {} for the faster path)",
            kib(soft),
            kib(registered),
            kib(registered)
        ));
    }
    Outcome::Ok(format!("limit {}, {} needed", kib(soft), kib(registered)))
}

/// Partitions and sealed segments already in the data directory.
fn count_on_disk(data_dir: &Path) -> (u64, u64) {
    let (mut partitions, mut sealed) = (0u64, 0u64);
    let list = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    for topic in list(&data_dir.join("topics")) {
        for partition in list(&topic) {
            if !partition.is_dir() {
                continue;
            }
            partitions += 1;
            let segments =
                list(&partition).iter().filter(|p| p.extension().is_some_and(|e| e == "log")).count() as u64;
            sealed += segments.saturating_sub(1);
        }
    }
    (partitions, sealed)
}

/// Descriptors a shard opens for a moment (a recovery checkpoint, index files, a range being
/// sent with `sendfile`, a directory sync), on top of its budget of segment files.
pub(crate) const FILES_TRANSIENT_PER_SHARD: u64 = 64;
/// The smallest budget of segment files a shard can work with.
pub const OPEN_FILES_MIN_PER_SHARD: u64 = 16;

/// The segment-file budget of a broker with this configuration under an open-files limit of
/// `limit`: `open_files_max` if set, else three quarters of what the limit leaves after the
/// process's and the shards' own descriptors (the last quarter is for connections).
pub fn open_files_budget(config: &BrokerConfig, limit: u64) -> u64 {
    let cores = config.cores.max(1) as u64;
    match config.open_files_max {
        Some(max) => max as u64,
        None => limit.saturating_sub(fixed_files(cores)) / 4 * 3,
    }
}

fn fixed_files(cores: u64) -> u64 {
    FILES_BASE + cores * (FILES_PER_SHARD + FILES_TRANSIENT_PER_SHARD)
}

/// The current soft open-files limit (after [`run`] raised it).
pub fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    limit.rlim_cur
}

fn check_open_files(config: &BrokerConfig, cores: u64) -> Outcome {
    let (soft, hard) = raise_limit(libc::RLIMIT_NOFILE);
    let (partitions, sealed) = count_on_disk(&config.data_dir);
    let fixed = fixed_files(cores);
    let budget = open_files_budget(config, soft);
    let minimum = cores * OPEN_FILES_MIN_PER_SHARD;
    if budget < minimum || fixed + budget > soft {
        return Outcome::Failed(format!(
            "the open-files limit is {soft} (hard limit {hard}): after the {fixed} the process and its {cores} shards need, it leaves {} for segment files, and a broker needs at least {minimum} ({OPEN_FILES_MIN_PER_SHARD} per shard{}); raise it (`ulimit -n`, or LimitNOFILE= in the systemd unit)",
            soft.saturating_sub(fixed).min(budget),
            if config.open_files_max.is_some() { ", and --open-files-max must fit under the limit" } else { "" }
        ));
    }
    let for_connections = soft - fixed - budget;
    let segments = partitions + OFFSETS_PARTITIONS + sealed;
    let found = format!("{partitions} partitions ({sealed} sealed segments) on disk");
    // The default budget leaves a quarter of the limit to connections; warn when less is left
    // than that (or than connections_max, if smaller).
    if for_connections < (config.connections_max as u64).min(soft.saturating_sub(fixed) / 4) {
        return Outcome::Warning(format!(
            "limit {soft}: {budget} for segment files ({found}; idle ones are closed), {for_connections} left for connections, fewer than connections_max ({}); raise `ulimit -n` or LimitNOFILE=",
            config.connections_max
        ));
    }
    let note = if segments > budget { "; idle segment files are closed and reopened on demand" } else { "" };
    Outcome::Ok(format!(
        "limit {soft}: {budget} for segment files, {for_connections} for connections; {found}{note}"
    ))
}

/// The memory this process may use: the machine's, or its cgroup's limit (v2 `memory.max`) where
/// that is lower.
pub fn memory_bytes() -> u64 {
    // SAFETY: sysconf reads a system value.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    let machine = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    cgroup.map_or(machine, |limit| limit.min(machine))
}

/// The auto-sized tail cache of each shard: an eighth of `memory` shared by `cores` shards,
/// within 16 MiB..=256 MiB per shard (the memory's first use is slow on some VMs; a
/// partition written at 128 MB/s on a shard of its own still gets two seconds of data).
pub const TAIL_CACHE_SHARD_MIN: u64 = 16 << 20;
pub const TAIL_CACHE_SHARD_MAX: u64 = 256 << 20;

/// The memory all tail caches of the broker may hold: `cache_bytes_max` if set, else sized from
/// `memory` (see [`TAIL_CACHE_SHARD_MAX`]).
pub fn tail_cache_budget(config: &BrokerConfig, memory: u64) -> u64 {
    let cores = config.cores.max(1) as u64;
    config
        .cache_bytes_max
        .unwrap_or_else(|| (memory / 8 / cores).clamp(TAIL_CACHE_SHARD_MIN, TAIL_CACHE_SHARD_MAX) * cores)
}

/// The auto-sized request memory of each shard: a thirty-second of `memory` shared by `cores`
/// shards, within 32 MiB..=128 MiB per shard (one producer flat out with five requests of
/// 8 MiB in flight needs 40 MiB; 128 MiB holds two of the largest frames, 64 MiB).
pub const REQUEST_MEMORY_SHARD_MIN: u64 = 32 << 20;
pub const REQUEST_MEMORY_SHARD_MAX: u64 = 128 << 20;

/// The memory the frames of requests in progress may hold, all shards together:
/// `request_memory_max` if set, else sized from `memory` (see [`REQUEST_MEMORY_SHARD_MAX`]).
pub fn request_memory_budget(config: &BrokerConfig, memory: u64) -> u64 {
    let cores = config.cores.max(1) as u64;
    config.request_memory_max.unwrap_or_else(|| {
        (memory / 32 / cores).clamp(REQUEST_MEMORY_SHARD_MIN, REQUEST_MEMORY_SHARD_MAX) * cores
    })
}

fn check_tail_cache(config: &BrokerConfig) -> Outcome {
    let memory = memory_bytes();
    let budget = tail_cache_budget(config, memory);
    let how =
        if config.cache_bytes_max.is_some() { "set" } else { "an eighth of memory, at most 256 MiB a shard" };
    let text = format!("{} for the shards' tail caches ({how}), of {} memory", kib(budget), kib(memory));
    if memory > 0 && budget > memory / 2 {
        return Outcome::Warning(format!(
            "{text}: more than half; the broker may run out of memory under load (lower storage.cache_bytes_max)"
        ));
    }
    Outcome::Ok(text)
}

fn check_io_uring() -> Outcome {
    match io_uring::IoUring::new(8) {
        Ok(_) => Outcome::Ok("a ring was set up".to_owned()),
        Err(error) => {
            let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .map(|v| format!(" (kernel.io_uring_disabled = {})", v.trim()))
                .unwrap_or_default();
            Outcome::Failed(format!(
                "the kernel refused to set up an io_uring ring: {error}{disabled}; Skein needs io_uring (Linux 5.8 or newer, not disabled by sysctl or a seccomp profile)"
            ))
        }
    }
}

/// The directory the data directory is or will be created in.
fn existing_ancestor(dir: &Path) -> PathBuf {
    let mut path = dir.to_path_buf();
    while !path.exists() {
        match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => path = parent.to_path_buf(),
            _ => return PathBuf::from("."),
        }
    }
    path
}

fn check_data_dir(dir: &Path) -> Outcome {
    let at = existing_ancestor(dir);
    let Ok(c_path) = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()) else {
        return Outcome::Failed(format!("{} is not a valid path", dir.display()));
    };
    // SAFETY: statfs into a zeroed local struct with a NUL-terminated path.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Outcome::Failed(format!("{}: {}", at.display(), std::io::Error::last_os_error()));
    }
    let kind = stat.f_type as i64;
    if kind == TMPFS_MAGIC || kind == RAMFS_MAGIC {
        return Outcome::Failed(format!(
            "{} is on {} (memory): acknowledged records would not survive a reboot; use a directory on a disk (ext4 or XFS)",
            dir.display(),
            if kind == TMPFS_MAGIC { "tmpfs" } else { "ramfs" }
        ));
    }
    match probe_direct_io(&at) {
        Ok(()) => Outcome::Ok(format!("{}: O_DIRECT write and read-back work", dir.display())),
        Err(error) => Outcome::Failed(format!(
            "{}: an O_DIRECT write and read-back failed ({error}); Skein writes its segments with O_DIRECT: use a directory on a local disk (ext4 or XFS) the broker can write",
            dir.display()
        )),
    }
}

/// Writes one aligned 4 KiB block with O_DIRECT, reads it back and removes the file.
fn probe_direct_io(dir: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    const BLOCK: usize = 4096;
    let path = dir.join(format!(".skein-direct-io-probe-{}", std::process::id()));
    let layout = std::alloc::Layout::from_size_align(BLOCK, BLOCK).expect("valid layout");
    // SAFETY: an aligned allocation of BLOCK bytes, freed below; only used as a byte buffer.
    let buffer = unsafe { std::alloc::alloc_zeroed(layout) };
    if buffer.is_null() {
        return Err(std::io::Error::from(std::io::ErrorKind::OutOfMemory));
    }
    // SAFETY: `buffer` points to BLOCK initialised (zeroed) bytes owned here.
    let block = unsafe { std::slice::from_raw_parts_mut(buffer, BLOCK) };
    block.fill(0x5a);
    let outcome = (|| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)?;
        file.write_all(block)?;
        file.sync_data()?;
        block.fill(0);
        let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path)?;
        file.read_exact(block)?;
        if block.iter().any(|&b| b != 0x5a) {
            return Err(std::io::Error::other("the block read back differs from the one written"));
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    // SAFETY: allocated above with the same layout.
    unsafe { std::alloc::dealloc(buffer, layout) };
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_directory_passes_and_the_report_reads_as_lines() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let config = BrokerConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
        let report = run(&config);
        assert_eq!(report.checks.len(), 5);
        let data = report.checks.iter().find(|c| c.name == "data directory").unwrap();
        assert!(matches!(data.outcome, Outcome::Ok(_)), "{:?}", data.outcome);
        assert!(!dir.path().join("data").exists(), "checking creates nothing");
        let lines = report.lines();
        assert!(lines
            .iter()
            .all(|l| l.starts_with("ok") || l.starts_with("warning") || l.starts_with("FAILED")));
    }

    #[test]
    fn the_tail_cache_is_sized_from_memory_unless_set() {
        let mut config = BrokerConfig::new("/nonexistent".into(), "127.0.0.1:0".parse().unwrap());
        config.cores = 4;
        assert_eq!(tail_cache_budget(&config, 4 << 30), 512 << 20, "an eighth");
        assert_eq!(tail_cache_budget(&config, 256 << 30), 1 << 30, "at most 256 MiB a shard");
        assert_eq!(tail_cache_budget(&config, 256 << 20), 64 << 20, "at least 16 MiB a shard");
        config.cache_bytes_max = Some(300 << 20);
        assert_eq!(tail_cache_budget(&config, 32 << 30), 300 << 20);
        assert!(memory_bytes() > 0);
        config.cache_bytes_max = Some(memory_bytes());
        assert!(
            matches!(check_tail_cache(&config), Outcome::Warning(text) if text.contains("more than half"))
        );
    }

    #[test]
    fn partitions_on_disk_are_counted() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        for partition in 0..3 {
            let p = dir.path().join("topics/t").join(partition.to_string());
            std::fs::create_dir_all(&p).unwrap();
            for segment in 0..=partition {
                std::fs::write(p.join(format!("{segment:020}.log")), b"").unwrap();
            }
        }
        assert_eq!(count_on_disk(dir.path()), (3, 3));
    }
}
