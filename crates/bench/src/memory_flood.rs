//! `ratelimit-bench memory-flood`: distinct identifiers, one check each, through a
//! `MemoryStorage`, with the process's resident memory every million keys.
//!
//! This is the attack the store's capacity is for: every new identifier (an IPv6 /64, a free
//! account) adds a bucket. Identifiers are IPv6 /64 prefixes, the rule refills over an hour
//! (so nothing expires during the run and only eviction makes room), and the store's clock is
//! a `ManualClock` that moves 1 µs per key, so runs are alike. Every bucket is one token short
//! of full when it is evicted: every eviction is a non-full one, the worst case.
//!
//! Each capacity runs in a process of its own (this binary, started again with one
//! `--capacity`), so that memory freed by one run does not flatter the next.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use ratelimit_adapter::domain::{BucketRequest, KeyBuilder, ManualClock};
use ratelimit_adapter::{BucketStore, RateLimitRule, RateLimitScope};
use ratelimit_memory::MemoryStorage;

use crate::BoxResult;
use crate::redis_path::ENDPOINT;

/// Capacities run when none is given: the default, a tenth of it, and twice the number of
/// keys (so nothing is evicted: the store without a bound, for contrast).
const CAPACITIES: [&str; 3] = ["default", "100000", "unbounded"];

/// Keys between two samples of resident memory.
const SAMPLE_EVERY: u64 = 1_000_000;

/// Options of `memory-flood`.
#[derive(Debug, Clone, Args)]
pub(crate) struct FloodArgs {
    /// Distinct identifiers sent, one check each.
    #[arg(long, default_value_t = 10_000_000)]
    keys: u64,
    /// Store capacities to run, each in its own process: a number of buckets, `default`
    /// (MemoryStorage::DEFAULT_CAPACITY) or `unbounded` (twice --keys: each shard holds
    /// 1/16 of the capacity, so a capacity just above --keys would evict a little). Repeat the flag
    /// for several; without it: default, 100000 and unbounded.
    #[arg(long = "capacity")]
    capacities: Vec<String>,
}

/// Runs every capacity asked for, each in a child process, or the one asked for here.
pub(crate) fn run(args: &FloodArgs) -> BoxResult<()> {
    let capacities: Vec<&str> = if args.capacities.is_empty() {
        CAPACITIES.to_vec()
    } else {
        args.capacities.iter().map(String::as_str).collect()
    };
    if let [capacity] = capacities.as_slice() {
        return flood(args.keys, capacity);
    }
    println!(
        "memory-flood: {} distinct IPv6 /64 identifiers, one check each, through MemoryStorage",
        args.keys
    );
    println!("(each capacity in a process of its own; RSS is the whole process's VmRSS)\n");
    std::io::stdout().flush()?;
    let exe = std::env::current_exe()?;
    for capacity in capacities {
        let status = Command::new(&exe)
            .args(["memory-flood", "--keys", &args.keys.to_string()])
            .args(["--capacity", capacity])
            .status()?;
        if !status.success() {
            return Err(format!("memory-flood --capacity {capacity}: {status}").into());
        }
    }
    Ok(())
}

fn capacity(name: &str, keys: u64) -> BoxResult<usize> {
    Ok(match name {
        "default" => MemoryStorage::DEFAULT_CAPACITY,
        "unbounded" => usize::try_from(keys)?.saturating_mul(2),
        n => n
            .replace('_', "")
            .parse()
            .map_err(|err| format!("--capacity {n}: {err}"))?,
    })
}

/// One flood, printed as a Markdown table.
fn flood(keys: u64, capacity_name: &str) -> BoxResult<()> {
    let capacity = capacity(capacity_name, keys)?;
    let clock = ManualClock::new(1_000_000.0);
    let store = MemoryStorage::builder()
        .capacity(capacity)
        .clock(clock.clone())
        .build()?;
    // 10 tokens, 10 an hour: buckets outlive the run, one check leaves each one token short.
    let rule = RateLimitRule::new(RateLimitScope::Ip, 10, 10.0 / 60.0)?;
    let builder = KeyBuilder::new(KeyBuilder::DEFAULT_PREFIX, RateLimitScope::Ip, ENDPOINT)?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let start_rss = rss_bytes()?;
    let example = builder.key("2001:db8:98:967f::/64")?;
    println!(
        "capacity {capacity_name} ({capacity} buckets); RSS before the first key: {:.1} MB; \
         keys like {example} ({} bytes)\n",
        mb(start_rss),
        example.as_str().len()
    );
    println!("| keys sent | buckets held | RSS MB | evictions | non-full evictions | ns per key |");
    println!("|---:|---:|---:|---:|---:|---:|");
    std::io::stdout().flush()?;
    let mut identifier = String::with_capacity(40);
    let mut chunk_started = Instant::now();
    let mut held_at_cap = None;
    runtime.block_on(async {
        for i in 0..keys {
            identifier.clear();
            use std::fmt::Write as _;
            write!(
                identifier,
                "2001:db8:{:x}:{:x}::/64",
                (i >> 16) & 0xffff,
                i & 0xffff
            )?;
            let key = builder.key(&identifier)?;
            let decision = store
                .check_and_consume(&BucketRequest::new(&key, &rule).with_cost(1))
                .await?;
            if !decision.allowed {
                return Err(format!("key {i} was denied").into());
            }
            clock.advance(Duration::from_micros(1));
            let sent = i + 1;
            if sent % SAMPLE_EVERY == 0 || sent == keys {
                let elapsed = chunk_started.elapsed();
                let chunk = (sent - 1) % SAMPLE_EVERY + 1;
                let stats = store.stats();
                let rss = rss_bytes()?;
                if stats.buckets == capacity && held_at_cap.is_none() {
                    held_at_cap = Some(rss);
                }
                println!(
                    "| {sent} | {} | {:.1} | {} | {} | {:.0} |",
                    stats.buckets,
                    mb(rss),
                    stats.evictions,
                    stats.evictions_not_full,
                    elapsed.as_nanos() as f64 / chunk as f64
                );
                std::io::stdout().flush()?;
                chunk_started = Instant::now();
            }
        }
        Ok::<(), crate::BoxError>(())
    })?;
    let stats = store.stats();
    let end_rss = rss_bytes()?;
    println!(
        "\n{:.0} bytes of RSS per bucket held ({} buckets, {:.1} MB over the start){}\n",
        (end_rss.saturating_sub(start_rss)) as f64 / stats.buckets.max(1) as f64,
        stats.buckets,
        mb(end_rss.saturating_sub(start_rss)),
        held_at_cap.map_or(String::new(), |at_cap| format!(
            "; RSS when the cap was first reached: {:.1} MB",
            mb(at_cap)
        )),
    );
    Ok(())
}

/// Resident memory of this process (`VmRSS` of /proc/self/status), in bytes.
fn rss_bytes() -> BoxResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .ok_or("no VmRSS in /proc/self/status")?;
    Ok(kb * 1024)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_parse() -> BoxResult<()> {
        assert_eq!(capacity("default", 10)?, MemoryStorage::DEFAULT_CAPACITY);
        assert_eq!(capacity("unbounded", 10)?, 20);
        assert_eq!(capacity("100_000", 10)?, 100_000);
        assert!(capacity("lots", 10).is_err());
        Ok(())
    }

    #[test]
    fn rss_is_read() -> BoxResult<()> {
        assert!(rss_bytes()? > 0);
        Ok(())
    }

    #[test]
    fn a_small_flood_runs() -> BoxResult<()> {
        flood(3_000, "1000")
    }
}
