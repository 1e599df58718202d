//! Shared support of the end-to-end tests: a real axum server on a loopback port, a real
//! HTTP client, and a container on the memory backend or on a throwaway redis-server.

#![allow(dead_code, unreachable_pub)] // each test file uses a part of it

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use ratelimit_adapter::RateLimitEvent;
use ratelimit_config::parse_rules;
use ratelimit_container::{Backend, Container, ContainerConfig, RedisConfig};
use ratelimit_http::{AuthenticatedUser, RateLimitLayer};
use ratelimit_tests::fixtures::LOGIN_PATH;
use ratelimit_tests::redis_server::{TestRedis, unique_prefix};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

/// The rules every end-to-end test serves.
pub const RULES: &str = r#"
[rules."POST /api/v1/sessions"]
max_tokens = 5
refill_rate = 5.0
scope = "ip"

[rules."GET /users/{id}"]
max_tokens = 3
refill_rate = 3.0
scope = "ip"

[rules."GET /me"]
max_tokens = 2
refill_rate = 2.0
scope = "user"

[rules."GET /linked"]
max_tokens = 2
refill_rate = 2.0
scope = "user_provider"

[rules."GET /global"]
max_tokens = 2
refill_rate = 2.0
scope = "global"

[rules."GET /disabled"]
max_tokens = 1
refill_rate = 1.0
scope = "ip"
enabled = false
"#;

/// Where the buckets live.
pub enum Store {
    /// The in-memory backend.
    Memory,
    /// A throwaway redis-server (or `REDIS_URL`), kept alive as long as this value.
    Redis(TestRedis),
    /// A Redis URL on which nothing listens: every check fails.
    DeadRedis(String),
}

impl Store {
    pub fn memory() -> Self {
        Self::Memory
    }

    pub fn redis() -> Self {
        Self::Redis(TestRedis::get())
    }

    pub fn dead_redis() -> Self {
        Self::DeadRedis(ratelimit_tests::redis_server::unreachable_url())
    }

    /// The container configuration of this store with `rules`.
    pub fn config(&self, rules: &str) -> ContainerConfig {
        let rules = parse_rules(rules).unwrap();
        let config = ContainerConfig::memory(rules).with_key_prefix(unique_prefix());
        match self {
            Self::Memory => config,
            // Generous deadline: these tests are about decisions, not timeouts.
            Self::Redis(redis) => config.with_backend(Backend::Redis(
                RedisConfig::new(redis.url.clone()).with_check_timeout(Duration::from_secs(5)),
            )),
            Self::DeadRedis(url) => config.with_backend(Backend::Redis(RedisConfig::new(url))),
        }
    }

    pub async fn container(&self) -> Container {
        Container::build(self.config(RULES)).await.unwrap()
    }
}

/// Puts an [`AuthenticatedUser`] into the extensions from `x-user` / `x-provider`, as an
/// authentication layer would.
async fn fake_auth(mut request: Request, next: Next) -> Response {
    if let Some(id) = request
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
    {
        let mut user = AuthenticatedUser::new(id);
        if let Some(p) = request
            .headers()
            .get("x-provider")
            .and_then(|v| v.to_str().ok())
        {
            user = user.with_provider(p);
        }
        request.extensions_mut().insert(user);
    }
    next.run(request).await
}

async fn ok(request: Request) -> String {
    format!("ok {} {}", request.method(), request.uri().path())
}

/// One route per rule, plus `GET /free` without a rule, behind `layer` and the fake auth.
pub fn app(layer: RateLimitLayer) -> Router {
    Router::new()
        .route("/api/v1/sessions", post(ok))
        .route("/users/{id}", get(ok))
        .route("/me", get(ok))
        .route("/linked", get(ok))
        .route("/global", get(ok))
        .route("/disabled", get(ok))
        .route("/free", get(ok))
        .route_layer(layer)
        .layer(middleware::from_fn(fake_auth))
}

/// A running server; aborted on drop.
pub struct Server {
    pub base: String,
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// `POST /api/v1/sessions` with `headers`.
    pub async fn login(&self, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = client().post(format!("{}{LOGIN_PATH}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }
}

/// Serves `app` on `bind` (`127.0.0.1:0` or `[::1]:0`) with the peer address available.
pub async fn serve(app: Router, bind: &str) -> Server {
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Server {
        base: format!("http://{addr}"),
        addr,
        task,
    }
}

/// Serves `app` without `ConnectInfo` (a misconfigured server).
pub async fn serve_without_connect_info(app: Router) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server {
        base: format!("http://{addr}"),
        addr,
        task,
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The rate-limit headers of a response (and `Retry-After`), by lower-case name.
pub fn limit_headers(response: &reqwest::Response) -> BTreeMap<String, String> {
    response
        .headers()
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            name.starts_with("ratelimit")
                || name.starts_with("x-ratelimit")
                || name == "retry-after"
        })
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
        .collect()
}

/// An expected header set.
pub fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The identifiers of every `Attempted` event received so far.
pub fn attempted_identifiers(events: &mut broadcast::Receiver<RateLimitEvent>) -> Vec<String> {
    let mut identifiers = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let RateLimitEvent::Attempted(attempted) = event {
            identifiers.push(attempted.identifier.to_string());
        }
    }
    identifiers
}

/// The JSON body of a response.
pub async fn json(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}
