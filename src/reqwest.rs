//! A [`reqwest::Client`] as the transport under the stack (feature `reqwest`).
//!
//! [`ReqwestService`] makes a `reqwest::Client` a tower
//! `Service<http::Request<B>>` returning `http::Response<reqwest::Body>`, so the crate's layers
//! (or [`ResilienceLayer`](crate::ResilienceLayer)) can sit in front of it like in front of a
//! hyper-util client:
//!
//! - **Request body**: any [`http_body::Body`] whose data converts into [`Bytes`] — the
//!   replayable bodies the stack resends (`Full<Bytes>`, `String`, …) included. It is handed to
//!   reqwest as a stream ([`reqwest::Body::wrap`]), not collected first; its
//!   exact size hint (a `Full<Bytes>` has one) becomes the `content-length`. Because reqwest sees
//!   a stream, it does not resend the body by itself (on a 307/308 redirect, for example):
//!   resending is the job of the retry and fallback layers above, which keep a copy.
//! - **Response body**: reqwest's own [`http_body::Body`] implementation, streamed as it
//!   arrives — the stream guard above sees every SSE event when it comes.
//! - **Errors**: [`reqwest::Error`], source chain intact, so the
//!   [`DefaultClassifier`](crate::classify::DefaultClassifier) sees what happened: a refused or
//!   reset connection is [`Connect`](crate::FailureClass::Connect), a timeout set on the
//!   client (`timeout`, `read_timeout`) is [`Timeout`](crate::FailureClass::Timeout), a body
//!   that broke after the response head is [`Transport`](crate::FailureClass::Transport).
//!   A request whose URI is not absolute fails at once with reqwest's builder error.
//!
//! reqwest is used without default features: no TLS stack is compiled in, which is all a
//! plain-HTTP loopback provider needs. For `https` providers, enable the TLS feature you use in
//! your own `reqwest` dependency (`rustls`, `native-tls`, …); Cargo unifies the features.
//! Timeouts are better left to the policy (deadline, first-token and idle timeouts); a total
//! `timeout` on the client also bounds streamed answers, whatever their length.
//!
//! # Example
//!
//! ```
//! # #[cfg(feature = "testing")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_llm_resilience::reqwest::ReqwestService;
//! use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request};
//! use tower_llm_resilience::{AttemptLog, Policy};
//!
//! // A provider that is overloaded once, then answers.
//! let mock = MockProvider::start().await?;
//! mock.script(
//!     ScriptKey::Any,
//!     [Reply::openai_overloaded(), Reply::openai_chat("gpt-4o", "Hello!")],
//! );
//!
//! let client = ServiceBuilder::new()
//!     .layer(Policy::interactive().layer()?)
//!     .service(ReqwestService::new(reqwest::Client::new()));
//!
//! let response = client.oneshot(chat_request(&mock.url(), "gpt-4o", false)).await?;
//! assert_eq!(response.status(), 200);
//! let log = response.extensions().get::<AttemptLog>().ok_or("no log")?.clone();
//! let body = response.into_body().collect_bytes().await?;
//! assert!(std::str::from_utf8(&body)?.contains("Hello!"));
//! assert_eq!(log.attempt_count(), 2); // the 503, then the answer
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```

#![cfg(feature = "reqwest")]
#![cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::BoxError;

/// A [`reqwest::Client`] as a tower `Service<http::Request<B>>`.
///
/// Cheap to clone (the client is an `Arc` inside); clones share the connection pool. Always
/// ready: reqwest has no backpressure of its own.
///
/// ```
/// use tower_llm_resilience::reqwest::ReqwestService;
///
/// # fn main() -> Result<(), reqwest::Error> {
/// let client = reqwest::Client::builder().pool_max_idle_per_host(8).build()?;
/// let service = ReqwestService::new(client);
/// # drop(service);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ReqwestService {
    client: ::reqwest::Client,
}

impl ReqwestService {
    /// Wraps `client`.
    pub fn new(client: ::reqwest::Client) -> Self {
        Self { client }
    }

    /// The client.
    pub fn get_ref(&self) -> &::reqwest::Client {
        &self.client
    }

    /// The client, mutably.
    pub fn get_mut(&mut self) -> &mut ::reqwest::Client {
        &mut self.client
    }

    /// The client back.
    pub fn into_inner(self) -> ::reqwest::Client {
        self.client
    }
}

impl From<::reqwest::Client> for ReqwestService {
    fn from(client: ::reqwest::Client) -> Self {
        Self::new(client)
    }
}

impl<B> Service<http::Request<B>> for ReqwestService
where
    B: http_body::Body + Send + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<::reqwest::Body>;
    type Error = ::reqwest::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let body = ::reqwest::Body::wrap(SyncBody::new(body));
        let state = match ::reqwest::Request::try_from(http::Request::from_parts(parts, body)) {
            Ok(req) => State::Pending {
                future: Service::call(&mut self.client, req),
            },
            Err(error) => State::Failed { error: Some(error) },
        };
        ResponseFuture { state }
    }
}

type Pending = <::reqwest::Client as Service<::reqwest::Request>>::Future;

pin_project! {
    /// Response future of [`ReqwestService`]: reqwest's own future, not boxed again.
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Pending { #[pin] future: Pending },
        Failed { error: Option<::reqwest::Error> },
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<::reqwest::Body>, ::reqwest::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Pending { future } => future.poll(cx).map_ok(http::Response::from),
            StateProj::Failed { error } => match error.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}

// reqwest wants a `Sync` body; request bodies need not be (the crate's own `Body` is not). The
// mutex is only ever reached through `&mut` (`get_mut`, no locking) except by `size_hint`.
pub(crate) struct SyncBody<B> {
    inner: Mutex<Pin<Box<B>>>,
}

impl<B> SyncBody<B> {
    pub(crate) fn new(body: B) -> Self {
        Self {
            inner: Mutex::new(Box::pin(body)),
        }
    }
}

impl<B> http_body::Body for SyncBody<B>
where
    B: http_body::Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let inner = self
            .get_mut()
            .inner
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        match self.inner.lock() {
            Ok(b) => b.is_end_stream(),
            Err(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.inner.lock() {
            Ok(b) => b.size_hint(),
            Err(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn sync_body_keeps_frames_and_size_hint() {
        let body = SyncBody::new(Full::new(Bytes::from_static(b"hello")));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let bytes = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(bytes.ok().as_deref(), Some(&b"hello"[..]));
    }

    #[tokio::test]
    async fn a_relative_uri_fails_with_a_builder_error() {
        let mut service = ReqwestService::new(::reqwest::Client::new());
        let req = http::Request::new(Full::new(Bytes::new()));
        let err = Service::call(&mut service, req)
            .await
            .err()
            .map(|e| e.is_builder());
        assert_eq!(err, Some(true));
    }
}
