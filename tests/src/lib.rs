//! Test support for the ratelimit workspace, and the cross-crate tests in `tests/`.
//!
//! - [`redis_server`]: starts a throwaway `redis-server` on a free loopback port (or uses
//!   `REDIS_URL`), and can kill, pause and restart it.
//! - [`contract`]: the conformance suite every [`BucketStore`](ratelimit_domain::BucketStore)
//!   must pass; `tests/contract.rs` runs it against the memory and the Redis store.
//!
//! Tests that need Redis never skip: without `redis-server` they fail with a message saying
//! how to install it.

pub mod contract;
pub mod redis_cluster;
pub mod redis_server;
