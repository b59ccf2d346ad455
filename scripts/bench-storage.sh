#!/usr/bin/env bash
# Append throughput of the storage engine next to fio's sequential O_DIRECT write, measured on
# the same directory in the same run. Usage: scripts/bench-storage.sh [DIR] [TOTAL_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-./target/bench-storage}
total=${2:-1024}
mkdir -p "$dir"
command -v fio >/dev/null || { echo "installing fio"; apt-get install -y fio >/dev/null; }
cargo build --release -p skein-storage --example append_throughput
fio_out=$(fio --name=limit --rw=write --bs=1M --iodepth=4 --direct=1 --ioengine=io_uring \
  --size="${total}M" --filename="$dir/fio.dat" --output-format=json)
rm -f "$dir/fio.dat"
fio_mib=$(python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); print(round(j["jobs"][0]["write"]["bw"]/1024,1))' <<<"$fio_out")
echo "fio sequential O_DIRECT write (1 MiB, iodepth 4): ${fio_mib} MiB/s"
for fsync in never always; do
  line=$(./target/release/examples/append_throughput --dir "$dir" --record-size 1024 \
    --batch-records 1000 --total-mib "$total" --fsync "$fsync" | tail -1)
  mib=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["mib_per_s"])' "$line")
  ratio=$(python3 -c "print(round($mib/$fio_mib*100))")
  echo "skein append, fsync=$fsync: ${mib} MiB/s = ${ratio}% of fio   $line"
done
