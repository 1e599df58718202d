#!/usr/bin/env bash
# Instructions per check of figure 3's contenders (the memory store through the port and
# without a future, the adapter over it, governor's keyed limiter), counted by callgrind.
#
# Usage: crates/bench/callgrind/memory.sh [CHECKS] [CONTENDER...]
#   CHECKS      checks counted per contender (default 200000)
#   CONTENDER   store, store-sync, adapter or governor (default: all four)
# Runs `ratelimit-bench memory --only C --checks N` twice under callgrind, N = 0 and CHECKS,
# counting only inside the contender's loop (--toggle-collect), and prints the difference over
# CHECKS: one check of an existing bucket (the warm-up pass creates them all in both runs).
# Needs valgrind; builds the bench in release mode first, unless BENCH_BIN names a binary to count.
# Takes about a minute per contender.
set -euo pipefail
checks=${1:-200000}
shift || true
contenders=("$@")
[ ${#contenders[@]} -gt 0 ] || contenders=(store store-sync adapter governor)
root=$(cd "$(dirname "$0")/../../.." && pwd)
bin=${BENCH_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release -q -p ratelimit-bench --manifest-path "$root/Cargo.toml"
    bin=$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/ratelimit-bench
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() { # contender checks
    valgrind --tool=callgrind --toggle-collect="ratelimit_bench::memory_backend::Contenders::${1//-/_}*" \
        --callgrind-out-file="$out/cg.$1.$2" "$bin" memory --only "$1" --checks "$2" >/dev/null 2>&1
    grep -h '^summary:' "$out/cg.$1.$2" | awk '{print $2}'
}
for contender in "${contenders[@]}"; do
    base=$(count "$contender" 0)
    total=$(count "$contender" "$checks")
    if [ -z "$base" ] || [ -z "$total" ]; then
        echo "callgrind found nothing to count: does $bin have the memory subcommand?" >&2
        exit 1
    fi
    echo "$contender: $(( (total - base) / checks )) instructions per check ($checks checks)"
done
