//! The error shapes of the providers: what a JSON error body (or an in-band stream error)
//! says, reduced to a few normalised tokens, and the class those tokens decide.
//!
//! Matching is on normalised tokens (ASCII lowercase, letters and digits only), so
//! `insufficient_quota`, `InsufficientQuota` and `INSUFFICIENT-QUOTA` are one value. Message
//! text is read for the few contracts that only the message carries (Anthropic's spend limit
//! and "Overloaded", OpenAI's "Request too large", context-window wording) and is never kept.

use http::HeaderMap;
use serde_json::{Map, Value};

use super::FailureClass;
use super::hints::{self, WaitHint};

/// Bodies longer than this are not parsed at all: they are classified by status.
pub(crate) const MAX_PARSE: usize = 1 << 20;
/// Longest provider type, code or request id kept as metadata (in characters).
pub(crate) const MAX_FIELD: usize = 128;
/// How much of a message is looked at (in bytes).
const MAX_MESSAGE: usize = 1024;
/// How many entries of a Gemini `details` list are looked at.
const MAX_DETAILS: usize = 32;

/// What an error body or event says, as far as classification is concerned.
#[derive(Debug, Default)]
pub(crate) struct ProviderError {
    /// The provider's error type, as sent (bounded): metadata.
    pub(crate) error_type: Option<String>,
    /// The provider's error code, as sent (bounded): metadata.
    pub(crate) error_code: Option<String>,
    /// `request_id` in the body (Anthropic).
    pub(crate) request_id: Option<String>,
    /// Gemini `RetryInfo.retryDelay`.
    pub(crate) retry_delay: Option<WaitHint>,
    /// Normalised `error.code` (string form).
    code: Option<String>,
    /// Normalised `error.type` (or top-level `type`).
    kind: Option<String>,
    /// Normalised Gemini `error.status`.
    status: Option<String>,
    /// A numeric `error.code` that looks like an HTTP status (Gemini, OpenRouter, Azure).
    numeric: Option<u16>,
    /// Normalised Anthropic `error.details.error_code`.
    detail: Option<String>,
    /// Normalised Azure `error.innererror.code`.
    inner: Option<String>,
    /// Normalised Gemini `ErrorInfo.reason`.
    reason: Option<String>,
    /// Normalised Bedrock error type (`x-amzn-ErrorType` header or `__type`).
    aws: Option<String>,
    /// ASCII-lowercased start of the message.
    message: String,
    /// A Gemini quota violation with a per-day quota id.
    per_day_quota: bool,
    /// OpenRouter moderation metadata (`reasons`, `flagged_input`).
    moderation: bool,
}

/// The object of a JSON error payload: the value itself, or the first element of Vertex's
/// one-element array wrapper.
pub(crate) fn root(v: &Value) -> Option<&Map<String, Value>> {
    match v {
        Value::Object(o) => Some(o),
        Value::Array(a) => a.first()?.as_object(),
        _ => None,
    }
}

/// Parses a JSON error body; `None` when it is not JSON (or too large, or truncated, or says
/// nothing a provider error says).
pub(crate) fn parse(body: &[u8]) -> Option<ProviderError> {
    let v = parse_json(body)?;
    from_value(&v)
}

/// JSON of a body or event payload, tolerating a byte-order mark and surrounding whitespace.
pub(crate) fn parse_json(body: &[u8]) -> Option<Value> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if body.len() > MAX_PARSE {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Reads a parsed error payload; `None` when it carries no provider error field.
pub(crate) fn from_value(v: &Value) -> Option<ProviderError> {
    let root = root(v)?;
    let mut p = ProviderError::default();
    match root.get("error") {
        Some(Value::Object(e)) => p.read_error_object(e),
        Some(Value::String(s)) => {
            p.set_message(s);
            p.read_top_level(root);
        }
        _ => p.read_top_level(root),
    }
    p.request_id = root
        .get("request_id")
        .and_then(Value::as_str)
        .and_then(bounded);
    p.is_known().then_some(p)
}

impl ProviderError {
    /// Adds what the response headers say: Bedrock's `x-amzn-ErrorType`.
    pub(crate) fn read_headers(&mut self, headers: &HeaderMap) {
        let Some(raw) = headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .map(aws_error_type)
            .filter(|t| !t.is_empty())
        else {
            return;
        };
        self.aws = Some(norm(raw));
        if self.error_type.is_none() {
            self.error_type = bounded(raw);
        }
    }

    fn read_error_object(&mut self, e: &Map<String, Value>) {
        if let Some(t) = e.get("type").and_then(Value::as_str) {
            self.kind = Some(norm(t));
            self.error_type = bounded(t);
        }
        let mut numeric_code = None;
        match e.get("code") {
            Some(Value::String(c)) => {
                self.code = Some(norm(c));
                self.error_code = bounded(c);
                self.numeric = http_status(c.trim().parse().ok());
            }
            Some(Value::Number(n)) => {
                self.numeric = http_status(n.as_u64());
                numeric_code = n.as_u64();
            }
            _ => {}
        }
        match e.get("status") {
            Some(Value::String(s)) => {
                self.status = Some(norm(s));
                if self.error_type.is_none() {
                    self.error_type = bounded(s);
                }
            }
            Some(Value::Number(n)) if self.numeric.is_none() => {
                self.numeric = http_status(n.as_u64());
            }
            _ => {}
        }
        if let Some(m) = e.get("message").and_then(Value::as_str) {
            self.set_message(m);
        }
        match e.get("details") {
            Some(Value::Object(d)) => {
                if let Some(c) = d.get("error_code").and_then(Value::as_str) {
                    self.detail = Some(norm(c));
                    if self.error_code.is_none() {
                        self.error_code = bounded(c);
                    }
                }
            }
            Some(Value::Array(list)) => self.read_google_details(list),
            _ => {}
        }
        if let Some(c) = e
            .get("innererror")
            .and_then(|i| i.get("code"))
            .and_then(Value::as_str)
        {
            self.inner = Some(norm(c));
        }
        if let Some(m) = e.get("metadata").and_then(Value::as_object) {
            self.moderation = m.contains_key("reasons") || m.contains_key("flagged_input");
        }
        if self.error_code.is_none() {
            self.error_code = numeric_code.map(|n| n.to_string());
        }
    }

    /// Gemini / Vertex `details`: `RetryInfo`, `QuotaFailure`, `ErrorInfo`.
    fn read_google_details(&mut self, list: &[Value]) {
        let mut quota_id = None;
        for d in list.iter().take(MAX_DETAILS).filter_map(Value::as_object) {
            let t = d.get("@type").and_then(Value::as_str).unwrap_or("");
            if t.ends_with("google.rpc.RetryInfo") {
                if let Some(delay) = d.get("retryDelay") {
                    self.retry_delay = hints::retry_delay(delay);
                }
            } else if t.ends_with("google.rpc.QuotaFailure") {
                let violations = d.get("violations").and_then(Value::as_array);
                for v in violations.into_iter().flatten().take(MAX_DETAILS) {
                    if let Some(id) = v.get("quotaId").and_then(Value::as_str) {
                        self.note_quota_id(id);
                        quota_id = quota_id.or_else(|| bounded(id));
                    }
                }
            } else if t.ends_with("google.rpc.ErrorInfo") {
                if let Some(r) = d.get("reason").and_then(Value::as_str) {
                    self.reason = Some(norm(r));
                    if self.error_code.is_none() {
                        self.error_code = bounded(r);
                    }
                }
                if let Some(m) = d.get("metadata").and_then(Value::as_object) {
                    for key in ["quota_limit", "quota_id"] {
                        if let Some(id) = m.get(key).and_then(Value::as_str) {
                            self.note_quota_id(id);
                        }
                    }
                }
            }
        }
        if self.error_code.is_none() {
            self.error_code = quota_id;
        }
    }

    fn note_quota_id(&mut self, id: &str) {
        if norm(id).contains("perday") {
            self.per_day_quota = true;
        }
    }

    /// Top-level fields: Mistral's flat `{"object":"error","type":…,"code":…}`, the Responses
    /// API's `{"type":"error","code":…}`, Bedrock's `{"message":…}` and `__type`.
    fn read_top_level(&mut self, root: &Map<String, Value>) {
        if let Some(t) = root.get("type").and_then(Value::as_str) {
            if t != "error" {
                self.kind = Some(norm(t));
                self.error_type = bounded(t);
            }
        }
        match root.get("code") {
            Some(Value::String(c)) => {
                self.code = Some(norm(c));
                self.error_code = bounded(c);
                self.numeric = http_status(c.trim().parse().ok());
            }
            Some(Value::Number(n)) => {
                self.numeric = http_status(n.as_u64());
                self.error_code = n.as_u64().map(|n| n.to_string());
            }
            _ => {}
        }
        if self.message.is_empty() {
            if let Some(m) = root.get("message").and_then(Value::as_str) {
                self.set_message(m);
            }
        }
        if let Some(t) = root.get("__type").and_then(Value::as_str) {
            let t = aws_error_type(t);
            self.aws = Some(norm(t));
            if self.error_type.is_none() {
                self.error_type = bounded(t);
            }
        }
    }

    fn set_message(&mut self, m: &str) {
        let mut end = m.len().min(MAX_MESSAGE);
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        self.message = m[..end].trim().to_ascii_lowercase();
    }

    fn is_known(&self) -> bool {
        self.code.is_some()
            || self.kind.is_some()
            || self.status.is_some()
            || self.numeric.is_some()
            || self.detail.is_some()
            || self.aws.is_some()
            || !self.message.is_empty()
    }

    /// The class, given the HTTP status (`None` for an in-band stream error) and whether the
    /// response carried a `retry-after` header. `None` only when neither the payload nor the
    /// status decide (an in-band error with no recognisable field).
    pub(crate) fn class(&self, status: Option<u16>, has_retry_after: bool) -> Option<FailureClass> {
        let status = status.or(self.numeric);
        self.specific(status, has_retry_after)
            .or_else(|| status.filter(|s| (400..=599).contains(s)).map(by_status))
            .or_else(|| self.generic())
    }

    /// The signals that decide whatever the status says.
    fn specific(&self, status: Option<u16>, has_retry_after: bool) -> Option<FailureClass> {
        use FailureClass::*;
        let msg = self.message.as_str();
        // Contracts that need two fields or the message come first.
        if self.detail.as_deref() == Some("enforcedspendlimitreached") {
            // Anthropic: a 429 with retry-after is a rate limit; without it, the spend cap.
            return Some(if has_retry_after {
                RateLimited
            } else {
                QuotaExhausted
            });
        }
        if msg.starts_with("you have reached your specified")
            || msg.starts_with("your credit balance is too low")
        {
            return Some(QuotaExhausted);
        }
        if self.per_day_quota
            && (self.status.as_deref() == Some("resourceexhausted") || status == Some(429))
        {
            return Some(QuotaExhausted);
        }
        // One request above the per-minute token limit: same code as a rate limit, never fits.
        if msg.starts_with("request too large")
            && (self.code.as_deref() == Some("ratelimitexceeded")
                || status == Some(429)
                || matches!(self.kind.as_deref(), Some("tokens" | "requests")))
        {
            return Some(InvalidRequest);
        }
        if self.kind.as_deref() == Some("apierror") && msg == "overloaded" {
            return Some(Overloaded);
        }
        if self.moderation && status == Some(403) {
            return Some(PolicyBlock);
        }
        // `code` first, then `type`, then the other named fields.
        let tokens = [
            &self.code,
            &self.kind,
            &self.status,
            &self.detail,
            &self.inner,
            &self.reason,
            &self.aws,
        ];
        if let Some(c) = tokens
            .into_iter()
            .flatten()
            .find_map(|t| token_class(t.as_str()))
        {
            return Some(c);
        }
        // Wording that only the message carries, for statuses that say "your request".
        if matches!(status, None | Some(400 | 413 | 422)) {
            if mentions_context_limit(msg) {
                return Some(ContextOverflow);
            }
            if msg.starts_with("api key not valid") {
                return Some(Auth);
            }
        }
        None
    }

    /// Broad types that only decide when no status does (in-band stream errors).
    fn generic(&self) -> Option<FailureClass> {
        [&self.code, &self.kind, &self.status, &self.aws]
            .into_iter()
            .flatten()
            .find_map(|t| generic_class(t.as_str()))
    }
}

/// The class of a status alone.
pub(crate) fn by_status(status: u16) -> FailureClass {
    match status {
        401 | 403 => FailureClass::Auth,
        402 => FailureClass::QuotaExhausted,
        408 => FailureClass::Timeout,
        409 => FailureClass::Conflict,
        429 => FailureClass::RateLimited,
        498 | 503 | 529 => FailureClass::Overloaded,
        500..=599 => FailureClass::ServerError,
        _ => FailureClass::InvalidRequest,
    }
}

/// Codes and types that name a class precisely.
fn token_class(t: &str) -> Option<FailureClass> {
    use FailureClass::*;
    Some(match t {
        "insufficientquota"
        | "creditbalanceexhausted"
        | "organizationspendlimitexceeded"
        | "projectspendlimitexceeded"
        | "organizationusagelimitexceeded"
        | "billingerror"
        | "billinghardlimitreached"
        | "billingnotactive"
        | "servicequotaexceededexception" => QuotaExhausted,
        "contextlengthexceeded" => ContextOverflow,
        "contentpolicyviolation"
        | "contentfilter"
        | "moderationblocked"
        | "responsibleaipolicyviolation" => PolicyBlock,
        "invalidapikey"
        | "authenticationerror"
        | "permissionerror"
        | "unsupportedcountryregionterritory"
        | "accountdeactivated"
        | "apikeyinvalid"
        | "apikeyexpired"
        | "permissiondenied"
        | "unauthenticated"
        | "accessdeniedexception"
        | "unrecognizedclientexception"
        | "expiredtokenexception"
        | "invalidsignatureexception" => Auth,
        "overloadederror"
        | "serverisoverloaded"
        | "unavailable"
        | "serviceunavailable"
        | "serviceunavailableexception"
        | "modelnotreadyexception" => Overloaded,
        t if t.ends_with("capacityexceeded") => Overloaded,
        "ratelimitexceeded"
        | "slowdown"
        | "ratelimiterror"
        | "ratelimited"
        | "resourceexhausted"
        | "throttlingexception"
        | "toomanyrequestsexception" => RateLimited,
        "modeltimeoutexception" => Timeout,
        _ => return None,
    })
}

/// Broad types: decide only without a status.
fn generic_class(t: &str) -> Option<FailureClass> {
    use FailureClass::*;
    Some(match t {
        "servererror"
        | "apierror"
        | "internal"
        | "internalerror"
        | "internalservererror"
        | "internalserverexception"
        | "deadlineexceeded"
        | "timeouterror"
        | "modelerrorexception"
        | "modelstreamerrorexception" => ServerError,
        "invalidrequesterror"
        | "invalidargument"
        | "failedprecondition"
        | "outofrange"
        | "notfound"
        | "notfounderror"
        | "modelnotfound"
        | "requesttoolarge"
        | "invalidprompt"
        | "validationexception"
        | "resourcenotfoundexception" => InvalidRequest,
        "conflict" | "aborted" => Conflict,
        _ => return None,
    })
}

/// Whether a (lowercased) message says the prompt does not fit the context window.
fn mentions_context_limit(msg: &str) -> bool {
    const PHRASES: [&str; 7] = [
        "prompt is too long",
        "maximum context length",
        "context length",
        "context window",
        "context limit",
        "input is too long",
        "too many tokens",
    ];
    const TOKEN_LIMIT: [&str; 5] = [
        "exceeds the maximum",
        "maximum number of tokens",
        "token limit",
        "supports up to",
        "exceeds the limit",
    ];
    PHRASES.iter().any(|p| msg.contains(p))
        || (msg.contains("token") && TOKEN_LIMIT.iter().any(|p| msg.contains(p)))
}

/// The error type in `x-amzn-ErrorType: ThrottlingException:http://…` or
/// `com.amazon.coral#ThrottlingException`.
fn aws_error_type(raw: &str) -> &str {
    let t = raw.split(':').next().unwrap_or("");
    t.rsplit('#').next().unwrap_or("").trim()
}

/// A numeric code that is an HTTP error status.
fn http_status(n: Option<u64>) -> Option<u16> {
    n.filter(|n| (400..=599).contains(n))
        .and_then(|n| u16::try_from(n).ok())
}

/// ASCII-lowercase letters and digits of `s` (bounded): the form tokens are matched in.
fn norm(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(MAX_FIELD)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// `s` trimmed, without control characters, at most [`MAX_FIELD`] characters; `None` if
/// empty. Provider fields end up in logs: bound them.
pub(crate) fn bounded(s: &str) -> Option<String> {
    let s: String = s
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_FIELD)
        .collect();
    (!s.is_empty()).then_some(s)
}
