//! The drill: the whole recovery ladder, one scenario at a time, with no network.
//!
//! ```text
//! cargo run --example drill                    # print every scenario's attempt table and verdict
//! cargo run --example drill -- --json out.json # also write the attempt logs as JSON to out.json
//! cargo run --example drill -- --json -        # JSON to stdout (the tables then go to stderr)
//! ```
//!
//! Each scenario starts an embedded `MockProvider` on 127.0.0.1, builds the full stack
//! (Budget → Fallback → Retry → CircuitBreaker → StreamGuard) from one `Policy` with
//! `ResilienceLayer` around a hyper-util client, and sends real HTTP requests over loopback:
//!
//!  1. 429 with Retry-After — the retry waits at least the server's wait and succeeds;
//!  2. overload then recovery — 503, 529, then 200 on the same route;
//!  3. sustained outage — the breaker opens, the backup serves, the primary is probed and back;
//!  4. 401 — fail closed: one attempt, no switch;
//!  5. context overflow — only the larger-context route is tried;
//!  6. exhausted quota — fail closed: no approved other budget owner;
//!  7. stall before the first token — retried invisibly, the caller sees only the second answer;
//!  8. cut after tokens, commit `first_event` — `StreamInterrupted`, no second request;
//!  9. the same cut, commit `end` — rescued by the backup, exactly one complete answer;
//! 10. spend cap reached — `BudgetExhausted`, fail closed;
//! 11. rate limit — batch work queues in FIFO order; interactive work gets `RateLimited`.
//!
//! The drill runs on a tokio runtime whose clock is paused: every wait (Retry-After, backoff,
//! timeouts, open circuits, queues) passes in virtual time, so the whole run takes about a
//! second of real time and the milliseconds printed are exact and the same on every run (all
//! jitter is seeded).
//!
//! For each scenario it prints a header with what the ladder promises, each request's attempt
//! chain as a table (the `AttemptLog`'s `Display`), and a `PASS`/`FAIL` verdict with the
//! observed outcome; then a summary line. The exit status is 0 when every scenario kept its
//! promise, 1 when one did not, 2 on a usage error.
//!
//! `--json PATH` writes, per scenario, its verdict, its checks and each request's result and
//! attempt log (the serde form of `LogSnapshot`) to `PATH`; `--json -` writes it to stdout.
//!
//! The same scenarios run in `cargo test` (`tests/drill.rs`), which asserts every verdict.

mod scenarios;

use std::io::Write;
use std::process::ExitCode;

enum JsonTo {
    None,
    Stdout,
    File(String),
}

fn usage() -> &'static str {
    "usage: drill [--json PATH | --json -]"
}

fn parse_args() -> Result<JsonTo, String> {
    let mut json = JsonTo::None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => match args.next() {
                Some(p) if p == "-" => json = JsonTo::Stdout,
                Some(p) if !p.starts_with("--") => json = JsonTo::File(p),
                _ => {
                    return Err(format!(
                        "--json needs a path (or - for stdout)\n{}",
                        usage()
                    ));
                }
            },
            "-h" | "--help" => return Err(usage().to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{}", usage())),
        }
    }
    Ok(json)
}

fn main() -> ExitCode {
    let json = match parse_args() {
        Ok(json) => json,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    // Paused time: waits pass in virtual time, exactly and at once.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drill: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let reports = runtime.block_on(scenarios::run_all());
    let real = started.elapsed();

    // With JSON on stdout, the human report goes to stderr so the JSON stays parseable.
    let mut out: Box<dyn Write> = match json {
        JsonTo::Stdout => Box::new(std::io::stderr()),
        _ => Box::new(std::io::stdout()),
    };
    let total = reports.len();
    let passed = reports.iter().filter(|r| r.passed).count();
    let virtual_ms: u128 = reports.iter().map(|r| r.elapsed.as_millis()).sum();
    let mut text = format!(
        "tower-llm-resilience drill: {total} scenarios through the full stack (Budget → Fallback → \
         Retry → CircuitBreaker → StreamGuard → hyper-util)\nagainst an embedded MockProvider on \
         127.0.0.1 that answers after {}ms and streams an event every {}ms.\nvirtual clock: every \
         time below is exact virtual milliseconds, the same on every run (jitter seed {}).\n\n",
        scenarios::HEAD_LATENCY.as_millis(),
        scenarios::EVENT_GAP.as_millis(),
        scenarios::SEED
    );
    for (i, report) in reports.iter().enumerate() {
        text.push_str(&scenarios::render(i + 1, total, report));
        text.push('\n');
    }
    text.push_str(&format!(
        "drill: {passed}/{total} scenarios kept the ladder's promise \
         ({virtual_ms}ms virtual, {:.1}s real)\n",
        real.as_secs_f64()
    ));
    for r in reports.iter().filter(|r| !r.passed) {
        text.push_str(&format!("  FAIL {}: {}\n", r.name, r.observed));
    }
    // A closed pipe (`drill | head`) is not a failed drill.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();

    let doc = scenarios::to_json(&reports);
    match json {
        JsonTo::None => {}
        JsonTo::Stdout => {
            let mut stdout = std::io::stdout();
            if let Err(e) = serde_json::to_writer_pretty(&mut stdout, &doc)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(stdout))
            {
                eprintln!("drill: cannot write the JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
        JsonTo::File(path) => {
            let written = serde_json::to_vec_pretty(&doc)
                .map_err(std::io::Error::from)
                .and_then(|bytes| std::fs::write(&path, bytes));
            match written {
                Ok(()) => eprintln!("drill: attempt logs written to {path}"),
                Err(e) => {
                    eprintln!("drill: cannot write {path}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if passed == total {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
