//! An example server: one route per rule of a rules file, behind the rate-limit layer.
//!
//! Run it (in-memory buckets without `--redis-url`):
//!
//! ```sh
//! cargo run -p ratelimit-http --example server -- \
//!     --listen 127.0.0.1:8080 --rules crates/http/examples/rules.toml \
//!     [--redis-url redis://127.0.0.1:6379] [--trust-proxy 10.0.0.0/8] [--ipv6-prefix 64] \
//!     [--events]
//! ```
//!
//! then try it:
//!
//! ```sh
//! for i in $(seq 6); do curl -si -X POST http://127.0.0.1:8080/api/v1/sessions | head -n 8; done
//! curl -s http://127.0.0.1:8080/metrics
//! ```
//!
//! Every route answers `200` with `{"endpoint": "...", "path": "..."}` unless the layer
//! answers first (429 and the like). `GET /metrics` serves the layer's per-endpoint,
//! per-limit decision counters (`ratelimit_http_decisions_total`) in Prometheus (OpenMetrics)
//! text; with `--events`, also the event-derived counters. Logs go through
//! `tracing` (`RUST_LOG=debug` for every decision). No proxy is trusted unless
//! `--trust-proxy` names it.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::error::Error;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::ExitCode;

use axum::Router;
use axum::extract::Request;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use axum::routing::{MethodFilter, MethodRouter, get};
use clap::Parser;
use ratelimit_config::load_rules_file;
use ratelimit_container::{
    Backend, Container, ContainerConfig, FailurePolicy, KeyLayout, RedisConfig,
};
use ratelimit_http::{
    DefaultExtractor, ForwardedHeader, HeaderStyle, IpNet, RateLimitLayer, RateLimitMetrics,
};

/// The example server's command line.
#[derive(Debug, Parser)]
#[command(about = "An example HTTP server behind the ratelimit tower layer")]
pub(crate) struct Args {
    /// Address to listen on (`[::1]:8080` for IPv6).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    /// The rules file (TOML): one route is mounted per rule.
    #[arg(long)]
    pub(crate) rules: PathBuf,
    /// Redis URL; the in-memory backend without one.
    #[arg(long, env = "REDIS_URL")]
    pub(crate) redis_url: Option<String>,
    /// A trusted proxy address or network (repeatable, or comma-separated). None by default.
    #[arg(long = "trust-proxy", value_delimiter = ',')]
    pub(crate) trust_proxy: Vec<IpNet>,
    /// Read the RFC 7239 `Forwarded` header from trusted proxies instead of
    /// `X-Forwarded-For`.
    #[arg(long)]
    pub(crate) forwarded: bool,
    /// IPv6 clients are grouped by this prefix length.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u8).range(0..=128))]
    pub(crate) ipv6_prefix: u8,
    /// The most buckets the in-memory backend holds; past it, full buckets are evicted first.
    #[arg(long, default_value_t = ContainerConfig::DEFAULT_MEMORY_CAPACITY)]
    pub(crate) memory_capacity: usize,
    /// What a check answers when Redis fails: open (allow), closed (deny) or local (decide
    /// with in-process buckets).
    #[arg(long, default_value_t = FailurePolicy::Open)]
    pub(crate) failure_policy: FailurePolicy,
    /// How buckets are stored in Redis (docs/lua.md): `compact` (the default) or `two-keys`
    /// (the original's layout).
    #[arg(long, value_name = "two-keys|compact", default_value_t = KeyLayout::Compact)]
    pub(crate) layout: KeyLayout,
    /// Subscribe to the library's event bus: the event logger (every check at debug, denials
    /// at info) and the event-derived `ratelimit_allowed`/`ratelimit_denied` counters. Off by
    /// default: the layer counts every decision itself, exactly, and logs its denials; with
    /// nobody subscribed no event is built (about 2 µs less per request).
    #[arg(long)]
    pub(crate) events: bool,
    /// The rate-limit headers of responses: `ietf` (the draft's `RateLimit-Policy` and
    /// `RateLimit`, the default), `both` (also `X-RateLimit-Limit`, `-Remaining` and `-Reset`,
    /// for clients written against those), `legacy` (only those) or `none`. `Retry-After` is
    /// sent on every 429 whatever this says.
    #[arg(long, value_enum, default_value_t = Headers::Ietf)]
    pub(crate) headers: Headers,
}

/// The `--headers` choices, as [`HeaderStyle`] names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Headers {
    /// `RateLimit-Policy` and `RateLimit`.
    Ietf,
    /// The IETF fields and `X-RateLimit-*`.
    Both,
    /// `X-RateLimit-*` only.
    Legacy,
    /// No informational header.
    None,
}

impl From<Headers> for HeaderStyle {
    fn from(headers: Headers) -> Self {
        match headers {
            Headers::Ietf => Self::Ietf,
            Headers::Both => Self::Both,
            Headers::Legacy => Self::Legacy,
            Headers::None => Self::None,
        }
    }
}

/// The server's parts: the router, the container behind it, and the metrics.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) router: Router,
    pub(crate) container: Container,
    pub(crate) metrics: RateLimitMetrics,
}

/// Builds the container, the metrics subscriber and the router. Must run within Tokio.
///
/// # Errors
/// A rules file that cannot be read or is invalid, a rule whose endpoint the server cannot
/// mount, or an unusable Redis URL.
pub(crate) async fn build(args: &Args) -> Result<App, Box<dyn Error>> {
    let rules = load_rules_file(&args.rules)?;
    let mut config = ContainerConfig::memory(rules.clone())
        .with_memory_capacity(args.memory_capacity)
        .with_failure_policy(args.failure_policy)
        .with_event_logging(args.events);
    if let Some(url) = args
        .redis_url
        .as_deref()
        .map(str::trim)
        .filter(|url| !url.is_empty())
    {
        let redis = RedisConfig::new(url).with_layout(args.layout);
        config = config.with_backend(Backend::Redis(redis));
    }
    let container = Container::build(config).await?;
    let metrics = RateLimitMetrics::new();
    if args.events {
        metrics.spawn(container.events());
    }

    let header = if args.forwarded {
        ForwardedHeader::Forwarded
    } else {
        ForwardedHeader::XForwardedFor
    };
    let extractor = DefaultExtractor::new()
        .trust_proxies(args.trust_proxy.iter().copied())
        .forwarded_header(header)
        .ipv6_prefix(args.ipv6_prefix);
    // The layer counts its own decisions on the request path (exact under any load); the
    // event-derived counters (`--events`) also see checks made outside the layer.
    let layer = RateLimitLayer::from_adapter(container.adapter().clone())
        .extractor(extractor)
        .header_style(args.headers.into())
        .metrics(&metrics);

    // Group the rules by path: one method router per path.
    let mut paths: BTreeMap<String, Vec<(MethodFilter, String)>> = BTreeMap::new();
    for (endpoint, _) in rules.iter() {
        let (method, path) = parse_endpoint(endpoint)?;
        paths
            .entry(path.to_owned())
            .or_default()
            .push((method, endpoint.to_owned()));
    }
    let mut router = Router::new();
    for (path, methods) in paths {
        let mut method_router: MethodRouter = MethodRouter::new();
        for (method, endpoint) in methods {
            method_router =
                method_router.on(method, move |request: Request| answer(endpoint, request));
        }
        // axum panics on paths it cannot route (`/:old-style`, a misplaced `{*wildcard}`):
        // turn that into an error naming the rule.
        let attempt =
            std::panic::catch_unwind(AssertUnwindSafe(|| router.route(&path, method_router)));
        router = attempt
            .map_err(|_| format!("axum cannot mount the route {path:?} of the rules file"))?;
    }
    let metrics_route = metrics.clone();
    let router = router.route_layer(layer).route(
        "/metrics",
        get(move || serve_metrics(metrics_route.clone())),
    );

    tracing::info!(
        backend = container.backend_name(),
        routes = rules.len(),
        trusted_proxies = ?args.trust_proxy,
        "example server ready"
    );
    Ok(App {
        router,
        container,
        metrics,
    })
}

/// `METHOD /path` → (method filter, path).
fn parse_endpoint(endpoint: &str) -> Result<(MethodFilter, &str), String> {
    let (method, path) = endpoint
        .split_once(' ')
        .ok_or_else(|| format!("rule {endpoint:?}: expected \"METHOD /path\""))?;
    if !path.starts_with('/') || path.contains(' ') {
        return Err(format!(
            "rule {endpoint:?}: the path must start with / and hold no space"
        ));
    }
    if path == "/metrics" {
        return Err(format!(
            "rule {endpoint:?}: /metrics is the server's own route"
        ));
    }
    let method: Method = method
        .parse()
        .map_err(|_| format!("rule {endpoint:?}: {method:?} is not an HTTP method"))?;
    let filter = MethodFilter::try_from(method)
        .map_err(|err| format!("rule {endpoint:?}: axum cannot route the method ({err})"))?;
    Ok((filter, path))
}

async fn answer(endpoint: String, request: Request) -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "endpoint": endpoint,
        "path": request.uri().path(),
    }))
}

async fn serve_metrics(metrics: RateLimitMetrics) -> axum::response::Response {
    match metrics.encode() {
        Ok(text) => (
            [(header::CONTENT_TYPE, RateLimitMetrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "cannot encode metrics");
            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let app = build(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        backend = app.container.backend_name(),
        metrics = ?app.metrics,
        "listening; Ctrl-C stops"
    );
    println!("listening on http://{address} (metrics on /metrics)");
    axum::serve(
        listener,
        app.router
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
