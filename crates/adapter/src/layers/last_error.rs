//! A layer that remembers the last error of the store it wraps.

use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, BucketStore, RateLimitRule, Result,
};

/// Forwards every call to `inner` and keeps the message of the last error it returned.
///
/// A check that the adapter answered under its failure policy (fail-open, say) returns no
/// error; an admin tool can still report what the store said. The `ratelimit` CLI's `check`
/// uses it to show the real Redis error next to the fail-open answer.
#[derive(Debug)]
pub struct ErrorCaptureStore<S> {
    inner: S,
    last_error: Mutex<Option<String>>,
}

impl<S> ErrorCaptureStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            last_error: Mutex::new(None),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The last error the store returned (its `Display`: code and message), if any.
    pub fn last_error(&self) -> Option<String> {
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
impl<S: BucketStore> BucketStore for ErrorCaptureStore<S> {
    async fn check_and_consume<'a>(&self, request: &BucketRequest<'a>) -> Result<BucketDecision> {
        let result = self.inner.check_and_consume(request).await;
        self.record(result)
    }

    async fn check_and_consume_all<'a>(
        &self,
        requests: &[BucketRequest<'a>],
    ) -> Result<Vec<BucketDecision>> {
        let result = self.inner.check_and_consume_all(requests).await;
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
