//! Sending records to a socket: from memory, or zero-copy from a segment file.
//!
//! Which path is taken when:
//!
//! * **Tail cache** ([`Records::Memory`]): the newest batches are in the partition's memory;
//!   they are written from there (no disk I/O, no copy).
//! * **Segment file, in the page cache** (every page of the range, counted with `cachestat(2)`;
//!   [`in_page_cache`]): `sendfile(2)` on the shard's own thread, with the socket in
//!   non-blocking mode, in calls of at most 1 MiB, so it never blocks.
//! * **Segment file, not in the page cache** (data written with O_DIRECT never is, until read):
//!   the partition's shard does not hand a file range out at all: it reads the range with
//!   O_DIRECT through `Log::read_file` (large reads, read-ahead per consumer, into buffers the
//!   returned bytes own: no copy in user space) and sends the bytes from memory, as the tail
//!   cache's. A `sendfile` of a cold
//!   range would read it synchronously in small pieces (a quarter to a half of the disk's speed
//!   here); the older path that warmed the page cache with `posix_fadvise(WILLNEED)` from a
//!   helper thread first reached 360–630 MiB/s where O_DIRECT with read-ahead reached 690–730
//!   (fio: 760–850) in the same runs. That warm-up remains below for a range evicted from the
//!   page cache between the shard's check and the send.
//!
//! A fetch reads its partitions concurrently whenever their limits together fit the fetch's
//! byte budget (the usual consumer fetch): every shard reads its part at once and, on each
//! shard, each partition's cold range is read while the others' are (`Shard::fetch`, and
//! `read_pass` in the handlers); the budget is then spent in request order
//! (`shard::spend_budget`), since a read returns at least one whole batch, which may be larger
//! than its partition's limit. One partition after another made the disk wait for each
//! range's copy and send: cold reads of 4 partitions on 2 shards went from 700–790 MiB/s to
//! 980–1120 MiB/s in the same hour, with fio's sequential O_DIRECT read at 1040–1090 MiB/s on
//! that disk. When the budget binds, each partition is given what the ones before it leave, as
//! if read one after another, but with up to 32 reads in flight on each shard: a read starts
//! once the budget not held by the reads in flight covers the most it can return
//! (`shard::read_within_budget`). Partitions of different shards are still read one shard
//! after another then (the connection's shard first).
//!
//! When the socket's send buffer is full (`EAGAIN`), the next few KiB of the range are read and
//! written through glommio, which waits for the socket to become writable; then `sendfile`
//! resumes.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use futures::{AsyncWrite, AsyncWriteExt};

use crate::shard::Records;

/// Largest range handed to one `sendfile` call.
const SENDFILE_CHUNK_BYTES: usize = 1 << 20;
/// Bytes written through glommio to wait for writability.
const NUDGE_BYTES: usize = 16 << 10;

/// Puts a socket in non-blocking mode (glommio's accepted sockets are blocking; its own reads
/// and writes use MSG_DONTWAIT and keep working).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether every page of `[position, position + len)` of `fd` is in the page cache (then
/// `sendfile` sends the range without touching the disk). Counted exactly with `cachestat(2)`
/// (Linux 6.5); on older kernels, with `mincore(2)` on a read-only mapping of the range made
/// for the call. Probing only the ends was not enough: the batch headers a fetch reads to find
/// its range leave its first and last pages cached, and a `sendfile` of the cold middle then
/// read it synchronously, at a quarter of the disk's speed. Probe reads every 64 KiB with
/// `preadv2(RWF_NOWAIT)` (the older fallback) were not enough either: such a probe of a page
/// not cached starts reading it before it answers `EAGAIN`, and where the disk answers within
/// that call (a host's page cache under a virtual disk) it answers "cached" for a page that was
/// cold: a whole cold range could pass as cached (seen under load on 6.18).
pub fn in_page_cache(fd: RawFd, position: u64, len: usize) -> bool {
    if len == 0 {
        return false;
    }
    cachestat(fd, position, len).unwrap_or_else(|| resident(fd, position, len))
}

/// Whether all pages of the range are in the page cache, per `mincore(2)`, which starts no
/// read. Only for a file this process's user owns: for anyone else who cannot write the file,
/// the kernel answers "resident" for every page without looking (Linux 5.0 on, so that mincore
/// cannot spy on others' reads), and a cold range would then go out through a `sendfile` that
/// reads it synchronously. The broker owns its segment files; for others this answers "no",
/// which only sends the range through the cold path.
fn resident(fd: RawFd, position: u64, len: usize) -> bool {
    owned_by_us(fd) && resident_pages(fd, position, len).is_some_and(|(resident, pages)| resident == pages)
}

/// Pages of `[position, position + len)` in the page cache, and pages of the range, by
/// `mincore(2)` on a read-only mapping made for the call; `None` if the kernel refused. The
/// kernel's count for a file of another user may be made up (see [`resident`]).
fn resident_pages(fd: RawFd, position: u64, len: usize) -> Option<(usize, usize)> {
    let page = page_bytes();
    let start = position / page * page;
    let map_len = (position + len as u64 - start) as usize;
    // SAFETY: a shared read-only mapping of an open file, never touched (mincore reads no page
    // of it) and unmapped before returning; the vector has one byte per page, as mincore
    // writes.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            start as libc::off_t,
        );
        if map == libc::MAP_FAILED {
            return None;
        }
        let mut pages = vec![0u8; map_len.div_ceil(page as usize)];
        let answered = libc::mincore(map, map_len, pages.as_mut_ptr()) == 0;
        libc::munmap(map, map_len);
        answered.then(|| (pages.iter().filter(|&&page| page & 1 != 0).count(), pages.len()))
    }
}

/// Whether the file behind `fd` belongs to this process's effective user.
fn owned_by_us(fd: RawFd) -> bool {
    // SAFETY: fstat writes a stat into the zeroed local; geteuid cannot fail.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut stat) == 0 && stat.st_uid == libc::geteuid()
    }
}

/// The kernel's page size (4 KiB here; 16 or 64 KiB on some arm64 and POWER kernels).
fn page_bytes() -> u64 {
    // SAFETY: sysconf only reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as u64
    } else {
        4096
    }
}

/// `cachestat(2)`'s number: the same on every architecture (new system calls share one table).
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Whether all pages of the range are cached, per `cachestat(2)`; `None` where the kernel lacks
/// it. Any other failure (`EPERM`: the kernel counts only for the file's owner or a writer of
/// it, as for mincore) answers "no": the range then goes through the cold path.
fn cachestat(fd: RawFd, position: u64, len: usize) -> Option<bool> {
    let page = page_bytes();
    let first = position / page;
    let last = (position + len as u64 - 1) / page;
    let range = CachestatRange { off: first * page, len: (last - first + 1) * page };
    let mut stat = Cachestat::default();
    // SAFETY: both pointers are to live, properly laid out locals; flags must be 0.
    let result = unsafe {
        libc::syscall(SYS_CACHESTAT, fd, &range as *const CachestatRange, &mut stat as *mut Cachestat, 0u32)
    };
    if result != 0 {
        let lacking = io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS);
        return if lacking { None } else { Some(false) };
    }
    Some(stat.nr_cache > last - first)
}

/// Whether the byte at `position` of `fd` is in the page cache. A page that is not starts
/// being read (see [`in_page_cache`]): used only where the page is about to be read anyway.
fn cached(fd: RawFd, position: u64) -> bool {
    let mut byte = 0u8;
    let iov = libc::iovec { iov_base: (&mut byte as *mut u8).cast(), iov_len: 1 };
    // SAFETY: one valid iovec pointing at a live stack byte.
    let read = unsafe { libc::preadv2(fd, &iov, 1, position as libc::off_t, libc::RWF_NOWAIT) };
    read == 1
}

/// One non-blocking `sendfile` call. `Ok(None)` means the socket is full (EAGAIN).
fn sendfile_once(socket: RawFd, file: RawFd, position: u64, len: usize) -> io::Result<Option<usize>> {
    let mut offset = position as libc::off_t;
    // SAFETY: both descriptors are open for the duration of the call; offset is a live local.
    let sent = unsafe { libc::sendfile(socket, file, &mut offset, len) };
    if sent >= 0 {
        return Ok(Some(sent as usize));
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EAGAIN) => Ok(None),
        Some(libc::EINTR) => Ok(Some(0)),
        _ => Err(error),
    }
}

/// Asks the kernel to start reading `[position, position + len)` into the page cache.
fn will_need(file: RawFd, position: u64, len: usize) {
    // SAFETY: advice on an open descriptor; no memory is passed. Failure only loses the hint.
    unsafe {
        libc::posix_fadvise(file, position as libc::off_t, len as libc::off_t, libc::POSIX_FADV_WILLNEED)
    };
}

/// One `pread` into `buffer`; the bytes read.
fn pread_into(file: RawFd, position: u64, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for its length.
    let read =
        unsafe { libc::pread(file, buffer.as_mut_ptr().cast(), buffer.len(), position as libc::off_t) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(read as usize)
}

fn pread(file: RawFd, position: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buffer = vec![0u8; len];
    let read = pread_into(file, position, &mut buffer)?;
    buffer.truncate(read);
    Ok(buffer)
}

/// The whole range, read straight into one buffer, or an error (a file shorter than the range
/// is one).
fn read_range(file: RawFd, position: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match pread_into(file, position + filled as u64, &mut bytes[filled..])? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "a record range past the end of its file",
                ))
            }
            read => filled += read,
        }
    }
    Ok(bytes)
}

/// Writes `records` to `writer`: file ranges with `sendfile` to the socket behind it (its
/// descriptor `socket`), or, on a stream without one (QUIC), read into memory first.
pub async fn write_records<W: AsyncWrite + Unpin>(
    writer: &mut W,
    socket: Option<RawFd>,
    records: Records,
) -> io::Result<()> {
    match records {
        Records::Memory(chunks) => {
            for chunk in chunks {
                writer.write_all(&chunk).await?;
            }
            Ok(())
        }
        Records::File { fd, position, len } => match socket {
            Some(socket) => send_file(writer, socket, Arc::new(fd), position, len as usize).await,
            None => {
                let bytes = glommio::executor()
                    .spawn_blocking(move || read_range(fd.as_raw_fd(), position, len as usize))
                    .await?;
                writer.write_all(&bytes).await
            }
        },
    }
}

async fn send_file<W: AsyncWrite + Unpin>(
    writer: &mut W,
    socket: RawFd,
    file: Arc<OwnedFd>,
    position: u64,
    len: usize,
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let end = position + len as u64;
    if !(cached(file.as_raw_fd(), position) && cached(file.as_raw_fd(), end - 1)) {
        let file = file.clone();
        glommio::executor()
            .spawn_blocking(move || {
                will_need(file.as_raw_fd(), position, 2 * len);
                // Returns once the last page of the range is in (the others were read with it).
                pread(file.as_raw_fd(), end - 1, 1)
            })
            .await?;
    }
    let mut at = position;
    while at < end {
        let chunk = ((end - at) as usize).min(SENDFILE_CHUNK_BYTES);
        let outcome = sendfile_once(socket, file.as_raw_fd(), at, chunk)?;
        match outcome {
            Some(0) => {
                // EINTR, or the file ended early (it cannot: ranges are stable and the
                // descriptor keeps a deleted file alive).
                if at < end && !cached(file.as_raw_fd(), at) && pread(file.as_raw_fd(), at, 1)?.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "segment file ended early"));
                }
            }
            Some(sent) => at += sent as u64,
            None => {
                // The socket is full: write the next bytes through glommio, which waits until
                // the socket can take them.
                let nudge = ((end - at) as usize).min(NUDGE_BYTES);
                let bytes = pread(file.as_raw_fd(), at, nudge)?;
                if bytes.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "segment file ended early"));
                }
                writer.write_all(&bytes).await?;
                at += bytes.len() as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    use super::*;

    const LEN: usize = 4 << 20;

    /// Pages of the file's first `len` bytes in the page cache (by `mincore`, which never
    /// starts a read itself).
    fn cached_pages(fd: RawFd, len: usize) -> usize {
        resident_pages(fd, 0, len).expect("mincore answers").0
    }

    /// The mincore fallback trusts the kernel only for files this process's user owns: for
    /// others the kernel may answer "resident" for every page without looking.
    #[test]
    fn the_mincore_count_answers_no_for_a_file_of_another_user() {
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        let path = dir.path().join("segment");
        std::fs::write(&path, vec![7u8; 64 << 10]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let fd = file.as_raw_fd();
        assert_eq!(std::fs::read(&path).unwrap().len(), 64 << 10);
        assert!(owned_by_us(fd));
        assert!(resident(fd, 0, 64 << 10), "a file just written and read is resident");
        let nobody = 65534;
        // SAFETY: chown of a path this test made; a CString keeps it NUL-terminated.
        let path_c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let changed = unsafe { libc::chown(path_c.as_ptr(), nobody, nobody) } == 0;
        if changed {
            assert!(!owned_by_us(fd));
            assert!(!resident(fd, 0, 64 << 10), "another user's file: no, whatever is cached");
        } else {
            // Not root: only root may give a file away.
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        }
    }

    /// A file whose pages are all cached, then one of which only the first and the last page
    /// are: both `cachestat` and the `mincore` fallback see the cold middle.
    #[test]
    fn a_range_with_a_cold_middle_is_not_in_the_page_cache() {
        // Not /tmp: on tmpfs pages cannot be evicted.
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap();
        let path = dir.path().join("segment");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![7u8; LEN]).unwrap();
        file.sync_all().unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let fd = file.as_raw_fd();
        assert_eq!(std::fs::read(&path).unwrap().len(), LEN);
        assert!(in_page_cache(fd, 0, LEN), "a file just read is in the page cache");
        assert!(resident(fd, 0, LEN), "mincore agrees");
        assert!(!in_page_cache(fd, 0, 0), "an empty range is never worth a sendfile");
        // Evict it all (clean pages go at once), then read back only its first and last page,
        // with read-ahead off (what a fetch's batch-header reads leave behind).
        // DONTNEED cannot drop a page another CPU still holds in its LRU batch (the writes ran
        // on whichever CPU this thread was on), so under load one call may leave pages behind:
        // ask again until no page of the file is cached (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // SAFETY: advice on an open descriptor.
            assert_eq!(unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
            if cached_pages(fd, LEN) == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the kernel kept pages of the file cached for 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SAFETY: advice on an open descriptor.
        assert_eq!(unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM) }, 0);
        let mut page = [0u8; 4096];
        file.read_exact_at(&mut page, 0).unwrap();
        file.read_exact_at(&mut page, (LEN - 4096) as u64).unwrap();
        assert!(cached(fd, 0) && cached(fd, LEN as u64 - 1), "the ends are cached");
        assert!(!in_page_cache(fd, 0, LEN), "the middle is not");
        if let Some(exact) = cachestat(fd, 0, LEN) {
            assert!(!exact);
            assert_eq!(cachestat(fd, 0, 4096), Some(true), "the first page is cached");
            assert_eq!(cachestat(fd, 1, 100), Some(true), "a range inside one cached page");
            assert_eq!(cachestat(fd, 4096, 4096), Some(false), "the second page is not");
        }
        // The count older kernels fall back on sees the same, and (unlike the probe reads it
        // replaced) reads nothing itself: asking twice gives the same answer.
        for _ in 0..2 {
            assert!(!resident(fd, 0, LEN), "mincore sees the cold middle");
            assert!(resident(fd, 0, 4096), "mincore: the first page is cached");
            assert!(resident(fd, 1, 100), "mincore: a range inside one cached page");
            assert!(resident(fd, LEN as u64 - 4096, 4096), "mincore: the last page is cached");
            assert!(!resident(fd, 4096, 4096), "mincore: the second page is not");
            assert!(!resident(fd, 4095, 2), "mincore: a range across a cached and a cold page");
        }
        assert_eq!(cached_pages(fd, LEN), 2, "nothing but the two pages read was cached");
    }
}
