//! `ResilienceMiddleware` inside a real reqwest-middleware client over loopback HTTP against
//! `MockProvider`, under paused time with seeded jitter; and the `reqwest_middleware` example's
//! own code path.

#![cfg(all(feature = "reqwest-middleware", feature = "testing"))]

#[path = "../examples/reqwest_middleware.rs"]
#[allow(dead_code)]
mod example;

use std::error::Error as StdError;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use http::Extensions;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use tokio::time::Instant;
use tower_llm_resilience::attempt_log::{Decision, StopReason, WaitSource};
use tower_llm_resilience::circuit_breaker::CircuitState;
use tower_llm_resilience::policy::RouteConfig;
use tower_llm_resilience::reqwest_middleware::ResilienceMiddleware;
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{AttemptLog, Error, ErrorKind, FailureClass, Policy, RouteName};

const MODEL: &str = "gpt-4o";

fn chat_body(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello"}}],"stream":{stream}}}"#
    )
}

fn seeded() -> Policy {
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(7);
    policy
}

async fn mock(replies: impl IntoIterator<Item = Reply>) -> MockProvider {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::Any, replies);
    mock
}

fn client(middleware: ResilienceMiddleware) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build()
}

fn chat_url(base: &str) -> String {
    format!("{base}/v1/chat/completions")
}

async fn post(
    client: &ClientWithMiddleware,
    url: &str,
    stream: bool,
) -> reqwest_middleware::Result<reqwest::Response> {
    client
        .post(url)
        .header("content-type", "application/json")
        .body(chat_body(MODEL, stream))
        .send()
        .await
}

/// The crate error inside a reqwest-middleware error, by downcast.
fn crate_error(error: &reqwest_middleware::Error) -> Option<&Error> {
    match error {
        reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<Error>(),
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}

fn log_of(response: &reqwest::Response) -> AttemptLog {
    response
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .expect("the response carries the attempt log")
}

/// A loopback port with nothing listening on it.
async fn closed_port() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_is_retried_after_the_servers_wait() {
    let mock = mock([
        Reply::openai_rate_limited(Some("2")),
        Reply::openai_chat(MODEL, "Hello!"),
    ])
    .await;
    let client = client(ResilienceMiddleware::new(&seeded()).expect("valid policy"));
    let url = chat_url(&mock.url());
    let t0 = Instant::now();

    let response = post(&client, &url, false).await.expect("recovered");

    assert_eq!(response.status(), 200);
    assert_eq!(response.url().as_str(), url, "the response keeps its URL");
    let log = log_of(&response);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 2, "{log}");
    assert_eq!(attempts[0].status, Some(429));
    assert_eq!(attempts[0].class, Some(FailureClass::RateLimited));
    assert_eq!(attempts[0].retry_after, Some(Duration::from_secs(2)));
    let (wait, source) = attempts[0].wait().expect("a retry wait");
    assert_eq!(source, WaitSource::Server);
    // The server's 2 s floor plus the seeded jitter on top (at most a fifth of the hint).
    assert!(wait >= Duration::from_secs(2), "{wait:?}");
    assert!(wait <= Duration::from_millis(2400), "{wait:?}");
    // The second attempt reached the provider exactly when the log says, and nothing else
    // took time.
    let arrivals: Vec<Duration> = mock.requests().iter().map(|r| r.at - t0).collect();
    assert_eq!(arrivals, [Duration::ZERO, wait]);
    assert_eq!(Instant::now() - t0, wait);
    assert!(response.text().await.expect("body").contains("Hello!"));
}

#[tokio::test]
async fn a_bad_key_fails_closed_with_the_typed_error_recoverable_by_downcast() {
    let mock = mock([Reply::unauthorized(), Reply::openai_chat(MODEL, "never")]).await;
    let middleware = ResilienceMiddleware::new(&seeded())
        .expect("valid policy")
        .fail_closed_as_error(true);
    let client = client(middleware);

    let error = post(&client, &chat_url(&mock.url()), false)
        .await
        .expect_err("a bad key is an error");

    assert!(error.is_middleware(), "{error:?}");
    let error = crate_error(&error).expect("the crate error by downcast");
    assert_eq!(
        error.kind(),
        &ErrorKind::FailedClosed {
            class: FailureClass::Auth
        }
    );
    assert_eq!(error.class(), Some(FailureClass::Auth));
    let c = error
        .classification()
        .expect("the provider's classification");
    assert_eq!(c.status.map(|s| s.as_u16()), Some(401));
    assert_eq!(c.error_code.as_deref(), Some("invalid_api_key"));
    let log = error.attempt_log().expect("the log").snapshot();
    assert_eq!(log.attempts.len(), 1, "auth is never retried: {log}");
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn a_bad_key_is_the_providers_response_by_default() {
    let mock = mock([Reply::unauthorized()]).await;
    let client = client(ResilienceMiddleware::new(&seeded()).expect("valid policy"));

    let response = post(&client, &chat_url(&mock.url()), false)
        .await
        .expect("a 401 is a response");

    assert_eq!(response.status(), 401);
    assert_eq!(log_of(&response).attempt_count(), 1);
    let text = response.text().await.expect("body");
    assert!(text.contains("Incorrect API key"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_fallback_route_serves_when_the_primary_is_down() {
    let backup = mock([Reply::openai_chat("backup-model", "from the backup")]).await;
    let primary = closed_port().await;
    let mut policy = seeded();
    policy.fallback.routes = vec![
        RouteConfig::new("backup")
            .base_url(format!("{}/v1", backup.url()))
            .model("backup-model"),
    ];
    let client = client(ResilienceMiddleware::new(&policy).expect("valid policy"));

    let response = post(&client, &chat_url(&format!("http://{primary}")), false)
        .await
        .expect("the backup answers");

    assert_eq!(response.status(), 200);
    assert_eq!(
        response.url().as_str(),
        chat_url(&backup.url()),
        "the URL of the route that answered"
    );
    let log = log_of(&response).snapshot();
    assert_eq!(log.selected_route, Some(RouteName::new("backup")), "{log}");
    let (last, failed) = log.attempts.split_last().expect("attempts");
    assert!(!failed.is_empty(), "{log}");
    assert!(
        failed
            .iter()
            .all(|a| a.class == Some(FailureClass::Connect)),
        "{log}"
    );
    assert_eq!(last.status, Some(200));
    let requests = backup.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].model.as_deref(), Some("backup-model"));
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert!(
        response
            .text()
            .await
            .expect("body")
            .contains("from the backup")
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_connect_is_a_transport_error_with_reqwests_error_as_source() {
    let addr = closed_port().await;
    let client = client(ResilienceMiddleware::new(&seeded()).expect("valid policy"));

    let error = post(&client, &chat_url(&format!("http://{addr}")), false)
        .await
        .expect_err("nothing listens");

    let error = crate_error(&error).expect("the crate error by downcast");
    assert_eq!(error.kind(), &ErrorKind::Transport);
    assert_eq!(error.class(), Some(FailureClass::Connect));
    let source = error.source().expect("a source");
    let reqwest_error = source
        .downcast_ref::<reqwest::Error>()
        .expect("reqwest's error");
    assert!(reqwest_error.is_connect(), "{reqwest_error:?}");
    let log = error.attempt_log().expect("the log").snapshot();
    assert_eq!(log.attempts.len(), 3, "{log}");
}

/// The first error item of a `bytes_stream`, and the bytes before it.
async fn read_until_error(response: reqwest::Response) -> (Vec<u8>, Option<reqwest::Error>) {
    let mut stream = response.bytes_stream();
    let mut bytes = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(error) => return (bytes, Some(error)),
        }
    }
    (bytes, None)
}

/// The crate error in `error`'s source chain.
fn crate_error_in_chain<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<Error>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_after_the_first_token_is_an_error_from_bytes_stream() {
    // The role delta and the first content delta ("Hel"), then the connection is cut.
    let mock = mock([
        Reply::openai_stream(MODEL, &["Hel", "lo"]).cut_after(2),
        Reply::openai_stream(MODEL, &["never", "sent"]),
    ])
    .await;
    let client = client(ResilienceMiddleware::new(&seeded()).expect("valid policy"));

    let response = post(&client, &chat_url(&mock.url()), true)
        .await
        .expect("the head arrives");
    assert_eq!(response.status(), 200);
    let log = log_of(&response);
    let (bytes, error) = read_until_error(response).await;

    let error = error.expect("an error item, not a clean end");
    assert!(String::from_utf8_lossy(&bytes).contains("Hel"));
    let crate_error = crate_error_in_chain(&error).expect("the crate error in the chain");
    assert!(
        matches!(
            crate_error.kind(),
            ErrorKind::StreamInterrupted { delivered_bytes, .. } if *delivered_bytes > 0
        ),
        "{crate_error:?}"
    );
    assert_eq!(
        mock.request_count(),
        1,
        "committed streams are never retried"
    );
    assert_eq!(log.attempt_count(), 1, "{log}");
}

#[tokio::test(start_paused = true)]
async fn a_stream_failing_before_the_first_token_is_retried() {
    // Only the role delta (no content: before the commit point), then an in-band server error.
    let in_band = r#"data: {"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#;
    let mock = mock([
        Reply::openai_stream(MODEL, &["Hel", "lo"]).error_after(1, in_band.to_owned()),
        Reply::openai_stream(MODEL, &["Hel", "lo"]),
    ])
    .await;
    let client = client(ResilienceMiddleware::new(&seeded()).expect("valid policy"));

    let response = post(&client, &chat_url(&mock.url()), true)
        .await
        .expect("the second stream answers");
    let log = log_of(&response);
    let (bytes, error) = read_until_error(response).await;

    assert!(error.is_none(), "{error:?}");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("[DONE]"), "{text}");
    assert!(
        !text.contains("server_error"),
        "nothing of the failed stream: {text}"
    );
    assert_eq!(mock.request_count(), 2);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 2, "{log}");
    assert_eq!(attempts[0].class, Some(FailureClass::ServerError), "{log}");
}

/// What a middleware saw of one call.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    url: String,
    route: Option<RouteName>,
    /// Attempts already in the log when this call started.
    logged_before: Option<usize>,
}

/// Records every call that passes through it.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The log found in the chain's extensions after the call, for a recorder above.
    log_after: Arc<Mutex<Option<AttemptLog>>>,
}

impl Recorder {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

#[async_trait::async_trait]
impl Middleware for Recorder {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        self.seen.lock().expect("lock").push(Seen {
            url: req.url().to_string(),
            route: extensions.get::<RouteName>().cloned(),
            logged_before: extensions
                .get::<AttemptLog>()
                .map(AttemptLog::attempt_count),
        });
        let result = next.run(req, extensions).await;
        *self.log_after.lock().expect("lock") = extensions.get::<AttemptLog>().cloned();
        result
    }
}

#[tokio::test(start_paused = true)]
async fn another_middleware_in_the_chain_sees_every_attempt() {
    let backup = mock([Reply::openai_chat("backup-model", "from the backup")]).await;
    let primary = mock([
        Reply::openai_overloaded(),
        Reply::openai_overloaded(),
        Reply::openai_overloaded(),
    ])
    .await;
    let mut policy = seeded();
    policy.fallback.routes = vec![
        RouteConfig::new("backup")
            .base_url(format!("{}/v1", backup.url()))
            .model("backup-model"),
    ];
    let above = Recorder::default();
    let below = Recorder::default();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(above.clone())
        .with(ResilienceMiddleware::new(&policy).expect("valid policy"))
        .with(below.clone())
        .build();

    let response = post(&client, &chat_url(&primary.url()), false)
        .await
        .expect("the backup answers");
    assert_eq!(response.status(), 200);
    let log = log_of(&response);

    // The middleware below ran once per attempt: three on the primary, one on the backup,
    // each with the attempt's route and the log as it stood.
    let primary_url = chat_url(&primary.url());
    let backup_url = chat_url(&backup.url());
    let expected: Vec<Seen> = (0..3)
        .map(|i| Seen {
            url: primary_url.clone(),
            route: Some(RouteName::new("primary")),
            logged_before: Some(i),
        })
        .chain([Seen {
            url: backup_url,
            route: Some(RouteName::new("backup")),
            logged_before: Some(3),
        }])
        .collect();
    assert_eq!(below.seen(), expected, "{log}");
    assert_eq!(log.attempt_count(), 4);

    // The middleware above ran once, and finds the same log after the call.
    assert_eq!(above.seen().len(), 1);
    let after = above.log_after.lock().expect("lock").clone();
    assert!(after.is_some_and(|l| l.ptr_eq(&log)));
    assert_eq!(primary.request_count(), 3);
    assert_eq!(backup.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_streaming_upload_is_sent_once_and_the_log_says_not_replayable() {
    let mock = mock([
        Reply::openai_overloaded(),
        Reply::openai_chat(MODEL, "never"),
    ])
    .await;
    let client = client(ResilienceMiddleware::new(&seeded()).expect("valid policy"));
    let body = chat_body(MODEL, false);
    let chunks: Vec<Result<String, std::io::Error>> =
        vec![Ok(body[..10].to_owned()), Ok(body[10..].to_owned())];

    let response = client
        .post(chat_url(&mock.url()))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("the 503 is handed back");

    assert_eq!(response.status(), 503);
    let log = log_of(&response);
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 1, "{log}");
    assert_eq!(
        attempts[0].decisions.last(),
        Some(&Decision::Stop(StopReason::NotReplayable)),
        "{log}"
    );
    let requests = mock.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].body,
        body.as_bytes(),
        "the whole stream was sent"
    );
}

#[tokio::test(start_paused = true)]
async fn breaker_state_is_shared_across_requests() {
    let mock = mock([
        Reply::openai_overloaded(),
        Reply::openai_overloaded(),
        Reply::openai_chat(MODEL, "never"),
    ])
    .await;
    let mut policy = seeded();
    policy.retry.max_attempts = 1;
    policy.circuit_breaker.failure_rate = None;
    policy.circuit_breaker.consecutive_failures = Some(2);
    // The all-or-nothing breaker on a single route (no throttle), whose state is shared.
    policy.circuit_breaker.throttle = None;
    let middleware = ResilienceMiddleware::new(&policy).expect("valid policy");
    let breakers = middleware.layer().circuit_breaker();
    let client = client(middleware);
    let url = chat_url(&mock.url());

    for _ in 0..2 {
        let response = post(&client, &url, false).await.expect("a 503");
        assert_eq!(response.status(), 503);
    }
    // Two requests, one failure each: the route's breaker is open for the third.
    let error = post(&client, &url, false)
        .await
        .expect_err("the circuit is open");
    let error = crate_error(&error).expect("the crate error by downcast");
    assert!(
        matches!(error.kind(), ErrorKind::CircuitOpen { .. }),
        "{error:?}"
    );
    assert_eq!(mock.request_count(), 2, "no call while the circuit is open");
    assert_eq!(breakers.state("primary"), CircuitState::Open);
}

#[tokio::test(start_paused = true)]
async fn the_example_retries_and_streams() {
    let mock = example::start_mock().await.expect("mock starts");
    let recorder = example::AttemptPrinter::default();
    let client = example::client(&example::policy(), recorder.clone()).expect("valid policy");

    let answer = example::ask(&client, &mock.url()).await.expect("answer");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text, example::MOCK_ANSWER);
    assert_eq!(answer.log.attempts.len(), 2, "{}", answer.log);
    assert_eq!(answer.log.attempts[0].status, Some(429));

    let streamed = example::stream(&client, &mock.url()).await.expect("stream");
    assert_eq!(streamed, "Hello from a stream");
    // The printer below the ladder saw all three attempts.
    assert_eq!(recorder.count(), 3);
}
