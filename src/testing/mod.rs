//! A scripted model-API provider on loopback, for tests (feature `testing`).
//!
//! [`MockProvider`] is a real HTTP/1.1 server (hyper) on `127.0.0.1` at a free port, started in
//! the current tokio runtime. Each request is answered with the next [`Reply`] of the script
//! that matches it — by the `model` field of its JSON body, then by its path, then
//! [`ScriptKey::Any`] — and recorded as a [`RecordedRequest`] (method, path and query, headers,
//! body, model, arrival time) for assertions. Dropping the mock closes the listening socket and
//! every connection.
//!
//! Replies cover what model APIs do in the field:
//!
//! - successes with `usage`: [`Reply::openai_chat`], [`Reply::anthropic_message`];
//! - SSE streams in both styles ([`Reply::openai_stream`], [`Reply::anthropic_stream`], raw
//!   [`Reply::sse`]) with per-event delays, a stall or an abrupt cut after N events, no terminal
//!   marker (with or without a finish reason), an in-band error event, a malformed event;
//! - transport behaviours: a delayed response head ([`Reply::delay_head`]), a request that is
//!   never answered ([`Reply::never`]), a connection reset before any response byte
//!   ([`Reply::reset`]);
//! - every provider failure of the classifier's table with its real status, headers and body:
//!   - OpenAI: rate limit (`Retry-After`), `slow_down`, "Request too large", `insufficient_quota`,
//!     credit balance and spend or usage limits, overload, server error, context length, content
//!     policy, 400, 404, 401, unsupported region (403);
//!   - Azure OpenAI: rate limit with `retry-after-ms`, content filter;
//!   - Anthropic: rate limit, 529 and `api_error` "Overloaded", spend and usage limits, billing,
//!     prompt too long, 413, 500, 504, 401, 403;
//!   - Gemini and Vertex: `RESOURCE_EXHAUSTED` per minute (with `RetryInfo`) and per day, the
//!     Vertex one-element array, `UNAVAILABLE`, `INTERNAL`, `DEADLINE_EXCEEDED`, 402, invalid API
//!     key, token limit, `PERMISSION_DENIED`;
//!   - Bedrock throttling and 503, Groq 498, Mistral rate limit, OpenRouter 402 and moderation
//!     403;
//!   - gateways and CDNs: 502 and 504 HTML pages, a 413 HTML page, 409, 422.
//!
//! All waits use `tokio::time` and the server runs no timer of its own, so tests under
//! `#[tokio::test(start_paused = true)]` can assert exact times: a head delayed by 2 s arrives
//! exactly 2 s after the request.
//!
//! [`client`] builds a hyper-util client for the mock and [`chat_request`] a chat completion
//! request.
//!
//! # Example
//!
//! ```
//! use http_body_util::BodyExt;
//! use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mock = MockProvider::start().await?;
//! // The first call is rate limited, every later one succeeds.
//! mock.script(
//!     ScriptKey::model("gpt-4o"),
//!     [Reply::openai_rate_limited(Some("2")), Reply::openai_chat("gpt-4o", "Hello!")],
//! );
//!
//! let client = client();
//! let first = client.request(chat_request(&mock.url(), "gpt-4o", false)).await?;
//! assert_eq!(first.status(), 429);
//! assert_eq!(first.headers()["retry-after"], "2");
//!
//! let second = client.request(chat_request(&mock.url(), "gpt-4o", false)).await?;
//! assert_eq!(second.status(), 200);
//! assert_eq!(second.headers()["x-request-id"], "req_mock_2");
//! let body = second.into_body().collect().await?.to_bytes();
//! let json: serde_json::Value = serde_json::from_slice(&body)?;
//! assert_eq!(json["choices"][0]["message"]["content"], "Hello!");
//!
//! let requests = mock.requests();
//! assert_eq!(requests.len(), 2);
//! assert_eq!(requests[0].path, "/v1/chat/completions");
//! assert_eq!(requests[0].model.as_deref(), Some("gpt-4o"));
//! # Ok(())
//! # }
//! ```

mod body;
mod provider;
mod reply;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub use provider::{MockProvider, RecordedRequest, ScriptKey};
pub use reply::Reply;

/// A hyper-util HTTP/1.1 client for talking to a [`MockProvider`] (plain HTTP, `TCP_NODELAY`,
/// no pool timer, so it runs no timer of its own under paused time).
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// `POST {base_url}/v1/chat/completions` with `content-type: application/json` and the body
/// `{"model":MODEL,"messages":[{"role":"user","content":"hello"}],"max_tokens":64,"stream":STREAM}`.
///
/// A `base_url` that does not form a valid URI leaves the request's URI empty (`/`), so sending
/// it fails with the client's clear "invalid URI" error instead of a panic here.
pub fn chat_request(base_url: &str, model: &str, stream: bool) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":{},"messages":[{{"role":"user","content":"hello"}}],"max_tokens":64,"stream":{stream}}}"#,
        reply::json_str(model)
    );
    let mut request = Request::new(Full::new(Bytes::from(body)));
    *request.method_mut() = Method::POST;
    let url = format!("{}/v1/chat/completions", base_url.trim_end_matches('/'));
    if let Ok(uri) = url.parse::<Uri>() {
        *request.uri_mut() = uri;
    }
    request.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    request
}
