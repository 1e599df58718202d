//! The centre of the ratelimit workspace: what a rate limit *is*, with no infrastructure.
//!
//! Everything else in the workspace depends on this crate; it depends on nothing of theirs.
//!
//! # Contents
//! - [`RateLimitRule`] and [`RateLimitScope`]: the configuration of one endpoint's bucket,
//!   validated when it is built ([`RuleError`]).
//! - [`Limit`] and [`EndpointLimits`]: an endpoint's named limits, checked all or nothing.
//! - [`RuleSet`]: endpoint → limits, looked up in O(1) on every check.
//! - [`BucketKey`]: the storage key of one bucket, built from untrusted identifiers.
//! - [`IpGrouping`]: the identifier of a client IP address (canonical form, IPv6 by `/64`),
//!   shared by the HTTP layer and the admin CLI.
//! - [`token_bucket`]: the pure token-bucket step that every store must reproduce exactly.
//! - [`RateLimitResult`], [`BucketDecision`] and [`DecisionSource`]: what a check answers.
//! - [`RateLimitEvent`] and its three variants: what a check tells observers.
//! - Ports: [`RateLimiter`] (the service API), [`BucketStore`] (storage), [`EventBus`]
//!   (events), and [`Clock`] (time for in-process stores).
//! - [`RateLimitError`]: the one error type, with a machine-readable [`ErrorCode`].
//!
//! With the `mocks` feature, mockall mocks of the ports are exported
//! (`MockBucketStore`, `MockEventBus`, `MockRateLimiter`).

pub mod client_ip;
mod clock;
mod error;
mod event;
mod key;
mod limit;
mod policy;
mod ports;
mod result;
mod rule;
mod rules;
mod scope;
pub mod token_bucket;

pub use client_ip::{ClientIpError, IpGrouping, parse_client_ip};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{ErrorCode, RateLimitError, Result};
pub use event::{
    RateLimitCheckAllowed, RateLimitCheckAttempted, RateLimitCheckDenied, RateLimitEvent,
};
pub use key::{BucketKey, KeyBuilder, MAX_IDENTIFIER_BYTES};
pub use limit::{
    EndpointLimits, Limit, MAX_LIMIT_NAME_BYTES, MAX_LIMITS_PER_ENDPOINT,
    validate_name as validate_limit_name,
};
pub use policy::FailurePolicy;
pub use ports::{
    BucketRequest, BucketStore, CheckOptions, DynBucketStore, DynEventBus, DynRateLimiter,
    EventBus, RateLimiter, RateLimiterExt,
};
#[cfg(any(test, feature = "mocks"))]
pub use ports::{MockBucketStore, MockEventBus, MockRateLimiter};
pub use result::{
    BucketDecision, DecisionSource, LimitOutcome, Limits, LimitsIntoIter, RateLimitResult,
};
pub use rule::{MAX_TOKENS_LIMIT, MAX_TTL_SECONDS, RateLimitRule, RuleError};
pub use rules::RuleSet;
pub use scope::{ParseScopeError, RateLimitScope};
