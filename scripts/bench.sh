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

for tool in fio iperf3; do
  command -v "$tool" >/dev/null || { echo "installing $tool"; apt-get install -y "$tool" >/dev/null; }
done
cargo build --release -p skein-bench -p skein-broker >/dev/null
bench=./target/release/skein-bench
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {"d": d}))' "$@"; }

echo "== limits"
fio --name=limit --rw=write --bs=1M --iodepth=4 --direct=1 --ioengine=io_uring --size=2G \
  --filename="$data_dir/fio.dat" --output-format=json >"$out/fio.json"
rm -f "$data_dir/fio.dat"
fio_mib=$(json "$out/fio.json" 'round(d["jobs"][0]["write"]["bw"]/1024, 1)')
iperf3 -s -D -1 -p 5299 >/dev/null 2>&1
sleep 0.5
iperf3 -c 127.0.0.1 -p 5299 -t 5 -J >"$out/iperf3.json"
iperf_mib=$(json "$out/iperf3.json" 'round(d["end"]["sum_received"]["bits_per_second"]/8/1048576, 1)')
echo "fio ${fio_mib} MiB/s, iperf3 loopback ${iperf_mib} MiB/s"

run() { # name, then skein-bench arguments
  local name=$1; shift
  echo "== $name"
  "$bench" "$@" --embedded --data-dir "$data_dir" --quiet --json "$out/$name.json" --chart "$out/$name.svg"
}

run produce-never produce --messages "$messages" --fsync never --linger-ms 5
run produce-always produce --messages "$messages" --fsync always --linger-ms 5

# Consumption needs one broker across runs: a first pass reads what was just written (from
# disk: O_DIRECT writes leave nothing in the page cache), a second the same data warm.
rm -rf "$data_dir/consume-broker"
./target/release/skein broker --data-dir "$data_dir/consume-broker" --listen 127.0.0.1:0 >"$out/broker.out" 2>"$out/broker.log" &
broker_pid=$!
trap 'kill $broker_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening "$out/broker.out" && break; sleep 0.1; done
addr=$(grep -o '127.0.0.1:[0-9]*' "$out/broker.out" | head -1)
"$bench" produce --bootstrap "$addr" --topic consume-test --messages "$messages" --quiet >/dev/null
for pass in cold warm; do
  echo "== consume-$pass"
  "$bench" consume --bootstrap "$addr" --broker-fsync never --topic consume-test --messages "$messages" \
    --quiet --json "$out/consume-$pass.json" --chart "$out/consume-$pass.svg"
done
kill $broker_pid; wait $broker_pid 2>/dev/null || true; trap - EXIT
peak=$(json "$out/produce-never.json" 'int(d["records_per_s"])')
half=$((peak / 2))
run latency-never produce --duration 10 --rate "$half" --linger-ms 0 --fsync never
run e2e-never e2e --duration 10 --rate "$half" --linger-ms 0 --fsync never
run e2e-quarter e2e --duration 10 --rate "$((peak / 4))" --linger-ms 0 --fsync never
peak_always=$(json "$out/produce-always.json" 'int(d["records_per_s"])')
run latency-always produce --duration 10 --rate "$((peak_always / 2))" --linger-ms 0 --fsync always

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
# The many-partitions section (scripts/bench-partitions.sh) is kept as it is.
kept=$(sed -n '/^<!-- partitions -->/,$p' BENCHMARKS.md 2>/dev/null || true)
python3 - "$out" "$fio_mib" "$iperf_mib" "$commit" >BENCHMARKS.md.new <<'PY'
import json, sys, datetime
out, fio, iperf, commit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def load(name): return json.load(open(f"{out}/{name}.json"))
def lat(l): return "—" if not l else f"{l['p50']} / {l['p90']} / {l['p99']} / {l['p999']} / {l['p9999']} / {l['max']}"
rows = [
    ("produce, fsync=never, acks=all", "produce-never", iperf, "iperf3"),
    ("produce, fsync=always, acks=all", "produce-always", fio, "fio"),
    ("consume, first read (from disk)", "consume-cold", iperf, "iperf3"),
    ("consume, second read (page cache)", "consume-warm", iperf, "iperf3"),
    ("produce at 50% of peak, fsync=never", "latency-never", None, None),
    ("produce at 50% of peak, fsync=always", "latency-always", None, None),
    ("end-to-end at 50% of peak, fsync=never", "e2e-never", None, None),
    ("end-to-end at 25% of peak, fsync=never", "e2e-quarter", None, None),
]
print("# Benchmarks\n")
print(f"Produced by `scripts/bench.sh` on {datetime.date.today()} at commit `{commit}`: 1 KiB records, keys null, "
      "4 partitions, 1 producer and 1 consumer, broker embedded in the load generator's process "
      "(2 shards; broker and load generator share the machine's CPUs). Limits measured in the same run: "
      f"**fio** sequential O_DIRECT write (1 MiB, iodepth 4) on the data directory **{fio} MiB/s**, "
      f"**iperf3** loopback **{iperf} MiB/s**.\n")
print("| run | records/s | MiB/s | of limit | produce-ack latency µs p50 / p90 / p99 / p99.9 / p99.99 / max | end-to-end latency µs p50 / p90 / p99 / p99.9 / p99.99 / max |")
print("|---|---|---|---|---|---|")
for label, name, limit, limit_name in rows:
    d = load(name)
    ratio = f"{d['mib_per_s'] / limit * 100:.0f}% of {limit_name}" if limit else "—"
    print(f"| {label} | {d['records_per_s']:.0f} | {d['mib_per_s']:.1f} | {ratio} | {lat(d.get('latency_us'))} | {lat(d.get('e2e_latency_us'))} |")
print("\nLatency runs offer half of the peak measured by the produce runs above (`--rate`); their load "
      "generator uses one tokio thread, leaving a core to the broker. JSON reports and SVG charts of each run "
      "are in `bench-results/` (not committed; run the script).")
PY
if [[ -n $kept ]]; then printf '\n%s\n' "$kept" >>BENCHMARKS.md.new; fi
mv BENCHMARKS.md.new BENCHMARKS.md
cat BENCHMARKS.md
