//! The guarded body, and the state the response future fills before the commit point and hands
//! to the body at it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::Body;
use crate::attempt_log::{AttemptLog, Outcome, StreamEnd, StreamRecord};
use crate::classify::{Classification, FailureClass, SharedClassifier};
use crate::context::{RequestContext, Sent};
use crate::error::{Error, ErrorKind};
use crate::policy::{CommitPoint, StreamSettings};
use crate::sse::event::{EventKind, Finish, Scanner, SseEvent, UsagePart};
use crate::{RouteName, StreamCause};

/// What the guard has seen of the stream so far.
#[derive(Debug, Default)]
struct Progress {
    first_content: Option<Instant>,
    terminal: bool,
    finish: Option<Finish>,
    /// An in-band error (rare, so kept out of line).
    error: Option<Box<Classification>>,
    usage: UsagePart,
    events: u64,
    malformed: u64,
}

impl Progress {
    fn on_event(&mut self, ev: SseEvent, now: Instant) {
        // A comment is life (its bytes reset the idle timer), not an event.
        if ev.kind == EventKind::Comment {
            return;
        }
        self.events += 1;
        match ev.kind {
            EventKind::Content => {
                self.first_content.get_or_insert(now);
            }
            EventKind::Malformed => self.malformed += 1,
            _ => {}
        }
        // After the terminal marker nothing changes how the stream ended.
        if self.terminal {
            return;
        }
        if let Some(u) = ev.usage {
            self.usage.merge(u);
        }
        if self.error.is_none() {
            self.error = ev.error.map(Box::new);
        }
        if let Some(f) = ev.finish {
            if self.finish.as_ref().is_none_or(|seen| !seen.blocked) {
                self.finish = Some(f);
            }
        }
        self.terminal |= ev.terminal;
    }

    fn blocked(&self) -> Option<&Finish> {
        self.finish.as_ref().filter(|f| f.blocked)
    }
}

/// The chunks held back before the commit point, in order. Most streams commit within two
/// chunks (a role-only first delta, then the first token), so those two are kept inline and
/// only a longer prefix allocates.
#[derive(Debug, Default)]
struct Held {
    first: Option<Bytes>,
    second: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Held {
    fn push_back(&mut self, data: Bytes) {
        if self.first.is_none() && self.second.is_none() && self.rest.is_empty() {
            self.first = Some(data);
        } else if self.second.is_none() && self.rest.is_empty() {
            self.second = Some(data);
        } else {
            self.rest.push_back(data);
        }
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        self.first
            .take()
            .or_else(|| self.second.take())
            .or_else(|| self.rest.pop_front())
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.second.is_none() && self.rest.is_empty()
    }
}

/// Why and how a stream failed.
pub(crate) struct Failure {
    pub(crate) cause: StreamCause,
    /// The in-band error's classification, when the provider sent one.
    pub(crate) classification: Option<Classification>,
    pub(crate) source: Option<Error>,
}

impl Failure {
    pub(crate) fn new(cause: StreamCause) -> Self {
        Self {
            cause,
            classification: None,
            source: None,
        }
    }
}

/// One step of reading the inner body under the guard's timers.
pub(crate) enum Read {
    /// A data chunk, already scanned.
    Data(Bytes),
    /// Trailers.
    Trailers(HeaderMap),
    /// The guard is done reading: the inner body ended, or the stream was over (terminal
    /// marker seen) when it broke or went quiet.
    End,
    /// A timeout or a broken body.
    Fail(Failure),
    /// The `after(duration)` commit point was reached.
    CommitDue,
}

/// What the attempt log needs to record the attempt this stream belongs to.
pub(crate) struct Tracker {
    ctx: RequestContext,
    /// Whether the guard owns the log (then it sets the outcome).
    owner: bool,
    route: RouteName,
    sent: Sent,
    /// Time to the response head.
    latency: Duration,
    /// The classification of the response head.
    head: Classification,
    index: Option<usize>,
    finished: bool,
}

impl Tracker {
    pub(crate) fn new(
        ctx: RequestContext,
        owner: bool,
        route: RouteName,
        sent: Sent,
        latency: Duration,
        head: Classification,
    ) -> Self {
        Self {
            ctx,
            owner,
            route,
            sent,
            latency,
            head,
            index: None,
            finished: false,
        }
    }

    fn log(&self) -> &AttemptLog {
        self.ctx.log()
    }

    /// Records the attempt once (unless a layer nearer the transport did) and returns its index.
    fn record_attempt(&mut self, c: &Classification, error: Option<String>) -> usize {
        if let Some(i) = self.index {
            return i;
        }
        let i = self
            .ctx
            .record(&self.sent, &self.route, Some(self.latency), c, error);
        self.index = Some(i);
        i
    }
}

/// The stream's state, shared by the response future (before the commit point) and the guarded
/// body (after it).
pub(crate) struct Core {
    inner: Option<Body>,
    /// `None` for bodies that are not event streams: they get the byte-level timers only.
    scanner: Option<Scanner>,
    progress: Progress,
    settings: StreamSettings,
    /// When the request was sent: the first-token and total timers run from here.
    started: Instant,
    last_activity: Instant,
    held: Held,
    held_bytes: u64,
    held_trailers: Option<Box<HeaderMap>>,
    delivered: u64,
    /// An in-band error seen in the last chunk; reported after that chunk (rare, so kept out
    /// of line).
    pending: Option<Box<Failure>>,
    done: bool,
    tracker: Tracker,
}

impl Core {
    /// `sse`: for an event stream, the classifier of its in-band errors; `None` for any other
    /// body.
    pub(crate) fn new(
        inner: Body,
        sse: Option<SharedClassifier>,
        settings: StreamSettings,
        started: Instant,
        head_at: Instant,
        tracker: Tracker,
    ) -> Self {
        Self {
            inner: Some(inner),
            scanner: sse.map(Scanner::with_classifier),
            progress: Progress::default(),
            settings,
            started,
            last_activity: head_at,
            held: Held::default(),
            held_bytes: 0,
            held_trailers: None,
            delivered: 0,
            pending: None,
            done: false,
            tracker,
        }
    }

    fn deadline(from: Instant, d: Option<Duration>) -> Option<Instant> {
        // A duration too large for the clock is no deadline at all.
        d.and_then(|d| from.checked_add(d))
    }

    fn commit_at(&self) -> Option<Instant> {
        match (self.settings.commit, self.progress.first_content) {
            (CommitPoint::AfterDuration { duration }, Some(first)) => first.checked_add(duration),
            _ => None,
        }
    }

    /// The earliest deadline still running.
    fn next_deadline(&self, committed: bool) -> Option<Instant> {
        let s = &self.settings;
        let first = if self.progress.first_content.is_none() {
            Self::deadline(self.started, s.first_token_timeout)
        } else {
            None
        };
        [
            first,
            Self::deadline(self.last_activity, s.idle_timeout),
            Self::deadline(self.started, s.total_timeout),
            if committed { None } else { self.commit_at() },
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The deadline that passed, if any: a timeout, or `Err(())` for the commit deadline.
    ///
    /// `idle` is only checked once the inner body had nothing to give: a caller slow to read is
    /// not a silent provider.
    fn expired(
        &self,
        now: Instant,
        committed: bool,
        idle: bool,
    ) -> Option<Result<StreamCause, ()>> {
        let s = &self.settings;
        let passed = |at: Option<Instant>| at.is_some_and(|at| now >= at);
        if self.progress.first_content.is_none()
            && passed(Self::deadline(self.started, s.first_token_timeout))
        {
            return s
                .first_token_timeout
                .map(|d| Ok(StreamCause::FirstTokenTimeout(d)));
        }
        if idle && passed(Self::deadline(self.last_activity, s.idle_timeout)) {
            return s.idle_timeout.map(|d| Ok(StreamCause::IdleTimeout(d)));
        }
        if passed(Self::deadline(self.started, s.total_timeout)) {
            return s.total_timeout.map(|d| Ok(StreamCause::TotalTimeout(d)));
        }
        if !committed && passed(self.commit_at()) {
            return Some(Err(()));
        }
        None
    }

    /// Reads the next step of the inner body, with the timers running.
    pub(crate) fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
        mut sleep: Pin<&mut Sleep>,
        committed: bool,
    ) -> Poll<Read> {
        loop {
            if self.inner.is_none() {
                return Poll::Ready(Read::End);
            }
            let now = Instant::now();
            match self.expired(now, committed, false) {
                Some(Ok(cause)) => return Poll::Ready(self.fail(Failure::new(cause))),
                Some(Err(())) => return Poll::Ready(Read::CommitDue),
                None => {}
            }
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(Read::End);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => {
                        self.on_data(&data, now);
                        return Poll::Ready(Read::Data(data));
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => return Poll::Ready(Read::Trailers(trailers)),
                        Err(_) => continue,
                    },
                },
                Poll::Ready(Some(Err(e))) => {
                    let mut f = Failure::new(StreamCause::Disconnected);
                    f.source = Some(e);
                    return Poll::Ready(self.fail(f));
                }
                Poll::Ready(None) => {
                    self.inner = None;
                    if let Some(scanner) = self.scanner.as_mut() {
                        let progress = &mut self.progress;
                        scanner.finish(&mut |ev| progress.on_event(ev, now));
                    }
                    self.take_in_band_error();
                    return Poll::Ready(Read::End);
                }
                Poll::Pending => {}
            }
            match self.expired(now, committed, true) {
                Some(Ok(cause)) => return Poll::Ready(self.fail(Failure::new(cause))),
                Some(Err(())) => return Poll::Ready(Read::CommitDue),
                None => {}
            }
            let Some(next) = self.next_deadline(committed) else {
                return Poll::Pending;
            };
            // The idle deadline only moves later, so the timer is not re-armed per chunk: a
            // timer that fires early is re-armed here and the loop checks again.
            let current = sleep.deadline();
            if next != current && (next < current || current <= now) {
                sleep.as_mut().reset(next);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Stops reading. Once the terminal marker was seen the answer is whole, so a break or a
    /// silence after it ends the stream as it is instead of failing it.
    fn fail(&mut self, f: Failure) -> Read {
        self.inner = None;
        if self.progress.terminal {
            Read::End
        } else {
            Read::Fail(f)
        }
    }

    fn on_data(&mut self, data: &[u8], now: Instant) {
        self.last_activity = now;
        match self.scanner.as_mut() {
            Some(scanner) => {
                let progress = &mut self.progress;
                scanner.feed(data, &mut |ev| progress.on_event(ev, now));
                self.take_in_band_error();
            }
            None => {
                self.progress.first_content.get_or_insert(now);
            }
        }
    }

    fn take_in_band_error(&mut self) {
        if self.pending.is_some() || self.done {
            return;
        }
        if let Some(c) = self.progress.error.take() {
            let class = c.class.unwrap_or(FailureClass::ServerError);
            let cause = StreamCause::InBandError {
                class,
                error_type: c.error_type.clone().or_else(|| c.error_code.clone()),
            };
            self.pending = Some(Box::new(Failure {
                cause,
                classification: Some(*c),
                source: None,
            }));
            // Nothing after the error event is read.
            self.inner = None;
        }
    }

    /// Holds a chunk back (before the commit point).
    pub(crate) fn hold(&mut self, data: Bytes) {
        self.held_bytes = self.held_bytes.saturating_add(data.len() as u64);
        self.held.push_back(data);
    }

    pub(crate) fn hold_trailers(&mut self, trailers: HeaderMap) {
        self.held_trailers = Some(Box::new(trailers));
    }

    pub(crate) fn take_pending(&mut self) -> Option<Failure> {
        self.pending.take().map(|f| *f)
    }

    /// A policy block seen before the commit point.
    pub(crate) fn blocked(&self) -> Option<&Finish> {
        self.progress.blocked()
    }

    /// Whether the stream may be handed up now.
    pub(crate) fn commit_due(&self, now: Instant) -> bool {
        if self.progress.terminal {
            return true;
        }
        match (self.settings.commit, self.progress.first_content) {
            (_, None) | (CommitPoint::End, _) => false,
            (CommitPoint::AfterBytes { bytes }, Some(_)) => self.held_bytes >= bytes,
            (CommitPoint::AfterDuration { .. }, Some(_)) => {
                self.commit_at().is_some_and(|at| now >= at)
            }
            (_, Some(_)) => true,
        }
    }

    /// Whether more is held back than the policy allows.
    pub(crate) fn buffer_exceeded(&self) -> bool {
        self.held_bytes > self.settings.max_buffer
    }

    pub(crate) fn max_buffer(&self) -> u64 {
        self.settings.max_buffer
    }

    /// Whether the stream ended correctly: with its terminal marker or after a finish reason.
    /// A body that is not an event stream has no marker; its end is its end.
    pub(crate) fn complete(&self) -> bool {
        self.scanner.is_none() || self.progress.terminal || self.progress.finish.is_some()
    }

    fn record(&self, end: StreamEnd) -> StreamRecord {
        StreamRecord {
            time_to_first_token: self
                .progress
                .first_content
                .map(|t| t.saturating_duration_since(self.started)),
            bytes: self.delivered,
            events: self.progress.events,
            duration: Instant::now().saturating_duration_since(self.started),
            end,
            usage: self.progress.usage.usage(),
            malformed_events: self.progress.malformed,
        }
    }

    fn finish(&mut self, end: StreamEnd) {
        if self.tracker.finished {
            return;
        }
        let i = self.commit();
        let record = self.record(end);
        self.tracker.log().set_stream(i, record);
        self.tracker.finished = true;
    }

    /// At the commit point: the attempt is a success as far as the layers above can tell, and
    /// is recorded as one. Returns its index.
    pub(crate) fn commit(&mut self) -> usize {
        if let Some(i) = self.tracker.index {
            return i;
        }
        let head = std::mem::take(&mut self.tracker.head);
        let i = self.tracker.record_attempt(&head, None);
        self.tracker.head = head;
        i
    }

    /// Fails the stream before its commit point: a classified, retryable error; nothing reached
    /// the caller.
    pub(crate) fn fail_before_commit(&mut self, f: Failure) -> Error {
        self.inner = None;
        let class = f.cause.class();
        let mut c = f
            .classification
            .unwrap_or_else(|| Classification::failure(class));
        c.class = Some(class);
        c.status = self.tracker.head.status;
        if c.request_id.is_none() {
            c.request_id = self.tracker.head.request_id.clone();
        }
        self.tracker.record_attempt(&c, Some(f.cause.to_string()));
        self.finish(StreamEnd::FailedBeforeCommit(f.cause.clone()));
        let mut e = Error::new(ErrorKind::StreamFailed { cause: f.cause }).with_classification(c);
        if let Some(source) = f.source {
            e = e.with_source(source);
        }
        self.tracker.ctx.close_error(self.tracker.owner, e)
    }

    /// Fails closed on a policy block before the commit point: not retryable, no other route.
    pub(crate) fn fail_closed(&mut self) -> Error {
        self.inner = None;
        let reason = self.progress.blocked().map(|f| f.reason.clone());
        let mut c = Classification::failure(FailureClass::PolicyBlock);
        c.status = self.tracker.head.status;
        c.request_id = self.tracker.head.request_id.clone();
        c.error_type = reason.clone();
        let cause = StreamCause::InBandError {
            class: FailureClass::PolicyBlock,
            error_type: reason,
        };
        self.tracker.record_attempt(&c, Some(cause.to_string()));
        self.finish(StreamEnd::FailedBeforeCommit(cause));
        let e = Error::new(ErrorKind::FailedClosed {
            class: FailureClass::PolicyBlock,
        })
        .with_classification(c);
        self.tracker.ctx.close_error(self.tracker.owner, e)
    }

    /// Fails the stream after its commit point: the body's last item.
    fn interrupt(&mut self, f: Failure) -> Error {
        self.inner = None;
        self.done = true;
        self.finish(StreamEnd::Interrupted(f.cause.clone()));
        let mut e = Error::new(ErrorKind::StreamInterrupted {
            delivered_bytes: self.delivered,
            cause: f.cause,
        })
        .with_log(self.tracker.log());
        if let Some(source) = f.source {
            e = e.with_source(source);
        }
        // After the commit point every layer above has already answered with the head; what
        // the caller finally got is this error, whoever owns the log.
        self.tracker.log().set_outcome(Outcome::Error {
            error: e.kind().to_string(),
            class: e.class(),
        });
        e
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // The caller let go of the stream (or of the future) before its end.
        self.finish(StreamEnd::Abandoned);
    }
}

pin_project! {
    /// The body of a response handed up at its commit point: the held-back prefix first, then
    /// the rest of the stream, under the idle and total timers. It never ends cleanly unless the
    /// stream did: a failure is its last item, an `ErrorKind::StreamInterrupted` error.
    pub(crate) struct GuardedBody {
        core: Core,
        #[pin]
        sleep: Sleep,
    }
}

impl GuardedBody {
    pub(crate) fn new(core: Core) -> Self {
        let at = core.next_deadline(true).unwrap_or_else(Instant::now);
        Self {
            core,
            sleep: tokio::time::sleep_until(at),
        }
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let mut this = self.project();
        let core: &mut Core = this.core;
        if let Some(data) = core.held.pop_front() {
            core.delivered = core.delivered.saturating_add(data.len() as u64);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = core.held_trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
        }
        if let Some(f) = core.take_pending() {
            return Poll::Ready(Some(Err(core.interrupt(f))));
        }
        if core.done {
            return Poll::Ready(None);
        }
        loop {
            let step = match core.poll_step(cx, this.sleep.as_mut(), true) {
                Poll::Ready(step) => step,
                Poll::Pending => return Poll::Pending,
            };
            return Poll::Ready(match step {
                // An in-band error in this chunk is reported on the next poll, after the chunk.
                Read::Data(data) => {
                    core.delivered = core.delivered.saturating_add(data.len() as u64);
                    Some(Ok(Frame::data(data)))
                }
                Read::Trailers(trailers) => Some(Ok(Frame::trailers(trailers))),
                Read::End => {
                    if let Some(f) = core.take_pending() {
                        Some(Err(core.interrupt(f)))
                    } else if core.complete() {
                        core.done = true;
                        let end = if core.progress.blocked().is_some() {
                            StreamEnd::Blocked
                        } else {
                            StreamEnd::Complete
                        };
                        core.finish(end);
                        None
                    } else {
                        Some(Err(core.interrupt(Failure::new(StreamCause::Truncated))))
                    }
                }
                Read::Fail(f) => Some(Err(core.interrupt(f))),
                // No commit deadline runs after the commit point.
                Read::CommitDue => continue,
            });
        }
    }

    fn is_end_stream(&self) -> bool {
        self.core.done
            && self.core.held.is_empty()
            && self.core.held_trailers.is_none()
            && self.core.pending.is_none()
    }
}
