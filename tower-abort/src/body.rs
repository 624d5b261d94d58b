use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Sleep};

use crate::error::{Aborted, BoxError};
use crate::guard::ClientGoneGuard;
use crate::AbortReason;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Streaming,
    /// The deadline passed while streaming and the signal fired; waiting out the grace.
    Grace,
    /// Ended: by the inner body's end, its error, or ours.
    Done,
}

pin_project! {
    /// Response body of [`Abort`](crate::Abort).
    ///
    /// Until the inner body reports its end, dropping it fires the request's signal with
    /// [`AbortReason::ClientGone`]: that is how a client leaving a streaming (SSE) response
    /// is seen. If the request's deadline passes while the body streams, the signal fires
    /// with [`AbortReason::DeadlineExceeded`] and, after the grace period of
    /// [`TimeoutMode::Cooperative`](crate::TimeoutMode::Cooperative) (at once in
    /// [`TimeoutMode::Drop`](crate::TimeoutMode::Drop)), the body ends with
    /// an [`Aborted`] error, which makes the server reset the stream or close the
    /// connection: the status line is already gone.
    ///
    /// Frames, [`is_end_stream`](Body::is_end_stream) and [`size_hint`](Body::size_hint)
    /// are the inner body's.
    pub struct AbortBody<B> {
        // First, so it is dropped first: the signal fires before the inner body (and the
        // stream producing it) is dropped.
        guard: ClientGoneGuard,
        #[pin]
        inner: Option<B>,
        // Boxed: only a body still streaming when a deadline applies needs a timer, and
        // an inline `Sleep` would make every response bigger to move.
        sleep: Option<Pin<Box<Sleep>>>,
        phase: Phase,
    }
}

impl<B> AbortBody<B> {
    /// Wraps `inner`, guarded by `guard` until its end. The caller disarms the guard of a
    /// body that is already at its end (the server may drop it without a poll).
    pub(crate) fn new(inner: B, guard: ClientGoneGuard) -> Self {
        AbortBody {
            guard,
            inner: Some(inner),
            sleep: None,
            phase: Phase::Streaming,
        }
    }

    /// The empty body of the timeout response.
    pub(crate) fn empty() -> Self {
        AbortBody {
            inner: None,
            sleep: None,
            phase: Phase::Done,
            guard: ClientGoneGuard::disarmed(),
        }
    }
}

impl<B> Body for AbortBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.phase == Phase::Done {
            return Poll::Ready(None);
        }
        let deadline = this.guard.signal().and_then(|s| s.deadline());
        loop {
            // The deadline first, once its timer is armed (below): a body whose frames are
            // always ready never returns `Pending`, and must still end at its deadline.
            if let (Some(deadline), Some(sleep)) = (deadline, this.sleep.as_mut()) {
                while sleep.as_mut().poll(cx).is_ready() {
                    // Looked up only now: most bodies never reach their deadline.
                    let grace = this
                        .guard
                        .signal()
                        .map_or(std::time::Duration::ZERO, |s| s.mode().grace());
                    if let Some(signal) = this.guard.signal() {
                        signal.fire(AbortReason::DeadlineExceeded);
                    }
                    if *this.phase == Phase::Streaming && !grace.is_zero() {
                        // Let the body's producer see the signal and finish cleanly first.
                        *this.phase = Phase::Grace;
                        let backstop = deadline.checked_add(grace).unwrap_or(deadline);
                        sleep.as_mut().reset(backstop);
                        continue;
                    }
                    if *this.phase == Phase::Grace {
                        crate::event::backstop(AbortReason::DeadlineExceeded, grace);
                    }
                    *this.phase = Phase::Done;
                    this.guard.disarm();
                    this.inner.set(None);
                    *this.sleep = None;
                    return Poll::Ready(Some(Err(
                        Aborted::new(AbortReason::DeadlineExceeded).into()
                    )));
                }
            }
            let Some(inner) = this.inner.as_mut().as_pin_mut() else {
                return Poll::Ready(None);
            };
            match inner.poll_frame(cx) {
                Poll::Ready(None) => {
                    *this.phase = Phase::Done;
                    this.guard.disarm();
                    *this.sleep = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are the last frame: hyper sends them and drops the body unpolled.
                    if frame.is_trailers()
                        || this
                            .inner
                            .as_ref()
                            .as_pin_ref()
                            .is_some_and(|b| b.is_end_stream())
                    {
                        *this.phase = Phase::Done;
                        this.guard.disarm();
                    } else if let (Some(deadline), None) = (deadline, this.sleep.as_ref()) {
                        // Arm the timer so the deadline is checked on the next poll.
                        let mut sleep = Box::pin(sleep_until(deadline));
                        let _ = sleep.as_mut().poll(cx);
                        *this.sleep = Some(sleep);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(err))) => {
                    // The body failed on its own; the server will reset the stream. Not a
                    // client going away.
                    *this.phase = Phase::Done;
                    this.guard.disarm();
                    *this.sleep = None;
                    return Poll::Ready(Some(Err(err.into())));
                }
                Poll::Pending => match deadline {
                    // Arm the timer and check it at once (it may have passed already).
                    Some(deadline) if this.sleep.is_none() => {
                        *this.sleep = Some(Box::pin(sleep_until(deadline)));
                    }
                    _ => return Poll::Pending,
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.phase == Phase::Done || self.inner.as_ref().map_or(true, Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if self.phase != Phase::Done => inner.size_hint(),
            _ => SizeHint::with_exact(0),
        }
    }
}

impl<B> fmt::Debug for AbortBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AbortBody")
            .field("phase", &self.phase)
            .field("signal", &self.guard.signal())
            .finish()
    }
}
