use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::body::SpendBody;
use super::layer::Shared;
use super::rate_limit::{Admit, Ask, Refusal, Waiter};
use super::spend::{End, Opening, SpendReceipt, Ticket};
use crate::attempt_log::LocalEventKind;
use crate::classify::{Classification, ClassifyResponse, FailureClass};
use crate::context::{RequestContext, Sent};
use crate::defer::{Again, DeferReason, Deferred, Parked, Replaying, millis, now_ms};
use crate::error::{BoxError, Error, ErrorKind};
use crate::store::StoreFuture;
use crate::{Body, RouteName};

/// What a request that may be deferred keeps for its record.
pub(crate) enum Deferral {
    /// A request from a caller: what it came in as.
    Parked(Box<Parked>),
    /// A worker's replay of a record.
    Replay(Replaying),
}

/// How a request that did not get an answer ends: with its error (already closed), or by
/// being written down for later.
pub(crate) enum Ending {
    Failed(Error),
    Deferring(Box<Deferring>),
}

/// A deferral under way: the record being written (none for a replay, whose worker
/// reschedules it), what the caller is told once it is, and the failure it ends with should the
/// sink refuse the record.
pub(crate) struct Deferring {
    write: Option<StoreFuture<Result<(), BoxError>>>,
    deferred: Deferred,
    otherwise: Option<Otherwise>,
}

enum Otherwise {
    Error(Error),
    Response(Box<(http::Response<Body>, Classification)>),
}

/// What one admitted request carries through its future.
pub(crate) struct Admitted {
    shared: Arc<Shared>,
    pub(crate) ctx: RequestContext,
    /// Whether this layer owns the log.
    owner: bool,
    pub(crate) route: RouteName,
    pub(crate) deadline: Option<Instant>,
    pub(crate) ticket: Option<Arc<Ticket>>,
    /// The request as handed inward, once it has been.
    sent: Option<Sent>,
    /// What a deferral would need, when the request may be deferred.
    pub(crate) deferral: Option<Deferral>,
    /// The budget owner, for a deferred record.
    pub(crate) budget_owner: Option<String>,
}

impl Admitted {
    pub(crate) fn new(
        shared: Arc<Shared>,
        ctx: RequestContext,
        owner: bool,
        route: RouteName,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            shared,
            ctx,
            owner,
            route,
            deadline,
            ticket: None,
            sent: None,
            deferral: None,
            budget_owner: None,
        }
    }

    /// The request goes to the inner service now: as `sent` when admission let it through at
    /// once, else (out of a queue) as a new clock reading.
    pub(crate) fn sending(&mut self, sent: Option<Sent>) {
        self.sent = Some(sent.unwrap_or_else(|| self.ctx.resend()));
        if let Some(t) = &self.ticket {
            t.mark_called();
        }
    }

    pub(crate) fn fail(&mut self, e: Error, in_flight: bool) -> Error {
        if let Some(t) = self.ticket.take() {
            t.settle(End::Error { in_flight });
        }
        self.ctx.close_error(self.owner, e)
    }

    fn refuse(&mut self, refusal: Refusal) -> Ending {
        let (kind, event) = match refusal {
            Refusal::RateLimited(retry_in) => (
                ErrorKind::RateLimited { retry_in },
                LocalEventKind::RateLimited { retry_in },
            ),
            Refusal::Deadline => (
                ErrorKind::DeadlineExceeded,
                LocalEventKind::DeadlineExceeded,
            ),
            Refusal::Unavailable(reason) => {
                let route = Some(self.route.clone());
                self.ctx
                    .log()
                    .event(route, LocalEventKind::StoreUnavailable);
                let e = Error::new(ErrorKind::StoreUnavailable).with_source(reason);
                return Ending::Failed(self.fail(e, false));
            }
        };
        self.ctx.log().event(Some(self.route.clone()), event);
        self.fail_or_defer(Error::new(kind))
    }

    fn inner_error(&mut self, e: impl Into<BoxError>) -> Ending {
        let e = self.shared.classifier.error(e);
        let was_call = matches!(
            e.kind(),
            ErrorKind::Transport
                | ErrorKind::StreamFailed { .. }
                | ErrorKind::StreamInterrupted { .. }
        );
        if let (true, Some(sent)) = (was_call, &self.sent) {
            self.ctx.record_error(sent, &self.route, &e);
        }
        self.fail_or_defer(e)
    }

    /// Ends the request on `e`, or defers it when `e` is a transient failure its policy
    /// defers.
    fn fail_or_defer(&mut self, e: Error) -> Ending {
        let (class, hint, route) = match e.kind() {
            ErrorKind::RateLimited { retry_in } => {
                (Some(FailureClass::RateLimited), Some(*retry_in), None)
            }
            ErrorKind::Throttled { route, retry_in } => (
                Some(FailureClass::RateLimited),
                Some(*retry_in),
                Some(route.clone()),
            ),
            ErrorKind::CircuitOpen { route, retry_in } => (
                Some(FailureClass::Overloaded),
                Some(*retry_in),
                Some(route.clone()),
            ),
            ErrorKind::Transport | ErrorKind::StreamFailed { .. } => (e.class(), None, None),
            _ => (None, None, None),
        };
        let route = route.unwrap_or_else(|| self.route.clone());
        match class.and_then(|class| self.defer(class, hint, &route, None)) {
            Some(mut d) => {
                d.otherwise = Some(Otherwise::Error(e));
                Ending::Deferring(d)
            }
            None => Ending::Failed(self.fail(e, false)),
        }
    }

    /// The deferral of a request that failed with `class` on `route`, if its policy defers
    /// it: the record is made (and its write started), or, for a replay, left for its worker.
    fn defer(
        &mut self,
        class: FailureClass,
        hint: Option<Duration>,
        route: &RouteName,
        status: Option<u16>,
    ) -> Option<Box<Deferring>> {
        let cfg = self.shared.defer.clone()?;
        if !cfg.policy.classes.contains(&class) {
            return None;
        }
        let reason = DeferReason {
            class,
            route: route.as_str().to_owned(),
            status,
        };
        let (write, deferred) = match self.deferral.as_ref()? {
            Deferral::Parked(parked) => {
                let retry_in = cfg.retry_in(hint, 0);
                let owner = self.budget_owner.clone();
                let record = cfg.record(parked, self.route.as_str(), owner, reason, retry_in)?;
                let deferred = record.deferred(retry_in);
                (Some(cfg.sink.put(record)), deferred)
            }
            Deferral::Replay(replay) => {
                let deferrals = replay.record.deferrals.saturating_add(1);
                if deferrals >= cfg.policy.max_deferrals {
                    *replay.again.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(Again::Exhausted);
                    return None;
                }
                let retry_in = cfg.retry_in(hint, deferrals);
                let mut record = (*replay.record).clone();
                record.deferrals = deferrals;
                record.reason = reason;
                record.next_attempt_at_ms = now_ms().saturating_add(millis(retry_in));
                let deferred = record.deferred(retry_in);
                *replay.again.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(Again::Deferred(Box::new(record)));
                (None, deferred)
            }
        };
        Some(Box::new(Deferring {
            write,
            deferred,
            otherwise: None,
        }))
    }

    /// The end of a deferral: the caller is told, or — the sink refused the record — the
    /// request ends on the failure it had.
    fn deferred(
        &mut self,
        d: &mut Deferring,
        written: Result<(), BoxError>,
    ) -> Result<http::Response<Body>, Error> {
        let route = Some(self.route.clone());
        match (written, d.otherwise.take()) {
            (Ok(()), _) | (Err(_), None) => {
                let retry_in = d.deferred.retry_in;
                self.ctx
                    .log()
                    .event(route, LocalEventKind::Deferred { retry_in });
                Err(self.fail(Error::new(ErrorKind::Deferred(d.deferred.clone())), false))
            }
            (Err(e), Some(otherwise)) => {
                tracing::warn!(error = %e, "the deferred record could not be written; the request fails");
                self.ctx
                    .log()
                    .event(route, LocalEventKind::StoreUnavailable);
                match otherwise {
                    Otherwise::Error(e) => Err(self.fail(e, false)),
                    Otherwise::Response(answer) => Ok(self.close(answer.0, &answer.1)),
                }
            }
        }
    }

    fn classify<RB>(&self, response: http::Response<RB>) -> ClassifyResponse
    where
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let classifier = &self.shared.classifier;
        let mark = self.sent.as_ref().map_or(0, |s| s.mark);
        classifier.classify_attempt(response, self.ctx.log(), mark)
    }

    /// The answer's end: deferred when it is a transient failure the policy defers, else
    /// handed on.
    fn respond(
        &mut self,
        resp: http::Response<Body>,
        c: Classification,
        latency: Option<Duration>,
    ) -> Result<http::Response<Body>, Box<Deferring>> {
        if let Some(sent) = &self.sent {
            self.ctx.record(sent, &self.route, latency, &c, None);
        }
        self.observe_pacing(&resp);
        let status = resp.status();
        let failed = status.is_client_error() || status.is_server_error();
        if let (Some(class), true, true) = (c.class, failed, self.deferral.is_some()) {
            let served = resp.extensions().get::<RouteName>().cloned();
            let route = served.unwrap_or_else(|| self.route.clone());
            let hint = self.chain_hint(c.wait_hint.map(|h| h.wait));
            if let Some(mut d) = self.defer(class, hint, &route, Some(status.as_u16())) {
                d.otherwise = Some(Otherwise::Response(Box::new((resp, c))));
                return Err(d);
            }
        }
        Ok(self.close(resp, &c))
    }

    /// When the request could next be answered, after a chain of routes refused it: the
    /// chain hands back the primary's failure (and `hint`, its time), but a backup that said
    /// it is free sooner serves the replay sooner. The earliest of each route's last answer's
    /// `Retry-After` (counted from that answer); a route that named no time may be free any
    /// time, so then no time is known (`None`: the policy's delay). One route: `hint`.
    fn chain_hint(&self, hint: Option<Duration>) -> Option<Duration> {
        let log = self.ctx.log();
        let attempts = log.attempts();
        let mut last: Vec<&crate::attempt_log::Attempt> = Vec::new();
        for a in attempts.iter().rev() {
            if !last.iter().any(|l| l.route == a.route) {
                last.push(a);
            }
        }
        if last.len() < 2 {
            return hint;
        }
        let now = log.offset_of(Instant::now());
        let mut earliest: Option<Duration> = None;
        for a in last {
            let free_at = a
                .offset
                .saturating_add(a.latency)
                .saturating_add(a.retry_after?);
            let wait = free_at.saturating_sub(now);
            earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
        }
        earliest
    }

    fn observe_pacing(&self, resp: &http::Response<Body>) {
        if let Some(pacer) = self.shared.gate.as_ref().and_then(|g| g.pacer.as_ref()) {
            let served = resp.extensions().get::<RouteName>();
            pacer.observe(served.unwrap_or(&self.route), resp.headers());
        }
    }

    /// Hands the answer on: the log closed, the spend settled at the body's end.
    fn close(&mut self, resp: http::Response<Body>, c: &Classification) -> http::Response<Body> {
        let served = resp.extensions().get::<RouteName>().cloned();
        let status = resp.status();
        let success = c.is_success() && !(status.is_client_error() || status.is_server_error());
        let mut resp = self.ctx.close_response(self.owner, resp);
        let Some(ticket) = self.ticket.take() else {
            return self.ctx.end_response(self.owner, resp, false);
        };
        resp.extensions_mut().insert(SpendReceipt(ticket.clone()));
        let limit = self.shared.classifier.peek_limit();
        let (parts, body) = resp.into_parts();
        let body = SpendBody::new(body, ticket, &parts.headers, success, served, limit);
        let resp = http::Response::from_parts(parts, body);
        // The request ends when its spend has settled, at the body's end.
        self.ctx.end_response(self.owner, resp, true)
    }
}

/// What admission still has to decide, in order: the spend reservation, then the rate limit
/// (at once, or in line).
pub(crate) struct Admission {
    pub(crate) opening: Option<Opening>,
    pub(crate) ask: Option<Ask>,
    waiter: Option<Waiter>,
}

impl Admission {
    pub(crate) fn new(opening: Option<Opening>, ask: Option<Ask>) -> Self {
        Self {
            opening,
            ask,
            waiter: None,
        }
    }

    /// Drives admission: ready when the request may be sent, or with the error it ends with
    /// (already closed: its reservation settled and its log attached).
    pub(crate) fn poll_admit(
        &mut self,
        admitted: &mut Admitted,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Ending>> {
        if let Some(opening) = self.opening.as_mut() {
            let opened = ready!(opening.poll_open(cx));
            self.opening = None;
            match opened {
                // The first attempt is reserved; the inner layers reserve every further one
                // through the gate.
                Ok(ticket) => {
                    admitted.ctx.set_spend_gate(ticket.gate());
                    admitted.ticket = Some(ticket);
                }
                Err(e) => {
                    let event = match e.kind() {
                        ErrorKind::StoreUnavailable => LocalEventKind::StoreUnavailable,
                        _ => LocalEventKind::BudgetDenied,
                    };
                    admitted
                        .ctx
                        .log()
                        .event(Some(admitted.route.clone()), event);
                    return Poll::Ready(Err(Ending::Failed(admitted.fail(e, false))));
                }
            }
        }
        if let Some(ask) = self.ask.take() {
            let Some(gate) = admitted.shared.gate.clone() else {
                return Poll::Ready(Ok(()));
            };
            match gate.admit(ask) {
                Admit::Now => return Poll::Ready(Ok(())),
                Admit::Refused(refusal) => return Poll::Ready(Err(admitted.refuse(refusal))),
                Admit::Queued(waiter) => self.waiter = Some(waiter),
            }
        }
        let Some(waiter) = self.waiter.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let admitted_now = ready!(waiter.poll_admit(cx));
        let queued = waiter.joined().then(|| waiter.waited());
        if let Some((backup, retry_in)) = waiter.rerouted() {
            // The primary's bucket had no room and this backup's had: the fallback layer
            // sends the request there without calling the primary.
            let (backup, retry_in) = (backup.clone(), *retry_in);
            admitted
                .ctx
                .write(|v| v.rerouted = Some((backup, retry_in)));
        }
        self.waiter = None;
        if let Some(waited) = queued {
            let route = Some(admitted.route.clone());
            admitted
                .ctx
                .log()
                .event(route, LocalEventKind::Queued { waited });
        }
        Poll::Ready(match admitted_now {
            Ok(_) => Ok(()),
            Err(refusal) => Err(admitted.refuse(refusal)),
        })
    }
}

/// A request whose admission was not decided at once, with a clone of the inner service that
/// is polled ready once the request is admitted.
struct Held<S, B> {
    admission: Admission,
    admitted: bool,
    service: S,
    request: http::Request<B>,
}

pin_project! {
    /// Response future of [`Budget`](super::Budget).
    #[project = Proj]
    pub struct ResponseFuture<S, B>
    where
        S: Service<http::Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        held: Option<Held<S, B>>,
        // The request's deadline, made the first time the inner service keeps it waiting.
        #[pin]
        deadline: Option<Sleep>,
        admitted: Admitted,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Waiting,
        Calling { #[pin] fut: F },
        Classifying { fut: ClassifyResponse, latency: Option<Duration> },
        Deferring { deferring: Box<Deferring> },
        Failed { error: Option<Error> },
    }
}

impl<F> State<F> {
    fn ending(ending: Ending) -> Self {
        match ending {
            Ending::Failed(e) => State::Failed { error: Some(e) },
            Ending::Deferring(deferring) => State::Deferring { deferring },
        }
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<http::Request<B>>,
{
    fn with(admitted: Admitted, state: State<S::Future>, held: Option<Held<S, B>>) -> Self {
        Self {
            state,
            held,
            deadline: None,
            admitted,
        }
    }

    /// A request that ended before it was sent.
    pub(crate) fn ended(admitted: Admitted, ending: Ending) -> Self {
        Self::with(admitted, State::ending(ending), None)
    }

    /// A request whose admission goes on in the future, with the clone of the inner service
    /// that sends it once admitted.
    pub(crate) fn admitting(
        admitted: Admitted,
        admission: Admission,
        service: S,
        request: http::Request<B>,
    ) -> Self {
        let held = Held {
            admission,
            admitted: false,
            service,
            request,
        };
        Self::with(admitted, State::Waiting, Some(held))
    }

    pub(crate) fn calling(admitted: Admitted, fut: S::Future) -> Self {
        Self::with(admitted, State::Calling { fut }, None)
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Output = Result<http::Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let out = match this.state.as_mut().project() {
                StateProj::Waiting => {
                    ready!(this.poll_queue(cx));
                    continue;
                }
                StateProj::Calling { fut } => match fut.poll(cx) {
                    Poll::Ready(Ok(resp)) => {
                        let admitted = &*this.admitted;
                        let latency = admitted
                            .sent
                            .as_ref()
                            .and_then(|sent| admitted.ctx.head_latency(sent));
                        let fut = admitted.classify(resp);
                        this.state.set(State::Classifying { fut, latency });
                        continue;
                    }
                    Poll::Ready(Err(e)) => {
                        let ending = this.admitted.inner_error(e);
                        this.state.set(State::ending(ending));
                        continue;
                    }
                    Poll::Pending => return this.poll_deadline(cx),
                },
                StateProj::Classifying { fut, latency } => match Pin::new(fut).poll(cx) {
                    Poll::Ready((resp, c)) => match this.admitted.respond(resp, c, *latency) {
                        Ok(resp) => Ok(resp),
                        Err(deferring) => {
                            this.state.set(State::Deferring { deferring });
                            continue;
                        }
                    },
                    Poll::Pending => return this.poll_deadline(cx),
                },
                // The record's write has its own bound (the sink's); the deadline does not
                // cut it short.
                StateProj::Deferring { deferring } => {
                    let written = match deferring.write.as_mut() {
                        Some(write) => ready!(Pin::new(write).poll(cx)),
                        None => Ok(()),
                    };
                    this.admitted.deferred(deferring, written)
                }
                StateProj::Failed { error } => {
                    return match error.take() {
                        Some(e) => Poll::Ready(Err(e)),
                        None => panic!("budget ResponseFuture polled after completion"),
                    };
                }
            };
            this.state.set(State::Failed { error: None });
            return Poll::Ready(out);
        }
    }
}

impl<S, B> Proj<'_, S, B>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    /// Admission goes on: once admitted, the request is sent as soon as the inner service is
    /// ready (within the deadline), or it ends.
    fn poll_queue(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(held) = self.held.as_mut() else {
            panic!("budget ResponseFuture polled after completion");
        };
        if !held.admitted {
            if let Err(ending) = ready!(held.admission.poll_admit(self.admitted, cx)) {
                *self.held = None;
                self.state.set(State::ending(ending));
                return Poll::Ready(());
            }
            held.admitted = true;
        }
        let ending = match held.service.poll_ready(cx) {
            Poll::Ready(Ok(())) => None,
            Poll::Ready(Err(e)) => Some(self.admitted.inner_error(e)),
            Poll::Pending => {
                let e = ready!(self.poll_deadline_passed(cx, false));
                Some(Ending::Failed(e))
            }
        };
        let Some(Held {
            mut service,
            request,
            ..
        }) = self.held.take()
        else {
            return Poll::Ready(());
        };
        match ending {
            None => {
                self.admitted.sending(None);
                let fut = service.call(request);
                self.state.set(State::Calling { fut });
            }
            Some(ending) => self.state.set(State::ending(ending)),
        }
        Poll::Ready(())
    }

    /// Fails the request when its deadline passes while the inner service still works on it.
    fn poll_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, Error>> {
        let e = ready!(self.poll_deadline_passed(cx, true));
        // Dropping the inner future cancels the attempt in flight.
        self.state.set(State::Failed { error: None });
        Poll::Ready(Err(e))
    }

    /// The request's failure once its deadline passes; `in_flight` when it was sent.
    fn poll_deadline_passed(&mut self, cx: &mut Context<'_>, in_flight: bool) -> Poll<Error> {
        let Some(at) = self.admitted.deadline else {
            return Poll::Pending;
        };
        ready!(crate::timer::poll_lazy(self.deadline.as_mut(), at, cx));
        let route = Some(self.admitted.route.clone());
        self.admitted
            .ctx
            .log()
            .event(route, LocalEventKind::DeadlineExceeded);
        Poll::Ready(
            self.admitted
                .fail(Error::new(ErrorKind::DeadlineExceeded), in_flight),
        )
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<http::Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Waiting => "waiting",
            State::Calling { .. } => "calling",
            State::Classifying { .. } => "classifying",
            State::Deferring { .. } => "deferring",
            State::Failed { .. } => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("route", &self.admitted.route)
            .finish_non_exhaustive()
    }
}
