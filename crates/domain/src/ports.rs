//! The ports: what the adapter needs from the world, and what services get from it.
//!
//! Ports are held as `Arc<dyn …>` and chosen at run time (memory or Redis), so they use
//! `#[async_trait]`: one boxed future per call, small next to a network round trip.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::{BucketDecision, BucketKey, RateLimitEvent, RateLimitResult, RateLimitRule, Result};

/// Options of one check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckOptions {
    /// Tokens to consume instead of the rule's cost. `None` or `Some(0)` means the rule's cost.
    pub cost: Option<u64>,
}

impl CheckOptions {
    /// Options that consume `cost` tokens.
    pub fn with_cost(cost: u64) -> Self {
        Self { cost: Some(cost) }
    }
}

/// The service API: may this request go ahead?
///
/// # Contract
/// - An endpoint without a rule is allowed, with `remaining` and `limit` 0.
/// - A disabled rule allows, with the full bucket as `remaining`.
/// - A failing store or event bus is never a check's error: the implementation's
///   [`crate::FailurePolicy`] decides the answer (allow, deny, or an in-process decision),
///   marked in [`crate::RateLimitResult::source`], and a warning is logged. Only bad input (an
///   empty identifier, say) is an error.
/// - [`get_remaining`](Self::get_remaining) consumes nothing.
/// - [`reset`](Self::reset) is an admin operation: it reports real errors.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait RateLimiter: Send + Sync + Debug + 'static {
    /// Checks one request against the endpoint's rule and consumes its cost if allowed.
    async fn is_allowed_opts(
        &self,
        endpoint: &str,
        identifier: &str,
        options: CheckOptions,
    ) -> Result<RateLimitResult>;

    /// Whole tokens left in the bucket, consuming nothing (0 for an endpoint without an
    /// enabled rule).
    async fn get_remaining(&self, endpoint: &str, identifier: &str) -> Result<u64>;

    /// Refills the identifier's buckets of the endpoint: every limit that is not
    /// [`Global`](crate::RateLimitScope::Global), and in the single-limit form the one limit
    /// whatever its scope. Answers whether there was a bucket to refill (`false`: all were
    /// already full, or the endpoint has no rule, which resets nothing, successfully).
    async fn reset(&self, endpoint: &str, identifier: &str) -> Result<bool>;

    /// Every limit of the endpoint as it stands for `identifier`, consuming nothing, in one
    /// store call: [`RateLimitResult::limits`] holds each limit's remaining tokens, and
    /// `allowed` says whether a request at the endpoint's costs would pass now.
    async fn status(&self, endpoint: &str, identifier: &str) -> Result<RateLimitResult>;

    /// Refills one named limit's bucket for `identifier` (the shared bucket, for a global
    /// limit). Answers whether there was a bucket to refill.
    ///
    /// # Errors
    /// [`crate::ErrorCode::InvalidInput`] when the endpoint has no limit of that name.
    async fn reset_limit(&self, endpoint: &str, identifier: &str, limit: &str) -> Result<bool>;
}

/// Conveniences over [`RateLimiter`], for every implementation.
#[async_trait]
pub trait RateLimiterExt: RateLimiter {
    /// Checks one request at the rule's cost.
    async fn is_allowed(&self, endpoint: &str, identifier: &str) -> Result<RateLimitResult> {
        self.is_allowed_opts(endpoint, identifier, CheckOptions::default())
            .await
    }

    /// Checks one request at an explicit cost (0 means the rule's cost).
    async fn is_allowed_with_cost(
        &self,
        endpoint: &str,
        identifier: &str,
        cost: u64,
    ) -> Result<RateLimitResult> {
        self.is_allowed_opts(endpoint, identifier, CheckOptions::with_cost(cost))
            .await
    }
}

impl<T: RateLimiter + ?Sized> RateLimiterExt for T {}

/// One check of one bucket, as [`BucketStore::check_and_consume`] is asked it: which bucket,
/// under which rule, at what cost, on whose clock.
///
/// Every store and every layer over a store takes this one value, so a new field of a check
/// changes this type rather than every signature.
///
/// ```
/// use ratelimit_domain::{BucketKey, BucketRequest, RateLimitRule, RateLimitScope};
///
/// let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0)?;
/// let key = BucketKey::new(RateLimitScope::Ip, "203.0.113.9", "POST /login")?;
/// let request = BucketRequest::new(&key, &rule).with_cost(2).at(1_700_000_000.0);
/// assert_eq!((request.cost, request.now), (2, Some(1_700_000_000.0)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BucketRequest<'a> {
    /// The bucket.
    pub key: &'a BucketKey,
    /// Its capacity and refill rate.
    pub rule: &'a RateLimitRule,
    /// Tokens to take; 0 only reads.
    pub cost: u64,
    /// Seconds since the Unix epoch; `None` for the store's own clock (Redis's `TIME` for
    /// Redis, the injected [`crate::Clock`] for memory).
    pub now: Option<f64>,
}

impl<'a> BucketRequest<'a> {
    /// A check of `key` at the rule's cost, on the store's clock.
    pub fn new(key: &'a BucketKey, rule: &'a RateLimitRule) -> Self {
        Self {
            key,
            rule,
            cost: rule.cost(),
            now: None,
        }
    }

    /// The same check at another cost (0 only reads).
    #[must_use]
    pub fn with_cost(mut self, cost: u64) -> Self {
        self.cost = cost;
        self
    }

    /// The same check at an explicit time, in seconds since the Unix epoch.
    #[must_use]
    pub fn at(mut self, now: f64) -> Self {
        self.now = Some(now);
        self
    }

    /// The same check on the given clock (`None`: the store's own).
    #[must_use]
    pub fn with_now(mut self, now: Option<f64>) -> Self {
        self.now = now;
        self
    }
}

/// Storage of token buckets.
///
/// # Contract
/// - [`check_and_consume`](Self::check_and_consume) is **atomic** per key: concurrent calls
///   behave as if run one after the other (Redis: one Lua script; memory: a lock), and its
///   decisions are exactly those of [`crate::token_bucket::step`] for the same inputs.
/// - `now` is seconds since the Unix epoch; `None` means the store's own clock (Redis's
///   `TIME` for Redis, the injected [`crate::Clock`] for memory).
/// - Errors are reported as they are ([`crate::ErrorCode::StorageUnavailable`],
///   `StorageTimeout`, `StorageError`); the failure policy is the caller's business.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait BucketStore: Send + Sync + Debug + 'static {
    /// Takes the request's `cost` in tokens from its bucket if it holds that many. A `cost` of
    /// zero only reads.
    async fn check_and_consume<'a>(&self, request: &BucketRequest<'a>) -> Result<BucketDecision>;

    /// [`check_and_consume`](Self::check_and_consume) answered at once, for a store that never
    /// waits (an in-process one): `Some` with exactly what `check_and_consume` would answer,
    /// having done exactly what it would do; `None` when the store has to wait (a network
    /// store, or a layer that adds its own behaviour), and then the caller awaits
    /// `check_and_consume` instead.
    ///
    /// It spares the request path the boxed future of an async port method (a heap allocation
    /// and its release per check). The default answers `None`, which is always correct: a
    /// store or layer implements it only where its answer is the same as the async method's.
    fn check_now<'a>(&self, request: &BucketRequest<'a>) -> Option<Result<BucketDecision>> {
        let _ = request;
        None
    }

    /// One all-or-nothing check over several buckets (the limits of one request): takes each
    /// request's cost from its bucket if **every** bucket holds its cost, otherwise takes
    /// nothing. Answers one decision per request, in order, exactly as
    /// [`crate::token_bucket::step_all`]: `allowed` says whether that bucket had its tokens,
    /// and the whole request is allowed when all are.
    ///
    /// Every request is decided at the `now` of the first. The keys must be distinct. On a
    /// single store the step is atomic; a store whose keys cannot all be written atomically
    /// (Redis Cluster, keys in several slots) documents its weaker guarantee, which must still
    /// never admit more than every bucket allows.
    async fn check_and_consume_all<'a>(
        &self,
        requests: &[BucketRequest<'a>],
    ) -> Result<Vec<BucketDecision>>;

    /// Whole tokens in the bucket, consuming nothing and writing nothing.
    async fn get_remaining(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        now: Option<f64>,
    ) -> Result<u64>;

    /// Makes the bucket full by forgetting it (a missing bucket is a full one). Atomic.
    /// Answers whether there was a bucket to forget (`false`: it was missing, so already full).
    async fn reset(&self, key: &BucketKey, rule: &RateLimitRule) -> Result<bool>;
}

/// Where checks publish their events.
///
/// # Contract
/// `publish` must not wait on subscribers: a check calls it on the request path.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait EventBus: Send + Sync + Debug + 'static {
    /// Hands one event to the bus.
    async fn publish(&self, event: RateLimitEvent) -> Result<()>;

    /// Whether anyone would receive an event published now. When `false`, a check builds and
    /// publishes no events at all (it is asked once per check, so a check publishes both of
    /// its events or neither). Must be cheap; the default is `true`.
    fn is_listening(&self) -> bool {
        true
    }
}

/// A shared, dynamically chosen [`RateLimiter`].
pub type DynRateLimiter = Arc<dyn RateLimiter>;
/// A shared, dynamically chosen [`BucketStore`].
///
/// Deliberately, `Arc<S>` does not implement [`BucketStore`] itself: calls on a
/// `DynBucketStore` then go straight through the vtable to the store, instead of through a
/// forwarding impl that would box one more future on every check.
pub type DynBucketStore = Arc<dyn BucketStore>;
/// A shared, dynamically chosen [`EventBus`].
pub type DynEventBus = Arc<dyn EventBus>;
