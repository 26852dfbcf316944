//! What the events of a model API's stream mean: where the first token is, how the stream
//! ends (terminal marker, finish reason, policy block), whether the provider sent an error after
//! its 200, and the usage it reports. A payload is parsed as JSON only when a cheap look at its
//! bytes says it may carry a finish reason, usage or an error — the final few events of a
//! stream, not every delta.

use serde_json::Value;

use super::{Frame, Framer};
use crate::attempt_log::Usage;
use crate::classify::{Classification, FailureClass, SharedClassifier, classify_stream_error};

/// What an event means for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// Carries output: a text, reasoning or tool-call delta. The first one is the first token.
    Content,
    /// Keeps the connection alive and means nothing else (Anthropic `ping`, unknown event types).
    KeepAlive,
    /// A `:` comment line (OpenRouter's `: OPENROUTER PROCESSING`); a keep-alive too.
    Comment,
    /// Any other well-formed event: a role-only delta, `message_start`, a final chunk, `[DONE]`.
    Other,
    /// A payload that looks like JSON but is not (cut short, unbalanced). Passed on, counted.
    Malformed,
}

/// A finish reason seen in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finish {
    /// The provider's value (`stop`, `end_turn`, `content_filter`, `SAFETY`, …).
    pub(crate) reason: String,
    /// Whether it is a policy or safety block (`content_filter`, `refusal`, `SAFETY`, …).
    pub(crate) blocked: bool,
}

/// Token counts reported by one event; later events replace what they report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct UsagePart {
    pub(crate) input: Option<u64>,
    pub(crate) output: Option<u64>,
}

impl UsagePart {
    /// Takes the counts `later` reports over the ones seen so far (providers report cumulative
    /// counts, Anthropic input tokens in `message_start` and output tokens in `message_delta`).
    pub(crate) fn merge(&mut self, later: UsagePart) {
        if later.input.is_some() {
            self.input = later.input;
        }
        if later.output.is_some() {
            self.output = later.output;
        }
    }

    /// The usage, if anything was reported.
    pub(crate) fn usage(&self) -> Option<Usage> {
        (self.input.is_some() || self.output.is_some())
            .then(|| Usage::new(self.input.unwrap_or(0), self.output.unwrap_or(0)))
    }
}

/// One event, as the guard sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub(crate) kind: EventKind,
    /// The stream's terminal marker: `data: [DONE]`, `message_stop`, `response.completed`.
    pub(crate) terminal: bool,
    /// A finish reason.
    pub(crate) finish: Option<Finish>,
    /// An in-band error, classified like its HTTP equivalent.
    pub(crate) error: Option<Classification>,
    /// Token counts.
    pub(crate) usage: Option<UsagePart>,
}

impl SseEvent {
    fn of(kind: EventKind) -> Self {
        Self {
            kind,
            terminal: false,
            finish: None,
            error: None,
            usage: None,
        }
    }

    fn terminal() -> Self {
        Self {
            terminal: true,
            ..Self::of(EventKind::Other)
        }
    }

    fn error(c: Classification) -> Self {
        Self {
            error: Some(c),
            ..Self::of(EventKind::Other)
        }
    }
}

/// The events of a model API's stream, as the guard sees them: the framing, then what each
/// event means.
#[derive(Debug, Default)]
pub(crate) struct Scanner {
    pub(crate) framer: Framer,
    /// Classifies in-band errors; the default classifier's rules when `None`.
    classifier: Option<SharedClassifier>,
}

impl Scanner {
    /// A scanner at the start of a stream, classifying in-band errors by the default rules.
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A scanner that classifies in-band errors with `classifier`.
    pub(crate) fn with_classifier(classifier: SharedClassifier) -> Self {
        Self {
            classifier: Some(classifier),
            ..Self::default()
        }
    }

    /// A scanner that holds events of up to `max` bytes.
    pub(crate) fn with_limit(max: usize) -> Self {
        Self {
            framer: Framer::with_limit(max),
            classifier: None,
        }
    }

    /// Scans the next chunk, reporting every event it completes.
    pub(crate) fn feed(&mut self, chunk: &[u8], on_event: &mut impl FnMut(SseEvent)) {
        let classifier = self.classifier.as_ref();
        self.framer
            .feed(chunk, &mut |frame| on_event(meaning(frame, classifier)));
    }

    /// The stream ended: what is left of it is scanned.
    pub(crate) fn finish(&mut self, on_event: &mut impl FnMut(SseEvent)) {
        let classifier = self.classifier.as_ref();
        self.framer
            .finish(&mut |frame| on_event(meaning(frame, classifier)));
    }

    /// Like [`feed`](Self::feed), handing over each frame with what it means: for a layer that
    /// rewrites events, not only watches them.
    pub(crate) fn feed_frames(
        &mut self,
        chunk: &[u8],
        on_event: &mut impl FnMut(Frame<'_>, SseEvent),
    ) {
        let classifier = self.classifier.as_ref();
        self.framer.feed(chunk, &mut |frame| {
            on_event(frame, meaning(frame, classifier))
        });
    }

    /// Like [`finish`](Self::finish), with the frames.
    pub(crate) fn finish_frames(&mut self, on_event: &mut impl FnMut(Frame<'_>, SseEvent)) {
        let classifier = self.classifier.as_ref();
        self.framer
            .finish(&mut |frame| on_event(frame, meaning(frame, classifier)));
    }

    /// See [`Framer::rest`].
    pub(crate) fn rest(&self) -> u64 {
        self.framer.rest()
    }
}

/// What one frame of the stream means.
fn meaning(frame: Frame<'_>, classifier: Option<&SharedClassifier>) -> SseEvent {
    match frame {
        Frame::Comment => SseEvent::of(EventKind::Comment),
        Frame::Oversized => SseEvent::of(EventKind::Malformed),
        Frame::Event { name, data, .. } => {
            let in_band = |data: &[u8]| match classifier {
                Some(c) => c.classify_stream_error(data),
                None => classify_stream_error(data),
            };
            classify_event(name, data, &in_band)
        }
    }
}

/// What one complete event means.
///
/// `in_band` classifies the payload of an event that is an error (`None`: a server error).
pub(crate) fn classify_event(name: &[u8], data: &[u8], in_band: &InBand<'_>) -> SseEvent {
    let data = data.trim_ascii();
    let json_like = matches!(data.first(), Some(b'{' | b'['));
    let name = match name.trim_ascii() {
        b"" | b"message" => leading_type(data).unwrap_or(b""),
        n => n,
    };
    // One pass tells whether a JSON-like payload is well formed and what its keys say.
    let facts = if json_like { Facts::of(data) } else { None };
    if json_like && facts.is_none() && data != b"[DONE]" {
        // An error event stays an error even when its payload is cut short.
        if name == b"error" {
            return SseEvent::error(in_band_classification(in_band, data));
        }
        return SseEvent::of(EventKind::Malformed);
    }
    match name {
        b"" => generic_event(data, facts, in_band),
        b"ping" => SseEvent::of(EventKind::KeepAlive),
        b"error" | b"response.failed" => SseEvent::error(in_band_classification(in_band, data)),
        b"message_start" => SseEvent {
            usage: parse(data).and_then(|v| usage_of(&v)),
            ..SseEvent::of(EventKind::Other)
        },
        b"message_delta" => anthropic_message_delta(data),
        b"message_stop" | b"response.completed" => SseEvent {
            usage: parse(data).and_then(|v| usage_of(&v)),
            ..SseEvent::terminal()
        },
        b"content_block_delta" => SseEvent::of(EventKind::Content),
        b"content_block_start" | b"content_block_stop" => SseEvent::of(EventKind::Other),
        b"response.incomplete" => responses_incomplete(data),
        n if n.starts_with(b"response.") && n.ends_with(b".delta") => {
            SseEvent::of(EventKind::Content)
        }
        n if n.starts_with(b"response.") => SseEvent::of(EventKind::Other),
        // Unknown event types are keep-alives, never errors.
        _ => SseEvent::of(EventKind::KeepAlive),
    }
}

/// OpenAI-compatible chunks, Gemini chunks, `[DONE]`, and anything else without a type.
///
/// `facts` is `None` when the payload is not JSON-like.
fn generic_event(data: &[u8], facts: Option<Facts<'_>>, in_band: &InBand<'_>) -> SseEvent {
    if data == b"[DONE]" {
        return SseEvent::terminal();
    }
    let Some(facts) = facts else {
        return SseEvent::of(EventKind::Other);
    };
    // A top-level `error` object (OpenAI-compatible, OpenRouter, Gemini, Vertex's array wrap).
    if facts.error_object {
        match parse(data) {
            Some(v) if top_level(&v).get("error").is_some_and(is_error) => {
                return SseEvent::error(in_band_classification(in_band, data));
            }
            Some(_) => {}
            None => return SseEvent::of(EventKind::Malformed),
        }
    }
    let finish = facts.finish();
    if finish.as_ref().is_some_and(|f| f.reason == "error") {
        // OpenRouter's `finish_reason: "error"` without its error object.
        return SseEvent::error(Classification::failure(FailureClass::ServerError));
    }
    // Only the final events carry usage worth reading; Gemini repeats it in every chunk.
    let usage = if finish.is_some() || facts.usage_object {
        match parse(data) {
            Some(v) => usage_of(top_level(&v)),
            None => return SseEvent::of(EventKind::Malformed),
        }
    } else {
        None
    };
    SseEvent {
        kind: if facts.content {
            EventKind::Content
        } else {
            EventKind::Other
        },
        terminal: false,
        finish,
        error: None,
        usage,
    }
}

/// What one pass over a JSON payload's keys tells: enough to decide whether to parse it.
#[derive(Debug, Default)]
struct Facts<'a> {
    /// An `"error": {` or a non-blank `"error": "…"` anywhere (whether it is top-level is
    /// checked by parsing).
    error_object: bool,
    /// A non-null `"usage": {`.
    usage_object: bool,
    /// Output: a non-empty text, reasoning or refusal string, or a tool call. OpenAI's first,
    /// role-only delta carries `"content":""` and is not output.
    content: bool,
    finish_reason: Option<&'a [u8]>,
    gemini_finish: Option<&'a [u8]>,
    block_reason: Option<&'a [u8]>,
}

impl<'a> Facts<'a> {
    /// One pass over `data`: every string is skipped whole, so a key-like text inside a string
    /// value never counts; each string followed by `:` is a key, looked at with its value.
    /// `None` when `data` is not one balanced JSON object or array: brackets matched outside
    /// strings, strings closed, nothing after the end. Not a full validation (the few payloads
    /// the guard acts on are parsed for real), and no allocation.
    fn of(data: &'a [u8]) -> Option<Self> {
        let mut facts = Facts::default();
        // One bit per open bracket: 1 for `{`, 0 for `[`; deeper than 64 levels is not
        // type-checked.
        let mut stack: u64 = 0;
        let mut depth: u32 = 0;
        let mut closed = false;
        let mut i = 0;
        while let Some(&b) = data.get(i) {
            i += 1;
            if closed {
                if !b.is_ascii_whitespace() {
                    return None;
                }
                continue;
            }
            match b {
                b'"' => {
                    let len = string_len(&data[i..])?;
                    let key = &data[i..i + len];
                    i += len + 1;
                    if let Some(value) = data[i..].trim_ascii_start().strip_prefix(b":") {
                        facts.key(key, value.trim_ascii_start());
                    }
                }
                b'{' | b'[' => {
                    if depth < 64 {
                        stack = (stack << 1) | u64::from(b == b'{');
                    }
                    depth += 1;
                }
                b'}' | b']' => {
                    if depth == 0 {
                        return None;
                    }
                    depth -= 1;
                    if depth < 64 {
                        let object = stack & 1 == 1;
                        if object != (b == b'}') {
                            return None;
                        }
                        stack >>= 1;
                    }
                    closed = depth == 0;
                }
                _ => {}
            }
        }
        closed.then_some(facts)
    }

    fn key(&mut self, key: &[u8], value: &'a [u8]) {
        match key {
            // An object, or a message string (`{"error":"…"}`, as TGI sends mid-stream).
            b"error" => {
                self.error_object |= value.first() == Some(&b'{')
                    || string_value(value).is_some_and(|s| !s.trim_ascii().is_empty());
            }
            b"usage" => self.usage_object |= value.first() == Some(&b'{'),
            b"content" | b"text" | b"reasoning_content" | b"reasoning" | b"refusal" => {
                // A non-empty string: an opening quote not followed by the closing one. The
                // scan that skips the string checks it is closed, so it is not scanned twice.
                self.content |= value.starts_with(b"\"") && value.get(1) != Some(&b'"');
            }
            b"tool_calls" | b"function_call" | b"functionCall" => {
                self.content |= matches!(value.first(), Some(b'{' | b'['));
            }
            // An empty reason is no finish: some servers send `"finish_reason":""` on every
            // chunk until the last.
            b"finish_reason" => {
                self.finish_reason = self.finish_reason.or_else(|| reason(value));
            }
            b"finishReason" => {
                self.gemini_finish = self.gemini_finish.or_else(|| reason(value));
            }
            b"blockReason" => self.block_reason = self.block_reason.or_else(|| reason(value)),
            _ => {}
        }
    }

    /// A finish reason of an OpenAI-compatible or Gemini chunk.
    fn finish(&self) -> Option<Finish> {
        if let Some(r) = self.finish_reason {
            return Some(Finish {
                blocked: r == b"content_filter",
                reason: lossy(r),
            });
        }
        if let Some(r) = self.gemini_finish {
            return Some(Finish {
                blocked: matches!(
                    r,
                    b"SAFETY" | b"BLOCKLIST" | b"PROHIBITED_CONTENT" | b"SPII" | b"IMAGE_SAFETY"
                ),
                reason: lossy(r),
            });
        }
        // Gemini blocks a prompt with `promptFeedback.blockReason` and no candidates.
        self.block_reason.map(|r| Finish {
            reason: lossy(r),
            blocked: true,
        })
    }
}

fn anthropic_message_delta(data: &[u8]) -> SseEvent {
    let Some(v) = parse(data) else {
        return SseEvent::of(EventKind::Malformed);
    };
    let finish = v
        .get("delta")
        .and_then(|d| d.get("stop_reason"))
        .and_then(Value::as_str)
        .map(|r| Finish {
            blocked: r == "refusal",
            reason: r.to_owned(),
        });
    SseEvent {
        finish,
        usage: usage_of(&v),
        ..SseEvent::of(EventKind::Other)
    }
}

/// Responses API `response.incomplete`: the response's last event. It ended early the way a
/// finish reason `length` does (`max_output_tokens`): complete as far as the stream goes, the
/// reason is the caller's to read. A `content_filter` reason is a policy block.
fn responses_incomplete(data: &[u8]) -> SseEvent {
    let reason = parse(data).and_then(|v| {
        v.get("response")
            .and_then(|r| r.get("incomplete_details"))
            .and_then(|d| d.get("reason"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let reason = reason.unwrap_or_else(|| "incomplete".to_owned());
    SseEvent {
        finish: Some(Finish {
            blocked: reason == "content_filter",
            reason,
        }),
        usage: parse(data).and_then(|v| usage_of(&v)),
        ..SseEvent::terminal()
    }
}

/// Classifies an in-band error payload (the layer's classifier).
pub(crate) type InBand<'a> = dyn Fn(&[u8]) -> Option<Classification> + 'a;

/// The in-band error of `json` classified like its HTTP equivalent; a server error when the
/// classifier does not know it (an error after a 200 is the server's).
fn in_band_classification(in_band: &InBand<'_>, json: &[u8]) -> Classification {
    in_band(json).unwrap_or_else(|| Classification::failure(FailureClass::ServerError))
}

/// The usage an answer or event reports, whichever API's shape it has:
/// `usage.{prompt,completion}_tokens` (OpenAI chat), `usage.{input,output}_tokens` (Anthropic,
/// OpenAI Responses), Gemini's `usageMetadata` (thinking tokens count as output), also nested
/// in `message` (Anthropic `message_start`) or `response` (Responses events). The first of
/// those objects that reports a count is taken.
pub(crate) fn usage_of(v: &Value) -> Option<UsagePart> {
    [
        v.get("usage"),
        v.get("message").and_then(|m| m.get("usage")),
        v.get("response").and_then(|r| r.get("usage")),
        v.get("usageMetadata"),
    ]
    .into_iter()
    .flatten()
    .filter(|u| u.is_object())
    .find_map(counts)
}

/// The counts of one usage object (`usage`, `usageMetadata`), whichever API's names it uses.
pub(crate) fn counts(u: &Value) -> Option<UsagePart> {
    let num = |k: &str| u.get(k).and_then(Value::as_u64);
    let input = num("prompt_tokens")
        .or_else(|| num("input_tokens"))
        .or_else(|| num("promptTokenCount"));
    let output = num("completion_tokens")
        .or_else(|| num("output_tokens"))
        .or_else(|| {
            let candidates = num("candidatesTokenCount");
            let thoughts = num("thoughtsTokenCount");
            (candidates.is_some() || thoughts.is_some()).then(|| {
                candidates
                    .unwrap_or(0)
                    .saturating_add(thoughts.unwrap_or(0))
            })
        });
    let part = UsagePart { input, output };
    part.usage().map(|_| part)
}

fn parse(data: &[u8]) -> Option<Value> {
    serde_json::from_slice(data).ok()
}

/// An `error` member that reports an error: an object, or a message that is not blank.
fn is_error(error: &Value) -> bool {
    match error {
        Value::Object(_) => true,
        Value::String(s) => !s.trim().is_empty(),
        _ => false,
    }
}

/// Vertex wraps Gemini errors in a one-element array.
fn top_level(v: &Value) -> &Value {
    match v {
        Value::Array(a) if a.len() == 1 => &a[0],
        v => v,
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `{"type":"message_start",...}` → `message_start`: the event type Anthropic and the Responses
/// API repeat in the payload, for streams whose `event:` lines a proxy dropped.
fn leading_type(data: &[u8]) -> Option<&[u8]> {
    let rest = data.strip_prefix(b"{")?.trim_ascii_start();
    let rest = rest.strip_prefix(b"\"type\"")?.trim_ascii_start();
    let rest = rest.strip_prefix(b":")?.trim_ascii_start();
    string_value(rest)
}

/// The length of the JSON string whose contents start `s` (after its opening quote), up to its
/// closing quote; `None` if it is not closed.
fn string_len(s: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_ne_bytes([b'"'; 8]);
    const BACKSLASHES: u64 = u64::from_ne_bytes([b'\\'; 8]);
    let mut i = 0;
    // Most keys and many values end within a few bytes: look at eight at a time (the high bit
    // of each byte that is a quote or a backslash; the lowest one set is exact), and hand
    // longer strings to memchr, jumping from one quote or backslash to the next.
    while i < 32 {
        let Some(word) = s.get(i..i + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()) else {
            break;
        };
        let w = u64::from_le_bytes(word);
        let (q, b) = (w ^ QUOTES, w ^ BACKSLASHES);
        let hits = (q.wrapping_sub(ONES) & !q | b.wrapping_sub(ONES) & !b) & HIGH;
        if hits == 0 {
            i += 8;
            continue;
        }
        let at = i + (hits.trailing_zeros() / 8) as usize;
        if s[at] == b'"' {
            return Some(at);
        }
        // A backslash escapes the byte after it.
        i = at + 2;
    }
    loop {
        let at = i + memchr::memchr2(b'"', b'\\', s.get(i..)?)?;
        if s[at] == b'"' {
            return Some(at);
        }
        i = at + 2;
    }
}

/// The raw contents of the JSON string `v` starts with (escapes left as they are).
fn string_value(v: &[u8]) -> Option<&[u8]> {
    let body = v.strip_prefix(b"\"")?;
    string_len(body).map(|n| &body[..n])
}

/// A string value that names a reason: not empty.
fn reason(v: &[u8]) -> Option<&[u8]> {
    string_value(v).filter(|r| !r.is_empty())
}

/// Whether `data` is one balanced JSON object or array (see [`Facts::of`]).
#[cfg(test)]
fn well_formed(data: &[u8]) -> bool {
    Facts::of(data).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::MAX_EVENT_BYTES;

    fn scan(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut s = Scanner::new();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut |e| out.push(e));
        }
        s.finish(&mut |e| out.push(e));
        out
    }

    fn one(stream: &str) -> Vec<SseEvent> {
        scan(&[stream.as_bytes()])
    }

    fn kinds(events: &[SseEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    const OPENAI: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo \\\"finish_reason\\\": \\\"x\\\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n",
    );

    const ANTHROPIC: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    const GEMINI: &str = concat!(
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hel\"}],\"role\": \"model\"},\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 7,\"candidatesTokenCount\": 1,\"totalTokenCount\": 8}}\r\n\r\n",
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"lo\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],\"usageMetadata\": {\"promptTokenCount\": 7,\"candidatesTokenCount\": 2,\"totalTokenCount\": 9}}\r\n\r\n",
    );

    const RESPONSES: &str = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\"}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"m1\",\"delta\":\"Hi\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1,\"total_tokens\":6}}}\n\n",
    );

    #[test]
    fn openai_role_delta_is_not_content_finish_usage_and_done() {
        let ev = one(OPENAI);
        use EventKind::*;
        assert_eq!(kinds(&ev), [Other, Content, Content, Other, Other, Other]);
        assert_eq!(
            ev[3].finish,
            Some(Finish {
                reason: "stop".into(),
                blocked: false
            })
        );
        // An escaped `"finish_reason":` inside content is text, not a finish reason.
        assert_eq!(ev[2].finish, None);
        assert_eq!(
            ev[4].usage,
            Some(UsagePart {
                input: Some(9),
                output: Some(2)
            })
        );
        assert!(ev[5].terminal && ev[..5].iter().all(|e| !e.terminal));
        assert!(ev.iter().all(|e| e.error.is_none()));
    }

    #[test]
    fn anthropic_events() {
        let ev = one(ANTHROPIC);
        use EventKind::*;
        assert_eq!(
            kinds(&ev),
            [Other, Other, KeepAlive, Content, Other, Other, Other]
        );
        assert_eq!(
            ev[0].usage,
            Some(UsagePart {
                input: Some(25),
                output: Some(1)
            })
        );
        assert_eq!(
            ev[5].finish.as_ref().map(|f| f.reason.as_str()),
            Some("end_turn")
        );
        assert_eq!(ev[5].usage.and_then(|u| u.output), Some(15));
        assert!(ev[6].terminal);
        let mut total = UsagePart::default();
        ev.iter()
            .filter_map(|e| e.usage)
            .for_each(|u| total.merge(u));
        assert_eq!(total.usage(), Some(Usage::new(25, 15)));
    }

    #[test]
    fn gemini_text_finish_and_usage_with_crlf() {
        let ev = one(GEMINI);
        assert_eq!(kinds(&ev), [EventKind::Content, EventKind::Content]);
        assert_eq!(ev[0].finish, None);
        // Usage is only parsed on the final chunk.
        assert_eq!(ev[0].usage, None);
        assert_eq!(
            ev[1].finish.as_ref().map(|f| f.reason.as_str()),
            Some("STOP")
        );
        assert_eq!(
            ev[1].usage,
            Some(UsagePart {
                input: Some(7),
                output: Some(2)
            })
        );
    }

    #[test]
    fn responses_api_events() {
        let ev = one(RESPONSES);
        assert_eq!(
            kinds(&ev),
            [EventKind::Other, EventKind::Content, EventKind::Other]
        );
        assert!(ev[2].terminal);
        assert_eq!(ev[2].usage.and_then(|u| u.usage()), Some(Usage::new(5, 1)));
    }

    #[test]
    fn tool_call_and_reasoning_deltas_are_content() {
        let tool = "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n";
        let reasoning = "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"hm\"},\"finish_reason\":null}]}\n\n";
        let gemini_call = "data: {\"candidates\": [{\"content\": {\"parts\": [{\"functionCall\": {\"name\": \"f\"}}]}}]}\n\n";
        let anthropic_tool = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n";
        let fn_args = "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"delta\":\"{\"}\n\n";
        for s in [tool, reasoning, gemini_call, anthropic_tool, fn_args] {
            assert_eq!(kinds(&one(s)), [EventKind::Content], "{s}");
        }
    }

    #[test]
    fn keep_alives_comments_and_unknown_events() {
        let ev = one(
            ": OPENROUTER PROCESSING\n\n:\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\nevent: something_new\ndata: {}\n\n",
        );
        assert_eq!(
            kinds(&ev),
            [
                EventKind::Comment,
                EventKind::Comment,
                EventKind::KeepAlive,
                EventKind::KeepAlive
            ]
        );
        assert!(ev.iter().all(|e| e.error.is_none() && !e.terminal));
    }

    #[test]
    fn a_byte_order_mark_before_the_first_line_is_dropped() {
        let gemini = b"\xEF\xBB\xBFdata: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hi\"}]},\"finishReason\":\"STOP\"}]}\r\n\r\n";
        // Whole, and split inside the mark.
        for ev in [scan(&[gemini]), scan(&[&gemini[..1], &gemini[1..]])] {
            assert_eq!(kinds(&ev), [EventKind::Content]);
            assert_eq!(
                ev[0].finish.as_ref().map(|f| f.reason.as_str()),
                Some("STOP")
            );
        }
        // Only the stream's first line may carry one.
        let later = one("data: [DONE]\n\n\u{feff}data: [DONE]\n\n");
        assert_eq!(later.iter().filter(|e| e.terminal).count(), 1);
    }

    #[test]
    fn an_empty_finish_reason_is_no_finish() {
        let s = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"},\"finish_reason\":\"\"}]}\n\n",
            "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"lo\"}]},\"finishReason\":\"\"}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"\",\"finish_reason\":\"stop\"}]}\n\n",
        );
        let ev = one(s);
        assert_eq!(ev[0].kind, EventKind::Content);
        assert_eq!(ev[0].finish, None);
        assert_eq!(ev[1].finish, None);
        assert_eq!(
            ev[2].finish.as_ref().map(|f| f.reason.as_str()),
            Some("stop")
        );
    }

    #[test]
    fn an_error_message_string_is_an_in_band_error() {
        let s = concat!(
            "data: {\"error\":\"Request failed during generation: out of memory\",\"error_type\":\"generation\"}\n\n",
            "data: {\"error\":\"\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"no \\\"error\\\": \\\"here\\\"\"}}]}\n\n",
        );
        let ev = one(s);
        assert_eq!(
            ev[0].error.as_ref().and_then(|c| c.class),
            Some(FailureClass::ServerError)
        );
        // A blank message and an escaped key inside content are not errors.
        assert_eq!(ev[1].kind, EventKind::Content);
        assert!(ev[1].error.is_none());
        assert_eq!(ev[2].kind, EventKind::Content);
        assert!(ev[2].error.is_none());
    }

    #[test]
    fn finish_reason_without_done() {
        let s = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"length\"}]}\n\n";
        let ev = one(s);
        assert_eq!(ev[0].kind, EventKind::Content);
        assert_eq!(
            ev[0].finish.as_ref().map(|f| f.reason.as_str()),
            Some("length")
        );
        assert!(!ev[0].terminal);
    }

    #[test]
    fn policy_blocks_in_streams() {
        let openai =
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"content_filter\"}]}\n\n";
        let anthropic = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"refusal\"},\"usage\":{\"output_tokens\":3}}\n\n";
        let gemini = "data: {\"candidates\": [{\"finishReason\": \"SAFETY\",\"index\": 0}]}\n\n";
        let prompt = "data: {\"promptFeedback\": {\"blockReason\": \"PROHIBITED_CONTENT\"}}\n\n";
        let responses = "event: response.incomplete\ndata: {\"type\":\"response.incomplete\",\"response\":{\"incomplete_details\":{\"reason\":\"content_filter\"}}}\n\n";
        for s in [openai, anthropic, gemini, prompt, responses] {
            let ev = one(s);
            assert_eq!(ev.len(), 1, "{s}");
            assert!(ev[0].finish.as_ref().is_some_and(|f| f.blocked), "{s}");
            assert!(ev[0].error.is_none(), "{s}");
        }
        let not_blocked = "data: {\"candidates\": [{\"finishReason\": \"MAX_TOKENS\"}]}\n\n";
        assert!(
            one(not_blocked)[0]
                .finish
                .as_ref()
                .is_some_and(|f| !f.blocked)
        );
    }

    fn error_class(s: &str) -> (Option<FailureClass>, Option<String>) {
        let ev = one(s);
        assert_eq!(ev.len(), 1, "{s}");
        let c = ev[0].error.clone().unwrap_or_default();
        (c.class, c.error_type)
    }

    #[test]
    fn in_band_errors_are_classified_like_http() {
        use FailureClass::*;
        let cases: [(&str, FailureClass, Option<&str>); 9] = [
            (
                "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n",
                ServerError,
                Some("server_error"),
            ),
            (
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
                Overloaded,
                Some("overloaded_error"),
            ),
            (
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"Overloaded\"}}\n\n",
                Overloaded,
                Some("api_error"),
            ),
            (
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"slow\"}}\n\n",
                RateLimited,
                Some("rate_limit_error"),
            ),
            (
                "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\",\"param\":null}\n\n",
                ServerError,
                None,
            ),
            (
                "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"rate_limit_exceeded\",\"message\":\"x\"}}}\n\n",
                RateLimited,
                None,
            ),
            (
                "data: {\"error\": {\"code\": 503,\"message\": \"The model is overloaded.\",\"status\": \"UNAVAILABLE\"}}\n\n",
                Overloaded,
                Some("UNAVAILABLE"),
            ),
            (
                "data: [{\"error\": {\"code\": 500,\"message\": \"x\",\"status\": \"INTERNAL\"}}]\n\n",
                ServerError,
                Some("INTERNAL"),
            ),
            (
                "data: {\"id\":\"g\",\"object\":\"chat.completion.chunk\",\"error\":{\"code\":\"server_error\",\"message\":\"x\"},\"choices\":[{\"delta\":{\"content\":\"\"},\"finish_reason\":\"error\"}]}\n\n",
                ServerError,
                None,
            ),
        ];
        for (s, class, ty) in cases {
            let (c, t) = error_class(s);
            assert_eq!(c, Some(class), "{s}");
            assert_eq!(t.as_deref(), ty, "{s}");
        }
        // An incomplete response for a token limit ends the stream like `finish_reason: length`.
        let incomplete = "event: response.incomplete\ndata: {\"type\":\"response.incomplete\",\"response\":{\"incomplete_details\":{\"reason\":\"max_output_tokens\"},\"usage\":{\"input_tokens\":3,\"output_tokens\":16}}}\n\n";
        let ev = one(incomplete);
        assert!(ev[0].terminal && ev[0].error.is_none());
        assert_eq!(
            ev[0].finish,
            Some(Finish {
                reason: "max_output_tokens".into(),
                blocked: false
            })
        );
        assert_eq!(ev[0].usage.and_then(|u| u.usage()), Some(Usage::new(3, 16)));
        // A cut-short error event is still an error.
        let cut = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overl\n\n";
        assert_eq!(error_class(cut).0, Some(ServerError));
        // A nested `error` object is not an in-band error.
        let nested =
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"error\":{\"x\":1}}]}}]}\n\n";
        assert!(one(nested)[0].error.is_none());
    }

    #[test]
    fn line_endings_lf_crlf_cr() {
        let lf = "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"}}\n\ndata: [DONE]\n\n";
        let crlf = lf.replace('\n', "\r\n");
        let cr = lf.replace('\n', "\r");
        let expected = one(lf);
        assert_eq!(expected.len(), 2);
        assert_eq!(one(&crlf), expected);
        assert_eq!(one(&cr), expected);
        // `\r` and `\n` of one line ending in different chunks make one line ending.
        assert_eq!(
            scan(&[b"data: [DONE]\r", b"\n", b"\r", b"\n"]),
            vec![SseEvent::terminal()]
        );
        // An empty chunk between them changes nothing.
        assert_eq!(
            scan(&[b"data: x\r", b"", b"\n\r\ndata: [DONE]\r\n\r\n"]),
            vec![SseEvent::of(EventKind::Other), SseEvent::terminal()]
        );
    }

    #[test]
    fn multi_line_data_is_joined() {
        let s = "data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"hi\"},\ndata: \"finish_reason\":\"stop\"}]}\n\n";
        let ev = one(s);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EventKind::Content);
        assert_eq!(
            ev[0].finish.as_ref().map(|f| f.reason.as_str()),
            Some("stop")
        );
    }

    #[test]
    fn malformed_events_are_noted_and_scanning_goes_on() {
        let s = "data: {\"choices\":[{\n\ndata: {\"a\":1}}\n\ndata: {\"a\":[1}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\n\ndata: [DONE]\n\n";
        let ev = one(s);
        use EventKind::*;
        assert_eq!(
            kinds(&ev),
            [Malformed, Malformed, Malformed, Malformed, Other]
        );
        assert!(ev[4].terminal);
        // Non-JSON data and garbage lines are not a crash either.
        let junk = one("data: hello\n\nfoo\n\n\u{0}\u{1}bar: baz\n\nevent\n\n");
        assert_eq!(kinds(&junk), [Other]);
        let bytes = scan(&[&[
            0xff, 0xfe, b'\n', b'\n', b'd', b'a', b't', b'a', b':', 0xff, b'\n', b'\n',
        ]]);
        assert_eq!(kinds(&bytes), [Other]);
    }

    #[test]
    fn an_oversized_event_is_malformed_and_memory_stays_bounded() {
        let big = vec![b'x'; MAX_EVENT_BYTES + 10];
        let mut stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"".to_vec();
        stream.extend_from_slice(&big);
        stream.extend_from_slice(b"\"}}]}\n\ndata: [DONE]\n\n");
        // Whole, in small chunks and in big ones: the same events, and the buffers stay bounded.
        for size in [stream.len(), 7, 64 * 1024] {
            let mut s = Scanner::new();
            let mut events = Vec::new();
            for chunk in stream.chunks(size) {
                s.feed(chunk, &mut |e| events.push(e));
                assert!(s.framer.line.capacity() <= 2 * MAX_EVENT_BYTES);
                assert!(s.framer.data.capacity() <= 2 * MAX_EVENT_BYTES);
            }
            s.finish(&mut |e| events.push(e));
            assert_eq!(
                kinds(&events),
                [EventKind::Malformed, EventKind::Other],
                "{size}"
            );
            assert!(events[1].terminal);
        }
        // Many data lines that add up past the bound: malformed too.
        let line = format!("data: {}\n", "y".repeat(1024 * 1024));
        let many = format!("{}\ndata: [DONE]\n\n", line.repeat(5));
        assert_eq!(kinds(&one(&many)), [EventKind::Malformed, EventKind::Other]);
    }

    #[test]
    fn last_event_without_blank_line_is_scanned_at_the_end() {
        assert_eq!(scan(&[b"data: [DONE]"]), vec![SseEvent::terminal()]);
        assert_eq!(scan(&[b"data: [DONE]\n"]), vec![SseEvent::terminal()]);
        assert_eq!(
            scan(&[b"event: message_stop\ndata: {\"type\":\"message_stop\"}"]),
            vec![SseEvent::terminal()]
        );
    }

    #[test]
    fn well_formed_checks() {
        assert!(well_formed(b"{\"a\":[1,{\"b\":\"}]\"}]}"));
        assert!(well_formed(b"[1, 2] "));
        assert!(!well_formed(b"{\"a\":[1}"));
        assert!(!well_formed(b"{\"a\":\"x}"));
        assert!(!well_formed(b"{}{"));
        assert!(!well_formed(b"}"));
        assert!(!well_formed(b""));
    }

    #[test]
    fn steady_state_scanning_keeps_its_buffers() {
        let mut s = Scanner::new();
        let mut n = 0;
        // Warm up: the buffers grow to the largest line and event once.
        for chunk in OPENAI.as_bytes().chunks(7) {
            s.feed(chunk, &mut |_| n += 1);
        }
        let f = &s.framer;
        let caps = (f.line.capacity(), f.data.capacity(), f.event.capacity());
        for _ in 0..100 {
            for chunk in OPENAI.as_bytes().chunks(7) {
                s.feed(chunk, &mut |_| n += 1);
            }
        }
        assert_eq!(n, 6 * 101);
        let f = &s.framer;
        assert_eq!(
            (f.line.capacity(), f.data.capacity(), f.event.capacity()),
            caps
        );
    }

    mod split {
        use super::*;
        use proptest::prelude::*;

        fn recorded() -> Vec<String> {
            let crlf = OPENAI.replace('\n', "\r\n");
            let cr = ANTHROPIC.replace('\n', "\r");
            let mixed = concat!(
                ": OPENROUTER PROCESSING\r\n\r\n",
                "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
                "data: {\"choices\":[{\"delta\":\r\ndata: {\"content\":\"a\"},\"finish_reason\":null}]}\r\r",
                "data: {\"choices\":[{\n\n",
                "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
                "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"content_filter\"}]}\n\n",
                "data: [DONE]",
            )
            .to_owned();
            vec![
                OPENAI.to_owned(),
                ANTHROPIC.to_owned(),
                GEMINI.to_owned(),
                RESPONSES.to_owned(),
                crlf,
                cr,
                mixed,
            ]
        }

        proptest! {
            #[test]
            fn any_split_gives_the_same_events(
                which in 0usize..7,
                mut cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
            ) {
                let streams = recorded();
                let stream = streams[which].as_bytes();
                let whole = scan(&[stream]);
                let mut points: Vec<usize> = cuts.drain(..).map(|i| i.index(stream.len() + 1)).collect();
                points.sort_unstable();
                let mut chunks = Vec::new();
                let mut from = 0;
                for p in points {
                    chunks.push(&stream[from..p]);
                    from = p;
                }
                chunks.push(&stream[from..]);
                prop_assert_eq!(scan(&chunks), whole);
            }
        }

        /// The byte-at-a-time scans the fast ones replaced, kept as the reference.
        fn reference_string_len(s: &[u8]) -> Option<usize> {
            let mut escaped = false;
            for (i, &b) in s.iter().enumerate() {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => return Some(i),
                    _ => {}
                }
            }
            None
        }

        fn reference_well_formed(data: &[u8]) -> bool {
            let mut stack: u64 = 0;
            let mut depth: u32 = 0;
            let (mut in_string, mut escaped, mut closed) = (false, false, false);
            for &b in data {
                if in_string {
                    match b {
                        _ if escaped => escaped = false,
                        b'\\' => escaped = true,
                        b'"' => in_string = false,
                        _ => {}
                    }
                    continue;
                }
                if closed {
                    if !b.is_ascii_whitespace() {
                        return false;
                    }
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => {
                        if depth < 64 {
                            stack = (stack << 1) | u64::from(b == b'{');
                        }
                        depth += 1;
                    }
                    b'}' | b']' => {
                        if depth == 0 {
                            return false;
                        }
                        depth -= 1;
                        if depth < 64 {
                            if (stack & 1 == 1) != (b == b'}') {
                                return false;
                            }
                            stack >>= 1;
                        }
                        closed = depth == 0;
                    }
                    _ => {}
                }
            }
            closed && !in_string
        }

        proptest! {
            #[test]
            fn fast_scans_agree_with_the_reference(
                bytes in proptest::collection::vec(
                    prop::sample::select(b"{}[]\"\\:, ax0".to_vec()),
                    0..80,
                ),
            ) {
                prop_assert_eq!(string_len(&bytes), reference_string_len(&bytes));
                prop_assert_eq!(well_formed(&bytes), reference_well_formed(&bytes));
            }
        }

        #[test]
        fn byte_by_byte() {
            for stream in recorded() {
                let bytes = stream.as_bytes();
                let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
                assert_eq!(scan(&chunks), scan(&[bytes]));
            }
        }
    }
}
