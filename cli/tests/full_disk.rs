//! A full disk: the broker on a small loop-mounted ext4 filesystem. Producing gets a clear
//! error, reads keep working, nothing acknowledged is damaged, and producing works again once
//! space is freed. Needs root (mount); where the filesystem cannot be mounted the test says so
//! and returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Broker;
use skein_client::{
    Acks, Admin, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord,
};

/// A loop-mounted ext4 filesystem, unmounted when dropped.
struct SmallFs {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size_mib: u64) -> Result<SmallFs, String> {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).map_err(|e| e.to_string())?;
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let file = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        file.set_len(size_mib << 20).map_err(|e| e.to_string())?;
        let run = |program: &str, args: &[&Path]| -> Result<(), String> {
            let output = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!("{program}: {}", String::from_utf8_lossy(&output.stderr).trim()))
            }
        };
        run("mkfs.ext4", &[Path::new("-q"), Path::new("-F"), &image])?;
        run("mount", &[Path::new("-o"), Path::new("loop"), &image, &mount])?;
        Ok(SmallFs { mount, _dir: dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

fn value(i: u32) -> String {
    format!("{i:08}-{}", "z".repeat(16 << 10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers_when_space_is_freed() {
    let fs = match SmallFs::mount(64) {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!(
                "SKIPPED: cannot mount a small filesystem here ({reason}); the full-disk case needs root"
            );
            return;
        }
    };
    // Space to free later.
    let ballast = fs.mount.join("ballast");
    std::fs::write(&ballast, vec![1u8; 12 << 20]).unwrap();
    // The data directory is the mount itself (the test log lands beside it, outside).
    let mut broker = Broker::start_at(fs.mount.clone(), &["--fsync", "always"]);
    Admin::new(broker.client().await)
        .create_topic(
            "fill",
            1,
            &[("segment.bytes", "8388608"), ("max.message.bytes", "1048576"), ("retention.ms", "-1")],
        )
        .await
        .unwrap();
    let producer = Producer::new(
        broker.client().await,
        ProducerConfig::default().acks(Acks::All).retries(0).linger(Duration::from_millis(1)),
    );
    // Fill the disk, 16 records at a time; every outcome is awaited, so the acknowledged set
    // is exact.
    let mut acked: Vec<(u64, u32)> = Vec::new();
    let mut refusal = None;
    let mut i = 0u32;
    while refusal.is_none() && i < 20_000 {
        let mut window = Vec::new();
        for _ in 0..16 {
            window.push((i, producer.send(ProducerRecord::new("fill", value(i))).await.unwrap()));
            i += 1;
        }
        for (n, delivery) in window {
            match delivery.await {
                Ok(metadata) => acked.push((metadata.offset.unwrap(), n)),
                Err(error) => {
                    refusal.get_or_insert(error);
                }
            }
        }
    }
    let refusal = refusal.expect("the disk filled up");
    assert!(
        matches!(&refusal, ClientError::Broker { code, .. } if *code == skein_net::ErrorCode::NotEnoughSpace),
        "a clear error: {refusal}"
    );
    assert!(acked.len() > 500, "records were written before the disk filled ({})", acked.len());

    // Reads keep working and return exactly what was acknowledged.
    let read_all = |broker: &Broker| {
        let addr = broker.addr.clone();
        async move {
            let client = skein_client::Client::connect(skein_client::ClientConfig::new(addr)).await.unwrap();
            let mut consumer = Consumer::new(client, ConsumerConfig::default());
            consumer.assign_all("fill").await.unwrap();
            let mut records = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let batch = consumer.poll(Duration::from_millis(300)).await.unwrap();
                if batch.is_empty() || Instant::now() > deadline {
                    break;
                }
                records.extend(
                    batch
                        .into_iter()
                        .map(|r| (r.offset, String::from_utf8(r.value.unwrap().to_vec()).unwrap())),
                );
            }
            records
        }
    };
    let check = |records: &[(u64, String)], acked: &[(u64, u32)]| {
        let stored: std::collections::HashMap<u64, &String> = records.iter().map(|(o, v)| (*o, v)).collect();
        for (offset, i) in acked {
            assert_eq!(
                stored.get(offset).map(|v| v.as_str()),
                Some(value(*i).as_str()),
                "acknowledged record at {offset}"
            );
        }
    };
    check(&read_all(&broker).await, &acked);
    assert!(broker.log().contains("No space left on device") || broker.log().contains("no space"), "logged");

    // Free space: producing works again (the first tries may still fail while the broker
    // notices), and everything acknowledged is intact, also after a restart.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut resumed = false;
    let mut i = 1_000_000u32;
    while Instant::now() < deadline {
        match producer.send(ProducerRecord::new("fill", value(i))).await.unwrap().await {
            Ok(metadata) => {
                acked.push((metadata.offset.unwrap(), i));
                resumed = true;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        i += 1;
    }
    assert!(resumed, "producing works again once space is freed");
    for j in 1..50 {
        let metadata = producer.send(ProducerRecord::new("fill", value(i + j))).await.unwrap().await.unwrap();
        acked.push((metadata.offset.unwrap(), i + j));
    }
    assert!(broker.stop());
    broker.restart();
    check(&read_all(&broker).await, &acked);
    eprintln!(
        "RELIABILITY full-disk: {} acknowledged records before and after the disk filled, all intact; refused with {refusal}",
        acked.len()
    );
    drop(broker);
    drop(fs);
}
