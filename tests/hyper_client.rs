//! The `hyper_client` example's own code path against `MockProvider`: tokens arrive one by one
//! through the whole ladder, after an invisible retry.

#![cfg(feature = "testing")]

#[path = "../examples/hyper_client.rs"]
#[allow(dead_code)]
mod example;

use std::time::Duration;

use tokio::time::Instant;
use tower_llm_resilience::attempt_log::{Decision, StreamEnd};
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{ErrorKind, FailureClass};

#[tokio::test(start_paused = true)]
async fn tokens_arrive_as_streamed_after_the_503_is_retried() {
    let mock = example::start_mock().await.expect("mock starts");
    let client = example::client(&example::policy()).expect("valid policy");
    let start = Instant::now();
    let mut arrivals = Vec::new();

    let streamed = example::stream_chat(
        client,
        &mock.url(),
        None,
        example::MOCK_MODEL,
        "hello",
        |token| arrivals.push((token.to_owned(), start.elapsed())),
    )
    .await
    .expect("the ladder recovers");

    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.tokens, example::MOCK_TOKENS);
    assert!(streamed.error_body.is_none());
    // Each token is handed over when it arrives: 150 ms apart, not all at the end.
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert_eq!(
        gaps,
        vec![Duration::from_millis(150); example::MOCK_TOKENS.len() - 1]
    );

    let log = &streamed.log;
    assert_eq!(log.attempts.len(), 2, "{log}");
    assert_eq!(log.attempts[0].status, Some(503));
    assert!(matches!(
        log.attempts[0].decisions.first(),
        Some(Decision::Retry { .. })
    ));
    let stream = log.attempts[1].stream.as_ref().expect("stream recorded");
    assert_eq!(stream.end, StreamEnd::Complete);
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_cut_after_tokens_ends_the_call_interrupted_and_is_not_retried() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::Any,
        [Reply::openai_stream("gpt-4o", &["one", " two", " three"]).cut_after(3)],
    );
    let client = example::client(&example::policy()).expect("valid policy");
    let mut seen = Vec::new();

    let error = example::stream_chat(client, &mock.url(), None, "gpt-4o", "hello", |t| {
        seen.push(t.to_owned())
    })
    .await
    .err()
    .expect("the stream is cut");

    // role delta + two tokens reached the caller; then the cut.
    assert_eq!(seen, ["one", " two"]);
    assert!(
        matches!(error.kind(), ErrorKind::StreamInterrupted { delivered_bytes, .. } if *delivered_bytes > 0),
        "{error:?}"
    );
    assert_eq!(error.class(), Some(FailureClass::StreamInterrupted));
    assert_eq!(mock.request_count(), 1, "never a second answer");
}

#[tokio::test]
async fn a_provider_error_response_is_returned_with_its_body() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::Any, [Reply::openai_context_length()]);
    let client = example::client(&example::policy()).expect("valid policy");

    let streamed = example::stream_chat(client, &mock.url(), None, "gpt-4o", "hello", |_| {})
        .await
        .expect("a 400 is an answer");

    assert_eq!(streamed.status, 400);
    assert!(streamed.tokens.is_empty());
    assert!(
        streamed
            .error_body
            .as_deref()
            .is_some_and(|b| b.contains("context_length_exceeded"))
    );
    assert_eq!(streamed.log.attempts.len(), 1);
}
