use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body as _;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::layer::Shared;
use crate::attempt_log::{
    Attempt, AttemptLog, Decision, LocalEventKind, Outcome, StopReason, WaitSource,
};
use crate::backoff::{NextWait, ceil_millis, next_wait};
use crate::classify::{Classification, ClassifyResponse, FailureClass};
use crate::context::{AttemptCap, RouteName, SpendGate};
use crate::policy::{FallbackRule, ReplayRule, RetryRule};
use crate::replay::{ReplayBody, try_clone_request};
use crate::retry_budget::RetryBudget;
use crate::{Body, BoxError, Error, ErrorKind};

/// How much of a retried response's body is read (and dropped) so that its connection can be
/// reused; a longer body is dropped unread, closing that connection.
pub(super) const DRAIN_LIMIT: usize = 64 * 1024;

pin_project! {
    /// Response future of [`Retry`](super::Retry): runs the attempts of one logical request.
    ///
    /// A state machine: call the inner service, classify its answer, and either hand it up
    /// or wait (draining the retried response's body meanwhile), poll the inner service's
    /// readiness again and send the next copy of the request.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future, B>,
        // Fires at the deadline: bounds the time to a committed response, the attempt in
        // flight included, not only the waits between attempts. Made the first time the
        // inner service makes the request wait, so an answer that comes at once costs no timer.
        #[pin]
        deadline: Option<Sleep>,
        service: S,
        attempts: Attempts<B>,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateProjReplace]
    enum State<F, B> {
        // Waiting for the inner service to be ready for the next attempt, with its request.
        Ready {
            request: Request<B>,
        },
        // An attempt is in flight.
        Calling {
            #[pin]
            future: F,
        },
        // The response head is in; its classification may read a bounded body prefix.
        Classifying {
            future: ClassifyResponse,
        },
        // Waiting before the next attempt; the retried response's body drains meanwhile.
        Sleeping {
            #[pin]
            sleep: Sleep,
            drain: Option<Body>,
            drained: usize,
            next: Request<B>,
        },
        Done,
    }
}

/// The bookkeeping of one logical request across its attempts.
pub(super) struct Attempts<B> {
    shared: Arc<Shared>,
    // The request every retry copies; `None` when its body cannot be replayed.
    template: Option<Request<B>>,
    log: AttemptLog,
    owns_log: bool,
    route: RouteName,
    budget: RetryBudget,
    // The spend cap's gate, when a `BudgetLayer` with a spend cap is outside.
    spend: Option<SpendGate>,
    // The gate admitted the next (or current) attempt and it has made no call yet.
    admitted: bool,
    // The retry budget paid for the next attempt and it has made no call yet.
    withdrawn: bool,
    deadline: Instant,
    idempotent: bool,
    fallback_available: bool,
    // Attempts sent so far.
    sent: u32,
    // Retries each class has caused (for `Once` rules), indexed like `FailureClass::ALL`.
    retried: [u32; FailureClass::ALL.len()],
    previous_wait: Option<Duration>,
    // Attempt count of the log when the current attempt was sent (the recording rule).
    mark: usize,
    sent_at: Instant,
    latency: Duration,
}

impl<B> Attempts<B> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        shared: Arc<Shared>,
        template: Option<Request<B>>,
        log: AttemptLog,
        owns_log: bool,
        route: RouteName,
        budget: RetryBudget,
        deadline: Instant,
        idempotent: bool,
        fallback_available: bool,
    ) -> Self {
        let spend = template
            .as_ref()
            .and_then(|t| t.extensions().get::<SpendGate>())
            .cloned();
        Self {
            shared,
            template,
            log,
            owns_log,
            route,
            budget,
            spend,
            admitted: false,
            withdrawn: false,
            deadline,
            idempotent,
            fallback_available,
            sent: 0,
            retried: [0; FailureClass::ALL.len()],
            previous_wait: None,
            mark: 0,
            sent_at: Instant::now(),
            latency: Duration::ZERO,
        }
    }

    /// Notes what the recording rule and the timings need, just before a call.
    fn sending(&mut self, req: &mut Request<B>) {
        if let Some(name) = &self.shared.attempt_header {
            req.headers_mut()
                .insert(name.clone(), HeaderValue::from(self.sent));
        }
        self.mark = self.log.attempt_count();
        self.sent_at = Instant::now();
        self.sent += 1;
    }

    /// Records the attempt unless a layer nearer the transport did; returns its index.
    fn record(&self, c: &Classification, error: Option<&Error>) -> usize {
        self.log.record_since(self.mark, || {
            let mut a = Attempt::new(
                Some(self.route.clone()),
                self.log.offset_of(self.sent_at),
                self.latency,
                c,
            );
            if !self.shared.logging.request_ids {
                a.request_id = None;
            }
            // The kind and class only: a transport error's own message may carry the URL,
            // and with it a key in the query string.
            a.error = error.map(|e| e.to_string());
            a
        })
    }
}

impl<B: ReplayBody> Attempts<B> {
    /// Decides what follows attempt `idx` that ended as `c`: the wait and the request of the
    /// next attempt when a retry was granted, `None` when the answer goes up as it is.
    fn decide(&mut self, idx: usize, c: &Classification) -> Option<(Duration, Request<B>)> {
        let Some(class) = c.class else {
            self.log.decide(idx, Decision::Accept);
            return None;
        };
        match self.plan(class, c) {
            Ok((wait, source, next)) => {
                self.previous_wait = Some(wait);
                if let Some(n) = class_index(class) {
                    self.retried[n] += 1;
                }
                self.log.decide(idx, Decision::Retry { wait, source });
                Some((wait, next))
            }
            Err(reason) => {
                self.log.decide(idx, Decision::Stop(reason));
                None
            }
        }
    }

    fn plan(
        &mut self,
        class: FailureClass,
        c: &Classification,
    ) -> Result<(Duration, WaitSource, Request<B>), StopReason> {
        let shared = &*self.shared;
        // `x-should-retry` overrides the class's rule both ways.
        let rule = match c.should_retry {
            Some(false) => return Err(StopReason::ServerSaidNo),
            Some(true) => RetryRule::Yes,
            None => shared.actions.get(class).retry,
        };
        let limit = match rule {
            RetryRule::Never => return Err(StopReason::NotRetryable),
            RetryRule::Yes => u32::MAX,
            RetryRule::Once => 1,
            // The backup is the better bet than a second wait on a silent route.
            RetryRule::OnceUnlessFallback
                if self.fallback_available
                    && shared.actions.get(class).fallback != FallbackRule::Never =>
            {
                return Err(StopReason::NotRetryable);
            }
            RetryRule::OnceUnlessFallback => 1,
        };
        if self.sent >= shared.retry.max_attempts {
            return Err(StopReason::AttemptsExhausted);
        }
        if class_index(class).is_some_and(|n| self.retried[n] >= limit) {
            return Err(StopReason::AttemptsExhausted);
        }
        if class.possibly_accepted() {
            let allowed = match shared.idempotency.replay_possibly_accepted {
                ReplayRule::Never => false,
                ReplayRule::IfIdempotent => self.idempotent,
                ReplayRule::Always => true,
            };
            if !allowed {
                return Err(StopReason::NotIdempotent);
            }
        }
        // The fallback chain's cap on attempts across all routes binds retries too.
        let cap = self
            .template
            .as_ref()
            .and_then(|t| t.extensions().get::<AttemptCap>());
        if cap.is_some_and(|c| !c.allows(self.log.attempt_count())) {
            return Err(StopReason::ChainLimit);
        }
        let next = self
            .template
            .as_ref()
            .and_then(try_clone_request)
            .ok_or(StopReason::NotReplayable)?;
        let (wait, source) = match next_wait(
            shared.retry.backoff_for(class),
            self.sent.saturating_sub(1),
            self.previous_wait,
            c.wait_hint.map(|h| h.wait),
            shared.retry.max_server_wait,
            &shared.jitter,
        ) {
            // Tokio's timers tick in whole milliseconds: round up, so that the logged wait is
            // the wait that happens and a server's floor is never undercut.
            NextWait::Wait { wait, source } => (ceil_millis(wait), source),
            NextWait::AboveCap { .. } => return Err(StopReason::ServerWaitAboveCap),
        };
        // An attempt that would start at or after the deadline could not answer in time.
        let deadline_hit = Instant::now()
            .checked_add(wait)
            .is_none_or(|at| at >= self.deadline);
        if deadline_hit {
            return Err(StopReason::DeadlineExceeded);
        }
        // Reserve the retry's spend after every other check, and withdraw from the retry budget
        // last: a retry refused for any reason costs neither.
        if let Some(gate) = &self.spend {
            if gate.admit(&self.route).is_err() {
                self.log
                    .event(Some(self.route.clone()), LocalEventKind::BudgetDenied);
                return Err(StopReason::SpendCapReached);
            }
        }
        if !self.budget.withdraw() {
            if let Some(gate) = &self.spend {
                gate.release(&self.route);
            }
            self.log
                .event(Some(self.route.clone()), LocalEventKind::RetryBudgetDenied);
            return Err(StopReason::RetryBudgetDenied);
        }
        self.admitted = self.spend.is_some();
        self.withdrawn = true;
        Ok((wait, source, next))
    }
}

impl<B> Attempts<B> {
    /// The retry's call was made (`true`) or the retry ended without one (`false`: readiness
    /// failed, a layer inside rejected it locally, or the request was dropped while waiting):
    /// only then are its spend reservation and its retry budget given back.
    fn called(&mut self, made: bool) {
        let admitted = std::mem::take(&mut self.admitted);
        let withdrawn = std::mem::take(&mut self.withdrawn);
        if made {
            return;
        }
        if admitted {
            if let Some(gate) = &self.spend {
                gate.release(&self.route);
            }
        }
        if withdrawn {
            self.budget.refund();
        }
    }

    fn finish_response(&self, mut response: Response<Body>) -> Response<Body> {
        if self.owns_log {
            let c = response.extensions().get::<Classification>();
            let status = response.status().as_u16();
            self.log.set_outcome(match c.and_then(|c| c.class) {
                None => Outcome::Success { status },
                class => Outcome::ProviderFailure { status, class },
            });
            self.log.set_selected_route(self.route.clone());
            response.extensions_mut().insert(self.log.clone());
        }
        response
    }

    /// The deadline passed before a response could be handed up. An attempt in flight is
    /// recorded as a timeout (unless a layer nearer the transport recorded it) and stopped.
    fn deadline_passed(&mut self, in_flight: bool) -> Error {
        self.called(in_flight);
        let e = Error::new(ErrorKind::DeadlineExceeded);
        if in_flight {
            self.latency = self.sent_at.elapsed();
            let idx = self.record(&Classification::failure(FailureClass::Timeout), Some(&e));
            self.log
                .decide(idx, Decision::Stop(StopReason::DeadlineExceeded));
        } else {
            self.log
                .event(Some(self.route.clone()), LocalEventKind::DeadlineExceeded);
        }
        self.finish_error(e)
    }

    fn finish_error(&self, error: Error) -> Error {
        if self.owns_log {
            self.log.set_outcome(Outcome::Error {
                error: error.kind().to_string(),
                class: error.class(),
            });
        }
        error.with_log(&self.log)
    }
}

impl<B> Drop for Attempts<B> {
    fn drop(&mut self) {
        // Dropped between a granted retry and its call (during the wait, say).
        self.called(false);
    }
}

fn class_index(class: FailureClass) -> Option<usize> {
    FailureClass::ALL.iter().position(|c| *c == class)
}

/// Errors from a local decision inside (no transport call was made): nothing to record as an
/// attempt, nothing to retry.
fn is_local_rejection(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::CircuitOpen { .. }
            | ErrorKind::Throttled { .. }
            | ErrorKind::BudgetExhausted { .. }
            | ErrorKind::RateLimited { .. }
    )
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(super) fn new(mut service: S, mut attempts: Attempts<B>, mut first: Request<B>) -> Self {
        attempts.sending(&mut first);
        // `poll_ready` of the caller readied this service: the first attempt goes out now.
        let future = service.call(first);
        Self {
            state: State::Calling { future },
            deadline: None,
            service,
            attempts,
        }
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
        let attempts = this.attempts;
        loop {
            match this.state.as_mut().project() {
                StateProj::Ready { .. } => {
                    let ready = match this.service.poll_ready(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => {
                            ready!(poll_deadline(this.deadline.as_mut(), attempts.deadline, cx));
                            this.state.set(State::Done);
                            return Poll::Ready(Err(attempts.deadline_passed(false)));
                        }
                    };
                    if let Err(e) = ready {
                        attempts.called(false);
                        let e = attempts.shared.classifier.error(e);
                        this.state.set(State::Done);
                        return Poll::Ready(Err(attempts.finish_error(e)));
                    }
                    // The request travels in the state, so only `Ready` can hand it over.
                    if let StateProjReplace::Ready { mut request } =
                        this.state.as_mut().project_replace(State::Done)
                    {
                        attempts.sending(&mut request);
                        let future = this.service.call(request);
                        this.state.set(State::Calling { future });
                    }
                }
                StateProj::Calling { future } => {
                    let result = match future.poll(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => {
                            ready!(poll_deadline(this.deadline.as_mut(), attempts.deadline, cx));
                            // Dropping the attempt's future cancels it.
                            this.state.set(State::Done);
                            return Poll::Ready(Err(attempts.deadline_passed(true)));
                        }
                    };
                    attempts.latency = attempts.sent_at.elapsed();
                    match result {
                        Ok(response) => {
                            attempts.called(true);
                            let future = attempts.shared.classifier.classify_response(response);
                            this.state.set(State::Classifying { future });
                        }
                        Err(e) => {
                            let e = attempts.shared.classifier.error(e);
                            let local = is_local_rejection(&e);
                            attempts.called(!local);
                            if local {
                                this.state.set(State::Done);
                                return Poll::Ready(Err(attempts.finish_error(e)));
                            }
                            let mut c = e.classification().cloned().unwrap_or_default();
                            if c.class.is_none() {
                                c.class = e.class();
                            }
                            let idx = attempts.record(&c, Some(&e));
                            let decision = match c.class {
                                Some(_) => attempts.decide(idx, &c),
                                // A crate error of no failure class the ladder knows
                                // (a deadline from inside, say): nothing to retry.
                                None => {
                                    let stop = Decision::Stop(StopReason::NotRetryable);
                                    attempts.log.decide(idx, stop);
                                    None
                                }
                            };
                            match decision {
                                Some((wait, next)) => this.state.set(State::Sleeping {
                                    sleep: tokio::time::sleep(wait),
                                    drain: None,
                                    drained: 0,
                                    next,
                                }),
                                None => {
                                    this.state.set(State::Done);
                                    return Poll::Ready(Err(attempts.finish_error(e)));
                                }
                            }
                        }
                    }
                }
                StateProj::Classifying { future } => {
                    let (response, c) = match Pin::new(future).poll(cx) {
                        Poll::Ready(r) => r,
                        // The head came, but its error body is still arriving.
                        Poll::Pending => {
                            ready!(poll_deadline(this.deadline.as_mut(), attempts.deadline, cx));
                            this.state.set(State::Done);
                            return Poll::Ready(Err(attempts.deadline_passed(true)));
                        }
                    };
                    let idx = attempts.record(&c, None);
                    // This answer opened the route's circuit: with a backup route, a retry would
                    // only wait to be turned away, so the fallback takes over at once.
                    let decision = if attempts.fallback_available
                        && crate::circuit_breaker::opened_circuit(&response)
                    {
                        let stop = Decision::Stop(StopReason::CircuitOpen);
                        attempts.log.decide(idx, stop);
                        None
                    } else {
                        attempts.decide(idx, &c)
                    };
                    match decision {
                        Some((wait, next)) => this.state.set(State::Sleeping {
                            sleep: tokio::time::sleep(wait),
                            drain: Some(response.into_body()),
                            drained: 0,
                            next,
                        }),
                        None => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(attempts.finish_response(response)));
                        }
                    }
                }
                StateProj::Sleeping {
                    sleep,
                    drain,
                    drained,
                    ..
                } => {
                    drain_some(drain, drained, cx);
                    ready!(sleep.poll(cx));
                    // Whatever did not arrive during the wait is dropped with its connection.
                    if let StateProjReplace::Sleeping { next, .. } =
                        this.state.as_mut().project_replace(State::Done)
                    {
                        this.state.set(State::Ready { request: next });
                    }
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// Polls the deadline's timer, making it on first use.
fn poll_deadline(
    mut timer: Pin<&mut Option<Sleep>>,
    at: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if timer.is_none() {
        timer.set(Some(tokio::time::sleep_until(at)));
    }
    match timer.as_pin_mut() {
        Some(sleep) => sleep.poll(cx),
        None => Poll::Pending,
    }
}

/// Reads what is already there of a retried response's body, up to [`DRAIN_LIMIT`], without
/// waiting: a fully read body lets the client reuse its connection.
fn drain_some(drain: &mut Option<Body>, drained: &mut usize, cx: &mut Context<'_>) {
    while let Some(body) = drain.as_mut() {
        if *drained >= DRAIN_LIMIT || body.is_end_stream() {
            *drain = None;
            return;
        }
        match Pin::new(body).poll_frame(cx) {
            Poll::Pending => return,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *drained += data.len();
                }
            }
            Poll::Ready(Some(Err(_)) | None) => *drain = None,
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Ready { .. } => "ready",
            State::Calling { .. } => "calling",
            State::Classifying { .. } => "classifying",
            State::Sleeping { .. } => "sleeping",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts_sent", &self.attempts.sent)
            .finish_non_exhaustive()
    }
}
