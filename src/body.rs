//! The response body every layer returns.

use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

use crate::classify::FailureClass;
use crate::error::{BoxError, Error};

/// The response body of every layer in the crate, like `axum::body::Body`.
///
/// Wraps any [`http_body::Body`] with `Bytes` data; wrapping a `Body` again does not box twice.
/// Its errors are crate [`Error`]s: a stream guarded by `StreamGuardLayer` ends with
/// `ErrorKind::StreamInterrupted` rather than a clean end that would look like success.
pub struct Body(UnsyncBoxBody<Bytes, Error>);

impl Body {
    /// Wraps `body`. A crate `Body` is returned as it is, without boxing again.
    pub fn new<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        match try_downcast::<Body, B>(body) {
            Ok(body) => body,
            Err(body) => Self(body.map_err(into_error).boxed_unsync()),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::new(http_body_util::Empty::<Bytes>::new())
    }

    /// Reads the whole body into memory.
    pub async fn collect_bytes(self) -> Result<Bytes, Error> {
        Ok(self.collect().await?.to_bytes())
    }

    /// Hands back a body whose first bytes were already read (to classify an error response):
    /// `prefix`, then `trailers` or `error` if reading stopped at one, then the rest of `rest`.
    pub(crate) fn replay(
        prefix: Bytes,
        trailers: Option<HeaderMap>,
        error: Option<Error>,
        rest: Option<Body>,
    ) -> Self {
        Self(
            Replay {
                prefix: (!prefix.is_empty()).then_some(prefix),
                trailers,
                error,
                rest,
            }
            .boxed_unsync(),
        )
    }
}

fn into_error(e: impl Into<BoxError>) -> Error {
    Error::from_service_error(e, |_| {
        crate::classify::Classification::failure(FailureClass::Transport)
    })
}

// `Option` lets a value leave a `dyn Any` by `take`; no unsafe needed.
fn try_downcast<T: 'static, K: 'static>(k: K) -> Result<T, K> {
    let mut k = Some(k);
    if let Some(t) = (&mut k as &mut dyn Any).downcast_mut::<Option<T>>() {
        if let Some(t) = t.take() {
            return Ok(t);
        }
    }
    match k {
        Some(k) => Err(k),
        None => unreachable!("the value is only taken on a successful downcast"),
    }
}

impl Default for Body {
    fn default() -> Self {
        Self::empty()
    }
}

impl fmt::Debug for Body {
    // Never print content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Body").finish_non_exhaustive()
    }
}

macro_rules! body_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Body {
            fn from(v: $t) -> Self {
                Self::new(http_body_util::Full::new(Bytes::from(v)))
            }
        }
    )*};
}
body_from!(Bytes, String, &'static str, Vec<u8>, &'static [u8]);

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// An already-read prefix followed by what was not read.
struct Replay {
    prefix: Option<Bytes>,
    trailers: Option<HeaderMap>,
    error: Option<Error>,
    rest: Option<Body>,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(err) = self.error.take() {
            self.rest = None;
            return Poll::Ready(Some(Err(err)));
        }
        if let Some(trailers) = self.trailers.take() {
            self.rest = None;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.error.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        match &self.rest {
            Some(rest) => {
                let h = rest.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + prefix);
                if let Some(u) = h.upper() {
                    out.set_upper(u + prefix);
                }
                out
            }
            None => SizeHint::with_exact(prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[tokio::test]
    async fn wrapping_a_body_again_does_not_box() {
        assert!(try_downcast::<Body, Body>(Body::from("x")).is_ok());
        assert!(try_downcast::<Body, String>(String::new()).is_err());
        let twice = Body::new(Body::new(Body::from("hello")));
        assert_eq!(twice.collect_bytes().await.ok(), Some(Bytes::from("hello")));
    }

    #[tokio::test]
    async fn replay_yields_prefix_then_rest() {
        let b = Body::replay(Bytes::from("ab"), None, None, Some(Body::from("cd")));
        assert_eq!(b.collect_bytes().await.ok(), Some(Bytes::from("abcd")));
    }

    #[tokio::test]
    async fn replay_keeps_the_read_error() {
        let b = Body::replay(
            Bytes::from("ab"),
            None,
            Some(Error::new(ErrorKind::DeadlineExceeded)),
            None,
        );
        let err = b.collect_bytes().await.err().map(|e| e.kind().clone());
        assert_eq!(err, Some(ErrorKind::DeadlineExceeded));
    }
}
