//! The names of the metrics and their attributes (feature `metrics`).
//!
//! The first three follow the OpenTelemetry GenAI semantic conventions; the crate's own are
//! under the `llm_resilience.` prefix. A Prometheus exporter writes the dots as underscores
//! (`gen_ai_client_operation_duration`, `llm_resilience_attempts`).

/// Histogram, seconds: one logical request, from its arrival at the stack to the end of its
/// answer's body (or its error). Attributes: [`OPERATION`], [`REQUEST_MODEL`],
/// [`RESPONSE_MODEL`], [`SERVER_ADDRESS`], [`ROUTE`], and [`ERROR_TYPE`] when it failed.
pub const OPERATION_DURATION: &str = "gen_ai.client.operation.duration";
/// Histogram, seconds: from the request's arrival to the answer's first content event, for
/// streamed answers. Attributes as [`OPERATION_DURATION`].
pub const TIME_TO_FIRST_CHUNK: &str = "gen_ai.client.operation.time_to_first_chunk";
/// Histogram, `{token}`: the answer's usage as the provider reported it, once per
/// [`TOKEN_TYPE`]. Attributes as [`OPERATION_DURATION`], without [`ERROR_TYPE`].
pub const TOKEN_USAGE: &str = "gen_ai.client.token.usage";

/// Counter: logical requests, by [`ROUTE`] (the requested one), [`OUTCOME`] and
/// [`ERROR_TYPE`].
pub const REQUESTS: &str = "llm_resilience.requests";
/// Histogram, `{attempt}`: transport attempts per logical request, by [`ROUTE`] (requested).
pub const ATTEMPTS: &str = "llm_resilience.attempts";
/// Counter: same-route retries, by [`ROUTE`] and [`CLASS`] (the class of the attempt retried).
pub const RETRIES: &str = "llm_resilience.retries";
/// Counter: route switches, by [`FROM_ROUTE`] and [`TO_ROUTE`], in the order the request tried
/// its routes (a selection strategy's, when it chose one). A hedge is not one.
pub const FALLBACKS: &str = "llm_resilience.fallbacks";
/// Counter: hedges sent, by [`ROUTE`] (the route the hedge went to).
pub const HEDGES: &str = "llm_resilience.hedges";
/// Counter: calls refused locally, without a transport call, by [`ROUTE`] and [`REASON`]
/// (`circuit_open`, `throttle`, `rate_limit`, `spend_cap`, `store_unavailable`). A request
/// waiting out an outage (`ThrottlePolicy::hold`) counts each refusal.
pub const REJECTIONS: &str = "llm_resilience.rejections";
/// Gauge: the state of a route's circuit, by [`ROUTE`]: 0 closed, 1 half-open, 2 open,
/// 3 forced open, 4 forced closed. Set when a route is first seen and at every transition.
pub const CIRCUIT_STATE: &str = "llm_resilience.circuit.state";
/// Counter: circuit transitions, by [`ROUTE`], [`FROM_STATE`] and [`TO_STATE`].
pub const CIRCUIT_TRANSITIONS: &str = "llm_resilience.circuit.transitions";
/// Counter: retries and hops the retry budget refused, by [`ROUTE`].
pub const RETRY_BUDGET_EXHAUSTED: &str = "llm_resilience.retry_budget.exhausted";
/// Counter, micro cost units: spend booked when a request's reservation settled; by [`OWNER`]
/// only when `observability.owner_label` is on.
pub const SPEND: &str = "llm_resilience.spend.micros";
/// Counter: streams that failed after their commit point (the caller had part of the answer),
/// by [`ROUTE`] and [`CAUSE`].
pub const STREAMS_INTERRUPTED: &str = "llm_resilience.stream.interrupted";
/// Counter: streams cut after their commit point and finished on another route by stream
/// continuation, by [`FROM_ROUTE`] and [`TO_ROUTE`].
pub const STREAMS_CONTINUED: &str = "llm_resilience.stream.continued";
/// Histogram, seconds: time a request waited in the rate limit's queue, by [`ROUTE`].
pub const QUEUE_WAIT: &str = "llm_resilience.rate_limit.queue_wait";
/// Counter: alerts handed to the sink, by [`KIND`].
pub const ALERTS: &str = "llm_resilience.alerts";
/// Counter: alerts not sent because one of the same key was sent within the window, by
/// [`KIND`].
pub const ALERTS_SUPPRESSED: &str = "llm_resilience.alerts.suppressed";

/// Every metric above.
pub const METRICS: [&str; 18] = [
    OPERATION_DURATION,
    TIME_TO_FIRST_CHUNK,
    TOKEN_USAGE,
    REQUESTS,
    ATTEMPTS,
    RETRIES,
    FALLBACKS,
    HEDGES,
    REJECTIONS,
    CIRCUIT_STATE,
    CIRCUIT_TRANSITIONS,
    RETRY_BUDGET_EXHAUSTED,
    SPEND,
    STREAMS_INTERRUPTED,
    STREAMS_CONTINUED,
    QUEUE_WAIT,
    ALERTS,
    ALERTS_SUPPRESSED,
];

/// OpenTelemetry: `chat`, `text_completion`, `embeddings`, `generate_content`, from the
/// request's path; `_OTHER` for any other path.
pub const OPERATION: &str = "gen_ai.operation.name";
/// OpenTelemetry: the model the request asked for.
pub const REQUEST_MODEL: &str = "gen_ai.request.model";
/// OpenTelemetry: the model of the route that answered (its policy `model`, else the model
/// asked for).
pub const RESPONSE_MODEL: &str = "gen_ai.response.model";
/// OpenTelemetry: the host of the route that answered.
pub const SERVER_ADDRESS: &str = "server.address";
/// OpenTelemetry: why the request failed: its failure class (`auth`, `overloaded`…), else
/// the crate error's kind (`circuit_open`, `deadline_exceeded`…).
pub const ERROR_TYPE: &str = "error.type";
/// OpenTelemetry: `input` or `output`.
pub const TOKEN_TYPE: &str = "gen_ai.token.type";
/// The route: one of the policy's route names, else `_OTHER`.
pub const ROUTE: &str = "route";
/// `success`, `provider_failure` (the provider's failure response was handed back), `error`
/// (a crate error).
pub const OUTCOME: &str = "outcome";
/// A failure class (`overloaded`, `rate_limited`…).
pub const CLASS: &str = "class";
/// The route switched from.
pub const FROM_ROUTE: &str = "from_route";
/// The route switched to.
pub const TO_ROUTE: &str = "to_route";
/// Why a call was refused locally.
pub const REASON: &str = "reason";
/// A circuit state before a transition (`closed`, `open`, `half_open`, `forced_open`,
/// `forced_closed`).
pub const FROM_STATE: &str = "from_state";
/// A circuit state after a transition.
pub const TO_STATE: &str = "to_state";
/// A budget owner.
pub const OWNER: &str = "owner";
/// Why a stream was interrupted: `first_token_timeout`, `idle_timeout`, `total_timeout`,
/// `disconnected`, `in_band_error`, `truncated`, `buffer_exceeded`.
pub const CAUSE: &str = "cause";
/// An alert's kind.
pub const KIND: &str = "kind";

/// The value of a label whose real value is outside its bounded set.
pub const OTHER: &str = "_OTHER";
