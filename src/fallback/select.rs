//! Route selection: the order a request's chain tries its routes in, by the policy's strategy.
//!
//! Under `ordered` nothing here runs. Otherwise each request gets its own order over the
//! primary (index 0) and the backups (index `i` is `routes[i - 1]`), computed once when the
//! request arrives; the chain then walks it, skipping what a request may not use exactly as
//! it does in the written order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::backoff::JitterSource;
use crate::budget::TokenEstimate;
use crate::policy::{Price, RouteStrategy, SelectionPolicy};

/// Marks a route with no estimate yet (no time to first token is this bit pattern).
const UNMEASURED: u64 = u64::MAX;

/// Mixed into the policy's seed for the selection's draws.
const SELECTION_SEED: u64 = 0x5e1e_c710_u64;

/// What a chain's routes share for choosing among them: weights, prices, the moving
/// estimates of time to first token, the seedable draws.
pub(crate) struct Selector {
    policy: SelectionPolicy,
    /// Per route (0 is the primary).
    weights: Vec<u32>,
    prices: Vec<Option<Price>>,
    /// Seconds, as `f64` bits; [`UNMEASURED`] until a first answer.
    latency: Vec<AtomicU64>,
    draws: JitterSource,
}

/// A request's order and why its first route leads it.
pub(crate) struct Choice {
    pub(crate) order: Vec<usize>,
    pub(crate) reason: String,
}

impl Choice {
    /// Whether the order starts with a backup rather than the primary.
    pub(crate) fn leads_elsewhere(&self) -> bool {
        self.order.first() != Some(&0)
    }
}

impl Selector {
    pub(crate) fn new(
        policy: SelectionPolicy,
        weights: Vec<u32>,
        prices: Vec<Option<Price>>,
        seed: Option<u64>,
    ) -> Self {
        let latency = weights.iter().map(|_| AtomicU64::new(UNMEASURED)).collect();
        Self {
            policy,
            weights,
            prices,
            latency,
            draws: JitterSource::from_seed(seed.map(|s| s ^ SELECTION_SEED)),
        }
    }

    pub(crate) fn strategy(&self) -> RouteStrategy {
        self.policy.strategy
    }

    /// Replaces the prices (index 0 is the primary), as the spend policy sets them.
    pub(crate) fn set_prices(&mut self, prices: Vec<Option<Price>>) {
        self.prices = prices;
    }

    /// Replaces the draws' source (tests and simulations seed it).
    pub(crate) fn set_seed(&mut self, seed: Option<u64>) {
        self.draws = JitterSource::from_seed(seed.map(|s| s ^ SELECTION_SEED));
    }

    /// The order for one request; `estimate` is its token estimate (for `lowest_cost`).
    /// `None` under `ordered`.
    pub(crate) fn choose(&self, estimate: Option<TokenEstimate>) -> Option<Choice> {
        let n = self.weights.len();
        match self.policy.strategy {
            RouteStrategy::Ordered => None,
            RouteStrategy::Weighted => {
                let mut left: Vec<usize> = (0..n).collect();
                let mut order = Vec::with_capacity(n);
                while !left.is_empty() {
                    let total: u64 = left.iter().map(|&i| u64::from(self.weights[i])).sum();
                    // Weight 0 routes come last, in the written order.
                    let pick = if total == 0 {
                        0
                    } else {
                        let mut at = (self.draws.unit() * total as f64) as u64;
                        left.iter()
                            .position(|&i| {
                                let w = u64::from(self.weights[i]);
                                if at < w {
                                    true
                                } else {
                                    at -= w;
                                    false
                                }
                            })
                            .unwrap_or(left.len() - 1)
                    };
                    order.push(left.remove(pick));
                }
                let total: u64 = self.weights.iter().map(|&w| u64::from(w)).sum();
                let first = self.weights[order[0]];
                let reason = format!("drawn by weight ({first} of {total})");
                Some(Choice { order, reason })
            }
            RouteStrategy::LowestLatency => {
                let estimates: Vec<Option<f64>> = (0..n).map(|i| self.estimate(i)).collect();
                // Unmeasured first (0 s), then fastest; ties keep the written order.
                let key = |i: usize| estimates[i].unwrap_or(0.0);
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| key(a).total_cmp(&key(b)));
                let reason = if n > 1
                    && self.policy.explore > 0.0
                    && estimates[order[0]].is_some()
                    && self.draws.unit() < self.policy.explore
                {
                    // Another route leads this request, so its estimate stays current.
                    let k = 1 + ((self.draws.unit() * (n - 1) as f64) as usize).min(n - 2);
                    let explored = order.remove(k);
                    order.insert(0, explored);
                    format!("exploring ({})", describe(estimates[explored]))
                } else {
                    format!(
                        "lowest time to first token ({})",
                        describe(estimates[order[0]])
                    )
                };
                Some(Choice { order, reason })
            }
            RouteStrategy::LowestCost => {
                let (input, output) =
                    estimate.map_or((0, 0), |e| (e.input_tokens, e.max_output_tokens));
                let cost = |i: usize| {
                    self.prices[i].map_or(f64::INFINITY, |p| {
                        (input as f64 * p.input_per_mtok + output as f64 * p.output_per_mtok) / 1e6
                    })
                };
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| cost(a).total_cmp(&cost(b)));
                let reason = format!(
                    "lowest estimated cost ({:.6} for {input} input and {output} output tokens)",
                    cost(order[0])
                );
                Some(Choice { order, reason })
            }
        }
    }

    /// The moving estimate of route `i`'s time to first token, in seconds.
    fn estimate(&self, i: usize) -> Option<f64> {
        let bits = self.latency.get(i)?.load(Ordering::Relaxed);
        (bits != UNMEASURED).then(|| f64::from_bits(bits))
    }

    /// Route `i` reached its first token after `ttft`: the sample moves its estimate by the
    /// policy's smoothing (the first sample is the estimate).
    pub(crate) fn observe(&self, i: usize, ttft: Duration) {
        let a = self.policy.smoothing;
        let sample = ttft.as_secs_f64();
        self.update(i, |old| {
            Some(old.map_or(sample, |old| a * sample + (1.0 - a) * old))
        });
    }

    /// Route `i` failed for a request: its estimate doubles at once, so a route that fails
    /// fast is not taken for a fast one (a route never measured stays so). An hour bounds it.
    pub(crate) fn penalize(&self, i: usize) {
        self.update(i, |old| old.map(|old| (old * 2.0).min(3600.0)));
    }

    fn update(&self, i: usize, next: impl Fn(Option<f64>) -> Option<f64>) {
        if self.policy.strategy != RouteStrategy::LowestLatency {
            return;
        }
        let Some(cell) = self.latency.get(i) else {
            return;
        };
        let old = cell.load(Ordering::Relaxed);
        let Some(new) = next((old != UNMEASURED).then(|| f64::from_bits(old))) else {
            return;
        };
        // A lost race between two answers drops one sample of a moving estimate: no matter.
        let _ = cell.compare_exchange(old, new.to_bits(), Ordering::Relaxed, Ordering::Relaxed);
    }
}

fn describe(estimate: Option<f64>) -> String {
    match estimate {
        Some(s) => format!("{} ms", (s * 1000.0).round()),
        None => "not measured yet".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(strategy: RouteStrategy, weights: Vec<u32>) -> Selector {
        let n = weights.len();
        let policy = SelectionPolicy {
            strategy,
            ..SelectionPolicy::default()
        };
        Selector::new(policy, weights, vec![None; n], Some(7))
    }

    #[test]
    fn ordered_chooses_nothing() {
        assert!(
            selector(RouteStrategy::Ordered, vec![1, 1])
                .choose(None)
                .is_none()
        );
    }

    #[test]
    fn weighted_draws_follow_the_weights_and_are_seeded() {
        let s = selector(RouteStrategy::Weighted, vec![3, 1, 0]);
        let mut first = [0u32; 3];
        for _ in 0..4000 {
            let c = s.choose(None).unwrap();
            assert_eq!(c.order.len(), 3);
            // The weight-0 route is always last.
            assert_eq!(c.order[2], 2);
            first[c.order[0]] += 1;
        }
        assert_eq!(first[2], 0);
        // 3 : 1 within a few percent over 4000 seeded draws.
        assert!((2850..=3150).contains(&first[0]), "{first:?}");
        let again = selector(RouteStrategy::Weighted, vec![3, 1, 0]);
        let a: Vec<_> = (0..50).map(|_| again.choose(None).unwrap().order).collect();
        let b = selector(RouteStrategy::Weighted, vec![3, 1, 0]);
        let b: Vec<_> = (0..50).map(|_| b.choose(None).unwrap().order).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn lowest_latency_measures_unmeasured_routes_then_prefers_the_fastest() {
        let mut s = selector(RouteStrategy::LowestLatency, vec![1, 1, 1]);
        s.policy.explore = 0.0;
        assert_eq!(s.choose(None).unwrap().order, vec![0, 1, 2]);
        s.observe(0, Duration::from_millis(900));
        assert_eq!(s.choose(None).unwrap().order, vec![1, 2, 0]);
        s.observe(1, Duration::from_millis(300));
        s.observe(2, Duration::from_millis(600));
        let c = s.choose(None).unwrap();
        assert_eq!(c.order, vec![1, 2, 0]);
        assert_eq!(c.reason, "lowest time to first token (300 ms)");
        // A sample moves the estimate by the smoothing: 0.2 × 800 + 0.8 × 300 = 400 ms.
        s.observe(1, Duration::from_millis(800));
        assert_eq!(s.estimate(1), Some(0.2 * 0.8 + 0.8 * 0.3));
        // A failure doubles it: 800 ms, past route 2's 600 ms, short of route 0's 900 ms.
        s.penalize(1);
        assert_eq!(s.choose(None).unwrap().order, vec![2, 1, 0]);
        s.penalize(1);
        assert_eq!(s.choose(None).unwrap().order, vec![2, 0, 1]);
        for _ in 0..40 {
            s.penalize(1);
        }
        assert_eq!(s.estimate(1), Some(3600.0), "bounded");
        // A route never measured is not penalised into a figure.
        let u = selector(RouteStrategy::LowestLatency, vec![1, 1]);
        u.penalize(0);
        assert_eq!(u.estimate(0), None);
    }

    #[test]
    fn lowest_latency_explores_the_given_fraction() {
        let s = selector(RouteStrategy::LowestLatency, vec![1, 1, 1]);
        s.observe(0, Duration::from_millis(100));
        s.observe(1, Duration::from_millis(500));
        s.observe(2, Duration::from_millis(900));
        let mut explored = 0;
        for _ in 0..2000 {
            let c = s.choose(None).unwrap();
            if c.order[0] != 0 {
                explored += 1;
                assert!(c.reason.starts_with("exploring"), "{}", c.reason);
            }
        }
        // 5 % of 2000 seeded draws.
        assert!((70..=130).contains(&explored), "{explored}");
    }

    #[test]
    fn lowest_cost_orders_by_price_for_the_estimate_with_unpriced_last() {
        let policy = SelectionPolicy {
            strategy: RouteStrategy::LowestCost,
            ..SelectionPolicy::default()
        };
        let prices = vec![
            Some(Price::new(3.0, 15.0)),
            None,
            Some(Price::new(0.15, 0.6)),
            Some(Price::new(1.0, 1.0)),
        ];
        let s = Selector::new(policy, vec![1; 4], prices, Some(1));
        let c = s.choose(Some(TokenEstimate::new(1000, 1000))).unwrap();
        assert_eq!(c.order, vec![2, 3, 0, 1]);
        assert_eq!(
            c.reason,
            "lowest estimated cost (0.000750 for 1000 input and 1000 output tokens)"
        );
        // Input-only, the 1.0 route is dearer than the 0.15 one and cheaper than the 3.0 one.
        let c = s.choose(Some(TokenEstimate::new(1_000_000, 0))).unwrap();
        assert_eq!(c.order, vec![2, 3, 0, 1]);
        assert!(
            c.reason.starts_with("lowest estimated cost (0.150000"),
            "{}",
            c.reason
        );
    }
}
