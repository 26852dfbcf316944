//! Cancellation safety: a caller may drop the response future or the body at any point, and no
//! layer may leak what it holds — a half-open probe slot, a spend reservation, a place in the
//! rate-limit queue, or an in-flight call or body of the transport below.
//!
//! Each scenario runs the full stack (Budget → Fallback → Retry → CircuitBreaker → StreamGuard)
//! over a scripted in-process transport under paused time, and is repeated for every `n`: the
//! request is driven `n` steps (one poll with a no-op waker, then 50 ms of paused time), then
//! dropped — the response future if it is still pending, else the body. Every `Pending` is an
//! await point of some layer, so the runs together drop the request at every await point the
//! scenario passes through: queued for admission, the transport call, the classifier's peek at
//! an error body, a retry's backoff sleep, a wait on a throttled route, a fallback hop, the
//! stream guard's wait for the first token, the held-back prefix, and the committed body frame
//! by frame. After each drop the test asserts that nothing is left behind, and the last run,
//! which completes, asserts the request really finished.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

#[path = "support/log.rs"]
mod log;
use log::ms;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::Full;
use tokio::time::Sleep;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_resilience::budget::{BudgetLayer, SpendHandle};
use tower_llm_resilience::circuit_breaker::{
    CircuitBreakerHandle, CircuitBreakerLayer, CircuitState,
};
use tower_llm_resilience::fallback::FallbackLayer;
use tower_llm_resilience::policy::{
    AdmissionMode, BackoffPolicy, CommitPoint, Policy, Price, RateLimitPolicy, RouteConfig,
    SpendPolicy,
};
use tower_llm_resilience::retry::RetryLayer;
use tower_llm_resilience::stream_guard::StreamGuardLayer;
use tower_llm_resilience::{Body, BoxError, Error, Resilient, RouteName};

const OWNER: &str = "team-a";
const STEP: Duration = Duration::from_millis(50);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// A scripted transport that counts its live calls and bodies.

/// Counts a live object until it is dropped.
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy)]
enum End {
    Clean,
    Silent,
}

/// One answer: a head after `head_delay`, then each chunk after its delay.
#[derive(Clone)]
struct Reply {
    head_delay: Duration,
    status: u16,
    sse: bool,
    chunks: Vec<(Duration, &'static str)>,
    end: End,
}

impl Reply {
    /// A stream: the role delta, `tokens` content events, finish and `[DONE]`, each `gap`
    /// apart.
    fn stream(head_delay: Duration, gap: Duration, tokens: usize) -> Self {
        let mut chunks = vec![(
            gap,
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        )];
        for _ in 0..tokens {
            chunks.push((
                gap,
                "data: {\"choices\":[{\"delta\":{\"content\":\"tok\"}}]}\n\n",
            ));
        }
        chunks.push((
            gap,
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\n",
        ));
        chunks.push((gap, "data: [DONE]\n\n"));
        Reply {
            head_delay,
            status: 200,
            sse: true,
            chunks,
            end: End::Clean,
        }
    }

    /// A stream that sends its role delta and then nothing.
    fn stall(head_delay: Duration) -> Self {
        Reply {
            head_delay,
            status: 200,
            sse: true,
            chunks: vec![(
                ms(100),
                "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            )],
            end: End::Silent,
        }
    }

    /// An overload error whose body arrives in three slow pieces.
    fn slow_overloaded(head_delay: Duration) -> Self {
        Reply {
            head_delay,
            status: 503,
            sse: false,
            chunks: vec![
                (ms(120), "{\"error\":{\"message\":\"overloaded\","),
                (ms(120), "\"type\":\"server_error\","),
                (ms(120), "\"code\":\"server_is_overloaded\"}}"),
            ],
            end: End::Clean,
        }
    }
}

pin_project_lite::pin_project! {
    struct SlowBody {
        chunks: VecDeque<(Duration, &'static str)>,
        #[pin]
        sleep: Option<Sleep>,
        end: End,
        _live: Live,
    }
}

impl HttpBody for SlowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut this = self.project();
        loop {
            if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
                std::task::ready!(sleep.poll(cx));
                this.sleep.set(None);
                if let Some((_, chunk)) = this.chunks.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                        chunk.as_bytes(),
                    )))));
                }
            }
            match this.chunks.front() {
                Some((delay, _)) => this.sleep.set(Some(tokio::time::sleep(*delay))),
                None => {
                    return match this.end {
                        End::Clean => Poll::Ready(None),
                        End::Silent => Poll::Pending,
                    };
                }
            }
        }
    }
}

#[derive(Clone, Default)]
struct Transport {
    scripts: Arc<Mutex<HashMap<String, VecDeque<Reply>>>>,
    calls: Arc<AtomicUsize>,
    live_calls: Arc<AtomicUsize>,
    live_bodies: Arc<AtomicUsize>,
}

impl Transport {
    fn script(&self, route: &str, replies: Vec<Reply>) {
        lock(&self.scripts).insert(route.to_owned(), replies.into());
    }
}

impl Service<Request<Full<Bytes>>> for Transport {
    type Response = Response<SlowBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<SlowBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let route = RouteName::of_request(&req);
        let reply = lock(&self.scripts)
            .get_mut(route.as_str())
            .and_then(VecDeque::pop_front)
            .unwrap_or_else(|| Reply::stream(ms(0), ms(10), 2));
        self.calls.fetch_add(1, Ordering::SeqCst);
        let call = Live::new(&self.live_calls);
        let bodies = self.live_bodies.clone();
        Box::pin(async move {
            let _call = call;
            tokio::time::sleep(reply.head_delay).await;
            let body = SlowBody {
                chunks: reply.chunks.into(),
                sleep: None,
                end: reply.end,
                _live: Live::new(&bodies),
            };
            let mut response = Response::new(body);
            *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or_default();
            let content_type = if reply.sse {
                "text/event-stream"
            } else {
                "application/json"
            };
            response
                .headers_mut()
                .insert("content-type", http::HeaderValue::from_static(content_type));
            Ok::<_, Infallible>(response)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The stack and what it must not leak.

fn policy(commit: CommitPoint, consecutive_failures: u32) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(3);
    p.retry.max_attempts = 3;
    p.retry.backoff = BackoffPolicy::new(ms(200), ms(800));
    p.circuit_breaker.failure_rate = None;
    p.circuit_breaker.consecutive_failures = Some(consecutive_failures);
    p.circuit_breaker.open_base = ms(1000);
    p.circuit_breaker.open_cap = ms(1000);
    p.stream.first_token_timeout = Some(ms(1500));
    p.stream.idle_timeout = Some(ms(1000));
    p.stream.total_timeout = Some(ms(30_000));
    p.stream.commit = commit;
    p.fallback.routes = vec![
        RouteConfig::new("backup")
            .base_url("http://127.0.0.1:9/backup/v1")
            .model("backup-model"),
    ];
    let mut rate = RateLimitPolicy::default();
    rate.requests_per_second = Some(1.0);
    // One bucket for every route: a full one sends the request into the queue, not to the
    // backup's bucket.
    rate.key = tower_llm_resilience::policy::RateKey::Owner;
    rate.burst = 1;
    p.budget.rate_limit = Some(rate);
    p.budget.admission = AdmissionMode::Queue {
        max_wait: ms(10_000),
        max_queued: 100,
    };
    let mut spend = SpendPolicy::default();
    spend.cap = 100.0;
    spend.default_owner = Some(OWNER.to_owned());
    spend.default_price = Some(Price::new(1.0, 2.0));
    p.budget.spend = Some(spend);
    p.budget.deadline = Some(ms(60_000));
    p
}

/// The full stack over the transport, and handles on what it may hold.
struct Stack {
    service: Resilient<Transport>,
    budget: BudgetLayer,
    breakers: CircuitBreakerHandle,
    spend: SpendHandle,
    transport: Transport,
}

fn stack(policy: &Policy, transport: Transport) -> Result<Stack, BoxError> {
    let budget = BudgetLayer::from_policy(policy)?;
    let breaker = CircuitBreakerLayer::from_policy(policy)?;
    let breakers = breaker.handle();
    let spend = budget.spend().ok_or("the policy sets a spend cap")?;
    let service = ServiceBuilder::new()
        .layer(budget.clone())
        .layer(FallbackLayer::from_policy(policy)?)
        .layer(RetryLayer::from_policy(policy)?)
        .layer(breaker)
        .layer(StreamGuardLayer::from_policy(policy)?)
        .service(transport.clone());
    Ok(Stack {
        service,
        budget,
        breakers,
        spend,
        transport,
    })
}

/// A streamed chat request to a port where nothing listens: the transport is a stand-in.
fn chat_request() -> Request<Full<Bytes>> {
    tower_llm_resilience::testing::chat_request("http://127.0.0.1:9", "gpt-4o", true)
}

/// Nothing held: no probe slot, no reservation, no queue place, no call or body in flight.
async fn assert_nothing_leaked(stack: &Stack, what: &str) {
    for snapshot in stack.breakers.snapshots() {
        assert_eq!(
            snapshot.probes_in_flight, 0,
            "{what}: a probe slot of `{}` leaked",
            snapshot.route
        );
        assert_eq!(
            snapshot.calls_in_flight, 0,
            "{what}: a call of `{}` is still counted in flight",
            snapshot.route
        );
    }
    assert_eq!(
        stack.spend.status(OWNER).await.expect("store").reserved,
        0,
        "{what}: a spend reservation leaked"
    );
    assert_eq!(stack.budget.queued(), 0, "{what}: a queue place leaked");
    assert_eq!(
        stack.transport.live_calls.load(Ordering::SeqCst),
        0,
        "{what}: a transport call is still in flight"
    );
    assert_eq!(
        stack.transport.live_bodies.load(Ordering::SeqCst),
        0,
        "{what}: a transport body is still alive"
    );
}

/// The most of each resource the request held at once, over all runs: a scenario proves
/// something only for what its request really held.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    queued: usize,
    probes: u32,
    reserved: u64,
    calls: usize,
    bodies: usize,
    /// Transport calls of the run that completed.
    completed_after: usize,
}

impl Held {
    async fn observe(&mut self, stack: &Stack) {
        self.queued = self.queued.max(stack.budget.queued());
        let probes = stack
            .breakers
            .snapshots()
            .iter()
            .map(|s| s.probes_in_flight)
            .sum();
        self.probes = self.probes.max(probes);
        self.reserved = self
            .reserved
            .max(stack.spend.status(OWNER).await.expect("store").reserved);
        self.calls = self
            .calls
            .max(stack.transport.live_calls.load(Ordering::SeqCst));
        self.bodies = self
            .bodies
            .max(stack.transport.live_bodies.load(Ordering::SeqCst));
    }
}

/// What the request was doing when it was dropped.
#[derive(Debug, PartialEq, Eq, Hash, Clone, Copy)]
enum Phase {
    Future,
    Body,
}

/// Sends a request and drives it `steps` steps, then drops whatever is pending. Returns where
/// it was dropped, or `None` when it finished within `steps` (response and whole body).
async fn drive_then_drop(stack: &Stack, steps: usize, held: &mut Held) -> Option<Phase> {
    let service = stack.service.clone();
    let waker = Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut future = Box::pin(service.oneshot(chat_request()));
    let mut body = None;
    for _ in 0..steps {
        match &mut body {
            None => match future.as_mut().poll(&mut cx) {
                Poll::Ready(Ok(response)) => {
                    body = Some(response.into_body());
                    continue;
                }
                Poll::Ready(Err(_)) => return None,
                Poll::Pending => {}
            },
            Some(b) => match Pin::new(b).poll_frame(&mut cx) {
                Poll::Ready(None | Some(Err(_))) => return None,
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Pending => {}
            },
        }
        held.observe(stack).await;
        tokio::time::advance(STEP).await;
    }
    Some(if body.is_some() {
        drop(body);
        Phase::Body
    } else {
        drop(future);
        Phase::Future
    })
}

/// Runs `scenario` dropped at every step until a run completes; returns how many drops per
/// phase were checked.
async fn every_step(
    name: &str,
    build: impl Fn() -> Result<Stack, BoxError>,
    prepare: impl AsyncFn(&Stack) -> Result<(), BoxError>,
) -> Result<(HashMap<Phase, usize>, Held), BoxError> {
    let mut drops = HashMap::new();
    let mut held = Held::default();
    for steps in 0..2_000 {
        let stack = build()?;
        prepare(&stack).await?;
        let before = stack.transport.calls.load(Ordering::SeqCst);
        assert_nothing_leaked(&stack, &format!("{name}: before the request")).await;
        let phase = drive_then_drop(&stack, steps, &mut held).await;
        // Let anything a drop woke run (nothing should need it).
        tokio::task::yield_now().await;
        assert_nothing_leaked(
            &stack,
            &format!("{name}: dropped after {steps} steps ({phase:?})"),
        )
        .await;
        match phase {
            Some(p) => *drops.entry(p).or_insert(0) += 1,
            None => {
                held.completed_after = stack.transport.calls.load(Ordering::SeqCst) - before;
                // The figures docs/RELIABILITY.md records (`--nocapture` shows them).
                println!("cancellation: {name}: {drops:?}, completed after {steps} steps");
                return Ok((drops, held));
            }
        }
    }
    Err(format!("{name}: the request never finished").into())
}

/// Sends one request to its end.
async fn complete<S>(service: S) -> Result<(), BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
{
    let response = service.oneshot(chat_request()).await?;
    response.into_body().collect_bytes().await?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn dropped_anywhere_through_queue_retry_fallback_and_stream_nothing_leaks()
-> Result<(), BoxError> {
    let (drops, held) = every_step(
        "queue, retries, fallback, stream",
        || {
            let transport = Transport::default();
            // The primary: a slow overload error (retried after a backoff), a stream that
            // never sends a token (first-token timeout), another slow overload; then the
            // backup streams its answer.
            transport.script(
                "primary",
                vec![
                    Reply::slow_overloaded(ms(150)),
                    Reply::stall(ms(100)),
                    Reply::slow_overloaded(ms(150)),
                ],
            );
            transport.script("backup", vec![Reply::stream(ms(200), ms(150), 4)]);
            stack(&policy(CommitPoint::FirstEvent, 5), transport)
        },
        // One request first takes the rate limit's only token: the next one queues.
        async |stack| {
            if let Some(q) = lock(&stack.transport.scripts).get_mut("primary") {
                q.push_front(Reply::stream(ms(0), ms(10), 1));
            }
            complete(stack.service.clone()).await
        },
    )
    .await?;
    // The request was dropped while queued, calling, classifying, sleeping, hopping, waiting
    // for its first token, and mid-body.
    assert!(
        drops.get(&Phase::Future).copied().unwrap_or(0) >= 60,
        "{drops:?}"
    );
    assert!(
        drops.get(&Phase::Body).copied().unwrap_or(0) >= 5,
        "{drops:?}"
    );
    assert!(held.queued == 1 && held.reserved > 0, "{held:?}");
    // Overload, retry, first-token timeout, hop: two primary calls and the backup's.
    assert_eq!(held.completed_after, 3, "{held:?}");
    assert!(held.calls == 1 && held.bodies == 1, "{held:?}");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn dropped_anywhere_during_a_half_open_probe_no_probe_slot_leaks() -> Result<(), BoxError> {
    let (drops, held) = every_step(
        "half-open probe",
        || {
            let transport = Transport::default();
            // The probe: a slow stream.
            transport.script(
                "primary",
                vec![
                    Reply::slow_overloaded(ms(0)),
                    Reply::stream(ms(300), ms(200), 3),
                ],
            );
            stack(&policy(CommitPoint::FirstEvent, 1), transport)
        },
        // One overload trips the primary (the request itself ends on the backup); once its
        // open time has passed, the next call to it is a half-open probe.
        async |stack| {
            complete(stack.service.clone()).await?;
            let primary = RouteName::new("primary");
            if stack.breakers.state(primary.clone()) != CircuitState::Open {
                return Err("the primary did not trip".into());
            }
            tokio::time::advance(ms(1000)).await;
            Ok(())
        },
    )
    .await?;
    assert!(
        drops.get(&Phase::Future).copied().unwrap_or(0) >= 10,
        "{drops:?}"
    );
    assert!(
        drops.get(&Phase::Body).copied().unwrap_or(0) >= 5,
        "{drops:?}"
    );
    assert_eq!(held.probes, 1, "{held:?}");
    assert_eq!(held.completed_after, 1, "{held:?}");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn dropped_anywhere_with_commit_at_the_end_nothing_leaks() -> Result<(), BoxError> {
    let (drops, held) = every_step(
        "commit end",
        || {
            let transport = Transport::default();
            // The whole stream is held back; a stall before its end is retried.
            transport.script(
                "primary",
                vec![Reply::stall(ms(50)), Reply::stream(ms(100), ms(100), 5)],
            );
            stack(&policy(CommitPoint::End, 5), transport)
        },
        async |_| Ok(()),
    )
    .await?;
    assert!(
        drops.get(&Phase::Future).copied().unwrap_or(0) >= 20,
        "{drops:?}"
    );
    assert!(held.reserved > 0 && held.bodies == 1, "{held:?}");
    assert_eq!(held.completed_after, 2, "{held:?}");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_completed_request_settles_and_frees_everything() -> Result<(), BoxError> {
    let stack = stack(&policy(CommitPoint::FirstEvent, 5), Transport::default())?;
    complete(stack.service.clone()).await?;
    assert_nothing_leaked(&stack, "completed").await;
    // The answer was charged its usage: 5 input and 3 output tokens at 1 and 2 per million.
    assert_eq!(stack.spend.status(OWNER).await.expect("store").spent, 11);
    assert_eq!(stack.transport.calls.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn dropped_anywhere_while_waiting_out_an_outage_nothing_leaks() -> Result<(), BoxError> {
    // One route, no backup: the throttle decides, and with a floor of 2 it turns the
    // request's retries away while the route's outage is young — the request waits.
    let waiting = || {
        let mut p = policy(CommitPoint::FirstEvent, 100);
        p.fallback.routes.clear();
        if let Some(t) = p.circuit_breaker.throttle.as_mut() {
            t.min_requests = 2;
        }
        p
    };
    let script = |transport: &Transport| {
        transport.script(
            "primary",
            (0..4).map(|_| Reply::slow_overloaded(ms(20))).collect(),
        );
    };
    let (drops, held) = every_step(
        "waiting out an outage",
        || {
            let transport = Transport::default();
            script(&transport);
            stack(&waiting(), transport)
        },
        async |_| Ok(()),
    )
    .await?;
    assert!(
        drops.get(&Phase::Future).copied().unwrap_or(0) >= 10,
        "{drops:?}"
    );
    assert!(held.reserved > 0, "{held:?}");
    assert_eq!(held.completed_after, 3, "{held:?}");

    // The same request, driven to its end: it did wait — a call went out after the throttle
    // turned one away — and, under the spend cap (which makes each call made while waiting an
    // ordinary retry), it ends with the provider's 503 once its three attempts are spent.
    let transport = Transport::default();
    script(&transport);
    let stack = stack(&waiting(), transport)?;
    let response = stack.service.clone().oneshot(chat_request()).await?;
    let status = response.status();
    let log = response
        .extensions()
        .get::<tower_llm_resilience::AttemptLog>()
        .cloned()
        .ok_or("no attempt log")?;
    response.into_body().collect_bytes().await?;
    let refused_at = log
        .events()
        .iter()
        .find(|e| {
            matches!(
                e.kind,
                tower_llm_resilience::attempt_log::LocalEventKind::Throttled { .. }
            )
        })
        .map(|e| e.offset)
        .ok_or_else(|| format!("never throttled: {log}"))?;
    let last = log.attempts().last().map(|a| a.offset).unwrap_or_default();
    assert!(last > refused_at, "{log}");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{log}");
    assert_eq!(log.attempt_count(), 3, "{log}");
    assert_nothing_leaked(&stack, "waited, then failed").await;
    Ok(())
}
