//! Server wait hints: `retry-after-ms`, `retry-after`, `x-ms-retry-after-ms`, provider reset
//! headers, Gemini `RetryInfo`, and `x-should-retry`; plus the rate-limit window a provider
//! reports on every response ([`rate_limit_status`]), for header-driven pacing.
//!
//! Garbage (negative, NaN, infinite, empty, enormous, past dates, non-ASCII, Azure's `-1`)
//! yields "no hint", never a panic or an absurd wait. A hint is always a positive number of
//! whole milliseconds (sub-millisecond values round up) and never longer than [`MAX_HINT`].
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use http::HeaderMap;
//! use tower_llm_resilience::classify::hints::{wait_hint, HintSource};
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("retry-after", "1.5".parse().unwrap());
//! let hint = wait_hint(&headers, SystemTime::now()).unwrap();
//! assert_eq!(hint.wait, Duration::from_millis(1500));
//! assert_eq!(hint.source, HintSource::RetryAfterSeconds);
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

use crate::duration::checked_ceil_millis;

/// Which header or field a wait hint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum HintSource {
    /// `retry-after-ms`.
    RetryAfterMs,
    /// `x-ms-retry-after-ms`.
    MsRetryAfterMs,
    /// `retry-after` in seconds.
    RetryAfterSeconds,
    /// `retry-after` as an HTTP-date.
    RetryAfterDate,
    /// `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens`.
    RateLimitReset,
    /// `anthropic-ratelimit-*-reset`.
    AnthropicReset,
    /// Gemini `RetryInfo.retryDelay` in the error body.
    GeminiRetryInfo,
}

/// A server's request to wait before the next attempt. The wait is a floor: jitter goes on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct WaitHint {
    /// How long to wait.
    pub wait: Duration,
    /// Where it came from.
    pub source: HintSource,
}

impl WaitHint {
    /// A hint of `wait` from `source`, if `wait` is a usable hint: positive and at most
    /// [`MAX_HINT`] (it is rounded up to whole milliseconds).
    pub fn new(wait: Duration, source: HintSource) -> Option<Self> {
        let wait = checked_ceil_millis(wait)?;
        (!wait.is_zero() && wait <= MAX_HINT).then_some(Self { wait, source })
    }
}

/// The longest wait a hint may express before it counts as garbage.
pub const MAX_HINT: Duration = Duration::from_secs(24 * 3600);

/// The server's wait hint in `headers`, judged against `now` (dates are judged against the
/// response's own `Date` header when it has one, so clock skew does not distort them).
///
/// Precedence, as the official SDKs read them: `retry-after-ms`, `x-ms-retry-after-ms`,
/// `retry-after` (seconds, fractional allowed, or HTTP-date), then the provider reset headers
/// `x-ratelimit-reset-{requests,tokens}` and `anthropic-ratelimit-*-reset`. A header that holds
/// garbage is skipped and the next one is read.
///
/// The reset headers count as a wait request only for a window whose matching `-remaining`
/// header says `0`: providers send them on every response, and a reset time alone says when
/// the window refills completely, not that the caller must wait for it. When several windows
/// are exhausted, the longest reset wins (every one of them has to refill).
///
/// A zero wait (`retry-after: 0`, a reset already past) is no hint: the caller's own backoff
/// then applies, so a server cannot talk a client into an immediate retry storm.
pub fn wait_hint(headers: &HeaderMap, now: SystemTime) -> Option<WaitHint> {
    if let Some(h) = header(headers, "retry-after-ms")
        .and_then(|v| parse_decimal(v, Unit::Millis))
        .and_then(|d| WaitHint::new(d, HintSource::RetryAfterMs))
    {
        return Some(h);
    }
    if let Some(h) = header(headers, "x-ms-retry-after-ms")
        .and_then(|v| parse_decimal(v, Unit::Millis))
        .and_then(|d| WaitHint::new(d, HintSource::MsRetryAfterMs))
    {
        return Some(h);
    }
    if let Some(h) = header(headers, "retry-after").and_then(|v| retry_after(v, headers, now)) {
        return Some(h);
    }
    let longest = |windows: &[RateLimitWindow]| windows.iter().filter_map(|w| w.pause()).max();
    if let Some(h) =
        longest(&openai_windows(headers)).and_then(|d| WaitHint::new(d, HintSource::RateLimitReset))
    {
        return Some(h);
    }
    longest(&anthropic_windows(headers, now))
        .and_then(|d| WaitHint::new(d, HintSource::AnthropicReset))
}

/// The `x-should-retry` verdict, if the server sent a valid one.
pub fn should_retry(headers: &HeaderMap) -> Option<bool> {
    match headers.get("x-should-retry")?.to_str().ok()?.trim() {
        v if v.eq_ignore_ascii_case("true") => Some(true),
        v if v.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// One rate-limit window as a provider reports it (requests, tokens, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RateLimitWindow {
    /// The window's limit, if reported.
    pub limit: Option<u64>,
    /// What is left of it, if reported (Azure's `-1` counts as not reported).
    pub remaining: Option<u64>,
    /// How long until the window refills, if reported (zero when the reset is already past).
    pub reset: Option<Duration>,
}

impl RateLimitWindow {
    /// Whether the provider reported the window as used up (`remaining` is 0).
    pub fn is_exhausted(&self) -> bool {
        self.remaining == Some(0)
    }

    /// Whether the provider reported anything about the window.
    pub fn is_reported(&self) -> bool {
        self.limit.is_some() || self.remaining.is_some() || self.reset.is_some()
    }

    /// The reset of an exhausted window: how long admission should pause for it.
    pub fn pause(&self) -> Option<Duration> {
        if self.is_exhausted() {
            self.reset
        } else {
            None
        }
    }
}

/// The rate-limit state a provider reports in its response headers, for header-driven pacing:
/// OpenAI/Groq `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (resets as durations
/// such as `6m0s`) and Anthropic
/// `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
/// (resets as RFC 3339 times).
///
/// `requests` and `tokens` take the OpenAI-style headers when present and the Anthropic ones
/// otherwise; `input_tokens` and `output_tokens` exist only for Anthropic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RateLimitStatus {
    /// The request window.
    pub requests: RateLimitWindow,
    /// The (total) token window.
    pub tokens: RateLimitWindow,
    /// Anthropic's input-token window.
    pub input_tokens: RateLimitWindow,
    /// Anthropic's output-token window.
    pub output_tokens: RateLimitWindow,
}

impl RateLimitStatus {
    /// Whether the headers reported any window at all.
    pub fn is_reported(&self) -> bool {
        self.windows().iter().any(RateLimitWindow::is_reported)
    }

    /// How long to pause admission: the longest reset among the exhausted windows, `None` when
    /// no window is exhausted (or an exhausted one has no usable reset). Zero when the reset
    /// has already passed.
    pub fn pause(&self) -> Option<Duration> {
        self.windows()
            .iter()
            .filter_map(RateLimitWindow::pause)
            .max()
    }

    fn windows(&self) -> [RateLimitWindow; 4] {
        [
            self.requests,
            self.tokens,
            self.input_tokens,
            self.output_tokens,
        ]
    }
}

/// The rate-limit windows reported in `headers`; RFC 3339 resets are judged against the
/// response's `Date` header when it has one, else against `now`.
pub fn rate_limit_status(headers: &HeaderMap, now: SystemTime) -> RateLimitStatus {
    let [oa_req, oa_tok] = openai_windows(headers);
    let [an_req, an_tok, input_tokens, output_tokens] = anthropic_windows(headers, now);
    RateLimitStatus {
        requests: if oa_req.is_reported() { oa_req } else { an_req },
        tokens: if oa_tok.is_reported() { oa_tok } else { an_tok },
        input_tokens,
        output_tokens,
    }
}

/// `[limit, remaining, reset]` header names per OpenAI-style window.
const OPENAI: [[&str; 3]; 2] = [
    [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ],
    [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ],
];

/// `[limit, remaining, reset]` header names per Anthropic window.
const ANTHROPIC: [[&str; 3]; 4] = [
    [
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ],
    [
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ],
    [
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    ],
    [
        "anthropic-ratelimit-output-tokens-limit",
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    ],
];

fn openai_windows(headers: &HeaderMap) -> [RateLimitWindow; 2] {
    OPENAI.map(|[limit, remaining, reset]| RateLimitWindow {
        limit: header(headers, limit).and_then(parse_count),
        remaining: header(headers, remaining).and_then(parse_count),
        reset: header(headers, reset).and_then(parse_reset),
    })
}

fn anthropic_windows(headers: &HeaderMap, now: SystemTime) -> [RateLimitWindow; 4] {
    let reference = reference_time(headers, now);
    ANTHROPIC.map(|[limit, remaining, reset]| RateLimitWindow {
        limit: header(headers, limit).and_then(parse_count),
        remaining: header(headers, remaining).and_then(parse_count),
        reset: header(headers, reset)
            .and_then(parse_rfc3339)
            .map(|at| at.duration_since(reference).unwrap_or(Duration::ZERO))
            .and_then(checked_ceil_millis)
            .filter(|d| *d <= MAX_HINT),
    })
}

/// Gemini's `RetryInfo.retryDelay`: a protobuf JSON duration (`"15s"`, `"0.5s"`), or the
/// `{"seconds": 15, "nanos": 0}` object form some gateways pass through.
pub(crate) fn retry_delay(value: &serde_json::Value) -> Option<WaitHint> {
    let d = match value {
        serde_json::Value::String(s) => {
            let s = s.trim();
            parse_decimal(s.strip_suffix('s')?, Unit::Seconds)?
        }
        serde_json::Value::Object(o) => {
            let secs = match o.get("seconds") {
                Some(serde_json::Value::Number(n)) => n.as_u64()?,
                // protobuf JSON writes int64 as a string
                Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok()?,
                None => 0,
                _ => return None,
            };
            let nanos = match o.get("nanos") {
                Some(serde_json::Value::Number(n)) => n.as_u64().filter(|n| *n < 1_000_000_000)?,
                None => 0,
                _ => return None,
            };
            // `nanos` is below one second, so the cast is lossless
            Duration::from_secs(secs.min(MAX_HINT.as_secs() + 1)) + Duration::from_nanos(nanos)
        }
        _ => return None,
    };
    WaitHint::new(d, HintSource::GeminiRetryInfo)
}

/// The value of `name` as a trimmed string, if it is visible ASCII.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    (!v.is_empty()).then_some(v)
}

/// The time "now" for date hints: the response's `Date` header when valid, else `now`.
fn reference_time(headers: &HeaderMap, now: SystemTime) -> SystemTime {
    header(headers, "date")
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .unwrap_or(now)
}

fn retry_after(value: &str, headers: &HeaderMap, now: SystemTime) -> Option<WaitHint> {
    if value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return parse_decimal(value, Unit::Seconds)
            .and_then(|d| WaitHint::new(d, HintSource::RetryAfterSeconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let wait = at.duration_since(reference_time(headers, now)).ok()?;
    WaitHint::new(wait, HintSource::RetryAfterDate)
}

/// A count such as `x-ratelimit-remaining-requests: 499`; `-1` (Azure) and garbage are `None`.
fn parse_count(value: &str) -> Option<u64> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// A Go-style reset duration (`6m0s`, `8.64s`, `12ms`, `0`), rounded up to whole
/// milliseconds after removing float noise below the microsecond.
fn parse_reset(value: &str) -> Option<Duration> {
    let d = crate::duration::parse(value)?;
    let micros = (d.as_nanos() + 500) / 1000;
    let d = Duration::from_micros(u64::try_from(micros).ok()?);
    checked_ceil_millis(d).filter(|d| *d <= MAX_HINT)
}

#[derive(Clone, Copy)]
enum Unit {
    Seconds,
    Millis,
}

/// An exact decimal (`"2"`, `"1.5"`, `"0.0001"`, `"1500.25"`) in `unit`: no sign, exponent,
/// `inf` or `NaN`; `None` for garbage or anything longer than [`MAX_HINT`].
fn parse_decimal(value: &str, unit: Unit) -> Option<Duration> {
    let (int, frac) = match value.split_once('.') {
        Some((i, f)) => (i, f),
        None => (value, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || value.len() > 40 {
        return None;
    }
    let int = int.trim_start_matches('0');
    // more integer digits than any hint can have: enormous
    if int.len() > 12 {
        return None;
    }
    let whole: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    // fraction of one unit, in nanoseconds of that unit's scale, rounded up beyond 9 digits
    let scale_digits = match unit {
        Unit::Seconds => 9,
        Unit::Millis => 6,
    };
    let mut frac_nanos: u64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        let d = u64::from(b - b'0');
        if i < scale_digits {
            frac_nanos = frac_nanos * 10 + d;
        } else if d != 0 {
            frac_nanos += 1;
            break;
        }
    }
    let shown = frac.len().min(scale_digits);
    frac_nanos = frac_nanos.saturating_mul(10u64.pow((scale_digits - shown) as u32));
    let d = match unit {
        Unit::Seconds => {
            Duration::from_secs(whole).checked_add(Duration::from_nanos(frac_nanos))?
        }
        Unit::Millis => {
            Duration::from_millis(whole).checked_add(Duration::from_nanos(frac_nanos))?
        }
    };
    (d <= MAX_HINT).then_some(d)
}

/// A strict RFC 3339 date-time (`2025-08-21T12:40:59Z`, `2025-08-21T12:40:59.5+02:00`).
pub(crate) fn parse_rfc3339(value: &str) -> Option<SystemTime> {
    let b = value.as_bytes();
    if b.len() < 20 || b.len() > 64 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u64> {
        let s = b.get(range)?;
        if !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos: u64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        let mut round_up = false;
        while let Some(d) = b.get(i).filter(|d| d.is_ascii_digit()) {
            if i - start < 9 {
                nanos = nanos * 10 + u64::from(d - b'0');
            } else if *d != b'0' {
                round_up = true;
            }
            i += 1;
        }
        let shown = (i - start).min(9);
        if shown == 0 {
            return None;
        }
        nanos = nanos * 10u64.pow((9 - shown) as u32) + u64::from(round_up);
    }
    let offset_secs: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 3600 + om * 60) as i64;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let local = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64;
    let utc = local - offset_secs;
    let secs = u64::try_from(utc).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, 0) + Duration::from_nanos(nanos))
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
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

    #[test]
    fn decimals_are_exact() {
        let p = |s| parse_decimal(s, Unit::Seconds);
        assert_eq!(p("8.64"), Some(Duration::from_millis(8640)));
        assert_eq!(p("0.0001"), Some(Duration::from_micros(100)));
        assert_eq!(p("1."), Some(Duration::from_secs(1)));
        assert_eq!(p(".5"), Some(Duration::from_millis(500)));
        assert_eq!(p("0.0000000001"), Some(Duration::from_nanos(1)));
        assert_eq!(p("86400"), Some(MAX_HINT));
        assert_eq!(p("86400.000000001"), None);
        assert_eq!(p("0000000000000000000000001"), Some(Duration::from_secs(1)));
        for bad in [
            "", ".", "-1", "+1", "1e3", "inf", "NaN", "1.2.3", " 1", "１",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
        let ms = |s| parse_decimal(s, Unit::Millis);
        assert_eq!(ms("1.5"), Some(Duration::from_micros(1500)));
        assert_eq!(ms("2000"), Some(Duration::from_secs(2)));
        assert_eq!(ms("0.0000001"), Some(Duration::from_nanos(1)));
    }

    #[test]
    fn rfc3339_parses_strictly() {
        let at = |s| {
            parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos())
        };
        assert_eq!(at("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(at("2025-08-21T12:40:59Z"), Some(1_755_780_059_000_000_000));
        assert_eq!(
            at("2025-08-21T14:40:59.25+02:00"),
            Some(1_755_780_059_250_000_000)
        );
        assert_eq!(at("2024-02-29t00:00:00z"), Some(1_709_164_800_000_000_000));
        for bad in [
            "2023-02-29T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-08-21 12:40:59Z",
            "2025-08-21T24:00:00Z",
            "2025-08-21T12:40:59",
            "2025-08-21T12:40:59.Z",
            "2025-08-21T12:40:59+0200",
            "2025-08-21T12:40:59+24:00",
            "1969-12-31T23:59:59Z",
            "2025-08-21T12:40:59Zjunk",
            "२०२५-08-21T12:40:59Z",
        ] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reset_durations_lose_float_noise_but_round_up() {
        assert_eq!(parse_reset("8.64s"), Some(Duration::from_millis(8640)));
        assert_eq!(
            parse_reset("2m59.56s"),
            Some(Duration::from_millis(179_560))
        );
        assert_eq!(parse_reset("1.001ms"), Some(Duration::from_millis(2)));
        assert_eq!(parse_reset("0"), Some(Duration::ZERO));
        assert_eq!(parse_reset("-1"), None);
        assert_eq!(parse_reset("25h"), None);
    }
}
