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
use crate::attempt_log::{Decision, LocalEventKind, StopReason, WaitSource};
use crate::backoff::{NextWait, next_wait};
use crate::classify::{Classification, ClassifyResponse, FailureClass};
use crate::context::{RequestContext, Sent, SpendDenied, SpendGate};
use crate::duration::ceil_millis;
use crate::policy::{FallbackRule, ReplayRule, RetryRule};
use crate::replay::{ReplayBody, Template};
use crate::retry_budget::RetryBudget;
use crate::store::StoreFuture;
use crate::{Body, BoxError, Error, ErrorKind, RouteName};

/// How much of a retried response's body is read (and dropped) so that its connection can be
/// reused; a longer body is dropped unread, closing that connection.
pub(super) const DRAIN_LIMIT: usize = 64 * 1024;

pin_project! {
    /// Response future of [`Retry`](super::Retry): runs the attempts of one logical request.
    ///
    /// A state machine: call the inner service, classify its answer, and either hand it up
    /// or wait (draining the retried response's body meanwhile), poll the inner service's
    /// readiness again and send the next copy of the request.
    #[project = Proj]
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
        // Waiting for the spend cap to reserve the retry; the retried answer's body is kept so
        // that it can still be handed up if the retry is refused.
        Claiming {
            admit: StoreFuture<Result<(), SpendDenied>>,
            retry: Planned<B>,
            answer: Result<Response<Body>, Error>,
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

/// What the request brings to its retries, fixed when the retry layer first sees it.
pub(super) struct Facts {
    /// The earliest of `retry.max_elapsed` from the first attempt and the request's deadline.
    pub(super) deadline: Instant,
    /// An idempotent method, or an idempotency key: a possibly-accepted attempt may replay.
    pub(super) idempotent: bool,
    /// The fallback chain has another route after this one.
    pub(super) fallback_available: bool,
}

/// The bookkeeping of one logical request across its attempts.
pub(super) struct Attempts<B> {
    pub(super) shared: Arc<Shared>,
    pub(super) ctx: RequestContext,
    /// Whether this layer owns the log.
    pub(super) owner: bool,
    pub(super) route: RouteName,
    /// The request every retry copies; `None` when no retry can be made of it.
    pub(super) template: Option<Template<B>>,
    pub(super) facts: Facts,
    pub(super) budget: RetryBudget,
    /// The spend cap's gate, when a `BudgetLayer` with a spend cap is outside.
    pub(super) spend: Option<SpendGate>,
    /// What the next retry was granted and has not used yet (it has made no call).
    pub(super) granted: Granted,
    /// The attempt in flight (or the last one).
    pub(super) sent: Sent,
    /// Attempts sent so far.
    pub(super) count: u32,
    /// Retries each class has caused (for `Once` rules), indexed like `FailureClass::ALL`.
    pub(super) retried: [u32; FailureClass::ALL.len()],
    pub(super) previous_wait: Option<Duration>,
    /// Time to the head of the attempt in flight, when this layer must record it itself.
    pub(super) latency: Option<Duration>,
    /// The request is waiting out a young outage of its route (see `ThrottlePolicy::hold`).
    pub(super) waiting_out: bool,
    /// An attempt's call is in flight: the provider may have it, so a retry dropped now
    /// keeps what it was granted, as one that met the deadline in flight does.
    pub(super) in_call: bool,
}

/// A retry's claims that are given back if it makes no call.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Granted {
    /// The spend gate admitted it.
    spend: bool,
    /// The retry budget paid for it.
    budget: bool,
}

impl<B> Attempts<B> {
    /// Notes what the recording rule and the timings need, just before a call; `resend` for a
    /// retry (a new attempt of this layer's), not for the first call it passes on.
    fn sending(&mut self, req: &mut Request<B>, resend: bool) {
        if let Some(name) = &self.shared.attempt_header {
            req.headers_mut()
                .insert(name.clone(), HeaderValue::from(self.count));
        }
        self.sent = if resend {
            // A hedge of the same request may have named its own route since the first call:
            // the layers below take this attempt's from the context.
            self.ctx.set_route(self.route.clone());
            self.ctx.resend()
        } else {
            self.ctx.send()
        };
        self.count += 1;
        self.in_call = true;
    }

    /// Records the attempt unless a layer nearer the transport did; returns its index.
    fn record(&self, c: &Classification, error: Option<&Error>) -> usize {
        self.ctx.record(
            &self.sent,
            &self.route,
            self.latency,
            c,
            error.map(|e| e.to_string()),
        )
    }

    /// The retry's call was made (`true`) or the retry ended without one (`false`: readiness
    /// failed, a layer inside rejected it locally, or the request was dropped while waiting):
    /// only then are its spend reservation and its retry budget given back.
    fn called(&mut self, made: bool) {
        let granted = std::mem::take(&mut self.granted);
        if made {
            return;
        }
        if granted.spend {
            if let Some(gate) = &self.spend {
                gate.release(&self.route);
            }
        }
        if granted.budget {
            self.budget.refund();
        }
    }

    fn finish_response(&self, response: Response<Body>) -> Response<Body> {
        if self.owner {
            self.ctx.log().set_selected_route(self.route.clone());
        }
        self.ctx.close_response(self.owner, response)
    }

    fn finish_error(&self, error: Error) -> Error {
        self.ctx.close_error(self.owner, error)
    }

    /// The deadline passed before a response could be handed up. An attempt in flight is
    /// recorded (unless a layer nearer the transport recorded it) and stopped: as what its
    /// answer's head said when one had come (`answered`), else as a timeout.
    fn deadline_passed(&mut self, in_flight: bool, answered: Option<Classification>) -> Error {
        self.called(in_flight);
        let e = Error::new(ErrorKind::DeadlineExceeded);
        if in_flight {
            self.latency = Some(self.sent.at.elapsed());
            let c = answered.unwrap_or_else(|| Classification::failure(FailureClass::Timeout));
            let idx = self.record(&c, Some(&e));
            self.ctx
                .log()
                .decide(idx, Decision::Stop(StopReason::DeadlineExceeded));
        } else {
            self.ctx
                .log()
                .event(Some(self.route.clone()), LocalEventKind::DeadlineExceeded);
        }
        self.finish_error(e)
    }
}

/// A retry that passed every check but the shared budgets.
pub(super) struct Planned<B> {
    idx: usize,
    class: FailureClass,
    wait: Duration,
    source: WaitSource,
    next: Request<B>,
}

/// What follows an attempt.
enum Decided<B> {
    /// The answer goes up as it is.
    Done,
    /// A retry after `.0`, with its request.
    Retry(Duration, Request<B>),
    /// A retry, once the spend cap has reserved it.
    Claim(StoreFuture<Result<(), SpendDenied>>, Planned<B>),
}

impl<B: ReplayBody> Attempts<B> {
    /// The copy of the request that waits out a young outage for `wait`, if it can: there is
    /// a copy to send and the wait ends before the deadline. The call waited for is not one of
    /// the request's attempts: a call turned away made none, and one the route refused while
    /// the request waited was the throttle's to send, bounded by its floor.
    fn wait_out(&mut self, wait: Duration) -> Option<(Duration, Request<B>)> {
        // Rounded up to the timer's millisecond, as every wait: the deadline check is then of
        // the wait that happens.
        let wait = ceil_millis(wait);
        if !self.ends_before_deadline(wait) {
            return None;
        }
        let next = self.template.as_ref().and_then(Template::attempt)?;
        self.waiting_out = true;
        self.count = self.count.saturating_sub(1);
        Some((wait, next))
    }

    /// Attempt `idx`, made while the request waited out a young outage, was refused again
    /// (`c`): back to waiting, if the request can wait and the failure may be retried at all —
    /// its class's rule (with its `Once` limit) and the server allow a retry, and the
    /// idempotency rule a replay. A server that names a longer wait than the throttle's is
    /// heeded: the request waits that long (and stops waiting when the server's wait is above
    /// `max_server_wait`, for the ladder to decide). Under a spend cap the next call is a retry like
    /// any other (the cap reserves it, and it counts against `max_attempts`), so that its spend
    /// is reserved the one way the cap knows.
    fn wait_out_again(
        &mut self,
        idx: usize,
        wait: Duration,
        c: &Classification,
    ) -> Option<(Duration, Request<B>)> {
        if !self.waiting_out || self.spend.is_some() {
            return None;
        }
        let class = c.class?;
        let limit = self.rule_limit(class, c).ok()?;
        let n = class_index(class)?;
        if self.retried[n] >= limit || self.check_replay(class).is_err() {
            return None;
        }
        // The server's wait is a floor here as for any retry, and one above the policy's cap
        // ends the wait.
        let (wait, source) = match c.wait_hint.map(|hint| hint.wait) {
            Some(hint) if hint > self.shared.retry.max_server_wait => return None,
            Some(hint) if hint > wait => (hint, WaitSource::Server),
            _ => (wait, WaitSource::Throttle),
        };
        let (wait, next) = self.wait_out(wait)?;
        self.retried[n] = self.retried[n].saturating_add(1);
        self.ctx.log().decide(idx, Decision::Retry { wait, source });
        Some((wait, next))
    }

    /// Decides what follows attempt `idx` that ended as `c`.
    fn decide(&mut self, idx: usize, c: &Classification) -> Decided<B> {
        let Some(class) = c.class else {
            self.ctx.log().decide(idx, Decision::Accept);
            return Decided::Done;
        };
        let planned = match self.plan(class, c) {
            Ok((wait, source, next)) => Planned {
                idx,
                class,
                wait,
                source,
                next,
            },
            Err(reason) => {
                self.ctx.log().decide(idx, Decision::Stop(reason));
                return Decided::Done;
            }
        };
        // Reserve the retry's spend after every other check, and withdraw from the retry budget
        // last: a retry refused for any reason costs neither.
        match &self.spend {
            Some(gate) => {
                let mut admit = gate.admit(&self.route);
                match admit.now() {
                    Some(granted) => self.claimed(granted, planned),
                    None => Decided::Claim(admit, planned),
                }
            }
            None => self.claimed(Ok(()), planned),
        }
    }

    /// The checks before a retry, in a fixed order: the class's rule, the replay rules, a copy
    /// of the request, the wait.
    fn plan(
        &mut self,
        class: FailureClass,
        c: &Classification,
    ) -> Result<(Duration, WaitSource, Request<B>), StopReason> {
        self.check_rule(class, c)?;
        self.check_replay(class)?;
        let next = self
            .template
            .as_ref()
            .and_then(Template::attempt)
            .ok_or(StopReason::NotReplayable)?;
        let (wait, source) = self.wait(class, c)?;
        Ok((wait, source, next))
    }

    /// The spend cap answered for the planned retry: withdraw from the retry budget, and the
    /// retry is granted.
    fn claimed(&mut self, granted: Result<(), SpendDenied>, retry: Planned<B>) -> Decided<B> {
        let log = self.ctx.log();
        let route = Some(self.route.clone());
        if granted.is_err() {
            log.event(route, LocalEventKind::BudgetDenied);
            log.decide(retry.idx, Decision::Stop(StopReason::SpendCapReached));
            return Decided::Done;
        }
        // A cap that took its time to answer may have taken the wait past the deadline.
        if !self.ends_before_deadline(retry.wait) {
            if let Some(gate) = &self.spend {
                gate.release(&self.route);
            }
            log.decide(retry.idx, Decision::Stop(StopReason::DeadlineExceeded));
            return Decided::Done;
        }
        if !self.budget.withdraw() {
            if let Some(gate) = &self.spend {
                gate.release(&self.route);
            }
            log.event(route, LocalEventKind::RetryBudgetDenied);
            log.decide(retry.idx, Decision::Stop(StopReason::RetryBudgetDenied));
            return Decided::Done;
        }
        self.granted = Granted {
            spend: self.spend.is_some(),
            budget: true,
        };
        self.previous_wait = Some(retry.wait);
        if let Some(n) = class_index(retry.class) {
            self.retried[n] += 1;
        }
        let (wait, source) = (retry.wait, retry.source);
        log.decide(retry.idx, Decision::Retry { wait, source });
        Decided::Retry(wait, retry.next)
    }

    /// The class's rule (or the server's `x-should-retry`), `max_attempts` and the `Once`
    /// limits.
    fn check_rule(&self, class: FailureClass, c: &Classification) -> Result<(), StopReason> {
        let limit = self.rule_limit(class, c)?;
        if self.count >= self.shared.retry.max_attempts {
            return Err(StopReason::AttemptsExhausted);
        }
        if class_index(class).is_some_and(|n| self.retried[n] >= limit) {
            return Err(StopReason::AttemptsExhausted);
        }
        Ok(())
    }

    /// How many retries the class's rule (or the server's `x-should-retry`) allows a failure
    /// of `class`, or why it allows none.
    fn rule_limit(&self, class: FailureClass, c: &Classification) -> Result<u32, StopReason> {
        let actions = &self.shared.actions;
        // `x-should-retry` overrides the class's rule both ways.
        let rule = match c.should_retry {
            Some(false) => return Err(StopReason::ServerSaidNo),
            Some(true) => RetryRule::Yes,
            None => actions.get(class).retry,
        };
        let limit = match rule {
            RetryRule::Never => return Err(StopReason::NotRetryable),
            RetryRule::Yes => u32::MAX,
            RetryRule::Once => 1,
            // The backup is the better bet than a second wait on a silent route.
            RetryRule::OnceUnlessFallback
                if self.facts.fallback_available
                    && actions.get(class).fallback != FallbackRule::Never =>
            {
                return Err(StopReason::NotRetryable);
            }
            RetryRule::OnceUnlessFallback => 1,
        };
        Ok(limit)
    }

    /// The idempotency rule for a request that may have been accepted, and the chain's cap on
    /// attempts across all routes.
    fn check_replay(&self, class: FailureClass) -> Result<(), StopReason> {
        if class.possibly_accepted() {
            let allowed = match self.shared.idempotency.replay_possibly_accepted {
                ReplayRule::Never => false,
                ReplayRule::IfIdempotent => self.facts.idempotent,
                ReplayRule::Always => true,
            };
            if !allowed {
                return Err(StopReason::NotIdempotent);
            }
        }
        let attempts = self.ctx.log().attempt_count();
        if self.ctx.attempt_cap().is_some_and(|c| !c.allows(attempts)) {
            return Err(StopReason::ChainLimit);
        }
        Ok(())
    }

    /// The wait before the retry: the backoff curve with the server's hint as a floor, within
    /// the policy's cap and the deadline.
    fn wait(
        &self,
        class: FailureClass,
        c: &Classification,
    ) -> Result<(Duration, WaitSource), StopReason> {
        let retry = &self.shared.retry;
        let (wait, source) = match next_wait(
            retry.backoff_for(class),
            self.count.saturating_sub(1),
            self.previous_wait,
            c.wait_hint.map(|h| h.wait),
            retry.max_server_wait,
            &self.shared.jitter,
        ) {
            // Tokio's timers tick in whole milliseconds: round up, so that the logged wait is
            // the wait that happens and a server's floor is never undercut.
            NextWait::Wait { wait, source } => (ceil_millis(wait), source),
            NextWait::AboveCap { .. } => return Err(StopReason::ServerWaitAboveCap),
        };
        if !self.ends_before_deadline(wait) {
            return Err(StopReason::DeadlineExceeded);
        }
        Ok((wait, source))
    }

    /// Whether a wait of `wait` from now ends before the deadline: an attempt that would start
    /// at or after it could not answer in time.
    fn ends_before_deadline(&self, wait: Duration) -> bool {
        Instant::now()
            .checked_add(wait)
            .is_some_and(|at| at < self.facts.deadline)
    }
}

impl<B> Drop for Attempts<B> {
    fn drop(&mut self) {
        // Dropped between a granted retry and its call (during the wait, say), its claims are
        // given back; dropped during the call, they were spent on it.
        self.called(self.in_call);
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
        // A request whose deadline has passed already (a hop or a queue waited it out) is not
        // sent to be cut off at once: `Ready` fails it on the first poll, with no call.
        let state = if Instant::now() >= attempts.facts.deadline {
            State::Ready { request: first }
        } else {
            attempts.sending(&mut first, false);
            // `poll_ready` of the caller readied this service: the first attempt goes out now.
            State::Calling {
                future: service.call(first),
            }
        };
        Self {
            state,
            deadline: None,
            service,
            attempts,
        }
    }
}

/// What a state's step leads to: the loop goes on in the state it set, or the future ends.
type Next = Option<Result<Response<Body>, Error>>;

impl<S, B, RB> Proj<'_, S, B>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    B: ReplayBody,
{
    /// Waits for the deadline while the inner service keeps the request waiting.
    fn poll_deadline(&mut self, in_flight: bool, cx: &mut Context<'_>) -> Poll<Next> {
        ready!(crate::timer::poll_lazy(
            self.deadline.as_mut(),
            self.attempts.facts.deadline,
            cx
        ));
        // An answer whose error body is still arriving is what its head (and the body read)
        // says, not a timeout.
        let answered = match self.state.as_mut().project() {
            StateProj::Classifying { future } => future.so_far(),
            _ => None,
        };
        // Dropping the attempt's future cancels it.
        self.state.set(State::Done);
        Poll::Ready(Some(Err(self
            .attempts
            .deadline_passed(in_flight, answered))))
    }

    /// `Ready`: the inner service's readiness for the next attempt, then its call.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        // A timer that woke late leaves no time for the retry: it would only be cut off.
        if Instant::now() >= self.attempts.facts.deadline {
            self.state.set(State::Done);
            return Poll::Ready(Some(Err(self.attempts.deadline_passed(false, None))));
        }
        let ready = match self.service.poll_ready(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => return self.poll_deadline(false, cx),
        };
        if let Err(e) = ready {
            self.attempts.called(false);
            let e = self.attempts.shared.classifier.error(e);
            self.state.set(State::Done);
            return Poll::Ready(Some(Err(self.attempts.finish_error(e))));
        }
        // The request travels in the state, so only `Ready` can hand it over.
        if let StateProjReplace::Ready { mut request } =
            self.state.as_mut().project_replace(State::Done)
        {
            self.attempts.sending(&mut request, true);
            let future = self.service.call(request);
            self.state.set(State::Calling { future });
        }
        Poll::Ready(None)
    }

    /// `Calling`: the attempt's response head or error.
    fn poll_call(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        let StateProj::Calling { future } = self.state.as_mut().project() else {
            return Poll::Ready(None);
        };
        let result = match future.poll(cx) {
            Poll::Ready(r) => r,
            Poll::Pending => return self.poll_deadline(true, cx),
        };
        let attempts = &mut *self.attempts;
        attempts.in_call = false;
        attempts.latency = attempts.ctx.head_latency(&attempts.sent);
        match result {
            Ok(response) => {
                attempts.called(true);
                let future = attempts.shared.classifier.classify_attempt(
                    response,
                    attempts.ctx.log(),
                    attempts.sent.mark,
                );
                self.state.set(State::Classifying { future });
                Poll::Ready(None)
            }
            Err(e) => Poll::Ready(self.failed(e)),
        }
    }

    /// The attempt failed without a response: retry it, or hand the error up.
    fn failed(&mut self, e: S::Error) -> Next {
        let attempts = &mut *self.attempts;
        let e = attempts.shared.classifier.error(e);
        let local = is_local_rejection(&e);
        if let Some(wait) = e.wait_out().filter(|_| local) {
            // Turned away by the throttle of a route in a young outage: the same claims (spend,
            // retry budget) carry over to the copy that waits.
            if let Some((wait, next)) = attempts.wait_out(wait) {
                self.sleep(wait, None, next);
                return None;
            }
        }
        attempts.called(!local);
        if local {
            self.state.set(State::Done);
            return Some(Err(attempts.finish_error(e)));
        }
        let mut c = e.classification().cloned().unwrap_or_default();
        if c.class.is_none() {
            c.class = e.class();
        }
        let idx = attempts.record(&c, Some(&e));
        if let Some(wait) = e.wait_out() {
            if let Some((wait, next)) = attempts.wait_out_again(idx, wait, &c) {
                self.sleep(wait, None, next);
                return None;
            }
        }
        let decided = match c.class {
            Some(_) => attempts.decide(idx, &c),
            // A crate error of no failure class the ladder knows (a deadline from inside,
            // say): nothing to retry.
            None => {
                let stop = Decision::Stop(StopReason::NotRetryable);
                attempts.ctx.log().decide(idx, stop);
                Decided::Done
            }
        };
        self.follow(decided, Err(e))
    }

    /// Goes on as decided: `answer` is the attempt's answer, handed up when no retry follows.
    fn follow(&mut self, decided: Decided<B>, answer: Result<Response<Body>, Error>) -> Next {
        match decided {
            Decided::Retry(wait, next) => {
                self.sleep(wait, answer.ok().map(Response::into_body), next);
                None
            }
            Decided::Claim(admit, retry) => {
                self.state.set(State::Claiming {
                    admit,
                    retry,
                    answer,
                });
                None
            }
            Decided::Done => {
                self.state.set(State::Done);
                Some(match answer {
                    Ok(response) => Ok(self.attempts.finish_response(response)),
                    Err(e) => Err(self.attempts.finish_error(e)),
                })
            }
        }
    }

    /// `Classifying`: the classified answer is handed up, or retried.
    fn poll_classify(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        let StateProj::Classifying { future } = self.state.as_mut().project() else {
            return Poll::Ready(None);
        };
        let (response, c) = match Pin::new(future).poll(cx) {
            Poll::Ready(r) => r,
            // The head came, but its error body is still arriving.
            Poll::Pending => return self.poll_deadline(true, cx),
        };
        let attempts = &mut *self.attempts;
        let idx = attempts.record(&c, None);
        if let Some(wait) = crate::circuit_breaker::wait_out(&response) {
            if let Some((wait, next)) = attempts.wait_out_again(idx, wait, &c) {
                self.sleep(wait, Some(response.into_body()), next);
                return Poll::Ready(None);
            }
        }
        // This answer opened the route's circuit: with a backup route, a retry would only wait
        // to be turned away, so the fallback takes over at once.
        let decided = if attempts.facts.fallback_available
            && crate::circuit_breaker::opened_circuit(&response)
        {
            let stop = Decision::Stop(StopReason::CircuitOpen);
            attempts.ctx.log().decide(idx, stop);
            Decided::Done
        } else {
            attempts.decide(idx, &c)
        };
        Poll::Ready(self.follow(decided, Ok(response)))
    }

    /// `Claiming`: the spend cap's answer for the planned retry.
    fn poll_claim(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        let StateProj::Claiming { admit, .. } = self.state.as_mut().project() else {
            return Poll::Ready(None);
        };
        let granted = match Pin::new(admit).poll(cx) {
            Poll::Ready(granted) => Some(granted),
            Poll::Pending => {
                ready!(crate::timer::poll_lazy(
                    self.deadline.as_mut(),
                    self.attempts.facts.deadline,
                    cx
                ));
                // The cap has not answered by the deadline: no retry, and nothing to give
                // back (a reservation the store makes after all ends with its lease).
                None
            }
        };
        let StateProjReplace::Claiming { retry, answer, .. } =
            self.state.as_mut().project_replace(State::Done)
        else {
            return Poll::Ready(None);
        };
        let decided = match granted {
            Some(granted) => self.attempts.claimed(granted, retry),
            None => {
                let stop = Decision::Stop(StopReason::DeadlineExceeded);
                self.attempts.ctx.log().decide(retry.idx, stop);
                Decided::Done
            }
        };
        Poll::Ready(self.follow(decided, answer))
    }

    fn sleep(&mut self, wait: Duration, drain: Option<Body>, next: Request<B>) {
        self.state.set(State::Sleeping {
            sleep: tokio::time::sleep(wait),
            drain,
            drained: 0,
            next,
        });
    }

    /// `Sleeping`: the wait before the retry, draining the retried answer's body meanwhile.
    fn poll_sleep(&mut self, cx: &mut Context<'_>) -> Poll<Next> {
        let StateProj::Sleeping {
            sleep,
            drain,
            drained,
            ..
        } = self.state.as_mut().project()
        else {
            return Poll::Ready(None);
        };
        drain_some(drain, drained, cx);
        ready!(sleep.poll(cx));
        // Whatever did not arrive during the wait is dropped with its connection.
        if let StateProjReplace::Sleeping { next, .. } =
            self.state.as_mut().project_replace(State::Done)
        {
            self.state.set(State::Ready { request: next });
        }
        Poll::Ready(None)
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
                StateProj::Ready { .. } => ready!(this.poll_ready(cx)),
                StateProj::Calling { .. } => ready!(this.poll_call(cx)),
                StateProj::Classifying { .. } => ready!(this.poll_classify(cx)),
                StateProj::Claiming { .. } => ready!(this.poll_claim(cx)),
                StateProj::Sleeping { .. } => ready!(this.poll_sleep(cx)),
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };
            if let Some(out) = step {
                return Poll::Ready(out);
            }
        }
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
            State::Claiming { .. } => "claiming",
            State::Sleeping { .. } => "sleeping",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempts_sent", &self.attempts.count)
            .finish_non_exhaustive()
    }
}
