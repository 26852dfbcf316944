//! The interactive preset with one backup route on the mock, seeded.

use tower_llm_resilience::Policy;
use tower_llm_resilience::policy::RouteConfig;
use tower_llm_resilience::testing::MockProvider;

/// `Policy::interactive()` with jitter seed 11 and a backup route `backup` (model
/// `backup-model`) under `/backup` on `mock`.
pub fn policy_with_backup(mock: &MockProvider) -> Policy {
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(11);
    policy.fallback.routes = vec![
        RouteConfig::new("backup")
            .base_url(format!("{}/backup", mock.url()))
            .model("backup-model"),
    ];
    policy
}
