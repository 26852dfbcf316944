use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use super::Fallback;
use super::continuation::ContinuationConfig;
use super::hedge::Hedger;
use super::local::LocalRoute;
use super::route::{Route, header_value_of_name};
use super::select::Selector;
use crate::classify::SharedClassifier;
use crate::policy::{
    ClassActions, FallbackPolicy, LoggingPolicy, Policy, PolicyError, RouteStrategy,
};
use crate::{BoxError, RouteName};

/// Applies [`Fallback`] to a service: the route chain of the recovery ladder.
///
/// Built from the policy's [`FallbackPolicy`] section, which it validates: the constructors
/// return a [`PolicyError`] (naming the offending field) for a bad value — among them a route
/// that changes credentials without `credentials_approved` — so a bad chain is caught when the
/// stack is built, never on a request.
///
/// ```
/// use tower_llm_resilience::fallback::FallbackLayer;
/// use tower_llm_resilience::policy::{Policy, RouteConfig};
///
/// let mut policy = Policy::interactive();
/// policy.fallback.routes.push(
///     RouteConfig::new("backup")
///         .base_url("https://backup.example/v1")
///         .model("backup-model"),
/// );
/// let layer = FallbackLayer::from_policy(&policy)?;
/// # let _ = layer;
///
/// // A route that swaps the API key must be approved explicitly.
/// policy.fallback.routes.push(RouteConfig::new("other-key").set_header("x-api-key", "sk-other"));
/// let err = FallbackLayer::from_policy(&policy).unwrap_err();
/// assert_eq!(err.field(), "fallback.routes[1].set_headers");
/// # Ok::<(), tower_llm_resilience::PolicyError>(())
/// ```
#[derive(Clone)]
pub struct FallbackLayer {
    pub(crate) config: Arc<Config>,
}

/// What every request of a [`Fallback`] service shares: the chain, parsed once.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) policy: FallbackPolicy,
    pub(crate) primary: RouteName,
    pub(crate) primary_header: HeaderValue,
    pub(crate) routes: Vec<Route>,
    pub(crate) last_resort: Option<LastResort>,
    pub(crate) actions: ClassActions,
    pub(crate) classifier: SharedClassifier,
    /// Applied to the attempt logs this layer creates.
    pub(crate) logging: LoggingPolicy,
    /// `stream.continuation`, when it is on.
    pub(crate) continuation: Option<ContinuationConfig>,
    /// Some route (the primary too) declares capabilities it lacks: each request's needs are
    /// read to choose among them.
    pub(crate) reads_needs: bool,
    /// The selection strategy's shared state; `None` under `ordered`.
    pub(crate) selector: Option<Arc<Selector>>,
    /// Hedging's shared state; `None` unless the policy's `[hedge]` is on.
    pub(crate) hedger: Option<Arc<Hedger>>,
    /// Continuation is on but no sender was installed, and that was said once.
    no_sender_warned: Arc<AtomicBool>,
}

#[derive(Clone)]
pub(crate) struct LastResort {
    pub(crate) status: StatusCode,
    pub(crate) content_type: HeaderValue,
    pub(crate) body: Bytes,
}

impl Config {
    /// Says once per layer that continuation is on in the policy but cannot happen: the
    /// service has no continuation sender.
    pub(crate) fn warn_no_sender(&self) {
        if !self.no_sender_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                target: "tower_llm_resilience::fallback",
                "stream.continuation is on, but no continuation sender is installed \
                 (Fallback::enable_continuation): streams cut after their commit point end \
                 with StreamInterrupted"
            );
        }
    }

    /// The budget owner of the chain's route `i` (0 is the primary).
    pub(crate) fn owner_of(&self, i: usize) -> Option<String> {
        match i.checked_sub(1).and_then(|i| self.routes.get(i)) {
            Some(r) => r.budget_owner.clone(),
            None => self.policy.primary_budget_owner.clone(),
        }
    }

    pub(crate) fn new(policy: FallbackPolicy, actions: ClassActions) -> Result<Self, PolicyError> {
        policy.validate()?;
        let mut routes = Vec::with_capacity(policy.routes.len());
        for (i, r) in policy.routes.iter().enumerate() {
            routes.push(Route::new(&format!("fallback.routes[{i}]"), r)?);
        }
        let last_resort = match &policy.last_resort {
            None => None,
            Some(s) => Some(LastResort {
                status: StatusCode::from_u16(s.status).map_err(|_| {
                    PolicyError::new("fallback.last_resort.status", "is not an HTTP status")
                })?,
                content_type: HeaderValue::from_str(&s.content_type).map_err(|_| {
                    PolicyError::new(
                        "fallback.last_resort.content_type",
                        "is not a valid header value",
                    )
                })?,
                body: Bytes::from(s.body.clone()),
            }),
        };
        let lacking =
            |c: &crate::policy::Capabilities| *c != crate::policy::Capabilities::default();
        let reads_needs = lacking(&policy.primary_capabilities)
            || routes.iter().any(|r: &Route| lacking(&r.capabilities));
        let selector = (policy.selection.strategy != RouteStrategy::Ordered).then(|| {
            let weights = std::iter::once(policy.selection.primary_weight)
                .chain(policy.routes.iter().map(|r| r.weight.unwrap_or(1)))
                .collect::<Vec<_>>();
            let unpriced = vec![None; weights.len()];
            Arc::new(Selector::new(policy.selection, weights, unpriced, None))
        });
        Ok(Self {
            selector,
            hedger: None,
            reads_needs,
            primary: RouteName::new(&policy.primary),
            primary_header: header_value_of_name("fallback.primary", &policy.primary)?,
            routes,
            last_resort,
            actions,
            classifier: SharedClassifier::default(),
            logging: LoggingPolicy::default(),
            continuation: None,
            no_sender_warned: Arc::new(AtomicBool::new(false)),
            policy,
        })
    }
}

impl FallbackLayer {
    /// A layer for the chain in `policy`, with the default per-class actions (DESIGN's table).
    ///
    /// Fails with a [`PolicyError`] when a value of `policy` is invalid, including a route that
    /// changes credentials without approval.
    pub fn new(policy: FallbackPolicy) -> Result<Self, PolicyError> {
        Ok(Self {
            config: Arc::new(Config::new(policy, ClassActions::default())?),
        })
    }

    /// A layer for `policy.fallback`, switching per `policy.actions` (the fallback column of the
    /// per-class table, with the policy's overrides).
    ///
    /// With `[hedge]` on, a request whose first attempt is slow to its first token gets one
    /// more attempt (see [`HedgePolicy`](crate::policy::HedgePolicy)).
    ///
    /// With `stream.continuation` on, a stream cut after its commit point may be continued on a
    /// backup route with `supports_prefill`; the policy must have one. The service needs its
    /// continuation sender too: see [`Fallback::enable_continuation`].
    pub fn from_policy(policy: &Policy) -> Result<Self, PolicyError> {
        let mut config = Config::new(policy.fallback.clone(), policy.actions.clone())?;
        config.logging = policy.logging.clone();
        if policy.hedge.enabled {
            policy.hedge.validate()?;
            let key_header = policy.idempotency.key_header_name()?;
            let routes = config.routes.len() + 1;
            config.hedger = Some(Arc::new(Hedger::new(policy.hedge, routes, key_header)));
        }
        if let Some(selector) = config.selector.as_mut().and_then(Arc::get_mut) {
            selector.set_seed(policy.retry.seed);
            if let Some(spend) = &policy.budget.spend {
                let price = |r: &str| spend.prices.get(r).copied().or(spend.default_price);
                selector.set_prices(policy.route_names().map(price).collect());
            }
        }
        let continuation = &policy.stream.continuation;
        if continuation.enabled {
            continuation.validate()?;
            if !config.routes.iter().any(|r| r.prefill.is_some()) {
                return Err(PolicyError::new(
                    "stream.continuation.enabled",
                    "is on, but no route of `fallback.routes` sets `supports_prefill`",
                ));
            }
            config.continuation = Some(ContinuationConfig {
                policy: continuation.clone(),
                max_text: usize::try_from(policy.stream.max_buffer).unwrap_or(usize::MAX),
            });
        }
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Replaces the per-class actions (only their fallback column is used here).
    pub fn actions(mut self, actions: ClassActions) -> Self {
        Arc::make_mut(&mut self.config).actions = actions;
        self
    }

    /// Replaces the classifier used for responses that no inner layer classified yet.
    pub fn classifier(mut self, classifier: SharedClassifier) -> Self {
        Arc::make_mut(&mut self.config).classifier = classifier;
        self
    }

    /// Serves the route `name` (marked `in_process` in the policy) with `service`, in the
    /// process: the route's request — rewritten as for any route, its body in memory — goes to
    /// `service` instead of the layers below, and its answer is classified and logged like any
    /// route's. The last tier of a chain, say: a rule-based answer when every model is down.
    ///
    /// Fails when the policy has no in-process route of that name.
    pub fn route_service<S, RB>(mut self, name: &str, service: S) -> Result<Self, PolicyError>
    where
        S: Service<Request<Bytes>, Response = Response<RB>> + Clone + Send + Sync + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let config = Arc::make_mut(&mut self.config);
        let Some(route) = config.routes.iter_mut().find(|r| r.name.as_str() == name) else {
            return Err(PolicyError::new(
                "fallback.routes",
                format!("no route is named {name:?}"),
            ));
        };
        if !route.in_process {
            return Err(PolicyError::new(
                "fallback.routes",
                format!("route {name:?} is not `in_process`"),
            ));
        }
        route.local = Some(LocalRoute::new(service));
        Ok(self)
    }

    /// The chain this layer applies.
    pub fn policy(&self) -> &FallbackPolicy {
        &self.config.policy
    }
}

impl fmt::Debug for FallbackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackLayer")
            .field("policy", &self.config.policy)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Fallback {
            inner,
            config: self.config.clone(),
            continuation: None,
        }
    }
}
