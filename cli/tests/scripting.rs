//! The `skein` command as kcat and rpk users script it: output templates and JSON, headers,
//! fixed keys, delimiters, files and binary input, `--from -N`, `--exit`, relative times,
//! several topics, short flags, completions, and a group member that leaves on SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::{cli, cli_bytes, skein, Background, Broker};
use skein_client::Admin;

fn create(broker: &Broker, topic: &str, partitions: &str) {
    let (ok, _, err) = cli(broker, &["topic", "create", topic, "--partitions", partitions], "");
    assert!(ok, "{err}");
}

#[test]
fn templates_json_headers_and_keys_round_trip() {
    let broker = Broker::start(&[]);
    create(&broker, "orders", "1");
    let (ok, _, err) = cli(
        &broker,
        &["produce", "-t", "orders", "-K", ":", "-H", "source=cli", "-H", "trace=a=b"],
        "alice:order-1\nbob:order-2\n",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&broker, &["produce", "orders", "-k", "fixed"], "order-3\n");
    assert!(ok, "{err}");

    let (ok, out, err) =
        cli(&broker, &["consume", "orders", "-e", "-f", r"%t|%p|%o|%k|%v|%h|%K|%S|%%\n"], "");
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "orders|0|0|alice|order-1|source=cli,trace=a=b|5|7|%",
            "orders|0|1|bob|order-2|source=cli,trace=a=b|3|7|%",
            "orders|0|2|fixed|order-3||5|7|%",
        ]
    );
    // %T is the record's timestamp: within the last minute.
    let (ok, out, _) = cli(&broker, &["consume", "orders", "-e", "-c", "1", "-f", r"%T\n"], "");
    assert!(ok);
    let timestamp: i64 = out.trim().parse().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!((now - 60_000..=now).contains(&timestamp), "{timestamp} vs {now}");

    let (ok, out, err) = cli(&broker, &["consume", "orders", "-e", "-f", "json"], "");
    assert!(ok, "{err}");
    let objects: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 3);
    let first = &objects[0];
    assert_eq!(first["topic"], "orders");
    assert_eq!(first["partition"], 0);
    assert_eq!(first["offset"], 0);
    assert!(first["timestamp"].as_i64().unwrap() > 0);
    assert_eq!(first["key"], "alice");
    assert_eq!(first["value"], "order-1");
    assert_eq!(
        first["headers"],
        serde_json::json!([{"key": "source", "value": "cli"}, {"key": "trace", "value": "a=b"}])
    );
    assert_eq!(objects[2]["headers"], serde_json::json!([]));
}

#[test]
fn binary_input_by_delimiter_and_by_file_comes_back_byte_for_byte() {
    let broker = Broker::start(&[]);
    create(&broker, "blobs", "1");
    // NUL-delimited records holding bytes that are not UTF-8 (and newlines).
    let records: [&[u8]; 3] = [&[0xff, 0xfe, b'\n', 0x80], b"plain", &[0x00u8.wrapping_add(1), 0xc3]];
    let mut input = Vec::new();
    for record in records {
        input.extend_from_slice(record);
        input.push(0);
    }
    let (ok, _, err) = cli_bytes(&broker, &["produce", "blobs", "-D", r"\0"], &input);
    assert!(ok, "{err}");
    // One record per file.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = dir.path().join("image.bin");
    let image: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    std::fs::write(&file, &image).unwrap();
    let (ok, _, err) =
        cli(&broker, &["produce", "blobs", "--file", file.to_str().unwrap(), "-k", "image"], "");
    assert!(ok, "{err}");

    // Values come back as their bytes, each followed by the template's delimiter.
    let (ok, out, err) = cli_bytes(&broker, &["consume", "blobs", "-e", "-c", "3", "-f", r"%v\0"], b"");
    assert!(ok, "{err}");
    assert_eq!(out, input, "byte for byte");
    // JSON: base64 for bytes that are not UTF-8, and says so; hex on request.
    let (ok, out, _) = cli(&broker, &["consume", "blobs", "-e", "-f", "json"], "");
    assert!(ok);
    let objects: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects[0]["value"], "//4KgA==");
    assert_eq!(objects[0]["value_encoding"], "base64");
    assert_eq!(objects[1]["value"], "plain");
    assert!(objects[1].get("value_encoding").is_none());
    assert_eq!(objects[3]["key"], "image");
    let (ok, out, _) =
        cli(&broker, &["consume", "blobs", "-e", "-f", "json", "--encoding", "hex", "-c", "1"], "");
    assert!(ok);
    let object: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(object["value"], "fffe0a80");
    let (ok, out, _) = cli_bytes(&broker, &["consume", "blobs", "-o", "3", "-e", "-f", "%v"], b"");
    assert!(ok);
    assert_eq!(out, image, "a file's bytes are one record");
}

#[test]
fn from_the_last_n_at_times_and_exit_at_the_end_across_topics() {
    let broker = Broker::start(&[]);
    create(&broker, "a", "2");
    create(&broker, "b", "1");
    let input: String = (0..20).map(|i| format!("a{i}\n")).collect();
    assert!(cli(&broker, &["produce", "a"], &input).0);
    assert!(cli(&broker, &["produce", "b"], "b0\nb1\nb2\n").0);

    // --exit: stops at the end (no --timeout-ms), with everything read.
    let started = Instant::now();
    let (ok, out, err) = cli(&broker, &["consume", "a", "b", "-e", "-f", r"%t %v\n"], "");
    assert!(ok, "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(out.lines().filter(|l| l.starts_with("a ")).count(), 20);
    assert_eq!(out.lines().filter(|l| l.starts_with("b ")).count(), 3);
    // -t twice is the same as two names.
    let (ok, out, _) = cli(&broker, &["consume", "-t", "a", "-t", "b", "-e"], "");
    assert!(ok);
    assert_eq!(out.lines().count(), 23);
    // An empty topic exits at once too.
    create(&broker, "empty", "3");
    let (ok, out, err) = cli(&broker, &["consume", "empty", "-e"], "");
    assert!(ok && out.is_empty(), "{err}");

    // -N: the last N records of each partition (fewer where a partition holds fewer).
    let (ok, out, err) = cli(&broker, &["consume", "a", "b", "-o", "-2", "-e", "-f", r"%t/%p %o\n"], "");
    assert!(ok, "{err}");
    let admin_ends = |topic: &str| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let admin = Admin::new(broker.client().await);
            admin
                .describe_topic(topic)
                .await
                .unwrap()
                .partitions
                .iter()
                .map(|p| p.end_offset)
                .collect::<Vec<_>>()
        })
    };
    let mut expected: Vec<String> = Vec::new();
    for (topic, ends) in [("a", admin_ends("a")), ("b", admin_ends("b"))] {
        for (partition, end) in ends.iter().enumerate() {
            for offset in end.saturating_sub(2)..*end {
                expected.push(format!("{topic}/{partition} {offset}"));
            }
        }
    }
    let mut got: Vec<String> = out.lines().map(str::to_owned).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);

    // Times: an hour ago is everything; RFC 3339 in the future is nothing.
    let (ok, out, err) = cli(&broker, &["consume", "b", "-o", "time:-1h", "-e"], "");
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["b0", "b1", "b2"]);
    let (ok, out, err) = cli(&broker, &["consume", "b", "-o", "time:2999-01-01T00:00:00Z", "-e"], "");
    assert!(ok && out.is_empty(), "{err}");
    let (ok, _, err) = cli(&broker, &["consume", "b", "-o", "time:yesterday"], "");
    assert!(!ok && err.contains("time:yesterday"), "{err}");
}

#[test]
fn a_member_that_gets_sigterm_leaves_its_group_at_once() {
    let broker = Broker::start(&[]);
    create(&broker, "jobs", "4");
    // A long session timeout: only a clean leave moves the partitions quickly.
    let member = || spawn_member(&broker, "jobs", "workers");
    let mut first = member();
    let second = member();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let owned = |admin: &Admin| {
        runtime.block_on(async {
            let description = admin.describe_group("workers").await;
            description.map(|d| {
                d.members
                    .iter()
                    .map(|m| m.assigned.iter().map(|t| t.partitions.len()).sum::<usize>())
                    .collect::<Vec<_>>()
            })
        })
    };
    let admin = runtime.block_on(async { Admin::new(broker.client().await) });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !owned(&admin).is_ok_and(|o| o.len() == 2 && o.iter().all(|n| *n == 2)) {
        assert!(Instant::now() < deadline, "two members sharing four partitions: {:?}", owned(&admin).ok());
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGTERM the first member: it exits cleanly, and the other owns everything well inside
    // the 60 s session timeout.
    let stopped = Instant::now();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(first.child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = first.child.try_wait().unwrap() {
            break status;
        }
        assert!(stopped.elapsed() < Duration::from_secs(10), "the member did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    while !owned(&admin).is_ok_and(|o| o == vec![4]) {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "the partitions did not move: {:?}",
            owned(&admin).ok()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the survivor reads what is produced to all four partitions.
    let input: String = (0..40).map(|i| format!("job-{i}\n")).collect();
    assert!(cli(&broker, &["produce", "jobs"], &input).0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while second.lines().len() < 40 {
        assert!(Instant::now() < deadline, "the survivor read {} of 40", second.lines().len());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `skein consume TOPIC -g GROUP` in the background (a long session: only a clean leave
/// moves its partitions quickly).
fn spawn_member(broker: &Broker, topic: &str, group: &str) -> Background {
    Background::start(broker, &["consume", topic, "-g", group, "--session-timeout-ms", "60000"])
}

#[test]
fn help_has_examples_and_completions_are_generated() {
    for command in [&["produce"][..], &["consume"], &["broker"]] {
        let out = skein().args(command).arg("--help").output().unwrap();
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success() && help.contains("Examples:"), "{command:?}: {help}");
    }
    let out = skein().args(["consume", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "-b, --bootstrap",
        "-t, --topic",
        "-p, --partition",
        "-o, --from",
        "-c, --max-messages",
        "-f, --format",
        "-g, --group",
        "-e, --exit",
    ] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef skein"), ("fish", "complete -c skein")]
    {
        let out = skein().args(["completions", shell]).output().unwrap();
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success() && script.contains(marker) && script.contains("consume"), "{shell}");
    }
}

#[test]
fn admin_commands_speak_json_and_reset_offsets_precisely() {
    let broker = Broker::start(&[]);
    create(&broker, "ledger", "2");
    let input: String = (0..20).map(|i| format!("k{}:v{i}\n", i % 2)).collect();
    assert!(cli(&broker, &["produce", "ledger", "-K", ":"], &input).0);
    assert!(cli(&broker, &["consume", "ledger", "-g", "audit", "-e"], "").0);

    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = cli(&broker, args, "");
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    assert_eq!(json(&["topic", "list", "--output", "json"]), serde_json::json!(["ledger"]));
    let topic = json(&["topic", "describe", "ledger", "--output", "json"]);
    assert_eq!(topic["name"], "ledger");
    assert_eq!(topic["partitions"].as_array().unwrap().len(), 2);
    let ends: Vec<u64> =
        topic["partitions"].as_array().unwrap().iter().map(|p| p["end_offset"].as_u64().unwrap()).collect();
    assert_eq!(ends.iter().sum::<u64>(), 20);
    assert!(topic["configs"]["retention.ms"].is_string());
    let groups = json(&["group", "list", "--output", "json"]);
    assert_eq!(groups, serde_json::json!([{"group": "audit", "state": "empty", "members": 0}]));
    let group = json(&["group", "describe", "audit", "--output", "json"]);
    assert_eq!(group["state"], "empty");
    let lags: Vec<u64> =
        group["offsets"].as_array().unwrap().iter().map(|p| p["lag"].as_u64().unwrap()).collect();
    assert!(lags.iter().all(|l| *l == 0), "{group}");
    let cluster = json(&["cluster", "describe", "--output", "json"]);
    assert_eq!(cluster["brokers"].as_array().unwrap().len(), 1);
    assert_eq!(cluster["partitions"], 2, "the offsets partitions are internal: {cluster}");
    assert!(cluster["answered_by"]["commit"].is_string());

    // A dry run prints and commits nothing.
    let committed = |partition: u64| {
        let group = json(&["group", "describe", "audit", "--output", "json"]);
        group["offsets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["partition"] == partition)
            .map(|p| p["committed"].as_u64().unwrap())
    };
    let (ok, out, err) = cli(
        &broker,
        &["group", "reset-offsets", "audit", "--topic", "ledger", "--to", "earliest", "--dry-run"],
        "",
    );
    assert!(ok && err.contains("dry run"), "{err}");
    assert_eq!(out.lines().count(), 2);
    assert_eq!(committed(0), Some(ends[0]), "nothing committed");
    // --shift-by on one partition: back 3 from the commit; the other stays.
    let (ok, out, err) = cli(
        &broker,
        &["group", "reset-offsets", "audit", "--topic", "ledger", "--shift-by", "-3", "--partition", "0"],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("ledger\t0\t{}\t{}", ends[0], ends[0] - 3));
    assert_eq!(committed(0), Some(ends[0] - 3));
    assert_eq!(committed(1), Some(ends[1]));
    // Shifting past the start stops at the start.
    let (ok, _, err) =
        cli(&broker, &["group", "reset-offsets", "audit", "--topic", "ledger", "--shift-by", "-1000"], "");
    assert!(ok, "{err}");
    assert_eq!((committed(0), committed(1)), (Some(0), Some(0)));
    let (ok, _, err) = cli(&broker, &["group", "reset-offsets", "audit", "--topic", "ledger"], "");
    assert!(!ok && err.contains("--to") && err.contains("--shift-by"), "one of them is required: {err}");

    // Health: 0 for a serving broker, 2 when nothing answers.
    let status = skein().args(["cluster", "health"]).env("SKEIN_BOOTSTRAP", &broker.addr).output().unwrap();
    assert_eq!(status.status.code(), Some(0), "{}", String::from_utf8_lossy(&status.stdout));
    assert!(String::from_utf8_lossy(&status.stdout).starts_with("healthy: 1 brokers"));
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let status = skein().args(["cluster", "health", "-b", &dead.to_string()]).output().unwrap();
    assert_eq!(status.status.code(), Some(2));
}

#[test]
fn a_group_is_deleted_only_when_empty_and_stays_deleted_after_a_restart() {
    let mut broker = Broker::start(&[]);
    create(&broker, "jobs", "2");
    assert!(cli(&broker, &["produce", "jobs"], "a\nb\nc\n").0);
    assert!(cli(&broker, &["consume", "jobs", "-g", "old", "-e"], "").0);
    assert!(cli(&broker, &["consume", "jobs", "-g", "keep", "-e"], "").0);
    let groups = |broker: &Broker| -> Vec<String> {
        let (ok, out, err) = cli(broker, &["group", "list"], "");
        assert!(ok, "{err}");
        out.lines().map(|l| l.split('\t').next().unwrap().to_owned()).collect()
    };
    assert_eq!(groups(&broker), vec!["keep", "old"]);

    // With a member: refused, nothing changes.
    let mut member = Background::start(&broker, &["consume", "jobs", "-g", "old"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, _) = cli(&broker, &["group", "list"], "");
        if out.lines().any(|l| l.starts_with("old\t") && l.ends_with("1 members")) {
            break;
        }
        assert!(Instant::now() < deadline, "the member joined: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, _, err) = cli(&broker, &["group", "delete", "old"], "");
    assert!(!ok && err.contains("group not empty"), "{err}");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(member.child.id() as i32, libc::SIGTERM) };
    let _ = member.child.wait();

    let (ok, out, err) = cli(&broker, &["group", "delete", "old"], "");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "deleted group old");
    assert_eq!(groups(&broker), vec!["keep"]);
    let (ok, _, err) = cli(&broker, &["group", "describe", "old"], "");
    assert!(!ok && err.contains("group not found"), "{err}");
    let (ok, _, err) = cli(&broker, &["group", "delete", "never-was"], "");
    assert!(!ok && err.contains("group not found"), "{err}");

    // The deletion is durable; the other group's offsets are untouched; a new group of the same
    // name starts from scratch (reads everything again).
    assert!(broker.stop());
    broker.restart();
    assert_eq!(groups(&broker), vec!["keep"]);
    let (ok, out, _) = cli(&broker, &["group", "describe", "keep", "--output", "json"], "");
    assert!(ok);
    let keep: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        keep["offsets"].as_array().unwrap().iter().map(|p| p["committed"].as_u64().unwrap()).sum::<u64>(),
        3
    );
    let (ok, out, _) = cli(&broker, &["consume", "jobs", "-g", "old", "-e"], "");
    assert!(ok);
    assert_eq!(out.lines().count(), 3);
}

#[test]
fn partitions_are_added_to_a_live_topic_and_survive_a_restart() {
    let mut broker = Broker::start(&[]);
    create(&broker, "orders", "2");
    let input: String = (0..10).map(|i| format!("o{i}\n")).collect();
    assert!(cli(&broker, &["produce", "orders"], &input).0);
    // A member already reading the topic: it must be given the new partitions while it runs.
    let live = spawn_member(&broker, "orders", "live");
    let deadline = Instant::now() + Duration::from_secs(30);
    while live.lines().len() < 10 {
        assert!(Instant::now() < deadline, "the live member read {:?}", live.lines());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out, err) = cli(&broker, &["topic", "add-partitions", "orders", "--total", "5"], "");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "topic orders now has 5 partitions");
    let describe = |broker: &Broker| -> serde_json::Value {
        let (ok, out, err) = cli(broker, &["topic", "describe", "orders", "--output", "json"], "");
        assert!(ok, "{err}");
        serde_json::from_str(out.trim()).unwrap()
    };
    let topic = describe(&broker);
    let partitions = topic["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 5);
    let ends: Vec<u64> = partitions.iter().map(|p| p["end_offset"].as_u64().unwrap()).collect();
    assert_eq!(ends[..2].iter().sum::<u64>(), 10, "the old partitions keep their records: {ends:?}");
    assert_eq!(&ends[2..], &[0, 0, 0]);
    // A new partition takes records (its shard opens it right after the change; a produce
    // that arrives first is retried) and serves them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, _, err) =
            cli(&broker, &["produce", "orders", "-p", "4", "--delivery-timeout-ms", "10000"], "new\n");
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "{err}");
    }
    let (ok, out, _) = cli(&broker, &["consume", "orders", "-p", "4", "-e"], "");
    assert!(ok);
    assert_eq!(out, "new\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !live.lines().iter().any(|line| line == "new") {
        assert!(Instant::now() < deadline, "the live member never read partition 4");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Only growth, of a topic that exists.
    let (ok, _, err) = cli(&broker, &["topic", "add-partitions", "orders", "--total", "3"], "");
    assert!(!ok && err.contains("partition"), "{err}");
    let (ok, _, err) = cli(&broker, &["topic", "add-partitions", "nope", "--total", "3"], "");
    assert!(!ok && err.contains("nope"), "{err}");
    // A group reading the topic gets the new partitions too.
    let (ok, out, _) = cli(&broker, &["consume", "orders", "-g", "all", "-e"], "");
    assert!(ok);
    assert_eq!(out.lines().count(), 11);

    assert!(broker.stop());
    broker.restart();
    let topic = describe(&broker);
    let ends: Vec<u64> =
        topic["partitions"].as_array().unwrap().iter().map(|p| p["end_offset"].as_u64().unwrap()).collect();
    assert_eq!(ends.len(), 5);
    assert_eq!(ends.iter().sum::<u64>(), 11, "{ends:?}");
    assert_eq!(ends[4], 1);
}

#[test]
fn settings_are_altered_on_a_live_topic_take_effect_at_once_and_survive_a_restart() {
    let mut broker = Broker::start(&["--retention-check-ms", "200"]);
    let (ok, _, err) = cli(
        &broker,
        &[
            "topic",
            "create",
            "logs",
            "--partitions",
            "1",
            "--config",
            "segment.bytes=65536",
            "--config",
            "max.message.bytes=16384",
        ],
        "",
    );
    assert!(ok, "{err}");
    let configs = |broker: &Broker| -> serde_json::Value {
        let (ok, out, err) = cli(broker, &["topic", "describe", "logs", "--output", "json"], "");
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["configs"].clone()
    };
    let big = format!("{}\n", "x".repeat(3000));
    assert!(cli(&broker, &["produce", "logs"], &big).0, "3000 bytes fit the first limit");

    // A producer that learnt the old limit before the change: the broker itself refuses.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let producer = runtime.block_on(async {
        let client = broker.client().await;
        client.topic("logs").await.unwrap();
        skein_client::Producer::new(client, skein_client::ProducerConfig::default())
    });
    // A lower max.message.bytes refuses the same record at once; a small one still goes in.
    let (ok, out, err) =
        cli(&broker, &["topic", "alter-config", "logs", "--set", "max.message.bytes=2048"], "");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "topic logs: changed max.message.bytes=2048");
    assert_eq!(configs(&broker)["max.message.bytes"], "2048");
    let (ok, _, err) = cli(&broker, &["produce", "logs", "--delivery-timeout-ms", "5000"], &big);
    assert!(!ok, "a record over the new limit is refused");
    assert!(err.contains("exceeds the batch limit of 2048 bytes"), "{err}");
    let refused = runtime.block_on(async {
        let record = skein_client::ProducerRecord::new("logs", "y".repeat(3000));
        producer.send(record).await?.await
    });
    let error = refused.expect_err("the broker checks the new limit").to_string();
    eprintln!("stale producer: {error}");
    assert!(error.to_lowercase().contains("too large") || error.contains("limit"), "{error}");
    assert!(cli(&broker, &["produce", "logs"], "small\n").0);
    // What was stored under the old limit is still read.
    let (ok, out, _) = cli(&broker, &["consume", "logs", "-e"], "");
    assert!(ok);
    assert_eq!(out, format!("{big}small\n"));

    // Dry runs change nothing; bad keys and values are refused naming them.
    let (ok, out, err) =
        cli(&broker, &["topic", "alter-config", "logs", "--set", "retention.ms=1000", "--dry-run"], "");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "topic logs: would change retention.ms=1000");
    assert_ne!(configs(&broker)["retention.ms"], "1000");
    for (args, named) in [
        (vec!["--set", "colour=blue"], "colour"),
        (vec!["--set", "segment.bytes=10"], "segment.bytes"),
        (vec!["--delete", "partitions"], "partitions"),
    ] {
        let mut command = vec!["topic", "alter-config", "logs"];
        command.extend(args);
        let (ok, _, err) = cli(&broker, &command, "");
        assert!(!ok && err.contains(named), "{err}");
    }
    let (ok, _, err) = cli(&broker, &["topic", "alter-config", "nope", "--set", "retention.ms=1"], "");
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, _, err) = cli(&broker, &["topic", "alter-config", "logs"], "");
    assert!(!ok && err.contains("nothing to change"), "{err}");

    // A reset goes back to the broker default, under the same rules: the default
    // max.message.bytes (8 MiB) does not fit these 64 KiB segments.
    let (ok, _, err) = cli(&broker, &["topic", "alter-config", "logs", "--delete", "max.message.bytes"], "");
    assert!(!ok && err.contains("segment.bytes"), "{err}");
    let (ok, _, err) = cli(
        &broker,
        &["topic", "alter-config", "logs", "--set", "max.message.bytes=16384", "--delete", "retention.ms"],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(configs(&broker)["max.message.bytes"], "16384");
    assert_eq!(configs(&broker)["retention.ms"], (168u64 * 3600 * 1000).to_string());

    // Retention by size set on a live topic deletes old segments at the next pass.
    let input: String = (0..300).map(|i| format!("{i:0>999}\n")).collect();
    assert!(cli(&broker, &["produce", "logs"], &input).0);
    let start_offset = |broker: &Broker| -> u64 {
        let (ok, out, _) = cli(broker, &["topic", "describe", "logs", "--output", "json"], "");
        assert!(ok);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["partitions"][0]["start_offset"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(start_offset(&broker), 0);
    let (ok, _, err) =
        cli(&broker, &["topic", "alter-config", "logs", "--set", "retention.bytes=100000"], "");
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while start_offset(&broker) == 0 {
        assert!(Instant::now() < deadline, "retention never ran with the new limit");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Stored: the settings are the same after a restart.
    let before = configs(&broker);
    assert!(broker.stop());
    broker.restart();
    assert_eq!(configs(&broker), before);
    assert_eq!(before["retention.bytes"], "100000");
}
