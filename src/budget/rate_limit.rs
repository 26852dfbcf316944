//! Client-side admission: token buckets for requests and model tokens, paced routes, and the
//! FIFO queue of requests waiting for capacity.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::store::{BudgetStore, RateDemand, Refusal as StoreRefusal, StoreFuture};
use crate::RouteName;
use crate::pacing::Pacer;
use crate::policy::{AdmissionMode, RateKey, RateLimitPolicy};

/// The rate limits, converted to cell rates.
#[derive(Debug, Clone)]
pub(crate) struct RateConfig {
    requests: Option<(Duration, u64)>,
    tokens: Option<(Duration, u64)>,
    pub(crate) key: RateKey,
}

impl RateConfig {
    pub(crate) fn new(p: &RateLimitPolicy) -> Self {
        Self {
            requests: p
                .requests_per_second
                .map(|rps| (per_unit(1.0 / rps), u64::from(p.burst))),
            tokens: p
                .tokens_per_minute
                .map(|tpm| (per_unit(60.0 / tpm as f64), tpm)),
            key: p.key,
        }
    }

    /// Whether the token estimate of a request is needed.
    pub(crate) fn counts_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    /// What one request with `tokens` estimated tokens takes.
    pub(crate) fn demands(&self, tokens: u64) -> Vec<RateDemand> {
        let mut d = Vec::with_capacity(2);
        if let Some((per, cap)) = self.requests {
            d.push(RateDemand::new("requests", per, cap, 1));
        }
        if let Some((per, cap)) = self.tokens {
            // A request larger than the whole bucket waits for a full bucket.
            d.push(RateDemand::new("tokens", per, cap, tokens.max(1)));
        }
        d
    }
}

fn per_unit(secs: f64) -> Duration {
    // Validated finite and positive; at least a nanosecond so the rate stays a rate.
    Duration::try_from_secs_f64(secs)
        .unwrap_or(Duration::MAX)
        .max(Duration::from_nanos(1))
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Capacity comes back in (at least) this long.
    RateLimited(Duration),
    /// The request's deadline passes before capacity.
    Deadline,
    /// The store of the buckets could not be asked; why.
    Unavailable(String),
}

/// The admission state shared by every clone of the service.
pub(crate) struct Gate {
    pub(crate) mode: AdmissionMode,
    pub(crate) store: Arc<dyn BudgetStore>,
    pub(crate) pacer: Option<Arc<Pacer>>,
    /// The primary route and the backups its requests may go to when the provider paused it
    /// (the policy lets rate limits switch routes): such a request is not held for the
    /// primary while one of them has room; the fallback layer sends it there at once.
    pub(crate) around: Option<(RouteName, Vec<RouteName>)>,
    lines: Mutex<Lines>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("mode", &self.mode)
            .field("queued", &self.lines().queued)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Lines {
    next_id: u64,
    queued: usize,
    by_key: HashMap<String, Line>,
}

/// The waiters of one key, first come first served.
#[derive(Debug, Default)]
struct Line {
    waiters: VecDeque<(u64, Option<Waker>)>,
    // When the head expects capacity; the best guess for those behind it.
    head_ready_at: Option<Instant>,
}

/// Rate-limit buckets of routes: each one's key and route.
pub(crate) type Buckets = Arc<[(String, RouteName)]>;

/// What a request asks of the gate.
#[derive(Debug, Clone)]
pub(crate) struct Ask {
    /// Bucket key (route or owner).
    pub(crate) key: String,
    /// Line key: bucket key and route, so a paused route holds up only its own line.
    pub(crate) line: String,
    pub(crate) route: RouteName,
    pub(crate) demands: Vec<RateDemand>,
    pub(crate) deadline: Option<Instant>,
    /// Backups (bucket key, route) the request may be admitted on instead when its own
    /// route's bucket has no room and it found no line: the fallback layer then sends it there
    /// at once rather than the request waiting or being turned away.
    pub(crate) backups: Option<Buckets>,
}

/// The gate's answer.
// Returned once and taken apart at once: boxing the waiter would allocate for every request
// a shared store answers later.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Admit {
    Now,
    Refused(Refusal),
    Queued(Waiter),
}

impl Gate {
    pub(crate) fn new(mode: AdmissionMode, store: Arc<dyn BudgetStore>, pacing: bool) -> Self {
        Self {
            mode,
            store,
            pacer: pacing.then(Arc::default),
            around: None,
            lines: Mutex::new(Lines::default()),
        }
    }

    fn lines(&self) -> MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests waiting in line right now.
    pub(crate) fn queued(&self) -> usize {
        self.lines().queued
    }

    /// Asks for capacity now: the route must not be paused and every bucket must have room.
    fn try_now(&self, ask: &Ask) -> StoreFuture<Result<(), StoreRefusal>> {
        if let Some(pacer) = &self.pacer {
            if let Some(left) = pacer.remaining(&ask.route) {
                let backup_has_room = self.around.as_ref().is_some_and(|(primary, backups)| {
                    *primary == ask.route && backups.iter().any(|b| pacer.remaining(b).is_none())
                });
                if !backup_has_room {
                    return StoreFuture::ready(Err(StoreRefusal::Rate(left)));
                }
            }
        }
        if ask.demands.is_empty() {
            return StoreFuture::ready(Ok(()));
        }
        self.store.take(&ask.key, &ask.demands)
    }

    /// Decides at once, or puts the request at the back of its key's line. A store that cannot
    /// answer at once is asked by the waiter.
    pub(crate) fn admit(self: &Arc<Self>, ask: Ask) -> Admit {
        let now = Instant::now();
        let waiting = self
            .lines()
            .by_key
            .get(&ask.line)
            .is_some_and(|l| !l.waiters.is_empty());
        if waiting {
            return self.enqueue(ask, None, now);
        }
        let mut take = self.try_now(&ask);
        match take.now() {
            Some(answer) => self.first_answer(ask, answer, now),
            None => Admit::Queued(Waiter::trying(self.clone(), ask, take, now)),
        }
    }

    /// What the store's first answer to a request that found no line means.
    fn first_answer(
        self: &Arc<Self>,
        ask: Ask,
        answer: Result<(), StoreRefusal>,
        now: Instant,
    ) -> Admit {
        match answer {
            Ok(()) => Admit::Now,
            Err(StoreRefusal::Rate(retry_in)) if ask.backups.is_some() => {
                // A backup's bucket may have room: the waiter asks them in turn.
                Admit::Queued(Waiter::around(self.clone(), ask, retry_in, now))
            }
            Err(StoreRefusal::Rate(retry_in)) => self.enqueue(ask, Some(retry_in), now),
            Err(other) => Admit::Refused(unavailable(other)),
        }
    }

    /// Asks backup `i`'s bucket for the request's demands.
    fn take_backup(&self, ask: &Ask, i: usize) -> Option<StoreFuture<Result<(), StoreRefusal>>> {
        let (key, _) = ask.backups.as_deref()?.get(i)?;
        Some(self.store.take(key, &ask.demands))
    }

    /// Puts the request at the back of its line, or refuses it: in reject mode, with a full
    /// queue, or when its wait is already known to be too long. `retry_in` is the store's
    /// answer when the request found no line; `None` when others wait before it.
    fn enqueue(self: &Arc<Self>, ask: Ask, retry_in: Option<Duration>, now: Instant) -> Admit {
        match self.join(&ask, retry_in, now) {
            Ok(place) => Admit::Queued(Waiter::queued(self.clone(), ask, place, now)),
            Err(refusal) => Admit::Refused(refusal),
        }
    }

    fn join(&self, ask: &Ask, retry_in: Option<Duration>, now: Instant) -> Result<Place, Refusal> {
        let mut lines = self.lines();
        let waiting = retry_in.is_none();
        let retry_in = retry_in.unwrap_or_else(|| {
            // Those in line go first; an estimate of our wait is when the head gets in.
            lines
                .by_key
                .get(&ask.line)
                .and_then(|l| l.head_ready_at)
                .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
        });
        let AdmissionMode::Queue {
            max_wait,
            max_queued,
        } = self.mode
        else {
            return Err(Refusal::RateLimited(retry_in));
        };
        if lines.queued >= max_queued as usize {
            return Err(Refusal::RateLimited(retry_in));
        }
        let wait_limit = crate::duration::saturating_add(now, max_wait);
        let (until, by_deadline) = match ask.deadline {
            Some(d) if d < wait_limit => (d, true),
            _ => (wait_limit, false),
        };
        if !waiting && crate::duration::saturating_add(now, retry_in) > until {
            // Known now that the wait would be too long: say so at once.
            return Err(if by_deadline {
                Refusal::Deadline
            } else {
                Refusal::RateLimited(retry_in)
            });
        }
        let id = lines.next_id;
        lines.next_id += 1;
        lines.queued += 1;
        let line = lines.by_key.entry(ask.line.clone()).or_default();
        if !waiting || line.waiters.is_empty() {
            line.head_ready_at = Some(crate::duration::saturating_add(now, retry_in));
        }
        line.waiters.push_back((id, None));
        Ok(Place {
            id,
            until,
            by_deadline,
        })
    }

    /// Takes waiter `id` out of its line and returns the waker of the new head, if any.
    fn leave(lines: &mut Lines, key: &str, id: u64) -> Option<Waker> {
        let line = lines.by_key.get_mut(key)?;
        let pos = line.waiters.iter().position(|(w, _)| *w == id)?;
        line.waiters.remove(pos);
        lines.queued = lines.queued.saturating_sub(1);
        if line.waiters.is_empty() {
            lines.by_key.remove(key);
            return None;
        }
        if pos == 0 {
            line.head_ready_at = None;
            return line.waiters.front_mut().and_then(|(_, w)| w.take());
        }
        None
    }
}

/// A request's place in its line.
#[derive(Debug, Clone, Copy)]
struct Place {
    id: u64,
    until: Instant,
    by_deadline: bool,
}

/// A request waiting for capacity: for the store's first answer, or in line. Dropping it gives
/// its place up at once.
pub(crate) struct Waiter {
    gate: Arc<Gate>,
    ask: Ask,
    /// In line; `None` while the first answer is awaited.
    place: Option<Place>,
    /// The store's answer in flight: the first ask, or the head's.
    taking: Option<StoreFuture<Result<(), StoreRefusal>>>,
    since: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
    /// Asking the backups' buckets, after the request's own route had no room (boxed: the
    /// rarer path keeps the common waiter small).
    around: Option<Box<Around>>,
    /// The backup it was admitted on, if it was.
    rerouted: Option<(RouteName, Duration)>,
}

/// Where the asking of the backups' buckets stands.
struct Around {
    /// When the request's own route has room again.
    retry_in: Duration,
    /// The backup asked now.
    next: usize,
    taking: Option<StoreFuture<Result<(), StoreRefusal>>>,
}

impl Around {
    fn new(retry_in: Duration) -> Self {
        Self {
            retry_in,
            next: 0,
            taking: None,
        }
    }
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("key", &self.ask.line)
            .field("place", &self.place.map(|p| p.id))
            .finish_non_exhaustive()
    }
}

impl Waiter {
    fn trying(
        gate: Arc<Gate>,
        ask: Ask,
        take: StoreFuture<Result<(), StoreRefusal>>,
        now: Instant,
    ) -> Self {
        Self {
            gate,
            ask,
            place: None,
            taking: Some(take),
            since: now,
            sleep: None,
            done: false,
            around: None,
            rerouted: None,
        }
    }

    /// A request whose own route had no room, asking the backups' buckets before it waits.
    fn around(gate: Arc<Gate>, ask: Ask, retry_in: Duration, now: Instant) -> Self {
        Self {
            gate,
            ask,
            place: None,
            taking: None,
            since: now,
            sleep: None,
            done: false,
            around: Some(Box::new(Around::new(retry_in))),
            rerouted: None,
        }
    }

    fn queued(gate: Arc<Gate>, ask: Ask, place: Place, now: Instant) -> Self {
        Self {
            gate,
            ask,
            place: Some(place),
            taking: None,
            since: now,
            sleep: None,
            done: false,
            around: None,
            rerouted: None,
        }
    }

    /// Leaves the line (waking the new head) and ends with `out`.
    fn leave<T>(&mut self, out: T) -> Poll<T> {
        self.done = true;
        if let Some(place) = self.place {
            let next = Gate::leave(&mut self.gate.lines(), &self.ask.line, place.id);
            if let Some(w) = next {
                w.wake();
            }
        }
        Poll::Ready(out)
    }

    /// Ready with how long it waited once admitted, or with the refusal.
    pub(crate) fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<Result<Duration, Refusal>> {
        if let Some(around) = self.around.as_mut() {
            loop {
                if around.taking.is_none() {
                    match self.gate.take_backup(&self.ask, around.next) {
                        Some(take) => around.taking = Some(take),
                        None => {
                            // No backup had room: the request waits for its own route.
                            let retry_in = around.retry_in;
                            self.around = None;
                            match self.gate.join(&self.ask, Some(retry_in), Instant::now()) {
                                Ok(place) => self.place = Some(place),
                                Err(refusal) => return self.leave(Err(refusal)),
                            }
                            break;
                        }
                    }
                }
                let Some(take) = around.taking.as_mut() else {
                    break;
                };
                let answer = ready!(Pin::new(take).poll(cx));
                around.taking = None;
                match answer {
                    Ok(()) => {
                        let backups = self.ask.backups.as_deref().unwrap_or_default();
                        let route = backups.get(around.next).map(|(_, r)| r.clone());
                        let retry_in = around.retry_in;
                        self.around = None;
                        self.rerouted = route.map(|r| (r, retry_in));
                        return self.leave(Ok(Duration::ZERO));
                    }
                    // A backup with no room, or whose store cannot answer: the next one.
                    Err(_) => around.next += 1,
                }
            }
        }
        loop {
            if let Some(take) = self.taking.as_mut() {
                let answer = ready!(Pin::new(take).poll(cx));
                self.taking = None;
                let now = Instant::now();
                let Some(place) = self.place else {
                    // The first answer, for a request that found no line.
                    match answer {
                        Ok(()) => return self.leave(Ok(Duration::ZERO)),
                        Err(StoreRefusal::Rate(retry_in)) => {
                            match self.gate.join(&self.ask, Some(retry_in), now) {
                                Ok(place) => self.place = Some(place),
                                Err(refusal) => return self.leave(Err(refusal)),
                            }
                            continue;
                        }
                        Err(other) => return self.leave(Err(unavailable(other))),
                    }
                };
                match answer {
                    Ok(()) => return self.leave(Ok(now.saturating_duration_since(self.since))),
                    Err(StoreRefusal::Rate(retry_in)) => {
                        let at = crate::duration::saturating_add(now, retry_in);
                        if at > place.until {
                            return self.leave(Err(refusal_of(place, retry_in)));
                        }
                        if let Some(line) = self.gate.lines().by_key.get_mut(&self.ask.line) {
                            line.head_ready_at = Some(at);
                        }
                        ready!(self.sleep_until(at, cx));
                        continue;
                    }
                    Err(other) => return self.leave(Err(unavailable(other))),
                }
            }
            let Some(place) = self.place else {
                return self.leave(Err(Refusal::Unavailable("no answer".to_owned())));
            };
            let now = Instant::now();
            let mut lines = self.gate.lines();
            let is_head = lines
                .by_key
                .get(&self.ask.line)
                .and_then(|l| l.waiters.front())
                .is_some_and(|(id, _)| *id == place.id);
            if is_head {
                drop(lines);
                self.taking = Some(self.gate.try_now(&self.ask));
                continue;
            }
            let head_ready_at = lines.by_key.get_mut(&self.ask.line).and_then(|line| {
                if let Some((_, w)) = line.waiters.iter_mut().find(|(id, _)| *id == place.id) {
                    *w = Some(cx.waker().clone());
                }
                line.head_ready_at
            });
            drop(lines);
            if now >= place.until {
                let retry_in =
                    head_ready_at.map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
                return self.leave(Err(refusal_of(place, retry_in)));
            }
            ready!(self.sleep_until(place.until, cx));
        }
    }

    fn sleep_until(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let sleep = match &mut self.sleep {
            Some(s) => {
                s.as_mut().reset(at);
                s
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        sleep.as_mut().poll(cx)
    }

    /// Time since it joined the line.
    pub(crate) fn waited(&self) -> Duration {
        self.since.elapsed()
    }

    /// Whether it joined a line (rather than being answered by the store's first answer).
    pub(crate) fn joined(&self) -> bool {
        self.place.is_some()
    }

    /// The backup the request was admitted on, with when its own route has room again.
    pub(crate) fn rerouted(&self) -> Option<&(RouteName, Duration)> {
        self.rerouted.as_ref()
    }
}

fn refusal_of(place: Place, retry_in: Duration) -> Refusal {
    if place.by_deadline {
        Refusal::Deadline
    } else {
        Refusal::RateLimited(retry_in)
    }
}

fn unavailable(refusal: StoreRefusal) -> Refusal {
    match refusal {
        StoreRefusal::Unavailable(reason) => Refusal::Unavailable(reason),
        other => Refusal::Unavailable(format!("{other:?}")),
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(place) = self.place {
            let next = Gate::leave(&mut self.gate.lines(), &self.ask.line, place.id);
            if let Some(w) = next {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::MemoryStore;
    use super::*;

    fn gate(mode: AdmissionMode) -> Arc<Gate> {
        Arc::new(Gate::new(mode, Arc::new(MemoryStore::new()), false))
    }

    fn ask(rps_interval_ms: u64) -> Ask {
        Ask {
            key: "k".to_owned(),
            line: "k|r".to_owned(),
            route: RouteName::new("r"),
            demands: vec![RateDemand::new(
                "requests",
                Duration::from_millis(rps_interval_ms),
                1,
                1,
            )],
            deadline: None,
            backups: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reject_mode_reports_the_exact_wait() {
        let g = gate(AdmissionMode::Reject);
        assert!(matches!(g.admit(ask(500)), Admit::Now));
        tokio::time::advance(Duration::from_millis(120)).await;
        match g.admit(ask(500)) {
            Admit::Refused(r) => {
                assert_eq!(r, Refusal::RateLimited(Duration::from_millis(380)))
            }
            _ => panic!("expected a refusal"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_waiters_leave_the_line() {
        let g = gate(AdmissionMode::Queue {
            max_wait: Duration::from_secs(10),
            max_queued: 1,
        });
        assert!(matches!(g.admit(ask(1000)), Admit::Now));
        let Admit::Queued(w) = g.admit(ask(1000)) else {
            panic!("expected to queue")
        };
        assert!(matches!(g.admit(ask(1000)), Admit::Refused(_)));
        drop(w);
        assert_eq!(g.lines().queued, 0);
        assert!(g.lines().by_key.is_empty());
        assert!(matches!(g.admit(ask(1000)), Admit::Queued(_)));
    }
}
