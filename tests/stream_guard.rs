//! StreamGuardLayer end to end: real HTTP on loopback against `MockProvider`, under paused time.

#![cfg(feature = "testing")]

use std::time::Duration;

#[path = "support/log.rs"]
mod log;
use log::response_log;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::attempt_log::{Decision, Outcome, StreamEnd, Usage, WaitSource};
use tower_llm_resilience::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_llm_resilience::fallback::{FallbackLayer, ROUTE_HEADER};
use tower_llm_resilience::policy::{
    BackoffPolicy, CircuitBreakerPolicy, CommitPoint, Jitter, Policy, RouteConfig, StreamPolicy,
    StreamSettings,
};
use tower_llm_resilience::retry::RetryLayer;
use tower_llm_resilience::stream_guard::{StreamGuard, StreamGuardLayer};
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{
    AttemptLog, Body, BoxError, Error, ErrorKind, FailureClass, StreamCause,
};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

const MODEL: &str = "gpt-4o";
const SEC: Duration = Duration::from_secs(1);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// First token within 5 s, 3 s of silence at most, 60 s in all.
fn settings(commit: CommitPoint) -> StreamSettings {
    let mut s = StreamSettings::default();
    s.first_token_timeout = Some(secs(5));
    s.idle_timeout = Some(secs(3));
    s.total_timeout = Some(secs(60));
    s.commit = commit;
    s
}

fn guard(commit: CommitPoint) -> Result<StreamGuard<Client>, BoxError> {
    Ok(
        StreamGuardLayer::new(StreamPolicy::from_settings(settings(commit)))?
            .layer(testing::client()),
    )
}

/// Reads a body to its end: what reached the caller, and the error it ended with.
async fn read(body: &mut Body) -> (String, Option<Error>) {
    let mut out = Vec::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(d) = frame.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => return (String::from_utf8_lossy(&out).into_owned(), Some(e)),
            None => return (String::from_utf8_lossy(&out).into_owned(), None),
        }
    }
}

async fn send<S>(svc: S, mock: &MockProvider) -> Result<Response<Body>, Error>
where
    S: Service<http::Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
{
    svc.oneshot(testing::chat_request(&mock.url(), MODEL, true))
        .await
}

fn overloaded_event() -> String {
    "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}".to_owned()
}

fn stream_end(log: &AttemptLog, i: usize) -> Option<StreamEnd> {
    log.attempts()
        .get(i)?
        .stream
        .as_ref()
        .map(|s| s.end.clone())
}

#[tokio::test(start_paused = true)]
async fn a_healthy_stream_is_committed_at_its_first_token_and_recorded() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo"]).event_delay(SEC)],
    );
    let t0 = Instant::now();
    let mut response = send(guard(CommitPoint::FirstEvent)?, &mock).await?;
    // The role-only delta came at 1 s; the first token at 2 s.
    assert_eq!(t0.elapsed(), secs(2));
    let log = response_log(&response);
    let (text, err) = read(response.body_mut()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(text.contains("\"Hel\"") && text.ends_with("data: [DONE]\n\n"));
    assert_eq!(t0.elapsed(), secs(6));
    let a = &log.attempts()[0];
    assert_eq!(a.status, Some(200));
    assert_eq!(a.request_id.as_deref(), Some("req_mock_1"));
    let s = a.stream.clone().ok_or("stream recorded")?;
    assert_eq!(s.end, StreamEnd::Complete);
    assert_eq!(s.time_to_first_token, Some(secs(2)));
    assert_eq!(s.duration, secs(6));
    assert_eq!(s.bytes, text.len() as u64);
    assert_eq!(s.events, 6);
    assert_eq!(s.usage, Some(Usage::new(9, 2)));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn an_anthropic_stream_is_complete_at_message_stop() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::anthropic_stream(MODEL, &["Hi", " there", "!"])],
    );
    let mut response = send(guard(CommitPoint::End)?, &mock).await?;
    let log = response_log(&response);
    let (text, err) = read(response.body_mut()).await;
    assert!(err.is_none() && text.contains("event: message_stop"));
    let s = log.attempts()[0].stream.clone().ok_or("stream recorded")?;
    assert_eq!(s.end, StreamEnd::Complete);
    assert_eq!(s.usage, Some(Usage::new(9, 3)));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_cut_after_tokens_interrupts_with_the_delivered_byte_count() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo", " world"]).cut_after(3)],
    );
    let mut response = send(guard(CommitPoint::FirstEvent)?, &mock).await?;
    let log = response_log(&response);
    let (text, err) = read(response.body_mut()).await;
    let err = err.ok_or("the body must not end cleanly")?;
    assert!(text.contains("\"lo\"") && !text.contains("world"));
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamInterrupted {
            delivered_bytes: text.len() as u64,
            cause: StreamCause::Disconnected
        }
    );
    assert_eq!(err.class(), Some(FailureClass::StreamInterrupted));
    assert_eq!(
        stream_end(&log, 0),
        Some(StreamEnd::Interrupted(StreamCause::Disconnected))
    );
    tokio::time::sleep(secs(30)).await;
    assert_eq!(mock.request_count(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_stall_after_tokens_interrupts_at_the_idle_deadline() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo"])
            .event_delay(SEC)
            .stall_after(3)],
    );
    let t0 = Instant::now();
    let mut response = send(guard(CommitPoint::FirstEvent)?, &mock).await?;
    let (text, err) = read(response.body_mut()).await;
    // Last event at 3 s, then 3 s of silence.
    assert_eq!(t0.elapsed(), secs(6));
    assert_eq!(
        err.map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted {
            delivered_bytes: text.len() as u64,
            cause: StreamCause::IdleTimeout(secs(3))
        })
    );
    assert_eq!(mock.request_count(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_finish_reason_without_done_is_complete() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hi"]).without_terminal()],
    );
    let mut response = send(guard(CommitPoint::FirstEvent)?, &mock).await?;
    let log = response_log(&response);
    let (text, err) = read(response.body_mut()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(!text.contains("[DONE]") && text.contains("\"finish_reason\":\"stop\""));
    assert_eq!(stream_end(&log, 0), Some(StreamEnd::Complete));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn neither_marker_nor_finish_reason_is_a_truncated_stream() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hi"]).without_finish()],
    );
    let mut response = send(guard(CommitPoint::FirstEvent)?, &mock).await?;
    let (text, err) = read(response.body_mut()).await;
    assert_eq!(
        err.map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted {
            delivered_bytes: text.len() as u64,
            cause: StreamCause::Truncated
        })
    );
    // With commit `end`, the same stream is a retryable failure the caller never sees.
    let err = send(guard(CommitPoint::End)?, &mock)
        .await
        .err()
        .ok_or("truncated")?;
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::Truncated
        }
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn in_band_overload_after_commit_interrupts() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo"]).error_after(2, overloaded_event())],
    );
    let mut response = send(guard(CommitPoint::FirstEvent)?, &mock).await?;
    let (text, err) = read(response.body_mut()).await;
    assert_eq!(
        err.map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted {
            delivered_bytes: text.len() as u64,
            cause: StreamCause::InBandError {
                class: FailureClass::Overloaded,
                error_type: Some("overloaded_error".into())
            }
        })
    );
    assert_eq!(mock.request_count(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn in_band_overload_before_commit_is_a_classified_failure() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo"]).error_after(1, overloaded_event())],
    );
    let err = send(guard(CommitPoint::FirstEvent)?, &mock)
        .await
        .err()
        .ok_or("failed before commit")?;
    assert_eq!(err.class(), Some(FailureClass::Overloaded));
    let log = err.attempt_log().ok_or("log")?;
    assert_eq!(log.attempts()[0].class, Some(FailureClass::Overloaded));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_malformed_event_passes_through_and_is_counted() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo"]).malformed_after(2)],
    );
    let mut response = send(guard(CommitPoint::FirstEvent)?, &mock).await?;
    let log = response_log(&response);
    let (text, err) = read(response.body_mut()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(text.contains("data: {\"choices\":[{\n\n"));
    let s = log.attempts()[0].stream.clone().ok_or("recorded")?;
    assert_eq!((s.malformed_events, s.end), (1, StreamEnd::Complete));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_stall_before_the_first_token_fails_at_the_first_token_deadline() -> Result<(), BoxError>
{
    let mock = MockProvider::start().await?;
    // The role-only delta, then nothing: that is not a first token.
    let mut s = settings(CommitPoint::FirstEvent);
    s.idle_timeout = Some(secs(30));
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hi"]).stall_after(1)],
    );
    let svc = StreamGuardLayer::new(StreamPolicy::from_settings(s))?.layer(testing::client());
    let t0 = Instant::now();
    let err = send(svc, &mock).await.err().ok_or("no first token")?;
    assert_eq!(t0.elapsed(), secs(5));
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::FirstTokenTimeout(secs(5))
        }
    );
    assert_eq!(err.class(), Some(FailureClass::Timeout));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn no_answer_at_all_is_a_first_token_timeout() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::model(MODEL), [Reply::never()]);
    let t0 = Instant::now();
    let err = send(guard(CommitPoint::FirstEvent)?, &mock)
        .await
        .err()
        .ok_or("no answer")?;
    assert_eq!(t0.elapsed(), secs(5));
    assert_eq!(err.class(), Some(FailureClass::Timeout));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn error_responses_pass_through_classified() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::model(MODEL), [Reply::anthropic_overloaded()]);
    let response = send(guard(CommitPoint::FirstEvent)?, &mock).await?;
    assert_eq!(response.status(), 529);
    let log = response_log(&response);
    let body = response.into_body().collect_bytes().await?;
    assert!(std::str::from_utf8(&body)?.contains("overloaded_error"));
    let a = &log.attempts()[0];
    assert_eq!(
        (a.status, a.class),
        (Some(529), Some(FailureClass::Overloaded))
    );
    assert!(a.stream.is_none());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_non_streamed_answer_is_guarded_byte_by_byte() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_chat(MODEL, "Hello").delay_head(secs(2))],
    );
    let t0 = Instant::now();
    let response = send(guard(CommitPoint::FirstEvent)?, &mock).await?;
    assert_eq!(t0.elapsed(), secs(2));
    let log = response_log(&response);
    let body = response.into_body().collect_bytes().await?;
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(json["choices"][0]["message"]["content"], "Hello");
    assert_eq!(stream_end(&log, 0), Some(StreamEnd::Complete));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// With RetryLayer outside: failures before the commit point are retried, after it never.

/// The interactive preset with the guard's settings above, retries 1 s apart (no jitter), and
/// an idempotency key so a possibly-accepted request may be replayed.
fn policy(commit: CommitPoint) -> Policy {
    let mut p = Policy::interactive();
    p.stream = StreamPolicy::from_settings(settings(commit));
    p.retry.max_attempts = 3;
    p.retry.seed = Some(7);
    p.retry.backoff = BackoffPolicy::new(SEC, secs(8)).jitter(Jitter::None);
    p.idempotency.key_header = Some("idempotency-key".into());
    p
}

fn retried(
    policy: &Policy,
) -> Result<
    impl Service<http::Request<Full<Bytes>>, Response = Response<Body>, Error = Error, Future: Send>
    + Clone,
    BoxError,
> {
    Ok(tower::ServiceBuilder::new()
        .layer(RetryLayer::from_policy(policy)?)
        .layer(StreamGuardLayer::from_policy(policy)?)
        .service(testing::client()))
}

#[tokio::test(start_paused = true)]
async fn a_stall_before_the_first_token_is_retried_and_the_caller_sees_only_the_second_answer()
-> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [
            // The role-only delta, then silence.
            Reply::openai_stream(MODEL, &["stale"]).stall_after(1),
            Reply::openai_stream(MODEL, &["Hel", "lo"]),
        ],
    );
    // Idle longer than first-token: the first-token timer decides.
    let mut p = policy(CommitPoint::FirstEvent);
    p.stream.idle_timeout = Some(secs(10));
    let t0 = Instant::now();
    let mut response = send(retried(&p)?, &mock).await?;
    // First-token deadline at 5 s, then the 1 s backoff.
    assert_eq!(t0.elapsed(), secs(6));
    let log = response_log(&response);
    let (text, err) = read(response.body_mut()).await;
    assert!(err.is_none(), "{err:?}");
    // Not a byte of the first attempt: every event is the second response's.
    assert!(text.contains("chatcmpl-mock-2") && !text.contains("chatcmpl-mock-1"));
    assert_eq!(text.matches("\"role\":\"assistant\"").count(), 1);
    assert!(!text.contains("stale") && text.ends_with("data: [DONE]\n\n"));

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].at - requests[0].at, secs(6));
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].class, Some(FailureClass::Timeout));
    assert_eq!(
        attempts[0].decisions,
        [Decision::Retry {
            wait: SEC,
            source: WaitSource::Backoff
        }]
    );
    assert_eq!(
        stream_end(&log, 0),
        Some(StreamEnd::FailedBeforeCommit(
            StreamCause::FirstTokenTimeout(secs(5))
        ))
    );
    assert_eq!(attempts[1].class, None);
    assert_eq!(stream_end(&log, 1), Some(StreamEnd::Complete));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn in_band_overload_before_commit_is_retried() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_stream(MODEL, &["stale"]).error_after(1, overloaded_event()),
            Reply::openai_stream(MODEL, &["Hi"]),
        ],
    );
    let t0 = Instant::now();
    let mut response = send(retried(&policy(CommitPoint::FirstEvent))?, &mock).await?;
    assert_eq!(t0.elapsed(), SEC);
    let log = response_log(&response);
    let (text, err) = read(response.body_mut()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(!text.contains("chatcmpl-mock-1") && !text.contains("overloaded_error"));
    assert!(text.contains("\"Hi\""));
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].class, Some(FailureClass::Overloaded));
    assert_eq!(
        stream_end(&log, 0),
        Some(StreamEnd::FailedBeforeCommit(StreamCause::InBandError {
            class: FailureClass::Overloaded,
            error_type: Some("overloaded_error".into())
        }))
    );
    Ok(())
}

/// After the commit point nothing is retried: the body fails and no second request is sent.
async fn interrupted_without_retry(reply: Reply, cause: StreamCause) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [reply, Reply::openai_stream(MODEL, &["second"])],
    );
    let mut response = send(retried(&policy(CommitPoint::FirstEvent))?, &mock).await?;
    let log = response_log(&response);
    let (text, err) = read(response.body_mut()).await;
    assert!(text.contains("\"Hel\"") && !text.contains("second"));
    assert_eq!(
        err.map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted {
            delivered_bytes: text.len() as u64,
            cause: cause.clone()
        })
    );
    tokio::time::sleep(secs(60)).await;
    assert_eq!(mock.request_count(), 1);
    assert_eq!(log.attempts().len(), 1);
    assert_eq!(stream_end(&log, 0), Some(StreamEnd::Interrupted(cause)));
    // The log's outcome is what the caller finally got: the interruption, not the 200 head.
    assert!(
        matches!(
            log.snapshot().outcome,
            Some(Outcome::Error {
                class: Some(FailureClass::StreamInterrupted),
                ..
            })
        ),
        "{:?}",
        log.snapshot().outcome
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_cut_after_tokens_is_not_retried() -> Result<(), BoxError> {
    interrupted_without_retry(
        Reply::openai_stream(MODEL, &["Hel", "lo", " world"]).cut_after(3),
        StreamCause::Disconnected,
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn a_stall_after_tokens_is_not_retried() -> Result<(), BoxError> {
    interrupted_without_retry(
        Reply::openai_stream(MODEL, &["Hel", "lo", " world"]).stall_after(3),
        StreamCause::IdleTimeout(secs(3)),
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn in_band_overload_after_commit_is_not_retried() -> Result<(), BoxError> {
    interrupted_without_retry(
        Reply::openai_stream(MODEL, &["Hel", "lo"]).error_after(2, overloaded_event()),
        StreamCause::InBandError {
            class: FailureClass::Overloaded,
            error_type: Some("overloaded_error".into()),
        },
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn the_logging_switches_of_the_policy_apply() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hi"])],
    );
    let mut p = policy(CommitPoint::FirstEvent);
    p.logging.request_ids = false;
    let svc = StreamGuardLayer::from_policy(&p)?.layer(testing::client());
    let response = send(svc, &mock).await?;
    let log = response_log(&response);
    response.into_body().collect_bytes().await?;
    let a = &log.attempts()[0];
    assert_eq!((a.status, a.request_id.clone()), (Some(200), None));
    assert_eq!(
        log.snapshot().requested_route.map(|r| r.to_string()),
        Some(mock.addr().to_string())
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// With FallbackLayer and RetryLayer outside: the whole recommended stack below the budget.

const BACKUP_MODEL: &str = "backup-model";

fn with_backup(mut p: Policy, mock: &MockProvider) -> Policy {
    p.fallback.routes = vec![
        RouteConfig::new("backup")
            .base_url(format!("{}/backup/v1", mock.url()))
            .model(BACKUP_MODEL),
    ];
    p
}

fn full_stack(
    policy: &Policy,
) -> Result<
    impl Service<http::Request<Full<Bytes>>, Response = Response<Body>, Error = Error, Future: Send>,
    BoxError,
> {
    Ok(tower::ServiceBuilder::new()
        .layer(FallbackLayer::from_policy(policy)?)
        .layer(RetryLayer::from_policy(policy)?)
        .layer(StreamGuardLayer::from_policy(policy)?)
        .service(testing::client()))
}

#[tokio::test(start_paused = true)]
async fn a_cut_with_commit_end_gives_exactly_one_complete_answer_from_the_backup()
-> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo", " world"]).cut_after(3)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_stream(BACKUP_MODEL, &["Hi", " there"])],
    );
    let policy = with_backup(policy(CommitPoint::End), &mock);
    let mut response = send(full_stack(&policy)?, &mock).await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[ROUTE_HEADER], "backup");
    let log = response_log(&response);
    let (text, err) = read(response.body_mut()).await;
    assert!(err.is_none(), "{err:?}");
    // One answer, whole, and the backup's alone.
    assert_eq!(text.matches("\"role\":\"assistant\"").count(), 1);
    assert_eq!(text.matches("data: [DONE]").count(), 1);
    assert!(text.contains("\"Hi\"") && text.contains("\" there\""));
    assert!(!text.contains("\"Hel\"") && !text.contains(&format!("\"model\":\"{MODEL}\"")));
    assert!(text.ends_with("data: [DONE]\n\n"));

    let received: Vec<_> = mock.requests().into_iter().map(|r| r.model).collect();
    assert_eq!(received, [Some(MODEL.into()), Some(BACKUP_MODEL.into())]);
    let snapshot = log.snapshot();
    assert_eq!(
        snapshot.selected_route.map(|r| r.to_string()),
        Some("backup".into())
    );
    let attempts = &snapshot.attempts;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].class, Some(FailureClass::Transport));
    assert_eq!(
        attempts[0]
            .stream
            .as_ref()
            .map(|s| (s.end.clone(), s.bytes)),
        Some((StreamEnd::FailedBeforeCommit(StreamCause::Disconnected), 0))
    );
    assert!(
        attempts[0].decisions.contains(&Decision::Fallback {
            to: "backup".into()
        }),
        "{:?}",
        attempts[0].decisions
    );
    assert_eq!(
        attempts[1].stream.as_ref().map(|s| s.end.clone()),
        Some(StreamEnd::Complete)
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_same_cut_after_commit_first_event_is_never_routed_around() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo", " world"]).cut_after(3)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_stream(BACKUP_MODEL, &["Hi"])],
    );
    let policy = with_backup(policy(CommitPoint::FirstEvent), &mock);
    let mut response = send(full_stack(&policy)?, &mock).await?;
    let (text, err) = read(response.body_mut()).await;
    assert_eq!(
        err.map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted {
            delivered_bytes: text.len() as u64,
            cause: StreamCause::Disconnected
        })
    );
    assert!(!text.contains(BACKUP_MODEL));
    tokio::time::sleep(secs(60)).await;
    assert_eq!(mock.request_count(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn streams_interrupted_after_commit_count_for_the_breaker_above() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo"]).cut_after(2)],
    );
    let mut breaker = CircuitBreakerPolicy::default();
    breaker.failure_rate = None;
    breaker.consecutive_failures = Some(2);
    // No throttle: a request without a backup route fails fast on the open circuit too.
    breaker.throttle = None;
    let breaker = CircuitBreakerLayer::new(breaker)?.without_jitter();
    let handle = breaker.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(breaker)
        .layer(StreamGuardLayer::new(StreamPolicy::from_settings(
            settings(CommitPoint::FirstEvent),
        ))?)
        .service(testing::client());
    let route = mock.addr().to_string();
    for _ in 0..2 {
        // Each response head is a success; each body ends interrupted.
        let mut response = send(svc.clone(), &mock).await?;
        let (_, err) = read(response.body_mut()).await;
        assert!(matches!(
            err.map(|e| e.kind().clone()),
            Some(ErrorKind::StreamInterrupted { .. })
        ));
    }
    assert_eq!(handle.state(route.as_str()), CircuitState::Open);
    let err = send(svc, &mock).await.err().ok_or("fails fast")?;
    assert!(
        matches!(err.kind(), ErrorKind::CircuitOpen { .. }),
        "{err:?}"
    );
    assert_eq!(mock.request_count(), 2);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Steady state: no allocation per chunk.

mod allocations {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// Counts the allocations of the current thread.
    struct Counting;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            // SAFETY: forwarded as is to the system allocator.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded as is to the system allocator.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    fn allocations() -> u64 {
        ALLOCATIONS.with(Cell::get)
    }

    const DELTA: &[u8] = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok\"},\"finish_reason\":null}]}\n\n";

    /// A body of `n` content deltas (each split in two chunks, mid-line), a finish and `[DONE]`.
    struct Deltas {
        left: usize,
        half: bool,
        end: usize,
    }

    impl http_body::Body for Deltas {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            let chunk: &'static [u8] = if self.left > 0 {
                self.half = !self.half;
                if self.half {
                    &DELTA[..40]
                } else {
                    self.left -= 1;
                    &DELTA[40..]
                }
            } else {
                self.end += 1;
                match self.end {
                    1 => b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
                    2 => b"data: [DONE]\n\n",
                    _ => return Poll::Ready(None),
                }
            };
            Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(chunk)))))
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn scanning_a_committed_stream_allocates_nothing_per_chunk() -> Result<(), BoxError> {
        let transport = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
            let mut response = Response::new(Deltas {
                left: 1000,
                half: false,
                end: 0,
            });
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            Ok::<_, std::io::Error>(response)
        });
        let svc = StreamGuardLayer::new(StreamPolicy::from_settings(settings(
            CommitPoint::FirstEvent,
        )))?
        .layer(transport);
        let mut response = svc
            .oneshot(http::Request::new(Full::new(Bytes::new())))
            .await?;
        let body = response.body_mut();
        // Warm up: the scanner's buffers reach their size.
        for _ in 0..100 {
            body.frame().await.ok_or("more frames")??;
        }
        let before = allocations();
        for _ in 0..1600 {
            body.frame().await.ok_or("more frames")??;
        }
        assert_eq!(allocations() - before, 0, "allocations in 1600 chunks");
        // The counter does count.
        drop(std::hint::black_box(Vec::<u8>::with_capacity(8)));
        assert_eq!(allocations() - before, 1);
        let (_, err) = read(body).await;
        assert!(err.is_none(), "{err:?}");
        Ok(())
    }
}
