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
        Self(crate::duration::saturating_add(Instant::now(), after))
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

/// Reserves spend for one more attempt of a request: what a [`SpendGate`] asks.
///
/// `BudgetLayer` implements it over the request's spend reservation; implement it to put a
/// spend cap of your own in front of `RetryLayer` and `FallbackLayer`.
pub trait AttemptAdmission: Send + Sync + 'static {
    /// Reserves, atomically, the estimated maximum cost of one more attempt of the request on
    /// `route`, for the request's budget owner. `Err` when the reservation would take the
    /// owner past its cap (or the route has no price): that attempt must not be made.
    fn admit(&self, route: &RouteName) -> Result<(), SpendDenied>;

    /// Gives back the latest admission on `route`: its attempt will not be made after all.
    fn release(&self, route: &RouteName);
}

/// The spend cap's say on every attempt of a request after the first, as a request extension.
///
/// `BudgetLayer` with a spend cap reserves the first attempt when it admits the request and
/// puts this gate into the request extensions. `RetryLayer` asks it before each retry and
/// `FallbackLayer` before each hop, for the route the attempt goes to; a denial ends the
/// retries or the chain with
/// [`StopReason::SpendCapReached`](crate::attempt_log::StopReason::SpendCapReached) and the
/// caller gets the failure the layer had. A layer that was admitted an attempt and then does
/// not make it (another check refused it, or the attempt was rejected locally without a call)
/// releases it. The owner is always the request's own: a hop to a route of another provider
/// account still spends the same owner's cap.
#[derive(Clone)]
pub struct SpendGate(Arc<dyn AttemptAdmission>);

impl SpendGate {
    /// A gate asking `admission`.
    pub fn new(admission: impl AttemptAdmission) -> Self {
        Self(Arc::new(admission))
    }

    /// Reserves one more attempt on `route`; see [`AttemptAdmission::admit`].
    pub fn admit(&self, route: &RouteName) -> Result<(), SpendDenied> {
        self.0.admit(route)
    }

    /// Gives back the latest admission on `route`; see [`AttemptAdmission::release`].
    pub fn release(&self, route: &RouteName) {
        self.0.release(route);
    }
}

impl fmt::Debug for SpendGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpendGate").finish_non_exhaustive()
    }
}

/// A further attempt the spend cap refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendDenied {
    owner: String,
}

impl SpendDenied {
    /// A denial for `owner`.
    pub fn new(owner: impl Into<String>) -> Self {
        Self {
            owner: owner.into(),
        }
    }

    /// The budget owner whose cap refused the attempt.
    pub fn owner(&self) -> &str {
        &self.owner
    }
}

impl fmt::Display for SpendDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the spend cap of `{}` cannot hold one more attempt",
            self.owner
        )
    }
}

impl std::error::Error for SpendDenied {}
