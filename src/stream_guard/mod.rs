//! Stream guard: streamed answers that never stall silently, never truncate silently, and never
//! arrive twice.
//!
//! [`StreamGuardLayer`] sits next to the transport, below every other layer of the crate. It
//! watches each response body as it arrives and decides *when* the response is handed up: at
//! the stream's **commit point** ([`CommitPoint`](crate::policy::CommitPoint)). Until then the
//! caller has seen nothing, so any failure is an ordinary, classified, retryable error for the
//! layers above ([`RetryLayer`](crate::retry), [`FallbackLayer`](crate::fallback)); after it,
//! bytes have reached the caller and nothing is retried or appended.
//!
//! # Commit points
//!
//! - `first_event` (default): the response future resolves once the first content-bearing
//!   event arrived — a text, reasoning or tool-call delta; not OpenAI's role-only first delta,
//!   not Anthropic's `message_start`, `content_block_start` or `ping`. For a body that is not an
//!   event stream, the first byte.
//! - `after(bytes)`: once the first content-bearing event arrived *and* that many bytes were
//!   held back.
//! - `after(duration)`: once that long has passed since the first content-bearing event (the
//!   held-back prefix is that much of the answer, however slow its first token was).
//! - `end`: once the stream ended correctly; the whole stream is held back (up to
//!   `max_buffer`) and the caller never sees a partial answer.
//!
//! Whatever the commit point, a stream whose terminal marker arrived is committed at once: it
//! cannot fail any more.
//!
//! # Before the commit point
//!
//! Every failure resolves the response future to an error and drops the connection; the held
//! bytes are discarded:
//!
//! | what | error |
//! |---|---|
//! | no content-bearing event (or byte) within `first_token_timeout`, counted from sending the request | [`ErrorKind::StreamFailed`](crate::ErrorKind::StreamFailed), class `timeout` |
//! | silence longer than `idle_timeout` (from the head on; pings and `:` comments are life) | `StreamFailed`, class `timeout` |
//! | longer than `total_timeout` | `StreamFailed`, class `timeout` |
//! | the body broke | `StreamFailed`, class `transport` |
//! | an in-band error event | `StreamFailed`, classified like its HTTP equivalent (an `overloaded_error` is `overloaded`) |
//! | the stream ended with neither terminal marker nor finish reason | `StreamFailed`, class `transport` |
//! | more than `max_buffer` bytes held back | `StreamFailed`, class `invalid_request`: the same request would outgrow the buffer again, so it is not retried |
//! | a policy or safety block (`finish_reason: content_filter`, `stop_reason: refusal`, `finishReason: SAFETY`, `blockReason`) | [`ErrorKind::FailedClosed`](crate::ErrorKind::FailedClosed) with class `policy_block`: not retried, no other route |
//!
//! # After the commit point
//!
//! The body passes the held-back prefix on, then the rest of the stream as it comes, under the
//! idle and total timers. A stall, a cut, an in-band error (after the chunk that carried it) or
//! a truncated end makes its last item an [`ErrorKind::StreamInterrupted`](crate::ErrorKind::StreamInterrupted)
//! error with the bytes delivered and the cause — never a clean end that looks like success.
//! That error is a crate [`Error`](crate::Error) of class `stream_interrupted`, so the circuit
//! breaker above counts it. A stream that ends after a finish reason without `[DONE]` is
//! complete. A policy block after the commit point ends the stream as the provider ended it
//! (the caller has the finish reason); the log records it as
//! [`StreamEnd::Blocked`](crate::attempt_log::StreamEnd::Blocked). After the terminal marker,
//! a silence or a break only ends the body: the answer is whole.
//!
//! A stream that ends in `StreamInterrupted` may still be finished by the route chain: with
//! `stream.continuation` on, the [`FallbackLayer`](crate::fallback) above hands the partial
//! answer to a prefill-capable backup route and splices its continuation in (see
//! [Continuing a stream](crate::fallback#continuing-a-stream-cut-after-its-commit-point)). The
//! guard itself never continues a stream: it ends it honestly, so the route's breaker counts
//! the failure.
//!
//! Bodies that are not event streams (`content-type` other than `text/event-stream`) get the
//! byte-level timers only: first byte, idle, total. Error responses (non-2xx) are classified
//! and handed up as they are.
//!
//! # What it records
//!
//! The guard is the layer nearest the transport, so it records each attempt in the request's
//! [`AttemptLog`](crate::AttemptLog), with a [`StreamRecord`](crate::attempt_log::StreamRecord):
//! time to first token, bytes delivered, events, duration, how the stream ended, the usage
//! reported by the final events (OpenAI's usage chunk, Anthropic's `message_start` and
//! `message_delta`, Gemini's `usageMetadata`, the Responses API's `response.completed`), and
//! how many malformed events passed through. Malformed events are passed on; they never fail
//! the guard.
//!
//! The scanner is incremental over any chunk boundaries, understands LF, CRLF and CR line
//! endings, multi-line `data:` and comments, and in the steady state neither allocates nor
//! parses: it looks at an event's bytes first and parses JSON only for the few events that
//! may carry a finish reason, usage or an error.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_llm_resilience::policy::Policy;
//! use tower_llm_resilience::stream_guard::StreamGuardLayer;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let policy = Policy::interactive();
//! // Stands in for the HTTP client.
//! let transport = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     let body = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
//!     let response = http::Response::builder()
//!         .header("content-type", "text/event-stream")
//!         .body(Full::new(Bytes::from(body)))?;
//!     Ok::<_, http::Error>(response)
//! });
//! let client = ServiceBuilder::new()
//!     .layer(StreamGuardLayer::new(policy.stream.clone())?)
//!     .service(transport);
//!
//! let request = http::Request::new(Full::new(Bytes::from("{\"stream\":true}")));
//! let response = client.oneshot(request).await?;
//! // Errors in the body are `tower_llm_resilience::Error`s: `StreamInterrupted` after the commit point.
//! let answer = response.into_body().collect().await?.to_bytes();
//! assert!(answer.ends_with(b"data: [DONE]\n\n"));
//! # Ok(())
//! # }
//! ```

mod body;
mod future;
mod layer;
mod service;
#[cfg(test)]
mod tests;

pub use future::ResponseFuture;
pub use layer::StreamGuardLayer;
pub use service::StreamGuard;
