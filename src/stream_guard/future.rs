//! The response future of [`StreamGuard`](super::StreamGuard).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::body::{Core, Failure, GuardedBody, Step, Tracker};
use crate::Body;
use crate::attempt_log::{Attempt, AttemptLog, Outcome, StreamEnd, StreamRecord};
use crate::classify::{Classification, ClassifyResponse, FailureClass, SharedClassifier};
use crate::context::RouteName;
use crate::StreamCause;
use crate::error::{BoxError, Error, ErrorKind};
use crate::policy::{LoggingPolicy, StreamSettings};

/// What the service knew when it sent the request.
pub(crate) struct Call {
    pub(crate) log: AttemptLog,
    pub(crate) created: bool,
    pub(crate) route: RouteName,
    pub(crate) mark: usize,
    pub(crate) started: Instant,
    pub(crate) offset: Duration,
    pub(crate) settings: StreamSettings,
    pub(crate) classifier: SharedClassifier,
    pub(crate) logging: LoggingPolicy,
}

impl Call {
    fn deadline(&self, d: Option<Duration>) -> Option<Instant> {
        d.and_then(|d| self.started.checked_add(d))
    }

    /// Records an attempt that produced no stream (a transport error, a timeout before the head,
    /// an error response).
    fn record(&self, latency: Duration, c: &Classification, error: Option<String>) -> usize {
        self.log.record_since(self.mark, || {
            let mut a = Attempt::new(Some(self.route.clone()), self.offset, latency, c);
            a.error = error;
            if !self.logging.request_ids {
                a.request_id = None;
            }
            a
        })
    }

    fn set_outcome(&self, outcome: Outcome) {
        if self.created {
            self.log.set_outcome(outcome);
        }
    }

    fn error_outcome(&self, e: &Error) {
        self.set_outcome(Outcome::Error {
            error: e.kind().to_string(),
            class: e.class(),
        });
    }

    fn transport_failure(&self, e: Error) -> Error {
        let c = e.classification().cloned().unwrap_or_else(|| {
            Classification::failure(e.class().unwrap_or(FailureClass::Transport))
        });
        // The kind and class only: a transport error's own message may carry the URL, and
        // with it a key in the query string.
        self.record(self.started.elapsed(), &c, Some(e.to_string()));
        let e = e.with_log(&self.log);
        self.error_outcome(&e);
        e
    }

    /// No response head (or, for an error response, no whole error prefix) in time.
    fn timed_out(&self, cause: StreamCause) -> Error {
        let c = Classification::failure(cause.class());
        let elapsed = self.started.elapsed();
        let i = self.record(elapsed, &c, Some(cause.to_string()));
        self.log.set_stream(
            i,
            StreamRecord {
                time_to_first_token: None,
                bytes: 0,
                events: 0,
                duration: elapsed,
                end: StreamEnd::FailedBeforeCommit(cause.clone()),
                usage: None,
                malformed_events: 0,
            },
        );
        let e = Error::new(ErrorKind::StreamFailed { cause })
            .with_classification(c)
            .with_log(&self.log);
        self.error_outcome(&e);
        e
    }
}

/// Whether a response is a server-sent event stream.
fn is_sse(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Arms `sleep` for `deadline` and polls it.
fn poll_deadline(mut sleep: Pin<&mut Sleep>, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
    if sleep.deadline() != deadline {
        sleep.as_mut().reset(deadline);
    }
    sleep.poll(cx)
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        /// Waiting for the response head.
        Head { #[pin] future: F },
        /// Classifying the head (reading a bounded prefix of an error body).
        Classify { future: ClassifyResponse, head_at: Instant },
        /// A 2xx response: reading up to the commit point.
        Guard { parts: Option<http::response::Parts>, core: Option<Core> },
        Done,
    }
}

pin_project! {
    /// Response future of [`StreamGuard`](super::StreamGuard).
    ///
    /// Resolves only at the stream's commit point, with the held-back prefix still to come in
    /// the body; before that point any failure resolves it to an
    /// [`ErrorKind::StreamFailed`] error (or [`ErrorKind::FailedClosed`] for a policy block),
    /// and nothing reached the caller.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        #[pin]
        sleep: Sleep,
        call: Call,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(future: F, call: Call) -> Self {
        Self {
            sleep: tokio::time::sleep_until(call.started),
            state: State::Head { future },
            call,
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("route", &self.call.route)
            .finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    E: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Output = Result<http::Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let call: &Call = this.call;
        loop {
            match this.state.as_mut().project() {
                StateProj::Head { future } => match future.poll(cx) {
                    Poll::Ready(Ok(response)) => {
                        let future = call.classifier.classify_response(response);
                        let head_at = Instant::now();
                        this.state.set(State::Classify { future, head_at });
                    }
                    Poll::Ready(Err(e)) => {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(call.transport_failure(call.classifier.error(e))));
                    }
                    Poll::Pending => {
                        // Both the first-token and the total timer run from the request.
                        let s = &call.settings;
                        let first = call.deadline(s.first_token_timeout);
                        let total = call.deadline(s.total_timeout);
                        let Some(at) = first.into_iter().chain(total).min() else {
                            return Poll::Pending;
                        };
                        if poll_deadline(this.sleep.as_mut(), at, cx).is_pending() {
                            return Poll::Pending;
                        }
                        let cause = match (s.first_token_timeout, s.total_timeout) {
                            (Some(d), _) if first == Some(at) => StreamCause::FirstTokenTimeout(d),
                            (_, Some(d)) => StreamCause::TotalTimeout(d),
                            (Some(d), None) => StreamCause::FirstTokenTimeout(d),
                            (None, None) => return Poll::Pending,
                        };
                        this.state.set(State::Done);
                        return Poll::Ready(Err(call.timed_out(cause)));
                    }
                },
                StateProj::Classify { future, head_at } => {
                    let head_at = *head_at;
                    let (response, c) = match Pin::new(future).poll(cx) {
                        Poll::Ready(done) => done,
                        Poll::Pending => {
                            // Reading an error body's prefix is bounded by the total timer.
                            let Some(d) = call.settings.total_timeout else {
                                return Poll::Pending;
                            };
                            let Some(at) = call.deadline(Some(d)) else {
                                return Poll::Pending;
                            };
                            if poll_deadline(this.sleep.as_mut(), at, cx).is_pending() {
                                return Poll::Pending;
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Err(call.timed_out(StreamCause::TotalTimeout(d))));
                        }
                    };
                    let latency = head_at.saturating_duration_since(call.started);
                    if !response.status().is_success() {
                        // An error response is the provider's answer: handed up as it is.
                        call.record(latency, &c, None);
                        call.set_outcome(Outcome::ProviderFailure {
                            status: response.status().as_u16(),
                            class: c.class,
                        });
                        let mut response = response;
                        if call.created {
                            response.extensions_mut().insert(call.log.clone());
                        }
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                    let (parts, body) = response.into_parts();
                    let tracker = Tracker {
                        log: call.log.clone(),
                        created: call.created,
                        route: call.route.clone(),
                        mark: call.mark,
                        offset: call.offset,
                        latency,
                        head: c,
                        index: None,
                        finished: false,
                        request_ids: call.logging.request_ids,
                    };
                    let core = Core::new(
                        body,
                        is_sse(&parts.headers).then(|| call.classifier.clone()),
                        call.settings,
                        call.started,
                        head_at,
                        tracker,
                    );
                    this.state.set(State::Guard {
                        parts: Some(parts),
                        core: Some(core),
                    });
                }
                StateProj::Guard { parts, core: slot } => {
                    let Some(core) = slot.as_mut() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    let outcome = match core.poll_step(cx, this.sleep.as_mut(), false) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Step::Data(data)) => {
                            core.hold(data);
                            if let Some(f) = core.take_pending() {
                                Err(core.fail_before_commit(f))
                            } else if core.blocked().is_some() {
                                Err(core.fail_closed())
                            } else if core.commit_due(Instant::now()) {
                                Ok(())
                            } else if core.buffer_exceeded() {
                                let max = core.max_buffer();
                                Err(core.fail_before_commit(Failure::new(
                                    StreamCause::BufferExceeded(max),
                                )))
                            } else {
                                continue;
                            }
                        }
                        Poll::Ready(Step::Trailers(trailers)) => {
                            core.hold_trailers(trailers);
                            continue;
                        }
                        Poll::Ready(Step::CommitDue) => Ok(()),
                        Poll::Ready(Step::End) => {
                            if let Some(f) = core.take_pending() {
                                Err(core.fail_before_commit(f))
                            } else if core.blocked().is_some() {
                                Err(core.fail_closed())
                            } else if core.complete() {
                                Ok(())
                            } else {
                                Err(core.fail_before_commit(Failure::new(StreamCause::Truncated)))
                            }
                        }
                        Poll::Ready(Step::Fail(f)) => Err(core.fail_before_commit(f)),
                    };
                    let result = match outcome {
                        Err(e) => Err(e),
                        Ok(()) => match (parts.take(), slot.take()) {
                            (Some(mut parts), Some(mut core)) => {
                                let log = core.commit();
                                if call.created {
                                    parts.extensions.insert(log);
                                }
                                let body = Body::new(GuardedBody::new(core));
                                Ok(http::Response::from_parts(parts, body))
                            }
                            _ => panic!("ResponseFuture polled after completion"),
                        },
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(result);
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
