//! Outage simulation: load amplification, success rate, latency, time to detect an outage and
//! time back on the primary, for each client setup under each provider script. Virtual time:
//! the whole run takes seconds of CPU, and the same seed gives the same table.
//!
//! ```text
//! cargo bench --bench outage
//! ```
//!
//! Under `cargo test --benches` it runs the small parameters only.

#[path = "sim/mod.rs"]
mod sim;

use std::time::Instant;

use sim::{Params, Scenario, Setup};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let params = if full {
        Params::standard()
    } else {
        Params::small()
    };
    let wall = Instant::now();
    println!(
        "Outage simulation: {} clients, {} s of virtual time, think time {} ms (exponential), \
         success latency {}–{} ms, failure latency {}–{} ms, seed {}.",
        params.clients,
        params.duration.as_secs(),
        params.think.as_millis(),
        params.ok_latency.0.as_millis(),
        params.ok_latency.1.as_millis(),
        params.fail_latency.0.as_millis(),
        params.fail_latency.1.as_millis(),
        params.seed,
    );
    println!();
    println!("{}", sim::TABLE_HEADER);
    for scenario in Scenario::standard(params.duration) {
        for setup in Setup::ALL {
            let report = sim::run(setup, &scenario, &params);
            println!("{}", sim::table_row(&scenario, setup, &report));
        }
    }
    println!();
    println!(
        "(simulated in {:.1} s of wall-clock time)",
        wall.elapsed().as_secs_f64()
    );
}
