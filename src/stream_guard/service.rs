//! The [`StreamGuard`] service.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tower_service::Service;

use super::StreamGuardLayer;
use super::future::{Call, ResponseFuture};
use super::layer::Shared;
use crate::Body;
use crate::context::RequestContext;
use crate::error::{BoxError, Error};
use crate::policy::{PolicyError, StreamPolicy};

/// Guards the responses of the inner service (the transport): first-token, idle and total
/// timeouts, in-band SSE errors, truncation, and the commit point. See the
/// [module docs](super).
#[derive(Clone, Debug)]
pub struct StreamGuard<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> StreamGuard<S> {
    /// Guards `inner` with `policy`; a bad policy value is a [`PolicyError`] naming the field.
    pub fn new(inner: S, policy: StreamPolicy) -> Result<Self, PolicyError> {
        Ok(StreamGuardLayer::new(policy)?.wrap(inner))
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// A layer that guards services with `policy`.
    pub fn layer(policy: StreamPolicy) -> Result<StreamGuardLayer, PolicyError> {
        StreamGuardLayer::new(policy)
    }

    /// The policy in force.
    pub fn policy(&self) -> &StreamPolicy {
        &self.shared.policy
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the guard, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<http::Request<B>> for StreamGuard<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.shared.classifier.error(e))
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let (ctx, owner) = RequestContext::begin(&mut req, &self.shared.logging);
        let route = ctx.route_of(&req);
        if owner {
            ctx.log().set_requested_route(route.clone());
        }
        let settings = self.shared.policy.for_route(Some(route.as_str()));
        // The guard is the layer nearest the transport: it records the attempt itself.
        let sent = ctx.send();
        let future = self.inner.call(req);
        ResponseFuture::new(
            future,
            Call {
                ctx,
                owner,
                route,
                sent,
                settings,
                classifier: self.shared.classifier.clone(),
            },
        )
    }
}
