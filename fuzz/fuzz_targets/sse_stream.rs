//! The SSE scanner, fuzzed through `StreamGuardLayer`: the fuzz input is a provider's streamed
//! body, cut into chunks at input-chosen boundaries, behind a 200 response. Never a panic; the
//! bytes that reach the caller are always a prefix of the provider's bytes, all of them when
//! the body ends cleanly; an error in the body reports exactly the bytes delivered.
//!
//! Input: one byte of settings (commit point, content type, whether the provider's body breaks
//! at the end), one byte seeding the chunk sizes, then the body.
#![no_main]

#[path = "checks.rs"]
mod checks;
#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| checks::sse_stream(data));
