//! The idempotent result cache on Redis: [`RedisCache`].

use std::time::Duration;

use ::redis::Value;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::{Booking, RedisStore, bytes, ms, tag};
use crate::cache::{CacheKey, CacheStore, CachedAnswer, Claim};
use crate::store::StoreFuture;

/// How often a request waiting for another replica's answer looks again.
const LOOK_EVERY: Duration = Duration::from_millis(25);

/// Answers kept in Redis, shared by every replica: the value under its TTL, and a lock key
/// holding the first request's token (with its own TTL, so a lock whose owner died expires).
/// A request waiting for another replica's answer looks again every 25 ms.
///
/// It shares the [`RedisStore`]'s connection and booking queue: keeping an answer, when a
/// body ends, never waits and is never lost.
#[derive(Clone, Debug)]
pub struct RedisCache {
    store: RedisStore,
}

impl RedisCache {
    /// A cache on the Redis of `store`.
    pub fn new(store: &RedisStore) -> Self {
        Self {
            store: store.clone(),
        }
    }

    fn keys(&self, key: &CacheKey) -> Vec<String> {
        let p = &self.store.inner.prefix;
        let owner = tag(&key.owner);
        let name = format!("{}:{}", key.policy.len(), key.policy);
        [
            format!("{p}:cache:{{{owner}}}:{name}:{}", key.key),
            format!("{p}:cachelock:{{{owner}}}:{name}:{}", key.key),
        ]
        .into()
    }
}

pub(super) fn text(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Headers as lines of `name: value`; values cannot hold a line break.
fn encode_headers(headers: &[(HeaderName, HeaderValue)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

fn decode_headers(raw: &[u8]) -> Vec<(HeaderName, HeaderValue)> {
    raw.split(|b| *b == b'\n')
        .filter_map(|line| {
            let at = line.windows(2).position(|w| w == b": ")?;
            let name = HeaderName::from_bytes(&line[..at]).ok()?;
            let value = HeaderValue::from_bytes(&line[at + 2..]).ok()?;
            Some((name, value))
        })
        .collect()
}

fn answer_of(items: &[Value]) -> Option<CachedAnswer> {
    let [_, status, headers, body, digest] = items else {
        return None;
    };
    let status = std::str::from_utf8(text(status)?)
        .ok()?
        .parse::<u16>()
        .ok()?;
    let digest = std::str::from_utf8(text(digest)?)
        .ok()?
        .parse::<u64>()
        .ok()?;
    Some(CachedAnswer {
        status: StatusCode::from_u16(status).ok()?,
        headers: decode_headers(text(headers)?),
        body: Bytes::copy_from_slice(text(body)?),
        request_digest: digest,
    })
}

impl CacheStore for RedisCache {
    fn claim(
        &self,
        key: &CacheKey,
        token: u64,
        lock_ttl: Duration,
        wait: bool,
    ) -> StoreFuture<Result<Claim, String>> {
        let keys = self.keys(key);
        let args = bytes([token.to_string(), ms(lock_ttl)]);
        let inner = self.store.inner.clone();
        StoreFuture::new(async move {
            let until = Instant::now() + lock_ttl + LOOK_EVERY;
            loop {
                let reply = inner.eval(&inner.scripts.cache_claim, &keys, &args).await?;
                let Value::Array(items) = reply else {
                    return Err("an unexpected reply".to_owned());
                };
                match items.first() {
                    Some(Value::Int(1)) => {
                        return answer_of(&items)
                            .map(Claim::Hit)
                            .ok_or_else(|| "a kept answer that does not parse".to_owned());
                    }
                    Some(Value::Int(2)) => return Ok(Claim::Claimed),
                    _ if !wait => return Ok(Claim::Busy),
                    // Held by another request: its answer, or its lock's end, comes soon.
                    _ if Instant::now() < until => tokio::time::sleep(LOOK_EVERY).await,
                    _ => return Ok(Claim::Busy),
                }
            }
        })
    }

    fn fill(&self, key: &CacheKey, token: u64, answer: CachedAnswer, ttl: Duration) {
        let args = vec![
            token.to_string().into_bytes(),
            ms(ttl).into_bytes(),
            answer.status.as_u16().to_string().into_bytes(),
            encode_headers(&answer.headers),
            answer.body.to_vec(),
            answer.request_digest.to_string().into_bytes(),
        ];
        self.store.inner.queue(Booking {
            script: |s| &s.cache_fill,
            keys: self.keys(key),
            args,
            retry_until: Instant::now() + ttl,
        });
    }

    fn release(&self, key: &CacheKey, token: u64) {
        let lock = self.keys(key).swap_remove(1);
        self.store.inner.queue(Booking {
            script: |s| &s.cache_release,
            keys: vec![lock],
            args: bytes([token.to_string()]),
            retry_until: Instant::now() + Duration::from_secs(60),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let h = vec![
            (
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("text/event-stream"),
            ),
            (
                HeaderName::from_static("x-llm-route"),
                HeaderValue::from_static("primary: a"),
            ),
        ];
        assert_eq!(decode_headers(&encode_headers(&h)), h);
        assert!(decode_headers(b"garbage\nno colon\n").is_empty());
    }
}
