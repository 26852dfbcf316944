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
    /// Longest silence between events (pings and comments count as life).
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
        Ok(())
    }
}
