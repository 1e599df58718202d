//! `just bench-http`: what the HTTP layer costs a server, against no layer and against
//! `tower_governor`, on the same axum 0.8 route, in the same run.
//!
//! Servers answer `GET /hello` with `ok` on loopback ports, one per contender:
//!
//! - **no layer**: the bare route;
//! - **ratelimit-http**: the route behind `RateLimitLayer` as the example server wires it: the
//!   memory backend (one `ip` limit nobody reaches), the default extractor, `RateLimitMetrics`
//!   counting on the request path, nobody subscribed to the event bus (the example's default
//!   since `--events` became opt-in), and a `tracing` fmt subscriber at INFO (writing to a
//!   sink);
//! - **ratelimit-http, events**: the same layer with the example server's `--events`: the
//!   container's event logger and the event-derived metrics subscribed to the event bus,
//!   which shows what the event bus costs;
//! - **tower_governor**: the route behind `tower_governor`'s `GovernorLayer`, keyed by peer IP,
//!   with a quota nobody reaches.
//! - **tower_governor, headers**: the same with its `use_headers()`, which adds
//!   `x-ratelimit-limit` and `x-ratelimit-remaining` to every allowed response: as many fields
//!   as this layer writes by default, for a like-for-like reference beside the target's.
//! - **ratelimit-http, no fields**: `ratelimit-http` with `HeaderStyle::None`, like for like
//!   with `tower_governor`'s default; the difference to `ratelimit-http` is what the two
//!   `RateLimit-Policy` and `RateLimit` fields cost the server, inserting, encoding and sending
//!   them.
//! - **no layer, two fields**: the bare route behind `tower-http`'s `SetResponseHeaderLayer`,
//!   twice, writing the very `RateLimit-Policy` and `RateLimit` values `ratelimit-http` writes
//!   here (read off one of its responses at start): what two fields cost a server with no
//!   limiter at all. Against the targets' budget (the server CPU per request that
//!   `tower_governor`'s requests/s × 0.95 allows), it shows how much of that budget the fields
//!   take before any rate limiting is done.
//!
//! The servers share one runtime with **one** worker thread, so that each is CPU-bound on one
//! core; the load comes from another single-thread runtime, over real TCP connections, with a
//! minimal HTTP/1.1 keep-alive client (one request in flight per connection, the response read
//! by its `content-length`). Rounds rotate the order of the contenders. Requests/s is the
//! median over rounds; p50/p99 are over every request of every round. The server's CPU per
//! request is measured: the CPU time of the servers' thread (from Linux's `schedstat`, kernel
//! time included) over the round's responses, so it holds whether or not that thread is
//! saturated; the layer's extra CPU per request is the difference to no layer, paired by
//! round. The table also shows how busy the server thread was and the client's CPU per
//! request: when the server thread is not busy nearly all the round, the client limits
//! requests/s, and a contender whose responses are longer (more header fields for the client
//! to read) loses requests/s that its server did not spend.
//!
//! Then **the Redis split** (unless `--no-redis`): on a throwaway `redis-server`, the same route
//! behind the layer on the Redis store as the example server wires it with `--redis-url`
//! (default Redis settings, on-path metrics, no event subscriber), against no layer and against
//! the adapter's check on the same store settings called without HTTP, and the store's own round
//! trip: raw `EVALSHA`s of the token-bucket script (the two-key layout's, one bucket, a limit
//! nobody reaches) from as many tasks as there are connections, over one multiplexed
//! connection, in the same rotating rounds, at 1 and 32 connections
//! (`--redis-connections`). What the layer adds to a request's latency (its p50 minus no
//! layer's) is set against that round trip's p50.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderName, HeaderValue};
use axum::routing::get;
use hdrhistogram::Histogram;
use ratelimit_adapter::{RateLimitRule, RateLimitScope, RuleSet};
use ratelimit_container::{Container, ContainerConfig};
use ratelimit_http::{HeaderStyle, RateLimitLayer, RateLimitMetrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::load::{self, Checker, Identifiers, Outcome};
use crate::stats::median;
use crate::thread_cpu::ThreadCpu;
use crate::{BoxError, BoxResult};

/// What `bench-http` measures.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct HttpArgs {
    /// Rounds; each round measures every contender once, in a rotating order. Many short
    /// rounds: the targets are paired within a round, whose contenders then run close together.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Seconds of load per contender per round.
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
    /// Concurrent connections (one figure per value).
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    connections: Vec<usize>,
    /// Concurrent connections of the Redis split (one figure per value): one shows the bare
    /// round trips, more show them under load.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    redis_connections: Vec<usize>,
    /// Skips the Redis split (which starts a throwaway redis-server).
    #[arg(long)]
    no_redis: bool,
}

/// The route's endpoint for the rate limiter.
const ENDPOINT: &str = "GET /hello";
/// The request every connection sends, over and over.
const REQUEST: &[u8] = b"GET /hello HTTP/1.1\r\nhost: bench\r\n\r\n";

/// The contenders, in the order of the report.
const NAMES: [&str; 7] = [
    "no layer",
    "ratelimit-http",
    "ratelimit-http, events",
    "tower_governor",
    "tower_governor, headers",
    "ratelimit-http, no fields",
    "no layer, two fields",
];

/// The index of `tower_governor` as configured by default (no headers) in [`NAMES`]: the
/// target's reference.
const GOVERNOR: usize = 3;

/// The index of `tower_governor` with its two fields in [`NAMES`].
const GOVERNOR_HEADERS: usize = 4;
/// The index of `ratelimit-http` writing no field in [`NAMES`].
const FIELDLESS: usize = 5;
/// The index of the bare route writing two fields in [`NAMES`].
const TWO_FIELDS: usize = 6;

/// One contender's results at one connection count.
#[derive(Debug)]
struct Results {
    /// Requests/s of each round.
    rates: Vec<f64>,
    /// Latency of every request, in microseconds.
    latency: Histogram<u64>,
    /// Responses that were not `200`.
    errors: u64,
    /// The servers' thread CPU per response of each round, in microseconds (NaN for a round
    /// where it could not be read).
    server_cpu: Vec<f64>,
    /// The fraction of each round the servers' thread ran (NaN where unread).
    server_busy: Vec<f64>,
    /// The load generator's CPU per response of each round, in microseconds (NaN where
    /// unread).
    client_cpu: Vec<f64>,
}

/// CPU time of the two sides over one round, in nanoseconds, and the round's wall time.
#[derive(Debug, Clone, Copy)]
struct RoundCpu {
    server: Option<u64>,
    client: Option<u64>,
    elapsed: Duration,
}

/// Where the CPU time of each side is read.
#[derive(Debug, Clone, Default)]
struct Clocks {
    server: ThreadCpu,
    client: ThreadCpu,
}

impl Clocks {
    /// Runs `round` and reads both sides' CPU time around it.
    fn measure<T>(&self, round: impl FnOnce() -> T) -> (T, RoundCpu) {
        let (server, client) = (self.server.nanos(), self.client.nanos());
        let started = Instant::now();
        let out = round();
        let elapsed = started.elapsed();
        let spent = |before: Option<u64>, clock: &ThreadCpu| {
            before.and_then(|before| clock.nanos()?.checked_sub(before))
        };
        let cpu = RoundCpu {
            server: spent(server, &self.server),
            client: spent(client, &self.client),
            elapsed,
        };
        (out, cpu)
    }
}

impl Results {
    /// One round of this contender: `count` responses in `round`, their latencies, and how
    /// many were not `200`.
    fn record(
        &mut self,
        count: u64,
        latency: &Histogram<u64>,
        errors: u64,
        round: Duration,
        cpu: RoundCpu,
    ) -> BoxResult<()> {
        #[allow(clippy::cast_precision_loss)] // request and nanosecond counts are far below 2^52
        {
            self.rates.push(count as f64 / round.as_secs_f64());
            let per_request = |nanos: Option<u64>| {
                nanos.map_or(f64::NAN, |nanos| nanos as f64 / 1e3 / count.max(1) as f64)
            };
            self.server_cpu.push(per_request(cpu.server));
            self.server_busy.push(cpu.server.map_or(f64::NAN, |nanos| {
                nanos as f64 / 1e9 / cpu.elapsed.as_secs_f64().max(1e-9)
            }));
            self.client_cpu.push(per_request(cpu.client));
        }
        self.latency.add(latency)?;
        self.errors += errors;
        Ok(())
    }

    /// The server's CPU per request, median over rounds: measured when any round's was read,
    /// otherwise `1 / (requests/s)` (its CPU only while its thread is saturated).
    fn server_cpu_per_request(&self) -> f64 {
        if self.cpu_measured() {
            median(&self.server_cpu)
        } else {
            1e6 / median(&self.rates)
        }
    }

    /// Whether the server's CPU was read in any round.
    fn cpu_measured(&self) -> bool {
        self.server_cpu.iter().any(|cpu| !cpu.is_nan())
    }

    /// Empty results, one per contender.
    fn for_each(contenders: &[&str]) -> BoxResult<Vec<Self>> {
        contenders
            .iter()
            .map(|_| {
                Ok(Self {
                    rates: Vec::new(),
                    latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
                    errors: 0,
                    server_cpu: Vec::new(),
                    server_busy: Vec::new(),
                    client_cpu: Vec::new(),
                })
            })
            .collect()
    }
}

/// Runs the comparison and prints its table.
pub(crate) fn run(args: &HttpArgs) -> BoxResult<()> {
    // The example server logs at INFO through a fmt subscriber; so does this one, into a sink.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::sink)
        .try_init()
        .map_err(|err| -> BoxError { err.to_string().into() })?;
    let clocks = Clocks::default();
    clocks.client.add_current_thread();
    let server_threads = clocks.server.clone();
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-server")
        .on_thread_start(move || server_threads.add_current_thread())
        .enable_all()
        .build()?;
    let load = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let addrs = servers.block_on(start_servers())?;
    let round = Duration::from_secs_f64(args.seconds.max(0.1));
    println!(
        "HTTP layer: one server thread, {} rounds of {:.1} s per contender, GET /hello, every request allowed",
        args.rounds,
        round.as_secs_f64()
    );
    for &connections in &args.connections {
        let mut results = Results::for_each(&NAMES)?;
        // A short warm-up of each, not counted.
        for &addr in &addrs {
            load.block_on(drive(addr, connections, Duration::from_millis(300)))?;
        }
        for r in 0..args.rounds {
            for i in 0..NAMES.len() {
                let contender = (i + r) % NAMES.len();
                let (driven, cpu) =
                    clocks.measure(|| load.block_on(drive(addrs[contender], connections, round)));
                let (count, latency, errors) = driven?;
                results[contender].record(count, &latency, errors, round, cpu)?;
            }
        }
        print_table(connections, &results);
    }
    if !args.no_redis {
        redis_split(args, &servers, &load, &clocks, addrs[0], round)?;
    }
    drop(servers);
    Ok(())
}

/// The contenders of the Redis split, in the order of its report.
const REDIS_NAMES: [&str; 4] = [
    "no layer",
    "ratelimit-http, Redis store",
    "adapter check, no HTTP",
    "raw EVALSHA (store round trip)",
];

/// The index of the raw round trip in [`REDIS_NAMES`].
const RAW: usize = 3;

/// The token-bucket script's capacity and refill rate in the raw round trip: the layer's rule.
const RAW_MAX_TOKENS: u64 = 1 << 40;
const RAW_REFILL_RATE: f64 = 1e12;

/// The Redis split: what the layer on a Redis store adds to a request, against the store's own
/// round trip at the same concurrency.
fn redis_split(
    args: &HttpArgs,
    servers: &tokio::runtime::Runtime,
    load: &tokio::runtime::Runtime,
    clocks: &Clocks,
    none: SocketAddr,
    round: Duration,
) -> BoxResult<()> {
    let redis = ratelimit_tests::redis_server::RedisServer::start();
    let url = redis.url();
    let layered = servers.block_on(async {
        let rules = RuleSet::try_from_rules([(
            ENDPOINT,
            RateLimitRule::new(RateLimitScope::Ip, RAW_MAX_TOKENS, RAW_REFILL_RATE)?,
        )])?;
        let container =
            Container::build(ContainerConfig::redis(&url, rules).with_event_logging(false)).await?;
        let layer = RateLimitLayer::from_adapter(container.adapter().clone())
            .metrics(&RateLimitMetrics::new());
        let addr = serve(
            Router::new()
                .route("/hello", get(|| async { "ok" }))
                .route_layer(layer),
        )
        .await?;
        std::mem::forget(container);
        BoxResult::Ok(addr)
    })?;
    let raw = load.block_on(RawRoundTrip::connect(&url))?;
    // The adapter the layer calls, on the same store settings, called straight from the load
    // runtime (its connections live there, as the raw one's do): the store's path without HTTP.
    let adapter = load.block_on(async {
        let rules = RuleSet::try_from_rules([(
            ENDPOINT,
            RateLimitRule::new(RateLimitScope::Ip, RAW_MAX_TOKENS, RAW_REFILL_RATE)?,
        )])?;
        let container =
            Container::build(ContainerConfig::redis(&url, rules).with_event_logging(false)).await?;
        let adapter = container.adapter().clone();
        std::mem::forget(container);
        BoxResult::Ok(adapter)
    })?;
    println!(
        "\nRedis split: the layer on a Redis store (redis-server on loopback) against the store's own round trip, {} rounds of {:.1} s",
        args.rounds,
        round.as_secs_f64()
    );
    for &connections in &args.redis_connections {
        let mut results = Results::for_each(&REDIS_NAMES)?;
        load.block_on(drive(layered, connections, Duration::from_millis(300)))?;
        load.block_on(raw.drive(connections, Duration::from_millis(300)))?;
        load.block_on(drive_adapter(
            &adapter,
            connections,
            Duration::from_millis(300),
        ))?;
        for r in 0..args.rounds {
            for i in 0..REDIS_NAMES.len() {
                let contender = (i + r) % REDIS_NAMES.len();
                let (driven, cpu) = clocks.measure(|| match contender {
                    0 => load.block_on(drive(none, connections, round)),
                    1 => load.block_on(drive(layered, connections, round)),
                    2 => load.block_on(drive_adapter(&adapter, connections, round)),
                    _ => load.block_on(raw.drive(connections, round)),
                });
                let (count, latency, errors) = driven?;
                results[contender].record(count, &latency, errors, round, cpu)?;
            }
        }
        print_redis_table(connections, &results);
    }
    drop(redis);
    Ok(())
}

fn print_redis_table(connections: usize, results: &[Results]) {
    println!("\n{connections} connections (raw EVALSHA: {connections} tasks)");
    println!(
        "{:<32} {:>10} {:>8} {:>8} {:>7}",
        "contender", "req/s", "p50 µs", "p99 µs", "errors"
    );
    for (name, result) in REDIS_NAMES.iter().zip(results) {
        println!(
            "{:<32} {:>10.0} {:>8} {:>8} {:>7}",
            name,
            median(&result.rates),
            result.latency.value_at_quantile(0.5),
            result.latency.value_at_quantile(0.99),
            result.errors,
        );
    }
    let p50 = |i: usize| {
        #[allow(clippy::cast_precision_loss)] // microseconds, far below 2^52
        let micros = results[i].latency.value_at_quantile(0.5) as f64;
        micros
    };
    let added = p50(1) - p50(0);
    let round_trip = p50(RAW);
    let rest = if added <= round_trip {
        format!("within the round trip of {round_trip:.0} µs")
    } else {
        format!(
            "the round trip of {round_trip:.0} µs and {:.0} µs more",
            added - round_trip
        )
    };
    println!(
        "split at p50: {:.0} µs with the layer on Redis, {:.0} µs without: the layer adds {added:.0} µs, {rest} (target: adds ≤ the round trip: {})",
        p50(1),
        p50(0),
        if added <= round_trip { "PASS" } else { "FAIL" },
    );
    println!(
        "the adapter's check on Redis alone (no HTTP): p50 {:.0} µs, {:.0} µs over the raw round trip",
        p50(2),
        p50(2) - round_trip,
    );
    let cpu = |i: usize| results[i].server_cpu_per_request();
    println!(
        "server thread CPU per request: {:.2} µs with the layer on Redis, {:.2} µs without ({:.2} µs more: the layer, the Redis client and its connection's task, which share the server's one thread)",
        cpu(1),
        cpu(0),
        cpu(1) - cpu(0),
    );
}

/// Raw `EVALSHA`s of the token-bucket script over one multiplexed connection: the store's own
/// round trip, with nothing of the limiter around it.
#[derive(Debug)]
struct RawRoundTrip {
    conn: redis::aio::MultiplexedConnection,
    sha: Arc<str>,
}

impl RawRoundTrip {
    async fn connect(url: &str) -> BoxResult<Self> {
        let mut conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(ratelimit_redis::TOKEN_BUCKET_SCRIPT)
            .query_async(&mut conn)
            .await?;
        Ok(Self {
            conn,
            sha: sha.into(),
        })
    }

    /// `tasks` tasks sending `EVALSHA`s back to back for `length`: the number of replies, their
    /// latencies (µs) and how many were not an allowed decision.
    async fn drive(&self, tasks: usize, length: Duration) -> BoxResult<(u64, Histogram<u64>, u64)> {
        let checker = RawChecker {
            conn: self.conn.clone(),
            sha: self.sha.clone(),
        };
        drive_checker(&checker, tasks, length).await
    }
}

/// `tasks` tasks calling the adapter's check back to back for `length` (one identifier, as the
/// HTTP load's one client address): the number of checks, their latencies (µs) and how many
/// were not allowed by the store.
async fn drive_adapter(
    adapter: &Arc<ratelimit_adapter::TokenBucketAdapter>,
    tasks: usize,
    length: Duration,
) -> BoxResult<(u64, Histogram<u64>, u64)> {
    drive_checker(&AdapterChecker(Arc::clone(adapter)), tasks, length).await
}

/// `checker` driven by the benchmark's closed-loop load generator (`load::run`) on the HTTP
/// load's one client address: checks, their latencies in µs, and the checks not allowed by
/// the store.
async fn drive_checker<C: Checker>(
    checker: &C,
    tasks: usize,
    length: Duration,
) -> BoxResult<(u64, Histogram<u64>, u64)> {
    let run = load::run(
        checker,
        tasks,
        length,
        &Identifiers::Fixed("127.0.0.1".to_owned()),
        1,
    )
    .await?;
    let mut micros = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    for value in run.latency.iter_recorded() {
        micros.saturating_record_n(
            (value.value_iterated_to() / 1_000).max(1),
            value.count_at_value(),
        );
    }
    Ok((run.checks, micros, run.denied + run.failed_open))
}

/// The adapter's check, as the layer makes it.
#[derive(Debug, Clone)]
struct AdapterChecker(Arc<ratelimit_adapter::TokenBucketAdapter>);

impl Checker for AdapterChecker {
    async fn check(&self, identifier: &str) -> BoxResult<Outcome> {
        let result = self
            .0
            .check_opts(
                ENDPOINT,
                identifier,
                ratelimit_adapter::CheckOptions::default(),
            )
            .await?;
        Ok(match (result.allowed, result.source) {
            (_, ratelimit_adapter::DecisionSource::FailOpen) => Outcome::FailOpen,
            (true, ratelimit_adapter::DecisionSource::Store) => Outcome::Allowed,
            _ => Outcome::Denied,
        })
    }
}

/// One raw `EVALSHA` of the two-key script on one bucket: the store's round trip alone.
#[derive(Debug, Clone)]
struct RawChecker {
    conn: redis::aio::MultiplexedConnection,
    sha: Arc<str>,
}

impl Checker for RawChecker {
    async fn check(&self, _identifier: &str) -> BoxResult<Outcome> {
        let base = format!("rate_limit:ip:raw-round-trip:{ENDPOINT}");
        let reply: redis::Value = redis::cmd("EVALSHA")
            .arg(&*self.sha)
            .arg(2)
            .arg(format!("{base}:tokens"))
            .arg(format!("{base}:time"))
            .arg(RAW_MAX_TOKENS)
            .arg(RAW_REFILL_RATE)
            .arg(1)
            .arg("")
            .query_async(&mut self.conn.clone())
            .await?;
        let allowed = matches!(
            &reply,
            redis::Value::Array(items) if matches!(items.first(), Some(redis::Value::Int(1)))
        );
        Ok(if allowed {
            Outcome::Allowed
        } else {
            Outcome::Denied
        })
    }
}

/// Starts the servers; their addresses in the order of [`NAMES`].
async fn start_servers() -> BoxResult<[SocketAddr; NAMES.len()]> {
    let route = || Router::new().route("/hello", get(|| async { "ok" }));

    let none = serve(route()).await?;

    let rules = || -> BoxResult<RuleSet> {
        Ok(RuleSet::try_from_rules([(
            ENDPOINT,
            RateLimitRule::new(RateLimitScope::Ip, 1 << 40, 1e12)?,
        )])?)
    };
    let quiet =
        Container::build(ContainerConfig::memory(rules()?).with_event_logging(false)).await?;
    let layer =
        RateLimitLayer::from_adapter(quiet.adapter().clone()).metrics(&RateLimitMetrics::new());
    let ours = serve(route().route_layer(layer)).await?;
    // The containers and the metrics live as long as the process.
    std::mem::forget(quiet);

    let container = Container::build(ContainerConfig::memory(rules()?)).await?;
    let metrics = RateLimitMetrics::new();
    metrics.spawn(container.events());
    let layer = RateLimitLayer::from_adapter(container.adapter().clone()).metrics(&metrics);
    let events = serve(route().route_layer(layer)).await?;
    std::mem::forget(container);

    let config = GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .finish()
        .ok_or("tower_governor rejected its configuration")?;
    let governor = serve(route().layer(GovernorLayer::new(Arc::new(config)))).await?;
    // The same with its `use_headers`: `x-ratelimit-limit` and `x-ratelimit-remaining` on
    // every allowed response, as many fields as this layer's default two.
    let config = GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(u32::MAX)
        .use_headers()
        .finish()
        .ok_or("tower_governor rejected its configuration")?;
    let governor_headers = serve(route().layer(GovernorLayer::new(Arc::new(config)))).await?;
    // The layer without its informational fields (`HeaderStyle::None`): like for like with
    // `tower_governor`'s default, and, against `ratelimit-http`, what the two fields cost.
    let fieldless =
        Container::build(ContainerConfig::memory(rules()?).with_event_logging(false)).await?;
    let layer = RateLimitLayer::from_adapter(fieldless.adapter().clone())
        .metrics(&RateLimitMetrics::new())
        .header_style(HeaderStyle::None);
    let no_fields = serve(route().route_layer(layer)).await?;
    std::mem::forget(fieldless);
    // The same two fields with no limiter: `tower-http`'s `SetResponseHeaderLayer`, the usual
    // way to add a fixed field, once per field, as one layer.
    let [(policy_name, policy), (ratelimit_name, ratelimit)] = layer_fields(rules()?).await?;
    let fields = tower::ServiceBuilder::new()
        .layer(SetResponseHeaderLayer::overriding(policy_name, policy))
        .layer(SetResponseHeaderLayer::overriding(
            ratelimit_name,
            ratelimit,
        ));
    let two_fields = serve(route().route_layer(fields)).await?;
    Ok([
        none,
        ours,
        events,
        governor,
        governor_headers,
        no_fields,
        two_fields,
    ])
}

/// The `RateLimit-Policy` and `RateLimit` fields `ratelimit-http` writes on the bench's route,
/// read off one response of the layer as `start_servers` wires it (in process, from a peer
/// address of the loopback, as the bench's connections have).
async fn layer_fields(rules: RuleSet) -> BoxResult<[(HeaderName, HeaderValue); 2]> {
    let container =
        Container::build(ContainerConfig::memory(rules).with_event_logging(false)).await?;
    let app = Router::new()
        .route("/hello", get(|| async { "ok" }))
        .route_layer(RateLimitLayer::from_adapter(container.adapter().clone()));
    let mut request = axum::http::Request::get("/hello").body(axum::body::Body::empty())?;
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40_000))));
    let response = app.oneshot(request).await?;
    let field = |name: &str| -> BoxResult<(HeaderName, HeaderValue)> {
        let value = response
            .headers()
            .get(name)
            .ok_or_else(|| format!("ratelimit-http wrote no {name} field"))?;
        Ok((HeaderName::from_bytes(name.as_bytes())?, value.clone()))
    };
    Ok([field("ratelimit-policy")?, field("ratelimit")?])
}

/// Serves `app` on a loopback port, with the peer address (both layers key by it).
async fn serve(app: Router) -> BoxResult<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(err) = axum::serve(listener, service).await {
            eprintln!("bench server stopped: {err}");
        }
    });
    Ok(addr)
}

/// `connections` keep-alive connections sending requests back to back for `length`: the
/// number of responses, their latencies and how many were not `200`.
async fn drive(
    addr: SocketAddr,
    connections: usize,
    length: Duration,
) -> BoxResult<(u64, Histogram<u64>, u64)> {
    let deadline = Instant::now() + length;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        tasks.push(tokio::spawn(connection(addr, deadline)));
    }
    let mut count = 0;
    let mut errors = 0;
    let mut latency = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        let (n, histogram, failed) = task.await??;
        count += n;
        errors += failed;
        latency.add(&histogram)?;
    }
    Ok((count, latency, errors))
}

/// One connection's loop until `deadline`.
async fn connection(addr: SocketAddr, deadline: Instant) -> BoxResult<(u64, Histogram<u64>, u64)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut latency = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    let mut buffer = Vec::with_capacity(4096);
    let mut count = 0;
    let mut errors = 0;
    while Instant::now() < deadline {
        let started = Instant::now();
        stream.write_all(REQUEST).await?;
        if !read_response(&mut stream, &mut buffer).await? {
            errors += 1;
        }
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        latency.saturating_record(micros.max(1));
        count += 1;
    }
    Ok((count, latency, errors))
}

/// Reads one response (headers, then `content-length` bytes of body); whether it was a `200`.
///
/// Cheap per byte, since the client shares the machine with the servers it measures: a SIMD
/// search for the end of the head, over the bytes just read, and for hyper's lower-case
/// `content-length` field (any other spelling goes through a slower, case-blind reading).
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> BoxResult<bool> {
    buffer.clear();
    let mut chunk = [0u8; 4096];
    let (head_end, length) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        // The head's end may straddle two reads: search from 3 bytes before the new ones.
        let from = buffer.len().saturating_sub(3);
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buffer[from..], b"\r\n\r\n") {
            let end = from + end;
            break (end + 4, content_length(&buffer[..end + 2])?);
        }
    };
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("the server closed the connection mid-body".into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Ok(buffer.starts_with(b"HTTP/1.1 200"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// The `content-length` of a response head (its lines each ending in CRLF), 0 when it has
/// none.
fn content_length(head: &[u8]) -> BoxResult<usize> {
    const FIELD: &[u8] = b"\r\ncontent-length:";
    let value = match find(head, FIELD) {
        Some(at) => {
            let rest = &head[at + FIELD.len()..];
            &rest[..find(rest, b"\r\n").unwrap_or(rest.len())]
        }
        None => {
            let Some(value) = head
                .split(|&byte| byte == b'\n')
                .filter_map(|line| {
                    let colon = line.iter().position(|&byte| byte == b':')?;
                    Some((&line[..colon], &line[colon + 1..]))
                })
                .find(|(name, _)| name.eq_ignore_ascii_case(b"content-length"))
                .map(|(_, value)| value)
            else {
                return Ok(0);
            };
            value
        }
    };
    Ok(std::str::from_utf8(value)?.trim().parse()?)
}

fn print_table(connections: usize, results: &[Results]) {
    let rate = |i: usize| median(&results[i].rates);
    let none = rate(0);
    let governor = rate(GOVERNOR);
    // Measured when every contender has a round whose server CPU was read (a round whose
    // reading failed is NaN, which the medians leave out).
    let measured = results.iter().all(Results::cpu_measured);
    println!("\n{connections} connections");
    println!(
        "{:<26} {:>10} {:>8} {:>8} {:>9} {:>10} {:>12} {:>6} {:>12} {:>7}",
        "contender",
        "req/s",
        "p50 µs",
        "p99 µs",
        "vs none",
        "vs gov.",
        "server µs/req",
        "busy",
        "client µs/req",
        "errors"
    );
    for (i, name) in NAMES.iter().enumerate() {
        let r = rate(i);
        let result = &results[i];
        println!(
            "{:<26} {:>10.0} {:>8} {:>8} {:>8.3}x {:>9.3}x {:>13.2} {:>5.0}% {:>13.2} {:>7}",
            name,
            r,
            result.latency.value_at_quantile(0.5),
            result.latency.value_at_quantile(0.99),
            r / none,
            r / governor,
            result.server_cpu_per_request(),
            median(&result.server_busy) * 100.0,
            median(&result.client_cpu),
            result.errors,
        );
    }
    if !measured {
        println!(
            "(the servers' thread CPU could not be read, so its column is 1 / (requests/s): its CPU only while that thread is saturated)"
        );
    }
    // The targets, paired by round: each round runs the contenders back to back, so a ratio
    // within a round cancels the machine's drift between rounds (other load on the shared
    // cores), which the ratio of the medians above keeps.
    let layer = &results[1];
    let paired = |f: &dyn Fn(usize) -> f64| -> (f64, f64, f64) {
        let values: Vec<f64> = (0..layer.rates.len()).map(f).collect();
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(&values), low, high)
    };
    // The server's CPU per request in round `r`: measured, or inferred from requests/s.
    let cpu = |i: usize, r: usize| {
        if measured {
            results[i].server_cpu[r]
        } else {
            1e6 / results[i].rates[r]
        }
    };
    let (versus, versus_low, versus_high) =
        paired(&|r| layer.rates[r] / results[GOVERNOR].rates[r]);
    let (extra, extra_low, extra_high) = paired(&|r| cpu(1, r) - cpu(0, r));
    let (governor_extra, _, _) = paired(&|r| cpu(GOVERNOR, r) - cpu(0, r));
    // The most server CPU per request over no layer that still serves 0.95x tower_governor's
    // requests/s (while the server thread is saturated, requests/s is 1 / CPU per request),
    // and what two fields alone take of it.
    let (budget, _, _) = paired(&|r| cpu(GOVERNOR, r) / 0.95 - cpu(0, r));
    let (fields, fields_low, fields_high) = paired(&|r| cpu(TWO_FIELDS, r) - cpu(0, r));
    let (fields_rate, _, _) = paired(&|r| results[TWO_FIELDS].rates[r] / results[0].rates[r]);
    println!(
        "ratios of the medians: {:.3}x tower_governor's requests/s; server CPU per request over no layer: ratelimit-http {:.2} µs, tower_governor {:.2} µs",
        rate(1) / governor,
        layer.server_cpu_per_request() - results[0].server_cpu_per_request(),
        results[GOVERNOR].server_cpu_per_request() - results[0].server_cpu_per_request(),
    );
    println!(
        "ratelimit-http, paired by round (median, range over {} rounds): {versus:.3}x tower_governor's requests/s ({versus_low:.3}–{versus_high:.3}; target ≥ 0.95: {}), {extra:.2} µs extra server CPU per request over no layer ({extra_low:.2}–{extra_high:.2}; target ≤ 1: {}; tower_governor: {governor_extra:.2} µs)",
        layer.rates.len(),
        if versus >= 0.95 { "PASS" } else { "FAIL" },
        if extra <= 1.0 { "PASS" } else { "FAIL" },
    );
    println!(
        "the ≥ 0.95x target's budget, paired: {budget:.2} µs server CPU per request over no layer; two fields with no limiter (no layer, two fields) take {fields:.2} µs of it ({fields_low:.2}–{fields_high:.2}) and serve {fields_rate:.3}x no layer's requests/s",
    );
    // The same requests/s comparison between contenders that write the same fields.
    let ratio = |ours: usize, theirs: usize| {
        paired(&|r| results[ours].rates[r] / results[theirs].rates[r]).0
    };
    println!(
        "like for like, paired: ratelimit-http, no fields {:.3}x tower_governor (neither writes a field); ratelimit-http {:.3}x tower_governor, headers (two fields each) and {:.3}x no layer, two fields (the same two fields, no limiter)",
        ratio(FIELDLESS, GOVERNOR),
        ratio(1, GOVERNOR_HEADERS),
        ratio(1, TWO_FIELDS),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(find(b"HTTP/1.1 200 OK\r\n\r\nok", b"\r\n\r\n"), Some(15));
        assert_eq!(find(b"HTTP/1.1 200 OK\r\n", b"\r\n\r\n"), None);
    }

    #[test]
    fn server_cpu_is_the_measured_one_when_read_and_inferred_otherwise() {
        let results = |server_cpu: Vec<f64>| Results {
            rates: vec![100_000.0, 200_000.0, 250_000.0],
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            errors: 0,
            server_busy: vec![f64::NAN; server_cpu.len()],
            client_cpu: vec![f64::NAN; server_cpu.len()],
            server_cpu,
        };
        // A round whose reading failed is left out, not taken as zero or NaN.
        let measured = results(vec![9.0, f64::NAN, 8.0]);
        assert!(measured.cpu_measured());
        assert!((measured.server_cpu_per_request() - 8.5).abs() < 1e-9);
        // Never read (not Linux): 1 / (median requests/s), in microseconds.
        let inferred = results(vec![f64::NAN; 3]);
        assert!(!inferred.cpu_measured());
        assert!((inferred.server_cpu_per_request() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn reads_the_content_length_however_it_is_spelled() {
        let head = |fields: &str| format!("HTTP/1.1 200 OK\r\n{fields}\r\n");
        let length = |fields: &str| content_length(head(fields).as_bytes()).unwrap();
        assert_eq!(length("content-length: 2"), 2);
        assert_eq!(
            length("ratelimit: \"default\";r=9;t=0\r\ncontent-length:17"),
            17
        );
        assert_eq!(length("Content-Length:  120 "), 120);
        assert_eq!(length("content-type: text/plain"), 0);
        assert!(content_length(head("content-length: x").as_bytes()).is_err());
    }

    #[test]
    fn reads_a_response_whose_head_straddles_two_reads() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(head_straddling_two_reads());
    }

    async fn head_straddling_two_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            for part in [
                &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r"[..],
                b"\nok",
                b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n",
            ] {
                stream.write_all(part).await.unwrap();
                stream.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut buffer = Vec::new();
        assert!(read_response(&mut stream, &mut buffer).await.unwrap());
        assert_eq!(&buffer[buffer.len() - 2..], b"ok");
        assert!(!read_response(&mut stream, &mut buffer).await.unwrap());
        server.await.unwrap();
    }
}
