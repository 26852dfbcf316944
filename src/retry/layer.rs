use std::fmt;
use std::sync::Arc;

use http::HeaderName;
use tower_layer::Layer;

use super::Retry;
use super::key::KeyGenerator;
use crate::backoff::JitterSource;
use crate::classify::SharedClassifier;
use crate::policy::{
    ClassActions, IdempotencyPolicy, LoggingPolicy, Policy, PolicyError, RetryPolicy,
};
use crate::retry_budget::RetryBudget;

/// Applies [`Retry`] to a service: same-route retries that honour the server's wait, the
/// deadline and the shared retry budget.
///
/// Built from the policy's `retry` section with [`RetryLayer::new`], or from the whole policy
/// (retry, per-class actions, idempotency, logging, retry budget) with
/// [`RetryLayer::from_policy`]. Both validate what they are given and return a [`PolicyError`]
/// naming the offending field, so a bad value is found when the stack is built, never on a
/// request. The builder methods then swap in a classifier, a shared retry budget or a jitter
/// source.
///
/// Clones (and every service the layer wraps) share one retry budget and one jitter source.
#[derive(Clone)]
pub struct RetryLayer {
    pub(super) shared: Arc<Shared>,
}

/// Everything a [`Retry`] service and its futures read; shared behind one `Arc`.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) retry: RetryPolicy,
    pub(super) actions: ClassActions,
    pub(super) idempotency: IdempotencyPolicy,
    pub(super) key_header: Option<HeaderName>,
    pub(super) attempt_header: Option<HeaderName>,
    pub(super) logging: LoggingPolicy,
    pub(super) classifier: SharedClassifier,
    pub(super) budget: RetryBudget,
    pub(super) jitter: JitterSource,
    pub(super) keys: KeyGenerator,
}

impl RetryLayer {
    /// A layer for the policy's `retry` section, with the default per-class actions
    /// (DESIGN's table), the default idempotency rule (no key is set; a possibly-accepted
    /// request is replayed only if it is idempotent), the default classifier, and a retry
    /// budget of its own (20 % of requests plus 10 per second over 10 s).
    ///
    /// # Errors
    ///
    /// A [`PolicyError`] naming the first invalid field of `retry`.
    pub fn new(retry: RetryPolicy) -> Result<Self, PolicyError> {
        Self::build(
            retry,
            ClassActions::default(),
            IdempotencyPolicy::default(),
            LoggingPolicy::default(),
            RetryBudget::default(),
        )
    }

    /// A layer for the whole policy: its `retry` section, per-class `actions`, `idempotency`
    /// rule and `logging` switches (applied to a log this layer creates; an outer layer's log
    /// keeps its own settings); the retry budget the layer owns is built from
    /// `budget.retry_budget` (a budget `BudgetLayer` puts into the request extensions still
    /// takes precedence).
    ///
    /// # Errors
    ///
    /// A [`PolicyError`] naming the first invalid field of those sections.
    pub fn from_policy(policy: &Policy) -> Result<Self, PolicyError> {
        Self::build(
            policy.retry.clone(),
            policy.actions.clone(),
            policy.idempotency.clone(),
            policy.logging.clone(),
            RetryBudget::new(&policy.budget.retry_budget)?,
        )
    }

    fn build(
        retry: RetryPolicy,
        actions: ClassActions,
        idempotency: IdempotencyPolicy,
        logging: LoggingPolicy,
        budget: RetryBudget,
    ) -> Result<Self, PolicyError> {
        retry.validate()?;
        idempotency.validate()?;
        logging.validate()?;
        let attempt_header = header("retry.attempt_header", retry.attempt_header.as_deref())?;
        let key_header = idempotency.key_header_name()?;
        Ok(Self {
            shared: Arc::new(Shared {
                jitter: JitterSource::from_seed(retry.seed),
                retry,
                actions,
                idempotency,
                key_header,
                attempt_header,
                logging,
                classifier: SharedClassifier::default(),
                budget,
                keys: KeyGenerator::new(),
            }),
        })
    }

    fn shared_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.shared)
    }

    /// Classifies responses and errors with `classifier` instead of the default one.
    pub fn classifier(mut self, classifier: SharedClassifier) -> Self {
        self.shared_mut().classifier = classifier;
        self
    }

    /// Draws retries from `budget` (shared with whoever else holds a clone) instead of the
    /// budget the layer built. The layer deposits into it once per logical request.
    ///
    /// A [`RetryBudget`] in the request extensions (set by `BudgetLayer`) still takes
    /// precedence; the layer then only withdraws from it, and the layer that put it there
    /// deposits.
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.shared_mut().budget = budget;
        self
    }

    /// Draws jitter from `jitter` instead of a source seeded from `retry.seed`.
    pub fn jitter(mut self, jitter: JitterSource) -> Self {
        self.shared_mut().jitter = jitter;
        self
    }

    /// Replaces the per-class actions (which classes may be retried on the same route).
    pub fn actions(mut self, actions: ClassActions) -> Self {
        self.shared_mut().actions = actions;
        self
    }

    /// Replaces the idempotency rule and key header.
    ///
    /// # Errors
    ///
    /// A [`PolicyError`] when `idempotency.key_header` is not a valid header name.
    pub fn idempotency(mut self, idempotency: IdempotencyPolicy) -> Result<Self, PolicyError> {
        idempotency.validate()?;
        let key_header = idempotency.key_header_name()?;
        let shared = self.shared_mut();
        shared.key_header = key_header;
        shared.idempotency = idempotency;
        Ok(self)
    }

    /// The retry section in force.
    pub fn policy(&self) -> &RetryPolicy {
        &self.shared.retry
    }

    /// The retry budget the layer owns (used when the request carries none).
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.budget
    }
}

fn header(field: &str, name: Option<&str>) -> Result<Option<HeaderName>, PolicyError> {
    name.map(|n| {
        HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| PolicyError::new(field, format!("{n:?} is not a valid header name")))
    })
    .transpose()
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::from_shared(inner, self.shared.clone())
    }
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("retry", &self.retry)
            .field("actions", &self.actions)
            .field("idempotency", &self.idempotency)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}
