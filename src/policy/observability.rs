use std::time::Duration;

use super::error::{PolicyError, check};

/// What the stack reports about itself: metrics, and alerts to the people who must act.
///
/// Both are fed from the attempt log when a logical request ends (see
/// [`observe`](crate::observe)): the numbers always agree with the log.
///
/// - **Metrics** (feature `metrics`, off by default) go through the `metrics` facade to the
///   recorder the application installs (Prometheus, OpenTelemetry, StatsD…). Label values come
///   from bounded sets only: failure classes, the policy's route names, and the models this
///   section and the fallback chain name.
/// - **Alerts** (on by default) go to the [`AlertSink`](crate::observe::AlertSink), by default
///   error-level `tracing` events, off the request path, at most one per (kind, route, owner)
///   in each `alert_window`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct ObservabilityPolicy {
    /// Record metrics through the `metrics` facade. Needs the crate's `metrics` feature: a
    /// policy that asks for metrics from a build without it is rejected.
    pub metrics: bool,
    /// Label the spend counter by budget owner. Off by default: every owner becomes a series
    /// of its own, and owners can be many.
    pub owner_label: bool,
    /// Models labelled by name in `gen_ai.request.model` and `gen_ai.response.model`, besides
    /// the routes' models and `fallback.allowed_models`. Any other model is `_OTHER`: a label
    /// value never comes from a request.
    pub models: Vec<String>,
    /// Send alerts to the alert sink.
    pub alerts: bool,
    /// One alert per (kind, route, owner) in this window; the ones after it are counted and
    /// the count travels with the next alert sent for the same key.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub alert_window: Duration,
    /// Alerts waiting for the sink, at most. One that finds the queue full is dropped, counted
    /// and logged: a slow sink never holds a request.
    pub alert_queue: usize,
}

impl Default for ObservabilityPolicy {
    /// No metrics; alerts on, one per five minutes and key, at most 64 waiting.
    fn default() -> Self {
        Self {
            metrics: false,
            owner_label: false,
            models: Vec::new(),
            alerts: true,
            alert_window: Duration::from_secs(300),
            alert_queue: 64,
        }
    }
}

impl ObservabilityPolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.metrics && !cfg!(feature = "metrics") {
            return Err(PolicyError::new(
                "observability.metrics",
                "needs the crate's `metrics` feature",
            ));
        }
        if let Some(i) = self.models.iter().position(|m| m.trim().is_empty()) {
            return Err(PolicyError::new(
                format!("observability.models[{i}]"),
                "must not be empty",
            ));
        }
        check::positive("observability.alert_window", self.alert_window)?;
        check::at_least_one("observability.alert_queue", self.alert_queue as u64)?;
        Ok(())
    }
}
