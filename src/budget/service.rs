use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tower_service::Service;

use super::future::{Ctx, ResponseFuture};
use super::layer::Shared;
use super::pacing::Pacing;
use super::rate_limit::{Admit, Ask};
use super::spend::BudgetOwner;
use crate::attempt_log::{AttemptLog, LocalEventKind};
use crate::context::{Deadline, RouteName};
use crate::error::BoxError;
use crate::policy::RateKey;
use crate::replay::ReplayBody;

/// Admission control for a whole logical request: see [`BudgetLayer`](super::BudgetLayer).
///
/// Clones share the state of the layer that built them.
#[derive(Clone)]
pub struct Budget<S> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<Shared>,
}

impl<S> Budget<S> {
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

impl<S: std::fmt::Debug> std::fmt::Debug for Budget<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, B, RB> Service<http::Request<B>> for Budget<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Response = http::Response<crate::Body>;
    type Error = crate::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.shared.classifier.error(e))),
            other => other.map(|_| Ok(())),
        }
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        let (log, created) = AttemptLog::get_or_insert(&mut req);
        if created {
            log.set_tracing(shared.logging.tracing);
        }
        // One deposit per logical request; the inner layers withdraw per retry and per hop.
        shared.retry_budget.deposit();
        req.extensions_mut().insert(shared.retry_budget.clone());
        if let Some(d) = shared.deadline {
            Deadline::after(d).tighten(&mut req);
        }
        let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
        let route = req
            .extensions()
            .get::<RouteName>()
            .cloned()
            .or_else(|| shared.primary.clone())
            .unwrap_or_else(|| RouteName::of_request(&req));
        log.set_requested_route(route.clone());
        let mut ctx = Ctx::new(shared.clone(), log, created, route.clone(), deadline);

        let owner = match &shared.spend {
            Some(spend) => spend.owner_of(&req),
            None => req
                .extensions()
                .get::<BudgetOwner>()
                .map(|o| o.as_str().to_owned())
                .or_else(|| {
                    let v = req.headers().get(&shared.owner_header)?.to_str().ok()?;
                    Some(v.trim().to_owned())
                }),
        };
        let counts_tokens = shared.rate.as_ref().is_some_and(|r| r.counts_tokens());
        let estimate = (shared.spend.is_some() || counts_tokens).then(|| {
            let body = req.body().to_bytes();
            shared.estimator.0.estimate(req.headers(), body.as_deref())
        });

        if let Some(spend) = &shared.spend {
            match spend.open(
                &shared.store,
                owner.clone(),
                &route,
                estimate.unwrap_or_default(),
                &ctx.log,
            ) {
                Ok(ticket) => {
                    // The first attempt is reserved; the inner layers reserve every further
                    // one through the gate.
                    req.extensions_mut().insert(ticket.gate());
                    ctx.ticket = Some(ticket);
                }
                Err(e) => {
                    ctx.log
                        .event(Some(route.clone()), LocalEventKind::BudgetDenied);
                    return ResponseFuture::failed(ctx, e, false);
                }
            }
        }

        if let Some(gate) = &shared.gate {
            if let Some(pacer) = &gate.pacer {
                req.extensions_mut().insert(Pacing(pacer.clone()));
            }
            let key = match shared.rate.as_ref().map(|r| r.key) {
                Some(RateKey::Owner) => format!("owner:{}", owner.as_deref().unwrap_or("")),
                _ => format!("route:{route}"),
            };
            let demands = match &shared.rate {
                Some(r) => r.demands(estimate.map_or(0, |e| e.total())),
                None => Vec::new(),
            };
            let ask = Ask {
                line: format!("{key}|{route}"),
                key,
                route,
                demands,
                deadline,
            };
            match gate.admit(ask) {
                Admit::Now => {}
                Admit::Refused(refusal) => return ResponseFuture::refused(ctx, refusal, None),
                Admit::Queued(waiter) => {
                    // Keep the service that was polled ready for when the request's turn comes.
                    let fresh = self.inner.clone();
                    let ready = std::mem::replace(&mut self.inner, fresh);
                    return ResponseFuture::queued(ctx, waiter, ready, req);
                }
            }
        }
        ctx.sending();
        let fut = self.inner.call(req);
        ResponseFuture::calling(ctx, fut)
    }
}
