//! Test support for the ratelimit workspace, and the cross-crate tests in `tests/`.
//!
//! - [`redis_server`]: starts a throwaway `redis-server` on a free loopback port (or uses
//!   `REDIS_URL`), and can kill, pause and restart it.
//! - [`redis_cluster`]: a throwaway Redis Cluster of three primaries.
//! - [`contract`]: the conformance suite every [`BucketStore`](ratelimit_domain::BucketStore)
//!   must pass; `tests/contract.rs` runs it against the memory and the Redis store, and against
//!   each store layer (circuit breaker, deny cache) over both.
//! - [`fixtures`]: the endpoints, rules, rules text and temporary rules files tests share.
//! - [`logs`]: a writer that captures what `tracing` logs during a test.
//! - [`stored`]: a Redis bucket's raw values, read and seeded, for bit-for-bit comparisons.
//! - [`report`]: what `just chaos` and `just attack` share to write their tables into `docs/`.
//!
//! The HTTP crate's and the CLI's tests use it as a dev-dependency; the unit tests of the
//! crates this one depends on (domain, stores, adapter, container) cannot, as that would be a
//! dependency cycle within one crate's test build.
//!
//! Tests that need Redis never skip: without `redis-server` they fail with a message saying
//! how to install it.

pub mod contract;
pub mod fixtures;
pub mod logs;
pub mod redis_cluster;
pub mod redis_server;
pub mod report;
pub mod stored;

use std::time::{Duration, Instant};

use ratelimit_domain::{DecisionSource, RateLimitResult, RateLimiter, RateLimiterExt};

/// How soon limiting must resume once Redis answers again, in the recovery tests: the
/// requirement is one second; the extra second absorbs a loaded CI machine.
pub const RESUME_WITHIN: Duration = Duration::from_secs(2);

/// Checks `identifier` on `endpoint` until a decision comes from the store again, and
/// returns it.
///
/// # Panics
/// When no check was decided by the store within [`RESUME_WITHIN`], or a check errs.
pub async fn eventually_from_store(
    limiter: &dyn RateLimiter,
    endpoint: &str,
    identifier: &str,
) -> RateLimitResult {
    let started = Instant::now();
    loop {
        let result = limiter
            .is_allowed(endpoint, identifier)
            .await
            .unwrap_or_else(|err| panic!("check failed: {err}"));
        if result.source == DecisionSource::Store {
            return result;
        }
        assert!(
            started.elapsed() < RESUME_WITHIN,
            "limiting did not resume within {RESUME_WITHIN:?}: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
