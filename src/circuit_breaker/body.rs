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
/// mid-body), the success is turned into a failure. A clean end or a body dropped early
/// records nothing more, so one request is never counted twice.
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
                    if super::service::counts(&w.shared.config, e) {
                        w.route
                            .body_failed(&w.shared, w.admission, w.epoch, Instant::now());
                    }
                }
            }
            None => this.watch = None,
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
