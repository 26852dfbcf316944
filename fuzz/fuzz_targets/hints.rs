//! The wait-hint header parsers on arbitrary header maps: `wait_hint`, `rate_limit_status`,
//! `should_retry`. Never a panic; a hint is always positive, whole milliseconds, at most
//! `MAX_HINT`.
#![no_main]

#[path = "checks.rs"]
mod checks;
#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| checks::hints(data));
