//! Deferred records on a Redis Stream: [`RedisDeferSink`].

use std::sync::Arc;
use std::time::Duration;

use ::redis::Value;
use bytes::Bytes;

use super::cache::text;
use super::{RedisStore, ms, tag};
use crate::BoxError;
use crate::defer::{
    DeferSink, DeferredRequest, DeferredStatus, Lease, LeaseEnd, StoreFuture, Take, now_ms,
};

/// Deferred records kept in Redis and shared by every replica's workers.
///
/// A record waits in a sorted set by its due time; when a worker takes, the due records move
/// onto a Redis Stream read by one consumer group, so each goes to exactly one worker. The
/// stream entry stays pending — the worker's lease — until the replay has ended: the entry is
/// acknowledged in the same step (one Lua script) as the record is marked answered, rescheduled
/// or made a dead letter. A renewal resets the entry's idle time; an entry idle for
/// `claim_after` (its worker died) is claimed by the next worker that takes (`XAUTOCLAIM`).
/// A worker whose entry was claimed by another learns it at its next renewal, or when it
/// finishes, which then changes nothing.
///
/// Dead letters keep their record and are listed on a stream of their own
/// ([`dead_letters`](Self::dead_letters)); an answered record's body is deleted at once and its
/// status kept for the [`retention`](Self::retention) (a day by default).
///
/// It shares the [`RedisStore`]'s connection and timeout. Every key carries the queue's hash
/// tag, so a queue lives in one Redis Cluster slot. Redis must keep its data (AOF or RDB) for
/// records to survive a restart of the server itself.
#[derive(Clone, Debug)]
pub struct RedisDeferSink {
    store: RedisStore,
    keys: Arc<[String]>,
    retention: Duration,
}

impl RedisDeferSink {
    /// A sink on the Redis of `store`, for the queue `deferred`.
    pub fn new(store: &RedisStore) -> Self {
        Self {
            keys: keys(&store.inner.prefix, "deferred"),
            store: store.clone(),
            retention: Duration::from_secs(24 * 3600),
        }
    }

    /// The same sink on the queue `name` (each queue has its own records and workers).
    pub fn queue(mut self, name: &str) -> Self {
        self.keys = keys(&self.store.inner.prefix, name);
        self
    }

    /// How long the status of an answered record stays readable.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Up to `max` dead letters, oldest first, each with why it was given up.
    pub async fn dead_letters(
        &self,
        max: usize,
    ) -> Result<Vec<(DeferredRequest, String)>, BoxError> {
        let mut conn = self.store.inner.conn.clone();
        let timeout = self.store.inner.timeout;
        let mut range = ::redis::cmd("XRANGE");
        range
            .arg(&self.keys[6])
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(max);
        let read = range.query_async::<Vec<(String, Vec<(String, String)>)>>(&mut conn);
        let entries = tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))??;
        let mut out = Vec::with_capacity(entries.len());
        for (_, fields) in entries {
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            let (Some(id), Some(reason)) = (field("id"), field("reason")) else {
                continue;
            };
            let mut pipe = ::redis::pipe();
            pipe.hget(&self.keys[2], &id).hget(&self.keys[3], &id);
            let read = pipe.query_async::<(Option<Vec<u8>>, Option<Vec<u8>>)>(&mut conn);
            let (meta, body) = tokio::time::timeout(timeout, read)
                .await
                .map_err(|_| format!("no answer within {timeout:?}"))??;
            let record = meta.and_then(|m| {
                DeferredRequest::from_meta_json(&m, Bytes::from(body.unwrap_or_default()))
            });
            if let Some(record) = record {
                out.push((record, reason));
            }
        }
        Ok(out)
    }

    fn eval(
        &self,
        lua: fn(&super::scripts::Scripts) -> &super::scripts::Lua,
        args: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Value, BoxError>> + Send + 'static {
        let inner = self.store.inner.clone();
        let keys = self.keys.clone();
        async move {
            inner
                .eval(lua(&inner.scripts), &keys, &args)
                .await
                .map_err(BoxError::from)
        }
    }

    /// The finish script's arguments: the lease's entry `token`, its `worker`, the record `id`.
    fn finish_args(&self, token: &str, worker: &str, id: &str, end: &LeaseEnd) -> Vec<Vec<u8>> {
        let (kind, meta, at, reason) = match end {
            LeaseEnd::Answered => ("answered", String::new(), 0, ""),
            LeaseEnd::Deferred(next) => ("deferred", next.meta_json(), next.next_attempt_at_ms, ""),
            LeaseEnd::DeadLetter { reason } => ("dead", String::new(), 0, reason.as_str()),
        };
        [
            token.to_owned(),
            worker.to_owned(),
            id.to_owned(),
            kind.to_owned(),
            now_ms().to_string(),
            ms(self.retention),
            meta,
            at.to_string(),
            reason.to_owned(),
        ]
        .into_iter()
        .map(String::into_bytes)
        .collect()
    }
}

/// The queue's keys, in the order the scripts name them.
fn keys(prefix: &str, queue: &str) -> Arc<[String]> {
    let q = tag(queue);
    ["due", "stream", "rec", "body", "status", "answered", "dead"]
        .iter()
        .map(|k| format!("{prefix}:defer:{{{q}}}:{k}"))
        .collect()
}

fn utf8(v: &Value) -> Option<&str> {
    text(v).and_then(|t| std::str::from_utf8(t).ok())
}

fn ok(v: &Value) -> bool {
    matches!(v, Value::Int(1))
}

impl DeferSink for RedisDeferSink {
    fn put(&self, record: DeferredRequest) -> StoreFuture<Result<(), BoxError>> {
        let args = vec![
            record.id.clone().into_bytes(),
            record.meta_json().into_bytes(),
            record.body.to_vec(),
            record.next_attempt_at_ms.to_string().into_bytes(),
        ];
        let put = self.eval(|s| &s.defer_put, args);
        StoreFuture::new(async move { put.await.map(drop) })
    }

    fn take(&self, take: Take) -> StoreFuture<Result<Vec<Lease>, BoxError>> {
        let args = [
            take.worker.clone(),
            take.now_ms.to_string(),
            take.max.max(1).to_string(),
            ms(take.claim_after),
        ];
        let taken = self.eval(
            |s| &s.defer_take,
            args.into_iter().map(String::into_bytes).collect(),
        );
        let sink = self.clone();
        StoreFuture::new(async move {
            let Value::Array(entries) = taken.await? else {
                return Err("an unexpected reply to a take".into());
            };
            let mut leases = Vec::with_capacity(entries.len());
            for entry in entries {
                let Value::Array(parts) = entry else { continue };
                let [eid, id, meta, body] = parts.as_slice() else {
                    continue;
                };
                let (Some(eid), Some(id)) = (utf8(eid), utf8(id)) else {
                    continue;
                };
                let body = text(body).map(Bytes::copy_from_slice).unwrap_or_default();
                match text(meta).and_then(|m| DeferredRequest::from_meta_json(m, body)) {
                    Some(record) => leases.push(Lease::new(record, &take.worker, eid)),
                    None => {
                        // Not a record this crate wrote: given up at once, never retried.
                        tracing::warn!(
                            entry = eid,
                            "unreadable deferred record made a dead letter"
                        );
                        let end = LeaseEnd::DeadLetter {
                            reason: "the record could not be read".to_owned(),
                        };
                        let args = sink.finish_args(eid, &take.worker, id, &end);
                        sink.eval(|s| &s.defer_finish, args).await?;
                    }
                }
            }
            Ok(leases)
        })
    }

    fn renew(&self, lease: &Lease) -> StoreFuture<Result<bool, BoxError>> {
        let args = vec![
            lease.token.clone().into_bytes(),
            lease.worker.clone().into_bytes(),
        ];
        let renewed = self.eval(|s| &s.defer_renew, args);
        StoreFuture::new(async move { renewed.await.map(|v| ok(&v)) })
    }

    fn finish(&self, lease: Lease, end: LeaseEnd) -> StoreFuture<Result<bool, BoxError>> {
        let args = self.finish_args(&lease.token, &lease.worker, &lease.record.id, &end);
        let finished = self.eval(|s| &s.defer_finish, args);
        StoreFuture::new(async move { finished.await.map(|v| ok(&v)) })
    }

    fn next_due(&self) -> StoreFuture<Result<Option<u64>, BoxError>> {
        let asked = self.eval(|s| &s.defer_status, vec![Vec::new()]);
        StoreFuture::new(async move {
            let Value::Array(parts) = asked.await? else {
                return Ok(None);
            };
            Ok(parts
                .get(2)
                .and_then(utf8)
                .and_then(|t| t.parse::<f64>().ok())
                .map(|at| at.max(0.0) as u64))
        })
    }

    fn status(&self, id: &str) -> StoreFuture<Result<Option<DeferredStatus>, BoxError>> {
        let asked = self.eval(|s| &s.defer_status, vec![id.as_bytes().to_vec()]);
        StoreFuture::new(async move {
            let Value::Array(parts) = asked.await? else {
                return Ok(None);
            };
            let status = parts.first().and_then(text).unwrap_or_default();
            let meta = parts.get(1).and_then(text).unwrap_or_default();
            let record = DeferredRequest::from_meta_json(meta, Bytes::new());
            let deferrals = record.as_ref().map_or(0, |r| r.deferrals);
            Ok(match status {
                b"" => None,
                b"waiting" => record.map(|r| DeferredStatus::Waiting {
                    next_attempt_at_ms: r.next_attempt_at_ms,
                    deferrals,
                }),
                b"replaying" => Some(DeferredStatus::Replaying { deferrals }),
                b"answered" => Some(DeferredStatus::Answered),
                other => Some(DeferredStatus::DeadLetter {
                    reason: String::from_utf8_lossy(other.strip_prefix(b"dead:").unwrap_or(other))
                        .into_owned(),
                }),
            })
        })
    }
}
