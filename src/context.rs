//! What the layers hand each other through request and response extensions.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_resilience::{Deadline, RouteName};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let mut req = http::Request::post("https://api.example/v1/chat/completions").body(()).unwrap_or_default();
//! assert_eq!(RouteName::of_request(&req).as_str(), "api.example");
//! req.extensions_mut().insert(RouteName::new("primary"));
//! assert_eq!(RouteName::of_request(&req).as_str(), "primary");
//!
//! Deadline::after(Duration::from_secs(30)).tighten(&mut req);
//! Deadline::after(Duration::from_secs(60)).tighten(&mut req); // a later deadline never loosens it
//! let left = req.extensions().get::<Deadline>().map(Deadline::remaining);
//! assert_eq!(left, Some(Duration::from_secs(30)));
//! # }
//! ```

use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;

/// The name of a route: the primary or a backup of the fallback chain.
///
/// `FallbackLayer` puts the route of the current attempt into the request extensions, so that
/// the breaker keys its state by it and the stream guard picks its settings; it also puts the
/// route that served the answer into the response extensions.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteName(Arc<str>);

impl RouteName {
    /// A route name.
    pub fn new(name: impl AsRef<str>) -> Self {
        Self(Arc::from(name.as_ref()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The route of `req`: its `RouteName` extension, else its URI's authority, else `"default"`.
    pub fn of_request<B>(req: &http::Request<B>) -> Self {
        if let Some(r) = req.extensions().get::<RouteName>() {
            return r.clone();
        }
        match req.uri().authority() {
            Some(a) => Self::new(a.as_str()),
            None => Self::new("default"),
        }
    }
}

impl fmt::Debug for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for RouteName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl From<&str> for RouteName {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

/// The instant by which a whole logical request must be answered.
///
/// `BudgetLayer` sets it; `RetryLayer` never sleeps past it and `FallbackLayer` starts no hop
/// after it. The earliest deadline wins when several are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// The deadline `after` from now.
    pub fn after(after: std::time::Duration) -> Self {
        Self(Instant::now() + after)
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> std::time::Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Sets `self` on `req` unless it already carries an earlier deadline.
    pub fn tighten<B>(self, req: &mut http::Request<B>) {
        let ext = req.extensions_mut();
        match ext.get::<Deadline>() {
            Some(d) if d.0 <= self.0 => {}
            _ => {
                ext.insert(self);
            }
        }
    }
}

/// Marks a request for which the fallback chain still has a route to switch to after this one.
///
/// `FallbackLayer` sets it; `RetryLayer` reads it for the classes whose rule is
/// [`RetryRule::OnceUnlessFallback`](crate::policy::RetryRule::OnceUnlessFallback): a silent
/// route rarely recovers within one request, so the backup is tried instead of a second wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackAvailable;

/// The most transport attempts the request's [`AttemptLog`](crate::AttemptLog) may hold,
/// across every route of the fallback chain.
///
/// `FallbackLayer` sets it from `fallback.max_total_attempts` and starts no hop once the log
/// holds that many attempts; a layer that resends on the same route (`RetryLayer`) makes no
/// further attempt once the log holds that many either
/// ([`StopReason::ChainLimit`](crate::attempt_log::StopReason::ChainLimit)). The smallest cap
/// set wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttemptCap(pub u32);

impl AttemptCap {
    /// Sets `self` on `req` unless it already carries a smaller cap.
    pub fn tighten<B>(self, req: &mut http::Request<B>) {
        let ext = req.extensions_mut();
        match ext.get::<AttemptCap>() {
            Some(c) if c.0 <= self.0 => {}
            _ => {
                ext.insert(self);
            }
        }
    }

    /// Whether a log holding `attempts` attempts may make another.
    pub fn allows(&self, attempts: usize) -> bool {
        attempts < self.0 as usize
    }
}
