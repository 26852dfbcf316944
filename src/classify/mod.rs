//! Failure classification: what kind of failure an attempt ended in.
//!
//! Every layer decides from a [`Classification`]. The first crate layer that sees a response
//! classifies it — reading, for error statuses only, a bounded prefix of the body, which it
//! hands back intact — and stores the `Classification` in the response extensions; the layers
//! above reuse it instead of reading the body again.
//!
//! [`DefaultClassifier`] knows the error shapes of OpenAI, Azure OpenAI, Anthropic,
//! Gemini/Vertex, Bedrock, Mistral, Groq and OpenRouter; implement [`Classifier`] to refine or
//! replace it.
//!
//! # Example
//!
//! ```
//! use tower_llm_resilience::classify::{Classifier, DefaultClassifier, FailureClass};
//!
//! let headers = http::HeaderMap::new();
//! let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
//! let rate = br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
//! let c = DefaultClassifier::default();
//! // Same status, different contract: only the body tells them apart.
//! assert_eq!(c.classify_response(http::StatusCode::TOO_MANY_REQUESTS, &headers, quota).class,
//!            Some(FailureClass::QuotaExhausted));
//! assert_eq!(c.classify_response(http::StatusCode::TOO_MANY_REQUESTS, &headers, rate).class,
//!            Some(FailureClass::RateLimited));
//! ```

mod class;
mod default;
pub mod hints;
mod peek;
mod providers;

use std::sync::Arc;

use http::{HeaderMap, StatusCode};

pub use class::FailureClass;
pub use default::{DefaultClassifier, classify_stream_error};
pub use hints::{HintSource, WaitHint};
pub use peek::ClassifyResponse;

/// Everything the ladder needs to know about how an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Classification {
    /// The failure class; `None` for a success.
    pub class: Option<FailureClass>,
    /// HTTP status, if a response came.
    #[cfg_attr(feature = "serde", serde(serialize_with = "status_ser"))]
    pub status: Option<StatusCode>,
    /// The provider's error type (`rate_limit_error`, `RESOURCE_EXHAUSTED`, …).
    pub error_type: Option<String>,
    /// The provider's error code (`insufficient_quota`, `context_length_exceeded`, …).
    pub error_code: Option<String>,
    /// How long the server asked to wait before the next attempt.
    pub wait_hint: Option<WaitHint>,
    /// The server's `x-should-retry` verdict, which overrides the class's retry rule.
    pub should_retry: Option<bool>,
    /// The provider's request id (`x-request-id`, `request-id`, …).
    pub request_id: Option<String>,
}

#[cfg(feature = "serde")]
fn status_ser<S: serde::Serializer>(s: &Option<StatusCode>, ser: S) -> Result<S::Ok, S::Error> {
    match s {
        Some(s) => ser.serialize_some(&s.as_u16()),
        None => ser.serialize_none(),
    }
}

impl Classification {
    /// A success with `status`.
    pub fn success(status: StatusCode) -> Self {
        Self {
            status: Some(status),
            ..Self::default()
        }
    }

    /// A failure of `class`.
    pub fn failure(class: FailureClass) -> Self {
        Self {
            class: Some(class),
            ..Self::default()
        }
    }

    /// Whether the attempt succeeded.
    pub fn is_success(&self) -> bool {
        self.class.is_none()
    }
}

/// Decides the [`Classification`] of a response or a transport error.
pub trait Classifier: Send + Sync + 'static {
    /// Whether the body must be read to classify a response with this head. The default reads
    /// error bodies (4xx, 5xx) only.
    fn wants_body(&self, status: StatusCode, _headers: &HeaderMap) -> bool {
        status.is_client_error() || status.is_server_error()
    }

    /// Classifies a response from its head and (when [`wants_body`](Self::wants_body) said so)
    /// a bounded prefix of its body; `body` is empty otherwise.
    fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Classification;

    /// Classifies an error of the inner service from its source chain.
    fn classify_error(&self, error: &(dyn std::error::Error + 'static)) -> Classification;

    /// Classifies the `data:` payload of an SSE event that may be an in-band error, like its
    /// HTTP equivalent; `None` when the payload is not an error. The default is
    /// [`classify_stream_error`].
    fn classify_stream_error(&self, data: &[u8]) -> Option<Classification> {
        classify_stream_error(data)
    }
}

/// The default bound on the error-body prefix read for classification.
pub const DEFAULT_PEEK_LIMIT: usize = 64 * 1024;

/// A cheap-to-clone classifier handle with its body-peek bound, as the layers hold it.
#[derive(Clone)]
pub struct SharedClassifier {
    inner: Arc<dyn Classifier>,
    peek_limit: usize,
}

impl Default for SharedClassifier {
    fn default() -> Self {
        Self::new(DefaultClassifier::default())
    }
}

impl std::fmt::Debug for SharedClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedClassifier")
            .field("peek_limit", &self.peek_limit)
            .finish_non_exhaustive()
    }
}

impl SharedClassifier {
    /// Wraps `classifier` with the default peek bound (64 KiB).
    pub fn new(classifier: impl Classifier) -> Self {
        Self {
            inner: Arc::new(classifier),
            peek_limit: DEFAULT_PEEK_LIMIT,
        }
    }

    /// Sets how many bytes of an error body are read at most; beyond it the response is
    /// classified by status and headers.
    pub fn with_peek_limit(mut self, bytes: usize) -> Self {
        self.peek_limit = bytes;
        self
    }

    /// The peek bound.
    pub fn peek_limit(&self) -> usize {
        self.peek_limit
    }

    /// Classifies `response`: reuses a `Classification` already in its extensions, or reads a
    /// bounded prefix of an error body, classifies, stores the result in the extensions, and
    /// hands the body back intact.
    pub fn classify_response<B>(&self, response: http::Response<B>) -> ClassifyResponse
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<crate::BoxError>,
    {
        ClassifyResponse::new(
            self.inner.clone(),
            self.peek_limit,
            response.map(crate::Body::new),
        )
    }

    /// Classifies the answer to an attempt a layer handed inward when the log's attempt count
    /// was `mark`: a success that a crate layer nearer the transport already recorded is taken
    /// as it is, without working it out again, and only a failure is stored in the extensions.
    pub(crate) fn classify_attempt<B>(
        &self,
        response: http::Response<B>,
        log: &crate::AttemptLog,
        mark: usize,
    ) -> ClassifyResponse
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<crate::BoxError>,
    {
        let future = self.classify_response(response).failures_only();
        match log.recorded_since(mark) {
            Some(None) => future.known_success(),
            _ => future,
        }
    }

    /// Classifies an inner service's error.
    pub fn classify_error(&self, error: &(dyn std::error::Error + 'static)) -> Classification {
        self.inner.classify_error(error)
    }

    /// Classifies an in-band stream error payload; `None` when it is not an error.
    pub fn classify_stream_error(&self, data: &[u8]) -> Option<Classification> {
        self.inner.classify_stream_error(data)
    }

    /// Turns an inner service's error into a crate [`Error`](crate::Error), classified
    /// (a crate error passes through unchanged).
    pub fn error(&self, error: impl Into<crate::BoxError>) -> crate::Error {
        crate::Error::from_service_error(error, |e| self.inner.classify_error(e))
    }

    /// The classifier itself.
    pub fn classifier(&self) -> &dyn Classifier {
        &*self.inner
    }
}
