//! Request replay: retries and fallbacks need a second copy of the request.
//!
//! Try-clone semantics: a body that can be copied (`Full<Bytes>`, `String`, `Empty`) replays; one
//! that cannot (a streaming upload, `hyper::body::Incoming`, a `BoxBody`) means "no retry", which the layers
//! record in the attempt log — never a hard error. Implement [`ReplayBody`] for your own body
//! type to make it replayable.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower_llm_resilience::replay::try_clone_request;
//!
//! let req = http::Request::post("http://localhost/v1/chat/completions")
//!     .body(Full::new(Bytes::from_static(b"{}")))
//!     .unwrap_or_default();
//! let copy = try_clone_request(&req).expect("a `Full` body replays");
//! assert_eq!(copy.uri(), req.uri());
//! ```

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{Empty, Full};

/// A request body that may be copied for another attempt.
pub trait ReplayBody: Sized {
    /// A second copy of the body, or `None` if it cannot be replayed.
    fn try_clone(&self) -> Option<Self>;

    /// The whole body, if it is in memory (used to rewrite the `model` field for a route).
    fn to_bytes(&self) -> Option<Bytes> {
        None
    }

    /// A body of this type holding `bytes`, if the type can be built from bytes.
    fn from_bytes(_bytes: Bytes) -> Option<Self> {
        None
    }
}

impl ReplayBody for Full<Bytes> {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }

    fn to_bytes(&self) -> Option<Bytes> {
        // `Full` yields its one frame at once; polling a copy reads it without waiting.
        let mut copy = self.clone();
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut copy).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().ok(),
            Poll::Ready(None) => Some(Bytes::new()),
            _ => None,
        }
    }

    fn from_bytes(bytes: Bytes) -> Option<Self> {
        Some(Full::new(bytes))
    }
}

impl ReplayBody for Empty<Bytes> {
    fn try_clone(&self) -> Option<Self> {
        Some(*self)
    }

    fn to_bytes(&self) -> Option<Bytes> {
        Some(Bytes::new())
    }
}

impl ReplayBody for String {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }

    fn to_bytes(&self) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(self.as_bytes()))
    }

    fn from_bytes(bytes: Bytes) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

impl ReplayBody for hyper::body::Incoming {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

impl ReplayBody for crate::Body {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

// Boxed bodies hide what they hold, so they cannot be copied: a request with one gets a single
// attempt and `NotReplayable` in its log, instead of failing to compile.
impl<E> ReplayBody for BoxBody<Bytes, E> {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

impl<E> ReplayBody for UnsyncBoxBody<Bytes, E> {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

/// A copy of `req` for another attempt (method, URI, version, headers, extensions and body), or
/// `None` when its body cannot be replayed.
pub fn try_clone_request<B: ReplayBody>(req: &http::Request<B>) -> Option<http::Request<B>> {
    let body = req.body().try_clone()?;
    let mut copy = http::Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_bodies_replay_and_read() {
        let body = Full::new(Bytes::from_static(b"{\"model\":\"a\"}"));
        assert!(body.try_clone().is_some());
        assert_eq!(body.to_bytes().as_deref(), Some(&b"{\"model\":\"a\"}"[..]));
        let rebuilt = Full::<Bytes>::from_bytes(Bytes::from_static(b"x"));
        assert_eq!(
            rebuilt.and_then(|b| b.to_bytes()).as_deref(),
            Some(&b"x"[..])
        );
    }

    #[test]
    fn crate_body_does_not_replay() {
        assert!(crate::Body::from("x").try_clone().is_none());
    }

    #[test]
    fn boxed_bodies_do_not_replay() {
        use http_body_util::BodyExt as _;
        let full = Full::new(Bytes::from_static(b"x"));
        let boxed = full.clone().map_err(|never| match never {}).boxed();
        assert!(ReplayBody::try_clone(&boxed).is_none());
        let unsync = full.map_err(|never| match never {}).boxed_unsync();
        let unsync: UnsyncBoxBody<Bytes, std::convert::Infallible> = unsync;
        assert!(ReplayBody::try_clone(&unsync).is_none());
    }

    #[test]
    fn request_copy_keeps_everything() {
        let mut req = http::Request::post("http://h/v1/chat")
            .header("x-api-key", "k")
            .body(String::from("b"))
            .unwrap_or_else(|e| panic!("{e}"));
        req.extensions_mut()
            .insert(crate::RouteName::new("primary"));
        let copy = try_clone_request(&req).unwrap_or_else(|| panic!("replayable"));
        assert_eq!(copy.uri(), req.uri());
        assert_eq!(copy.headers()["x-api-key"], "k");
        assert_eq!(copy.body(), "b");
        assert!(copy.extensions().get::<crate::RouteName>().is_some());
    }
}
