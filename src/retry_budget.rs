//! The retry budget: how much recovery the whole service may spend, shared by every request.
//!
//! Every logical request deposits; every retry and every fallback hop withdraws. When the
//! budget is empty, the retry (or hop) is denied and the denial is logged — under a full outage
//! the load the service sends stays close to the load it receives.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_resilience::RetryBudget;
//! use tower_llm_resilience::policy::RetryBudgetPolicy;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_llm_resilience::PolicyError> {
//! // 10 % of requests, no floor.
//! let budget = RetryBudget::new(&RetryBudgetPolicy::Ratio {
//!     ratio: 0.1,
//!     min_per_sec: 0,
//!     ttl: Duration::from_secs(10),
//! })?;
//! for _ in 0..50 {
//!     budget.deposit();
//! }
//! let granted = (0..50).filter(|_| budget.withdraw()).count();
//! assert_eq!(granted, 5);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::policy::{PolicyError, RetryBudgetPolicy};

/// One retry's worth of budget, in fixed-point units so fractional ratios are exact.
const UNIT: u64 = 1_000_000;
const SLOTS: usize = 10;

/// A shared retry budget. Clones share one budget.
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Mutex<State>>,
}

enum State {
    Ratio(Ratio),
    Bucket(Bucket),
}

/// Deposits and withdrawals in a ring of time slots covering `ttl`; old slots age out.
struct Ratio {
    deposit: u64,
    reserve: u64,
    slot_len: Duration,
    slots: [(u64, u64); SLOTS],
    current: usize,
    current_start: Instant,
}

/// Token counts in the same fixed-point units, so that fractional deposits add up exactly.
struct Bucket {
    capacity: u64,
    refill_per_sec: u64,
    per_request: u64,
    tokens: u64,
    last: Instant,
    // Refill not yet worth a whole unit: (nanoseconds × units per second) mod 10^9.
    carry: u128,
}

impl RetryBudget {
    /// A budget as the policy describes; invalid values are a [`PolicyError`].
    pub fn new(policy: &RetryBudgetPolicy) -> Result<Self, PolicyError> {
        policy.validate()?;
        let state = match *policy {
            RetryBudgetPolicy::Ratio {
                ratio,
                min_per_sec,
                ttl,
            } => {
                // Cut to a millionth (never rounded up, so never over-allocated), then exact
                // integer arithmetic from here on.
                let deposit = fixed(ratio);
                let reserve = u64::from(min_per_sec)
                    .saturating_mul(ttl.as_millis() as u64)
                    .saturating_mul(UNIT / 1000);
                State::Ratio(Ratio {
                    deposit,
                    reserve,
                    slot_len: (ttl / SLOTS as u32).max(Duration::from_millis(1)),
                    slots: [(0, 0); SLOTS],
                    current: 0,
                    current_start: Instant::now(),
                })
            }
            RetryBudgetPolicy::TokenBucket {
                capacity,
                refill_per_sec,
                per_request,
            } => State::Bucket(Bucket {
                capacity: u64::from(capacity) * UNIT,
                refill_per_sec: fixed(refill_per_sec),
                per_request: fixed(per_request),
                tokens: u64::from(capacity) * UNIT,
                last: Instant::now(),
                carry: 0,
            }),
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(state)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A logical request arrived: add its share.
    pub fn deposit(&self) {
        match &mut *self.lock() {
            State::Ratio(r) => {
                r.rotate();
                r.slots[r.current].0 += r.deposit;
            }
            State::Bucket(b) => {
                b.refill();
                b.tokens = b.tokens.saturating_add(b.per_request).min(b.capacity);
            }
        }
    }

    /// Takes one retry (or hop) from the budget; `false` when it is empty.
    pub fn withdraw(&self) -> bool {
        match &mut *self.lock() {
            State::Ratio(r) => {
                r.rotate();
                if r.balance() >= UNIT {
                    r.slots[r.current].1 += UNIT;
                    true
                } else {
                    false
                }
            }
            State::Bucket(b) => {
                b.refill();
                if b.tokens >= UNIT {
                    b.tokens -= UNIT;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Gives back one withdrawal whose retry (or hop) was never sent: an open circuit refused
    /// it, readiness failed, or the request was dropped while it waited. Never raises the
    /// budget above what it would hold had the withdrawal not happened.
    pub fn refund(&self) {
        match &mut *self.lock() {
            State::Ratio(r) => {
                r.rotate();
                // Undo the newest withdrawal still in the window; one that aged out is gone.
                let newest = (0..SLOTS)
                    .map(|back| (r.current + SLOTS - back) % SLOTS)
                    .find(|&i| r.slots[i].1 >= UNIT);
                if let Some(i) = newest {
                    r.slots[i].1 -= UNIT;
                }
            }
            State::Bucket(b) => {
                b.refill();
                b.tokens = b.tokens.saturating_add(UNIT).min(b.capacity);
            }
        }
    }

    /// Retries the budget would allow right now.
    pub fn available(&self) -> u64 {
        match &mut *self.lock() {
            State::Ratio(r) => {
                r.rotate();
                r.balance() / UNIT
            }
            State::Bucket(b) => {
                b.refill();
                b.tokens / UNIT
            }
        }
    }
}

impl Ratio {
    fn rotate(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.current_start);
        let steps = (elapsed.as_nanos() / self.slot_len.as_nanos()) as usize;
        if steps == 0 {
            return;
        }
        for _ in 0..steps.min(SLOTS) {
            self.current = (self.current + 1) % SLOTS;
            self.slots[self.current] = (0, 0);
        }
        self.current_start += self.slot_len * steps.min(u32::MAX as usize) as u32;
    }

    fn balance(&self) -> u64 {
        let (dep, wd) = self
            .slots
            .iter()
            .fold((0u64, 0u64), |(d, w), (sd, sw)| (d + sd, w + sw));
        (self.reserve + dep).saturating_sub(wd)
    }
}

impl Bucket {
    fn refill(&mut self) {
        const NANOS_PER_SEC: u128 = 1_000_000_000;
        let now = Instant::now();
        let nanos = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        let total = nanos
            .saturating_mul(u128::from(self.refill_per_sec))
            .saturating_add(self.carry);
        let added = u64::try_from(total / NANOS_PER_SEC).unwrap_or(u64::MAX);
        self.carry = total % NANOS_PER_SEC;
        self.tokens = self.tokens.saturating_add(added).min(self.capacity);
        if self.tokens == self.capacity {
            self.carry = 0;
        }
    }
}

/// A validated, finite, non-negative amount in fixed-point units, cut (never rounded up) to a
/// millionth; the tiny offset absorbs binary representation error (`0.2 × 10^6` is
/// `200000.00000000003`, `0.29 × 10^6` is `289999.99999999994`).
fn fixed(v: f64) -> u64 {
    let units = (v * UNIT as f64 + 1e-6).floor();
    if units >= u64::MAX as f64 {
        u64::MAX
    } else {
        units.max(0.0) as u64
    }
}

impl Default for RetryBudget {
    /// 20 % of requests plus 10 per second over 10 s.
    fn default() -> Self {
        match Self::new(&RetryBudgetPolicy::default()) {
            Ok(b) => b,
            Err(e) => unreachable!("the default retry budget is valid: {e}"),
        }
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("available", &self.available())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(ratio: f64, min_per_sec: u32, ttl_s: u64) -> RetryBudget {
        RetryBudget::new(&RetryBudgetPolicy::Ratio {
            ratio,
            min_per_sec,
            ttl: Duration::from_secs(ttl_s),
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_allows_share_plus_floor() {
        let b = ratio(0.2, 10, 10);
        for _ in 0..1000 {
            b.deposit();
        }
        let granted = (0..1000).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 200 + 100);
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_ratio_is_exact() {
        let b = ratio(0.1, 0, 10);
        for _ in 0..30 {
            b.deposit();
        }
        assert_eq!((0..10).filter(|_| b.withdraw()).count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refund_gives_back_exactly_one_withdrawal() {
        let b = ratio(0.0, 1, 10);
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        b.refund();
        assert_eq!(b.available(), 1);
        assert!(b.withdraw());
        assert!(!b.withdraw());
        // Nothing withdrawn in the window: a refund adds nothing.
        let fresh = ratio(0.0, 1, 10);
        fresh.refund();
        assert_eq!(fresh.available(), 10);
        // A withdrawal that aged out is not refunded into the new window.
        assert!(fresh.withdraw());
        tokio::time::advance(Duration::from_secs(11)).await;
        fresh.refund();
        assert_eq!(fresh.available(), 10);

        let bucket = RetryBudget::new(&RetryBudgetPolicy::TokenBucket {
            capacity: 2,
            refill_per_sec: 0.0,
            per_request: 0.0,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(bucket.withdraw());
        bucket.refund();
        bucket.refund();
        assert_eq!(bucket.available(), 2, "never above capacity");
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_age_out() {
        let b = ratio(1.0, 0, 10);
        for _ in 0..5 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!b.withdraw());
        assert_eq!(b.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket_refills_to_capacity() {
        let b = RetryBudget::new(&RetryBudgetPolicy::TokenBucket {
            capacity: 3,
            refill_per_sec: 1.0,
            per_request: 0.0,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((0..5).filter(|_| b.withdraw()).count(), 3);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!((0..5).filter(|_| b.withdraw()).count(), 2);
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(b.available(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_bucket_deposits_add_up_exactly() {
        let b = RetryBudget::new(&RetryBudgetPolicy::TokenBucket {
            capacity: 1,
            refill_per_sec: 0.0,
            per_request: 0.1,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(b.withdraw());
        for _ in 0..9 {
            b.deposit();
        }
        assert!(!b.withdraw());
        // The tenth tenth makes a whole retry (in floating point it would be 0.999…).
        b.deposit();
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_refill_is_exact_over_time() {
        let b = RetryBudget::new(&RetryBudgetPolicy::TokenBucket {
            capacity: 10,
            refill_per_sec: 0.3,
            per_request: 0.0,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((0..10).filter(|_| b.withdraw()).count(), 10);
        // 0.3 per second in steps of 1 ms: no refill is lost between small steps.
        for _ in 0..9999 {
            tokio::time::advance(Duration::from_millis(1)).await;
            b.available();
        }
        assert_eq!(b.available(), 2);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.available(), 3);
    }

    #[test]
    fn ratios_are_cut_never_rounded_up() {
        assert_eq!(fixed(0.2), 200_000);
        assert_eq!(fixed(0.29), 290_000);
        assert_eq!(fixed(0.1234567), 123_456);
        assert_eq!(fixed(1.0), UNIT);
        assert_eq!(fixed(f64::MAX), u64::MAX);
    }

    #[test]
    fn invalid_values_are_policy_errors() {
        let e = RetryBudget::new(&RetryBudgetPolicy::Ratio {
            ratio: 1.5,
            min_per_sec: 1,
            ttl: Duration::from_secs(1),
        })
        .err();
        assert_eq!(
            e.map(|e| e.field().to_owned()).as_deref(),
            Some("budget.retry_budget.ratio")
        );
    }
}
