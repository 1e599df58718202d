//! Endpoint → limits.

use std::collections::HashMap;

use crate::{EndpointLimits, ErrorCode, RateLimitError, RateLimitRule, Result};

/// The rules of a service, by endpoint (for example `"POST /api/v1/sessions"`): each endpoint
/// has one or more named limits ([`EndpointLimits`]); a single [`RateLimitRule`] is the
/// single-limit form, one limit named after the endpoint.
///
/// Endpoints are matched exactly; an endpoint without a rule is not limited.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: HashMap<String, EndpointLimits>,
}

impl RuleSet {
    /// An empty rule set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a rule set from `(endpoint, rule)` pairs.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidRule`] for an empty endpoint or an endpoint given twice.
    pub fn try_from_rules<E: Into<String>>(
        rules: impl IntoIterator<Item = (E, RateLimitRule)>,
    ) -> Result<Self> {
        Self::try_from_limits(rules.into_iter().map(|(endpoint, rule)| {
            let endpoint = endpoint.into();
            let limits = EndpointLimits::single(&endpoint, rule);
            (endpoint, limits)
        }))
    }

    /// Builds a rule set from `(endpoint, limits)` pairs.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidRule`] for an empty endpoint or an endpoint given twice.
    pub fn try_from_limits<E: Into<String>>(
        rules: impl IntoIterator<Item = (E, EndpointLimits)>,
    ) -> Result<Self> {
        let mut set = Self::new();
        for (endpoint, rule) in rules {
            let endpoint = endpoint.into();
            if set.rules.contains_key(&endpoint) {
                return Err(RateLimitError::new(
                    ErrorCode::InvalidRule,
                    "endpoint has more than one rule",
                )
                .with_detail("endpoint", endpoint));
            }
            set.insert_limits(endpoint, rule)?;
        }
        Ok(set)
    }

    /// Gives `endpoint` the single limit `rule`, returning the limits it replaced.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidRule`] for an empty endpoint.
    pub fn insert(
        &mut self,
        endpoint: impl Into<String>,
        rule: RateLimitRule,
    ) -> Result<Option<EndpointLimits>> {
        let endpoint = endpoint.into();
        let limits = EndpointLimits::single(&endpoint, rule);
        self.insert_limits(endpoint, limits)
    }

    /// Gives `endpoint` its limits, returning the ones they replaced.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidRule`] for an empty endpoint.
    pub fn insert_limits(
        &mut self,
        endpoint: impl Into<String>,
        rule: EndpointLimits,
    ) -> Result<Option<EndpointLimits>> {
        let endpoint = endpoint.into();
        if endpoint.trim().is_empty() {
            return Err(RateLimitError::new(
                ErrorCode::InvalidRule,
                "endpoint must not be empty",
            ));
        }
        Ok(self.rules.insert(endpoint, rule))
    }

    /// The limits of `endpoint`, if any.
    pub fn get(&self, endpoint: &str) -> Option<&EndpointLimits> {
        self.rules.get(endpoint)
    }

    /// Every (endpoint, limits) pair, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &EndpointLimits)> {
        self.rules
            .iter()
            .map(|(endpoint, rule)| (endpoint.as_str(), rule))
    }

    /// How many endpoints have rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no endpoint has a rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RateLimitScope;

    #[test]
    fn lookup_is_exact() {
        let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
        let rules = RuleSet::try_from_rules([("POST /api/v1/sessions", rule.clone())]).unwrap();
        let limits = rules.get("POST /api/v1/sessions").unwrap();
        assert_eq!(limits.first().rule(), &rule);
        assert_eq!(limits.first().name(), "POST /api/v1/sessions");
        assert_eq!(rules.get("post /api/v1/sessions"), None);
        assert_eq!(rules.len(), 1);
    }

    #[test]
    fn rejects_empty_and_duplicate_endpoints() {
        let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
        assert_eq!(
            RuleSet::new().insert(" ", rule.clone()).unwrap_err().code(),
            ErrorCode::InvalidRule
        );
        let dup =
            RuleSet::try_from_rules([("GET /a", rule.clone()), ("GET /a", rule)]).unwrap_err();
        assert_eq!(dup.details()["endpoint"], "GET /a");
    }
}
