//! The limits of one endpoint: one or more named token buckets, checked all or nothing.

use std::sync::Arc;

use crate::{RateLimitRule, RuleError};

/// The most limits one endpoint may have. Every limit is one bucket in every check, so this
/// bounds the work (and the Redis keys) of one request.
pub const MAX_LIMITS_PER_ENDPOINT: usize = 16;

/// The longest limit name accepted, in bytes.
pub const MAX_LIMIT_NAME_BYTES: usize = 64;

/// One named limit of an endpoint: a [`RateLimitRule`] with a name that is unique within the
/// endpoint.
///
/// Explicit names ([`Limit::named`]) are 1 to [`MAX_LIMIT_NAME_BYTES`] ASCII letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit, so that they are safe as they are in
/// storage keys, HTTP header values (the IETF `RateLimit-Policy` names) and metric labels. A
/// rule given alone to an endpoint is a limit named after the endpoint ([`Limit::implicit`]),
/// and its storage key is the one the single-limit form always had.
///
/// ```
/// use ratelimit_domain::{Limit, RateLimitRule, RateLimitScope};
///
/// let rule = RateLimitRule::new(RateLimitScope::Ip, 10, 10.0)?;
/// let limit = Limit::named("per-client", rule)?;
/// assert_eq!(limit.name(), "per-client");
/// assert!(Limit::named("per client", limit.rule().clone()).is_err());
/// # Ok::<(), ratelimit_domain::RuleError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    name: Arc<str>,
    named: bool,
    rule: RateLimitRule,
}

impl Limit {
    /// A limit with an explicit name.
    ///
    /// # Errors
    /// [`RuleError::InvalidLimitName`] for an empty, over-long or unsafe name.
    pub fn named(name: &str, rule: RateLimitRule) -> Result<Self, RuleError> {
        validate_name(name)?;
        Ok(Self {
            name: name.into(),
            named: true,
            rule,
        })
    }

    /// The one limit of an endpoint given as a single rule: named after the endpoint, keyed
    /// as the single-limit form always was.
    pub fn implicit(endpoint: &str, rule: RateLimitRule) -> Self {
        Self {
            name: endpoint.into(),
            named: false,
            rule,
        }
    }

    /// The limit's name (the endpoint, for an implicit limit).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name, shared (for events and results, which then allocate nothing).
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    /// Whether the name was given explicitly (and so appears in the bucket's key).
    pub fn is_named(&self) -> bool {
        self.named
    }

    /// The limit's bucket.
    pub fn rule(&self) -> &RateLimitRule {
        &self.rule
    }
}

/// Whether `name` is a valid explicit limit name (see [`Limit`]).
///
/// # Errors
/// [`RuleError::InvalidLimitName`] saying why not.
pub fn validate_name(name: &str) -> Result<(), RuleError> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_LIMIT_NAME_BYTES {
        Some("is longer than 64 bytes")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("may hold only ASCII letters, digits, '-', '_' and '.'")
    } else if !name.as_bytes()[0].is_ascii_alphanumeric() {
        Some("must start with a letter or a digit")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(RuleError::InvalidLimitName {
            name: name.chars().take(80).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Every limit of one endpoint. A request to the endpoint is allowed only if every enabled limit
/// has its tokens; then each takes its cost, otherwise none takes anything.
///
/// ```
/// use ratelimit_domain::{EndpointLimits, Limit, RateLimitRule, RateLimitScope::*};
///
/// let limits = EndpointLimits::new(vec![
///     Limit::named("per-client", RateLimitRule::new(Ip, 10, 10.0)?)?,
///     Limit::named("everyone", RateLimitRule::new(Global, 15, 15.0)?)?,
/// ])?;
/// assert_eq!(limits.limits().len(), 2);
/// # Ok::<(), ratelimit_domain::RuleError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointLimits {
    limits: Vec<Limit>,
    enabled: bool,
}

impl EndpointLimits {
    /// The limits of one endpoint, enabled.
    ///
    /// # Errors
    /// [`RuleError::NoLimits`], [`RuleError::TooManyLimits`],
    /// [`RuleError::DuplicateLimitName`], or [`RuleError::MixedIdentifierScopes`] when limits that
    /// are not global have different scopes (a check carries one identifier).
    pub fn new(limits: Vec<Limit>) -> Result<Self, RuleError> {
        if limits.is_empty() {
            return Err(RuleError::NoLimits);
        }
        if limits.len() > MAX_LIMITS_PER_ENDPOINT {
            return Err(RuleError::TooManyLimits {
                count: limits.len(),
                max: MAX_LIMITS_PER_ENDPOINT,
            });
        }
        for (i, limit) in limits.iter().enumerate() {
            if limits[..i].iter().any(|other| other.name == limit.name) {
                return Err(RuleError::DuplicateLimitName {
                    name: limit.name.to_string(),
                });
            }
        }
        let mut keyed = limits
            .iter()
            .filter(|limit| limit.rule.scope().uses_identifier());
        if let Some(first) = keyed.next()
            && let Some(other) = keyed.find(|l| l.rule.scope() != first.rule.scope())
        {
            return Err(RuleError::MixedIdentifierScopes {
                first: first.name.to_string(),
                first_scope: first.rule.scope(),
                second: other.name.to_string(),
                second_scope: other.rule.scope(),
            });
        }
        Ok(Self {
            limits,
            enabled: true,
        })
    }

    /// The single-limit form: `rule` alone, named after `endpoint`, enabled as the rule is.
    pub fn single(endpoint: &str, rule: RateLimitRule) -> Self {
        let enabled = rule.enabled();
        Self {
            limits: vec![Limit::implicit(endpoint, rule)],
            enabled,
        }
    }

    /// The same limits, switched on or off as a whole.
    #[must_use]
    pub fn with_enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Every limit, in the order given.
    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }

    /// The limits a check consults: every limit whose rule is enabled, or none when the
    /// endpoint is switched off.
    pub fn active(&self) -> impl Iterator<Item = &Limit> {
        self.limits
            .iter()
            .filter(move |limit| self.enabled && limit.rule.enabled())
    }

    /// Whether a check consults any limit at all.
    pub fn enabled(&self) -> bool {
        self.active().next().is_some()
    }

    /// The limit called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Limit> {
        self.limits.iter().find(|limit| &*limit.name == name)
    }

    /// The first limit: the only one of the single-limit form.
    pub fn first(&self) -> &Limit {
        // Never empty: `new` refuses an empty list and `single` holds one.
        &self.limits[0]
    }

    /// Whether this is the single-limit form (one limit, named after the endpoint).
    pub fn is_single(&self) -> bool {
        self.limits.len() == 1 && !self.limits[0].named
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RateLimitScope::{Global, Ip};

    fn rule() -> RateLimitRule {
        RateLimitRule::new(Ip, 5, 5.0).unwrap()
    }

    #[test]
    fn names_are_safe_in_keys_headers_and_labels() {
        for good in ["per-client", "everyone", "a", "v1.day_limit", "9lives"] {
            assert!(Limit::named(good, rule()).is_ok(), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "-x",
            ".x",
            "per client",
            "a:b",
            "a{b}",
            "quote\"",
            "semi;colon",
            "comma,",
            "é",
            "tab\t",
            long.as_str(),
        ] {
            let err = Limit::named(bad, rule()).unwrap_err();
            assert!(
                matches!(err, RuleError::InvalidLimitName { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(Limit::named(&"a".repeat(64), rule()).is_ok());
    }

    #[test]
    fn an_endpoint_has_one_to_sixteen_uniquely_named_limits() {
        assert_eq!(EndpointLimits::new(vec![]), Err(RuleError::NoLimits));
        let limits = |n: usize| {
            (0..n)
                .map(|i| Limit::named(&format!("l{i}"), rule()).unwrap())
                .collect::<Vec<_>>()
        };
        assert!(EndpointLimits::new(limits(16)).is_ok());
        assert!(matches!(
            EndpointLimits::new(limits(17)),
            Err(RuleError::TooManyLimits { count: 17, max: 16 })
        ));
        let dup = vec![
            Limit::named("a", rule()).unwrap(),
            Limit::named("a", RateLimitRule::new(Global, 9, 1.0).unwrap()).unwrap(),
        ];
        assert_eq!(
            EndpointLimits::new(dup),
            Err(RuleError::DuplicateLimitName { name: "a".into() })
        );
    }

    #[test]
    fn limits_that_key_by_identifier_share_one_scope() {
        use crate::RateLimitScope::User;
        let user = |name: &str, max| {
            Limit::named(name, RateLimitRule::new(User, max, 1.0).unwrap()).unwrap()
        };
        let global = Limit::named("all", RateLimitRule::new(Global, 9, 1.0).unwrap()).unwrap();
        // Per second and per day for one user, and a global limit: fine.
        assert!(EndpointLimits::new(vec![user("second", 5), user("day", 500), global]).is_ok());
        let mixed = EndpointLimits::new(vec![
            user("per-user", 5),
            Limit::named("per-ip", rule()).unwrap(),
        ]);
        let err = mixed.unwrap_err();
        assert!(
            matches!(err, RuleError::MixedIdentifierScopes { .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("\"per-user\" (scope user) and \"per-ip\" (scope ip)"),
            "{err}"
        );
    }

    #[test]
    fn disabled_limits_and_endpoints_are_not_consulted() {
        let limits = EndpointLimits::new(vec![
            Limit::named("on", rule()).unwrap(),
            Limit::named("off", rule().with_enabled(false)).unwrap(),
        ])
        .unwrap();
        assert_eq!(limits.active().map(Limit::name).collect::<Vec<_>>(), ["on"]);
        assert!(limits.enabled());
        assert!(!limits.with_enabled(false).enabled());
        let single = EndpointLimits::single("GET /x", rule().with_enabled(false));
        assert!(!single.enabled());
        assert!(single.is_single());
        assert_eq!(single.first().name(), "GET /x");
    }
}
