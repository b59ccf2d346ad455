//! Typed client errors.

use skein_net::ErrorCode;
use skein_storage::batch::BatchError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection to the broker lost: {0}")]
    ConnectionLost(String),
    #[error("request timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The broker answered with an error code.
    #[error("{context}: {code}")]
    Broker { code: ErrorCode, context: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("partition {partition} of topic {topic} does not exist")]
    UnknownPartition { topic: String, partition: u32 },
    /// Records from the broker failed their check (CRC, format): not delivered.
    #[error("corrupt records in {topic}/{partition} at offset {offset}: {error}")]
    Corrupt { topic: String, partition: u32, offset: u64, error: BatchError },
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// The transport's settings cannot work (a QUIC CA file that does not load, a first shard
    /// out of range): not retried.
    #[error("transport settings: {0}")]
    Transport(String),
    #[error("record of {size} bytes exceeds the batch limit of {limit} bytes")]
    RecordTooLarge { size: usize, limit: usize },
    #[error("the client is closed")]
    Closed,
    /// A produced record was not acknowledged within the producer's delivery timeout. If it
    /// was sent, it may still be in the log (once: the idempotent producer never writes it
    /// twice).
    #[error("{topic}/{partition}: not acknowledged within the delivery timeout of {timeout:?} (last error: {last_error})")]
    DeliveryTimeout { topic: String, partition: u32, timeout: std::time::Duration, last_error: String },
}

impl ClientError {
    pub fn broker(code: ErrorCode, context: impl Into<String>) -> ClientError {
        ClientError::Broker { code, context: context.into() }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::ConnectionLost(_) | ClientError::Timeout(_) => true,
            ClientError::Broker { code, .. } => code.is_retriable(),
            _ => false,
        }
    }

    /// Whether the broker could not be reached or went away (refused or lost connection, or
    /// a broker shutting down): worth reconnecting and trying again.
    pub fn is_connection_failure(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::ConnectionLost(_) => true,
            ClientError::Broker { code, .. } => *code == ErrorCode::ShuttingDown,
            _ => false,
        }
    }

    /// The broker's error code, if this error carries one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;
