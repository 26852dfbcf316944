use std::collections::BTreeMap;

use crate::classify::FailureClass;

/// Whether a failure of a class may be retried on the same route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum RetryRule {
    /// Never retry on the same route.
    Never,
    /// Retry up to the retry policy's `max_attempts`.
    Yes,
    /// At most one retry.
    Once,
    /// At most one retry, and none when an approved fallback route exists for the class (a silent
    /// route rarely recovers within one request; the backup is the better bet).
    OnceUnlessFallback,
}

/// Whether a failure of a class may switch to another route, and to which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum FallbackRule {
    /// Never switch: fail closed.
    Never,
    /// Switch to the next route in the chain.
    Yes,
    /// Switch only to routes marked `larger_context`.
    LargerContext,
    /// Switch only to routes whose budget owner the fallback policy explicitly approves.
    ApprovedOwner,
}

/// The action the ladder takes for one failure class: one row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ClassAction {
    /// Same-route retry.
    pub retry: RetryRule,
    /// Route switch.
    pub fallback: FallbackRule,
    /// Whether the failure counts against the route's circuit breaker.
    pub breaker: bool,
}

impl ClassAction {
    /// A row of the table.
    pub const fn new(retry: RetryRule, fallback: FallbackRule, breaker: bool) -> Self {
        Self {
            retry,
            fallback,
            breaker,
        }
    }

    /// The safe default for `class` (DESIGN's table).
    pub const fn default_for(class: FailureClass) -> Self {
        use FallbackRule as F;
        use RetryRule as R;
        match class {
            FailureClass::Connect => Self::new(R::Yes, F::Yes, true),
            FailureClass::Timeout | FailureClass::Transport => {
                Self::new(R::OnceUnlessFallback, F::Yes, true)
            }
            FailureClass::RateLimited => Self::new(R::Yes, F::Yes, false),
            FailureClass::Overloaded | FailureClass::ServerError => Self::new(R::Yes, F::Yes, true),
            FailureClass::Conflict => Self::new(R::Yes, F::Never, false),
            FailureClass::QuotaExhausted => Self::new(R::Never, F::ApprovedOwner, false),
            FailureClass::ContextOverflow => Self::new(R::Never, F::LargerContext, false),
            FailureClass::InvalidRequest | FailureClass::Auth | FailureClass::PolicyBlock => {
                Self::new(R::Never, F::Never, false)
            }
            FailureClass::StreamInterrupted => Self::new(R::Never, F::Never, true),
        }
    }
}

/// The per-class action table: the safe defaults, with the policy's overrides on top.
///
/// In a policy file each override names a class and any of its three cells:
///
/// ```toml
/// [actions.rate_limited]
/// breaker = true            # count rate limits against the breaker too
///
/// [actions.timeout]
/// retry = "never"           # a possibly-accepted request is never sent twice
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClassActions {
    overrides: BTreeMap<FailureClass, ClassAction>,
}

impl ClassActions {
    /// The action for `class`: the override if the policy set one, else the default.
    pub fn get(&self, class: FailureClass) -> ClassAction {
        self.overrides
            .get(&class)
            .copied()
            .unwrap_or(ClassAction::default_for(class))
    }

    /// Replaces the action for `class`.
    pub fn set(&mut self, class: FailureClass, action: ClassAction) -> &mut Self {
        if action == ClassAction::default_for(class) {
            self.overrides.remove(&class);
        } else {
            self.overrides.insert(class, action);
        }
        self
    }

    /// Builder form of [`set`](Self::set).
    pub fn with(mut self, class: FailureClass, action: ClassAction) -> Self {
        self.set(class, action);
        self
    }

    /// The classes whose action differs from the default.
    pub fn overrides(&self) -> impl Iterator<Item = (FailureClass, ClassAction)> + '_ {
        self.overrides.iter().map(|(c, a)| (*c, *a))
    }
}

#[cfg(feature = "serde")]
mod serde_impls {
    use super::*;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cells {
        retry: Option<RetryRule>,
        fallback: Option<FallbackRule>,
        breaker: Option<bool>,
    }

    impl<'de> Deserialize<'de> for ClassActions {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let raw = BTreeMap::<FailureClass, Cells>::deserialize(d)?;
            let mut actions = ClassActions::default();
            for (class, cells) in raw {
                let mut a = ClassAction::default_for(class);
                if let Some(r) = cells.retry {
                    a.retry = r;
                }
                if let Some(f) = cells.fallback {
                    a.fallback = f;
                }
                if let Some(b) = cells.breaker {
                    a.breaker = b;
                }
                actions.set(class, a);
            }
            Ok(actions)
        }
    }

    impl Serialize for ClassActions {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            self.overrides.serialize(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_table() {
        let t = ClassActions::default();
        assert_eq!(t.get(FailureClass::Auth).retry, RetryRule::Never);
        assert_eq!(t.get(FailureClass::Auth).fallback, FallbackRule::Never);
        assert!(!t.get(FailureClass::RateLimited).breaker);
        assert_eq!(
            t.get(FailureClass::ContextOverflow).fallback,
            FallbackRule::LargerContext
        );
        assert_eq!(
            t.get(FailureClass::Timeout).retry,
            RetryRule::OnceUnlessFallback
        );
    }

    #[test]
    fn override_and_reset() {
        let mut t = ClassActions::default();
        let loud = ClassAction::new(RetryRule::Yes, FallbackRule::Yes, true);
        t.set(FailureClass::RateLimited, loud);
        assert_eq!(t.get(FailureClass::RateLimited), loud);
        assert_eq!(t.overrides().count(), 1);
        t.set(
            FailureClass::RateLimited,
            ClassAction::default_for(FailureClass::RateLimited),
        );
        assert_eq!(t.overrides().count(), 0);
    }
}
