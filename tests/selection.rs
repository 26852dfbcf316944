//! Route selection strategies: `weighted`, `lowest_latency`, `lowest_cost`. The real hyper-util
//! client against `MockProvider` on loopback, under a paused clock (so latencies are exact).
#![cfg(feature = "testing")]
#![allow(clippy::field_reassign_with_default)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::attempt_log::LocalEventKind;
use tower_llm_resilience::policy::{Price, RouteConfig, RouteStrategy, SpendPolicy};
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey, chat_request, client};
use tower_llm_resilience::{AttemptLog, Policy, ResilienceLayer, RouteName};

#[path = "support/prices.rs"]
mod prices;
#[path = "support/served.rs"]
mod served;
use served::served;

const MODELS: [&str; 3] = ["gpt-4o", "mid", "cheap"];

/// The primary (`gpt-4o`) and two backups, `mid` and `cheap`, each on its own path of `mock`.
fn policy(mock: &MockProvider, strategy: RouteStrategy) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(11);
    p.fallback.selection.strategy = strategy;
    p.fallback.routes = ["mid", "cheap"]
        .into_iter()
        .map(|m| {
            RouteConfig::new(m)
                .base_url(format!("{}/{m}", mock.url()))
                .model(m)
        })
        .collect();
    p
}

fn script(mock: &MockProvider, model: &str, head: Duration, n: usize) {
    mock.script(
        ScriptKey::model(model),
        (0..n).map(|_| Reply::openai_chat(model, "served").delay_head(head)),
    );
}

/// Sends one chat request through `svc`: the route that served it and the request's log.
async fn send<S>(svc: &mut S, mock: &MockProvider) -> (String, AttemptLog)
where
    S: Service<
            http::Request<Full<Bytes>>,
            Response = http::Response<tower_llm_resilience::Body>,
            Error = tower_llm_resilience::Error,
        >,
{
    served(svc, chat_request(&mock.url(), "gpt-4o", false)).await
}

/// The `route_chosen` event of a request: strategy, candidates, reason.
fn chosen(log: &AttemptLog) -> (RouteStrategy, Vec<String>, String) {
    let events: Vec<_> = log
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            LocalEventKind::RouteChosen {
                strategy,
                candidates,
                reason,
            } => Some((
                strategy,
                candidates.iter().map(RouteName::to_string).collect(),
                reason,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(events.len(), 1, "one choice per request");
    events.into_iter().next().expect("one")
}

#[tokio::test(start_paused = true)]
async fn lowest_latency_moves_to_the_faster_route_and_back_when_it_recovers() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut p = policy(&mock, RouteStrategy::LowestLatency);
    p.fallback.routes.truncate(1);
    p.fallback.selection.explore = 0.2;
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    script(&mock, "gpt-4o", Duration::from_millis(800), 100);
    script(&mock, "mid", Duration::from_millis(200), 100);

    // Neither route is measured: the primary first, then `mid`, each measured once.
    let (route, log) = send(&mut svc, &mock).await;
    assert_eq!(route, "primary");
    let (strategy, candidates, reason) = chosen(&log);
    assert_eq!(strategy, RouteStrategy::LowestLatency);
    assert_eq!(candidates, ["primary", "mid"]);
    assert_eq!(reason, "lowest time to first token (not measured yet)");
    let (route, log) = send(&mut svc, &mock).await;
    assert_eq!(route, "mid");
    assert_eq!(
        chosen(&log).2,
        "lowest time to first token (not measured yet)"
    );
    assert_eq!(mock.request_count(), 2, "no route was called for nothing");

    // `mid` is faster: it leads every request but the explored ones.
    let mut on_mid = 0;
    for _ in 0..20 {
        let (route, log) = send(&mut svc, &mock).await;
        if route == "mid" {
            on_mid += 1;
            assert_eq!(chosen(&log).2, "lowest time to first token (200 ms)");
        } else {
            assert!(
                chosen(&log).2.starts_with("exploring"),
                "{:?}",
                chosen(&log)
            );
        }
    }
    assert!(on_mid >= 14, "{on_mid} of 20 on the faster route");

    // `mid` slows to 1.5 s: 0.2 × 1500 + 0.8 × 200 = 460 ms, then 668 ms, then 834 ms, past
    // the primary's 800 ms. Within three of its own answers traffic leaves it.
    script(&mock, "mid", Duration::from_millis(1500), 100);
    let mut slow_answers = 0;
    let mut left_after = None;
    for i in 0..20 {
        let (route, log) = send(&mut svc, &mock).await;
        let (_, candidates, _) = chosen(&log);
        if route == "mid" {
            slow_answers += 1;
        }
        if slow_answers >= 3 && candidates[0] == "primary" && left_after.is_none() {
            left_after = Some(i);
        }
    }
    assert!(left_after.is_some(), "traffic never left the slowed route");
    let mut on_primary = 0;
    for _ in 0..20 {
        if send(&mut svc, &mock).await.0 == "primary" {
            on_primary += 1;
        }
    }
    assert!(
        on_primary >= 14,
        "{on_primary} of 20 on the now faster primary"
    );

    // `mid` recovers: exploration measures it again and it leads once more.
    script(&mock, "mid", Duration::from_millis(200), 100);
    let mut back_after = None;
    for i in 0..40 {
        let (_, log) = send(&mut svc, &mock).await;
        let (_, candidates, reason) = chosen(&log);
        if candidates[0] == "mid" && reason.starts_with("lowest") {
            back_after = Some(i);
            break;
        }
    }
    let back_after = back_after.expect("traffic came back to the recovered route");
    assert!(back_after < 40);
    let mut on_mid = 0;
    for _ in 0..20 {
        if send(&mut svc, &mock).await.0 == "mid" {
            on_mid += 1;
        }
    }
    assert!(on_mid >= 14, "{on_mid} of 20 back on the recovered route");
}

#[tokio::test(start_paused = true)]
async fn lowest_latency_counts_a_failure_against_the_route() {
    let mock = MockProvider::start().await.expect("mock starts");
    let mut p = policy(&mock, RouteStrategy::LowestLatency);
    p.fallback.routes.truncate(1);
    p.fallback.selection.explore = 0.0;
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    script(&mock, "gpt-4o", Duration::from_millis(300), 100);
    script(&mock, "mid", Duration::from_millis(400), 100);
    assert_eq!(send(&mut svc, &mock).await.0, "primary");
    assert_eq!(send(&mut svc, &mock).await.0, "mid");
    assert_eq!(send(&mut svc, &mock).await.0, "primary");
    // The primary fails a request (every retry): its estimate doubles, past `mid`'s, and the
    // hop serves the request on `mid`.
    mock.script(
        ScriptKey::model("gpt-4o"),
        (0..3).map(|_| Reply::openai_server_error()),
    );
    let (route, _) = send(&mut svc, &mock).await;
    assert_eq!(route, "mid");
    script(&mock, "gpt-4o", Duration::from_millis(300), 100);
    let (route, log) = send(&mut svc, &mock).await;
    assert_eq!(route, "mid", "the failed route no longer leads");
    assert_eq!(chosen(&log).1, ["mid", "primary"]);
}

fn priced(mock: &MockProvider) -> Policy {
    let mut p = policy(mock, RouteStrategy::LowestCost);
    prices::lowest_cost(
        &mut p,
        &[
            ("primary", 3.0, 15.0),
            ("mid", 1.0, 1.0),
            ("cheap", 0.15, 0.6),
        ],
    );
    p
}

#[tokio::test(start_paused = true)]
async fn lowest_cost_sends_the_request_to_the_cheapest_route() {
    let mock = MockProvider::start().await.expect("mock starts");
    for m in MODELS {
        script(&mock, m, Duration::from_millis(100), 10);
    }
    let mut svc = ResilienceLayer::new(&priced(&mock))
        .expect("valid")
        .layer(client());
    for _ in 0..3 {
        let (route, log) = send(&mut svc, &mock).await;
        assert_eq!(route, "cheap");
        let (strategy, candidates, reason) = chosen(&log);
        assert_eq!(strategy, RouteStrategy::LowestCost);
        assert_eq!(candidates, ["cheap", "mid", "primary"]);
        assert!(reason.starts_with("lowest estimated cost ("), "{reason}");
    }
    let models: Vec<_> = mock
        .requests()
        .into_iter()
        .map(|r| r.model.unwrap_or_default())
        .collect();
    assert_eq!(
        models,
        ["cheap", "cheap", "cheap"],
        "the primary was never called"
    );
}

#[tokio::test(start_paused = true)]
async fn a_chain_in_cost_order_ends_on_the_primary_and_returns_the_first_failure() {
    let mock = MockProvider::start().await.expect("mock starts");
    mock.script(
        ScriptKey::model("cheap"),
        (0..3).map(|_| Reply::openai_server_error()),
    );
    mock.script(
        ScriptKey::model("mid"),
        (0..3).map(|_| Reply::openai_server_error()),
    );
    script(&mock, "gpt-4o", Duration::from_millis(100), 1);
    let mut p = priced(&mock);
    // Three attempts on each of three routes.
    p.fallback.max_total_attempts = 9;
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    // The strategy's first route is a choice, not a hop: both of `max_hops = 2` remain.
    let (route, log) = send(&mut svc, &mock).await;
    assert_eq!(route, "primary");
    let routes: Vec<_> = log
        .attempts()
        .iter()
        .map(|a| {
            a.route
                .as_ref()
                .map(RouteName::to_string)
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(routes.first().map(String::as_str), Some("cheap"));
    assert_eq!(routes.last().map(String::as_str), Some("primary"));
    assert!(routes.contains(&"mid".to_owned()), "{routes:?}");

    // Every route down: the caller gets the failure of the route tried first, marked so.
    for m in MODELS {
        mock.script(
            ScriptKey::model(m),
            (0..3).map(|_| Reply::openai_server_error()),
        );
    }
    let mut req = chat_request(&mock.url(), "gpt-4o", false);
    let log = AttemptLog::new();
    req.extensions_mut().insert(log.clone());
    let resp = svc.ready().await.expect("ready").call(req).await;
    let resp = resp.expect("the failure is an answer");
    assert_eq!(resp.status(), 500);
    assert_eq!(resp.headers()["x-llm-route"], "cheap");
    assert_eq!(
        log.snapshot()
            .selected_route
            .map(|r| r.to_string())
            .as_deref(),
        Some("cheap")
    );
}

#[tokio::test(start_paused = true)]
async fn weighted_draws_split_traffic_by_weight_and_a_failure_moves_on() {
    let mock = MockProvider::start().await.expect("mock starts");
    for m in MODELS {
        script(&mock, m, Duration::from_millis(100), 200);
    }
    let mut p = policy(&mock, RouteStrategy::Weighted);
    p.fallback.selection.primary_weight = 1;
    p.fallback.routes[0].weight = Some(3);
    p.fallback.routes[1].weight = Some(0);
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    let mut served = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        let (route, log) = send(&mut svc, &mock).await;
        let (strategy, candidates, reason) = chosen(&log);
        assert_eq!(strategy, RouteStrategy::Weighted);
        assert_eq!(candidates.last().map(String::as_str), Some("cheap"));
        assert!(reason.starts_with("drawn by weight ("), "{reason}");
        *served.entry(route).or_default() += 1;
    }
    assert_eq!(served.get("cheap"), None, "weight 0 leads no request");
    let mid = served.get("mid").copied().unwrap_or(0);
    assert!((65..=85).contains(&mid), "{served:?}: 3 : 1 by weight");

    // `mid` down: requests it leads go on to the next route drawn.
    mock.script(
        ScriptKey::model("mid"),
        (0..300).map(|_| Reply::openai_server_error()),
    );
    for _ in 0..10 {
        let (route, _) = send(&mut svc, &mock).await;
        assert_ne!(route, "mid");
    }
}

#[tokio::test(start_paused = true)]
async fn a_strategy_still_skips_a_route_the_request_cannot_use() {
    let mock = MockProvider::start().await.expect("mock starts");
    for m in MODELS {
        script(&mock, m, Duration::from_millis(100), 10);
    }
    let mut p = priced(&mock);
    // The cheapest route has no tools.
    p.fallback.routes[1].capabilities.tools = false;
    let mut svc = ResilienceLayer::new(&p).expect("valid").layer(client());
    let body = r#"{"model":"gpt-4o","max_tokens":100,"tools":[{"type":"function","function":{"name":"f"}}],"messages":[{"role":"user","content":"call f"}]}"#;
    let mut req = chat_request(&mock.url(), "gpt-4o", false);
    *req.body_mut() = Full::new(Bytes::from(body));
    let (route, log) = served(&mut svc, req).await;
    assert_eq!(route, "mid");
    let skipped: Vec<_> = log
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, LocalEventKind::RouteSkipped { .. }))
        .map(|e| e.route.map(|r| r.to_string()).unwrap_or_default())
        .collect();
    assert_eq!(skipped, ["cheap"]);
    assert_eq!(mock.request_count(), 1);
}

#[test]
fn lowest_cost_needs_a_price_for_every_route() {
    let mut p = Policy::interactive();
    p.fallback.selection.strategy = RouteStrategy::LowestCost;
    p.fallback.routes.push(RouteConfig::new("backup"));
    let err = p.validate().unwrap_err();
    assert_eq!(err.field(), "fallback.selection.strategy");
    let mut spend = SpendPolicy::default();
    spend.cap = 10.0;
    spend
        .prices
        .insert("primary".to_owned(), Price::new(1.0, 1.0));
    p.budget.spend = Some(spend.clone());
    assert!(
        p.validate().unwrap_err().reason().contains("\"backup\""),
        "{}",
        p.validate().unwrap_err()
    );
    spend.default_price = Some(Price::new(2.0, 2.0));
    p.budget.spend = Some(spend);
    assert!(p.validate().is_ok());
    p.fallback.selection.strategy = RouteStrategy::Weighted;
    p.fallback.selection.primary_weight = 0;
    p.fallback.routes[0].weight = Some(0);
    assert_eq!(
        p.validate().unwrap_err().field(),
        "fallback.selection.primary_weight"
    );
}
