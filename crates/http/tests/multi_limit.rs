//! Several limits on one endpoint, through HTTP: a per-client limit (ip, 10 per minute) and a
//! limit for everybody together (global, 15 per minute) on `GET /api/v1/search`, on the memory
//! backend with a manual clock, behind a real axum server and a real HTTP client.
//!
//! The structured-field headers are read with `sfv`, an RFC 9651 parser this project did not
//! write, so that a mistake in our serialisation cannot be hidden by the same mistake in a
//! test parser.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::routing::get;
use common::{Server, client, json, serve};
use http::StatusCode as HttpStatus;
use ratelimit_adapter::{
    EndpointLimits, Limit, ManualClock, RateLimitRule, RateLimitScope, RuleSet,
};
use ratelimit_container::{Container, ContainerConfig};
use ratelimit_http::{
    DefaultExtractor, HeaderStyle, QUOTA_EXCEEDED_TYPE, RateLimitLayer, RateLimitMetrics, Rejection,
};
use reqwest::StatusCode;

const SEARCH: &str = "GET /api/v1/search";
const POLICY: &str = r#""per-client";q=10;w=60, "everyone";q=15;w=60"#;

fn rules() -> RuleSet {
    let limits = EndpointLimits::new(vec![
        Limit::named(
            "per-client",
            RateLimitRule::new(RateLimitScope::Ip, 10, 10.0).unwrap(),
        )
        .unwrap(),
        Limit::named(
            "everyone",
            RateLimitRule::new(RateLimitScope::Global, 15, 15.0).unwrap(),
        )
        .unwrap(),
    ])
    .unwrap();
    RuleSet::try_from_limits([(SEARCH, limits)]).unwrap()
}

/// A container on the memory backend whose buckets refill on `clock` only.
async fn container(clock: &ManualClock) -> Container {
    Container::build(ContainerConfig::memory(rules()).with_clock(clock.clone()))
        .await
        .unwrap()
}

/// The layer: clients are named by `X-Forwarded-For`, sent through the trusted loopback; every
/// informational header, so that the tests see which limit `X-RateLimit-*` describes.
fn layer(container: &Container) -> RateLimitLayer {
    RateLimitLayer::from_adapter(container.adapter().clone())
        .extractor(DefaultExtractor::new().trust_proxies(["127.0.0.1".parse().unwrap()]))
        .header_style(HeaderStyle::Both)
}

async fn ok(request: Request) -> String {
    format!("ok {} {}", request.method(), request.uri().path())
}

async fn start(layer: RateLimitLayer) -> Server {
    let app = Router::new()
        .route("/api/v1/search", get(ok))
        .route_layer(layer);
    serve(app, "127.0.0.1:0").await
}

async fn search(server: &Server, client_ip: &str, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client()
        .get(format!("{}/api/v1/search", server.base))
        .header("x-forwarded-for", client_ip);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// A structured-field List of sf-string items with integer parameters, parsed by `sfv`:
/// `[(name, {param: value})]` in order.
fn sf_items(value: &str) -> Vec<(String, BTreeMap<String, i64>)> {
    let list: sfv::List = sfv::Parser::new(value)
        .parse()
        .unwrap_or_else(|err| panic!("not an sf-list ({err}): {value}"));
    list.into_iter()
        .map(|entry| match entry {
            sfv::ListEntry::Item(item) => {
                let name = item
                    .bare_item
                    .as_string()
                    .unwrap_or_else(|| panic!("name not an sf-string: {value}"))
                    .as_str()
                    .to_owned();
                let params = item
                    .params
                    .iter()
                    .map(|(key, param)| {
                        let number = param
                            .as_integer()
                            .unwrap_or_else(|| panic!("{} not an integer: {value}", key.as_str()));
                        (key.as_str().to_owned(), i64::from(number))
                    })
                    .collect();
                (name, params)
            }
            sfv::ListEntry::InnerList(_) => panic!("inner list in {value}"),
        })
        .collect()
}

fn item(name: &str, params: &[(&str, i64)]) -> (String, BTreeMap<String, i64>) {
    (
        name.to_owned(),
        params.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    )
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap())
}

/// `RateLimit` of a response, parsed.
fn state(response: &reqwest::Response) -> Vec<(String, BTreeMap<String, i64>)> {
    sf_items(header(response, "ratelimit").unwrap())
}

/// `(X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset)`.
fn legacy(response: &reqwest::Response) -> (&str, &str, &str) {
    (
        header(response, "x-ratelimit-limit").unwrap(),
        header(response, "x-ratelimit-remaining").unwrap(),
        header(response, "x-ratelimit-reset").unwrap(),
    )
}

#[tokio::test]
async fn headers_describe_every_limit_and_the_refusing_one_decides() {
    let clock = ManualClock::new(1_000.0);
    let container = container(&clock).await;
    let mut events = container.events().subscribe();
    let metrics = RateLimitMetrics::new();
    let _task = metrics.spawn(container.events());
    let server = start(layer(&container)).await;

    // The policy is every limit, the same on every response.
    let first = search(&server, "203.0.113.1", &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "ratelimit-policy"), Some(POLICY));
    assert_eq!(
        sf_items(header(&first, "ratelimit-policy").unwrap()),
        [
            item("per-client", &[("q", 10), ("w", 60)]),
            item("everyone", &[("q", 15), ("w", 60)]),
        ]
    );
    assert_eq!(
        state(&first),
        [
            item("per-client", &[("r", 9), ("t", 0)]),
            item("everyone", &[("r", 14), ("t", 0)]),
        ]
    );
    // Allowed: the tightest limit (fewest tokens left) is per-client's 9.
    assert_eq!(legacy(&first), ("10", "9", "0"));
    assert!(header(&first, "retry-after").is_none());

    // Client A takes its other 9 tokens; the 10th leaves its bucket empty.
    for n in 2..=10 {
        let response = search(&server, "203.0.113.1", &[]).await;
        assert_eq!(response.status(), StatusCode::OK, "A's request {n}");
    }
    // A's 11th is refused by per-client (6 s for a token at 10 per minute); everyone still
    // has the 5 tokens A left: the refusal took nothing from it.
    let refused = search(&server, "203.0.113.1", &[]).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        state(&refused),
        [
            item("per-client", &[("r", 0), ("t", 6)]),
            item("everyone", &[("r", 5), ("t", 0)]),
        ]
    );
    assert_eq!(legacy(&refused), ("10", "0", "6"));
    assert_eq!(header(&refused, "retry-after"), Some("6"));

    // Client B gets exactly the 5 global tokens left: A's refusal did not spend one.
    for n in 1..=5u64 {
        let response = search(&server, "203.0.113.2", &[]).await;
        assert_eq!(response.status(), StatusCode::OK, "B's request {n}");
        let everyone_left = 5 - n;
        // Allowed: the tightest limit is everyone from B's first request on.
        let t = if everyone_left > 0 { 0 } else { 4 };
        assert_eq!(
            state(&response),
            [
                item(
                    "per-client",
                    &[("r", 10 - i64::try_from(n).unwrap()), ("t", 0)]
                ),
                item(
                    "everyone",
                    &[("r", i64::try_from(everyone_left).unwrap()), ("t", t)]
                ),
            ]
        );
        assert_eq!(
            legacy(&response),
            (
                "15",
                everyone_left.to_string().as_str(),
                t.to_string().as_str()
            )
        );
    }
    // B's 6th is refused by everyone (4 s for a token at 15 per minute) while B's own limit
    // had tokens: the X-RateLimit-* headers describe everyone, never per-client.
    let refused = search(&server, "203.0.113.2", &[]).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "ratelimit-policy"), Some(POLICY));
    assert_eq!(
        state(&refused),
        [
            item("per-client", &[("r", 5), ("t", 0)]),
            item("everyone", &[("r", 0), ("t", 4)]),
        ]
    );
    assert_eq!(legacy(&refused), ("15", "0", "4"));
    assert_eq!(header(&refused, "retry-after"), Some("4"));
    assert_eq!(header(&refused, "content-type"), Some("application/json"));
    let body = json(refused).await;
    assert_eq!(body["limit"], 15);
    assert_eq!(body["retry_after"], 4);

    // All or nothing: B's refused request kept B's own 5 tokens. 4 s later everyone has one
    // token again (and per-client's 5 have grown by 0.67, still 5 whole ones): B's next
    // request passes and leaves 4, not 3.
    clock.advance(Duration::from_secs(4));
    let again = search(&server, "203.0.113.2", &[]).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(
        state(&again),
        [
            item("per-client", &[("r", 4), ("t", 0)]),
            item("everyone", &[("r", 0), ("t", 4)]),
        ]
    );

    // Events and metrics name the limit that refused.
    let mut refused_by = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let ratelimit_adapter::RateLimitEvent::Denied(denied) = event {
            refused_by.push(denied.refused_by.as_deref().unwrap_or("-").to_owned());
        }
    }
    assert_eq!(refused_by, ["per-client", "everyone"]);
    tokio::time::timeout(Duration::from_secs(5), async {
        while metrics.denied(SEARCH) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(metrics.denied_by(SEARCH, "per-client"), 1);
    assert_eq!(metrics.denied_by(SEARCH, "everyone"), 1);
    assert!(metrics.encode().unwrap().contains(
        "ratelimit_denied_by_limit_total{endpoint=\"GET /api/v1/search\",limit=\"everyone\"} 1"
    ));
}

#[tokio::test]
async fn a_problem_details_body_names_the_violated_policies() {
    let clock = ManualClock::new(1_000.0);
    let container = container(&clock).await;
    let server = start(layer(&container).problem_details(true)).await;
    // Three clients use up everyone's 15 tokens, 5 each.
    for client_ip in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        for _ in 0..5 {
            assert_eq!(
                search(&server, client_ip, &[]).await.status(),
                StatusCode::OK
            );
        }
    }
    let refused = search(&server, "203.0.113.4", &[]).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&refused, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(header(&refused, "retry-after"), Some("4"));
    assert_eq!(
        json(refused).await,
        serde_json::json!({
            "type": QUOTA_EXCEEDED_TYPE,
            "title": "Request cannot be satisfied as assigned quota has been exceeded",
            "status": 429,
            "detail": "rate limit exceeded; retry in 4 s",
            "violated-policies": ["everyone"],
        })
    );
    assert_eq!(
        QUOTA_EXCEEDED_TYPE,
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
}

/// The cost of a request: its `x-batch-size` header, or the limits' own costs without one.
fn batch_size(request: &ratelimit_http::CostRequest<'_>) -> Result<Option<u64>, Rejection> {
    let Some(value) = request.parts.headers.get("x-batch-size") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| {
            Rejection::new(
                HttpStatus::BAD_REQUEST,
                "invalid_batch_size",
                "x-batch-size must be a whole number",
            )
        })
}

#[tokio::test]
async fn a_cost_function_charges_every_limit() {
    let clock = ManualClock::new(1_000.0);
    let container = container(&clock).await;
    let events = container.events().subscribe();
    let server = start(layer(&container).request_cost(batch_size)).await;

    // A batch of 3 takes 3 from both limits; t is the time until each holds 3 again.
    let batch = search(&server, "203.0.113.1", &[("x-batch-size", "3")]).await;
    assert_eq!(batch.status(), StatusCode::OK);
    assert_eq!(
        state(&batch),
        [
            item("per-client", &[("r", 7), ("t", 0)]),
            item("everyone", &[("r", 12), ("t", 0)]),
        ]
    );
    // Without the header: the limits' own cost, 1.
    let single = search(&server, "203.0.113.1", &[]).await;
    assert_eq!(
        state(&single),
        [
            item("per-client", &[("r", 6), ("t", 0)]),
            item("everyone", &[("r", 11), ("t", 0)]),
        ]
    );
    // A batch of 7 is refused by per-client, which holds 6 and lacks one token (6 s); it takes
    // nothing from everyone, which had the 7.
    let big = search(&server, "203.0.113.1", &[("x-batch-size", "7")]).await;
    assert_eq!(big.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        state(&big),
        [
            item("per-client", &[("r", 6), ("t", 6)]),
            item("everyone", &[("r", 11), ("t", 0)]),
        ]
    );
    assert_eq!(header(&big, "retry-after"), Some("6"));

    // Bad values never reach the store.
    let before = events.len();
    let zero = search(&server, "203.0.113.1", &[("x-batch-size", "0")]).await;
    assert_eq!(zero.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(zero).await["error"], "invalid_cost");
    let huge = search(&server, "203.0.113.1", &[("x-batch-size", "11")]).await;
    assert_eq!(huge.status(), StatusCode::BAD_REQUEST);
    // The policy says why: per-client holds 10 at most.
    assert_eq!(header(&huge, "ratelimit-policy"), Some(POLICY));
    let body = json(huge).await;
    assert_eq!(body["error"], "cost_too_large");
    assert_eq!(
        body["message"],
        "this request costs 11 tokens; this endpoint allows at most 10 per request"
    );
    let max = search(
        &server,
        "203.0.113.1",
        &[("x-batch-size", &u64::MAX.to_string())],
    )
    .await;
    assert_eq!(max.status(), StatusCode::BAD_REQUEST);
    let garbage = search(&server, "203.0.113.1", &[("x-batch-size", "many")]).await;
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json(garbage).await["error"], "invalid_batch_size");
    assert_eq!(events.len(), before, "a rejected cost was checked");

    // The buckets are as the last allowed request left them.
    let after = search(&server, "203.0.113.1", &[]).await;
    assert_eq!(
        state(&after),
        [
            item("per-client", &[("r", 5), ("t", 0)]),
            item("everyone", &[("r", 10), ("t", 0)]),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_path_metrics_count_every_decision_exactly() {
    let limits = EndpointLimits::new(vec![
        Limit::named(
            "per-client",
            RateLimitRule::new(RateLimitScope::Ip, 1_000, 1_000.0).unwrap(),
        )
        .unwrap(),
        Limit::named(
            "everyone",
            RateLimitRule::new(RateLimitScope::Global, 300, 300.0).unwrap(),
        )
        .unwrap(),
    ])
    .unwrap();
    let rules = RuleSet::try_from_limits([(SEARCH, limits)]).unwrap();
    // The manual clock never moves: nothing refills during the test.
    let clock = ManualClock::new(1_000.0);
    let container = Container::build(ContainerConfig::memory(rules).with_clock(clock))
        .await
        .unwrap();
    let metrics = RateLimitMetrics::new();
    let server = std::sync::Arc::new(start(layer(&container).metrics(&metrics)).await);

    // Registered at zero when the layer is built, before any request.
    let line = |limit: &str, outcome: &str, n: u64| {
        format!(
            "ratelimit_http_decisions_total{{endpoint=\"{SEARCH}\",limit=\"{limit}\",outcome=\"{outcome}\"}} {n}"
        )
    };
    let text = metrics.encode().unwrap();
    for expected in [
        line("", "allowed", 0),
        line("per-client", "denied", 0),
        line("everyone", "denied", 0),
    ] {
        assert!(text.lines().any(|l| l == expected), "{expected}\n{text}");
    }

    // 64 concurrent clients, 8 requests each: 512 requests against 300 global tokens.
    let mut tasks = Vec::new();
    for task in 0..64 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let ip = format!("203.0.113.{}", task % 8);
            let mut statuses = Vec::new();
            for _ in 0..8 {
                statuses.push(search(&server, &ip, &[]).await.status());
            }
            statuses
        }));
    }
    let mut allowed = 0u64;
    let mut denied = 0u64;
    for task in tasks {
        for status in task.await.unwrap() {
            match status {
                StatusCode::OK => allowed += 1,
                StatusCode::TOO_MANY_REQUESTS => denied += 1,
                other => panic!("unexpected {other}"),
            }
        }
    }
    assert_eq!((allowed, denied), (300, 212));
    let text = metrics.encode().unwrap();
    for expected in [
        line("", "allowed", 300),
        line("everyone", "denied", 212),
        line("per-client", "denied", 0),
        line("", "fail_open", 0),
    ] {
        assert!(text.lines().any(|l| l == expected), "{expected}\n{text}");
    }
    assert_eq!(metrics.decisions(SEARCH, "", "allowed"), 300);
    assert_eq!(metrics.decisions(SEARCH, "everyone", "denied"), 212);
}
