//! Circuit breakers shared by a fleet of replicas: the [`HealthStore`] seam and the task that
//! keeps this replica's breakers in step with it.
//!
//! The closed fast path never waits for the store. Each replica's breakers keep their own
//! state, as without a store, and a task of the layer's own exchanges with the store every
//! 100 ms, one round trip per route: the outcomes recorded since the last exchange (so that
//! every replica feeds one sliding window), a trip or a close this replica made, the half-open
//! probe slots it wants and the ones it gives back. The store answers with the fleet's view:
//! a route any replica tripped (or whose fleet-wide failure rate passed the threshold) is open
//! on every replica within one exchange, and half-open probes go only to the replicas the
//! store granted a slot — exactly `half_open_probes` across the fleet, each slot with a TTL so
//! that a prober that died does not keep it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::layer::Shared;
use crate::RouteName;
use crate::policy::StoreMode;
use crate::store::StoreFuture;

/// How often a replica exchanges with the health store: the most a trip elsewhere takes to
/// reach it, and the longest outcomes wait to be counted fleet-wide.
pub const EXCHANGE_EVERY: Duration = Duration::from_millis(100);

/// What a replica tells the store about one route at an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct HealthReport {
    /// Calls that counted as successes since the last exchange.
    pub successes: u32,
    /// Calls that counted as failures since the last exchange.
    pub failures: u32,
    /// This replica tripped the route, for this long.
    pub tripped: Option<Duration>,
    /// This replica closed the route (its probes succeeded, or it was reset).
    pub closed: bool,
    /// Half-open probe slots this replica would use.
    pub want_probes: u32,
    /// Probe slots this replica gives back unused (a probe dropped before its outcome).
    pub release_probes: u32,
}

/// The rules the store judges the fleet's window by: the breaker's policy.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct FleetRules {
    /// The failure rate that trips the route, with its window and minimum of calls.
    pub failure_rate: Option<crate::policy::FailureRateRule>,
    /// How long a fleet-wide trip opens the route.
    pub open_for: Duration,
    /// Probes at once across the fleet.
    pub half_open_probes: u32,
    /// How long a probe slot lives if its holder never gives it back.
    pub probe_ttl: Duration,
}

/// What the store says of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FleetState {
    /// Closed.
    Closed,
    /// Open for this long still.
    Open(Duration),
    /// Half-open: probes may go, to the replicas holding a slot.
    HalfOpen,
}

/// The store's answer to an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FleetHealth {
    /// The route's state across the fleet.
    pub state: FleetState,
    /// Probe slots granted to this replica.
    pub granted: u32,
}

impl FleetHealth {
    /// An answer.
    pub const fn new(state: FleetState, granted: u32) -> Self {
        Self { state, granted }
    }
}

/// Route health shared by replicas: one atomic exchange per route (record outcomes, read the
/// state, acquire and release probe slots, trip or reset), so that a replica's breakers cost
/// the store one round trip per route every [`EXCHANGE_EVERY`], whatever the traffic.
pub trait HealthStore: Send + Sync + 'static {
    /// Exchanges what `replica` saw of `route` for the fleet's view of it.
    fn exchange(
        &self,
        route: &RouteName,
        replica: u64,
        report: HealthReport,
        rules: &FleetRules,
    ) -> StoreFuture<Result<FleetHealth, String>>;
}

/// A breaker layer's link to its health store.
pub(crate) struct Fleet {
    pub(crate) store: Arc<dyn HealthStore>,
    pub(crate) replica: u64,
    pub(crate) mode: StoreMode,
}

/// The task that keeps `shared`'s breakers in step with the fleet, until the layer is gone.
pub(crate) async fn keep_in_step(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(EXCHANGE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(fleet) = shared.fleet() else { return };
        let rules = shared.fleet_rules();
        for route in shared.routes() {
            let report = route.fleet_report(&shared);
            let answer = fleet
                .store
                .exchange(&route.name, fleet.replica, report.clone(), &rules)
                .await;
            match answer {
                Ok(view) => {
                    shared.set_fleet_down(false);
                    route.fleet_apply(&shared, view, tokio::time::Instant::now());
                }
                Err(why) => {
                    // What was to be told is told at the next exchange.
                    route.fleet_unreport(report);
                    if !shared.fleet_down() {
                        tracing::warn!(
                            target: "tower_llm_resilience::circuit_breaker",
                            error = why.as_str(),
                            "health store unavailable: breakers follow their store mode"
                        );
                    }
                    shared.set_fleet_down(true);
                }
            }
        }
    }
}
