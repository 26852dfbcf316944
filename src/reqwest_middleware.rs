//! The whole ladder as one [`reqwest_middleware::Middleware`] (feature `reqwest-middleware`).
//!
//! [`ResilienceMiddleware`] runs each request through the crate's stack, built from a
//! [`Policy`], with the rest of the middleware chain below it as the transport:
//!
//! ```text
//! ClientBuilder::new(client)
//!     .with(TracingMiddleware)        runs once per logical request
//!     .with(ResilienceMiddleware)     Budget → Fallback → Retry → CircuitBreaker → StreamGuard
//!     .with(AuthMiddleware)           runs once per attempt (every retry, every route)
//!     .build()                        reqwest sends each attempt
//! ```
//!
//! - **Attempts**: every attempt — a retry, a fallback hop — is one `next.run(..)`, so a
//!   middleware attached after this one (nearer the transport) sees every attempt, with the
//!   attempt's URL and body (a fallback route's base URL and model already applied). Do not put
//!   another retrying middleware (reqwest-retry) in the same chain: the retries would multiply.
//! - **Attempt log**: the response's [`extensions`](reqwest::Response::extensions) carry the
//!   request's [`AttemptLog`]; a failed request's error carries it
//!   ([`Error::attempt_log`]). The log is also put into the middleware
//!   chain's `Extensions`, where a middleware attached before this one finds it after
//!   `next.run(..)` returns, and into each attempt's copy of them, with the attempt's
//!   [`RouteName`](crate::RouteName) and the request's [`RequestContext`], for a middleware below to read.
//! - **Errors**: the crate's [`Error`] becomes [`reqwest_middleware::Error::Middleware`]; the
//!   typed error comes back by downcast (see below). A reqwest error of an attempt is that
//!   error's [`source`](std::error::Error::source), classified as it would be under
//!   [`ReqwestService`](crate::reqwest::ReqwestService) (a refused connect is `connect`, a
//!   client timeout is `timeout`). An error of a middleware below is classified from its source
//!   chain like any transport error. A request that cannot be converted (a URL that is not a
//!   valid URI) fails at once with reqwest's builder error, as
//!   [`reqwest_middleware::Error::Reqwest`].
//! - **Provider error responses**: a 401, or a 503 the ladder gave up on, is handed back as the
//!   provider's response, as reqwest does (call `error_for_status` as usual). With
//!   [`fail_closed_as_error`](ResilienceMiddleware::fail_closed_as_error) it becomes an
//!   [`ErrorKind::FailedClosed`] error instead, with the provider's classification (status,
//!   error type and code, request id) and the log, but without the body.
//! - **Streaming responses**: the body handed back is the crate's guarded [`Body`](crate::Body).
//!   A stream that fails before its commit point is retried like any failure; one cut after it
//!   yields an error from `bytes_stream()` (or `chunk()`, `bytes()`) whose source chain holds
//!   an [`ErrorKind::StreamInterrupted`] error — never a clean end.
//! - **Request bodies**: a body held in memory (`.body(String)`, `.json(..)`) is replayed for
//!   every attempt without a copy. A body built from a stream (`Body::wrap_stream`,
//!   `Body::wrap`) cannot be replayed: the request is sent once, never retried nor moved to
//!   another route, and the log says why (`stop: not_replayable`).
//! - **Timeouts**: a `RequestBuilder::timeout` bounds each attempt (reqwest applies it per
//!   send); the policy's deadline bounds the whole request, waits included.
//!
//! # Recovering the typed error
//!
//! ```
//! # use tower_llm_resilience::{Error, ErrorKind};
//! fn crate_error(error: &reqwest_middleware::Error) -> Option<&Error> {
//!     match error {
//!         reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<Error>(),
//!         reqwest_middleware::Error::Reqwest(_) => None,
//!     }
//! }
//! # let _ = crate_error;
//! ```
//!
//! # Shared state and the stack per request
//!
//! `Middleware::handle` gets the rest of the chain as a borrowed [`Next<'_>`](Next), valid for
//! that one call, and the chain's `Extensions` as `&mut`. So the stack is built per request,
//! around a service that borrows that `Next`: building it is a few `Arc` clones, because every
//! layer keeps its state — circuit breakers, retry budget, rate-limit buckets and queues, spend
//! store, jitter — behind an `Arc` in the [`ResilienceLayer`], and each service it builds
//! shares it. One `ResilienceMiddleware` (and its clones) is one set of breakers and budgets
//! for every request through it; nothing is reset per request. Nothing needs to be `'static`,
//! and no task is spawned.
//!
//! `Next::run` borrows its `Extensions` for as long as the attempt runs, and one `&mut` cannot
//! serve the several attempts of a request, so each attempt gets its own copy of the
//! `Extensions` the request arrived with (an empty map costs nothing to copy). What a middleware
//! below writes into them stays with that attempt.
//!
//! # Example
//!
//! A provider that is overloaded once, then answers; the caller gets the answer and the log.
//!
//! ```
//! # #[cfg(feature = "testing")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use tower_llm_resilience::reqwest_middleware::ResilienceMiddleware;
//! use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey};
//! use tower_llm_resilience::{AttemptLog, Policy};
//!
//! let mock = MockProvider::start().await?;
//! mock.script(
//!     ScriptKey::Any,
//!     [Reply::openai_overloaded(), Reply::openai_chat("gpt-4o", "Hello!")],
//! );
//!
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(ResilienceMiddleware::new(&Policy::interactive())?)
//!     .build();
//!
//! let response = client
//!     .post(format!("{}/v1/chat/completions", mock.url()))
//!     .header("content-type", "application/json")
//!     .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#)
//!     .send()
//!     .await?;
//!
//! assert_eq!(response.status(), 200);
//! let log = response.extensions().get::<AttemptLog>().cloned().ok_or("no log")?;
//! assert_eq!(log.attempt_count(), 2); // the 503, then the answer
//! assert!(response.text().await?.contains("Hello!"));
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "testing"))]
//! # fn main() {}
//! ```

#![cfg(feature = "reqwest-middleware")]
#![cfg_attr(docsrs, doc(cfg(feature = "reqwest-middleware")))]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use ::reqwest_middleware::{Middleware, Next};
use bytes::Bytes;
use http::Extensions;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::classify::Classification;
use crate::context::RequestContext;
use crate::replay::ReplayBody;
use crate::reqwest::SyncBody;
use crate::{
    AttemptLog, BoxError, Error, ErrorKind, Policy, PolicyError, ResilienceLayer, Resilient,
};

/// The crate's stack as a [`reqwest_middleware::Middleware`]: add it with
/// `ClientBuilder::with`.
///
/// Cheap to clone; clones share one set of breakers, budgets and rate limits (see the
/// [module docs](self)).
///
/// ```
/// use tower_llm_resilience::Policy;
/// use tower_llm_resilience::reqwest_middleware::ResilienceMiddleware;
///
/// # fn main() -> Result<(), tower_llm_resilience::PolicyError> {
/// let middleware = ResilienceMiddleware::new(&Policy::interactive())?;
/// let breakers = middleware.layer().circuit_breaker(); // inspect or force the breakers
///
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(middleware)
///     .build();
/// # drop((client, breakers));
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ResilienceMiddleware {
    layer: ResilienceLayer,
    fail_closed_as_error: bool,
}

impl ResilienceMiddleware {
    /// Validates `policy` and builds the stack's layers from it ([`ResilienceLayer::new`]).
    ///
    /// ```
    /// use tower_llm_resilience::Policy;
    /// use tower_llm_resilience::reqwest_middleware::ResilienceMiddleware;
    ///
    /// let mut policy = Policy::interactive();
    /// policy.retry.max_attempts = 0;
    /// let error = ResilienceMiddleware::new(&policy).unwrap_err();
    /// assert_eq!(error.field(), "retry.max_attempts");
    /// ```
    pub fn new(policy: &Policy) -> Result<Self, PolicyError> {
        Ok(Self::from_layer(ResilienceLayer::new(policy)?))
    }

    /// Runs requests through `layer`'s stack, sharing its state with every service it built
    /// or will build.
    ///
    /// ```
    /// use tower_llm_resilience::Policy;
    /// use tower_llm_resilience::reqwest_middleware::ResilienceMiddleware;
    ///
    /// # fn main() -> Result<(), tower_llm_resilience::PolicyError> {
    /// let layer = Policy::interactive().layer()?;
    /// // The same breakers for a tower client built from `layer` and for this middleware.
    /// let middleware = ResilienceMiddleware::from_layer(layer.clone());
    /// # drop(middleware);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_layer(layer: ResilienceLayer) -> Self {
        Self {
            layer,
            fail_closed_as_error: false,
        }
    }

    /// With `true`, a provider error response the ladder hands back — a bad key, an invalid
    /// request, a 503 after the last retry — becomes an [`ErrorKind::FailedClosed`] error of
    /// its class, carrying the provider's [`Classification`] and the attempt log; the body is
    /// dropped. Off by default: the response comes back as the provider sent it.
    ///
    /// ```
    /// # #[cfg(feature = "testing")]
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// use tower_llm_resilience::reqwest_middleware::ResilienceMiddleware;
    /// use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey};
    /// use tower_llm_resilience::{Error, ErrorKind, FailureClass, Policy};
    ///
    /// let mock = MockProvider::start().await?;
    /// mock.script(ScriptKey::Any, [Reply::unauthorized()]);
    /// let middleware = ResilienceMiddleware::new(&Policy::interactive())?.fail_closed_as_error(true);
    /// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
    ///     .with(middleware)
    ///     .build();
    ///
    /// let result = client.post(format!("{}/v1/chat/completions", mock.url())).send().await;
    /// let Err(reqwest_middleware::Error::Middleware(error)) = result else {
    ///     return Err("expected a middleware error".into());
    /// };
    /// let error = error.downcast_ref::<Error>().ok_or("not a crate error")?;
    /// assert_eq!(error.kind(), &ErrorKind::FailedClosed { class: FailureClass::Auth });
    /// assert_eq!(error.attempt_log().map(|log| log.attempt_count()), Some(1));
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "testing"))]
    /// # fn main() {}
    /// ```
    pub fn fail_closed_as_error(mut self, on: bool) -> Self {
        self.fail_closed_as_error = on;
        self
    }

    /// The stack's layer: its handles (circuit breakers, spend cap, retry budget).
    ///
    /// ```
    /// use tower_llm_resilience::Policy;
    /// use tower_llm_resilience::circuit_breaker::CircuitState;
    /// use tower_llm_resilience::reqwest_middleware::ResilienceMiddleware;
    ///
    /// # fn main() -> Result<(), tower_llm_resilience::PolicyError> {
    /// let middleware = ResilienceMiddleware::new(&Policy::interactive())?;
    /// let breakers = middleware.layer().circuit_breaker();
    /// breakers.force_open("primary"); // every request through `middleware` now fails fast
    /// assert_eq!(breakers.state("primary"), CircuitState::ForcedOpen);
    /// # Ok(())
    /// # }
    /// ```
    pub fn layer(&self) -> &ResilienceLayer {
        &self.layer
    }

    /// The stack's layer back, its state intact.
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_llm_resilience::Policy;
    /// use tower_llm_resilience::reqwest_middleware::ResilienceMiddleware;
    ///
    /// # fn main() -> Result<(), tower_llm_resilience::PolicyError> {
    /// let middleware = ResilienceMiddleware::new(&Policy::interactive())?;
    /// // A tower client sharing the middleware's breakers and budgets.
    /// # let client = tower::service_fn(|_req: http::Request<String>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// # });
    /// let service = ServiceBuilder::new()
    ///     .layer(middleware.clone().into_inner())
    ///     .service(client);
    /// # drop(service);
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_inner(self) -> ResilienceLayer {
        self.layer
    }
}

impl From<ResilienceLayer> for ResilienceMiddleware {
    fn from(layer: ResilienceLayer) -> Self {
        Self::from_layer(layer)
    }
}

// The expanded form of the trait's `#[async_trait]` method: the future is the named
// `HandleFuture` below, boxed once as the trait demands.
impl Middleware for ResilienceMiddleware {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        req: ::reqwest::Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> Pin<
        Box<
            dyn Future<Output = ::reqwest_middleware::Result<::reqwest::Response>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        let request = match http::Request::<::reqwest::Body>::try_from(req) {
            Ok(request) => request.map(RequestBody::new),
            Err(error) => return Box::pin(std::future::ready(Err(error.into()))),
        };
        let service = self.layer.layer(NextService {
            next,
            extensions: extensions.clone(),
        });
        Box::pin(HandleFuture {
            state: State::NotReady {
                service,
                request: Some(request),
            },
            extensions,
            fail_closed_as_error: self.fail_closed_as_error,
        })
    }
}

type Stack<'a> = Resilient<NextService<'a>>;
type StackFuture<'a> = <Stack<'a> as Service<http::Request<RequestBody>>>::Future;

pin_project! {
    /// One request through the stack: readiness, the call, then the response for reqwest.
    struct HandleFuture<'a> {
        #[pin]
        state: State<'a>,
        extensions: &'a mut Extensions,
        fail_closed_as_error: bool,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<'a> {
        NotReady { service: Stack<'a>, request: Option<http::Request<RequestBody>> },
        Called { #[pin] future: StackFuture<'a> },
    }
}

impl Future for HandleFuture<'_> {
    type Output = ::reqwest_middleware::Result<::reqwest::Response>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = loop {
            match this.state.as_mut().project() {
                StateProj::NotReady { service, request } => {
                    if let Err(error) = ready!(service.poll_ready(cx)) {
                        break Err(error);
                    }
                    let Some(request) = request.take() else {
                        unreachable!("the request is taken only where the state becomes `Called`")
                    };
                    let future = service.call(request);
                    this.state.set(State::Called { future });
                }
                StateProj::Called { future } => break ready!(future.poll(cx)),
            }
        };
        Poll::Ready(finish(result, this.extensions, *this.fail_closed_as_error))
    }
}

/// The stack's answer as reqwest-middleware's; the log goes into the chain's extensions.
fn finish(
    result: Result<http::Response<crate::Body>, Error>,
    extensions: &mut Extensions,
    fail_closed_as_error: bool,
) -> ::reqwest_middleware::Result<::reqwest::Response> {
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            if let Some(log) = error.attempt_log() {
                extensions.insert(log.clone());
            }
            return Err(::reqwest_middleware::Error::middleware(error));
        }
    };
    let log = response.extensions().get::<AttemptLog>().cloned();
    if let Some(log) = &log {
        extensions.insert(log.clone());
    }
    if fail_closed_as_error && !response.status().is_success() {
        let classification = response.extensions().get::<Classification>();
        if let Some((class, c)) = classification.and_then(|c| Some((c.class?, c))) {
            let mut error =
                Error::new(ErrorKind::FailedClosed { class }).with_classification(c.clone());
            if let Some(log) = &log {
                error = error.with_log(log);
            }
            return Err(::reqwest_middleware::Error::middleware(error));
        }
    }
    Ok(::reqwest::Response::from(
        response.map(|body| ::reqwest::Body::wrap(SyncBody::new(body))),
    ))
}

/// The rest of the middleware chain as the stack's transport: one `next.run(..)` per attempt.
#[derive(Clone)]
struct NextService<'a> {
    next: Next<'a>,
    /// The chain's extensions as the request arrived; each attempt runs with a copy.
    extensions: Extensions,
}

impl<'a> Service<http::Request<RequestBody>> for NextService<'a> {
    type Response = http::Response<::reqwest::Body>;
    type Error = BoxError;
    // `Next::run` returns a boxed future that borrows the attempt's extensions for as long as
    // it runs, so the extensions must live in a future around it: an async block, boxed to be
    // named here.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send + 'a>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // reqwest-middleware has no readiness: every middleware is called when a request comes.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<RequestBody>) -> Self::Future {
        let mut extensions = self.extensions.clone();
        if let Some(ctx) = RequestContext::of(&req) {
            if let Some(route) = ctx.route() {
                extensions.insert(route);
            }
            extensions.insert(ctx.log().clone());
            extensions.insert(ctx.clone());
        }
        let next = self.next.clone();
        Box::pin(async move {
            let req = ::reqwest::Request::try_from(req.map(RequestBody::into_reqwest))?;
            let response = next
                .run(req, &mut extensions)
                .await
                .map_err(from_chain_error)?;
            Ok(into_http(response))
        })
    }
}

impl fmt::Debug for NextService<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NextService").finish_non_exhaustive()
    }
}

/// A chain error as the stack's inner error: reqwest's own error as it is (so it classifies as
/// under `ReqwestService`), a crate error passed through, anything else boxed.
fn from_chain_error(error: ::reqwest_middleware::Error) -> BoxError {
    match error {
        ::reqwest_middleware::Error::Reqwest(e) => Box::new(e),
        ::reqwest_middleware::Error::Middleware(e) => match e.downcast::<Error>() {
            Ok(e) => Box::new(e),
            Err(e) => e.into(),
        },
    }
}

/// reqwest's response as an `http::Response`, keeping its URL (the plain conversion drops it).
fn into_http(response: ::reqwest::Response) -> http::Response<::reqwest::Body> {
    use ::reqwest::ResponseBuilderExt as _;
    let url = response.url().clone();
    let mut response = http::Response::from(response);
    if let Ok(carrier) = http::Response::builder().url(url).body(()) {
        response
            .extensions_mut()
            .extend(carrier.into_parts().0.extensions);
    }
    response
}

/// The request body inside the stack: bytes in memory (replayed for every attempt) or a stream
/// (sent once).
enum RequestBody {
    Bytes(Bytes),
    Stream(::reqwest::Body),
}

impl RequestBody {
    fn new(body: ::reqwest::Body) -> Self {
        // reqwest does not hand out its bytes; one copy per request, none per attempt.
        match body.as_bytes() {
            Some(bytes) => Self::Bytes(Bytes::copy_from_slice(bytes)),
            None => Self::Stream(body),
        }
    }

    fn into_reqwest(self) -> ::reqwest::Body {
        match self {
            // An in-memory reqwest body: a middleware below can still read or clone it.
            Self::Bytes(bytes) => ::reqwest::Body::from(bytes),
            Self::Stream(body) => body,
        }
    }
}

impl ReplayBody for RequestBody {
    fn try_clone(&self) -> Option<Self> {
        match self {
            Self::Bytes(bytes) => Some(Self::Bytes(bytes.clone())),
            Self::Stream(_) => None,
        }
    }

    fn to_bytes(&self) -> Option<Bytes> {
        match self {
            Self::Bytes(bytes) => Some(bytes.clone()),
            Self::Stream(_) => None,
        }
    }

    fn from_bytes(bytes: Bytes) -> Option<Self> {
        Some(Self::Bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_bodies_replay_and_streams_do_not() {
        let body = RequestBody::new(::reqwest::Body::from("{\"model\":\"a\"}"));
        let copy = body.try_clone().map(|b| b.to_bytes());
        assert_eq!(copy, Some(Some(Bytes::from_static(b"{\"model\":\"a\"}"))));
        assert_eq!(
            body.into_reqwest().as_bytes(),
            Some(&b"{\"model\":\"a\"}"[..])
        );

        let stream = RequestBody::new(::reqwest::Body::wrap(String::from("x")));
        assert!(stream.try_clone().is_none());
        assert!(stream.to_bytes().is_none());
    }

    #[test]
    fn the_middleware_is_send_sync_and_static() {
        fn assert_middleware<M: Middleware>() {}
        assert_middleware::<ResilienceMiddleware>();
    }
}
