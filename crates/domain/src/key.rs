//! Storage keys built from untrusted identifiers.

use std::fmt::{self, Write as _};

use sha2::{Digest, Sha256};

use crate::{ErrorCode, Limit, RateLimitError, RateLimitScope, Result};

/// The longest identifier written into a key as it is, in bytes. A longer identifier is
/// replaced by `%H` and the hex SHA-256 of its bytes (66 bytes), so that one caller cannot make
/// keys (and Redis memory) arbitrarily large, while distinct identifiers keep distinct keys.
pub const MAX_IDENTIFIER_BYTES: usize = 256;

/// The key of one bucket, without the suffixes a store may add (`:tokens`, `:time`).
///
/// Keys have the specification's readable shape:
///
/// | scope | key |
/// |---|---|
/// | Ip | `rate_limit:ip:<identifier>:<endpoint>` |
/// | User | `rate_limit:user:<identifier>:<endpoint>` |
/// | UserProvider | `rate_limit:user_provider:<identifier>:<endpoint>` |
/// | Global | `rate_limit:global:<endpoint>` |
///
/// Identifiers and endpoints are written as they are, except for a few characters that are
/// percent-encoded as their UTF-8 bytes (`%XX`): `%` itself, `{` and `}` (Redis Cluster hash
/// tags), control characters, and in the endpoint also `:`. Since the endpoint then holds no
/// `:`, the last `:` of a key separates identifier and endpoint, so two different
/// (scope, identifier, endpoint) triples never share a key, while IPv4 and IPv6 addresses,
/// user ids and `"POST /api/v1/sessions"` stay readable.
///
/// Identifiers longer than [`MAX_IDENTIFIER_BYTES`] are written as `%H` followed by the
/// lower-case hex SHA-256 of their bytes. `%H` never appears in an encoded identifier (an
/// escaped `%` is always followed by two hex digits), so hashed and readable identifiers never
/// collide.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey(String);

impl BucketKey {
    /// Builds the key of one bucket with the default prefix `rate_limit`.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`] for an empty endpoint, or for an empty or over-long
    /// identifier in a scope that uses identifiers.
    pub fn new(scope: RateLimitScope, identifier: &str, endpoint: &str) -> Result<Self> {
        KeyBuilder::new(KeyBuilder::DEFAULT_PREFIX, scope, endpoint)?.key(identifier)
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's string, for instance to reuse its allocation as the buffer of the next key
    /// ([`KeyBuilder::key_in`]).
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for BucketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds the keys of one rule's buckets, with everything but the identifier encoded once.
#[derive(Debug, Clone)]
pub struct KeyBuilder {
    scope: RateLimitScope,
    /// `<prefix>:<scope>:` (or the whole key for the global scope).
    head: String,
    /// `:<encoded endpoint>` (empty for the global scope, whose head holds the endpoint).
    tail: String,
}

impl KeyBuilder {
    /// The specification's key prefix.
    pub const DEFAULT_PREFIX: &'static str = "rate_limit";

    /// A builder for the buckets of `endpoint` under `scope`, below `prefix`.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`] when `prefix` or `endpoint` is empty.
    pub fn new(prefix: &str, scope: RateLimitScope, endpoint: &str) -> Result<Self> {
        Self::build(prefix, scope, None, endpoint)
    }

    /// A builder for the buckets of one limit of `endpoint`, below `prefix`.
    ///
    /// The implicit limit of the single-limit form keeps the keys of [`new`](Self::new). A
    /// named limit puts `#<name>` after the scope, as in
    /// `rate_limit:ip#per-client:203.0.113.9:GET /search` or
    /// `rate_limit:global#everyone:GET /search`: names hold no `:` nor `#` (see [`Limit`]),
    /// scopes no `#`, and the prefix no `:`, so a named limit's key never equals another
    /// limit's, nor a key of the single-limit form.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn for_limit(prefix: &str, endpoint: &str, limit: &Limit) -> Result<Self> {
        let name = limit.is_named().then(|| limit.name());
        Self::build(prefix, limit.rule().scope(), name, endpoint)
    }

    fn build(
        prefix: &str,
        scope: RateLimitScope,
        name: Option<&str>,
        endpoint: &str,
    ) -> Result<Self> {
        if prefix.is_empty() {
            return Err(invalid("key prefix must not be empty"));
        }
        if endpoint.is_empty() {
            return Err(invalid("endpoint must not be empty"));
        }
        let mut head = String::with_capacity(prefix.len() + 16 + endpoint.len());
        encode_into(&mut head, prefix, true);
        head.push(':');
        head.push_str(scope.as_str());
        if let Some(name) = name {
            head.push('#');
            // Validated names need no escaping; this keeps keys distinct for any other.
            encode_into(&mut head, name, true);
        }
        head.push(':');
        let mut tail = String::with_capacity(endpoint.len() + 1);
        if scope.uses_identifier() {
            tail.push(':');
            encode_into(&mut tail, endpoint, true);
        } else {
            encode_into(&mut head, endpoint, true);
        }
        Ok(Self { scope, head, tail })
    }

    /// The key of `identifier`'s bucket (the identifier is ignored for the global scope).
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`] when the scope uses identifiers and `identifier` is empty.
    pub fn key(&self, identifier: &str) -> Result<BucketKey> {
        self.key_in(identifier, String::new())
    }

    /// The key of `identifier`'s bucket, as [`key`](Self::key) builds it, written into `buffer`
    /// (cleared first) so that a caller building one key per request can reuse one allocation
    /// ([`BucketKey::into_string`] gives it back).
    ///
    /// ```
    /// use ratelimit_domain::{KeyBuilder, RateLimitScope};
    ///
    /// let keys = KeyBuilder::new(KeyBuilder::DEFAULT_PREFIX, RateLimitScope::Ip, "GET /x")?;
    /// let first = keys.key_in("203.0.113.9", String::new())?;
    /// let second = keys.key_in("198.51.100.7", first.into_string())?;
    /// assert_eq!(second, keys.key("198.51.100.7")?);
    /// # Ok::<(), ratelimit_domain::RateLimitError>(())
    /// ```
    ///
    /// # Errors
    /// As [`key`](Self::key).
    pub fn key_in(&self, identifier: &str, mut buffer: String) -> Result<BucketKey> {
        buffer.clear();
        if !self.scope.uses_identifier() {
            buffer.push_str(&self.head);
            return Ok(BucketKey(buffer));
        }
        if identifier.is_empty() {
            return Err(
                invalid("identifier must not be empty").with_detail("scope", self.scope.as_str())
            );
        }
        let mut key = buffer;
        key.reserve_exact(self.head.len() + identifier.len() + self.tail.len());
        key.push_str(&self.head);
        if identifier.len() > MAX_IDENTIFIER_BYTES {
            key.push_str("%H");
            for byte in Sha256::digest(identifier.as_bytes()) {
                // Writing to a String cannot fail.
                let _ = write!(key, "{byte:02x}");
            }
        } else {
            encode_into(&mut key, identifier, false);
        }
        key.push_str(&self.tail);
        Ok(BucketKey(key))
    }
}

fn invalid(message: impl Into<String>) -> RateLimitError {
    RateLimitError::new(ErrorCode::InvalidInput, message)
}

fn needs_escape(c: char, escape_colon: bool) -> bool {
    matches!(c, '%' | '{' | '}') || c.is_control() || (escape_colon && c == ':')
}

/// [`PLAIN`]'s bit of a byte that needs no escape where `:` does not.
const PLAIN_BYTE: u8 = 1;
/// [`PLAIN`]'s bit of a byte that needs no escape where `:` does too.
const PLAIN_BYTE_NOT_COLON: u8 = 2;

/// Per byte, whether it is printable ASCII that needs no escape ([`PLAIN_BYTE`]), and whether
/// it also is not `:` ([`PLAIN_BYTE_NOT_COLON`]): one lookup per byte.
static PLAIN: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = b' ';
    while b <= b'~' {
        if !matches!(b, b'%' | b'{' | b'}') {
            table[b as usize] = if b == b':' {
                PLAIN_BYTE
            } else {
                PLAIN_BYTE | PLAIN_BYTE_NOT_COLON
            };
        }
        b += 1;
    }
    table
};

/// Whether `text` is ASCII without a character to escape: checked byte by byte, the common case
/// (addresses, user ids) without decoding characters.
fn plain_ascii(text: &str, escape_colon: bool) -> bool {
    let bit = if escape_colon {
        PLAIN_BYTE_NOT_COLON
    } else {
        PLAIN_BYTE
    };
    text.bytes().all(|b| PLAIN[usize::from(b)] & bit != 0)
}

fn encode_into(out: &mut String, text: &str, escape_colon: bool) {
    if plain_ascii(text, escape_colon) || !text.chars().any(|c| needs_escape(c, escape_colon)) {
        out.push_str(text);
        return;
    }
    let mut buf = [0u8; 4];
    for c in text.chars() {
        if needs_escape(c, escape_colon) {
            for byte in c.encode_utf8(&mut buf).bytes() {
                // Writing to a String cannot fail.
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RateLimitScope::*;

    fn key(scope: RateLimitScope, id: &str, endpoint: &str) -> String {
        BucketKey::new(scope, id, endpoint)
            .unwrap()
            .as_str()
            .to_owned()
    }

    #[test]
    fn ordinary_keys_match_the_specification() {
        assert_eq!(
            key(Ip, "192.168.1.1", "POST /api/v1/sessions"),
            "rate_limit:ip:192.168.1.1:POST /api/v1/sessions"
        );
        assert_eq!(
            key(User, "user-42", "GET /x"),
            "rate_limit:user:user-42:GET /x"
        );
        assert_eq!(
            key(UserProvider, "42@github", "GET /x"),
            "rate_limit:user_provider:42@github:GET /x"
        );
        assert_eq!(key(Global, "ignored", "GET /x"), "rate_limit:global:GET /x");
        assert_eq!(key(Global, "", "GET /x"), "rate_limit:global:GET /x");
        assert_eq!(
            key(Ip, "2001:db8::1", "GET /x"),
            "rate_limit:ip:2001:db8::1:GET /x"
        );
        assert_eq!(
            key(User, "Zoë", "GET /café"),
            "rate_limit:user:Zoë:GET /café"
        );
    }

    #[test]
    fn named_limits_have_their_own_keys_and_the_implicit_one_keeps_the_old_key() {
        let rule = crate::RateLimitRule::new(Ip, 5, 5.0).unwrap();
        let named = Limit::named("per-client", rule.clone()).unwrap();
        let key_of = |limit: &Limit| {
            KeyBuilder::for_limit("rate_limit", "GET /x", limit)
                .unwrap()
                .key("1.2.3.4")
                .unwrap()
                .as_str()
                .to_owned()
        };
        assert_eq!(key_of(&named), "rate_limit:ip#per-client:1.2.3.4:GET /x");
        assert_eq!(
            key_of(&Limit::implicit("GET /x", rule)),
            key(Ip, "1.2.3.4", "GET /x")
        );
        let global = Limit::named(
            "everyone",
            crate::RateLimitRule::new(Global, 5, 5.0).unwrap(),
        )
        .unwrap();
        assert_eq!(key_of(&global), "rate_limit:global#everyone:GET /x");
    }

    #[test]
    fn special_characters_are_escaped() {
        assert_eq!(
            key(User, "{a}%\n", "GET /x"),
            "rate_limit:user:%7Ba%7D%25%0A:GET /x"
        );
        assert_eq!(
            key(User, "a", "GET /v1/{id}:cancel"),
            "rate_limit:user:a:GET /v1/%7Bid%7D%3Acancel"
        );
        assert_eq!(
            key(User, "nul\0", "GET /x"),
            "rate_limit:user:nul%00:GET /x"
        );
    }

    #[test]
    fn colons_cannot_move_the_boundary_between_identifier_and_endpoint() {
        assert_ne!(key(User, "a:b", "c"), key(User, "a", "b:c"));
        assert_ne!(key(User, "a%3Ab", "c"), key(User, "a:b", "c"));
    }

    #[test]
    fn bad_identifiers_are_rejected_with_a_clear_error() {
        let err = BucketKey::new(Ip, "", "GET /x").unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidInput);
        assert_eq!(err.message(), "identifier must not be empty");
        assert_eq!(
            BucketKey::new(User, "", "GET /x").unwrap_err().code(),
            ErrorCode::InvalidInput
        );
        assert_eq!(
            BucketKey::new(Ip, "1.2.3.4", "").unwrap_err().code(),
            ErrorCode::InvalidInput
        );
    }

    #[test]
    fn long_identifiers_are_hashed_into_bounded_distinct_keys() {
        let at_limit = "x".repeat(MAX_IDENTIFIER_BYTES);
        assert_eq!(
            key(Ip, &at_limit, "GET /x"),
            format!("rate_limit:ip:{at_limit}:GET /x")
        );
        let long = "x".repeat(MAX_IDENTIFIER_BYTES + 1);
        let hashed = key(Ip, &long, "GET /x");
        assert!(hashed.starts_with("rate_limit:ip:%H"), "{hashed}");
        assert_eq!(hashed.len(), "rate_limit:ip:%H:GET /x".len() + 64);
        let megabyte = "y".repeat(1 << 20);
        assert_eq!(key(Ip, &megabyte, "GET /x").len(), hashed.len());
        assert_ne!(key(Ip, &megabyte, "GET /x"), hashed);
        // A readable identifier that looks like a hash does not collide with one.
        let lookalike = hashed["rate_limit:ip:".len()..hashed.len() - ":GET /x".len()].to_owned();
        assert_ne!(key(Ip, &lookalike, "GET /x"), hashed);
    }

    /// Adversarial pieces: separators, escapes, hash tags, controls, Unicode, lookalikes.
    const PIECES: [&str; 16] = [
        ":", "{", "}", "%", "%3A", "%25", "%H", "\n", "\r\n", "\0", "é", "日本", "a", " ",
        "\u{85}", "::1",
    ];

    fn adversarial(n: usize) -> Vec<String> {
        // Every string of up to three pieces.
        let mut out = vec![String::new()];
        for _ in 0..n {
            let mut longer = Vec::new();
            for s in &out {
                for piece in PIECES {
                    longer.push(format!("{s}{piece}"));
                }
            }
            out.extend(longer);
        }
        out.sort();
        out.dedup();
        out
    }

    #[test]
    fn distinct_triples_never_share_a_key() {
        let strings = adversarial(2);
        let endpoints: Vec<&str> = strings
            .iter()
            .filter(|s| !s.is_empty())
            .map(String::as_str)
            .take(60)
            .collect();
        let mut seen = std::collections::HashMap::new();
        for scope in RateLimitScope::ALL {
            for endpoint in &endpoints {
                let builder = KeyBuilder::new("rate_limit", scope, endpoint).unwrap();
                for identifier in strings.iter().filter(|s| !s.is_empty()) {
                    let key = builder.key(identifier).unwrap();
                    // The global scope ignores identifiers, so its triple is (scope, endpoint).
                    let triple = (
                        scope,
                        if scope.uses_identifier() {
                            identifier.as_str()
                        } else {
                            ""
                        },
                        *endpoint,
                    );
                    if let Some(previous) = seen.insert(key.clone(), triple) {
                        assert_eq!(previous, triple, "{previous:?} and {triple:?} share {key}");
                    }
                }
            }
        }
        assert!(seen.len() > 40_000, "{} keys", seen.len());
    }

    #[test]
    fn keys_built_in_a_reused_buffer_are_the_keys_built_afresh() {
        let ids = [
            "203.0.113.9",
            "x",
            "2001:db8::1",
            "a%b{c}",
            "tab\there",
            "Zoë",
            "\u{85}next-line",
            "",
            &"long".repeat(100),
        ];
        for scope in [Ip, User, UserProvider, Global] {
            let keys = KeyBuilder::new("rate_limit", scope, "GET /a:b").unwrap();
            // A buffer that held a longer key first, then shorter ones: nothing of it remains.
            let mut buffer = "left over from an earlier key".repeat(4);
            for id in ids {
                let fresh = keys.key(id);
                let reused = keys.key_in(id, buffer.clone());
                match (fresh, reused) {
                    (Ok(fresh), Ok(reused)) => {
                        assert_eq!(fresh, reused, "{scope:?} {id:?}");
                        buffer = reused.into_string();
                    }
                    (Err(fresh), Err(reused)) => {
                        assert_eq!(fresh.code(), reused.code(), "{scope:?} {id:?}");
                    }
                    (fresh, reused) => panic!("{scope:?} {id:?}: {fresh:?} vs {reused:?}"),
                }
            }
        }
    }

    #[test]
    fn the_ascii_shortcut_agrees_with_the_character_check() {
        let mut texts: Vec<String> = (0u8..=127).map(|b| char::from(b).to_string()).collect();
        texts.extend(["é", "\u{80}", "\u{9f}", "\u{a0}", "ab:cd", "a b", "~"].map(String::from));
        for text in &texts {
            for escape_colon in [false, true] {
                if plain_ascii(text, escape_colon) {
                    assert!(
                        !text.chars().any(|c| needs_escape(c, escape_colon)),
                        "{text:?} {escape_colon}"
                    );
                } else if text.bytes().all(|b| (b' '..=b'~').contains(&b)) {
                    // Printable ASCII takes the shortcut unless it needs an escape.
                    assert!(
                        text.chars().any(|c| needs_escape(c, escape_colon)),
                        "{text:?} {escape_colon}"
                    );
                }
            }
        }
    }

    #[test]
    fn builder_with_custom_prefix() {
        let builder = KeyBuilder::new("tenant_a", Ip, "GET /x").unwrap();
        assert_eq!(
            builder.key("1.2.3.4").unwrap().as_str(),
            "tenant_a:ip:1.2.3.4:GET /x"
        );
        assert!(KeyBuilder::new("", Ip, "GET /x").is_err());
    }
}
