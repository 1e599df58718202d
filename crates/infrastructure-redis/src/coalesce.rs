//! Coalesced checks: checks that arrive while a script call is in flight wait, and go to Redis
//! together as one call of the layout's batch script.
//!
//! # How
//! - A check finds the store idle (fewer than [`MAX_IN_FLIGHT`] calls on their way): it runs
//!   the layout's single-check script itself, exactly as without coalescing. Nothing is added at
//!   low concurrency: no timer, no extra task, no wait.
//! - Otherwise it queues its check and waits for the answer. When a call in flight finishes,
//!   whoever held its slot takes up to [`MAX_BATCH`] queued checks and hands them to a spawned
//!   task, which sends them as one `EVALSHA` of the batch script and keeps taking what queued
//!   meanwhile until the queue is empty. The batch's size is therefore whatever arrived during
//!   one round trip: natural batching.
//! - The batch script runs each entry as one step of the single-check script, in order (a key
//!   repeated in a batch sees the previous entry's write), and answers one reply per entry.
//!   Entries are independent: each is decided and written on its own, never all or nothing.
//!
//! # What each check keeps
//! - **Its deadline.** A queued check waits at most the check deadline for its answer, however
//!   slow its batch: its batch runs until the deadline of its last check (taking a connection
//!   included; a connection abandoned then is dropped from the pool as usual) and answers an
//!   earlier check at that check's deadline from one timer per batch, and each queued check
//!   also waits under a timer of its own. That timer is what bounds a check whose batch is
//!   never sent: a check that runs alone releases its call slot only when its caller's future
//!   ends or is dropped, so a caller that keeps such a future without polling it holds the slot.
//!   (Without it the client spent about 9% fewer instructions per check; the bound is worth
//!   more.)
//! - **Its own failure.** A key of another type fails only its own entry (the script reads with
//!   `redis.pcall`); a failed batch (connection lost, timeout) fails only the checks in it, each
//!   with the error it would have had alone, which the circuit breaker above the store counts per
//!   check as before.
//! - **Cancellation.** A caller that gives up (its deadline, or its future dropped) takes nothing
//!   with it: the batch runs in its own task, and an entry whose caller is gone before the
//!   batch is sent is left out, so it consumes nothing.
//! - **Lost scripts.** The batch script is sent by its SHA and resent with `EVAL` after a
//!   `NOSCRIPT`, as the single script is.
//!
//! On a Redis Cluster, where one script call may only touch keys of one hash slot, a batch goes
//! as one call per slot of its checks, all at once (each bucket's keys share their slot through
//! the hash tag); the cluster connection follows `MOVED` and `ASK` as for a single check.

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ratelimit_domain::token_bucket::validate_now;
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, ErrorCode, RateLimitError, Result,
};
use redis::cluster_routing::Slot as HashSlot;
use redis::{Cmd, Value};
use tokio::sync::oneshot;

use crate::KeyLayout;
use crate::connection::Connections;
use crate::error::{deadline, name_corrupt_bucket};
use crate::keys::BucketKeys;
use crate::reply::parse_reply;
use crate::script::{BuildCmd, TokenBucketScript};

/// The batch script of the two-key layout ([`KeyLayout::TwoKeys`]): several independent
/// checks in one call (see docs/lua.md, "Coalesced checks").
pub const TOKEN_BUCKET_BATCH_SCRIPT: &str = include_str!("../../../lua/token_bucket_batch.lua");

/// The batch script of the compact layout ([`KeyLayout::Compact`]).
pub const TOKEN_BUCKET_COMPACT_BATCH_SCRIPT: &str =
    include_str!("../../../lua/token_bucket_compact_batch.lua");

/// At most this many checks in one batch. A batch of 128 two-key checks keeps Redis busy for
/// about 3 ms, so no batch holds Redis (and the checks behind it) for long.
pub const MAX_BATCH: usize = 128;

/// Script calls of one store on their way at once. Two keep Redis busy while the client reads
/// one batch's replies and builds the next (measured: docs/performance.md, "Coalesced checks").
pub const MAX_IN_FLIGHT: usize = 2;

/// How late a tokio timer may fire: entries of a batch whose deadlines are this close to the
/// call's own get their timeout from the call's.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// The operation name in errors, as the single-check path names it.
const OPERATION: &str = "check_and_consume";

/// How many checks went to Redis in batches, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CoalescingStats {
    /// Batch script calls sent.
    pub batches: u64,
    /// Checks sent in those batches.
    pub batched_checks: u64,
    /// Checks left out of a batch because their caller had gone (deadline or cancellation).
    pub abandoned: u64,
}

/// The coalescer of one store. See the [module docs](self).
pub(crate) struct Coalescer {
    shared: Arc<Shared>,
}

/// What the store and the batch tasks share.
struct Shared {
    connections: Connections,
    /// The layout's batch script.
    script: TokenBucketScript,
    layout: KeyLayout,
    hash_tag: bool,
    timeout: Duration,
    /// A std mutex: never held across an `.await`, only to push or take queued checks.
    state: Mutex<State>,
    batches: AtomicU64,
    batched_checks: AtomicU64,
    abandoned: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Calls on their way (single checks and batches), at most [`MAX_IN_FLIGHT`].
    in_flight: usize,
    queue: VecDeque<Entry>,
}

/// One queued check: its bucket, its numbers packed for the batch script, and where its
/// answer goes.
struct Entry {
    key: BucketKey,
    args: BatchArgs,
    reply: ReplyTo<Result<BucketDecision>>,
    /// When its caller's check deadline passes: its batch answers it by then.
    deadline: Instant,
}

/// Where a queued check's answer goes: answered once, by whichever comes first of its batch's
/// reply and its deadline (while the batch call, which borrows the batch, is on its way).
struct ReplyTo<T>(Mutex<Option<oneshot::Sender<T>>>);

impl<T> ReplyTo<T> {
    /// Where `sender`'s receiver waits.
    fn new(sender: oneshot::Sender<T>) -> Self {
        Self(Mutex::new(Some(sender)))
    }

    /// Answers the check, unless it has had its answer already or its caller has gone;
    /// whether the answer went.
    fn send(&self, answer: T) -> bool {
        let sender = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        sender.is_some_and(|sender| sender.send(answer).is_ok())
    }

    /// Whether nobody waits for the answer any more: the caller gone, or already answered.
    fn is_closed(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_none_or(oneshot::Sender::is_closed)
    }
}

/// How a check goes to Redis ([`Coalescer::enter`]).
pub(crate) enum Turn<'a> {
    /// Alone, by the single-check script, holding a call slot until this is dropped.
    Alone(Slot<'a>),
    /// In a batch: the answer comes here.
    Queued(Answer),
}

/// The answer of a queued check ([`Turn::Queued`]), and the check's deadline.
pub(crate) struct Answer {
    receiver: oneshot::Receiver<Result<BucketDecision>>,
    deadline: Instant,
    timeout: Duration,
}

impl Answer {
    /// Waits for the check's batch, at most until the check's deadline. The batch answers
    /// every entry by its deadline too (see [`Shared::send`]); this timer is what keeps the
    /// bound when no batch is sent at all: the call slots are held by checks running alone
    /// whose callers keep their futures without polling them.
    ///
    /// # Errors
    /// The check's error, as a single check would have it; `StorageTimeout` at the deadline;
    /// `StorageError` if its batch was dropped unanswered (the runtime shutting down).
    pub(crate) async fn wait(self) -> Result<BucketDecision> {
        match tokio::time::timeout_at(self.deadline.into(), self.receiver).await {
            Ok(Ok(decision)) => decision,
            Ok(Err(_)) => Err(RateLimitError::new(
                ErrorCode::StorageError,
                "the batch of this check was dropped unanswered",
            )
            .with_detail("operation", OPERATION)),
            Err(_) => Err(deadline(OPERATION, self.timeout)),
        }
    }
}

impl Coalescer {
    /// A coalescer for a store's connections and layout.
    pub(crate) fn new(
        connections: Connections,
        layout: KeyLayout,
        hash_tag: bool,
        timeout: Duration,
    ) -> Self {
        let text = match layout {
            KeyLayout::Compact => TOKEN_BUCKET_COMPACT_BATCH_SCRIPT,
            KeyLayout::TwoKeys => TOKEN_BUCKET_BATCH_SCRIPT,
        };
        Self {
            shared: Arc::new(Shared {
                connections,
                script: TokenBucketScript::new(text, "batch"),
                layout,
                hash_tag,
                timeout,
                state: Mutex::new(State::default()),
                batches: AtomicU64::new(0),
                batched_checks: AtomicU64::new(0),
                abandoned: AtomicU64::new(0),
            }),
        }
    }

    /// How many times Redis had lost the batch script.
    pub(crate) fn reloads(&self) -> u64 {
        self.shared.script.reloads()
    }

    /// Batches and checks sent so far.
    pub(crate) fn stats(&self) -> CoalescingStats {
        CoalescingStats {
            batches: self.shared.batches.load(Ordering::Relaxed),
            batched_checks: self.shared.batched_checks.load(Ordering::Relaxed),
            abandoned: self.shared.abandoned.load(Ordering::Relaxed),
        }
    }

    /// How `request` goes to Redis: alone (the caller runs the single-check script, holding
    /// the returned slot until its call ends) when fewer than [`MAX_IN_FLIGHT`] calls are on
    /// their way, else queued for the next batch.
    ///
    /// Split from the wait so that the caller's future holds either the single call or the
    /// small queued wait, never both (the future of a check is boxed and moved per check).
    ///
    /// # Errors
    /// `InvalidInput` for a bad `now` (before anything is queued).
    pub(crate) fn enter(&self, request: &BucketRequest<'_>) -> Result<Turn<'_>> {
        let mut state = self.shared.lock();
        if state.in_flight < MAX_IN_FLIGHT {
            state.in_flight += 1;
            drop(state);
            // Released when the call ends or the caller gives up; either way whatever
            // queued meanwhile is sent.
            return Ok(Turn::Alone(Slot(&self.shared)));
        }
        drop(state);
        // Built outside the lock; the queue is taken only to push.
        let args = BatchArgs::of(request)?;
        let (reply, answer) = oneshot::channel();
        let deadline = Instant::now() + self.shared.timeout;
        let entry = Entry {
            key: request.key.clone(),
            args,
            reply: ReplyTo::new(reply),
            deadline,
        };
        let mut state = self.shared.lock();
        if state.in_flight < MAX_IN_FLIGHT {
            // Every call ended meanwhile (and found the queue empty): go alone after all, or
            // the entry would wait for a call that is not coming.
            state.in_flight += 1;
            drop(state);
            return Ok(Turn::Alone(Slot(&self.shared)));
        }
        state.queue.push_back(entry);
        Ok(Turn::Queued(Answer {
            receiver: answer,
            deadline,
            timeout: self.shared.timeout,
        }))
    }
}

/// A call slot held by a check running alone; frees it, or hands it to a batch of what queued.
pub(crate) struct Slot<'a>(&'a Arc<Shared>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        Shared::release(self.0);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock only guards pushes and takes, which cannot leave the state half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A call has ended: the next batch gets its slot, or the slot is freed.
    fn release(this: &Arc<Self>) {
        let Some(batch) = this.next_batch() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(Self::drive(Arc::clone(this), batch));
            }
            Err(_) => {
                // No runtime to send it from (the process is shutting down): the queued
                // checks get an error, and the slot is freed.
                drop(batch);
                this.lock().in_flight -= 1;
            }
        }
    }

    /// Up to [`MAX_BATCH`] queued checks, keeping the slot; `None` (and the slot freed) when
    /// nothing is queued.
    fn next_batch(&self) -> Option<Vec<Entry>> {
        let mut state = self.lock();
        if state.queue.is_empty() {
            state.in_flight -= 1;
            return None;
        }
        let n = state.queue.len().min(MAX_BATCH);
        Some(state.queue.drain(..n).collect())
    }

    /// Sends batches until nothing is queued, then frees the slot.
    async fn drive(this: Arc<Self>, mut batch: Vec<Entry>) {
        loop {
            this.send_per_slot(batch).await;
            match this.next_batch() {
                Some(next) => batch = next,
                None => return,
            }
        }
    }

    /// A batch as one call, or on a Redis Cluster (where one script call may only touch keys of
    /// one hash slot) as one call per slot, all on their way at once. Entries keep their order
    /// within a slot, so a bucket repeated in the batch is still stepped in order.
    async fn send_per_slot(&self, batch: Vec<Entry>) {
        if !self.hash_tag {
            return self.send(batch).await;
        }
        let mut groups: Vec<(HashSlot, Vec<Entry>)> = Vec::new();
        for entry in batch {
            // The slot of the hash tag, which every key of the bucket carries.
            let slot = HashSlot::for_key(format!("{{{}}}", entry.key.as_str()));
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, group)) => group.push(entry),
                None => groups.push((slot, vec![entry])),
            }
        }
        if groups.len() == 1 {
            if let Some((_, group)) = groups.pop() {
                self.send(group).await;
            }
            return;
        }
        futures_util::future::join_all(groups.into_iter().map(|(_, group)| self.send(group))).await;
    }

    /// One batch script call, and every entry's answer, each by its entry's deadline.
    ///
    /// Entries are queued in order, so their deadlines only grow along the batch. The call
    /// runs until the last one's deadline (the connection is dropped from the pool if it is
    /// abandoned then); an earlier entry whose deadline passes first gets its timeout at its
    /// deadline from a timer of the batch, so a check waits no longer than alone, with one
    /// timer per batch instead of one per check.
    async fn send(&self, batch: Vec<Entry>) {
        // A caller that has gone would never learn what its check took.
        let before = batch.len();
        let batch: Vec<Entry> = batch
            .into_iter()
            .filter(|entry| !entry.reply.is_closed())
            .collect();
        self.abandoned
            .fetch_add((before - batch.len()) as u64, Ordering::Relaxed);
        if batch.is_empty() {
            return;
        }
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batched_checks
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let call = BatchCall {
            shared: self,
            batch: &batch,
        };
        let last = batch
            .last()
            .map_or_else(Instant::now, |entry| entry.deadline);
        // The call (and its borrow of the batch) ends before the answers go.
        let reply = {
            let reply = self
                .connections
                .run_until(OPERATION, last, self.timeout, |conn| {
                    self.script.eval(conn, &call)
                });
            let mut reply = std::pin::pin!(reply);
            // Entries before `due` have had their timeout.
            let mut due = 0;
            loop {
                let next = batch[due..].first().map_or(last, |entry| entry.deadline);
                // Within the timer's resolution of the call's own deadline: that one answers.
                if next + TIMER_RESOLUTION >= last {
                    break reply.await;
                }
                tokio::select! {
                    biased;
                    reply = &mut reply => break reply,
                    () = tokio::time::sleep_until(next.into()) => {
                        let now = Instant::now();
                        while let Some(entry) = batch.get(due).filter(|entry| entry.deadline <= now) {
                            // Left in the batch (the call is on its way); its caller hears now.
                            let _ = entry.reply.send(Err(deadline(OPERATION, self.timeout)));
                            due += 1;
                        }
                    }
                }
            }
        };
        match reply {
            Ok(Value::Array(replies)) if replies.len() == batch.len() => {
                for (entry, reply) in batch.into_iter().zip(&replies) {
                    let decision = entry_decision(reply, &entry.key);
                    let _ = entry.reply.send(decision);
                }
            }
            Ok(other) => {
                let detail = format!("{} replies for {} checks", reply_len(&other), batch.len());
                for entry in batch {
                    let _ = entry.reply.send(Err(RateLimitError::new(
                        ErrorCode::StorageError,
                        "unusable reply from the batch script",
                    )
                    .with_detail("operation", OPERATION)
                    .with_detail("reply", detail.clone())));
                }
            }
            Err(err) => {
                for entry in batch {
                    let _ = entry.reply.send(Err(copy_error(&err)));
                }
            }
        }
    }

    /// `EVALSHA sha <n> <keys…> <packed numbers>`, or `EVAL` with the text.
    fn cmd(&self, batch: &[Entry], sha: Option<&str>, text: &str) -> Cmd {
        let keys_per_entry = if self.layout == KeyLayout::Compact {
            1
        } else {
            2
        };
        let mut cmd = Cmd::with_capacity(
            4 + keys_per_entry * batch.len(),
            16 + sha.map_or(text.len(), str::len)
                + batch
                    .iter()
                    .map(|entry| keys_per_entry * (entry.key.as_str().len() + 10) + entry.args.len)
                    .sum::<usize>(),
        );
        match sha {
            Some(sha) => cmd.arg("EVALSHA").arg(sha),
            None => cmd.arg("EVAL").arg(text),
        };
        cmd.arg(keys_per_entry * batch.len());
        for entry in batch {
            let keys = BucketKeys::of(&entry.key, self.hash_tag, self.layout);
            cmd.arg(keys.first);
            if let Some(second) = keys.second {
                cmd.arg(second);
            }
        }
        let mut packed = Vec::with_capacity(batch.iter().map(|e| e.args.len).sum());
        for entry in batch {
            packed.extend_from_slice(entry.args.as_bytes());
        }
        cmd.arg(packed);
        cmd
    }
}

/// One call of the batch script.
struct BatchCall<'a> {
    shared: &'a Shared,
    batch: &'a [Entry],
}

impl BuildCmd for BatchCall<'_> {
    fn cmd(&self, sha: Option<&str>, script: &str) -> Cmd {
        self.shared.cmd(self.batch, sha, script)
    }
}

/// The number of elements of a reply that is not the expected array.
fn reply_len(reply: &Value) -> usize {
    match reply {
        Value::Array(items) => items.len(),
        _ => 1,
    }
}

/// One entry's reply: a decision, or `{-1, error}` for a key that could not be read.
fn entry_decision(reply: &Value, key: &BucketKey) -> Result<BucketDecision> {
    if let Value::Array(items) = reply
        && let [Value::Int(-1), message, ..] = items.as_slice()
    {
        let message = match message {
            Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            Value::SimpleString(text) => text.clone(),
            other => format!("{other:?}"),
        };
        // As the single script's `redis.call` error reads: a key of another type is that
        // bucket's problem, not the store's.
        let code = if message.contains("WRONGTYPE") {
            ErrorCode::CorruptBucket
        } else {
            ErrorCode::StorageError
        };
        return Err(
            RateLimitError::new(code, format!("redis {OPERATION} failed: {message}"))
                .with_detail("operation", OPERATION)
                .with_detail("key", key.as_str()),
        );
    }
    parse_reply(reply).map_err(|err| name_corrupt_bucket(err, key))
}

/// The same error for another check of the failed batch.
fn copy_error(err: &RateLimitError) -> RateLimitError {
    err.details().iter().fold(
        RateLimitError::new(err.code(), err.message()),
        |copy, (name, value)| copy.with_detail(name, value.clone()),
    )
}

/// One entry of a batch, as the batch scripts read it: `struct.pack('<ddddBc0', max_tokens,
/// refill_rate, cost, now, #ttl, ttl)`. `cost` is `+inf` above capacity (decided here, on the
/// integers, as for the compact script), `now` is `-1` for Redis's `TIME`, and `ttl` is the key
/// lifetime in decimal digits. Built on the stack.
#[derive(Clone, Copy)]
pub(crate) struct BatchArgs {
    bytes: [u8; BatchArgs::CAPACITY],
    len: usize,
}

impl BatchArgs {
    /// Four doubles, the length byte and at most 20 digits.
    const CAPACITY: usize = 32 + 1 + 20;

    /// The entry of `request`.
    ///
    /// # Errors
    /// `InvalidInput` for a `now` that is not a usable time.
    #[allow(clippy::cast_precision_loss)] // exact: cost <= max_tokens <= 2^53
    pub(crate) fn of(request: &BucketRequest<'_>) -> Result<Self> {
        let rule = request.rule;
        let now = request.now.map(validate_now).transpose()?.unwrap_or(-1.0);
        let (max_tokens, cost) = (rule.max_tokens(), request.cost);
        let cost = if cost > max_tokens {
            f64::INFINITY
        } else {
            cost as f64
        };
        let mut bytes = [0_u8; Self::CAPACITY];
        for (chunk, number) in
            bytes[..32]
                .chunks_exact_mut(8)
                .zip([max_tokens as f64, rule.refill_rate(), cost, now])
        {
            chunk.copy_from_slice(&number.to_le_bytes());
        }
        let mut digits = &mut bytes[33..];
        // 20 bytes hold any u64, so the write cannot fail.
        let _ = write!(digits, "{}", rule.storage_ttl_seconds());
        let ttl_len = Self::CAPACITY - 33 - digits.len();
        bytes[32] = u8::try_from(ttl_len).unwrap_or(u8::MAX);
        Ok(Self {
            bytes,
            len: 33 + ttl_len,
        })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use ratelimit_domain::{RateLimitRule, RateLimitScope};

    use super::*;

    #[test]
    fn entries_pack_the_numbers_and_the_lifetime() {
        let key = BucketKey::new(RateLimitScope::Ip, "203.0.113.9", "GET /x").unwrap();
        let rule = RateLimitRule::new(RateLimitScope::Ip, 10, 0.1).unwrap();
        let number = |args: &BatchArgs, i: usize| {
            let mut chunk = [0_u8; 8];
            chunk.copy_from_slice(&args.as_bytes()[i * 8..i * 8 + 8]);
            f64::from_le_bytes(chunk)
        };
        let args = BatchArgs::of(&BucketRequest::new(&key, &rule).with_cost(3)).unwrap();
        assert_eq!(
            [0, 1, 2, 3].map(|i| number(&args, i)),
            [10.0, 0.1, 3.0, -1.0]
        );
        assert_eq!(args.as_bytes()[32], 4);
        assert_eq!(&args.as_bytes()[33..], b"6060");
        let at = BatchArgs::of(&BucketRequest::new(&key, &rule).with_cost(11).at(1.5)).unwrap();
        assert_eq!(number(&at, 2), f64::INFINITY);
        assert_eq!(number(&at, 3), 1.5);
        let bad = BatchArgs::of(&BucketRequest::new(&key, &rule).at(f64::NAN));
        assert_eq!(bad.err().map(|e| e.code()), Some(ErrorCode::InvalidInput));
    }

    #[test]
    fn an_unreadable_key_fails_its_own_entry() {
        let key = BucketKey::new(RateLimitScope::Ip, "203.0.113.9", "GET /x").unwrap();
        let wrong = Value::Array(vec![
            Value::Int(-1),
            Value::BulkString(b"WRONGTYPE Operation against a key".to_vec()),
        ]);
        let err = entry_decision(&wrong, &key).unwrap_err();
        assert_eq!(err.code(), ErrorCode::CorruptBucket);
        assert_eq!(
            err.details().get("key").map(String::as_str),
            Some(key.as_str())
        );
        assert!(entry_decision(&Value::Int(3), &key).unwrap().allowed);
        let bad = entry_decision(&Value::Nil, &key).unwrap_err();
        assert_eq!(bad.code(), ErrorCode::CorruptBucket);
    }
}
