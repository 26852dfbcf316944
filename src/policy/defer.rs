use std::time::Duration;

use super::error::{PolicyError, check};
use crate::classify::FailureClass;

/// The queue rung: which requests that reached the end of the ladder unanswered are written
/// down as [`DeferredRequest`](crate::defer::DeferredRequest) records, to be replayed later by
/// a [`DeferredWorker`](crate::defer::DeferredWorker), instead of failing.
///
/// It takes effect once the budget layer has a sink
/// ([`BudgetLayer::defer_to`](crate::budget::BudgetLayer::defer_to)); without one the request
/// fails as it would without this section.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct DeferPolicy {
    /// The failure classes whose end is deferred: transient ones only. A client-side rate
    /// limit, an open circuit and a throttled route are deferred too when their class
    /// (`rate_limited`, `overloaded`) is listed.
    pub classes: Vec<FailureClass>,
    /// When the first replay is due if the failure named no time (a `Retry-After`, the local
    /// limit's refill, the breaker's next probe).
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub first_delay: Duration,
    /// The longest delay before a replay. A replay refused again waits at least
    /// `first_delay` doubled once per earlier deferral (or the failure's own time, if longer),
    /// up to this.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub max_delay: Duration,
    /// How often one record may be deferred; a replay that fails after this many ends as a
    /// dead letter.
    pub max_deferrals: u32,
    /// A lease on a record that its worker has not renewed for this long (the worker died) is
    /// given to another worker.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub claim_after: Duration,
    /// How often an idle worker looks for due records when the sink cannot say when the next
    /// one is due.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub poll_interval: Duration,
    /// Header naming who asked for the request (the record's `requester`); a
    /// [`Requester`](crate::defer::Requester) extension takes precedence, the budget owner is
    /// the fallback.
    pub requester_header: String,
    /// Headers removed from a record besides the credential headers
    /// ([`CREDENTIAL_HEADERS`](crate::policy::CREDENTIAL_HEADERS), always removed).
    pub strip_headers: Vec<String>,
    /// The largest request body a record keeps; a larger request fails as it would without
    /// deferral.
    pub max_body_bytes: u64,
}

impl Default for DeferPolicy {
    fn default() -> Self {
        Self {
            classes: vec![
                FailureClass::RateLimited,
                FailureClass::Overloaded,
                FailureClass::ServerError,
                FailureClass::Connect,
            ],
            first_delay: Duration::from_secs(60),
            max_delay: Duration::from_secs(3600),
            max_deferrals: 5,
            claim_after: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            requester_header: "x-llm-requester".to_owned(),
            strip_headers: vec!["cookie".to_owned()],
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

impl DeferPolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        for class in &self.classes {
            // Deferring these would hide a real incident behind a queue: a bad key, a bad
            // request, a safety block, an exhausted account, a stream that reached its caller.
            let deterministic = matches!(
                class,
                FailureClass::Auth
                    | FailureClass::InvalidRequest
                    | FailureClass::PolicyBlock
                    | FailureClass::ContextOverflow
                    | FailureClass::QuotaExhausted
                    | FailureClass::StreamInterrupted
            );
            if deterministic {
                return Err(PolicyError::new(
                    "budget.defer.classes",
                    format!("`{class}` is not transient: such a request fails closed"),
                ));
            }
        }
        check::positive("budget.defer.first_delay", self.first_delay)?;
        check::ordered(
            "budget.defer.first_delay",
            self.first_delay,
            "budget.defer.max_delay",
            self.max_delay,
        )?;
        check::at_least_one("budget.defer.max_deferrals", self.max_deferrals.into())?;
        check::positive("budget.defer.claim_after", self.claim_after)?;
        check::positive("budget.defer.poll_interval", self.poll_interval)?;
        check::header_name("budget.defer.requester_header", &self.requester_header)?;
        for h in &self.strip_headers {
            check::header_name("budget.defer.strip_headers", h)?;
        }
        check::at_least_one("budget.defer.max_body_bytes", self.max_body_bytes)?;
        Ok(())
    }

    /// The delay before the replay after `deferrals` earlier deferrals, when the failure named
    /// no time: `first_delay` doubled per deferral, at most `max_delay`.
    pub fn delay(&self, deferrals: u32) -> Duration {
        let factor = 1u32.checked_shl(deferrals.min(31)).unwrap_or(u32::MAX);
        self.first_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// When a request that failed with `hint` (the failure's own time, if it named one) is
    /// replayed after `deferrals` earlier deferrals: the hint, else `first_delay`, for the
    /// first; for a replay refused again, never sooner than [`delay`](Self::delay), so that a
    /// short local wait (a throttle's) does not use up the record's deferrals in seconds. At
    /// most `max_delay`.
    pub fn replay_in(&self, hint: Option<Duration>, deferrals: u32) -> Duration {
        let wait = match (hint, deferrals) {
            (Some(hint), 0) => hint,
            (hint, n) => hint.unwrap_or_default().max(self.delay(n)),
        };
        wait.min(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_refused_again_backs_off_whatever_the_hint() {
        let p = DeferPolicy::default();
        let s = Duration::from_secs;
        // The first deferral takes the failure's own time, short or long.
        assert_eq!(p.replay_in(Some(s(10)), 0), s(10));
        assert_eq!(p.replay_in(None, 0), s(60));
        // Later ones wait at least the doubled delay, the hint when it is longer.
        assert_eq!(p.replay_in(Some(Duration::from_millis(97)), 1), s(120));
        assert_eq!(p.replay_in(Some(s(600)), 2), s(600));
        assert_eq!(p.replay_in(None, 3), s(480));
        // Never past `max_delay`.
        assert_eq!(p.replay_in(Some(s(86_400)), 0), s(3600));
        assert_eq!(p.replay_in(None, 40), s(3600));
    }

    #[test]
    fn classes_that_are_not_transient_are_refused() {
        for class in [
            FailureClass::Auth,
            FailureClass::InvalidRequest,
            FailureClass::PolicyBlock,
            FailureClass::ContextOverflow,
            FailureClass::QuotaExhausted,
            FailureClass::StreamInterrupted,
        ] {
            let mut p = DeferPolicy::default();
            p.classes.push(class);
            let e = p
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("budget.defer.classes"), "{class}: {e}");
        }
        for bad in [
            DeferPolicy {
                first_delay: Duration::from_secs(7200),
                ..DeferPolicy::default()
            },
            DeferPolicy {
                max_deferrals: 0,
                ..DeferPolicy::default()
            },
            DeferPolicy {
                requester_header: "not a header".to_owned(),
                ..DeferPolicy::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(DeferPolicy::default().validate().is_ok());
    }

    #[test]
    fn admission_mode_defer_needs_a_defer_section() {
        let mut b = crate::policy::BudgetPolicy {
            admission: crate::policy::AdmissionMode::Defer,
            ..crate::policy::BudgetPolicy::default()
        };
        let e = b
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("defer"), "{e}");
        b.defer = Some(DeferPolicy::default());
        assert!(b.validate().is_ok());
    }
}
