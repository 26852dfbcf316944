//! Hedging the slow tail: a request whose first attempt has not reached its first token after
//! the delay gets one more attempt, and the first to reach its commit point is served. The
//! real hyper-util client against `MockProvider` on loopback, under a paused clock.
#![cfg(feature = "testing")]
#![allow(clippy::field_reassign_with_default)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::attempt_log::LocalEventKind;
use tower_llm_resilience::policy::{HedgePolicy, RetryBudgetPolicy, RouteConfig};
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{AttemptLog, Policy, ResilienceLayer, RouteName};

const SLOW: Duration = Duration::from_secs(20);
const DELAY: Duration = Duration::from_secs(1);
const SEC: Duration = Duration::from_secs(1);

/// The primary and one backup on `mock`, hedging after a fixed second.
fn policy(mock: &MockProvider) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(5);
    p.stream.first_token_timeout = Some(Duration::from_secs(30));
    p.hedge = HedgePolicy::after(DELAY);
    p.hedge.max_fraction = 1.0;
    p.fallback.routes = vec![
        RouteConfig::new("backup")
            .base_url(format!("{}/backup", mock.url()))
            .model("backup"),
    ];
    p
}

fn request(mock: &MockProvider, stream: bool, key: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut req = chat_request(&mock.url(), "gpt-4o", stream);
    if let Some(key) = key {
        req.headers_mut()
            .insert("idempotency-key", key.parse().expect("header"));
    }
    req
}

struct Served {
    status: u16,
    route: String,
    body: String,
    /// From the call to the response head, in virtual time.
    head_after: Duration,
    log: AttemptLog,
}

async fn send<S>(svc: &mut S, mut req: http::Request<Full<Bytes>>) -> Served
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<tower_llm_resilience::Body>,
            Error = tower_llm_resilience::Error,
        >,
{
    let log = AttemptLog::new();
    req.extensions_mut().insert(log.clone());
    let start = Instant::now();
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("an answer");
    let head_after = start.elapsed();
    let status = resp.status().as_u16();
    let route = resp.headers()["x-llm-route"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Served {
        status,
        route,
        body: String::from_utf8_lossy(&body).into_owned(),
        head_after,
        log,
    }
}

fn hedges(log: &AttemptLog) -> Vec<(String, Duration)> {
    log.events()
        .into_iter()
        .filter_map(|e| match e.kind {
            LocalEventKind::Hedged { after } => {
                Some((e.route.map(|r| r.to_string()).unwrap_or_default(), after))
            }
            _ => None,
        })
        .collect()
}

/// Each attempt's route and whether it was the cancelled one.
fn attempts(log: &AttemptLog) -> Vec<(String, bool)> {
    log.attempts()
        .iter()
        .map(|a| {
            (
                a.route
                    .as_ref()
                    .map(RouteName::to_string)
                    .unwrap_or_default(),
                a.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("cancelled")),
            )
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_primary_slow_to_its_first_token_loses_to_the_hedge_and_no_byte_of_it_is_served() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_stream("gpt-4o", &["slow ", "primary"]).delay_head(SLOW)],
    );
    mock.script(
        ScriptKey::model("backup"),
        [Reply::openai_stream("backup", &["quick ", "backup"])],
    );
    let mut svc = ResilienceLayer::new(&policy(&mock))
        .expect("valid")
        .layer(client());
    let served = send(&mut svc, request(&mock, true, Some("k-1"))).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.route, "backup");
    // The hedge started at the delay and answered at once: its head, at exactly one second.
    assert_eq!(served.head_after, DELAY);
    // Exactly one answer: the hedge's, every byte of it, none of the primary's.
    assert!(served.body.contains("quick "), "{}", served.body);
    assert!(served.body.contains("backup"), "{}", served.body);
    assert!(!served.body.contains("slow"), "{}", served.body);
    assert_eq!(served.body.matches("[DONE]").count(), 1, "{}", served.body);
    assert_eq!(hedges(&served.log), [("backup".to_owned(), DELAY)]);
    let mut seen = attempts(&served.log);
    seen.sort();
    assert_eq!(
        seen,
        [("backup".to_owned(), false), ("primary".to_owned(), true)],
        "both attempts are in the log, the primary's as cancelled"
    );
    let models: Vec<_> = mock.requests().into_iter().map(|r| r.model).collect();
    assert_eq!(
        models,
        [Some("gpt-4o".to_owned()), Some("backup".to_owned())]
    );
}

#[tokio::test(start_paused = true)]
async fn a_primary_that_answers_before_the_delay_is_never_hedged() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_chat("gpt-4o", "on time").delay_head(Duration::from_millis(999))],
    );
    let mut svc = ResilienceLayer::new(&policy(&mock))
        .expect("valid")
        .layer(client());
    let served = send(&mut svc, request(&mock, false, Some("k-2"))).await;
    assert_eq!(served.route, "primary");
    assert_eq!(served.head_after, Duration::from_millis(999));
    assert!(hedges(&served.log).is_empty());
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn no_hedge_for_a_request_that_is_not_safe_to_send_twice() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_chat("gpt-4o", "late").delay_head(SLOW)],
    );
    let mut svc = ResilienceLayer::new(&policy(&mock))
        .expect("valid")
        .layer(client());
    // A POST without an idempotency key (and a policy that sets none).
    let served = send(&mut svc, request(&mock, false, None)).await;
    assert_eq!(served.route, "primary");
    assert_eq!(served.head_after, SLOW);
    assert!(hedges(&served.log).is_empty());
    assert_eq!(mock.request_count(), 1);

    // The same request is safe once the policy sets a key on every request.
    let mut p = policy(&mock);
    p.idempotency.key_header = Some("idempotency-key".to_owned());
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_chat("gpt-4o", "late").delay_head(SLOW)],
    );
    let served = send(&mut svc, request(&mock, false, None)).await;
    assert_eq!(served.route, "backup");
    assert_eq!(served.head_after, DELAY);
}

#[tokio::test(start_paused = true)]
async fn the_hedge_rate_cap_holds() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        (0..24).map(|_| Reply::openai_chat("gpt-4o", "late").delay_head(Duration::from_secs(3))),
    );
    let mut p = policy(&mock);
    p.hedge.max_fraction = 0.25;
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    let mut hedged = Vec::new();
    for i in 0..24 {
        let served = send(&mut svc, request(&mock, false, Some(&format!("k-{i}")))).await;
        if served.route == "backup" {
            assert_eq!(served.head_after, DELAY);
            hedged.push(i);
        } else {
            assert_eq!(served.head_after, Duration::from_secs(3));
            assert!(hedges(&served.log).is_empty());
        }
    }
    // Ten hedges in hand at the start (each request tops them up by a quarter, never above
    // ten), then one for every four requests: every request slow, 15 of 24 hedged.
    assert_eq!(hedged, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 20]);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_draws_on_the_retry_budget() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_chat("gpt-4o", "late").delay_head(Duration::from_secs(3))],
    );
    let mut p = policy(&mock);
    p.budget.retry_budget = RetryBudgetPolicy::Ratio {
        ratio: 0.0,
        min_per_sec: 0,
        ttl: Duration::from_secs(10),
    };
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    let served = send(&mut svc, request(&mock, false, Some("k"))).await;
    assert_eq!(served.route, "primary");
    assert_eq!(served.head_after, Duration::from_secs(3));
    let denied: Vec<_> = served
        .log
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, LocalEventKind::RetryBudgetDenied))
        .map(|e| e.route.map(|r| r.to_string()))
        .collect();
    assert_eq!(denied, [Some("backup".to_owned())]);
    assert_eq!(mock.request_count(), 1, "the hedge was never sent");
}

#[tokio::test(start_paused = true)]
async fn a_same_route_hedge_races_the_route_against_itself() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        [
            Reply::openai_chat("gpt-4o", "first, slow").delay_head(SLOW),
            Reply::openai_chat("gpt-4o", "second, quick"),
        ],
    );
    let mut p = policy(&mock);
    p.hedge.same_route = true;
    p.fallback.routes.clear();
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    let served = send(&mut svc, request(&mock, false, Some("k"))).await;
    assert_eq!(served.route, "primary");
    assert_eq!(served.head_after, DELAY);
    assert!(served.body.contains("second, quick"), "{}", served.body);
    assert_eq!(hedges(&served.log), [("primary".to_owned(), DELAY)]);
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn every_attempt_to_a_route_carries_the_requests_one_key_for_it() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut p = policy(&mock);
    p.idempotency.key_header = Some("idempotency-key".to_owned());
    p.retry.max_attempts = 2;

    // A same-route hedge: the provider sees the same key twice and can answer it once.
    mock.script(
        ScriptKey::model("gpt-4o"),
        [
            Reply::openai_chat("gpt-4o", "first, slow").delay_head(SLOW),
            Reply::openai_chat("gpt-4o", "second, quick"),
        ],
    );
    let mut same = p.clone();
    same.hedge.same_route = true;
    same.fallback.routes.clear();
    let mut svc = ResilienceLayer::new(&same).expect("valid").layer(client());
    let served = send(&mut svc, request(&mock, false, None)).await;
    assert_eq!(hedges(&served.log), [("primary".to_owned(), DELAY)]);
    let keys: Vec<_> = mock
        .requests()
        .iter()
        .map(|r| r.headers.get("idempotency-key").cloned())
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(keys[0].is_some());
    assert_eq!(keys[0], keys[1]);

    // A retry and a hop: the primary's two attempts share a key; the backup, sent another
    // body, has its own.
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_server_error(), Reply::openai_server_error()],
    );
    mock.script(
        ScriptKey::model("backup"),
        [Reply::openai_chat("backup", "ok")],
    );
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    let served = send(&mut svc, request(&mock, false, None)).await;
    assert_eq!(served.route, "backup");
    let reqs = mock.requests();
    let keys: Vec<_> = reqs[2..]
        .iter()
        .map(|r| (r.model.clone(), r.headers.get("idempotency-key").cloned()))
        .collect();
    assert_eq!(keys.len(), 3);
    let models: Vec<_> = keys.iter().map(|(m, _)| m.as_deref()).collect();
    assert_eq!(models, [Some("gpt-4o"), Some("gpt-4o"), Some("backup")]);
    assert_eq!(keys[0].1, keys[1].1);
    assert!(keys[2].1.is_some());
    assert_ne!(keys[1].1, keys[2].1);
    assert_ne!(keys[0].1, reqs[0].headers.get("idempotency-key").cloned());
}

#[tokio::test(start_paused = true)]
async fn when_one_attempt_fails_the_other_still_answers() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut p = policy(&mock);
    // One attempt per route, so each side's failure is final for it.
    p.retry.max_attempts = 1;
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());

    // The primary fails at 1.5 s, while the hedge (sent at 1 s) is still on its way: the
    // hedge's answer at 2 s is served; the backup is not called a second time by a hop.
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_server_error().delay_head(Duration::from_millis(1500))],
    );
    mock.script(
        ScriptKey::model("backup"),
        [Reply::openai_chat("backup", "hedge").delay_head(Duration::from_secs(1))],
    );
    let served = send(&mut svc, request(&mock, false, Some("k-1"))).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.route, "backup");
    assert_eq!(served.head_after, Duration::from_secs(2));
    assert_eq!(mock.request_count(), 2);

    // The hedge fails at once while the primary is still on its way: the primary's answer
    // at 3 s is served.
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_chat("gpt-4o", "primary").delay_head(Duration::from_secs(3))],
    );
    mock.script(ScriptKey::model("backup"), [Reply::openai_server_error()]);
    let served = send(&mut svc, request(&mock, false, Some("k-2"))).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.route, "primary");
    assert_eq!(served.head_after, Duration::from_secs(3));
    assert!(served.body.contains("primary"));
    assert_eq!(mock.request_count(), 4);
}

#[test]
fn hedging_is_off_in_the_presets() {
    assert!(!Policy::interactive().hedge.enabled);
    assert!(!Policy::batch().hedge.enabled);
}

#[tokio::test(start_paused = true)]
async fn the_delay_follows_the_routes_observed_times_to_first_token() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut p = policy(&mock);
    p.hedge.delay = None;
    p.hedge.percentile = 0.9;
    p.hedge.min_samples = 10;
    p.hedge.min_delay = Duration::from_millis(100);
    p.hedge.max_delay = Duration::from_secs(5);
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    // Ten answers at 200 ms … 2 s: the 90th percentile is the ninth, 1.8 s.
    mock.script(
        ScriptKey::model("gpt-4o"),
        (1..=10)
            .map(|i| Reply::openai_chat("gpt-4o", "ok").delay_head(Duration::from_millis(i * 200)))
            .chain([Reply::openai_chat("gpt-4o", "late").delay_head(SLOW)]),
    );
    for i in 0..10 {
        let served = send(&mut svc, request(&mock, false, Some(&format!("k-{i}")))).await;
        assert_eq!(served.route, "primary");
        // Before ten observations the delay is the cap, 5 s: none of these is hedged.
        assert!(hedges(&served.log).is_empty());
    }
    let served = send(&mut svc, request(&mock, false, Some("k-slow"))).await;
    assert_eq!(served.route, "backup");
    assert_eq!(
        hedges(&served.log),
        [("backup".to_owned(), Duration::from_millis(1800))]
    );
    assert_eq!(served.head_after, Duration::from_millis(1800));
}

#[tokio::test(start_paused = true)]
async fn no_hedge_once_the_first_attempt_has_failed_for_good() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut p = policy(&mock);
    p.fallback.routes = vec![
        RouteConfig::new("large")
            .base_url(format!("{}/large", mock.url()))
            .model("large")
            .larger_context(),
    ];
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    // The primary's context is too small (a deterministic failure, at 0.5 s); the chain goes
    // to the larger route, which is slow to its first token. No hedge is started for it: the
    // request's one hedge belonged to its first attempt, and that attempt failed for good.
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_context_length().delay_head(Duration::from_millis(500))],
    );
    mock.script(
        ScriptKey::model("large"),
        [Reply::openai_chat("large", "long answer").delay_head(Duration::from_secs(5))],
    );
    let served = send(&mut svc, request(&mock, false, Some("k"))).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.route, "large");
    assert_eq!(served.head_after, Duration::from_millis(5500));
    assert!(hedges(&served.log).is_empty(), "{:?}", served.log);
    assert_eq!(mock.request_count(), 2);
}

/// A store that answers every ask a little later, as one shared between replicas does.
struct LaterStore {
    inner: tower_llm_resilience::budget::store::MemoryStore,
    after: Duration,
}

mod later_store {
    use super::LaterStore;
    use std::time::Duration;
    use tower_llm_resilience::budget::store::{
        BudgetStore, Lease, RateDemand, Refusal, SpendStatus, StoreFuture,
    };

    fn later<T: Send + 'static>(after: Duration, f: StoreFuture<T>) -> StoreFuture<T> {
        StoreFuture::new(async move {
            tokio::time::sleep(after).await;
            f.await
        })
    }

    impl BudgetStore for LaterStore {
        fn reserve(
            &self,
            owner: &str,
            lease: Lease,
            amount: u64,
            cap: u64,
            window: Duration,
        ) -> StoreFuture<Result<(), Refusal>> {
            later(
                self.after,
                self.inner.reserve(owner, lease, amount, cap, window),
            )
        }
        fn release(&self, owner: &str, lease: Lease, amount: u64, window: Duration) {
            self.inner.release(owner, lease, amount, window);
        }
        fn settle(&self, owner: &str, lease: Lease, reserved: u64, charged: u64, window: Duration) {
            self.inner.settle(owner, lease, reserved, charged, window);
        }
        fn adjust(&self, owner: &str, refund: u64, charge: u64, window: Duration) {
            self.inner.adjust(owner, refund, charge, window);
        }
        fn status(
            &self,
            owner: &str,
            window: Duration,
        ) -> StoreFuture<Result<SpendStatus, Refusal>> {
            later(self.after, self.inner.status(owner, window))
        }
        fn take(&self, key: &str, demands: &[RateDemand]) -> StoreFuture<Result<(), Refusal>> {
            later(self.after, self.inner.take(key, demands))
        }
    }
}

/// The hedging stack with a spend cap of `cap` (price 1 per million tokens) kept in a store
/// that answers 10 ms later.
fn capped(
    mock: &MockProvider,
    cap: f64,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<tower_llm_resilience::Body>,
    Error = tower_llm_resilience::Error,
> {
    capped_with(policy(mock), cap, Duration::from_millis(10))
}

/// The stack of `p` with a spend cap of `cap` kept in a store that answers `after` later.
fn capped_with(
    mut p: Policy,
    cap: f64,
    after: Duration,
) -> impl Service<
    http::Request<Full<Bytes>>,
    Response = http::Response<tower_llm_resilience::Body>,
    Error = tower_llm_resilience::Error,
> {
    let mut spend = tower_llm_resilience::policy::SpendPolicy::default();
    spend.cap = cap;
    spend.default_owner = Some("team".to_owned());
    spend.default_price = Some(tower_llm_resilience::policy::Price::new(1.0, 1.0));
    p.budget.spend = Some(spend);
    let store = std::sync::Arc::new(LaterStore {
        inner: tower_llm_resilience::budget::store::MemoryStore::new(),
        after,
    });
    let layer = ResilienceLayer::new(&p).expect("valid").budget_store(store);
    layer.layer(client())
}

#[tokio::test(start_paused = true)]
async fn a_hedge_waits_for_a_shared_stores_reservation_then_races() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_chat("gpt-4o", "late").delay_head(SLOW)],
    );
    mock.script(
        ScriptKey::model("backup"),
        [Reply::openai_chat("backup", "hedge")],
    );
    let mut svc = capped(&mock, 1.0);
    let served = send(&mut svc, request(&mock, false, Some("k"))).await;
    assert_eq!(served.route, "backup");
    // 10 ms for the request's own reservation, the delay, 10 ms for the hedge's.
    assert_eq!(
        served.head_after,
        Duration::from_millis(10) + DELAY + Duration::from_millis(10)
    );
    assert_eq!(hedges(&served.log), [("backup".to_owned(), DELAY)]);

    // A cap with no room for the hedge: the store refuses it, and the primary answers.
    // Room for one attempt (about 71 tokens at 1 unit per million), not for two.
    let mut svc = capped(&mock, 0.0001);
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_chat("gpt-4o", "late").delay_head(Duration::from_secs(3))],
    );
    let served = send(&mut svc, request(&mock, false, Some("k2"))).await;
    assert_eq!(served.route, "primary");
    let denied: Vec<_> = served
        .log
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, LocalEventKind::BudgetDenied))
        .map(|e| e.route.map(|r| r.to_string()))
        .collect();
    assert_eq!(denied, [Some("backup".to_owned())], "{:?}", served.log);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_never_sent_leaves_the_chain_its_hop() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut p = policy(&mock);
    p.retry.max_attempts = 1;
    p.fallback.max_hops = 1;
    // Each reservation takes a second: the request's own (0–1 s), the hedge's from 2 s.
    // The primary fails at 2.5 s, while the hedge still waits for its reservation.
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_server_error().delay_head(Duration::from_millis(1500))],
    );
    mock.script(
        ScriptKey::model("backup"),
        [Reply::openai_chat("backup", "hop")],
    );
    let mut svc = capped_with(p, 1.0, SEC);
    let served = send(&mut svc, request(&mock, false, Some("k"))).await;
    // The hedge was never sent, so the chain's one hop is still there for the backup.
    assert_eq!(served.status, 200, "{:?}", served.log);
    assert_eq!(served.route, "backup");
    let models: Vec<_> = mock.requests().into_iter().map(|r| r.model).collect();
    assert_eq!(
        models,
        [Some("gpt-4o".to_owned()), Some("backup".to_owned())]
    );
}

#[tokio::test(start_paused = true)]
async fn a_backup_the_hedge_failed_on_is_not_hopped_to_again() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut p = policy(&mock);
    p.retry.max_attempts = 1;
    p.fallback.routes.push(
        RouteConfig::new("second")
            .base_url(format!("{}/second", mock.url()))
            .model("second"),
    );
    // The hedge (sent at 1 s) fails on the backup at once; the primary fails at 3 s.
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_server_error().delay_head(Duration::from_secs(3))],
    );
    mock.script(ScriptKey::model("backup"), [Reply::openai_server_error()]);
    mock.script(
        ScriptKey::model("second"),
        [Reply::openai_chat("second", "ok")],
    );
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    let served = send(&mut svc, request(&mock, false, Some("k"))).await;
    assert_eq!(served.status, 200, "{:?}", served.log);
    assert_eq!(served.route, "second");
    let models: Vec<_> = mock.requests().into_iter().map(|r| r.model).collect();
    assert_eq!(
        models,
        [
            Some("gpt-4o".to_owned()),
            Some("backup".to_owned()),
            Some("second".to_owned())
        ]
    );
}
