//! Several buckets in one check (the limits of one request): the calls of the multi-bucket and
//! give-back scripts, and the grouping of a request's buckets by Redis Cluster slot.
//!
//! On a single Redis every bucket goes into one multi-bucket call, atomic like any script. On a
//! cluster one script can only touch one slot, so the buckets are grouped by slot and each group
//! gets its own call; when one group refuses, the groups that took give their tokens back
//! (docs/lua.md, "Several limits in one check").

use std::collections::HashSet;
use std::error::Error as _;

use ratelimit_domain::token_bucket::validate_now;
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, ErrorCode, RateLimitError, Result,
};
use redis::Cmd;
use redis::cluster_routing::Slot;

use crate::error::is_wrong_type;
use crate::reply::{parse_give_back_reply, parse_multi_reply};
use crate::script::{BuildCmd, ScriptCall};
use crate::{KeyLayout, RedisStorage};

/// The buckets of one multi-bucket check, validated: distinct keys, one usable `now`.
#[derive(Debug)]
pub(crate) struct MultiCheck<'a> {
    /// One single-bucket call per request, in the requests' order (their `now` unused).
    pub(crate) buckets: Vec<ScriptCall<'a>>,
    /// The keys, in the same order, for errors.
    pub(crate) keys: Vec<&'a BucketKey>,
    /// The first request's `now`, validated; `None` for Redis's `TIME`.
    pub(crate) now: Option<f64>,
}

impl<'a> MultiCheck<'a> {
    /// The check of `requests`, every one at the first request's `now`.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`] when two requests name the same key, or the first request's
    /// `now` is not a usable time.
    pub(crate) fn new(
        requests: &[BucketRequest<'a>],
        layout: KeyLayout,
        hash_tag: bool,
    ) -> Result<Self> {
        let now = requests
            .first()
            .and_then(|request| request.now)
            .map(validate_now)
            .transpose()?;
        let mut seen = HashSet::with_capacity(requests.len());
        for request in requests {
            if !seen.insert(request.key.as_str()) {
                return Err(RateLimitError::new(
                    ErrorCode::InvalidInput,
                    "the buckets of one check must be distinct",
                )
                .with_detail("key", request.key.as_str()));
            }
        }
        let buckets = requests
            .iter()
            .map(|request| {
                ScriptCall::new(
                    request.key,
                    layout,
                    hash_tag,
                    request.rule,
                    request.cost,
                    None,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            buckets,
            keys: requests.iter().map(|request| request.key).collect(),
            now,
        })
    }

    /// The indexes of the buckets, grouped so that each group's keys can go into one script:
    /// all of them in one group on a single Redis; on a cluster (`hash_tag`), one group per
    /// slot, in the order of each slot's first bucket.
    pub(crate) fn groups(&self, hash_tag: bool) -> Vec<Vec<usize>> {
        if !hash_tag {
            return vec![(0..self.buckets.len()).collect()];
        }
        let mut groups: Vec<(Slot, Vec<usize>)> = Vec::new();
        for (index, key) in self.keys.iter().enumerate() {
            // The slot of the hash tag, which every key of the bucket carries.
            let slot = Slot::for_key(format!("{{{}}}", key.as_str()));
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, members)) => members.push(index),
                None => groups.push((slot, vec![index])),
            }
        }
        groups.into_iter().map(|(_, members)| members).collect()
    }
}

/// One call of the multi-bucket script over some buckets (see docs/lua.md).
#[derive(Debug)]
pub(crate) struct MultiCall<'c, 'a> {
    pub(crate) buckets: &'c [ScriptCall<'a>],
    pub(crate) now: Option<f64>,
}

impl BuildCmd for MultiCall<'_, '_> {
    /// `EVALSHA sha <keys> <every key> <now or ""> <each bucket's numbers>`.
    fn cmd(&self, sha: Option<&str>, script: &str) -> Cmd {
        let mut cmd = eval_head(sha, script, self.buckets);
        // An empty `now` means Redis's `TIME`.
        match self.now {
            Some(now) => cmd.arg(now),
            None => cmd.arg(""),
        };
        for bucket in self.buckets {
            bucket.push_numbers(&mut cmd);
        }
        cmd
    }
}

/// One call of the give-back script: each bucket's cost goes back into it.
#[derive(Debug)]
pub(crate) struct GiveBackCall<'c, 'a> {
    pub(crate) buckets: &'c [ScriptCall<'a>],
}

impl BuildCmd for GiveBackCall<'_, '_> {
    /// `EVALSHA sha <keys> <every key> <each bucket's numbers>`.
    fn cmd(&self, sha: Option<&str>, script: &str) -> Cmd {
        let mut cmd = eval_head(sha, script, self.buckets);
        for bucket in self.buckets {
            bucket.push_numbers(&mut cmd);
        }
        cmd
    }
}

/// `EVALSHA sha`/`EVAL script`, the key count and every bucket's keys.
fn eval_head(sha: Option<&str>, script: &str, buckets: &[ScriptCall<'_>]) -> Cmd {
    let mut cmd = Cmd::new();
    match sha {
        Some(sha) => cmd.arg("EVALSHA").arg(sha),
        None => cmd.arg("EVAL").arg(script),
    };
    let keys: usize = buckets.iter().map(|bucket| bucket.keys().count()).sum();
    cmd.arg(keys);
    for bucket in buckets {
        bucket.push_keys(&mut cmd);
    }
    cmd
}

/// Adds the key of the bucket a [`ErrorCode::CorruptBucket`] error is about: the script names
/// it as `WRONGTYPE bucket <i>: …`, counting from 1 among `keys`.
pub(crate) fn name_corrupt_bucket_of(err: RateLimitError, keys: &[&BucketKey]) -> RateLimitError {
    if err.code() != ErrorCode::CorruptBucket {
        return err;
    }
    let index = err
        .source()
        .and_then(|source| source.downcast_ref::<redis::RedisError>())
        .filter(|redis_err| is_wrong_type(redis_err))
        .and_then(|redis_err| redis_err.detail())
        .and_then(bucket_index);
    match index
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| keys.get(i))
    {
        Some(key) => err.with_detail("key", key.as_str()),
        None => err,
    }
}

/// `<i>` of a `bucket <i>: …` error detail (Redis 7), or of a wrapped one (`… WRONGTYPE bucket
/// <i>: …`, Redis 5 and 6).
pub(crate) fn bucket_index(detail: &str) -> Option<usize> {
    let rest = &detail[detail.find("bucket ")? + "bucket ".len()..];
    let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

impl RedisStorage {
    /// One multi-bucket call over the buckets `group` of `check`: their decisions, in the
    /// group's order.
    pub(crate) async fn check_group(
        &self,
        check: &MultiCheck<'_>,
        group: &[usize],
    ) -> Result<Vec<BucketDecision>> {
        let buckets: Vec<ScriptCall<'_>> = group.iter().map(|&i| check.buckets[i]).collect();
        let keys: Vec<_> = group.iter().map(|&i| check.keys[i]).collect();
        let call = MultiCall {
            buckets: &buckets,
            now: check.now,
        };
        let reply = self
            .eval_script(&self.multi_script, "check_and_consume_all", &call)
            .await
            .map_err(|err| name_corrupt_bucket_of(err, &keys))?;
        parse_multi_reply(&reply, buckets.len()).map_err(|err| {
            if err.code() == ErrorCode::CorruptBucket {
                err.with_detail(
                    "keys",
                    keys.iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            } else {
                err
            }
        })
    }

    /// Gives back the tokens that the buckets `group` of `check` took, and answers the whole
    /// tokens each holds afterwards (the tokens it held before taking, unless another check
    /// came between). `taken` are their allowed decisions. When the give-back fails, a warning
    /// is logged, the tokens come back by refill, and the answer is what they held before
    /// taking.
    async fn give_back(
        &self,
        check: &MultiCheck<'_>,
        group: &[usize],
        taken: &[BucketDecision],
    ) -> Vec<u64> {
        let before: Vec<u64> = group
            .iter()
            .zip(taken)
            .map(|(&i, decision)| {
                let bucket = check.buckets[i];
                decision
                    .remaining
                    .saturating_add(bucket.cost())
                    .min(bucket.max_tokens())
            })
            .collect();
        // Only buckets that took something.
        let (members, buckets): (Vec<usize>, Vec<ScriptCall<'_>>) = group
            .iter()
            .enumerate()
            .filter(|&(_, &i)| check.buckets[i].cost() > 0)
            .map(|(at, &i)| (at, check.buckets[i]))
            .unzip();
        if buckets.is_empty() {
            return before;
        }
        let call = GiveBackCall { buckets: &buckets };
        let given = match self
            .eval_script(&self.give_back_script, "give_back", &call)
            .await
        {
            Ok(reply) => parse_give_back_reply(&reply, buckets.len()),
            Err(err) => Err(err),
        };
        match given {
            Ok(after) => {
                let mut remaining = before;
                for (at, tokens) in members.into_iter().zip(after) {
                    remaining[at] = tokens;
                }
                remaining
            }
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    keys = ?group.iter().map(|&i| check.keys[i].as_str()).collect::<Vec<_>>(),
                    "a multi-limit check refused on another cluster slot could not give back the \
                     tokens it took here; they come back by refill"
                );
                before
            }
        }
    }

    /// A multi-bucket check on a Redis Cluster whose buckets span several slots: one call per
    /// slot, all at once; if any refuses (or fails), the groups that took give their tokens
    /// back. See docs/lua.md, "Several limits in one check".
    pub(crate) async fn check_groups(
        &self,
        check: &MultiCheck<'_>,
        groups: &[Vec<usize>],
    ) -> Result<Vec<BucketDecision>> {
        let outcomes = futures_util::future::join_all(
            groups.iter().map(|group| self.check_group(check, group)),
        )
        .await;
        let took = |outcome: &Result<Vec<BucketDecision>>| {
            outcome
                .as_ref()
                .is_ok_and(|decisions| decisions.iter().all(|d| d.allowed))
        };
        let admitted = outcomes.iter().all(took);
        let mut decisions = vec![None; check.buckets.len()];
        let mut first_error = None;
        let mut give_backs = Vec::new();
        for (group, outcome) in groups.iter().zip(outcomes) {
            match outcome {
                Err(err) => {
                    first_error.get_or_insert(err);
                }
                Ok(group_decisions) => {
                    if !admitted && group_decisions.iter().all(|d| d.allowed) {
                        give_backs.push((group, group_decisions));
                    } else {
                        for (&i, decision) in group.iter().zip(group_decisions) {
                            decisions[i] = Some(decision);
                        }
                    }
                }
            }
        }
        let given = futures_util::future::join_all(
            give_backs
                .iter()
                .map(|(group, taken)| self.give_back(check, group, taken)),
        )
        .await;
        if let Some(err) = first_error {
            return Err(err);
        }
        for ((group, taken), remaining) in give_backs.into_iter().zip(given) {
            for ((&i, decision), remaining) in group.iter().zip(taken).zip(remaining) {
                decisions[i] = Some(BucketDecision {
                    remaining,
                    ..decision
                });
            }
        }
        decisions
            .into_iter()
            .map(|decision| {
                decision.ok_or_else(|| {
                    RateLimitError::new(
                        ErrorCode::StorageError,
                        "a bucket of the check went unanswered",
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use ratelimit_domain::{RateLimitRule, RateLimitScope};

    use super::*;

    fn args(cmd: &Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => {
                    String::from_utf8(bytes.to_vec()).unwrap_or_else(|_| format!("{bytes:?}"))
                }
                other => panic!("unexpected argument {other:?}"),
            })
            .collect()
    }

    #[test]
    fn requests_must_name_distinct_buckets_and_a_usable_time() {
        let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
        let a = BucketKey::new(RateLimitScope::Ip, "a", "GET /x").unwrap();
        let b = BucketKey::new(RateLimitScope::Ip, "b", "GET /x").unwrap();
        let twice = [BucketRequest::new(&a, &rule), BucketRequest::new(&a, &rule)];
        let err = MultiCheck::new(&twice, KeyLayout::TwoKeys, false).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidInput);
        let bad_now = [
            BucketRequest::new(&a, &rule).at(f64::NAN),
            BucketRequest::new(&b, &rule),
        ];
        let err = MultiCheck::new(&bad_now, KeyLayout::TwoKeys, false).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidInput);
        // Only the first request's time counts.
        let later_ignored = [
            BucketRequest::new(&a, &rule).at(7.0),
            BucketRequest::new(&b, &rule).at(f64::NAN),
        ];
        let check = MultiCheck::new(&later_ignored, KeyLayout::TwoKeys, false).unwrap();
        assert_eq!(check.now, Some(7.0));
    }

    #[test]
    fn calls_carry_every_bucket_and_one_clock() {
        let rule = RateLimitRule::new(RateLimitScope::Ip, 10, 0.1).unwrap();
        let big = RateLimitRule::new(RateLimitScope::Global, 1 << 53, 1e12).unwrap();
        let a = BucketKey::new(RateLimitScope::Ip, "a", "GET /x").unwrap();
        let g = BucketKey::new(RateLimitScope::Global, "", "GET /x").unwrap();
        let requests = [
            BucketRequest::new(&a, &rule)
                .with_cost(3)
                .at(1_700_000_000.125),
            BucketRequest::new(&g, &big).with_cost(u64::MAX),
        ];
        let check = MultiCheck::new(&requests, KeyLayout::TwoKeys, false).unwrap();
        let call = MultiCall {
            buckets: &check.buckets,
            now: check.now,
        };
        assert_eq!(
            args(&call.cmd(Some("abc"), "")),
            [
                "EVALSHA",
                "abc",
                "4",
                "rate_limit:ip:a:GET /x:tokens",
                "rate_limit:ip:a:GET /x:time",
                "rate_limit:global:GET /x:tokens",
                "rate_limit:global:GET /x:time",
                "1700000000.125",
                "10",
                "0.1",
                "3",
                "9007199254740992",
                "1000000000000.0",
                "18446744073709551615",
            ]
        );
        let give_back = GiveBackCall {
            buckets: &check.buckets[..1],
        };
        assert_eq!(
            args(&give_back.cmd(None, "script")),
            [
                "EVAL",
                "script",
                "2",
                "rate_limit:ip:a:GET /x:tokens",
                "rate_limit:ip:a:GET /x:time",
                "10",
                "0.1",
                "3",
            ]
        );

        let compact = MultiCheck::new(&requests, KeyLayout::Compact, true).unwrap();
        let call = MultiCall {
            buckets: &compact.buckets,
            now: None,
        };
        let sent = args(&call.cmd(Some("abc"), ""));
        assert_eq!(sent.len(), 3 + 2 + 1 + 2);
        assert_eq!(sent[2], "2");
        assert_eq!(sent[3], "{rate_limit:ip:a:GET /x}:tb");
        assert_eq!(sent[4], "{rate_limit:global:GET /x}:tb");
        assert_eq!(sent[5], "");
        // The cost above capacity goes as +inf, as in the single call.
        let packed = crate::script::CompactArgs::new(1 << 53, 1e12, u64::MAX, 1);
        assert_eq!(&packed.as_bytes()[16..24], &f64::INFINITY.to_le_bytes());
    }

    #[test]
    fn cluster_groups_follow_the_slots_of_the_hash_tags() {
        let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
        let keys: Vec<BucketKey> = (0..12)
            .map(|i| BucketKey::new(RateLimitScope::Ip, &format!("client-{i}"), "GET /x").unwrap())
            .collect();
        let requests: Vec<BucketRequest<'_>> = keys
            .iter()
            .map(|key| BucketRequest::new(key, &rule))
            .collect();
        let check = MultiCheck::new(&requests, KeyLayout::TwoKeys, true).unwrap();
        assert_eq!(check.groups(false), [(0..12).collect::<Vec<_>>()]);
        let groups = check.groups(true);
        let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..12).collect::<Vec<_>>());
        assert!(groups.len() > 1, "{groups:?}");
        for group in &groups {
            let slot = |i: usize| Slot::for_key(format!("{{{}}}:tokens", keys[i].as_str()));
            assert!(group.iter().all(|&i| slot(i) == slot(group[0])));
        }
        // Groups keep the order of their first bucket.
        let firsts: Vec<usize> = groups.iter().map(|group| group[0]).collect();
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{firsts:?}");
    }

    #[test]
    fn the_bucket_of_a_wrongtype_error_is_read_from_its_detail() {
        assert_eq!(bucket_index("bucket 2: WRONGTYPE Operation"), Some(2));
        assert_eq!(
            bucket_index(
                "Error running script (call to f_x): @user_script:9: WRONGTYPE bucket 13: x"
            ),
            Some(13)
        );
        assert_eq!(bucket_index("Operation against a key"), None);
        assert_eq!(bucket_index("bucket x"), None);
    }
}
