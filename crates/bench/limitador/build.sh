#!/usr/bin/env bash
# Builds the limitador driver of `just bench` into target/limitador/release/. Prints why and
# exits 0 when it cannot (the benchmark then reports limitador as not measured).
#
# limitador 0.14.0 built with only its Redis storage does not compile: `src/storage/keys.rs`
# uses `mod bin` and `src/counter.rs`'s `variables_for_key`, both gated on `disk_storage`
# (RocksDB, a long C++ build). This unpacks the published crate from cargo's own registry
# cache into target/limitador-src and widens those two cfgs to
# `any(feature = "disk_storage", feature = "redis_storage")`; nothing else is changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
here="$root/crates/bench/limitador"
src="$root/target/limitador-src"
crate="$src/limitador-0.14.0"
bin="$root/target/limitador/release/ratelimit-bench-limitador"

fail() { echo "limitador driver not built: $*" >&2; exit 0; }

if [ ! -f "$crate/.patched" ]; then
    cache="${CARGO_HOME:-$HOME/.cargo}/registry/cache"
    archive="$(ls "$cache"/*/limitador-0.14.0.crate 2>/dev/null | head -n1 || true)"
    if [ -z "$archive" ]; then
        # Let cargo download the crate into its cache, with a throwaway manifest.
        tmp="$(mktemp -d)"
        mkdir -p "$tmp/src" && : > "$tmp/src/lib.rs"
        printf '[package]\nname = "fetch-limitador"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nlimitador = { version = "=0.14.0", default-features = false }\n' > "$tmp/Cargo.toml"
        cargo fetch --manifest-path "$tmp/Cargo.toml" >/dev/null 2>&1 || fail "cargo fetch of limitador 0.14.0 failed"
        rm -rf "$tmp"
        archive="$(ls "$cache"/*/limitador-0.14.0.crate 2>/dev/null | head -n1 || true)"
        [ -n "$archive" ] || fail "limitador-0.14.0.crate not in $cache"
    fi
    rm -rf "$crate" && mkdir -p "$src"
    tar -xzf "$archive" -C "$src"
    wide='#[cfg(any(feature = "disk_storage", feature = "redis_storage"))]'
    perl -0pi -e "s/#\[cfg\(feature = \"disk_storage\"\)\]\npub mod bin/$wide\npub mod bin/" "$crate/src/storage/keys.rs"
    perl -0pi -e "s/#\[cfg\(feature = \"disk_storage\"\)\]\n(\s*)pub\(crate\) fn variables_for_key/$wide\n\$1pub(crate) fn variables_for_key/" "$crate/src/counter.rs"
    grep -q 'feature = "redis_storage"))]' "$crate/src/storage/keys.rs" || fail "patching keys.rs failed"
    grep -q 'feature = "redis_storage"))]' "$crate/src/counter.rs" || fail "patching counter.rs failed"
    touch "$crate/.patched"
fi

mkdir -p "$root/target/limitador"
log="$root/target/limitador/build.log"
echo "building the limitador driver (the first time takes a few minutes; log: $log)" >&2
# limitador's own dead-code warnings (of the widened cfgs) go to the log, not the screen.
if ! cargo build --release --quiet --manifest-path "$here/Cargo.toml" \
    --target-dir "$root/target/limitador" 2>"$log"; then
    tail -n 20 "$log" >&2
    fail "cargo build failed"
fi
[ -x "$bin" ] || fail "$bin missing after the build"
