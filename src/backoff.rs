//! Backoff curves and jitter, shared by every layer that waits.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_resilience::backoff::{JitterSource, NextWait, next_wait};
//! use tower_llm_resilience::policy::BackoffPolicy;
//!
//! let curve = BackoffPolicy::new(Duration::from_millis(500), Duration::from_secs(8));
//! let jitter = JitterSource::seeded(42);
//! let cap = Duration::from_secs(20);
//!
//! // The server asked for 2 s: never sooner, a little jitter on top.
//! match next_wait(&curve, 0, None, Some(Duration::from_secs(2)), cap, &jitter) {
//!     NextWait::Wait { wait, .. } => assert!(wait >= Duration::from_secs(2)),
//!     NextWait::AboveCap { .. } => unreachable!(),
//! }
//! // An hour is beyond the cap: do not retry this route.
//! let hour = Some(Duration::from_secs(3600));
//! assert!(matches!(next_wait(&curve, 0, None, hour, cap, &jitter), NextWait::AboveCap { .. }));
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::duration::ceil_millis;
use crate::policy::{BackoffPolicy, Jitter};

/// A seedable source of jitter; the same seed gives the same sequence of waits.
///
/// Clones share one generator.
#[derive(Clone)]
pub struct JitterSource(Arc<Mutex<SmallRng>>);

impl JitterSource {
    /// A generator seeded with `seed`: deterministic, for tests and reproducible simulations.
    pub fn seeded(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(SmallRng::seed_from_u64(seed))))
    }

    /// A generator seeded from the operating system.
    pub fn from_entropy() -> Self {
        Self(Arc::new(Mutex::new(SmallRng::from_os_rng())))
    }

    /// Seeded when `seed` is set, from the operating system otherwise.
    pub fn from_seed(seed: Option<u64>) -> Self {
        seed.map_or_else(Self::from_entropy, Self::seeded)
    }

    /// A uniform sample in `[0, 1)`.
    pub fn unit(&self) -> f64 {
        let mut rng = self.0.lock().unwrap_or_else(|p| p.into_inner());
        rng.random::<f64>()
    }

    /// A uniform duration in `[lo, hi)` (`lo` when the range is empty).
    pub fn between(&self, lo: Duration, hi: Duration) -> Duration {
        if hi <= lo {
            return lo;
        }
        lo + (hi - lo).mul_f64(self.unit())
    }
}

impl fmt::Debug for JitterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JitterSource")
    }
}

/// Where a wait before the next attempt came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum WaitSource {
    /// The policy's backoff curve.
    Backoff,
    /// The server's hint (Retry-After and friends), with jitter on top.
    Server,
    /// Waiting out a young outage of a route with no backup: until its throttle's window
    /// moves on (see [`ThrottlePolicy::hold`](crate::policy::ThrottlePolicy::hold)).
    Throttle,
}

/// The wait before the next attempt, or why there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextWait {
    /// Wait this long.
    Wait {
        /// The wait.
        wait: Duration,
        /// Backoff curve or server hint.
        source: WaitSource,
    },
    /// The server asked for longer than the cap: do not retry this route.
    AboveCap {
        /// What the server asked for.
        hint: Duration,
    },
}

/// The backoff before retry number `retry` (0 for the first retry) on `curve`.
///
/// `previous` is the last wait (for decorrelated jitter). Never exceeds `curve.cap`.
pub fn backoff(
    curve: &BackoffPolicy,
    retry: u32,
    previous: Option<Duration>,
    jitter: &JitterSource,
) -> Duration {
    let exp = curve
        .base
        .checked_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(Duration::MAX)
        .min(curve.cap);
    match curve.jitter {
        Jitter::None => exp,
        Jitter::Full => jitter.between(Duration::ZERO, exp),
        Jitter::Equal => exp / 2 + jitter.between(Duration::ZERO, exp / 2),
        Jitter::Decorrelated => {
            let prev = previous.unwrap_or(curve.base).max(curve.base);
            let hi = prev.saturating_mul(3).min(curve.cap);
            jitter.between(curve.base.min(hi), hi)
        }
    }
}

/// The wait before the next attempt, given the server's hint.
///
/// A server hint is a floor, rounded up to the millisecond, with jitter only on top (up to a
/// fifth of the hint, never past `max_server_wait`); a hint above `max_server_wait` yields
/// [`NextWait::AboveCap`]. Without a hint the backoff curve decides. The result never exceeds
/// `max(curve.cap, max_server_wait)`.
pub fn next_wait(
    curve: &BackoffPolicy,
    retry: u32,
    previous: Option<Duration>,
    hint: Option<Duration>,
    max_server_wait: Duration,
    jitter: &JitterSource,
) -> NextWait {
    match hint {
        Some(hint) if hint > max_server_wait => NextWait::AboveCap { hint },
        Some(hint) => {
            let floor = ceil_millis(hint).min(max_server_wait.max(hint));
            let extra = jitter.between(Duration::ZERO, hint / 5);
            NextWait::Wait {
                wait: (floor + extra).min(max_server_wait.max(floor)),
                source: WaitSource::Server,
            }
        }
        None => NextWait::Wait {
            wait: backoff(curve, retry, previous, jitter),
            source: WaitSource::Backoff,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(jitter: Jitter) -> BackoffPolicy {
        BackoffPolicy::new(Duration::from_millis(500), Duration::from_secs(8)).jitter(jitter)
    }

    #[test]
    fn no_jitter_doubles_up_to_the_cap() {
        let j = JitterSource::seeded(1);
        let waits: Vec<u64> = (0..7)
            .map(|n| backoff(&curve(Jitter::None), n, None, &j).as_millis() as u64)
            .collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(
            backoff(&curve(Jitter::None), u32::MAX, None, &j),
            Duration::from_secs(8)
        );
    }

    #[test]
    fn jitter_stays_in_its_band_and_is_seedable() {
        for kind in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
            let a = JitterSource::seeded(7);
            let b = JitterSource::seeded(7);
            let mut prev = None;
            for n in 0..50 {
                let w = backoff(&curve(kind), n, prev, &a);
                assert_eq!(w, backoff(&curve(kind), n, prev, &b), "{kind:?} seeded");
                assert!(w <= Duration::from_secs(8), "{kind:?} {w:?}");
                if kind == Jitter::Equal {
                    let exp =
                        Duration::from_millis(500 * (1u64 << n.min(4))).min(Duration::from_secs(8));
                    assert!(w >= exp / 2, "{kind:?} {w:?}");
                }
                if kind == Jitter::Decorrelated {
                    assert!(w >= Duration::from_millis(500));
                }
                prev = Some(w);
            }
        }
    }

    #[test]
    fn server_hint_is_a_rounded_up_floor() {
        let j = JitterSource::seeded(3);
        let cap = Duration::from_secs(20);
        for _ in 0..100 {
            let hint = Duration::from_micros(1_500_300);
            match next_wait(&curve(Jitter::Full), 0, None, Some(hint), cap, &j) {
                NextWait::Wait { wait, source } => {
                    assert_eq!(source, WaitSource::Server);
                    assert!(wait >= Duration::from_millis(1501), "{wait:?}");
                    assert!(wait <= Duration::from_millis(1501) + hint / 5);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn hint_above_cap_means_no_retry() {
        let j = JitterSource::seeded(3);
        let w = next_wait(
            &curve(Jitter::Full),
            0,
            None,
            Some(Duration::from_secs(61)),
            Duration::from_secs(60),
            &j,
        );
        assert_eq!(
            w,
            NextWait::AboveCap {
                hint: Duration::from_secs(61)
            }
        );
    }

    #[test]
    fn hint_at_cap_never_waits_past_it() {
        let j = JitterSource::seeded(3);
        let cap = Duration::from_secs(10);
        for _ in 0..100 {
            match next_wait(&curve(Jitter::Full), 0, None, Some(cap), cap, &j) {
                NextWait::Wait { wait, .. } => assert_eq!(wait, cap),
                other => panic!("{other:?}"),
            }
        }
    }
}
