//! The [`StreamGuardLayer`].

use std::sync::Arc;

use tower_layer::Layer;

use super::StreamGuard;
use crate::classify::SharedClassifier;
use crate::policy::{LoggingPolicy, Policy, PolicyError, StreamPolicy};

#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub(crate) policy: StreamPolicy,
    pub(crate) classifier: SharedClassifier,
    pub(crate) logging: LoggingPolicy,
}

/// Applies [`StreamGuard`] to a service: the layer next to the transport. See the
/// [module docs](super).
#[derive(Debug, Clone)]
pub struct StreamGuardLayer {
    shared: Arc<Shared>,
}

impl StreamGuardLayer {
    /// A layer with `policy` (the policy's `stream` section), validated: a bad value is a
    /// [`PolicyError`] naming the field. The default classifier and logging switches apply.
    pub fn new(policy: StreamPolicy) -> Result<Self, PolicyError> {
        Self::build(policy, LoggingPolicy::default())
    }

    fn build(policy: StreamPolicy, logging: LoggingPolicy) -> Result<Self, PolicyError> {
        policy.validate()?;
        logging.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                policy,
                classifier: SharedClassifier::default(),
                logging,
            }),
        })
    }

    /// A layer with the `stream` section of `policy` and its `logging` switches (whether
    /// request ids are recorded; whether a log this layer creates emits tracing events).
    /// Per-route settings must name routes of the policy's fallback chain.
    pub fn from_policy(policy: &Policy) -> Result<Self, PolicyError> {
        for name in policy.stream.routes.keys() {
            if !policy.route_names().any(|r| r == name) {
                return Err(PolicyError::new(
                    format!("stream.routes.{name}"),
                    format!(
                        "names no route (routes: {})",
                        policy.route_names().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        Self::build(policy.stream.clone(), policy.logging.clone())
    }

    /// Classifies responses and transport errors with `classifier` instead of the default one.
    pub fn classifier(mut self, classifier: SharedClassifier) -> Self {
        Arc::make_mut(&mut self.shared).classifier = classifier;
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> &StreamPolicy {
        &self.shared.policy
    }

    pub(crate) fn wrap<S>(&self, inner: S) -> StreamGuard<S> {
        StreamGuard::from_shared(inner, self.shared.clone())
    }
}

impl<S> Layer<S> for StreamGuardLayer {
    type Service = StreamGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.wrap(inner)
    }
}
