//! Seeds under faults with every rule on must find nothing; with one rule switched off, the
//! seeds must find the bug it prevents.

use super::*;

fn seeds(count: u64, rules: Rules) -> (Vec<(u64, SimReport)>, u64) {
    let mut exercised = 0;
    let reports = (1..=count)
        .map(|seed| {
            let report = run(SimConfig { seed, steps: 3_000, rules, shell: ShellRules::ALL });
            exercised += u64::from(report.exercised());
            (seed, report)
        })
        .collect();
    (reports, exercised)
}

#[test]
fn two_hundred_seeds_under_faults_break_no_invariant() {
    let (reports, exercised) = seeds(200, Rules::ALL);
    let failing: Vec<String> = reports
        .iter()
        .filter(|(_, r)| !r.violations.is_empty())
        .map(|(seed, r)| format!("seed {seed}: {:?}", r.violations))
        .collect();
    assert!(failing.is_empty(), "{} seeds failed:\n{}", failing.len(), failing.join("\n"));
    // Vacuity gate: most runs must have acknowledged records, injected faults and failed over.
    assert_eq!(exercised, 200, "every run must acknowledge records, inject faults and fail over");
    let mut total = SimReport::default();
    for (_, report) in &reports {
        total.add_counts(report);
    }
    assert!(total.truncations > 0, "no run made a follower truncate: divergence was never exercised");
    // The consensus shard was exercised too: every run failed its controller over (the
    // vacuity gate above) and committed metadata batches that brokers pulled.
    assert!(total.metadata_batches > 200 * 20, "{} metadata batches in 200 runs", total.metadata_batches);
    // Idempotent retries found their batch at a leader (I11 was exercised).
    assert!(total.duplicates > 0, "no retried batch was answered as a duplicate");
    // Crashes cut writes in the middle, and recovery met torn batches.
    assert!(total.torn_writes > 0, "no crash left a torn write");
    assert!(total.fsync_errors > 0, "no fsync failed");
}

#[test]
fn one_seed_replays_bit_for_bit() {
    let a = run(SimConfig::new(42));
    let b = run(SimConfig::new(42));
    assert_eq!(a, b);
    assert!(a.exercised());
}

#[test]
fn counting_fetched_instead_of_durable_offsets_loses_acknowledged_records() {
    let rules = Rules { durable_counts: false, ..Rules::ALL };
    let (reports, _) = seeds(50, rules);
    let broken = reports.iter().filter(|(_, r)| r.violations.iter().any(|v| v.contains("I1"))).count();
    assert!(broken > 0, "no seed found the loss the durable-offset rule prevents");
    // Each failing run says what happened before its first violation.
    for (seed, report) in reports.iter().filter(|(_, r)| !r.violations.is_empty()) {
        assert!(!report.trace.is_empty(), "seed {seed} failed without a trace");
        assert!(report.trace.len() <= TRACE_EVENTS);
    }
}

/// How many of seeds `1..=count` break an invariant under `rules`.
fn failing_seeds(count: u64, rules: Rules) -> usize {
    seeds(count, rules).0.iter().filter(|(_, r)| !r.violations.is_empty()).count()
}

#[test]
fn letting_the_high_watermark_move_below_min_isr_loses_acknowledged_records() {
    let rules = Rules { freeze_below_min_isr: false, ..Rules::ALL };
    assert!(failing_seeds(200, rules) > 0, "no seed found the loss the min-ISR rule prevents");
}

#[test]
fn truncating_to_the_high_watermark_instead_of_by_epoch_breaks_invariants() {
    let rules = Rules { truncate_by_epoch: false, ..Rules::ALL };
    assert!(failing_seeds(100, rules) > 0, "no seed found what the KIP-101 rule prevents");
}

#[test]
fn consumers_that_read_above_the_high_watermark_see_records_a_failover_takes_back() {
    let rules = Rules { reads_below_hw: false, ..Rules::ALL };
    let (reports, _) = seeds(50, rules);
    let lost = |r: &SimReport| r.violations.iter().any(|v| v.contains(" read at "));
    assert!(reports.iter().any(|(_, r)| lost(r)), "no seed found a read of a record that was lost");
}

/// How many of seeds `1..=count` break one of `invariants` with these shell rules.
fn seeds_breaking(count: u64, shell: ShellRules, invariants: &[&str]) -> usize {
    (1..=count).filter(|&seed| breaks(seed, Rules::ALL, shell, invariants)).count()
}

/// Whether `seed` run under these rules breaks one of `invariants`.
fn breaks(seed: u64, rules: Rules, shell: ShellRules, invariants: &[&str]) -> bool {
    let report = run(SimConfig { seed, steps: 3_000, rules, shell });
    report.violations.iter().any(|v| invariants.iter().any(|i| v.contains(&format!(" {i}:"))))
}

/// Whether some seed of `1..=max` breaks one of `invariants` (stops at the first: for rules
/// whose bug needs a rare interleaving).
fn some_seed_breaks(max: u64, rules: Rules, shell: ShellRules, invariants: &[&str]) -> bool {
    (1..=max).any(|seed| breaks(seed, rules, shell, invariants))
}

#[test]
fn a_restarted_broker_that_acts_on_metadata_before_its_own_registration_loses_records() {
    let shell = ShellRules { wait_for_own_registration: false, ..ShellRules::ALL };
    assert!(seeds_breaking(20, shell, &["I1", "I3"]) > 0, "no seed found the stale leadership");
}

/// An unanswered proposal taken for refused drops a member the controller may yet add. Since
/// a refused addition keeps counting until the partition epoch moves on (the replica rule
/// `settle_refused_additions`), that rule covers this one too (0 of 1000 seeds break with only
/// `retry-ambiguous-isr` off): both off, the early acknowledgement is found again.
#[test]
fn a_leader_that_takes_an_unanswered_isr_proposal_for_refused_acknowledges_too_early() {
    let shell = ShellRules { retry_ambiguous_isr: false, ..ShellRules::ALL };
    let rules = Rules { settle_refused_additions: false, ..Rules::ALL };
    assert!(some_seed_breaks(1000, rules, shell, &["I1"]), "no seed found the early acknowledgement");
}

#[test]
fn a_controller_that_decides_before_its_first_entry_is_applied_commits_invalid_changes() {
    let shell = ShellRules { active_controller_only: false, ..ShellRules::ALL };
    assert!(seeds_breaking(20, shell, &["records", "I9", "I10"]) > 0, "no seed found a stale decision");
}

#[test]
fn raft_messages_sent_before_their_vote_or_entries_are_durable_are_caught() {
    let shell = ShellRules { persist_before_send: false, ..ShellRules::ALL };
    assert!(seeds_breaking(10, shell, &["Raft persistence"]) > 0, "the persistence check never fired");
}

#[test]
fn a_leader_that_appends_retried_batches_again_writes_duplicates() {
    let shell = ShellRules { deduplicate_retries: false, ..ShellRules::ALL };
    assert!(seeds_breaking(20, shell, &["I11"]) > 0, "no seed found a duplicate");
}

#[test]
fn a_recovery_that_keeps_a_torn_write_serves_garbage() {
    let shell = ShellRules { cut_torn_tail: false, ..ShellRules::ALL };
    assert!(seeds_breaking(20, shell, &["I3", "I11"]) > 0, "no seed found the torn record");
}

#[test]
fn a_broker_that_retries_a_failed_fsync_loses_what_it_called_durable() {
    let shell = ShellRules { stop_on_fsync_error: false, ..ShellRules::ALL };
    assert!(some_seed_breaks(1000, Rules::ALL, shell, &["I1"]), "no seed lost a record after an fsync error");
}

/// The run where the simulator found it (1 seed in 10000): a divergence answer duplicated past
/// the follower's next fetch cut a record it had fetched since, and the leader had counted it.
/// If a change to the simulator moves the runs and this seed no longer shows it, find another
/// with `skein-sim --seeds 10000 --without-rule ignore-stale-answers`.
#[test]
fn a_stale_divergence_answer_cuts_an_acknowledged_record() {
    let config = |shell| SimConfig { seed: 8725, steps: 3_000, rules: Rules::ALL, shell };
    let off = run(config(ShellRules { ignore_stale_answers: false, ..ShellRules::ALL }));
    assert!(off.violations.iter().any(|v| v.contains(" I1:")), "{:?}", off.violations);
    let on = run(config(ShellRules::ALL));
    assert!(on.violations.is_empty(), "{:?}", on.violations);
}
