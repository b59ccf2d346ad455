#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 20; CI uses the default, a longer run
# is e.g. `scripts/fuzz.sh 3600`). Needs the nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). Crashes are saved under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
targets=(frames record_batches index_files)
cargo +nightly fuzz build -O "${targets[@]}" >/dev/null 2>&1 || cargo +nightly fuzz build -O
for target in "${targets[@]}"; do
    echo "fuzzing $target for ${seconds}s"
    cargo +nightly fuzz run -O "$target" -- -max_total_time="$seconds" -max_len=65536 2>&1 \
        | grep -E "^(Done|==|SUMMARY)|panicked|ERROR" || true
    if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
        echo "fuzz target $target found a crash: fuzz/artifacts/$target" >&2
        exit 1
    fi
done
