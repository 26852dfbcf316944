//! The throttle through the layer, under paused time: exact probabilities, the floor, the
//! sliding window, seeded decisions; and the half-open rule and the "circuit opened" mark that
//! came with it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::sleep;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::{CircuitBreakerLayer, CircuitState, ThrottleSnapshot};
use crate::attempt_log::{AttemptLog, LocalEventKind};
use crate::backoff::JitterSource;
use crate::context::FallbackAvailable;
use crate::error::{BoxError, Error, ErrorKind};
use crate::policy::{CircuitBreakerPolicy, ThrottlePolicy};
use crate::{Body, RouteName};

const A: &str = "a.example";
const SEED: u64 = 7;

type Fut = std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// A provider answering the status the script gives for call `n`; while `hang` is set it never
/// answers. The counter is its request record.
fn provider(
    script: impl Fn(usize) -> u16 + Send + Sync + 'static,
    hang: Arc<AtomicBool>,
) -> (
    impl Service<Request<Full<Bytes>>, Response = Response<Body>, Error = BoxError, Future = Fut>
    + Clone,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let script = Arc::new(script);
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let status = script(n);
        let hang = hang.load(Ordering::SeqCst);
        let fut: Fut = Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            let mut r = Response::new(Body::from("{}"));
            *r.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Ok(r)
        });
        fut
    });
    (svc, calls)
}

fn req(backup: bool) -> Request<Full<Bytes>> {
    let mut r = Request::post(format!("http://{A}/v1/chat/completions"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap_or_default();
    if backup {
        r.extensions_mut().insert(FallbackAvailable);
    }
    r
}

/// No tripping rules: only the throttle acts (a 10 s window of 10 buckets, floor `floor`).
fn throttled(floor: u32) -> CircuitBreakerPolicy {
    CircuitBreakerPolicy {
        failure_rate: None,
        consecutive_failures: None,
        slow_call: None,
        throttle: Some(ThrottlePolicy {
            k: 2.0,
            window: Duration::from_secs(10),
            buckets: 10,
            min_requests: floor,
            ..ThrottlePolicy::default()
        }),
        ..CircuitBreakerPolicy::default()
    }
}

async fn roundtrip<S>(svc: &mut S, r: Request<Full<Bytes>>) -> Result<u16, Error>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
{
    let resp = svc.ready().await?.call(r).await?;
    let s = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(s)
}

/// Polls a call once: `Some(result)` if it resolved at once (a refusal), `None` if it is in
/// flight (let through, to a provider that hangs). The call is then dropped: abandoned calls
/// count for nothing.
async fn decide<S>(svc: &mut S, r: Request<Full<Bytes>>) -> Option<Result<Response<Body>, Error>>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
{
    let ready = svc.ready().await.ok()?;
    let mut call = Box::pin(ready.call(r));
    match call
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_route_with_no_backup_is_throttled_with_the_sre_probability_and_a_typed_refusal() {
    let hang = Arc::new(AtomicBool::new(false));
    // 25 answers, then 503s.
    let (inner, calls) = provider(|n| if n < 25 { 200 } else { 503 }, hang.clone());
    let layer = CircuitBreakerLayer::new(throttled(1))
        .unwrap()
        .throttle_source(JitterSource::seeded(SEED));
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    // 100 calls that have a backup (never throttled) fill the window: 100 requests, 25 accepts.
    for _ in 0..100 {
        roundtrip(&mut svc, req(true)).await.unwrap();
    }
    let p = 50.0 / 101.0;
    assert_eq!(handle.throttle_probability(A), Some(p));
    let throttle = handle.snapshot(A).and_then(|s| s.throttle);
    assert_eq!(
        throttle,
        Some(ThrottleSnapshot {
            requests: 100,
            accepts: 25,
            refusing_for: Some(Duration::ZERO),
        })
    );

    // Forty calls without a backup, to a provider that now hangs: each is turned away exactly
    // when the seeded draw falls below 50/101, and neither kind changes the counts.
    hang.store(true, Ordering::SeqCst);
    let twin = JitterSource::seeded(SEED);
    let (mut refused, mut let_through) = (0, 0);
    for i in 0..40 {
        let log = AttemptLog::new();
        let mut r = req(false);
        r.extensions_mut().insert(log.clone());
        let before = calls.load(Ordering::SeqCst);
        let out = decide(&mut svc, r).await;
        if twin.unit() < p {
            refused += 1;
            let e = out.and_then(Result::err).unwrap();
            // At t = 0 the window (buckets of 1 s) next moves on in exactly 1 s.
            let retry_in = Duration::from_secs(1);
            assert_eq!(
                e.kind(),
                &ErrorKind::Throttled {
                    route: RouteName::new(A),
                    retry_in
                },
                "call {i}"
            );
            assert_eq!(calls.load(Ordering::SeqCst), before, "no call made");
            assert_eq!(log.attempt_count(), 0);
            let events = log.events();
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].kind, LocalEventKind::Throttled { retry_in });
            assert_eq!(events[0].route, Some(RouteName::new(A)));
            assert!(e.attempt_log().is_some_and(|l| l.ptr_eq(&log)));
        } else {
            let_through += 1;
            assert!(out.is_none(), "call {i} was let through");
            assert_eq!(calls.load(Ordering::SeqCst), before + 1);
        }
    }
    assert!(refused > 0 && let_through > 0, "{refused} / {let_through}");
    assert_eq!(handle.throttle_probability(A), Some(p));
}

#[tokio::test(start_paused = true)]
async fn the_floor_lets_calls_through_and_the_window_slides_them_out() {
    let (inner, calls) = provider(|_| 503, Arc::default());
    let mut policy = throttled(3);
    if let Some(t) = policy.throttle.as_mut() {
        // 1 s in 10 buckets of 100 ms.
        t.window = Duration::from_secs(1);
    }
    let layer = CircuitBreakerLayer::new(policy)
        .unwrap()
        .throttle_source(JitterSource::seeded(SEED));
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    // A route that is down: the first three calls go through whatever the formula says.
    for n in 1..=3 {
        assert_eq!(roundtrip(&mut svc, req(false)).await.ok(), Some(503));
        assert_eq!(calls.load(Ordering::SeqCst), n);
    }
    assert_eq!(handle.throttle_probability(A), Some(3.0 / 4.0));
    // Then the seeded draws decide, until the window has let 30 calls through.
    let twin = JitterSource::seeded(SEED);
    sleep(Duration::from_millis(250)).await;
    for _ in 0..200 {
        let c = handle.snapshot(A).and_then(|s| s.throttle).unwrap();
        let p = c.requests as f64 / (c.requests as f64 + 1.0);
        let out = roundtrip(&mut svc, req(false)).await;
        if twin.unit() < p {
            // 250 ms into the run: the next bucket starts 50 ms later.
            assert!(matches!(
                out,
                Err(ref e) if matches!(
                    e.kind(),
                    ErrorKind::Throttled { retry_in, .. } if *retry_in == Duration::from_millis(50)
                )
            ));
        } else {
            assert_eq!(out.ok(), Some(503));
        }
    }
    let sent = calls.load(Ordering::SeqCst);
    assert_eq!(
        handle.snapshot(A).and_then(|s| s.throttle),
        Some(ThrottleSnapshot {
            requests: sent as u32,
            accepts: 0,
            // Refusing since the first call, 250 ms ago.
            refusing_for: Some(Duration::from_millis(250)),
        })
    );
    // Nearly all shed: p = n / (n + 1) after n failures.
    assert!(sent < 30, "{sent} calls reached a route that is down");
    // 1 s after the first failures they have aged out (0..100 ms is gone at 1 s) while the
    // later ones (at 250 ms) stay until 1.3 s; then the window is empty and nothing is refused.
    sleep(Duration::from_millis(750)).await;
    let c = handle.snapshot(A).and_then(|s| s.throttle).unwrap();
    assert_eq!(c.requests as usize, sent - 3);
    sleep(Duration::from_millis(300)).await;
    // The window is empty; the route is still refusing, since its first call 1.3 s ago.
    assert_eq!(
        handle.snapshot(A).and_then(|s| s.throttle),
        Some(ThrottleSnapshot {
            refusing_for: Some(Duration::from_millis(1300)),
            ..ThrottleSnapshot::default()
        })
    );
    assert_eq!(handle.throttle_probability(A), Some(0.0));
    assert_eq!(roundtrip(&mut svc, req(false)).await.ok(), Some(503));
}

/// The decisions of one seeded run against a route that is down: `true` for a call that went
/// through.
async fn run(seed: u64) -> Vec<bool> {
    let (inner, _) = provider(|_| 503, Arc::default());
    let mut svc = CircuitBreakerLayer::new(throttled(2))
        .unwrap()
        .throttle_source(JitterSource::seeded(seed))
        .layer(inner);
    let mut out = Vec::new();
    for _ in 0..100 {
        out.push(roundtrip(&mut svc, req(false)).await.is_ok());
        sleep(Duration::from_millis(10)).await;
    }
    out
}

#[tokio::test(start_paused = true)]
async fn seeded_decisions_are_reproducible() {
    let a = run(SEED).await;
    assert_eq!(a, run(SEED).await);
    assert_ne!(a, run(SEED + 1).await);
    // The floor's two calls, then mostly refusals.
    assert!(a[..2].iter().all(|through| *through));
    assert!(a.iter().filter(|through| **through).count() < 20);
}

#[tokio::test(start_paused = true)]
async fn with_a_backup_the_circuit_fails_fast_without_one_the_throttle_decides() {
    let (inner, calls) = provider(|_| 503, Arc::default());
    let mut policy = throttled(1);
    policy.consecutive_failures = Some(3);
    let layer = CircuitBreakerLayer::new(policy)
        .unwrap()
        .throttle_source(JitterSource::seeded(SEED));
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..3 {
        assert_eq!(roundtrip(&mut svc, req(true)).await.ok(), Some(503));
    }
    assert_eq!(handle.state(A), CircuitState::Open);
    // A request with a backup is refused by the open circuit, without a call.
    let e = roundtrip(&mut svc, req(true)).await.unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::CircuitOpen { .. }), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Without one, the throttle decides; a call it lets through reaches the provider while
    // the circuit is open, and counts for the throttle only.
    let twin = JitterSource::seeded(SEED);
    let mut through = 0;
    for _ in 0..20 {
        let c = handle.snapshot(A).and_then(|s| s.throttle).unwrap();
        let p = (c.requests as f64 - 2.0 * c.accepts as f64) / (c.requests as f64 + 1.0);
        match roundtrip(&mut svc, req(false)).await {
            Ok(s) => {
                assert_eq!(s, 503);
                assert!(twin.unit() >= p);
                through += 1;
            }
            Err(e) => {
                assert!(matches!(e.kind(), ErrorKind::Throttled { .. }), "{e}");
                assert!(twin.unit() < p);
            }
        }
    }
    assert!(through > 0);
    assert_eq!(calls.load(Ordering::SeqCst), 3 + through);
    let s = handle.snapshot(A).unwrap();
    assert_eq!(s.state, CircuitState::Open);
    assert_eq!(s.consecutive_failures, 3, "the breaker did not count them");
    assert_eq!(s.throttle.map(|t| t.requests), Some(3 + through as u32));
}

#[tokio::test(start_paused = true)]
async fn rate_limits_are_refusals_for_the_throttle_and_neutral_for_the_breaker() {
    let (inner, calls) = provider(|_| 429, Arc::default());
    let mut policy = throttled(100);
    policy.consecutive_failures = Some(2);
    let layer = CircuitBreakerLayer::new(policy).unwrap();
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    for _ in 0..10 {
        assert_eq!(roundtrip(&mut svc, req(false)).await.ok(), Some(429));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    let s = handle.snapshot(A).unwrap();
    assert_eq!((s.state, s.consecutive_failures), (CircuitState::Closed, 0));
    assert_eq!(
        s.throttle,
        Some(ThrottleSnapshot {
            requests: 10,
            accepts: 0,
            refusing_for: Some(Duration::ZERO),
        })
    );
}

#[tokio::test(start_paused = true)]
async fn the_handle_forces_requests_without_a_backup_too() {
    let (inner, calls) = provider(|_| 503, Arc::default());
    let layer = CircuitBreakerLayer::new(throttled(1))
        .unwrap()
        .throttle_source(JitterSource::seeded(SEED));
    let handle = layer.handle();
    let mut svc = layer.layer(inner);
    handle.force_open(A);
    let e = roundtrip(&mut svc, req(false)).await.unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::CircuitOpen { .. }), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // Forced closed: every call goes through and nothing is counted, throttle included.
    handle.force_closed(A);
    for _ in 0..20 {
        assert_eq!(roundtrip(&mut svc, req(false)).await.ok(), Some(503));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 20);
    assert_eq!(
        handle.snapshot(A).and_then(|s| s.throttle),
        Some(ThrottleSnapshot::default())
    );
}

#[tokio::test(start_paused = true)]
async fn a_half_open_circuit_closes_after_its_good_probes_in_a_row() {
    // 503, then 200 200 503, then 200 200 200.
    let statuses = [503, 200, 200, 503, 200, 200, 200];
    let (inner, _) = provider(
        move |n| statuses.get(n).copied().unwrap_or(200),
        Arc::default(),
    );
    let policy = CircuitBreakerPolicy {
        failure_rate: None,
        consecutive_failures: Some(1),
        open_base: Duration::from_secs(1),
        open_cap: Duration::from_secs(1),
        half_open_successes: 3,
        ..CircuitBreakerPolicy::default()
    };
    let layer = CircuitBreakerLayer::new(policy).unwrap().without_jitter();
    let handle = layer.handle();
    let seen: Arc<Mutex<Vec<CircuitState>>> = Arc::default();
    let s = seen.clone();
    handle.on_transition(move |_, _, to| s.lock().unwrap_or_else(|p| p.into_inner()).push(to));
    let mut svc = layer.layer(inner);
    roundtrip(&mut svc, req(true)).await.unwrap();
    assert_eq!(handle.state(A), CircuitState::Open);
    sleep(Duration::from_secs(1)).await;
    // Two good probes leave it half-open; the failed third opens it again.
    for _ in 0..2 {
        assert_eq!(roundtrip(&mut svc, req(true)).await.ok(), Some(200));
        assert_eq!(handle.state(A), CircuitState::HalfOpen);
    }
    assert_eq!(roundtrip(&mut svc, req(true)).await.ok(), Some(503));
    assert_eq!(handle.state(A), CircuitState::Open);
    sleep(Duration::from_secs(1)).await;
    // The count starts again: three in a row close it.
    for want in [
        CircuitState::HalfOpen,
        CircuitState::HalfOpen,
        CircuitState::Closed,
    ] {
        assert_eq!(roundtrip(&mut svc, req(true)).await.ok(), Some(200));
        assert_eq!(handle.state(A), want);
    }
    assert_eq!(
        *seen.lock().unwrap_or_else(|p| p.into_inner()),
        [
            CircuitState::Open,
            CircuitState::HalfOpen,
            CircuitState::Open,
            CircuitState::HalfOpen,
            CircuitState::Closed
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn the_answer_that_opens_the_circuit_says_so() {
    let (inner, _) = provider(|_| 503, Arc::default());
    let policy = CircuitBreakerPolicy {
        failure_rate: None,
        consecutive_failures: Some(2),
        ..CircuitBreakerPolicy::default()
    };
    let mut svc = CircuitBreakerLayer::new(policy).unwrap().layer(inner);
    let first = svc.ready().await.unwrap().call(req(true)).await.unwrap();
    assert!(!super::opened_circuit(&first), "still closed");
    let second = svc.ready().await.unwrap().call(req(true)).await.unwrap();
    assert_eq!(second.status(), 503);
    assert!(super::opened_circuit(&second), "this one tripped it");
}
