//! Deferred requests end to end: the batch stack in front of the real hyper-util client and
//! `MockProvider` on loopback, the in-memory sink, the worker on a paused clock.
#![cfg(feature = "testing")]
// Policies are built the way users must build them (the sections are `#[non_exhaustive]`).
#![allow(clippy::field_reassign_with_default)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_llm_resilience::attempt_log::LocalEventKind;
use tower_llm_resilience::classify::FailureClass;
use tower_llm_resilience::defer::{
    DeferSink, DeferredRequest, DeferredStatus, DeferredWorker, Lease, LeaseEnd, MemoryDeferSink,
    ReplayOutcome, Replayed, Requester, StoreFuture, Take,
};
use tower_llm_resilience::observe::{Alert, AlertFuture, AlertKind, AlertSink, key_fingerprint};
use tower_llm_resilience::policy::{AdmissionMode, DeferPolicy, RateKey, RateLimitPolicy};
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{AttemptLog, BoxError, ErrorKind, Policy, ResilienceLayer};

const KEY: &str = "sk-proj-never-stored-0123456789";
const MODEL: &str = "gpt-4o";

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;
type Stack = <ResilienceLayer as Layer<Client>>::Service;

async fn start() -> MockProvider {
    MockProvider::start().await.expect("mock starts")
}

fn stack(policy: &Policy, sink: Arc<dyn DeferSink>) -> Stack {
    ResilienceLayer::new(policy)
        .expect("valid policy")
        .defer_to(sink)
        .layer(client())
}

/// A batch request from `alice`, paid by `team-a`, with the test's key in every place a key
/// can travel.
fn request(base: &str) -> Request<Full<Bytes>> {
    let mut req = chat_request(base, MODEL, false);
    let h = req.headers_mut();
    h.insert(
        "authorization",
        format!("Bearer {KEY}").parse().expect("header"),
    );
    h.insert("x-api-key", KEY.parse().expect("header"));
    h.insert("cookie", "session=abc".parse().expect("header"));
    h.insert("x-llm-requester", "alice".parse().expect("header"));
    h.insert("x-llm-budget-owner", "team-a".parse().expect("header"));
    req
}

/// Every replay's end, in order.
#[derive(Clone, Default)]
struct Results(Arc<Mutex<Vec<Replayed>>>);

impl Results {
    fn callback(&self) -> impl Fn(Replayed) + Send + Sync + 'static {
        let all = self.0.clone();
        move |r| all.lock().unwrap_or_else(|p| p.into_inner()).push(r)
    }

    fn take(&self) -> Vec<Replayed> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A worker on `svc` and `sink` by the policy's `budget.defer`, its ends going to the
/// returned `Results`.
fn worker(
    svc: Stack,
    sink: Arc<MemoryDeferSink>,
    policy: &Policy,
) -> (DeferredWorker<Stack, Full<Bytes>>, Results) {
    let results = Results::default();
    let defer = policy.budget.defer.clone().expect("the policy defers");
    let worker = DeferredWorker::new(svc, sink, defer).on_result(results.callback());
    (worker, results)
}

#[derive(Clone, Default)]
struct Alerts(Arc<Mutex<Vec<Alert>>>);

impl AlertSink for Alerts {
    fn send(&self, alert: Alert) -> AlertFuture {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(alert);
        Box::pin(async {})
    }
}

fn only_record(sink: &MemoryDeferSink) -> (DeferredRequest, DeferredStatus) {
    let mut all = sink.records();
    assert_eq!(all.len(), 1, "one record");
    all.remove(0)
}

fn deferred_of(
    result: Result<http::Response<impl Sized>, tower_llm_resilience::Error>,
) -> tower_llm_resilience::defer::Deferred {
    match result {
        Err(e) => match e.kind() {
            ErrorKind::Deferred(d) => d.clone(),
            other => panic!("expected a deferral, got {other}"),
        },
        Ok(resp) => panic!("expected a deferral, got an answer {}", resp.status()),
    }
}

#[tokio::test(start_paused = true)]
async fn a_long_retry_after_is_deferred_and_replayed_at_its_time_with_the_same_key() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_rate_limited(Some("600")),
            Reply::openai_chat(MODEL, "the answer"),
        ],
    );
    let policy = Policy::batch();
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&policy, sink.clone());

    let log = AttemptLog::new();
    let mut req = request(&mock.url());
    req.extensions_mut().insert(log.clone());
    let sent_at = tokio::time::Instant::now();
    let deferred = deferred_of(svc.clone().oneshot(req).await);
    // Deferred at once: not waited on (the clock did not move), not failed.
    assert_eq!(tokio::time::Instant::now(), sent_at);
    assert_eq!(deferred.retry_in, Duration::from_secs(600));
    assert_eq!(mock.request_count(), 1);
    assert!(
        log.events()
            .iter()
            .any(|e| matches!(e.kind, LocalEventKind::Deferred { retry_in } if retry_in == Duration::from_secs(600))),
        "the log says the request was deferred"
    );

    let (record, status) = only_record(&sink);
    assert_eq!(record.id, deferred.id);
    assert_eq!(record.requester.as_deref(), Some("alice"));
    assert_eq!(record.budget_owner.as_deref(), Some("team-a"));
    assert_eq!(record.key_fingerprint, Some(key_fingerprint(KEY)));
    assert_eq!(record.workflow, "batch");
    assert_eq!(record.route, "primary");
    assert_eq!(record.model.as_deref(), Some(MODEL));
    assert_eq!(record.deferrals, 0);
    assert_eq!(
        record.next_attempt_at_ms - record.queued_at_ms,
        600_000,
        "due when the provider said"
    );
    assert_eq!(
        deferred.next_attempt_at,
        UNIX_EPOCH + Duration::from_millis(record.next_attempt_at_ms)
    );
    assert_eq!(record.reason.class, FailureClass::RateLimited);
    assert_eq!(record.reason.route, record.route);
    assert_eq!(record.reason.status, Some(429));
    assert_eq!(record.method, "POST");
    assert_eq!(record.uri, format!("{}/v1/chat/completions", mock.url()));
    assert_eq!(
        record.body,
        chat_request(&mock.url(), MODEL, false)
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    );
    assert!(!record.idempotency_key.is_empty());
    let first = &mock.requests()[0];
    assert_eq!(
        first
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok()),
        Some(record.idempotency_key.as_str()),
        "the key set for the request is the key it was sent with"
    );
    assert_eq!(
        status,
        DeferredStatus::Waiting {
            next_attempt_at_ms: record.next_attempt_at_ms,
            deferrals: 0
        }
    );

    let (worker, results) = worker(svc.clone(), sink.clone(), &policy);
    let mut worker = worker
        .name("w1")
        .credentials(|record, headers| {
            assert_eq!(record.key_fingerprint, Some(key_fingerprint(KEY)));
            headers.insert(
                "authorization",
                format!("Bearer {KEY}").parse().expect("header"),
            );
        })
        .on_result(results.callback());

    tokio::time::advance(Duration::from_millis(599_999)).await;
    assert!(
        !worker.run_once().await.expect("sink"),
        "not due a millisecond early"
    );
    assert_eq!(mock.request_count(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(worker.run_once().await.expect("sink"), "due now");

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let replay = &requests[1];
    assert_eq!(
        replay.headers.get("idempotency-key"),
        first.headers.get("idempotency-key")
    );
    assert_eq!(
        replay
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some(format!("Bearer {KEY}").as_str()),
        "the credential comes from the worker's hook"
    );
    assert!(replay.headers.get("x-api-key").is_none());
    assert!(replay.headers.get("cookie").is_none());
    assert_eq!(replay.body, first.body);

    let mut done = results.take();
    assert_eq!(done.len(), 1);
    let Replayed {
        record: replayed,
        outcome,
        ..
    } = done.remove(0);
    assert_eq!(replayed.id, record.id);
    let ReplayOutcome::Answered(resp) = outcome else {
        panic!("answered, got {outcome:?}")
    };
    assert_eq!(resp.status(), 200);
    assert!(String::from_utf8_lossy(resp.body()).contains("the answer"));
    assert_eq!(only_record(&sink).1, DeferredStatus::Answered);
    assert_eq!(
        sink.status(&record.id).await.expect("sink"),
        Some(DeferredStatus::Answered)
    );
    assert!(!worker.run_once().await.expect("sink"), "nothing left");
}

#[tokio::test(start_paused = true)]
async fn no_credential_reaches_the_record() {
    let mock = start().await;
    let path = "/v1beta/models/gemini-2.0-flash:generateContent?alt=sse&key=AIza-never-stored";
    mock.script(
        ScriptKey::path("/v1beta/models/gemini-2.0-flash:generateContent"),
        [Reply::openai_rate_limited(Some("600"))],
    );
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&Policy::batch(), sink.clone());
    let mut req = request(&mock.url());
    *req.uri_mut() = format!("{}{path}", mock.url()).parse().expect("uri");
    let h = req.headers_mut();
    h.insert("api-key", KEY.parse().expect("header"));
    h.insert("x-goog-api-key", KEY.parse().expect("header"));
    h.insert(
        "proxy-authorization",
        format!("Basic {KEY}").parse().expect("header"),
    );
    deferred_of(svc.oneshot(req).await);

    let (record, _) = only_record(&sink);
    let names: Vec<&str> = record.headers.iter().map(|(n, _)| n.as_str()).collect();
    for gone in [
        "authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "proxy-authorization",
        "cookie",
    ] {
        assert!(!names.contains(&gone), "{gone} is not kept: {names:?}");
    }
    assert!(
        names.contains(&"content-type"),
        "other headers are: {names:?}"
    );
    assert_eq!(
        record.uri,
        format!(
            "{}/v1beta/models/gemini-2.0-flash:generateContent?alt=sse",
            mock.url()
        )
    );
    // The fingerprint is of the header key (the first credential seen), never the key.
    assert_eq!(record.key_fingerprint, Some(key_fingerprint(KEY)));
    for shown in [
        format!("{record:?}"),
        record.meta_json(),
        format!("{:?}", record.headers),
    ] {
        assert!(!shown.contains(KEY), "no key in {shown}");
        assert!(
            !shown.contains("AIza-never-stored"),
            "no query key in {shown}"
        );
        assert!(!shown.contains("session=abc"));
    }
    // The body is the caller's and is kept as sent; the key never was in it.
    assert!(!String::from_utf8_lossy(&record.body).contains(KEY));
}

#[tokio::test(start_paused = true)]
async fn deferrals_grow_until_the_limit_then_a_dead_letter_and_an_alert() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        (0..4).map(|_| Reply::openai_rate_limited(Some("600"))),
    );
    let mut policy = Policy::batch();
    let mut defer = DeferPolicy::default();
    defer.max_deferrals = 3;
    policy.budget.defer = Some(defer.clone());
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&policy, sink.clone());
    let first = deferred_of(svc.clone().oneshot(request(&mock.url())).await);

    let alerts = Alerts::default();
    let (worker, results) = worker(svc, sink.clone(), &policy);
    let mut worker = worker.alerts(Arc::new(alerts.clone()));
    for deferrals in 1..=2u32 {
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(worker.run_once().await.expect("sink"));
        let mut done = results.take();
        assert_eq!(done.len(), 1);
        let ReplayOutcome::Deferred(again) = &done[0].outcome else {
            panic!("deferred again, got {:?}", done[0].outcome)
        };
        assert_eq!(again.id, first.id, "the same record");
        assert_eq!(again.retry_in, Duration::from_secs(600));
        let (record, status) = only_record(&sink);
        assert_eq!(record.deferrals, deferrals, "the count carries over");
        assert_eq!(
            status,
            DeferredStatus::Waiting {
                next_attempt_at_ms: record.next_attempt_at_ms,
                deferrals
            }
        );
        assert_eq!(done.remove(0).record.deferrals, deferrals - 1);
    }
    assert!(alerts.0.lock().expect("alerts").is_empty());

    // The third replay would be the third deferral: the limit.
    tokio::time::advance(Duration::from_secs(600)).await;
    assert!(worker.run_once().await.expect("sink"));
    let done = results.take();
    let ReplayOutcome::DeadLetter {
        reason, response, ..
    } = &done[0].outcome
    else {
        panic!("a dead letter, got {:?}", done[0].outcome)
    };
    assert_eq!(
        reason,
        "deferred 3 times, the most allowed; last: the provider answered 429"
    );
    assert_eq!(response.as_ref().map(|r| r.status().as_u16()), Some(429));
    let dead = sink.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0.id, first.id);
    assert!(matches!(
        only_record(&sink).1,
        DeferredStatus::DeadLetter { .. }
    ));
    let alerts = alerts.0.lock().expect("alerts").clone();
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].kind, AlertKind::DeadLetter);
    assert_eq!(alerts[0].workflow, "batch");
    assert_eq!(alerts[0].owner.as_deref(), Some("team-a"));
    assert_eq!(alerts[0].key_fingerprint, Some(key_fingerprint(KEY)));
    assert_eq!(alerts[0].class, Some(FailureClass::RateLimited));
    // One first try and three replays; nothing after the dead letter.
    assert_eq!(mock.request_count(), 4);
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(!worker.run_once().await.expect("sink"));
    assert_eq!(mock.request_count(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_failure_that_is_not_transient_fails_closed_and_is_not_deferred() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::unauthorized(),
            Reply::openai_bad_request(),
            Reply::openai_insufficient_quota(),
        ],
    );
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&Policy::batch(), sink.clone());
    for status in [401, 400, 429] {
        let resp = svc
            .clone()
            .oneshot(request(&mock.url()))
            .await
            .expect("the provider's answer");
        assert_eq!(resp.status(), status);
    }
    assert!(sink.records().is_empty(), "nothing deferred");
    assert_eq!(mock.request_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_replay_that_fails_closed_is_a_dead_letter_with_the_provider_answer() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_rate_limited(Some("600")),
            Reply::unauthorized(),
        ],
    );
    let policy = Policy::batch();
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&policy, sink.clone());
    deferred_of(svc.clone().oneshot(request(&mock.url())).await);
    let alerts = Alerts::default();
    let (worker, results) = worker(svc, sink.clone(), &policy);
    let mut worker = worker.alerts(Arc::new(alerts.clone()));
    tokio::time::advance(Duration::from_secs(600)).await;
    assert!(worker.run_once().await.expect("sink"));
    let done = results.take();
    let ReplayOutcome::DeadLetter {
        reason, response, ..
    } = &done[0].outcome
    else {
        panic!("a dead letter, got {:?}", done[0].outcome)
    };
    assert_eq!(reason, "the provider answered 401");
    assert_eq!(response.as_ref().map(|r| r.status().as_u16()), Some(401));
    let alerts = alerts.0.lock().expect("alerts").clone();
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].status, Some(401));
    assert_eq!(sink.dead_letters().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_short_retry_after_is_waited_on_not_deferred() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_rate_limited(Some("20")),
            Reply::openai_chat(MODEL, "waited"),
        ],
    );
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&Policy::batch(), sink.clone());
    let resp = svc.oneshot(request(&mock.url())).await.expect("answered");
    assert_eq!(resp.status(), 200);
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert!(
        requests[1].at - requests[0].at >= Duration::from_secs(20),
        "the retry honoured Retry-After"
    );
    assert!(sink.records().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_body_larger_than_the_record_keeps_is_not_deferred() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_rate_limited(Some("600"))],
    );
    let mut policy = Policy::batch();
    let mut defer = DeferPolicy::default();
    defer.max_body_bytes = 16;
    policy.budget.defer = Some(defer);
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&policy, sink.clone());
    let resp = svc
        .oneshot(request(&mock.url()))
        .await
        .expect("the provider's answer");
    assert_eq!(resp.status(), 429, "it fails as it would without the rung");
    assert!(sink.records().is_empty());
}

/// A sink that cannot keep anything.
struct Refusing;

impl DeferSink for Refusing {
    fn put(&self, _: DeferredRequest) -> StoreFuture<Result<(), BoxError>> {
        StoreFuture::ready(Err("the queue is down".into()))
    }
    fn take(&self, _: Take) -> StoreFuture<Result<Vec<Lease>, BoxError>> {
        StoreFuture::ready(Err("the queue is down".into()))
    }
    fn renew(&self, _: &Lease) -> StoreFuture<Result<bool, BoxError>> {
        StoreFuture::ready(Ok(false))
    }
    fn finish(&self, _: Lease, _: LeaseEnd) -> StoreFuture<Result<bool, BoxError>> {
        StoreFuture::ready(Ok(false))
    }
    fn status(&self, _: &str) -> StoreFuture<Result<Option<DeferredStatus>, BoxError>> {
        StoreFuture::ready(Ok(None))
    }
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_refuses_the_record_leaves_the_request_its_own_failure() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_rate_limited(Some("600"))],
    );
    let svc = stack(&Policy::batch(), Arc::new(Refusing));
    let log = AttemptLog::new();
    let mut req = request(&mock.url());
    req.extensions_mut().insert(log.clone());
    let resp = svc.oneshot(req).await.expect("the provider's answer");
    assert_eq!(resp.status(), 429);
    let kinds: Vec<_> = log.events().into_iter().map(|e| e.kind).collect();
    assert!(
        kinds.contains(&LocalEventKind::StoreUnavailable),
        "{kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| matches!(k, LocalEventKind::Deferred { .. }))
    );
}

#[tokio::test(start_paused = true)]
async fn admission_mode_defer_writes_down_what_the_local_limit_has_no_room_for() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_chat(MODEL, "first"),
            Reply::openai_chat(MODEL, "second"),
        ],
    );
    let mut policy = Policy::batch();
    let mut rate = RateLimitPolicy::default();
    rate.requests_per_second = Some(0.1);
    rate.burst = 1;
    rate.key = RateKey::Route;
    policy.budget.rate_limit = Some(rate);
    policy.budget.admission = AdmissionMode::Defer;
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&policy, sink.clone());
    let resp = svc
        .clone()
        .oneshot(request(&mock.url()))
        .await
        .expect("answered");
    assert_eq!(resp.status(), 200);
    let mut second = request(&mock.url());
    second.extensions_mut().insert(Requester("bob".to_owned()));
    let deferred = deferred_of(svc.clone().oneshot(second).await);
    assert_eq!(
        deferred.retry_in,
        Duration::from_secs(10),
        "due when the limit has room"
    );
    assert_eq!(mock.request_count(), 1, "the provider never saw it");
    let (record, _) = only_record(&sink);
    assert_eq!(
        record.requester.as_deref(),
        Some("bob"),
        "the extension names who asked"
    );
    assert_eq!(record.reason.class, FailureClass::RateLimited);
    assert_eq!(record.reason.status, None);

    let (mut worker, results) = worker(svc, sink.clone(), &policy);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(worker.run_once().await.expect("sink"));
    let done = results.take();
    assert!(matches!(&done[0].outcome, ReplayOutcome::Answered(r) if r.status() == 200));
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_lease_not_renewed_goes_to_the_next_worker() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_rate_limited(Some("600")),
            Reply::never(),
            Reply::openai_chat(MODEL, "second worker"),
        ],
    );
    let mut policy = Policy::batch();
    let mut defer = DeferPolicy::default();
    defer.claim_after = Duration::from_secs(30);
    policy.budget.defer = Some(defer.clone());
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&policy, sink.clone());
    deferred_of(svc.clone().oneshot(request(&mock.url())).await);
    tokio::time::advance(Duration::from_secs(600)).await;

    // The first worker takes the record and dies mid-replay (its future is dropped).
    let mut dying = DeferredWorker::new(svc.clone(), sink.clone(), defer.clone()).name("dying");
    let cut = tokio::time::timeout(Duration::from_secs(1), dying.run_once()).await;
    assert!(cut.is_err(), "the replay was under way");
    drop(dying);
    assert!(matches!(
        only_record(&sink).1,
        DeferredStatus::Replaying { .. }
    ));

    let (next, results) = worker(svc, sink.clone(), &policy);
    let mut next = next.name("next");
    tokio::time::advance(Duration::from_secs(28)).await;
    assert!(
        !next.run_once().await.expect("sink"),
        "the lease still stands"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(
        next.run_once().await.expect("sink"),
        "the lapsed lease is taken over"
    );
    let done = results.take();
    assert!(matches!(&done[0].outcome, ReplayOutcome::Answered(_)));
    let requests = mock.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(
        requests[1].headers.get("idempotency-key"),
        requests[2].headers.get("idempotency-key")
    );
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_with_no_backup_is_deferred_to_its_next_probe() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_chat(MODEL, "probed")],
    );
    let policy = Policy::batch();
    let sink = Arc::new(MemoryDeferSink::new());
    let layer = ResilienceLayer::new(&policy)
        .expect("valid policy")
        .defer_to(sink.clone());
    let breakers = layer.circuit_breaker();
    breakers.force_open("primary");
    let svc = layer.layer(client());
    let deferred = deferred_of(svc.clone().oneshot(request(&mock.url())).await);
    assert_eq!(mock.request_count(), 0, "an open circuit sends nothing");
    // A forced-open circuit names the policy's longest open time.
    assert_eq!(deferred.retry_in, policy.circuit_breaker.open_cap);
    let (record, _) = only_record(&sink);
    assert_eq!(record.reason.class, FailureClass::Overloaded);
    assert_eq!(record.reason.status, None);

    breakers.reset("primary");
    let (mut worker, results) = worker(svc, sink, &policy);
    tokio::time::advance(deferred.retry_in).await;
    assert!(worker.run_once().await.expect("sink"));
    let done = results.take();
    assert!(
        matches!(&done[0].outcome, ReplayOutcome::Answered(r) if r.status() == 200),
        "{:?}",
        done[0].outcome
    );
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_chain_exhausted_on_refusals_is_due_when_its_first_route_is_free() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_rate_limited(Some("900"))],
    );
    mock.script(
        ScriptKey::model("backup-model"),
        [Reply::openai_rate_limited(Some("600"))],
    );
    let mut policy = Policy::batch();
    policy.fallback.routes = vec![
        tower_llm_resilience::policy::RouteConfig::new("backup")
            .base_url(format!("{}/backup", mock.url()))
            .model("backup-model"),
    ];
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&policy, sink.clone());
    let deferred = deferred_of(svc.oneshot(request(&mock.url())).await);
    assert_eq!(mock.request_count(), 2, "both routes were asked first");
    let (record, _) = only_record(&sink);
    // The chain answers with the primary's failure (a backup's is never handed back), but
    // the record is due when the first route is free again: the backup, in 600 s.
    assert_eq!(record.route, "primary");
    assert_eq!(record.reason.route, "primary");
    assert_eq!(record.reason.status, Some(429));
    assert_eq!(deferred.retry_in, Duration::from_secs(600));
}

#[tokio::test(start_paused = true)]
async fn a_policy_without_a_defer_section_defers_nothing_even_with_a_sink() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_rate_limited(Some("600"))],
    );
    let mut policy = Policy::batch();
    policy.budget.defer = None;
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&policy, sink.clone());
    let resp = svc
        .oneshot(request(&mock.url()))
        .await
        .expect("the provider's answer");
    assert_eq!(resp.status(), 429);
    assert!(sink.records().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_chain_whose_backup_named_no_time_is_due_after_the_policys_delay() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_rate_limited(Some("900"))],
    );
    mock.script(
        ScriptKey::model("backup-model"),
        (0..6).map(|_| Reply::openai_overloaded()),
    );
    let mut policy = Policy::batch();
    policy.retry.max_attempts = 1;
    policy.fallback.routes = vec![
        tower_llm_resilience::policy::RouteConfig::new("backup")
            .base_url(format!("{}/backup", mock.url()))
            .model("backup-model"),
    ];
    let sink = Arc::new(MemoryDeferSink::new());
    let svc = stack(&policy, sink.clone());
    let deferred = deferred_of(svc.oneshot(request(&mock.url())).await);
    // The backup may be back any time: the first delay, not the primary's 900 s.
    assert_eq!(mock.request_count(), 2);
    assert_eq!(deferred.retry_in, DeferPolicy::default().first_delay);
}
