//! The [`Cache`] service.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::body::Hold;
use super::future::ResponseFuture;
use super::layer::Config;
use super::store::CacheKey;
use crate::budget::BudgetOwner;
use crate::policy::InFlightRule;
use crate::replay::ReplayBody;
use crate::{Body, BoxError, Error};

/// Answers a request from the idempotent result cache when the same request (same owner, same
/// key, same body) was answered before; see [`CacheLayer`](super::CacheLayer).
///
/// Clones share the store.
#[derive(Clone)]
pub struct Cache<S> {
    pub(crate) inner: S,
    pub(crate) config: Arc<Config>,
}

impl<S> Cache<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .field("policy", &self.config.policy)
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for Cache<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.config.classifier.error(e))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let config = self.config.clone();
        let Some((key, digest)) = config.key_of(&req) else {
            // No key, no owner or a body not in memory: nothing to remember it by.
            return ResponseFuture::passing(config, self.inner.call(req));
        };
        let token = crate::store::unique_id();
        let policy = &config.policy;
        let wait = policy.in_flight == InFlightRule::Wait;
        let claim = config.store.claim(&key, token, policy.lock_ttl, wait);
        let hold = Hold::new(
            config.store.clone(),
            key,
            token,
            digest,
            policy.ttl,
            policy.max_entry_bytes,
        );
        // The claim may wait for another request's whole answer: the future takes a clone,
        // polled ready only once the request is to be sent, so that a duplicate waiting holds
        // none of the inner service's capacity (a concurrency permit, a buffer slot).
        ResponseFuture::claiming(config, claim, hold, self.inner.clone(), req)
    }
}

impl Config {
    /// The key and the request digest of `req`, when it can be remembered: it has an
    /// idempotency key, an owner and a body in memory.
    fn key_of<B: ReplayBody>(&self, req: &Request<B>) -> Option<(CacheKey, u64)> {
        let key = req.headers().get(&self.key_header)?.to_str().ok()?.trim();
        if key.is_empty() {
            return None;
        }
        let owner = match req.extensions().get::<BudgetOwner>() {
            Some(o) => o.as_str().to_owned(),
            None => match req.headers().get(&self.owner_header) {
                Some(v) => v.to_str().ok()?.trim().to_owned(),
                None => self.default_owner.clone()?,
            },
        };
        if owner.is_empty() {
            return None;
        }
        let body = req.body().to_bytes()?;
        // Same key, same request: method, path and body. Not a security boundary (the owner
        // is in the key), only a guard against a client reusing a key by mistake.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        req.method().as_str().hash(&mut h);
        req.uri().path().hash(&mut h);
        body.hash(&mut h);
        let key = CacheKey {
            owner,
            policy: self.name.clone(),
            key: key.to_owned(),
        };
        Some((key, h.finish()))
    }
}
