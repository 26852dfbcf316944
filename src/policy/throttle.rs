use std::time::Duration;

use super::error::{PolicyError, check};

/// The longest outage a request may wait out: past a minute it is an incident, not a blip.
const MAX_HOLD: Duration = Duration::from_secs(60);

/// Client-side adaptive throttling of a route a request has no backup for (the
/// `circuit_breaker.throttle` sub-section).
///
/// Per route, over a sliding window, the breaker counts the calls that ended (`requests`; a call
/// the throttle turns away is not one) and those the provider accepted (`accepts`: anything but a
/// failure that counts for the breaker or a rate limit), and turns a new call away with
/// probability `max(0, (requests − k × accepts) / (requests + 1))` (Google SRE book, "Handling
/// Overload"). A healthy route is never throttled, a route that answers half its calls with
/// `k = 2` hardly, a route that is down sheds nearly all of them; as soon as calls succeed again
/// the probability falls; a call in flight longer than every refusal of the window took
/// counts as accepted until it ends (or is a window old), so a recovery is seen a refusal's time
/// after it. Nothing
/// is turned away while the window holds fewer than `min_requests` requests: that floor keeps
/// sending a route that is down a few calls per window, so its recovery is seen at once, and
/// keeps one early failure from throttling a route that has seen no answer yet. While the
/// route's outage is younger than `hold`, a request waits it out instead of failing.
///
/// With a backup route the breaker fails fast instead, so that the fallback moves on.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct ThrottlePolicy {
    /// How many calls per accepted call the route may be sent before any is turned away;
    /// at least 1. 2 lets a route that answers half its calls keep all of them.
    pub k: f64,
    /// Length of the sliding window; old counts age out bucket by bucket.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub window: Duration,
    /// Number of time buckets the window is divided into.
    pub buckets: u32,
    /// Requests the window must hold before any call is turned away: the floor of calls a
    /// route that is down is still sent per window (so at least `min_requests / window` a
    /// second), which sees its recovery at once. Each bucket lets its share through
    /// (`min_requests / buckets`, when that is at least one), so the floor's calls are spread
    /// over the window. At least 1.
    pub min_requests: u32,
    /// How young an outage is waited out (`0s`: never). While the route has been refusing
    /// calls for less than this (since the last call it accepted), a call the throttle turns
    /// away is not failed: the [`RetryLayer`](crate::retry::RetryLayer) holds it and asks the
    /// throttle again each time the window moves, until the route answers, the outage gets
    /// older than `hold` or the request's deadline comes. A call let through while the
    /// request waits that the route refuses again (with a failure its class's rule would
    /// retry, and replay allowed) sends it back to waiting without using up one of its
    /// `max_attempts`: the throttle's floor, not the retry policy, bounds those calls, within
    /// the chain's `fallback.max_total_attempts` (under a spend cap they are ordinary retries,
    /// which the cap reserves). Each refusal while the
    /// request waits is a `Throttled` event in its log. Most outages of a model API are blips
    /// of a few seconds, which a request that waits rides out the way a backoff does; an
    /// outage older than `hold` fails fast, so a route that is down for good is not sent more
    /// than the floor. At most 60 s.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub hold: Duration,
}

impl Default for ThrottlePolicy {
    /// `k` 2 over 1 s in 10 buckets, never below 10 requests in the window, outages younger
    /// than 5 s waited out: the interactive preset's values, tuned in the outage simulator
    /// (see BENCHMARKS.md).
    fn default() -> Self {
        Self {
            k: 2.0,
            window: Duration::from_secs(1),
            buckets: 10,
            min_requests: 10,
            hold: Duration::from_secs(5),
        }
    }
}

impl ThrottlePolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !self.k.is_finite() || self.k < 1.0 {
            return Err(PolicyError::new(
                "circuit_breaker.throttle.k",
                format!(
                    "must be a number of at least 1 (below 1 even a healthy route is throttled), got {}",
                    self.k
                ),
            ));
        }
        check::positive("circuit_breaker.throttle.window", self.window)?;
        check::at_least_one("circuit_breaker.throttle.buckets", self.buckets.into())?;
        if self.buckets > 1000 {
            return Err(PolicyError::new(
                "circuit_breaker.throttle.buckets",
                "must be at most 1000",
            ));
        }
        check::at_least_one(
            "circuit_breaker.throttle.min_requests",
            self.min_requests.into(),
        )?;
        if self.hold > MAX_HOLD {
            return Err(PolicyError::new(
                "circuit_breaker.throttle.hold",
                format!("must be at most 60s, got {:?}", self.hold),
            ));
        }
        Ok(())
    }
}
