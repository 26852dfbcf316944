//! Shared state on Redis (feature `redis`): spend caps and rate limits that hold across every
//! replica of a gateway.
//!
//! [`RedisStore`] implements [`BudgetStore`]. Every method is one Lua script — one atomic
//! step on the server, one round trip, sent with `EVALSHA` and, the first time, `EVAL` —
//! timed by the server's clock (`TIME`), touching keys under the policy's prefix that share
//! one hash tag (the owner, or the rate key), so that a fleet that outgrows one server moves to
//! Redis Cluster without a redesign. Every key carries a TTL: idle owners and buckets expire.
//!
//! - **Spend reservations are leases.** Each request's reservations live under its lease id
//!   until it settles, or until its lease (the request's deadline plus the policy's
//!   `lease_margin`) ends: a replica that dies with reservations open never holds cap forever,
//!   and every other request's reservation still counts against the cap meanwhile.
//! - **Bookings never wait and are never lost.** Settling, releasing and adjusting happen when
//!   a body ends or is dropped, where nothing can wait: they go to a queue drained by a task
//!   of the store's own, which retries a failed booking until the reservation's lease would
//!   have reclaimed it anyway. [`RedisStore::flush`] waits for the queue (at shutdown, in tests).
//! - **Redis down is a mode the policy chooses** (`store.mode`): `fail_closed` answers
//!   [`Refusal::Unavailable`] (the request fails with `ErrorKind::StoreUnavailable`; the
//!   default for spend), `local` carries on with this replica's own state and its
//!   `local_share` of every limit (the default for rate limits). Every call waits at most
//!   `store.timeout`; after a failure the store is not asked again for a second, and comes
//!   back by itself. Each switch is a `tracing` warning and counted in [`RedisStore::stats`].
//!
//! The `redis` crate needs Rust 1.88, newer than the rest of the crate.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), tower_llm_resilience::BoxError> {
//! use std::sync::Arc;
//! use tower_llm_resilience::budget::BudgetLayer;
//! use tower_llm_resilience::policy::SpendPolicy;
//! use tower_llm_resilience::redis::RedisStore;
//! use tower_llm_resilience::Policy;
//!
//! let mut policy = Policy::interactive();
//! policy.store.url = Some("redis://127.0.0.1:6379".to_owned());
//! policy.budget.spend = Some(SpendPolicy::default());
//! // Every replica builds the same layer over the same Redis.
//! let store = RedisStore::new(&policy.store)?;
//! let budget = BudgetLayer::from_policy(&policy)?.store(Arc::new(store.clone()));
//! # let _ = budget;
//! // At shutdown: the bookings still queued reach Redis.
//! store.flush().await;
//! # Ok(())
//! # }
//! ```

#![cfg(feature = "redis")]
#![cfg_attr(docsrs, doc(cfg(feature = "redis")))]

mod cache;
mod defer;
mod health;
mod scripts;

pub use cache::RedisCache;
pub use defer::RedisDeferSink;
pub use health::RedisHealth;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{ErrorKind as RedisErrorKind, ServerErrorKind, Value};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use self::scripts::{Lua, Scripts};
use crate::BoxError;
use crate::budget::{BudgetStore, Lease, MemoryStore, RateDemand, Refusal, SpendStatus};
use crate::policy::{StoreMode, StoreModes, StorePolicy};
use crate::store::StoreFuture;

/// How long the store is left alone after a call failed, before it is asked again.
const DOWN_FOR: Duration = Duration::from_secs(1);

/// The longest a booking is retried when it is not tied to a lease (an adjustment).
const ADJUST_RETRY_FOR: Duration = Duration::from_secs(600);

/// Spend caps and rate limits shared through Redis; see the [module docs](self).
///
/// Cheap to clone: clones share one connection (a `ConnectionManager` that reconnects by
/// itself), one booking queue and one local fallback.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    scripts: Scripts,
    prefix: String,
    timeout: Duration,
    modes: StoreModes,
    /// This replica's own state, for the kinds whose mode is `local` while Redis is down.
    local: MemoryStore,
    /// Reservations made in `local` while Redis was down: they settle there too.
    local_leases: Mutex<HashSet<u64>>,
    /// Until when the store is left alone after a failure.
    down_until: Mutex<Option<Instant>>,
    bookings: mpsc::UnboundedSender<Booking>,
    /// Bookings queued or being carried out.
    queued: AtomicUsize,
    drained: Notify,
    stats: Counters,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    failures: AtomicU64,
    switches: AtomicU64,
    local_answers: AtomicU64,
    lost_bookings: AtomicU64,
}

/// What a [`RedisStore`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct StoreStats {
    /// Calls (round trips) made to Redis.
    pub calls: u64,
    /// Calls that failed or timed out.
    pub failures: u64,
    /// Times the store went from up to down.
    pub switches: u64,
    /// Asks answered from this replica's own state while Redis was down.
    pub local_answers: u64,
    /// Bookings given up after retrying until their lease ended.
    pub lost_bookings: u64,
}

/// A booking for the queue: one script, its keys and arguments, and until when it is worth
/// retrying.
struct Booking {
    script: fn(&Scripts) -> &Lua,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    retry_until: Instant,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store on the Redis of `policy.url`. It connects lazily (a replica starts while Redis
    /// is down) and must be made inside a Tokio runtime: it starts the task that carries out
    /// its bookings.
    pub fn new(policy: &StorePolicy) -> Result<Self, BoxError> {
        policy.validate()?;
        let url = policy
            .url
            .as_deref()
            .ok_or("store.url names no Redis to connect to")?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "a RedisStore must be made inside a Tokio runtime")?;
        let client = ::redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(policy.timeout))
            .set_response_timeout(Some(policy.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let (bookings, queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            conn,
            scripts: Scripts::new(),
            prefix: policy.key_prefix.clone(),
            timeout: policy.timeout,
            modes: policy.mode,
            local: MemoryStore::new(),
            local_leases: Mutex::new(HashSet::new()),
            down_until: Mutex::new(None),
            bookings,
            queued: AtomicUsize::new(0),
            drained: Notify::new(),
            stats: Counters::default(),
        });
        runtime.spawn(carry_out(Arc::downgrade(&inner), queue));
        Ok(Self { inner })
    }

    /// Waits until every booking queued so far has reached Redis (or been given up).
    pub async fn flush(&self) {
        loop {
            let drained = self.inner.drained.notified();
            if self.inner.queued.load(Ordering::Acquire) == 0 {
                return;
            }
            drained.await;
        }
    }

    /// What the store has done so far.
    pub fn stats(&self) -> StoreStats {
        let c = &self.inner.stats;
        StoreStats {
            calls: c.calls.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            switches: c.switches.load(Ordering::Relaxed),
            local_answers: c.local_answers.load(Ordering::Relaxed),
            lost_bookings: c.lost_bookings.load(Ordering::Relaxed),
        }
    }

    /// The spend keys of `owner`: its spend hash, reservations and leases, in one hash slot.
    fn spend_keys(&self, owner: &str) -> Vec<String> {
        let (p, tag) = (&self.inner.prefix, tag(owner));
        ["spend", "res", "lease"]
            .iter()
            .map(|k| format!("{p}:{k}:{{{tag}}}"))
            .collect()
    }

    /// Queues `script` (release or settle) over `lease`: the lease's id, the amount, the
    /// window and the lease's time to live, retried for as long as the lease would live.
    fn book_lease(
        &self,
        script: fn(&Scripts) -> &Lua,
        owner: &str,
        lease: Lease,
        amount: u64,
        window: Duration,
    ) {
        self.inner.queue(Booking {
            script,
            keys: self.spend_keys(owner),
            args: bytes([
                lease.id.to_string(),
                amount.to_string(),
                ms(window),
                ms(lease.ttl),
            ]),
            retry_until: Instant::now() + lease.ttl,
        });
    }
}

/// A hash tag for `name`: the braces that delimit a tag (and `%`) escaped, so that no name
/// can reach another's keys.
fn tag(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

/// Script arguments as bytes.
fn bytes<const N: usize>(args: [String; N]) -> Vec<Vec<u8>> {
    args.into_iter().map(String::into_bytes).collect()
}

fn ms(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

impl Inner {
    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the store is being left alone after a recent failure.
    fn resting(&self) -> bool {
        Self::lock(&self.down_until).is_some_and(|until| Instant::now() < until)
    }

    fn failed(&self, why: &str) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let mut down = Self::lock(&self.down_until);
        if down.is_none() {
            self.stats.switches.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                target: "tower_llm_resilience::store",
                error = why,
                "shared-state store unavailable: each kind of state follows its mode"
            );
        }
        *down = Some(Instant::now() + DOWN_FOR);
    }

    fn answered(&self) {
        let mut down = Self::lock(&self.down_until);
        if down.take().is_some() {
            tracing::info!(
                target: "tower_llm_resilience::store",
                "shared-state store back: state is shared again"
            );
        }
    }

    /// One script, one round trip, within the timeout.
    async fn eval<A: ::redis::ToRedisArgs + Send + Sync>(
        &self,
        lua: &Lua,
        keys: &[String],
        args: &[A],
    ) -> Result<Value, String> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        let run = async {
            let sent = ::redis::cmd("EVALSHA")
                .arg(&lua.sha)
                .arg(keys.len())
                .arg(keys)
                .arg(args)
                .query_async::<Value>(&mut conn)
                .await;
            match sent {
                Err(e) if e.kind() == RedisErrorKind::Server(ServerErrorKind::NoScript) => {
                    ::redis::cmd("EVAL")
                        .arg(&lua.source)
                        .arg(keys.len())
                        .arg(keys)
                        .arg(args)
                        .query_async::<Value>(&mut conn)
                        .await
                }
                other => other,
            }
        };
        let answer = match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        match &answer {
            Ok(_) => self.answered(),
            Err(why) => self.failed(why),
        }
        answer
    }

    fn queue(&self, booking: Booking) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.bookings.send(booking).is_err() {
            // The task is gone with its runtime: nothing can carry this out any more.
            self.stats.lost_bookings.fetch_add(1, Ordering::Relaxed);
            self.done();
        }
    }

    fn done(&self) {
        if self.queued.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }

    fn local_lease(&self, id: u64) -> bool {
        Self::lock(&self.local_leases).contains(&id)
    }
}

/// The store's own task: carries out every booking in order, retrying one that fails until it
/// is no longer worth it.
async fn carry_out(store: std::sync::Weak<Inner>, mut queue: mpsc::UnboundedReceiver<Booking>) {
    while let Some(booking) = queue.recv().await {
        let Some(inner) = store.upgrade() else { return };
        let mut pause = Duration::from_millis(50);
        loop {
            let lua = (booking.script)(&inner.scripts);
            if inner.eval(lua, &booking.keys, &booking.args).await.is_ok() {
                break;
            }
            if Instant::now() + pause > booking.retry_until {
                inner.stats.lost_bookings.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target: "tower_llm_resilience::store",
                    "a booking could not reach the shared-state store before its lease ended"
                );
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        inner.done();
    }
}

/// Integers from a script's reply.
fn ints(v: &Value) -> Vec<i64> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(n) => *n,
                _ => 0,
            })
            .collect(),
        Value::Int(n) => vec![*n],
        _ => Vec::new(),
    }
}

fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A cap or rate scaled to this replica's share while the store is down.
fn share(n: u64, share: f64) -> u64 {
    ((n as f64) * share).floor().max(1.0) as u64
}

impl RedisStore {
    fn local_reserve(
        &self,
        owner: &str,
        lease: Lease,
        amount: u64,
        cap: u64,
        window: Duration,
    ) -> StoreFuture<Result<(), Refusal>> {
        let inner = &self.inner;
        if inner.modes.spend == StoreMode::FailClosed {
            return StoreFuture::ready(Err(Refusal::Unavailable(
                "the shared-state store is down and spend fails closed".to_owned(),
            )));
        }
        inner.stats.local_answers.fetch_add(1, Ordering::Relaxed);
        let cap = share(cap, inner.modes.local_share);
        let mut answer = inner.local.reserve(owner, lease, amount, cap, window);
        let answer = answer.now().unwrap_or(Err(Refusal::Unavailable(
            "the local store did not answer".to_owned(),
        )));
        if answer.is_ok() {
            Inner::lock(&inner.local_leases).insert(lease.id);
        }
        StoreFuture::ready(answer)
    }

    fn local_take(&self, key: &str, demands: &[RateDemand]) -> StoreFuture<Result<(), Refusal>> {
        let inner = &self.inner;
        if inner.modes.rate_limit == StoreMode::FailClosed {
            return StoreFuture::ready(Err(Refusal::Unavailable(
                "the shared-state store is down and rate limits fail closed".to_owned(),
            )));
        }
        inner.stats.local_answers.fetch_add(1, Ordering::Relaxed);
        // This replica's share of the rate: a smaller bucket that refills more slowly.
        let s = inner.modes.local_share;
        let scaled: Vec<RateDemand> = demands
            .iter()
            .map(|d| {
                let per_unit = d.per_unit.div_f64(s);
                RateDemand::new(d.bucket, per_unit, share(d.capacity, s), d.cost)
            })
            .collect();
        inner.local.take(key, &scaled)
    }
}

impl BudgetStore for RedisStore {
    fn reserve(
        &self,
        owner: &str,
        lease: Lease,
        amount: u64,
        cap: u64,
        window: Duration,
    ) -> StoreFuture<Result<(), Refusal>> {
        if self.inner.resting() {
            return self.local_reserve(owner, lease, amount, cap, window);
        }
        let keys = self.spend_keys(owner);
        let args = vec![
            lease.id.to_string(),
            amount.to_string(),
            cap.to_string(),
            ms(window),
            ms(lease.ttl),
        ];
        let (store, owner) = (self.clone(), owner.to_owned());
        StoreFuture::new(async move {
            let inner = &store.inner;
            match inner.eval(&inner.scripts.reserve, &keys, &args).await {
                Ok(v) => match ints(&v).as_slice() {
                    [1, ..] => Ok(()),
                    [_, spent, reserved] => Err(Refusal::Spend(SpendStatus::new(
                        unsigned(*spent),
                        unsigned(*reserved),
                    ))),
                    _ => Err(Refusal::Unavailable("an unexpected reply".to_owned())),
                },
                Err(_) => {
                    let mut local = store.local_reserve(&owner, lease, amount, cap, window);
                    local.now().unwrap_or(Err(Refusal::Unavailable(
                        "the local store did not answer".to_owned(),
                    )))
                }
            }
        })
    }

    fn release(&self, owner: &str, lease: Lease, amount: u64, window: Duration) {
        if self.inner.local_lease(lease.id) {
            self.inner.local.release(owner, lease, amount, window);
            return;
        }
        self.book_lease(|s| &s.release, owner, lease, amount, window);
    }

    fn settle(&self, owner: &str, lease: Lease, reserved: u64, charged: u64, window: Duration) {
        if Inner::lock(&self.inner.local_leases).remove(&lease.id) {
            self.inner
                .local
                .settle(owner, lease, reserved, charged, window);
            return;
        }
        self.book_lease(|s| &s.settle, owner, lease, charged, window);
    }

    fn adjust(&self, owner: &str, refund: u64, charge: u64, window: Duration) {
        self.inner.queue(Booking {
            script: |s| &s.adjust,
            keys: self.spend_keys(owner),
            args: bytes([
                refund.to_string(),
                charge.to_string(),
                ms(window),
                ms(window),
            ]),
            retry_until: Instant::now() + ADJUST_RETRY_FOR,
        });
    }

    fn status(&self, owner: &str, window: Duration) -> StoreFuture<Result<SpendStatus, Refusal>> {
        let keys = self.spend_keys(owner);
        let args = vec![ms(window)];
        let (store, owner) = (self.clone(), owner.to_owned());
        StoreFuture::new(async move {
            let inner = &store.inner;
            match inner.eval(&inner.scripts.status, &keys, &args).await {
                Ok(v) => match ints(&v).as_slice() {
                    [spent, reserved] => {
                        Ok(SpendStatus::new(unsigned(*spent), unsigned(*reserved)))
                    }
                    _ => Err(Refusal::Unavailable("an unexpected reply".to_owned())),
                },
                Err(why) if inner.modes.spend == StoreMode::Local => {
                    let _ = why;
                    inner.local.status(&owner, window).await
                }
                Err(why) => Err(Refusal::Unavailable(why)),
            }
        })
    }

    fn take(&self, key: &str, demands: &[RateDemand]) -> StoreFuture<Result<(), Refusal>> {
        if self.inner.resting() {
            return self.local_take(key, demands);
        }
        let (p, tag) = (&self.inner.prefix, tag(key));
        let keys: Vec<String> = demands
            .iter()
            .map(|d| format!("{p}:rate:{{{tag}}}:{}", d.bucket))
            .collect();
        let args: Vec<String> = demands
            .iter()
            .flat_map(|d| {
                let per_us = d.per_unit.as_nanos() as f64 / 1000.0;
                [
                    format!("{per_us:.3}"),
                    d.capacity.to_string(),
                    d.cost.to_string(),
                ]
            })
            .collect();
        let (store, key, demands) = (self.clone(), key.to_owned(), demands.to_vec());
        StoreFuture::new(async move {
            let inner = &store.inner;
            match inner.eval(&inner.scripts.take, &keys, &args).await {
                Ok(v) => match ints(&v).as_slice() {
                    [1, ..] => Ok(()),
                    [_, wait_us] => Err(Refusal::Rate(Duration::from_micros(unsigned(*wait_us)))),
                    _ => Err(Refusal::Unavailable("an unexpected reply".to_owned())),
                },
                Err(_) => {
                    let mut local = store.local_take(&key, &demands);
                    local.now().unwrap_or(Err(Refusal::Unavailable(
                        "the local store did not answer".to_owned(),
                    )))
                }
            }
        })
    }
}
