# ratelimit: a Redis-backed token-bucket rate limiter for Rust services.
# `just` lists the recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Run the demo: simulated traffic against a few rules (memory backend; REDIS_URL=... for Redis).
demo:
    cargo run --quiet -p ratelimit-container --example demo

# Run the example HTTP server: one route per rule of the rules file, behind the rate-limit layer (REDIS_URL=... for Redis).
serve rules="crates/http/examples/rules.toml" listen="127.0.0.1:8080":
    cargo run --quiet -p ratelimit-http --example server -- --listen {{listen}} --rules {{rules}} ${REDIS_URL:+--redis-url "$REDIS_URL"}

# Run the rate-limit service for Envoy (gRPC :8081, HTTP :8080) on envoyproxy/ratelimit YAML configs (memory store; REDIS_URL=... for Redis); see docs/server.md.
server config="crates/server/tests/configs" *args:
    cargo run --quiet -p ratelimit-server -- --config {{config}} {{args}}

# ShouldRateLimit over gRPC against the library in process, same Redis, 64 concurrent callers (~30 s after the build); writes target/bench/server.md.
bench-server *args:
    cargo run --release -q -p ratelimit-server --example bench -- {{args}}

# The admin CLI, e.g. `just cli reset --endpoint "POST /api/v1/sessions" --identifier 203.0.113.7 --rules FILE`.
cli *args:
    cargo run --quiet -p ratelimit-cli -- {{args}}

# Run every test of the workspace (starts its own throwaway redis-server processes).
test:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v redis-server >/dev/null 2>&1 && [ -z "${REDIS_SERVER_BIN:-}" ]; then
        echo "error: redis-server is needed by the tests. Install it: sudo apt-get install redis-server (macOS: brew install redis)" >&2
        exit 1
    fi
    # Doc tests first, so that the run closes on the summary of the whole test suite.
    cargo test --workspace --doc
    if cargo nextest --version >/dev/null 2>&1; then
        cargo nextest run --workspace --all-targets --no-fail-fast
    else
        cargo test --workspace --all-targets --no-fail-fast
    fi

# Formatting and clippy, warnings as errors.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# Build the API docs, warnings as errors.
doc:
    RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps

# Start a throwaway redis-server on 127.0.0.1:PORT in the foreground (Ctrl-C stops it; keeps nothing on disk).
redis port="6390":
    @echo "redis on redis://127.0.0.1:{{port}} — try: REDIS_URL=redis://127.0.0.1:{{port}} just demo"
    redis-server --port {{port}} --bind 127.0.0.1 --save "" --appendonly no

# Fault-injection run on throwaway redis-servers (~45 s); writes its table into docs/reliability.md.
chaos:
    cargo run --release -q -p ratelimit-tests --example chaos

# Hostile clients and hostile Redis data against the example server, memory and Redis (~1-2 min after the build); writes its table into docs/security.md.
attack *args:
    cargo run --release -q -p ratelimit-tests --example attack -- {{args}}

# Benchmark (release build, own throwaway redis-server, ~6 min; `just bench --quick` for ~1 min; `just bench several-limits` for figure 5 alone, `just bench coalesced` for figure 6 alone), then the HTTP layer against tower_governor and ratelimit-server against the library; writes target/bench/. Builds the limitador driver first (a few minutes, once).
bench *args:
    #!/usr/bin/env bash
    set -euo pipefail
    crates/bench/limitador/build.sh
    cargo run --release -q -p ratelimit-bench -- {{args}}
    # The whole run (with or without --quick) goes on with the HTTP layer against tower_governor,
    # then the Envoy service against the library.
    case "{{args}}" in
        "")
            cargo run --release -q -p ratelimit-bench -- http
            cargo run --release -q -p ratelimit-server --example bench ;;
        "--quick")
            cargo run --release -q -p ratelimit-bench -- http --rounds 2 --seconds 1
            cargo run --release -q -p ratelimit-server --example bench -- --seconds 2 ;;
    esac

# The HTTP layer against no layer, tower_governor and the same two fields with no limiter on one axum route, measuring the server thread's CPU (release build; ~4 min after the build, ~2.5 min with `--no-redis`; `--rounds N --seconds S --connections 32,64`).
bench-http *args:
    cargo run --release -q -p ratelimit-bench -- http {{args}}

# Redis CPU per check against one Redis core's ceiling, by concurrency (1-256 tasks, one shared bucket) and by buckets held (1 to 10 million, ~1.3 GB of Redis memory at the top); ~3 min after the build (`--quick`: up to 1 million, ~40 s); writes target/bench/scaling.md.
bench-scaling *args:
    cargo run --release -q -p ratelimit-bench -- scaling {{args}}
