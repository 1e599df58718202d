#!/usr/bin/env bash
# Instructions the HTTP layer adds per request, counted by callgrind.
#
# Usage: layer.sh [MODE ...]   (default: quiet governor; the modes of
#                               crates/http/examples/profile_layer.rs)
# For each mode and for `none` (the bare route), counts the 20,000 measured requests of the
# profile driver (after its warm-up: --toggle-collect=profile_layer::measured) and prints each
# mode's instructions per request over `none`. The counts repeat to within a few instructions.
# Needs valgrind (apt-get install valgrind). Builds the driver; about 20 s per mode after that.
set -euo pipefail
cd "$(dirname "$0")/../../.."
cargo build --release -q -p ratelimit-http --example profile_layer
driver=${CARGO_TARGET_DIR:-target}/release/examples/profile_layer
requests=20000
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() {
    valgrind --tool=callgrind --toggle-collect=profile_layer::measured \
        --callgrind-out-file="$out/cg.out" "$driver" "$1" "$requests" 2>&1 \
        | awk '/Collected/ {print $4}'
}
none=$(count none)
echo "none: $((none / requests)) instructions per request (the bare route)"
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(quiet governor)
for mode in "${modes[@]}"; do
    echo "$mode: $((($(count "$mode") - none) / requests)) instructions per request over none"
done
