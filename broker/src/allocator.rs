//! The process's memory allocator (glibc malloc), tuned for a broker.
//!
//! A produce request is a frame of up to `request_bytes_max` (8 MiB by default) that the
//! broker reads into fresh memory and keeps: its batches stay in the partition's tail cache
//! (up to 256 MiB a shard) until newer ones push them out. With glibc's defaults, blocks of
//! more than 128 KiB (a threshold that only drifts upward as they are freed) are `mmap`ed and
//! `munmap`ed one by one, and a free top of a heap of more than 128 KiB is handed back to the
//! kernel, so every frame's pages were new: one page fault, and the kernel zeroing the page,
//! for nearly every 4 KiB produced (`perf stat -e page-faults`: 343 000–375 000 faults for a
//! produce of 1.5 to 2 GB).
//!
//! [`tune`] sets, once per process, before the shards start:
//! * `M_MMAP_THRESHOLD` = [`MMAP_THRESHOLD_BYTES`] (32 MiB, glibc's largest): blocks below it
//!   come from the shard thread's own arena, and their memory is reused once freed;
//! * `M_TRIM_THRESHOLD` = [`TRIM_THRESHOLD_BYTES`] (256 MiB, a shard's largest tail cache):
//!   an arena keeps up to that much free memory at its top instead of returning it.
//!
//! Measured, alternating three builds (`skein-bench produce --messages 2000000 --fsync never
//! --linger-ms 5 --embedded --transport tcp`, under `perf stat -e page-faults,task-clock`):
//! before this and the read loop's `make_room` 383/436/485 MiB/s, 342 000–364 000 faults,
//! 6.7–7.4 s of CPU; with `make_room` alone 416/405/529 MiB/s; with both 525/551/591 MiB/s,
//! 191 000–197 000 faults (what remains is mostly the first fill of the tail caches), 6.0–6.5 s.
//! The cost: an arena keeps up to the trim threshold of free memory after a burst, so a
//! broker's resident memory shrinks back less.
//!
//! A user who tunes malloc through the environment (`GLIBC_TUNABLES` with a `glibc.malloc.`
//! setting, or `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`) keeps their settings:
//! [`tune`] then changes nothing.

use std::sync::OnceLock;

/// Blocks at least this large are `mmap`ed by glibc (32 MiB: glibc's largest threshold).
pub const MMAP_THRESHOLD_BYTES: usize = 32 << 20;
/// Free memory an arena keeps at its top rather than returning it to the kernel.
pub const TRIM_THRESHOLD_BYTES: usize = 256 << 20;

/// What [`tune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// Both thresholds were set.
    Tuned,
    /// The environment tunes malloc; nothing was changed.
    LeftToTheEnvironment,
    /// Not glibc, or glibc refused a setting.
    Unavailable,
}

/// Tunes the allocator once per process (later calls return the first call's outcome).
pub fn tune() -> Tuning {
    static DONE: OnceLock<Tuning> = OnceLock::new();
    *DONE.get_or_init(|| {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let set_in_environment = tunables.contains("glibc.malloc.")
            || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
            || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some();
        if set_in_environment {
            return Tuning::LeftToTheEnvironment;
        }
        set_thresholds()
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> Tuning {
    // SAFETY: mallopt only sets glibc's malloc parameters (under the allocator's own lock);
    // both values fit a c_int.
    let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES as libc::c_int) };
    let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES as libc::c_int) };
    if mmap == 1 && trim == 1 {
        Tuning::Tuned
    } else {
        Tuning::Unavailable
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> Tuning {
    Tuning::Unavailable
}
