//! End to end: a real axum server on a loopback port (IPv4 and IPv6), a real HTTP client
//! (reqwest), and the rate limiter on the memory backend and on a real redis-server.
//!
//! The scenarios of `both_backends!` run once per backend; Redis tests start their own
//! throwaway redis-server (or use `REDIS_URL`) and never skip.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{
    RULES, Store, app, attempted_identifiers, client, headers, json, limit_headers, serve,
    serve_without_connect_info,
};
use ratelimit_container::{Container, FailurePolicy};
use ratelimit_http::{
    DefaultExtractor, FailOpenPolicy, ForwardedHeader, HeaderStyle, IdentifierExtractor,
    IdentifyRequest, MissingUserPolicy, RateLimitLayer, RateLimitMetrics, Rejection,
};
use ratelimit_tests::fixtures::LOGIN;
use ratelimit_tests::logs::CapturedLogs;
use reqwest::StatusCode;

/// The layer the scenarios use: the container's adapter, `login` as the login policy's name,
/// and every informational header (the IETF ones and `X-RateLimit-*`), so that the scenarios
/// check both sets.
fn layer(container: &Container) -> RateLimitLayer {
    RateLimitLayer::from_adapter(container.adapter().clone())
        .policy_name(LOGIN, "login")
        .header_style(HeaderStyle::Both)
}

fn trusting(container: &Container, proxies: &[&str]) -> RateLimitLayer {
    layer(container).extractor(
        DefaultExtractor::new().trust_proxies(proxies.iter().map(|p| p.parse().unwrap())),
    )
}

/// The headers of the `n`-th allowed login (1-based) of a fresh 5-token, 5-per-minute bucket.
fn login_allowed_headers(n: u64) -> std::collections::BTreeMap<String, String> {
    let remaining = 5 - n;
    // t: 0 while a token is left; an empty bucket needs one token's time, 12 s.
    let t = if remaining > 0 { 0 } else { 12 };
    headers(&[
        ("ratelimit-policy", "\"login\";q=5;w=60"),
        ("ratelimit", &format!("\"login\";r={remaining};t={t}")),
        ("x-ratelimit-limit", "5"),
        ("x-ratelimit-remaining", &remaining.to_string()),
        ("x-ratelimit-reset", &t.to_string()),
    ])
}

fn login_denied_headers() -> std::collections::BTreeMap<String, String> {
    headers(&[
        ("ratelimit-policy", "\"login\";q=5;w=60"),
        ("ratelimit", "\"login\";r=0;t=12"),
        ("x-ratelimit-limit", "5"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "12"),
        ("retry-after", "12"),
    ])
}

/// Five logins allowed with exact headers, the sixth denied with exact headers and body.
async fn exhaust_login(base: &str, forwarded_for: Option<&str>) {
    let http = client();
    let url = format!("{base}/api/v1/sessions");
    let send = || {
        let mut request = http.post(&url);
        if let Some(xff) = forwarded_for {
            request = request.header("x-forwarded-for", xff);
        }
        request.send()
    };
    for n in 1..=5 {
        let response = send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "login {n}");
        assert_eq!(
            limit_headers(&response),
            login_allowed_headers(n),
            "login {n}"
        );
        assert_eq!(response.text().await.unwrap(), "ok POST /api/v1/sessions");
    }
    let response = send().await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limit_headers(&response), login_denied_headers());
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(
        json(response).await,
        serde_json::json!({
            "error": "rate_limited",
            "message": "rate limit exceeded; retry in 12 s",
            "endpoint": LOGIN,
            "limit": 5,
            "remaining": 0,
            "retry_after": 12,
        })
    );
}

async fn ipv4_login_counts_down_then_denies_with_every_header(store: Store) {
    let container = store.container().await;
    let mut events = container.events().subscribe();
    let server = serve(app(layer(&container)), "127.0.0.1:0").await;
    exhaust_login(&server.base, None).await;
    let ids = attempted_identifiers(&mut events);
    assert_eq!(ids, vec!["127.0.0.1"; 6]);
}

async fn ipv6_clients_are_limited_per_64(store: Store) {
    let container = store.container().await;
    let mut events = container.events().subscribe();
    let server = serve(app(layer(&container)), "[::1]:0").await;
    assert!(server.addr.is_ipv6());
    exhaust_login(&server.base, None).await;
    // ::1 grouped by /64.
    assert_eq!(attempted_identifiers(&mut events), vec!["::/64"; 6]);

    // With /128 the address itself is the identifier.
    let container = store.container().await;
    let mut events = container.events().subscribe();
    let per_address = layer(&container).extractor(DefaultExtractor::new().ipv6_prefix(128));
    let server = serve(app(per_address), "[::1]:0").await;
    let response = server.login(&[]).await;
    assert_eq!(limit_headers(&response), login_allowed_headers(1));
    assert_eq!(attempted_identifiers(&mut events), ["::1"]);
}

async fn path_templates_share_a_bucket(store: Store) {
    let container = store.container().await;
    let server = serve(app(layer(&container)), "127.0.0.1:0").await;
    let http = client();
    for (n, id) in [17, 18, 19].into_iter().enumerate() {
        let response = http
            .get(format!("{}/users/{id}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let remaining = 2 - n;
        let t = if remaining > 0 { 0 } else { 20 };
        assert_eq!(
            limit_headers(&response),
            headers(&[
                ("ratelimit-policy", "\"GET /users/{id}\";q=3;w=60"),
                (
                    "ratelimit",
                    &format!("\"GET /users/{{id}}\";r={remaining};t={t}")
                ),
                ("x-ratelimit-limit", "3"),
                ("x-ratelimit-remaining", &remaining.to_string()),
                ("x-ratelimit-reset", &t.to_string()),
            ])
        );
        assert_eq!(
            response.text().await.unwrap(),
            format!("ok GET /users/{id}")
        );
    }
    let response = http
        .get(format!("{}/users/20", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        limit_headers(&response),
        headers(&[
            ("ratelimit-policy", "\"GET /users/{id}\";q=3;w=60"),
            ("ratelimit", "\"GET /users/{id}\";r=0;t=20"),
            ("x-ratelimit-limit", "3"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "20"),
            ("retry-after", "20"),
        ])
    );
    // HEAD is answered by the GET handler, so it takes from the GET rule's bucket too.
    let response = http
        .head(format!("{}/users/21", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "20");
}

async fn routes_without_rules_pass_untouched(store: Store) {
    let container = store.container().await;
    let mut events = container.events().subscribe();
    let server = serve(app(layer(&container)), "127.0.0.1:0").await;
    let http = client();
    for _ in 0..10 {
        for path in ["/free", "/disabled"] {
            let response = http
                .get(format!("{}{path}", server.base))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert!(limit_headers(&response).is_empty(), "{path}");
            assert_eq!(response.text().await.unwrap(), format!("ok GET {path}"));
        }
        // A method without a rule on a limited route, and an unknown route.
        let response = http
            .get(format!("{}/api/v1/sessions", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(limit_headers(&response).is_empty());
        let response = http
            .get(format!("{}/nowhere", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(limit_headers(&response).is_empty());
    }
    assert!(attempted_identifiers(&mut events).is_empty());
}

async fn untrusted_peers_cannot_choose_their_address(store: Store) {
    let container = store.container().await;
    let mut events = container.events().subscribe();
    // Trusts a proxy, but not the loopback peer the client connects from.
    let server = serve(app(trusting(&container, &["10.0.0.0/8"])), "127.0.0.1:0").await;
    let http = client();
    let url = format!("{}/api/v1/sessions", server.base);
    for n in 1..=5 {
        let response = http
            .post(&url)
            .header("x-forwarded-for", format!("203.0.113.{n}"))
            .header("forwarded", format!("for=198.51.100.{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(limit_headers(&response), login_allowed_headers(n));
    }
    let response = http
        .post(&url)
        .header("x-forwarded-for", "203.0.113.99")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limit_headers(&response), login_denied_headers());
    assert_eq!(attempted_identifiers(&mut events), vec!["127.0.0.1"; 6]);
}

async fn trusted_proxies_name_the_client_with_x_forwarded_for(store: Store) {
    let container = store.container().await;
    let mut events = container.events().subscribe();
    let server = serve(
        app(trusting(&container, &["127.0.0.1", "10.0.0.0/8"])),
        "127.0.0.1:0",
    )
    .await;
    // The right-most untrusted hop is the client; what it claims to its left is ignored.
    exhaust_login(&server.base, Some("6.6.6.6, 203.0.113.7, 10.1.2.3")).await;
    // The same client in another spelling (IPv4-mapped IPv6) is the same bucket.
    let response = server
        .login(&[("x-forwarded-for", "::ffff:203.0.113.7")])
        .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another client behind the same proxy has a bucket of its own.
    exhaust_login(&server.base, Some("198.51.100.20")).await;
    // An IPv6 client behind the proxy is grouped by /64.
    let response = server
        .login(&[("x-forwarded-for", "[2001:db8:0:1::5]:4711")])
        .await;
    assert_eq!(limit_headers(&response), login_allowed_headers(1));

    let mut expected = vec!["203.0.113.7"; 7];
    expected.extend(["198.51.100.20"; 6]);
    expected.push("2001:db8:0:1::/64");
    assert_eq!(attempted_identifiers(&mut events), expected);
}

async fn trusted_ipv6_proxy_names_the_client_with_forwarded(store: Store) {
    let container = store.container().await;
    let mut events = container.events().subscribe();
    let extractor = DefaultExtractor::new()
        .trust_proxies(["::1".parse().unwrap()])
        .forwarded_header(ForwardedHeader::Forwarded);
    let server = serve(app(layer(&container).extractor(extractor)), "[::1]:0").await;
    let http = client();
    let url = format!("{}/api/v1/sessions", server.base);
    for (n, forwarded) in [
        "for=\"[2001:db8:cafe::17]:4711\"",
        "for=\"[2001:db8:cafe::99]\";proto=https",
        "for=192.0.2.60;proto=http;by=203.0.113.43",
        // X-Forwarded-For is not the configured header: the peer (::1, grouped) is the client.
        "",
    ]
    .into_iter()
    .enumerate()
    {
        let mut request = http.post(&url).header("x-forwarded-for", "6.6.6.6");
        if !forwarded.is_empty() {
            request = request.header("forwarded", forwarded);
        }
        let response = request.send().await.unwrap();
        let expected = if n == 1 { 2 } else { 1 };
        assert_eq!(
            limit_headers(&response),
            login_allowed_headers(expected),
            "{forwarded}"
        );
    }
    assert_eq!(
        attempted_identifiers(&mut events),
        [
            "2001:db8:cafe::/64",
            "2001:db8:cafe::/64",
            "192.0.2.60",
            "::/64"
        ]
    );
}

async fn user_scopes_read_the_authenticated_user(store: Store) {
    let container = store.container().await;
    let mut events = container.events().subscribe();
    let server = serve(app(layer(&container)), "127.0.0.1:0").await;
    let http = client();
    let me = format!("{}/me", server.base);
    for user in ["alice", "bob"] {
        for remaining in [1, 0] {
            let response = http.get(&me).header("x-user", user).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let t = if remaining > 0 { 0 } else { 30 };
            assert_eq!(
                limit_headers(&response),
                headers(&[
                    ("ratelimit-policy", "\"GET /me\";q=2;w=60"),
                    ("ratelimit", &format!("\"GET /me\";r={remaining};t={t}")),
                    ("x-ratelimit-limit", "2"),
                    ("x-ratelimit-remaining", &remaining.to_string()),
                    ("x-ratelimit-reset", &t.to_string()),
                ])
            );
        }
        let response = http.get(&me).header("x-user", user).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "30");
    }
    // No user: 401 with a JSON reason, no bucket touched, no rate-limit header.
    let response = http.get(&me).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(limit_headers(&response).is_empty());
    assert_eq!(
        json(response).await,
        serde_json::json!({"error": "missing_user", "message": "this endpoint needs an authenticated user"})
    );

    // User and provider: id@provider, one bucket per pair.
    let linked = format!("{}/linked", server.base);
    for (user, provider, status) in [
        ("42", "github", StatusCode::OK),
        ("42", "github", StatusCode::OK),
        ("42", "github", StatusCode::TOO_MANY_REQUESTS),
        ("42", "gitlab", StatusCode::OK),
    ] {
        let response = http
            .get(&linked)
            .header("x-user", user)
            .header("x-provider", provider)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{user}@{provider}");
    }
    // A user without a provider cannot be limited per provider.
    let response = http
        .get(&linked)
        .header("x-user", "42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let mut expected = vec!["alice"; 3];
    expected.extend(["bob"; 3]);
    expected.extend(["42@github", "42@github", "42@github", "42@gitlab"]);
    assert_eq!(attempted_identifiers(&mut events), expected);
}

async fn global_rules_share_one_bucket(store: Store) {
    let container = store.container().await;
    let mut events = container.events().subscribe();
    let server = serve(app(trusting(&container, &["127.0.0.1"])), "127.0.0.1:0").await;
    let http = client();
    let url = format!("{}/global", server.base);
    for (client_ip, status) in [
        ("203.0.113.1", StatusCode::OK),
        ("203.0.113.2", StatusCode::OK),
        ("203.0.113.3", StatusCode::TOO_MANY_REQUESTS),
    ] {
        let response = http
            .get(&url)
            .header("x-forwarded-for", client_ip)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
    }
    assert_eq!(attempted_identifiers(&mut events), ["global"; 3]);
}

async fn metrics_count_decisions_per_endpoint(store: Store) {
    let container = store.container().await;
    let metrics = RateLimitMetrics::new();
    let task = metrics.spawn(container.events());
    let server = serve(app(layer(&container)), "127.0.0.1:0").await;
    exhaust_login(&server.base, None).await;
    let http = client();
    http.get(format!("{}/users/1", server.base))
        .send()
        .await
        .unwrap();
    http.get(format!("{}/free", server.base))
        .send()
        .await
        .unwrap();
    // The subscriber runs on its own task: wait for it to catch up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metrics.denied(LOGIN) < 1 || metrics.allowed("GET /users/{id}") < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never caught up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.allowed(LOGIN), 5);
    assert_eq!(metrics.denied(LOGIN), 1);
    assert_eq!(metrics.fail_open(LOGIN), 0);
    assert_eq!(metrics.allowed("GET /free"), 0);
    let text = metrics.encode().unwrap();
    assert!(
        text.contains("ratelimit_allowed_total{endpoint=\"POST /api/v1/sessions\"} 5\n"),
        "{text}"
    );
    assert!(
        text.contains("ratelimit_denied_total{endpoint=\"POST /api/v1/sessions\"} 1\n"),
        "{text}"
    );
    task.abort();
}

/// Runs each scenario once on the memory backend and once on a real redis-server.
macro_rules! both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Store::memory()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Store::redis()).await;
                }
            )*
        }
    };
}

both_backends!(
    ipv4_login_counts_down_then_denies_with_every_header,
    ipv6_clients_are_limited_per_64,
    path_templates_share_a_bucket,
    routes_without_rules_pass_untouched,
    untrusted_peers_cannot_choose_their_address,
    trusted_proxies_name_the_client_with_x_forwarded_for,
    trusted_ipv6_proxy_names_the_client_with_forwarded,
    user_scopes_read_the_authenticated_user,
    global_rules_share_one_bucket,
    metrics_count_decisions_per_endpoint,
);

// ---------------------------------------------------------------------------------------
// Store failures (Redis with nothing listening).

/// Logins against a dead Redis: every one allowed, none 429, no rate-limit headers.
#[tokio::test]
async fn redis_down_fails_open_and_never_answers_429() {
    let store = Store::dead_redis();
    let container = Container::build(store.config(RULES)).await.unwrap();
    let metrics = RateLimitMetrics::new();
    metrics.spawn(container.events());
    let server = serve(app(layer(&container)), "127.0.0.1:0").await;
    for _ in 0..20 {
        let response = server.login(&[]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(limit_headers(&response).is_empty());
        assert_eq!(response.text().await.unwrap(), "ok POST /api/v1/sessions");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metrics.fail_open(LOGIN) < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fail-open checks not counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((metrics.allowed(LOGIN), metrics.denied(LOGIN)), (0, 0));
    assert!(
        metrics
            .encode()
            .unwrap()
            .contains("ratelimit_fail_open_total{endpoint=\"POST /api/v1/sessions\"} 20\n")
    );
}

#[tokio::test]
async fn redis_down_with_fail_open_policy_503_answers_503() {
    let container = Container::build(Store::dead_redis().config(RULES))
        .await
        .unwrap();
    let layer = layer(&container).on_fail_open(FailOpenPolicy::ServiceUnavailable);
    let server = serve(app(layer), "127.0.0.1:0").await;
    let response = server.login(&[]).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(limit_headers(&response).is_empty());
    assert_eq!(json(response).await["error"], "rate_limit_unavailable");
}

#[tokio::test]
async fn redis_down_with_fail_closed_adapter_answers_503_with_retry_after() {
    let config = Store::dead_redis()
        .config(RULES)
        .with_failure_policy(FailurePolicy::Closed);
    let container = Container::build(config).await.unwrap();
    let server = serve(app(layer(&container)), "127.0.0.1:0").await;
    let response = server.login(&[]).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // One token's time, 12 s; no informational headers (the numbers are not real).
    assert_eq!(limit_headers(&response), headers(&[("retry-after", "12")]));
}

// ---------------------------------------------------------------------------------------
// Configuration and misconfiguration (memory backend).

#[tokio::test]
async fn header_styles_select_the_headers() {
    let cases = [
        (
            HeaderStyle::Ietf,
            headers(&[
                ("ratelimit-policy", "\"login\";q=5;w=60"),
                ("ratelimit", "\"login\";r=4;t=0"),
            ]),
        ),
        (
            HeaderStyle::Legacy,
            headers(&[
                ("x-ratelimit-limit", "5"),
                ("x-ratelimit-remaining", "4"),
                ("x-ratelimit-reset", "0"),
            ]),
        ),
        (HeaderStyle::None, headers(&[])),
        (
            HeaderStyle::Both,
            headers(&[
                ("ratelimit-policy", "\"login\";q=5;w=60"),
                ("ratelimit", "\"login\";r=4;t=0"),
                ("x-ratelimit-limit", "5"),
                ("x-ratelimit-remaining", "4"),
                ("x-ratelimit-reset", "0"),
            ]),
        ),
    ];
    for (style, expected) in cases {
        let container = Store::memory().container().await;
        let server = serve(app(layer(&container).header_style(style)), "127.0.0.1:0").await;
        let response = server.login(&[]).await;
        assert_eq!(limit_headers(&response), expected, "{style:?}");
    }
    // The default: the IETF fields only.
    assert_eq!(HeaderStyle::default(), HeaderStyle::Ietf);
    let container = Store::memory().container().await;
    let unstyled =
        RateLimitLayer::from_adapter(container.adapter().clone()).policy_name(LOGIN, "login");
    let server = serve(app(unstyled), "127.0.0.1:0").await;
    assert_eq!(
        limit_headers(&server.login(&[]).await),
        headers(&[
            ("ratelimit-policy", "\"login\";q=5;w=60"),
            ("ratelimit", "\"login\";r=4;t=0"),
        ])
    );
}

#[tokio::test]
async fn policy_names_are_escaped_sf_strings() {
    let container = Store::memory().container().await;
    let layer = layer(&container).policy_name("GET /users/{id}", "users \"by\" id\\");
    let server = serve(app(layer), "127.0.0.1:0").await;
    let response = client()
        .get(format!("{}/users/1", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["ratelimit-policy"],
        r#""users \"by\" id\\";q=3;w=60"#
    );
    assert_eq!(
        response.headers()["ratelimit"],
        r#""users \"by\" id\\";r=2;t=0"#
    );
}

#[tokio::test]
async fn a_server_without_connect_info_answers_500_for_ip_rules() {
    let container = Store::memory().container().await;
    let server = serve_without_connect_info(app(layer(&container))).await;
    let http = client();
    let response = server.login(&[]).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        json(response).await,
        serde_json::json!({
            "error": "missing_peer_address",
            "message": "the server cannot tell the client address of this request",
        })
    );
    // Routes without rules, global and user rules do not need the peer address.
    for (path, user) in [("/free", None), ("/global", None), ("/me", Some("alice"))] {
        let mut request = http.get(format!("{}{path}", server.base));
        if let Some(user) = user {
            request = request.header("x-user", user);
        }
        assert_eq!(
            request.send().await.unwrap().status(),
            StatusCode::OK,
            "{path}"
        );
    }
}

#[tokio::test]
async fn missing_user_can_be_a_500() {
    let container = Store::memory().container().await;
    let layer = layer(&container)
        .extractor(DefaultExtractor::new().missing_user(MissingUserPolicy::InternalServerError));
    let server = serve(app(layer), "127.0.0.1:0").await;
    let response = client()
        .get(format!("{}/me", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(json(response).await["error"], "missing_user");
}

/// An extractor that finds no usable identifier, as a buggy custom one might.
#[derive(Debug)]
struct EmptyIdentifier;

impl IdentifierExtractor for EmptyIdentifier {
    fn identify(&self, _request: &IdentifyRequest<'_>) -> Result<String, Rejection> {
        Ok(String::new())
    }
}

#[tokio::test]
async fn an_identifier_the_limiter_rejects_is_a_400() {
    let container = Store::memory().container().await;
    let server = serve(
        app(layer(&container).extractor(EmptyIdentifier)),
        "127.0.0.1:0",
    )
    .await;
    let response = server.login(&[]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(limit_headers(&response).is_empty());
    assert_eq!(
        json(response).await,
        serde_json::json!({"error": "invalid_identity", "message": "identifier must not be empty"})
    );
}

#[tokio::test]
async fn very_long_user_ids_are_limited_like_any_other() {
    let container = Store::memory().container().await;
    let server = serve(app(layer(&container)), "127.0.0.1:0").await;
    let http = client();
    let long = "u".repeat(2000);
    for status in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let response = http
            .get(format!("{}/me", server.base))
            .header("x-user", &long)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
    }
}

#[tokio::test]
async fn retry_after_follows_the_bucket_and_rounds_up() {
    let clock = ratelimit_adapter::ManualClock::new(1_000.0);
    let container = Container::build(Store::memory().config(RULES).with_clock(clock.clone()))
        .await
        .unwrap();
    let server = serve(app(layer(&container)), "127.0.0.1:0").await;
    let http = client();
    let login = || http.post(format!("{}/api/v1/sessions", server.base)).send();
    for _ in 0..5 {
        assert_eq!(login().await.unwrap().status(), StatusCode::OK);
    }
    let denied = login().await.unwrap();
    assert_eq!(denied.headers()["retry-after"], "12");
    // 6.5 s later, 5.5 s are left: rounded up to 6 everywhere.
    clock.advance(Duration::from_millis(6_500));
    let denied = login().await.unwrap();
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        limit_headers(&denied),
        headers(&[
            ("ratelimit-policy", "\"login\";q=5;w=60"),
            ("ratelimit", "\"login\";r=0;t=6"),
            ("x-ratelimit-limit", "5"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "6"),
            ("retry-after", "6"),
        ])
    );
    // Once the wait is over, one request goes through.
    clock.advance(Duration::from_millis(5_500));
    let allowed = login().await.unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);
    assert_eq!(allowed.headers()["ratelimit"], "\"login\";r=0;t=12");
    assert_eq!(
        login().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn a_plain_tower_service_is_limited_by_uri_path() {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use axum::extract::ConnectInfo;
    use ratelimit_http::UnmatchedPolicy;
    use tower::{Layer as _, ServiceExt as _};

    let container = Store::memory().container().await;
    let service = tower::service_fn(|_request: http::Request<String>| async {
        Ok::<_, Infallible>(http::Response::new(String::from("plain")))
    });
    let limited = layer(&container).layer(service);
    let request = |path: &str| {
        let mut request = http::Request::post(path).body(String::new()).unwrap();
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    };
    for n in 1..=5 {
        let response = limited
            .clone()
            .oneshot(request("/api/v1/sessions"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["x-ratelimit-remaining"],
            (5 - n).to_string().as_str()
        );
    }
    let response = limited
        .clone()
        .oneshot(request("/api/v1/sessions"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.body().contains("rate_limited"));

    // With UnmatchedPolicy::Skip, only axum route templates are limited.
    let skipping = layer(&container)
        .unmatched(UnmatchedPolicy::Skip)
        .layer(tower::service_fn(|_request: http::Request<String>| async {
            Ok::<_, Infallible>(http::Response::new(String::from("plain")))
        }));
    let response = skipping.oneshot(request("/api/v1/sessions")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("ratelimit").is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn decisions_are_logged_with_their_endpoint_and_the_span_is_off_at_info() {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use axum::extract::ConnectInfo;
    use tower::{Layer as _, ServiceExt as _};

    let (captured, _guard) = CapturedLogs::install();

    let config = Store::memory().config(RULES).with_event_logging(false);
    let container = Container::build(config).await.unwrap();
    let limited =
        layer(&container).layer(tower::service_fn(|_request: http::Request<String>| async {
            Ok::<_, Infallible>(http::Response::new(String::new()))
        }));
    let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
    for n in 0..7 {
        let mut request = http::Request::post("/api/v1/sessions")
            .body(String::new())
            .unwrap();
        if n < 6 {
            request.extensions_mut().insert(ConnectInfo(peer));
        }
        limited.clone().oneshot(request).await.unwrap();
    }
    let logs = captured.text();
    // The span is at DEBUG: off under this INFO subscriber, so it costs nothing and shows
    // nowhere; the INFO and WARN events carry the endpoint themselves.
    assert!(!logs.contains("rate_limit{"), "{logs}");
    let denied = logs
        .lines()
        .find(|line| line.contains("rate limit exceeded"))
        .unwrap_or_else(|| panic!("no denial logged:\n{logs}"));
    for field in [
        "endpoint=\"POST /api/v1/sessions\"",
        "identifier=\"192.0.2.1\"",
        "refused_by=\"POST /api/v1/sessions\"",
        "retry_after_s=12",
    ] {
        assert!(denied.contains(field), "{field} missing: {denied}");
    }
    let rejected = logs
        .lines()
        .find(|line| line.contains("request rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{logs}"));
    for field in [
        "endpoint=\"POST /api/v1/sessions\"",
        "code=\"missing_peer_address\"",
    ] {
        assert!(rejected.contains(field), "{field} missing: {rejected}");
    }
}

/// A `MakeWriter` into a shared buffer, for a subscriber at DEBUG.
#[derive(Clone, Default)]
struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn at_debug_the_span_records_outcome_and_refused_by() {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use axum::extract::ConnectInfo;
    use tower::{Layer as _, ServiceExt as _};

    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let config = Store::memory().config(RULES).with_event_logging(false);
    let container = Container::build(config).await.unwrap();
    let limited =
        layer(&container).layer(tower::service_fn(|_request: http::Request<String>| async {
            tracing::info!("handler ran");
            Ok::<_, Infallible>(http::Response::new(String::new()))
        }));
    let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
    for _ in 0..6 {
        let mut request = http::Request::post("/api/v1/sessions")
            .body(String::new())
            .unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        limited.clone().oneshot(request).await.unwrap();
    }
    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let handler = logs
        .lines()
        .find(|line| line.contains("handler ran"))
        .unwrap_or_else(|| panic!("no handler line:\n{logs}"));
    assert!(
        handler.contains(
            "rate_limit{endpoint=POST /api/v1/sessions scope=\"ip\" outcome=\"allowed\"}"
        ),
        "{handler}"
    );
    let denied = logs
        .lines()
        .find(|line| line.contains("rate limit exceeded"))
        .unwrap_or_else(|| panic!("no denial:\n{logs}"));
    assert!(
        denied.contains(
            "rate_limit{endpoint=POST /api/v1/sessions scope=\"ip\" outcome=\"denied\" refused_by=\"POST /api/v1/sessions\"}"
        ),
        "{denied}"
    );
}
