//! Unit tests over `tower::service_fn` transports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::*;
use crate::attempt_log::{Decision, LocalEventKind, LogSnapshot, Outcome, StopReason};
use crate::classify::{Classification, FailureClass};
use crate::context::Deadline;
use crate::policy::{
    ClassAction, ClassActions, FallbackPolicy, FallbackRule, Policy, RetryBudgetPolicy, RetryRule,
    RouteConfig, StaticResponse,
};
use crate::{AttemptLog, Body, Error, ErrorKind, RetryBudget, RouteName};

const BODY: &str = "{\"model\":\"main-model\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":64}";

/// What the transport saw of one call.
#[derive(Debug, Clone)]
struct Seen {
    route: Option<String>,
    uri: String,
    headers: http::HeaderMap,
    body: Bytes,
    fallback_available: bool,
    cap: Option<u32>,
}

type Replies = HashMap<&'static str, Reply>;

#[derive(Clone)]
enum Reply {
    /// A response classified by the transport (as an inner crate layer would).
    Status(u16, Option<FailureClass>, &'static str),
    /// A response left for the fallback layer's own classifier.
    Raw(u16),
    Transport(FailureClass),
    CircuitOpen,
    Delay(Duration, Box<Reply>),
}

fn respond(reply: &Reply) -> Result<Response<Full<Bytes>>, Error> {
    match reply {
        Reply::Status(status, class, body) => {
            let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::IM_A_TEAPOT);
            let mut c = Classification::success(r.status());
            c.class = *class;
            r.extensions_mut().insert(c);
            Ok(r)
        }
        Reply::Raw(status) => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"raw")));
            *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::IM_A_TEAPOT);
            Ok(r)
        }
        Reply::Transport(class) => Err(Error::transport(
            *class,
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        )),
        Reply::CircuitOpen => Err(Error::new(ErrorKind::CircuitOpen {
            route: RouteName::new("?"),
            retry_in: Duration::from_secs(5),
        })),
        Reply::Delay(_, r) => respond(r),
    }
}

type Transport = tower::util::BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, Error>;

/// A transport answering per route (by the `RouteName` extension), recording every call.
fn transport(replies: Replies) -> (Transport, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let replies = Arc::new(replies);
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let replies = replies.clone();
        let record = record.clone();
        async move {
            let ctx = crate::context::RequestContext::of(&req);
            let route = ctx.and_then(|c| c.route()).map(|r| r.as_str().to_owned());
            let body = crate::replay::ReplayBody::to_bytes(req.body()).unwrap_or_default();
            record.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
                route: route.clone(),
                uri: req.uri().to_string(),
                headers: req.headers().clone(),
                body,
                fallback_available: ctx.is_some_and(|c| c.fallback_available()),
                cap: ctx.and_then(|c| c.attempt_cap()).map(|c| c.0),
            });
            let reply = route
                .as_deref()
                .and_then(|r| replies.get(r))
                .cloned()
                .unwrap_or(Reply::Status(200, None, "ok"));
            if let Reply::Delay(d, _) = &reply {
                tokio::time::sleep(*d).await;
            }
            respond(&reply)
        }
    });
    (tower::util::BoxCloneService::new(svc), seen)
}

fn request() -> Request<Full<Bytes>> {
    Request::post("http://primary.test/v1/chat/completions")
        .header("content-type", "application/json")
        .header("content-length", BODY.len())
        .header("authorization", "Bearer primary-key")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn chain(routes: Vec<RouteConfig>) -> FallbackPolicy {
    FallbackPolicy {
        max_hops: 5,
        max_total_attempts: 10,
        routes,
        ..FallbackPolicy::default()
    }
}

fn backup(name: &str) -> RouteConfig {
    RouteConfig::new(name)
        .base_url(format!("https://{name}.test/v1"))
        .model(format!("{name}-model"))
}

async fn run(
    policy: FallbackPolicy,
    replies: Replies,
) -> (Result<Response<Body>, Error>, Vec<Seen>, LogSnapshot) {
    run_with(FallbackLayer::new(policy), replies, request()).await
}

async fn run_with(
    layer: Result<FallbackLayer, crate::PolicyError>,
    replies: Replies,
    req: Request<Full<Bytes>>,
) -> (Result<Response<Body>, Error>, Vec<Seen>, LogSnapshot) {
    let layer = layer.unwrap_or_else(|e| panic!("{e}"));
    let (svc, seen) = transport(replies);
    let out = layer.layer(svc).oneshot(req).await;
    let log = match &out {
        Ok(r) => r.extensions().get::<AttemptLog>().cloned(),
        Err(e) => e.attempt_log().cloned(),
    }
    .unwrap_or_else(|| panic!("the response carries the log"));
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    (out, seen, log.snapshot())
}

fn routes_of(seen: &[Seen]) -> Vec<&str> {
    seen.iter()
        .map(|s| s.route.as_deref().unwrap_or("-"))
        .collect()
}

fn decisions(log: &LogSnapshot) -> Vec<Vec<Decision>> {
    log.attempts.iter().map(|a| a.decisions.clone()).collect()
}

fn fallback(to: &str) -> Decision {
    Decision::Fallback { to: to.into() }
}

async fn body_of(r: Response<Body>) -> String {
    let b = r.into_body().collect_bytes().await.unwrap_or_default();
    String::from_utf8_lossy(&b).into_owned()
}

fn ok(out: Result<Response<Body>, Error>) -> Response<Body> {
    out.unwrap_or_else(|e| panic!("expected a response, got {e}"))
}

#[tokio::test]
async fn overloaded_primary_switches_to_the_backup() {
    let replies = HashMap::from([(
        "primary",
        Reply::Status(503, Some(FailureClass::Overloaded), "busy"),
    )]);
    let (out, seen, log) = run(chain(vec![backup("b1"), backup("b2")]), replies).await;
    let r = ok(out);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[ROUTE_HEADER], "b1");
    assert_eq!(
        r.extensions().get::<RouteName>(),
        Some(&RouteName::new("b1"))
    );
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    assert_eq!(log.requested_route, Some("primary".into()));
    assert_eq!(log.selected_route, Some("b1".into()));
    assert_eq!(log.attempts.len(), 2);
    assert_eq!(log.attempts[0].route, Some("primary".into()));
    assert_eq!(log.attempts[0].class, Some(FailureClass::Overloaded));
    assert_eq!(log.attempts[1].route, Some("b1".into()));
    assert_eq!(decisions(&log), [vec![fallback("b1")], vec![]]);
    assert_eq!(log.outcome, Some(Outcome::Success { status: 200 }));
    // Another approved route remained after the primary and after b1.
    assert!(seen[0].fallback_available && seen[1].fallback_available);
    assert_eq!(seen[0].cap, Some(10));
    assert_eq!(seen[1].cap, Some(10));
}

#[tokio::test]
async fn the_rewrite_is_exact() {
    let route = RouteConfig::new("b1")
        .base_url("https://b1.test/v1")
        .model("backup-\"model\"")
        .remove_header("authorization")
        .set_header("x-api-key", "backup-key")
        .set_header("anthropic-version", "2023-06-01")
        .approve_credentials();
    let replies = HashMap::from([("primary", Reply::Transport(FailureClass::Connect))]);
    let (out, seen, _) = run(chain(vec![route]), replies).await;
    assert_eq!(ok(out).status(), 200);
    let (p, b) = (&seen[0], &seen[1]);
    assert_eq!(p.uri, "http://primary.test/v1/chat/completions");
    assert_eq!(p.body, BODY.as_bytes());
    assert_eq!(p.headers["authorization"], "Bearer primary-key");
    assert_eq!(b.uri, "https://b1.test/v1/chat/completions");
    let want = BODY.replace("\"main-model\"", "\"backup-\\\"model\\\"\"");
    assert_eq!(b.body, want.as_bytes());
    assert_eq!(b.headers["content-length"], want.len().to_string().as_str());
    assert_eq!(b.headers["content-type"], "application/json");
    assert!(b.headers.get("authorization").is_none());
    assert_eq!(b.headers["x-api-key"], "backup-key");
    assert_eq!(b.headers["anthropic-version"], "2023-06-01");
    // The last route: nothing remains after it.
    assert!(p.fallback_available && !b.fallback_available);
}

#[tokio::test]
async fn auth_invalid_request_and_policy_block_never_switch() {
    for class in [
        FailureClass::Auth,
        FailureClass::InvalidRequest,
        FailureClass::PolicyBlock,
    ] {
        let replies = HashMap::from([(
            "primary",
            Reply::Status(401, Some(class), "provider says no"),
        )]);
        let (out, seen, log) = run(chain(vec![backup("b1")]), replies).await;
        let r = ok(out);
        assert_eq!(r.status(), 401, "{class}");
        assert_eq!(r.headers()[ROUTE_HEADER], "primary");
        assert_eq!(routes_of(&seen), ["primary"], "{class}");
        assert_eq!(
            decisions(&log),
            [vec![Decision::Stop(StopReason::NoApprovedRoute)]]
        );
        assert_eq!(log.selected_route, Some("primary".into()));
        assert_eq!(
            log.outcome,
            Some(Outcome::ProviderFailure {
                status: 401,
                class: Some(class)
            })
        );
        assert_eq!(body_of(r).await, "provider says no");
    }
}

#[tokio::test]
async fn a_policy_override_lets_a_class_switch() {
    let actions = ClassActions::default().with(
        FailureClass::Auth,
        ClassAction::new(RetryRule::Never, FallbackRule::Yes, false),
    );
    let mut policy = Policy::interactive();
    policy.fallback = chain(vec![backup("b1")]);
    policy.actions = actions.clone();
    let replies = HashMap::from([("primary", Reply::Status(401, Some(FailureClass::Auth), ""))]);
    let (out, seen, _) = run_with(
        FallbackLayer::from_policy(&policy),
        replies.clone(),
        request(),
    )
    .await;
    assert_eq!(ok(out).status(), 200);
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    // The same through `actions`.
    let layer = FallbackLayer::new(chain(vec![backup("b1")])).map(|l| l.actions(actions));
    let (_, seen, _) = run_with(layer, replies, request()).await;
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
}

#[tokio::test]
async fn context_overflow_goes_only_to_larger_context_routes() {
    let routes = vec![
        backup("small"),
        backup("large").larger_context(),
        backup("other"),
    ];
    let replies = HashMap::from([
        (
            "primary",
            Reply::Status(400, Some(FailureClass::ContextOverflow), "too long"),
        ),
        (
            "large",
            Reply::Status(503, Some(FailureClass::Overloaded), ""),
        ),
    ]);
    let (out, seen, log) = run(chain(routes), replies).await;
    // `large` was overloaded, but the request still needs a larger context: `other` is not
    // tried, and the primary's failure is returned.
    let r = ok(out);
    assert_eq!(r.status(), 400);
    assert_eq!(routes_of(&seen), ["primary", "large"]);
    assert_eq!(
        decisions(&log),
        [
            vec![fallback("large")],
            vec![Decision::Stop(StopReason::NoApprovedRoute)]
        ]
    );
    assert_eq!(body_of(r).await, "too long");

    // Without a larger-context route: fail closed, nothing else called.
    let replies = HashMap::from([(
        "primary",
        Reply::Status(400, Some(FailureClass::ContextOverflow), ""),
    )]);
    let (out, seen, log) = run(chain(vec![backup("small")]), replies).await;
    assert_eq!(ok(out).status(), 400);
    assert_eq!(routes_of(&seen), ["primary"]);
    assert_eq!(
        decisions(&log),
        [vec![Decision::Stop(StopReason::NoApprovedRoute)]]
    );
}

#[tokio::test]
async fn exhausted_quota_goes_only_to_an_approved_other_owner() {
    let mut policy = chain(vec![
        backup("same").budget_owner("team-a"),
        backup("unapproved").budget_owner("team-b"),
        backup("approved").budget_owner("team-c"),
    ]);
    policy.primary_budget_owner = Some("team-a".into());
    policy.approved_budget_owners = vec!["team-a".into(), "team-c".into()];
    let replies = HashMap::from([(
        "primary",
        Reply::Status(429, Some(FailureClass::QuotaExhausted), "quota"),
    )]);
    let (out, seen, log) = run(policy.clone(), replies.clone()).await;
    assert_eq!(ok(out).status(), 200);
    // `same` spends the exhausted budget, `unapproved` an unapproved one.
    assert_eq!(routes_of(&seen), ["primary", "approved"]);
    assert_eq!(log.selected_route, Some("approved".into()));

    // No approved other owner: fail closed with the provider's response.
    policy.approved_budget_owners = vec!["team-a".into()];
    let (out, seen, log) = run(policy, replies).await;
    let r = ok(out);
    assert_eq!(r.status(), 429);
    assert_eq!(routes_of(&seen), ["primary"]);
    assert_eq!(
        decisions(&log),
        [vec![Decision::Stop(StopReason::NoApprovedRoute)]]
    );
    assert_eq!(body_of(r).await, "quota");
}

#[tokio::test]
async fn an_open_circuit_moves_on_without_an_attempt() {
    let replies = HashMap::from([("primary", Reply::CircuitOpen)]);
    let (out, seen, log) = run(chain(vec![backup("b1")]), replies).await;
    assert_eq!(ok(out).status(), 200);
    // The transport saw the primary's call only because this stand-in breaker is the
    // transport itself; no attempt is recorded for it.
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    assert_eq!(log.attempts.len(), 1);
    assert_eq!(log.attempts[0].route, Some("b1".into()));
    assert_eq!(log.events.len(), 1);
    assert_eq!(log.events[0].route, Some("primary".into()));
    assert_eq!(
        log.events[0].kind,
        LocalEventKind::CircuitOpen {
            retry_in: Duration::from_secs(5)
        }
    );
}

#[tokio::test]
async fn every_route_failing_returns_the_primarys_response() {
    let replies = HashMap::from([
        (
            "primary",
            Reply::Status(503, Some(FailureClass::Overloaded), "primary body"),
        ),
        (
            "b1",
            Reply::Status(500, Some(FailureClass::ServerError), "b1 body"),
        ),
        (
            "b2",
            Reply::Status(401, Some(FailureClass::Auth), "b2 body"),
        ),
    ]);
    let (out, seen, log) = run(chain(vec![backup("b1"), backup("b2")]), replies).await;
    let r = ok(out);
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()[ROUTE_HEADER], "primary");
    assert_eq!(
        r.extensions().get::<RouteName>(),
        Some(&RouteName::new("primary"))
    );
    assert_eq!(
        r.extensions().get::<Classification>().and_then(|c| c.class),
        Some(FailureClass::Overloaded)
    );
    assert_eq!(routes_of(&seen), ["primary", "b1", "b2"]);
    assert_eq!(
        decisions(&log),
        [
            vec![fallback("b1")],
            vec![fallback("b2")],
            vec![Decision::Stop(StopReason::NoApprovedRoute)]
        ]
    );
    assert_eq!(log.selected_route, Some("primary".into()));
    assert_eq!(
        log.outcome,
        Some(Outcome::ProviderFailure {
            status: 503,
            class: Some(FailureClass::Overloaded)
        })
    );
    assert_eq!(body_of(r).await, "primary body");
}

#[tokio::test]
async fn every_route_failing_returns_the_primarys_error() {
    let replies = HashMap::from([
        ("primary", Reply::Transport(FailureClass::Connect)),
        ("b1", Reply::Status(503, Some(FailureClass::Overloaded), "")),
    ]);
    let (out, seen, log) = run(chain(vec![backup("b1")]), replies).await;
    let e = out
        .err()
        .unwrap_or_else(|| panic!("expected the primary's error"));
    assert_eq!(e.kind(), &ErrorKind::Transport);
    assert_eq!(e.class(), Some(FailureClass::Connect));
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    // The transport error was recorded here, as no inner layer did.
    assert_eq!(
        log.attempts[0].error.as_deref(),
        Some("transport failed (connect)")
    );
    assert_eq!(log.attempts[0].class, Some(FailureClass::Connect));
    assert_eq!(log.attempts[1].status, Some(503));
    assert!(matches!(
        log.outcome,
        Some(Outcome::Error {
            class: Some(FailureClass::Connect),
            ..
        })
    ));
}

#[tokio::test]
async fn the_hop_limit_holds() {
    let busy = || Reply::Status(503, Some(FailureClass::Overloaded), "");
    let replies = HashMap::from([("primary", busy()), ("b1", busy()), ("b2", busy())]);
    let mut policy = chain(vec![backup("b1"), backup("b2"), backup("b3")]);
    policy.max_hops = 2;
    let (out, seen, log) = run(policy, replies).await;
    assert_eq!(ok(out).status(), 503);
    assert_eq!(routes_of(&seen), ["primary", "b1", "b2"]);
    assert_eq!(
        decisions(&log).last().cloned(),
        Some(vec![Decision::Stop(StopReason::ChainLimit)])
    );
    // b2 is the last hop allowed: the retry layer below must not wait for a fallback.
    assert!(!seen[2].fallback_available);

    let mut policy = chain(vec![backup("b1")]);
    policy.max_hops = 0;
    let (out, seen, _) = run(policy, HashMap::from([("primary", busy())])).await;
    assert_eq!(ok(out).status(), 503);
    assert_eq!(routes_of(&seen), ["primary"]);
    assert!(!seen[0].fallback_available);
}

#[tokio::test]
async fn the_total_attempts_cap_holds() {
    let busy = || Reply::Status(503, Some(FailureClass::Overloaded), "");
    let replies = HashMap::from([("primary", busy()), ("b1", busy()), ("b2", busy())]);
    let mut policy = chain(vec![backup("b1"), backup("b2"), backup("b3")]);
    policy.max_total_attempts = 2;
    let (out, seen, log) = run(policy, replies).await;
    assert_eq!(ok(out).status(), 503);
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    assert_eq!(log.attempts.len(), 2);
    assert_eq!(
        decisions(&log),
        [
            vec![fallback("b1")],
            vec![Decision::Stop(StopReason::ChainLimit)]
        ]
    );
    assert_eq!(seen[0].cap, Some(2));
}

#[tokio::test]
async fn a_smaller_cap_from_the_caller_holds_for_the_hops() {
    let busy = || Reply::Status(503, Some(FailureClass::Overloaded), "");
    let replies = HashMap::from([("primary", busy()), ("b1", busy()), ("b2", busy())]);
    // The chain allows ten; the caller (or an outer chain) allows two.
    let policy = chain(vec![backup("b1"), backup("b2"), backup("b3")]);
    let mut req = request();
    crate::context::AttemptCap(2).tighten(&mut req);
    let (out, seen, log) = run_with(FallbackLayer::new(policy), replies, req).await;
    assert_eq!(ok(out).status(), 503);
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    assert_eq!(
        decisions(&log),
        [
            vec![fallback("b1")],
            vec![Decision::Stop(StopReason::ChainLimit)]
        ]
    );
}

#[tokio::test]
async fn attempts_recorded_below_count_towards_the_cap() {
    // An inner layer that records three attempts per call, as a retry layer would.
    let inner = service_fn(|req: Request<Full<Bytes>>| async move {
        if let Some(log) = crate::context::RequestContext::of(&req).map(|c| c.log()) {
            let route = RouteName::of_request(&req);
            for _ in 0..3 {
                let c = Classification::failure(FailureClass::Overloaded);
                log.record(crate::attempt_log::Attempt::new(
                    Some(route.clone()),
                    Duration::ZERO,
                    Duration::ZERO,
                    &c,
                ));
            }
        }
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, Error>(r)
    });
    let mut policy = chain(vec![backup("b1"), backup("b2")]);
    policy.max_total_attempts = 5;
    let svc = FallbackLayer::new(policy)
        .unwrap_or_else(|e| panic!("{e}"))
        .layer(inner);
    let r = ok(svc.oneshot(request()).await);
    let log = r
        .extensions()
        .get::<AttemptLog>()
        .unwrap_or_else(|| panic!("log"))
        .snapshot();
    // 3 attempts on the primary (< 5: hop), 3 on b1 (6 >= 5: stop).
    assert_eq!(log.attempts.len(), 6);
    assert_eq!(log.attempts[2].decisions, [fallback("b1")]);
    assert_eq!(
        log.attempts[5].decisions,
        [Decision::Stop(StopReason::ChainLimit)]
    );
    // The fallback layer classified the raw 503 itself.
    assert_eq!(
        r.extensions().get::<Classification>().and_then(|c| c.class),
        Some(FailureClass::Overloaded)
    );
}

#[tokio::test]
async fn an_unclassified_response_is_classified_here() {
    let replies = HashMap::from([("primary", Reply::Raw(503))]);
    let (out, seen, log) = run(chain(vec![backup("b1")]), replies).await;
    assert_eq!(ok(out).status(), 200);
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    assert_eq!(log.attempts[0].class, Some(FailureClass::Overloaded));
    let replies = HashMap::from([("primary", Reply::Raw(401))]);
    let (out, seen, _) = run(chain(vec![backup("b1")]), replies).await;
    assert_eq!(ok(out).status(), 401);
    assert_eq!(routes_of(&seen), ["primary"]);
}

#[tokio::test]
async fn the_last_resort_is_served_only_for_outages() {
    let mut policy = chain(vec![backup("b1")]);
    policy.last_resort = Some(StaticResponse::json(
        503,
        "{\"error\":{\"message\":\"try again later\"}}",
    ));
    let busy = || Reply::Status(503, Some(FailureClass::Overloaded), "");
    let (out, seen, log) = run(
        policy.clone(),
        HashMap::from([("primary", busy()), ("b1", busy())]),
    )
    .await;
    let r = ok(out);
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()[LAST_RESORT_HEADER], "last-resort");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers().get(ROUTE_HEADER).is_none());
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    assert_eq!(log.events.len(), 1);
    assert_eq!(log.events[0].kind, LocalEventKind::LastResort);
    assert_eq!(log.selected_route, None);
    assert_eq!(
        body_of(r).await,
        "{\"error\":{\"message\":\"try again later\"}}"
    );

    // An auth failure is the caller's to see.
    let replies = HashMap::from([(
        "primary",
        Reply::Status(401, Some(FailureClass::Auth), "no"),
    )]);
    let (out, _, log) = run(policy, replies).await;
    let r = ok(out);
    assert_eq!(r.status(), 401);
    assert!(r.headers().get(LAST_RESORT_HEADER).is_none());
    assert!(log.events.is_empty());
}

#[tokio::test]
async fn a_denied_retry_budget_stops_the_chain() {
    let budget = RetryBudget::new(&RetryBudgetPolicy::TokenBucket {
        capacity: 1,
        refill_per_sec: 0.0,
        per_request: 0.0,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let busy = || Reply::Status(503, Some(FailureClass::Overloaded), "");
    let replies = HashMap::from([("primary", busy()), ("b1", busy())]);
    let mut req = request();
    req.extensions_mut().insert(budget.clone());
    let layer = FallbackLayer::new(chain(vec![backup("b1"), backup("b2")]));
    let (out, seen, log) = run_with(layer, replies, req).await;
    assert_eq!(ok(out).status(), 503);
    // One hop withdrew the only unit; the second was denied.
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    assert_eq!(budget.available(), 0);
    assert_eq!(
        decisions(&log),
        [
            vec![fallback("b1")],
            vec![Decision::Stop(StopReason::RetryBudgetDenied)]
        ]
    );
    assert_eq!(log.events.len(), 1);
    assert_eq!(log.events[0].kind, LocalEventKind::RetryBudgetDenied);
    assert_eq!(log.events[0].route, Some("b2".into()));
}

#[tokio::test(start_paused = true)]
async fn no_hop_after_the_deadline() {
    let slow = Reply::Delay(
        Duration::from_secs(2),
        Box::new(Reply::Status(503, Some(FailureClass::Overloaded), "")),
    );
    let replies = HashMap::from([("primary", slow.clone())]);
    let mut req = request();
    Deadline::after(Duration::from_secs(2)).tighten(&mut req);
    let layer = FallbackLayer::new(chain(vec![backup("b1")]));
    let (out, seen, log) = run_with(layer, replies.clone(), req).await;
    assert_eq!(ok(out).status(), 503);
    assert_eq!(routes_of(&seen), ["primary"]);
    assert_eq!(
        decisions(&log),
        [vec![Decision::Stop(StopReason::DeadlineExceeded)]]
    );
    assert_eq!(log.events[0].kind, LocalEventKind::DeadlineExceeded);

    // A millisecond left is enough to start the hop.
    let mut req = request();
    Deadline::after(Duration::from_millis(2001)).tighten(&mut req);
    let layer = FallbackLayer::new(chain(vec![backup("b1")]));
    let (out, seen, log) = run_with(layer, replies, req).await;
    assert_eq!(ok(out).status(), 200);
    assert_eq!(routes_of(&seen), ["primary", "b1"]);
    // Timing is recorded on the tokio clock.
    assert_eq!(log.attempts[0].latency, Duration::from_secs(2));
    assert_eq!(log.attempts[1].offset, Duration::from_secs(2));
    assert_eq!(log.attempts[1].latency, Duration::ZERO);
}

#[tokio::test]
async fn a_body_without_a_model_skips_model_routes() {
    let routes = vec![
        backup("b1"),
        RouteConfig::new("same-model").base_url("https://s.test"),
    ];
    let replies = HashMap::from([(
        "primary",
        Reply::Status(503, Some(FailureClass::Overloaded), ""),
    )]);
    let req = Request::post("http://primary.test/v1/embeddings")
        .body(Full::new(Bytes::from_static(b"{\"input\":\"x\"}")))
        .unwrap_or_else(|e| panic!("{e}"));
    let (out, seen, log) = run_with(FallbackLayer::new(chain(routes)), replies, req).await;
    assert_eq!(ok(out).status(), 200);
    assert_eq!(routes_of(&seen), ["primary", "same-model"]);
    assert_eq!(seen[1].uri, "https://s.test/v1/embeddings");
    assert_eq!(seen[1].body, &b"{\"input\":\"x\"}"[..]);
    assert_eq!(log.events.len(), 1);
    assert_eq!(log.events[0].route, Some("b1".into()));
    assert_eq!(
        log.events[0].kind,
        LocalEventKind::RouteSkipped {
            reason: "request body has no top-level string `model`".into()
        }
    );
}

#[tokio::test]
async fn a_body_that_cannot_replay_does_not_switch() {
    let calls = Arc::new(Mutex::new(0));
    let count = calls.clone();
    let inner = service_fn(move |_req: Request<Body>| {
        *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        async move {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, Error>(r)
        }
    });
    let svc = FallbackLayer::new(chain(vec![backup("b1")]))
        .unwrap_or_else(|e| panic!("{e}"))
        .layer(inner);
    let r = ok(svc
        .oneshot(Request::new(Body::from("{\"model\":\"m\"}")))
        .await);
    assert_eq!(r.status(), 503);
    assert_eq!(*calls.lock().unwrap_or_else(|p| p.into_inner()), 1);
    let log = r
        .extensions()
        .get::<AttemptLog>()
        .unwrap_or_else(|| panic!("log"))
        .snapshot();
    assert_eq!(
        log.attempts[0].decisions,
        [Decision::Stop(StopReason::NotReplayable)]
    );
}

#[test]
fn an_unapproved_credential_route_is_rejected_at_build() {
    for (route, list) in [
        (
            backup("b1").set_header("Authorization", "Bearer other"),
            "set_headers",
        ),
        (backup("b1").set_header("x-api-key", "other"), "set_headers"),
        (backup("b1").remove_header("api-key"), "remove_headers"),
    ] {
        let err = FallbackLayer::new(chain(vec![route.clone()]))
            .err()
            .unwrap_or_else(|| panic!("accepted {route:?}"));
        assert_eq!(err.field(), format!("fallback.routes[0].{list}"));
        assert!(err.reason().contains("changes credentials"), "{err}");
        assert!(
            !err.to_string().contains("other"),
            "no key in the error: {err}"
        );
        let mut policy = Policy::interactive();
        policy.fallback = chain(vec![route.clone()]);
        assert!(FallbackLayer::from_policy(&policy).is_err());
        assert!(Fallback::new((), chain(vec![route.clone()])).is_err());
        // Approved, it builds.
        assert!(FallbackLayer::new(chain(vec![route.approve_credentials()])).is_ok());
    }
}

#[test]
fn bad_chains_are_rejected_at_build() {
    let cases = [
        (
            chain(vec![RouteConfig::new("b").base_url("not a url")]),
            "fallback.routes[0].base_url",
        ),
        (
            chain(vec![RouteConfig::new("b").base_url("/relative")]),
            "fallback.routes[0].base_url",
        ),
        (
            chain(vec![RouteConfig::new("b").set_header("bad header", "v")]),
            "fallback.routes[0].set_headers",
        ),
        (
            chain(vec![RouteConfig::new("primary")]),
            "fallback.routes[0].name",
        ),
        (
            chain(vec![RouteConfig::new("bäckup")]),
            "fallback.routes[0].name",
        ),
    ];
    for (policy, field) in cases {
        let err = FallbackLayer::new(policy)
            .err()
            .map(|e| e.field().to_owned());
        assert_eq!(err.as_deref(), Some(field));
    }
    let mut p = chain(vec![]);
    p.blocked_models = vec!["b-model".into()];
    p.routes.push(backup("b"));
    assert_eq!(
        FallbackLayer::new(p)
            .err()
            .map(|e| e.field().to_owned())
            .as_deref(),
        Some("fallback.routes[0].model")
    );
}

#[tokio::test]
async fn a_log_from_outside_is_shared_not_owned() {
    let mut req = request();
    let outer = AttemptLog::new();
    req.extensions_mut().insert(outer.clone());
    let replies = HashMap::from([(
        "primary",
        Reply::Status(503, Some(FailureClass::Overloaded), ""),
    )]);
    let layer = FallbackLayer::new(chain(vec![backup("b1")])).unwrap_or_else(|e| panic!("{e}"));
    let (svc, _) = transport(replies);
    let r = ok(layer.layer(svc).oneshot(req).await);
    // The owner (outside) sets the outcome and puts the log in the response.
    assert!(r.extensions().get::<AttemptLog>().is_none());
    let log = outer.snapshot();
    assert_eq!(log.attempts.len(), 2);
    assert_eq!(log.selected_route, Some("b1".into()));
    assert_eq!(log.outcome, None);
}

/// A service that fails any call not preceded by its own `poll_ready`.
#[derive(Clone)]
struct Strict<S> {
    inner: S,
    ready: bool,
}

type TestFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, Error>> + Send>,
>;

impl<S> Service<Request<Full<Bytes>>> for Strict<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = Response<Full<Bytes>>;
    type Error = Error;
    type Future = TestFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let r = self.inner.poll_ready(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.ready = true;
        }
        r
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> TestFuture {
        if !std::mem::replace(&mut self.ready, false) {
            return Box::pin(async {
                Err(Error::new(ErrorKind::FailedClosed {
                    class: FailureClass::InvalidRequest,
                }))
            });
        }
        Box::pin(self.inner.call(req))
    }
}

#[tokio::test]
async fn every_hop_waits_for_readiness() {
    let busy = || Reply::Status(503, Some(FailureClass::Overloaded), "");
    let (svc, seen) = transport(HashMap::from([("primary", busy()), ("b1", busy())]));
    let strict = Strict {
        inner: svc,
        ready: false,
    };
    let mut fallback = FallbackLayer::new(chain(vec![backup("b1"), backup("b2")]))
        .unwrap_or_else(|e| panic!("{e}"))
        .layer(strict);
    let r = ok(fallback
        .ready()
        .await
        .map(|s| s.call(request()))
        .unwrap_or_else(|e| panic!("{e}"))
        .await);
    assert_eq!(r.status(), 200);
    assert_eq!(
        routes_of(&seen.lock().unwrap_or_else(|p| p.into_inner())),
        ["primary", "b1", "b2"]
    );
}

#[test]
fn the_service_and_its_future_are_send_and_clone() {
    fn send<T: Send>(_: &T) {}
    fn clone<T: Clone>(_: &T) {}
    let (svc, _) = transport(HashMap::new());
    let mut fallback = FallbackLayer::new(chain(vec![backup("b1")]))
        .unwrap_or_else(|e| panic!("{e}"))
        .layer(svc);
    clone(&fallback);
    let future = fallback.call(request());
    send(&future);
    send(&fallback);
}
