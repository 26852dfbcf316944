//! The whole recovery ladder with `reqwest` as the transport.
//!
//! ```text
//! cargo run --example reqwest_client --features reqwest
//! ```
//!
//! By default the example starts an embedded `MockProvider` on loopback that is overloaded once
//! (a 503) and then answers, so the retry is visible: it prints the answer and the attempt log
//! (two attempts: the 503 with its retry decision, then the 200).
//!
//! Against a real OpenAI-compatible provider (no mock), with the key in `OPENAI_API_KEY`:
//!
//! ```text
//! OPENAI_API_KEY=... cargo run --example reqwest_client \
//!     --features reqwest,reqwest/rustls -- \
//!     --upstream https://api.openai.com --model gpt-4o-mini --prompt "Say hello"
//! ```
//!
//! The crate compiles reqwest without a TLS stack; `reqwest/rustls` (or `native-tls`)
//! adds one for `https` upstreams. A local plain-HTTP server (vLLM, llama.cpp, Ollama's
//! OpenAI-compatible endpoint) needs none, and no key either.

use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request};
use http_body_util::Full;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::LogSnapshot;
use tower_llm_resilience::reqwest::ReqwestService;
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{AttemptLog, Error, Policy, PolicyError, ResilienceLayer, Resilient};

/// The model the embedded mock answers as.
pub const MOCK_MODEL: &str = "gpt-4o";
/// The answer the embedded mock gives once it has recovered.
pub const MOCK_ANSWER: &str = "Hello from the mock provider!";

/// Where requests go.
#[derive(Clone)]
pub struct Upstream {
    /// Base URL; `/v1/chat/completions` is appended (a trailing `/v1` is not repeated).
    pub base_url: String,
    /// Sent as `authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
}

/// What one call returned.
pub struct Answer {
    /// HTTP status of the answer (a provider's error response is an answer too).
    pub status: u16,
    /// `choices[0].message.content` of a successful answer, else the provider's error message
    /// (or the raw body when it has neither).
    pub text: String,
    /// Every attempt the ladder made.
    pub log: LogSnapshot,
}

/// The client: reqwest under the whole ladder built from `policy`.
pub fn client(policy: &Policy) -> Result<Resilient<ReqwestService>, PolicyError> {
    // No total timeout on reqwest: the policy's deadline and stream timeouts bound the call.
    let reqwest = reqwest::Client::new();
    Ok(ServiceBuilder::new()
        .layer(ResilienceLayer::new(policy)?)
        .service(ReqwestService::new(reqwest)))
}

/// The policy of the example: the interactive preset, with jitter seeded so runs repeat.
pub fn policy() -> Policy {
    let mut policy = Policy::interactive();
    policy.workflow = "reqwest-example".to_owned();
    policy.retry.seed = Some(7);
    policy.budget.deadline = Some(Duration::from_secs(30));
    policy
}

/// Starts the embedded provider: overloaded once, then answering [`MOCK_ANSWER`].
pub async fn start_mock() -> std::io::Result<MockProvider> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::Any,
        [
            Reply::openai_overloaded(),
            Reply::openai_chat(MOCK_MODEL, MOCK_ANSWER),
        ],
    );
    Ok(mock)
}

/// The chat completion URL for `base_url`.
pub fn chat_url(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    if base.ends_with("/v1") {
        format!("{base}/chat/completions")
    } else {
        format!("{base}/v1/chat/completions")
    }
}

/// Asks `model` one question through `client`.
///
/// A provider's error response (401, 400, a 429 the ladder gave up on) comes back as an
/// [`Answer`] with its status; a crate [`Error`] (open circuit, deadline, transport…) carries
/// the attempt log too.
pub async fn ask(
    client: Resilient<ReqwestService>,
    upstream: &Upstream,
    model: &str,
    prompt: &str,
) -> Result<Answer, Error> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 256,
    });
    let mut request = Request::new(Full::new(Bytes::from(body.to_string())));
    *request.method_mut() = Method::POST;
    match chat_url(&upstream.base_url).parse() {
        Ok(uri) => *request.uri_mut() = uri,
        // Left relative: the transport fails it with a clear "builder error".
        Err(_) => eprintln!("warning: {:?} is not a valid URL", upstream.base_url),
    }
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(key) = &upstream.api_key {
        match HeaderValue::try_from(format!("Bearer {key}")) {
            Ok(mut value) => {
                value.set_sensitive(true);
                headers.insert(AUTHORIZATION, value);
            }
            Err(_) => eprintln!("warning: the API key is not a valid header value; not sent"),
        }
    }

    let response = client.oneshot(request).await?;
    let status = response.status().as_u16();
    let log = response
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .unwrap_or_default();
    let body = response.into_body().collect_bytes().await?;
    Ok(Answer {
        status,
        text: answer_text(&body),
        log: log.snapshot(),
    })
}

/// `choices[0].message.content`, else `error.message`, else the body as text.
fn answer_text(body: &[u8]) -> String {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |v: &serde_json::Value, path: &[&str]| -> Option<String> {
        let mut v = v;
        for p in path {
            v = match p.parse::<usize>() {
                Ok(i) => v.get(i)?,
                Err(_) => v.get(p)?,
            };
        }
        v.as_str().map(str::to_owned)
    };
    json.as_ref()
        .and_then(|v| {
            field(v, &["choices", "0", "message", "content"])
                .or_else(|| field(v, &["error", "message"]))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
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
        prompt: "Say hello in five words.".to_owned(),
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
                    "usage: reqwest_client [--upstream URL] [--model NAME] [--prompt TEXT]\n\
                     the API key for --upstream is read from OPENAI_API_KEY"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
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
    let (upstream, model, _mock) = match args.upstream {
        Some(base_url) => {
            let api_key = std::env::var("OPENAI_API_KEY").ok();
            if api_key.is_none() {
                eprintln!("note: OPENAI_API_KEY is not set; calling {base_url} without a key");
            }
            let model = args.model.unwrap_or_else(|| "gpt-4o-mini".to_owned());
            (Upstream { base_url, api_key }, model, None)
        }
        None => {
            let mock = start_mock().await?;
            println!(
                "embedded mock provider on {} (503 once, then 200)",
                mock.url()
            );
            let upstream = Upstream {
                base_url: mock.url(),
                api_key: None,
            };
            let model = args.model.unwrap_or_else(|| MOCK_MODEL.to_owned());
            (upstream, model, Some(mock))
        }
    };

    let client = client(&policy())?;
    match ask(client, &upstream, &model, &args.prompt).await {
        Ok(answer) => {
            println!("status {}: {}", answer.status, answer.text);
            println!("\nattempt log:\n{}", answer.log);
            if !(200..300).contains(&answer.status) {
                std::process::exit(1);
            }
        }
        Err(error) => {
            println!("failed: {error}");
            if let Some(log) = error.attempt_log() {
                println!("\nattempt log:\n{log}");
            }
            std::process::exit(1);
        }
    }
    Ok(())
}
