//! Metadata as records: [`record`] (the changes and their versioned codec), [`image`] (what
//! they add up to), [`apply`] (the one pure function from records to image and deltas),
//! [`delta`] (what an applied batch changed), [`topic`] (a topic's settings and their rules).

pub mod apply;
pub mod delta;
pub mod image;
pub mod record;
pub mod topic;

pub use apply::{apply, ApplyError};
pub use delta::Delta;
pub use image::MetadataImage;
pub use record::{decode_batch, encode_batch, MetadataRecord, RecordError};
pub use topic::{MetadataError, TopicConfig, TopicDefaults};
