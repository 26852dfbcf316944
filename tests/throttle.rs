//! End-to-end over loopback against the `MockProvider`: the whole interactive stack on a single
//! route (no backup), where the breaker throttles instead of failing everything.
#![cfg(feature = "testing")]

use std::time::Duration;

use tower::{ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::LocalEventKind;
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{AttemptLog, BoxError, Error, ErrorKind, Policy, RouteName};

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
