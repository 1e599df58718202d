//! Wiring: the one crate that knows every concrete type.
//!
//! [`Container::build`] turns a [`ContainerConfig`] (which backend, which rules) into a
//! ready [`RateLimiter`](ratelimit_domain::RateLimiter) behind an `Arc`, with an in-process
//! event bus whose events are logged through `tracing`.
//!
//! ```
//! use std::time::Duration;
//! use ratelimit_container::{Container, ContainerConfig};
//! use ratelimit_domain::{RateLimitRule, RateLimitScope, RateLimiterExt, RuleSet};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let rules = RuleSet::try_from_rules([
//!     ("POST /api/v1/sessions", RateLimitRule::new(RateLimitScope::Ip, 5, 5.0)?),
//! ])?;
//! // REDIS_URL set: Redis; otherwise the in-memory store.
//! let container = Container::build(ContainerConfig::from_env(rules)).await?;
//! let limiter = container.rate_limiter();
//! let result = limiter.is_allowed("POST /api/v1/sessions", "192.168.1.1").await?;
//! assert!(result.allowed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;

use ratelimit_adapter::{
    BroadcastEventBus, CircuitBreakerStore, DenyCacheStore, TokenBucketAdapter, spawn_event_logger,
};
use ratelimit_domain::{
    Clock, DynBucketStore, DynRateLimiter, ErrorCode, KeyBuilder, RateLimitError, Result, RuleSet,
};
use ratelimit_memory::{CounterClock, MemoryStorage};
use ratelimit_redis::RedisStorage;

pub use ratelimit_adapter::CircuitBreakerConfig;
pub use ratelimit_domain::FailurePolicy;
pub use ratelimit_redis::{KeyLayout, RedisConfig};

/// Where buckets live.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Backend {
    /// In this process ([`MemoryStorage`]): limits hold per host.
    Memory,
    /// In Redis ([`RedisStorage`]): limits hold across every host that shares it.
    Redis(RedisConfig),
}

/// Everything [`Container::build`] needs.
#[derive(Clone)]
#[must_use]
pub struct ContainerConfig {
    /// Where buckets live.
    pub backend: Backend,
    /// Endpoint → rule.
    pub rules: RuleSet,
    /// First part of every key (default `rate_limit`).
    pub key_prefix: String,
    /// How far an event subscriber may fall behind before losing events.
    pub event_capacity: usize,
    /// Whether to spawn a subscriber that logs every event through `tracing`.
    pub log_events: bool,
    /// The clock of the in-process stores: the memory backend, and the local fallback (by
    /// default the memory store's own, the host's wall clock read from the CPU's counter:
    /// `CounterClock`; a `ManualClock` in tests).
    pub clock: Arc<dyn Clock>,
    /// The most buckets an in-process store holds: the memory backend, and the local fallback
    /// of the `local` policy (default [`MemoryStorage::DEFAULT_CAPACITY`]). Past it, full
    /// buckets are evicted first; see `MemoryStorage`.
    pub memory_capacity: usize,
    /// What checks decide when Redis fails (default: allow).
    pub failure_policy: FailurePolicy,
    /// The circuit breaker in front of Redis (default on; `None` turns it off). Unused by the
    /// memory backend, which does not fail.
    pub circuit_breaker: Option<CircuitBreakerConfig>,
    /// A local cache of up to this many Redis denials (`None`, the default: no cache). Repeats
    /// of a denied check are then answered in process until its `retry_after`; resets reach
    /// every host's cache through Redis pub/sub. See `DenyCacheStore` for the guarantees. Not
    /// available on a Redis Cluster (no reset notifications there).
    pub deny_cache: Option<usize>,
}

impl fmt::Debug for ContainerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerConfig")
            .field("backend", &self.backend)
            .field("rules", &self.rules.len())
            .field("key_prefix", &self.key_prefix)
            .field("event_capacity", &self.event_capacity)
            .field("log_events", &self.log_events)
            .field("failure_policy", &self.failure_policy)
            .field("circuit_breaker", &self.circuit_breaker)
            .field("deny_cache", &self.deny_cache)
            .field("memory_capacity", &self.memory_capacity)
            .finish_non_exhaustive()
    }
}

impl ContainerConfig {
    /// The default [`memory_capacity`](Self::memory_capacity): `MemoryStorage`'s own default.
    pub const DEFAULT_MEMORY_CAPACITY: usize = MemoryStorage::DEFAULT_CAPACITY;

    /// The in-memory backend with `rules`.
    pub fn memory(rules: RuleSet) -> Self {
        Self {
            backend: Backend::Memory,
            rules,
            key_prefix: KeyBuilder::DEFAULT_PREFIX.to_owned(),
            event_capacity: BroadcastEventBus::DEFAULT_CAPACITY,
            log_events: true,
            clock: Arc::new(CounterClock::new()),
            memory_capacity: Self::DEFAULT_MEMORY_CAPACITY,
            failure_policy: FailurePolicy::Open,
            circuit_breaker: Some(CircuitBreakerConfig::default()),
            deny_cache: None,
        }
    }

    /// Redis at `url` (default pool size and deadlines) with `rules`.
    pub fn redis(url: impl Into<String>, rules: RuleSet) -> Self {
        Self {
            backend: Backend::Redis(RedisConfig::new(url)),
            ..Self::memory(rules)
        }
    }

    /// Redis when the `REDIS_URL` environment variable is set and not empty, memory otherwise.
    pub fn from_env(rules: RuleSet) -> Self {
        match std::env::var("REDIS_URL") {
            Ok(url) if !url.trim().is_empty() => Self::redis(url.trim(), rules),
            _ => Self::memory(rules),
        }
    }

    /// The same configuration with another backend.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The same configuration with another key prefix.
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The same configuration with another clock for the memory backend.
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The same configuration with another failure policy.
    pub fn with_failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    /// The same configuration with another circuit breaker (`None`: no breaker).
    pub fn with_circuit_breaker(mut self, breaker: Option<CircuitBreakerConfig>) -> Self {
        self.circuit_breaker = breaker;
        self
    }

    /// The same configuration with a local deny cache of up to `capacity` denials (Redis only).
    pub fn with_deny_cache(mut self, capacity: usize) -> Self {
        self.deny_cache = Some(capacity);
        self
    }

    /// The same configuration with in-process stores of at most `capacity` buckets.
    pub fn with_memory_capacity(mut self, capacity: usize) -> Self {
        self.memory_capacity = capacity;
        self
    }

    /// The same configuration, with or without the event-logging subscriber.
    pub fn with_event_logging(mut self, log_events: bool) -> Self {
        self.log_events = log_events;
        self
    }
}

/// An in-process store as configured.
fn memory_store(config: &ContainerConfig) -> Result<MemoryStorage> {
    MemoryStorage::builder()
        .capacity(config.memory_capacity)
        .shared_clock(config.clock.clone())
        .build()
}

/// The error for a deny cache where resets would not reach it.
fn no_reset_listener() -> RateLimitError {
    RateLimitError::new(
        ErrorCode::Configuration,
        "the deny cache needs reset notifications over Redis pub/sub, which do not run on a \
         Redis Cluster: a reset would not clear a cached denial. Turn the deny cache off for a \
         cluster",
    )
    .with_detail("field", "deny_cache")
}

/// The built graph. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Container {
    limiter: Arc<TokenBucketAdapter>,
    events: BroadcastEventBus,
    backend: &'static str,
}

impl Container {
    /// Builds the store, the event bus and the adapter. Must be called within a Tokio runtime.
    ///
    /// With Redis, the container starts even when Redis is down (checks follow the failure policy until it is
    /// back); it logs a warning when the first request to Redis fails. A Redis that answers
    /// but is older than 5.0 (the scripts cannot run there) is refused.
    ///
    /// # Errors
    /// `Configuration` for an unparsable Redis URL, a Redis older than 5.0, or for a deny cache on a Redis Cluster
    /// (where resets could not reach it); `InvalidInput` for an empty key prefix.
    pub async fn build(config: ContainerConfig) -> Result<Self> {
        let (store, backend): (DynBucketStore, _) = match &config.backend {
            Backend::Memory => (Arc::new(memory_store(&config)?), "memory"),
            Backend::Redis(redis) => {
                if config.deny_cache.is_some() && redis.is_cluster() {
                    // Without reset notifications a cached denial outlives a reset.
                    return Err(no_reset_listener());
                }
                let redis_store = Arc::new(RedisStorage::new(redis)?);
                match redis_store.check_version().await {
                    Ok(()) => {}
                    // A Redis the scripts cannot run on would fail every check: refuse it.
                    Err(err) if err.code() == ErrorCode::Configuration => return Err(err),
                    Err(err) => {
                        tracing::warn!(url = %redis.redacted_url(), error = %err, "redis is not answering yet; checks follow the failure policy until it does");
                    }
                }
                // Store, then breaker, then deny cache, as configured.
                let mut store: DynBucketStore = redis_store.clone();
                if let Some(breaker) = config.circuit_breaker {
                    store = Arc::new(CircuitBreakerStore::new(store, breaker));
                }
                if let Some(capacity) = config.deny_cache {
                    let cache = Arc::new(DenyCacheStore::new(store, capacity));
                    let listener = cache.clone();
                    let spawned = redis_store.spawn_reset_listener(move |key| match key {
                        Some(key) => listener.invalidate(key),
                        None => listener.clear(),
                    });
                    if spawned.is_none() {
                        return Err(no_reset_listener());
                    }
                    store = cache;
                }
                (store, "redis")
            }
        };
        let events = BroadcastEventBus::new(config.event_capacity);
        if config.log_events {
            spawn_event_logger(&events);
        }
        let fallback = match config.failure_policy {
            FailurePolicy::Local => Some(Arc::new(memory_store(&config)?)),
            _ => None,
        };
        let mut builder = TokenBucketAdapter::builder(store, config.rules)
            .events(Arc::new(events.clone()))
            .key_prefix(config.key_prefix)
            .failure_policy(config.failure_policy);
        if let Some(fallback) = fallback {
            builder = builder.local_fallback(fallback);
        }
        let limiter = builder.build()?;
        Ok(Self {
            limiter: Arc::new(limiter),
            events,
            backend,
        })
    }

    /// The rate limiter, for handlers and middleware.
    pub fn rate_limiter(&self) -> DynRateLimiter {
        self.limiter.clone()
    }

    /// The concrete adapter, for what the port does not expose (rule lookup, bucket keys).
    pub fn adapter(&self) -> &Arc<TokenBucketAdapter> {
        &self.limiter
    }

    /// The event bus: subscribe to observe every check.
    pub fn events(&self) -> &BroadcastEventBus {
        &self.events
    }

    /// `"memory"` or `"redis"`.
    pub fn backend_name(&self) -> &'static str {
        self.backend
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratelimit_domain::{ManualClock, RateLimitRule, RateLimitScope, RateLimiterExt};

    use super::*;

    fn rules() -> RuleSet {
        RuleSet::try_from_rules([(
            "POST /login",
            RateLimitRule::new(RateLimitScope::Ip, 2, 5.0).unwrap(),
        )])
        .unwrap()
    }

    #[tokio::test]
    async fn memory_container_limits_and_publishes() {
        let clock = ManualClock::new(1_000.0);
        let container =
            Container::build(ContainerConfig::memory(rules()).with_clock(clock.clone()))
                .await
                .unwrap();
        assert_eq!(container.backend_name(), "memory");
        let mut events = container.events().subscribe();
        let limiter = container.rate_limiter();
        assert!(
            limiter
                .is_allowed("POST /login", "a")
                .await
                .unwrap()
                .allowed
        );
        assert!(
            limiter
                .is_allowed("POST /login", "a")
                .await
                .unwrap()
                .allowed
        );
        assert!(
            !limiter
                .is_allowed("POST /login", "a")
                .await
                .unwrap()
                .allowed
        );
        clock.advance(Duration::from_secs(12));
        assert!(
            limiter
                .is_allowed("POST /login", "a")
                .await
                .unwrap()
                .allowed
        );
        let kinds: Vec<_> = (0..8).map(|_| events.try_recv().unwrap().kind()).collect();
        assert_eq!(
            kinds,
            [
                "attempted",
                "allowed",
                "attempted",
                "allowed",
                "attempted",
                "denied",
                "attempted",
                "allowed"
            ]
        );
        assert!(events.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_zero_memory_capacity_is_refused() {
        let err = Container::build(ContainerConfig::memory(rules()).with_memory_capacity(0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ratelimit_domain::ErrorCode::InvalidInput);
    }

    #[tokio::test]
    async fn bad_redis_url_is_a_configuration_error() {
        let err = Container::build(ContainerConfig::redis("nope://", rules()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ratelimit_domain::ErrorCode::Configuration);
    }

    /// On a cluster no reset listener runs, so a cached denial would outlive a reset (issue
    /// 10): the container used to install the cache anyway.
    #[tokio::test]
    async fn a_deny_cache_on_a_cluster_is_refused() {
        let config = ContainerConfig::redis("redis://127.0.0.1:1", rules())
            .with_backend(Backend::Redis(RedisConfig::cluster([
                "redis://127.0.0.1:1",
                "redis://127.0.0.1:2",
            ])))
            .with_deny_cache(1_000);
        let err = Container::build(config).await.unwrap_err();
        assert_eq!(err.code(), ratelimit_domain::ErrorCode::Configuration);
        assert!(err.message().contains("deny cache"), "{err}");
    }

    #[test]
    fn debug_hides_redis_passwords() {
        let config = ContainerConfig::redis("redis://app:hunter2@cache:6379", rules());
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app:***@cache"), "{shown}");
    }
}
