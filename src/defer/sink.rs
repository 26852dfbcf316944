use std::time::Duration;

use super::DeferredRequest;
use crate::error::BoxError;
use crate::store::StoreFuture;

/// Where deferred records are kept until a worker replays them: in memory
/// ([`MemoryDeferSink`], feature `testing`), on a Redis Stream (`redis::RedisDeferSink`,
/// feature `redis`), or your own queue.
///
/// The contract that keeps a record from being lost or replayed twice:
///
/// - [`put`](Self::put) keeps a record until its `next_attempt_at_ms`;
/// - [`take`](Self::take) hands a due record to one worker under a **lease**; no other worker
///   gets it while the lease is renewed ([`renew`](Self::renew)) at least every `claim_after`;
///   a lease not renewed for longer (its worker died) goes to the next worker that takes;
/// - [`finish`](Self::finish) ends a lease once the replay has ended — answered, deferred
///   again (the record's new due time, in one step with the end of the lease), or dead — and
///   only then is the record done with.
pub trait DeferSink: Send + Sync + 'static {
    /// Keeps `record` until it is due.
    fn put(&self, record: DeferredRequest) -> StoreFuture<Result<(), BoxError>>;

    /// Up to `take.max` records due at `take.now_ms`, each under a lease held by
    /// `take.worker`; leases not renewed for `take.claim_after` are taken over first.
    fn take(&self, take: Take) -> StoreFuture<Result<Vec<Lease>, BoxError>>;

    /// Renews `lease` for its worker: `false` when the lease was lost (another worker took
    /// it over), and the replay should stop.
    fn renew(&self, lease: &Lease) -> StoreFuture<Result<bool, BoxError>>;

    /// Ends `lease`: `false` when it had been lost, in which case nothing changed.
    fn finish(&self, lease: Lease, end: LeaseEnd) -> StoreFuture<Result<bool, BoxError>>;

    /// When the next record is due (ms since the Unix epoch), when the sink can tell; a
    /// worker without an answer looks again after the policy's `poll_interval`.
    fn next_due(&self) -> StoreFuture<Result<Option<u64>, BoxError>> {
        StoreFuture::ready(Ok(None))
    }

    /// Where the record `id` stands; `None` for a record the sink does not know.
    fn status(&self, id: &str) -> StoreFuture<Result<Option<DeferredStatus>, BoxError>>;
}

/// What a worker asks of [`DeferSink::take`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Take {
    /// The worker's name (unique per worker).
    pub worker: String,
    /// Now, in ms since the Unix epoch.
    pub now_ms: u64,
    /// The most records to hand over.
    pub max: usize,
    /// A lease not renewed for this long is taken over.
    pub claim_after: Duration,
}

impl Take {
    /// A request for up to `max` records due at `now_ms` for `worker`.
    pub fn new(worker: impl Into<String>, now_ms: u64, max: usize, claim_after: Duration) -> Self {
        Self {
            worker: worker.into(),
            now_ms,
            max,
            claim_after,
        }
    }
}

/// A record handed to one worker to replay.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Lease {
    /// The record.
    pub record: DeferredRequest,
    /// The worker holding the lease.
    pub worker: String,
    /// The sink's handle on the lease (a stream entry id, say).
    pub token: String,
}

impl Lease {
    /// A lease on `record` for `worker`, known to the sink by `token`.
    pub fn new(
        record: DeferredRequest,
        worker: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        Self {
            record,
            worker: worker.into(),
            token: token.into(),
        }
    }
}

/// How a replay ended, for [`DeferSink::finish`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum LeaseEnd {
    /// The provider answered; the record is done.
    Answered,
    /// Deferred again: the record, with its new due time and deferral count, replaces the old.
    Deferred(Box<DeferredRequest>),
    /// Given up: kept as a dead letter, for a person to look at.
    DeadLetter {
        /// Why, in a few words (metadata only).
        reason: String,
    },
}

/// Where a deferred record stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeferredStatus {
    /// Waiting for its next attempt.
    Waiting {
        /// When it is due, in ms since the Unix epoch.
        next_attempt_at_ms: u64,
        /// How often it was deferred.
        deferrals: u32,
    },
    /// A worker is replaying it.
    Replaying {
        /// How often it was deferred.
        deferrals: u32,
    },
    /// The provider answered a replay.
    Answered,
    /// Given up, with why.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

#[cfg(feature = "testing")]
pub use memory::MemoryDeferSink;

#[cfg(feature = "testing")]
mod memory {
    use std::collections::{BTreeSet, HashMap};
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

    use tokio::time::Instant;

    use super::{DeferSink, DeferredStatus, Lease, LeaseEnd, Take};
    use crate::defer::DeferredRequest;
    use crate::error::BoxError;
    use crate::store::StoreFuture;

    /// Deferred records in this process's memory, for tests and examples: lost when the process
    /// ends. Leases expire on the tokio clock, so a paused clock drives them.
    #[derive(Clone, Default)]
    pub struct MemoryDeferSink {
        state: Arc<Mutex<State>>,
    }

    #[derive(Default)]
    struct State {
        records: HashMap<String, (DeferredRequest, DeferredStatus)>,
        due: BTreeSet<(u64, String)>,
        /// Lease token → record id, worker, last renewal.
        leases: HashMap<String, (String, String, Instant)>,
        next_token: u64,
        dead: Vec<(DeferredRequest, String)>,
    }

    impl MemoryDeferSink {
        /// An empty sink.
        pub fn new() -> Self {
            Self::default()
        }

        fn lock(&self) -> MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// Every record the sink holds (waiting, replaying, answered or dead), with its status.
        pub fn records(&self) -> Vec<(DeferredRequest, DeferredStatus)> {
            self.lock().records.values().cloned().collect()
        }

        /// The dead letters so far, with why each was given up.
        pub fn dead_letters(&self) -> Vec<(DeferredRequest, String)> {
            self.lock().dead.clone()
        }
    }

    impl std::fmt::Debug for MemoryDeferSink {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let s = self.lock();
            f.debug_struct("MemoryDeferSink")
                .field("records", &s.records.len())
                .field("due", &s.due.len())
                .field("leases", &s.leases.len())
                .finish()
        }
    }

    impl State {
        fn schedule(&mut self, record: DeferredRequest) {
            let status = DeferredStatus::Waiting {
                next_attempt_at_ms: record.next_attempt_at_ms,
                deferrals: record.deferrals,
            };
            self.due
                .insert((record.next_attempt_at_ms, record.id.clone()));
            self.records.insert(record.id.clone(), (record, status));
        }

        fn lease(&mut self, id: &str, worker: &str, token: String) -> Option<Lease> {
            let (record, status) = self.records.get_mut(id)?;
            *status = DeferredStatus::Replaying {
                deferrals: record.deferrals,
            };
            let lease = Lease::new(record.clone(), worker, token.clone());
            self.leases
                .insert(token, (id.to_owned(), worker.to_owned(), Instant::now()));
            Some(lease)
        }
    }

    impl DeferSink for MemoryDeferSink {
        fn put(&self, record: DeferredRequest) -> StoreFuture<Result<(), BoxError>> {
            self.lock().schedule(record);
            StoreFuture::ready(Ok(()))
        }

        fn take(&self, take: Take) -> StoreFuture<Result<Vec<Lease>, BoxError>> {
            let mut s = self.lock();
            let now = Instant::now();
            let mut out = Vec::new();
            // Leases whose workers stopped renewing them come first.
            let lapsed: Vec<String> = s
                .leases
                .iter()
                .filter(|(_, (_, _, renewed))| now.duration_since(*renewed) >= take.claim_after)
                .map(|(token, _)| token.clone())
                .take(take.max)
                .collect();
            for token in lapsed {
                if let Some((id, _, _)) = s.leases.remove(&token) {
                    s.next_token += 1;
                    let token = s.next_token.to_string();
                    out.extend(s.lease(&id, &take.worker, token));
                }
            }
            while out.len() < take.max {
                let Some(first) = s.due.first().cloned() else {
                    break;
                };
                if first.0 > take.now_ms {
                    break;
                }
                s.due.remove(&first);
                s.next_token += 1;
                let token = s.next_token.to_string();
                out.extend(s.lease(&first.1, &take.worker, token));
            }
            StoreFuture::ready(Ok(out))
        }

        fn renew(&self, lease: &Lease) -> StoreFuture<Result<bool, BoxError>> {
            let mut s = self.lock();
            let held = match s.leases.get_mut(&lease.token) {
                Some((_, worker, renewed)) if *worker == lease.worker => {
                    *renewed = Instant::now();
                    true
                }
                _ => false,
            };
            StoreFuture::ready(Ok(held))
        }

        fn finish(&self, lease: Lease, end: LeaseEnd) -> StoreFuture<Result<bool, BoxError>> {
            let mut s = self.lock();
            match s.leases.get(&lease.token) {
                Some((_, worker, _)) if *worker == lease.worker => {}
                _ => return StoreFuture::ready(Ok(false)),
            }
            s.leases.remove(&lease.token);
            let id = lease.record.id.clone();
            match end {
                LeaseEnd::Answered => {
                    if let Some((_, status)) = s.records.get_mut(&id) {
                        *status = DeferredStatus::Answered;
                    }
                }
                LeaseEnd::Deferred(record) => s.schedule(*record),
                LeaseEnd::DeadLetter { reason } => {
                    if let Some((_, status)) = s.records.get_mut(&id) {
                        *status = DeferredStatus::DeadLetter {
                            reason: reason.clone(),
                        };
                    }
                    s.dead.push((lease.record, reason));
                }
            }
            StoreFuture::ready(Ok(true))
        }

        fn next_due(&self) -> StoreFuture<Result<Option<u64>, BoxError>> {
            StoreFuture::ready(Ok(self.lock().due.first().map(|(at, _)| *at)))
        }

        fn status(&self, id: &str) -> StoreFuture<Result<Option<DeferredStatus>, BoxError>> {
            let status = self.lock().records.get(id).map(|(_, s)| s.clone());
            StoreFuture::ready(Ok(status))
        }
    }
}
