//! The wait-hint header parsers on arbitrary header maps: `wait_hint`, `rate_limit_status`,
//! `should_retry`. Never a panic; a hint is always positive, whole milliseconds, at most
//! `MAX_HINT`.
#![no_main]

#[path = "common.rs"]
mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use tower_llm_resilience::classify::hints::{MAX_HINT, rate_limit_status, should_retry, wait_hint};

fuzz_target!(|data: &[u8]| {
    let (headers, _) = common::headers(data);
    // A realistic clock, the epoch, and a far future: the parsers judge dates against `now`.
    for now in [
        UNIX_EPOCH + Duration::from_secs(1_755_780_000),
        UNIX_EPOCH,
        UNIX_EPOCH + Duration::from_secs(1 << 34),
        SystemTime::now(),
    ] {
        if let Some(hint) = wait_hint(&headers, now) {
            assert!(!hint.wait.is_zero(), "zero hint {hint:?}");
            assert!(hint.wait <= MAX_HINT, "hint over MAX_HINT {hint:?}");
            assert_eq!(
                hint.wait.subsec_nanos() % 1_000_000,
                0,
                "not whole ms {hint:?}"
            );
        }
        let status = rate_limit_status(&headers, now);
        if let Some(pause) = status.pause() {
            assert!(pause <= MAX_HINT, "pause over MAX_HINT {pause:?}");
        }
        let _ = status.is_reported();
    }
    let _ = should_retry(&headers);
});
