//! Unit tests over `tower::service_fn` providers, all under paused time.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep};
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;
use crate::StreamCause;
use crate::attempt_log::{AttemptLog, LocalEventKind};
use crate::backoff::JitterSource;
use crate::classify::{Classification, FailureClass};
use crate::error::{BoxError, Error, ErrorKind};
use crate::policy::{
    CircuitBreakerPolicy, ClassAction, FailureRateRule, FallbackRule, Policy, RetryRule,
    SlowCallRule,
};
use crate::{Body, RouteName};

/// What the scripted provider does with a call.
#[derive(Clone)]
enum Reply {
    Status(u16),
    /// A response whose classification is already in its extensions (as an inner crate layer
    /// would leave it): content filters and quota, independent of the default classifier.
    Classified(u16, FailureClass),
    /// A 200 whose body fails with this error after one chunk.
    BodyFails(fn() -> Error),
    /// An error instead of a response.
    Fails(fn() -> Error),
    /// A foreign transport error.
    Refused,
    /// Answer after a delay.
    Slow(Duration, u16),
    /// Answer once notified.
    Wait(Arc<Notify>, u16),
}

type Script = Arc<dyn Fn(usize, &Request<Full<Bytes>>) -> Reply + Send + Sync>;
type Fut = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// A provider answering by script; the counter is its request record.
fn provider(
    script: impl Fn(usize, &Request<Full<Bytes>>) -> Reply + Send + Sync + 'static,
) -> (
    impl Service<Request<Full<Bytes>>, Response = Response<Body>, Error = BoxError, Future = Fut>
    + Clone,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let script: Script = Arc::new(script);
    let counter = calls.clone();
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let reply = script(n, &req);
        let fut: Fut = Box::pin(async move {
            match reply {
                Reply::Status(s) => Ok(status(s)),
                Reply::Classified(s, class) => {
                    let mut r = status(s);
                    let mut c = Classification::failure(class);
                    c.status = Some(r.status());
                    r.extensions_mut().insert(c);
                    Ok(r)
                }
                Reply::BodyFails(e) => Ok(Response::new(Body::new(FailingBody(Some(e))))),
                Reply::Fails(e) => Err(Box::new(e()) as BoxError),
                Reply::Refused => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "refused",
                )) as BoxError),
                Reply::Slow(d, s) => {
                    sleep(d).await;
                    Ok(status(s))
                }
                Reply::Wait(n, s) => {
                    n.notified().await;
                    Ok(status(s))
                }
            }
        });
        fut
    });
    (svc, calls)
}

fn status(s: u16) -> Response<Body> {
    let mut r = Response::new(Body::from("{}"));
    *r.status_mut() = StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// One chunk, then the error.
struct FailingBody(Option<fn() -> Error>);

impl http_body::Body for FailingBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        Poll::Ready(self.0.take().map(|e| Err(e())))
    }
}

/// A request with a backup route (as `FallbackLayer` marks one), so that an open circuit fails
/// it fast; the throttle, which judges requests without one, has tests of its own.
fn req(route: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{route}/v1/chat/completions"))
        .extension(crate::context::FallbackAvailable)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap_or_default()
}

/// A policy with only the rules a test names, opening for 2 s (at most 5 s), one probe at a time
/// and closing on one good probe: the timings these tests are written in.
fn bare() -> CircuitBreakerPolicy {
    CircuitBreakerPolicy {
        failure_rate: None,
        consecutive_failures: None,
        slow_call: None,
        open_base: Duration::from_secs(2),
        open_cap: Duration::from_secs(5),
        half_open_probes: 1,
        half_open_successes: 1,
        ..CircuitBreakerPolicy::default()
    }
}

fn rate(threshold: f64, min_calls: u32) -> FailureRateRule {
    FailureRateRule {
        threshold,
        min_calls,
        ..FailureRateRule::default()
    }
}

async fn send<S>(svc: &mut S, route: &str) -> Result<Response<Body>, Error>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
{
    svc.ready().await?.call(req(route)).await
}

/// Sends and reads the whole body; `Ok(status)` or the error.
async fn roundtrip<S>(svc: &mut S, route: &str) -> Result<u16, Error>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
{
    let r = send(svc, route).await?;
    let s = r.status().as_u16();
    r.into_body().collect().await?;
    Ok(s)
}

fn retry_in(e: &Error) -> Option<Duration> {
    match e.kind() {
        ErrorKind::CircuitOpen { retry_in, .. } => Some(*retry_in),
        _ => None,
    }
}

const A: &str = "a.example";
const B: &str = "b.example";

#[tokio::test(start_paused = true)]
async fn a_burst_after_10000_successes_trips_as_soon_as_the_window_rate_crosses() {
    let mut p = bare();
    // 50 % over 60 s in 12 buckets of 5 s, minimum 10 calls.
    p.failure_rate = Some(rate(0.5, 10));
    let failing = Arc::new(Mutex::new(false));
    let f = failing.clone();
    let (inner, calls) = provider(move |_, _| {
        if *f.lock().unwrap_or_else(|p| p.into_inner()) {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    });
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let start = Instant::now();
    for _ in 0..10_000 {
        assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(200));
        sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(start.elapsed(), Duration::from_secs(1000));
    // The window now holds 11 full buckets (945 s..1000 s) of 50 successes each; the 9 450
    // older ones have aged out.
    let s = handle.snapshot(A).unwrap();
    assert_eq!((s.calls, s.failures), (550, 0));

    *failing.lock().unwrap_or_else(|p| p.into_inner()) = true;
    for i in 0..549 {
        assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(503), "failure {i}");
    }
    assert_eq!(handle.state(A), CircuitState::Closed);
    // 550 failures out of 1100 calls: exactly the threshold. A cumulative counter would need
    // 10 000 failures.
    assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(503));
    assert_eq!(handle.state(A), CircuitState::Open);
    let before = calls.load(Ordering::SeqCst);
    let e = roundtrip(&mut svc, A).await.unwrap_err();
    assert!(retry_in(&e).is_some(), "{e}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "inner service not called"
    );
    assert_eq!(start.elapsed(), Duration::from_secs(1000));
}

#[tokio::test(start_paused = true)]
async fn answers_still_in_flight_count_against_a_window_of_fast_failures() {
    let mut p = bare();
    p.failure_rate = Some(rate(0.5, 10));
    // The first 20 calls are answers that take their time; every later call fails at once.
    let answers = Arc::new(Notify::new());
    let release = answers.clone();
    let (inner, calls) = provider(move |n, _| {
        if n < 20 {
            Reply::Wait(release.clone(), 200)
        } else {
            Reply::Status(503)
        }
    });
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let svc = layer.layer(inner);
    let mut streaming = Vec::new();
    for _ in 0..20 {
        let mut svc = svc.clone();
        streaming.push(tokio::spawn(async move { roundtrip(&mut svc, A).await }));
    }
    tokio::task::yield_now().await;
    assert_eq!(calls.load(Ordering::SeqCst), 20);
    assert_eq!(handle.snapshot(A).map(|s| s.calls_in_flight), Some(20));

    // Ten fast failures end while the twenty answers are still coming: 10 of 30 calls, not
    // 10 of 10.
    let mut svc = svc;
    for _ in 0..10 {
        assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(503));
    }
    let s = handle.snapshot(A).unwrap();
    assert_eq!(
        (s.state, s.calls, s.failures),
        (CircuitState::Closed, 10, 10)
    );
    answers.notify_waiters();
    for call in streaming {
        assert_eq!(call.await.ok().and_then(Result::ok), Some(200));
    }
    let s = handle.snapshot(A).unwrap();
    assert_eq!((s.calls, s.failures, s.calls_in_flight), (30, 10, 0));

    // A real outage still trips: the rate reaches 50 % at the tenth further failure.
    for i in 0..9 {
        assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(503), "failure {i}");
    }
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(503));
    assert_eq!(handle.state(A), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_is_no_longer_in_flight() {
    let mut p = bare();
    p.failure_rate = Some(rate(0.5, 10));
    let never = Arc::new(Notify::new());
    let n = never.clone();
    let (inner, _) = provider(move |_, _| Reply::Wait(n.clone(), 200));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let call = svc.ready().await.unwrap().call(req(A));
    let mut call = Box::pin(call);
    let waker = std::task::Waker::noop();
    assert!(
        call.as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending()
    );
    assert_eq!(handle.snapshot(A).map(|s| s.calls_in_flight), Some(1));
    drop(call);
    assert_eq!(handle.snapshot(A).map(|s| s.calls_in_flight), Some(0));
}

#[tokio::test(start_paused = true)]
async fn the_window_slides_old_failures_age_out() {
    let mut p = bare();
    p.failure_rate = Some(rate(0.5, 10));
    let (inner, _) = provider(|_, _| Reply::Status(500));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..9 {
        roundtrip(&mut svc, A).await.unwrap();
    }
    // Nine failures in the window: below the minimum of ten calls.
    assert_eq!(handle.state(A), CircuitState::Closed);
    sleep(Duration::from_secs(60)).await;
    assert_eq!(handle.snapshot(A).map(|s| s.calls), Some(0));
    // A tenth failure a window later: a counter that never slides would trip here.
    roundtrip(&mut svc, A).await.unwrap();
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert_eq!(
        handle.snapshot(A).map(|s| (s.calls, s.failures)),
        Some((1, 1))
    );
}

#[tokio::test(start_paused = true)]
async fn minimum_calls_before_the_rate_is_judged() {
    let mut p = bare();
    p.failure_rate = Some(rate(0.5, 10));
    let (inner, _) = provider(|_, _| Reply::Status(502));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..9 {
        roundtrip(&mut svc, A).await.unwrap();
        assert_eq!(handle.state(A), CircuitState::Closed);
    }
    roundtrip(&mut svc, A).await.unwrap();
    assert_eq!(handle.state(A), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_trip_and_a_success_resets_the_count() {
    let mut p = bare();
    p.consecutive_failures = Some(3);
    // F F S F F F
    let (inner, _) = provider(|n, _| Reply::Status(if n == 2 { 200 } else { 503 }));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..5 {
        roundtrip(&mut svc, A).await.unwrap();
    }
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert_eq!(handle.snapshot(A).map(|s| s.consecutive_failures), Some(2));
    roundtrip(&mut svc, A).await.unwrap();
    assert_eq!(handle.state(A), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_at_their_rate() {
    let mut p = bare();
    p.failure_rate = Some(rate(0.5, 4));
    p.slow_call = Some(SlowCallRule::new(Duration::from_secs(2), 0.5));
    // Fast, then slow successes (3 s to the head).
    let (inner, _) = provider(|n, _| {
        if n < 4 {
            Reply::Status(200)
        } else {
            Reply::Slow(Duration::from_secs(3), 200)
        }
    });
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..4 {
        roundtrip(&mut svc, A).await.unwrap();
    }
    for _ in 0..3 {
        roundtrip(&mut svc, A).await.unwrap();
    }
    // 3 slow of 7.
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert_eq!(handle.snapshot(A).map(|s| s.slow_calls), Some(3));
    roundtrip(&mut svc, A).await.unwrap();
    // 4 slow of 8: the slow-call rate reached, though every call succeeded.
    assert_eq!(handle.state(A), CircuitState::Open);
    assert_eq!(handle.snapshot(A).map(|s| s.failures), Some(0));
}

/// Trips on every failure; probes answer `healthy_from` on.
async fn open_times(
    layer: CircuitBreakerLayer,
    trips: usize,
) -> (Vec<Duration>, CircuitBreakerHandle) {
    let healthy = Arc::new(Mutex::new(false));
    let h = healthy.clone();
    let (inner, _) = provider(move |_, _| {
        Reply::Status(if *h.lock().unwrap_or_else(|p| p.into_inner()) {
            200
        } else {
            503
        })
    });
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let mut opens = Vec::new();
    roundtrip(&mut svc, A).await.unwrap();
    for _ in 0..trips {
        let opened = Instant::now();
        let e = roundtrip(&mut svc, A).await.unwrap_err();
        let wait = retry_in(&e).unwrap();
        // Refused until exactly then, admitted as a probe right at it.
        sleep(wait - Duration::from_millis(1)).await;
        assert!(roundtrip(&mut svc, A).await.is_err());
        sleep(Duration::from_millis(1)).await;
        assert_eq!(handle.state(A), CircuitState::Open);
        assert_eq!(
            roundtrip(&mut svc, A).await.ok(),
            Some(503),
            "probe admitted"
        );
        opens.push(opened.elapsed());
    }
    *healthy.lock().unwrap_or_else(|p| p.into_inner()) = true;
    let e = roundtrip(&mut svc, A).await.unwrap_err();
    sleep(retry_in(&e).unwrap()).await;
    assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(200));
    assert_eq!(handle.state(A), CircuitState::Closed);
    (opens, handle)
}

#[tokio::test(start_paused = true)]
async fn open_times_escalate_exactly_without_jitter() {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    p.open_base = Duration::from_secs(1);
    p.open_cap = Duration::from_secs(8);
    let layer = CircuitBreakerLayer::new(p).unwrap().without_jitter();
    let (opens, handle) = open_times(layer.clone(), 6).await;
    let secs: Vec<u64> = opens.iter().map(|d| d.as_millis() as u64).collect();
    assert_eq!(secs, [1000, 2000, 4000, 8000, 8000, 8000]);
    // A success closed it and reset the escalation: the next trip opens for the base again.
    let (inner, _) = provider(|_, _| Reply::Status(500));
    let mut svc = layer.layer(inner);
    roundtrip(&mut svc, A).await.unwrap();
    let e = roundtrip(&mut svc, A).await.unwrap_err();
    assert_eq!(retry_in(&e), Some(Duration::from_secs(1)));
    assert_eq!(handle.snapshot(A).map(|s| s.trips), Some(1));
}

#[tokio::test(start_paused = true)]
async fn seeded_jitter_is_reproducible_and_never_exceeds_the_cap() {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    p.open_base = Duration::from_secs(1);
    p.open_cap = Duration::from_secs(8);
    let run = |seed| {
        CircuitBreakerLayer::new(p.clone())
            .unwrap()
            .jitter(JitterSource::seeded(seed))
    };
    let (a, _) = open_times(run(7), 6).await;
    let (b, _) = open_times(run(7), 6).await;
    let (c, _) = open_times(run(8), 6).await;
    assert_eq!(a, b, "same seed, same open times");
    assert_ne!(a, c);
    for (got, exp) in a.iter().zip([1, 2, 4, 8, 8, 8]) {
        let exp = Duration::from_secs(exp);
        // Jitter goes downward only, into [0.8, 1.0) of the un-jittered time (to the ms the
        // paused clock ticks in).
        assert!(
            *got >= exp.mul_f64(0.8) && *got <= exp,
            "{got:?} for {exp:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_only_its_probes_and_a_success_closes() {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    p.half_open_probes = 2;
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let (inner, calls) = provider(move |n, _| {
        if n == 0 {
            Reply::Status(503)
        } else {
            Reply::Wait(g.clone(), 200)
        }
    });
    let layer = CircuitBreakerLayer::new(p).unwrap().without_jitter();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    roundtrip(&mut svc, A).await.unwrap();
    sleep(Duration::from_secs(2)).await;
    let p1 = tokio::spawn(svc.clone().oneshot(req(A)));
    let p2 = tokio::spawn(svc.clone().oneshot(req(A)));
    tokio::task::yield_now().await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(handle.state(A), CircuitState::HalfOpen);
    assert_eq!(handle.snapshot(A).map(|s| s.probes_in_flight), Some(2));
    // The third is refused while both probes are out.
    let e = roundtrip(&mut svc, A).await.unwrap_err();
    assert_eq!(retry_in(&e), Some(Duration::ZERO));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    gate.notify_waiters();
    assert_eq!(p1.await.unwrap().unwrap().status(), 200);
    assert_eq!(p2.await.unwrap().unwrap().status(), 200);
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert_eq!(handle.snapshot(A).map(|s| s.probes_in_flight), Some(0));
    // Closed again: calls go through without limit.
    let more: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(req(A))))
        .collect();
    tokio::task::yield_now().await;
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    gate.notify_waiters();
    for m in more {
        assert_eq!(m.await.unwrap().unwrap().status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_its_slot_back() {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let (inner, calls) = provider(move |n, _| match n {
        0 => Reply::Status(503),
        1 => Reply::Wait(g.clone(), 200),
        _ => Reply::Status(200),
    });
    let layer = CircuitBreakerLayer::new(p).unwrap().without_jitter();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    roundtrip(&mut svc, A).await.unwrap();
    sleep(Duration::from_secs(2)).await;
    let probe = svc.ready().await.unwrap().call(req(A));
    assert_eq!(handle.snapshot(A).map(|s| s.probes_in_flight), Some(1));
    assert!(
        roundtrip(&mut svc, A).await.is_err(),
        "the one slot is taken"
    );
    drop(probe);
    assert_eq!(handle.snapshot(A).map(|s| s.probes_in_flight), Some(0));
    assert_eq!(handle.state(A), CircuitState::HalfOpen);
    assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(200));
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn caller_and_money_failures_never_trip() {
    let p = CircuitBreakerPolicy::default();
    let replies = [
        Reply::Status(400),
        Reply::Status(401),
        Reply::Status(403),
        Reply::Status(404),
        Reply::Status(422),
        Reply::Classified(400, FailureClass::PolicyBlock),
        Reply::Classified(400, FailureClass::ContextOverflow),
        Reply::Classified(429, FailureClass::QuotaExhausted),
        Reply::Status(402),
        // Rate limits do not count unless the policy says so.
        Reply::Status(429),
    ];
    let (inner, calls) = provider(move |n, _| replies[n % replies.len()].clone());
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..2000 {
        let s = roundtrip(&mut svc, A).await.unwrap();
        assert!(s >= 400);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2000);
    let s = handle.snapshot(A).unwrap();
    assert_eq!(s.state, CircuitState::Closed);
    // Neither successes nor failures: they say nothing about the provider's health.
    assert_eq!((s.calls, s.failures, s.consecutive_failures), (0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn rate_limits_count_when_the_policy_says_so() {
    let mut policy = Policy::interactive();
    policy.circuit_breaker = bare();
    policy.circuit_breaker.consecutive_failures = Some(3);
    policy.actions.set(
        FailureClass::RateLimited,
        ClassAction::new(RetryRule::Yes, FallbackRule::Yes, true),
    );
    let (inner, _) = provider(|_, _| Reply::Status(429));
    let layer = CircuitBreakerLayer::from_policy(&policy).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..3 {
        roundtrip(&mut svc, A).await.unwrap();
    }
    assert_eq!(handle.state(A), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_non_counting_probe_neither_closes_nor_reopens() {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    let (inner, _) = provider(|n, _| match n {
        0 => Reply::Status(503),
        1 => Reply::Status(400),
        _ => Reply::Status(200),
    });
    let layer = CircuitBreakerLayer::new(p).unwrap().without_jitter();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    roundtrip(&mut svc, A).await.unwrap();
    sleep(Duration::from_secs(2)).await;
    assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(400));
    assert_eq!(handle.state(A), CircuitState::HalfOpen);
    assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(200));
    assert_eq!(handle.state(A), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn routes_are_independent() {
    let mut p = bare();
    p.consecutive_failures = Some(2);
    let (inner, calls) = provider(|_, r| {
        let route = RouteName::of_request(r);
        Reply::Status(if route.as_str() == A { 503 } else { 200 })
    });
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..2 {
        roundtrip(&mut svc, A).await.unwrap();
    }
    assert!(roundtrip(&mut svc, A).await.is_err());
    for _ in 0..20 {
        assert_eq!(roundtrip(&mut svc, B).await.ok(), Some(200));
    }
    assert_eq!(handle.state(A), CircuitState::Open);
    assert_eq!(handle.state(B), CircuitState::Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 22);
}

#[tokio::test(start_paused = true)]
async fn the_route_extension_wins_over_the_authority() {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    let (inner, _) = provider(|_, _| Reply::Status(503));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let mut r = req(A);
    r.extensions_mut().insert(RouteName::new("primary"));
    svc.ready().await.unwrap().call(r).await.unwrap();
    assert_eq!(handle.state("primary"), CircuitState::Open);
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert!(handle.snapshot(A).is_none());
}

#[tokio::test(start_paused = true)]
async fn clones_share_state() {
    let mut p = bare();
    p.consecutive_failures = Some(2);
    let (inner, _) = provider(|_, _| Reply::Status(503));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let mut one = layer.layer(inner.clone());
    let mut two = one.clone();
    let mut three = layer.clone().layer(inner);
    roundtrip(&mut one, A).await.unwrap();
    roundtrip(&mut two, A).await.unwrap();
    assert!(roundtrip(&mut three, A).await.is_err());
    assert_eq!(one.handle().state(A), CircuitState::Open);
}

fn interrupted() -> Error {
    Error::new(ErrorKind::StreamInterrupted {
        delivered_bytes: 12,
        cause: StreamCause::IdleTimeout(Duration::from_secs(20)),
    })
}

fn blocked_mid_stream() -> Error {
    Error::new(ErrorKind::StreamInterrupted {
        delivered_bytes: 12,
        cause: StreamCause::InBandError {
            class: FailureClass::PolicyBlock,
            error_type: Some("content_filter".into()),
        },
    })
}

fn failed_before_commit() -> Error {
    Error::new(ErrorKind::StreamFailed {
        cause: StreamCause::Disconnected,
    })
}

#[tokio::test(start_paused = true)]
async fn a_stream_failing_after_the_head_counts_once() {
    let mut p = bare();
    p.failure_rate = Some(rate(0.5, 100));
    p.consecutive_failures = Some(3);
    let (inner, _) = provider(|_, _| Reply::BodyFails(interrupted));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let resp = send(&mut svc, A).await.unwrap();
    // At the head it is a success...
    assert_eq!(
        handle.snapshot(A).map(|s| (s.calls, s.failures)),
        Some((1, 0))
    );
    let e = resp.into_body().collect().await.unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::StreamInterrupted { .. }));
    // ...and the body's failure turns it into one failure, not a second call.
    let s = handle.snapshot(A).unwrap();
    assert_eq!((s.calls, s.failures, s.consecutive_failures), (1, 1, 1));
    for _ in 0..2 {
        let r = send(&mut svc, A).await.unwrap();
        assert!(r.into_body().collect().await.is_err());
    }
    assert_eq!(handle.state(A), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn an_in_band_safety_block_mid_stream_does_not_count() {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    let (inner, _) = provider(|_, _| Reply::BodyFails(blocked_mid_stream));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..5 {
        let r = send(&mut svc, A).await.unwrap();
        assert!(r.into_body().collect().await.is_err());
    }
    assert_eq!(handle.state(A), CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn errors_before_the_head_count_and_are_recorded() {
    let mut p = bare();
    p.consecutive_failures = Some(2);
    let (inner, calls) = provider(|n, _| {
        if n == 0 {
            Reply::Fails(failed_before_commit)
        } else {
            Reply::Refused
        }
    });
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let e = send(&mut svc, A).await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::StreamFailed { .. }),
        "passed on as it is"
    );
    let e = send(&mut svc, A).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Transport);
    let log = e.attempt_log().unwrap();
    let a = &log.attempts()[0];
    assert_eq!(a.class, Some(FailureClass::Connect));
    assert!(a.error.is_some());
    assert_eq!(a.route.as_ref().map(RouteName::as_str), Some(A));
    assert_eq!(handle.state(A), CircuitState::Open);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_fails_fast_and_logs_the_decision() {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    let (inner, calls) = provider(|_, _| Reply::Status(503));
    let layer = CircuitBreakerLayer::new(p).unwrap().without_jitter();
    let mut svc = layer.layer(inner);
    roundtrip(&mut svc, A).await.unwrap();
    sleep(Duration::from_millis(500)).await;
    let mut r = req(A);
    let log = AttemptLog::new();
    r.extensions_mut().insert(log.clone());
    let e = svc.ready().await.unwrap().call(r).await.unwrap_err();
    assert_eq!(
        e.kind(),
        &ErrorKind::CircuitOpen {
            route: RouteName::new(A),
            retry_in: Duration::from_millis(1500)
        }
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(e.attempt_log().is_some_and(|l| l.ptr_eq(&log)));
    assert!(log.attempts().is_empty(), "no attempt was made");
    let events = log.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].route.as_ref().map(RouteName::as_str), Some(A));
    assert_eq!(
        events[0].kind,
        LocalEventKind::CircuitOpen {
            retry_in: Duration::from_millis(1500)
        }
    );
    // The log was not the breaker's: the outcome is left to its owner.
    assert!(log.snapshot().outcome.is_none());
}

#[tokio::test(start_paused = true)]
async fn attempts_are_recorded_once() {
    let (inner, _) = provider(|_, _| Reply::Status(503));
    // An inner crate layer that records the attempt itself.
    let recording = tower::service_fn(move |mut r: Request<Full<Bytes>>| {
        let (log, _) = AttemptLog::get_or_insert(&mut r);
        log.record(crate::attempt_log::Attempt::new(
            Some("inner".into()),
            Duration::ZERO,
            Duration::ZERO,
            &Classification::failure(FailureClass::Overloaded),
        ));
        inner.clone().oneshot(r)
    });
    let layer = CircuitBreakerLayer::new(CircuitBreakerPolicy::default()).unwrap();
    let mut svc = layer.layer(recording);
    let r = send(&mut svc, A).await.unwrap();
    let log = r.extensions().get::<AttemptLog>().unwrap();
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].route.as_ref().map(RouteName::as_str),
        Some("inner")
    );
    // The breaker created the log, so it owns the outcome.
    assert!(log.snapshot().outcome.is_some());

    // Without an inner recorder the breaker records it.
    let (inner, _) = provider(|_, _| Reply::Status(200));
    let mut svc = layer.layer(inner);
    let r = send(&mut svc, B).await.unwrap();
    let attempts = r.extensions().get::<AttemptLog>().unwrap().attempts();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, Some(200));
    assert_eq!(attempts[0].class, None);
}

#[tokio::test(start_paused = true)]
async fn the_handle_steers_and_reports_every_transition() {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    let seen: Arc<Mutex<Vec<(String, CircuitState, CircuitState)>>> = Arc::default();
    let s = seen.clone();
    let (inner, calls) = provider(|n, _| Reply::Status(if n == 0 { 503 } else { 200 }));
    let layer = CircuitBreakerLayer::new(p)
        .unwrap()
        .without_jitter()
        .on_transition(move |route, from, to| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((route.to_string(), from, to));
        });
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert!(handle.snapshot(A).is_none());

    roundtrip(&mut svc, A).await.unwrap();
    let snap = handle.snapshot(A).unwrap();
    assert_eq!(snap.state, CircuitState::Open);
    assert_eq!(snap.retry_in, Some(Duration::from_secs(2)));
    assert_eq!(snap.trips, 1);
    sleep(Duration::from_secs(2)).await;
    roundtrip(&mut svc, A).await.unwrap();

    handle.force_open(A);
    let e = roundtrip(&mut svc, A).await.unwrap_err();
    assert_eq!(
        retry_in(&e),
        Some(Duration::from_secs(5)),
        "open_cap as a hint"
    );
    sleep(Duration::from_secs(60)).await;
    assert!(roundtrip(&mut svc, A).await.is_err(), "stays open");
    handle.force_closed(A);
    assert_eq!(roundtrip(&mut svc, A).await.ok(), Some(200));
    handle.reset(A);
    assert!(handle.snapshot(A).is_none());
    handle.force_open(B);
    assert_eq!(handle.snapshots().len(), 1);
    handle.reset_all();
    assert!(handle.snapshots().is_empty());

    use CircuitState::*;
    let a = |f, t| (A.to_owned(), f, t);
    assert_eq!(
        *seen.lock().unwrap_or_else(|p| p.into_inner()),
        [
            a(Closed, Open),
            a(Open, HalfOpen),
            a(HalfOpen, Closed),
            a(Closed, ForcedOpen),
            a(ForcedOpen, ForcedClosed),
            a(ForcedClosed, Closed),
            (B.to_owned(), Closed, ForcedOpen),
            (B.to_owned(), ForcedOpen, Closed),
        ]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_route_called_slowly_is_probed_by_every_call_while_down_and_serves_at_recovery() {
    // 503 for the first 60 s, then healthy; one request every 4 s; the default policy.
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(42);
    let start = Instant::now();
    let (inner, calls) = provider(move |_, _| {
        Reply::Status(if start.elapsed() < Duration::from_secs(60) {
            503
        } else {
            200
        })
    });
    let layer = CircuitBreakerLayer::from_policy(&policy).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    let mut rejected = 0;
    let mut first_ok = None;
    let mut calls_while_down = 0;
    for i in 0..40u64 {
        let at = Instant::now();
        assert_eq!(at - start, Duration::from_secs(4 * i));
        match roundtrip(&mut svc, A).await {
            Ok(200) => {
                first_ok.get_or_insert(at - start);
            }
            Ok(s) => {
                assert_eq!(s, 503);
                assert!(first_ok.is_none(), "healthy traffic failed at {i}");
            }
            Err(e) => {
                assert!(retry_in(&e).is_some(), "{e}");
                assert!(first_ok.is_none(), "refused after recovery at {i}");
                rejected += 1;
            }
        }
        if at - start < Duration::from_secs(60) {
            calls_while_down = calls.load(Ordering::SeqCst);
        }
        sleep(Duration::from_secs(4)).await;
    }
    // It tripped after 10 consecutive failures; the preset's open time (at most 600 ms) has
    // always passed when the next request comes 4 s later, so every one of them was a probe:
    // none refused, one call each, and the first after the recovery served.
    assert_eq!(rejected, 0);
    assert_eq!(
        calls_while_down, 15,
        "one call per request on a dead provider"
    );
    assert_eq!(first_ok, Some(Duration::from_secs(60)));
    // Five good probes in a row closed it.
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 40);
}

#[tokio::test]
async fn bad_policies_are_errors_not_panics() {
    let p = CircuitBreakerPolicy {
        half_open_probes: 0,
        ..CircuitBreakerPolicy::default()
    };
    let e = CircuitBreakerLayer::new(p).unwrap_err();
    assert_eq!(e.field(), "circuit_breaker.half_open_probes");

    let p = CircuitBreakerPolicy {
        failure_rate: Some(rate(1.5, 10)),
        ..CircuitBreakerPolicy::default()
    };
    let e = CircuitBreakerLayer::new(p).unwrap_err();
    assert_eq!(e.field(), "circuit_breaker.failure_rate.threshold");

    let mut policy = Policy::interactive();
    policy.circuit_breaker.open_cap = Duration::from_millis(1);
    let e = CircuitBreakerLayer::from_policy(&policy).unwrap_err();
    assert_eq!(e.field(), "circuit_breaker.open_cap");
}

#[tokio::test(start_paused = true)]
async fn a_body_dropped_early_breaks_the_failure_run() {
    let mut p = bare();
    p.consecutive_failures = Some(2);
    // F, S (body dropped unread), F: no two in a row.
    let (inner, _) = provider(|n, _| Reply::Status(if n == 1 { 200 } else { 503 }));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    roundtrip(&mut svc, A).await.unwrap();
    let ok = send(&mut svc, A).await.unwrap();
    assert_eq!(handle.snapshot(A).map(|s| s.consecutive_failures), Some(1));
    drop(ok);
    assert_eq!(handle.snapshot(A).map(|s| s.consecutive_failures), Some(0));
    roundtrip(&mut svc, A).await.unwrap();
    assert_eq!(handle.state(A), CircuitState::Closed);
}

/// A circuit tripped by one failure, opened 2 s and probed: the probe's head is good and its
/// stream breaks, mid-stream, when read.
async fn probe_with_broken_stream(
    half_open_successes: u32,
) -> (
    CircuitBreakerHandle,
    impl Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
    Response<Body>,
) {
    let mut p = bare();
    p.consecutive_failures = Some(1);
    p.half_open_successes = half_open_successes;
    let (inner, _) = provider(|n, _| {
        if n == 0 {
            Reply::Status(503)
        } else {
            Reply::BodyFails(interrupted)
        }
    });
    let layer = CircuitBreakerLayer::new(p).unwrap().without_jitter();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    roundtrip(&mut svc, A).await.unwrap();
    sleep(Duration::from_secs(2)).await;
    let probe = send(&mut svc, A).await.unwrap();
    (handle, svc, probe)
}

#[tokio::test(start_paused = true)]
async fn a_probe_whose_stream_breaks_after_closing_counts_as_a_fresh_failure() {
    let (handle, _svc, probe) = probe_with_broken_stream(1).await;
    // The probe's head closed the circuit at once...
    assert_eq!(handle.state(A), CircuitState::Closed);
    assert!(probe.into_body().collect().await.is_err());
    // ...and its broken stream is a failure of the new closed period.
    assert_eq!(handle.state(A), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_probe_whose_stream_breaks_before_closing_reopens_the_circuit() {
    let (handle, mut svc, probe) = probe_with_broken_stream(2).await;
    // One good head of the two needed: still half-open...
    assert_eq!(handle.state(A), CircuitState::HalfOpen);
    assert!(probe.into_body().collect().await.is_err());
    // ...and the broken stream is a failed probe: open again, for the second trip's 4 s.
    assert_eq!(handle.state(A), CircuitState::Open);
    let e = send(&mut svc, A).await.unwrap_err();
    assert_eq!(retry_in(&e), Some(Duration::from_secs(4)));
}

/// A health store that grants every slot there is at each exchange, as a buggy one might.
struct GrantsEverything(AtomicUsize);

impl fleet::HealthStore for GrantsEverything {
    fn exchange(
        &self,
        _: &RouteName,
        _: u64,
        _: fleet::HealthReport,
        _: &fleet::FleetRules,
    ) -> crate::store::StoreFuture<Result<fleet::FleetHealth, String>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        let view = fleet::FleetHealth::new(fleet::FleetState::HalfOpen, u32::MAX);
        crate::store::StoreFuture::ready(Ok(view))
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_that_grants_too_many_slots_does_not_stop_the_exchange() {
    let store = Arc::new(GrantsEverything(AtomicUsize::new(0)));
    let layer = CircuitBreakerLayer::new(bare())
        .unwrap()
        .health_store(store.clone(), crate::policy::StoreMode::Local)
        .unwrap();
    let (inner, _) = provider(|_, _| Reply::Status(200));
    let mut svc = layer.layer(inner);
    assert_eq!(roundtrip(&mut svc, A).await.unwrap(), 200);
    // One exchange at once and ten a second after: the slots saturate instead of overflowing
    // the task away.
    sleep(Duration::from_millis(1_050)).await;
    assert_eq!(store.0.load(Ordering::Relaxed), 11);
    assert_eq!(roundtrip(&mut svc, A).await.unwrap(), 200);
}

#[test]
fn the_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<CircuitBreakerLayer>();
    send_sync::<CircuitBreakerHandle>();
    send_sync::<
        CircuitBreaker<tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, BoxError>>,
    >();
    send::<ResponseFuture<Fut>>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_outcomes_are_all_counted() {
    let mut p = bare();
    p.failure_rate = Some(rate(0.99, 1_000_000));
    let (inner, _) = provider(|n, _| Reply::Status(if n % 4 == 0 { 500 } else { 200 }));
    let layer = CircuitBreakerLayer::new(p).unwrap();
    let handle = layer.handle();
    let svc = layer.layer(inner);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for _ in 0..500 {
                    roundtrip(&mut svc, A).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Well within one 5 s bucket: no lost or doubled increments.
    let s = handle.snapshot(A).unwrap();
    assert_eq!((s.calls, s.failures), (4000, 1000));
}
