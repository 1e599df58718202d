//! `ratelimit-server`: a rate-limit service that Envoy (and any gRPC or HTTP client) asks before
//! each request, over `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, answered
//! with the token buckets of this workspace, configured in envoyproxy/ratelimit's YAML format.
//!
//! # Modules
//! - [`config`]: the YAML configuration, its validation, and descriptor matching.
//! - [`keys`]: bucket paths and storage keys of descriptors.
//! - [`service`]: `ShouldRateLimit` itself, one all-or-nothing check per request.
//! - [`grpc`] and [`http`]: the two front doors (gRPC with health; `/json`, `/healthcheck`,
//!   `/metrics`, `/rlconfig`).
//! - [`metrics`]: Prometheus counters.
//! - [`reload`]: live reload of the configuration.
//! - [`run`]: the command line, start-up and graceful shutdown.
//!
//! See `docs/server.md` for running it, an Envoy configuration and the move from
//! envoyproxy/ratelimit.

pub mod config;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod reload;
pub mod run;
pub mod service;
