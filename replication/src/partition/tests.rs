//! Exact commands for each event (one rule per test), and the KIP-101 divergence cases.

use super::*;

const L: NodeId = NodeId(1);
const F2: NodeId = NodeId(2);
const F3: NodeId = NodeId(3);

fn e(n: u32) -> LeaderEpoch {
    LeaderEpoch(n)
}

fn config() -> ReplicaConfig {
    ReplicaConfig { min_insync: 2, lag_time_max_ms: 10_000, rules: Rules::ALL }
}

/// A leader of replicas 1, 2, 3 (ISR all three) at epoch 5, over a log of `end` records, all
/// durable, that exposed `hw`.
fn leader(end: Offset, hw: Offset) -> ReplicaState {
    let mut replica = ReplicaState::new(L, config(), 0, end, end, EpochCache::new(vec![(e(1), 0)]), hw);
    let commands = replica.on(
        Event::BecomeLeader {
            epoch: e(5),
            partition_epoch: PartitionEpoch(1),
            replicas: vec![L, F2, F3],
            isr: vec![L, F2, F3],
        },
        0,
    );
    assert_eq!(commands, vec![Command::WriteEpochCheckpoint { epoch: e(5), start: end }]);
    replica
}

fn fetch(from: NodeId, fetch_offset: Offset, last: Option<u32>, durable: Offset) -> Event {
    Event::FollowerFetch {
        from,
        current_leader_epoch: e(5),
        fetch_offset,
        last_fetched_epoch: last.map(LeaderEpoch),
        durable,
    }
}

fn records(to: NodeId, from: Offset, end: Offset, hw: Offset) -> Command {
    Command::AnswerFetch { to, answer: FetchAnswer::Records { from, to: end, high_watermark: hw } }
}

#[test]
fn the_high_watermark_is_the_least_durable_offset_of_the_isr() {
    let mut replica = leader(0, 0);
    assert!(replica.on(Event::Appended { end: 10, epoch: e(5) }, 1).is_empty());
    assert!(replica.on(Event::Durable { offset: 10 }, 1).is_empty(), "the followers hold nothing yet");
    // Follower 2 has everything durable, follower 3 nothing: the HW waits for 3.
    assert_eq!(replica.on(fetch(F2, 10, Some(5), 10), 2), vec![records(F2, 10, 10, 0)]);
    assert_eq!(
        replica.on(fetch(F3, 10, Some(5), 4), 2),
        vec![records(F3, 10, 10, 4), Command::HighWatermark { offset: 4 }]
    );
    // Follower 3 fetched up to 10 but made only 4 durable: durable counts, not the log end.
    assert_eq!(replica.high_watermark(), 4);
    assert_eq!(
        replica.on(fetch(F3, 10, Some(5), 10), 3),
        vec![records(F3, 10, 10, 10), Command::HighWatermark { offset: 10 }]
    );
    // The leader's own durable offset bounds it too.
    replica.on(Event::Appended { end: 20, epoch: e(5) }, 4);
    replica.on(fetch(F2, 20, Some(5), 20), 4);
    replica.on(fetch(F3, 20, Some(5), 20), 4);
    assert_eq!(replica.high_watermark(), 10, "the leader has not made 10..20 durable");
    assert_eq!(replica.on(Event::Durable { offset: 20 }, 5), vec![Command::HighWatermark { offset: 20 }]);
}

#[test]
fn acks_all_resolve_when_the_high_watermark_passes_them() {
    let mut replica = leader(0, 0);
    replica.on(Event::Appended { end: 10, epoch: e(5) }, 1);
    replica.on(Event::Durable { offset: 10 }, 1);
    assert!(replica.on(Event::AwaitAck { id: 7, end: 10, deadline_ms: 1000 }, 1).is_empty());
    replica.on(fetch(F2, 10, Some(5), 10), 2);
    let commands = replica.on(fetch(F3, 10, Some(5), 10), 2);
    assert_eq!(commands[1..], [Command::HighWatermark { offset: 10 }, Command::AckResolved { id: 7 }]);
    // Already below the HW: resolved at once.
    assert_eq!(
        replica.on(Event::AwaitAck { id: 8, end: 9, deadline_ms: 1000 }, 3),
        vec![Command::AckResolved { id: 8 }]
    );
}

#[test]
fn below_min_insync_the_high_watermark_freezes_and_acks_all_is_refused() {
    let mut replica = leader(0, 0);
    replica.on(Event::Appended { end: 10, epoch: e(5) }, 1);
    replica.on(Event::Durable { offset: 10 }, 1);
    replica.on(Event::IsrCommitted { isr: vec![L], partition_epoch: PartitionEpoch(2) }, 1);
    assert_eq!(replica.check_acks_all(), Err(ReplicaError::NotEnoughReplicas));
    assert!(replica
        .on(fetch(F2, 10, Some(5), 10), 2)
        .iter()
        .all(|c| !matches!(c, Command::HighWatermark { .. })));
    assert_eq!(replica.high_watermark(), 0, "an ISR of one below min.insync.replicas 2 exposes nothing");
    // A produce appended before the shrink times out as NotEnoughReplicasAfterAppend.
    replica.on(Event::AwaitAck { id: 1, end: 10, deadline_ms: 50 }, 3);
    assert_eq!(
        replica.on(Event::Tick, 50),
        vec![Command::AckFailed { id: 1, error: ReplicaError::NotEnoughReplicasAfterAppend }]
    );
}

#[test]
fn a_new_leader_exposes_nothing_until_its_high_watermark_reaches_its_epoch_start() {
    // Became leader with 100 records of which only 90 were known replicated.
    let mut replica = leader(100, 90);
    assert_eq!(replica.readable_end(), Err(ReplicaError::OffsetNotAvailable));
    replica.on(fetch(F2, 100, Some(1), 100), 1);
    assert_eq!(replica.readable_end(), Err(ReplicaError::OffsetNotAvailable), "F3 has not caught up");
    replica.on(fetch(F3, 100, Some(1), 100), 1);
    assert_eq!(replica.readable_end(), Ok(100));
}

#[test]
fn fetches_with_another_leader_epoch_get_no_data() {
    let mut replica = leader(10, 0);
    let stale = Event::FollowerFetch {
        from: F2,
        current_leader_epoch: e(4),
        fetch_offset: 10,
        last_fetched_epoch: Some(e(1)),
        durable: 10,
    };
    let newer = Event::FollowerFetch {
        from: F2,
        current_leader_epoch: e(6),
        fetch_offset: 10,
        last_fetched_epoch: Some(e(1)),
        durable: 10,
    };
    assert_eq!(
        replica.on(stale, 1),
        vec![Command::AnswerFetch { to: F2, answer: FetchAnswer::Refused(ReplicaError::FencedLeaderEpoch) }]
    );
    assert_eq!(
        replica.on(newer, 1),
        vec![Command::AnswerFetch { to: F2, answer: FetchAnswer::Refused(ReplicaError::UnknownLeaderEpoch) }]
    );
    assert_eq!(replica.high_watermark(), 0, "a refused fetch counts for nothing");
}

/// KIP-101: a follower that wrote records of an epoch the leader never had learns where its log
/// parted and truncates there, never below its own high watermark.
#[test]
fn a_follower_that_diverged_truncates_where_the_leader_says() {
    // The leader: epoch 1 from 0, epoch 3 from 50, log end 80.
    let mut leading =
        ReplicaState::new(L, config(), 0, 80, 80, EpochCache::new(vec![(e(1), 0), (e(3), 50)]), 40);
    leading.on(
        Event::BecomeLeader {
            epoch: e(5),
            partition_epoch: PartitionEpoch(1),
            replicas: vec![L, F2, F3],
            isr: vec![L, F2, F3],
        },
        0,
    );
    // The follower: epoch 1 from 0, then epoch 2 (a leader that lost its records) from 40 to 60.
    let mut follower =
        ReplicaState::new(F2, config(), 0, 60, 60, EpochCache::new(vec![(e(1), 0), (e(2), 40)]), 30);
    assert_eq!(
        follower.on(Event::BecomeFollower { leader: L, epoch: e(5) }, 0),
        vec![Command::FetchFrom { leader: L, epoch: e(5) }]
    );
    let (epoch, offset, last, durable) = follower.next_fetch().unwrap();
    assert_eq!((epoch, offset, last, durable), (e(5), 60, Some(e(2)), 60));
    let answer = leading.on(
        Event::FollowerFetch {
            from: F2,
            current_leader_epoch: epoch,
            fetch_offset: offset,
            last_fetched_epoch: last,
            durable,
        },
        1,
    );
    // Epoch 2 is not in the leader's log: the epoch before it, 1, ends at 50 there.
    assert_eq!(
        answer,
        vec![Command::AnswerFetch { to: F2, answer: FetchAnswer::Diverging { epoch: e(1), end: 50 } }]
    );
    // The follower's epoch 1 ends at 40 (its epoch 2 began there): it truncates to min(50, 40).
    assert_eq!(
        follower.on(Event::Diverged { epoch: e(1), end: 50 }, 1),
        vec![Command::Truncate { offset: 40 }]
    );
    assert_eq!((follower.log_end(), follower.epochs().entries()), (40, &[(e(1), 0)][..]));
    // Its next fetch agrees with the leader: records from 40.
    let (epoch, offset, last, durable) = follower.next_fetch().unwrap();
    let answer = leading.on(
        Event::FollowerFetch {
            from: F2,
            current_leader_epoch: epoch,
            fetch_offset: offset,
            last_fetched_epoch: last,
            durable,
        },
        2,
    );
    assert_eq!(answer[0], records(F2, 40, 80, 40));
}

#[test]
fn a_follower_never_truncates_below_its_high_watermark() {
    let mut follower =
        ReplicaState::new(F2, config(), 0, 60, 60, EpochCache::new(vec![(e(1), 0), (e(2), 40)]), 55);
    follower.on(Event::BecomeFollower { leader: L, epoch: e(5) }, 0);
    assert_eq!(
        follower.on(Event::Diverged { epoch: e(1), end: 50 }, 1),
        vec![Command::Truncate { offset: 55 }]
    );
}

#[test]
fn a_follower_high_watermark_is_the_leaders_within_what_it_holds_durably() {
    let mut follower = ReplicaState::new(F2, config(), 0, 0, 0, EpochCache::default(), 0);
    follower.on(Event::BecomeFollower { leader: L, epoch: e(5) }, 0);
    follower.on(Event::Appended { end: 10, epoch: e(5) }, 1);
    assert_eq!(
        follower.on(Event::LeaderHighWatermark { high_watermark: 8 }, 1),
        vec![],
        "nothing durable yet"
    );
    assert_eq!(follower.on(Event::Durable { offset: 6 }, 1), vec![Command::HighWatermark { offset: 6 }]);
    assert_eq!(follower.on(Event::Durable { offset: 10 }, 1), vec![Command::HighWatermark { offset: 8 }]);
}

#[test]
fn a_lagging_follower_is_proposed_out_and_counted_until_the_change_commits() {
    let mut replica = leader(0, 0);
    replica.on(Event::Appended { end: 10, epoch: e(5) }, 1);
    replica.on(Event::Durable { offset: 10 }, 1);
    replica.on(fetch(F2, 10, Some(5), 10), 1);
    // Follower 3 never fetches: after the lag time it is proposed out, once.
    assert!(replica.on(Event::Tick, 10_000).is_empty(), "not lagging for longer than 10 s yet");
    let proposal =
        Command::ProposeIsr { isr: vec![L, F2], leader_epoch: e(5), partition_epoch: PartitionEpoch(1) };
    assert_eq!(replica.on(Event::Tick, 10_001), vec![proposal]);
    assert!(replica.on(Event::Tick, 10_002).is_empty(), "one change in flight");
    replica.on(fetch(F2, 10, Some(5), 10), 10_003);
    assert_eq!(replica.high_watermark(), 0, "F3 still counts: the leader never shrinks the ISR alone");
    let commands =
        replica.on(Event::IsrCommitted { isr: vec![L, F2], partition_epoch: PartitionEpoch(2) }, 10_004);
    assert_eq!(commands, vec![Command::HighWatermark { offset: 10 }]);
}

/// A leader at epoch 5 whose committed ISR is {L, F2} (partition epoch 2), with 10 records
/// durable on both: F3, out of the ISR, has not fetched them.
fn leader_with_f3_out() -> ReplicaState {
    let mut replica = leader(0, 0);
    replica.on(Event::IsrCommitted { isr: vec![L, F2], partition_epoch: PartitionEpoch(2) }, 0);
    replica.on(Event::Appended { end: 10, epoch: e(5) }, 1);
    replica.on(Event::Durable { offset: 10 }, 1);
    replica.on(fetch(F2, 10, Some(5), 10), 1);
    replica
}

#[test]
fn a_follower_that_caught_up_is_proposed_back_in() {
    let mut replica = leader_with_f3_out();
    assert_eq!(replica.high_watermark(), 10);
    // F3 is behind the HW: not yet.
    assert_eq!(replica.on(fetch(F3, 4, Some(5), 4), 2), vec![records(F3, 4, 10, 10)]);
    let commands = replica.on(fetch(F3, 10, Some(5), 10), 3);
    assert_eq!(
        commands,
        vec![
            records(F3, 10, 10, 10),
            Command::ProposeIsr {
                isr: vec![L, F2, F3],
                leader_epoch: e(5),
                partition_epoch: PartitionEpoch(2)
            },
        ]
    );
    assert!(!replica
        .on(fetch(F3, 10, Some(5), 10), 4)
        .iter()
        .any(|c| matches!(c, Command::ProposeIsr { .. })));
}

#[test]
fn leadership_lost_fails_waiting_acks_and_starts_fetching() {
    let mut replica = leader(0, 0);
    replica.on(Event::Appended { end: 10, epoch: e(5) }, 1);
    replica.on(Event::AwaitAck { id: 3, end: 10, deadline_ms: 100 }, 1);
    assert_eq!(
        replica.on(Event::BecomeFollower { leader: F2, epoch: e(6) }, 2),
        vec![
            Command::AckFailed { id: 3, error: ReplicaError::NotLeader },
            Command::FetchFrom { leader: F2, epoch: e(6) }
        ]
    );
    assert_eq!(replica.readable_end(), Err(ReplicaError::NotLeader));
    assert_eq!(
        replica.on(Event::AwaitAck { id: 4, end: 1, deadline_ms: 100 }, 2),
        vec![Command::AckFailed { id: 4, error: ReplicaError::NotLeader }]
    );
}

#[test]
fn a_refused_isr_proposal_can_be_made_again() {
    let mut replica = leader(0, 0);
    replica.on(fetch(F2, 0, Some(5), 0), 1);
    let proposal =
        Command::ProposeIsr { isr: vec![L, F2], leader_epoch: e(5), partition_epoch: PartitionEpoch(1) };
    assert_eq!(replica.on(Event::Tick, 10_001), vec![proposal.clone()]);
    assert!(replica.on(Event::Tick, 10_002).is_empty(), "one change in flight");
    // The controller refused it (say, a member's broker epoch was stale): the leader must not
    // wait forever for a commit that will not come.
    assert!(replica.on(Event::IsrRejected, 10_003).is_empty());
    replica.on(fetch(F2, 0, Some(5), 0), 10_004);
    assert_eq!(replica.on(Event::Tick, 10_005), vec![proposal]);
}

/// A refused expansion may still commit (a duplicate or a resend of it reaches the controller
/// once the member is eligible): the member keeps counting toward the high watermark until a
/// newer partition epoch commits, and the leader proposes its committed ISR to get one.
#[test]
fn a_refused_addition_counts_until_the_partition_epoch_moves_past_it() {
    let mut replica = leader_with_f3_out();
    let commands = replica.on(fetch(F3, 10, Some(5), 10), 2);
    let expand =
        Command::ProposeIsr { isr: vec![L, F2, F3], leader_epoch: e(5), partition_epoch: PartitionEpoch(2) };
    assert_eq!(commands, vec![records(F3, 10, 10, 10), expand]);
    // Refused (F3 was fenced when this copy arrived): the leader proposes its committed ISR
    // to move the partition epoch on.
    let seal =
        Command::ProposeIsr { isr: vec![L, F2], leader_epoch: e(5), partition_epoch: PartitionEpoch(2) };
    assert!(replica.on(Event::IsrRejected, 3).is_empty());
    assert_eq!(replica.on(Event::Tick, 3), vec![seal.clone()]);
    // F3 still counts: records F2 holds but F3 does not are not exposed yet.
    replica.on(Event::Appended { end: 20, epoch: e(5) }, 4);
    replica.on(Event::Durable { offset: 20 }, 4);
    replica.on(Event::AwaitAck { id: 1, end: 20, deadline_ms: 60_000 }, 4);
    assert_eq!(replica.on(fetch(F2, 20, Some(5), 20), 5), vec![records(F2, 20, 20, 10)]);
    assert_eq!(replica.high_watermark(), 10);
    // That proposal refused too (another member ineligible): tried again after a while, not
    // at once.
    assert!(replica.on(Event::IsrRejected, 6).is_empty());
    assert!(replica.on(Event::Tick, 6 + SEAL_RETRY_MS - 4).is_empty());
    assert_eq!(replica.on(Event::Tick, 6 + SEAL_RETRY_MS), vec![seal]);
    // A newer partition epoch without F3: no copy of the old proposal can commit now.
    let commands =
        replica.on(Event::IsrCommitted { isr: vec![L, F2], partition_epoch: PartitionEpoch(3) }, 200);
    assert_eq!(commands, vec![Command::HighWatermark { offset: 20 }, Command::AckResolved { id: 1 }]);
}

/// With the rule off, the refusal drops the member at once (the bug the simulator found).
#[test]
fn without_the_rule_a_refused_addition_stops_counting_at_once() {
    let rules = Rules { settle_refused_additions: false, ..Rules::ALL };
    let mut replica =
        ReplicaState::new(L, ReplicaConfig { rules, ..config() }, 0, 0, 0, EpochCache::default(), 0);
    let become_leader = Event::BecomeLeader {
        epoch: e(5),
        partition_epoch: PartitionEpoch(2),
        replicas: vec![L, F2, F3],
        isr: vec![L, F2],
    };
    replica.on(become_leader, 0);
    replica.on(Event::Appended { end: 10, epoch: e(5) }, 1);
    replica.on(Event::Durable { offset: 10 }, 1);
    replica.on(fetch(F3, 0, Some(5), 0), 1);
    replica.on(fetch(F2, 10, Some(5), 10), 2);
    replica.on(fetch(F3, 10, Some(5), 10), 2);
    assert!(replica.on(Event::IsrRejected, 3).is_empty(), "no proposal to move the epoch on");
    replica.on(Event::Appended { end: 20, epoch: e(5) }, 4);
    replica.on(Event::Durable { offset: 20 }, 4);
    replica.on(fetch(F2, 20, Some(5), 20), 5);
    assert_eq!(replica.high_watermark(), 20, "F3 no longer counts");
}

/// A follower that once led an epoch without writing a record has that epoch last in its
/// cache; the leader never had it, answers with the epoch before, and the follower must drop
/// the empty epoch so that its next fetch agrees (instead of diverging again forever).
#[test]
fn an_empty_epoch_of_the_follower_is_dropped_when_the_fetch_diverges() {
    let mut follower =
        ReplicaState::new(F2, config(), 0, 50, 50, EpochCache::new(vec![(e(1), 0), (e(3), 50)]), 40);
    follower.on(Event::BecomeFollower { leader: L, epoch: e(5) }, 0);
    assert_eq!(follower.next_fetch().map(|f| f.2), Some(Some(e(3))));
    // The leader: epoch 1 from 0, epoch 4 from 60; epoch 3 it never had: epoch 1 ends at 60.
    assert!(follower.on(Event::Diverged { epoch: e(1), end: 60 }, 1).is_empty(), "nothing to truncate");
    assert_eq!(follower.epochs().entries(), [(e(1), 0)]);
    assert_eq!(follower.next_fetch().map(|f| (f.1, f.2)), Some((50, Some(e(1)))));
}

/// A leader whose partition goes offline (metadata: no leader at a newer epoch) steps down:
/// it fails what waits and exposes nothing more (found by the simulator: a paused leader that
/// resumed into an offline partition went on exposing its old high watermark).
#[test]
fn a_leader_steps_down_when_its_partition_goes_offline() {
    let mut replica = leader(0, 0);
    replica.on(Event::Appended { end: 10, epoch: e(5) }, 1);
    replica.on(Event::AwaitAck { id: 1, end: 10, deadline_ms: 100 }, 1);
    assert_eq!(
        replica.on(Event::Offline { epoch: e(6) }, 2),
        vec![Command::AckFailed { id: 1, error: ReplicaError::NotLeader }]
    );
    assert_eq!(replica.readable_end(), Err(ReplicaError::NotLeader));
    assert!(replica
        .on(fetch(F2, 10, Some(5), 10), 3)
        .iter()
        .all(|c| !matches!(c, Command::HighWatermark { .. })));
}
