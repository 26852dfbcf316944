//! The layer over `tower::service_fn` services, under paused time.

// Policies are built the way users outside the crate must build them (the sections are
// `#[non_exhaustive]`): from `Default`, then field by field.
#![allow(clippy::field_reassign_with_default)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Service, ServiceExt, service_fn};
use tower_layer::Layer;

use super::*;
use crate::attempt_log::{LocalEventKind, Outcome, Usage};
use crate::policy::{
    AdmissionMode, BudgetPolicy, ChargeRule, Policy, Price, RateLimitPolicy, RetryBudgetPolicy,
    RouteConfig, SpendPolicy,
};
use crate::test_support::{last_decision, response_log as log_of};
use crate::{Error, ErrorKind, RouteName};

type Req = http::Request<Full<Bytes>>;
type Resp = http::Response<Full<Bytes>>;
/// When each request started, by name.
type Started = Arc<Mutex<Vec<(String, Instant)>>>;

/// A chat request to `host` whose prompt estimate is 2 tokens ("user" + "abcd" = 8 bytes).
fn chat(host: &str, max_tokens: u64) -> Req {
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"abcd"}}],"max_tokens":{max_tokens}}}"#
    );
    http::Request::post(format!("http://{host}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn answer(usage: Option<(u64, u64)>) -> Resp {
    let body = match usage {
        Some((i, o)) => format!(
            r#"{{"choices":[{{"message":{{"content":"ok"}}}}],"usage":{{"prompt_tokens":{i},"completion_tokens":{o}}}}}"#
        ),
        None => r#"{"choices":[]}"#.to_owned(),
    };
    http::Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn layer(policy: BudgetPolicy) -> BudgetLayer {
    BudgetLayer::new(policy).unwrap_or_else(|e| panic!("{e}"))
}

fn spend_policy(cap: f64, price: Price) -> SpendPolicy {
    let mut s = SpendPolicy::default();
    s.cap = cap;
    s.default_price = Some(price);
    s.default_owner = Some("team".to_owned());
    s
}

fn rate(rps: Option<f64>, burst: u32, tpm: Option<u64>) -> RateLimitPolicy {
    let mut r = RateLimitPolicy::default();
    r.requests_per_second = rps;
    r.burst = burst;
    r.tokens_per_minute = tpm;
    r
}

fn kind(r: &Result<http::Response<crate::Body>, Error>) -> Option<ErrorKind> {
    r.as_ref().err().map(|e| e.kind().clone())
}

fn events(e: &Error) -> Vec<LocalEventKind> {
    e.attempt_log()
        .map(|l| l.events().into_iter().map(|e| e.kind).collect())
        .unwrap_or_default()
}

/// Lets every spawned task run until it blocks (time is paused, so nothing else moves).
async fn settle_tasks() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn spend_cap_admits_exactly_its_capacity_under_1000_concurrent_requests() {
    // 1 unit per million output tokens; max_tokens 1000 reserves 1000 micro units; the cap of
    // 0.1 units holds exactly 100 reservations.
    let mut policy = BudgetPolicy::default();
    policy.spend = Some(spend_policy(0.1, Price::new(0.0, 1.0)));
    let layer = layer(policy);
    let spend = layer.spend().unwrap_or_else(|| panic!("spend handle"));
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let svc = layer.layer(service_fn({
        let (calls, gate) = (calls.clone(), gate.clone());
        move |_req: Req| {
            let (calls, gate) = (calls.clone(), gate.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let _permit = gate.acquire().await;
                // Real usage: half the output bound.
                Ok::<_, Infallible>(answer(Some((2, 500))))
            }
        }
    }));

    async fn wave(
        svc: &Budget<
            impl Service<Req, Response = Resp, Error = Infallible, Future: Send>
            + Clone
            + Send
            + 'static,
        >,
        gate: &Semaphore,
        calls: &AtomicUsize,
    ) -> (usize, usize) {
        calls.store(0, Ordering::SeqCst);
        let tasks: Vec<_> = (0..1000)
            .map(|_| tokio::spawn(svc.clone().oneshot(chat("api.example.com", 1000))))
            .collect();
        settle_tasks().await;
        let admitted = calls.load(Ordering::SeqCst);
        gate.add_permits(1000);
        let (mut ok, mut denied) = (0, 0);
        for t in tasks {
            match t.await.unwrap_or_else(|e| panic!("{e}")) {
                Ok(resp) => {
                    resp.into_body()
                        .collect()
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                    ok += 1;
                }
                Err(e) => {
                    assert!(matches!(
                        e.kind(),
                        ErrorKind::BudgetExhausted { owner: Some(o) } if o == "team"
                    ));
                    assert_eq!(events(&e), [LocalEventKind::BudgetDenied]);
                    denied += 1;
                }
            }
        }
        gate.forget_permits(1000);
        assert_eq!(ok, admitted);
        (ok, denied)
    }

    assert_eq!(wave(&svc, &gate, &calls).await, (100, 900));
    // Each settled at 500 of its 1000 reserved: half the cap is booked, nothing is reserved.
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(50_000, 0)
    );
    assert_eq!(spend.remaining_micros("team").await.expect("store"), 50_000);
    // The released halves admit exactly 50 more.
    assert_eq!(wave(&svc, &gate, &calls).await, (50, 950));
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(75_000, 0)
    );
    // Another owner has its own cap and is unaffected.
    assert_eq!(
        spend.status("other").await.expect("store"),
        SpendStatus::new(0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn settlement_follows_usage_and_the_charge_rule() {
    let mut policy = BudgetPolicy::default();
    let mut s = spend_policy(1.0, Price::new(1.0, 1.0));
    s.charge_failed = ChargeRule::ReportedOrReserved;
    policy.spend = Some(s);
    let layer = layer(policy);
    let spend = layer.spend().unwrap_or_else(|| panic!("spend handle"));
    let replies = Arc::new(Mutex::new(vec![
        answer(Some((2, 10))),
        answer(None),
        answer(Some((2, 10))),
        http::Response::builder()
            .status(503)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                r#"{"error":{"code":"server_is_overloaded"}}"#,
            )))
            .unwrap_or_else(|e| panic!("{e}")),
    ]));
    let mut svc = layer.layer(service_fn(move |_req: Req| {
        let r = replies.lock().unwrap_or_else(|p| p.into_inner()).remove(0);
        async move { Ok::<_, Infallible>(r) }
    }));
    // Estimate: 6 prompt (2 for the text, 4 for its message) + 94 output tokens = 100 micro
    // units reserved.
    let call = |svc: &mut Budget<_>| {
        let fut = svc.call(chat("api.example.com", 94));
        async move { fut.await.unwrap_or_else(|e: Error| panic!("{e}")) }
    };

    // Usage in the body: charged 12, the other 88 released.
    let resp = call(
        ServiceExt::<Req>::ready(&mut svc)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    let receipt = resp
        .extensions()
        .get::<SpendReceipt>()
        .cloned()
        .unwrap_or_else(|| panic!("receipt"));
    assert_eq!(receipt.reserved_micros(), 100);
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(0, 100)
    );
    resp.into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(receipt.charged_micros(), Some(12));
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(12, 0)
    );

    // A success without usage keeps its reservation, until the application reports usage.
    let resp = call(
        ServiceExt::<Req>::ready(&mut svc)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    let receipt = resp
        .extensions()
        .get::<SpendReceipt>()
        .cloned()
        .unwrap_or_else(|| panic!("receipt"));
    resp.into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(112, 0)
    );
    receipt.report(Usage::new(5, 5));
    assert_eq!(receipt.charged_micros(), Some(10));
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(22, 0)
    );

    // A success dropped before its end (possibly generated in full) keeps its reservation.
    let resp = call(
        ServiceExt::<Req>::ready(&mut svc)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    drop(resp);
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(122, 0)
    );

    // A provider failure response costs nothing under this rule.
    let resp = call(
        ServiceExt::<Req>::ready(&mut svc)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    assert_eq!(resp.status(), 503);
    drop(resp);
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(122, 0)
    );

    // Usage the application books outside any request.
    assert_eq!(spend.report("team", "any", Usage::new(3, 0)), Some(3));
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(125, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_without_owner_or_price_fails_closed() {
    let mut policy = BudgetPolicy::default();
    let mut s = SpendPolicy::default();
    s.cap = 1.0;
    s.prices
        .insert("priced.example".to_owned(), Price::new(1.0, 1.0));
    policy.spend = Some(s);
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer(policy).layer(service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(answer(None)) }
        }
    }));
    let r = svc.clone().oneshot(chat("priced.example", 10)).await;
    assert_eq!(kind(&r), Some(ErrorKind::BudgetExhausted { owner: None }));
    let mut req = chat("unpriced.example", 10);
    req.extensions_mut().insert(BudgetOwner::new("a"));
    let r = svc.clone().oneshot(req).await;
    assert_eq!(
        kind(&r),
        Some(ErrorKind::BudgetExhausted {
            owner: Some("a".to_owned())
        })
    );
    let mut req = chat("priced.example", 10);
    req.headers_mut()
        .insert("x-llm-budget-owner", http::HeaderValue::from_static("b"));
    assert!(svc.clone().oneshot(req).await.is_ok());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A service that records when each request (named by its `x-i` header) started.
fn recorder() -> (
    Started,
    impl Service<Req, Response = Resp, Error = Infallible, Future: Send> + Clone + Send + 'static,
) {
    let started = Arc::new(Mutex::new(Vec::new()));
    let svc = service_fn({
        let started = started.clone();
        move |req: Req| {
            let name = req
                .headers()
                .get("x-i")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((name, Instant::now()));
            async { Ok::<_, Infallible>(answer(None)) }
        }
    });
    (started, svc)
}

fn named(mut req: Req, i: usize) -> Req {
    req.headers_mut().insert(
        "x-i",
        http::HeaderValue::from_str(&i.to_string()).unwrap_or_else(|e| panic!("{e}")),
    );
    req
}

fn queue(max_wait: Duration, max_queued: u32) -> AdmissionMode {
    AdmissionMode::Queue {
        max_wait,
        max_queued,
    }
}

#[tokio::test(start_paused = true)]
async fn queue_admits_in_arrival_order() {
    let mut policy = BudgetPolicy::default();
    policy.rate_limit = Some(rate(Some(1.0), 1, None));
    policy.admission = queue(Duration::from_secs(60), 10);
    let (started, inner) = recorder();
    let svc = layer(policy).layer(inner);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..5 {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(named(chat("api.example.com", 10), i)),
        ));
        settle_tasks().await;
    }
    let mut waits = Vec::new();
    for t in tasks {
        let resp = t
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let log = resp
            .extensions()
            .get::<crate::AttemptLog>()
            .cloned()
            .unwrap_or_else(|| panic!("log"));
        waits.push(log.events().into_iter().find_map(|e| match e.kind {
            LocalEventKind::Queued { waited } => Some(waited),
            _ => None,
        }));
    }
    let started = started.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let order: Vec<&str> = started.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(order, ["0", "1", "2", "3", "4"]);
    let at: Vec<Duration> = started.iter().map(|(_, t)| *t - t0).collect();
    let secs = |n| Duration::from_secs(n);
    assert_eq!(at, [secs(0), secs(1), secs(2), secs(3), secs(4)]);
    assert_eq!(
        waits,
        [
            None,
            Some(secs(1)),
            Some(secs(2)),
            Some(secs(3)),
            Some(secs(4))
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn queue_never_waits_past_max_wait() {
    let mut policy = BudgetPolicy::default();
    policy.rate_limit = Some(rate(Some(1.0), 1, None));
    policy.admission = queue(Duration::from_millis(1500), 10);
    let (started, inner) = recorder();
    let svc = layer(policy).layer(inner);
    let t0 = Instant::now();
    let first = svc.clone().oneshot(named(chat("h", 1), 0)).await;
    assert!(first.is_ok());
    let second = tokio::spawn(svc.clone().oneshot(named(chat("h", 1), 1)));
    settle_tasks().await;
    let third = tokio::spawn(svc.clone().oneshot(named(chat("h", 1), 2)));
    let (second, third) = (second.await, third.await);
    let third = third.unwrap_or_else(|e| panic!("{e}"));
    assert!(second.unwrap_or_else(|e| panic!("{e}")).is_ok());
    // At 1 s the third is first in line and would need until 2 s: past its 1.5 s, so it is
    // refused at once, with the exact time until capacity.
    assert_eq!(Instant::now() - t0, Duration::from_secs(1));
    assert_eq!(
        kind(&third),
        Some(ErrorKind::RateLimited {
            retry_in: Duration::from_secs(1)
        })
    );
    let third = third.err().unwrap_or_else(|| panic!("refused"));
    assert_eq!(
        events(&third),
        [
            LocalEventKind::Queued {
                waited: Duration::from_secs(1)
            },
            LocalEventKind::RateLimited {
                retry_in: Duration::from_secs(1)
            }
        ]
    );
    assert_eq!(started.lock().unwrap_or_else(|p| p.into_inner()).len(), 2);

    // A wait that fits within max_wait queues.
    let r = svc.clone().oneshot(chat("h", 1)).await;
    assert!(r.is_ok());
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_wait_known_to_exceed_max_wait_is_refused_at_once() {
    let mut policy = BudgetPolicy::default();
    policy.rate_limit = Some(rate(Some(0.25), 1, None));
    policy.admission = queue(Duration::from_millis(1500), 10);
    let (started, inner) = recorder();
    let svc = layer(policy).layer(inner);
    let t0 = Instant::now();
    assert!(svc.clone().oneshot(chat("h", 1)).await.is_ok());
    let r = svc.clone().oneshot(chat("h", 1)).await;
    assert_eq!(Instant::now(), t0);
    let retry_in = Duration::from_secs(4);
    assert_eq!(kind(&r), Some(ErrorKind::RateLimited { retry_in }));
    let e = r.err().unwrap_or_else(|| panic!("refused"));
    assert_eq!(events(&e), [LocalEventKind::RateLimited { retry_in }]);
    assert_eq!(started.lock().unwrap_or_else(|p| p.into_inner()).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn queue_wait_respects_the_request_deadline() {
    let mut policy = BudgetPolicy::default();
    policy.rate_limit = Some(rate(Some(0.5), 1, None));
    policy.admission = queue(Duration::from_secs(60), 10);
    let (started, inner) = recorder();
    let svc = layer(policy).layer(inner);
    let t0 = Instant::now();
    assert!(svc.clone().oneshot(chat("h", 1)).await.is_ok());
    let head = tokio::spawn(svc.clone().oneshot(named(chat("h", 1), 1)));
    settle_tasks().await;
    let mut req = named(chat("h", 1), 2);
    Deadline::after(Duration::from_millis(500)).tighten(&mut req);
    let r = svc.clone().oneshot(req).await;
    assert_eq!(kind(&r), Some(ErrorKind::DeadlineExceeded));
    assert_eq!(Instant::now() - t0, Duration::from_millis(500));
    assert!(head.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    assert_eq!(started.lock().unwrap_or_else(|p| p.into_inner()).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn full_queue_rejects_and_a_dropped_waiter_frees_its_place() {
    let mut policy = BudgetPolicy::default();
    policy.rate_limit = Some(rate(Some(1.0), 1, None));
    policy.admission = queue(Duration::from_secs(60), 1);
    let (started, inner) = recorder();
    let mut svc = layer(policy).layer(inner);
    let t0 = Instant::now();
    assert!(svc.clone().oneshot(named(chat("h", 1), 0)).await.is_ok());
    // The second waits in line (its future is never polled: `call` queued it).
    ServiceExt::<Req>::ready(&mut svc)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let waiting = svc.call(named(chat("h", 1), 1));
    // The line is full.
    let r = svc.clone().oneshot(named(chat("h", 1), 2)).await;
    assert_eq!(
        kind(&r),
        Some(ErrorKind::RateLimited {
            retry_in: Duration::from_secs(1)
        })
    );
    // The caller gives up: its place is free at once, and the next one is first in line.
    drop(waiting);
    let r = svc.clone().oneshot(named(chat("h", 1), 3)).await;
    assert!(r.is_ok());
    assert_eq!(Instant::now() - t0, Duration::from_secs(1));
    let started = started.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let order: Vec<&str> = started.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(order, ["0", "3"]);
}

/// One request a second per owner, queued for up to a minute.
fn per_owner_queue() -> BudgetPolicy {
    let mut policy = BudgetPolicy::default();
    let mut limit = rate(Some(1.0), 1, None);
    limit.key = crate::policy::RateKey::Owner;
    policy.rate_limit = Some(limit);
    policy.admission = queue(Duration::from_secs(60), 10);
    policy
}

fn owned(mut req: Req, owner: &str) -> Req {
    req.extensions_mut().insert(BudgetOwner::new(owner));
    req
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_its_turn_holds_none_of_the_inner_services_capacity() {
    let (started, inner) = recorder();
    // One call at a time: a service polled ready holds the only permit.
    let svc = layer(per_owner_queue()).layer(tower::limit::ConcurrencyLimit::new(inner, 1));
    let of = |owner: &str, i| owned(named(chat("h", 1), i), owner);
    let t0 = Instant::now();
    assert!(svc.clone().oneshot(of("a", 0)).await.is_ok());
    // Owner a's next request waits a second for its bucket...
    let waiting = tokio::spawn(svc.clone().oneshot(of("a", 1)));
    settle_tasks().await;
    // ...while owner b, whose bucket is full, is served at once.
    assert!(svc.clone().oneshot(of("b", 2)).await.is_ok());
    assert_eq!(Instant::now() - t0, Duration::ZERO);
    assert!(waiting.await.unwrap_or_else(|e| panic!("{e}")).is_ok());
    let started = started.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let at: Vec<(&str, Duration)> = started.iter().map(|(n, t)| (n.as_str(), *t - t0)).collect();
    assert_eq!(
        at,
        [
            ("0", Duration::ZERO),
            ("2", Duration::ZERO),
            ("1", Duration::from_secs(1))
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_admitted_request_waits_for_the_inner_service_within_its_deadline() {
    let mut policy = per_owner_queue();
    policy.deadline = Some(Duration::from_secs(3));
    let started = Arc::new(AtomicUsize::new(0));
    // Owner b's call takes ten seconds and holds the only permit throughout.
    let inner = service_fn({
        let started = started.clone();
        move |req: Req| {
            started.fetch_add(1, Ordering::SeqCst);
            let slow = req.extensions().get::<BudgetOwner>().map(|o| o.as_str()) == Some("b");
            async move {
                if slow {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
                Ok::<_, Infallible>(answer(None))
            }
        }
    });
    let svc = layer(policy).layer(tower::limit::ConcurrencyLimit::new(inner, 1));
    let of = |owner: &str| owned(chat("h", 1), owner);
    let t0 = Instant::now();
    assert!(svc.clone().oneshot(of("a")).await.is_ok());
    let mut req = of("a");
    Deadline::after(Duration::from_secs(2)).tighten(&mut req);
    let waiting = tokio::spawn(svc.clone().oneshot(req));
    settle_tasks().await;
    let slow = tokio::spawn(svc.clone().oneshot(of("b")));
    settle_tasks().await;
    // Admitted at 1 s, owner a's request finds no permit, and its deadline ends the wait.
    let r = waiting.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kind(&r), Some(ErrorKind::DeadlineExceeded));
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    assert_eq!(started.load(Ordering::SeqCst), 2);
    let e = r.err().unwrap_or_else(|| panic!("an error"));
    assert!(events(&e).contains(&LocalEventKind::DeadlineExceeded));
    assert_eq!(e.attempt_log().map(|l| l.attempts().len()), Some(0));
    // The slow call is cut off by its own deadline.
    let r = slow.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(kind(&r), Some(ErrorKind::DeadlineExceeded));
    assert_eq!(Instant::now() - t0, Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn reject_mode_returns_the_exact_retry_in() {
    let mut policy = BudgetPolicy::default();
    policy.rate_limit = Some(rate(Some(2.0), 1, None));
    policy.admission = AdmissionMode::Reject;
    let (started, inner) = recorder();
    let svc = layer(policy).layer(inner);
    assert!(svc.clone().oneshot(chat("h", 1)).await.is_ok());
    tokio::time::advance(Duration::from_millis(200)).await;
    let r = svc.clone().oneshot(chat("h", 1)).await;
    let retry_in = Duration::from_millis(300);
    assert_eq!(kind(&r), Some(ErrorKind::RateLimited { retry_in }));
    let e = r.err().unwrap_or_else(|| panic!("rejected"));
    assert_eq!(events(&e), [LocalEventKind::RateLimited { retry_in }]);
    let outcome = e.attempt_log().and_then(|l| l.snapshot().outcome);
    assert!(matches!(outcome, Some(Outcome::Error { .. })));
    // Another route has its own bucket.
    assert!(svc.clone().oneshot(chat("other", 1)).await.is_ok());
    tokio::time::advance(retry_in).await;
    assert!(svc.clone().oneshot(chat("h", 1)).await.is_ok());
    assert_eq!(started.lock().unwrap_or_else(|p| p.into_inner()).len(), 3);
}

#[tokio::test(start_paused = true)]
async fn token_weighted_limit_admits_by_estimated_tokens() {
    let mut policy = BudgetPolicy::default();
    policy.rate_limit = Some(rate(None, 1, Some(6000)));
    let (started, inner) = recorder();
    let svc = layer(policy).layer(inner);
    // 6 prompt tokens each (2 for the text, 4 for its message): 3000 + 2000 of the 6000 per
    // minute.
    assert!(svc.clone().oneshot(chat("h", 2994)).await.is_ok());
    assert!(svc.clone().oneshot(chat("h", 1994)).await.is_ok());
    // 2000 more do not fit: 1000 are missing, at 100 per second.
    let r = svc.clone().oneshot(chat("h", 1994)).await;
    assert_eq!(
        kind(&r),
        Some(ErrorKind::RateLimited {
            retry_in: Duration::from_secs(10)
        })
    );
    // Yet ten small requests of 100 tokens each still fit, one more does not.
    for _ in 0..10 {
        assert!(svc.clone().oneshot(chat("h", 94)).await.is_ok());
    }
    let r = svc.clone().oneshot(chat("h", 94)).await;
    assert_eq!(
        kind(&r),
        Some(ErrorKind::RateLimited {
            retry_in: Duration::from_secs(1)
        })
    );
    assert_eq!(started.lock().unwrap_or_else(|p| p.into_inner()).len(), 12);
}

#[tokio::test(start_paused = true)]
async fn custom_estimators_replace_the_default() {
    let mut policy = BudgetPolicy::default();
    policy.rate_limit = Some(rate(None, 1, Some(60)));
    let (_, inner) = recorder();
    let svc = layer(policy)
        .estimator(|_: &http::HeaderMap, _: Option<&[u8]>| TokenEstimate::new(20, 10))
        .layer(inner);
    assert!(svc.clone().oneshot(chat("h", 1)).await.is_ok());
    assert!(svc.clone().oneshot(chat("h", 1)).await.is_ok());
    let r = svc.clone().oneshot(chat("h", 1)).await;
    assert_eq!(
        kind(&r),
        Some(ErrorKind::RateLimited {
            retry_in: Duration::from_secs(30)
        })
    );
}

/// Route `a.example` answers its first request with zero remaining requests, reset in 5 s.
fn paced_inner() -> (
    Started,
    impl Service<Req, Response = Resp, Error = Infallible, Future: Send> + Clone + Send + 'static,
) {
    let started = Arc::new(Mutex::new(Vec::new()));
    let svc = service_fn({
        let started = started.clone();
        move |req: Req| {
            let host = req.uri().host().unwrap_or("").to_owned();
            let mut s = started.lock().unwrap_or_else(|p| p.into_inner());
            let first = !s.iter().any(|(h, _)| *h == host);
            s.push((host.clone(), Instant::now()));
            let mut resp = answer(None);
            if first && host == "a.example" {
                let h = resp.headers_mut();
                h.insert(
                    "x-ratelimit-remaining-requests",
                    http::HeaderValue::from_static("0"),
                );
                h.insert(
                    "x-ratelimit-reset-requests",
                    http::HeaderValue::from_static("5s"),
                );
            }
            async { Ok::<_, Infallible>(resp) }
        }
    });
    (started, svc)
}

#[tokio::test(start_paused = true)]
async fn pacing_holds_the_route_until_its_reset() {
    let mut policy = BudgetPolicy::default();
    policy.pacing = true;
    policy.admission = queue(Duration::from_secs(60), 10);
    let (started, inner) = paced_inner();
    let svc = layer(policy).layer(inner);
    let t0 = Instant::now();
    assert!(svc.clone().oneshot(chat("a.example", 1)).await.is_ok());
    let paced = tokio::spawn(svc.clone().oneshot(chat("a.example", 1)));
    settle_tasks().await;
    // Another route is unaffected.
    assert!(svc.clone().oneshot(chat("b.example", 1)).await.is_ok());
    assert_eq!(Instant::now(), t0);
    let resp = paced
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let started = started.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let at: Vec<(&str, Duration)> = started.iter().map(|(h, t)| (h.as_str(), *t - t0)).collect();
    assert_eq!(
        at,
        [
            ("a.example", Duration::ZERO),
            ("b.example", Duration::ZERO),
            ("a.example", Duration::from_secs(5)),
        ]
    );
    let log = resp
        .extensions()
        .get::<crate::AttemptLog>()
        .cloned()
        .unwrap_or_else(|| panic!("log"));
    assert_eq!(
        log.events().into_iter().map(|e| e.kind).collect::<Vec<_>>(),
        [LocalEventKind::Queued {
            waited: Duration::from_secs(5)
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn pacing_rejects_in_reject_mode() {
    let mut policy = BudgetPolicy::default();
    policy.pacing = true;
    let (_, inner) = paced_inner();
    let svc = layer(policy).layer(inner);
    assert!(svc.clone().oneshot(chat("a.example", 1)).await.is_ok());
    tokio::time::advance(Duration::from_secs(2)).await;
    let r = svc.clone().oneshot(chat("a.example", 1)).await;
    assert_eq!(
        kind(&r),
        Some(ErrorKind::RateLimited {
            retry_in: Duration::from_secs(3)
        })
    );
    assert!(svc.clone().oneshot(chat("b.example", 1)).await.is_ok());
    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(svc.clone().oneshot(chat("a.example", 1)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn deadline_and_retry_budget_travel_in_the_request() {
    let mut policy = BudgetPolicy::default();
    policy.deadline = Some(Duration::from_secs(30));
    policy.retry_budget = RetryBudgetPolicy::Ratio {
        ratio: 0.5,
        min_per_sec: 0,
        ttl: Duration::from_secs(10),
    };
    let layer = layer(policy);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = layer.layer(service_fn({
        let seen = seen.clone();
        move |req: Req| {
            let ctx = crate::context::RequestContext::of(&req);
            let d = ctx.and_then(|c| c.deadline());
            let b = ctx.and_then(|c| c.retry_budget()).map(|b| b.available());
            seen.lock().unwrap_or_else(|p| p.into_inner()).push((d, b));
            async { Ok::<_, Infallible>(answer(None)) }
        }
    }));
    let t0 = Instant::now();
    assert!(svc.clone().oneshot(chat("h", 1)).await.is_ok());
    // A caller's earlier deadline is kept.
    let mut req = chat("h", 1);
    Deadline::after(Duration::from_secs(5)).tighten(&mut req);
    assert!(svc.clone().oneshot(req).await.is_ok());
    for _ in 0..8 {
        assert!(svc.clone().oneshot(chat("h", 1)).await.is_ok());
    }
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(seen[0].0, Some(Deadline(t0 + Duration::from_secs(30))));
    assert_eq!(seen[1].0, Some(Deadline(t0 + Duration::from_secs(5))));
    // One deposit per request: half a retry each.
    assert_eq!(seen[1].1, Some(1));
    assert_eq!(layer.retry_budget().available(), 5);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_cuts_off_a_request_still_in_flight() {
    let mut policy = BudgetPolicy::default();
    policy.deadline = Some(Duration::from_secs(30));
    let mut s = spend_policy(1.0, Price::new(1.0, 1.0));
    s.charge_failed = ChargeRule::ReportedOrReserved;
    policy.spend = Some(s);
    let layer = layer(policy);
    let spend = layer.spend().unwrap_or_else(|| panic!("spend"));
    let svc = layer.layer(service_fn(|_req: Req| async {
        std::future::pending::<()>().await;
        Ok::<_, Infallible>(answer(None))
    }));
    let t0 = Instant::now();
    let r = svc.oneshot(chat("h", 4)).await;
    assert_eq!(Instant::now() - t0, Duration::from_secs(30));
    assert_eq!(kind(&r), Some(ErrorKind::DeadlineExceeded));
    let e = r.err().unwrap_or_else(|| panic!("deadline"));
    assert_eq!(events(&e), [LocalEventKind::DeadlineExceeded]);
    // The cut-off request may have been accepted: it keeps its reservation.
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(10, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn the_log_records_the_attempt_and_the_outcome() {
    let (_, inner) = recorder();
    let svc = layer(BudgetPolicy::default()).layer(inner);
    let resp = svc
        .clone()
        .oneshot(chat("h", 1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = resp
        .extensions()
        .get::<crate::AttemptLog>()
        .cloned()
        .unwrap_or_else(|| panic!("log"));
    let snap = log.snapshot();
    assert_eq!(snap.attempts.len(), 1);
    assert_eq!(snap.attempts[0].route, Some(RouteName::new("h")));
    assert_eq!(snap.outcome, Some(Outcome::Success { status: 200 }));

    let failing = layer(BudgetPolicy::default()).layer(service_fn(|_req: Req| async {
        Err::<Resp, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ))
    }));
    let e = failing
        .oneshot(chat("h", 1))
        .await
        .err()
        .unwrap_or_else(|| panic!("error"));
    let snap = e
        .attempt_log()
        .map(|l| l.snapshot())
        .unwrap_or_else(|| panic!("log"));
    assert_eq!(snap.attempts.len(), 1);
    assert!(snap.attempts[0].error.is_some());
    assert!(matches!(snap.outcome, Some(Outcome::Error { .. })));
}

#[test]
fn invalid_policies_are_errors_not_panics() {
    let mut p = BudgetPolicy::default();
    p.rate_limit = Some(rate(Some(f64::NAN), 1, None));
    let e = BudgetLayer::new(p).err().map(|e| e.field().to_owned());
    assert_eq!(e.as_deref(), Some("budget.rate_limit.requests_per_second"));

    let mut p = BudgetPolicy::default();
    p.retry_budget = RetryBudgetPolicy::TokenBucket {
        capacity: 0,
        refill_per_sec: 1.0,
        per_request: 0.1,
    };
    let e = BudgetLayer::new(p).err().map(|e| e.field().to_owned());
    assert_eq!(e.as_deref(), Some("budget.retry_budget.capacity"));

    let mut p = BudgetPolicy::default();
    let mut s = spend_policy(1.0, Price::new(1.0, f64::INFINITY));
    s.default_owner = Some(" ".to_owned());
    p.spend = Some(s);
    let e = BudgetLayer::new(p).err().map(|e| e.field().to_owned());
    assert_eq!(e.as_deref(), Some("budget.spend.default_owner"));

    // Every route of the chain needs a price.
    let mut policy = Policy::interactive();
    policy.fallback.routes.push(RouteConfig::new("backup"));
    let mut s = SpendPolicy::default();
    s.cap = 1.0;
    s.prices.insert("primary".to_owned(), Price::new(1.0, 1.0));
    policy.budget.spend = Some(s);
    let e = BudgetLayer::from_policy(&policy)
        .err()
        .map(|e| e.field().to_owned());
    assert_eq!(e.as_deref(), Some("budget.spend.prices.backup"));
}

fn overloaded() -> Resp {
    http::Response::builder()
        .status(503)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            r#"{"error":{"code":"server_is_overloaded"}}"#,
        )))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A policy whose retry layer would make up to 10 attempts on a route, with a retry budget
/// of exactly `retries` retries or hops, and whose spend cap (1 micro unit per token; owner
/// `team`) holds `cap` micro units.
fn recovery_policy(cap: u64, rule: ChargeRule, retries: u32) -> Policy {
    let mut policy = Policy::interactive();
    policy.retry.max_attempts = 10;
    policy.retry.seed = Some(7);
    policy.budget.retry_budget = RetryBudgetPolicy::TokenBucket {
        capacity: retries.max(1),
        refill_per_sec: 0.0,
        per_request: 0.0,
    };
    if retries == 0 {
        policy.budget.retry_budget = RetryBudgetPolicy::Ratio {
            ratio: 0.0,
            min_per_sec: 0,
            ttl: Duration::from_secs(10),
        };
    }
    let mut s = spend_policy(cap as f64 / 1e6, Price::new(1.0, 1.0));
    s.charge_failed = rule;
    policy.budget.spend = Some(s);
    policy
}

/// Counts the calls that reached the provider, which is always overloaded.
fn always_overloaded() -> (
    Arc<AtomicUsize>,
    impl Service<Req, Response = Resp, Error = Infallible, Future: Send> + Clone + Send + 'static,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(overloaded()) }
        }
    });
    (calls, svc)
}

fn spend_stop() -> Option<crate::attempt_log::Decision> {
    Some(crate::attempt_log::Decision::Stop(
        crate::attempt_log::StopReason::SpendCapReached,
    ))
}

#[tokio::test(start_paused = true)]
async fn each_retry_reserves_its_attempt_and_the_cap_ends_the_retries() {
    // Each attempt reserves 6 + 94 = 100; the cap holds exactly three of them.
    for (rule, charged) in [
        // A 503 was not accepted: it costs nothing unless the rule charges every reservation.
        (ChargeRule::ReportedOrReserved, 0),
        (ChargeRule::ReportedOnly, 0),
        (ChargeRule::Reserved, 300),
    ] {
        let policy = recovery_policy(300, rule, 100);
        let budget = BudgetLayer::new(policy.budget.clone()).unwrap_or_else(|e| panic!("{e}"));
        let spend = budget.spend().unwrap_or_else(|| panic!("spend"));
        let retry =
            crate::retry::RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
        let (calls, provider) = always_overloaded();
        let resp = budget
            .layer(retry.layer(provider))
            .oneshot(chat("h", 94))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The failure the retry layer had is handed back.
        assert_eq!(resp.status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 3, "{rule:?}");
        let log = log_of(&resp);
        assert_eq!(log.attempt_count(), 3);
        assert_eq!(last_decision(&log), spend_stop());
        let events: Vec<_> = log.events().into_iter().map(|e| e.kind).collect();
        assert_eq!(events, [LocalEventKind::BudgetDenied]);
        // Until the request settles, every attempt's reservation is held: the cap, no more.
        let receipt = resp
            .extensions()
            .get::<SpendReceipt>()
            .cloned()
            .unwrap_or_else(|| panic!("receipt"));
        assert_eq!(receipt.reserved_micros(), 300);
        assert_eq!(
            spend.status("team").await.expect("store"),
            SpendStatus::new(0, 300)
        );
        resp.into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            spend.status("team").await.expect("store"),
            SpendStatus::new(charged, 0),
            "{rule:?}"
        );
        assert_eq!(receipt.charged_micros(), Some(charged));
        assert!(charged <= spend.cap_micros());
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_denied_by_the_spend_cap_costs_no_retry_budget() {
    // Five retries in the budget; the cap holds two attempts: one retry is made, the second
    // is refused by the spend cap before anything is withdrawn.
    let policy = recovery_policy(200, ChargeRule::ReportedOnly, 5);
    let budget = BudgetLayer::new(policy.budget.clone()).unwrap_or_else(|e| panic!("{e}"));
    let retry = crate::retry::RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let (calls, provider) = always_overloaded();
    let resp = budget
        .layer(retry.layer(provider))
        .oneshot(chat("h", 94))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(last_decision(&log_of(&resp)), spend_stop());
    assert_eq!(budget.retry_budget().available(), 5 - 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_the_retry_budget_refuses_gives_its_spend_back() {
    // The spend cap would hold the retry, the retry budget is empty: the retry's
    // reservation is released at once, not when the request settles.
    let policy = recovery_policy(1_000, ChargeRule::Reserved, 0);
    let budget = BudgetLayer::new(policy.budget.clone()).unwrap_or_else(|e| panic!("{e}"));
    let spend = budget.spend().unwrap_or_else(|| panic!("spend"));
    let retry = crate::retry::RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let (calls, provider) = always_overloaded();
    let resp = budget
        .layer(retry.layer(provider))
        .oneshot(chat("h", 94))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        last_decision(&log_of(&resp)),
        Some(crate::attempt_log::Decision::Stop(
            crate::attempt_log::StopReason::RetryBudgetDenied
        ))
    );
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(0, 100)
    );
    drop(resp);
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(100, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_with_retries_never_make_more_attempts_than_the_cap_holds() {
    // 1 000 requests at once against an overloaded provider, each allowed 10 attempts; the
    // cap holds 100 attempts' reservations. Exactly 100 calls are made: the first attempts of
    // the 100 admitted requests hold the whole cap, so none of their retries is admitted.
    for (rule, charged) in [
        (ChargeRule::ReportedOnly, 0),
        (ChargeRule::Reserved, 10_000),
    ] {
        let policy = recovery_policy(10_000, rule, 10_000);
        let budget = BudgetLayer::new(policy.budget.clone()).unwrap_or_else(|e| panic!("{e}"));
        let spend = budget.spend().unwrap_or_else(|| panic!("spend"));
        let retry =
            crate::retry::RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let svc = budget.layer(retry.layer(service_fn({
            let (calls, gate) = (calls.clone(), gate.clone());
            move |_req: Req| {
                let (calls, gate) = (calls.clone(), gate.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let _permit = gate.acquire().await;
                    Ok::<_, Infallible>(overloaded())
                }
            }
        })));
        let tasks: Vec<_> = (0..1000)
            .map(|_| tokio::spawn(svc.clone().oneshot(chat("h", 94))))
            .collect();
        settle_tasks().await;
        assert_eq!(calls.load(Ordering::SeqCst), 100);
        gate.add_permits(10_000);
        // Every response is held until all requests have ended, so no settlement frees room.
        let (mut answered, mut denied) = (Vec::new(), 0);
        for t in tasks {
            match t.await.unwrap_or_else(|e| panic!("{e}")) {
                Ok(resp) => {
                    assert_eq!(resp.status(), 503);
                    let log = log_of(&resp);
                    assert_eq!(log.attempt_count(), 1);
                    assert_eq!(last_decision(&log), spend_stop());
                    answered.push(resp);
                }
                Err(e) => {
                    assert!(matches!(e.kind(), ErrorKind::BudgetExhausted { .. }));
                    denied += 1;
                }
            }
        }
        assert_eq!((answered.len(), denied), (100, 900));
        assert_eq!(
            spend.status("team").await.expect("store"),
            SpendStatus::new(0, 10_000)
        );
        for resp in answered {
            resp.into_body()
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 100, "{rule:?}");
        assert_eq!(
            spend.status("team").await.expect("store"),
            SpendStatus::new(charged, 0),
            "{rule:?}"
        );
    }
}

/// A backup route for the unit-level chains: no rewrite beyond its name.
fn chain_policy(cap: u64, backup_price: Price) -> Policy {
    let mut policy = recovery_policy(cap, ChargeRule::ReportedOrReserved, 100);
    policy.retry.max_attempts = 1;
    policy.fallback.routes.push(RouteConfig::new("backup"));
    if let Some(s) = policy.budget.spend.as_mut() {
        s.default_price = None;
        s.prices.insert("primary".to_owned(), Price::new(1.0, 1.0));
        s.prices.insert("backup".to_owned(), backup_price);
    }
    policy
}

fn route_of(req: &Req) -> String {
    crate::context::RequestContext::of(req)
        .and_then(|c| c.route())
        .map(|r| r.as_str().to_owned())
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn each_attempt_is_reserved_at_the_price_of_its_route() {
    // The primary (1 per token) is overloaded; the backup (3 per output token) answers.
    let policy = chain_policy(1_000, Price::new(1.0, 3.0));
    let layer = BudgetLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let spend = layer.spend().unwrap_or_else(|| panic!("spend"));
    let fallback =
        crate::fallback::FallbackLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let svc = layer.layer(fallback.layer(service_fn(|req: Req| {
        let resp = if route_of(&req) == "backup" {
            answer(Some((2, 10)))
        } else {
            overloaded()
        };
        async { Ok::<_, Infallible>(resp) }
    })));
    let resp = svc
        .oneshot(chat("h", 94))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 200);
    let receipt = resp
        .extensions()
        .get::<SpendReceipt>()
        .cloned()
        .unwrap_or_else(|| panic!("receipt"));
    // 6 + 94 at the primary's price, then 6 + 94 × 3 at the backup's for the hop.
    assert_eq!(receipt.reserved_micros(), 100 + 288);
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(0, 388)
    );
    resp.into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The answer at the backup's price; the 503 costs nothing; the rest is released.
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(2 + 30, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn the_spend_cap_ends_the_chain_and_a_hop_without_a_call_gives_its_spend_back() {
    // The cap holds the primary's attempt but not the backup's.
    let policy = chain_policy(300, Price::new(1.0, 3.0));
    let layer = BudgetLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let spend = layer.spend().unwrap_or_else(|| panic!("spend"));
    let fallback =
        crate::fallback::FallbackLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let routes = Arc::new(Mutex::new(Vec::new()));
    let svc = layer.clone().layer(fallback.layer(service_fn({
        let routes = routes.clone();
        move |req: Req| {
            routes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(route_of(&req));
            async { Ok::<_, Infallible>(overloaded()) }
        }
    })));
    let resp = svc
        .oneshot(chat("h", 94))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The primary's failure comes back; the backup was never called.
    assert_eq!(resp.status(), 503);
    assert_eq!(
        *routes.lock().unwrap_or_else(|p| p.into_inner()),
        ["primary"]
    );
    let log = log_of(&resp);
    assert_eq!(last_decision(&log), spend_stop());
    let events = log.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, LocalEventKind::BudgetDenied);
    assert_eq!(events[0].route, Some(RouteName::new("backup")));
    drop(resp);
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(0, 0)
    );

    // A hop whose route rejects it without a call (an open circuit) releases its reservation
    // at once; the request still holds only the primary's.
    let policy = chain_policy(1_000, Price::new(1.0, 3.0));
    let layer = BudgetLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let spend = layer.spend().unwrap_or_else(|| panic!("spend"));
    let fallback =
        crate::fallback::FallbackLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let svc = layer.layer(fallback.layer(service_fn(|req: Req| async move {
        if route_of(&req) == "backup" {
            Err(Error::new(ErrorKind::CircuitOpen {
                route: RouteName::new("backup"),
                retry_in: Duration::from_secs(5),
            }))
        } else {
            Ok(overloaded())
        }
    })));
    let resp = svc
        .oneshot(chat("h", 94))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 503);
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(0, 100)
    );
    drop(resp);
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(0, 0)
    );
}

/// An inner layer that records attempts as a retry layer with a stream guard below would:
/// a timeout, a 503, then the answer with the usage of its final stream event.
fn attempts_then_answer()
-> impl Service<Req, Response = Resp, Error = Infallible, Future: Send> + Clone + Send + 'static {
    use crate::attempt_log::{Attempt, StreamEnd, StreamRecord};
    use crate::classify::{Classification, FailureClass};
    service_fn(|mut req: Req| {
        let (log, _) = crate::AttemptLog::get_or_insert(&mut req);
        let route = Some(RouteName::new("h"));
        for class in [FailureClass::Timeout, FailureClass::Overloaded] {
            log.record(Attempt::new(
                route.clone(),
                Duration::ZERO,
                Duration::ZERO,
                &Classification::failure(class),
            ));
        }
        let answer = log.record(Attempt::new(
            route,
            Duration::ZERO,
            Duration::ZERO,
            &Classification::success(http::StatusCode::OK),
        ));
        log.set_stream(
            answer,
            StreamRecord {
                time_to_first_token: None,
                bytes: 0,
                events: 0,
                duration: Duration::ZERO,
                end: StreamEnd::Complete,
                usage: Some(Usage::new(2, 8)),
                malformed_events: 0,
            },
        );
        let resp = http::Response::builder()
            .header("content-type", "text/event-stream")
            .body(Full::new(Bytes::from_static(
                b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n",
            )))
            .unwrap_or_else(|e| panic!("{e}"));
        async { Ok::<_, Infallible>(resp) }
    })
}

#[tokio::test(start_paused = true)]
async fn failed_attempts_are_charged_as_the_rule_says() {
    // Reservation: 6 + 94 = 100; the answer's stream record reports 2 + 8 = 10.
    for (rule, charged) in [
        // The timeout may have been accepted: it keeps a reservation; the 503 costs nothing.
        (ChargeRule::ReportedOrReserved, 100 + 10),
        (ChargeRule::ReportedOnly, 10),
        (ChargeRule::Reserved, 100 + 100 + 10),
    ] {
        let mut policy = BudgetPolicy::default();
        let mut s = spend_policy(1.0, Price::new(1.0, 1.0));
        s.charge_failed = rule;
        policy.spend = Some(s);
        let layer = layer(policy);
        let spend = layer.spend().unwrap_or_else(|| panic!("spend"));
        let resp = layer
            .layer(attempts_then_answer())
            .oneshot(chat("h", 94))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            log_len(&resp),
            3,
            "the budget layer records no attempt of its own"
        );
        resp.into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            spend.status("team").await.expect("store"),
            SpendStatus::new(charged, 0),
            "{rule:?}"
        );
    }
}

fn log_len<B>(resp: &http::Response<B>) -> usize {
    resp.extensions()
        .get::<crate::AttemptLog>()
        .map_or(0, |l| l.attempt_count())
}

#[test]
fn both_presets_build() {
    for policy in [Policy::interactive(), Policy::batch()] {
        let layer = BudgetLayer::from_policy(&policy);
        assert!(layer.is_ok(), "{}: {:?}", policy.workflow, layer.err());
    }
}

/// An [`AttemptAdmission`] of the test's own: admits `room` attempts, records every call.
#[derive(Clone, Default)]
struct Ledger {
    room: Arc<AtomicUsize>,
    calls: Arc<Mutex<Vec<String>>>,
    /// Answers after a turn of the runtime instead of at once.
    slow: bool,
    /// Answers after this long instead (a store far away).
    takes: Option<Duration>,
}

impl AttemptAdmission for Ledger {
    fn admit(&self, route: &RouteName) -> crate::store::StoreFuture<Result<(), SpendDenied>> {
        let granted = self
            .room
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let verb = if granted { "admit" } else { "deny" };
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{verb} {route}"));
        let answer = if granted {
            Ok(())
        } else {
            Err(SpendDenied::new("team"))
        };
        if let Some(d) = self.takes {
            return crate::store::StoreFuture::new(async move {
                tokio::time::sleep(d).await;
                answer
            });
        }
        if self.slow {
            // An answer that takes a turn of the runtime, as a networked store's does.
            return crate::store::StoreFuture::new(async move {
                tokio::task::yield_now().await;
                answer
            });
        }
        crate::store::StoreFuture::ready(answer)
    }

    fn release(&self, route: &RouteName) {
        self.room.fetch_add(1, Ordering::SeqCst);
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("release {route}"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_rejected_without_a_call_gives_its_spend_back() {
    // The retry layer alone, under a spend gate of the caller's own: the first attempt is
    // overloaded, the retry meets an open circuit (no call), which returns its reservation.
    let policy = recovery_policy(1_000, ChargeRule::ReportedOnly, 100);
    let retry = crate::retry::RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = retry.layer(service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Ok(overloaded())
                } else {
                    Err(Error::new(ErrorKind::CircuitOpen {
                        route: RouteName::new("h"),
                        retry_in: Duration::from_secs(5),
                    }))
                }
            }
        }
    }));
    let ledger = Ledger::default();
    ledger.room.store(5, Ordering::SeqCst);
    let mut req = chat("h", 94);
    req.extensions_mut().insert(SpendGate::new(ledger.clone()));
    let r = svc.oneshot(req).await;
    assert!(matches!(kind(&r), Some(ErrorKind::CircuitOpen { .. })));
    assert_eq!(
        *ledger.calls.lock().unwrap_or_else(|p| p.into_inner()),
        ["admit h", "release h"]
    );
    assert_eq!(ledger.room.load(Ordering::SeqCst), 5);

    // With no room, the retry is not made and the caller gets the 503.
    let retry = crate::retry::RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let (calls, provider) = always_overloaded();
    let ledger = Ledger::default();
    let mut req = chat("h", 94);
    req.extensions_mut().insert(SpendGate::new(ledger.clone()));
    let resp = retry
        .layer(provider)
        .oneshot(req)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 503);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(last_decision(&log_of(&resp)), spend_stop());
    assert_eq!(
        *ledger.calls.lock().unwrap_or_else(|p| p.into_inner()),
        ["deny h"]
    );
}

/// A retry layer (interactive preset, seed 7) around a provider that is always overloaded and
/// names a wait of 800 ms, asked for its retries by a spend gate that answers after `takes`,
/// for a request due in 1 s: the wait checked at once (800–960 ms) fits.
async fn a_retry_claimed_slowly(
    takes: Duration,
) -> (
    Result<http::Response<crate::Body>, Error>,
    Duration,
    usize,
    Vec<String>,
) {
    let policy = recovery_policy(1_000, ChargeRule::ReportedOnly, 100);
    let retry = crate::retry::RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut r = overloaded();
            r.headers_mut()
                .insert("retry-after-ms", http::HeaderValue::from_static("800"));
            async { Ok::<_, Infallible>(r) }
        }
    });
    let ledger = Ledger {
        takes: Some(takes),
        ..Ledger::default()
    };
    ledger.room.store(5, Ordering::SeqCst);
    let mut req = chat("h", 94);
    req.extensions_mut().insert(SpendGate::new(ledger.clone()));
    req.extensions_mut()
        .insert(crate::context::Deadline::after(Duration::from_secs(1)));
    let start = Instant::now();
    let out = retry.layer(provider).oneshot(req).await;
    let ledger_calls = ledger
        .calls
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    (
        out,
        start.elapsed(),
        calls.load(Ordering::SeqCst),
        ledger_calls,
    )
}

#[tokio::test(start_paused = true)]
async fn a_spend_cap_slower_than_the_deadline_ends_the_retries_at_the_deadline() {
    let (out, took, calls, ledger) = a_retry_claimed_slowly(Duration::from_secs(2)).await;
    // The cap has not answered at 1 s: the caller gets the 503 then, with no second call.
    assert_eq!(took, Duration::from_secs(1));
    assert_eq!(calls, 1);
    let resp = out.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 503);
    assert_eq!(
        last_decision(&log_of(&resp)),
        Some(crate::attempt_log::Decision::Stop(
            crate::attempt_log::StopReason::DeadlineExceeded
        ))
    );
    assert_eq!(ledger, ["admit h"]);
}

#[tokio::test(start_paused = true)]
async fn a_spend_cap_that_answers_too_late_for_the_wait_gives_the_retry_back() {
    let (out, took, calls, ledger) = a_retry_claimed_slowly(Duration::from_millis(300)).await;
    // Granted at 300 ms, the 800 ms wait would end past 1 s: no retry, the grant given back.
    assert_eq!(took, Duration::from_millis(300));
    assert_eq!(calls, 1);
    let resp = out.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status(), 503);
    assert_eq!(
        last_decision(&log_of(&resp)),
        Some(crate::attempt_log::Decision::Stop(
            crate::attempt_log::StopReason::DeadlineExceeded
        ))
    );
    assert_eq!(ledger, ["admit h", "release h"]);
}

#[tokio::test(start_paused = true)]
async fn a_spend_gate_that_answers_later_decides_retries_and_hops_the_same() {
    // A networked cap answers after a turn of the runtime: the retry waits for it, then makes
    // the retry it granted...
    let mut policy = recovery_policy(1_000, ChargeRule::ReportedOnly, 100);
    policy.retry.max_attempts = 2;
    let retry = crate::retry::RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let (calls, provider) = always_overloaded();
    let ledger = Ledger {
        slow: true,
        ..Ledger::default()
    };
    ledger.room.store(5, Ordering::SeqCst);
    let mut req = chat("h", 94);
    req.extensions_mut().insert(SpendGate::new(ledger.clone()));
    let resp = retry
        .layer(provider)
        .oneshot(req)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (resp.status().as_u16(), calls.load(Ordering::SeqCst)),
        (503, 2)
    );
    assert_eq!(
        *ledger.calls.lock().unwrap_or_else(|p| p.into_inner()),
        ["admit h"]
    );

    // ...and hands up the failure it had when the cap refuses.
    let retry = crate::retry::RetryLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let (calls, provider) = always_overloaded();
    let ledger = Ledger {
        slow: true,
        ..Ledger::default()
    };
    let mut req = chat("h", 94);
    req.extensions_mut().insert(SpendGate::new(ledger.clone()));
    let resp = retry
        .layer(provider)
        .oneshot(req)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (resp.status().as_u16(), calls.load(Ordering::SeqCst)),
        (503, 1)
    );
    assert_eq!(last_decision(&log_of(&resp)), spend_stop());

    // A hop waits for it too: granted, the backup serves; refused, the primary's failure.
    for (room, status, decision) in [
        (
            1,
            200,
            Some(crate::attempt_log::Decision::Fallback {
                to: RouteName::new("backup"),
            }),
        ),
        (0, 503, spend_stop()),
    ] {
        let mut policy = recovery_policy(1_000, ChargeRule::ReportedOnly, 100);
        policy.retry.max_attempts = 1;
        policy.fallback.routes = vec![
            crate::policy::RouteConfig::new("backup")
                .base_url("http://backup/v1")
                .model("b"),
        ];
        let fallback =
            crate::fallback::FallbackLayer::from_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
        let svc = fallback.layer(service_fn(|req: Req| async move {
            let backup = req.uri().host() == Some("backup");
            Ok::<_, Infallible>(if backup { answer(None) } else { overloaded() })
        }));
        let ledger = Ledger {
            slow: true,
            ..Ledger::default()
        };
        ledger.room.store(room, Ordering::SeqCst);
        let mut req = chat("h", 94);
        req.extensions_mut().insert(SpendGate::new(ledger.clone()));
        let resp = svc.oneshot(req).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), status);
        let log = log_of(&resp);
        assert_eq!(
            log.attempts()[0].decisions.last().cloned(),
            decision,
            "{log}"
        );
    }
}

/// A shared store far away: each ask is sent at once and answered `rtt` later, and the
/// bookings made without waiting land at once.
struct FarStore {
    near: Arc<MemoryStore>,
    rtt: Duration,
}

impl FarStore {
    /// The ask is on its way when this returns: dropping the answer does not take it back.
    fn ask<T: Send + 'static>(
        &self,
        ask: impl FnOnce(Arc<MemoryStore>) -> StoreFuture<T> + Send + 'static,
    ) -> StoreFuture<T> {
        let (near, rtt) = (self.near.clone(), self.rtt);
        let sent = tokio::spawn(async move {
            tokio::time::sleep(rtt / 2).await;
            let answer = ask(near).await;
            tokio::time::sleep(rtt / 2).await;
            answer
        });
        StoreFuture::new(async move { sent.await.unwrap_or_else(|e| panic!("{e}")) })
    }
}

impl BudgetStore for FarStore {
    fn reserve(
        &self,
        owner: &str,
        lease: Lease,
        amount: u64,
        cap: u64,
        window: Duration,
    ) -> StoreFuture<Result<(), Refusal>> {
        let owner = owner.to_owned();
        self.ask(move |s| s.reserve(&owner, lease, amount, cap, window))
    }
    fn release(&self, owner: &str, lease: Lease, amount: u64, window: Duration) {
        self.near.release(owner, lease, amount, window)
    }
    fn settle(&self, owner: &str, lease: Lease, reserved: u64, charged: u64, window: Duration) {
        self.near.settle(owner, lease, reserved, charged, window)
    }
    fn adjust(&self, owner: &str, refund: u64, charge: u64, window: Duration) {
        self.near.adjust(owner, refund, charge, window)
    }
    fn status(&self, owner: &str, window: Duration) -> StoreFuture<Result<SpendStatus, Refusal>> {
        let owner = owner.to_owned();
        self.ask(move |s| s.status(&owner, window))
    }
    fn take(&self, key: &str, demands: &[RateDemand]) -> StoreFuture<Result<(), Refusal>> {
        let (key, demands) = (key.to_owned(), demands.to_vec());
        self.ask(move |s| s.take(&key, &demands))
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_cancelled_while_the_store_decides_its_reservation_leaves_none_open() {
    let near = Arc::new(MemoryStore::new());
    let mut policy = BudgetPolicy::default();
    policy.spend = Some(spend_policy(1.0, Price::new(1.0, 1.0)));
    let layer = layer(policy).store(Arc::new(FarStore {
        near: near.clone(),
        rtt: Duration::from_millis(100),
    }));
    let (calls, svc) = {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let svc = layer.layer(service_fn(move |_req: Req| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(answer(Some((2, 10)))) }
        }));
        (calls, svc)
    };
    // Cancelled after the reservation is sent and before it reaches the store.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(25),
        svc.oneshot(chat("api.example.com", 94)),
    )
    .await;
    assert!(cancelled.is_err(), "the request was not cancelled");
    tokio::time::sleep(Duration::from_millis(200)).await;
    settle_tasks().await;
    let day = Duration::from_secs(24 * 3600);
    let status = near.status("team", day).await;
    assert_eq!(
        status,
        Ok(SpendStatus::new(0, 0)),
        "the reservation is open"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}
