//! The whole ladder from one policy, end to end over loopback.
#![cfg(feature = "testing")]

use std::time::Duration;

use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::{Decision, Outcome, StopReason};
use tower_llm_resilience::circuit_breaker::CircuitState;
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{
    AttemptLog, BoxError, ErrorKind, FailureClass, Policy, ResilienceLayer, RouteName,
    ServiceBuilderExt,
};

#[path = "support/backup.rs"]
mod backup;
use backup::policy_with_backup;

#[tokio::test(start_paused = true)]
async fn an_outage_on_the_primary_is_served_by_the_backup_through_every_layer()
-> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_overloaded()]);
    mock.script(
        ScriptKey::model("backup-model"),
        [Reply::openai_stream("backup-model", &["Hel", "lo"])],
    );
    let policy = policy_with_backup(&mock);
    let layer = policy.layer()?;
    let breaker = layer.circuit_breaker();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(testing::client());

    let response = service
        .clone()
        .oneshot(testing::chat_request(&mock.url(), "gpt-4o", true))
        .await?;
    assert_eq!(response.status(), 200);
    let log = response
        .extensions()
        .get::<AttemptLog>()
        .ok_or("the log rides on the response")?
        .clone();
    let body = response.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("Hel") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );

    let snap = log.snapshot();
    let routes: Vec<&str> = snap
        .attempts
        .iter()
        .filter_map(|a| a.route.as_ref().map(RouteName::as_str))
        .collect();
    // Three tries on the primary (max_attempts), then one on the backup.
    assert_eq!(routes, ["primary", "primary", "primary", "backup"]);
    assert_eq!(
        snap.requested_route.as_ref().map(RouteName::as_str),
        Some("primary")
    );
    assert_eq!(
        snap.selected_route.as_ref().map(RouteName::as_str),
        Some("backup")
    );
    assert!(
        snap.attempts[2]
            .decisions
            .contains(&Decision::Stop(StopReason::AttemptsExhausted))
    );
    assert!(snap.attempts[2].decisions.contains(&Decision::Fallback {
        to: "backup".into()
    }));
    assert!(matches!(
        snap.outcome,
        Some(Outcome::Success { status: 200 })
    ));
    // The stream guard recorded the backup's stream as complete.
    let stream = snap.attempts[3].stream.as_ref().ok_or("stream record")?;
    assert_eq!(stream.bytes, body.len() as u64);
    assert_eq!(mock.request_count(), 4);

    // Three failures in a row are not yet enough to open the default breaker (five are).
    assert_eq!(breaker.state("primary"), CircuitState::Closed);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn an_auth_failure_fails_closed_through_every_layer() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::model("gpt-4o"), [Reply::unauthorized()]);
    let policy = policy_with_backup(&mock);
    let service = ServiceBuilder::new()
        .llm_resilience(&policy)?
        .service(testing::client());
    let response = service
        .oneshot(testing::chat_request(&mock.url(), "gpt-4o", false))
        .await?;
    assert_eq!(response.status(), 401);
    let snap = response
        .extensions()
        .get::<AttemptLog>()
        .ok_or("log")?
        .snapshot();
    assert_eq!(snap.attempts.len(), 1);
    assert_eq!(snap.attempts[0].class, Some(FailureClass::Auth));
    assert_eq!(mock.request_count(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_deadline_from_the_budget_bounds_the_whole_ladder() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::Any, [Reply::openai_rate_limited(Some("8"))]);
    let mut policy = policy_with_backup(&mock);
    policy.budget.deadline = Some(Duration::from_secs(5));
    let service = ServiceBuilder::new()
        .llm_resilience(&policy)?
        .service(testing::client());
    let started = tokio::time::Instant::now();
    let result = service
        .oneshot(testing::chat_request(&mock.url(), "gpt-4o", false))
        .await;
    // An 8 s wait cannot fit in a 5 s deadline: the retry layer stops at once and the
    // backup answers the same way; the caller gets the primary's 429 without any sleeping.
    let response = result?;
    assert_eq!(response.status(), 429);
    assert_eq!(started.elapsed(), Duration::ZERO);
    let snap = response
        .extensions()
        .get::<AttemptLog>()
        .ok_or("log")?
        .snapshot();
    assert!(
        snap.attempts[0]
            .decisions
            .contains(&Decision::Stop(StopReason::DeadlineExceeded))
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_policy_is_an_error_when_the_stack_is_built() {
    let mut policy = Policy::interactive();
    policy.retry.max_attempts = 0;
    let err = ResilienceLayer::new(&policy).err();
    assert_eq!(
        err.as_ref().map(|e| e.field()),
        Some("retry.max_attempts"),
        "{err:?}"
    );
    let via_builder = ServiceBuilder::new().llm_resilience(&policy).err();
    assert!(via_builder.is_some());
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_on_every_route_is_a_circuit_open_error() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    let policy = policy_with_backup(&mock);
    let layer = policy.layer()?;
    let breaker = layer.circuit_breaker();
    breaker.force_open("primary");
    breaker.force_open("backup");
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(testing::client());
    let err = service
        .oneshot(testing::chat_request(&mock.url(), "gpt-4o", false))
        .await
        .err()
        .ok_or("an error")?;
    // The caller gets the primary's failure.
    assert!(
        matches!(err.kind(), ErrorKind::CircuitOpen { route, .. } if route.as_str() == "primary"),
        "{err:?}"
    );
    assert!(err.attempt_log().is_some());
    assert_eq!(mock.request_count(), 0);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_five_builder_methods_make_the_same_ladder_as_resilience_layer() -> Result<(), BoxError>
{
    let mock = MockProvider::start().await?;
    let policy = policy_with_backup(&mock);
    let chained = ServiceBuilder::new()
        .llm_budget(&policy)?
        .llm_fallback(&policy)?
        .llm_retry(&policy)?
        .llm_circuit_breaker(&policy)?
        .llm_stream_guard(&policy)?
        .service(testing::client());
    let whole = ServiceBuilder::new()
        .llm_resilience(&policy)?
        .service(testing::client());
    let mut seen = Vec::new();
    // The same type, `Resilient<S>`, whichever way it is built.
    for service in [chained, whole] {
        // Overload twice, then a stream that stalls before its first token: retried, then
        // the backup serves once the primary's attempts are spent.
        mock.script(
            ScriptKey::model("gpt-4o"),
            [
                Reply::openai_overloaded(),
                Reply::openai_overloaded(),
                Reply::openai_stream("gpt-4o", &["never"]).stall_after(0),
            ],
        );
        mock.script(
            ScriptKey::model("backup-model"),
            [Reply::openai_stream("backup-model", &["Hel", "lo"])],
        );
        let before = mock.request_count();
        let response = service
            .oneshot(testing::chat_request(&mock.url(), "gpt-4o", true))
            .await?;
        let log = response
            .extensions()
            .get::<AttemptLog>()
            .ok_or("log")?
            .clone();
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let snap = log.snapshot();
        let chain: Vec<(String, Option<FailureClass>)> = snap
            .attempts
            .iter()
            .map(|a| {
                let route = a.route.as_ref().map(RouteName::as_str).unwrap_or("?");
                (route.to_owned(), a.class)
            })
            .collect();
        // The mock numbers its answers; the rest of the bytes must match.
        let text = String::from_utf8_lossy(&body)
            .split("chatcmpl-mock-")
            .map(|part| part.trim_start_matches(|c: char| c.is_ascii_digit()))
            .collect::<Vec<_>>()
            .join("chatcmpl-mock-");
        seen.push((status, text, chain, mock.request_count() - before));
    }
    assert_eq!(seen[0], seen[1], "one ladder, however it is built");
    let (status, body, chain, calls) = &seen[0];
    assert_eq!(*status, 200);
    assert!(body.contains("\"model\":\"backup-model\"") && body.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        chain,
        &[
            ("primary".to_owned(), Some(FailureClass::Overloaded)),
            ("primary".to_owned(), Some(FailureClass::Overloaded)),
            ("primary".to_owned(), Some(FailureClass::Timeout)),
            ("backup".to_owned(), None),
        ]
    );
    assert_eq!(*calls, 4);
    Ok(())
}
