//! What the mock provider answers: [`Reply`] and its provider presets.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Stands for the request's sequence number in templated bodies and events. A NUL byte never
/// survives JSON escaping, so user text cannot contain it by accident.
pub(crate) const SEQ: &str = "\u{0}seq\u{0}";

/// Prompt tokens reported by every success preset (the request body is not tokenised).
const PROMPT_TOKENS: usize = 9;

/// One scripted answer of a [`MockProvider`](super::MockProvider).
///
/// Build one with a constructor (a success, a stream, a provider failure preset, or a transport
/// behaviour such as [`Reply::never`] or [`Reply::reset`]) and adjust it with the builder
/// methods. Stream modifiers ([`Reply::stall_after`], [`Reply::cut_after`], …) apply to the
/// event list as it is when they are called, in the order they are called; on a reply that is
/// not a stream they have no effect.
///
/// Presets that carry a provider request id (`x-request-id`, `request-id`, `x-amzn-RequestId`,
/// and the `request_id` field of Anthropic error bodies) use `req_mock_{n}`, where `n` counts the
/// requests the mock has received, starting at 1, unless the reply sets that header itself with
/// [`Reply::header`]. Response ids in success bodies follow the same counter (`chatcmpl-mock-{n}`,
/// `msg_mock_{n}`).
///
/// An invalid status or header given to [`Reply::json`], [`Reply::text`] or [`Reply::header`] does
/// not panic: the reply is served as a `500` with a `text/plain` body naming the problem and an
/// `x-mock-error: invalid-reply` header.
#[derive(Clone, Debug)]
pub struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) head_delay: Option<Duration>,
    pub(crate) request_id: Option<HeaderName>,
    pub(crate) content: Content,
    pub(crate) invalid: Option<String>,
}

/// What follows the response head.
#[derive(Clone, Debug)]
pub(crate) enum Content {
    /// A complete body; `templated` bodies have [`SEQ`] replaced by the request number.
    Full { body: String, templated: bool },
    /// A server-sent event stream.
    Sse(Sse),
    /// No answer at all.
    Never,
    /// Connection reset before any response byte.
    Reset,
    /// A stream worked out from the request: see [`Reply::openai_continuation`].
    Continuation(Continuation),
}

/// A prefill-aware stream: the canonical answer, or the rest of it after the request's prefill.
#[derive(Clone, Debug)]
pub(crate) struct Continuation {
    style: Style,
    model: String,
    chunks: Vec<String>,
    /// The stream modifiers, applied to the stream once it is worked out.
    ops: Vec<SseOp>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    OpenAi,
    Anthropic,
}

/// A stream modifier, kept for a stream worked out later.
#[derive(Clone, Debug)]
enum SseOp {
    Delay(Duration),
    StallAfter(usize),
    CutAfter(usize),
    WithoutTerminal,
    WithoutFinish,
    ErrorAfter(usize, String),
    MalformedAfter(usize),
}

impl SseOp {
    fn apply(self, sse: &mut Sse) {
        match self {
            SseOp::Delay(delay) => sse.delay = delay,
            SseOp::StallAfter(n) => {
                sse.events.truncate(n);
                sse.end = SseEnd::Stall;
            }
            SseOp::CutAfter(n) => {
                sse.events.truncate(n);
                sse.end = SseEnd::Cut;
            }
            SseOp::WithoutTerminal => sse.events.retain(|e| !is_terminal(e)),
            SseOp::WithoutFinish => sse.events.retain(|e| !is_terminal(e) && !is_finish(e)),
            SseOp::ErrorAfter(n, event) => {
                sse.events.truncate(n);
                sse.events.push(event);
                sse.end = SseEnd::Clean;
            }
            SseOp::MalformedAfter(n) => {
                let at = n.min(sse.events.len());
                sse.events.insert(at, r#"data: {"choices":[{"#.to_owned());
            }
        }
    }
}

/// The prefill of a chat request: the text of its last message when that is an assistant
/// message (a string, or Anthropic text blocks).
pub(crate) fn prefill_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let last = v.get("messages")?.as_array()?.last()?;
    if last.get("role")?.as_str()? != "assistant" {
        return None;
    }
    match last.get("content")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(blocks) => Some(
            blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(serde_json::Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

/// The chunks of `chunks` after the first `prefill.len()` bytes of their text, if `prefill`
/// is how that text starts.
fn rest_after(chunks: &[String], prefill: &str) -> Option<Vec<String>> {
    if !chunks.concat().starts_with(prefill) {
        return None;
    }
    let mut skip = prefill.len();
    let mut rest = Vec::new();
    for chunk in chunks {
        if skip >= chunk.len() {
            skip -= chunk.len();
            continue;
        }
        rest.push(chunk.get(skip..)?.to_owned());
        skip = 0;
    }
    Some(rest)
}

impl Continuation {
    /// The reply to a request with this `body`.
    fn answer(&self, body: &[u8]) -> Reply {
        let prefill = prefill_of(body).unwrap_or_default();
        if self.style == Style::Anthropic && prefill.ends_with(char::is_whitespace) {
            // What the Messages API says to such a prefill.
            return Reply::anthropic_error(
                400,
                "invalid_request_error",
                "messages: final assistant content cannot end with trailing whitespace",
                None,
            );
        }
        let Some(rest) = rest_after(&self.chunks, &prefill) else {
            let message = "MockProvider: the prefill is not how the scripted answer starts";
            return match self.style {
                Style::OpenAi => Self::bad_prefill_openai(message),
                Style::Anthropic => {
                    Reply::anthropic_error(400, "invalid_request_error", message, None)
                }
            };
        };
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        let mut reply = match self.style {
            Style::OpenAi => Reply::openai_stream(&self.model, &rest),
            Style::Anthropic => Reply::anthropic_stream(&self.model, &rest),
        };
        if let Content::Sse(sse) = &mut reply.content {
            for op in self.ops.iter().cloned() {
                op.apply(sse);
            }
        }
        reply
    }

    fn bad_prefill_openai(message: &str) -> Reply {
        Reply::openai_error(
            400,
            message,
            r#""invalid_request_error""#,
            r#""messages""#,
            r#""invalid_value""#,
        )
    }
}

/// A scripted event stream.
#[derive(Clone, Debug)]
pub(crate) struct Sse {
    pub(crate) events: Vec<String>,
    pub(crate) delay: Duration,
    pub(crate) end: SseEnd,
    pub(crate) templated: bool,
}

/// How a scripted event stream ends once its events are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SseEnd {
    /// The terminating chunk: a clean end of the body.
    Clean,
    /// Nothing more, the connection stays open.
    Stall,
    /// The connection closes without the terminating chunk.
    Cut,
}

impl Reply {
    fn with(status: u16, content: Content, content_type: Option<&'static str>) -> Self {
        let mut reply = Reply {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            head_delay: None,
            request_id: None,
            content,
            invalid: None,
        };
        match StatusCode::from_u16(status) {
            Ok(s) => reply.status = s,
            Err(_) => reply.invalid = Some(format!("invalid status code {status}")),
        }
        if let Some(ct) = content_type {
            reply
                .headers
                .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        reply
    }

    fn full(status: u16, body: String, templated: bool, content_type: &'static str) -> Self {
        Self::with(
            status,
            Content::Full { body, templated },
            Some(content_type),
        )
    }

    /// A JSON reply (`content-type: application/json`) with this status and body.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self::full(status, body.into(), false, "application/json")
    }

    /// `200` `text/event-stream` with exactly this body, for what a list of events cannot
    /// express (a stream that ends in the middle of a line).
    pub fn raw_sse(body: impl Into<String>) -> Self {
        Self::full(200, body.into(), false, "text/event-stream; charset=utf-8")
    }

    /// A plain-text reply (`content-type: text/plain`), e.g. the non-JSON 413 page of a CDN.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::full(status, body.into(), false, "text/plain")
    }

    /// `200`: the same as `Reply::openai_chat("mock-model", "ok")`.
    pub fn ok() -> Self {
        Self::openai_chat("mock-model", "ok")
    }

    /// Adds a response header (appended: the same name may be given more than once).
    pub fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        V: TryInto<HeaderValue>,
    {
        match (name.try_into(), value.try_into()) {
            (Ok(name), Ok(value)) => {
                self.headers.append(name, value);
            }
            (Err(_), _) => self.invalid = Some("invalid header name".to_owned()),
            (_, Err(_)) => self.invalid = Some("invalid header value".to_owned()),
        }
        self
    }

    /// Waits this long before sending the response head (for [`Reply::reset`]: before the reset).
    pub fn delay_head(mut self, delay: Duration) -> Self {
        self.head_delay = Some(delay);
        self
    }

    fn with_request_id(mut self, header: &'static str) -> Self {
        self.request_id = Some(HeaderName::from_static(header));
        self
    }

    fn with_static(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
        self
    }

    fn with_header(self, name: &'static str, value: &str) -> Self {
        match HeaderValue::from_str(value) {
            Ok(value) => {
                let mut reply = self;
                reply.headers.append(HeaderName::from_static(name), value);
                reply
            }
            Err(_) => {
                let mut reply = self;
                reply.invalid = Some(format!("invalid value for header {name}"));
                reply
            }
        }
    }

    // ---------------------------------------------------------------- successes

    /// `200`: an OpenAI `chat.completion` answering `text`, with `usage`
    /// (`prompt_tokens` 9, `completion_tokens` the number of words in `text`, at least 1) and an
    /// `x-request-id` header.
    pub fn openai_chat(model: impl AsRef<str>, text: impl AsRef<str>) -> Self {
        let (model, text) = (model.as_ref(), text.as_ref());
        let completion = words(text);
        let body = format!(
            concat!(
                r#"{{"id":"chatcmpl-mock-{seq}","object":"chat.completion","created":1700000000,"model":{model},"#,
                r#""choices":[{{"index":0,"message":{{"role":"assistant","content":{text},"refusal":null}},"#,
                r#""logprobs":null,"finish_reason":"stop"}}],"#,
                r#""usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{t}}},"#,
                r#""system_fingerprint":"fp_mock"}}"#
            ),
            seq = SEQ,
            model = json_str(model),
            text = json_str(text),
            p = PROMPT_TOKENS,
            c = completion,
            t = PROMPT_TOKENS + completion,
        );
        Self::full(200, body, true, "application/json").with_request_id("x-request-id")
    }

    /// `200`: an Anthropic `message` answering `text`, with `usage` (`input_tokens` 9,
    /// `output_tokens` the number of words in `text`, at least 1) and a `request-id` header.
    pub fn anthropic_message(model: impl AsRef<str>, text: impl AsRef<str>) -> Self {
        let (model, text) = (model.as_ref(), text.as_ref());
        let body = format!(
            concat!(
                r#"{{"id":"msg_mock_{seq}","type":"message","role":"assistant","model":{model},"#,
                r#""content":[{{"type":"text","text":{text}}}],"stop_reason":"end_turn","stop_sequence":null,"#,
                r#""usage":{{"input_tokens":{p},"output_tokens":{c}}}}}"#
            ),
            seq = SEQ,
            model = json_str(model),
            text = json_str(text),
            p = PROMPT_TOKENS,
            c = words(text),
        );
        Self::full(200, body, true, "application/json").with_request_id("request-id")
    }

    // ---------------------------------------------------------------- streams

    /// `200` `text/event-stream`: an OpenAI chat completion stream. Events, each `data: {json}`:
    /// a role-only delta, one content delta per chunk, a chunk with `finish_reason: "stop"`, a
    /// usage chunk (`choices: []`, `completion_tokens` = number of chunks), then `data: [DONE]`.
    pub fn openai_stream(model: impl AsRef<str>, chunks: &[&str]) -> Self {
        let model = model.as_ref();
        let head = format!(
            r#""id":"chatcmpl-mock-{SEQ}","object":"chat.completion.chunk","created":1700000000,"model":{}"#,
            json_str(model)
        );
        let mut events = vec![format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]}}"#
        )];
        for chunk in chunks {
            events.push(format!(
                r#"data: {{{head},"choices":[{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}]}}"#,
                json_str(chunk)
            ));
        }
        events.push(format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]}}"#
        ));
        events.push(format!(
            r#"data: {{{head},"choices":[],"usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{t}}}}}"#,
            p = PROMPT_TOKENS,
            c = chunks.len(),
            t = PROMPT_TOKENS + chunks.len(),
        ));
        events.push("data: [DONE]".to_owned());
        Self::stream(events, true).with_request_id("x-request-id")
    }

    /// `200` `text/event-stream`: an Anthropic message stream. Events (`event: NAME` then
    /// `data: {json}`): `message_start`, `content_block_start`, `ping`, one `content_block_delta`
    /// per chunk, `content_block_stop`, `message_delta` (`stop_reason: "end_turn"`, cumulative
    /// `usage.output_tokens` = number of chunks), `message_stop`.
    pub fn anthropic_stream(model: impl AsRef<str>, chunks: &[&str]) -> Self {
        let model = model.as_ref();
        let mut events = vec![
            format!(
                concat!(
                    "event: message_start\n",
                    r#"data: {{"type":"message_start","message":{{"id":"msg_mock_{seq}","type":"message","role":"assistant","#,
                    r#""model":{model},"content":[],"stop_reason":null,"stop_sequence":null,"#,
                    r#""usage":{{"input_tokens":{p},"output_tokens":1}}}}}}"#
                ),
                seq = SEQ,
                model = json_str(model),
                p = PROMPT_TOKENS,
            ),
            concat!(
                "event: content_block_start\n",
                r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#
            )
            .to_owned(),
            "event: ping\ndata: {\"type\": \"ping\"}".to_owned(),
        ];
        for chunk in chunks {
            events.push(format!(
                concat!(
                    "event: content_block_delta\n",
                    r#"data: {{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{}}}}}"#
                ),
                json_str(chunk)
            ));
        }
        events.push(
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}"
                .to_owned(),
        );
        events.push(format!(
            concat!(
                "event: message_delta\n",
                r#"data: {{"type":"message_delta","delta":{{"stop_reason":"end_turn","stop_sequence":null}},"usage":{{"output_tokens":{}}}}}"#
            ),
            chunks.len()
        ));
        events.push("event: message_stop\ndata: {\"type\":\"message_stop\"}".to_owned());
        Self::stream(events, true).with_request_id("request-id")
    }

    /// `200` `text/event-stream` with these raw events, each written followed by a blank line.
    pub fn sse(events: Vec<String>) -> Self {
        Self::stream(events, false)
    }

    fn stream(events: Vec<String>, templated: bool) -> Self {
        Self::with(
            200,
            Content::Sse(Sse {
                events,
                delay: Duration::ZERO,
                end: SseEnd::Clean,
                templated,
            }),
            Some("text/event-stream; charset=utf-8"),
        )
        .with_static("cache-control", "no-cache")
    }

    fn map_sse(mut self, op: SseOp) -> Self {
        match &mut self.content {
            Content::Sse(sse) => op.apply(sse),
            Content::Continuation(c) => c.ops.push(op),
            _ => {}
        }
        self
    }

    /// Waits this long before each event (the response head goes out at once).
    pub fn event_delay(self, delay: Duration) -> Self {
        self.map_sse(SseOp::Delay(delay))
    }

    /// Sends the first `n` events, then nothing more, keeping the connection open until the
    /// client gives up or the mock is dropped.
    pub fn stall_after(self, n: usize) -> Self {
        self.map_sse(SseOp::StallAfter(n))
    }

    /// Sends the first `n` events, then closes the connection abruptly: no terminating chunk,
    /// so the client sees a body error, never a clean end.
    pub fn cut_after(self, n: usize) -> Self {
        self.map_sse(SseOp::CutAfter(n))
    }

    /// Drops the terminal marker (`data: [DONE]`, `event: message_stop`); the finish reason
    /// stays, so the stream is complete by its finish reason alone.
    pub fn without_terminal(self) -> Self {
        self.map_sse(SseOp::WithoutTerminal)
    }

    /// Drops the finish-reason event (`finish_reason`, `stop_reason`, `finishReason`) and the
    /// terminal marker: a truncated stream that still ends cleanly at the HTTP level.
    pub fn without_finish(self) -> Self {
        self.map_sse(SseOp::WithoutFinish)
    }

    /// Sends the first `n` events, then `event` (an in-band error, written raw like the others),
    /// then ends the stream cleanly.
    pub fn error_after(self, n: usize, event: String) -> Self {
        self.map_sse(SseOp::ErrorAfter(n, event))
    }

    /// Inserts the malformed event `data: {"choices":[{` after the first `n` events; the rest
    /// of the stream follows.
    pub fn malformed_after(self, n: usize) -> Self {
        self.map_sse(SseOp::MalformedAfter(n))
    }

    /// A prefill-aware OpenAI chat stream whose canonical answer is `chunks` joined: a request
    /// without a prefill gets the whole answer (as [`Reply::openai_stream`]); a request whose
    /// last message is an assistant message (the prefill; [`RecordedRequest::prefill`]) gets
    /// the rest of the answer after it, in the same shape, as a model continuing it would. A
    /// prefill that is not how the answer starts gets a `400`. The stream modifiers apply to
    /// the stream served, whichever it is.
    ///
    /// [`RecordedRequest::prefill`]: super::RecordedRequest::prefill
    pub fn openai_continuation(model: impl AsRef<str>, chunks: &[&str]) -> Self {
        Self::continuation(Style::OpenAi, model.as_ref(), chunks)
    }

    /// The Anthropic Messages form of [`Reply::openai_continuation`]: the answer as
    /// [`Reply::anthropic_stream`]; and, as the Messages API does, a `400` for a prefill that
    /// ends with whitespace.
    pub fn anthropic_continuation(model: impl AsRef<str>, chunks: &[&str]) -> Self {
        Self::continuation(Style::Anthropic, model.as_ref(), chunks)
    }

    fn continuation(style: Style, model: &str, chunks: &[&str]) -> Self {
        Self::with(
            200,
            Content::Continuation(Continuation {
                style,
                model: model.to_owned(),
                chunks: chunks.iter().map(|c| (*c).to_owned()).collect(),
                ops: Vec::new(),
            }),
            None,
        )
    }

    /// The reply to serve for a request with `body`: a prefill-aware stream worked out, any
    /// other reply as it is. The head delay and the headers set on it are kept.
    pub(crate) fn for_request(self, body: &[u8]) -> Reply {
        let Content::Continuation(c) = &self.content else {
            return self;
        };
        let mut reply = c.answer(body);
        reply.head_delay = self.head_delay;
        for (name, value) in &self.headers {
            reply.headers.append(name.clone(), value.clone());
        }
        if reply.invalid.is_none() {
            reply.invalid = self.invalid;
        }
        reply
    }

    // ---------------------------------------------------------------- transport behaviours

    /// Reads the request, then never answers (the connection stays open until the client gives
    /// up or the mock is dropped).
    pub fn never() -> Self {
        Self::with(200, Content::Never, None)
    }

    /// Reads the request, then resets the connection (TCP RST) before any response byte.
    pub fn reset() -> Self {
        Self::with(200, Content::Reset, None)
    }

    // ---------------------------------------------------------------- OpenAI

    fn openai_error(status: u16, message: &str, kind: &str, param: &str, code: &str) -> Self {
        let body = format!(
            r#"{{"error":{{"message":{},"type":{kind},"param":{param},"code":{code}}}}}"#,
            json_str(message)
        );
        Self::full(status, body, true, "application/json").with_request_id("x-request-id")
    }

    /// `429` OpenAI rate limit: `code: rate_limit_exceeded`, `type: requests`; headers
    /// `x-ratelimit-limit-requests: 500`, `x-ratelimit-remaining-requests: 0`,
    /// `x-ratelimit-limit-tokens: 30000`, `x-ratelimit-remaining-tokens: 29950`, and when
    /// `retry_after` is given, `retry-after: {retry_after}` plus (if it is a number of seconds)
    /// `x-ratelimit-reset-requests: {retry_after}s`, so every hint agrees.
    pub fn openai_rate_limited(retry_after: Option<&str>) -> Self {
        let mut reply = Self::openai_error(
            429,
            "Rate limit reached for gpt-4o in organization org-mock on requests per min (RPM): \
             Limit 500, Used 500, Requested 1. Visit https://platform.openai.com/account/rate-limits \
             to learn more.",
            r#""requests""#,
            "null",
            r#""rate_limit_exceeded""#,
        )
        .with_static("x-ratelimit-limit-requests", "500")
        .with_static("x-ratelimit-remaining-requests", "0")
        .with_static("x-ratelimit-limit-tokens", "30000")
        .with_static("x-ratelimit-remaining-tokens", "29950");
        if let Some(value) = retry_after {
            reply = reply.with_header("retry-after", value);
            if value
                .trim()
                .parse::<f64>()
                .is_ok_and(|s| s.is_finite() && s >= 0.0)
            {
                reply =
                    reply.with_header("x-ratelimit-reset-requests", &format!("{}s", value.trim()));
            }
        }
        reply
    }

    /// `429` OpenAI "Request too large" (one request above the tokens-per-minute limit): the same
    /// `code: rate_limit_exceeded` as a rate limit, `type: tokens`, no wait hint.
    pub fn openai_request_too_large() -> Self {
        Self::openai_error(
            429,
            "Request too large for gpt-4o in organization org-mock on tokens per min (TPM): \
             Limit 30000, Requested 42000. The input or output tokens must be reduced in order \
             to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
            r#""tokens""#,
            "null",
            r#""rate_limit_exceeded""#,
        )
    }

    /// `429` OpenAI quota exhausted: `type` and `code` `insufficient_quota`.
    pub fn openai_insufficient_quota() -> Self {
        Self::openai_error(
            429,
            "You exceeded your current quota, please check your plan and billing details. For \
             more information on this error, read the docs: \
             https://platform.openai.com/docs/guides/error-codes/api-errors.",
            r#""insufficient_quota""#,
            "null",
            r#""insufficient_quota""#,
        )
    }

    /// `503` OpenAI overloaded: `code: server_is_overloaded`, `type: server_error`.
    pub fn openai_overloaded() -> Self {
        Self::openai_error(
            503,
            "The server is overloaded or not ready yet.",
            r#""server_error""#,
            "null",
            r#""server_is_overloaded""#,
        )
    }

    /// `500` OpenAI server error: `type: server_error`, `code: null`.
    pub fn openai_server_error() -> Self {
        Self::openai_error(
            500,
            "The server had an error while processing your request. Sorry about that!",
            r#""server_error""#,
            "null",
            "null",
        )
    }

    /// `400` OpenAI context overflow: `code: context_length_exceeded`.
    pub fn openai_context_length() -> Self {
        Self::openai_error(
            400,
            "This model's maximum context length is 128000 tokens. However, your messages \
             resulted in 130532 tokens. Please reduce the length of the messages.",
            r#""invalid_request_error""#,
            r#""messages""#,
            r#""context_length_exceeded""#,
        )
    }

    /// `400` OpenAI policy block: `code: content_policy_violation`.
    pub fn openai_content_policy() -> Self {
        Self::openai_error(
            400,
            "Your request was rejected as a result of our safety system. Your prompt may contain \
             text that is not allowed by our safety system.",
            r#""invalid_request_error""#,
            "null",
            r#""content_policy_violation""#,
        )
    }

    /// `401` OpenAI invalid key: `code: invalid_api_key`, `type: invalid_request_error`.
    pub fn unauthorized() -> Self {
        Self::openai_error(
            401,
            "Incorrect API key provided: sk-mock***************0000. You can find your API key at \
             https://platform.openai.com/account/api-keys.",
            r#""invalid_request_error""#,
            "null",
            r#""invalid_api_key""#,
        )
    }

    /// `429` OpenAI "slow down" (a transient rate limit after a sudden rise in traffic):
    /// `code: slow_down`, `type: rate_limit_error`, no wait hint.
    pub fn openai_slow_down() -> Self {
        Self::openai_error(
            429,
            "Please reduce your rate of requests.",
            r#""rate_limit_error""#,
            "null",
            r#""slow_down""#,
        )
    }

    /// `429` OpenAI prepaid credits used up (terminal): `code: credit_balance_exhausted`,
    /// `type: invalid_request_error`, no wait hint.
    pub fn openai_credit_balance_exhausted() -> Self {
        Self::openai_error(
            429,
            "Your credit balance is exhausted. Add credits at \
             https://platform.openai.com/settings/organization/billing to continue.",
            r#""invalid_request_error""#,
            "null",
            r#""credit_balance_exhausted""#,
        )
    }

    /// `429` OpenAI spend or usage cap reached (terminal): `code: {code}`,
    /// `type: invalid_request_error`, no wait hint. `code` is one of
    /// `organization_spend_limit_exceeded`, `project_spend_limit_exceeded` and
    /// `organization_usage_limit_exceeded`; the message names the organisation or the project
    /// to match (any other code gets a generic spend-limit message).
    pub fn openai_spend_limit(code: &str) -> Self {
        let message = match code {
            "organization_spend_limit_exceeded" => {
                "Your organization has reached its spend limit. Raise the limit at \
                 https://platform.openai.com/settings/organization/limits to continue."
            }
            "project_spend_limit_exceeded" => {
                "Your project has reached its spend limit. Raise the project's budget at \
                 https://platform.openai.com/settings/proj/limits to continue."
            }
            "organization_usage_limit_exceeded" => {
                "Your organization has reached its usage limit. Raise the limit at \
                 https://platform.openai.com/settings/organization/limits to continue."
            }
            _ => "You have reached your spend limit.",
        };
        Self::openai_error(
            429,
            message,
            r#""invalid_request_error""#,
            "null",
            &json_str(code),
        )
    }

    /// `400` OpenAI caller defect: `code: invalid_value`, `type: invalid_request_error`,
    /// `param: temperature`.
    pub fn openai_bad_request() -> Self {
        Self::openai_error(
            400,
            "Invalid value for 'temperature': expected a number <= 2.",
            r#""invalid_request_error""#,
            r#""temperature""#,
            r#""invalid_value""#,
        )
    }

    /// `404` OpenAI unknown model: `code: model_not_found`, `type: invalid_request_error`.
    pub fn openai_model_not_found() -> Self {
        Self::openai_error(
            404,
            "The model `gpt-9` does not exist or you do not have access to it.",
            r#""invalid_request_error""#,
            "null",
            r#""model_not_found""#,
        )
    }

    /// `403` OpenAI region not supported: `code: unsupported_country_region_territory`,
    /// `type: request_forbidden`.
    pub fn openai_unsupported_region() -> Self {
        Self::openai_error(
            403,
            "Country, region, or territory not supported",
            r#""request_forbidden""#,
            "null",
            r#""unsupported_country_region_territory""#,
        )
    }

    // ---------------------------------------------------------------- Azure OpenAI

    /// `429` Azure OpenAI rate limit: `{"error":{"code":"429","message":"… Please retry after N
    /// seconds. …"}}` (N = `retry_after_ms` rounded up to seconds) with
    /// `retry-after-ms: {retry_after_ms}`.
    pub fn azure_rate_limited(retry_after_ms: &str) -> Self {
        let seconds = retry_after_ms
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map(|ms| (ms / 1000.0).ceil() as u64)
            .unwrap_or(1);
        let message = format!(
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version \
             2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. \
             Please retry after {seconds} seconds. Please go here: https://aka.ms/oai/quotaincrease \
             if you would like to further increase the default rate limit."
        );
        let body = format!(
            r#"{{"error":{{"code":"429","message":{}}}}}"#,
            json_str(&message)
        );
        Self::full(429, body, true, "application/json")
            .with_request_id("x-request-id")
            .with_header("retry-after-ms", retry_after_ms)
    }

    /// `400` Azure OpenAI content filter: `code: content_filter`, `type: null`,
    /// `innererror.code: ResponsibleAIPolicyViolation` with a `content_filter_result`.
    pub fn azure_content_filter() -> Self {
        let body = concat!(
            r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's "#,
            r#"content management policy. Please modify your prompt and retry. To learn more about our "#,
            r#"content filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766","#,
            r#""type":null,"param":"prompt","code":"content_filter","status":400,"#,
            r#""innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"#,
            r#""hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"#,
            r#""sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":true,"severity":"medium"}}}}}"#
        );
        Self::full(400, body.to_owned(), true, "application/json").with_request_id("x-request-id")
    }

    // ---------------------------------------------------------------- Anthropic

    fn anthropic_error(status: u16, kind: &str, message: &str, details: Option<&str>) -> Self {
        let details = details
            .map(|d| format!(r#","details":{d}"#))
            .unwrap_or_default();
        let body = format!(
            r#"{{"type":"error","error":{{"type":"{kind}","message":{}{details}}},"request_id":"req_mock_{SEQ}"}}"#,
            json_str(message)
        );
        Self::full(status, body, true, "application/json").with_request_id("request-id")
    }

    /// `429` Anthropic rate limit: `rate_limit_error` with `retry-after: {retry_after}` and
    /// `anthropic-ratelimit-requests-limit: 50`, `anthropic-ratelimit-requests-remaining: 0`.
    pub fn anthropic_rate_limited(retry_after: &str) -> Self {
        Self::anthropic_error(
            429,
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 50 requests per \
             minute. For details, refer to: https://docs.anthropic.com/en/api/rate-limits. You can \
             see the response headers for current usage.",
            None,
        )
        .with_header("retry-after", retry_after)
        .with_static("anthropic-ratelimit-requests-limit", "50")
        .with_static("anthropic-ratelimit-requests-remaining", "0")
    }

    /// `529` Anthropic overloaded: `overloaded_error`, message `Overloaded`.
    pub fn anthropic_overloaded() -> Self {
        Self::anthropic_error(529, "overloaded_error", "Overloaded", None)
    }

    /// `429` Anthropic spend limit: `rate_limit_error` with
    /// `details.error_code: enforced_spend_limit_reached` and no `retry-after`.
    pub fn anthropic_spend_limit() -> Self {
        Self::anthropic_error(
            429,
            "rate_limit_error",
            "You have reached your specified workspace API usage limits. You will regain access \
             on 2025-09-01 at 00:00 UTC.",
            Some(r#"{"error_code":"enforced_spend_limit_reached"}"#),
        )
    }

    /// `400` Anthropic context overflow: `invalid_request_error`,
    /// `prompt is too long: 210000 tokens > 200000 maximum`.
    pub fn anthropic_prompt_too_long() -> Self {
        Self::anthropic_error(
            400,
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum",
            None,
        )
    }

    /// `402` Anthropic `billing_error`.
    pub fn anthropic_billing() -> Self {
        Self::anthropic_error(
            402,
            "billing_error",
            "Your credit balance is too low to access the Anthropic API. Please go to Plans & \
             Billing to upgrade or purchase credits.",
            None,
        )
    }

    /// `403` Anthropic `permission_error`.
    pub fn forbidden() -> Self {
        Self::anthropic_error(
            403,
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
            None,
        )
    }

    /// `401` Anthropic invalid key: `authentication_error`, message `invalid x-api-key`.
    pub fn anthropic_unauthorized() -> Self {
        Self::anthropic_error(401, "authentication_error", "invalid x-api-key", None)
    }

    /// `400` Anthropic self-set spend limit (terminal): `invalid_request_error` whose message
    /// begins `You have reached your specified API usage limits`.
    pub fn anthropic_usage_limit() -> Self {
        Self::anthropic_error(
            400,
            "invalid_request_error",
            "You have reached your specified API usage limits. You will regain access on \
             2025-09-01 at 00:00 UTC.",
            None,
        )
    }

    /// `500` Anthropic overload reported as `api_error` with message `Overloaded` (not a 529).
    pub fn anthropic_api_overloaded() -> Self {
        Self::anthropic_error(500, "api_error", "Overloaded", None)
    }

    /// `500` Anthropic server error: `api_error`, message `Internal server error`.
    pub fn anthropic_server_error() -> Self {
        Self::anthropic_error(500, "api_error", "Internal server error", None)
    }

    /// `504` Anthropic `timeout_error`, message `Request timed out`.
    pub fn anthropic_timeout() -> Self {
        Self::anthropic_error(504, "timeout_error", "Request timed out", None)
    }

    /// `413` Anthropic `request_too_large` (the request exceeds the API's byte limit).
    pub fn anthropic_request_too_large() -> Self {
        Self::anthropic_error(
            413,
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
            None,
        )
    }

    // ---------------------------------------------------------------- Gemini

    fn gemini_quota(quota_id: &str, metric: &str, retry_delay: Option<&str>) -> Self {
        let retry = retry_delay
            .map(|d| {
                format!(
                    r#",{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":{}}}"#,
                    json_str(d)
                )
            })
            .unwrap_or_default();
        let body = format!(
            concat!(
                r#"{{"error":{{"code":429,"message":"You exceeded your current quota, please check your plan "#,
                r#"and billing details. For more information on this error, head to: "#,
                r#"https://ai.google.dev/gemini-api/docs/rate-limits.","status":"RESOURCE_EXHAUSTED","details":["#,
                r#"{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{{"#,
                r#""quotaMetric":"generativelanguage.googleapis.com/{metric}","quotaId":"{quota_id}","#,
                r#""quotaDimensions":{{"location":"global","model":"gemini-2.0-flash"}},"quotaValue":"15"}}]}},"#,
                r#"{{"@type":"type.googleapis.com/google.rpc.Help","links":[{{"description":"Learn more about "#,
                r#"Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}}]}}{retry}]}}}}"#
            ),
            metric = metric,
            quota_id = quota_id,
            retry = retry,
        );
        Self::full(429, body, false, "application/json")
    }

    /// `429` Gemini `RESOURCE_EXHAUSTED` (a transient rate limit): a `QuotaFailure` with quota id
    /// `GenerateRequestsPerMinutePerProjectPerModel-FreeTier` and a `RetryInfo` with
    /// `retryDelay: {retry_delay}` (e.g. `"15s"`).
    pub fn gemini_resource_exhausted(retry_delay: &str) -> Self {
        Self::gemini_quota(
            "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
            "generate_content_free_tier_requests",
            Some(retry_delay),
        )
    }

    /// `429` Gemini `RESOURCE_EXHAUSTED` for the daily quota (terminal): a `QuotaFailure` with
    /// quota id `GenerateRequestsPerDayPerProjectPerModel-FreeTier`, no `RetryInfo`.
    pub fn gemini_daily_quota() -> Self {
        Self::gemini_quota(
            "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            "generate_content_free_tier_requests",
            None,
        )
    }

    /// `503` Gemini `UNAVAILABLE`.
    pub fn gemini_unavailable() -> Self {
        Self::full(
            503,
            r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#
                .to_owned(),
            false,
            "application/json",
        )
    }

    /// `{"error":{"code":STATUS,"message":…,"status":…[,"details":[…]]}}` without headers.
    fn gemini_error(status: u16, message: &str, kind: &str, details: Option<&str>) -> Self {
        let details = details
            .map(|d| format!(r#","details":{d}"#))
            .unwrap_or_default();
        let body = format!(
            r#"{{"error":{{"code":{status},"message":{},"status":"{kind}"{details}}}}}"#,
            json_str(message)
        );
        Self::full(status, body, false, "application/json")
    }

    /// `402` Gemini prepayment credits depleted (terminal): `status: FAILED_PRECONDITION`.
    pub fn gemini_payment_required() -> Self {
        Self::gemini_error(
            402,
            "Your prepayment credits are depleted. Please go to AI Studio at \
             https://ai.studio/projects to manage your project and billing.",
            "FAILED_PRECONDITION",
            None,
        )
    }

    /// `400` Gemini invalid key: `status: INVALID_ARGUMENT` with an `ErrorInfo` whose `reason`
    /// is `API_KEY_INVALID`.
    pub fn gemini_api_key_invalid() -> Self {
        Self::gemini_error(
            400,
            "API key not valid. Please pass a valid API key.",
            "INVALID_ARGUMENT",
            Some(concat!(
                r#"[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","#,
                r#""domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]"#
            )),
        )
    }

    /// `400` Gemini context overflow: `status: INVALID_ARGUMENT`, message `The input token count
    /// (1231284) exceeds the maximum number of tokens allowed (1048576).`
    pub fn gemini_context_overflow() -> Self {
        Self::gemini_error(
            400,
            "The input token count (1231284) exceeds the maximum number of tokens allowed \
             (1048576).",
            "INVALID_ARGUMENT",
            None,
        )
    }

    /// `403` Gemini `PERMISSION_DENIED`.
    pub fn gemini_permission_denied() -> Self {
        Self::gemini_error(
            403,
            "Method doesn't allow unregistered callers (callers without established identity). \
             Please use API Key or other form of API consumer identity to call this API.",
            "PERMISSION_DENIED",
            None,
        )
    }

    /// `500` Gemini `INTERNAL`.
    pub fn gemini_internal() -> Self {
        Self::gemini_error(
            500,
            "An internal error has occurred. Please retry or report in \
             https://developers.generativeai.google/guide/troubleshooting",
            "INTERNAL",
            None,
        )
    }

    /// `504` Gemini `DEADLINE_EXCEEDED`.
    pub fn gemini_deadline_exceeded() -> Self {
        Self::gemini_error(
            504,
            "Deadline expired before operation could complete.",
            "DEADLINE_EXCEEDED",
            None,
        )
    }

    /// `429` Vertex AI (e.g. Vertex-hosted Claude) quota: the Google error object wrapped in a
    /// one-element JSON array, `[{"error":{"code":429,…,"status":"RESOURCE_EXHAUSTED"}}]`, no
    /// `details`, no wait hint.
    pub fn vertex_resource_exhausted() -> Self {
        Self::full(
            429,
            concat!(
                r#"[{"error":{"code":429,"message":"Quota exceeded for "#,
                r#"aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: "#,
                r#"anthropic-claude-3-5-sonnet. Please submit a quota increase request.","#,
                r#""status":"RESOURCE_EXHAUSTED"}}]"#
            )
            .to_owned(),
            false,
            "application/json",
        )
    }

    // ---------------------------------------------------------------- others

    /// `429` Bedrock throttling: `{"message":"Too many requests, please wait before trying
    /// again."}` with `x-amzn-ErrorType: ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/`
    /// and an `x-amzn-RequestId` header.
    pub fn bedrock_throttling() -> Self {
        Self::full(
            429,
            r#"{"message":"Too many requests, please wait before trying again."}"#.to_owned(),
            false,
            "application/json",
        )
        .with_static(
            "x-amzn-errortype",
            "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/",
        )
        .with_request_id("x-amzn-requestid")
    }

    /// `498` Groq capacity exceeded: `code: capacity_exceeded`.
    pub fn groq_capacity_exceeded() -> Self {
        Self::openai_error(
            498,
            "The flex tier is at capacity for this model. Please try again later.",
            r#""capacity_exceeded""#,
            "null",
            r#""capacity_exceeded""#,
        )
    }

    /// `429` Mistral rate limit: `type: rate_limited`, `code: null`.
    pub fn mistral_rate_limited() -> Self {
        Self::openai_error(
            429,
            "Requests rate limit exceeded",
            r#""rate_limited""#,
            "null",
            "null",
        )
    }

    /// `402` OpenRouter out of credits: OpenAI-like body with the numeric `code: 402`.
    pub fn openrouter_no_credits() -> Self {
        Self::full(
            402,
            concat!(
                r#"{"error":{"message":"Insufficient credits. Add more using https://openrouter.ai/settings/credits","#,
                r#""code":402,"metadata":{}},"user_id":"user_mock"}"#
            )
            .to_owned(),
            false,
            "application/json",
        )
    }

    /// `503` Bedrock unavailable: `{"message":"Bedrock is unable to process your request."}`
    /// with `x-amzn-ErrorType: ServiceUnavailableException:http://internal.amazon.com/coral/com.amazon.bedrock/`
    /// and an `x-amzn-RequestId` header.
    pub fn bedrock_unavailable() -> Self {
        Self::full(
            503,
            r#"{"message":"Bedrock is unable to process your request."}"#.to_owned(),
            false,
            "application/json",
        )
        .with_static(
            "x-amzn-errortype",
            "ServiceUnavailableException:http://internal.amazon.com/coral/com.amazon.bedrock/",
        )
        .with_request_id("x-amzn-requestid")
    }

    /// `403` OpenRouter moderation: numeric `code: 403` and `metadata` with the flagged
    /// `reasons` and `flagged_input`.
    pub fn openrouter_moderation() -> Self {
        Self::full(
            403,
            concat!(
                r#"{"error":{"code":403,"message":"openai/gpt-4o requires moderation on OpenRouter. "#,
                r#"Your input was flagged for \"harassment\". No credits were charged.","#,
                r#""metadata":{"reasons":["harassment"],"flagged_input":"...","provider_name":"OpenAI","#,
                r#""model_slug":"openai/gpt-4o"}}}"#
            )
            .to_owned(),
            false,
            "application/json",
        )
    }

    /// `422` unprocessable request: Mistral's flat body (`object: error`,
    /// `type: invalid_request_error`, `code: null`) whose `message` is a validation object.
    pub fn unprocessable() -> Self {
        Self::full(
            422,
            concat!(
                r#"{"object":"error","message":{"detail":[{"type":"missing","loc":["body","messages"],"#,
                r#""msg":"Field required","input":{"model":"mistral-large-latest"}}]},"#,
                r#""type":"invalid_request_error","param":null,"code":null}"#
            )
            .to_owned(),
            false,
            "application/json",
        )
    }

    /// `409` conflict (OpenAI-style body, `code: conflict`, `type: invalid_request_error`) with
    /// an `x-request-id` header; the official SDKs retry it.
    pub fn conflict() -> Self {
        Self::openai_error(
            409,
            "Another request with the same idempotency key is in progress.",
            r#""invalid_request_error""#,
            "null",
            r#""conflict""#,
        )
    }

    // ---------------------------------------------------------------- gateways and CDNs

    /// An nginx-style HTML error page (`content-type: text/html`) for `status` and `title`.
    fn html_page(status: u16, title: &str, server: &str) -> Self {
        let body = format!(
            "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n\
             <center><h1>{title}</h1></center>\r\n<hr><center>{server}</center>\r\n\
             </body>\r\n</html>\r\n"
        );
        Self::full(status, body, false, "text/html")
    }

    /// `502` from a gateway in front of the provider: nginx's HTML page
    /// (`content-type: text/html`, title `502 Bad Gateway`), no provider fields.
    pub fn bad_gateway() -> Self {
        Self::html_page(502, "502 Bad Gateway", "nginx")
    }

    /// `504` from a gateway in front of the provider: nginx's HTML page
    /// (`content-type: text/html`, title `504 Gateway Time-out`), no provider fields.
    pub fn gateway_timeout() -> Self {
        Self::html_page(504, "504 Gateway Time-out", "nginx")
    }

    /// `413` from a CDN before the request reaches the provider: Cloudflare's non-JSON HTML
    /// page (`content-type: text/html`, title `413 Request Entity Too Large`).
    pub fn cdn_request_too_large() -> Self {
        Self::html_page(413, "413 Request Entity Too Large", "cloudflare")
    }
}

/// `s` as a JSON string literal, quotes included.
pub(crate) fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn words(text: &str) -> usize {
    text.split_whitespace().count().max(1)
}

/// `data: [DONE]`, `event: message_stop` (or its data) and `event: response.completed`.
fn is_terminal(event: &str) -> bool {
    event.lines().any(|line| {
        let line = line.trim();
        let data = line.strip_prefix("data:").map(str::trim);
        data == Some("[DONE]")
            || line == "event: message_stop"
            || line == "event: response.completed"
            || data.is_some_and(|d| squeeze(d).contains(r#""type":"message_stop""#))
    })
}

/// An event carrying a finish reason (`finish_reason`, `stop_reason` or `finishReason` with a
/// string value; `null` is no finish).
fn is_finish(event: &str) -> bool {
    let event = squeeze(event);
    [
        "\"finish_reason\":\"",
        "\"stop_reason\":\"",
        "\"finishReason\":\"",
    ]
    .iter()
    .any(|key| event.contains(key))
}

/// The text without spaces after `:`, so `"a": "b"` and `"a":"b"` compare alike.
fn squeeze(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut after_colon = false;
    for c in s.chars() {
        if after_colon && c == ' ' {
            continue;
        }
        after_colon = c == ':';
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(reply: &Reply) -> Vec<String> {
        match &reply.content {
            Content::Sse(sse) => sse.events.clone(),
            other => panic!("not a stream: {other:?}"),
        }
    }

    #[test]
    fn terminal_and_finish_detection() {
        assert!(is_terminal("data: [DONE]"));
        assert!(is_terminal(
            "event: message_stop\ndata: {\"type\":\"message_stop\"}"
        ));
        assert!(is_terminal("data: {\"type\": \"message_stop\"}"));
        assert!(!is_terminal("data: {\"choices\":[]}"));
        assert!(is_finish(r#"data: {"choices":[{"finish_reason":"stop"}]}"#));
        assert!(is_finish(
            r#"data: {"choices":[{"finish_reason": "length"}]}"#
        ));
        assert!(!is_finish(r#"data: {"choices":[{"finish_reason":null}]}"#));
        assert!(!is_finish(r#"data: {"message":{"stop_reason":null}}"#));
        assert!(is_finish(
            r#"data: {"candidates":[{"finishReason":"STOP"}]}"#
        ));
    }

    #[test]
    fn modifiers_apply_in_call_order() {
        let base = Reply::openai_stream("m", &["a", "b"]);
        assert_eq!(events(&base).len(), 6);
        let r = base.clone().without_finish();
        assert_eq!(events(&r).len(), 4);
        let r = base.clone().malformed_after(1).cut_after(2);
        assert_eq!(events(&r)[1], r#"data: {"choices":[{"#);
        assert_eq!(events(&r).len(), 2);
        let r = base.clone().error_after(10, "data: {\"error\":{}}".into());
        assert_eq!(events(&r).len(), 7);
        // No effect on a reply that is not a stream.
        let r = Reply::ok().stall_after(1);
        assert!(matches!(r.content, Content::Full { .. }));
    }

    #[test]
    fn invalid_input_is_recorded_not_panicked() {
        assert!(Reply::json(1000, "{}").invalid.is_some());
        assert!(Reply::ok().header("bad name", "v").invalid.is_some());
        assert!(Reply::ok().header("x-ok", "bad\nvalue").invalid.is_some());
        assert!(
            Reply::anthropic_rate_limited("bad\nvalue")
                .invalid
                .is_some()
        );
        assert!(Reply::ok().header("x-ok", "v").invalid.is_none());
    }

    #[test]
    fn user_text_is_escaped() {
        let Content::Full { body, .. } = Reply::openai_chat("m\"", "a \"quoted\"\n\u{0}").content
        else {
            panic!("not full")
        };
        let body = body.replace(SEQ, "1");
        let v: serde_json::Value = serde_json::from_str(&body).expect("valid json");
        assert_eq!(v["choices"][0]["message"]["content"], "a \"quoted\"\n\u{0}");
        assert_eq!(v["model"], "m\"");
    }
}
