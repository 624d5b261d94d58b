//! Waiting for a permit inside a response future, with a timer for the queue timeout and
//! the request's own deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

use crate::error::Overloaded;
use crate::limiter::{Permit, WaitPoll, Waiter};

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
    ) -> Poll<Result<Permit, Overloaded>> {
        // The timer firing means the give-up time passed, so the next waiter poll sheds;
        // the bound only guards against a timer that fires a hair early.
        for _ in 0..3 {
            match self.waiter.poll(cx, Instant::now) {
                WaitPoll::Ready(result) => {
                    self.sleep = None;
                    return Poll::Ready(result);
                }
                WaitPoll::Pending(None) => {
                    self.sleep = None;
                    return Poll::Pending;
                }
                WaitPoll::Pending(Some(at)) => {
                    let sleep = match &mut self.sleep {
                        Some(sleep) => {
                            if sleep.deadline() != at {
                                sleep.as_mut().reset(at);
                            }
                            sleep
                        }
                        none => none.insert(Box::pin(tokio::time::sleep_until(at))),
                    };
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}
