//! Layer tests over scripted in-process services, under paused time.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service, ServiceExt};

use super::StreamGuardLayer;
use crate::Body;
use crate::RouteName;
use crate::StreamCause;
use crate::attempt_log::{AttemptLog, Outcome, StreamEnd, Usage};
use crate::classify::FailureClass;
use crate::error::{Error, ErrorKind};
use crate::policy::{CommitPoint, Policy, RouteConfig, StreamPolicy, StreamSettings};

const SEC: Duration = Duration::from_secs(1);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Clone, Debug)]
enum Part {
    Data(Bytes),
    Wait(Duration),
    Fail,
    Stall,
}

fn data(s: impl Into<String>) -> Part {
    Part::Data(Bytes::from(s.into()))
}

/// A response body that plays a script on the tokio clock.
struct ScriptBody {
    parts: VecDeque<Part>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl http_body::Body for ScriptBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            match self.parts.pop_front() {
                None => return Poll::Ready(None),
                Some(Part::Data(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                Some(Part::Wait(d)) => self.sleep = Some(Box::pin(tokio::time::sleep(d))),
                Some(Part::Fail) => {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "connection reset",
                    ))));
                }
                Some(Part::Stall) => {
                    self.parts.push_front(Part::Stall);
                    return Poll::Pending;
                }
            }
        }
    }
}

#[derive(Clone)]
struct Script {
    head_delay: Duration,
    status: StatusCode,
    content_type: &'static str,
    parts: Vec<Part>,
}

fn sse(parts: Vec<Part>) -> Script {
    Script {
        head_delay: Duration::ZERO,
        status: StatusCode::OK,
        content_type: "text/event-stream; charset=utf-8",
        parts,
    }
}

type Provider = tower::util::BoxCloneService<Request<()>, Response<ScriptBody>, io::Error>;

fn provider(script: Script) -> Provider {
    tower::util::BoxCloneService::new(tower::service_fn(move |_req: Request<()>| {
        let s = script.clone();
        async move {
            tokio::time::sleep(s.head_delay).await;
            let mut resp = Response::new(ScriptBody {
                parts: s.parts.into(),
                sleep: None,
            });
            *resp.status_mut() = s.status;
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(s.content_type),
            );
            Ok(resp)
        }
    }))
}

fn settings(commit: CommitPoint) -> StreamSettings {
    StreamSettings {
        first_token_timeout: Some(secs(5)),
        idle_timeout: Some(secs(3)),
        total_timeout: Some(secs(60)),
        commit,
        max_buffer: 1 << 20,
    }
}

fn guard(
    commit: CommitPoint,
    script: Script,
) -> impl Service<Request<()>, Response = Response<Body>, Error = Error, Future: Send> + Clone {
    guard_with(StreamPolicy::from_settings(settings(commit)), script)
}

fn guard_with(
    policy: StreamPolicy,
    script: Script,
) -> impl Service<Request<()>, Response = Response<Body>, Error = Error, Future: Send> + Clone {
    tower::ServiceBuilder::new()
        .layer(StreamGuardLayer::new(policy).expect("valid policy"))
        .service(provider(script))
}

/// A request with its own attempt log, as a layer above would have set.
fn request() -> (Request<()>, AttemptLog) {
    let mut req = Request::new(());
    let (log, _) = AttemptLog::get_or_insert(&mut req);
    (req, log)
}

/// Reads a body to its end: the bytes, the error it ended with, and when each frame came.
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

fn role() -> String {
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n".into()
}

fn content(t: &str) -> String {
    format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]}}\n\n"
    )
}

fn finish(reason: &str) -> String {
    format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"{reason}\"}}]}}\n\n"
    )
}

fn usage(p: u64, c: u64) -> String {
    format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}\n\n",
        p + c
    )
}

const DONE: &str = "data: [DONE]\n\n";

fn overloaded_event() -> String {
    "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n".into()
}

fn cause_of(e: &Error) -> Option<&StreamCause> {
    match e.kind() {
        ErrorKind::StreamFailed { cause } | ErrorKind::StreamInterrupted { cause, .. } => {
            Some(cause)
        }
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn first_event_commits_at_the_first_content_event() {
    let script = sse(vec![
        data(role()),
        Part::Wait(SEC),
        data(content("Hel")),
        Part::Wait(SEC),
        data(content("lo")),
        data(finish("stop")),
        data(usage(9, 2)),
        data(DONE),
    ]);
    let (req, log) = request();
    let t0 = Instant::now();
    let mut resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect("committed");
    // The role-only delta is not the first token.
    assert_eq!(t0.elapsed(), SEC);
    let (text, err) = read(resp.body_mut()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(t0.elapsed(), secs(2));
    assert!(text.starts_with(&role()) && text.ends_with(DONE));
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, Some(200));
    assert_eq!(attempts[0].class, None);
    let s = attempts[0].stream.clone().expect("stream recorded");
    assert_eq!(s.end, StreamEnd::Complete);
    assert_eq!(s.time_to_first_token, Some(SEC));
    assert_eq!(s.duration, secs(2));
    assert_eq!(s.bytes, text.len() as u64);
    assert_eq!(s.events, 6);
    assert_eq!(s.usage, Some(Usage::new(9, 2)));
    assert_eq!(s.malformed_events, 0);
}

#[tokio::test(start_paused = true)]
async fn stall_before_the_first_token_fails_retryably_at_the_deadline() {
    let script = sse(vec![
        data(role()),
        Part::Wait(SEC),
        data(": keep-alive\n\n"),
        Part::Stall,
    ]);
    let (req, log) = request();
    let t0 = Instant::now();
    // Idle is longer than first-token here, so the first-token timer decides.
    let mut s = settings(CommitPoint::FirstEvent);
    s.idle_timeout = Some(secs(10));
    let err = guard_with(StreamPolicy::from_settings(s), script)
        .oneshot(req)
        .await
        .expect_err("no first token");
    assert_eq!(t0.elapsed(), secs(5));
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::FirstTokenTimeout(secs(5))
        }
    );
    assert_eq!(err.class(), Some(FailureClass::Timeout));
    assert!(err.attempt_log().is_some_and(|l| l.ptr_eq(&log)));
    let a = &log.attempts()[0];
    assert_eq!(a.class, Some(FailureClass::Timeout));
    assert_eq!(a.status, Some(200));
    let rec = a.stream.clone().expect("stream recorded");
    assert_eq!(
        rec.end,
        StreamEnd::FailedBeforeCommit(StreamCause::FirstTokenTimeout(secs(5)))
    );
    assert_eq!(
        (rec.bytes, rec.events, rec.time_to_first_token),
        (0, 1, None)
    );
}

#[tokio::test(start_paused = true)]
async fn pings_and_comments_keep_the_idle_timer_alive_but_are_not_a_first_token() {
    let ping = "event: ping\ndata: {\"type\": \"ping\"}\n\n";
    let mut parts = Vec::new();
    for _ in 0..10 {
        parts.push(Part::Wait(SEC * 2));
        parts.push(data(ping));
        parts.push(Part::Wait(SEC * 2));
        parts.push(data(": OPENROUTER PROCESSING\n\n"));
    }
    let mut s = settings(CommitPoint::FirstEvent);
    s.first_token_timeout = Some(secs(30));
    let t0 = Instant::now();
    let err = guard_with(StreamPolicy::from_settings(s), sse(parts))
        .oneshot(request().0)
        .await
        .expect_err("never a first token");
    // Idle (3 s) never fired: life came every 2 s; the first-token timer did, at 30 s.
    assert_eq!(t0.elapsed(), secs(30));
    assert_eq!(
        cause_of(&err),
        Some(&StreamCause::FirstTokenTimeout(secs(30)))
    );
}

#[tokio::test(start_paused = true)]
async fn no_response_head_in_time_is_a_first_token_timeout() {
    let mut script = sse(vec![data(content("late"))]);
    script.head_delay = secs(100);
    let (req, log) = request();
    let t0 = Instant::now();
    let err = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect_err("no head");
    assert_eq!(t0.elapsed(), secs(5));
    assert_eq!(
        cause_of(&err),
        Some(&StreamCause::FirstTokenTimeout(secs(5)))
    );
    let a = &log.attempts()[0];
    assert_eq!((a.status, a.class), (None, Some(FailureClass::Timeout)));
    assert_eq!(a.latency, secs(5));
}

#[tokio::test(start_paused = true)]
async fn stall_after_commit_interrupts_with_the_delivered_byte_count() {
    let first = content("Hel");
    let second = content("lo");
    let script = sse(vec![
        data(role()),
        data(first.clone()),
        Part::Wait(SEC),
        data(second.clone()),
        Part::Stall,
    ]);
    let (req, log) = request();
    let t0 = Instant::now();
    let mut resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect("committed");
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let (text, err) = read(resp.body_mut()).await;
    let err = err.expect("interrupted");
    // Last byte at 1 s, idle timeout 3 s.
    assert_eq!(t0.elapsed(), secs(4));
    let delivered = (role().len() + first.len() + second.len()) as u64;
    assert_eq!(text.len() as u64, delivered);
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamInterrupted {
            delivered_bytes: delivered,
            cause: StreamCause::IdleTimeout(secs(3))
        }
    );
    assert_eq!(err.class(), Some(FailureClass::StreamInterrupted));
    // The body ends after its error.
    assert!(resp.body_mut().frame().await.is_none());
    let rec = log.attempts()[0].stream.clone().expect("recorded");
    assert_eq!(
        rec.end,
        StreamEnd::Interrupted(StreamCause::IdleTimeout(secs(3)))
    );
    assert_eq!(rec.bytes, delivered);
}

#[tokio::test(start_paused = true)]
async fn cut_after_commit_interrupts_and_keeps_its_source() {
    let script = sse(vec![
        data(role()),
        data(content("Hi")),
        Part::Wait(SEC),
        Part::Fail,
    ]);
    let mut resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(request().0)
        .await
        .expect("committed");
    let (text, err) = read(resp.body_mut()).await;
    let err = err.expect("interrupted");
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamInterrupted {
            delivered_bytes: text.len() as u64,
            cause: StreamCause::Disconnected
        }
    );
    let chain = std::iter::successors(std::error::Error::source(&err), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>();
    assert!(
        chain.iter().any(|m| m.contains("connection reset")),
        "{chain:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_error_survives_rewrapping_as_a_crate_body() {
    // Layers above (the circuit breaker) wrap the body again; the error stays the crate error.
    let script = sse(vec![data(content("Hi")), Part::Fail]);
    let resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(request().0)
        .await
        .expect("committed");
    let mut body = Body::new(Body::new(http_body_util::BodyExt::map_err(
        resp.into_body(),
        crate::BoxError::from,
    )));
    let (_, err) = read(&mut body).await;
    assert!(matches!(
        err.map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted {
            cause: StreamCause::Disconnected,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_finish_reason_without_done_is_complete() {
    let script = sse(vec![data(content("Hi")), data(finish("stop"))]);
    let (req, log) = request();
    let mut resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect("ok");
    let (_, err) = read(resp.body_mut()).await;
    assert!(err.is_none());
    assert_eq!(
        log.attempts()[0].stream.as_ref().map(|s| s.end.clone()),
        Some(StreamEnd::Complete)
    );
}

#[tokio::test(start_paused = true)]
async fn neither_marker_nor_finish_is_truncated() {
    let script = sse(vec![data(content("Hi")), data(content(" there"))]);
    let mut resp = guard(CommitPoint::FirstEvent, script.clone())
        .oneshot(request().0)
        .await
        .expect("committed");
    let (text, err) = read(resp.body_mut()).await;
    assert_eq!(
        err.map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted {
            delivered_bytes: text.len() as u64,
            cause: StreamCause::Truncated
        })
    );
    // With commit `end` the same stream never reaches the caller: a retryable failure.
    let err = guard(CommitPoint::End, script)
        .oneshot(request().0)
        .await
        .expect_err("truncated");
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::Truncated
        }
    );
    assert_eq!(err.class(), Some(FailureClass::Transport));
}

#[tokio::test(start_paused = true)]
async fn in_band_overload_before_commit_is_a_retryable_overload() {
    let script = sse(vec![
        data(role()),
        Part::Wait(SEC),
        data(overloaded_event()),
    ]);
    let (req, log) = request();
    let err = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect_err("failed");
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::InBandError {
                class: FailureClass::Overloaded,
                error_type: Some("overloaded_error".into())
            }
        }
    );
    assert_eq!(err.class(), Some(FailureClass::Overloaded));
    assert_eq!(
        err.classification().and_then(|c| c.error_type.as_deref()),
        Some("overloaded_error")
    );
    let a = &log.attempts()[0];
    assert_eq!(
        (a.status, a.class),
        (Some(200), Some(FailureClass::Overloaded))
    );
}

#[tokio::test(start_paused = true)]
async fn in_band_error_after_commit_interrupts_after_its_chunk() {
    let err_event = overloaded_event();
    let script = sse(vec![
        data(content("Hi")),
        Part::Wait(SEC),
        data(err_event.clone()),
        data(content("never")),
    ]);
    let mut resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(request().0)
        .await
        .expect("committed");
    let (text, err) = read(resp.body_mut()).await;
    assert!(text.ends_with(&err_event) && !text.contains("never"));
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
}

#[tokio::test(start_paused = true)]
async fn commit_end_holds_everything_until_the_stream_ended_correctly() {
    let script = sse(vec![
        data(role()),
        data(content("Hel")),
        Part::Wait(secs(2)),
        data(content("lo")),
        Part::Wait(secs(2)),
        data(finish("stop")),
        data(DONE),
    ]);
    let t0 = Instant::now();
    let mut resp = guard(CommitPoint::End, script)
        .oneshot(request().0)
        .await
        .expect("ok");
    assert_eq!(t0.elapsed(), secs(4));
    let (text, err) = read(resp.body_mut()).await;
    assert!(err.is_none());
    assert_eq!(t0.elapsed(), secs(4));
    assert!(text.starts_with(&role()) && text.ends_with(DONE));

    // A cut anywhere is retryable: the caller saw nothing.
    let script = sse(vec![data(content("Hel")), Part::Wait(secs(2)), Part::Fail]);
    let err = guard(CommitPoint::End, script)
        .oneshot(request().0)
        .await
        .expect_err("cut");
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::Disconnected
        }
    );
}

#[tokio::test(start_paused = true)]
async fn commit_after_bytes_and_after_duration() {
    let parts = vec![
        data(role()),
        data(content("a")),
        Part::Wait(SEC),
        data(content("b")),
        Part::Wait(SEC),
        data(content("c")),
        Part::Wait(SEC),
        data(finish("stop")),
    ];
    let two = (role().len() + content("a").len() + content("b").len()) as u64;
    let t0 = Instant::now();
    let mut resp = guard(CommitPoint::AfterBytes { bytes: two }, sse(parts.clone()))
        .oneshot(request().0)
        .await
        .expect("ok");
    assert_eq!(t0.elapsed(), SEC);
    assert!(read(resp.body_mut()).await.1.is_none());

    // Held back for 1.5 s after the first token: committed on the next chunk after that.
    let t0 = Instant::now();
    let mut resp = guard(
        CommitPoint::AfterDuration {
            duration: Duration::from_millis(1500),
        },
        sse(parts.clone()),
    )
    .oneshot(request().0)
    .await
    .expect("ok");
    assert_eq!(t0.elapsed(), Duration::from_millis(1500));
    let (text, err) = read(resp.body_mut()).await;
    assert!(err.is_none());
    assert!(text.starts_with(&role()) && text.ends_with(&finish("stop")));

    // A failure inside the held-back prefix is still retryable.
    let cut = vec![data(content("a")), Part::Wait(SEC), Part::Fail];
    let err = guard(CommitPoint::AfterDuration { duration: secs(2) }, sse(cut))
        .oneshot(request().0)
        .await
        .expect_err("cut inside the prefix");
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::Disconnected
        }
    );
}

#[tokio::test(start_paused = true)]
async fn holding_back_more_than_max_buffer_fails() {
    let mut s = settings(CommitPoint::End);
    s.max_buffer = 100;
    let script = sse(vec![
        data(content(&"x".repeat(60))),
        data(content(&"y".repeat(60))),
    ]);
    let err = guard_with(StreamPolicy::from_settings(s), script)
        .oneshot(request().0)
        .await
        .expect_err("too big");
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::BufferExceeded(100)
        }
    );
    // Never retried, never switched, never counted against the route's health.
    assert_eq!(err.class(), Some(FailureClass::InvalidRequest));
}

#[tokio::test(start_paused = true)]
async fn total_timeout_after_commit() {
    let mut parts = vec![data(content("a"))];
    for _ in 0..100 {
        parts.push(Part::Wait(SEC));
        parts.push(data(content("b")));
    }
    let mut s = settings(CommitPoint::FirstEvent);
    s.total_timeout = Some(secs(10));
    let t0 = Instant::now();
    let mut resp = guard_with(StreamPolicy::from_settings(s), sse(parts))
        .oneshot(request().0)
        .await
        .expect("committed");
    let (_, err) = read(resp.body_mut()).await;
    assert_eq!(t0.elapsed(), secs(10));
    assert!(matches!(
        err.map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted { cause: StreamCause::TotalTimeout(d), .. }) if d == secs(10)
    ));
}

#[tokio::test(start_paused = true)]
async fn policy_block_fails_closed_before_commit_and_completes_after() {
    let (req, log) = request();
    let script = sse(vec![
        data(role()),
        data(finish("content_filter")),
        data(DONE),
    ]);
    let err = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect_err("blocked");
    assert_eq!(
        err.kind(),
        &ErrorKind::FailedClosed {
            class: FailureClass::PolicyBlock
        }
    );
    assert_eq!(
        err.classification().and_then(|c| c.error_type.as_deref()),
        Some("content_filter")
    );
    assert_eq!(log.attempts()[0].class, Some(FailureClass::PolicyBlock));

    let (req, log) = request();
    let script = sse(vec![
        data(content("Sure, ")),
        data(finish("content_filter")),
        data(DONE),
    ]);
    let mut resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect("committed");
    let (text, err) = read(resp.body_mut()).await;
    assert!(err.is_none() && text.contains("content_filter"));
    assert_eq!(
        log.attempts()[0].stream.as_ref().map(|s| s.end.clone()),
        Some(StreamEnd::Blocked)
    );

    // Anthropic's refusal with commit `end`: fails closed.
    let refusal = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"refusal\"},\"usage\":{\"output_tokens\":3}}\n\n";
    let script = sse(vec![
        data(
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"I\"}}\n\n",
        ),
        data(refusal),
    ]);
    let err = guard(CommitPoint::End, script)
        .oneshot(request().0)
        .await
        .expect_err("blocked");
    assert_eq!(
        err.kind(),
        &ErrorKind::FailedClosed {
            class: FailureClass::PolicyBlock
        }
    );
}

#[tokio::test(start_paused = true)]
async fn done_ends_the_stream_even_if_the_connection_then_hangs() {
    let script = sse(vec![
        data(content("Hi")),
        data(finish("stop")),
        data(DONE),
        Part::Stall,
    ]);
    let (req, log) = request();
    let t0 = Instant::now();
    let mut resp = guard(CommitPoint::End, script)
        .oneshot(req)
        .await
        .expect("complete");
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let (text, err) = read(resp.body_mut()).await;
    assert!(err.is_none() && text.ends_with(DONE));
    // It ended on the idle timer, cleanly: the answer was whole.
    assert_eq!(t0.elapsed(), secs(3));
    assert_eq!(
        log.attempts()[0].stream.as_ref().map(|s| s.end.clone()),
        Some(StreamEnd::Complete)
    );
}

#[tokio::test(start_paused = true)]
async fn malformed_events_pass_through_and_are_counted() {
    let bad = "data: {\"choices\":[{\n\n";
    let script = sse(vec![
        data(content("a")),
        data(bad),
        data(content("b")),
        data(finish("stop")),
    ]);
    let (req, log) = request();
    let mut resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect("ok");
    let (text, err) = read(resp.body_mut()).await;
    assert!(err.is_none() && text.contains(bad));
    let rec = log.attempts()[0].stream.clone().expect("recorded");
    assert_eq!(
        (rec.malformed_events, rec.events, rec.end),
        (1, 4, StreamEnd::Complete)
    );
}

#[tokio::test(start_paused = true)]
async fn non_sse_bodies_get_byte_level_timers_only() {
    let json = Script {
        head_delay: SEC,
        status: StatusCode::OK,
        content_type: "application/json",
        parts: vec![
            Part::Wait(SEC),
            data("{\"choices\":"),
            Part::Wait(SEC),
            data("[]}"),
        ],
    };
    let (req, log) = request();
    let t0 = Instant::now();
    let mut resp = guard(CommitPoint::FirstEvent, json.clone())
        .oneshot(req)
        .await
        .expect("ok");
    // Committed at the first byte: head at 1 s, first byte at 2 s.
    assert_eq!(t0.elapsed(), secs(2));
    let (text, err) = read(resp.body_mut()).await;
    assert!(err.is_none());
    assert_eq!(text, "{\"choices\":[]}");
    let rec = log.attempts()[0].stream.clone().expect("recorded");
    assert_eq!(
        (rec.time_to_first_token, rec.end),
        (Some(secs(2)), StreamEnd::Complete)
    );

    // A JSON body that stalls after its first byte ends with an error, not a clean end.
    let mut stalled = json;
    stalled.parts = vec![data("{\"choices\":"), Part::Stall];
    let mut resp = guard(CommitPoint::FirstEvent, stalled)
        .oneshot(request().0)
        .await
        .expect("ok");
    let (_, err) = read(resp.body_mut()).await;
    assert!(matches!(
        err.map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted {
            delivered_bytes: 11,
            cause: StreamCause::IdleTimeout(_)
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn error_responses_pass_through_classified() {
    let body = "{\"error\":{\"message\":\"busy\",\"type\":\"server_error\",\"code\":\"server_is_overloaded\"}}";
    let script = Script {
        head_delay: SEC,
        status: StatusCode::SERVICE_UNAVAILABLE,
        content_type: "application/json",
        parts: vec![data(body)],
    };
    let (req, log) = request();
    let mut resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect("passed through");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.extensions()
            .get::<crate::Classification>()
            .and_then(|c| c.class),
        Some(FailureClass::Overloaded)
    );
    assert_eq!(read(resp.body_mut()).await.0, body);
    let a = &log.attempts()[0];
    assert_eq!(
        (a.status, a.class, a.latency),
        (Some(503), Some(FailureClass::Overloaded), SEC)
    );
    assert!(a.stream.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_error_body_that_stalls_is_cut_by_the_idle_timer() {
    let script = Script {
        head_delay: SEC,
        status: StatusCode::SERVICE_UNAVAILABLE,
        content_type: "application/json",
        parts: vec![data("{\"error\":{\"mess"), Part::Stall],
    };
    let (req, log) = request();
    let t0 = Instant::now();
    let err = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect_err("stalled");
    // The head at 1 s, then 3 s of silence: the idle timer, not the total one at 60 s.
    assert_eq!(t0.elapsed(), secs(4));
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::IdleTimeout(secs(3))
        }
    );
    let a = &log.attempts()[0];
    assert_eq!(a.class, Some(FailureClass::Timeout));

    // With no idle timer, the total timer still bounds it.
    let mut s = settings(CommitPoint::FirstEvent);
    s.idle_timeout = None;
    s.total_timeout = Some(secs(10));
    let script = Script {
        head_delay: SEC,
        status: StatusCode::SERVICE_UNAVAILABLE,
        content_type: "application/json",
        parts: vec![Part::Stall],
    };
    let t0 = Instant::now();
    let err = guard_with(StreamPolicy::from_settings(s), script)
        .oneshot(request().0)
        .await
        .expect_err("stalled");
    assert_eq!(t0.elapsed(), secs(10));
    assert_eq!(
        err.kind(),
        &ErrorKind::StreamFailed {
            cause: StreamCause::TotalTimeout(secs(10))
        }
    );
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_classified_and_recorded() {
    let svc = StreamGuardLayer::new(StreamPolicy::default())
        .expect("valid")
        .layer(tower::service_fn(|_req: Request<()>| async {
            Err::<Response<http_body_util::Empty<Bytes>>, _>(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "connection refused",
            ))
        }));
    let (req, log) = request();
    let err = svc.oneshot(req).await.expect_err("refused");
    assert_eq!(err.kind(), &ErrorKind::Transport);
    let a = &log.attempts()[0];
    // The kind and class, never the inner error's text (it may carry a URL).
    assert_eq!(a.error.as_deref(), Some("transport failed (connect)"));
    assert!(a.class.is_some());
}

#[tokio::test(start_paused = true)]
async fn settings_per_route() {
    let mut policy = StreamPolicy::from_settings(settings(CommitPoint::FirstEvent));
    let mut batch = settings(CommitPoint::End);
    batch.first_token_timeout = Some(secs(50));
    policy.routes.insert("batch".into(), batch);
    let mut script = sse(vec![data(content("a")), Part::Wait(SEC), data(DONE)]);
    script.head_delay = secs(10);
    let svc = guard_with(policy, script);

    let err = svc
        .clone()
        .oneshot(request().0)
        .await
        .expect_err("default: 5 s");
    assert_eq!(
        cause_of(&err),
        Some(&StreamCause::FirstTokenTimeout(secs(5)))
    );

    let (mut req, _) = request();
    req.extensions_mut().insert(RouteName::new("batch"));
    let t0 = Instant::now();
    svc.oneshot(req)
        .await
        .expect("batch route: 50 s, commit at the end");
    assert_eq!(t0.elapsed(), secs(11));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_body_is_recorded_as_abandoned() {
    let script = sse(vec![data(content("a")), Part::Stall]);
    let (req, log) = request();
    let resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(req)
        .await
        .expect("ok");
    drop(resp);
    assert_eq!(
        log.attempts()[0].stream.as_ref().map(|s| s.end.clone()),
        Some(StreamEnd::Abandoned)
    );
}

#[tokio::test(start_paused = true)]
async fn used_alone_the_guard_owns_the_log() {
    let script = sse(vec![data(content("a")), data(DONE)]);
    let resp = guard(CommitPoint::FirstEvent, script)
        .oneshot(Request::new(()))
        .await
        .expect("ok");
    let log = resp
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .expect("log in the response");
    assert_eq!(
        log.snapshot().outcome,
        Some(Outcome::Success { status: 200 })
    );
    let mut body = resp.into_body();
    read(&mut body).await;
    assert_eq!(
        log.attempts()[0].stream.as_ref().map(|s| s.end.clone()),
        Some(StreamEnd::Complete)
    );
}

#[test]
fn bad_policies_are_errors_not_panics() {
    let mut s = settings(CommitPoint::AfterBytes { bytes: 10 });
    s.max_buffer = 5;
    let err = StreamGuardLayer::new(StreamPolicy::from_settings(s)).expect_err("bytes > buffer");
    assert_eq!(err.field(), "stream.commit.bytes");

    let mut s = settings(CommitPoint::FirstEvent);
    s.idle_timeout = Some(Duration::ZERO);
    let err = StreamGuardLayer::new(StreamPolicy::from_settings(s)).expect_err("zero idle");
    assert_eq!(err.field(), "stream.idle_timeout");

    let mut policy = Policy::interactive();
    policy
        .stream
        .routes
        .insert("nowhere".into(), settings(CommitPoint::End));
    let err = StreamGuardLayer::from_policy(&policy).expect_err("unknown route");
    assert_eq!(err.field(), "stream.routes.nowhere");

    let mut policy = Policy::interactive();
    policy.fallback.routes.push(RouteConfig::new("backup"));
    policy
        .stream
        .routes
        .insert("backup".into(), settings(CommitPoint::End));
    let layer = StreamGuardLayer::from_policy(&policy).expect("known route");
    assert_eq!(
        layer.policy().for_route(Some("backup")).commit,
        CommitPoint::End
    );
}

#[tokio::test(start_paused = true)]
async fn absurd_durations_do_not_overflow_the_clock() {
    let s = StreamSettings {
        first_token_timeout: Some(Duration::MAX),
        idle_timeout: Some(Duration::MAX),
        total_timeout: Some(Duration::MAX),
        commit: CommitPoint::AfterDuration {
            duration: Duration::MAX,
        },
        max_buffer: u64::MAX,
    };
    let script = sse(vec![data(content("a")), Part::Wait(SEC), data(DONE)]);
    let mut resp = guard_with(StreamPolicy::from_settings(s), script)
        .oneshot(request().0)
        .await
        .expect("ok");
    assert!(read(resp.body_mut()).await.1.is_none());
}

/// A body fed by a task that sends on its own schedule, as a provider on the network does.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_slow_to_read_is_not_a_silent_provider() {
    // The provider sends every second; the caller reads every 5 s (idle timeout 3 s).
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let _ = tx.send(Bytes::from(content("a"))).await;
        for _ in 0..4 {
            tokio::time::sleep(SEC).await;
            let _ = tx.send(Bytes::from(content("b"))).await;
        }
        let _ = tx.send(Bytes::from(DONE)).await;
    });
    let rx = std::sync::Mutex::new(Some(rx));
    let transport = tower::service_fn(move |_req: Request<()>| {
        let rx = rx.lock().ok().and_then(|mut r| r.take());
        async move {
            let rx = rx.ok_or_else(|| io::Error::other("one request only"))?;
            let mut resp = Response::new(ChannelBody(rx));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/event-stream"),
            );
            Ok::<_, io::Error>(resp)
        }
    });
    let layer = StreamGuardLayer::new(StreamPolicy::from_settings(settings(
        CommitPoint::FirstEvent,
    )))
    .expect("valid");
    let (req, log) = request();
    let mut resp = layer
        .layer(transport)
        .oneshot(req)
        .await
        .expect("committed");
    let mut frames = 0;
    loop {
        match resp.body_mut().frame().await {
            Some(Ok(_)) => frames += 1,
            Some(Err(e)) => panic!("failed: {e}"),
            None => break,
        }
        tokio::time::sleep(secs(5)).await;
    }
    assert_eq!(frames, 6);
    assert_eq!(
        log.attempts()[0].stream.as_ref().map(|s| s.end.clone()),
        Some(StreamEnd::Complete)
    );
}

#[tokio::test(start_paused = true)]
async fn in_band_errors_are_classified_by_the_layers_classifier() {
    use crate::classify::{Classification, Classifier, DefaultClassifier, SharedClassifier};

    /// Reads every in-band error as a rate limit.
    struct Strict;
    impl Classifier for Strict {
        fn classify_response(
            &self,
            status: StatusCode,
            headers: &http::HeaderMap,
            body: &[u8],
        ) -> Classification {
            DefaultClassifier::default().classify_response(status, headers, body)
        }
        fn classify_error(&self, e: &(dyn std::error::Error + 'static)) -> Classification {
            DefaultClassifier::default().classify_error(e)
        }
        fn classify_stream_error(&self, _data: &[u8]) -> Option<Classification> {
            Some(Classification::failure(FailureClass::RateLimited))
        }
    }

    let layer = StreamGuardLayer::new(StreamPolicy::from_settings(settings(
        CommitPoint::FirstEvent,
    )))
    .expect("valid")
    .classifier(SharedClassifier::new(Strict));
    let script = sse(vec![data(role()), data(overloaded_event())]);
    let err = layer
        .layer(provider(script))
        .oneshot(request().0)
        .await
        .expect_err("in-band error");
    assert_eq!(err.class(), Some(FailureClass::RateLimited));
}
