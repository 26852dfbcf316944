//! Alerts, driven through the whole stack over loopback HTTP under paused time: one per kind,
//! route, owner and window, with the count of what was suppressed; off the request path;
//! metadata only.
#![cfg(feature = "testing")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_resilience::observe::{Alert, AlertFuture, AlertKind, AlertSink, key_fingerprint};
use tower_llm_resilience::policy::{Price, RetryBudgetPolicy, SpendPolicy};
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{FailureClass, Policy, ResilienceLayer};

#[path = "support/capture.rs"]
mod capture;

const KEY: &str = "sk-test-SECRET-7f3a9c";
const BODY_MARK: &str = "BODY-SECRET-42";

/// Keeps every alert it is given.
#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Vec<Alert>>>);

impl Recorded {
    fn push(&self, alert: Alert) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(alert);
    }

    fn all(&self) -> Vec<Alert> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl AlertSink for Recorded {
    fn send(&self, alert: Alert) -> AlertFuture {
        self.push(alert);
        Box::pin(async {})
    }
}

/// A chat request carrying the test's key and a body with a marker that must never leave.
fn request(base: &str) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{BODY_MARK}"}}],"max_tokens":64}}"#
    );
    let mut req = testing::chat_request(base, "gpt-4o", false);
    *req.body_mut() = Full::new(Bytes::from(body));
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {KEY}")).expect("a header value"),
    );
    req
}

/// Sends `req` and reads its body; the status.
async fn send<S>(svc: &mut S, req: Request<Full<Bytes>>) -> u16
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<tower_llm_resilience::Body>>,
    S::Error: std::fmt::Debug,
{
    let response = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    response.into_body().collect().await.expect("a whole body");
    status
}

/// Lets the alert task run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// Asserts that no alert, in any of its forms, holds the key or the body.
fn assert_metadata_only(alerts: &[Alert]) {
    for a in alerts {
        for text in [
            format!("{a:?}"),
            a.to_string(),
            serde_json::to_string(a).expect("an alert serializes"),
        ] {
            assert!(!text.contains(KEY), "the key leaked: {text}");
            assert!(!text.contains("SECRET"), "a secret leaked: {text}");
            assert!(!text.contains(BODY_MARK), "the body leaked: {text}");
        }
    }
}

fn policy() -> Policy {
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(5);
    policy.observability.alert_window = Duration::from_secs(60);
    policy
}

#[tokio::test(start_paused = true)]
async fn a_bad_key_sends_one_alert_per_window_and_counts_the_rest() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        std::iter::repeat_n(Reply::unauthorized(), 101),
    );
    let sink = Recorded::default();
    let layer = ResilienceLayer::new(&policy())
        .expect("valid policy")
        .alert_sink(sink.clone());
    let watch = layer.observability();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(testing::client());

    for _ in 0..100 {
        assert_eq!(send(&mut svc, request(&mock.url())).await, 401);
    }
    settle().await;

    let alerts = sink.all();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let a = &alerts[0];
    assert_eq!(a.kind, AlertKind::Auth);
    assert_eq!(a.route.as_ref().map(|r| r.as_str()), Some("primary"));
    assert_eq!(a.key_fingerprint, Some(key_fingerprint(KEY)));
    assert_eq!(a.status, Some(401));
    assert_eq!(a.class, Some(FailureClass::Auth));
    assert_eq!(a.request_id.as_deref(), Some("req_mock_1"));
    assert_eq!(a.workflow, "interactive");
    assert_eq!(a.suppressed, 0);
    assert_eq!(watch.alerts_sent(), 1);
    assert_eq!(watch.alerts_suppressed(), 99);
    assert_eq!(watch.alerts_dropped(), 0);

    // A new window: the next failure is news again, and says what the last window held back.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(send(&mut svc, request(&mock.url())).await, 401);
    settle().await;
    let alerts = sink.all();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[1].kind, AlertKind::Auth);
    assert_eq!(alerts[1].suppressed, 99);
    assert!(
        alerts[1]
            .to_string()
            .contains("99 more since the last alert")
    );
    assert_eq!(watch.alerts_sent(), 2);
    assert_eq!(watch.alerts_suppressed(), 99);
    assert_metadata_only(&alerts);
}

/// Records the alert, then waits until the test lets it go.
#[derive(Clone)]
struct Slow {
    seen: Recorded,
    gate: Arc<Semaphore>,
}

impl AlertSink for Slow {
    fn send(&self, alert: Alert) -> AlertFuture {
        self.seen.push(alert);
        let gate = self.gate.clone();
        Box::pin(async move {
            let _ = gate.acquire().await.map(|p| p.forget());
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_sink_never_delays_a_response() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        std::iter::repeat_n(Reply::unauthorized(), 6),
    );
    let mut policy = policy();
    // Every request a window of its own, and room for two alerts behind the one in the sink.
    policy.observability.alert_window = Duration::from_millis(1);
    policy.observability.alert_queue = 2;
    let slow = Slow {
        seen: Recorded::default(),
        gate: Arc::new(Semaphore::new(0)),
    };
    let layer = ResilienceLayer::new(&policy)
        .expect("valid policy")
        .alert_sink(slow.clone());
    let watch = layer.observability();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(testing::client());

    for _ in 0..6 {
        let start = Instant::now();
        assert_eq!(send(&mut svc, request(&mock.url())).await, 401);
        assert_eq!(start.elapsed(), Duration::ZERO, "a response waited");
        settle().await;
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    // One alert in the sink (stuck), two waiting, three dropped: none held a request.
    assert_eq!(slow.seen.all().len(), 1);
    assert_eq!(watch.alerts_sent(), 3);
    assert_eq!(watch.alerts_dropped(), 3);

    // Once the sink moves again, the queued alerts reach it.
    slow.gate.add_permits(10);
    settle().await;
    let seen = slow.seen.all();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|a| a.kind == AlertKind::Auth));
    assert_metadata_only(&seen);
}

/// Runs `requests` requests through a stack built from `policy` against `mock` and returns the
/// alerts its sink got.
async fn alerts_of(policy: &Policy, mock: &MockProvider, requests: usize) -> Vec<Alert> {
    let sink = Recorded::default();
    let layer = ResilienceLayer::new(policy)
        .expect("valid policy")
        .alert_sink(sink.clone());
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(testing::client());
    for _ in 0..requests {
        let response = svc
            .ready()
            .await
            .expect("ready")
            .call(request(&mock.url()))
            .await;
        if let Ok(r) = response {
            let _ = r.into_body().collect().await;
        }
    }
    settle().await;
    let alerts = sink.all();
    assert_metadata_only(&alerts);
    alerts
}

#[tokio::test(start_paused = true)]
async fn each_fail_closed_rule_tells_its_owner() {
    // Exhausted quota: the primary's budget owner.
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_insufficient_quota()],
    );
    let mut p = policy();
    p.fallback.primary_budget_owner = Some("team-a".to_owned());
    let alerts = alerts_of(&p, &mock, 1).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, AlertKind::QuotaExhausted);
    assert_eq!(alerts[0].owner.as_deref(), Some("team-a"));
    assert_eq!(alerts[0].status, Some(429));
    assert_eq!(alerts[0].key_fingerprint, None);

    // A policy block: for review.
    mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_content_policy()]);
    let alerts = alerts_of(&policy(), &mock, 1).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, AlertKind::PolicyBlock);
    assert_eq!(alerts[0].class, Some(FailureClass::PolicyBlock));

    // A spend cap reached at admission: the request's budget owner, whatever it costs.
    let mut p = policy();
    let mut spend = SpendPolicy::default();
    spend.cap = 0.000_001;
    spend.default_owner = Some("team-b".to_owned());
    spend.default_price = Some(Price::new(1.0, 1.0));
    p.budget.spend = Some(spend);
    let before = mock.request_count();
    let alerts = alerts_of(&p, &mock, 3).await;
    assert_eq!(mock.request_count(), before, "nothing was sent");
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, AlertKind::SpendCapReached);
    assert_eq!(alerts[0].owner.as_deref(), Some("team-b"));
    assert_eq!(
        alerts[0].route.as_ref().map(|r| r.as_str()),
        Some("primary")
    );
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_running_out_escalates() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        std::iter::repeat_n(Reply::openai_overloaded(), 6),
    );
    let mut p = policy();
    // One retry for the whole stack, never refilled.
    p.budget.retry_budget = RetryBudgetPolicy::TokenBucket {
        capacity: 1,
        refill_per_sec: 0.0,
        per_request: 0.0,
    };
    let alerts = alerts_of(&p, &mock, 2).await;
    // Request 1: attempt, retry (the token), attempt, retry refused; request 2: refused at once.
    assert_eq!(mock.request_count(), 3);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, AlertKind::RetryBudgetExhausted);
    assert_eq!(
        alerts[0].route.as_ref().map(|r| r.as_str()),
        Some("primary")
    );
}

#[tokio::test(start_paused = true)]
async fn a_circuit_opening_with_no_backup_is_news_and_one_with_a_backup_is_not() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut p = policy();
    p.circuit_breaker.failure_rate = None;
    p.circuit_breaker.consecutive_failures = Some(2);
    mock.script(
        ScriptKey::model("gpt-4o"),
        std::iter::repeat_n(Reply::openai_overloaded(), 2),
    );
    let alerts = alerts_of(&p, &mock, 1).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, AlertKind::CircuitOpenNoBackup);
    assert_eq!(
        alerts[0].route.as_ref().map(|r| r.as_str()),
        Some("primary")
    );

    // The same trip with a backup route behind the primary: the backup answers, nobody is paged.
    mock.script(
        ScriptKey::model("gpt-4o"),
        std::iter::repeat_n(Reply::openai_overloaded(), 2),
    );
    p.fallback.routes = vec![
        tower_llm_resilience::policy::RouteConfig::new("backup")
            .base_url(format!("{}/backup", mock.url()))
            .model("backup-model"),
    ];
    let alerts = alerts_of(&p, &mock, 1).await;
    assert!(alerts.is_empty(), "{alerts:?}");
}

#[tokio::test(start_paused = true)]
async fn alerts_off_in_the_policy_send_nothing() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::model("gpt-4o"), [Reply::unauthorized()]);
    let mut p = policy();
    p.observability.alerts = false;
    let alerts = alerts_of(&p, &mock, 1).await;
    assert!(alerts.is_empty(), "{alerts:?}");
}

#[test]
fn the_default_sink_writes_an_error_event_without_the_key() {
    let (captured, _guard) = capture::Captured::install();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mock = MockProvider::start().await.expect("mock starts");
        mock.script(ScriptKey::model("gpt-4o"), [Reply::unauthorized()]);
        let svc = ServiceBuilder::new()
            .layer(ResilienceLayer::new(&policy()).expect("valid policy"))
            .service(testing::client());
        let response = svc.oneshot(request(&mock.url())).await.expect("an answer");
        assert_eq!(response.status(), 401);
        settle().await;
    });
    let text = captured.text();
    let line = text
        .lines()
        .find(|l| l.contains("tower_llm_resilience::alert"))
        .unwrap_or_else(|| panic!("no alert event in {text}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("kind=\"auth\""), "{line}");
    assert!(line.contains(&key_fingerprint(KEY)), "{line}");
    assert!(!text.contains(KEY), "the key leaked into tracing: {text}");
    assert!(
        !text.contains(BODY_MARK),
        "the body leaked into tracing: {text}"
    );
}
