//! The record of every attempt and local decision of one logical request.
//!
//! One [`AttemptLog`] is put into the request extensions by the first crate layer that sees the
//! request; every layer below shares it, it is copied into the response extensions and carried
//! by every crate [`Error`](crate::Error). The layer nearest the transport records each attempt;
//! the layers above annotate it with their decisions. Metadata only: statuses, classes, timings,
//! route names, provider request ids — never bodies, never credentials.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_resilience::attempt_log::{Attempt, AttemptLog, Decision, StopReason};
//! use tower_llm_resilience::{Classification, FailureClass};
//!
//! let log = AttemptLog::new();
//! let mut overloaded = Classification::failure(FailureClass::Overloaded);
//! overloaded.status = Some(http::StatusCode::SERVICE_UNAVAILABLE);
//! let i = log.record(Attempt::new(
//!     Some("primary".into()),
//!     Duration::ZERO,
//!     Duration::from_millis(120),
//!     &overloaded,
//! ));
//! log.decide(i, Decision::Stop(StopReason::AttemptsExhausted));
//! log.decide(i, Decision::Fallback { to: "backup".into() });
//!
//! let table = log.to_string();
//! assert!(table.contains("overloaded"));
//! assert!(table.contains("stop: attempts_exhausted; fallback to backup"));
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::backoff::WaitSource;
use crate::classify::{Classification, FailureClass};
use crate::route::RouteName;

/// Why a stream failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamCause {
    /// No content-bearing event (or, for non-SSE bodies, no byte) within the first-token timeout.
    FirstTokenTimeout(Duration),
    /// Silence between events longer than the idle timeout.
    IdleTimeout(Duration),
    /// The whole response took longer than the total timeout.
    TotalTimeout(Duration),
    /// The connection broke or the body reported an error.
    Disconnected,
    /// The provider sent an error event in the stream.
    InBandError {
        /// Its class, as if it had been an HTTP error response.
        class: FailureClass,
        /// The provider's error type, if any (`overloaded_error`, `server_error`, …).
        error_type: Option<String>,
    },
    /// The stream ended without its terminal marker and without a finish reason.
    Truncated,
    /// More bytes than the policy's `max_buffer` had to be held back before the commit point.
    BufferExceeded(u64),
}

impl StreamCause {
    /// The failure class the cause counts as, before the commit point.
    pub fn class(&self) -> FailureClass {
        match self {
            StreamCause::FirstTokenTimeout(_)
            | StreamCause::IdleTimeout(_)
            | StreamCause::TotalTimeout(_) => FailureClass::Timeout,
            StreamCause::Disconnected | StreamCause::Truncated => FailureClass::Transport,
            // The same answer would overflow the same buffer on every attempt and route, and
            // says nothing about the provider's health: fail closed, count for no breaker.
            StreamCause::BufferExceeded(_) => FailureClass::InvalidRequest,
            StreamCause::InBandError { class, .. } => *class,
        }
    }
}

impl fmt::Display for StreamCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamCause::FirstTokenTimeout(d) => write!(f, "no first token within {d:?}"),
            StreamCause::IdleTimeout(d) => write!(f, "no event for {d:?}"),
            StreamCause::TotalTimeout(d) => write!(f, "stream exceeded its total bound of {d:?}"),
            StreamCause::Disconnected => f.write_str("connection lost"),
            StreamCause::InBandError { class, error_type } => match error_type {
                Some(t) => write!(f, "in-band error event `{t}` ({class})"),
                None => write!(f, "in-band error event ({class})"),
            },
            StreamCause::Truncated => f.write_str("ended without terminal marker or finish reason"),
            StreamCause::BufferExceeded(n) => {
                write!(f, "more than {n} bytes before the commit point")
            }
        }
    }
}

/// Why a layer did not go on after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum StopReason {
    /// The class's action forbids it.
    NotRetryable,
    /// The server said `x-should-retry: false`.
    ServerSaidNo,
    /// The request body cannot be replayed.
    NotReplayable,
    /// The request may have been accepted and the idempotency rule forbids replaying it.
    NotIdempotent,
    /// `max_attempts` reached.
    AttemptsExhausted,
    /// The shared retry budget had nothing left.
    RetryBudgetDenied,
    /// Waiting would pass the deadline.
    DeadlineExceeded,
    /// The server asked for a longer wait than the policy's cap.
    ServerWaitAboveCap,
    /// No approved route is left for the class.
    NoApprovedRoute,
    /// The hop limit or the total-attempts cap of the chain.
    ChainLimit,
    /// The spend cap of the request's budget owner could not hold the reservation of one more
    /// attempt (see [`SpendGate`](crate::context::SpendGate)).
    SpendCapReached,
    /// The answer was already committed to the caller.
    Committed,
    /// The attempt left its route's circuit open and the request has a backup route: a retry
    /// would only be turned away, so the fallback takes over at once.
    CircuitOpen,
}

impl StopReason {
    /// Stable snake_case name.
    pub const fn as_str(&self) -> &'static str {
        match self {
            StopReason::NotRetryable => "not_retryable",
            StopReason::ServerSaidNo => "server_said_no",
            StopReason::NotReplayable => "not_replayable",
            StopReason::NotIdempotent => "not_idempotent",
            StopReason::AttemptsExhausted => "attempts_exhausted",
            StopReason::RetryBudgetDenied => "retry_budget_denied",
            StopReason::DeadlineExceeded => "deadline_exceeded",
            StopReason::ServerWaitAboveCap => "server_wait_above_cap",
            StopReason::NoApprovedRoute => "no_approved_route",
            StopReason::ChainLimit => "chain_limit",
            StopReason::SpendCapReached => "spend_cap_reached",
            StopReason::Committed => "committed",
            StopReason::CircuitOpen => "circuit_open",
        }
    }
}

/// A decision a layer took after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Decision {
    /// The attempt's answer is handed to the caller.
    Accept,
    /// Retry the same route after `wait`.
    Retry {
        /// The wait before the next attempt.
        #[cfg_attr(feature = "serde", serde(with = "millis"))]
        wait: Duration,
        /// Where the wait came from.
        source: WaitSource,
    },
    /// Switch to another route.
    Fallback {
        /// The next route.
        to: RouteName,
    },
    /// Go no further on this rung.
    Stop(StopReason),
    /// The stream was cut after its commit point and is continued on another route: the
    /// partial answer goes to `to` as a prefill, and its new tokens follow in the caller's
    /// stream. The continuation is the next attempt on `to`.
    Continue {
        /// The route that continues the answer.
        to: RouteName,
        /// Bytes the caller had received before the continuation.
        delivered_bytes: u64,
    },
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Accept => f.write_str("accept"),
            Decision::Retry { wait, source } => {
                let src = match source {
                    WaitSource::Backoff => "backoff",
                    WaitSource::Server => "server",
                    WaitSource::Throttle => "throttle",
                };
                write!(f, "retry in {}ms ({src})", wait.as_millis())
            }
            Decision::Fallback { to } => write!(f, "fallback to {to}"),
            Decision::Stop(r) => write!(f, "stop: {}", r.as_str()),
            Decision::Continue {
                to,
                delivered_bytes,
            } => write!(f, "continue on {to} after {delivered_bytes} bytes"),
        }
    }
}

/// Token usage reported by the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Usage {
    /// Prompt (input) tokens.
    pub input_tokens: u64,
    /// Completion (output) tokens.
    pub output_tokens: u64,
}

impl Usage {
    /// A usage record.
    pub const fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
        }
    }
}

/// How a streamed (or guarded) body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum StreamEnd {
    /// Ended with its terminal marker or after a finish reason.
    Complete,
    /// Ended with a policy or safety block (`finish_reason: content_filter`, `stop_reason:
    /// refusal`, `finishReason: SAFETY`) after the commit point: the caller received the stream
    /// as the provider ended it, finish reason included; nothing was retried. (Before the commit
    /// point the same block fails closed and the stream ends `FailedBeforeCommit`.)
    Blocked,
    /// Failed before the commit point (retryable; the caller saw nothing).
    FailedBeforeCommit(
        #[cfg_attr(feature = "serde", serde(serialize_with = "display"))] StreamCause,
    ),
    /// Failed after the commit point (the caller saw part of it).
    Interrupted(#[cfg_attr(feature = "serde", serde(serialize_with = "display"))] StreamCause),
    /// The caller dropped the body before its end.
    Abandoned,
}

impl fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamEnd::Complete => f.write_str("complete"),
            StreamEnd::Blocked => f.write_str("blocked by the provider's policy"),
            StreamEnd::FailedBeforeCommit(cause) => write!(f, "failed before commit ({cause})"),
            StreamEnd::Interrupted(cause) => write!(f, "interrupted ({cause})"),
            StreamEnd::Abandoned => f.write_str("abandoned by the caller"),
        }
    }
}

/// What the stream guard saw of one attempt's body.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct StreamRecord {
    /// From sending the request to the first content-bearing event.
    #[cfg_attr(feature = "serde", serde(with = "millis_opt"))]
    pub time_to_first_token: Option<Duration>,
    /// Bytes handed to the caller.
    pub bytes: u64,
    /// Events seen.
    pub events: u64,
    /// From sending the request to the end of the stream.
    #[cfg_attr(feature = "serde", serde(with = "millis"))]
    pub duration: Duration,
    /// How it ended.
    pub end: StreamEnd,
    /// Usage from the final events, if reported.
    pub usage: Option<Usage>,
    /// Events whose payload was malformed (passed on to the caller as they came).
    pub malformed_events: u64,
}

/// One transport attempt.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Attempt {
    /// 0-based position in the log.
    pub index: u32,
    /// 0-based position among the attempts on the same route (the resend count).
    pub route_attempt: u32,
    /// The route it went to.
    #[cfg_attr(feature = "serde", serde(serialize_with = "display_opt"))]
    pub route: Option<RouteName>,
    /// When it was sent, from the start of the log.
    #[cfg_attr(feature = "serde", serde(with = "millis"))]
    pub offset: Duration,
    /// Time to the response head or the error.
    #[cfg_attr(feature = "serde", serde(with = "millis"))]
    pub latency: Duration,
    /// HTTP status, if a response came.
    pub status: Option<u16>,
    /// Short description of a transport error (never a body).
    pub error: Option<String>,
    /// Failure class; `None` for a success.
    pub class: Option<FailureClass>,
    /// Provider request id.
    pub request_id: Option<String>,
    /// The server's wait hint.
    #[cfg_attr(feature = "serde", serde(with = "millis_opt"))]
    pub retry_after: Option<Duration>,
    /// The decisions the layers took after it, innermost first.
    pub decisions: Vec<Decision>,
    /// What the stream guard saw of the body.
    pub stream: Option<StreamRecord>,
}

impl Attempt {
    /// An attempt sent at `offset` on `route`, seen `latency` later, with what its
    /// classification says.
    pub fn new(
        route: Option<RouteName>,
        offset: Duration,
        latency: Duration,
        c: &Classification,
    ) -> Self {
        Self {
            index: 0,
            route_attempt: 0,
            route,
            offset,
            latency,
            status: c.status.map(|s| s.as_u16()),
            error: None,
            class: c.class,
            request_id: c.request_id.clone(),
            retry_after: c.wait_hint.map(|h| h.wait),
            decisions: Vec::new(),
            stream: None,
        }
    }

    /// The wait before the next attempt, if a retry followed.
    pub fn wait(&self) -> Option<(Duration, WaitSource)> {
        self.decisions.iter().find_map(|d| match d {
            Decision::Retry { wait, source } => Some((*wait, *source)),
            _ => None,
        })
    }
}

/// A decision that made no transport call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case", tag = "kind"))]
#[non_exhaustive]
pub enum LocalEventKind {
    /// The route's circuit was open.
    CircuitOpen {
        /// Time until a probe is admitted.
        #[cfg_attr(feature = "serde", serde(with = "millis"))]
        retry_in: Duration,
    },
    /// The route's throttle turned the call away (the request had no backup route).
    Throttled {
        /// Time until the throttle lets the next call through whatever its probability.
        #[cfg_attr(feature = "serde", serde(with = "millis"))]
        retry_in: Duration,
    },
    /// The spend cap denied the request (at admission) or one more attempt of it (a retry or
    /// a hop).
    BudgetDenied,
    /// The retry budget denied a retry or a hop.
    RetryBudgetDenied,
    /// A client-side rate limit rejected the request.
    RateLimited {
        /// Time until capacity.
        #[cfg_attr(feature = "serde", serde(with = "millis"))]
        retry_in: Duration,
    },
    /// The request waited for capacity (rate limit or a paced route).
    Queued {
        /// How long it waited.
        #[cfg_attr(feature = "serde", serde(with = "millis"))]
        waited: Duration,
    },
    /// The deadline passed before the next step.
    DeadlineExceeded,
    /// The answer came from the idempotent result cache: no provider was called.
    CacheHit,
    /// The store of shared state could not be asked in time (the policy's mode decided what
    /// followed).
    StoreUnavailable,
    /// The fallback chain served its static last-resort answer.
    LastResort,
    /// The fallback chain skipped a route because the request could not be rewritten for it
    /// (for example, its body has no top-level `model` to switch).
    RouteSkipped {
        /// Why, in a few words (never body content).
        reason: String,
    },
    /// The request was written down to be replayed later (the queue rung).
    Deferred {
        /// Time until the replay is due.
        retry_in: Duration,
    },
    /// The request's first attempt had not reached its commit point after `after`: one more
    /// attempt, the hedge, was sent on the event's route. Whichever is second to reach it is
    /// cancelled (an attempt with an `error` saying so).
    Hedged {
        /// The delay the hedge waited.
        #[cfg_attr(feature = "serde", serde(with = "millis"))]
        after: Duration,
    },
    /// The fallback chain's selection strategy ordered the request's routes (the event's route
    /// is the one it put first).
    RouteChosen {
        /// The strategy.
        strategy: crate::policy::RouteStrategy,
        /// Every route, in the order the chain tries them (a route the request cannot use is
        /// still skipped, with its own event).
        candidates: Vec<RouteName>,
        /// Why the first route leads, in a few words: its weight, its time to first token, its
        /// estimated cost.
        reason: String,
    },
}

impl fmt::Display for LocalEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalEventKind::CircuitOpen { retry_in } => {
                write!(f, "circuit open, next probe in {}ms", ceil_ms(*retry_in))
            }
            LocalEventKind::Throttled { retry_in } => {
                write!(f, "throttled, next call in {}ms", ceil_ms(*retry_in))
            }
            LocalEventKind::BudgetDenied => f.write_str("spend cap denied the request"),
            LocalEventKind::RetryBudgetDenied => f.write_str("retry budget denied"),
            LocalEventKind::RateLimited { retry_in } => {
                write!(f, "rate limited, capacity in {}ms", ceil_ms(*retry_in))
            }
            LocalEventKind::Queued { waited } => write!(f, "queued {}ms", waited.as_millis()),
            LocalEventKind::DeadlineExceeded => f.write_str("deadline exceeded"),
            LocalEventKind::StoreUnavailable => f.write_str("shared-state store unavailable"),
            LocalEventKind::CacheHit => f.write_str("answered from the idempotent result cache"),
            LocalEventKind::LastResort => f.write_str("served the last-resort answer"),
            LocalEventKind::RouteSkipped { reason } => write!(f, "route skipped: {reason}"),
            LocalEventKind::Deferred { retry_in } => {
                write!(f, "deferred, replay in {}ms", ceil_ms(*retry_in))
            }
            LocalEventKind::RouteChosen {
                strategy, reason, ..
            } => write!(f, "route chosen by {}: {reason}", strategy.as_str()),
            LocalEventKind::Hedged { after } => {
                write!(f, "hedged after {}ms", ceil_ms(*after))
            }
        }
    }
}

/// A local decision, with when and for which route.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct LocalEvent {
    /// From the start of the log.
    #[cfg_attr(feature = "serde", serde(with = "millis"))]
    pub offset: Duration,
    /// The route concerned.
    #[cfg_attr(feature = "serde", serde(serialize_with = "display_opt"))]
    pub route: Option<RouteName>,
    /// What happened.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub kind: LocalEventKind,
}

/// How the logical request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Outcome {
    /// A successful response was returned.
    Success {
        /// Its status.
        status: u16,
    },
    /// A provider failure response was returned (failed closed or out of options).
    ProviderFailure {
        /// Its status.
        status: u16,
        /// Its class.
        class: Option<FailureClass>,
    },
    /// A crate error was returned.
    Error {
        /// Display of the error kind.
        error: String,
        /// Its class.
        class: Option<FailureClass>,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Success { status } => write!(f, "success {status}"),
            Outcome::ProviderFailure { status, class } => match class {
                Some(class) => write!(f, "provider failure {status} ({class})"),
                None => write!(f, "provider failure {status}"),
            },
            Outcome::Error { error, class } => match class {
                Some(class) => write!(f, "error ({class}): {error}"),
                None => write!(f, "error: {error}"),
            },
        }
    }
}

/// A snapshot of the log, for reading at leisure.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct LogSnapshot {
    /// The route the caller asked for.
    #[cfg_attr(feature = "serde", serde(serialize_with = "display_opt"))]
    pub requested_route: Option<RouteName>,
    /// The route that served the answer.
    #[cfg_attr(feature = "serde", serde(serialize_with = "display_opt"))]
    pub selected_route: Option<RouteName>,
    /// Every transport attempt.
    pub attempts: Vec<Attempt>,
    /// Every local decision.
    pub events: Vec<LocalEvent>,
    /// How it ended, once it has.
    pub outcome: Option<Outcome>,
    /// The budget owner the request was charged to, when a spend cap applies.
    pub budget_owner: Option<String>,
    /// What the request cost, in micro cost units, once its spend has settled.
    pub cost_micros: Option<u64>,
    /// The answer's token usage as it was booked (the provider's report, or the application's
    /// through `SpendReceipt::report`), once its spend has settled.
    pub usage: Option<Usage>,
}

/// One attempt as the log keeps it: its first decision inline, so that recording an attempt
/// and its usual single decision allocates nothing.
#[derive(Debug)]
struct Entry {
    /// The attempt, its `decisions` holding those after the first.
    attempt: Attempt,
    first_decision: Option<Decision>,
}

impl Entry {
    fn push(&mut self, decision: Decision) {
        if self.first_decision.is_none() {
            self.first_decision = Some(decision);
        } else {
            self.attempt.decisions.push(decision);
        }
    }

    fn to_attempt(&self) -> Attempt {
        let mut a = self.attempt.clone();
        if let Some(d) = &self.first_decision {
            a.decisions.insert(0, d.clone());
        }
        a
    }
}

/// The attempts of a log: the first inline, the rest in a `Vec` made only for a second.
#[derive(Debug, Default)]
struct Entries {
    first: Option<Entry>,
    rest: Vec<Entry>,
}

impl Entries {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn push(&mut self, e: Entry) {
        if self.first.is_none() {
            self.first = Some(e);
        } else {
            self.rest.push(e);
        }
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut Entry> {
        match i {
            0 => self.first.as_mut(),
            i => self.rest.get_mut(i - 1),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.first.iter().chain(&self.rest)
    }
}

#[derive(Debug)]
struct State {
    started: Instant,
    tracing: bool,
    request_ids: bool,
    requested_route: Option<RouteName>,
    selected_route: Option<RouteName>,
    attempts: Entries,
    events: Vec<LocalEvent>,
    outcome: Option<Outcome>,
    budget_owner: Option<String>,
    cost_micros: Option<u64>,
    usage: Option<Usage>,
}

/// The shared, cheap-to-clone record of one logical request.
#[derive(Clone)]
pub struct AttemptLog {
    state: Arc<Shared>,
}

/// The log, and what every layer asks of it on every attempt kept where it is read without
/// the lock: how many attempts there are and how the last one ended.
#[derive(Debug)]
struct Shared {
    /// Attempts recorded.
    count: AtomicUsize,
    /// The last attempt's class: [`SUCCESS`] or its position in `FailureClass::ALL`.
    last_class: AtomicU8,
    state: Mutex<State>,
}

/// `last_class` of a success.
const SUCCESS: u8 = u8::MAX;

impl Default for AttemptLog {
    fn default() -> Self {
        Self::new()
    }
}

impl AttemptLog {
    /// A new, empty log starting now.
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    /// A new, empty log starting at `started`.
    pub(crate) fn starting_at(started: Instant) -> Self {
        Self {
            state: Arc::new(Shared {
                count: AtomicUsize::new(0),
                last_class: AtomicU8::new(SUCCESS),
                state: Mutex::new(State {
                    started,
                    tracing: true,
                    request_ids: true,
                    requested_route: None,
                    selected_route: None,
                    attempts: Entries::default(),
                    events: Vec::new(),
                    outcome: None,
                    budget_owner: None,
                    cost_micros: None,
                    usage: None,
                }),
            }),
        }
    }

    /// Turns the per-attempt `tracing` events off (or on).
    pub fn set_tracing(&self, on: bool) {
        self.lock().tracing = on;
    }

    /// Turns the recording of provider request ids off (or on).
    pub fn set_request_ids(&self, on: bool) {
        self.lock().request_ids = on;
    }

    /// Applies a layer's logging policy: what the layer that owns the log does first.
    pub(crate) fn apply(&self, logging: &crate::policy::LoggingPolicy) {
        let mut s = self.lock();
        s.tracing = logging.tracing;
        s.request_ids = logging.request_ids;
    }

    // A poisoned lock only means another thread panicked mid-update; the log is still the best
    // record there is, so keep using it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time since the log started.
    pub fn elapsed(&self) -> Duration {
        self.lock().started.elapsed()
    }

    /// The offset of `at` from the start of the log.
    pub fn offset_of(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.lock().started)
    }

    /// Number of attempts recorded so far; a layer notes it before calling inward, to see after
    /// whether a layer nearer the transport already recorded the attempt.
    pub fn attempt_count(&self) -> usize {
        self.state.count.load(Ordering::Acquire)
    }

    /// Records an attempt and returns its index. Its `index` and `route_attempt` are set here;
    /// its request id is dropped when the log does not record them.
    pub fn record(&self, mut attempt: Attempt) -> usize {
        let mut s = self.lock();
        let index = s.attempts.len();
        attempt.index = index as u32;
        attempt.route_attempt = s
            .attempts
            .iter()
            .filter(|e| e.attempt.route == attempt.route)
            .count() as u32;
        if !s.request_ids {
            attempt.request_id = None;
        }
        if s.tracing {
            trace_attempt(&attempt);
        }
        // Decisions given with the attempt keep their order: the first goes inline.
        let mut decisions = std::mem::take(&mut attempt.decisions).into_iter();
        let mut entry = Entry {
            first_decision: decisions.next(),
            attempt,
        };
        entry.attempt.decisions.extend(decisions);
        let class = entry.attempt.class.map_or(SUCCESS, |c| {
            FailureClass::ALL
                .iter()
                .position(|k| *k == c)
                .map_or(SUCCESS - 1, |i| i as u8)
        });
        s.attempts.push(entry);
        self.state.last_class.store(class, Ordering::Release);
        self.state.count.store(index + 1, Ordering::Release);
        index
    }

    /// Records the attempt unless a layer nearer the transport recorded one since `mark` (the
    /// [`attempt_count`](Self::attempt_count) before the call); returns the attempt's index.
    pub fn record_since(&self, mark: usize, attempt: impl FnOnce() -> Attempt) -> usize {
        let count = self.attempt_count();
        if count > mark {
            count - 1
        } else {
            self.record(attempt())
        }
    }

    /// The class of the attempt a layer nearer the transport recorded since `mark`, if one
    /// did: `Some(None)` for a success.
    pub(crate) fn recorded_since(&self, mark: usize) -> Option<Option<FailureClass>> {
        if self.attempt_count() <= mark {
            return None;
        }
        match self.state.last_class.load(Ordering::Acquire) {
            SUCCESS => Some(None),
            // A failure of a class outside the table still is a failure.
            i => Some(Some(
                FailureClass::ALL
                    .get(usize::from(i))
                    .copied()
                    .unwrap_or(FailureClass::ServerError),
            )),
        }
    }

    /// Appends a decision to attempt `index`.
    pub fn decide(&self, index: usize, decision: Decision) {
        let mut s = self.lock();
        let tracing = s.tracing;
        if let Some(e) = s.attempts.get_mut(index) {
            if tracing {
                tracing::debug!(
                    target: "tower_llm_resilience::attempt",
                    attempt = e.attempt.index,
                    route = e.attempt.route.as_ref().map(RouteName::as_str),
                    decision = %decision,
                    "decision"
                );
            }
            e.push(decision);
        }
    }

    /// Sets what the stream guard saw of attempt `index`.
    pub fn set_stream(&self, index: usize, record: StreamRecord) {
        let mut s = self.lock();
        let tracing = s.tracing;
        if let Some(e) = s.attempts.get_mut(index) {
            let a = &mut e.attempt;
            if tracing {
                tracing::info!(
                    target: "tower_llm_resilience::stream",
                    attempt = a.index,
                    route = a.route.as_ref().map(RouteName::as_str),
                    ttft_ms = record.time_to_first_token.map(|d| d.as_millis() as u64),
                    bytes = record.bytes,
                    events = record.events,
                    duration_ms = record.duration.as_millis() as u64,
                    end = ?record.end,
                    "stream ended"
                );
            }
            a.stream = Some(record);
        }
    }

    /// Records a local decision that made no transport call.
    pub fn event(&self, route: Option<RouteName>, kind: LocalEventKind) {
        let mut s = self.lock();
        let offset = s.started.elapsed();
        if s.tracing {
            tracing::info!(
                target: "tower_llm_resilience::event",
                route = route.as_ref().map(RouteName::as_str),
                offset_ms = offset.as_millis() as u64,
                event = ?kind,
                "local decision"
            );
        }
        s.events.push(LocalEvent {
            offset,
            route,
            kind,
        });
    }

    /// Whether a local event of `route` matching `kind` was recorded at or after `since`
    /// (an offset from the start of the log).
    pub(crate) fn has_event(
        &self,
        route: &RouteName,
        since: Duration,
        kind: impl Fn(&LocalEventKind) -> bool,
    ) -> bool {
        self.lock()
            .events
            .iter()
            .any(|e| e.offset >= since && e.route.as_ref() == Some(route) && kind(&e.kind))
    }

    /// Sets the route the caller asked for (kept if already set).
    pub fn set_requested_route(&self, route: RouteName) {
        let mut s = self.lock();
        if s.requested_route.is_none() {
            s.requested_route = Some(route);
        }
    }

    /// Sets the route that served the answer.
    pub fn set_selected_route(&self, route: RouteName) {
        self.lock().selected_route = Some(route);
    }

    /// Sets how the request ended.
    pub fn set_outcome(&self, outcome: Outcome) {
        self.lock().outcome = Some(outcome);
    }

    /// Sets the budget owner the request is charged to (a spend cap does when it admits or
    /// refuses the request).
    pub fn set_budget_owner(&self, owner: impl Into<String>) {
        self.lock().budget_owner = Some(owner.into());
    }

    /// Sets what the request cost, in micro cost units, and the answer's usage booked with it
    /// (a spend cap does when it settles, and again when the application corrects the usage).
    pub fn set_charge(&self, cost_micros: u64, usage: Option<Usage>) {
        let mut s = self.lock();
        s.cost_micros = Some(cost_micros);
        if usage.is_some() {
            s.usage = usage;
        }
    }

    /// Reads the whole log under one lock, without copying it: what the end of a request is
    /// turned into.
    pub(crate) fn view<R>(&self, f: impl FnOnce(View<'_>) -> R) -> R {
        f(View(&self.lock()))
    }

    /// A copy of everything recorded so far.
    pub fn snapshot(&self) -> LogSnapshot {
        let s = self.lock();
        LogSnapshot {
            requested_route: s.requested_route.clone(),
            selected_route: s.selected_route.clone(),
            attempts: s.attempts.iter().map(Entry::to_attempt).collect(),
            events: s.events.clone(),
            outcome: s.outcome.clone(),
            budget_owner: s.budget_owner.clone(),
            cost_micros: s.cost_micros,
            usage: s.usage,
        }
    }

    /// A copy of the attempts recorded so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.lock().attempts.iter().map(Entry::to_attempt).collect()
    }

    /// A copy of the local events recorded so far.
    pub fn events(&self) -> Vec<LocalEvent> {
        self.lock().events.clone()
    }

    /// Whether two handles share one log.
    pub fn ptr_eq(&self, other: &AttemptLog) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }
}

/// The log as the end of a request reads it: borrowed under the log's lock.
pub(crate) struct View<'a>(&'a State);

impl<'a> View<'a> {
    /// Every attempt with its decisions, in order.
    pub(crate) fn attempts(
        &self,
    ) -> impl Iterator<Item = (&'a Attempt, impl Iterator<Item = &'a Decision>)> {
        self.0.attempts.iter().map(|e| {
            (
                &e.attempt,
                e.first_decision.iter().chain(&e.attempt.decisions),
            )
        })
    }

    /// The last attempt.
    pub(crate) fn last_attempt(&self) -> Option<&'a Attempt> {
        let a = &self.0.attempts;
        a.rest.last().or(a.first.as_ref()).map(|e| &e.attempt)
    }

    pub(crate) fn attempt_count(&self) -> usize {
        self.0.attempts.len()
    }

    pub(crate) fn events(&self) -> &'a [LocalEvent] {
        &self.0.events
    }

    pub(crate) fn outcome(&self) -> Option<&'a Outcome> {
        self.0.outcome.as_ref()
    }

    pub(crate) fn requested_route(&self) -> Option<&'a RouteName> {
        self.0.requested_route.as_ref()
    }

    pub(crate) fn selected_route(&self) -> Option<&'a RouteName> {
        self.0.selected_route.as_ref()
    }

    pub(crate) fn budget_owner(&self) -> Option<&'a str> {
        self.0.budget_owner.as_deref()
    }

    pub(crate) fn cost_micros(&self) -> Option<u64> {
        self.0.cost_micros
    }

    pub(crate) fn usage(&self) -> Option<Usage> {
        self.0.usage
    }

    /// Time since the log started.
    pub(crate) fn elapsed(&self) -> Duration {
        self.0.started.elapsed()
    }

    pub(crate) fn tracing(&self) -> bool {
        self.0.tracing
    }

    pub(crate) fn request_ids(&self) -> bool {
        self.0.request_ids
    }
}

fn trace_attempt(a: &Attempt) {
    tracing::info!(
        target: "tower_llm_resilience::attempt",
        attempt = a.index,
        http.request.resend_count = a.route_attempt,
        route = a.route.as_ref().map(RouteName::as_str),
        offset_ms = a.offset.as_millis() as u64,
        latency_ms = a.latency.as_millis() as u64,
        status = a.status,
        class = a.class.map(FailureClass::as_str),
        error = a.error.as_deref(),
        request_id = a.request_id.as_deref(),
        retry_after_ms = a.retry_after.map(|d| d.as_millis() as u64),
        "attempt"
    );
}

impl fmt::Debug for AttemptLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttemptLog")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// The log as its [`LogSnapshot`] serializes it, taken at the moment of serializing.
#[cfg(feature = "serde")]
impl serde::Serialize for AttemptLog {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.snapshot().serialize(serializer)
    }
}

/// A compact table: one line per attempt, then the local decisions and the outcome.
impl fmt::Display for AttemptLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.snapshot(), f)
    }
}

impl fmt::Display for LogSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let route = |r: &Option<RouteName>| r.as_ref().map_or("-".to_owned(), |r| r.to_string());
        writeln!(
            f,
            "requested {} -> selected {}",
            route(&self.requested_route),
            route(&self.selected_route)
        )?;
        writeln!(
            f,
            "{:>3} {:<14} {:>8} {:>8} {:>6} {:<18} {:<24} decisions",
            "#", "route", "at_ms", "took_ms", "status", "class", "request_id"
        )?;
        for a in &self.attempts {
            let decisions: Vec<String> = a.decisions.iter().map(|d| d.to_string()).collect();
            let mut decisions = decisions.join("; ");
            if let Some(s) = &a.stream {
                decisions.push_str(&format!(
                    "{}stream {}, {} bytes to the caller",
                    if decisions.is_empty() { "" } else { "; " },
                    s.end,
                    s.bytes
                ));
            }
            writeln!(
                f,
                "{:>3} {:<14} {:>8} {:>8} {:>6} {:<18} {:<24} {}",
                a.index,
                route(&a.route),
                a.offset.as_millis(),
                a.latency.as_millis(),
                a.status.map_or("-".to_owned(), |s| s.to_string()),
                a.class
                    .map_or(if a.error.is_some() { "error" } else { "ok" }, |c| c
                        .as_str()),
                a.request_id.as_deref().unwrap_or("-"),
                decisions
            )?;
        }
        for e in &self.events {
            writeln!(
                f,
                "  @{}ms {}: {}",
                e.offset.as_millis(),
                route(&e.route),
                e.kind
            )?;
        }
        if self.budget_owner.is_some() || self.cost_micros.is_some() {
            write!(
                f,
                "spend: owner {}",
                self.budget_owner.as_deref().unwrap_or("-")
            )?;
            if let Some(c) = self.cost_micros {
                write!(f, ", cost {c} micro units")?;
            }
            if let Some(u) = self.usage {
                write!(
                    f,
                    ", {} in / {} out tokens",
                    u.input_tokens, u.output_tokens
                )?;
            }
            writeln!(f)?;
        }
        match &self.outcome {
            Some(o) => write!(f, "outcome: {o}"),
            None => write!(f, "outcome: pending"),
        }
    }
}

/// Whole milliseconds, rounded up: a wait shown as "next probe in 1195ms" is never shorter than
/// the real one.
fn ceil_ms(d: Duration) -> u128 {
    crate::duration::ceil_millis(d).as_millis()
}

#[cfg(feature = "serde")]
fn display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[cfg(feature = "serde")]
fn display_opt<T: fmt::Display, S: serde::Serializer>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

#[cfg(feature = "serde")]
mod millis {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

#[cfg(feature = "serde")]
mod millis_opt {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn inner_layer_records_outer_annotates() {
        let log = AttemptLog::new();
        let mark = log.attempt_count();
        // The inner layer records...
        let mut c = Classification::failure(FailureClass::Overloaded);
        c.status = Some(StatusCode::SERVICE_UNAVAILABLE);
        let i = log.record(Attempt::new(
            Some("primary".into()),
            Duration::ZERO,
            Duration::from_millis(5),
            &c,
        ));
        // ...so the outer one does not record again.
        let j = log.record_since(mark, || unreachable!("already recorded"));
        assert_eq!(i, j);
        log.decide(j, Decision::Stop(StopReason::AttemptsExhausted));
        log.decide(
            j,
            Decision::Fallback {
                to: "backup".into(),
            },
        );
        let a = &log.attempts()[0];
        assert_eq!(a.status, Some(503));
        assert_eq!(a.decisions.len(), 2);
        let table = log.to_string();
        assert!(
            table.contains("stop: attempts_exhausted; fallback to backup"),
            "{table}"
        );
    }

    #[test]
    fn route_attempt_counts_per_route() {
        let log = AttemptLog::new();
        let ok = Classification::success(StatusCode::OK);
        for r in ["a", "a", "b", "a"] {
            log.record(Attempt::new(
                Some(r.into()),
                Duration::ZERO,
                Duration::ZERO,
                &ok,
            ));
        }
        let counts: Vec<u32> = log.attempts().iter().map(|a| a.route_attempt).collect();
        assert_eq!(counts, [0, 1, 0, 2]);
    }

    #[test]
    fn the_table_speaks_in_words_and_milliseconds() {
        let log = AttemptLog::new();
        let c = Classification::failure(FailureClass::Transport);
        let i = log.record(Attempt::new(
            Some("primary".into()),
            Duration::ZERO,
            Duration::from_millis(120),
            &c,
        ));
        log.set_stream(
            i,
            StreamRecord {
                time_to_first_token: None,
                bytes: 0,
                events: 1,
                duration: Duration::from_millis(160),
                end: StreamEnd::FailedBeforeCommit(StreamCause::Disconnected),
                usage: None,
                malformed_events: 0,
            },
        );
        log.event(
            Some("primary".into()),
            LocalEventKind::CircuitOpen {
                retry_in: Duration::from_nanos(1_194_144_175),
            },
        );
        log.set_outcome(Outcome::ProviderFailure {
            status: 401,
            class: Some(FailureClass::Auth),
        });
        let table = log.to_string();
        assert!(
            table.contains("stream failed before commit (connection lost), 0 bytes to the caller"),
            "{table}"
        );
        // Rounded up: never shorter than the real wait.
        assert!(
            table.contains("primary: circuit open, next probe in 1195ms"),
            "{table}"
        );
        assert!(
            table.ends_with("outcome: provider failure 401 (auth)"),
            "{table}"
        );
        assert_eq!(
            LocalEventKind::Queued {
                waited: Duration::from_millis(1000)
            }
            .to_string(),
            "queued 1000ms"
        );
        assert_eq!(
            Outcome::Error {
                error: "deadline exceeded".into(),
                class: None
            }
            .to_string(),
            "error: deadline exceeded"
        );
    }

    #[test]
    fn get_or_insert_shares_one_log() {
        let mut req = http::Request::new(());
        let (a, created) = AttemptLog::get_or_insert(&mut req);
        let (b, again) = AttemptLog::get_or_insert(&mut req);
        assert!(created && !again && a.ptr_eq(&b));
    }

    #[cfg(feature = "serde")]
    #[test]
    fn the_log_serializes_as_its_snapshot() {
        let log = AttemptLog::new();
        log.set_requested_route(RouteName::new("primary"));
        log.event(
            Some(RouteName::new("primary")),
            LocalEventKind::RetryBudgetDenied,
        );
        let direct = serde_json::to_value(&log).unwrap_or_default();
        assert_eq!(
            direct,
            serde_json::to_value(log.snapshot()).unwrap_or_default()
        );
        assert_eq!(direct["requested_route"], "primary");
        assert_eq!(direct["events"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn a_throttled_call_is_an_event_with_its_wait() {
        let log = AttemptLog::new();
        log.event(
            Some(RouteName::new("primary")),
            LocalEventKind::Throttled {
                retry_in: Duration::from_micros(40_500),
            },
        );
        assert_eq!(log.attempt_count(), 0);
        let shown = log.to_string();
        assert!(
            shown.contains("primary: throttled, next call in 41ms"),
            "{shown}"
        );
        assert_eq!(StopReason::CircuitOpen.as_str(), "circuit_open");
        #[cfg(feature = "serde")]
        {
            let v = serde_json::to_value(log.snapshot()).unwrap_or_default();
            assert_eq!(v["events"][0]["kind"], "throttled");
            // Whole milliseconds, as every duration of the serialised log.
            assert_eq!(v["events"][0]["retry_in"], 40);
            assert_eq!(v["events"][0]["route"], "primary");
        }
    }
}
