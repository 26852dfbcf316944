//! The idempotent result cache, end to end over loopback against the `MockProvider`.
#![cfg(feature = "testing")]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::attempt_log::LocalEventKind;
use tower_llm_resilience::cache::{CACHE_HEADER, Cache, CacheLayer, CacheStore, MemoryCache};
use tower_llm_resilience::policy::{CachePolicy, InFlightRule};
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{
    AttemptLog, Body, BoxError, Error, ErrorKind, Policy, ResilienceLayer, Resilient,
};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;
type Stack = Cache<Resilient<Client>>;

const MODEL: &str = "gpt-4o";

fn policy(cache: CachePolicy) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(5);
    p.idempotency.cache = Some(cache);
    p
}

fn stack(p: &Policy, store: Option<Arc<dyn CacheStore>>) -> Result<Stack, BoxError> {
    let mut cache = CacheLayer::from_policy(p)?;
    if let Some(store) = store {
        cache = cache.store(store);
    }
    Ok(cache.layer(ResilienceLayer::new(p)?.layer(testing::client())))
}

fn request(
    mock: &MockProvider,
    owner: &str,
    key: &str,
    stream: bool,
) -> http::Request<Full<Bytes>> {
    let mut req = testing::chat_request(&mock.url(), MODEL, stream);
    let h = req.headers_mut();
    h.insert(
        "idempotency-key",
        key.parse().unwrap_or_else(|e| panic!("{e}")),
    );
    h.insert(
        "x-llm-budget-owner",
        owner.parse().unwrap_or_else(|e| panic!("{e}")),
    );
    req
}

/// Sends and reads the whole answer: the `x-llm-cache` header, the body, and the log.
async fn send<S>(
    svc: &S,
    req: http::Request<Full<Bytes>>,
) -> Result<(Option<String>, Bytes, AttemptLog), Error>
where
    S: Service<http::Request<Full<Bytes>>, Response = http::Response<Body>, Error = Error> + Clone,
{
    let response = svc.clone().oneshot(req).await?;
    let marked = response
        .headers()
        .get(CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let log = response
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .unwrap_or_default();
    let body = response.into_body().collect_bytes().await?;
    Ok((marked, body, log))
}

fn answers(mock: &MockProvider, texts: &[&str]) {
    mock.script(
        ScriptKey::model(MODEL),
        texts.iter().map(|t| Reply::openai_chat(MODEL, t)),
    );
}

#[tokio::test(start_paused = true)]
async fn a_repeated_key_is_answered_once_until_its_ttl() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    answers(&mock, &["first", "second"]);
    let mut c = CachePolicy::default();
    c.ttl = Duration::from_secs(60);
    let svc = stack(&policy(c), None)?;
    let (m1, b1, _) = send(&svc, request(&mock, "team", "k1", false)).await?;
    let (m2, b2, log) = send(&svc, request(&mock, "team", "k1", false)).await?;
    assert_eq!(mock.request_count(), 1);
    assert_eq!(b1, b2, "byte for byte");
    assert!(String::from_utf8_lossy(&b1).contains("first"));
    assert_eq!((m1.as_deref(), m2.as_deref()), (Some("miss"), Some("hit")));
    assert!(log.attempts().is_empty());
    assert_eq!(
        log.events()
            .iter()
            .map(|e| e.kind.clone())
            .collect::<Vec<_>>(),
        [LocalEventKind::CacheHit]
    );
    // After the TTL the provider is asked again.
    tokio::time::advance(Duration::from_secs(61)).await;
    let (_, b3, _) = send(&svc, request(&mock, "team", "k1", false)).await?;
    assert_eq!(mock.request_count(), 2);
    assert!(String::from_utf8_lossy(&b3).contains("second"));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn fifty_concurrent_duplicates_make_one_call() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_chat(MODEL, "only once").delay_head(Duration::from_millis(200))],
    );
    let svc = stack(&policy(CachePolicy::default()), None)?;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (svc, req) = (svc.clone(), request(&mock, "team", "k", false));
        tasks.push(tokio::spawn(async move { send(&svc, req).await }));
    }
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.push(t.await??.1);
    }
    assert_eq!(mock.request_count(), 1);
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_in_flight_is_refused_when_the_policy_says_so() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_chat(MODEL, "slow").delay_head(Duration::from_millis(200))],
    );
    let mut c = CachePolicy::default();
    c.in_flight = InFlightRule::Refuse;
    let svc = stack(&policy(c), None)?;
    let first = tokio::spawn({
        let (svc, req) = (svc.clone(), request(&mock, "team", "k", false));
        async move { send(&svc, req).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = send(&svc, request(&mock, "team", "k", false)).await;
    assert_eq!(
        second.err().map(|e| e.kind().clone()),
        Some(ErrorKind::InFlight)
    );
    first.await??;
    assert_eq!(mock.request_count(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn failed_and_cut_answers_are_not_kept() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    // An auth failure (never retried), then a stream cut after its first token, then an
    // answer: each of the first two leaves the key free for the next request.
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::unauthorized(),
            Reply::openai_stream(MODEL, &["a", "b", "c"]).cut_after(2),
            Reply::openai_stream(MODEL, &["whole"]),
        ],
    );
    let svc = stack(&policy(CachePolicy::default()), None)?;
    let (marked, _, _) = send(&svc, request(&mock, "team", "k", true)).await?;
    assert_eq!(
        marked, None,
        "an error answer is not marked: it is not kept"
    );
    let cut = send(&svc, request(&mock, "team", "k", true)).await;
    assert!(matches!(
        cut.err().map(|e| e.kind().clone()),
        Some(ErrorKind::StreamInterrupted { .. })
    ));
    let (_, whole, _) = send(&svc, request(&mock, "team", "k", true)).await?;
    assert_eq!(mock.request_count(), 3);
    // Now kept: the next one is a hit.
    let (marked, again, _) = send(&svc, request(&mock, "team", "k", true)).await?;
    assert_eq!((marked.as_deref(), mock.request_count()), (Some("hit"), 3));
    assert_eq!(again, whole);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_same_key_with_another_body_is_refused() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    answers(&mock, &["first"]);
    let svc = stack(&policy(CachePolicy::default()), None)?;
    send(&svc, request(&mock, "team", "k", false)).await?;
    let other = request(&mock, "team", "k", true); // "stream": true — another body
    let refused = send(&svc, other).await;
    assert_eq!(
        refused.err().map(|e| e.kind().clone()),
        Some(ErrorKind::IdempotencyKeyReused)
    );
    assert_eq!(mock.request_count(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_streamed_answer_replays_as_the_same_events() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["Hel", "lo", "!"])],
    );
    let svc = stack(&policy(CachePolicy::default()), None)?;
    let first = svc
        .clone()
        .oneshot(request(&mock, "team", "s", true))
        .await?;
    let live_type = first.headers().get("content-type").cloned();
    let live = first.into_body().collect_bytes().await?;
    let response = svc
        .clone()
        .oneshot(request(&mock, "team", "s", true))
        .await?;
    assert_eq!(response.headers().get("content-type").cloned(), live_type);
    assert!(live_type.is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream")));
    let replayed = response.into_body().collect_bytes().await?;
    assert_eq!(replayed, live);
    assert!(String::from_utf8_lossy(&replayed).ends_with("data: [DONE]\n\n"));
    assert_eq!(mock.request_count(), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn another_owner_never_sees_the_first_owners_answer() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    answers(&mock, &["for team-a", "for team-b"]);
    let svc = stack(&policy(CachePolicy::default()), None)?;
    let (_, a, _) = send(&svc, request(&mock, "team-a", "shared-key", false)).await?;
    let (marked, b, _) = send(&svc, request(&mock, "team-b", "shared-key", false)).await?;
    assert_eq!(mock.request_count(), 2);
    assert_eq!(marked.as_deref(), Some("miss"));
    assert!(String::from_utf8_lossy(&a).contains("for team-a"));
    assert!(String::from_utf8_lossy(&b).contains("for team-b"));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn memory_stays_within_its_bounds() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    answers(&mock, &["a short answer"]);
    let store = MemoryCache::new(3);
    let mut c = CachePolicy::default();
    c.max_entries = 3;
    // Smaller than any chat completion the mock sends: never kept.
    c.max_entry_bytes = 64;
    let small = stack(&policy(c.clone()), Some(Arc::new(store.clone())))?;
    send(&small, request(&mock, "team", "big-1", false)).await?;
    send(&small, request(&mock, "team", "big-1", false)).await?;
    assert_eq!((mock.request_count(), store.len()), (2, 0));
    // Room for the answers, not for more than three of them.
    c.max_entry_bytes = 1 << 20;
    let svc = stack(&policy(c), Some(Arc::new(store.clone())))?;
    for i in 0..10 {
        send(&svc, request(&mock, "team", &format!("k{i}"), false)).await?;
        assert!(store.len() <= 3, "{} entries", store.len());
    }
    assert_eq!(store.len(), 3);
    // The least recently used went first: k9 is kept, k0 is not.
    let before = mock.request_count();
    send(&svc, request(&mock, "team", "k9", false)).await?;
    assert_eq!(mock.request_count(), before);
    send(&svc, request(&mock, "team", "k0", false)).await?;
    assert_eq!(mock.request_count(), before + 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_waiting_for_the_first_holds_none_of_the_inner_services_capacity()
-> Result<(), BoxError> {
    type Calls = Arc<std::sync::Mutex<Vec<(String, Duration)>>>;
    let t0 = tokio::time::Instant::now();
    let calls: Calls = Arc::default();
    // Key `k` takes a second to answer, any other key none.
    let inner = tower::service_fn({
        let calls = calls.clone();
        move |req: http::Request<Full<Bytes>>| {
            let key = req
                .headers()
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let at = tokio::time::Instant::now() - t0;
            calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((key.clone(), at));
            async move {
                if key == "k" {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                http::Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(br#"{"choices":[]}"#)))
            }
        }
    });
    // Two calls at a time: a service polled ready holds one of the two permits.
    let limited = tower::limit::ConcurrencyLimit::new(inner, 2);
    let svc = CacheLayer::from_policy(&policy(CachePolicy::default()))?.layer(limited);
    let url = "http://127.0.0.1:9";
    let req = |key: &str| {
        let mut req = testing::chat_request(url, MODEL, false);
        let h = req.headers_mut();
        h.insert("idempotency-key", http::HeaderValue::from_str(key)?);
        h.insert("x-llm-budget-owner", http::HeaderValue::from_static("team"));
        Ok::<_, BoxError>(req)
    };
    let first = tokio::spawn(svc.clone().oneshot(req("k")?));
    tokio::task::yield_now().await;
    // The duplicate waits for the first's answer...
    let duplicate = tokio::spawn(svc.clone().oneshot(req("k")?));
    tokio::task::yield_now().await;
    // ...while another key is sent at once on the second permit.
    let other = svc.clone().oneshot(req("other")?).await?;
    assert_eq!(other.status(), http::StatusCode::OK);
    assert_eq!(tokio::time::Instant::now() - t0, Duration::ZERO);
    let first = first.await??;
    first.into_body().collect_bytes().await?;
    let duplicate = duplicate.await??;
    assert_eq!(
        duplicate.headers().get(CACHE_HEADER).map(|v| v.as_bytes()),
        Some(&b"hit"[..])
    );
    let calls = calls.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(
        calls,
        [
            ("k".to_owned(), Duration::ZERO),
            ("other".to_owned(), Duration::ZERO)
        ]
    );
    Ok(())
}

#[cfg(feature = "redis")]
#[path = "support/redis.rs"]
mod redis_server;

#[cfg(feature = "redis")]
mod on_redis {
    use super::redis_server;
    use super::*;
    use tower_llm_resilience::redis::{RedisCache, RedisStore};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_answer_twenty_duplicates_with_one_call() -> Result<(), BoxError> {
        let Some(redis) =
            redis_server::RedisServer::start("two_replicas_answer_twenty_duplicates_with_one_call")
                .await
        else {
            return Ok(());
        };
        let mock = MockProvider::start().await?;
        mock.script(
            ScriptKey::model(MODEL),
            [Reply::openai_chat(MODEL, "once").delay_head(Duration::from_millis(200))],
        );
        let mut p = policy(CachePolicy::default());
        p.store.url = Some(redis.url());
        p.store.timeout = Duration::from_secs(2);
        let replicas: Vec<Stack> = (0..2)
            .map(|_| -> Result<Stack, BoxError> {
                let store = RedisStore::new(&p.store)?;
                stack(&p, Some(Arc::new(RedisCache::new(&store))))
            })
            .collect::<Result<_, _>>()?;
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (svc, req) = (replicas[i % 2].clone(), request(&mock, "team", "k", false));
            tasks.push(tokio::spawn(async move { send(&svc, req).await }));
        }
        let mut bodies = Vec::new();
        for t in tasks {
            bodies.push(t.await??.1);
        }
        assert_eq!(mock.request_count(), 1);
        assert!(bodies.windows(2).all(|w| w[0] == w[1]));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_whose_owner_died_expires() -> Result<(), BoxError> {
        let Some(redis) = redis_server::RedisServer::start("a_lock_whose_owner_died_expires").await
        else {
            return Ok(());
        };
        let mock = MockProvider::start().await?;
        answers(&mock, &["after the lock"]);
        let mut c = CachePolicy::default();
        c.lock_ttl = Duration::from_millis(300);
        let mut p = policy(c.clone());
        p.store.url = Some(redis.url());
        let store = RedisStore::new(&p.store)?;
        let cache = RedisCache::new(&store);
        // A replica took the key and died before answering.
        let key = tower_llm_resilience::cache::CacheKey {
            owner: "team".to_owned(),
            policy: p.workflow.clone(),
            key: "k".to_owned(),
        };
        let claimed = cache.claim(&key, 7, c.lock_ttl, false).await?;
        assert!(matches!(
            claimed,
            tower_llm_resilience::cache::Claim::Claimed
        ));
        let svc = stack(&p, Some(Arc::new(cache)))?;
        let started = std::time::Instant::now();
        let (_, body, _) = send(&svc, request(&mock, "team", "k", false)).await?;
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "waited for the lock"
        );
        assert!(String::from_utf8_lossy(&body).contains("after the lock"));
        assert_eq!(mock.request_count(), 1);
        Ok(())
    }
}
