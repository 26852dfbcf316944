//! Header-driven pacing: a route that reported zero remaining requests or tokens is paused
//! until its reset, instead of being sent requests that can only end in a 429.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use tokio::time::Instant;

use crate::classify::hints::rate_limit_status;
use crate::route::RouteName;

/// Paused routes and until when: `BudgetLayer`'s pacing state. It is handed to `FallbackLayer`
/// through the request context, so that every route's answer is noted and a hop keeps off a
/// route that is paused, as admission keeps a new request off it.
#[derive(Debug, Default)]
pub(crate) struct Pacer {
    paused: Mutex<HashMap<RouteName, Instant>>,
}

impl Pacer {
    /// Notes the rate-limit headers of a response from `route`.
    pub(crate) fn observe(&self, route: &RouteName, headers: &HeaderMap) {
        let Some(pause) = exhausted_for(headers, SystemTime::now()) else {
            return;
        };
        let until = crate::duration::saturating_add(Instant::now(), pause);
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        paused.retain(|_, t| *t > now);
        let entry = paused.entry(route.clone()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Time until `route` may be sent to again, if it is paused.
    pub(crate) fn remaining(&self, route: &RouteName) -> Option<Duration> {
        let paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let until = *paused.get(route)?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }
}

/// How long the provider said its capacity is exhausted: the longest reset among the windows
/// it reported at zero remaining (see [`rate_limit_status`]); `None` when nothing is exhausted
/// or the reset is unusable or already past.
pub(crate) fn exhausted_for(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    rate_limit_status(headers, now)
        .pause()
        .filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn openai_style_zero_remaining() {
        let now = SystemTime::UNIX_EPOCH;
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "5s"),
            ("x-ratelimit-remaining-tokens", "1200"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(exhausted_for(&h, now), Some(Duration::from_secs(5)));
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "5s"),
        ]);
        assert_eq!(exhausted_for(&h, now), None);
        // Azure's -1 means "no limit"; garbage resets are ignored.
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-reset-requests", "5s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "soon"),
        ]);
        assert_eq!(exhausted_for(&h, now), None);
    }

    #[test]
    fn anthropic_style_reset_times() {
        let h = headers(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2025-08-21T12:41:09Z"),
            ("date", "Thu, 21 Aug 2025 12:40:59 GMT"),
        ]);
        // Judged against the response's Date, not the local clock.
        assert_eq!(
            exhausted_for(&h, SystemTime::UNIX_EPOCH),
            Some(Duration::from_secs(10))
        );
        let past = headers(&[
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2020-01-01T00:00:00Z"),
            ("date", "Thu, 21 Aug 2025 12:40:59 GMT"),
        ]);
        assert_eq!(exhausted_for(&past, SystemTime::UNIX_EPOCH), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_route_resumes_at_its_reset() {
        let pacer = Pacer::default();
        let (a, b) = (RouteName::new("a"), RouteName::new("b"));
        pacer.observe(
            &a,
            &headers(&[
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "1m30s"),
            ]),
        );
        assert_eq!(pacer.remaining(&a), Some(Duration::from_secs(90)));
        assert_eq!(pacer.remaining(&b), None);
        // A shorter pause reported later does not shorten the one in force.
        pacer.observe(
            &a,
            &headers(&[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "1s"),
            ]),
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(pacer.remaining(&a), Some(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(pacer.remaining(&a), None);
    }
}
