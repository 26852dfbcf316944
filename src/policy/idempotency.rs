use super::error::{PolicyError, check};

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
    /// Header in which one key per logical request is set (once, then reused by every attempt);
    /// no key is set when `None`. A key the caller already set is kept.
    pub key_header: Option<String>,
    /// When a possibly-accepted request may be replayed.
    pub replay_possibly_accepted: ReplayRule,
}

impl Default for IdempotencyPolicy {
    fn default() -> Self {
        Self {
            key_header: None,
            replay_possibly_accepted: ReplayRule::IfIdempotent,
        }
    }
}

impl IdempotencyPolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(h) = &self.key_header {
            check::header_name("idempotency.key_header", h)?;
        }
        Ok(())
    }
}
