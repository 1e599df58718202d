//! The tower layer and service.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::MatchedPath;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use ratelimit_adapter::{
    CheckOptions, DecisionSource, DynRateLimiter, EndpointHandle, EndpointLimits, ErrorCode,
    RateLimitError, RateLimitResult, RateLimitScope, RuleSet, TokenBucketAdapter,
};
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, field};

use crate::headers::{DecisionHeaders, EndpointHeaders, HeaderStyle, RATELIMIT_POLICY};
use crate::identify::{
    DefaultExtractor, GLOBAL_IDENTIFIER, IdentifierExtractor, IdentifyRequest, Rejection,
};
use crate::metrics::RateLimitMetrics;

/// What the layer does with a check that failed open (the store could not be asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailOpenPolicy {
    /// Let the request through, without rate-limit headers (the default): the store gave no
    /// real numbers. A fail-open decision never produces a 429.
    #[default]
    Allow,
    /// Answer `503 Service Unavailable` (fail closed), for endpoints that must never run
    /// unlimited.
    ServiceUnavailable,
}

/// Where the layer finds a request's route when axum's [`MatchedPath`] is absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnmatchedPolicy {
    /// Use the URI path (the default): right for plain tower services, whose routes have no
    /// templates.
    #[default]
    UriPath,
    /// Let the request through untouched: only axum route templates are ever limited.
    Skip,
}

/// Where the layer looks rules up: a rule set of its own, or the adapter's.
#[derive(Debug, Clone)]
enum Rules {
    Set(Arc<RuleSet>),
    Adapter(Arc<TokenBucketAdapter>),
}

impl Rules {
    fn endpoints(&self) -> Vec<(&str, &EndpointLimits)> {
        match self {
            Self::Set(rules) => rules.iter().collect(),
            Self::Adapter(adapter) => adapter.endpoints().collect(),
        }
    }
}

/// What the layer needs of one endpoint on every request, prepared once.
#[derive(Debug)]
struct Endpoint {
    /// `METHOD /route/template`, as the limiter knows it.
    name: Arc<str>,
    /// Whether any limit is enabled; a disabled endpoint passes untouched.
    enabled: bool,
    /// The scope whose identifier the check uses: that of the first enabled limit that needs
    /// one, or global.
    scope: RateLimitScope,
    /// The smallest capacity of the enabled limits: a request costing more never passes.
    max_cost: u64,
    /// The header values that do not change per request, and the numbers for the others.
    headers: EndpointHeaders,
    /// The on-path decision counters, when the layer has metrics.
    counters: Option<EndpointCounters>,
    /// The adapter's own handle of the endpoint, when the layer checks through an adapter
    /// ([`RateLimitLayer::from_adapter`]): its checks skip the adapter's lookup by name.
    handle: Option<EndpointHandle>,
}

/// The decision counters of one endpoint, created once: counting a request increments one of
/// them, without a lookup or an allocation.
#[derive(Debug)]
struct EndpointCounters {
    allowed: Counter,
    fail_open: Counter,
    local_fallback: Counter,
    rejected: Counter,
    error: Counter,
    /// Per enabled limit, in the order of the endpoint's header items.
    denied: Vec<Counter>,
    /// Per enabled limit, likewise.
    fail_closed: Vec<Counter>,
}

impl EndpointCounters {
    fn new(metrics: &RateLimitMetrics, endpoint: &str, headers: &EndpointHeaders) -> Self {
        let per_limit = |outcome| {
            headers
                .items()
                .iter()
                .map(|item| metrics.decision_counter(endpoint, &item.limit, outcome))
                .collect()
        };
        Self {
            allowed: metrics.decision_counter(endpoint, "", "allowed"),
            fail_open: metrics.decision_counter(endpoint, "", "fail_open"),
            local_fallback: metrics.decision_counter(endpoint, "", "local_fallback"),
            rejected: metrics.decision_counter(endpoint, "", "rejected"),
            error: metrics.decision_counter(endpoint, "", "error"),
            denied: per_limit("denied"),
            fail_closed: per_limit("fail_closed"),
        }
    }
}

impl Endpoint {
    /// Counts one decision, if the layer has metrics.
    fn count(&self, shared: &Shared, outcome: Outcome<'_>) {
        let (Some(counters), Some(metrics)) = (&self.counters, &shared.metrics) else {
            return;
        };
        let counter = match outcome {
            Outcome::Allowed => &counters.allowed,
            Outcome::FailOpen => &counters.fail_open,
            Outcome::LocalFallback => &counters.local_fallback,
            Outcome::Rejected => &counters.rejected,
            Outcome::Error => &counters.error,
            Outcome::Denied(limit) | Outcome::FailClosed(limit) => {
                let closed = matches!(outcome, Outcome::FailClosed(_));
                let counters = if closed {
                    &counters.fail_closed
                } else {
                    &counters.denied
                };
                let index = self
                    .headers
                    .items()
                    .iter()
                    .position(|item| *item.limit == *limit);
                match index.and_then(|i| counters.get(i)) {
                    Some(counter) => counter,
                    None => {
                        // A limit the layer's rules do not know (rule sets out of step): the
                        // one case that looks its counter up.
                        let outcome = if closed { "fail_closed" } else { "denied" };
                        metrics.decision_counter(&self.name, limit, outcome).inc();
                        return;
                    }
                }
            }
        };
        counter.inc();
    }
}

/// A decision as the on-path counters see it.
#[derive(Debug, Clone, Copy)]
enum Outcome<'a> {
    Allowed,
    /// Refused by this limit.
    Denied(&'a str),
    FailOpen,
    /// Refused by the fail-closed policy, attributed to this limit.
    FailClosed(&'a str),
    LocalFallback,
    Rejected,
    Error,
}

type FnvMap<K, V> = HashMap<K, V, ratelimit_adapter::FnvBuildHasher>;

/// Endpoints by method, then by route: looked up with the request's method and matched path
/// as they are, without building the `METHOD /path` string.
#[derive(Debug, Default)]
struct EndpointTable {
    /// Route templates by method, each giving its endpoint's index in `endpoints`.
    by_method: FnvMap<Method, FnvMap<Box<str>, usize>>,
    /// Every route with its endpoint's index: compared one by one when there are at most
    /// [`SCAN_AT_MOST`] of them (cheaper than hashing the method and the path), looked up in
    /// `by_method` otherwise.
    routes: Vec<(Method, Box<str>, usize)>,
    endpoints: Vec<Endpoint>,
}

/// The most routes [`EndpointTable::find`] compares one by one.
const SCAN_AT_MOST: usize = 8;

impl EndpointTable {
    fn build(
        rules: &Rules,
        policy_names: &HashMap<String, String>,
        metrics: Option<&RateLimitMetrics>,
    ) -> Self {
        let mut table = Self::default();
        for (name, limits) in rules.endpoints() {
            // An endpoint that is not `METHOD path` can never match a request.
            let Some((method, path)) = name.split_once(' ') else {
                continue;
            };
            let Ok(method) = Method::from_bytes(method.as_bytes()) else {
                continue;
            };
            let mut scopes = limits
                .active()
                .map(|limit| limit.rule().scope())
                .filter(|scope| scope.uses_identifier());
            let scope = scopes.next().unwrap_or(RateLimitScope::Global);
            if scopes.any(|other| other != scope) {
                tracing::warn!(
                    endpoint = name,
                    "the limits of this endpoint use identifiers of different scopes; the layer \
                     identifies requests by the first one's scope for all of them"
                );
            }
            let headers =
                EndpointHeaders::new(name, limits, policy_names.get(name).map(String::as_str));
            let endpoint = Endpoint {
                name: name.into(),
                enabled: limits.enabled(),
                scope,
                max_cost: limits
                    .active()
                    .map(|limit| limit.rule().max_tokens())
                    .min()
                    .unwrap_or(0),
                counters: metrics.map(|metrics| EndpointCounters::new(metrics, name, &headers)),
                headers,
                handle: match rules {
                    Rules::Adapter(adapter) => adapter.endpoint(name),
                    Rules::Set(_) => None,
                },
            };
            let index = table.endpoints.len();
            table.endpoints.push(endpoint);
            table.routes.push((method.clone(), path.into(), index));
            table
                .by_method
                .entry(method)
                .or_default()
                .insert(path.into(), index);
        }
        table
    }

    /// The index of the endpoint of `method` and `path`.
    fn find(&self, method: &Method, path: &str) -> Option<usize> {
        if self.routes.len() <= SCAN_AT_MOST {
            return self
                .routes
                .iter()
                .find(|(m, p, _)| **p == *path && m == method)
                .map(|&(_, _, index)| index);
        }
        self.by_method.get(method)?.get(path).copied()
    }

    fn at(&self, index: usize) -> Option<&Endpoint> {
        self.endpoints.get(index)
    }
}

/// What a request-cost function is asked about.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct CostRequest<'a> {
    /// The request, without its body (which has not been read).
    pub parts: &'a Parts,
    /// The endpoint, `METHOD /route/template`.
    pub endpoint: &'a str,
}

/// A request-cost function ([`RateLimitLayer::request_cost`]).
type CostFn = dyn Fn(&CostRequest<'_>) -> Result<Option<u64>, Rejection> + Send + Sync;

#[derive(Clone)]
struct Shared {
    limiter: DynRateLimiter,
    rules: Rules,
    /// Built from `rules` and `policy_names` whenever either changes (at construction only).
    endpoints: Arc<EndpointTable>,
    extractor: Arc<dyn IdentifierExtractor>,
    /// `extractor` itself when it is a [`DefaultExtractor`]: asked with the request's headers
    /// and extensions, without taking the request apart.
    default_extractor: Option<DefaultExtractor>,
    header_style: HeaderStyle,
    policy_names: HashMap<String, String>,
    fail_open: FailOpenPolicy,
    unmatched: UnmatchedPolicy,
    cost: Option<Arc<CostFn>>,
    problem_details: bool,
    /// Where the on-path decision counters live, if anywhere.
    metrics: Option<RateLimitMetrics>,
}

impl Shared {
    fn rebuild(&mut self) {
        self.endpoints = Arc::new(EndpointTable::build(
            &self.rules,
            &self.policy_names,
            self.metrics.as_ref(),
        ));
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .field("extractor", &self.extractor)
            .field("header_style", &self.header_style)
            .field("policy_names", &self.policy_names)
            .field("fail_open", &self.fail_open)
            .field("unmatched", &self.unmatched)
            .field("request_cost", &self.cost.is_some())
            .field("problem_details", &self.problem_details)
            .field("metrics", &self.metrics.is_some())
            .finish_non_exhaustive()
    }
}

/// A [`tower::Layer`] that rate-limits HTTP requests by endpoint.
///
/// For each request the layer:
///
/// 1. Finds the endpoint `METHOD /route/template` from axum's [`MatchedPath`] (so
///    `/users/17` and `/users/18` share the limits of `GET /users/{id}`); without one, from
///    the URI path ([`UnmatchedPolicy`]). A `HEAD` request without limits of its own uses the
///    `GET` limits of its route, since axum answers it with the `GET` handler.
/// 2. Lets the request through untouched when the endpoint has no limits or only disabled
///    ones.
/// 3. Asks the request-cost function, if any ([`request_cost`](Self::request_cost)), what
///    the request costs, and the [`IdentifierExtractor`] for the buckets' identifier
///    ([`DefaultExtractor`] by default: client IP, authenticated user, nothing for global
///    limits); a [`Rejection`] is answered as it is.
/// 4. Checks every limit of the endpoint at once, all or nothing. Denied: `429 Too Many
///    Requests` with `Retry-After` and the rate-limit headers ([`HeaderStyle`]), with a JSON
///    or problem-details body ([`problem_details`](Self::problem_details)). Allowed: the
///    inner service's response, with the rate-limit headers added. Failed open: see
///    [`FailOpenPolicy`]. Failed closed (the adapter's `closed` failure policy): `503 Service
///    Unavailable` with `Retry-After`. A check error: `400 Bad Request` when the limiter
///    rejects the identifier as input (an empty one from a custom extractor), `500 Internal
///    Server Error` otherwise.
///
/// Every decision runs in a `rate_limit` tracing span at DEBUG level (off, and free, under the
/// usual INFO filter; the INFO and WARN events carry the endpoint themselves) with `endpoint`,
/// `scope`, `outcome`
/// (`allowed`, `denied`, `fail_open`, `fail_closed`, `rejected` or `error`) and, on a denial,
/// `refused_by` (the deciding limit's name).
///
/// The per-endpoint header values that do not change per request (`RateLimit-Policy`) are
/// built once, when the layer is configured.
///
/// Cheap to clone; clones share their configuration.
#[derive(Debug, Clone)]
#[must_use]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// A layer over `limiter`, reading the limits' capacities and refill rates (for the
    /// headers) from `rules`, which must be the rules `limiter` was built with.
    pub fn new(limiter: DynRateLimiter, rules: RuleSet) -> Self {
        Self::with_rules(limiter, Rules::Set(Arc::new(rules)))
    }

    /// A layer over a [`TokenBucketAdapter`], which is both the limiter and the rule set
    /// (with `ratelimit-container`: `RateLimitLayer::from_adapter(container.adapter().clone())`).
    pub fn from_adapter(adapter: Arc<TokenBucketAdapter>) -> Self {
        Self::with_rules(adapter.clone(), Rules::Adapter(adapter))
    }

    fn with_rules(limiter: DynRateLimiter, rules: Rules) -> Self {
        let policy_names = HashMap::new();
        Self {
            shared: Arc::new(Shared {
                limiter,
                endpoints: Arc::new(EndpointTable::build(&rules, &policy_names, None)),
                rules,
                extractor: Arc::new(DefaultExtractor::new()),
                default_extractor: Some(DefaultExtractor::new()),
                header_style: HeaderStyle::default(),
                policy_names,
                fail_open: FailOpenPolicy::default(),
                unmatched: UnmatchedPolicy::default(),
                cost: None,
                problem_details: false,
                metrics: None,
            }),
        }
    }

    fn edit(mut self, change: impl FnOnce(&mut Shared)) -> Self {
        change(Arc::make_mut(&mut self.shared));
        self
    }

    /// Replaces the identifier extractor (for example a [`DefaultExtractor`] that trusts
    /// proxies).
    pub fn extractor(self, extractor: impl IdentifierExtractor) -> Self {
        self.edit(|s| {
            s.default_extractor = (&extractor as &dyn std::any::Any)
                .downcast_ref::<DefaultExtractor>()
                .cloned();
            s.extractor = Arc::new(extractor);
        })
    }

    /// Chooses the informational headers (default [`HeaderStyle::Ietf`]).
    pub fn header_style(self, style: HeaderStyle) -> Self {
        self.edit(|s| s.header_style = style)
    }

    /// Names the policy of a single-limit `endpoint` in the `RateLimit-Policy` and
    /// `RateLimit` headers (default: the endpoint itself, e.g. `"POST /api/v1/sessions"`).
    /// The limits of a multi-limit endpoint are always shown under their own names.
    pub fn policy_name(self, endpoint: impl Into<String>, name: impl Into<String>) -> Self {
        self.edit(|s| {
            s.policy_names.insert(endpoint.into(), name.into());
            s.rebuild();
        })
    }

    /// Chooses what a fail-open decision does (default [`FailOpenPolicy::Allow`]).
    pub fn on_fail_open(self, policy: FailOpenPolicy) -> Self {
        self.edit(|s| s.fail_open = policy)
    }

    /// Chooses what a request without [`MatchedPath`] is limited as (default
    /// [`UnmatchedPolicy::UriPath`]).
    pub fn unmatched(self, policy: UnmatchedPolicy) -> Self {
        self.edit(|s| s.unmatched = policy)
    }

    /// Gives requests a cost of their own (a batch's size, say), taken from every limit of
    /// the endpoint instead of the limits' configured costs.
    ///
    /// The function runs before the body is read, on every limited request, and must be
    /// cheap. It answers:
    ///
    /// - `Ok(None)`: the limits' own costs (as without a function);
    /// - `Ok(Some(n))` with `n ≥ 1`: `n` tokens from every limit, all or nothing;
    /// - `Err(rejection)`: the request is answered with the rejection (for example `400`
    ///   for a header that is not a number).
    ///
    /// `Ok(Some(0))` is answered `400 Bad Request` (`invalid_cost`): a request that costs
    /// nothing would not be limited at all. A cost above the smallest capacity of the
    /// endpoint's limits can never be allowed, however long the client waits; it is answered
    /// `400 Bad Request` (`cost_too_large`) with the `RateLimit-Policy` header, without
    /// asking the store.
    ///
    /// ```
    /// use http::StatusCode;
    /// use ratelimit_http::{RateLimitLayer, Rejection};
    /// # fn layer(layer: RateLimitLayer) -> RateLimitLayer {
    /// layer.request_cost(|request| {
    ///     let Some(value) = request.parts.headers.get("x-batch-size") else {
    ///         return Ok(None); // one item: the limits' own costs
    ///     };
    ///     value
    ///         .to_str()
    ///         .ok()
    ///         .and_then(|text| text.parse::<u64>().ok())
    ///         .map(Some)
    ///         .ok_or_else(|| {
    ///             Rejection::new(StatusCode::BAD_REQUEST, "invalid_batch_size", "x-batch-size must be a number")
    ///         })
    /// })
    /// # }
    /// ```
    pub fn request_cost<F>(self, cost: F) -> Self
    where
        F: Fn(&CostRequest<'_>) -> Result<Option<u64>, Rejection> + Send + Sync + 'static,
    {
        self.edit(|s| s.cost = Some(Arc::new(cost)))
    }

    /// Answers a `429` with an RFC 9457 problem-details body (`application/problem+json`)
    /// of the draft's quota-exceeded type, listing the limits that refused in
    /// `violated-policies`, instead of the default JSON body.
    pub fn problem_details(self, enabled: bool) -> Self {
        self.edit(|s| s.problem_details = enabled)
    }

    /// Counts every decision of this layer in `metrics`, on the request path:
    /// `ratelimit_http_decisions_total{endpoint,limit,outcome}` (see [`DecisionLabels`]).
    /// The counters of every endpoint, limit and outcome are registered now, at zero; a
    /// request increments one of them, without allocating. Unlike the event-derived
    /// counters, these never skip a decision under load.
    ///
    /// [`DecisionLabels`]: crate::DecisionLabels
    pub fn metrics(self, metrics: &RateLimitMetrics) -> Self {
        self.edit(|s| {
            s.metrics = Some(metrics.clone());
            s.rebuild();
        })
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The [`tower::Service`] made by [`RateLimitLayer`].
///
/// Its response body type must be buildable from a `String` (axum's `Body` is), for the
/// responses the layer writes itself (429, 401, 500, …).
#[derive(Debug, Clone)]
pub struct RateLimitService<S> {
    inner: S,
    shared: Arc<Shared>,
}

pin_project! {
    /// The future of [`RateLimitService`]: the inner service's own future when the check was
    /// decided at once (an in-process store, nothing to instrument), an answer of the layer's
    /// own, or, when the check waits for its store, one boxed future for the check and the
    /// inner service.
    pub struct ResponseFuture<F, T, E> {
        #[pin]
        kind: Kind<F, T, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, T, E> {
        /// The inner service's future, whose response gets `headers`.
        Inner {
            #[pin]
            future: F,
            headers: Option<DecisionHeaders>,
        },
        /// The layer's own answer.
        Ready {
            answer: std::future::Ready<Result<T, E>>,
        },
        /// A check that waits for its store, then the inner service.
        Waiting {
            future: Pin<Box<dyn Future<Output = Result<T, E>> + Send>>,
        },
    }
}

impl<F, T, E> ResponseFuture<F, T, E> {
    fn inner(future: F, headers: Option<DecisionHeaders>) -> Self {
        Self {
            kind: Kind::Inner { future, headers },
        }
    }

    fn ready(response: T) -> Self {
        Self {
            kind: Kind::Ready {
                answer: std::future::ready(Ok(response)),
            },
        }
    }

    fn waiting(future: Pin<Box<dyn Future<Output = Result<T, E>> + Send>>) -> Self {
        Self {
            kind: Kind::Waiting { future },
        }
    }
}

impl<F, T, E> fmt::Debug for ResponseFuture<F, T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { .. } => "inner",
            Kind::Ready { .. } => "ready",
            Kind::Waiting { .. } => "waiting",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F, B, E> Future for ResponseFuture<F, Response<B>, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future, headers } => {
                let mut response = std::task::ready!(future.poll(cx))?;
                if let Some(headers) = headers.take() {
                    headers.write(response.headers_mut());
                }
                Poll::Ready(Ok(response))
            }
            KindProj::Ready { answer } => Pin::new(answer).poll(cx),
            KindProj::Waiting { future } => future.as_mut().poll(cx),
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimitService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: 'static,
    ReqBody: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let shared = &self.shared;
        let Some((index, endpoint)) = endpoint_of(shared, &request).filter(|(_, e)| e.enabled)
        else {
            return ResponseFuture::inner(self.inner.call(request), None);
        };
        // DEBUG, not INFO: at the usual INFO filter a disabled span costs one level check, and
        // nothing is formatted; the INFO and WARN events below carry the endpoint themselves.
        let built;
        let span: &Span = if debug_enabled() {
            built = tracing::debug_span!(
                "rate_limit",
                endpoint = %endpoint.name,
                scope = endpoint.scope.as_str(),
                outcome = field::Empty,
                refused_by = field::Empty,
            );
            &built
        } else {
            // What the span would be (disabled), without building it or dropping it.
            &NO_SPAN
        };
        let prepared = match &shared.default_extractor {
            // The default extractor reads the headers and extensions alone: the request stays
            // whole (taking it apart and back together moves it twice).
            Some(default) if shared.cost.is_none() => within(span, || {
                identify(endpoint, span, None, |identifier| {
                    default.identify_parts_into(
                        request.headers(),
                        request.extensions(),
                        endpoint.scope,
                        identifier,
                    )
                })
            }),
            _ => {
                let (parts, body) = request.into_parts();
                let prepared = within(span, || prepare(shared, endpoint, &parts, span));
                request = Request::from_parts(parts, body);
                prepared
            }
        };
        let (identifier, cost) = match prepared {
            Ok(prepared) => prepared,
            Err(response) => {
                endpoint.count(shared, Outcome::Rejected);
                return ResponseFuture::ready(response);
            }
        };
        let options = cost.map_or_else(CheckOptions::default, CheckOptions::with_cost);
        // An in-process store decides at once: no future to box, the inner service's own
        // future returned as it is. A disabled span has nothing to instrument.
        if span.is_disabled()
            && let Rules::Adapter(adapter) = &shared.rules
            && let Some(checked) = match &endpoint.handle {
                Some(handle) => adapter.try_check_endpoint_now(handle, &identifier, options),
                None => adapter.try_check_now(&endpoint.name, &identifier, options),
            }
        {
            // Decided here, so the service that was polled ready serves the request at once:
            // no clone of it. The usual answer (the store allowed) goes straight through.
            if let Ok(result) = &checked
                && result.allowed
                && result.source == DecisionSource::Store
            {
                let headers = allowed(shared, endpoint, &identifier, cost, result, span);
                recycle(identifier);
                return ResponseFuture::inner(self.inner.call(request), Some(headers));
            }
            return match decide(shared, endpoint, identifier, cost, checked, span) {
                Plan::Respond(response) => ResponseFuture::ready(response),
                Plan::Pass { headers } => ResponseFuture::inner(self.inner.call(request), headers),
            };
        }
        // The service that was polled ready serves this request from the boxed future; a fresh
        // clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = shared.clone();
        let span = span.clone();
        ResponseFuture::waiting(Box::pin(async move {
            let Some(endpoint) = shared.endpoints.at(index) else {
                return inner.call(request).await;
            };
            // Not inside `span`: the adapter records its own `outcome` into the current span.
            let checked = match &shared.rules {
                // The layer's limiter is this adapter (`from_adapter`): its own method, without
                // the port's boxed future.
                Rules::Adapter(adapter) => {
                    adapter
                        .check_opts(&endpoint.name, &identifier, options)
                        .await
                }
                Rules::Set(_) => {
                    shared
                        .limiter
                        .is_allowed_opts(&endpoint.name, &identifier, options)
                        .await
                }
            };
            match decide(&shared, endpoint, identifier, cost, checked, &span) {
                Plan::Respond(response) => Ok(response),
                Plan::Pass { headers } => {
                    // A disabled span (DEBUG under the usual INFO filter) is not entered around
                    // every poll of the inner service.
                    let mut response = if span.is_disabled() {
                        inner.call(request).await?
                    } else {
                        inner.call(request).instrument(span).await?
                    };
                    if let Some(headers) = headers {
                        headers.write(response.headers_mut());
                    }
                    Ok(response)
                }
            }
        }))
    }
}

/// The endpoint of a request, with its index, if it has limits.
fn endpoint_of<'a, B>(shared: &'a Shared, request: &Request<B>) -> Option<(usize, &'a Endpoint)> {
    let path = match request.extensions().get::<MatchedPath>() {
        Some(matched) => matched.as_str(),
        None => match shared.unmatched {
            UnmatchedPolicy::UriPath => request.uri().path(),
            _ => return None,
        },
    };
    let method = request.method();
    let index = match shared.endpoints.find(method, path) {
        Some(index) => index,
        None if method == Method::HEAD => shared.endpoints.find(&Method::GET, path)?,
        None => return None,
    };
    Some((index, shared.endpoints.at(index)?))
}

/// Turns the check's answer into a plan, and gives back the identifier's buffer.
fn decide<B: From<String>>(
    shared: &Shared,
    endpoint: &Endpoint,
    identifier: Cow<'static, str>,
    cost: Option<u64>,
    checked: Result<RateLimitResult, RateLimitError>,
    span: &Span,
) -> Plan<B> {
    let result = match checked {
        Ok(result) => result,
        Err(err) => {
            recycle(identifier);
            endpoint.count(shared, Outcome::Error);
            let rejection = span.in_scope(|| check_error(span, &endpoint.name, &err));
            return Plan::Respond(rejection_response(&rejection));
        }
    };
    let plan = within(span, || {
        plan(shared, endpoint, &identifier, cost, &result, span)
    });
    recycle(identifier);
    plan
}

/// The identifier of the request's buckets and its own cost, or the answer to send instead.
fn prepare<B: From<String>>(
    shared: &Shared,
    endpoint: &Endpoint,
    parts: &Parts,
    span: &Span,
) -> Result<(Cow<'static, str>, Option<u64>), Response<B>> {
    let cost = match &shared.cost {
        None => None,
        Some(cost_of) => {
            let cost = cost_of(&CostRequest {
                parts,
                endpoint: &endpoint.name,
            });
            match cost {
                Ok(None) => None,
                Ok(Some(0)) => {
                    return Err(rejected(
                        span,
                        &endpoint.name,
                        &Rejection::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_cost",
                            "this request would cost nothing; a request costs at least one token",
                        ),
                    ));
                }
                Ok(Some(cost)) if cost > endpoint.max_cost => {
                    let mut response = rejected(
                        span,
                        &endpoint.name,
                        &Rejection::new(
                            StatusCode::BAD_REQUEST,
                            "cost_too_large",
                            format!(
                                "this request costs {cost} tokens; this endpoint allows at most {} per request",
                                endpoint.max_cost
                            ),
                        ),
                    );
                    if shared.header_style.ietf()
                        && let Some(policy) = endpoint.headers.policy()
                    {
                        response
                            .headers_mut()
                            .insert(RATELIMIT_POLICY, policy.clone());
                    }
                    return Err(response);
                }
                Ok(Some(cost)) => Some(cost),
                Err(rejection) => return Err(rejected(span, &endpoint.name, &rejection)),
            }
        }
    };
    identify(endpoint, span, cost, |identifier| {
        let request = IdentifyRequest {
            parts,
            endpoint: &endpoint.name,
            scope: endpoint.scope,
        };
        shared.extractor.identify_into(&request, identifier)
    })
}

/// The identifier of the request's buckets, written by `write` into the thread's buffer, with
/// `cost`; or the answer to send instead.
fn identify<B: From<String>>(
    endpoint: &Endpoint,
    span: &Span,
    cost: Option<u64>,
    write: impl FnOnce(&mut String) -> Result<(), Rejection>,
) -> Result<(Cow<'static, str>, Option<u64>), Response<B>> {
    if !endpoint.scope.uses_identifier() {
        // A global limit keys no identifier: nothing to allocate.
        return Ok((Cow::Borrowed(GLOBAL_IDENTIFIER), cost));
    }
    let mut identifier = IDENTIFIER_BUFFER.take();
    match write(&mut identifier) {
        Ok(()) => Ok((Cow::Owned(identifier), cost)),
        Err(rejection) => {
            IDENTIFIER_BUFFER.give_back(identifier);
            Err(rejected(span, &endpoint.name, &rejection))
        }
    }
}

thread_local! {
    static IDENTIFIER_CELL: std::cell::Cell<String> =
        const { std::cell::Cell::new(String::new()) };
}

/// The buffer the extractor writes a request's identifier into, kept per thread between
/// requests so that identifying a request allocates nothing.
static IDENTIFIER_BUFFER: ratelimit_adapter::SpareString =
    ratelimit_adapter::SpareString::new(&IDENTIFIER_CELL);

/// The `rate_limit` span of a request when DEBUG cannot be on: disabled, and never dropped.
static NO_SPAN: Span = Span::none();

/// Whether spans at DEBUG level can be enabled now (the static and the current maximum level
/// allow them); when not, the layer's `rate_limit` span is not built.
fn debug_enabled() -> bool {
    use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
    STATIC_MAX_LEVEL >= LevelFilter::DEBUG && LevelFilter::current() >= LevelFilter::DEBUG
}

/// Runs `f` inside `span`, or simply runs it when the span is disabled (entering and leaving a
/// disabled span still costs a few checks per request).
fn within<R>(span: &Span, f: impl FnOnce() -> R) -> R {
    if span.is_disabled() {
        f()
    } else {
        span.in_scope(f)
    }
}

/// Gives back the identifier's buffer, if it has one.
fn recycle(identifier: Cow<'static, str>) {
    if let Cow::Owned(buffer) = identifier {
        IDENTIFIER_BUFFER.give_back(buffer);
    }
}

/// Records and logs a rejection in the current span, and answers it.
fn rejected<B: From<String>>(span: &Span, endpoint: &str, rejection: &Rejection) -> Response<B> {
    span.record("outcome", "rejected");
    tracing::warn!(
        endpoint,
        status = rejection.status().as_u16(),
        code = rejection.code(),
        "request rejected: {}",
        rejection.message()
    );
    rejection_response(rejection)
}

/// The answer to a check that returned an error.
fn check_error(span: &Span, endpoint: &str, err: &ratelimit_adapter::RateLimitError) -> Rejection {
    span.record("outcome", "error");
    if err.code() == ErrorCode::InvalidInput {
        tracing::warn!(endpoint, error = %err, "rate-limit check rejected the request's identifier");
        Rejection::new(StatusCode::BAD_REQUEST, "invalid_identity", err.message())
    } else {
        tracing::error!(endpoint, error = %err, "rate-limit check failed");
        Rejection::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "rate_limit_error",
            "the rate limiter could not check this request",
        )
    }
}

/// What to do with a checked request.
enum Plan<B> {
    /// Answer without calling the inner service.
    Respond(Response<B>),
    /// Call the inner service, and add `headers` to its response.
    Pass { headers: Option<DecisionHeaders> },
}

/// Turns a decision into a plan, recording and logging the outcome in the current span.
fn plan<B: From<String>>(
    shared: &Shared,
    endpoint: &Endpoint,
    identifier: &str,
    cost: Option<u64>,
    result: &RateLimitResult,
    span: &Span,
) -> Plan<B> {
    match result.source {
        // Real numbers: the shared store's, or the local fallback store's.
        DecisionSource::Store | DecisionSource::LocalFallback => {}
        DecisionSource::FailOpen => {
            endpoint.count(shared, Outcome::FailOpen);
            span.record("outcome", "fail_open");
            tracing::warn!(
                endpoint = &*endpoint.name,
                identifier,
                "rate-limit store unavailable; check failed open"
            );
            return match shared.fail_open {
                FailOpenPolicy::ServiceUnavailable => Plan::Respond(unavailable(None)),
                _ => Plan::Pass { headers: None },
            };
        }
        DecisionSource::FailClosed => {
            let limit = result.deciding().map_or("", |limit| &*limit.name);
            endpoint.count(shared, Outcome::FailClosed(limit));
            span.record("outcome", "fail_closed");
            tracing::warn!(
                endpoint = &*endpoint.name,
                identifier,
                "rate-limit store unavailable; check failed closed"
            );
            let retry = result.retry_after_whole_seconds().filter(|&s| s > 0);
            return Plan::Respond(unavailable(retry));
        }
        // No rule or a disabled one on the limiter's side (rule sets out of step): untouched.
        _ => {
            endpoint.count(shared, Outcome::Allowed);
            span.record("outcome", "allowed");
            return Plan::Pass { headers: None };
        }
    }
    if result.allowed {
        return Plan::Pass {
            headers: Some(allowed(shared, endpoint, identifier, cost, result, span)),
        };
    }
    span.record("outcome", "denied");
    let refused_by = result.deciding().map(|limit| &*limit.name);
    endpoint.count(shared, Outcome::Denied(refused_by.unwrap_or("")));
    if let Some(name) = refused_by {
        span.record("refused_by", name);
    }
    let retry_after = result.retry_after_whole_seconds();
    tracing::info!(
        endpoint = &*endpoint.name,
        identifier,
        refused_by,
        retry_after_s = retry_after,
        "rate limit exceeded"
    );
    let mut response = if shared.problem_details {
        quota_exceeded(endpoint, result, retry_after)
    } else {
        too_many_requests(&endpoint.name, result, retry_after)
    };
    endpoint
        .headers
        .write(result, cost, shared.header_style, response.headers_mut());
    Plan::Respond(response)
}

/// Counts and logs an allowed decision with real numbers (the store's or the local
/// fallback's), and builds its headers.
fn allowed(
    shared: &Shared,
    endpoint: &Endpoint,
    identifier: &str,
    cost: Option<u64>,
    result: &RateLimitResult,
    span: &Span,
) -> DecisionHeaders {
    endpoint.count(
        shared,
        if result.source == DecisionSource::LocalFallback {
            Outcome::LocalFallback
        } else {
            Outcome::Allowed
        },
    );
    // A disabled span still looks the field up by name: not on the common path.
    if !span.is_disabled() {
        span.record("outcome", "allowed");
    }
    tracing::debug!(
        identifier,
        remaining = result.remaining,
        "rate limit check allowed"
    );
    endpoint.headers.values(result, cost, shared.header_style)
}

/// A JSON response whose header map is allocated once, with room for `content-type` and `room`
/// more fields (those the caller adds, and the `content-length` the server adds): it never
/// grows.
fn json_response<B: From<String>>(
    status: StatusCode,
    content_type: &'static str,
    body: &serde_json::Value,
    room: usize,
) -> Response<B> {
    let mut response = Response::new(B::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.reserve(1 + room);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn rejection_response<B: From<String>>(rejection: &Rejection) -> Response<B> {
    json_response(
        rejection.status(),
        "application/json",
        &serde_json::json!({ "error": rejection.code(), "message": rejection.message() }),
        // `content-length`, and `Retry-After` or `RateLimit-Policy`.
        2,
    )
}

/// `503 Service Unavailable`, with `Retry-After` when a wait is known.
fn unavailable<B: From<String>>(retry_after: Option<u64>) -> Response<B> {
    let mut response = rejection_response(&Rejection::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "rate_limit_unavailable",
        "the rate limiter is unavailable; try again later",
    ));
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn denial_message(retry_after: Option<u64>) -> String {
    match retry_after {
        Some(seconds) => format!("rate limit exceeded; retry in {seconds} s"),
        None => "this request costs more than the rate limit ever allows".to_owned(),
    }
}

fn too_many_requests<B: From<String>>(
    endpoint: &str,
    result: &RateLimitResult,
    retry_after: Option<u64>,
) -> Response<B> {
    json_response(
        StatusCode::TOO_MANY_REQUESTS,
        "application/json",
        &serde_json::json!({
            "error": "rate_limited",
            "message": denial_message(retry_after),
            "endpoint": endpoint,
            "limit": result.limit,
            "remaining": result.remaining,
            "retry_after": retry_after,
        }),
        crate::headers::RESERVE,
    )
}

/// The problem type of a request refused by a quota
/// (draft-ietf-httpapi-ratelimit-headers, "Quota Exceeded").
pub const QUOTA_EXCEEDED_TYPE: &str =
    "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// The `429` with an RFC 9457 problem-details body of the quota-exceeded type.
fn quota_exceeded<B: From<String>>(
    endpoint: &Endpoint,
    result: &RateLimitResult,
    retry_after: Option<u64>,
) -> Response<B> {
    json_response(
        StatusCode::TOO_MANY_REQUESTS,
        "application/problem+json",
        &serde_json::json!({
            "type": QUOTA_EXCEEDED_TYPE,
            "title": "Request cannot be satisfied as assigned quota has been exceeded",
            "status": 429,
            "detail": denial_message(retry_after),
            "violated-policies": endpoint.headers.violated_policies(result),
        }),
        crate::headers::RESERVE,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use std::convert::Infallible;

    use axum::body::Body;
    use ratelimit_adapter::RateLimitRule;
    use ratelimit_container::{Container, ContainerConfig};

    use super::*;

    /// An inner service that counts its clones.
    #[derive(Debug)]
    struct Counted(Arc<std::sync::atomic::AtomicUsize>);

    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Self(self.0.clone())
        }
    }

    impl Service<Request<Body>> for Counted {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            std::future::ready(Ok(Response::new(Body::empty())))
        }
    }

    /// The table finds every route, by comparing them one by one when there are few and by
    /// hashing when there are many, with the same answers, and nothing for an unknown method
    /// or path.
    #[test]
    fn the_endpoint_table_finds_routes_whether_it_scans_or_hashes() {
        // 2 and 8 routes are scanned, 10 and 80 hashed.
        for count in [1, SCAN_AT_MOST / 2, SCAN_AT_MOST / 2 + 1, 40] {
            let rules = RuleSet::try_from_rules((0..count).flat_map(|i| {
                let rule = RateLimitRule::new(RateLimitScope::Global, 5, 5.0).unwrap();
                [
                    (format!("GET /r{i}"), rule.clone()),
                    (format!("POST /r{i}/{{id}}"), rule),
                ]
            }))
            .unwrap();
            let table = EndpointTable::build(&Rules::Set(Arc::new(rules)), &HashMap::new(), None);
            assert_eq!(table.routes.len(), 2 * count);
            for i in 0..count {
                for (method, path) in [
                    (Method::GET, format!("/r{i}")),
                    (Method::POST, format!("/r{i}/{{id}}")),
                ] {
                    let found = table.find(&method, &path).unwrap();
                    let name = &table.at(found).unwrap().name;
                    assert_eq!(**name, format!("{method} {path}"), "{count} routes");
                }
                assert_eq!(table.find(&Method::PUT, &format!("/r{i}")), None);
                assert_eq!(table.find(&Method::GET, &format!("/r{i}/{{id}}")), None);
            }
            assert_eq!(table.find(&Method::GET, "/r"), None);
            assert_eq!(table.find(&Method::GET, ""), None);
        }
    }

    /// A layer over an adapter keeps the adapter's handle of every endpoint (its checks then
    /// skip the adapter's lookup by name); a layer over a plain limiter and its rules has none.
    #[tokio::test]
    async fn endpoints_of_an_adapter_carry_its_handles() {
        let rules = RuleSet::try_from_rules(["GET /a", "POST /b/{id}"].map(|endpoint| {
            (
                endpoint,
                RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap(),
            )
        }))
        .unwrap();
        let container = Container::build(ContainerConfig::memory(rules.clone()))
            .await
            .unwrap();
        let adapter = RateLimitLayer::from_adapter(container.adapter().clone());
        assert_eq!(adapter.shared.endpoints.endpoints.len(), 2);
        for endpoint in &adapter.shared.endpoints.endpoints {
            let handle = endpoint.handle.as_ref().expect("a handle");
            assert_eq!(handle.name(), &*endpoint.name);
        }
        let plain = RateLimitLayer::new(container.adapter().clone(), rules);
        assert!(
            plain
                .shared
                .endpoints
                .endpoints
                .iter()
                .all(|e| e.handle.is_none())
        );
    }

    /// On the memory store with nobody listening to the events, the check is made in `call` and
    /// the layer's future is the inner service's own, the service that was polled ready serving
    /// the request without a clone; with a listener it waits in a boxed one, which takes the
    /// service and leaves a clone in its place. Both answer the same.
    #[tokio::test]
    async fn an_in_process_check_returns_the_inner_future_without_a_box() {
        for (events, kind, clones) in [(false, "inner", 0), (true, "waiting", 6)] {
            let rules = RuleSet::try_from_rules([(
                "GET /x",
                RateLimitRule::new(RateLimitScope::Global, 5, 5.0).unwrap(),
            )])
            .unwrap();
            let container =
                Container::build(ContainerConfig::memory(rules).with_event_logging(events))
                    .await
                    .unwrap();
            let layer = RateLimitLayer::from_adapter(container.adapter().clone());
            let cloned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut service = layer.layer(Counted(cloned.clone()));
            for remaining in (0..5).rev() {
                let request = Request::get("/x").body(Body::empty()).unwrap();
                let future = service.call(request);
                assert!(
                    format!("{future:?}").contains(kind),
                    "events {events}: {future:?}"
                );
                let response = future.await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let t = if remaining == 0 { 12 } else { 0 };
                assert_eq!(
                    response.headers()["ratelimit"],
                    format!("\"GET /x\";r={remaining};t={t}").as_str()
                );
            }
            let refused = service
                .call(Request::get("/x").body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(refused.headers()["retry-after"], "12");
            assert_eq!(
                cloned.load(std::sync::atomic::Ordering::Relaxed),
                clones,
                "events {events}: clones of the inner service"
            );
        }
    }
}
