//! `just attack`: plays the attacker against the example server and measures what gets through.
//!
//! It builds the example server (`crates/http/examples/server.rs`) and the `ratelimit` CLI once,
//! with the same profile as itself, then starts the server as a real process on a free loopback
//! port for every attack, on the memory backend and on a throwaway `redis-server`, and sends
//! raw HTTP/1.1 over TCP (so that it can write any header and close a connection at any time).
//! For every attack it counts the requests sent and allowed, and compares them with the most the
//! rule lets one identity through in that time (`max_tokens + elapsed × refill_rate / 60`,
//! rounded down to whole requests), per identity the attack really is. The result is printed as
//! Markdown and written into `docs/security.md` between the `<!-- attack:begin -->` and
//! `<!-- attack:end -->` markers (the rest of the file is kept).
//!
//! ```text
//! just attack
//! # which runs
//! cargo run --release -q -p ratelimit-tests --example attack [-- --flood N]
//! ```
//!
//! Needs `redis-server` on `PATH` (or `REDIS_SERVER_BIN`). Progress goes to stderr, the tables
//! to stdout. It exits with an error (after writing the tables) when an attack got through.
//!
//! Nothing here assumes a defence: every verdict is computed from what the server answered.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::error::Error;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader as StdBufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ratelimit_tests::fixtures::{
    EXAMPLE_RULES_FILE as RULES_FILE, LOGIN, LOGIN_PATH, cli_command, one_rule_text,
};
use ratelimit_tests::redis_server::RedisServer;
use ratelimit_tests::report;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

type Res<T> = Result<T, Box<dyn Error>>;
/// Header lines of a request, in order.
type Headers = Vec<(&'static str, String)>;
/// Stored values of the two keys, from Redis's clock.
type Garbage = fn(f64) -> (String, String);

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md");
const BEGIN: &str = "<!-- attack:begin -->";
const END: &str = "<!-- attack:end -->";

/// The login rule of `crates/http/examples/rules.toml`, the target of every attack.
const MAX_TOKENS: f64 = 5.0;
const MAX_TOKENS_WHOLE: u64 = 5;
/// Tokens per minute.
const REFILL_RATE: f64 = 5.0;

/// How long the cancellation flood lasts.
const FLOOD: Duration = Duration::from_secs(3);
/// Requests per header-spoofing variant.
const SPOOF_REQUESTS: u64 = 30;
/// Default number of distinct identities of the identifier flood (`--flood N`).
const DEFAULT_IDENTITIES: u64 = 300_000;
/// Checks of the corrupt key between two checks of a sound one.
const WRONGTYPE_RUN: u64 = 8;
/// The identifier flood's three phases stop after a third of this each, however many they sent.
const IDENTITY_FLOOD_MAX: Duration = Duration::from_secs(30);
/// The address a trusted proxy saw the attacking client at (and appends to the header).
const REAL_CLIENT: &str = "203.0.113.50";

fn main() -> Res<()> {
    let flood = FloodArgs::parse()?;
    let machine = report::machine_facts();
    eprintln!("[attack] {machine}");
    let bins = build()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let redis = RedisServer::start();
    eprintln!("[attack] redis on {}", redis.url());
    let ctx = Ctx { bins, redis };

    let mut rows = Vec::new();
    for backend in [Backend::Memory, Backend::Redis] {
        rows.extend(rt.block_on(cancellation_flood(&ctx, backend, None))?);
        if backend == Backend::Redis {
            rows.extend(rt.block_on(cancellation_flood(&ctx, backend, Some("closed")))?);
        }
        rows.extend(rt.block_on(header_spoofing(&ctx, backend))?);
    }
    rows.extend(rt.block_on(cli_reset(&ctx))?);
    rows.extend(rt.block_on(stored_garbage(&ctx))?);
    rows.extend(rt.block_on(compact_garbage(&ctx))?);
    rows.push(rt.block_on(identifier_flood(&ctx, &flood))?);
    let edges = cli_edges(&ctx)?;
    rt.shutdown_timeout(Duration::from_secs(1));

    let section = render(&machine, &flood, &rows, &edges);
    println!("{section}");
    report::write_between_markers(DOC, BEGIN, END, &section)?;
    eprintln!("[attack] wrote {DOC}");
    let broken: Vec<String> = rows
        .iter()
        .filter(|r| r.verdict.failed())
        .map(|r| format!("{} ({})", r.attack, r.backend))
        .chain(
            edges
                .iter()
                .filter(|e| e.verdict.failed())
                .map(|e| e.check.clone()),
        )
        .collect();
    if broken.is_empty() {
        Ok(())
    } else {
        Err(format!("{} attacks got through: {broken:#?}", broken.len()).into())
    }
}

// ---------------------------------------------------------------------------------------------
// What the table holds

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The limit held.
    Held,
    /// More got through than the limit allows (or the defence did not act).
    Broken,
    /// A client was denied what a correct limiter grants it.
    LockedOut,
    /// Not a question of the limit (a failure policy's choice, a figure to read).
    Info,
}

impl Verdict {
    fn failed(self) -> bool {
        matches!(self, Self::Broken | Self::LockedOut)
    }

    fn text(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Broken => "**BROKEN**",
            Self::LockedOut => "**LOCKED OUT**",
            Self::Info => "—",
        }
    }

    /// Held when at most `most` got through.
    fn at_most(allowed: u64, most: u64) -> Self {
        if allowed <= most {
            Self::Held
        } else {
            Self::Broken
        }
    }

    /// Held when at least `least` (what a correct limiter grants) and at most `most` got
    /// through.
    fn between(allowed: u64, least: u64, most: u64) -> Self {
        if allowed > most {
            Self::Broken
        } else if allowed < least {
            Self::LockedOut
        } else {
            Self::Held
        }
    }
}

#[derive(Debug)]
struct Row {
    attack: String,
    backend: &'static str,
    sent: u64,
    allowed: u64,
    /// The most the limit allows (None: not a count the limit bounds).
    most: Option<u64>,
    verdict: Verdict,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    note: String,
}

#[derive(Debug)]
struct Edge {
    check: String,
    result: String,
    verdict: Verdict,
}

/// Whole requests `identities` may pass in `elapsed`: a full bucket each plus the refill.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small, non-negative
fn most_allowed(elapsed: Duration, identities: u64) -> u64 {
    let per_identity = MAX_TOKENS + elapsed.as_secs_f64() * REFILL_RATE / 60.0;
    // Whole requests only; the tiny slack absorbs float noise at exact boundaries.
    (per_identity + 1e-9).floor() as u64 * identities
}

// ---------------------------------------------------------------------------------------------
// Processes: the binaries, the server, the CLI

#[derive(Debug)]
struct Bins {
    server: PathBuf,
    cli: PathBuf,
}

struct Ctx {
    bins: Bins,
    redis: RedisServer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Memory,
    Redis,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
        }
    }
}

/// Builds the example server and the CLI with this program's profile; returns their paths.
fn build() -> Res<Bins> {
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command
        .current_dir(ROOT)
        .args(["build", "-q", "-p", "ratelimit-http", "--example", "server"])
        .args(["-p", "ratelimit-cli", "--bin", "ratelimit"]);
    if release {
        command.arg("--release");
    }
    eprintln!("[attack] building the example server and the CLI");
    let status = command.status()?;
    if !status.success() {
        return Err(format!("cargo build failed: {status}").into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(ROOT).join("target"), PathBuf::from);
    let profile = target.join(if release { "release" } else { "debug" });
    let bins = Bins {
        server: profile.join("examples").join("server"),
        cli: profile.join("ratelimit"),
    };
    for bin in [&bins.server, &bins.cli] {
        if !bin.exists() {
            return Err(format!("{} was not built", bin.display()).into());
        }
    }
    Ok(bins)
}

/// The example server, running as a child process; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Starts the server on `listen` (port 0) with `backend` and `extra` arguments, and waits
    /// for its "listening on" line. Redis is flushed first, so that every attack starts from
    /// full buckets.
    fn start(ctx: &Ctx, backend: Backend, listen: &str, extra: &[&str]) -> Res<Self> {
        let mut command = Command::new(&ctx.bins.server);
        command
            .args(["--listen", listen, "--rules", RULES_FILE])
            .args(extra)
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if backend == Backend::Redis {
            ctx.redis.cmd(&redis::cmd("FLUSHALL"));
            command.args(["--redis-url", &ctx.redis.url()]);
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        // Read the address, then keep draining stdout so that the server never blocks on it.
        std::thread::spawn(move || {
            for line in StdBufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("listening on http://") {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(addr);
                }
            }
        });
        let mut server = Self {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| format!("the example server did not start ({extra:?})"))?;
        server.addr = addr.parse()?;
        Ok(server)
    }

    /// The resident set size of the server process, in KiB (`VmRSS` of `/proc/<pid>/status`).
    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run of the CLI did.
#[derive(Debug)]
struct CliRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn cli(ctx: &Ctx, args: &[&str], stdout: Stdio) -> Res<CliRun> {
    let output = cli_command(&ctx.bins.cli)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()?;
    Ok(CliRun {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1

/// A connection from `source` (any loopback address on Linux: `127.0.0.2` is another client).
async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// A login request with extra header lines (repeated names make several lines).
fn login_request(headers: &[(&str, String)]) -> Vec<u8> {
    let mut text = format!("POST {LOGIN_PATH} HTTP/1.1\r\nHost: attack\r\nContent-Length: 0\r\n");
    for (name, value) in headers {
        let _ = write!(text, "{name}: {value}\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

#[derive(Debug, Clone, Copy)]
struct Reply {
    status: u16,
    retry_after: Option<u64>,
}

impl Reply {
    fn allowed(self) -> bool {
        is_allowed(self.status)
    }
}

/// Whether a status lets the request through.
fn is_allowed(status: u16) -> bool {
    (200..300).contains(&status)
}

/// How many of `statuses` let their request through.
fn allowed_in(statuses: &[u16]) -> u64 {
    statuses
        .iter()
        .filter(|&&status| is_allowed(status))
        .count() as u64
}

/// Reads one response (status line, headers, `Content-Length` body).
async fn read_reply(reader: &mut BufReader<TcpStream>) -> std::io::Result<Reply> {
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut length, mut retry_after) = (0usize, None);
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("retry-after") {
                retry_after = value.parse().ok();
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    Ok(Reply {
        status,
        retry_after,
    })
}

/// A keep-alive connection of one client.
struct Client {
    addr: SocketAddr,
    source: Option<IpAddr>,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    fn new(addr: SocketAddr, source: Option<IpAddr>) -> Self {
        Self {
            addr,
            source,
            conn: None,
        }
    }

    /// One login; reconnects once when the server closed the kept-alive connection.
    async fn login(&mut self, headers: &[(&str, String)]) -> Res<Reply> {
        let request = login_request(headers);
        for attempt in 0..2 {
            if self.conn.is_none() {
                self.conn = Some(BufReader::new(connect(self.addr, self.source).await?));
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            let result = async {
                conn.get_mut().write_all(&request).await?;
                read_reply(conn).await
            }
            .await;
            match result {
                Ok(reply) => return Ok(reply),
                Err(err) if attempt == 1 => return Err(err.into()),
                Err(_) => self.conn = None,
            }
        }
        Err("unreachable".into())
    }
}

/// `n` logins in a row; (allowed, elapsed from the first sent to the last answered).
async fn logins(client: &mut Client, n: u64, headers: &[(&str, String)]) -> Res<(u64, Duration)> {
    let (statuses, elapsed) = login_statuses(client, n, headers).await?;
    Ok((allowed_in(&statuses), elapsed))
}

/// `n` logins in a row; (every status, elapsed from the first sent to the last answered).
async fn login_statuses(
    client: &mut Client,
    n: u64,
    headers: &[(&str, String)],
) -> Res<(Vec<u16>, Duration)> {
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(client.login(headers).await?.status);
    }
    Ok((statuses, started.elapsed()))
}

fn ip(text: &str) -> Option<IpAddr> {
    text.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// a. Cancellation flood

/// How a cancelling client goes away.
#[derive(Debug, Clone, Copy)]
enum Cancel {
    /// Writes the request, then closes (FIN).
    Close,
    /// Writes the request, then resets the connection (SO_LINGER 0: RST).
    Reset,
    /// Writes the request, waits 1 ms for the answer, then closes.
    TinyTimeout,
}

async fn cancelled_login(addr: SocketAddr, how: Cancel) -> std::io::Result<()> {
    let mut stream = connect(addr, None).await?;
    stream.write_all(&login_request(&[])).await?;
    match how {
        Cancel::Close => {
            let _ = stream.shutdown().await;
        }
        Cancel::Reset => {
            #[allow(deprecated)] // SO_LINGER 0 makes close send RST without blocking
            stream.set_linger(Some(Duration::ZERO))?;
        }
        Cancel::TinyTimeout => {
            let mut byte = [0u8; 1];
            let _ = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await;
        }
    }
    drop(stream);
    Ok(())
}

/// The cancellation flood, with the server's default failure policy (`open`) or `policy`.
async fn cancellation_flood(
    ctx: &Ctx,
    backend: Backend,
    policy: Option<&'static str>,
) -> Res<Vec<Row>> {
    let extra: Vec<&str> = policy.map_or_else(Vec::new, |p| vec!["--failure-policy", p]);
    let server = Server::start(ctx, backend, "127.0.0.1:0", &extra)?;
    let rss_before = server.rss_kib();
    let addr = server.addr;
    // The attack's name in the table: which policy, when it is not the default.
    let under = policy.map_or_else(String::new, |p| format!(" under `--failure-policy {p}`"));
    eprintln!(
        "[attack] cancellation flood{under}, {}: {} s",
        backend.name(),
        FLOOD.as_secs()
    );
    // The flooding client (127.0.0.1) empties its login bucket first.
    let mut flooder = Client::new(addr, ip("127.0.0.1"));
    let flood_started = Instant::now();
    let (mut allowed, _) = logins(&mut flooder, 6, &[]).await?;
    let mut sent = 6;
    let deadline = Instant::now() + FLOOD;

    let cancelled = Arc::new(AtomicU64::new(0));
    let cancellers: Vec<_> = (0..3)
        .map(|worker| {
            let cancelled = cancelled.clone();
            tokio::spawn(async move {
                let mut n = worker;
                while Instant::now() < deadline {
                    let how = match n % 3 {
                        0 => Cancel::Close,
                        1 => Cancel::Reset,
                        _ => Cancel::TinyTimeout,
                    };
                    n += 1;
                    if cancelled_login(addr, how).await.is_ok() {
                        cancelled.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    // Another client, 127.0.0.2, during the same flood. Its statuses (0: no answer), and the
    // span from its first answer to its last request sent: its bucket was created before the
    // first answer and checked again after the last send, so a correct limiter grants it at
    // least a full bucket plus what refills in that span.
    let other = tokio::spawn(async move {
        let mut client = Client::new(addr, ip("127.0.0.2"));
        let started = Instant::now();
        let (mut sent, mut allowed) = (0u64, 0u64);
        let mut statuses = Vec::new();
        let (mut first_answer, mut last_sent) = (None, started);
        while Instant::now() < deadline {
            let sending = Instant::now();
            let reply = client.login(&[]).await.ok();
            if reply.is_some() {
                first_answer.get_or_insert_with(Instant::now);
            }
            last_sent = sending;
            statuses.push(reply.map_or(0, |r| r.status));
            if reply.is_some_and(Reply::allowed) {
                allowed += 1;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let granted_span = first_answer.map_or(Duration::ZERO, |first| {
            last_sent.saturating_duration_since(first)
        });
        (sent, allowed, started.elapsed(), granted_span, statuses)
    });
    while Instant::now() < deadline {
        // Fresh connections, like the cancelled ones (a kept-alive one would be answered first).
        let mut client = Client::new(addr, ip("127.0.0.1"));
        if client.login(&[]).await?.allowed() {
            allowed += 1;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = flood_started.elapsed();
    for canceller in cancellers {
        canceller.await?;
    }
    let (other_sent, other_allowed, other_elapsed, granted_span, other_statuses) = other.await?;
    let cancelled = cancelled.load(Ordering::Relaxed);
    let rss_after = server.rss_kib();
    let most = most_allowed(elapsed, 1);
    let other_most = most_allowed(other_elapsed, 1);
    // Nothing granted (no answer at all) is no allowance either.
    let other_least = if other_statuses.iter().any(|s| *s != 0) {
        most_allowed(granted_span, 1)
    } else {
        MAX_TOKENS_WHOLE
    };
    Ok(vec![
        Row {
            attack: format!(
                "a. cancellation flood{under}: the flooding client (bucket emptied first, then \
                 {cancelled} requests abandoned mid-check: FIN, RST, 1 ms read timeout)"
            ),
            backend: backend.name(),
            sent,
            allowed,
            most: Some(most),
            verdict: Verdict::at_most(allowed, most),
            rss_before,
            rss_after,
            note: format!("{:.1} s", elapsed.as_secs_f64()),
        },
        Row {
            attack: format!("a. cancellation flood{under}: another client (127.0.0.2) during it"),
            backend: backend.name(),
            sent: other_sent,
            allowed: other_allowed,
            most: Some(other_most),
            verdict: Verdict::between(other_allowed, other_least, other_most),
            rss_before,
            rss_after,
            note: format!(
                "{:.1} s; {} (0: no answer); a correct limiter grants it at least {other_least} \
                 (LOCKED OUT below)",
                other_elapsed.as_secs_f64(),
                status_counts(&other_statuses)
            ),
        },
    ])
}

// ---------------------------------------------------------------------------------------------
// b. Forwarding headers through a trusted proxy

struct Spoof {
    name: &'static str,
    forwarded: bool,
    /// The header lines of request `i`, as the trusted proxy forwards them.
    headers: fn(u64) -> Headers,
}

fn spoofs() -> Vec<Spoof> {
    vec![
        Spoof {
            name: "b. `Forwarded: for=<rotating fake>;x=\"` + the proxy's `, for=<client>`",
            forwarded: true,
            headers: |i| {
                vec![(
                    "forwarded",
                    format!("for={};x=\", for={REAL_CLIENT}", fake(i)),
                )]
            },
        },
        Spoof {
            name: "b. `Forwarded: for=\"<rotating fake>` (unterminated) + the proxy's element",
            forwarded: true,
            headers: |i| vec![("forwarded", format!("for=\"{}, for={REAL_CLIENT}", fake(i)))],
        },
        Spoof {
            name: "b. `Forwarded: \"` (a bare quote) + the proxy's element",
            forwarded: true,
            headers: |_| vec![("forwarded", format!("\", for={REAL_CLIENT}"))],
        },
        Spoof {
            name: "b. `Forwarded`: 1,000 fake elements, then the proxy's",
            forwarded: true,
            headers: |i| {
                let fakes: Vec<String> = (0..1000)
                    .map(|k| format!("for={}", fake(i * 1000 + k)))
                    .collect();
                vec![(
                    "forwarded",
                    format!("{}, for={REAL_CLIENT}", fakes.join(", ")),
                )]
            },
        },
        Spoof {
            name: "b. `Forwarded`: the client's own line, then the proxy's line",
            forwarded: true,
            headers: |i| {
                vec![
                    ("forwarded", format!("for={}", fake(i))),
                    ("forwarded", format!("for={REAL_CLIENT}")),
                ]
            },
        },
        Spoof {
            name: "b. `X-Forwarded-For: <rotating fake>` + the proxy's `, <client>`",
            forwarded: false,
            headers: |i| vec![("x-forwarded-for", format!("{}, {REAL_CLIENT}", fake(i)))],
        },
        Spoof {
            name: "b. `X-Forwarded-For`: fake, the trusted proxy's own address, empty and `unknown` hops",
            forwarded: false,
            headers: |i| {
                vec![(
                    "x-forwarded-for",
                    format!("{}, 127.0.0.1,, unknown, _x, {REAL_CLIENT}", fake(i)),
                )]
            },
        },
        Spoof {
            name: "b. `X-Forwarded-For`: 2,000 fake hops, then the proxy's",
            forwarded: false,
            headers: |i| {
                let fakes: Vec<String> = (0..2000).map(|k| fake(i * 2000 + k)).collect();
                vec![(
                    "x-forwarded-for",
                    format!("{}, {REAL_CLIENT}", fakes.join(", ")),
                )]
            },
        },
        Spoof {
            name: "b. `X-Forwarded-For`: a 32 KiB value, then the proxy's hop",
            forwarded: false,
            headers: |i| {
                vec![(
                    "x-forwarded-for",
                    format!("{}{i}, {REAL_CLIENT}", "9".repeat(32 * 1024)),
                )]
            },
        },
        Spoof {
            name: "b. `X-Forwarded-For`: the client's own line, then the proxy's line",
            forwarded: false,
            headers: |i| {
                vec![
                    ("x-forwarded-for", fake(i)),
                    ("x-forwarded-for", REAL_CLIENT.to_owned()),
                ]
            },
        },
    ]
}

/// A different documentation address for each `i` (198.18.0.0/15: 131,072 of them).
fn fake(i: u64) -> String {
    let n = i % 131_072;
    format!("198.{}.{}.{}", 18 + n / 65_536, (n / 256) % 256, n % 256)
}

async fn header_spoofing(ctx: &Ctx, backend: Backend) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    for spoof in spoofs() {
        eprintln!("[attack] {} ({})", spoof.name, backend.name());
        let mut extra = vec!["--trust-proxy", "127.0.0.1"];
        if spoof.forwarded {
            extra.push("--forwarded");
        }
        let server = Server::start(ctx, backend, "127.0.0.1:0", &extra)?;
        let rss_before = server.rss_kib();
        let mut proxy = Client::new(server.addr, ip("127.0.0.1"));
        let started = Instant::now();
        // First the real client's own logins, with the header the proxy writes for an honest
        // client: they empty its bucket. A spoofed request that lands in that bucket is then
        // denied; one that lands anywhere else (a fake address, the proxy's own) gets through.
        let honest = if spoof.forwarded {
            ("forwarded", format!("for={REAL_CLIENT}"))
        } else {
            ("x-forwarded-for", REAL_CLIENT.to_owned())
        };
        let (mut allowed, _) = logins(&mut proxy, MAX_TOKENS_WHOLE, &[honest]).await?;
        let mut statuses = std::collections::BTreeMap::new();
        for i in 0..SPOOF_REQUESTS {
            let reply = proxy.login(&(spoof.headers)(i)).await?;
            *statuses.entry(reply.status).or_insert(0u64) += 1;
            if reply.allowed() {
                allowed += 1;
            }
        }
        let elapsed = started.elapsed();
        // Every request comes from the one real client: one identity.
        let most = most_allowed(elapsed, 1);
        let note = statuses
            .iter()
            .map(|(status, n)| format!("{n}× {status}"))
            .collect::<Vec<_>>()
            .join(", ");
        rows.push(Row {
            attack: spoof.name.to_owned(),
            backend: backend.name(),
            sent: MAX_TOKENS_WHOLE + SPOOF_REQUESTS,
            allowed,
            most: Some(most),
            verdict: Verdict::at_most(allowed, most),
            rss_before,
            rss_after: server.rss_kib(),
            note: format!("5 honest logins first, then the spoofed ones: {note}"),
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// c. The CLI resets the bucket the service uses

async fn cli_reset(ctx: &Ctx) -> Res<Vec<Row>> {
    let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    // (what the client is, the CLI's identifier, server flags, the headers the proxy sends)
    let mut cases: Vec<(&str, &str, Vec<&str>, Headers)> = Vec::new();
    if ipv6 {
        cases.push(("a client on ::1 (over IPv6)", "::1", Vec::new(), Vec::new()));
    }
    cases.push((
        "an IPv4-mapped client `::ffff:203.0.113.9` (X-Forwarded-For)",
        "::ffff:203.0.113.9",
        vec!["--trust-proxy", "127.0.0.1"],
        vec![("x-forwarded-for", "::ffff:203.0.113.9".to_owned())],
    ));
    cases.push((
        "an IPv6 client `2001:db8::7` (X-Forwarded-For, grouped by /64)",
        "2001:db8::7",
        vec!["--trust-proxy", "127.0.0.1"],
        vec![("x-forwarded-for", "2001:db8::7".to_owned())],
    ));
    let mut rows = Vec::new();
    for (name, identifier, extra, headers) in cases {
        eprintln!("[attack] CLI reset of {name}");
        let listen = if identifier == "::1" {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let server = Server::start(ctx, Backend::Redis, listen, &extra)?;
        let rss_before = server.rss_kib();
        let mut client = Client::new(server.addr, None);
        let started = Instant::now();
        let (mut allowed, _) = logins(&mut client, 6, &headers).await?;
        let url = ctx.redis.url();
        let run = cli(
            ctx,
            &[
                "reset",
                "-e",
                LOGIN,
                "-i",
                identifier,
                "--rules",
                RULES_FILE,
                "--redis-url",
                &url,
            ],
            Stdio::piped(),
        )?;
        let after = client.login(&headers).await?;
        if after.allowed() {
            allowed += 1;
        }
        let elapsed = started.elapsed();
        // A reset refills the bucket: one more full bucket.
        let most = most_allowed(elapsed, 1) + MAX_TOKENS_WHOLE;
        let said = if run.stdout.is_empty() {
            &run.stderr
        } else {
            &run.stdout
        };
        rows.push(Row {
            attack: format!("c. `ratelimit reset -i {identifier}` after limiting {name}"),
            backend: "redis",
            sent: 7,
            allowed,
            most: Some(most),
            verdict: if after.allowed() {
                Verdict::Held
            } else {
                Verdict::Broken
            },
            rss_before,
            rss_after: server.rss_kib(),
            note: format!(
                "CLI exit {}, said {:?}; the next request: {}",
                run.code
                    .map_or_else(|| "signal".to_owned(), |c| c.to_string()),
                said.lines().next().unwrap_or_default(),
                after.status
            ),
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// d. Stored garbage (Redis)

/// Redis's clock, in seconds since the Unix epoch.
fn redis_now(ctx: &Ctx) -> f64 {
    match ctx.redis.cmd(&redis::cmd("TIME")) {
        redis::Value::Array(parts) => {
            let num = |v: Option<&redis::Value>| match v {
                Some(redis::Value::BulkString(b)) => {
                    String::from_utf8_lossy(b).parse::<f64>().unwrap_or(0.0)
                }
                _ => 0.0,
            };
            num(parts.first()) + num(parts.get(1)) / 1e6
        }
        _ => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    }
}

/// The two-key (specification) layout's keys of `identifier`'s login bucket, prefix
/// `rate_limit`: what the example server reads with `--layout two-keys` (the attacks that plant
/// them start it so; its default is the compact layout, whose garbage has rows of its own).
fn login_keys(identifier: &str) -> (String, String) {
    let key = format!("rate_limit:ip:{identifier}:{LOGIN}");
    (format!("{key}:tokens"), format!("{key}:time"))
}

async fn stored_garbage(ctx: &Ctx) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    let (tokens_key, time_key) = login_keys("127.0.0.1");
    // (what is stored, Redis's now → (`:tokens`, `:time`))
    let cases: [(&str, Garbage); 4] = [
        ("`:time` = `nan` (`:tokens` 0)", |_| {
            ("0".into(), "nan".into())
        }),
        ("`:time` 10⁷ s in the future (`:tokens` 0)", |now| {
            ("0".into(), format!("{}", now + 1e7))
        }),
        ("`:tokens` = -1e300", |now| {
            ("-1e300".into(), format!("{now}"))
        }),
        ("`:tokens` = 1e300 (above capacity)", |now| {
            ("1e300".into(), format!("{now}"))
        }),
    ];
    for (name, values) in cases {
        eprintln!("[attack] stored garbage: {name}");
        let server = Server::start(
            ctx,
            Backend::Redis,
            "127.0.0.1:0",
            &["--layout", "two-keys"],
        )?;
        let rss_before = server.rss_kib();
        let (tokens, time) = values(redis_now(ctx));
        ctx.redis
            .cmd(redis::cmd("SET").arg(&tokens_key).arg(&tokens));
        ctx.redis.cmd(redis::cmd("SET").arg(&time_key).arg(&time));
        let mut client = Client::new(server.addr, ip("127.0.0.1"));
        let (statuses, elapsed) = login_statuses(&mut client, SPOOF_REQUESTS, &[]).await?;
        let allowed = allowed_in(&statuses);
        let most = most_allowed(elapsed, 1);
        // Unusable data is a missing bucket, that is a full one: a client must get its logins.
        let verdict = Verdict::between(allowed, MAX_TOKENS_WHOLE, most);
        rows.push(Row {
            attack: format!("d. stored garbage, two-key layout (`--layout two-keys`): {name}"),
            backend: "redis",
            sent: SPOOF_REQUESTS,
            allowed,
            most: Some(most),
            verdict,
            rss_before,
            rss_after: server.rss_kib(),
            note: status_counts(&statuses),
        });
    }

    // A Redis whose clock is 10 s behind the stored time (a failover).
    {
        eprintln!("[attack] stored garbage: clock 10 s behind");
        let server = Server::start(
            ctx,
            Backend::Redis,
            "127.0.0.1:0",
            &["--layout", "two-keys"],
        )?;
        let rss_before = server.rss_kib();
        let now = redis_now(ctx);
        ctx.redis.cmd(redis::cmd("SET").arg(&tokens_key).arg("0"));
        ctx.redis.cmd(
            redis::cmd("SET")
                .arg(&time_key)
                .arg(format!("{}", now + 10.0)),
        );
        let mut client = Client::new(server.addr, ip("127.0.0.1"));
        let reply = client.login(&[]).await?;
        // The next token comes when `now` has reached the stored time and refilled one token.
        let real_wait = 10.0 + 60.0 / REFILL_RATE;
        let told = reply.retry_after;
        let verdict = match told {
            _ if reply.allowed() => Verdict::Broken,
            Some(secs) if secs as f64 >= real_wait - 1.0 => Verdict::Held,
            _ => Verdict::Broken,
        };
        rows.push(Row {
            attack: "d. clocks, two-key layout (`--layout two-keys`): the stored `:time` 10 s ahead of Redis's clock (`:tokens` 0)"
                .to_owned(),
            backend: "redis",
            sent: 1,
            allowed: u64::from(reply.allowed()),
            most: Some(0),
            verdict,
            rss_before,
            rss_after: server.rss_kib(),
            note: format!(
                "status {}, Retry-After {}; the next token comes in {real_wait:.0} s",
                reply.status,
                told.map_or_else(|| "absent".to_owned(), |s| format!("{s} s"))
            ),
        });
    }

    // WRONGTYPE at one key: that client, interleaved with another whose key is sound.
    {
        eprintln!("[attack] stored garbage: WRONGTYPE");
        let server = Server::start(
            ctx,
            Backend::Redis,
            "127.0.0.1:0",
            &["--layout", "two-keys"],
        )?;
        let rss_before = server.rss_kib();
        ctx.redis
            .cmd(redis::cmd("HSET").arg(&tokens_key).arg("f").arg("v"));
        let mut corrupt = Client::new(server.addr, ip("127.0.0.1"));
        let mut sound = Client::new(server.addr, ip("127.0.0.2"));
        let started = Instant::now();
        let (mut corrupt_allowed, mut sound_allowed) = (0, 0);
        let (mut corrupt_statuses, mut sound_statuses) = (Vec::new(), Vec::new());
        // Runs of checks of the corrupt key (more than a breaker's usual threshold of
        // consecutive failures), each followed by one check of a sound key.
        for _ in 0..SPOOF_REQUESTS {
            for _ in 0..WRONGTYPE_RUN {
                let reply = corrupt.login(&[]).await?;
                corrupt_statuses.push(reply.status);
                corrupt_allowed += u64::from(reply.allowed());
            }
            let reply = sound.login(&[]).await?;
            sound_statuses.push(reply.status);
            sound_allowed += u64::from(reply.allowed());
        }
        let most = most_allowed(started.elapsed(), 1);
        let rss_after = server.rss_kib();
        rows.push(Row {
            attack: "d. WRONGTYPE (a hash) at `:tokens` of 127.0.0.1, two-key layout (`--layout two-keys`): that client".to_owned(),
            backend: "redis",
            sent: SPOOF_REQUESTS * WRONGTYPE_RUN,
            allowed: corrupt_allowed,
            most: Some(most),
            // What an unusable bucket's own client gets is the failure policy's choice.
            verdict: Verdict::Info,
            rss_before,
            rss_after,
            note: format!(
                "{}; the failure policy decides",
                status_counts(&corrupt_statuses)
            ),
        });
        rows.push(Row {
            attack: format!(
                "d. WRONGTYPE at 127.0.0.1's key: another client (127.0.0.2), one login after \
                 each run of {WRONGTYPE_RUN} of 127.0.0.1's"
            ),
            backend: "redis",
            sent: SPOOF_REQUESTS,
            allowed: sound_allowed,
            most: Some(most),
            verdict: Verdict::at_most(sound_allowed, most),
            rss_before,
            rss_after,
            note: status_counts(&sound_statuses),
        });
    }
    Ok(rows)
}

/// The compact layout's key of `identifier`'s login bucket (`--layout compact`, the default
/// prefix): `<key>:tb`, no hash tag on a single Redis.
fn login_compact_key(identifier: &str) -> String {
    format!("rate_limit:ip:{identifier}:{LOGIN}:tb")
}

/// A compact value as the script packs it: `struct.pack('<ddI4', tokens, last, expires)`.
fn pack_compact(tokens: f64, last: f64, expires: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(20);
    bytes.extend(tokens.to_le_bytes());
    bytes.extend(last.to_le_bytes());
    bytes.extend(expires.to_le_bytes());
    bytes
}

/// `n` pseudo-random bytes (xorshift64*, seeded from the clock; the note prints them).
fn junk_bytes(n: usize) -> Vec<u8> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    #[allow(clippy::cast_possible_truncation)] // any 64 bits of the clock will do
    let mut state = (nanos as u64) | 1;
    (0..n)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            #[allow(clippy::cast_possible_truncation)] // the top byte
            let byte = (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
            byte
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Stored garbage at the compact layout's one key (`--layout compact`): what a client whose
/// `:tb` holds it gets.
async fn compact_garbage(ctx: &Ctx) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    let key = login_compact_key("127.0.0.1");
    let random = junk_bytes(20);
    // (what is stored, the value of `:tb`), from Redis's clock now (the attacks take seconds).
    let now = redis_now(ctx);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // seconds fit in u32
    let (in_an_hour, far) = ((now + 3600.0) as u32, (now + 1e7) as u32);
    let cases: Vec<(String, Vec<u8>)> = vec![
        (
            "20 bytes that unpack to NaN tokens and a NaN time".to_owned(),
            pack_compact(f64::NAN, f64::NAN, in_an_hour),
        ),
        (
            "20 bytes that unpack to 1e300 tokens and a time of 1e300".to_owned(),
            pack_compact(1e300, 1e300, in_an_hour),
        ),
        (
            "20 bytes that unpack to -1e300 tokens and a time of -inf".to_owned(),
            pack_compact(-1e300, f64::NEG_INFINITY, in_an_hour),
        ),
        (format!("20 random bytes `{}`", hex(&random)), random),
        (
            "a valid-looking value (0 tokens) with its time and expiry 10⁷ s in the future"
                .to_owned(),
            pack_compact(0.0, now + 1e7, far),
        ),
        ("7 bytes (a value of the wrong size)".to_owned(), vec![0; 7]),
    ];
    for (name, garbage) in cases {
        eprintln!("[attack] compact garbage: {name}");
        let server = Server::start(ctx, Backend::Redis, "127.0.0.1:0", &["--layout", "compact"])?;
        let rss_before = server.rss_kib();
        ctx.redis.cmd(redis::cmd("SET").arg(&key).arg(&garbage[..]));
        let mut client = Client::new(server.addr, ip("127.0.0.1"));
        let (statuses, elapsed) = login_statuses(&mut client, SPOOF_REQUESTS, &[]).await?;
        // The attack must have hit the server's key: after the logins Redis holds that key and
        // no other (a server on another key would have made its own). If not, the harness
        // wrote the wrong key, and the row would prove nothing.
        let keys = match ctx.redis.cmd(redis::cmd("KEYS").arg("*")) {
            redis::Value::Array(keys) => keys
                .into_iter()
                .map(|k| match k {
                    redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                    other => format!("{other:?}"),
                })
                .collect(),
            _ => Vec::new(),
        };
        if keys != [key.clone()] {
            return Err(format!(
                "compact garbage ({name}): Redis holds {keys:?} after the logins, not only \
                 {key:?}: the server uses another key"
            )
            .into());
        }
        let stored = match ctx.redis.cmd(redis::cmd("GET").arg(&key)) {
            redis::Value::BulkString(bytes) => Some(bytes),
            _ => None,
        };
        let allowed = allowed_in(&statuses);
        let most = most_allowed(elapsed, 1);
        rows.push(Row {
            attack: format!(
                "d. stored garbage, compact layout (`--layout compact`): `:tb` = {name}"
            ),
            backend: "redis",
            sent: SPOOF_REQUESTS,
            allowed,
            most: Some(most),
            // Unusable data is a missing bucket, that is a full one: the client must get its
            // full allowance (LOCKED OUT below it).
            verdict: Verdict::between(allowed, MAX_TOKENS_WHOLE, most),
            rss_before,
            rss_after: server.rss_kib(),
            note: format!(
                "{}; afterwards `:tb` holds {} bytes",
                status_counts(&statuses),
                stored.map_or(0, |b| b.len())
            ),
        });
    }
    Ok(rows)
}

fn status_counts(statuses: &[u16]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for status in statuses {
        *counts.entry(*status).or_insert(0u64) += 1;
    }
    counts
        .iter()
        .map(|(status, n)| format!("{n}× {status}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// e. Identifier flood (memory backend)

/// The memory capacity (in buckets) the flood asks for when the server has a flag for it.
const FLOOD_CAPACITY: u64 = 30_000;
/// Connections of the flood, and requests written at once on each (HTTP/1.1 pipelining).
const FLOOD_CONNECTIONS: u64 = 8;
const PIPELINE: u64 = 32;

/// The `i`-th identity: an IPv6 address in a /64 of its own.
fn identity(i: u64) -> String {
    format!("2001:db8:{:x}:{:x}::1", (i >> 16) & 0xffff, i & 0xffff)
}

/// Sends logins for identities `from..to` (each once) through the trusted proxy.
async fn flood_range(addr: SocketAddr, from: u64, to: u64, deadline: Instant) -> Res<(u64, u64)> {
    let per = (to - from).div_ceil(FLOOD_CONNECTIONS);
    let mut tasks = Vec::new();
    for c in 0..FLOOD_CONNECTIONS {
        let start = from + c * per;
        let end = (start + per).min(to);
        tasks.push(tokio::spawn(async move {
            let (mut sent, mut allowed) = (0u64, 0u64);
            let mut conn = BufReader::new(connect(addr, ip("127.0.0.1")).await?);
            let mut next = start;
            while next < end && Instant::now() < deadline {
                let batch_end = (next + PIPELINE).min(end);
                let mut bytes = Vec::new();
                for i in next..batch_end {
                    bytes.extend(login_request(&[("x-forwarded-for", identity(i))]));
                }
                conn.get_mut().write_all(&bytes).await?;
                for _ in next..batch_end {
                    let reply = read_reply(&mut conn).await?;
                    sent += 1;
                    allowed += u64::from(reply.allowed());
                }
                next = batch_end;
            }
            Ok::<_, std::io::Error>((sent, allowed))
        }));
    }
    let (mut sent, mut allowed) = (0, 0);
    for task in tasks {
        let (s, a) = task.await??;
        sent += s;
        allowed += a;
    }
    Ok((sent, allowed))
}

/// The identifier flood's size and the example server's extra flags for it.
#[derive(Debug)]
struct FloodArgs {
    identities: u64,
    server_args: Vec<String>,
}

impl FloodArgs {
    /// `[--flood N] [--flood-server-args "ARGS"]` (ARGS: flags of the example server, e.g. a
    /// memory capacity small enough for the flood to reach).
    fn parse() -> Res<Self> {
        let mut flood = Self {
            identities: DEFAULT_IDENTITIES,
            server_args: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let value = args.next();
            match (arg.as_str(), value) {
                ("--flood", Some(n)) => flood.identities = n.parse()?,
                ("--flood-server-args", Some(text)) => {
                    flood.server_args = text.split_whitespace().map(str::to_owned).collect();
                }
                _ => {
                    return Err("usage: attack [--flood N] [--flood-server-args \"FLAGS\"]".into());
                }
            }
        }
        Ok(flood)
    }
}

/// A flag of the example server that sets the memory store's capacity, if `--help` lists one
/// (a long flag with "capacity" in its name), with a capacity the flood reaches in its first
/// phase: then the last phase shows whether memory stays flat at the cap.
fn capacity_flag(ctx: &Ctx) -> Vec<String> {
    let Ok(output) = Command::new(&ctx.bins.server).arg("--help").output() else {
        return Vec::new();
    };
    let help = String::from_utf8_lossy(&output.stdout);
    help.split_whitespace()
        .map(|word| word.trim_end_matches([',', '=']))
        .find(|word| word.starts_with("--") && word.contains("capacity"))
        .map(|flag| vec![flag.to_owned(), FLOOD_CAPACITY.to_string()])
        .unwrap_or_default()
}

async fn identifier_flood(ctx: &Ctx, flood: &FloodArgs) -> Res<Row> {
    let identities = flood.identities;
    let server_args = if flood.server_args.is_empty() {
        capacity_flag(ctx)
    } else {
        flood.server_args.clone()
    };
    eprintln!("[attack] identifier flood: {identities} identities (memory) {server_args:?}");
    let mut extra = vec!["--trust-proxy", "127.0.0.1"];
    extra.extend(server_args.iter().map(String::as_str));
    let server = Server::start(ctx, Backend::Memory, "127.0.0.1:0", &extra)?;
    let rss_before = server.rss_kib();
    let started = Instant::now();
    // Three phases of a third of the identities (or of the time) each; the server's RSS read
    // after each, and its growth per identity compared between the first and the last.
    let third = identities.div_ceil(3);
    let (mut sent, mut allowed) = (0, 0);
    let mut per_phase = Vec::new();
    let mut rss = rss_before;
    for part in 0..3 {
        let from = part * third;
        let to = ((part + 1) * third).min(identities);
        let deadline = Instant::now() + IDENTITY_FLOOD_MAX / 3;
        let (s, a) = flood_range(server.addr, from, to, deadline).await?;
        sent += s;
        allowed += a;
        let now_rss = server.rss_kib();
        per_phase.push((s, rss.zip(now_rss).map(|(b, a)| a.saturating_sub(b))));
        rss = now_rss;
    }
    let elapsed = started.elapsed();
    let rss_after = server.rss_kib();
    let growth_text = per_phase
        .iter()
        .map(|(n, grew)| format!("{n} → +{}", kib(*grew)))
        .collect::<Vec<_>>()
        .join(", ");
    let verdict = match (per_phase.first(), per_phase.last()) {
        (Some(&(n1, Some(g1))), Some(&(n3, Some(g3)))) if n1 > 0 && n3 > 0 => {
            // Flat at a cap: the last phase grows far less per identity than the first (with
            // 1 MiB of slack for the allocator's noise).
            let first_rate = g1 as f64 / n1 as f64;
            let last = g3 as f64;
            let flat = last <= first_rate * n3 as f64 / 4.0 + 1024.0;
            if flat { Verdict::Held } else { Verdict::Broken }
        }
        _ => Verdict::Info,
    };
    Ok(Row {
        attack: format!(
            "e. identifier flood: one login from each of {sent} distinct IPv6 /64s \
             (X-Forwarded-For from a trusted proxy){}",
            if server_args.is_empty() {
                String::new()
            } else {
                format!(", server flags `{}`", server_args.join(" "))
            }
        ),
        backend: "memory",
        sent,
        allowed,
        most: Some(most_allowed(elapsed, sent)),
        verdict,
        rss_before,
        rss_after,
        note: format!(
            "{:.1} s ({:.0} req/s); identities → RSS growth per phase: {growth_text}; held = the \
             last phase grows under a quarter of the first's per identity (memory flat at the \
             store's cap)",
            elapsed.as_secs_f64(),
            sent as f64 / elapsed.as_secs_f64().max(1e-9)
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// f. CLI edges

fn cli_edges(ctx: &Ctx) -> Res<Vec<Edge>> {
    let mut edges = Vec::new();
    let dir = std::env::temp_dir().join(format!("ratelimit-attack-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // `ratelimit --json rules check FILE | true`: stdout is a pipe whose reader is gone.
    {
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let run = cli(
            ctx,
            &["--json", "rules", "check", RULES_FILE],
            Stdio::from(writer),
        )?;
        let panicked = run.code == Some(101) || run.stderr.contains("panicked");
        edges.push(Edge {
            check: "`ratelimit --json rules check FILE | true` (stdout closed)".to_owned(),
            result: format!(
                "exit {}{}",
                run.code
                    .map_or_else(|| "by signal".to_owned(), |c| c.to_string()),
                if panicked { ", panicked" } else { "" }
            ),
            verdict: if panicked {
                Verdict::Broken
            } else {
                Verdict::Held
            },
        });
    }

    for (endpoint, should_pass) in [
        ("get /x ", false),
        ("GET  /x", false),
        (" GET /x", false),
        ("GET x", false),
        ("GET /x", true),
    ] {
        let file = dir.join("rules.toml");
        std::fs::write(&file, one_rule_text(endpoint))?;
        let path = file.to_string_lossy().into_owned();
        let run = cli(ctx, &["rules", "check", &path], Stdio::piped())?;
        let accepted = run.code == Some(0);
        // `rules check` reports an invalid file on stdout (it is the command's answer); other
        // failures go to stderr.
        let said = if accepted || run.stderr.is_empty() {
            &run.stdout
        } else {
            &run.stderr
        };
        edges.push(Edge {
            check: format!("`ratelimit rules check` of a rule named {endpoint:?}"),
            result: format!(
                "exit {}: {}",
                run.code
                    .map_or_else(|| "by signal".to_owned(), |c| c.to_string()),
                said.lines().next().unwrap_or_default()
            ),
            verdict: if accepted == should_pass {
                Verdict::Held
            } else {
                Verdict::Broken
            },
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(edges)
}

// ---------------------------------------------------------------------------------------------
// Output

fn kib(rss: Option<u64>) -> String {
    match rss {
        Some(kib) if kib >= 10 * 1024 => format!("{:.0} MiB", kib as f64 / 1024.0),
        Some(kib) => format!("{:.1} MiB", kib as f64 / 1024.0),
        None => "?".to_owned(),
    }
}

/// A table cell: no pipes, no line breaks.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn render(machine: &str, flood: &FloodArgs, rows: &[Row], edges: &[Edge]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "_Generated by `just attack`: {machine}._");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Target: the example server (`crates/http/examples/server.rs`, default settings unless \
         the attack names a flag) as its own process, rule `{LOGIN}` of \
         `crates/http/examples/rules.toml`: {MAX_TOKENS} tokens, {REFILL_RATE} per minute, per \
         client IP. \"Most allowed\" is what that rule lets the identities the attack really is \
         pass in the time it took: `max_tokens + elapsed × refill_rate / 60` per identity, in \
         whole requests. Identifier flood: {} identities asked for, in three phases of at most \
         {} s each.",
        flood.identities,
        IDENTITY_FLOOD_MAX.as_secs() / 3
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| Attack | Backend | Sent | Allowed | Most allowed | Verdict | Server RSS before → after | Notes |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|---|---|---|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} → {} | {} |",
            cell(&row.attack),
            row.backend,
            row.sent,
            row.allowed,
            row.most.map_or_else(|| "—".to_owned(), |m| m.to_string()),
            row.verdict.text(),
            kib(row.rss_before),
            kib(row.rss_after),
            cell(&row.note)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "| f. Edge | Result | Verdict |");
    let _ = writeln!(out, "|---|---|---|");
    for edge in edges {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            cell(&edge.check),
            cell(&edge.result),
            edge.verdict.text()
        );
    }
    out
}
