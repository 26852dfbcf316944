//! Happy-path overhead per request: each layer alone and the whole stack, against the bare
//! service, side by side with `tower::retry` and tower-resilience's retry + circuit breaker +
//! fallback stack, in one run.
//!
//! Each request is built, sent through `ready().call()`, and its body read to the end (a layer
//! may do its work when the body ends). Time per request comes from criterion; allocations per
//! request from a counting global allocator over a fixed number of calls, printed as a table at
//! the end of the run.
//!
//! ```text
//! cargo bench --bench overhead
//! cargo bench --bench overhead --features metrics   # adds the rows with metrics on
//! OVERHEAD_REPORT=overhead.jsonl cargo bench --bench overhead -- --quick   # rows as JSON lines
//! ```

mod common;

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::budget::BudgetLayer;
use tower_llm_resilience::circuit_breaker::CircuitBreakerLayer;
use tower_llm_resilience::defer::{
    DeferSink, DeferredRequest, DeferredStatus, Lease, LeaseEnd, StoreFuture, Take,
};
use tower_llm_resilience::fallback::FallbackLayer;
use tower_llm_resilience::policy::RouteConfig;
use tower_llm_resilience::retry::RetryLayer;
use tower_llm_resilience::stream_guard::StreamGuardLayer;
use tower_llm_resilience::{BoxError, Policy, ResilienceLayer};

use common::{CountingAlloc, bare, chat_request, ok_response};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

/// Sends one request and reads its body to the end.
async fn one_call<S, RB>(svc: &mut S)
where
    S: Service<Req, Response = Response<RB>>,
    S::Error: Debug,
    RB: http_body::Body + Unpin,
    RB::Error: Debug,
{
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(chat_request())
        .await
        .expect("a 200");
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        black_box(frame.expect("body"));
    }
}

/// `svc` behind a step that gives each request `authorization: Bearer …`, a header value made
/// for the request (as `reqwest`'s `bearer_auth` makes one).
/// A sink that is never written to on the happy path.
struct NoSink;

impl DeferSink for NoSink {
    fn put(&self, _: DeferredRequest) -> StoreFuture<Result<(), BoxError>> {
        StoreFuture::ready(Ok(()))
    }
    fn take(&self, _: Take) -> StoreFuture<Result<Vec<Lease>, BoxError>> {
        StoreFuture::ready(Ok(Vec::new()))
    }
    fn renew(&self, _: &Lease) -> StoreFuture<Result<bool, BoxError>> {
        StoreFuture::ready(Ok(false))
    }
    fn finish(&self, _: Lease, _: LeaseEnd) -> StoreFuture<Result<bool, BoxError>> {
        StoreFuture::ready(Ok(false))
    }
    fn status(&self, _: &str) -> StoreFuture<Result<Option<DeferredStatus>, BoxError>> {
        StoreFuture::ready(Ok(None))
    }
}

fn with_key<S>(svc: S) -> tower::util::MapRequest<S, fn(Req) -> Req> {
    fn add_key(mut req: Req) -> Req {
        if let Ok(v) = http::HeaderValue::from_str("Bearer sk-bench-0123456789abcdef0123456789") {
            req.headers_mut().insert(http::header::AUTHORIZATION, v);
        }
        req
    }
    tower::util::MapRequest::new(svc, add_key as fn(Req) -> Req)
}

/// The interactive preset, seeded so that every run draws the same jitter.
fn interactive() -> Policy {
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(1);
    policy
}

/// The interactive preset with one backup route (the like of tower-resilience's fallback
/// service).
fn interactive_with_backup() -> Policy {
    let mut policy = interactive();
    policy.fallback.routes.push(
        RouteConfig::new("backup")
            .base_url("https://backup.example/v1")
            .model("backup-model"),
    );
    policy
}

// ---- tower::retry with the same policy: 3 attempts, 500 ms – 8 s jittered backoff, a retry
// budget of 20 % plus 10/s over 10 s, retrying 429 and 5xx and transport errors.

mod tower_retry {
    use std::sync::Arc;
    use std::time::Duration;

    use tower::retry::backoff::{
        Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff,
    };
    use tower::retry::budget::{Budget, TpsBudget};
    use tower::util::rng::HasherRng;

    use super::{Req, Res};

    /// A `tower::retry::Policy` equivalent to the crate's interactive retry section.
    #[derive(Clone)]
    pub struct Equivalent {
        attempts_left: u32,
        backoff: ExponentialBackoff,
        budget: Arc<TpsBudget>,
    }

    impl Equivalent {
        pub fn new(budget: Arc<TpsBudget>, rng: HasherRng) -> Self {
            let mut maker = ExponentialBackoffMaker::new(
                Duration::from_millis(500),
                Duration::from_secs(8),
                1.0,
                rng,
            )
            .expect("valid backoff");
            Self {
                attempts_left: 2,
                backoff: maker.make_backoff(),
                budget,
            }
        }

        pub fn budget() -> Arc<TpsBudget> {
            Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2))
        }
    }

    impl<E> tower::retry::Policy<Req, Res, E> for Equivalent {
        type Future = tokio::time::Sleep;

        fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
            let retryable = match result {
                Ok(resp) => resp.status().as_u16() == 429 || resp.status().is_server_error(),
                Err(_) => true,
            };
            if !retryable {
                self.budget.deposit();
                return None;
            }
            if self.attempts_left == 0 || !self.budget.withdraw() {
                return None;
            }
            self.attempts_left -= 1;
            Some(self.backoff.next_backoff())
        }

        fn clone_request(&mut self, req: &Req) -> Option<Req> {
            let mut clone = Req::new(req.body().clone());
            *clone.method_mut() = req.method().clone();
            *clone.uri_mut() = req.uri().clone();
            *clone.version_mut() = req.version();
            *clone.headers_mut() = req.headers().clone();
            Some(clone)
        }
    }
}

// ---- tower-resilience: fallback (to a backup service) → retry → circuit breaker.

type BackupFn = fn(Req) -> Ready<Result<Res, Infallible>>;

fn tower_resilience_stack<S>(inner: S) -> impl Service<Req, Response = Res, Error: Debug> + Clone
where
    S: Service<Req, Response = Res, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    use tower_resilience::circuitbreaker::{CircuitBreakerError, CircuitBreakerLayer as TrCb};
    use tower_resilience::fallback::FallbackLayer as TrFallback;
    use tower_resilience::retry::RetryLayer as TrRetry;

    type CbErr = CircuitBreakerError<Infallible>;
    let failed = |r: &Res| r.status().as_u16() == 429 || r.status().is_server_error();

    let breaker = TrCb::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .minimum_number_of_calls(10)
        .wait_duration_in_open(Duration::from_secs(2))
        .failure_classifier(move |r: &Result<Res, Infallible>| match r {
            Ok(resp) => resp.status().is_server_error(),
            Err(e) => match *e {},
        })
        .build()
        .expect("valid breaker");
    let retry = TrRetry::<Req, Res, CbErr>::builder()
        .max_attempts(3)
        .exponential_backoff(Duration::from_millis(500))
        .retry_on_response(failed)
        .build();
    let backup: BackupFn = |_req| ready(Ok(ok_response()));
    let fallback = TrFallback::<Req, Res, CbErr>::tower_service(tower::service_fn(backup))
        .handle_response(failed);
    fallback.layer(retry.layer(breaker.layer(inner)))
}

/// Runs `calls` requests through `svc` on `rt` and returns (ns, allocations, bytes) per request.
fn measure<S, RB>(rt: &tokio::runtime::Runtime, svc: &S, calls: u64) -> (f64, f64, f64)
where
    S: Service<Req, Response = Response<RB>> + Clone,
    S::Error: Debug,
    RB: http_body::Body + Unpin,
    RB::Error: Debug,
{
    rt.block_on(async {
        let mut svc = svc.clone();
        for _ in 0..1_000 {
            one_call(&mut svc).await;
        }
        let (a0, b0) = common::allocations();
        let start = Instant::now();
        for _ in 0..calls {
            one_call(&mut svc).await;
        }
        let elapsed = start.elapsed();
        let (a1, b1) = common::allocations();
        let n = calls as f64;
        (
            elapsed.as_nanos() as f64 / n,
            (a1 - a0) as f64 / n,
            (b1 - b0) as f64 / n,
        )
    })
}

struct Row {
    name: &'static str,
    ns: f64,
    allocs: f64,
    bytes: f64,
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let full = common::full_run();
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    let calls = if full { 50_000 } else { 100 };
    let mut rows: Vec<Row> = Vec::new();

    // Each service is built inside the runtime: some layers start timers at construction.
    macro_rules! bench {
        ($name:expr, $make:expr) => {{
            let svc = {
                let _guard = rt.enter();
                $make
            };
            let mut group = c.benchmark_group("overhead");
            group.bench_function($name, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut svc = svc.clone();
                        let start = Instant::now();
                        for _ in 0..iters {
                            one_call(&mut svc).await;
                        }
                        start.elapsed()
                    })
                })
            });
            group.finish();
            let (ns, allocs, bytes) = measure(&rt, &svc, calls);
            rows.push(Row {
                name: $name,
                ns,
                allocs,
                bytes,
            });
        }};
    }

    let policy = interactive();
    let with_backup = interactive_with_backup();

    bench!("bare service_fn", bare());
    bench!(
        "BudgetLayer",
        BudgetLayer::from_policy(&policy)
            .expect("policy")
            .layer(bare())
    );
    bench!(
        "FallbackLayer (1 backup route)",
        FallbackLayer::from_policy(&with_backup)
            .expect("policy")
            .layer(bare())
    );
    bench!(
        "RetryLayer",
        RetryLayer::from_policy(&policy)
            .expect("policy")
            .layer(bare())
    );
    bench!(
        "CircuitBreakerLayer",
        CircuitBreakerLayer::from_policy(&policy)
            .expect("policy")
            .layer(bare())
    );
    bench!(
        "StreamGuardLayer",
        StreamGuardLayer::from_policy(&policy)
            .expect("policy")
            .layer(bare())
    );
    bench!(
        "ResilienceLayer (interactive)",
        ResilienceLayer::new(&policy).expect("policy").layer(bare())
    );
    bench!(
        "ResilienceLayer (interactive + backup route)",
        ResilienceLayer::new(&with_backup)
            .expect("policy")
            .layer(bare())
    );
    bench!("tower::retry (backoff + TpsBudget)", {
        let budget = tower_retry::Equivalent::budget();
        tower::retry::RetryLayer::new(tower_retry::Equivalent::new(
            budget,
            tower::util::rng::HasherRng::default(),
        ))
        .layer(bare())
    });
    bench!(
        "tower-resilience fallback+retry+circuitbreaker",
        tower_resilience_stack(bare())
    );

    // A request that carries a key, as clients build it (a new header value per request): the
    // alerts note it for an auth alert's fingerprint.
    bench!(
        "ResilienceLayer (interactive, request with a key)",
        with_key(ResilienceLayer::new(&policy).expect("policy").layer(bare()))
    );
    let mut no_alerts = interactive();
    no_alerts.observability.alerts = false;
    bench!(
        "ResilienceLayer (interactive, request with a key, alerts off)",
        with_key(
            ResilienceLayer::new(&no_alerts)
                .expect("policy")
                .layer(bare())
        )
    );

    // Metrics on (feature `metrics` and the policy's switch): with no recorder installed, and
    // with a Prometheus recorder on this thread.
    #[cfg(feature = "metrics")]
    {
        let mut with_metrics = interactive();
        with_metrics.observability.metrics = true;
        bench!(
            "ResilienceLayer (interactive, metrics on, no recorder)",
            ResilienceLayer::new(&with_metrics)
                .expect("policy")
                .layer(bare())
        );
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            bench!(
                "ResilienceLayer (interactive, metrics on, Prometheus recorder)",
                ResilienceLayer::new(&with_metrics)
                    .expect("policy")
                    .layer(bare())
            );
        });
    }

    // The queue rung on (a sink given): each request keeps what a record needs (its headers,
    // its body, an idempotency key) in case it ends unanswered.
    bench!(
        "ResilienceLayer (interactive, deferral on)",
        ResilienceLayer::new(&policy)
            .expect("policy")
            .defer_to(std::sync::Arc::new(NoSink))
            .layer(bare())
    );

    // Hedging on: each request arms its hedge's delay (a boxed timer) and keeps a copy to send
    // again; the answer comes before the delay, so no hedge is sent.
    let mut hedged = interactive();
    hedged.hedge = tower_llm_resilience::policy::HedgePolicy::after(Duration::from_secs(10));
    hedged.idempotency.key_header = Some("idempotency-key".to_owned());
    bench!(
        "ResilienceLayer (interactive, hedging on)",
        ResilienceLayer::new(&hedged).expect("policy").layer(bare())
    );

    // A selection strategy on (one backup route): each request gets its order and its log
    // the choice.
    let mut selecting = interactive_with_backup();
    selecting.fallback.selection.strategy =
        tower_llm_resilience::policy::RouteStrategy::LowestLatency;
    bench!(
        "ResilienceLayer (interactive, lowest_latency over two routes)",
        ResilienceLayer::new(&selecting)
            .expect("policy")
            .layer(bare())
    );

    c.final_summary();

    let base = rows.first().map(|r| (r.ns, r.allocs)).unwrap_or_default();
    println!();
    println!("Happy path, per request ({calls} calls after 1000 warm-up calls, one thread):");
    println!();
    println!(
        "| setup | ns/request | added ns | allocations/request | added allocations | bytes allocated/request |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} |",
            r.name,
            r.ns,
            r.ns - base.0,
            r.allocs,
            r.allocs - base.1,
            r.bytes
        );
    }
    if let Some(path) = std::env::var_os("OVERHEAD_REPORT") {
        write_report(&path, &rows).expect("write the OVERHEAD_REPORT file");
        println!();
        println!("rows written to {}", path.to_string_lossy());
    }
}

/// One JSON object per row (`setup`, `ns`, `allocs`, `bytes`; `ns` is the mean over the
/// allocation run's calls), so that a script can compare the rows of one run.
fn write_report(path: &std::ffi::OsStr, rows: &[Row]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in rows {
        let row = serde_json::json!({
            "setup": r.name,
            "ns": r.ns.round(),
            "allocs": r.allocs,
            "bytes": r.bytes.round(),
        });
        writeln!(out, "{row}")?;
    }
    out.flush()
}
