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

use crate::context::RequestContext;

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

/// The copy of a request that later attempts (retries, hops, a continuation) are made from.
///
/// A request usually carries one extension only, its [`RequestContext`]. The copy then leaves
/// the extensions out — copying them would cost a map, its table and a box per value on every
/// request, retried or not — and each attempt made from it gets the context back. A request
/// with other extensions keeps a copy of them all.
#[derive(Debug)]
pub(crate) struct Template<B> {
    req: http::Request<B>,
    /// The request's context, when the copy left the extensions out.
    context: Option<RequestContext>,
}

impl<B: ReplayBody> Template<B> {
    /// A template of `req`, or `None` when its body cannot be replayed.
    pub(crate) fn of(req: &http::Request<B>) -> Option<Self> {
        let body = req.body().try_clone()?;
        let mut copy = http::Request::new(body);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        let context = match RequestContext::of(req) {
            Some(ctx) if req.extensions().len() == 1 => Some(ctx.clone()),
            _ => {
                *copy.extensions_mut() = req.extensions().clone();
                None
            }
        };
        Some(Self { req: copy, context })
    }

    /// The next attempt's request: a copy with every extension the original had.
    pub(crate) fn attempt(&self) -> Option<http::Request<B>> {
        let mut next = try_clone_request(&self.req)?;
        if let Some(ctx) = &self.context {
            next.extensions_mut().insert(ctx.clone());
        }
        Some(next)
    }

    /// The request's method, URI, version, headers and body (its extensions may be left out:
    /// see [`extensions`](Self::extensions)).
    pub(crate) fn request(&self) -> &http::Request<B> {
        &self.req
    }

    /// A copy of every extension the original request had.
    pub(crate) fn extensions(&self) -> http::Extensions {
        let mut ext = self.req.extensions().clone();
        if let Some(ctx) = &self.context {
            ext.insert(ctx.clone());
        }
        ext
    }
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
    fn a_template_gives_every_attempt_the_originals_extensions() {
        #[derive(Clone, Debug, PartialEq)]
        struct Tag(u8);

        let request = || {
            let mut req = http::Request::new(Full::new(Bytes::from_static(b"{}")));
            req.headers_mut()
                .insert("x-key", http::HeaderValue::from_static("v"));
            let (ctx, _) = RequestContext::get_or_insert(&mut req);
            (req, ctx)
        };
        let same = |a: &RequestContext, b: Option<&RequestContext>| {
            b.is_some_and(|b| std::ptr::eq(a.log(), b.log()))
        };

        // Only the context: the copy leaves the extensions out, each attempt gets it back.
        let (req, ctx) = request();
        let template = Template::of(&req).expect("a `Full` body replays");
        assert!(template.request().extensions().is_empty());
        let next = template.attempt().expect("an attempt");
        assert_eq!(next.headers()["x-key"], "v");
        assert!(same(&ctx, RequestContext::of(&next)));
        assert!(same(&ctx, template.extensions().get::<RequestContext>()));

        // Other extensions too: all of them are kept.
        let (mut req, ctx) = request();
        req.extensions_mut().insert(Tag(7));
        let template = Template::of(&req).expect("a `Full` body replays");
        let next = template.attempt().expect("an attempt");
        assert_eq!(next.extensions().get::<Tag>(), Some(&Tag(7)));
        assert!(same(&ctx, RequestContext::of(&next)));
        assert_eq!(template.extensions().get::<Tag>(), Some(&Tag(7)));
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
