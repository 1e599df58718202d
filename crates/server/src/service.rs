//! `ShouldRateLimit`: from a request's descriptors to one all-or-nothing check of their
//! buckets, and back to one status per descriptor.
//!
//! [`RateLimitService::should_rate_limit`] is the whole decision; the gRPC service
//! ([`crate::grpc`]) and `POST /json` ([`crate::http`]) only translate to and from it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit as PbRateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use ratelimit_adapter::domain::token_bucket::ceil_seconds;
use ratelimit_adapter::{BucketCheck, TokenBucketAdapter};
use ratelimit_domain::{
    BucketKey, DecisionSource, ErrorCode, FailurePolicy, Limit, LimitOutcome, RateLimitError,
};
use ratelimit_http::sf_string;
use tonic::Status;

use crate::config::{LimitSpec, RateLimitConfig, Unit};
use crate::keys;
use crate::metrics::ServerMetrics;

/// Bounds on what one request may carry; beyond them the call fails with `INVALID_ARGUMENT`
/// before any lookup or store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestBounds {
    /// Most descriptors per request.
    pub max_descriptors: usize,
    /// Most entries per descriptor.
    pub max_entries: usize,
    /// Longest domain, entry key or entry value, in bytes. Values over 256 bytes are hashed
    /// into bucket keys (see [`crate::keys`]), so this bounds the work, not the key size.
    pub max_value_bytes: usize,
}

impl Default for RequestBounds {
    fn default() -> Self {
        Self {
            max_descriptors: 64,
            max_entries: 16,
            max_value_bytes: 4_096,
        }
    }
}

/// Which rate-limit headers an answer asks Envoy to add to the client's response
/// (`response_headers_to_add`), describing the descriptor closest to its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ResponseHeaders {
    /// None (the default, as in the reference service).
    #[default]
    Off,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    XRateLimit,
    /// The IETF draft's `RateLimit-Policy` and `RateLimit`.
    Ietf,
    /// Both sets.
    Both,
}

impl std::str::FromStr for ResponseHeaders {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "off" | "none" => Ok(Self::Off),
            "x-ratelimit" => Ok(Self::XRateLimit),
            "ietf" => Ok(Self::Ietf),
            "both" => Ok(Self::Both),
            _ => Err(format!(
                "unknown header set {s:?}: expected off, x-ratelimit, ietf or both"
            )),
        }
    }
}

/// What the service needs besides the configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServiceOptions {
    /// First part of every bucket key (default `rls`).
    pub key_prefix: String,
    /// Bounds on requests.
    pub bounds: RequestBounds,
    /// Rate-limit headers in answers.
    pub response_headers: ResponseHeaders,
    /// The adapter's failure policy, for metrics and logs.
    pub failure_policy: FailurePolicy,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            key_prefix: "rls".to_owned(),
            bounds: RequestBounds::default(),
            response_headers: ResponseHeaders::Off,
            failure_policy: FailurePolicy::Open,
        }
    }
}

/// The rate-limit service: the current configuration, the adapter over the buckets, metrics.
/// Cheap to share behind an `Arc`.
pub struct RateLimitService {
    /// Swapped whole on reload; readers clone the `Arc` and never hold the lock across a
    /// store call (a std lock, since it is never held across `.await`).
    config: RwLock<Arc<RateLimitConfig>>,
    /// The last configuration error, until a load succeeds (shown on `/healthcheck`).
    config_error: Mutex<Option<String>>,
    adapter: Arc<TokenBucketAdapter>,
    metrics: ServerMetrics,
    options: ServiceOptions,
}

impl fmt::Debug for RateLimitService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitService")
            .field("config_version", &self.config().version().to_owned())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What one descriptor of a request resolved to.
enum Slot {
    /// No limit applies (no match, unknown domain, or replaced by another limit).
    NoLimit,
    /// An `unlimited` limit: never counted.
    Unlimited,
    /// `requests_per_unit: 0`: refuses without counting.
    Blocked(Arc<LimitSpec>),
    /// Counted in the bucket at this index.
    Counted(Arc<LimitSpec>, usize),
}

/// One distinct bucket of a request.
struct Bucket {
    spec: Arc<LimitSpec>,
    limit: Limit,
    key: BucketKey,
    cost: u64,
}

impl RateLimitService {
    /// A service answering with `config`, checking buckets through `adapter`.
    pub fn new(
        config: RateLimitConfig,
        adapter: Arc<TokenBucketAdapter>,
        metrics: ServerMetrics,
        options: ServiceOptions,
    ) -> Self {
        Self {
            config: RwLock::new(Arc::new(config)),
            config_error: Mutex::new(None),
            adapter,
            metrics,
            options,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> Arc<RateLimitConfig> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `config` in use and clears the configuration error.
    pub fn set_config(&self, config: RateLimitConfig) {
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        *self
            .config_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.metrics.config_load(true);
    }

    /// Records a configuration that was refused; the one in use stays.
    pub fn set_config_error(&self, error: String) {
        *self
            .config_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error);
        self.metrics.config_load(false);
    }

    /// The last refused configuration's error, until a load succeeds.
    pub fn config_error(&self) -> Option<String> {
        self.config_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The metrics.
    pub fn metrics(&self) -> &ServerMetrics {
        &self.metrics
    }

    /// The options.
    pub fn options(&self) -> &ServiceOptions {
        &self.options
    }

    /// Decides one request: every counted descriptor's bucket is checked in one
    /// all-or-nothing step, so a request refused by one descriptor takes nothing from the
    /// others.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a request beyond the bounds or without domain or descriptors;
    /// `UNAVAILABLE` when the store failed and the failure policy is `closed`.
    pub async fn should_rate_limit(
        &self,
        request: &RateLimitRequest,
    ) -> Result<RateLimitResponse, Status> {
        if let Err(reason) = self.validate(request) {
            self.metrics.invalid_request();
            tracing::debug!(%reason, "invalid rate limit request");
            return Err(Status::invalid_argument(reason));
        }
        let config = self.config();
        let (slots, buckets) = self.resolve(&config, request)?;
        let blocked = slots
            .iter()
            .any(|slot| matches!(slot, Slot::Blocked(spec) if !spec.shadow_mode));
        let outcomes = self.check(&request.domain, &buckets, blocked).await?;
        Ok(self.answer(&request.domain, &slots, &outcomes))
    }

    fn validate(&self, request: &RateLimitRequest) -> Result<(), String> {
        let bounds = &self.options.bounds;
        if request.domain.is_empty() {
            return Err("rate limit domain must not be empty".to_owned());
        }
        if request.domain.len() > bounds.max_value_bytes {
            return Err(format!(
                "domain is longer than {} bytes",
                bounds.max_value_bytes
            ));
        }
        if request.descriptors.is_empty() {
            return Err("rate limit descriptor list must not be empty".to_owned());
        }
        if request.descriptors.len() > bounds.max_descriptors {
            return Err(format!(
                "{} descriptors, more than the {} accepted",
                request.descriptors.len(),
                bounds.max_descriptors
            ));
        }
        for (i, descriptor) in request.descriptors.iter().enumerate() {
            if descriptor.entries.len() > bounds.max_entries {
                return Err(format!(
                    "descriptor {i} has {} entries, more than the {} accepted",
                    descriptor.entries.len(),
                    bounds.max_entries
                ));
            }
            for (j, entry) in descriptor.entries.iter().enumerate() {
                if entry.key.len() > bounds.max_value_bytes
                    || entry.value.len() > bounds.max_value_bytes
                {
                    return Err(format!(
                        "descriptor {i} entry {j}: key or value longer than {} bytes",
                        bounds.max_value_bytes
                    ));
                }
            }
        }
        Ok(())
    }

    /// Each descriptor's slot, and the distinct buckets to check (two descriptors of one
    /// bucket make one check with the sum of their hits).
    fn resolve(
        &self,
        config: &RateLimitConfig,
        request: &RateLimitRequest,
    ) -> Result<(Vec<Slot>, Vec<Bucket>), Status> {
        let domain = request.domain.as_str();
        let request_hits = u64::from(request.hits_addend.max(1));
        let mut resolved = Vec::with_capacity(request.descriptors.len());
        for (i, descriptor) in request.descriptors.iter().enumerate() {
            let entries = descriptor
                .entries
                .iter()
                .map(|e| (e.key.as_str(), e.value.as_str()));
            let found = match &descriptor.limit {
                Some(over) if config.has_domain(domain) => {
                    let unit = Unit::from_proto_number(over.unit).ok_or_else(|| {
                        self.metrics.invalid_request();
                        Status::invalid_argument(format!(
                            "descriptor {i}: unknown unit {} in its limit override",
                            over.unit
                        ))
                    })?;
                    let path =
                        keys::override_path(domain, over.requests_per_unit, unit.as_str(), entries);
                    let spec = LimitSpec::counted(
                        over.requests_per_unit,
                        unit,
                        format!("{domain}.override"),
                    )
                    .map_err(|err| {
                        self.metrics.invalid_request();
                        Status::invalid_argument(format!("descriptor {i}: limit override: {err}"))
                    })?;
                    Some((Arc::new(spec), path))
                }
                _ => config
                    .find(domain, entries)
                    .map(|found| (found.limit, found.bucket)),
            };
            // A per-descriptor hits_addend may be 0 (check without counting); a negative
            // addend (a refund) is not supported by token buckets here: checked, not counted.
            let hits = match (&descriptor.hits_addend, descriptor.is_negative_hits) {
                (_, true) => 0,
                (Some(own), false) => own.value,
                (None, false) => request_hits,
            };
            resolved.push((found, hits));
        }
        // `replaces`: a named limit replaced by another matched limit of the request is
        // dropped (neither checked nor counted), as in the reference service.
        let replaced: HashSet<&str> = resolved
            .iter()
            .filter_map(|(found, _)| found.as_ref())
            .flat_map(|(spec, _)| spec.replaces.iter().map(String::as_str))
            .collect();
        let mut slots = Vec::with_capacity(resolved.len());
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut by_path: HashMap<String, usize> = HashMap::new();
        for (found, hits) in &resolved {
            let slot = match found {
                None => Slot::NoLimit,
                Some((spec, _))
                    if !spec.name.is_empty() && replaced.contains(spec.name.as_str()) =>
                {
                    Slot::NoLimit
                }
                Some((spec, _)) if spec.unlimited => Slot::Unlimited,
                Some((spec, path)) => match &spec.rule {
                    None => Slot::Blocked(spec.clone()),
                    Some(rule) => {
                        let index = match by_path.get(path) {
                            Some(&index) => {
                                buckets[index].cost = buckets[index].cost.saturating_add(*hits);
                                index
                            }
                            None => {
                                let (limit, key) =
                                    keys::bucket(&self.options.key_prefix, path, rule)
                                        .map_err(|err| Status::internal(err.to_string()))?;
                                buckets.push(Bucket {
                                    spec: spec.clone(),
                                    limit,
                                    key,
                                    cost: *hits,
                                });
                                by_path.insert(path.clone(), buckets.len() - 1);
                                buckets.len() - 1
                            }
                        };
                        Slot::Counted(spec.clone(), index)
                    }
                },
            };
            slots.push(slot);
        }
        Ok((slots, buckets))
    }

    /// Checks the buckets all or nothing: one store call, plus one more each time only
    /// shadow-mode limits refused (they must not stop the others from counting). With
    /// `read_only` (a `requests_per_unit: 0` limit refuses anyway) nothing is taken.
    async fn check(
        &self,
        domain: &str,
        buckets: &[Bucket],
        read_only: bool,
    ) -> Result<Vec<Option<(LimitOutcome, DecisionSource)>>, Status> {
        let mut outcomes: Vec<Option<(LimitOutcome, DecisionSource)>> = vec![None; buckets.len()];
        let mut active: Vec<usize> = (0..buckets.len()).collect();
        let label: Arc<str> = Arc::from(domain);
        while !active.is_empty() {
            let checks: Vec<BucketCheck<'_>> = active
                .iter()
                .map(|&i| {
                    let bucket = &buckets[i];
                    let cost = if read_only { 0 } else { bucket.cost };
                    BucketCheck::new(&bucket.key, &bucket.limit, cost)
                })
                .collect();
            let identifier = buckets[active[0]].limit.name().to_owned();
            let result = self
                .adapter
                .check_buckets(&label, &identifier, &checks)
                .await
                .map_err(status_of)?;
            match result.source {
                DecisionSource::FailClosed => {
                    self.metrics.store_failure("closed");
                    tracing::warn!(domain, "store failed; failure policy closed: UNAVAILABLE");
                    return Err(Status::unavailable(
                        "the rate limit store is unavailable (failure policy: closed)",
                    ));
                }
                DecisionSource::FailOpen => self.metrics.store_failure("open"),
                DecisionSource::LocalFallback => self.metrics.store_failure("local"),
                _ => {}
            }
            for (pos, &i) in active.iter().enumerate() {
                outcomes[i] = result.limits.get(pos).map(|o| (o.clone(), result.source));
            }
            if result.allowed {
                break;
            }
            let refusing: Vec<usize> = active
                .iter()
                .enumerate()
                .filter(|(pos, _)| result.limits.get(*pos).is_some_and(|o| !o.allowed))
                .map(|(_, &i)| i)
                .collect();
            if refusing.is_empty() || !refusing.iter().all(|&i| buckets[i].spec.shadow_mode) {
                // A real refusal: nothing was taken anywhere.
                break;
            }
            // Only shadow-mode limits refused: answer as if they had not, so check the
            // others again without them and let them count.
            active.retain(|i| !refusing.contains(i));
        }
        Ok(outcomes)
    }

    fn answer(
        &self,
        domain: &str,
        slots: &[Slot],
        outcomes: &[Option<(LimitOutcome, DecisionSource)>],
    ) -> RateLimitResponse {
        let mut statuses = Vec::with_capacity(slots.len());
        let mut candidates: Vec<HeaderCandidate> = Vec::new();
        for slot in slots {
            let status = match slot {
                Slot::NoLimit => DescriptorStatus {
                    code: Code::Ok.into(),
                    ..DescriptorStatus::default()
                },
                Slot::Unlimited => DescriptorStatus {
                    code: Code::Ok.into(),
                    limit_remaining: u32::MAX,
                    ..DescriptorStatus::default()
                },
                Slot::Blocked(spec) => {
                    let code = self.refusal(domain, spec);
                    candidates.push(HeaderCandidate::new(spec, 0, None, code));
                    DescriptorStatus {
                        code: code.into(),
                        current_limit: Some(current_limit(spec)),
                        limit_remaining: 0,
                        duration_until_reset: None,
                        ..DescriptorStatus::default()
                    }
                }
                Slot::Counted(spec, index) => match outcomes.get(*index).and_then(Option::as_ref) {
                    // No outcome for the bucket: only if the adapter answered fewer limits
                    // than it was asked, which it does not; report a pass.
                    None => DescriptorStatus {
                        code: Code::Ok.into(),
                        current_limit: Some(current_limit(spec)),
                        ..DescriptorStatus::default()
                    },
                    Some((outcome, source)) => {
                        let code = if outcome.allowed {
                            let decision = if *source == DecisionSource::FailOpen {
                                "fail_open"
                            } else {
                                "ok"
                            };
                            self.metrics.decision(domain, spec.metric_name(), decision);
                            Code::Ok
                        } else {
                            self.refusal(domain, spec)
                        };
                        let t = if outcome.allowed {
                            // 0 while a request can still pass, else an upper bound: one
                            // token's time (the store does not report the refilled fraction).
                            Some(if outcome.remaining > 0 {
                                0
                            } else {
                                ceil_seconds(60.0 / outcome.refill_rate)
                            })
                        } else {
                            outcome.retry_after_whole_seconds()
                        };
                        candidates.push(HeaderCandidate::new(spec, outcome.remaining, t, code));
                        DescriptorStatus {
                            code: code.into(),
                            current_limit: Some(current_limit(spec)),
                            limit_remaining: u32::try_from(outcome.remaining).unwrap_or(u32::MAX),
                            duration_until_reset: duration_until_reset(outcome),
                            ..DescriptorStatus::default()
                        }
                    }
                },
            };
            statuses.push(status);
        }
        let over = statuses
            .iter()
            .any(|s| s.code == i32::from(Code::OverLimit));
        let response_headers_to_add = self.headers(&candidates);
        RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok }.into(),
            statuses,
            response_headers_to_add,
            ..RateLimitResponse::default()
        }
    }

    /// The code of a limit that refused: OVER_LIMIT, or OK under shadow mode (reported).
    fn refusal(&self, domain: &str, spec: &LimitSpec) -> Code {
        if spec.shadow_mode {
            self.metrics
                .decision(domain, spec.metric_name(), "shadow_over_limit");
            self.metrics.shadow_refusal(domain, spec.metric_name());
            tracing::info!(
                domain,
                limit = spec.metric_name(),
                "shadow mode: would have refused"
            );
            Code::Ok
        } else {
            self.metrics
                .decision(domain, spec.metric_name(), "over_limit");
            Code::OverLimit
        }
    }

    /// The `response_headers_to_add` describing the limit closest to refusing: one that
    /// refused if any (the longest wait), else the one with the fewest requests left. The
    /// numbers follow docs/http.md's mapping of a token bucket onto the headers: `q` and
    /// `X-RateLimit-Limit` the `requests_per_unit`, `w` the unit in seconds (the time an empty
    /// bucket takes to refill), `r` and `X-RateLimit-Remaining` the whole requests left, `t`
    /// and `X-RateLimit-Reset` the whole seconds until a request can pass (0 while one can;
    /// absent when none ever will).
    fn headers(&self, candidates: &[HeaderCandidate]) -> Vec<HeaderValue> {
        let style = self.options.response_headers;
        if style == ResponseHeaders::Off {
            return Vec::new();
        }
        let closest = candidates.iter().min_by_key(|c| {
            (
                !c.refused,
                std::cmp::Reverse(c.t.unwrap_or(u64::MAX)),
                c.remaining,
            )
        });
        let Some(c) = closest else {
            return Vec::new();
        };
        let mut headers = Vec::new();
        let mut add = |key: &str, value: String| {
            headers.push(HeaderValue {
                key: key.to_owned(),
                value,
                ..HeaderValue::default()
            });
        };
        if matches!(style, ResponseHeaders::XRateLimit | ResponseHeaders::Both) {
            add("x-ratelimit-limit", c.quota.to_string());
            add("x-ratelimit-remaining", c.remaining.to_string());
            if let Some(t) = c.t {
                add("x-ratelimit-reset", t.to_string());
            }
        }
        if matches!(style, ResponseHeaders::Ietf | ResponseHeaders::Both) {
            let name = sf_string(&c.name);
            add(
                "ratelimit-policy",
                format!("{name};q={};w={}", c.quota, c.window),
            );
            let mut value = format!("{name};r={}", c.remaining);
            if let Some(t) = c.t {
                value.push_str(&format!(";t={t}"));
            }
            add("ratelimit", value);
        }
        headers
    }
}

/// What the rate-limit headers of one counted descriptor would say.
struct HeaderCandidate {
    name: String,
    quota: u32,
    window: u64,
    remaining: u64,
    t: Option<u64>,
    refused: bool,
}

impl HeaderCandidate {
    fn new(spec: &LimitSpec, remaining: u64, t: Option<u64>, code: Code) -> Self {
        Self {
            name: spec.metric_name().to_owned(),
            quota: spec.requests_per_unit,
            window: spec.unit.map_or(0, Unit::seconds),
            remaining,
            t,
            refused: code == Code::OverLimit,
        }
    }
}

fn current_limit(spec: &LimitSpec) -> PbRateLimit {
    PbRateLimit {
        name: spec.name.clone(),
        requests_per_unit: spec.requests_per_unit,
        unit: spec.unit.map_or(0, Unit::proto_number),
    }
}

/// For a token bucket: when the descriptor had its hits, the time until its bucket is full
/// again (whole tokens missing × time per token); when it refused, the time until the refused
/// hits could pass. `None` when they never can (more hits than the bucket holds).
fn duration_until_reset(outcome: &LimitOutcome) -> Option<PbDuration> {
    let wait = if outcome.allowed {
        let missing = outcome.limit.saturating_sub(outcome.remaining) as f64;
        Duration::try_from_secs_f64(missing * 60.0 / outcome.refill_rate).ok()?
    } else if outcome.retry_after == ratelimit_domain::RateLimitResult::RETRY_NEVER {
        return None;
    } else {
        outcome.retry_after
    };
    Some(PbDuration {
        seconds: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(wait.subsec_nanos()).unwrap_or(0),
    })
}

/// The gRPC status of an error from the adapter.
fn status_of(err: RateLimitError) -> Status {
    match err.code() {
        ErrorCode::InvalidInput => Status::invalid_argument(err.to_string()),
        ErrorCode::StorageUnavailable | ErrorCode::StorageTimeout | ErrorCode::StorageError => {
            Status::unavailable(err.to_string())
        }
        _ => Status::internal(err.to_string()),
    }
}
