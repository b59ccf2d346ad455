//! Retention: deleting whole sealed segments, oldest first.

use super::{Log, RetentionOutcome, State};
use crate::error::{Result, StorageError};
use crate::segment;

impl Log {
    /// Deletes whole sealed segments, oldest first: those whose newest record is older than
    /// `retention_age_max`, and then more while the log is larger than `retention_bytes_max`.
    /// The active segment is never deleted.
    pub async fn enforce_retention(&self, now_ms: i64) -> Result<RetentionOutcome> {
        let config = self.shared.config.get();
        self.delete_oldest_sealed("segment deleted by retention", |state| {
            let mut total = state.size_bytes();
            let mut victims = Vec::new();
            for (&base, sealed) in &state.sealed {
                let expired = config.retention_age_max.is_some_and(|age| {
                    sealed.summary.max_timestamp < now_ms.saturating_sub(age.as_millis() as i64)
                });
                let oversized = config.retention_bytes_max.is_some_and(|max| total > max);
                if !(expired || oversized) {
                    break;
                }
                total -= sealed.summary.log_bytes;
                victims.push(base);
            }
            victims
        })
        .await
    }

    /// Deletes the sealed segments whose every record is below `offset` (oldest first; the
    /// active segment is never deleted). Compaction by snapshot uses it: once a snapshot of
    /// the live state is appended at `offset`, everything before it can go.
    pub async fn delete_segments_before(&self, offset: u64) -> Result<RetentionOutcome> {
        self.delete_oldest_sealed("segment deleted below a snapshot", |state| {
            let bases: Vec<u64> = state.sealed.keys().copied().collect();
            // A sealed segment ends where the next one (or the active one) begins.
            let ends = bases.iter().skip(1).copied().chain([state.active.file.base_offset()]);
            bases.iter().zip(ends).take_while(|(_, end)| *end <= offset).map(|(base, _)| *base).collect()
        })
        .await
    }

    /// Removes the sealed segments `pick` names (oldest first), their files and their place in
    /// the index cache, then syncs the directory.
    async fn delete_oldest_sealed(
        &self,
        why: &'static str,
        pick: impl FnOnce(&State) -> Vec<u64>,
    ) -> Result<RetentionOutcome> {
        let shared = &self.shared;
        let _permit = shared.gate.acquire_permit(1).await.map_err(|_| StorageError::Closed)?;
        shared.finish_index_writes().await;
        let victims = {
            let mut state = shared.state.borrow_mut();
            let bases = pick(&state);
            let mut removed = Vec::with_capacity(bases.len());
            for base in &bases {
                let sealed = state.sealed.remove(base).expect("picked from the sealed segments");
                state.loaded.retain(|b| b != base);
                removed.push(sealed);
            }
            removed
        };
        let mut outcome = RetentionOutcome::default();
        for sealed in &victims {
            segment::remove_files(sealed.file.paths())?;
            outcome.segments_deleted += 1;
            outcome.bytes_deleted += sealed.summary.log_bytes;
            tracing::info!(path = %sealed.file.path().display(), "{why}");
        }
        if !victims.is_empty() {
            shared.sync_directory().await?;
        }
        outcome.start_offset = self.start_offset();
        Ok(outcome)
    }
}
