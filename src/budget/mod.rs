//! Admission: whether a request may start at all, and how much recovery it may spend.
//!
//! [`BudgetLayer`] is the outermost layer of the stack. It sees each *logical* request once —
//! the retries and fallback hops below it are its attempts — and does five things:
//!
//! - **Retry budget.** Every request deposits once into the shared [`RetryBudget`] and carries a
//!   handle to it in its extensions; `RetryLayer` withdraws per retry and `FallbackLayer` per
//!   hop, and log a denied one as `retry_budget_denied`. Under a full outage the load sent stays
//!   close to the load received.
//! - **Deadline.** With `deadline` set, the request carries a [`Deadline`] extension (an earlier
//!   one set by the caller wins); the layers below never wait past it, and this layer fails the
//!   request with `ErrorKind::DeadlineExceeded` if no response head has come by then.
//! - **Rate limits.** Token buckets for requests per second (with a burst) and for model tokens
//!   per minute, keyed by route or by budget owner. A request's tokens are its prompt estimate
//!   plus its output bound, from a [`TokenEstimator`] (the [`DefaultEstimator`] reads the JSON
//!   body; it needs the body in memory, which is why the request body must implement
//!   [`ReplayBody`](crate::replay::ReplayBody) — bodies that are not in memory are estimated from
//!   `content-length`). A request larger than the whole token bucket waits for a full bucket.
//!   `AdmissionMode::Reject` fails at once with `ErrorKind::RateLimited { retry_in }`, `retry_in`
//!   being exactly when capacity returns; `AdmissionMode::Queue { max_wait, max_queued }` waits
//!   in first-come-first-served order per key and route, at most `max_queued` requests in all;
//!   a request that would wait longer than `max_wait` (or past its deadline) is refused with
//!   `RateLimited`; a request whose caller gives up leaves the line at once. The wait is logged as
//!   a `queued` event.
//! - **Pacing.** With `pacing` on, a response reporting zero remaining requests or tokens
//!   (`x-ratelimit-remaining-*: 0` with `x-ratelimit-reset-*`, `anthropic-ratelimit-*-remaining:
//!   0` with its RFC 3339 `-reset`) pauses admission to that route until the reset — queued or
//!   rejected per the admission mode — instead of sending requests that can only end in a 429.
//!   Other routes are unaffected. With `FallbackLayer` inside, the answer of every route in the
//!   chain is noted (not only the one that reaches the caller), and a hop to a paused route is
//!   skipped with a `rate_limited` event for that route, like a hop to an open circuit.
//! - **Spend cap.** Each budget owner ([`BudgetOwner`] extension, else the `owner_header`, else
//!   the policy's `default_owner`; none fails closed) may spend `cap` cost units per `window`,
//!   priced per route (input and output tokens per million). Every attempt — the first, each
//!   retry, each hop — reserves its maximum cost before it is sent (see below). Amounts are
//!   integer micro units internally, so sums are exact.
//!
//! # Reservation and settlement
//!
//! The cap is enforced per **attempt**, before it is sent: each attempt reserves its estimated
//! *maximum* cost — prompt estimate plus output bound, at the price of the route it goes to —
//! atomically in the [`BudgetStore`]. A reservation that would take the owner past its cap is
//! refused; the owner is always the request's own.
//!
//! - **The first attempt** is reserved here, when the request is admitted, at the price of its
//!   route (with [`BudgetLayer::from_policy`], the primary of the fallback chain). A request
//!   that cannot afford it never starts: it fails closed with
//!   `ErrorKind::BudgetExhausted { owner }` and a `budget_denied` event.
//! - **Every further attempt** is reserved by the layer that makes it, through the
//!   [`SpendGate`] this layer puts into the request extensions: `RetryLayer` before each retry,
//!   `FallbackLayer` before each hop, at the price of the route the attempt goes to. A refused
//!   reservation means that attempt is not made: the layer logs a `budget_denied` event, stops
//!   with `spend_cap_reached`, and hands back the failure it had — the request is never spent
//!   through another owner's budget, and a hop to a route billed to another provider account
//!   (`budget_owner`, approved for quota failures) still spends the request owner's cap. The
//!   gate is asked after every other check of the retry or hop, and the retry budget is
//!   withdrawn from after it: a retry or hop refused for any reason costs neither, and a
//!   reservation whose attempt is then not made (the retry budget refused it, or a layer
//!   inside rejected it without a call, such as an open circuit) is given back at once. A
//!   route without a price is refused like an exhausted cap.
//!
//! Reservations are held until the request settles, so concurrent requests of one owner, and
//! the retries and hops of each, never overrun the cap together.
//!
//! When the request ends it is settled from its attempt log. The answer is charged its real
//! usage — reported by the application through the [`SpendReceipt`] in the response
//! extensions, else from the stream guard's record of the final stream event, else the JSON
//! `usage` of the body within the classifier's peek bound (or the `usage` of stream events);
//! a success whose usage stays unknown keeps its attempt's reservation. Failed and partial
//! attempts are charged as [`ChargeRule`](crate::policy::ChargeRule) says: their reported
//! usage, else nothing, or their attempt's reservation (always, or only for attempts the
//! provider may have accepted: timeouts, broken streams). Everything else reserved for the
//! request — every attempt's reservation, whatever layer made it — is released. Settlement
//! happens when the response body ends or is dropped, on an error, or when the caller abandons
//! the request. The attempt log records the owner (`budget_owner`), the cost booked
//! (`cost_micros`) and the usage booked with it, so one exported log is the whole record.
//!
//! # The request's end
//!
//! As the stack's outermost layer, `BudgetLayer` ([`from_policy`](BudgetLayer::from_policy))
//! reports the end of every request whose log it owns to the policy's metrics and alerts (see
//! [`observe`](crate::observe)), once the log is final: with an error, or at the end of the
//! answer's body (after its settlement) when metrics are on or a spend cap applies.
//!
//! So booked spend stays within the cap as long as real usage stays within the estimate: a
//! failed attempt is charged at most its own reservation. Only usage above the estimate (the
//! provider billed more than the prompt estimate plus the output bound, or an attempt made by a
//! layer that does not ask the gate) can take an owner above its cap in a window; its next
//! requests are then denied until the window turns.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_resilience::budget::{BudgetLayer, BudgetOwner};
//! use tower_llm_resilience::policy::{BudgetPolicy, Price, RateLimitPolicy, SpendPolicy};
//! use tower_llm_resilience::{ErrorKind, RequestContext};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut rate = RateLimitPolicy::default();
//! rate.tokens_per_minute = Some(100_000);
//! let mut spend = SpendPolicy::default();
//! spend.cap = 5.0; // cost units per owner per day
//! spend.default_price = Some(Price::new(2.5, 10.0)); // per million input / output tokens
//! let mut budget = BudgetPolicy::default();
//! budget.deadline = Some(Duration::from_secs(60));
//! budget.rate_limit = Some(rate);
//! budget.spend = Some(spend);
//!
//! let layer = BudgetLayer::new(budget)?;
//! let spend = layer.spend().expect("a spend cap is set");
//! let client = ServiceBuilder::new().layer(layer).service(service_fn(
//!     |req: http::Request<Full<Bytes>>| async move {
//!         assert!(RequestContext::of(&req).and_then(|c| c.deadline()).is_some());
//!         let body = r#"{"usage":{"prompt_tokens":10,"completion_tokens":20}}"#;
//!         let resp = http::Response::builder()
//!             .header("content-type", "application/json")
//!             .body(Full::new(Bytes::from(body)))?;
//!         Ok::<_, http::Error>(resp)
//!     },
//! ));
//!
//! let mut req = http::Request::post("https://api.example.com/v1/chat/completions")
//!     .body(Full::new(Bytes::from(r#"{"messages":[],"max_tokens":1000}"#)))?;
//! req.extensions_mut().insert(BudgetOwner::new("team-a"));
//! let resp = client.oneshot(req).await?;
//! resp.into_body().collect_bytes().await?; // settles: 10 × 2.5 + 20 × 10 per million
//! assert_eq!(spend.status("team-a").await?.spent, 225);
//! # Ok(())
//! # }
//! ```

mod body;
mod estimate;
mod future;
mod layer;
mod rate_limit;
mod service;
mod spend;
pub mod store;

pub use estimate::{
    DEFAULT_MAX_OUTPUT_TOKENS, DefaultEstimator, MESSAGE_OVERHEAD_TOKENS, TokenEstimate,
    TokenEstimator,
};
pub use future::ResponseFuture;
pub use layer::BudgetLayer;
pub use service::Budget;
pub use spend::{BudgetOwner, SpendHandle, SpendReceipt};
pub use store::{
    BudgetStore, Lease, MICROS_PER_UNIT, MemoryStore, RateDemand, Refusal, SpendStatus, StoreFuture,
};

#[doc(no_inline)]
pub use crate::context::{AttemptAdmission, Deadline, SpendDenied, SpendGate};
#[doc(no_inline)]
pub use crate::retry_budget::RetryBudget;

#[cfg(test)]
mod tests;
