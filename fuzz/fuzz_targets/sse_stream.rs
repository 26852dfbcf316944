//! The SSE scanner, fuzzed through `StreamGuardLayer`: the fuzz input is a provider's streamed
//! body, cut into chunks at input-chosen boundaries, behind a 200 response. Never a panic; the
//! bytes that reach the caller are always a prefix of the provider's bytes, all of them when
//! the body ends cleanly; an error in the body reports exactly the bytes delivered.
//!
//! Input: one byte of settings (commit point, content type, whether the provider's body breaks
//! at the end), one byte seeding the chunk sizes, then the body.
#![no_main]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_resilience::ErrorKind;
use tower_llm_resilience::policy::{CommitPoint, StreamPolicy};
use tower_llm_resilience::stream_guard::StreamGuardLayer;

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

fuzz_target!(|data: &[u8]| {
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
});
