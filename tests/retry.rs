//! End-to-end tests of `RetryLayer` over real HTTP on loopback: `MockProvider` and the
//! hyper-util client, under paused time with seeded jitter.

#![cfg(feature = "testing")]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

#[path = "support/log.rs"]
mod log;
use log::{last_decision, log_of};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::{Decision, LocalEventKind, StopReason, WaitSource};
use tower_llm_resilience::policy::{IdempotencyPolicy, Policy, RetryPolicy};
use tower_llm_resilience::replay::ReplayBody;
use tower_llm_resilience::retry::RetryLayer;
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{AttemptLog, Body, BoxError, Error, FailureClass};

const MODEL: &str = "gpt-4o";

// ---------------------------------------------------------------------------------------------
// Helpers.

fn retry_policy() -> RetryPolicy {
    let mut p = RetryPolicy::default();
    p.max_attempts = 3;
    p.seed = Some(7);
    p
}

fn layer(p: RetryPolicy) -> RetryLayer {
    RetryLayer::new(p).unwrap_or_else(|e| panic!("{e}"))
}

fn with_key(l: RetryLayer) -> RetryLayer {
    let mut idem = IdempotencyPolicy::default();
    idem.key_header = Some("idempotency-key".into());
    l.idempotency(idem).unwrap_or_else(|e| panic!("{e}"))
}

async fn mock(replies: impl IntoIterator<Item = Reply>) -> MockProvider {
    let mock = MockProvider::start()
        .await
        .unwrap_or_else(|e| panic!("mock: {e}"));
    mock.script(ScriptKey::Any, replies);
    mock
}

type Out = Result<Response<Body>, Error>;

/// One logical request through `RetryLayer` over the hyper-util client.
async fn send(l: &RetryLayer, mock: &MockProvider) -> Out {
    let mut svc = ServiceBuilder::new().layer(l.clone()).service(client());
    svc.ready()
        .await?
        .call(chat_request(&mock.url(), MODEL, false))
        .await
}

fn stopped(log: &AttemptLog, reason: StopReason) {
    assert_eq!(
        last_decision(log),
        Some(Decision::Stop(reason.clone())),
        "expected a stop ({}) in\n{log}",
        reason.as_str()
    );
}

/// Arrival gaps between consecutive requests at the mock.
fn gaps(mock: &MockProvider) -> Vec<Duration> {
    let at: Vec<Instant> = mock.requests().iter().map(|r| r.at).collect();
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

/// Status, headers (without `date`) and body of the `nth` (1-based) response a fresh mock with
/// `replies` sends to the plain client: what the provider said, untouched by any layer.
async fn reference(replies: Vec<Reply>, nth: usize) -> (StatusCode, HeaderMap, Bytes) {
    let m = mock(replies).await;
    let c = client();
    let mut last = None;
    for _ in 0..nth {
        let r = c
            .request(chat_request(&m.url(), MODEL, false))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        last = Some(r);
    }
    let r = last.unwrap_or_else(|| panic!("nth must be at least 1"));
    let (parts, body) = r.into_parts();
    let body = body
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .to_bytes();
    (parts.status, without_date(parts.headers), body)
}

fn without_date(mut h: HeaderMap) -> HeaderMap {
    h.remove(http::header::DATE);
    h
}

/// Asserts that `r` is exactly the provider's response (status, headers, body bytes).
async fn assert_unchanged(r: Response<Body>, expected: (StatusCode, HeaderMap, Bytes)) {
    let (parts, body) = r.into_parts();
    assert_eq!(parts.status, expected.0);
    assert_eq!(without_date(parts.headers), expected.1);
    let body = body.collect_bytes().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(body, expected.2);
}

// ---------------------------------------------------------------------------------------------
// Server waits.

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_is_honoured_to_the_millisecond() {
    let m = mock([
        Reply::openai_rate_limited(Some("2")),
        Reply::openai_chat(MODEL, "hi"),
    ])
    .await;
    let out = send(&layer(retry_policy()), &m).await;
    let log = log_of(&out);
    assert_eq!(out.map(|r| r.status()).ok(), Some(StatusCode::OK));
    assert_eq!(m.request_count(), 2);
    let gap = gaps(&m)[0];
    assert!(
        gap >= Duration::from_secs(2),
        "second attempt after {gap:?}"
    );
    let (wait, source) = log.attempts()[0].wait().unwrap_or_else(|| panic!("{log}"));
    assert_eq!(source, WaitSource::Server);
    assert_eq!(gap, wait, "the logged wait is the wait that happened");
    assert!(
        wait <= Duration::from_millis(2400),
        "jitter is at most a fifth: {wait:?}"
    );
    assert_eq!(log.attempts()[0].retry_after, Some(Duration::from_secs(2)));
    assert_eq!(log.attempts()[0].class, Some(FailureClass::RateLimited));
}

#[tokio::test(start_paused = true)]
async fn retry_after_ms_is_honoured() {
    let m = mock([
        Reply::azure_rate_limited("1500"),
        Reply::openai_chat(MODEL, "hi"),
    ])
    .await;
    let out = send(&layer(retry_policy()), &m).await;
    let log = log_of(&out);
    assert_eq!(out.map(|r| r.status()).ok(), Some(StatusCode::OK));
    let gap = gaps(&m)[0];
    assert!(gap >= Duration::from_millis(1500), "{gap:?}");
    assert!(gap <= Duration::from_millis(1800), "{gap:?}");
    assert_eq!(
        log.attempts()[0].wait().map(|w| w.1),
        Some(WaitSource::Server)
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_is_honoured() {
    // Judged against the response's own Date header: three seconds later.
    let m = mock([
        Reply::json(
            429,
            r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#,
        )
        .header("date", "Sun, 06 Nov 1994 08:49:37 GMT")
        .header("retry-after", "Sun, 06 Nov 1994 08:49:40 GMT"),
        Reply::openai_chat(MODEL, "hi"),
    ])
    .await;
    let out = send(&layer(retry_policy()), &m).await;
    let log = log_of(&out);
    assert_eq!(out.map(|r| r.status()).ok(), Some(StatusCode::OK), "{log}");
    let gap = gaps(&m)[0];
    assert!(gap >= Duration::from_secs(3), "{gap:?}");
    assert!(gap <= Duration::from_millis(3600), "{gap:?}");
    assert_eq!(log.attempts()[0].retry_after, Some(Duration::from_secs(3)));
}

#[tokio::test(start_paused = true)]
async fn a_wait_above_the_cap_returns_the_429_at_once() {
    let mut p = retry_policy();
    p.max_server_wait = Duration::from_secs(10);
    let m = mock([Reply::openai_rate_limited(Some("30"))]).await;
    let start = Instant::now();
    let out = send(&layer(p), &m).await;
    assert_eq!(Instant::now(), start, "no sleep");
    assert_eq!(m.request_count(), 1);
    let log = log_of(&out);
    stopped(&log, StopReason::ServerWaitAboveCap);
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert_unchanged(
        r,
        reference(vec![Reply::openai_rate_limited(Some("30"))], 1).await,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_deadline_returns_the_429_at_once() {
    let mut p = retry_policy();
    p.max_elapsed = Duration::from_secs(1);
    let m = mock([Reply::openai_rate_limited(Some("2"))]).await;
    let start = Instant::now();
    let out = send(&layer(p), &m).await;
    assert_eq!(Instant::now(), start, "no sleep");
    assert_eq!(m.request_count(), 1);
    stopped(&log_of(&out), StopReason::DeadlineExceeded);
    assert_eq!(
        out.map(|r| r.status()).ok(),
        Some(StatusCode::TOO_MANY_REQUESTS)
    );
}

#[tokio::test(start_paused = true)]
async fn an_attempt_in_flight_at_the_deadline_is_cut_there() {
    let mut p = retry_policy();
    p.max_elapsed = Duration::from_secs(4);
    // A 500 after 1 s, then a retry that is never answered.
    let m = mock([
        Reply::openai_server_error().delay_head(Duration::from_secs(1)),
        Reply::never(),
    ])
    .await;
    let start = Instant::now();
    let out = send(&layer(p), &m).await;
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(4),
        "cut at the deadline"
    );
    assert_eq!(m.request_count(), 2);
    let log = log_of(&out);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 2, "the cut attempt is in the log");
    assert_eq!(attempts[1].class, Some(FailureClass::Timeout));
    stopped(&log, StopReason::DeadlineExceeded);
    assert!(matches!(
        out.err().map(|e| e.kind().clone()),
        Some(tower_llm_resilience::ErrorKind::DeadlineExceeded)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_head_that_never_comes_is_bounded_by_the_deadline() {
    let mut p = retry_policy();
    p.max_elapsed = Duration::from_millis(2500);
    let m = mock([Reply::never()]).await;
    let start = Instant::now();
    let out = send(&layer(p), &m).await;
    assert_eq!(start.elapsed(), Duration::from_millis(2500));
    assert_eq!(m.request_count(), 1);
    let log = log_of(&out);
    assert_eq!(log.attempt_count(), 1);
    stopped(&log, StopReason::DeadlineExceeded);
    assert!(out.is_err());
}

// ---------------------------------------------------------------------------------------------
// Transient failures.

#[tokio::test(start_paused = true)]
async fn server_error_then_success_succeeds_on_attempt_two() {
    let m = mock([
        Reply::openai_server_error(),
        Reply::openai_chat(MODEL, "hi"),
    ])
    .await;
    let out = send(&layer(retry_policy()), &m).await;
    let log = log_of(&out);
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert_unchanged(
        r,
        reference(
            vec![
                Reply::openai_server_error(),
                Reply::openai_chat(MODEL, "hi"),
            ],
            2,
        )
        .await,
    )
    .await;
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].status, Some(500));
    assert_eq!(attempts[0].class, Some(FailureClass::ServerError));
    assert_eq!(attempts[0].request_id.as_deref(), Some("req_mock_1"));
    assert_eq!(attempts[0].wait().map(|w| w.1), Some(WaitSource::Backoff));
    assert_eq!(attempts[1].status, Some(200));
    assert_eq!(attempts[1].route_attempt, 1);
    assert_eq!(last_decision(&log), Some(Decision::Accept));
    assert_eq!(
        gaps(&m)[0],
        attempts[0].wait().map_or(Duration::MAX, |w| w.0)
    );
}

#[tokio::test(start_paused = true)]
async fn persistent_overload_stops_at_max_attempts_with_every_attempt_logged() {
    let m = mock([Reply::openai_overloaded()]).await;
    let out = send(&layer(retry_policy()), &m).await;
    let log = log_of(&out);
    assert_eq!(m.request_count(), 3);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 3);
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a.status, Some(503));
        assert_eq!(a.class, Some(FailureClass::Overloaded));
        assert_eq!(a.route_attempt as usize, i);
    }
    assert!(attempts[..2].iter().all(|a| a.wait().is_some()));
    stopped(&log, StopReason::AttemptsExhausted);
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert_unchanged(r, reference(vec![Reply::openai_overloaded()], 3).await).await;
}

#[tokio::test(start_paused = true)]
async fn a_connection_reset_before_headers_is_retried() {
    let m = mock([Reply::reset(), Reply::openai_chat(MODEL, "hi")]).await;
    // The default policy: no idempotency key, a POST. A connection that closes before any
    // response byte is a `Connect` failure, which always replays.
    let out = send(&layer(retry_policy()), &m).await;
    let log = log_of(&out);
    assert_eq!(out.map(|r| r.status()).ok(), Some(StatusCode::OK), "{log}");
    assert_eq!(m.request_count(), 2);
    let first = &log.attempts()[0];
    assert_eq!(first.class, Some(FailureClass::Connect), "{log}");
    assert!(first.status.is_none() && first.error.is_some(), "{log}");
    assert_eq!(first.wait().map(|w| w.1), Some(WaitSource::Backoff));
}

// ---------------------------------------------------------------------------------------------
// The retry budget under a full outage.

#[tokio::test(start_paused = true)]
async fn a_full_outage_of_1000_requests_stays_within_the_retry_budget() {
    let mut p = retry_policy();
    // Short waits keep the whole run inside the budget's 10 s window.
    p.backoff = tower_llm_resilience::policy::BackoffPolicy::new(
        Duration::from_millis(1),
        Duration::from_millis(10),
    );
    let l = layer(p);
    let m = mock([Reply::openai_overloaded()]).await;
    let url = m.url();
    let start = Instant::now();
    let svc = ServiceBuilder::new().layer(l.clone()).service(client());
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (mut svc, url, limit) = (svc.clone(), url.clone(), limit.clone());
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let out = match svc.ready().await {
                Ok(s) => s.call(chat_request(&url, MODEL, false)).await,
                Err(e) => Err(e),
            };
            log_of(&out)
        });
    }
    let (mut denied, mut logs) = (0, 0);
    while let Some(log) = set.join_next().await {
        let log = log.unwrap_or_else(|e| panic!("{e}"));
        logs += 1;
        if last_decision(&log) == Some(Decision::Stop(StopReason::RetryBudgetDenied)) {
            denied += 1;
            assert!(
                log.events()
                    .iter()
                    .any(|e| e.kind == LocalEventKind::RetryBudgetDenied)
            );
        }
    }
    assert!(
        Instant::now() - start < Duration::from_secs(10),
        "one budget window"
    );
    let total = m.request_count();
    assert_eq!(logs, 1000);
    // 20 % of the logical requests plus the floor of 10/s over 10 s.
    assert!(total <= 1200 + 100, "{total} attempts for 1000 requests");
    assert!(total > 1000, "the budget allowed some retries");
    assert!(denied >= 1000 - (total - 1000), "{denied} denied");
}

// ---------------------------------------------------------------------------------------------
// One attempt and a logged reason.

/// A request body that cannot be copied (like a streaming upload).
struct OneShot(Full<Bytes>);

impl ReplayBody for OneShot {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_that_cannot_be_replayed_gets_one_attempt() {
    let m = mock([Reply::openai_overloaded()]).await;
    let mut svc = ServiceBuilder::new()
        .layer(layer(retry_policy()))
        .map_request(|r: Request<OneShot>| r.map(|b| b.0))
        .service(client());
    let req = chat_request(&m.url(), MODEL, false).map(OneShot);
    let out = match svc.ready().await {
        Ok(s) => s.call(req).await,
        Err(e) => Err(e),
    };
    assert_eq!(m.request_count(), 1);
    stopped(&log_of(&out), StopReason::NotReplayable);
    assert_eq!(
        out.map(|r| r.status()).ok(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
}

/// Fails an attempt whose response head takes longer than `after` with a `Timeout`.
#[derive(Clone)]
struct HeadTimeout<S> {
    inner: S,
    after: Duration,
}

impl<S, B> Service<Request<B>> for HeadTimeout<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        let after = self.after;
        Box::pin(async move {
            match tokio::time::timeout(after, fut).await {
                Ok(r) => r.map_err(Into::into),
                Err(e) => Err(Box::new(Error::transport(FailureClass::Timeout, e)) as BoxError),
            }
        })
    }
}

async fn send_with_timeout(l: RetryLayer, m: &MockProvider) -> Out {
    let mut svc = ServiceBuilder::new().layer(l).service(HeadTimeout {
        inner: client(),
        after: Duration::from_secs(1),
    });
    match svc.ready().await {
        Ok(s) => s.call(chat_request(&m.url(), MODEL, false)).await,
        Err(e) => Err(e),
    }
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_post_without_an_idempotency_key_is_not_replayed() {
    let m = mock([Reply::never()]).await;
    let out = send_with_timeout(layer(retry_policy()), &m).await;
    assert_eq!(m.request_count(), 1);
    let log = log_of(&out);
    stopped(&log, StopReason::NotIdempotent);
    let e = out.err().unwrap_or_else(|| panic!("expected an error"));
    assert_eq!(e.class(), Some(FailureClass::Timeout));
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_post_with_a_key_is_replayed_once() {
    let m = mock([
        Reply::openai_chat(MODEL, "late").delay_head(Duration::from_secs(5)),
        Reply::openai_chat(MODEL, "hi"),
    ])
    .await;
    let out = send_with_timeout(with_key(layer(retry_policy())), &m).await;
    let log = log_of(&out);
    assert_eq!(out.map(|r| r.status()).ok(), Some(StatusCode::OK), "{log}");
    assert_eq!(m.request_count(), 2);
    assert_eq!(log.attempts()[0].class, Some(FailureClass::Timeout));
}

#[tokio::test(start_paused = true)]
async fn should_retry_false_stops_a_retryable_failure() {
    let m = mock([Reply::openai_overloaded().header("x-should-retry", "false")]).await;
    let out = send(&layer(retry_policy()), &m).await;
    assert_eq!(m.request_count(), 1);
    stopped(&log_of(&out), StopReason::ServerSaidNo);
}

#[tokio::test(start_paused = true)]
async fn should_retry_true_retries_a_bad_request() {
    let m = mock([
        Reply::json(
            400,
            r#"{"error":{"message":"try again","type":"invalid_request_error","code":null}}"#,
        )
        .header("x-should-retry", "true"),
        Reply::openai_chat(MODEL, "hi"),
    ])
    .await;
    let out = send(&layer(retry_policy()), &m).await;
    assert_eq!(m.request_count(), 2);
    assert_eq!(out.map(|r| r.status()).ok(), Some(StatusCode::OK));
}

// ---------------------------------------------------------------------------------------------
// Idempotency keys and attempt numbers.

#[tokio::test(start_paused = true)]
async fn the_idempotency_key_is_stable_across_attempts_and_new_per_request() {
    let mut p = retry_policy();
    p.attempt_header = Some("x-stainless-retry-count".into());
    let l = with_key(layer(p));
    let m = mock([Reply::openai_overloaded()]).await;
    let _ = send(&l, &m).await;
    let _ = send(&l, &m).await;
    let reqs = m.requests();
    assert_eq!(reqs.len(), 6);
    let key = |i: usize| reqs[i].headers.get("idempotency-key").cloned();
    assert!(key(0).is_some());
    assert_eq!(key(0), key(1));
    assert_eq!(key(1), key(2));
    assert_eq!(key(3), key(4));
    assert_eq!(key(4), key(5));
    assert_ne!(key(0), key(3));
    let counts: Vec<_> = reqs
        .iter()
        .map(|r| {
            r.headers["x-stainless-retry-count"]
                .to_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    assert_eq!(counts, ["0", "1", "2", "0", "1", "2"]);
}

// ---------------------------------------------------------------------------------------------
// One test per row of the table.

/// Sends one request with `replies` scripted; asserts the number of attempts and that the
/// response returned is the provider's last one, unchanged.
async fn row(replies: Vec<Reply>, attempts: usize, stop: StopReason) -> AttemptLog {
    let m = mock(replies.clone()).await;
    let out = send(&layer(retry_policy()), &m).await;
    let log = log_of(&out);
    assert_eq!(m.request_count(), attempts, "{log}");
    assert_eq!(log.attempt_count(), attempts, "{log}");
    stopped(&log, stop);
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert_unchanged(r, reference(replies, attempts).await).await;
    log
}

fn class_of(log: &AttemptLog) -> Option<FailureClass> {
    log.attempts().last().and_then(|a| a.class)
}

#[tokio::test(start_paused = true)]
async fn row_connect_refused_is_retried_to_max_attempts() {
    // A port nobody listens on (loopback only).
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        l.local_addr().unwrap_or_else(|e| panic!("{e}"))
    };
    let mut svc = ServiceBuilder::new()
        .layer(layer(retry_policy()))
        .service(client());
    let out = match svc.ready().await {
        Ok(s) => {
            s.call(chat_request(&format!("http://{addr}"), MODEL, false))
                .await
        }
        Err(e) => Err(e),
    };
    let log = log_of(&out);
    let e = out.err().unwrap_or_else(|| panic!("expected an error"));
    assert_eq!(e.class(), Some(FailureClass::Connect), "{log}");
    assert_eq!(log.attempt_count(), 3);
    stopped(&log, StopReason::AttemptsExhausted);
}

#[tokio::test(start_paused = true)]
async fn row_timeout_is_retried_once_when_replay_is_safe() {
    let m = mock([Reply::never()]).await;
    let out = send_with_timeout(with_key(layer(retry_policy())), &m).await;
    assert_eq!(m.request_count(), 2);
    let log = log_of(&out);
    stopped(&log, StopReason::AttemptsExhausted);
    assert!(out.is_err());
}

#[tokio::test(start_paused = true)]
async fn row_rate_limited_is_retried() {
    let log = row(
        vec![Reply::openai_rate_limited(Some("1"))],
        3,
        StopReason::AttemptsExhausted,
    )
    .await;
    assert_eq!(class_of(&log), Some(FailureClass::RateLimited));
}

#[tokio::test(start_paused = true)]
async fn row_overloaded_is_retried() {
    let log = row(
        vec![Reply::anthropic_overloaded()],
        3,
        StopReason::AttemptsExhausted,
    )
    .await;
    assert_eq!(class_of(&log), Some(FailureClass::Overloaded));
}

#[tokio::test(start_paused = true)]
async fn row_server_error_is_retried() {
    let log = row(
        vec![Reply::openai_server_error()],
        3,
        StopReason::AttemptsExhausted,
    )
    .await;
    assert_eq!(class_of(&log), Some(FailureClass::ServerError));
}

#[tokio::test(start_paused = true)]
async fn row_quota_exhausted_is_one_attempt() {
    let log = row(
        vec![Reply::openai_insufficient_quota()],
        1,
        StopReason::NotRetryable,
    )
    .await;
    assert_eq!(class_of(&log), Some(FailureClass::QuotaExhausted));
    let log = row(
        vec![Reply::anthropic_spend_limit()],
        1,
        StopReason::NotRetryable,
    )
    .await;
    assert_eq!(class_of(&log), Some(FailureClass::QuotaExhausted));
}

#[tokio::test(start_paused = true)]
async fn row_context_overflow_is_one_attempt() {
    let log = row(
        vec![Reply::openai_context_length()],
        1,
        StopReason::NotRetryable,
    )
    .await;
    assert_eq!(class_of(&log), Some(FailureClass::ContextOverflow));
}

#[tokio::test(start_paused = true)]
async fn row_invalid_request_is_one_attempt() {
    let log = row(
        vec![Reply::json(
            400,
            r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":null}}"#,
        )],
        1,
        StopReason::NotRetryable,
    )
    .await;
    assert_eq!(class_of(&log), Some(FailureClass::InvalidRequest));
}

#[tokio::test(start_paused = true)]
async fn row_auth_is_one_attempt() {
    let log = row(vec![Reply::unauthorized()], 1, StopReason::NotRetryable).await;
    assert_eq!(class_of(&log), Some(FailureClass::Auth));
    let log = row(vec![Reply::forbidden()], 1, StopReason::NotRetryable).await;
    assert_eq!(class_of(&log), Some(FailureClass::Auth));
}

#[tokio::test(start_paused = true)]
async fn row_policy_block_is_one_attempt() {
    let log = row(
        vec![Reply::openai_content_policy()],
        1,
        StopReason::NotRetryable,
    )
    .await;
    assert_eq!(class_of(&log), Some(FailureClass::PolicyBlock));
}

#[tokio::test(start_paused = true)]
async fn row_stream_interrupted_is_never_retried() {
    // Once the head is handed up the layer is done: a stream that breaks later is the
    // caller's (and the stream guard's) to see, never a second request.
    let m = mock([Reply::openai_stream(MODEL, &["Hel", "lo"]).cut_after(2)]).await;
    let mut svc = ServiceBuilder::new()
        .layer(layer(retry_policy()))
        .service(client());
    let out = match svc.ready().await {
        Ok(s) => s.call(chat_request(&m.url(), MODEL, true)).await,
        Err(e) => Err(e),
    };
    let log = log_of(&out);
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(last_decision(&log), Some(Decision::Accept));
    assert!(
        r.into_body().collect_bytes().await.is_err(),
        "the cut shows"
    );
    assert_eq!(m.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn from_policy_builds_the_batch_preset() {
    let mut policy = Policy::batch();
    policy.retry.seed = Some(3);
    let l = RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let m = mock([
        Reply::openai_server_error(),
        Reply::openai_chat(MODEL, "hi"),
    ])
    .await;
    let out = send(&l, &m).await;
    assert_eq!(out.map(|r| r.status()).ok(), Some(StatusCode::OK));
    // The batch preset sets a key header.
    assert!(m.requests()[0].headers.contains_key("idempotency-key"));
}
