use std::collections::BTreeMap;
use std::time::Duration;

use super::defer::DeferPolicy;
use super::error::{PolicyError, check};

/// How much recovery (retries and route switches) the whole service may spend.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)
)]
#[non_exhaustive]
pub enum RetryBudgetPolicy {
    /// Retries may add up to `ratio` of the requests seen over the last `ttl`, plus
    /// `min_per_sec × ttl` so that a quiet service can still retry.
    Ratio {
        /// Retries per request, in `0..=1` (0.2 = 20 %).
        ratio: f64,
        /// Floor of retries per second.
        min_per_sec: u32,
        /// Window over which deposits count.
        #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
        ttl: Duration,
    },
    /// A token bucket: each request deposits `per_request` tokens, time refills
    /// `refill_per_sec`, each retry takes one token; never more than `capacity`.
    TokenBucket {
        /// Most tokens held.
        capacity: u32,
        /// Tokens added per second.
        refill_per_sec: f64,
        /// Tokens each request deposits.
        per_request: f64,
    },
}

impl Default for RetryBudgetPolicy {
    /// 20 % of requests plus 10 per second over 10 s.
    fn default() -> Self {
        RetryBudgetPolicy::Ratio {
            ratio: 0.2,
            min_per_sec: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

impl RetryBudgetPolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        match *self {
            RetryBudgetPolicy::Ratio { ratio, ttl, .. } => {
                check::ratio("budget.retry_budget.ratio", ratio)?;
                check::positive("budget.retry_budget.ttl", ttl)?;
                if ttl > Duration::from_secs(3600) {
                    return Err(PolicyError::new(
                        "budget.retry_budget.ttl",
                        "must be at most 1h",
                    ));
                }
            }
            RetryBudgetPolicy::TokenBucket {
                capacity,
                refill_per_sec,
                per_request,
            } => {
                check::at_least_one("budget.retry_budget.capacity", capacity.into())?;
                if !(refill_per_sec.is_finite() && refill_per_sec >= 0.0) {
                    return Err(PolicyError::new(
                        "budget.retry_budget.refill_per_sec",
                        "must be a finite number >= 0",
                    ));
                }
                if !(per_request.is_finite() && per_request >= 0.0) {
                    return Err(PolicyError::new(
                        "budget.retry_budget.per_request",
                        "must be a finite number >= 0",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What happens to a request that exceeds a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)
)]
#[non_exhaustive]
pub enum AdmissionMode {
    /// Fail fast with `ErrorKind::RateLimited { retry_in }` (interactive work).
    #[default]
    Reject,
    /// Wait in FIFO order for capacity (batch work).
    Queue {
        /// Longest wait in the queue.
        #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
        max_wait: Duration,
        /// Most requests waiting at once.
        max_queued: u32,
    },
    /// Never wait in the process: a request the rate limit has no room for is written down
    /// as a deferred record, due when capacity returns (needs `budget.defer` and a sink; without
    /// a sink it is rejected as under `Reject`).
    Defer,
}

/// What a rate limit is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum RateKey {
    /// One bucket per route (or request authority).
    #[default]
    Route,
    /// One bucket per budget owner.
    Owner,
}

/// Client-side rate limits: requests per second and model tokens per minute.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct RateLimitPolicy {
    /// Requests per second; unlimited when `None`.
    pub requests_per_second: Option<f64>,
    /// Burst of requests admitted at once.
    pub burst: u32,
    /// Model tokens (prompt estimate plus `max_tokens`) per minute; unlimited when `None`.
    pub tokens_per_minute: Option<u64>,
    /// What the buckets are keyed by.
    pub key: RateKey,
}

impl Default for RateLimitPolicy {
    fn default() -> Self {
        Self {
            requests_per_second: None,
            burst: 1,
            tokens_per_minute: None,
            key: RateKey::Route,
        }
    }
}

/// Price of a route in cost units per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct Price {
    /// Per million input tokens.
    pub input_per_mtok: f64,
    /// Per million output tokens.
    pub output_per_mtok: f64,
}

impl Price {
    /// A price.
    pub const fn new(input_per_mtok: f64, output_per_mtok: f64) -> Self {
        Self {
            input_per_mtok,
            output_per_mtok,
        }
    }
}

/// What a failed or partial attempt is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum ChargeRule {
    /// Nothing unless usage was reported; a possibly-accepted attempt keeps its reservation.
    #[default]
    ReportedOrReserved,
    /// Nothing unless usage was reported.
    ReportedOnly,
    /// The full reservation.
    Reserved,
}

/// A spend cap per budget owner, in cost units over a window.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct SpendPolicy {
    /// Cost units each owner may spend per window.
    pub cap: f64,
    /// The window.
    #[cfg_attr(feature = "serde", serde(with = "crate::duration::serde_duration"))]
    pub window: Duration,
    /// Header naming the owner (a `BudgetOwner` request extension takes precedence).
    pub owner_header: String,
    /// Owner of requests that name none; such requests fail closed when `None`.
    pub default_owner: Option<String>,
    /// Price per route name.
    pub prices: BTreeMap<String, Price>,
    /// Price of routes missing from `prices`; a request to an unpriced route fails closed when
    /// `None`.
    pub default_price: Option<Price>,
    /// What failed and partial attempts cost.
    pub charge_failed: ChargeRule,
    /// A hard cap: each reservation is an upper bound of what its attempt can be billed (the
    /// request's input bytes counted as tokens, plus the per-message overhead, plus its output
    /// bound), so that concurrent requests can never book past the cap together. The output
    /// bound is the one the request names (`max_tokens` and the like); a request naming none is
    /// reserved [`DEFAULT_MAX_OUTPUT_TOKENS`](crate::budget::DEFAULT_MAX_OUTPUT_TOKENS), which a
    /// model with a longer output limit can exceed, so name it where the cap must hold. Off, a
    /// reservation is the estimate, and a provider billing more than it is counted as an
    /// overrun.
    pub hard: bool,
}

impl Default for SpendPolicy {
    fn default() -> Self {
        Self {
            cap: 0.0,
            window: Duration::from_secs(24 * 3600),
            owner_header: "x-llm-budget-owner".to_owned(),
            default_owner: None,
            prices: BTreeMap::new(),
            default_price: None,
            charge_failed: ChargeRule::ReportedOrReserved,
            hard: false,
        }
    }
}

/// Admission: retry budget, deadline, rate limits and spend caps. The outermost rung.
#[derive(Debug, Clone, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct BudgetPolicy {
    /// The retry budget shared by every request through the layer.
    pub retry_budget: RetryBudgetPolicy,
    /// Deadline for a whole logical request (every retry and hop); none when `None`.
    #[cfg_attr(
        feature = "serde",
        serde(with = "crate::duration::serde_duration::option")
    )]
    pub deadline: Option<Duration>,
    /// Client-side rate limits; none when `None`.
    pub rate_limit: Option<RateLimitPolicy>,
    /// What a request that must wait for rate-limit capacity (or a paced route) does: reject
    /// at once, or queue.
    pub admission: AdmissionMode,
    /// Pause admission to a route that reported zero remaining requests or tokens until its
    /// reset time, instead of waiting for the 429.
    pub pacing: bool,
    /// Spend cap; none when `None`.
    pub spend: Option<SpendPolicy>,
    /// The queue rung: requests that end unanswered on a transient failure become deferred
    /// records instead of failing; off when `None`.
    pub defer: Option<DeferPolicy>,
}

impl BudgetPolicy {
    /// Checks every value; see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.retry_budget.validate()?;
        if let Some(d) = self.deadline {
            check::positive("budget.deadline", d)?;
        }
        if let Some(r) = &self.rate_limit {
            if let Some(rps) = r.requests_per_second {
                if !(rps.is_finite() && rps > 0.0) {
                    return Err(PolicyError::new(
                        "budget.rate_limit.requests_per_second",
                        "must be a finite number greater than zero",
                    ));
                }
            }
            check::at_least_one("budget.rate_limit.burst", r.burst.into())?;
            if let Some(tpm) = r.tokens_per_minute {
                check::at_least_one("budget.rate_limit.tokens_per_minute", tpm)?;
            }
            if r.requests_per_second.is_none() && r.tokens_per_minute.is_none() {
                return Err(PolicyError::new(
                    "budget.rate_limit",
                    "sets neither `requests_per_second` nor `tokens_per_minute`",
                ));
            }
        }
        if let AdmissionMode::Queue {
            max_wait,
            max_queued,
        } = self.admission
        {
            check::positive("budget.admission.max_wait", max_wait)?;
            check::at_least_one("budget.admission.max_queued", max_queued.into())?;
        }
        if let Some(d) = &self.defer {
            d.validate()?;
        }
        if self.admission == AdmissionMode::Defer && self.defer.is_none() {
            return Err(PolicyError::new(
                "budget.admission",
                "is `defer` but the policy has no `budget.defer` section",
            ));
        }
        if let Some(s) = &self.spend {
            if !(s.cap.is_finite() && s.cap > 0.0) {
                return Err(PolicyError::new(
                    "budget.spend.cap",
                    "must be a finite number greater than zero",
                ));
            }
            check::positive("budget.spend.window", s.window)?;
            check::header_name("budget.spend.owner_header", &s.owner_header)?;
            if s.default_owner
                .as_ref()
                .is_some_and(|o| o.trim().is_empty())
            {
                return Err(PolicyError::new(
                    "budget.spend.default_owner",
                    "must not be empty",
                ));
            }
            let prices = s
                .prices
                .iter()
                .map(|(r, p)| (format!("budget.spend.prices.{r}"), p))
                .chain(
                    s.default_price
                        .iter()
                        .map(|p| ("budget.spend.default_price".to_owned(), p)),
                );
            for (field, p) in prices {
                for (name, v) in [
                    ("input_per_mtok", p.input_per_mtok),
                    ("output_per_mtok", p.output_per_mtok),
                ] {
                    if !(v.is_finite() && v >= 0.0) {
                        return Err(PolicyError::new(
                            format!("{field}.{name}"),
                            "must be a finite number >= 0",
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
