//! Hostile clients, over real sockets: requests abandoned mid-check, and forwarding headers
//! written to steer the limiter. Each test plays the attacker against the layer served by a
//! real axum server (on a real, throwaway redis-server where the store matters) and asserts
//! that the limit still holds. `just attack` runs the same attacks against the example server
//! and reports the figures in docs/security.md.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::{Store, app, attempted_identifiers, serve};
use ratelimit_container::Container;
use ratelimit_http::{DefaultExtractor, ForwardedHeader, RateLimitLayer};
use ratelimit_tests::fixtures::LOGIN_PATH as LOGIN;
use ratelimit_tests::redis_server::{RedisServer, TestRedis};
use reqwest::StatusCode;

/// The client's address as the trusted proxy saw it (the proxy appends it to the header).
const REAL_CLIENT: &str = "203.0.113.50";

fn http_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .local_address(source.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

async fn login(http: &reqwest::Client, base: &str, headers: &[(&str, String)]) -> StatusCode {
    let mut request = http.post(format!("{base}{LOGIN}"));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.send().await.unwrap().status()
}

/// Opens a connection, writes a whole login request and closes the connection without
/// reading the answer: the server sees the request, then EOF, while the check is in flight.
fn cancelled_login(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let request = format!("POST {LOGIN} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// (i) Fifty logins abandoned while their checks are in flight (Redis is paused so that every
/// one of them is) must neither switch limiting off nor deny everybody: afterwards the
/// flooding client is still limited and another client still gets exactly its five logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_do_not_switch_limiting_off() {
    let redis = RedisServer::start();
    let store = Store::Redis(TestRedis {
        url: redis.url(),
        server: None,
    });
    let container = store.container().await;
    let layer = RateLimitLayer::from_adapter(container.adapter().clone());
    let server = serve(app(layer), "127.0.0.1:0").await;
    let attacker = http_from("127.0.0.1");
    for n in 1..=5 {
        assert_eq!(
            login(&attacker, &server.base, &[]).await,
            StatusCode::OK,
            "{n}"
        );
    }
    assert_eq!(
        login(&attacker, &server.base, &[]).await,
        StatusCode::TOO_MANY_REQUESTS
    );

    // A slow store (here: a paused one) keeps every check in flight while its client leaves.
    redis.pause();
    let addr = server.addr;
    tokio::task::spawn_blocking(move || {
        for _ in 0..50 {
            cancelled_login(addr);
        }
    })
    .await
    .unwrap();
    // Let the server notice every closed connection before the store answers again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.resume();

    let mut passed = 0;
    for _ in 0..10 {
        if login(&attacker, &server.base, &[]).await != StatusCode::TOO_MANY_REQUESTS {
            passed += 1;
        }
    }
    assert_eq!(
        passed, 0,
        "after 50 cancelled requests, {passed} of 10 logins from the drained client were not denied"
    );
    let other = http_from("127.0.0.2");
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(login(&other, &server.base, &[]).await);
    }
    let expected: Vec<StatusCode> = [StatusCode::OK; 5]
        .into_iter()
        .chain([StatusCode::TOO_MANY_REQUESTS; 2])
        .collect();
    assert_eq!(statuses, expected, "another client after the flood");
}

fn behind_proxy(container: &Container, header: ForwardedHeader) -> RateLimitLayer {
    RateLimitLayer::from_adapter(container.adapter().clone()).extractor(
        DefaultExtractor::new()
            .trust_proxies(["127.0.0.1".parse().unwrap()])
            .forwarded_header(header),
    )
}

/// Drains the real client's bucket through the proxy with a well-formed header, then sends
/// `attacks` (header name, header value written by the client, already followed by what the
/// proxy appends): every one must land in the real client's bucket, and so be denied.
async fn spoofing_does_not_change_the_bucket(
    header: ForwardedHeader,
    honest: (&str, String),
    attacks: Vec<Vec<(&str, String)>>,
) {
    let container = Store::memory().container().await;
    let server = serve(app(behind_proxy(&container, header)), "127.0.0.1:0").await;
    let proxy = http_from("127.0.0.1");
    for n in 1..=5 {
        let status = login(&proxy, &server.base, std::slice::from_ref(&honest)).await;
        assert_eq!(status, StatusCode::OK, "honest login {n}");
    }
    let mut events = container.events().subscribe();
    for headers in &attacks {
        let status = login(&proxy, &server.base, headers).await;
        let ids = attempted_identifiers(&mut events);
        assert_eq!(
            (status, ids.as_slice()),
            (
                StatusCode::TOO_MANY_REQUESTS,
                [REAL_CLIENT.to_owned()].as_slice()
            ),
            "the client sent {headers:?}"
        );
    }
}

/// (ii) Behind a trusted proxy that appends `for=<peer>` to the client's `Forwarded` header, a
/// client that opens a quoted string the proxy's element falls into cannot pick its address
/// (nor move into the proxy's own bucket): the proxy's element wins.
#[tokio::test]
async fn forwarded_quote_injection_does_not_pick_the_address() {
    let proxy_adds = format!(", for={REAL_CLIENT}");
    let mut attacks = Vec::new();
    for i in 1..=10 {
        let fake = format!("198.51.100.{i}");
        for client_part in [
            format!("for={fake};x=\""),
            format!("for=\"{fake}"),
            format!("for={fake};x=\"\\"),
            format!("for=\"[2001:db8::{i}]:80\";proto=\"https"),
            "\"".to_owned(),
        ] {
            attacks.push(vec![("forwarded", format!("{client_part}{proxy_adds}"))]);
        }
    }
    spoofing_does_not_change_the_bucket(
        ForwardedHeader::Forwarded,
        ("forwarded", format!("for={REAL_CLIENT}")),
        attacks,
    )
    .await;
}

/// (iii) Whatever a client writes left of the hop its trusted proxy appends to
/// `X-Forwarded-For` (spoofed addresses, empty or garbage hops, the proxy's own address,
/// thousands of hops, a huge value, a line of its own) does not change its bucket.
#[tokio::test]
async fn x_forwarded_for_spoofing_left_of_the_proxy_does_not_change_the_bucket() {
    let proxy_adds = format!(", {REAL_CLIENT}");
    let many: Vec<String> = (0..2000)
        .map(|i| format!("198.51.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let mut attacks: Vec<Vec<(&str, String)>> = Vec::new();
    for i in 1..=5 {
        for client_part in [
            format!("198.51.100.{i}"),
            format!("198.51.100.{i}, 127.0.0.1"),
            format!("198.51.100.{i},,unknown, _hidden"),
            format!("[2001:db8::{i}]:443"),
            format!("\"198.51.100.{i}"),
        ] {
            attacks.push(vec![(
                "x-forwarded-for",
                format!("{client_part}{proxy_adds}"),
            )]);
        }
        // The client's own line, then the proxy's.
        attacks.push(vec![
            ("x-forwarded-for", format!("198.51.100.{i}")),
            ("x-forwarded-for", REAL_CLIENT.to_owned()),
        ]);
    }
    attacks.push(vec![(
        "x-forwarded-for",
        format!("{}{proxy_adds}", many.join(", ")),
    )]);
    attacks.push(vec![(
        "x-forwarded-for",
        format!("{}{proxy_adds}", "9".repeat(32 * 1024)),
    )]);
    spoofing_does_not_change_the_bucket(
        ForwardedHeader::XForwardedFor,
        ("x-forwarded-for", REAL_CLIENT.to_owned()),
        attacks,
    )
    .await;
}
