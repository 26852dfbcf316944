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
use super::state::{Admission, RouteState, Verdict};
use crate::attempt_log::{Attempt, AttemptLog, Outcome};
use crate::classify::{Classification, ClassifyResponse, SharedClassifier};
use crate::context::RouteName;
use crate::error::{BoxError, Error, ErrorKind};

/// An admitted call's claim on its route's breaker. A half-open probe holds a slot; if the
/// call ends without an outcome (its future is dropped) the slot is given back on drop.
pub(crate) struct Permit {
    shared: Arc<Shared>,
    route: Arc<RouteState>,
    admission: Admission,
    done: bool,
}

impl Permit {
    pub(crate) fn new(shared: Arc<Shared>, route: Arc<RouteState>, admission: Admission) -> Self {
        Self {
            shared,
            route,
            admission,
            done: false,
        }
    }

    fn complete(&mut self, verdict: Verdict, slow: bool) -> Option<u64> {
        self.done = true;
        self.route
            .complete(&self.shared, self.admission, verdict, slow, Instant::now())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.route.abandon(self.admission);
        }
    }
}

/// Everything an admitted call needs once the inner service answers.
pub(crate) struct Call {
    pub(crate) permit: Permit,
    pub(crate) route: RouteName,
    pub(crate) log: AttemptLog,
    pub(crate) created: bool,
    pub(crate) mark: usize,
    pub(crate) start: Instant,
    pub(crate) offset: Duration,
    pub(crate) classifier: SharedClassifier,
}

impl Call {
    fn is_slow(&self, latency: Duration) -> bool {
        self.permit
            .shared
            .config
            .policy
            .slow_call
            .is_some_and(|s| latency > s.threshold)
    }

    fn failed(mut self, error: Error) -> Error {
        let latency = self.start.elapsed();
        let class = error_class(&error);
        let v = verdict(&self.permit.shared.config, class);
        let slow = self.is_slow(latency);
        self.permit.complete(v, slow);
        // Only errors that stand for a transport attempt are attempts; an inner layer's local
        // decision (a nested breaker, a deadline) already has its event.
        let is_attempt = matches!(
            error.kind(),
            ErrorKind::Transport
                | ErrorKind::StreamFailed { .. }
                | ErrorKind::StreamInterrupted { .. }
        );
        if is_attempt {
            self.log.record_since(self.mark, || {
                let c = match error.classification() {
                    Some(c) => c.clone(),
                    None => class.map(Classification::failure).unwrap_or_default(),
                };
                let mut a = Attempt::new(Some(self.route.clone()), self.offset, latency, &c);
                a.error = Some(error.to_string());
                a
            });
        }
        if self.created {
            self.log.set_outcome(Outcome::Error {
                error: error.to_string(),
                class: error.class(),
            });
        }
        error.with_log(&self.log)
    }

    fn answered(
        mut self,
        mut response: http::Response<crate::Body>,
        c: Classification,
        latency: Duration,
    ) -> http::Response<crate::Body> {
        let v = verdict(&self.permit.shared.config, c.class);
        let slow = self.is_slow(latency);
        let epoch = self.permit.complete(v, slow);
        super::state::mark_if_opened(&mut response, v, &self.permit.route);
        self.log.record_since(self.mark, || {
            Attempt::new(Some(self.route.clone()), self.offset, latency, &c)
        });
        let status = response.status().as_u16();
        if self.created {
            self.log.set_outcome(match c.class {
                None => Outcome::Success { status },
                class => Outcome::ProviderFailure { status, class },
            });
            response.extensions_mut().insert(self.log.clone());
        }
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
        Classifying { classify: ClassifyResponse, call: Option<Call>, latency: Duration },
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
                            let latency = call.start.elapsed();
                            let classify = call.classifier.classify_response(response);
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
