//! Topic metadata: what topics exist, their partition counts and settings, stored durably in the
//! data directory.
//!
//! A single node is its own controller: shard 0 owns the [`MetadataStore`] and is the only one
//! that changes it; every shard holds a read-only copy of the topic table, updated by messages
//! from the controller. The store sits behind the [`MetadataStore`] trait so the Raft-replicated
//! controller (the consensus shard) can replace the file-backed one.
//!
//! # File format (`meta/topics.snapshot`)
//!
//! | offset | size | field | notes |
//! |-------:|-----:|-------|-------|
//! | 0  | 4 | magic | `"SKMD"` |
//! | 4  | 2 | version u16 | 2 |
//! | 6  | 2 | reserved | 0 |
//! | 8  | 4 | payload_bytes u32 | |
//! | 12 | 4 | crc u32 | CRC32C of the payload |
//! | 16 | … | payload | an [`rkyv`] archive of [`Snapshot`], checked with bytecheck on load |
//!
//! Version 1 (before topic ids) archived `SnapshotV1`: the epoch and the topics. It is still
//! read: opening the store gives every topic without an id a random one and writes the file
//! again as version 2 at once, so a topic keeps its id from then on (KIP-516's upgrade).
//! The file is replaced atomically (written to `topics.snapshot.tmp`, synced, renamed, directory
//! synced). A snapshot that fails its checks is refused with an error naming the file; the broker
//! does not start on guessed metadata.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rkyv::{Archive, Deserialize, Serialize};
use skein_net::types::TopicId;

pub const SNAPSHOT_MAGIC: [u8; 4] = *b"SKMD";
pub const SNAPSHOT_VERSION: u16 = 2;
const HEADER_BYTES: usize = 16;

pub use skein_replication::metadata::topic::{
    validate_topic_name, MetadataError, TopicConfig, TopicDefaults, PARTITIONS_MAX, TOPIC_NAME_BYTES_MAX,
};

/// What is persisted (version 2).
#[derive(Debug, Clone, PartialEq, Eq, Default, Archive, Serialize, Deserialize)]
pub struct Snapshot {
    /// Bumped by every change.
    pub epoch: u64,
    pub topics: BTreeMap<String, TopicConfig>,
    /// Each topic's id ([`TopicId`]'s bytes).
    pub topic_ids: BTreeMap<String, [u8; 16]>,
}

impl Snapshot {
    /// Each topic's id.
    pub fn ids(&self) -> BTreeMap<String, TopicId> {
        self.topic_ids.iter().map(|(name, id)| (name.clone(), TopicId(*id))).collect()
    }
}

/// What version 1 persisted (read, converted, never written).
#[derive(Debug, Clone, PartialEq, Eq, Default, Archive, Serialize, Deserialize)]
pub struct SnapshotV1 {
    pub epoch: u64,
    pub topics: BTreeMap<String, TopicConfig>,
}

/// A new topic's id: 16 random bytes (never all zero, which means "no id").
pub fn random_topic_id() -> TopicId {
    use ring::rand::SecureRandom;
    let random = ring::rand::SystemRandom::new();
    loop {
        let mut id = [0u8; 16];
        random.fill(&mut id).expect("the system's random source works");
        if id != [0; 16] {
            return TopicId(id);
        }
    }
}

/// The controller's view of the metadata: the one interface through which topics change.
pub trait MetadataStore {
    fn snapshot(&self) -> &Snapshot;
    /// Adds a topic durably, with its id. The name, id and config were validated by the caller.
    fn create_topic(&mut self, name: &str, id: TopicId, config: TopicConfig) -> Result<(), MetadataError>;
    /// Removes a topic durably; returns its settings.
    fn delete_topic(&mut self, name: &str) -> Result<TopicConfig, MetadataError>;
    /// Replaces a topic's settings durably (more partitions).
    fn update_topic(&mut self, name: &str, config: TopicConfig) -> Result<(), MetadataError>;
}

/// The single-node store: a snapshot file rewritten atomically on every change.
pub struct FileMetadataStore {
    path: PathBuf,
    snapshot: Snapshot,
}

impl FileMetadataStore {
    pub fn snapshot_path(data_dir: &Path) -> PathBuf {
        data_dir.join("meta").join("topics.snapshot")
    }

    /// Loads the store from the data directory (empty if there is no file yet).
    pub fn open(data_dir: &Path) -> Result<FileMetadataStore, MetadataError> {
        let path = Self::snapshot_path(data_dir);
        let storage_error = |reason: String| MetadataError::Storage { path: path.clone(), reason };
        let snapshot = match std::fs::read(&path) {
            Ok(bytes) => decode_snapshot(&bytes).map_err(storage_error)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
            Err(error) => return Err(storage_error(error.to_string())),
        };
        let mut store = FileMetadataStore { path, snapshot };
        // Topics from before ids (a version 1 file) get theirs now, stored at once.
        let missing: Vec<String> = store
            .snapshot
            .topics
            .keys()
            .filter(|name| !store.snapshot.topic_ids.contains_key(*name))
            .cloned()
            .collect();
        if !missing.is_empty() {
            store.change(|next| {
                for name in &missing {
                    next.topic_ids.insert(name.clone(), random_topic_id().0);
                }
                Ok(())
            })?;
            tracing::info!(topics = missing.len(), "metadata converted to version 2: topics got ids");
        }
        Ok(store)
    }

    fn persist(&self, snapshot: &Snapshot) -> Result<(), MetadataError> {
        let bytes = encode_snapshot(snapshot);
        write_atomically(&self.path, &bytes)
            .map_err(|error| MetadataError::Storage { path: self.path.clone(), reason: error.to_string() })
    }
}

impl MetadataStore for FileMetadataStore {
    fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn create_topic(&mut self, name: &str, id: TopicId, config: TopicConfig) -> Result<(), MetadataError> {
        self.change(|next| match next.topics.entry(name.to_owned()) {
            std::collections::btree_map::Entry::Occupied(_) => {
                Err(MetadataError::TopicExists(name.to_owned()))
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(config);
                next.topic_ids.insert(name.to_owned(), id.0);
                Ok(())
            }
        })
    }

    fn update_topic(&mut self, name: &str, config: TopicConfig) -> Result<(), MetadataError> {
        self.change(|next| {
            let slot =
                next.topics.get_mut(name).ok_or_else(|| MetadataError::UnknownTopic(name.to_owned()))?;
            *slot = config;
            Ok(())
        })
    }

    fn delete_topic(&mut self, name: &str) -> Result<TopicConfig, MetadataError> {
        self.change(|next| {
            next.topic_ids.remove(name);
            next.topics.remove(name).ok_or_else(|| MetadataError::UnknownTopic(name.to_owned()))
        })
    }
}

impl FileMetadataStore {
    /// Applies `edit` to a copy of the snapshot, bumps its epoch and stores it; the snapshot in
    /// memory is replaced only once the file is written. An error of `edit` changes nothing.
    fn change<R>(
        &mut self,
        edit: impl FnOnce(&mut Snapshot) -> Result<R, MetadataError>,
    ) -> Result<R, MetadataError> {
        let mut next = self.snapshot.clone();
        let result = edit(&mut next)?;
        next.epoch += 1;
        self.persist(&next)?;
        self.snapshot = next;
        Ok(result)
    }
}

/// Serialises a snapshot with its header.
pub fn encode_snapshot(snapshot: &Snapshot) -> Vec<u8> {
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(snapshot).expect("a snapshot always serialises");
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload.len());
    bytes.extend_from_slice(&SNAPSHOT_MAGIC);
    bytes.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&[0, 0]);
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    bytes
}

/// Checks and decodes a snapshot file; the error says which rule broke.
pub fn decode_snapshot(bytes: &[u8]) -> Result<Snapshot, String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!("{} bytes, shorter than the 16-byte header", bytes.len()));
    }
    if bytes[0..4] != SNAPSHOT_MAGIC {
        return Err(format!("bad magic {:02x?}", &bytes[0..4]));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != SNAPSHOT_VERSION && version != 1 {
        return Err(format!("unsupported version {version} (this build reads 1 and {SNAPSHOT_VERSION})"));
    }
    if bytes[6..8] != [0, 0] {
        return Err("reserved header bytes are not zero".to_owned());
    }
    let length = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let payload = &bytes[HEADER_BYTES..];
    if payload.len() != length {
        return Err(format!("payload is {} bytes, header says {length}", payload.len()));
    }
    let stored = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(payload);
    if stored != computed {
        return Err(format!("crc mismatch: stored {stored:#010x}, computed {computed:#010x}"));
    }
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    if version == 1 {
        let old = rkyv::from_bytes::<SnapshotV1, rkyv::rancor::Error>(&aligned)
            .map_err(|error| format!("invalid version 1 archive: {error}"))?;
        return Ok(Snapshot { epoch: old.epoch, topics: old.topics, topic_ids: BTreeMap::new() });
    }
    rkyv::from_bytes::<Snapshot, rkyv::rancor::Error>(&aligned)
        .map_err(|error| format!("invalid archive: {error}"))
}

/// Producer ids, handed out by the controller in blocks of [`PRODUCER_ID_BLOCK`]: the file
/// `meta/producer-ids` holds the first id of the next block, written (atomically) before any id
/// of the current block is handed out, so an id is never handed out twice, even after a crash
/// (the rest of a block is skipped on restart).
///
/// | offset | size | field | notes |
/// |-------:|-----:|-------|-------|
/// | 0  | 4 | magic | `"SKPI"` |
/// | 4  | 2 | version u16 | 1 |
/// | 6  | 2 | reserved | 0 |
/// | 8  | 8 | next block i64 | |
/// | 16 | 4 | crc u32 | CRC32C of bytes 0–15 |
#[derive(Debug)]
pub struct ProducerIdAllocator {
    path: PathBuf,
    next: i64,
    block_end: i64,
}

pub const PRODUCER_IDS_MAGIC: [u8; 4] = *b"SKPI";
pub const PRODUCER_IDS_VERSION: u16 = 1;
pub const PRODUCER_ID_BLOCK: i64 = 1000;

impl ProducerIdAllocator {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("meta").join("producer-ids")
    }

    pub fn open(data_dir: &Path) -> Result<ProducerIdAllocator, MetadataError> {
        let path = Self::path(data_dir);
        let storage_error = |reason: String| MetadataError::Storage { path: path.clone(), reason };
        let next = match std::fs::read(&path) {
            Ok(bytes) => Self::decode(&bytes).map_err(storage_error)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
            Err(error) => return Err(storage_error(error.to_string())),
        };
        Ok(ProducerIdAllocator { path, next, block_end: next })
    }

    fn encode(next_block: i64) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(20);
        bytes.extend_from_slice(&PRODUCER_IDS_MAGIC);
        bytes.extend_from_slice(&PRODUCER_IDS_VERSION.to_le_bytes());
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&next_block.to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<i64, String> {
        if bytes.len() != 20 {
            return Err(format!("{} bytes, expected 20", bytes.len()));
        }
        if bytes[0..4] != PRODUCER_IDS_MAGIC {
            return Err("bad magic".into());
        }
        if u16::from_le_bytes([bytes[4], bytes[5]]) != PRODUCER_IDS_VERSION {
            return Err("unsupported version".into());
        }
        let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        if crc32c::crc32c(&bytes[..16]) != crc {
            return Err("crc mismatch".into());
        }
        let next = i64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        if next < 0 {
            return Err(format!("negative next block {next}"));
        }
        Ok(next)
    }

    /// Whether the next id needs a new block written first ([`Self::reserve_block`]).
    pub fn needs_block(&self) -> bool {
        self.next >= self.block_end
    }

    /// Durably reserves the next block. Blocking (file write and sync).
    pub fn reserve_block(&mut self) -> Result<(), MetadataError> {
        let end = self.next + PRODUCER_ID_BLOCK;
        write_atomically(&self.path, &Self::encode(end))
            .map_err(|error| MetadataError::Storage { path: self.path.clone(), reason: error.to_string() })?;
        self.block_end = end;
        Ok(())
    }

    /// The next id; call only when [`Self::needs_block`] is false.
    pub fn take(&mut self) -> i64 {
        assert!(!self.needs_block(), "a block is reserved");
        let id = self.next;
        self.next += 1;
        id
    }
}

/// Replaces `path` with `bytes`: temporary file, fsync, rename, directory fsync.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_with_mode(path, bytes, 0o666)
}

/// [`write_atomically`] with the file's permission bits (less the umask): `0o600` for a secret.
pub fn write_atomically_with_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().expect("metadata files live in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    // A leftover from a crash may have other permissions; `mode` applies only to a new file.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> TopicDefaults {
        TopicDefaults { segment_bytes: 1 << 20, retention_ms: Some(1000), max_message_bytes: 64 << 10 }
    }

    #[test]
    fn names_and_configs_are_validated() {
        assert!(validate_topic_name("orders.v1_eu-2").is_ok());
        for bad in ["", ".", "..", "a/b", "spaces here", &"x".repeat(250)] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
        let config =
            TopicConfig::from_request(3, &[("retention.ms".into(), "-1".into())], &defaults(), 0).unwrap();
        assert_eq!(config.retention_ms, None);
        assert_eq!(config.partitions, 3);
        assert!(matches!(
            TopicConfig::from_request(0, &[], &defaults(), 0),
            Err(MetadataError::InvalidPartitions(0))
        ));
        for (key, value) in
            [("retention.ms", "x"), ("segment.bytes", "10"), ("nope", "1"), ("retention.bytes", "0")]
        {
            assert!(
                TopicConfig::from_request(1, &[(key.into(), value.into())], &defaults(), 0).is_err(),
                "{key}={value}"
            );
        }
    }

    #[test]
    fn snapshots_round_trip_and_damage_is_refused() {
        let mut snapshot = Snapshot { epoch: 7, ..Snapshot::default() };
        snapshot.topics.insert("t".into(), TopicConfig::from_request(2, &[], &defaults(), 5).unwrap());
        snapshot.topic_ids.insert("t".into(), [7; 16]);
        let bytes = encode_snapshot(&snapshot);
        assert_eq!(decode_snapshot(&bytes).unwrap(), snapshot);
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            assert!(decode_snapshot(&damaged).is_err(), "flip at {at} undetected");
        }
        assert!(decode_snapshot(&bytes[..10]).is_err());
    }

    #[test]
    fn producer_ids_are_never_handed_out_twice_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = ProducerIdAllocator::open(dir.path()).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1500 {
            if ids.needs_block() {
                ids.reserve_block().unwrap();
            }
            assert!(seen.insert(ids.take()));
        }
        // A restart skips the rest of the block.
        let mut ids = ProducerIdAllocator::open(dir.path()).unwrap();
        assert!(ids.needs_block());
        ids.reserve_block().unwrap();
        let next = ids.take();
        assert!(next >= 2000 && !seen.contains(&next));
        let path = ProducerIdAllocator::path(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let error = ProducerIdAllocator::open(dir.path()).unwrap_err();
        assert!(error.to_string().contains("producer-ids"), "{error}");
    }

    #[test]
    fn the_file_store_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileMetadataStore::open(dir.path()).unwrap();
        let config = TopicConfig::from_request(4, &[], &defaults(), 1).unwrap();
        store.create_topic("a", TopicId([1; 16]), config.clone()).unwrap();
        store.create_topic("b", TopicId([2; 16]), config.clone()).unwrap();
        assert!(matches!(
            store.create_topic("a", TopicId([3; 16]), config.clone()),
            Err(MetadataError::TopicExists(_))
        ));
        store.delete_topic("b").unwrap();
        let reopened = FileMetadataStore::open(dir.path()).unwrap();
        assert_eq!(reopened.snapshot().topics.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(reopened.snapshot().ids(), BTreeMap::from([("a".to_owned(), TopicId([1; 16]))]));
        assert_eq!(reopened.snapshot().epoch, 3);
    }

    #[test]
    fn a_version_1_file_is_read_and_its_topics_get_ids_kept_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let config = TopicConfig::from_request(4, &[], &defaults(), 1).unwrap();
        let old = SnapshotV1 {
            epoch: 5,
            topics: BTreeMap::from([("a".to_owned(), config.clone()), ("b".to_owned(), config)]),
        };
        let payload = rkyv::to_bytes::<rkyv::rancor::Error>(&old).unwrap();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let path = FileMetadataStore::snapshot_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();

        let store = FileMetadataStore::open(dir.path()).unwrap();
        let ids = store.snapshot().ids();
        assert_eq!(store.snapshot().topics, old.topics);
        assert_eq!(ids.len(), 2);
        assert!(ids.values().all(|id| !id.is_none()));
        assert_ne!(ids["a"], ids["b"]);
        // Written as version 2 at once: the ids stay what they are.
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(u16::from_le_bytes([on_disk[4], on_disk[5]]), SNAPSHOT_VERSION);
        assert_eq!(FileMetadataStore::open(dir.path()).unwrap().snapshot().ids(), ids);
        // A version this build does not know is refused by number.
        let mut newer = on_disk;
        newer[4] = 9;
        assert!(decode_snapshot(&newer).unwrap_err().contains("unsupported version 9"));
    }
}
