//! The response body the mock writes: a complete body or a scripted event stream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

use super::reply::SseEnd;
use crate::BoxError;

/// Body of every mock response. It is driven by hyper's own polling, so no extra task runs
/// per stream and nothing outlives the connection.
pub(crate) enum MockBody {
    Full(Option<Bytes>),
    Sse(SseBody),
}

pub(crate) struct SseBody {
    events: VecDeque<Bytes>,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    end: SseEnd,
    /// For a cut: the buffered events were given a chance to be flushed.
    yielded: bool,
    /// For a cut: the error was returned.
    failed: bool,
}

impl SseBody {
    pub(crate) fn new(events: Vec<String>, delay: Duration, end: SseEnd) -> Self {
        Self {
            events: events
                .into_iter()
                .map(|mut e| {
                    e.push_str("\n\n");
                    Bytes::from(e)
                })
                .collect(),
            delay,
            sleep: None,
            end,
            yielded: false,
            failed: false,
        }
    }
}

impl http_body::Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            MockBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Sse(sse) => sse.poll_event(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(bytes) => bytes.is_none(),
            MockBody::Sse(sse) => sse.events.is_empty() && sse.end == SseEnd::Clean,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            // Unknown length: hyper sends it chunked, which is what makes a cut observable.
            MockBody::Sse(_) => SizeHint::default(),
        }
    }
}

impl SseBody {
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.events.is_empty() {
            if !self.delay.is_zero() {
                let delay = self.delay;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            return Poll::Ready(self.events.pop_front().map(|e| Ok(Frame::data(e))));
        }
        match self.end {
            SseEnd::Clean => Poll::Ready(None),
            // Never woken: the connection stays open until the client or the mock closes it.
            SseEnd::Stall => Poll::Pending,
            SseEnd::Cut if self.failed => Poll::Ready(None),
            SseEnd::Cut if !self.yielded => {
                // hyper flushes what it buffered when the body is pending; without this pause
                // the events sent just before the cut (even the head) would be lost with the
                // connection. One pause suffices while they fit in the socket's send buffer.
                self.yielded = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            SseEnd::Cut => {
                self.failed = true;
                Poll::Ready(Some(Err("mock provider cut the stream".into())))
            }
        }
    }
}
