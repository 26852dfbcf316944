//! Error-body classification on arbitrary status, headers and body:
//! `DefaultClassifier::classify_response`. Never a panic; success statuses stay successes,
//! error statuses always get a class, and no field it keeps grows without bound.
#![no_main]

#[path = "checks.rs"]
mod checks;
#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| checks::classify_response(data));
