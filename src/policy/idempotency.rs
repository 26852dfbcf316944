use std::time::Duration;

use http::{HeaderMap, HeaderName, Method};

use super::error::{PolicyError, check};

/// The idempotency header read when the policy names none (the providers' and the
/// conventional one).
pub(crate) const CONVENTIONAL_KEY_HEADER: HeaderName = HeaderName::from_static("idempotency-key");

/// Whether a request may be sent twice without harm: its method is idempotent, or it carries
/// an idempotency key (in `key_header`, else [`CONVENTIONAL_KEY_HEADER`]).
pub(crate) fn safe_to_repeat(
    method: &Method,
    headers: &HeaderMap,
    key_header: Option<&HeaderName>,
) -> bool {
    method.is_idempotent() || headers.contains_key(key_header.unwrap_or(&CONVENTIONAL_KEY_HEADER))
}

/// When a request the provider may already have accepted (a timeout, a broken connection after
/// the request was sent) may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum ReplayRule {
    /// Never replay a possibly-accepted request.
    Never,
    /// Replay only when the request carries an idempotency key or its method is idempotent
    /// (the default: a `POST` without a key is never sent twice after a timeout).
    #[default]
    IfIdempotent,
    /// Always replay (the official SDKs' behaviour; risks a double charge).
    Always,
}

/// Idempotency keys and the replay rule for possibly-accepted requests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct IdempotencyPolicy {
    /// Header in which one key per logical request and route is set (once, then reused by
    /// every attempt to that route: retries, a same-route hedge, a hop back); a backup route,
    /// sent another body, gets its own. No key is set when `None`; a key the caller already
    /// set is kept, on every route.
    pub key_header: Option<String>,
    /// When a possibly-accepted request may be replayed.
    pub replay_possibly_accepted: ReplayRule,
    /// Remember complete answers by their idempotency key, so that the same request sent
    /// again gets the first answer instead of a second generation; off when `None`.
    pub cache: Option<CachePolicy>,
}

impl Default for IdempotencyPolicy {
    fn default() -> Self {
        Self {
            key_header: None,
            replay_possibly_accepted: ReplayRule::IfIdempotent,
            cache: None,
        }
    }
}

impl IdempotencyPolicy {
    /// `key_header` as a header name; an invalid one is a [`PolicyError`] naming the field.
    pub(crate) fn key_header_name(&self) -> Result<Option<HeaderName>, PolicyError> {
        self.key_header
            .as_deref()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes()).map_err(|_| {
                    PolicyError::new(
                        "idempotency.key_header",
                        format!("{n:?} is not a valid header name"),
                    )
                })
            })
            .transpose()
    }
}

/// The idempotent result cache: see `cache::CacheLayer`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct CachePolicy {
    /// How long an answer is kept.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub ttl: Duration,
    /// The largest answer (body bytes) kept; a larger one is passed on and not kept.
    pub max_entry_bytes: u64,
    /// The most answers kept at once; the least recently used goes first.
    pub max_entries: u64,
    /// What a request does while the first one with its key is still being answered.
    pub in_flight: InFlightRule,
    /// How long the first request holds its key before another may try: a request whose
    /// replica died never holds it for longer.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub lock_ttl: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(600),
            max_entry_bytes: 1024 * 1024,
            max_entries: 10_000,
            in_flight: InFlightRule::Wait,
            lock_ttl: Duration::from_secs(600),
        }
    }
}

/// What a request does while another with the same idempotency key is being answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum InFlightRule {
    /// Wait for the first answer and get it (single flight).
    #[default]
    Wait,
    /// Be refused at once with `ErrorKind::InFlight`.
    Refuse,
}

impl IdempotencyPolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(h) = &self.key_header {
            check::header_name("idempotency.key_header", h)?;
        }
        if let Some(c) = &self.cache {
            check::positive("idempotency.cache.ttl", c.ttl)?;
            check::positive("idempotency.cache.lock_ttl", c.lock_ttl)?;
            check::at_least_one("idempotency.cache.max_entry_bytes", c.max_entry_bytes)?;
            check::at_least_one("idempotency.cache.max_entries", c.max_entries)?;
        }
        Ok(())
    }
}
