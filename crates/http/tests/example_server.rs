//! The example server (`examples/server.rs`, compiled in here as a module): its routes, its
//! rate limiting and its `/metrics` output, on the memory backend and on Redis.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
#[allow(dead_code)] // its `main` and `run` are the binary's
#[path = "../examples/server.rs"]
mod server;

use clap::Parser as _;
use common::{client, json, limit_headers};
use ratelimit_tests::fixtures::{EXAMPLE_RULES_FILE as RULES_FILE, RulesFile, one_rule_text};
use ratelimit_tests::redis_server::TestRedis;
use reqwest::StatusCode;

async fn start(extra: &[&str]) -> (common::Server, server::App) {
    let mut argv = vec!["server", "--listen", "127.0.0.1:0", "--rules", RULES_FILE];
    argv.extend(extra);
    let args = server::Args::try_parse_from(argv).unwrap();
    let app = server::build(&args).await.unwrap();
    let running = common::serve(app.router.clone(), "127.0.0.1:0").await;
    (running, app)
}

async fn login_and_scrape(extra: &[&str], backend: &str) {
    let (running, app) = start(extra).await;
    assert_eq!(app.container.backend_name(), backend);
    // `--headers both` adds the `X-RateLimit-*` fields to the IETF ones.
    let legacy = extra.windows(2).any(|pair| pair == ["--headers", "both"]);
    let http = client();
    for n in 0..5 {
        let response = http
            .post(format!("{}/api/v1/sessions", running.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let t = if n == 4 { 12 } else { 0 };
        assert_eq!(
            response.headers()["ratelimit"],
            format!("\"POST /api/v1/sessions\";r={};t={t}", 4 - n).as_str()
        );
        if legacy {
            assert_eq!(
                response.headers()["x-ratelimit-remaining"],
                (4 - n).to_string().as_str()
            );
        } else {
            assert!(!response.headers().contains_key("x-ratelimit-remaining"));
        }
        assert_eq!(
            json(response).await,
            serde_json::json!({"endpoint": "POST /api/v1/sessions", "path": "/api/v1/sessions"})
        );
    }
    let denied = http
        .post(format!("{}/api/v1/sessions", running.base))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    let mut expected = vec![
        ("ratelimit-policy", "\"POST /api/v1/sessions\";q=5;w=60"),
        ("ratelimit", "\"POST /api/v1/sessions\";r=0;t=12"),
        ("retry-after", "12"),
    ];
    if legacy {
        expected.extend([
            ("x-ratelimit-limit", "5"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "12"),
        ]);
    }
    assert_eq!(limit_headers(&denied), common::headers(&expected));

    // A template route, answered with the real path.
    let user = http
        .get(format!("{}/api/v1/users/42", running.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        user.headers()["ratelimit"],
        "\"GET /api/v1/users/{id}\";r=19;t=0"
    );
    assert_eq!(
        json(user).await,
        serde_json::json!({"endpoint": "GET /api/v1/users/{id}", "path": "/api/v1/users/42"})
    );
    // Cost 5 of 10.
    let export = http
        .post(format!("{}/api/v1/exports", running.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        export.headers()["ratelimit"],
        "\"POST /api/v1/exports\";r=5;t=0"
    );

    let events = extra.contains(&"--events");
    if events {
        // The event-derived metrics run on their own task: wait for them.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while app.metrics.allowed("POST /api/v1/exports") < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "metrics never caught up"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let scrape = http
        .get(format!("{}/metrics", running.base))
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), StatusCode::OK);
    assert_eq!(
        scrape.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    // /metrics itself is not limited.
    assert!(limit_headers(&scrape).is_empty());
    let text = scrape.text().await.unwrap();
    // The layer's own counters, exact with or without the event bus.
    let mut expected = vec![
        "ratelimit_http_decisions_total{endpoint=\"POST /api/v1/sessions\",limit=\"\",outcome=\"allowed\"} 5",
        "ratelimit_http_decisions_total{endpoint=\"POST /api/v1/sessions\",limit=\"POST /api/v1/sessions\",outcome=\"denied\"} 1",
        "ratelimit_http_decisions_total{endpoint=\"GET /api/v1/users/{id}\",limit=\"\",outcome=\"allowed\"} 1",
        "ratelimit_http_decisions_total{endpoint=\"POST /api/v1/exports\",limit=\"\",outcome=\"allowed\"} 1",
        "# EOF",
    ];
    let event_derived = [
        "# HELP ratelimit_allowed Rate-limit checks allowed by the store, per endpoint.",
        "# TYPE ratelimit_allowed counter",
        "ratelimit_allowed_total{endpoint=\"POST /api/v1/sessions\"} 5",
        "ratelimit_allowed_total{endpoint=\"GET /api/v1/users/{id}\"} 1",
        "ratelimit_allowed_total{endpoint=\"POST /api/v1/exports\"} 1",
        "# TYPE ratelimit_denied counter",
        "ratelimit_denied_total{endpoint=\"POST /api/v1/sessions\"} 1",
        "ratelimit_events_lagged_total 0",
    ];
    if events {
        expected.extend(event_derived);
    } else {
        // Nobody subscribed to the event bus: no event was built, none counted.
        assert!(
            !text.contains("ratelimit_allowed_total{"),
            "event-derived counts without --events:\n{text}"
        );
    }
    for line in expected {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from\n{text}"
        );
    }
}

#[tokio::test]
async fn example_server_limits_and_counts_on_the_memory_backend() {
    login_and_scrape(&[], "memory").await;
}

#[tokio::test]
async fn example_server_with_events_also_counts_from_the_event_bus() {
    login_and_scrape(&["--events", "--headers", "both"], "memory").await;
}

#[tokio::test]
async fn example_server_limits_and_counts_on_redis() {
    let redis = TestRedis::get();
    login_and_scrape(&["--redis-url", &redis.url], "redis").await;
}

#[tokio::test]
async fn example_server_trusts_only_the_proxies_it_is_told_about() {
    for (extra, expect_own_bucket) in [
        (&[][..], false),
        (&["--trust-proxy", "127.0.0.0/8"][..], true),
    ] {
        let (running, _app) = start(extra).await;
        let http = client();
        let url = format!("{}/api/v1/sessions", running.base);
        for _ in 0..5 {
            http.post(&url).send().await.unwrap();
        }
        let response = http
            .post(&url)
            .header("x-forwarded-for", "203.0.113.50")
            .send()
            .await
            .unwrap();
        let expected = if expect_own_bucket {
            StatusCode::OK
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        assert_eq!(response.status(), expected, "{extra:?}");
    }
}

#[tokio::test]
async fn example_server_reports_bad_arguments_and_rules() {
    let err = server::Args::try_parse_from(["server", "--rules", "x", "--trust-proxy", "nope"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid IP network"), "{err}");
    let err = server::Args::try_parse_from(["server", "--rules", "x", "--ipv6-prefix", "129"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("129"), "{err}");

    for (name, text, expected) in [
        ("missing.toml", None, "cannot read rules file"),
        (
            "method.toml",
            Some("FETCH /x"),
            "axum cannot route the method",
        ),
        ("path.toml", Some("GET x"), "the path must start with /"),
        (
            "colon.toml",
            Some("GET /users/:id"),
            "axum cannot mount the route",
        ),
    ] {
        let file = text.map_or_else(RulesFile::missing, |endpoint| {
            RulesFile::new(&one_rule_text(endpoint))
        });
        let args = server::Args::try_parse_from(["server", "--rules", file.path()]).unwrap();
        let err = server::build(&args).await.unwrap_err().to_string();
        assert!(err.contains(expected), "{name}: {err}");
    }
}
