//! The store layer through which the CLI reports the real store error of a check that the
//! adapter answered under its failure policy.

pub(crate) use ratelimit_adapter::ErrorCaptureStore as ErrorCapture;
