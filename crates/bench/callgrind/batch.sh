#!/usr/bin/env bash
# Instructions the whole redis-server executes per check (reading requests and writing replies
# included), counted by callgrind, for the single compact script pipelined B at a time or for
# batch scripts B checks per call.
#
# Usage: batch.sh MODE SCRIPT KEYS B [CALLS]   (PORT=6611 by default; KEEP=<file> keeps the profile)
#   MODE    single (lua/token_bucket_compact.lua) | spec (lua/token_bucket.lua, two keys) | v1 (the
#           batch format before 2026-11-30: struct.pack("<ddddBc0") per entry) | v2 (rules once,
#           "<BBHdd" per entry, flagged as the client flags repeated keys) | v1k, v2k (the same
#           for lua/token_bucket_batch.lua, two keys each)
#   KEYS    N (calls over N buckets created first) | fresh (a new bucket per call) | hot (one)
# Example: batch.sh v2 lua/token_bucket_compact_batch.lua 2000 64 10240
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mode=$1; script=$2; keys=$3; B=$4; calls=${5:-20000}; port=${PORT:-6611}
out=$(mktemp -d)
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$out"' EXIT
valgrind --tool=callgrind --callgrind-out-file="$out/cg.out" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
vp=$!
for _ in $(seq 200); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.2; done
# Warm-up: load the script, create every bucket (twice over) and a few fresh ones.
if [ "$keys" != fresh ]; then
    n=$keys; [ "$keys" = hot ] && n=1
    python3 "$here/batch_drive.py" $port $mode $script $(( (2 * n / B + 40) * B )) $keys $B
fi
python3 "$here/batch_drive.py" $port $mode $script $((B*10)) fresh $B
callgrind_control -z $vp >/dev/null 2>&1
python3 "$here/batch_drive.py" $port $mode $script $calls $keys $B
callgrind_control -d $vp >/dev/null 2>&1
sleep 0.5
total=$(grep -h '^summary:' "$out"/cg.out.* | tail -1 | awk '{print $2}')
# KEEP=<file>: keep the profile, for callgrind_annotate.
if [ -n "${KEEP:-}" ]; then cp "$(ls "$out"/cg.out.* | head -1)" "$KEEP"; fi
echo "$mode $(basename $script) keys=$keys B=$B: $((total / calls)) instructions per check"
