//! Per-endpoint counters of decisions, in Prometheus / OpenMetrics text.

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use ratelimit_adapter::{BroadcastEventBus, DecisionSource, RateLimitEvent};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

/// The labels of every per-endpoint counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The endpoint, `METHOD /route/template`.
    pub endpoint: String,
}

/// The labels of the denials counted per limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    /// The endpoint, `METHOD /route/template`.
    pub endpoint: String,
    /// The name of the limit that refused (the endpoint itself, for the single-limit form).
    pub limit: String,
}

/// The labels of the decisions the HTTP layer counts on the request path
/// ([`RateLimitLayer::metrics`](crate::RateLimitLayer::metrics)).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
#[non_exhaustive]
pub struct DecisionLabels {
    /// The endpoint, `METHOD /route/template`.
    pub endpoint: String,
    /// The limit that refused, for `denied` and `fail_closed`; empty for the other outcomes
    /// (no limit refused them).
    pub limit: String,
    /// `allowed`, `denied`, `fail_open`, `fail_closed`, `local_fallback` (allowed by the
    /// local fallback store; its denials are `denied`), `rejected` (no identity, or a bad
    /// request cost) or `error` (the check failed).
    pub outcome: &'static str,
}

/// Counts checks per endpoint from the adapter's events, with prometheus-client.
///
/// | metric | counts |
/// |---|---|
/// | `ratelimit_allowed_total{endpoint}` | checks the store allowed |
/// | `ratelimit_denied_total{endpoint}` | checks denied (429) |
/// | `ratelimit_denied_by_limit_total{endpoint,limit}` | the same denials, by the limit that refused (the one with the longest wait when several did) |
/// | `ratelimit_fail_open_total{endpoint}` | checks allowed because the store failed (fail-open) |
/// | `ratelimit_fail_closed_total{endpoint}` | checks denied because the store failed (fail-closed policy) |
/// | `ratelimit_events_lagged_total` | events skipped because the subscriber fell behind |
/// | `ratelimit_http_decisions_total{endpoint,limit,outcome}` | every request the HTTP layer decided, counted on the request path (exact; see [`DecisionLabels`]) |
///
/// The event-derived families count every check, from any caller, but through a bounded
/// broadcast channel: a subscriber that falls behind skips events (counted in
/// `ratelimit_events_lagged_total`). `ratelimit_http_decisions_total` is counted by the layer
/// itself when it is given these metrics ([`RateLimitLayer::metrics`](crate::RateLimitLayer::metrics)):
/// its counters are registered once per endpoint and limit when the layer is configured, and
/// a request increments one atomic, without allocating or looking anything up.
///
/// The per-endpoint outcomes are disjoint: a fail-open check is not also counted as allowed,
/// nor a fail-closed one as denied. Decisions of the local fallback store (the `local`
/// failure policy) count as allowed or denied. Endpoints without a rule publish no events and are not counted.
///
/// ```
/// use ratelimit_http::RateLimitMetrics;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let bus = ratelimit_adapter::BroadcastEventBus::default(); // container.events() in a service
/// let metrics = RateLimitMetrics::new();
/// metrics.spawn(&bus); // counts every event from now on
/// let text = metrics.encode()?; // serve with content type RateLimitMetrics::CONTENT_TYPE
/// assert!(text.ends_with("# EOF\n"));
/// # Ok::<(), std::fmt::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct RateLimitMetrics {
    allowed: Family<EndpointLabels, Counter>,
    denied: Family<EndpointLabels, Counter>,
    denied_by_limit: Family<LimitLabels, Counter>,
    fail_open: Family<EndpointLabels, Counter>,
    fail_closed: Family<EndpointLabels, Counter>,
    lagged: Counter,
    decisions: Family<DecisionLabels, Counter>,
    registry: Arc<Registry>,
}

impl fmt::Debug for RateLimitMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitMetrics")
            .field("lagged", &self.lagged.get())
            .finish_non_exhaustive()
    }
}

impl Default for RateLimitMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimitMetrics {
    /// The content type of [`encode`](Self::encode)'s output (OpenMetrics text, which
    /// Prometheus scrapes).
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// Zeroed counters, registered in a registry of their own.
    pub fn new() -> Self {
        let mut metrics = Self {
            allowed: Family::default(),
            denied: Family::default(),
            denied_by_limit: Family::default(),
            fail_open: Family::default(),
            fail_closed: Family::default(),
            lagged: Counter::default(),
            decisions: Family::default(),
            registry: Arc::new(Registry::default()),
        };
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.registry = Arc::new(registry);
        metrics
    }

    /// Registers the counters (under the prefix `ratelimit`) in an application's own
    /// registry too; they keep counting in both.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("ratelimit");
        registry.register(
            "allowed",
            "Rate-limit checks allowed by the store, per endpoint",
            self.allowed.clone(),
        );
        registry.register(
            "denied",
            "Rate-limit checks denied, per endpoint",
            self.denied.clone(),
        );
        registry.register(
            "denied_by_limit",
            "Rate-limit checks denied, per endpoint and refusing limit",
            self.denied_by_limit.clone(),
        );
        registry.register(
            "fail_open",
            "Rate-limit checks allowed because the store failed (fail-open), per endpoint",
            self.fail_open.clone(),
        );
        registry.register(
            "fail_closed",
            "Rate-limit checks denied because the store failed (fail-closed), per endpoint",
            self.fail_closed.clone(),
        );
        registry.register(
            "events_lagged",
            "Rate-limit events the metrics subscriber skipped because it fell behind",
            self.lagged.clone(),
        );
        registry.register(
            "http_decisions",
            "Requests decided by the HTTP rate-limit layer, per endpoint, refusing limit and outcome, counted on the request path",
            self.decisions.clone(),
        );
    }

    /// The counter of one endpoint, limit and outcome, created (at zero) if need be: a handle
    /// the layer keeps and increments without a lookup.
    pub(crate) fn decision_counter(
        &self,
        endpoint: &str,
        limit: &str,
        outcome: &'static str,
    ) -> Counter {
        self.decisions
            .get_or_create(&DecisionLabels {
                endpoint: endpoint.to_owned(),
                limit: limit.to_owned(),
                outcome,
            })
            .clone()
    }

    /// Requests the HTTP layer decided for `endpoint` with `outcome`, refused by `limit`
    /// (empty for outcomes that no limit refused).
    pub fn decisions(&self, endpoint: &str, limit: &str, outcome: &'static str) -> u64 {
        self.decisions
            .get(&DecisionLabels {
                endpoint: endpoint.to_owned(),
                limit: limit.to_owned(),
                outcome,
            })
            .map_or(0, |counter| counter.get())
    }

    /// Counts one event (`Attempted` events are ignored).
    pub fn observe(&self, event: &RateLimitEvent) {
        let family = match event {
            RateLimitEvent::Allowed(e) if e.source == DecisionSource::FailOpen => &self.fail_open,
            RateLimitEvent::Allowed(_) => &self.allowed,
            RateLimitEvent::Denied(e) if e.source == DecisionSource::FailClosed => {
                &self.fail_closed
            }
            RateLimitEvent::Denied(e) => {
                if let Some(limit) = &e.refused_by {
                    self.denied_by_limit
                        .get_or_create(&LimitLabels {
                            endpoint: e.endpoint.to_string(),
                            limit: limit.to_string(),
                        })
                        .inc();
                }
                &self.denied
            }
            _ => return,
        };
        family
            .get_or_create(&EndpointLabels {
                endpoint: event.endpoint().to_owned(),
            })
            .inc();
    }

    /// Subscribes to `bus` now and spawns a task that counts its events until the bus is
    /// dropped. Must be called within a Tokio runtime.
    pub fn spawn(&self, bus: &BroadcastEventBus) -> JoinHandle<()> {
        let mut events = bus.subscribe();
        let metrics = self.clone();
        // The bus's own count of what its subscribers lost; not the bus itself, whose sender
        // would keep the channel open.
        let dropped = bus.dropped_counter();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => metrics.observe(&event),
                    Err(RecvError::Lagged(missed)) => {
                        metrics.lagged.inc_by(missed);
                        dropped.fetch_add(missed, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(
                            missed,
                            "rate-limit metrics fell behind; events were skipped"
                        );
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        })
    }

    /// Checks the store allowed for `endpoint`.
    pub fn allowed(&self, endpoint: &str) -> u64 {
        count(&self.allowed, endpoint)
    }

    /// Checks denied for `endpoint`.
    pub fn denied(&self, endpoint: &str) -> u64 {
        count(&self.denied, endpoint)
    }

    /// Checks denied for `endpoint` by its limit `limit`.
    pub fn denied_by(&self, endpoint: &str, limit: &str) -> u64 {
        self.denied_by_limit
            .get(&LimitLabels {
                endpoint: endpoint.to_owned(),
                limit: limit.to_owned(),
            })
            .map_or(0, |counter| counter.get())
    }

    /// Checks that failed open for `endpoint`.
    pub fn fail_open(&self, endpoint: &str) -> u64 {
        count(&self.fail_open, endpoint)
    }

    /// Checks that failed closed for `endpoint`.
    pub fn fail_closed(&self, endpoint: &str) -> u64 {
        count(&self.fail_closed, endpoint)
    }

    /// The counters in OpenMetrics text format, ending with `# EOF`.
    ///
    /// # Errors
    /// Only if formatting fails, which writing to a `String` does not.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn count(family: &Family<EndpointLabels, Counter>, endpoint: &str) -> u64 {
    family
        .get(&EndpointLabels {
            endpoint: endpoint.to_owned(),
        })
        .map_or(0, |counter| counter.get())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratelimit_adapter::{EventBus, RateLimitScope};

    use super::*;

    fn allowed(endpoint: &str, source: DecisionSource) -> RateLimitEvent {
        RateLimitEvent::allowed(
            endpoint.into(),
            "1.2.3.4".into(),
            RateLimitScope::Ip,
            1,
            Duration::ZERO,
            source,
        )
    }

    fn denied(endpoint: &str) -> RateLimitEvent {
        RateLimitEvent::denied(
            endpoint.into(),
            "1.2.3.4".into(),
            RateLimitScope::Ip,
            Duration::from_secs(1),
            Duration::ZERO,
            DecisionSource::Store,
        )
        .with_refused_by(Some(endpoint.into()))
    }

    #[test]
    fn denials_are_counted_by_the_limit_that_refused() {
        let metrics = RateLimitMetrics::new();
        let by = |limit: &str| {
            RateLimitEvent::denied(
                "GET /search".into(),
                "1.2.3.4".into(),
                RateLimitScope::Global,
                Duration::from_secs(1),
                Duration::ZERO,
                DecisionSource::Store,
            )
            .with_refused_by(Some(limit.into()))
        };
        metrics.observe(&by("everyone"));
        metrics.observe(&by("everyone"));
        metrics.observe(&by("per-client"));
        assert_eq!(metrics.denied("GET /search"), 3);
        assert_eq!(metrics.denied_by("GET /search", "everyone"), 2);
        assert_eq!(metrics.denied_by("GET /search", "per-client"), 1);
        let text = metrics.encode().unwrap();
        assert!(
            text.lines().any(|l| l
                == "ratelimit_denied_by_limit_total{endpoint=\"GET /search\",limit=\"everyone\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn outcomes_are_counted_per_endpoint_and_encoded() {
        let metrics = RateLimitMetrics::new();
        metrics.observe(&allowed("POST /login", DecisionSource::Store));
        metrics.observe(&allowed("POST /login", DecisionSource::Store));
        metrics.observe(&denied("POST /login"));
        metrics.observe(&allowed("GET /users/{id}", DecisionSource::FailOpen));
        metrics.observe(&RateLimitEvent::attempted(
            "POST /login".into(),
            "x".into(),
            RateLimitScope::Ip,
            1,
        ));
        assert_eq!(metrics.allowed("POST /login"), 2);
        assert_eq!(metrics.denied("POST /login"), 1);
        assert_eq!(metrics.fail_open("POST /login"), 0);
        assert_eq!(metrics.fail_open("GET /users/{id}"), 1);
        assert_eq!(metrics.allowed("GET /users/{id}"), 0);

        let text = metrics.encode().unwrap();
        for line in [
            "# TYPE ratelimit_allowed counter",
            "ratelimit_allowed_total{endpoint=\"POST /login\"} 2",
            "ratelimit_denied_total{endpoint=\"POST /login\"} 1",
            "ratelimit_fail_open_total{endpoint=\"GET /users/{id}\"} 1",
            "ratelimit_events_lagged_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn an_application_registry_sees_the_same_counters() {
        let metrics = RateLimitMetrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.observe(&denied("GET /x"));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("ratelimit_denied_total{endpoint=\"GET /x\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_spawned_subscriber_counts_bus_events() {
        let bus = BroadcastEventBus::new(16);
        let metrics = RateLimitMetrics::new();
        let task = metrics.spawn(&bus);
        bus.publish(denied("GET /x")).await.unwrap();
        bus.publish(allowed("GET /x", DecisionSource::Store))
            .await
            .unwrap();
        drop(bus);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (metrics.denied("GET /x"), metrics.allowed("GET /x")),
            (1, 1)
        );
    }

    #[tokio::test]
    async fn a_lagging_subscriber_counts_and_reports_what_it_lost() {
        let bus = BroadcastEventBus::new(4);
        let metrics = RateLimitMetrics::new();
        let task = metrics.spawn(&bus);
        // Published without yielding: the subscriber's queue of 4 overflows.
        for _ in 0..100 {
            bus.publish(denied("GET /x")).await.unwrap();
        }
        let dropped = bus.dropped_counter();
        drop(bus);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(metrics.denied("GET /x"), 4);
        assert_eq!(metrics.lagged.get(), 96);
        assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 96);
    }
}
