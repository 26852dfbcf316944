use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tower_layer::Layer;

use super::handle::{CircuitBreakerHandle, CircuitState, TransitionFn};
use super::service::CircuitBreaker;
use super::state::{RouteState, Transition};
use crate::RouteName;
use crate::backoff::JitterSource;
use crate::classify::{FailureClass, SharedClassifier};
use crate::observe::Observer;
use crate::policy::{CircuitBreakerPolicy, ClassActions, LoggingPolicy, Policy, PolicyError};

/// Mixed into the policy's seed for the throttle's draws.
const THROTTLE_SEED: u64 = 0x7468_726f_7474_6c65;

/// What the breakers are configured with; fixed once the layer is built.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) policy: CircuitBreakerPolicy,
    pub(crate) actions: ClassActions,
    pub(crate) logging: LoggingPolicy,
}

impl Config {
    /// Whether a failure of `class` counts against the route.
    pub(crate) fn counts(&self, class: FailureClass) -> bool {
        self.actions.get(class).breaker
    }
}

/// The breakers of every route, shared by the layer, its services and its handles.
pub(crate) struct Shared {
    pub(crate) config: Config,
    routes: RwLock<HashMap<RouteName, Arc<RouteState>>>,
    // Only touched when a circuit opens or a transition happens: never on the fast path.
    jitter: Mutex<Option<JitterSource>>,
    // The throttle's draws, made only while a route with no backup is being throttled.
    throttle_source: Mutex<JitterSource>,
    on_transition: RwLock<Option<Arc<TransitionFn>>>,
    /// Metrics and alerts of the transitions; read only when a route is first seen and at a
    /// transition.
    observer: RwLock<Option<Arc<Observer>>>,
    /// The health store shared with other replicas, when there is one.
    fleet: std::sync::OnceLock<super::fleet::Fleet>,
    /// The last exchange with the health store failed.
    fleet_down: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(crate) fn fleet(&self) -> Option<&super::fleet::Fleet> {
        self.fleet.get()
    }

    pub(crate) fn fleet_down(&self) -> bool {
        self.fleet_down.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_fleet_down(&self, down: bool) {
        self.fleet_down
            .store(down, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether calls must fail closed: the health store is down and the policy says so.
    pub(crate) fn fleet_refuses(&self) -> bool {
        self.fleet()
            .is_some_and(|f| f.mode == crate::policy::StoreMode::FailClosed)
            && self.fleet_down()
    }

    pub(crate) fn fleet_rules(&self) -> super::fleet::FleetRules {
        let p = &self.config.policy;
        super::fleet::FleetRules {
            failure_rate: p.failure_rate,
            open_for: p.open_base,
            half_open_probes: p.half_open_probes,
            probe_ttl: p.open_cap.max(std::time::Duration::from_secs(10)),
        }
    }

    /// Every route seen so far.
    pub(crate) fn routes(&self) -> Vec<Arc<RouteState>> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The route's breaker, created on first use. The map is read-mostly: a read lock for
    /// every call, the write lock only when a route is seen for the first time.
    pub(crate) fn route(&self, name: &RouteName) -> Arc<RouteState> {
        if let Some(r) = self.get(name) {
            return r;
        }
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = routes.get(name) {
            return r.clone();
        }
        let r = Arc::new(RouteState::new(name.clone(), self));
        routes.insert(name.clone(), r.clone());
        drop(routes);
        if let Some(o) = self.observer() {
            o.route_seen(name);
        }
        r
    }

    fn observer(&self) -> Option<Arc<Observer>> {
        self.observer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_observer(&self, observer: Arc<Observer>) {
        *self.observer.write().unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    pub(crate) fn get(&self, name: &RouteName) -> Option<Arc<RouteState>> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub(crate) fn remove(&self, name: &RouteName) {
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    pub(crate) fn route_names(&self) -> Vec<RouteName> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub(crate) fn set_on_transition(&self, f: Arc<TransitionFn>) {
        *self
            .on_transition
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    fn set_jitter(&self, jitter: Option<JitterSource>) {
        *self.jitter.lock().unwrap_or_else(|p| p.into_inner()) = jitter;
    }

    /// `open` jittered downward into `[0.8 × open, open)`, so the cap is never exceeded and
    /// routes tripped together do not all probe at the same instant.
    pub(crate) fn jitter_open(&self, open: Duration) -> Duration {
        match &*self.jitter.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(j) => j.between(open.mul_f64(0.8), open),
            None => open,
        }
    }

    fn set_throttle_source(&self, source: JitterSource) {
        *self
            .throttle_source
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = source;
    }

    /// A uniform sample in `[0, 1)` for the throttle.
    pub(crate) fn throttle_draw(&self) -> f64 {
        self.throttle_source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unit()
    }

    /// Announces a transition: a tracing event, then the user's callback. Called with no
    /// route lock held, so the callback may use the handle.
    pub(crate) fn emit(&self, route: &RouteName, t: Transition) {
        const TARGET: &str = "tower_llm_resilience::circuit_breaker";
        let open_ms = t.open_for.map(|d| d.as_millis() as u64);
        if t.to.is_open() {
            tracing::warn!(
                target: TARGET,
                route = route.as_str(),
                from = t.from.as_str(),
                to = t.to.as_str(),
                open_ms,
                trips = t.trips,
                "circuit opened"
            );
        } else {
            tracing::info!(
                target: TARGET,
                route = route.as_str(),
                from = t.from.as_str(),
                to = t.to.as_str(),
                trips = t.trips,
                "circuit state changed"
            );
        }
        let callback = self
            .on_transition
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(o) = self.observer() {
            o.transition(route, t.from.as_str(), t.to.as_str());
        }
        if let Some(f) = callback {
            f(route, t.from, t.to);
        }
    }
}

/// Applies per-route circuit breakers to a service: a route that is down fails fast with
/// `ErrorKind::CircuitOpen`, so retries stop at once and the fallback takes over.
///
/// Every service this layer (or a clone of it) builds shares one set of breakers, and so does
/// every [`CircuitBreakerHandle`] it hands out. See the [module docs](super) for the rules.
///
/// The constructors validate the policy and return a [`PolicyError`] naming the bad field, so
/// a layer that exists is always a valid one and no request ever meets a policy error.
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    shared: Arc<Shared>,
    classifier: SharedClassifier,
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("policy", &self.shared.config.policy)
            .field("routes", &self.shared.route_names())
            .finish_non_exhaustive()
    }
}

impl CircuitBreakerLayer {
    /// Breakers configured by `policy` (the `circuit_breaker` section of a
    /// [`Policy`]). The failure classes that count are the default table's (provider health:
    /// connect, timeout, transport, overloaded, server error, stream interrupted); use
    /// [`from_policy`](Self::from_policy) to take a policy's per-class overrides into account.
    /// Open times are jittered, and the throttle draws, from unseeded sources; see
    /// [`jitter`](Self::jitter) and [`throttle_source`](Self::throttle_source).
    pub fn new(policy: CircuitBreakerPolicy) -> Result<Self, PolicyError> {
        Self::build(
            policy,
            ClassActions::default(),
            LoggingPolicy::default(),
            Some(JitterSource::from_entropy()),
            JitterSource::from_entropy(),
        )
    }

    /// Breakers configured by `policy.circuit_breaker`, counting the classes whose `breaker`
    /// cell is set in `policy.actions` (rate limits count only if the policy says so), with
    /// open times jittered and the throttle's draws made from `policy.retry.seed` when it is
    /// set (two sequences of their own, so one does not shift the other).
    pub fn from_policy(policy: &Policy) -> Result<Self, PolicyError> {
        let seed = policy.retry.seed;
        let layer = Self::build(
            policy.circuit_breaker.clone(),
            policy.actions.clone(),
            policy.logging.clone(),
            Some(JitterSource::from_seed(seed)),
            JitterSource::from_seed(seed.map(|s| s ^ THROTTLE_SEED)),
        )?;
        policy.observability.validate()?;
        layer.shared.set_observer(Observer::from_policy(policy));
        Ok(layer)
    }

    /// Reports transitions to `observer` (one shared by a whole stack).
    pub(crate) fn observed_by(self, observer: Arc<Observer>) -> Self {
        self.shared.set_observer(observer);
        self
    }

    fn build(
        policy: CircuitBreakerPolicy,
        actions: ClassActions,
        logging: LoggingPolicy,
        jitter: Option<JitterSource>,
        throttle_source: JitterSource,
    ) -> Result<Self, PolicyError> {
        policy.validate()?;
        logging.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                config: Config {
                    policy,
                    actions,
                    logging,
                },
                routes: RwLock::new(HashMap::new()),
                jitter: Mutex::new(jitter),
                throttle_source: Mutex::new(throttle_source),
                on_transition: RwLock::new(None),
                observer: RwLock::new(None),
                fleet: std::sync::OnceLock::new(),
                fleet_down: std::sync::atomic::AtomicBool::new(false),
            }),
            classifier: SharedClassifier::default(),
        })
    }

    /// Jitters open times from `jitter` (seed it for reproducible runs). Affects every
    /// service and handle sharing these breakers.
    pub fn jitter(self, jitter: JitterSource) -> Self {
        self.shared.set_jitter(Some(jitter));
        self
    }

    /// Makes the throttle's random draws from `source` (seed it for reproducible runs and exact
    /// tests). Affects every service and handle sharing these breakers.
    pub fn throttle_source(self, source: JitterSource) -> Self {
        self.shared.set_throttle_source(source);
        self
    }

    /// Opens for exactly `open_base × 2^k` (capped), without jitter. Affects every service
    /// and handle sharing these breakers.
    pub fn without_jitter(self) -> Self {
        self.shared.set_jitter(None);
        self
    }

    /// Classifies responses and errors with `classifier` instead of the default one. A
    /// response an inner crate layer already classified is not classified again.
    pub fn classifier(mut self, classifier: SharedClassifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Calls `f(route, from, to)` on every state transition; see
    /// [`CircuitBreakerHandle::on_transition`].
    pub fn on_transition<F>(self, f: F) -> Self
    where
        F: Fn(&RouteName, CircuitState, CircuitState) + Send + Sync + 'static,
    {
        self.shared.set_on_transition(Arc::new(f));
        self
    }

    /// Shares the breakers with every replica that uses the same health `store` (a
    /// `redis::RedisHealth`, with the `redis` feature): see [`fleet`](super::fleet). `mode`
    /// says what calls do while the store is down: carry on with this replica's breakers
    /// (`Local`, the default), or fail with `ErrorKind::StoreUnavailable` (`FailClosed`).
    ///
    /// Must be called inside a Tokio runtime, before the layer makes services: it starts the
    /// task that exchanges with the store.
    pub fn health_store(
        self,
        store: Arc<dyn super::fleet::HealthStore>,
        mode: crate::policy::StoreMode,
    ) -> Result<Self, crate::BoxError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "a health store must be attached inside a Tokio runtime")?;
        let fleet = super::fleet::Fleet {
            store,
            replica: crate::store::unique_id(),
            mode,
        };
        if self.shared.fleet.set(fleet).is_err() {
            return Err("this layer already has a health store".into());
        }
        runtime.spawn(super::fleet::keep_in_step(Arc::downgrade(&self.shared)));
        Ok(self)
    }

    /// A handle on the breakers this layer's services share.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_parts(inner, self.shared.clone(), self.classifier.clone())
    }
}
