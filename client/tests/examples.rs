//! Every program in `examples/` runs against a real broker and does what it says (cargo builds
//! the examples before it runs the tests; they sit next to this test's binary).

mod embedded;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let path = deps.parent().unwrap().join("examples").join(name);
    assert!(path.exists(), "{} is not built (cargo test builds the examples)", path.display());
    path
}

/// Runs an example with `args` against `bootstrap`: its stdout, or a panic with its stderr.
fn run(bootstrap: &str, name: &str, args: &[&str]) -> String {
    let mut child = Command::new(example(name))
        .args(args)
        .env("SKEIN_BOOTSTRAP", bootstrap)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("example {name} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "example {name} failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn every_example_runs_against_a_real_broker() {
    let broker = embedded::Embedded::start();
    let addr = broker.addr();

    let out = run(&addr, "producer", &["orders", "12"]);
    assert_eq!(out.lines().filter(|l| l.starts_with("partition ")).count(), 12, "{out}");

    let out = run(&addr, "consumer", &["orders"]);
    let values: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    assert_eq!(values.len(), 12, "{out}");
    for i in 0..12 {
        assert!(values.contains(&format!("order-{i}").as_str()), "order-{i} in {out}");
    }

    let out = run(&addr, "group_consumer", &["orders", "billing", "12"]);
    assert_eq!(out.lines().count(), 12, "{out}");

    let out = run(&addr, "idempotent_producer", &["payments", "20"]);
    assert!(out.lines().next().unwrap().starts_with("producer id "), "{out}");
    let offsets: Vec<u64> =
        out.lines().filter_map(|l| l.strip_prefix("offset ")).map(|o| o.parse().unwrap()).collect();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>());

    let out = run(&addr, "admin", &["scratch"]);
    assert!(out.contains("topic scratch has 4 partitions"), "{out}");
    assert!(out.contains("retention.ms = 3600000"), "{out}");
    assert!(out.contains("group billing (empty, 0 members)"), "{out}");
    assert!(out.trim_end().ends_with("deleted scratch"), "{out}");
}
