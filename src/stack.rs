//! The whole ladder from one policy.
//!
//! [`ResilienceLayer`] builds the five layers from one [`Policy`] and stacks them in the order of
//! the recovery ladder, outermost first:
//!
//! ```text
//! BudgetLayer          admission: rate limit, spend cap, deadline, retry budget
//!  └ FallbackLayer     route chain: primary → approved backups
//!     └ RetryLayer     same-route retries
//!        └ CircuitBreakerLayer   per-route breaker; open ⇒ fail fast so Fallback moves on
//!           └ StreamGuardLayer   first-token / idle / total timeouts, commit point
//!              └ your HTTP client
//! ```
//!
//! The breaker sits inside Retry so every attempt counts and an open circuit ends the retries at
//! once; the stream guard sits next to the transport so a stream that dies before its commit
//! point is an ordinary retryable failure for the layers above, while one that dies after it
//! never is.
//!
//! [`ServiceBuilderExt`] adds the same layers to a `tower::ServiceBuilder`, one by one or all at
//! once.

use std::sync::Arc;

use tower::ServiceBuilder;
use tower::layer::util::Stack;
use tower_layer::Layer;

use crate::budget::{Budget, BudgetLayer, SpendHandle};
use crate::circuit_breaker::{CircuitBreaker, CircuitBreakerHandle, CircuitBreakerLayer};
use crate::classify::SharedClassifier;
use crate::fallback::{Fallback, FallbackLayer};
use crate::observe::{AlertSink, Observability, Observer};
use crate::policy::{Policy, PolicyError};
use crate::retry::{Retry, RetryLayer};
use crate::retry_budget::RetryBudget;
use crate::stream_guard::{StreamGuard, StreamGuardLayer};

/// The service [`ResilienceLayer`] builds around `S`.
pub type Resilient<S> = Budget<Fallback<Retry<CircuitBreaker<StreamGuard<S>>>>>;

/// All five layers, built from one policy, in the ladder's order.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_llm_resilience::{Policy, ResilienceLayer};
///
/// # fn main() -> Result<(), tower_llm_resilience::PolicyError> {
/// let policy = Policy::interactive();
/// let layer = ResilienceLayer::new(&policy)?; // or `policy.layer()?`
/// # let client = tower::service_fn(|_req: http::Request<String>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// # });
/// let service = ServiceBuilder::new().layer(layer).service(client);
/// # drop(service);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ResilienceLayer {
    budget: BudgetLayer,
    fallback: FallbackLayer,
    retry: RetryLayer,
    circuit_breaker: CircuitBreakerLayer,
    stream_guard: StreamGuardLayer,
    observer: Arc<Observer>,
}

impl ResilienceLayer {
    /// Validates `policy` and builds every layer from it.
    pub fn new(policy: &Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        // One observer for the stack: the budget layer reports the ends of requests, the
        // breakers their transitions, into the same metrics and the same alert queue.
        let observer = Observer::from_policy(policy);
        Ok(Self {
            budget: BudgetLayer::from_policy(policy)?.observed_by(observer.clone()),
            fallback: FallbackLayer::from_policy(policy)?,
            retry: RetryLayer::from_policy(policy)?,
            circuit_breaker: CircuitBreakerLayer::from_policy(policy)?
                .observed_by(observer.clone()),
            stream_guard: StreamGuardLayer::from_policy(policy)?,
            observer,
        })
    }

    /// Classifies with `classifier` in every layer.
    pub fn classifier(self, classifier: SharedClassifier) -> Self {
        Self {
            budget: self.budget.classifier(classifier.clone()),
            fallback: self.fallback.classifier(classifier.clone()),
            retry: self.retry.classifier(classifier.clone()),
            circuit_breaker: self.circuit_breaker.classifier(classifier.clone()),
            stream_guard: self.stream_guard.classifier(classifier),
            observer: self.observer,
        }
    }

    /// Keeps spend and rate-limit state in `store` — a `redis::RedisStore` shared by every
    /// replica, say (see [`BudgetLayer::store`]).
    pub fn budget_store(mut self, store: std::sync::Arc<dyn crate::budget::BudgetStore>) -> Self {
        self.budget = self.budget.store(store);
        self
    }

    /// Serves the in-process route `name` with `service`: see
    /// [`FallbackLayer::route_service`].
    pub fn route_service<S, RB>(mut self, name: &str, service: S) -> Result<Self, PolicyError>
    where
        S: tower_service::Service<http::Request<bytes::Bytes>, Response = http::Response<RB>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send,
        S::Error: Into<crate::BoxError>,
        RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        RB::Error: Into<crate::BoxError>,
    {
        self.fallback = self.fallback.route_service(name, service)?;
        Ok(self)
    }

    /// Writes the requests the policy defers to `sink`: see [`defer`](crate::defer) and
    /// [`BudgetLayer::defer_to`].
    pub fn defer_to(mut self, sink: Arc<dyn crate::defer::DeferSink>) -> Self {
        self.budget = self.budget.defer_to(sink);
        self
    }

    /// Sends alerts to `sink` instead of the default [`TracingAlerts`](crate::observe::TracingAlerts)
    /// (for this layer and every clone of it). Alerts are on unless the policy's
    /// `observability.alerts` turns them off; see [`observe`](crate::observe).
    pub fn alert_sink(self, sink: impl AlertSink) -> Self {
        self.observer.set_sink(Arc::new(sink));
        self
    }

    /// A handle on what the stack reports: alert counts, the alert sink.
    pub fn observability(&self) -> Observability {
        self.observer.handle()
    }

    /// Shares the circuit breakers with every replica that uses the same health `store` — a
    /// `redis::RedisHealth` — (see [`CircuitBreakerLayer::health_store`]). Inside a Tokio
    /// runtime.
    pub fn health_store(
        mut self,
        store: Arc<dyn crate::circuit_breaker::fleet::HealthStore>,
        mode: crate::policy::StoreMode,
    ) -> Result<Self, crate::BoxError> {
        self.circuit_breaker = self.circuit_breaker.health_store(store, mode)?;
        Ok(self)
    }

    /// The circuit breakers' handle: state per route, force open or closed, reset, snapshots.
    pub fn circuit_breaker(&self) -> CircuitBreakerHandle {
        self.circuit_breaker.handle()
    }

    /// The spend cap's handle, when the policy sets one.
    pub fn spend(&self) -> Option<SpendHandle> {
        self.budget.spend()
    }

    /// The retry budget shared by every request through the stack.
    pub fn retry_budget(&self) -> &RetryBudget {
        self.budget.retry_budget()
    }
}

impl<S> Layer<S> for ResilienceLayer {
    type Service = Resilient<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let inner = self.stream_guard.layer(inner);
        let inner = self.circuit_breaker.layer(inner);
        let inner = self.retry.layer(inner);
        let inner = self.fallback.layer(inner);
        self.budget.layer(inner)
    }
}

impl Policy {
    /// The whole stack for this policy: [`ResilienceLayer::new`].
    ///
    /// A policy file (feature `serde`) and the stack around a client, in two lines:
    ///
    /// ```
    /// # #[cfg(feature = "serde")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower::ServiceBuilder;
    /// use tower_llm_resilience::Policy;
    /// # let client = tower::service_fn(|_req: http::Request<String>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// # });
    ///
    /// let policy = toml::from_str::<Policy>(&std::fs::read_to_string("examples/policy.toml")?)?;
    /// let service = ServiceBuilder::new().layer(policy.layer()?).service(client);
    /// # drop(service);
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "serde"))]
    /// # fn main() {}
    /// ```
    ///
    /// `layer` validates the policy first, so a bad value in the file is a [`PolicyError`]
    /// naming its field.
    pub fn layer(&self) -> Result<ResilienceLayer, PolicyError> {
        ResilienceLayer::new(self)
    }
}

/// Adds the crate's layers to a [`ServiceBuilder`], in the manner of tower-http.
///
/// Each method builds its layer from the policy and fails with the policy's [`PolicyError`],
/// so a stack reads:
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_llm_resilience::{Policy, ServiceBuilderExt};
///
/// # fn main() -> Result<(), tower_llm_resilience::PolicyError> {
/// let policy = Policy::interactive();
/// # let client = tower::service_fn(|_req: http::Request<String>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
/// # });
/// let service = ServiceBuilder::new()
///     .llm_retry(&policy)?
///     .llm_circuit_breaker(&policy)?
///     .service(client);
/// # drop(service);
/// # Ok(())
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// All five layers: [`ResilienceLayer`].
    fn llm_resilience(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<ResilienceLayer, L>>, PolicyError>;
    /// [`BudgetLayer::from_policy`].
    fn llm_budget(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<BudgetLayer, L>>, PolicyError>;
    /// [`FallbackLayer::from_policy`].
    fn llm_fallback(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<FallbackLayer, L>>, PolicyError>;
    /// [`RetryLayer::from_policy`].
    fn llm_retry(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<RetryLayer, L>>, PolicyError>;
    /// [`CircuitBreakerLayer::from_policy`].
    fn llm_circuit_breaker(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<CircuitBreakerLayer, L>>, PolicyError>;
    /// [`StreamGuardLayer::from_policy`].
    fn llm_stream_guard(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<StreamGuardLayer, L>>, PolicyError>;
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn llm_resilience(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<ResilienceLayer, L>>, PolicyError> {
        Ok(self.layer(ResilienceLayer::new(policy)?))
    }

    fn llm_budget(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<BudgetLayer, L>>, PolicyError> {
        Ok(self.layer(BudgetLayer::from_policy(policy)?))
    }

    fn llm_fallback(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<FallbackLayer, L>>, PolicyError> {
        Ok(self.layer(FallbackLayer::from_policy(policy)?))
    }

    fn llm_retry(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<RetryLayer, L>>, PolicyError> {
        Ok(self.layer(RetryLayer::from_policy(policy)?))
    }

    fn llm_circuit_breaker(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<CircuitBreakerLayer, L>>, PolicyError> {
        Ok(self.layer(CircuitBreakerLayer::from_policy(policy)?))
    }

    fn llm_stream_guard(
        self,
        policy: &Policy,
    ) -> Result<ServiceBuilder<Stack<StreamGuardLayer, L>>, PolicyError> {
        Ok(self.layer(StreamGuardLayer::from_policy(policy)?))
    }
}
