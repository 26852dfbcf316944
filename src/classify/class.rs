use std::fmt;

/// What kind of failure an attempt ended in: the row of the recovery ladder's table.
///
/// The class decides the default action (retry the same route, switch route, count for the
/// breaker, or fail closed); see [`ClassActions`](crate::policy::ClassActions) for the table
/// and how a policy changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum FailureClass {
    /// The connection was refused or reset before a response byte arrived: the request was not
    /// processed, so replaying it is always safe.
    Connect,
    /// No response head or first token in time. The provider may have accepted the request.
    Timeout,
    /// Any other transport failure (a protocol error, a body that broke while being read).
    Transport,
    /// A transient rate limit (429 `rate_limit_exceeded`, Anthropic 429 with `retry-after`, …).
    RateLimited,
    /// The provider is overloaded (529, 503, `overloaded_error`, Gemini `UNAVAILABLE`, Groq 498).
    Overloaded,
    /// A server error (500, 502, 504).
    ServerError,
    /// A conflicting concurrent request (409); the official SDKs retry it.
    Conflict,
    /// Billing quota or spend cap exhausted (429 `insufficient_quota`, 402, spend limits).
    QuotaExhausted,
    /// The prompt does not fit the model's context window.
    ContextOverflow,
    /// The request itself is wrong (other 400, 404, 413, 422, "Request too large").
    InvalidRequest,
    /// The credentials are missing, invalid or not permitted (401, 403).
    Auth,
    /// A content filter or safety system blocked the request or the answer.
    PolicyBlock,
    /// A stream failed after bytes of it had reached the caller.
    StreamInterrupted,
}

impl FailureClass {
    /// Every class, in table order.
    pub const ALL: [FailureClass; 13] = [
        FailureClass::Connect,
        FailureClass::Timeout,
        FailureClass::Transport,
        FailureClass::RateLimited,
        FailureClass::Overloaded,
        FailureClass::ServerError,
        FailureClass::Conflict,
        FailureClass::QuotaExhausted,
        FailureClass::ContextOverflow,
        FailureClass::InvalidRequest,
        FailureClass::Auth,
        FailureClass::PolicyBlock,
        FailureClass::StreamInterrupted,
    ];

    /// The stable snake_case name used in logs, tracing fields and policy files.
    pub const fn as_str(self) -> &'static str {
        match self {
            FailureClass::Connect => "connect",
            FailureClass::Timeout => "timeout",
            FailureClass::Transport => "transport",
            FailureClass::RateLimited => "rate_limited",
            FailureClass::Overloaded => "overloaded",
            FailureClass::ServerError => "server_error",
            FailureClass::Conflict => "conflict",
            FailureClass::QuotaExhausted => "quota_exhausted",
            FailureClass::ContextOverflow => "context_overflow",
            FailureClass::InvalidRequest => "invalid_request",
            FailureClass::Auth => "auth",
            FailureClass::PolicyBlock => "policy_block",
            FailureClass::StreamInterrupted => "stream_interrupted",
        }
    }

    /// Parses the name returned by [`as_str`](Self::as_str).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether the failure says something about the provider's health (as opposed to the
    /// caller's request, credentials or money). Only these can trip a circuit breaker by default.
    pub const fn is_provider_health(self) -> bool {
        matches!(
            self,
            FailureClass::Connect
                | FailureClass::Timeout
                | FailureClass::Transport
                | FailureClass::Overloaded
                | FailureClass::ServerError
                | FailureClass::StreamInterrupted
        )
    }

    /// Whether the provider may have accepted (and billed) the request although no answer came.
    /// Replaying such a request needs the policy's idempotency rule to allow it.
    pub const fn possibly_accepted(self) -> bool {
        matches!(self, FailureClass::Timeout | FailureClass::Transport)
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
