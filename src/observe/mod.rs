//! Watching the ladder at work: metrics and alerts, fed from the attempt log.
//!
//! When a logical request ends, the stack's outermost layer ([`BudgetLayer`], the first layer
//! [`ResilienceLayer`] builds) turns its [`AttemptLog`] into metric updates, alert candidates
//! and one closing `tracing` event, in one place: no layer keeps a second count, so the
//! numbers always agree with the log. A request ends with its error, or — when metrics are on
//! or a spend cap applies — with the end of its answer's body (a stream's last event, an
//! interruption after the commit point, the caller dropping it); otherwise when its answer's
//! head is handed over. The circuit breakers report their transitions themselves, when they
//! happen.
//!
//! The [`ObservabilityPolicy`](crate::policy::ObservabilityPolicy) section switches both on or
//! off.
//!
//! # Metrics
//!
//! Behind the `metrics` feature and `observability.metrics = true`, through the
//! [`metrics`](https://docs.rs/metrics) facade to whatever recorder the application installs
//! (a Prometheus exporter, an OpenTelemetry bridge, StatsD…). Without the feature nothing is
//! compiled in; with it and the policy's switch off, a request pays one branch. [`names`] lists
//! every metric and attribute: `gen_ai.client.operation.duration`,
//! `gen_ai.client.operation.time_to_first_chunk` and `gen_ai.client.token.usage` after the
//! OpenTelemetry GenAI semantic conventions, and the crate's own under `llm_resilience.`
//! (attempts, retries by class, fallbacks, local rejections, circuit state and transitions,
//! retry-budget exhaustion, spend, interrupted streams, queue waits, alerts).
//!
//! Label values come from bounded sets only: failure classes, error kinds, the policy's route
//! names, the models the policy names (a route's `model`, `fallback.allowed_models`,
//! `observability.models`), the hosts of the routes. Anything else is `_OTHER`; nothing a
//! request carries becomes a label. Spend is labelled by budget owner only when
//! `observability.owner_label` says so.
//!
//! # Alerts
//!
//! An [`AlertSink`] (by default [`TracingAlerts`]: error-level `tracing` events) is told when:
//!
//! | [`AlertKind`] | when | whom it is for |
//! |---|---|---|
//! | `Auth` | a request fails closed on `auth` | the credential's owner: the route and the key's fingerprint ([`key_fingerprint`]), never the key |
//! | `QuotaExhausted` | a request fails closed on `quota_exhausted` (no approved other owner took it) | the route's budget owner (`fallback.primary_budget_owner`, a route's `budget_owner`), else the request's |
//! | `PolicyBlock` | a request fails closed on `policy_block` | review |
//! | `CircuitOpenNoBackup` | a route's circuit opens and no route follows it in the chain | the route's operators |
//! | `RetryBudgetExhausted` | the retry budget refuses a retry or a hop | monitoring |
//! | `SpendCapReached` | a spend cap refuses a request or one more attempt | the budget owner |
//!
//! Alerts are deduplicated per (kind, route, owner) over `observability.alert_window`: an
//! outage sends one alert per window, not one per request, and the next alert of the same key
//! carries how many were suppressed in between. They leave the request path through a bounded
//! queue drained by a task on the stack's tokio runtime: a request never waits for a sink, and
//! a full queue drops (and counts) an alert rather than hold a request. They carry metadata
//! only.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use tower_llm_resilience::observe::{Alert, AlertFuture, AlertSink};
//! use tower_llm_resilience::{Policy, ResilienceLayer};
//!
//! /// Keeps the alerts in memory, as a pager would queue them.
//! #[derive(Clone, Default)]
//! struct Pager(Arc<Mutex<Vec<Alert>>>);
//!
//! impl AlertSink for Pager {
//!     fn send(&self, alert: Alert) -> AlertFuture {
//!         let pager = self.0.clone();
//!         Box::pin(async move { pager.lock().unwrap_or_else(|p| p.into_inner()).push(alert) })
//!     }
//! }
//!
//! # fn main() -> Result<(), tower_llm_resilience::PolicyError> {
//! let mut policy = Policy::interactive();
//! policy.observability.alert_window = std::time::Duration::from_secs(600);
//! let pager = Pager::default();
//! let layer = ResilienceLayer::new(&policy)?.alert_sink(pager.clone());
//! let watch = layer.observability();
//! assert_eq!(watch.alerts_sent(), 0);
//! # drop(layer);
//! # Ok(())
//! # }
//! ```
//!
//! [`BudgetLayer`]: crate::budget::BudgetLayer
//! [`ResilienceLayer`]: crate::ResilienceLayer
//! [`AttemptLog`]: crate::AttemptLog

mod alert;
mod body;
mod finish;
#[cfg(feature = "metrics")]
mod metrics;
pub mod names;

use std::fmt;
use std::sync::Arc;
#[cfg(feature = "metrics")]
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use http::{HeaderMap, HeaderName, HeaderValue};

pub use alert::{Alert, AlertFuture, AlertKind, AlertSink, TracingAlerts};
pub(crate) use body::Watched;
pub(crate) use finish::{Ended, kind_name};

use crate::policy::{CREDENTIAL_HEADERS, Policy};
use crate::replay::ReplayBody;
use crate::route::RouteName;
use alert::Alerts;

/// The fingerprint of a key as alerts name it: `sha256:` and the first 16 hex digits of the
/// SHA-256 of the key (a `Bearer ` prefix is not part of the key). It tells keys apart and
/// cannot be turned back into the key; compute the same from a key with
/// `printf %s "$KEY" | sha256sum | cut -c1-16`.
///
/// ```
/// use tower_llm_resilience::observe::key_fingerprint;
///
/// assert_eq!(key_fingerprint("sk-test"), key_fingerprint("Bearer sk-test"));
/// assert_eq!(key_fingerprint("sk-test").len(), "sha256:".len() + 16);
/// assert!(!key_fingerprint("sk-test").contains("sk-test"));
/// ```
pub fn key_fingerprint(key: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write as _;
    let key = key.trim();
    let key = key
        .strip_prefix("Bearer ")
        .or_else(|| key.strip_prefix("bearer "))
        .unwrap_or(key)
        .trim();
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(23);
    out.push_str("sha256:");
    for b in &digest[..8] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A handle on what the stack reports: alert counts and the alert sink. From
/// [`ResilienceLayer::observability`](crate::ResilienceLayer::observability); clones share one
/// state.
#[derive(Clone)]
pub struct Observability {
    observer: Arc<Observer>,
}

impl Observability {
    /// Alerts handed to the sink's queue so far.
    pub fn alerts_sent(&self) -> u64 {
        self.observer
            .alerts
            .as_ref()
            .map_or(0, |a| a.sent.load(Ordering::Relaxed))
    }

    /// Alerts not sent because one of the same kind, route and owner was sent within the
    /// window.
    pub fn alerts_suppressed(&self) -> u64 {
        self.observer
            .alerts
            .as_ref()
            .map_or(0, |a| a.suppressed.load(Ordering::Relaxed))
    }

    /// Alerts dropped because the sink's queue was full.
    pub fn alerts_dropped(&self) -> u64 {
        self.observer
            .alerts
            .as_ref()
            .map_or(0, |a| a.dropped.load(Ordering::Relaxed))
    }

    /// Whether the policy records metrics.
    pub fn metrics_enabled(&self) -> bool {
        self.observer.metrics
    }

    /// Sends alerts to `sink` from now on (every layer sharing this state).
    pub fn set_alert_sink(&self, sink: impl AlertSink) {
        self.observer.set_sink(Arc::new(sink));
    }
}

impl fmt::Debug for Observability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observability")
            .field("metrics", &self.observer.metrics)
            .field("alerts", &self.observer.alerts)
            .finish()
    }
}

/// What the policy says about one route of the chain.
#[derive(Debug)]
struct RouteFacts {
    name: RouteName,
    /// The route's name as a label value.
    #[cfg(feature = "metrics")]
    label: Arc<str>,
    #[cfg(feature = "metrics")]
    model: Option<Arc<str>>,
    #[cfg(feature = "metrics")]
    address: Option<Arc<str>>,
    budget_owner: Option<String>,
    /// The fingerprint of the credential the route sets, if it sets one.
    fingerprint: Option<String>,
    /// Whether a route follows it in the chain.
    has_backup: bool,
}

/// Interned request hosts, at most this many; the rest are `_OTHER`.
#[cfg(feature = "metrics")]
const MAX_ADDRESSES: usize = 16;

/// What turns finished requests and breaker transitions into metrics and alerts. Built once
/// per stack from the policy and shared by its layers.
pub(crate) struct Observer {
    routes: Vec<RouteFacts>,
    /// Models that may be label values.
    #[cfg(feature = "metrics")]
    models: Vec<Arc<str>>,
    /// Request hosts seen, as label values.
    #[cfg(feature = "metrics")]
    addresses: Mutex<Vec<Arc<str>>>,
    /// Whether metrics are recorded (never without the feature).
    metrics: bool,
    #[cfg(feature = "metrics")]
    owner_label: bool,
    alerts: Option<Alerts>,
}

impl Observer {
    pub(crate) fn from_policy(policy: &Policy) -> Arc<Self> {
        let o = &policy.observability;
        let fb = &policy.fallback;
        let mut routes = vec![RouteFacts {
            name: RouteName::new(&fb.primary),
            #[cfg(feature = "metrics")]
            label: Arc::from(fb.primary.as_str()),
            #[cfg(feature = "metrics")]
            model: None,
            #[cfg(feature = "metrics")]
            address: None,
            budget_owner: fb.primary_budget_owner.clone(),
            fingerprint: None,
            has_backup: false,
        }];
        for r in &fb.routes {
            #[cfg(feature = "metrics")]
            let address = r
                .base_url
                .as_deref()
                .and_then(|u| u.parse::<http::Uri>().ok())
                .and_then(|u| u.host().map(Arc::from));
            let fingerprint = r
                .set_headers
                .iter()
                .find(|(h, _)| CREDENTIAL_HEADERS.iter().any(|c| c.eq_ignore_ascii_case(h)))
                .map(|(_, v)| key_fingerprint(v));
            routes.push(RouteFacts {
                name: RouteName::new(&r.name),
                #[cfg(feature = "metrics")]
                label: Arc::from(r.name.as_str()),
                #[cfg(feature = "metrics")]
                model: r.model.as_deref().map(Arc::from),
                #[cfg(feature = "metrics")]
                address,
                budget_owner: r.budget_owner.clone(),
                fingerprint,
                has_backup: false,
            });
        }
        let n = routes.len();
        for (i, r) in routes.iter_mut().enumerate() {
            r.has_backup = i + 1 < n && fb.max_hops > 0;
        }
        #[cfg(feature = "metrics")]
        let models = {
            let mut models: Vec<Arc<str>> = Vec::new();
            let named = fb
                .routes
                .iter()
                .filter_map(|r| r.model.as_deref())
                .chain(fb.allowed_models.iter().map(String::as_str))
                .chain(o.models.iter().map(String::as_str));
            for m in named {
                if !models.iter().any(|k| &**k == m) {
                    models.push(Arc::from(m));
                }
            }
            models
        };
        let observer = Self {
            routes,
            #[cfg(feature = "metrics")]
            models,
            #[cfg(feature = "metrics")]
            addresses: Mutex::new(Vec::new()),
            metrics: o.metrics && cfg!(feature = "metrics"),
            #[cfg(feature = "metrics")]
            owner_label: o.owner_label,
            alerts: o
                .alerts
                .then(|| Alerts::new(&policy.workflow, o.alert_window, o.alert_queue)),
        };
        #[cfg(feature = "metrics")]
        if observer.metrics {
            metrics::describe();
        }
        Arc::new(observer)
    }

    pub(crate) fn handle(self: &Arc<Self>) -> Observability {
        Observability {
            observer: self.clone(),
        }
    }

    pub(crate) fn set_sink(&self, sink: Arc<dyn AlertSink>) {
        if let Some(a) = &self.alerts {
            a.set_sink(sink);
        }
    }

    fn facts(&self, route: &RouteName) -> Option<&RouteFacts> {
        self.routes.iter().find(|r| r.name == *route)
    }

    /// Position in the chain.
    #[cfg(feature = "metrics")]
    fn chain_index(&self, route: &RouteName) -> Option<usize> {
        self.routes.iter().position(|r| r.name == *route)
    }

    /// What the owner notes about a request when it arrives, for its end: only what is on.
    pub(crate) fn note<B: ReplayBody>(self: &Arc<Self>, req: &http::Request<B>) -> Noted {
        #[cfg(feature = "metrics")]
        let (operation, model, address) = if self.metrics {
            (
                operation_of(req.uri().path()),
                self.model_of(req.body()),
                self.address_of(req.uri()),
            )
        } else {
            ("", None, None)
        };
        let credential = if self.alerts.is_some() {
            credential_of(req.headers())
        } else {
            None
        };
        Noted {
            observer: self.clone(),
            #[cfg(feature = "metrics")]
            operation,
            #[cfg(feature = "metrics")]
            model,
            #[cfg(feature = "metrics")]
            address,
            credential,
        }
    }

    /// Whether a request's end is its answer's body end: metrics read the whole answer.
    pub(crate) fn watches_bodies(&self) -> bool {
        self.metrics
    }

    /// The request's `model`, if the policy names it, else `_OTHER`; `None` when the body is
    /// not in memory or names no model.
    #[cfg(feature = "metrics")]
    fn model_of<B: ReplayBody>(&self, body: &B) -> Option<Arc<str>> {
        let bytes = body.to_bytes()?;
        let model = model_field(&bytes)?;
        Some(
            self.models
                .iter()
                .find(|m| m.as_bytes() == model)
                .cloned()
                .unwrap_or_else(|| Arc::from(names::OTHER)),
        )
    }

    /// The request's host, interned (at most [`MAX_ADDRESSES`] of them).
    #[cfg(feature = "metrics")]
    fn address_of(&self, uri: &http::Uri) -> Option<Arc<str>> {
        let host = uri.host()?;
        let mut seen = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = seen.iter().find(|a| &***a == host) {
            return Some(a.clone());
        }
        if seen.len() >= MAX_ADDRESSES {
            return Some(Arc::from(names::OTHER));
        }
        let a: Arc<str> = Arc::from(host);
        seen.push(a.clone());
        Some(a)
    }

    /// A circuit changed state (`from` and `to` as `CircuitState::as_str` names them).
    pub(crate) fn transition(&self, route: &RouteName, from: &'static str, to: &'static str) {
        #[cfg(feature = "metrics")]
        if self.metrics {
            metrics::transition(self.route_label(route), from, to);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = from;
        // Forced states are an operator's decision, not news for them.
        if to == "open" && !self.facts(route).is_some_and(|r| r.has_backup) {
            self.alert(Alert::new(
                AlertKind::CircuitOpenNoBackup,
                Some(route.clone()),
                None,
            ));
        }
    }

    /// A route's breaker was made (it starts closed).
    pub(crate) fn route_seen(&self, route: &RouteName) {
        #[cfg(feature = "metrics")]
        if self.metrics {
            metrics::circuit_state(self.route_label(route), "closed");
        }
        #[cfg(not(feature = "metrics"))]
        let _ = route;
    }

    fn alert(&self, alert: Alert) {
        let Some(alerts) = &self.alerts else {
            return;
        };
        #[cfg(feature = "metrics")]
        let kind = alert.kind;
        let sent = alerts.raise(alert);
        #[cfg(feature = "metrics")]
        if self.metrics {
            metrics::alert(kind, sent);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = sent;
    }

    /// The route as a label value: its name when the policy names it, else `_OTHER`.
    #[cfg(feature = "metrics")]
    fn route_label(&self, route: &RouteName) -> ::metrics::SharedString {
        match self.facts(route) {
            Some(f) => ::metrics::SharedString::from(f.label.clone()),
            None => ::metrics::SharedString::const_str(names::OTHER),
        }
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("routes", &self.routes.len())
            .field("metrics", &self.metrics)
            .field("alerts", &self.alerts)
            .finish_non_exhaustive()
    }
}

/// What the log's owner noted about a request when it arrived, kept in its context for its
/// end.
pub(crate) struct Noted {
    observer: Arc<Observer>,
    /// `gen_ai.operation.name`.
    #[cfg(feature = "metrics")]
    operation: &'static str,
    /// `gen_ai.request.model`.
    #[cfg(feature = "metrics")]
    model: Option<Arc<str>>,
    /// The request's host.
    #[cfg(feature = "metrics")]
    address: Option<Arc<str>>,
    /// The request's credential, for the fingerprint of an auth alert (alerts only). Only
    /// ever read to compute that fingerprint.
    credential: Option<HeaderValue>,
}

impl Noted {
    pub(crate) fn observer(&self) -> &Observer {
        &self.observer
    }
}

impl fmt::Debug for Noted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Noted")
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

/// `gen_ai.operation.name` from a request path.
#[cfg(feature = "metrics")]
fn operation_of(path: &str) -> &'static str {
    let path = path.trim_end_matches('/');
    if path.ends_with("/chat/completions")
        || path.ends_with("/messages")
        || path.ends_with("/responses")
        || path.ends_with("/converse")
        || path.ends_with("/converse-stream")
    {
        "chat"
    } else if path.ends_with("/completions") {
        "text_completion"
    } else if path.ends_with("/embeddings") || path.ends_with(":embedContent") {
        "embeddings"
    } else if path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent") {
        "generate_content"
    } else {
        names::OTHER
    }
}

#[cfg(feature = "metrics")]
/// The first `"model": "…"` string of a JSON body, as raw bytes (no escapes expected in a
/// model name; one with escapes matches no policy model and becomes `_OTHER`).
fn model_field(body: &[u8]) -> Option<&[u8]> {
    let at = memchr::memmem::find(body, b"\"model\"")? + 7;
    let rest = body.get(at..)?;
    let rest = rest
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let rest = rest.strip_prefix(b"\"")?;
    let end = memchr::memchr(b'"', rest)?;
    rest.get(..end)
}

/// [`CREDENTIAL_HEADERS`] as header names, so that looking for them parses nothing.
static CREDENTIALS: [HeaderName; 5] = [
    http::header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-goog-api-key"),
    http::header::PROXY_AUTHORIZATION,
];

/// The request's credential header, the first of [`CREDENTIAL_HEADERS`] it carries. A clone
/// shares the value's bytes (the retry layer's copy of the request shares them too).
fn credential_of(headers: &HeaderMap) -> Option<HeaderValue> {
    CREDENTIALS.iter().find_map(|h| {
        let mut v = headers.get(h)?.clone();
        v.set_sensitive(true);
        Some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "metrics")]
    #[test]
    fn operations_from_paths() {
        assert_eq!(operation_of("/v1/chat/completions"), "chat");
        assert_eq!(operation_of("/v1/messages"), "chat");
        assert_eq!(operation_of("/v1/completions"), "text_completion");
        assert_eq!(operation_of("/v1/embeddings"), "embeddings");
        assert_eq!(
            operation_of("/v1beta/models/gemini-2.0-flash:streamGenerateContent"),
            "generate_content"
        );
        assert_eq!(operation_of("/v1/files"), "_OTHER");
    }

    #[cfg(feature = "metrics")]
    #[test]
    fn the_model_field_is_read_without_parsing_the_body() {
        let body = br#"{"messages":[],"model" : "gpt-4o","stream":true}"#;
        assert_eq!(model_field(body), Some(&b"gpt-4o"[..]));
        assert_eq!(model_field(br#"{"model":4}"#), None);
        assert_eq!(model_field(b"{}"), None);
        assert_eq!(model_field(br#"{"model":"unterminated"#), None);
    }

    #[test]
    fn the_credential_names_are_the_policys() {
        let names: Vec<&str> = CREDENTIALS.iter().map(HeaderName::as_str).collect();
        assert_eq!(names, CREDENTIAL_HEADERS);
    }

    #[test]
    fn fingerprints_are_short_stable_and_keyless() {
        // `printf %s sk-test | sha256sum | cut -c1-16`
        let f = key_fingerprint("sk-test");
        assert_eq!(f, "sha256:f3abf2a6cc4f0098");
        assert_eq!(f, key_fingerprint(" Bearer sk-test "));
        assert_ne!(f, key_fingerprint("sk-tesT"));
        assert!(f.starts_with("sha256:"));
        assert_eq!(f.len(), 23);
        assert!(f[7..].bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
