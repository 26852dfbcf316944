//! A streamed chat completion through the whole recovery ladder, with hyper-util's client as the
//! transport. Tokens are printed as they arrive, then the attempt log.
//!
//! ```text
//! cargo run --example hyper_client
//! ```
//!
//! By default the example starts an embedded `MockProvider` on loopback that is overloaded once
//! (a 503, retried before anything reached the caller) and then streams its answer token by
//! token.
//!
//! Against a real OpenAI-compatible server (no mock), with the key, if it needs one, in
//! `OPENAI_API_KEY`:
//!
//! ```text
//! cargo run --example hyper_client -- \
//!     --upstream http://127.0.0.1:11434 --model llama3.2 --prompt "Tell me a joke"
//! ```
//!
//! hyper-util's `HttpConnector` speaks plain HTTP only, which fits a local server (Ollama,
//! vLLM, llama.cpp). For an `https` provider, build the client with a TLS connector
//! (`hyper-rustls`, `hyper-tls`) — the stack does not care which — or see the `reqwest_client`
//! example.

use std::io::Write;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::LogSnapshot;
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{AttemptLog, Error, Policy, PolicyError, ResilienceLayer, Resilient};

/// The transport: hyper-util's pooled HTTP/1.1 client.
pub type Transport = Client<HttpConnector, Full<Bytes>>;

/// The model the embedded mock answers as.
pub const MOCK_MODEL: &str = "gpt-4o";
/// The tokens the embedded mock streams once it has recovered.
pub const MOCK_TOKENS: [&str; 6] = ["Streams", " arrive", " token", " by", " token", "."];

/// The client: hyper-util under the whole ladder built from `policy`.
pub fn client(policy: &Policy) -> Result<Resilient<Transport>, PolicyError> {
    let transport = Client::builder(TokioExecutor::new()).build_http();
    Ok(ServiceBuilder::new()
        .layer(ResilienceLayer::new(policy)?)
        .service(transport))
}

/// The policy of the example: the interactive preset (streams committed at the first token),
/// with jitter seeded so runs repeat and a short first-token timeout.
pub fn policy() -> Policy {
    let mut policy = Policy::interactive();
    policy.workflow = "hyper-example".to_owned();
    policy.retry.seed = Some(7);
    policy.stream.first_token_timeout = Some(Duration::from_secs(10));
    policy
}

/// Starts the embedded provider: overloaded once, then streaming [`MOCK_TOKENS`] 150 ms apart.
pub async fn start_mock() -> std::io::Result<MockProvider> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::Any,
        [
            Reply::openai_overloaded(),
            Reply::openai_stream(MOCK_MODEL, &MOCK_TOKENS).event_delay(Duration::from_millis(150)),
        ],
    );
    Ok(mock)
}

/// What a streamed call returned.
pub struct Streamed {
    /// HTTP status of the answer.
    pub status: u16,
    /// The content tokens, in arrival order (a failed answer has none).
    pub tokens: Vec<String>,
    /// The body of a failed answer (the provider's error response).
    pub error_body: Option<String>,
    /// Every attempt, read after the stream ended (so with the stream's own record).
    pub log: LogSnapshot,
}

/// Streams one chat completion through `client` from `base_url` (`/v1/chat/completions` is
/// appended), calling `on_token` with each content token as it arrives.
///
/// An error in the middle of the stream (after tokens reached the caller, so never retried)
/// ends the call with that error: `ErrorKind::StreamInterrupted`, log attached.
pub async fn stream_chat(
    client: Resilient<Transport>,
    base_url: &str,
    api_key: Option<&str>,
    model: &str,
    prompt: &str,
    mut on_token: impl FnMut(&str),
) -> Result<Streamed, Error> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 256,
        "stream": true,
    });
    let mut request = Request::new(Full::new(Bytes::from(body.to_string())));
    *request.method_mut() = Method::POST;
    let url = format!("{}/v1/chat/completions", base_url.trim_end_matches('/'));
    match url.parse() {
        Ok(uri) => *request.uri_mut() = uri,
        // Left relative: the transport fails it with a clear error.
        Err(_) => eprintln!("warning: {base_url:?} is not a valid URL"),
    }
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    if let Some(key) = api_key {
        if let Ok(mut value) = HeaderValue::try_from(format!("Bearer {key}")) {
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
    }

    let response = client.oneshot(request).await?;
    let status = response.status().as_u16();
    let log = response
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .unwrap_or_default();
    let mut body = response.into_body();

    if !response_is_success(status) {
        let bytes = body.collect_bytes().await?;
        return Ok(Streamed {
            status,
            tokens: Vec::new(),
            error_body: Some(String::from_utf8_lossy(&bytes).into_owned()),
            log: log.snapshot(),
        });
    }

    let mut tokens = Vec::new();
    let mut events = SseLines::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers
        };
        for payload in events.push(&data) {
            if let Some(token) = content_token(&payload) {
                on_token(&token);
                tokens.push(token);
            }
        }
    }
    Ok(Streamed {
        status,
        tokens,
        error_body: None,
        log: log.snapshot(),
    })
}

fn response_is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

/// `choices[0].delta.content` of an OpenAI chunk, when non-empty.
fn content_token(payload: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let token = v
        .get("choices")?
        .get(0)?
        .get("delta")?
        .get("content")?
        .as_str()?;
    (!token.is_empty()).then(|| token.to_owned())
}

/// Splits an SSE byte stream into the payloads of its `data:` lines, across chunk boundaries.
#[derive(Default)]
struct SseLines {
    pending: BytesMut,
}

impl SseLines {
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let mut payloads = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line = self.pending.split_to(end + 1);
            let line = String::from_utf8_lossy(&line);
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                payloads.push(data.trim_start().to_owned());
            }
        }
        payloads
    }
}

struct Args {
    upstream: Option<String>,
    model: Option<String>,
    prompt: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        upstream: None,
        model: None,
        prompt: "Explain streaming in one sentence.".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--upstream" => args.upstream = Some(value("--upstream")?),
            "--model" => args.model = Some(value("--model")?),
            "--prompt" => args.prompt = value("--prompt")?,
            "-h" | "--help" => {
                return Err(
                    "usage: hyper_client [--upstream http://HOST:PORT] [--model NAME] [--prompt TEXT]\n\
                     the API key for --upstream, if any, is read from OPENAI_API_KEY"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if args
        .upstream
        .as_deref()
        .is_some_and(|u| u.starts_with("https:"))
    {
        return Err(
            "this example's HttpConnector speaks plain HTTP only: use a TLS connector \
                    (hyper-rustls) or the reqwest_client example for https upstreams"
                .to_owned(),
        );
    }
    Ok(args)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };

    // The mock lives as long as `_mock`.
    let (base_url, api_key, model, _mock) = match args.upstream {
        Some(base_url) => {
            let key = std::env::var("OPENAI_API_KEY").ok();
            let model = args.model.unwrap_or_else(|| "gpt-4o-mini".to_owned());
            (base_url, key, model, None)
        }
        None => {
            let mock = start_mock().await?;
            println!(
                "embedded mock provider on {} (503 once, then a stream)",
                mock.url()
            );
            let model = args.model.unwrap_or_else(|| MOCK_MODEL.to_owned());
            (mock.url(), None, model, Some(mock))
        }
    };

    let client = client(&policy())?;
    let print = |token: &str| {
        print!("{token}");
        let _ = std::io::stdout().flush();
    };
    match stream_chat(
        client,
        &base_url,
        api_key.as_deref(),
        &model,
        &args.prompt,
        print,
    )
    .await
    {
        Ok(streamed) => {
            println!();
            if let Some(body) = &streamed.error_body {
                println!("status {}: {body}", streamed.status);
            }
            println!("\nattempt log:\n{}", streamed.log);
            if !response_is_success(streamed.status) {
                std::process::exit(1);
            }
        }
        Err(error) => {
            println!("\nfailed: {error}");
            if let Some(log) = error.attempt_log() {
                println!("\nattempt log:\n{log}");
            }
            std::process::exit(1);
        }
    }
    Ok(())
}
