//! The Redis bucket store.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering, Ordering as AtomicOrdering};
use std::time::Duration;

use async_trait::async_trait;
use bb8_redis::bb8::{Pool, PooledConnection};
use futures_util::StreamExt;
use ratelimit_domain::token_bucket::{self, validate_now};
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketStore, ErrorCode, RateLimitError, RateLimitRule, Result,
};
use redis::{Cmd, ErrorKind, RedisResult, ServerErrorKind, Value};

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

/// The keys of one bucket: two in the specification's layout, one in the compact layout.
struct BucketKeys {
    first: String,
    second: Option<String>,
}

impl BucketKeys {
    /// `<key>:tokens` and `<key>:time` (or `<key>:tb` in the compact layout), wrapped as
    /// `{<key>}:…` with a hash tag. Keys never contain a literal `{` or `}` (they are escaped),
    /// so the tag is the key's only one.
    fn of(key: &BucketKey, hash_tag: bool, layout: KeyLayout) -> Self {
        let base = key.as_str();
        let with = |suffix: &str| {
            let mut out = String::with_capacity(base.len() + suffix.len() + 2);
            if hash_tag {
                out.push('{');
                out.push_str(base);
                out.push('}');
            } else {
                out.push_str(base);
            }
            out.push_str(suffix);
            out
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
        })
    }

    /// Like [`new`](Self::new), then checks that Redis answers a `PING` within the admin
    /// deadline.
    ///
    /// # Errors
    /// As [`new`](Self::new), or the error of the `PING`.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let store = Self::new(config)?;
        store.ping().await?;
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
    /// subscription is (re)established, since resets may have been missed meanwhile. The task
    /// reconnects by itself. Used to keep local deny caches exact; must be called within a Tokio
    /// runtime. Returns `None` on a cluster, where it is not supported.
    pub fn spawn_reset_listener<F>(&self, on_reset: F) -> Option<tokio::task::JoinHandle<()>>
    where
        F: Fn(Option<&str>) + Send + Sync + 'static,
    {
        let Manager::Single(client) = &self.manager else {
            tracing::warn!("reset notifications are not supported on a Redis Cluster");
            return None;
        };
        let client = client.clone();
        Some(tokio::spawn(async move {
            loop {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(RESET_CHANNEL).await {
                        Ok(()) => {
                            on_reset(None);
                            let mut messages = pubsub.on_message();
                            while let Some(message) = messages.next().await {
                                if let Ok(key) = message.get_payload::<String>() {
                                    on_reset(Some(&key));
                                }
                            }
                            tracing::debug!("reset subscription ended; reconnecting");
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot subscribe to reset notifications")
                        }
                    },
                    Err(err) => {
                        tracing::debug!(error = %err, "cannot connect for reset notifications")
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }))
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
        let started = tokio::time::Instant::now();
        let (conn, broken) = match tokio::time::timeout(timeout, checkout).await {
            Ok(checked_out) => checked_out?,
            Err(_) => return Err(deadline(operation, timeout)),
        };
        let left = timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, f(conn)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(err)) => {
                if breaks_connection(&err) {
                    // The pool drops the connection the next time it comes back.
                    broken.store(true, AtomicOrdering::Release);
                }
                Err(from_redis(err, operation))
            }
            Err(_) => {
                // A reply may still arrive late on this socket; do not trust it any more.
                broken.store(true, AtomicOrdering::Release);
                Err(deadline(operation, timeout))
            }
        }
    }

    /// Runs the script by its SHA; if Redis has lost it (restart, failover, `SCRIPT FLUSH`),
    /// runs it once more with `EVAL` and its full text, which also puts it back in Redis's
    /// script cache. Unlike `SCRIPT LOAD` + `EVALSHA`, this cannot lose a race with another
    /// flush, and it is routed to the key's node on a cluster.
    async fn eval(&self, mut conn: RedisConn, call: &ScriptCall) -> RedisResult<Value> {
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

    fn script_call(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        cost: u64,
        now: Option<f64>,
    ) -> Result<ScriptCall> {
        let now = match now {
            Some(now) => validate_now(now)?.to_string(),
            None => String::new(),
        };
        Ok(ScriptCall {
            keys: BucketKeys::of(key, self.hash_tag, self.layout),
            max_tokens: rule.max_tokens(),
            refill_rate: rule.refill_rate().to_string(),
            cost,
            now,
        })
    }
}

/// The keys and arguments of one script call (see docs/lua.md for the contract).
struct ScriptCall {
    keys: BucketKeys,
    max_tokens: u64,
    refill_rate: String,
    cost: u64,
    /// Seconds as a decimal string, or empty for Redis's `TIME`.
    now: String,
}

impl ScriptCall {
    /// `EVALSHA sha …`, or `EVAL <script> …` without a SHA.
    fn cmd(&self, sha: Option<&str>, script: &str) -> Cmd {
        let mut cmd = match sha {
            Some(sha) => {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(sha);
                cmd
            }
            None => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(script);
                cmd
            }
        };
        cmd.arg(self.keys.count()).arg(&self.keys.first);
        if let Some(second) = &self.keys.second {
            cmd.arg(second);
        }
        cmd.arg(self.max_tokens)
            .arg(&self.refill_rate)
            .arg(self.cost)
            .arg(&self.now);
        cmd
    }
}

/// Reads `[allowed, retry_after, remaining, …]`.
fn parse_reply(reply: &Value) -> Result<BucketDecision> {
    let Value::Array(items) = reply else {
        return Err(bad_reply(format!("{reply:?}")));
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

#[async_trait]
impl BucketStore for RedisStorage {
    async fn check_and_consume(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        cost: u64,
        now: Option<f64>,
    ) -> Result<BucketDecision> {
        let call = self.script_call(key, rule, cost, now)?;
        let reply = self
            .run("check_and_consume", self.check_timeout, |conn| {
                self.eval(conn, &call)
            })
            .await?;
        parse_reply(&reply)
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
            .await?;
        Ok(parse_reply(&reply)?.remaining)
    }

    async fn reset(&self, key: &BucketKey, _rule: &RateLimitRule) -> Result<()> {
        let keys = BucketKeys::of(key, self.hash_tag, self.layout);
        let mut cmd = redis::cmd("DEL");
        cmd.arg(&keys.first);
        if let Some(second) = &keys.second {
            cmd.arg(second);
        }
        self.run("reset", self.admin_timeout, |mut conn| async move {
            let _: i64 = cmd.query_async(&mut conn).await?;
            // Tell every host's deny cache; the reset itself has happened either way.
            let announced: RedisResult<i64> =
                redis::cmd("PUBLISH").arg(RESET_CHANNEL).arg(key.as_str()).query_async(&mut conn).await;
            if let Err(err) = announced {
                tracing::warn!(error = %err, "bucket reset, but the reset could not be announced to other hosts");
            }
            Ok(())
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
    fn malformed_replies_are_errors() {
        for reply in [
            Value::Nil,
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
                ErrorCode::StorageError,
                "{reply:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_bad_url_is_a_configuration_error() {
        let err = RedisStorage::new(&RedisConfig::new("definitely not a url")).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Configuration);
    }
}
