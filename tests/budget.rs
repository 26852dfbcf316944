//! `BudgetLayer` end to end: the real hyper-util client against `MockProvider` on loopback.
#![cfg(feature = "testing")]
// Policies are built the way users must build them (the sections are `#[non_exhaustive]`).
#![allow(clippy::field_reassign_with_default)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{ServiceExt, service_fn};
use tower_layer::Layer;
use tower_llm_resilience::attempt_log::{LocalEventKind, Outcome};
use tower_llm_resilience::budget::{Budget, BudgetLayer, BudgetOwner, SpendStatus};
use tower_llm_resilience::policy::{AdmissionMode, BudgetPolicy, Price, SpendPolicy};
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{AttemptLog, Deadline, ErrorKind, RouteName};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn start() -> MockProvider {
    MockProvider::start().await.expect("mock starts")
}

/// One micro unit per token in and out; owner `team` unless the request names one.
fn spend() -> SpendPolicy {
    let mut s = SpendPolicy::default();
    s.cap = 1.0;
    s.default_price = Some(Price::new(1.0, 1.0));
    s.default_owner = Some("team".to_owned());
    s
}

fn budget(policy: BudgetPolicy) -> (BudgetLayer, Budget<Client>) {
    let layer = BudgetLayer::new(policy).expect("valid policy");
    let svc = layer.layer(client());
    (layer, svc)
}

fn log_of<B>(resp: &http::Response<B>) -> AttemptLog {
    resp.extensions()
        .get::<AttemptLog>()
        .cloned()
        .expect("attempt log")
}

#[tokio::test]
async fn spend_settles_with_the_usage_the_provider_reports() {
    let mock = start().await;
    mock.script(
        ScriptKey::model("json"),
        [Reply::openai_chat("json", "Hello there friend")],
    );
    mock.script(
        ScriptKey::model("openai-stream"),
        [Reply::openai_stream("openai-stream", &["Hel", "lo"])],
    );
    mock.script(
        ScriptKey::model("anthropic-stream"),
        [Reply::anthropic_stream(
            "anthropic-stream",
            &["Hel", "lo", "!"],
        )],
    );
    let mut policy = BudgetPolicy::default();
    policy.spend = Some(spend());
    let (layer, svc) = budget(policy);
    let spend = layer.spend().expect("spend handle");

    // Reserved: 3 prompt tokens ("user" + "hello" = 9 bytes) + 64 output = 67.
    let resp = svc
        .clone()
        .oneshot(chat_request(&mock.url(), "json", false))
        .await
        .expect("response");
    assert_eq!(spend.status("team"), SpendStatus::new(0, 67));
    resp.into_body().collect().await.expect("body");
    // Charged what the provider reported: 9 prompt + 3 completion tokens.
    assert_eq!(spend.status("team"), SpendStatus::new(12, 0));

    let resp = svc
        .clone()
        .oneshot(chat_request(&mock.url(), "openai-stream", true))
        .await
        .expect("response");
    resp.into_body().collect().await.expect("body");
    assert_eq!(spend.status("team"), SpendStatus::new(12 + 11, 0));

    let mut req = chat_request(&mock.url(), "anthropic-stream", true);
    req.extensions_mut().insert(BudgetOwner::new("other"));
    let resp = svc.clone().oneshot(req).await.expect("response");
    resp.into_body().collect().await.expect("body");
    assert_eq!(spend.status("other"), SpendStatus::new(9 + 3, 0));
    assert_eq!(spend.status("team"), SpendStatus::new(23, 0));
}

#[tokio::test]
async fn an_exhausted_owner_sends_nothing() {
    let mock = start().await;
    let mut s = spend();
    s.cap = 0.0001; // 100 micro units: one reservation of 67 fits, two do not
    let mut policy = BudgetPolicy::default();
    policy.spend = Some(s);
    let (_, svc) = budget(policy);
    let first = svc
        .clone()
        .oneshot(chat_request(&mock.url(), "m", false))
        .await
        .expect("response");
    let second = svc
        .clone()
        .oneshot(chat_request(&mock.url(), "m", false))
        .await
        .expect_err("over the cap");
    assert_eq!(
        second.kind(),
        &ErrorKind::BudgetExhausted {
            owner: Some("team".to_owned())
        }
    );
    let log = second.attempt_log().expect("log");
    assert_eq!(log.attempt_count(), 0);
    assert_eq!(log.events()[0].kind, LocalEventKind::BudgetDenied);
    drop(first);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn pacing_waits_for_the_reset_the_provider_announced() {
    let mock = start().await;
    mock.script(
        ScriptKey::Any,
        [
            Reply::ok()
                .header("x-ratelimit-remaining-requests", "0")
                .header("x-ratelimit-reset-requests", "5s"),
            Reply::ok(),
        ],
    );
    let mut policy = BudgetPolicy::default();
    policy.pacing = true;
    policy.admission = AdmissionMode::Queue {
        max_wait: Duration::from_secs(60),
        max_queued: 10,
    };
    let (_, svc) = budget(policy);
    let routed = |route: &str| {
        let mut req = chat_request(&mock.url(), "m", false);
        req.extensions_mut().insert(RouteName::new(route));
        req
    };
    let t0 = Instant::now();
    let first = svc.clone().oneshot(routed("a")).await.expect("response");
    assert_eq!(first.status(), 200);
    // Route b is not paused; route a waits for the reset.
    let b = svc.clone().oneshot(routed("b")).await.expect("response");
    assert_eq!(b.status(), 200);
    let a = svc.clone().oneshot(routed("a")).await.expect("response");
    assert_eq!(a.status(), 200);
    let arrivals: Vec<Duration> = mock.requests().iter().map(|r| r.at - t0).collect();
    assert_eq!(
        arrivals,
        [Duration::ZERO, Duration::ZERO, Duration::from_secs(5)]
    );
    let events: Vec<LocalEventKind> = log_of(&a).events().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        events,
        [LocalEventKind::Queued {
            waited: Duration::from_secs(5)
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_request_the_provider_never_answers() {
    let mock = start().await;
    mock.script(ScriptKey::Any, [Reply::never()]);
    let mut policy = BudgetPolicy::default();
    policy.deadline = Some(Duration::from_secs(3));
    let (_, svc) = budget(policy);
    let t0 = Instant::now();
    let e = svc
        .oneshot(chat_request(&mock.url(), "m", false))
        .await
        .expect_err("deadline");
    assert_eq!(Instant::now() - t0, Duration::from_secs(3));
    assert_eq!(e.kind(), &ErrorKind::DeadlineExceeded);
    let snap = e.attempt_log().expect("log").snapshot();
    assert!(matches!(snap.outcome, Some(Outcome::Error { .. })));
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn inner_layers_see_the_deadline_and_the_retry_budget() {
    let mock = start().await;
    let mut policy = BudgetPolicy::default();
    policy.deadline = Some(Duration::from_secs(30));
    let layer = BudgetLayer::new(policy).expect("valid policy");
    let http = client();
    let svc = layer.layer(service_fn(move |req: http::Request<Full<Bytes>>| {
        let deadline = req.extensions().get::<Deadline>().copied();
        let budget = req
            .extensions()
            .get::<tower_llm_resilience::RetryBudget>()
            .cloned();
        let http = http.clone();
        async move {
            assert!(deadline.is_some_and(|d| d.remaining() <= Duration::from_secs(30)));
            assert!(budget.is_some());
            http.oneshot(req).await
        }
    }));
    let resp = svc
        .oneshot(chat_request(&mock.url(), "m", false))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        log_of(&resp).snapshot().outcome,
        Some(Outcome::Success { status: 200 })
    );
}
