//! The per-route state machine and its sliding window.
//!
//! Concurrency shape, and why:
//!
//! - The state (`Closed`, `Open`, …) and a generation number are atomics, so admitting a call
//!   while closed is two atomic loads — no lock.
//! - The sliding window is a ring of time buckets whose counters are atomics. Recording an
//!   outcome into the current bucket is a few `fetch_add`s. Only when a bucket has to be
//!   *rotated* (its slot still holds an older time span) is a tiny per-route mutex taken, so
//!   that two recorders never both zero the same slot; that happens once per bucket width at
//!   most, not once per call.
//! - Everything that is not the closed fast path — trips, open timers, half-open probe slots,
//!   forced states — runs under a per-route mutex, where it is rare and cheap.
//!
//! The generation number changes on every transition. Each admitted call carries the generation
//! it was admitted in, so that an outcome from before a trip never counts against the state
//! after it (a late success from a closed period must not close a half-open circuit).

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::handle::{CircuitState, RouteSnapshot, ThrottleSnapshot};
use super::layer::Shared;
use super::throttle::Throttle;
use crate::RouteName;
use crate::attempt_log::LocalEventKind;
use crate::error::ErrorKind;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;
const FORCED_OPEN: u8 = 3;
const FORCED_CLOSED: u8 = 4;

fn decode(s: u8) -> CircuitState {
    match s {
        OPEN => CircuitState::Open,
        HALF_OPEN => CircuitState::HalfOpen,
        FORCED_OPEN => CircuitState::ForcedOpen,
        FORCED_CLOSED => CircuitState::ForcedClosed,
        _ => CircuitState::Closed,
    }
}

fn encode(s: CircuitState) -> u8 {
    match s {
        CircuitState::Closed => CLOSED,
        CircuitState::Open => OPEN,
        CircuitState::HalfOpen => HALF_OPEN,
        CircuitState::ForcedOpen => FORCED_OPEN,
        CircuitState::ForcedClosed => FORCED_CLOSED,
    }
}

/// How an admitted call ended, as far as the provider's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The provider answered well.
    Success,
    /// A failure of a class that counts for the breaker.
    Failure,
    /// Says nothing about the provider's health (an invalid request, auth, quota): neither a
    /// success nor a failure.
    Neutral,
    /// Neutral for the breaker, but the provider refused the call (a rate limit the breaker
    /// does not count): not an accept for the throttle.
    Refused,
}

impl Verdict {
    /// Whether the provider accepted the call, for the throttle.
    pub(crate) fn accepted(self) -> bool {
        matches!(self, Verdict::Success | Verdict::Neutral)
    }

    /// Neither a success nor a failure for the breaker.
    fn neutral(self) -> bool {
        matches!(self, Verdict::Neutral | Verdict::Refused)
    }
}

/// Response extension: the call that got this failed response left its route's circuit open.
/// A retry on the same route would only be turned away, so a request with a backup moves on at
/// once (see `RetryLayer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CircuitOpened;

/// Response extension: the route, which the request has no backup for, is in an outage young
/// enough to wait out; `.0` is the time until its throttle's window moves on. The retry layer
/// holds a waiting request instead of spending an attempt (see `ThrottlePolicy::hold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WaitOut(pub(crate) Duration);

/// The young outage a refused response's route is in, if it is (see [`WaitOut`]).
pub(crate) fn wait_out<B>(response: &http::Response<B>) -> Option<Duration> {
    response.extensions().get::<WaitOut>().map(|w| w.0)
}

/// Marks `response` when its failure left `route`'s circuit open.
pub(crate) fn mark_if_opened<B>(
    response: &mut http::Response<B>,
    verdict: Verdict,
    route: &RouteState,
) {
    if verdict == Verdict::Failure && route.state().is_open() {
        response.extensions_mut().insert(CircuitOpened);
    }
}

/// Whether the call that got `response` left its route's circuit open.
pub(crate) fn opened_circuit<B>(response: &http::Response<B>) -> bool {
    response.extensions().get::<CircuitOpened>().is_some()
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The circuit is open: time until a probe is admitted.
    Open(Duration),
    /// The route has no backup and the throttle turned the call away: time until its floor
    /// lets the next call through.
    Throttled(Duration),
}

impl Refusal {
    /// The attempt-log event of the refusal.
    pub(crate) fn event(self) -> LocalEventKind {
        match self {
            Refusal::Open(retry_in) => LocalEventKind::CircuitOpen { retry_in },
            Refusal::Throttled(retry_in) => LocalEventKind::Throttled { retry_in },
        }
    }

    /// The error kind of the refusal.
    pub(crate) fn kind(self, route: RouteName) -> ErrorKind {
        match self {
            Refusal::Open(retry_in) => ErrorKind::CircuitOpen { route, retry_in },
            Refusal::Throttled(retry_in) => ErrorKind::Throttled { route, retry_in },
        }
    }
}

/// A state change, emitted after the route's lock is released.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transition {
    pub(crate) from: CircuitState,
    pub(crate) to: CircuitState,
    /// The open time, when `to` is `Open`.
    pub(crate) open_for: Option<Duration>,
    /// Consecutive trips so far (the `k` in `open_base × 2^k`).
    pub(crate) trips: u32,
}

/// One time bucket of the window. `epoch` is the bucket's time span number plus one (`0`: never
/// used), so that a slot still holding an older span is recognised and rotated.
#[derive(Default)]
struct Bucket {
    epoch: AtomicU64,
    calls: AtomicU32,
    failures: AtomicU32,
    slow: AtomicU32,
}

/// Counts over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

/// A ring of time buckets: old outcomes age out bucket by bucket, whatever the state does.
pub(crate) struct Window {
    buckets: Box<[Bucket]>,
    width_nanos: u64,
    rotate: Mutex<()>,
}

impl Window {
    fn new(window: Duration, buckets: u32) -> Self {
        let n = buckets.max(1);
        let width = (window.as_nanos() / u128::from(n)).clamp(1, u128::from(u64::MAX)) as u64;
        Self {
            buckets: (0..n).map(|_| Bucket::default()).collect(),
            width_nanos: width,
            rotate: Mutex::new(()),
        }
    }

    fn lock_rotate(&self) -> MutexGuard<'_, ()> {
        self.rotate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The span number (plus one) of `elapsed` since the route's origin.
    fn epoch(&self, elapsed: Duration) -> u64 {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        (nanos / self.width_nanos).saturating_add(1)
    }

    fn slot(&self, epoch: u64) -> &Bucket {
        &self.buckets[(epoch % self.buckets.len() as u64) as usize]
    }

    /// Records one call; returns the epoch it went into.
    fn record(&self, elapsed: Duration, failure: bool, slow: bool) -> u64 {
        let e = self.epoch(elapsed);
        let b = self.slot(e);
        if b.epoch.load(Ordering::Acquire) < e {
            let _guard = self.lock_rotate();
            if b.epoch.load(Ordering::Acquire) < e {
                // Zero before publishing the new epoch: a recorder that sees the new epoch
                // (Acquire) also sees the zeros, so its increment is never wiped.
                b.calls.store(0, Ordering::Relaxed);
                b.failures.store(0, Ordering::Relaxed);
                b.slow.store(0, Ordering::Relaxed);
                b.epoch.store(e, Ordering::Release);
            }
        }
        b.calls.fetch_add(1, Ordering::Relaxed);
        if failure {
            b.failures.fetch_add(1, Ordering::Relaxed);
        }
        if slow {
            b.slow.fetch_add(1, Ordering::Relaxed);
        }
        e
    }

    /// Turns a success already counted in bucket `epoch` into a failure; `false` when that
    /// bucket has rotated away since (the success aged out, so nothing is left to convert).
    fn convert_to_failure(&self, epoch: u64) -> bool {
        let b = self.slot(epoch);
        if b.epoch.load(Ordering::Acquire) != epoch {
            return false;
        }
        b.failures.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn totals(&self, elapsed: Duration) -> Totals {
        let e = self.epoch(elapsed);
        let n = self.buckets.len() as u64;
        let mut t = Totals::default();
        for b in self.buckets.iter() {
            let be = b.epoch.load(Ordering::Acquire);
            // Inside the window: one of the last `n` spans (or a racing newer one).
            if be != 0 && be.saturating_add(n) > e {
                t.calls = t.calls.saturating_add(b.calls.load(Ordering::Relaxed));
                t.failures = t
                    .failures
                    .saturating_add(b.failures.load(Ordering::Relaxed));
                t.slow = t.slow.saturating_add(b.slow.load(Ordering::Relaxed));
            }
        }
        t
    }

    fn clear(&self) {
        let _guard = self.lock_rotate();
        for b in self.buckets.iter() {
            b.epoch.store(0, Ordering::Release);
            b.calls.store(0, Ordering::Relaxed);
            b.failures.store(0, Ordering::Relaxed);
            b.slow.store(0, Ordering::Relaxed);
        }
    }
}

/// What only changes on the slow path.
struct Control {
    open_until: Option<Instant>,
    /// Consecutive trips since the circuit last closed.
    trips: u32,
    probes: u32,
    /// Probes that succeeded in a row since the circuit went half-open.
    probe_successes: u32,
    /// What the fleet (a shared health store) granted, and what is still to be told to it.
    fleet: FleetControl,
}

impl FleetControl {
    /// A probe slot that was used without deciding anything serves the next probe.
    fn reuse(&mut self) {
        if self.managed {
            self.slots = self.slots.saturating_add(1);
        }
    }

    fn trip(&mut self, open_for: Duration) {
        if self.managed {
            self.tripped = Some(open_for);
            self.closed = false;
            self.slots = 0;
        }
    }

    fn close(&mut self) {
        if self.managed {
            self.closed = true;
            self.tripped = None;
            self.slots = 0;
        }
    }
}

/// A route's part in a fleet of replicas: the probe slots the store granted this replica and
/// has not seen used, and what the next exchange tells the store.
#[derive(Debug, Default)]
struct FleetControl {
    /// A health store is attached: probes need a slot from it.
    managed: bool,
    slots: u32,
    release: u32,
    tripped: Option<Duration>,
    closed: bool,
}

/// The breaker of one route.
pub(crate) struct RouteState {
    pub(crate) name: RouteName,
    origin: Instant,
    state: AtomicU8,
    generation: AtomicU64,
    consecutive: AtomicU32,
    /// Calls admitted while closed that have no outcome yet. They count in the failure rate's
    /// denominator: model APIs fail in milliseconds but answer in seconds, so the calls that
    /// have ended are, early in a window, mostly the failures.
    in_flight: AtomicU32,
    window: Option<Window>,
    /// Adaptive throttling for the calls that have no backup route.
    throttle: Option<Throttle>,
    /// Outcomes recorded while closed since the last exchange with the health store; only
    /// counted when there is one.
    fleet_outcomes: Option<(AtomicU32, AtomicU32)>,
    control: Mutex<Control>,
}

/// A call the breaker let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// A call while closed, admitted in `generation`.
    Normal { generation: u64 },
    /// A half-open probe holding a slot.
    Probe { generation: u64 },
    /// The route is forced closed: nothing is recorded.
    Untracked,
    /// A call with no backup route that the throttle let through while the circuit is open
    /// (or half-open with every probe slot taken): it counts for the throttle only.
    Bypass,
}

impl RouteState {
    pub(crate) fn new(name: RouteName, shared: &Shared) -> Self {
        let window = shared
            .config
            .policy
            .failure_rate
            .map(|r| Window::new(r.window, r.buckets));
        Self {
            name,
            origin: Instant::now(),
            state: AtomicU8::new(CLOSED),
            generation: AtomicU64::new(0),
            consecutive: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            window,
            throttle: shared.config.policy.throttle.as_ref().map(Throttle::new),
            fleet_outcomes: shared
                .fleet()
                .map(|_| (AtomicU32::new(0), AtomicU32::new(0))),
            control: Mutex::new(Control {
                open_until: None,
                trips: 0,
                probes: 0,
                probe_successes: 0,
                fleet: FleetControl {
                    managed: shared.fleet().is_some(),
                    ..FleetControl::default()
                },
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        // A poisoned lock only means a user callback panicked elsewhere; the state is intact.
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.origin)
    }

    pub(crate) fn state(&self) -> CircuitState {
        decode(self.state.load(Ordering::Acquire))
    }

    /// Sets the state and starts a new generation; the caller holds the control lock.
    fn set_state(&self, to: u8) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.state.store(to, Ordering::Release);
    }

    /// Admits a call or says why not. `backup`: the request has another route to go to
    /// ([`FallbackAvailable`](crate::context::FallbackAvailable)). With one, the circuit
    /// decides (fail fast, so the fallback moves on); without one, the throttle does (when the
    /// policy has it), and a call it lets through goes to the provider whatever the circuit
    /// says — as a probe when the circuit is due for one.
    pub(crate) fn admit(
        &self,
        shared: &Shared,
        now: Instant,
        backup: bool,
    ) -> Result<Admission, Refusal> {
        let throttle = match &self.throttle {
            Some(t) if !backup => t,
            _ => return self.admit_circuit(shared, now).map_err(Refusal::Open),
        };
        // The handle's word stands over the throttle's.
        match self.state.load(Ordering::Acquire) {
            FORCED_OPEN => return Err(Refusal::Open(shared.config.policy.open_cap)),
            FORCED_CLOSED => return Ok(Admission::Untracked),
            _ => {}
        }
        throttle
            .admit(self.elapsed(now), || shared.throttle_draw())
            .map_err(Refusal::Throttled)?;
        Ok(self.admit_circuit(shared, now).unwrap_or(Admission::Bypass))
    }

    /// The circuit's admission: a call or how long until the route takes one.
    fn admit_circuit(&self, shared: &Shared, now: Instant) -> Result<Admission, Duration> {
        // Load the generation before the state: if the state is still closed the generation
        // is at least as new as the closed period the call is admitted in.
        let generation = self.generation.load(Ordering::Acquire);
        match self.state.load(Ordering::Acquire) {
            CLOSED => return Ok(self.normal(generation)),
            FORCED_CLOSED => return Ok(Admission::Untracked),
            _ => {}
        }
        let mut c = self.lock();
        let generation = self.generation.load(Ordering::Acquire);
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(self.normal(generation)),
            FORCED_CLOSED => Ok(Admission::Untracked),
            FORCED_OPEN => Err(shared.config.policy.open_cap),
            OPEN => {
                let until = c.open_until.unwrap_or(now);
                if now < until {
                    return Err(until - now);
                }
                // In a fleet a probe goes only with a slot the store granted this replica.
                if c.fleet.managed {
                    if c.fleet.slots == 0 {
                        return Err(super::fleet::EXCHANGE_EVERY);
                    }
                    c.fleet.slots -= 1;
                }
                self.set_state(HALF_OPEN);
                let generation = self.generation.load(Ordering::Acquire);
                c.open_until = None;
                c.probes = 1;
                c.probe_successes = 0;
                let t = Transition {
                    from: CircuitState::Open,
                    to: CircuitState::HalfOpen,
                    open_for: None,
                    trips: c.trips,
                };
                drop(c);
                shared.emit(&self.name, t);
                Ok(Admission::Probe { generation })
            }
            _ => {
                // Half-open.
                let slot = !c.fleet.managed || c.fleet.slots > 0;
                if c.probes < shared.config.policy.half_open_probes && slot {
                    c.probes += 1;
                    if c.fleet.managed {
                        c.fleet.slots -= 1;
                    }
                    Ok(Admission::Probe { generation })
                } else {
                    // A slot frees the moment a probe ends; there is no timer to report.
                    Err(Duration::ZERO)
                }
            }
        }
    }

    fn normal(&self, generation: u64) -> Admission {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Admission::Normal { generation }
    }

    /// Counts a call let through as in flight, for the throttle; returns when it started.
    pub(crate) fn started(&self, admission: Admission, now: Instant) -> Option<Duration> {
        let t = self.throttle.as_ref()?;
        if admission == Admission::Untracked {
            return None;
        }
        let at = self.elapsed(now);
        t.start(at);
        Some(at)
    }

    /// A call admitted while closed ended without an outcome (its future was dropped);
    /// `started`: what [`started`](Self::started) returned for it.
    pub(crate) fn abandon(&self, admission: Admission, started: Option<Duration>) {
        if let (Some(t), Some(s)) = (&self.throttle, started) {
            t.unstart(s);
        }
        match admission {
            Admission::Normal { .. } => self.landed(),
            Admission::Probe { generation } => self.release_probe(generation),
            Admission::Untracked | Admission::Bypass => {}
        }
    }

    fn landed(&self) {
        // Saturating, defensively: the count never wraps below zero.
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Records how an admitted call ended. `slow` is whether its response head came later than
    /// the slow-call threshold. Returns the window epoch a success went into (so a later body
    /// failure can convert it), if it went into one.
    pub(crate) fn complete(
        &self,
        shared: &Shared,
        admission: Admission,
        verdict: Verdict,
        slow: bool,
        now: Instant,
        started: Option<Duration>,
    ) -> Option<u64> {
        if let (Some(t), false) = (&self.throttle, admission == Admission::Untracked) {
            t.record(self.elapsed(now), started, verdict.accepted());
        }
        match admission {
            Admission::Untracked | Admission::Bypass => None,
            Admission::Normal { generation } => {
                self.landed();
                if verdict.neutral() || !self.current(generation, CLOSED) {
                    return None;
                }
                self.record_closed(shared, generation, verdict == Verdict::Failure, slow, now)
            }
            Admission::Probe { generation } => {
                let mut c = self.lock();
                if !self.current(generation, HALF_OPEN) {
                    return None;
                }
                c.probes = c.probes.saturating_sub(1);
                // A slow probe shows no recovery when slowness is what the breaker watches.
                let slow_counts = slow && shared.config.policy.slow_call.is_some();
                let t = match verdict {
                    // No health evidence: the slot is free again, the circuit stays half-open.
                    Verdict::Neutral | Verdict::Refused => {
                        c.fleet.reuse();
                        return None;
                    }
                    Verdict::Success if !slow_counts => {
                        // One good answer does not make a route that fails half its calls
                        // healthy: the circuit closes after `half_open_successes` in a row.
                        c.probe_successes = c.probe_successes.saturating_add(1);
                        if c.probe_successes < shared.config.policy.half_open_successes {
                            c.fleet.reuse();
                            return None;
                        }
                        self.close(&mut c, CircuitState::HalfOpen)
                    }
                    _ => self.open(shared, &mut c, CircuitState::HalfOpen, now),
                };
                drop(c);
                shared.emit(&self.name, t);
                None
            }
        }
    }

    /// A success recorded at the response head whose body then failed with a counting class.
    pub(crate) fn body_failed(
        &self,
        shared: &Shared,
        admission: Admission,
        epoch: Option<u64>,
        now: Instant,
    ) {
        if let Admission::Probe { generation } = admission {
            if self.current(generation, HALF_OPEN) {
                // Its head counted towards closing; a broken stream is a failed probe.
                self.trip(shared, generation, CircuitState::HalfOpen, now);
                return;
            }
        }
        if admission == Admission::Untracked || self.state.load(Ordering::Acquire) != CLOSED {
            // Already open (or forced): nothing to add.
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        let same_period = match admission {
            Admission::Normal { generation: g } | Admission::Probe { generation: g } => {
                g == generation
            }
            Admission::Untracked | Admission::Bypass => false,
        };
        // The head counted a success in the same closed period: turn it into a failure
        // instead of adding a second call for one request.
        let converted = same_period
            && matches!((epoch, &self.window), (Some(e), Some(w)) if w.convert_to_failure(e));
        if converted {
            self.consecutive.fetch_add(1, Ordering::AcqRel);
            self.judge(shared, generation, now);
        } else {
            self.record_closed(shared, generation, true, false, now);
        }
    }

    /// The body of a response counted as a success ended cleanly or was dropped by the caller
    /// (an abandoned answer is not the provider's failure): the run of failures is broken.
    pub(crate) fn body_ended(&self, admission: Admission) {
        if let Admission::Normal { generation } = admission {
            if self.current(generation, CLOSED) {
                self.consecutive.store(0, Ordering::Release);
            }
        }
    }

    /// A probe that ended without an outcome (its future or body was dropped) gives its slot
    /// back.
    fn release_probe(&self, generation: u64) {
        let mut c = self.lock();
        if self.current(generation, HALF_OPEN) {
            c.probes = c.probes.saturating_sub(1);
            // Its fleet slot goes back to the store, for any replica's next probe.
            if c.fleet.managed {
                c.fleet.release = c.fleet.release.saturating_add(1);
            }
        }
    }

    fn current(&self, generation: u64, state: u8) -> bool {
        self.state.load(Ordering::Acquire) == state
            && self.generation.load(Ordering::Acquire) == generation
    }

    fn record_closed(
        &self,
        shared: &Shared,
        generation: u64,
        failure: bool,
        slow: bool,
        now: Instant,
    ) -> Option<u64> {
        let epoch = self
            .window
            .as_ref()
            .map(|w| w.record(self.elapsed(now), failure, slow));
        if let Some((ok, failed)) = &self.fleet_outcomes {
            if failure { failed } else { ok }.fetch_add(1, Ordering::Relaxed);
        }
        // A success resets the consecutive count only once its body has ended well (see
        // `body_ended`): a stream that fails after a good head must not break the run.
        if failure {
            self.consecutive.fetch_add(1, Ordering::AcqRel);
        }
        // A success lowers both rates, so only failures and slow calls can trip.
        if failure || slow {
            self.judge(shared, generation, now);
        }
        epoch
    }

    /// Trips the breaker if a rule says so.
    fn judge(&self, shared: &Shared, generation: u64, now: Instant) {
        let p = &shared.config.policy;
        let mut trip = p
            .consecutive_failures
            .is_some_and(|n| self.consecutive.load(Ordering::Acquire) >= n);
        if !trip {
            if let (Some(rule), Some(w)) = (&p.failure_rate, &self.window) {
                let t = w.totals(self.elapsed(now));
                if t.calls >= rule.min_calls {
                    // Calls still in flight have not failed (yet): without them a window
                    // would judge the fast failures before the slow answers had come back.
                    // Not for the slow-call rate: a call still in flight may well be slow.
                    let pending = self.in_flight.load(Ordering::Acquire);
                    let sent = f64::from(t.calls) + f64::from(pending);
                    let ended = f64::from(t.calls);
                    trip = f64::from(t.failures) / sent >= rule.threshold
                        || p.slow_call
                            .is_some_and(|s| f64::from(t.slow) / ended >= s.rate);
                }
            }
        }
        if trip {
            self.trip(shared, generation, CircuitState::Closed, now);
        }
    }

    /// Opens the circuit from `from` (closed or half-open) if it is still in that state and
    /// `generation`: another recorder may have tripped it already.
    fn trip(&self, shared: &Shared, generation: u64, from: CircuitState, now: Instant) {
        let mut c = self.lock();
        if !self.current(generation, encode(from)) {
            return;
        }
        let t = self.open(shared, &mut c, from, now);
        drop(c);
        shared.emit(&self.name, t);
    }

    /// Opens for `open_base × 2^k` (capped, jittered downward), `k` the consecutive trips.
    fn open(
        &self,
        shared: &Shared,
        c: &mut Control,
        from: CircuitState,
        now: Instant,
    ) -> Transition {
        let p = &shared.config.policy;
        let exp = p
            .open_base
            .checked_mul(1u32.checked_shl(c.trips.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(p.open_cap)
            .min(p.open_cap);
        let open_for = shared.jitter_open(exp);
        c.open_until = Some(crate::duration::saturating_add(now, open_for));
        c.trips = c.trips.saturating_add(1);
        c.probes = 0;
        c.probe_successes = 0;
        c.fleet.trip(open_for);
        self.set_state(OPEN);
        Transition {
            from,
            to: CircuitState::Open,
            open_for: Some(open_for),
            trips: c.trips,
        }
    }

    fn close(&self, c: &mut Control, from: CircuitState) -> Transition {
        c.fleet.close();
        c.open_until = None;
        c.trips = 0;
        c.probes = 0;
        c.probe_successes = 0;
        self.consecutive.store(0, Ordering::Release);
        // The outcomes that tripped it must not trip it again the moment it closes.
        if let Some(w) = &self.window {
            w.clear();
        }
        self.set_state(CLOSED);
        Transition {
            from,
            to: CircuitState::Closed,
            open_for: None,
            trips: 0,
        }
    }

    /// Forces a state from the handle; `None` when nothing changed.
    pub(crate) fn force(&self, to: CircuitState) -> Option<Transition> {
        let mut c = self.lock();
        let from = self.state();
        if from == to {
            return None;
        }
        if to == CircuitState::Closed {
            return Some(self.close(&mut c, from));
        }
        c.open_until = None;
        c.probes = 0;
        c.probe_successes = 0;
        self.set_state(encode(to));
        Some(Transition {
            from,
            to,
            open_for: None,
            trips: c.trips,
        })
    }

    /// What the next exchange tells the health store; taken, so that it is told once.
    pub(crate) fn fleet_report(&self, shared: &Shared) -> super::fleet::HealthReport {
        let (successes, failures) = match &self.fleet_outcomes {
            Some((ok, failed)) => (
                ok.swap(0, Ordering::Relaxed),
                failed.swap(0, Ordering::Relaxed),
            ),
            None => (0, 0),
        };
        let mut c = self.lock();
        let now = Instant::now();
        let probing = match self.state.load(Ordering::Acquire) {
            HALF_OPEN => true,
            OPEN => c.open_until.is_none_or(|u| now >= u),
            _ => false,
        };
        let want = if probing {
            shared
                .config
                .policy
                .half_open_probes
                .saturating_sub(c.probes.saturating_add(c.fleet.slots))
        } else {
            0
        };
        super::fleet::HealthReport {
            successes,
            failures,
            tripped: c.fleet.tripped.take(),
            closed: std::mem::take(&mut c.fleet.closed),
            want_probes: want,
            release_probes: std::mem::take(&mut c.fleet.release),
        }
    }

    /// An exchange failed: what it was to tell is told at the next one.
    pub(crate) fn fleet_unreport(&self, r: super::fleet::HealthReport) {
        if let Some((ok, failed)) = &self.fleet_outcomes {
            ok.fetch_add(r.successes, Ordering::Relaxed);
            failed.fetch_add(r.failures, Ordering::Relaxed);
        }
        let mut c = self.lock();
        c.fleet.tripped = c.fleet.tripped.or(r.tripped);
        c.fleet.closed |= r.closed;
        c.fleet.release = c.fleet.release.saturating_add(r.release_probes);
    }

    /// Follows the fleet's view of the route: open where any replica tripped it, half-open
    /// (with the slots granted) when its open time has passed, closed when another replica's
    /// probes closed it.
    pub(crate) fn fleet_apply(
        &self,
        shared: &Shared,
        view: super::fleet::FleetHealth,
        now: Instant,
    ) {
        use super::fleet::FleetState;
        let mut c = self.lock();
        let state = self.state.load(Ordering::Acquire);
        if matches!(state, FORCED_OPEN | FORCED_CLOSED) {
            return;
        }
        let t = match view.state {
            FleetState::Open(left) => {
                c.fleet.slots = 0;
                let until = crate::duration::saturating_add(now, left);
                match state {
                    OPEN if c.open_until.is_some_and(|u| u >= until) => None,
                    OPEN => {
                        c.open_until = Some(until);
                        None
                    }
                    _ => {
                        // Tripped elsewhere: open here too, for as long as the fleet says.
                        let from = decode(state);
                        c.open_until = Some(until);
                        c.probes = 0;
                        c.probe_successes = 0;
                        self.set_state(OPEN);
                        Some(Transition {
                            from,
                            to: CircuitState::Open,
                            open_for: Some(left),
                            trips: c.trips,
                        })
                    }
                }
            }
            FleetState::HalfOpen => {
                c.fleet.slots = c.fleet.slots.saturating_add(view.granted);
                if state == OPEN {
                    // The fleet's open time is over: probe as soon as a slot allows.
                    c.open_until = Some(now);
                }
                None
            }
            // A trip made since the report was taken is told at the next exchange.
            FleetState::Closed if c.fleet.tripped.is_some() => None,
            FleetState::Closed => {
                c.fleet.slots = 0;
                match state {
                    OPEN | HALF_OPEN => {
                        let t = self.close(&mut c, decode(state));
                        // Closed by the fleet: nothing to tell it back.
                        c.fleet.closed = false;
                        Some(t)
                    }
                    _ => None,
                }
            }
        };
        drop(c);
        if let Some(t) = t {
            shared.emit(&self.name, t);
        }
    }

    /// When the route is in an outage young enough to wait out: the time until its
    /// throttle's window moves on.
    pub(crate) fn wait_out(&self, now: Instant) -> Option<Duration> {
        let t = self.throttle.as_ref()?;
        let elapsed = self.elapsed(now);
        t.young_outage(elapsed).then(|| t.next_move(elapsed))
    }

    /// The throttle's probability of turning a call with no backup away now; `None` without a
    /// throttle.
    pub(crate) fn throttle_probability(&self, now: Instant) -> Option<f64> {
        self.throttle
            .as_ref()
            .map(|t| t.probability(self.elapsed(now)))
    }

    pub(crate) fn snapshot(&self, now: Instant) -> RouteSnapshot {
        let c = self.lock();
        let t = self
            .window
            .as_ref()
            .map(|w| w.totals(self.elapsed(now)))
            .unwrap_or_default();
        let state = self.state();
        RouteSnapshot {
            route: self.name.clone(),
            state,
            calls: t.calls,
            failures: t.failures.min(t.calls),
            slow_calls: t.slow,
            consecutive_failures: self.consecutive.load(Ordering::Acquire),
            trips: c.trips,
            retry_in: match state {
                CircuitState::Open => c.open_until.map(|u| u.saturating_duration_since(now)),
                _ => None,
            },
            probes_in_flight: c.probes,
            calls_in_flight: self.in_flight.load(Ordering::Acquire),
            throttle: self.throttle.as_ref().map(|t| {
                let elapsed = self.elapsed(now);
                let counts = t.counts(elapsed);
                ThrottleSnapshot {
                    requests: counts.requests,
                    accepts: counts.accepts,
                    refusing_for: t.refusing_for(elapsed),
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_ages_out_old_buckets() {
        let w = Window::new(Duration::from_secs(60), 12);
        for _ in 0..9 {
            w.record(Duration::ZERO, true, false);
        }
        assert_eq!(w.totals(Duration::from_secs(54)).failures, 9);
        // 60 s later the first bucket's span has left the window.
        assert_eq!(w.totals(Duration::from_secs(60)), Totals::default());
        w.record(Duration::from_secs(61), true, false);
        let t = w.totals(Duration::from_secs(61));
        assert_eq!((t.calls, t.failures), (1, 1));
    }

    #[test]
    fn a_reused_slot_is_rotated_not_added_to() {
        let w = Window::new(Duration::from_secs(10), 2);
        w.record(Duration::from_secs(1), false, false);
        w.record(Duration::from_secs(1), false, true);
        // Same slot, two widths later.
        w.record(Duration::from_secs(11), true, false);
        let t = w.totals(Duration::from_secs(11));
        assert_eq!((t.calls, t.failures, t.slow), (1, 1, 0));
    }

    #[test]
    fn conversion_only_within_the_same_bucket() {
        let w = Window::new(Duration::from_secs(10), 2);
        let e = w.record(Duration::from_secs(1), false, false);
        assert!(w.convert_to_failure(e));
        w.record(Duration::from_secs(11), false, false);
        assert!(!w.convert_to_failure(e));
    }
}
