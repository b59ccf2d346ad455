//! The `skein` command line against a real broker.

mod common;

use std::time::{Duration, Instant};

use common::{cli, Broker};

#[test]
fn topics_produce_and_consume_from_the_command_line() {
    let broker = Broker::start(&[]);
    let (ok, out, err) = cli(
        &broker,
        &["topic", "create", "clicks", "--partitions", "3", "--config", "retention.ms=3600000"],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "created topic clicks with 3 partitions");
    let (ok, out, _) = cli(&broker, &["topic", "list"], "");
    assert!(ok);
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["clicks"]);

    // Keyed records with a report of where each went.
    let input: String = (0..30).map(|i| format!("user{}|click-{i}\n", i % 4)).collect();
    let (ok, out, err) = cli(&broker, &["produce", "clicks", "--key-separator", "|", "--report"], &input);
    assert!(ok, "{err}");
    let reports: Vec<(u32, u64)> = out
        .lines()
        .map(|line| {
            let (p, o) = line.split_once(' ').unwrap();
            (p.parse().unwrap(), o.parse().unwrap())
        })
        .collect();
    assert_eq!(reports.len(), 30);
    let mut unique = reports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 30, "every record has its own (partition, offset)");

    let (ok, out, _) = cli(&broker, &["topic", "describe", "clicks"], "");
    assert!(ok);
    assert!(out.starts_with("topic clicks partitions 3 retention.ms=3600000"), "{out}");
    let total: u64 =
        out.lines().skip(1).map(|line| line.split_whitespace().last().unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(total, 30);

    // Everything, as values; then the full format for one partition.
    let (ok, out, err) =
        cli(&broker, &["consume", "clicks", "--max-messages", "30", "--timeout-ms", "5000"], "");
    assert!(ok, "{err}");
    let mut values: Vec<&str> = out.lines().collect();
    values.sort_unstable();
    let mut expected: Vec<String> = (0..30).map(|i| format!("click-{i}")).collect();
    expected.sort_unstable();
    assert_eq!(values, expected);

    let (partition, _) = reports[0];
    let (ok, out, _) = cli(
        &broker,
        &[
            "consume",
            "clicks",
            "--partition",
            &partition.to_string(),
            "--format",
            "full",
            "--timeout-ms",
            "1000",
        ],
        "",
    );
    assert!(ok);
    for line in out.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 5, "{line}");
        assert_eq!(fields[0], partition.to_string());
        let value_index: u32 = fields[4].trim_start_matches("click-").parse().unwrap();
        assert_eq!(fields[3], format!("user{}", value_index % 4), "same key as produced");
    }

    // From an offset, from a timestamp, from the end.
    let (ok, out, _) = cli(
        &broker,
        &[
            "consume",
            "clicks",
            "--partition",
            &partition.to_string(),
            "--from",
            "1",
            "--format",
            "full",
            "--timeout-ms",
            "1000",
        ],
        "",
    );
    assert!(ok);
    assert!(out.lines().all(|l| l.split('\t').nth(1).unwrap().parse::<u64>().unwrap() >= 1));
    let (ok, out, _) = cli(
        &broker,
        &["consume", "clicks", "--from", "time:1", "--max-messages", "30", "--timeout-ms", "3000"],
        "",
    );
    assert!(ok);
    assert_eq!(out.lines().count(), 30);
    let started = Instant::now();
    let (ok, out, _) = cli(&broker, &["consume", "clicks", "--from", "end", "--timeout-ms", "700"], "");
    assert!(ok);
    assert!(out.is_empty());
    assert!(started.elapsed() < Duration::from_secs(20));

    // acks=0 works and reports no offsets.
    let (ok, out, err) =
        cli(&broker, &["produce", "clicks", "--acks", "0", "--report", "--partition", "2"], "a\nb\n");
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["2 -", "2 -"]);

    let (ok, out, _) = cli(&broker, &["topic", "delete", "clicks"], "");
    assert!(ok);
    assert_eq!(out.trim(), "deleted topic clicks");
    let (ok, out, _) = cli(&broker, &["topic", "list"], "");
    assert!(ok && out.is_empty());
}

#[test]
fn errors_print_one_line_and_exit_non_zero() {
    let broker = Broker::start(&[]);
    for args in [
        vec!["consume", "nope", "--timeout-ms", "100"],
        vec!["topic", "describe", "nope"],
        vec!["topic", "delete", "nope"],
        vec!["topic", "create", "bad/name", "--partitions", "1"],
        vec!["produce", "nope"],
    ] {
        let (ok, out, err) = cli(&broker, &args, "x\n");
        assert!(!ok, "{args:?} must fail");
        assert!(out.is_empty(), "{args:?}: {out}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one clear line, got {err:?}");
        assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
    }
    // Nothing listening.
    let mut gone = Broker::start(&[]);
    gone.kill();
    let (ok, _, err) = cli(&gone, &["topic", "list"], "");
    assert!(!ok);
    assert!(err.starts_with("error: cannot connect to"), "{err}");
}

/// `skein --version` names the release and the commit it was built from.
#[test]
fn version_names_the_release_and_the_commit() {
    let output = common::skein().arg("--version").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.starts_with(&format!("skein {} (commit ", env!("CARGO_PKG_VERSION"))), "{text}");
    let head = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output();
    if let Some(head) = head.ok().filter(|h| h.status.success()) {
        let head = String::from_utf8(head.stdout).unwrap();
        assert!(text.contains(head.trim()), "{text} names HEAD {head}");
    } else {
        assert!(text.contains("(commit unknown)"), "outside a git checkout: {text}");
    }
}
