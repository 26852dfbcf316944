//! Client-side admission: token buckets for requests and model tokens, paced routes, and the
//! FIFO queue of requests waiting for capacity.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::store::{BudgetStore, RateDemand};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Capacity comes back in (at least) this long.
    RateLimited(Duration),
    /// The request's deadline passes before capacity.
    Deadline,
}

/// The admission state shared by every clone of the service.
pub(crate) struct Gate {
    pub(crate) mode: AdmissionMode,
    pub(crate) store: Arc<dyn BudgetStore>,
    pub(crate) pacer: Option<Arc<Pacer>>,
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
}

/// The gate's answer.
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

    /// Capacity right now: the route must not be paused and every bucket must have room.
    fn try_now(&self, ask: &Ask) -> Result<(), Duration> {
        if let Some(left) = self.pacer.as_ref().and_then(|p| p.remaining(&ask.route)) {
            return Err(left);
        }
        if ask.demands.is_empty() {
            return Ok(());
        }
        self.store.take(&ask.key, &ask.demands)
    }

    /// Decides at once, or puts the request at the back of its key's line.
    pub(crate) fn admit(self: &Arc<Self>, ask: Ask) -> Admit {
        let now = Instant::now();
        let mut lines = self.lines();
        let waiting = lines
            .by_key
            .get(&ask.line)
            .is_some_and(|l| !l.waiters.is_empty());
        let retry_in = if waiting {
            // Those in line go first; an estimate of our wait is when the head gets in.
            lines
                .by_key
                .get(&ask.line)
                .and_then(|l| l.head_ready_at)
                .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
        } else {
            match self.try_now(&ask) {
                Ok(()) => return Admit::Now,
                Err(retry_in) => retry_in,
            }
        };
        let AdmissionMode::Queue {
            max_wait,
            max_queued,
        } = self.mode
        else {
            return Admit::Refused(Refusal::RateLimited(retry_in));
        };
        if lines.queued >= max_queued as usize {
            return Admit::Refused(Refusal::RateLimited(retry_in));
        }
        let wait_limit = crate::duration::saturating_add(now, max_wait);
        let (until, by_deadline) = match ask.deadline {
            Some(d) if d < wait_limit => (d, true),
            _ => (wait_limit, false),
        };
        if !waiting && crate::duration::saturating_add(now, retry_in) > until {
            // Known now that the wait would be too long: say so at once.
            return Admit::Refused(if by_deadline {
                Refusal::Deadline
            } else {
                Refusal::RateLimited(retry_in)
            });
        }
        let id = lines.next_id;
        lines.next_id += 1;
        lines.queued += 1;
        let line = lines.by_key.entry(ask.line.clone()).or_default();
        if !waiting {
            line.head_ready_at = Some(crate::duration::saturating_add(now, retry_in));
        }
        line.waiters.push_back((id, None));
        Admit::Queued(Waiter {
            gate: self.clone(),
            ask,
            id,
            since: now,
            until,
            by_deadline,
            sleep: None,
            done: false,
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

/// A request waiting in line. Dropping it gives its place up at once.
pub(crate) struct Waiter {
    gate: Arc<Gate>,
    ask: Ask,
    id: u64,
    since: Instant,
    until: Instant,
    by_deadline: bool,
    sleep: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("key", &self.ask.line)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Waiter {
    /// Ready with how long it waited once admitted, or with the refusal.
    pub(crate) fn poll_admit(&mut self, cx: &mut Context<'_>) -> Poll<Result<Duration, Refusal>> {
        loop {
            let now = Instant::now();
            let mut lines = self.gate.lines();
            let is_head = lines
                .by_key
                .get(&self.ask.line)
                .and_then(|l| l.waiters.front())
                .is_some_and(|(id, _)| *id == self.id);
            let wake_at;
            if is_head {
                match self.gate.try_now(&self.ask) {
                    Ok(()) => {
                        let next = Gate::leave(&mut lines, &self.ask.line, self.id);
                        drop(lines);
                        self.done = true;
                        if let Some(w) = next {
                            w.wake();
                        }
                        return Poll::Ready(Ok(now.saturating_duration_since(self.since)));
                    }
                    Err(retry_in) => {
                        let at = crate::duration::saturating_add(now, retry_in);
                        if at > self.until {
                            let next = Gate::leave(&mut lines, &self.ask.line, self.id);
                            drop(lines);
                            self.done = true;
                            if let Some(w) = next {
                                w.wake();
                            }
                            return Poll::Ready(Err(self.refusal(retry_in)));
                        }
                        if let Some(line) = lines.by_key.get_mut(&self.ask.line) {
                            line.head_ready_at = Some(at);
                        }
                        wake_at = at;
                    }
                }
            } else {
                let head_ready_at = lines.by_key.get_mut(&self.ask.line).and_then(|line| {
                    if let Some((_, w)) = line.waiters.iter_mut().find(|(id, _)| *id == self.id) {
                        *w = Some(cx.waker().clone());
                    }
                    line.head_ready_at
                });
                if now >= self.until {
                    let next = Gate::leave(&mut lines, &self.ask.line, self.id);
                    drop(lines);
                    self.done = true;
                    if let Some(w) = next {
                        w.wake();
                    }
                    let retry_in =
                        head_ready_at.map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
                    return Poll::Ready(Err(self.refusal(retry_in)));
                }
                wake_at = self.until;
            }
            drop(lines);
            let sleep = match &mut self.sleep {
                Some(s) => {
                    s.as_mut().reset(wake_at);
                    s
                }
                None => self
                    .sleep
                    .insert(Box::pin(tokio::time::sleep_until(wake_at))),
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Time since it joined the line.
    pub(crate) fn waited(&self) -> Duration {
        self.since.elapsed()
    }

    fn refusal(&self, retry_in: Duration) -> Refusal {
        if self.by_deadline {
            Refusal::Deadline
        } else {
            Refusal::RateLimited(retry_in)
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let next = Gate::leave(&mut self.gate.lines(), &self.ask.line, self.id);
        if let Some(w) = next {
            w.wake();
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
