//! Alerts: what they say, who receives them, and how they leave the request path.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::classify::FailureClass;
use crate::route::RouteName;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum AlertKind {
    /// Requests fail closed on [`FailureClass::Auth`]: the provider refused the route's
    /// credential. For the credential's owner: the alert names the route and the key's
    /// fingerprint, never the key.
    Auth,
    /// Requests fail closed on [`FailureClass::QuotaExhausted`] and no route of an approved
    /// other budget owner could take them. For the budget owner.
    QuotaExhausted,
    /// A provider blocked a request on policy (content filter, safety) and it failed closed.
    /// For review.
    PolicyBlock,
    /// A route's circuit opened and no backup route follows it in the chain: its requests fail
    /// fast until it closes.
    CircuitOpenNoBackup,
    /// The retry budget refused a retry or a hop: failures reach callers without the retries
    /// that would have hidden them.
    RetryBudgetExhausted,
    /// A budget owner's spend cap refused a request or one more attempt of it.
    SpendCapReached,
    /// A deferred request was given up (deferred too often, or its replay failed on a class
    /// that is not deferred): the work was not done. For the budget owner.
    DeadLetter,
}

impl AlertKind {
    /// Every kind.
    pub const ALL: [AlertKind; 7] = [
        AlertKind::Auth,
        AlertKind::QuotaExhausted,
        AlertKind::PolicyBlock,
        AlertKind::CircuitOpenNoBackup,
        AlertKind::RetryBudgetExhausted,
        AlertKind::SpendCapReached,
        AlertKind::DeadLetter,
    ];

    /// Stable snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            AlertKind::Auth => "auth",
            AlertKind::QuotaExhausted => "quota_exhausted",
            AlertKind::PolicyBlock => "policy_block",
            AlertKind::CircuitOpenNoBackup => "circuit_open_no_backup",
            AlertKind::RetryBudgetExhausted => "retry_budget_exhausted",
            AlertKind::SpendCapReached => "spend_cap_reached",
            AlertKind::DeadLetter => "dead_letter",
        }
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One alert: metadata only — kinds, route names, owners, statuses, classes, a provider
/// request id, a key's fingerprint. Never a body, never a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Alert {
    /// What it is about.
    pub kind: AlertKind,
    /// The policy's workflow name.
    pub workflow: String,
    /// The route concerned.
    #[cfg_attr(feature = "serde", serde(serialize_with = "route_opt"))]
    pub route: Option<RouteName>,
    /// Whom to tell: the budget owner (the route's, for an exhausted quota; the request's
    /// otherwise), when one is known.
    pub owner: Option<String>,
    /// For [`AlertKind::Auth`]: the fingerprint of the refused key
    /// ([`key_fingerprint`](super::key_fingerprint)), when the request carried one.
    pub key_fingerprint: Option<String>,
    /// The provider's HTTP status of the failing attempt, if it answered.
    pub status: Option<u16>,
    /// The failure class of the failing attempt.
    pub class: Option<FailureClass>,
    /// The provider's request id of the failing attempt (when the log records them), for the
    /// provider's support.
    pub request_id: Option<String>,
    /// Alerts of the same kind, route and owner that were not sent since the last one that
    /// was (they fell in its window).
    pub suppressed: u64,
}

impl Alert {
    pub(crate) fn new(kind: AlertKind, route: Option<RouteName>, owner: Option<String>) -> Self {
        Self {
            kind,
            workflow: String::new(),
            route,
            owner,
            key_fingerprint: None,
            status: None,
            class: None,
            request_id: None,
            suppressed: 0,
        }
    }
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = self.route.as_ref().map_or("-", RouteName::as_str);
        match self.kind {
            AlertKind::Auth => {
                write!(f, "route `{route}` refused its credential")?;
                if let Some(k) = &self.key_fingerprint {
                    write!(f, " (key {k})")?;
                }
                f.write_str(": requests fail closed; tell the credential's owner")?;
            }
            AlertKind::QuotaExhausted => write!(
                f,
                "route `{route}` has exhausted its quota and no approved owner can take over: \
                 requests fail closed; tell the budget owner"
            )?,
            AlertKind::PolicyBlock => write!(
                f,
                "a provider blocked a request on route `{route}` on policy and it failed closed; \
                 for review"
            )?,
            AlertKind::DeadLetter => write!(
                f,
                "a deferred request for route `{route}` was given up and kept as a dead letter: \
                 the work was not done; tell the budget owner"
            )?,
            AlertKind::CircuitOpenNoBackup => write!(
                f,
                "the circuit of route `{route}` opened and no backup route follows it: its \
                 requests fail fast until it closes"
            )?,
            AlertKind::RetryBudgetExhausted => write!(
                f,
                "the retry budget refused a retry on route `{route}`: failures reach callers \
                 unretried"
            )?,
            AlertKind::SpendCapReached => write!(
                f,
                "a spend cap refused a request on route `{route}`: the owner's budget is spent"
            )?,
        }
        if let Some(o) = &self.owner {
            write!(f, " (owner `{o}`)")?;
        }
        if self.suppressed > 0 {
            write!(f, "; {} more since the last alert", self.suppressed)?;
        }
        Ok(())
    }
}

#[cfg(feature = "serde")]
fn route_opt<S: serde::Serializer>(r: &Option<RouteName>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_str(r.as_str()),
        None => s.serialize_none(),
    }
}

/// The future an [`AlertSink`] returns.
pub type AlertFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Where alerts go: implement it to page someone, post to a webhook, open a ticket.
///
/// The stack never calls it on a request's path: alerts wait in a bounded queue that a task
/// on the stack's tokio runtime drains, one alert at a time, awaiting each future. A sink may
/// take its time; while it does, later alerts wait in the queue, and one that finds the queue
/// full is dropped and counted ([`Observability::alerts_dropped`](super::Observability)). What
/// the sink fails to deliver is its own to log or retry.
pub trait AlertSink: Send + Sync + 'static {
    /// Delivers `alert`.
    fn send(&self, alert: Alert) -> AlertFuture;
}

/// The default [`AlertSink`]: one `tracing` event at error level per alert (target
/// `tower_llm_resilience::alert`; fields `kind`, `workflow`, `route`, `owner`,
/// `key_fingerprint`, `status`, `class`, `request_id`, `suppressed`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingAlerts;

impl AlertSink for TracingAlerts {
    fn send(&self, alert: Alert) -> AlertFuture {
        tracing::error!(
            target: "tower_llm_resilience::alert",
            kind = alert.kind.as_str(),
            workflow = alert.workflow.as_str(),
            route = alert.route.as_ref().map(RouteName::as_str),
            owner = alert.owner.as_deref(),
            key_fingerprint = alert.key_fingerprint.as_deref(),
            status = alert.status,
            class = alert.class.map(FailureClass::as_str),
            request_id = alert.request_id.as_deref(),
            suppressed = alert.suppressed,
            "{alert}"
        );
        Box::pin(std::future::ready(()))
    }
}

/// The dedup key: one alert per kind, route and owner and window.
type Key = (AlertKind, Option<RouteName>, Option<String>);

/// One key's window.
struct Slot {
    opened: Instant,
    suppressed: u64,
}

/// Past this many keys, those whose window is over and that hold no count are forgotten.
const MAX_KEYS: usize = 1024;

/// Deduplicates alerts and hands them to the sink off the request path.
pub(crate) struct Alerts {
    workflow: String,
    window: Duration,
    capacity: usize,
    slots: Mutex<HashMap<Key, Slot>>,
    queue: Mutex<Queue>,
    sink: Arc<RwLock<Arc<dyn AlertSink>>>,
    pub(crate) sent: AtomicU64,
    pub(crate) suppressed: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

/// The queue's sending side, and its receiving side until a task takes it.
struct Queue {
    tx: mpsc::Sender<Alert>,
    rx: Option<mpsc::Receiver<Alert>>,
}

impl Queue {
    fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        Self { tx, rx: Some(rx) }
    }
}

impl Alerts {
    pub(crate) fn new(workflow: &str, window: Duration, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            workflow: workflow.to_owned(),
            window,
            capacity,
            slots: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue::new(capacity)),
            sink: Arc::new(RwLock::new(Arc::new(TracingAlerts))),
            sent: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    pub(crate) fn set_sink(&self, sink: Arc<dyn AlertSink>) {
        *self.sink.write().unwrap_or_else(|p| p.into_inner()) = sink;
    }

    /// Raises `alert` unless one of its key was sent within the window; then it is counted,
    /// and the count goes with the next one sent. Returns whether it was sent.
    pub(crate) fn raise(&self, mut alert: Alert) -> bool {
        let now = Instant::now();
        {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let key = (alert.kind, alert.route.clone(), alert.owner.clone());
            if let Some(slot) = slots.get_mut(&key) {
                if now.saturating_duration_since(slot.opened) < self.window {
                    slot.suppressed += 1;
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                alert.suppressed = std::mem::take(&mut slot.suppressed);
                slot.opened = now;
            } else {
                if slots.len() >= MAX_KEYS {
                    let window = self.window;
                    slots.retain(|_, s| {
                        s.suppressed > 0 || now.saturating_duration_since(s.opened) < window
                    });
                }
                slots.insert(
                    key,
                    Slot {
                        opened: now,
                        suppressed: 0,
                    },
                );
            }
        }
        alert.workflow.clone_from(&self.workflow);
        self.enqueue(alert);
        true
    }

    /// Puts `alert` in the queue and makes sure a task drains it.
    fn enqueue(&self, alert: Alert) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.tx.is_closed() {
            // The task's runtime is gone (or its sink panicked): start afresh.
            *q = Queue::new(self.capacity);
        }
        match q.tx.try_send(alert) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                let alert = match e {
                    mpsc::error::TrySendError::Full(a) | mpsc::error::TrySendError::Closed(a) => a,
                };
                tracing::warn!(
                    target: "tower_llm_resilience::alert",
                    kind = alert.kind.as_str(),
                    route = alert.route.as_ref().map(RouteName::as_str),
                    "alert dropped: the alert sink is behind"
                );
            }
        }
        // Without a runtime the alerts wait in the queue for the first call that has one.
        if q.rx.is_some() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                if let Some(rx) = q.rx.take() {
                    rt.spawn(deliver(rx, self.sink.clone()));
                }
            }
        }
    }
}

/// The task that hands queued alerts to the sink, one at a time.
async fn deliver(mut rx: mpsc::Receiver<Alert>, sink: Arc<RwLock<Arc<dyn AlertSink>>>) {
    while let Some(alert) = rx.recv().await {
        let sink = sink.read().unwrap_or_else(|p| p.into_inner()).clone();
        sink.send(alert).await;
    }
}

impl fmt::Debug for Alerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alerts")
            .field("window", &self.window)
            .field("capacity", &self.capacity)
            .field("sent", &self.sent)
            .field("suppressed", &self.suppressed)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<Alert>>>);

    impl AlertSink for Kept {
        fn send(&self, alert: Alert) -> AlertFuture {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(alert);
            Box::pin(async {})
        }
    }

    fn alert(kind: AlertKind, owner: &str) -> Alert {
        Alert::new(
            kind,
            Some(RouteName::new("primary")),
            Some(owner.to_owned()),
        )
    }

    #[test]
    fn without_a_runtime_alerts_wait_and_nothing_panics() {
        let alerts = Alerts::new("w", Duration::from_secs(60), 4);
        let kept = Kept::default();
        alerts.set_sink(Arc::new(kept.clone()));
        assert!(alerts.raise(alert(AlertKind::Auth, "a")));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(alerts.raise(alert(AlertKind::Auth, "b")));
            for _ in 0..5 {
                tokio::task::yield_now().await;
            }
        });
        let got = kept.0.lock().unwrap().clone();
        let owners: Vec<_> = got
            .iter()
            .map(|a| a.owner.clone().unwrap_or_default())
            .collect();
        assert_eq!(owners, ["a", "b"]);
        assert!(got.iter().all(|a| a.workflow == "w"));
    }

    #[test]
    fn one_alert_per_kind_route_and_owner_in_a_window() {
        let alerts = Alerts::new("w", Duration::from_secs(60), 16);
        assert!(alerts.raise(alert(AlertKind::Auth, "a")));
        assert!(!alerts.raise(alert(AlertKind::Auth, "a")));
        assert!(alerts.raise(alert(AlertKind::Auth, "b")));
        assert!(alerts.raise(alert(AlertKind::PolicyBlock, "a")));
        let other_route = Alert::new(AlertKind::Auth, Some(RouteName::new("backup")), None);
        assert!(alerts.raise(other_route.clone()));
        assert!(!alerts.raise(other_route));
        assert_eq!(alerts.sent.load(Ordering::Relaxed), 4);
        assert_eq!(alerts.suppressed.load(Ordering::Relaxed), 2);
    }
}
