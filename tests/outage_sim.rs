//! The outage simulator at small parameters, in virtual time: the interactive stack keeps load
//! amplification within its bound under a total outage, serves a route with no backup about as
//! well as retry-only clients (it throttles instead of failing everything, and waits out a
//! young outage), is back on the
//! primary within a second of an outage's end with or without a backup route, and with a backup
//! serves what it served before the throttle.
//!
//! The full run is `cargo bench --bench outage`; the figures are in BENCHMARKS.md.

#[path = "../benches/sim/mod.rs"]
mod sim;

use std::time::Duration;

use sim::{Params, Report, Scenario, Script, Setup};

fn scenario(script: Script) -> Scenario {
    Scenario {
        name: format!("{script:?}"),
        script,
    }
}

fn run(setup: Setup, script: Script) -> Report {
    sim::run(setup, &scenario(script), &Params::small())
}

const PEERS: [Setup; 4] = [
    Setup::FixedRetries,
    Setup::TowerRetry,
    Setup::TowerRetryBudget,
    Setup::TowerResilienceRetry,
];

#[test]
fn total_outage_amplification_stays_within_the_bound() {
    let naive = run(Setup::FixedRetries, Script::Independent(1.0));
    let ours = run(Setup::Interactive, Script::Independent(1.0));

    // Sanity: the simulator counts every attempt of a naive client (1 + 3 retries each).
    assert!(naive.logical > 100, "{naive:?}");
    assert_eq!(naive.primary_calls, 4 * naive.logical, "{naive:?}");
    assert_eq!(naive.successes, 0);

    assert!(ours.logical > 100, "{ours:?}");
    assert_eq!(ours.successes, 0);
    assert!(
        ours.amplification() <= 1.1,
        "attempts per logical request {} > 1.1: {ours:?}",
        ours.amplification()
    );
    // The throttle sheds: the outage is detected, i.e. requests are kept off the route.
    assert!(
        matches!(ours.detect.as_slice(), [Some(_)]),
        "never detected: {ours:?}"
    );
}

#[test]
fn independent_failures_keep_the_success_rate_of_naive_retries() {
    let naive = run(Setup::FixedRetries, Script::Independent(0.10));
    let ours = run(Setup::Interactive, Script::Independent(0.10));
    assert!(
        ours.success_rate() >= 0.99 * naive.success_rate(),
        "{} < 99 % of {}",
        ours.success_rate(),
        naive.success_rate()
    );
    // ...with fewer attempts than a client that retries three times.
    assert!(ours.amplification() <= naive.amplification());
}

#[test]
fn with_no_backup_route_every_scenario_is_served_about_as_well_as_by_retries() {
    let params = Params::small();
    for s in Scenario::standard(params.duration) {
        let ours = sim::run(Setup::Interactive, &s, &params);
        let peers: Vec<Report> = PEERS.iter().map(|p| sim::run(*p, &s, &params)).collect();
        let best = peers.iter().map(|r| r.successes).max().unwrap_or(0);
        let budget = &peers[2];
        assert!(
            ours.successes as f64 >= 0.9 * best as f64,
            "{}: {} served < 90 % of the best peer's {best}",
            s.name,
            ours.successes
        );
        // At least what `tower::retry` with the same retry budget serves — except after an
        // outage older than the throttle's hold: that peer's requests that meet its end wait
        // in their backoff (up to 3 s) and are answered, ours fail fast, as a request must on
        // a route down for longer than a blip, and the row is a tie over many seeds (0.8
        // below on average over 61 at these parameters, ±6 from seed to seed; BENCHMARKS.md
        // has the figures). There it must stay within 2 %.
        let bound = match s.script {
            Script::Outage { .. } => 0.98 * budget.successes as f64,
            _ => budget.successes as f64,
        };
        assert!(
            ours.successes as f64 >= bound,
            "{}: {} served < {bound} (TpsBudget peer: {})",
            s.name,
            ours.successes,
            budget.successes
        );
    }
}

#[test]
fn back_on_the_primary_within_a_second_of_recovery() {
    let outage = Script::Outage {
        start: Duration::from_secs(15),
        end: Duration::from_secs(30),
    };
    for setup in [Setup::Interactive, Setup::InteractiveBackup] {
        let r = run(setup, outage.clone());
        match r.back_on_primary.as_slice() {
            [Some(back)] => assert!(*back <= Duration::from_secs(1), "{setup}: {r:?}"),
            other => panic!("{setup}: never back on the primary: {other:?}"),
        }
        assert!(matches!(r.detect.as_slice(), [Some(_)]), "{setup}: {r:?}");
    }
}

#[test]
fn with_a_backup_route_every_scenario_is_served_as_before() {
    // What the interactive stack with a backup route served at these parameters before the
    // throttle (all-or-nothing breaker, open 2–5 s, closed by one good probe), scenario by
    // scenario as `Scenario::standard` lists them.
    const BEFORE: [u64; 7] = [672, 660, 614, 639, 662, 664, 653];
    let params = Params::small();
    for (s, before) in Scenario::standard(params.duration).iter().zip(BEFORE) {
        let r = sim::run(Setup::InteractiveBackup, s, &params);
        // Every request is served by one route or the other...
        assert_eq!(r.successes, r.logical, "{}: {r:?}", s.name);
        // ...and as many as before, to within 0.5 %: probing the primary a few times a second
        // during an outage makes some requests a failed probe slower (the figures are in
        // BENCHMARKS.md; the 30–60 s outage of the full run serves more than before).
        assert!(
            r.successes as f64 >= 0.995 * before as f64,
            "{}: {} served, {before} before",
            s.name,
            r.successes
        );
    }
}

#[test]
fn a_run_is_deterministic() {
    let script = Script::Flapping {
        start: Duration::from_secs(10),
        down: Duration::from_secs(5),
        up: Duration::from_secs(10),
    };
    for setup in [Setup::TowerRetry, Setup::Interactive] {
        let a = run(setup, script.clone());
        let b = run(setup, script.clone());
        assert_eq!(a, b, "{setup}");
    }
}

#[test]
fn a_report_row_is_a_json_object_with_the_documented_fields() {
    let s = scenario(Script::Outage {
        start: Duration::from_secs(15),
        end: Duration::from_secs(30),
    });
    let r = sim::run(Setup::Interactive, &s, &Params::small());
    let row = sim::json_row(&s, Setup::Interactive, &r);
    let line = row.to_string();
    assert!(!line.contains('\n'), "one line per row");
    let back = r.back_on_primary[0].map(|d| d.as_secs_f64());
    assert_eq!(
        row,
        serde_json::json!({
            "scenario": s.name,
            "setup": "this crate, interactive",
            "logical": r.logical,
            "succeeded": r.successes,
            "attempts_per_request": r.amplification(),
            "back_on_primary_s": back,
        })
    );
    assert!(row["back_on_primary_s"].is_f64());
    // A scenario with no outage window that ends has no time back on the primary.
    let s = scenario(Script::Independent(0.5));
    let r = sim::run(Setup::Interactive, &s, &Params::small());
    assert!(sim::json_row(&s, Setup::Interactive, &r)["back_on_primary_s"].is_null());
}

#[test]
fn hedging_cuts_the_slow_tail_at_a_bounded_cost() {
    let params = Params::small();
    let s = Scenario::slow_tail();
    let peers: Vec<Report> = PEERS.iter().map(|&p| sim::run(p, &s, &params)).collect();
    for (off, on) in [
        (Setup::Interactive, Setup::InteractiveHedged),
        (Setup::InteractiveBackup, Setup::InteractiveBackupHedged),
    ] {
        let off = sim::run(off, &s, &params);
        let r = sim::run(on, &s, &params);
        assert_eq!(r.successes, r.logical, "{on}: {r:?}");
        // The 99th percentile at least three times lower than without hedging and than
        // every peer's...
        assert!(
            r.p99 * 3 <= off.p99,
            "{on}: p99 {:?} vs {:?} off",
            r.p99,
            off.p99
        );
        for peer in &peers {
            assert!(
                r.p99 * 3 <= peer.p99,
                "{on}: p99 {:?} vs {:?}",
                r.p99,
                peer.p99
            );
        }
        // ...for at most 10 % more attempts per request than a peer's one each.
        assert!(r.amplification() <= 1.10, "{on}: {}", r.amplification());
        // The median is not made worse.
        assert!(r.p50 <= off.p50, "{on}: p50 {:?} vs {:?}", r.p50, off.p50);
    }
}
