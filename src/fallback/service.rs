use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::future::{Chain, ResponseFuture};
use super::layer::Config;
use crate::context::{AttemptCap, RequestContext};
use crate::policy::{ClassActions, FallbackPolicy, PolicyError};
use crate::replay::{ReplayBody, try_clone_request};
use crate::{Body, BoxError, Error};

/// Middleware that sends a request to its primary route and, when that route has failed for
/// good with a failure the policy lets it route around, to the next approved backup route.
///
/// See the [module docs](crate::fallback) for the rules. Built by
/// [`FallbackLayer`](super::FallbackLayer) or [`Fallback::new`].
#[derive(Clone)]
pub struct Fallback<S> {
    pub(crate) inner: S,
    pub(crate) config: Arc<Config>,
}

impl<S> Fallback<S> {
    /// Wraps `inner` with the chain in `policy` and the default per-class actions; fails with a
    /// [`PolicyError`] like [`FallbackLayer::new`](super::FallbackLayer::new).
    pub fn new(inner: S, policy: FallbackPolicy) -> Result<Self, PolicyError> {
        Ok(Self {
            inner,
            config: Arc::new(Config::new(policy, ClassActions::default())?),
        })
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming the middleware.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for Fallback<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("inner", &self.inner)
            .field("policy", &self.config.policy)
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for Fallback<S>
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let config = self.config.clone();
        let (ctx, owner) = RequestContext::begin(&mut req, &config.logging);
        ctx.log().set_requested_route(config.primary.clone());
        // The copy every backup's request is made from. It shares the request's context.
        let template = if config.routes.is_empty() || config.policy.max_hops == 0 {
            None
        } else {
            try_clone_request(&req)
        };
        let outer_fallback = ctx.write(|v| {
            v.tighten_attempt_cap(AttemptCap(config.policy.max_total_attempts));
            v.route = Some(config.primary.clone());
            let outer = v.fallback_available;
            v.fallback_available |= template.is_some();
            outer
        });
        // Call the service that was driven to readiness; keep it for the hops, which clone it
        // again and wait for its readiness before each call.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let chain = Chain::new(config, svc, template, ctx, owner, outer_fallback);
        ResponseFuture::start(chain, req)
    }
}
