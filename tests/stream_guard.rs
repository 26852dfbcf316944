//! StreamGuardLayer end to end: real HTTP on loopback against `MockProvider`, under paused time.

#![cfg(feature = "testing")]

use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::attempt_log::{StreamEnd, Usage};
use tower_llm_resilience::policy::{CommitPoint, StreamPolicy, StreamSettings};
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

fn log_of(response: &Response<Body>) -> Result<AttemptLog, BoxError> {
    Ok(response
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .ok_or("the response carries the log")?)
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
    let log = log_of(&response)?;
    let (text, err) = read(response.body_mut()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(text.contains("\"Hel\"") && text.ends_with("data: [DONE]\n\n"));
    assert_eq!(t0.elapsed(), secs(6));
    let a = &log.attempts()[0];
    assert_eq!(a.status, Some(200));
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
    let log = log_of(&response)?;
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
    let log = log_of(&response)?;
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
    let log = log_of(&response)?;
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
    let log = log_of(&response)?;
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
    let log = log_of(&response)?;
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
    let log = log_of(&response)?;
    let body = response.into_body().collect_bytes().await?;
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(json["choices"][0]["message"]["content"], "Hello");
    assert_eq!(stream_end(&log, 0), Some(StreamEnd::Complete));
    Ok(())
}
