//! The `axum_gateway` example's app, served on loopback in front of `MockProvider` and called
//! over real HTTP with the hyper-util client: answers pass through the ladder, each crate error
//! kind becomes its documented status, headers and OpenAI-shaped body, and `/metrics`,
//! `/status` and the alert webhook show what the ladder did.

#![cfg(all(feature = "reqwest", feature = "testing", feature = "metrics"))]

#[path = "../examples/axum_gateway.rs"]
#[allow(dead_code)]
mod example;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

#[path = "support/log.rs"]
mod log;
use log::closed_port;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower_llm_resilience::policy::{AdmissionMode, Price, RateLimitPolicy, SpendPolicy};
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{Error, ErrorKind, FailureClass, Policy, RouteName, StreamCause};

const MODEL: &str = "gpt-4o";

fn policy() -> Policy {
    let mut policy = example::default_policy();
    policy.retry.seed = Some(3);
    policy
}

/// Serves the gateway app for `config` on 127.0.0.1 at a free port; its base URL.
async fn serve(config: example::Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let app = example::app(config);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A gateway with `policy` in front of `upstream`, with the gateway's own key.
async fn gateway(upstream: &str, policy: &Policy) -> String {
    let mut config = example::Config::new(upstream, policy).expect("valid policy");
    config.api_key = Some("sk-gateway".to_owned());
    serve(config).await
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the OpenAI error shape and returns its `error` object.
    fn openai_error(&self) -> serde_json::Value {
        assert_eq!(self.header("content-type"), Some("application/json"));
        let json = self.json();
        let error = json["error"].clone();
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(error["type"].is_string());
        assert!(error.get("param").is_some_and(|p| p.is_null()));
        assert!(error.get("code").is_some());
        error
    }
}

/// POSTs a chat completion to the gateway, as an OpenAI client with its own key would.
async fn post(gateway: &str, model: &str, stream: bool) -> Answer {
    let mut request = chat_request(gateway, model, stream);
    let headers = request.headers_mut();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer sk-client"),
    );
    headers.insert("idempotency-key", HeaderValue::from_static("idem-1"));
    headers.insert(
        "x-internal-secret",
        HeaderValue::from_static("not for upstream"),
    );
    let response = client()
        .request(request)
        .await
        .expect("the gateway answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

// ---------------------------------------------------------------------------------------------
// Answers through the stack.

#[tokio::test(start_paused = true)]
async fn a_non_streamed_request_is_answered_after_a_retry() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_overloaded(),
            Reply::openai_chat(MODEL, "Hi there"),
        ],
    );
    let gw = gateway(&mock.url(), &policy()).await;

    let answer = post(&gw, MODEL, false).await;

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json()["choices"][0]["message"]["content"],
        "Hi there"
    );
    assert_eq!(answer.header("x-llm-attempts"), Some("2"));
    assert_eq!(answer.header("x-llm-route"), Some("primary"));
    assert_eq!(answer.headers.get_all("x-llm-route").iter().count(), 1);
    assert_eq!(answer.header("x-request-id"), Some("req_mock_2"));

    // Upstream saw the gateway's key, never the client's, and only the forwarded headers.
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(r.headers["authorization"], "Bearer sk-gateway");
        assert_eq!(r.headers["idempotency-key"], "idem-1");
        assert!(r.headers.get("x-internal-secret").is_none());
        assert_eq!(r.model.as_deref(), Some(MODEL));
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_is_passed_through_as_it_arrives() {
    let mock = MockProvider::start().await.expect("mock starts");
    let tokens = ["Hel", "lo", " wor", "ld"];
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &tokens).event_delay(Duration::from_millis(100))],
    );
    let gw = gateway(&mock.url(), &policy()).await;
    let start = Instant::now();

    let response = client()
        .request(chat_request(&gw, MODEL, true))
        .await
        .expect("the gateway answers");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-llm-attempts"], "1");
    assert_eq!(response.headers()["x-llm-route"], "primary");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .is_ok_and(|v| v.starts_with("text/event-stream"))
    );
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    let mut text = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("no body error").into_data() {
            arrivals.push(start.elapsed());
            text.extend_from_slice(&data);
        }
    }

    let text = String::from_utf8_lossy(&text);
    for t in tokens {
        assert!(text.contains(&format!(r#""content":"{t}""#)), "{text}");
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // 8 events 100 ms apart: the head and the first token at 200 ms (the commit point), the
    // last event at 800 ms — the client reads them as they come, not at the end.
    assert_eq!(arrivals.first(), Some(&Duration::from_millis(200)));
    assert_eq!(arrivals.last(), Some(&Duration::from_millis(800)));
    assert!(arrivals.len() >= 6, "{arrivals:?}");
}

#[tokio::test(start_paused = true)]
async fn a_provider_error_response_passes_through_unchanged() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::model(MODEL), [Reply::unauthorized()]);
    // The same reply, straight from a second mock, to compare with.
    let direct = MockProvider::start().await.expect("mock starts");
    direct.script(ScriptKey::Any, [Reply::unauthorized()]);
    let expected = client()
        .request(chat_request(&direct.url(), MODEL, false))
        .await
        .expect("direct answer")
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let gw = gateway(&mock.url(), &policy()).await;

    let answer = post(&gw, MODEL, false).await;

    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.body, expected);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("x-llm-attempts"), Some("1"));
    assert_eq!(answer.header("x-llm-route"), Some("primary"));
    assert_eq!(mock.request_count(), 1, "never retried");
}

// ---------------------------------------------------------------------------------------------
// Each crate error kind, driven over HTTP.

#[tokio::test(start_paused = true)]
async fn an_open_circuit_is_503_with_retry_after() {
    let mock = MockProvider::start().await.expect("mock starts");
    let policy = policy();
    let config = example::Config::new(mock.url(), &policy).expect("valid policy");
    let breaker = config.layer.circuit_breaker();
    let gw = serve(config).await;
    breaker.force_open("primary");

    let answer = post(&gw, MODEL, false).await;

    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let open_cap = policy.circuit_breaker.open_cap.as_secs_f64().ceil();
    assert_eq!(
        answer.header("retry-after"),
        Some(open_cap.to_string().as_str())
    );
    assert_eq!(answer.header("x-llm-attempts"), Some("0"));
    let error = answer.openai_error();
    assert_eq!(error["type"], "circuit_open");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("primary"))
    );
    assert_eq!(mock.request_count(), 0, "an open circuit sends nothing");
}

#[tokio::test(start_paused = true)]
async fn a_throttled_route_is_503_with_retry_after() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::model(MODEL), [Reply::openai_overloaded()]);
    let mut policy = policy();
    // One client, one request at a time: a floor of 2 calls per window lets it be throttled.
    if let Some(t) = policy.circuit_breaker.throttle.as_mut() {
        t.min_requests = 2;
    }
    let config = example::Config::new(mock.url(), &policy).expect("valid policy");
    let gw = serve(config).await;

    let mut throttled = None;
    for _ in 0..20 {
        let answer = post(&gw, MODEL, false).await;
        if answer.status == StatusCode::SERVICE_UNAVAILABLE
            && answer.openai_error()["type"] == "throttled"
        {
            throttled = Some(answer);
            break;
        }
        // Until then, the provider's own 503 once the retries are spent.
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.header("x-llm-route"), Some("primary"));
    }
    let answer = throttled.expect("the route is throttled");
    // The throttle's wait is under a second: `Retry-After: 1`, never 0.
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(
        answer.openai_error()["message"]
            .as_str()
            .is_some_and(|m| m.contains("primary"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_spend_cap_reached_is_402() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut policy = policy();
    let mut spend = SpendPolicy::default();
    spend.cap = 0.000_001; // one micro unit: less than any request's reservation
    spend.default_owner = Some("gateway".to_owned());
    spend.default_price = Some(Price::new(1.0, 1.0));
    policy.budget.spend = Some(spend);
    let gw = gateway(&mock.url(), &policy).await;

    let answer = post(&gw, MODEL, false).await;

    assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(answer.header("retry-after"), None);
    assert_eq!(answer.header("x-llm-attempts"), Some("0"));
    let error = answer.openai_error();
    assert_eq!(error["type"], "budget_exhausted");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("gateway"))
    );
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_rate_limit_is_429_with_retry_after() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut policy = policy();
    let mut rate = RateLimitPolicy::default();
    rate.requests_per_second = Some(0.5);
    rate.burst = 1;
    policy.budget.rate_limit = Some(rate);
    policy.budget.admission = AdmissionMode::Reject;
    let gw = gateway(&mock.url(), &policy).await;

    let first = post(&gw, MODEL, false).await;
    let second = post(&gw, MODEL, false).await;

    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    // One request per 2 s: capacity is back exactly 2 s after the first.
    assert_eq!(second.header("retry-after"), Some("2"));
    assert_eq!(second.header("x-llm-attempts"), Some("0"));
    assert_eq!(second.openai_error()["type"], "rate_limited");
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_exceeded_is_504() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::model(MODEL), [Reply::never()]);
    let mut policy = policy();
    policy.budget.deadline = Some(Duration::from_secs(3));
    let gw = gateway(&mock.url(), &policy).await;
    let start = Instant::now();

    let answer = post(&gw, MODEL, false).await;

    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.header("retry-after"), None);
    assert_eq!(answer.openai_error()["type"], "deadline_exceeded");
}

#[tokio::test(start_paused = true)]
async fn a_stream_interrupted_after_commit_ends_with_an_error_event() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::openai_stream(MODEL, &["one", " two", " three"]).cut_after(3)],
    );
    let gw = gateway(&mock.url(), &policy()).await;

    // The body ends cleanly (no transport error): the failure is in its last event.
    let answer = post(&gw, MODEL, true).await;

    assert_eq!(answer.status, StatusCode::OK, "the head was already sent");
    assert_eq!(answer.header("x-llm-attempts"), Some("1"));
    let text = answer.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4, "{text}");
    assert!(events[1].contains(r#""content":"one""#));
    assert!(events[2].contains(r#""content":" two""#));
    assert!(!text.contains("[DONE]"));
    let last = events[3].strip_prefix("data: ").expect("a data event");
    let json: serde_json::Value = serde_json::from_str(last).expect("JSON error event");
    assert_eq!(json["error"]["type"], "stream_interrupted");
    assert_eq!(json["error"]["code"], "stream_interrupted");
    assert!(json["error"]["param"].is_null());
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("connection lost"))
    );
    assert_eq!(mock.request_count(), 1, "never a second answer");
}

/// An upstream whose JSON answer breaks after its first bytes.
async fn cut_json_upstream() -> String {
    // The first bytes, then (100 ms later, so they are flushed first) an error.
    struct CutBody {
        sent: bool,
        pause: std::pin::Pin<Box<tokio::time::Sleep>>,
    }
    impl http_body::Body for CutBody {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            if !self.sent {
                self.sent = true;
                let head = br#"{"id":"chatcmpl-1","choices":[{"message":{"content":"Half an ans"#;
                return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(
                    Bytes::from_static(head),
                ))));
            }
            std::task::ready!(self.pause.as_mut().poll(cx));
            std::task::Poll::Ready(Some(Err(std::io::Error::other("upstream broke"))))
        }
    }
    let upstream = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            http::Response::builder()
                .header("content-type", "application/json")
                .body(axum::body::Body::new(CutBody {
                    sent: false,
                    pause: Box::pin(tokio::time::sleep(Duration::from_millis(100))),
                }))
                .expect("a response")
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, upstream).await });
    format!("http://{addr}")
}

#[tokio::test(start_paused = true)]
async fn a_json_body_interrupted_after_commit_is_cut_not_ended() {
    let upstream = cut_json_upstream().await;
    let gw = gateway(&upstream, &policy()).await;

    let response = client()
        .request(chat_request(&gw, MODEL, false))
        .await
        .expect("the head arrives");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the head was already sent"
    );
    assert_eq!(response.headers()["x-llm-attempts"], "1");
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => received.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }

    // The client sees a broken body, never a short one that ends as if whole.
    assert!(
        failed,
        "the body must fail, got {:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(received.starts_with(br#"{"id":"chatcmpl-1""#));
}

#[tokio::test(start_paused = true)]
async fn a_policy_block_before_commit_fails_closed_with_400() {
    let mock = MockProvider::start().await.expect("mock starts");
    let head = r#""id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4o""#;
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::sse(vec![
            format!(
                r#"data: {{{head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"finish_reason":null}}]}}"#
            ),
            format!(
                r#"data: {{{head},"choices":[{{"index":0,"delta":{{}},"finish_reason":"content_filter"}}]}}"#
            ),
            "data: [DONE]".to_owned(),
        ])],
    );
    let gw = gateway(&mock.url(), &policy()).await;

    let answer = post(&gw, MODEL, true).await;

    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let error = answer.openai_error();
    assert_eq!(error["type"], "failed_closed");
    assert_eq!(error["code"], "policy_block");
    assert_eq!(answer.header("x-llm-attempts"), Some("1"));
    assert_eq!(mock.request_count(), 1, "a block is never retried");
}

#[tokio::test(start_paused = true)]
async fn a_stream_failing_before_commit_on_every_attempt_is_502() {
    let mock = MockProvider::start().await.expect("mock starts");
    let overloaded = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}";
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::sse(vec![overloaded.to_owned()])],
    );
    let gw = gateway(&mock.url(), &policy()).await;

    let answer = post(&gw, MODEL, true).await;

    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let error = answer.openai_error();
    assert_eq!(error["type"], "upstream_stream_failed");
    assert_eq!(error["code"], "overloaded");
    let attempts = policy().retry.max_attempts.to_string();
    assert_eq!(answer.header("x-llm-attempts"), Some(attempts.as_str()));
    assert_eq!(mock.request_count(), policy().retry.max_attempts as usize);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_upstream_is_502() {
    let addr = closed_port().await;
    let gw = gateway(&format!("http://{addr}"), &policy()).await;

    let answer = post(&gw, MODEL, false).await;

    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let error = answer.openai_error();
    assert_eq!(error["type"], "upstream_unreachable");
    assert_eq!(error["code"], "connect");
    let attempts = policy().retry.max_attempts.to_string();
    assert_eq!(answer.header("x-llm-attempts"), Some(attempts.as_str()));
}

// ---------------------------------------------------------------------------------------------
// The mapping itself, kind by kind.

#[test]
fn every_error_kind_maps_to_its_documented_answer() {
    let answer = |e: Error| {
        let a = example::error_answer(&e);
        (a.status.as_u16(), a.error_type, a.code, a.retry_after)
    };
    let open = ErrorKind::CircuitOpen {
        route: RouteName::new("primary"),
        retry_in: Duration::from_millis(4_200),
    };
    assert_eq!(
        answer(Error::new(open)),
        (503, "circuit_open", None, Some(5))
    );
    let throttled = ErrorKind::Throttled {
        route: RouteName::new("primary"),
        retry_in: Duration::from_millis(40),
    };
    assert_eq!(
        answer(Error::new(throttled)),
        (503, "throttled", None, Some(1)),
        "a wait under a second is Retry-After: 1"
    );
    let limited = ErrorKind::RateLimited {
        retry_in: Duration::from_secs(2),
    };
    assert_eq!(
        answer(Error::new(limited)),
        (429, "rate_limited", None, Some(2))
    );
    let limited_now = ErrorKind::RateLimited {
        retry_in: Duration::from_nanos(1),
    };
    assert_eq!(answer(Error::new(limited_now)).3, Some(1), "rounded up");
    // A limiter whose rate is absurdly low names the longest wait there is: capped, not
    // wrapped around to `Retry-After: 0` (or a panic).
    let limited_forever = ErrorKind::RateLimited {
        retry_in: Duration::MAX,
    };
    assert_eq!(answer(Error::new(limited_forever)).3, Some(u64::MAX));
    let budget = ErrorKind::BudgetExhausted {
        owner: Some("team-a".to_owned()),
    };
    assert_eq!(
        answer(Error::new(budget)),
        (402, "budget_exhausted", None, None)
    );
    assert_eq!(
        answer(Error::new(ErrorKind::DeadlineExceeded)),
        (504, "deadline_exceeded", None, None)
    );
    // Every class, so a new one cannot go unmapped unnoticed.
    for class in FailureClass::ALL {
        let status = match class {
            FailureClass::PolicyBlock
            | FailureClass::InvalidRequest
            | FailureClass::ContextOverflow => 400,
            FailureClass::Auth => 401,
            FailureClass::QuotaExhausted => 402,
            FailureClass::Conflict => 409,
            FailureClass::RateLimited => 429,
            FailureClass::Overloaded => 503,
            FailureClass::Timeout => 504,
            FailureClass::Connect
            | FailureClass::Transport
            | FailureClass::ServerError
            | FailureClass::StreamInterrupted => 502,
            other => panic!("{other} has no documented answer"),
        };
        let e = Error::new(ErrorKind::FailedClosed { class });
        assert_eq!(
            answer(e),
            (status, "failed_closed", Some(class.as_str()), None),
            "{class}"
        );
    }
    let failed = |cause| Error::new(ErrorKind::StreamFailed { cause });
    assert_eq!(
        answer(failed(StreamCause::Disconnected)),
        (502, "upstream_stream_failed", Some("transport"), None)
    );
    assert_eq!(
        answer(failed(StreamCause::FirstTokenTimeout(Duration::from_secs(
            20
        )))),
        (504, "upstream_stream_failed", Some("timeout"), None)
    );
    let interrupted = ErrorKind::StreamInterrupted {
        delivered_bytes: 10,
        cause: StreamCause::Disconnected,
    };
    assert_eq!(
        answer(Error::new(interrupted)),
        (502, "stream_interrupted", Some("stream_interrupted"), None)
    );
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    assert_eq!(
        answer(Error::transport(FailureClass::Connect, io)),
        (502, "upstream_unreachable", Some("connect"), None)
    );
    let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    assert_eq!(
        answer(Error::transport(FailureClass::Timeout, io)),
        (504, "upstream_unreachable", Some("timeout"), None)
    );
}

// ---------------------------------------------------------------------------------------------
// Watching the gateway: `/metrics`, `/status`, the alert webhook.

/// GETs `path` from the gateway.
async fn get(gateway: &str, path: &str) -> Answer {
    let mut request = http::Request::new(http_body_util::Full::new(Bytes::new()));
    *request.uri_mut() = format!("{gateway}{path}").parse().expect("a URI");
    let response = client()
        .request(request)
        .await
        .expect("the gateway answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The value of the series `series` (name and labels, as rendered) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_are_scraped_over_http() {
    // The gateway's recorder, for this test's thread only: the mock, the gateway and the
    // client all run on it.
    let recorder = example::prometheus().build_recorder();
    let handle = recorder.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let mock = MockProvider::start().await.expect("mock starts");
            mock.script(
                ScriptKey::model(MODEL),
                [
                    Reply::openai_overloaded(),
                    Reply::openai_chat(MODEL, "Hi there"),
                ],
            );
            mock.script(ScriptKey::model("bad-key"), [Reply::unauthorized()]);
            let mut policy = policy();
            policy.observability.models = vec![MODEL.to_owned()];
            let mut config = example::Config::new(mock.url(), &policy).expect("valid policy");
            config.metrics = Some(handle);
            let gw = serve(config).await;

            assert_eq!(post(&gw, MODEL, false).await.status, StatusCode::OK);
            assert_eq!(
                post(&gw, "bad-key", false).await.status,
                StatusCode::UNAUTHORIZED
            );
            let scrape = get(&gw, "/metrics").await;
            assert_eq!(scrape.status, StatusCode::OK);
            assert!(
                scrape
                    .header("content-type")
                    .is_some_and(|v| v.starts_with("text/plain"))
            );
            let text = scrape.text();
            let expect = [
                (
                    r#"llm_resilience_requests{route="primary",outcome="success"}"#,
                    1.0,
                ),
                (
                    r#"llm_resilience_requests{route="primary",outcome="provider_failure",error_type="auth"}"#,
                    1.0,
                ),
                (
                    r#"llm_resilience_retries{route="primary",class="overloaded"}"#,
                    1.0,
                ),
                (r#"llm_resilience_circuit_state{route="primary"}"#, 0.0),
                (r#"llm_resilience_attempts_bucket{route="primary",le="1"}"#, 1.0),
                (r#"llm_resilience_attempts_bucket{route="primary",le="2"}"#, 2.0),
                (r#"llm_resilience_attempts_count{route="primary"}"#, 2.0),
                (r#"llm_resilience_attempts_sum{route="primary"}"#, 3.0),
                (
                    r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o",gen_ai_response_model="gpt-4o",server_address="127.0.0.1",route="primary",gen_ai_token_type="input"}"#,
                    9.0,
                ),
                (
                    r#"gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o",gen_ai_response_model="gpt-4o",server_address="127.0.0.1",route="primary",gen_ai_token_type="output"}"#,
                    2.0,
                ),
                (
                    r#"gen_ai_client_operation_duration_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o",gen_ai_response_model="gpt-4o",server_address="127.0.0.1",route="primary"}"#,
                    1.0,
                ),
                (
                    r#"gen_ai_client_operation_duration_count{gen_ai_operation_name="chat",gen_ai_request_model="_OTHER",gen_ai_response_model="_OTHER",server_address="127.0.0.1",route="primary",error_type="auth"}"#,
                    1.0,
                ),
                (r#"llm_resilience_alerts{kind="auth"}"#, 1.0),
            ];
            for (series, value) in expect {
                assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
            }
            // Histograms have buckets (not summaries), and no label holds a request's detail.
            assert!(text.contains("# TYPE gen_ai_client_operation_duration histogram"));
            assert!(!text.contains("bad-key"), "{text}");
            assert!(!text.contains("req_mock"), "{text}");
        });
    });
}

#[tokio::test(start_paused = true)]
async fn status_shows_each_route_the_budget_and_the_alerts() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::model(MODEL), [Reply::unauthorized()]);
    let mut policy = policy();
    policy.fallback.routes = vec![
        tower_llm_resilience::policy::RouteConfig::new("backup")
            .base_url(format!("{}/backup", mock.url()))
            .model("backup-model"),
    ];
    let config = example::Config::new(mock.url(), &policy).expect("valid policy");
    let breakers = config.layer.circuit_breaker();
    let gw = serve(config).await;
    // Without a recorder handle there is no `/metrics`.
    assert_eq!(get(&gw, "/metrics").await.status, StatusCode::NOT_FOUND);

    assert_eq!(
        post(&gw, MODEL, false).await.status,
        StatusCode::UNAUTHORIZED
    );
    breakers.force_open("backup");
    tokio::time::sleep(Duration::from_millis(1)).await;
    let status = get(&gw, "/status").await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.header("content-type"), Some("application/json"));
    let json = status.json();
    let routes = json["routes"].as_array().expect("routes");
    let state = |name: &str| {
        routes
            .iter()
            .find(|r| r["route"] == name)
            .map(|r| r["state"].clone())
    };
    assert_eq!(routes.len(), 2, "{json}");
    assert_eq!(state("primary"), Some("closed".into()));
    assert_eq!(state("backup"), Some("forced_open".into()));
    // The interactive retry budget: 10 retries a second over 10 s, plus 20 % of one request.
    assert_eq!(json["retry_budget"]["available"], 100);
    assert_eq!(json["alerts"]["sent"], 1);
    assert_eq!(json["alerts"]["suppressed"], 0);
    assert_eq!(json["metrics"], true);
}

#[tokio::test(start_paused = true)]
async fn alerts_are_posted_to_the_webhook_without_the_key() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model(MODEL),
        [Reply::unauthorized(), Reply::unauthorized()],
    );
    let receiver = MockProvider::start().await.expect("receiver starts");
    receiver.script(ScriptKey::path("/alerts"), [Reply::ok(), Reply::ok()]);
    let mut config = example::Config::new(mock.url(), &policy()).expect("valid policy");
    config.api_key = Some("sk-gateway".to_owned());
    config.alert_webhook = Some(format!("{}/alerts", receiver.url()));
    let gw = serve(config).await;

    for _ in 0..2 {
        assert_eq!(
            post(&gw, MODEL, false).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    for _ in 0..100 {
        if receiver.request_count() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let posted = receiver.requests();
    assert_eq!(posted.len(), 1, "one alert for the window");
    assert_eq!(posted[0].method, http::Method::POST);
    assert_eq!(posted[0].path, "/alerts");
    let alert: serde_json::Value = serde_json::from_slice(&posted[0].body).expect("JSON");
    assert_eq!(alert["kind"], "auth");
    assert_eq!(alert["route"], "primary");
    assert_eq!(alert["workflow"], "gateway");
    assert_eq!(alert["status"], 401);
    assert_eq!(
        alert["key_fingerprint"],
        tower_llm_resilience::observe::key_fingerprint("sk-gateway")
    );
    let body = String::from_utf8_lossy(&posted[0].body);
    assert!(!body.contains("sk-gateway"), "{body}");
    assert!(!body.contains("sk-client"), "{body}");
}

// ---------------------------------------------------------------------------------------------
// Deferred requests: 202, a place to fetch the answer, the gateway's own worker.

/// A gateway whose policy defers, with its sink and its replay worker (driven by the test).
async fn deferring_gateway(
    upstream: &str,
) -> (
    String,
    Arc<tower_llm_resilience::defer::MemoryDeferSink>,
    example::ReplayWorker,
) {
    let mut policy = policy();
    policy.budget.defer = Some(tower_llm_resilience::policy::DeferPolicy::default());
    let sink = Arc::new(tower_llm_resilience::defer::MemoryDeferSink::new());
    let mut config = example::Config::new(upstream, &policy).expect("valid policy");
    config.api_key = Some("sk-gateway".to_owned());
    config.defer_to = Some(sink.clone());
    let (app, worker) = example::parts(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let worker = worker.expect("a worker with a sink");
    (format!("http://{addr}"), sink, worker)
}

#[tokio::test(start_paused = true)]
async fn a_deferred_request_is_accepted_and_its_answer_fetched_later() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_rate_limited(Some("600")),
            Reply::openai_chat(MODEL, "worth the wait"),
        ],
    );
    let (gw, sink, mut worker) = deferring_gateway(&mock.url()).await;

    let answer = post(&gw, MODEL, false).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.header("retry-after"), Some("600"));
    let location = answer.header("location").expect("a Location").to_owned();
    let id = answer.json()["id"].as_str().expect("an id").to_owned();
    assert_eq!(location, format!("/v1/deferred/{id}"));
    assert_eq!(answer.json()["status"], "waiting");
    // The client's idempotency key is the record's.
    let (record, _) = sink.records().remove(0);
    assert_eq!(record.idempotency_key, "idem-1");
    assert!(record.headers.iter().all(|(n, _)| n != "authorization"));

    let waiting = get(&gw, &location).await;
    assert_eq!(waiting.status, StatusCode::ACCEPTED);
    assert_eq!(waiting.json()["status"], "waiting");
    assert!(waiting.header("retry-after").is_some());
    assert_eq!(mock.request_count(), 1);

    tokio::time::advance(Duration::from_secs(600)).await;
    assert!(worker.run_once().await.expect("sink"));
    let done = get(&gw, &location).await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(
        done.json()["choices"][0]["message"]["content"],
        "worth the wait"
    );
    // The replay went out with the gateway's key and the same idempotency key.
    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].headers["authorization"], "Bearer sk-gateway");
    assert_eq!(requests[1].headers["idempotency-key"], "idem-1");

    let unknown = get(&gw, "/v1/deferred/nope").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.openai_error()["type"], "not_found");
}

#[tokio::test(start_paused = true)]
async fn a_deferred_request_that_fails_closed_on_replay_shows_the_failure() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_rate_limited(Some("600")),
            Reply::unauthorized(),
        ],
    );
    let (gw, _sink, mut worker) = deferring_gateway(&mock.url()).await;
    let answer = post(&gw, MODEL, false).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    let location = answer.header("location").expect("a Location").to_owned();
    tokio::time::advance(Duration::from_secs(600)).await;
    assert!(worker.run_once().await.expect("sink"));
    let dead = get(&gw, &location).await;
    assert_eq!(
        dead.status,
        StatusCode::UNAUTHORIZED,
        "the provider's own answer"
    );
    assert_eq!(dead.json()["error"]["code"], "invalid_api_key");
}

#[tokio::test(start_paused = true)]
async fn a_bad_key_is_answered_at_once_even_when_the_policy_defers() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(ScriptKey::model(MODEL), [Reply::unauthorized()]);
    let (gw, sink, _worker) = deferring_gateway(&mock.url()).await;
    let answer = post(&gw, MODEL, false).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(answer.header("location").is_none());
    assert!(sink.records().is_empty());
}
