use std::collections::BTreeMap;
use std::time::Duration;

use super::error::{PolicyError, check};
use crate::classify::FailureClass;

/// How the wait before a retry is spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Jitter {
    /// Uniform in `[0, exp)` — spreads a herd best (the default).
    #[default]
    Full,
    /// `exp / 2` plus uniform in `[0, exp / 2)`.
    Equal,
    /// Uniform in `[base, 3 × previous wait)`, capped.
    Decorrelated,
    /// Exactly `exp`.
    None,
}

/// Exponential backoff: `min(cap, base × 2^retry)`, spread by the jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct BackoffPolicy {
    /// Jitter strategy.
    pub jitter: Jitter,
    /// The wait before the first retry, before jitter.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub base: Duration,
    /// The largest wait the backoff produces (a server's Retry-After is judged against
    /// [`RetryPolicy::max_server_wait`] instead).
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub cap: Duration,
}

impl Default for BackoffPolicy {
    /// 500 ms base, 8 s cap (the official SDKs' curve), full jitter: the SDKs shorten each
    /// wait by at most a quarter, which keeps a herd of clients that failed together close
    /// together; full jitter spreads it over the whole wait.
    fn default() -> Self {
        Self {
            jitter: Jitter::Full,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
        }
    }
}

impl BackoffPolicy {
    /// A backoff curve with full jitter.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self {
            jitter: Jitter::Full,
            base,
            cap,
        }
    }

    /// The same curve with another jitter.
    pub const fn jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    pub(crate) fn validate(&self, field: &str) -> Result<(), PolicyError> {
        check::positive(&format!("{field}.base"), self.base)?;
        check::ordered(
            &format!("{field}.base"),
            self.base,
            &format!("{field}.cap"),
            self.cap,
        )
    }
}

/// Same-route retries: the first rung of the ladder.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts per route, the first included (`1` disables retries).
    pub max_attempts: u32,
    /// The default backoff curve.
    pub backoff: BackoffPolicy,
    /// Backoff curves for particular classes (e.g. a longer base for rate limits).
    pub per_class: BTreeMap<FailureClass, BackoffPolicy>,
    /// The longest server-requested wait (Retry-After and friends) the layer will honour; a
    /// longer one means "do not retry this route" so that a fallback can act.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub max_server_wait: Duration,
    /// Bound on the time to a committed response across all attempts on the route, the attempt
    /// in flight included. The layer never sleeps past it; a deadline from `BudgetLayer`
    /// tightens it further. Under the stream commit point `end` the committed response is the
    /// whole stream, so keep this at least the stream's `total_timeout`.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub max_elapsed: Duration,
    /// Header carrying the attempt number (0 for the first) on every attempt, e.g.
    /// `x-stainless-retry-count`; none when unset.
    pub attempt_header: Option<String>,
    /// Seed for the jitter source: the same seed gives the same waits. Random when unset.
    pub seed: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: BackoffPolicy::default(),
            per_class: BTreeMap::from([(
                FailureClass::RateLimited,
                BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(8)),
            )]),
            max_server_wait: Duration::from_secs(20),
            max_elapsed: Duration::from_secs(60),
            attempt_header: None,
            seed: None,
        }
    }
}

impl RetryPolicy {
    /// The backoff curve for `class`.
    pub fn backoff_for(&self, class: FailureClass) -> &BackoffPolicy {
        self.per_class.get(&class).unwrap_or(&self.backoff)
    }

    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        check::at_least_one("retry.max_attempts", self.max_attempts.into())?;
        self.backoff.validate("retry.backoff")?;
        for (class, b) in &self.per_class {
            b.validate(&format!("retry.per_class.{class}"))?;
        }
        check::positive("retry.max_server_wait", self.max_server_wait)?;
        check::positive("retry.max_elapsed", self.max_elapsed)?;
        if let Some(h) = &self.attempt_header {
            check::header_name("retry.attempt_header", h)?;
        }
        Ok(())
    }
}
