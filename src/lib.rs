//! Tower middleware that makes calls to AI model APIs — OpenAI, Anthropic, Gemini, Azure
//! OpenAI, Mistral, Groq, OpenRouter, any OpenAI-compatible gateway — recover from failures
//! without hiding real incidents.
//!
//! # The recovery ladder
//!
//! Every failure is first **classified** ([`FailureClass`]: from the status, the headers and, for
//! error statuses only, a bounded prefix of the provider's error body), then handled by the first
//! rung that allows it:
//!
//! 1. **Retry the same route** ([`retry`]) — transient failures only, with backoff and jitter,
//!    never sooner than the server asked (`Retry-After` is a floor), within the request's deadline
//!    and a shared [`RetryBudget`].
//! 2. **Switch route** ([`fallback`]) — to another model or provider, only where the policy
//!    approves that route for that failure class.
//! 3. **Queue / wait** ([`budget`]) — when capacity is the problem and the workflow tolerates
//!    waiting; interactive work is rejected at once instead.
//! 4. **Fail closed** — auth, invalid request, policy block, exhausted quota or spend cap,
//!    unapproved fallback, or a stream that already reached the caller: the provider's own
//!    response or a typed [`Error`], never a silent reroute.
//!
//! The default action for each class (every cell can be changed in the policy's
//! [`actions`](policy::ClassActions)):
//!
//! | class | same-route retry | fallback | counts for breaker |
//! |---|---|---|---|
//! | `Connect` | yes | yes | yes |
//! | `Timeout`, `Transport` | once, if replay is safe and no fallback exists | yes | yes |
//! | `RateLimited` | yes, at least `Retry-After` | yes | no |
//! | `Overloaded`, `ServerError` | yes | yes | yes |
//! | `Conflict` | yes | no | no |
//! | `QuotaExhausted` | no | only to an approved other budget owner | no |
//! | `ContextOverflow` | no | only to larger-context routes | no |
//! | `InvalidRequest`, `Auth`, `PolicyBlock` | no | no | no |
//! | `StreamInterrupted` | no (never append a second answer) | no | yes |
//!
//! A server's `x-should-retry: true|false` overrides the retry column.
//!
//! # The stack
//!
//! Five layers, each usable alone, stacked in this order by [`ResilienceLayer`] (outermost
//! first):
//!
//! ```text
//! BudgetLayer          admission: rate limit (queue or reject), spend cap, deadline, retry budget
//!  └ FallbackLayer     route chain: primary → approved backups, request rewritten per route
//!     └ RetryLayer     same-route retries: backoff + jitter, Retry-After floor, budget, deadline
//!        └ CircuitBreakerLayer   per-route breaker; open ⇒ fail fast so Fallback moves on
//!           └ StreamGuardLayer   first-token / idle / total timeouts, in-band SSE errors, commit point
//!              └ HTTP client (hyper-util, reqwest through an adapter, any tower Service)
//! ```
//!
//! The breaker sits inside the retry layer so that every attempt counts and an open circuit ends
//! the retries at once; the stream guard sits next to the transport so that a stream that dies
//! before its **commit point** (by default: its first content-bearing event) is an ordinary
//! retryable failure for the layers above, while one that dies after it ends the body with
//! [`ErrorKind::StreamInterrupted`] and is never retried.
//!
//! One [`Policy`] configures all of it — built in code from a preset ([`Policy::interactive`],
//! [`Policy::batch`]) or loaded from a file with the `serde` feature — and every layer validates
//! its section when it is built: a bad value is a [`PolicyError`] naming the field, never a panic.
//!
//! # Example
//!
//! A primary route that is overloaded and a backup that answers; the caller gets the backup's
//! answer and a record of every attempt.
//!
//! ```
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_resilience::policy::RouteConfig;
//! use tower_llm_resilience::{AttemptLog, Policy};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut policy = Policy::interactive();
//! policy.retry.seed = Some(7); // deterministic jitter for the example
//! policy.fallback.routes = vec![
//!     RouteConfig::new("backup")
//!         .base_url("http://backup.invalid/v1")
//!         .model("backup-model"),
//! ];
//!
//! // Stands in for an HTTP client: the primary host is overloaded, the backup answers.
//! let client = service_fn(|req: http::Request<Full<Bytes>>| async move {
//!     let overloaded = req.uri().host() != Some("backup.invalid");
//!     let (status, body) = if overloaded {
//!         (503, r#"{"error":{"message":"overloaded","type":"server_error","code":"server_is_overloaded"}}"#)
//!     } else {
//!         (200, r#"{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}]}"#)
//!     };
//!     let response = http::Response::builder()
//!         .status(status)
//!         .header("content-type", "application/json")
//!         .body(Full::new(Bytes::from(body)))
//!         .unwrap_or_default();
//!     Ok::<_, Infallible>(response)
//! });
//!
//! let service = ServiceBuilder::new().layer(policy.layer()?).service(client);
//!
//! let request = http::Request::post("http://primary.invalid/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(Full::new(Bytes::from(r#"{"model":"gpt-4o","messages":[]}"#)))?;
//! let response = service.oneshot(request).await?;
//!
//! assert_eq!(response.status(), 200);
//! let log = response.extensions().get::<AttemptLog>().cloned().ok_or("log")?;
//! let body = response.into_body().collect().await?.to_bytes();
//! assert!(body.starts_with(b"{\"choices\""));
//!
//! // Three attempts on the primary (backoff between them), then the backup.
//! let snapshot = log.snapshot();
//! assert_eq!(snapshot.attempts.len(), 4);
//! println!("{log}");
//! # Ok(())
//! # }
//! ```
//!
//! The log prints as a table — one line per attempt with its route, timing, status, class,
//! provider request id and the decisions taken after it — and every entry is also a `tracing`
//! event. It holds metadata only: never bodies, never credentials.
//!
//! # Shared pieces
//!
//! - [`policy`] — the [`Policy`] record and its sections.
//! - [`classify`] — [`FailureClass`], [`Classification`], the provider-aware
//!   [`DefaultClassifier`](classify::DefaultClassifier) and server wait hints.
//! - [`attempt_log`] — the [`AttemptLog`] every layer writes to, in the request and response
//!   extensions and on every [`Error`].
//! - [`Error`] / [`ErrorKind`] — the one error type; [`Body`] — the one response body type.
//! - [`replay`] — try-clone request replay; [`context`] — what the layers hand each other.
//! - [`observe`] — metrics (OpenTelemetry GenAI names) and alerts to the people who must act,
//!   fed from the attempt log when a request ends.
//!
//! # Features
//!
//! - `serde` — deserialise [`Policy`] (durations written `"250ms"`, `"9s"`), serialise the
//!   attempt log.
//! - `testing` — [`testing::MockProvider`], a scripted model-API server on loopback for tests.
//! - `reqwest` — `reqwest::ReqwestService`, which makes a `reqwest::Client` (reqwest 0.13) a
//!   tower service (reqwest is built without a TLS stack; enable your own).
//! - `metrics` — metrics through the [`metrics`](https://docs.rs/metrics) facade, to the
//!   recorder the application installs, when the policy's `observability.metrics` is on; see
//!   [`observe`].
//! - `reqwest-middleware` — `reqwest_middleware::ResilienceMiddleware`, the whole stack as one
//!   `reqwest_middleware::Middleware` for `ClientBuilder::with` (reqwest-middleware 0.5); the
//!   response carries the attempt log, crate errors are recovered by downcast. Implies `reqwest`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod attempt_log;
pub mod backoff;
mod body;
pub mod budget;
pub mod cache;
pub mod circuit_breaker;
pub mod classify;
pub mod context;
pub mod defer;
mod duration;
mod error;
pub mod fallback;
pub mod observe;
mod pacing;
pub mod policy;
pub mod redis;
pub mod replay;
pub mod reqwest;
pub mod reqwest_middleware;
pub mod retry;
pub mod retry_budget;
mod route;
mod sse;
mod stack;
mod store;
pub mod stream_guard;
#[cfg(test)]
mod test_support;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
mod timer;

pub use attempt_log::AttemptLog;
pub use attempt_log::StreamCause;
pub use body::Body;
pub use classify::{Classification, FailureClass};
pub use context::{Deadline, RequestContext};
pub use error::{BoxError, Error, ErrorKind};
pub use policy::{Policy, PolicyError};
pub use retry_budget::RetryBudget;
pub use route::RouteName;
pub use stack::{ResilienceLayer, Resilient, ServiceBuilderExt};

// The README's code compiles, as the crate docs' does.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
