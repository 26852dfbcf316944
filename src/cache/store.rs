//! Where answers are kept: [`CacheStore`], and [`MemoryCache`] in this process.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::store::StoreFuture;

/// What identifies an answer: the tenant, the policy, and the idempotency key. One tenant can
/// never reach another's answer by sending its key, and two policies never share entries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// The request's owner (the tenant).
    pub owner: String,
    /// The policy's name (`workflow`).
    pub policy: String,
    /// The caller's idempotency key.
    pub key: String,
}

/// A complete, successful answer as kept: what the caller got, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CachedAnswer {
    /// Its status.
    pub status: StatusCode,
    /// The headers that matter (hop-by-hop headers, `content-length` and `set-cookie` are
    /// not kept).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The whole body: a streamed answer replays as the same events.
    pub body: Bytes,
    /// A digest of the request body it answered: the same key with another body is a client
    /// bug, never answered with this.
    pub request_digest: u64,
}

/// What a claim on a key found.
#[derive(Debug, Clone)]
pub enum Claim {
    /// An answer kept for the key.
    Hit(CachedAnswer),
    /// Nobody holds the key: this request does, and answers it.
    Claimed,
    /// Another request holds the key (and the claim asked not to wait for it).
    Busy,
}

/// Storage of answers by key, with single flight: one request answers a key at a time.
///
/// Asks return a [`StoreFuture`]; the bookings that happen when a body ends or is dropped
/// (`fill`, `release`) return nothing and must not be lost.
pub trait CacheStore: Send + Sync + 'static {
    /// The answer kept for `key`; else the key, held for `token` for `lock_ttl`; else, when
    /// another request holds it, its answer once it has one (`wait`) or [`Claim::Busy`].
    fn claim(
        &self,
        key: &CacheKey,
        token: u64,
        lock_ttl: Duration,
        wait: bool,
    ) -> StoreFuture<Result<Claim, String>>;

    /// Keeps `answer` for `key` for `ttl`, and lets go of the key `token` holds.
    fn fill(&self, key: &CacheKey, token: u64, answer: CachedAnswer, ttl: Duration);

    /// Lets go of the key `token` holds, without an answer (the first answer failed).
    fn release(&self, key: &CacheKey, token: u64);
}

/// A [`CacheStore`] in this process's memory, bounded: at most `max_entries` answers, the
/// least recently used evicted first, each gone after its TTL. Clones share one cache.
#[derive(Clone)]
pub struct MemoryCache {
    inner: Arc<Inner>,
}

struct Inner {
    max_entries: usize,
    state: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    slots: HashMap<CacheKey, Slot>,
    /// Increases on every use: the smallest `used` is the least recently used answer.
    clock: u64,
    answers: usize,
}

enum Slot {
    Held {
        token: u64,
        until: Instant,
        done: Arc<Notify>,
    },
    Kept {
        answer: CachedAnswer,
        until: Instant,
        used: u64,
    },
}

impl fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCache")
            .field("max_entries", &self.inner.max_entries)
            .field("answers", &self.len())
            .finish()
    }
}

impl MemoryCache {
    /// An empty cache keeping at most `max_entries` answers.
    pub fn new(max_entries: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_entries: max_entries.max(1),
                state: Mutex::new(Entries::default()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers kept now.
    pub fn len(&self) -> usize {
        self.lock().answers
    }

    /// Whether no answer is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One look at `key`: an answer, the key for `token`, or the signal its holder gives when
    /// done.
    fn look(&self, key: &CacheKey, token: u64, lock_ttl: Duration) -> Result<Claim, Arc<Notify>> {
        let now = Instant::now();
        let mut e = self.lock();
        e.clock += 1;
        let clock = e.clock;
        match e.slots.get_mut(key) {
            Some(Slot::Kept {
                answer,
                until,
                used,
            }) if *until > now => {
                *used = clock;
                return Ok(Claim::Hit(answer.clone()));
            }
            Some(Slot::Held { until, done, .. }) if *until > now => return Err(done.clone()),
            Some(Slot::Kept { .. }) => e.answers -= 1,
            _ => {}
        }
        let until = crate::duration::saturating_add(now, lock_ttl);
        let done = Arc::new(Notify::new());
        e.slots
            .insert(key.clone(), Slot::Held { token, until, done });
        Ok(Claim::Claimed)
    }

    fn let_go(e: &mut Entries, key: &CacheKey, token: u64) -> bool {
        match e.slots.get(key) {
            Some(Slot::Held { token: t, done, .. }) if *t == token => {
                done.notify_waiters();
                e.slots.remove(key);
                true
            }
            _ => false,
        }
    }
}

impl CacheStore for MemoryCache {
    fn claim(
        &self,
        key: &CacheKey,
        token: u64,
        lock_ttl: Duration,
        wait: bool,
    ) -> StoreFuture<Result<Claim, String>> {
        match self.look(key, token, lock_ttl) {
            Ok(claim) => StoreFuture::ready(Ok(claim)),
            Err(_) if !wait => StoreFuture::ready(Ok(Claim::Busy)),
            Err(done) => {
                let (cache, key) = (self.clone(), key.clone());
                StoreFuture::new(async move {
                    let mut done = done;
                    loop {
                        // Woken when the holder fills or lets go; a holder that vanished is
                        // outlived by its lock's end.
                        let notified = done.clone().notified_owned();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        match cache.look(&key, token, lock_ttl) {
                            Ok(claim) => return Ok(claim),
                            Err(d) if Arc::ptr_eq(&d, &done) => {
                                let _ = tokio::time::timeout(lock_ttl, notified).await;
                            }
                            Err(d) => done = d,
                        }
                    }
                })
            }
        }
    }

    fn fill(&self, key: &CacheKey, token: u64, answer: CachedAnswer, ttl: Duration) {
        let now = Instant::now();
        let mut e = self.lock();
        if !MemoryCache::let_go(&mut e, key, token) {
            // The key is no longer ours (its lock ended): the answer is not kept.
            return;
        }
        // Expired answers go first, then the least recently used, to keep within the bound.
        let max = self.inner.max_entries;
        if e.answers >= max {
            e.slots
                .retain(|_, s| !matches!(s, Slot::Kept { until, .. } if *until <= now));
            e.answers = e
                .slots
                .values()
                .filter(|s| matches!(s, Slot::Kept { .. }))
                .count();
        }
        while e.answers >= max {
            let oldest = e
                .slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Kept { used, .. } => Some((*used, k.clone())),
                    Slot::Held { .. } => None,
                })
                .min_by_key(|(used, _)| *used);
            let Some((_, k)) = oldest else { break };
            e.slots.remove(&k);
            e.answers -= 1;
        }
        e.clock += 1;
        let used = e.clock;
        let until = crate::duration::saturating_add(now, ttl);
        e.slots.insert(
            key.clone(),
            Slot::Kept {
                answer,
                until,
                used,
            },
        );
        e.answers += 1;
    }

    fn release(&self, key: &CacheKey, token: u64) {
        MemoryCache::let_go(&mut self.lock(), key, token);
    }
}
