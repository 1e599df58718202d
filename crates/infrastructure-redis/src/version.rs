//! Which Redis versions the scripts run on, read from `INFO server`.

use ratelimit_domain::{ErrorCode, RateLimitError, Result};
use redis::Value;

/// The oldest Redis the scripts run on, as (major, minor).
const MIN_VERSION: (u64, u64) = (5, 0);

/// The text of an `INFO` reply: a bulk or verbatim string from one Redis, a map of them (node
/// → reply) from a cluster.
fn collect_text(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::BulkString(bytes) => out.push(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) | Value::VerbatimString { text, .. } => out.push(text.clone()),
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|item| collect_text(item, out));
        }
        Value::Map(pairs) => pairs.iter().for_each(|(_, item)| collect_text(item, out)),
        _ => {}
    }
}

/// The `redis_version` of an `INFO server` text, as (major, minor, patch).
fn parse_version(info: &str) -> Option<(u64, u64, u64)> {
    let version = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))?;
    let mut parts = version
        .trim()
        .split('.')
        .map(|part| part.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next().unwrap_or(Some(0))?;
    let patch = parts.next().unwrap_or(Some(0))?;
    Some((major, minor, patch))
}

/// `Ok` for a supported version (or one that cannot be read, with a warning), a
/// `Configuration` error naming the version and why it is not supported otherwise.
fn check_supported(info: &str) -> Result<()> {
    let Some((major, minor, patch)) = parse_version(info) else {
        tracing::warn!("cannot read redis_version from INFO server; Redis 5.0 or later is needed");
        return Ok(());
    };
    if (major, minor) >= MIN_VERSION {
        return Ok(());
    }
    Err(RateLimitError::new(
        ErrorCode::Configuration,
        format!(
            "Redis {major}.{minor}.{patch} is not supported: the token-bucket scripts read TIME \
             and then write, which needs script effects replication, the default from Redis \
             5.0 on; upgrade to Redis 5.0 or later"
        ),
    )
    .with_detail("redis_version", format!("{major}.{minor}.{patch}")))
}

/// `Ok` when every Redis that answered `INFO server` (one, or each primary of a cluster) is
/// a supported version, or when no version can be read (with a warning); the
/// `Configuration` error of the first unsupported one otherwise.
pub(crate) fn check_info_reply(info: &Value) -> Result<()> {
    let mut texts = Vec::new();
    collect_text(info, &mut texts);
    if texts.is_empty() {
        tracing::warn!(reply = ?info, "cannot read the redis version from INFO server");
    }
    texts.iter().try_for_each(|text| check_supported(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_versions_are_read_from_info_and_old_ones_refused() {
        let info = |version: &str| {
            format!("# Server\r\nredis_version:{version}\r\nredis_git_sha1:00000000\r\n")
        };
        assert_eq!(parse_version(&info("7.0.15")), Some((7, 0, 15)));
        assert_eq!(parse_version(&info("5.0.0")), Some((5, 0, 0)));
        assert_eq!(parse_version(&info("4.0.14")), Some((4, 0, 14)));
        assert_eq!(parse_version(&info("7.2")), Some((7, 2, 0)));
        assert_eq!(parse_version(&info("255.255.255")), Some((255, 255, 255)));
        assert_eq!(parse_version(&info("seven")), None);
        assert_eq!(parse_version(&info("")), None);
        assert_eq!(parse_version("# Server\r\nprocess_id:1\r\n"), None);

        for supported in [
            "5.0.0", "5.0.14", "6.2.6", "7.0.15", "7.4.1", "8.0.0", "10.1",
        ] {
            assert!(check_supported(&info(supported)).is_ok(), "{supported}");
        }
        for old in ["4.0.14", "3.2.12", "2.8.24", "4.9.104"] {
            let err = check_supported(&info(old)).unwrap_err();
            assert_eq!(err.code(), ErrorCode::Configuration, "{old}");
            assert!(err.message().contains(old), "{}", err.message());
            assert!(err.message().contains("5.0"), "{}", err.message());
            assert!(err.message().contains("TIME"), "{}", err.message());
        }
        // Unreadable: not refused (a warning is logged).
        assert!(check_supported("no version here").is_ok());

        // One Redis answers a string; a cluster a map of them, one per primary.
        let mut texts = Vec::new();
        collect_text(
            &Value::Map(vec![
                (
                    Value::SimpleString("a:7000".into()),
                    Value::BulkString(info("7.0.15").into_bytes()),
                ),
                (
                    Value::SimpleString("b:7001".into()),
                    Value::VerbatimString {
                        format: redis::VerbatimFormat::Text,
                        text: info("4.0.1"),
                    },
                ),
            ]),
            &mut texts,
        );
        assert_eq!(texts.len(), 2);
        assert!(texts.iter().any(|text| check_supported(text).is_err()));
    }
}
