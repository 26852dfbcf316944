//! Hedging: what a chain's requests share about hedges (the delay per route, the cap on how
//! many are started), and the hedge of one request, boxed so that a stack without hedging
//! carries none of it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use http::Request;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::RouteName;
use crate::context::{Sent, SpendDenied, SpendGate};
use crate::policy::HedgePolicy;
use crate::store::StoreFuture;

/// Times to first token kept per route for the percentile.
const SAMPLES: usize = 256;

/// The most hedges in hand (and at the start).
const RESERVE: f64 = 10.0;

/// What every request of a chain shares about hedging.
pub(crate) struct Hedger {
    pub(crate) policy: HedgePolicy,
    /// Recent times to first token per route (0 is the primary), oldest first.
    samples: Vec<Mutex<VecDeque<Duration>>>,
    /// Hedges in hand: each request adds `max_fraction`, each hedge takes one, never more
    /// than [`RESERVE`] in hand, so that hedges stay a fraction of requests even in a slow
    /// spell while a few slow requests close together are all hedged.
    tokens: Mutex<f64>,
    /// The idempotency header the policy sets on every request, if it sets one.
    pub(crate) key_header: Option<http::HeaderName>,
}

impl Hedger {
    pub(crate) fn new(
        policy: HedgePolicy,
        routes: usize,
        key_header: Option<http::HeaderName>,
    ) -> Self {
        Self {
            policy,
            samples: (0..routes)
                .map(|_| Mutex::new(VecDeque::with_capacity(SAMPLES)))
                .collect(),
            tokens: Mutex::new(RESERVE),
            key_header,
        }
    }

    /// A request arrived: it adds its fraction of a hedge.
    pub(crate) fn deposit(&self) {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        *t = (*t + self.policy.max_fraction).min(RESERVE);
    }

    /// Takes one hedge, if one is in hand.
    pub(crate) fn take(&self) -> bool {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        // A little slack for the sums of fractions (ten times 0.1 is not quite 1).
        if *t >= 1.0 - 1e-9 {
            *t = (*t - 1.0).max(0.0);
            true
        } else {
            false
        }
    }

    /// Route `i` reached its first token after `ttft`.
    pub(crate) fn observe(&self, i: usize, ttft: Duration) {
        if self.policy.delay.is_some() {
            return;
        }
        if let Some(s) = self.samples.get(i) {
            let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
            if s.len() == SAMPLES {
                s.pop_front();
            }
            s.push_back(ttft);
        }
    }

    /// How long route `i`'s first attempt may go without its first token before the hedge.
    pub(crate) fn delay(&self, i: usize) -> Duration {
        let p = &self.policy;
        if let Some(d) = p.delay {
            return d;
        }
        let Some(s) = self.samples.get(i) else {
            return p.max_delay;
        };
        let mut sorted: Vec<Duration> = {
            let s = s.lock().unwrap_or_else(|p| p.into_inner());
            if s.len() < p.min_samples as usize {
                return p.max_delay;
            }
            s.iter().copied().collect()
        };
        sorted.sort_unstable();
        // Nearest rank: the smallest sample at or above the percentile.
        let rank = ((p.percentile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1].clamp(p.min_delay, p.max_delay)
    }
}

/// A hedge planned and not yet sent.
pub(crate) struct Planned<B> {
    pub(crate) route: usize,
    /// Where the chain's next hop looks from, should the hedge become the chain's attempt.
    pub(crate) scan_from: usize,
    pub(crate) name: RouteName,
    pub(crate) request: Request<B>,
    /// The spend gate that reserved the hedge, once it has.
    pub(crate) admitted: Option<SpendGate>,
}

/// Where one request's hedge stands.
pub(crate) enum Step<B> {
    /// Waiting out the delay.
    Waiting,
    /// Waiting for the spend cap to reserve the hedge.
    Admitting(StoreFuture<Result<(), SpendDenied>>, Planned<B>),
    /// Waiting for the service to be ready for the hedge.
    Readying(Planned<B>),
    /// The hedge is in flight.
    Running,
    /// No hedge (any more).
    Done,
}

/// The route of an attempt in flight, as the chain keeps it for its current route.
pub(crate) struct Lane {
    pub(crate) route: usize,
    pub(crate) scan_from: usize,
    pub(crate) sent: Option<Sent>,
    pub(crate) admitted: Option<SpendGate>,
}

pin_project! {
    /// One request's hedge: the delay, then the hedge's own attempt.
    pub(crate) struct Hedge<F, B> {
        #[pin]
        pub(crate) timer: Sleep,
        #[pin]
        pub(crate) future: Option<F>,
        pub(crate) step: Step<B>,
        // The hedge's route, once sent.
        pub(crate) lane: Option<Lane>,
        pub(crate) delay: Duration,
    }
}

/// A request's hedge, as its response future holds it: boxed, so that a stack without hedging
/// pays nothing for it.
pub(crate) type BoxedHedge<F, B> = Pin<Box<Hedge<F, B>>>;

impl<F, B> Hedge<F, B> {
    pub(crate) fn new(delay: Duration) -> BoxedHedge<F, B> {
        Box::pin(Self {
            timer: tokio::time::sleep(delay),
            future: None,
            step: Step::Waiting,
            lane: None,
            delay,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hedger(policy: HedgePolicy) -> Hedger {
        Hedger::new(policy, 2, None)
    }

    #[test]
    fn the_delay_is_the_percentile_within_its_bounds() {
        let mut p = HedgePolicy {
            enabled: true,
            min_samples: 10,
            percentile: 0.95,
            ..HedgePolicy::default()
        };
        p.min_delay = Duration::from_millis(100);
        p.max_delay = Duration::from_secs(5);
        let h = hedger(p);
        // Too few samples: the cap.
        for ms in 1..=9 {
            h.observe(0, Duration::from_millis(ms * 100));
        }
        assert_eq!(h.delay(0), Duration::from_secs(5));
        // 1..=20 × 100 ms: the 95th percentile by nearest rank is the 19th, 1.9 s.
        for ms in 10..=20 {
            h.observe(0, Duration::from_millis(ms * 100));
        }
        assert_eq!(h.delay(0), Duration::from_millis(1900));
        // Bounded below and above.
        let h = hedger(p);
        for _ in 0..20 {
            h.observe(1, Duration::from_millis(10));
        }
        assert_eq!(h.delay(1), Duration::from_millis(100));
        for _ in 0..300 {
            h.observe(1, Duration::from_secs(60));
        }
        assert_eq!(h.delay(1), Duration::from_secs(5));
        // A fixed delay is the delay.
        let h = hedger(HedgePolicy::after(Duration::from_millis(700)));
        h.observe(0, Duration::from_secs(9));
        assert_eq!(h.delay(0), Duration::from_millis(700));
    }

    #[test]
    fn hedges_stay_a_fraction_of_requests() {
        let h = hedger(HedgePolicy {
            max_fraction: 0.25,
            ..HedgePolicy::after(Duration::from_secs(1))
        });
        let mut hedged = Vec::new();
        for i in 0..24 {
            h.deposit();
            if h.take() {
                hedged.push(i);
            }
        }
        // Ten in reserve at the start (the deposits top it up, never above ten), then one
        // per four requests.
        assert_eq!(hedged, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 20]);
    }
}
