//! Metrics from the attempt log: scripted failures through the whole stack over loopback HTTP,
//! with the `metrics` crate's debugging recorder installed, and exact values asserted after
//! each step (each snapshot holds what changed since the last one).
#![cfg(all(feature = "metrics", feature = "testing"))]

use std::time::Duration;

use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_resilience::observe::names as n;
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{ErrorKind, Policy, ResilienceLayer};

#[path = "support/backup.rs"]
mod backup;
use backup::policy_with_backup;
#[path = "support/prices.rs"]
mod prices;
#[path = "support/served.rs"]
mod served;
use served::served;

/// One snapshot of the recorder: what changed since the previous one.
struct Snap(Vec<(CompositeKey, DebugValue)>);

impl Snap {
    fn take(s: &Snapshotter) -> Self {
        Self(
            s.snapshot()
                .into_vec()
                .into_iter()
                .map(|(k, _, _, v)| (k, v))
                .collect(),
        )
    }

    /// The series of `name` whose labels include every pair of `labels`.
    fn series<'a>(
        &'a self,
        kind: MetricKind,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a DebugValue> + 'a {
        self.0.iter().filter_map(move |(k, v)| {
            let key = k.key();
            let all = labels
                .iter()
                .all(|(lk, lv)| key.labels().any(|l| l.key() == *lk && l.value() == *lv));
            (k.kind() == kind && key.name() == name && all).then_some(v)
        })
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.series(MetricKind::Counter, name, labels)
            .map(|v| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.series(MetricKind::Gauge, name, labels)
            .find_map(|v| match v {
                DebugValue::Gauge(g) => Some(g.into_inner()),
                _ => None,
            })
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.series(MetricKind::Histogram, name, labels)
            .flat_map(|v| match v {
                DebugValue::Histogram(h) => h.iter().map(|x| x.into_inner()).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The label sets of every series of `name`, for the failure messages.
    fn labels_of(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k.key().name() == name)
            .map(|(k, v)| format!("{:?} = {v:?}", k.key().labels().collect::<Vec<_>>()))
            .collect()
    }
}

/// Runs `f` on a paused current-thread runtime with `recorder` as this thread's recorder: the
/// mock, the stack and the alert task all run on this thread.
fn with_recorder<F: std::future::Future<Output = ()>>(recorder: &DebuggingRecorder, f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    metrics::with_local_recorder(recorder, || rt.block_on(f));
}

/// The backup policy with metrics on, `gpt-4o` a labelled model, and a breaker that trips
/// after three consecutive failures and opens for 2 s (jittered down to at least 1.6 s).
fn policy(mock: &MockProvider) -> Policy {
    let mut policy = policy_with_backup(mock);
    policy.observability.metrics = true;
    policy.observability.models = vec!["gpt-4o".to_owned()];
    policy.circuit_breaker.failure_rate = None;
    policy.circuit_breaker.consecutive_failures = Some(3);
    policy.circuit_breaker.open_base = Duration::from_secs(2);
    policy.circuit_breaker.open_cap = Duration::from_secs(8);
    // One good probe closes the circuit.
    policy.circuit_breaker.half_open_successes = 1;
    policy
}

#[test]
fn the_ladders_work_is_counted_exactly() {
    let recorder = DebuggingRecorder::new();
    let metrics = recorder.snapshotter();
    with_recorder(&recorder, async move {
        let mock = MockProvider::start().await.expect("mock starts");
        let layer = ResilienceLayer::new(&policy(&mock)).expect("valid policy");
        let breakers = layer.circuit_breaker();
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service(testing::client());

        // 1. Three 503s trip the primary; the backup answers, with usage.
        mock.script(
            ScriptKey::model("gpt-4o"),
            [
                Reply::openai_overloaded(),
                Reply::openai_overloaded(),
                Reply::openai_overloaded(),
            ],
        );
        mock.script(
            ScriptKey::model("backup-model"),
            [Reply::openai_chat("backup-model", "one two three")],
        );
        let response = svc
            .ready()
            .await
            .expect("ready")
            .call(testing::chat_request(&mock.url(), "gpt-4o", false))
            .await
            .expect("the backup answers");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.expect("a whole body");

        let s = Snap::take(&metrics);
        let primary = [(n::ROUTE, "primary")];
        assert_eq!(
            s.counter(
                n::REQUESTS,
                &[(n::ROUTE, "primary"), (n::OUTCOME, "success")]
            ),
            1
        );
        assert_eq!(s.histogram(n::ATTEMPTS, &primary), [4.0]);
        assert_eq!(
            s.counter(
                n::RETRIES,
                &[(n::ROUTE, "primary"), (n::CLASS, "overloaded")]
            ),
            2
        );
        assert_eq!(
            s.counter(n::RETRIES, &[]),
            2,
            "{:?}",
            s.labels_of(n::RETRIES)
        );
        assert_eq!(
            s.counter(
                n::FALLBACKS,
                &[(n::FROM_ROUTE, "primary"), (n::TO_ROUTE, "backup")]
            ),
            1
        );
        assert_eq!(s.counter(n::FALLBACKS, &[]), 1);
        // Opened on the third failure; the gauge was set (0) when the route was first seen.
        assert_eq!(s.gauge(n::CIRCUIT_STATE, &primary), Some(2.0));
        assert_eq!(
            s.counter(
                n::CIRCUIT_TRANSITIONS,
                &[
                    (n::ROUTE, "primary"),
                    (n::FROM_STATE, "closed"),
                    (n::TO_STATE, "open")
                ]
            ),
            1
        );
        // The backup's JSON `usage`: 9 prompt tokens, 3 completion tokens.
        let answer = [
            (n::OPERATION, "chat"),
            (n::REQUEST_MODEL, "gpt-4o"),
            (n::RESPONSE_MODEL, "backup-model"),
            (n::SERVER_ADDRESS, "127.0.0.1"),
            (n::ROUTE, "backup"),
        ];
        let input = [answer.as_slice(), &[(n::TOKEN_TYPE, "input")]].concat();
        let output = [answer.as_slice(), &[(n::TOKEN_TYPE, "output")]].concat();
        assert_eq!(s.histogram(n::TOKEN_USAGE, &input), [9.0]);
        assert_eq!(s.histogram(n::TOKEN_USAGE, &output), [3.0]);
        assert_eq!(
            s.histogram(n::OPERATION_DURATION, &answer).len(),
            1,
            "{:?}",
            s.labels_of(n::OPERATION_DURATION)
        );
        // A success has no error.type; a JSON answer no time to first chunk.
        assert!(
            s.labels_of(n::OPERATION_DURATION)
                .iter()
                .all(|l| !l.contains(n::ERROR_TYPE))
        );
        assert!(s.histogram(n::TIME_TO_FIRST_CHUNK, &[]).is_empty());

        // 2. While the primary is open, the chain goes straight to the backup.
        let response = svc
            .ready()
            .await
            .expect("ready")
            .call(testing::chat_request(&mock.url(), "gpt-4o", false))
            .await
            .expect("the backup answers");
        response.into_body().collect().await.expect("a whole body");
        let s = Snap::take(&metrics);
        assert_eq!(
            s.counter(
                n::REJECTIONS,
                &[(n::ROUTE, "primary"), (n::REASON, "circuit_open")]
            ),
            1
        );
        assert_eq!(
            s.counter(
                n::FALLBACKS,
                &[(n::FROM_ROUTE, "primary"), (n::TO_ROUTE, "backup")]
            ),
            1
        );
        assert_eq!(s.histogram(n::ATTEMPTS, &primary), [1.0]);
        assert_eq!(s.counter(n::RETRIES, &[]), 0);

        // 3. Once the open time has passed, a probe goes through (half-open) and its first
        // token closes the circuit; the stream is then cut after the commit point.
        tokio::time::sleep(Duration::from_secs(2)).await;
        mock.script(
            ScriptKey::model("gpt-4o"),
            [Reply::openai_stream("gpt-4o", &["a", "b", "c", "d"])
                .delay_head(Duration::from_secs(1))
                .cut_after(3)],
        );
        let mut probe_svc = svc.clone();
        let url = mock.url();
        let probe = tokio::spawn(async move {
            let response = probe_svc
                .ready()
                .await
                .expect("ready")
                .call(testing::chat_request(&url, "gpt-4o", true))
                .await
                .expect("the probe's head");
            response.into_body().collect().await.map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = Snap::take(&metrics);
        assert_eq!(s.gauge(n::CIRCUIT_STATE, &primary), Some(1.0));
        assert_eq!(
            s.counter(
                n::CIRCUIT_TRANSITIONS,
                &[(n::FROM_STATE, "open"), (n::TO_STATE, "half_open")]
            ),
            1
        );
        let cut = probe.await.expect("the probe task");
        let e = cut.expect_err("the stream is cut after its commit point");
        assert!(
            matches!(e.kind(), ErrorKind::StreamInterrupted { .. }),
            "{e}"
        );
        let s = Snap::take(&metrics);
        assert_eq!(s.gauge(n::CIRCUIT_STATE, &primary), Some(0.0));
        assert_eq!(
            s.counter(
                n::CIRCUIT_TRANSITIONS,
                &[
                    (n::ROUTE, "primary"),
                    (n::FROM_STATE, "half_open"),
                    (n::TO_STATE, "closed")
                ]
            ),
            1
        );
        assert_eq!(s.counter(n::CIRCUIT_TRANSITIONS, &[]), 1);
        assert_eq!(
            s.counter(n::STREAMS_INTERRUPTED, &[(n::ROUTE, "primary")]),
            1,
            "{:?}",
            s.labels_of(n::STREAMS_INTERRUPTED)
        );
        assert_eq!(
            s.counter(
                n::REQUESTS,
                &[
                    (n::ROUTE, "primary"),
                    (n::OUTCOME, "error"),
                    (n::ERROR_TYPE, "stream_interrupted")
                ]
            ),
            1
        );
        // The request ended with its body: the duration includes the 1 s head delay.
        let took = s.histogram(
            n::OPERATION_DURATION,
            &[(n::ERROR_TYPE, "stream_interrupted")],
        );
        assert_eq!(took.len(), 1);
        assert!(took[0] >= 1.0, "{took:?}");

        // 4. A whole stream: its usage event and its time to first chunk.
        mock.script(
            ScriptKey::model("gpt-4o"),
            [Reply::openai_stream("gpt-4o", &["x", "y"]).event_delay(Duration::from_millis(50))],
        );
        let response = svc
            .ready()
            .await
            .expect("ready")
            .call(testing::chat_request(&mock.url(), "gpt-4o", true))
            .await
            .expect("a stream");
        response
            .into_body()
            .collect()
            .await
            .expect("a whole stream");
        let s = Snap::take(&metrics);
        let streamed = [
            (n::REQUEST_MODEL, "gpt-4o"),
            (n::RESPONSE_MODEL, "gpt-4o"),
            (n::ROUTE, "primary"),
        ];
        let input = [streamed.as_slice(), &[(n::TOKEN_TYPE, "input")]].concat();
        let output = [streamed.as_slice(), &[(n::TOKEN_TYPE, "output")]].concat();
        assert_eq!(s.histogram(n::TOKEN_USAGE, &input), [9.0]);
        assert_eq!(s.histogram(n::TOKEN_USAGE, &output), [2.0]);
        // The role-only delta at 50 ms, the first token at 100 ms.
        assert_eq!(s.histogram(n::TIME_TO_FIRST_CHUNK, &streamed), [0.1]);
        assert_eq!(s.counter(n::STREAMS_INTERRUPTED, &[]), 0);
        assert_eq!(breakers.state("primary").as_str(), "closed");
    });
}

#[test]
fn metrics_off_in_the_policy_records_nothing() {
    let recorder = DebuggingRecorder::new();
    let metrics = recorder.snapshotter();
    with_recorder(&recorder, async move {
        let mock = MockProvider::start().await.expect("mock starts");
        let mut policy = policy(&mock);
        policy.observability.metrics = false;
        mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_overloaded()]);
        let svc = ServiceBuilder::new()
            .layer(ResilienceLayer::new(&policy).expect("valid policy"))
            .service(testing::client());
        let response = svc
            .oneshot(testing::chat_request(&mock.url(), "gpt-4o", false))
            .await
            .expect("an answer");
        response.into_body().collect().await.expect("a whole body");
        assert!(Snap::take(&metrics).0.is_empty());
    });
}

#[test]
fn refusals_are_counted_by_reason() {
    use tower_llm_resilience::policy::{
        AdmissionMode, Price, RateLimitPolicy, RetryBudgetPolicy, SpendPolicy,
    };

    let recorder = DebuggingRecorder::new();
    let metrics = recorder.snapshotter();
    with_recorder(&recorder, async move {
        let mock = MockProvider::start().await.expect("mock starts");
        let send = |policy: Policy| {
            let url = mock.url();
            async move {
                let svc = ServiceBuilder::new()
                    .layer(ResilienceLayer::new(&policy).expect("valid policy"))
                    .service(testing::client());
                let requests = (0..2).map(|_| {
                    svc.clone()
                        .oneshot(testing::chat_request(&url, "gpt-4o", false))
                });
                for r in futures_util::future::join_all(requests)
                    .await
                    .into_iter()
                    .flatten()
                {
                    let _ = r.into_body().collect().await;
                }
            }
        };

        // One request a second, queued: the second waits exactly a second.
        let mut p = policy(&mock);
        p.budget.admission = AdmissionMode::Queue {
            max_wait: Duration::from_secs(5),
            max_queued: 10,
        };
        let mut rate = RateLimitPolicy::default();
        rate.requests_per_second = Some(1.0);
        // One bucket for every route: the second request queues rather than going to the
        // backup's bucket.
        rate.key = tower_llm_resilience::policy::RateKey::Owner;
        p.budget.rate_limit = Some(rate);
        send(p).await;
        let s = Snap::take(&metrics);
        assert_eq!(s.histogram(n::QUEUE_WAIT, &[(n::ROUTE, "primary")]), [1.0]);
        assert_eq!(
            s.counter(n::REQUESTS, &[(n::OUTCOME, "success")]),
            2,
            "{:?}",
            s.labels_of(n::REQUESTS)
        );

        // A spend cap no request fits under: refused at admission, by reason.
        let mut p = policy(&mock);
        let mut spend = SpendPolicy::default();
        spend.cap = 0.000_001;
        spend.default_owner = Some("team".to_owned());
        spend.default_price = Some(Price::new(1.0, 1.0));
        p.budget.spend = Some(spend);
        send(p).await;
        let s = Snap::take(&metrics);
        assert_eq!(
            s.counter(
                n::REJECTIONS,
                &[(n::ROUTE, "primary"), (n::REASON, "spend_cap")]
            ),
            2
        );
        assert_eq!(
            s.counter(
                n::REQUESTS,
                &[(n::OUTCOME, "error"), (n::ERROR_TYPE, "budget_exhausted")]
            ),
            2
        );
        assert_eq!(s.histogram(n::ATTEMPTS, &[]), [0.0, 0.0]);

        // One retry for the whole stack: the other request's retry is refused.
        let mut p = policy(&mock);
        p.circuit_breaker.consecutive_failures = None;
        p.budget.retry_budget = RetryBudgetPolicy::TokenBucket {
            capacity: 1,
            refill_per_sec: 0.0,
            per_request: 0.0,
        };
        p.fallback.routes.clear();
        mock.script(
            ScriptKey::model("gpt-4o"),
            std::iter::repeat_n(Reply::openai_overloaded(), 6),
        );
        send(p).await;
        let s = Snap::take(&metrics);
        assert_eq!(
            s.counter(n::RETRY_BUDGET_EXHAUSTED, &[(n::ROUTE, "primary")]),
            2,
            "one refusal per request: {:?}",
            s.labels_of(n::RETRY_BUDGET_EXHAUSTED)
        );
        assert_eq!(s.counter(n::RETRIES, &[(n::CLASS, "overloaded")]), 1);
        assert_eq!(
            s.counter(
                n::REQUESTS,
                &[
                    (n::OUTCOME, "provider_failure"),
                    (n::ERROR_TYPE, "overloaded")
                ]
            ),
            2
        );
    });
}

#[test]
fn a_continued_stream_is_counted_by_its_routes() {
    use http_body_util::Full;
    use tower_llm_resilience::policy::{ContinuationPolicy, PrefillForm};

    const ANSWER: [&str; 4] = ["The ", "quick ", "brown ", "fox."];
    let recorder = DebuggingRecorder::new();
    let metrics = recorder.snapshotter();
    with_recorder(&recorder, async move {
        let mock = MockProvider::start().await.expect("mock starts");
        let mut p = policy(&mock);
        p.stream.continuation = ContinuationPolicy::enabled();
        p.fallback.routes = vec![
            tower_llm_resilience::policy::RouteConfig::new("backup")
                .base_url(format!("{}/backup", mock.url()))
                .model("backup-model")
                .prefill(PrefillForm::OpenAi),
        ];
        // The role chunk and two content chunks, then the connection drops.
        mock.script(
            ScriptKey::model("gpt-4o"),
            [Reply::openai_stream("gpt-4o", &ANSWER).cut_after(3)],
        );
        mock.script(
            ScriptKey::model("backup-model"),
            [Reply::openai_continuation("backup-model", &ANSWER)],
        );
        let mut svc = ServiceBuilder::new()
            .layer(ResilienceLayer::new(&p).expect("valid policy"))
            .service(testing::client());
        svc.get_mut().enable_continuation::<Full<bytes::Bytes>>();
        let response = svc
            .ready()
            .await
            .expect("ready")
            .call(testing::chat_request(&mock.url(), "gpt-4o", true))
            .await
            .expect("a committed stream");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("a whole answer");
        assert!(String::from_utf8_lossy(&body.to_bytes()).contains("[DONE]"));

        let s = Snap::take(&metrics);
        assert_eq!(
            s.counter(
                n::STREAMS_CONTINUED,
                &[(n::FROM_ROUTE, "primary"), (n::TO_ROUTE, "backup")]
            ),
            1,
            "{:?}",
            s.labels_of(n::STREAMS_CONTINUED)
        );
        // The primary's stream was still cut: its interruption is counted, and the request
        // succeeded.
        assert_eq!(
            s.counter(n::STREAMS_INTERRUPTED, &[(n::ROUTE, "primary")]),
            1
        );
        assert_eq!(s.counter(n::REQUESTS, &[(n::OUTCOME, "success")]), 1);
    });
}

/// Sends one chat request through `p`'s stack and reads the answer to its end; the route that
/// served it.
async fn served_by(p: &Policy, mock: &MockProvider, stream: bool) -> String {
    let mut svc = ServiceBuilder::new()
        .layer(ResilienceLayer::new(p).expect("valid policy"))
        .service(testing::client());
    let mut req = testing::chat_request(&mock.url(), "gpt-4o", stream);
    req.headers_mut()
        .insert("idempotency-key", http::HeaderValue::from_static("k-1"));
    served(&mut svc, req).await.0
}

#[test]
fn a_hedge_is_counted_as_a_hedge_not_as_a_fallback() {
    use tower_llm_resilience::policy::HedgePolicy;

    let recorder = DebuggingRecorder::new();
    let metrics = recorder.snapshotter();
    with_recorder(&recorder, async move {
        let mock = MockProvider::start().await.expect("mock starts");
        let mut p = policy(&mock);
        p.stream.first_token_timeout = Some(Duration::from_secs(30));
        p.hedge = HedgePolicy::after(Duration::from_secs(1));
        p.hedge.max_fraction = 1.0;
        p.idempotency.key_header = Some("idempotency-key".to_owned());
        // The primary is 20 s from its first token: the hedge on the backup wins at 1 s.
        mock.script(
            ScriptKey::model("gpt-4o"),
            [Reply::openai_stream("gpt-4o", &["slow"]).delay_head(Duration::from_secs(20))],
        );
        mock.script(
            ScriptKey::model("backup-model"),
            [Reply::openai_stream("backup-model", &["quick"])],
        );
        assert_eq!(served_by(&p, &mock, true).await, "backup");

        let s = Snap::take(&metrics);
        assert_eq!(s.counter(n::HEDGES, &[(n::ROUTE, "backup")]), 1);
        assert_eq!(
            s.counter(n::FALLBACKS, &[]),
            0,
            "{:?}",
            s.labels_of(n::FALLBACKS)
        );
        assert_eq!(s.counter(n::REQUESTS, &[(n::OUTCOME, "success")]), 1);
        // Both attempts were made: the primary's (cancelled) and the hedge.
        assert_eq!(s.histogram(n::ATTEMPTS, &[(n::ROUTE, "primary")]), [2.0]);
    });
}

#[test]
fn a_switch_is_counted_in_the_order_the_selection_strategy_chose() {
    let recorder = DebuggingRecorder::new();
    let metrics = recorder.snapshotter();
    with_recorder(&recorder, async move {
        let mock = MockProvider::start().await.expect("mock starts");
        let mut p = policy(&mock);
        // The backup is the cheaper route: `lowest_cost` tries it first, then the primary.
        prices::lowest_cost(&mut p, &[("primary", 3.0, 15.0), ("backup", 0.15, 0.6)]);
        mock.script(
            ScriptKey::model("backup-model"),
            [
                Reply::openai_overloaded(),
                Reply::openai_overloaded(),
                Reply::openai_overloaded(),
            ],
        );
        mock.script(
            ScriptKey::model("gpt-4o"),
            [Reply::openai_chat("gpt-4o", "hello")],
        );
        assert_eq!(served_by(&p, &mock, false).await, "primary");

        let s = Snap::take(&metrics);
        assert_eq!(
            s.counter(
                n::FALLBACKS,
                &[(n::FROM_ROUTE, "backup"), (n::TO_ROUTE, "primary")]
            ),
            1,
            "{:?}",
            s.labels_of(n::FALLBACKS)
        );
        assert_eq!(s.counter(n::FALLBACKS, &[]), 1);
        assert_eq!(s.counter(n::HEDGES, &[]), 0);
    });
}
