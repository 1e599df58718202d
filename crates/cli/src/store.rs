//! A store wrapper that remembers the last error, so that a check the adapter answered with
//! fail-open can still be reported with the real Redis error.

use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, BucketStore, RateLimitRule, Result,
};

/// Forwards to `inner` and keeps the message of the last error it returned.
#[derive(Debug)]
pub(crate) struct ErrorCapture<S> {
    inner: S,
    last_error: Mutex<Option<String>>,
}

impl<S> ErrorCapture<S> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            last_error: Mutex::new(None),
        }
    }

    /// The wrapped store.
    pub(crate) fn inner(&self) -> &S {
        &self.inner
    }

    /// The last error the store returned (its `Display`: code and message), if any.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(err) = &result {
            *self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(err.to_string());
        }
        result
    }
}

#[async_trait]
impl<S: BucketStore> BucketStore for ErrorCapture<S> {
    async fn check_and_consume<'a>(&self, request: &BucketRequest<'a>) -> Result<BucketDecision> {
        let result = self.inner.check_and_consume(request).await;
        self.record(result)
    }

    async fn get_remaining(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        now: Option<f64>,
    ) -> Result<u64> {
        let result = self.inner.get_remaining(key, rule, now).await;
        self.record(result)
    }

    async fn reset(&self, key: &BucketKey, rule: &RateLimitRule) -> Result<bool> {
        let result = self.inner.reset(key, rule).await;
        self.record(result)
    }
}
