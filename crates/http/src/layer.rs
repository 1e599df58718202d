//! The tower layer and service.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::MatchedPath;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use ratelimit_adapter::{
    DecisionSource, DynRateLimiter, EndpointLimits, ErrorCode, RateLimitResult, RateLimitRule,
    RateLimiterExt, RuleSet, TokenBucketAdapter,
};
use tower::{Layer, Service};
use tracing::{Instrument as _, field};

use crate::headers::{HeaderNumbers, HeaderStyle, rate_limit_headers};
use crate::identify::{
    DefaultExtractor, GLOBAL_IDENTIFIER, IdentifierExtractor, IdentifyRequest, Rejection,
};

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
    fn get(&self, endpoint: &str) -> Option<&EndpointLimits> {
        match self {
            Self::Set(rules) => rules.get(endpoint),
            Self::Adapter(adapter) => adapter.limits(endpoint),
        }
    }
}

#[derive(Clone)]
struct Shared {
    limiter: DynRateLimiter,
    rules: Rules,
    extractor: Arc<dyn IdentifierExtractor>,
    header_style: HeaderStyle,
    policy_names: HashMap<String, String>,
    fail_open: FailOpenPolicy,
    unmatched: UnmatchedPolicy,
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
            .finish_non_exhaustive()
    }
}

/// A [`tower::Layer`] that rate-limits HTTP requests by endpoint.
///
/// For each request the layer:
///
/// 1. Builds the endpoint `METHOD /route/template` from axum's [`MatchedPath`] (so
///    `/users/17` and `/users/18` share the rule of `GET /users/{id}`); without one, from the
///    URI path ([`UnmatchedPolicy`]). A `HEAD` request without a rule of its own uses the
///    `GET` rule of its route, since axum answers it with the `GET` handler.
/// 2. Lets the request through untouched when the endpoint has no rule or a disabled one.
/// 3. Asks the [`IdentifierExtractor`] for the bucket's identifier ([`DefaultExtractor`] by
///    default: client IP, authenticated user, nothing for global rules); a [`Rejection`] is
///    answered as it is.
/// 4. Checks the limiter. Denied: `429 Too Many Requests` with `Retry-After` and the
///    rate-limit headers ([`HeaderStyle`]). Allowed: the inner service's response, with the
///    rate-limit headers added. Failed open: see [`FailOpenPolicy`]. Failed closed (the
///    adapter's `closed` failure policy): `503 Service Unavailable` with `Retry-After`.
///    A check error: `400 Bad Request` when the limiter rejects the identifier as input
///    (an empty one from a custom extractor), `500 Internal Server Error` otherwise.
///
/// Every decision runs in a `rate_limit` tracing span with `endpoint`, `scope` and
/// `outcome` (`allowed`, `denied`, `fail_open`, `rejected` or `error`).
///
/// Cheap to clone; clones share their configuration.
#[derive(Debug, Clone)]
#[must_use]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// A layer over `limiter`, reading rule capacities and refill rates (for the headers)
    /// from `rules`, which must be the rules `limiter` was built with.
    pub fn new(limiter: DynRateLimiter, rules: RuleSet) -> Self {
        Self::with_rules(limiter, Rules::Set(Arc::new(rules)))
    }

    /// A layer over a [`TokenBucketAdapter`], which is both the limiter and the rule set
    /// (with `ratelimit-container`: `RateLimitLayer::from_adapter(container.adapter().clone())`).
    pub fn from_adapter(adapter: Arc<TokenBucketAdapter>) -> Self {
        Self::with_rules(adapter.clone(), Rules::Adapter(adapter))
    }

    fn with_rules(limiter: DynRateLimiter, rules: Rules) -> Self {
        Self {
            shared: Arc::new(Shared {
                limiter,
                rules,
                extractor: Arc::new(DefaultExtractor::new()),
                header_style: HeaderStyle::default(),
                policy_names: HashMap::new(),
                fail_open: FailOpenPolicy::default(),
                unmatched: UnmatchedPolicy::default(),
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
        self.edit(|s| s.extractor = Arc::new(extractor))
    }

    /// Chooses the informational headers (default [`HeaderStyle::Both`]).
    pub fn header_style(self, style: HeaderStyle) -> Self {
        self.edit(|s| s.header_style = style)
    }

    /// Names the policy of `endpoint` in the `RateLimit-Policy` and `RateLimit` headers
    /// (default: the endpoint itself, e.g. `"POST /api/v1/sessions"`).
    pub fn policy_name(self, endpoint: impl Into<String>, name: impl Into<String>) -> Self {
        self.edit(|s| {
            s.policy_names.insert(endpoint.into(), name.into());
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

/// The future of [`RateLimitService`].
pub type ResponseFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

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
    type Future = ResponseFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The clone that was polled ready serves this request; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(handle(shared, inner, request))
    }
}

/// The endpoint of a request and its enabled rule, if it has one.
fn endpoint_and_rule<B>(shared: &Shared, request: &Request<B>) -> Option<(String, RateLimitRule)> {
    let path = match request.extensions().get::<MatchedPath>() {
        Some(matched) => matched.as_str(),
        None => match shared.unmatched {
            UnmatchedPolicy::UriPath => request.uri().path(),
            _ => return None,
        },
    };
    let method = request.method();
    let endpoint = format!("{method} {path}");
    let (endpoint, rule) = match shared.rules.get(&endpoint) {
        Some(rule) => (endpoint, rule),
        None if method == Method::HEAD => {
            let endpoint = format!("GET {path}");
            let rule = shared.rules.get(&endpoint)?;
            (endpoint, rule)
        }
        None => return None,
    };
    // TEMPORARY: the headers describe the first active limit until the layer shows them all.
    let first = rule.active().next()?;
    Some((endpoint, first.rule().clone()))
}

async fn handle<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<ResBody>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<String>,
{
    let Some((endpoint, rule)) = endpoint_and_rule(&shared, &request) else {
        return inner.call(request).await;
    };
    let scope = rule.scope();
    let span = tracing::info_span!(
        "rate_limit",
        endpoint = %endpoint,
        scope = scope.as_str(),
        outcome = field::Empty,
    );
    let (parts, body) = request.into_parts();
    let identifier = span.in_scope(|| identify(&shared, &parts, &endpoint, scope));
    let request = Request::from_parts(parts, body);
    let identifier = match identifier {
        Ok(identifier) => identifier,
        Err(rejection) => return Ok(rejection_response(&rejection)),
    };
    // Not inside `span`: the adapter records its own `outcome` into the current span.
    let result = match shared.limiter.is_allowed(&endpoint, &identifier).await {
        Ok(result) => result,
        Err(err) => {
            let rejection = span.in_scope(|| check_error(&err));
            return Ok(rejection_response(&rejection));
        }
    };
    let plan = span.in_scope(|| plan(&shared, &endpoint, &rule, &identifier, &result));
    match plan {
        Plan::Respond(response) => Ok(response),
        Plan::Pass(headers) => {
            let mut response = inner.call(request).instrument(span).await?;
            if let Some(headers) = headers {
                response.headers_mut().extend(headers);
            }
            Ok(response)
        }
    }
}

/// The identifier of the request's bucket, or the rejection to answer with.
fn identify(
    shared: &Shared,
    parts: &http::request::Parts,
    endpoint: &str,
    scope: ratelimit_adapter::RateLimitScope,
) -> Result<String, Rejection> {
    if !scope.uses_identifier() {
        return Ok(GLOBAL_IDENTIFIER.to_owned());
    }
    let identified = shared.extractor.identify(&IdentifyRequest {
        parts,
        endpoint,
        scope,
    });
    if let Err(rejection) = &identified {
        record("rejected");
        tracing::warn!(
            status = rejection.status().as_u16(),
            code = rejection.code(),
            "request rejected: {}",
            rejection.message()
        );
    }
    identified
}

/// The answer to a check that returned an error.
fn check_error(err: &ratelimit_adapter::RateLimitError) -> Rejection {
    record("error");
    if err.code() == ErrorCode::InvalidInput {
        tracing::warn!(error = %err, "rate-limit check rejected the request's identifier");
        Rejection::new(StatusCode::BAD_REQUEST, "invalid_identity", err.message())
    } else {
        tracing::error!(error = %err, "rate-limit check failed");
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
    /// Call the inner service, and add these headers to its response.
    Pass(Option<HeaderMap>),
}

/// Turns a decision into a plan, recording and logging the outcome in the current span.
fn plan<B: From<String>>(
    shared: &Shared,
    endpoint: &str,
    rule: &RateLimitRule,
    identifier: &str,
    result: &RateLimitResult,
) -> Plan<B> {
    match result.source {
        // Real numbers: the shared store's, or the local fallback store's.
        DecisionSource::Store | DecisionSource::LocalFallback => {}
        DecisionSource::FailOpen => {
            record("fail_open");
            tracing::warn!(
                identifier,
                "rate-limit store unavailable; check failed open"
            );
            return match shared.fail_open {
                FailOpenPolicy::ServiceUnavailable => Plan::Respond(unavailable(None)),
                _ => Plan::Pass(None),
            };
        }
        DecisionSource::FailClosed => {
            record("fail_closed");
            tracing::warn!(
                identifier,
                "rate-limit store unavailable; check failed closed"
            );
            let retry = result.retry_after_whole_seconds().filter(|&s| s > 0);
            return Plan::Respond(unavailable(retry));
        }
        // No rule or a disabled one on the limiter's side (rule sets out of step): untouched.
        _ => {
            record("allowed");
            return Plan::Pass(None);
        }
    }
    let policy = shared
        .policy_names
        .get(endpoint)
        .map_or(endpoint, String::as_str);
    let numbers = HeaderNumbers::new(result, rule);
    let headers = rate_limit_headers(&numbers, !result.allowed, policy, shared.header_style);
    if result.allowed {
        record("allowed");
        tracing::debug!(
            identifier,
            remaining = result.remaining,
            "rate limit check allowed"
        );
        return Plan::Pass(Some(headers));
    }
    record("denied");
    tracing::info!(
        identifier,
        retry_after_s = numbers.reset,
        "rate limit exceeded"
    );
    let mut response = too_many_requests(endpoint, result, &numbers);
    response.headers_mut().extend(headers);
    Plan::Respond(response)
}

fn record(outcome: &'static str) {
    tracing::Span::current().record("outcome", outcome);
}

fn json_response<B: From<String>>(status: StatusCode, body: &serde_json::Value) -> Response<B> {
    let mut response = Response::new(B::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn rejection_response<B: From<String>>(rejection: &Rejection) -> Response<B> {
    json_response(
        rejection.status(),
        &serde_json::json!({ "error": rejection.code(), "message": rejection.message() }),
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

fn too_many_requests<B: From<String>>(
    endpoint: &str,
    result: &RateLimitResult,
    numbers: &HeaderNumbers,
) -> Response<B> {
    let message = match numbers.reset {
        Some(seconds) => format!("rate limit exceeded; retry in {seconds} s"),
        None => "this request costs more than the rate limit ever allows".to_owned(),
    };
    json_response(
        StatusCode::TOO_MANY_REQUESTS,
        &serde_json::json!({
            "error": "rate_limited",
            "message": message,
            "endpoint": endpoint,
            "limit": result.limit,
            "remaining": result.remaining,
            "retry_after": numbers.reset,
        }),
    )
}
