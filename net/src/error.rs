//! Numbered wire error codes. A code is never reused for another meaning.

/// An error code carried in responses (per frame, per topic or per partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    None = 0,
    /// An unexpected error on the broker; its log says more.
    Unknown = 1,
    /// A record batch broke a format rule or failed its CRC; nothing of the request's batch for
    /// that partition was written.
    CorruptBatch = 2,
    /// The topic or partition does not exist (retriable: it may be being created).
    UnknownTopicOrPartition = 3,
    /// The topic name is not valid.
    InvalidTopic = 4,
    /// A batch is larger than the broker accepts.
    BatchTooLarge = 5,
    /// The fetch offset is outside the partition's log.
    OffsetOutOfRange = 6,
    /// This broker does not lead the partition (retriable: refresh metadata).
    NotLeader = 7,
    /// The request did not complete in time (retriable).
    RequestTimedOut = 8,
    TopicAlreadyExists = 9,
    /// The partition count is not valid.
    InvalidPartitions = 10,
    /// The API exists but not at this version.
    UnsupportedVersion = 11,
    /// The API key is unknown.
    UnknownApi = 12,
    /// The request body does not decode.
    MalformedRequest = 13,
    /// The broker's storage failed an I/O operation (retriable).
    StorageError = 14,
    /// The broker's disk is full; nothing was written (retriable once space is freed).
    NotEnoughSpace = 15,
    /// Too many requests in flight on this connection (retriable).
    TooManyRequests = 16,
    /// A topic setting is not valid.
    InvalidConfig = 17,
    /// The broker is shutting down (retriable on another broker, or after restart).
    ShuttingDown = 18,
    /// Data on the broker's disk failed its check and is not served.
    CorruptStorage = 19,
    /// `acks` is not 0, 1 or -1.
    InvalidRequiredAcks = 20,
    /// Too many connections to this broker.
    TooManyConnections = 21,
    /// An idempotent producer's batch does not follow the last sequence number written for it
    /// on that partition (an earlier batch is missing: retry in order).
    OutOfOrderSequence = 22,
    /// A retry of a batch written too long ago for its offsets to be returned; it is not
    /// written again.
    DuplicateSequence = 23,
    /// A newer epoch of this producer id exists; this producer must stop.
    ProducerFenced = 24,
    /// Reserved (an unknown producer id whose batch does not start at 0 is answered with
    /// `OutOfOrderSequence`, since its first batch may still be on its way).
    UnknownProducerId = 25,
    /// The group id is not valid.
    InvalidGroupId = 26,
    /// The member is not (or no longer) in the group: rejoin with epoch 0.
    UnknownMemberId = 27,
    /// The member's epoch is ahead of the coordinator's: rejoin with epoch 0.
    FencedMemberEpoch = 28,
    /// The member does not own the partition it commits (it was revoked or never assigned).
    StaleMemberEpoch = 29,
    /// The operation needs a group without members.
    GroupNotEmpty = 30,
    /// The group does not exist.
    GroupIdNotFound = 31,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 32] = [
        ErrorCode::None,
        ErrorCode::Unknown,
        ErrorCode::CorruptBatch,
        ErrorCode::UnknownTopicOrPartition,
        ErrorCode::InvalidTopic,
        ErrorCode::BatchTooLarge,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::NotLeader,
        ErrorCode::RequestTimedOut,
        ErrorCode::TopicAlreadyExists,
        ErrorCode::InvalidPartitions,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownApi,
        ErrorCode::MalformedRequest,
        ErrorCode::StorageError,
        ErrorCode::NotEnoughSpace,
        ErrorCode::TooManyRequests,
        ErrorCode::InvalidConfig,
        ErrorCode::ShuttingDown,
        ErrorCode::CorruptStorage,
        ErrorCode::InvalidRequiredAcks,
        ErrorCode::TooManyConnections,
        ErrorCode::OutOfOrderSequence,
        ErrorCode::DuplicateSequence,
        ErrorCode::ProducerFenced,
        ErrorCode::UnknownProducerId,
        ErrorCode::InvalidGroupId,
        ErrorCode::UnknownMemberId,
        ErrorCode::FencedMemberEpoch,
        ErrorCode::StaleMemberEpoch,
        ErrorCode::GroupNotEmpty,
        ErrorCode::GroupIdNotFound,
    ];

    pub fn from_u16(value: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.get(value as usize).copied()
    }

    pub fn is_ok(self) -> bool {
        self == ErrorCode::None
    }

    /// Whether the same request may succeed later without change.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::UnknownTopicOrPartition
                | ErrorCode::NotLeader
                | ErrorCode::RequestTimedOut
                | ErrorCode::StorageError
                | ErrorCode::NotEnoughSpace
                | ErrorCode::TooManyRequests
                | ErrorCode::ShuttingDown
                | ErrorCode::TooManyConnections
                | ErrorCode::OutOfOrderSequence
        )
    }

    /// Whether the client should refresh its metadata before retrying.
    pub fn needs_metadata_refresh(self) -> bool {
        matches!(self, ErrorCode::UnknownTopicOrPartition | ErrorCode::NotLeader)
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::None => "none",
            ErrorCode::Unknown => "unknown server error",
            ErrorCode::CorruptBatch => "corrupt batch",
            ErrorCode::UnknownTopicOrPartition => "unknown topic or partition",
            ErrorCode::InvalidTopic => "invalid topic",
            ErrorCode::BatchTooLarge => "batch too large",
            ErrorCode::OffsetOutOfRange => "offset out of range",
            ErrorCode::NotLeader => "not the leader",
            ErrorCode::RequestTimedOut => "request timed out",
            ErrorCode::TopicAlreadyExists => "topic already exists",
            ErrorCode::InvalidPartitions => "invalid partition count",
            ErrorCode::UnsupportedVersion => "unsupported API version",
            ErrorCode::UnknownApi => "unknown API",
            ErrorCode::MalformedRequest => "malformed request",
            ErrorCode::StorageError => "storage error",
            ErrorCode::NotEnoughSpace => "not enough space on the broker's disk",
            ErrorCode::TooManyRequests => "too many requests in flight",
            ErrorCode::InvalidConfig => "invalid configuration",
            ErrorCode::ShuttingDown => "broker shutting down",
            ErrorCode::CorruptStorage => "corrupt data on the broker's disk",
            ErrorCode::InvalidRequiredAcks => "invalid acks",
            ErrorCode::TooManyConnections => "too many connections",
            ErrorCode::OutOfOrderSequence => "out of order sequence number",
            ErrorCode::DuplicateSequence => "duplicate sequence number",
            ErrorCode::ProducerFenced => "producer fenced by a newer epoch",
            ErrorCode::UnknownProducerId => "unknown producer id",
            ErrorCode::InvalidGroupId => "invalid group id",
            ErrorCode::UnknownMemberId => "unknown member id",
            ErrorCode::FencedMemberEpoch => "fenced member epoch",
            ErrorCode::StaleMemberEpoch => "stale member epoch",
            ErrorCode::GroupNotEmpty => "group not empty",
            ErrorCode::GroupIdNotFound => "group not found",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_numbered_in_order_and_round_trip() {
        for (index, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(*code as u16 as usize, index, "{code:?} is numbered by its position");
            assert_eq!(ErrorCode::from_u16(index as u16), Some(*code));
        }
        assert_eq!(ErrorCode::from_u16(ErrorCode::ALL.len() as u16), None);
    }
}
