use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::layer::Shared;
use crate::RouteName;

/// The state of one route's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls go through; outcomes are counted.
    Closed,
    /// Calls fail fast with `ErrorKind::CircuitOpen` until the open time has passed.
    Open,
    /// A limited number of probes go through; the first success closes the circuit, a failure
    /// opens it again for longer.
    HalfOpen,
    /// Opened through the handle: calls fail fast until the handle closes or resets it.
    ForcedOpen,
    /// Closed through the handle: every call goes through and nothing is counted, until the
    /// handle resets it.
    ForcedClosed,
}

impl CircuitState {
    /// Stable snake_case name, as used in tracing events.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::ForcedClosed => "forced_closed",
        }
    }

    /// Whether calls are currently refused (open or forced open). A half-open circuit still
    /// admits its probes.
    pub const fn is_open(self) -> bool {
        matches!(self, CircuitState::Open | CircuitState::ForcedOpen)
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A point-in-time view of one route's breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteSnapshot {
    /// The route.
    pub route: RouteName,
    /// Its state.
    pub state: CircuitState,
    /// Calls counted in the sliding window (successes and counting failures; neutral outcomes
    /// such as invalid requests are not counted). Zero when the failure-rate rule is off.
    pub calls: u32,
    /// Counting failures in the sliding window.
    pub failures: u32,
    /// Slow calls in the sliding window.
    pub slow_calls: u32,
    /// Counting failures since the last success.
    pub consecutive_failures: u32,
    /// Consecutive trips since the circuit last closed (the `k` in `open_base × 2^k`).
    pub trips: u32,
    /// While open: time left until a probe is admitted (zero once it has passed and no request
    /// has come yet).
    pub retry_in: Option<Duration>,
    /// Half-open probes currently in flight.
    pub probes_in_flight: u32,
    /// Calls admitted while closed that have no outcome yet; they count in the failure rate's
    /// denominator.
    pub calls_in_flight: u32,
    /// The throttle's window, when the policy has a throttle.
    pub throttle: Option<ThrottleSnapshot>,
}

/// The window of a route's throttle (see
/// [`ThrottlePolicy`](crate::policy::ThrottlePolicy)): the probability of turning a call away is
/// `max(0, (requests − k × accepts) / (requests + 1))`, which
/// [`CircuitBreakerHandle::throttle_probability`] gives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ThrottleSnapshot {
    /// Calls that ended in the window (calls the throttle turned away are not counted), and
    /// calls still in flight that have outlived every refusal of the window.
    pub requests: u32,
    /// Of those, the calls the provider accepted (answered with anything but a failure that
    /// counts for the breaker or a rate limit), the calls in flight counted as accepted.
    pub accepts: u32,
    /// How long the route has been refusing calls: since the first refusal after the last
    /// call it accepted; `None` when the last call to end was accepted (or none has ended).
    /// A request turned away while this is under the policy's
    /// [`hold`](crate::policy::ThrottlePolicy::hold) waits the outage out.
    pub refusing_for: Option<Duration>,
}

/// The callback type of [`CircuitBreakerHandle::on_transition`].
pub(crate) type TransitionFn = dyn Fn(&RouteName, CircuitState, CircuitState) + Send + Sync;

/// Looks at and steers the breakers of a [`CircuitBreakerLayer`](super::CircuitBreakerLayer)
/// from outside the request path: an admin endpoint, a health dashboard, an incident runbook.
///
/// Every method is synchronous and cheap. Clones share the breakers. Routes are named as the
/// breaker keys them: the [`RouteName`] of the request, else its URI authority
/// (`"api.openai.com"`, `"127.0.0.1:8080"`).
#[derive(Clone)]
pub struct CircuitBreakerHandle {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for CircuitBreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("routes", &self.shared.route_names())
            .finish()
    }
}

impl CircuitBreakerHandle {
    /// The state of `route`; `Closed` for a route that has seen no call.
    pub fn state(&self, route: impl Into<RouteName>) -> CircuitState {
        self.shared
            .get(&route.into())
            .map_or(CircuitState::Closed, |r| r.state())
    }

    /// Opens `route` until [`force_closed`](Self::force_closed) or [`reset`](Self::reset):
    /// calls fail fast with `ErrorKind::CircuitOpen` (its `retry_in` is the policy's `open_cap`,
    /// a hint only).
    pub fn force_open(&self, route: impl Into<RouteName>) {
        self.force(route.into(), CircuitState::ForcedOpen);
    }

    /// Closes `route` and keeps it closed whatever its calls do (nothing is counted) until
    /// [`reset`](Self::reset) or [`force_open`](Self::force_open).
    pub fn force_closed(&self, route: impl Into<RouteName>) {
        self.force(route.into(), CircuitState::ForcedClosed);
    }

    /// Forgets everything about `route`: it is closed, with an empty window and no trips.
    pub fn reset(&self, route: impl Into<RouteName>) {
        let route = route.into();
        if let Some(r) = self.shared.get(&route) {
            if let Some(t) = r.force(CircuitState::Closed) {
                self.shared.emit(&route, t);
            }
        }
        self.shared.remove(&route);
    }

    /// Resets every route.
    pub fn reset_all(&self) {
        for route in self.shared.route_names() {
            self.reset(route);
        }
    }

    /// Counts and state of `route`; `None` for a route that has seen no call.
    pub fn snapshot(&self, route: impl Into<RouteName>) -> Option<RouteSnapshot> {
        self.shared
            .get(&route.into())
            .map(|r| r.snapshot(Instant::now()))
    }

    /// The probability that the throttle turns a call to `route` with no backup away now;
    /// `None` when the policy has no throttle or the route has seen no call.
    pub fn throttle_probability(&self, route: impl Into<RouteName>) -> Option<f64> {
        self.shared
            .get(&route.into())
            .and_then(|r| r.throttle_probability(Instant::now()))
    }

    /// Counts and state of every route seen so far, sorted by route name.
    pub fn snapshots(&self) -> Vec<RouteSnapshot> {
        let now = Instant::now();
        let mut all: Vec<RouteSnapshot> = self
            .shared
            .route_names()
            .into_iter()
            .filter_map(|name| self.shared.get(&name).map(|r| r.snapshot(now)))
            .collect();
        all.sort_by(|a, b| a.route.cmp(&b.route));
        all
    }

    /// Calls `f(route, from, to)` on every state transition of every route, after the route's
    /// state has changed (replaces a callback set before). It runs on the thread that caused
    /// the transition, usually inside a request: keep it short and non-blocking.
    pub fn on_transition<F>(&self, f: F)
    where
        F: Fn(&RouteName, CircuitState, CircuitState) + Send + Sync + 'static,
    {
        self.shared.set_on_transition(Arc::new(f));
    }

    fn force(&self, route: RouteName, to: CircuitState) {
        let r = self.shared.route(&route);
        if let Some(t) = r.force(to) {
            self.shared.emit(&route, t);
        }
    }
}
