//! The drill (`cargo run --example drill`) as a test: the same scenarios, every verdict asserted,
//! and a few specifics of each checked again from its attempt logs.

#![cfg(feature = "testing")]

#[path = "../examples/drill/scenarios.rs"]
mod scenarios;

use std::time::Duration;

use scenarios::{Call, ScenarioReport};
use tower_llm_resilience::attempt_log::{
    Decision, LocalEventKind, LogSnapshot, StopReason, StreamEnd,
};
use tower_llm_resilience::{ErrorKind, FailureClass, StreamCause};

fn scenario<'a>(reports: &'a [ScenarioReport], name: &str) -> &'a ScenarioReport {
    reports
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no scenario named {name:?}"))
}

fn call<'a>(report: &'a ScenarioReport, label: &str) -> &'a Call {
    report
        .calls
        .iter()
        .find(|c| c.label == label)
        .unwrap_or_else(|| panic!("{}: no call {label:?}", report.name))
}

fn log<'a>(report: &ScenarioReport, call: &'a Call) -> &'a LogSnapshot {
    call.log
        .as_ref()
        .unwrap_or_else(|| panic!("{}: {} has no log", report.name, call.label))
}

fn routes(log: &LogSnapshot) -> Vec<String> {
    log.attempts
        .iter()
        .map(|a| a.route.as_ref().map(|r| r.to_string()).unwrap_or_default())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn every_scenario_of_the_drill_keeps_the_ladders_promise() {
    let reports = scenarios::run_all().await;
    assert_eq!(reports.len(), 12);
    for (i, r) in reports.iter().enumerate() {
        assert!(r.passed, "{}", scenarios::render(i + 1, reports.len(), r));
        assert!(r.checks.iter().all(|c| c.ok));
        assert!(!r.calls.is_empty(), "{}: no request", r.name);
    }

    // 1. 429 with Retry-After: two attempts, the wait at least the server's.
    let r = scenario(&reports, "429 with Retry-After");
    let l = log(r, call(r, "request"));
    assert_eq!(routes(l), ["primary", "primary"]);
    assert_eq!(l.attempts[0].status, Some(429));
    assert_eq!(l.attempts[0].retry_after, Some(Duration::from_secs(2)));
    let (wait, _) = l.attempts[0].wait().expect("a retry followed");
    assert!(wait >= Duration::from_secs(2));
    assert!(l.attempts[1].offset >= l.attempts[0].offset + l.attempts[0].latency + wait);
    assert_eq!(l.attempts[1].status, Some(200));

    // 2. Overload then recovery: 503, 529, 200 on the primary.
    let r = scenario(&reports, "overload then recovery");
    let l = log(r, call(r, "request"));
    let statuses: Vec<_> = l.attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [Some(503), Some(529), Some(200)]);
    assert_eq!(routes(l), ["primary"; 3]);

    // 3. Sustained outage: backup, then the primary again.
    let r = scenario(&reports, "sustained outage");
    let served: Vec<_> = r.calls.iter().map(|c| c.result.route()).collect();
    assert_eq!(
        served,
        [
            Some("backup"),
            Some("backup"),
            Some("backup"),
            Some("backup"),
            Some("backup"),
            Some("primary"),
            Some("primary"),
            Some("primary"),
            Some("primary"),
            Some("primary")
        ]
    );
    // Ten failures in a row trip it: three requests of three attempts, then request 4's first,
    // whose answer hands it to the backup at once.
    let fourth = log(r, call(r, "request 4"));
    assert_eq!(routes(fourth), ["primary", "backup"]);
    assert_eq!(
        fourth.attempts[0].decisions.first(),
        Some(&Decision::Stop(StopReason::CircuitOpen))
    );
    let fifth = log(r, call(r, "request 5"));
    assert_eq!(routes(fifth), ["backup"]);
    assert!(
        fifth
            .events
            .iter()
            .any(|e| matches!(e.kind, LocalEventKind::CircuitOpen { .. }))
    );
    assert!(r.notes.iter().any(|n| n.contains("open -> half_open")));
    assert!(r.notes.iter().any(|n| n.contains("half_open -> closed")));

    // 4. 401: one attempt, no switch.
    let r = scenario(&reports, "401 unauthorized");
    let c = call(r, "request");
    assert_eq!(c.result.status(), Some(401));
    let l = log(r, c);
    assert_eq!(l.attempts.len(), 1);
    assert_eq!(l.attempts[0].class, Some(FailureClass::Auth));

    // 5. Context overflow: the larger-context route only.
    let r = scenario(&reports, "context overflow");
    let l = log(r, call(r, "request"));
    assert_eq!(routes(l), ["primary", "long-context"]);
    assert_eq!(l.attempts[0].class, Some(FailureClass::ContextOverflow));
    assert_eq!(
        l.selected_route.as_ref().map(|r| r.to_string()).as_deref(),
        Some("long-context")
    );

    // 6. Exhausted quota: fail closed.
    let r = scenario(&reports, "exhausted quota");
    let c = call(r, "request");
    assert_eq!(c.result.status(), Some(429));
    let l = log(r, c);
    assert_eq!(l.attempts.len(), 1);
    assert_eq!(l.attempts[0].class, Some(FailureClass::QuotaExhausted));
    assert!(
        !l.attempts[0]
            .decisions
            .iter()
            .any(|d| matches!(d, Decision::Fallback { .. }))
    );

    // 7. Stall before the first token: retried, the caller sees the second answer only.
    let r = scenario(&reports, "stall before the first token");
    let c = call(r, "request");
    assert_eq!(c.result.answer(), "Hello again");
    let l = log(r, c);
    assert_eq!(l.attempts.len(), 2);
    assert_eq!(l.attempts[0].class, Some(FailureClass::Timeout));
    assert!(matches!(
        l.attempts[0].stream.as_ref().map(|s| &s.end),
        Some(StreamEnd::FailedBeforeCommit(
            StreamCause::FirstTokenTimeout(_)
        ))
    ));

    // 8. Cut after tokens, commit first_event: interrupted, one request.
    let r = scenario(&reports, "cut after tokens (commit first_event)");
    let c = call(r, "request");
    assert_eq!(
        c.result.body_error(),
        Some(&ErrorKind::StreamInterrupted {
            delivered_bytes: c.result.body().len() as u64,
            cause: StreamCause::Disconnected,
        })
    );
    assert_eq!(log(r, c).attempts.len(), 1);

    // 9. The same cut, commit end: one complete answer from the backup.
    let r = scenario(&reports, "cut after tokens (commit end)");
    let c = call(r, "request");
    assert_eq!(c.result.route(), Some("backup"));
    assert!(c.result.body_error().is_none());
    assert_eq!(c.result.body().matches("data: [DONE]").count(), 1);
    assert_eq!(routes(log(r, c)), ["primary", "backup"]);

    // 10. Spend cap: the second request fails closed before it is sent.
    let r = scenario(&reports, "spend cap reached");
    assert_eq!(call(r, "request 1").result.status(), Some(200));
    let c = call(r, "request 2");
    assert!(matches!(
        c.result.error(),
        Some(ErrorKind::BudgetExhausted { owner: Some(o) }) if o == "drill-team"
    ));
    assert!(log(r, c).attempts.is_empty());

    // 11. Rate limit: queued in order, then a rejection with a retry_in.
    let r = scenario(&reports, "rate limit, queue and reject");
    let offsets: Vec<_> = ["batch 1", "batch 2", "batch 3"]
        .iter()
        .map(|label| log(r, call(r, label)).attempts[0].offset)
        .collect();
    assert_eq!(
        offsets,
        [
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(2)
        ]
    );
    let retry_in = match call(r, "interactive 2").result.error() {
        Some(ErrorKind::RateLimited { retry_in }) => *retry_in,
        other => panic!("expected RateLimited, got {other:?}"),
    };
    assert!(retry_in > Duration::ZERO && retry_in <= Duration::from_secs(1));

    // 12. Every model down: three attempts on each model, then the in-process rules.
    let r = scenario(&reports, "every model down: the rule-based tier");
    let l = log(r, call(r, "request"));
    assert_eq!(
        routes(l),
        [
            "primary", "primary", "primary", "backup", "backup", "backup", "rules"
        ]
    );
    assert_eq!(l.attempts[6].status, Some(200));
    assert_eq!(call(r, "request").result.route(), Some("rules"));
}

#[tokio::test(start_paused = true)]
async fn the_drill_output_has_every_table_and_verdict_and_its_json_every_log() {
    let reports = scenarios::run_all().await;
    let total = reports.len();
    for (i, r) in reports.iter().enumerate() {
        let text = scenarios::render(i + 1, total, r);
        assert!(text.contains(r.promise), "{text}");
        assert!(text.contains("decisions"), "the attempt table: {text}");
        assert!(
            text.lines().any(|l| l.starts_with("PASS  ")),
            "the verdict line: {text}"
        );
    }

    let json = scenarios::to_json(&reports);
    assert_eq!(json["clock"], "virtual");
    assert_eq!(json["total"], 12);
    assert_eq!(json["passed"], 12);
    let first = &json["scenarios"][0];
    assert_eq!(first["name"], "429 with Retry-After");
    assert_eq!(first["passed"], true);
    let log = &first["calls"][0]["log"];
    assert_eq!(log["requested_route"], "primary");
    assert_eq!(log["attempts"].as_array().map(Vec::len), Some(2));
    assert_eq!(log["attempts"][0]["status"], 429);
    assert_eq!(log["attempts"][0]["retry_after"], 2000);
    assert_eq!(log["attempts"][0]["class"], "rate_limited");
    // Every request of every scenario carries its log.
    for s in json["scenarios"].as_array().into_iter().flatten() {
        for c in s["calls"].as_array().into_iter().flatten() {
            assert!(c["log"].is_object(), "{}: {}", s["name"], c["label"]);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_drill_is_deterministic() {
    let render = |reports: &[ScenarioReport]| {
        reports
            .iter()
            .enumerate()
            .map(|(i, r)| scenarios::render(i + 1, reports.len(), r))
            .collect::<String>()
    };
    let first = render(&scenarios::run_all().await);
    let second = render(&scenarios::run_all().await);
    assert_eq!(first, second);
}
