//! Idempotency keys: one per logical request.

use std::sync::{Arc, Mutex};

use http::HeaderValue;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Makes idempotency keys in the UUID v4 text form (122 random bits).
///
/// Seeded from the operating system and never from the policy's jitter seed: two processes
/// running the same seeded policy must still send different keys, or a gateway that honours
/// keys would answer one request with another's response.
#[derive(Clone)]
pub(crate) struct KeyGenerator(Arc<Mutex<SmallRng>>);

impl KeyGenerator {
    pub(crate) fn new() -> Self {
        Self(Arc::new(Mutex::new(SmallRng::from_os_rng())))
    }

    pub(crate) fn next(&self) -> Option<HeaderValue> {
        let bits: u128 = {
            let mut rng = self.0.lock().unwrap_or_else(|p| p.into_inner());
            rng.random()
        };
        // Version 4, variant 10xx.
        let bits = (bits & !(0xF << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
        let hex = format!("{bits:032x}");
        let key = format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        );
        // Lowercase hex and dashes are always a valid header value.
        HeaderValue::from_str(&key).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_uuid_v4_and_distinct() {
        let g = KeyGenerator::new();
        let a = g.next();
        let b = g.next();
        assert!(a.is_some());
        assert_ne!(a, b);
        let a = a.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert_eq!(a.len(), 36, "{a}");
        assert_eq!(&a[14..15], "4", "{a}");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
        assert_eq!(a.matches('-').count(), 4);
    }
}
