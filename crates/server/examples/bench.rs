//! `ShouldRateLimit` over gRPC against the library called in process, on the same Redis, in the
//! same run: 64 concurrent callers (closed loop), throughput and p50/p99 latency.
//!
//! ```sh
//! cargo run --release -p ratelimit-server --example bench [-- --seconds 5 --concurrency 64 --connections 1]
//! ```
//!
//! It starts its own throwaway redis-server (or uses `REDIS_URL`), a `ratelimit-server` in this
//! process on loopback ports, and alternates the two measurements (library, server, library,
//! server) so that drift hits both alike. Every call checks one descriptor with its own bucket
//! (a random value of a key without value) under a limit no call reaches, so each is one Lua
//! script on Redis. Prints a Markdown table and writes it to `target/bench/server.md`.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::cast_precision_loss)]

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use hdrhistogram::Histogram;
use ratelimit_adapter::BucketCheck;
use ratelimit_server::config::{Unit, bucket_rule};
use ratelimit_server::keys;
use ratelimit_server::run::{RunningServer, ServerArgs};
use ratelimit_tests::redis_server::TestRedis;

type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

const CONFIG: &str = "domain: bench\ndescriptors:\n  - key: client\n    rate_limit:\n      unit: second\n      requests_per_unit: 1000000000\n";

struct Measured {
    calls: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e6
    }
}

/// Runs `concurrency` tasks calling `call(task, n)` for `duration`.
async fn closed_loop<F, Fut>(concurrency: usize, duration: Duration, call: F) -> BoxResult<Measured>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = BoxResult<()>> + Send,
{
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let call = call.clone();
        tasks.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                call(task, n).await?;
                let t1 = Instant::now();
                let nanos = u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX);
                hist.saturating_record(nanos.max(1_000));
                n += 1;
                if t1 >= deadline {
                    return Ok::<_, Box<dyn Error + Send + Sync>>((n, hist));
                }
            }
        });
    }
    let mut calls = 0;
    let mut latency = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    while let Some(joined) = tasks.join_next().await {
        let (n, hist) = joined??;
        calls += n;
        latency.add(&hist)?;
    }
    Ok(Measured {
        calls,
        elapsed: start.elapsed(),
        latency,
    })
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let seconds = arg("--seconds", 5);
    let concurrency = usize::try_from(arg("--concurrency", 64))?;
    let duration = Duration::from_secs(seconds);
    let redis = TestRedis::get();
    let dir = std::env::temp_dir().join(format!("rls-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("bench.yaml");
    std::fs::write(&config, CONFIG)?;
    let args = <ServerArgs as clap::Parser>::try_parse_from([
        "ratelimit-server",
        "--config",
        config.to_str().unwrap_or_default(),
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--redis-url",
        &redis.url,
        "--redis-timeout-ms",
        "1000",
        "--no-watch",
    ])?;
    let server = RunningServer::start(&args).await?;
    let adapter = server.container.adapter().clone();
    let rule = bucket_rule(1_000_000_000, Unit::Second)?.ok_or("no rule")?;
    // Several HTTP/2 connections, as a fleet of Envoys would open (one is a bottleneck of its
    // own: one socket, one connection task on each side).
    let connections = usize::try_from(arg("--connections", 1))?.max(1);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))?
                .connect()
                .await?;
        clients.push(RateLimitServiceClient::new(channel));
    }
    let clients = Arc::new(clients);
    let run_id = std::process::id();

    let library = {
        let adapter = adapter.clone();
        let rule = rule.clone();
        move |task: usize, n: u64| {
            let adapter = adapter.clone();
            let rule = rule.clone();
            async move {
                let path = format!("bench|client=lib-{run_id}-{task}-{n}");
                let (limit, key) = keys::bucket("rls_bench", &path, &rule)?;
                let label: Arc<str> = Arc::from("bench");
                let result = adapter
                    .check_buckets(&label, &path, &[BucketCheck::new(&key, &limit, 1)])
                    .await?;
                if !result.allowed || result.is_degraded() {
                    return Err("the library refused or failed open".into());
                }
                Ok(())
            }
        }
    };
    let grpc = {
        let clients = clients.clone();
        move |task: usize, n: u64| {
            let clients = clients.clone();
            let mut client = clients[task % clients.len()].clone();
            async move {
                let request = RateLimitRequest {
                    domain: "bench".to_owned(),
                    descriptors: vec![RateLimitDescriptor {
                        entries: vec![Entry {
                            key: "client".to_owned(),
                            value: format!("grpc-{run_id}-{task}-{n}"),
                        }],
                        ..RateLimitDescriptor::default()
                    }],
                    hits_addend: 0,
                };
                let answer = client.should_rate_limit(request).await?.into_inner();
                if answer.overall_code != 1 {
                    return Err("the server refused".into());
                }
                Ok(())
            }
        }
    };
    // Warm-up, then alternate.
    closed_loop(concurrency, Duration::from_secs(1), library.clone()).await?;
    closed_loop(concurrency, Duration::from_secs(1), grpc.clone()).await?;
    let mut rows = Vec::new();
    for round in 1..=2 {
        let lib = closed_loop(concurrency, duration, library.clone()).await?;
        let srv = closed_loop(concurrency, duration, grpc.clone()).await?;
        rows.push((round, lib, srv));
    }
    let failures = server
        .service
        .metrics()
        .encode()?
        .lines()
        .filter(|l| l.starts_with("ratelimit_server_store_failures_total"))
        .count();
    let mut table = format!(
        "ShouldRateLimit over gRPC ({connections} connections) vs the library in process, same Redis, {concurrency} concurrent callers, {seconds} s per run\n\n\
         | round | library calls/s | library p50 / p99 ms | server calls/s | server p50 / p99 ms | server / library |\n\
         |---|---|---|---|---|---|\n"
    );
    for (round, lib, srv) in &rows {
        table.push_str(&format!(
            "| {round} | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} | {:.2} |\n",
            lib.per_second(),
            lib.ms(0.5),
            lib.ms(0.99),
            srv.per_second(),
            srv.ms(0.5),
            srv.ms(0.99),
            srv.per_second() / lib.per_second()
        ));
    }
    if failures > 0 {
        table.push_str("\nwarning: the store failed during the run (see store_failures)\n");
    }
    println!("{table}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("server.md"), &table)?;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
