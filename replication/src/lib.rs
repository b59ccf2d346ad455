//! Replication and the consensus shard (not built yet).
