use std::time::Duration;

use super::error::{PolicyError, check};

/// Hedging the slow tail (the `[hedge]` section): when a request's first attempt has not
/// reached its commit point (its first token, for a stream) after a delay, one more attempt
/// starts, on the next route the request may use (or the same route); the first to reach its
/// commit point is served and the other is cancelled before any byte of it reaches the caller.
///
/// A slow answer is not a failure — no retry starts for it — but the user has left by the
/// time a first token comes after 20 s. A hedge buys the tail back for a bounded number of
/// extra attempts: at most `max_fraction` of requests are hedged (a bucket each request adds
/// `max_fraction` to, holding at most ten hedges, so that a few slow requests close together
/// are all hedged), each hedge withdraws from the retry budget, a request that is not safe to send
/// twice (a non-idempotent method without an idempotency key) is never hedged, nor one whose
/// attempts so far include a failure no route may be switched for.
///
/// Off in the presets: turn it on where the outage simulator or your own figures show that it
/// pays (see BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct HedgePolicy {
    /// Hedge at all.
    pub enabled: bool,
    /// A fixed delay before the hedge. When `None`, the delay is the `percentile` of the
    /// route's observed times to first token, within `min_delay` and `max_delay` (`max_delay`
    /// until the route has `min_samples` of them).
    #[cfg_attr(
        feature = "serde",
        serde(with = "crate::duration::serde_duration::option")
    )]
    pub delay: Option<Duration>,
    /// The percentile of observed times to first token the delay is set at (above 0, below 1).
    pub percentile: f64,
    /// The shortest delay a percentile may give.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub min_delay: Duration,
    /// The longest delay a percentile may give, and the delay before `min_samples`.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub max_delay: Duration,
    /// Observed times a route needs before its percentile is used.
    pub min_samples: u32,
    /// Hedge on the same route rather than the next one.
    pub same_route: bool,
    /// The most hedges per request, as a fraction (above 0, at most 1).
    pub max_fraction: f64,
}

impl Default for HedgePolicy {
    /// Off; when enabled: the 97th percentile of time to first token, between 250 ms and 10 s,
    /// after 20 observations, on the next route, for at most 10 % of requests. (At the 95th,
    /// with 5 % of calls slow, the outage simulator's hedges came to 10 % of requests, the
    /// most the target allows; see BENCHMARKS.md.)
    fn default() -> Self {
        Self {
            enabled: false,
            delay: None,
            percentile: 0.97,
            min_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(10),
            min_samples: 20,
            same_route: false,
            max_fraction: 0.1,
        }
    }
}

impl HedgePolicy {
    /// Hedging on, after a fixed `delay`.
    pub fn after(delay: Duration) -> Self {
        Self {
            enabled: true,
            delay: Some(delay),
            ..Self::default()
        }
    }

    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(d) = self.delay {
            check::positive("hedge.delay", d)?;
        }
        if !(self.percentile > 0.0 && self.percentile < 1.0) {
            return Err(PolicyError::new(
                "hedge.percentile",
                format!("must be above 0 and below 1, got {}", self.percentile),
            ));
        }
        check::positive("hedge.min_delay", self.min_delay)?;
        if self.max_delay < self.min_delay {
            return Err(PolicyError::new(
                "hedge.max_delay",
                format!(
                    "must be at least hedge.min_delay ({:?}), got {:?}",
                    self.min_delay, self.max_delay
                ),
            ));
        }
        check::at_least_one("hedge.min_samples", self.min_samples.into())?;
        if !(self.max_fraction > 0.0 && self.max_fraction <= 1.0) {
            return Err(PolicyError::new(
                "hedge.max_fraction",
                format!("must be above 0 and at most 1, got {}", self.max_fraction),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_field() {
        let ok = HedgePolicy::after(Duration::from_millis(500));
        assert!(ok.validate().is_ok());
        let cases: [(HedgePolicy, &str); 6] = [
            (
                HedgePolicy {
                    delay: Some(Duration::ZERO),
                    ..ok
                },
                "hedge.delay",
            ),
            (
                HedgePolicy {
                    percentile: 1.0,
                    ..ok
                },
                "hedge.percentile",
            ),
            (
                HedgePolicy {
                    percentile: f64::NAN,
                    ..ok
                },
                "hedge.percentile",
            ),
            (
                HedgePolicy {
                    max_delay: Duration::from_millis(100),
                    ..ok
                },
                "hedge.max_delay",
            ),
            (
                HedgePolicy {
                    min_samples: 0,
                    ..ok
                },
                "hedge.min_samples",
            ),
            (
                HedgePolicy {
                    max_fraction: 0.0,
                    ..ok
                },
                "hedge.max_fraction",
            ),
        ];
        for (p, field) in cases {
            assert_eq!(p.validate().unwrap_err().field(), field);
        }
    }
}
