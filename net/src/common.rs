//! Encoding helpers shared by the bodies of every API (both [`crate::messages`] and
//! [`crate::groups`] use them; neither uses the other): topic-level arrays, error codes,
//! config pairs and string lists.

use crate::error::ErrorCode;
use crate::wire::{DecodeError, Reader, Writer};

/// Topic-level grouping used by most APIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicData<P> {
    pub name: String,
    pub partitions: Vec<P>,
}

pub(crate) fn put_topics<P>(w: &mut Writer, topics: &[TopicData<P>], mut each: impl FnMut(&mut Writer, &P)) {
    w.array(topics, |w, topic| {
        w.str(&topic.name);
        w.array(&topic.partitions, &mut each);
    });
}

pub(crate) fn get_topics<P>(
    r: &mut Reader<'_>,
    min_partition_bytes: usize,
    mut each: impl FnMut(&mut Reader<'_>) -> Result<P, DecodeError>,
) -> Result<Vec<TopicData<P>>, DecodeError> {
    r.array("topics", 6, |r| {
        let name = r.str("topic name")?;
        let partitions = r.array("partitions", min_partition_bytes, &mut each)?;
        Ok(TopicData { name, partitions })
    })
}

pub(crate) fn error_code(r: &mut Reader<'_>, field: &'static str) -> Result<ErrorCode, DecodeError> {
    let raw = r.u16(field)?;
    Ok(ErrorCode::from_u16(raw))
}

pub(crate) fn put_configs(w: &mut Writer, configs: &[(String, String)]) {
    w.array(configs, |w, (key, value)| {
        w.str(key).str(value);
    });
}

pub(crate) fn get_configs(r: &mut Reader<'_>) -> Result<Vec<(String, String)>, DecodeError> {
    r.array("configs", 4, |r| Ok((r.str("config key")?, r.str("config value")?)))
}

pub(crate) fn put_strings(w: &mut Writer, items: &[String]) {
    w.array(items, |w, s| {
        w.str(s);
    });
}

pub(crate) fn get_strings(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<String>, DecodeError> {
    r.array(field, 2, |r| r.str(field))
}
