//! Same-route retries: the first rung of the recovery ladder.
//!
//! [`RetryLayer`] sends a failed request to the same route again when — and only when — all of
//! these allow it:
//!
//! - **The failure class.** The attempt's [`Classification`](crate::Classification) (read from
//!   the response extensions if a layer nearer the transport classified it, else made by the
//!   layer's classifier) picks the class's [`RetryRule`](crate::policy::RetryRule) from the
//!   policy's [`ClassActions`](crate::policy::ClassActions). By default rate limits, overload,
//!   server errors, conflicts and connect failures are retried; timeouts and other transport
//!   failures at most once and not when `FallbackLayer` marked that another route remains
//!   ([`FallbackAvailable`](crate::context::FallbackAvailable)); quota, context overflow, bad
//!   requests, auth and policy blocks never. A server's `x-should-retry: true|false` overrides
//!   the rule both ways.
//! - **Replay safety.** The request is copied with try-clone semantics
//!   ([`ReplayBody`](crate::replay::ReplayBody)); a body that cannot be copied means one attempt
//!   (`not_replayable` in the log). A request the provider may already have accepted (a timeout,
//!   a connection lost after sending) is sent again only as the idempotency policy's
//!   `replay_possibly_accepted` says — by default only when it carries an idempotency key (the
//!   policy's `key_header`, else `Idempotency-Key`) or its method is idempotent.
//! - **The server's wait.** `Retry-After` and friends are a floor, rounded up to the millisecond,
//!   with jitter only on top. A wait above `max_server_wait` ends the retries at once
//!   (`server_wait_above_cap`), so a fallback can act instead of the caller sleeping.
//! - **The deadline.** `start + max_elapsed`, tightened by a [`Deadline`](crate::Deadline) in the
//!   request extensions. A wait that would reach it ends the retries at once
//!   (`deadline_exceeded`); the layer never sleeps past it and starts no attempt after it. An
//!   attempt still in flight at the deadline (no response head, or its error body still
//!   arriving) is cancelled, logged as a timeout stopped by the deadline, and the caller gets
//!   [`ErrorKind::DeadlineExceeded`](crate::ErrorKind::DeadlineExceeded). (Bounding the time
//!   to a first token, and a stream after its head, is the work of `StreamGuardLayer`.)
//! - **The retry budget.** Each retry withdraws from a shared [`RetryBudget`](crate::RetryBudget):
//!   the one `BudgetLayer` put into the request extensions, else the layer's own. A denied retry
//!   is a `retry_budget_denied` stop and a local event in the log. A granted retry that makes no
//!   call — an open circuit inside refused it, readiness failed, or the request was dropped
//!   while it waited — gives its withdrawal back. The layer deposits into its
//!   own budget once per logical request and hands it down in the request's context, so that
//!   the request's later hops (through `FallbackLayer`, a hedge) draw on it rather than deposit
//!   again; a budget that came in the extensions is deposited into by the layer that put it
//!   there.
//! - **The spend cap.** When the request carries a [`SpendGate`](crate::context::SpendGate)
//!   (`BudgetLayer` with a spend cap puts one in), each retry first reserves its estimated
//!   maximum cost at the route's price for the request's budget owner. A refusal is a
//!   `spend_cap_reached` stop and a `budget_denied` event, and the caller gets the failure the
//!   layer had. The gate is asked after every other check and before the retry budget is
//!   withdrawn from: a retry refused by the spend cap withdraws nothing, and one refused by the
//!   retry budget gives its reservation back, as does one that an inner layer rejects without
//!   a call (an open circuit). The first attempt is never asked for: whoever sent the request
//!   here (`BudgetLayer`, or `FallbackLayer` for a hop) reserved it.
//! - **`max_attempts`**, the first attempt included.
//! - **A young outage is waited out.** When the breaker inside marks a refusal as a young
//!   outage's — its route has no backup for the request and has been refusing for less than
//!   [`ThrottlePolicy::hold`](crate::policy::ThrottlePolicy::hold) — the request is not
//!   failed: the layer waits until the throttle's window moves (no attempt, its claims kept)
//!   and sends it again, within the deadline. A call made while it waits that the route
//!   refuses is an attempt in the log, `retry in … (throttle)`, and does not count against
//!   `max_attempts`: the throttle's floor bounds those calls, and the chain's cap on attempts
//!   (`fallback.max_total_attempts`) still holds, as do the class's rule and the idempotency
//!   rule.
//!
//! Waits follow the class's backoff curve ([`RetryPolicy::backoff_for`](crate::policy::RetryPolicy::backoff_for):
//! full jitter by default, also equal, decorrelated or none), from a seedable jitter source.
//! While the layer waits, it reads and drops what has arrived of the retried response's body
//! (up to 64 KiB) so that the connection can be reused; whatever has not arrived when the wait
//! ends is dropped with its connection, so draining never delays the next attempt. Before each
//! retry the inner service's readiness is polled again.
//!
//! With an idempotency `key_header` set, a request without that header gets one random key,
//! sent unchanged on every attempt; with `attempt_header` set, every attempt carries its number
//! (`0` for the first).
//!
//! Every attempt and decision lands in the request's [`AttemptLog`](crate::AttemptLog): the wait
//! before each retry and whether it came from the backoff or the server, or the reason for
//! stopping. The log's tracing events carry `http.request.resend_count`. When the layer created
//! the log, it sets the outcome and puts the log into the response extensions; crate errors
//! always carry it.
//!
//! The caller gets the provider's last response as it came (status, headers and body intact,
//! with the log and the classification in its extensions), or a crate [`Error`](crate::Error).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//!
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_resilience::{AttemptLog, Policy, retry::RetryLayer};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut policy = Policy::interactive();
//! policy.retry.max_attempts = 3;
//! policy.retry.seed = Some(7); // deterministic jitter
//!
//! // A provider that is overloaded once, then answers.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let provider = service_fn(move |_req: http::Request<Full<Bytes>>| {
//!     let n = calls.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let status = if n == 0 { 503 } else { 200 };
//!         let response = http::Response::builder()
//!             .status(status)
//!             .body(Full::new(Bytes::from_static(b"{}")))
//!             .unwrap_or_default();
//!         Ok::<_, Infallible>(response)
//!     }
//! });
//!
//! let mut client = ServiceBuilder::new()
//!     .layer(RetryLayer::from_policy(&policy)?)
//!     .service(provider);
//!
//! let request = http::Request::post("http://api.example/v1/chat/completions")
//!     .body(Full::new(Bytes::from_static(b"{\"model\":\"gpt-4o\"}")))?;
//! let response = client.ready().await?.call(request).await?;
//! assert_eq!(response.status(), 200);
//!
//! let log = response.extensions().get::<AttemptLog>().ok_or("no log")?;
//! assert_eq!(log.attempt_count(), 2);
//! println!("{log}");
//! # Ok(())
//! # }
//! ```

mod future;
mod key;
pub(crate) use key::KeyGenerator;
mod layer;
mod service;

pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use service::Retry;

#[cfg(test)]
mod tests;
