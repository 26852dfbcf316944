//! Error-body classification on arbitrary status, headers and body:
//! `DefaultClassifier::classify_response`. Never a panic; success statuses stay successes,
//! error statuses always get a class, and no field it keeps grows without bound.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use tower_llm_resilience::classify::hints::MAX_HINT;
use tower_llm_resilience::classify::{Classifier, DefaultClassifier};

fuzz_target!(|data: &[u8]| {
    let (status, headers, body) = common::response(data);
    let c = DefaultClassifier::new().classify_response(status, &headers, body);
    assert_eq!(c.status, Some(status));
    let error_status = status.is_client_error() || status.is_server_error();
    assert_eq!(
        c.class.is_some(),
        error_status,
        "{status} classified as {:?}",
        c.class
    );
    if let Some(hint) = c.wait_hint {
        assert!(!hint.wait.is_zero() && hint.wait <= MAX_HINT, "{hint:?}");
    }
    for field in [&c.error_type, &c.error_code, &c.request_id]
        .into_iter()
        .flatten()
    {
        assert!(field.chars().count() <= 128, "unbounded field: {field:?}");
    }
    // The stored classification prints without panicking.
    let _ = format!("{c:?}");
});
