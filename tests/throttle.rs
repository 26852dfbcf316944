//! End-to-end over loopback against the `MockProvider`: the whole interactive stack on a single
//! route (no backup), where the breaker throttles instead of failing everything.
#![cfg(feature = "testing")]

use std::time::Duration;

use tower::{ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::{Decision, LocalEventKind, StopReason, WaitSource};
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{
    AttemptLog, BoxError, Error, ErrorKind, FailureClass, Policy, RouteName,
};

/// What one request came to: its status or its error, and its attempt log.
async fn request<S>(svc: &S, mock: &MockProvider) -> (Result<u16, Error>, AttemptLog)
where
    S: tower::Service<
            http::Request<http_body_util::Full<bytes::Bytes>>,
            Response = http::Response<tower_llm_resilience::Body>,
            Error = Error,
        > + Clone,
{
    use http_body_util::BodyExt;
    let req = testing::chat_request(&mock.url(), "gpt-4o", false);
    match svc.clone().oneshot(req).await {
        Ok(r) => {
            let log = r
                .extensions()
                .get::<AttemptLog>()
                .cloned()
                .unwrap_or_default();
            let status = r.status().as_u16();
            let body = r.into_body().collect().await;
            (body.map(|_| status), log)
        }
        Err(e) => {
            let log = e.attempt_log().cloned().unwrap_or_default();
            (Err(e), log)
        }
    }
}

/// Every other call a 503 (overloaded), the others answered: a provider that is half down.
fn half_down(mock: &MockProvider) {
    let replies = (0..400).map(|n| {
        if n % 2 == 0 {
            Reply::openai_overloaded()
        } else {
            Reply::openai_chat("gpt-4o", "hello")
        }
    });
    mock.script(ScriptKey::model("gpt-4o"), replies);
}

/// Sends 60 requests, 200 ms apart, through `policy`'s stack; how many were served.
async fn served(policy: &Policy, mock: &MockProvider) -> Result<usize, BoxError> {
    let svc = ServiceBuilder::new()
        .layer(policy.layer()?)
        .service(testing::client());
    let mut ok = 0;
    for _ in 0..60 {
        if request(&svc, mock).await.0.ok() == Some(200) {
            ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(ok)
}

#[tokio::test(start_paused = true)]
async fn a_half_failing_single_route_is_still_served() -> Result<(), BoxError> {
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(5);

    let mock = MockProvider::start().await?;
    half_down(&mock);
    // Every request's first attempt is a 503 and its retry is answered: all 60 served, the
    // throttle shedding nothing from a route that accepts half its calls.
    assert_eq!(served(&policy, &mock).await?, 60);
    assert_eq!(mock.request_count(), 120);

    // The all-or-nothing breaker (no throttle) trips at 50 % and sheds a route that still
    // answers half its calls.
    let mock = MockProvider::start().await?;
    half_down(&mock);
    let mut all_or_nothing = policy.clone();
    all_or_nothing.circuit_breaker.throttle = None;
    let served = served(&all_or_nothing, &mock).await?;
    assert!(served < 60, "{served} of 60 served");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_throttled_request_is_typed_with_its_route_and_wait_and_logged_without_an_attempt()
-> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::model("gpt-4o"), [Reply::openai_overloaded()]);
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(5);
    // One client sending one request at a time stays below the preset's floor (10 calls per
    // window always go through): a floor of 2 lets it see the throttle at work.
    if let Some(t) = policy.circuit_breaker.throttle.as_mut() {
        t.min_requests = 2;
    }
    let svc = ServiceBuilder::new()
        .layer(policy.layer()?)
        .service(testing::client());

    let (mut throttled, mut attempts) = (0, 0);
    for _ in 0..100 {
        let (out, log) = request(&svc, &mock).await;
        attempts += log.attempt_count();
        match out {
            // The provider's 503, once the retries are spent.
            Ok(status) => assert_eq!(status, 503),
            Err(e) => {
                let ErrorKind::Throttled { route, retry_in } = e.kind() else {
                    panic!("{e}");
                };
                assert_eq!(route, &RouteName::new("primary"));
                assert!(*retry_in > Duration::ZERO && *retry_in <= Duration::from_millis(100));
                // The refusal is the log's last event, with the same route and wait, and the
                // log holds no attempt for it.
                let events = log.events();
                let last = events.last().ok_or("no event")?;
                assert_eq!(
                    last.kind,
                    LocalEventKind::Throttled {
                        retry_in: *retry_in
                    }
                );
                assert_eq!(last.route.as_ref(), Some(route));
                assert!(log.to_string().contains("throttled"), "{log}");
                throttled += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every call the provider saw is an attempt in some log, and nothing else reached it.
    assert_eq!(mock.request_count(), attempts);
    // A route that is down: most requests never reached it.
    assert!(throttled > 50, "{throttled} of 100 throttled");
    assert!(attempts < 100, "{attempts} attempts for 100 requests");
    Ok(())
}

/// The throttle's refusals in a request's log.
fn refusals(log: &AttemptLog) -> usize {
    log.events()
        .iter()
        .filter(|e| matches!(e.kind, LocalEventKind::Throttled { .. }))
        .count()
}

/// The attempts after which the request went back to waiting out the outage.
fn waits_after(log: &AttemptLog) -> Vec<usize> {
    let back_to_waiting = |d: &Decision| {
        matches!(
            d,
            Decision::Retry {
                source: WaitSource::Throttle,
                ..
            }
        )
    };
    let attempts = log.attempts();
    (0..attempts.len())
        .filter(|&i| attempts[i].decisions.iter().any(back_to_waiting))
        .collect()
}

/// Whether a request waited out an outage: asked the throttle again after it turned the call
/// away (a request that does not wait ends at its one refusal), or went back to waiting after a
/// call made while it waited.
fn waited(log: &AttemptLog) -> bool {
    refusals(log) >= 2 || !waits_after(log).is_empty()
}

/// The interactive preset with `seed`, a floor of 2 (one client sending one request at a time
/// stays below the preset's 10) and outages younger than `hold` waited out.
fn waiting_policy(seed: u64, hold: Duration) -> Policy {
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(seed);
    if let Some(t) = policy.circuit_breaker.throttle.as_mut() {
        t.min_requests = 2;
        t.hold = hold;
    }
    policy
}

/// A provider whose every call is a 503 (overloaded).
async fn down_for_good() -> Result<MockProvider, BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model("gpt-4o"),
        (0..1000).map(|_| Reply::openai_overloaded()),
    );
    Ok(mock)
}

#[tokio::test(start_paused = true)]
async fn a_request_waits_out_a_young_outage_and_is_served_once_the_route_answers()
-> Result<(), BoxError> {
    // Four 503s, then the route answers again.
    let script = || {
        (0..4)
            .map(|_| Reply::openai_overloaded())
            .chain((0..10).map(|_| Reply::openai_chat("gpt-4o", "hello")))
    };
    let stack = |hold: Duration| -> Result<_, BoxError> {
        Ok(ServiceBuilder::new()
            .layer(waiting_policy(7, hold).layer()?)
            .service(testing::client()))
    };

    // Without waiting: the request ends on the outage (its retries spent or turned away).
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::model("gpt-4o"), script());
    let (out, log) = request(&stack(Duration::ZERO)?, &mock).await;
    assert_ne!(out.ok(), Some(200), "{log}");
    assert!(!waited(&log), "{log}");

    // Waiting out the outage, the same request is served by the fifth call, within the hold
    // (seed 7: the throttle turns the request's third call away).
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::model("gpt-4o"), script());
    let started = tokio::time::Instant::now();
    let (out, log) = request(&stack(Duration::from_secs(5))?, &mock).await;
    assert_eq!(out.ok(), Some(200), "{log}");
    // Two retries (the preset's three attempts), then the throttle turns the third call away
    // at 201 ms: the request asks again each time the window moves (ten refusals in all), the
    // calls let through at 700 ms and 1 s are refused by the route and send it back to
    // waiting, and the one at 1.4 s is answered.
    assert_eq!(refusals(&log), 10, "{log}");
    assert_eq!(waits_after(&log), [2, 3], "{log}");
    assert_eq!(started.elapsed(), Duration::from_millis(1400), "{log}");
    // Every call the provider saw is in the log, more than `max_attempts` (3): the calls made
    // while the request waited are the throttle's, not its retries.
    assert_eq!(mock.request_count(), 5);
    assert_eq!(log.attempt_count(), 5);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_server_wait_named_while_waiting_out_an_outage_is_heeded() -> Result<(), BoxError> {
    // As in the test above, but the call let through at 700 ms meets a rate limit that names a
    // 2 s wait: the throttle's next window is not the server's wait, so the request's next
    // call is the ladder's retry, 2 s later, and it is served.
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model("gpt-4o"),
        (0..3)
            .map(|_| Reply::openai_overloaded())
            .chain([Reply::openai_rate_limited(Some("2"))])
            .chain((0..10).map(|_| Reply::openai_chat("gpt-4o", "hello"))),
    );
    let stack = || -> Result<_, BoxError> {
        Ok(ServiceBuilder::new()
            .layer(waiting_policy(7, Duration::from_secs(5)).layer()?)
            .service(testing::client()))
    };
    let started = tokio::time::Instant::now();
    let (out, log) = request(&stack()?, &mock).await;
    assert_eq!(out.ok(), Some(200), "{log}");
    // The 503 at 700 ms sent the request back to waiting; the 429 at 1 s did not.
    assert_eq!(waits_after(&log), [2], "{log}");
    let limited = log.attempts().get(3).cloned().ok_or("a fourth attempt")?;
    assert_eq!(limited.class, Some(FailureClass::RateLimited), "{log}");
    assert_eq!(
        limited.decisions.last(),
        Some(&Decision::Retry {
            wait: Duration::from_secs(2),
            source: WaitSource::Server,
        }),
        "{log}"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(3000), "{log}");
    assert_eq!(mock.request_count(), 5);

    // A server wait above the preset's `max_server_wait` (10 s) ends the wait at once: the
    // request's answer is the rate limit, its wait for the caller to honour.
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model("gpt-4o"),
        (0..3)
            .map(|_| Reply::openai_overloaded())
            .chain([Reply::openai_rate_limited(Some("60"))])
            .chain((0..10).map(|_| Reply::openai_chat("gpt-4o", "hello"))),
    );
    let started = tokio::time::Instant::now();
    let (out, log) = request(&stack()?, &mock).await;
    assert_eq!(out.ok(), Some(429), "{log}");
    assert_eq!(started.elapsed(), Duration::from_millis(1000), "{log}");
    assert_eq!(mock.request_count(), 4);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn an_outage_older_than_hold_fails_fast_again() -> Result<(), BoxError> {
    let mock = down_for_good().await?;
    let policy = waiting_policy(5, Duration::from_secs(1));
    let svc = ServiceBuilder::new()
        .layer(policy.layer()?)
        .service(testing::client());

    // The outage starts with the first call, at 0 s.
    let origin = tokio::time::Instant::now();
    let (mut early, mut late) = (0, 0);
    while origin.elapsed() < Duration::from_secs(4) {
        let sent = origin.elapsed();
        let (out, log) = request(&svc, &mock).await;
        assert_ne!(out.ok(), Some(200));
        if waited(&log) {
            // Only a request that met the outage in its first second waits.
            assert!(sent < Duration::from_secs(1), "waited at {sent:?}: {log}");
            early += 1;
        } else if sent >= Duration::from_millis(1500) {
            late += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(early >= 1, "no request waited in the outage's first second");
    assert!(late >= 10, "{late} requests after 1.5 s");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn waiting_out_an_outage_ends_before_the_deadline() -> Result<(), BoxError> {
    let mock = down_for_good().await?;
    let mut policy = waiting_policy(7, Duration::from_secs(5));
    policy.retry.max_elapsed = Duration::from_secs(2);
    let svc = ServiceBuilder::new()
        .layer(policy.layer()?)
        .service(testing::client());

    // The outage is young for 5 s, the request's deadline 2 s away: it waits, then the
    // refusal that would have to wait past the deadline is its answer.
    let started = tokio::time::Instant::now();
    let (out, log) = request(&svc, &mock).await;
    let took = started.elapsed();
    assert!(waited(&log), "{log}");
    let e = out.err().ok_or("a refusal")?;
    assert!(
        matches!(e.kind(), ErrorKind::Throttled { .. }),
        "{e}: {log}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}: {log}");
    assert!(took >= Duration::from_millis(1900), "{took:?}: {log}");
    // Every call the provider saw is in the log.
    assert_eq!(mock.request_count(), log.attempt_count());
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_call_is_not_replayed_while_waiting() -> Result<(), BoxError> {
    // Two 503s, then a call that never answers: timed out, it may have reached the model, and
    // a chat POST without an idempotency key is not replayed, waiting or not.
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model("gpt-4o"),
        [
            Reply::openai_overloaded(),
            Reply::openai_overloaded(),
            Reply::never(),
        ]
        .into_iter()
        .chain((0..10).map(|_| Reply::openai_chat("gpt-4o", "hello"))),
    );
    // A hold long enough for the outage to be young still when the preset's 20 s first-token
    // timeout ends the call.
    let policy = waiting_policy(7, Duration::from_secs(30));
    let svc = ServiceBuilder::new()
        .layer(policy.layer()?)
        .service(testing::client());

    // As in the test above, the third call is turned away and the request waits; the call it
    // makes at 700 ms times out, and that ends it: not sent back to waiting, it was the
    // request's third attempt. (Sent back, the request would be served by a fourth call.)
    let (out, log) = request(&svc, &mock).await;
    assert!(waited(&log), "{log}");
    let e = out.err().ok_or_else(|| format!("no error: {log}"))?;
    assert_eq!(e.class(), Some(FailureClass::Timeout), "{e}: {log}");
    assert_eq!(mock.request_count(), 3, "{log}");
    let last = log.attempts().last().cloned().ok_or("no attempt")?;
    assert_eq!(
        last.decisions.last(),
        Some(&Decision::Stop(StopReason::AttemptsExhausted)),
        "{log}"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_route_back_from_an_old_outage_takes_load_once_a_call_outlives_its_slowest_refusal()
-> Result<(), BoxError> {
    // Down until 3 s: the first refusal takes 90 ms, the others 40 ms but one in twenty-five
    // 60 ms, which outlasts the window's slowest while the route is still down.
    let mock = MockProvider::start().await?;
    let refusal = |n: usize| {
        let ms = match n {
            0 => 90,
            n if n % 25 == 0 => 60,
            _ => 40,
        };
        Reply::openai_overloaded().delay_head(Duration::from_millis(ms))
    };
    mock.script(ScriptKey::model("gpt-4o"), (0..1000).map(refusal));
    // The preset's floor (one call per 100 ms bucket) and window (1 s); no waiting, so every
    // outage older than the window fails fast and is forgotten once it is over.
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(3);
    if let Some(t) = policy.circuit_breaker.throttle.as_mut() {
        t.hold = Duration::ZERO;
    }
    let svc = ServiceBuilder::new()
        .layer(policy.layer()?)
        .service(testing::client());

    // A request every 10 ms, each on its own, until 3.5 s; the route answers from 3 s on, in
    // 500 ms.
    let recovery = Duration::from_secs(3);
    let origin = tokio::time::Instant::now();
    let mut sent = Vec::new();
    while origin.elapsed() < Duration::from_millis(3500) {
        let at = origin.elapsed();
        if at == recovery {
            let answer =
                || Reply::openai_chat("gpt-4o", "hello").delay_head(Duration::from_millis(500));
            mock.script(ScriptKey::model("gpt-4o"), (0..1000).map(|_| answer()));
        }
        let (svc, url) = (svc.clone(), mock.url());
        sent.push((
            at,
            tokio::spawn(async move {
                let req = testing::chat_request(&url, "gpt-4o", false);
                match svc.oneshot(req).await {
                    Ok(r) => Ok(r.status().as_u16()),
                    Err(e) => Err(e),
                }
            }),
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut outcomes = Vec::new();
    for (at, task) in sent {
        outcomes.push((at, task.await?));
    }
    let served = |o: &Result<u16, Error>| matches!(o, Ok(200));
    let called = |o: &Result<u16, Error>| match o {
        Ok(_) => true,
        Err(e) => e.attempt_log().is_some_and(|l| l.attempt_count() > 0),
    };
    let throttled = |o: &Result<u16, Error>| match o {
        Err(e) => matches!(e.kind(), ErrorKind::Throttled { .. }),
        Ok(_) => false,
    };

    // In the outage's last second each bucket's first request is the floor's call, and nearly
    // every other is turned away without a call (the draw lets one through now and then).
    let last_second = (recovery - Duration::from_secs(1))..recovery;
    let floor_call = |at: &Duration| at.as_millis() % 100 == 0;
    let mut turned_away = 0;
    for (at, o) in outcomes.iter().filter(|(at, _)| last_second.contains(at)) {
        match floor_call(at) {
            true => assert!(called(o), "sent at {at:?}: {o:?}"),
            false => turned_away += usize::from(!called(o)),
        }
    }
    assert!(turned_away >= 80, "{turned_away} of 90 turned away");
    // The request sent at 3 s is the first call after the recovery. Until it has been in
    // flight for the outage's slowest refusal (90 ms; the window's is 40 ms) the others are
    // turned away; from then on the outage is forgotten and every request is sent, and served.
    let forgotten = recovery + Duration::from_millis(90);
    for (at, o) in outcomes.iter().filter(|(at, _)| *at >= recovery) {
        match *at == recovery || *at >= forgotten {
            true => assert!(served(o), "sent at {at:?}: {o:?}"),
            false => assert!(throttled(o), "sent at {at:?}: {o:?}"),
        }
    }
    Ok(())
}
