//! Adaptive throttling of a route a request has no backup for (Google SRE book, "Handling
//! Overload": client-side throttling).
//!
//! An all-or-nothing breaker is right when a backup exists: failing fast lets the fallback move
//! on. Without one it sheds a provider that still answers half its calls and keeps a recovered
//! provider dark for the open time. The throttle instead turns a call away with probability
//! `max(0, (requests − k × accepts) / (requests + 1))` over a sliding window, so it sheds in
//! proportion to what the provider refuses, and lets load back as soon as calls succeed again.
//!
//! Counting, and why it differs from the book:
//!
//! - A call counts as a request when it *ends* (its response head or error), not when it
//!   starts: model APIs fail in milliseconds and answer in seconds, so counting at the start
//!   would hold the slow successes as requests without accepts and throttle a healthy route.
//! - A call the throttle turns away is not counted. In the book it is a request, which drives
//!   the probability towards 1 while the backend stays down; but then, at an accept rate of
//!   exactly `1 / k` (a route failing half its calls, `k = 2`), every probability is a fixed
//!   point — each rejection raises `requests` just enough to justify itself — and a cold start,
//!   whose first calls to end are the fast failures, locks the throttle in: the outage
//!   simulator served 996 of 4 883 requests that way at 50 % failures. Counting only the calls
//!   sent, a route that is down still sheds all but the floor's calls (`p = n / (n + 1)` for
//!   `n` failures), and one failing half its calls is not shed.
//! - Not accepted: the classes that count for the breaker (connect, timeout, overloaded, server
//!   errors, …) and rate limits, whatever the breaker does with them: a 429 is the provider
//!   refusing for load, the very case the rule was written for. Everything else the provider
//!   answered (a success, an invalid request, an auth error) was accepted. A stream that breaks
//!   after a good head was accepted; the breaker counts the break.
//! - A call still in flight that has outlived every refusal of the window (took longer than
//!   the slowest call that ended refused) counts as a request and an accept until it ends or
//!   is a window old (its start's bucket leaves the window; it counts again when it ends): a
//!   route that refuses in milliseconds and is answering again is seen to recover a refusal's
//!   time after the first call made after its recovery, not an answer's time (0.4–1.2 s in the
//!   simulator, seconds for a long completion). A route whose refusals are slow (timeouts) gets
//!   no such credit until a call outlives them, and none at all from refusals as slow as the
//!   window: their recovery is seen as accepts come in. In an outage older than `hold` (and than
//!   the window) a call that has outlived the outage's slowest refusal makes the throttle
//!   forget the outage's refusals: a route down for half a minute has filled the window with
//!   them, and one accept offsets only `k` refusals, so the requests that came before the
//!   recovered route's answers outnumbered them would fail fast for nothing. The outage's
//!   slowest, not the window's: of a window's ten-odd refusals the slowest is outlasted by one
//!   call in eleven while the route is still down. And only a call started since the last
//!   forget forgets again, so that a call hanging while the route refuses every other forgets
//!   the outage once.
//! - The floor: nothing is turned away while the window holds fewer than `min_requests`
//!   requests, nor while the current bucket has let fewer than its share of them through
//!   (`min_requests / buckets`, when that is at least one). A route that is down keeps
//!   receiving about `min_requests` calls per window, spread over it rather than in a burst
//!   each time an old bucket leaves, so a call reaches it soon after any moment it recovers;
//!   and a route that has seen one fast failure and no answer yet is not throttled.
//! - Waiting out a young outage: the throttle notes when the route last went from accepting
//!   to refusing; while that is less than the policy's `hold` ago, a call it turns away (or
//!   the route refuses) is marked so that the retry layer waits instead of failing (see
//!   [`ThrottlePolicy::hold`]). A flapping route is served by waiting — a request that meets
//!   a 5 s outage is answered when it ends — and one down for longer fails fast again, so that
//!   waiting requests do not sit on a route that is down for good.
//!
//! The window is a ring of time buckets with atomic counters, like the breaker's own: judging a
//! call is a few atomic loads, and a lock is taken only to rotate a bucket whose span has
//! passed. The random draw (seedable) is made only when the probability is above zero.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::classify::FailureClass;
use crate::policy::ThrottlePolicy;

/// The probability of turning a call away: `max(0, (requests − k × accepts) / (requests + 1))`.
pub(crate) fn probability(requests: u32, accepts: u32, k: f64) -> f64 {
    let r = f64::from(requests);
    ((r - k * f64::from(accepts)) / (r + 1.0)).max(0.0)
}

/// Whether a failure of `class` that the breaker does not count is still the provider
/// refusing the call, for the throttle: a rate limit.
pub(crate) fn refused_uncounted(class: FailureClass) -> bool {
    class == FailureClass::RateLimited
}

/// Requests and accepts over the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) requests: u32,
    pub(crate) accepts: u32,
}

#[derive(Default)]
struct Bucket {
    /// The bucket's span number plus one (`0`: never used).
    epoch: AtomicU64,
    requests: AtomicU32,
    accepts: AtomicU32,
    /// Calls started in this span that have not ended yet, packed with the span they belong
    /// to (see [`in_flight`]): a call that ends after its bucket moved on to a newer span does
    /// not take one off the newer span's count.
    in_flight: AtomicU64,
    /// When the latest call started in this span started, in nanoseconds since the origin:
    /// every call still in flight from it has been in flight since then at least.
    last_start: AtomicU64,
    /// Calls let through in this span.
    let_through: AtomicU32,
    /// The longest time to a refusal among the calls that ended in this span, in nanoseconds.
    refusal_max: AtomicU64,
}

/// A bucket's calls in flight, packed in one word with the span they were counted in (its low
/// 32 bits, which a bucket reused every `n` spans cannot confuse within 2³² spans), so that a
/// count and its span change together.
mod in_flight {
    use super::Bucket;
    use std::sync::atomic::Ordering;

    pub(super) fn pack(epoch: u64, n: u32) -> u64 {
        (epoch << 32) | u64::from(n)
    }

    fn span(v: u64) -> u64 {
        v >> 32
    }

    /// The count in `v` if it is of `b`'s current span, else none.
    pub(super) fn count(v: u64, b: &Bucket) -> u32 {
        let epoch = b.epoch.load(Ordering::Acquire);
        if span(v) == span(pack(epoch, 0)) {
            v as u32
        } else {
            0
        }
    }

    /// `v` with `delta` added to its count if it is of span `epoch` and stays within `u32`.
    pub(super) fn add(v: u64, epoch: u64, delta: i64) -> Option<u64> {
        if span(v) != span(pack(epoch, 0)) {
            return None;
        }
        let n = u32::try_from(i64::from(v as u32) + delta).ok()?;
        Some(pack(epoch, n))
    }
}

/// The throttle of one route. Times are the time elapsed since the route's origin.
pub(crate) struct Throttle {
    k: f64,
    min_requests: u32,
    buckets: Box<[Bucket]>,
    width_nanos: u64,
    rotate: Mutex<()>,
    hold: Duration,
    /// How old an outage must be for its refusals to be forgotten (see `forget_outage`):
    /// `hold`, and at least the window.
    forget_after: Duration,
    /// When the route last went from accepting to refusing calls, plus one (`0`: the last call
    /// to end was accepted, or none has ended).
    refusing_since: AtomicU64,
    /// The longest time to a refusal since the route last accepted a call, in nanoseconds: what
    /// a call must outlive for the outage to be forgotten (see `forget_outage`).
    outage_refusal_max: AtomicU64,
    /// When the current outage's refusals were last forgotten, plus one (`0`: not yet).
    forgot_at: AtomicU64,
    /// The floor's share of each bucket: calls let through in every span, whatever the
    /// probability (`0`: a floor smaller than the number of buckets is not spread).
    share: u32,
}

impl Throttle {
    pub(crate) fn new(policy: &ThrottlePolicy) -> Self {
        let n = policy.buckets.max(1);
        let width = (policy.window.as_nanos() / u128::from(n)).clamp(1, u128::from(u64::MAX));
        Self {
            k: policy.k,
            min_requests: policy.min_requests,
            buckets: (0..n).map(|_| Bucket::default()).collect(),
            width_nanos: width as u64,
            rotate: Mutex::new(()),
            hold: policy.hold,
            forget_after: policy.hold.max(policy.window),
            refusing_since: AtomicU64::new(0),
            outage_refusal_max: AtomicU64::new(0),
            forgot_at: AtomicU64::new(0),
            share: policy.min_requests / n,
        }
    }

    fn lock_rotate(&self) -> MutexGuard<'_, ()> {
        self.rotate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn epoch(&self, nanos: u64) -> u64 {
        (nanos / self.width_nanos).saturating_add(1)
    }

    fn slot(&self, epoch: u64) -> &Bucket {
        &self.buckets[(epoch % self.buckets.len() as u64) as usize]
    }

    /// Requests and accepts over the window ending at `elapsed`, a call still in flight that
    /// has outlived every refusal of the window counted as both (an old outage's refusals
    /// forgotten once one has outlived the outage's, see [`forget_outage`](Self::forget_outage)).
    pub(crate) fn counts(&self, elapsed: Duration) -> Counts {
        let (mut c, outlived) = self.forget_outage(elapsed);
        c.requests = c.requests.saturating_add(outlived);
        c.accepts = c.accepts.saturating_add(outlived);
        c
    }

    /// The calls that ended within the window ending at `elapsed`, and the calls still in
    /// flight that have outlived every refusal among them.
    fn tally(&self, elapsed: Duration) -> (Counts, u32) {
        let now = nanos(elapsed);
        let e = self.epoch(now);
        let mut c = Counts::default();
        let mut refusal_max = 0;
        for b in self.buckets.iter().filter(|b| self.in_window(b, e)) {
            c.requests = c
                .requests
                .saturating_add(b.requests.load(Ordering::Relaxed));
            c.accepts = c.accepts.saturating_add(b.accepts.load(Ordering::Relaxed));
            refusal_max = refusal_max.max(b.refusal_max.load(Ordering::Relaxed));
        }
        let outlived = self
            .outlasting(e, now, refusal_max)
            .fold(0u32, |n, (_, started)| n.saturating_add(started));
        (c, outlived)
    }

    /// The buckets in the window of span `e` whose calls still in flight, if any, have all
    /// been in flight for `d` nanoseconds at `now`, each with how many it has in flight.
    fn outlasting(&self, e: u64, now: u64, d: u64) -> impl Iterator<Item = (&Bucket, u32)> {
        self.buckets
            .iter()
            .filter(move |b| self.in_window(b, e))
            .filter_map(move |b| {
                // `started` before `last_start`, the reverse of `start`'s order: a call counted
                // here has its start time seen too, so a call that has only just started is
                // never taken for one that outlived the refusals.
                let started = in_flight::count(b.in_flight.load(Ordering::Acquire), b);
                let last = b.last_start.load(Ordering::Acquire);
                (last.saturating_add(d) <= now).then_some((b, started))
            })
    }

    /// Forgets the refusals of an outage that has lasted a whole window and longer than
    /// `hold` once a call in flight has outlived the slowest of them: the route is answering
    /// again. Without this a recovered route stays throttled until accepts outnumber the
    /// outage's refusals `k` to one — the floor's calls take an answer's time each to get
    /// there — and the requests that come meanwhile fail fast, as the outage is too old to wait
    /// out. As when a circuit closes, the outcomes that judged the outage do not judge the
    /// recovery. A route still down refuses the next calls, which the floor lets through, and
    /// is throttled again within a window. Returns the [`tally`](Self::tally) after.
    ///
    /// The witness must outlive every refusal since the route last accepted a call, not only
    /// the window's: of `n` refusals, one call in `n + 1` outlasts the slowest while the route
    /// is still down, and a window holds ten-odd. And it must have started after the last
    /// forget: a call that hangs while the route refuses every other forgets the outage once,
    /// not again and again.
    fn forget_outage(&self, elapsed: Duration) -> (Counts, u32) {
        let (c, outlived) = self.tally(elapsed);
        let old = self
            .refusing_for(elapsed)
            .is_some_and(|age| age >= self.forget_after);
        if !old || outlived == 0 || c.requests == 0 {
            return (c, outlived);
        }
        let forgot = self.forgot_at.load(Ordering::Relaxed);
        if !self.witnessed(elapsed, forgot) {
            return (c, outlived);
        }
        // The exchange makes one of racing callers the one that forgets.
        let at = nanos(elapsed).saturating_add(1);
        let exchanged =
            self.forgot_at
                .compare_exchange(forgot, at, Ordering::Relaxed, Ordering::Relaxed);
        if exchanged.is_err() {
            return (c, outlived);
        }
        for b in self.buckets.iter() {
            b.requests.store(0, Ordering::Relaxed);
            b.accepts.store(0, Ordering::Relaxed);
        }
        self.tally(elapsed)
    }

    /// Whether a call in flight at `elapsed` that started after the last forget (`forgot`,
    /// plus one; `0`: none) has outlived every refusal of the outage.
    fn witnessed(&self, elapsed: Duration, forgot: u64) -> bool {
        let now = nanos(elapsed);
        let e = self.epoch(now);
        let slowest = self.outage_refusal_max.load(Ordering::Relaxed);
        self.outlasting(e, now, slowest).any(|(b, started)| {
            // Every call of a span that began after the forget started after it.
            let begun = b.epoch.load(Ordering::Acquire).saturating_sub(1);
            let begun = begun.saturating_mul(self.width_nanos);
            begun.saturating_add(1) >= forgot && started > 0
        })
    }

    /// Whether `b` is inside the window of span `e`: one of the last `n` spans (or a racing
    /// newer one).
    fn in_window(&self, b: &Bucket, e: u64) -> bool {
        let be = b.epoch.load(Ordering::Acquire);
        be != 0 && be.saturating_add(self.buckets.len() as u64) > e
    }

    /// The bucket of the span `elapsed` is in, rotated to it if its span has passed.
    fn current(&self, elapsed: Duration) -> &Bucket {
        let e = self.epoch(nanos(elapsed));
        let b = self.slot(e);
        if b.epoch.load(Ordering::Acquire) < e {
            let _guard = self.lock_rotate();
            if b.epoch.load(Ordering::Acquire) < e {
                // Zero before publishing the new epoch, as in the breaker's window: a recorder
                // that sees the new epoch also sees the zeros.
                b.requests.store(0, Ordering::Relaxed);
                b.accepts.store(0, Ordering::Relaxed);
                b.in_flight.store(in_flight::pack(e, 0), Ordering::Relaxed);
                b.last_start.store(0, Ordering::Relaxed);
                b.let_through.store(0, Ordering::Relaxed);
                b.refusal_max.store(0, Ordering::Relaxed);
                b.epoch.store(e, Ordering::Release);
            }
        }
        b
    }

    /// A call let through at `elapsed` starts.
    pub(crate) fn start(&self, elapsed: Duration) {
        let e = self.epoch(nanos(elapsed));
        let b = self.current(elapsed);
        // The start time before the count, published by it (see `outlasting`).
        b.last_start.fetch_max(nanos(elapsed), Ordering::Relaxed);
        // Counted in its span only: a bucket a racing caller moved on is not its bucket, and
        // `unstart` will not find it there either.
        let _ = b
            .in_flight
            .fetch_update(Ordering::Release, Ordering::Relaxed, |v| {
                in_flight::add(v, e, 1)
            });
        b.let_through.fetch_add(1, Ordering::Relaxed);
    }

    /// The call started at `started` is no longer in flight (ended, or dropped without an
    /// outcome).
    pub(crate) fn unstart(&self, started: Duration) {
        let e = self.epoch(nanos(started));
        // A bucket reused for a newer span no longer counts the call: the span is checked in
        // the same atomic step as the count.
        let _ = self
            .slot(e)
            .in_flight
            .fetch_update(Ordering::Release, Ordering::Relaxed, |v| {
                in_flight::add(v, e, -1)
            });
    }

    /// The probability of turning a call away at `elapsed` (zero below the floor).
    pub(crate) fn probability(&self, elapsed: Duration) -> f64 {
        let c = self.counts(elapsed);
        if c.requests < self.min_requests {
            return 0.0;
        }
        if self.share > 0 {
            let e = self.epoch(nanos(elapsed));
            let b = self.slot(e);
            let let_through = match b.epoch.load(Ordering::Acquire) == e {
                true => b.let_through.load(Ordering::Relaxed),
                false => 0,
            };
            if let_through < self.share {
                return 0.0;
            }
        }
        probability(c.requests, c.accepts, self.k)
    }

    /// Counts one call that ended at `elapsed`, accepted by the provider or not; `started`:
    /// when it started, if [`start`](Self::start) counted it.
    pub(crate) fn record(&self, elapsed: Duration, started: Option<Duration>, accepted: bool) {
        if let Some(s) = started {
            self.unstart(s);
        }
        let b = self.current(elapsed);
        b.requests.fetch_add(1, Ordering::Relaxed);
        if accepted {
            b.accepts.fetch_add(1, Ordering::Relaxed);
            self.refusing_since.store(0, Ordering::Relaxed);
            self.outage_refusal_max.store(0, Ordering::Relaxed);
            self.forgot_at.store(0, Ordering::Relaxed);
        } else {
            if let Some(s) = started {
                let took = nanos(elapsed.saturating_sub(s));
                b.refusal_max.fetch_max(took, Ordering::Relaxed);
                self.outage_refusal_max.fetch_max(took, Ordering::Relaxed);
            }
            // Only the first refusal after an accept starts the outage.
            let since = nanos(elapsed).saturating_add(1);
            let _ = self.refusing_since.compare_exchange(
                0,
                since,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Whether the route is refusing calls and started less than `hold` before `elapsed`: an
    /// outage young enough for a request to wait out.
    pub(crate) fn young_outage(&self, elapsed: Duration) -> bool {
        self.refusing_for(elapsed)
            .is_some_and(|age| age < self.hold)
    }

    /// How long before `elapsed` the route went from accepting to refusing calls; `None` while
    /// the last call to end was accepted.
    pub(crate) fn refusing_for(&self, elapsed: Duration) -> Option<Duration> {
        match self.refusing_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(Duration::from_nanos(
                nanos(elapsed).saturating_sub(since - 1),
            )),
        }
    }

    /// The time until the window next moves on (its oldest bucket ages out).
    pub(crate) fn next_move(&self, elapsed: Duration) -> Duration {
        let now = nanos(elapsed);
        Duration::from_nanos(self.width_nanos - now % self.width_nanos)
    }

    /// Lets a call through at `elapsed`, or turns it away: `Err(retry_in)`, the time until the
    /// window next moves on (its oldest bucket ages out, and the probability with it). `draw`
    /// gives a uniform sample in `[0, 1)`; it is called only when the probability is above zero.
    pub(crate) fn admit(
        &self,
        elapsed: Duration,
        draw: impl FnOnce() -> f64,
    ) -> Result<(), Duration> {
        let p = self.probability(elapsed);
        if p <= 0.0 || draw() >= p {
            return Ok(());
        }
        Err(self.next_move(elapsed))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn throttle(window: Duration, buckets: u32, min_requests: u32) -> Throttle {
        Throttle::new(&ThrottlePolicy {
            k: 2.0,
            window,
            buckets,
            min_requests,
            hold: Duration::from_secs(5),
        })
    }

    fn record(t: &Throttle, at: Duration, requests: u32, accepts: u32) {
        for i in 0..requests {
            t.record(at, None, i < accepts);
        }
    }

    #[test]
    fn probability_is_the_sre_formula() {
        assert_eq!(probability(100, 25, 2.0), 50.0 / 101.0);
        assert_eq!(probability(100, 50, 2.0), 0.0);
        assert_eq!(probability(100, 100, 2.0), 0.0);
        assert_eq!(probability(100, 0, 2.0), 100.0 / 101.0);
        assert_eq!(probability(0, 0, 2.0), 0.0);
        assert_eq!(probability(10, 2, 3.0), 4.0 / 11.0);
    }

    #[test]
    fn the_window_gives_the_formula_its_counts() {
        let t = throttle(Duration::from_secs(10), 10, 1);
        record(&t, Duration::from_secs(3), 100, 25);
        assert_eq!(
            t.counts(Duration::from_secs(3)),
            Counts {
                requests: 100,
                accepts: 25
            }
        );
        assert_eq!(t.probability(Duration::from_secs(3)), 50.0 / 101.0);
    }

    #[test]
    fn nothing_is_turned_away_below_the_floor() {
        let t = throttle(Duration::from_secs(1), 10, 4);
        record(&t, Duration::ZERO, 3, 0);
        // Three failures and no answer: the formula says 3/4, the floor says go.
        assert_eq!(t.probability(Duration::ZERO), 0.0);
        assert_eq!(
            t.admit(Duration::ZERO, || unreachable!("no draw below the floor")),
            Ok(())
        );
        record(&t, Duration::ZERO, 1, 0);
        assert_eq!(t.probability(Duration::ZERO), 4.0 / 5.0);
    }

    #[test]
    fn the_window_slides_bucket_by_bucket() {
        // 1 s in 10 buckets of 100 ms.
        let t = throttle(Duration::from_secs(1), 10, 1);
        record(&t, Duration::ZERO, 10, 0);
        record(&t, 500 * MS, 10, 10);
        assert_eq!(t.probability(999 * MS), 0.0);
        // At 1 s the first bucket has left: ten accepts, no failures.
        assert_eq!(
            t.counts(Duration::from_secs(1)),
            Counts {
                requests: 10,
                accepts: 10
            }
        );
        record(&t, 1100 * MS, 30, 0);
        assert_eq!(t.probability(1100 * MS), 20.0 / 41.0);
        // At 1.5 s the accepts have left too; at 2.1 s everything has.
        assert_eq!(t.probability(1500 * MS), 30.0 / 31.0);
        assert_eq!(t.counts(2100 * MS), Counts::default());
        assert_eq!(t.probability(2100 * MS), 0.0);
    }

    #[test]
    fn a_reused_slot_starts_from_zero() {
        let t = throttle(Duration::from_secs(1), 2, 1);
        record(&t, 100 * MS, 5, 5);
        // The same slot, two widths later.
        record(&t, 1100 * MS, 1, 0);
        assert_eq!(
            t.counts(1100 * MS),
            Counts {
                requests: 1,
                accepts: 0
            }
        );
    }

    #[test]
    fn a_call_in_flight_longer_than_every_refusal_counts_as_accepted() {
        // 1 s in 10 buckets of 100 ms.
        let t = throttle(Duration::from_secs(1), 10, 1);
        // A refusal that took 50 ms.
        t.start(Duration::ZERO);
        t.record(50 * MS, Some(Duration::ZERO), false);
        // A call started at 120 ms: from 170 ms on it has been in flight longer than the
        // refusal took.
        t.start(120 * MS);
        let refused = Counts {
            requests: 1,
            accepts: 0,
        };
        assert_eq!(t.counts(169 * MS), refused);
        assert_eq!(
            t.counts(170 * MS),
            Counts {
                requests: 2,
                accepts: 1
            }
        );
        // Once it ends it counts as what it was, here a refusal that took 880 ms (at 1 s the
        // first refusal's bucket has left the window).
        t.record(Duration::from_secs(1), Some(120 * MS), false);
        assert_eq!(t.counts(Duration::from_secs(1)), refused);
        // A dropped call leaves the count too.
        t.start(Duration::from_secs(1));
        t.unstart(Duration::from_secs(1));
        assert_eq!(t.counts(1900 * MS).requests, 1);
    }

    #[test]
    fn an_old_outage_is_forgotten_once_a_call_outlives_its_refusals() {
        // 1 s in 10 buckets of 100 ms, hold 5 s. Refusing since 0.
        let t = throttle(Duration::from_secs(1), 10, 1);
        t.record(Duration::ZERO, None, false);
        // A refusal that took 50 ms, then ten more, at 5.6 s.
        t.start(5500 * MS);
        t.record(5550 * MS, Some(5500 * MS), false);
        record(&t, 5600 * MS, 10, 0);
        // A call started at 5.62 s outlives them all from 5.67 s on.
        t.start(5620 * MS);
        assert_eq!(t.probability(5669 * MS), 11.0 / 12.0);
        // Counted as an accept it would leave 10/13; the outage is forgotten instead.
        assert_eq!(t.probability(5670 * MS), 0.0);
        assert_eq!(
            t.counts(5670 * MS),
            Counts {
                requests: 1,
                accepts: 1
            }
        );
        // Refusals while it is still in flight are not forgotten: it witnessed the forget.
        record(&t, 5800 * MS, 4, 0);
        assert_eq!(t.probability(5800 * MS), 3.0 / 6.0);
        // The route was still down after all: the call's refusal counts too.
        t.record(6500 * MS, Some(5620 * MS), false);
        assert_eq!(t.probability(6500 * MS), 5.0 / 6.0);
        // An accept ends the outage; the next old one is forgotten again.
        t.record(6600 * MS, None, true);
        t.record(6700 * MS, None, false);
        t.start(12_000 * MS);
        record(&t, 12_050 * MS, 3, 0);
        assert_eq!(t.probability(12_300 * MS), 0.0);

        // An outage younger than `hold` keeps its refusals: its requests are waiting, and
        // the calls it lets through say whether it is over.
        let young = throttle(Duration::from_secs(1), 10, 1);
        young.record(Duration::from_secs(2), None, true);
        young.start(2500 * MS);
        young.record(2550 * MS, Some(2500 * MS), false);
        record(&young, 2600 * MS, 10, 0);
        young.start(2620 * MS);
        // Twelve ended (the accept at 2 s among them), and the call in flight.
        assert_eq!(young.probability(2750 * MS), 9.0 / 14.0);
    }

    #[test]
    fn an_outage_is_forgotten_by_a_call_outliving_its_slowest_refusal_after_the_last_forget() {
        // 1 s in 10 buckets of 100 ms, hold 5 s. Refusing since 0; the outage's slowest
        // refusal took 90 ms, long before the window.
        let t = throttle(Duration::from_secs(1), 10, 1);
        t.record(Duration::ZERO, None, false);
        t.start(Duration::from_secs(1));
        t.record(1090 * MS, Some(Duration::from_secs(1)), false);
        // The window's slowest took 50 ms.
        t.start(5500 * MS);
        t.record(5550 * MS, Some(5500 * MS), false);
        record(&t, 5600 * MS, 10, 0);
        t.start(5620 * MS);
        // Past the window's 50 ms the call counts as an accept, but the route has refused
        // slower calls in this outage: nothing is forgotten yet.
        assert_eq!(t.probability(5670 * MS), 10.0 / 13.0);
        assert_eq!(t.probability(5709 * MS), 10.0 / 13.0);
        // Past the outage's 90 ms it is.
        assert_eq!(
            t.counts(5710 * MS),
            Counts {
                requests: 1,
                accepts: 1
            }
        );
        // The route refuses again; the call that forgot cannot forget again.
        record(&t, 5800 * MS, 4, 0);
        assert_eq!(t.probability(5800 * MS), 3.0 / 6.0);
        // A call started after the forget can, once past the outage's 90 ms.
        t.start(5850 * MS);
        assert_eq!(t.probability(5939 * MS), 2.0 / 7.0);
        assert_eq!(
            t.counts(5940 * MS),
            Counts {
                requests: 2,
                accepts: 2
            }
        );
    }

    #[test]
    fn the_floor_lets_its_share_through_in_every_bucket() {
        // A floor of 20 over 10 buckets: two calls per 100 ms whatever the probability.
        let t = throttle(Duration::from_secs(1), 10, 20);
        for _ in 0..30 {
            t.start(Duration::ZERO);
            t.record(50 * MS, Some(Duration::ZERO), false);
        }
        assert_eq!(t.probability(150 * MS), 0.0);
        t.start(150 * MS);
        assert_eq!(t.probability(150 * MS), 0.0);
        t.start(160 * MS);
        assert_eq!(t.probability(170 * MS), 30.0 / 31.0);
        // The next bucket has its own share.
        assert_eq!(t.probability(200 * MS), 0.0);
        // A floor below the number of buckets is not spread.
        let small = throttle(Duration::from_secs(1), 10, 4);
        record(&small, Duration::ZERO, 4, 0);
        assert_eq!(small.probability(50 * MS), 4.0 / 5.0);
    }

    #[test]
    fn an_outage_is_young_from_its_first_refusal_after_an_accept_for_hold() {
        let t = throttle(Duration::from_secs(1), 10, 1);
        assert!(!t.young_outage(Duration::ZERO), "no call has ended");
        t.record(Duration::from_secs(1), None, true);
        assert!(!t.young_outage(Duration::from_secs(1)), "the route accepts");
        t.record(Duration::from_secs(2), None, false);
        // Later refusals do not move the outage's start.
        t.record(Duration::from_secs(4), None, false);
        assert!(t.young_outage(Duration::from_secs(2)));
        assert!(t.young_outage(7 * Duration::from_secs(1) - MS));
        assert!(
            !t.young_outage(Duration::from_secs(7)),
            "5 s old: fail fast"
        );
        // An accept ends it; the next refusal starts a new one.
        t.record(Duration::from_secs(8), None, true);
        assert!(!t.young_outage(Duration::from_secs(8)));
        t.record(Duration::from_secs(9), None, false);
        assert!(t.young_outage(Duration::from_secs(13)));
        assert!(!t.young_outage(Duration::from_secs(14)));
    }

    #[test]
    fn a_call_is_turned_away_when_the_draw_falls_below_the_probability() {
        let t = throttle(Duration::from_secs(1), 10, 1);
        record(&t, Duration::ZERO, 100, 25);
        let p = 50.0 / 101.0;
        assert_eq!(t.admit(230 * MS, || p - 1e-9), Err(70 * MS));
        assert_eq!(t.admit(230 * MS, || p), Ok(()));
        // A healthy window never draws.
        let healthy = throttle(Duration::from_secs(1), 10, 1);
        record(&healthy, Duration::ZERO, 10, 5);
        assert_eq!(healthy.admit(Duration::ZERO, || unreachable!()), Ok(()));
    }
}
