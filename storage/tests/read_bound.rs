//! The bound on O_DIRECT reads in flight (`handles::set_read_in_flight_bytes_max`): it holds
//! while segments are being written, and lets reads go at their own depth when none are. A test
//! binary of its own: the time of the last segment write is process-wide, so another test's
//! writes would keep the bound on.

mod common;

use std::rc::Rc;
use std::time::Duration;

use common::{batch_at, check_records, file_read_config, read_next, run, tmp};
use skein_storage::handles;
use skein_storage::Log;

/// Reads the whole log in reads of 1 MiB; every record once, in order.
async fn read_all(log: &Log) {
    let end = log.visible_offset();
    let (mut next, mut offsets) = (0, Vec::new());
    while next < end {
        let (bytes, _, after) = read_next(log, next, 1 << 20).await;
        let from = next;
        offsets.extend(check_records(bytes).into_iter().filter(|&o| o >= from));
        next = after;
    }
    assert_eq!(offsets, (0..end).collect::<Vec<_>>(), "every record once, in order");
}

#[test]
fn reads_in_flight_stay_within_the_bound_while_segments_are_written() {
    const BOUND: usize = 256 << 10;
    let dir = tmp();
    let (read_path, write_path) = (dir.path().join("read"), dir.path().join("write"));
    run(move || async move {
        handles::set_read_in_flight_bytes_max(Some(BOUND));
        let log = Log::open(&read_path, file_read_config(64 << 10)).await.unwrap();
        for _ in 0..60 {
            let first = log.next_offset();
            log.append(batch_at(first, 1000)).await.unwrap().ack.await.unwrap();
        }
        // A producer writes another log all along the first pass, one small batch after the
        // other (no pause of its own that could approach `WRITES_RECENT`).
        let writer = Rc::new(Log::open(&write_path, file_read_config(64 << 10)).await.unwrap());
        let stop = Rc::new(std::cell::Cell::new(false));
        let producing = {
            let (writer, stop) = (writer.clone(), stop.clone());
            glommio::spawn_local(async move {
                let mut written = 0;
                while !stop.get() {
                    let first = writer.next_offset();
                    writer.append(batch_at(first, 10)).await.unwrap().ack.await.unwrap();
                    written += 1;
                }
                written
            })
        };
        glommio::timer::sleep(Duration::from_millis(20)).await;
        handles::reset_reads_in_flight_peak();
        let before = skein_storage::metrics::snapshot().direct_read_bytes;
        read_all(&log).await;
        let read = skein_storage::metrics::snapshot().direct_read_bytes - before;
        let peak = handles::stats().reads_in_flight_peak_bytes;
        stop.set(true);
        assert!(producing.await > 0, "the other log was written meanwhile");
        assert!(read > 4 << 20, "the pass read from the disk: {read} bytes");
        assert!(peak <= BOUND, "{peak} bytes of reads in flight at once, over the bound of {BOUND}");
        assert!(peak > 0);

        // No writes for longer than `WRITES_RECENT`: a second pass from the beginning (a new
        // read-ahead stream: the first pass's ended at the log's end) goes at its own depth.
        glommio::timer::sleep(handles::WRITES_RECENT * 3).await;
        handles::reset_reads_in_flight_peak();
        read_all(&log).await;
        let peak = handles::stats().reads_in_flight_peak_bytes;
        assert!(peak > BOUND, "with no writes the reads were held back: at most {peak} bytes in flight");
        assert_eq!(handles::stats().reads_in_flight_bytes, 0, "every read is done");
        log.close().await.unwrap();
        Rc::try_unwrap(writer).ok().expect("the producer is done").close().await.unwrap();
    });
}

#[test]
fn a_read_woken_for_room_and_cancelled_before_it_runs_passes_the_room_on() {
    // The bound is a glommio semaphore, and reads waiting on it are cancelled (read-ahead
    // streams dropped, connections closed). A waiter that a released permit woke, cancelled
    // before it ran, used to keep the wake: the waiters behind it slept with the room free
    // until some new read came (glommio patch 6).
    run(|| async {
        let semaphore = Rc::new(glommio::sync::Semaphore::new(1));
        let held = semaphore.acquire_static_permit(1).await.unwrap();
        let woken = {
            let semaphore = semaphore.clone();
            glommio::spawn_local(async move { semaphore.acquire_static_permit(1).await.map(drop) })
        };
        let behind = {
            let semaphore = semaphore.clone();
            glommio::spawn_local(async move { semaphore.acquire_static_permit(1).await.map(drop) })
        };
        // Both wait in order.
        glommio::timer::sleep(Duration::from_millis(10)).await;
        drop(held); // wakes the first
        drop(woken); // cancelled before it runs
        let timeout = glommio::timer::sleep(Duration::from_secs(5));
        let got = match futures::future::select(std::pin::pin!(behind), std::pin::pin!(timeout)).await {
            futures::future::Either::Left((result, _)) => result.is_ok(),
            futures::future::Either::Right(_) => false,
        };
        assert!(got, "the waiter behind the cancelled one never got the free room");
    });
}
