//! The body of a served stream that may be continued on another route.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::Frame;

use super::continuation::{ContinuationFuture, Plan};
use super::future::is_sse;
use crate::attempt_log::Outcome;
use crate::sse::Frame as SseFrame;
use crate::sse::MAX_EVENT_BYTES;
use crate::sse::event::Scanner;
use crate::sse::splice::{Splicer, Transcript};
use crate::{Body, BoxError, Error, ErrorKind, StreamCause};

/// What a poll of the body gives.
type Next = Poll<Option<Result<Frame<Bytes>, Error>>>;

/// Where the body stands.
enum Phase {
    /// Passing the served stream on, whole events at a time.
    Served,
    /// Waiting for the continuation's response head.
    Sending {
        future: ContinuationFuture,
        skip: String,
    },
    /// Splicing the continuation's events into the caller's stream.
    Splicing { splicer: Splicer, ended: bool },
    /// Nothing more to read; what is left is `tail`, then `failed`.
    Done,
}

/// The body of a stream served by the chain when `stream.continuation` is on.
///
/// It passes the stream on whole events at a time (the end of an event still arriving, and an
/// in-band error event, wait in `tail`), so that when the stream guard below ends it with
/// `StreamInterrupted` for a cause the policy lets be continued, the caller has a well-formed
/// stream to which a continuation's events can be added. It then asks the [`Plan`] for a
/// continuation, drops the tail and splices the continuation's events in. A stream that is
/// not continued ends exactly as it would without this body: the tail, then the guard's error.
pub(crate) struct ContinuingBody {
    inner: Body,
    scanner: Scanner,
    transcript: Transcript,
    phase: Phase,
    /// Bytes of the served stream read but not handed over yet.
    tail: BytesMut,
    /// Where `tail` starts in the served stream.
    released: u64,
    /// Where an in-band error event of the served stream starts: nothing from it on is
    /// handed over unless the stream is not continued.
    held_from: Option<u64>,
    /// Bytes handed to the caller.
    delivered: u64,
    /// Held bytes outgrew the largest event: they were handed over in the middle of a line,
    /// so the stream has no clean end a continuation could follow.
    unheld: bool,
    /// The cause of the last failure, for the error a failed continuation ends with.
    cause: Option<StreamCause>,
    /// The served stream's trailers, handed over after `tail`.
    trailers: Option<Frame<Bytes>>,
    /// The error handed over after `tail`.
    failed: Option<Error>,
    out: BytesMut,
    plan: Box<Plan>,
}

impl ContinuingBody {
    pub(crate) fn new(inner: Body, plan: Plan) -> Self {
        let limit = plan.settings().map_or(0, |s| s.max_text);
        Self {
            inner,
            scanner: Scanner::default(),
            transcript: Transcript::new(limit),
            phase: Phase::Served,
            tail: BytesMut::new(),
            released: 0,
            held_from: None,
            delivered: 0,
            unheld: false,
            cause: None,
            trailers: None,
            failed: None,
            out: BytesMut::new(),
            plan: Box::new(plan),
        }
    }

    fn data(&mut self, data: Bytes) -> Next {
        self.delivered = self.delivered.saturating_add(data.len() as u64);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    /// Scans a chunk of the served stream; what can be handed over now.
    fn served(&mut self, data: Bytes) -> Bytes {
        let (transcript, held) = (&mut self.transcript, &mut self.held_from);
        self.scanner.feed_frames(&data, &mut |frame, ev| {
            if held.is_some() {
                // Nothing after an error event is the answer's.
                return;
            }
            match frame {
                SseFrame::Event { start, .. } if ev.error.is_some() => *held = Some(start),
                _ => transcript.observe(frame, &ev),
            }
        });
        let safe = self.scanner.rest().min(self.held_from.unwrap_or(u64::MAX));
        let release = usize::try_from(safe.saturating_sub(self.released)).unwrap_or(usize::MAX);
        let mut out = if self.tail.is_empty() {
            // The usual case, a chunk of whole events: handed over without a copy.
            let mut data = data;
            let rest = data.split_off(release.min(data.len()));
            self.tail.extend_from_slice(&rest);
            data
        } else {
            self.tail.extend_from_slice(&data);
            self.tail.split_to(release.min(self.tail.len())).freeze()
        };
        if self.tail.len() > MAX_EVENT_BYTES {
            // More than any event the scanner holds (a line it is skipping, or what follows an
            // error event): handed over as it is rather than held without bound, and the
            // stream is no longer one a continuation could follow.
            let mut all = BytesMut::from(out);
            all.extend_from_slice(&self.tail.split());
            out = all.freeze();
            self.unheld = true;
        }
        self.released = self.released.saturating_add(out.len() as u64);
        out
    }

    /// The served stream failed with `e`: continue it if the policy and the plan allow, else
    /// hand over the tail and `e`.
    fn served_failed(&mut self, e: Error) -> Option<Next> {
        if let ErrorKind::StreamInterrupted { cause, .. } = e.kind() {
            if self.start(cause.clone()) {
                self.tail.clear();
                return None;
            }
        }
        self.phase = Phase::Done;
        self.failed = Some(e);
        Some(self.done())
    }

    /// Starts a continuation after `cause`, if one may be made.
    fn start(&mut self, cause: StreamCause) -> bool {
        if self.unheld || !self.plan.allows(&cause) {
            return false;
        }
        if let Err(reason) = self.transcript.continuable() {
            tracing::debug!(
                target: "tower_llm_resilience::fallback",
                reason,
                "stream not continued"
            );
            return false;
        }
        let text = self.transcript.text();
        let Some((_, skip, future)) = self.plan.start(&cause, text, self.delivered) else {
            tracing::debug!(
                target: "tower_llm_resilience::fallback",
                reason = "no route can take it, or a limit says no",
                "stream not continued"
            );
            return false;
        };
        self.cause = Some(cause);
        self.phase = Phase::Sending { future, skip };
        true
    }

    /// A continuation failed (before it answered, or cut) with `source`, for `cause`: another
    /// one if the plan allows, else the caller's stream ends in `StreamInterrupted`.
    fn continuation_failed(&mut self, cause: Option<StreamCause>, source: BoxError) {
        let cause = cause.or_else(|| self.cause.clone());
        if let Some(c) = cause.clone() {
            if self.start(c) {
                return;
            }
        }
        let cause = cause.unwrap_or(StreamCause::Disconnected);
        let log = self.plan.ctx.log();
        let e = Error::new(ErrorKind::StreamInterrupted {
            delivered_bytes: self.delivered,
            cause,
        })
        .with_source(source)
        .with_log(log);
        log.set_outcome(Outcome::Error {
            error: e.kind().to_string(),
            class: e.class(),
        });
        self.phase = Phase::Done;
        self.failed = Some(e);
    }

    fn done(&mut self) -> Next {
        if !self.tail.is_empty() {
            let tail = self.tail.split().freeze();
            return self.data(tail);
        }
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        Poll::Ready(self.failed.take().map(Err))
    }
}

/// The cause a continuation's failure stands for.
fn cause_of(e: &Error) -> StreamCause {
    match e.kind() {
        ErrorKind::StreamInterrupted { cause, .. } | ErrorKind::StreamFailed { cause } => {
            cause.clone()
        }
        _ => StreamCause::Disconnected,
    }
}

impl http_body::Body for ContinuingBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Next {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Served => match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            let out = this.served(data);
                            if !out.is_empty() {
                                return this.data(out);
                            }
                        }
                        // Trailers end the stream: after the tail.
                        Err(frame) => {
                            this.trailers = Some(frame);
                            this.phase = Phase::Done;
                            return this.done();
                        }
                    },
                    Some(Err(e)) => {
                        if let Some(out) = this.served_failed(e) {
                            return out;
                        }
                    }
                    None => {
                        this.phase = Phase::Done;
                        return this.done();
                    }
                },
                Phase::Sending { future, skip } => {
                    let answer = ready!(future.as_mut().poll(cx));
                    let skip = std::mem::take(skip);
                    match answer {
                        Ok(response)
                            if response.status().is_success() && is_sse(response.headers()) =>
                        {
                            this.plan.continued();
                            this.inner = response.into_body();
                            this.scanner = Scanner::default();
                            match Splicer::new(&this.transcript, skip) {
                                Some(splicer) => {
                                    this.phase = Phase::Splicing {
                                        splicer,
                                        ended: false,
                                    }
                                }
                                None => this.continuation_failed(None, "no wire format".into()),
                            }
                        }
                        Ok(response) => {
                            let status = response.status();
                            this.continuation_failed(
                                None,
                                format!("the continuation was answered with {status}").into(),
                            );
                        }
                        Err(e) => this.continuation_failed(None, e),
                    }
                }
                Phase::Splicing { splicer, ended } => {
                    if !this.out.is_empty() {
                        let out = this.out.split().freeze();
                        return this.data(out);
                    }
                    if *ended {
                        if splicer.complete() {
                            let status = this.plan.status.as_u16();
                            this.plan.ctx.log().set_outcome(Outcome::Success { status });
                            this.phase = Phase::Done;
                        } else {
                            this.continuation_failed(
                                Some(StreamCause::Truncated),
                                "the continuation ended without its finish reason and terminal marker"
                                    .into(),
                            );
                        }
                        continue;
                    }
                    let (transcript, out) = (&mut this.transcript, &mut this.out);
                    match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                this.scanner.feed_frames(&data, &mut |f, ev| {
                                    splicer.event(f, &ev, transcript, out)
                                });
                            }
                        }
                        Some(Err(e)) => {
                            let cause = cause_of(&e);
                            this.continuation_failed(Some(cause), Box::new(e));
                        }
                        None => {
                            this.scanner
                                .finish_frames(&mut |f, ev| splicer.event(f, &ev, transcript, out));
                            *ended = true;
                        }
                    }
                }
                Phase::Done => return this.done(),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Done)
            && self.tail.is_empty()
            && self.trailers.is_none()
            && self.failed.is_none()
    }
}
