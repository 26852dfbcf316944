//! In-band stream error classification on arbitrary `data:` payloads: `classify_stream_error`.
//! Never a panic; an error is always a failure with a class and no status.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_llm_resilience::classify::classify_stream_error;
use tower_llm_resilience::classify::hints::MAX_HINT;

fuzz_target!(|data: &[u8]| {
    if let Some(c) = classify_stream_error(data) {
        assert!(c.class.is_some(), "an in-band error without a class: {c:?}");
        assert_eq!(c.status, None);
        if let Some(hint) = c.wait_hint {
            assert!(!hint.wait.is_zero() && hint.wait <= MAX_HINT, "{hint:?}");
        }
        for field in [&c.error_type, &c.error_code, &c.request_id]
            .into_iter()
            .flatten()
        {
            assert!(field.chars().count() <= 128, "unbounded field: {field:?}");
        }
    }
});
