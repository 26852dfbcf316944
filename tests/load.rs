//! Load: many concurrent logical requests through the full stack over real HTTP on loopback,
//! against a `MockProvider` that mixes overloads, rate limits with a short `retry-after`, server
//! errors, cut streams and successes.
//!
//! Every request must resolve — a response or a crate error — within a bound, none may hang,
//! every transport call the mock received must be in exactly one request's attempt log, and
//! every log must end with an outcome. Peak memory (`VmHWM`, Linux only) is measured and
//! bounded.
//!
//! CI runs 1 000 requests; `LOAD_REQUESTS=10000 cargo test --release --all-features --test
//! load -- --nocapture` runs the full size and prints the figures.

#![cfg(feature = "testing")]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::policy::{BackoffPolicy, Policy, RetryBudgetPolicy, RouteConfig};
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{AttemptLog, BoxError, Error};

const MODEL: &str = "gpt-4o";
const BACKUP_MODEL: &str = "backup-model";
/// Connections the client may hold open at once: a bounded pool, as in production, and well
/// inside the file-descriptor limit.
const MAX_CONNECTIONS: usize = 256;

fn requests() -> usize {
    std::env::var("LOAD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

// ---------------------------------------------------------------------------------------------
// A client with a bounded number of connections: a call waits (inside its future, so the
// layers above see it as a slow transport) for one of `MAX_CONNECTIONS` slots, and holds it
// until its response body has ended or was dropped.

type HyperClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

#[derive(Clone)]
struct Pooled {
    client: HyperClient,
    slots: Arc<Semaphore>,
}

pin_project_lite::pin_project! {
    struct PooledBody {
        #[pin]
        inner: hyper::body::Incoming,
        permit: Option<OwnedSemaphorePermit>,
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if frame.is_none() {
            this.permit.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Service<Request<Full<Bytes>>> for Pooled {
    type Response = Response<PooledBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<PooledBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let client = self.client.clone();
        let slots = self.slots.clone();
        Box::pin(async move {
            let permit = slots.acquire_owned().await?;
            let response = client.request(req).await?;
            Ok(response.map(|inner| PooledBody {
                inner,
                permit: Some(permit),
            }))
        })
    }
}

// ---------------------------------------------------------------------------------------------

fn policy(mock: &MockProvider) -> Policy {
    let mut p = Policy::interactive();
    p.retry.seed = Some(11);
    p.retry.backoff = BackoffPolicy::new(Duration::from_millis(200), Duration::from_secs(2));
    // Under this mix (about a third of the primary's calls fail) the breakers stay closed
    // unless a burst of failures lines up: the load goes through retries and hops.
    p.circuit_breaker.consecutive_failures = Some(20);
    if let Some(rule) = p.circuit_breaker.failure_rate.as_mut() {
        rule.min_calls = 100;
        rule.threshold = 0.6;
    }
    // A retry budget large enough that retries and hops really happen at this scale.
    p.budget.retry_budget = RetryBudgetPolicy::Ratio {
        ratio: 1.0,
        min_per_sec: 1_000,
        ttl: Duration::from_secs(10),
    };
    p.fallback.routes = vec![
        RouteConfig::new("backup")
            .base_url(format!("{}/backup/v1", mock.url()))
            .model(BACKUP_MODEL),
    ];
    p
}

/// The primary's script: a repeating mix of faults, long enough for every attempt.
fn primary_script(n: usize) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(n * 3);
    for i in 0..n * 3 {
        replies.push(match i % 12 {
            1 => Reply::openai_overloaded(),
            3 => Reply::openai_rate_limited(Some("1")),
            5 => Reply::openai_stream(MODEL, &["Hel", "lo", " there"]).cut_after(3),
            7 => Reply::openai_server_error(),
            9 => Reply::openai_stream(MODEL, &["Hel", "lo"]).cut_after(1),
            _ => Reply::openai_stream(MODEL, &["Hello", " world"]),
        });
    }
    replies
}

fn backup_script(n: usize) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(n);
    for i in 0..n {
        replies.push(match i % 5 {
            0 => Reply::openai_overloaded(),
            _ => Reply::openai_stream(BACKUP_MODEL, &["Hi"]),
        });
    }
    replies
}

/// How one logical request ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// A 200 whose body ended cleanly.
    Answer,
    /// A provider error response, handed up with its status.
    ProviderError(u16),
    /// A crate error before any response.
    Error(String),
    /// A body that ended with a crate error (a stream interrupted after its commit point).
    BodyError(String),
}

/// Linux's peak resident set size of this process, in KiB.
fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the peak to the current resident set (Linux ≥ 4.0), so the measurement is this
/// test's own.
fn reset_vm_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn log_is_complete(log: &AttemptLog) -> Result<usize, String> {
    let snapshot = log.snapshot();
    if snapshot.attempts.is_empty() && snapshot.events.is_empty() {
        return Err(format!("a log with neither attempt nor local event: {log}"));
    }
    if snapshot.outcome.is_none() {
        return Err(format!("a log without an outcome: {log}"));
    }
    Ok(snapshot.attempts.len())
}

/// The error kind's variant name: `CircuitOpen`, `StreamInterrupted`, …
fn kind_name(e: &Error) -> String {
    let debug = format!("{:?}", e.kind());
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_owned()
}

async fn one<S>(service: S, url: Arc<str>) -> Result<(End, usize), String>
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<tower_llm_resilience::Body>,
            Error = Error,
        >,
{
    let request = testing::chat_request(&url, MODEL, true);
    match service.oneshot(request).await {
        Err(e) => {
            let log = e
                .attempt_log()
                .ok_or_else(|| format!("an error without its log: {e}"))?;
            Ok((End::Error(kind_name(&e)), log_is_complete(log)?))
        }
        Ok(response) => {
            let log = response
                .extensions()
                .get::<AttemptLog>()
                .cloned()
                .ok_or("a response without its log")?;
            let status = response.status().as_u16();
            let end = match response.into_body().collect().await {
                Ok(_) if status == 200 => End::Answer,
                Ok(_) => End::ProviderError(status),
                Err(e) => End::BodyError(kind_name(&e)),
            };
            Ok((end, log_is_complete(&log)?))
        }
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_all_resolve_with_complete_logs() -> Result<(), BoxError> {
    let n = requests();
    let mock = MockProvider::start().await?;
    mock.script(ScriptKey::model(MODEL), primary_script(n));
    mock.script(ScriptKey::model(BACKUP_MODEL), backup_script(n));
    let pooled = Pooled {
        client: testing::client(),
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    let policy = policy(&mock);
    let layer = policy.layer()?;
    let breakers = layer.circuit_breaker();
    let service = layer.layer(pooled);
    let url: Arc<str> = mock.url().into();

    let measured = reset_vm_hwm();
    let rss_before = vm_hwm_kib();
    let started = std::time::Instant::now();
    let virtual_start = tokio::time::Instant::now();

    let mut set = JoinSet::new();
    for _ in 0..n {
        let service = service.clone();
        let url = url.clone();
        set.spawn(async move {
            // The bound: with 1 s retry-afters, 2 s backoffs and a 60 s deadline, no request
            // may take longer than this in virtual time.
            tokio::time::timeout(Duration::from_secs(120), one(service, url))
                .await
                .map_err(|_| "a request hung".to_owned())?
        });
    }
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    let mut logged_attempts = 0usize;
    let mut resolved = 0usize;
    while let Some(joined) = set.join_next().await {
        let (end, attempts) = joined??;
        resolved += 1;
        logged_attempts += attempts;
        let key = match end {
            End::Answer => "answer".to_owned(),
            End::ProviderError(s) => format!("provider error {s}"),
            End::Error(k) => format!("error: {k}"),
            End::BodyError(k) => format!("body error: {k}"),
        };
        *ends.entry(key).or_insert(0) += 1;
    }
    let wall = started.elapsed();
    let virtual_elapsed = virtual_start.elapsed();
    let rss_after = vm_hwm_kib();

    assert_eq!(resolved, n, "every request resolved");
    // Nothing lost: every request the mock received is an attempt in exactly one log.
    assert_eq!(logged_attempts, mock.request_count(), "{ends:?}");
    // Only the ends the ladder allows: answers, the provider's own error responses after the
    // retries and hops it could afford, fail-fast on an open circuit, failures before the
    // commit point, and streams interrupted after it — never a transport error escaping.
    assert!(
        ends.get("answer").copied().unwrap_or(0) >= n / 4,
        "{ends:?}"
    );
    for end in ends.keys() {
        let allowed = [
            "answer",
            "provider error 429",
            "provider error 500",
            "provider error 503",
            "error: CircuitOpen",
            "error: StreamFailed",
            "body error: StreamInterrupted",
        ];
        assert!(
            allowed.contains(&end.as_str()),
            "unexpected end `{end}`: {ends:?}"
        );
    }

    println!("load: {n} requests in {wall:?} (virtual {virtual_elapsed:?})");
    println!("load: {} transport attempts", mock.request_count());
    for (end, count) in &ends {
        println!("load:   {count:>6}  {end}");
    }
    for s in breakers.snapshots() {
        println!("load: breaker {} {:?}, trips {}", s.route, s.state, s.trips);
    }
    if let (true, Some(before), Some(after)) = (measured, rss_before, rss_after) {
        let grown = after.saturating_sub(before);
        println!(
            "load: peak RSS {after} KiB (+{grown} KiB over {before} KiB, {} bytes per request)",
            grown * 1024 / n as u64
        );
        // Bounded: the mock keeps every request it received (with its body), and each
        // in-flight request holds its stack state and log; 64 KiB per request plus 64 MiB is
        // far above what is needed, and far below what a leak per attempt would take.
        assert!(
            grown <= 64 * n as u64 + 64 * 1024,
            "peak memory grew by {grown} KiB for {n} requests"
        );
    }
    Ok(())
}
