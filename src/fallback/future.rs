use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::ContinuingBody;
use super::continuation::{Plan, SendContinuation};
use super::hedge::{self, BoxedHedge, Hedge, Lane, Planned};
use super::layer::Config;
use super::local::{LocalFuture, LocalRoute};
use super::route::Route;
use super::select::Choice;
use super::{LAST_RESORT_HEADER, ROUTE_HEADER};
use crate::attempt_log::{Decision, LocalEventKind, StopReason};
use crate::classify::{Classification, ClassifyResponse, FailureClass};
use crate::context::{AttemptCap, RequestContext, Sent, SpendDenied, SpendGate};
use crate::policy::idempotency::safe_to_repeat;
use crate::policy::{FallbackRule, RequestNeeds};
use crate::replay::{ReplayBody, Template};
use crate::store::StoreFuture;
use crate::{Body, BoxError, Error, ErrorKind, RouteName};

/// Whether a response is a server-sent event stream.
pub(crate) fn is_sse(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// [`ROUTE_HEADER`] built at compile time: inserting by `&str` would parse it on every response.
const ROUTE_HEADER_NAME: http::HeaderName = http::HeaderName::from_static(ROUTE_HEADER);

pin_project! {
    /// Response future of [`Fallback`](super::Fallback): drives the request along the route
    /// chain until a route answers, the policy stops the chain, or no route is left.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        state: State,
        // The current route's attempt, while `state` is `Calling`.
        #[pin]
        call: Option<S::Future>,
        // The request's hedge, when the policy hedges and it is armed.
        hedge: Option<BoxedHedge<S::Future, B>>,
        chain: Chain<S, B>,
    }
}

enum State {
    // Waiting for the current route's response (or error), and the hedge's, if one runs.
    Calling,
    // Waiting for an in-process route's answer.
    Local {
        future: LocalFuture,
    },
    // Reading the head (and, for an error, a bounded body prefix) to classify it.
    Classifying {
        future: ClassifyResponse,
    },
    // Waiting for the spend cap to reserve the hop.
    Claiming {
        admit: StoreFuture<Result<(), SpendDenied>>,
    },
    // Waiting for the service to be ready for the next route's request.
    Readying,
    // The chain ended before any call (a paused primary and no hop allowed).
    Ended {
        out: Option<Result<Response<Body>, Error>>,
    },
    Done,
}

/// Everything the future keeps between polls, apart from the pinned inner future.
pub(crate) struct Chain<S, B> {
    pub(crate) config: Arc<Config>,
    pub(crate) svc: S,
    /// The request as the caller sent it: every backup's request is made from it.
    pub(crate) template: Option<Template<B>>,
    pub(crate) ctx: RequestContext,
    /// Whether this layer owns the log.
    pub(crate) owner: bool,
    /// A chain outside this one said it has a route after this whole chain.
    pub(crate) outer_fallback: bool,
    next: Option<Next<B>>,
    /// The hop waiting for the spend cap.
    planned: Option<PlannedHop<B>>,
    /// 0 is the primary; `i > 0` is `config.routes[i - 1]`.
    current: usize,
    /// The request's route order, by the selection strategy; empty: the written order.
    order: Vec<usize>,
    /// The next hop looks at the routes from this position of the order on (past the current
    /// route, and past any the spend cap refused for this hop).
    scan_from: usize,
    /// The strategy's first route is still to be chosen: no route has been called yet.
    choosing: bool,
    /// The request's one hedge was armed.
    hedged: bool,
    hops: u32,
    sent: Option<Sent>,
    /// Time to the head of the current route's answer, when this layer must record it.
    latency: Option<Duration>,
    /// Where the chain's constraints stand after the failures seen so far.
    need: Needs,
    /// The spend gate that admitted the current hop's first attempt, until that attempt has
    /// made a call: a hop that ends without one gives its reservation back.
    admitted: Option<SpendGate>,
    /// The first route that failed (the primary, in the written order): its failure is the
    /// one the caller gets when no route serves.
    first: usize,
    first_failure: Option<Failure>,
    first_rule: Option<FallbackRule>,
    /// Sends a served stream's continuation, when the service has one installed.
    pub(crate) continuation: Option<Arc<dyn SendContinuation>>,
    /// What the request needs of a route, when some route declares what it lacks.
    pub(crate) request_needs: Option<RequestNeeds>,
}

/// What every later route must offer, after the failures seen so far in the chain.
#[derive(Default, Clone)]
pub(crate) struct Needs {
    /// A context overflow was seen: every later route must be larger-context.
    larger_context: bool,
    /// An exhausted quota was seen: every later route must have an approved, unspent owner.
    other_owner: bool,
    spent_owners: Vec<Option<String>>,
}

impl Needs {
    /// Adds what `rule` asks of every later route, after a failure of a route whose budget
    /// owner is `owner`.
    pub(crate) fn add(
        &mut self,
        rule: FallbackRule,
        owner: Option<String>,
    ) -> Result<(), StopReason> {
        match rule {
            FallbackRule::Yes => {}
            FallbackRule::LargerContext => self.larger_context = true,
            FallbackRule::ApprovedOwner => {
                self.other_owner = true;
                self.spent_owners.push(owner);
            }
            // The class never switches: no route is approved for it.
            _ => return Err(StopReason::NoApprovedRoute),
        }
        Ok(())
    }

    /// Whether `route` may be switched to under these needs.
    pub(crate) fn allow(&self, route: &Route, approved_owners: &[String]) -> bool {
        self.allow_parts(route.larger_context, &route.budget_owner, approved_owners)
    }

    /// [`allow`](Self::allow) for a route that is larger-context or not, spending `owner`'s
    /// budget.
    pub(crate) fn allow_parts(
        &self,
        larger_context: bool,
        owner: &Option<String>,
        approved_owners: &[String],
    ) -> bool {
        if self.larger_context && !larger_context {
            return false;
        }
        if self.other_owner {
            let approved = owner.as_ref().is_some_and(|o| approved_owners.contains(o));
            if !approved || self.spent_owners.contains(owner) {
                return false;
            }
        }
        true
    }
}

enum Failure {
    Response(Response<Body>),
    Error(Error),
}

/// What a step of the chain leads to.
enum Step {
    /// A route answered: its answer is classified next.
    Classify(ClassifyResponse),
    Hop,
    /// A hop, once the spend cap has reserved it.
    Claim(StoreFuture<Result<(), SpendDenied>>),
    Finish(Result<Response<Body>, Error>),
}

/// The next route's request: for the service below, or for an in-process route.
enum Next<B> {
    Remote(Request<B>),
    Local(Request<Bytes>, LocalRoute),
}

/// A hop that passed every check but the shared budgets.
struct PlannedHop<B> {
    /// The failed attempt it follows, if the route made a call.
    attempt: Option<usize>,
    /// The rule the failure switches under.
    rule: FallbackRule,
    /// The route (0 is the primary) and its position in the order.
    next: usize,
    next_pos: usize,
    to: RouteName,
    request: Next<B>,
}

impl<S, B> Chain<S, B> {
    /// A chain starting on the primary route.
    pub(crate) fn new(
        config: Arc<Config>,
        svc: S,
        template: Option<Template<B>>,
        ctx: RequestContext,
        owner: bool,
        outer_fallback: bool,
    ) -> Self {
        Self {
            config,
            svc,
            template,
            ctx,
            owner,
            outer_fallback,
            next: None,
            planned: None,
            current: 0,
            order: Vec::new(),
            scan_from: 1,
            choosing: false,
            hedged: false,
            hops: 0,
            sent: None,
            latency: None,
            need: Needs::default(),
            admitted: None,
            first: 0,
            first_failure: None,
            first_rule: None,
            continuation: None,
            request_needs: None,
        }
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
    B: ReplayBody,
{
    /// Sends `req` (the primary's request) to the chain's service, which must be ready; or,
    /// when the provider said the primary has no capacity left and a backup has, goes to the
    /// backup at once.
    pub(crate) fn start(mut chain: Chain<S, B>, req: Request<B>) -> Self {
        let first = if chain.choosing {
            chain.choose_first()
        } else {
            chain.skip_primary()
        };
        if let Some(step) = first {
            let state = match step {
                Step::Classify(future) => State::Classifying { future },
                Step::Hop => State::Readying,
                Step::Claim(admit) => State::Claiming { admit },
                Step::Finish(out) => State::Ended { out: Some(out) },
            };
            return Self {
                state,
                call: None,
                hedge: None,
                chain,
            };
        }
        // Noted before the call: a layer below may log synchronously (an open circuit).
        chain.sent = Some(chain.ctx.send());
        let future = chain.svc.call(req);
        let hedge = chain.arm_hedge();
        Self {
            state: State::Calling,
            call: Some(future),
            hedge,
            chain,
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
        let chain = this.chain;
        loop {
            let step = match this.state {
                State::Calling => {
                    let out = ready!(poll_attempts(this.call.as_mut(), this.hedge, chain, cx));
                    chain.answered(out)
                }
                State::Classifying { future } => {
                    let (response, c) = ready!(Pin::new(future).poll(cx));
                    chain.on_response(response, &c)
                }
                State::Claiming { admit } => {
                    let granted = ready!(Pin::new(admit).poll(cx));
                    chain.claimed(granted)
                }
                State::Local { future } => chain.answered(ready!(future.as_mut().poll(cx))),
                // An in-process route does not wait for the service below.
                State::Readying if matches!(chain.next, Some(Next::Local(..))) => {
                    if let Some(Next::Local(req, route)) = chain.next.take() {
                        chain.sent = Some(chain.ctx.resend());
                        let future = route.call(req);
                        *this.state = State::Local { future };
                    }
                    continue;
                }
                State::Readying => match ready!(chain.svc.poll_ready(cx)) {
                    Ok(()) => match chain.next.take() {
                        Some(Next::Remote(req)) => {
                            chain.sent = Some(chain.ctx.resend());
                            this.call.set(Some(chain.svc.call(req)));
                            if this.hedge.is_none() {
                                *this.hedge = chain.arm_hedge();
                            }
                            *this.state = State::Calling;
                            continue;
                        }
                        Some(Next::Local(..)) | None => Step::Finish(chain.finish_failed()),
                    },
                    Err(e) => {
                        // The service never took the request: a failure of the route without
                        // an attempt.
                        chain.next = None;
                        chain.sent = Some(chain.ctx.resend());
                        let error = chain.config.classifier.error(e);
                        chain.on_error(error, false)
                    }
                },
                State::Ended { out } => match out.take() {
                    Some(out) => Step::Finish(out),
                    None => panic!("fallback ResponseFuture polled after completion"),
                },
                State::Done => panic!("fallback ResponseFuture polled after completion"),
            };
            match step {
                Step::Classify(future) => *this.state = State::Classifying { future },
                Step::Hop => *this.state = State::Readying,
                Step::Claim(admit) => *this.state = State::Claiming { admit },
                Step::Finish(out) => {
                    // Whatever of a hedge is left is cancelled with the request's end.
                    if let Some(hedge) = this.hedge.take() {
                        chain.cancel_hedge(hedge);
                    }
                    *this.state = State::Done;
                    return Poll::Ready(out);
                }
            }
        }
    }
}

/// Polls the current route's attempt and the hedge (its delay, its reservation, its
/// readiness, its attempt). Ready with the answer the chain goes on with: the first to reach
/// its commit point with a success, the other cancelled; or, when one fails while the other
/// is still in flight, the other's, whatever it is.
fn poll_attempts<S, B>(
    mut call: Pin<&mut Option<S::Future>>,
    hedge: &mut Option<BoxedHedge<S::Future, B>>,
    chain: &mut Chain<S, B>,
    cx: &mut Context<'_>,
) -> Poll<Result<S::Response, S::Error>>
where
    S: Service<Request<B>>,
    S::Response: Answer,
    B: ReplayBody,
{
    loop {
        if let Some(future) = call.as_mut().as_pin_mut() {
            if let Poll::Ready(out) = future.poll(cx) {
                call.set(None);
                let racing = hedge.as_ref().is_some_and(|h| h.future.is_some());
                if racing && !succeeded(&out) {
                    // The hedge may still answer: it is the chain's attempt now.
                    drop(out);
                    if let Some(h) = hedge.as_mut() {
                        chain.take_lane(h.as_mut().project().lane.take());
                    }
                    continue;
                }
                if let Some(h) = hedge.take() {
                    chain.cancel_hedge(h);
                }
                return Poll::Ready(out);
            }
        }
        let Some(h) = hedge.as_mut() else {
            return Poll::Pending;
        };
        match chain.poll_hedge(h.as_mut(), cx) {
            Poll::Pending => return Poll::Pending,
            // The hedge made no attempt (not allowed, refused, not ready): the chain goes on.
            Poll::Ready(None) => {
                *hedge = None;
                if call.is_none() {
                    // Unreachable: a hedge that never sent is cancelled with the chain's
                    // attempt.
                    return Poll::Pending;
                }
            }
            Poll::Ready(Some(out)) => {
                if call.is_some() && !succeeded(&out) {
                    // The chain's own attempt may still answer; this one is in the log, and
                    // the route it failed on is not one to hop to next.
                    drop(out);
                    chain.pass_over(h.as_mut().project().lane.take());
                    *hedge = None;
                    continue;
                }
                // The hedge is the chain's attempt from here.
                if call.is_some() {
                    chain.cancel_attempt();
                    call.set(None);
                }
                chain.take_lane(h.as_mut().project().lane.take());
                *hedge = None;
                return Poll::Ready(out);
            }
        }
    }
}

/// A response whose status says the attempt succeeded (its commit point reached).
pub(crate) trait Answer {
    fn succeeded(&self) -> bool;
}

impl<RB> Answer for Response<RB> {
    fn succeeded(&self) -> bool {
        self.status().is_success()
    }
}

fn succeeded<R: Answer, E>(out: &Result<R, E>) -> bool {
    out.as_ref().is_ok_and(Answer::succeeded)
}

impl<S, B> Chain<S, B> {
    fn route(&self, i: usize) -> Option<&Route> {
        i.checked_sub(1).and_then(|i| self.config.routes.get(i))
    }

    fn route_name(&self) -> &RouteName {
        self.name_of(self.current)
    }

    fn name_of(&self, i: usize) -> &RouteName {
        self.route(i).map_or(&self.config.primary, |r| &r.name)
    }

    fn route_header(&self) -> &HeaderValue {
        self.route(self.current)
            .map_or(&self.config.primary_header, |r| &r.name_header)
    }

    /// Takes the strategy's order for the request, and logs it with why its first route
    /// leads. A backup it puts first is reached like a hop, from the template.
    pub(crate) fn follow(&mut self, choice: Choice) {
        if choice.leads_elsewhere() {
            if self.template.is_none() {
                // Nothing to make a backup's request from: the caller's goes to the primary.
                return;
            }
            self.choosing = true;
            self.scan_from = 0;
        }
        self.record_choice(&choice);
        self.order = choice.order;
    }

    fn record_choice(&self, choice: &Choice) {
        let Some(selector) = &self.config.selector else {
            return;
        };
        let candidates = choice
            .order
            .iter()
            .map(|&i| self.name_of(i).clone())
            .collect();
        let chosen = LocalEventKind::RouteChosen {
            strategy: selector.strategy(),
            candidates,
            reason: choice.reason.clone(),
        };
        let first = choice.order.first().map(|&i| self.name_of(i).clone());
        self.ctx.log().event(first, chosen);
    }

    /// The route at position `p` of the request's order.
    fn route_at(&self, p: usize) -> Option<usize> {
        if self.order.is_empty() {
            (p <= self.config.routes.len()).then_some(p)
        } else {
            self.order.get(p).copied()
        }
    }

    /// What a route's answer leads to: its classification, or (an error) the chain's next
    /// step.
    fn answered<RB, E>(&mut self, out: Result<Response<RB>, E>) -> Step
    where
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
        E: Into<BoxError>,
        B: ReplayBody,
    {
        match out {
            Ok(response) => Step::Classify(self.classify(response)),
            Err(e) => {
                let error = self.config.classifier.error(e);
                self.on_error(error, true)
            }
        }
    }

    fn classify<RB>(&mut self, response: Response<RB>) -> ClassifyResponse
    where
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let mark = self.sent.as_ref().map_or(0, |s| s.mark);
        self.latency = self.sent.as_ref().and_then(|s| self.ctx.head_latency(s));
        self.config
            .classifier
            .classify_attempt(response, self.ctx.log(), mark)
    }

    /// Records the current route's attempt unless a layer nearer the transport did.
    fn record(&self, c: &Classification, error: Option<String>) -> Option<usize> {
        let sent = self.sent.as_ref()?;
        Some(
            self.ctx
                .record(sent, self.route_name(), self.latency, c, error),
        )
    }

    /// Notes the rate-limit headers of the current route's answer for the pacing.
    fn observe(&self, response: &Response<Body>) {
        if let Some(pacer) = self.ctx.pacer() {
            pacer.observe(self.route_name(), response.headers());
        }
    }
}

impl<S, B> Chain<S, B>
where
    S: Service<Request<B>>,
    B: ReplayBody,
{
    /// The request's hedge, when the policy hedges and this is the first call of the chain to
    /// a route below (a hedge per request, never for an in-process route).
    fn arm_hedge(&mut self) -> Option<BoxedHedge<S::Future, B>> {
        let hedger = self.config.hedger.as_ref()?;
        if self.hedged {
            return None;
        }
        // Sent twice, the request must be harmless twice.
        let original = self.template.as_ref()?.request();
        // (The retry layer below sets the policy's key on every request that has none.)
        let safe = hedger.key_header.is_some()
            || safe_to_repeat(original.method(), original.headers(), None);
        if !safe {
            return None;
        }
        self.hedged = true;
        Some(Hedge::new(hedger.delay(self.current)))
    }

    /// Drives the hedge: `Ready(None)` when it will make no attempt, `Ready(Some(..))` with its
    /// attempt's answer.
    fn poll_hedge(
        &mut self,
        h: Pin<&mut Hedge<S::Future, B>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<S::Response, S::Error>>> {
        let mut h = h.project();
        loop {
            match h.step {
                hedge::Step::Waiting => {
                    ready!(h.timer.as_mut().poll(cx));
                    let Some((planned, admit)) = self.plan_hedge(*h.delay) else {
                        *h.step = hedge::Step::Done;
                        return Poll::Ready(None);
                    };
                    let granted = match admit {
                        None => Ok(()),
                        Some(mut admit) => match admit.now() {
                            Some(granted) => granted,
                            None => {
                                *h.step = hedge::Step::Admitting(admit, planned);
                                continue;
                            }
                        },
                    };
                    *h.step = match self.hedge_granted(granted, planned) {
                        Some(planned) => hedge::Step::Readying(planned),
                        None => hedge::Step::Done,
                    };
                }
                hedge::Step::Admitting(admit, _) => {
                    let granted = ready!(Pin::new(admit).poll(cx));
                    let step = std::mem::replace(h.step, hedge::Step::Done);
                    if let hedge::Step::Admitting(_, planned) = step {
                        if let Some(planned) = self.hedge_granted(granted, planned) {
                            *h.step = hedge::Step::Readying(planned);
                        }
                    }
                }
                hedge::Step::Readying(_) => {
                    let ready = ready!(self.svc.poll_ready(cx));
                    let step = std::mem::replace(h.step, hedge::Step::Done);
                    let hedge::Step::Readying(planned) = step else {
                        return Poll::Ready(None);
                    };
                    if ready.is_err() {
                        // The hedge is given up, not the request: the chain's attempt runs on.
                        self.give_back(&planned);
                        return Poll::Ready(None);
                    }
                    if planned.route != self.current {
                        self.hops += 1;
                    }
                    // The layers below take the attempt's route from the context when called.
                    self.ctx.set_route(planned.name.clone());
                    let sent = self.ctx.resend();
                    let future = self.svc.call(planned.request);
                    self.ctx.set_route(self.route_name().clone());
                    h.future.set(Some(future));
                    *h.lane = Some(Lane {
                        route: planned.route,
                        scan_from: planned.scan_from,
                        sent: Some(sent),
                        admitted: planned.admitted,
                    });
                    *h.step = hedge::Step::Running;
                }
                hedge::Step::Running => {
                    let Some(future) = h.future.as_mut().as_pin_mut() else {
                        return Poll::Ready(None);
                    };
                    let out = ready!(future.poll(cx));
                    h.future.set(None);
                    *h.step = hedge::Step::Done;
                    return Poll::Ready(Some(out));
                }
                hedge::Step::Done => return Poll::Ready(None),
            }
        }
    }

    /// The hedge, if the request may have one now: its route and request, and the spend
    /// cap's reservation for it, to wait for.
    #[allow(clippy::type_complexity)]
    fn plan_hedge(
        &mut self,
        delay: Duration,
    ) -> Option<(Planned<B>, Option<StoreFuture<Result<(), SpendDenied>>>)> {
        let hedger = self.config.hedger.clone()?;
        let template = self.template.as_ref()?;
        // A failure so far that no route may be switched for is not hidden behind a hedge.
        let deterministic = self.ctx.log().attempts().iter().any(|a| {
            a.class
                .is_some_and(|c| self.config.actions.get(c).fallback != FallbackRule::Yes)
        });
        if deterministic {
            return None;
        }
        if !self.within_limits(!hedger.policy.same_route) {
            return None;
        }
        let (route, scan_from, request) = if hedger.policy.same_route {
            let mut req = template.attempt()?;
            if let Some(route) = self.route(self.current) {
                route.rewrite(&mut req).ok()?;
            }
            (self.current, self.scan_from, req)
        } else {
            match self.next_route().ok()? {
                (pos, route, Next::Remote(req)) => (route, pos + 1, req),
                (_, _, Next::Local(..)) => return None,
            }
        };
        if !hedger.take() {
            return None;
        }
        let name = self.name_of(route).clone();
        // The hop is counted when the hedge is sent: one refused or given up before that
        // leaves it to the chain.
        self.ctx
            .log()
            .event(Some(name.clone()), LocalEventKind::Hedged { after: delay });
        let admit = self.ctx.spend_gate().map(|gate| gate.admit(&name));
        let planned = Planned {
            route,
            scan_from,
            name,
            request,
            admitted: None,
        };
        Some((planned, admit))
    }

    /// The spend cap answered for the hedge: it goes on when granted and the retry budget
    /// pays for it.
    fn hedge_granted(
        &self,
        granted: Result<(), SpendDenied>,
        mut planned: Planned<B>,
    ) -> Option<Planned<B>> {
        let log = self.ctx.log();
        if granted.is_err() {
            log.event(Some(planned.name.clone()), LocalEventKind::BudgetDenied);
            return None;
        }
        let gate = self.ctx.spend_gate();
        if !self.pay_retry_budget(true, &gate, &planned.name) {
            return None;
        }
        planned.admitted = gate;
        Some(planned)
    }

    /// The hedge won: the chain's own attempt is cancelled. It was sent, so it is recorded (and
    /// its spend reservation kept, for what it may have cost).
    fn cancel_attempt(&self) {
        if let Some(sent) = &self.sent {
            self.record_cancelled(self.route_name(), sent);
        }
    }

    /// The request ended (served, failed, or by the chain's own attempt winning): what is left
    /// of the hedge is cancelled, recorded when it was sent, its reservation given back when
    /// it was not.
    fn cancel_hedge(&self, mut h: BoxedHedge<S::Future, B>) {
        let h = h.as_mut().project();
        if h.future.is_some() {
            if let Some(Lane {
                route,
                sent: Some(sent),
                ..
            }) = h.lane.as_ref()
            {
                self.record_cancelled(self.name_of(*route), sent);
            }
        }
        if let hedge::Step::Readying(planned) = h.step {
            self.give_back(planned);
        }
    }

    /// A hedge that was paid for and not sent gives back its spend reservation and the
    /// retry budget it withdrew.
    fn give_back(&self, planned: &Planned<B>) {
        if let Some(gate) = &planned.admitted {
            gate.release(&planned.name);
        }
        if let Some(budget) = self.ctx.retry_budget() {
            budget.refund();
        }
    }

    fn record_cancelled(&self, route: &RouteName, sent: &Sent) {
        let log = self.ctx.log();
        let mut attempt = crate::attempt_log::Attempt::new(
            Some(route.clone()),
            log.offset_of(sent.at),
            sent.at.elapsed(),
            &Classification::default(),
        );
        attempt.error = Some(
            "cancelled: another attempt of the request reached its commit point first".to_owned(),
        );
        log.record(attempt);
    }

    /// The hedge's attempt failed while the chain's own runs on: a hop goes past its route.
    fn pass_over(&mut self, lane: Option<Lane>) {
        if let Some(lane) = lane {
            self.scan_from = self.scan_from.max(lane.scan_from);
        }
    }

    /// The hedge's attempt is the chain's from here (the chain's own failed, or it was
    /// cancelled for the hedge).
    fn take_lane(&mut self, lane: Option<Lane>) {
        let Some(lane) = lane else {
            return;
        };
        self.current = lane.route;
        self.scan_from = lane.scan_from;
        self.sent = lane.sent;
        self.admitted = lane.admitted;
        self.ctx.set_route(self.route_name().clone());
    }
}

impl<S, B: ReplayBody> Chain<S, B> {
    fn on_response(&mut self, response: Response<Body>, c: &Classification) -> Step {
        self.admitted = None;
        self.observe(&response);
        let idx = self.record(c, None);
        if let (Some(selector), Some(sent)) = (&self.config.selector, &self.sent) {
            if c.is_success() {
                selector.observe(self.current, sent.at.elapsed());
            } else {
                selector.penalize(self.current);
            }
        }
        if let (Some(hedger), Some(sent)) = (&self.config.hedger, &self.sent) {
            if c.is_success() {
                hedger.observe(self.current, sent.at.elapsed());
            }
        }
        if c.is_success() {
            Step::Finish(Ok(self.served(response, idx)))
        } else {
            self.after_failure(Failure::Response(response), c.class, false, idx)
        }
    }

    /// A route answered with success (its attempt is `attempt`): it serves the request.
    fn served(&mut self, mut response: Response<Body>, attempt: Option<usize>) -> Response<Body> {
        let route = self.route_name().clone();
        response
            .headers_mut()
            .insert(ROUTE_HEADER_NAME, self.route_header().clone());
        response.extensions_mut().insert(route.clone());
        self.ctx.log().set_selected_route(route);
        if let Some(plan) = self.continuation_plan(&response, attempt) {
            response = response.map(|body| Body::new(ContinuingBody::new(body, plan)));
        }
        self.ctx.close_response(self.owner, response)
    }

    /// What the body of a served stream needs to continue it, when continuation is on and
    /// the stream can be continued at all.
    fn continuation_plan(&self, response: &Response<Body>, attempt: Option<usize>) -> Option<Plan> {
        self.config.continuation.as_ref()?;
        if !is_sse(response.headers()) {
            return None;
        }
        let Some(sender) = self.continuation.clone() else {
            self.config.warn_no_sender();
            return None;
        };
        let template = self.template.as_ref()?;
        let original = template.request();
        let mut copy = Request::new(original.body().to_bytes()?);
        *copy.method_mut() = original.method().clone();
        *copy.uri_mut() = original.uri().clone();
        *copy.version_mut() = original.version();
        *copy.headers_mut() = original.headers().clone();
        *copy.extensions_mut() = template.extensions();
        let plan = Plan::new(
            self.config.clone(),
            sender,
            copy,
            self.ctx.clone(),
            response.status(),
            self.current,
            attempt,
            self.need.clone(),
        );
        Some(
            plan.needing(self.request_needs)
                .in_order(self.order.clone()),
        )
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
        let log = self.ctx.log();
        let mark = self.sent.as_ref().map_or(0, |s| s.mark);
        let count = log.attempt_count();
        let idx = if count > mark {
            Some(count - 1)
        } else if called
            && matches!(
                error.kind(),
                ErrorKind::Transport | ErrorKind::StreamFailed { .. }
            )
        {
            // No layer nearer the transport recorded the attempt: record it here.
            self.sent
                .as_ref()
                .map(|sent| self.ctx.record_error(sent, self.route_name(), &error))
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
        if let (Some(selector), Some(_)) = (&self.config.selector, idx) {
            selector.penalize(self.current);
        }
        let class = error.class();
        self.after_failure(Failure::Error(error), class, circuit_open, idx)
    }

    /// The first step under a selection strategy whose order starts with a backup: a hop to
    /// the first route of the order the request may use, without a call to the primary and
    /// without counting as a hop. When the order leaves no route (every one skipped, the spend
    /// cap refusing them), the chain falls back to the written order.
    fn choose_first(&mut self) -> Option<Step> {
        match self.hop(FallbackRule::Yes, None) {
            Ok(step) => Some(step),
            Err(_) => {
                // `None`: the caller's request goes to the primary as it is.
                self.forget_order();
                self.skip_primary()
            }
        }
    }

    /// [`choose_first`](Self::choose_first)'s way back to the written order once the caller's
    /// request is gone: the primary's request is made from the template.
    fn written_order(&mut self) -> Step {
        self.forget_order();
        if let Some(step) = self.skip_primary() {
            return step;
        }
        let Some(req) = self.template.as_ref().and_then(Template::attempt) else {
            return Step::Finish(self.finish_failed());
        };
        self.ctx.set_route(self.config.primary.clone());
        self.next = Some(Next::Remote(req));
        Step::Hop
    }

    /// Gives up on the strategy's order: the primary first, then the backups as written.
    fn forget_order(&mut self) {
        self.choosing = false;
        self.order.clear();
        self.scan_from = 1;
        self.current = 0;
    }

    /// The first step when the primary is not to be called: it cannot serve the request (its
    /// capabilities), or the provider paused it while a backup has room. `None`: it is called.
    fn skip_primary(&mut self) -> Option<Step> {
        let Some(reason) = self.lacks(&self.config.policy.primary_capabilities) else {
            return self.around_paused_primary();
        };
        let log = self.ctx.log();
        let skipped = LocalEventKind::RouteSkipped {
            reason: reason.to_owned(),
        };
        log.event(Some(self.config.primary.clone()), skipped);
        self.sent = Some(self.ctx.send());
        let error = Error::new(ErrorKind::FailedClosed {
            class: FailureClass::InvalidRequest,
        });
        if !self.config.routes.iter().any(|r| self.eligible(r)) {
            // No route can serve it: the request fails closed without a call, every skip in
            // the log (never the last resort: the request is the caller's to change).
            for route in &self.config.routes {
                if let Some(reason) = self.lacks(&route.capabilities) {
                    let skipped = LocalEventKind::RouteSkipped {
                        reason: reason.to_owned(),
                    };
                    log.event(Some(route.name.clone()), skipped);
                }
            }
            log.set_selected_route(self.config.primary.clone());
            return Some(Step::Finish(Err(self.ctx.close_error(self.owner, error))));
        }
        // The primary is not at fault, only unfit: any route that can serve the request may.
        let class = Some(FailureClass::InvalidRequest);
        Some(self.after_failure(Failure::Error(error), class, true, None))
    }

    /// Why a route with `capabilities` cannot serve this request, if it cannot.
    fn lacks(&self, capabilities: &crate::policy::Capabilities) -> Option<&'static str> {
        self.request_needs
            .as_ref()
            .and_then(|n| capabilities.lacks(n))
    }

    /// The first step when the pacer says the primary has no capacity until its reset and a
    /// backup approved for rate limits is not paused: the primary fails without a call, as an
    /// open circuit does, and the chain hops. `None`: the primary is called (the budget layer's
    /// admission is where a request waits for a paused route with no backup).
    fn around_paused_primary(&mut self) -> Option<Step> {
        // Admission took a backup's rate-limit bucket, the primary's having no room.
        if let Some((backup, retry_in)) = self.ctx.read(|v| v.rerouted.clone()) {
            return self.around_limited_primary(&backup, retry_in);
        }
        let pacer = self.ctx.pacer()?;
        let retry_in = pacer.remaining(&self.config.primary)?;
        if self.config.actions.get(FailureClass::RateLimited).fallback != FallbackRule::Yes
            || self.config.policy.max_hops == 0
            || self.template.is_none()
        {
            return None;
        }
        let room = self
            .config
            .routes
            .iter()
            .any(|r| self.eligible(r) && pacer.remaining(&r.name).is_none());
        if !room {
            return None;
        }
        Some(self.primary_rate_limited(retry_in))
    }

    /// The first step when admission found the primary's local rate limit full and admitted
    /// the request on `backup`'s bucket: the primary fails without a call, as a paused one
    /// does, and the chain hops. `None` (the primary is called after all) when no hop is
    /// possible.
    fn around_limited_primary(&mut self, backup: &RouteName, retry_in: Duration) -> Option<Step> {
        if self.config.policy.max_hops == 0 || self.template.is_none() {
            return None;
        }
        // The backup admission took, first: it is the one whose capacity the request holds.
        if let Some(i) = self.config.routes.iter().position(|r| r.name == *backup) {
            if self.eligible(&self.config.routes[i]) && i > 0 {
                self.order = std::iter::once(0)
                    .chain(std::iter::once(i + 1))
                    .chain((1..=self.config.routes.len()).filter(|&j| j != i + 1))
                    .collect();
            }
        }
        Some(self.primary_rate_limited(retry_in))
    }

    /// The primary fails without a call, rate limited for `retry_in` (logged for it), and the
    /// chain goes on as after any failure of that class.
    fn primary_rate_limited(&mut self, retry_in: Duration) -> Step {
        let primary = Some(self.config.primary.clone());
        self.ctx
            .log()
            .event(primary, LocalEventKind::RateLimited { retry_in });
        self.sent = Some(self.ctx.send());
        let error = Error::new(ErrorKind::RateLimited { retry_in });
        let class = Some(FailureClass::RateLimited);
        self.after_failure(Failure::Error(error), class, false, None)
    }

    /// Logs the open circuit unless the breaker already did for this call.
    fn note_circuit_open(&self, retry_in: Duration) {
        let log = self.ctx.log();
        let since = self
            .sent
            .as_ref()
            .map_or(Duration::ZERO, |s| log.offset_of(s.at));
        let route = self.route_name();
        let logged = log.has_event(route, since, |k| {
            matches!(k, LocalEventKind::CircuitOpen { .. })
        });
        if !logged {
            log.event(
                Some(route.clone()),
                LocalEventKind::CircuitOpen { retry_in },
            );
        }
    }

    /// The current route failed for good (the layers below gave up on it): switch to the next
    /// approved route, or end the chain. `attempt` is the failed attempt's index in the log,
    /// `None` when the route made no call (its circuit was open, it was never ready).
    fn after_failure(
        &mut self,
        failure: Failure,
        class: Option<FailureClass>,
        circuit_open: bool,
        attempt: Option<usize>,
    ) -> Step {
        // An open circuit says nothing about the request: any next route may serve it.
        let rule = if circuit_open {
            Some(FallbackRule::Yes)
        } else {
            class.map(|c| self.config.actions.get(c).fallback)
        };
        if self.first_failure.is_none() {
            self.first = self.current;
            self.first_failure = Some(failure);
            self.first_rule = rule;
        } else {
            // Only the first route's failure is ever returned; this one is in the log.
            drop(failure);
        }
        if self.config.routes.is_empty() {
            return Step::Finish(self.finish_failed());
        }
        // A crate error that stands for no failure class (a deadline, a spend cap) is passed on.
        let Some(rule) = rule else {
            return Step::Finish(self.finish_failed());
        };
        match self.hop(rule, attempt) {
            Ok(step) => step,
            Err(reason) => self.stop(attempt, reason),
        }
    }

    fn stop(&mut self, attempt: Option<usize>, reason: StopReason) -> Step {
        if let Some(idx) = attempt {
            self.ctx.log().decide(idx, Decision::Stop(reason));
        }
        Step::Finish(self.finish_failed())
    }

    /// Plans the hop to the next route `rule` allows, or says why there is none.
    fn hop(&mut self, rule: FallbackRule, attempt: Option<usize>) -> Result<Step, StopReason> {
        if !self.choosing {
            self.constrain(rule)?;
        }
        let (next_pos, next, request) = self.next_route()?;
        // The strategy's first route is a choice, not a hop.
        if !self.within_limits(!self.choosing) {
            return Err(StopReason::ChainLimit);
        }
        let to = self.name_of(next).clone();
        if self.ctx.deadline().is_some_and(|d| d.remaining().is_zero()) {
            self.ctx
                .log()
                .event(Some(to), LocalEventKind::DeadlineExceeded);
            return Err(StopReason::DeadlineExceeded);
        }
        // Reserve the hop's spend (for the request's own owner, at the price of the route it
        // goes to) after every other check, and withdraw from the retry budget last: a hop
        // refused for any reason costs neither. The primary's spend was reserved at admission.
        let admit = (next != 0)
            .then(|| self.ctx.spend_gate().map(|gate| gate.admit(&to)))
            .flatten();
        self.planned = Some(PlannedHop {
            attempt,
            rule,
            next,
            next_pos,
            to,
            request,
        });
        let Some(mut admit) = admit else {
            return Ok(self.claimed(Ok(())));
        };
        Ok(match admit.now() {
            Some(granted) => self.claimed(granted),
            None => Step::Claim(admit),
        })
    }

    /// The spend cap answered for the planned hop: withdraw from the retry budget, and hop.
    fn claimed(&mut self, granted: Result<(), SpendDenied>) -> Step {
        let Some(hop) = self.planned.take() else {
            return Step::Finish(self.finish_failed());
        };
        let log = self.ctx.log();
        let gate = self.ctx.spend_gate();
        if granted.is_err() {
            log.event(Some(hop.to.clone()), LocalEventKind::BudgetDenied);
            // A later route may cost less: the hop goes on past this one.
            self.scan_from = hop.next_pos + 1;
            return match self.hop(hop.rule, hop.attempt) {
                Ok(step) => step,
                Err(_) if self.choosing => self.written_order(),
                Err(StopReason::NoApprovedRoute) => {
                    self.stop(hop.attempt, StopReason::SpendCapReached)
                }
                Err(reason) => self.stop(hop.attempt, reason),
            };
        }
        // A hop away from a route that made no call (its circuit is open) replaces that call
        // rather than adding one, so it costs no retry budget: under a full outage of the
        // primary a healthy backup keeps serving every request.
        if !self.pay_retry_budget(hop.attempt.is_some(), &gate, &hop.to) {
            return self.stop(hop.attempt, StopReason::RetryBudgetDenied);
        }
        self.admitted = gate;
        if let Some(idx) = hop.attempt {
            log.decide(idx, Decision::Fallback { to: hop.to.clone() });
        }
        // The strategy's first route is a choice, not a hop.
        if !std::mem::take(&mut self.choosing) {
            self.hops += 1;
        }
        self.current = hop.next;
        self.scan_from = hop.next_pos + 1;
        let more = self.hops < self.config.policy.max_hops
            && (self.scan_from..)
                .map_while(|p| self.route_at(p))
                .any(|i| self.eligible_at(i));
        self.ctx.set_route(hop.to);
        self.ctx.set_fallback_available(more || self.outer_fallback);
        self.next = Some(hop.request);
        Step::Hop
    }

    /// Whether one more attempt fits the request's attempt cap (the chain's, or a smaller one
    /// the caller or an outer chain set) and, when it switches route (`switches`), its
    /// `max_hops`.
    fn within_limits(&self, switches: bool) -> bool {
        let policy = &self.config.policy;
        let attempts = self.ctx.log().attempt_count();
        let cap = self
            .ctx
            .attempt_cap()
            .unwrap_or(AttemptCap(policy.max_total_attempts));
        !(switches && self.hops >= policy.max_hops) && cap.allows(attempts)
    }

    /// Withdraws one more attempt on `to` from the retry budget when `costs` (a hop away from
    /// a route that made no call replaces that call and costs nothing). Refused: what `gate`
    /// reserved for `to` is given back and the refusal logged.
    fn pay_retry_budget(&self, costs: bool, gate: &Option<SpendGate>, to: &RouteName) -> bool {
        let budget = self.ctx.retry_budget().filter(|_| costs);
        if budget.is_none_or(|b| b.withdraw()) {
            return true;
        }
        if let Some(gate) = gate {
            gate.release(to);
        }
        self.ctx
            .log()
            .event(Some(to.clone()), LocalEventKind::RetryBudgetDenied);
        false
    }

    /// Adds what `rule` asks of every later route to the chain's needs.
    fn constrain(&mut self, rule: FallbackRule) -> Result<(), StopReason> {
        let owner = self.config.owner_of(self.current);
        self.need.add(rule, owner)
    }

    /// Whether `route` may be switched to under the constraints seen so far in the chain, and
    /// can serve the request.
    fn eligible(&self, route: &Route) -> bool {
        self.need
            .allow(route, &self.config.policy.approved_budget_owners)
            && self.lacks(&route.capabilities).is_none()
    }

    /// [`eligible`](Self::eligible) for the chain's route `i`, the primary (0) included.
    fn eligible_at(&self, i: usize) -> bool {
        match self.route(i) {
            Some(route) => self.eligible(route),
            None => {
                let policy = &self.config.policy;
                self.need.allow_parts(
                    false,
                    &policy.primary_budget_owner,
                    &policy.approved_budget_owners,
                ) && self.lacks(&policy.primary_capabilities).is_none()
            }
        }
    }

    /// The next eligible route of the order that is not paused and that the request can be
    /// rewritten for: its position in the order, its index, its request.
    fn next_route(&self) -> Result<(usize, usize, Next<B>), StopReason> {
        let template = self.template.as_ref().ok_or(StopReason::NotReplayable)?;
        let log = self.ctx.log();
        let pacer = self.ctx.pacer();
        for p in self.scan_from.. {
            let Some(i) = self.route_at(p) else { break };
            let Some(route) = self.route(i) else {
                // The primary, later in a strategy's order: the request as the caller built it.
                if let Some(reason) = self.lacks(&self.config.policy.primary_capabilities) {
                    let skipped = LocalEventKind::RouteSkipped {
                        reason: reason.to_owned(),
                    };
                    log.event(Some(self.config.primary.clone()), skipped);
                    continue;
                }
                if !self.eligible_at(0) {
                    continue;
                }
                let primary = &self.config.primary;
                if let Some(retry_in) = pacer.as_ref().and_then(|p| p.remaining(primary)) {
                    let limited = LocalEventKind::RateLimited { retry_in };
                    log.event(Some(primary.clone()), limited);
                    continue;
                }
                let req = template.attempt().ok_or(StopReason::NotReplayable)?;
                return Ok((p, 0, Next::Remote(req)));
            };
            if let Some(reason) = self.lacks(&route.capabilities) {
                log.event(
                    Some(route.name.clone()),
                    LocalEventKind::RouteSkipped {
                        reason: reason.to_owned(),
                    },
                );
                continue;
            }
            if !self.eligible(route) {
                continue;
            }
            // The provider said this route has no capacity left until its reset: a hop there
            // could only end in a 429.
            if let Some(retry_in) = pacer.as_ref().and_then(|p| p.remaining(&route.name)) {
                log.event(
                    Some(route.name.clone()),
                    LocalEventKind::RateLimited { retry_in },
                );
                continue;
            }
            if route.in_process && route.local.is_none() {
                tracing::warn!(
                    target: "tower_llm_resilience::fallback",
                    route = route.name.as_str(),
                    "in-process route skipped: no service is registered for it"
                );
                let reason = "no service is registered for the in-process route".to_owned();
                log.event(
                    Some(route.name.clone()),
                    LocalEventKind::RouteSkipped { reason },
                );
                continue;
            }
            let mut req = template.attempt().ok_or(StopReason::NotReplayable)?;
            match route.rewrite(&mut req) {
                Ok(()) => {
                    let next = match &route.local {
                        None => Next::Remote(req),
                        Some(local) => {
                            let (mut parts, body) = req.into_parts();
                            let body = body.to_bytes().ok_or(StopReason::NotReplayable)?;
                            // It answers in the process: the caller's key is not its to see.
                            for name in crate::policy::CREDENTIAL_HEADERS {
                                parts.headers.remove(name);
                            }
                            Next::Local(Request::from_parts(parts, body), local.clone())
                        }
                    };
                    return Ok((p, i, next));
                }
                Err(reason) => {
                    tracing::warn!(
                        target: "tower_llm_resilience::fallback",
                        route = route.name.as_str(),
                        reason = reason.as_str(),
                        "route skipped: the request cannot be rewritten for it"
                    );
                    log.event(
                        Some(route.name.clone()),
                        LocalEventKind::RouteSkipped {
                            reason: reason.as_str().to_owned(),
                        },
                    );
                }
            }
        }
        Err(StopReason::NoApprovedRoute)
    }

    /// No route served: the last resort if the policy has one and the primary's failure was an
    /// outage (not a request, credential or budget problem), else the primary's own failure.
    fn finish_failed(&mut self) -> Result<Response<Body>, Error> {
        let outage = self.first_rule == Some(FallbackRule::Yes);
        if let (true, Some(last)) = (outage, &self.config.last_resort) {
            let mut response = Response::new(Body::from(last.body.clone()));
            *response.status_mut() = last.status;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, last.content_type.clone());
            headers.insert(LAST_RESORT_HEADER, HeaderValue::from_static("last-resort"));
            self.ctx.log().event(None, LocalEventKind::LastResort);
            return Ok(self.ctx.close_response(self.owner, response));
        }
        self.current = self.first;
        let route = self.route_name().clone();
        self.ctx.log().set_selected_route(route.clone());
        match self.first_failure.take() {
            Some(Failure::Response(mut response)) => {
                response
                    .headers_mut()
                    .insert(ROUTE_HEADER_NAME, self.route_header().clone());
                response.extensions_mut().insert(route);
                Ok(self.ctx.close_response(self.owner, response))
            }
            Some(Failure::Error(error)) => Err(self.ctx.close_error(self.owner, error)),
            // Unreachable: the first failure is kept before any other step.
            None => Err(self.ctx.close_error(
                false,
                Error::new(ErrorKind::FailedClosed {
                    class: FailureClass::Transport,
                }),
            )),
        }
    }
}
