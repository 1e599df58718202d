//! Reading the token-bucket script's reply into a decision.

use std::time::Duration;

use ratelimit_domain::token_bucket;
use ratelimit_domain::{BucketDecision, Result};
use redis::Value;

use crate::error::bad_reply;

/// Reads `[allowed, retry_after, remaining, …]`, or the compact script's bare `remaining` of
/// an allowed check.
pub(crate) fn parse_reply(reply: &Value) -> Result<BucketDecision> {
    let items = match reply {
        Value::Array(items) => items,
        Value::Int(remaining) => {
            let remaining = u64::try_from(*remaining)
                .map_err(|_| bad_reply(format!("remaining = {remaining}")))?;
            return Ok(BucketDecision {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining,
            });
        }
        _ => return Err(bad_reply(format!("{reply:?}"))),
    };
    let [allowed, retry_after, remaining, ..] = items.as_slice() else {
        return Err(bad_reply(format!("{reply:?}")));
    };
    decision(allowed, retry_after, remaining)
}

/// Reads the multi-bucket script's reply: `[had, retry_after, remaining]` for each of the `n`
/// buckets, flat, each read as [`parse_reply`] reads the single script's.
pub(crate) fn parse_multi_reply(reply: &Value, n: usize) -> Result<Vec<BucketDecision>> {
    let items = match reply {
        Value::Array(items) if items.len() == 3 * n => items,
        _ => return Err(bad_reply(format!("{reply:?}"))),
    };
    items
        .chunks_exact(3)
        .map(|triple| decision(&triple[0], &triple[1], &triple[2]))
        .collect()
}

/// Reads the give-back script's reply: the whole tokens of each of the `n` buckets afterwards.
pub(crate) fn parse_give_back_reply(reply: &Value, n: usize) -> Result<Vec<u64>> {
    let items = match reply {
        Value::Array(items) if items.len() == n => items,
        _ => return Err(bad_reply(format!("{reply:?}"))),
    };
    items
        .iter()
        .map(|item| match item {
            Value::Int(n) => u64::try_from(*n).map_err(|_| bad_reply(format!("remaining = {n}"))),
            other => Err(bad_reply(format!("remaining = {other:?}"))),
        })
        .collect()
}

/// One decision from its three reply items.
fn decision(allowed: &Value, retry_after: &Value, remaining: &Value) -> Result<BucketDecision> {
    let allowed = match allowed {
        Value::Int(0) => false,
        Value::Int(1) => true,
        other => return Err(bad_reply(format!("allowed = {other:?}"))),
    };
    let retry_after = match retry_after {
        Value::BulkString(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse::<f64>().ok()),
        Value::SimpleString(s) => s.parse::<f64>().ok(),
        Value::Int(i) => Some(*i as f64),
        _ => None,
    }
    .filter(|secs| *secs >= 0.0)
    .ok_or_else(|| bad_reply(format!("retry_after = {retry_after:?}")))?;
    let remaining = match remaining {
        Value::Int(n) => u64::try_from(*n).map_err(|_| bad_reply(format!("remaining = {n}")))?,
        other => return Err(bad_reply(format!("remaining = {other:?}"))),
    };
    Ok(BucketDecision {
        allowed,
        retry_after: token_bucket::seconds(retry_after),
        remaining,
    })
}

#[cfg(test)]
mod tests {
    use ratelimit_domain::ErrorCode;

    use super::*;

    #[test]
    fn replies_are_read_with_full_precision() {
        let reply = Value::Array(vec![
            Value::Int(0),
            Value::BulkString(b"11.75".to_vec()),
            Value::Int(0),
            Value::Nil,
        ]);
        let decision = parse_reply(&reply).unwrap();
        assert!(!decision.allowed);
        assert_eq!(decision.retry_after, Duration::from_millis(11_750));
        let never = Value::Array(vec![
            Value::Int(0),
            Value::BulkString(b"inf".to_vec()),
            Value::Int(3),
        ]);
        assert!(parse_reply(&never).unwrap().is_never());
    }

    #[test]
    fn a_bare_integer_is_an_allowed_check_of_the_compact_script() {
        let decision = parse_reply(&Value::Int(41)).unwrap();
        assert!(decision.allowed);
        assert_eq!(decision.retry_after, Duration::ZERO);
        assert_eq!(decision.remaining, 41);
    }

    #[test]
    fn malformed_replies_are_errors() {
        for reply in [
            Value::Nil,
            Value::Int(-1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![
                Value::Int(2),
                Value::BulkString(b"0".to_vec()),
                Value::Int(1),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"x".to_vec()),
                Value::Int(1),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"-1".to_vec()),
                Value::Int(1),
            ]),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"0".to_vec()),
                Value::Int(-1),
            ]),
        ] {
            assert_eq!(
                parse_reply(&reply).unwrap_err().code(),
                ErrorCode::CorruptBucket,
                "{reply:?}"
            );
        }
    }

    #[test]
    fn extreme_replies_are_corrupt_buckets_or_never_not_panics() {
        // What a script fed garbage used to answer: floor(-1e308) and floor(NaN) reach the
        // client as i64::MIN.
        for reply in [
            Value::Int(i64::MIN),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(b"nan".to_vec()),
                Value::Int(0),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(b"-inf".to_vec()),
                Value::Int(0),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(b"1".to_vec()),
                Value::Int(i64::MIN),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(vec![0xFF, 0xFE]),
                Value::Int(0),
            ]),
        ] {
            assert_eq!(
                parse_reply(&reply).unwrap_err().code(),
                ErrorCode::CorruptBucket,
                "{reply:?}"
            );
        }
        for wait in ["1e308", "1e400", "inf", "18446744073709551616"] {
            let reply = Value::Array(vec![
                Value::Int(0),
                Value::BulkString(wait.as_bytes().to_vec()),
                Value::Int(i64::MAX),
            ]);
            let decision = parse_reply(&reply).unwrap();
            assert!(decision.is_never(), "{wait}");
            assert_eq!(decision.remaining, i64::MAX as u64);
        }
    }

    #[test]
    fn multi_replies_are_read_per_bucket_and_must_have_every_bucket() {
        let reply = Value::Array(vec![
            Value::Int(1),
            Value::BulkString(b"0".to_vec()),
            Value::Int(4),
            Value::Int(0),
            Value::BulkString(b"11.75".to_vec()),
            Value::Int(0),
            Value::Int(0),
            Value::BulkString(b"inf".to_vec()),
            Value::Int(7),
        ]);
        let decisions = parse_multi_reply(&reply, 3).unwrap();
        assert_eq!(
            decisions
                .iter()
                .map(|d| (d.allowed, d.remaining))
                .collect::<Vec<_>>(),
            [(true, 4), (false, 0), (false, 7)]
        );
        assert_eq!(decisions[1].retry_after, Duration::from_millis(11_750));
        assert!(decisions[2].is_never());
        for n in [2, 4] {
            assert_eq!(
                parse_multi_reply(&reply, n).unwrap_err().code(),
                ErrorCode::CorruptBucket
            );
        }
        assert!(parse_multi_reply(&Value::Int(1), 1).is_err());
        let give_back = Value::Array(vec![Value::Int(3), Value::Int(0)]);
        assert_eq!(parse_give_back_reply(&give_back, 2).unwrap(), [3, 0]);
        assert!(parse_give_back_reply(&give_back, 1).is_err());
        let negative = Value::Array(vec![Value::Int(-1)]);
        assert!(parse_give_back_reply(&negative, 1).is_err());
    }
}
