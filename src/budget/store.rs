//! Where admission state lives: spend per owner and rate-limit buckets.
//!
//! [`BudgetStore`] is deliberately small so that a store shared by many replicas (a Redis script
//! per method) can implement it: every method is one atomic step keyed by owner or bucket key.
//! [`MemoryStore`] keeps the state in this process.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::store::StoreFuture;

/// Micro cost units in one cost unit: amounts are integers so that sums are exact.
pub const MICROS_PER_UNIT: u64 = 1_000_000;

/// An owner's spend in the current window, in micro cost units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SpendStatus {
    /// Booked (settled) spend.
    pub spent: u64,
    /// Reserved by requests in flight and not yet settled.
    pub reserved: u64,
}

impl SpendStatus {
    /// A status.
    pub const fn new(spent: u64, reserved: u64) -> Self {
        Self { spent, reserved }
    }

    /// Spent plus reserved.
    pub const fn committed(&self) -> u64 {
        self.spent.saturating_add(self.reserved)
    }
}

/// One token bucket a request takes from, as a generic cell rate: every unit of `cost` uses
/// `per_unit` of the bucket's time, and at most `capacity` units may be taken at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateDemand {
    /// Which bucket of the key (`"requests"`, `"tokens"`).
    pub bucket: &'static str,
    /// Time to refill one unit.
    pub per_unit: Duration,
    /// Most units the bucket holds (the burst).
    pub capacity: u64,
    /// Units this request takes (never more than `capacity`).
    pub cost: u64,
}

impl RateDemand {
    /// A demand of `cost` units on `bucket`.
    pub const fn new(bucket: &'static str, per_unit: Duration, capacity: u64, cost: u64) -> Self {
        Self {
            bucket,
            per_unit,
            capacity,
            cost,
        }
    }
}

/// One request's reservations in a store: an id of the request's own, and how long the store
/// keeps them if the request never settles (its replica died, say). Past its lease a
/// reservation is reclaimed, so a lost request never holds cap forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The request's reservation id, unique per request.
    pub id: u64,
    /// How long the reservation lives unless settled.
    pub ttl: Duration,
}

impl Lease {
    /// A lease `id` for `ttl`.
    pub const fn new(id: u64, ttl: Duration) -> Self {
        Self { id, ttl }
    }
}

/// Why a store did not grant an ask.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The reservation would take the owner past its cap; the owner's spend now.
    Spend(SpendStatus),
    /// A bucket has no room yet: every demand fits in this long.
    Rate(Duration),
    /// The store could not be asked (down, slow past its timeout); a reason for the log.
    Unavailable(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Spend(s) => write!(
                f,
                "the spend cap is reached ({} spent, {} reserved, in micro units)",
                s.spent, s.reserved
            ),
            Refusal::Rate(wait) => write!(f, "no rate-limit capacity for {wait:?}"),
            Refusal::Unavailable(reason) => write!(f, "the store is unavailable: {reason}"),
        }
    }
}

impl std::error::Error for Refusal {}

/// Storage for spend caps and rate-limit buckets.
///
/// Amounts are micro cost units ([`MICROS_PER_UNIT`]). Windows are fixed: a window starts every
/// `window` and booked spend starts again from zero, while reservations still open carry over
/// into the new window (they settle into the window current when they settle), so no spend is
/// ever lost at a boundary.
///
/// Every method is one atomic step keyed by owner or bucket key, so that a store shared by many
/// replicas runs each as one server-side script. The asks a request waits for (`reserve`,
/// `take`, `status`) return a [`StoreFuture`]; the bookings that may happen in `Drop` (a body
/// dropped mid-stream settles there) return nothing: the store must carry them out later, and
/// never lose them, without the caller waiting.
pub trait BudgetStore: Send + Sync + 'static {
    /// Atomically adds `amount` to `owner`'s reservation `lease` (renewing the lease) unless
    /// spent plus reserved plus `amount` would exceed `cap`.
    fn reserve(
        &self,
        owner: &str,
        lease: Lease,
        amount: u64,
        cap: u64,
        window: Duration,
    ) -> StoreFuture<Result<(), Refusal>>;

    /// Takes `amount` off `owner`'s reservation `lease`: an attempt it was held for will not be
    /// made.
    fn release(&self, owner: &str, lease: Lease, amount: u64, window: Duration);

    /// Closes `owner`'s reservation `lease`, which holds `reserved`, and books `charged`.
    fn settle(&self, owner: &str, lease: Lease, reserved: u64, charged: u64, window: Duration);

    /// Corrects booked spend: takes `refund` off and books `charge` (usage reported late).
    fn adjust(&self, owner: &str, refund: u64, charge: u64, window: Duration);

    /// The owner's spend in the current window.
    fn status(&self, owner: &str, window: Duration) -> StoreFuture<Result<SpendStatus, Refusal>>;

    /// Atomically takes every demand from the buckets of `key`, or none of them:
    /// [`Refusal::Rate`] holds the time until all of them have room.
    fn take(&self, key: &str, demands: &[RateDemand]) -> StoreFuture<Result<(), Refusal>>;
}

/// A [`BudgetStore`] in this process's memory (one per layer unless shared explicitly).
pub struct MemoryStore {
    epoch: Instant,
    spend: Mutex<Table<String, SpendRecord>>,
    // Bucket key -> theoretical arrival time (offset from `epoch`) of the generic cell rate.
    rates: Mutex<Table<(String, &'static str), Duration>>,
}

struct SpendRecord {
    window: u64,
    spent: u64,
    reserved: u64,
}

/// A map pruned of idle entries when it doubles, so keys from outside cannot grow it forever.
struct Table<K, V> {
    map: HashMap<K, V>,
    prune_at: usize,
}

impl<K: std::hash::Hash + Eq, V> Table<K, V> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            prune_at: 1024,
        }
    }

    fn prune(&mut self, idle: impl Fn(&V) -> bool) {
        if self.map.len() >= self.prune_at {
            self.map.retain(|_, v| !idle(v));
            self.prune_at = (self.map.len() * 2).max(1024);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update; the counters are plain
    // integers and still consistent enough to keep enforcing limits.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryStore {
    /// An empty store; its windows start now.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            spend: Mutex::new(Table::new()),
            rates: Mutex::new(Table::new()),
        }
    }

    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.epoch)
    }

    fn window_of(&self, window: Duration) -> u64 {
        (self.now().as_nanos() / window.as_nanos().max(1)) as u64
    }

    fn with_record<R>(
        &self,
        owner: &str,
        window: Duration,
        f: impl FnOnce(&mut SpendRecord) -> R,
    ) -> R {
        let current = self.window_of(window);
        let mut table = lock(&self.spend);
        table.prune(|r| r.window < current && r.reserved == 0);
        let record = table.map.entry(owner.to_owned()).or_insert(SpendRecord {
            window: current,
            spent: 0,
            reserved: 0,
        });
        if record.window != current {
            // A new window: booked spend starts again, open reservations carry over.
            record.window = current;
            record.spent = 0;
        }
        f(record)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("owners", &lock(&self.spend).map.len())
            .field("buckets", &lock(&self.rates).map.len())
            .finish()
    }
}

impl MemoryStore {
    fn reserve_now(
        &self,
        owner: &str,
        amount: u64,
        cap: u64,
        window: Duration,
    ) -> Result<(), SpendStatus> {
        self.with_record(owner, window, |r| {
            let committed = r.spent.saturating_add(r.reserved);
            match committed.checked_add(amount) {
                Some(total) if total <= cap => {
                    r.reserved = total - r.spent;
                    Ok(())
                }
                _ => Err(SpendStatus::new(r.spent, r.reserved)),
            }
        })
    }

    fn take_now(&self, key: &str, demands: &[RateDemand]) -> Result<(), Duration> {
        let now = self.now();
        let mut table = lock(&self.rates);
        table.prune(|tat| *tat <= now);
        // Generic cell rate algorithm: exact integer time, no floating-point drift.
        let mut next = Vec::with_capacity(demands.len());
        let mut wait = Duration::ZERO;
        for d in demands {
            let tat = table
                .map
                .get(&(key.to_owned(), d.bucket))
                .copied()
                .unwrap_or(now)
                .max(now);
            let cost = d.cost.min(d.capacity);
            let new_tat = tat + mul(d.per_unit, cost);
            let tolerance = mul(d.per_unit, d.capacity);
            let ahead = new_tat - now;
            if ahead > tolerance {
                wait = wait.max(ahead - tolerance);
            }
            next.push(new_tat);
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for (d, tat) in demands.iter().zip(next) {
            table.map.insert((key.to_owned(), d.bucket), tat);
        }
        Ok(())
    }
}

// Leases are not needed here: the reservations live and die with the process that holds them.
impl BudgetStore for MemoryStore {
    fn reserve(
        &self,
        owner: &str,
        _lease: Lease,
        amount: u64,
        cap: u64,
        window: Duration,
    ) -> StoreFuture<Result<(), Refusal>> {
        StoreFuture::ready(
            self.reserve_now(owner, amount, cap, window)
                .map_err(Refusal::Spend),
        )
    }

    fn release(&self, owner: &str, _lease: Lease, amount: u64, window: Duration) {
        self.with_record(owner, window, |r| {
            r.reserved = r.reserved.saturating_sub(amount);
        });
    }

    fn settle(&self, owner: &str, _lease: Lease, reserved: u64, charged: u64, window: Duration) {
        self.with_record(owner, window, |r| {
            r.reserved = r.reserved.saturating_sub(reserved);
            r.spent = r.spent.saturating_add(charged);
        });
    }

    fn adjust(&self, owner: &str, refund: u64, charge: u64, window: Duration) {
        self.with_record(owner, window, |r| {
            r.spent = r.spent.saturating_sub(refund).saturating_add(charge);
        });
    }

    fn status(&self, owner: &str, window: Duration) -> StoreFuture<Result<SpendStatus, Refusal>> {
        StoreFuture::ready(Ok(
            self.with_record(owner, window, |r| SpendStatus::new(r.spent, r.reserved))
        ))
    }

    fn take(&self, key: &str, demands: &[RateDemand]) -> StoreFuture<Result<(), Refusal>> {
        StoreFuture::ready(self.take_now(key, demands).map_err(Refusal::Rate))
    }
}

fn mul(d: Duration, n: u64) -> Duration {
    let nanos = d.as_nanos().saturating_mul(u128::from(n));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);
    const L: Lease = Lease::new(1, DAY);

    impl MemoryStore {
        fn status_now(&self, owner: &str, window: Duration) -> SpendStatus {
            self.with_record(owner, window, |r| SpendStatus::new(r.spent, r.reserved))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_never_exceed_the_cap() {
        let s = MemoryStore::new();
        assert!(s.reserve_now("a", 60, 100, DAY).is_ok());
        assert_eq!(
            s.reserve_now("a", 41, 100, DAY),
            Err(SpendStatus::new(0, 60))
        );
        assert!(s.reserve_now("a", 40, 100, DAY).is_ok());
        // Another owner has its own cap.
        assert!(s.reserve_now("b", 100, 100, DAY).is_ok());
        s.settle("a", L, 60, 10, DAY);
        assert_eq!(s.status_now("a", DAY), SpendStatus::new(10, 40));
        assert!(s.reserve_now("a", 50, 100, DAY).is_ok());
        s.adjust("a", 10, 4, DAY);
        assert_eq!(s.status_now("a", DAY), SpendStatus::new(4, 90));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_window_keeps_open_reservations() {
        let s = MemoryStore::new();
        let w = Duration::from_secs(60);
        assert!(s.reserve_now("a", 50, 100, w).is_ok());
        s.settle("a", L, 50, 50, w);
        assert!(s.reserve_now("a", 30, 100, w).is_ok());
        tokio::time::advance(w).await;
        assert_eq!(s.status_now("a", w), SpendStatus::new(0, 30));
        assert!(s.reserve_now("a", 70, 100, w).is_ok());
        assert!(s.reserve_now("a", 1, 100, w).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_take_all_or_nothing_with_exact_waits() {
        let s = MemoryStore::new();
        let rps = RateDemand::new("requests", Duration::from_millis(500), 1, 1);
        let tpm = |n| RateDemand::new("tokens", Duration::from_millis(10), 6000, n);
        assert_eq!(s.take_now("k", &[rps, tpm(5000)]), Ok(()));
        // The request bucket is empty for 500 ms; the token bucket needs 3000 more tokens (30 s).
        assert_eq!(
            s.take_now("k", &[rps, tpm(4000)]),
            Err(Duration::from_secs(30))
        );
        tokio::time::advance(Duration::from_millis(500)).await;
        // Nothing was taken by the refusal: 1000 tokens + 5 s worth are there.
        assert_eq!(s.take_now("k", &[rps, tpm(1050)]), Ok(()));
        assert_eq!(s.take_now("other", &[rps]), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_demands_wait_for_a_full_bucket() {
        let s = MemoryStore::new();
        let big = RateDemand::new("tokens", Duration::from_millis(10), 100, 1_000_000);
        assert_eq!(s.take_now("k", &[big]), Ok(()));
        assert_eq!(s.take_now("k", &[big]), Err(Duration::from_secs(1)));
    }
}
