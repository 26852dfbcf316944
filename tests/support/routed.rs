//! Requests to a named route, sent through a service and read to their end.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_llm_resilience::testing::chat_request;
use tower_llm_resilience::{Body, Error, RouteName};

/// A non-streamed chat request to `base` for `model`, on route `route`.
pub fn routed(base: &str, model: &str, route: &str) -> Request<Full<Bytes>> {
    let mut r = chat_request(base, model, false);
    r.extensions_mut().insert(RouteName::new(route));
    r
}

/// Sends, reads the body; the status or the error.
pub async fn send<S>(svc: &mut S, req: Request<Full<Bytes>>) -> Result<u16, Error>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
{
    let r = svc.ready().await?.call(req).await?;
    let status = r.status().as_u16();
    r.into_body().collect().await?;
    Ok(status)
}
