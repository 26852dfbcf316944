//! Circuit breakers shared on Redis: [`RedisHealth`].

use std::time::Duration;

use ::redis::Value;

use super::{RedisStore, bytes, ms, tag};
use crate::RouteName;
use crate::circuit_breaker::fleet::{
    FleetHealth, FleetRules, FleetState, HealthReport, HealthStore,
};
use crate::store::StoreFuture;

/// Route health shared through Redis by every replica's breakers: one script per route and
/// exchange (see [`fleet`](crate::circuit_breaker::fleet)), on the server's clock, the route's
/// keys under one hash tag. It shares the [`RedisStore`]'s connection.
#[derive(Clone, Debug)]
pub struct RedisHealth {
    store: RedisStore,
}

impl RedisHealth {
    /// Route health on the Redis of `store`.
    pub fn new(store: &RedisStore) -> Self {
        Self {
            store: store.clone(),
        }
    }
}

impl HealthStore for RedisHealth {
    fn exchange(
        &self,
        route: &RouteName,
        replica: u64,
        report: HealthReport,
        rules: &FleetRules,
    ) -> StoreFuture<Result<FleetHealth, String>> {
        let (p, t) = (&self.store.inner.prefix, tag(route.as_str()));
        let keys: Vec<String> = ["health", "hok", "hfail", "probes"]
            .iter()
            .map(|k| format!("{p}:{k}:{{{t}}}"))
            .collect();
        let (threshold, min_calls, window, buckets) = match &rules.failure_rate {
            Some(r) => (r.threshold, r.min_calls, r.window, r.buckets),
            None => (-1.0, 0, Duration::from_secs(60), 1),
        };
        let args = bytes([
            replica.to_string(),
            report.successes.to_string(),
            report.failures.to_string(),
            report.tripped.map_or("0".to_owned(), ms),
            u8::from(report.closed).to_string(),
            report.want_probes.to_string(),
            report.release_probes.to_string(),
            threshold.to_string(),
            min_calls.to_string(),
            ms(window),
            buckets.to_string(),
            rules.half_open_probes.to_string(),
            ms(rules.probe_ttl),
            ms(rules.open_for),
        ]);
        let inner = self.store.inner.clone();
        StoreFuture::new(async move {
            let reply = inner.eval(&inner.scripts.health, &keys, &args).await?;
            let Value::Array(items) = reply else {
                return Err("an unexpected reply".to_owned());
            };
            let n = |i: usize| match items.get(i) {
                Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            };
            let state = match n(0) {
                1 => FleetState::Open(Duration::from_millis(n(1))),
                2 => FleetState::HalfOpen,
                _ => FleetState::Closed,
            };
            Ok(FleetHealth::new(state, u32::try_from(n(2)).unwrap_or(0)))
        })
    }
}
