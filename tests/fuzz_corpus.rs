//! Every input kept under `fuzz/corpus/` — the seeds in the providers' shapes and each fuzzing
//! finding, kept as `regress-*` — replayed through the fuzz targets' own checks, so the normal
//! test suite holds what fuzzing established. Add a finding by copying its
//! `fuzz/artifacts/<target>/crash-*` file to `fuzz/corpus/<target>/regress-<what>`.

#[path = "../fuzz/fuzz_targets/checks.rs"]
mod checks;
#[path = "../fuzz/fuzz_targets/common.rs"]
mod common;

use std::path::Path;

/// Runs `check` on every kept input of `target`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-") || n.starts_with("regress-"))
        })
        .collect();
    names.sort();
    for path in &names {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target}: {} fails its check",
            path.display()
        );
    }
    names.len()
}

#[test]
fn the_hint_parsers_hold_on_every_kept_input() {
    assert!(replay("hints", checks::hints) >= 10);
}

#[test]
fn response_classification_holds_on_every_kept_input() {
    assert!(replay("classify_response", checks::classify_response) >= 25);
}

#[test]
fn stream_error_classification_holds_on_every_kept_input() {
    assert!(
        replay(
            "classify_stream_error",
            checks::classify_stream_error_payload
        ) >= 10
    );
}

#[test]
fn the_stream_guard_holds_on_every_kept_input() {
    assert!(replay("sse_stream", checks::sse_stream) >= 40);
}
