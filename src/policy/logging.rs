use super::error::PolicyError;

/// What the attempt log and tracing record. Bodies and credentials are never recorded,
/// whatever these say.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct LoggingPolicy {
    /// Emit a `tracing` event per attempt and per local decision.
    pub tracing: bool,
    /// Record provider request ids (`x-request-id`, `request-id`, …) in the log.
    pub request_ids: bool,
}

impl Default for LoggingPolicy {
    fn default() -> Self {
        Self {
            tracing: true,
            request_ids: true,
        }
    }
}

impl LoggingPolicy {
    /// Checks every value; see [`PolicyError`]. (Nothing here can be wrong today.)
    pub fn validate(&self) -> Result<(), PolicyError> {
        Ok(())
    }
}
