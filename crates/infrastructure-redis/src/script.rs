//! The token-bucket scripts and how one call of them is built and sent: `EVALSHA`, or `EVAL`
//! with the script's text when Redis has lost it.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use ratelimit_domain::token_bucket::validate_now;
use ratelimit_domain::{BucketKey, RateLimitRule, Result};
use redis::{Cmd, ErrorKind, RedisResult, ServerErrorKind, Value};

use crate::KeyLayout;
use crate::connection::RedisConn;
use crate::keys::BucketKeys;

/// The token-bucket script of the two-key layout ([`KeyLayout::TwoKeys`]), as Redis runs it.
pub const TOKEN_BUCKET_SCRIPT: &str = include_str!("../../../lua/token_bucket.lua");

/// The token-bucket script of the compact layout ([`KeyLayout::Compact`]).
pub const TOKEN_BUCKET_COMPACT_SCRIPT: &str = include_str!("../../../lua/token_bucket_compact.lua");

/// The multi-bucket script of the two-key layout: one all-or-nothing check over the limits of a
/// request (`BucketStore::check_and_consume_all`), as `token_bucket::step_all`.
pub const TOKEN_BUCKET_MULTI_SCRIPT: &str = include_str!("../../../lua/token_bucket_multi.lua");

/// The multi-bucket script of the compact layout.
pub const TOKEN_BUCKET_COMPACT_MULTI_SCRIPT: &str =
    include_str!("../../../lua/token_bucket_compact_multi.lua");

/// The give-back script of the two-key layout: returns taken tokens when another slot of a Redis
/// Cluster refused the same request (docs/lua.md, "Several limits in one check").
pub(crate) const GIVE_BACK_SCRIPT: &str = include_str!("../../../lua/token_bucket_give_back.lua");

/// The give-back script of the compact layout.
pub(crate) const COMPACT_GIVE_BACK_SCRIPT: &str =
    include_str!("../../../lua/token_bucket_compact_give_back.lua");

/// One call of a script: how its `EVALSHA` (or `EVAL`) command is built.
pub(crate) trait BuildCmd: Sync {
    /// `EVALSHA sha …`, or `EVAL <script> …` without a SHA.
    fn cmd(&self, sha: Option<&str>, script: &str) -> Cmd;
}

/// A script: its text, its SHA-1 (computed once, so no round trip and no lock is needed to know
/// it) and how often Redis had lost it.
pub(crate) struct TokenBucketScript {
    script: redis::Script,
    /// The text, for the `EVAL` resend after a `NOSCRIPT`.
    text: &'static str,
    /// What the script is, for logs.
    name: &'static str,
    reloads: AtomicU64,
}

impl TokenBucketScript {
    /// The single-bucket script of `layout`.
    pub(crate) fn of(layout: KeyLayout) -> Self {
        match layout {
            KeyLayout::Compact => Self::new(TOKEN_BUCKET_COMPACT_SCRIPT, "token-bucket"),
            KeyLayout::TwoKeys => Self::new(TOKEN_BUCKET_SCRIPT, "token-bucket"),
        }
    }

    /// The multi-bucket script of `layout`.
    pub(crate) fn multi(layout: KeyLayout) -> Self {
        match layout {
            KeyLayout::Compact => Self::new(TOKEN_BUCKET_COMPACT_MULTI_SCRIPT, "multi-bucket"),
            KeyLayout::TwoKeys => Self::new(TOKEN_BUCKET_MULTI_SCRIPT, "multi-bucket"),
        }
    }

    /// The give-back script of `layout`.
    pub(crate) fn give_back(layout: KeyLayout) -> Self {
        match layout {
            KeyLayout::Compact => Self::new(COMPACT_GIVE_BACK_SCRIPT, "give-back"),
            KeyLayout::TwoKeys => Self::new(GIVE_BACK_SCRIPT, "give-back"),
        }
    }

    /// The script of `text`, named `name` in logs.
    pub(crate) fn new(text: &'static str, name: &'static str) -> Self {
        Self {
            script: redis::Script::new(text),
            text,
            name,
            reloads: AtomicU64::new(0),
        }
    }

    /// The SHA-1, as `EVALSHA` names it.
    pub(crate) fn sha(&self) -> &str {
        self.script.get_hash()
    }

    /// How many times Redis had lost the script and it was sent again.
    pub(crate) fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Runs the script by its SHA; if Redis has lost it (restart, failover, `SCRIPT FLUSH`),
    /// runs it once more with `EVAL` and its full text, which also puts it back in Redis's
    /// script cache. Unlike `SCRIPT LOAD` + `EVALSHA`, this cannot lose a race with another
    /// flush, and it is routed to the key's node on a cluster.
    pub(crate) async fn eval<C: BuildCmd>(
        &self,
        mut conn: RedisConn,
        call: &C,
    ) -> RedisResult<Value> {
        match call
            .cmd(Some(self.sha()), self.text)
            .query_async(&mut conn)
            .await
        {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let reloads = self.reloads.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    sha = self.sha(),
                    script = self.name,
                    reloads,
                    "redis had lost the {} script; sending it again",
                    self.name
                );
                call.cmd(None, self.text).query_async(&mut conn).await
            }
            other => other,
        }
    }
}

/// The keys and arguments of one script call (see docs/lua.md for the contract).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScriptCall<'a> {
    keys: BucketKeys<'a>,
    max_tokens: u64,
    refill_rate: f64,
    cost: u64,
    /// Seconds since the epoch, or `None` for Redis's `TIME` (an empty argument to the
    /// two-key script, no argument to the compact one).
    now: Option<f64>,
    /// The key lifetime, for the compact script only.
    ttl: Option<u64>,
}

impl<'a> ScriptCall<'a> {
    /// The call that takes `cost` tokens (0 to only read) from `key`'s bucket under `rule`,
    /// at `now` or Redis's `TIME`.
    ///
    /// # Errors
    /// `InvalidRequest` for a `now` that is not a usable time.
    pub(crate) fn new(
        key: &'a BucketKey,
        layout: KeyLayout,
        hash_tag: bool,
        rule: &RateLimitRule,
        cost: u64,
        now: Option<f64>,
    ) -> Result<Self> {
        let now = now.map(validate_now).transpose()?;
        Ok(Self {
            keys: BucketKeys::of(key, hash_tag, layout),
            max_tokens: rule.max_tokens(),
            refill_rate: rule.refill_rate(),
            cost,
            now,
            // The compact script takes the key lifetime ready-made rather than computing and
            // formatting it in Lua (see lua/token_bucket_compact.lua).
            ttl: (layout == KeyLayout::Compact).then(|| rule.storage_ttl_seconds()),
        })
    }

    /// The bucket's keys.
    pub(crate) fn keys(&self) -> BucketKeys<'a> {
        self.keys
    }

    /// The bucket's capacity.
    pub(crate) fn max_tokens(&self) -> u64 {
        self.max_tokens
    }

    /// The tokens to take.
    pub(crate) fn cost(&self) -> u64 {
        self.cost
    }

    /// Appends the bucket's keys to `cmd`.
    pub(crate) fn push_keys(&self, cmd: &mut Cmd) {
        cmd.arg(self.keys.first);
        if let Some(second) = self.keys.second {
            cmd.arg(second);
        }
    }

    /// Appends the bucket's numbers to `cmd`, as the multi-bucket and give-back scripts read
    /// them: `max_tokens`, `refill_rate`, `cost` as decimal text for the two-key layout, the
    /// packed [`CompactArgs`] for the compact one. `now` is not among them.
    pub(crate) fn push_numbers(&self, cmd: &mut Cmd) {
        match self.ttl {
            None => {
                cmd.arg(self.max_tokens)
                    .arg(self.refill_rate)
                    .arg(self.cost);
            }
            Some(ttl) => {
                let args = CompactArgs::new(self.max_tokens, self.refill_rate, self.cost, ttl);
                cmd.arg(args.as_bytes());
            }
        }
    }
}

impl BuildCmd for ScriptCall<'_> {
    /// `EVALSHA sha …`, or `EVAL <script> …` without a SHA.
    ///
    /// Numbers go in as redis-rs writes them (`itoa` for integers, `ryu` for `refill_rate` and
    /// `now`: the shortest text that reads back as the same double, so Lua's `tonumber` sees
    /// exactly the rule's value). The buffer is sized once, so building the command is one
    /// allocation per buffer.
    fn cmd(&self, sha: Option<&str>, script: &str) -> Cmd {
        // EVALSHA/EVAL, sha or script, key count, keys, then the arguments: at most four
        // numbers of at most 24 bytes each (the compact script's packed argument is at most 44
        // bytes, plus `now`).
        let head = sha.map_or(script.len(), str::len);
        let mut cmd = Cmd::with_capacity(9, 8 + head + 1 + self.keys.len() + 5 * 24);
        match sha {
            Some(sha) => cmd.arg("EVALSHA").arg(sha),
            None => cmd.arg("EVAL").arg(script),
        };
        cmd.arg(self.keys.count());
        self.push_keys(&mut cmd);
        match self.ttl {
            None => {
                cmd.arg(self.max_tokens)
                    .arg(self.refill_rate)
                    .arg(self.cost);
                // An empty `now` means Redis's `TIME`.
                match self.now {
                    Some(now) => cmd.arg(now),
                    None => cmd.arg(""),
                };
            }
            Some(ttl) => {
                let args = CompactArgs::new(self.max_tokens, self.refill_rate, self.cost, ttl);
                cmd.arg(args.as_bytes());
                // No `now` argument means Redis's `TIME`: one argument fewer for Lua to copy.
                if let Some(now) = self.now {
                    cmd.arg(now);
                }
            }
        }
        cmd
    }
}

/// The compact script's `ARGV[1]`: `max_tokens`, `refill_rate` and `cost` as three
/// little-endian doubles, as `struct.unpack('<ddd', …)` reads them, followed by the key
/// lifetime in seconds as decimal text (see docs/lua.md).
///
/// `as f64` is the conversion the reference step ([`ratelimit_domain::token_bucket::step`]) and
/// Lua's `tonumber` make too; rules keep `max_tokens` at or below 2^53, where it is exact, and
/// a `cost` up to `max_tokens` is exact too. A `cost` above `max_tokens` is decided here, on the
/// integers, and sent as `+inf`, which the script denies for ever as the step does: as a
/// double, a cost above 2^53 could round down to `max_tokens`. Built on the stack: no
/// allocation.
///
/// Not part of the public API: exported only with the hidden `bench-internals` feature, for
/// `crates/bench` (see the [crate docs](crate#features)).
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "bench-internals"), allow(unreachable_pub))]
pub struct CompactArgs {
    bytes: [u8; CompactArgs::CAPACITY],
    len: usize,
}

#[cfg_attr(not(feature = "bench-internals"), allow(unreachable_pub))]
impl CompactArgs {
    /// 24 bytes of numbers and at most 20 digits of lifetime.
    const CAPACITY: usize = 24 + 20;

    /// Packs the numbers of one check.
    #[allow(clippy::cast_precision_loss)]
    pub fn new(max_tokens: u64, refill_rate: f64, cost: u64, ttl_seconds: u64) -> Self {
        let mut bytes = [0_u8; Self::CAPACITY];
        for (chunk, number) in bytes[..24].chunks_exact_mut(8).zip([
            max_tokens as f64,
            refill_rate,
            Self::cost(max_tokens, cost),
        ]) {
            chunk.copy_from_slice(&number.to_le_bytes());
        }
        // The lifetime's digits; 20 bytes hold any u64, so the write cannot fail.
        let mut digits = &mut bytes[24..];
        let _ = write!(digits, "{ttl_seconds}");
        let len = Self::CAPACITY - digits.len();
        Self { bytes, len }
    }

    /// `cost` as the script reads it: exact up to `max_tokens`, `+inf` above.
    #[allow(clippy::cast_precision_loss)] // exact: cost <= max_tokens <= 2^53
    fn cost(max_tokens: u64, cost: u64) -> f64 {
        if cost > max_tokens {
            f64::INFINITY
        } else {
            cost as f64
        }
    }

    /// The argument as sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl std::fmt::Debug for CompactArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let number = |i: usize| {
            let mut chunk = [0_u8; 8];
            chunk.copy_from_slice(&self.bytes[i * 8..i * 8 + 8]);
            f64::from_le_bytes(chunk)
        };
        f.debug_struct("CompactArgs")
            .field("max_tokens", &number(0))
            .field("refill_rate", &number(1))
            .field("cost", &number(2))
            .field("ttl", &String::from_utf8_lossy(&self.bytes[24..self.len]))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use ratelimit_domain::{BucketKey, RateLimitRule};

    use super::*;

    #[test]
    fn commands_carry_the_keys_and_numbers_exactly() {
        let key = BucketKey::new(
            ratelimit_domain::RateLimitScope::Ip,
            "2001:db8::1",
            "GET /x",
        )
        .unwrap();
        let rule = RateLimitRule::new(ratelimit_domain::RateLimitScope::Ip, 10, 0.1).unwrap();
        let args = |call: ScriptCall<'_>| -> Vec<String> {
            call.cmd(Some("abc"), "")
                .args_iter()
                .map(|arg| match arg {
                    redis::Arg::Simple(bytes) => {
                        String::from_utf8(bytes.to_vec()).unwrap_or_else(|_| format!("{bytes:?}"))
                    }
                    other => panic!("unexpected argument {other:?}"),
                })
                .collect()
        };
        let two_keys = ScriptCall {
            keys: BucketKeys::of(&key, false, KeyLayout::TwoKeys),
            max_tokens: rule.max_tokens(),
            refill_rate: rule.refill_rate(),
            cost: 3,
            now: Some(1_700_000_000.125),
            ttl: None,
        };
        assert_eq!(
            args(two_keys),
            [
                "EVALSHA",
                "abc",
                "2",
                "rate_limit:ip:2001:db8::1:GET /x:tokens",
                "rate_limit:ip:2001:db8::1:GET /x:time",
                "10",
                "0.1",
                "3",
                "1700000000.125",
            ]
        );
        let compact = ScriptCall {
            keys: BucketKeys::of(&key, true, KeyLayout::Compact),
            now: None,
            ttl: Some(rule.storage_ttl_seconds()),
            ..two_keys
        };
        let mut packed = Vec::new();
        for number in [10.0_f64, 0.1, 3.0] {
            packed.extend_from_slice(&number.to_le_bytes());
        }
        packed.extend_from_slice(b"6060");
        assert_eq!(CompactArgs::new(10, 0.1, 3, 6060).as_bytes(), packed);
        assert_eq!(
            args(compact),
            [
                "EVALSHA".to_owned(),
                "abc".to_owned(),
                "1".to_owned(),
                "{rate_limit:ip:2001:db8::1:GET /x}:tb".to_owned(),
                format!("{:?}", &packed[..]),
            ]
        );
        // An explicit `now` follows as the second argument.
        let at = args(ScriptCall {
            now: Some(1_700_000_000.125),
            ..compact
        });
        assert_eq!(at.len(), 6);
        assert_eq!(at[5], "1700000000.125");
        for ttl in [0, 7, 60, 6060, u64::MAX] {
            let bytes = CompactArgs::new(1, 1.0, 1, ttl);
            assert_eq!(&bytes.as_bytes()[24..], ttl.to_string().as_bytes());
        }
        // Every rate reads back as the same double in Lua (strtod of the shortest text).
        for rate in [0.1, 1.0 / 3.0, 1e-7, 5.0, 1e20, 123_456.789] {
            let call = ScriptCall {
                refill_rate: rate,
                ..two_keys
            };
            assert_eq!(args(call)[6].parse::<f64>().unwrap(), rate);
        }
    }

    #[test]
    fn costs_above_capacity_are_sent_as_infinity_to_the_compact_script() {
        let number = |args: &CompactArgs, i: usize| {
            let mut chunk = [0_u8; 8];
            chunk.copy_from_slice(&args.as_bytes()[i * 8..i * 8 + 8]);
            f64::from_le_bytes(chunk)
        };
        let max = 1_u64 << 53;
        // 2^53 + 1 as a double is 2^53, which the script would take for an affordable cost.
        for cost in [max + 1, u64::MAX] {
            let args = CompactArgs::new(max, 1e12, cost, 60);
            assert_eq!(number(&args, 2), f64::INFINITY, "cost {cost}");
        }
        let args = CompactArgs::new(max, 1e12, max, 60);
        assert_eq!(number(&args, 2), max as f64);
        let args = CompactArgs::new(5, 5.0, 6, 120);
        assert_eq!(number(&args, 2), f64::INFINITY);
    }
}
