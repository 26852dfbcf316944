//! One policy record for the whole ladder, with a section per layer.
//!
//! Build it in code from a preset ([`Policy::interactive`], [`Policy::batch`]) or load it from a
//! file (feature `serde`; durations are written `"250ms"`, `"9s"`, `"1m30s"`; unknown fields are
//! errors, so a typo never silently falls back to a default). In a file, a section left out
//! comes from the interactive preset, while a section that is written starts from that
//! section's own `Default` with the written values on top: write out every value you rely on in
//! a section you touch. Every layer validates its section
//! when it is built; [`Policy::validate`] checks the whole record at once.
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_resilience::policy::Policy;
//!
//! let mut policy = Policy::interactive();
//! policy.retry.max_attempts = 4;
//! policy.budget.deadline = Some(Duration::from_secs(45));
//! policy.validate()?;
//! # Ok::<(), tower_llm_resilience::policy::PolicyError>(())
//! ```

mod actions;
mod budget;
mod capabilities;
mod circuit_breaker;
mod defer;
mod error;
mod fallback;
mod hedge;
pub(crate) mod idempotency;
mod logging;
mod observability;
mod retry;
mod selection;
mod store;
mod stream;
mod throttle;

use std::time::Duration;

pub use actions::{ClassAction, ClassActions, FallbackRule, RetryRule};
pub use budget::{
    AdmissionMode, BudgetPolicy, ChargeRule, Price, RateKey, RateLimitPolicy, RetryBudgetPolicy,
    SpendPolicy,
};
pub use capabilities::{Capabilities, RequestNeeds};
pub use circuit_breaker::{CircuitBreakerPolicy, FailureRateRule, SlowCallRule};
pub use defer::DeferPolicy;
pub use error::PolicyError;
pub use fallback::{CREDENTIAL_HEADERS, FallbackPolicy, PrefillForm, RouteConfig, StaticResponse};
pub use hedge::HedgePolicy;
pub use idempotency::{CachePolicy, IdempotencyPolicy, InFlightRule, ReplayRule};
pub use logging::LoggingPolicy;
pub use observability::ObservabilityPolicy;
pub use retry::{BackoffPolicy, Jitter, RetryPolicy};
pub use selection::{RouteStrategy, SelectionPolicy};
pub use store::{StoreMode, StoreModes, StorePolicy};
pub use stream::{
    CommitPoint, ContinuationCause, ContinuationPolicy, DEFAULT_CONTINUATION_INSTRUCTION,
    StreamPolicy, StreamSettings,
};
pub use throttle::ThrottlePolicy;

/// The whole recovery policy: what each rung of the ladder may do.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct Policy {
    /// Name of the workflow the policy is for (`"chat"`, `"nightly-summaries"`), for the people
    /// who review it.
    pub workflow: String,
    /// Same-route retries.
    pub retry: RetryPolicy,
    /// Per-route circuit breakers.
    pub circuit_breaker: CircuitBreakerPolicy,
    /// The route chain.
    pub fallback: FallbackPolicy,
    /// Hedging the slow tail: one more attempt when the first is slow to its first token.
    pub hedge: HedgePolicy,
    /// Admission: retry budget, deadline, rate limits, spend caps.
    pub budget: BudgetPolicy,
    /// Stream timeouts and commit point.
    pub stream: StreamPolicy,
    /// Idempotency keys and the replay rule.
    pub idempotency: IdempotencyPolicy,
    /// Per-class action overrides on top of the safe defaults.
    pub actions: ClassActions,
    /// What is logged.
    pub logging: LoggingPolicy,
    /// Where shared state lives (spend, rate limits, breakers), for a fleet of replicas.
    pub store: StorePolicy,
    /// Metrics and alerts.
    pub observability: ObservabilityPolicy,
}

impl Default for Policy {
    /// The interactive preset.
    fn default() -> Self {
        Self::interactive()
    }
}

impl Policy {
    /// For a person waiting on the answer: few retries, a short deadline, no queueing
    /// (rate-limited requests are rejected at once), streams committed at the first token.
    pub fn interactive() -> Self {
        let retry = RetryPolicy {
            max_server_wait: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(30),
            ..RetryPolicy::default()
        };
        let budget = BudgetPolicy {
            deadline: Some(Duration::from_secs(60)),
            admission: AdmissionMode::Reject,
            ..BudgetPolicy::default()
        };
        let stream = StreamPolicy::from_settings(StreamSettings {
            first_token_timeout: Some(Duration::from_secs(20)),
            idle_timeout: Some(Duration::from_secs(20)),
            total_timeout: Some(Duration::from_secs(300)),
            commit: CommitPoint::FirstEvent,
            ..StreamSettings::default()
        });
        Self {
            workflow: "interactive".to_owned(),
            retry,
            circuit_breaker: CircuitBreakerPolicy::default(),
            fallback: FallbackPolicy::default(),
            hedge: HedgePolicy::default(),
            budget,
            stream,
            idempotency: IdempotencyPolicy::default(),
            actions: ClassActions::default(),
            logging: LoggingPolicy::default(),
            store: StorePolicy::default(),
            observability: ObservabilityPolicy::default(),
        }
    }

    /// For work nobody watches: more attempts, longer server waits honoured, queueing for
    /// capacity, streams buffered to the end so a failure anywhere is retryable.
    pub fn batch() -> Self {
        let mut retry = RetryPolicy {
            max_attempts: 6,
            backoff: BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(60)),
            max_server_wait: Duration::from_secs(120),
            // As long as the deadline and a stream's total bound: under commit `end` the
            // committed response is the whole stream, which a shorter bound would cut.
            max_elapsed: Duration::from_secs(3600),
            ..RetryPolicy::default()
        };
        retry.per_class.insert(
            crate::classify::FailureClass::RateLimited,
            BackoffPolicy::new(Duration::from_secs(5), Duration::from_secs(120)),
        );
        let budget = BudgetPolicy {
            retry_budget: RetryBudgetPolicy::Ratio {
                ratio: 0.5,
                min_per_sec: 10,
                ttl: Duration::from_secs(60),
            },
            deadline: Some(Duration::from_secs(3600)),
            admission: AdmissionMode::Queue {
                max_wait: Duration::from_secs(600),
                max_queued: 10_000,
            },
            pacing: true,
            // Takes effect once the budget layer has a sink to write records to.
            defer: Some(DeferPolicy::default()),
            ..BudgetPolicy::default()
        };
        let stream = StreamPolicy::from_settings(StreamSettings {
            first_token_timeout: Some(Duration::from_secs(120)),
            idle_timeout: Some(Duration::from_secs(60)),
            total_timeout: Some(Duration::from_secs(3600)),
            commit: CommitPoint::End,
            ..StreamSettings::default()
        });
        let circuit_breaker = CircuitBreakerPolicy {
            open_base: Duration::from_secs(5),
            open_cap: Duration::from_secs(60),
            ..CircuitBreakerPolicy::default()
        };
        Self {
            workflow: "batch".to_owned(),
            retry,
            circuit_breaker,
            fallback: FallbackPolicy::default(),
            hedge: HedgePolicy::default(),
            budget,
            stream,
            idempotency: IdempotencyPolicy {
                key_header: Some("idempotency-key".to_owned()),
                replay_possibly_accepted: ReplayRule::IfIdempotent,
                cache: None,
            },
            actions: ClassActions::default(),
            logging: LoggingPolicy::default(),
            store: StorePolicy::default(),
            observability: ObservabilityPolicy::default(),
        }
    }

    /// Checks every section; the error names the first offending field.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.workflow.trim().is_empty() {
            return Err(PolicyError::new("workflow", "must not be empty"));
        }
        self.retry.validate()?;
        self.circuit_breaker.validate()?;
        self.fallback.validate()?;
        self.hedge.validate()?;
        self.budget.validate()?;
        self.stream.validate()?;
        self.idempotency.validate()?;
        self.logging.validate()?;
        self.store.validate()?;
        self.observability.validate()?;
        for name in self.stream.routes.keys() {
            if !self.route_names().any(|r| r == name) {
                return Err(PolicyError::new(
                    format!("stream.routes.{name}"),
                    format!(
                        "names no route (routes: {})",
                        self.route_names().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        if self.fallback.selection.strategy == RouteStrategy::LowestCost {
            let spend = self.budget.spend.as_ref();
            let unpriced = self.route_names().find(|r| {
                spend.is_none_or(|s| s.default_price.is_none() && !s.prices.contains_key(*r))
            });
            if let Some(route) = unpriced {
                return Err(PolicyError::new(
                    "fallback.selection.strategy",
                    format!(
                        "is lowest_cost, but route {route:?} has no price in budget.spend \
                         (prices or default_price)"
                    ),
                ));
            }
        }
        // A route given a first-token limit longer than the deadline (a reasoning model's long
        // wait) could never use it: the deadline ends the request first. The defaults may be
        // longer (a preset's, under a short deadline): they are a bound, not a promise.
        if let Some(deadline) = self.budget.deadline {
            for (name, settings) in &self.stream.routes {
                if settings.first_token_timeout.is_some_and(|t| t > deadline) {
                    return Err(PolicyError::new(
                        format!("stream.routes.{name}.first_token_timeout"),
                        format!(
                            "is longer than budget.deadline ({deadline:?}): the deadline would \
                             end every request on the route before its first-token limit"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The policy, if it is valid.
    pub fn validated(self) -> Result<Self, PolicyError> {
        self.validate()?;
        Ok(self)
    }

    /// The primary route's name followed by every backup's.
    pub fn route_names(&self) -> impl Iterator<Item = &str> + '_ {
        std::iter::once(self.fallback.primary.as_str())
            .chain(self.fallback.routes.iter().map(|r| r.name.as_str()))
    }

    /// Parses and validates a JSON policy.
    #[cfg(feature = "serde")]
    pub fn from_json(json: &str) -> Result<Self, PolicyError> {
        // serde's derive would also take an array of fields by position: a policy file is an
        // object of named sections.
        if !json.trim_start().starts_with('{') {
            return Err(PolicyError::new("<json>", "a policy is a JSON object"));
        }
        let policy: Policy =
            serde_json::from_str(json).map_err(|e| PolicyError::new("<json>", e.to_string()))?;
        policy.validated()
    }
}
