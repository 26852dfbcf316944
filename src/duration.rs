//! Go/humantime-style duration strings: `"250ms"`, `"9s"`, `"1.5s"`, `"6m0s"`, `"2m59.56s"`,
//! `"1h"`, `"0"`. One parser serves policy files and provider reset headers
//! (`x-ratelimit-reset-*`), which use the same notation.

use std::time::Duration;

/// The largest duration either source may express; anything longer is treated as garbage.
const MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// About thirty years: the stand-in for "never" when an instant plus a duration from outside
/// (a policy value, a caller's deadline) would not fit the clock.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `at + d`, or about thirty years after `at` when that overflows: a huge duration from a
/// policy or a caller means "practically never", not a panic.
pub(crate) fn saturating_add(at: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(FAR_FUTURE))
        .unwrap_or(at)
}

/// `d` rounded up to the whole millisecond: tokio's timers tick in milliseconds, so a wait
/// that is logged is the wait that happens, and a server's floor is never undercut. `None`
/// when rounding up would overflow.
pub(crate) fn checked_ceil_millis(d: Duration) -> Option<Duration> {
    match d.subsec_nanos() % 1_000_000 {
        0 => Some(d),
        rem => d.checked_add(Duration::from_nanos(u64::from(1_000_000 - rem))),
    }
}

/// [`checked_ceil_millis`], saturating.
pub(crate) fn ceil_millis(d: Duration) -> Duration {
    checked_ceil_millis(d).unwrap_or(Duration::MAX)
}

/// Parses a duration string, or `None` if it is empty, negative, non-ASCII, malformed or absurd.
pub(crate) fn parse(input: &str) -> Option<Duration> {
    let s = input.trim();
    if s.is_empty() || !s.is_ascii() || s.len() > 64 {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match rest[..unit_len].trim() {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" | "secs" => 1.0,
            "m" | "min" | "mins" => 60.0,
            "h" | "hr" | "hrs" => 3600.0,
            "d" | "day" | "days" => 86_400.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * seconds_per_unit;
    }
    if !total.is_finite() || total < 0.0 || total > MAX.as_secs_f64() {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(any(feature = "serde", test))]
/// Formats a duration the way [`parse`] reads it back: `"250ms"`, `"9s"`, `"1.5s"`.
pub(crate) fn format(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    if d.subsec_nanos() == 0 {
        return format!("{}s", d.as_secs());
    }
    if d.as_nanos() % 1_000_000 == 0 {
        return format!("{}ms", d.as_millis());
    }
    format!("{}us", d.as_micros())
}

#[cfg(feature = "serde")]
pub(crate) mod serde_duration {
    //! `#[serde(with = ...)]` helpers for `Duration` fields.
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};
    use std::time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).ok_or_else(|| {
            D::Error::custom(format!(
                "invalid duration {s:?}: expected a number with a unit such as \"250ms\", \"9s\" or \"1m30s\""
            ))
        })
    }

    pub(crate) mod option {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&super::super::format(*d)),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(s) => super::super::parse(&s).map(Some).ok_or_else(|| {
                    D::Error::custom(format!(
                        "invalid duration {s:?}: expected a number with a unit such as \"250ms\" or \"9s\""
                    ))
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_and_humantime_forms() {
        let ms = Duration::from_millis;
        for (s, d) in [
            ("250ms", ms(250)),
            ("9s", ms(9000)),
            ("1.5s", ms(1500)),
            ("6m0s", ms(360_000)),
            ("8.64s", ms(8640)),
            ("12ms", ms(12)),
            ("2m59.56s", ms(179_560)),
            ("1h", ms(3_600_000)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("1m30s", ms(90_000)),
        ] {
            assert_eq!(parse(s), Some(d), "{s}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "-1s",
            "s",
            "1",
            "1x",
            "NaN",
            "inf",
            "1e400s",
            "९s",
            "1..2s",
            "99999999d",
        ] {
            assert_eq!(parse(s), None, "{s:?}");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(9),
            Duration::from_micros(1500),
        ] {
            assert_eq!(parse(&format(d)), Some(d));
        }
    }
}
