//! In-band stream error classification on arbitrary `data:` payloads: `classify_stream_error`.
//! Never a panic; an error is always a failure with a class and no status.
#![no_main]

#[path = "checks.rs"]
mod checks;
#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| checks::classify_stream_error_payload(data));
