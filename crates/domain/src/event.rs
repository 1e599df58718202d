//! What a check tells observers.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use crate::{DecisionSource, RateLimitScope};

/// A check is about to ask the store.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RateLimitCheckAttempted {
    /// Unique, time-ordered (UUID v7).
    pub event_id: Uuid,
    /// When the event was created.
    pub occurred_at: SystemTime,
    /// The endpoint being checked.
    pub endpoint: Arc<str>,
    /// The identifier being checked (as given, not encoded).
    pub identifier: Arc<str>,
    /// The rule's scope.
    pub scope: RateLimitScope,
    /// The cost asked for: the explicit cost, or the rule's when none was given.
    pub cost: u64,
}

/// A check allowed the request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RateLimitCheckAllowed {
    /// Unique, time-ordered (UUID v7).
    pub event_id: Uuid,
    /// When the event was created.
    pub occurred_at: SystemTime,
    /// The endpoint checked.
    pub endpoint: Arc<str>,
    /// The identifier checked.
    pub identifier: Arc<str>,
    /// The rule's scope.
    pub scope: RateLimitScope,
    /// Whole tokens left.
    pub remaining_tokens: u64,
    /// How long the check took, from rule lookup to decision.
    pub execution_time: Duration,
    /// Who decided: the store, or the failure policy standing in for it.
    pub source: DecisionSource,
}

/// A check denied the request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RateLimitCheckDenied {
    /// Unique, time-ordered (UUID v7).
    pub event_id: Uuid,
    /// When the event was created.
    pub occurred_at: SystemTime,
    /// The endpoint checked.
    pub endpoint: Arc<str>,
    /// The identifier checked.
    pub identifier: Arc<str>,
    /// The rule's scope.
    pub scope: RateLimitScope,
    /// How long until the request's cost is available (full precision;
    /// [`crate::RateLimitResult::RETRY_NEVER`] if never).
    pub retry_after: Duration,
    /// The name of the limit that refused (the one with the longest wait when several did;
    /// the endpoint, for the single-limit form). `None` when no limit was consulted.
    pub refused_by: Option<Arc<str>>,
    /// How long the check took, from rule lookup to decision.
    pub execution_time: Duration,
    /// Who decided: the store, or a failure policy standing in for it.
    pub source: DecisionSource,
}

/// Any of the events a check publishes, in this order: [`Attempted`](Self::Attempted), then
/// [`Allowed`](Self::Allowed) or [`Denied`](Self::Denied).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RateLimitEvent {
    /// See [`RateLimitCheckAttempted`].
    Attempted(RateLimitCheckAttempted),
    /// See [`RateLimitCheckAllowed`].
    Allowed(RateLimitCheckAllowed),
    /// See [`RateLimitCheckDenied`].
    Denied(RateLimitCheckDenied),
}

impl RateLimitEvent {
    /// A new [`RateLimitCheckAttempted`], stamped now.
    pub fn attempted(
        endpoint: Arc<str>,
        identifier: Arc<str>,
        scope: RateLimitScope,
        cost: u64,
    ) -> Self {
        Self::Attempted(RateLimitCheckAttempted {
            event_id: Uuid::now_v7(),
            occurred_at: SystemTime::now(),
            endpoint,
            identifier,
            scope,
            cost,
        })
    }

    /// A new [`RateLimitCheckAllowed`], stamped now.
    pub fn allowed(
        endpoint: Arc<str>,
        identifier: Arc<str>,
        scope: RateLimitScope,
        remaining_tokens: u64,
        execution_time: Duration,
        source: DecisionSource,
    ) -> Self {
        Self::Allowed(RateLimitCheckAllowed {
            event_id: Uuid::now_v7(),
            occurred_at: SystemTime::now(),
            endpoint,
            identifier,
            scope,
            remaining_tokens,
            execution_time,
            source,
        })
    }

    /// A new [`RateLimitCheckDenied`], stamped now.
    pub fn denied(
        endpoint: Arc<str>,
        identifier: Arc<str>,
        scope: RateLimitScope,
        retry_after: Duration,
        execution_time: Duration,
        source: DecisionSource,
    ) -> Self {
        Self::Denied(RateLimitCheckDenied {
            event_id: Uuid::now_v7(),
            occurred_at: SystemTime::now(),
            endpoint,
            identifier,
            scope,
            retry_after,
            refused_by: None,
            execution_time,
            source,
        })
    }

    /// The same event naming the limit that refused (only a denial carries it).
    #[must_use]
    pub fn with_refused_by(mut self, limit: Option<Arc<str>>) -> Self {
        if let Self::Denied(denied) = &mut self {
            denied.refused_by = limit;
        }
        self
    }

    /// The event's short name: `attempted`, `allowed` or `denied`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Attempted(_) => "attempted",
            Self::Allowed(_) => "allowed",
            Self::Denied(_) => "denied",
        }
    }

    /// The event's id.
    pub fn event_id(&self) -> Uuid {
        match self {
            Self::Attempted(e) => e.event_id,
            Self::Allowed(e) => e.event_id,
            Self::Denied(e) => e.event_id,
        }
    }

    /// The endpoint the event is about.
    pub fn endpoint(&self) -> &str {
        match self {
            Self::Attempted(e) => &e.endpoint,
            Self::Allowed(e) => &e.endpoint,
            Self::Denied(e) => &e.endpoint,
        }
    }

    /// The identifier the event is about.
    pub fn identifier(&self) -> &str {
        match self {
            Self::Attempted(e) => &e.identifier,
            Self::Allowed(e) => &e.identifier,
            Self::Denied(e) => &e.identifier,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_time_ordered_v7_ids() {
        let a = RateLimitEvent::attempted("GET /x".into(), "1.2.3.4".into(), RateLimitScope::Ip, 1);
        let b = RateLimitEvent::denied(
            "GET /x".into(),
            "1.2.3.4".into(),
            RateLimitScope::Ip,
            Duration::from_secs(1),
            Duration::ZERO,
            DecisionSource::Store,
        );
        assert_eq!(a.event_id().get_version_num(), 7);
        assert!(a.event_id() < b.event_id());
        assert_eq!((a.kind(), b.kind()), ("attempted", "denied"));
        assert_eq!((b.endpoint(), b.identifier()), ("GET /x", "1.2.3.4"));
    }
}
