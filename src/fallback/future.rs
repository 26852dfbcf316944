use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::layer::Config;
use super::route::Route;
use super::{LAST_RESORT_HEADER, ROUTE_HEADER};

/// [`ROUTE_HEADER`] built at compile time: inserting by `&str` would parse it on every response.
const ROUTE_HEADER_NAME: http::HeaderName = http::HeaderName::from_static(ROUTE_HEADER);
use crate::attempt_log::{Attempt, Decision, LocalEventKind, Outcome, StopReason};
use crate::budget::pacing::Pacing;
use crate::classify::{Classification, ClassifyResponse, FailureClass};
use crate::context::{AttemptCap, Deadline, FallbackAvailable, RouteName, SpendGate};
use crate::policy::FallbackRule;
use crate::replay::{ReplayBody, try_clone_request};
use crate::{AttemptLog, Body, BoxError, Error, ErrorKind, RetryBudget};

pin_project! {
    /// Response future of [`Fallback`](super::Fallback): drives the request along the route
    /// chain until a route answers, the policy stops the chain, or no route is left.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        chain: Chain<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Waiting for the current route's response (or error).
        Calling { #[pin] future: F },
        // Reading the head (and, for an error, a bounded body prefix) to classify it.
        Classifying { future: ClassifyResponse },
        // Waiting for the service to be ready for the next route's request.
        Readying,
        Done,
    }
}

/// Everything the future keeps between polls, apart from the pinned inner future.
struct Chain<S, B> {
    config: Arc<Config>,
    svc: S,
    template: Option<Request<B>>,
    next: Option<Request<B>>,
    log: AttemptLog,
    owns_log: bool,
    /// 0 is the primary; `i > 0` is `config.routes[i - 1]`.
    current: usize,
    hops: u32,
    sent_at: Instant,
    mark: usize,
    /// A context overflow was seen: every later route must be larger-context.
    need_larger: bool,
    /// An exhausted quota was seen: every later route must have an approved, unspent owner.
    need_owner: bool,
    spent_owners: Vec<Option<String>>,
    /// The spend gate that admitted the current hop's first attempt, until that attempt has
    /// made a call: a hop that ends without one gives its reservation back.
    admitted: Option<SpendGate>,
    primary_failure: Option<Failure>,
    primary_rule: Option<FallbackRule>,
    /// `BudgetLayer`'s header-driven pacing, when it is outside.
    pacing: Option<Pacing>,
}

enum Failure {
    Response(Response<Body>),
    Error(Error),
}

enum Step {
    Hop,
    Finish(Result<Response<Body>, Error>),
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    /// Sends `req` (the primary's request) to `svc`, which must be ready.
    pub(crate) fn start(
        mut svc: S,
        req: Request<B>,
        config: Arc<Config>,
        template: Option<Request<B>>,
        log: AttemptLog,
        owns_log: bool,
    ) -> Self {
        // Noted before the call: a layer below may log synchronously (an open circuit).
        let mark = log.attempt_count();
        let sent_at = Instant::now();
        let pacing = req.extensions().get::<Pacing>().cloned();
        let future = svc.call(req);
        Self {
            state: State::Calling { future },
            chain: Chain {
                config,
                svc,
                template,
                next: None,
                log,
                owns_log,
                current: 0,
                hops: 0,
                sent_at,
                mark,
                need_larger: false,
                need_owner: false,
                spent_owners: Vec::new(),
                admitted: None,
                primary_failure: None,
                primary_rule: None,
                pacing,
            },
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("route", self.chain.route_name())
            .field("hops", &self.chain.hops)
            .finish_non_exhaustive()
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Output = Result<Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let step = match this.state.as_mut().project() {
                StateProj::Calling { future } => match ready!(future.poll(cx)) {
                    Ok(response) => {
                        let future = this.chain.config.classifier.classify_response(response);
                        this.state.set(State::Classifying { future });
                        continue;
                    }
                    Err(e) => {
                        let error = this.chain.config.classifier.error(e);
                        this.chain.on_error(error, true)
                    }
                },
                StateProj::Classifying { future } => {
                    let (response, c) = ready!(Pin::new(future).poll(cx));
                    if c.is_success() {
                        Step::Finish(Ok(this.chain.served(response, &c)))
                    } else {
                        this.chain.on_failed_response(response, &c)
                    }
                }
                StateProj::Readying => match ready!(this.chain.svc.poll_ready(cx)) {
                    Ok(()) => match this.chain.next.take() {
                        Some(req) => {
                            this.chain.mark = this.chain.log.attempt_count();
                            this.chain.sent_at = Instant::now();
                            let future = this.chain.svc.call(req);
                            this.state.set(State::Calling { future });
                            continue;
                        }
                        None => Step::Finish(this.chain.finish_failed()),
                    },
                    Err(e) => {
                        // The service never took the request: a failure of the route without
                        // an attempt.
                        this.chain.next = None;
                        this.chain.mark = this.chain.log.attempt_count();
                        let error = this.chain.config.classifier.error(e);
                        this.chain.on_error(error, false)
                    }
                },
                StateProj::Done => panic!("fallback ResponseFuture polled after completion"),
            };
            match step {
                Step::Hop => this.state.set(State::Readying),
                Step::Finish(out) => {
                    this.state.set(State::Done);
                    return Poll::Ready(out);
                }
            }
        }
    }
}

impl<S, B> Chain<S, B> {
    fn route(&self, i: usize) -> Option<&Route> {
        i.checked_sub(1).and_then(|i| self.config.routes.get(i))
    }

    fn route_name(&self) -> &RouteName {
        self.route(self.current)
            .map_or(&self.config.primary, |r| &r.name)
    }

    fn route_header(&self) -> &HeaderValue {
        self.route(self.current)
            .map_or(&self.config.primary_header, |r| &r.name_header)
    }
}

impl<S, B: ReplayBody> Chain<S, B> {
    fn budget_owner(&self) -> Option<String> {
        match self.route(self.current) {
            Some(r) => r.budget_owner.clone(),
            None => self.config.policy.primary_budget_owner.clone(),
        }
    }

    /// Whether `route` may be switched to under the constraints seen so far in the chain.
    fn eligible(&self, route: &Route) -> bool {
        if self.need_larger && !route.larger_context {
            return false;
        }
        if self.need_owner {
            let approved = route
                .budget_owner
                .as_ref()
                .is_some_and(|o| self.config.policy.approved_budget_owners.contains(o));
            if !approved || self.spent_owners.contains(&route.budget_owner) {
                return false;
            }
        }
        true
    }

    fn attempt(&self, c: &Classification) -> Attempt {
        Attempt::new(
            Some(self.route_name().clone()),
            self.log.offset_of(self.sent_at),
            self.sent_at.elapsed(),
            c,
        )
    }

    /// Notes the rate-limit headers of the current route's answer for the pacing.
    fn observe(&self, response: &Response<Body>) {
        if let Some(pacing) = &self.pacing {
            pacing.0.observe(self.route_name(), response.headers());
        }
    }

    /// A route answered with success: it serves the request.
    fn served(&mut self, mut response: Response<Body>, c: &Classification) -> Response<Body> {
        self.admitted = None;
        self.observe(&response);
        self.log.record_since(self.mark, || self.attempt(c));
        let route = self.route_name().clone();
        response
            .headers_mut()
            .insert(ROUTE_HEADER_NAME, self.route_header().clone());
        response.extensions_mut().insert(route.clone());
        self.log.set_selected_route(route);
        if self.owns_log {
            self.log.set_outcome(Outcome::Success {
                status: response.status().as_u16(),
            });
            response.extensions_mut().insert(self.log.clone());
        }
        response
    }

    fn on_failed_response(&mut self, response: Response<Body>, c: &Classification) -> Step {
        self.admitted = None;
        self.observe(&response);
        let idx = self.log.record_since(self.mark, || self.attempt(c));
        self.after_failure(Failure::Response(response), c.class, false, Some(idx))
    }

    /// `called`: whether the request was handed to the service (a readiness error was not).
    fn on_error(&mut self, error: Error, called: bool) -> Step {
        let circuit_open = match error.kind() {
            ErrorKind::CircuitOpen { retry_in, .. } => {
                self.note_circuit_open(*retry_in);
                true
            }
            _ => false,
        };
        let count = self.log.attempt_count();
        let idx = if count > self.mark {
            Some(count - 1)
        } else if called
            && matches!(
                error.kind(),
                ErrorKind::Transport | ErrorKind::StreamFailed { .. }
            )
        {
            // No layer nearer the transport recorded the attempt: record it here.
            let c = error.classification().cloned().unwrap_or_else(|| {
                Classification::failure(error.class().unwrap_or(FailureClass::Transport))
            });
            let mut attempt = self.attempt(&c);
            attempt.error = Some(error.to_string());
            Some(self.log.record(attempt))
        } else {
            None
        };
        // A hop that made no call (an open circuit, a readiness failure) spent nothing: give
        // back what the spend gate reserved for it.
        if let Some(gate) = self.admitted.take() {
            if idx.is_none() {
                gate.release(self.route_name());
            }
        }
        let class = error.class();
        self.after_failure(Failure::Error(error), class, circuit_open, idx)
    }

    /// Logs the open circuit unless the breaker already did for this call.
    fn note_circuit_open(&self, retry_in: std::time::Duration) {
        let since = self.log.offset_of(self.sent_at);
        let route = self.route_name();
        let logged = self.log.events().iter().any(|e| {
            e.offset >= since
                && e.route.as_ref() == Some(route)
                && matches!(e.kind, LocalEventKind::CircuitOpen { .. })
        });
        if !logged {
            self.log.event(
                Some(route.clone()),
                LocalEventKind::CircuitOpen { retry_in },
            );
        }
    }

    /// The current route failed for good (the layers below gave up on it): switch to the next
    /// approved route, or end the chain.
    fn after_failure(
        &mut self,
        failure: Failure,
        class: Option<FailureClass>,
        circuit_open: bool,
        idx: Option<usize>,
    ) -> Step {
        // An open circuit says nothing about the request: any next route may serve it.
        let rule = if circuit_open {
            Some(FallbackRule::Yes)
        } else {
            class.map(|c| self.config.actions.get(c).fallback)
        };
        if self.current == 0 {
            self.primary_failure = Some(failure);
            self.primary_rule = rule;
        } else {
            // Only the primary's failure is ever returned; this one is in the log.
            drop(failure);
        }
        if self.config.routes.is_empty() {
            return Step::Finish(self.finish_failed());
        }
        // A crate error that stands for no failure class (a deadline, a spend cap) is passed on.
        let Some(rule) = rule else {
            return Step::Finish(self.finish_failed());
        };
        match rule {
            FallbackRule::Yes => {}
            FallbackRule::LargerContext => self.need_larger = true,
            FallbackRule::ApprovedOwner => {
                self.need_owner = true;
                let owner = self.budget_owner();
                self.spent_owners.push(owner);
            }
            // The class never switches: no route is approved for it.
            _ => return self.stop(idx, StopReason::NoApprovedRoute),
        }
        let Some(template) = &self.template else {
            return self.stop(idx, StopReason::NotReplayable);
        };
        // The next approved route the request can be rewritten for.
        let mut found = None;
        for (i, route) in self.config.routes.iter().enumerate().skip(self.current) {
            if !self.eligible(route) {
                continue;
            }
            // The provider said this route has no capacity left until its reset: a hop there
            // could only end in a 429.
            let paused = self
                .pacing
                .as_ref()
                .and_then(|p| p.0.remaining(&route.name));
            if let Some(retry_in) = paused {
                self.log.event(
                    Some(route.name.clone()),
                    LocalEventKind::RateLimited { retry_in },
                );
                continue;
            }
            let Some(mut req) = try_clone_request(template) else {
                return self.stop(idx, StopReason::NotReplayable);
            };
            match route.rewrite(&mut req) {
                Ok(()) => {
                    found = Some((i + 1, req));
                    break;
                }
                Err(reason) => {
                    tracing::warn!(
                        target: "tower_llm_resilience::fallback",
                        route = route.name.as_str(),
                        reason = reason.as_str(),
                        "route skipped: the request cannot be rewritten for it"
                    );
                    self.log.event(
                        Some(route.name.clone()),
                        LocalEventKind::RouteSkipped {
                            reason: reason.as_str().to_owned(),
                        },
                    );
                }
            }
        }
        let Some((next, mut req)) = found else {
            return self.stop(idx, StopReason::NoApprovedRoute);
        };
        let policy = &self.config.policy;
        if self.hops >= policy.max_hops
            || !AttemptCap(policy.max_total_attempts).allows(self.log.attempt_count())
        {
            return self.stop(idx, StopReason::ChainLimit);
        }
        let to = self.config.routes[next - 1].name.clone();
        if req
            .extensions()
            .get::<Deadline>()
            .is_some_and(|d| d.remaining().is_zero())
        {
            self.log.event(Some(to), LocalEventKind::DeadlineExceeded);
            return self.stop(idx, StopReason::DeadlineExceeded);
        }
        // Reserve the hop's spend (for the request's own owner, at the price of the route it
        // goes to) after every other check, and withdraw from the retry budget last: a hop
        // refused for any reason costs neither.
        let gate = req.extensions().get::<SpendGate>().cloned();
        if let Some(gate) = &gate {
            if gate.admit(&to).is_err() {
                self.log.event(Some(to), LocalEventKind::BudgetDenied);
                return self.stop(idx, StopReason::SpendCapReached);
            }
        }
        // A hop away from a route that made no call (its circuit is open) replaces that call
        // rather than adding one, so it costs no retry budget: under a full outage of the
        // primary a healthy backup keeps serving every request.
        let budget = idx.and(req.extensions().get::<RetryBudget>());
        if let Some(budget) = budget {
            if !budget.withdraw() {
                if let Some(gate) = &gate {
                    gate.release(&to);
                }
                self.log.event(Some(to), LocalEventKind::RetryBudgetDenied);
                return self.stop(idx, StopReason::RetryBudgetDenied);
            }
        }
        self.admitted = gate;
        if let Some(idx) = idx {
            self.log.decide(idx, Decision::Fallback { to: to.clone() });
        }
        self.hops += 1;
        self.current = next;
        req.extensions_mut().insert(to);
        let more = self.hops < policy.max_hops
            && self.config.routes[next..].iter().any(|r| self.eligible(r));
        if more {
            req.extensions_mut().insert(FallbackAvailable);
        }
        self.next = Some(req);
        Step::Hop
    }

    fn stop(&mut self, idx: Option<usize>, reason: StopReason) -> Step {
        if let Some(idx) = idx {
            self.log.decide(idx, Decision::Stop(reason));
        }
        Step::Finish(self.finish_failed())
    }

    /// No route served: the last resort if the policy has one and the primary's failure was an
    /// outage (not a request, credential or budget problem), else the primary's own failure.
    fn finish_failed(&mut self) -> Result<Response<Body>, Error> {
        let outage = self.primary_rule == Some(FallbackRule::Yes);
        if let (true, Some(last)) = (outage, &self.config.last_resort) {
            let mut response = Response::new(Body::from(last.body.clone()));
            *response.status_mut() = last.status;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, last.content_type.clone());
            headers.insert(LAST_RESORT_HEADER, HeaderValue::from_static("last-resort"));
            self.log.event(None, LocalEventKind::LastResort);
            if self.owns_log {
                let status = last.status.as_u16();
                self.log.set_outcome(if last.status.is_success() {
                    Outcome::Success { status }
                } else {
                    Outcome::ProviderFailure {
                        status,
                        class: None,
                    }
                });
                response.extensions_mut().insert(self.log.clone());
            }
            return Ok(response);
        }
        self.current = 0;
        self.log.set_selected_route(self.config.primary.clone());
        match self.primary_failure.take() {
            Some(Failure::Response(mut response)) => {
                response
                    .headers_mut()
                    .insert(ROUTE_HEADER_NAME, self.config.primary_header.clone());
                response
                    .extensions_mut()
                    .insert(self.config.primary.clone());
                if self.owns_log {
                    let class = response
                        .extensions()
                        .get::<Classification>()
                        .and_then(|c| c.class);
                    self.log.set_outcome(Outcome::ProviderFailure {
                        status: response.status().as_u16(),
                        class,
                    });
                    response.extensions_mut().insert(self.log.clone());
                }
                Ok(response)
            }
            Some(Failure::Error(error)) => {
                if self.owns_log {
                    self.log.set_outcome(Outcome::Error {
                        error: error.kind().to_string(),
                        class: error.class(),
                    });
                }
                Err(error.with_log(&self.log))
            }
            // Unreachable: the primary's failure is kept before any other step.
            None => Err(Error::new(ErrorKind::FailedClosed {
                class: FailureClass::Transport,
            })
            .with_log(&self.log)),
        }
    }
}
