//! Routes that declare what they can serve: a request that needs more (context, tools,
//! images, JSON mode, a stream) is never sent to them, the primary included. The real
//! hyper-util client against `MockProvider` on loopback.
#![cfg(feature = "testing")]
#![allow(clippy::field_reassign_with_default)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_llm_resilience::attempt_log::LocalEventKind;
use tower_llm_resilience::policy::{Capabilities, RequestNeeds, RouteConfig};
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{AttemptLog, ErrorKind, FailureClass, Policy, ResilienceLayer};

/// The primary (`gpt-4o`, 128 k, no images), a small backup (`small`, 32 k, no tools) and a
/// large one (`large`, 1 M, everything).
fn policy(mock: &MockProvider) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(1);
    let mut primary = Capabilities::default();
    primary.context_tokens = Some(128_000);
    primary.vision = false;
    p.fallback.primary_capabilities = primary;
    let mut small = Capabilities::default();
    small.context_tokens = Some(32_000);
    small.tools = false;
    let mut large = Capabilities::default();
    large.context_tokens = Some(1_000_000);
    p.fallback.routes = vec![
        RouteConfig::new("small")
            .base_url(format!("{}/small", mock.url()))
            .model("small")
            .capabilities(small),
        RouteConfig::new("large")
            .base_url(format!("{}/large", mock.url()))
            .model("large")
            .capabilities(large),
    ];
    p
}

async fn mock() -> MockProvider {
    let mock = MockProvider::start().await.expect("mock starts");
    for model in ["gpt-4o", "small", "large"] {
        mock.script(
            ScriptKey::model(model),
            (0..4).map(|_| Reply::openai_chat(model, "served")),
        );
    }
    mock
}

fn request(base: &str, body: &str) -> http::Request<Full<Bytes>> {
    let mut req = chat_request(base, "gpt-4o", false);
    *req.body_mut() = Full::new(Bytes::from(body.to_owned()));
    req
}

/// The models the provider was asked for, in order.
fn models(mock: &MockProvider) -> Vec<String> {
    mock.requests()
        .into_iter()
        .map(|r| r.model.unwrap_or_default())
        .collect()
}

fn skips(log: &AttemptLog) -> Vec<(String, String)> {
    log.events()
        .into_iter()
        .filter_map(|e| match e.kind {
            LocalEventKind::RouteSkipped { reason } => {
                Some((e.route.map(|r| r.to_string()).unwrap_or_default(), reason))
            }
            _ => None,
        })
        .collect()
}

async fn send(
    mock: &MockProvider,
    req: http::Request<Full<Bytes>>,
) -> (
    Result<http::Response<tower_llm_resilience::Body>, tower_llm_resilience::Error>,
    AttemptLog,
) {
    let mut req = req;
    let log = AttemptLog::new();
    req.extensions_mut().insert(log.clone());
    let svc = ResilienceLayer::new(&policy(mock))
        .expect("valid policy")
        .layer(client());
    (svc.oneshot(req).await, log)
}

#[tokio::test(start_paused = true)]
async fn a_request_with_an_image_skips_a_primary_without_vision() {
    let mock = mock().await;
    let body = r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":[
        {"type":"text","text":"what is this"},{"type":"image_url","image_url":{"url":"data:,"}}]}]}"#;
    let (out, log) = send(&mock, request(&mock.url(), body)).await;
    let resp = out.expect("served");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-llm-route"], "small");
    resp.into_body().collect().await.expect("body");
    assert_eq!(models(&mock), ["small"], "the primary was never called");
    assert_eq!(skips(&log).len(), 1);
    assert_eq!(skips(&log)[0].0, "primary");
    assert!(skips(&log)[0].1.contains("images"), "{:?}", skips(&log));

    // The same request without the image goes to the primary.
    let plain =
        r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let (out, log) = send(&mock, request(&mock.url(), plain)).await;
    assert_eq!(out.expect("served").headers()["x-llm-route"], "primary");
    assert!(skips(&log).is_empty());
    assert_eq!(models(&mock), ["small", "gpt-4o"]);
}

#[tokio::test(start_paused = true)]
async fn a_200k_request_goes_only_to_a_route_with_the_context() {
    let mock = mock().await;
    let body = r#"{"model":"gpt-4o","max_tokens":200000,"messages":[{"role":"user","content":"summarise"}]}"#;
    let (out, log) = send(&mock, request(&mock.url(), body)).await;
    let resp = out.expect("served");
    assert_eq!(resp.headers()["x-llm-route"], "large");
    assert_eq!(models(&mock), ["large"]);
    let skipped: Vec<String> = skips(&log).into_iter().map(|(r, _)| r).collect();
    assert_eq!(skipped, ["primary", "small"]);
}

#[tokio::test(start_paused = true)]
async fn a_request_with_tools_never_reaches_a_route_without_them() {
    let mock = mock().await;
    // The primary fails; the small backup has no tools, so the hop goes to the large one.
    mock.script(
        ScriptKey::model("gpt-4o"),
        [Reply::openai_server_error(), Reply::openai_server_error()],
    );
    let body = r#"{"model":"gpt-4o","max_tokens":100,"tools":[{"type":"function","function":{"name":"f"}}],
        "messages":[{"role":"user","content":"call f"}]}"#;
    let (out, log) = send(&mock, request(&mock.url(), body)).await;
    assert_eq!(out.expect("served").headers()["x-llm-route"], "large");
    assert!(
        !models(&mock).contains(&"small".to_owned()),
        "{:?}",
        models(&mock)
    );
    assert_eq!(models(&mock).last().map(String::as_str), Some("large"));
    assert_eq!(skips(&log).first().map(|s| s.0.as_str()), Some("small"));
}

#[tokio::test(start_paused = true)]
async fn a_request_no_route_can_serve_fails_closed_without_a_call() {
    let mock = mock().await;
    // More than even the large route has.
    let body =
        r#"{"model":"gpt-4o","max_tokens":2000000,"messages":[{"role":"user","content":"x"}]}"#;
    let (out, log) = send(&mock, request(&mock.url(), body)).await;
    let Err(err) = out else {
        panic!("served a request no route can serve")
    };
    assert_eq!(
        err.kind(),
        &ErrorKind::FailedClosed {
            class: FailureClass::InvalidRequest
        }
    );
    assert_eq!(mock.request_count(), 0);
    let skipped: Vec<String> = skips(&log).into_iter().map(|(r, _)| r).collect();
    assert_eq!(skipped, ["primary", "small", "large"]);
}

#[tokio::test(start_paused = true)]
async fn the_callers_stated_needs_are_taken_as_they_are() {
    let mock = mock().await;
    let plain =
        r#"{"model":"gpt-4o","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut req = request(&mock.url(), plain);
    // The caller knows the prompt will carry an image it attaches later in the pipeline.
    req.extensions_mut()
        .insert(RequestNeeds::new(50_000).vision());
    let (out, _) = send(&mock, req).await;
    assert_eq!(out.expect("served").headers()["x-llm-route"], "large");
    assert_eq!(models(&mock), ["large"]);
}
