//! `ratelimit-server`: a rate-limit service that Envoy (and any gRPC or HTTP client) asks before
//! each request, over `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, answered
//! with the token buckets of this workspace, configured in envoyproxy/ratelimit's YAML format.
//!
//! See `docs/server.md` for running it, an Envoy configuration and the move from
//! envoyproxy/ratelimit.

pub mod config;
pub mod keys;
