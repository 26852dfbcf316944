use std::time::Duration;

use super::error::{PolicyError, check};

/// Where shared state lives, and what happens when that place cannot be reached.
///
/// Without a `url` every layer keeps its state in this process. With one (and a store built
/// from it, such as `redis::RedisStore` with the `redis` feature), spend caps, rate limits
/// and circuit breakers hold across every replica that shares it.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct StorePolicy {
    /// The store's address, such as `redis://10.0.0.5:6379/0`; `None` keeps state in memory.
    pub url: Option<String>,
    /// Put before every key, so that several policies (or applications) share one server.
    pub key_prefix: String,
    /// The longest a request waits for one store call; past it, the store counts as down.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub timeout: Duration,
    /// Added to a request's deadline to make the lease of its spend reservations: a replica
    /// that dies never holds cap for longer than that.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub lease_margin: Duration,
    /// What each kind of state does while the store is down.
    pub mode: StoreModes,
}

impl Default for StorePolicy {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "llm".to_owned(),
            timeout: Duration::from_millis(50),
            lease_margin: Duration::from_secs(30),
            mode: StoreModes::default(),
        }
    }
}

/// What each kind of shared state does while its store is down.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct StoreModes {
    /// Spend caps; fail closed by default (a cap that cannot be checked is not a cap).
    pub spend: StoreMode,
    /// Rate limits; carry on locally by default.
    pub rate_limit: StoreMode,
    /// Circuit breakers; carry on locally by default.
    pub circuit_breaker: StoreMode,
    /// The share of a fleet-wide limit (spend cap, rate) one replica may use on its own while
    /// the store is down, in (0, 1]: with four replicas, `0.25` keeps the fleet within the
    /// limit.
    pub local_share: f64,
}

impl Default for StoreModes {
    fn default() -> Self {
        Self {
            spend: StoreMode::FailClosed,
            rate_limit: StoreMode::Local,
            circuit_breaker: StoreMode::Local,
            local_share: 0.25,
        }
    }
}

/// What a kind of shared state does while its store is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum StoreMode {
    /// Deny with `ErrorKind::StoreUnavailable`.
    FailClosed,
    /// Carry on with this replica's own state (and, for limits, its `local_share`).
    Local,
}

impl StorePolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(url) = &self.url {
            let scheme_ok = url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("redis+unix://")
                || url.starts_with("unix://");
            if !scheme_ok {
                return Err(PolicyError::new(
                    "store.url",
                    "must be a redis:// (or rediss://, unix://) address",
                ));
            }
        }
        let prefix_ok = !self.key_prefix.is_empty()
            && self.key_prefix.len() <= 64
            && self
                .key_prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
        if !prefix_ok {
            return Err(PolicyError::new(
                "store.key_prefix",
                "must be 1 to 64 printable ASCII characters without `{` or `}`",
            ));
        }
        check::positive("store.timeout", self.timeout)?;
        if self.timeout > Duration::from_secs(5) {
            return Err(PolicyError::new(
                "store.timeout",
                "must be at most 5s: requests wait for it",
            ));
        }
        check::positive("store.lease_margin", self.lease_margin)?;
        let share = self.mode.local_share;
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            return Err(PolicyError::new(
                "store.mode.local_share",
                "must be greater than 0 and at most 1",
            ));
        }
        Ok(())
    }
}
