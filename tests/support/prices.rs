//! `lowest_cost` over priced routes, the spend charged to one owner.

use tower_llm_resilience::Policy;
use tower_llm_resilience::policy::{Price, RouteStrategy, SpendPolicy};

/// Orders `policy`'s routes by `lowest_cost` over `prices` (route, input and output price),
/// with a spend cap of 1 000 charged to the owner `team`.
#[allow(clippy::field_reassign_with_default)]
pub fn lowest_cost(policy: &mut Policy, prices: &[(&str, f64, f64)]) {
    policy.fallback.selection.strategy = RouteStrategy::LowestCost;
    let mut spend = SpendPolicy::default();
    spend.cap = 1_000.0;
    spend.default_owner = Some("team".to_owned());
    for &(route, input, output) in prices {
        spend
            .prices
            .insert(route.to_owned(), Price::new(input, output));
    }
    policy.budget.spend = Some(spend);
}
