//! How many model tokens a request may use, estimated before it is sent.

use std::fmt;

use http::HeaderMap;
use serde_json::Value;

/// The output bound assumed when a request names none (`max_tokens` and friends are optional
/// for most providers).
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;

/// The tokens a provider bills for each message beyond its text: the chat template's role and
/// separators (OpenAI counts 3 to 4 per message, Anthropic and Gemini about as many).
pub const MESSAGE_OVERHEAD_TOKENS: u64 = 4;

/// A request's estimated size in model tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TokenEstimate {
    /// Prompt (input) tokens, as estimated.
    pub input_tokens: u64,
    /// The most output tokens the request may produce.
    pub max_output_tokens: u64,
    /// The most input tokens the request can be billed: what a hard spend cap reserves.
    pub input_bound: u64,
}

impl TokenEstimate {
    /// An estimate whose input bound is its input estimate.
    pub const fn new(input_tokens: u64, max_output_tokens: u64) -> Self {
        Self {
            input_tokens,
            max_output_tokens,
            input_bound: input_tokens,
        }
    }

    /// The estimate with `bound` as the most input tokens it can be billed (never below the
    /// estimate).
    pub const fn with_input_bound(mut self, bound: u64) -> Self {
        self.input_bound = if bound > self.input_tokens {
            bound
        } else {
            self.input_tokens
        };
        self
    }

    /// Input plus output tokens: what a tokens-per-minute limit counts.
    pub const fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.max_output_tokens)
    }
}

/// Estimates the tokens of a request from its headers and, when it is in memory, its body.
///
/// Closures `Fn(&HeaderMap, Option<&[u8]>) -> TokenEstimate` implement it.
pub trait TokenEstimator: Send + Sync + 'static {
    /// The estimate for a request; `body` is `None` when the body is not in memory.
    fn estimate(&self, headers: &HeaderMap, body: Option<&[u8]>) -> TokenEstimate;
}

impl<F> TokenEstimator for F
where
    F: Fn(&HeaderMap, Option<&[u8]>) -> TokenEstimate + Send + Sync + 'static,
{
    fn estimate(&self, headers: &HeaderMap, body: Option<&[u8]>) -> TokenEstimate {
        self(headers, body)
    }
}

/// The default estimator, for the JSON bodies of the common model APIs.
///
/// - Output: the first of `max_tokens`, `max_output_tokens`, `max_completion_tokens` and
///   Gemini's `generationConfig.maxOutputTokens`; [`DEFAULT_MAX_OUTPUT_TOKENS`] when none is set.
/// - Input: the bytes of every string inside `messages`, `prompt`, `input`, `system`,
///   `instructions`, `contents`, `systemInstruction` and `tools`, divided by 4 and rounded up
///   (about four bytes per token for English text; it overestimates images sent inline, which
///   errs on the safe side), plus [`MESSAGE_OVERHEAD_TOKENS`] per message of `messages`,
///   `contents` or an `input` array.
/// - Input bound: those bytes counted as tokens (a token of text is at least one byte) plus the
///   same per-message overhead — what a provider can bill at most, for a hard spend cap.
/// - A body that is not JSON counts its length divided by 4, and its length as the input bound;
///   a body not in memory counts its `content-length` the same way.
///
/// The output bound is only what the request names: a request naming none is reserved
/// [`DEFAULT_MAX_OUTPUT_TOKENS`], which a model with a longer output limit may exceed, so a
/// hard spend cap bounds the requests that name their output bound (and a body not in memory
/// without a `content-length` has no input bound at all).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultEstimator;

/// A body whose structure is not read, of `len` bytes: a token is at least one byte.
fn unread(len: u64) -> TokenEstimate {
    TokenEstimate::new(len.div_ceil(4), DEFAULT_MAX_OUTPUT_TOKENS).with_input_bound(len)
}

const PROMPT_FIELDS: [&str; 8] = [
    "messages",
    "prompt",
    "input",
    "system",
    "instructions",
    "contents",
    "systemInstruction",
    "tools",
];

impl TokenEstimator for DefaultEstimator {
    fn estimate(&self, headers: &HeaderMap, body: Option<&[u8]>) -> TokenEstimate {
        let Some(body) = body else {
            let len = headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            return unread(len);
        };
        let Ok(Value::Object(json)) = serde_json::from_slice::<Value>(body) else {
            return unread(body.len() as u64);
        };
        let max_output = ["max_tokens", "max_output_tokens", "max_completion_tokens"]
            .iter()
            .find_map(|f| json.get(*f).and_then(Value::as_u64))
            .or_else(|| {
                json.get("generationConfig")
                    .and_then(|g| g.get("maxOutputTokens"))
                    .and_then(Value::as_u64)
            })
            .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
        let prompt_bytes: u64 = PROMPT_FIELDS
            .iter()
            .filter_map(|f| json.get(*f))
            .map(string_bytes)
            .fold(0, u64::saturating_add);
        let messages: u64 = ["messages", "contents", "input"]
            .iter()
            .filter_map(|f| json.get(*f).and_then(Value::as_array))
            .map(|a| a.len() as u64)
            .fold(0, u64::saturating_add);
        let overhead = messages.saturating_mul(MESSAGE_OVERHEAD_TOKENS);
        TokenEstimate::new(
            prompt_bytes.div_ceil(4).saturating_add(overhead),
            max_output,
        )
        .with_input_bound(prompt_bytes.saturating_add(overhead))
    }
}

fn string_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(a) => a.iter().map(string_bytes).fold(0, u64::saturating_add),
        Value::Object(o) => o.values().map(string_bytes).fold(0, u64::saturating_add),
        _ => 0,
    }
}

/// A shared estimator, as the layer holds it.
#[derive(Clone)]
pub(crate) struct SharedEstimator(pub(crate) std::sync::Arc<dyn TokenEstimator>);

impl fmt::Debug for SharedEstimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenEstimator")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(body: &str) -> TokenEstimate {
        DefaultEstimator.estimate(&HeaderMap::new(), Some(body.as_bytes()))
    }

    #[test]
    fn reads_output_bounds_of_every_api() {
        let chat =
            r#"{"model":"m","messages":[{"role":"user","content":"abcdefgh"}],"max_tokens":64}"#;
        // "user" + "abcdefgh" = 12 bytes = 3 tokens, and 4 for the message; at most 12 + 4.
        assert_eq!(est(chat), TokenEstimate::new(7, 64).with_input_bound(16));
        let responses = r#"{"model":"m","input":"abcde","max_output_tokens":10}"#;
        assert_eq!(
            est(responses),
            TokenEstimate::new(2, 10).with_input_bound(5)
        );
        let o1 = r#"{"messages":[],"max_completion_tokens":7}"#;
        assert_eq!(est(o1), TokenEstimate::new(0, 7));
        let gemini = r#"{"contents":[{"parts":[{"text":"abcd"}]}],"generationConfig":{"maxOutputTokens":9}}"#;
        assert_eq!(est(gemini), TokenEstimate::new(5, 9).with_input_bound(8));
        let anthropic = r#"{"system":"abcd","messages":[{"role":"user","content":[{"type":"text","text":"abcd"}]}],"max_tokens":5}"#;
        // "abcd" + "user" + "text" + "abcd" = 16 bytes, one message.
        assert_eq!(
            est(anthropic),
            TokenEstimate::new(8, 5).with_input_bound(20)
        );
        // An `input` array counts its items as messages.
        let items = r#"{"input":[{"role":"user","content":"ab"},{"role":"user","content":"cd"}]}"#;
        assert_eq!(
            est(items),
            TokenEstimate::new(3 + 8, 4096).with_input_bound(12 + 8)
        );
    }

    #[test]
    fn garbage_and_missing_bodies_still_estimate() {
        assert_eq!(
            est("not json at all"),
            TokenEstimate::new(4, 4096).with_input_bound(15)
        );
        // A body that is not JSON is bounded by its bytes, as a string inside JSON would be.
        assert_eq!(est("not json at all").input_bound, 15);
        assert_eq!(est(r#"{"max_tokens":-3}"#), TokenEstimate::new(0, 4096));
        assert_eq!(
            est("[1,2]"),
            TokenEstimate::new(2, 4096).with_input_bound(5)
        );
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from_static("41"),
        );
        assert_eq!(
            DefaultEstimator.estimate(&h, None),
            TokenEstimate::new(11, 4096).with_input_bound(41)
        );
        h.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from_static("x"),
        );
        assert_eq!(
            DefaultEstimator.estimate(&h, None),
            TokenEstimate::new(0, 4096)
        );
    }

    #[test]
    fn closures_are_estimators() {
        let f = |_: &HeaderMap, b: Option<&[u8]>| {
            TokenEstimate::new(b.map_or(0, |b| b.len() as u64), 1)
        };
        assert_eq!(
            f.estimate(&HeaderMap::new(), Some(b"abc")),
            TokenEstimate::new(3, 1)
        );
    }
}
