//! Numbered wire error codes. A code is never reused for another meaning.

/// An error code carried in responses (per frame, per topic or per partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    None,
    /// An unexpected error on the broker; its log says more.
    UnknownServerError,
    /// A record batch broke a format rule or failed its CRC; nothing of the request's batch for
    /// that partition was written.
    CorruptBatch,
    /// The topic or partition does not exist (retriable: it may be being created).
    UnknownTopicOrPartition,
    /// The topic name is not valid.
    InvalidTopic,
    /// A batch is larger than the broker accepts.
    BatchTooLarge,
    /// The fetch offset is outside the partition's log.
    OffsetOutOfRange,
    /// This broker does not lead the partition (retriable: refresh metadata).
    NotLeader,
    /// The request did not complete in time (retriable).
    RequestTimedOut,
    TopicAlreadyExists,
    /// The partition count is not valid.
    InvalidPartitions,
    /// The API exists but not at this version.
    UnsupportedVersion,
    /// The API key is unknown.
    UnknownApi,
    /// The request body does not decode.
    MalformedRequest,
    /// The broker's storage failed an I/O operation (retriable).
    StorageError,
    /// The broker's disk is full; nothing was written (retriable once space is freed).
    NotEnoughSpace,
    /// Too many requests in flight on this connection (retriable).
    TooManyRequests,
    /// A topic setting is not valid.
    InvalidConfig,
    /// The broker is shutting down (retriable on another broker, or after restart).
    ShuttingDown,
    /// Data on the broker's disk failed its check and is not served.
    CorruptStorage,
    /// `acks` is not 0, 1 or -1.
    InvalidRequiredAcks,
    /// Too many connections to this broker.
    TooManyConnections,
    /// An idempotent producer's batch does not follow the last sequence number written for it
    /// on that partition (an earlier batch is missing: retry in order).
    OutOfOrderSequence,
    /// A retry of a batch written too long ago for its offsets to be returned; it is not
    /// written again.
    DuplicateSequence,
    /// A newer epoch of this producer id exists; this producer must stop.
    ProducerFenced,
    /// Reserved (an unknown producer id whose batch does not start at 0 is answered with
    /// `OutOfOrderSequence`, since its first batch may still be on its way).
    UnknownProducerId,
    /// The group id is not valid.
    InvalidGroupId,
    /// The member is not (or no longer) in the group: rejoin with epoch 0.
    UnknownMemberId,
    /// The member's epoch is ahead of the coordinator's: rejoin with epoch 0.
    FencedMemberEpoch,
    /// The member does not own the partition it commits (it was revoked or never assigned).
    StaleMemberEpoch,
    /// The operation needs a group without members.
    GroupNotEmpty,
    /// The group does not exist.
    GroupIdNotFound,
    /// A code this build does not know (a newer broker's): kept as it came, never retriable,
    /// never a reason to fail the decode of the response that carries it.
    Unknown(u16),
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 32] = [
        ErrorCode::None,
        ErrorCode::UnknownServerError,
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

    /// The number on the wire.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::None => 0,
            ErrorCode::UnknownServerError => 1,
            ErrorCode::CorruptBatch => 2,
            ErrorCode::UnknownTopicOrPartition => 3,
            ErrorCode::InvalidTopic => 4,
            ErrorCode::BatchTooLarge => 5,
            ErrorCode::OffsetOutOfRange => 6,
            ErrorCode::NotLeader => 7,
            ErrorCode::RequestTimedOut => 8,
            ErrorCode::TopicAlreadyExists => 9,
            ErrorCode::InvalidPartitions => 10,
            ErrorCode::UnsupportedVersion => 11,
            ErrorCode::UnknownApi => 12,
            ErrorCode::MalformedRequest => 13,
            ErrorCode::StorageError => 14,
            ErrorCode::NotEnoughSpace => 15,
            ErrorCode::TooManyRequests => 16,
            ErrorCode::InvalidConfig => 17,
            ErrorCode::ShuttingDown => 18,
            ErrorCode::CorruptStorage => 19,
            ErrorCode::InvalidRequiredAcks => 20,
            ErrorCode::TooManyConnections => 21,
            ErrorCode::OutOfOrderSequence => 22,
            ErrorCode::DuplicateSequence => 23,
            ErrorCode::ProducerFenced => 24,
            ErrorCode::UnknownProducerId => 25,
            ErrorCode::InvalidGroupId => 26,
            ErrorCode::UnknownMemberId => 27,
            ErrorCode::FencedMemberEpoch => 28,
            ErrorCode::StaleMemberEpoch => 29,
            ErrorCode::GroupNotEmpty => 30,
            ErrorCode::GroupIdNotFound => 31,
            ErrorCode::Unknown(code) => code,
        }
    }

    /// The code for a number from the wire: every number decodes; one this build does not know
    /// becomes [`ErrorCode::Unknown`].
    pub fn from_u16(value: u16) -> ErrorCode {
        match value {
            0 => ErrorCode::None,
            1 => ErrorCode::UnknownServerError,
            2 => ErrorCode::CorruptBatch,
            3 => ErrorCode::UnknownTopicOrPartition,
            4 => ErrorCode::InvalidTopic,
            5 => ErrorCode::BatchTooLarge,
            6 => ErrorCode::OffsetOutOfRange,
            7 => ErrorCode::NotLeader,
            8 => ErrorCode::RequestTimedOut,
            9 => ErrorCode::TopicAlreadyExists,
            10 => ErrorCode::InvalidPartitions,
            11 => ErrorCode::UnsupportedVersion,
            12 => ErrorCode::UnknownApi,
            13 => ErrorCode::MalformedRequest,
            14 => ErrorCode::StorageError,
            15 => ErrorCode::NotEnoughSpace,
            16 => ErrorCode::TooManyRequests,
            17 => ErrorCode::InvalidConfig,
            18 => ErrorCode::ShuttingDown,
            19 => ErrorCode::CorruptStorage,
            20 => ErrorCode::InvalidRequiredAcks,
            21 => ErrorCode::TooManyConnections,
            22 => ErrorCode::OutOfOrderSequence,
            23 => ErrorCode::DuplicateSequence,
            24 => ErrorCode::ProducerFenced,
            25 => ErrorCode::UnknownProducerId,
            26 => ErrorCode::InvalidGroupId,
            27 => ErrorCode::UnknownMemberId,
            28 => ErrorCode::FencedMemberEpoch,
            29 => ErrorCode::StaleMemberEpoch,
            30 => ErrorCode::GroupNotEmpty,
            31 => ErrorCode::GroupIdNotFound,
            other => ErrorCode::Unknown(other),
        }
    }

    /// Whether this build knows the code.
    pub fn is_known(self) -> bool {
        !matches!(self, ErrorCode::Unknown(_))
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
            ErrorCode::UnknownServerError => "unknown server error",
            ErrorCode::Unknown(_) => "an error code this client does not know",
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
        write!(f, "{} ({})", self.name(), self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_none_is_taken_twice() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.code()), "{code:?} reuses a number");
            assert_eq!(ErrorCode::from_u16(code.code()), code);
            assert!(code.is_known());
        }
        assert_eq!(ErrorCode::UnknownServerError.code(), 1, "numbers never change meaning");
        assert_eq!(ErrorCode::GroupIdNotFound.code(), 31);
    }

    #[test]
    fn a_code_from_a_newer_broker_decodes_as_unknown() {
        for raw in [32u16, 99, 150, 4242, u16::MAX] {
            let code = ErrorCode::from_u16(raw);
            assert_eq!(code, ErrorCode::Unknown(raw));
            assert_eq!(code.code(), raw, "kept as it came");
            assert!(!code.is_ok() && !code.is_retriable() && !code.is_known());
            assert!(code.to_string().contains(&raw.to_string()));
        }
    }
}
