//! The body of an answer that may be kept: passed through untouched, and kept once it ended
//! well.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
use http_body::{Frame, SizeHint};

use super::store::{CacheKey, CacheStore, CachedAnswer};
use crate::{Body, Error};

/// A key this request holds in the store: let go of when dropped, unless filled first.
pub(crate) struct Hold {
    pub(crate) store: Arc<dyn CacheStore>,
    pub(crate) key: CacheKey,
    pub(crate) token: u64,
    pub(crate) request_digest: u64,
    pub(crate) ttl: Duration,
    pub(crate) max_bytes: u64,
    done: bool,
}

impl Hold {
    pub(crate) fn new(
        store: Arc<dyn CacheStore>,
        key: CacheKey,
        token: u64,
        request_digest: u64,
        ttl: Duration,
        max_bytes: u64,
    ) -> Self {
        Self {
            store,
            key,
            token,
            request_digest,
            ttl,
            max_bytes,
            done: false,
        }
    }

    /// Nothing is held after all (the store answered without giving the key).
    pub(crate) fn forget(&mut self) {
        self.done = true;
    }

    fn fill(mut self, answer: CachedAnswer) {
        self.done = true;
        self.store.fill(&self.key, self.token, answer, self.ttl);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.done {
            self.store.release(&self.key, self.token);
        }
    }
}

/// A successful answer's body, read by the caller as it comes; its bytes are kept (up to the
/// bound) and the answer stored only once the body ended without an error. An error, a body
/// dropped early or one above the bound lets go of the key instead.
pub(crate) struct FillBody {
    inner: Body,
    hold: Option<Hold>,
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    kept: BytesMut,
}

impl FillBody {
    pub(crate) fn new(
        inner: Body,
        hold: Hold,
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Self {
        Self {
            inner,
            hold: Some(hold),
            status,
            headers,
            kept: BytesMut::new(),
        }
    }
}

impl FillBody {
    /// The body ended well: the answer is kept.
    fn keep(&mut self) {
        if let Some(hold) = self.hold.take() {
            let answer = CachedAnswer {
                status: self.status,
                headers: std::mem::take(&mut self.headers),
                body: std::mem::take(&mut self.kept).freeze(),
                request_digest: hold.request_digest,
            };
            hold.fill(answer);
        }
    }
}

impl http_body::Body for FillBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(data), Some(hold)) = (f.data_ref(), &this.hold) {
                    if (this.kept.len() + data.len()) as u64 > hold.max_bytes {
                        // Too large to keep: passed on, not kept.
                        this.hold = None;
                        this.kept = BytesMut::new();
                    } else {
                        this.kept.extend_from_slice(data);
                    }
                }
            }
            // A stream cut, a broken body: never kept.
            Some(Err(_)) => this.hold = None,
            None => this.keep(),
        }
        // A reader may stop at the last frame without asking for the end (hyper's server
        // does): the body says it ended, and that is an end.
        if matches!(frame, Some(Ok(_))) && this.inner.is_end_stream() {
            this.keep();
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
