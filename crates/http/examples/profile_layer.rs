//! An in-process driver for profiling the layer (no sockets): `N` requests through one axum
//! route with no layer, or with the layer wired as `just bench-http` wires it.
//!
//! ```sh
//! cargo build --release -p ratelimit-http --example profile_layer
//! valgrind --tool=callgrind --toggle-collect=profile_layer::measured \
//!     target/release/examples/profile_layer quiet 20000
//! ```
//!
//! Modes: `none` (the bare route); `quiet` (the layer as the example server wires it by
//! default: on-path metrics, nobody listening to the event bus; every request finds its bucket
//! full, as `just bench-http`'s do); `draining` (the same, with a bucket one token emptier at
//! each request, so that no `RateLimit` value repeats); `fieldless` (`quiet` writing no field,
//! `HeaderStyle::None`, as `just bench-http`'s "no fields"); `layer` (the same with the
//! example server's `--events`: the event logger and the event-derived metrics subscribed);
//! `governor` (`tower_governor`'s `GovernorLayer` keyed by peer IP, configured as
//! `just bench-http` configures it); `governor-headers` (the same with its `use_headers()`).
//! It prints the time per request; under callgrind, compare the instruction counts of two
//! modes and divide by `N`. Only the `N` measured requests count
//! (`--toggle-collect=profile_layer::measured`), after 1 000 requests of warm-up: the first
//! read of `quanta`'s clock, which `tower_governor` and the memory store both read, calibrates
//! it for a varying number of instructions. `crates/bench/callgrind/layer.sh` runs the modes.
//!
//! A third argument, `EVICT_BYTES`, writes one byte per cache line of a buffer that size after
//! every request, as a server's kernel work between two requests does: each request then
//! starts with cold caches. With callgrind's cache simulation it counts the cache lines a mode
//! brings in per request (`valgrind --tool=callgrind --cache-sim=yes
//! --toggle-collect=profile_layer::measured target/release/examples/profile_layer quiet 5000
//! 65536`, minus `none` with the same arguments); timed, it shows what they cost.

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::routing::get;
use ratelimit_adapter::{RateLimitRule, RateLimitScope, RuleSet};
use ratelimit_container::{Container, ContainerConfig};
use ratelimit_http::{HeaderStyle, RateLimitLayer, RateLimitMetrics};
use tower::{Service, ServiceExt};
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;

/// One `ip` limit nobody reaches: refilled at once (every request finds its bucket full), or,
/// with `draining`, refilled slowly (100 000 tokens a minute: nearly every request finds one
/// token fewer).
fn rules(draining: bool) -> RuleSet {
    let refill_rate = if draining { 1e5 } else { 1e12 };
    RuleSet::try_from_rules([(
        "GET /hello",
        RateLimitRule::new(RateLimitScope::Ip, 1 << 40, refill_rate).expect("a valid rule"),
    )])
    .expect("valid rules")
}

/// Requests run before the measured ones: the first reads of calibrated clocks (`quanta`
/// calibrates on its first read, for a time-bounded, so varying, number of instructions),
/// lazily built state and the allocator's caches are then behind.
const WARM_UP: u32 = 1_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::sink)
        .init();
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "layer".to_owned());
    let n: u32 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let mut evict = Evict::new(args.next().and_then(|n| n.parse().ok()).unwrap_or(0));
    let (mut service, keep) = runtime.block_on(setup(&mode));
    runtime.block_on(requests(&mut service, WARM_UP, &mut evict));
    let started = Instant::now();
    measured(&runtime, &mut service, n, &mut evict);
    let elapsed = started.elapsed();
    println!(
        "{mode}: {n} requests, {:.3} µs per request",
        elapsed.as_secs_f64() * 1e6 / f64::from(n)
    );
    drop(keep);
}

/// The measured requests, in a function of their own for
/// `valgrind --tool=callgrind --toggle-collect=profile_layer::measured`: everything the runtime
/// runs meanwhile (subscriber tasks included) is counted, the set-up and the warm-up are not.
#[inline(never)]
fn measured(
    runtime: &tokio::runtime::Runtime,
    service: &mut AppService,
    n: u32,
    evict: &mut Evict,
) {
    runtime.block_on(requests(service, n, evict));
}

/// A buffer written over between requests (empty: nothing written).
struct Evict(Vec<u8>);

impl Evict {
    fn new(bytes: usize) -> Self {
        Self(vec![0; bytes])
    }

    /// One byte written per 64-byte cache line of the buffer.
    fn run(&mut self) {
        for line in self.0.chunks_mut(64) {
            line[0] = line[0].wrapping_add(1);
        }
        std::hint::black_box(&self.0);
    }
}

/// The router as a service, as `axum::serve` runs it.
type AppService = axum::routing::RouterIntoService<Body>;

/// The service of `mode`, and what must live as long as it.
async fn setup(mode: &str) -> (AppService, Vec<Container>) {
    let route = Router::new().route("/hello", get(|| async { "ok" }));
    let mut keep = Vec::new();
    let app = match mode {
        "none" => route,
        "layer" | "quiet" | "draining" | "fieldless" => {
            let container = Container::build(
                ContainerConfig::memory(rules(mode == "draining"))
                    .with_event_logging(mode == "layer"),
            )
            .await
            .expect("a container");
            let metrics = RateLimitMetrics::new();
            if mode == "layer" {
                metrics.spawn(container.events());
            }
            let mut layer =
                RateLimitLayer::from_adapter(container.adapter().clone()).metrics(&metrics);
            if mode == "fieldless" {
                layer = layer.header_style(HeaderStyle::None);
            }
            keep.push(container);
            route.route_layer(layer)
        }
        "governor" => {
            let config = GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(u32::MAX)
                .finish()
                .expect("a valid tower_governor configuration");
            route.layer(GovernorLayer::new(Arc::new(config)))
        }
        "governor-headers" => {
            let config = GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(u32::MAX)
                .use_headers()
                .finish()
                .expect("a valid tower_governor configuration");
            route.layer(GovernorLayer::new(Arc::new(config)))
        }
        other => panic!("unknown mode {other:?}"),
    };
    // As `axum::serve` runs a router (`into_make_service*` call `with_state`): each route built
    // once, with its layers, rather than per request.
    let service = app.with_state::<()>(()).into_service::<Body>();
    (service, keep)
}

/// `n` requests through `service`, each awaited, from one client address.
async fn requests(service: &mut AppService, n: u32, evict: &mut Evict) {
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("an address");
    for _ in 0..n {
        let mut request = Request::get("/hello")
            .body(Body::empty())
            .expect("a request");
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = service
            .ready()
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("a response");
        assert_eq!(response.status(), 200);
        drop(response);
        // Lets subscriber tasks run, as a server's runtime would.
        tokio::task::yield_now().await;
        evict.run();
    }
}
