#!/usr/bin/env bash
# The standard benchmark suite: produce, consume and end-to-end at 1 KiB records, fsync never
# and always, latency at 50% of the measured peak, next to the machine's limits measured in the
# same run (fio sequential O_DIRECT write on the data directory, iperf3 on loopback). Writes the
# JSON reports and charts to bench-results/ and the table to BENCHMARKS.md.
#
# Usage: scripts/bench.sh [DATA_DIR] [MESSAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:-./target/bench-data}
messages=${2:-4000000}
out=bench-results
mkdir -p "$data_dir" "$out"
# At most one run's data exists at a time: MESSAGES records of about 1 KiB, plus fio's 2 GiB.
need_kib=$(( messages * 11 / 10 + 3 * 1024 * 1024 ))
free_kib=$(df -Pk "$data_dir" | awk 'NR == 2 {print $4}')
if (( free_kib < need_kib )); then
  echo "error: $data_dir has $((free_kib / 1024)) MiB free; this run needs about $((need_kib / 1024)) MiB" >&2
  exit 1
fi

for tool in fio iperf3; do
  command -v "$tool" >/dev/null || { echo "installing $tool"; apt-get install -y "$tool" >/dev/null; }
done
cargo build --release -p skein-bench -p skein-cli >/dev/null
bench=./target/release/skein-bench
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {"d": d}))' "$@"; }

echo "== limits"
fio --name=limit --rw=write --bs=1M --iodepth=4 --direct=1 --ioengine=io_uring --size=2G \
  --filename="$data_dir/fio.dat" --output-format=json >"$out/fio.json"
rm -f "$data_dir/fio.dat"
fio_mib=$(json "$out/fio.json" 'round(d["jobs"][0]["write"]["bw"]/1024, 1)')
# iperf3 loopback, 5 s; the JSON goes to $out/iperf3-$1.json, the MiB/s to stdout. It is
# measured three times (before, between and after the produce runs; this VM's loopback speed
# moves by 3x within minutes) and the produce row is compared with the highest.
iperf() { # name, port (a port of its own: the last server may still be exiting)
  iperf3 -s -D -1 -p "$2" >/dev/null 2>&1
  sleep 0.5
  iperf3 -c 127.0.0.1 -p "$2" -t 5 -J >"$out/iperf3-$1.json"
  json "$out/iperf3-$1.json" 'round(d["end"]["sum_received"]["bits_per_second"]/8/1048576, 1)'
}
iperf_before=$(iperf before 5297)
echo "fio ${fio_mib} MiB/s, iperf3 loopback ${iperf_before} MiB/s"
# The ceiling: loopback TCP and QUIC into a shard-like executor that writes the bytes with
# O_DIRECT (no records), beside the same transfers without the disk and the disk alone, 2 GiB
# a round, 3 alternating rounds of each. The most any broker could ingest here; the produce
# rows are compared with it as well as with iperf3 and quinn's bulk transfer.
echo "== ceiling"
"$bench" ceiling --quic-mib 2048 --rounds 3 --data-dir "$data_dir" --json "$out/ceiling.json"

run() { # name, then skein-bench arguments
  local name=$1; shift
  echo "== $name"
  "$bench" "$@" --embedded --data-dir "$data_dir" --quiet --json "$out/$name.json" --chart "$out/$name.svg"
}

# Batches of 1000 records (1 MB), as in issue 12's measurement and the produce-process row
# below. Alternating 5 pairs of 3 M records (2026-12-05), the client's 256 KiB default
# against 1 MB: 1372/1461, 1401/1498, 1217/1250, 1482/1425, 1438/1497 MiB/s (1 MB ahead in 4).
run produce-never produce --messages "$messages" --fsync never --linger-ms 5 --batch-bytes 1000000
iperf_between=$(iperf between 5298)
run produce-always produce --messages "$messages" --fsync always --linger-ms 5 --batch-bytes 1000000
iperf_after=$(iperf after 5299)
iperf_mib=$(printf '%s\n' "$iperf_before" "$iperf_between" "$iperf_after" | sort -g | tail -1)
echo "iperf3 loopback ${iperf_before} / ${iperf_between} / ${iperf_after} MiB/s; the produce row uses ${iperf_mib}"

# Catch-up reads: produce about 4 GB of 1000-byte records into a broker of its own, restart
# it (nothing of its data is in memory: O_DIRECT writes leave nothing in the page cache), read
# everything from the beginning (cold), then read it all again (re-read). fio reads the same
# directory's disk right after, in the same run.
rm -rf "$data_dir/consume-broker"
start_broker() {
  : >"$out/broker.out"
  ./target/release/skein broker --data-dir "$data_dir/consume-broker" --listen 127.0.0.1:0 >"$out/broker.out" 2>>"$out/broker.log" &
  broker_pid=$!
  for _ in $(seq 600); do grep -q listening "$out/broker.out" && break; sleep 0.1; done
  addr=$(grep -o '127.0.0.1:[0-9]*' "$out/broker.out" | head -1)
}
trap 'kill $broker_pid 2>/dev/null || true' EXIT
start_broker
# This fill is also the produce row against a broker process (how users run one), next to the
# embedded produce row above.
echo "== produce-process"
"$bench" produce --bootstrap "$addr" --broker-fsync never --topic consume-test --messages "$messages" --message-size 1000 \
  --batch-bytes 1000000 --quiet --json "$out/produce-process.json" --chart "$out/produce-process.svg"
kill $broker_pid; wait $broker_pid 2>/dev/null || true
start_broker
for pass in cold warm; do
  echo "== consume-$pass"
  "$bench" consume --bootstrap "$addr" --broker-fsync never --topic consume-test --messages "$messages" \
    --message-size 1000 --quiet --json "$out/consume-$pass.json" --chart "$out/consume-$pass.svg"
done
# Replay by several groups at once: restarted again (cold), three consumers each read it all
# from the beginning at the same time; the row sums them. With one read-ahead stream per log,
# each read at another place dropped the others' (three got 305-361 MiB/s each where one
# alone got 1945).
kill $broker_pid; wait $broker_pid 2>/dev/null || true
start_broker
echo "== consume-three"
three=()
for i in 1 2 3; do
  "$bench" consume --bootstrap "$addr" --broker-fsync never --topic consume-test --messages "$messages" \
    --message-size 1000 --quiet --json "$out/consume-three-$i.json" &
  three+=($!)
done
wait "${three[@]}"
# A producer at a quarter of the peak while a consumer catches up beside it: restarted again
# (cold), the producer writes a topic of its own for 10 s and the consumer reads everything
# from the beginning, starting 3 s in. Cold reads queued in the device delay the writes behind
# them (`storage.read_in_flight_bytes_max`).
kill $broker_pid; wait $broker_pid 2>/dev/null || true
start_broker
echo "== produce-beside-catch-up"
quarter=$(( $(json "$out/produce-never.json" 'int(d["records_per_s"])') / 4 ))
"$bench" produce --bootstrap "$addr" --broker-fsync never --topic beside-catch-up --duration 10 --rate "$quarter" \
  --linger-ms 0 --quiet --json "$out/produce-beside-catch-up.json" --chart "$out/produce-beside-catch-up.svg" &
beside=$!
sleep 3
"$bench" consume --bootstrap "$addr" --broker-fsync never --topic consume-test --messages "$messages" \
  --message-size 1000 --quiet --json "$out/consume-beside-producer.json"
wait $beside
kill $broker_pid; wait $broker_pid 2>/dev/null || true; trap - EXIT
rm -rf "$data_dir/consume-broker"
fio --name=limit-read --rw=read --bs=1M --iodepth=4 --direct=1 --ioengine=io_uring --size=2G \
  --filename="$data_dir/fio.dat" --output-format=json >"$out/fio-read.json"
rm -f "$data_dir/fio.dat"
fio_read_mib=$(json "$out/fio-read.json" 'round(d["jobs"][0]["read"]["bw"]/1024, 1)')
echo "fio read ${fio_read_mib} MiB/s"
peak=$(json "$out/produce-never.json" 'int(d["records_per_s"])')
half=$((peak / 2))
run latency-never produce --duration 10 --rate "$half" --linger-ms 0 --fsync never
# End to end, the load generator gets both CPUs (it produces and consumes). Measured after a
# 3 s warm-up: a fresh broker's first second (client 31 ms, shards 22 ms and the slowest write
# 32 ms late in one run; its tail caches fill up to 512 MiB of fresh pages first, while a warm
# broker took 17, 34 623 and 15 page faults in three produces of 3 M records) left the consumer a backlog that
# took seconds to drain at 80-96 % CPU, so with 1 s the row measured the broker's start, not
# half load (2026-12-04, 594 K records/s: p99 104 and 127 ms with 1 s, 20.2 and 15.6 ms with
# 3 s). The timeline keeps the warm-up seconds.
run e2e-never e2e --duration 10 --warmup 3 --rate "$half" --linger-ms 0 --fsync never --client-threads 2
run e2e-quarter e2e --duration 10 --warmup 3 --rate "$((peak / 4))" --linger-ms 0 --fsync never --client-threads 2
peak_always=$(json "$out/produce-always.json" 'int(d["records_per_s"])')
run latency-always produce --duration 10 --rate "$((peak_always / 2))" --linger-ms 0 --fsync always

# QUIC: quinn on a broker shard's executor next to quinn on pinned tokio (the design's gate),
# then the produce run over QUIC.
echo "== quic-bulk"
"$bench" quic-bulk --quic-mib 1024 --rounds 3 --json "$out/quic-bulk.json"
run produce-quic produce --messages "$messages" --fsync never --linger-ms 5 --transport quic
run produce-quic-one produce --messages "$messages" --fsync never --linger-ms 5 --transport quic --quic-one-connection

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# The many-partitions section (scripts/bench-partitions.sh) is kept as it is.
kept=$(sed -n '/^<!-- partitions -->/,$p' BENCHMARKS.md 2>/dev/null || true)
python3 - "$out" "$fio_mib" "$iperf_mib" "$commit" "$fio_read_mib" "$half" "$iperf_before / $iperf_between / $iperf_after" >BENCHMARKS.md.new <<'PY'
import json, sys, datetime
out, fio, iperf, commit, fio_read, half, iperfs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], float(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
def load(name):
    if name == "consume-three":
        three = [json.load(open(f"{out}/consume-three-{i}.json")) for i in (1, 2, 3)]
        return {"records_per_s": sum(d["records_per_s"] for d in three), "mib_per_s": sum(d["mib_per_s"] for d in three)}
    return json.load(open(f"{out}/{name}.json"))
def lat(l): return "—" if not l else f"{l['p50']} / {l['p90']} / {l['p99']} / {l['p999']} / {l['p9999']} / {l['max']}"
quic = load("quic-bulk")
ceiling = load("ceiling")
tcp_ceiling, quic_ceiling = ceiling["tcp_disk_mib_per_s"], ceiling["quic_disk_mib_per_s"]
read_ceiling = ceiling["read_tcp_mib_per_s"]
rows = [
    ("produce, fsync=never, acks=all (batches of about 1 MB)", "produce-never", iperf, "iperf3", tcp_ceiling),
    ("produce into a broker process of its own, fsync=never, acks=all (1000-byte records, batches of about 1 MB)", "produce-process", iperf, "iperf3", tcp_ceiling),
    ("produce over QUIC (a connection per shard), fsync=never, acks=all", "produce-quic", quic["tokio_mib_per_s"], "quinn bulk", quic_ceiling),
    ("produce over QUIC (one connection), fsync=never, acks=all", "produce-quic-one", quic["tokio_mib_per_s"], "quinn bulk", quic_ceiling),
    ("produce, fsync=always, acks=all (batches of about 1 MB)", "produce-always", fio, "fio", tcp_ceiling),
    ("consume from the beginning after a restart (cold: from disk)", "consume-cold", fio_read, "fio read", read_ceiling),
    ("consume it all again (re-read)", "consume-warm", fio_read, "fio read", read_ceiling),
    ("three consumers at once, each all of it from the beginning after a restart (cold; summed)", "consume-three", fio_read, "fio read", read_ceiling),
    ("produce at 25% of peak into a broker process while a consumer catches up beside it (from 3 s on), fsync=never", "produce-beside-catch-up", None, None, None),
    ("the consumer beside it: all of it from the beginning after a restart (cold)", "consume-beside-producer", fio_read, "fio read", read_ceiling),
    ("produce at 50% of peak, fsync=never", "latency-never", None, None, None),
    ("produce at 50% of peak, fsync=always", "latency-always", None, None, None),
    ("end-to-end at 50% of peak, fsync=never", "e2e-never", None, None, None),
    ("end-to-end at 25% of peak, fsync=never", "e2e-quarter", None, None, None),
]
print("# Benchmarks\n")
print(f"Produced by `scripts/bench.sh` on {datetime.date.today()} at commit `{commit}`: 1 KiB records, keys null, "
      "4 partitions, 1 producer and 1 consumer, broker embedded in the load generator's process "
      "(2 shards; broker and load generator share the machine's CPUs). Limits measured in the same run: "
      f"**fio** sequential O_DIRECT write (1 MiB, iodepth 4) on the data directory **{fio} MiB/s**, "
      f"**fio** sequential O_DIRECT read (1 MiB, iodepth 4) **{fio_read} MiB/s**, "
      f"**iperf3** loopback **{iperf} MiB/s** (the highest of {iperfs} MiB/s, measured before, between and after "
      "the two produce runs). Consume rows: 1000-byte records in batches of about 1 MB, "
      "a broker process of its own restarted before the first read.\n")
print("| run | records/s | MiB/s | of limit | of ceiling | produce-ack latency µs p50 / p90 / p99 / p99.9 / p99.99 / max | end-to-end latency µs p50 / p90 / p99 / p99.9 / p99.99 / max |")
print("|---|---|---|---|---|---|---|")
for label, name, limit, limit_name, ceiling_limit in rows:
    d = load(name)
    ratio = f"{d['mib_per_s'] / limit * 100:.0f}% of {limit_name}" if limit else "—"
    of_ceiling = f"{d['mib_per_s'] / ceiling_limit * 100:.0f}%" if ceiling_limit else "—"
    print(f"| {label} | {d['records_per_s']:.0f} | {d['mib_per_s']:.1f} | {ratio} | {of_ceiling} | {lat(d.get('latency_us'))} | {lat(d.get('e2e_latency_us'))} |")
e2e = load("e2e-never")
achieved = e2e["records_per_s"] / half * 100
e2e_p99_ms = e2e["e2e_latency_us"]["p99"] / 1000
verdict = "met" if achieved >= 95 and e2e_p99_ms <= 20 else "MISSED"
print(f"\nEnd to end at 50% of the peak: {e2e['records_per_s']:.0f} of {half:.0f} records/s offered ({achieved:.0f}%), "
      f"end-to-end p99 {e2e_p99_ms:.1f} ms: target (≥ 95% achieved, p99 ≤ 20 ms) {verdict}.")
print(f"\nQUIC (`skein-bench quic-bulk`, 1 GiB on one stream, medians of 3 alternating rounds): quinn driven by a "
      f"broker shard's glommio executor **{quic['glommio_mib_per_s']:.1f} MiB/s**, quinn on a pinned tokio current-thread "
      f"runtime **{quic['tokio_mib_per_s']:.1f} MiB/s**: {quic['ratio']:.2f} (gate ≥ 0.8). The produce-over-QUIC row's "
      "limit is the tokio figure (target ≥ 0.8 of it).")
print(f"\nThe ceiling (`skein-bench ceiling --quic-mib 2048 --rounds 3`, medians of 3 alternating rounds of 2 GiB): "
      f"the bytes alone, no records, from a sender on the last CPU into an executor on CPU 0 that writes them with "
      f"O_DIRECT, 1 MiB writes, 4 in flight, into a preallocated file of the data directory: TCP into O_DIRECT "
      f"**{tcp_ceiling:.1f} MiB/s** (TCP alone {ceiling['tcp_mib_per_s']:.1f}), QUIC into O_DIRECT **{quic_ceiling:.1f} MiB/s** "
      f"(QUIC alone {ceiling['quic_mib_per_s']:.1f}), the executor's O_DIRECT writes alone {ceiling['disk_mib_per_s']:.1f} MiB/s; "
      f"the way out, O_DIRECT reads (1 MiB, 4 in flight) of a file it wrote first, each sent over TCP as it completes to a "
      f"thread on the last CPU, **{read_ceiling:.1f} MiB/s** (the reads alone {ceiling['read_mib_per_s']:.1f}, TCP out alone "
      f"{ceiling['tcp_out_mib_per_s']:.1f}). No broker can move bytes faster here than the paths that only move them; the "
      "\"of ceiling\" column compares each row with its path (TCP produce with TCP into O_DIRECT, QUIC produce with QUIC "
      "into O_DIRECT, consume with O_DIRECT reads sent over TCP).")
print("\nLatency runs offer half of the peak measured by the produce runs above (`--rate`); their load "
      "generator uses one tokio thread (two end to end, where it produces and consumes), leaving a core to the broker. "
      "End-to-end rows are measured after a 3 s warm-up (the others after 1 s): a fresh broker's first second "
      "left the consumer a backlog that took seconds to drain (see `scripts/bench.sh`). JSON reports and SVG charts of each run "
      "are in `bench-results/` (not committed; run the script).")
PY
if [[ -n $kept ]]; then printf '\n%s\n' "$kept" >>BENCHMARKS.md.new; fi
mv BENCHMARKS.md.new BENCHMARKS.md
cat BENCHMARKS.md
