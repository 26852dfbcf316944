use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
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
use crate::classify::{Classification, ClassifyResponse};
use crate::context::{RequestContext, Sent};
use crate::error::{BoxError, Error, ErrorKind};
use crate::{Body, RouteName};

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

    fn refuse(&mut self, refusal: Refusal) -> Error {
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
                return self.fail(e, false);
            }
        };
        self.ctx.log().event(Some(self.route.clone()), event);
        self.fail(Error::new(kind), false)
    }

    fn inner_error(&mut self, e: impl Into<BoxError>) -> Error {
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
        self.fail(e, false)
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

    fn respond(
        &mut self,
        resp: http::Response<Body>,
        c: &Classification,
        latency: Option<Duration>,
    ) -> http::Response<Body> {
        if let Some(sent) = &self.sent {
            self.ctx.record(sent, &self.route, latency, c, None);
        }
        let served = resp.extensions().get::<RouteName>().cloned();
        if let Some(pacer) = self.shared.gate.as_ref().and_then(|g| g.pacer.as_ref()) {
            pacer.observe(served.as_ref().unwrap_or(&self.route), resp.headers());
        }
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
    ) -> Poll<Result<(), Error>> {
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
                    return Poll::Ready(Err(admitted.fail(e, false)));
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

/// A request whose admission was not decided at once, with the service that was polled ready
/// for it.
struct Held<S, B> {
    admission: Admission,
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
        Failed { error: Option<Error> },
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

    /// A request that ended before it was sent, with its `error` (already closed).
    pub(crate) fn ended(admitted: Admitted, error: Error) -> Self {
        Self::with(admitted, State::Failed { error: Some(error) }, None)
    }

    /// A request whose admission goes on in the future, with the service that was polled
    /// ready for it.
    pub(crate) fn admitting(
        admitted: Admitted,
        admission: Admission,
        service: S,
        request: http::Request<B>,
    ) -> Self {
        let held = Held {
            admission,
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
                StateProj::Waiting => match ready!(this.poll_queue(cx)) {
                    Some(out) => out,
                    None => continue,
                },
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
                    Poll::Ready(Err(e)) => Err(this.admitted.inner_error(e)),
                    Poll::Pending => return this.poll_deadline(cx),
                },
                StateProj::Classifying { fut, latency } => match Pin::new(fut).poll(cx) {
                    Poll::Ready((resp, c)) => Ok(this.admitted.respond(resp, &c, *latency)),
                    Poll::Pending => return this.poll_deadline(cx),
                },
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
{
    /// Admission goes on: the request is sent once admitted (`None`: go on calling), or ends.
    fn poll_queue(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http::Response<Body>, Error>>> {
        let Some(held) = self.held.as_mut() else {
            panic!("budget ResponseFuture polled after completion");
        };
        let admitted = ready!(held.admission.poll_admit(self.admitted, cx));
        let Some(Held {
            mut service,
            request,
            ..
        }) = self.held.take()
        else {
            return Poll::Ready(None);
        };
        match admitted {
            Ok(()) => {
                self.admitted.sending(None);
                let fut = service.call(request);
                self.state.set(State::Calling { fut });
                Poll::Ready(None)
            }
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    /// Fails the request when its deadline passes while the inner service still works on it.
    fn poll_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, Error>> {
        let Some(at) = self.admitted.deadline else {
            return Poll::Pending;
        };
        ready!(crate::timer::poll_lazy(self.deadline.as_mut(), at, cx));
        let route = Some(self.admitted.route.clone());
        self.admitted
            .ctx
            .log()
            .event(route, LocalEventKind::DeadlineExceeded);
        let e = self
            .admitted
            .fail(Error::new(ErrorKind::DeadlineExceeded), true);
        // Dropping the inner future cancels the attempt in flight.
        self.state.set(State::Failed { error: None });
        Poll::Ready(Err(e))
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
            State::Failed { .. } => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("route", &self.admitted.route)
            .finish_non_exhaustive()
    }
}
