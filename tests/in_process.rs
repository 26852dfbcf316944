//! In-process routes: the last tier of a chain answered by a tower service in the process —
//! a rule-based responder — after the models on loopback `MockProvider` failed.
#![cfg(feature = "testing")]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_llm_resilience::attempt_log::LocalEventKind;
use tower_llm_resilience::policy::RouteConfig;
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{AttemptLog, Policy, ResilienceLayer, RouteName};

const RULE_ANSWER: &str = r#"{"id":"rules-1","object":"chat.completion","model":"rules","choices":[{"index":0,"message":{"role":"assistant","content":"Our assistant is busy; your request is saved and a person will reply within the hour."},"finish_reason":"stop"}]}"#;

/// Primary model → a smaller model on another path → the in-process rule-based route.
fn three_tiers(mock: &MockProvider) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(2);
    p.retry.max_attempts = 1;
    p.fallback.routes = vec![
        RouteConfig::new("smaller")
            .base_url(format!("{}/small", mock.url()))
            .model("gpt-4o-mini"),
        RouteConfig::new("rules").in_process(),
    ];
    p
}

/// The rule-based responder: a fixed answer, and what it was asked, kept.
fn rules(
    seen: Arc<Mutex<Vec<Request<Bytes>>>>,
) -> impl tower::Service<
    Request<Bytes>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |req: Request<Bytes>| {
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(req);
        async move {
            let mut resp = Response::new(Full::new(Bytes::from_static(RULE_ANSWER.as_bytes())));
            resp.headers_mut()
                .insert("content-type", "application/json".parse().expect("value"));
            Ok(resp)
        }
    })
}

fn keyed(base: &str) -> Request<Full<Bytes>> {
    let mut req = chat_request(base, "gpt-4o", false);
    req.headers_mut()
        .insert("authorization", "Bearer sk-caller".parse().expect("value"));
    req
}

fn routes_tried(log: &AttemptLog) -> Vec<String> {
    log.attempts()
        .iter()
        .map(|a| {
            a.route
                .as_ref()
                .map(RouteName::to_string)
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_rule_based_tier_answers_when_both_models_are_down() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_server_error()]);
    mock.script(
        ScriptKey::model("gpt-4o-mini"),
        [Reply::openai_overloaded()],
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = ResilienceLayer::new(&three_tiers(&mock))
        .expect("valid policy")
        .route_service("rules", rules(seen.clone()))
        .expect("an in-process route")
        .layer(client());

    let resp = svc.oneshot(keyed(&mock.url())).await.expect("answered");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-llm-route"], "rules");
    let log = resp
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .expect("the log");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, RULE_ANSWER.as_bytes());
    assert_eq!(routes_tried(&log), ["primary", "smaller", "rules"]);
    assert_eq!(mock.request_count(), 2);

    let seen = seen.lock().expect("seen");
    assert_eq!(seen.len(), 1);
    // The responder got the caller's request (its body whole), without the caller's key.
    assert!(String::from_utf8_lossy(seen[0].body()).contains(r#""model":"gpt-4o""#));
    assert!(seen[0].headers().get("authorization").is_none());
}

#[tokio::test(start_paused = true)]
async fn the_rules_are_never_asked_while_a_model_answers() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_server_error()]);
    mock.script(
        ScriptKey::model("gpt-4o-mini"),
        [Reply::openai_chat("gpt-4o-mini", "from the smaller model")],
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = ResilienceLayer::new(&three_tiers(&mock))
        .expect("valid policy")
        .route_service("rules", rules(seen.clone()))
        .expect("an in-process route")
        .layer(client());
    let resp = svc.oneshot(keyed(&mock.url())).await.expect("answered");
    assert_eq!(resp.headers()["x-llm-route"], "smaller");
    assert!(seen.lock().expect("seen").is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_in_process_route_without_a_service_is_skipped_never_sent_upstream() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_server_error()]);
    mock.script(
        ScriptKey::model("gpt-4o-mini"),
        [Reply::openai_overloaded()],
    );
    let svc = ResilienceLayer::new(&three_tiers(&mock))
        .expect("valid policy")
        .layer(client());
    let resp = svc
        .oneshot(keyed(&mock.url()))
        .await
        .expect("the primary's failure");
    assert_eq!(resp.status(), 500, "the primary's own failure");
    // Two calls: never a third to the primary's URL for the unregistered route.
    assert_eq!(mock.request_count(), 2);
    let log = resp
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .expect("the log");
    assert!(log.events().iter().any(|e| {
        e.route == Some(RouteName::new("rules"))
            && matches!(&e.kind, LocalEventKind::RouteSkipped { reason } if reason.contains("no service"))
    }));
}

#[test]
fn registering_a_service_needs_an_in_process_route() {
    let mut p = Policy::interactive();
    p.fallback.routes = vec![RouteConfig::new("remote").base_url("http://127.0.0.1:1")];
    let seen = Arc::new(Mutex::new(Vec::new()));
    let layer = ResilienceLayer::new(&p).expect("valid policy");
    assert!(
        layer
            .clone()
            .route_service("remote", rules(seen.clone()))
            .is_err()
    );
    assert!(layer.route_service("absent", rules(seen)).is_err());
    p.fallback.routes = vec![
        RouteConfig::new("rules")
            .in_process()
            .base_url("http://127.0.0.1:1"),
    ];
    let e = p.validate().err().map(|e| e.field().to_owned());
    assert_eq!(e.as_deref(), Some("fallback.routes[0].base_url"));
}
