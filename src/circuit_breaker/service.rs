use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tower_service::Service;

use super::future::{Call, Permit, ResponseFuture};
use super::handle::CircuitBreakerHandle;
use super::layer::{Config, Shared};
use super::state::{Refusal, Verdict};
use crate::StreamCause;
use crate::attempt_log::LocalEventKind;
use crate::classify::{FailureClass, SharedClassifier};
use crate::context::RequestContext;
use crate::error::{BoxError, Error, ErrorKind};

/// Per-route circuit breakers around a service; built by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer).
///
/// Clones share the breakers.
///
/// `poll_ready` delegates to the inner service: the route, and so whether its circuit is open,
/// is only known once `call` sees the request. A call whose route is open then fails fast
/// without calling the inner service; the readiness it reserved is simply used by the next
/// call.
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
    classifier: SharedClassifier,
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> CircuitBreaker<S> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, classifier: SharedClassifier) -> Self {
        Self {
            inner,
            shared,
            classifier,
        }
    }

    /// A handle on the breakers this service shares.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }

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

impl<S, B, RB> Service<http::Request<B>> for CircuitBreaker<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = http::Response<crate::Body>;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.classifier.error(e))
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let (ctx, owner) = RequestContext::begin(&mut req, &self.shared.config.logging);
        let route = ctx.route_of(&req);
        let state = self.shared.route(&route);
        let sent = ctx.send();
        if self.shared.fleet_refuses() {
            let route = Some(route);
            ctx.log().event(route, LocalEventKind::StoreUnavailable);
            let error = Error::new(ErrorKind::StoreUnavailable);
            return ResponseFuture::rejected(ctx.close_error(owner, error));
        }
        // Without a backup route the throttle decides, not the open circuit (see `throttle`).
        let backup = ctx.fallback_available();
        match state.admit(&self.shared, sent.at, backup) {
            Err(refusal) => {
                ctx.log().event(Some(route.clone()), refusal.event());
                let mut error = Error::new(refusal.kind(route));
                if let Refusal::Throttled(retry_in) = refusal {
                    if state.wait_out(sent.at).is_some() {
                        error = error.with_wait_out(retry_in);
                    }
                }
                ResponseFuture::rejected(ctx.close_error(owner, error))
            }
            Ok(admission) => {
                let call = Call {
                    permit: Permit::new(self.shared.clone(), state, admission, sent.at),
                    route,
                    ctx,
                    owner,
                    sent,
                    classifier: self.classifier.clone(),
                };
                ResponseFuture::called(self.inner.call(req), call)
            }
        }
    }
}

/// The class an error counts as for the breaker. An in-band error event in a stream counts as
/// its own class (a safety block or rate limit mid-stream says nothing about health; an
/// `overloaded_error` does), whether it came before or after the commit point.
pub(crate) fn error_class(e: &Error) -> Option<FailureClass> {
    match e.kind() {
        ErrorKind::StreamInterrupted {
            cause: StreamCause::InBandError { class, .. },
            ..
        } => Some(*class),
        _ => e.class(),
    }
}

/// Whether `e` counts as a failure against the route.
pub(crate) fn counts(config: &Config, e: &Error) -> bool {
    error_class(e).is_some_and(|c| config.counts(c))
}

/// The breaker's verdict on a class (`None`: success).
pub(crate) fn verdict(config: &Config, class: Option<FailureClass>) -> Verdict {
    match class {
        None => Verdict::Success,
        Some(c) if config.counts(c) => Verdict::Failure,
        Some(c) if super::throttle::refused_uncounted(c) => Verdict::Refused,
        Some(_) => Verdict::Neutral,
    }
}
