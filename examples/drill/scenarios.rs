//! The drill's scenarios: each starts its own `MockProvider`, builds the whole stack from one
//! policy with `ResilienceLayer` around the hyper-util client of `testing::client()`, sends its
//! requests over loopback and checks that the ladder kept its promise.
//!
//! Shared by the example (`examples/drill/main.rs`) and by `tests/drill.rs`, so the command a
//! user runs and the test the CI runs are the same scenarios with the same verdicts.
//!
//! Every scenario must run on a tokio runtime with paused time: the waits (Retry-After, backoff,
//! first-token timeouts, breaker open times, rate-limit queues) then pass in virtual time, the
//! run takes well under a second of real time, and every printed time is exact.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::{
    Decision, LocalEventKind, LogSnapshot, Outcome, StopReason, StreamEnd, WaitSource,
};
use tower_llm_resilience::circuit_breaker::CircuitState;
use tower_llm_resilience::fallback::ROUTE_HEADER;
use tower_llm_resilience::policy::{
    AdmissionMode, CommitPoint, Price, RateLimitPolicy, RouteConfig, SpendPolicy,
};
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{
    AttemptLog, Body, BoxError, Error, ErrorKind, FailureClass, Policy, ResilienceLayer, Resilient,
    StreamCause,
};

/// Seed of every jitter source (retry backoff, breaker open times): the same run every time.
pub const SEED: u64 = 7;

/// The model the caller asks for on the primary route.
const MODEL: &str = "gpt-4o";
/// The backup route and its model.
const BACKUP: &str = "backup";
const BACKUP_MODEL: &str = "gpt-4o-backup";
/// The larger-context route and its model.
const LONG: &str = "long-context";
const LONG_MODEL: &str = "gpt-4.1-long";
/// The primary route's name (the policy's `fallback.primary`).
const PRIMARY: &str = "primary";
/// The budget owner of the drill's requests.
const OWNER: &str = "drill-team";
/// Header the drill numbers concurrent requests with, to see the order they reached the provider.
const SEQ_HEADER: &str = "x-drill-seq";

/// How long the mock takes to send a response head: a fast provider, so the tables show where
/// the time really goes (waits, timeouts, queues).
pub const HEAD_LATENCY: Duration = Duration::from_millis(80);
/// The gap before each event of a streamed answer.
pub const EVENT_GAP: Duration = Duration::from_millis(40);

/// The stack every scenario builds: the five layers around the hyper-util client.
type Stack = Resilient<Client<HttpConnector, Full<Bytes>>>;

/// One check of a scenario: what the ladder promises, and whether it held.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked, in a few words.
    pub what: String,
    /// Whether it held.
    pub ok: bool,
}

/// What the caller got for one logical request.
#[derive(Debug, Clone)]
pub enum CallResult {
    /// A response; its body was read to its end.
    Response {
        /// Its status.
        status: u16,
        /// The route that served it (`x-llm-route`).
        route: Option<String>,
        /// The body as it reached the caller.
        body: String,
        /// The error the body ended with, if it did not end cleanly.
        body_error: Option<ErrorKind>,
    },
    /// A crate error instead of a response.
    Error {
        /// Its kind.
        kind: ErrorKind,
        /// Its class.
        class: Option<FailureClass>,
    },
}

impl CallResult {
    /// The status of a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            CallResult::Response { status, .. } => Some(*status),
            CallResult::Error { .. } => None,
        }
    }

    /// The route that served a response.
    pub fn route(&self) -> Option<&str> {
        match self {
            CallResult::Response { route, .. } => route.as_deref(),
            CallResult::Error { .. } => None,
        }
    }

    /// The body of a response.
    pub fn body(&self) -> &str {
        match self {
            CallResult::Response { body, .. } => body,
            CallResult::Error { .. } => "",
        }
    }

    /// The error a response body ended with.
    pub fn body_error(&self) -> Option<&ErrorKind> {
        match self {
            CallResult::Response { body_error, .. } => body_error.as_ref(),
            CallResult::Error { .. } => None,
        }
    }

    /// The kind of a crate error.
    pub fn error(&self) -> Option<&ErrorKind> {
        match self {
            CallResult::Error { kind, .. } => Some(kind),
            CallResult::Response { .. } => None,
        }
    }

    /// The assistant's text: a chat completion's message, or a stream's deltas joined.
    pub fn answer(&self) -> String {
        answer_text(self.body())
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        match self {
            CallResult::Response {
                status,
                route,
                body,
                body_error,
            } => {
                let from = route.as_deref().unwrap_or("?");
                let mut line = format!("{status} from {from}");
                let answer = answer_text(body);
                if !answer.is_empty() {
                    let _ = write!(line, ", answer {:?}", short(&answer));
                } else if let Some(e) = provider_error(body) {
                    let _ = write!(line, ", provider error {e:?}");
                }
                if let Some(e) = body_error {
                    let _ = write!(line, "; body ended with error: {e}");
                }
                line
            }
            CallResult::Error { kind, class } => match class {
                Some(c) => format!("error ({c}): {kind}"),
                None => format!("error: {kind}"),
            },
        }
    }
}

/// One logical request the scenario sent through the stack.
#[derive(Debug, Clone)]
pub struct Call {
    /// What the request stands for.
    pub label: String,
    /// When it was sent, from the start of the scenario.
    pub at: Duration,
    /// From sending it to the end of its body (or its error).
    pub took: Duration,
    /// What the caller got.
    pub result: CallResult,
    /// Its attempt log, read after the body ended.
    pub log: Option<LogSnapshot>,
}

/// The outcome of one scenario.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// Short name.
    pub name: &'static str,
    /// What the ladder promises.
    pub promise: &'static str,
    /// How the scenario's policy differs from its preset.
    pub policy: &'static str,
    /// Whether every check held.
    pub passed: bool,
    /// The observed outcome, in one line.
    pub observed: String,
    /// Every check, in order.
    pub checks: Vec<Check>,
    /// Every logical request.
    pub calls: Vec<Call>,
    /// Further observations (circuit transitions, spend, …).
    pub notes: Vec<String>,
    /// Virtual time the scenario took.
    pub elapsed: Duration,
}

/// A scenario being run: its clock, its checks and its calls.
struct Run {
    t0: Instant,
    checks: Vec<Check>,
    calls: Vec<Call>,
    notes: Vec<String>,
    observed: String,
}

impl Run {
    fn new() -> Self {
        Self {
            t0: Instant::now(),
            checks: Vec::new(),
            calls: Vec::new(),
            notes: Vec::new(),
            observed: String::new(),
        }
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn check(&mut self, what: impl Into<String>, ok: bool) -> bool {
        self.checks.push(Check {
            what: what.into(),
            ok,
        });
        ok
    }

    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Sends `req` through `svc`, reads the answer to its end and records the call.
    async fn send(&mut self, label: &str, svc: &Stack, req: Request<Full<Bytes>>) -> Call {
        let at = self.now();
        let (result, log) = finish(svc.clone().oneshot(req)).await;
        let call = Call {
            label: label.to_owned(),
            at,
            took: self.now().saturating_sub(at),
            result,
            log,
        };
        self.calls.push(call.clone());
        call
    }

    /// Records a call whose future was driven elsewhere (concurrent requests).
    fn record(
        &mut self,
        label: &str,
        at: Duration,
        done: (CallResult, Option<LogSnapshot>, Duration),
    ) -> Call {
        let (result, log, end) = done;
        let call = Call {
            label: label.to_owned(),
            at,
            took: end.saturating_sub(at),
            result,
            log,
        };
        self.calls.push(call.clone());
        call
    }

    fn report(
        self,
        name: &'static str,
        promise: &'static str,
        policy: &'static str,
        outcome: Result<(), BoxError>,
    ) -> ScenarioReport {
        let mut checks = self.checks;
        let mut observed = self.observed;
        if let Err(e) = outcome {
            checks.push(Check {
                what: format!("the scenario ran to its end (it stopped: {e})"),
                ok: false,
            });
            if observed.is_empty() {
                observed = format!("the scenario could not run: {e}");
            }
        }
        if checks.is_empty() {
            checks.push(Check {
                what: "the scenario checked something".to_owned(),
                ok: false,
            });
        }
        let passed = checks.iter().all(|c| c.ok);
        ScenarioReport {
            name,
            promise,
            policy,
            passed,
            observed,
            checks,
            calls: self.calls,
            notes: self.notes,
            elapsed: self.t0.elapsed(),
        }
    }
}

/// Drives a call to its end: the response future, then the body, frame by frame, so an error
/// after bytes reached the caller is seen as the caller sees it.
async fn finish<F>(fut: F) -> (CallResult, Option<LogSnapshot>)
where
    F: Future<Output = Result<Response<Body>, Error>>,
{
    match fut.await {
        Ok(response) => {
            let status = response.status().as_u16();
            let route = response
                .headers()
                .get(ROUTE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let log = response.extensions().get::<AttemptLog>().cloned();
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            let mut body_error = None;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data() {
                            bytes.extend_from_slice(&data);
                        }
                    }
                    Err(e) => {
                        body_error = Some(e.kind().clone());
                        break;
                    }
                }
            }
            // The body is gone: the stream record and the settlement are in the log now.
            drop(body);
            let result = CallResult::Response {
                status,
                route,
                body: String::from_utf8_lossy(&bytes).into_owned(),
                body_error,
            };
            (result, log.map(|l| l.snapshot()))
        }
        Err(e) => {
            let log = e.attempt_log().map(AttemptLog::snapshot);
            let result = CallResult::Error {
                kind: e.kind().clone(),
                class: e.class(),
            };
            (result, log)
        }
    }
}

/// The assistant's text of a chat completion body or of an OpenAI event stream.
fn answer_text(body: &str) -> String {
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(body) {
        return json["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    let mut text = String::new();
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(data.trim()) {
            if let Some(delta) = event["choices"][0]["delta"]["content"].as_str() {
                text.push_str(delta);
            }
        }
    }
    text
}

/// `n` and the noun, plural when `n` is not 1.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// At most 40 characters of `text`, marked when cut.
fn short(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The provider's error code or type in an error body.
fn provider_error(body: &str) -> Option<String> {
    let json = serde_json::from_str::<serde_json::Value>(body).ok()?;
    let error = &json["error"];
    [&error["code"], &error["type"]]
        .into_iter()
        .find_map(|v| v.as_str().map(str::to_owned))
}

// ---------------------------------------------------------------------------------------------
// Policies and stacks

/// The interactive preset with seeded jitter and an idempotency key per logical request (so a
/// request the provider may have accepted can be sent again).
fn interactive() -> Policy {
    let mut p = Policy::interactive();
    p.workflow = "drill".to_owned();
    p.retry.seed = Some(SEED);
    p.fallback.primary = PRIMARY.to_owned();
    p.idempotency.key_header = Some("idempotency-key".to_owned());
    p
}

/// Scripts the answers to requests for `model`, each with the drill's latencies.
fn script(mock: &MockProvider, model: &str, replies: impl IntoIterator<Item = Reply>) {
    mock.script(
        ScriptKey::model(model),
        replies
            .into_iter()
            .map(|r| r.delay_head(HEAD_LATENCY).event_delay(EVENT_GAP)),
    );
}

fn backup_route(mock: &MockProvider) -> RouteConfig {
    RouteConfig::new(BACKUP)
        .base_url(format!("{}/backup/v1", mock.url()))
        .model(BACKUP_MODEL)
}

fn long_context_route(mock: &MockProvider) -> RouteConfig {
    RouteConfig::new(LONG)
        .base_url(format!("{}/long/v1", mock.url()))
        .model(LONG_MODEL)
        .larger_context()
}

/// The whole ladder from one policy, around the hyper-util client.
fn stack(policy: &Policy) -> Result<(Stack, ResilienceLayer), BoxError> {
    let layer = policy.layer()?;
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(testing::client());
    Ok((svc, layer))
}

fn chat(mock: &MockProvider) -> Request<Full<Bytes>> {
    testing::chat_request(&mock.url(), MODEL, false)
}

fn chat_stream(mock: &MockProvider) -> Request<Full<Bytes>> {
    testing::chat_request(&mock.url(), MODEL, true)
}

/// The models the provider was asked for, in arrival order.
fn models(mock: &MockProvider) -> Vec<String> {
    mock.requests()
        .into_iter()
        .map(|r| r.model.unwrap_or_default())
        .collect()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn log_of(call: &Call) -> Result<&LogSnapshot, BoxError> {
    call.log
        .as_ref()
        .ok_or_else(|| format!("{} carries no attempt log", call.label).into())
}

fn routes_of(log: &LogSnapshot) -> Vec<String> {
    log.attempts
        .iter()
        .map(|a| a.route.as_ref().map(|r| r.to_string()).unwrap_or_default())
        .collect()
}

fn has_fallback(log: &LogSnapshot) -> bool {
    log.attempts
        .iter()
        .flat_map(|a| &a.decisions)
        .any(|d| matches!(d, Decision::Fallback { .. }))
}

fn has_stop(log: &LogSnapshot) -> bool {
    log.attempts
        .iter()
        .flat_map(|a| &a.decisions)
        .any(|d| matches!(d, Decision::Stop(_)))
}

fn stream_end(log: &LogSnapshot, i: usize) -> Option<StreamEnd> {
    log.attempts.get(i)?.stream.as_ref().map(|s| s.end.clone())
}

// ---------------------------------------------------------------------------------------------
// The scenarios

/// Runs every scenario, each against its own provider and its own stack, in order.
pub async fn run_all() -> Vec<ScenarioReport> {
    macro_rules! scenario {
        ($f:ident, $name:expr, $promise:expr, $policy:expr) => {{
            let mut run = Run::new();
            let outcome = $f(&mut run).await;
            run.report($name, $promise, $policy, outcome)
        }};
    }
    vec![
        scenario!(
            rate_limited,
            "429 with Retry-After",
            "wait at least the server's Retry-After, then retry the same route; the caller sees one answer",
            "interactive preset"
        ),
        scenario!(
            overload_then_recovery,
            "overload then recovery",
            "retry an overloaded route with backoff until it answers; no switch while retries help",
            "interactive preset, one backup route"
        ),
        scenario!(
            sustained_outage,
            "sustained outage",
            "the breaker opens and stops the retries, the backup serves, the primary is probed and gets traffic again once it recovers; five good probes close its circuit",
            "interactive preset, one backup route"
        ),
        scenario!(
            unauthorized,
            "401 unauthorized",
            "fail closed: one attempt, no retry, no switch; the caller gets the provider's 401",
            "interactive preset, one backup route"
        ),
        scenario!(
            context_overflow,
            "context overflow",
            "no retry; switch only to a route marked larger-context",
            "interactive preset, a backup route and a larger-context route"
        ),
        scenario!(
            quota_exhausted,
            "exhausted quota",
            "fail closed: the quota is never spent through a budget owner the policy did not approve",
            "interactive preset, a backup route owned by another team (not approved)"
        ),
        scenario!(
            stall_before_first_token,
            "stall before the first token",
            "a stream that stalls before its first token is retried invisibly; the caller sees only the second answer",
            "interactive preset (first token within 20s, commit at the first event)"
        ),
        scenario!(
            cut_after_tokens_interactive,
            "cut after tokens (commit first_event)",
            "bytes reached the caller: the body ends with StreamInterrupted, never a second answer or a second request",
            "interactive preset, one backup route"
        ),
        scenario!(
            cut_after_tokens_commit_end,
            "cut after tokens (commit end)",
            "nothing reached the caller: the backup rescues it and the caller sees exactly one complete answer",
            "interactive preset with stream.commit = end, one backup route"
        ),
        scenario!(
            spend_cap,
            "spend cap reached",
            "a request that would take its owner past the cap fails closed with BudgetExhausted and is never sent",
            "interactive preset, spend cap 100 units per owner, 1 unit per token"
        ),
        scenario!(
            rate_limit_queue,
            "rate limit, queue and reject",
            "batch: requests over the local rate limit wait in FIFO order and all complete; interactive: rejected with RateLimited { retry_in }",
            "batch and interactive presets, 1 request per second, burst 1"
        ),
        scenario!(
            rule_based_tier,
            "every model down: the rule-based tier",
            "the primary model, then the smaller one, then an answer from the in-process rule-based route; it never sees the caller's key",
            "interactive preset, a smaller-model route and an in-process route"
        ),
    ]
}

/// The in-process route of the three-tier chain, and what it answers.
const RULES: &str = "rules";
const RULES_TEXT: &str =
    "We are busy right now; your request is saved and answered within the hour.";

/// Scenario 12: the primary model and the smaller model are down; the rule-based route in the
/// process answers.
async fn rule_based_tier(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(&mock, MODEL, (0..3).map(|_| Reply::openai_server_error()));
    script(
        &mock,
        BACKUP_MODEL,
        (0..3).map(|_| Reply::openai_overloaded()),
    );
    let mut policy = interactive();
    policy.fallback.routes = vec![backup_route(&mock), RouteConfig::new(RULES).in_process()];
    // Three attempts on each model, and one for the rules.
    policy.fallback.max_total_attempts = 7;
    let keys = Arc::new(Mutex::new(Vec::new()));
    let seen = keys.clone();
    let rules = tower::service_fn(move |req: Request<Bytes>| {
        let key = req.headers().get("authorization").cloned();
        seen.lock().unwrap_or_else(|p| p.into_inner()).push(key);
        let body = serde_json::json!({
            "object": "chat.completion",
            "model": RULES,
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": RULES_TEXT}}],
        });
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let layer = policy.layer()?.route_service(RULES, rules)?;
    let svc: Stack = ServiceBuilder::new()
        .layer(layer)
        .service(testing::client());
    let mut req = chat(&mock);
    req.headers_mut()
        .insert("authorization", HeaderValue::from_static("Bearer sk-drill"));
    let call = run.send("request", &svc, req).await;
    let log = log_of(&call)?;

    run.check(
        "the caller gets 200 from the rule-based route",
        call.result.status() == Some(200) && call.result.route() == Some(RULES),
    );
    run.check(
        "the caller sees the rule's answer",
        call.result.answer() == RULES_TEXT,
    );
    let tried = routes_of(log);
    run.check(
        "the primary, then the smaller model, then the rules",
        tried.first().map(String::as_str) == Some(PRIMARY)
            && tried.last().map(String::as_str) == Some(RULES)
            && tried.iter().any(|r| r == BACKUP),
    );
    run.check(
        "the provider saw only the two models",
        models(&mock)
            .iter()
            .all(|m| m == MODEL || m == BACKUP_MODEL),
    );
    let keys = keys.lock().unwrap_or_else(|p| p.into_inner()).clone();
    run.check(
        "the rules were asked once, without the caller's key",
        keys.len() == 1 && keys.iter().all(Option::is_none),
    );
    run.observed = format!(
        "{}; routes tried: {}",
        call.result.describe(),
        tried.join(" -> ")
    );
    Ok(())
}

/// Scenario 1: a 429 with `retry-after: 2`, then an answer.
async fn rate_limited(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(
        &mock,
        MODEL,
        [
            Reply::openai_rate_limited(Some("2")),
            Reply::openai_chat(MODEL, "Hello after the wait"),
        ],
    );
    let (svc, _) = stack(&interactive())?;
    let call = run.send("request", &svc, chat(&mock)).await;
    let log = log_of(&call)?;

    run.check("the caller gets 200", call.result.status() == Some(200));
    run.check(
        "the caller sees the second answer",
        call.result.answer() == "Hello after the wait",
    );
    run.check(
        "two attempts, both on the primary",
        routes_of(log) == [PRIMARY, PRIMARY],
    );
    let first = log.attempts.first().ok_or("no attempt")?;
    run.check(
        "the first attempt is a rate limit with a 2s hint",
        first.class == Some(FailureClass::RateLimited)
            && first.retry_after == Some(Duration::from_secs(2)),
    );
    let wait = first.wait();
    run.check(
        "the wait is the server's, at least 2s",
        matches!(wait, Some((w, WaitSource::Server)) if w >= Duration::from_secs(2)),
    );
    let requests = mock.requests();
    let gap = match requests.as_slice() {
        [a, b] => b.at.saturating_duration_since(a.at),
        _ => Duration::ZERO,
    };
    run.check(
        "the provider saw the retry at least 2s after the first request",
        requests.len() == 2 && gap >= Duration::from_secs(2),
    );
    run.observed = format!(
        "{}; waited {}ms after Retry-After: 2 (the provider saw the retry {}ms later)",
        call.result.describe(),
        wait.map_or(0, |(w, _)| ms(w)),
        ms(gap)
    );
    Ok(())
}

/// Scenario 2: 503, then 529, then an answer, on the same route.
async fn overload_then_recovery(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(
        &mock,
        MODEL,
        [
            Reply::openai_overloaded(),
            Reply::anthropic_overloaded(),
            Reply::openai_chat(MODEL, "Back on my feet"),
        ],
    );
    let mut policy = interactive();
    policy.fallback.routes = vec![backup_route(&mock)];
    let (svc, _) = stack(&policy)?;
    let call = run.send("request", &svc, chat(&mock)).await;
    let log = log_of(&call)?;

    run.check(
        "the caller gets 200 from the primary",
        call.result.status() == Some(200) && call.result.route() == Some(PRIMARY),
    );
    let statuses: Vec<Option<u16>> = log.attempts.iter().map(|a| a.status).collect();
    run.check(
        "three attempts on the primary: 503, 529, 200",
        routes_of(log) == [PRIMARY; 3] && statuses == [Some(503), Some(529), Some(200)],
    );
    run.check(
        "both failures are overloaded",
        log.attempts
            .iter()
            .take(2)
            .all(|a| a.class == Some(FailureClass::Overloaded)),
    );
    run.check(
        "each retry waited on the backoff curve",
        log.attempts
            .iter()
            .take(2)
            .all(|a| matches!(a.wait(), Some((_, WaitSource::Backoff)))),
    );
    run.check(
        "the backup was never called",
        !has_fallback(log) && !models(&mock).iter().any(|m| m == BACKUP_MODEL),
    );
    let waits: Vec<String> = log
        .attempts
        .iter()
        .filter_map(|a| a.wait())
        .map(|(w, _)| format!("{}ms", ms(w)))
        .collect();
    run.observed = format!(
        "{} on attempt {}; backoff waits {}",
        call.result.describe(),
        log.attempts.len(),
        waits.join(", ")
    );
    Ok(())
}

/// The circuit transitions seen by the breaker handle's callback: when, route, from, to.
type Transitions = Arc<Mutex<Vec<(Duration, String, CircuitState, CircuitState)>>>;

/// Scenario 3: the primary is down for a while. The breaker opens, the backup serves, the
/// primary is probed after the open time and takes the traffic back.
async fn sustained_outage(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(&mock, MODEL, [Reply::openai_overloaded()]);
    script(
        &mock,
        BACKUP_MODEL,
        [Reply::openai_chat(BACKUP_MODEL, "Served by the backup")],
    );
    let mut policy = interactive();
    policy.fallback.routes = vec![backup_route(&mock)];
    let (svc, layer) = stack(&policy)?;
    let breakers = layer.circuit_breaker();
    let transitions: Transitions = Arc::default();
    {
        let transitions = transitions.clone();
        let t0 = run.t0;
        breakers.on_transition(move |route, from, to| {
            if let Ok(mut t) = transitions.lock() {
                t.push((t0.elapsed(), route.to_string(), from, to));
            }
        });
    }

    // The outage: every primary attempt is a 503. Requests 1 to 3 spend their three attempts
    // each; the tenth failure in a row, on request 4's first attempt, trips the breaker, and
    // that answer hands request 4 to the backup at once.
    let mut calls = Vec::new();
    for n in 1..=4 {
        calls.push(run.send(&format!("request {n}"), &svc, chat(&mock)).await);
    }
    let primary_calls = || {
        mock.requests()
            .iter()
            .filter(|r| r.model.as_deref() == Some(MODEL))
            .count()
    };
    let primary_calls_before = primary_calls();
    calls.push(run.send("request 5", &svc, chat(&mock)).await);
    let primary_calls_after = primary_calls();
    let open_state = breakers.state(PRIMARY);
    let retry_in = breakers
        .snapshot(PRIMARY)
        .and_then(|s| s.retry_in)
        .unwrap_or_default();

    // The primary recovers; once the open time has passed the next request probes it, and
    // five good probes in a row close its circuit.
    script(
        &mock,
        MODEL,
        [Reply::openai_chat(MODEL, "The primary is back")],
    );
    let recovered_at = run.now();
    tokio::time::sleep(retry_in).await;
    for n in 6..=10 {
        calls.push(run.send(&format!("request {n}"), &svc, chat(&mock)).await);
    }

    let transitions = transitions.lock().map(|t| t.clone()).unwrap_or_default();
    let mut notes: Vec<(Duration, String)> = transitions
        .iter()
        .map(|(at, route, from, to)| (*at, format!("circuit {route}: {from} -> {to}")))
        .collect();
    notes.push((
        recovered_at,
        format!(
            "the primary recovers (its circuit is {open_state}, next probe in {}ms)",
            ms(retry_in)
        ),
    ));
    notes.sort_by_key(|n| n.0);
    for (at, note) in notes {
        run.note(format!("@{}ms {note}", ms(at)));
    }

    let served: Vec<Option<&str>> = calls.iter().map(|c| c.result.route()).collect();
    run.check(
        "every request is answered with 200",
        calls.iter().all(|c| c.result.status() == Some(200)),
    );
    let backup_then_primary: Vec<Option<&str>> = [Some(BACKUP); 5]
        .into_iter()
        .chain([Some(PRIMARY); 5])
        .collect();
    run.check(
        "the backup serves requests 1 to 5, the primary requests 6 to 10",
        served == backup_then_primary,
    );
    let logs = calls.iter().map(log_of).collect::<Result<Vec<_>, _>>()?;
    run.check(
        "requests 1 to 3 retry the primary 3 times each, then fall back",
        logs[..3]
            .iter()
            .all(|l| routes_of(l) == [PRIMARY, PRIMARY, PRIMARY, BACKUP] && has_fallback(l)),
    );
    let circuit_open = |l: &LogSnapshot| {
        l.events.iter().any(|e| {
            matches!(e.kind, LocalEventKind::CircuitOpen { .. })
                && e.route.as_ref().map(|r| r.as_str()) == Some(PRIMARY)
        })
    };
    let handed_over = logs[3]
        .attempts
        .first()
        .is_some_and(|a| a.decisions.first() == Some(&Decision::Stop(StopReason::CircuitOpen)));
    run.check(
        "request 4 trips the breaker on its 1st attempt: that answer ends its retries at once",
        routes_of(logs[3]) == [PRIMARY, BACKUP] && handed_over,
    );
    run.check(
        "request 5 goes straight to the backup: the primary is not called",
        routes_of(logs[4]) == [BACKUP]
            && circuit_open(logs[4])
            && primary_calls_after == primary_calls_before,
    );
    run.check(
        "requests 6 to 10 are the probes: one attempt each on the primary",
        logs[5..].iter().all(|l| routes_of(l) == [PRIMARY]),
    );
    let changes: Vec<(CircuitState, CircuitState)> = transitions
        .iter()
        .filter(|t| t.1 == PRIMARY)
        .map(|t| (t.2, t.3))
        .collect();
    run.check(
        "the primary's circuit goes closed -> open -> half_open -> closed",
        changes
            == [
                (CircuitState::Closed, CircuitState::Open),
                (CircuitState::Open, CircuitState::HalfOpen),
                (CircuitState::HalfOpen, CircuitState::Closed),
            ],
    );
    run.check(
        "the primary's circuit ends closed",
        breakers.state(PRIMARY) == CircuitState::Closed,
    );
    run.observed = format!(
        "served by {}; primary circuit {}",
        served
            .iter()
            .map(|r| r.unwrap_or("-"))
            .collect::<Vec<_>>()
            .join(", "),
        changes
            .first()
            .map(|c| c.0.to_string())
            .into_iter()
            .chain(changes.iter().map(|c| c.1.to_string()))
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    Ok(())
}

/// Scenario 4: a bad key: nothing to retry, nothing to route around.
async fn unauthorized(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(&mock, MODEL, [Reply::unauthorized()]);
    let mut policy = interactive();
    policy.fallback.routes = vec![backup_route(&mock)];
    let (svc, _) = stack(&policy)?;
    let call = run.send("request", &svc, chat(&mock)).await;
    let log = log_of(&call)?;

    run.check(
        "the caller gets the provider's 401",
        call.result.status() == Some(401)
            && provider_error(call.result.body()).as_deref() == Some("invalid_api_key"),
    );
    run.check(
        "one attempt, classified auth",
        log.attempts.len() == 1 && log.attempts[0].class == Some(FailureClass::Auth),
    );
    run.check(
        "no switch: the backup is never called",
        !has_fallback(log) && mock.request_count() == 1,
    );
    run.check("the log records why it stopped", has_stop(log));
    run.check(
        "the outcome is a provider failure of class auth",
        log.outcome
            == Some(Outcome::ProviderFailure {
                status: 401,
                class: Some(FailureClass::Auth),
            }),
    );
    run.observed = format!(
        "{} after {}; the provider received {}",
        call.result.describe(),
        count(log.attempts.len(), "attempt"),
        count(mock.request_count(), "request")
    );
    Ok(())
}

/// Scenario 5: the prompt is too long for the primary: only the larger-context route may help.
async fn context_overflow(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(&mock, MODEL, [Reply::openai_context_length()]);
    script(
        &mock,
        LONG_MODEL,
        [Reply::openai_chat(LONG_MODEL, "Plenty of room here")],
    );
    let mut policy = interactive();
    policy.fallback.routes = vec![backup_route(&mock), long_context_route(&mock)];
    let (svc, _) = stack(&policy)?;
    let call = run.send("request", &svc, chat(&mock)).await;
    let log = log_of(&call)?;

    run.check(
        "the caller gets 200 from the larger-context route",
        call.result.status() == Some(200) && call.result.route() == Some(LONG),
    );
    run.check(
        "the primary's attempt is a context overflow, not retried",
        log.attempts.first().map(|a| a.class) == Some(Some(FailureClass::ContextOverflow))
            && log.attempts.first().and_then(|a| a.wait()).is_none(),
    );
    run.check(
        "only the primary and the larger-context route are tried",
        routes_of(log) == [PRIMARY, LONG] && models(&mock) == [MODEL, LONG_MODEL],
    );
    run.observed = format!(
        "{}; routes tried: {}",
        call.result.describe(),
        routes_of(log).join(" -> ")
    );
    Ok(())
}

/// Scenario 6: the primary's quota is gone; the backup spends another team's budget, not approved.
async fn quota_exhausted(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(&mock, MODEL, [Reply::openai_insufficient_quota()]);
    let mut policy = interactive();
    policy.fallback.primary_budget_owner = Some(OWNER.to_owned());
    policy.fallback.routes = vec![backup_route(&mock).budget_owner("another-team")];
    policy.fallback.approved_budget_owners = Vec::new();
    let (svc, _) = stack(&policy)?;
    let call = run.send("request", &svc, chat(&mock)).await;
    let log = log_of(&call)?;

    run.check(
        "the caller gets the provider's 429 insufficient_quota",
        call.result.status() == Some(429)
            && provider_error(call.result.body()).as_deref() == Some("insufficient_quota"),
    );
    run.check(
        "one attempt, classified quota_exhausted",
        log.attempts.len() == 1 && log.attempts[0].class == Some(FailureClass::QuotaExhausted),
    );
    run.check(
        "no switch to the other team's route",
        !has_fallback(log) && mock.request_count() == 1,
    );
    run.check(
        "the log says no approved route was left",
        log.attempts
            .iter()
            .flat_map(|a| &a.decisions)
            .any(|d| *d == Decision::Stop(StopReason::NoApprovedRoute)),
    );
    run.observed = format!(
        "{} after {}; the backup was not called",
        call.result.describe(),
        count(log.attempts.len(), "attempt")
    );
    Ok(())
}

/// Scenario 7: the first stream sends its role delta and then nothing. It is retried before
/// anything reached the caller.
async fn stall_before_first_token(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(
        &mock,
        MODEL,
        [
            Reply::openai_stream(MODEL, &["Never", " sent"]).stall_after(1),
            Reply::openai_stream(MODEL, &["Hello", " again"]),
        ],
    );
    let policy = interactive();
    let first_token = policy.stream.first_token_timeout.unwrap_or_default();
    let (svc, _) = stack(&policy)?;
    let call = run.send("request", &svc, chat_stream(&mock)).await;
    let log = log_of(&call)?;
    let body = call.result.body();

    run.check(
        "the caller gets one whole answer: the second",
        call.result.status() == Some(200)
            && call.result.body_error().is_none()
            && call.result.answer() == "Hello again"
            && body.matches("\"role\":\"assistant\"").count() == 1
            && body.matches("data: [DONE]").count() == 1,
    );
    run.check(
        "two attempts on the primary",
        routes_of(log) == [PRIMARY, PRIMARY],
    );
    run.check(
        "the first failed before its commit point on the first-token timeout, nothing delivered",
        log.attempts.first().map(|a| a.class) == Some(Some(FailureClass::Timeout))
            && stream_end(log, 0)
                == Some(StreamEnd::FailedBeforeCommit(
                    StreamCause::FirstTokenTimeout(first_token),
                ))
            && log.attempts[0].stream.as_ref().map(|s| s.bytes) == Some(0),
    );
    run.check(
        "the second ended complete",
        stream_end(log, 1) == Some(StreamEnd::Complete),
    );
    let keys: Vec<Option<HeaderValue>> = mock
        .requests()
        .iter()
        .map(|r| r.headers.get("idempotency-key").cloned())
        .collect();
    run.check(
        "both attempts carry the same idempotency key",
        keys.len() == 2 && keys[0].is_some() && keys[0] == keys[1],
    );
    run.observed = format!(
        "{}; the first stream stalled for {}ms before its first token and was retried unseen",
        call.result.describe(),
        ms(first_token)
    );
    Ok(())
}

/// The stream cut after its second content event ("Hel", "lo", then the connection drops).
fn cut_stream() -> Reply {
    Reply::openai_stream(MODEL, &["Hel", "lo", " world"]).cut_after(3)
}

/// Scenario 8: a cut after tokens reached the caller (commit at the first event).
async fn cut_after_tokens_interactive(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(&mock, MODEL, [cut_stream()]);
    script(
        &mock,
        BACKUP_MODEL,
        [Reply::openai_stream(
            BACKUP_MODEL,
            &["A", " second", " answer"],
        )],
    );
    let mut policy = interactive();
    policy.fallback.routes = vec![backup_route(&mock)];
    let (svc, _) = stack(&policy)?;
    let call = run.send("request", &svc, chat_stream(&mock)).await;
    // Give any (wrong) second request all the time it would need.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let log = log_of(&call)?;
    let delivered = call.result.body().len() as u64;

    run.check(
        "the caller got the first tokens, then StreamInterrupted with the bytes delivered",
        call.result.status() == Some(200)
            && call.result.answer() == "Hello"
            && call.result.body_error()
                == Some(&ErrorKind::StreamInterrupted {
                    delivered_bytes: delivered,
                    cause: StreamCause::Disconnected,
                }),
    );
    run.check(
        "no second request, not even a minute later",
        mock.request_count() == 1 && log.attempts.len() == 1,
    );
    run.check(
        "the log records the interruption after the commit point",
        stream_end(log, 0) == Some(StreamEnd::Interrupted(StreamCause::Disconnected))
            && log.attempts[0].stream.as_ref().map(|s| s.bytes) == Some(delivered),
    );
    run.observed = format!(
        "{}; 60s later the provider had still received {}",
        call.result.describe(),
        count(mock.request_count(), "request")
    );
    Ok(())
}

/// Scenario 9: the same cut, but nothing is handed up before the stream ended (commit at the end).
async fn cut_after_tokens_commit_end(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(&mock, MODEL, [cut_stream()]);
    script(
        &mock,
        BACKUP_MODEL,
        [Reply::openai_stream(
            BACKUP_MODEL,
            &["Rescued", " by", " the", " backup"],
        )],
    );
    let mut policy = interactive();
    policy.stream.commit = CommitPoint::End;
    policy.fallback.routes = vec![backup_route(&mock)];
    let (svc, _) = stack(&policy)?;
    let call = run.send("request", &svc, chat_stream(&mock)).await;
    let log = log_of(&call)?;
    let body = call.result.body();

    run.check(
        "the caller gets exactly one complete answer, the backup's",
        call.result.status() == Some(200)
            && call.result.route() == Some(BACKUP)
            && call.result.body_error().is_none()
            && call.result.answer() == "Rescued by the backup"
            && body.matches("\"role\":\"assistant\"").count() == 1
            && body.matches("data: [DONE]").count() == 1
            && !body.contains("\"Hel\""),
    );
    run.check(
        "the primary's stream failed before its commit point, with nothing delivered",
        stream_end(log, 0) == Some(StreamEnd::FailedBeforeCommit(StreamCause::Disconnected))
            && log.attempts[0].stream.as_ref().map(|s| s.bytes) == Some(0),
    );
    run.check(
        "one attempt on the primary, then the backup",
        routes_of(log) == [PRIMARY, BACKUP]
            && models(&mock) == [MODEL, BACKUP_MODEL]
            && has_fallback(log),
    );
    run.check(
        "the backup's stream ended complete",
        stream_end(log, 1) == Some(StreamEnd::Complete),
    );
    run.observed = format!(
        "{}; routes tried: {}",
        call.result.describe(),
        routes_of(log).join(" -> ")
    );
    Ok(())
}

/// Scenario 10: a spend cap of 100 units per owner, one unit per token: the first request fits, the
/// second would go past the cap.
async fn spend_cap(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    // A 30-word answer: 9 prompt tokens + 30 completion tokens = 39 units.
    let answer = "one two three four five six seven eight nine ten eleven twelve thirteen \
                  fourteen fifteen sixteen seventeen eighteen nineteen twenty twenty-one \
                  twenty-two twenty-three twenty-four twenty-five twenty-six twenty-seven \
                  twenty-eight twenty-nine thirty";
    script(&mock, MODEL, [Reply::openai_chat(MODEL, answer)]);
    let mut spend = SpendPolicy::default();
    spend.cap = 100.0;
    spend.default_owner = Some(OWNER.to_owned());
    spend.default_price = Some(Price::new(1_000_000.0, 1_000_000.0));
    let mut policy = interactive();
    policy.budget.spend = Some(spend);
    let (svc, layer) = stack(&policy)?;
    let handle = layer.spend().ok_or("the policy sets a spend cap")?;
    let units = |micros: u64| micros as f64 / 1_000_000.0;

    let first = run.send("request 1", &svc, chat(&mock)).await;
    let after_first = handle.status(OWNER).await.expect("store");
    run.note(format!(
        "after request 1: {} of {} units spent",
        units(after_first.spent),
        units(handle.cap_micros())
    ));
    let second = run.send("request 2", &svc, chat(&mock)).await;
    let after_second = handle.status(OWNER).await.expect("store");
    run.note(format!(
        "after request 2: {} of {} units spent",
        units(after_second.spent),
        units(handle.cap_micros())
    ));

    run.check("request 1 is answered", first.result.status() == Some(200));
    run.check(
        "request 1 is charged its real usage: 39 units",
        after_first.spent == 39_000_000,
    );
    run.check(
        "request 2 fails closed with BudgetExhausted for the owner",
        second.result.error()
            == Some(&ErrorKind::BudgetExhausted {
                owner: Some(OWNER.to_owned()),
            }),
    );
    let l2 = log_of(&second)?;
    run.check(
        "request 2 is never sent: no attempt, a budget_denied event",
        l2.attempts.is_empty()
            && l2
                .events
                .iter()
                .any(|e| e.kind == LocalEventKind::BudgetDenied)
            && mock.request_count() == 1,
    );
    run.check(
        "nothing more is spent",
        after_second.spent == after_first.spent,
    );
    run.observed = format!(
        "request 1: {}, charged {} units; request 2: {}, never sent",
        first
            .result
            .status()
            .map_or("no answer".to_owned(), |s| s.to_string()),
        units(after_first.spent),
        second.result.describe()
    );
    Ok(())
}

/// Scenario 11: one request per second. Batch work queues, FIFO; interactive work is rejected.
async fn rate_limit_queue(run: &mut Run) -> Result<(), BoxError> {
    let mock = MockProvider::start().await?;
    script(&mock, MODEL, [Reply::openai_chat(MODEL, "Your turn came")]);
    let mut rate = RateLimitPolicy::default();
    rate.requests_per_second = Some(1.0);
    rate.burst = 1;

    let mut batch = Policy::batch();
    batch.workflow = "drill-batch".to_owned();
    batch.retry.seed = Some(SEED);
    batch.fallback.primary = PRIMARY.to_owned();
    batch.budget.rate_limit = Some(rate);
    let max_wait = match batch.budget.admission {
        AdmissionMode::Queue { max_wait, .. } => Some(max_wait),
        _ => None,
    };
    let (svc, _) = stack(&batch)?;

    // Three requests at once; each is put in line when it is called, in this order.
    let mut futures = Vec::new();
    let at = run.now();
    for n in 1..=3u32 {
        let mut req = chat(&mock);
        req.headers_mut().insert(SEQ_HEADER, HeaderValue::from(n));
        let mut svc = svc.clone();
        let ready = svc.ready().await?;
        futures.push(ready.call(req));
    }
    let t0 = run.t0;
    let timed = |f| async move {
        let (result, log) = finish(f).await;
        (result, log, t0.elapsed())
    };
    let mut futures = futures.into_iter();
    let (Some(a), Some(b), Some(c)) = (futures.next(), futures.next(), futures.next()) else {
        return Err("three requests".into());
    };
    let (a, b, c) = tokio::join!(timed(a), timed(b), timed(c));
    let queued = [
        run.record("batch 1", at, a),
        run.record("batch 2", at, b),
        run.record("batch 3", at, c),
    ];

    let requests = mock.requests();
    let order: Vec<String> = requests
        .iter()
        .map(|r| {
            r.headers
                .get(SEQ_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    let arrivals: Vec<u128> = requests
        .iter()
        .map(|r| ms(r.at.saturating_duration_since(run.t0)))
        .collect();
    let waited: Vec<u128> = queued
        .iter()
        .map(|c| {
            c.log
                .iter()
                .flat_map(|l| &l.events)
                .find_map(|e| match e.kind {
                    LocalEventKind::Queued { waited } => Some(ms(waited)),
                    _ => None,
                })
                .unwrap_or(0)
        })
        .collect();
    run.note(format!(
        "batch: the provider received requests {} at {}ms (queue bound {}ms)",
        order.join(", "),
        arrivals
            .iter()
            .map(u128::to_string)
            .collect::<Vec<_>>()
            .join("ms, "),
        max_wait.map_or(0, ms)
    ));
    run.check(
        "every queued request completes with 200",
        queued.iter().all(|c| c.result.status() == Some(200)),
    );
    run.check(
        "they reach the provider in FIFO order, one per second",
        order == ["1", "2", "3"] && arrivals == [0, 1000, 2000],
    );
    run.check(
        "the 2nd and 3rd waited 1000ms and 2000ms in the queue",
        waited == [0, 1000, 2000],
    );

    // The interactive preset does not queue: over the limit is an immediate RateLimited.
    let mut interactive = interactive();
    interactive.budget.rate_limit = Some(rate);
    let (svc, _) = stack(&interactive)?;
    let allowed = run.send("interactive 1", &svc, chat(&mock)).await;
    let rejected = run.send("interactive 2", &svc, chat(&mock)).await;
    run.check(
        "interactive: the first is answered",
        allowed.result.status() == Some(200),
    );
    let retry_in = match rejected.result.error() {
        Some(ErrorKind::RateLimited { retry_in }) => Some(*retry_in),
        _ => None,
    };
    // The first took its token when it was sent; the bucket is full again a second later.
    let capacity_in = Duration::from_secs(1).saturating_sub(rejected.at.saturating_sub(allowed.at));
    run.check(
        format!(
            "interactive: the second is rejected at once with RateLimited {{ retry_in: {}ms }}",
            ms(capacity_in)
        ),
        retry_in == Some(capacity_in) && rejected.took == Duration::ZERO,
    );
    run.check(
        "interactive: the rejected request is never sent",
        mock.request_count() == 4 && rejected.log.as_ref().is_some_and(|l| l.attempts.is_empty()),
    );
    run.observed = format!(
        "batch: 3 × 200, FIFO, waited {}ms; interactive: {}",
        waited
            .iter()
            .map(u128::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        rejected.result.describe()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Output

/// The report of one scenario as text: a header (name and promise), each request's attempt
/// table, the notes, the checks that failed, and the verdict line.
pub fn render(index: usize, total: usize, r: &ScenarioReport) -> String {
    let mut out = String::new();
    let title = format!("── {index}/{total} {} ", r.name);
    let _ = writeln!(out, "{title:─<96}");
    let _ = writeln!(out, "promise: {}", r.promise);
    let _ = writeln!(out, "policy:  {}", r.policy);
    for call in &r.calls {
        let _ = writeln!(
            out,
            "\n▸ {} (sent at {}ms, done after {}ms): {}",
            call.label,
            ms(call.at),
            ms(call.took),
            call.result.describe()
        );
        if let Some(log) = &call.log {
            for line in log.to_string().lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(out);
        for note in &r.notes {
            let _ = writeln!(out, "  {note}");
        }
    }
    let failed: Vec<&Check> = r.checks.iter().filter(|c| !c.ok).collect();
    let _ = writeln!(out);
    for c in &failed {
        let _ = writeln!(out, "  ✗ {}", c.what);
    }
    let _ = writeln!(
        out,
        "{}  {}  ({} of {} checks held, {}ms virtual)",
        if r.passed { "PASS" } else { "FAIL" },
        r.observed,
        r.checks.len() - failed.len(),
        r.checks.len(),
        ms(r.elapsed)
    );
    out
}

/// The reports as JSON: per scenario its name, promise, verdict, checks, and each request's
/// result and attempt log (the log's own serde form).
pub fn to_json(reports: &[ScenarioReport]) -> serde_json::Value {
    let scenarios: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let calls: Vec<serde_json::Value> = r
                .calls
                .iter()
                .map(|c| {
                    let result = match &c.result {
                        CallResult::Response {
                            status,
                            route,
                            body_error,
                            ..
                        } => serde_json::json!({
                            "status": status,
                            "route": route,
                            "answer": c.result.answer(),
                            "body_error": body_error.as_ref().map(ToString::to_string),
                        }),
                        CallResult::Error { kind, class } => serde_json::json!({
                            "error": kind.to_string(),
                            "class": class.map(|c| c.as_str()),
                        }),
                    };
                    serde_json::json!({
                        "label": c.label,
                        "at_ms": ms(c.at) as u64,
                        "took_ms": ms(c.took) as u64,
                        "result": result,
                        "log": c.log.as_ref().map(|l| serde_json::to_value(l).unwrap_or_else(|e| {
                            serde_json::Value::String(format!("unserialisable log: {e}"))
                        })),
                    })
                })
                .collect();
            let checks: Vec<serde_json::Value> = r
                .checks
                .iter()
                .map(|c| serde_json::json!({ "what": c.what, "ok": c.ok }))
                .collect();
            serde_json::json!({
                "name": r.name,
                "promise": r.promise,
                "policy": r.policy,
                "passed": r.passed,
                "observed": r.observed,
                "elapsed_ms": ms(r.elapsed) as u64,
                "checks": checks,
                "notes": r.notes,
                "calls": calls,
            })
        })
        .collect();
    serde_json::json!({
        "clock": "virtual",
        "seed": SEED,
        "passed": reports.iter().filter(|r| r.passed).count(),
        "total": reports.len(),
        "scenarios": scenarios,
    })
}
