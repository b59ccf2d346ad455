//! `skein-sim`: runs the replication simulator over many seeds and reports what broke.
//!
//! ```text
//! skein-sim [--seeds N] [--seed S] [--steps K] [--without-rule RULE]
//! ```
//! `SKEIN_SIM_TRACE=1` prints every metadata notification and high-watermark move of the run
//! on stderr (use it with `--seed`). `--without-rule` switches one rule of the replica off (`durable-counts`,
//! `freeze-below-min-isr`, `no-truncation-below-hw`, `truncate-by-epoch`, `own-epoch-end`,
//! `isr-via-controller`, `reads-below-hw`, `settle-refused-additions`) or of the shells (`wait-for-own-registration`, `retry-ambiguous-isr`,
//! `active-controller-only`, `persist-before-send`, `deduplicate-retries`, `cut-torn-tail`,
//! `stop-on-fsync-error`, `ignore-stale-answers`) to see what the seeds then find.
//! `--seeds N` runs seeds 1..=N (default 200); `--seed S` runs that one seed only (to replay a
//! failure); `--steps K` ticks of 10 ms with faults per run (default 3000). Each failing seed is
//! printed with its broken invariants (the first few, with the simulated time) and a short trace
//! (the last notable events before the first: crashes, restarts, pauses, cuts, heals, new
//! controller and partition leaders; `--seed S` with `SKEIN_SIM_TRACE=1` for all); the last line
//! is `N seeds, S steps, F faults, C checks, V violations`. Exits 1 on any violation or on a
//! run that exercised nothing (no record acknowledged, no fault, no failover).

use skein_replication::partition::Rules;
use skein_replication::sim::{run, ShellRules, SimConfig, SimReport};

fn main() {
    let mut seeds: Vec<u64> = (1..=200).collect();
    let mut steps = 3_000u64;
    let mut rules = Rules::ALL;
    let mut shell = ShellRules::ALL;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || -> u64 {
            let raw = args.next().unwrap_or_else(|| fail(&format!("{flag} needs a number")));
            raw.parse().unwrap_or_else(|_| fail(&format!("{flag}: {raw:?} is not a number")))
        };
        match flag.as_str() {
            "--seeds" => seeds = (1..=value()).collect(),
            "--seed" => seeds = vec![value()],
            "--steps" => steps = value(),
            "--without-rule" => match args.next().as_deref() {
                Some("durable-counts") => rules.durable_counts = false,
                Some("freeze-below-min-isr") => rules.freeze_below_min_isr = false,
                Some("no-truncation-below-hw") => rules.no_truncation_below_hw = false,
                Some("truncate-by-epoch") => rules.truncate_by_epoch = false,
                Some("own-epoch-end") => rules.own_epoch_end = false,
                Some("isr-via-controller") => rules.isr_via_controller = false,
                Some("reads-below-hw") => rules.reads_below_hw = false,
                Some("settle-refused-additions") => rules.settle_refused_additions = false,
                Some("wait-for-own-registration") => shell.wait_for_own_registration = false,
                Some("retry-ambiguous-isr") => shell.retry_ambiguous_isr = false,
                Some("active-controller-only") => shell.active_controller_only = false,
                Some("persist-before-send") => shell.persist_before_send = false,
                Some("deduplicate-retries") => shell.deduplicate_retries = false,
                Some("cut-torn-tail") => shell.cut_torn_tail = false,
                Some("stop-on-fsync-error") => shell.stop_on_fsync_error = false,
                Some("ignore-stale-answers") => shell.ignore_stale_answers = false,
                other => fail(&format!("--without-rule: unknown rule {other:?}")),
            },
            "-h" | "--help" => {
                println!("skein-sim [--seeds N] [--seed S] [--steps K] [--without-rule RULE]");
                return;
            }
            other => fail(&format!("unknown argument {other:?} (try --help)")),
        }
    }
    let (mut total, mut violations, mut idle) = (SimReport::default(), 0usize, 0usize);
    for &seed in &seeds {
        let report = run(SimConfig { seed, steps, rules, shell });
        total.add_counts(&report);
        violations += report.violations.len();
        if !report.violations.is_empty() {
            println!("seed {seed}: {} violations", report.violations.len());
            for line in report.violations.iter().take(3) {
                println!("  {line}");
            }
            println!("  before the first, the last {} notable events:", report.trace.len());
            for line in &report.trace {
                println!("    {line}");
            }
        }
        if !report.exercised() {
            idle += 1;
            println!(
                "seed {seed}: exercised nothing (acked {}, faults {}, partition leaderships {}, controller leaders {})",
                report.acked, report.faults, report.leader_changes, report.controller_leaders
            );
        }
    }
    let t = &total;
    println!(
        "acknowledged {} (retries answered as duplicates {}), consumed {}, partition leaderships {}, controller leaders {}, metadata batches {}, truncations {}, torn writes {}, fsync errors {}",
        t.acked, t.duplicates, t.consumed, t.leader_changes, t.controller_leaders, t.metadata_batches, t.truncations, t.torn_writes, t.fsync_errors
    );
    println!(
        "{} seeds, {} steps, {} faults, {} checks, {violations} violations",
        seeds.len(),
        t.steps,
        t.faults,
        t.checks
    );
    if violations > 0 || idle > 0 {
        std::process::exit(1);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("skein-sim: {message}");
    std::process::exit(2);
}
