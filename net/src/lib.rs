//! # skein-net: the wire protocol
//!
//! A pure codec: frames, headers, request and response bodies, numbered error codes. It does no
//! I/O and has no async code; the broker, the client and replication drive it over TCP (and
//! QUIC) themselves. It must never copy record data: produce records are decoded as ranges of
//! the frame, fetch responses are encoded as parts so records go out from the broker's memory
//! or straight from the segment file.
//!
//! The specification follows (it is also `net/PROTOCOL.md`).
//!
#![doc = include_str!("../PROTOCOL.md")]

mod common;
pub mod error;
pub mod frame;
pub mod groups;
pub mod messages;
pub mod quic;
pub mod request;
pub mod tcp;
pub mod types;
pub mod wire;

pub use error::ErrorCode;
pub use groups::*;
pub use messages::*;
pub use request::*;
pub use types::{BrokerEpoch, LeaderEpoch, NodeId, Offset, PartitionEpoch, ShardId, TopicPartition};
pub use wire::{DecodeError, Reader, Writer};
