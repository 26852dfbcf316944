//! FallbackLayer end to end: real HTTP on loopback against `MockProvider`.

#![cfg(feature = "testing")]

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use std::time::Duration;
use tower::{Layer, ServiceExt};
use tower_llm_resilience::attempt_log::{Decision, LocalEventKind, LogSnapshot, StopReason};
use tower_llm_resilience::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_llm_resilience::fallback::{Fallback, FallbackLayer, LAST_RESORT_HEADER, ROUTE_HEADER};
use tower_llm_resilience::policy::{FallbackPolicy, Policy, RouteConfig, StaticResponse};
use tower_llm_resilience::retry::RetryLayer;
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};

use tower_llm_resilience::policy::RetryBudgetPolicy;
use tower_llm_resilience::{AttemptLog, Body, BoxError, FailureClass, RetryBudget, RouteName};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

const PRIMARY_MODEL: &str = "gpt-4o";

fn route(mock: &MockProvider, name: &str) -> RouteConfig {
    RouteConfig::new(name)
        .base_url(format!("{}/{name}/v1", mock.url()))
        .model(format!("{name}-model"))
}

fn chain(routes: Vec<RouteConfig>) -> FallbackPolicy {
    let mut p = FallbackPolicy::default();
    p.max_hops = 5;
    p.max_total_attempts = 10;
    p.routes = routes;
    p
}

fn stack(policy: FallbackPolicy) -> Result<Fallback<Client>, BoxError> {
    Ok(FallbackLayer::new(policy)?.layer(testing::client()))
}

async fn send(
    policy: FallbackPolicy,
    mock: &MockProvider,
) -> Result<(Response<Body>, LogSnapshot), BoxError> {
    let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
    let response = stack(policy)?.oneshot(request).await?;
    let log = snapshot(&response)?;
    Ok((response, log))
}

/// The attempt log a response carries, as it stands.
fn snapshot(response: &Response<Body>) -> Result<LogSnapshot, BoxError> {
    Ok(response
        .extensions()
        .get::<AttemptLog>()
        .ok_or("the response carries the log")?
        .snapshot())
}

async fn json(response: Response<Body>) -> Result<serde_json::Value, BoxError> {
    let bytes = response.into_body().collect_bytes().await?;
    Ok(serde_json::from_slice(&bytes)?)
}

async fn text(response: Response<Body>) -> Result<String, BoxError> {
    let bytes = response.into_body().collect_bytes().await?;
    Ok(String::from_utf8(bytes.to_vec())?)
}

/// (path, model) of every request the provider received.
fn received(mock: &MockProvider) -> Vec<(String, Option<String>)> {
    mock.requests()
        .into_iter()
        .map(|r| (r.path, r.model))
        .collect()
}

fn at(path: &str, model: &str) -> (String, Option<String>) {
    (path.to_owned(), Some(model.to_owned()))
}

const PRIMARY_PATH: &str = "/v1/chat/completions";

fn routes_tried(log: &LogSnapshot) -> Vec<&str> {
    log.attempts
        .iter()
        .map(|a| a.route.as_ref().map_or("-", RouteName::as_str))
        .collect()
}

/// The backup's scripted answer: `openai_chat` reports 9 prompt tokens and one completion
/// token per word of its text.
const BACKUP_TEXT: &str = "Served by the backup";

fn backup_usage() -> serde_json::Value {
    serde_json::json!({"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})
}

/// The two chain shapes every "never switch" and "open circuit" scenario runs over: primary +
/// one backup, and primary + two backups.
fn chain_shapes(mock: &MockProvider) -> [Vec<RouteConfig>; 2] {
    [
        vec![route(mock, "backup")],
        vec![route(mock, "backup"), route(mock, "backup2")],
    ]
}

#[tokio::test]
async fn a_persistent_503_switches_to_the_backup() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_overloaded()],
    );
    mock.script(
        ScriptKey::model("backup-model"),
        [Reply::openai_chat("backup-model", BACKUP_TEXT)],
    );
    let (response, log) = send(chain(vec![route(&mock, "backup")]), &mock).await?;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[ROUTE_HEADER], "backup");
    assert_eq!(
        response.extensions().get::<RouteName>(),
        Some(&RouteName::new("backup"))
    );
    assert_eq!(
        received(&mock),
        [
            at(PRIMARY_PATH, PRIMARY_MODEL),
            at("/backup/v1/chat/completions", "backup-model")
        ]
    );
    assert_eq!(log.requested_route, Some("primary".into()));
    assert_eq!(log.selected_route, Some("backup".into()));
    assert_eq!(routes_tried(&log), ["primary", "backup"]);
    assert_eq!(log.attempts[0].status, Some(503));
    assert_eq!(log.attempts[0].class, Some(FailureClass::Overloaded));
    assert_eq!(
        log.attempts[0].decisions,
        [Decision::Fallback {
            to: "backup".into()
        }]
    );
    assert_eq!(log.attempts[1].status, Some(200));

    // The answer is the backup's: its model and its usage.
    let body = json(response).await?;
    assert_eq!(body["model"], "backup-model");
    assert_eq!(body["choices"][0]["message"]["content"], BACKUP_TEXT);
    assert_eq!(body["usage"], backup_usage());
    Ok(())
}

#[tokio::test]
async fn three_routes_go_on_until_one_serves() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::anthropic_overloaded()],
    );
    mock.script(ScriptKey::model("b1-model"), [Reply::openai_server_error()]);
    mock.script(
        ScriptKey::model("b2-model"),
        [Reply::anthropic_message("b2-model", "hello")],
    );
    let policy = chain(vec![route(&mock, "b1"), route(&mock, "b2")]);
    let (response, log) = send(policy, &mock).await?;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[ROUTE_HEADER], "b2");
    assert_eq!(
        received(&mock),
        [
            at(PRIMARY_PATH, PRIMARY_MODEL),
            at("/b1/v1/chat/completions", "b1-model"),
            at("/b2/v1/chat/completions", "b2-model"),
        ]
    );
    assert_eq!(routes_tried(&log), ["primary", "b1", "b2"]);
    assert_eq!(log.attempts[0].class, Some(FailureClass::Overloaded));
    assert_eq!(log.attempts[1].class, Some(FailureClass::ServerError));
    assert_eq!(log.selected_route, Some("b2".into()));
    let body = json(response).await?;
    assert_eq!(body["model"], "b2-model");
    // `anthropic_message`: 9 input tokens, one output token per word of "hello".
    assert_eq!(
        body["usage"],
        serde_json::json!({"input_tokens": 9, "output_tokens": 1})
    );
    Ok(())
}

#[tokio::test]
async fn a_refused_connection_switches_to_the_backup() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    // A loopback port nobody listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?
    };
    let request = testing::chat_request(&format!("http://{closed}"), PRIMARY_MODEL, false);
    let response = stack(chain(vec![route(&mock, "backup")]))?
        .oneshot(request)
        .await?;
    assert_eq!(response.status(), 200);
    let log = snapshot(&response)?;
    assert_eq!(routes_tried(&log), ["primary", "backup"]);
    assert!(log.attempts[0].error.is_some());
    assert_eq!(log.attempts[0].status, None);
    assert_eq!(
        received(&mock),
        [at("/backup/v1/chat/completions", "backup-model")]
    );
    Ok(())
}

/// Over chains of two and three routes with the primary answering `reply`: the caller gets the
/// primary's own `status`, no backup is ever called, and the log says no route is approved for
/// `class`. The provider's error bodies, one per chain.
async fn never_switches(
    reply: &Reply,
    status: u16,
    class: FailureClass,
) -> Result<Vec<serde_json::Value>, BoxError> {
    let mut bodies = Vec::new();
    for shape in 0..2 {
        let mock = MockProvider::start().await?;
        mock.script(ScriptKey::model(PRIMARY_MODEL), [reply.clone()]);
        let [two, three] = chain_shapes(&mock);
        let routes = if shape == 0 { two } else { three };
        let backups = routes.len();
        let (response, log) = send(chain(routes), &mock).await?;
        assert_eq!(response.status(), status, "{backups} backups");
        assert_eq!(response.headers()[ROUTE_HEADER], "primary");
        // No backup is ever called: the provider saw the primary's request alone.
        assert_eq!(
            received(&mock),
            [at(PRIMARY_PATH, PRIMARY_MODEL)],
            "{backups} backups"
        );
        assert_eq!(routes_tried(&log), ["primary"]);
        assert_eq!(log.attempts[0].class, Some(class));
        assert_eq!(
            log.attempts[0].decisions,
            [Decision::Stop(StopReason::NoApprovedRoute)]
        );
        assert_eq!(log.selected_route, Some("primary".into()));
        // The provider's own error body reaches the caller intact.
        bodies.push(json(response).await?);
    }
    Ok(bodies)
}

#[tokio::test]
async fn auth_failures_never_switch() -> Result<(), BoxError> {
    for (reply, status) in [(Reply::unauthorized(), 401), (Reply::forbidden(), 403)] {
        for body in never_switches(&reply, status, FailureClass::Auth).await? {
            assert!(body["error"].is_object(), "{body}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn content_filters_never_switch() -> Result<(), BoxError> {
    for (reply, code) in [
        (Reply::openai_content_policy(), "content_policy_violation"),
        (Reply::azure_content_filter(), "content_filter"),
    ] {
        for body in never_switches(&reply, 400, FailureClass::PolicyBlock).await? {
            assert_eq!(body["error"]["code"], code);
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_context_overflow_goes_only_to_the_larger_context_route() -> Result<(), BoxError> {
    for reply in [
        Reply::openai_context_length(),
        Reply::anthropic_prompt_too_long(),
    ] {
        let mock = MockProvider::start().await?;
        mock.script(ScriptKey::model(PRIMARY_MODEL), [reply]);
        let policy = chain(vec![
            route(&mock, "same-size"),
            route(&mock, "large").larger_context(),
        ]);
        let (response, log) = send(policy, &mock).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[ROUTE_HEADER], "large");
        assert_eq!(
            received(&mock),
            [
                at(PRIMARY_PATH, PRIMARY_MODEL),
                at("/large/v1/chat/completions", "large-model")
            ]
        );
        assert_eq!(log.attempts[0].class, Some(FailureClass::ContextOverflow));
    }

    // No larger-context route: fail closed with the provider's answer.
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_context_length()],
    );
    let (response, log) = send(chain(vec![route(&mock, "same-size")]), &mock).await?;
    assert_eq!(response.status(), 400);
    assert_eq!(received(&mock), [at(PRIMARY_PATH, PRIMARY_MODEL)]);
    assert_eq!(
        log.attempts[0].decisions,
        [Decision::Stop(StopReason::NoApprovedRoute)]
    );
    assert!(text(response).await?.contains("context_length_exceeded"));
    Ok(())
}

fn owned_chain(mock: &MockProvider, approved: &[&str]) -> FallbackPolicy {
    let mut policy = chain(vec![
        route(mock, "same-owner").budget_owner("team-a"),
        route(mock, "other-owner").budget_owner("team-b"),
    ]);
    policy.primary_budget_owner = Some("team-a".into());
    policy.approved_budget_owners = approved.iter().map(|s| (*s).to_owned()).collect();
    policy
}

#[tokio::test]
async fn exhausted_quota_goes_only_to_an_approved_owner_route() -> Result<(), BoxError> {
    for reply in [
        Reply::openai_insufficient_quota(),
        Reply::anthropic_spend_limit(),
        Reply::anthropic_billing(),
    ] {
        let mock = MockProvider::start().await?;
        mock.script(ScriptKey::model(PRIMARY_MODEL), [reply]);
        let (response, log) = send(owned_chain(&mock, &["team-a", "team-b"]), &mock).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[ROUTE_HEADER], "other-owner");
        // `same-owner` spends the budget that is exhausted.
        assert_eq!(
            received(&mock),
            [
                at(PRIMARY_PATH, PRIMARY_MODEL),
                at("/other-owner/v1/chat/completions", "other-owner-model")
            ]
        );
        assert_eq!(log.attempts[0].class, Some(FailureClass::QuotaExhausted));
    }
    Ok(())
}

#[tokio::test]
async fn exhausted_quota_without_an_approved_owner_fails_closed() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_insufficient_quota()],
    );
    let (response, log) = send(owned_chain(&mock, &["team-a"]), &mock).await?;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()[ROUTE_HEADER], "primary");
    assert_eq!(received(&mock), [at(PRIMARY_PATH, PRIMARY_MODEL)]);
    assert_eq!(
        log.attempts[0].decisions,
        [Decision::Stop(StopReason::NoApprovedRoute)]
    );
    assert!(text(response).await?.contains("insufficient_quota"));
    Ok(())
}

#[tokio::test]
async fn the_rewrite_is_exact_on_the_wire() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_overloaded()],
    );
    // Unusual spacing and key order, which a re-serialisation would not keep.
    let original = "{ \"messages\": [{\"role\":\"user\",\"content\":\"the \\\"model\\\" is\"}],\n  \"model\" : \"gpt-4o\",\"temperature\":0.50, \"metadata\":{\"model\":\"keep\"} }";
    let request = Request::post(format!("{}/v1/chat/completions?trace=1", mock.url()))
        .header("content-type", "application/json")
        .header("content-length", original.len())
        .header("authorization", "Bearer sk-primary")
        .header("x-keep", "kept")
        .body(Full::new(Bytes::from_static(original.as_bytes())))?;
    let backup = RouteConfig::new("anthropic-gw")
        .base_url(format!("{}/gw/anthropic/v1", mock.url()))
        .model("claude-sonnet")
        .remove_header("authorization")
        .set_header("x-api-key", "sk-backup")
        .set_header("anthropic-version", "2023-06-01")
        .approve_credentials();
    let response = stack(chain(vec![backup]))?.oneshot(request).await?;
    assert_eq!(response.status(), 200);

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let (primary, backup) = (&requests[0], &requests[1]);
    assert_eq!(primary.path, "/v1/chat/completions?trace=1");
    assert_eq!(primary.body, original.as_bytes());
    assert_eq!(backup.path, "/gw/anthropic/v1/chat/completions?trace=1");
    assert_eq!(backup.model.as_deref(), Some("claude-sonnet"));
    let expected = original.replace("\"gpt-4o\"", "\"claude-sonnet\"");
    assert_eq!(backup.body, expected.as_bytes());
    assert_eq!(
        backup.headers["content-length"],
        expected.len().to_string().as_str()
    );
    assert!(backup.headers.get("authorization").is_none());
    assert_eq!(backup.headers["x-api-key"], "sk-backup");
    assert_eq!(backup.headers["anthropic-version"], "2023-06-01");
    assert_eq!(backup.headers["x-keep"], "kept");
    assert_eq!(backup.headers["content-type"], "application/json");
    Ok(())
}

#[tokio::test]
async fn every_route_failing_returns_the_primarys_failure() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_overloaded()],
    );
    mock.script(ScriptKey::model("b1-model"), [Reply::openai_server_error()]);
    mock.script(ScriptKey::model("b2-model"), [Reply::unauthorized()]);
    let policy = chain(vec![route(&mock, "b1"), route(&mock, "b2")]);
    let (response, log) = send(policy, &mock).await?;

    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()[ROUTE_HEADER], "primary");
    assert_eq!(routes_tried(&log), ["primary", "b1", "b2"]);
    assert_eq!(
        log.attempts
            .iter()
            .map(|a| a.status.unwrap_or(0))
            .collect::<Vec<_>>(),
        [503, 500, 401]
    );
    assert_eq!(
        log.attempts[2].decisions,
        [Decision::Stop(StopReason::NoApprovedRoute)]
    );
    assert_eq!(log.selected_route, Some("primary".into()));
    // The primary's body, intact — not a backup's.
    assert!(text(response).await?.contains("server_is_overloaded"));
    Ok(())
}

#[tokio::test]
async fn the_last_resort_is_served_and_marked() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let mut policy = chain(vec![route(&mock, "backup")]);
    policy.last_resort = Some(StaticResponse::json(
        200,
        "{\"choices\":[{\"message\":{\"content\":\"The assistant is unavailable.\"}}]}",
    ));
    let (response, log) = send(policy, &mock).await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[LAST_RESORT_HEADER], "last-resort");
    assert_eq!(mock.request_count(), 2);
    assert!(
        log.events
            .iter()
            .any(|e| e.kind == LocalEventKind::LastResort)
    );
    assert!(text(response).await?.contains("unavailable"));
    Ok(())
}

#[tokio::test]
async fn the_hop_limit_holds() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let mut policy = chain(vec![
        route(&mock, "b1"),
        route(&mock, "b2"),
        route(&mock, "b3"),
    ]);
    policy.max_hops = 2;
    let (response, log) = send(policy, &mock).await?;
    assert_eq!(response.status(), 503);
    assert_eq!(mock.request_count(), 3);
    assert_eq!(routes_tried(&log), ["primary", "b1", "b2"]);
    assert_eq!(
        log.attempts[2].decisions,
        [Decision::Stop(StopReason::ChainLimit)]
    );
    Ok(())
}

#[tokio::test]
async fn the_total_attempts_cap_holds() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let mut policy = chain(vec![
        route(&mock, "b1"),
        route(&mock, "b2"),
        route(&mock, "b3"),
    ]);
    policy.max_total_attempts = 2;
    let (response, log) = send(policy, &mock).await?;
    assert_eq!(response.status(), 503);
    assert_eq!(mock.request_count(), 2);
    assert_eq!(log.attempts.len(), 2);
    assert_eq!(
        log.attempts[1].decisions,
        [Decision::Stop(StopReason::ChainLimit)]
    );
    Ok(())
}

#[tokio::test]
async fn a_streamed_backup_answer_passes_through() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::gemini_unavailable()],
    );
    mock.script(
        ScriptKey::model("backup-model"),
        [Reply::openai_stream("backup-model", &["Hel", "lo"])],
    );
    let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, true);
    let response = stack(chain(vec![route(&mock, "backup")]))?
        .oneshot(request)
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[ROUTE_HEADER], "backup");
    let body = text(response).await?;
    assert!(
        body.contains("\"Hel\"") && body.contains("\"lo\""),
        "{body}"
    );
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    Ok(())
}

#[test]
fn an_unapproved_credential_route_is_rejected_when_built() {
    let mut policy = Policy::interactive();
    policy.fallback.routes.push(
        RouteConfig::new("other-account")
            .base_url("http://127.0.0.1:1/v1")
            .set_header("authorization", "Bearer sk-other"),
    );
    let err = FallbackLayer::from_policy(&policy)
        .err()
        .map(|e| (e.field().to_owned(), e.to_string()));
    let (field, message) = err.unwrap_or_default();
    assert_eq!(field, "fallback.routes[0].set_headers");
    assert!(message.contains("credentials_approved"), "{message}");
    assert!(!message.contains("sk-other"), "{message}");
}

type Incoming = hyper::body::Incoming;

/// Stands in for a breaker whose circuit is open on `route`: fails its calls at once.
fn open_circuit_on(
    route: &'static str,
    client: Client,
) -> tower::util::BoxCloneService<Request<Full<Bytes>>, Response<Incoming>, BoxError> {
    let service = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let client = client.clone();
        let open = RouteName::of_request(&req).as_str() == route;
        async move {
            if open {
                let kind = tower_llm_resilience::ErrorKind::CircuitOpen {
                    route: RouteName::new(route),
                    retry_in: std::time::Duration::from_secs(30),
                };
                return Err(BoxError::from(tower_llm_resilience::Error::new(kind)));
            }
            client.oneshot(req).await.map_err(BoxError::from)
        }
    });
    tower::util::BoxCloneService::new(service)
}

#[tokio::test]
async fn an_open_circuit_on_the_primary_moves_on_at_once() -> Result<(), BoxError> {
    for shape in 0..2 {
        let mock = MockProvider::start().await?;
        mock.script(
            ScriptKey::model("backup-model"),
            [Reply::openai_chat("backup-model", BACKUP_TEXT)],
        );
        let [two, three] = chain_shapes(&mock);
        let routes = if shape == 0 { two } else { three };
        let backups = routes.len();
        let service =
            FallbackLayer::new(chain(routes))?.layer(open_circuit_on("primary", testing::client()));
        let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
        let response = service.oneshot(request).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[ROUTE_HEADER],
            "backup",
            "{backups} backups"
        );
        // Zero calls reached the primary; the first backup serves (the second is never asked).
        assert_eq!(
            received(&mock),
            [at("/backup/v1/chat/completions", "backup-model")],
            "{backups} backups"
        );
        let log = snapshot(&response)?;
        assert_eq!(routes_tried(&log), ["backup"]);
        assert_eq!(log.requested_route, Some("primary".into()));
        assert_eq!(log.selected_route, Some("backup".into()));
        let open: Vec<_> = log
            .events
            .iter()
            .filter(|e| matches!(e.kind, LocalEventKind::CircuitOpen { .. }))
            .map(|e| e.route.clone())
            .collect();
        assert_eq!(open, [Some(RouteName::new("primary"))]);
        let body = json(response).await?;
        assert_eq!(body["model"], "backup-model");
        assert_eq!(body["usage"], backup_usage());
    }
    Ok(())
}
#[tokio::test(start_paused = true)]
async fn the_callers_key_never_follows_the_request_to_another_host_unapproved()
-> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_overloaded()],
    );
    // `localhost` is another authority than `127.0.0.1`, on the same loopback mock.
    let other_host = format!("http://localhost:{}", mock.addr().port());
    for approved in [false, true] {
        let mut backup = RouteConfig::new("backup")
            .base_url(format!("{other_host}/backup/v1"))
            .model("backup-model");
        backup.credentials_approved = approved;
        let same_host = RouteConfig::new("same-host")
            .base_url(format!("{}/same/v1", mock.url()))
            .model("same-model");
        mock.script(
            ScriptKey::model("backup-model"),
            [Reply::openai_overloaded()],
        );
        let mut policy = chain(vec![backup, same_host]);
        policy.max_total_attempts = 10;
        let mut request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
        request
            .headers_mut()
            .insert("authorization", "Bearer sk-primary-only".parse()?);
        request
            .headers_mut()
            .insert("x-api-key", "sk-primary-only".parse()?);
        let before = mock.request_count();
        let response = stack(policy)?.oneshot(request).await?;
        assert_eq!(response.status(), 200);
        let seen = &mock.requests()[before..];
        let key_of = |model: &str| {
            seen.iter()
                .find(|r| r.model.as_deref() == Some(model))
                .map(|r| {
                    r.headers.contains_key("authorization") || r.headers.contains_key("x-api-key")
                })
        };
        assert_eq!(key_of(PRIMARY_MODEL), Some(true));
        // Another host gets the caller's key only when the route's credentials are approved.
        assert_eq!(key_of("backup-model"), Some(approved));
        // The same host keeps it: the key was meant for it.
        assert_eq!(key_of("same-model"), Some(true));
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_hop_away_from_an_open_circuit_costs_no_retry_budget() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    let mut policy = Policy::interactive();
    policy.fallback = chain(vec![route(&mock, "backup")]);
    let breaker = CircuitBreakerLayer::from_policy(&policy)?;
    breaker.handle().force_open("primary");
    let service = tower::ServiceBuilder::new()
        .layer(FallbackLayer::from_policy(&policy)?)
        .layer(breaker)
        .service(testing::client());
    // An empty budget: no retry or hop that adds a call may be made.
    let budget = RetryBudget::new(&RetryBudgetPolicy::Ratio {
        ratio: 0.0,
        min_per_sec: 0,
        ttl: Duration::from_secs(10),
    })?;
    for _ in 0..3 {
        let mut request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
        request.extensions_mut().insert(budget.clone());
        let response = service.clone().oneshot(request).await?;
        // The primary made no call, so the hop replaces it: the backup serves every request.
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[ROUTE_HEADER], "backup");
    }
    assert_eq!(mock.request_count(), 3);

    // A primary that was called and failed still needs the budget to hop.
    let breaker = CircuitBreakerLayer::from_policy(&policy)?;
    let service = tower::ServiceBuilder::new()
        .layer(FallbackLayer::from_policy(&policy)?)
        .layer(breaker)
        .service(testing::client());
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_overloaded()],
    );
    let mut request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
    request.extensions_mut().insert(budget.clone());
    let response = service.oneshot(request).await?;
    assert_eq!(response.status(), 503);
    let log = snapshot(&response)?;
    assert_eq!(
        log.attempts[0].decisions,
        [Decision::Stop(StopReason::RetryBudgetDenied)]
    );
    Ok(())
}

#[tokio::test]
async fn a_tripped_circuit_on_the_primary_keeps_every_call_off_it() -> Result<(), BoxError> {
    for shape in 0..2 {
        let mock = MockProvider::start().await?;
        mock.script(
            ScriptKey::model(PRIMARY_MODEL),
            [Reply::openai_overloaded()],
        );
        let [two, three] = chain_shapes(&mock);
        let routes = if shape == 0 { two } else { three };
        let backups: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
        let mut policy = Policy::interactive();
        policy.fallback = chain(routes);
        let breaker = CircuitBreakerLayer::from_policy(&policy)?;
        let breakers = breaker.handle();
        let service = tower::ServiceBuilder::new()
            .layer(FallbackLayer::from_policy(&policy)?)
            .layer(breaker)
            .service(testing::client());
        let calls_to = |mock: &MockProvider, model: &str| {
            mock.requests()
                .iter()
                .filter(|r| r.model.as_deref() == Some(model))
                .count()
        };

        // The default breaker trips after 10 consecutive provider failures; the first backup
        // serves each.
        for _ in 0..10 {
            let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
            let response = service.clone().oneshot(request).await?;
            assert_eq!(response.headers()[ROUTE_HEADER], "backup");
            json(response).await?;
        }
        assert_eq!(breakers.state("primary"), CircuitState::Open);
        assert_eq!(calls_to(&mock, PRIMARY_MODEL), 10);
        assert_eq!(calls_to(&mock, "backup-model"), 10);

        // Open: zero calls reach the primary; the first backup serves at once.
        for _ in 0..3 {
            let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
            let response = service.clone().oneshot(request).await?;
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()[ROUTE_HEADER], "backup");
            let log = snapshot(&response)?;
            assert_eq!(routes_tried(&log), ["backup"]);
            let open_events: Vec<_> = log
                .events
                .iter()
                .filter(|e| matches!(e.kind, LocalEventKind::CircuitOpen { .. }))
                .collect();
            // Logged once (by the breaker), for the primary.
            assert_eq!(open_events.len(), 1);
            assert_eq!(open_events[0].route, Some("primary".into()));
            assert_eq!(json(response).await?["model"], "backup-model");
        }
        assert_eq!(calls_to(&mock, PRIMARY_MODEL), 10);
        assert_eq!(calls_to(&mock, "backup-model"), 10 + 3);
        assert_eq!(calls_to(&mock, "backup2-model"), 0);
        assert_eq!(mock.request_count(), 10 + 10 + 3);

        let mut calls = mock.request_count();
        if backups.len() == 2 {
            // With the first backup's circuit forced open too, the second serves: still no
            // call reaches the primary, nor the first backup.
            breakers.force_open("backup");
            let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
            let response = service.clone().oneshot(request).await?;
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()[ROUTE_HEADER], "backup2");
            let log = snapshot(&response)?;
            assert_eq!(routes_tried(&log), ["backup2"]);
            let open: Vec<_> = log.events.iter().filter_map(|e| e.route.as_ref()).collect();
            assert_eq!(
                open,
                [&RouteName::new("primary"), &RouteName::new("backup")]
            );
            assert_eq!(json(response).await?["model"], "backup2-model");
            calls += 1;
            assert_eq!(
                received(&mock).last(),
                Some(&at("/backup2/v1/chat/completions", "backup2-model"))
            );
            assert_eq!(mock.request_count(), calls);
        }

        // With every backup's circuit forced open too, no call is made at all, and the caller
        // gets the primary's failure: its open circuit.
        for backup in &backups {
            breakers.force_open(backup.as_str());
        }
        let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
        let error = service
            .clone()
            .oneshot(request)
            .await
            .err()
            .ok_or("every circuit open")?;
        assert!(
            matches!(error.kind(), tower_llm_resilience::ErrorKind::CircuitOpen { route, .. } if route.as_str() == "primary"),
            "{error}"
        );
        assert_eq!(mock.request_count(), calls);
        let log = error
            .attempt_log()
            .ok_or("the error carries the log")?
            .snapshot();
        assert!(log.attempts.is_empty());
        let open: Vec<&str> = log
            .events
            .iter()
            .filter_map(|e| e.route.as_ref().map(RouteName::as_str))
            .collect();
        let expected: Vec<&str> = std::iter::once("primary")
            .chain(backups.iter().map(String::as_str))
            .collect();
        assert_eq!(open, expected);
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_total_attempts_cap_binds_the_retries_inside() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let mut policy = Policy::interactive();
    policy.retry.max_attempts = 3;
    policy.retry.seed = Some(7);
    policy.fallback = chain(vec![route(&mock, "backup")]);
    policy.fallback.max_total_attempts = 4;
    let service = tower::ServiceBuilder::new()
        .layer(FallbackLayer::from_policy(&policy)?)
        .layer(RetryLayer::from_policy(&policy)?)
        .service(testing::client());
    let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
    let response = service.oneshot(request).await?;
    // Every route fails: the caller gets the primary's failure.
    assert_eq!(response.status(), 503);
    let log = snapshot(&response)?;
    assert_eq!(
        routes_tried(&log),
        ["primary", "primary", "primary", "backup"]
    );
    assert_eq!(mock.request_count(), 4);
    assert!(
        log.attempts[3]
            .decisions
            .contains(&Decision::Stop(StopReason::ChainLimit)),
        "{:?}",
        log.attempts[3].decisions
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn without_a_budget_layer_a_request_deposits_once_and_its_hops_draw_on_it()
-> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::Any, [Reply::openai_overloaded()]);
    let mut policy = Policy::interactive();
    policy.retry.max_attempts = 1;
    policy.fallback = chain(vec![route(&mock, "backup")]);
    // One retry or hop per request deposited, none besides.
    let budget = RetryBudget::new(&RetryBudgetPolicy::Ratio {
        ratio: 1.0,
        min_per_sec: 0,
        ttl: Duration::from_secs(10),
    })?;
    let service = tower::ServiceBuilder::new()
        .layer(FallbackLayer::from_policy(&policy)?)
        .layer(RetryLayer::from_policy(&policy)?.retry_budget(budget.clone()))
        .service(testing::client());
    let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
    let response = service.oneshot(request).await?;
    assert_eq!(response.status(), 503);
    assert_eq!(routes_tried(&snapshot(&response)?), ["primary", "backup"]);
    // The primary's call deposited one, the hop took it, the backup's call deposited nothing.
    assert_eq!(budget.available(), 0);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_route_switches_only_after_its_retries_are_spent() -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_overloaded()],
    );
    let mut policy = Policy::interactive();
    policy.retry.max_attempts = 3;
    policy.retry.seed = Some(7);
    policy.fallback = chain(vec![route(&mock, "backup")]);
    mock.script(
        ScriptKey::model("backup-model"),
        [Reply::openai_chat("backup-model", BACKUP_TEXT)],
    );
    let service = tower::ServiceBuilder::new()
        .layer(FallbackLayer::from_policy(&policy)?)
        .layer(RetryLayer::from_policy(&policy)?)
        .service(testing::client());
    let request = testing::chat_request(&mock.url(), PRIMARY_MODEL, false);
    let response = service.oneshot(request).await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[ROUTE_HEADER], "backup");
    let log = snapshot(&response)?;
    assert_eq!(
        routes_tried(&log),
        ["primary", "primary", "primary", "backup"]
    );
    assert!(matches!(
        log.attempts[0].decisions[..],
        [Decision::Retry { .. }]
    ));
    assert!(matches!(
        log.attempts[1].decisions[..],
        [Decision::Retry { .. }]
    ));
    assert_eq!(
        log.attempts[2].decisions,
        [
            Decision::Stop(StopReason::AttemptsExhausted),
            Decision::Fallback {
                to: "backup".into()
            }
        ]
    );
    assert_eq!(
        received(&mock),
        [
            at(PRIMARY_PATH, PRIMARY_MODEL),
            at(PRIMARY_PATH, PRIMARY_MODEL),
            at(PRIMARY_PATH, PRIMARY_MODEL),
            at("/backup/v1/chat/completions", "backup-model")
        ]
    );
    // The answer is the backup's: its model and its usage.
    let body = json(response).await?;
    assert_eq!(body["model"], "backup-model");
    assert_eq!(body["usage"], backup_usage());
    Ok(())
}
