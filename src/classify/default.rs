use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, StatusCode};
use serde_json::Value;

use super::providers;
use super::{Classification, Classifier, FailureClass, hints};

/// The provider-aware classifier: status, headers, and the JSON error shapes of every provider
/// in the crate's provider notes (OpenAI and OpenAI-compatible servers, Azure OpenAI,
/// Anthropic, Gemini and Vertex, Bedrock, Mistral, Groq, OpenRouter).
///
/// # Responses
///
/// Statuses below 400 are successes (only the provider request id is read). For 4xx and 5xx the
/// classifier reads the error body — tolerating bodies that are not JSON, truncated, a JSON
/// string, wrapped in Vertex's one-element array, or full of unknown fields — and decides:
///
/// 1. the contracts that need two fields: Anthropic's spend cap (429 `rate_limit_error` with
///    `details.error_code: enforced_spend_limit_reached` and no `retry-after` is
///    [`QuotaExhausted`](FailureClass::QuotaExhausted); with `retry-after` it is a rate limit),
///    Anthropic's self-set limit and empty credit balance (400, by message), Gemini's
///    `RESOURCE_EXHAUSTED` with a per-day quota id (quota, not a rate limit), OpenAI's 429
///    "Request too large" ([`InvalidRequest`](FailureClass::InvalidRequest): it never fits),
///    Anthropic's `api_error` "Overloaded", OpenRouter's 403 moderation;
/// 2. the provider's `code`, then its `type`, then Gemini's `status`, Anthropic's
///    `details.error_code`, Azure's `innererror.code`, Gemini's `ErrorInfo.reason` and Bedrock's
///    `x-amzn-ErrorType` (`insufficient_quota`, `context_length_exceeded`, `content_filter`,
///    `overloaded_error`, `UNAVAILABLE`, `ThrottlingException`, …);
/// 3. context-window wording in a 400/413/422 message ("prompt is too long", "maximum context
///    length", Gemini's token-count limit);
/// 4. otherwise the status: 401/403 auth, 402 quota, 408 timeout, 409 conflict, 429 rate
///    limited, 498/503/529 overloaded, other 5xx server error, other 4xx invalid request.
///
/// It also fills the provider's error type and code (bounded, never the message), the request
/// id (`x-request-id`, `request-id`, `x-amzn-requestid`, `x-generation-id`, `apim-request-id`,
/// or Anthropic's body `request_id`), `x-should-retry`, and the wait hint (headers first, see
/// [`hints::wait_hint`], then Gemini's `RetryInfo.retryDelay`).
///
/// # Transport errors
///
/// [`classify_error`](Classifier::classify_error) walks the source chain (see
/// [`Classifier::classify_error`] on this type for the rules).
///
/// # In-band stream errors
///
/// [`classify_stream_error`] classifies the `data:` payload of an SSE error event like its
/// HTTP equivalent.
///
/// ```
/// use http::{HeaderMap, HeaderName, StatusCode};
/// use tower_llm_resilience::classify::{Classifier, DefaultClassifier, FailureClass};
///
/// let body = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
/// let c = DefaultClassifier::default().classify_response(
///     StatusCode::TOO_MANY_REQUESTS,
///     &HeaderMap::new(),
///     body,
/// );
/// assert_eq!(c.class, Some(FailureClass::QuotaExhausted));
/// assert_eq!(c.error_code.as_deref(), Some("insufficient_quota"));
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DefaultClassifier {}

impl DefaultClassifier {
    /// A default classifier.
    pub fn new() -> Self {
        Self {}
    }
}

impl Classifier for DefaultClassifier {
    fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Classification {
        let mut c = Classification::success(status);
        c.request_id = request_id(headers);
        if !(status.is_client_error() || status.is_server_error()) {
            return c;
        }
        let mut p = providers::parse(body).unwrap_or_default();
        p.read_headers(headers);
        let has_retry_after =
            headers.contains_key("retry-after") || headers.contains_key("retry-after-ms");
        let class = p
            .class(Some(status.as_u16()), has_retry_after)
            .unwrap_or_else(|| providers::by_status(status.as_u16()));
        c.class = Some(class);
        c.should_retry = hints::should_retry(headers);
        c.wait_hint = hints::wait_hint(headers, SystemTime::now()).or(p.retry_delay);
        c.request_id = c.request_id.or(p.request_id);
        c.error_type = p.error_type;
        c.error_code = p.error_code;
        c
    }

    /// Classifies a transport error by walking its source chain, outermost first; the first
    /// error that decides wins:
    ///
    /// - a crate [`Error`](crate::Error) with a class: that class (`DeadlineExceeded`: timeout);
    /// - hyper-util's legacy client error of kind `Connect` (connecting, resolving, a connect
    ///   timeout — nothing was sent): [`Connect`](FailureClass::Connect);
    /// - `std::io::Error` of kind `ConnectionRefused`, `ConnectionReset`, `ConnectionAborted`,
    ///   `NotConnected`, `BrokenPipe`, `AddrNotAvailable`, `HostUnreachable`,
    ///   `NetworkUnreachable`, `NetworkDown`: [`Connect`](FailureClass::Connect); `TimedOut`:
    ///   [`Timeout`](FailureClass::Timeout);
    /// - `hyper::Error`: a timeout is [`Timeout`](FailureClass::Timeout); an incomplete message
    ///   (the server closed the connection before any response) is
    ///   [`Connect`](FailureClass::Connect), as the official SDKs retry it — in practice it is a
    ///   pooled connection the server had just closed; canceled or closed (the request never
    ///   made it onto a live connection: the connection closed while it was queued, or its
    ///   task went away) is [`Connect`](FailureClass::Connect);
    ///   an error reading a response body (the head had arrived, so the request was processed)
    ///   is [`Transport`](FailureClass::Transport) whatever lies beneath it;
    /// - `tokio::time::error::Elapsed` and `tower::timeout::error::Elapsed`:
    ///   [`Timeout`](FailureClass::Timeout);
    /// - anything else: [`Transport`](FailureClass::Transport).
    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Classification {
        Classification::failure(error_class(error, 0).unwrap_or(FailureClass::Transport))
    }
}

/// Classifies an in-band stream error — the `data:` payload of an SSE event — like its HTTP
/// equivalent, without a status: `None` when the payload is not an error.
///
/// Recognised payloads:
///
/// - OpenAI-compatible chunks with a non-null top-level `error` object
///   (`{"error":{"message":…,"type":"server_error"}}`; OpenRouter's chunk with
///   `finish_reason: "error"` and a string `code`);
/// - Anthropic `{"type":"error","error":{"type":"overloaded_error",…}}`;
/// - OpenAI Responses API `error` events (`{"type":"error","code":…,"message":…}`),
///   `response.failed` (its `response.error`), and `response.incomplete` whose reason is
///   `content_filter` ([`PolicyBlock`](FailureClass::PolicyBlock)); an incomplete response
///   for any other reason (`max_output_tokens`) ended on the caller's own limit, like a
///   `finish_reason: "length"`, and is not an error;
/// - Gemini error chunks `{"error":{"code":503,"status":"UNAVAILABLE",…}}`, also inside a
///   one-element array.
///
/// A numeric `code` (Gemini, OpenRouter) stands for the status. An error that names no known
/// type, code or status is a [`ServerError`](FailureClass::ServerError): the provider failed
/// mid-answer. The classification's `status` is `None`; Gemini's `RetryInfo` becomes the wait
/// hint.
///
/// ```
/// use tower_llm_resilience::classify::{classify_stream_error, FailureClass};
///
/// let event = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
/// let c = classify_stream_error(event).unwrap();
/// assert_eq!(c.class, Some(FailureClass::Overloaded));
/// assert!(classify_stream_error(br#"{"choices":[{"delta":{"content":"hi"}}]}"#).is_none());
/// ```
pub fn classify_stream_error(data: &[u8]) -> Option<Classification> {
    let v = providers::parse_json(data)?;
    let root = providers::root(&v)?;
    let p = match root.get("type").and_then(Value::as_str) {
        Some("response.failed") => {
            let error = root.get("response").and_then(|r| r.get("error"));
            error
                .filter(|e| e.is_object())
                .and_then(|e| providers::from_value(&serde_json::json!({ "error": e })))
                .unwrap_or_default()
        }
        Some("response.incomplete") => {
            let reason = root
                .get("response")
                .and_then(|r| r.get("incomplete_details"))
                .and_then(|d| d.get("reason"))
                .and_then(Value::as_str)?;
            if reason != "content_filter" {
                return None;
            }
            let mut c = Classification::failure(FailureClass::PolicyBlock);
            c.error_code = providers::bounded(reason);
            return Some(c);
        }
        Some("error") => providers::from_value(&v).unwrap_or_default(),
        _ => match root.get("error") {
            Some(Value::Object(_)) => providers::from_value(&v).unwrap_or_default(),
            Some(Value::String(s)) if !s.trim().is_empty() => {
                providers::from_value(&v).unwrap_or_default()
            }
            _ => return None,
        },
    };
    let class = p.class(None, false).unwrap_or(FailureClass::ServerError);
    let mut c = Classification::failure(class);
    c.wait_hint = p.retry_delay;
    c.request_id = p.request_id;
    c.error_type = p.error_type;
    c.error_code = p.error_code;
    Some(c)
}

/// The provider's request id from the response headers.
fn request_id(headers: &HeaderMap) -> Option<String> {
    // Names built at compile time: a lookup by `&str` would parse the name on every response.
    const NAMES: [HeaderName; 5] = [
        HeaderName::from_static("x-request-id"),
        HeaderName::from_static("request-id"),
        HeaderName::from_static("x-amzn-requestid"),
        HeaderName::from_static("x-generation-id"),
        HeaderName::from_static("apim-request-id"),
    ];
    NAMES
        .iter()
        .filter_map(|name| headers.get(name)?.to_str().ok())
        .find_map(providers::bounded)
}

/// How deep a source chain is followed (a cycle or a pathological chain stops here).
const MAX_CHAIN: usize = 32;

fn error_class(error: &(dyn StdError + 'static), depth: usize) -> Option<FailureClass> {
    let mut next = Some(error);
    let mut depth = depth;
    while let Some(e) = next {
        if depth >= MAX_CHAIN {
            return None;
        }
        depth += 1;
        if let Some(ce) = e.downcast_ref::<crate::Error>() {
            if let Some(class) = ce.class() {
                return Some(class);
            }
            if *ce.kind() == crate::ErrorKind::DeadlineExceeded {
                return Some(FailureClass::Timeout);
            }
        }
        if is_legacy_connect_error(e) {
            return Some(FailureClass::Connect);
        }
        // reqwest's own timeout error is private; only `reqwest::Error` can tell. A connect
        // that timed out was never sent: `Connect`, like hyper-util's.
        #[cfg(feature = "reqwest")]
        if let Some(r) = e.downcast_ref::<::reqwest::Error>() {
            if r.is_connect() {
                return Some(FailureClass::Connect);
            }
            if r.is_timeout() {
                return Some(FailureClass::Timeout);
            }
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(class) = io_class(io.kind()) {
                return Some(class);
            }
            // `io::Error::source` skips the error it wraps: look at that one too.
            if let Some(inner) = io.get_ref() {
                if let Some(class) = error_class(inner, depth) {
                    return Some(class);
                }
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            // A body that broke after the response head: the request was processed, so the
            // reset or close underneath must not read as "never sent". hyper has no
            // `is_body()`; its `Display` is the fixed description of the kind.
            if Prefix::of(h).starts_with("error reading a body from connection") {
                return Some(FailureClass::Transport);
            }
            if h.is_timeout() {
                return Some(FailureClass::Timeout);
            }
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return Some(FailureClass::Connect);
            }
        }
        if e.is::<tokio::time::error::Elapsed>() || e.is::<tower::timeout::error::Elapsed>() {
            return Some(FailureClass::Timeout);
        }
        next = e.source();
    }
    None
}

fn io_class(kind: io::ErrorKind) -> Option<FailureClass> {
    use io::ErrorKind::*;
    match kind {
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe
        | AddrNotAvailable | HostUnreachable | NetworkUnreachable | NetworkDown => {
            Some(FailureClass::Connect)
        }
        TimedOut => Some(FailureClass::Timeout),
        _ => None,
    }
}

/// Whether `e` is hyper-util's legacy client error of kind `Connect`. The crate does not
/// depend on hyper-util outside its `testing` feature, so the type cannot be named; its
/// `Display` is exactly `client error (Connect)`.
fn is_legacy_connect_error(e: &(dyn StdError + 'static)) -> bool {
    Prefix::of(e).is("client error (Connect)")
}

/// The start of an error's `Display`, formatted into a small fixed buffer, so a foreign
/// error's long `Display` is never formatted in full.
struct Prefix {
    buf: [u8; 64],
    len: usize,
    overflow: bool,
}

impl Prefix {
    fn of(e: &dyn fmt::Display) -> Self {
        let mut p = Prefix {
            buf: [0; 64],
            len: 0,
            overflow: false,
        };
        // An error here is the buffer filling up (or a failing `Display`): the prefix stands.
        let _ = fmt::write(&mut p, format_args!("{e}"));
        p
    }

    /// The whole `Display` is `text`.
    fn is(&self, text: &str) -> bool {
        !self.overflow && &self.buf[..self.len] == text.as_bytes()
    }

    fn starts_with(&self, text: &str) -> bool {
        self.buf[..self.len].starts_with(text.as_bytes())
    }
}

impl fmt::Write for Prefix {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.overflow = true;
            return Err(fmt::Error);
        }
        Ok(())
    }
}
