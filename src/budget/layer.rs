use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;

use super::Budget;
use super::estimate::{DefaultEstimator, SharedEstimator, TokenEstimator};
use super::rate_limit::{Buckets, Gate, RateConfig};
use super::spend::{SpendConfig, SpendHandle};
use super::store::{BudgetStore, MemoryStore};
use crate::RouteName;
use crate::classify::{FailureClass, SharedClassifier};
use crate::defer::{DeferConfig, DeferSink};
use crate::observe::Observer;
use crate::policy::{
    AdmissionMode, BudgetPolicy, DeferPolicy, FallbackRule, LoggingPolicy, Policy, PolicyError,
    RateKey,
};
use crate::retry_budget::RetryBudget;

/// Applies [`Budget`] to a service: admission (rate limits, paced routes, spend caps), the
/// request's deadline and the shared retry budget. The outermost layer of the stack.
///
/// Clones share one state: one retry budget, one set of buckets and queues, one store.
#[derive(Clone)]
pub struct BudgetLayer {
    pub(crate) shared: Arc<Shared>,
}

/// Everything the services of one layer share.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) retry_budget: RetryBudget,
    pub(crate) deadline: Option<Duration>,
    pub(crate) rate: Option<RateConfig>,
    admission: AdmissionMode,
    pacing: bool,
    pub(crate) gate: Option<Arc<Gate>>,
    pub(crate) spend: Option<Arc<SpendConfig>>,
    pub(crate) store: Arc<dyn BudgetStore>,
    pub(crate) estimator: SharedEstimator,
    pub(crate) classifier: SharedClassifier,
    pub(crate) owner_header: HeaderName,
    /// The route of requests that carry no `RouteName` (the primary of the policy's chain).
    pub(crate) primary: Option<RouteName>,
    /// Applied to the attempt logs this layer creates.
    pub(crate) logging: LoggingPolicy,
    /// Turns the end of the requests whose log this layer owns into metrics and alerts.
    pub(crate) observer: Option<Arc<Observer>>,
    /// The policy's queue rung, in force once a sink is given.
    defer_policy: Option<DeferPolicy>,
    /// The queue rung with its sink.
    pub(crate) defer: Option<Arc<DeferConfig>>,
    /// The policy's workflow name and idempotency key header, for deferred records.
    workflow: String,
    key_header: Option<String>,
    /// The primary and the backups a request for a paused primary may go to instead.
    pace_around: Option<(RouteName, Vec<RouteName>)>,
    /// The primary and its backups' rate-limit buckets (key, route): a request for the primary
    /// whose bucket has no room is admitted on a backup's that has.
    pub(crate) rate_around: Option<(RouteName, Buckets)>,
}

/// How long a request's reservations live unless settled: its deadline plus a margin (an hour
/// when there is no deadline).
fn lease_for(
    deadline: Option<std::time::Duration>,
    margin: std::time::Duration,
) -> std::time::Duration {
    deadline
        .unwrap_or(super::spend::DEFAULT_LEASE)
        .saturating_add(margin)
}

impl BudgetLayer {
    /// A layer as the budget section describes; invalid values are a [`PolicyError`].
    ///
    /// Requests are keyed and priced by their route: the `RouteName` extension, else the URI's
    /// authority; the hops of a `FallbackLayer` inside are priced by its route names. Use
    /// [`from_policy`](Self::from_policy) to key them by the policy's route names when a
    /// `FallbackLayer` is inside.
    pub fn new(policy: BudgetPolicy) -> Result<Self, PolicyError> {
        policy.validate()?;
        let retry_budget = RetryBudget::new(&policy.retry_budget)?;
        let lease = lease_for(
            policy.deadline,
            crate::policy::StorePolicy::default().lease_margin,
        );
        let spend = policy
            .spend
            .as_ref()
            .map(|s| SpendConfig::new(s, lease))
            .transpose()?
            .map(Arc::new);
        let owner_header = match &policy.spend {
            Some(s) => HeaderName::from_bytes(s.owner_header.as_bytes()).map_err(|_| {
                PolicyError::new("budget.spend.owner_header", "is not a valid header name")
            })?,
            None => HeaderName::from_static("x-llm-budget-owner"),
        };
        let store: Arc<dyn BudgetStore> = Arc::new(MemoryStore::new());
        let mut shared = Shared {
            retry_budget,
            deadline: policy.deadline,
            rate: policy.rate_limit.as_ref().map(RateConfig::new),
            admission: policy.admission,
            pacing: policy.pacing,
            gate: None,
            spend,
            store,
            estimator: SharedEstimator(Arc::new(DefaultEstimator)),
            classifier: SharedClassifier::default(),
            owner_header,
            primary: None,
            logging: LoggingPolicy::default(),
            observer: None,
            defer_policy: policy.defer.clone(),
            defer: None,
            workflow: String::new(),
            key_header: None,
            pace_around: None,
            rate_around: None,
        };
        shared.rebuild_gate();
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// A layer from the whole policy: its budget section, with the routes of its fallback
    /// chain. A request without a `RouteName` counts as the primary route: its first attempt
    /// is reserved at the primary's price, and every retry or hop at the price of the route it
    /// goes to. Every route must have a price (or there must be a default price) when a spend
    /// cap is set.
    pub fn from_policy(policy: &Policy) -> Result<Self, PolicyError> {
        let mut layer = Self::new(policy.budget.clone())?;
        let routes: Vec<RouteName> = policy.route_names().map(RouteName::new).collect();
        if let Some(spend) = &policy.budget.spend {
            if spend.default_price.is_none() {
                if let Some(r) = routes
                    .iter()
                    .find(|r| !spend.prices.contains_key(r.as_str()))
                {
                    return Err(PolicyError::new(
                        format!("budget.spend.prices.{r}"),
                        "is missing: every route needs a price when there is no `default_price`",
                    ));
                }
            }
        }
        policy.store.validate()?;
        let shared = Arc::make_mut(&mut layer.shared);
        shared.primary = Some(RouteName::new(&policy.fallback.primary));
        shared.logging = policy.logging.clone();
        shared.workflow = policy.workflow.clone();
        shared.key_header = policy.idempotency.key_header.clone();
        let hops_on_rate_limits = policy.fallback.max_hops > 0
            && policy.actions.get(FailureClass::RateLimited).fallback == FallbackRule::Yes;
        let keyed_by_route = policy
            .budget
            .rate_limit
            .as_ref()
            .is_some_and(|r| r.key == RateKey::Route);
        if keyed_by_route && hops_on_rate_limits && !policy.fallback.routes.is_empty() {
            let buckets = policy
                .fallback
                .routes
                .iter()
                .map(|r| (format!("route:{}", r.name), RouteName::new(&r.name)))
                .collect();
            shared.rate_around = Some((RouteName::new(&policy.fallback.primary), buckets));
        }
        if policy.budget.pacing && hops_on_rate_limits && !policy.fallback.routes.is_empty() {
            let backups = policy
                .fallback
                .routes
                .iter()
                .map(|r| RouteName::new(&r.name));
            shared.pace_around =
                Some((RouteName::new(&policy.fallback.primary), backups.collect()));
            shared.rebuild_gate();
        }
        if let Some(spend) = &policy.budget.spend {
            let lease = lease_for(policy.budget.deadline, policy.store.lease_margin);
            shared.spend = Some(Arc::new(SpendConfig::new(spend, lease)?));
        }
        policy.observability.validate()?;
        shared.observer = Some(Observer::from_policy(policy));
        Ok(layer)
    }

    /// Reports the ends of its requests to `observer` (one shared by a whole stack).
    pub(crate) fn observed_by(mut self, observer: Arc<Observer>) -> Self {
        Arc::make_mut(&mut self.shared).observer = Some(observer);
        self
    }

    /// Keeps spend and rate-limit state in `store` (share one store between layers, or put
    /// it outside the process). Call before the layer is cloned into services.
    pub fn store(mut self, store: Arc<dyn BudgetStore>) -> Self {
        let shared = Arc::make_mut(&mut self.shared);
        shared.store = store;
        shared.rebuild_gate();
        self
    }

    /// Writes the requests its policy defers to `sink` (see [`defer`](crate::defer)), by the
    /// policy's `budget.defer` section. A policy without one defers nothing — deferring is the
    /// policy's decision, written where its reviewers see it — and a warning says so. Call
    /// before the layer is cloned into services, and after
    /// [`from_policy`](Self::from_policy).
    pub fn defer_to(mut self, sink: Arc<dyn DeferSink>) -> Self {
        let shared = Arc::make_mut(&mut self.shared);
        let Some(policy) = shared.defer_policy.clone() else {
            tracing::warn!(
                workflow = shared.workflow.as_str(),
                "a defer sink was given to a policy without a budget.defer section: nothing is deferred"
            );
            return self;
        };
        let key_header = shared.key_header.as_deref();
        let cfg = DeferConfig::new(policy, sink, shared.workflow.clone(), key_header);
        shared.defer = Some(Arc::new(cfg));
        self
    }

    /// Estimates request tokens with `estimator` instead of the [`DefaultEstimator`].
    pub fn estimator(mut self, estimator: impl TokenEstimator) -> Self {
        Arc::make_mut(&mut self.shared).estimator = SharedEstimator(Arc::new(estimator));
        self
    }

    /// Classifies responses and errors with `classifier` (and reads `usage` within its peek
    /// bound).
    pub fn classifier(mut self, classifier: SharedClassifier) -> Self {
        Arc::make_mut(&mut self.shared).classifier = classifier;
        self
    }

    /// The retry budget every request through this layer deposits into and the inner layers
    /// withdraw from.
    pub fn retry_budget(&self) -> &RetryBudget {
        &self.shared.retry_budget
    }

    /// A handle on the spend cap, when the policy sets one.
    pub fn spend(&self) -> Option<SpendHandle> {
        self.shared.spend.as_ref().map(|cfg| SpendHandle {
            cfg: cfg.clone(),
            store: self.shared.store.clone(),
        })
    }

    /// How many requests wait in the rate-limit queue right now, across every service built
    /// from this layer; `0` without a rate limit or pacing. A request leaves the queue when it
    /// is admitted, refused, or abandoned by its caller.
    pub fn queued(&self) -> usize {
        self.shared.gate.as_ref().map_or(0, |g| g.queued())
    }
}

impl Shared {
    fn rebuild_gate(&mut self) {
        self.gate = (self.rate.is_some() || self.pacing).then(|| {
            let mut gate = Gate::new(self.admission, self.store.clone(), self.pacing);
            gate.around = self.pace_around.clone();
            Arc::new(gate)
        });
    }
}

impl<S> Layer<S> for BudgetLayer {
    type Service = Budget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Budget {
            inner,
            shared: self.shared.clone(),
        }
    }
}

impl fmt::Debug for BudgetLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.shared, f)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetLayer")
            .field("retry_budget", &self.retry_budget)
            .field("deadline", &self.deadline)
            .field("rate", &self.rate)
            .field("admission", &self.admission)
            .field("pacing", &self.pacing)
            .field("spend", &self.spend)
            .field("defer", &self.defer.as_ref().map(|d| &d.policy))
            .finish_non_exhaustive()
    }
}
