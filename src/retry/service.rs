use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::future::{Attempts, Facts, Granted, ResponseFuture};
use super::layer::Shared;
use crate::classify::FailureClass;
use crate::context::RequestContext;
use crate::policy::idempotency::safe_to_repeat;
use crate::replay::{ReplayBody, Template};
use crate::{Body, BoxError, Error};

/// Retries a request on the same route while its failure class, the server, the deadline and
/// the retry budget allow. Built by [`RetryLayer`](super::RetryLayer).
///
/// Clones share the policy, the retry budget and the jitter source.
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Retry<S> {
    pub(super) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
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

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.shared)
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for Retry<S>
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
            .map_err(|e| self.shared.classifier.error(e))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let shared = &self.shared;
        let (ctx, owner) = RequestContext::begin(&mut req, &shared.logging);
        let route = ctx.route_of(&req);
        if owner {
            ctx.log().set_requested_route(route.clone());
        }

        // One key per logical request and route, kept in its context: copied into every
        // attempt below, and found again by the request's later calls to the route (a
        // hedge's, a hop's back).
        if let Some(name) = &shared.key_header {
            if !req.headers().contains_key(name) {
                if let Some(key) = ctx.write(|v| v.idempotency_key(&route, || shared.keys.next())) {
                    req.headers_mut().insert(name.clone(), key);
                }
            }
        }
        let idempotent = safe_to_repeat(req.method(), req.headers(), shared.key_header.as_ref());

        let (budget, outer_deadline, fallback_available, spend) = ctx.read(|v| {
            let s = v.spend.clone();
            (v.retry_budget.clone(), v.deadline, v.fallback_available, s)
        });
        // A budget handed down by `BudgetLayer` wins; that layer deposits for the request.
        // Else this layer's own, deposited into once per logical request: handed down from
        // here, so that the request's later hops (a fallback's, a hedge's) find it and draw
        // on it rather than deposit again.
        let budget = budget.unwrap_or_else(|| {
            shared.budget.deposit();
            ctx.set_retry_budget(shared.budget.clone());
            shared.budget.clone()
        });

        let sent = ctx.send();
        let mut deadline = crate::duration::saturating_add(sent.at, shared.retry.max_elapsed);
        if let Some(d) = outer_deadline {
            deadline = deadline.min(d.0);
        }
        let facts = Facts {
            deadline,
            idempotent,
            fallback_available,
        };

        // Keep a template for retries when a retry can be made and the body can be copied;
        // else there will be no retry. The original goes out first.
        let template = (shared.retry.max_attempts > 1)
            .then(|| Template::of(&req))
            .flatten();
        let first = req;

        // The service that `poll_ready` readied goes into the future; a clone stays here
        // (as `tower::retry` does), and the future polls its own readiness before each retry.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);

        let attempts = Attempts {
            shared: shared.clone(),
            spend,
            ctx,
            owner,
            route,
            template,
            facts,
            budget,
            granted: Granted::default(),
            sent,
            count: 0,
            retried: [0; FailureClass::ALL.len()],
            previous_wait: None,
            latency: None,
            waiting_out: false,
            in_call: false,
        };
        ResponseFuture::new(service, attempts, first)
    }
}
