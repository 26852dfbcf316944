use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::Body as _;

use super::{Classification, Classifier};
use crate::{Body, Error};

/// Future of [`SharedClassifier::classify_response`](super::SharedClassifier::classify_response):
/// the response with its body intact, and its classification.
pub struct ClassifyResponse {
    classifier: Arc<dyn Classifier>,
    limit: usize,
    /// A crate layer nearer the transport recorded this attempt as a success: nothing to read
    /// or work out again.
    success: bool,
    /// Whether a success is stored in the extensions too (a layer keeps only failures there:
    /// its successes are in the attempt log).
    store_success: bool,
    response: Option<http::Response<Body>>,
    /// The first frame read, kept as it came: a body of one frame (the usual error or JSON
    /// answer) is looked at without a copy.
    first: Option<Bytes>,
    /// Every frame read, once there is more than one.
    buf: BytesMut,
}

impl std::fmt::Debug for ClassifyResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassifyResponse")
            .field("read", &self.read())
            .finish_non_exhaustive()
    }
}

impl ClassifyResponse {
    pub(super) fn new(
        classifier: Arc<dyn Classifier>,
        limit: usize,
        response: http::Response<Body>,
    ) -> Self {
        Self {
            classifier,
            limit,
            success: false,
            store_success: true,
            response: Some(response),
            first: None,
            buf: BytesMut::new(),
        }
    }

    /// Takes the answer as a success without reading it: a crate layer nearer the transport
    /// already classified it (a failure would be in the response extensions).
    pub(crate) fn known_success(mut self) -> Self {
        self.success = true;
        self
    }

    /// Keeps only a failure's classification in the extensions.
    pub(crate) fn failures_only(mut self) -> Self {
        self.store_success = false;
        self
    }

    /// The classification of what has come so far — the head and the part of the body read —
    /// for an answer cut off before its body could be read.
    pub(crate) fn so_far(&self) -> Option<Classification> {
        let response = self.response.as_ref()?;
        if let Some(c) = response.extensions().get::<Classification>() {
            return Some(c.clone());
        }
        let read = match &self.first {
            Some(first) => first.as_ref(),
            None => self.buf.as_ref(),
        };
        let seen = &read[..read.len().min(self.limit)];
        Some(
            self.classifier
                .classify_response(response.status(), response.headers(), seen),
        )
    }

    /// Bytes read so far.
    fn read(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.buf.len()
    }

    fn keep(&mut self, data: Bytes) {
        if self.first.is_none() && self.buf.is_empty() {
            self.first = Some(data);
            return;
        }
        if let Some(first) = self.first.take() {
            self.buf.extend_from_slice(&first);
        }
        self.buf.extend_from_slice(&data);
    }

    fn finish(
        &mut self,
        mut response: http::Response<Body>,
        trailers: Option<HeaderMap>,
        error: Option<Error>,
        ended: bool,
    ) -> (http::Response<Body>, Classification) {
        let prefix: Bytes = match self.first.take() {
            Some(first) => first,
            // Splitting even an empty buffer allocates.
            None if self.buf.is_empty() => Bytes::new(),
            None => self.buf.split().freeze(),
        };
        let seen = &prefix[..prefix.len().min(self.limit)];
        let c = self
            .classifier
            .classify_response(response.status(), response.headers(), seen);
        // Inside the stack a success is recorded in the attempt log by the layer that classified
        // it; storing it too would cost allocations on every answer.
        if self.store_success || !c.is_success() {
            response.extensions_mut().insert(c.clone());
        }
        let response = response.map(|rest| {
            let rest = (!ended && trailers.is_none() && error.is_none()).then_some(rest);
            if prefix.is_empty() && trailers.is_none() && error.is_none() {
                rest.unwrap_or_default()
            } else {
                Body::replay(prefix, trailers, error, rest)
            }
        });
        (response, c)
    }
}

impl Future for ClassifyResponse {
    type Output = (http::Response<Body>, Classification);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(mut response) = this.response.take() else {
            panic!("ClassifyResponse polled after completion");
        };
        if let Some(c) = response.extensions().get::<Classification>() {
            let c = c.clone();
            return Poll::Ready((response, c));
        }
        if this.success {
            let c = Classification::success(response.status());
            return Poll::Ready((response, c));
        }
        if !this
            .classifier
            .wants_body(response.status(), response.headers())
        {
            return Poll::Ready(this.finish(response, None, None, false));
        }
        while this.read() < this.limit && !response.body().is_end_stream() {
            match Pin::new(response.body_mut()).poll_frame(cx) {
                Poll::Pending => {
                    this.response = Some(response);
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.keep(data),
                    Err(frame) => {
                        let trailers = frame.into_trailers().ok();
                        return Poll::Ready(this.finish(response, trailers, None, true));
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(this.finish(response, None, Some(e), true));
                }
                Poll::Ready(None) => return Poll::Ready(this.finish(response, None, None, true)),
            }
        }
        let ended = response.body().is_end_stream();
        Poll::Ready(this.finish(response, None, None, ended))
    }
}
