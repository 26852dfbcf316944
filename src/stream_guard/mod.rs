//! Stream guard: streamed answers that never stall silently, never truncate silently, and never
//! arrive twice.
//!
//! Work in progress.

mod body;
mod future;
mod layer;
mod service;
mod sse;
#[cfg(test)]
mod tests;

pub use future::ResponseFuture;
pub use layer::StreamGuardLayer;
pub use service::StreamGuard;
