//! Policy validation: every `PolicyError` case, the presets, and the example policy files.

use std::time::Duration;

#[path = "support/log.rs"]
mod log;
use log::ms;

use tower_llm_resilience::FailureClass;
use tower_llm_resilience::policy::*;

fn throttle(p: &mut Policy) -> &mut ThrottlePolicy {
    p.circuit_breaker
        .throttle
        .get_or_insert_with(ThrottlePolicy::default)
}

fn rate(p: &mut Policy) -> &mut FailureRateRule {
    p.circuit_breaker
        .failure_rate
        .get_or_insert_with(FailureRateRule::default)
}

type Case = (&'static str, fn(&mut Policy));

/// Each case breaks exactly one value of a valid policy; the error must name that field.
const CASES: &[Case] = &[
    ("workflow", |p| p.workflow = " ".into()),
    ("retry.max_attempts", |p| p.retry.max_attempts = 0),
    ("retry.backoff.base", |p| {
        p.retry.backoff.base = Duration::ZERO
    }),
    ("retry.backoff.cap", |p| p.retry.backoff.cap = ms(100)),
    ("retry.per_class.rate_limited.cap", |p| {
        p.retry.per_class.insert(
            FailureClass::RateLimited,
            BackoffPolicy::new(ms(900), ms(800)),
        );
    }),
    ("retry.max_server_wait", |p| {
        p.retry.max_server_wait = Duration::ZERO
    }),
    ("retry.max_elapsed", |p| {
        p.retry.max_elapsed = Duration::ZERO
    }),
    ("retry.attempt_header", |p| {
        p.retry.attempt_header = Some("bad header".into())
    }),
    ("circuit_breaker.failure_rate.threshold", |p| {
        rate(p).threshold = 1.5;
    }),
    ("circuit_breaker.failure_rate.threshold", |p| {
        rate(p).threshold = -0.1;
    }),
    ("circuit_breaker.failure_rate.threshold", |p| {
        rate(p).threshold = f64::NAN;
    }),
    ("circuit_breaker.failure_rate.threshold", |p| {
        rate(p).threshold = 0.0;
    }),
    ("circuit_breaker.failure_rate.window", |p| {
        rate(p).window = Duration::ZERO;
    }),
    ("circuit_breaker.failure_rate.buckets", |p| {
        rate(p).buckets = 0;
    }),
    ("circuit_breaker.failure_rate.buckets", |p| {
        rate(p).buckets = 1001;
    }),
    ("circuit_breaker.failure_rate.min_calls", |p| {
        rate(p).min_calls = 0;
    }),
    ("circuit_breaker.consecutive_failures", |p| {
        p.circuit_breaker.consecutive_failures = Some(0)
    }),
    ("circuit_breaker.slow_call.threshold", |p| {
        p.circuit_breaker.slow_call = Some(SlowCallRule::new(Duration::ZERO, 0.5));
    }),
    ("circuit_breaker.slow_call.rate", |p| {
        p.circuit_breaker.slow_call = Some(SlowCallRule::new(ms(10), 2.0));
    }),
    ("circuit_breaker.slow_call.rate", |p| {
        p.circuit_breaker.slow_call = Some(SlowCallRule::new(ms(10), 0.0));
    }),
    ("circuit_breaker.slow_call", |p| {
        p.circuit_breaker.failure_rate = None;
        p.circuit_breaker.slow_call = Some(SlowCallRule::new(ms(10), 0.5));
    }),
    ("circuit_breaker.open_base", |p| {
        p.circuit_breaker.open_base = Duration::ZERO
    }),
    ("circuit_breaker.open_cap", |p| {
        p.circuit_breaker.open_cap = ms(1)
    }),
    ("circuit_breaker.half_open_probes", |p| {
        p.circuit_breaker.half_open_probes = 0
    }),
    ("circuit_breaker.half_open_successes", |p| {
        p.circuit_breaker.half_open_successes = 0
    }),
    ("circuit_breaker.throttle.k", |p| throttle(p).k = 0.5),
    ("circuit_breaker.throttle.k", |p| throttle(p).k = f64::NAN),
    ("circuit_breaker.throttle.k", |p| {
        throttle(p).k = f64::INFINITY
    }),
    ("circuit_breaker.throttle.window", |p| {
        throttle(p).window = Duration::ZERO
    }),
    ("circuit_breaker.throttle.buckets", |p| {
        throttle(p).buckets = 0
    }),
    ("circuit_breaker.throttle.buckets", |p| {
        throttle(p).buckets = 1001
    }),
    ("circuit_breaker.throttle.min_requests", |p| {
        throttle(p).min_requests = 0
    }),
    ("circuit_breaker.throttle.hold", |p| {
        throttle(p).hold = Duration::from_secs(61)
    }),
    ("fallback.primary", |p| p.fallback.primary = String::new()),
    ("fallback.primary", |p| {
        p.fallback.primary = "caf\u{e9}".into()
    }),
    ("fallback.primary", |p| {
        p.fallback.primary = "gpt\t4o".into()
    }),
    ("fallback.routes[0].name", |p| {
        p.fallback.routes = vec![RouteConfig::new("backup\u{7f}")]
    }),
    ("fallback.max_total_attempts", |p| {
        p.fallback.max_total_attempts = 0
    }),
    ("fallback.routes[0].name", |p| {
        p.fallback.routes = vec![RouteConfig::new("")]
    }),
    ("fallback.routes[1].name", |p| {
        p.fallback.routes = vec![RouteConfig::new("b"), RouteConfig::new("b")];
    }),
    ("fallback.routes[0].name", |p| {
        p.fallback.routes = vec![RouteConfig::new("primary")]
    }),
    ("fallback.routes[0].base_url", |p| {
        p.fallback.routes = vec![RouteConfig::new("b").base_url("not a url")];
    }),
    ("fallback.routes[0].base_url", |p| {
        p.fallback.routes = vec![RouteConfig::new("b").base_url("/relative/only")];
    }),
    ("fallback.routes[0].set_headers", |p| {
        p.fallback.routes = vec![RouteConfig::new("b").set_header("bad name", "v")];
    }),
    ("fallback.routes[0].set_headers", |p| {
        p.fallback.routes = vec![RouteConfig::new("b").set_header("x-ok", "line\nbreak")];
    }),
    ("fallback.routes[0].remove_headers", |p| {
        p.fallback.routes = vec![RouteConfig::new("b").remove_header("bad name")];
    }),
    ("fallback.routes[0].set_headers", |p| {
        p.fallback.routes = vec![RouteConfig::new("b").set_header("Authorization", "Bearer other")];
    }),
    ("fallback.routes[0].remove_headers", |p| {
        p.fallback.routes = vec![RouteConfig::new("b").remove_header("x-api-key")];
    }),
    ("fallback.routes[0].model", |p| {
        p.fallback.blocked_models = vec!["cheap".into()];
        p.fallback.routes = vec![RouteConfig::new("b").model("cheap")];
    }),
    ("fallback.routes[0].model", |p| {
        p.fallback.allowed_models = vec!["approved".into()];
        p.fallback.routes = vec![RouteConfig::new("b").model("other")];
    }),
    ("fallback.last_resort.status", |p| {
        p.fallback.last_resort = Some(StaticResponse::json(1000, "{}"))
    }),
    ("fallback.last_resort.content_type", |p| {
        let mut r = StaticResponse::json(200, "{}");
        r.content_type = "a\nb".into();
        p.fallback.last_resort = Some(r);
    }),
    ("budget.retry_budget.ratio", |p| {
        p.budget.retry_budget = RetryBudgetPolicy::Ratio {
            ratio: 1.2,
            min_per_sec: 1,
            ttl: ms(1000),
        };
    }),
    ("budget.retry_budget.ttl", |p| {
        p.budget.retry_budget = RetryBudgetPolicy::Ratio {
            ratio: 0.2,
            min_per_sec: 1,
            ttl: Duration::ZERO,
        };
    }),
    ("budget.retry_budget.ttl", |p| {
        p.budget.retry_budget = RetryBudgetPolicy::Ratio {
            ratio: 0.2,
            min_per_sec: 1,
            ttl: Duration::from_secs(7200),
        };
    }),
    ("budget.retry_budget.capacity", |p| {
        p.budget.retry_budget = RetryBudgetPolicy::TokenBucket {
            capacity: 0,
            refill_per_sec: 1.0,
            per_request: 0.1,
        };
    }),
    ("budget.retry_budget.refill_per_sec", |p| {
        p.budget.retry_budget = RetryBudgetPolicy::TokenBucket {
            capacity: 5,
            refill_per_sec: f64::NAN,
            per_request: 0.1,
        };
    }),
    ("budget.retry_budget.per_request", |p| {
        p.budget.retry_budget = RetryBudgetPolicy::TokenBucket {
            capacity: 5,
            refill_per_sec: 1.0,
            per_request: -1.0,
        };
    }),
    ("budget.deadline", |p| {
        p.budget.deadline = Some(Duration::ZERO)
    }),
    ("budget.rate_limit.requests_per_second", |p| {
        let mut r = RateLimitPolicy::default();
        r.requests_per_second = Some(0.0);
        p.budget.rate_limit = Some(r);
    }),
    ("budget.rate_limit.requests_per_second", |p| {
        let mut r = RateLimitPolicy::default();
        r.requests_per_second = Some(f64::INFINITY);
        p.budget.rate_limit = Some(r);
    }),
    ("budget.rate_limit.burst", |p| {
        let mut r = RateLimitPolicy::default();
        r.requests_per_second = Some(1.0);
        r.burst = 0;
        p.budget.rate_limit = Some(r);
    }),
    ("budget.rate_limit.tokens_per_minute", |p| {
        let mut r = RateLimitPolicy::default();
        r.tokens_per_minute = Some(0);
        p.budget.rate_limit = Some(r);
    }),
    ("budget.rate_limit", |p| {
        p.budget.rate_limit = Some(RateLimitPolicy::default())
    }),
    ("budget.admission.max_wait", |p| {
        p.budget.admission = AdmissionMode::Queue {
            max_wait: Duration::ZERO,
            max_queued: 1,
        };
    }),
    ("budget.admission.max_queued", |p| {
        p.budget.admission = AdmissionMode::Queue {
            max_wait: ms(1),
            max_queued: 0,
        };
    }),
    ("budget.spend.cap", |p| {
        p.budget.spend = Some(SpendPolicy::default())
    }),
    ("budget.spend.window", |p| {
        let mut s = SpendPolicy::default();
        s.cap = 1.0;
        s.window = Duration::ZERO;
        p.budget.spend = Some(s);
    }),
    ("budget.spend.owner_header", |p| {
        let mut s = SpendPolicy::default();
        s.cap = 1.0;
        s.owner_header = "no good".into();
        p.budget.spend = Some(s);
    }),
    ("budget.spend.prices.primary.output_per_mtok", |p| {
        let mut s = SpendPolicy::default();
        s.cap = 1.0;
        s.prices.insert("primary".into(), Price::new(1.0, -3.0));
        p.budget.spend = Some(s);
    }),
    ("budget.spend.default_price.input_per_mtok", |p| {
        let mut s = SpendPolicy::default();
        s.cap = 1.0;
        s.default_price = Some(Price::new(f64::NAN, 1.0));
        p.budget.spend = Some(s);
    }),
    ("stream.first_token_timeout", |p| {
        p.stream.first_token_timeout = Some(Duration::ZERO)
    }),
    ("stream.idle_timeout", |p| {
        p.stream.idle_timeout = Some(Duration::ZERO)
    }),
    ("stream.total_timeout", |p| {
        p.stream.total_timeout = Some(Duration::ZERO)
    }),
    ("stream.total_timeout", |p| {
        p.stream.first_token_timeout = Some(Duration::from_secs(30));
        p.stream.total_timeout = Some(Duration::from_secs(10));
    }),
    ("stream.commit.bytes", |p| {
        p.stream.commit = CommitPoint::AfterBytes { bytes: 0 }
    }),
    ("stream.commit.bytes", |p| {
        p.stream.max_buffer = 10;
        p.stream.commit = CommitPoint::AfterBytes { bytes: 11 };
    }),
    ("stream.commit.duration", |p| {
        p.stream.commit = CommitPoint::AfterDuration {
            duration: Duration::ZERO,
        }
    }),
    ("stream.max_buffer", |p| p.stream.max_buffer = 0),
    ("stream.routes.primary.idle_timeout", |p| {
        let mut s = p.stream.defaults();
        s.idle_timeout = Some(Duration::ZERO);
        p.stream.routes.insert("primary".into(), s);
    }),
    ("stream.routes.nowhere", |p| {
        let s = p.stream.defaults();
        p.stream.routes.insert("nowhere".into(), s);
    }),
    ("idempotency.key_header", |p| {
        p.idempotency.key_header = Some("bad:header".into())
    }),
    ("observability.models[1]", |p| {
        p.observability.models = vec!["gpt-4o".into(), " ".into()]
    }),
    ("observability.alert_window", |p| {
        p.observability.alert_window = Duration::ZERO
    }),
    ("observability.alert_queue", |p| {
        p.observability.alert_queue = 0
    }),
];

#[test]
fn metrics_need_the_metrics_feature() {
    let mut p = Policy::interactive();
    assert!(!p.observability.metrics, "off by default");
    assert!(p.observability.alerts, "on by default");
    p.observability.metrics = true;
    let e = p.validate().err().map(|e| e.field().to_owned());
    if cfg!(feature = "metrics") {
        assert_eq!(e, None);
    } else {
        assert_eq!(e.as_deref(), Some("observability.metrics"));
    }
}

#[test]
fn every_policy_error_names_its_field() {
    for (field, break_it) in CASES {
        let mut p = Policy::interactive();
        break_it(&mut p);
        match p.validate() {
            Err(e) => {
                assert_eq!(e.field(), *field, "{e}");
                assert!(!e.reason().is_empty());
                assert!(e.to_string().contains(field), "{e}");
            }
            Ok(()) => panic!("case for `{field}` validated"),
        }
    }
}

#[test]
fn a_primary_route_name_must_be_visible_ascii() {
    // it travels in the `x-llm-route` response header
    for bad in [
        "gpt-4o\u{e9}",
        "\u{1f916}-route",
        "gpt\t4o",
        "line\nbreak",
        "nul\0",
        "del\u{7f}",
        "nbsp\u{a0}x",
    ] {
        let mut p = Policy::interactive();
        p.fallback.primary = bad.to_owned();
        let e = p.validate().expect_err(bad);
        assert_eq!(e.field(), "fallback.primary", "{bad:?}: {e}");
        assert_eq!(
            e.reason(),
            format!("{bad:?} must be visible ASCII (it is sent in a header)"),
            "{bad:?}"
        );
        assert!(
            e.to_string()
                .starts_with("invalid policy: `fallback.primary` "),
            "{e}"
        );
    }
    // visible ASCII and the space are fine
    let mut p = Policy::interactive();
    p.fallback.primary = "openai gpt-4o (eu) ~#1".to_owned();
    assert_eq!(p.validate(), Ok(()));
}

#[cfg(feature = "serde")]
#[test]
fn from_json_reports_a_non_ascii_primary_by_its_field() {
    let e = Policy::from_json(r#"{"fallback":{"primary":"gpt-4o\u00e9"}}"#)
        .expect_err("non-ASCII primary");
    assert_eq!(e.field(), "fallback.primary", "{e}");
    assert!(e.reason().contains("visible ASCII"), "{e}");
}

#[cfg(feature = "serde")]
#[test]
fn from_json_names_json_as_the_field_and_says_why() {
    let cases: &[(&str, &[&str])] = &[
        ("{not json", &["key must be a string", "line 1 column 2"]),
        ("{\"retry\":", &["EOF while parsing", "line 1 column 9"]),
        ("", &["a policy is a JSON object"]),
        ("42", &["a policy is a JSON object"]),
        // serde's derive would read an array as the fields in order
        ("[\"support\"]", &["a policy is a JSON object"]),
        (
            "{\"retry\":{\"max_attempts\":\"three\"}}",
            &["invalid type: string \"three\"", "expected u32"],
        ),
        ("{\"workflow\":\"a\"} trailing", &["trailing characters"]),
        // unknown keys: at the top, and inside a section
        (
            "{\"retyr\":{}}",
            &["unknown field `retyr`", "expected one of"],
        ),
        (
            "{\"retry\":{\"max_atempts\":3}}",
            &["unknown field `max_atempts`", "max_attempts"],
        ),
        (
            "{\"fallback\":{\"routes\":[{\"name\":\"b\",\"modle\":\"x\"}]}}",
            &["unknown field `modle`"],
        ),
    ];
    for (json, why) in cases {
        let e = Policy::from_json(json).expect_err(json);
        assert_eq!(e.field(), "<json>", "{json}: {e}");
        for w in *why {
            assert!(
                e.reason().contains(w),
                "{json}: {:?} lacks {w:?}",
                e.reason()
            );
        }
        assert!(
            e.to_string().starts_with("invalid policy: `<json>` "),
            "{e}"
        );
    }
    // the same keys spelled right are accepted: the errors above are about the typos
    assert!(Policy::from_json("{\"retry\":{\"max_attempts\":3}}").is_ok());
    assert!(Policy::from_json("{}").is_ok());
}

#[test]
fn presets_are_valid_and_differ_where_the_workflows_do() {
    let i = Policy::interactive()
        .validated()
        .unwrap_or_else(|e| panic!("{e}"));
    let b = Policy::batch()
        .validated()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(Policy::default(), i);
    assert_eq!(i.budget.admission, AdmissionMode::Reject);
    assert!(matches!(b.budget.admission, AdmissionMode::Queue { .. }));
    assert_eq!(i.stream.commit, CommitPoint::FirstEvent);
    assert_eq!(b.stream.commit, CommitPoint::End);
    assert!(b.retry.max_attempts > i.retry.max_attempts);
    assert!(b.retry.max_server_wait > i.retry.max_server_wait);
}

#[test]
fn approved_credential_route_is_valid() {
    let mut p = Policy::interactive();
    p.fallback.routes = vec![
        RouteConfig::new("azure")
            .base_url("https://azure.example/openai")
            .set_header("api-key", "k")
            .remove_header("authorization")
            .approve_credentials(),
    ];
    assert_eq!(p.validate(), Ok(()));
}

#[test]
fn route_debug_never_prints_header_values() {
    let r = RouteConfig::new("azure")
        .set_header("api-key", "sk-canary-123")
        .approve_credentials();
    let printed = format!("{r:?} {:?}", {
        let mut p = Policy::interactive();
        p.fallback.routes = vec![r.clone()];
        p
    });
    assert!(!printed.contains("sk-canary-123"), "{printed}");
    assert!(printed.contains("api-key"));
}

#[cfg(feature = "serde")]
mod files {
    use super::*;

    fn example(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn example_toml_loads_and_validates() {
        let p: Policy = toml::from_str(&example("policy.toml")).unwrap_or_else(|e| panic!("{e}"));
        let p = p.validated().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.workflow, "support-chat");
        assert_eq!(p.retry.max_server_wait, Duration::from_secs(10));
        assert_eq!(
            p.retry.backoff_for(FailureClass::RateLimited).base,
            Duration::from_secs(1)
        );
        assert_eq!(p.fallback.routes.len(), 2);
        assert!(p.fallback.routes[1].larger_context);
        assert_eq!(p.actions.get(FailureClass::Timeout).retry, RetryRule::Never);
        // An override of one cell keeps the class's other defaults.
        assert_eq!(
            p.actions.get(FailureClass::Timeout).fallback,
            FallbackRule::Yes
        );
        assert_eq!(p.stream.total_timeout, Some(Duration::from_secs(300)));
        assert_eq!(p.budget.admission, AdmissionMode::Reject);
        let spend = p.budget.spend.as_ref().map(|s| s.prices.len());
        assert_eq!(spend, Some(3));
        assert!(!p.observability.metrics);
        assert_eq!(p.observability.models, ["gpt-4o"]);
        assert_eq!(p.observability.alert_window, Duration::from_secs(600));
    }

    #[test]
    fn example_json_is_the_twin_of_the_toml() {
        let from_toml: Policy =
            toml::from_str(&example("policy.toml")).unwrap_or_else(|e| panic!("{e}"));
        let from_toml = from_toml.validated().unwrap_or_else(|e| panic!("{e}"));
        let from_json =
            Policy::from_json(&example("policy.json")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(from_json, from_toml);
        assert_eq!(format!("{from_json:?}"), format!("{from_toml:?}"));
        assert_eq!(
            serde_json::to_value(&from_json).unwrap(),
            serde_json::to_value(&from_toml).unwrap()
        );
        // not only the same policy: the same keys and values written, section by section
        let toml_tree: toml::Value =
            toml::from_str(&example("policy.toml")).unwrap_or_else(|e| panic!("{e}"));
        let toml_tree = serde_json::to_value(toml_tree).unwrap();
        let json_tree: serde_json::Value =
            serde_json::from_str(&example("policy.json")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json_tree, toml_tree);
        // and it is the support-chat policy, not a preset
        assert_eq!(from_json.workflow, "support-chat");
        assert_ne!(from_json, Policy::interactive());
        assert_eq!(from_json.fallback.primary, "openai-gpt-4o");
        assert_eq!(from_json.fallback.routes.len(), 2);
    }

    #[test]
    fn example_batch_json_loads_and_validates() {
        let p = Policy::from_json(&example("policy-batch.json")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.workflow, "nightly-summaries");
        assert_eq!(p.stream.commit, CommitPoint::End);
        assert_eq!(
            p.budget.admission,
            AdmissionMode::Queue {
                max_wait: Duration::from_secs(600),
                max_queued: 10_000
            }
        );
        assert_eq!(
            p.actions.get(FailureClass::QuotaExhausted).fallback,
            FallbackRule::ApprovedOwner
        );
        assert_eq!(
            p.stream.for_route(Some("bedrock-sonnet")).idle_timeout,
            Some(Duration::from_secs(90))
        );
        let defer = p
            .budget
            .defer
            .clone()
            .unwrap_or_else(|| panic!("a defer section"));
        assert_eq!(defer.first_delay, Duration::from_secs(300));
        assert_eq!(defer.max_deferrals, 5);
        let twin = Policy::from_json(&example("policy.json")).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(p, twin);
    }

    #[test]
    fn every_example_policy_file_validates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let p = match path.extension().and_then(|e| e.to_str()) {
                Some("json") => Policy::from_json(&example(&name)),
                Some("toml") => toml::from_str::<Policy>(&example(&name))
                    .map_err(|e| PolicyError::new("<toml>", e.to_string()))
                    .and_then(Policy::validated),
                _ => continue,
            };
            p.unwrap_or_else(|e| panic!("{name}: {e}"));
            seen.push(name);
        }
        for name in ["policy-batch.json", "policy.json", "policy.toml"] {
            assert!(
                seen.iter().any(|s| s == name),
                "{name} missing from {seen:?}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_errors() {
        let typo = toml::from_str::<Policy>("[retry]\nmax_atempts = 3\n");
        assert!(typo.is_err_and(|e| e.to_string().contains("max_atempts")));
        let bad = toml::from_str::<Policy>("[retry]\nmax_elapsed = \"ten seconds\"\n");
        assert!(bad.is_err_and(|e| e.to_string().contains("invalid duration")));
        let bad_class = toml::from_str::<Policy>("[actions.sometimes]\nretry = \"never\"\n");
        assert!(bad_class.is_err());
        let e = Policy::from_json("{\"retry\":{\"max_attempts\":0}}").err();
        assert_eq!(
            e.map(|e| e.field().to_owned()).as_deref(),
            Some("retry.max_attempts")
        );
        assert!(Policy::from_json("{not json").is_err());
    }

    #[test]
    fn the_throttle_section_loads_from_toml_and_json_and_can_be_turned_off() {
        let toml_policy: Policy = toml::from_str(
            "[circuit_breaker.throttle]\nk = 3.0\nwindow = \"2s\"\nbuckets = 20\nmin_requests = 4\nhold = \"0s\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let t = toml_policy.circuit_breaker.throttle.unwrap_or_default();
        assert_eq!(
            (t.k, t.window, t.buckets, t.min_requests, t.hold),
            (3.0, Duration::from_secs(2), 20, 4, Duration::ZERO)
        );
        // A field left out takes the section's default; a typo is an error.
        let partial: Policy = toml::from_str("[circuit_breaker.throttle]\nk = 4.0\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let t = partial.circuit_breaker.throttle.unwrap_or_default();
        assert_eq!((t.k, t.window), (4.0, ThrottlePolicy::default().window));
        assert_eq!(t.hold, Duration::from_secs(5));
        let typo = toml::from_str::<Policy>("[circuit_breaker.throttle]\nfloor = 3\n");
        assert!(typo.is_err_and(|e| e.to_string().contains("floor")));
        // JSON `null` turns the throttle off; a bad value names its field.
        let off = Policy::from_json(r#"{"circuit_breaker":{"throttle":null}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(off.circuit_breaker.throttle, None);
        let bad = Policy::from_json(r#"{"circuit_breaker":{"throttle":{"k":0.5}}}"#).err();
        assert_eq!(
            bad.map(|e| e.field().to_owned()).as_deref(),
            Some("circuit_breaker.throttle.k")
        );
        // The presets have it on.
        assert_eq!(
            Policy::interactive().circuit_breaker.throttle,
            Some(ThrottlePolicy::default())
        );
    }

    #[test]
    fn a_policy_round_trips_through_json() {
        let p = Policy::batch();
        let json = serde_json::to_string(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Policy::from_json(&json), Ok(p));
    }
}

#[test]
fn a_first_token_limit_longer_than_the_deadline_is_refused() {
    let mut p = Policy::interactive();
    let deadline = p.budget.deadline.unwrap_or(Duration::from_secs(60));
    // A reasoning route given a long first-token limit the deadline would never let happen.
    let mut slow = p.stream.for_route(None);
    slow.first_token_timeout = Some(deadline + Duration::from_secs(1));
    p.stream.routes.insert("primary".to_owned(), slow);
    let e = p.validate().err().unwrap_or_else(|| panic!("accepted"));
    assert_eq!(
        e.field(),
        "stream.routes.primary.first_token_timeout",
        "{e}"
    );
    assert!(e.reason().contains("budget.deadline"), "{e}");
    // As long as the deadline is fine; without a deadline anything is.
    slow.first_token_timeout = Some(deadline);
    p.stream.routes.insert("primary".to_owned(), slow);
    assert!(p.validate().is_ok());
    // The defaults are a bound under any deadline.
    p.stream.first_token_timeout = Some(deadline * 2);
    assert!(p.validate().is_ok());
    slow.first_token_timeout = Some(deadline * 2);
    p.stream.routes.insert("primary".to_owned(), slow);
    p.budget.deadline = None;
    assert!(p.validate().is_ok());
    // Every preset is coherent.
    for preset in [Policy::interactive(), Policy::batch()] {
        assert!(preset.validate().is_ok());
    }
}

#[cfg(feature = "serde")]
#[test]
fn capabilities_are_written_as_what_a_route_lacks() {
    let toml = r#"
[fallback]
primary = "openai"
primary_capabilities = { vision = false }

[[fallback.routes]]
name = "small-local"
base_url = "http://127.0.0.1:8000/v1"
capabilities = { context_tokens = 8192, tools = false }
"#;
    let p: Policy = toml::from_str(toml).unwrap_or_else(|e| panic!("{e}"));
    let p = p.validated().unwrap_or_else(|e| panic!("{e}"));
    assert!(!p.fallback.primary_capabilities.vision);
    assert!(
        p.fallback.primary_capabilities.tools,
        "what is not written is supported"
    );
    let small = &p.fallback.routes[0].capabilities;
    assert_eq!(small.context_tokens, Some(8192));
    assert!(!small.tools && small.vision && small.streaming && small.json_mode);
    let typo = toml::from_str::<Policy>("[fallback]\nprimary_capabilities = { vison = false }\n");
    assert!(typo.is_err(), "unknown capability names are errors");
}
