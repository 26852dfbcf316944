use std::time::Duration;

use super::error::{PolicyError, check};
use super::throttle::ThrottlePolicy;

/// Trip when the share of failed calls over a sliding window reaches a threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct FailureRateRule {
    /// Failure share that trips the breaker, in `0..=1`.
    pub threshold: f64,
    /// Length of the sliding window; old outcomes age out bucket by bucket.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub window: Duration,
    /// Number of time buckets the window is divided into.
    pub buckets: u32,
    /// Calls the window must hold before the rate is judged (at each failure recorded; a
    /// success never trips the breaker).
    pub min_calls: u32,
}

impl Default for FailureRateRule {
    /// 50 % over 60 s in 12 buckets, once 10 calls are seen: suited to model traffic, where
    /// calls are slow and few.
    fn default() -> Self {
        Self {
            threshold: 0.5,
            window: Duration::from_secs(60),
            buckets: 12,
            min_calls: 10,
        }
    }
}

/// Trip when too many calls are slow (latency to the response head or first token).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct SlowCallRule {
    /// A call slower than this is slow.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub threshold: Duration,
    /// Slow share (over the failure-rate window) that trips the breaker, in `0..=1`.
    pub rate: f64,
}

impl SlowCallRule {
    /// Slow above `threshold`, tripping at `rate`.
    pub const fn new(threshold: Duration, rate: f64) -> Self {
        Self { threshold, rate }
    }
}

/// Per-route circuit breakers.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct CircuitBreakerPolicy {
    /// Failure-rate rule; disabled when `None`.
    pub failure_rate: Option<FailureRateRule>,
    /// Trip after this many consecutive failures; disabled when `None`.
    ///
    /// The rule detects an outage within a few calls. Failures end sooner than successes (a 503
    /// in milliseconds, an answer in seconds), so on a busy route the calls that end in a row
    /// are failures more often than the failure rate says; a short run (five, say) then trips
    /// by chance at 30 % failures, and each trip fails fast for the open time. The default of
    /// 10 keeps such trips out of reach below 50 %; `None` leaves a route to `failure_rate`
    /// alone, which is slower to see an outage that starts after a healthy spell (the outage
    /// simulator in the benchmarks shows both).
    pub consecutive_failures: Option<u32>,
    /// Slow-call rule; disabled when `None`.
    pub slow_call: Option<SlowCallRule>,
    /// Open time after the first trip; doubles with each further trip.
    ///
    /// Short on purpose: with a backup route a failed probe costs the request that carries it
    /// one fast failure before the fallback, and a recovered primary is probed within the open
    /// time of coming back.
    /// `half_open_successes` is what keeps a route that still fails often off.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub open_base: Duration,
    /// Longest open time.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub open_cap: Duration,
    /// Concurrent probes admitted while half-open.
    pub half_open_probes: u32,
    /// Probes in a row that must succeed before a half-open circuit closes; a failed probe
    /// opens it again. One good answer does not make a route that fails one call in two
    /// healthy: with the default of 5 such a route closes about once in 32 tries, while a
    /// recovered one closes after five answers (and serves each of them).
    pub half_open_successes: u32,
    /// Adaptive throttling for the requests that have no backup route (no
    /// [`FallbackAvailable`](crate::context::FallbackAvailable)): instead of failing every call
    /// while the circuit is open, the breaker turns calls away in proportion to how many the
    /// provider refuses. `None`: such requests fail fast on an open circuit like the others.
    pub throttle: Option<ThrottlePolicy>,
}

impl Default for CircuitBreakerPolicy {
    fn default() -> Self {
        Self {
            failure_rate: Some(FailureRateRule::default()),
            consecutive_failures: Some(10),
            slow_call: None,
            open_base: Duration::from_millis(300),
            open_cap: Duration::from_millis(600),
            half_open_probes: 2,
            half_open_successes: 5,
            throttle: Some(ThrottlePolicy::default()),
        }
    }
}

impl CircuitBreakerPolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(r) = &self.failure_rate {
            check::ratio("circuit_breaker.failure_rate.threshold", r.threshold)?;
            if r.threshold == 0.0 {
                return Err(PolicyError::new(
                    "circuit_breaker.failure_rate.threshold",
                    "must be greater than zero (0 would keep the breaker open)",
                ));
            }
            check::positive("circuit_breaker.failure_rate.window", r.window)?;
            check::at_least_one("circuit_breaker.failure_rate.buckets", r.buckets.into())?;
            if r.buckets > 1000 {
                return Err(PolicyError::new(
                    "circuit_breaker.failure_rate.buckets",
                    "must be at most 1000",
                ));
            }
            check::at_least_one("circuit_breaker.failure_rate.min_calls", r.min_calls.into())?;
        }
        if let Some(n) = self.consecutive_failures {
            check::at_least_one("circuit_breaker.consecutive_failures", n.into())?;
        }
        if let Some(s) = &self.slow_call {
            check::positive("circuit_breaker.slow_call.threshold", s.threshold)?;
            check::ratio("circuit_breaker.slow_call.rate", s.rate)?;
            if s.rate == 0.0 {
                return Err(PolicyError::new(
                    "circuit_breaker.slow_call.rate",
                    "must be greater than zero",
                ));
            }
            if self.failure_rate.is_none() {
                return Err(PolicyError::new(
                    "circuit_breaker.slow_call",
                    "needs `failure_rate` for its window and minimum calls",
                ));
            }
        }
        check::positive("circuit_breaker.open_base", self.open_base)?;
        check::ordered(
            "circuit_breaker.open_base",
            self.open_base,
            "circuit_breaker.open_cap",
            self.open_cap,
        )?;
        check::at_least_one(
            "circuit_breaker.half_open_probes",
            self.half_open_probes.into(),
        )?;
        check::at_least_one(
            "circuit_breaker.half_open_successes",
            self.half_open_successes.into(),
        )?;
        match &self.throttle {
            Some(t) => t.validate(),
            None => Ok(()),
        }
    }
}
