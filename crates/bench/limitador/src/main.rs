//! Drives limitador (Kuadrant's rate limiter, Redis storage) with the benchmark's own closed-loop
//! load generator, for figure 6 of `just bench` (crates/bench/src/coalesced.rs).
//!
//! `ratelimit-bench-limitador <redis url> <tasks> <milliseconds> <seed>`: one limit of
//! 1,000,000,000 requests per 60 s per identifier (the size of the benchmark's token bucket),
//! checked with `check_rate_limited_and_update` on random identifiers by `<tasks>` tasks for
//! the given time. Prints `checks <n>`, `elapsed_ns <n>`, and one `latency <ns> <count>` line
//! per recorded latency, for the benchmark to merge into its histograms.

// A driver's job is to print its results.
#![allow(clippy::print_stdout)]

#[allow(dead_code)]
#[path = "../../src/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../../src/stats.rs"]
mod stats;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use limitador::AsyncRateLimiter;
use limitador::limit::{Context, Expression, Limit, Namespace};
use limitador::storage::redis::AsyncRedisStorage;

use crate::load::{Checker, Identifiers, Outcome};

/// Any error.
type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A result with any error.
type BoxResult<T> = Result<T, BoxError>;

const NAMESPACE: &str = "bench";
const MAX_VALUE: u64 = 1_000_000_000;
const SECONDS: u64 = 60;

#[derive(Clone)]
struct Limitador {
    limiter: Arc<AsyncRateLimiter>,
    namespace: Namespace,
}

impl Checker for Limitador {
    async fn check(&self, identifier: &str) -> BoxResult<Outcome> {
        let result = {
            let ctx = Context::from(HashMap::from([("ip".to_owned(), identifier.to_owned())]));
            self.limiter
                .check_rate_limited_and_update(&self.namespace, &ctx, 1)
                .await
        };
        let result = result.map_err(|err| format!("limitador: {err:?}"))?;
        Ok(if result.limited {
            Outcome::Denied
        } else {
            Outcome::Allowed
        })
    }
}

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, tasks, millis, seed] = args.as_slice() else {
        return Err(
            "usage: ratelimit-bench-limitador <redis url> <tasks> <milliseconds> <seed>".into(),
        );
    };
    let (tasks, millis, seed): (usize, u64, u64) = (tasks.parse()?, millis.parse()?, seed.parse()?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let storage = AsyncRedisStorage::new(url)
            .await
            .map_err(|err| format!("limitador redis storage: {err}"))?;
        let limiter = AsyncRateLimiter::new_with_storage(Box::new(storage));
        limiter.add_limit(Limit::new(
            NAMESPACE,
            MAX_VALUE,
            SECONDS,
            [],
            [Expression::parse("ip").map_err(|err| format!("{err:?}"))?],
        ));
        let checker = Limitador {
            limiter: Arc::new(limiter),
            namespace: Namespace::from(NAMESPACE),
        };
        // Warm: connections open, scripts loaded.
        load::run(
            &checker,
            tasks.min(8),
            Duration::from_millis(100),
            &Identifiers::Random,
            seed ^ 1,
        )
        .await?;
        let result = load::run(
            &checker,
            tasks,
            Duration::from_millis(millis),
            &Identifiers::Random,
            seed,
        )
        .await?;
        if result.denied > 0 {
            return Err(
                format!("{} of {} checks were denied", result.denied, result.checks).into(),
            );
        }
        println!("checks {}", result.checks);
        println!("elapsed_ns {}", result.elapsed.as_nanos());
        for value in result.latency.iter_recorded() {
            println!(
                "latency {} {}",
                value.value_iterated_to(),
                value.count_at_value()
            );
        }
        Ok(())
    })
}
