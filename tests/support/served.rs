//! A request sent through a stack and read to its end: the route that served it and its log.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_llm_resilience::AttemptLog;

/// Sends `req` through `svc` and reads the answer to its end: the route that served it (its
/// `x-llm-route` header) and the request's attempt log, as the response carries it.
pub async fn served<S>(svc: &mut S, req: http::Request<Full<Bytes>>) -> (String, AttemptLog)
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<tower_llm_resilience::Body>,
            Error = tower_llm_resilience::Error,
        >,
{
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("served");
    let route = resp.headers()["x-llm-route"]
        .to_str()
        .expect("ascii")
        .to_owned();
    // The stack's own log: with a caller's log in the request the stack would not own the
    // log, and would leave the request's metrics to the caller.
    let log = resp
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .expect("an attempt log");
    resp.into_body().collect().await.expect("body");
    (route, log)
}
