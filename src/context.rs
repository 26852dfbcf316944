//! The one per-request context the layers share, and the values it carries.
//!
//! The outermost crate layer a request meets puts one [`RequestContext`] into its extensions;
//! every layer below finds it there instead of making its own. It holds the request's
//! [`AttemptLog`] and what the layers hand each other: the deadline, the retry budget, the cap
//! on attempts across the route chain, the route of the current attempt, whether the chain has
//! another route after it, the spend cap's gate, and the pacing state. A retry or a hop shares
//! it: copies of the request point at the same context.
//!
//! | field | written by | read by |
//! |---|---|---|
//! | attempt log | every layer (the one nearest the transport records an attempt) | every layer |
//! | deadline | `BudgetLayer` (or the caller) | `RetryLayer`, `FallbackLayer` |
//! | retry budget | `BudgetLayer` | `RetryLayer`, `FallbackLayer` |
//! | attempt cap | `FallbackLayer` | `RetryLayer`, `FallbackLayer` |
//! | route | `FallbackLayer`, per hop (else the URI's authority) | `RetryLayer`, `CircuitBreakerLayer`, `StreamGuardLayer` |
//! | fallback available | `FallbackLayer`, per hop | `RetryLayer` |
//! | spend gate | `BudgetLayer` with a spend cap | `RetryLayer`, `FallbackLayer` |
//! | pacing | `BudgetLayer` with pacing on | `FallbackLayer` |
//!
//! A caller (or a layer of its own above the crate's) may set the same values as request
//! extensions before the first crate layer: [`RouteName`], [`Deadline`], [`AttemptCap`],
//! [`FallbackAvailable`], [`SpendGate`], [`RetryBudget`] and an [`AttemptLog`] are taken into
//! the context when it is made.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_llm_resilience::context::RequestContext;
//! use tower_llm_resilience::{Deadline, RouteName};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let mut req = http::Request::post("https://api.example/v1/chat/completions").body(()).unwrap_or_default();
//! assert_eq!(RouteName::of_request(&req).as_str(), "api.example");
//! req.extensions_mut().insert(RouteName::new("primary"));
//! Deadline::after(Duration::from_secs(30)).tighten(&mut req);
//!
//! // What the first crate layer does: the caller's values go into the one context.
//! let (ctx, created) = RequestContext::get_or_insert(&mut req);
//! assert!(created);
//! assert_eq!(ctx.route().map(|r| r.to_string()).as_deref(), Some("primary"));
//! ctx.tighten_deadline(Deadline::after(Duration::from_secs(60))); // never loosens it
//! assert_eq!(ctx.deadline().map(|d| d.remaining()), Some(Duration::from_secs(30)));
//!
//! // Every layer below finds the same context.
//! let again = RequestContext::of(&req).map(|c| c.ptr_eq(&ctx));
//! assert_eq!(again, Some(true));
//! # }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use std::time::Duration;

use bytes::Bytes;

use crate::Body;
use crate::attempt_log::{Attempt, AttemptLog, Outcome};
use crate::classify::{Classification, FailureClass};
use crate::error::Error;
use crate::observe::{Ended, Noted, Watched};
use crate::pacing::Pacer;
use crate::policy::LoggingPolicy;
use crate::retry_budget::RetryBudget;
pub use crate::route::RouteName;
pub use crate::store::StoreFuture;

// Defined here rather than beside the type: it looks into the request's context first.
impl RouteName {
    /// The route of `req`: the route of its [`RequestContext`], else its `RouteName`
    /// extension, else its URI's authority, else `"default"`.
    pub fn of_request<B>(req: &http::Request<B>) -> Self {
        if let Some(r) = RequestContext::of(req).and_then(RequestContext::route) {
            return r;
        }
        if let Some(r) = req.extensions().get::<RouteName>() {
            return r.clone();
        }
        Self::of_authority(req)
    }
}

// Defined here rather than beside the type: inside the stack the log is the context's.
impl AttemptLog {
    /// The log of `req`: its [`RequestContext`]'s log inside the stack; before the stack, the
    /// log a caller attaches (inserted if it has none), which the context then takes instead of
    /// making its own, leaving the outcome to the caller. The `bool` is `true` when this call
    /// made the log.
    pub fn get_or_insert<B>(req: &mut http::Request<B>) -> (Self, bool) {
        if let Some(ctx) = RequestContext::of(req) {
            return (ctx.log().clone(), false);
        }
        match req.extensions().get::<AttemptLog>() {
            Some(log) => (log.clone(), false),
            None => {
                let log = AttemptLog::new();
                req.extensions_mut().insert(log.clone());
                (log, true)
            }
        }
    }
}

/// The instant by which a whole logical request must be answered.
///
/// `BudgetLayer` sets it in the [`RequestContext`]; `RetryLayer` never sleeps past it and
/// `FallbackLayer` starts no hop after it. The earliest deadline wins when several are set. A
/// caller may set one as a request extension ([`tighten`](Self::tighten)) before the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// The deadline `after` from now.
    pub fn after(after: std::time::Duration) -> Self {
        Self(crate::duration::saturating_add(Instant::now(), after))
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> std::time::Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// Sets `self` on `req` unless it already carries an earlier deadline.
    pub fn tighten<B>(self, req: &mut http::Request<B>) {
        let ext = req.extensions_mut();
        match ext.get::<Deadline>() {
            Some(d) if d.0 <= self.0 => {}
            _ => {
                ext.insert(self);
            }
        }
    }
}

/// Marks a request for which the fallback chain still has a route to switch to after this one.
///
/// `FallbackLayer` sets it in the [`RequestContext`] per hop (a caller's own chain may set it
/// as a request extension); `RetryLayer` reads it for the classes whose rule is
/// [`RetryRule::OnceUnlessFallback`](crate::policy::RetryRule::OnceUnlessFallback): a silent
/// route rarely recovers within one request, so the backup is tried instead of a second wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackAvailable;

/// The most transport attempts the request's [`AttemptLog`] may hold,
/// across every route of the fallback chain.
///
/// `FallbackLayer` sets it in the [`RequestContext`] from `fallback.max_total_attempts` (a
/// caller may set one as a request extension) and starts no hop once the log
/// holds that many attempts; a layer that resends on the same route (`RetryLayer`) makes no
/// further attempt once the log holds that many either
/// ([`StopReason::ChainLimit`](crate::attempt_log::StopReason::ChainLimit)). The smallest cap
/// set wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttemptCap(pub u32);

impl AttemptCap {
    /// Sets `self` on `req` unless it already carries a smaller cap.
    pub fn tighten<B>(self, req: &mut http::Request<B>) {
        let ext = req.extensions_mut();
        match ext.get::<AttemptCap>() {
            Some(c) if c.0 <= self.0 => {}
            _ => {
                ext.insert(self);
            }
        }
    }

    /// Whether a log holding `attempts` attempts may make another.
    pub fn allows(&self, attempts: usize) -> bool {
        attempts < self.0 as usize
    }
}

/// Reserves spend for one more attempt of a request: what a [`SpendGate`] asks.
///
/// `BudgetLayer` implements it over the request's spend reservation; implement it to put a
/// spend cap of your own in front of `RetryLayer` and `FallbackLayer`.
pub trait AttemptAdmission: Send + Sync + 'static {
    /// Reserves, atomically, the estimated maximum cost of one more attempt of the request on
    /// `route`, for the request's budget owner. `Err` when the reservation would take the
    /// owner past its cap (or the route has no price, or the store cannot be asked): that
    /// attempt must not be made.
    fn admit(&self, route: &RouteName) -> StoreFuture<Result<(), SpendDenied>>;

    /// Gives back the latest admission on `route`: its attempt will not be made after all.
    fn release(&self, route: &RouteName);
}

/// The spend cap's say on every attempt of a request after the first.
///
/// `BudgetLayer` with a spend cap reserves the first attempt when it admits the request and
/// puts this gate into the [`RequestContext`] (a caller's own cap may set one as a request
/// extension). `RetryLayer` asks it before each retry and
/// `FallbackLayer` before each hop, for the route the attempt goes to; a denial ends the
/// retries or the chain with
/// [`StopReason::SpendCapReached`](crate::attempt_log::StopReason::SpendCapReached) and the
/// caller gets the failure the layer had. A layer that was admitted an attempt and then does
/// not make it (another check refused it, or the attempt was rejected locally without a call)
/// releases it. The owner is always the request's own: a hop to a route of another provider
/// account still spends the same owner's cap.
#[derive(Clone)]
pub struct SpendGate(Arc<dyn AttemptAdmission>);

impl SpendGate {
    /// A gate asking `admission`.
    pub fn new(admission: impl AttemptAdmission) -> Self {
        Self(Arc::new(admission))
    }

    /// Reserves one more attempt on `route`; see [`AttemptAdmission::admit`].
    pub fn admit(&self, route: &RouteName) -> StoreFuture<Result<(), SpendDenied>> {
        self.0.admit(route)
    }

    /// Gives back the latest admission on `route`; see [`AttemptAdmission::release`].
    pub fn release(&self, route: &RouteName) {
        self.0.release(route);
    }
}

impl fmt::Debug for SpendGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpendGate").finish_non_exhaustive()
    }
}

/// A further attempt the spend cap refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendDenied {
    owner: String,
}

impl SpendDenied {
    /// A denial for `owner`.
    pub fn new(owner: impl Into<String>) -> Self {
        Self {
            owner: owner.into(),
        }
    }

    /// The budget owner whose cap refused the attempt.
    pub fn owner(&self) -> &str {
        &self.owner
    }
}

impl fmt::Display for SpendDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the spend cap of `{}` cannot hold one more attempt",
            self.owner
        )
    }
}

impl std::error::Error for SpendDenied {}

/// What the crate's layers share about one logical request: one request extension, made by
/// the outermost crate layer present and found by the others. See the [module docs](self).
///
/// Cheap to clone: clones share one context. The values are read and written through `&self`
/// (a retry's copy of the request and the layers of the stack all hold the same context).
#[derive(Clone)]
pub struct RequestContext(Arc<Inner>);

struct Inner {
    log: AttemptLog,
    state: Mutex<State>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) deadline: Option<Deadline>,
    pub(crate) retry_budget: Option<RetryBudget>,
    pub(crate) attempt_cap: Option<AttemptCap>,
    pub(crate) route: Option<RouteName>,
    pub(crate) fallback_available: bool,
    pub(crate) spend: Option<SpendGate>,
    pub(crate) pacer: Option<Arc<Pacer>>,
    /// Admission found no room in the primary's rate-limit bucket and took this backup's:
    /// the backup, and when the primary has room again.
    pub(crate) rerouted: Option<(RouteName, Duration)>,
    /// What the log's owner noted for the request's end, when it reports metrics or alerts.
    pub(crate) observed: Option<Noted>,
    /// The idempotency key made for each route the request was sent to.
    idempotency_keys: Vec<(RouteName, http::HeaderValue)>,
    /// When the attempt in flight was handed inward, and the log's attempt count then: the
    /// one clock read of an attempt, taken by the outermost layer that sends it and reused by
    /// the layers below (an attempt recorded since makes it stale).
    sent: Option<(usize, Instant)>,
}

impl State {
    pub(crate) fn tighten_deadline(&mut self, deadline: Deadline) {
        if self.deadline.is_none_or(|d| deadline < d) {
            self.deadline = Some(deadline);
        }
    }

    pub(crate) fn tighten_attempt_cap(&mut self, cap: AttemptCap) {
        if self.attempt_cap.is_none_or(|c| cap < c) {
            self.attempt_cap = Some(cap);
        }
    }

    /// The request's idempotency key for `route`, made by `make` the first time: every
    /// attempt to a route (a retry, a same-route hedge, a hop back) carries the same one,
    /// while another route, sent another body, has its own.
    pub(crate) fn idempotency_key(
        &mut self,
        route: &RouteName,
        make: impl FnOnce() -> Option<http::HeaderValue>,
    ) -> Option<http::HeaderValue> {
        if let Some((_, key)) = self.idempotency_keys.iter().find(|(r, _)| r == route) {
            return Some(key.clone());
        }
        let key = make()?;
        self.idempotency_keys.push((route.clone(), key.clone()));
        Some(key)
    }
}

impl RequestContext {
    /// The context of `req`, if a crate layer (or the caller) has put one there.
    pub fn of<B>(req: &http::Request<B>) -> Option<&RequestContext> {
        req.extensions().get::<RequestContext>()
    }

    /// The context of `req`, making one if it has none. The `bool` is `true` when this call
    /// made it. A new context takes what the caller set as request extensions: its
    /// [`AttemptLog`], [`RouteName`], [`Deadline`], [`AttemptCap`], [`FallbackAvailable`],
    /// [`SpendGate`] and [`RetryBudget`].
    pub fn get_or_insert<B>(req: &mut http::Request<B>) -> (RequestContext, bool) {
        if let Some(ctx) = Self::of(req) {
            return (ctx.clone(), false);
        }
        let now = Instant::now();
        let ext = req.extensions();
        let log = match ext.get::<AttemptLog>() {
            Some(log) => log.clone(),
            None => AttemptLog::starting_at(now),
        };
        let state = State {
            deadline: ext.get::<Deadline>().copied(),
            retry_budget: ext.get::<RetryBudget>().cloned(),
            attempt_cap: ext.get::<AttemptCap>().copied(),
            route: ext.get::<RouteName>().cloned(),
            fallback_available: ext.get::<FallbackAvailable>().is_some(),
            spend: ext.get::<SpendGate>().cloned(),
            pacer: None,
            rerouted: None,
            observed: None,
            idempotency_keys: Vec::new(),
            sent: Some((0, now)),
        };
        let ctx = RequestContext(Arc::new(Inner {
            log,
            state: Mutex::new(state),
        }));
        req.extensions_mut().insert(ctx.clone());
        (ctx, true)
    }

    /// What a layer does first with a request: find or make its context. The `bool` is `true`
    /// when this layer owns the log: it made the context and the caller brought no log of its
    /// own. The owner applies its logging policy to the log, sets the outcome and attaches the
    /// log to the response ([`close_response`](Self::close_response),
    /// [`close_error`](Self::close_error)).
    pub(crate) fn begin<B>(req: &mut http::Request<B>, logging: &LoggingPolicy) -> (Self, bool) {
        let caller_log = req.extensions().get::<AttemptLog>().is_some();
        let (ctx, created) = Self::get_or_insert(req);
        let owner = created && !caller_log;
        if owner {
            ctx.0.log.apply(logging);
        }
        (ctx, owner)
    }

    // A poisoned lock only means another thread panicked mid-update; the values are still the
    // best there are.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads several values under one lock.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// Changes several values under one lock.
    pub(crate) fn write<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.lock())
    }

    /// The request's attempt log.
    pub fn log(&self) -> &AttemptLog {
        &self.0.log
    }

    /// The deadline of the whole request, if one is set.
    pub fn deadline(&self) -> Option<Deadline> {
        self.lock().deadline
    }

    /// Sets `deadline` unless an earlier one is set.
    pub fn tighten_deadline(&self, deadline: Deadline) {
        self.lock().tighten_deadline(deadline);
    }

    /// The retry budget retries and hops draw on, if an outer layer handed one down.
    pub fn retry_budget(&self) -> Option<RetryBudget> {
        self.lock().retry_budget.clone()
    }

    /// Hands `budget` down to the layers inside.
    pub fn set_retry_budget(&self, budget: RetryBudget) {
        self.lock().retry_budget = Some(budget);
    }

    /// The cap on attempts across the route chain, if one is set.
    pub fn attempt_cap(&self) -> Option<AttemptCap> {
        self.lock().attempt_cap
    }

    /// Sets `cap` unless a smaller one is set.
    pub fn tighten_attempt_cap(&self, cap: AttemptCap) {
        self.lock().tighten_attempt_cap(cap);
    }

    /// The route of the current attempt, if a layer (or the caller) named it.
    pub fn route(&self) -> Option<RouteName> {
        self.lock().route.clone()
    }

    /// Names the route of the attempts that follow.
    pub fn set_route(&self, route: RouteName) {
        self.lock().route = Some(route);
    }

    /// The route of the current attempt of `req`, whose context this is: the one named, else
    /// the URI's authority (then kept, so that the layers below do not work it out again).
    pub(crate) fn route_of<B>(&self, req: &http::Request<B>) -> RouteName {
        let mut s = self.lock();
        s.route
            .get_or_insert_with(|| RouteName::of_authority(req))
            .clone()
    }

    /// Whether the fallback chain has another route after the current one.
    pub fn fallback_available(&self) -> bool {
        self.lock().fallback_available
    }

    /// Says whether the fallback chain has another route after the current one.
    pub fn set_fallback_available(&self, available: bool) {
        self.lock().fallback_available = available;
    }

    /// The spend cap's gate for further attempts, if a spend cap is outside.
    pub fn spend_gate(&self) -> Option<SpendGate> {
        self.lock().spend.clone()
    }

    /// Puts a spend cap's gate in front of every further attempt.
    pub fn set_spend_gate(&self, gate: SpendGate) {
        self.lock().spend = Some(gate);
    }

    pub(crate) fn pacer(&self) -> Option<Arc<Pacer>> {
        self.lock().pacer.clone()
    }

    pub(crate) fn set_pacer(&self, pacer: Arc<Pacer>) {
        self.lock().pacer = Some(pacer);
    }

    /// The attempt being handed inward now, from a layer that passes a call on: the clock
    /// reading of a layer outside that sent the same attempt, or a new one.
    pub(crate) fn send(&self) -> Sent {
        let mark = self.0.log.attempt_count();
        let mut s = self.lock();
        let at = match s.sent {
            Some((m, at)) if m == mark => at,
            _ => {
                let now = Instant::now();
                s.sent = Some((mark, now));
                now
            }
        };
        Sent { mark, at }
    }

    /// A new attempt made by this layer (a retry, a hop, a request let out of a queue): a new
    /// clock reading, handed to the layers below.
    pub(crate) fn resend(&self) -> Sent {
        let mark = self.0.log.attempt_count();
        let now = Instant::now();
        self.lock().sent = Some((mark, now));
        Sent { mark, at: now }
    }

    /// Records the attempt `sent` on `route` unless a layer nearer the transport already did;
    /// returns its index. `latency` is the time to the head or the error (until now when
    /// `None`); `error` describes a transport failure by its kind and class only, never by a
    /// transport's own message (which may carry a URL, and with it a key).
    pub(crate) fn record(
        &self,
        sent: &Sent,
        route: &RouteName,
        latency: Option<Duration>,
        c: &Classification,
        error: Option<String>,
    ) -> usize {
        let log = &self.0.log;
        log.record_since(sent.mark, || {
            let latency = latency.unwrap_or_else(|| sent.at.elapsed());
            let mut a = Attempt::new(Some(route.clone()), log.offset_of(sent.at), latency, c);
            a.error = error;
            a
        })
    }

    /// The time from `sent` to now, unless a layer nearer the transport already recorded that
    /// attempt (then nobody needs it, and the clock is not read).
    pub(crate) fn head_latency(&self, sent: &Sent) -> Option<Duration> {
        self.0
            .log
            .recorded_since(sent.mark)
            .is_none()
            .then(|| sent.at.elapsed())
    }

    /// Records a transport failure `e` of the attempt `sent` (unless a layer nearer the
    /// transport did), classified by its classification, else its class, else as `Transport`.
    pub(crate) fn record_error(&self, sent: &Sent, route: &RouteName, e: &Error) -> usize {
        let c = e.classification().cloned().unwrap_or_else(|| {
            Classification::failure(e.class().unwrap_or(FailureClass::Transport))
        });
        self.record(sent, route, None, &c, Some(e.to_string()))
    }

    /// The owner's last step for a response: the outcome (from the failure class a crate layer
    /// stored in the response, else its status) and the log in the response extensions.
    /// Layers that do not own the log hand the response on as it is.
    pub(crate) fn close_response<T>(
        &self,
        owner: bool,
        mut response: http::Response<T>,
    ) -> http::Response<T> {
        if owner {
            let class = response
                .extensions()
                .get::<Classification>()
                .and_then(|c| c.class);
            let status = response.status();
            let failed = status.is_client_error() || status.is_server_error();
            let status = status.as_u16();
            self.0.log.set_outcome(match class {
                None if !failed => Outcome::Success { status },
                class => Outcome::ProviderFailure { status, class },
            });
            response.extensions_mut().insert(self.0.log.clone());
        }
        response
    }

    /// The owner's last step for an error: the outcome, and the request's end. Every layer
    /// attaches the log.
    pub(crate) fn close_error(&self, owner: bool, error: Error) -> Error {
        if owner {
            self.0.log.set_outcome(Outcome::Error {
                error: error.kind().to_string(),
                class: error.class(),
            });
            let noted = self.lock().observed.take();
            if let Some(noted) = noted {
                let error_kind = Some(crate::observe::kind_name(error.kind()));
                noted.finish(
                    &self.0.log,
                    Ended {
                        error_kind,
                        json_usage: None,
                    },
                );
            }
        }
        error.with_log(&self.0.log)
    }

    /// The outermost layer's step after [`close_response`](Self::close_response): the request
    /// ends now, or — when its observer reads whole answers, or a spend reservation
    /// `settles` when the body ends — once the body has ended (or failed, or been dropped).
    /// Without an observer noted, the body is handed on as it is.
    pub(crate) fn end_response<B>(
        &self,
        owner: bool,
        response: http::Response<B>,
        settles: bool,
    ) -> http::Response<Body>
    where
        B: http_body::Body<Data = Bytes, Error = Error> + Send + 'static,
    {
        let noted = if owner {
            self.lock().observed.take()
        } else {
            None
        };
        let Some(noted) = noted else {
            return response.map(Body::new);
        };
        let whole = noted.observer().watches_bodies();
        if !whole && !settles {
            noted.finish(&self.0.log, Ended::default());
            return response.map(Body::new);
        }
        let (parts, body) = response.into_parts();
        // A JSON answer's usage, when no spend settlement books it.
        let json = (whole && !settles && parts.status.is_success() && is_json(&parts.headers))
            .then_some(crate::classify::DEFAULT_PEEK_LIMIT);
        let body = Watched::new(body, self.0.log.clone(), noted, json);
        http::Response::from_parts(parts, Body::new(body))
    }

    /// Whether two handles share one context.
    pub fn ptr_eq(&self, other: &RequestContext) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for RequestContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("RequestContext")
            .field("deadline", &s.deadline)
            .field("attempt_cap", &s.attempt_cap)
            .field("route", &s.route)
            .field("fallback_available", &s.fallback_available)
            .field("spend_gate", &s.spend.is_some())
            .finish_non_exhaustive()
    }
}

fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"))
}

/// One attempt a layer handed inward: the log's attempt count then (the recording rule: a
/// layer records the attempt only if no layer nearer the transport did) and when.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    pub(crate) mark: usize,
    pub(crate) at: Instant,
}
