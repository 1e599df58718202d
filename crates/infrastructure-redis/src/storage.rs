//! The Redis bucket store.

use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, Ordering as AtomicOrdering};
use std::time::Duration;

use async_trait::async_trait;
use bb8_redis::bb8::{Pool, PooledConnection};
use futures_util::StreamExt;
use ratelimit_domain::token_bucket::{self, validate_now};
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, BucketStore, ErrorCode, RateLimitError,
    RateLimitRule, Result,
};
use redis::{Cmd, ErrorKind, RedisResult, RedisWrite, ServerErrorKind, ToRedisArgs, Value};

use crate::connection::{Manager, RedisConn, breaks_connection};
use crate::error::{bad_reply, deadline, from_pool, from_redis};
use crate::{KeyLayout, RedisConfig, TOKEN_BUCKET_COMPACT_SCRIPT, TOKEN_BUCKET_SCRIPT};

/// A token-bucket store on Redis. See the [crate docs](crate).
///
/// Cheap to share behind an `Arc`; all methods take `&self`.
pub struct RedisStorage {
    pool: Pool<Manager>,
    /// A copy of the pool's manager, for the dedicated pub/sub connection of
    /// [`RedisStorage::spawn_reset_listener`].
    manager: Manager,
    /// The script's SHA-1, computed here once; no round trip and no lock is needed to know it.
    script: redis::Script,
    check_timeout: Duration,
    admin_timeout: Duration,
    /// The URL with its password hidden, for `Debug` and errors.
    redacted_url: String,
    /// Redis Cluster: wrap each bucket's base key in a hash tag so both keys share a slot.
    hash_tag: bool,
    layout: KeyLayout,
    /// The text of the layout's script, for the `EVAL` resend after a `NOSCRIPT`.
    script_text: &'static str,
    script_reloads: AtomicU64,
    /// How often the reset listener pings its subscription.
    reset_ping_interval: Duration,
}

impl fmt::Debug for RedisStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStorage")
            .field("url", &self.redacted_url)
            .field("script_sha", &self.script.get_hash())
            .field("check_timeout", &self.check_timeout)
            .field("admin_timeout", &self.admin_timeout)
            .field("pool", &self.pool.state())
            .finish_non_exhaustive()
    }
}

/// The pub/sub channel on which resets are announced (the payload is the bucket key).
pub const RESET_CHANNEL: &str = "ratelimit:resets";

/// One Redis key of a bucket: `<key><suffix>`, or `{<key>}<suffix>` with a hash tag. Keys
/// never contain a literal `{` or `}` (they are escaped), so the tag is the key's only one.
///
/// Written straight into the command's buffer: no string is built per check.
#[derive(Debug, Clone, Copy)]
struct KeyArg<'a> {
    base: &'a str,
    hash_tag: bool,
    suffix: &'static str,
}

impl KeyArg<'_> {
    fn len(&self) -> usize {
        self.base.len() + self.suffix.len() + if self.hash_tag { 2 } else { 0 }
    }
}

impl ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut writer = out.writer_for_next_arg();
        let parts: [&[u8]; 4] = if self.hash_tag {
            [b"{", self.base.as_bytes(), b"}", self.suffix.as_bytes()]
        } else {
            [b"", self.base.as_bytes(), b"", self.suffix.as_bytes()]
        };
        for part in parts {
            // Writing into the command's Vec cannot fail.
            let _ = writer.write_all(part);
        }
    }
}

/// The keys of one bucket: `<key>:tokens` and `<key>:time` in the specification's layout,
/// `<key>:tb` in the compact layout.
#[derive(Debug, Clone, Copy)]
struct BucketKeys<'a> {
    first: KeyArg<'a>,
    second: Option<KeyArg<'a>>,
}

impl<'a> BucketKeys<'a> {
    fn of(key: &'a BucketKey, hash_tag: bool, layout: KeyLayout) -> Self {
        let with = |suffix| KeyArg {
            base: key.as_str(),
            hash_tag,
            suffix,
        };
        match layout {
            KeyLayout::Compact => Self {
                first: with(":tb"),
                second: None,
            },
            _ => Self {
                first: with(":tokens"),
                second: Some(with(":time")),
            },
        }
    }

    fn count(&self) -> usize {
        if self.second.is_some() { 2 } else { 1 }
    }

    /// Bytes of the keys.
    fn len(&self) -> usize {
        self.first.len() + self.second.map_or(0, |second| second.len())
    }
}

impl RedisStorage {
    /// A store for the given settings. Connections are opened on first use, so this succeeds
    /// while Redis is down (checks then fail until it is back).
    ///
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    /// [`ErrorCode::Configuration`] when the URL cannot be parsed or the CA file cannot be read.
    pub fn new(config: &RedisConfig) -> Result<Self> {
        // rediss:// needs a rustls crypto provider; installing ring's is a no-op when the
        // process already chose one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let redacted_url = config.redacted_url();
        let manager = Manager::new(config)?;
        let script_text = match config.layout {
            KeyLayout::Compact => TOKEN_BUCKET_COMPACT_SCRIPT,
            _ => TOKEN_BUCKET_SCRIPT,
        };
        let pool = Pool::builder()
            .max_size(config.pool_size.max(1))
            // A PING per checkout would double the round trips; failed connections are
            // dropped on return instead (see connection.rs).
            .test_on_check_out(false)
            // A failed connect is not retried in the background with bb8's backoff (0.4 s, then
            // 0.8 s, …): the next check starts a fresh attempt, so limiting resumes as soon as
            // Redis answers again.
            .retry_connection(false)
            .connection_timeout(config.admin_timeout.max(config.check_timeout))
            .build_unchecked(manager.clone());
        Ok(Self {
            pool,
            manager,
            script: redis::Script::new(script_text),
            script_text,
            layout: config.layout,
            check_timeout: config.check_timeout,
            admin_timeout: config.admin_timeout,
            redacted_url,
            hash_tag: config.is_cluster(),
            script_reloads: AtomicU64::new(0),
            reset_ping_interval: config.reset_ping_interval,
        })
    }

    /// Like [`new`](Self::new), then checks within the admin deadline that Redis answers and
    /// is a version the scripts run on ([`check_version`](Self::check_version)).
    ///
    /// # Errors
    /// As [`new`](Self::new); [`ErrorCode::Configuration`] for a Redis older than 5.0; or the
    /// error of the `INFO` (Redis unreachable or too slow).
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let store = Self::new(config)?;
        store.check_version().await?;
        Ok(store)
    }

    /// Asks Redis for a `PING`, within the admin deadline.
    ///
    /// # Errors
    /// `StorageUnavailable` or `StorageTimeout` when Redis does not answer.
    pub async fn ping(&self) -> Result<()> {
        self.run("ping", self.admin_timeout, |mut conn| async move {
            let _: Value = redis::cmd("PING").query_async(&mut conn).await?;
            Ok(())
        })
        .await
    }

    /// How many times Redis had lost the script and it was loaded again.
    pub fn script_reloads(&self) -> u64 {
        self.script_reloads.load(Ordering::Relaxed)
    }

    /// Spawns a task that listens on [`RESET_CHANNEL`] and calls `on_reset` with the key of
    /// every bucket reset through this library (by any host), and with `None` each time the
    /// subscription is (re)established, since resets may have been missed meanwhile. Used to
    /// keep local deny caches exact; must be called within a Tokio runtime. Returns `None` on a
    /// cluster, where it is not supported.
    ///
    /// The task keeps its subscription alive by itself: every
    /// [`RedisConfig::reset_ping_interval`] it sends a `PING` on the subscribed connection, and
    /// when no answer comes within [`RedisConfig::admin_timeout`] (a connection silently dropped
    /// by a NAT or a firewall, a frozen server) or the connection closes, it drops the connection
    /// and subscribes again on a new one, waiting 0.1 s, then twice as long after each failed
    /// attempt, up to 5 s.
    pub fn spawn_reset_listener<F>(&self, on_reset: F) -> Option<tokio::task::JoinHandle<()>>
    where
        F: Fn(Option<&str>) + Send + Sync + 'static,
    {
        let Manager::Single {
            client,
            connect_timeout,
        } = &self.manager
        else {
            tracing::warn!("reset notifications are not supported on a Redis Cluster");
            return None;
        };
        let listener = ResetListener {
            client: client.clone(),
            connect_timeout: *connect_timeout,
            ping_every: self.reset_ping_interval,
            ping_timeout: self.admin_timeout,
        };
        Some(tokio::spawn(listener.run(on_reset)))
    }

    /// Checks that Redis (every primary of a cluster) is a version the scripts run on: 5.0 or
    /// later, where scripts replicate their effects by default. The scripts read `TIME` and then
    /// write, which Redis before 5.0 refuses under its default script replication, so every
    /// check would fail (and, failing open, limit nothing).
    ///
    /// When `INFO` is refused (renamed or denied by an ACL), the version is not known: a warning
    /// is logged and only a `PING` is checked.
    ///
    /// # Errors
    /// [`ErrorCode::Configuration`] for a Redis older than 5.0; `StorageUnavailable` or
    /// `StorageTimeout` when Redis does not answer within the admin deadline.
    pub async fn check_version(&self) -> Result<()> {
        let info = self
            .run("info", self.admin_timeout, |mut conn| async move {
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await;
        let info = match info {
            Ok(info) => info,
            Err(err) if err.code() == ErrorCode::StorageError => {
                tracing::warn!(
                    error = %err,
                    "cannot read the redis version (INFO server refused); Redis 5.0 or later is needed"
                );
                return self.ping().await;
            }
            Err(err) => return Err(err),
        };
        let mut texts = Vec::new();
        collect_text(&info, &mut texts);
        if texts.is_empty() {
            tracing::warn!(reply = ?info, "cannot read the redis version from INFO server");
        }
        for text in texts {
            check_supported(&text)
                .map_err(|err| err.with_detail("url", self.redacted_url.clone()))?;
        }
        Ok(())
    }

    /// The SHA-1 of the token-bucket script, as `EVALSHA` names it.
    pub fn script_sha(&self) -> &str {
        self.script.get_hash()
    }

    /// Runs one operation on a pooled connection within `timeout`, taking the connection
    /// included, and marks the connection for disposal unless the operation answered.
    async fn run<T, F, Fut>(&self, operation: &'static str, timeout: Duration, f: F) -> Result<T>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        // The pool hands out a connection only to clone its handle: the guard goes back at
        // once, so any number of concurrent checks share the pool's multiplexed connections
        // (pipelining on the socket) instead of queueing for one each.
        let checkout = async {
            loop {
                let pooled: PooledConnection<'_, Manager> = self
                    .pool
                    .get()
                    .await
                    .map_err(|err| from_pool(err, operation))?;
                // A connection another check saw fail is dropped as its guard goes back; take
                // the next one (or a new one) instead of failing on it too.
                if !pooled.broken.load(AtomicOrdering::Acquire) {
                    return Ok::<_, RateLimitError>((pooled.conn.clone(), pooled.broken.clone()));
                }
            }
        };
        // One deadline (one timer) covers the checkout and the command.
        let mut in_flight: Option<Arc<AtomicBool>> = None;
        let operation_future = async {
            let (conn, broken) = checkout.await?;
            let flag = in_flight.insert(broken);
            match f(conn).await {
                Ok(reply) => Ok(reply),
                Err(err) => {
                    if breaks_connection(&err) {
                        // The pool drops the connection the next time it comes back.
                        flag.store(true, AtomicOrdering::Release);
                    }
                    Err(from_redis(err, operation))
                }
            }
        };
        let outcome = tokio::time::timeout(timeout, operation_future).await;
        outcome.unwrap_or_else(|_| {
            if let Some(broken) = &in_flight {
                // A reply may still arrive late on this socket; do not trust it any more.
                broken.store(true, AtomicOrdering::Release);
            }
            Err(deadline(operation, timeout))
        })
    }

    /// Runs the script by its SHA; if Redis has lost it (restart, failover, `SCRIPT FLUSH`),
    /// runs it once more with `EVAL` and its full text, which also puts it back in Redis's
    /// script cache. Unlike `SCRIPT LOAD` + `EVALSHA`, this cannot lose a race with another
    /// flush, and it is routed to the key's node on a cluster.
    async fn eval(&self, mut conn: RedisConn, call: &ScriptCall<'_>) -> RedisResult<Value> {
        match call
            .cmd(Some(self.script.get_hash()), self.script_text)
            .query_async(&mut conn)
            .await
        {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let reloads = self.script_reloads.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    sha = self.script.get_hash(),
                    reloads,
                    "redis had lost the token-bucket script; sending it again"
                );
                call.cmd(None, self.script_text)
                    .query_async(&mut conn)
                    .await
            }
            other => other,
        }
    }

    fn script_call<'a>(
        &self,
        key: &'a BucketKey,
        rule: &RateLimitRule,
        cost: u64,
        now: Option<f64>,
    ) -> Result<ScriptCall<'a>> {
        let now = now.map(validate_now).transpose()?;
        Ok(ScriptCall {
            keys: BucketKeys::of(key, self.hash_tag, self.layout),
            max_tokens: rule.max_tokens(),
            refill_rate: rule.refill_rate(),
            cost,
            now,
            // The compact script takes the key lifetime ready-made rather than computing and
            // formatting it in Lua (see lua/token_bucket_compact.lua).
            ttl: (self.layout == KeyLayout::Compact).then(|| rule.storage_ttl_seconds()),
        })
    }
}

/// The keys and arguments of one script call (see docs/lua.md for the contract).
#[derive(Debug, Clone, Copy)]
struct ScriptCall<'a> {
    keys: BucketKeys<'a>,
    max_tokens: u64,
    refill_rate: f64,
    cost: u64,
    /// Seconds since the epoch, or `None` for Redis's `TIME` (an empty argument to the
    /// specification's script, no argument to the compact one).
    now: Option<f64>,
    /// The key lifetime, for the compact script only.
    ttl: Option<u64>,
}

impl ScriptCall<'_> {
    /// `EVALSHA sha …`, or `EVAL <script> …` without a SHA.
    ///
    /// Numbers go in as redis-rs writes them (`itoa` for integers, `ryu` for `refill_rate` and
    /// `now`: the shortest text that reads back as the same double, so Lua's `tonumber` sees
    /// exactly the rule's value). The buffer is sized once, so building the command is one
    /// allocation per buffer.
    fn cmd(&self, sha: Option<&str>, script: &str) -> Cmd {
        // EVALSHA/EVAL, sha or script, key count, keys, then the arguments: at most four
        // numbers of at most 24 bytes each (the compact script's packed argument is at most 44
        // bytes, plus `now`).
        let head = sha.map_or(script.len(), str::len);
        let mut cmd = Cmd::with_capacity(9, 8 + head + 1 + self.keys.len() + 5 * 24);
        match sha {
            Some(sha) => cmd.arg("EVALSHA").arg(sha),
            None => cmd.arg("EVAL").arg(script),
        };
        cmd.arg(self.keys.count()).arg(self.keys.first);
        if let Some(second) = self.keys.second {
            cmd.arg(second);
        }
        match self.ttl {
            None => {
                cmd.arg(self.max_tokens)
                    .arg(self.refill_rate)
                    .arg(self.cost);
                // An empty `now` means Redis's `TIME`.
                match self.now {
                    Some(now) => cmd.arg(now),
                    None => cmd.arg(""),
                };
            }
            Some(ttl) => {
                let args =
                    crate::CompactArgs::new(self.max_tokens, self.refill_rate, self.cost, ttl);
                cmd.arg(args.as_bytes());
                // No `now` argument means Redis's `TIME`: one argument fewer for Lua to copy.
                if let Some(now) = self.now {
                    cmd.arg(now);
                }
            }
        }
        cmd
    }
}

/// Reads `[allowed, retry_after, remaining, …]`, or the compact script's bare `remaining` of
/// an allowed check.
fn parse_reply(reply: &Value) -> Result<BucketDecision> {
    let items = match reply {
        Value::Array(items) => items,
        Value::Int(remaining) => {
            let remaining = u64::try_from(*remaining)
                .map_err(|_| bad_reply(format!("remaining = {remaining}")))?;
            return Ok(BucketDecision {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining,
            });
        }
        _ => return Err(bad_reply(format!("{reply:?}"))),
    };
    let [allowed, retry_after, remaining, ..] = items.as_slice() else {
        return Err(bad_reply(format!("{reply:?}")));
    };
    let allowed = match allowed {
        Value::Int(0) => false,
        Value::Int(1) => true,
        other => return Err(bad_reply(format!("allowed = {other:?}"))),
    };
    let retry_after = match retry_after {
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse::<f64>().ok()),
        Value::SimpleString(s) => s.parse::<f64>().ok(),
        Value::Int(i) => Some(*i as f64),
        _ => None,
    }
    .filter(|secs| *secs >= 0.0)
    .ok_or_else(|| bad_reply(format!("retry_after = {retry_after:?}")))?;
    let remaining = match remaining {
        Value::Int(n) => u64::try_from(*n).map_err(|_| bad_reply(format!("remaining = {n}")))?,
        other => return Err(bad_reply(format!("remaining = {other:?}"))),
    };
    Ok(BucketDecision {
        allowed,
        retry_after: token_bucket::seconds(retry_after),
        remaining,
    })
}

/// The oldest Redis the scripts run on, as (major, minor).
const MIN_VERSION: (u64, u64) = (5, 0);

/// The text of an `INFO` reply: a bulk or verbatim string from one Redis, a map of them (node
/// → reply) from a cluster.
fn collect_text(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::BulkString(bytes) => out.push(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => out.push(text.clone()),
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|item| collect_text(item, out));
        }
        Value::Map(pairs) => pairs.iter().for_each(|(_, item)| collect_text(item, out)),
        _ => {}
    }
}

/// The `redis_version` of an `INFO server` text, as (major, minor, patch).
fn parse_version(info: &str) -> Option<(u64, u64, u64)> {
    let version = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))?;
    let mut parts = version
        .trim()
        .split('.')
        .map(|part| part.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next().unwrap_or(Some(0))?;
    let patch = parts.next().unwrap_or(Some(0))?;
    Some((major, minor, patch))
}

/// `Ok` for a supported version (or one that cannot be read, with a warning), a
/// `Configuration` error naming the version and why it is not supported otherwise.
fn check_supported(info: &str) -> Result<()> {
    let Some((major, minor, patch)) = parse_version(info) else {
        tracing::warn!("cannot read redis_version from INFO server; Redis 5.0 or later is needed");
        return Ok(());
    };
    if (major, minor) >= MIN_VERSION {
        return Ok(());
    }
    Err(RateLimitError::new(
        ErrorCode::Configuration,
        format!(
            "Redis {major}.{minor}.{patch} is not supported: the token-bucket scripts read TIME \
             and then write, which needs script effects replication, the default from Redis \
             5.0 on; upgrade to Redis 5.0 or later"
        ),
    )
    .with_detail("redis_version", format!("{major}.{minor}.{patch}")))
}

/// The task behind [`RedisStorage::spawn_reset_listener`].
struct ResetListener {
    client: redis::Client,
    connect_timeout: Duration,
    ping_every: Duration,
    ping_timeout: Duration,
}

impl ResetListener {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);

    async fn run<F>(self, on_reset: F)
    where
        F: Fn(Option<&str>) + Send + Sync,
    {
        let mut backoff = Self::FIRST_BACKOFF;
        loop {
            match self.subscribe().await {
                Ok(pubsub) => {
                    // Resets may have been missed while there was no subscription.
                    on_reset(None);
                    if self.listen(pubsub, &on_reset).await {
                        backoff = Self::FIRST_BACKOFF;
                    }
                }
                Err(err) => {
                    tracing::debug!(error = %err, "cannot subscribe to reset notifications");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Self::MAX_BACKOFF);
        }
    }

    /// A new connection, subscribed to [`RESET_CHANNEL`], within the connect deadline.
    async fn subscribe(&self) -> std::result::Result<redis::aio::PubSub, String> {
        let subscribed = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(RESET_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(self.connect_timeout, subscribed).await {
            Ok(result) => result.map_err(|err| err.to_string()),
            Err(_) => Err(format!("no subscription within {:?}", self.connect_timeout)),
        }
    }

    /// Passes the notifications on until the connection closes or a `PING` goes unanswered.
    /// Returns whether the connection worked for a while (a `PING` answered or a message
    /// received), so that the next attempt may start without waiting long.
    async fn listen<F>(&self, pubsub: redis::aio::PubSub, on_reset: &F) -> bool
    where
        F: Fn(Option<&str>) + Send + Sync,
    {
        let (mut sink, mut stream) = pubsub.split();
        let mut healthy = false;
        let mut ticks = tokio::time::interval(self.ping_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the first PING goes one interval after subscribing.
        ticks.tick().await;
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => {
                        healthy = true;
                        if let Ok(key) = message.get_payload::<String>() {
                            on_reset(Some(&key));
                        }
                    }
                    None => {
                        tracing::warn!("reset subscription closed; subscribing again");
                        return healthy;
                    }
                },
                _ = ticks.tick() => {
                    match tokio::time::timeout(self.ping_timeout, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => healthy = true,
                        Ok(Err(err)) => {
                            tracing::warn!(error = %err, "reset subscription failed; subscribing again");
                            return healthy;
                        }
                        Err(_) => {
                            tracing::warn!(
                                timeout = ?self.ping_timeout,
                                "reset subscription did not answer a PING; subscribing again"
                            );
                            return healthy;
                        }
                    }
                }
            }
        }
    }
}

/// Adds the bucket's key to an error about that bucket's data.
fn name_corrupt_bucket(err: RateLimitError, key: &BucketKey) -> RateLimitError {
    if err.code() == ErrorCode::CorruptBucket {
        err.with_detail("key", key.as_str())
    } else {
        err
    }
}

#[async_trait]
impl BucketStore for RedisStorage {
    async fn check_and_consume<'a>(&self, request: &BucketRequest<'a>) -> Result<BucketDecision> {
        let BucketRequest {
            key,
            rule,
            cost,
            now,
            ..
        } = *request;
        let call = self.script_call(key, rule, cost, now)?;
        let reply = self
            .run("check_and_consume", self.check_timeout, |conn| {
                self.eval(conn, &call)
            })
            .await
            .map_err(|err| name_corrupt_bucket(err, key))?;
        parse_reply(&reply).map_err(|err| name_corrupt_bucket(err, key))
    }

    async fn get_remaining(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        now: Option<f64>,
    ) -> Result<u64> {
        let call = self.script_call(key, rule, 0, now)?;
        let reply = self
            .run("get_remaining", self.check_timeout, |conn| {
                self.eval(conn, &call)
            })
            .await
            .map_err(|err| name_corrupt_bucket(err, key))?;
        parse_reply(&reply)
            .map(|decision| decision.remaining)
            .map_err(|err| name_corrupt_bucket(err, key))
    }

    async fn reset(&self, key: &BucketKey, _rule: &RateLimitRule) -> Result<bool> {
        let keys = BucketKeys::of(key, self.hash_tag, self.layout);
        let mut cmd = redis::cmd("DEL");
        cmd.arg(keys.first);
        if let Some(second) = keys.second {
            cmd.arg(second);
        }
        self.run("reset", self.admin_timeout, |mut conn| async move {
            let deleted: i64 = cmd.query_async(&mut conn).await?;
            // Tell every host's deny cache; the reset itself has happened either way.
            let announced: RedisResult<i64> =
                redis::cmd("PUBLISH").arg(RESET_CHANNEL).arg(key.as_str()).query_async(&mut conn).await;
            if let Err(err) = announced {
                tracing::warn!(error = %err, "bucket reset, but the reset could not be announced to other hosts");
            }
            Ok(deleted > 0)
        })
        .await
        .map_err(|err| {
            err.recoded(ErrorCode::ResetFailed)
                .with_detail("key", key.as_str())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_with_full_precision() {
        let reply = Value::Array(vec![
            Value::Int(0),
            Value::BulkString(b"11.75".to_vec()),
            Value::Int(0),
            Value::Nil,
        ]);
        let decision = parse_reply(&reply).unwrap();
        assert!(!decision.allowed);
        assert_eq!(decision.retry_after, Duration::from_millis(11_750));
        let never = Value::Array(vec![
            Value::Int(0),
            Value::BulkString(b"inf".to_vec()),
            Value::Int(3),
        ]);
        assert!(parse_reply(&never).unwrap().is_never());
    }

    #[test]
    fn a_bare_integer_is_an_allowed_check_of_the_compact_script() {
        let decision = parse_reply(&Value::Int(41)).unwrap();
        assert!(decision.allowed);
        assert_eq!(decision.retry_after, Duration::ZERO);
        assert_eq!(decision.remaining, 41);
    }

    #[test]
    fn commands_carry_the_keys_and_numbers_exactly() {
        let key = BucketKey::new(
            ratelimit_domain::RateLimitScope::Ip,
            "2001:db8::1",
            "GET /x",
        )
        .unwrap();
        let rule = RateLimitRule::new(ratelimit_domain::RateLimitScope::Ip, 10, 0.1).unwrap();
        let args = |call: ScriptCall<'_>| -> Vec<String> {
            call.cmd(Some("abc"), "")
                .args_iter()
                .map(|arg| match arg {
                    redis::Arg::Simple(bytes) => {
                        String::from_utf8(bytes.to_vec()).unwrap_or_else(|_| format!("{bytes:?}"))
                    }
                    other => panic!("unexpected argument {other:?}"),
                })
                .collect()
        };
        let spec = ScriptCall {
            keys: BucketKeys::of(&key, false, KeyLayout::Specification),
            max_tokens: rule.max_tokens(),
            refill_rate: rule.refill_rate(),
            cost: 3,
            now: Some(1_700_000_000.125),
            ttl: None,
        };
        assert_eq!(
            args(spec),
            [
                "EVALSHA",
                "abc",
                "2",
                "rate_limit:ip:2001:db8::1:GET /x:tokens",
                "rate_limit:ip:2001:db8::1:GET /x:time",
                "10",
                "0.1",
                "3",
                "1700000000.125",
            ]
        );
        let compact = ScriptCall {
            keys: BucketKeys::of(&key, true, KeyLayout::Compact),
            now: None,
            ttl: Some(rule.storage_ttl_seconds()),
            ..spec
        };
        let mut packed = Vec::new();
        for number in [10.0_f64, 0.1, 3.0] {
            packed.extend_from_slice(&number.to_le_bytes());
        }
        packed.extend_from_slice(b"6060");
        assert_eq!(crate::CompactArgs::new(10, 0.1, 3, 6060).as_bytes(), packed);
        assert_eq!(
            args(compact),
            [
                "EVALSHA".to_owned(),
                "abc".to_owned(),
                "1".to_owned(),
                "{rate_limit:ip:2001:db8::1:GET /x}:tb".to_owned(),
                format!("{:?}", &packed[..]),
            ]
        );
        // An explicit `now` follows as the second argument.
        let at = args(ScriptCall {
            now: Some(1_700_000_000.125),
            ..compact
        });
        assert_eq!(at.len(), 6);
        assert_eq!(at[5], "1700000000.125");
        for ttl in [0, 7, 60, 6060, u64::MAX] {
            let bytes = crate::CompactArgs::new(1, 1.0, 1, ttl);
            assert_eq!(&bytes.as_bytes()[24..], ttl.to_string().as_bytes());
        }
        // Every rate reads back as the same double in Lua (strtod of the shortest text).
        for rate in [0.1, 1.0 / 3.0, 1e-7, 5.0, 1e20, 123_456.789] {
            let call = ScriptCall {
                refill_rate: rate,
                ..spec
            };
            assert_eq!(args(call)[6].parse::<f64>().unwrap(), rate);
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        for reply in [
            Value::Nil,
            Value::Int(-1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![
                Value::Int(2),
                Value::BulkString(b"0".to_vec()),
                Value::Int(1),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"x".to_vec()),
                Value::Int(1),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"-1".to_vec()),
                Value::Int(1),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"0".to_vec()),
                Value::Int(-1),
            ]),
        ] {
            assert_eq!(
                parse_reply(&reply).unwrap_err().code(),
                ErrorCode::CorruptBucket,
                "{reply:?}"
            );
        }
    }

    #[test]
    fn extreme_replies_are_corrupt_buckets_or_never_not_panics() {
        // What a script fed garbage used to answer: floor(-1e308) and floor(NaN) reach the
        // client as i64::MIN.
        for reply in [
            Value::Int(i64::MIN),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(b"nan".to_vec()),
                Value::Int(0),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(b"-inf".to_vec()),
                Value::Int(0),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(b"1".to_vec()),
                Value::Int(i64::MIN),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(vec![0xFF, 0xFE]),
                Value::Int(0),
            ]),
        ] {
            assert_eq!(
                parse_reply(&reply).unwrap_err().code(),
                ErrorCode::CorruptBucket,
                "{reply:?}"
            );
        }
        for wait in ["1e308", "1e400", "inf", "18446744073709551616"] {
            let reply = Value::Array(vec![
                Value::Int(0),
                Value::BulkString(wait.as_bytes().to_vec()),
                Value::Int(i64::MAX),
            ]);
            let decision = parse_reply(&reply).unwrap();
            assert!(decision.is_never(), "{wait}");
            assert_eq!(decision.remaining, i64::MAX as u64);
        }
    }

    #[test]
    fn costs_above_capacity_are_sent_as_infinity_to_the_compact_script() {
        let number = |args: &crate::CompactArgs, i: usize| {
            let mut chunk = [0_u8; 8];
            chunk.copy_from_slice(&args.as_bytes()[i * 8..i * 8 + 8]);
            f64::from_le_bytes(chunk)
        };
        let max = 1_u64 << 53;
        // 2^53 + 1 as a double is 2^53, which the script would take for an affordable cost.
        for cost in [max + 1, u64::MAX] {
            let args = crate::CompactArgs::new(max, 1e12, cost, 60);
            assert_eq!(number(&args, 2), f64::INFINITY, "cost {cost}");
        }
        let args = crate::CompactArgs::new(max, 1e12, max, 60);
        assert_eq!(number(&args, 2), max as f64);
        let args = crate::CompactArgs::new(5, 5.0, 6, 120);
        assert_eq!(number(&args, 2), f64::INFINITY);
    }

    #[test]
    fn redis_versions_are_read_from_info_and_old_ones_refused() {
        let info = |version: &str| {
            format!("# Server\r\nredis_version:{version}\r\nredis_git_sha1:00000000\r\n")
        };
        assert_eq!(parse_version(&info("7.0.15")), Some((7, 0, 15)));
        assert_eq!(parse_version(&info("5.0.0")), Some((5, 0, 0)));
        assert_eq!(parse_version(&info("4.0.14")), Some((4, 0, 14)));
        assert_eq!(parse_version(&info("7.2")), Some((7, 2, 0)));
        assert_eq!(parse_version(&info("255.255.255")), Some((255, 255, 255)));
        assert_eq!(parse_version(&info("seven")), None);
        assert_eq!(parse_version(&info("")), None);
        assert_eq!(parse_version("# Server\r\nprocess_id:1\r\n"), None);

        for supported in [
            "5.0.0", "5.0.14", "6.2.6", "7.0.15", "7.4.1", "8.0.0", "10.1",
        ] {
            assert!(check_supported(&info(supported)).is_ok(), "{supported}");
        }
        for old in ["4.0.14", "3.2.12", "2.8.24", "4.9.104"] {
            let err = check_supported(&info(old)).unwrap_err();
            assert_eq!(err.code(), ErrorCode::Configuration, "{old}");
            assert!(err.message().contains(old), "{}", err.message());
            assert!(err.message().contains("5.0"), "{}", err.message());
            assert!(err.message().contains("TIME"), "{}", err.message());
        }
        // Unreadable: not refused (a warning is logged).
        assert!(check_supported("no version here").is_ok());

        // One Redis answers a string; a cluster a map of them, one per primary.
        let mut texts = Vec::new();
        collect_text(
            &Value::Map(vec![
                (
                    Value::SimpleString("a:7000".into()),
                    Value::BulkString(info("7.0.15").into_bytes()),
                ),
                (
                    Value::SimpleString("b:7001".into()),
                    Value::VerbatimString {
                        format: redis::VerbatimFormat::Text,
                        text: info("4.0.1"),
                    },
                ),
            ]),
            &mut texts,
        );
        assert_eq!(texts.len(), 2);
        assert!(texts.iter().any(|text| check_supported(text).is_err()));
    }

    #[tokio::test]
    async fn a_bad_url_is_a_configuration_error() {
        let err = RedisStorage::new(&RedisConfig::new("definitely not a url")).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Configuration);
    }
}
