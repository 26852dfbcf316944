use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

use super::layer::Shared;
use super::state::{Admission, RouteState};
use crate::{Body, Error};

/// What a successful response's body reports back to its route's breaker.
pub(crate) struct Watch {
    pub(crate) shared: Arc<Shared>,
    pub(crate) route: Arc<RouteState>,
    pub(crate) admission: Admission,
    /// The window bucket the head's success went into.
    pub(crate) epoch: Option<u64>,
}

/// The body of a response whose head counted as a success: if the body then fails with an
/// error whose class counts (a stream interrupted after its commit point, a connection lost
/// mid-body), the success is turned into a failure, so one request is never counted twice. A
/// clean end, or a body the caller drops early, resets the consecutive-failure count (which a
/// good head alone does not: a stream that breaks after it must not break the run).
pub(crate) struct WatchedBody {
    inner: Body,
    watch: Option<Watch>,
}

impl WatchedBody {
    pub(crate) fn new(inner: Body, watch: Watch) -> Self {
        Self {
            inner,
            watch: Some(watch),
        }
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        if let Some(w) = self.watch.take() {
            w.route.body_ended(w.admission);
        }
    }
}

impl http_body::Body for WatchedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                if let Some(w) = this.watch.take() {
                    // A failure of a class that does not count (a safety block mid-stream)
                    // leaves the counts as they are.
                    if super::service::counts(&w.shared.config, e) {
                        w.route
                            .body_failed(&w.shared, w.admission, w.epoch, Instant::now());
                    }
                }
            }
            None => {
                if let Some(w) = this.watch.take() {
                    w.route.body_ended(w.admission);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
