#!/usr/bin/env bash
# What many partitions cost a node: `skein-bench partitions` (a broker child process; see the
# skein-bench crate docs) with the default open-files budget and with a budget of 1,000 segment
# files, 10 records of 1 KiB per partition. Writes bench-results/partitions-*.json and the
# "Many partitions" section of BENCHMARKS.md (between its marker and the end of the file).
#
#   scripts/bench-partitions.sh [PARTITIONS] [DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
partitions=${1:-10000}
data=${2:-.}
out=bench-results
mkdir -p "$out" "$data"
# About 80 KiB of disk per partition, and head-room.
need_kib=$((partitions * 200 + 1048576))
free_kib=$(df -Pk "$data" | awk 'NR == 2 {print $4}')
if ((free_kib < need_kib)); then
    echo "error: $data has $((free_kib / 1024)) MiB free; $partitions partitions need about $((need_kib / 1024)) MiB" >&2
    exit 1
fi
cargo build --release --bin skein-bench
bench=target/release/skein-bench
$bench partitions --partitions "$partitions" --messages 10 --message-size 1024 --data-dir "$data" \
    --json "$out/partitions-default.json"
$bench partitions --partitions "$partitions" --messages 10 --message-size 1024 --data-dir "$data" \
    --broker-arg=--open-files-max --broker-arg=1000 --json "$out/partitions-budget-1000.json"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
section=$(python3 - "$out" "$commit" <<'PY'
import json, sys, datetime
out, commit = sys.argv[1], sys.argv[2]
runs = [("default budget", "partitions-default"), ("`--open-files-max 1000`", "partitions-budget-1000")]
first = json.load(open(f"{out}/{runs[0][1]}.json"))
print("<!-- partitions -->")
print("## Many partitions\n")
print(f"Produced by `scripts/bench-partitions.sh` on {datetime.date.today()} at commit `{commit}`: one topic of "
      f"{first['partitions']} partitions on a broker of {first['cores']} shards (a child process), "
      f"{first['records_per_partition']} records of {first['message_size']} bytes written to each partition by one "
      "producer, read back by one consumer, then the broker stopped (SIGTERM), started again and everything read again. "
      "Memory and disk per partition are at rest (3 s after the reads), beyond the broker with no topic.\n")
print("| run | create | write | read | stop → restart to ready | read again | memory / partition | disk / partition | files open (max) | client peak RSS |")
print("|---|---|---|---|---|---|---|---|---|---|")
for label, name in runs:
    d = json.load(open(f"{out}/{name}.json"))
    steps = {s["step"]: s for s in d["steps"]}
    files = max(s["open_files"] for s in d["steps"])
    print(f"| {label} | {steps['create topic']['seconds']:.1f} s | {steps['write every partition']['seconds']:.1f} s | "
          f"{steps['read every partition']['seconds']:.1f} s | {d['restart_to_ready_s']:.2f} s | "
          f"{steps['read every partition again']['seconds']:.1f} s | {d['rss_kib_per_partition']:.1f} KiB | "
          f"{d['disk_bytes_per_partition'] / 1024:.0f} KiB | {files} | {d['client_rss_peak_kib'] // 1024} MiB |")
print("\nDisk after creating the topic, before any record: "
      f"{json.load(open(f'{out}/{runs[0][1]}.json'))['steps'][1]['disk_allocated_bytes'] >> 20} MiB. "
      "JSON reports with every step in `bench-results/partitions-*.json`.")
PY
)
if [[ -f BENCHMARKS.md ]] && grep -q '^<!-- partitions -->' BENCHMARKS.md; then
    sed -i '/^<!-- partitions -->/,$d' BENCHMARKS.md
fi
printf '%s\n' "$section" >>BENCHMARKS.md
sed -n '/^<!-- partitions -->/,$p' BENCHMARKS.md
