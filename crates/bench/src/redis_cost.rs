//! Figure 2: what one check costs Redis in CPU, and what one bucket costs it in memory.
//!
//! Both are read from Redis itself (`INFO commandstats`, `INFO memory`), so they do not depend
//! on the client. Each key layout — a script and the shape of a bucket's keys — is one entry of
//! [`LAYOUTS`]; a new layout is measured by adding an entry.

use std::sync::Arc;
use std::time::Duration;

use ratelimit_adapter::{RateLimitRule, RateLimitScope};
use ratelimit_redis::{CompactArgs, TOKEN_BUCKET_COMPACT_SCRIPT, TOKEN_BUCKET_SCRIPT};
use ratelimit_tests::redis_server::RedisServer;
use redis::aio::MultiplexedConnection;

use crate::progress::Progress;
use crate::redis_path::{ENDPOINT, MAX_TOKENS, REFILL_RATE};
use crate::report::{Figure, Target, Unit};
use crate::stats::median;
use crate::{BoxResult, Settings};

/// One way of keeping a bucket in Redis.
///
/// Every layout's script gets the arguments `RedisStorage` sends it: max_tokens, refill_rate
/// (per minute), cost and now (`""` for Redis `TIME`) for the two-key layout's; for the compact
/// one a single argument, the three numbers packed as little-endian doubles followed by the
/// key lifetime (no `now`: Redis `TIME`).
#[derive(Debug)]
pub(crate) struct Layout {
    /// Name in `summary.json`.
    pub(crate) key: &'static str,
    /// Name in the table.
    pub(crate) label: &'static str,
    /// The Lua script.
    pub(crate) script: &'static str,
    /// The keys (`KEYS`) of the bucket whose base key is given.
    pub(crate) keys: fn(&str) -> Vec<String>,
    /// Whether the script takes the compact script's argument ([`CompactArgs`]) rather than
    /// the two-key script's four.
    pub(crate) compact_args: bool,
}

/// The layouts measured: the two-key layout (`KeyLayout::TwoKeys`) and the compact (the default)
/// one (`KeyLayout::Compact`).
pub(crate) const LAYOUTS: &[Layout] = &[
    Layout {
        key: "two_keys",
        label: "two string keys (two-key layout)",
        script: TOKEN_BUCKET_SCRIPT,
        keys: two_keys,
        compact_args: false,
    },
    Layout {
        key: "compact",
        label: "one binary key (compact)",
        script: TOKEN_BUCKET_COMPACT_SCRIPT,
        keys: compact_key,
        compact_args: true,
    },
];

/// `<base>:tb`, as `RedisStorage` builds it with `KeyLayout::Compact`.
fn compact_key(base: &str) -> Vec<String> {
    vec![format!("{base}:tb")]
}

/// `<base>:tokens` and `<base>:time`, as `RedisStorage` builds them.
fn two_keys(base: &str) -> Vec<String> {
    vec![format!("{base}:tokens"), format!("{base}:time")]
}

/// The CPU baseline: a script that does nothing, called with the same keys and arguments.
const NOOP_SCRIPT: &str = "return 1";

/// Commands per pipeline, and pipelines in flight, when filling Redis.
const BATCH: u64 = 500;
const WORKERS: u64 = 4;

/// The base key of bucket number `i`: a distinct `ip`-scope key for each `i` < 2^24.
fn base_key(i: u64) -> String {
    let [a, b, c, ..] = i.to_le_bytes();
    format!("rate_limit:ip:10.{c}.{b}.{a}:{ENDPOINT}")
}

/// What to send for bucket `i`.
#[derive(Debug, Clone)]
enum Job {
    /// `EVALSHA sha <keys of the layout> max_tokens refill_rate 1 ""`, or for the compact
    /// script `EVALSHA sha <key> <packed max_tokens, refill_rate, 1, ttl>`.
    Script {
        sha: Arc<str>,
        keys: fn(&str) -> Vec<String>,
        /// The key lifetime, for the compact script's arguments.
        ttl: Option<u64>,
    },
    /// `SET <base> 1 EX <ttl>`: the least a bucket with an expiry can cost.
    SetOne,
}

impl Job {
    fn add(&self, pipe: &mut redis::Pipeline, i: u64, refill: &str) {
        let base = base_key(i);
        match self {
            Self::Script { sha, keys, ttl } => {
                let keys = keys(&base);
                let cmd = pipe.cmd("EVALSHA").arg(&**sha).arg(keys.len());
                for key in keys {
                    cmd.arg(key);
                }
                match ttl {
                    None => {
                        cmd.arg(MAX_TOKENS).arg(refill).arg(1).arg("");
                    }
                    Some(ttl) => {
                        let args = CompactArgs::new(MAX_TOKENS, REFILL_RATE, 1, *ttl);
                        cmd.arg(args.as_bytes());
                    }
                }
                cmd.ignore();
            }
            Self::SetOne => {
                pipe.cmd("SET").arg(base).arg(1).arg("EX").arg(120).ignore();
            }
        }
    }
}

/// Sends `job` for buckets `0..count`, pipelined, from [`WORKERS`] tasks.
async fn fill(conn: &MultiplexedConnection, job: &Job, count: u64) -> BoxResult<()> {
    let refill: Arc<str> = REFILL_RATE.to_string().into();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let mut conn = conn.clone();
        let refill = refill.clone();
        let job = job.clone();
        let (from, to) = (count * worker / WORKERS, count * (worker + 1) / WORKERS);
        workers.spawn(async move {
            let mut next = from;
            while next < to {
                let end = (next + BATCH).min(to);
                let mut pipe = redis::pipe();
                for i in next..end {
                    job.add(&mut pipe, i, &refill);
                }
                let () = pipe.query_async(&mut conn).await?;
                next = end;
            }
            Ok::<_, redis::RedisError>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok(())
}

/// The text of `INFO <section>`.
fn info(server: &RedisServer, section: &str) -> BoxResult<String> {
    let value = server.cmd(redis::cmd("INFO").arg(section));
    Ok(redis::from_redis_value::<String>(value)?)
}

/// `field:value` of an `INFO` text.
pub(crate) fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines().find_map(|line| {
        let (name, value) = line.trim_end().split_once(':')?;
        (name == field).then(|| value.to_owned())
    })
}

/// `usec_per_call` of `cmdstat_<command>` in an `INFO commandstats` text.
pub(crate) fn usec_per_call(info: &str, command: &str) -> Option<f64> {
    let stats = info_field(info, &format!("cmdstat_{command}"))?;
    stats.split(',').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == "usec_per_call").then(|| value.parse().ok())?
    })
}

fn used_memory(server: &RedisServer) -> BoxResult<f64> {
    let text = info(server, "memory")?;
    info_field(&text, "used_memory")
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| "no used_memory in INFO memory".into())
}

fn dbsize(server: &RedisServer) -> BoxResult<u64> {
    Ok(redis::from_redis_value(server.cmd(&redis::cmd("DBSIZE")))?)
}

fn flush(server: &RedisServer) {
    server.cmd(redis::cmd("FLUSHALL").arg("SYNC"));
}

/// Server-side microseconds per call of `job` over buckets `0..count` (which exist already).
async fn cpu_per_call(
    server: &RedisServer,
    conn: &MultiplexedConnection,
    job: &Job,
    count: u64,
) -> BoxResult<f64> {
    server.cmd(redis::cmd("CONFIG").arg("RESETSTAT"));
    fill(conn, job, count).await?;
    let text = info(server, "commandstats")?;
    usec_per_call(&text, "evalsha").ok_or_else(|| "no cmdstat_evalsha in INFO commandstats".into())
}

/// Bytes of `used_memory` per bucket, creating `count` buckets with `job` on an empty Redis.
async fn memory_per_bucket(
    server: &RedisServer,
    conn: &MultiplexedConnection,
    job: &Job,
    keys_per_bucket: u64,
    count: u64,
) -> BoxResult<f64> {
    flush(server);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = used_memory(server)?;
    fill(conn, job, count).await?;
    let after = used_memory(server)?;
    let keys = dbsize(server)?;
    if keys != keys_per_bucket * count {
        return Err(format!(
            "expected {} keys after creating {count} buckets, found {keys}",
            keys_per_bucket * count
        )
        .into());
    }
    Ok((after - before) / count as f64)
}

/// Figure 2 for every layout. Leaves Redis empty.
///
/// Memory is measured layout by layout on an emptied Redis. CPU is measured on buckets of every
/// layout at once, in rounds that each measure every layout and the empty script back to back
/// (the order rotating from round to round), so that the compact-vs-two-keys ratio is a
/// median of ratios taken seconds apart rather than a ratio of medians taken minutes apart.
pub(crate) async fn measure(
    server: &RedisServer,
    settings: &Settings,
    progress: &Progress,
) -> BoxResult<Vec<Figure>> {
    let client = redis::Client::open(server.url())?;
    // No response timeout (redis-rs's default is 500 ms): filling a million buckets sends long
    // pipelines, which a loaded machine can take longer than that to answer.
    let conn = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await?;
    let noop = load_script(server, NOOP_SCRIPT)?;
    let rule = RateLimitRule::new(RateLimitScope::Ip, MAX_TOKENS, REFILL_RATE)?;
    let mut figures = Vec::new();

    progress.begin(format!(
        "redis memory: {} buckets, one key each (baseline)",
        settings.buckets
    ));
    let baseline = memory_per_bucket(server, &conn, &Job::SetOne, 1, settings.buckets).await?;
    progress.done();

    let mut jobs = Vec::new();
    let mut bytes = Vec::new();
    for layout in LAYOUTS {
        let sha = load_script(server, layout.script)?;
        let keys_per_bucket = (layout.keys)("x").len() as u64;
        let ttl = layout.compact_args.then(|| rule.storage_ttl_seconds());
        let job = Job::Script {
            sha,
            keys: layout.keys,
            ttl,
        };
        let noop_job = Job::Script {
            sha: noop.clone(),
            keys: layout.keys,
            ttl,
        };
        progress.begin(format!(
            "redis memory: {} buckets, {}",
            settings.buckets, layout.label
        ));
        let per_bucket =
            memory_per_bucket(server, &conn, &job, keys_per_bucket, settings.buckets).await?;
        progress.done();
        figures.push(Figure::new(
            format!("redis.memory.{}.bytes_per_bucket", layout.key),
            format!("Redis memory per bucket: {}", layout.label),
            per_bucket,
            Unit::Bytes,
            "one key per bucket (SET base 1 EX 120)",
            Some(baseline),
        ));
        bytes.push(per_bucket);
        jobs.push((job, noop_job));
    }

    // The buckets of every layout exist now: measure checks of existing buckets, as most
    // checks are.
    flush(server);
    let count = settings.cpu_checks.min(settings.buckets);
    for (job, _) in &jobs {
        fill(&conn, job, count).await?;
    }
    // Per layout: script µs, empty-script µs and their ratio, per round; and per round the
    // ratio of each layout's script to the first layout's (the two-key layout's).
    let mut script_us = vec![Vec::new(); LAYOUTS.len()];
    let mut noop_us = vec![Vec::new(); LAYOUTS.len()];
    let mut vs_noop = vec![Vec::new(); LAYOUTS.len()];
    let mut vs_spec = vec![Vec::new(); LAYOUTS.len()];
    for round in 0..settings.rounds {
        progress.begin(format!(
            "redis CPU per check, every layout: round {}/{}",
            round + 1,
            settings.rounds
        ));
        let mut this_round = vec![0.0; LAYOUTS.len()];
        for step in 0..LAYOUTS.len() {
            let i = (step + round) % LAYOUTS.len();
            let (job, noop_job) = &jobs[i];
            let script = cpu_per_call(server, &conn, job, count).await?;
            let empty = cpu_per_call(server, &conn, noop_job, count).await?;
            script_us[i].push(script);
            noop_us[i].push(empty);
            vs_noop[i].push(script / empty);
            this_round[i] = script;
        }
        for i in 0..LAYOUTS.len() {
            vs_spec[i].push(this_round[i] / this_round[0]);
        }
        progress.done();
    }
    for (i, layout) in LAYOUTS.iter().enumerate() {
        figures.push(
            Figure::new(
                format!("redis.cpu.{}.usec_per_check", layout.key),
                format!("Redis CPU per check: {}", layout.label),
                median(&script_us[i]),
                Unit::Micros,
                "EVALSHA `return 1`, same keys and args",
                Some(median(&noop_us[i])),
            )
            .ratio(median(&vs_noop[i])),
        );
    }
    if let (Some(compact), &[spec_bytes, compact_bytes, ..]) = (
        LAYOUTS.iter().position(|layout| layout.key == "compact"),
        bytes.as_slice(),
    ) {
        figures.push(
            Figure::new(
                "redis.memory.compact_vs_spec.bytes_per_bucket",
                "Redis memory per bucket: compact layout",
                compact_bytes,
                Unit::Bytes,
                "the two-key layout",
                Some(spec_bytes),
            )
            .target(Target::RatioAtMost(0.6)),
        );
        figures.push(
            Figure::new(
                "redis.cpu.compact_vs_spec.usec_per_check",
                "Redis CPU per check: compact layout",
                median(&script_us[compact]),
                Unit::Micros,
                "the two-key script, same rounds",
                Some(median(&script_us[0])),
            )
            .ratio(median(&vs_spec[compact]))
            .target(Target::RatioAtMost(0.5)),
        );
    }
    flush(server);
    Ok(figures)
}

/// `SCRIPT LOAD`s a script and returns its SHA.
fn load_script(server: &RedisServer, script: &str) -> BoxResult<Arc<str>> {
    let sha: String =
        redis::from_redis_value(server.cmd(redis::cmd("SCRIPT").arg("LOAD").arg(script)))?;
    Ok(sha.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_usec_per_call_from_commandstats() {
        let text = "# Commandstats\r\n\
            cmdstat_config:calls=1,usec=12,usec_per_call=12.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_evalsha:calls=200000,usec=370000,usec_per_call=1.85,rejected_calls=0,failed_calls=0\r\n";
        assert_eq!(usec_per_call(text, "evalsha"), Some(1.85));
        assert_eq!(usec_per_call(text, "config"), Some(12.0));
        assert_eq!(usec_per_call(text, "get"), None);
    }

    #[test]
    fn reads_info_fields() {
        let text = "# Memory\r\nused_memory:1234567\r\nused_memory_human:1.18M\r\n";
        assert_eq!(info_field(text, "used_memory").as_deref(), Some("1234567"));
        assert_eq!(info_field(text, "used_memory_rss"), None);
    }

    #[test]
    fn layouts_and_bucket_keys_are_distinct() {
        assert_ne!(base_key(1), base_key(256));
        assert_eq!(base_key(0x01_02_03), "rate_limit:ip:10.1.2.3:POST /bench");
        for layout in LAYOUTS {
            let keys = (layout.keys)("k");
            assert!(!keys.is_empty(), "{}", layout.key);
            assert!(
                keys.iter().all(|key| key.starts_with('k')),
                "{}",
                layout.key
            );
        }
    }
}
