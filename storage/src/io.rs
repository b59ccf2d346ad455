//! Thin helpers over glommio's O_DIRECT files: every error carries the operation and the path.

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;
use std::time::{SystemTime, UNIX_EPOCH};

use glommio::io::{DmaFile, OpenOptions};

use crate::error::{glommio_io, Result, StorageError};
use crate::files::BLOCK_BYTES;

thread_local! {
    static PRIMED: Cell<bool> = const { Cell::new(false) };
}

/// Name of the small file used to prime glommio's I/O probe.
pub const PRIME_FILE: &str = ".skein-prime";

/// Works around a glommio 0.9 trap (see `PERF.md`): the first `DmaFile` opened on an executor
/// decides, by reading its first block, whether the device supports polled I/O; when that file
/// is new and empty, the probe wrongly says yes and every later O_DIRECT read fails with
/// `EOPNOTSUPP`. This opens a non-empty file first. Idempotent per executor thread; call it
/// before any other `DmaFile` is opened on a shard. `dir` must be on the data filesystem.
pub async fn prime_executor(dir: &Path) -> Result<()> {
    if PRIMED.with(Cell::get) {
        return Ok(());
    }
    let path = dir.join(PRIME_FILE);
    std::fs::create_dir_all(dir).map_err(|e| StorageError::io("creating directory", dir, e))?;
    let present = std::fs::metadata(&path).map(|m| m.len() >= BLOCK_BYTES as u64).unwrap_or(false);
    if !present {
        // Written aside and renamed into place: another shard priming at the same moment must
        // never see the file empty (that is exactly the state that fools the probe).
        let unique = format!("{PRIME_FILE}.{}.{:?}", std::process::id(), std::thread::current().id());
        let tmp = dir.join(unique.replace(['(', ')'], ""));
        std::fs::write(&tmp, [0x5a_u8; BLOCK_BYTES]).map_err(|e| StorageError::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| StorageError::io("renaming", &tmp, e))?;
    }
    // The probe read goes to glommio's polled ring, whose completions are only reaped when the
    // reactor runs; an executor that parks with nothing else to do may never look again. A
    // ticker keeps the reactor turning until the probe is done.
    let probing = Rc::new(Cell::new(true));
    let ticker = glommio::spawn_local({
        let probing = probing.clone();
        async move {
            while probing.get() {
                glommio::timer::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let result: Result<()> = async {
        let file =
            DmaFile::open(&path).await.map_err(|e| StorageError::io("opening", &path, glommio_io(e)))?;
        let read = file.read_at_aligned(0, BLOCK_BYTES).await;
        let _ = file.close().await;
        read.map_err(|e| StorageError::io("priming O_DIRECT reads on", &path, glommio_io(e)))?;
        Ok(())
    }
    .await;
    probing.set(false);
    ticker.await;
    result?;
    PRIMED.with(|primed| primed.set(true));
    Ok(())
}

/// Opens a file for O_DIRECT reads and writes (glommio's `DmaFile::create` is write-only).
pub(crate) async fn open_read_write(path: &Path, create_new: bool) -> Result<DmaFile> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if create_new {
        options.create_new(true);
    }
    options.dma_open(path).await.map_err(|e| StorageError::io("opening", path, glommio_io(e)))
}

/// Writes a small file in full with O_DIRECT (padded to the block size, then truncated to its
/// length), and syncs it if `sync`. Index files are not synced: they carry a CRC, and one
/// lost or torn in a crash is rebuilt from the log.
pub(crate) async fn write_small_file(path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(true);
    let file = options.dma_open(path).await.map_err(|e| StorageError::io("creating", path, glommio_io(e)))?;
    let result = write_block_padded(&file, path, 0, bytes).await;
    let result = match result {
        Ok(()) => match file.truncate(bytes.len() as u64).await {
            Ok(()) if !sync => Ok(()),
            Ok(()) => file.fdatasync().await.map_err(|e| StorageError::io("syncing", path, glommio_io(e))),
            Err(e) => Err(StorageError::io("truncating", path, glommio_io(e))),
        },
        Err(error) => Err(error),
    };
    let _ = file.close().await;
    result
}

/// Replaces `path` with `bytes` atomically on the executor, through io_uring: written to a
/// temporary file beside it and synced, renamed over it, the directory synced. A crash leaves
/// either the old file or the new one (and perhaps the temporary file, which the next write
/// replaces). For small files (snapshots, metadata).
pub async fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_small_file(&tmp, bytes, true).await?;
    std::fs::rename(&tmp, path).map_err(|e| StorageError::io("renaming", &tmp, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let directory = glommio::io::Directory::open(dir)
        .await
        .map_err(|e| StorageError::io("opening", dir, glommio_io(e)))?;
    let synced =
        directory.sync().await.map_err(|e| StorageError::io("syncing directory", dir, glommio_io(e)));
    let _ = directory.close().await;
    synced
}

/// Writes `bytes` at the aligned position `position`, zero-padding to the block size.
pub(crate) async fn write_block_padded(
    file: &DmaFile,
    path: &Path,
    position: u64,
    bytes: &[u8],
) -> Result<()> {
    assert_eq!(position % BLOCK_BYTES as u64, 0, "O_DIRECT writes start on a block boundary");
    let size = bytes.len().div_ceil(BLOCK_BYTES).max(1) * BLOCK_BYTES;
    let mut buffer = file.alloc_dma_buffer(size);
    let target = buffer.as_bytes_mut();
    target[..bytes.len()].copy_from_slice(bytes);
    target[bytes.len()..].fill(0);
    let written = file
        .write_at(buffer, position)
        .await
        .map_err(|e| StorageError::io("writing", path, glommio_io(e)))?;
    if written != size {
        return Err(StorageError::io("writing", path, std::io::Error::from_raw_os_error(libc::ENOSPC)));
    }
    Ok(())
}

/// Reads a whole small file with O_DIRECT; `None` if it does not exist.
pub(crate) async fn read_small_file(path: &Path) -> Result<Option<Vec<u8>>> {
    let file = match open_read_write(path, false).await {
        Ok(file) => file,
        Err(StorageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(error) => return Err(error),
    };
    let result = async {
        let size = file.file_size().await.map_err(|e| StorageError::io("sizing", path, glommio_io(e)))?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let read = file
            .read_at(0, size as usize)
            .await
            .map_err(|e| StorageError::io("reading", path, glommio_io(e)))?;
        Ok(read.to_vec())
    }
    .await;
    let _ = file.close().await;
    result.map(Some)
}

/// Makes a directory's entries (created, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("syncing directory", dir, e))
}

/// Removes a file; a file that is already gone is fine.
pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("removing", path, e)),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[inline]
pub(crate) fn align_down(value: u64) -> u64 {
    value & !(BLOCK_BYTES as u64 - 1)
}

#[inline]
pub(crate) fn align_up(value: u64) -> u64 {
    align_down(value + BLOCK_BYTES as u64 - 1)
}

/// Bytes free for an unprivileged writer on the filesystem that holds `path` (`statvfs`).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated path and a zeroed statvfs the call fills.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(name.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}
