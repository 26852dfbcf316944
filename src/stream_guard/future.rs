//! The response future of [`StreamGuard`](super::StreamGuard).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::body::{Core, Failure, GuardedBody, Read, Tracker};
use crate::attempt_log::{StreamEnd, StreamRecord};
use crate::classify::{Classification, ClassifyResponse, SharedClassifier};
use crate::context::{RequestContext, Sent};
use crate::error::{BoxError, Error, ErrorKind};
use crate::policy::StreamSettings;
use crate::{Body, RouteName, StreamCause};

/// What the service knew when it sent the request.
pub(crate) struct Call {
    pub(crate) ctx: RequestContext,
    /// Whether the guard owns the log (then it sets the outcome).
    pub(crate) owner: bool,
    pub(crate) route: RouteName,
    pub(crate) sent: Sent,
    pub(crate) settings: StreamSettings,
    pub(crate) classifier: SharedClassifier,
}

impl Call {
    /// When the request was sent: the first-token and total timers run from here.
    fn started(&self) -> Instant {
        self.sent.at
    }

    fn deadline(&self, d: Option<Duration>) -> Option<Instant> {
        d.and_then(|d| self.started().checked_add(d))
    }

    fn transport_failure(&self, e: Error) -> Error {
        self.ctx.record_error(&self.sent, &self.route, &e);
        self.ctx.close_error(self.owner, e)
    }

    /// No response head (or, for an error response, no whole error prefix) in time.
    fn timed_out(&self, cause: StreamCause) -> Error {
        let c = Classification::failure(cause.class());
        let elapsed = self.started().elapsed();
        let i = self.ctx.record(
            &self.sent,
            &self.route,
            Some(elapsed),
            &c,
            Some(cause.to_string()),
        );
        self.ctx.log().set_stream(
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
        let e = Error::new(ErrorKind::StreamFailed { cause }).with_classification(c);
        self.ctx.close_error(self.owner, e)
    }

    /// The first of the first-token and total timers (both run from the request) that passed,
    /// polling `sleep` for the earliest while none has.
    fn poll_head_timers(&self, sleep: Pin<&mut Sleep>, cx: &mut Context<'_>) -> Poll<StreamCause> {
        let s = &self.settings;
        let first = self.deadline(s.first_token_timeout);
        let total = self.deadline(s.total_timeout);
        let Some(at) = first.into_iter().chain(total).min() else {
            return Poll::Pending;
        };
        ready!(crate::timer::poll_at(sleep, at, cx));
        match (s.first_token_timeout, s.total_timeout) {
            (Some(d), _) if first == Some(at) => Poll::Ready(StreamCause::FirstTokenTimeout(d)),
            (_, Some(d)) => Poll::Ready(StreamCause::TotalTimeout(d)),
            (Some(d), None) => Poll::Ready(StreamCause::FirstTokenTimeout(d)),
            (None, None) => Poll::Pending,
        }
    }

    /// The head is classified. An error response is the provider's answer, handed up as it
    /// is; a success is guarded up to its commit point.
    fn classified(
        &self,
        response: http::Response<Body>,
        c: Classification,
        head_at: Instant,
    ) -> Head {
        let latency = head_at.saturating_duration_since(self.started());
        if !response.status().is_success() {
            self.ctx
                .record(&self.sent, &self.route, Some(latency), &c, None);
            return Head::Answer(self.ctx.close_response(self.owner, response));
        }
        let (parts, body) = response.into_parts();
        let tracker = Tracker::new(
            self.ctx.clone(),
            self.owner,
            self.route.clone(),
            self.sent,
            latency,
            c,
        );
        let sse = is_sse(&parts.headers).then(|| self.classifier.clone());
        let core = Core::new(body, sse, self.settings, self.started(), head_at, tracker);
        Head::Guard(parts, core)
    }
}

/// What a classified head leads to. Moved straight into the future's state: boxing the large
/// variant would cost an allocation per stream for nothing.
#[allow(clippy::large_enum_variant)]
enum Head {
    /// The provider's error response, handed up as it is.
    Answer(http::Response<Body>),
    /// A success, guarded up to its commit point.
    Guard(http::response::Parts, Core),
}

/// Whether a response is a server-sent event stream.
fn is_sse(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Reads a guarded stream up to its commit point: `Ok` when the held-back prefix may be
/// handed up, the error the stream failed with before it otherwise.
fn poll_commit(
    core: &mut Core,
    sleep: Pin<&mut Sleep>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Error>> {
    let mut sleep = sleep;
    loop {
        let step = ready!(core.poll_step(cx, sleep.as_mut(), false));
        return Poll::Ready(match step {
            Read::Data(data) => {
                core.hold(data);
                if let Some(f) = core.take_pending() {
                    Err(core.fail_before_commit(f))
                } else if core.blocked().is_some() {
                    Err(core.fail_closed())
                } else if core.commit_due(Instant::now()) {
                    Ok(())
                } else if core.buffer_exceeded() {
                    let max = core.max_buffer();
                    Err(core.fail_before_commit(Failure::new(StreamCause::BufferExceeded(max))))
                } else {
                    continue;
                }
            }
            Read::Trailers(trailers) => {
                core.hold_trailers(trailers);
                continue;
            }
            Read::CommitDue => Ok(()),
            Read::End => {
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
            Read::Fail(f) => Err(core.fail_before_commit(f)),
        });
    }
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
            sleep: tokio::time::sleep_until(call.started()),
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
            let out = match this.state.as_mut().project() {
                StateProj::Head { future } => match future.poll(cx) {
                    Poll::Ready(Ok(response)) => {
                        let future = call.classifier.classify_attempt(
                            response,
                            call.ctx.log(),
                            call.sent.mark,
                        );
                        let head_at = Instant::now();
                        this.state.set(State::Classify { future, head_at });
                        continue;
                    }
                    Poll::Ready(Err(e)) => Err(call.transport_failure(call.classifier.error(e))),
                    Poll::Pending => {
                        let cause = ready!(call.poll_head_timers(this.sleep.as_mut(), cx));
                        Err(call.timed_out(cause))
                    }
                },
                StateProj::Classify { future, head_at } => match Pin::new(future).poll(cx) {
                    Poll::Ready((response, c)) => match call.classified(response, c, *head_at) {
                        Head::Guard(parts, core) => {
                            this.state.set(State::Guard {
                                parts: Some(parts),
                                core: Some(core),
                            });
                            continue;
                        }
                        Head::Answer(response) => Ok(response),
                    },
                    // Reading an error body's prefix (a few hundred bytes) is bounded by the
                    // idle timer from the head, and by the total timer: a gateway that sends a
                    // head and then nothing is a stall, not ten minutes of waiting.
                    Poll::Pending => {
                        let s = &call.settings;
                        let total = s.total_timeout.and_then(|d| {
                            Some((call.deadline(Some(d))?, StreamCause::TotalTimeout(d)))
                        });
                        let idle = s.idle_timeout.and_then(|d| {
                            Some((head_at.checked_add(d)?, StreamCause::IdleTimeout(d)))
                        });
                        // The earlier; the total timer on a tie.
                        let Some((at, cause)) = total.into_iter().chain(idle).min_by_key(|t| t.0)
                        else {
                            return Poll::Pending;
                        };
                        ready!(crate::timer::poll_at(this.sleep.as_mut(), at, cx));
                        Err(call.timed_out(cause))
                    }
                },
                StateProj::Guard { parts, core } => {
                    let Some(c) = core.as_mut() else {
                        panic!("ResponseFuture polled after completion");
                    };
                    match ready!(poll_commit(c, this.sleep.as_mut(), cx)) {
                        Err(e) => Err(e),
                        Ok(()) => match (parts.take(), core.take()) {
                            (Some(parts), Some(mut core)) => {
                                core.commit();
                                let body = Body::new(GuardedBody::new(core));
                                let response = http::Response::from_parts(parts, body);
                                Ok(call.ctx.close_response(call.owner, response))
                            }
                            _ => panic!("ResponseFuture polled after completion"),
                        },
                    }
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            };
            this.state.set(State::Done);
            return Poll::Ready(out);
        }
    }
}
