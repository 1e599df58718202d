#!/usr/bin/env bash
# Instructions the HTTP layer adds per request, in steady state, counted by callgrind.
#
# Usage: layer.sh [MODE ...]   (default: quiet governor; modes of profile_layer.rs)
# For each mode and for `none` (the bare route), counts the whole process at 20,000 and at
# 40,000 requests; the difference divided by 20,000 is the cost of one request without what runs
# once (start-up, the first read of a calibrated clock). Prints each mode's cost over `none`.
# Needs valgrind (apt-get install valgrind). Builds the driver; about 30 s per mode after that.
set -euo pipefail
cd "$(dirname "$0")/../../.."
cargo build --release -q -p ratelimit-http --example profile_layer
driver=${CARGO_TARGET_DIR:-target}/release/examples/profile_layer
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() {
    valgrind --tool=callgrind --callgrind-out-file="$out/cg.out" "$driver" "$1" "$2" 2>&1 \
        | awk '/Collected/ {print $4}'
}
steady() {
    local small large
    small=$(count "$1" 20000)
    large=$(count "$1" 40000)
    echo $(((large - small) / 20000))
}
none=$(steady none)
echo "none: $none instructions per request (the bare route)"
for mode in "${@:-quiet governor}"; do
    for m in $mode; do
        echo "$m: $(($(steady "$m") - none)) instructions per request over none"
    done
done
