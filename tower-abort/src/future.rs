//! Future types.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Response, StatusCode};
use pin_project_lite::pin_project;

use crate::body::AbortBody;
use crate::guard::ClientGoneGuard;
use crate::timer::DeadlineTimer;
use crate::{AbortReason, AbortSignal};

pub use crate::propagate::PropagateFuture;
pub use crate::signal::Aborted;
pub use crate::task::TaskHandle;

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
        // Armed when the handler is first pending with a deadline ahead (see `timer.rs`).
        timer: DeadlineTimer,
        // The deadline is the server's timeout from the request's start, so the timer can
        // join the shared first-in-first-out lists.
        server_deadline: bool,
        // The deadline passed and the signal fired; the handler is in its grace period.
        grace: bool,
        timeout: TimeoutAnswer,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        inner: F,
        signal: AbortSignal,
        server_deadline: bool,
        timeout: TimeoutAnswer,
    ) -> Self {
        ResponseFuture {
            guard: ClientGoneGuard::armed(signal),
            inner: Some(inner),
            timer: DeadlineTimer::new(),
            server_deadline,
            grace: false,
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

    #[inline]
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
                // Release the timer now; the body arms its own if it needs one.
                this.timer.clear();
                let signal = this
                    .guard
                    .take()
                    .expect("the guard is armed until completion");
                return Poll::Ready(result.map(|response| {
                    if *this.grace {
                        // The handler answered after its deadline: too late.
                        this.timeout.response()
                    } else {
                        wrap_response(response, signal)
                    }
                }));
            }

            let Some(signal) = this.guard.signal() else {
                return Poll::Pending;
            };
            let Some(deadline) = signal.deadline() else {
                return Poll::Pending;
            };
            if *this.grace {
                // Waiting for the backstop, armed below on a timer of its own.
                ready!(this.timer.poll_until(cx, deadline, None));
            } else {
                let server_timeout = if *this.server_deadline {
                    signal.server_timeout()
                } else {
                    None
                };
                ready!(this.timer.poll_until(cx, deadline, server_timeout));
            }

            let grace = signal.mode().grace();
            if !*this.grace && !grace.is_zero() {
                signal.fire(AbortReason::DeadlineExceeded);
                *this.grace = true;
                let backstop = deadline.checked_add(grace).unwrap_or(deadline);
                this.timer.reset(backstop);
                // Poll the handler again now: it has just been woken by the signal.
                continue;
            }

            // Drop mode, or the grace period ran out: the backstop.
            signal.fire(AbortReason::DeadlineExceeded);
            if *this.grace {
                crate::event::backstop(AbortReason::DeadlineExceeded, grace);
            }
            // Drop the handler before answering, so its resources are released first.
            this.inner.set(None);
            this.timer.clear();
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
) -> Response<AbortBody<B>> {
    // Responses whose body the server never sends (HEAD, 1xx, 204, 304): hyper drops the
    // body unread, which is not a client going away.
    let bodiless = signal.request_method() == Some(&Method::HEAD)
        || response.status().is_informational()
        || response.status() == StatusCode::NO_CONTENT
        || response.status() == StatusCode::NOT_MODIFIED;
    // A body with nothing to send may be dropped unpolled: the request is complete.
    let guard = if bodiless || response.body().is_end_stream() {
        signal.release();
        ClientGoneGuard::disarmed()
    } else {
        ClientGoneGuard::armed(signal)
    };
    response.map(|body| AbortBody::new(body, guard))
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("signal", &self.guard.signal())
            .field("timed_out", &self.grace)
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
