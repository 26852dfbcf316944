//! Outage simulator: many clients against a scripted provider, in virtual time.
//!
//! The provider is a `tower::service_fn` that sleeps (tokio time, paused) for a simulated
//! latency and answers 200 or 503 as its script says at the moment the call arrives; a seeded
//! RNG decides independent failures and latencies, so a run is the same every time. Clients
//! think for an exponentially distributed time, send one logical request, read its answer to
//! the end, and repeat until the run's time is over. Every client of a setup shares one client
//! stack (one retry budget, one breaker), as the tasks of one service would.
//!
//! Each logical request carries an id header; the provider counts the calls it receives per id
//! and route, which gives, per setup: attempts per logical request (load amplification),
//! success rate, latency percentiles, how long after an outage began the first request was
//! kept off the failing route (time to detect), and how long after it recovered the first call
//! to it succeeded again (time back on the primary).

#![allow(dead_code)] // the bench and the test use different parts

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_llm_resilience::policy::{HedgePolicy, RouteConfig};
use tower_llm_resilience::{Policy, ResilienceLayer};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

const ID_HEADER: &str = "x-sim-request";
const BACKUP_HOST: &str = "backup.example";

/// The chat request every client sends.
const BODY: &[u8] = br#"{"model":"main-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64}"#;

// ---------------------------------------------------------------- provider scripts

/// What the primary route does over time. The backup route (when a setup has one) is healthy.
#[derive(Clone, Debug)]
pub enum Script {
    /// Each call fails (503) with probability `p`, independently.
    Independent(f64),
    /// Healthy, then every call fails from `start` to `end`, then healthy again.
    Outage { start: Duration, end: Duration },
    /// From `start` on: down for `down`, up for `up`, repeated.
    Flapping {
        start: Duration,
        down: Duration,
        up: Duration,
    },
    /// Never down, but each call is slow (its answer after `slow`) with probability `p`,
    /// independently: the slow tail of a model API's bad day.
    SlowTail { p: f64, slow: Duration },
}

impl Script {
    /// Whether a call arriving at `t` (since the start of the run) fails for sure; `None`
    /// when the script leaves it to chance.
    fn down_at(&self, t: Duration) -> Option<bool> {
        match *self {
            Script::Independent(_) => None,
            Script::SlowTail { .. } => Some(false),
            Script::Outage { start, end } => Some(t >= start && t < end),
            Script::Flapping { start, down, up } => {
                if t < start {
                    return Some(false);
                }
                let cycle = (down + up).as_nanos();
                let into = (t - start).as_nanos() % cycle;
                Some(into < down.as_nanos())
            }
        }
    }

    /// The outage windows within `duration`: `(start, end)`, `end` = `duration` when the
    /// route never recovers within the run.
    pub fn windows(&self, duration: Duration) -> Vec<(Duration, Duration)> {
        match *self {
            Script::Independent(p) if p >= 1.0 => vec![(Duration::ZERO, duration)],
            Script::Independent(_) | Script::SlowTail { .. } => Vec::new(),
            Script::Outage { start, end } => vec![(start, end.min(duration))],
            Script::Flapping { start, down, up } => {
                let mut out = Vec::new();
                let mut s = start;
                while s < duration {
                    out.push((s, (s + down).min(duration)));
                    s += down + up;
                }
                out
            }
        }
    }
}

/// A named provider script.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Name in the report.
    pub name: String,
    /// What the primary does.
    pub script: Script,
}

impl Scenario {
    /// The scenarios of the report: independent failures at 1 % to 100 %, one full outage
    /// window, a flapping provider.
    pub fn standard(duration: Duration) -> Vec<Scenario> {
        let mut out: Vec<Scenario> = [0.01, 0.10, 0.30, 0.50, 1.0]
            .into_iter()
            .map(|p| Scenario {
                name: format!("independent {:.0} %", p * 100.0),
                script: Script::Independent(p),
            })
            .collect();
        let quarter = duration / 4;
        out.push(Scenario {
            name: format!("outage {}–{} s", quarter.as_secs(), (quarter * 2).as_secs()),
            script: Script::Outage {
                start: quarter,
                end: quarter * 2,
            },
        });
        out.push(Scenario {
            name: "flapping 5 s down / 15 s up".to_owned(),
            script: Script::Flapping {
                start: quarter,
                down: Duration::from_secs(5),
                up: Duration::from_secs(15),
            },
        });
        out
    }

    /// The slow-tail scenario: 5 % of primary calls take 20 s to their first token.
    pub fn slow_tail() -> Scenario {
        Scenario {
            name: "slow tail: 5 % of calls 20 s".to_owned(),
            script: Script::SlowTail {
                p: 0.05,
                slow: Duration::from_secs(20),
            },
        }
    }
}

/// Shared state of the simulated provider.
struct ProviderState {
    start: Instant,
    script: Script,
    rng: Mutex<SmallRng>,
    ok_latency: (Duration, Duration),
    fail_latency: (Duration, Duration),
    /// Calls per logical request id: (primary, backup).
    calls: Mutex<HashMap<u64, (u32, u32)>>,
    /// Primary calls that succeeded: (arrival, completion), since the start.
    primary_ok: Mutex<Vec<(Duration, Duration)>>,
}

fn uniform(rng: &mut SmallRng, (lo, hi): (Duration, Duration)) -> Duration {
    if hi <= lo {
        return lo;
    }
    lo + Duration::from_nanos(rng.random_range(0..(hi - lo).as_nanos() as u64))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type ProviderFuture = std::pin::Pin<Box<dyn Future<Output = Result<Res, Infallible>> + Send>>;

/// The fake provider: a `tower::service_fn` sleeping for its latency, answering 200 or 503.
#[derive(Clone)]
struct Provider(Arc<ProviderState>);

impl Provider {
    fn service(
        &self,
    ) -> tower::util::ServiceFn<impl FnMut(Req) -> ProviderFuture + Clone + Send + 'static> {
        let state = self.0.clone();
        tower::service_fn(move |req: Req| -> ProviderFuture {
            let state = state.clone();
            let arrival = state.start.elapsed();
            let backup = req.uri().host() == Some(BACKUP_HOST);
            let id = req
                .headers()
                .get(ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            {
                let mut calls = lock(&state.calls);
                let entry = calls.entry(id).or_default();
                if backup {
                    entry.1 += 1;
                } else {
                    entry.0 += 1;
                }
            }
            let (fail, latency) = {
                let mut rng = lock(&state.rng);
                let fail = !backup
                    && match state.script.down_at(arrival) {
                        Some(down) => down,
                        None => match state.script {
                            Script::Independent(p) => rng.random_bool(p.clamp(0.0, 1.0)),
                            _ => false,
                        },
                    };
                let range = if fail {
                    state.fail_latency
                } else {
                    state.ok_latency
                };
                let latency = uniform(&mut rng, range);
                match state.script {
                    Script::SlowTail { p, slow } if !backup && rng.random_bool(p) => (fail, slow),
                    _ => (fail, latency),
                }
            };
            Box::pin(async move {
                tokio::time::sleep(latency).await;
                let mut resp = if fail {
                    let mut r = Response::new(Full::new(Bytes::from_static(
                        br#"{"error":{"message":"The server is overloaded.","type":"server_error"}}"#,
                    )));
                    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    r
                } else {
                    if !backup {
                        lock(&state.primary_ok).push((arrival, state.start.elapsed()));
                    }
                    Response::new(Full::new(Bytes::from_static(
                        br#"{"choices":[{"message":{"role":"assistant","content":"Hello."},"finish_reason":"stop"}]}"#,
                    )))
                };
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok(resp)
            })
        })
    }
}

// ---------------------------------------------------------------- client setups

/// The client stacks compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// A loop: up to 3 retries after any failure, 500 ms apart, no budget, no breaker.
    FixedRetries,
    /// `tower::retry`: 3 attempts, exponential backoff 500 ms – 8 s with jitter, no budget.
    TowerRetry,
    /// The same with tower's `TpsBudget` (20 % + 10/s over 10 s, the crate's default budget).
    TowerRetryBudget,
    /// tower-resilience's retry: 3 attempts, exponential backoff from 500 ms.
    TowerResilienceRetry,
    /// This crate: `ResilienceLayer` with `Policy::interactive()`, one route.
    Interactive,
    /// The same with one (healthy) backup route.
    InteractiveBackup,
    /// `Policy::interactive()` with hedging on at the policy's defaults (the 97th percentile
    /// of time to first token, at most 10 % of requests), one route: the hedge goes to the same
    /// route.
    InteractiveHedged,
    /// The same with one backup route: the hedge goes to the backup.
    InteractiveBackupHedged,
}

impl Setup {
    /// Every setup, in report order.
    pub const ALL: [Setup; 6] = [
        Setup::FixedRetries,
        Setup::TowerRetry,
        Setup::TowerRetryBudget,
        Setup::TowerResilienceRetry,
        Setup::Interactive,
        Setup::InteractiveBackup,
    ];

    /// The setups of the slow-tail report: every one above, then hedging on.
    pub const SLOW_TAIL: [Setup; 8] = [
        Setup::FixedRetries,
        Setup::TowerRetry,
        Setup::TowerRetryBudget,
        Setup::TowerResilienceRetry,
        Setup::Interactive,
        Setup::InteractiveBackup,
        Setup::InteractiveHedged,
        Setup::InteractiveBackupHedged,
    ];
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Setup::FixedRetries => "fixed 3 retries, no budget",
            Setup::TowerRetry => "tower::retry + backoff",
            Setup::TowerRetryBudget => "tower::retry + backoff + TpsBudget",
            Setup::TowerResilienceRetry => "tower-resilience retry",
            Setup::Interactive => "this crate, interactive",
            Setup::InteractiveBackup => "this crate, interactive + backup route",
            Setup::InteractiveHedged => "this crate, interactive + hedge (same route)",
            Setup::InteractiveBackupHedged => "this crate, interactive + backup route + hedge",
        })
    }
}

/// A tower `Rng` drawing from one seeded generator shared by every request of a setup.
#[derive(Clone)]
struct SharedRng(Arc<Mutex<SmallRng>>);

impl tower::util::rng::Rng for SharedRng {
    fn next_u64(&mut self) -> u64 {
        lock(&self.0).random()
    }
}

/// `tower::retry` policies for the first three setups.
#[derive(Clone)]
struct TowerPolicy {
    retries_left: u32,
    fixed: Option<Duration>,
    backoff: Option<tower::retry::backoff::ExponentialBackoff<SharedRng>>,
    budget: Option<Arc<tower::retry::budget::TpsBudget>>,
}

impl TowerPolicy {
    fn fixed(retries: u32, wait: Duration) -> Self {
        Self {
            retries_left: retries,
            fixed: Some(wait),
            backoff: None,
            budget: None,
        }
    }

    fn backoff(rng: SharedRng, budget: Option<Arc<tower::retry::budget::TpsBudget>>) -> Self {
        use tower::retry::backoff::{ExponentialBackoffMaker, MakeBackoff};
        let mut maker = ExponentialBackoffMaker::new(
            Duration::from_millis(500),
            Duration::from_secs(8),
            1.0,
            rng,
        )
        .expect("valid backoff");
        Self {
            retries_left: 2,
            fixed: None,
            backoff: Some(maker.make_backoff()),
            budget,
        }
    }
}

fn failed(resp: &Res) -> bool {
    resp.status() == StatusCode::TOO_MANY_REQUESTS || resp.status().is_server_error()
}

impl<E> tower::retry::Policy<Req, Res, E> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        use tower::retry::backoff::Backoff;
        use tower::retry::budget::Budget;
        let retryable = match result {
            Ok(resp) => failed(resp),
            Err(_) => true,
        };
        if !retryable {
            if let Some(b) = &self.budget {
                b.deposit();
            }
            return None;
        }
        if self.retries_left == 0 {
            return None;
        }
        if let Some(b) = &self.budget {
            if !b.withdraw() {
                return None;
            }
        }
        self.retries_left -= 1;
        match (&mut self.backoff, self.fixed) {
            (Some(backoff), _) => Some(backoff.next_backoff()),
            (None, Some(wait)) => Some(tokio::time::sleep(wait)),
            (None, None) => Some(tokio::time::sleep(Duration::ZERO)),
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

/// The client stack of a setup, its response reduced to "did it succeed".
type Client = BoxCloneService<Req, bool, BoxError>;

fn client(setup: Setup, provider: &Provider, seed: u64) -> Client {
    let transport = provider.service();
    let rng = SharedRng(Arc::new(Mutex::new(SmallRng::seed_from_u64(seed ^ 0x7e7))));
    match setup {
        Setup::FixedRetries | Setup::TowerRetry | Setup::TowerRetryBudget => {
            let policy = match setup {
                Setup::FixedRetries => TowerPolicy::fixed(3, Duration::from_millis(500)),
                Setup::TowerRetry => TowerPolicy::backoff(rng, None),
                _ => TowerPolicy::backoff(
                    rng,
                    Some(Arc::new(tower::retry::budget::TpsBudget::new(
                        Duration::from_secs(10),
                        10,
                        0.2,
                    ))),
                ),
            };
            tower::retry::Retry::new(policy, transport)
                .map_err(|e: Infallible| -> BoxError { match e {} })
                .and_then(drain)
                .boxed_clone()
        }
        Setup::TowerResilienceRetry => {
            use tower_resilience::retry::RetryLayer as TrRetry;
            TrRetry::<Req, Res, Infallible>::builder()
                .max_attempts(3)
                .exponential_backoff(Duration::from_millis(500))
                .retry_on_response(failed)
                .build()
                .layer(transport)
                .map_err(|e: Infallible| -> BoxError { match e {} })
                .and_then(drain)
                .boxed_clone()
        }
        Setup::Interactive
        | Setup::InteractiveBackup
        | Setup::InteractiveHedged
        | Setup::InteractiveBackupHedged => {
            let mut policy = Policy::interactive();
            policy.retry.seed = Some(seed);
            if matches!(
                setup,
                Setup::InteractiveHedged | Setup::InteractiveBackupHedged
            ) {
                policy.hedge = HedgePolicy::default();
                policy.hedge.enabled = true;
                policy.hedge.same_route = setup == Setup::InteractiveHedged;
                // A chat POST is hedged only with an idempotency key.
                policy.idempotency.key_header = Some("idempotency-key".to_owned());
            }
            if matches!(
                setup,
                Setup::InteractiveBackup | Setup::InteractiveBackupHedged
            ) {
                policy.fallback.routes.push(
                    RouteConfig::new("backup")
                        .base_url(format!("https://{BACKUP_HOST}/v1"))
                        .model("backup-model"),
                );
            }
            let layer = ResilienceLayer::new(&policy).expect("the interactive preset is valid");
            // `SIM_TRACE=1`: every breaker transition on stderr, with the window it judged.
            if std::env::var_os("SIM_TRACE").is_some() {
                let t0 = Instant::now();
                let breakers = layer.circuit_breaker();
                let look = breakers.clone();
                breakers.on_transition(move |route, from, to| {
                    if let Some(s) = look.snapshot(route.as_str()) {
                        eprintln!(
                            "{:>8.3} s  {route}: {from} -> {to}  (window {} calls, {} failed, \
                             {} in flight; {} in a row)",
                            t0.elapsed().as_secs_f64(),
                            s.calls,
                            s.failures,
                            s.calls_in_flight,
                            s.consecutive_failures
                        );
                    }
                });
            }
            layer
                .layer(transport)
                .map_err(BoxError::from)
                .and_then(drain)
                .boxed_clone()
        }
    }
}

/// Reads the answer to the end (a breaker counts a success when its body ends) and tells
/// whether it was a success.
async fn drain<B>(resp: Response<B>) -> Result<bool, BoxError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let ok = resp.status().is_success();
    match resp.into_body().collect().await {
        Ok(_) => Ok(ok),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------- the run

/// Size and shape of a run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Concurrent clients.
    pub clients: usize,
    /// Virtual time the clients keep sending for.
    pub duration: Duration,
    /// Mean think time between a client's requests (exponential).
    pub think: Duration,
    /// Latency of a successful call: uniform in this range.
    pub ok_latency: (Duration, Duration),
    /// Latency of a failed (503) call: uniform in this range.
    pub fail_latency: (Duration, Duration),
    /// Seed of every random choice of the run.
    pub seed: u64,
}

impl Params {
    /// The report's run: 50 clients for 120 s.
    pub fn standard() -> Self {
        Self {
            clients: 50,
            duration: Duration::from_secs(120),
            think: Duration::from_secs(1),
            ok_latency: (Duration::from_millis(400), Duration::from_millis(1200)),
            fail_latency: (Duration::from_millis(20), Duration::from_millis(100)),
            seed: 2024,
        }
    }

    /// A small run for the test: 20 clients for 60 s.
    pub fn small() -> Self {
        Self {
            clients: 20,
            duration: Duration::from_secs(60),
            ..Self::standard()
        }
    }
}

/// One logical request as the client saw it.
#[derive(Clone, Debug, PartialEq)]
struct Logical {
    start: Duration,
    latency: Duration,
    success: bool,
    primary_calls: u32,
    backup_calls: u32,
}

/// What one setup did under one scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Logical requests sent.
    pub logical: u64,
    /// Calls that reached the primary route.
    pub primary_calls: u64,
    /// Calls that reached the backup route.
    pub backup_calls: u64,
    /// Logical requests that succeeded.
    pub successes: u64,
    /// Median latency of a logical request (success or not).
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Per outage window: time from its start to the first request kept off the primary
    /// (`None`: never within the window).
    pub detect: Vec<Option<Duration>>,
    /// Per outage window that ended within the run: time from its end to the completion of
    /// the first successful primary call that arrived after it (`None`: none did).
    pub back_on_primary: Vec<Option<Duration>>,
}

impl Report {
    /// Provider calls (every route) per logical request.
    pub fn amplification(&self) -> f64 {
        (self.primary_calls + self.backup_calls) as f64 / self.logical.max(1) as f64
    }

    /// Calls to the primary per logical request.
    pub fn primary_amplification(&self) -> f64 {
        self.primary_calls as f64 / self.logical.max(1) as f64
    }

    /// Share of logical requests that succeeded.
    pub fn success_rate(&self) -> f64 {
        self.successes as f64 / self.logical.max(1) as f64
    }
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Runs `setup` against `scenario` in virtual time (a paused current-thread runtime of its own).
pub fn run(setup: Setup, scenario: &Scenario, params: &Params) -> Report {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    rt.block_on(simulate(setup, scenario, params))
}

async fn simulate(setup: Setup, scenario: &Scenario, params: &Params) -> Report {
    let start = Instant::now();
    let provider = Provider(Arc::new(ProviderState {
        start,
        script: scenario.script.clone(),
        rng: Mutex::new(SmallRng::seed_from_u64(params.seed)),
        ok_latency: params.ok_latency,
        fail_latency: params.fail_latency,
        calls: Mutex::new(HashMap::new()),
        primary_ok: Mutex::new(Vec::new()),
    }));
    let client = client(setup, &provider, params.seed);
    // (request id, start, latency, success) of every logical request.
    type Outcome = (u64, Duration, Duration, bool);
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::default();

    let mut tasks = Vec::with_capacity(params.clients);
    for c in 0..params.clients {
        let mut client = client.clone();
        let results = results.clone();
        let duration = params.duration;
        let think = params.think.as_secs_f64();
        let seed = params.seed.wrapping_mul(1_000_003).wrapping_add(c as u64);
        tasks.push(tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut n = 0u64;
            loop {
                // Exponential think time: -ln(U) × mean.
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                tokio::time::sleep(Duration::from_secs_f64(-u.ln() * think)).await;
                let at = start.elapsed();
                if at >= duration {
                    break;
                }
                let id = (c as u64) << 32 | n;
                n += 1;
                let req = Request::post("https://primary.example/v1/chat/completions")
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header(ID_HEADER, id)
                    .body(Full::new(Bytes::from_static(BODY)))
                    .expect("a valid request");
                let success = match client.ready().await {
                    Ok(svc) => svc.call(req).await.unwrap_or(false),
                    Err(_) => false,
                };
                lock(&results).push((id, at, start.elapsed() - at, success));
            }
        }));
    }
    for t in tasks {
        t.await.expect("a client task");
    }

    let calls = lock(&provider.0.calls).clone();
    let mut logical: Vec<Logical> = lock(&results)
        .iter()
        .map(|&(id, start, latency, success)| {
            let (primary_calls, backup_calls) = calls.get(&id).copied().unwrap_or_default();
            Logical {
                start,
                latency,
                success,
                primary_calls,
                backup_calls,
            }
        })
        .collect();
    logical.sort_by_key(|l| l.start);
    let mut latencies: Vec<Duration> = logical.iter().map(|l| l.latency).collect();
    latencies.sort();
    let primary_ok = lock(&provider.0.primary_ok).clone();

    let windows = scenario.script.windows(params.duration);
    let detect = windows
        .iter()
        .map(|&(ws, we)| {
            logical
                .iter()
                .find(|l| l.start >= ws && l.start < we && l.primary_calls == 0)
                .map(|l| l.start - ws)
        })
        .collect();
    let back_on_primary = windows
        .iter()
        .filter(|&&(_, we)| we < params.duration)
        .map(|&(_, we)| {
            primary_ok
                .iter()
                .filter(|&&(arrival, _)| arrival >= we)
                .map(|&(_, done)| done)
                .min()
                .map(|done| done - we)
        })
        .collect();

    Report {
        logical: logical.len() as u64,
        primary_calls: logical.iter().map(|l| u64::from(l.primary_calls)).sum(),
        backup_calls: logical.iter().map(|l| u64::from(l.backup_calls)).sum(),
        successes: logical.iter().filter(|l| l.success).count() as u64,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        detect,
        back_on_primary,
    }
}

// ---------------------------------------------------------------- formatting

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Worst of per-window times, with how many windows had one: `"1.234 s (3/3)"`, `"never"`.
fn worst(v: &[Option<Duration>]) -> String {
    if v.is_empty() {
        return "n/a".to_owned();
    }
    let seen: Vec<Duration> = v.iter().flatten().copied().collect();
    match seen.iter().max() {
        None => "never".to_owned(),
        Some(max) if v.len() == 1 => secs(*max),
        Some(max) => format!("{} ({}/{})", secs(*max), seen.len(), v.len()),
    }
}

/// The report's table header.
pub const TABLE_HEADER: &str = "| scenario | setup | logical requests | succeeded | attempts / request (primary) | success rate | p50 | p99 | time to detect | back on primary |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|";

/// The worst time back on the primary over the outage windows that ended within the run;
/// `None` when none ended, or when the primary was never back after one of them.
pub fn worst_back_on_primary(r: &Report) -> Option<Duration> {
    if r.back_on_primary.iter().any(Option::is_none) {
        return None;
    }
    r.back_on_primary.iter().flatten().copied().max()
}

/// One table row as a JSON object (one line of the `OUTAGE_REPORT` file): `scenario`, `setup`,
/// `logical`, `succeeded`, `attempts_per_request` (every route), `back_on_primary_s` (the
/// worst window, `null` when no window ended within the run or the primary was never back).
pub fn json_row(scenario: &Scenario, setup: Setup, r: &Report) -> serde_json::Value {
    serde_json::json!({
        "scenario": scenario.name,
        "setup": setup.to_string(),
        "logical": r.logical,
        "succeeded": r.successes,
        "attempts_per_request": r.amplification(),
        "back_on_primary_s": worst_back_on_primary(r).map(|d| d.as_secs_f64()),
    })
}

/// One table row.
pub fn table_row(scenario: &Scenario, setup: Setup, r: &Report) -> String {
    format!(
        "| {} | {} | {} | {} | {:.3} ({:.3}) | {:.2} % | {} | {} | {} | {} |",
        scenario.name,
        setup,
        r.logical,
        r.successes,
        r.amplification(),
        r.primary_amplification(),
        r.success_rate() * 100.0,
        secs(r.p50),
        secs(r.p99),
        worst(&r.detect),
        worst(&r.back_on_primary),
    )
}
