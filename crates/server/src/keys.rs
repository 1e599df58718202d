//! Bucket keys of request descriptors.
//!
//! A descriptor that resolved to a limit has a *bucket path*: its domain, then each entry as
//! `|key=value` (or `|key~pattern` for a wildcard with `share_threshold`, whose matching values
//! share one bucket):
//!
//! ```text
//! messaging|message_type=marketing|to_number=2061111111
//! example11|files~files/*
//! ```
//!
//! Inside each part, `\`, `|`, `=` and `~` are written as `\\`, `\|`, `\=` and `\~`, so the
//! separators always separate and distinct paths are distinct strings. A part longer than
//! [`MAX_IDENTIFIER_BYTES`] bytes is written as `\H` and the hex SHA-256 of its bytes (`\H`
//! never appears otherwise: an escaped `\` is `\\`), so a request cannot make keys large.
//!
//! The storage key is the library's key of a global bucket whose endpoint is that path:
//! `<prefix>:global:<path>` (the library then percent-encodes `%`, `:`, `{`, `}` and control
//! characters), for example `rls:global:messaging|to_number=2061111111`. The key depends on
//! the path only, not on the numbers of the limit, so a reload that keeps a descriptor keeps its
//! bucket's state (a bucket whose limit shrank is capped at the new size on its next check).

use std::fmt::Write as _;

use ratelimit_domain::{BucketKey, KeyBuilder, Limit, MAX_IDENTIFIER_BYTES, RateLimitRule, Result};
use sha2::{Digest, Sha256};

use crate::config::EntryMatch;

/// The bucket path of a descriptor of `domain` whose entries matched as `entries`.
pub fn bucket_path(domain: &str, entries: &[(&str, EntryMatch<'_>)]) -> String {
    let mut path = String::with_capacity(64);
    push_part(&mut path, domain);
    for (key, how) in entries {
        path.push('|');
        push_part(&mut path, key);
        match how {
            EntryMatch::Value(value) => {
                path.push('=');
                push_part(&mut path, value);
            }
            EntryMatch::SharedPattern(pattern) => {
                path.push('~');
                push_part(&mut path, pattern);
            }
        }
    }
    path
}

/// The bucket path of a descriptor that carries its own limit (the `limit` override of the
/// request): `domain|!<requests_per_unit>/<unit>` and then its entries as given, so that
/// overrides with different numbers never share a bucket with each other or with a
/// configured limit.
pub fn override_path<'a>(
    domain: &str,
    requests_per_unit: u32,
    unit: &str,
    entries: impl Iterator<Item = (&'a str, &'a str)>,
) -> String {
    let mut path = String::with_capacity(64);
    push_part(&mut path, domain);
    // Writing to a String cannot fail.
    let _ = write!(path, "|!{requests_per_unit}/{unit}");
    for (key, value) in entries {
        path.push('|');
        push_part(&mut path, key);
        path.push('=');
        push_part(&mut path, value);
    }
    path
}

/// The library limit and storage key of the bucket at `path`, under `prefix`.
///
/// # Errors
/// `InvalidInput` for an empty prefix.
pub fn bucket(prefix: &str, path: &str, rule: &RateLimitRule) -> Result<(Limit, BucketKey)> {
    let limit = Limit::implicit(path, rule.clone());
    let key = KeyBuilder::for_limit(prefix, path, &limit)?.key("")?;
    Ok((limit, key))
}

fn push_part(out: &mut String, part: &str) {
    if part.len() > MAX_IDENTIFIER_BYTES {
        out.push_str("\\H");
        for byte in Sha256::digest(part.as_bytes()) {
            // Writing to a String cannot fail.
            let _ = write!(out, "{byte:02x}");
        }
        return;
    }
    for c in part.chars() {
        if matches!(c, '\\' | '|' | '=' | '~') {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use EntryMatch::{SharedPattern, Value};

    #[test]
    fn paths_are_readable() {
        assert_eq!(
            bucket_path(
                "messaging",
                &[
                    ("message_type", Value("marketing")),
                    ("to_number", Value("2061111111"))
                ]
            ),
            "messaging|message_type=marketing|to_number=2061111111"
        );
        assert_eq!(
            bucket_path("example11", &[("files", SharedPattern("files/*"))]),
            "example11|files~files/*"
        );
        let rule = crate::config::bucket_rule(5, crate::config::Unit::Second)
            .unwrap()
            .unwrap();
        let (_, key) = bucket("rls", "d|remote_address=2001:db8::1", &rule).unwrap();
        assert_eq!(
            key.as_str(),
            "rls:global:d|remote_address=2001%3Adb8%3A%3A1"
        );
    }

    #[test]
    fn long_parts_are_hashed() {
        let long = "v".repeat(MAX_IDENTIFIER_BYTES + 1);
        let path = bucket_path("d", &[("k", Value(&long))]);
        assert_eq!(path.len(), "d|k=\\H".len() + 64);
        let other = "w".repeat(10_000);
        assert_ne!(path, bucket_path("d", &[("k", Value(&other))]));
        assert_eq!(bucket_path("d", &[("k", Value(&other))]).len(), path.len());
    }

    /// Adversarial pieces: separators, escapes, lookalikes of a hashed part.
    const PIECES: [&str; 9] = ["|", "=", "~", "\\", "\\H", "a", "", "k=v", "|k=v"];

    /// A descriptor as written: domain and (key, shared pattern?, value) entries.
    type Written = (String, Vec<(String, bool, String)>);

    #[test]
    fn distinct_descriptors_never_share_a_path() {
        let mut strings = vec![String::new()];
        for _ in 0..2 {
            let mut longer = Vec::new();
            for s in &strings {
                for piece in PIECES {
                    longer.push(format!("{s}{piece}"));
                }
            }
            strings.extend(longer);
        }
        strings.sort();
        strings.dedup();
        let mut seen: HashMap<String, Written> = HashMap::new();
        let mut check = |domain: &str, entries: Vec<(String, bool, String)>| {
            let matched: Vec<(&str, EntryMatch<'_>)> = entries
                .iter()
                .map(|(k, shared, v)| {
                    (
                        k.as_str(),
                        if *shared {
                            SharedPattern(v.as_str())
                        } else {
                            Value(v.as_str())
                        },
                    )
                })
                .collect();
            let path = bucket_path(domain, &matched);
            let me = (domain.to_owned(), entries.clone());
            if let Some(previous) = seen.insert(path.clone(), me.clone()) {
                assert_eq!(previous, me, "{path}");
            }
        };
        for a in &strings {
            for b in &strings {
                check("d", vec![(a.clone(), false, b.clone())]);
                check("d", vec![(a.clone(), true, b.clone())]);
                check(a, vec![("k".to_owned(), false, b.clone())]);
                check(
                    "d",
                    vec![
                        ("k".to_owned(), false, a.clone()),
                        ("k".to_owned(), false, b.clone()),
                    ],
                );
            }
        }
        assert!(seen.len() > 10_000, "{}", seen.len());
    }
}
