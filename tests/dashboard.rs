//! `docs/grafana-dashboard.json` charts only metrics the crate records, under the names a
//! Prometheus exporter gives them, and has the panels the README promises.

use tower_llm_resilience::observe::names;

fn dashboard() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric names in a PromQL expression: identifiers starting with a known prefix.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts = rest.starts_with("gen_ai_") || rest.starts_with("llm_resilience_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push(rest[..len].to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn every_series_charted_is_one_the_crate_records() {
    let known: Vec<String> = names::METRICS.iter().map(|m| m.replace('.', "_")).collect();
    let d = dashboard();
    let panels = d["panels"].as_array().expect("panels");
    let mut charted = Vec::new();
    for p in panels {
        let title = p["title"].as_str().expect("a title");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("an expression");
            let found = metrics_in(expr);
            assert!(!found.is_empty(), "{title}: {expr}");
            for m in found {
                // Label names such as `gen_ai_token_type` are not series.
                if m == "gen_ai_token_type" {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| m.strip_suffix(s).filter(|b| known.iter().any(|k| k == b)))
                    .unwrap_or(&m)
                    .to_owned();
                assert!(
                    known.contains(&base),
                    "{title}: {m} is not a metric of the crate"
                );
                charted.push(base);
            }
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for t in [
        "Requests by outcome",
        "Attempts per request",
        "Fallbacks",
        "Breaker state per route",
        "Time to first token",
        "Spend",
    ] {
        assert!(titles.contains(&t), "no panel {t:?} in {titles:?}");
    }
    for m in [
        names::REQUESTS,
        names::ATTEMPTS,
        names::FALLBACKS,
        names::CIRCUIT_STATE,
        names::SPEND,
    ] {
        assert!(charted.contains(&m.replace('.', "_")), "{m} is not charted");
    }
}
