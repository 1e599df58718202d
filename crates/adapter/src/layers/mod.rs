//! Layers over a [`BucketStore`](ratelimit_domain::BucketStore): stores that wrap another store
//! and add one behaviour, each generic over the store it wraps, with an `inner()` accessor.
//!
//! | Layer | What it adds |
//! |---|---|
//! | [`CircuitBreakerStore`] | stops calling a failing store for a cool-down, so the failure policy applies at once |
//! | [`DenyCacheStore`] | answers repeats of a denial in process until its `retry_after` |
//! | [`ErrorCaptureStore`] | remembers the last error the store returned (for admin tools) |
//!
//! They compose in one line, innermost first, as the container composes them over Redis:
//!
//! ```
//! use std::sync::Arc;
//! use ratelimit_adapter::layers::{CircuitBreakerConfig, CircuitBreakerStore, DenyCacheStore};
//! use ratelimit_memory::MemoryStorage;
//!
//! let store = DenyCacheStore::new(
//!     Arc::new(CircuitBreakerStore::new(
//!         Arc::new(MemoryStorage::new()),
//!         CircuitBreakerConfig::default(),
//!     )),
//!     10_000,
//! );
//! assert_eq!(store.inner().inner().bucket_count(), 0);
//! ```
//!
//! Every layer passes the store contract suite (`tests/src/contract.rs`) over the memory store
//! and over Redis. The failure policy itself is not a layer: it decides what a check answers,
//! which only the adapter knows (see `TokenBucketAdapterBuilder::failure_policy`).

mod circuit_breaker;
mod deny_cache;
mod last_error;

pub use circuit_breaker::{CircuitBreakerConfig, CircuitBreakerStore, CircuitState};
pub use deny_cache::DenyCacheStore;
pub use last_error::ErrorCaptureStore;

/// The several-bucket check of the layers' test doubles, which keep no buckets and only answer:
/// each request on its own, in order (not atomic, which real stores must be).
#[cfg(test)]
async fn one_by_one<S: ratelimit_domain::BucketStore + ?Sized>(
    store: &S,
    requests: &[ratelimit_domain::BucketRequest<'_>],
) -> ratelimit_domain::Result<Vec<ratelimit_domain::BucketDecision>> {
    let mut decisions = Vec::with_capacity(requests.len());
    for request in requests {
        decisions.push(store.check_and_consume(request).await?);
    }
    Ok(decisions)
}
