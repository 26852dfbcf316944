//! Per-route circuit breakers that trip on provider health, probe, and recover fast.
//!
//! TODO docs
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
