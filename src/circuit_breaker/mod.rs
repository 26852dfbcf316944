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
//! That is right when there is a next route. For a request that has none (no
//! [`FallbackAvailable`](crate::context::FallbackAvailable)), failing every call would shed a
//! provider that still answers half of them: such calls are *throttled* instead (see below).
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
//! `retry_in` of zero: a slot frees as soon as a probe ends). `half_open_successes` probes in a
//! row that succeed close the route and reset `k` and the window; a failed one (or, with the
//! slow-call rule on, a slow one) opens it again for the doubled time; a neutral one just frees
//! its slot. A probe whose future is dropped gives its slot back.
//!
//! The defaults probe often (open 300 ms, at most 600 ms) and close only after five good
//! probes: a recovered primary gets its first probe within 600 ms of coming back (and serves
//! it a model's latency later, about a second after on average), while one that still fails
//! every other call almost never answers five in a row and stays behind its backup. When an
//! answer's failure leaves its route's circuit open, the response says so to a `RetryLayer`
//! outside, which then hands a request that has a backup to the fallback at
//! once ([`StopReason::CircuitOpen`](crate::attempt_log::StopReason::CircuitOpen)) instead of
//! waiting out a backoff only to be turned away.
//!
//! # Without a backup route: adaptive throttling
//!
//! With a [`ThrottlePolicy`](crate::policy::ThrottlePolicy) (the default), a call whose request
//! carries no `FallbackAvailable` is judged by the route's throttle, not by its circuit. Over a
//! sliding window (1 s by default) the throttle counts the calls that ended (`requests`) and
//! those the provider accepted (`accepts`: anything but a failure that counts for the breaker
//! or a rate limit), and turns a call away with probability
//! `max(0, (requests − k × accepts) / (requests + 1))` — client-side adaptive throttling as in
//! the Google SRE book, `k = 2`. A healthy route is never throttled, one that answers half its
//! calls hardly, one that is down sheds all but a floor: nothing is turned away while the
//! window holds fewer than `min_requests` requests (spread over the window's buckets), so a
//! route that is down still gets a few calls a second and its recovery is seen as soon as one
//! of them outlives the window's refusals. A call the throttle lets through goes to the
//! provider whatever the circuit says (as a probe when the circuit is due for one) and counts
//! for both, except while the circuit is open with no probe due: then for the throttle only.
//!
//! A turned-away call fails with
//! [`ErrorKind::Throttled { route, retry_in }`](crate::ErrorKind::Throttled) and a
//! [`LocalEventKind::Throttled`](crate::attempt_log::LocalEventKind::Throttled) event, no call
//! made; `retry_in` is the time until the window next moves on. While the route's outage is
//! younger than [`hold`](crate::policy::ThrottlePolicy::hold) (5 s by default), a
//! `RetryLayer` outside waits it out instead: it asks again each time the window moves, and
//! a call let through meanwhile that the route refuses sends the request back to waiting
//! (`retry in … (throttle)` in the log) without using up one of its attempts (the chain's
//! `max_total_attempts` still holds). Past that, or
//! with no `RetryLayer`, the error is the request's: the retry layer treats it like an open
//! circuit (no attempt recorded, the retry's budget refunded, no further retry).
//! The throttle's random draws are seedable
//! ([`throttle_source`](CircuitBreakerLayer::throttle_source), or `policy.retry.seed` through
//! [`from_policy`](CircuitBreakerLayer::from_policy)). A route forced open or closed through
//! the handle is forced for these calls too.
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
//! (or, throttled, a `Throttled`) event in the request's [`AttemptLog`](crate::AttemptLog). An admitted call is recorded as an
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
//! use tower_llm_resilience::context::FallbackAvailable;
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
//! // Requests with a backup route to go to, as `FallbackLayer` marks them (without one, the
//! // calls would be throttled instead of failed fast).
//! let request = || {
//!     http::Request::post("https://api.openai.com/v1/chat/completions")
//!         .extension(FallbackAvailable)
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
pub mod fleet;
mod future;
mod handle;
mod layer;
mod service;
mod state;
mod throttle;

pub use future::ResponseFuture;
pub use handle::{CircuitBreakerHandle, CircuitState, RouteSnapshot, ThrottleSnapshot};
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreaker;
pub(crate) use state::{opened_circuit, wait_out};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod throttle_tests;
