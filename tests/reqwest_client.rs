//! `ReqwestService` over real HTTP on loopback, and the `reqwest_client` example's own code path
//! against `MockProvider`.

#![cfg(all(feature = "reqwest", feature = "testing"))]

#[path = "../examples/reqwest_client.rs"]
#[allow(dead_code)]
mod example;

use std::time::Duration;

#[path = "support/log.rs"]
mod log;
use log::closed_port;

use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::Decision;
use tower_llm_resilience::classify::{Classifier, DefaultClassifier};
use tower_llm_resilience::reqwest::ReqwestService;
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request};
use tower_llm_resilience::{ErrorKind, FailureClass, Policy};

#[tokio::test]
async fn the_example_retries_the_503_and_prints_the_answer() {
    let mock = example::start_mock().await.expect("mock starts");
    let upstream = example::Upstream {
        base_url: mock.url(),
        api_key: Some("sk-test".to_owned()),
    };
    let client = example::client(&example::policy()).expect("valid policy");

    let answer = example::ask(client, &upstream, example::MOCK_MODEL, "hello")
        .await
        .expect("the ladder recovers");

    assert_eq!(answer.status, 200);
    assert_eq!(answer.text, example::MOCK_ANSWER);
    let attempts = &answer.log.attempts;
    assert_eq!(attempts.len(), 2, "{}", answer.log);
    assert_eq!(attempts[0].status, Some(503));
    assert_eq!(attempts[0].class, Some(FailureClass::Overloaded));
    assert!(
        matches!(attempts[0].decisions.first(), Some(Decision::Retry { .. })),
        "{}",
        answer.log
    );
    assert_eq!(attempts[1].status, Some(200));

    // Both attempts reached the provider, each with the whole body and the key.
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.model.as_deref(), Some(example::MOCK_MODEL));
        assert_eq!(r.headers["authorization"], "Bearer sk-test");
        assert_eq!(
            r.headers["content-length"].to_str().ok(),
            Some(r.body.len().to_string().as_str())
        );
    }
}

#[tokio::test]
async fn the_example_returns_a_provider_error_as_an_answer() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::Any, [Reply::unauthorized()]);
    let upstream = example::Upstream {
        base_url: format!("{}/v1", mock.url()),
        api_key: None,
    };
    let client = example::client(&example::policy()).expect("valid policy");

    let answer = example::ask(client, &upstream, "gpt-4o", "hello")
        .await
        .expect("a 401 is an answer");

    assert_eq!(answer.status, 401);
    assert!(answer.text.contains("Incorrect API key"), "{}", answer.text);
    assert_eq!(
        answer.log.attempts.len(),
        1,
        "auth failures are not retried"
    );
    assert_eq!(mock.requests()[0].path, "/v1/chat/completions");
}

#[tokio::test]
async fn a_refused_connect_classifies_as_connect() {
    let addr = closed_port().await;
    let service = ReqwestService::new(reqwest::Client::new());

    let error = service
        .oneshot(chat_request(&format!("http://{addr}"), "gpt-4o", false))
        .await
        .expect_err("nothing listens");

    assert!(error.is_connect(), "{error:?}");
    let c = DefaultClassifier::new().classify_error(&error);
    assert_eq!(c.class, Some(FailureClass::Connect));
}

#[tokio::test(start_paused = true)]
async fn a_refused_connect_through_the_stack_is_retried_then_a_transport_error() {
    let addr = closed_port().await;
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(1);
    let client = ServiceBuilder::new()
        .layer(policy.layer().expect("valid policy"))
        .service(ReqwestService::new(reqwest::Client::new()));

    let error = client
        .oneshot(chat_request(&format!("http://{addr}"), "gpt-4o", false))
        .await
        .expect_err("nothing listens");

    assert_eq!(error.kind(), &ErrorKind::Transport);
    assert_eq!(error.class(), Some(FailureClass::Connect));
    let log = error.attempt_log().expect("log attached").snapshot();
    assert_eq!(log.attempts.len(), 3, "{log}");
    assert!(
        log.attempts
            .iter()
            .all(|a| a.class == Some(FailureClass::Connect))
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_read_timeout_classifies_as_timeout() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::Any, [Reply::never()]);
    let client = reqwest::Client::builder()
        .read_timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let service = ReqwestService::new(client);

    let error = service
        .oneshot(chat_request(&mock.url(), "gpt-4o", false))
        .await
        .expect_err("never answered");

    assert!(error.is_timeout(), "{error:?}");
    let c = DefaultClassifier::new().classify_error(&error);
    assert_eq!(c.class, Some(FailureClass::Timeout));
}

#[tokio::test(start_paused = true)]
async fn the_response_body_streams_event_by_event() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::Any,
        [Reply::openai_stream("gpt-4o", &["Hel", "lo"]).event_delay(Duration::from_millis(500))],
    );
    let service = ReqwestService::new(reqwest::Client::new());
    let start = Instant::now();

    let response = service
        .oneshot(chat_request(&mock.url(), "gpt-4o", true))
        .await
        .expect("head");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();

    // Each event arrives when the provider sends it, not when the stream ends.
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("no body error");
        if frame.data_ref().is_some_and(|d| !d.is_empty()) {
            arrivals.push(start.elapsed());
        }
    }
    // role delta, two content deltas, finish, usage, [DONE]: six events 500 ms apart.
    let expected: Vec<Duration> = (1..=6).map(|i| Duration::from_millis(500 * i)).collect();
    assert_eq!(arrivals, expected);
}

#[tokio::test]
async fn a_body_cut_after_the_head_is_a_transport_failure_not_connect() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::Any,
        [Reply::openai_stream("gpt-4o", &["Hel", "lo"]).cut_after(2)],
    );
    let service = ReqwestService::new(reqwest::Client::new());

    let response = service
        .oneshot(chat_request(&mock.url(), "gpt-4o", true))
        .await
        .expect("head");
    let error = response
        .into_body()
        .collect()
        .await
        .expect_err("the body breaks");

    let c = DefaultClassifier::new().classify_error(&error);
    assert_eq!(c.class, Some(FailureClass::Transport), "{error:?}");
}
