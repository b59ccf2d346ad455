//! Errors of the storage engine. Operating errors (a full disk, a corrupt file, an offset out of
//! range) are values of [`StorageError`]; programmer errors are assertions.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::batch::BatchError;
use crate::files::FormatError;

/// What is wrong with the bytes found at a file position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptionKind {
    #[error("invalid batch: {0}")]
    Batch(#[from] BatchError),
    #[error("batch base offset {found}, expected {expected}")]
    OffsetGap { expected: u64, found: u64 },
    #[error("invalid file: {0}")]
    Format(#[from] FormatError),
    #[error("file is {found} bytes, its recovery checkpoint says at least {expected}")]
    Shorter { expected: u64, found: u64 },
    #[error("segment ends at offset {found}, the next segment starts at {expected}")]
    SegmentGap { expected: u64, found: u64 },
    #[error("batch extends past the end of the segment ({end} bytes)")]
    PastEnd { end: u64 },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// An I/O call failed. `op` says what the engine was doing.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    /// The device is full; nothing was acknowledged, appending works again once space is freed.
    #[error("no space left on the device while {op} {path}")]
    NoSpace { op: &'static str, path: PathBuf },
    /// A batch offered to [`crate::Log::append`] breaks a format rule; nothing was written.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// Bytes on disk that recovery must not skip: the log refuses to open.
    #[error("corruption in {path} at byte {position}: {kind}")]
    Corruption { path: PathBuf, position: u64, kind: CorruptionKind },
    #[error("offset {offset} is out of range: the log holds [{start}, {end})")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },
    #[error("invalid log configuration: {0}")]
    Config(&'static str),
    /// A previous `fdatasync` failed; what reached the disk is unknown, so the log accepts no
    /// more writes until it is reopened (which runs recovery).
    #[error("log is failed after an earlier sync error ({0}); reopen it to recover")]
    Failed(Arc<StorageError>),
    /// The write that carried this append failed; nothing of it was acknowledged and its
    /// offsets were given back.
    #[error("append not written: {0}")]
    WriteAborted(Arc<StorageError>),
    #[error("log is closed")]
    Closed,
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> StorageError {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) || source.raw_os_error() == Some(libc::EDQUOT) {
            return StorageError::NoSpace { op, path };
        }
        StorageError::Io { op, path, source: Arc::new(source) }
    }

    /// Back to an `io::Error` (keeping the OS error code) where a caller deals in those.
    pub(crate) fn into_io(self) -> io::Error {
        match self {
            StorageError::Io { source, .. } => match source.raw_os_error() {
                Some(code) => io::Error::from_raw_os_error(code),
                None => io::Error::new(source.kind(), source.to_string()),
            },
            StorageError::NoSpace { .. } => io::Error::from_raw_os_error(libc::ENOSPC),
            other => io::Error::other(other.to_string()),
        }
    }

    /// Whether the same request may succeed if retried later (after space is freed, after a
    /// transient error), as opposed to a request that is wrong in itself.
    pub fn is_retriable(&self) -> bool {
        matches!(self, StorageError::NoSpace { .. } | StorageError::WriteAborted(_) | StorageError::Io { .. })
    }
}

/// Converts glommio's error into an `io::Error` that keeps the OS error code.
pub(crate) fn glommio_io<T>(error: glommio::GlommioError<T>) -> io::Error {
    match error {
        glommio::GlommioError::IoError(error) => error,
        glommio::GlommioError::EnhancedIoError { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}
