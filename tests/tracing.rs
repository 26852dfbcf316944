//! What the crate writes to `tracing`: the stable fields of its events, and the policy's switch.
//!
//! These tests are alone in their binary: each installs a thread-local subscriber, and a test
//! of another file emitting the same events on a thread without one would race the callsites'
//! interest cache.
#![cfg(feature = "testing")]

use std::time::Duration;

use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_llm_resilience::circuit_breaker::CircuitBreakerLayer;
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey, client};
use tower_llm_resilience::{BoxError, Policy, ServiceBuilderExt};

#[path = "support/backup.rs"]
mod backup;
#[path = "support/capture.rs"]
mod capture;
#[path = "support/routed.rs"]
mod routed;
use backup::policy_with_backup;
use capture::Captured;
use routed::{routed, send};

#[tokio::test(start_paused = true)]
async fn the_policys_tracing_switch_governs_the_whole_stack() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_overloaded(), Reply::ok()],
    );
    for tracing_on in [false, true] {
        let (captured, _guard) = Captured::install();
        let mut policy = policy_with_backup(&mock);
        policy.logging.tracing = tracing_on;
        mock.script(
            ScriptKey::model("gpt-4o"),
            [Reply::openai_overloaded(), Reply::ok()],
        );
        let service = ServiceBuilder::new()
            .llm_resilience(&policy)?
            .service(testing::client());
        let response = service
            .oneshot(testing::chat_request(&mock.url(), "gpt-4o", false))
            .await?;
        assert_eq!(response.status(), 200);
        let text = captured.text();
        assert_eq!(
            text.contains("tower_llm_resilience::attempt"),
            tracing_on,
            "tracing {tracing_on}: {text}"
        );
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn each_attempt_is_one_tracing_event_with_stable_fields() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_overloaded(), Reply::ok()],
    );
    let (captured, _guard) = Captured::install();
    let service = ServiceBuilder::new()
        .llm_resilience(&policy_with_backup(&mock))?
        .service(testing::client());
    let response = service
        .oneshot(testing::chat_request(&mock.url(), "gpt-4o", false))
        .await?;
    assert_eq!(response.status(), 200);
    let text = captured.text();
    let attempts: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("tower_llm_resilience::attempt: attempt "))
        .collect();
    assert_eq!(attempts.len(), 2, "{text}");
    for (n, line) in attempts.iter().enumerate() {
        for field in [
            format!("attempt={n} "),
            format!("http.request.resend_count={n} "),
            "route=\"primary\"".to_owned(),
            "offset_ms=".to_owned(),
            "latency_ms=".to_owned(),
        ] {
            assert!(line.contains(&field), "{field} in {line}");
        }
    }
    assert!(
        attempts[0].contains("status=503") && attempts[0].contains("class=\"overloaded\""),
        "{}",
        attempts[0]
    );
    assert!(attempts[1].contains("status=200"), "{}", attempts[1]);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn every_transition_is_a_tracing_event() {
    let (captured, _guard) = Captured::install();

    let mock = MockProvider::start().await.unwrap();
    mock.script(
        ScriptKey::model("gpt-4o"),
        [
            Reply::openai_overloaded(),
            Reply::openai_chat("gpt-4o", "hi"),
        ],
    );
    let mut policy = Policy::interactive().circuit_breaker;
    policy.consecutive_failures = Some(1);
    // Opens for 2 s, closes on one good probe; no throttle, so every request fails fast.
    policy.open_base = Duration::from_secs(2);
    policy.open_cap = Duration::from_secs(5);
    policy.half_open_successes = 1;
    policy.throttle = None;
    let layer = CircuitBreakerLayer::new(policy).unwrap().without_jitter();
    let mut svc = layer.layer(client());
    let url = mock.url();
    // Trips on the 503, refuses while open, probes after 2 s and closes on the 200.
    assert_eq!(
        send(&mut svc, routed(&url, "gpt-4o", "primary")).await.ok(),
        Some(503)
    );
    assert!(
        send(&mut svc, routed(&url, "gpt-4o", "primary"))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        send(&mut svc, routed(&url, "gpt-4o", "primary")).await.ok(),
        Some(200)
    );

    let text = captured.text();
    let transitions: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("tower_llm_resilience::circuit_breaker:"))
        .collect();
    assert_eq!(transitions.len(), 3, "{text}");
    let expect = [
        (
            "WARN",
            "circuit opened",
            "from=\"closed\" to=\"open\" open_ms=2000 trips=1",
        ),
        (
            "INFO",
            "circuit state changed",
            "from=\"open\" to=\"half_open\" trips=1",
        ),
        // A probe that succeeds closes the circuit and forgets the escalation.
        (
            "INFO",
            "circuit state changed",
            "from=\"half_open\" to=\"closed\" trips=0",
        ),
    ];
    for (line, (level, message, fields)) in transitions.iter().zip(expect) {
        assert!(line.contains(level), "{level} in {line}");
        assert!(line.contains(message), "{message} in {line}");
        assert!(line.contains("route=\"primary\""), "route in {line}");
        assert!(line.contains(fields), "{fields} in {line}");
    }
}

#[tokio::test(start_paused = true)]
async fn each_request_ends_with_one_event_holding_owner_and_cost() -> Result<(), BoxError> {
    use tower_llm_resilience::policy::{Price, SpendPolicy};

    let (captured, _guard) = Captured::install();
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model("gpt-4o"),
        [
            Reply::openai_overloaded(),
            Reply::openai_chat("gpt-4o", "one two"),
        ],
    );
    let mut policy = policy_with_backup(&mock);
    let mut spend = SpendPolicy::default();
    spend.cap = 1.0;
    spend.default_owner = Some("team".to_owned());
    spend.default_price = Some(Price::new(1.0, 1.0));
    policy.budget.spend = Some(spend);
    let service = ServiceBuilder::new()
        .llm_resilience(&policy)?
        .service(testing::client());
    let response = service
        .oneshot(testing::chat_request(&mock.url(), "gpt-4o", false))
        .await?;
    assert_eq!(response.status(), 200);
    // The request ends with its body, once its spend has settled.
    assert!(!captured.text().contains("request ended"));
    http_body_util::BodyExt::collect(response.into_body()).await?;

    let text = captured.text();
    let ends: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("tower_llm_resilience::request: request ended"))
        .collect();
    assert_eq!(ends.len(), 1, "{text}");
    // 9 prompt and 2 completion tokens at one micro unit each; the 503 reported nothing.
    for field in [
        "requested_route=\"primary\"",
        "selected_route=\"primary\"",
        "attempts=2",
        "outcome=\"success\"",
        "budget_owner=\"team\"",
        "cost_micros=11",
        "input_tokens=9",
        "output_tokens=2",
    ] {
        assert!(ends[0].contains(field), "{field} in {}", ends[0]);
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_throttled_call_is_a_tracing_event_with_its_route_and_wait() -> Result<(), BoxError> {
    let (captured, _guard) = Captured::install();
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_overloaded()]);
    let mut policy = Policy::interactive().circuit_breaker;
    policy.failure_rate = None;
    policy.consecutive_failures = None;
    // A floor of one call per window: the second request already meets the throttle.
    if let Some(t) = policy.throttle.as_mut() {
        t.min_requests = 1;
    }
    let mut svc = CircuitBreakerLayer::new(policy)?
        .throttle_source(tower_llm_resilience::backoff::JitterSource::seeded(1))
        .layer(client());
    let url = mock.url();
    let mut refused = None;
    for _ in 0..20 {
        if let Err(e) = send(&mut svc, routed(&url, "gpt-4o", "primary")).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.ok_or("never throttled")?;
    assert!(
        matches!(e.kind(), tower_llm_resilience::ErrorKind::Throttled { .. }),
        "{e}"
    );
    let text = captured.text();
    let events: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("tower_llm_resilience::event:") && l.contains("Throttled"))
        .collect();
    assert_eq!(events.len(), 1, "{text}");
    assert!(events[0].contains("route=\"primary\""), "{}", events[0]);
    assert!(events[0].contains("retry_in"), "{}", events[0]);
    Ok(())
}
