//! Deferred requests on a real Redis: several replicas' workers on one stream, a worker that
//! dies mid-replay, the server killed and restarted. Real time: the records' due times and
//! the leases are kept by Redis, which does not see a paused clock.
#![cfg(all(feature = "testing", feature = "redis"))]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::task::JoinHandle;
use tower::{Layer, ServiceExt};
use tower_llm_resilience::attempt_log::LocalEventKind;
use tower_llm_resilience::defer::{
    DeferSink, DeferredStatus, DeferredWorker, ReplayOutcome, Replayed,
};
use tower_llm_resilience::policy::DeferPolicy;
use tower_llm_resilience::redis::{RedisDeferSink, RedisStore};
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{AttemptLog, BoxError, ErrorKind, Policy, ResilienceLayer, Resilient};

#[path = "support/redis.rs"]
mod redis_server;
use redis_server::RedisServer;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

const MODEL: &str = "gpt-4o";

/// The batch preset on the Redis at `url`, with records due 200 ms after a refusal (whatever
/// the provider asked) and leases taken over after 300 ms without a renewal.
fn policy(url: &str) -> Policy {
    let mut p = Policy::batch();
    p.retry.seed = Some(5);
    p.store.url = Some(url.to_owned());
    p.store.timeout = Duration::from_secs(2);
    let mut d = DeferPolicy::default();
    d.first_delay = Duration::from_millis(200);
    d.max_delay = Duration::from_millis(200);
    d.claim_after = Duration::from_millis(300);
    d.poll_interval = Duration::from_millis(20);
    p.budget.defer = Some(d);
    // The records come due long before the provider's announced reset (600 s); pacing would
    // hold their replays until then.
    p.budget.pacing = false;
    // A hundred refusals in a row would open the breaker and throttle the route, and the
    // replays be deferred again: these tests are about the queue.
    p.circuit_breaker.failure_rate = None;
    p.circuit_breaker.consecutive_failures = None;
    p.circuit_breaker.throttle = None;
    p
}

/// One replica: its own connection to Redis, its own sink on it, its own stack.
struct Replica {
    sink: Arc<RedisDeferSink>,
    svc: Resilient<Client>,
}

fn replica(policy: &Policy) -> Result<Replica, BoxError> {
    let store = RedisStore::new(&policy.store)?;
    let sink = Arc::new(RedisDeferSink::new(&store).queue("batch"));
    let svc = ResilienceLayer::new(policy)?
        .defer_to(sink.clone())
        .layer(testing::client());
    Ok(Replica { sink, svc })
}

impl Replica {
    /// Starts a worker named `name` on this replica's stack and sink, its ends going to
    /// `results`.
    fn run_worker(&self, name: &str, policy: &Policy, results: &Results) -> JoinHandle<()> {
        let defer = policy.budget.defer.clone().unwrap_or_default();
        let worker = DeferredWorker::new(self.svc.clone(), self.sink.clone(), defer)
            .name(name)
            .on_result(results.callback(name));
        tokio::spawn(worker.run())
    }
}

/// Every replay's end, with the worker that ended it.
#[derive(Clone, Default)]
struct Results(Arc<Mutex<Vec<(String, Replayed)>>>);

impl Results {
    fn callback(&self, worker: &str) -> impl Fn(Replayed) + Send + Sync + 'static {
        let (all, worker) = (self.0.clone(), worker.to_owned());
        move |r| {
            all.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((worker.clone(), r))
        }
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn all(&self) -> Vec<(String, Replayed)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits (real time) until `n` replays have ended, at most `within`.
    async fn wait_for(&self, n: usize, within: Duration) -> Result<(), BoxError> {
        let until = tokio::time::Instant::now() + within;
        while self.len() < n {
            if tokio::time::Instant::now() > until {
                return Err(
                    format!("{} of {n} replays ended within {within:?}", self.len()).into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

async fn defer_one(svc: &Resilient<Client>, base: &str) -> Result<String, BoxError> {
    let req = testing::chat_request(base, MODEL, false);
    match svc.clone().oneshot(req).await {
        Err(e) => match e.kind() {
            ErrorKind::Deferred(d) => Ok(d.id.clone()),
            other => Err(format!("not deferred: {other}").into()),
        },
        Ok(resp) => Err(format!("not deferred: answered {}", resp.status()).into()),
    }
}

fn key_of(r: &testing::RecordedRequest) -> String {
    r.headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_replay_100_deferred_requests_exactly_once_each() -> Result<(), BoxError> {
    let Some(redis) =
        RedisServer::start("two_workers_replay_100_deferred_requests_exactly_once_each").await
    else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    // A hundred refusals, then a hundred answers: a record replayed twice would find none.
    mock.script(
        ScriptKey::model(MODEL),
        (0..100)
            .map(|_| Reply::openai_rate_limited(Some("600")))
            .chain((0..100).map(|i| Reply::openai_chat(MODEL, format!("answer {i}")))),
    );
    let policy = policy(&redis.url());
    let (a, b) = (replica(&policy)?, replica(&policy)?);
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(defer_one(&a.svc, &mock.url()).await?);
    }

    let results = Results::default();
    let workers = [("one", &a), ("two", &b)].map(|(name, r)| r.run_worker(name, &policy, &results));
    results.wait_for(100, Duration::from_secs(30)).await?;
    // Longer than a lease: nothing is replayed again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for w in &workers {
        w.abort();
    }

    let done = results.all();
    let kinds: Vec<String> = done
        .iter()
        .take(8)
        .map(|(w, r)| format!("{w} {} {:?}", r.record.deferrals, r.outcome))
        .collect();
    assert_eq!(
        done.len(),
        100,
        "each record's replay ended once: {kinds:#?}"
    );
    let mut by_worker: HashMap<&str, usize> = HashMap::new();
    let mut replayed: Vec<&str> = Vec::new();
    for (worker, r) in &done {
        assert!(
            matches!(&r.outcome, ReplayOutcome::Answered(resp) if resp.status() == 200),
            "{:?}",
            r.outcome
        );
        *by_worker.entry(worker.as_str()).or_default() += 1;
        replayed.push(r.record.id.as_str());
    }
    replayed.sort_unstable();
    ids.sort_unstable();
    assert_eq!(replayed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        by_worker.len() == 2,
        "both workers shared the stream: {by_worker:?}"
    );
    // The provider saw each request twice, under one key: once refused, once replayed.
    let requests = mock.requests();
    assert_eq!(requests.len(), 200);
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for r in &requests {
        *per_key.entry(key_of(r)).or_default() += 1;
    }
    assert_eq!(per_key.len(), 100);
    assert!(per_key.values().all(|n| *n == 2), "{per_key:?}");
    for id in &ids {
        assert_eq!(a.sink.status(id).await?, Some(DeferredStatus::Answered));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dropped_mid_replay_leaves_its_record_to_the_other() -> Result<(), BoxError> {
    let Some(redis) =
        RedisServer::start("a_worker_dropped_mid_replay_leaves_its_record_to_the_other").await
    else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_rate_limited(Some("600")),
            // The first worker's replay: the provider never answers it.
            Reply::never(),
            Reply::openai_chat(MODEL, "from the second worker"),
        ],
    );
    let policy = policy(&redis.url());
    let (a, b) = (replica(&policy)?, replica(&policy)?);
    let id = defer_one(&a.svc, &mock.url()).await?;

    let results = Results::default();
    let first = a.run_worker("first", &policy, &results);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while mock.request_count() < 2 {
        assert!(
            tokio::time::Instant::now() < until,
            "the first worker never replayed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Killed mid-replay: it stops renewing its lease.
    first.abort();
    assert!(matches!(
        a.sink.status(&id).await?,
        Some(DeferredStatus::Replaying { .. })
    ));

    let second = b.run_worker("second", &policy, &results);
    results.wait_for(1, Duration::from_secs(10)).await?;
    second.abort();

    let done = results.all();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, "second");
    assert_eq!(done[0].1.record.id, id);
    assert!(matches!(&done[0].1.outcome, ReplayOutcome::Answered(r) if r.status() == 200));
    let requests = mock.requests();
    // The refusal, the replay that never completed, the one that did: one generation.
    assert_eq!(requests.len(), 3);
    assert_eq!(key_of(&requests[1]), key_of(&requests[2]));
    assert_eq!(key_of(&requests[0]), key_of(&requests[1]));
    assert!(
        requests[2].at - requests[1].at >= Duration::from_millis(300),
        "taken over only after claim_after"
    );
    assert_eq!(b.sink.status(&id).await?, Some(DeferredStatus::Answered));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewed_is_not_taken_over_however_long_the_replay() -> Result<(), BoxError> {
    let Some(redis) =
        RedisServer::start("a_lease_renewed_is_not_taken_over_however_long_the_replay").await
    else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_rate_limited(Some("600")),
            // Four leases long: renewed every 100 ms, never idle for 300.
            Reply::openai_chat(MODEL, "slow").delay_head(Duration::from_millis(1200)),
            Reply::openai_chat(MODEL, "a second replay would get this"),
        ],
    );
    let policy = policy(&redis.url());
    let (a, b) = (replica(&policy)?, replica(&policy)?);
    let id = defer_one(&a.svc, &mock.url()).await?;
    let results = Results::default();
    let workers = [("one", &a), ("two", &b)].map(|(name, r)| r.run_worker(name, &policy, &results));
    results.wait_for(1, Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for w in &workers {
        w.abort();
    }
    let done = results.all();
    assert_eq!(done.len(), 1, "one replay");
    assert_eq!(done[0].1.record.id, id);
    let ReplayOutcome::Answered(resp) = &done[0].1.outcome else {
        panic!("answered, got {:?}", done[0].1.outcome)
    };
    assert!(String::from_utf8_lossy(resp.body()).contains("slow"));
    assert_eq!(mock.request_count(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_a_running_worker() -> Result<(), BoxError> {
    let Some(mut redis) =
        RedisServer::start("redis_killed_and_restarted_under_a_running_worker").await
    else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_rate_limited(Some("600")),
            Reply::openai_chat(MODEL, "before"),
            Reply::openai_rate_limited(Some("600")),
            Reply::openai_rate_limited(Some("600")),
            Reply::openai_chat(MODEL, "after"),
        ],
    );
    let mut policy = policy(&redis.url());
    policy.store.timeout = Duration::from_millis(100);
    let a = replica(&policy)?;
    let results = Results::default();
    let worker = a.run_worker("worker", &policy, &results);

    defer_one(&a.svc, &mock.url()).await?;
    results.wait_for(1, Duration::from_secs(10)).await?;

    redis.kill();
    // The queue is down: the request is not deferred, it fails as it would have without the
    // rung — the provider's refusal — and its log says why.
    let log = AttemptLog::new();
    let mut req = testing::chat_request(&mock.url(), MODEL, false);
    req.extensions_mut().insert(log.clone());
    let resp = a.svc.clone().oneshot(req).await?;
    assert_eq!(resp.status(), 429);
    assert!(
        log.events()
            .iter()
            .any(|e| e.kind == LocalEventKind::StoreUnavailable)
    );
    // The worker lives through it (it logs and looks again).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!worker.is_finished());

    redis.restart().await;
    // Back by itself: a fresh server (its data went with it), and the worker's group is made
    // again on its next take.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.sink.status("none").await.is_err() {
        assert!(
            tokio::time::Instant::now() < until,
            "Redis still unreachable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = defer_one(&a.svc, &mock.url()).await?;
    results.wait_for(2, Duration::from_secs(10)).await?;
    worker.abort();
    let done = results.all();
    assert_eq!(done[1].1.record.id, id);
    let ReplayOutcome::Answered(resp) = &done[1].1.outcome else {
        panic!("answered, got {:?}", done[1].1.outcome)
    };
    assert!(String::from_utf8_lossy(resp.body()).contains("after"));
    Ok(())
}
