//! Tower middleware that rate-limits HTTP requests with ratelimit's token buckets.
//!
//! [`RateLimitLayer`] works with axum 0.8 routers and any [`tower::Service`] over
//! [`http::Request`]s. Each request is checked against every limit of its endpoint,
//! `METHOD /route/template` (axum's matched path, so `/users/17` and `/users/18` share the
//! limits of `GET /users/{id}`), all or nothing in one store call; requests without limits
//! pass untouched. Denied requests get `429 Too Many Requests` with `Retry-After` (and, as an
//! option, a problem-details body), and every limited response carries the IETF draft's
//! `RateLimit-Policy` / `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers-11, one
//! item per limit); the conventional `X-RateLimit-*` ones for the deciding limit are one
//! setting away ([`HeaderStyle::Both`]). An optional function gives requests a cost of their own
//! ([`RateLimitLayer::request_cost`]).
//!
//! Whose bucket a request uses is decided by an [`IdentifierExtractor`]; the
//! [`DefaultExtractor`] takes the client IP (trusting `X-Forwarded-For` / `Forwarded` only
//! from configured proxies, grouping IPv6 clients by `/64`), the [`AuthenticatedUser`] an
//! authentication layer put into the request extensions, or nothing for global rules.
//! [`RateLimitMetrics`] counts, in Prometheus text, every decision the layer makes, on the
//! request path (exact), and, when subscribed to the adapter's events, every check per
//! endpoint.
//!
//! # Mounting on axum
//!
//! Apply the layer with [`Router::route_layer`](axum::Router::route_layer) (or
//! [`Router::layer`](axum::Router::layer)) **after** the routes, so that it runs inside the
//! router, where axum's `MatchedPath` is known; and serve with
//! `into_make_service_with_connect_info::<SocketAddr>()`, so that the client address is.
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use axum::{Router, routing::{get, post}};
//! use ratelimit_config::parse_rules;
//! use ratelimit_container::{Container, ContainerConfig};
//! use ratelimit_http::{DefaultExtractor, RateLimitLayer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let rules = parse_rules(r#"
//!     [rules."POST /api/v1/sessions"]
//!     max_tokens = 5
//!     refill_rate = 5.0
//!     scope = "ip"
//! "#)?;
//! let container = Container::build(ContainerConfig::memory(rules)).await?;
//! let layer = RateLimitLayer::from_adapter(container.adapter().clone())
//!     .policy_name("POST /api/v1/sessions", "login")
//!     .extractor(DefaultExtractor::new().trust_proxies(["10.0.0.0/8".parse()?]));
//!
//! let app = Router::new()
//!     .route("/api/v1/sessions", post(|| async { "welcome" }))
//!     .route("/users/{id}", get(|| async { "a user" }))
//!     .route_layer(layer);
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! See `docs/http.md` in the repository for the headers, proxy trust, failure behaviour and
//! metrics in detail, and `examples/server.rs` for a complete server.

mod headers;
mod identify;
mod ip;
mod layer;
mod metrics;

pub use headers::{
    EndpointHeaders, HeaderStyle, PolicyItem, RATELIMIT, RATELIMIT_POLICY, X_RATELIMIT_LIMIT,
    X_RATELIMIT_REMAINING, X_RATELIMIT_RESET, sf_string,
};
pub use identify::{
    AuthenticatedUser, DefaultExtractor, IdentifierExtractor, IdentifyRequest, MissingUserPolicy,
    Rejection,
};
pub use ip::{ClientIpResolver, ForwardedHeader, IpGrouping, IpNet, ParseIpNetError};
pub use layer::{
    CostRequest, FailOpenPolicy, QUOTA_EXCEEDED_TYPE, RateLimitLayer, RateLimitService,
    ResponseFuture, UnmatchedPolicy,
};
pub use metrics::{DecisionLabels, EndpointLabels, LimitLabels, RateLimitMetrics};
