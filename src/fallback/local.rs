//! In-process routes: a route served by a tower service of the application's own — a
//! rule-based responder, a cache, a local model's client — instead of a URL.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use crate::{Body, BoxError};

/// The future of an in-process route's answer. Boxed: the route's service is erased so that
/// one layer holds routes of any type (the call is local, its allocation is not the cost).
pub(crate) type LocalFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// An in-process route's service, erased.
#[derive(Clone)]
pub(crate) struct LocalRoute(Arc<dyn Fn(Request<Bytes>) -> LocalFuture + Send + Sync>);

impl LocalRoute {
    pub(crate) fn new<S, RB>(service: S) -> Self
    where
        S: Service<Request<Bytes>, Response = Response<RB>> + Clone + Send + Sync + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        Self(Arc::new(move |req| {
            let mut service = service.clone();
            Box::pin(async move {
                poll_fn(|cx| service.poll_ready(cx))
                    .await
                    .map_err(Into::into)?;
                let response = service.call(req).await.map_err(Into::into)?;
                Ok(response.map(Body::new))
            })
        }))
    }

    pub(crate) fn call(&self, req: Request<Bytes>) -> LocalFuture {
        (self.0)(req)
    }
}

impl fmt::Debug for LocalRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LocalRoute")
    }
}
