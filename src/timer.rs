//! The two ways the layers wait for an instant without a timer of their own per poll.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// Polls a timer for `at` that is made the first time it is needed: a request answered at once
/// never registers one.
pub(crate) fn poll_lazy(
    mut timer: Pin<&mut Option<Sleep>>,
    at: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if timer.is_none() {
        timer.set(Some(tokio::time::sleep_until(at)));
    }
    match timer.as_pin_mut() {
        Some(sleep) => sleep.poll(cx),
        None => Poll::Pending,
    }
}

/// Polls a reusable timer, moved to `at` first if it is set for another instant.
pub(crate) fn poll_at(mut sleep: Pin<&mut Sleep>, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
    if sleep.deadline() != at {
        sleep.as_mut().reset(at);
    }
    sleep.poll(cx)
}
