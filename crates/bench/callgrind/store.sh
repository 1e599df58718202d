#!/usr/bin/env bash
# Instructions the whole redis-server executes per check when 64 tasks check through the
# coalescing RedisStorage (compact layout, 20,000 existing buckets), against one EVALSHA of the
# compact script per check over one multiplexed connection: the probe
# `probe_redis_cost_per_check` in tests/tests/coalesce.rs, with redis-server under callgrind.
#
# Usage: store.sh [coalesced|raw] [CHECKS_PER_TASK]   (PORT=6615 by default)
# Without valgrind's slowdown, the same probe gives Redis's CPU time per check (INFO cpu):
#   redis-server --port 6614 --save "" --appendonly no --daemonize yes
#   RCPU_PROBE_PORT=6614 RCPU_PROBE_MODE=coalesced RCPU_PROBE_CHECKS=1500 \
#     cargo test --release -p ratelimit-tests --test coalesce -- --ignored probe_ --nocapture
set -euo pipefail
mode=${1:-coalesced}
per_task=${2:-300}
port=${PORT:-6615}
out=$(mktemp -d)
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$out"' EXIT
cargo test --release -q -p ratelimit-tests --test coalesce --no-run
valgrind --tool=callgrind --callgrind-out-file="$out/cg.out" \
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
pid=$!
for _ in $(seq 200); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.2; done
RCPU_PROBE_PORT=$port RCPU_PROBE_MODE=$mode RCPU_PROBE_CHECKS=$per_task RCPU_PROBE_CALLGRIND=$pid \
    cargo test --release -q -p ratelimit-tests --test coalesce -- --ignored probe_ --nocapture \
    | grep checks
sleep 1
total=$(grep -h '^summary:' "$out"/cg.out.* | tail -1 | awk '{print $2}')
echo "$mode: $((total / (64 * per_task))) instructions per check"
