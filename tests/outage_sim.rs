//! The outage simulator at small parameters, in virtual time: the interactive stack keeps load
//! amplification within its bound under a total outage, keeps the success rate of naive retries
//! under independent failures, and is back on the primary soon after an outage ends.
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
    // The breaker fast-fails: the outage is detected, i.e. requests are kept off the route.
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
fn back_on_the_primary_within_ten_seconds_of_recovery() {
    let outage = Script::Outage {
        start: Duration::from_secs(15),
        end: Duration::from_secs(30),
    };
    for setup in [Setup::Interactive, Setup::InteractiveBackup] {
        let r = run(setup, outage.clone());
        match r.back_on_primary.as_slice() {
            [Some(back)] => assert!(*back <= Duration::from_secs(10), "{setup}: {r:?}"),
            other => panic!("{setup}: never back on the primary: {other:?}"),
        }
        assert!(matches!(r.detect.as_slice(), [Some(_)]), "{setup}: {r:?}");
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
