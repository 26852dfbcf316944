use std::fmt;

/// A policy value that makes no sense, found when the policy is validated or a layer is built.
///
/// Names the offending field by its path in the policy file (`retry.backoff.cap`) and says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    field: String,
    reason: String,
}

impl PolicyError {
    /// A new error for `field` (a dotted path such as `"retry.max_attempts"`).
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The dotted path of the offending field, e.g. `retry.backoff.cap`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Why the value is rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy: `{}` {}", self.field, self.reason)
    }
}

impl std::error::Error for PolicyError {}

/// Small checks shared by every section's `validate`.
pub(crate) mod check {
    use super::PolicyError;
    use std::time::Duration;

    pub(crate) fn positive(field: &str, d: Duration) -> Result<(), PolicyError> {
        if d.is_zero() {
            return Err(PolicyError::new(field, "must be greater than zero"));
        }
        Ok(())
    }

    pub(crate) fn ratio(field: &str, r: f64) -> Result<(), PolicyError> {
        if !(0.0..=1.0).contains(&r) {
            return Err(PolicyError::new(
                field,
                format!("must be a ratio between 0 and 1, got {r}"),
            ));
        }
        Ok(())
    }

    pub(crate) fn at_least_one(field: &str, n: u64) -> Result<(), PolicyError> {
        if n == 0 {
            return Err(PolicyError::new(field, "must be at least 1"));
        }
        Ok(())
    }

    pub(crate) fn ordered(
        lo_field: &str,
        lo: Duration,
        hi_field: &str,
        hi: Duration,
    ) -> Result<(), PolicyError> {
        if hi < lo {
            return Err(PolicyError::new(
                hi_field,
                format!("must not be smaller than `{lo_field}` ({lo:?} > {hi:?})"),
            ));
        }
        Ok(())
    }

    pub(crate) fn header_name(field: &str, name: &str) -> Result<(), PolicyError> {
        http::HeaderName::from_bytes(name.as_bytes())
            .map(|_| ())
            .map_err(|_| PolicyError::new(field, format!("{name:?} is not a valid header name")))
    }
}
