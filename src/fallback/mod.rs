//! The second rung of the ladder: an ordered route chain that switches only where the policy
//! approves.
//!
//! The request as the caller built it goes to the **primary** route (named
//! `fallback.primary`). When the layers below have given up on a route — the inner future
//! resolved to a failure response or an error: retries spent, or an open circuit, which moves
//! on at once without calling that route — the failure's class decides, per the fallback column
//! of [`ClassActions`](crate::policy::ClassActions):
//!
//! | rule | classes by default | next route |
//! |---|---|---|
//! | `Yes` | connect, timeout, transport, rate limited, overloaded, server error; an open circuit | the next route in the chain |
//! | `LargerContext` | context overflow | the next route marked `larger_context` |
//! | `ApprovedOwner` | quota exhausted | the next route whose `budget_owner` is in `approved_budget_owners` and whose budget is not the one exhausted |
//! | `Never` | invalid request, auth, policy block, conflict, stream interrupted | none: fail closed, the failure is returned as it is |
//!
//! The conditions add up along the chain: once a context overflow was seen, every later route
//! must be larger-context, and once a quota was exhausted, every later route must have an
//! approved budget owner. A crate error that stands for no class (a deadline, a spend cap) is
//! passed on. A policy can override any class explicitly (`actions.<class>.fallback`).
//!
//! # Routes and the rewrite
//!
//! Each backup [`RouteConfig`](crate::policy::RouteConfig) rewrites a copy of the original
//! request (the body must be replayable, see [`ReplayBody`](crate::replay::ReplayBody); a body
//! that is not means no switch, recorded as `stop: not_replayable`):
//!
//! - **base URL**: scheme and authority are replaced; the base path and the request path are
//!   joined so that segments the base path ends with and the request path starts with are
//!   written once (`https://backup.example/v1` + `/v1/chat/completions` →
//!   `https://backup.example/v1/chat/completions`; `https://gw.example/openai/v1` →
//!   `…/openai/v1/chat/completions`). The query is kept; a `host` header, if set, follows.
//! - **model**: only the value of the top-level `"model"` string of the JSON body is replaced;
//!   every other byte is unchanged (no re-serialisation) and `content-length`, if set, is
//!   updated. A body that is not a JSON object with exactly one top-level string `model` is not
//!   switched: the route is skipped and the skip logged (`LocalEventKind::RouteSkipped`).
//! - **headers**: `remove_headers`, then `set_headers`. A route that sets or removes
//!   `authorization`, `x-api-key` or `api-key` must carry `credentials_approved`, or building the
//!   layer fails with a [`PolicyError`](crate::PolicyError).
//!
//! # Which routes can serve the request
//!
//! A route may declare what it lacks ([`Capabilities`](crate::policy::Capabilities): context
//! size, tools, images, JSON mode, streaming), the primary too (`primary_capabilities`). Then
//! each request's [`RequestNeeds`](crate::policy::RequestNeeds) are read once (a caller's
//! extension, else the body) and a route that cannot serve it is never called: a backup is
//! passed over, the primary fails without a call and the chain hops, and a request no route
//! can serve fails closed (`FailedClosed { class: InvalidRequest }`), every skip logged as
//! `RouteSkipped`.
//!
//! # Which route first
//!
//! Under the default `ordered` strategy the primary is tried first and the backups in the order
//! written. `fallback.selection` ([`SelectionPolicy`](crate::policy::SelectionPolicy)) may
//! order each request's routes instead: `weighted` (a seeded draw by weight), `lowest_latency`
//! (a moving estimate of each route's time to its first token, learned from the chain's own
//! answers, with a fraction of requests led by another route so that a recovered route is
//! measured again; a request the route fails doubles its estimate) or `lowest_cost` (the spend
//! policy's prices and the request's token estimate). The strategy only orders: the chain walks
//! that order with every rule above and below (capabilities, paused routes, class constraints,
//! the spend cap, open circuits), its first route is a choice rather than a hop (it uses no
//! `max_hops` and no retry budget), and when every route fails the caller gets the failure of
//! the route tried first. The order and why its first route leads are logged
//! (`LocalEventKind::RouteChosen`). A cut stream's continuation goes to the backups after its
//! route in the same order.
//!
//! # Hedging
//!
//! With `[hedge]` on ([`HedgePolicy`](crate::policy::HedgePolicy), built by
//! [`FallbackLayer::from_policy`]), a request whose first attempt has not reached its commit
//! point after the delay (fixed, or the route's percentile of time to first token) gets one more
//! attempt, on the next route of its order or on the same route. The first to answer with a
//! success is served; the other is cancelled before any byte of it reaches the caller and
//! recorded as a cancelled attempt; when one fails, the other runs on. Hedges are a bounded
//! fraction of requests, withdraw from the retry budget, reserve their spend, and are never
//! sent for a request that is not safe to send twice (a non-idempotent method without an
//! idempotency key) or after a failure no route may be switched for.
//!
//! A route marked `in_process` is served by a tower service given with
//! [`FallbackLayer::route_service`] — a rule-based answer as the chain's last tier, say —
//! with the route's rewritten request, body in memory and credential headers removed.
//!
//! Each request sent inward carries its route's [`RouteName`](crate::RouteName) (the breaker
//! keys on it), [`FallbackAvailable`](crate::context::FallbackAvailable) when an approved route
//! still remains after it (the retry layer then skips a second wait on a silent route), and
//! [`AttemptCap`](crate::context::AttemptCap).
//!
//! # Bounds
//!
//! No hop after `max_hops` switches, nor once the [`AttemptLog`](crate::AttemptLog) holds
//! `max_total_attempts` attempts, nor after the request's [`Deadline`](crate::Deadline).
//!
//! With a `BudgetLayer` outside whose policy turns `pacing` on, each route's answer reports its
//! rate-limit headers to it, and a route the provider announced as exhausted until a reset is
//! passed over until then (`LocalEventKind::RateLimited` with the time left, for that route).
//! Likewise, when that layer's client-side rate limit (keyed by route) has no room for the
//! primary but has for a backup, admission takes the backup's capacity and this layer sends the
//! request there first, without calling the primary.
//!
//! When the request carries a [`SpendGate`](crate::context::SpendGate) (`BudgetLayer` with a
//! spend cap puts one in), each hop then reserves the estimated maximum cost of the next
//! route's first attempt, at that route's price, for the request's own budget owner — the
//! route's `budget_owner` names the provider account it bills, which is what `ApprovedOwner`
//! is about, never whose spend cap pays. A refused route is passed over
//! (`LocalEventKind::BudgetDenied` for it) for the next approved one, which may cost less; with
//! none left the chain stops (`spend_cap_reached`) and the caller gets what it would get with no
//! route left.
//! The retries on that route reserve their own attempts in `RetryLayer`.
//!
//! Last, each hop away from a route that was called withdraws one unit from the
//! [`RetryBudget`](crate::RetryBudget) in the request extensions, if there is one (a hop away
//! from an open circuit replaces a call rather than adding one, so it is free: under a full
//! outage of the primary a healthy backup keeps serving every request); a denial stops the chain
//! (`LocalEventKind::RetryBudgetDenied`) and gives the hop's spend reservation back, as does a
//! hop whose route then makes no call (an open circuit).
//!
//! # What the caller gets
//!
//! - A route succeeded: its response, with the serving route in the response extensions
//!   ([`RouteName`](crate::RouteName)) and in the [`ROUTE_HEADER`] header.
//! - No route succeeded: the **primary** route's failure — its response, body intact, or its
//!   error — never a backup's, with every hop in the log. If the policy has a
//!   `last_resort` and the primary's failure was an outage (rule `Yes`), that static answer is
//!   served instead, marked with [`LAST_RESORT_HEADER`]`: last-resort` and
//!   `LocalEventKind::LastResort`. Request, credential, context and budget failures never get
//!   the static answer: they are the caller's to see.
//!
//! The log records the requested route (the primary), each hop as `Decision::Fallback { to }`
//! on the failed attempt (an open circuit, which made no attempt, as a `CircuitOpen` event), a
//! `Decision::Stop(..)` when the chain ends on a failure, and the selected route: the one whose
//! answer is returned.
//!
//! # Continuing a stream cut after its commit point
//!
//! Off by default. With `stream.continuation` on ([`ContinuationPolicy`](crate::policy::ContinuationPolicy)),
//! [`FallbackLayer::from_policy`] and the service's sender installed
//! ([`Fallback::enable_continuation`]), a served event stream gets a body of this layer that
//! passes it on whole events at a time. When the stream guard below ends it with
//! `StreamInterrupted` for a cause the policy lists (connection lost, idle timeout, in-band
//! error, truncation), the body sends a continuation instead of handing the error on:
//!
//! - to the next backup route after the one serving that marks `supports_prefill`, that the
//!   failure's class and the chain's needs approve (as for a hop), that is not paused, and that
//!   the spend cap and the retry budget admit (the breaker has its say when the request reaches
//!   it); at most `max_continuations` per request, within `max_total_attempts` and the deadline;
//! - with the caller's request, the text the caller has received as the last, assistant
//!   message in the route's [`PrefillForm`](crate::policy::PrefillForm) (plus the policy's
//!   instruction in the `openai` form), rewritten for the route like a hop;
//! - through the layers below this one, so it is retried, guarded and recorded as its own
//!   attempt, after a `Decision::Continue { to, delivered_bytes }` on the cut attempt.
//!
//! Its content events follow in the caller's wire format (the caller's chunk id and choice
//! index, Anthropic content-block indices going on; no second role chunk or `message_start`),
//! then its finish reason, usage and terminal marker. The result is a complete answer — the
//! continuation ended with a finish reason *and* its terminal marker — or a body that ends in
//! `StreamInterrupted` with the bytes the caller got; never a clean end made up. A stream that
//! is not continued (off, a cause not listed, a tool call or reasoning in the answer, text
//! longer than `stream.max_buffer`, no route) ends exactly as without this body.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Layer, ServiceExt, service_fn};
//! use tower_llm_resilience::fallback::{FallbackLayer, ROUTE_HEADER};
//! use tower_llm_resilience::policy::{FallbackPolicy, RouteConfig};
//! use tower_llm_resilience::{AttemptLog, RouteName};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut policy = FallbackPolicy::default();
//! policy.routes.push(
//!     RouteConfig::new("backup")
//!         .base_url("https://backup.example/v1")
//!         .model("backup-model"),
//! );
//! // The primary is overloaded; the backup answers.
//! let transport = service_fn(|req: http::Request<Full<Bytes>>| async move {
//!     let status = if req.uri().host() == Some("backup.example") { 200 } else { 503 };
//!     http::Response::builder().status(status).body(Full::new(Bytes::new()))
//! });
//! let client = FallbackLayer::new(policy)?.layer(transport);
//!
//! let request = http::Request::post("https://api.example/v1/chat/completions")
//!     .body(Full::new(Bytes::from(r#"{"model":"main-model","messages":[]}"#)))?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.status(), 200);
//! assert_eq!(response.headers()[ROUTE_HEADER], "backup");
//! assert_eq!(response.extensions().get::<RouteName>().map(|r| r.as_str()), Some("backup"));
//! let log = response.extensions().get::<AttemptLog>().ok_or("log")?.snapshot();
//! assert_eq!(log.attempts.len(), 2);
//! # Ok(())
//! # }
//! ```

mod body;
mod continuation;
mod future;
mod hedge;
mod layer;
mod local;
mod route;
mod select;
mod service;
#[cfg(test)]
mod tests;

pub use continuation::{ContinuationSender, ContinuationService};
pub use future::ResponseFuture;
pub use layer::FallbackLayer;
pub use service::Fallback;

/// Response header naming the route whose answer is returned (`x-llm-route`).
pub const ROUTE_HEADER: &str = "x-llm-route";

/// Response header marking the static last-resort answer (`x-llm-fallback: last-resort`).
pub const LAST_RESORT_HEADER: &str = "x-llm-fallback";
