//! The token-bucket orchestration.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, CheckOptions, DecisionSource, DynBucketStore,
    DynEventBus, EndpointLimits, ErrorCode, FailurePolicy, KeyBuilder, Limit, LimitOutcome,
    RateLimitError, RateLimitEvent, RateLimitResult, RateLimitScope, RateLimiter, Result, RuleSet,
};
use tracing::{Instrument, Span, field};

use crate::BroadcastEventBus;

/// One limit of an endpoint with its key builder, prepared once at start-up.
#[derive(Debug)]
struct PreparedLimit {
    limit: Limit,
    keys: KeyBuilder,
}

/// An endpoint's limits with everything a check needs prepared once, at start-up.
#[derive(Debug)]
struct PreparedEndpoint {
    limits: EndpointLimits,
    /// Shared by every event about this endpoint, so events allocate no endpoint string.
    endpoint: Arc<str>,
    /// Every limit, in the endpoint's order.
    all: Vec<PreparedLimit>,
    /// Indexes into `all` of the limits a check consults.
    active: Vec<usize>,
}

impl PreparedEndpoint {
    fn active(&self) -> impl Iterator<Item = &PreparedLimit> {
        self.active.iter().map(|&i| &self.all[i])
    }
}

/// An endpoint of a [`TokenBucketAdapter`], looked up once
/// ([`TokenBucketAdapter::endpoint`]): a layer that finds a request's endpoint on its own keeps
/// the handle, and its checks ([`TokenBucketAdapter::try_check_endpoint_now`]) skip the
/// adapter's lookup by name. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EndpointHandle(Arc<PreparedEndpoint>);

impl EndpointHandle {
    /// The endpoint's name.
    pub fn name(&self) -> &str {
        &self.0.endpoint
    }
}

/// Whether events and spans at DEBUG level can be enabled now (the static and the current
/// maximum level allow them): when not, a DEBUG span would be disabled, and building it costs
/// more than this check.
fn debug_enabled() -> bool {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    STATIC_MAX_LEVEL >= LevelFilter::DEBUG && LevelFilter::current() >= LevelFilter::DEBUG
}

/// Every limit's name with its bucket key, as [`TokenBucketAdapter::bucket_keys`] gives them.
pub type LimitKeys = Vec<(Arc<str>, BucketKey)>;

/// One bucket of an all-or-nothing check over arbitrary buckets
/// ([`TokenBucketAdapter::check_buckets`]): its key, its limit and the tokens to take.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct BucketCheck<'a> {
    /// The bucket's key.
    pub key: &'a BucketKey,
    /// Its limit (name and rule).
    pub limit: &'a Limit,
    /// Tokens to take; 0 only reads.
    pub cost: u64,
}

impl<'a> BucketCheck<'a> {
    /// A check of `key` under `limit` at `cost`.
    pub fn new(key: &'a BucketKey, limit: &'a Limit, cost: u64) -> Self {
        Self { key, limit, cost }
    }
}

/// The [`RateLimiter`] of the specification: token buckets in a [`BucketStore`](ratelimit_domain::BucketStore),
/// one or more named limits per endpoint checked all or nothing in one store call, events on
/// every check, and a [`FailurePolicy`] (fail-open by default) when the store cannot answer.
///
/// Build it with [`TokenBucketAdapter::builder`].
#[derive(Debug)]
pub struct TokenBucketAdapter {
    store: DynBucketStore,
    events: DynEventBus,
    /// What a check answers when the store fails.
    on_failure: OnFailure,
    /// Endpoint → prepared limits; one hash lookup per check.
    rules: HashMap<Box<str>, Arc<PreparedEndpoint>, crate::fnv::FnvBuildHasher>,
    /// Set once the store has not answered [`BucketStore::check_now`](ratelimit_domain::BucketStore::check_now)
    /// (a network store): [`try_check_now`](Self::try_check_now) then answers `None` before
    /// building the bucket key, rather than on every check of a store that never answers at
    /// once. Only a shortcut: `None` is always a correct answer.
    store_waits: AtomicBool,
}

/// What a check answers when its store fails: the [`FailurePolicy`], with the store that the
/// `local` policy decides with, so that `local` without a store cannot be represented.
#[derive(Debug)]
enum OnFailure {
    /// Allow, marked [`DecisionSource::FailOpen`].
    Open,
    /// Deny, marked [`DecisionSource::FailClosed`].
    Closed,
    /// Decide with an in-process store, marked [`DecisionSource::LocalFallback`].
    Local(DynBucketStore),
}

/// Builds a [`TokenBucketAdapter`].
#[derive(Debug)]
#[must_use]
pub struct TokenBucketAdapterBuilder {
    store: DynBucketStore,
    rules: RuleSet,
    events: Option<DynEventBus>,
    key_prefix: String,
    policy: FailurePolicy,
    fallback: Option<DynBucketStore>,
}

impl TokenBucketAdapterBuilder {
    /// Where events go (default: a [`BroadcastEventBus`] nobody listens to).
    pub fn events(mut self, events: DynEventBus) -> Self {
        self.events = Some(events);
        self
    }

    /// The first part of every key (default `rate_limit`, the specification's). Lets several
    /// services or tenants share one Redis without sharing buckets.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// What checks decide when the store fails (default [`FailurePolicy::Open`]).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The in-process store that decides under [`FailurePolicy::Local`] (typically a
    /// `MemoryStorage`); required by that policy.
    pub fn local_fallback(mut self, store: DynBucketStore) -> Self {
        self.fallback = Some(store);
        self
    }

    /// Prepares every rule.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`] for an empty key prefix; [`ErrorCode::Configuration`] for
    /// the `local` policy without a fallback store.
    pub fn build(self) -> Result<TokenBucketAdapter> {
        let on_failure = match (self.policy, self.fallback) {
            (FailurePolicy::Closed, _) => OnFailure::Closed,
            (FailurePolicy::Local, Some(fallback)) => OnFailure::Local(fallback),
            (FailurePolicy::Local, None) => {
                return Err(RateLimitError::new(
                    ErrorCode::Configuration,
                    "the local failure policy needs a fallback store (TokenBucketAdapterBuilder::local_fallback)",
                ));
            }
            // `Open`, and any policy added to the domain later until the adapter knows it: the
            // specification's default.
            _ => OnFailure::Open,
        };
        // The prefix is checked even without rules: `check_buckets` builds keys with it too.
        KeyBuilder::new(&self.key_prefix, RateLimitScope::Global, "-")?;
        let rules = self
            .rules
            .iter()
            .map(|(endpoint, limits)| {
                let all = limits
                    .limits()
                    .iter()
                    .map(|limit| {
                        Ok(PreparedLimit {
                            limit: limit.clone(),
                            keys: KeyBuilder::for_limit(&self.key_prefix, endpoint, limit)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let active = limits
                    .limits()
                    .iter()
                    .enumerate()
                    .filter(|(_, limit)| limits.active().any(|a| a.name() == limit.name()))
                    .map(|(i, _)| i)
                    .collect();
                let prepared = PreparedEndpoint {
                    limits: limits.clone(),
                    endpoint: endpoint.into(),
                    all,
                    active,
                };
                Ok((endpoint.into(), Arc::new(prepared)))
            })
            .collect::<Result<_>>()?;
        let events = self
            .events
            .unwrap_or_else(|| Arc::new(BroadcastEventBus::new(1)));
        Ok(TokenBucketAdapter {
            store: self.store,
            events,
            on_failure,
            rules,
            store_waits: AtomicBool::new(false),
        })
    }
}

impl TokenBucketAdapter {
    /// [`RateLimiter::is_allowed_opts`], without the boxed future of the `#[async_trait]`
    /// port: for callers that hold the adapter itself (the HTTP layer, on every request).
    ///
    /// # Errors
    /// As [`RateLimiter::is_allowed_opts`].
    pub async fn check_opts(
        &self,
        endpoint: &str,
        identifier: &str,
        options: CheckOptions,
    ) -> Result<RateLimitResult> {
        let Some(prepared) = self.rules.get(endpoint) else {
            return self.no_rule(endpoint);
        };
        let Some(&first) = prepared.active.first() else {
            return Ok(RateLimitResult::disabled(prepared.limits.limits()));
        };
        let span = tracing::debug_span!(
            "rate_limit_check",
            endpoint = &*prepared.endpoint,
            scope = prepared.all[first].limit.rule().scope().as_str(),
            outcome = field::Empty,
        );
        // A disabled span (DEBUG under the usual INFO filter) is not entered around every poll.
        if span.is_disabled() {
            self.check(prepared, identifier, options, &span).await
        } else {
            self.check(prepared, identifier, options, &span)
                .instrument(span.clone())
                .await
        }
    }

    /// [`check_opts`](Self::check_opts) decided without waiting, when it can be: `Some` with
    /// exactly what `check_opts` would answer, having done exactly what it would do; `None`
    /// when the check has to wait, and then the caller awaits `check_opts` instead (nothing
    /// was consumed).
    ///
    /// A check is decided at once when the endpoint has no rule or no enabled limit, or when
    /// it has one enabled limit, the store answers [`BucketStore::check_now`](ratelimit_domain::BucketStore::check_now) (an in-process
    /// store), nobody listens to the event bus (publishing may wait), the check's tracing span
    /// is disabled (nothing to instrument) and, should the store fail, the failure policy is
    /// open or closed (the local fallback is asked through its async port). It spares the
    /// request path of a layer the future of the async method, for the HTTP layer a boxed
    /// one per request.
    ///
    /// # Errors
    /// As [`RateLimiter::is_allowed_opts`].
    pub fn try_check_now(
        &self,
        endpoint: &str,
        identifier: &str,
        options: CheckOptions,
    ) -> Option<Result<RateLimitResult>> {
        let Some(prepared) = self.rules.get(endpoint) else {
            return Some(self.no_rule(endpoint));
        };
        self.try_check_prepared_now(prepared, identifier, options)
    }

    /// The endpoint called `endpoint`, for checks that skip the lookup by name
    /// ([`try_check_endpoint_now`](Self::try_check_endpoint_now)); `None` when it has no rule.
    pub fn endpoint(&self, endpoint: &str) -> Option<EndpointHandle> {
        self.rules.get(endpoint).cloned().map(EndpointHandle)
    }

    /// [`try_check_now`](Self::try_check_now) of an endpoint looked up before: the same answer,
    /// without finding the endpoint by its name again.
    ///
    /// `endpoint` must come from this adapter's [`endpoint`](Self::endpoint); one from another
    /// adapter is checked with its own rules against this adapter's store.
    ///
    /// # Errors
    /// As [`RateLimiter::is_allowed_opts`].
    pub fn try_check_endpoint_now(
        &self,
        endpoint: &EndpointHandle,
        identifier: &str,
        options: CheckOptions,
    ) -> Option<Result<RateLimitResult>> {
        self.try_check_prepared_now(&endpoint.0, identifier, options)
    }

    fn try_check_prepared_now(
        &self,
        prepared: &PreparedEndpoint,
        identifier: &str,
        options: CheckOptions,
    ) -> Option<Result<RateLimitResult>> {
        let [index] = prepared.active[..] else {
            return prepared
                .active
                .is_empty()
                .then(|| Ok(RateLimitResult::disabled(prepared.limits.limits())));
        };
        if self.store_waits.load(Ordering::Relaxed) || self.events.is_listening() {
            return None;
        }
        let one = &prepared.all[index];
        // A check whose span a subscriber wants is instrumented by `check_opts`. The span is
        // only built when DEBUG can be on at all: under the usual INFO filter, one load.
        if debug_enabled() {
            let span = tracing::debug_span!(
                "rate_limit_check",
                endpoint = &*prepared.endpoint,
                scope = one.limit.rule().scope().as_str(),
                outcome = field::Empty,
            );
            if !span.is_disabled() {
                return None;
            }
        }
        let key = match one.keys.key_in(identifier, KEY_BUFFER.take()) {
            Ok(key) => key,
            Err(err) => return Some(Err(err)),
        };
        let request =
            BucketRequest::new(&key, one.limit.rule()).with_cost(cost_of(options, &one.limit));
        let limits = [&one.limit];
        let result = match self.store.check_now(&request) {
            None => {
                self.store_waits.store(true, Ordering::Relaxed);
                None
            }
            Some(Ok(decision)) => Some(RateLimitResult::from_decisions(limits, &[decision])),
            Some(Err(err)) => self.on_failure_now(&err, &prepared.endpoint, &limits),
        };
        KEY_BUFFER.give_back(key.into_string());
        result.map(Ok)
    }

    /// The answer to an endpoint without a rule.
    fn no_rule(&self, endpoint: &str) -> Result<RateLimitResult> {
        let _ = self;
        tracing::debug!(endpoint, "no rate-limit rule for endpoint; allowing");
        Ok(RateLimitResult::no_rule())
    }

    /// A builder over `store` with `rules`.
    pub fn builder(store: DynBucketStore, rules: RuleSet) -> TokenBucketAdapterBuilder {
        TokenBucketAdapterBuilder {
            store,
            rules,
            events: None,
            key_prefix: KeyBuilder::DEFAULT_PREFIX.to_owned(),
            policy: FailurePolicy::Open,
            fallback: None,
        }
    }

    /// The limits of `endpoint`, if any.
    pub fn limits(&self, endpoint: &str) -> Option<&EndpointLimits> {
        self.rules.get(endpoint).map(|prepared| &prepared.limits)
    }

    /// Every endpoint with its limits, in no particular order (for layers that prepare
    /// per-endpoint data once, such as the HTTP layer's header values).
    pub fn endpoints(&self) -> impl Iterator<Item = (&str, &EndpointLimits)> {
        self.rules
            .iter()
            .map(|(endpoint, prepared)| (&**endpoint, &prepared.limits))
    }

    /// The store key of the endpoint's first limit's bucket, as this adapter builds it (for
    /// admin tools and tests); [`bucket_keys`](Self::bucket_keys) gives every limit's.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`](ratelimit_domain::ErrorCode::InvalidInput) for an unusable
    /// identifier.
    pub fn bucket_key(&self, endpoint: &str, identifier: &str) -> Option<Result<BucketKey>> {
        self.rules
            .get(endpoint)
            .map(|prepared| prepared.all[0].keys.key(identifier))
    }

    /// The store key of every limit of `endpoint` for `identifier`, with the limit's name.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`] for an unusable identifier.
    pub fn bucket_keys(&self, endpoint: &str, identifier: &str) -> Option<Result<LimitKeys>> {
        self.rules.get(endpoint).map(|prepared| {
            prepared
                .all
                .iter()
                .map(|p| Ok((p.limit.shared_name().clone(), p.keys.key(identifier)?)))
                .collect()
        })
    }

    /// One all-or-nothing check over arbitrary buckets, in one store call: each bucket takes
    /// its cost if every one has it, otherwise none takes anything. The adapter's failure
    /// policy, events (with `label` as their endpoint and `identifier` as given) and tracing
    /// apply as to an endpoint's check. For services whose limits are not a fixed set per
    /// endpoint (the Envoy rate-limit service, say). An empty `checks` is allowed, as an
    /// endpoint without a rule is.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`] when two checks name the same bucket.
    pub async fn check_buckets(
        &self,
        label: &Arc<str>,
        identifier: &str,
        checks: &[BucketCheck<'_>],
    ) -> Result<RateLimitResult> {
        let Some(first) = checks.first() else {
            return Ok(RateLimitResult::no_rule());
        };
        for (i, check) in checks.iter().enumerate() {
            if checks[..i].iter().any(|other| other.key == check.key) {
                return Err(RateLimitError::new(
                    ErrorCode::InvalidInput,
                    "the buckets of one check must be distinct",
                )
                .with_detail("key", check.key.as_str()));
            }
        }
        let limits: Vec<&Limit> = checks.iter().map(|check| check.limit).collect();
        let requests: Vec<BucketRequest<'_>> = checks
            .iter()
            .map(|check| BucketRequest::new(check.key, check.limit.rule()).with_cost(check.cost))
            .collect();
        let span = tracing::debug_span!(
            "rate_limit_check",
            endpoint = &**label,
            scope = first.limit.rule().scope().as_str(),
            outcome = field::Empty,
        );
        self.observed(label, identifier, first.cost, &limits, &requests, &span)
            .instrument(span.clone())
            .await
    }

    /// Publishes an event; a failing bus is logged and otherwise ignored.
    async fn publish(&self, event: RateLimitEvent) {
        let kind = event.kind();
        if let Err(err) = self.events.publish(event).await {
            tracing::warn!(error = %err, kind, "failed to publish rate-limit event; continuing");
        }
    }

    async fn check(
        &self,
        prepared: &PreparedEndpoint,
        identifier: &str,
        options: CheckOptions,
        span: &Span,
    ) -> Result<RateLimitResult> {
        let cost_of = |limit: &Limit| cost_of(options, limit);
        if let [index] = prepared.active[..] {
            // One limit: no vectors of keys, and the key in the thread's reused buffer.
            let one = &prepared.all[index];
            let key = one.keys.key_in(identifier, KEY_BUFFER.take())?;
            let request = BucketRequest::new(&key, one.limit.rule()).with_cost(cost_of(&one.limit));
            let result = self
                .observed(
                    &prepared.endpoint,
                    identifier,
                    request.cost,
                    &[&one.limit],
                    &[request],
                    span,
                )
                .await;
            KEY_BUFFER.give_back(key.into_string());
            return result;
        }
        let keys = prepared
            .active()
            .map(|p| p.keys.key(identifier))
            .collect::<Result<Vec<_>>>()?;
        let limits: Vec<&Limit> = prepared.active().map(|p| &p.limit).collect();
        let requests: Vec<BucketRequest<'_>> = limits
            .iter()
            .zip(&keys)
            .map(|(limit, key)| BucketRequest::new(key, limit.rule()).with_cost(cost_of(limit)))
            .collect();
        let cost = requests.first().map_or(0, |r| r.cost);
        self.observed(
            &prepared.endpoint,
            identifier,
            cost,
            &limits,
            &requests,
            span,
        )
        .await
    }

    /// Decides, with the `attempted` and `allowed`/`denied` events around the decision when
    /// anyone listens, and the outcome recorded on `span` (the check's own, which is current:
    /// passed in rather than looked up, which costs a registry lookup per check).
    async fn observed(
        &self,
        label: &Arc<str>,
        identifier: &str,
        cost: u64,
        limits: &[&Limit],
        requests: &[BucketRequest<'_>],
        span: &Span,
    ) -> Result<RateLimitResult> {
        let scope = limits
            .first()
            .map_or(RateLimitScope::Global, |limit| limit.rule().scope());
        // Events nobody receives are not built: no ids, no timestamps, no allocations.
        let listening = self.events.is_listening();
        let observed = if listening {
            let identifier: Arc<str> = identifier.into();
            self.publish(RateLimitEvent::attempted(
                label.clone(),
                identifier.clone(),
                scope,
                cost,
            ))
            .await;
            Some((identifier, Instant::now()))
        } else {
            None
        };

        let result = self.decide(label, limits, requests).await;
        // A disabled span still looks the field up by name: not on every check.
        if !span.is_disabled() {
            span.record("outcome", outcome(&result));
        }

        if let Some((identifier, started)) = observed {
            let elapsed = started.elapsed();
            let deciding = result.deciding();
            let scope = deciding.map_or(scope, |limit| limit.scope);
            let event = if result.allowed {
                RateLimitEvent::allowed(
                    label.clone(),
                    identifier,
                    scope,
                    result.remaining,
                    elapsed,
                    result.source,
                )
            } else {
                RateLimitEvent::denied(
                    label.clone(),
                    identifier,
                    scope,
                    result.retry_after,
                    elapsed,
                    result.source,
                )
                .with_refused_by(deciding.map(|limit| limit.name.clone()))
            };
            self.publish(event).await;
        }
        Ok(result)
    }

    /// Asks the store (one call, whatever the number of limits), or the failure policy when it
    /// fails.
    async fn decide(
        &self,
        label: &str,
        limits: &[&Limit],
        requests: &[BucketRequest<'_>],
    ) -> RateLimitResult {
        let answer = if let [one] = requests {
            // One limit: no vector of decisions; an in-process store answers without a future.
            let decision = match self.store.check_now(one) {
                Some(decision) => decision,
                None => self.store.check_and_consume(one).await,
            };
            decision.map(|decision| {
                RateLimitResult::from_decisions(limits.iter().copied(), &[decision])
            })
        } else {
            self.store
                .check_and_consume_all(requests)
                .await
                .map(|decisions| {
                    RateLimitResult::from_decisions(limits.iter().copied(), &decisions)
                })
        };
        match answer {
            Ok(result) => result,
            Err(err) => self.on_store_failure(&err, label, limits, requests).await,
        }
    }

    /// Applies the failure policy to a check whose store failed.
    async fn on_store_failure(
        &self,
        err: &RateLimitError,
        endpoint: &str,
        limits: &[&Limit],
        requests: &[BucketRequest<'_>],
    ) -> RateLimitResult {
        let OnFailure::Local(fallback) = &self.on_failure else {
            return self
                .on_failure_now(err, endpoint, limits)
                .unwrap_or_else(|| RateLimitResult::fail_open(limits.iter().copied()));
        };
        let code = err.code().as_str();
        let limits = limits.iter().copied();
        match ask(fallback, requests).await {
            Ok(decisions) => {
                tracing::warn!(error = %err, code, endpoint, "rate-limit store failed; deciding with the local fallback store");
                RateLimitResult::from_decisions(limits, &decisions)
                    .with_source(DecisionSource::LocalFallback)
            }
            Err(local) => {
                tracing::warn!(error = %err, local_error = %local, code, endpoint, "rate-limit store and local fallback failed; allowing the request (fail-open)");
                RateLimitResult::fail_open(limits)
            }
        }
    }

    /// The failure policy's answer to a check whose store failed, when it needs no store:
    /// `None` for the local fallback, which is asked through its async port.
    fn on_failure_now(
        &self,
        err: &RateLimitError,
        endpoint: &str,
        limits: &[&Limit],
    ) -> Option<RateLimitResult> {
        let code = err.code().as_str();
        let limits = limits.iter().copied();
        match &self.on_failure {
            OnFailure::Closed => {
                tracing::warn!(error = %err, code, endpoint, "rate-limit store failed; denying the request (fail-closed)");
                Some(RateLimitResult::fail_closed(limits))
            }
            OnFailure::Open => {
                tracing::warn!(error = %err, code, endpoint, "rate-limit store failed; allowing the request (fail-open)");
                Some(RateLimitResult::fail_open(limits))
            }
            OnFailure::Local(_) => None,
        }
    }

    /// Reads every active limit of `prepared` for `identifier`, consuming nothing.
    async fn read(&self, prepared: &PreparedEndpoint, identifier: &str) -> Result<RateLimitResult> {
        let keys = prepared
            .active()
            .map(|p| p.keys.key(identifier))
            .collect::<Result<Vec<_>>>()?;
        let limits: Vec<&Limit> = prepared.active().map(|p| &p.limit).collect();
        let requests: Vec<BucketRequest<'_>> = limits
            .iter()
            .zip(&keys)
            .map(|(limit, key)| BucketRequest::new(key, limit.rule()).with_cost(0))
            .collect();
        let endpoint = &*prepared.endpoint;
        let (decisions, source) = match peek(&self.store, &requests).await {
            Ok(decisions) => (Some(decisions), DecisionSource::Store),
            Err(err) => match &self.on_failure {
                OnFailure::Closed => {
                    tracing::warn!(error = %err, endpoint, "rate-limit store failed; reporting empty buckets (fail-closed)");
                    let empty = limits.iter().map(|_| BucketDecision {
                        allowed: true,
                        retry_after: std::time::Duration::ZERO,
                        remaining: 0,
                    });
                    (Some(empty.collect()), DecisionSource::FailClosed)
                }
                OnFailure::Local(fallback) => {
                    tracing::warn!(error = %err, endpoint, "rate-limit store failed; reporting the local fallback's buckets");
                    (
                        peek(fallback, &requests).await.ok(),
                        DecisionSource::LocalFallback,
                    )
                }
                OnFailure::Open => {
                    tracing::warn!(error = %err, endpoint, "rate-limit store failed; reporting full buckets (fail-open)");
                    (None, DecisionSource::FailOpen)
                }
            },
        };
        let outcomes = match decisions {
            Some(decisions) => limits
                .iter()
                .zip(&decisions)
                .map(|(limit, decision)| {
                    let mut outcome = LimitOutcome::from_decision(limit, *decision);
                    // A read takes nothing: whether the endpoint's cost is there now.
                    outcome.allowed = decision.remaining >= limit.rule().cost();
                    outcome
                })
                .collect(),
            None => limits
                .iter()
                .map(|limit| LimitOutcome::full(limit))
                .collect(),
        };
        Ok(RateLimitResult::from_outcomes(outcomes, source))
    }

    async fn reset_one(
        &self,
        endpoint: &str,
        identifier: &str,
        prepared: &PreparedLimit,
    ) -> Result<bool> {
        let key = prepared.keys.key(identifier)?;
        let rule = prepared.limit.rule();
        let limit = prepared.limit.name();
        if let OnFailure::Local(fallback) = &self.on_failure {
            // The local buckets are a stand-in for the shared ones: reset them too.
            if let Err(err) = fallback.reset(&key, rule).await {
                tracing::warn!(error = %err, endpoint, limit, "could not reset the local fallback bucket");
            }
        }
        match self.store.reset(&key, rule).await {
            Ok(existed) => {
                tracing::info!(endpoint, identifier, limit, existed, "rate limit reset");
                Ok(existed)
            }
            Err(err) => {
                tracing::error!(error = %err, endpoint, identifier, limit, "rate limit reset failed");
                Err(err)
            }
        }
    }
}

/// What a check takes from `limit`: the explicit cost of `options`, or the limit's own when
/// there is none (or it is zero).
fn cost_of(options: CheckOptions, limit: &Limit) -> u64 {
    options
        .cost
        .filter(|&cost| cost > 0)
        .unwrap_or(limit.rule().cost())
}

thread_local! {
    static KEY_CELL: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// The buffer a one-limit check builds its bucket key in, kept per thread between checks so
/// that a check allocates no key.
static KEY_BUFFER: crate::SpareString = crate::SpareString::new(&KEY_CELL);

/// One store call: the single-bucket call for one request, the all-or-nothing one otherwise.
async fn ask(
    store: &DynBucketStore,
    requests: &[BucketRequest<'_>],
) -> Result<Vec<BucketDecision>> {
    if let [one] = requests {
        Ok(vec![store.check_and_consume(one).await?])
    } else {
        store.check_and_consume_all(requests).await
    }
}

/// One read-only store call: the store's own read for one bucket, an all-or-nothing check at
/// cost 0 (which writes nothing) for several.
async fn peek(
    store: &DynBucketStore,
    requests: &[BucketRequest<'_>],
) -> Result<Vec<BucketDecision>> {
    if let [one] = requests {
        let remaining = store.get_remaining(one.key, one.rule, one.now).await?;
        Ok(vec![BucketDecision {
            allowed: true,
            retry_after: std::time::Duration::ZERO,
            remaining,
        }])
    } else {
        store.check_and_consume_all(requests).await
    }
}

fn outcome(result: &RateLimitResult) -> &'static str {
    match (result.allowed, result.source) {
        (false, DecisionSource::FailClosed) => "fail_closed",
        (false, _) => "denied",
        (true, DecisionSource::FailOpen) => "fail_open",
        (true, DecisionSource::LocalFallback) => "local_fallback",
        (true, _) => "allowed",
    }
}

#[async_trait]
impl RateLimiter for TokenBucketAdapter {
    async fn is_allowed_opts(
        &self,
        endpoint: &str,
        identifier: &str,
        options: CheckOptions,
    ) -> Result<RateLimitResult> {
        self.check_opts(endpoint, identifier, options).await
    }

    async fn get_remaining(&self, endpoint: &str, identifier: &str) -> Result<u64> {
        let Some(prepared) = self
            .rules
            .get(endpoint)
            .filter(|prepared| !prepared.active.is_empty())
        else {
            return Ok(0);
        };
        let status = self.read(prepared, identifier).await?;
        Ok(status
            .limits
            .iter()
            .map(|limit| limit.remaining)
            .min()
            .unwrap_or(0))
    }

    async fn reset(&self, endpoint: &str, identifier: &str) -> Result<bool> {
        let Some(prepared) = self.rules.get(endpoint) else {
            return Ok(false);
        };
        let single = prepared.limits.is_single();
        let mut existed = false;
        for limit in &prepared.all {
            if single || limit.limit.rule().scope() != RateLimitScope::Global {
                existed |= self.reset_one(endpoint, identifier, limit).await?;
            }
        }
        Ok(existed)
    }

    async fn status(&self, endpoint: &str, identifier: &str) -> Result<RateLimitResult> {
        let Some(prepared) = self.rules.get(endpoint) else {
            return Ok(RateLimitResult::no_rule());
        };
        if prepared.active.is_empty() {
            return Ok(RateLimitResult::disabled(prepared.limits.limits()));
        }
        self.read(prepared, identifier).await
    }

    async fn reset_limit(&self, endpoint: &str, identifier: &str, limit: &str) -> Result<bool> {
        let Some(prepared) = self
            .rules
            .get(endpoint)
            .and_then(|prepared| prepared.all.iter().find(|p| p.limit.name() == limit))
        else {
            return Err(RateLimitError::new(
                ErrorCode::InvalidInput,
                "the endpoint has no limit of that name",
            )
            .with_detail("endpoint", endpoint)
            .with_detail("limit", limit));
        };
        self.reset_one(endpoint, identifier, prepared).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use mockall::Sequence;
    use ratelimit_domain::{MockBucketStore, MockEventBus, RateLimitRule, RateLimiterExt};

    /// A mock store that, as a network store, never answers at once (`check_now` is `None`),
    /// so that checks reach the expectations set on `check_and_consume`.
    fn mock_store() -> MockBucketStore {
        let mut store = MockBucketStore::new();
        store.expect_check_now().returning(|_| None);
        store
    }

    use super::*;

    const LOGIN: &str = "POST /api/v1/sessions";

    fn rules() -> RuleSet {
        RuleSet::try_from_rules([
            (
                LOGIN,
                RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap(),
            ),
            (
                "POST /export",
                RateLimitRule::new(RateLimitScope::User, 10, 1.0)
                    .unwrap()
                    .with_cost(3)
                    .unwrap(),
            ),
            (
                "GET /off",
                RateLimitRule::new(RateLimitScope::Ip, 7, 1.0)
                    .unwrap()
                    .with_enabled(false),
            ),
        ])
        .unwrap()
    }

    fn adapter(store: MockBucketStore, mut events: MockEventBus) -> TokenBucketAdapter {
        events.expect_is_listening().return_const(true);
        TokenBucketAdapter::builder(Arc::new(store), rules())
            .events(Arc::new(events))
            .build()
            .unwrap()
    }

    fn allowed(remaining: u64) -> BucketDecision {
        BucketDecision {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining,
        }
    }

    fn unavailable() -> RateLimitError {
        RateLimitError::new(ErrorCode::StorageUnavailable, "connection refused")
    }

    /// An event bus that records what it is given.
    fn recording_bus() -> (MockEventBus, Arc<Mutex<Vec<RateLimitEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut bus = MockEventBus::new();
        bus.expect_is_listening().return_const(true);
        let sink = seen.clone();
        bus.expect_publish().returning(move |event| {
            sink.lock().unwrap().push(event);
            Ok(())
        });
        (bus, seen)
    }

    #[tokio::test]
    async fn a_store_that_answers_at_once_is_not_awaited_and_its_error_meets_the_policy() {
        let mut store = MockBucketStore::new();
        let mut answers = vec![Err(unavailable()), Ok(allowed(3))];
        store
            .expect_check_now()
            .withf(|request| request.key.as_str().ends_with(":POST /api/v1/sessions"))
            .times(2)
            .returning(move |_| answers.pop());
        store.expect_check_and_consume().never();
        let mut bus = MockEventBus::new();
        bus.expect_is_listening().return_const(false);
        let limiter = TokenBucketAdapter::builder(Arc::new(store), rules())
            .events(Arc::new(bus))
            .build()
            .unwrap();
        let result = limiter.is_allowed(LOGIN, "192.168.1.1").await.unwrap();
        assert!(result.allowed);
        assert_eq!(result.remaining, 3);
        assert_eq!(result.source, DecisionSource::Store);
        let failed_open = limiter.is_allowed(LOGIN, "192.168.1.1").await.unwrap();
        assert_eq!(failed_open.source, DecisionSource::FailOpen);
    }

    #[tokio::test]
    async fn a_bus_nobody_listens_to_gets_no_events_and_the_check_still_decides() {
        let mut store = mock_store();
        store
            .expect_check_and_consume()
            .times(2)
            .returning(|_| Ok(allowed(4)));
        store
            .expect_check_and_consume()
            .returning(|_| Err(unavailable()));
        let mut bus = MockEventBus::new();
        bus.expect_is_listening().times(3).return_const(false);
        bus.expect_publish().never();
        let limiter = TokenBucketAdapter::builder(Arc::new(store), rules())
            .events(Arc::new(bus))
            .build()
            .unwrap();
        for _ in 0..2 {
            let result = limiter.is_allowed(LOGIN, "192.168.1.1").await.unwrap();
            assert!(result.allowed);
            assert_eq!(result.remaining, 4);
            assert_eq!(result.source, DecisionSource::Store);
        }
        let failed_open = limiter.is_allowed(LOGIN, "192.168.1.1").await.unwrap();
        assert!(failed_open.allowed);
        assert_eq!(failed_open.source, DecisionSource::FailOpen);
    }

    #[tokio::test]
    async fn allowed_check_publishes_attempted_then_allowed_with_the_key_of_the_scope() {
        let mut store = mock_store();
        store
            .expect_check_and_consume()
            .withf(|request| {
                request.key.as_str() == "rate_limit:ip:192.168.1.1:POST /api/v1/sessions"
                    && request.rule.max_tokens() == 5
                    && request.cost == 1
                    && request.now.is_none()
            })
            .times(1)
            .returning(|_| Ok(allowed(4)));
        let (bus, seen) = recording_bus();

        let result = adapter(store, bus)
            .is_allowed(LOGIN, "192.168.1.1")
            .await
            .unwrap();
        assert!(result.allowed);
        assert_eq!(
            (result.remaining, result.limit, result.reset_seconds),
            (4, 5, 120)
        );
        assert_eq!(result.source, DecisionSource::Store);

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        let RateLimitEvent::Attempted(attempted) = &seen[0] else {
            panic!("first event: {:?}", seen[0])
        };
        assert_eq!(
            (
                &*attempted.endpoint,
                &*attempted.identifier,
                attempted.scope,
                attempted.cost
            ),
            (LOGIN, "192.168.1.1", RateLimitScope::Ip, 1)
        );
        let RateLimitEvent::Allowed(done) = &seen[1] else {
            panic!("second event: {:?}", seen[1])
        };
        assert_eq!(
            (done.remaining_tokens, done.source),
            (4, DecisionSource::Store)
        );
        assert_eq!(done.event_id.get_version_num(), 7);
        assert!(attempted.event_id < done.event_id);
    }

    #[tokio::test]
    async fn denied_check_publishes_denied_with_retry_after() {
        let mut store = mock_store();
        store.expect_check_and_consume().returning(|_| {
            Ok(BucketDecision {
                allowed: false,
                retry_after: Duration::from_millis(11_900),
                remaining: 0,
            })
        });
        let mut bus = MockEventBus::new();
        bus.expect_is_listening().return_const(true);
        let mut order = Sequence::new();
        bus.expect_publish()
            .withf(|e| matches!(e, RateLimitEvent::Attempted(_)))
            .times(1)
            .in_sequence(&mut order)
            .returning(|_| Ok(()));
        bus.expect_publish()
            .withf(|e| matches!(e, RateLimitEvent::Denied(d) if d.retry_after == Duration::from_millis(11_900) && &*d.identifier == "10.0.0.1"))
            .times(1)
            .in_sequence(&mut order)
            .returning(|_| Ok(()));

        let result = adapter(store, bus)
            .is_allowed(LOGIN, "10.0.0.1")
            .await
            .unwrap();
        assert!(!result.allowed);
        assert_eq!(result.retry_after, Duration::from_millis(11_900));
        assert_eq!(result.retry_after_whole_seconds(), Some(12));
    }

    #[tokio::test]
    async fn explicit_cost_overrides_the_rule_and_zero_means_the_rule() {
        let mut store = mock_store();
        let mut order = Sequence::new();
        for cost in [7, 3, 3] {
            store
                .expect_check_and_consume()
                .withf(move |request| request.cost == cost && request.now.is_none())
                .times(1)
                .in_sequence(&mut order)
                .returning(|_| Ok(allowed(0)));
        }
        let (bus, seen) = recording_bus();
        let limiter = adapter(store, bus);
        limiter
            .is_allowed_with_cost("POST /export", "alice", 7)
            .await
            .unwrap();
        limiter
            .is_allowed_with_cost("POST /export", "alice", 0)
            .await
            .unwrap();
        limiter.is_allowed("POST /export", "alice").await.unwrap();
        let costs: Vec<u64> = seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                RateLimitEvent::Attempted(a) => Some(a.cost),
                _ => None,
            })
            .collect();
        assert_eq!(costs, [7, 3, 3]);
    }

    #[tokio::test]
    async fn unknown_endpoint_is_allowed_without_store_or_events() {
        // Mocks with no expectations fail the test if called.
        let limiter = adapter(mock_store(), MockEventBus::new());
        let result = limiter.is_allowed("GET /unknown", "1.2.3.4").await.unwrap();
        assert!(result.allowed);
        assert_eq!(
            (result.remaining, result.limit, result.reset_seconds),
            (0, 0, 0)
        );
        assert_eq!(result.source, DecisionSource::NoRule);
        assert_eq!(
            limiter
                .get_remaining("GET /unknown", "1.2.3.4")
                .await
                .unwrap(),
            0
        );
        limiter.reset("GET /unknown", "1.2.3.4").await.unwrap();
    }

    #[tokio::test]
    async fn disabled_rule_is_allowed_with_a_full_bucket() {
        let limiter = adapter(mock_store(), MockEventBus::new());
        let result = limiter.is_allowed("GET /off", "1.2.3.4").await.unwrap();
        assert!(result.allowed);
        assert_eq!((result.remaining, result.limit), (7, 7));
        assert_eq!(result.source, DecisionSource::RuleDisabled);
        assert_eq!(
            limiter.get_remaining("GET /off", "1.2.3.4").await.unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn failing_store_fails_open_and_says_so_in_the_result_and_the_event() {
        let mut store = mock_store();
        store
            .expect_check_and_consume()
            .returning(|_| Err(unavailable()));
        store
            .expect_get_remaining()
            .returning(|_, _, _| Err(unavailable()));
        let (bus, seen) = recording_bus();
        let limiter = adapter(store, bus);

        let result = limiter.is_allowed(LOGIN, "1.2.3.4").await.unwrap();
        assert!(result.allowed);
        assert_eq!(result.source, DecisionSource::FailOpen);
        assert_eq!(
            (result.remaining, result.limit, result.reset_seconds),
            (5, 5, 120)
        );
        assert!(matches!(
            &seen.lock().unwrap()[1],
            RateLimitEvent::Allowed(a) if a.source == DecisionSource::FailOpen
        ));
        assert_eq!(limiter.get_remaining(LOGIN, "1.2.3.4").await.unwrap(), 5);
    }

    #[tokio::test]
    async fn failing_event_bus_does_not_change_the_decision() {
        let mut store = mock_store();
        store.expect_check_and_consume().times(1).returning(|_| {
            Ok(BucketDecision {
                allowed: false,
                retry_after: Duration::from_secs(3),
                remaining: 0,
            })
        });
        let mut bus = MockEventBus::new();
        bus.expect_is_listening().return_const(true);
        bus.expect_publish().times(2).returning(|_| {
            Err(RateLimitError::new(
                ErrorCode::EventPublishFailed,
                "bus down",
            ))
        });
        let result = adapter(store, bus)
            .is_allowed(LOGIN, "1.2.3.4")
            .await
            .unwrap();
        assert!(
            !result.allowed,
            "a failing bus must not turn a denial into an allow or an error"
        );
        assert_eq!(result.source, DecisionSource::Store);
    }

    #[tokio::test]
    async fn reset_reports_real_errors() {
        let mut store = mock_store();
        store
            .expect_reset()
            .times(1)
            .returning(|_, _| Err(unavailable().recoded(ErrorCode::ResetFailed)));
        let err = adapter(store, MockEventBus::new())
            .reset(LOGIN, "1.2.3.4")
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::ResetFailed);
    }

    #[tokio::test]
    async fn reset_and_get_remaining_use_the_bucket_key() {
        let mut store = mock_store();
        store
            .expect_reset()
            .withf(|key, _| key.as_str() == "rate_limit:user:alice:POST /export")
            .times(1)
            .returning(|_, _| Ok(true));
        store
            .expect_get_remaining()
            .withf(|key, _, now| {
                key.as_str() == "rate_limit:user:alice:POST /export" && now.is_none()
            })
            .times(1)
            .returning(|_, _, _| Ok(6));
        let limiter = adapter(store, MockEventBus::new());
        limiter.reset("POST /export", "alice").await.unwrap();
        assert_eq!(
            limiter
                .get_remaining("POST /export", "alice")
                .await
                .unwrap(),
            6
        );
    }

    #[tokio::test]
    async fn empty_identifier_is_a_clear_error_and_touches_nothing() {
        let limiter = adapter(mock_store(), MockEventBus::new());
        let err = limiter.is_allowed(LOGIN, "").await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidInput);
        assert_eq!(
            limiter.reset(LOGIN, "").await.unwrap_err().code(),
            ErrorCode::InvalidInput
        );
    }

    #[tokio::test]
    async fn custom_key_prefix() {
        let mut store = mock_store();
        store
            .expect_check_and_consume()
            .withf(|request| request.key.as_str() == "svc_a:ip:1.2.3.4:POST /api/v1/sessions")
            .returning(|_| Ok(allowed(4)));
        let limiter = TokenBucketAdapter::builder(Arc::new(store), rules())
            .key_prefix("svc_a")
            .build()
            .unwrap();
        assert!(limiter.is_allowed(LOGIN, "1.2.3.4").await.unwrap().allowed);
        assert!(
            TokenBucketAdapter::builder(Arc::new(mock_store()), rules())
                .key_prefix("")
                .build()
                .is_err()
        );
    }

    fn down_store() -> MockBucketStore {
        let mut store = mock_store();
        store
            .expect_check_and_consume()
            .returning(|_| Err(unavailable()));
        store
            .expect_get_remaining()
            .returning(|_, _, _| Err(unavailable()));
        store
            .expect_reset()
            .returning(|_, _| Err(unavailable().recoded(ErrorCode::ResetFailed)));
        store
    }

    #[tokio::test]
    async fn closed_policy_denies_when_the_store_fails_and_says_so() {
        let (bus, seen) = recording_bus();
        let limiter = TokenBucketAdapter::builder(Arc::new(down_store()), rules())
            .events(Arc::new(bus))
            .failure_policy(FailurePolicy::Closed)
            .build()
            .unwrap();
        let result = limiter.is_allowed(LOGIN, "1.2.3.4").await.unwrap();
        assert!(!result.allowed);
        assert_eq!(result.source, DecisionSource::FailClosed);
        assert_eq!(result.retry_after, Duration::from_secs(12));
        assert!(result.is_degraded());
        assert!(matches!(
            &seen.lock().unwrap()[1],
            RateLimitEvent::Denied(d) if d.source == DecisionSource::FailClosed
        ));
        assert_eq!(limiter.get_remaining(LOGIN, "1.2.3.4").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn local_policy_keeps_limiting_in_process_while_the_store_is_down() {
        let clock = ratelimit_domain::ManualClock::new(1_000.0);
        let local = Arc::new(ratelimit_memory::MemoryStorage::with_clock(clock));
        let limiter = TokenBucketAdapter::builder(Arc::new(down_store()), rules())
            .failure_policy(FailurePolicy::Local)
            .local_fallback(local)
            .build()
            .unwrap();
        for expected in [4, 3, 2, 1, 0] {
            let result = limiter.is_allowed(LOGIN, "1.2.3.4").await.unwrap();
            assert!(result.allowed);
            assert_eq!(result.remaining, expected);
            assert_eq!(result.source, DecisionSource::LocalFallback);
        }
        let denied = limiter.is_allowed(LOGIN, "1.2.3.4").await.unwrap();
        assert!(!denied.allowed);
        assert_eq!(denied.source, DecisionSource::LocalFallback);
        assert_eq!(limiter.get_remaining(LOGIN, "1.2.3.4").await.unwrap(), 0);
        // Reset reports the shared store's error, but the local bucket is refilled anyway.
        assert_eq!(
            limiter.reset(LOGIN, "1.2.3.4").await.unwrap_err().code(),
            ErrorCode::ResetFailed
        );
        assert_eq!(limiter.get_remaining(LOGIN, "1.2.3.4").await.unwrap(), 5);
    }

    #[tokio::test]
    async fn local_policy_needs_a_fallback_store() {
        let err = TokenBucketAdapter::builder(Arc::new(mock_store()), rules())
            .failure_policy(FailurePolicy::Local)
            .build()
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::Configuration);
    }

    #[tokio::test]
    async fn with_the_memory_fake_a_test_can_advance_time_instead_of_sleeping() {
        let clock = ratelimit_domain::ManualClock::new(1_000.0);
        let store = ratelimit_memory::MemoryStorage::with_clock(clock.clone());
        let limiter = TokenBucketAdapter::builder(Arc::new(store), rules())
            .build()
            .unwrap();
        for _ in 0..5 {
            assert!(limiter.is_allowed(LOGIN, "1.2.3.4").await.unwrap().allowed);
        }
        let denied = limiter.is_allowed(LOGIN, "1.2.3.4").await.unwrap();
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_secs(12));
        clock.advance(Duration::from_secs(12));
        assert!(limiter.is_allowed(LOGIN, "1.2.3.4").await.unwrap().allowed);
    }

    const SEARCH: &str = "GET /api/v1/search";

    /// A login per client IP and for everybody together, as the example.
    fn search_rules() -> RuleSet {
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

    /// Checks `identifier` on the search endpoint `n` times, each of which must be allowed.
    async fn admit(limiter: &TokenBucketAdapter, identifier: &str, n: usize) {
        for i in 0..n {
            let result = limiter.is_allowed(SEARCH, identifier).await.unwrap();
            assert!(
                result.allowed,
                "check {i} of {identifier} refused: {result:?}"
            );
        }
    }

    fn memory_adapter(clock: &ratelimit_domain::ManualClock) -> TokenBucketAdapter {
        let store = ratelimit_memory::MemoryStorage::with_clock(clock.clone());
        TokenBucketAdapter::builder(Arc::new(store), search_rules())
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn single_limit_checks_in_the_reused_key_buffer_keep_their_own_buckets() {
        let clock = ratelimit_domain::ManualClock::new(1_000.0);
        let store = ratelimit_memory::MemoryStorage::with_clock(clock.clone());
        let limiter = TokenBucketAdapter::builder(Arc::new(store), rules())
            .build()
            .unwrap();
        // Identifiers of different lengths, one after the other on one thread: each check's
        // key is built in the buffer the previous one left, and must be its own bucket.
        let checks = [
            ("203.0.113.10", 4),
            ("a", 4),
            ("2001:db8::1:2:3:4", 4),
            ("a", 3),
            ("203.0.113.1", 4),
        ];
        for (id, expected) in checks {
            let remaining = limiter.is_allowed(LOGIN, id).await.unwrap().remaining;
            assert_eq!(remaining, expected, "{id}");
        }
        for id in ["203.0.113.10", "2001:db8::1:2:3:4", "203.0.113.1"] {
            let status = limiter.status(LOGIN, id).await.unwrap();
            assert_eq!(status.remaining, 4, "{id}");
        }
        assert_eq!(limiter.status(LOGIN, "a").await.unwrap().remaining, 3);
    }

    #[tokio::test]
    async fn two_limits_are_checked_all_or_nothing_and_the_refusing_one_is_named() {
        let clock = ratelimit_domain::ManualClock::new(1_000.0);
        let limiter = memory_adapter(&clock);
        // Client a takes 10 (its own limit), client b takes 5: the shared 15 are gone.
        admit(&limiter, "10.0.0.1", 10).await;
        let tenth = limiter.is_allowed(SEARCH, "10.0.0.1").await.unwrap();
        assert!(!tenth.allowed);
        assert_eq!(
            tenth.refused().map(|l| &*l.name).collect::<Vec<_>>(),
            ["per-client"]
        );
        admit(&limiter, "10.0.0.2", 5).await;
        let refused = limiter.is_allowed(SEARCH, "10.0.0.2").await.unwrap();
        assert!(!refused.allowed);
        assert_eq!(
            refused.refused().map(|l| &*l.name).collect::<Vec<_>>(),
            ["everyone"]
        );
        assert_eq!(&*refused.deciding().unwrap().name, "everyone");
        assert_eq!((refused.limit, refused.remaining), (15, 0));
        assert_eq!(refused.retry_after, Duration::from_secs(4));
        let own = &refused.limits[0];
        assert!(own.allowed, "client b still had its own tokens");
        assert_eq!(own.remaining, 5);
        // Refused requests took nothing from client b's own bucket.
        for _ in 0..20 {
            assert!(
                !limiter
                    .is_allowed(SEARCH, "10.0.0.2")
                    .await
                    .unwrap()
                    .allowed
            );
        }
        let status = limiter.status(SEARCH, "10.0.0.2").await.unwrap();
        assert_eq!(
            status
                .limits
                .iter()
                .map(|l| (&*l.name, l.remaining, l.allowed))
                .collect::<Vec<_>>(),
            [("per-client", 5, true), ("everyone", 0, false)]
        );
        assert!(!status.allowed);
        assert_eq!(limiter.get_remaining(SEARCH, "10.0.0.2").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn reset_refills_the_identifier_s_buckets_and_a_global_one_only_by_name() {
        let clock = ratelimit_domain::ManualClock::new(1_000.0);
        let limiter = memory_adapter(&clock);
        admit(&limiter, "10.0.0.1", 10).await;
        assert!(limiter.reset(SEARCH, "10.0.0.1").await.unwrap());
        let status = limiter.status(SEARCH, "10.0.0.1").await.unwrap();
        assert_eq!(
            status
                .limits
                .iter()
                .map(|l| l.remaining)
                .collect::<Vec<_>>(),
            [10, 5],
            "the global limit must not be reset by an identifier's reset"
        );
        assert!(
            limiter
                .reset_limit(SEARCH, "anyone", "everyone")
                .await
                .unwrap()
        );
        let status = limiter.status(SEARCH, "10.0.0.1").await.unwrap();
        assert_eq!(status.limits[1].remaining, 15);
        let err = limiter
            .reset_limit(SEARCH, "x", "nobody")
            .await
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidInput);
        let keys = limiter.bucket_keys(SEARCH, "10.0.0.1").unwrap().unwrap();
        assert_eq!(
            keys.iter()
                .map(|(name, key)| format!("{name}={key}"))
                .collect::<Vec<_>>(),
            [
                "per-client=rate_limit:ip#per-client:10.0.0.1:GET /api/v1/search",
                "everyone=rate_limit:global#everyone:GET /api/v1/search",
            ]
        );
    }

    #[tokio::test]
    async fn one_store_call_per_check_whatever_the_number_of_limits() {
        let mut store = mock_store();
        store.expect_check_and_consume().never();
        store
            .expect_check_and_consume_all()
            .times(1)
            .returning(|requests| {
                assert_eq!(requests.len(), 2);
                assert!(
                    requests.iter().all(|r| r.cost == 3),
                    "the cost applies to every limit"
                );
                Ok(vec![
                    BucketDecision {
                        allowed: true,
                        retry_after: Duration::ZERO,
                        remaining: 7,
                    },
                    BucketDecision {
                        allowed: false,
                        retry_after: Duration::from_millis(1_500),
                        remaining: 1,
                    },
                ])
            });
        let (mut events, seen) = recording_bus();
        events.expect_is_listening().return_const(true);
        let limiter = TokenBucketAdapter::builder(Arc::new(store), search_rules())
            .events(Arc::new(events))
            .build()
            .unwrap();
        let result = limiter
            .is_allowed_with_cost(SEARCH, "10.0.0.1", 3)
            .await
            .unwrap();
        assert!(!result.allowed);
        assert_eq!(result.retry_after, Duration::from_millis(1_500));
        assert_eq!(result.retry_after_whole_seconds(), Some(2));
        let seen = seen.lock().unwrap();
        let RateLimitEvent::Denied(denied) = &seen[1] else {
            panic!("expected a denial, got {:?}", seen[1]);
        };
        assert_eq!(denied.refused_by.as_deref(), Some("everyone"));
        assert_eq!(denied.scope, RateLimitScope::Global);
    }

    #[tokio::test]
    async fn the_failure_policies_answer_for_every_limit() {
        let failing = || {
            let mut store = mock_store();
            store
                .expect_check_and_consume_all()
                .returning(|_| Err(unavailable()));
            store
        };
        let open = TokenBucketAdapter::builder(Arc::new(failing()), search_rules())
            .build()
            .unwrap();
        let result = open.is_allowed(SEARCH, "10.0.0.1").await.unwrap();
        assert!(result.allowed);
        assert_eq!(result.source, DecisionSource::FailOpen);
        assert_eq!(
            result
                .limits
                .iter()
                .map(|l| l.remaining)
                .collect::<Vec<_>>(),
            [10, 15]
        );
        let closed = TokenBucketAdapter::builder(Arc::new(failing()), search_rules())
            .failure_policy(FailurePolicy::Closed)
            .build()
            .unwrap();
        let result = closed.is_allowed(SEARCH, "10.0.0.1").await.unwrap();
        assert!(!result.allowed);
        assert_eq!(result.source, DecisionSource::FailClosed);
        assert_eq!(result.refused().count(), 2);
        let clock = ratelimit_domain::ManualClock::new(1_000.0);
        let local = TokenBucketAdapter::builder(Arc::new(failing()), search_rules())
            .failure_policy(FailurePolicy::Local)
            .local_fallback(Arc::new(ratelimit_memory::MemoryStorage::with_clock(
                clock.clone(),
            )))
            .build()
            .unwrap();
        for client in ["10.0.0.9", "10.0.0.7"] {
            for _ in 0..10 {
                let result = local.is_allowed(SEARCH, client).await.unwrap();
                assert_eq!(result.source, DecisionSource::LocalFallback);
            }
        }
        let result = local.is_allowed(SEARCH, "10.0.0.8").await.unwrap();
        assert!(
            !result.allowed,
            "the local fallback keeps the shared limit too"
        );
        assert_eq!(&*result.deciding().unwrap().name, "everyone");
    }

    #[tokio::test]
    async fn check_buckets_decides_arbitrary_buckets_all_or_nothing() {
        let clock = ratelimit_domain::ManualClock::new(1_000.0);
        let limiter = memory_adapter(&clock);
        let label: Arc<str> = "descriptors".into();
        let per_user = Limit::named(
            "user",
            RateLimitRule::new(RateLimitScope::Global, 2, 1.0).unwrap(),
        )
        .unwrap();
        let per_path = Limit::named(
            "path",
            RateLimitRule::new(RateLimitScope::Global, 5, 1.0).unwrap(),
        )
        .unwrap();
        let user_key = KeyBuilder::for_limit("rl", "domain|user_alice", &per_user)
            .unwrap()
            .key("")
            .unwrap();
        let path_key = KeyBuilder::for_limit("rl", "domain|path_/a", &per_path)
            .unwrap()
            .key("")
            .unwrap();
        let checks = [
            BucketCheck::new(&user_key, &per_user, 1),
            BucketCheck::new(&path_key, &per_path, 1),
        ];
        for _ in 0..2 {
            let result = limiter.check_buckets(&label, "", &checks).await.unwrap();
            assert!(result.allowed);
        }
        let refused = limiter.check_buckets(&label, "", &checks).await.unwrap();
        assert!(!refused.allowed);
        assert_eq!(
            refused.refused().map(|l| &*l.name).collect::<Vec<_>>(),
            ["user"]
        );
        assert_eq!(
            refused.limits[1].remaining, 3,
            "the path limit kept its tokens"
        );
        // No checks: allowed, as an endpoint without a rule.
        let none = limiter.check_buckets(&label, "", &[]).await.unwrap();
        assert!(none.allowed);
        assert_eq!(none.source, DecisionSource::NoRule);
        // The same bucket twice is a caller's bug, reported before anything is taken.
        let twice = [
            BucketCheck::new(&path_key, &per_path, 1),
            BucketCheck::new(&path_key, &per_path, 1),
        ];
        let err = limiter.check_buckets(&label, "", &twice).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidInput);
        let again = limiter
            .check_buckets(&label, "", &checks[1..])
            .await
            .unwrap();
        assert_eq!(again.remaining, 2);
    }

    /// Twin limiters over twin in-process stores whose clocks move together.
    fn twins() -> (
        ratelimit_domain::ManualClock,
        TokenBucketAdapter,
        TokenBucketAdapter,
    ) {
        let clock = ratelimit_domain::ManualClock::new(1_000.0);
        let twin = || {
            let store = ratelimit_memory::MemoryStorage::with_clock(clock.clone());
            TokenBucketAdapter::builder(Arc::new(store), rules())
                .build()
                .unwrap()
        };
        let (now, later) = (twin(), twin());
        (clock, now, later)
    }

    #[tokio::test]
    async fn a_check_decided_at_once_answers_as_the_awaited_check() {
        let (clock, now, later) = twins();
        // A third twin on the same clock, checked through endpoint handles.
        let handled = TokenBucketAdapter::builder(
            Arc::new(ratelimit_memory::MemoryStorage::with_clock(clock.clone())),
            rules(),
        )
        .build()
        .unwrap();
        // Endpoints with one limit, a disabled one, an unknown one; identifiers of two clients
        // and a hostile one; the rule's cost and explicit ones (zero meaning the rule's).
        let endpoints = [LOGIN, "POST /export", "GET /off", "GET /unknown"];
        let identifiers = ["192.0.2.1", "2001:db8::1", "a\nb", ""];
        let mut seed = 0x2545_f491_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % 1_000_003).unwrap() % n
        };
        let mut decided = 0;
        for step in 0..400 {
            let endpoint = endpoints[next(4)];
            let identifier = identifiers[next(4)];
            let options = match next(3) {
                0 => CheckOptions::default(),
                1 => CheckOptions::with_cost(0),
                _ => CheckOptions::with_cost(1 + next(4) as u64),
            };
            let at_once = now.try_check_now(endpoint, identifier, options);
            let awaited = later.check_opts(endpoint, identifier, options).await;
            match handled.endpoint(endpoint) {
                Some(handle) => {
                    assert_eq!(handle.name(), endpoint);
                    let by_handle = handled.try_check_endpoint_now(&handle, identifier, options);
                    assert_eq!(
                        format!("{by_handle:?}"),
                        format!("{at_once:?}"),
                        "step {step}: by handle"
                    );
                }
                None => assert!(handled.limits(endpoint).is_none(), "{endpoint}"),
            }
            match (at_once, awaited) {
                (Some(Ok(a)), Ok(b)) => {
                    assert_eq!(a, b, "step {step}: {endpoint} {identifier:?} {options:?}");
                    decided += usize::from(a.source == DecisionSource::Store);
                }
                (Some(Err(a)), Err(b)) => assert_eq!(a.code(), b.code(), "step {step}"),
                (a, b) => panic!("step {step}: at once {a:?}, awaited {b:?}"),
            }
            if next(4) == 0 {
                clock.advance(Duration::from_millis(next(5_000) as u64));
            }
        }
        assert!(decided > 100, "only {decided} checks reached the store");
    }

    #[tokio::test]
    async fn a_check_that_has_to_wait_is_left_to_the_awaited_method_having_taken_nothing() {
        let waits = |limiter: &TokenBucketAdapter, endpoint: &str| {
            limiter
                .try_check_now(endpoint, "1.2.3.4", CheckOptions::default())
                .is_none()
        };
        // A network store (no answer at once): asked once, then not again.
        let mut network = MockBucketStore::new();
        network.expect_check_now().times(1).returning(|_| None);
        let limiter = TokenBucketAdapter::builder(Arc::new(network), rules())
            .build()
            .unwrap();
        assert!(waits(&limiter, LOGIN));
        assert!(waits(&limiter, LOGIN));
        assert!(waits(&limiter, "POST /export"));

        // Someone listens to the events: publishing them may wait.
        let (bus, seen) = recording_bus();
        let clock = ratelimit_domain::ManualClock::new(1_000.0);
        let store = Arc::new(ratelimit_memory::MemoryStorage::with_clock(clock.clone()));
        let listened = TokenBucketAdapter::builder(store.clone(), rules())
            .events(Arc::new(bus))
            .build()
            .unwrap();
        assert!(waits(&listened, LOGIN));
        assert!(seen.lock().unwrap().is_empty());

        // Several limits: one store call over all of them, through the async port.
        let several = TokenBucketAdapter::builder(store.clone(), search_rules())
            .build()
            .unwrap();
        assert!(waits(&several, SEARCH));
        assert_eq!(
            several.get_remaining(SEARCH, "1.2.3.4").await.unwrap(),
            10,
            "nothing was taken"
        );

        // A store that fails at once, under the local policy: the fallback is asked later.
        let mut failing = MockBucketStore::new();
        failing
            .expect_check_now()
            .returning(|_| Some(Err(unavailable())));
        let fallback = Arc::new(ratelimit_memory::MemoryStorage::with_clock(clock));
        let local = TokenBucketAdapter::builder(Arc::new(failing), rules())
            .failure_policy(FailurePolicy::Local)
            .local_fallback(fallback.clone())
            .build()
            .unwrap();
        assert!(waits(&local, LOGIN));
        let decided = local
            .check_opts(LOGIN, "1.2.3.4", CheckOptions::default())
            .await
            .unwrap();
        assert_eq!(decided.source, DecisionSource::LocalFallback);
        assert_eq!(decided.remaining, 4, "the fallback took one token, once");

        // The same failure under the open and closed policies is decided at once.
        for (policy, source) in [
            (FailurePolicy::Open, DecisionSource::FailOpen),
            (FailurePolicy::Closed, DecisionSource::FailClosed),
        ] {
            let mut failing = MockBucketStore::new();
            failing
                .expect_check_now()
                .returning(|_| Some(Err(unavailable())));
            let limiter = TokenBucketAdapter::builder(Arc::new(failing), rules())
                .failure_policy(policy)
                .build()
                .unwrap();
            let result = limiter
                .try_check_now(LOGIN, "1.2.3.4", CheckOptions::default())
                .unwrap()
                .unwrap();
            assert_eq!(result.source, source);
        }
    }
}
