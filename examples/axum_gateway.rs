//! An OpenAI-compatible gateway: `POST /v1/chat/completions`, with the whole recovery ladder in
//! front of its upstream.
//!
//! ```text
//! cargo run --example axum_gateway --features reqwest,metrics
//! ```
//!
//! By default the upstream is an embedded `MockProvider` on loopback, scripted per model so
//! each behaviour can be tried with `curl` (the gateway prints the commands when it starts):
//!
//! | model | what the mock does | what the client sees |
//! |---|---|---|
//! | `mock-flaky` | 503 once, then answers | the answer (`x-llm-attempts: 2`) |
//! | `mock-rate-limited` | 429 with `retry-after: 1` once, then answers | the answer, a second later |
//! | `mock-stream` | a stream, token by token | the stream, passed through as it comes |
//! | `mock-cut` | a stream cut after two tokens | the tokens, then a final `data: {"error":…}` event |
//! | `mock-unauthorized` | 401 | the provider's 401, unchanged |
//! | `mock-down` | 500, always | the provider's 500 once the retries are spent; once the route refuses most of its calls (and more than the floor of 10 a second are sent) it is throttled: most requests get 503 with `Retry-After` at once, for every model of the route, while a few still reach it so its recovery is seen |
//! | any other | answers `ok` | the answer |
//!
//! Pointed at a real provider (no mock), with the key in `OPENAI_API_KEY`:
//!
//! ```text
//! OPENAI_API_KEY=... cargo run --example axum_gateway \
//!     --features reqwest,metrics,reqwest/rustls -- \
//!     --upstream https://api.openai.com --listen 127.0.0.1:8080
//! ```
//!
//! # Watching it
//!
//! - `GET /metrics`: the stack's metrics in the Prometheus text format
//!   (`metrics-exporter-prometheus`): `gen_ai_client_operation_duration`,
//!   `llm_resilience_requests`, `llm_resilience_retries`, `llm_resilience_circuit_state`, …
//!   (see `tower_llm_resilience::observe::names`). `docs/grafana-dashboard.json` charts them.
//! - `GET /status`: JSON with each route's circuit (state, trips in a row, time to the next
//!   probe, the window's counts), the retry budget left, and the alerts sent, suppressed and
//!   dropped.
//! - Alerts (a bad key, an exhausted quota, a policy block, a circuit open with no backup, the
//!   retry budget spent, a spend cap reached) are error-level log lines; with
//!   `--alert-webhook URL` each is also POSTed to `URL` as JSON ([`WebhookSink`]).
//!
//! The upstream client is reqwest (through [`ReqwestService`]); the crate compiles it without a
//! TLS stack, so an `https` upstream needs `reqwest/rustls` (or `native-tls`) as above. A
//! local plain-HTTP server (vLLM, llama.cpp, Ollama) needs neither TLS nor a key.
//!
//! # What the gateway answers
//!
//! - **A provider answer** (success or error: 200, 400, 401, 429 after the ladder gave up, …)
//!   passes through unchanged — status, headers (less hop-by-hop ones), body — streamed as it
//!   arrives. It carries `x-llm-attempts` (transport attempts made) and `x-llm-route` (the route
//!   whose answer it is, set by the fallback layer).
//! - **A crate error** (no provider answer to hand back) becomes an honest HTTP status with an
//!   OpenAI-shaped JSON body, `{"error":{"message","type","param","code"}}`: see
//!   [`error_answer`] for each kind.
//! - **A stream that fails after its commit point** cannot change its status any more (the 200
//!   and the first tokens are on their way). For `text/event-stream` the gateway sends one last
//!   event, `data: {"error":{…,"type":"stream_interrupted"}}`, and ends the stream without
//!   `data: [DONE]` — OpenAI-compatible clients raise that in-band error. Any other body is cut
//!   (the connection is closed before the end), so the client sees an incomplete body rather
//!   than a short answer that looks whole.
//!
//! # Deferred requests
//!
//! With a sink ([`Config::defer_to`]) and a policy with a `budget.defer` section (the batch
//! preset has one), a request the ladder cannot answer now but that can wait — the provider
//! asks for minutes, every route is down — is written down instead of failed, and answered
//! **`202 Accepted`** with `Location: /v1/deferred/{id}` and a `Retry-After`. The gateway's
//! own [`DeferredWorker`] replays it when it is due, with the gateway's key (the record holds
//! none); `GET /v1/deferred/{id}` then answers the provider's answer, or while it waits `202`
//! with its status, or a dead letter's failure. A bad key, a bad request or a safety block is
//! never deferred: it is answered at once, as always. The answers are kept in this process's
//! memory; a fleet would keep them where every replica can read them.
//!
//! Requests are held in memory (the ladder resends them), up to [`MAX_REQUEST_BYTES`].
//! The client's own `authorization` is not forwarded: the gateway calls the upstream with its
//! own key. Only `content-type`, `accept` and `idempotency-key` are passed on. A real gateway
//! authenticates its clients and sets their `BudgetOwner` on the request for per-client spend
//! caps; this one charges every request to the policy's `default_owner`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::Full;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pin_project_lite::pin_project;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_resilience::circuit_breaker::CircuitBreakerHandle;
use tower_llm_resilience::defer::{
    DeferSink, Deferred, DeferredStatus, DeferredWorker, ReplayOutcome, Replayed,
};
use tower_llm_resilience::observe::{
    Alert, AlertFuture, AlertSink, Observability, TracingAlerts, names,
};
use tower_llm_resilience::policy::DeferPolicy;
use tower_llm_resilience::reqwest::ReqwestService;
use tower_llm_resilience::testing::{MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{
    AttemptLog, Error, ErrorKind, FailureClass, Policy, PolicyError, ResilienceLayer, Resilient,
    RetryBudget,
};

/// Largest request body accepted (axum's default of 2 MiB is small for prompts with images);
/// a larger one is answered 413 before anything is sent upstream.
pub const MAX_REQUEST_BYTES: usize = 20 * 1024 * 1024;

/// Response header: transport attempts the answer took.
pub const ATTEMPTS_HEADER: &str = "x-llm-attempts";

/// The gateway's configuration.
pub struct Config {
    /// Base URL of the upstream; `/v1/chat/completions` is appended (a trailing `/v1` is not
    /// repeated).
    pub upstream: String,
    /// Sent upstream as `authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// The stack in front of the upstream. Keep its [`ResilienceLayer::circuit_breaker`] handle
    /// to watch or force circuits.
    pub layer: ResilienceLayer,
    /// Print one attempt log per request to stderr when its answer ends.
    pub log_requests: bool,
    /// What `GET /metrics` renders: the handle of the Prometheus recorder the metrics go to
    /// (none: no `/metrics`).
    pub metrics: Option<PrometheusHandle>,
    /// POST every alert to this URL as JSON, besides logging it (none: log only).
    pub alert_webhook: Option<String>,
    /// The policy's routes, which `/status` lists before any request has reached them.
    pub routes: Vec<String>,
    /// Where deferred requests are written (none: nothing is deferred); see the module docs.
    pub defer_to: Option<Arc<dyn DeferSink>>,
    /// The policy's `budget.defer` section, which the replay worker follows.
    pub defer: Option<DeferPolicy>,
}

impl Config {
    /// A configuration for `upstream` with the whole ladder built from `policy`.
    pub fn new(upstream: impl Into<String>, policy: &Policy) -> Result<Self, PolicyError> {
        Ok(Self {
            upstream: upstream.into(),
            api_key: None,
            layer: policy.layer()?,
            log_requests: false,
            metrics: None,
            alert_webhook: None,
            routes: policy.route_names().map(str::to_owned).collect(),
            defer_to: None,
            defer: policy.budget.defer.clone(),
        })
    }
}

/// The policy the gateway runs with by default: the interactive preset (no queueing, streams
/// committed at the first token, a 60 s deadline), with metrics on.
pub fn default_policy() -> Policy {
    let mut policy = Policy::interactive();
    policy.workflow = "gateway".to_owned();
    policy.observability.metrics = true;
    policy
}

/// A Prometheus recorder whose histograms have buckets: seconds for the durations (the
/// OpenTelemetry GenAI advice), powers of four for token counts, small counts for attempts.
pub fn prometheus() -> PrometheusBuilder {
    let seconds = [
        0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    ];
    let tokens = [
        1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
    ];
    let buckets = [
        (names::OPERATION_DURATION, &seconds[..]),
        (names::TIME_TO_FIRST_CHUNK, &seconds[..]),
        (names::QUEUE_WAIT, &seconds[..]),
        (names::TOKEN_USAGE, &tokens[..]),
        (names::ATTEMPTS, &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0][..]),
    ];
    buckets
        .into_iter()
        .fold(PrometheusBuilder::new(), |b, (name, values)| {
            // Non-empty bucket lists cannot fail.
            b.set_buckets_for_metric(Matcher::Full(name.to_owned()), values)
                .unwrap_or_else(|_| PrometheusBuilder::new())
        })
}

/// An alert sink that POSTs each alert as JSON to a URL (a chat webhook, an incident tool).
/// Alerts hold metadata only; a failed delivery is logged and not retried.
#[derive(Clone)]
pub struct WebhookSink {
    client: reqwest::Client,
    url: String,
}

impl WebhookSink {
    /// Posts to `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            client: reqwest::Client::new(),
            url: url.into(),
        }
    }
}

impl AlertSink for WebhookSink {
    fn send(&self, alert: Alert) -> AlertFuture {
        let request = self
            .client
            .post(&self.url)
            .header(CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&alert).unwrap_or_default());
        Box::pin(async move {
            match request.send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => eprintln!("alert webhook answered {}: {alert}", r.status()),
                Err(e) => eprintln!("alert webhook unreachable ({e}): {alert}"),
            }
        })
    }
}

struct Gateway {
    client: Resilient<ReqwestService>,
    url: String,
    authorization: Option<HeaderValue>,
    log_requests: bool,
    deferred: Option<Deferrals>,
}

/// The worker that replays the gateway's deferred requests; run it with
/// [`run`](DeferredWorker::run) (as [`app`] does) or drive it with
/// [`run_once`](DeferredWorker::run_once).
pub type ReplayWorker = DeferredWorker<Resilient<ReqwestService>, Full<Bytes>>;

/// What `GET /v1/deferred/{id}` reads: the sink, and the replays' ends seen by this process.
#[derive(Clone)]
struct Deferrals {
    sink: Arc<dyn DeferSink>,
    ended: Arc<std::sync::Mutex<std::collections::HashMap<String, Ended>>>,
}

/// A replay's end as the gateway keeps it for its caller.
enum Ended {
    /// The provider's answer.
    Answered {
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    /// Given up: the provider's failure answer, if it gave one, and why.
    Dead {
        status: Option<StatusCode>,
        body: Option<Bytes>,
        reason: String,
    },
}

impl Deferrals {
    fn keep(&self, replayed: Replayed) {
        let ended = match replayed.outcome {
            ReplayOutcome::Answered(resp) => Ended::Answered {
                content_type: resp.headers().get(CONTENT_TYPE).cloned(),
                body: resp.into_body(),
            },
            ReplayOutcome::DeadLetter {
                reason, response, ..
            } => Ended::Dead {
                status: response.as_ref().map(http::Response::status),
                body: response.map(http::Response::into_body),
                reason,
            },
            // Deferred again: the sink has its status.
            _ => return,
        };
        let mut all = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        all.insert(replayed.record.id, ended);
    }
}

/// What `/metrics` and `/status` read.
struct Watch {
    metrics: Option<PrometheusHandle>,
    breakers: CircuitBreakerHandle,
    retry_budget: RetryBudget,
    observability: Observability,
    routes: Vec<String>,
}

/// The gateway's router: `POST /v1/chat/completions`, `GET /v1/deferred/{id}`, `GET /metrics`,
/// `GET /status`; with a [`Config::defer_to`] sink, its replay worker runs on a task of its own.
pub fn app(config: Config) -> Router {
    let (router, worker) = parts(config);
    if let Some(worker) = worker {
        tokio::spawn(worker.run());
    }
    router
}

/// The gateway's router, and its replay worker (with a [`Config::defer_to`] sink) for the
/// caller to run.
pub fn parts(config: Config) -> (Router, Option<ReplayWorker>) {
    let mut layer = config.layer;
    let alerts: Arc<dyn AlertSink> = match &config.alert_webhook {
        Some(url) => Arc::new(WebhookSink::new(url.clone())),
        None => Arc::new(TracingAlerts),
    };
    if let Some(url) = &config.alert_webhook {
        layer = layer.alert_sink(WebhookSink::new(url.clone()));
    }
    if let Some(sink) = &config.defer_to {
        layer = layer.defer_to(sink.clone());
    }
    let watch = Watch {
        metrics: config.metrics,
        breakers: layer.circuit_breaker(),
        retry_budget: layer.retry_budget().clone(),
        observability: layer.observability(),
        routes: config.routes,
    };
    let client = ServiceBuilder::new()
        .layer(layer)
        .service(ReqwestService::new(reqwest::Client::new()));
    let authorization = config.api_key.as_deref().and_then(|key| {
        let mut value = HeaderValue::try_from(format!("Bearer {key}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    });
    let deferred = config.defer_to.map(|sink| Deferrals {
        sink,
        ended: Arc::default(),
    });
    let worker = deferred.clone().map(|d| {
        let key = authorization.clone();
        DeferredWorker::new(
            client.clone(),
            d.sink.clone(),
            config.defer.unwrap_or_default(),
        )
        .name("gateway")
        // The record holds no credential: the replay is sent with the gateway's own key.
        .credentials(move |_, headers| {
            if let Some(key) = &key {
                headers.insert(AUTHORIZATION, key.clone());
            }
        })
        .alerts(alerts)
        .on_result(move |replayed| d.keep(replayed))
    });
    let gateway = Gateway {
        client,
        url: chat_url(&config.upstream),
        authorization,
        log_requests: config.log_requests,
        deferred,
    };
    let watching = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(Arc::new(watch));
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .route("/v1/deferred/{id}", get(deferred_answer))
        .with_state(Arc::new(gateway))
        .merge(watching);
    (router, worker)
}

/// `GET /v1/deferred/{id}`: the replay's answer once there is one; `202` with the record's
/// status and a `Retry-After` while it waits; its failure once it is a dead letter.
async fn deferred_answer(State(gateway): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    let Some(deferrals) = &gateway.deferred else {
        return openai_error(
            StatusCode::NOT_FOUND,
            "nothing is deferred here",
            "not_found",
            None,
        );
    };
    let ended = {
        let all = deferrals.ended.lock().unwrap_or_else(|p| p.into_inner());
        all.get(&id).map(|e| match e {
            Ended::Answered { content_type, body } => {
                (StatusCode::OK, content_type.clone(), body.clone())
            }
            Ended::Dead {
                status,
                body,
                reason,
            } => match (status, body) {
                (Some(status), Some(body)) => (
                    *status,
                    Some(HeaderValue::from_static("application/json")),
                    body.clone(),
                ),
                _ => (
                    StatusCode::BAD_GATEWAY,
                    Some(HeaderValue::from_static("application/json")),
                    Bytes::from(error_json(reason, "dead_letter", None)),
                ),
            },
        })
    };
    if let Some((status, content_type, body)) = ended {
        let mut response = (status, body).into_response();
        if let Some(ct) = content_type {
            response.headers_mut().insert(CONTENT_TYPE, ct);
        }
        return response;
    }
    let status = match deferrals.sink.status(&id).await {
        Ok(Some(status)) => status,
        Ok(None) => {
            return openai_error(
                StatusCode::NOT_FOUND,
                "no such deferred request",
                "not_found",
                None,
            );
        }
        Err(e) => {
            let message = format!("the deferred queue is unavailable: {e}");
            return openai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &message,
                "store_unavailable",
                None,
            );
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (state, wait_ms, deferrals_so_far) = match status {
        DeferredStatus::Waiting {
            next_attempt_at_ms,
            deferrals,
        } => ("waiting", next_attempt_at_ms.saturating_sub(now), deferrals),
        DeferredStatus::Replaying { deferrals } => ("replaying", 1000, deferrals),
        // Ended on another replica: its answer is not here.
        DeferredStatus::Answered => ("answered", 0, 0),
        DeferredStatus::DeadLetter { reason } => {
            return openai_error(StatusCode::BAD_GATEWAY, &reason, "dead_letter", None);
        }
        _ => ("unknown", 1000, 0),
    };
    let body = serde_json::json!({"id": id, "status": state, "deferrals": deferrals_so_far});
    let mut response = (
        StatusCode::ACCEPTED,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response();
    let retry = ceil_secs(Duration::from_millis(wait_ms)).max(1);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry));
    response
}

/// `202 Accepted` for a deferred request: where to fetch its answer, and when.
fn accepted(error: &Error, deferred: &Deferred) -> Response {
    let location = format!("/v1/deferred/{}", deferred.id);
    let body = serde_json::json!({"id": deferred.id, "status": "waiting", "location": location});
    let mut response = (
        StatusCode::ACCEPTED,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::try_from(location) {
        headers.insert(LOCATION, location);
    }
    if let Some(secs) = error_answer(error).retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(watch): State<Arc<Watch>>) -> Response {
    match &watch.metrics {
        Some(handle) => (
            [(CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /status`: each route's circuit, the retry budget left, the alerts so far.
async fn status(State(watch): State<Arc<Watch>>) -> Response {
    let mut routes: Vec<serde_json::Value> = watch
        .breakers
        .snapshots()
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "route": r.route.as_str(),
                "state": r.state.as_str(),
                "trips": r.trips,
                "retry_in_ms": r.retry_in.map(|d| d.as_millis() as u64),
                "calls": r.calls,
                "failures": r.failures,
                "consecutive_failures": r.consecutive_failures,
                "probes_in_flight": r.probes_in_flight,
            })
        })
        .collect();
    // Routes no request has reached yet are closed.
    for name in &watch.routes {
        if !routes.iter().any(|r| r["route"] == name.as_str()) {
            routes.push(serde_json::json!({"route": name, "state": "closed", "trips": 0}));
        }
    }
    let o = &watch.observability;
    let body = serde_json::json!({
        "routes": routes,
        "retry_budget": {"available": watch.retry_budget.available()},
        "alerts": {
            "sent": o.alerts_sent(),
            "suppressed": o.alerts_suppressed(),
            "dropped": o.alerts_dropped(),
        },
        "metrics": o.metrics_enabled(),
    });
    (
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

/// The chat completion URL for `base_url`.
pub fn chat_url(base_url: &str) -> String {
    let base = base_url.trim_end_matches('/');
    if base.ends_with("/v1") {
        format!("{base}/chat/completions")
    } else {
        format!("{base}/v1/chat/completions")
    }
}

/// Request headers passed on to the upstream.
const FORWARDED: [HeaderName; 2] = [CONTENT_TYPE, ACCEPT];

async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    match gateway.url.parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => {
            let message = "the gateway's upstream URL is not valid";
            return openai_error(StatusCode::BAD_GATEWAY, message, "gateway_error", None);
        }
    }
    let out = request.headers_mut();
    for name in FORWARDED
        .iter()
        .chain([&HeaderName::from_static("idempotency-key")])
    {
        if let Some(value) = headers.get(name) {
            out.insert(name.clone(), value.clone());
        }
    }
    if let Some(auth) = &gateway.authorization {
        out.insert(AUTHORIZATION, auth.clone());
    }
    match gateway.client.clone().oneshot(request).await {
        Ok(response) => pass_through(response, gateway.log_requests),
        Err(error) => {
            if gateway.log_requests {
                eprintln!("-> {error}");
                if let Some(log) = error.attempt_log() {
                    eprintln!("{log}\n");
                }
            }
            match error.deferred() {
                Some(deferred) => accepted(&error, deferred),
                None => error_response(&error),
            }
        }
    }
}

/// Hop-by-hop headers: they describe one connection, not the answer.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn pass_through(response: http::Response<tower_llm_resilience::Body>, log: bool) -> Response {
    let (mut parts, body) = response.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    let attempts = parts.extensions.get::<AttemptLog>().cloned();
    let count = attempts.as_ref().map_or(0, AttemptLog::attempt_count);
    parts
        .headers
        .insert(ATTEMPTS_HEADER, HeaderValue::from(count));
    let sse = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    if sse {
        // The body may gain a final error event.
        parts.headers.remove(CONTENT_LENGTH);
    }
    let body = GatewayBody {
        inner: body,
        sse,
        ended: false,
        report: if log { attempts } else { None },
    };
    Response::from_parts(parts, axum::body::Body::new(body))
}

pin_project! {
    /// The upstream body, passed through; a failure after the commit point becomes a final SSE
    /// error event (event streams) or a cut connection (anything else).
    struct GatewayBody {
        #[pin]
        inner: tower_llm_resilience::Body,
        sse: bool,
        ended: bool,
        report: Option<AttemptLog>,
    }
}

impl http_body::Body for GatewayBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match frame {
            Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Err(error)) => {
                *this.ended = true;
                if let Some(log) = this.report.take() {
                    eprintln!("-> stream failed: {error}\n{log}\n");
                }
                if *this.sse {
                    Poll::Ready(Some(Ok(Frame::data(error_event(&error)))))
                } else {
                    Poll::Ready(Some(Err(error)))
                }
            }
            None => {
                *this.ended = true;
                if let Some(log) = this.report.take() {
                    eprintln!("{log}\n");
                }
                Poll::Ready(None)
            }
        }
    }
}

/// The last event of a stream that failed after its commit point.
fn error_event(error: &Error) -> Bytes {
    let answer = error_answer(error);
    let body = error_json(&error.to_string(), answer.error_type, answer.code);
    Bytes::from(format!("data: {body}\n\n"))
}

/// How the gateway answers a crate error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorAnswer {
    /// The HTTP status.
    pub status: StatusCode,
    /// `error.type` of the body.
    pub error_type: &'static str,
    /// `error.code` of the body: the failure class, when the error has one.
    pub code: Option<&'static str>,
    /// `Retry-After`, in whole seconds rounded up.
    pub retry_after: Option<u64>,
}

/// Maps a crate [`Error`] to the gateway's answer.
///
/// | [`ErrorKind`] | status | `error.type` | `Retry-After` |
/// |---|---|---|---|
/// | `CircuitOpen { retry_in }` | 503 Service Unavailable | `circuit_open` | `retry_in`, seconds rounded up |
/// | `Throttled { retry_in }` (the route, with no backup, refuses most calls) | 503 Service Unavailable | `throttled` | `retry_in`, seconds rounded up |
/// | `RateLimited { retry_in }` (the gateway's own limit rejected it) | 429 Too Many Requests | `rate_limited` | `retry_in`, seconds rounded up |
/// | `BudgetExhausted` | 402 Payment Required | `budget_exhausted` | — |
/// | `DeadlineExceeded` | 504 Gateway Timeout | `deadline_exceeded` | — |
/// | `FailedClosed { class }` | the class's status, below | `failed_closed` | — |
/// | `StreamFailed` (every attempt failed before its commit point) | 504 for a timeout, else 502 | `upstream_stream_failed` | — |
/// | `StreamInterrupted` | 502 Bad Gateway (in a stream: the final error event) | `stream_interrupted` | — |
/// | `Transport` (connect refused, reset, timeout) | 504 for a timeout, else 502 | `upstream_unreachable` | — |
/// | `Deferred` (written down for a later replay; the gateway answers it with its `Location`) | 202 Accepted | `deferred` | when it is due, seconds rounded up |
/// | any later kind | 502 Bad Gateway | `gateway_error` | — |
///
/// A spend cap is answered 402 rather than 429: the request is refused for money, not for
/// speed, and retrying it soon cannot succeed until the budget window turns; a 429 would invite
/// exactly the retries a cap exists to stop.
///
/// The status of a failed-closed class: 400 for invalid request, context overflow and policy
/// block; 401 for auth; 402 for exhausted quota; 409 for a conflict; 429 for rate limited;
/// 503 for overloaded; 504 for timeout; 502 for the rest. `error.code` is the failure class
/// (`connect`, `timeout`, `policy_block`, …) when the error has one.
pub fn error_answer(error: &Error) -> ErrorAnswer {
    let code = error.class().map(FailureClass::as_str);
    let answer = |status, error_type| ErrorAnswer {
        status,
        error_type,
        code,
        retry_after: None,
    };
    let timeout_or_bad_gateway = |error_type| {
        let status = if error.class() == Some(FailureClass::Timeout) {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        answer(status, error_type)
    };
    match error.kind() {
        ErrorKind::CircuitOpen { retry_in, .. } => ErrorAnswer {
            retry_after: Some(ceil_secs(*retry_in)),
            ..answer(StatusCode::SERVICE_UNAVAILABLE, "circuit_open")
        },
        ErrorKind::Throttled { retry_in, .. } => ErrorAnswer {
            retry_after: Some(ceil_secs(*retry_in)),
            ..answer(StatusCode::SERVICE_UNAVAILABLE, "throttled")
        },
        ErrorKind::RateLimited { retry_in } => ErrorAnswer {
            retry_after: Some(ceil_secs(*retry_in)),
            ..answer(StatusCode::TOO_MANY_REQUESTS, "rate_limited")
        },
        ErrorKind::BudgetExhausted { .. } => {
            answer(StatusCode::PAYMENT_REQUIRED, "budget_exhausted")
        }
        ErrorKind::DeadlineExceeded => answer(StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
        ErrorKind::FailedClosed { class } => answer(class_status(*class), "failed_closed"),
        ErrorKind::StreamFailed { .. } => timeout_or_bad_gateway("upstream_stream_failed"),
        ErrorKind::StreamInterrupted { .. } => {
            answer(StatusCode::BAD_GATEWAY, "stream_interrupted")
        }
        ErrorKind::Transport => timeout_or_bad_gateway("upstream_unreachable"),
        ErrorKind::Deferred(deferred) => ErrorAnswer {
            retry_after: Some(ceil_secs(deferred.retry_in).max(1)),
            ..answer(StatusCode::ACCEPTED, "deferred")
        },
        _ => answer(StatusCode::BAD_GATEWAY, "gateway_error"),
    }
}

/// The status a failure class stands for, when the gateway fails closed on it.
fn class_status(class: FailureClass) -> StatusCode {
    match class {
        FailureClass::InvalidRequest
        | FailureClass::ContextOverflow
        | FailureClass::PolicyBlock => StatusCode::BAD_REQUEST,
        FailureClass::Auth => StatusCode::UNAUTHORIZED,
        FailureClass::QuotaExhausted => StatusCode::PAYMENT_REQUIRED,
        FailureClass::Conflict => StatusCode::CONFLICT,
        FailureClass::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        FailureClass::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        FailureClass::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// Whole seconds, rounded up: `Retry-After` must never ask for less than the real wait.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// The gateway's answer to a crate error: see [`error_answer`].
pub fn error_response(error: &Error) -> Response {
    let answer = error_answer(error);
    let mut response = openai_error(
        answer.status,
        &error.to_string(),
        answer.error_type,
        answer.code,
    );
    let headers = response.headers_mut();
    if let Some(secs) = answer.retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    let attempts = error.attempt_log().map_or(0, AttemptLog::attempt_count);
    headers.insert(ATTEMPTS_HEADER, HeaderValue::from(attempts));
    response
}

/// `{"error":{"message","type","param":null,"code"}}`, as OpenAI writes its errors.
fn error_json(message: &str, error_type: &str, code: Option<&str>) -> String {
    serde_json::json!({
        "error": {"message": message, "type": error_type, "param": null, "code": code}
    })
    .to_string()
}

fn openai_error(
    status: StatusCode,
    message: &str,
    error_type: &str,
    code: Option<&str>,
) -> Response {
    let body = error_json(message, error_type, code);
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

/// Starts the embedded provider, scripted per model (see the module docs).
pub async fn start_mock() -> std::io::Result<MockProvider> {
    let mock = MockProvider::start().await?;
    let answer = |model: &str| Reply::openai_chat(model, "Hello from the mock provider!");
    let tokens = ["The", " ladder", " keeps", " streams", " honest", "."];
    let delay = Duration::from_millis(120);
    mock.script(
        ScriptKey::model("mock-flaky"),
        [Reply::openai_overloaded(), answer("mock-flaky")],
    );
    mock.script(
        ScriptKey::model("mock-rate-limited"),
        [
            Reply::openai_rate_limited(Some("1")),
            answer("mock-rate-limited"),
        ],
    );
    mock.script(
        ScriptKey::model("mock-stream"),
        [Reply::openai_stream("mock-stream", &tokens).event_delay(delay)],
    );
    mock.script(
        ScriptKey::model("mock-cut"),
        [Reply::openai_stream("mock-cut", &tokens)
            .event_delay(delay)
            .cut_after(3)],
    );
    mock.script(
        ScriptKey::model("mock-unauthorized"),
        [Reply::unauthorized()],
    );
    mock.script(
        ScriptKey::model("mock-down"),
        [Reply::openai_server_error()],
    );
    Ok(mock)
}

struct Args {
    upstream: Option<String>,
    listen: SocketAddr,
    alert_webhook: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        upstream: None,
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        alert_webhook: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--upstream" => args.upstream = Some(value("--upstream")?),
            "--alert-webhook" => args.alert_webhook = Some(value("--alert-webhook")?),
            "--listen" => {
                let v = value("--listen")?;
                args.listen = v
                    .parse()
                    .map_err(|e| format!("--listen {v:?}: {e} (expected e.g. 127.0.0.1:8080)"))?;
            }
            "-h" | "--help" => {
                return Err(
                    "usage: axum_gateway [--upstream URL] [--listen 127.0.0.1:8080] \
                     [--alert-webhook URL]\n\
                     the API key for --upstream is read from OPENAI_API_KEY"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };

    // The mock lives as long as `_mock`.
    let (upstream, api_key, _mock) = match args.upstream {
        Some(url) => {
            let key = std::env::var("OPENAI_API_KEY").ok();
            if key.is_none() {
                eprintln!("note: OPENAI_API_KEY is not set; calling {url} without a key");
            }
            (url, key, None)
        }
        None => {
            let mock = start_mock().await?;
            (mock.url(), None, Some(mock))
        }
    };

    // Warnings and alerts to stderr (the per-attempt events are at info level).
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_writer(std::io::stderr)
        .init();
    // The recorder goes in before the stack is built: the stack describes its metrics to it.
    let metrics = prometheus().install_recorder()?;
    let mut config = Config::new(upstream.clone(), &default_policy())?;
    config.api_key = api_key;
    config.log_requests = true;
    config.metrics = Some(metrics);
    config.alert_webhook = args.alert_webhook;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("gateway on http://{addr}/v1/chat/completions -> {upstream}");
    println!("metrics on http://{addr}/metrics, status on http://{addr}/status");
    if _mock.is_some() {
        println!("embedded mock provider; try:");
        for (model, stream) in [
            ("mock-flaky", false),
            ("mock-stream", true),
            ("mock-cut", true),
            ("mock-unauthorized", false),
            ("mock-down", false),
        ] {
            println!(
                "  curl -si http://{addr}/v1/chat/completions -H 'content-type: application/json' \
                 -d '{{\"model\":\"{model}\",\"stream\":{stream},\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
            );
        }
    }
    axum::serve(listener, app(config)).await?;
    Ok(())
}
