//! Property tests of the guarantees the whole crate rests on:
//!
//! - **No double delivery.** For any script of faults across attempts and routes, the bytes the
//!   caller receives through the full stack are a prefix of exactly one attempt's stream — the
//!   whole stream when the result is a success — and every transport call is in the log.
//! - **The circuit breaker** follows a simple reference model of its state machine and its
//!   sliding window of time buckets under any sequence of outcomes, latencies, abandoned calls,
//!   time advances and forced states.
//! - **Budgets** (the retry budget, the spend store, the rate-limit buckets) never go negative
//!   or over their cap, and agree with a reference model.
//!
//! Each property runs 96 cases by default so CI stays fast; set `PROPTEST_CASES` for more.
//! Every case runs on its own tokio runtime under paused time: timeouts and backoff waits take
//! no real time, and results are exact.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

#[path = "support/log.rs"]
mod log;
use log::ms;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::backoff::JitterSource;
use tower_llm_resilience::budget::store::{Lease, Refusal, StoreFuture};
use tower_llm_resilience::budget::{BudgetStore, MemoryStore, RateDemand, SpendStatus};
use tower_llm_resilience::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use tower_llm_resilience::context::FallbackAvailable;
use tower_llm_resilience::policy::{
    BackoffPolicy, CircuitBreakerPolicy, CommitPoint, FailureRateRule, Policy, RetryBudgetPolicy,
    RouteConfig, SlowCallRule,
};
use tower_llm_resilience::{Body, Error, ErrorKind, RetryBudget, RouteName};

fn config() -> ProptestConfig {
    // A failure prints its minimal case; no regression files are written into the tree.
    let c = ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_some() {
        return c;
    }
    ProptestConfig { cases: 96, ..c }
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("a test runtime: {e}"),
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

// ---------------------------------------------------------------------------------------------
// A fake transport: every call answers with the next fault of its route's script.

/// What one attempt does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The whole stream, `[DONE]` included.
    Success,
    /// The first `k` bytes (mod the stream's length), then a broken connection.
    Cut(u16),
    /// The first `k` bytes, then silence.
    Stall(u16),
    /// `n` content events, then an in-band `server_error` event and a clean end.
    InBand(u8),
    /// The first `k` bytes (before the finish reason), then a clean end: truncated.
    Truncate(u16),
    /// An error response with this status (`429` carries `retry-after: 1`).
    Status(u16),
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => Just(Fault::Success),
        2 => any::<u16>().prop_map(Fault::Cut),
        1 => any::<u16>().prop_map(Fault::Stall),
        2 => (0u8..4).prop_map(Fault::InBand),
        1 => any::<u16>().prop_map(Fault::Truncate),
        2 => prop::sample::select(vec![500u16, 503, 429]).prop_map(Fault::Status),
    ]
}

const CONTENT_EVENTS: usize = 3;

fn event(id: usize, json_rest: &str) -> String {
    format!("data: {{\"id\":\"att-{id:03}\",{json_rest}}}\n\n")
}

/// Attempt `id`'s complete stream; every attempt's bytes differ from the first event on.
fn stream_of(id: usize) -> (String, usize) {
    let mut s = event(
        id,
        r#""choices":[{"index":0,"delta":{"role":"assistant"}}]"#,
    );
    for i in 0..CONTENT_EVENTS {
        s += &event(
            id,
            &format!(r#""choices":[{{"index":0,"delta":{{"content":"w{i}-{id:03}"}}}}]"#),
        );
    }
    let finish_at = s.len();
    s += &event(
        id,
        r#""choices":[{"index":0,"delta":{},"finish_reason":"stop"}]"#,
    );
    s += "data: [DONE]\n\n";
    (s, finish_at)
}

fn in_band(id: usize, n: u8) -> String {
    let (full, _) = stream_of(id);
    // The role delta and `n` content events, then the error.
    let mut end = 0;
    for _ in 0..=n {
        end += full[end..].find("\n\n").map_or(0, |i| i + 2);
    }
    format!(
        "{}data: {{\"error\":{{\"message\":\"boom att-{id:03}\",\"type\":\"server_error\"}}}}\n\n",
        &full[..end]
    )
}

/// How a fake body ends after its chunks.
#[derive(Debug, Clone, Copy)]
enum End {
    Clean,
    Broken,
    Silent,
}

struct FakeBody {
    chunks: VecDeque<Bytes>,
    end: End,
    /// Paused time before each chunk.
    gap: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

#[derive(Debug)]
struct Reset;
impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by peer")
    }
}
impl std::error::Error for Reset {}

impl HttpBody for FakeBody {
    type Data = Bytes;
    type Error = Reset;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Reset>>> {
        if !self.gap.is_zero() && !self.chunks.is_empty() {
            let gap = self.gap;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            std::task::ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match self.end {
            End::Clean => Poll::Ready(None),
            End::Broken => {
                self.end = End::Clean;
                Poll::Ready(Some(Err(Reset)))
            }
            // Never woken: only the guard's timers end it.
            End::Silent => Poll::Pending,
        }
    }
}

/// One transport call as it was served.
#[derive(Debug, Clone)]
struct Served {
    id: usize,
    fault: Fault,
    /// Exactly the bytes its body yields.
    sent: Bytes,
}

#[derive(Clone, Default)]
struct Script {
    faults: Arc<Mutex<HashMap<String, VecDeque<Fault>>>>,
    served: Arc<Mutex<Vec<Served>>>,
    /// Paused time between the chunks of every body.
    gap: Duration,
}

impl Script {
    fn new(routes: &[(&str, Vec<Fault>)]) -> Self {
        let s = Script::default();
        let mut faults = lock(&s.faults);
        for (route, f) in routes {
            faults.insert((*route).to_owned(), f.iter().copied().collect());
        }
        drop(faults);
        s
    }

    fn served(&self) -> Vec<Served> {
        lock(&self.served).clone()
    }

    fn answer(&self, route: &str, chunk: usize) -> Response<FakeBody> {
        let fault = lock(&self.faults)
            .get_mut(route)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Fault::Success);
        let mut served = lock(&self.served);
        let id = served.len();
        let (full, finish_at) = stream_of(id);
        let (status, bytes, end) = match fault {
            Fault::Success => (200, full, End::Clean),
            Fault::Cut(k) => (
                200,
                full[..usize::from(k) % full.len()].to_owned(),
                End::Broken,
            ),
            Fault::Stall(k) => (
                200,
                full[..usize::from(k) % full.len()].to_owned(),
                End::Silent,
            ),
            Fault::InBand(n) => (200, in_band(id, n), End::Clean),
            Fault::Truncate(k) => (
                200,
                full[..usize::from(k) % finish_at].to_owned(),
                End::Clean,
            ),
            Fault::Status(s) => (
                s,
                format!(
                    "{{\"error\":{{\"message\":\"fail att-{id:03}\",\"type\":\"server_error\",\"code\":null}}}}"
                ),
                End::Clean,
            ),
        };
        let sent = Bytes::from(bytes);
        served.push(Served {
            id,
            fault,
            sent: sent.clone(),
        });
        let chunks = (0..sent.len())
            .step_by(chunk)
            .map(|i| sent.slice(i..(i + chunk).min(sent.len())))
            .collect();
        let mut response = Response::new(FakeBody {
            chunks,
            end,
            gap: self.gap,
            sleep: None,
        });
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        let content_type = if status == 200 {
            "text/event-stream"
        } else {
            "application/json"
        };
        response
            .headers_mut()
            .insert("content-type", http::HeaderValue::from_static(content_type));
        if status == 429 {
            response
                .headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
        }
        response
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn transport(
    script: Script,
    chunk: usize,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<FakeBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        let route = RouteName::of_request(&req);
        let response = script.answer(route.as_str(), chunk);
        async move { Ok::<_, Infallible>(response) }
    })
}

/// A streamed chat request to a port where nothing listens: the transport is a stand-in.
fn chat_request() -> Request<Full<Bytes>> {
    tower_llm_resilience::testing::chat_request("http://127.0.0.1:9", "gpt-4o", true)
}

fn stack_policy(commit: CommitPoint) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(7);
    p.retry.max_attempts = 3;
    p.retry.backoff = BackoffPolicy::new(ms(100), secs(1));
    p.stream.first_token_timeout = Some(secs(5));
    p.stream.idle_timeout = Some(secs(2));
    p.stream.total_timeout = Some(secs(60));
    p.stream.commit = commit;
    p.fallback.routes = vec![
        RouteConfig::new("backup")
            .base_url("http://127.0.0.1:9/backup/v1")
            .model("backup-model"),
    ];
    p.budget.deadline = Some(secs(300));
    p
}

/// Reads a body to its end: the bytes, and the error it ended with.
async fn read(body: &mut Body) -> (Vec<u8>, Option<Error>) {
    let mut out = Vec::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(d) = frame.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => return (out, Some(e)),
            None => return (out, None),
        }
    }
}

async fn no_double_delivery(
    primary: Vec<Fault>,
    backup: Vec<Fault>,
    commit: CommitPoint,
    chunk: usize,
    gap: Duration,
) -> Result<(), TestCaseError> {
    let script = Script {
        gap,
        ..Script::new(&[("primary", primary), ("backup", backup)])
    };
    let policy = stack_policy(commit);
    let layer = policy
        .layer()
        .map_err(|e| TestCaseError::fail(format!("policy: {e}")))?;
    let service = layer.layer(transport(script.clone(), chunk));

    let outcome = tokio::time::timeout(secs(3600), async move {
        match service.oneshot(chat_request()).await {
            Ok(mut response) => {
                let (bytes, error) = read(response.body_mut()).await;
                Ok((response, bytes, error))
            }
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(|_| TestCaseError::fail("the request hung"))?;

    let served = script.served();
    prop_assert!(!served.is_empty(), "no attempt was made");
    match outcome {
        Err(e) => {
            // Nothing reached the caller; every transport call is in the error's log.
            let log = e
                .attempt_log()
                .ok_or_else(|| TestCaseError::fail(format!("an error without its log: {e}")))?;
            prop_assert_eq!(log.attempts().len(), served.len(), "{}", log);
        }
        Ok((response, received, error)) => {
            if let Some(log) = response
                .extensions()
                .get::<tower_llm_resilience::AttemptLog>()
            {
                prop_assert_eq!(log.attempts().len(), served.len(), "{}", log);
            } else {
                return Err(TestCaseError::fail("a response without its log"));
            }
            let sources: Vec<&Served> = served
                .iter()
                .filter(|s| s.sent.starts_with(&received))
                .collect();
            if !received.is_empty() {
                prop_assert_eq!(
                    sources.len(),
                    1,
                    "received {:?} is not a prefix of exactly one attempt: {:?}",
                    String::from_utf8_lossy(&received),
                    served
                );
            }
            match error {
                None if response.status() == StatusCode::OK => {
                    prop_assert!(!received.is_empty(), "a clean 200 delivered nothing");
                    let source = sources[0];
                    prop_assert_eq!(source.fault, Fault::Success, "{:?}", served);
                    prop_assert_eq!(received, stream_of(source.id).0.into_bytes());
                }
                None => {
                    // A provider's error response, handed up whole.
                    prop_assert!(!received.is_empty());
                    prop_assert_eq!(&received[..], &sources[0].sent[..]);
                }
                Some(e) => match e.kind() {
                    ErrorKind::StreamInterrupted {
                        delivered_bytes, ..
                    } => {
                        prop_assert_eq!(*delivered_bytes, received.len() as u64);
                        prop_assert!(!received.is_empty());
                    }
                    other => {
                        return Err(TestCaseError::fail(format!(
                            "a body error that is not StreamInterrupted: {other}"
                        )));
                    }
                },
            }
        }
    }
    Ok(())
}

fn commit_point() -> impl Strategy<Value = CommitPoint> {
    prop_oneof![
        2 => Just(CommitPoint::FirstEvent),
        2 => Just(CommitPoint::End),
        1 => (1u64..600).prop_map(|bytes| CommitPoint::AfterBytes { bytes }),
        1 => (1u64..3_000).prop_map(|n| CommitPoint::AfterDuration { duration: ms(n) }),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// The bytes the caller receives are a prefix of exactly one attempt's stream, and the
    /// complete stream when the result is a success; each transport call is logged once.
    #[test]
    fn no_double_delivery_through_the_full_stack(
        primary in prop::collection::vec(fault(), 0..6),
        backup in prop::collection::vec(fault(), 0..6),
        commit in commit_point(),
        chunk in 1usize..64,
        gap in prop_oneof![3 => Just(0u64), 1 => 1u64..400].prop_map(ms),
    ) {
        runtime().block_on(no_double_delivery(primary, backup, commit, chunk, gap))?;
    }
}

// ---------------------------------------------------------------------------------------------
// The circuit breaker against a reference model.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// 200, body read to its end.
    Success,
    /// 503: counts for the breaker.
    Failure,
    /// 400: says nothing about the provider's health.
    Neutral,
    /// The call never answers; its future is dropped after one poll.
    Abandoned,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// A call with this outcome, answered after this many milliseconds of paused time (the
    /// time the call is in flight: its latency). An abandoned call takes no time.
    Call(Outcome, u64),
    Advance(u64),
    /// `CircuitBreakerHandle::force_open`.
    ForceOpen,
    /// `CircuitBreakerHandle::force_closed`.
    ForceClosed,
    /// `CircuitBreakerHandle::reset`.
    Reset,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        3 => Just(Outcome::Success),
        4 => Just(Outcome::Failure),
        1 => Just(Outcome::Neutral),
        1 => Just(Outcome::Abandoned),
    ]
}

/// Outcomes with successes and failures weighted `(successes, failures)`.
fn outcome_in((successes, failures): (u32, u32)) -> impl Strategy<Value = Outcome> {
    prop_oneof![
        successes => Just(Outcome::Success),
        failures => Just(Outcome::Failure),
        1 => Just(Outcome::Neutral),
        1 => Just(Outcome::Abandoned),
    ]
}

/// Operations for the consecutive-failures rule alone: answers take no time, no handle.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        9 => outcome().prop_map(|o| Op::Call(o, 0)),
        3 => (1u64..8_000).prop_map(Op::Advance),
    ]
}

/// The failure-rate rule of a case.
#[derive(Debug, Clone, Copy)]
struct RateCase {
    threshold: f64,
    window_ms: u64,
    buckets: u32,
    min_calls: u32,
}

/// The slow-call rule of a case.
#[derive(Debug, Clone, Copy)]
struct SlowCase {
    threshold_ms: u64,
    rate: f64,
}

/// The breaker's policy in one case.
#[derive(Debug, Clone, Copy)]
struct BreakerCase {
    consecutive: Option<u32>,
    rate: Option<RateCase>,
    slow: Option<SlowCase>,
    base_ms: u64,
    cap_factor: u32,
    /// Good probes in a row that close a half-open circuit.
    close_after: u32,
    seed: u64,
}

impl BreakerCase {
    fn policy(&self) -> CircuitBreakerPolicy {
        let mut policy = CircuitBreakerPolicy::default();
        policy.consecutive_failures = self.consecutive;
        policy.failure_rate = self.rate.map(|r| {
            let mut rule = FailureRateRule::default();
            rule.threshold = r.threshold;
            rule.window = ms(r.window_ms);
            rule.buckets = r.buckets;
            rule.min_calls = r.min_calls;
            rule
        });
        policy.slow_call = self
            .slow
            .map(|s| SlowCallRule::new(ms(s.threshold_ms), s.rate));
        policy.open_base = self.base();
        policy.open_cap = self.cap();
        policy.half_open_successes = self.close_after;
        policy
    }

    fn base(&self) -> Duration {
        ms(self.base_ms)
    }

    fn cap(&self) -> Duration {
        ms(self.base_ms) * self.cap_factor
    }
}

/// A share in `0.1..=1`: often a round twentieth, so that `failures / calls` lands exactly on
/// the threshold ("at or above" trips).
fn share() -> impl Strategy<Value = f64> {
    prop_oneof![(2u32..=20).prop_map(|k| f64::from(k) / 20.0), 0.1f64..=1.0]
}

/// Every rule: the failure rate over a window of 1–120 s in as many buckets as the policy
/// allows (mostly few), consecutive failures and the slow-call rule each on or off.
fn window_case() -> impl Strategy<Value = BreakerCase> {
    let rate = (
        share(),
        prop_oneof![(1u64..=120).prop_map(|s| s * 1_000), 1_000u64..=120_000],
        prop_oneof![4 => 1u32..=12, 1 => 1u32..=1_000],
        1u32..=20,
    )
        .prop_map(|(threshold, window_ms, buckets, min_calls)| RateCase {
            threshold,
            window_ms,
            buckets,
            min_calls,
        });
    let slow =
        (1u64..3_000, share()).prop_map(|(threshold_ms, rate)| SlowCase { threshold_ms, rate });
    (
        prop::option::weighted(0.4, 1u32..12),
        rate,
        prop::option::of(slow),
        100u64..5_000,
        1u32..10,
        any::<u64>(),
    )
        .prop_map(
            |(consecutive, rate, slow, base_ms, cap_factor, seed)| BreakerCase {
                consecutive,
                rate: Some(rate),
                slow,
                base_ms,
                cap_factor,
                close_after: 1 + (seed % 3) as u32,
                seed,
            },
        )
}

/// Operations for a case with a window: latencies around the slow threshold, advances within a
/// bucket, onto and across bucket boundaries, past open times and beyond the whole window; when
/// `steer`, also the handle's forced states and reset. Successes and failures come in the
/// proportion `health` (so that some cases hover around their threshold, others far from it).
fn window_ops(
    case: BreakerCase,
    steer: bool,
    health: (u32, u32),
) -> impl Strategy<Value = Vec<Op>> {
    let (window, buckets) = case.rate.map_or((60_000, 12), |r| (r.window_ms, r.buckets));
    let width = (window / u64::from(buckets)).max(1);
    let latency = match case.slow {
        Some(s) => prop_oneof![
            2 => Just(0u64),
            1 => Just(s.threshold_ms),
            1 => Just(s.threshold_ms + 1),
            2 => 0..=2 * s.threshold_ms,
        ]
        .boxed(),
        None => prop_oneof![3 => Just(0u64), 1 => 0u64..2_000].boxed(),
    };
    let mut ops: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (
            24,
            (outcome_in(health), latency)
                .prop_map(|(o, l)| Op::Call(o, l))
                .boxed(),
        ),
        (2, (1..=width).prop_map(Op::Advance).boxed()),
        // One, two or three widths, give or take a millisecond.
        (
            2,
            (1u64..=3, 0u64..=2)
                .prop_map(move |(k, d)| Op::Advance((k * width + d).max(2) - 1))
                .boxed(),
        ),
        (2, (1u64..8_000).prop_map(Op::Advance).boxed()),
        (1, (window / 2..=window * 2).prop_map(Op::Advance).boxed()),
    ];
    if steer {
        ops.push((1, Just(Op::ForceOpen).boxed()));
        ops.push((1, Just(Op::ForceClosed).boxed()));
        ops.push((2, Just(Op::Reset).boxed()));
    }
    prop::collection::vec(proptest::strategy::Union::new_weighted(ops), 1..200)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelState {
    Closed,
    Open { until: Instant },
    HalfOpen,
    ForcedOpen,
    ForcedClosed,
}

/// An outcome counted in the model's window: the number of the bucket-wide time span (counted
/// from the route's creation) it was recorded in.
#[derive(Debug, Clone, Copy)]
struct Counted {
    span: u128,
    failure: bool,
    slow: bool,
}

/// The breaker's reference model: every rule of the policy, as the documentation describes
/// them, but for one point (the second below) where it follows what the breaker does.
///
/// - The window is `buckets` spans of `window / buckets` each (to the nanosecond), counted from
///   the moment the route's breaker was created; it holds the outcomes of the current span and
///   the `buckets - 1` before it, so an outcome ages out between `window - width` and `window`
///   after it was recorded. Only calls admitted while closed count, at the time they answer;
///   neutral and abandoned ones not at all. Closing (`close_after` good probes in a row)
///   empties it; a trip does not, nor does forcing a state. A reset forgets the route: the next
///   breaker's spans start with its first call.
/// - The rate is judged, once the window holds `min_calls` calls, when a failure or a slow call
///   is recorded (the consecutive-failures rule first). It is *not* judged when a success that
///   is not slow is recorded, though that success can bring the window to `min_calls` calls at
///   a rate at or above the threshold, nor as successes age out: that is what the breaker does,
///   although the module documentation promises a trip "once the window holds `min_calls`
///   calls".
/// - A call is slow when its latency (paused time while it is in flight) exceeds the slow-call
///   threshold. A slow probe opens the circuit again, like a failed one.
#[derive(Debug)]
struct Model {
    case: BreakerCase,
    /// When the route's breaker was created; `None` before its first call or force, and after a
    /// reset.
    origin: Option<Instant>,
    state: ModelState,
    consecutive: u32,
    trips: u32,
    /// Good probes in a row since the circuit went half-open.
    probe_successes: u32,
    window: Vec<Counted>,
}

impl Model {
    fn new(case: BreakerCase) -> Self {
        Self {
            case,
            origin: None,
            state: ModelState::Closed,
            consecutive: 0,
            trips: 0,
            probe_successes: 0,
            window: Vec::new(),
        }
    }

    /// The open time of the next trip, before jitter.
    fn open_time(&self) -> Duration {
        let factor = 1u32.checked_shl(self.trips.min(31)).unwrap_or(u32::MAX);
        self.case
            .base()
            .checked_mul(factor)
            .unwrap_or(self.case.cap())
            .min(self.case.cap())
    }

    /// The span `at` falls in, for the window of rule `r`.
    fn span(&self, r: &RateCase, at: Instant) -> u128 {
        let width = (u128::from(r.window_ms) * 1_000_000 / u128::from(r.buckets)).max(1);
        let origin = self.origin.unwrap_or(at);
        at.saturating_duration_since(origin).as_nanos() / width
    }

    fn record(&mut self, at: Instant, failure: bool, slow: bool) {
        if let Some(r) = self.case.rate {
            let span = self.span(&r, at);
            self.window.push(Counted {
                span,
                failure,
                slow,
            });
        }
    }

    /// Calls, failures and slow calls in the window at `at`.
    fn totals(&self, at: Instant) -> (u32, u32, u32) {
        let Some(r) = self.case.rate else {
            return (0, 0, 0);
        };
        let now = self.span(&r, at);
        let mut t = (0, 0, 0);
        for c in &self.window {
            if c.span + u128::from(r.buckets) > now {
                t.0 += 1;
                t.1 += u32::from(c.failure);
                t.2 += u32::from(c.slow);
            }
        }
        t
    }

    /// Whether a rule trips the breaker at `at`.
    fn judge(&self, at: Instant) -> bool {
        if self.case.consecutive.is_some_and(|n| self.consecutive >= n) {
            return true;
        }
        let Some(r) = self.case.rate else {
            return false;
        };
        let (calls, failures, slow) = self.totals(at);
        if calls < r.min_calls {
            return false;
        }
        let calls = f64::from(calls);
        f64::from(failures) / calls >= r.threshold
            || self
                .case
                .slow
                .is_some_and(|s| f64::from(slow) / calls >= s.rate)
    }

    fn close(&mut self) {
        self.state = ModelState::Closed;
        self.consecutive = 0;
        self.trips = 0;
        self.window.clear();
    }

    /// A forced state; trips, counts and the window stay as they are.
    fn force(&mut self, now: Instant, to: ModelState) {
        self.origin.get_or_insert(now);
        self.state = to;
        self.probe_successes = 0;
    }
}

struct Breaker<S> {
    service: S,
    calls: Arc<Mutex<usize>>,
}

async fn breaker_follows_its_model(case: BreakerCase, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let layer = CircuitBreakerLayer::new(case.policy())
        .map_err(|e| TestCaseError::fail(format!("policy: {e}")))?
        .jitter(JitterSource::seeded(case.seed));
    let handle = layer.handle();
    let calls = Arc::new(Mutex::new(0usize));
    let counter = calls.clone();
    let transport = tower::service_fn(move |req: Request<Full<Bytes>>| {
        *lock(&counter) += 1;
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<u64>().ok())
        };
        let status = header("x-outcome").unwrap_or(200);
        let latency = header("x-latency").unwrap_or(0);
        async move {
            if status == 0 {
                std::future::pending::<()>().await;
            }
            if latency > 0 {
                tokio::time::sleep(ms(latency)).await;
            }
            let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
            *response.status_mut() = u16::try_from(status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK);
            Ok::<_, Infallible>(response)
        }
    });
    let mut b = Breaker {
        service: layer.layer(transport),
        calls,
    };
    let route = "127.0.0.1:9";
    let mut m = Model::new(case);

    for (step, op) in ops.into_iter().enumerate() {
        let now = Instant::now();
        match op {
            Op::Advance(n) => tokio::time::advance(ms(n)).await,
            Op::ForceOpen => {
                handle.force_open(route);
                m.force(now, ModelState::ForcedOpen);
            }
            Op::ForceClosed => {
                handle.force_closed(route);
                m.force(now, ModelState::ForcedClosed);
            }
            Op::Reset => {
                handle.reset(route);
                m = Model::new(case);
            }
            Op::Call(outcome, latency) => {
                m.origin.get_or_insert(now);
                // The model's verdict on admission: Open past its time becomes half-open.
                let admitted = match m.state {
                    ModelState::Closed | ModelState::HalfOpen | ModelState::ForcedClosed => true,
                    ModelState::Open { until } if now >= until => {
                        m.state = ModelState::HalfOpen;
                        m.probe_successes = 0;
                        true
                    }
                    ModelState::Open { .. } | ModelState::ForcedOpen => false,
                };
                let before = *lock(&b.calls);
                let status = match outcome {
                    Outcome::Success => "200",
                    Outcome::Failure => "503",
                    Outcome::Neutral => "400",
                    Outcome::Abandoned => "0",
                };
                let mut req = Request::new(Full::new(Bytes::from_static(b"{}")));
                *req.uri_mut() = http::Uri::from_static("http://127.0.0.1:9/v1/chat/completions");
                // A request with a backup route: the circuit decides, not the throttle.
                req.extensions_mut().insert(FallbackAvailable);
                req.headers_mut()
                    .insert("x-outcome", http::HeaderValue::from_static(status));
                req.headers_mut()
                    .insert("x-latency", http::HeaderValue::from(latency));
                let ready = b
                    .service
                    .ready()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("ready: {e}")))?;
                let mut future = Box::pin(ready.call(req));
                let result = if outcome == Outcome::Abandoned {
                    let waker = std::task::Waker::noop();
                    let mut cx = Context::from_waker(waker);
                    match future.as_mut().poll(&mut cx) {
                        Poll::Ready(r) => Some(r),
                        Poll::Pending => None,
                    }
                } else {
                    Some(future.as_mut().await)
                };
                // When the call answered: the model records its outcome then.
                let end = Instant::now();
                let called = *lock(&b.calls) > before;
                prop_assert_eq!(called, admitted, "step {}: {:?} in {:?}", step, op, m);
                let answered = admitted && outcome != Outcome::Abandoned;
                let took = if answered {
                    ms(latency)
                } else {
                    Duration::ZERO
                };
                prop_assert_eq!(end - now, took, "step {}: paused time in flight", step);
                match result {
                    Some(Ok(response)) => {
                        prop_assert!(admitted);
                        // Read to the end: the run of failures is broken only then.
                        let body = response.into_body();
                        let _ = body.collect().await;
                    }
                    Some(Err(e)) => match e.kind() {
                        ErrorKind::CircuitOpen { retry_in, .. } => {
                            prop_assert!(!admitted, "step {}: refused while {:?}", step, m);
                            match m.state {
                                ModelState::Open { until } => {
                                    prop_assert_eq!(*retry_in, until - now);
                                }
                                // A hint only: the policy's cap.
                                _ => prop_assert_eq!(*retry_in, case.cap()),
                            }
                        }
                        other => {
                            return Err(TestCaseError::fail(format!("unexpected error {other}")));
                        }
                    },
                    None => {
                        prop_assert_eq!(outcome, Outcome::Abandoned);
                        drop(future);
                    }
                }
                let slow = case.slow.is_some_and(|s| ms(latency) > ms(s.threshold_ms));
                // The open time (before jitter) when this call tripped the breaker.
                let mut tripped = None;
                if admitted {
                    match (m.state, outcome) {
                        (_, Outcome::Neutral | Outcome::Abandoned)
                        | (ModelState::ForcedClosed, _) => {}
                        (ModelState::Closed, Outcome::Success) => {
                            m.record(end, false, slow);
                            if slow && m.judge(end) {
                                // Tripped at the head: the body's end no longer breaks the run.
                                tripped = Some(m.open_time());
                                m.trips += 1;
                            } else {
                                m.consecutive = 0;
                            }
                        }
                        (ModelState::Closed, Outcome::Failure) => {
                            m.record(end, true, slow);
                            m.consecutive += 1;
                            if m.judge(end) {
                                tripped = Some(m.open_time());
                                m.trips += 1;
                            }
                        }
                        (ModelState::HalfOpen, Outcome::Success) if !slow => {
                            m.probe_successes += 1;
                            if m.probe_successes >= case.close_after {
                                m.close();
                            }
                        }
                        (ModelState::HalfOpen, Outcome::Success | Outcome::Failure) => {
                            tripped = Some(m.open_time());
                            m.trips += 1;
                        }
                        (ModelState::Open { .. } | ModelState::ForcedOpen, _) => {
                            return Err(TestCaseError::fail("the model admitted while open"));
                        }
                    }
                }
                if let Some(d) = tripped {
                    // The real open time is the model's, jittered down into [0.8, 1.0].
                    let retry_in = handle
                        .snapshot(route)
                        .and_then(|s| s.retry_in)
                        .ok_or_else(|| TestCaseError::fail(format!("step {step}: not open")))?;
                    prop_assert!(
                        retry_in <= d && retry_in >= d.mul_f64(0.8),
                        "open for {:?}, expected within [0.8, 1.0] of {:?}",
                        retry_in,
                        d
                    );
                    m.state = ModelState::Open {
                        until: end + retry_in,
                    };
                }
            }
        }
        let at = Instant::now();
        let snap = handle.snapshot(route);
        let Some(snap) = snap else {
            // Not seen yet, or reset since.
            prop_assert!(m.origin.is_none(), "step {}: {:?}; model {:?}", step, op, m);
            prop_assert_eq!(m.state, ModelState::Closed);
            continue;
        };
        prop_assert!(m.origin.is_some(), "step {}: the route exists", step);
        let expected = match m.state {
            ModelState::Closed => CircuitState::Closed,
            ModelState::Open { .. } => CircuitState::Open,
            ModelState::HalfOpen => CircuitState::HalfOpen,
            ModelState::ForcedOpen => CircuitState::ForcedOpen,
            ModelState::ForcedClosed => CircuitState::ForcedClosed,
        };
        prop_assert_eq!(
            snap.state,
            expected,
            "step {}: {:?}; model {:?}",
            step,
            op,
            m
        );
        prop_assert_eq!(snap.consecutive_failures, m.consecutive, "step {}", step);
        prop_assert_eq!(snap.trips, m.trips, "step {}", step);
        prop_assert_eq!(
            snap.probes_in_flight,
            0,
            "step {}: a probe slot leaked",
            step
        );
        prop_assert_eq!(
            (snap.calls, snap.failures, snap.slow_calls),
            m.totals(at),
            "step {}: {:?}; window (calls, failures, slow) against model {:?}",
            step,
            op,
            m
        );
        let retry_in = match m.state {
            ModelState::Open { until } => Some(until.saturating_duration_since(at)),
            _ => None,
        };
        prop_assert_eq!(snap.retry_in, retry_in, "step {}", step);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Any sequence of outcomes, abandoned calls and time advances leaves the breaker in the
    /// reference model's state, with the model's counts and no leaked probe slot.
    #[test]
    fn the_breaker_follows_its_state_machine(
        threshold in 1u32..5,
        base_ms in 100u64..5_000,
        cap_factor in 1u32..10,
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let case = BreakerCase {
            consecutive: Some(threshold),
            rate: None,
            slow: None,
            base_ms,
            cap_factor,
            close_after: 1 + (base_ms % 3) as u32,
            seed: u64::from(threshold) + base_ms,
        };
        runtime().block_on(breaker_follows_its_model(case, ops))?;
    }

    /// The same with every rule: the failure rate over its sliding window of time buckets
    /// (outcomes aging out as time passes, the window emptied when the circuit closes),
    /// consecutive failures on or off, slow calls (latency in paused time) on or off, and the
    /// handle's forced states and reset in some cases. After every step the route's state,
    /// trips, window counts, open time and probe slots are the model's.
    #[test]
    fn the_breaker_follows_its_failure_rate_window(
        (case, ops) in (window_case(), prop::bool::weighted(0.3), (1u32..=6, 1u32..=6))
            .prop_flat_map(|(case, steer, health)| (Just(case), window_ops(case, steer, health))),
    ) {
        runtime().block_on(breaker_follows_its_model(case, ops))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Budgets: never negative, never over the cap.

#[derive(Debug, Clone, Copy)]
enum BudgetOp {
    Deposit,
    Withdraw,
    Advance(u64),
}

fn budget_op() -> impl Strategy<Value = BudgetOp> {
    prop_oneof![
        2 => Just(BudgetOp::Deposit),
        4 => Just(BudgetOp::Withdraw),
        1 => (1u64..5_000).prop_map(BudgetOp::Advance),
    ]
}

async fn token_bucket_stays_within_its_cap(
    capacity: u32,
    refill_tenths: u32,
    per_request_tenths: u32,
    ops: Vec<BudgetOp>,
) -> Result<(), TestCaseError> {
    let refill = f64::from(refill_tenths) / 10.0;
    let per_request = f64::from(per_request_tenths) / 10.0;
    let budget = RetryBudget::new(&RetryBudgetPolicy::TokenBucket {
        capacity,
        refill_per_sec: refill,
        per_request,
    })
    .map_err(|e| TestCaseError::fail(format!("policy: {e}")))?;
    let start = Instant::now();
    let (mut deposits, mut granted) = (0u64, 0u64);
    for op in ops {
        let available = budget.available();
        prop_assert!(
            available <= u64::from(capacity),
            "{available} over {capacity}"
        );
        match op {
            BudgetOp::Deposit => {
                budget.deposit();
                deposits += 1;
            }
            BudgetOp::Withdraw => {
                let ok = budget.withdraw();
                // Granted exactly when a whole retry was available.
                prop_assert_eq!(ok, available >= 1);
                if ok {
                    granted += 1;
                    prop_assert_eq!(budget.available(), available - 1);
                } else {
                    prop_assert_eq!(budget.available(), 0);
                }
            }
            BudgetOp::Advance(n) => tokio::time::advance(ms(n)).await,
        }
        // Conservation: never more retries than the bucket held, was given and refilled.
        let elapsed = start.elapsed().as_secs_f64();
        let bound = f64::from(capacity) + deposits as f64 * per_request + elapsed * refill;
        prop_assert!(
            granted as f64 <= bound + 1e-9,
            "{granted} granted, bound {bound}"
        );
    }
    Ok(())
}

async fn ratio_budget_stays_within_its_window(
    ratio_pct: u32,
    min_per_sec: u32,
    ttl_ms: u64,
    ops: Vec<BudgetOp>,
) -> Result<(), TestCaseError> {
    let ratio = f64::from(ratio_pct) / 100.0;
    let ttl = ms(ttl_ms);
    let budget = RetryBudget::new(&RetryBudgetPolicy::Ratio {
        ratio,
        min_per_sec,
        ttl,
    })
    .map_err(|e| TestCaseError::fail(format!("policy: {e}")))?;
    let start = Instant::now();
    let (mut deposits, mut granted) = (0u64, 0u64);
    let reserve = f64::from(min_per_sec) * ttl.as_secs_f64();
    for op in ops {
        let available = budget.available();
        match op {
            BudgetOp::Deposit => {
                budget.deposit();
                deposits += 1;
            }
            BudgetOp::Withdraw => {
                let ok = budget.withdraw();
                prop_assert_eq!(ok, available >= 1);
                if ok {
                    granted += 1;
                    prop_assert_eq!(budget.available(), available - 1);
                }
            }
            BudgetOp::Advance(n) => tokio::time::advance(ms(n)).await,
        }
        // Each window (at least 9/10 of `ttl`, as slots age out one by one) grants at most
        // its reserve plus `ratio` of its deposits.
        let windows = start.elapsed().as_secs_f64() / (0.9 * ttl.as_secs_f64()) + 2.0;
        let bound = windows * reserve + ratio * deposits as f64;
        prop_assert!(
            granted as f64 <= bound + 1e-9,
            "{granted} granted, bound {bound}"
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum SpendOp {
    /// Reserve this much for owner `n`.
    Reserve(usize, u64),
    /// Settle the oldest open reservation, charging this share (per mille, may exceed it).
    Settle(u16),
    /// Correct booked spend of owner `n`: refund, charge.
    Adjust(usize, u64, u64),
    Advance(u64),
}

fn spend_op() -> impl Strategy<Value = SpendOp> {
    prop_oneof![
        4 => (0usize..3, 0u64..400).prop_map(|(o, a)| SpendOp::Reserve(o, a)),
        3 => (0u16..1500).prop_map(SpendOp::Settle),
        1 => (0usize..3, 0u64..100, 0u64..100).prop_map(|(o, r, c)| SpendOp::Adjust(o, r, c)),
        1 => (1u64..40_000).prop_map(SpendOp::Advance),
    ]
}

const OWNERS: [&str; 3] = ["team-a", "team-b", "team-c"];

/// The memory store keeps no leases: one for every reservation of these tests.
const LEASE: Lease = Lease::new(1, Duration::from_secs(3600));

fn spend_status(r: Refusal) -> SpendStatus {
    match r {
        Refusal::Spend(status) => status,
        other => panic!("a memory store refused for another reason: {other:?}"),
    }
}

fn rate_wait(r: Refusal) -> Duration {
    match r {
        Refusal::Rate(wait) => wait,
        other => panic!("a memory store refused for another reason: {other:?}"),
    }
}

async fn status_of(store: &MemoryStore, owner: &str, window: Duration) -> SpendStatus {
    match store.status(owner, window).await {
        Ok(status) => status,
        Err(e) => panic!("a memory store failed: {e:?}"),
    }
}

async fn spend_store_matches_its_model(
    cap: u64,
    ops: Vec<SpendOp>,
    overcharge: bool,
) -> Result<(), TestCaseError> {
    let window = secs(60);
    let store = MemoryStore::new();
    let start = Instant::now();
    // Model: per owner (window, spent, open reservations).
    let mut spent = [0u64; 3];
    let mut window_of = [0u64; 3];
    let mut open: VecDeque<(usize, u64)> = VecDeque::new();
    let current = |start: Instant| (start.elapsed().as_nanos() / window.as_nanos()) as u64;
    for op in ops {
        // Strict cases charge no more than was reserved and make no late corrections: then
        // spent plus reserved never passes the cap.
        if !overcharge && matches!(op, SpendOp::Adjust(..)) {
            continue;
        }
        let w = current(start);
        for o in 0..3 {
            if window_of[o] != w {
                window_of[o] = w;
                spent[o] = 0;
            }
        }
        let reserved = |o: usize, open: &VecDeque<(usize, u64)>| -> u64 {
            open.iter().filter(|(x, _)| *x == o).map(|(_, a)| a).sum()
        };
        match op {
            SpendOp::Reserve(o, amount) => {
                let committed = spent[o] + reserved(o, &open);
                let fits = committed + amount <= cap;
                let got = store
                    .reserve(OWNERS[o], LEASE, amount, cap, window)
                    .await
                    .map_err(spend_status);
                prop_assert_eq!(
                    got.is_ok(),
                    fits,
                    "owner {} committed {} + {}",
                    o,
                    committed,
                    amount
                );
                if let Err(status) = got {
                    prop_assert_eq!(status, SpendStatus::new(spent[o], reserved(o, &open)));
                } else {
                    open.push_back((o, amount));
                }
            }
            SpendOp::Settle(per_mille) => {
                if let Some((o, amount)) = open.pop_front() {
                    let per_mille = if overcharge {
                        per_mille
                    } else {
                        per_mille.min(1000)
                    };
                    let charged = amount * u64::from(per_mille) / 1000;
                    store.settle(OWNERS[o], LEASE, amount, charged, window);
                    spent[o] += charged;
                }
            }
            SpendOp::Adjust(o, refund, charge) => {
                store.adjust(OWNERS[o], refund, charge, window);
                spent[o] = spent[o].saturating_sub(refund) + charge;
            }
            SpendOp::Advance(n) => tokio::time::advance(ms(n)).await,
        }
        let w = current(start);
        for o in 0..3 {
            if window_of[o] != w {
                window_of[o] = w;
                spent[o] = 0;
            }
            let status = status_of(&store, OWNERS[o], window).await;
            prop_assert_eq!(status, SpendStatus::new(spent[o], reserved(o, &open)));
            if !overcharge {
                prop_assert!(status.committed() <= cap, "{:?} over {}", status, cap);
            }
        }
    }
    // Every reservation settled: nothing stays reserved.
    while let Some((o, amount)) = open.pop_front() {
        store.settle(OWNERS[o], LEASE, amount, 0, window);
    }
    for owner in OWNERS {
        prop_assert_eq!(status_of(&store, owner, window).await.reserved, 0);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum RateOp {
    Take(u64),
    Advance(u64),
}

async fn rate_buckets_never_exceed_their_rate(
    per_unit_ms: u64,
    capacity: u64,
    ops: Vec<RateOp>,
) -> Result<(), TestCaseError> {
    let store = MemoryStore::new();
    let per_unit = ms(per_unit_ms);
    let start = Instant::now();
    let mut taken: Vec<(Duration, u64)> = Vec::new();
    for op in ops {
        match op {
            RateOp::Advance(n) => tokio::time::advance(ms(n)).await,
            RateOp::Take(cost) => {
                let demand = RateDemand::new("tokens", per_unit, capacity, cost);
                match store.take("key", &[demand]).await.map_err(rate_wait) {
                    Ok(()) => taken.push((start.elapsed(), cost.min(capacity))),
                    Err(wait) => {
                        prop_assert!(!wait.is_zero());
                        prop_assert!(
                            wait <= per_unit * u32::try_from(capacity).unwrap_or(u32::MAX)
                        );
                        // The wait is exact: a moment earlier it is still refused, then granted.
                        if wait > Duration::from_nanos(1) {
                            tokio::time::advance(wait - Duration::from_nanos(1)).await;
                            prop_assert!(store.take("key", &[demand]).await.is_err());
                            tokio::time::advance(Duration::from_nanos(1)).await;
                        } else {
                            tokio::time::advance(wait).await;
                        }
                        prop_assert_eq!(store.take("key", &[demand]).await, Ok(()));
                        taken.push((start.elapsed(), cost.min(capacity)));
                    }
                }
            }
        }
    }
    // Over any interval, at most a full bucket plus what the interval refilled was taken.
    for (i, (from, _)) in taken.iter().enumerate() {
        let mut sum = 0u128;
        for (at, cost) in &taken[i..] {
            sum += u128::from(*cost);
            let refilled = (*at - *from).as_nanos() / per_unit.as_nanos();
            prop_assert!(
                sum <= u128::from(capacity) + refilled + 1,
                "{} taken in {:?}, bucket {} refilling {}",
                sum,
                *at - *from,
                capacity,
                refilled
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// The token-bucket retry budget: never above its capacity, never negative, and never
    /// granting more than it held, was deposited and refilled.
    #[test]
    fn the_token_bucket_retry_budget_stays_within_its_cap(
        capacity in 1u32..20,
        refill_tenths in 0u32..50,
        per_request_tenths in 0u32..20,
        ops in prop::collection::vec(budget_op(), 1..120),
    ) {
        runtime().block_on(token_bucket_stays_within_its_cap(
            capacity, refill_tenths, per_request_tenths, ops,
        ))?;
    }

    /// The ratio retry budget grants at most its reserve plus its ratio of deposits per window.
    #[test]
    fn the_ratio_retry_budget_stays_within_its_window(
        ratio_pct in 0u32..=100,
        min_per_sec in 0u32..5,
        ttl_ms in 1_000u64..20_000,
        ops in prop::collection::vec(budget_op(), 1..150),
    ) {
        runtime().block_on(ratio_budget_stays_within_its_window(ratio_pct, min_per_sec, ttl_ms, ops))?;
    }

    /// The spend store agrees with a model: a reservation is granted exactly when it fits the
    /// cap, reserved amounts never go negative or stray, spend resets per window, and nothing
    /// stays reserved once every reservation settled.
    #[test]
    fn the_spend_store_never_overruns_its_cap(
        cap in 1u64..1_000,
        ops in prop::collection::vec(spend_op(), 1..120),
        overcharge in any::<bool>(),
    ) {
        runtime().block_on(spend_store_matches_its_model(cap, ops, overcharge))?;
    }

    /// Rate-limit buckets never admit more than a full bucket plus their refill over any
    /// interval, and the wait they report is exact.
    #[test]
    fn rate_limit_buckets_never_exceed_their_rate(
        per_unit_ms in 1u64..200,
        capacity in 1u64..50,
        ops in prop::collection::vec(
            prop_oneof![
                3 => (1u64..80).prop_map(RateOp::Take),
                1 => (1u64..3_000).prop_map(RateOp::Advance),
            ],
            1..100,
        ),
    ) {
        runtime().block_on(rate_buckets_never_exceed_their_rate(per_unit_ms, capacity, ops))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions found while hardening: durations from outside never overflow the clock.

fn any_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1u64..10_000).prop_map(ms),
        Just(Duration::MAX),
        Just(Duration::from_secs(1 << 40)),
        any::<u64>().prop_map(Duration::from_secs),
    ]
}

/// A store whose rate limits refuse with an absurd wait, as a user's store might.
struct AbsurdStore(MemoryStore);

impl BudgetStore for AbsurdStore {
    fn reserve(
        &self,
        o: &str,
        l: Lease,
        a: u64,
        c: u64,
        w: Duration,
    ) -> StoreFuture<Result<(), Refusal>> {
        self.0.reserve(o, l, a, c, w)
    }
    fn release(&self, o: &str, l: Lease, a: u64, w: Duration) {
        self.0.release(o, l, a, w);
    }
    fn settle(&self, o: &str, l: Lease, r: u64, c: u64, w: Duration) {
        self.0.settle(o, l, r, c, w);
    }
    fn adjust(&self, o: &str, r: u64, c: u64, w: Duration) {
        self.0.adjust(o, r, c, w);
    }
    fn status(&self, o: &str, w: Duration) -> StoreFuture<Result<SpendStatus, Refusal>> {
        self.0.status(o, w)
    }
    fn take(&self, _key: &str, _demands: &[RateDemand]) -> StoreFuture<Result<(), Refusal>> {
        StoreFuture::ready(Err(Refusal::Rate(Duration::MAX)))
    }
}

#[allow(clippy::too_many_arguments)]
async fn huge_durations_never_panic(
    deadline: Duration,
    max_elapsed: Duration,
    backoff: Duration,
    open: Duration,
    max_wait: Duration,
    timeout: Duration,
    absurd_store: bool,
) -> Result<(), TestCaseError> {
    let mut p = stack_policy(CommitPoint::FirstEvent);
    p.budget.deadline = Some(deadline);
    p.retry.max_elapsed = max_elapsed;
    p.retry.max_server_wait = max_elapsed;
    p.retry.backoff = BackoffPolicy::new(backoff, backoff);
    p.circuit_breaker.open_base = open;
    p.circuit_breaker.open_cap = open;
    p.circuit_breaker.consecutive_failures = Some(1);
    p.budget.admission = tower_llm_resilience::policy::AdmissionMode::Queue {
        max_wait,
        max_queued: 4,
    };
    let mut rate = tower_llm_resilience::policy::RateLimitPolicy::default();
    rate.requests_per_second = Some(1e-9);
    p.budget.rate_limit = Some(rate);
    p.stream.first_token_timeout = Some(timeout);
    p.stream.idle_timeout = Some(timeout);
    p.stream.total_timeout = Some(timeout);
    let Ok(mut layer) = tower_llm_resilience::budget::BudgetLayer::from_policy(&p) else {
        return Ok(());
    };
    if absurd_store {
        layer = layer.store(Arc::new(AbsurdStore(MemoryStore::new())));
    }
    let Ok(rest) = p.layer() else {
        return Ok(());
    };
    let script = Script::new(&[("primary", vec![Fault::Status(503), Fault::Stall(40)])]);
    // The outer budget layer carries the store under test; the full stack inside has its own.
    let service = layer.layer(rest.layer(transport(script, 16)));
    for _ in 0..3 {
        let call = service.clone().oneshot(chat_request());
        // Resolving, or still waiting as the policy allows: both fine; a panic is not.
        if let Ok(Ok(mut response)) = tokio::time::timeout(secs(30), call).await {
            let _ = tokio::time::timeout(secs(30), read(response.body_mut())).await;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Policy durations up to `Duration::MAX`, and a store that asks for an endless wait,
    /// never overflow an `Instant`: the stack builds or refuses the policy, and requests
    /// resolve or wait, without a panic.
    #[test]
    fn huge_durations_from_outside_never_panic(
        deadline in any_duration(),
        max_elapsed in any_duration(),
        backoff in any_duration(),
        open in any_duration(),
        max_wait in any_duration(),
        timeout in any_duration(),
        absurd_store in any::<bool>(),
    ) {
        runtime().block_on(huge_durations_never_panic(
            deadline, max_elapsed, backoff, open, max_wait, timeout, absurd_store,
        ))?;
    }
}

#[tokio::test(start_paused = true)]
async fn a_deadline_of_any_length_never_overflows() {
    let d = tower_llm_resilience::Deadline::after(Duration::MAX);
    assert!(d.remaining() > Duration::from_secs(365 * 24 * 3600));
}

// ---------------------------------------------------------------------------------------------
// The fallback's request rewrite: the `model` of a JSON body is replaced, nothing else changes.

/// A JSON value, kept with the exact text it is written as.
#[derive(Debug, Clone)]
enum Json {
    Null,
    Bool(bool),
    Num(&'static str),
    Str(String, bool),
    Arr(Vec<Json>),
    Obj(Vec<(String, bool, Json)>),
}

/// Text with the characters a hand-written JSON scanner trips on.
fn tricky_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "",
            "a",
            "model",
            "\"",
            "\\",
            "\\\"",
            "}",
            "]",
            "{[",
            ",",
            ":",
            " ",
            "\n",
            "é",
            "\u{1F600}",
            "\u{7}",
            "/",
            "\\u0065",
        ]),
        0..5,
    )
    .prop_map(|parts| parts.concat())
}

fn json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        prop::sample::select(vec![
            "0",
            "-1",
            "3.25",
            "1e9",
            "-2.5E-3",
            "12345678901234567890"
        ])
        .prop_map(Json::Num),
        (tricky_text(), any::<bool>()).prop_map(|(s, e)| Json::Str(s, e)),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Arr),
            prop::collection::vec((key(), any::<bool>(), inner), 0..4).prop_map(Json::Obj),
        ]
    })
}

/// The `model` fields to add: mostly one string (the rewritable case), sometimes none, one of
/// another type, or two.
fn model_fields() -> impl Strategy<Value = Vec<(String, bool, Json)>> {
    let model = || {
        (any::<bool>(), tricky_text(), any::<bool>())
            .prop_map(|(ek, s, es)| ("model".to_owned(), ek, Json::Str(s, es)))
    };
    prop_oneof![
        6 => model().prop_map(|m| vec![m]),
        1 => Just(vec![]),
        1 => (any::<bool>(), json()).prop_map(|(ek, v)| vec![("model".to_owned(), ek, v)]),
        1 => (model(), model()).prop_map(|(a, b)| vec![a, b]),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["model", "messages", "stream", "max_tokens", "Model", "model "])
            .prop_map(str::to_owned),
        1 => tricky_text(),
    ]
}

/// Writes `s` as a JSON string; with `escape_all`, every character as a `\u` escape (so a key
/// that decodes to `model` need not read `"model"`).
fn write_str(out: &mut String, s: &str, escape_all: bool) {
    if !escape_all {
        out.push_str(&serde_json::Value::String(s.to_owned()).to_string());
        return;
    }
    out.push('"');
    for unit in s.encode_utf16() {
        out.push_str(&format!("\\u{unit:04x}"));
    }
    out.push('"');
}

fn space(out: &mut String, ws: &mut dyn Iterator<Item = &'static str>) {
    out.push_str(ws.next().unwrap_or(""));
}

fn write_json(out: &mut String, v: &Json, ws: &mut dyn Iterator<Item = &'static str>) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Num(n) => out.push_str(n),
        Json::Str(s, e) => write_str(out, s, *e),
        Json::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                space(out, ws);
                if i > 0 {
                    out.push(',');
                    space(out, ws);
                }
                write_json(out, item, ws);
            }
            space(out, ws);
            out.push(']');
        }
        Json::Obj(fields) => {
            out.push('{');
            for (i, (k, e, value)) in fields.iter().enumerate() {
                space(out, ws);
                if i > 0 {
                    out.push(',');
                    space(out, ws);
                }
                write_str(out, k, *e);
                space(out, ws);
                out.push(':');
                space(out, ws);
                write_json(out, value, ws);
            }
            space(out, ws);
            out.push('}');
        }
    }
}

const NEW_MODEL: &str = "backup \"model\" \\ é";

async fn rewrite_replaces_only_the_model(
    fields: Vec<(String, bool, Json)>,
    ws: Vec<&'static str>,
) -> Result<(), TestCaseError> {
    let mut body = String::new();
    write_json(
        &mut body,
        &Json::Obj(fields.clone()),
        &mut ws.into_iter().cycle(),
    );
    let original: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| TestCaseError::fail(format!("generated invalid JSON {body}: {e}")))?;
    let models: Vec<&Json> = fields
        .iter()
        .filter(|(k, _, _)| k == "model")
        .map(|(_, _, v)| v)
        .collect();
    let rewritable = matches!(models.as_slice(), [Json::Str(..)]);

    let mut policy = Policy::interactive();
    policy.fallback.routes = vec![RouteConfig::new("backup").model(NEW_MODEL)];
    let layer = tower_llm_resilience::fallback::FallbackLayer::from_policy(&policy)
        .map_err(|e| TestCaseError::fail(format!("policy: {e}")))?;
    let received: Arc<Mutex<Option<Bytes>>> = Arc::default();
    let seen = received.clone();
    let transport = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let backup = RouteName::of_request(&req).as_str() == "backup";
        let seen = seen.clone();
        async move {
            let mut response = Response::new(Full::new(Bytes::new()));
            if backup {
                let bytes = req.into_body().collect().await.map(|b| b.to_bytes());
                *lock(&seen) = bytes.ok();
            } else {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, Infallible>(response)
        }
    });
    let mut req = Request::new(Full::new(Bytes::from(body.clone())));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("http://127.0.0.1:9/v1/chat/completions");
    let _ = layer.layer(transport).oneshot(req).await;

    let received = lock(&received).clone();
    match (rewritable, received) {
        (true, Some(bytes)) => {
            let rewritten: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                TestCaseError::fail(format!(
                    "rewrote {body} into invalid JSON {}: {e}",
                    String::from_utf8_lossy(&bytes)
                ))
            })?;
            let mut expected = original;
            expected["model"] = serde_json::Value::String(NEW_MODEL.to_owned());
            prop_assert_eq!(rewritten, expected, "from {}", body);
        }
        (true, None) => {
            return Err(TestCaseError::fail(format!(
                "{body}: the backup was not called"
            )));
        }
        (false, Some(bytes)) => {
            return Err(TestCaseError::fail(format!(
                "{body}: rewritten to {} although its model is not one string",
                String::from_utf8_lossy(&bytes)
            )));
        }
        (false, None) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// A backup route's rewrite replaces the top-level `model` string of any JSON body, however
    /// written (escaped keys, nested look-alikes, brackets and quotes inside strings,
    /// whitespace anywhere), and changes nothing else; a body without exactly one such field is
    /// not sent to the route.
    #[test]
    fn the_route_rewrite_replaces_only_the_model(
        mut fields in prop::collection::vec((key(), any::<bool>(), json()), 0..6),
        models in model_fields(),
        at in any::<prop::sample::Index>(),
        ws in prop::collection::vec(prop::sample::select(vec!["", " ", "\n", "\t", "\r\n  "]), 1..8),
    ) {
        for m in models {
            fields.insert(at.index(fields.len() + 1), m);
        }
        runtime().block_on(rewrite_replaces_only_the_model(fields, ws))?;
    }
}
