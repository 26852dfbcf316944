//! Per-route circuit breakers that trip on provider health, probe, and recover fast.
//!
//! A route that is down should not be called again and again: every call costs the caller a
//! timeout, adds load to a provider that is struggling, and keeps the fallback from taking
//! over. [`CircuitBreakerLayer`] keeps one breaker per route and, once a route is judged
//! unhealthy, fails its calls at once with
//! [`ErrorKind::CircuitOpen`](crate::ErrorKind::CircuitOpen) — so a `RetryLayer` outside it
//! stops retrying and a `FallbackLayer` moves on to the next route. It sits inside the retry
//! layer in the recommended stack, so every attempt counts.
//!
//! # Routes
//!
//! The breaker of a call is the one of its route: the [`RouteName`](crate::RouteName) request
//! extension that `FallbackLayer` sets, or else the request URI's authority
//! (`api.openai.com`). Routes are independent: one tripped route leaves the others alone. A
//! route's breaker is created the first time the route is seen and kept until
//! [`CircuitBreakerHandle::reset`] forgets it.
//!
//! # What trips it
//!
//! Each rule the policy enables ([`CircuitBreakerPolicy`](crate::policy::CircuitBreakerPolicy)):
//!
//! - **failure rate** at or above the threshold over a sliding time window, once the window
//!   holds `min_calls` calls (default: 50 % over 60 s, at least 10 calls). The rate is judged
//!   when a failure (or, under the slow-call rule, a slow call) is recorded: a success never
//!   opens a circuit, even one that brings the window up to `min_calls`. Calls still in flight
//!   count in the rate's denominator: a model API fails in milliseconds and answers in seconds,
//!   so among the calls that have *ended* the failures come first, and a fresh window (at
//!   start, or after a close) would otherwise read a 30 % failure rate as 100 %. The window is a ring
//!   of time buckets: old outcomes age out bucket by bucket, so a long healthy past does not
//!   hide a fresh outage, and an old burst does not linger;
//! - **consecutive failures** (default 10: among concurrent calls a run of five fast failures
//!   happens by chance at a 30 % failure rate while the successes are still streaming);
//! - **slow calls** (optional): the share of calls whose response head (with `StreamGuardLayer`
//!   inside, the first token) came later than a threshold.
//!
//! Only failures that say something about the provider's health count: by default connect
//! errors, timeouts, other transport failures, overloaded and server errors, and streams that
//! broke (the `breaker` column of [`ClassActions`](crate::policy::ClassActions)). Invalid
//! requests, auth and permission errors, content filters and quota never trip a breaker,
//! however many; rate limits count only if the policy's actions say so
//! ([`CircuitBreakerLayer::from_policy`]). Those outcomes are *neutral*: neither a failure nor
//! a success, so a flood of bad requests can neither trip a route nor dilute the failure rate
//! of one that is really down.
//!
//! # Streams
//!
//! The response future resolves at the response head. A head that is a success is counted as
//! one at once (so a half-open probe closes at its first token, not minutes later at the end of
//! its stream). Its body is watched: if it then fails with an error whose class counts — a
//! `StreamInterrupted` from `StreamGuardLayer`, a connection lost mid-body — the success is
//! turned into a failure, never counted as a second call. For the same reason a good head does
//! not break a run of consecutive failures; its body's clean end does (or the caller dropping
//! it: an abandoned answer is not the provider's failure). A stream that fails *before* its
//! commit point reaches the breaker as an `ErrorKind::StreamFailed` error and counts by its
//! class like any other error. An in-band error event counts by its own class (a safety block
//! mid-stream does not count, an `overloaded_error` does).
//!
//! # Open, half-open, closed
//!
//! An open route fails fast for `open_base × 2^k`, `k` being the number of consecutive trips,
//! capped at `open_cap`, and jittered *downward* into `[0.8, 1.0)` of that time so routes that
//! tripped together do not probe together and the cap is never exceeded. Then the route is
//! half-open: `half_open_probes` calls go through at once, the others still fail fast (with a
//! `retry_in` of zero: a slot frees as soon as a probe ends). A successful probe closes the
//! route and resets `k` and the window; a failed one (or, with the slow-call rule on, a slow
//! one) opens it again for the doubled time; a neutral one just frees its slot. A probe whose
//! future is dropped gives its slot back.
//!
//! # Readiness
//!
//! `poll_ready` delegates to the inner service: the route, and so whether its circuit is open,
//! is only known when `call` sees the request. A call to an open route then fails without
//! calling the inner service, and the readiness it reserved is used by the next call.
//!
//! # The attempt log
//!
//! A refused call records a [`LocalEventKind::CircuitOpen`](crate::attempt_log::LocalEventKind)
//! event in the request's [`AttemptLog`](crate::AttemptLog). An admitted call is recorded as an
//! attempt only if no crate layer nearer the transport recorded it already; the breaker adds no
//! decision of its own to it.
//!
//! # Cost
//!
//! While a route is closed, admitting a call and counting its outcome take no lock: the state
//! and the window's bucket counters are atomics. A per-route mutex is taken only to rotate a
//! bucket whose time span has passed (at most once per bucket width) and on the rare paths
//! (tripping, open, half-open, the handle). The route map is read-mostly: a shared read lock
//! per call, the write lock only the first time a route is seen.
//!
//! # Steering and watching
//!
//! [`CircuitBreakerLayer::handle`] returns a [`CircuitBreakerHandle`] with synchronous methods:
//! the state of a route, force open, force closed, reset, and snapshots of the counts. Every
//! transition is a `tracing` event (target `tower_llm_resilience::circuit_breaker`, fields
//! `route`, `from`, `to`, `trips`, and `open_ms` when it opens) and calls the callback set
//! with [`on_transition`](CircuitBreakerHandle::on_transition). Built with
//! [`from_policy`](CircuitBreakerLayer::from_policy), the breakers also set the
//! `llm_resilience.circuit.state` gauge and count transitions (feature `metrics`), and alert
//! when a route with no backup in the policy's chain opens (see [`observe`](crate::observe)).
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Layer, Service, ServiceExt};
//! use tower_llm_resilience::circuit_breaker::{CircuitBreakerLayer, CircuitState};
//! use tower_llm_resilience::{ErrorKind, Policy};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = Policy::interactive();
//! let layer = CircuitBreakerLayer::from_policy(&policy)?;
//! let breakers = layer.handle();
//! breakers.on_transition(|route, from, to| println!("{route}: {from} -> {to}"));
//!
//! // A provider that is down.
//! let provider = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
//!     let mut response = http::Response::new(Full::new(Bytes::new()));
//!     *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
//!     Ok::<_, Infallible>(response)
//! });
//! let mut client = layer.layer(provider);
//! let request = || {
//!     http::Request::post("https://api.openai.com/v1/chat/completions")
//!         .body(Full::new(Bytes::from_static(b"{}")))
//! };
//!
//! // Ten consecutive 503s trip the default policy...
//! for _ in 0..10 {
//!     let response = client.ready().await?.call(request()?).await?;
//!     assert_eq!(response.status(), 503);
//! }
//! assert_eq!(breakers.state("api.openai.com"), CircuitState::Open);
//!
//! // ...and the next call fails fast, without reaching the provider.
//! let error = client.ready().await?.call(request()?).await.unwrap_err();
//! assert!(matches!(error.kind(), ErrorKind::CircuitOpen { .. }));
//! # Ok(())
//! # }
//! ```

mod body;
mod future;
mod handle;
mod layer;
mod service;
mod state;

pub use future::ResponseFuture;
pub use handle::{CircuitBreakerHandle, CircuitState, RouteSnapshot};
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreaker;

#[cfg(test)]
mod tests;
