//! The leader-epoch cache of one replica: for each leader epoch in its log, the offset of the
//! epoch's first record. It is what lets a follower find where its log and its leader's part
//! (KIP-101): the leader answers a follower's last epoch with where that epoch ends in its own
//! log, and the follower truncates to the smaller of that and its own end of the epoch.

use skein_net::types::{LeaderEpoch, Offset};

/// Epochs with their start offsets; both strictly increase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochCache {
    entries: Vec<(LeaderEpoch, Offset)>,
}

impl EpochCache {
    pub fn new(entries: Vec<(LeaderEpoch, Offset)>) -> EpochCache {
        let mut cache = EpochCache::default();
        for (epoch, start) in entries {
            cache.assign(epoch, start);
        }
        cache
    }

    pub fn entries(&self) -> &[(LeaderEpoch, Offset)] {
        &self.entries
    }

    /// The newest epoch in the log.
    pub fn latest(&self) -> Option<LeaderEpoch> {
        self.entries.last().map(|&(epoch, _)| epoch)
    }

    /// Records that `epoch` starts at `start`. Only a newer epoch is recorded (records of an
    /// epoch already known change nothing); an entry that would not start after the last one
    /// replaces it (an epoch that ended with no record).
    pub fn assign(&mut self, epoch: LeaderEpoch, start: Offset) {
        match self.entries.last() {
            Some(&(last, _)) if last >= epoch => {}
            Some(&(_, last_start)) if last_start >= start => {
                self.entries.pop();
                self.assign(epoch, start);
            }
            _ => self.entries.push((epoch, start)),
        }
    }

    /// Where `requested` ends in this log: the largest epoch not above it and the offset its
    /// records end at (the next epoch's start, or `log_end` for the newest). `None` when every
    /// epoch in the log is newer than `requested`.
    pub fn end_offset_for(&self, requested: LeaderEpoch, log_end: Offset) -> Option<(LeaderEpoch, Offset)> {
        let index = self.entries.iter().rposition(|&(epoch, _)| epoch <= requested)?;
        let end = self.entries.get(index + 1).map_or(log_end, |&(_, start)| start);
        Some((self.entries[index].0, end))
    }

    /// The log was cut at `end`: epochs that start at or after it go.
    pub fn truncate_from_end(&mut self, end: Offset) {
        self.entries.retain(|&(_, start)| start < end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(n: u32) -> LeaderEpoch {
        LeaderEpoch(n)
    }

    #[test]
    fn an_epoch_ends_where_the_next_begins() {
        let cache = EpochCache::new(vec![(e(1), 0), (e(3), 50), (e(4), 80)]);
        assert_eq!(cache.end_offset_for(e(1), 100), Some((e(1), 50)));
        assert_eq!(
            cache.end_offset_for(e(2), 100),
            Some((e(1), 50)),
            "an epoch not in the log: the one before"
        );
        assert_eq!(cache.end_offset_for(e(4), 100), Some((e(4), 100)), "the newest ends at the log end");
        assert_eq!(cache.end_offset_for(e(9), 100), Some((e(4), 100)));
        assert_eq!(cache.end_offset_for(e(0), 100), None);
        assert_eq!(cache.latest(), Some(e(4)));
    }

    #[test]
    fn only_newer_epochs_are_recorded_and_truncation_trims() {
        let mut cache = EpochCache::default();
        cache.assign(e(2), 10);
        cache.assign(e(2), 20);
        cache.assign(e(1), 30);
        assert_eq!(cache.entries(), [(e(2), 10)]);
        cache.assign(e(5), 40);
        cache.truncate_from_end(40);
        assert_eq!(cache.entries(), [(e(2), 10)], "epoch 5 had no record left");
        cache.assign(e(6), 10);
        assert_eq!(cache.entries(), [(e(6), 10)], "an empty epoch 2 is replaced");
    }
}
