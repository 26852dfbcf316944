use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tower_service::Service;

use super::future::{Admission, Admitted, Deferral, Ending, ResponseFuture};
use super::layer::Shared;
use super::rate_limit::Ask;
use super::spend::BudgetOwner;
use crate::RouteName;
use crate::attempt_log::LocalEventKind;
use crate::context::{Deadline, RequestContext};
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
        let (ctx, owner) = RequestContext::begin(&mut req, &shared.logging);
        // Kept before any layer changes the request, should it be deferred.
        let deferral = shared.defer.as_ref().and_then(|cfg| {
            match req.extensions().get::<crate::defer::Replaying>() {
                Some(replay) => Some(Deferral::Replay(replay.clone())),
                None => cfg.park(&mut req).map(|p| Deferral::Parked(Box::new(p))),
            }
        });
        // One deposit per logical request; the inner layers withdraw per retry and per hop.
        shared.retry_budget.deposit();
        let sent = ctx.send();
        // What the request's end reports (metrics, alerts) needs of the request itself.
        let noted = match (&shared.observer, owner) {
            (Some(observer), true) => Some(observer.note(&req)),
            _ => None,
        };
        let (deadline, route) = ctx.write(|v| {
            v.observed = noted;
            v.retry_budget = Some(shared.retry_budget.clone());
            if let Some(d) = shared.deadline {
                v.tighten_deadline(Deadline(crate::duration::saturating_add(sent.at, d)));
            }
            (v.deadline.map(|d| d.0), v.route.clone())
        });
        let route = route
            .or_else(|| shared.primary.clone())
            .unwrap_or_else(|| RouteName::of_authority(&req));
        ctx.log().set_requested_route(route.clone());
        let mut admitted = Admitted::new(shared.clone(), ctx, owner, route, deadline);

        let owner = self.owner_of(&req);
        if deferral.is_some() {
            admitted.deferral = deferral;
            admitted.budget_owner = owner.clone();
        }
        let counts_tokens = shared.rate.as_ref().is_some_and(|r| r.counts_tokens());
        let estimate = (shared.spend.is_some() || counts_tokens).then(|| {
            let body = req.body().to_bytes();
            shared.estimator.0.estimate(req.headers(), body.as_deref())
        });

        let opening = match &shared.spend {
            Some(spend) => {
                let opening = spend.open(
                    &shared.store,
                    owner.clone(),
                    &admitted.route,
                    estimate.unwrap_or_default(),
                    admitted.ctx.log(),
                );
                match opening {
                    Ok(opening) => Some(opening),
                    Err(e) => {
                        let route = Some(admitted.route.clone());
                        let log = admitted.ctx.log();
                        log.event(route, LocalEventKind::BudgetDenied);
                        let error = admitted.fail(e, false);
                        return ResponseFuture::ended(admitted, Ending::Failed(error));
                    }
                }
            }
            None => None,
        };
        let ask = shared.gate.as_ref().map(|gate| {
            if let Some(pacer) = &gate.pacer {
                admitted.ctx.set_pacer(pacer.clone());
            }
            let tokens = estimate.map_or(0, |e| e.total());
            self.ask(&admitted, owner.as_deref(), tokens)
        });
        let mut admission = Admission::new(opening, ask);
        // A store in memory answers at once, and the request goes to the service that was
        // polled ready. One across the network, or a queue, is waited for in the future with a
        // clone polled ready only once the request is admitted: a request waiting its turn
        // holds none of the inner service's capacity (a concurrency permit, a buffer slot),
        // which stays with this service for the next request.
        let mut cx = Context::from_waker(Waker::noop());
        match admission.poll_admit(&mut admitted, &mut cx) {
            Poll::Ready(Ok(())) => {
                admitted.sending(Some(sent));
                let fut = self.inner.call(req);
                ResponseFuture::calling(admitted, fut)
            }
            Poll::Ready(Err(e)) => ResponseFuture::ended(admitted, e),
            Poll::Pending => {
                ResponseFuture::admitting(admitted, admission, self.inner.clone(), req)
            }
        }
    }
}

impl<S> Budget<S> {
    /// The budget owner of `req`: the spend policy's owner, else a `BudgetOwner` extension or
    /// the owner header.
    fn owner_of<B>(&self, req: &http::Request<B>) -> Option<String> {
        let shared = &self.shared;
        match &shared.spend {
            Some(spend) => spend.owner_of(req),
            None => req
                .extensions()
                .get::<BudgetOwner>()
                .map(|o| o.as_str().to_owned())
                .or_else(|| {
                    let v = req.headers().get(&shared.owner_header)?.to_str().ok()?;
                    Some(v.trim().to_owned())
                }),
        }
    }

    /// What the rate limit is asked for the request: its key (route or owner), its line, and
    /// the tokens it takes.
    fn ask(&self, admitted: &Admitted, owner: Option<&str>, tokens: u64) -> Ask {
        let route = &admitted.route;
        let key = match self.shared.rate.as_ref().map(|r| r.key) {
            Some(RateKey::Owner) => format!("owner:{}", owner.unwrap_or("")),
            _ => format!("route:{route}"),
        };
        let demands = match &self.shared.rate {
            Some(r) => r.demands(tokens),
            None => Vec::new(),
        };
        let backups = match (&self.shared.rate_around, key.starts_with("route:")) {
            (Some((primary, buckets)), true) if primary == route => Some(buckets.clone()),
            _ => None,
        };
        Ask {
            line: format!("{key}|{route}"),
            key,
            route: route.clone(),
            demands,
            deadline: admitted.deadline,
            backups,
        }
    }
}
