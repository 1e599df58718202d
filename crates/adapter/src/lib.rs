//! Token-bucket rate limiting for services: the crate a service depends on.
//!
//! [`TokenBucketAdapter`] implements the [`RateLimiter`] port over any [`BucketStore`]:
//! it looks up the endpoint's rule, builds the bucket key for the rule's scope, asks the
//! store, publishes events and applies the failure policy. [`BroadcastEventBus`] is an
//! in-process [`EventBus`], and [`spawn_event_logger`] logs its events through `tracing`.
//!
//! Everything a service needs from the domain is re-exported here, so that depending on this
//! crate alone is enough for a service that brings its own store. To get a ready-made graph
//! (memory or Redis), use the `ratelimit-container` crate.
//!
//! ```
//! use std::sync::Arc;
//! use ratelimit_adapter::{
//!     BroadcastEventBus, RateLimitRule, RateLimitScope, RateLimiterExt, RuleSet, TokenBucketAdapter,
//! };
//! use ratelimit_memory::MemoryStorage;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let rules = RuleSet::try_from_rules([
//!     ("POST /api/v1/sessions", RateLimitRule::new(RateLimitScope::Ip, 5, 5.0)?),
//! ])?;
//! let limiter = TokenBucketAdapter::builder(Arc::new(MemoryStorage::new()), rules)
//!     .events(Arc::new(BroadcastEventBus::default()))
//!     .build()?;
//!
//! let result = limiter.is_allowed("POST /api/v1/sessions", "192.168.1.1").await?;
//! assert!(result.allowed);
//! assert_eq!(result.remaining, 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # When the store fails
//! A check never returns an error because of infrastructure. What it answers is the
//! [`FailurePolicy`] given to the builder: allow (`Open`, the default and the specification's:
//! [`DecisionSource::FailOpen`]), deny (`Closed`: [`DecisionSource::FailClosed`]), or decide
//! with an in-process store (`Local`: [`DecisionSource::LocalFallback`]). Each such answer logs
//! a warning and its events carry the same source. An event bus that fails is logged and
//! otherwise ignored. Only bad input (an empty identifier, say) makes a check return an error.
//! [`reset`](RateLimiter::reset) does not apply the policy: it reports real errors.
//!
//! # Layers over a store
//! [`layers`] holds the stores that wrap another store: the circuit breaker, the deny cache and
//! the error-capturing layer of admin tools. The container composes them over Redis.

mod adapter;
mod events;
mod fnv;
pub mod layers;
mod spare;

pub use adapter::{
    BucketCheck, EndpointHandle, LimitKeys, TokenBucketAdapter, TokenBucketAdapterBuilder,
};
pub use events::{BroadcastEventBus, spawn_event_logger};
pub use fnv::{FnvBuildHasher, FnvHasher};
pub use layers::{
    CircuitBreakerConfig, CircuitBreakerStore, CircuitState, DenyCacheStore, ErrorCaptureStore,
};
pub use spare::SpareString;

pub use ratelimit_domain as domain;
pub use ratelimit_domain::{
    BucketDecision, BucketKey, BucketStore, CheckOptions, Clock, DecisionSource, DynBucketStore,
    DynEventBus, DynRateLimiter, EndpointLimits, ErrorCode, EventBus, FailurePolicy, Limit,
    LimitOutcome, Limits, ManualClock, RateLimitCheckAllowed, RateLimitCheckAttempted,
    RateLimitCheckDenied, RateLimitError, RateLimitEvent, RateLimitResult, RateLimitRule,
    RateLimitScope, RateLimiter, RateLimiterExt, RuleError, RuleSet, SystemClock,
};
