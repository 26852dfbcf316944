//! Outage simulation: load amplification, success rate, latency, time to detect an outage and
//! time back on the primary, for each client setup under each provider script. Virtual time:
//! the whole run takes seconds of CPU, and the same seed gives the same table.
//!
//! ```text
//! cargo bench --bench outage
//! ```
//!
//! Under `cargo test --benches` it runs the small parameters only.
//!
//! With `OUTAGE_REPORT=path` set, the table is also written to `path` as JSON lines, one
//! object per row (see `sim::json_row`), for a script to check.

#[path = "sim/mod.rs"]
mod sim;

use std::io::Write;
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
    let mut json = std::env::var_os("OUTAGE_REPORT").map(|path| {
        let file = std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("OUTAGE_REPORT {}: {e}", path.to_string_lossy()));
        std::io::BufWriter::new(file)
    });
    println!("{}", sim::TABLE_HEADER);
    for scenario in Scenario::standard(params.duration) {
        for setup in Setup::ALL {
            let report = sim::run(setup, &scenario, &params);
            println!("{}", sim::table_row(&scenario, setup, &report));
            if let Some(out) = json.as_mut() {
                writeln!(out, "{}", sim::json_row(&scenario, setup, &report))
                    .expect("OUTAGE_REPORT is writable");
            }
        }
    }
    println!();
    println!("Slow tail (latency is the time to the answer's head: its first token):");
    println!();
    println!("{}", sim::TABLE_HEADER);
    let scenario = Scenario::slow_tail();
    for setup in Setup::SLOW_TAIL {
        let report = sim::run(setup, &scenario, &params);
        println!("{}", sim::table_row(&scenario, setup, &report));
        if let Some(out) = json.as_mut() {
            writeln!(out, "{}", sim::json_row(&scenario, setup, &report))
                .expect("OUTAGE_REPORT is writable");
        }
    }
    if let Some(mut out) = json {
        out.flush().expect("OUTAGE_REPORT is writable");
    }
    println!();
    println!(
        "(simulated in {:.1} s of wall-clock time)",
        wall.elapsed().as_secs_f64()
    );
}
