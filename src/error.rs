//! The crate's one error type.

use std::fmt;
use std::time::Duration;

use crate::attempt_log::{AttemptLog, StreamCause};
use crate::classify::{Classification, FailureClass};
use crate::route::RouteName;

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong, for matching. New kinds may be added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The inner service (the transport) failed without a response: connect, timeout, protocol.
    /// The failure class is in [`Error::class`].
    Transport,
    /// The route's circuit is open; no call was made.
    CircuitOpen {
        /// The route.
        route: RouteName,
        /// When the breaker will admit a probe.
        retry_in: Duration,
    },
    /// The route has no backup and its throttle turned the call away: the provider refused
    /// too many of the route's recent calls. No call was made.
    Throttled {
        /// The route.
        route: RouteName,
        /// When the throttle lets the next call through whatever its probability.
        retry_in: Duration,
    },
    /// A spend cap would be exceeded; the request was not sent (fail closed).
    BudgetExhausted {
        /// The budget owner whose cap was reached, if known.
        owner: Option<String>,
    },
    /// The store of shared state (spend, rate limits) could not be asked in time, and the
    /// policy says to fail closed then; the request was not sent.
    StoreUnavailable,
    /// Another request with the same idempotency key is still being answered, and the cache's
    /// policy refuses duplicates in flight.
    InFlight,
    /// The idempotency key was sent before with another request body: a client bug, never
    /// answered with the other request's result.
    IdempotencyKeyReused,
    /// A client-side rate limit rejected the request.
    RateLimited {
        /// When capacity is expected.
        retry_in: Duration,
    },
    /// The request's deadline passed.
    DeadlineExceeded,
    /// A layer stopped on a fail-closed rule and there is no provider response to hand back
    /// (for example an in-band safety block in a stream before its commit point).
    FailedClosed {
        /// The class that was not routed around.
        class: FailureClass,
    },
    /// A stream failed before its commit point: nothing reached the caller, and the layers above
    /// may retry or fall back.
    StreamFailed {
        /// Why.
        cause: StreamCause,
    },
    /// The request was written down to be replayed later (the queue rung, see
    /// [`defer`](crate::defer)): no answer now, a record's id and when it is due.
    Deferred(crate::defer::Deferred),
    /// A stream failed after its commit point: bytes reached the caller, nothing is retried.
    StreamInterrupted {
        /// Bytes handed to the caller before the failure.
        delivered_bytes: u64,
        /// Why.
        cause: StreamCause,
    },
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Transport => f.write_str("transport failed"),
            ErrorKind::CircuitOpen { route, retry_in } => {
                write!(
                    f,
                    "circuit open for route `{route}`, next probe in {retry_in:?}"
                )
            }
            ErrorKind::Throttled { route, retry_in } => {
                write!(
                    f,
                    "route `{route}` throttled locally, next call let through in {retry_in:?}"
                )
            }
            ErrorKind::BudgetExhausted { owner: Some(o) } => {
                write!(f, "spend cap of budget owner `{o}` reached")
            }
            ErrorKind::BudgetExhausted { owner: None } => f.write_str("spend cap reached"),
            ErrorKind::RateLimited { retry_in } => {
                write!(f, "rate limited locally, capacity in {retry_in:?}")
            }
            ErrorKind::DeadlineExceeded => f.write_str("deadline exceeded"),
            ErrorKind::StoreUnavailable => f.write_str("the shared-state store is unavailable"),
            ErrorKind::InFlight => {
                f.write_str("a request with this idempotency key is still being answered")
            }
            ErrorKind::IdempotencyKeyReused => {
                f.write_str("the idempotency key was used before with another request body")
            }
            ErrorKind::FailedClosed { class } => write!(f, "failed closed on {class}"),
            ErrorKind::Deferred(d) => write!(
                f,
                "deferred as record `{}`, replay in {}ms",
                d.id,
                d.retry_in.as_millis()
            ),
            ErrorKind::StreamFailed { cause } => {
                write!(f, "stream failed before its commit point: {cause}")
            }
            ErrorKind::StreamInterrupted {
                delivered_bytes,
                cause,
            } => write!(
                f,
                "stream interrupted after {delivered_bytes} bytes reached the caller: {cause}"
            ),
        }
    }
}

/// The error of every layer in the crate.
///
/// Carries its [`ErrorKind`], the failure class, the source chain, and the request's
/// [`AttemptLog`]. A layer that receives an `Error` from an inner layer passes it on as it is.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    class: Option<FailureClass>,
    classification: Option<Classification>,
    source: Option<BoxError>,
    log: Option<AttemptLog>,
    /// Set by the breaker: the route is in an outage young enough to wait out, and the
    /// throttle's window moves on in this long (see `ThrottlePolicy::hold`).
    wait_out: Option<Duration>,
}

impl Error {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind) -> Self {
        let class = match &kind {
            ErrorKind::FailedClosed { class } => Some(*class),
            ErrorKind::StreamFailed { cause } => Some(cause.class()),
            ErrorKind::StreamInterrupted { .. } => Some(FailureClass::StreamInterrupted),
            _ => None,
        };
        Self {
            inner: Box::new(Inner {
                kind,
                class,
                classification: None,
                source: None,
                log: None,
                wait_out: None,
            }),
        }
    }

    /// A transport failure of `class` caused by `source`.
    pub fn transport(class: FailureClass, source: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Transport)
            .with_class(class)
            .with_source(source)
    }

    /// Turns an inner service's error into an `Error`: a crate `Error` passes through unchanged;
    /// anything else is classified from its source chain by `classify`.
    pub fn from_service_error(
        error: impl Into<BoxError>,
        classify: impl FnOnce(&(dyn std::error::Error + 'static)) -> Classification,
    ) -> Self {
        let error: BoxError = error.into();
        match error.downcast::<Error>() {
            Ok(e) => *e,
            Err(other) => {
                let c = classify(&*other);
                let class = c.class.unwrap_or(FailureClass::Transport);
                Self::transport(class, other).with_classification(c)
            }
        }
    }

    /// Marks the error of a call whose route is in an outage young enough to wait out.
    pub(crate) fn with_wait_out(mut self, next_move: Duration) -> Self {
        self.inner.wait_out = Some(next_move);
        self
    }

    /// When the error is marked as a young outage's: the time until the throttle's window
    /// moves on.
    pub(crate) fn wait_out(&self) -> Option<Duration> {
        self.inner.wait_out
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.inner.kind
    }

    /// The deferred record, when the request was deferred.
    pub fn deferred(&self) -> Option<&crate::defer::Deferred> {
        match &self.inner.kind {
            ErrorKind::Deferred(d) => Some(d),
            _ => None,
        }
    }

    /// The failure class, when the error stands for one.
    pub fn class(&self) -> Option<FailureClass> {
        self.inner.class
    }

    /// The classification of the failure, when a classifier saw it.
    pub fn classification(&self) -> Option<&Classification> {
        self.inner.classification.as_ref()
    }

    /// The attempt log of the request that failed.
    pub fn attempt_log(&self) -> Option<&AttemptLog> {
        self.inner.log.as_ref()
    }

    /// Sets the failure class.
    pub fn with_class(mut self, class: FailureClass) -> Self {
        self.inner.class = Some(class);
        self
    }

    /// Attaches a classification (and takes its class).
    pub fn with_classification(mut self, c: Classification) -> Self {
        if let Some(class) = c.class {
            self.inner.class = Some(class);
        }
        self.inner.classification = Some(c);
        self
    }

    /// Sets the source error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Attaches the attempt log (keeps one already attached).
    pub fn with_log(mut self, log: &AttemptLog) -> Self {
        if self.inner.log.is_none() {
            self.inner.log = Some(log.clone());
        }
        self
    }

    /// Whether this error is a crate error of the given class.
    pub fn is_class(&self, class: FailureClass) -> bool {
        self.inner.class == Some(class)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind);
        if let Some(c) = self.inner.class {
            d.field("class", &c);
        }
        if let Some(s) = &self.inner.source {
            d.field("source", &format_args!("{s}"));
        }
        if let Some(log) = &self.inner.log {
            d.field("attempts", &log.attempt_count());
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner.kind, f)?;
        if let (ErrorKind::Transport, Some(c)) = (&self.inner.kind, self.inner.class) {
            write!(f, " ({c})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|s| &**s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_errors_pass_through_unwrapped() {
        let e = Error::new(ErrorKind::DeadlineExceeded);
        let boxed: BoxError = Box::new(e);
        let again = Error::from_service_error(boxed, |_| unreachable!("not reclassified"));
        assert_eq!(again.kind(), &ErrorKind::DeadlineExceeded);
        assert!(std::error::Error::source(&again).is_none());
    }

    #[test]
    fn a_throttled_call_names_its_route_and_wait() {
        let e = Error::new(ErrorKind::Throttled {
            route: RouteName::new("primary"),
            retry_in: Duration::from_millis(40),
        });
        assert_eq!(
            e.to_string(),
            "route `primary` throttled locally, next call let through in 40ms"
        );
        assert_eq!(e.class(), None, "a local decision, not a provider failure");
    }

    #[test]
    fn foreign_errors_keep_their_source_and_class() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::from_service_error(io, |_| Classification::failure(FailureClass::Connect));
        assert_eq!(e.kind(), &ErrorKind::Transport);
        assert_eq!(e.class(), Some(FailureClass::Connect));
        assert_eq!(e.to_string(), "transport failed (connect)");
        assert!(std::error::Error::source(&e).is_some());
    }
}
