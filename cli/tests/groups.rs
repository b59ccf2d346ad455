//! Consumer groups against the real broker process: members as real `skein consume --group`
//! processes (one is SIGKILLed), independent groups, committed offsets across a restart, a
//! member that stops polling, and the group administration commands.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cli, skein, Broker};
use skein_client::{
    Admin, Consumer, ConsumerConfig, GroupConfig, Producer, ProducerConfig, ProducerRecord, RebalanceEvent,
    SeekTo, TopicPartition,
};

/// A `skein consume --group` process whose printed records (partition, offset, value) are
/// collected; killed when dropped.
struct Member {
    child: Child,
    lines: Arc<Mutex<Vec<(u32, u64, String)>>>,
}

impl Member {
    fn start(broker: &Broker, topic: &str, group: &str) -> Member {
        let mut child = skein()
            .args(["consume", topic, "--group", group, "--format", "full", "--session-timeout-ms", "3000"])
            .env("SKEIN_BOOTSTRAP", &broker.addr)
            .env("RUST_LOG", std::env::var("SKEIN_TEST_MEMBER_LOG_LEVEL").unwrap_or("warn".into()))
            .stdout(Stdio::piped())
            .stderr(member_log())
            .spawn()
            .expect("skein consume starts");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let fields: Vec<&str> = line.split('\t').collect();
                let record = (fields[0].parse().unwrap(), fields[1].parse().unwrap(), fields[4].to_owned());
                sink.lock().unwrap().push(record);
            }
        });
        Member { child, lines }
    }

    fn records(&self) -> Vec<(u32, u64, String)> {
        self.lines.lock().unwrap().clone()
    }
}

/// Where a member's log goes: a new file under `SKEIN_TEST_MEMBER_LOG_DIR` when set (to
/// diagnose a failure), otherwise nowhere.
fn member_log() -> Stdio {
    match std::env::var_os("SKEIN_TEST_MEMBER_LOG_DIR") {
        Some(dir) => {
            let path = tempfile::Builder::new().prefix("member-").suffix(".log").tempfile_in(dir);
            match path.and_then(|file| file.keep().map_err(|e| e.error)) {
                Ok((file, _)) => Stdio::from(file),
                Err(_) => Stdio::null(),
            }
        }
        None => Stdio::null(),
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn produce(broker: &Broker, topic: &str, from: u32, count: u32) {
    let producer = Producer::new(broker.client().await, ProducerConfig::default());
    for i in from..from + count {
        producer
            .send(ProducerRecord::new(topic.to_owned(), format!("r{i}")).key(format!("k{i}")))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
}

/// Waits until `check` holds, or panics with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within {limit:?}");
}

/// Partitions owned by each member, per `describe_group`.
async fn ownership(admin: &Admin, group: &str) -> BTreeMap<String, BTreeSet<u32>> {
    let description = match admin.describe_group(group).await {
        Ok(description) => description,
        // No member joined yet.
        Err(error) if error.code() == Some(skein_net::ErrorCode::GroupIdNotFound) => return BTreeMap::new(),
        Err(error) => panic!("describing {group}: {error}"),
    };
    description
        .members
        .iter()
        .map(|m| {
            (m.member_id.clone(), m.assigned.iter().flat_map(|t| t.partitions.iter().copied()).collect())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_six_partitions_and_survive_a_killed_member() {
    let broker = Broker::start(&[]);
    let admin = Admin::new(broker.client().await);
    admin.create_topic("events", 6, &[]).await.unwrap();
    produce(&broker, "events", 0, 600).await;

    let members: Vec<Member> = (0..3).map(|_| Member::start(&broker, "events", "workers")).collect();
    // Evenly shared: three members with two partitions each, and every record read.
    eventually(Duration::from_secs(30), "an even 2/2/2 assignment", async || {
        let owned = ownership(&admin, "workers").await;
        owned.len() == 3 && owned.values().all(|p| p.len() == 2)
    })
    .await;
    eventually(Duration::from_secs(30), "the first 600 records read", async || {
        let seen: BTreeSet<String> = members.iter().flat_map(|m| m.records()).map(|r| r.2).collect();
        seen.len() == 600
    })
    .await;
    let before_kill = ownership(&admin, "workers").await;

    // Kill one member's process (no clean leave); find its partitions by what it printed.
    let mut members = members;
    let victim = members.pop().unwrap();
    let victim_partitions: BTreeSet<u32> = victim.records().iter().map(|r| r.0).collect();
    // What the victim printed stays readable after the kill (its reader thread keeps it): the
    // records it alone read before the survivors joined count as read.
    let victim_lines = victim.lines.clone();
    drop(victim); // SIGKILL
    let seen_at_kill: Vec<usize> = members.iter().map(|m| m.records().len()).collect();
    let committed_at_kill: HashMap<u32, u64> = {
        let keys: Vec<TopicPartition> = (0..6).map(|p| TopicPartition::new("events", p)).collect();
        let offsets = admin.committed_offsets("workers", &keys).await.unwrap();
        (0..6).zip(offsets).map(|(p, o)| (p, o.unwrap_or(0))).collect()
    };
    let took = eventually(Duration::from_secs(10), "two members owning all six partitions", async || {
        let owned = ownership(&admin, "workers").await;
        owned.len() == 2 && owned.values().map(BTreeSet::len).sum::<usize>() == 6
    })
    .await;
    // The session timeout is 3 s; detection takes that long, reassignment little more.
    assert!(took < Duration::from_secs(3) + Duration::from_secs(4), "took {took:?}");
    eprintln!("the two survivors owned all 6 partitions {took:?} after the kill (session timeout 3 s)");
    let after = ownership(&admin, "workers").await;
    for (member, partitions) in &after {
        let had = &before_kill[member];
        assert!(
            had.is_subset(partitions),
            "a surviving member keeps its partitions: {had:?} -> {partitions:?}"
        );
    }

    // New records are all read by the survivors, nothing lost; the first 600 by someone.
    produce(&broker, "events", 600, 600).await;
    let read_all = async || {
        let survivors: BTreeSet<String> = members.iter().flat_map(|m| m.records()).map(|r| r.2).collect();
        let new_ones = (600..1200).filter(|i| survivors.contains(&format!("r{i}"))).count();
        let victim: Vec<String> = victim_lines.lock().unwrap().iter().map(|r| r.2.clone()).collect();
        let old_ones = (0..600).filter(|i| {
            let value = format!("r{i}");
            survivors.contains(&value) || victim.contains(&value)
        });
        new_ones == 600 && old_ones.count() == 600
    };
    let started = Instant::now();
    while !read_all().await && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !read_all().await {
        // Say where reading stopped: per partition, the last offset each survivor printed,
        // and who owns what now.
        let mut last: BTreeMap<(usize, u32), u64> = BTreeMap::new();
        for (index, member) in members.iter().enumerate() {
            for (partition, offset, _) in member.records() {
                let entry = last.entry((index, partition)).or_default();
                *entry = (*entry).max(offset);
            }
        }
        let owned = ownership(&admin, "workers").await;
        // Whether the broker serves what the members did not print: per partition, its end
        // and how many records a fresh consumer reads from after the highest printed offset.
        let ends: Vec<u64> =
            admin.describe_topic("events").await.unwrap().partitions.iter().map(|p| p.end_offset).collect();
        let mut fresh_reads = BTreeMap::new();
        for partition in 0..6u32 {
            let from =
                last.iter().filter(|((_, p), _)| *p == partition).map(|(_, o)| o + 1).max().unwrap_or(0);
            let mut consumer = Consumer::new(broker.client().await, ConsumerConfig::default());
            consumer.assign("events", &[partition]).await.unwrap();
            consumer.seek("events", partition, SeekTo::Offset(from)).await.unwrap();
            let wanted = ends[partition as usize].saturating_sub(from) as usize;
            fresh_reads.insert(partition, (from, read(&mut consumer, wanted).await.len()));
        }
        panic!(
            "all 600 new records read by the survivors (and the first 600 by anyone) did not happen within 30s: last offset printed per (member, partition) {last:?}; \
             ownership {owned:?}; partition ends {ends:?}; a fresh consumer from the next offset read (from, count) {fresh_reads:?}"
        );
    }
    // Re-reads happen only on the victim's partitions, and only after its last commit.
    let mut count: HashMap<(u32, u64), usize> = HashMap::new();
    for record in members.iter().flat_map(|m| m.records()) {
        *count.entry((record.0, record.1)).or_default() += 1;
    }
    let survivors_reread: Vec<&(u32, u64)> = count.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k).collect();
    assert!(survivors_reread.is_empty(), "survivors never read a record twice: {survivors_reread:?}");
    // The survivors start the victim's partitions at its last commit: what they read there
    // after the kill is at or after that commit (so they re-read at most what the victim
    // printed since), and it covers everything from the commit on.
    for (member, seen) in members.iter().zip(&seen_at_kill) {
        for (partition, offset, _) in member.records().into_iter().skip(*seen) {
            if victim_partitions.contains(&partition) {
                assert!(
                    offset >= committed_at_kill[&partition],
                    "partition {partition} re-read offset {offset}, below the victim's commit {}",
                    committed_at_kill[&partition]
                );
            }
        }
    }
}

/// Polls a consumer until it returned `expected` records or 30 s passed.
async fn read(consumer: &mut Consumer, expected: usize) -> Vec<skein_client::ConsumerRecord> {
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while records.len() < expected && Instant::now() < deadline {
        records.extend(consumer.poll(Duration::from_millis(200)).await.unwrap());
    }
    records
}

fn fast_group(name: &str) -> GroupConfig {
    GroupConfig::new(name).session_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_groups_each_see_every_record_and_commits_survive_restarts() {
    let mut broker = Broker::start(&["--fsync", "always"]);
    let admin = Admin::new(broker.client().await);
    admin.create_topic("ledger", 4, &[]).await.unwrap();
    produce(&broker, "ledger", 0, 400).await;

    // Two groups (one with two members) read the same topic independently.
    let mut solo = Consumer::new(broker.client().await, ConsumerConfig::default());
    solo.subscribe(&["ledger"], fast_group("audit")).await.unwrap();
    let mut pair: Vec<Consumer> = Vec::new();
    for _ in 0..2 {
        let mut consumer = Consumer::new(broker.client().await, ConsumerConfig::default());
        consumer.subscribe(&["ledger"], fast_group("billing")).await.unwrap();
        pair.push(consumer);
    }
    let audit: BTreeSet<u64> =
        read(&mut solo, 400).await.iter().map(|r| u64::from(r.partition) << 32 | r.offset).collect();
    assert_eq!(audit.len(), 400, "group audit saw every record");
    let mut billing = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while billing.len() < 400 && Instant::now() < deadline {
        for consumer in pair.iter_mut() {
            for record in consumer.poll(Duration::from_millis(100)).await.unwrap() {
                assert!(billing.insert(u64::from(record.partition) << 32 | record.offset), "read once");
            }
        }
    }
    assert_eq!(billing, audit, "group billing saw every record too");
    let events = solo.rebalance_events();
    assert!(
        matches!(&events[..], [RebalanceEvent::Assigned(p)] if p.len() == 4),
        "one member gets every partition at once: {events:?}"
    );
    for consumer in pair.iter_mut() {
        consumer.commit().await.unwrap();
    }
    solo.commit().await.unwrap();
    let keys: Vec<TopicPartition> = (0..4).map(|p| TopicPartition::new("ledger", p)).collect();
    let committed = admin.committed_offsets("audit", &keys).await.unwrap();
    let ends: Vec<Option<u64>> =
        admin.describe_topic("ledger").await.unwrap().partitions.iter().map(|p| Some(p.end_offset)).collect();
    assert_eq!(committed, ends, "audit committed the end of every partition");
    drop(solo);
    drop(pair);

    // Committed offsets survive a clean restart and a SIGKILL.
    for kill in [false, true] {
        if kill {
            broker.kill();
        } else {
            assert!(broker.stop(), "clean shutdown");
        }
        broker.restart();
        let admin = Admin::new(broker.client().await);
        assert_eq!(
            admin.committed_offsets("audit", &keys).await.unwrap(),
            ends,
            "after restart (kill: {kill})"
        );
        let groups: Vec<String> =
            admin.list_groups().await.unwrap().into_iter().map(|g| g.group_id).collect();
        assert_eq!(groups, vec!["audit".to_owned(), "billing".to_owned()]);
    }

    // A new member continues from the commit: it reads only the new records.
    produce(&broker, "ledger", 400, 40).await;
    let mut next = Consumer::new(broker.client().await, ConsumerConfig::default());
    next.subscribe(&["ledger"], fast_group("audit")).await.unwrap();
    let fresh = read(&mut next, 40).await;
    let values: BTreeSet<String> =
        fresh.iter().map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()).collect();
    assert_eq!(values, (400..440).map(|i| format!("r{i}")).collect::<BTreeSet<_>>());
    assert!(next.poll(Duration::from_millis(300)).await.unwrap().is_empty(), "nothing else");

    // A member that left (or was removed) is a zombie: its commits are refused.
    let zombie = next.member_id().unwrap();
    next.close().await.unwrap();
    let request = skein_net::Request::OffsetCommit(skein_net::OffsetCommitRequest {
        group_id: "audit".into(),
        member_id: zombie,
        member_epoch: 1,
        topics: vec![skein_net::TopicData {
            name: "ledger".into(),
            partitions: vec![skein_net::CommitPartition { partition: 0, offset: 0, metadata: String::new() }],
        }],
    });
    let body = broker.client().await.request(&request).await.unwrap();
    let response = skein_net::OffsetCommitResponse::decode(&mut skein_net::Reader::new(&body)).unwrap();
    assert_eq!(response.error, skein_net::ErrorCode::UnknownMemberId);
    // The commit made on close stands: every partition at its end.
    let admin = Admin::new(broker.client().await);
    let ends: Vec<Option<u64>> =
        admin.describe_topic("ledger").await.unwrap().partitions.iter().map(|p| Some(p.end_offset)).collect();
    assert_eq!(admin_offsets(&broker, "audit", &keys).await, ends);
}

async fn admin_offsets(broker: &Broker, group: &str, keys: &[TopicPartition]) -> Vec<Option<u64>> {
    Admin::new(broker.client().await).committed_offsets(group, keys).await.unwrap()
}

#[test]
fn group_commands_list_describe_and_reset_offsets() {
    let broker = Broker::start(&[]);
    let (ok, _, err) = cli(&broker, &["topic", "create", "logs", "--partitions", "2"], "");
    assert!(ok, "{err}");
    let input: String = (0..20).map(|i| format!("k{}|line-{i}\n", i % 5)).collect();
    let (ok, _, err) = cli(&broker, &["produce", "logs", "--key-separator", "|"], &input);
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(20));
    let (ok, _, err) = cli(&broker, &["produce", "logs", "--partition", "0"], "late-1\nlate-2\n");
    assert!(ok, "{err}");

    // Consume 12 records as group "ops", then the rest: no record twice, none missing.
    let (ok, first, err) = cli(
        &broker,
        &["consume", "logs", "--group", "ops", "--max-messages", "12", "--timeout-ms", "3000"],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(first.lines().count(), 12);
    let (ok, rest, err) = cli(&broker, &["consume", "logs", "--group", "ops", "--timeout-ms", "1500"], "");
    assert!(ok, "{err}");
    let mut all: Vec<&str> = first.lines().chain(rest.lines()).collect();
    all.sort_unstable();
    let mut expected: Vec<String> = (0..20).map(|i| format!("line-{i}")).collect();
    expected.extend(["late-1".to_owned(), "late-2".to_owned()]);
    expected.sort_unstable();
    assert_eq!(all, expected);

    let (ok, out, _) = cli(&broker, &["group", "list"], "");
    assert!(ok);
    assert_eq!(out.trim(), "ops\tempty\t0 members");
    let (ok, out, _) = cli(&broker, &["group", "describe", "ops"], "");
    assert!(ok);
    assert!(out.starts_with("group ops state empty"), "{out}");
    let lag_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("logs\t")).collect();
    assert_eq!(lag_lines.len(), 2, "{out}");
    assert!(lag_lines.iter().all(|l| l.split('\t').nth(4) == Some("0")), "no lag: {out}");

    // Reset to the earliest offsets, to an offset, to a time, to the latest.
    let (ok, out, err) =
        cli(&broker, &["group", "reset-offsets", "ops", "--topic", "logs", "--to", "earliest"], "");
    assert!(ok, "{err}");
    // TOPIC PARTITION BEFORE AFTER: before is what the group had committed (everything read).
    let after = |out: &str| -> Vec<String> {
        out.lines()
            .map(|l| {
                let fields: Vec<&str> = l.split('\t').collect();
                assert_eq!(fields.len(), 4, "{l}");
                format!("{}\t{}\t{}", fields[0], fields[1], fields[3])
            })
            .collect()
    };
    assert_eq!(after(&out), vec!["logs\t0\t0", "logs\t1\t0"]);
    let before: u64 = out.lines().map(|l| l.split('\t').nth(2).unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(before, 22, "before: the offsets after all 22 records");
    let (ok, again, _) = cli(&broker, &["consume", "logs", "--group", "ops", "--timeout-ms", "1500"], "");
    assert!(ok);
    assert_eq!(again.lines().count(), 22, "everything again after a reset to earliest");
    // The time to reset to: just after the newest of the first 20 records, as stored.
    let (ok, full, _) = cli(&broker, &["consume", "logs", "--format", "full", "--timeout-ms", "800"], "");
    assert!(ok);
    let stamp = |line: &str| -> (i64, String) {
        let fields: Vec<&str> = line.split('\t').collect();
        (fields[2].parse().unwrap(), fields[4].to_owned())
    };
    let stamps: Vec<(i64, String)> = full.lines().map(stamp).collect();
    let before = stamps.iter().filter(|(_, v)| v.starts_with("line-")).map(|(t, _)| *t).max().unwrap() + 1;
    assert!(stamps.iter().filter(|(_, v)| v.starts_with("late-")).all(|(t, _)| *t >= before), "{full}");
    let (ok, out, err) = cli(
        &broker,
        &["group", "reset-offsets", "ops", "--topic", "logs", "--to", &format!("time:{before}")],
        "",
    );
    assert!(ok, "{err}");
    let (ok, late, _) = cli(&broker, &["consume", "logs", "--group", "ops", "--timeout-ms", "1500"], "");
    assert!(ok);
    assert_eq!(late.lines().collect::<Vec<_>>(), vec!["late-1", "late-2"], "reset to a time: {out}");
    let (ok, _, _) =
        cli(&broker, &["group", "reset-offsets", "ops", "--topic", "logs", "--to", "latest"], "");
    assert!(ok);
    let (ok, none, _) = cli(&broker, &["consume", "logs", "--group", "ops", "--timeout-ms", "800"], "");
    assert!(ok);
    assert_eq!(none, "", "nothing after a reset to latest");
    let (ok, out, _) = cli(&broker, &["group", "reset-offsets", "ops", "--topic", "logs", "--to", "3"], "");
    assert!(ok);
    assert_eq!(after(&out), vec!["logs\t0\t3", "logs\t1\t3"]);

    // Not while the group has a member.
    let member = Member::start(&broker, "logs", "ops");
    let started = Instant::now();
    let refused = loop {
        let (ok, _, err) =
            cli(&broker, &["group", "reset-offsets", "ops", "--topic", "logs", "--to", "earliest"], "");
        if !ok {
            break err;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the member never joined");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(refused.contains("group not empty"), "{refused}");
    drop(member);
    let (ok, _, err) = cli(&broker, &["group", "describe", "nope"], "");
    assert!(!ok && err.contains("group not found"), "{err}");
}

/// A member that stops polling (its processing stuck) keeps heartbeating, but leaves once it
/// has not polled for `max_poll_interval`: the other member takes its partitions and reads
/// what comes meanwhile. Its next poll reports them lost, and it joins again and gets
/// partitions back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_polling_leaves_and_its_next_poll_rejoins() {
    let broker = Broker::start(&[]);
    let admin = Admin::new(broker.client().await);
    admin.create_topic("jobs", 4, &[]).await.unwrap();
    produce(&broker, "jobs", 0, 400).await;
    let group = || fast_group("stuck").max_poll_interval(Duration::from_secs(1));
    let mut stuck =
        Consumer::new(broker.client().await, ConsumerConfig::default().start_from(SeekTo::Beginning));
    stuck.subscribe(&["jobs"], group()).await.unwrap();
    let mut other =
        Consumer::new(broker.client().await, ConsumerConfig::default().start_from(SeekTo::Beginning));
    other.subscribe(&["jobs"], group()).await.unwrap();
    // Both poll until they share the partitions.
    let started = Instant::now();
    while stuck.assignment().is_empty() || other.assignment().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30), "the two members share the partitions");
        stuck.poll(Duration::from_millis(100)).await.unwrap();
        other.poll(Duration::from_millis(100)).await.unwrap();
    }
    stuck.rebalance_events();
    let held_by_stuck = stuck.assignment().len();

    // `stuck` stops polling; `other` goes on, and gets all 4 partitions once `stuck` left.
    let stopped = Instant::now();
    while other.assignment().len() < 4 {
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "the other member took the stuck one's partitions"
        );
        other.poll(Duration::from_millis(100)).await.unwrap();
    }
    let taken_over = stopped.elapsed();
    // Not before max_poll_interval (counted from the stuck member's last poll, which ended at
    // most one 100 ms poll of the other member before `stopped`).
    assert!(taken_over >= Duration::from_millis(850), "not before max_poll_interval: {taken_over:?}");
    produce(&broker, "jobs", 400, 800).await;
    // It also reads the stuck member's partitions from where that one last committed (at least
    // once), so the new records are waited for by value, not counted.
    let mut read = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(400..800).all(|i| read.contains(&format!("r{i}"))) && Instant::now() < deadline {
        for record in other.poll(Duration::from_millis(200)).await.unwrap() {
            read.insert(String::from_utf8(record.value.unwrap().to_vec()).unwrap());
        }
    }
    assert!((400..800).all(|i| read.contains(&format!("r{i}"))), "the other member read what came meanwhile");

    // `stuck` polls again: its partitions are reported lost, and it joins again.
    stuck.poll(Duration::from_millis(100)).await.unwrap();
    let events = stuck.rebalance_events();
    assert!(
        events.iter().any(|e| matches!(e, RebalanceEvent::Lost(p) if p.len() == held_by_stuck)),
        "its next poll reports its {held_by_stuck} partitions lost: {events:?}"
    );
    let back = Instant::now();
    while stuck.assignment().is_empty() {
        assert!(back.elapsed() < Duration::from_secs(30), "the stuck member got partitions again");
        stuck.poll(Duration::from_millis(100)).await.unwrap();
        other.poll(Duration::from_millis(100)).await.unwrap();
    }
    eprintln!(
        "RELIABILITY stuck-member: max_poll_interval 1 s: the other member held all 4 partitions {:.1} s after the stuck one's last poll, and the stuck one held partitions again {:.1} s after it polled again",
        taken_over.as_secs_f64(),
        back.elapsed().as_secs_f64()
    );
}
