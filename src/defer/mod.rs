//! The queue rung: requests that can wait are written down and replayed later.
//!
//! The ladder retries what is transient, switches to an approved route when one is down, and
//! waits in the process when capacity is short and the wait is short. When the provider asks for
//! minutes (`Retry-After: 600`, a daily token limit), when every route of the chain is down, or
//! when the local rate limit has no room for a request that can wait (admission mode `defer`),
//! a request of a policy with a `budget.defer` section is **deferred** instead of failed:
//!
//! 1. The budget layer writes a [`DeferredRequest`] to the [`DeferSink`] it was given
//!    ([`BudgetLayer::defer_to`](crate::budget::BudgetLayer::defer_to),
//!    [`ResilienceLayer::defer_to`](crate::ResilienceLayer::defer_to)): who asked, the budget
//!    owner, the route and the policy's workflow, the model, the idempotency key, why, when it is
//!    due, and the request itself (method, URI, headers, body) **without its credentials** —
//!    credential headers and `key=` query parameters are left out, a fingerprint of the key
//!    stays.
//! 2. The caller gets `Err` with [`ErrorKind::Deferred`](crate::ErrorKind::Deferred): the
//!    record's id and when it is due ([`Deferred`]). A gateway answers `202 Accepted` with a
//!    `Location` to poll and a `Retry-After`.
//! 3. A [`DeferredWorker`] takes the record when it is due and replays it through the stack
//!    with the same idempotency key; the answer goes to its callback. A replay that is refused
//!    again is deferred again, one deferral more, until `max_deferrals`; then, or on a failure
//!    that is not transient, the record becomes a dead letter and an alert goes out.
//!
//! Only transient classes are deferred (the policy's `classes`; validation refuses `auth`,
//! `invalid_request`, `policy_block`, `context_overflow`, `quota_exhausted` and
//! `stream_interrupted`): a bad key, a bad request or a safety block still fails closed at once,
//! and a stream that reached its caller is never replayed. A request whose body is not in memory
//! (or is larger than `max_body_bytes`) is not deferred: it fails as it would without the rung.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "testing")]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Layer, ServiceExt};
//! use tower_llm_resilience::defer::{DeferredWorker, MemoryDeferSink, ReplayOutcome};
//! use tower_llm_resilience::{ErrorKind, Policy, ResilienceLayer};
//!
//! // A provider that is out of capacity for ten minutes, then answers.
//! let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
//! let seen = calls.clone();
//! let provider = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
//!     let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     async move {
//!         let resp = match n {
//!             0 => http::Response::builder().status(429).header("retry-after", "600"),
//!             _ => http::Response::builder().status(200),
//!         };
//!         resp.body(Full::new(Bytes::from("{}")))
//!     }
//! });
//!
//! let policy = Policy::batch();
//! let sink = Arc::new(MemoryDeferSink::new());
//! let stack = ResilienceLayer::new(&policy)?.defer_to(sink.clone()).layer(provider);
//!
//! let req = http::Request::post("http://127.0.0.1:9/v1/chat/completions")
//!     .header("authorization", "Bearer sk-never-stored")
//!     .body(Full::new(Bytes::from(r#"{"model":"gpt-4o","messages":[]}"#)))?;
//! let err = stack.clone().oneshot(req).await.err().ok_or("not deferred")?;
//! let ErrorKind::Deferred(deferred) = err.kind() else { return Err("not deferred".into()) };
//! assert_eq!(deferred.retry_in, Duration::from_secs(600));
//!
//! let defer = policy.budget.defer.clone().ok_or("batch defers")?;
//! let mut worker = DeferredWorker::new(stack, sink.clone(), defer).on_result(|replayed| {
//!     assert!(matches!(replayed.outcome, ReplayOutcome::Answered(_)));
//! });
//! assert!(!worker.run_once().await?); // not due yet
//! tokio::time::advance(Duration::from_secs(600)).await;
//! assert!(worker.run_once().await?); // replayed and answered
//! assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```

mod record;
mod sink;
mod worker;

/// The future a [`DeferSink`] answers with (the same as the budget stores').
pub use crate::store::StoreFuture;
pub(crate) use record::{Again, DeferConfig, Parked, Replaying, millis, now_ms};
pub use record::{DeferReason, Deferred, DeferredRequest, Requester};
#[cfg(feature = "testing")]
pub use sink::MemoryDeferSink;
pub use sink::{DeferSink, DeferredStatus, Lease, LeaseEnd, Take};
pub use worker::{DeferredWorker, ReplayOutcome, Replayed};
