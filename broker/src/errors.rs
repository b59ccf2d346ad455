//! Wire codes for the broker's internal errors, shared by the shard and the group service.

use skein_net::ErrorCode;
use skein_storage::batch::BatchError;
use skein_storage::StorageError;

/// The wire code for a storage error.
pub fn storage_error_code(error: &StorageError) -> ErrorCode {
    match error {
        StorageError::NoSpace { .. } => ErrorCode::NotEnoughSpace,
        StorageError::InvalidBatch(BatchError::TooLarge { .. }) => ErrorCode::BatchTooLarge,
        StorageError::InvalidBatch(_) => ErrorCode::CorruptBatch,
        StorageError::Corruption { .. } => ErrorCode::CorruptStorage,
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::Closed => ErrorCode::ShuttingDown,
        StorageError::WriteAborted(inner) | StorageError::Failed(inner) => storage_error_code(inner),
        StorageError::Io { .. } | StorageError::Config(_) => ErrorCode::StorageError,
    }
}
