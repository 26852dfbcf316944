use super::error::PolicyError;

/// How the fallback chain orders its routes for each request: which one it tries first, and
/// which next when that one fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum RouteStrategy {
    /// The primary first, then the backups in the order written.
    #[default]
    Ordered,
    /// A draw by weight (the primary's `selection.primary_weight`, each backup's `weight`),
    /// without replacement: the first route drawn is tried first, the second next.
    Weighted,
    /// The route with the lowest moving estimate of time to its first token first (a route
    /// not yet measured counts as fastest, so it is measured); a fraction `explore` of
    /// requests tries another route first, so that a route that recovered is measured again.
    LowestLatency,
    /// The cheapest route for the request first: the spend policy's prices
    /// (`budget.spend.prices`, `default_price`) and the request's token estimate. A route with
    /// no price is tried last.
    LowestCost,
}

impl RouteStrategy {
    /// The strategy's name in the policy and the attempt log.
    pub const fn as_str(self) -> &'static str {
        match self {
            RouteStrategy::Ordered => "ordered",
            RouteStrategy::Weighted => "weighted",
            RouteStrategy::LowestLatency => "lowest_latency",
            RouteStrategy::LowestCost => "lowest_cost",
        }
    }
}

/// Route selection (the `fallback.selection` sub-section): the strategy that orders the chain
/// for each request, among the routes the request may go to.
///
/// Whatever the strategy, a route that cannot serve the request (its capabilities), that its
/// provider paused (rate-limit headers), that the spend cap cannot pay for, or that a failure
/// so far rules out (a context overflow, an exhausted quota) is skipped, and the skip logged; a
/// route whose circuit is open fails at once and the chain moves on at no retry-budget cost.
/// Every strategy but `ordered` records its choice in the attempt log (a `route_chosen`
/// event: the strategy, the candidates in the order chosen, why the first).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct SelectionPolicy {
    /// The strategy.
    pub strategy: RouteStrategy,
    /// `weighted`: the primary's weight (a backup's is its `weight`, 1 when unset).
    pub primary_weight: u32,
    /// `lowest_latency`: the fraction of requests (0 to 0.5) that try a route other than the
    /// fastest first, so that its estimate stays current.
    pub explore: f64,
    /// `lowest_latency`: the weight of the newest time to first token in a route's moving
    /// estimate (above 0, at most 1). A request the route fails doubles its estimate.
    pub smoothing: f64,
}

impl Default for SelectionPolicy {
    /// `ordered`; for the other strategies, weight 1, 5 % exploration, smoothing 0.2.
    fn default() -> Self {
        Self {
            strategy: RouteStrategy::Ordered,
            primary_weight: 1,
            explore: 0.05,
            smoothing: 0.2,
        }
    }
}

impl SelectionPolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !(0.0..=0.5).contains(&self.explore) {
            return Err(PolicyError::new(
                "fallback.selection.explore",
                format!("must be between 0 and 0.5, got {}", self.explore),
            ));
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err(PolicyError::new(
                "fallback.selection.smoothing",
                format!("must be above 0 and at most 1, got {}", self.smoothing),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_name_their_field() {
        let mut p = SelectionPolicy {
            explore: 0.6,
            ..SelectionPolicy::default()
        };
        assert_eq!(
            p.validate().unwrap_err().field(),
            "fallback.selection.explore"
        );
        p.explore = f64::NAN;
        assert_eq!(
            p.validate().unwrap_err().field(),
            "fallback.selection.explore"
        );
        p.explore = 0.0;
        for bad in [0.0, -0.1, 1.5, f64::INFINITY, f64::NAN] {
            p.smoothing = bad;
            assert_eq!(
                p.validate().unwrap_err().field(),
                "fallback.selection.smoothing",
                "{bad}"
            );
        }
        p.smoothing = 1.0;
        assert!(p.validate().is_ok());
    }
}
