use std::fmt;
use std::future::{Future, poll_fn};
use std::marker::PhantomData;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use tower_service::Service;

use super::record::{Again, Replaying, now_ms};
use super::{DeferSink, Deferred, DeferredRequest, Lease, LeaseEnd, Take};
use crate::RouteName;
use crate::error::{BoxError, Error, ErrorKind};
use crate::observe::{Alert, AlertKind, AlertSink};
use crate::policy::DeferPolicy;
use crate::replay::ReplayBody;

type Credentials = Arc<dyn Fn(&DeferredRequest, &mut HeaderMap) + Send + Sync>;
type OnResult = Arc<dyn Fn(Replayed) + Send + Sync>;

/// Replays deferred records once they are due, through a stack that defers to the same sink.
///
/// Each worker takes one due record at a time under a lease, renews the lease while the
/// replay runs, and ends it only when the replay has ended:
///
/// - **answered** — the answer (read to its end) goes to the [`on_result`](Self::on_result)
///   callback and the record is done;
/// - **deferred again** — the stack deferred the replay (the provider still refuses): the
///   record comes back with one more deferral and its new due time;
/// - **dead letter** — the replay failed on a class that is not deferred, or the record has
///   been deferred `max_deferrals` times: it is kept as a dead letter, an
///   [`AlertKind::DeadLetter`] goes to the alert sink when there is one, and the callback
///   hears of it.
///
/// A replay is sent with the record's idempotency key (it is among the record's headers) and
/// its credential from the route, or from the [`credentials`](Self::credentials) hook: the
/// record holds none. A worker that dies mid-replay stops renewing its lease; another worker
/// takes the record over after `claim_after` and replays it with the same key. A worker whose
/// lease was taken over stops its replay at its next renewal.
pub struct DeferredWorker<S, B> {
    service: S,
    sink: Arc<dyn DeferSink>,
    policy: DeferPolicy,
    name: String,
    credentials: Option<Credentials>,
    on_result: Option<OnResult>,
    alerts: Option<Arc<dyn AlertSink>>,
    _body: PhantomData<fn() -> B>,
}

/// What became of one replayed record, for the [`DeferredWorker::on_result`] callback.
#[derive(Debug)]
#[non_exhaustive]
pub struct Replayed {
    /// The record as it was replayed.
    pub record: DeferredRequest,
    /// How the replay ended.
    pub outcome: ReplayOutcome,
}

/// How a replay ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReplayOutcome {
    /// The provider answered; the whole answer.
    Answered(http::Response<Bytes>),
    /// Deferred again, due at the new time.
    Deferred(Deferred),
    /// Given up: a dead letter.
    DeadLetter {
        /// Why, in a few words.
        reason: String,
        /// The provider's answer, when the replay ended on a failure response.
        response: Option<http::Response<Bytes>>,
        /// The error, when the replay ended on one.
        error: Option<Error>,
    },
}

impl<S, B> DeferredWorker<S, B> {
    /// A worker taking records from `sink` and replaying them through `service` (the stack
    /// whose budget layer defers to the same sink), by the rules of `policy` (the policy's
    /// `budget.defer` section).
    pub fn new(service: S, sink: Arc<dyn DeferSink>, policy: DeferPolicy) -> Self {
        Self {
            service,
            sink,
            policy,
            name: format!("worker-{:016x}", crate::store::unique_id()),
            credentials: None,
            on_result: None,
            alerts: None,
            _body: PhantomData,
        }
    }

    /// Names the worker (unique among the workers of one sink; a random name by default).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the credential of each replay: `hook` gets the record (its `route` and
    /// `key_fingerprint` say which key it was sent with) and the replay's headers.
    pub fn credentials(
        mut self,
        hook: impl Fn(&DeferredRequest, &mut HeaderMap) + Send + Sync + 'static,
    ) -> Self {
        self.credentials = Some(Arc::new(hook));
        self
    }

    /// Hands every replay's end to `callback` (store the answer for the caller, say).
    pub fn on_result(mut self, callback: impl Fn(Replayed) + Send + Sync + 'static) -> Self {
        self.on_result = Some(Arc::new(callback));
        self
    }

    /// Sends an [`AlertKind::DeadLetter`] alert to `sink` for each dead letter.
    pub fn alerts(mut self, sink: Arc<dyn AlertSink>) -> Self {
        self.alerts = Some(sink);
        self
    }
}

impl<S, B, RB> DeferredWorker<S, B>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes>,
    RB::Error: Into<BoxError>,
    B: ReplayBody,
{
    /// Replays records as they come due, forever. A sink that cannot be reached is asked again
    /// after the policy's `poll_interval`.
    pub async fn run(mut self) {
        loop {
            match self.run_once().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(worker = self.name.as_str(), error = %e, "deferred sink unavailable");
                }
            }
            let poll = self.policy.poll_interval;
            let wait = match self.sink.next_due().await {
                Ok(Some(at)) => Duration::from_millis(at.saturating_sub(now_ms())).min(poll),
                _ => poll,
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes one due record, if there is one, and replays it to its end: `true` when there
    /// was one.
    pub async fn run_once(&mut self) -> Result<bool, BoxError> {
        let take = Take::new(&self.name, now_ms(), 1, self.policy.claim_after);
        let leases = self.sink.take(take).await?;
        let any = !leases.is_empty();
        for lease in leases {
            self.replay(lease).await?;
        }
        Ok(any)
    }

    async fn replay(&mut self, lease: Lease) -> Result<(), BoxError> {
        let record = lease.record.clone();
        let Some(mut req) = record.to_request::<B>() else {
            let reason = "the record does not make a valid request".to_owned();
            return self.dead(lease, reason, None, None).await;
        };
        if let Some(hook) = &self.credentials {
            hook(&record, req.headers_mut());
        }
        let again = Arc::new(Mutex::new(None));
        req.extensions_mut().insert(Replaying {
            record: Arc::new(record.clone()),
            again: again.clone(),
        });
        let sent = {
            let service = &mut self.service;
            let call = async move {
                poll_fn(|cx| service.poll_ready(cx))
                    .await
                    .map_err(Into::into)?;
                let resp = service.call(req).await.map_err(Into::into)?;
                let (parts, body) = resp.into_parts();
                let body = body.collect().await.map_err(Into::into)?.to_bytes();
                Ok::<_, BoxError>(http::Response::from_parts(parts, body))
            };
            let every = (self.policy.claim_after / 3).max(Duration::from_millis(1));
            match renewing(&*self.sink, &self.name, every, &lease, call).await {
                Some(sent) => sent,
                // Another worker has the record now: it replays it.
                None => return Ok(()),
            }
        };
        let again = again.lock().unwrap_or_else(PoisonError::into_inner).take();
        let exhausted = matches!(again, Some(Again::Exhausted));
        let reason = |last: String| match exhausted {
            true => format!(
                "deferred {} times, the most allowed; last: {last}",
                record.deferrals.saturating_add(1)
            ),
            false => last,
        };
        match sent {
            Ok(resp) if !(resp.status().is_client_error() || resp.status().is_server_error()) => {
                self.sink.finish(lease, LeaseEnd::Answered).await?;
                self.tell(record, ReplayOutcome::Answered(resp));
                Ok(())
            }
            Ok(resp) => {
                let reason = reason(format!("the provider answered {}", resp.status().as_u16()));
                self.dead(lease, reason, Some(resp), None).await
            }
            Err(e) => {
                let e = match e.downcast::<Error>() {
                    Ok(e) => *e,
                    Err(other) => Error::transport(crate::classify::FailureClass::Transport, other),
                };
                match (e.kind(), again) {
                    (ErrorKind::Deferred(deferred), Some(Again::Deferred(next))) => {
                        let deferred = deferred.clone();
                        self.sink.finish(lease, LeaseEnd::Deferred(next)).await?;
                        self.tell(record, ReplayOutcome::Deferred(deferred));
                        Ok(())
                    }
                    _ => {
                        let reason = reason(e.kind().to_string());
                        self.dead(lease, reason, None, Some(e)).await
                    }
                }
            }
        }
    }

    async fn dead(
        &self,
        lease: Lease,
        reason: String,
        response: Option<http::Response<Bytes>>,
        error: Option<Error>,
    ) -> Result<(), BoxError> {
        let record = lease.record.clone();
        let end = LeaseEnd::DeadLetter {
            reason: reason.clone(),
        };
        if !self.sink.finish(lease, end).await? {
            return Ok(());
        }
        if let Some(sink) = &self.alerts {
            let route = Some(RouteName::new(&record.route));
            let mut alert = Alert::new(AlertKind::DeadLetter, route, record.budget_owner.clone());
            alert.workflow = record.workflow.clone();
            alert.key_fingerprint = record.key_fingerprint.clone();
            alert.class = error
                .as_ref()
                .and_then(Error::class)
                .or(Some(record.reason.class));
            alert.status = response.as_ref().map(|r| r.status().as_u16());
            sink.send(alert).await;
        }
        let outcome = ReplayOutcome::DeadLetter {
            reason,
            response,
            error,
        };
        self.tell(record, outcome);
        Ok(())
    }

    fn tell(&self, record: DeferredRequest, outcome: ReplayOutcome) {
        if let Some(callback) = &self.on_result {
            callback(Replayed { record, outcome });
        }
    }
}

/// Runs `call`, renewing `lease` every `every`: `None` when the lease was lost (the call is
/// dropped, which cancels it).
async fn renewing<T>(
    sink: &dyn DeferSink,
    worker: &str,
    every: Duration,
    lease: &Lease,
    call: impl Future<Output = T>,
) -> Option<T> {
    let mut call = pin!(call);
    loop {
        let mut tick = pin!(tokio::time::sleep(every));
        let done = poll_fn(|cx| match call.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => tick.as_mut().poll(cx).map(|()| None),
        })
        .await;
        if let Some(v) = done {
            return Some(v);
        }
        match sink.renew(lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    worker,
                    record = lease.record.id.as_str(),
                    "lease on a deferred record lost to another worker; replay stopped"
                );
                return None;
            }
            // The sink cannot say whether the lease still stands: the replay goes on (it
            // carries its idempotency key), and its end is checked against the lease.
            Err(e) => tracing::warn!(
                worker,
                record = lease.record.id.as_str(),
                error = %e,
                "deferred lease not renewed: sink unavailable"
            ),
        }
    }
}

impl<S, B> fmt::Debug for DeferredWorker<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferredWorker")
            .field("name", &self.name)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}
