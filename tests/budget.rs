//! `BudgetLayer` end to end: the real hyper-util client against `MockProvider` on loopback.
#![cfg(feature = "testing")]
// Policies are built the way users must build them (the sections are `#[non_exhaustive]`).
#![allow(clippy::field_reassign_with_default)]

use std::time::Duration;

#[path = "support/log.rs"]
mod log;
use log::response_log as log_of;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{ServiceExt, service_fn};
use tower_layer::Layer;
use tower_llm_resilience::attempt_log::{LocalEventKind, Outcome};
use tower_llm_resilience::budget::{Budget, BudgetLayer, BudgetOwner, SpendStatus};
use tower_llm_resilience::policy::{
    AdmissionMode, BudgetPolicy, ChargeRule, Price, RateKey, RateLimitPolicy, SpendPolicy,
};
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{AttemptLog, ErrorKind, RouteName};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn start() -> MockProvider {
    MockProvider::start().await.expect("mock starts")
}

/// One micro unit per token in and out; owner `team` unless the request names one.
fn spend() -> SpendPolicy {
    let mut s = SpendPolicy::default();
    s.cap = 1.0;
    s.default_price = Some(Price::new(1.0, 1.0));
    s.default_owner = Some("team".to_owned());
    s
}

fn budget(policy: BudgetPolicy) -> (BudgetLayer, Budget<Client>) {
    let layer = BudgetLayer::new(policy).expect("valid policy");
    let svc = layer.layer(client());
    (layer, svc)
}

#[tokio::test(start_paused = true)]
async fn spend_settles_with_the_usage_the_provider_reports() {
    let mock = start().await;
    mock.script(
        ScriptKey::model("json"),
        [Reply::openai_chat("json", "Hello there friend")],
    );
    mock.script(
        ScriptKey::model("openai-stream"),
        [Reply::openai_stream("openai-stream", &["Hel", "lo"])],
    );
    mock.script(
        ScriptKey::model("anthropic-stream"),
        [Reply::anthropic_stream(
            "anthropic-stream",
            &["Hel", "lo", "!"],
        )],
    );
    let mut policy = BudgetPolicy::default();
    policy.spend = Some(spend());
    let (layer, svc) = budget(policy);
    let spend = layer.spend().expect("spend handle");

    // Reserved: 7 prompt tokens ("user" + "hello" = 9 bytes, and 4 for the message) + 64
    // output = 71.
    let resp = svc
        .clone()
        .oneshot(chat_request(&mock.url(), "json", false))
        .await
        .expect("response");
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(0, 71)
    );
    resp.into_body().collect().await.expect("body");
    // Charged what the provider reported: 9 prompt + 3 completion tokens.
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(12, 0)
    );

    let resp = svc
        .clone()
        .oneshot(chat_request(&mock.url(), "openai-stream", true))
        .await
        .expect("response");
    resp.into_body().collect().await.expect("body");
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(12 + 11, 0)
    );

    let mut req = chat_request(&mock.url(), "anthropic-stream", true);
    req.extensions_mut().insert(BudgetOwner::new("other"));
    let resp = svc.clone().oneshot(req).await.expect("response");
    resp.into_body().collect().await.expect("body");
    assert_eq!(
        spend.status("other").await.expect("store"),
        SpendStatus::new(9 + 3, 0)
    );
    assert_eq!(
        spend.status("team").await.expect("store"),
        SpendStatus::new(23, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_owner_sends_nothing() {
    let mock = start().await;
    let mut s = spend();
    s.cap = 0.0001; // 100 micro units: one reservation of 67 fits, two do not
    let mut policy = BudgetPolicy::default();
    policy.spend = Some(s);
    let (_, svc) = budget(policy);
    let first = svc
        .clone()
        .oneshot(chat_request(&mock.url(), "m", false))
        .await
        .expect("response");
    let second = svc
        .clone()
        .oneshot(chat_request(&mock.url(), "m", false))
        .await
        .expect_err("over the cap");
    assert_eq!(
        second.kind(),
        &ErrorKind::BudgetExhausted {
            owner: Some("team".to_owned())
        }
    );
    let log = second.attempt_log().expect("log");
    assert_eq!(log.attempt_count(), 0);
    assert_eq!(log.events()[0].kind, LocalEventKind::BudgetDenied);
    drop(first);
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn pacing_waits_for_the_reset_the_provider_announced() {
    let mock = start().await;
    mock.script(
        ScriptKey::Any,
        [
            Reply::ok()
                .header("x-ratelimit-remaining-requests", "0")
                .header("x-ratelimit-reset-requests", "5s"),
            Reply::ok(),
        ],
    );
    let mut policy = BudgetPolicy::default();
    policy.pacing = true;
    policy.admission = AdmissionMode::Queue {
        max_wait: Duration::from_secs(60),
        max_queued: 10,
    };
    let (_, svc) = budget(policy);
    let routed = |route: &str| {
        let mut req = chat_request(&mock.url(), "m", false);
        req.extensions_mut().insert(RouteName::new(route));
        req
    };
    let t0 = Instant::now();
    let first = svc.clone().oneshot(routed("a")).await.expect("response");
    assert_eq!(first.status(), 200);
    // Route b is not paused; route a waits for the reset.
    let b = svc.clone().oneshot(routed("b")).await.expect("response");
    assert_eq!(b.status(), 200);
    let a = svc.clone().oneshot(routed("a")).await.expect("response");
    assert_eq!(a.status(), 200);
    let arrivals: Vec<Duration> = mock.requests().iter().map(|r| r.at - t0).collect();
    assert_eq!(
        arrivals,
        [Duration::ZERO, Duration::ZERO, Duration::from_secs(5)]
    );
    let events: Vec<LocalEventKind> = log_of(&a).events().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        events,
        [LocalEventKind::Queued {
            waited: Duration::from_secs(5)
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_keyed_by_owner_gives_each_owner_its_own_bucket() {
    let mock = start().await;
    let mut rate = RateLimitPolicy::default();
    rate.requests_per_second = Some(1.0);
    rate.burst = 1;
    rate.key = RateKey::Owner;
    let mut policy = BudgetPolicy::default();
    policy.rate_limit = Some(rate);
    policy.admission = AdmissionMode::Reject;
    let (_, svc) = budget(policy);
    // Owner `a` is named by the owner header the layer reads, owner `b` by the extension.
    let of_a = || {
        let mut req = chat_request(&mock.url(), "m", false);
        req.headers_mut()
            .insert("x-llm-budget-owner", http::HeaderValue::from_static("a"));
        req
    };
    let of_b = || {
        let mut req = chat_request(&mock.url(), "m", false);
        req.extensions_mut().insert(BudgetOwner::new("b"));
        req
    };
    let refused =
        |r: Result<http::Response<tower_llm_resilience::Body>, tower_llm_resilience::Error>,
         retry_in: Duration| {
            let e = r.expect_err("over the owner's rate");
            assert_eq!(e.kind(), &ErrorKind::RateLimited { retry_in });
            let log = e.attempt_log().expect("log");
            assert_eq!(log.attempt_count(), 0);
            let events: Vec<LocalEventKind> = log.events().into_iter().map(|ev| ev.kind).collect();
            assert_eq!(events, [LocalEventKind::RateLimited { retry_in }]);
        };
    let t0 = Instant::now();

    let first_a = svc.clone().oneshot(of_a()).await.expect("a's first");
    assert_eq!(first_a.status(), 200);
    // A's second, at once: its bucket of one is empty for exactly one second.
    refused(svc.clone().oneshot(of_a()).await, Duration::from_secs(1));
    // The bucket is the owner's, not the route's: `a` on another route is refused too.
    let mut elsewhere = of_a();
    elsewhere.extensions_mut().insert(RouteName::new("other"));
    refused(svc.clone().oneshot(elsewhere).await, Duration::from_secs(1));
    // B's first request on the same route is admitted; its second is not.
    let first_b = svc.clone().oneshot(of_b()).await.expect("b's first");
    assert_eq!(first_b.status(), 200);
    refused(svc.clone().oneshot(of_b()).await, Duration::from_secs(1));
    assert_eq!(mock.request_count(), 2);

    // The exact time until A's capacity returns, then A is admitted again.
    tokio::time::advance(Duration::from_millis(400)).await;
    refused(
        svc.clone().oneshot(of_a()).await,
        Duration::from_millis(600),
    );
    tokio::time::advance(Duration::from_millis(600)).await;
    let again = svc.clone().oneshot(of_a()).await.expect("a after a second");
    assert_eq!(again.status(), 200);
    let arrivals: Vec<Duration> = mock.requests().iter().map(|r| r.at - t0).collect();
    assert_eq!(
        arrivals,
        [Duration::ZERO, Duration::ZERO, Duration::from_secs(1)]
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_ends_a_request_the_provider_never_answers() {
    let mock = start().await;
    mock.script(ScriptKey::Any, [Reply::never()]);
    let mut policy = BudgetPolicy::default();
    policy.deadline = Some(Duration::from_secs(3));
    let (_, svc) = budget(policy);
    let t0 = Instant::now();
    let e = svc
        .oneshot(chat_request(&mock.url(), "m", false))
        .await
        .expect_err("deadline");
    assert_eq!(Instant::now() - t0, Duration::from_secs(3));
    assert_eq!(e.kind(), &ErrorKind::DeadlineExceeded);
    let snap = e.attempt_log().expect("log").snapshot();
    assert!(matches!(snap.outcome, Some(Outcome::Error { .. })));
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn inner_layers_see_the_deadline_and_the_retry_budget() {
    let mock = start().await;
    let mut policy = BudgetPolicy::default();
    policy.deadline = Some(Duration::from_secs(30));
    let layer = BudgetLayer::new(policy).expect("valid policy");
    let http = client();
    let svc = layer.layer(service_fn(move |req: http::Request<Full<Bytes>>| {
        let ctx = tower_llm_resilience::RequestContext::of(&req);
        let deadline = ctx.and_then(|c| c.deadline());
        let budget = ctx.and_then(|c| c.retry_budget());
        let http = http.clone();
        async move {
            // Paused time: the deadline is exactly 30 s away when the inner service is called.
            assert_eq!(
                deadline.map(|d| d.remaining()),
                Some(Duration::from_secs(30))
            );
            assert!(budget.is_some());
            http.oneshot(req).await
        }
    }));
    let resp = svc
        .oneshot(chat_request(&mock.url(), "m", false))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        log_of(&resp).snapshot().outcome,
        Some(Outcome::Success { status: 200 })
    );
}

// ------------------------------------------------- with RetryLayer and FallbackLayer inside

mod with_recovery_layers {
    use super::*;
    use tower_llm_resilience::attempt_log::{Decision, StopReason, WaitSource};
    use tower_llm_resilience::fallback::FallbackLayer;
    use tower_llm_resilience::policy::{BackoffPolicy, Policy, RetryBudgetPolicy, RouteConfig};
    use tower_llm_resilience::retry::RetryLayer;

    /// Budget → Fallback (primary + one backup on the same mock) → Retry (3 attempts per
    /// route) → the hyper-util client. Without a budget, one request makes 6 calls.
    fn stack(
        mock: &MockProvider,
        retry_budget: RetryBudgetPolicy,
    ) -> impl tower::Service<
        http::Request<Full<Bytes>>,
        Response = http::Response<tower_llm_resilience::Body>,
        Error = tower_llm_resilience::Error,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let mut policy = Policy::interactive();
        policy.retry.max_attempts = 3;
        policy.retry.backoff =
            BackoffPolicy::new(Duration::from_millis(1), Duration::from_millis(2));
        policy.retry.seed = Some(7);
        policy
            .fallback
            .routes
            .push(RouteConfig::new("backup").base_url(format!("{}/backup/v1", mock.url())));
        policy.fallback.max_hops = 1;
        policy.budget.retry_budget = retry_budget;
        let budget = BudgetLayer::from_policy(&policy).expect("budget layer");
        let fallback = FallbackLayer::from_policy(&policy).expect("fallback layer");
        let retry = RetryLayer::from_policy(&policy).expect("retry layer");
        budget.layer(fallback.layer(retry.layer(client())))
    }

    /// Sends `n` requests one after another; returns each request's log.
    async fn run<S>(svc: &S, mock: &MockProvider, n: usize) -> Vec<AttemptLog>
    where
        S: tower::Service<
                http::Request<Full<Bytes>>,
                Response = http::Response<tower_llm_resilience::Body>,
                Error = tower_llm_resilience::Error,
            > + Clone,
    {
        let mut logs = Vec::new();
        for _ in 0..n {
            let resp = svc
                .clone()
                .oneshot(chat_request(&mock.url(), "m", false))
                .await
                .expect("the primary's failure response");
            assert_eq!(resp.status(), 503);
            let log = log_of(&resp);
            assert!(matches!(
                log.snapshot().outcome,
                Some(Outcome::ProviderFailure { status: 503, .. })
            ));
            resp.into_body().collect().await.expect("body");
            logs.push(log);
        }
        logs
    }

    fn budget_denials(log: &AttemptLog) -> usize {
        log.events()
            .iter()
            .filter(|e| e.kind == LocalEventKind::RetryBudgetDenied)
            .count()
    }

    fn stopped_by_budget(log: &AttemptLog) -> usize {
        log.attempts()
            .iter()
            .flat_map(|a| a.decisions.clone())
            .filter(|d| *d == Decision::Stop(StopReason::RetryBudgetDenied))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn under_total_failure_calls_stay_within_the_retry_budget() {
        let mock = start().await;
        mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);

        // Control: with a budget far larger than the demand, every request makes all 6 calls.
        let ample = RetryBudgetPolicy::Ratio {
            ratio: 1.0,
            min_per_sec: 1000,
            ttl: Duration::from_secs(60),
        };
        let logs = run(&stack(&mock, ample), &mock, 5).await;
        assert_eq!(mock.request_count(), 30);
        assert!(logs.iter().all(|l| l.attempt_count() == 6));
        assert!(logs.iter().all(|l| budget_denials(l) == 0));

        // 100 % failure, 100 requests, a budget of 20 % of requests plus 1 per second over 60 s:
        // at most 100 + 20 + 60 calls, where an unbudgeted stack would make 600.
        mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
        let before = mock.request_count();
        let tight = RetryBudgetPolicy::Ratio {
            ratio: 0.2,
            min_per_sec: 1,
            ttl: Duration::from_secs(60),
        };
        let t0 = Instant::now();
        let logs = run(&stack(&mock, tight), &mock, 100).await;
        assert!(
            Instant::now() - t0 < Duration::from_secs(60),
            "all within one window"
        );
        let calls = mock.request_count() - before;
        assert_eq!(
            calls,
            logs.iter().map(AttemptLog::attempt_count).sum::<usize>()
        );
        // The budget is spent to the last whole retry, never beyond.
        assert_eq!(calls, 100 + 20 + 60);
        // The budget holds 60 (1 per second over 60 s) plus 0.2 per request seen. The first 12
        // requests take 5 retries and hops each (60); after 13 deposits it holds 62.6, so the
        // 13th gets two retries and its hop is refused. From then on every fifth request's
        // deposit completes one more whole retry: requests 15, 20, …, 100 make 2 calls, the
        // others 1 — 62 + 18 = 80 granted.
        let expected: Vec<usize> = (1..=100)
            .map(|n| match n {
                1..=12 => 6,
                13 => 3,
                n if n % 5 == 0 => 2,
                _ => 1,
            })
            .collect();
        let counts: Vec<usize> = logs.iter().map(AttemptLog::attempt_count).collect();
        assert_eq!(counts, expected);
        assert_eq!(expected.iter().sum::<usize>(), 180);
        // Every retry or hop the budget refused is logged as such, both as an event and as the
        // stop decision on the attempt it followed: none for the first 12, one for the 13th
        // (its hop), two for every later request (its retry on the primary, then its hop).
        let denials: Vec<usize> = logs.iter().map(budget_denials).collect();
        let expected: Vec<usize> = (1..=100)
            .map(|n| match n {
                1..=12 => 0,
                13 => 1,
                _ => 2,
            })
            .collect();
        assert_eq!(denials, expected);
        assert_eq!(
            logs.iter().map(stopped_by_budget).collect::<Vec<_>>(),
            expected
        );
        let short = logs.iter().filter(|l| l.attempt_count() < 6).count();
        assert_eq!(short, 88);
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_layer_respects_the_deadline_set_here() {
        let mock = start().await;
        // The server asks for 10 s; the request's deadline is 5 s away.
        mock.script(
            ScriptKey::Any,
            [Reply::openai_rate_limited(Some("10")), Reply::ok()],
        );
        let mut policy = Policy::interactive();
        policy.retry.max_attempts = 5;
        policy.retry.max_server_wait = Duration::from_secs(60);
        policy.retry.max_elapsed = Duration::from_secs(600);
        policy.retry.seed = Some(7);
        policy.budget.deadline = Some(Duration::from_secs(5));
        let budget = BudgetLayer::from_policy(&policy).expect("budget layer");
        let retry = RetryLayer::from_policy(&policy).expect("retry layer");
        let svc = budget.layer(retry.layer(client()));
        let t0 = Instant::now();
        let resp = svc
            .oneshot(chat_request(&mock.url(), "m", false))
            .await
            .expect("the 429 is handed back");
        // No sleep past the deadline and no second call: the 429 comes back at once.
        assert_eq!(resp.status(), 429);
        assert_eq!(Instant::now() - t0, Duration::ZERO);
        assert_eq!(mock.request_count(), 1);
        let log = log_of(&resp);
        let last = log.attempts()[0].decisions.last().cloned();
        assert_eq!(last, Some(Decision::Stop(StopReason::DeadlineExceeded)));

        // With the deadline further out, the same wait is honoured.
        mock.script(
            ScriptKey::Any,
            [Reply::openai_rate_limited(Some("2")), Reply::ok()],
        );
        let svc = budget.layer(retry.layer(client()));
        let t0 = Instant::now();
        let resp = svc
            .oneshot(chat_request(&mock.url(), "m", false))
            .await
            .expect("response");
        assert_eq!(resp.status(), 200);
        // The server's 2 s floor plus the seeded jitter on top (at most a fifth of the hint):
        // 69 ms with seed 7. The wait logged is the wait that happened, and the retry is sent
        // exactly then.
        let wait = Duration::from_millis(2069);
        assert_eq!(Instant::now() - t0, wait);
        let log = log_of(&resp);
        assert_eq!(log.attempt_count(), 2);
        assert_eq!(log.attempts()[0].wait(), Some((wait, WaitSource::Server)));
        let arrivals: Vec<Duration> = mock.requests()[1..].iter().map(|r| r.at - t0).collect();
        assert_eq!(arrivals, [Duration::ZERO, wait]);
    }

    // ------------------------------------------ the spend cap reserves every attempt

    /// Each attempt of `chat_request` reserves 7 prompt (3 for the text, 4 for its message) +
    /// 64 output tokens at 1 micro unit per token.
    const PER_ATTEMPT: u64 = 71;

    /// Budget → Fallback (primary + `backup` on the same mock) → Retry (3 attempts per route)
    /// → the hyper-util client, with a spend cap that holds `attempts` attempts' reservations
    /// and an ample retry budget: without the cap, a request under persistent failure makes 6
    /// calls.
    fn spend_stack(
        mock: &MockProvider,
        attempts: u64,
        rule: ChargeRule,
        edit: impl FnOnce(&mut Policy),
    ) -> (
        tower_llm_resilience::budget::SpendHandle,
        impl tower::Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<tower_llm_resilience::Body>,
            Error = tower_llm_resilience::Error,
            Future: Send,
        > + Clone
        + Send
        + 'static,
    ) {
        let mut policy = Policy::interactive();
        policy.retry.max_attempts = 3;
        policy.retry.backoff =
            BackoffPolicy::new(Duration::from_millis(1), Duration::from_millis(2));
        policy.retry.seed = Some(7);
        policy
            .fallback
            .routes
            .push(RouteConfig::new("backup").base_url(format!("{}/backup/v1", mock.url())));
        policy.fallback.max_hops = 1;
        policy.budget.retry_budget = RetryBudgetPolicy::Ratio {
            ratio: 1.0,
            min_per_sec: 1000,
            ttl: Duration::from_secs(60),
        };
        let mut s = spend();
        s.cap = (attempts * PER_ATTEMPT) as f64 / 1e6;
        s.charge_failed = rule;
        policy.budget.spend = Some(s);
        edit(&mut policy);
        let budget = BudgetLayer::from_policy(&policy).expect("budget layer");
        let handle = budget.spend().expect("spend handle");
        let fallback = FallbackLayer::from_policy(&policy).expect("fallback layer");
        let retry = RetryLayer::from_policy(&policy).expect("retry layer");
        (handle, budget.layer(fallback.layer(retry.layer(client()))))
    }

    fn stops(log: &AttemptLog) -> Vec<StopReason> {
        log.attempts()
            .iter()
            .flat_map(|a| a.decisions.clone())
            .filter_map(|d| match d {
                Decision::Stop(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn paths(mock: &MockProvider) -> Vec<String> {
        mock.requests().into_iter().map(|r| r.path).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn under_persistent_failure_a_request_makes_exactly_the_attempts_its_cap_holds() {
        const PRIMARY: &str = "/v1/chat/completions";
        const BACKUP: &str = "/backup/v1/chat/completions";
        for (attempts, rule, calls) in [
            // One retry on the primary, then neither a second retry nor the hop is admitted.
            (2, ChargeRule::ReportedOrReserved, vec![PRIMARY; 2]),
            // Three attempts on the primary, the hop, then no retry on the backup.
            (
                4,
                ChargeRule::ReportedOnly,
                vec![PRIMARY, PRIMARY, PRIMARY, BACKUP],
            ),
            (
                4,
                ChargeRule::Reserved,
                vec![PRIMARY, PRIMARY, PRIMARY, BACKUP],
            ),
            // Control: a cap that holds all six attempts.
            (
                6,
                ChargeRule::Reserved,
                vec![PRIMARY, PRIMARY, PRIMARY, BACKUP, BACKUP, BACKUP],
            ),
        ] {
            let mock = start().await;
            mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
            let (spend, svc) = spend_stack(&mock, attempts, rule, |_| {});
            let resp = svc
                .oneshot(chat_request(&mock.url(), "m", false))
                .await
                .expect("the primary's failure response");
            assert_eq!(resp.status(), 503);
            assert_eq!(paths(&mock), calls, "cap of {attempts}, {rule:?}");
            let log = log_of(&resp);
            let denied = log
                .events()
                .iter()
                .filter(|e| e.kind == LocalEventKind::BudgetDenied)
                .count();
            let stopped = stops(&log)
                .iter()
                .filter(|r| **r == StopReason::SpendCapReached)
                .count();
            if attempts < 6 {
                assert!(denied >= 1, "{log}");
                assert_eq!(denied, stopped, "{log}");
                assert!(log.to_string().contains("spend_cap_reached"), "{log}");
            } else {
                assert_eq!((denied, stopped), (0, 0), "{log}");
            }
            // While the answer is in hand, the reservations of the attempts made are held —
            // never more than the cap.
            assert_eq!(
                spend.status("team").await.expect("store"),
                SpendStatus::new(0, attempts * PER_ATTEMPT)
            );
            resp.into_body().collect().await.expect("body");
            // Settled: a 503 was never accepted, so only `Reserved` charges its reservation.
            let charged = match rule {
                ChargeRule::Reserved => attempts * PER_ATTEMPT,
                _ => 0,
            };
            assert_eq!(
                spend.status("team").await.expect("store"),
                SpendStatus::new(charged, 0),
                "{rule:?}"
            );
            assert!(charged <= spend.cap_micros());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedges_loser_keeps_its_reservation_for_what_it_may_have_cost() {
        let mock = start().await;
        mock.script(
            ScriptKey::path("/v1/chat/completions"),
            [Reply::openai_chat("m", "slow").delay_head(Duration::from_secs(20))],
        );
        mock.script(
            ScriptKey::path("/backup/v1/chat/completions"),
            [Reply::openai_chat("m", "Hello there friend")],
        );
        let (spend, svc) = spend_stack(&mock, 4, ChargeRule::ReportedOrReserved, |p| {
            p.hedge = tower_llm_resilience::policy::HedgePolicy::after(Duration::from_secs(1));
            p.idempotency.key_header = Some("idempotency-key".to_owned());
        });
        let resp = svc
            .oneshot(chat_request(&mock.url(), "m", false))
            .await
            .expect("served");
        assert_eq!(resp.headers()["x-llm-route"], "backup");
        // While the answer is in hand both attempts' reservations are held: the primary's,
        // made at admission, and the hedge's.
        assert_eq!(
            spend.status("team").await.expect("store"),
            SpendStatus::new(0, 2 * PER_ATTEMPT)
        );
        resp.into_body().collect().await.expect("body");
        // Settled: the winner at its reported usage, the cancelled primary — sent, so possibly
        // billed — at its reservation.
        let settled = spend.status("team").await.expect("store");
        assert_eq!(settled.reserved, 0, "{settled:?}");
        assert!(settled.spent > PER_ATTEMPT, "{settled:?}");
        assert!(settled.spent < 2 * PER_ATTEMPT, "{settled:?}");
        assert_eq!(mock.request_count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hop_the_cap_cannot_pay_for_passes_to_a_cheaper_route() {
        // Two backups: `pricey` costs a thousand times more than the cap has left, `backup`
        // what one attempt costs. The cap holds the primary's three attempts and one more.
        let mock = start().await;
        mock.script(
            ScriptKey::path("/v1/chat/completions"),
            (0..3).map(|_| Reply::openai_overloaded()),
        );
        mock.script(
            ScriptKey::path("/backup/v1/chat/completions"),
            [Reply::openai_chat("m", "Hello there friend")],
        );
        let (_, svc) = spend_stack(&mock, 4, ChargeRule::Reserved, |p| {
            p.fallback.routes.insert(
                0,
                RouteConfig::new("pricey").base_url(format!("{}/pricey/v1", mock.url())),
            );
            p.fallback.max_hops = 2;
            if let Some(s) = p.budget.spend.as_mut() {
                s.prices
                    .insert("pricey".to_owned(), Price::new(1000.0, 1000.0));
            }
        });
        let resp = svc
            .oneshot(chat_request(&mock.url(), "m", false))
            .await
            .expect("served");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            paths(&mock),
            [
                "/v1/chat/completions",
                "/v1/chat/completions",
                "/v1/chat/completions",
                "/backup/v1/chat/completions"
            ],
            "the pricey route is never called"
        );
        let log = log_of(&resp);
        let denied: Vec<_> = log
            .events()
            .into_iter()
            .filter(|e| e.kind == LocalEventKind::BudgetDenied)
            .map(|e| e.route.map(|r| r.to_string()))
            .collect();
        assert_eq!(denied, [Some("pricey".to_owned())], "{log}");
        assert_eq!(
            resp.headers()
                .get("x-llm-route")
                .and_then(|v| v.to_str().ok()),
            Some("backup")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_owner_never_hops_to_a_route_of_another_budget_owner() {
        // The primary's provider account is out of quota; the backup bills another, approved
        // account. The spend cap is the request owner's: the hop spends `team`'s cap too.
        let approved = |p: &mut Policy| {
            p.fallback.primary_budget_owner = Some("main-account".to_owned());
            p.fallback.approved_budget_owners = vec!["reserve-account".to_owned()];
            p.fallback.routes[0].budget_owner = Some("reserve-account".to_owned());
        };
        let mock = start().await;
        mock.script(
            ScriptKey::path("/v1/chat/completions"),
            [Reply::openai_insufficient_quota()],
        );
        mock.script(
            ScriptKey::path("/backup/v1/chat/completions"),
            [Reply::openai_chat("m", "Hello there friend")],
        );

        // `team`'s cap holds one attempt: the quota failure comes back, the backup is never
        // called, and nothing is booked to anyone.
        let (spend, svc) = spend_stack(&mock, 1, ChargeRule::Reserved, approved);
        let resp = svc
            .oneshot(chat_request(&mock.url(), "m", false))
            .await
            .expect("the primary's failure response");
        assert_eq!(resp.status(), 429);
        assert_eq!(paths(&mock), ["/v1/chat/completions"]);
        let log = log_of(&resp);
        // The retry layer does not retry a quota failure; the chain's hop is refused.
        assert_eq!(
            stops(&log),
            [StopReason::NotRetryable, StopReason::SpendCapReached]
        );
        let events = log.events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, LocalEventKind::BudgetDenied);
        assert_eq!(events[0].route, Some(RouteName::new("backup")));
        resp.into_body().collect().await.expect("body");
        // `Reserved` charges the quota failure's reservation, to `team` alone.
        assert_eq!(
            spend.status("team").await.expect("store"),
            SpendStatus::new(PER_ATTEMPT, 0)
        );
        for other in ["main-account", "reserve-account"] {
            assert_eq!(
                spend.status(other).await.expect("store"),
                SpendStatus::new(0, 0)
            );
        }

        // With room for two attempts the approved hop is made, and its answer is booked to
        // `team` (9 prompt + 3 completion tokens), the failed attempt costing nothing.
        let (spend, svc) = spend_stack(&mock, 2, ChargeRule::ReportedOnly, approved);
        let resp = svc
            .oneshot(chat_request(&mock.url(), "m", false))
            .await
            .expect("the backup's answer");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body");
        assert_eq!(
            spend.status("team").await.expect("store"),
            SpendStatus::new(12, 0)
        );
        for other in ["main-account", "reserve-account"] {
            assert_eq!(
                spend.status(other).await.expect("store"),
                SpendStatus::new(0, 0)
            );
        }
    }
}

// ------------------------------------- settlement through the whole stack, from the stream

mod through_the_whole_stack {
    use super::*;
    use std::collections::BTreeMap;
    use tower_llm_resilience::attempt_log::{StreamEnd, Usage};
    use tower_llm_resilience::budget::SpendReceipt;
    use tower_llm_resilience::classify::SharedClassifier;
    use tower_llm_resilience::policy::RouteConfig;
    use tower_llm_resilience::{Policy, ResilienceLayer};

    /// Micro units per token in and out, per route.
    const PRIMARY_PRICE: (u64, u64) = (2, 10);
    const BACKUP_PRICE: (u64, u64) = (3, 15);
    /// What `chat_request` reserves per attempt: 7 prompt tokens (3 for the text, 4 for its
    /// message) + 64 output tokens.
    const fn reservation((input, output): (u64, u64)) -> u64 {
        7 * input + 64 * output
    }

    /// The whole ladder with a spend cap and a price table (no default price): `primary`
    /// and a `backup` route on the same mock, failed attempts charged only reported usage.
    /// With `peek_limit`, the budget layer's own scan of the stream skips every line longer
    /// than it, so only the stream guard's record can say what the stream used.
    fn stack(
        mock: &MockProvider,
        peek_limit: Option<usize>,
    ) -> (
        tower_llm_resilience::budget::SpendHandle,
        tower_llm_resilience::Resilient<Client>,
    ) {
        let mut policy = Policy::interactive();
        policy.retry.seed = Some(7);
        policy.fallback.routes.push(
            RouteConfig::new("backup")
                .base_url(format!("{}/backup/v1", mock.url()))
                .model("backup-model"),
        );
        let price = |(i, o): (u64, u64)| Price::new(i as f64, o as f64);
        let mut s = SpendPolicy::default();
        s.cap = 1.0;
        s.default_owner = Some("team".to_owned());
        s.prices = BTreeMap::from([
            ("primary".to_owned(), price(PRIMARY_PRICE)),
            ("backup".to_owned(), price(BACKUP_PRICE)),
        ]);
        s.charge_failed = ChargeRule::ReportedOnly;
        policy.budget.spend = Some(s);
        let mut layer: ResilienceLayer = policy.layer().expect("valid policy");
        if let Some(limit) = peek_limit {
            layer = layer.classifier(SharedClassifier::default().with_peek_limit(limit));
        }
        let spend = layer.spend().expect("spend handle");
        (spend, layer.layer(client()))
    }

    async fn read_to_end(resp: http::Response<tower_llm_resilience::Body>) -> String {
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    #[tokio::test(start_paused = true)]
    async fn an_openai_stream_settles_with_the_usage_of_its_final_chunk() {
        for peek_limit in [None, Some(32)] {
            let mock = start().await;
            mock.script(
                ScriptKey::model("gpt-4o"),
                [Reply::openai_stream("gpt-4o", &["Hel", "lo"])],
            );
            let (spend, svc) = stack(&mock, peek_limit);
            let resp = svc
                .oneshot(chat_request(&mock.url(), "gpt-4o", true))
                .await
                .expect("response");
            assert_eq!(resp.status(), 200);
            let receipt = resp
                .extensions()
                .get::<SpendReceipt>()
                .cloned()
                .expect("receipt");
            let log = log_of(&resp);
            // Committed on the first event, not yet settled: the primary's reservation is held.
            let reserved = reservation(PRIMARY_PRICE);
            assert_eq!(reserved, 654);
            assert_eq!(receipt.owner(), "team");
            assert_eq!(receipt.reserved_micros(), reserved);
            assert_eq!(receipt.charged_micros(), None);
            assert_eq!(
                spend.status("team").await.expect("store"),
                SpendStatus::new(0, reserved)
            );

            let text = read_to_end(resp).await;
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            // The final chunk reports 9 prompt + 2 completion tokens, recorded by the guard.
            let attempts = log.attempts();
            assert_eq!(attempts.len(), 1);
            let record = attempts[0].stream.clone().expect("stream record");
            assert_eq!(record.end, StreamEnd::Complete);
            assert_eq!(record.usage, Some(Usage::new(9, 2)));
            // Charged exactly that at the primary's price; nothing stays reserved.
            let charge = 9 * PRIMARY_PRICE.0 + 2 * PRIMARY_PRICE.1;
            assert_eq!(charge, 38);
            assert_eq!(receipt.charged_micros(), Some(charge), "{peek_limit:?}");
            assert_eq!(
                spend.status("team").await.expect("store"),
                SpendStatus::new(charge, 0)
            );
            assert_eq!(
                spend.remaining_micros("team").await.expect("store"),
                1_000_000 - charge
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_anthropic_stream_on_the_backup_settles_at_the_backups_price() {
        for peek_limit in [None, Some(32)] {
            let mock = start().await;
            mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_overloaded()]);
            mock.script(
                ScriptKey::model("backup-model"),
                [Reply::anthropic_stream("backup-model", &["Hel", "lo", "!"])],
            );
            let (spend, svc) = stack(&mock, peek_limit);
            let resp = svc
                .oneshot(chat_request(&mock.url(), "gpt-4o", true))
                .await
                .expect("response");
            assert_eq!(resp.status(), 200);
            let receipt = resp
                .extensions()
                .get::<SpendReceipt>()
                .cloned()
                .expect("receipt");
            let log = log_of(&resp);
            // Three attempts on the primary, then the hop: each reserved at its route's price.
            let reserved = 3 * reservation(PRIMARY_PRICE) + reservation(BACKUP_PRICE);
            assert_eq!(reserved, 3 * 654 + 981);
            assert_eq!(receipt.reserved_micros(), reserved);
            assert_eq!(
                spend.status("team").await.expect("store"),
                SpendStatus::new(0, reserved)
            );

            let text = read_to_end(resp).await;
            assert!(text.contains("event: message_stop"), "{text}");
            let attempts = log.attempts();
            let routes: Vec<&str> = attempts
                .iter()
                .map(|a| a.route.as_ref().map_or("-", RouteName::as_str))
                .collect();
            assert_eq!(routes, ["primary", "primary", "primary", "backup"]);
            // `message_start` reports 9 input tokens, the final `message_delta` 3 output tokens.
            let record = attempts[3].stream.clone().expect("stream record");
            assert_eq!(record.end, StreamEnd::Complete);
            assert_eq!(record.usage, Some(Usage::new(9, 3)));
            // The 503s reported no usage and cost nothing (`ReportedOnly`); the answer is charged
            // at the backup's price, and every reservation is released.
            let charge = 9 * BACKUP_PRICE.0 + 3 * BACKUP_PRICE.1;
            assert_eq!(charge, 72);
            assert_eq!(receipt.charged_micros(), Some(charge), "{peek_limit:?}");
            assert_eq!(
                spend.status("team").await.expect("store"),
                SpendStatus::new(charge, 0)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_exported_record_holds_the_chain_owner_cost_and_usage() {
        let mock = start().await;
        mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_overloaded()]);
        mock.script(
            ScriptKey::model("backup-model"),
            [Reply::openai_chat("backup-model", "one two three four")],
        );
        let (_, svc) = stack(&mock, None);
        let resp = svc
            .oneshot(chat_request(&mock.url(), "gpt-4o", false))
            .await
            .expect("response");
        let log = log_of(&resp);
        // Nothing is booked before the answer's body has ended.
        assert_eq!(log.snapshot().cost_micros, None);
        read_to_end(resp).await;

        let record = serde_json::to_value(&log).expect("the log serializes");
        assert_eq!(record["requested_route"], "primary");
        assert_eq!(record["selected_route"], "backup");
        let chain: Vec<(&str, u64)> = record["attempts"]
            .as_array()
            .expect("attempts")
            .iter()
            .map(|a| {
                (
                    a["route"].as_str().unwrap_or("-"),
                    a["status"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert_eq!(
            chain,
            [
                ("primary", 503),
                ("primary", 503),
                ("primary", 503),
                ("backup", 200)
            ]
        );
        assert_eq!(record["outcome"]["success"]["status"], 200);
        // Owner, cost and usage beside the chain: 9 prompt and 4 completion tokens at the
        // backup's price, the failed attempts free (`ReportedOnly`).
        assert_eq!(record["budget_owner"], "team");
        let charge = 9 * BACKUP_PRICE.0 + 4 * BACKUP_PRICE.1;
        assert_eq!(record["cost_micros"], charge);
        assert_eq!(record["usage"]["input_tokens"], 9);
        assert_eq!(record["usage"]["output_tokens"], 4);
        assert!(log.to_string().contains(&format!(
            "spend: owner team, cost {charge} micro units, 9 in / 4 out tokens"
        )));
    }
}

/// Pacing with `FallbackLayer` inside: every route's answer is noted, and a hop to a route the
/// provider paused is skipped, as admission holds a new request off a paused primary.
mod pacing_across_routes {
    use super::*;
    use tower_llm_resilience::ResilienceLayer;
    use tower_llm_resilience::policy::{Policy, RouteConfig};

    fn policy(mock: &MockProvider) -> Policy {
        let mut policy = Policy::interactive();
        policy.retry.max_attempts = 1;
        policy.budget.pacing = true;
        policy.fallback.routes = vec![
            RouteConfig::new("backup")
                .base_url(format!("{}/backup", mock.url()))
                .model("backup-model"),
        ];
        policy
    }

    fn backup_calls(mock: &MockProvider) -> usize {
        mock.requests()
            .iter()
            .filter(|r| r.path.starts_with("/backup"))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_hop_to_a_paused_backup_is_skipped_until_its_reset() {
        let mock = start().await;
        mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_server_error()]);
        mock.script(
            ScriptKey::model("backup-model"),
            [
                Reply::openai_chat("backup-model", "one")
                    .header("x-ratelimit-remaining-requests", "0")
                    .header("x-ratelimit-reset-requests", "5s"),
                Reply::openai_chat("backup-model", "two"),
            ],
        );
        let svc = ResilienceLayer::new(&policy(&mock))
            .expect("policy")
            .layer(client());
        let send = || {
            svc.clone()
                .oneshot(chat_request(&mock.url(), "gpt-4o", false))
        };

        let first = send().await.expect("response");
        assert_eq!(first.status(), 200, "the backup served");
        assert_eq!(backup_calls(&mock), 1);

        // One second later the backup is paused for four more: the hop is skipped and the
        // caller gets the primary's own failure.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let second = send().await.expect("response");
        assert_eq!(second.status(), 500);
        assert_eq!(backup_calls(&mock), 1, "no call to the paused backup");
        let events: Vec<(Option<String>, LocalEventKind)> = log_of(&second)
            .events()
            .into_iter()
            .map(|e| (e.route.map(|r| r.to_string()), e.kind))
            .collect();
        assert_eq!(
            events,
            [(
                Some("backup".to_owned()),
                LocalEventKind::RateLimited {
                    retry_in: Duration::from_secs(4)
                }
            )]
        );

        // After the reset the backup takes hops again.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let third = send().await.expect("response");
        assert_eq!(third.status(), 200);
        assert_eq!(backup_calls(&mock), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_primary_sends_the_next_request_to_the_backup_at_once() {
        let mock = start().await;
        // The primary's failure says it has no requests left for 5 s; the backup serves.
        mock.script(
            ScriptKey::model("gpt-4o"),
            [
                Reply::openai_server_error()
                    .header("x-ratelimit-remaining-requests", "0")
                    .header("x-ratelimit-reset-requests", "5s"),
                Reply::openai_chat("gpt-4o", "primary again"),
            ],
        );
        mock.script(
            ScriptKey::model("backup-model"),
            [
                Reply::openai_chat("backup-model", "served"),
                Reply::openai_chat("backup-model", "served at once")
                    .header("x-ratelimit-remaining-requests", "0")
                    .header("x-ratelimit-reset-requests", "2s"),
            ],
        );
        let svc = ResilienceLayer::new(&policy(&mock))
            .expect("policy")
            .layer(client());
        let send = || {
            svc.clone()
                .oneshot(chat_request(&mock.url(), "gpt-4o", false))
        };
        let first = send().await.expect("response");
        assert_eq!(first.status(), 200);
        assert_eq!(mock.request_count() - backup_calls(&mock), 1);

        // The primary is paused for 5 s: the next request goes to the backup, which has room,
        // at once — neither held at admission nor rejected — and the primary is not called.
        let at = Instant::now();
        let second = send().await.expect("response");
        assert_eq!(second.status(), 200);
        assert_eq!(Instant::now(), at, "no wait");
        assert_eq!(backup_calls(&mock), 2);
        assert_eq!(mock.request_count() - backup_calls(&mock), 1);
        assert_eq!(
            second
                .headers()
                .get("x-llm-route")
                .and_then(|v| v.to_str().ok()),
            Some("backup")
        );
        let log = log_of(&second);
        let events: Vec<(Option<String>, LocalEventKind)> = log
            .events()
            .into_iter()
            .map(|e| (e.route.map(|r| r.to_string()), e.kind))
            .collect();
        assert_eq!(
            events,
            [(
                Some("primary".to_owned()),
                LocalEventKind::RateLimited {
                    retry_in: Duration::from_secs(5)
                }
            )]
        );

        // Now both are paused (the backup for 2 s): the interactive preset rejects, with the
        // primary's own wait.
        let third = send().await;
        match third.map(|r| r.status()) {
            Err(e) => assert_eq!(
                e.kind(),
                &ErrorKind::RateLimited {
                    retry_in: Duration::from_secs(5)
                }
            ),
            Ok(status) => panic!("admitted with every route paused: {status}"),
        }
        assert_eq!(mock.request_count(), 3);

        // After the primary's reset it is called again.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let fourth = send().await.expect("response");
        assert_eq!(fourth.status(), 200);
        assert_eq!(mock.request_count() - backup_calls(&mock), 2);
    }
}

/// A client-side rate limit per route with a backup: a request whose primary bucket is empty is
/// admitted on the backup's instead of being queued or turned away.
mod local_rate_limit_across_routes {
    use super::*;
    use tower_llm_resilience::ResilienceLayer;
    use tower_llm_resilience::policy::{Policy, RateLimitPolicy, RouteConfig};

    fn policy(mock: &MockProvider, backups: usize) -> Policy {
        let mut policy = Policy::interactive();
        policy.retry.max_attempts = 1;
        let mut rate = RateLimitPolicy::default();
        rate.requests_per_second = Some(1.0);
        rate.burst = 1;
        policy.budget.rate_limit = Some(rate);
        policy.fallback.routes = (0..backups)
            .map(|i| {
                RouteConfig::new(format!("backup-{i}"))
                    .base_url(format!("{}/backup-{i}", mock.url()))
                    .model(format!("backup-{i}"))
            })
            .collect();
        policy
    }

    fn routes(mock: &MockProvider) -> Vec<String> {
        mock.requests()
            .into_iter()
            .map(|r| r.model.unwrap_or_default())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_primary_bucket_sends_the_request_to_a_backup_with_room() {
        let mock = start().await;
        for m in ["gpt-4o", "backup-0", "backup-1"] {
            mock.script(
                ScriptKey::model(m),
                (0..4).map(|_| Reply::openai_chat(m, "ok")),
            );
        }
        let svc = ResilienceLayer::new(&policy(&mock, 2))
            .expect("policy")
            .layer(client());
        let send = || {
            let mut req = chat_request(&mock.url(), "gpt-4o", false);
            let log = AttemptLog::new();
            req.extensions_mut().insert(log.clone());
            let svc = svc.clone();
            async move { (svc.oneshot(req).await, log) }
        };
        // Three requests at the same instant: the primary's bucket holds one, each backup's
        // one; the clock does not move.
        let start = Instant::now();
        let mut served = Vec::new();
        for _ in 0..3 {
            let (out, log) = send().await;
            let resp = out.expect("served");
            served.push(
                resp.headers()["x-llm-route"]
                    .to_str()
                    .expect("ascii")
                    .to_owned(),
            );
            resp.into_body().collect().await.expect("body");
            if served.len() > 1 {
                let limited: Vec<_> = log
                    .events()
                    .into_iter()
                    .filter(|e| matches!(e.kind, LocalEventKind::RateLimited { .. }))
                    .map(|e| e.route.map(|r| r.to_string()))
                    .collect();
                assert_eq!(limited, [Some("primary".to_owned())], "{log}");
            }
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "nothing waited");
        assert_eq!(served, ["primary", "backup-0", "backup-1"]);
        assert_eq!(routes(&mock), ["gpt-4o", "backup-0", "backup-1"]);

        // Every bucket empty: the interactive preset turns the fourth away at once, with the
        // primary's time to room.
        let (out, _) = send().await;
        let Err(err) = out else {
            panic!("admitted with every bucket empty")
        };
        assert!(
            matches!(err.kind(), ErrorKind::RateLimited { retry_in } if *retry_in <= Duration::from_secs(1)),
            "{err}"
        );
        assert_eq!(mock.request_count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_backup_the_request_is_turned_away_as_before() {
        let mock = start().await;
        mock.script(
            ScriptKey::model("gpt-4o"),
            (0..2).map(|_| Reply::openai_chat("gpt-4o", "ok")),
        );
        let svc = ResilienceLayer::new(&policy(&mock, 0))
            .expect("policy")
            .layer(client());
        let first = svc
            .clone()
            .oneshot(chat_request(&mock.url(), "gpt-4o", false))
            .await
            .expect("served");
        assert_eq!(first.status(), 200);
        let second = svc
            .clone()
            .oneshot(chat_request(&mock.url(), "gpt-4o", false))
            .await;
        assert!(matches!(
            second.map_err(|e| e.kind().clone()),
            Err(ErrorKind::RateLimited { .. })
        ));
        assert_eq!(mock.request_count(), 1);
    }
}
