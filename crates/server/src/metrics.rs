//! The service's Prometheus metrics (prometheus-client, OpenMetrics text on `GET /metrics`).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a decision about one limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    /// The request's domain (configured domains only).
    pub domain: String,
    /// The limit's configured `name`, or its descriptor path (`domain.key_value.key`) when it
    /// has none; `override` for limits a request carried itself.
    pub limit: String,
    /// `ok`, `over_limit`, `shadow_over_limit` (shadow mode: counted, answered OK) or
    /// `fail_open` (the store failed; allowed by the failure policy).
    pub decision: &'static str,
}

/// Labels of a limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    /// The request's domain.
    pub domain: String,
    /// As in [`DecisionLabels::limit`].
    pub limit: String,
}

/// Labels of a store failure.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyLabels {
    /// The failure policy that answered: `open`, `closed` or `local`.
    pub policy: &'static str,
}

/// Labels of a configuration load.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `error`.
    pub result: &'static str,
}

/// Every metric of the service.
///
/// | metric | counts |
/// |---|---|
/// | `ratelimit_server_decisions_total{domain,limit,decision}` | descriptors decided, per limit and outcome |
/// | `ratelimit_server_shadow_refusals_total{domain,limit}` | refusals a shadow-mode limit would have made |
/// | `ratelimit_server_store_failures_total{policy}` | calls the store failed, answered by the failure policy |
/// | `ratelimit_server_invalid_requests_total` | calls refused with `INVALID_ARGUMENT` |
/// | `ratelimit_server_config_loads_total{result}` | configuration loads and reloads, `success` or `error` |
/// | `ratelimit_server_config_error` | 1 while the last load of the configuration failed (the previous one is in use) |
#[derive(Clone)]
pub struct ServerMetrics {
    decisions: Family<DecisionLabels, Counter>,
    shadow_refusals: Family<LimitLabels, Counter>,
    store_failures: Family<PolicyLabels, Counter>,
    invalid_requests: Counter,
    config_loads: Family<ReloadLabels, Counter>,
    config_error: Gauge<i64, AtomicI64Compat>,
    registry: Arc<Registry>,
}

/// The atomic behind the configuration-error gauge.
type AtomicI64Compat = std::sync::atomic::AtomicI64;

impl fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerMetrics")
            .field("invalid_requests", &self.invalid_requests.get())
            .field("config_error", &self.config_error.get())
            .finish_non_exhaustive()
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// The content type of [`encode`](Self::encode)'s output.
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// Zeroed metrics in a registry of their own.
    pub fn new() -> Self {
        let decisions = Family::<DecisionLabels, Counter>::default();
        let shadow_refusals = Family::<LimitLabels, Counter>::default();
        let store_failures = Family::<PolicyLabels, Counter>::default();
        let invalid_requests = Counter::<u64, AtomicU64>::default();
        let config_loads = Family::<ReloadLabels, Counter>::default();
        let config_error = Gauge::<i64, AtomicI64Compat>::default();
        let mut registry = Registry::with_prefix("ratelimit_server");
        registry.register(
            "decisions",
            "Descriptors decided, per domain, limit and outcome",
            decisions.clone(),
        );
        registry.register(
            "shadow_refusals",
            "Requests a shadow-mode limit would have refused",
            shadow_refusals.clone(),
        );
        registry.register(
            "store_failures",
            "Checks the store failed, answered by the failure policy",
            store_failures.clone(),
        );
        registry.register(
            "invalid_requests",
            "Calls refused as invalid (INVALID_ARGUMENT)",
            invalid_requests.clone(),
        );
        registry.register(
            "config_loads",
            "Configuration loads and reloads, by result",
            config_loads.clone(),
        );
        registry.register(
            "config_error",
            "1 while the last configuration load failed and the previous configuration is in use",
            config_error.clone(),
        );
        Self {
            decisions,
            shadow_refusals,
            store_failures,
            invalid_requests,
            config_loads,
            config_error,
            registry: Arc::new(registry),
        }
    }

    /// Counts one decision about one limit.
    pub fn decision(&self, domain: &str, limit: &str, decision: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                domain: domain.to_owned(),
                limit: limit.to_owned(),
                decision,
            })
            .inc();
    }

    /// Counts a refusal that shadow mode turned into OK.
    pub fn shadow_refusal(&self, domain: &str, limit: &str) {
        self.shadow_refusals
            .get_or_create(&LimitLabels {
                domain: domain.to_owned(),
                limit: limit.to_owned(),
            })
            .inc();
    }

    /// Counts a call the store failed, answered by `policy`.
    pub fn store_failure(&self, policy: &'static str) {
        self.store_failures
            .get_or_create(&PolicyLabels { policy })
            .inc();
    }

    /// Counts a call refused as invalid.
    pub fn invalid_request(&self) {
        self.invalid_requests.inc();
    }

    /// Counts a configuration load and sets the error gauge accordingly.
    pub fn config_load(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.config_loads
            .get_or_create(&ReloadLabels { result })
            .inc();
        self.config_error.set(i64::from(!ok));
    }

    /// Current value of one decision counter (for tests and logs).
    pub fn decision_count(&self, domain: &str, limit: &str, decision: &'static str) -> u64 {
        self.decisions
            .get_or_create(&DecisionLabels {
                domain: domain.to_owned(),
                limit: limit.to_owned(),
                decision,
            })
            .get()
    }

    /// Every metric in OpenMetrics text.
    ///
    /// # Errors
    /// Only if formatting fails.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_encodes() {
        let metrics = ServerMetrics::new();
        metrics.decision("messaging", "messaging.to_number", "over_limit");
        metrics.shadow_refusal("example6", "example6.service.user_user-a");
        metrics.store_failure("open");
        metrics.config_load(false);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "ratelimit_server_decisions_total{domain=\"messaging\",limit=\"messaging.to_number\",decision=\"over_limit\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("ratelimit_server_store_failures_total{policy=\"open\"} 1"));
        assert!(text.contains("ratelimit_server_config_loads_total{result=\"error\"} 1"));
        assert!(text.contains("ratelimit_server_config_error 1"));
        metrics.config_load(true);
        assert!(
            metrics
                .encode()
                .unwrap()
                .contains("ratelimit_server_config_error 0")
        );
        assert_eq!(
            metrics.decision_count("messaging", "messaging.to_number", "over_limit"),
            1
        );
    }
}
