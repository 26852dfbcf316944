//! The [`CacheLayer`].

use std::sync::Arc;

use http::HeaderName;
use tower_layer::Layer;

use super::Cache;
use super::store::{CacheStore, MemoryCache};
use crate::classify::SharedClassifier;
use crate::policy::idempotency::CONVENTIONAL_KEY_HEADER;
use crate::policy::{CachePolicy, LoggingPolicy, Policy, PolicyError};

/// The owner header when the policy has no spend section.
const DEFAULT_OWNER_HEADER: &str = "x-llm-budget-owner";

/// What every request of a [`Cache`] shares.
pub(crate) struct Config {
    pub(crate) policy: CachePolicy,
    /// The policy's name: two policies never share answers.
    pub(crate) name: String,
    pub(crate) key_header: HeaderName,
    pub(crate) owner_header: HeaderName,
    pub(crate) default_owner: Option<String>,
    pub(crate) store: Arc<dyn CacheStore>,
    pub(crate) classifier: SharedClassifier,
    pub(crate) logging: LoggingPolicy,
}

/// Applies [`Cache`]: the idempotent result cache, outside every other layer.
///
/// Built from a policy whose `idempotency.cache` is set; answers are kept in a
/// [`MemoryCache`] unless [`store`](Self::store) names another (a `redis::RedisCache` shared
/// by every replica, with the `redis` feature).
#[derive(Clone)]
pub struct CacheLayer {
    config: Arc<Config>,
}

impl std::fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("policy", &self.config.policy)
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl CacheLayer {
    /// The cache of `policy.idempotency.cache`, keyed by the idempotency key header
    /// (`idempotency.key_header`, else `idempotency-key`), the owner (a `BudgetOwner`
    /// extension, else the spend policy's owner header, else its default owner) and the
    /// policy's `workflow`. A policy without a cache section is a [`PolicyError`].
    pub fn from_policy(policy: &Policy) -> Result<Self, PolicyError> {
        policy.idempotency.validate()?;
        let cache = policy.idempotency.cache.clone().ok_or_else(|| {
            PolicyError::new(
                "idempotency.cache",
                "is not set: there is no cache to build",
            )
        })?;
        let header = |field: &str, name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| PolicyError::new(field, "is not a valid header name"))
        };
        let key_header = header(
            "idempotency.key_header",
            policy
                .idempotency
                .key_header
                .as_deref()
                .unwrap_or(CONVENTIONAL_KEY_HEADER.as_str()),
        )?;
        let spend = policy.budget.spend.as_ref();
        let owner_header = header(
            "budget.spend.owner_header",
            spend.map_or(DEFAULT_OWNER_HEADER, |s| s.owner_header.as_str()),
        )?;
        let max_entries = usize::try_from(cache.max_entries).unwrap_or(usize::MAX);
        Ok(Self {
            config: Arc::new(Config {
                store: Arc::new(MemoryCache::new(max_entries)),
                policy: cache,
                name: policy.workflow.clone(),
                key_header,
                owner_header,
                default_owner: spend.and_then(|s| s.default_owner.clone()),
                classifier: SharedClassifier::default(),
                logging: policy.logging.clone(),
            }),
        })
    }

    /// Keeps answers in `store` (share one store between replicas). Call before the layer is
    /// cloned into services.
    pub fn store(mut self, store: Arc<dyn CacheStore>) -> Self {
        if let Some(c) = Arc::get_mut(&mut self.config) {
            c.store = store;
        } else {
            let c = &self.config;
            self.config = Arc::new(Config {
                policy: c.policy.clone(),
                name: c.name.clone(),
                key_header: c.key_header.clone(),
                owner_header: c.owner_header.clone(),
                default_owner: c.default_owner.clone(),
                store,
                classifier: c.classifier.clone(),
                logging: c.logging.clone(),
            });
        }
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> &CachePolicy {
        &self.config.policy
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner,
            config: self.config.clone(),
        }
    }
}
