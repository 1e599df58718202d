//! Endpoint → rule.

use std::collections::HashMap;

use crate::{ErrorCode, RateLimitError, RateLimitRule, Result};

/// The rules of a service, by endpoint (for example `"POST /api/v1/sessions"`).
///
/// Endpoints are matched exactly; an endpoint without a rule is not limited.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: HashMap<String, RateLimitRule>,
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
            set.insert(endpoint, rule)?;
        }
        Ok(set)
    }

    /// Adds or replaces the rule of `endpoint`, returning the one it replaced.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidRule`] for an empty endpoint.
    pub fn insert(
        &mut self,
        endpoint: impl Into<String>,
        rule: RateLimitRule,
    ) -> Result<Option<RateLimitRule>> {
        let endpoint = endpoint.into();
        if endpoint.trim().is_empty() {
            return Err(RateLimitError::new(
                ErrorCode::InvalidRule,
                "endpoint must not be empty",
            ));
        }
        Ok(self.rules.insert(endpoint, rule))
    }

    /// The rule of `endpoint`, if any.
    pub fn get(&self, endpoint: &str) -> Option<&RateLimitRule> {
        self.rules.get(endpoint)
    }

    /// Every (endpoint, rule) pair, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RateLimitRule)> {
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
        assert_eq!(rules.get("POST /api/v1/sessions"), Some(&rule));
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
