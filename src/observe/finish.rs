//! The one place where a finished request's attempt log becomes metric updates, alert
//! candidates and the request's closing `tracing` event.

use super::{Alert, AlertKind, Noted, Observer, key_fingerprint};
use crate::attempt_log::{Attempt, AttemptLog, LocalEventKind, Outcome, Usage, View};
use crate::classify::FailureClass;
use crate::error::ErrorKind;
use crate::route::RouteName;

/// What the log does not say about the end: how a crate error was named, the usage a
/// watched JSON answer reported.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Ended {
    /// The crate error's kind ([`kind_name`]), when the request ended with one.
    pub(crate) error_kind: Option<&'static str>,
    /// A JSON answer's `usage`, read by the watching body.
    pub(crate) json_usage: Option<Usage>,
}

/// The request's end as every consumer reads it.
pub(super) struct End<'a> {
    /// `success`, `provider_failure` or `error`.
    pub(super) outcome: &'static str,
    /// The failure class, else the crate error's kind (`None` for a success).
    pub(super) error_type: Option<&'static str>,
    pub(super) class: Option<FailureClass>,
    pub(super) requested: Option<&'a RouteName>,
    /// The route that answered, else the last one tried.
    pub(super) served: Option<&'a RouteName>,
    /// The attempt the request ended on.
    pub(super) last: Option<&'a Attempt>,
    pub(super) usage: Option<Usage>,
}

impl<'a> End<'a> {
    fn of(v: &View<'a>, ended: &Ended) -> Self {
        let (outcome, class, error_type) = match v.outcome() {
            Some(Outcome::Success { .. }) => ("success", None, None),
            Some(Outcome::ProviderFailure { class, .. }) => (
                "provider_failure",
                *class,
                Some(class.map_or(super::names::OTHER, FailureClass::as_str)),
            ),
            Some(Outcome::Error { class, .. }) => (
                "error",
                *class,
                Some(
                    class
                        .map(FailureClass::as_str)
                        .or(ended.error_kind)
                        .unwrap_or(super::names::OTHER),
                ),
            ),
            None => ("error", None, Some(super::names::OTHER)),
        };
        let last = v.last_attempt();
        let requested = v
            .requested_route()
            .or_else(|| v.attempts().next().and_then(|(a, _)| a.route.as_ref()));
        let served = v
            .selected_route()
            .or_else(|| last.and_then(|a| a.route.as_ref()))
            .or(requested);
        // The booked usage first (a spend cap's settlement, corrected by the application),
        // then the stream guard's record of the answer, then a JSON answer's.
        let answered = error_type.is_none() || class == Some(FailureClass::StreamInterrupted);
        let usage = v
            .usage()
            .or_else(|| {
                answered
                    .then(|| last.and_then(|a| a.stream.as_ref()?.usage))
                    .flatten()
            })
            .or(ended.json_usage);
        Self {
            outcome,
            error_type,
            class,
            requested,
            served,
            last,
            usage,
        }
    }
}

impl Noted {
    /// The request has ended: its log is final.
    pub(crate) fn finish(self, log: &AttemptLog, ended: Ended) {
        let observer = self.observer.clone();
        observer.finish(log, &self, ended);
    }
}

impl Observer {
    fn finish(&self, log: &AttemptLog, noted: &Noted, ended: Ended) {
        log.view(|v| {
            let end = End::of(&v, &ended);
            if v.tracing() {
                closing_event(&v, &end);
            }
            #[cfg(feature = "metrics")]
            if self.metrics {
                super::metrics::request(self, &v, noted, &end);
            }
            if self.alerts.is_some() {
                self.candidates(&v, noted, &end);
            }
        });
    }

    /// The alerts the request's end calls for.
    fn candidates(&self, v: &View<'_>, noted: &Noted, end: &End<'_>) {
        let kind = match end.class.filter(|_| end.error_type.is_some()) {
            Some(FailureClass::Auth) => Some(AlertKind::Auth),
            Some(FailureClass::QuotaExhausted) => Some(AlertKind::QuotaExhausted),
            Some(FailureClass::PolicyBlock) => Some(AlertKind::PolicyBlock),
            _ => None,
        };
        if let Some(kind) = kind {
            self.failed_closed(kind, v, noted, end);
        }
        // One alert per kind and route for the request, however many refusals it met.
        let mut raised: Vec<(AlertKind, Option<&RouteName>)> = Vec::new();
        for e in v.events() {
            let (kind, owner) = match e.kind {
                LocalEventKind::RetryBudgetDenied => (AlertKind::RetryBudgetExhausted, None),
                LocalEventKind::BudgetDenied => (AlertKind::SpendCapReached, v.budget_owner()),
                _ => continue,
            };
            if raised.contains(&(kind, e.route.as_ref())) {
                continue;
            }
            raised.push((kind, e.route.as_ref()));
            self.alert(Alert::new(kind, e.route.clone(), owner.map(str::to_owned)));
        }
    }

    /// The alert of a request that failed closed on the class `kind` stands for.
    fn failed_closed(&self, kind: AlertKind, v: &View<'_>, noted: &Noted, end: &End<'_>) {
        let owner = v.budget_owner();
        // The failing attempt: the last one that failed.
        let failing = v
            .attempts()
            .filter_map(|(a, _)| a.class.map(|_| a))
            .last()
            .or(end.last);
        let route = failing.and_then(|a| a.route.as_ref()).or(end.served);
        let failure = |kind: AlertKind, owner: Option<&str>| {
            let mut alert = Alert::new(kind, route.cloned(), owner.map(str::to_owned));
            alert.class = end.class;
            if let Some(a) = failing {
                alert.status = a.status;
                alert.request_id = a.request_id.clone().filter(|_| v.request_ids());
            }
            alert
        };
        let alert = match kind {
            AlertKind::Auth => {
                let mut alert = failure(kind, owner);
                alert.key_fingerprint = route
                    .and_then(|r| self.facts(r))
                    .and_then(|f| f.fingerprint.clone())
                    .or_else(|| {
                        let key = noted.credential.as_ref()?.to_str().ok()?;
                        Some(key_fingerprint(key))
                    });
                alert
            }
            AlertKind::QuotaExhausted => {
                let route_owner = route
                    .and_then(|r| self.facts(r))
                    .and_then(|f| f.budget_owner.as_deref());
                failure(kind, route_owner.or(owner))
            }
            _ => failure(kind, owner),
        };
        self.alert(alert);
    }
}

/// The request's closing event: the one line an exported log ends with.
fn closing_event(v: &View<'_>, end: &End<'_>) {
    tracing::info!(
        target: "tower_llm_resilience::request",
        requested_route = end.requested.map(RouteName::as_str),
        selected_route = v.selected_route().map(RouteName::as_str),
        attempts = v.attempt_count(),
        outcome = end.outcome,
        error_type = end.error_type,
        duration_ms = v.elapsed().as_millis() as u64,
        budget_owner = v.budget_owner(),
        cost_micros = v.cost_micros(),
        input_tokens = end.usage.map(|u| u.input_tokens),
        output_tokens = end.usage.map(|u| u.output_tokens),
        "request ended"
    );
}

/// The stable name of a crate error's kind: `error.type` when the error has no class.
pub(crate) fn kind_name(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Transport => "transport",
        ErrorKind::CircuitOpen { .. } => "circuit_open",
        ErrorKind::BudgetExhausted { .. } => "budget_exhausted",
        ErrorKind::RateLimited { .. } => "rate_limited",
        ErrorKind::DeadlineExceeded => "deadline_exceeded",
        ErrorKind::FailedClosed { .. } => "failed_closed",
        ErrorKind::StreamFailed { .. } => "stream_failed",
        ErrorKind::StreamInterrupted { .. } => "stream_interrupted",
        ErrorKind::StoreUnavailable => "store_unavailable",
        ErrorKind::Throttled { .. } => "throttled",
        ErrorKind::InFlight => "in_flight",
        ErrorKind::IdempotencyKeyReused => "idempotency_key_reused",
        ErrorKind::Deferred(_) => "deferred",
    }
}
