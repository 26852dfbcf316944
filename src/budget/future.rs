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
use super::rate_limit::{Refusal, Waiter};
use super::spend::{End, SpendReceipt, Ticket};
use crate::Body;
use crate::attempt_log::{Attempt, AttemptLog, LocalEventKind, Outcome};
use crate::classify::{Classification, ClassifyResponse, FailureClass};
use crate::context::RouteName;
use crate::error::{BoxError, Error, ErrorKind};

/// What one request carries through its future.
pub(crate) struct Ctx {
    shared: Arc<Shared>,
    pub(crate) log: AttemptLog,
    created: bool,
    route: RouteName,
    deadline: Option<Instant>,
    pub(crate) ticket: Option<Arc<Ticket>>,
    mark: usize,
    sent: Option<Instant>,
}

impl Ctx {
    pub(crate) fn new(
        shared: Arc<Shared>,
        log: AttemptLog,
        created: bool,
        route: RouteName,
        deadline: Option<Instant>,
    ) -> Self {
        Self {
            shared,
            log,
            created,
            route,
            deadline,
            ticket: None,
            mark: 0,
            sent: None,
        }
    }

    /// The request goes to the inner service now.
    pub(crate) fn sending(&mut self) {
        self.mark = self.log.attempt_count();
        self.sent = Some(Instant::now());
        if let Some(t) = &self.ticket {
            t.mark_called();
        }
    }

    fn fail(&mut self, e: Error, in_flight: bool) -> Error {
        if let Some(t) = self.ticket.take() {
            t.settle(End::Error { in_flight });
        }
        if self.created {
            self.log.set_outcome(Outcome::Error {
                error: e.kind().to_string(),
                class: e.class(),
            });
        }
        e.with_log(&self.log)
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
        };
        self.log.event(Some(self.route.clone()), event);
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
        if let (true, Some(sent)) = (was_call, self.sent) {
            let c = e.classification().cloned().unwrap_or_else(|| {
                Classification::failure(e.class().unwrap_or(FailureClass::Transport))
            });
            let (offset, latency) = (self.log.offset_of(sent), sent.elapsed());
            let route = self.route.clone();
            let description = e.to_string();
            self.log.record_since(self.mark, || {
                let mut a = Attempt::new(Some(route), offset, latency, &c);
                a.error = Some(description);
                a
            });
        }
        self.fail(e, false)
    }

    fn respond(
        &mut self,
        mut resp: http::Response<Body>,
        c: &Classification,
    ) -> http::Response<Body> {
        if let Some(sent) = self.sent {
            let (offset, latency) = (self.log.offset_of(sent), sent.elapsed());
            let route = self.route.clone();
            self.log
                .record_since(self.mark, || Attempt::new(Some(route), offset, latency, c));
        }
        let served = resp.extensions().get::<RouteName>().cloned();
        if let Some(pacer) = self.shared.gate.as_ref().and_then(|g| g.pacer.as_ref()) {
            pacer.observe(served.as_ref().unwrap_or(&self.route), resp.headers());
        }
        let status = resp.status();
        let success = c.is_success() && !(status.is_client_error() || status.is_server_error());
        if self.created {
            self.log.set_outcome(if success {
                Outcome::Success {
                    status: status.as_u16(),
                }
            } else {
                Outcome::ProviderFailure {
                    status: status.as_u16(),
                    class: c.class,
                }
            });
        }
        if self.created || resp.extensions().get::<AttemptLog>().is_none() {
            resp.extensions_mut().insert(self.log.clone());
        }
        let Some(ticket) = self.ticket.take() else {
            return resp;
        };
        resp.extensions_mut().insert(SpendReceipt(ticket.clone()));
        let limit = self.shared.classifier.peek_limit();
        let (parts, body) = resp.into_parts();
        let body = SpendBody::new(body, ticket, &parts.headers, success, served, limit);
        http::Response::from_parts(parts, Body::new(body))
    }
}

/// A request waiting in line, with the service that was polled ready for it.
struct Queued<S, B> {
    waiter: Waiter,
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
        queued: Option<Queued<S, B>>,
        deadline: Option<Pin<Box<Sleep>>>,
        ctx: Ctx,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Waiting,
        Calling { #[pin] fut: F },
        Classifying { fut: ClassifyResponse },
        Failed { error: Option<Error> },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<http::Request<B>>,
{
    pub(crate) fn failed(mut ctx: Ctx, e: Error, in_flight: bool) -> Self {
        let error = ctx.fail(e, in_flight);
        Self {
            state: State::Failed { error: Some(error) },
            queued: None,
            deadline: None,
            ctx,
        }
    }

    pub(crate) fn refused(mut ctx: Ctx, refusal: Refusal, waited: Option<Duration>) -> Self {
        if let Some(waited) = waited {
            ctx.log
                .event(Some(ctx.route.clone()), LocalEventKind::Queued { waited });
        }
        let error = ctx.refuse(refusal);
        Self {
            state: State::Failed { error: Some(error) },
            queued: None,
            deadline: None,
            ctx,
        }
    }

    pub(crate) fn queued(ctx: Ctx, waiter: Waiter, service: S, request: http::Request<B>) -> Self {
        Self {
            state: State::Waiting,
            queued: Some(Queued {
                waiter,
                service,
                request,
            }),
            deadline: None,
            ctx,
        }
    }

    pub(crate) fn calling(ctx: Ctx, fut: S::Future) -> Self {
        Self {
            state: State::Calling { fut },
            queued: None,
            deadline: ctx.deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            ctx,
        }
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
            match this.state.as_mut().project() {
                StateProj::Waiting => {
                    let Some(q) = this.queued.as_mut() else {
                        panic!("budget ResponseFuture polled after completion");
                    };
                    let admitted = ready!(q.waiter.poll_admit(cx));
                    let waited = q.waiter.waited();
                    let Some(Queued {
                        mut service,
                        request,
                        ..
                    }) = this.queued.take()
                    else {
                        continue;
                    };
                    match admitted {
                        Ok(waited) => {
                            this.ctx.log.event(
                                Some(this.ctx.route.clone()),
                                LocalEventKind::Queued { waited },
                            );
                            this.ctx.sending();
                            let fut = service.call(request);
                            *this.deadline = this
                                .ctx
                                .deadline
                                .map(|d| Box::pin(tokio::time::sleep_until(d)));
                            this.state.set(State::Calling { fut });
                        }
                        Err(refusal) => {
                            this.ctx.log.event(
                                Some(this.ctx.route.clone()),
                                LocalEventKind::Queued { waited },
                            );
                            let e = this.ctx.refuse(refusal);
                            this.state.set(State::Failed { error: None });
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                StateProj::Calling { fut } => match fut.poll(cx) {
                    Poll::Ready(Ok(resp)) => {
                        let fut = this.ctx.shared.classifier.classify_response(resp);
                        this.state.set(State::Classifying { fut });
                    }
                    Poll::Ready(Err(e)) => {
                        let e = this.ctx.inner_error(e);
                        this.state.set(State::Failed { error: None });
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => return this.poll_deadline(cx),
                },
                StateProj::Classifying { fut } => match Pin::new(fut).poll(cx) {
                    Poll::Ready((resp, c)) => {
                        let resp = this.ctx.respond(resp, &c);
                        this.state.set(State::Failed { error: None });
                        return Poll::Ready(Ok(resp));
                    }
                    Poll::Pending => return this.poll_deadline(cx),
                },
                StateProj::Failed { error } => {
                    return match error.take() {
                        Some(e) => Poll::Ready(Err(e)),
                        None => panic!("budget ResponseFuture polled after completion"),
                    };
                }
            }
        }
    }
}

impl<S, B> Proj<'_, S, B>
where
    S: Service<http::Request<B>>,
{
    /// Fails the request when its deadline passes while the inner service still works on it.
    fn poll_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, Error>> {
        let Some(sleep) = self.deadline.as_mut() else {
            return Poll::Pending;
        };
        ready!(sleep.as_mut().poll(cx));
        self.ctx.log.event(
            Some(self.ctx.route.clone()),
            LocalEventKind::DeadlineExceeded,
        );
        let e = self.ctx.fail(Error::new(ErrorKind::DeadlineExceeded), true);
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
            .field("route", &self.ctx.route)
            .finish_non_exhaustive()
    }
}
