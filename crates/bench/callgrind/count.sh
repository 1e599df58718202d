#!/usr/bin/env bash
# Instructions redis-server executes per token-bucket EVALSHA, counted by callgrind.
#
# Usage: count.sh LAYOUT [existing|new] [PORT]
#   LAYOUT    spec or compact (see drive.py)
#   existing  (default) 10,000 calls over 2,000 buckets created beforehand
#   new       10,000 calls, each creating a bucket
# Needs valgrind (apt-get install valgrind) and redis-server. Takes about a minute.
set -euo pipefail
layout=$1
mode=${2:-existing}
port=${3:-6502}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
trap 'redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$out"' EXIT
valgrind --tool=callgrind --toggle-collect=evalShaCommand --callgrind-out-file="$out/cg.out" \
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
valgrind_pid=$!
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.2; done
# Warm up: load the script, create 2,000 buckets and touch each twice.
python3 "$here/drive.py" "$port" "$layout" 4000 2000
callgrind_control -z "$valgrind_pid" >/dev/null 2>&1
if [ "$mode" = new ]; then
    python3 "$here/drive.py" "$port" "$layout" 10000 10000 fresh
else
    python3 "$here/drive.py" "$port" "$layout" 10000 2000
fi
callgrind_control -d "$valgrind_pid" >/dev/null 2>&1
sleep 1
total=$(grep -h '^summary:' "$out"/cg.out.* | tail -1 | awk '{print $2}')
echo "$layout, $mode buckets: $((total / 10000)) instructions per EVALSHA"
