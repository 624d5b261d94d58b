//! Waiting for a permit inside a response future, with a timer for the queue timeout and
//! the request's own deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

use crate::error::Overloaded;
use crate::limiter::{Granted, WaitPoll, Waiter};

/// A queued request's wait. The timer is boxed because only requests that actually queue
/// pay for it; the admitted fast path never builds one.
#[derive(Debug)]
pub(crate) struct Acquire {
    waiter: Waiter,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Acquire {
    pub(crate) fn new(waiter: Waiter) -> Self {
        Acquire {
            waiter,
            sleep: None,
        }
    }

    pub(crate) fn poll_acquire(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Granted, Overloaded>> {
        // The timer firing means the give-up time passed, so the next waiter poll sheds;
        // the bound only guards against a timer that fires a hair early.
        for _ in 0..3 {
            match self.waiter.poll(cx, Instant::now) {
                // The timer is kept: a granted request may need it while its service gets ready.
                WaitPoll::Ready(result) => return Poll::Ready(result),
                WaitPoll::Pending(None) => {
                    self.sleep = None;
                    return Poll::Pending;
                }
                WaitPoll::Pending(Some(at)) => {
                    if self.poll_timer(cx, at).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Ready once `at` has passed; otherwise arranges a wake-up at `at`.
    pub(crate) fn poll_timer(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if sleep.deadline() != at {
                    sleep.as_mut().reset(at);
                }
                sleep
            }
            none => none.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        sleep.as_mut().poll(cx)
    }
}
