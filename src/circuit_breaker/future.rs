use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::body::{Watch, WatchedBody};
use super::layer::Shared;
use super::service::{error_class, verdict};
use super::state::{Admission, RouteState, Verdict, WaitOut};
use crate::RouteName;
use crate::classify::{Classification, ClassifyResponse, SharedClassifier};
use crate::context::{RequestContext, Sent};
use crate::error::{BoxError, Error, ErrorKind};

/// An admitted call's claim on its route's breaker. A half-open probe holds a slot; if the
/// call ends without an outcome (its future is dropped) the slot is given back on drop.
pub(crate) struct Permit {
    shared: Arc<Shared>,
    route: Arc<RouteState>,
    admission: Admission,
    /// When the call started, for the throttle's count of calls in flight.
    started: Option<Duration>,
    done: bool,
}

impl Permit {
    pub(crate) fn new(
        shared: Arc<Shared>,
        route: Arc<RouteState>,
        admission: Admission,
        now: Instant,
    ) -> Self {
        let started = route.started(admission, now);
        Self {
            shared,
            route,
            admission,
            started,
            done: false,
        }
    }

    fn complete(&mut self, verdict: Verdict, slow: bool) -> Option<u64> {
        self.done = true;
        self.route.complete(
            &self.shared,
            self.admission,
            verdict,
            slow,
            Instant::now(),
            self.started,
        )
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.route.abandon(self.admission, self.started);
        }
    }
}

/// Everything an admitted call needs once the inner service answers.
pub(crate) struct Call {
    pub(crate) permit: Permit,
    pub(crate) route: RouteName,
    pub(crate) ctx: RequestContext,
    pub(crate) owner: bool,
    pub(crate) sent: Sent,
    pub(crate) classifier: SharedClassifier,
}

impl Call {
    fn slow_call_threshold(&self) -> Option<Duration> {
        let policy = &self.permit.shared.config.policy;
        policy.slow_call.map(|s| s.threshold)
    }

    /// The response head came: its classification (a success a layer nearer the transport
    /// recorded is taken as it is) and, when the slow-call rule or the recording needs it,
    /// the time it took.
    fn head<RB>(&self, response: http::Response<RB>) -> (ClassifyResponse, Option<Duration>)
    where
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let log = self.ctx.log();
        let recorded = log.recorded_since(self.sent.mark).is_some();
        let latency =
            (!recorded || self.slow_call_threshold().is_some()).then(|| self.sent.at.elapsed());
        let classify = self
            .classifier
            .classify_attempt(response, log, self.sent.mark);
        (classify, latency)
    }

    /// A refused call of a request with no backup, on a route in an outage young enough to
    /// wait out: the time until the throttle's window moves on.
    fn wait_out(&self, v: Verdict) -> Option<Duration> {
        if v.accepted() || self.ctx.fallback_available() {
            return None;
        }
        self.permit.route.wait_out(Instant::now())
    }

    fn is_slow(&self, latency: Option<Duration>) -> bool {
        self.slow_call_threshold()
            .zip(latency)
            .is_some_and(|(threshold, latency)| latency > threshold)
    }

    fn failed(mut self, error: Error) -> Error {
        let latency = self.sent.at.elapsed();
        let class = error_class(&error);
        let v = verdict(&self.permit.shared.config, class);
        let slow = self.is_slow(Some(latency));
        self.permit.complete(v, slow);
        // Only errors that stand for a transport attempt are attempts; an inner layer's local
        // decision (a nested breaker, a deadline) already has its event.
        let is_attempt = matches!(
            error.kind(),
            ErrorKind::Transport
                | ErrorKind::StreamFailed { .. }
                | ErrorKind::StreamInterrupted { .. }
        );
        let error = match self.wait_out(v) {
            Some(next_move) => error.with_wait_out(next_move),
            None => error,
        };
        if is_attempt {
            let c = match error.classification() {
                Some(c) => c.clone(),
                None => class.map(Classification::failure).unwrap_or_default(),
            };
            self.ctx.record(
                &self.sent,
                &self.route,
                Some(latency),
                &c,
                Some(error.to_string()),
            );
        }
        self.ctx.close_error(self.owner, error)
    }

    fn answered(
        mut self,
        mut response: http::Response<crate::Body>,
        c: Classification,
        latency: Option<Duration>,
    ) -> http::Response<crate::Body> {
        let v = verdict(&self.permit.shared.config, c.class);
        let slow = self.is_slow(latency);
        let epoch = self.permit.complete(v, slow);
        super::state::mark_if_opened(&mut response, v, &self.permit.route);
        if let Some(next_move) = self.wait_out(v) {
            response.extensions_mut().insert(WaitOut(next_move));
        }
        self.ctx.record(&self.sent, &self.route, latency, &c, None);
        let mut response = self.ctx.close_response(self.owner, response);
        if v == Verdict::Success && self.permit.admission != Admission::Untracked {
            let watch = Watch {
                shared: self.permit.shared.clone(),
                route: self.permit.route.clone(),
                admission: self.permit.admission,
                epoch,
            };
            response = response.map(|b| crate::Body::new(WatchedBody::new(b, watch)));
        }
        response
    }
}

pin_project! {
    /// Response future of [`CircuitBreaker`](super::CircuitBreaker).
    ///
    /// Resolves at the response head. A call refused because its route's circuit is open
    /// resolves at once with `ErrorKind::CircuitOpen`, without the inner service being called.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Rejected { error: Option<Error> },
        Calling { #[pin] future: F, call: Option<Call> },
        Classifying { classify: ClassifyResponse, call: Option<Call>, latency: Option<Duration> },
        Done,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn rejected(error: Error) -> Self {
        Self {
            state: State::Rejected { error: Some(error) },
        }
    }

    pub(crate) fn called(future: F, call: Call) -> Self {
        Self {
            state: State::Calling {
                future,
                call: Some(call),
            },
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Rejected { .. } => "rejected",
            State::Calling { .. } => "calling",
            State::Classifying { .. } => "classifying",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    E: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Output = Result<http::Response<crate::Body>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut state = self.as_mut().project().state;
            match state.as_mut().project() {
                StateProj::Rejected { error } => {
                    let error = error.take();
                    state.set(State::Done);
                    return match error {
                        Some(e) => Poll::Ready(Err(e)),
                        None => panic!("circuit breaker ResponseFuture polled after completion"),
                    };
                }
                StateProj::Calling { future, call } => {
                    let result = ready!(future.poll(cx));
                    let Some(call) = call.take() else {
                        panic!("circuit breaker ResponseFuture polled after completion");
                    };
                    match result {
                        Ok(response) => {
                            let (classify, latency) = call.head(response);
                            state.set(State::Classifying {
                                classify,
                                call: Some(call),
                                latency,
                            });
                        }
                        Err(e) => {
                            let error = call.classifier.error(e);
                            state.set(State::Done);
                            return Poll::Ready(Err(call.failed(error)));
                        }
                    }
                }
                StateProj::Classifying {
                    classify,
                    call,
                    latency,
                } => {
                    let (response, c) = ready!(Pin::new(classify).poll(cx));
                    let latency = *latency;
                    let Some(call) = call.take() else {
                        panic!("circuit breaker ResponseFuture polled after completion");
                    };
                    state.set(State::Done);
                    return Poll::Ready(Ok(call.answered(response, c, latency)));
                }
                StateProj::Done => {
                    panic!("circuit breaker ResponseFuture polled after completion")
                }
            }
        }
    }
}
