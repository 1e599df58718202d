//! The Redis bucket store: [`RedisStorage`] and its [`BucketStore`] implementation.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, BucketStore, ErrorCode, RateLimitRule, Result,
};
use redis::{RedisResult, Value};

use crate::coalesce::{Coalescer, CoalescingStats, Turn};
use crate::connection::{Connections, Manager};
use crate::error::name_corrupt_bucket;
use crate::keys::BucketKeys;
use crate::listener::{RESET_CHANNEL, ResetListener};
use crate::multi::MultiCheck;
use crate::reply::parse_reply;
use crate::script::{BuildCmd, ScriptCall, TokenBucketScript};
use crate::version::check_info_reply;
use crate::{KeyLayout, RedisConfig};

/// A token-bucket store on Redis. See the [crate docs](crate).
///
/// Cheap to share behind an `Arc`; all methods take `&self`.
pub struct RedisStorage {
    connections: Connections,
    /// The layout's script.
    script: TokenBucketScript,
    /// The layout's multi-bucket script ([`BucketStore::check_and_consume_all`]).
    pub(crate) multi_script: TokenBucketScript,
    /// The layout's give-back script (Redis Cluster only).
    pub(crate) give_back_script: TokenBucketScript,
    check_timeout: Duration,
    admin_timeout: Duration,
    /// The URL with its password hidden, for `Debug` and errors.
    redacted_url: String,
    /// Redis Cluster: wrap each bucket's base key in a hash tag so both keys share a slot.
    hash_tag: bool,
    layout: KeyLayout,
    /// How often the reset listener pings its subscription.
    reset_ping_interval: Duration,
    /// Checks that wait while calls are in flight go to Redis together (`None`: coalescing
    /// off).
    coalescer: Option<Coalescer>,
}

impl fmt::Debug for RedisStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStorage")
            .field("url", &self.redacted_url)
            .field("script_sha", &self.script.sha())
            .field("check_timeout", &self.check_timeout)
            .field("admin_timeout", &self.admin_timeout)
            .field("pool", &self.connections.state())
            .finish_non_exhaustive()
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
        let connections = Connections::new(config)?;
        let coalescer = config.coalescing.then(|| {
            Coalescer::new(
                connections.clone(),
                config.layout,
                config.is_cluster(),
                config.check_timeout,
            )
        });
        Ok(Self {
            connections,
            coalescer,
            script: TokenBucketScript::of(config.layout),
            multi_script: TokenBucketScript::multi(config.layout),
            give_back_script: TokenBucketScript::give_back(config.layout),
            layout: config.layout,
            check_timeout: config.check_timeout,
            admin_timeout: config.admin_timeout,
            redacted_url: config.redacted_url(),
            hash_tag: config.is_cluster(),
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
        self.connections
            .run("ping", self.admin_timeout, |mut conn| async move {
                let _: Value = redis::cmd("PING").query_async(&mut conn).await?;
                Ok(())
            })
            .await
    }

    /// How many times Redis had lost one of the store's scripts (the token-bucket script, or
    /// the multi-bucket and give-back scripts of multi-limit checks) and it was loaded again.
    pub fn script_reloads(&self) -> u64 {
        self.script.reloads()
            + self.multi_script.reloads()
            + self.give_back_script.reloads()
            + self.coalescer.as_ref().map_or(0, Coalescer::reloads)
    }

    /// How many checks went to Redis in batches ([`RedisConfig::with_coalescing`]); all zero
    /// when coalescing is off.
    pub fn coalescing_stats(&self) -> CoalescingStats {
        self.coalescer
            .as_ref()
            .map(Coalescer::stats)
            .unwrap_or_default()
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
        } = self.connections.manager()
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
    /// check would fail.
    ///
    /// When `INFO` is refused (renamed or denied by an ACL), the version is not known: a warning
    /// is logged and only a `PING` is checked.
    ///
    /// # Errors
    /// [`ErrorCode::Configuration`] for a Redis older than 5.0; `StorageUnavailable` or
    /// `StorageTimeout` when Redis does not answer within the admin deadline.
    pub async fn check_version(&self) -> Result<()> {
        let info = self
            .connections
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
        check_info_reply(&info).map_err(|err| err.with_detail("url", self.redacted_url.clone()))
    }

    /// The SHA-1 of the token-bucket script, as `EVALSHA` names it.
    pub fn script_sha(&self) -> &str {
        self.script.sha()
    }

    /// The script call of one check (`cost` 0: a read) of `key`'s bucket.
    fn script_call<'a>(
        &self,
        key: &'a BucketKey,
        rule: &RateLimitRule,
        cost: u64,
        now: Option<f64>,
    ) -> Result<ScriptCall<'a>> {
        ScriptCall::new(key, self.layout, self.hash_tag, rule, cost, now)
    }

    /// Runs `call`, within the check deadline.
    async fn eval(&self, operation: &'static str, call: &ScriptCall<'_>) -> Result<Value> {
        self.eval_script(&self.script, operation, call).await
    }

    /// Runs `call` of `script`, within the check deadline.
    pub(crate) async fn eval_script<C: BuildCmd>(
        &self,
        script: &TokenBucketScript,
        operation: &'static str,
        call: &C,
    ) -> Result<Value> {
        self.connections
            .run(operation, self.check_timeout, |conn| {
                script.eval(conn, call)
            })
            .await
    }

    /// One check, by one call of the single-check script.
    async fn check_alone(&self, request: &BucketRequest<'_>) -> Result<BucketDecision> {
        let BucketRequest {
            key,
            rule,
            cost,
            now,
            ..
        } = *request;
        let call = self.script_call(key, rule, cost, now)?;
        let reply = self
            .eval("check_and_consume", &call)
            .await
            .map_err(|err| name_corrupt_bucket(err, key))?;
        parse_reply(&reply).map_err(|err| name_corrupt_bucket(err, key))
    }
}

impl RedisStorage {
    /// One check through the coalescer: alone while few calls are in flight, else in a batch.
    async fn check_coalesced(
        &self,
        coalescer: &Coalescer,
        request: &BucketRequest<'_>,
    ) -> Result<BucketDecision> {
        match coalescer.enter(request)? {
            Turn::Alone(slot) => {
                // Boxed: only this branch pays for the single call's (large) future.
                let decision = Box::pin(self.check_alone(request)).await;
                drop(slot);
                decision
            }
            Turn::Queued(answer) => answer.wait().await,
        }
    }
}

#[async_trait]
impl BucketStore for RedisStorage {
    // Written as `#[async_trait]` expands it, to box the future of the path taken only: the
    // single call's future is large, a queued check's small, and every check's future is
    // allocated and moved once.
    fn check_and_consume<'a, 'life0, 'life1, 'async_trait>(
        &'life0 self,
        request: &'life1 BucketRequest<'a>,
    ) -> Pin<Box<dyn Future<Output = Result<BucketDecision>> + Send + 'async_trait>>
    where
        'a: 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        match &self.coalescer {
            None => Box::pin(self.check_alone(request)),
            Some(coalescer) => Box::pin(self.check_coalesced(coalescer, request)),
        }
    }

    async fn check_and_consume_all<'a>(
        &self,
        requests: &[BucketRequest<'a>],
    ) -> Result<Vec<BucketDecision>> {
        match requests {
            [] => return Ok(Vec::new()),
            // One bucket: the single script decides exactly the same (step_all of one is step).
            [request] => return Ok(vec![self.check_and_consume(request).await?]),
            _ => {}
        }
        let check = MultiCheck::new(requests, self.layout, self.hash_tag)?;
        let groups = check.groups(self.hash_tag);
        match groups.as_slice() {
            [group] => match &self.coalescer {
                Some(coalescer) => {
                    coalescer
                        .check_all(requests, check.now, self.check_group(&check, group))
                        .await
                }
                None => self.check_group(&check, group).await,
            },
            _ => self.check_groups(&check, &groups).await,
        }
    }

    async fn get_remaining(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        now: Option<f64>,
    ) -> Result<u64> {
        let call = self.script_call(key, rule, 0, now)?;
        let reply = self
            .eval("get_remaining", &call)
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
        self.connections.run("reset", self.admin_timeout, |mut conn| async move {
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

    #[tokio::test]
    async fn a_bad_url_is_a_configuration_error() {
        let err = RedisStorage::new(&RedisConfig::new("definitely not a url")).unwrap_err();
        assert_eq!(err.code(), ErrorCode::Configuration);
    }
}
