//! Tower middleware that makes calls to AI model APIs recover from failures the way the best
//! production teams do — without hiding real incidents.
//!
//! (Crate docs are completed with the layers.)

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod attempt_log;
pub mod backoff;
mod body;
pub mod budget;
pub mod circuit_breaker;
pub mod classify;
pub mod context;
mod duration;
mod error;
pub mod fallback;
pub mod policy;
pub mod replay;
pub mod reqwest;
pub mod retry;
pub mod retry_budget;
mod stack;
pub mod stream_guard;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use attempt_log::AttemptLog;
pub use body::Body;
pub use classify::{Classification, FailureClass};
pub use context::{Deadline, RouteName};
pub use error::{BoxError, Error, ErrorKind, StreamCause};
pub use policy::{Policy, PolicyError};
pub use retry_budget::RetryBudget;
pub use stack::{ResilienceLayer, Resilient, ServiceBuilderExt};
