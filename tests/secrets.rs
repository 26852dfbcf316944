//! No secrets in what the crate prints: captured tracing output (at TRACE level) and the `Debug`
//! and `Display` of `AttemptLog`, `Error` (with its whole source chain), `Classification` and
//! `Policy` never contain the values of the `authorization`, `x-api-key` or `api-key` headers,
//! nor any text of a request or response body — error bodies and in-band stream errors
//! included.
//!
//! Every request carries canary values in its credential headers and its body, every reply
//! carries canary text in its body, and the full stack runs over `MockProvider` through a
//! success, a retry, a fallback, a stream cut after its commit point, an in-band error, an
//! error response handed to the caller and a connection reset.

#![cfg(feature = "testing")]

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::policy::{BackoffPolicy, Policy, RouteConfig};
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{AttemptLog, Body, BoxError, Classification, Error};

#[path = "support/capture.rs"]
mod capture;
use capture::Captured;

const PRIMARY: &str = "gpt-4o";
const BACKUP: &str = "backup-model";

const AUTHORIZATION: &str = "Bearer sk-canary-authorization-4f1c9e";
const X_API_KEY: &str = "canary-x-api-key-77b2d0";
const API_KEY: &str = "canary-api-key-azure-19ce3a";
const ROUTE_KEY: &str = "canary-route-credential-5a0e61";
const QUERY_KEY: &str = "canary-query-key-c3d9f4";
const PROMPT: &str = "canary-prompt-text-8e21b7";
const ANSWER: &str = "canary-answer-text-0d4f52";
const ERROR_MESSAGE: &str = "canary-error-message-6b93aa";
const IN_BAND_MESSAGE: &str = "canary-in-band-message-e70c18";

/// Every canary; none may appear in anything the crate prints.
const CANARIES: [&str; 9] = [
    "sk-canary-authorization-4f1c9e",
    X_API_KEY,
    API_KEY,
    ROUTE_KEY,
    QUERY_KEY,
    PROMPT,
    ANSWER,
    ERROR_MESSAGE,
    IN_BAND_MESSAGE,
];

fn assert_no_canary(what: &str, text: &str) {
    for canary in CANARIES {
        assert!(
            !text.contains(canary),
            "{what} contains the canary `{canary}`:\n{text}"
        );
    }
}

fn error_text(e: &Error) -> String {
    let mut text = format!("{e}\n{e:?}\n{}\n", e.kind());
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        text += &format!("{s}\n{s:?}\n");
        source = s.source();
    }
    if let Some(c) = e.classification() {
        text += &classification_text(c);
    }
    if let Some(log) = e.attempt_log() {
        text += &log_text(log);
    }
    text
}

fn classification_text(c: &Classification) -> String {
    format!("{c:?}\n")
}

fn log_text(log: &AttemptLog) -> String {
    let mut text = format!("{log}\n{log:?}\n{:?}\n", log.snapshot());
    for a in log.attempts() {
        text += &format!("{a:?}\n");
    }
    for e in log.events() {
        text += &format!("{e:?}\n");
    }
    #[cfg(feature = "serde")]
    {
        text += &serde_json::to_string(&log.snapshot()).unwrap_or_default();
    }
    text
}

fn policy(mock: &MockProvider) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(5);
    p.retry.backoff = BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(1));
    p.stream.first_token_timeout = Some(Duration::from_secs(5));
    p.stream.idle_timeout = Some(Duration::from_secs(2));
    p.circuit_breaker.consecutive_failures = Some(100);
    p.circuit_breaker.failure_rate = None;
    p.logging.tracing = true;
    p.logging.request_ids = true;
    // The backup route uses its own credentials, explicitly approved.
    p.fallback.routes = vec![
        RouteConfig::new("backup")
            .base_url(format!("{}/backup/v1", mock.url()))
            .model(BACKUP)
            .set_header("authorization", format!("Bearer {ROUTE_KEY}"))
            .set_header("x-api-key", ROUTE_KEY)
            .approve_credentials(),
    ];
    p
}

fn request(mock: &MockProvider, stream: bool) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{PRIMARY}","messages":[{{"role":"user","content":"{PROMPT}"}}],"max_tokens":64,"stream":{stream}}}"#
    );
    let mut req = testing::chat_request(&mock.url(), PRIMARY, stream);
    *req.body_mut() = Full::new(Bytes::from(body));
    if let Ok(uri) = format!("{}/v1/chat/completions?key={QUERY_KEY}", mock.url()).parse() {
        *req.uri_mut() = uri;
    }
    let headers = req.headers_mut();
    headers.insert("authorization", HeaderValue::from_static(AUTHORIZATION));
    headers.insert("x-api-key", HeaderValue::from_static(X_API_KEY));
    headers.insert("api-key", HeaderValue::from_static(API_KEY));
    req
}

fn error_body(status: u16, kind: &str) -> Reply {
    Reply::json(
        status,
        format!(
            r#"{{"error":{{"message":"{ERROR_MESSAGE} (echo: {PROMPT})","type":"{kind}","param":null,"code":null}}}}"#
        ),
    )
}

fn in_band_error() -> String {
    format!(
        r#"data: {{"error":{{"message":"{IN_BAND_MESSAGE}","type":"server_error","code":null}}}}"#
    )
}

/// Sends one request through the full stack and prints everything the caller can print.
async fn run<S>(service: S, req: Request<Full<Bytes>>) -> Result<(String, String), BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
{
    let mut printed = String::new();
    let mut delivered = String::new();
    match service.oneshot(req).await {
        Ok(response) => {
            if let Some(log) = response.extensions().get::<AttemptLog>() {
                printed += &log_text(log);
            } else {
                return Err("a response without its log".into());
            }
            if let Some(c) = response.extensions().get::<Classification>() {
                printed += &classification_text(c);
            }
            let log = response.extensions().get::<AttemptLog>().cloned();
            match response.into_body().collect().await {
                Ok(bytes) => delivered = String::from_utf8_lossy(&bytes.to_bytes()).into_owned(),
                Err(e) => printed += &error_text(&e),
            }
            // The log again, now that the stream ended and was recorded.
            if let Some(log) = log {
                printed += &log_text(&log);
            }
        }
        Err(e) => printed += &error_text(&e),
    }
    Ok((printed, delivered))
}

#[tokio::test(start_paused = true)]
async fn no_credential_or_body_text_reaches_logs_errors_or_debug_output() -> Result<(), BoxError> {
    let (captured, _guard) = Captured::install();

    let mock = MockProvider::start().await?;
    let policy = policy(&mock);
    assert_no_canary("Policy Debug", &format!("{policy:?}"));
    let layer = policy.layer()?;
    assert_no_canary("ResilienceLayer Debug", &format!("{layer:?}"));
    let service = layer.layer(testing::client());

    let answer = |model: &str| Reply::openai_stream(model, &[ANSWER, " and more"]);
    let cases: Vec<(&str, Vec<Reply>, Vec<Reply>, bool)> = vec![
        ("success", vec![answer(PRIMARY)], vec![], true),
        (
            "non-streamed success",
            vec![Reply::openai_chat(PRIMARY, ANSWER)],
            vec![],
            false,
        ),
        (
            "retry after an overload",
            vec![error_body(503, "server_error"), answer(PRIMARY)],
            vec![],
            true,
        ),
        (
            "fallback after repeated server errors",
            vec![error_body(500, "server_error")],
            vec![answer(BACKUP)],
            true,
        ),
        (
            "stream cut after the commit point",
            vec![answer(PRIMARY).cut_after(3)],
            vec![],
            true,
        ),
        (
            "in-band error after the commit point",
            vec![answer(PRIMARY).error_after(2, in_band_error())],
            vec![],
            true,
        ),
        (
            "in-band error before the commit point",
            vec![answer(PRIMARY).error_after(1, in_band_error())],
            vec![answer(BACKUP).error_after(1, in_band_error())],
            true,
        ),
        (
            "error response handed to the caller",
            vec![error_body(401, "invalid_request_error")],
            vec![],
            false,
        ),
        (
            "quota exhausted",
            vec![error_body(429, "insufficient_quota")],
            vec![],
            false,
        ),
        (
            "connection reset",
            vec![Reply::reset()],
            vec![Reply::reset()],
            true,
        ),
    ];

    let mut seen_answer = false;
    for (name, primary, backup, stream) in cases {
        mock.script(ScriptKey::model(PRIMARY), primary);
        mock.script(
            ScriptKey::model(BACKUP),
            if backup.is_empty() {
                vec![error_body(503, "server_error")]
            } else {
                backup
            },
        );
        let (printed, delivered) = run(service.clone(), request(&mock, stream)).await?;
        assert_no_canary(&format!("{name}: printed"), &printed);
        // The caller does get the answer itself: the canaries are really in the traffic.
        seen_answer |= delivered.contains(ANSWER);
    }
    assert!(seen_answer, "no answer reached the caller");

    // The provider really saw the credentials and the prompt.
    let requests = mock.requests();
    assert!(requests.iter().any(|r| r.headers.get("api-key").is_some()));
    assert!(
        requests
            .iter()
            .any(|r| String::from_utf8_lossy(&r.body).contains(PROMPT))
    );
    assert!(requests.iter().any(|r| {
        r.headers
            .get("authorization")
            .is_some_and(|v| v.as_bytes().ends_with(ROUTE_KEY.as_bytes()))
    }));

    let output = captured.text();
    // Tracing was on and recorded the attempts.
    assert!(output.contains("attempt"), "no attempt events:\n{output}");
    assert!(output.lines().count() >= 20, "too little output:\n{output}");
    assert_no_canary("tracing output", &output);
    Ok(())
}
