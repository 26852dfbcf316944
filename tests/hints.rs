//! Server wait hints: one test per header format, garbage, and a property test over arbitrary
//! header values (no panic, no hint above `MAX_HINT`, no wait above the configured cap).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[path = "support/log.rs"]
mod log;
use log::ms;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use tower_llm_resilience::attempt_log::WaitSource;
use tower_llm_resilience::backoff::{JitterSource, NextWait, next_wait};
use tower_llm_resilience::classify::hints::{
    HintSource, MAX_HINT, WaitHint, rate_limit_status, should_retry, wait_hint,
};
use tower_llm_resilience::classify::{Classifier, DefaultClassifier};
use tower_llm_resilience::policy::{BackoffPolicy, Jitter};

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

/// A fixed "now": 2025-08-21T12:40:00Z.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_755_780_000)
}

fn hint(pairs: &[(&str, &str)]) -> Option<(Duration, HintSource)> {
    wait_hint(&headers(pairs), now()).map(|h| (h.wait, h.source))
}

#[test]
fn retry_after_ms_float() {
    assert_eq!(
        hint(&[("retry-after-ms", "2000")]),
        Some((ms(2000), HintSource::RetryAfterMs))
    );
    assert_eq!(
        hint(&[("retry-after-ms", "1500.5")]),
        Some((ms(1501), HintSource::RetryAfterMs))
    );
    // sub-millisecond rounds up, never down to "no wait"
    assert_eq!(
        hint(&[("retry-after-ms", "0.001")]),
        Some((ms(1), HintSource::RetryAfterMs))
    );
}

#[test]
fn x_ms_retry_after_ms() {
    assert_eq!(
        hint(&[("x-ms-retry-after-ms", "850")]),
        Some((ms(850), HintSource::MsRetryAfterMs))
    );
}

#[test]
fn retry_after_integer_seconds() {
    assert_eq!(
        hint(&[("retry-after", "30")]),
        Some((ms(30_000), HintSource::RetryAfterSeconds))
    );
    assert_eq!(
        hint(&[("retry-after", " 7 ")]),
        Some((ms(7000), HintSource::RetryAfterSeconds))
    );
}

#[test]
fn retry_after_fractional_seconds() {
    assert_eq!(
        hint(&[("retry-after", "1.25")]),
        Some((ms(1250), HintSource::RetryAfterSeconds))
    );
    assert_eq!(
        hint(&[("retry-after", "8.64")]),
        Some((ms(8640), HintSource::RetryAfterSeconds))
    );
    assert_eq!(
        hint(&[("retry-after", "0.0001")]),
        Some((ms(1), HintSource::RetryAfterSeconds))
    );
}

#[test]
fn retry_after_http_date_is_judged_against_the_date_header() {
    // The local clock (now()) is five minutes ahead of the server's: the Date header wins.
    let server_now = now() - Duration::from_secs(300);
    let h = [
        ("date", httpdate::fmt_http_date(server_now)),
        (
            "retry-after",
            httpdate::fmt_http_date(server_now + Duration::from_secs(90)),
        ),
    ];
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(hint(&h), Some((ms(90_000), HintSource::RetryAfterDate)));
}

#[test]
fn retry_after_http_date_without_date_header_uses_now() {
    let at = httpdate::fmt_http_date(now() + Duration::from_secs(45));
    assert_eq!(
        hint(&[("retry-after", &at)]),
        Some((ms(45_000), HintSource::RetryAfterDate))
    );
    // a Date header that is garbage is ignored, not trusted
    assert_eq!(
        hint(&[("retry-after", &at), ("date", "yesterday")]),
        Some((ms(45_000), HintSource::RetryAfterDate))
    );
}

#[test]
fn retry_after_obsolete_date_formats() {
    let h = [
        ("date", "Sunday, 06-Nov-94 08:49:37 GMT"),
        ("retry-after", "Sun Nov  6 08:50:07 1994"),
    ];
    assert_eq!(hint(&h), Some((ms(30_000), HintSource::RetryAfterDate)));
}

#[test]
fn retry_after_past_date_is_no_hint() {
    assert_eq!(
        hint(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]),
        None
    );
    let h = [
        ("date", "Wed, 21 Oct 2015 07:28:00 GMT"),
        ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
    ];
    assert_eq!(hint(&h), None);
}

#[test]
fn precedence_and_fall_through() {
    let all = [
        ("retry-after-ms", "100"),
        ("x-ms-retry-after-ms", "200"),
        ("retry-after", "3"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", "4s"),
    ];
    assert_eq!(hint(&all), Some((ms(100), HintSource::RetryAfterMs)));
    assert_eq!(hint(&all[1..]), Some((ms(200), HintSource::MsRetryAfterMs)));
    assert_eq!(
        hint(&all[2..]),
        Some((ms(3000), HintSource::RetryAfterSeconds))
    );
    assert_eq!(
        hint(&all[3..]),
        Some((ms(4000), HintSource::RateLimitReset))
    );
    // garbage in a stronger header falls through to the next usable one
    assert_eq!(
        hint(&[("retry-after-ms", "-5"), ("retry-after", "2")]),
        Some((ms(2000), HintSource::RetryAfterSeconds))
    );
    assert_eq!(
        hint(&[("retry-after", "soon"), ("x-ms-retry-after-ms", "NaN")]),
        None
    );
}

#[test]
fn x_ratelimit_reset_durations_when_the_window_is_exhausted() {
    for (reset, want) in [
        ("1s", ms(1000)),
        ("6m0s", ms(360_000)),
        ("8.64s", ms(8640)),
        ("12ms", ms(12)),
        ("2m59.56s", ms(179_560)),
        ("1h", ms(3_600_000)),
    ] {
        for kind in ["requests", "tokens"] {
            let remaining = format!("x-ratelimit-remaining-{kind}");
            let reset_name = format!("x-ratelimit-reset-{kind}");
            assert_eq!(
                hint(&[(&remaining, "0"), (&reset_name, reset)]),
                Some((want, HintSource::RateLimitReset)),
                "{kind} {reset}"
            );
        }
    }
    // "0": the window is already back, so there is nothing to wait for
    assert_eq!(
        hint(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "0")
        ]),
        None
    );
}

#[test]
fn x_ratelimit_reset_is_not_a_wait_while_capacity_remains() {
    // OpenAI sends these on every response; a reset alone is not a request to wait.
    assert_eq!(
        hint(&[
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-remaining-tokens", "29000"),
            ("x-ratelimit-reset-tokens", "2s"),
        ]),
        None
    );
    assert_eq!(hint(&[("x-ratelimit-reset-requests", "5s")]), None);
    // the exhausted window counts, the other one does not
    assert_eq!(
        hint(&[
            ("x-ratelimit-remaining-requests", "10"),
            ("x-ratelimit-reset-requests", "50s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "2s"),
        ]),
        Some((ms(2000), HintSource::RateLimitReset))
    );
    // both exhausted: both must refill
    assert_eq!(
        hint(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "50s"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "2s"),
        ]),
        Some((ms(50_000), HintSource::RateLimitReset))
    );
    // Azure's -1
    assert_eq!(
        hint(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-reset-requests", "-1"),
        ]),
        None
    );
}

#[test]
fn anthropic_rfc3339_reset() {
    // now() is 12:40:00Z
    assert_eq!(
        hint(&[
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2025-08-21T12:40:59Z"),
        ]),
        Some((ms(59_000), HintSource::AnthropicReset))
    );
    for kind in ["tokens", "input-tokens", "output-tokens"] {
        let remaining = format!("anthropic-ratelimit-{kind}-remaining");
        let reset = format!("anthropic-ratelimit-{kind}-reset");
        assert_eq!(
            hint(&[
                (&remaining, "0"),
                (&reset, "2025-08-21T14:40:10.0001+02:00")
            ]),
            Some((ms(10_001), HintSource::AnthropicReset)),
            "{kind}"
        );
    }
    // judged against the Date header when there is one
    assert_eq!(
        hint(&[
            ("date", "Thu, 21 Aug 2025 12:39:50 GMT"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2025-08-21T12:40:00Z"),
        ]),
        Some((ms(10_000), HintSource::AnthropicReset))
    );
    // longest of the exhausted windows
    assert_eq!(
        hint(&[
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2025-08-21T12:40:05Z"
            ),
            ("anthropic-ratelimit-output-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2025-08-21T12:40:20Z"
            ),
            ("anthropic-ratelimit-requests-remaining", "40"),
            ("anthropic-ratelimit-requests-reset", "2025-08-21T12:41:00Z"),
        ]),
        Some((ms(20_000), HintSource::AnthropicReset))
    );
    // not exhausted, past, or not RFC 3339: no hint
    for (remaining, reset) in [
        ("12", "2025-08-21T12:40:59Z"),
        ("0", "2025-08-21T12:39:59Z"),
        ("0", "2025-08-21 12:40:59Z"),
        ("0", "Thu, 21 Aug 2025 12:40:59 GMT"),
        ("0", "2025-08-21T12:40:59"),
        ("0", "2025-02-30T12:40:59Z"),
        ("0", "2099-01-01T00:00:00Z"),
    ] {
        assert_eq!(
            hint(&[
                ("anthropic-ratelimit-requests-remaining", remaining),
                ("anthropic-ratelimit-requests-reset", reset),
            ]),
            None,
            "{remaining} {reset}"
        );
    }
}

fn gemini_hint(delay: &str) -> Option<WaitHint> {
    let body = format!(
        r#"{{"error":{{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":{delay}}}]}}}}"#
    );
    DefaultClassifier::default()
        .classify_response(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            body.as_bytes(),
        )
        .wait_hint
}

#[test]
fn gemini_retry_info() {
    for (delay, want) in [
        (r#""15s""#, ms(15_000)),
        (r#""0.5s""#, ms(500)),
        (r#""1.000000001s""#, ms(1001)),
        (r#""28.046s""#, ms(28_046)),
        (r#"{"seconds":"3","nanos":500000000}"#, ms(3500)),
        (r#"{"seconds":7}"#, ms(7000)),
    ] {
        let h = gemini_hint(delay).unwrap_or_else(|| panic!("{delay}"));
        assert_eq!(
            (h.wait, h.source),
            (want, HintSource::GeminiRetryInfo),
            "{delay}"
        );
    }
    for delay in [
        r#""-1s""#,
        r#""15""#,
        r#""abc""#,
        r#""1e3s""#,
        r#""NaNs""#,
        r#""0s""#,
        r#""999999999s""#,
        r#""""#,
        "15",
        "null",
        r#"{"seconds":-5}"#,
        r#"{"seconds":1,"nanos":2000000000}"#,
        r#"{"seconds":99999999999999}"#,
    ] {
        assert_eq!(gemini_hint(delay), None, "{delay}");
    }
}

#[test]
fn garbage_is_no_hint() {
    let garbage = [
        "",
        " ",
        "-1",
        "-0.5",
        "+5",
        "NaN",
        "nan",
        "inf",
        "Infinity",
        "1e3",
        "0x10",
        "1,5",
        "5 s",
        "1.2.3",
        "0",
        "0.0",
        "99999999999999999999999999",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "Thu, 32 Aug 2025 12:40:59 GMT",
    ];
    for name in ["retry-after-ms", "x-ms-retry-after-ms", "retry-after"] {
        for v in garbage {
            assert_eq!(hint(&[(name, v)]), None, "{name}: {v:?}");
        }
        // non-ASCII bytes
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_static(name),
            HeaderValue::from_bytes(b"\xd9\xa1\xd9\xa2").unwrap(),
        );
        assert_eq!(wait_hint(&h, now()), None, "{name}: non-ASCII");
    }
    // enormous: one millisecond above the bound
    assert_eq!(hint(&[("retry-after-ms", "86400001")]), None);
    assert_eq!(hint(&[("retry-after", "86401")]), None);
    assert_eq!(hint(&[("retry-after", "86400.001")]), None);
    assert_eq!(
        hint(&[
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "24h0m0.001s")
        ]),
        None
    );
    // exactly at the bound is still a hint (the retry layer's own cap judges it)
    assert_eq!(
        hint(&[("retry-after", "86400")]),
        Some((MAX_HINT, HintSource::RetryAfterSeconds))
    );
}

#[test]
fn should_retry_header() {
    assert_eq!(
        should_retry(&headers(&[("x-should-retry", "true")])),
        Some(true)
    );
    assert_eq!(
        should_retry(&headers(&[("x-should-retry", "False")])),
        Some(false)
    );
    assert_eq!(should_retry(&headers(&[("x-should-retry", "1")])), None);
    assert_eq!(should_retry(&HeaderMap::new()), None);
}

#[test]
fn rate_limit_status_openai() {
    let s = rate_limit_status(
        &headers(&[
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "5s"),
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-tokens", "29000"),
            ("x-ratelimit-reset-tokens", "2ms"),
        ]),
        now(),
    );
    assert!(s.is_reported());
    assert_eq!(s.requests.limit, Some(500));
    assert_eq!(s.requests.remaining, Some(0));
    assert_eq!(s.requests.reset, Some(ms(5000)));
    assert!(s.requests.is_exhausted());
    assert_eq!(s.tokens.remaining, Some(29_000));
    assert_eq!(s.tokens.reset, Some(ms(2)));
    assert!(!s.tokens.is_exhausted());
    assert!(!s.input_tokens.is_reported());
    assert_eq!(s.pause(), Some(ms(5000)));
}

#[test]
fn rate_limit_status_anthropic() {
    let s = rate_limit_status(
        &headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2025-08-21T12:40:01Z"),
            ("anthropic-ratelimit-tokens-remaining", "0"),
            ("anthropic-ratelimit-tokens-reset", "2025-08-21T12:40:30Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "0"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2025-08-21T12:39:00Z",
            ),
            ("anthropic-ratelimit-output-tokens-remaining", "8000"),
        ]),
        now(),
    );
    assert_eq!(s.requests.limit, Some(50));
    assert_eq!(s.requests.remaining, Some(49));
    assert_eq!(s.requests.reset, Some(ms(1000)));
    assert_eq!(s.tokens.reset, Some(ms(30_000)));
    // a reset already past reads as zero: the window is back
    assert_eq!(s.input_tokens.reset, Some(Duration::ZERO));
    assert_eq!(s.output_tokens.remaining, Some(8000));
    assert_eq!(s.output_tokens.reset, None);
    assert_eq!(s.pause(), Some(ms(30_000)));
}

#[test]
fn rate_limit_status_tolerates_azure_and_garbage() {
    let s = rate_limit_status(
        &headers(&[
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-reset-requests", "-1"),
            ("x-ratelimit-remaining-tokens", "lots"),
            ("x-ratelimit-limit-tokens", "99999999999999999999999"),
        ]),
        now(),
    );
    assert!(!s.is_reported());
    assert_eq!(s.pause(), None);
    assert_eq!(rate_limit_status(&HeaderMap::new(), now()).pause(), None);
}

// ------------------------------------------------------------------------------- properties

const HINT_HEADERS: [&str; 18] = [
    "retry-after-ms",
    "x-ms-retry-after-ms",
    "retry-after",
    "date",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-remaining",
    "anthropic-ratelimit-output-tokens-reset",
    "x-should-retry",
    "x-amzn-errortype",
];

/// Header values: arbitrary bytes that `HeaderValue` accepts, and near-misses of every format,
/// with dates around `now` so that date hints are often usable.
fn header_value(now: u64) -> impl Strategy<Value = HeaderValue> {
    let bytes = proptest::collection::vec(any::<u8>(), 0..40)
        .prop_filter_map("not a header value", |b| HeaderValue::from_bytes(&b).ok());
    let around = move |off: i64| now.saturating_add_signed(off);
    let text = prop_oneof![
        2 => Just("0".to_owned()),
        3 => "[-+ ]?[0-9]{0,6}(\\.[0-9]{0,12})?",
        1 => "[0-9]{0,25}(\\.[0-9]{0,14})?",
        3 => "([0-9.]{1,6}(ns|us|ms|s|m|h|d|x)?){1,3}",
        3 => "[0-9]{1,3}(\\.[0-9]{1,3})?(ms|s|m|h)([0-9]{1,2}(\\.[0-9]{1,3})?s)?",
        2 => (-100_000i64..200_000)
            .prop_map(move |off| httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(around(off)))),
        2 => (-100_000i64..200_000, "(\\.[0-9]{1,12})?", "(Z|z|[+-][0-9]{2}:[0-9]{2}|)")
            .prop_map(move |(off, frac, zone)| format!("{}{frac}{zone}", rfc3339(around(off)))),
        1 => "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,12})?(Z|[+-][0-9]{2}:[0-9]{2})?",
        1 => "(NaN|inf|-inf|Infinity|1e[0-9]{1,4}|-1|true|false)",
    ]
    .prop_filter_map("not a header value", |s| HeaderValue::from_str(&s).ok());
    prop_oneof![1 => bytes, 4 => text]
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SS` (no zone).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // civil-from-days (H. Hinnant)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[test]
fn rfc3339_helper_matches_the_parser() {
    assert_eq!(rfc3339(1_755_780_059), "2025-08-21T12:40:59");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00");
}

/// `[remaining, reset]` header names of every window, to build exhausted windows.
const WINDOWS: [[&str; 2]; 6] = [
    [
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ],
    ["x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
    [
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ],
    [
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ],
    [
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    ],
    [
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-reset",
    ],
];

fn headers_around() -> impl Strategy<Value = (u64, HeaderMap)> {
    (0u64..8_000_000_000u64).prop_flat_map(|now| {
        (
            proptest::collection::vec((0..HINT_HEADERS.len(), header_value(now)), 0..10),
            proptest::collection::vec((0..WINDOWS.len(), header_value(now)), 0..3),
        )
            .prop_map(move |(pairs, exhausted)| {
                let mut h = HeaderMap::new();
                for (i, v) in pairs {
                    h.append(HeaderName::from_static(HINT_HEADERS[i]), v);
                }
                for (w, reset) in exhausted {
                    let [remaining, reset_name] = WINDOWS[w];
                    h.insert(
                        HeaderName::from_static(remaining),
                        HeaderValue::from_static("0"),
                    );
                    h.insert(HeaderName::from_static(reset_name), reset);
                }
                (now, h)
            })
    })
}

fn jitter_kind() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
        Just(Jitter::None),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn no_panic_no_absurd_hint_no_wait_above_the_cap(
        (now_secs, h) in headers_around(),
        cap_ms in 1u64..7_200_000,
        base_ms in 1u64..10_000,
        curve_extra_ms in 0u64..60_000,
        jitter in jitter_kind(),
        retry in 0u32..40,
        seed in any::<u64>(),
    ) {
        let now = UNIX_EPOCH + Duration::from_secs(now_secs);
        let hint = wait_hint(&h, now);
        if let Some(hint) = hint {
            prop_assert!(hint.wait > Duration::ZERO);
            prop_assert!(hint.wait <= MAX_HINT, "{:?}", hint);
            prop_assert_eq!(hint.wait.subsec_nanos() % 1_000_000, 0, "whole milliseconds");
        }
        let status = rate_limit_status(&h, now);
        if let Some(p) = status.pause() {
            prop_assert!(p <= MAX_HINT);
        }
        let _ = should_retry(&h);

        let curve = BackoffPolicy::new(ms(base_ms), ms(base_ms + curve_extra_ms)).jitter(jitter);
        let cap = ms(cap_ms);
        let jitter_source = JitterSource::seeded(seed);
        for r in [0, retry] {
            match next_wait(&curve, r, None, hint.map(|h| h.wait), cap, &jitter_source) {
                NextWait::Wait { wait, source: WaitSource::Server } => {
                    let Some(h) = hint else {
                        return Err(TestCaseError::fail(format!("server wait {wait:?} without a hint")));
                    };
                    // the hint is whole milliseconds (asserted above), so it is its own floor
                    prop_assert!(wait >= h.wait, "a server hint is a floor: {:?} < {:?}", wait, h.wait);
                    prop_assert!(wait <= cap, "server wait {:?} > max_server_wait {:?}", wait, cap);
                    prop_assert!(
                        wait <= h.wait + h.wait / 5,
                        "server wait {:?} > hint {:?} plus a fifth",
                        wait,
                        h.wait
                    );
                }
                NextWait::Wait { wait, source: WaitSource::Backoff } => {
                    prop_assert!(hint.is_none(), "backoff wait {:?} despite hint {:?}", wait, hint);
                    prop_assert!(wait <= curve.cap, "backoff wait {:?} > curve cap {:?}", wait, curve.cap);
                }
                NextWait::AboveCap { hint: asked } => {
                    prop_assert_eq!(Some(asked), hint.map(|h| h.wait));
                    prop_assert!(asked > cap);
                }
                NextWait::Wait { wait, source } => {
                    return Err(TestCaseError::fail(format!(
                        "wait {wait:?} from an unknown source {source:?}"
                    )));
                }
            }
        }

        // the classifier reads the same headers without trouble
        let c = DefaultClassifier::default().classify_response(StatusCode::TOO_MANY_REQUESTS, &h, b"");
        prop_assert!(c.class.is_some());
        if let Some(h) = c.wait_hint {
            prop_assert!(h.wait > Duration::ZERO && h.wait <= MAX_HINT);
        }
    }
}

/// `d` rounded up to the whole millisecond (what `next_wait` documents for a server floor).
fn ceil_ms(d: Duration) -> Duration {
    match d.subsec_nanos() % 1_000_000 {
        0 => d,
        rem => d + Duration::from_nanos(u64::from(1_000_000 - rem)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Any hint (not only whole milliseconds from headers): the wait is the hint rounded up to
    /// the millisecond, plus at most a fifth of the hint, never past `max_server_wait`.
    #[test]
    fn server_wait_is_the_rounded_hint_plus_at_most_a_fifth(
        hint_ns in 1u64..3_600_000_000_000,
        cap_extra_ns in prop_oneof![Just(0u64), 0u64..1_000_000, 0u64..1_000_000_000_000],
        base_ms in 1u64..10_000,
        seed in any::<u64>(),
    ) {
        let hint = Duration::from_nanos(hint_ns);
        let cap = hint + Duration::from_nanos(cap_extra_ns);
        // a tiny curve: a server wait must not be bounded by (or confused with) the curve
        let curve = BackoffPolicy::new(ms(base_ms), ms(base_ms)).jitter(Jitter::Full);
        let jitter_source = JitterSource::seeded(seed);
        let lo = ceil_ms(hint).min(cap);
        let hi = (ceil_ms(hint) + hint / 5).min(cap);
        for retry in 0..4 {
            match next_wait(&curve, retry, None, Some(hint), cap, &jitter_source) {
                NextWait::Wait { wait, source } => {
                    prop_assert_eq!(source, WaitSource::Server);
                    prop_assert!(wait >= hint, "{:?} < hint {:?}", wait, hint);
                    prop_assert!(wait >= lo, "{:?} < rounded floor {:?}", wait, lo);
                    prop_assert!(wait <= hi, "{:?} > bound {:?} (hint {:?}, cap {:?})", wait, hi, hint, cap);
                }
                other => return Err(TestCaseError::fail(format!("{other:?} for hint {hint:?} <= cap {cap:?}"))),
            }
        }
        // one nanosecond above the cap: no wait at all
        let above = cap + Duration::from_nanos(1);
        prop_assert_eq!(
            next_wait(&curve, 0, None, Some(above), cap, &jitter_source),
            NextWait::AboveCap { hint: above }
        );
    }
}

#[test]
fn server_jitter_is_added_but_stops_at_the_cap() {
    let curve = BackoffPolicy::new(ms(100), ms(100));
    let hint = ms(10_000);
    // room for the whole fifth: some jitter shows up, none beyond 12 s
    let j = JitterSource::seeded(11);
    let waits: Vec<Duration> = (0..200)
        .map(
            |_| match next_wait(&curve, 0, None, Some(hint), ms(60_000), &j) {
                NextWait::Wait { wait, .. } => wait,
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert!(
        waits.iter().all(|w| *w >= hint && *w <= ms(12_000)),
        "{waits:?}"
    );
    assert!(
        waits.iter().any(|w| *w > ms(11_000)),
        "jitter reaches into the fifth"
    );
    // the cap leaves 500 ms of room: jitter is clipped there, never past
    let waits: Vec<Duration> = (0..200)
        .map(
            |_| match next_wait(&curve, 0, None, Some(hint), ms(10_500), &j) {
                NextWait::Wait { wait, .. } => wait,
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert!(
        waits.iter().all(|w| *w >= hint && *w <= ms(10_500)),
        "{waits:?}"
    );
    assert!(waits.contains(&ms(10_500)), "clipped at the cap");
}
