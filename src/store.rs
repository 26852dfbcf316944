//! The seam to state that may live outside this process: what a store's answer looks like.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// A store's answer in flight: ready at once for a store in memory, a future for a networked
/// one (boxed: a store is used behind `dyn`).
pub struct StoreFuture<T>(Repr<T>);

enum Repr<T> {
    Ready(Option<T>),
    Pending(Pin<Box<dyn Future<Output = T> + Send>>),
}

impl<T> StoreFuture<T> {
    /// An answer known at once.
    pub fn ready(value: T) -> Self {
        Self(Repr::Ready(Some(value)))
    }

    /// An answer that `future` gives.
    pub fn new(future: impl Future<Output = T> + Send + 'static) -> Self {
        Self(Repr::Pending(Box::pin(future)))
    }

    /// The answer if it is there without waiting: what a caller without a task to wake asks
    /// first. A pending future is kept and must be polled later.
    pub(crate) fn now(&mut self) -> Option<T> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(self).poll(&mut cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }
}

// The answer is never pinned: the future holds it only to hand it over.
impl<T> Unpin for StoreFuture<T> {}

impl<T> Future for StoreFuture<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match &mut self.0 {
            Repr::Ready(v) => match v.take() {
                Some(v) => Poll::Ready(v),
                None => panic!("StoreFuture polled after completion"),
            },
            Repr::Pending(f) => f.as_mut().poll(cx),
        }
    }
}

impl<T> fmt::Debug for StoreFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.0 {
            Repr::Ready(Some(_)) => "ready",
            Repr::Ready(None) => "done",
            Repr::Pending(_) => "pending",
        };
        f.debug_tuple("StoreFuture").field(&state).finish()
    }
}

/// An id no other request of any replica is likely to have: the process's random hash keys
/// over a counter, so there is no coordination and no clock in it.
pub(crate) fn unique_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut h = KEYS.get_or_init(Default::default).build_hasher();
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    h.finish()
}
