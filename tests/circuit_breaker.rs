//! End-to-end: `CircuitBreakerLayer` over real HTTP on loopback, against the `MockProvider`.
#![cfg(feature = "testing")]

use std::time::Duration;

use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::LocalEventKind;
use tower_llm_resilience::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_llm_resilience::context::FallbackAvailable;
use tower_llm_resilience::retry::RetryLayer;
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{Classification, ErrorKind, FailureClass, Policy};

#[path = "support/routed.rs"]
mod routed;
use routed::{routed, send};

/// `req` with a backup route to go to, as `FallbackLayer` marks one: an open circuit fails it
/// fast (a request without one is throttled instead; see `tests/throttle.rs`).
fn backed(
    mut req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    req.extensions_mut().insert(FallbackAvailable);
    req
}

fn models(mock: &MockProvider, model: &str) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.model.as_deref() == Some(model))
        .count()
}

#[tokio::test(start_paused = true)]
async fn two_routes_on_one_provider_one_tripped_the_other_unaffected() {
    let mock = MockProvider::start().await.unwrap();
    mock.script(ScriptKey::model("gpt-down"), [Reply::openai_overloaded()]);
    mock.script(
        ScriptKey::model("gpt-up"),
        [Reply::openai_chat("gpt-up", "hi")],
    );
    let layer = CircuitBreakerLayer::from_policy(&Policy::interactive()).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(client());
    let url = mock.url();

    // The default policy trips after 10 consecutive provider failures.
    for _ in 0..10 {
        let s = send(&mut svc, backed(routed(&url, "gpt-down", "down")))
            .await
            .unwrap();
        assert_eq!(s, 503);
        assert_eq!(
            send(&mut svc, routed(&url, "gpt-up", "up")).await.ok(),
            Some(200)
        );
    }
    assert_eq!(handle.state("down"), CircuitState::Open);
    for _ in 0..10 {
        let e = send(&mut svc, backed(routed(&url, "gpt-down", "down")))
            .await
            .unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::CircuitOpen { route, .. } if route.as_str() == "down"),
            "{e}"
        );
        assert_eq!(
            send(&mut svc, routed(&url, "gpt-up", "up")).await.ok(),
            Some(200)
        );
    }
    assert_eq!(handle.state("up"), CircuitState::Closed);
    let up = handle.snapshot("up").unwrap();
    assert_eq!((up.calls, up.failures), (20, 0));
    // The provider's record: the open route was not called again.
    assert_eq!(models(&mock, "gpt-down"), 10);
    assert_eq!(models(&mock, "gpt-up"), 20);
}

#[tokio::test(start_paused = true)]
async fn routes_default_to_the_authority() {
    let down = MockProvider::start().await.unwrap();
    let up = MockProvider::start().await.unwrap();
    down.script(ScriptKey::Any, [Reply::anthropic_overloaded()]);
    let layer = CircuitBreakerLayer::from_policy(&Policy::interactive()).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(client());
    for _ in 0..12 {
        let _ = send(&mut svc, backed(chat_request(&down.url(), "claude", false))).await;
        assert_eq!(
            send(&mut svc, chat_request(&up.url(), "gpt-4o", false))
                .await
                .ok(),
            Some(200)
        );
    }
    assert_eq!(
        handle.state(down.addr().to_string().as_str()),
        CircuitState::Open
    );
    assert_eq!(
        handle.state(up.addr().to_string().as_str()),
        CircuitState::Closed
    );
    assert_eq!(down.request_count(), 10);
    assert_eq!(up.request_count(), 12);
}

#[tokio::test(start_paused = true)]
async fn caller_errors_from_a_real_provider_never_trip() {
    let mock = MockProvider::start().await.unwrap();
    mock.script(
        ScriptKey::Any,
        [
            Reply::openai_content_policy(),
            Reply::azure_content_filter(),
            Reply::unauthorized(),
            Reply::forbidden(),
            Reply::openai_insufficient_quota(),
            Reply::anthropic_billing(),
            Reply::openai_context_length(),
            Reply::json(
                400,
                r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#,
            ),
        ],
    );
    let layer = CircuitBreakerLayer::from_policy(&Policy::interactive()).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(client());
    let mut classes = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(chat_request(&mock.url(), "gpt-4o", false))
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
        classes.insert(
            r.extensions()
                .get::<Classification>()
                .unwrap()
                .class
                .unwrap(),
        );
        r.into_body().collect().await.unwrap();
    }
    // Each kind was seen as what it is...
    assert_eq!(
        classes.into_iter().collect::<Vec<_>>(),
        [
            FailureClass::QuotaExhausted,
            FailureClass::ContextOverflow,
            FailureClass::InvalidRequest,
            FailureClass::Auth,
            FailureClass::PolicyBlock,
        ]
    );
    // ...and none of them counted against the route.
    assert_eq!(mock.request_count(), 40);
    let route = mock.addr().to_string();
    assert_eq!(handle.state(route.as_str()), CircuitState::Closed);
    assert_eq!(handle.snapshot(route.as_str()).map(|s| s.failures), Some(0));
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_ends_the_retries_outside_it_at_once() {
    let mock = MockProvider::start().await.unwrap();
    mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let mut policy = Policy::interactive();
    policy.retry.max_attempts = 5;
    policy.retry.seed = Some(3);
    policy.circuit_breaker.consecutive_failures = Some(2);
    // No throttle and no backup: every request fails fast on the open circuit, which stays
    // open longer than the retries' backoff.
    policy.circuit_breaker.throttle = None;
    policy.circuit_breaker.open_base = Duration::from_secs(2);
    policy.circuit_breaker.open_cap = Duration::from_secs(5);
    let breaker = CircuitBreakerLayer::from_policy(&policy).unwrap();
    let handle = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::from_policy(&policy).unwrap())
        .layer(breaker)
        .service(client());

    let e = svc
        .oneshot(chat_request(&mock.url(), "gpt-4o", false))
        .await
        .unwrap_err();
    let ended = Instant::now();
    assert!(matches!(e.kind(), ErrorKind::CircuitOpen { .. }), "{e}");
    // Two attempts tripped the breaker; the third was refused without a call and ended the
    // retries, with three attempts of the allowed five left.
    assert_eq!(mock.request_count(), 2);
    assert_eq!(
        handle.state(mock.addr().to_string().as_str()),
        CircuitState::Open
    );
    let log = e.attempt_log().unwrap();
    assert_eq!(log.attempts().len(), 2);
    let events = log.events();
    let refused = events
        .iter()
        .find(|ev| matches!(ev.kind, LocalEventKind::CircuitOpen { .. }))
        .unwrap();
    // Nothing waited after the refusal.
    assert_eq!(log.elapsed(), refused.offset);
    assert_eq!(ended.elapsed(), Duration::ZERO);
    // And nothing more reached the provider.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(mock.request_count(), 2);

    // Without the breaker the same retries would have used all five attempts.
    let control = MockProvider::start().await.unwrap();
    control.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let retry_only = RetryLayer::from_policy(&policy).unwrap().layer(client());
    let r = retry_only
        .oneshot(chat_request(&control.url(), "gpt-4o", false))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(control.request_count(), 5);
}

#[tokio::test(start_paused = true)]
async fn streams_cut_after_the_head_count_against_the_route() {
    let mock = MockProvider::start().await.unwrap();
    mock.script(
        ScriptKey::Any,
        [Reply::openai_stream("gpt-4o", &["Hel", "lo", " there"]).cut_after(2)],
    );
    let mut policy = Policy::interactive();
    policy.circuit_breaker.consecutive_failures = Some(2);
    let layer = CircuitBreakerLayer::from_policy(&policy).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(client());
    let route = mock.addr().to_string();
    for i in 0..2 {
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(chat_request(&mock.url(), "gpt-4o", true))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // The head alone was a success: the run of failures is not broken by it.
        assert_eq!(
            handle
                .snapshot(route.as_str())
                .map(|s| s.consecutive_failures),
            Some(i)
        );
        assert!(r.into_body().collect().await.is_err(), "the stream was cut");
    }
    assert_eq!(handle.state(route.as_str()), CircuitState::Open);
    let s = handle.snapshot(route.as_str()).unwrap();
    // Two requests, two failures: never counted twice.
    assert_eq!((s.calls, s.failures), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn a_provider_down_for_a_minute_is_probed_by_every_call_and_serves_at_recovery() {
    // 503 for the first 60 s, then healthy; one request (with a backup route) every 4 s; the
    // default policy.
    let mock = MockProvider::start().await.unwrap();
    mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(11);
    let layer = CircuitBreakerLayer::from_policy(&policy).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(client());
    let start = Instant::now();
    let mut recovered = false;
    let mut refused = 0;
    let mut back = None;
    for _ in 0..30 {
        if !recovered && start.elapsed() >= Duration::from_secs(60) {
            mock.script(ScriptKey::Any, [Reply::ok()]);
            recovered = true;
        }
        match send(&mut svc, backed(chat_request(&mock.url(), "gpt-4o", false))).await {
            Ok(200) => {
                back.get_or_insert(start.elapsed());
            }
            Ok(s) => assert_eq!((s, back), (503, None)),
            Err(e) => {
                assert!(matches!(e.kind(), ErrorKind::CircuitOpen { .. }), "{e}");
                assert_eq!(back, None, "refused after recovery");
                refused += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    // Ten 503s in a row tripped it; its open time (at most 600 ms) has always passed when the
    // next request comes 4 s later, so each later one was a probe: none refused, one call
    // each, and the first after the recovery served.
    assert_eq!(refused, 0);
    let back = back.unwrap();
    assert_eq!(back, Duration::from_secs(60));
    assert_eq!(
        mock.requests()
            .iter()
            .filter(|r| r.at - start < Duration::from_secs(60))
            .count(),
        15
    );
    assert_eq!(
        handle.state(mock.addr().to_string().as_str()),
        CircuitState::Closed
    );
    // Every request after recovery reached the provider and succeeded.
    let after: Vec<_> = mock
        .requests()
        .into_iter()
        .filter(|r| r.at - start >= back)
        .collect();
    assert_eq!(after.len(), 30 - (back.as_secs() / 4) as usize);
}
