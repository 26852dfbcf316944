//! The idempotent result cache: work that must not run twice.
//!
//! A caller that times out and sends the same logical request again — a job runner, a queue
//! worker, a user pressing "retry" — would pay for a second generation, and for work that
//! changes state get a second, different answer. With `idempotency.cache` in the policy,
//! [`CacheLayer`] (outside every other layer) remembers each complete, successful answer by
//! the request's owner, its idempotency key and the policy's name, and answers the same
//! request sent again within the TTL with it — status, the headers that matter and the body
//! byte for byte (a streamed answer replays as the same events) — without calling any
//! provider or spending any budget. Such an answer carries `x-llm-cache: hit` and a
//! `CacheHit` event in its attempt log; the first one carries `x-llm-cache: miss`.
//!
//! - **Owner, key and policy make the entry.** One tenant can never read another's answer by
//!   sending its key, and two policies never share entries. A request without an idempotency
//!   key, without an owner, or with a body not in memory passes through.
//! - **Single flight.** While the first request with a key is being answered, a second one
//!   waits for its answer (or, with `in_flight = "refuse"`, fails with
//!   [`ErrorKind::InFlight`](crate::ErrorKind::InFlight)); it never starts a second
//!   generation. A first answer that fails, is cut, or is above `max_entry_bytes` is not kept,
//!   and the next request calls the provider.
//! - **The same key with another body** is a client bug: it fails with
//!   [`ErrorKind::IdempotencyKeyReused`](crate::ErrorKind::IdempotencyKeyReused), never
//!   answered with the other request's result.
//! - **Bounded.** [`MemoryCache`] keeps at most `max_entries` answers of at most
//!   `max_entry_bytes` each; with the `redis` feature, `redis::RedisCache` shares them across
//!   replicas (the value with its TTL, and a lock key with an owner token that expires).
//!   Cached bytes are response bodies: they are never logged.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//!
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Layer, ServiceExt, service_fn};
//! use tower_llm_resilience::cache::CacheLayer;
//! use tower_llm_resilience::policy::CachePolicy;
//! use tower_llm_resilience::Policy;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let mut policy = Policy::batch();
//! policy.idempotency.cache = Some(CachePolicy::default());
//! let calls = Arc::new(AtomicUsize::new(0));
//! let provider = service_fn({
//!     let calls = calls.clone();
//!     move |_req: http::Request<Full<Bytes>>| {
//!         calls.fetch_add(1, Ordering::SeqCst);
//!         async { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("answer")))) }
//!     }
//! });
//! let service = CacheLayer::from_policy(&policy)?.layer(provider);
//! let request = || {
//!     http::Request::post("http://api.example/v1/chat/completions")
//!         .header("idempotency-key", "order-42")
//!         .header("x-llm-budget-owner", "team-a")
//!         .body(Full::new(Bytes::from(r#"{"messages":[]}"#)))
//! };
//! for _ in 0..2 {
//!     let response = service.clone().oneshot(request()?).await?;
//!     assert_eq!(response.into_body().collect_bytes().await?, "answer");
//! }
//! assert_eq!(calls.load(Ordering::SeqCst), 1); // the second came from the cache
//! # Ok(())
//! # }
//! ```

mod body;
mod future;
mod layer;
mod service;
mod store;

pub use future::{CACHE_HEADER, ResponseFuture};
pub use layer::CacheLayer;
pub use service::Cache;
pub use store::{CacheKey, CacheStore, CachedAnswer, Claim, MemoryCache};
