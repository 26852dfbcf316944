//! Server wait hints: `retry-after-ms`, `retry-after`, `x-ms-retry-after-ms`, provider reset
//! headers, Gemini `RetryInfo`, and `x-should-retry`.
//!
//! Garbage (negative, NaN, empty, enormous, past dates, non-ASCII) yields "no hint", never a
//! panic or an absurd wait.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

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

/// The longest wait a hint may express before it counts as garbage.
pub const MAX_HINT: Duration = Duration::from_secs(24 * 3600);

/// The server's wait hint in `headers`, judged against `now` (dates are judged against the
/// response's own `Date` header when it has one, so clock skew does not distort them).
pub fn wait_hint(headers: &HeaderMap, now: SystemTime) -> Option<WaitHint> {
    let _ = (headers, now);
    None
}

/// The `x-should-retry` verdict, if the server sent a valid one.
pub fn should_retry(headers: &HeaderMap) -> Option<bool> {
    match headers.get("x-should-retry")?.to_str().ok()?.trim() {
        v if v.eq_ignore_ascii_case("true") => Some(true),
        v if v.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}
