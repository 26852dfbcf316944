//! Shared state across replicas on a real Redis: several stacks at once, each with its own
//! connection, as several gateway replicas would be, and the server killed and restarted
//! mid-run. Redis keeps time by its own clock, so these tests run in real time.
#![cfg(all(feature = "testing", feature = "redis"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use tower::{Layer, ServiceExt};
use tower_llm_resilience::budget::{SpendHandle, SpendReceipt};
use tower_llm_resilience::policy::{Price, RateLimitPolicy, SpendPolicy, StoreMode};
use tower_llm_resilience::redis::RedisStore;
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{BoxError, ErrorKind, Policy, ResilienceLayer, Resilient};

#[path = "support/redis.rs"]
mod redis_server;
use redis_server::RedisServer;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

const OWNER: &str = "team";

/// The interactive preset with a spend cap of `cap` micro units for `team`, one micro unit per
/// token in and out, and the store at `url`.
fn policy(url: &str, cap: u64, hard: bool) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(3);
    p.store.url = Some(url.to_owned());
    // A loaded machine runs a thousand requests at once: give each call room.
    p.store.timeout = Duration::from_secs(2);
    let mut s = SpendPolicy::default();
    s.cap = cap as f64 / 1e6;
    s.default_owner = Some(OWNER.to_owned());
    s.default_price = Some(Price::new(1.0, 1.0));
    s.charge_failed = tower_llm_resilience::policy::ChargeRule::ReportedOnly;
    s.hard = hard;
    p.budget.spend = Some(s);
    p
}

/// One replica: its own store (its own connection) and its own stack.
struct Replica {
    store: RedisStore,
    spend: SpendHandle,
    svc: Resilient<Client>,
}

fn replica(policy: &Policy) -> Result<Replica, BoxError> {
    let store = RedisStore::new(&policy.store)?;
    let layer = ResilienceLayer::new(policy)?.budget_store(Arc::new(store.clone()));
    let spend = layer.spend().ok_or("a spend cap")?;
    Ok(Replica {
        store,
        spend,
        svc: layer.layer(testing::client()),
    })
}

/// A chat request for `model` that may produce up to `max_tokens`: 7 estimated input tokens
/// ("user" + "hello", and 4 for the message), at most 13 billed.
fn request(base: &str, model: &str, max_tokens: u64) -> http::Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"max_tokens":{max_tokens}}}"#
    );
    let mut req = http::Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|e| panic!("{e}"));
    *req.version_mut() = http::Version::HTTP_11;
    req
}

/// Scripts models `m20`..`m59`: model `mK` answers with `input` prompt tokens and `K`
/// completion tokens, so a request for it with `max_tokens` K costs `input + K`.
fn script_costs(mock: &MockProvider, input: u64) {
    for k in 20..60u64 {
        let body = format!(
            r#"{{"id":"c","object":"chat.completion","model":"m{k}","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{input},"completion_tokens":{k},"total_tokens":{}}}}}"#,
            input + k
        );
        mock.script(ScriptKey::model(format!("m{k}")), [Reply::json(200, body)]);
    }
}

/// What a run of `n` concurrent requests of random cost spread over `replicas` did.
struct Run {
    served: u64,
    denied: u64,
    charged: u64,
    /// The most that was ever reserved plus booked, as seen while the run went on.
    peak_committed: u64,
}

async fn run(replicas: &[Replica], mock: &MockProvider, n: usize) -> Result<Run, BoxError> {
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let monitor = tokio::spawn({
        let (spend, stop, peak) = (
            replicas[0].spend.clone(),
            monitor_stop.clone(),
            peak.clone(),
        );
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = spend.status(OWNER).await {
                    peak.fetch_max(s.committed(), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        // A fixed spread of costs (the same every run): 20 to 59 output tokens.
        let k = 20 + (i as u64 * 7919) % 40;
        let svc = replicas[i % replicas.len()].svc.clone();
        let req = request(&mock.url(), &format!("m{k}"), k);
        tasks.push(tokio::spawn(async move {
            match svc.oneshot(req).await {
                Ok(resp) => {
                    let receipt = resp.extensions().get::<SpendReceipt>().cloned();
                    resp.into_body().collect_bytes().await?;
                    let charged = receipt.and_then(|r| r.charged_micros()).ok_or("charged")?;
                    Ok::<_, BoxError>(Some(charged))
                }
                Err(e) if matches!(e.kind(), ErrorKind::BudgetExhausted { .. }) => Ok(None),
                Err(e) => Err(e.into()),
            }
        }));
    }
    let (mut served, mut denied, mut charged) = (0, 0, 0);
    for t in tasks {
        match t.await?? {
            Some(c) => {
                served += 1;
                charged += c;
            }
            None => denied += 1,
        }
    }
    monitor_stop.store(true, Ordering::Relaxed);
    monitor.await?;
    for r in replicas {
        r.store.flush().await;
    }
    Ok(Run {
        served,
        denied,
        charged,
        peak_committed: peak.load(Ordering::Relaxed),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_never_reserve_and_book_past_one_spend_cap() -> Result<(), BoxError> {
    let Some(redis) =
        RedisServer::start("four_replicas_never_reserve_and_book_past_one_spend_cap").await
    else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    // Billed no more than estimated: 5 input tokens of the 7 reserved, K of the K output.
    script_costs(&mock, 5);
    let cap = 20_000;
    let p = policy(&redis.url(), cap, false);
    let replicas: Vec<Replica> = (0..4).map(|_| replica(&p)).collect::<Result<_, _>>()?;
    let r = run(&replicas, &mock, 1000).await?;
    // Demand (about 47 000) far exceeds the cap: many are denied, none over it.
    assert!(
        r.denied > 0 && r.served > 0,
        "{} served, {} denied",
        r.served,
        r.denied
    );
    assert!(
        r.peak_committed <= cap,
        "peak {} over {cap}",
        r.peak_committed
    );
    let status = replicas[0].spend.status(OWNER).await?;
    assert_eq!(status.reserved, 0, "every reservation settled");
    assert_eq!(
        status.spent, r.charged,
        "booked = what each request was charged"
    );
    assert!(status.spent <= cap);
    assert_eq!(replicas.iter().map(|r| r.spend.overruns()).sum::<u64>(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_cap_holds_when_the_provider_bills_more_than_estimated() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    // Billed 12 input tokens for a prompt estimated at 7 (its text alone at 3): a chat
    // template's tokens, as providers bill them.
    script_costs(&mock, 12);
    let cap = 20_000;

    // One stack, in memory: no Redis needed.
    let mut p = policy("redis://127.0.0.1:1", cap, true);
    p.store.url = None;
    let layer = ResilienceLayer::new(&p)?;
    let spend = layer.spend().ok_or("spend")?;
    let one = Replica {
        store: RedisStore::new(&policy("redis://127.0.0.1:1", cap, true).store)?,
        spend,
        svc: layer.layer(testing::client()),
    };
    let r = run(std::slice::from_ref(&one), &mock, 1000).await?;
    let status = one.spend.status(OWNER).await?;
    assert!(r.served > 0 && r.denied > 0);
    assert!(status.spent <= cap, "booked {} over {cap}", status.spent);
    assert!(r.peak_committed <= cap);
    assert_eq!((status.reserved, one.spend.overruns()), (0, 0));

    // Four replicas on Redis.
    let Some(redis) =
        RedisServer::start("a_hard_cap_holds_when_the_provider_bills_more_than_estimated").await
    else {
        return Ok(());
    };
    let p = policy(&redis.url(), cap, true);
    let replicas: Vec<Replica> = (0..4).map(|_| replica(&p)).collect::<Result<_, _>>()?;
    let r = run(&replicas, &mock, 1000).await?;
    let status = replicas[0].spend.status(OWNER).await?;
    assert!(r.served > 0 && r.denied > 0);
    assert!(status.spent <= cap, "booked {} over {cap}", status.spent);
    assert!(
        r.peak_committed <= cap,
        "peak {} over {cap}",
        r.peak_committed
    );
    assert_eq!(status.reserved, 0);
    assert_eq!(status.spent, r.charged);
    assert_eq!(replicas.iter().map(|r| r.spend.overruns()).sum::<u64>(), 0);

    // The same provider under a cap that is not hard: every answer books above its
    // reservation, and says so.
    let mut soft = policy(&redis.url(), cap, false);
    soft.store.key_prefix = "soft".to_owned();
    let replicas: Vec<Replica> = (0..4).map(|_| replica(&soft)).collect::<Result<_, _>>()?;
    let r = run(&replicas, &mock, 200).await?;
    let overruns: u64 = replicas.iter().map(|r| r.spend.overruns()).sum();
    assert_eq!(
        overruns, r.served,
        "each answer booked 5 more than it reserved"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_share_one_rate_limit() -> Result<(), BoxError> {
    let Some(redis) = RedisServer::start("four_replicas_share_one_rate_limit").await else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    let (rate, burst) = (20.0, 5u32);
    let mut p = Policy::interactive();
    p.store.url = Some(redis.url());
    p.store.timeout = Duration::from_secs(2);
    let mut limit = RateLimitPolicy::default();
    limit.requests_per_second = Some(rate);
    limit.burst = burst;
    p.budget.rate_limit = Some(limit);
    let replicas: Vec<Resilient<Client>> = (0..4)
        .map(|_| -> Result<_, BoxError> {
            let store = RedisStore::new(&p.store)?;
            Ok(ResilienceLayer::new(&p)?
                .budget_store(Arc::new(store))
                .layer(testing::client()))
        })
        .collect::<Result<_, _>>()?;
    // Each replica offers far more than the fleet may admit, for 3 s.
    let run_for = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for svc in replicas {
        let base = mock.url();
        tasks.push(tokio::spawn(async move {
            let (mut admitted, mut refused) = (0u64, 0u64);
            while start.elapsed() < run_for {
                let req = testing::chat_request(&base, "gpt-4o", false);
                match svc.clone().oneshot(req).await {
                    Ok(resp) => {
                        resp.into_body().collect_bytes().await?;
                        admitted += 1;
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::RateLimited { .. }) => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(e) => return Err::<_, BoxError>(e.into()),
                }
            }
            Ok((admitted, refused))
        }));
    }
    let (mut admitted, mut refused) = (0, 0);
    for t in tasks {
        let (a, r) = t.await??;
        admitted += a;
        refused += r;
    }
    let bound = (rate * run_for.as_secs_f64()) as u64 + u64::from(burst);
    assert_eq!(mock.request_count() as u64, admitted);
    assert!(admitted <= bound, "admitted {admitted} > {bound}");
    assert!(
        admitted * 10 >= bound * 9,
        "admitted {admitted} < 90 % of {bound}"
    );
    assert!(refused > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_reservations_are_reclaimed_after_their_lease() -> Result<(), BoxError> {
    let Some(redis) =
        RedisServer::start("a_dead_replicas_reservations_are_reclaimed_after_their_lease").await
    else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::Any, [Reply::never()]);
    let cap = 1_000;
    let mut p = policy(&redis.url(), cap, false);
    p.budget.deadline = Some(Duration::from_millis(500));
    p.store.lease_margin = Duration::from_millis(500);

    // Replica A: ten requests that hold reservations, then the process is gone — its runtime
    // and store vanish without running a destructor, as a killed process would.
    let (a_url, a_policy) = (mock.url(), p.clone());
    std::thread::spawn(move || -> Result<(), BoxError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let a = replica(&a_policy)?;
            for _ in 0..10 {
                let svc = a.svc.clone();
                let req = request(&a_url, "gpt-4o", 50);
                tokio::spawn(svc.oneshot(req));
            }
            // Until every reservation is in Redis.
            while a.spend.status(OWNER).await?.reserved < 10 * 57 {
                tokio::task::yield_now().await;
            }
            std::mem::forget(a);
            Ok::<_, BoxError>(())
        })?;
        std::mem::forget(rt);
        Ok(())
    })
    .join()
    .map_err(|_| "replica A panicked")??;

    let b = replica(&p)?;
    let held = b.spend.status(OWNER).await?;
    assert_eq!(held.reserved, 570, "A's reservations outlive A");
    // Their lease is the deadline plus the margin: 1 s. Then the cap is whole again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(b.spend.status(OWNER).await?.reserved, 0);
    assert_eq!(b.spend.remaining_micros(OWNER).await?, cap);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_run() -> Result<(), BoxError> {
    let Some(mut redis) = RedisServer::start("redis_killed_and_restarted_mid_run").await else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    script_costs(&mock, 5);
    let cap = 10_000;
    let mut closed = policy(&redis.url(), cap, false);
    closed.store.timeout = Duration::from_millis(50);
    let mut local = closed.clone();
    local.store.key_prefix = "local".to_owned();
    local.store.mode.spend = StoreMode::Local;
    local.store.mode.local_share = 0.5;
    let (fc, lo) = (replica(&closed)?, replica(&local)?);

    let send = |svc: Resilient<Client>, k: u64| {
        let req = request(&mock.url(), &format!("m{k}"), k);
        async move {
            let started = Instant::now();
            let out = tokio::time::timeout(Duration::from_secs(5), async {
                let resp = svc.oneshot(req).await?;
                resp.into_body().collect_bytes().await?;
                Ok::<_, tower_llm_resilience::Error>(())
            })
            .await;
            (
                out.map_err(|_| "a request hung on Redis"),
                started.elapsed(),
            )
        }
    };

    // Shared while Redis is up.
    for svc in [fc.svc.clone(), lo.svc.clone()] {
        let (out, _) = send(svc, 20).await;
        out??;
    }
    assert_eq!(fc.spend.status(OWNER).await?.spent, 25);
    assert_eq!(lo.spend.status(OWNER).await?.spent, 25);

    redis.kill();
    // Fail closed: denied with StoreUnavailable, within the timeout (plus this machine's
    // scheduling), never hanging.
    for _ in 0..5 {
        let (out, took) = send(fc.svc.clone(), 20).await;
        let err = out?.err().ok_or("served without its store")?;
        assert_eq!(err.kind(), &ErrorKind::StoreUnavailable);
        assert!(took < Duration::from_millis(500), "took {took:?}");
    }
    // Local: served under this replica's share of the cap (5 000), then denied.
    let mut served = 0u64;
    loop {
        let (out, took) = send(lo.svc.clone(), 50).await;
        assert!(took < Duration::from_millis(500), "took {took:?}");
        match out? {
            Ok(()) => served += 1,
            Err(e) if matches!(e.kind(), ErrorKind::BudgetExhausted { .. }) => break,
            Err(e) => return Err(e.into()),
        }
        assert!(served <= 100, "the local share is not a cap");
    }
    // Each books 5 + 50 of the 57 it reserved: 90 fit in 5 000, the 91st's 57 do not.
    assert_eq!(served, 90);
    assert!(lo.store.stats().local_answers > 0 && lo.store.stats().switches >= 1);

    redis.restart().await;
    // Shared again by itself: once the store's rest after a failure is over and its
    // connection is back, within a few seconds.
    let back = Instant::now();
    loop {
        let (out, _) = send(fc.svc.clone(), 20).await;
        match out? {
            Ok(()) => break,
            Err(e) if e.kind() == &ErrorKind::StoreUnavailable => {
                assert!(back.elapsed() < Duration::from_secs(5), "still down: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    fc.store.flush().await;
    let status = fc.spend.status(OWNER).await?;
    // A fresh server: only what was booked since.
    assert_eq!((status.spent, status.reserved), (25, 0));
    assert!(fc.store.stats().switches >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_dropped_mid_stream_leave_no_reservation_open() -> Result<(), BoxError> {
    let Some(redis) =
        RedisServer::start("bodies_dropped_mid_stream_leave_no_reservation_open").await
    else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    let words: Vec<String> = (0..50).map(|i| format!("w{i} ")).collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    mock.script(
        ScriptKey::Any,
        [Reply::openai_stream("gpt-4o", &words).event_delay(Duration::from_millis(5))],
    );
    let p = policy(&redis.url(), 1_000_000, false);
    let replicas: Vec<Replica> = (0..2).map(|_| replica(&p)).collect::<Result<_, _>>()?;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let svc = replicas[i % 2].svc.clone();
        let req = testing::chat_request(&mock.url(), "gpt-4o", true);
        tasks.push(tokio::spawn(async move {
            let resp = svc.oneshot(req).await?;
            let mut body = resp.into_body();
            // A few events reach the caller, who then goes away.
            for _ in 0..(i % 5) {
                http_body_util::BodyExt::frame(&mut body).await;
            }
            drop(body);
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let reserved_before = replicas[0].spend.status(OWNER).await?.reserved;
    for r in &replicas {
        r.store.flush().await;
    }
    let status = replicas[0].spend.status(OWNER).await?;
    assert_eq!(
        status.reserved, 0,
        "{reserved_before} reserved before the flush"
    );
    Ok(())
}

// ------------------------------------------------------------- breakers across the fleet

/// A stack whose breaker (all or nothing: no throttle) shares its route health through Redis.
fn breaker_replica(
    url: &str,
    edit: impl Fn(&mut Policy),
) -> Result<
    (
        Resilient<Client>,
        tower_llm_resilience::circuit_breaker::CircuitBreakerHandle,
    ),
    BoxError,
> {
    let mut p = Policy::interactive();
    p.retry.seed = Some(1);
    p.retry.max_attempts = 1;
    p.store.url = Some(url.to_owned());
    p.store.timeout = Duration::from_secs(2);
    let cb = &mut p.circuit_breaker;
    cb.throttle = None;
    cb.failure_rate = None;
    cb.consecutive_failures = Some(2);
    cb.half_open_probes = 1;
    cb.half_open_successes = 1;
    edit(&mut p);
    let store = RedisStore::new(&p.store)?;
    let layer = ResilienceLayer::new(&p)?.health_store(
        Arc::new(tower_llm_resilience::redis::RedisHealth::new(&store)),
        StoreMode::Local,
    )?;
    let handle = layer.circuit_breaker();
    Ok((layer.layer(testing::client()), handle))
}

async fn status_of(
    svc: &Resilient<Client>,
    base: &str,
) -> Result<u16, tower_llm_resilience::Error> {
    let resp = svc
        .clone()
        .oneshot(testing::chat_request(base, "gpt-4o", false))
        .await?;
    let status = resp.status().as_u16();
    resp.into_body().collect_bytes().await?;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_on_one_replica_fails_fast_on_another_within_a_second() -> Result<(), BoxError> {
    let Some(redis) =
        RedisServer::start("a_trip_on_one_replica_fails_fast_on_another_within_a_second").await
    else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let long_open = |p: &mut Policy| {
        p.circuit_breaker.open_base = Duration::from_secs(30);
        p.circuit_breaker.open_cap = Duration::from_secs(30);
    };
    let (a, a_breakers) = breaker_replica(&redis.url(), long_open)?;
    let (b, b_breakers) = breaker_replica(&redis.url(), long_open)?;
    // B has seen the route once (healthy as far as it knows).
    assert_eq!(status_of(&b, &mock.url()).await?, 503);
    // A trips it: two failures in a row.
    for _ in 0..2 {
        assert_eq!(status_of(&a, &mock.url()).await?, 503);
    }
    let tripped = Instant::now();
    let route = "primary";
    assert!(a_breakers.state(route).is_open());
    while !b_breakers.state(route).is_open() {
        assert!(
            tripped.elapsed() < Duration::from_secs(1),
            "B still closed after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls = mock.request_count();
    let err = status_of(&b, &mock.url())
        .await
        .err()
        .ok_or("B called the route")?;
    assert!(matches!(err.kind(), ErrorKind::CircuitOpen { .. }), "{err}");
    assert_eq!(mock.request_count(), calls, "B failed fast without calling");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_at_half_open_send_exactly_the_configured_probes() -> Result<(), BoxError> {
    let Some(redis) =
        RedisServer::start("four_replicas_at_half_open_send_exactly_the_configured_probes").await
    else {
        return Ok(());
    };
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let short_open = |p: &mut Policy| {
        p.circuit_breaker.open_base = Duration::from_millis(800);
        p.circuit_breaker.open_cap = Duration::from_millis(800);
    };
    let replicas: Vec<_> = (0..4)
        .map(|_| breaker_replica(&redis.url(), short_open))
        .collect::<Result<_, _>>()?;
    // Every replica has seen the route (a replica learns a route's fleet state at its first
    // exchange after it first calls it); then one of them trips it.
    for (svc, _) in &replicas {
        status_of(svc, &mock.url()).await?;
    }
    status_of(&replicas[0].0, &mock.url()).await?;
    // Within a couple of exchanges every replica has it open.
    let tripped = Instant::now();
    while !replicas.iter().all(|(_, b)| b.state("primary").is_open()) {
        assert!(
            tripped.elapsed() < Duration::from_secs(1),
            "not open everywhere"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The route now answers never: a probe that reaches it holds its slot.
    mock.script(ScriptKey::Any, [Reply::never()]);
    let before = mock.request_count();
    // Every replica keeps trying for 2 s, well past the open time.
    let stop = Instant::now() + Duration::from_millis(2000);
    let mut probes = Vec::new();
    let mut hammer = Vec::new();
    for (svc, _) in &replicas {
        let (svc, base) = (svc.clone(), mock.url());
        hammer.push(tokio::spawn(async move {
            let mut hung = Vec::new();
            while Instant::now() < stop {
                let svc = svc.clone();
                let req = testing::chat_request(&base, "gpt-4o", false);
                let call = tokio::spawn(async move { svc.oneshot(req).await.map(|_| ()) });
                tokio::time::sleep(Duration::from_millis(20)).await;
                if !call.is_finished() {
                    // Still waiting: it is a probe in flight.
                    hung.push(call);
                }
            }
            hung
        }));
    }
    for h in hammer {
        probes.extend(h.await?);
    }
    assert_eq!(
        mock.request_count() - before,
        1,
        "one probe across the fleet"
    );
    assert_eq!(probes.len(), 1);
    // A probe whose future is dropped frees its slot: another one goes.
    for p in probes {
        p.abort();
    }
    let freed = Instant::now();
    while mock.request_count() - before < 2 {
        assert!(
            freed.elapsed() < Duration::from_secs(2),
            "the slot was not freed"
        );
        for (svc, _) in &replicas {
            let (svc, base) = (svc.clone(), mock.url());
            tokio::spawn(async move {
                let _ = svc
                    .oneshot(testing::chat_request(&base, "gpt-4o", false))
                    .await;
            });
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mock.request_count() - before, 2, "again exactly one probe");
    Ok(())
}
