use std::collections::BTreeMap;
use std::time::Duration;

use super::error::{PolicyError, check};

/// Where a streamed answer is committed: from then on bytes have reached the caller and no
/// layer may retry or fall back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "at", rename_all = "snake_case", deny_unknown_fields)
)]
#[non_exhaustive]
pub enum CommitPoint {
    /// Hand the response up once the first content-bearing event has arrived (interactive).
    #[default]
    FirstEvent,
    /// Hold back this many bytes first.
    AfterBytes {
        /// Bytes held back.
        bytes: u64,
    },
    /// Hold back for this long first.
    AfterDuration {
        /// Time held back.
        #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
        duration: Duration,
    },
    /// Buffer the whole stream and hand it up only once it ended correctly (batch).
    End,
}

/// Stream timeouts and commit point, for every route or one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct StreamSettings {
    /// From sending the request to the first content-bearing event (first byte for non-SSE).
    #[cfg_attr(
        feature = "serde",
        serde(with = "crate::duration::serde_duration::option")
    )]
    pub first_token_timeout: Option<Duration>,
    /// Longest silence between events (pings and comments count as life); for an error
    /// response, the longest wait from its head for the part of its body read to classify it.
    #[cfg_attr(
        feature = "serde",
        serde(with = "crate::duration::serde_duration::option")
    )]
    pub idle_timeout: Option<Duration>,
    /// Bound on the whole response.
    #[cfg_attr(
        feature = "serde",
        serde(with = "crate::duration::serde_duration::option")
    )]
    pub total_timeout: Option<Duration>,
    /// Commit point.
    pub commit: CommitPoint,
    /// Most bytes held back before the commit point. A stream that needs more fails closed
    /// (class `invalid_request`): the same request would outgrow the buffer again.
    pub max_buffer: u64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            first_token_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(30)),
            total_timeout: Some(Duration::from_secs(600)),
            commit: CommitPoint::FirstEvent,
            max_buffer: 8 * 1024 * 1024,
        }
    }
}

impl StreamSettings {
    fn validate(&self, field: &str) -> Result<(), PolicyError> {
        for (name, d) in [
            ("first_token_timeout", self.first_token_timeout),
            ("idle_timeout", self.idle_timeout),
            ("total_timeout", self.total_timeout),
        ] {
            if let Some(d) = d {
                check::positive(&format!("{field}.{name}"), d)?;
            }
        }
        if let (Some(first), Some(total)) = (self.first_token_timeout, self.total_timeout) {
            check::ordered(
                &format!("{field}.first_token_timeout"),
                first,
                &format!("{field}.total_timeout"),
                total,
            )?;
        }
        match self.commit {
            CommitPoint::AfterBytes { bytes } => {
                check::at_least_one(&format!("{field}.commit.bytes"), bytes)?;
                if bytes > self.max_buffer {
                    return Err(PolicyError::new(
                        format!("{field}.commit.bytes"),
                        "must not exceed `max_buffer`",
                    ));
                }
            }
            CommitPoint::AfterDuration { duration } => {
                check::positive(&format!("{field}.commit.duration"), duration)?;
            }
            CommitPoint::FirstEvent | CommitPoint::End => {}
        }
        check::at_least_one(&format!("{field}.max_buffer"), self.max_buffer)
    }
}

/// The stream guard's settings: the defaults for every route, and per-route replacements.
///
/// ```toml
/// [stream]
/// first_token_timeout = "20s"
/// idle_timeout = "15s"
/// commit = { at = "first_event" }
///
/// [stream.routes.batch-backup]
/// commit = { at = "end" }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct StreamPolicy {
    /// Settings for every route without its own.
    #[cfg_attr(
        feature = "serde",
        serde(with = "crate::duration::serde_duration::option")
    )]
    pub first_token_timeout: Option<Duration>,
    /// See [`StreamSettings::idle_timeout`].
    #[cfg_attr(
        feature = "serde",
        serde(with = "crate::duration::serde_duration::option")
    )]
    pub idle_timeout: Option<Duration>,
    /// See [`StreamSettings::total_timeout`].
    #[cfg_attr(
        feature = "serde",
        serde(with = "crate::duration::serde_duration::option")
    )]
    pub total_timeout: Option<Duration>,
    /// See [`StreamSettings::commit`].
    pub commit: CommitPoint,
    /// See [`StreamSettings::max_buffer`].
    pub max_buffer: u64,
    /// Settings for particular routes, by route name.
    pub routes: BTreeMap<String, StreamSettings>,
    /// Finishing a stream cut after its commit point on a backup route (off by default).
    pub continuation: ContinuationPolicy,
}

impl Default for StreamPolicy {
    fn default() -> Self {
        Self::from_settings(StreamSettings::default())
    }
}

impl StreamPolicy {
    /// A policy with the same settings for every route.
    pub fn from_settings(s: StreamSettings) -> Self {
        Self {
            first_token_timeout: s.first_token_timeout,
            idle_timeout: s.idle_timeout,
            total_timeout: s.total_timeout,
            commit: s.commit,
            max_buffer: s.max_buffer,
            routes: BTreeMap::new(),
            continuation: ContinuationPolicy::default(),
        }
    }

    /// The settings for routes without their own.
    pub fn defaults(&self) -> StreamSettings {
        StreamSettings {
            first_token_timeout: self.first_token_timeout,
            idle_timeout: self.idle_timeout,
            total_timeout: self.total_timeout,
            commit: self.commit,
            max_buffer: self.max_buffer,
        }
    }

    /// The settings for `route` (the defaults when it has none of its own).
    pub fn for_route(&self, route: Option<&str>) -> StreamSettings {
        route
            .and_then(|r| self.routes.get(r).copied())
            .unwrap_or_else(|| self.defaults())
    }

    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.defaults().validate("stream")?;
        for (name, s) in &self.routes {
            s.validate(&format!("stream.routes.{name}"))?;
        }
        self.continuation.validate()
    }
}

/// A failure after the commit point that a continuation may finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum ContinuationCause {
    /// The connection broke or the body reported an error
    /// ([`StreamCause::Disconnected`](crate::StreamCause::Disconnected)).
    ConnectionLost,
    /// Silence longer than the idle timeout
    /// ([`StreamCause::IdleTimeout`](crate::StreamCause::IdleTimeout)).
    IdleTimeout,
    /// An error event in the stream
    /// ([`StreamCause::InBandError`](crate::StreamCause::InBandError)).
    InBandError,
    /// The stream ended without its terminal marker and without a finish reason
    /// ([`StreamCause::Truncated`](crate::StreamCause::Truncated)).
    Truncated,
}

impl ContinuationCause {
    /// Every cause, in the order of the policy's default list.
    pub const ALL: [ContinuationCause; 4] = [
        ContinuationCause::ConnectionLost,
        ContinuationCause::IdleTimeout,
        ContinuationCause::InBandError,
        ContinuationCause::Truncated,
    ];

    /// The cause a stream failure stands for; `None` for the failures no continuation finishes
    /// (the total bound, which says the answer has taken long enough; an outgrown buffer).
    pub fn of(cause: &crate::StreamCause) -> Option<Self> {
        use crate::StreamCause as S;
        match cause {
            S::Disconnected => Some(Self::ConnectionLost),
            S::IdleTimeout(_) => Some(Self::IdleTimeout),
            S::InBandError { .. } => Some(Self::InBandError),
            S::Truncated => Some(Self::Truncated),
            _ => None,
        }
    }
}

/// The instruction an OpenAI-compatible route gets with the partial answer (see
/// [`ContinuationPolicy::instruction`]).
pub const DEFAULT_CONTINUATION_INSTRUCTION: &str = "Your previous reply was cut off. The assistant message that follows is its beginning. Continue exactly where it ends, without repeating any of it and without commenting on the interruption.";

/// `[stream.continuation]`: finishing a stream that died after its commit point on a backup
/// route that accepts the partial answer as a prefill, instead of ending it with
/// `StreamInterrupted`.
///
/// Off by default, and not turned on by any preset: a continuation is another model finishing
/// someone else's sentence, which only the workflow's owner can judge acceptable. It takes
/// effect only in a [`Fallback`](crate::fallback::Fallback) service whose continuation sender
/// is installed ([`Fallback::enable_continuation`](crate::fallback::Fallback::enable_continuation)),
/// on backup routes marked [`supports_prefill`](crate::policy::RouteConfig::supports_prefill).
///
/// ```toml
/// [stream.continuation]
/// enabled = true
/// causes = ["connection_lost", "idle_timeout", "in_band_error", "truncated"]
/// max_continuations = 1
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct ContinuationPolicy {
    /// Whether a stream cut after its commit point may be continued at all.
    pub enabled: bool,
    /// The failures that may be continued (by default all of [`ContinuationCause::ALL`]).
    pub causes: Vec<ContinuationCause>,
    /// Most continuations per request, each its own attempt on its own route.
    pub max_continuations: u32,
    /// What an OpenAI-compatible route (wire form `openai`) is told, as a system message just
    /// before the partial answer. Anthropic's final assistant message and Mistral's
    /// `prefix: true` are native prefills and get no instruction.
    pub instruction: String,
}

impl Default for ContinuationPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            causes: ContinuationCause::ALL.to_vec(),
            max_continuations: 1,
            instruction: DEFAULT_CONTINUATION_INSTRUCTION.to_owned(),
        }
    }
}

impl ContinuationPolicy {
    /// Continuation on, for every cause, once per request.
    pub fn enabled() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
    }

    /// Whether `cause` may be continued under this policy.
    pub fn allows(&self, cause: &crate::StreamCause) -> bool {
        self.enabled && ContinuationCause::of(cause).is_some_and(|c| self.causes.contains(&c))
    }

    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !self.enabled {
            return Ok(());
        }
        check::at_least_one(
            "stream.continuation.max_continuations",
            self.max_continuations.into(),
        )?;
        if self.causes.is_empty() {
            return Err(PolicyError::new(
                "stream.continuation.causes",
                "must name at least one cause (or set `enabled = false`)",
            ));
        }
        if self.instruction.trim().is_empty() {
            return Err(PolicyError::new(
                "stream.continuation.instruction",
                "must not be empty",
            ));
        }
        Ok(())
    }
}
