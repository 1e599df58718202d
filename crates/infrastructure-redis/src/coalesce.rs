//! Coalesced checks: checks that arrive while a script call is in flight wait, and go to Redis
//! together as one call of the layout's batch script.
//!
//! # How
//! - A check finds the store idle (fewer than [`MAX_IN_FLIGHT`] calls on their way, none of
//!   them a batch): it runs the layout's single-check script itself, exactly as without
//!   coalescing. Nothing is added at low concurrency: no timer, no extra task, no wait.
//! - Otherwise it queues its check and waits for the answer. When a call in flight finishes,
//!   whoever held its slot takes up to [`MAX_BATCH`] queued checks and hands them to a spawned
//!   task, which sends them as one `EVALSHA` of the batch script and keeps taking what queued
//!   meanwhile until the queue is empty. The batch's size is therefore whatever arrived during
//!   one round trip: natural batching. Before taking the next batch the task yields once, so
//!   that the callers it has just answered, who check again at once, join it rather than the
//!   one after; and while a batch is on its way, a second one takes the other call slot only
//!   once as many checks wait as that batch holds, and at least `MIN_SECOND_BATCH` (fewer wait
//!   for the first to return), so that the two batches keep about the same size. Without
//!   both, batches alternated between dozens of checks and one or two, each costing Redis a
//!   call.
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

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ratelimit_domain::token_bucket::{self, validate_now};
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, ErrorCode, RateLimitError, RateLimitRule, Result,
};
use redis::cluster_routing::Slot as HashSlot;
use redis::{Cmd, Value};
use tokio::sync::oneshot;

use crate::KeyLayout;
use crate::connection::Connections;
use crate::error::{bad_reply, deadline, name_corrupt_bucket};
use crate::keys::BucketKeys;
use crate::multi::bucket_index;
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

/// The fewest queued checks that make a second batch worth its call while another batch is
/// on its way; fewer wait for that batch to return. Every call has a fixed cost on Redis of
/// about one to two checks alone (docs/performance.md, "Dispatch policy"). A second batch also
/// waits until it would hold as many checks as the batch on its way: two batches of equal size
/// share each call's fixed cost best.
const MIN_SECOND_BATCH: usize = 16;

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
    /// Of the checks sent in batches, those of several limits (group entries).
    pub batched_groups: u64,
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
    batched_groups: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Calls on their way (single checks and batches), at most [`MAX_IN_FLIGHT`].
    in_flight: usize,
    /// Of those, batch tasks ([`Shared::drive`]).
    batches: usize,
    /// Checks in the batches on their way.
    sending: usize,
    queue: VecDeque<Entry>,
}

impl State {
    /// Whether a check may run alone now, taking a call slot if so: only while no batch is on
    /// its way. Once one is, checks queue for it, so that a check arriving just after a batch
    /// returned does not take the free slot alone (a full call on Redis and the client for one
    /// check).
    fn take_alone(&mut self) -> bool {
        if self.in_flight < MAX_IN_FLIGHT && self.batches == 0 {
            self.in_flight += 1;
            true
        } else {
            false
        }
    }

    /// After a push: a second batch for a free call slot once [`second_batch`](Self::second_batch)
    /// checks wait, taking the slot.
    fn start_batch(&mut self) -> Option<Vec<Entry>> {
        if self.in_flight < MAX_IN_FLIGHT && self.queue.len() >= self.second_batch() {
            self.in_flight += 1;
            self.batches += 1;
            Some(self.take())
        } else {
            None
        }
    }

    /// Queued checks that make a second batch while another is on its way: as many as that
    /// one holds, at least [`MIN_SECOND_BATCH`].
    fn second_batch(&self) -> usize {
        self.sending.max(MIN_SECOND_BATCH)
    }

    /// Up to [`MAX_BATCH`] queued checks, counted as on their way.
    fn take(&mut self) -> Vec<Entry> {
        let n = self.queue.len().min(MAX_BATCH);
        self.sending += n;
        self.queue.drain(..n).collect()
    }
}

/// One queued check: its bucket, its numbers for the batch script, and where its answer goes.
/// A group (the limits of one request, all or nothing) has its first bucket here and the others
/// in its [`Reply::Group`].
struct Entry {
    key: BucketKey,
    args: BatchArgs,
    reply: Reply,
    /// When its caller's check deadline passes: its batch answers it by then.
    deadline: Instant,
}

/// Where a queued entry's answer goes.
enum Reply {
    /// A single check.
    One(ReplyTo<Result<BucketDecision>>),
    /// A group of buckets decided all or nothing, as `token_bucket::step_all`.
    Group(Box<Group>),
}

/// The buckets of a group after its first, and where its decisions go.
struct Group {
    rest: Vec<(BucketKey, BatchArgs)>,
    reply: ReplyTo<Result<Vec<BucketDecision>>>,
}

impl Reply {
    /// Whether the caller has gone.
    fn is_closed(&self) -> bool {
        match self {
            Self::One(reply) => reply.is_closed(),
            Self::Group(group) => group.reply.is_closed(),
        }
    }

    /// Answers `error`, unless the entry has had its answer; whether the answer went.
    fn fail(&self, error: RateLimitError) -> bool {
        match self {
            Self::One(reply) => reply.send(Err(error)),
            Self::Group(group) => group.reply.send(Err(error)),
        }
    }
}

impl Entry {
    /// The buckets of the entry, in order: one, or every bucket of a group.
    fn buckets(&self) -> impl Iterator<Item = (&BucketKey, &BatchArgs)> + Clone {
        let rest: &[(BucketKey, BatchArgs)] = match &self.reply {
            Reply::One(_) => &[],
            Reply::Group(group) => &group.rest,
        };
        std::iter::once((&self.key, &self.args)).chain(rest.iter().map(|(key, args)| (key, args)))
    }

    /// Answers the entry from its element of the batch reply.
    fn answer(self, reply: &Value) {
        match self.reply {
            Reply::One(sender) => {
                sender.send(entry_decision(reply, &self.key));
            }
            Reply::Group(group) => {
                let keys: Vec<&BucketKey> = std::iter::once(&self.key)
                    .chain(group.rest.iter().map(|(key, _)| key))
                    .collect();
                group.reply.send(group_decisions(reply, &keys));
            }
        }
    }
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
                batched_groups: AtomicU64::new(0),
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
            batched_groups: self.shared.batched_groups.load(Ordering::Relaxed),
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
        if state.take_alone() {
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
            reply: Reply::One(ReplyTo::new(reply)),
            deadline,
        };
        let mut state = self.shared.lock();
        if state.take_alone() {
            // Every call ended meanwhile (and found the queue empty): go alone after all, or
            // the entry would wait for a call that is not coming.
            drop(state);
            return Ok(Turn::Alone(Slot(&self.shared)));
        }
        state.queue.push_back(entry);
        let start = state.start_batch();
        drop(state);
        if let Some(batch) = start {
            Shared::start(&self.shared, batch);
        }
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
        let Some(batch) = this.next_batch(false) else {
            return;
        };
        Self::start(this, batch);
    }

    /// Sends `batch` from a task of its own, which holds a slot counted in `batches`.
    fn start(this: &Arc<Self>, batch: Vec<Entry>) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(Self::drive(Arc::clone(this), batch));
            }
            Err(_) => {
                // No runtime to send it from (the process is shutting down): the queued
                // checks get an error, and the slot is freed.
                let sent = batch.len();
                drop(batch);
                let mut state = this.lock();
                state.in_flight -= 1;
                state.batches -= 1;
                state.sending -= sent;
            }
        }
    }

    /// Up to [`MAX_BATCH`] queued checks, keeping the slot; `None` (and the slot freed) when
    /// nothing is queued.
    fn next_batch(&self, from_batch: bool) -> Option<Vec<Entry>> {
        let mut state = self.lock();
        // With another batch on its way, a few queued checks go with that one.
        if state.queue.is_empty()
            || (from_batch && state.batches >= 2 && state.queue.len() < state.second_batch())
        {
            state.in_flight -= 1;
            if from_batch {
                state.batches -= 1;
            }
            return None;
        }
        if !from_batch {
            state.batches += 1;
        }
        Some(state.take())
    }

    /// Sends batches until nothing is queued, then frees the slot.
    async fn drive(this: Arc<Self>, mut batch: Vec<Entry>) {
        loop {
            let sent = batch.len();
            this.send_per_slot(batch).await;
            this.lock().sending -= sent;
            // The callers just answered are about to check again: let them queue first, or
            // the next batch is the one or two checks that came meanwhile, and the rest wait
            // for another round trip (measured: docs/performance.md, "Coalesced checks").
            tokio::task::yield_now().await;
            match this.next_batch(true) {
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
        let groups = batch
            .iter()
            .filter(|entry| matches!(entry.reply, Reply::Group(_)))
            .count();
        self.batched_groups
            .fetch_add(groups as u64, Ordering::Relaxed);
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
                            let _ = entry.reply.fail(deadline(OPERATION, self.timeout));
                            due += 1;
                        }
                    }
                }
            }
        };
        match reply {
            Ok(Value::Array(replies)) if replies.len() == batch.len() => {
                for (entry, reply) in batch.into_iter().zip(&replies) {
                    entry.answer(reply);
                }
            }
            Ok(other) => {
                let detail = format!("{} replies for {} checks", reply_len(&other), batch.len());
                for entry in batch {
                    entry.reply.fail(
                        RateLimitError::new(
                            ErrorCode::StorageError,
                            "unusable reply from the batch script",
                        )
                        .with_detail("operation", OPERATION)
                        .with_detail("reply", detail.clone()),
                    );
                }
            }
            Err(err) => {
                for entry in batch {
                    entry.reply.fail(copy_error(&err));
                }
            }
        }
    }

    /// `EVALSHA sha <n> <keys…> <packed numbers>`, or `EVAL` with the text.
    fn cmd(&self, batch: &[Entry], sha: Option<&str>, text: &str) -> Cmd {
        let keys_per_bucket = if self.layout == KeyLayout::Compact {
            1
        } else {
            2
        };
        let buckets: usize = batch.iter().map(|entry| entry.buckets().count()).sum();
        let mut cmd = Cmd::with_capacity(
            4 + keys_per_bucket * buckets,
            16 + sha.map_or(text.len(), str::len)
                + batch
                    .iter()
                    .flat_map(Entry::buckets)
                    .map(|(key, _)| keys_per_bucket * (key.as_str().len() + 10) + 11)
                    .sum::<usize>(),
        );
        match sha {
            Some(sha) => cmd.arg("EVALSHA").arg(sha),
            None => cmd.arg("EVAL").arg(text),
        };
        cmd.arg(keys_per_bucket * buckets);
        for (key, _) in batch.iter().flat_map(Entry::buckets) {
            let keys = BucketKeys::of(key, self.hash_tag, self.layout);
            cmd.arg(keys.first);
            if let Some(second) = keys.second {
                cmd.arg(second);
            }
        }
        cmd.arg(pack_batch(batch));
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

/// Groups with more buckets than this run alone.
const MAX_GROUP: usize = MAX_BATCH;

/// The operation name in the errors of a group.
const GROUP_OPERATION: &str = "check_and_consume_all";

impl Coalescer {
    /// Decides the buckets of `requests` all or nothing (`token_bucket::step_all`, at `now`, the
    /// check's validated clock): by `alone` (the multi-bucket script) when fewer than
    /// [`MAX_IN_FLIGHT`] calls and no batch are on their way, else as one group entry of a batch,
    /// queued, answered and bounded by the check deadline as a single check is
    /// ([`check`](Self::check)).
    ///
    /// # Errors
    /// As `alone`: the store's errors, `CorruptBucket` naming the key of another type,
    /// `StorageTimeout` past the check deadline.
    pub(crate) async fn check_all<F>(
        &self,
        requests: &[BucketRequest<'_>],
        now: Option<f64>,
        alone: F,
    ) -> Result<Vec<BucketDecision>>
    where
        F: Future<Output = Result<Vec<BucketDecision>>>,
    {
        let Some((first, rest)) = requests.split_first() else {
            return alone.await;
        };
        if requests.len() > MAX_GROUP {
            return alone.await;
        }
        let waiting = {
            let mut state = self.shared.lock();
            if state.take_alone() {
                None
            } else {
                let (reply, answer) = oneshot::channel();
                let rest = rest
                    .iter()
                    .map(|request| {
                        (
                            request.key.clone(),
                            BatchArgs::new(request.rule, request.cost, now),
                        )
                    })
                    .collect();
                state.queue.push_back(Entry {
                    key: first.key.clone(),
                    args: BatchArgs::new(first.rule, first.cost, now),
                    reply: Reply::Group(Box::new(Group {
                        rest,
                        reply: ReplyTo::new(reply),
                    })),
                    deadline: Instant::now() + self.shared.timeout,
                });
                let start = state.start_batch();
                drop(state);
                if let Some(batch) = start {
                    Shared::start(&self.shared, batch);
                }
                Some(answer)
            }
        };
        let Some(answer) = waiting else {
            let _slot = Slot(&self.shared);
            return alone.await;
        };
        match tokio::time::timeout(self.shared.timeout, answer).await {
            Ok(Ok(decisions)) => decisions,
            Ok(Err(_)) => Err(RateLimitError::new(
                ErrorCode::StorageError,
                "the batch of this check was dropped unanswered",
            )
            .with_detail("operation", GROUP_OPERATION)),
            Err(_) => Err(deadline(GROUP_OPERATION, self.shared.timeout)),
        }
    }
}

/// A group's element of the batch reply: one decision per bucket, each as [`entry_decision`]
/// reads a single one, or `{-1, "WRONGTYPE bucket <i>: …"}` for a bucket of another type, which
/// fails the whole group (nothing of it was written).
fn group_decisions(reply: &Value, keys: &[&BucketKey]) -> Result<Vec<BucketDecision>> {
    let items = match reply {
        Value::Array(items) => items,
        _ => return Err(bad_reply(format!("{reply:?}"))),
    };
    if let [Value::Int(-1), Value::BulkString(message)] = items.as_slice() {
        let message = String::from_utf8_lossy(message);
        let code = if message.contains("WRONGTYPE") {
            ErrorCode::CorruptBucket
        } else {
            ErrorCode::StorageError
        };
        let err = RateLimitError::new(code, format!("redis {GROUP_OPERATION} failed: {message}"))
            .with_detail("operation", GROUP_OPERATION);
        let key = bucket_index(&message)
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| keys.get(i));
        return Err(match key {
            Some(key) => err.with_detail("key", key.as_str()),
            None => err,
        });
    }
    if items.len() != keys.len() {
        return Err(bad_reply(format!("{reply:?}")));
    }
    items
        .iter()
        .map(batch_decision)
        .collect::<Result<Vec<_>>>()
        .map_err(|err| {
            err.with_detail(
                "keys",
                keys.iter()
                    .map(|key| key.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        })
}

/// The number of elements of a reply that is not the expected array.
fn reply_len(reply: &Value) -> usize {
    match reply {
        Value::Array(items) => items.len(),
        _ => 1,
    }
}

/// One entry's reply: the bare remaining count when allowed, `{0, retry_after, remaining}`
/// when denied (`retry_after` the little-endian double itself), or `{-1, error}` for a key that
/// could not be read.
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
    batch_decision(reply).map_err(|err| name_corrupt_bucket(err, key))
}

/// A decision as the batch scripts answer it (see [`entry_decision`]).
fn batch_decision(reply: &Value) -> Result<BucketDecision> {
    let bad = || bad_reply(format!("{reply:?}"));
    match reply {
        Value::Int(remaining) => Ok(BucketDecision {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining: u64::try_from(*remaining).map_err(|_| bad())?,
        }),
        Value::Array(items) => match items.as_slice() {
            [
                Value::Int(0),
                Value::BulkString(retry),
                Value::Int(remaining),
            ] => {
                let retry: [u8; 8] = retry.as_slice().try_into().map_err(|_| bad())?;
                let retry = f64::from_le_bytes(retry);
                // +inf is a wait for ever; NaN or a negative wait is no answer.
                if retry.is_nan() || retry < 0.0 {
                    return Err(bad());
                }
                Ok(BucketDecision {
                    allowed: false,
                    retry_after: token_bucket::seconds(retry),
                    remaining: u64::try_from(*remaining).map_err(|_| bad())?,
                })
            }
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// The same error for another check of the failed batch.
fn copy_error(err: &RateLimitError) -> RateLimitError {
    err.details().iter().fold(
        RateLimitError::new(err.code(), err.message()),
        |copy, (name, value)| copy.with_detail(name, value.clone()),
    )
}

/// One check of a batch, as the batch scripts read it: its rule's numbers and lifetime, the
/// cost (`+inf` above capacity, decided here on the integers, as for the compact script) and
/// `now` (`-1` for Redis's `TIME`). [`pack_batch`] writes a batch of them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BatchArgs {
    max_tokens: f64,
    refill_rate: f64,
    ttl: u64,
    cost: f64,
    now: f64,
}

impl BatchArgs {
    /// Bytes of one single entry: `struct.pack('<BBHdd', kind, flags, rule, cost, now)`.
    const ENTRY: usize = 1 + 1 + 2 + 8 + 8;

    /// The entry of `request`.
    ///
    /// # Errors
    /// `InvalidInput` for a `now` that is not a usable time.
    pub(crate) fn of(request: &BucketRequest<'_>) -> Result<Self> {
        let now = request.now.map(validate_now).transpose()?;
        Ok(Self::new(request.rule, request.cost, now))
    }

    /// The entry of `cost` tokens of a bucket of `rule` at `now` (validated; `None` for
    /// Redis's `TIME`).
    #[allow(clippy::cast_precision_loss)] // exact: cost <= max_tokens <= 2^53
    fn new(rule: &RateLimitRule, cost: u64, now: Option<f64>) -> Self {
        let max_tokens = rule.max_tokens();
        let cost = if cost > max_tokens {
            f64::INFINITY
        } else {
            cost as f64
        };
        Self {
            max_tokens: max_tokens as f64,
            refill_rate: rule.refill_rate(),
            ttl: rule.storage_ttl_seconds(),
            cost,
            now: now.unwrap_or(-1.0),
        }
    }

    /// Whether `other` has the same rule (numbers and lifetime).
    fn same_rule(&self, other: &Self) -> bool {
        self.max_tokens.to_bits() == other.max_tokens.to_bits()
            && self.refill_rate.to_bits() == other.refill_rate.to_bits()
            && self.ttl == other.ttl
    }
}

/// A bucket's key came earlier in the batch (its flags, in a batch record).
const EARLIER: u8 = 1;
/// A bucket's key comes again later in the batch.
const LATER: u8 = 2;

/// The batch scripts' `ARGV[1]` for `batch` (lua/token_bucket_compact_batch.lua has the
/// layout): each distinct rule once, then one record per entry naming its rule, a group's
/// record followed by one per bucket; each bucket flagged when its key came earlier in the
/// batch or comes again later, so that the script keeps track only of those keys.
fn pack_batch(batch: &[Entry]) -> Vec<u8> {
    let mut rules: Vec<&BatchArgs> = Vec::new();
    let mut indexes: Vec<u16> = Vec::new();
    let mut flags: Vec<u8> = Vec::new();
    let mut last_seen: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for (key, args) in batch.iter().flat_map(Entry::buckets) {
        let at = flags.len();
        flags.push(0);
        if let Some(earlier) = last_seen.insert(key.as_str(), at) {
            flags[at] |= EARLIER;
            flags[earlier] |= LATER;
        }
        let index = match rules.iter().position(|rule| rule.same_rule(args)) {
            Some(index) => index,
            None => {
                rules.push(args);
                rules.len() - 1
            }
        };
        // At most one rule per bucket, and a group has at most MAX_GROUP of them.
        indexes.push(u16::try_from(index + 1).unwrap_or(u16::MAX));
    }
    let mut packed = Vec::with_capacity(2 + rules.len() * 40 + indexes.len() * BatchArgs::ENTRY);
    packed.extend_from_slice(&u16::try_from(rules.len()).unwrap_or(u16::MAX).to_le_bytes());
    for rule in &rules {
        packed.extend_from_slice(&rule.max_tokens.to_le_bytes());
        packed.extend_from_slice(&rule.refill_rate.to_le_bytes());
        let mut digits = [0_u8; 20];
        let mut free = &mut digits[..];
        // 20 bytes hold any u64, so the write cannot fail.
        let _ = write!(free, "{}", rule.ttl);
        let len = 20 - free.len();
        packed.push(u8::try_from(len).unwrap_or(u8::MAX));
        packed.extend_from_slice(&digits[..len]);
    }
    let mut indexes = indexes.into_iter().zip(flags);
    for entry in batch {
        match &entry.reply {
            Reply::One(_) => {
                let (index, flags) = indexes.next().unwrap_or_default();
                packed.push(0);
                packed.push(flags);
                packed.extend_from_slice(&index.to_le_bytes());
                packed.extend_from_slice(&entry.args.cost.to_le_bytes());
                packed.extend_from_slice(&entry.args.now.to_le_bytes());
            }
            Reply::Group(group) => {
                packed.push(1);
                packed.push(0);
                let count = u16::try_from(1 + group.rest.len()).unwrap_or(u16::MAX);
                packed.extend_from_slice(&count.to_le_bytes());
                packed.extend_from_slice(&0.0_f64.to_le_bytes());
                packed.extend_from_slice(&entry.args.now.to_le_bytes());
                for (_, args) in entry.buckets() {
                    let (index, flags) = indexes.next().unwrap_or_default();
                    packed.push(flags);
                    packed.extend_from_slice(&index.to_le_bytes());
                    packed.extend_from_slice(&args.cost.to_le_bytes());
                }
            }
        }
    }
    packed
}

#[cfg(test)]
mod tests {
    use ratelimit_domain::{RateLimitRule, RateLimitScope};

    use super::*;

    fn double(bytes: &[u8], at: usize) -> f64 {
        let mut chunk = [0_u8; 8];
        chunk.copy_from_slice(&bytes[at..at + 8]);
        f64::from_le_bytes(chunk)
    }

    #[test]
    fn a_second_batch_waits_until_it_matches_the_one_on_its_way() {
        let key = BucketKey::new(RateLimitScope::Ip, "203.0.113.9", "GET /x").unwrap();
        let rule = RateLimitRule::new(RateLimitScope::Ip, 10, 0.1).unwrap();
        let entry = || Entry {
            key: key.clone(),
            args: BatchArgs::of(&BucketRequest::new(&key, &rule)).unwrap(),
            reply: Reply::One(ReplyTo::new(oneshot::channel().0)),
            deadline: Instant::now(),
        };
        // A first batch of 40 on its way (as `Shared::next_batch` takes it).
        let mut state = State {
            in_flight: 1,
            batches: 1,
            ..State::default()
        };
        state.queue.extend((0..40).map(|_| entry()));
        assert_eq!(state.take().len(), 40);
        assert_eq!(state.sending, 40);
        // A second one only once 40 wait, not at 16.
        for queued in 1..40 {
            state.queue.push_back(entry());
            assert!(state.start_batch().is_none(), "started at {queued}");
        }
        state.queue.push_back(entry());
        let second = state.start_batch().unwrap();
        assert_eq!(second.len(), 40);
        assert_eq!((state.in_flight, state.batches, state.sending), (2, 2, 80));
        // A small batch on its way: at least 16 still make the second.
        let mut small = State {
            in_flight: 1,
            batches: 1,
            sending: 3,
            ..State::default()
        };
        small.queue.extend((0..15).map(|_| entry()));
        assert!(small.start_batch().is_none());
        small.queue.push_back(entry());
        assert_eq!(small.start_batch().unwrap().len(), 16);
    }

    #[test]
    fn a_batch_packs_each_rule_once_and_every_entry() {
        let key = BucketKey::new(RateLimitScope::Ip, "203.0.113.9", "GET /x").unwrap();
        let rule = RateLimitRule::new(RateLimitScope::Ip, 10, 0.1).unwrap();
        let other = RateLimitRule::new(RateLimitScope::Ip, 10, 0.2).unwrap();
        let one = |args: BatchArgs| Entry {
            key: key.clone(),
            args,
            reply: Reply::One(ReplyTo::new(oneshot::channel().0)),
            deadline: Instant::now(),
        };
        let mut entries = vec![
            one(BatchArgs::of(&BucketRequest::new(&key, &rule).with_cost(3)).unwrap()),
            one(BatchArgs::of(&BucketRequest::new(&key, &other).with_cost(11).at(1.5)).unwrap()),
            one(BatchArgs::of(&BucketRequest::new(&key, &rule)).unwrap()),
        ];
        let packed = pack_batch(&entries);
        // Two rules: 10, 0.1, "6060" and 10, 0.2, "3060".
        assert_eq!(&packed[..2], &[2, 0]);
        assert_eq!([double(&packed, 2), double(&packed, 10)], [10.0, 0.1]);
        assert_eq!(&packed[18..23], b"\x046060");
        assert_eq!([double(&packed, 23), double(&packed, 31)], [10.0, 0.2]);
        assert_eq!(&packed[39..44], b"\x043060");
        let records = &packed[44..];
        assert_eq!(records.len(), 3 * BatchArgs::ENTRY);
        // (kind, flags, rule or bucket count, cost, now)
        let record = |r: &[u8]| {
            (
                r[0],
                r[1],
                u16::from_le_bytes([r[2], r[3]]),
                double(r, 4),
                double(r, 12),
            )
        };
        // The same key three times: seen again later, earlier and later, earlier.
        assert_eq!(record(records), (0, LATER, 1, 3.0, -1.0));
        // A cost above capacity goes as +inf.
        assert_eq!(
            record(&records[20..]),
            (0, EARLIER | LATER, 2, f64::INFINITY, 1.5)
        );
        assert_eq!(record(&records[40..]), (0, EARLIER, 1, 1.0, -1.0));

        // A group: its record (kind 1, its bucket count, its clock), then (flags, rule, cost) per
        // bucket.
        let third = RateLimitRule::new(RateLimitScope::Ip, 4, 1.0).unwrap();
        entries.truncate(1);
        entries.push(Entry {
            key: key.clone(),
            args: BatchArgs::new(&other, 2, Some(7.0)),
            reply: Reply::Group(Box::new(Group {
                rest: vec![
                    (key.clone(), BatchArgs::new(&third, 5, Some(7.0))),
                    (key.clone(), BatchArgs::new(&rule, 0, Some(7.0))),
                ],
                reply: ReplyTo::new(oneshot::channel().0),
            })),
            deadline: Instant::now(),
        });
        let packed = pack_batch(&entries);
        assert_eq!(&packed[..2], &[3, 0]);
        // Rules of 21, 21 and 20 bytes (lifetimes "6060", "3060", "300").
        let records = &packed[2 + 21 + 21 + 20..];
        assert_eq!(record(records), (0, LATER, 1, 3.0, -1.0));
        assert_eq!(record(&records[20..]), (1, 0, 3, 0.0, 7.0));
        let bucket = |r: &[u8]| (r[0], u16::from_le_bytes([r[1], r[2]]), double(r, 3));
        let buckets = &records[40..];
        assert_eq!(buckets.len(), 3 * 11);
        assert_eq!(bucket(buckets), (EARLIER | LATER, 2, 2.0));
        assert_eq!(bucket(&buckets[11..]), (EARLIER | LATER, 3, f64::INFINITY));
        assert_eq!(bucket(&buckets[22..]), (EARLIER, 1, 0.0));

        // Distinct keys: no flags.
        let other = BucketKey::new(RateLimitScope::Ip, "198.51.100.7", "GET /x").unwrap();
        let distinct = [
            one(BatchArgs::of(&BucketRequest::new(&key, &rule)).unwrap()),
            Entry {
                key: other,
                ..one(BatchArgs::of(&BucketRequest::new(&key, &rule)).unwrap())
            },
        ];
        let packed = pack_batch(&distinct);
        let records = &packed[2 + 21..];
        assert_eq!(record(records).1, 0);
        assert_eq!(record(&records[20..]).1, 0);
        let bad = BatchArgs::of(&BucketRequest::new(&key, &rule).at(f64::NAN));
        assert_eq!(bad.err().map(|e| e.code()), Some(ErrorCode::InvalidInput));
    }

    #[test]
    fn denied_entries_carry_their_wait_as_a_double() {
        let key = BucketKey::new(RateLimitScope::Ip, "203.0.113.9", "GET /x").unwrap();
        let denied = |retry: f64| {
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(retry.to_le_bytes().to_vec()),
                Value::Int(2),
            ])
        };
        let d = entry_decision(&denied(0.1 + 0.2), &key).unwrap();
        assert!(!d.allowed && d.remaining == 2);
        assert_eq!(d.retry_after, token_bucket::seconds(0.1 + 0.2));
        assert!(
            entry_decision(&denied(f64::INFINITY), &key)
                .unwrap()
                .is_never()
        );
        for bad in [
            denied(f64::NAN),
            denied(-1.0),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(b"1.5".to_vec()),
                Value::Int(2),
            ]),
            Value::Int(-3),
        ] {
            let err = entry_decision(&bad, &key).unwrap_err();
            assert_eq!(err.code(), ErrorCode::CorruptBucket, "{bad:?}");
        }
    }

    #[test]
    fn a_group_answers_every_bucket_or_names_the_one_of_another_type() {
        let a = BucketKey::new(RateLimitScope::Ip, "a", "GET /x").unwrap();
        let b = BucketKey::new(RateLimitScope::Global, "", "GET /x").unwrap();
        let keys = [&a, &b];
        let reply = Value::Array(vec![
            Value::Int(4),
            Value::Array(vec![
                Value::Int(0),
                Value::BulkString(1.5_f64.to_le_bytes().to_vec()),
                Value::Int(0),
            ]),
        ]);
        let decisions = group_decisions(&reply, &keys).unwrap();
        assert!(decisions[0].allowed && decisions[0].remaining == 4);
        assert!(!decisions[1].allowed);
        assert_eq!(decisions[1].retry_after, Duration::from_millis(1_500));
        let wrong = Value::Array(vec![
            Value::Int(-1),
            Value::BulkString(b"WRONGTYPE bucket 2: WRONGTYPE Operation".to_vec()),
        ]);
        let err = group_decisions(&wrong, &keys).unwrap_err();
        assert_eq!(err.code(), ErrorCode::CorruptBucket);
        assert_eq!(
            err.details().get("key").map(String::as_str),
            Some(b.as_str())
        );
        // One answer short, or not an array: unusable.
        for bad in [Value::Array(vec![Value::Int(4)]), Value::Int(4)] {
            let err = group_decisions(&bad, &keys).unwrap_err();
            assert_eq!(err.code(), ErrorCode::CorruptBucket, "{bad:?}");
        }
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
