//! Unit tests over in-process services, under paused time with seeded jitter.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::RetryLayer;
use crate::attempt_log::{Decision, LocalEventKind, Outcome, StopReason, WaitSource};
use crate::classify::{Classification, FailureClass, HintSource, WaitHint};
use crate::context::{Deadline, FallbackAvailable};
use crate::policy::{
    ClassAction, ClassActions, FallbackRule, IdempotencyPolicy, Policy, ReplayRule, RetryPolicy,
    RetryRule,
};
use crate::retry_budget::RetryBudget;
use crate::test_support::{last_decision, log_of};
use crate::{AttemptLog, BoxError, Error, ErrorKind};

// ---------------------------------------------------------------------------------------------
// A scripted provider.

#[derive(Clone, Debug)]
enum Step {
    /// A response with this status, classified by the layer's classifier.
    Status(u16),
    /// A response with this status and headers.
    WithHeaders(u16, Vec<(&'static str, &'static str)>),
    /// A response already classified (as a layer nearer the transport would have done).
    Classified(u16, Classification),
    /// A transport error of this class.
    Fail(FailureClass),
    /// A response with this status whose body sends a chunk and then nothing, ever.
    Stalled(u16),
    /// A response whose body is `chunks`, then pending forever when `stall` is set.
    Tracked {
        c: Classification,
        chunks: usize,
        stall: bool,
    },
}

#[derive(Debug)]
struct Call {
    at: Instant,
    headers: HeaderMap,
    ready_polls: usize,
}

#[derive(Clone, Default)]
struct Provider {
    script: Arc<Mutex<VecDeque<Step>>>,
    last: Arc<Mutex<Option<Step>>>,
    calls: Arc<Mutex<Vec<Call>>>,
    ready_polls: Arc<AtomicUsize>,
    body_read: Arc<AtomicUsize>,
}

impl Provider {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        let p = Self::default();
        *p.script.lock().unwrap_or_else(|e| e.into_inner()) = steps.into_iter().collect();
        p
    }

    fn calls(&self) -> Vec<(Instant, HeaderMap, usize)> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|c| (c.at, c.headers.clone(), c.ready_polls))
            .collect()
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn next_step(&self) -> Step {
        let mut script = self.script.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match script.pop_front() {
            Some(s) => {
                *last = Some(s.clone());
                s
            }
            None => last.clone().unwrap_or(Step::Status(200)),
        }
    }
}

fn body_of(status: u16) -> Bytes {
    Bytes::from(format!("{{\"status\":{status},\"body\":\"exactly this\"}}"))
}

fn respond(status: u16, body: TestBody) -> Response<TestBody> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
    r.headers_mut()
        .insert("x-request-id", http::HeaderValue::from_static("req-1"));
    r
}

impl<B> Service<Request<B>> for Provider {
    type Response = Response<TestBody>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<TestBody>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.ready_polls.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call {
                at: Instant::now(),
                headers: req.headers().clone(),
                ready_polls: self.ready_polls.load(Ordering::SeqCst),
            });
        let full = |s| TestBody::full(body_of(s));
        std::future::ready(match self.next_step() {
            Step::Status(s) => Ok(respond(s, full(s))),
            Step::WithHeaders(s, headers) => {
                let mut r = respond(s, full(s));
                for (k, v) in headers {
                    r.headers_mut().insert(k, http::HeaderValue::from_static(v));
                }
                Ok(r)
            }
            Step::Classified(s, c) => {
                let mut r = respond(s, full(s));
                r.extensions_mut().insert(c);
                Ok(r)
            }
            Step::Fail(class) => Err(Box::new(Error::transport(
                class,
                std::io::Error::other("simulated"),
            ))),
            Step::Stalled(status) => {
                let body = TestBody::Tracked {
                    left: 1,
                    stall: true,
                    read: self.body_read.clone(),
                };
                Ok(respond(status, body))
            }
            Step::Tracked { c, chunks, stall } => {
                let status = c.status.map_or(503, |s| s.as_u16());
                let mut r = respond(
                    status,
                    TestBody::Tracked {
                        left: chunks,
                        stall,
                        read: self.body_read.clone(),
                    },
                );
                r.extensions_mut().insert(c);
                Ok(r)
            }
        })
    }
}

/// A response body: in memory, or chunks counted as they are read (then maybe stalled).
enum TestBody {
    Full(Full<Bytes>),
    Tracked {
        left: usize,
        stall: bool,
        read: Arc<AtomicUsize>,
    },
}

impl TestBody {
    fn full(b: Bytes) -> Self {
        Self::Full(Full::new(b))
    }
}

impl http_body::Body for TestBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            TestBody::Full(f) => Pin::new(f).poll_frame(cx),
            TestBody::Tracked { left, stall, read } => {
                if *left == 0 {
                    return if *stall {
                        Poll::Pending
                    } else {
                        Poll::Ready(None)
                    };
                }
                *left -= 1;
                read.fetch_add(1, Ordering::SeqCst);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"chunk")))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            TestBody::Full(f) => f.is_end_stream(),
            TestBody::Tracked { left, stall, .. } => *left == 0 && !*stall,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        seed: Some(42),
        ..RetryPolicy::default()
    }
}

fn layer(p: RetryPolicy) -> RetryLayer {
    RetryLayer::new(p).unwrap_or_else(|e| panic!("{e}"))
}

fn post(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("http://api.test/v1/chat/completions")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_else(|e| panic!("{e}"))
}

type Out = Result<Response<crate::Body>, Error>;

async fn send<B>(l: &RetryLayer, p: &Provider, req: Request<B>) -> Out
where
    B: crate::replay::ReplayBody + Send + 'static,
{
    let mut svc = tower::Layer::layer(l, p.clone());
    ServiceExt::<Request<B>>::ready(&mut svc)
        .await?
        .call(req)
        .await
}

fn decisions(log: &AttemptLog) -> Vec<Decision> {
    log.attempts()
        .into_iter()
        .flat_map(|a| a.decisions)
        .collect()
}

fn rate_limited(wait: Duration) -> Classification {
    let mut c = Classification::failure(FailureClass::RateLimited);
    c.status = Some(StatusCode::TOO_MANY_REQUESTS);
    c.wait_hint = Some(WaitHint {
        wait,
        source: HintSource::RetryAfterSeconds,
    });
    c
}

fn classified(status: u16, class: FailureClass) -> Classification {
    let mut c = Classification::failure(class);
    c.status = StatusCode::from_u16(status).ok();
    c
}

async fn body_bytes(r: Response<crate::Body>) -> Bytes {
    r.into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// Construction.

#[test]
fn invalid_policy_is_a_policy_error_not_a_panic() {
    let p = RetryPolicy {
        max_attempts: 0,
        ..RetryPolicy::default()
    };
    let e = RetryLayer::new(p).err();
    assert_eq!(
        e.map(|e| e.field().to_owned()).as_deref(),
        Some("retry.max_attempts")
    );

    let p = RetryPolicy {
        attempt_header: Some("bad header".into()),
        ..RetryPolicy::default()
    };
    let e = RetryLayer::new(p).err();
    assert_eq!(
        e.map(|e| e.field().to_owned()).as_deref(),
        Some("retry.attempt_header")
    );

    let mut policy = Policy::batch();
    policy.idempotency.key_header = Some("no\nnewlines".into());
    let e = RetryLayer::from_policy(&policy).err();
    assert_eq!(
        e.map(|e| e.field().to_owned()).as_deref(),
        Some("idempotency.key_header")
    );

    let e = layer(retry_policy())
        .idempotency(IdempotencyPolicy {
            key_header: Some(String::new()),
            ..IdempotencyPolicy::default()
        })
        .err();
    assert_eq!(
        e.map(|e| e.field().to_owned()).as_deref(),
        Some("idempotency.key_header")
    );
}

// ---------------------------------------------------------------------------------------------
// Success and the returned response.

#[tokio::test(start_paused = true)]
async fn success_is_one_attempt_returned_intact_with_the_log() {
    let mut c = Classification::success(StatusCode::OK);
    c.request_id = Some("req-1".into());
    let p = Provider::new([Step::Classified(200, c)]);
    let out = send(&layer(retry_policy()), &p, post("{}")).await;
    let log = log_of(&out);
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-1");
    assert_eq!(body_bytes(r).await, body_of(200));
    assert_eq!(p.count(), 1);
    assert_eq!(decisions(&log), [Decision::Accept]);
    let snap = log.snapshot();
    assert_eq!(snap.outcome, Some(Outcome::Success { status: 200 }));
    assert_eq!(snap.attempts[0].request_id.as_deref(), Some("req-1"));
    assert_eq!(
        snap.selected_route.map(|r| r.to_string()).as_deref(),
        Some("api.test")
    );
}

#[tokio::test(start_paused = true)]
async fn server_error_then_success_waits_the_logged_backoff_exactly() {
    let p = Provider::new([Step::Status(500), Step::Status(200)]);
    let out = send(&layer(retry_policy()), &p, post("{}")).await;
    let log = log_of(&out);
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 200);
    assert_eq!(body_bytes(r).await, body_of(200));
    let calls = p.calls();
    assert_eq!(calls.len(), 2);
    let attempts = log.attempts();
    let (wait, source) = attempts[0].wait().unwrap_or_else(|| panic!("no wait"));
    assert_eq!(source, WaitSource::Backoff);
    // Full jitter on the default curve: below the base of 500 ms for the first retry.
    assert!(wait < Duration::from_millis(500), "{wait:?}");
    assert_eq!(calls[1].0 - calls[0].0, wait);
    assert_eq!(attempts[0].class, Some(FailureClass::ServerError));
    assert_eq!(attempts[1].route_attempt, 1);
    assert_eq!(attempts[1].offset, wait);
    assert_eq!(last_decision(&log), Some(Decision::Accept));
}

#[tokio::test(start_paused = true)]
async fn persistent_overload_stops_at_max_attempts_and_returns_the_last_response() {
    let p = Provider::new([Step::Status(503)]);
    let out = send(&layer(retry_policy()), &p, post("{}")).await;
    let log = log_of(&out);
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 503);
    assert_eq!(body_bytes(r).await, body_of(503));
    assert_eq!(p.count(), 3);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a.status == Some(503)));
    assert!(attempts[..2].iter().all(|a| a.wait().is_some()));
    assert_eq!(
        last_decision(&log),
        Some(Decision::Stop(StopReason::AttemptsExhausted))
    );
    assert_eq!(
        log.snapshot().outcome,
        Some(Outcome::ProviderFailure {
            status: 503,
            class: Some(FailureClass::Overloaded)
        })
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_curve_is_per_class_and_seeded() {
    // No jitter, so the waits are the curve itself: 100 ms, 200 ms for overload.
    let mut p = retry_policy();
    p.max_attempts = 4;
    p.backoff =
        crate::policy::BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(1))
            .jitter(crate::policy::Jitter::None);
    p.per_class.insert(
        FailureClass::ServerError,
        crate::policy::BackoffPolicy::new(Duration::from_secs(2), Duration::from_secs(3))
            .jitter(crate::policy::Jitter::None),
    );
    let prov = Provider::new([
        Step::Status(503),
        Step::Status(503),
        Step::Status(500),
        Step::Status(200),
    ]);
    let out = send(&layer(p), &prov, post("{}")).await;
    let waits: Vec<Duration> = log_of(&out)
        .attempts()
        .iter()
        .filter_map(|a| a.wait().map(|w| w.0))
        .collect();
    assert_eq!(
        waits,
        [
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_secs(3)
        ]
    );
    let calls = prov.calls();
    assert_eq!(calls[3].0 - calls[0].0, Duration::from_millis(3300));

    // The same seed gives the same jittered waits.
    let run = || async {
        let prov = Provider::new([Step::Status(503)]);
        let out = send(&layer(retry_policy()), &prov, post("{}")).await;
        log_of(&out)
            .attempts()
            .iter()
            .filter_map(|a| a.wait().map(|w| w.0))
            .collect::<Vec<_>>()
    };
    let a = run().await;
    assert_eq!(a.len(), 2);
    assert_eq!(a, run().await);
}

// ---------------------------------------------------------------------------------------------
// The table's rows.

#[tokio::test(start_paused = true)]
async fn every_row_of_the_table_gets_its_number_of_attempts() {
    use FailureClass as F;
    // (class, status, attempts with max_attempts = 3; a possibly-accepted POST without a key
    // is not replayed, so Timeout/Transport rows are checked with a GET below)
    let rows = [
        (F::RateLimited, 429, 3),
        (F::Overloaded, 529, 3),
        (F::ServerError, 502, 3),
        (F::Conflict, 409, 3),
        (F::QuotaExhausted, 429, 1),
        (F::ContextOverflow, 400, 1),
        (F::InvalidRequest, 422, 1),
        (F::Auth, 401, 1),
        (F::PolicyBlock, 400, 1),
    ];
    for (class, status, expected) in rows {
        let p = Provider::new([Step::Classified(status, classified(status, class))]);
        let out = send(&layer(retry_policy()), &p, post("{}")).await;
        let log = log_of(&out);
        let r = out.unwrap_or_else(|e| panic!("{class}: {e}"));
        assert_eq!(p.count(), expected, "{class}");
        assert_eq!(r.status().as_u16(), status, "{class}");
        assert_eq!(body_bytes(r).await, body_of(status), "{class}");
        let stop = if expected == 1 {
            StopReason::NotRetryable
        } else {
            StopReason::AttemptsExhausted
        };
        assert_eq!(last_decision(&log), Some(Decision::Stop(stop)), "{class}");
    }

    // Errors: connect is retried to max_attempts; timeout and transport once (idempotent
    // request, no fallback); an interrupted stream never.
    for (class, expected) in [
        (F::Connect, 3),
        (F::Timeout, 2),
        (F::Transport, 2),
        (F::StreamInterrupted, 1),
    ] {
        let p = Provider::new([Step::Fail(class)]);
        let req = Request::get("http://api.test/v1/models")
            .body(Full::new(Bytes::new()))
            .unwrap_or_else(|e| panic!("{e}"));
        let out = send(&layer(retry_policy()), &p, req).await;
        let log = log_of(&out);
        let e = out
            .err()
            .unwrap_or_else(|| panic!("{class}: expected an error"));
        assert_eq!(e.class(), Some(class));
        assert_eq!(p.count(), expected, "{class}");
        assert_eq!(log.attempt_count(), expected, "{class}");
        let stop = match expected {
            1 => StopReason::NotRetryable,
            _ => StopReason::AttemptsExhausted,
        };
        assert_eq!(last_decision(&log), Some(Decision::Stop(stop)), "{class}");
        assert!(matches!(
            log.snapshot().outcome,
            Some(Outcome::Error { class: Some(c), .. }) if c == class
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn timeout_is_not_retried_when_a_fallback_remains() {
    let p = Provider::new([Step::Fail(FailureClass::Timeout)]);
    let mut req = Request::get("http://api.test/v1/models")
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|e| panic!("{e}"));
    req.extensions_mut().insert(FallbackAvailable);
    let out = send(&layer(retry_policy()), &p, req).await;
    assert_eq!(p.count(), 1);
    assert_eq!(
        last_decision(&log_of(&out)),
        Some(Decision::Stop(StopReason::NotRetryable))
    );
}

#[tokio::test(start_paused = true)]
async fn a_fallback_that_may_not_take_the_class_does_not_cost_the_retry() {
    // Timeouts may not switch route in this policy, so the remaining route is no reason to
    // give up the one retry.
    let actions = ClassActions::default().with(
        FailureClass::Timeout,
        ClassAction::new(RetryRule::OnceUnlessFallback, FallbackRule::Never, true),
    );
    let p = Provider::new([Step::Fail(FailureClass::Timeout), Step::Status(200)]);
    let mut req = Request::get("http://api.test/v1/models")
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|e| panic!("{e}"));
    req.extensions_mut().insert(FallbackAvailable);
    let out = send(&layer(retry_policy()).actions(actions), &p, req).await;
    assert_eq!(p.count(), 2);
    assert_eq!(last_decision(&log_of(&out)), Some(Decision::Accept));
}

#[tokio::test(start_paused = true)]
async fn policy_actions_override_the_table() {
    let actions = ClassActions::default().with(
        FailureClass::Auth,
        ClassAction::new(RetryRule::Once, FallbackRule::Never, false),
    );
    let p = Provider::new([Step::Status(401)]);
    let out = send(&layer(retry_policy()).actions(actions), &p, post("{}")).await;
    assert_eq!(p.count(), 2);
    assert_eq!(
        last_decision(&log_of(&out)),
        Some(Decision::Stop(StopReason::AttemptsExhausted))
    );
}

// ---------------------------------------------------------------------------------------------
// Server waits, cap and deadline.

#[tokio::test(start_paused = true)]
async fn server_wait_is_a_floor_with_jitter_on_top() {
    let hint = Duration::from_millis(2000);
    let p = Provider::new([Step::Classified(429, rate_limited(hint)), Step::Status(200)]);
    let out = send(&layer(retry_policy()), &p, post("{}")).await;
    let log = log_of(&out);
    assert_eq!(out.map(|r| r.status().as_u16()).ok(), Some(200));
    let (wait, source) = log.attempts()[0]
        .wait()
        .unwrap_or_else(|| panic!("no wait"));
    assert_eq!(source, WaitSource::Server);
    assert!(wait >= hint && wait <= hint + hint / 5, "{wait:?}");
    let calls = p.calls();
    assert_eq!(calls[1].0 - calls[0].0, wait);
    assert_eq!(log.attempts()[0].retry_after, Some(hint));
}

#[tokio::test(start_paused = true)]
async fn server_wait_above_the_cap_returns_at_once() {
    let mut rp = retry_policy();
    rp.max_server_wait = Duration::from_secs(10);
    let p = Provider::new([Step::Classified(429, rate_limited(Duration::from_secs(11)))]);
    let start = Instant::now();
    let out = send(&layer(rp), &p, post("{}")).await;
    assert_eq!(Instant::now(), start, "returned without sleeping");
    assert_eq!(p.count(), 1);
    let log = log_of(&out);
    assert_eq!(
        last_decision(&log),
        Some(Decision::Stop(StopReason::ServerWaitAboveCap))
    );
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status(), 429);
    assert_eq!(body_bytes(r).await, body_of(429));
}

#[tokio::test(start_paused = true)]
async fn a_wait_past_the_deadline_returns_at_once() {
    // The request's deadline (from BudgetLayer) is tighter than max_elapsed.
    let p = Provider::new([Step::Classified(429, rate_limited(Duration::from_secs(2)))]);
    let mut req = post("{}");
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_secs(1)));
    let start = Instant::now();
    let out = send(&layer(retry_policy()), &p, req).await;
    assert_eq!(Instant::now(), start);
    assert_eq!(p.count(), 1);
    assert_eq!(
        last_decision(&log_of(&out)),
        Some(Decision::Stop(StopReason::DeadlineExceeded))
    );

    // max_elapsed bounds all attempts: two server waits of at least 1.5 s do not fit 2.5 s.
    let mut rp = retry_policy();
    rp.max_attempts = 5;
    rp.max_elapsed = Duration::from_millis(2500);
    let p = Provider::new([Step::Classified(
        429,
        rate_limited(Duration::from_millis(1500)),
    )]);
    let start = Instant::now();
    let out = send(&layer(rp), &p, post("{}")).await;
    let log = log_of(&out);
    assert_eq!(p.count(), 2);
    assert_eq!(
        last_decision(&log),
        Some(Decision::Stop(StopReason::DeadlineExceeded))
    );
    assert!(Instant::now() - start < Duration::from_millis(2500));
}

#[tokio::test(start_paused = true)]
async fn a_request_past_its_deadline_is_not_sent() {
    let p = Provider::new([Step::Status(200)]);
    let mut req = post("{}");
    req.extensions_mut().insert(Deadline::after(Duration::ZERO));
    let out = send(&layer(retry_policy()), &p, req).await;
    assert_eq!(p.count(), 0);
    let log = log_of(&out);
    assert_eq!(
        out.err().map(|e| e.kind().clone()),
        Some(ErrorKind::DeadlineExceeded)
    );
    assert!(log.attempts().is_empty());
    let events: Vec<_> = log.events().into_iter().map(|e| e.kind).collect();
    assert_eq!(events, [LocalEventKind::DeadlineExceeded]);
}

#[tokio::test(start_paused = true)]
async fn an_error_body_cut_off_by_the_deadline_is_recorded_as_its_head_says() {
    let p = Provider::new([Step::Stalled(503)]);
    let mut req = post("{}");
    req.extensions_mut()
        .insert(Deadline::after(Duration::from_secs(1)));
    let start = Instant::now();
    let out = send(&layer(retry_policy()), &p, req).await;
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert_eq!(p.count(), 1);
    let log = log_of(&out);
    assert_eq!(
        out.err().map(|e| e.kind().clone()),
        Some(ErrorKind::DeadlineExceeded)
    );
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 1);
    // The provider answered 503: the attempt is a server error with its request id, not a
    // timeout.
    assert_eq!(attempts[0].status, Some(503));
    assert_eq!(attempts[0].class, Some(FailureClass::Overloaded));
    assert_eq!(attempts[0].request_id.as_deref(), Some("req-1"));
    assert_eq!(
        last_decision(&log),
        Some(Decision::Stop(StopReason::DeadlineExceeded))
    );
}

// ---------------------------------------------------------------------------------------------
// x-should-retry.

#[tokio::test(start_paused = true)]
async fn should_retry_false_stops_a_retryable_class() {
    let p = Provider::new([Step::WithHeaders(503, vec![("x-should-retry", "false")])]);
    let out = send(&layer(retry_policy()), &p, post("{}")).await;
    assert_eq!(p.count(), 1);
    assert_eq!(
        last_decision(&log_of(&out)),
        Some(Decision::Stop(StopReason::ServerSaidNo))
    );
}

#[tokio::test(start_paused = true)]
async fn should_retry_true_retries_a_bad_request() {
    let p = Provider::new([
        Step::WithHeaders(400, vec![("x-should-retry", "true")]),
        Step::Status(200),
    ]);
    let out = send(&layer(retry_policy()), &p, post("{}")).await;
    assert_eq!(p.count(), 2);
    assert_eq!(out.map(|r| r.status().as_u16()).ok(), Some(200));
}

// ---------------------------------------------------------------------------------------------
// Replay and idempotency.

#[tokio::test(start_paused = true)]
async fn a_body_that_cannot_be_replayed_gets_one_attempt() {
    let p = Provider::new([Step::Status(503)]);
    let req = Request::post("http://api.test/v1/chat/completions")
        .body(crate::Body::from("{}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = send(&layer(retry_policy()), &p, req).await;
    assert_eq!(p.count(), 1);
    assert_eq!(
        last_decision(&log_of(&out)),
        Some(Decision::Stop(StopReason::NotReplayable))
    );
    assert_eq!(out.map(|r| r.status().as_u16()).ok(), Some(503));
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_post_without_a_key_is_not_replayed() {
    let p = Provider::new([Step::Fail(FailureClass::Timeout)]);
    let out = send(&layer(retry_policy()), &p, post("{}")).await;
    assert_eq!(p.count(), 1);
    let log = log_of(&out);
    assert_eq!(
        last_decision(&log),
        Some(Decision::Stop(StopReason::NotIdempotent))
    );
    let e = out.err().unwrap_or_else(|| panic!("expected an error"));
    assert_eq!(e.kind(), &ErrorKind::Transport);
    assert_eq!(
        log.attempts()[0].error.as_deref(),
        Some("transport failed (timeout)")
    );
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_post_with_a_key_is_replayed_once() {
    // The caller's own key.
    let p = Provider::new([Step::Fail(FailureClass::Timeout)]);
    let mut req = post("{}");
    req.headers_mut()
        .insert("idempotency-key", http::HeaderValue::from_static("k-1"));
    let out = send(&layer(retry_policy()), &p, req).await;
    assert_eq!(p.count(), 2);
    assert_eq!(
        last_decision(&log_of(&out)),
        Some(Decision::Stop(StopReason::AttemptsExhausted))
    );

    // A key the layer sets.
    let idem = IdempotencyPolicy {
        key_header: Some("x-idempotency-key".into()),
        ..IdempotencyPolicy::default()
    };
    let p = Provider::new([Step::Fail(FailureClass::Transport), Step::Status(200)]);
    let l = layer(retry_policy())
        .idempotency(idem)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = send(&l, &p, post("{}")).await;
    assert_eq!(p.count(), 2);
    assert!(out.is_ok());

    // Never replay, even with a key.
    let idem = IdempotencyPolicy {
        key_header: Some("x-idempotency-key".into()),
        replay_possibly_accepted: ReplayRule::Never,
        cache: None,
    };
    let p = Provider::new([Step::Fail(FailureClass::Timeout)]);
    let l = layer(retry_policy())
        .idempotency(idem)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = send(&l, &p, post("{}")).await;
    assert_eq!(p.count(), 1);
    assert_eq!(
        last_decision(&log_of(&out)),
        Some(Decision::Stop(StopReason::NotIdempotent))
    );
}

#[tokio::test(start_paused = true)]
async fn idempotency_key_is_stable_per_request_and_attempts_are_numbered() {
    let mut rp = retry_policy();
    rp.attempt_header = Some("x-stainless-retry-count".into());
    let l = layer(rp)
        .idempotency(IdempotencyPolicy {
            key_header: Some("idempotency-key".into()),
            ..IdempotencyPolicy::default()
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let p = Provider::new([Step::Status(503)]);
    let _ = send(&l, &p, post("{}")).await;
    let _ = send(&l, &p, post("{}")).await;
    let calls = p.calls();
    assert_eq!(calls.len(), 6);
    let keys: Vec<_> = calls
        .iter()
        .map(|c| c.1["idempotency-key"].clone())
        .collect();
    assert_eq!(keys[0], keys[1]);
    assert_eq!(keys[1], keys[2]);
    assert_eq!(keys[3], keys[4]);
    assert_eq!(keys[4], keys[5]);
    assert_ne!(keys[0], keys[3]);
    let counts: Vec<_> = calls
        .iter()
        .map(|c| {
            c.1["x-stainless-retry-count"]
                .to_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    assert_eq!(counts, ["0", "1", "2", "0", "1", "2"]);

    // A key the caller set is kept.
    let p = Provider::new([Step::Status(503)]);
    let mut req = post("{}");
    req.headers_mut()
        .insert("idempotency-key", http::HeaderValue::from_static("mine"));
    let _ = send(&l, &p, req).await;
    assert!(p.calls().iter().all(|c| c.1["idempotency-key"] == "mine"));
}

// ---------------------------------------------------------------------------------------------
// Retry budget.

#[tokio::test(start_paused = true)]
async fn a_denied_retry_is_logged_as_such() {
    let budget = RetryBudget::new(&crate::policy::RetryBudgetPolicy::TokenBucket {
        capacity: 1,
        refill_per_sec: 0.0,
        per_request: 0.0,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let p = Provider::new([Step::Status(503)]);
    let out = send(&layer(retry_policy()).retry_budget(budget), &p, post("{}")).await;
    let log = log_of(&out);
    assert_eq!(p.count(), 2);
    assert_eq!(
        last_decision(&log),
        Some(Decision::Stop(StopReason::RetryBudgetDenied))
    );
    let events = log.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, LocalEventKind::RetryBudgetDenied);
}

#[tokio::test(start_paused = true)]
async fn a_budget_in_the_extensions_wins_and_is_not_deposited_into() {
    let outer = RetryBudget::new(&crate::policy::RetryBudgetPolicy::Ratio {
        ratio: 0.0,
        min_per_sec: 0,
        ttl: Duration::from_secs(10),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let own = RetryBudget::default();
    let before = own.available();
    let p = Provider::new([Step::Status(503)]);
    let mut req = post("{}");
    req.extensions_mut().insert(outer.clone());
    let out = send(&layer(retry_policy()).retry_budget(own.clone()), &p, req).await;
    assert_eq!(p.count(), 1);
    assert_eq!(
        last_decision(&log_of(&out)),
        Some(Decision::Stop(StopReason::RetryBudgetDenied))
    );
    assert_eq!(outer.available(), 0, "not deposited by the retry layer");
    assert_eq!(own.available(), before, "own budget untouched");
}

#[tokio::test(start_paused = true)]
async fn total_attempts_under_full_outage_stay_within_the_budget() {
    let l = layer(retry_policy());
    let p = Provider::new([Step::Status(503)]);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let (l, p) = (l.clone(), p.clone());
        set.spawn(async move { log_of(&send(&l, &p, post("{}")).await) });
    }
    let mut denied = 0;
    while let Some(log) = set.join_next().await {
        let log = log.unwrap_or_else(|e| panic!("{e}"));
        if last_decision(&log) == Some(Decision::Stop(StopReason::RetryBudgetDenied)) {
            denied += 1;
            assert!(
                log.events()
                    .iter()
                    .any(|e| e.kind == LocalEventKind::RetryBudgetDenied)
            );
        }
    }
    let total = p.count();
    // 20 % of the requests plus the floor of 10/s over 10 s.
    assert!(total <= 1000 + 200 + 100, "{total} attempts");
    assert!(total > 1000, "some retries were allowed");
    assert!(denied > 0);
}

// ---------------------------------------------------------------------------------------------
// The service contract: readiness, drain, logs of outer layers, local rejections.

#[tokio::test(start_paused = true)]
async fn readiness_is_polled_again_before_each_retry() {
    let p = Provider::new([Step::Status(503)]);
    let _ = send(&layer(retry_policy()), &p, post("{}")).await;
    let polls: Vec<usize> = p.calls().iter().map(|c| c.2).collect();
    assert_eq!(polls, [1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_retried_body_is_drained_during_the_wait() {
    let p = Provider::new([
        Step::Tracked {
            c: classified(503, FailureClass::Overloaded),
            chunks: 3,
            stall: false,
        },
        Step::Status(200),
    ]);
    let out = send(&layer(retry_policy()), &p, post("{}")).await;
    assert!(out.is_ok());
    assert_eq!(p.body_read.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_retried_body_does_not_delay_the_next_attempt() {
    let p = Provider::new([
        Step::Tracked {
            c: rate_limited(Duration::from_secs(1)),
            chunks: 1,
            stall: true,
        },
        Step::Status(200),
    ]);
    let out = send(&layer(retry_policy()), &p, post("{}")).await;
    let log = log_of(&out);
    assert!(out.is_ok());
    let calls = p.calls();
    let wait = log.attempts()[0].wait().map(|w| w.0);
    assert_eq!(Some(calls[1].0 - calls[0].0), wait);
}

#[tokio::test(start_paused = true)]
async fn an_outer_log_is_annotated_not_owned() {
    let outer = AttemptLog::new();
    let p = Provider::new([Step::Status(500), Step::Status(200)]);
    let mut req = post("{}");
    req.extensions_mut().insert(outer.clone());
    let out = send(&layer(retry_policy()), &p, req).await;
    let r = out.unwrap_or_else(|e| panic!("{e}"));
    assert!(r.extensions().get::<AttemptLog>().is_none());
    assert_eq!(outer.attempt_count(), 2);
    assert_eq!(outer.snapshot().outcome, None, "the outer layer sets it");
}

#[tokio::test(start_paused = true)]
async fn an_attempt_recorded_nearer_the_transport_is_annotated_once() {
    // A service that records its own attempts (as the breaker or stream guard would).
    let inner = tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let log = crate::context::RequestContext::of(&req).map(|c| c.log().clone());
        let c = classified(503, FailureClass::Overloaded);
        if let Some(log) = log {
            log.record(crate::attempt_log::Attempt::new(
                None,
                Duration::ZERO,
                Duration::ZERO,
                &c,
            ));
        }
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r.extensions_mut().insert(c);
        Ok::<_, std::convert::Infallible>(r)
    });
    let mut svc = tower::Layer::layer(&layer(retry_policy()), inner);
    let out = svc
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .call(post("{}"))
        .await;
    let log = log_of(&out);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a.decisions.len() == 1));
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_inside_stops_at_once_without_an_attempt() {
    let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async move {
        Err::<Response<Full<Bytes>>, _>(Error::new(ErrorKind::CircuitOpen {
            route: "api.test".into(),
            retry_in: Duration::from_secs(5),
        }))
    });
    let mut svc = tower::Layer::layer(&layer(retry_policy()), inner);
    let out = svc
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .call(post("{}"))
        .await;
    let log = log_of(&out);
    assert_eq!(log.attempt_count(), 0);
    assert!(matches!(
        out.err().map(|e| e.kind().clone()),
        Some(ErrorKind::CircuitOpen { .. })
    ));
}

/// A budget holding exactly `n` retries, with no deposits.
fn budget_of(n: u32) -> RetryBudget {
    RetryBudget::new(&crate::policy::RetryBudgetPolicy::TokenBucket {
        capacity: n,
        refill_per_sec: 0.0,
        per_request: 0.0,
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(start_paused = true)]
async fn a_retry_an_open_circuit_refuses_gives_its_budget_back() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    // The first attempt gets a 503; the retry finds the circuit open and makes no call.
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok(respond(503, TestBody::full(body_of(503))))
            } else {
                Err(Error::new(ErrorKind::CircuitOpen {
                    route: "api.test".into(),
                    retry_in: Duration::from_secs(5),
                }))
            }
        }
    });
    let budget = budget_of(1);
    let mut svc = tower::Layer::layer(&layer(retry_policy()).retry_budget(budget.clone()), inner);
    let out = svc
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .call(post("{}"))
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(matches!(
        out.as_ref().err().map(|e| e.kind().clone()),
        Some(ErrorKind::CircuitOpen { .. })
    ));
    assert_eq!(log_of(&out).attempt_count(), 1);
    assert_eq!(budget.available(), 1, "the refused retry cost nothing");
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_during_its_backoff_gives_the_retry_back() {
    let budget = budget_of(1);
    let p = Provider::new([Step::Status(503)]);
    let mut svc = tower::Layer::layer(
        &layer(retry_policy()).retry_budget(budget.clone()),
        p.clone(),
    );
    let call = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .call(post("{}"));
    // One poll: the 503 is in, the retry is granted and the future sleeps.
    let mut call = Box::pin(call);
    let waker = std::task::Waker::noop();
    assert!(
        call.as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending()
    );
    assert_eq!((p.count(), budget.available()), (1, 0));
    drop(call);
    assert_eq!(budget.available(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_during_its_retry_keeps_the_retry_spent() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    // A 503, then a retry the provider never answers.
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok(respond(503, TestBody::full(body_of(503))))
            } else {
                std::future::pending::<Result<_, Error>>().await
            }
        }
    });
    let budget = budget_of(1);
    let mut svc = tower::Layer::layer(&layer(retry_policy()).retry_budget(budget.clone()), inner);
    let call = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .call(post("{}"));
    let mut call = Box::pin(call);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    assert!(call.as_mut().poll(&mut cx).is_pending());
    assert_eq!((calls.load(Ordering::SeqCst), budget.available()), (1, 0));
    // Past the backoff: the retry is sent and hangs.
    while calls.load(Ordering::SeqCst) < 2 {
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(call.as_mut().poll(&mut cx).is_pending());
    }
    // The caller gives up: the provider has the retry, so the budget does not get it back.
    drop(call);
    assert_eq!(budget.available(), 0);
}

#[tokio::test(start_paused = true)]
async fn from_policy_uses_the_whole_policy() {
    let mut policy = Policy::batch();
    policy.retry.max_attempts = 2;
    policy.retry.seed = Some(1);
    policy.logging.request_ids = false;
    let l = RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let mut ok = Classification::success(StatusCode::OK);
    ok.request_id = Some("req-1".into());
    let p = Provider::new([Step::Fail(FailureClass::Timeout), Step::Classified(200, ok)]);
    let out = send(&l, &p, post("{}")).await;
    let log = log_of(&out);
    // The batch preset sets an idempotency key, so the timed-out POST is replayed.
    assert_eq!(p.count(), 2);
    assert!(p.calls()[0].1.contains_key("idempotency-key"));
    assert_eq!(log.attempts()[1].request_id, None, "request ids off");
}

#[tokio::test(start_paused = true)]
async fn a_retry_the_throttle_turns_away_is_no_attempt_and_gives_its_budget_back() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    // The first attempt gets a 503; the throttle inside turns the retry away without a call.
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok(respond(503, TestBody::full(body_of(503))))
            } else {
                Err(Error::new(ErrorKind::Throttled {
                    route: "api.test".into(),
                    retry_in: Duration::from_millis(40),
                }))
            }
        }
    });
    let budget = budget_of(1);
    let mut svc = tower::Layer::layer(&layer(retry_policy()).retry_budget(budget.clone()), inner);
    let out = svc
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .call(post("{}"))
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        out.as_ref().err().map(|e| e.kind().clone()),
        Some(ErrorKind::Throttled {
            route: "api.test".into(),
            retry_in: Duration::from_millis(40),
        })
    );
    // One attempt (the 503); the turned-away retry is none, and cost no budget.
    assert_eq!(log_of(&out).attempt_count(), 1);
    assert_eq!(budget.available(), 1);
}

/// A breaker inside that trips on the first 503 (no throttle, so a request without a backup
/// fails fast too), over a provider that answers 503 after 50 ms.
fn tripping_stack(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Full<Bytes>>, Response = Response<crate::Body>, Error = Error> {
    let breaker = crate::policy::CircuitBreakerPolicy {
        failure_rate: None,
        consecutive_failures: Some(1),
        throttle: None,
        open_base: Duration::from_secs(5),
        open_cap: Duration::from_secs(5),
        ..crate::policy::CircuitBreakerPolicy::default()
    };
    let breaker = crate::circuit_breaker::CircuitBreakerLayer::new(breaker)
        .unwrap_or_else(|e| panic!("{e}"))
        .without_jitter();
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, std::convert::Infallible>(respond(503, TestBody::full(body_of(503))))
        }
    });
    tower::ServiceBuilder::new()
        .layer(layer(retry_policy()))
        .layer(breaker)
        .service(inner)
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_opens_the_circuit_hands_a_backed_request_over_at_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = tripping_stack(calls.clone());
    let mut req = post("{}");
    req.extensions_mut().insert(FallbackAvailable);
    let start = Instant::now();
    let out = svc
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .call(req)
        .await;
    // The provider's 503 goes up the moment it arrives: no backoff, no second call.
    assert_eq!(out.as_ref().map(|r| r.status().as_u16()).ok(), Some(503));
    assert_eq!(start.elapsed(), Duration::from_millis(50));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let attempts = log_of(&out).attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].decisions,
        [Decision::Stop(StopReason::CircuitOpen)]
    );

    // Without a backup the retry waits its backoff and is then refused by the open circuit.
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = tripping_stack(calls.clone());
    let out = svc
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .call(post("{}"))
        .await;
    assert!(matches!(
        out.as_ref().err().map(|e| e.kind().clone()),
        Some(ErrorKind::CircuitOpen { .. })
    ));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(matches!(
        log_of(&out).attempts()[0].decisions[..],
        [Decision::Retry { .. }]
    ));
}
