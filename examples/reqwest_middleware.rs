//! The whole recovery ladder as one reqwest-middleware `Middleware`, beside another middleware.
//!
//! ```text
//! cargo run --example reqwest_middleware --features reqwest-middleware
//! ```
//!
//! The example starts an embedded `MockProvider` on loopback and sends two requests through
//! `ClientBuilder::new(client).with(ResilienceMiddleware).with(AttemptPrinter)`:
//!
//! 1. a chat completion that is rate limited once (a 429 with `Retry-After: 1`), retried after
//!    the server's wait, then answered; it prints the answer and the attempt log from the
//!    response's extensions;
//! 2. a streamed completion read with `bytes_stream()`, its text deltas printed as they come.
//!
//! `AttemptPrinter` sits below the ladder, nearer the transport, so it prints every attempt:
//! three lines for two requests.
//!
//! Against a real provider, send to its URL instead of the mock's, with your key
//! (`.bearer_auth(key)`), and give reqwest a TLS stack in your own dependency: the crate enables
//! none (`reqwest = { version = "0.13", features = ["rustls"] }`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use http::Extensions;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use tower_llm_resilience::attempt_log::LogSnapshot;
use tower_llm_resilience::reqwest_middleware::ResilienceMiddleware;
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{AttemptLog, Error, Policy, PolicyError, RouteName};

/// The model the chat request asks for.
pub const MOCK_MODEL: &str = "gpt-4o";
/// The model the streamed request asks for.
pub const MOCK_STREAM_MODEL: &str = "gpt-4o-mini";
/// The answer the embedded mock gives once the rate limit has passed.
pub const MOCK_ANSWER: &str = "Hello from the mock provider!";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Starts the embedded provider: the chat model is rate limited once, then answers
/// [`MOCK_ANSWER`]; the stream model streams "Hello from a stream".
pub async fn start_mock() -> std::io::Result<MockProvider> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MOCK_MODEL),
        [
            Reply::openai_rate_limited(Some("1")),
            Reply::openai_chat(MOCK_MODEL, MOCK_ANSWER),
        ],
    );
    mock.script(
        ScriptKey::model(MOCK_STREAM_MODEL),
        [Reply::openai_stream(
            MOCK_STREAM_MODEL,
            &["Hello", " from", " a", " stream"],
        )],
    );
    Ok(mock)
}

/// The policy of the example: the interactive preset, with jitter seeded so runs repeat.
pub fn policy() -> Policy {
    let mut policy = Policy::interactive();
    policy.workflow = "reqwest-middleware-example".to_owned();
    policy.retry.seed = Some(7);
    policy
}

/// Another middleware, below the ladder: prints (and counts) every attempt.
#[derive(Clone, Default)]
pub struct AttemptPrinter {
    count: Arc<AtomicUsize>,
}

impl AttemptPrinter {
    /// Attempts seen so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

#[async_trait::async_trait]
impl Middleware for AttemptPrinter {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        // The ladder hands each attempt its route; metadata only, never the body or headers.
        let route = extensions
            .get::<RouteName>()
            .map_or("-".to_owned(), ToString::to_string);
        println!(
            "  -> attempt {n}: {} {} (route {route})",
            req.method(),
            req.url()
        );
        next.run(req, extensions).await
    }
}

/// A reqwest-middleware client: the ladder, then `printer` nearer the transport.
pub fn client(
    policy: &Policy,
    printer: AttemptPrinter,
) -> Result<ClientWithMiddleware, PolicyError> {
    // No total timeout on reqwest: the policy's deadline and stream timeouts bound the call.
    Ok(ClientBuilder::new(reqwest::Client::new())
        .with(ResilienceMiddleware::new(policy)?)
        .with(printer)
        .build())
}

/// What the chat request returned.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `choices[0].message.content`, else the response body as text.
    pub text: String,
    /// Every attempt the ladder made.
    pub log: LogSnapshot,
}

fn chat_url(base_url: &str) -> String {
    format!("{}/v1/chat/completions", base_url.trim_end_matches('/'))
}

fn body(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 64,
        "stream": stream,
    })
    .to_string()
}

/// One chat completion through `client`.
pub async fn ask(client: &ClientWithMiddleware, base_url: &str) -> Result<Answer, BoxError> {
    let response = client
        .post(chat_url(base_url))
        .header("content-type", "application/json")
        .body(body(MOCK_MODEL, false))
        .send()
        .await?;
    let status = response.status().as_u16();
    let log = response
        .extensions()
        .get::<AttemptLog>()
        .map(AttemptLog::snapshot)
        .ok_or("the response carries no attempt log")?;
    let body = response.text().await?;
    let content = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| {
            json["choices"][0]["message"]["content"]
                .as_str()
                .map(str::to_owned)
        });
    let text = content.unwrap_or(body);
    Ok(Answer { status, text, log })
}

/// One streamed completion through `client`: the text of its deltas, printed as they arrive.
pub async fn stream(client: &ClientWithMiddleware, base_url: &str) -> Result<String, BoxError> {
    let response = client
        .post(chat_url(base_url))
        .header("content-type", "application/json")
        .body(body(MOCK_STREAM_MODEL, true))
        .send()
        .await?;
    let mut events = response.bytes_stream();
    let mut pending = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = events.next().await {
        // A stream cut after its first token is an error here, never a clean end.
        pending.extend_from_slice(&chunk?);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(delta) = delta_text(&line) {
                print!("{delta}");
                text.push_str(&delta);
            }
        }
    }
    println!();
    Ok(text)
}

/// `choices[0].delta.content` of one SSE `data:` line.
fn delta_text(line: &[u8]) -> Option<String> {
    let data = std::str::from_utf8(line)
        .ok()?
        .trim()
        .strip_prefix("data:")?;
    let json: serde_json::Value = serde_json::from_str(data.trim()).ok()?;
    json["choices"][0]["delta"]["content"]
        .as_str()
        .map(str::to_owned)
}

/// The crate error inside a reqwest-middleware error, by downcast.
fn crate_error(error: &reqwest_middleware::Error) -> Option<&Error> {
    match error {
        reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<Error>(),
        reqwest_middleware::Error::Reqwest(_) => None,
    }
}

fn report(error: &BoxError) {
    println!("failed: {error}");
    let log = error
        .downcast_ref::<reqwest_middleware::Error>()
        .and_then(crate_error)
        .and_then(Error::attempt_log);
    if let Some(log) = log {
        println!("\nattempt log:\n{log}");
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let mock = start_mock().await?;
    println!("embedded mock provider on {}", mock.url());
    let client = client(&policy(), AttemptPrinter::default())?;

    println!("\nchat completion (429 once, then 200):");
    match ask(&client, &mock.url()).await {
        Ok(answer) => {
            println!("status {}: {}", answer.status, answer.text);
            println!("\nattempt log:\n{}", answer.log);
        }
        Err(error) => {
            report(&error);
            std::process::exit(1);
        }
    }

    println!("\nstreamed completion:");
    if let Err(error) = stream(&client, &mock.url()).await {
        report(&error);
        std::process::exit(1);
    }
    Ok(())
}
