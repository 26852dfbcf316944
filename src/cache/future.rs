//! The response future of [`Cache`](super::Cache).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, SET_COOKIE, TRANSFER_ENCODING};
use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::{FillBody, Hold};
use super::layer::Config;
use super::store::{CachedAnswer, Claim};
use crate::attempt_log::LocalEventKind;
use crate::context::RequestContext;
use crate::store::StoreFuture;
use crate::{Body, BoxError, Error, ErrorKind};

/// The header that marks an answer that came from the cache (`hit`) or was kept in it
/// (`miss`, on the first answer).
pub const CACHE_HEADER: HeaderName = HeaderName::from_static("x-llm-cache");

pin_project! {
    /// Response future of [`Cache`](super::Cache).
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        config: Arc<Config>,
        // The claim's key, until the request is sent or answered.
        hold: Option<Hold>,
        held: Option<(S, Request<B>)>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Claiming { claim: StoreFuture<Result<Claim, String>> },
        // Claimed (or the store is away): the held clone is polled ready.
        Readying,
        Calling { #[pin] future: F },
        Done,
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn passing(config: Arc<Config>, future: S::Future) -> Self {
        Self {
            state: State::Calling { future },
            config,
            hold: None,
            held: None,
        }
    }

    pub(crate) fn claiming(
        config: Arc<Config>,
        claim: StoreFuture<Result<Claim, String>>,
        hold: Hold,
        service: S,
        request: Request<B>,
    ) -> Self {
        Self {
            state: State::Claiming { claim },
            config,
            hold: Some(hold),
            held: Some((service, request)),
        }
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Claiming { .. } => "claiming",
            State::Readying => "readying",
            State::Calling { .. } => "calling",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Output = Result<Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let out = match this.state.as_mut().project() {
                StateProj::Claiming { claim } => {
                    let claimed = ready!(Pin::new(claim).poll(cx));
                    let Some((_, request)) = this.held.as_mut() else {
                        panic!("cache ResponseFuture polled after completion");
                    };
                    match claimed {
                        Ok(Claim::Claimed) => {}
                        Ok(Claim::Hit(answer)) => {
                            // Nothing was held: the answer was already there.
                            if let Some(mut hold) = this.hold.take() {
                                hold.forget();
                                let digest = hold.request_digest;
                                this.state.set(State::Done);
                                return Poll::Ready(hit(this.config, request, answer, digest));
                            }
                        }
                        Ok(Claim::Busy) => {
                            if let Some(mut hold) = this.hold.take() {
                                hold.forget();
                            }
                            this.state.set(State::Done);
                            return Poll::Ready(Err(refused(
                                this.config,
                                request,
                                ErrorKind::InFlight,
                            )));
                        }
                        Err(reason) => {
                            // The cache is an optimisation: without its store the request is
                            // answered as if there were none.
                            tracing::warn!(
                                target: "tower_llm_resilience::cache",
                                error = reason.as_str(),
                                "cache store unavailable: answering without it"
                            );
                            if let Some(mut hold) = this.hold.take() {
                                hold.forget();
                            }
                        }
                    }
                    this.state.set(State::Readying);
                    continue;
                }
                StateProj::Readying => {
                    let Some((service, _)) = this.held.as_mut() else {
                        panic!("cache ResponseFuture polled after completion");
                    };
                    match ready!(service.poll_ready(cx)) {
                        Ok(()) => {
                            let Some((mut service, request)) = this.held.take() else {
                                panic!("cache ResponseFuture polled after completion");
                            };
                            let future = service.call(request);
                            this.state.set(State::Calling { future });
                            continue;
                        }
                        // The hold lets go of the key when it is dropped.
                        Err(e) => Err(this.config.classifier.error(e)),
                    }
                }
                StateProj::Calling { future } => match ready!(future.poll(cx)) {
                    Ok(response) => Ok(answered(this.hold.take(), response.map(Body::new))),
                    // The hold lets go of the key when it is dropped.
                    Err(e) => Err(this.config.classifier.error(e)),
                },
                StateProj::Done => panic!("cache ResponseFuture polled after completion"),
            };
            this.hold.take();
            this.state.set(State::Done);
            return Poll::Ready(out);
        }
    }
}

/// The first answer to a key: a success is kept once its body has ended well.
fn answered(hold: Option<Hold>, mut response: Response<Body>) -> Response<Body> {
    let Some(hold) = hold else {
        return response;
    };
    if !response.status().is_success() {
        // Never an error: the hold lets go of the key.
        return response;
    }
    let headers = kept_headers(response.headers());
    let status = response.status();
    response
        .headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static("miss"));
    response.map(|body| Body::new(FillBody::new(body, hold, status, headers)))
}

/// The headers worth keeping: not the hop-by-hop ones, not the length (the body is whole),
/// not cookies.
fn kept_headers(headers: &http::HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(name, _)| {
            ![CONNECTION, TRANSFER_ENCODING, CONTENT_LENGTH, SET_COOKIE].contains(name)
                && name.as_str() != "keep-alive"
                && *name != CACHE_HEADER
        })
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

/// The kept answer, for a request that is the same as the one it answered.
fn hit<B>(
    config: &Config,
    request: &mut Request<B>,
    answer: CachedAnswer,
    digest: u64,
) -> Result<Response<Body>, Error> {
    if answer.request_digest != digest {
        return Err(refused(config, request, ErrorKind::IdempotencyKeyReused));
    }
    let (ctx, owner) = RequestContext::begin(request, &config.logging);
    ctx.log().event(None, LocalEventKind::CacheHit);
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    for (name, value) in answer.headers {
        headers.append(name, value);
    }
    headers.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
    Ok(ctx.close_response(owner, response))
}

fn refused<B>(config: &Config, request: &mut Request<B>, kind: ErrorKind) -> Error {
    let (ctx, owner) = RequestContext::begin(request, &config.logging);
    ctx.close_error(owner, Error::new(kind))
}
