//! The harness end to end: an embedded broker, a short run, the JSON and the chart.

use std::process::Command;

fn bench(args: &[&str]) -> (bool, String, String) {
    let output =
        Command::new(env!("CARGO_BIN_EXE_skein-bench")).args(args).output().expect("skein-bench runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn work_dir() -> tempfile::TempDir {
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&root).unwrap();
    tempfile::tempdir_in(root).unwrap()
}

#[test]
fn produce_consume_and_e2e_runs_report_their_figures() {
    let dir = work_dir();
    let data = dir.path().to_str().unwrap().to_owned();
    for mode in ["produce", "consume", "e2e"] {
        let json = dir.path().join(format!("{mode}.json"));
        let chart = dir.path().join(format!("{mode}.svg"));
        let mut args = vec![
            mode,
            "--embedded",
            "--cores",
            "2",
            "--data-dir",
            &data,
            "--messages",
            "20000",
            "--message-size",
            "256",
            "--warmup",
            "0",
            "--quiet",
        ];
        let json_arg = json.to_str().unwrap().to_owned();
        let chart_arg = chart.to_str().unwrap().to_owned();
        args.extend(["--json", &json_arg, "--chart", &chart_arg]);
        if mode == "e2e" {
            args.extend(["--rate", "20000"]);
        }
        let (ok, out, err) = bench(&args);
        assert!(ok, "{mode}: {err}");
        assert!(out.contains("records/s"), "{mode}: {out}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["mode"], mode);
        assert!(report["records"].as_u64().unwrap() >= 20000, "{mode}: {report}");
        assert!(report["records_per_s"].as_f64().unwrap() > 0.0);
        assert!(report["mib_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(report["broker"]["fsync"], "never");
        assert_eq!(report["parameters"]["message_size"], 256);
        assert_eq!(report["errors"], 0);
        if mode != "consume" {
            let latency = &report["latency_us"];
            for key in ["p50", "p90", "p99", "p999", "p9999", "max"] {
                assert!(latency[key].as_u64().is_some(), "{mode}: latency {key}");
            }
            assert!(latency["p50"].as_u64() <= latency["p99"].as_u64());
        }
        if mode == "e2e" {
            assert!(report["e2e_latency_us"]["count"].as_u64().unwrap() > 0);
        }
        let svg = std::fs::read_to_string(&chart).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{mode}: chart");
        // The embedded broker's data went away.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("skein-bench-"))
            .collect();
        assert!(leftovers.is_empty(), "{mode}: data directory left behind");
    }
}

#[test]
fn bad_arguments_are_refused_with_one_line() {
    let (ok, _, err) = bench(&["produce", "--embedded"]);
    assert!(!ok);
    assert!(err.contains("--messages N or --duration"), "{err}");
    let (ok, _, err) = bench(&["produce", "--messages", "1", "--transport", "quic"]);
    assert!(!ok);
    assert!(err.contains("needs --quic-ca-file"), "{err}");
    let (ok, _, err) = bench(&["produce", "--messages", "1", "--transport", "pigeon"]);
    assert!(!ok);
    assert!(err.contains("tcp or quic"), "{err}");
}

#[test]
fn produce_runs_over_quic_and_the_quic_gate_reports_both_runtimes() {
    let dir = work_dir();
    let data = dir.path().to_str().unwrap().to_owned();
    let json = dir.path().join("quic.json");
    let json_arg = json.to_str().unwrap().to_owned();
    let (ok, out, err) = bench(&[
        "produce",
        "--embedded",
        "--cores",
        "2",
        "--data-dir",
        &data,
        "--messages",
        "20000",
        "--message-size",
        "256",
        "--transport",
        "quic",
        "--warmup",
        "0",
        "--quiet",
        "--json",
        &json_arg,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("records/s"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["errors"], 0);
    assert!(report["records"].as_u64().unwrap() >= 20000, "{report}");
    assert_eq!(report["parameters"]["transport"], "quic");

    let bulk = dir.path().join("bulk.json");
    let bulk_arg = bulk.to_str().unwrap().to_owned();
    let (ok, out, err) = bench(&["quic-bulk", "--quic-mib", "16", "--rounds", "1", "--json", &bulk_arg]);
    assert!(ok, "{err}");
    assert!(out.contains("gate"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&bulk).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "one round per runtime");
    for round in rounds {
        assert_eq!(round["bytes"], 16 << 20, "every byte arrived: {round}");
    }
    assert!(
        report["glommio_mib_per_s"].as_f64().unwrap() > 0.0
            && report["tokio_mib_per_s"].as_f64().unwrap() > 0.0
    );
}

#[test]
fn ceiling_runs_every_path_and_leaves_no_file_behind() {
    let dir = work_dir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let json = dir.path().join("ceiling.json");
    let json_arg = json.to_str().unwrap().to_owned();
    let (ok, out, err) = bench(&[
        "ceiling",
        "--quic-mib",
        "8",
        "--rounds",
        "1",
        "--data-dir",
        data.to_str().unwrap(),
        "--json",
        &json_arg,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("tcp into O_DIRECT"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    let paths: Vec<&str> = rounds.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["disk", "tcp", "tcp_disk", "quic", "quic_disk", "read", "tcp_out", "read_tcp"]);
    for round in rounds {
        assert_eq!(round["bytes"], 8 << 20, "every byte arrived: {round}");
        assert!(round["mib_per_s"].as_f64().unwrap() > 0.0, "{round}");
    }
    for median in ["disk", "tcp", "tcp_disk", "quic", "quic_disk", "read", "tcp_out", "read_tcp"] {
        assert!(report[format!("{median}_mib_per_s")].as_f64().unwrap() > 0.0, "{median}: {report}");
    }
    // What is left is the executor's priming file (see skein_storage::prime_executor).
    let left: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|name| name == ".skein-prime"), "the rounds removed their files: {left:?}");

    // Less free space than a round writes: refused before anything is written.
    let (ok, _, err) = bench(&["ceiling", "--quic-mib", "100000000", "--data-dir", data.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("MiB free"), "{err}");
}
