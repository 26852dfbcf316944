//! What each fuzz target checks, as one function per target. The targets call them on the
//! fuzzer's input; `tests/fuzz_corpus.rs` in the crate calls them on every input kept under
//! `fuzz/corpus/` (the seeds, and each finding as a `regress-*` file), so the normal test suite
//! replays them all.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_resilience::ErrorKind;
use tower_llm_resilience::classify::hints::{MAX_HINT, rate_limit_status, should_retry, wait_hint};
use tower_llm_resilience::classify::{
    Classification, Classifier, DefaultClassifier, classify_stream_error,
};
use tower_llm_resilience::policy::{CommitPoint, StreamPolicy};
use tower_llm_resilience::stream_guard::StreamGuardLayer;

use super::common;

/// The wait-hint header parsers on arbitrary header maps: `wait_hint`, `rate_limit_status`,
/// `should_retry`. Never a panic; a hint is always positive, whole milliseconds, at most
/// `MAX_HINT`.
pub fn hints(data: &[u8]) {
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
}

/// Error-body classification on arbitrary status, headers and body:
/// `DefaultClassifier::classify_response`. Never a panic; success statuses stay successes,
/// error statuses always get a class, and no field it keeps grows without bound.
pub fn classify_response(data: &[u8]) {
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
    bounded(&c);
    // The stored classification prints without panicking.
    let _ = format!("{c:?}");
}

/// What a classification keeps from outside is bounded: a wait hint within `MAX_HINT`, and
/// fields of at most 128 characters.
fn bounded(c: &Classification) {
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

/// In-band stream error classification on arbitrary `data:` payloads: `classify_stream_error`.
/// Never a panic; an error is always a failure with a class and no status.
pub fn classify_stream_error_payload(data: &[u8]) {
    if let Some(c) = classify_stream_error(data) {
        assert!(c.class.is_some(), "an in-band error without a class: {c:?}");
        assert_eq!(c.status, None);
        bounded(&c);
    }
}

/// A provider's body: the chunks as they came off the wire, then optionally a broken connection.
struct Chunks {
    chunks: VecDeque<Bytes>,
    break_at_end: bool,
}

#[derive(Debug)]
struct Broken;
impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset")
    }
}
impl std::error::Error for Broken {}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Broken;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Broken>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if std::mem::take(&mut self.break_at_end) {
            return Poll::Ready(Some(Err(Broken)));
        }
        Poll::Ready(None)
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"))
    })
}

/// The SSE scanner through `StreamGuardLayer`: the input is a provider's streamed body, cut into
/// chunks at input-chosen boundaries, behind a 200 response. Never a panic; the bytes that reach
/// the caller are always a prefix of the provider's bytes, all of them when the body ends
/// cleanly; an error in the body reports exactly the bytes delivered.
///
/// Input: one byte of settings (commit point, content type, whether the provider's body breaks
/// at the end), one byte seeding the chunk sizes, then the body.
pub fn sse_stream(data: &[u8]) {
    let [settings, seed, body @ ..] = data else {
        return;
    };
    let mut policy = StreamPolicy::default();
    policy.commit = match settings & 0b11 {
        0 => CommitPoint::FirstEvent,
        1 => CommitPoint::End,
        2 => CommitPoint::AfterBytes {
            bytes: u64::from(seed % 64) + 1,
        },
        _ => CommitPoint::FirstEvent,
    };
    // A small buffer sometimes, so the overflow path is fuzzed too.
    if settings & 0b1000_0000 != 0 {
        policy.max_buffer = 256;
    }
    let event_stream = settings & 0b100 == 0;
    let break_at_end = settings & 0b1000 != 0;

    // Chunk sizes from a tiny LCG seeded by the input, 1..=max.
    let max = usize::from(seed % 32) + 1;
    let mut state = u32::from(*seed) | 1;
    let mut chunks = VecDeque::new();
    let mut rest = body;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) as usize % max + 1).min(rest.len());
        chunks.push_back(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }

    let provider_body = body.to_vec();
    let transport = tower::service_fn(move |_req: http::Request<String>| {
        let chunks = Chunks {
            chunks: chunks.clone(),
            break_at_end,
        };
        async move {
            let mut response = http::Response::new(chunks);
            let content_type = if event_stream {
                "text/event-stream"
            } else {
                "application/json"
            };
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            Ok::<_, Infallible>(response)
        }
    });
    let layer = match StreamGuardLayer::new(policy) {
        Ok(layer) => layer,
        Err(e) => panic!("a valid policy was refused: {e}"),
    };
    let service = ServiceBuilder::new().layer(layer).service(transport);

    runtime().block_on(async move {
        let response = match service.oneshot(http::Request::new(String::new())).await {
            Ok(response) => response,
            // Failed before the commit point: nothing reached the caller.
            Err(e) => {
                let _ = format!("{e} {e:?}");
                return;
            }
        };
        let mut received = Vec::new();
        let mut body = response.into_body();
        loop {
            match body.frame().await {
                None => {
                    assert_eq!(
                        received, provider_body,
                        "a clean end must deliver the provider's whole stream"
                    );
                    break;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        received.extend_from_slice(&data);
                        assert!(
                            provider_body.starts_with(&received),
                            "delivered bytes are not a prefix of the provider's stream"
                        );
                    }
                }
                Some(Err(e)) => {
                    if let ErrorKind::StreamInterrupted {
                        delivered_bytes, ..
                    } = e.kind()
                    {
                        assert_eq!(*delivered_bytes, received.len() as u64, "{e}");
                    }
                    let _ = format!("{e} {e:?}");
                    break;
                }
            }
        }
    });
}
