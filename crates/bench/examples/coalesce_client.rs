//! The client side of coalesced checks, alone: `TASKS` tasks checking random identifiers for
//! `SECONDS` against a running Redis, then checks/s and the coalescer's batches. Small enough to
//! run under `valgrind --tool=callgrind` or `perf`, and to read the client's CPU per check from
//! `/usr/bin/time` (docs/performance.md, "Client CPU per coalesced check").
//!
//! ```text
//! cargo build --release -p ratelimit-bench --example coalesce_client
//! target/release/examples/coalesce_client redis://127.0.0.1:6379 64 4 on
//! ```
//!
//! Modes: `on` (the adapter over `RedisStorage`, coalescing on), `off` (coalescing off), `raw`
//! (one `EVALSHA` of the compact script per check over one multiplexed connection).

#![allow(clippy::print_stdout)] // a command-line tool: its output is the result

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ratelimit_adapter::{
    RateLimitRule, RateLimitScope, RateLimiter, RateLimiterExt, RuleSet, TokenBucketAdapter,
};
use ratelimit_redis::{CompactArgs, RedisConfig, RedisStorage, TOKEN_BUCKET_COMPACT_SCRIPT};

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const ENDPOINT: &str = "POST /bench";
const MAX_TOKENS: u64 = 1_000_000_000;

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, tasks, seconds, mode] = args.as_slice() else {
        return Err("usage: coalesce_client <redis url> <tasks> <seconds> <on|off|raw>".into());
    };
    let (url, mode) = (url.clone(), mode.clone());
    let tasks: usize = tasks.parse()?;
    let seconds: f64 = seconds.parse()?;
    if !["on", "off", "raw"].contains(&mode.as_str()) {
        return Err(format!("unknown mode {mode}: on, off or raw").into());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(url, tasks, seconds, mode))
}

async fn run(url: String, tasks: usize, seconds: f64, mode: String) -> BoxResult<()> {
    let rule = RateLimitRule::new(RateLimitScope::Ip, MAX_TOKENS, 1e9)?;
    let ttl = rule.storage_ttl_seconds();
    let rules = RuleSet::try_from_rules([(ENDPOINT, rule)])?;
    let config = RedisConfig::new(url.as_str()).with_coalescing(mode == "on");
    let store = Arc::new(RedisStorage::connect(&config).await?);
    let limiter: Arc<dyn RateLimiter> =
        Arc::new(TokenBucketAdapter::builder(store.clone(), rules).build()?);
    let conn = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let sha: Arc<str> = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(TOKEN_BUCKET_COMPACT_SCRIPT)
        .query_async::<String>(&mut conn.clone())
        .await?
        .into();
    let raw = mode == "raw";
    let checks = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let (limiter, checks, conn, sha) = (
            Arc::clone(&limiter),
            Arc::clone(&checks),
            conn.clone(),
            Arc::clone(&sha),
        );
        set.spawn(async move {
            // xorshift: a random identifier per check, so (almost) every check its own bucket.
            let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ task as u64;
            let mut id = String::new();
            while Instant::now() < end {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                id.clear();
                let _ = write!(id, "10.{}.{}.{}", (x >> 16) & 255, (x >> 8) & 255, x & 255);
                if raw {
                    let mut cmd = redis::cmd("EVALSHA");
                    cmd.arg(&*sha)
                        .arg(1)
                        .arg(format!("rate_limit:ip:{id}:{ENDPOINT}:tb"))
                        .arg(CompactArgs::new(MAX_TOKENS, 1e9, 1, ttl).as_bytes());
                    cmd.query_async::<redis::Value>(&mut conn.clone()).await?;
                } else if !limiter.is_allowed(ENDPOINT, &id).await?.allowed {
                    return Err::<(), Box<dyn std::error::Error + Send + Sync>>(
                        "a check was denied".into(),
                    );
                }
                checks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
    }
    while let Some(joined) = set.join_next().await {
        joined??;
    }
    let n = checks.load(Ordering::Relaxed);
    let stats = store.coalescing_stats();
    #[allow(clippy::cast_precision_loss)] // counts far below 2^53
    let (rate, per_batch) = (
        n as f64 / start.elapsed().as_secs_f64(),
        stats.batched_checks as f64 / stats.batches.max(1) as f64,
    );
    println!(
        "{n} checks, {rate:.0}/s, {} batches of {per_batch:.1} checks on average, {} checks alone",
        stats.batches,
        n.saturating_sub(stats.batched_checks)
    );
    Ok(())
}
