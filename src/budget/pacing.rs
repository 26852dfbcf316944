//! Header-driven pacing: a route that reported zero remaining requests or tokens is paused
//! until its reset, instead of being sent requests that can only end in a 429.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use tokio::time::Instant;

use crate::classify::hints::MAX_HINT;
use crate::context::RouteName;

/// Paused routes and until when.
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
        let until = Instant::now() + pause;
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

/// How long the provider said its capacity is exhausted: the longest reset among the limits
/// it reported at zero remaining (`x-ratelimit-remaining-{requests,tokens}: 0` with
/// `x-ratelimit-reset-*` durations; `anthropic-ratelimit-*-remaining: 0` with RFC 3339 `-reset`
/// times, judged against the response's `Date` when present). Garbage yields `None`.
// One function, so that the shared header helper of the classifier can replace it.
pub(crate) fn exhausted_for(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let zero = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
            == Some(0)
    };
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mut longest: Option<Duration> = None;
    let mut note = |d: Option<Duration>| {
        if let Some(d) = d.filter(|d| !d.is_zero() && *d <= MAX_HINT) {
            longest = Some(longest.map_or(d, |l| l.max(d)));
        }
    };
    for kind in ["requests", "tokens"] {
        if zero(&format!("x-ratelimit-remaining-{kind}")) {
            note(text(&format!("x-ratelimit-reset-{kind}")).and_then(crate::duration::parse));
        }
    }
    let reference = text("date")
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .unwrap_or(now);
    for kind in ["requests", "tokens", "input-tokens", "output-tokens"] {
        if zero(&format!("anthropic-ratelimit-{kind}-remaining")) {
            note(
                text(&format!("anthropic-ratelimit-{kind}-reset"))
                    .and_then(parse_rfc3339)
                    .and_then(|at| at.duration_since(reference).ok()),
            );
        }
    }
    longest
}

/// Parses `2025-08-21T12:40:59Z`, with optional fractional seconds and a `±HH:MM` offset.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim().as_bytes();
    if s.len() < 20 || !s.is_ascii() {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    if s[4] != b'-' || s[7] != b'-' || !matches!(s[10], b'T' | b't' | b' ') || s[13] != b':' {
        return None;
    }
    if s[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u64;
    if s.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u64::from(s[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start).min(9)..9 {
            nanos *= 10;
        }
    }
    let offset = match s.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let h = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let m = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if h > 23 || m > 59 {
                return None;
            }
            let o = h * 3600 + m * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos as u32))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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
    fn rfc3339_times() {
        let t = |s| parse_rfc3339(s).and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(Duration::ZERO));
        assert_eq!(
            t("2025-08-21T12:40:59Z"),
            Some(Duration::from_secs(1_755_780_059))
        );
        assert_eq!(
            t("2025-08-21T14:40:59.25+02:00"),
            Some(Duration::from_millis(1_755_780_059_250))
        );
        for bad in [
            "",
            "2025-13-01T00:00:00Z",
            "2025-08-21 12:40:59",
            "2025-08-21T12:40:59+2:00",
            "1969-12-31T23:59:59Z",
            "2025-08-21T12:40:59.Z",
            "２０２５-08-21T12:40:59Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
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
}
