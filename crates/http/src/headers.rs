//! The rate-limit response headers.
//!
//! The IETF fields follow draft-ietf-httpapi-ratelimit-headers-11 (see `docs/http.md` for how a
//! token bucket maps onto `q`, `w`, `r` and `t`).

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use ratelimit_adapter::domain::token_bucket::ceil_seconds;
use ratelimit_adapter::{
    BucketDecision, DecisionSource, EndpointLimits, LimitOutcome, RateLimitResult,
};

/// `RateLimit-Policy` (IETF draft).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (IETF draft).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `X-RateLimit-Limit` (conventional).
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining` (conventional).
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset` (conventional).
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The fields a response the layer writes itself (a 429) gets room for: the six the headers
/// may take and the `content-length` a server adds after them (axum does), so that its map,
/// allocated once, never grows.
pub(crate) const RESERVE: usize = 7;

/// Which informational headers responses carry. `Retry-After` is sent on every 429 whose
/// wait is finite, whatever the style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HeaderStyle {
    /// The IETF draft's `RateLimit-Policy` and `RateLimit` **and** the conventional
    /// `X-RateLimit-*` headers, for clients written against those.
    Both,
    /// Only `RateLimit-Policy` and `RateLimit` (the default; `docs/http.md` says why).
    #[default]
    Ietf,
    /// Only `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`.
    Legacy,
    /// No informational header.
    None,
}

impl HeaderStyle {
    pub(crate) fn ietf(self) -> bool {
        matches!(self, Self::Both | Self::Ietf)
    }

    fn legacy(self) -> bool {
        matches!(self, Self::Both | Self::Legacy)
    }
}

/// One limit of an endpoint as the headers show it: its policy name and the numbers that do
/// not change per request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PolicyItem {
    /// The limit's name in the rules (matches [`LimitOutcome::name`]).
    pub limit: Arc<str>,
    /// The policy name the headers show, as the value of an sf-string (percent-encoded where
    /// an sf-string cannot hold a character; see [`sf_string`]). This is also the name in a
    /// problem-details body's `violated-policies`.
    pub policy: Box<str>,
    /// `q`: the quota, the bucket's capacity.
    pub quota: u64,
    /// `w`: whole seconds an empty bucket takes to refill completely, rounded up (at least 1).
    pub window: u64,
    /// Seconds for one token to come back.
    pub seconds_per_token: f64,
    /// The limit's own cost per request.
    pub cost: u64,
}

impl PolicyItem {
    /// The item of one limit shown under the policy name `policy`.
    pub fn new(
        limit: Arc<str>,
        policy: &str,
        max_tokens: u64,
        refill_rate: f64,
        cost: u64,
    ) -> Self {
        Self {
            limit,
            policy: percent_encode(policy).into(),
            quota: max_tokens,
            // As docs/http.md states it: ceil(max_tokens * 60 / refill_rate), at least 1 (the
            // draft's `w` is non-zero).
            window: ceil_seconds(max_tokens as f64 * 60.0 / refill_rate).max(1),
            seconds_per_token: 60.0 / refill_rate,
            cost,
        }
    }

    /// The item of a limit known only from a result (a limiter whose rules are out of step
    /// with the layer's): the outcome's own name, the given cost.
    fn from_outcome(outcome: &LimitOutcome, cost: u64) -> Self {
        Self::new(
            outcome.name.clone(),
            &outcome.name,
            outcome.limit,
            outcome.refill_rate,
            cost,
        )
    }

    /// `t` of this limit in `outcome`: whole seconds until the limit can take `cost` again,
    /// rounded up; `None` when it never can (the cost exceeds the capacity).
    ///
    /// A limit that refused reports its own wait. A limit that had the tokens reports 0 while
    /// it still holds `cost`, and otherwise `ceil((cost - remaining) × seconds_per_token)`, an
    /// upper bound (the store does not report the fraction of a token already refilled).
    pub fn reset(&self, outcome: &LimitOutcome, cost: u64) -> Option<u64> {
        if outcome.allowed {
            let missing = cost.saturating_sub(outcome.remaining);
            Some(ceil_seconds(missing as f64 * self.seconds_per_token))
        } else {
            outcome.retry_after_whole_seconds()
        }
    }
}

/// The header values of one endpoint: the items of its enabled limits, and its
/// `RateLimit-Policy` value, built once (it does not change per request).
///
/// ```
/// use ratelimit_adapter::{EndpointLimits, Limit, RateLimitRule, RateLimitScope::*};
/// use ratelimit_http::EndpointHeaders;
///
/// let limits = EndpointLimits::new(vec![
///     Limit::named("per-client", RateLimitRule::new(Ip, 10, 10.0)?)?,
///     Limit::named("everyone", RateLimitRule::new(Global, 15, 15.0)?)?,
/// ])?;
/// let headers = EndpointHeaders::new("GET /api/v1/search", &limits, None);
/// assert_eq!(
///     headers.policy().unwrap(),
///     r#""per-client";q=10;w=60, "everyone";q=15;w=60"#
/// );
/// # Ok::<(), ratelimit_adapter::RuleError>(())
/// ```
#[derive(Debug, Clone)]
pub struct EndpointHeaders {
    items: Vec<PolicyItem>,
    policy: Option<HeaderValue>,
    /// Each item's quota as a header value (`X-RateLimit-Limit`), built once.
    quotas: Vec<HeaderValue>,
    /// Each item's start of a `RateLimit` item, `"<policy>";r=`, built once.
    prefixes: Vec<Box<[u8]>>,
    /// The `RateLimit` value of a request, at each limit's own cost, that found every bucket
    /// full (each reports `r = q - cost`): built once, since that is what most responses say
    /// when clients stay well within their limits.
    full: Option<HeaderValue>,
}

impl EndpointHeaders {
    /// The header values of `endpoint` with `limits`. A single-limit endpoint's policy is
    /// named `policy_name` when given, the endpoint otherwise; every limit of a multi-limit
    /// endpoint is named after itself.
    pub fn new(endpoint: &str, limits: &EndpointLimits, policy_name: Option<&str>) -> Self {
        let single = limits.is_single();
        let items: Vec<PolicyItem> = limits
            .active()
            .map(|limit| {
                let policy = if single {
                    policy_name.unwrap_or(endpoint)
                } else {
                    limit.name()
                };
                let rule = limit.rule();
                PolicyItem::new(
                    limit.shared_name().clone(),
                    policy,
                    rule.max_tokens(),
                    rule.refill_rate(),
                    rule.cost(),
                )
            })
            .collect();
        let mut value = String::new();
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                value.push_str(", ");
            }
            push_quoted(&mut value, &item.policy);
            // Writing to a String cannot fail.
            let _ = write!(value, ";q={};w={}", item.quota, item.window);
        }
        // sf-strings and integers are visible ASCII, always a valid header value.
        let policy = HeaderValue::from_str(&value)
            .ok()
            .filter(|_| !items.is_empty())
            .map(lasting);
        let quotas = items.iter().map(|item| number(item.quota)).collect();
        let prefixes = items.iter().map(item_prefix).collect();
        let mut headers = Self {
            items,
            policy,
            quotas,
            prefixes,
            full: None,
        };
        // Built by the same code as any other value, from the outcomes of full buckets.
        let full_buckets = limits.active().map(|limit| {
            let rule = limit.rule();
            let decision = BucketDecision {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining: rule.max_tokens().saturating_sub(rule.cost()),
            };
            LimitOutcome::from_decision(limit, decision)
        });
        let full = RateLimitResult::from_outcomes(full_buckets.collect(), DecisionSource::Store);
        if !full.limits.is_empty() && full.allowed {
            headers.full = headers.ratelimit_value(&full, None).map(lasting);
        }
        headers
    }

    /// Whether `result`, checked at each limit's own cost, found every bucket full: its
    /// `RateLimit` value is then [`full`](Self::full)'s. An allowed limit's `r` and `t`
    /// depend only on the tokens left and the limit's own rule and cost.
    fn found_full(&self, result: &RateLimitResult) -> bool {
        let full = |outcome: &LimitOutcome, item: &PolicyItem| {
            outcome.allowed
                && Arc::ptr_eq(&outcome.name, &item.limit)
                && outcome.remaining == item.quota.saturating_sub(item.cost)
        };
        // One limit, the usual case, without the general walk.
        if let ([outcome], [item]) = (&result.limits[..], &self.items[..]) {
            return full(outcome, item);
        }
        result.limits.len() == self.items.len()
            && result
                .limits
                .iter()
                .zip(&self.items)
                .all(|(outcome, item)| full(outcome, item))
    }

    /// The index of the item of the limit called `name`: found by pointer when the result came
    /// from the same rules (the usual case, where the names are shared), by its text otherwise,
    /// trying the item at `hint` (the outcome's own position) first.
    fn index_of(&self, name: &Arc<str>, hint: usize) -> Option<usize> {
        let same = |item: &PolicyItem| Arc::ptr_eq(&item.limit, name) || *item.limit == **name;
        match self.items.get(hint) {
            Some(item) if same(item) => Some(hint),
            _ => self.items.iter().position(same),
        }
    }

    /// The items, one per enabled limit, in the endpoint's order.
    pub fn items(&self) -> &[PolicyItem] {
        &self.items
    }

    /// The `RateLimit-Policy` value (`None` when no limit is enabled).
    pub fn policy(&self) -> Option<&HeaderValue> {
        self.policy.as_ref()
    }

    /// The item of the limit called `limit`.
    pub fn item(&self, limit: &str) -> Option<&PolicyItem> {
        self.items.iter().find(|item| &*item.limit == limit)
    }

    /// The policy names of the limits that refused `result`, for a problem-details body's
    /// `violated-policies`.
    pub fn violated_policies(&self, result: &RateLimitResult) -> Vec<String> {
        result
            .refused()
            .map(|outcome| match self.item(&outcome.name) {
                Some(item) => item.policy.to_string(),
                None => percent_encode(&outcome.name),
            })
            .collect()
    }

    /// Writes the headers of one decision into `headers`, replacing any of the same name: the
    /// informational ones of `style`, plus `Retry-After` on a denial with a finite wait.
    ///
    /// `cost` is the request's own cost when it had one (a cost function), otherwise each
    /// limit's cost applies. `RateLimit-Policy` lists every enabled limit and `RateLimit` every
    /// limit of the result; the `X-RateLimit-*` headers describe the deciding limit
    /// ([`RateLimitResult::deciding`]: the one that refused with the longest wait, or the
    /// tightest one when allowed); `Retry-After` is the whole request's wait.
    ///
    /// With the limits `per-client` (ip, 10 per minute) and `everyone` (global, 15 per
    /// minute), a request refused by `everyone` gives:
    ///
    /// ```text
    /// RateLimit-Policy: "per-client";q=10;w=60, "everyone";q=15;w=60
    /// RateLimit: "per-client";r=5;t=0, "everyone";r=0;t=4
    /// X-RateLimit-Limit: 15
    /// X-RateLimit-Remaining: 0
    /// X-RateLimit-Reset: 4
    /// Retry-After: 4
    /// ```
    ///
    /// A limit whose wait is infinite (the cost exceeds its capacity) has no `t` parameter; when
    /// it decides, `Retry-After` and `X-RateLimit-Reset` are left out.
    pub fn write(
        &self,
        result: &RateLimitResult,
        cost: Option<u64>,
        style: HeaderStyle,
        headers: &mut HeaderMap,
    ) {
        self.values(result, cost, style).write(headers);
    }

    /// The fields [`write`](Self::write) writes for one decision, built before the response
    /// exists (while the inner service runs, they wait in the layer's future).
    pub(crate) fn values(
        &self,
        result: &RateLimitResult,
        cost: Option<u64>,
        style: HeaderStyle,
    ) -> DecisionHeaders {
        let full = self.full_value(result, cost);
        // The usual answer: the default style, every bucket full.
        if style == HeaderStyle::Ietf
            && let Some(full) = full
        {
            return DecisionHeaders {
                policy: self.policy.clone(),
                ratelimit: Some(full.clone()),
                others: None,
            };
        }
        let mut values = DecisionHeaders::default();
        if style.ietf() {
            values.policy.clone_from(&self.policy);
            if !result.limits.is_empty() {
                values.ratelimit = match full {
                    Some(full) => Some(full.clone()),
                    None => self.built_value(result, cost),
                };
            }
        }
        if style.legacy() || !result.allowed {
            values.others = Some(Box::new(self.other_values(result, cost, style)));
        }
        values
    }
}

impl EndpointHeaders {
    /// The fields of `values` beyond the default style's: `X-RateLimit-*` with a legacy style,
    /// `Retry-After` on a denial.
    fn other_values(
        &self,
        result: &RateLimitResult,
        cost: Option<u64>,
        style: HeaderStyle,
    ) -> OtherHeaders {
        let mut others = OtherHeaders::default();
        if style.legacy()
            && let Some(deciding) = result.deciding()
        {
            let fallback;
            let known = self.index_of(&deciding.name, 0);
            let item = match known {
                Some(i) => &self.items[i],
                None => {
                    fallback = PolicyItem::from_outcome(deciding, cost.unwrap_or(1));
                    &fallback
                }
            };
            // The quota's value, built once, unless the result says otherwise (rule sets out
            // of step).
            others.limit = Some(match known {
                Some(i) if item.quota == deciding.limit => self.quotas[i].clone(),
                _ => number(deciding.limit),
            });
            others.remaining = Some(number(deciding.remaining));
            others.reset = item.reset(deciding, cost.unwrap_or(item.cost)).map(number);
        }
        if !result.allowed {
            others.retry_after = result.retry_after_whole_seconds().map(number);
        }
        others
    }
}

/// The header fields of one decision, waiting for the response they go into (beside the inner
/// service's future, so kept small: the fields of the default style inline, the others boxed).
#[derive(Debug, Default)]
pub(crate) struct DecisionHeaders {
    policy: Option<HeaderValue>,
    ratelimit: Option<HeaderValue>,
    /// The `X-RateLimit-*` fields and `Retry-After`: only with a legacy style or on a denial.
    others: Option<Box<OtherHeaders>>,
}

/// The fields of [`DecisionHeaders`] that the default style leaves out on an allowed request.
#[derive(Debug, Default)]
struct OtherHeaders {
    limit: Option<HeaderValue>,
    remaining: Option<HeaderValue>,
    reset: Option<HeaderValue>,
    retry_after: Option<HeaderValue>,
}

impl DecisionHeaders {
    /// Writes the fields into `headers`, replacing any of the same name.
    ///
    /// `HeaderMap::reserve(n)` grows a map only when `len + n` (plus a third) exceeds its
    /// index capacity: 8 for a handler's usual response, which holds 6 entries. With more
    /// than the default style's two fields, reserving them plus one grows a map that could not
    /// hold them and the `content-length` a server may add after them (axum does) at once,
    /// while it holds few entries, instead of when `content-length` arrives. The default
    /// style's two fields, a handler's `content-type` and `content-length` fit in a new map;
    /// reserving for them would only cost a check per request.
    pub(crate) fn write(self, headers: &mut HeaderMap) {
        if let Some(others) = &self.others {
            let count = usize::from(self.policy.is_some())
                + usize::from(self.ratelimit.is_some())
                + others.count();
            headers.reserve(count + 1);
        }
        if let Some(policy) = self.policy {
            headers.insert(RATELIMIT_POLICY, policy);
        }
        if let Some(ratelimit) = self.ratelimit {
            headers.insert(RATELIMIT, ratelimit);
        }
        if let Some(others) = self.others {
            let mut insert = |name: HeaderName, value: Option<HeaderValue>| {
                if let Some(value) = value {
                    headers.insert(name, value);
                }
            };
            insert(X_RATELIMIT_LIMIT, others.limit);
            insert(X_RATELIMIT_REMAINING, others.remaining);
            insert(X_RATELIMIT_RESET, others.reset);
            insert(RETRY_AFTER, others.retry_after);
        }
    }
}

impl OtherHeaders {
    /// How many fields are set.
    fn count(&self) -> usize {
        [&self.limit, &self.remaining, &self.reset, &self.retry_after]
            .iter()
            .filter(|value| value.is_some())
            .count()
    }
}

impl EndpointHeaders {
    /// The `RateLimit` value of `result` (which lists at least one limit): the value built once
    /// when every bucket was found full, otherwise written into a buffer the thread keeps, then
    /// copied once into the value's own exact-size allocation.
    fn ratelimit_value(&self, result: &RateLimitResult, cost: Option<u64>) -> Option<HeaderValue> {
        match self.full_value(result, cost) {
            Some(full) => Some(full.clone()),
            None => self.built_value(result, cost),
        }
    }

    /// The `RateLimit` value built once for full buckets, when `result` (checked at each
    /// limit's own cost) found every bucket full.
    fn full_value(&self, result: &RateLimitResult, cost: Option<u64>) -> Option<&HeaderValue> {
        self.full
            .as_ref()
            .filter(|_| cost.is_none() && self.found_full(result))
    }

    /// The `RateLimit` value of `result`, written afresh in the thread's buffer.
    fn built_value(&self, result: &RateLimitResult, cost: Option<u64>) -> Option<HeaderValue> {
        thread_local! {
            static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        BUFFER.with_borrow_mut(|value| {
            value.clear();
            for (i, outcome) in result.limits.iter().enumerate() {
                if i > 0 {
                    value.extend_from_slice(b", ");
                }
                let owned;
                let item = match self.index_of(&outcome.name, i) {
                    Some(known) => {
                        value.extend_from_slice(&self.prefixes[known]);
                        &self.items[known]
                    }
                    None => {
                        owned = PolicyItem::from_outcome(outcome, cost.unwrap_or(1));
                        value.extend_from_slice(&item_prefix(&owned));
                        &owned
                    }
                };
                value.extend_from_slice(digits(outcome.remaining).as_bytes());
                if let Some(reset) = item.reset(outcome, cost.unwrap_or(item.cost)) {
                    value.extend_from_slice(b";t=");
                    value.extend_from_slice(digits(reset).as_bytes());
                }
            }
            // sf-strings and integers are visible ASCII, always a valid header value.
            let header = HeaderValue::from_bytes(value).ok();
            // A buffer grown by an unusually long value is not kept.
            if value.capacity() > 4096 {
                *value = Vec::new();
            }
            header
        })
    }
}

/// `value`, with its bytes kept for the rest of the process in one copy per distinct value,
/// which every clone then shares without counting references: a value built once per endpoint
/// and cloned into every response (`RateLimit-Policy`, the full-bucket `RateLimit`) costs no
/// atomic increment and decrement per request. A layer built again with the same rules adds
/// nothing. [`EndpointHeaders::new`] is public, though, and a service may build headers from
/// rules that keep changing (a reload loop, limits per tenant): past [`MAX_KEPT_BYTES`] a new
/// value is returned as it is, so the memory kept for the process stays bounded. A value that
/// is not visible ASCII is returned as it is too.
fn lasting(value: HeaderValue) -> HeaderValue {
    static KEPT: OnceLock<Mutex<Kept>> = OnceLock::new();
    KEPT.get_or_init(|| Mutex::new(Kept::new(MAX_KEPT_BYTES)))
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .keep(value)
}

/// The most bytes of header values [`lasting`] keeps for the life of the process: thousands
/// of endpoints' values.
const MAX_KEPT_BYTES: usize = 1 << 20;

/// The values [`lasting`] keeps, and their bytes.
#[derive(Debug)]
struct Kept {
    values: HashSet<&'static str>,
    bytes: usize,
    max_bytes: usize,
}

impl Kept {
    fn new(max_bytes: usize) -> Self {
        Self {
            values: HashSet::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// `value` in its kept copy: found, kept now, or (not visible ASCII, or past the bound)
    /// returned as it is.
    fn keep(&mut self, value: HeaderValue) -> HeaderValue {
        let Ok(text) = value.to_str() else {
            return value;
        };
        // `from_static` accepts exactly visible ASCII and tabs; `to_str` also lets spaces through.
        if !text
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            return value;
        }
        let text: &'static str = match self.values.get(text) {
            Some(&text) => text,
            None if self.bytes.saturating_add(text.len()) > self.max_bytes => return value,
            None => {
                let text: &'static str = Box::leak(text.into());
                self.values.insert(text);
                self.bytes += text.len();
                text
            }
        };
        let mut kept = HeaderValue::from_static(text);
        kept.set_sensitive(value.is_sensitive());
        kept
    }
}

/// The start of an item's entry in `RateLimit`: `"<policy>";r=`.
fn item_prefix(item: &PolicyItem) -> Box<[u8]> {
    let mut prefix = String::with_capacity(item.policy.len() + 5);
    push_quoted(&mut prefix, &item.policy);
    prefix.push_str(";r=");
    prefix.into_bytes().into_boxed_slice()
}

/// The header value of `n`; the numbers below [`SMALL`] (those responses repeat: resets, the
/// remaining tokens of most limits) without allocating, as static text, the others in one
/// exact-size allocation.
fn number(n: u64) -> HeaderValue {
    match small_digits(n) {
        Some(digits) => HeaderValue::from_static(digits),
        // Decimal digits are always a valid header value; the fallback is never taken.
        None => HeaderValue::from_bytes(digits(n).as_bytes()).unwrap_or_else(|_| n.into()),
    }
}

/// The numbers [`number`] writes without allocating.
const SMALL: usize = 10_000;

/// The numbers below [`SMALL`] as four zero-padded digits each, back to back (`0000` to
/// `9999`): a number's digits are the end of its four.
static SMALL_DIGITS: [u8; 4 * SMALL] = {
    let mut all = [0u8; 4 * SMALL];
    let mut n = 0;
    while n < SMALL {
        let mut rest = n;
        let mut i = 4;
        while i > 0 {
            i -= 1;
            // A single digit.
            #[allow(clippy::cast_possible_truncation)]
            {
                all[4 * n + i] = b'0' + (rest % 10) as u8;
            }
            rest /= 10;
        }
        n += 1;
    }
    all
};

/// The decimal digits of `n` as static text, if `n` is below [`SMALL`].
fn small_digits(n: u64) -> Option<&'static str> {
    let i = usize::try_from(n).ok().filter(|&i| i < SMALL)?;
    let len = match i {
        0..10 => 1,
        10..100 => 2,
        100..1000 => 3,
        _ => 4,
    };
    let end = 4 * i + 4;
    std::str::from_utf8(SMALL_DIGITS.get(end - len..end)?).ok()
}

/// The decimal digits of a number, on the stack.
struct Digits {
    buffer: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes(&self) -> &[u8] {
        &self.buffer[self.start..]
    }
}

/// The two-digit numbers `00` to `99`, back to back.
const PAIRS: [u8; 200] = {
    let mut pairs = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        // `i / 10` and `i % 10` are single digits.
        #[allow(clippy::cast_possible_truncation)]
        {
            pairs[2 * i] = b'0' + (i / 10) as u8;
            pairs[2 * i + 1] = b'0' + (i % 10) as u8;
        }
        i += 1;
    }
    pairs
};

/// The decimal digits of `n`, two at a time, without the formatting machinery of `write!`.
fn digits(mut n: u64) -> Digits {
    let mut buffer = [0u8; 20];
    let mut start = buffer.len();
    let pair = |n: u64| {
        // `n` is below 100.
        let i = 2 * usize::try_from(n).unwrap_or(0);
        [PAIRS[i], PAIRS[i + 1]]
    };
    while n >= 100 {
        start -= 2;
        buffer[start..start + 2].copy_from_slice(&pair(n % 100));
        n /= 100;
    }
    if n >= 10 {
        start -= 2;
        buffer[start..start + 2].copy_from_slice(&pair(n));
    } else {
        start -= 1;
        // `n` is a single digit.
        #[allow(clippy::cast_possible_truncation)]
        {
            buffer[start] = b'0' + n as u8;
        }
    }
    Digits { buffer, start }
}

/// `text` with `%`, control characters and non-ASCII characters percent-encoded as their
/// UTF-8 bytes: the value an sf-string holds.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut buf = [0u8; 4];
    for c in text.chars() {
        match c {
            '%' => out.push_str("%25"),
            ' '..='~' => out.push(c),
            _ => {
                for byte in c.encode_utf8(&mut buf).bytes() {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "%{byte:02X}");
                }
            }
        }
    }
    out
}

/// Appends `value` (visible ASCII and spaces) as an sf-string: quoted, `"` and `\` escaped.
fn push_quoted(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Writes `text` as a Structured Field string (RFC 9651 §3.3.3): in double quotes, with `"`
/// and `\` escaped by a backslash. Characters an sf-string cannot hold (control characters,
/// non-ASCII) and `%` itself are percent-encoded as their UTF-8 bytes (`%XX`).
///
/// ```
/// assert_eq!(ratelimit_http::sf_string("POST /api/v1/sessions"), r#""POST /api/v1/sessions""#);
/// assert_eq!(ratelimit_http::sf_string(r#"a"b\c"#), r#""a\"b\\c""#);
/// assert_eq!(ratelimit_http::sf_string("GET /café"), r#""GET /caf%C3%A9""#);
/// ```
pub fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    push_quoted(&mut out, &percent_encode(text));
    out
}

#[cfg(test)]
mod tests {
    use ratelimit_adapter::{Limit, RateLimitRule, RateLimitScope};

    use super::*;

    fn rule(max: u64, per_minute: f64) -> RateLimitRule {
        RateLimitRule::new(RateLimitScope::Ip, max, per_minute).unwrap()
    }

    #[test]
    fn lasting_values_are_kept_once_and_equal_what_they_were() {
        let built = |text: &str| HeaderValue::from_str(text).unwrap();
        let first = lasting(built(r#""GET /x";q=5;w=60"#));
        let again = lasting(built(r#""GET /x";q=5;w=60"#));
        assert_eq!(first, r#""GET /x";q=5;w=60"#);
        // One copy, shared: the same bytes at the same address.
        assert_eq!(first.as_bytes().as_ptr(), again.as_bytes().as_ptr());
        let other = lasting(built(r#""GET /y";q=5;w=60"#));
        assert_ne!(first.as_bytes().as_ptr(), other.as_bytes().as_ptr());
        // What `from_static` refuses is returned as it was, not kept (and no panic).
        let opaque = HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap();
        assert_eq!(lasting(opaque.clone()), opaque);
        let mut secret = built("token");
        secret.set_sensitive(true);
        assert!(lasting(secret).is_sensitive());
    }

    #[test]
    fn values_past_the_bound_are_not_kept_for_the_life_of_the_process() {
        // A service that builds headers from ever-changing rules: every value distinct.
        let mut kept = Kept::new(1_000);
        let value = |i: usize| HeaderValue::from_str(&format!(r#""tenant-{i}";q=5;w=60"#)).unwrap();
        let mut shared = 0;
        for i in 0..200 {
            let first = kept.keep(value(i));
            let again = kept.keep(value(i));
            assert_eq!(first, value(i));
            if first.as_bytes().as_ptr() == again.as_bytes().as_ptr() {
                shared += 1;
            }
        }
        assert!(kept.bytes <= 1_000, "{} bytes kept", kept.bytes);
        assert_eq!(kept.values.len(), shared);
        assert!((30..200).contains(&shared), "{shared} values kept");
        // What was kept before the bound is still found.
        let early = kept.keep(value(0));
        assert_eq!(
            early.as_bytes().as_ptr(),
            kept.keep(value(0)).as_bytes().as_ptr()
        );
    }

    fn single(r: &RateLimitRule) -> EndpointLimits {
        EndpointLimits::single("GET /x", r.clone())
    }

    fn decision(allowed: bool, retry_after: Duration, remaining: u64) -> BucketDecision {
        BucketDecision {
            allowed,
            retry_after,
            remaining,
        }
    }

    fn result(limits: &EndpointLimits, decisions: &[BucketDecision]) -> RateLimitResult {
        RateLimitResult::from_decisions(limits.active(), decisions)
    }

    fn write(
        headers: &EndpointHeaders,
        result: &RateLimitResult,
        style: HeaderStyle,
    ) -> Vec<(String, String)> {
        let mut map = HeaderMap::new();
        headers.write(result, None, style, &mut map);
        pairs(&map)
    }

    fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
        let mut pairs: Vec<_> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        pairs.sort();
        pairs
    }

    fn owned(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = expected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn numbers_are_written_as_format_writes_them() {
        for n in [
            0,
            1,
            9,
            10,
            11,
            99,
            100,
            12_345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ]
        .into_iter()
        .chain(0..=10_100)
        .chain((1..20).map(|e| 10u64.pow(e) - 1))
        .chain((1..20).map(|e| 10u64.pow(e)))
        {
            assert_eq!(digits(n).as_bytes(), n.to_string().as_bytes());
            assert_eq!(number(n), HeaderValue::from(n));
            if n < 10_000 {
                assert_eq!(small_digits(n), Some(&*n.to_string()));
            } else {
                assert_eq!(small_digits(n), None);
            }
        }
    }

    #[test]
    fn sf_strings_escape_what_they_must() {
        assert_eq!(sf_string("login"), "\"login\"");
        assert_eq!(sf_string("a\"b"), "\"a\\\"b\"");
        assert_eq!(sf_string("a\\b"), "\"a\\\\b\"");
        assert_eq!(sf_string("100%"), "\"100%25\"");
        assert_eq!(sf_string("tab\there"), "\"tab%09here\"");
        assert_eq!(sf_string("Zoë"), "\"Zo%C3%AB\"");
        assert_eq!(sf_string(""), "\"\"");
        assert_eq!(sf_string("GET /users/{id}"), "\"GET /users/{id}\"");
    }

    #[test]
    fn a_denial_has_every_header() {
        let r = rule(5, 5.0);
        let limits = single(&r);
        let headers = EndpointHeaders::new("GET /x", &limits, Some("login"));
        let denied = result(
            &limits,
            &[decision(false, Duration::from_millis(11_200), 0)],
        );
        assert_eq!(
            write(&headers, &denied, HeaderStyle::Both),
            owned(&[
                ("ratelimit-policy", "\"login\";q=5;w=60"),
                ("ratelimit", "\"login\";r=0;t=12"),
                ("x-ratelimit-limit", "5"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "12"),
                ("retry-after", "12"),
            ])
        );
    }

    #[test]
    fn the_map_grows_once_before_the_fields_and_not_for_content_length() {
        let r = rule(5, 5.0);
        let limits = single(&r);
        let headers = EndpointHeaders::new("GET /x", &limits, Some("login"));
        let allowed = result(&limits, &[decision(true, Duration::ZERO, 3)]);
        // A handler's response: one `content-type`.
        let mut map = HeaderMap::new();
        map.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        headers.write(&allowed, None, HeaderStyle::Both, &mut map);
        assert_eq!(map.len(), 6);
        let capacity = map.capacity();
        map.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        assert_eq!(map.capacity(), capacity);
    }

    #[test]
    fn allowed_requests_report_zero_or_an_upper_bound() {
        let r = rule(5, 5.0);
        let limits = single(&r);
        let headers = EndpointHeaders::new("GET /x", &limits, Some("login"));
        let item = &headers.items()[0];
        let four = result(&limits, &[decision(true, Duration::ZERO, 4)]);
        assert_eq!(item.reset(&four.limits[0], 1), Some(0));
        let none = result(&limits, &[decision(true, Duration::ZERO, 0)]);
        assert_eq!(item.reset(&none.limits[0], 1), Some(12));
        let written = write(&headers, &none, HeaderStyle::Both);
        assert!(!written.iter().any(|(k, _)| k == "retry-after"));
        assert!(written.contains(&("ratelimit".into(), "\"login\";r=0;t=12".into())));

        // Cost 3, 1 token left, 7 tokens per minute: 2 × 8.57 s = 17.14 s → 18.
        let r = rule(10, 7.0).with_cost(3).unwrap();
        let limits = single(&r);
        let headers = EndpointHeaders::new("GET /x", &limits, None);
        let one = result(&limits, &[decision(true, Duration::ZERO, 1)]);
        assert_eq!(headers.items()[0].reset(&one.limits[0], 3), Some(18));
        // 10 tokens at 7 per minute: 85.7 s → 86.
        assert_eq!(headers.items()[0].window, 86);
        // 15 tokens at 0.9 per minute is exactly 1000 s; a different operation order would
        // round 1000.0000000000001 up to 1001.
        let headers = EndpointHeaders::new("GET /x", &single(&rule(15, 0.9)), None);
        assert_eq!(headers.items()[0].window, 1000);
    }

    #[test]
    fn whole_seconds_round_up() {
        let r = rule(5, 5.0);
        let limits = single(&r);
        let headers = EndpointHeaders::new("GET /x", &limits, None);
        for (millis, secs) in [(1, 1), (999, 1), (1_000, 1), (1_001, 2), (12_000, 12)] {
            let denied = result(
                &limits,
                &[decision(false, Duration::from_millis(millis), 0)],
            );
            assert_eq!(
                headers.items()[0].reset(&denied.limits[0], 1),
                Some(secs),
                "{millis}"
            );
        }
    }

    #[test]
    fn never_has_no_reset_and_no_retry_after() {
        let r = rule(5, 5.0);
        let limits = single(&r);
        let headers = EndpointHeaders::new("GET /x", &limits, Some("big"));
        let never = result(&limits, &[decision(false, RateLimitResult::RETRY_NEVER, 5)]);
        assert_eq!(
            write(&headers, &never, HeaderStyle::Both),
            owned(&[
                ("ratelimit-policy", "\"big\";q=5;w=60"),
                ("ratelimit", "\"big\";r=5"),
                ("x-ratelimit-limit", "5"),
                ("x-ratelimit-remaining", "5"),
            ])
        );
    }

    #[test]
    fn styles_select_headers() {
        let r = rule(5, 5.0);
        let limits = single(&r);
        let headers = EndpointHeaders::new("GET /x", &limits, Some("p"));
        let denied = result(&limits, &[decision(false, Duration::from_secs(3), 0)]);
        let names = |style| {
            let mut map = HeaderMap::new();
            headers.write(&denied, None, style, &mut map);
            let mut names: Vec<_> = map.keys().map(|k| k.to_string()).collect();
            names.sort();
            names
        };
        assert_eq!(
            names(HeaderStyle::Ietf),
            ["ratelimit", "ratelimit-policy", "retry-after"]
        );
        assert_eq!(
            names(HeaderStyle::Legacy),
            [
                "retry-after",
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset"
            ]
        );
        assert_eq!(names(HeaderStyle::None), ["retry-after"]);
    }

    #[test]
    fn policy_names_are_escaped_in_headers() {
        let r = rule(2, 60.0);
        let limits = EndpointLimits::single("GET /a\"b", r);
        let headers = EndpointHeaders::new("GET /a\"b", &limits, None);
        let allowed = result(&limits, &[decision(true, Duration::ZERO, 1)]);
        let mut map = HeaderMap::new();
        headers.write(&allowed, None, HeaderStyle::Ietf, &mut map);
        assert_eq!(map[RATELIMIT_POLICY], "\"GET /a\\\"b\";q=2;w=2");
        assert_eq!(map[RATELIMIT], "\"GET /a\\\"b\";r=1;t=0");
    }

    fn two_limits() -> EndpointLimits {
        EndpointLimits::new(vec![
            Limit::named("per-client", rule(10, 10.0)).unwrap(),
            Limit::named(
                "everyone",
                RateLimitRule::new(RateLimitScope::Global, 15, 15.0).unwrap(),
            )
            .unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn several_limits_are_listed_and_the_refusing_one_decides() {
        let limits = two_limits();
        // A policy name applies to single-limit endpoints only.
        let headers = EndpointHeaders::new("GET /search", &limits, Some("ignored"));
        assert_eq!(
            headers.policy().unwrap(),
            "\"per-client\";q=10;w=60, \"everyone\";q=15;w=60"
        );
        let allowed = result(
            &limits,
            &[
                decision(true, Duration::ZERO, 9),
                decision(true, Duration::ZERO, 0),
            ],
        );
        assert_eq!(
            write(&headers, &allowed, HeaderStyle::Both),
            owned(&[
                (
                    "ratelimit-policy",
                    "\"per-client\";q=10;w=60, \"everyone\";q=15;w=60"
                ),
                ("ratelimit", "\"per-client\";r=9;t=0, \"everyone\";r=0;t=4"),
                ("x-ratelimit-limit", "15"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "4"),
            ])
        );
        // Refused by everyone (3.2 s) while per-client had its tokens: X-RateLimit-* never
        // describe per-client.
        let refused = result(
            &limits,
            &[
                decision(true, Duration::ZERO, 5),
                decision(false, Duration::from_millis(3_200), 0),
            ],
        );
        assert_eq!(
            write(&headers, &refused, HeaderStyle::Both),
            owned(&[
                (
                    "ratelimit-policy",
                    "\"per-client\";q=10;w=60, \"everyone\";q=15;w=60"
                ),
                ("ratelimit", "\"per-client\";r=5;t=0, \"everyone\";r=0;t=4"),
                ("x-ratelimit-limit", "15"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "4"),
                ("retry-after", "4"),
            ])
        );
        assert_eq!(headers.violated_policies(&refused), ["everyone"]);
        // Both refuse: Retry-After is the longest wait.
        let both = result(
            &limits,
            &[
                decision(false, Duration::from_millis(5_500), 0),
                decision(false, Duration::from_millis(3_200), 0),
            ],
        );
        let written = write(&headers, &both, HeaderStyle::Both);
        assert!(written.contains(&("retry-after".into(), "6".into())));
        assert!(written.contains(&("x-ratelimit-limit".into(), "10".into())));
        assert_eq!(headers.violated_policies(&both), ["per-client", "everyone"]);
    }

    #[test]
    fn limits_are_found_by_name_whatever_their_order_and_origin() {
        // The result comes from limits built apart from the headers' (no shared names) and
        // lists them in the other order.
        let headers = EndpointHeaders::new("GET /search", &two_limits(), None);
        let reversed = EndpointLimits::new(vec![
            Limit::named(
                "everyone",
                RateLimitRule::new(RateLimitScope::Global, 15, 15.0).unwrap(),
            )
            .unwrap(),
            Limit::named("per-client", rule(10, 10.0)).unwrap(),
        ])
        .unwrap();
        let allowed = result(
            &reversed,
            &[
                decision(true, Duration::ZERO, 12),
                decision(true, Duration::ZERO, 0),
            ],
        );
        assert_eq!(
            write(&headers, &allowed, HeaderStyle::Both),
            owned(&[
                (
                    "ratelimit-policy",
                    "\"per-client\";q=10;w=60, \"everyone\";q=15;w=60"
                ),
                ("ratelimit", "\"everyone\";r=12;t=0, \"per-client\";r=0;t=6"),
                ("x-ratelimit-limit", "10"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "6"),
            ])
        );
    }

    #[test]
    fn a_request_cost_applies_to_every_limit() {
        let limits = two_limits();
        let headers = EndpointHeaders::new("GET /search", &limits, None);
        let allowed = result(
            &limits,
            &[
                decision(true, Duration::ZERO, 7),
                decision(true, Duration::ZERO, 2),
            ],
        );
        let mut map = HeaderMap::new();
        headers.write(&allowed, Some(3), HeaderStyle::Ietf, &mut map);
        // everyone lacks 1 of the 3 tokens: 4 s.
        assert_eq!(
            map[RATELIMIT],
            "\"per-client\";r=7;t=0, \"everyone\";r=2;t=4"
        );
    }

    #[test]
    fn a_disabled_limit_is_not_listed() {
        let limits = EndpointLimits::new(vec![
            Limit::named("on", rule(10, 10.0)).unwrap(),
            Limit::named("off", rule(1, 1.0).with_enabled(false)).unwrap(),
        ])
        .unwrap();
        let headers = EndpointHeaders::new("GET /x", &limits, None);
        assert_eq!(headers.policy().unwrap(), "\"on\";q=10;w=60");
        let disabled = EndpointHeaders::new("GET /x", &limits.with_enabled(false), None);
        assert!(disabled.policy().is_none());
    }

    #[test]
    fn a_full_bucket_answer_is_the_value_built_once_and_says_what_a_fresh_build_says() {
        let two = EndpointLimits::new(vec![
            Limit::named("per-client", rule(10, 10.0)).unwrap(),
            Limit::named(
                "everyone",
                RateLimitRule::new(RateLimitScope::Global, 3, 1.0)
                    .unwrap()
                    .with_cost(2)
                    .unwrap(),
            )
            .unwrap(),
        ])
        .unwrap();
        // One limit; one whose cost is more than half its capacity (`t` is not 0 then); a
        // cost equal to the capacity; two limits.
        let cases = [
            single(&rule(5, 5.0)),
            single(&rule(3, 7.0).with_cost(2).unwrap()),
            single(&rule(1, 1.0)),
            two,
        ];
        for limits in &cases {
            let headers = EndpointHeaders::new("GET /x", limits, Some("x"));
            let full: Vec<_> = headers
                .items()
                .iter()
                .map(|item| decision(true, Duration::ZERO, item.quota - item.cost))
                .collect();
            let first = headers
                .ratelimit_value(&result(limits, &full), None)
                .unwrap();
            let again = headers
                .ratelimit_value(&result(limits, &full), None)
                .unwrap();
            // Shared, not rebuilt: the same bytes in memory.
            assert_eq!(first.as_bytes().as_ptr(), again.as_bytes().as_ptr());
            // What the value would be built as, with the costs given explicitly (which never
            // takes the shortcut).
            let costs: Vec<_> = headers.items().iter().map(|item| item.cost).collect();
            if costs.iter().all(|&cost| cost == costs[0]) {
                let built = headers
                    .ratelimit_value(&result(limits, &full), Some(costs[0]))
                    .unwrap();
                assert_eq!(first, built);
                assert_ne!(first.as_bytes().as_ptr(), built.as_bytes().as_ptr());
                // The fields written for it (the default style's shortcut) are those of the
                // built value.
                let written = |cost| {
                    let mut map = HeaderMap::new();
                    headers.write(&result(limits, &full), cost, HeaderStyle::Ietf, &mut map);
                    pairs(&map)
                };
                assert_eq!(written(None), written(Some(costs[0])));
                assert_eq!(written(None).len(), 2);
            }
            // One token fewer (where a full bucket keeps one) is built afresh, with its own
            // numbers.
            let Some(i) = full.iter().position(|d| d.remaining > 0) else {
                continue;
            };
            let mut fewer = full.clone();
            fewer[i].remaining -= 1;
            let other = headers
                .ratelimit_value(&result(limits, &fewer), None)
                .unwrap();
            assert_ne!(first, other);
            let r = format!(";r={}", fewer[i].remaining);
            assert!(other.to_str().unwrap().contains(&r), "{other:?}");
        }
        // Both values of the single 5-token limit, as text.
        let limits = single(&rule(5, 5.0));
        let headers = EndpointHeaders::new("GET /x", &limits, Some("login"));
        let full = result(&limits, &[decision(true, Duration::ZERO, 4)]);
        assert_eq!(
            headers.ratelimit_value(&full, None).unwrap(),
            "\"login\";r=4;t=0"
        );
        // A result from other rules (names not shared) never takes the shortcut.
        let twin = single(&rule(5, 5.0));
        let theirs = result(&twin, &[decision(true, Duration::ZERO, 4)]);
        let value = headers.ratelimit_value(&theirs, None).unwrap();
        assert_eq!(value, "\"login\";r=4;t=0");
        let ours = headers.ratelimit_value(&full, None).unwrap();
        assert_ne!(value.as_bytes().as_ptr(), ours.as_bytes().as_ptr());
    }
}
