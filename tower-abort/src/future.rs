//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Sleep};

use crate::body::AbortBody;
use crate::guard::ClientGoneGuard;
use crate::{AbortReason, AbortSignal, TimeoutMode};

pub use crate::propagate::PropagateFuture;
pub use crate::signal::Aborted;
pub use crate::task::TaskHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the deadline (if any).
    Armed,
    /// The deadline passed and the signal fired; waiting out the grace period.
    Grace,
}

pin_project! {
    /// Response future of [`Abort`](crate::Abort).
    ///
    /// Dropping it before it completes fires the request's signal with
    /// [`AbortReason::ClientGone`].
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        // First, so it is dropped first: the signal fires before the handler's future is
        // dropped, and the handler's drop code sees `ClientGone`.
        guard: ClientGoneGuard,
        #[pin]
        inner: Option<F>,
        #[pin]
        sleep: Option<Sleep>,
        phase: Phase,
        timed_out: bool,
        mode: TimeoutMode,
        timeout: TimeoutAnswer,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        inner: F,
        signal: AbortSignal,
        mode: TimeoutMode,
        timeout: TimeoutAnswer,
    ) -> Self {
        ResponseFuture {
            guard: ClientGoneGuard::armed(signal),
            inner: Some(inner),
            sleep: None,
            phase: Phase::Armed,
            timed_out: false,
            mode,
            timeout,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<AbortBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            // The handler first: a response that is ready wins over a deadline that is too.
            let inner = this
                .inner
                .as_mut()
                .as_pin_mut()
                .expect("polled after completion");
            if let Poll::Ready(result) = inner.poll(cx) {
                this.inner.set(None);
                // Release the timer entry now; the body arms its own if it needs one.
                this.sleep.set(None);
                let signal = this
                    .guard
                    .disarm()
                    .expect("the guard is armed until completion");
                return Poll::Ready(result.map(|response| {
                    if *this.timed_out {
                        // The handler answered after its deadline: too late.
                        this.timeout.response()
                    } else {
                        wrap_response(response, signal, *this.mode)
                    }
                }));
            }

            let Some(deadline) = this.guard.signal().and_then(AbortSignal::deadline) else {
                return Poll::Pending;
            };
            if this.sleep.is_none() {
                this.sleep.set(Some(sleep_until(deadline)));
            }
            ready!(this
                .sleep
                .as_mut()
                .as_pin_mut()
                .expect("set above")
                .poll(cx));

            let grace = this.mode.grace();
            if *this.phase == Phase::Armed && !grace.is_zero() {
                if let Some(signal) = this.guard.signal() {
                    signal.fire(AbortReason::DeadlineExceeded);
                }
                *this.timed_out = true;
                *this.phase = Phase::Grace;
                let backstop = deadline.checked_add(grace).unwrap_or(deadline);
                this.sleep
                    .as_mut()
                    .as_pin_mut()
                    .expect("set above")
                    .reset(backstop);
                // Poll the handler again now: it has just been woken by the signal.
                continue;
            }

            // Drop mode, or the grace period ran out: the backstop.
            if let Some(signal) = this.guard.signal() {
                signal.fire(AbortReason::DeadlineExceeded);
            }
            if *this.phase == Phase::Grace {
                crate::event::backstop(AbortReason::DeadlineExceeded, grace);
            }
            // Drop the handler before answering, so its resources are released first.
            this.inner.set(None);
            this.sleep.set(None);
            this.guard.disarm();
            return Poll::Ready(Ok(this.timeout.response()));
        }
    }
}

/// How a request whose deadline passed before its response is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimeoutAnswer {
    /// An empty response with this status (504 by default).
    Status(StatusCode),
    /// A gRPC call: a trailers-only response with `grpc-status: 4` (`DEADLINE_EXCEEDED`),
    /// which is what gRPC clients understand; they would map an HTTP 504 to `UNAVAILABLE`.
    Grpc,
}

impl TimeoutAnswer {
    fn response<B>(self) -> Response<AbortBody<B>> {
        let mut response = Response::new(AbortBody::empty());
        match self {
            TimeoutAnswer::Status(status) => *response.status_mut() = status,
            TimeoutAnswer::Grpc => {
                let headers = response.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                headers.insert("grpc-status", HeaderValue::from_static("4"));
                headers.insert(
                    "grpc-message",
                    HeaderValue::from_static("deadline exceeded"),
                );
            }
        }
        response
    }
}

fn wrap_response<B: http_body::Body>(
    response: Response<B>,
    signal: AbortSignal,
    mode: TimeoutMode,
) -> Response<AbortBody<B>> {
    // Responses whose body the server never sends (HEAD, 1xx, 204, 304): hyper drops the
    // body unread, which is not a client going away.
    let bodiless = signal.request_method() == Some(&Method::HEAD)
        || response.status().is_informational()
        || response.status() == StatusCode::NO_CONTENT
        || response.status() == StatusCode::NOT_MODIFIED;
    let guard = if bodiless {
        ClientGoneGuard::disarmed()
    } else {
        ClientGoneGuard::armed(signal)
    };
    response.map(|body| AbortBody::new(body, guard, mode))
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("signal", &self.guard.signal())
            .field("timed_out", &self.timed_out)
            .finish()
    }
}

pin_project! {
    /// Future returned by [`AbortSignal::run_until_aborted`].
    #[must_use = "futures do nothing unless polled"]
    pub struct UntilAborted<F> {
        #[pin]
        future: F,
        #[pin]
        aborted: Aborted,
    }
}

impl<F> UntilAborted<F> {
    pub(crate) fn new(future: F, aborted: Aborted) -> Self {
        UntilAborted { future, aborted }
    }
}

impl<F: Future> Future for UntilAborted<F> {
    type Output = Result<F::Output, AbortReason>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        this.aborted.poll(cx).map(Err)
    }
}

impl<F> fmt::Debug for UntilAborted<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UntilAborted")
            .field("aborted", &self.aborted)
            .finish()
    }
}
