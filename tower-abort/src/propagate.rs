use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderName, Request};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::deadline::GRPC_TIMEOUT;
use crate::error::{Aborted as AbortedError, BoxError};
use crate::signal::Aborted;
use crate::{AbortReason, AbortSignal, TimeoutFormat};

/// Client-side layer: ties an outgoing request to the [`AbortSignal`] found in its
/// extensions. See [`PropagateAbort`].
#[derive(Clone, Debug)]
pub struct PropagateAbortLayer {
    grpc_timeout: bool,
    header: Option<(HeaderName, TimeoutFormat)>,
}

impl PropagateAbortLayer {
    /// Re-emits the deadline as `grpc-timeout` only.
    pub fn new() -> Self {
        PropagateAbortLayer {
            grpc_timeout: true,
            header: None,
        }
    }

    /// Whether to set `grpc-timeout` (on by default).
    pub fn with_grpc_timeout(mut self, emit: bool) -> Self {
        self.grpc_timeout = emit;
        self
    }

    /// Also set `name` to the remaining time in `format`, such as `request-timeout` in
    /// [`TimeoutFormat::Milliseconds`].
    pub fn with_timeout_header(mut self, name: HeaderName, format: TimeoutFormat) -> Self {
        self.header = Some((name, format));
        self
    }
}

impl Default for PropagateAbortLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for PropagateAbortLayer {
    type Service = PropagateAbort<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateAbort {
            inner,
            layer: self.clone(),
        }
    }
}

/// Client-side middleware: carries the request's [`AbortSignal`] to an outgoing call.
///
/// Put the server request's signal into the outgoing request's extensions
/// (`req.extensions_mut().insert(signal.clone())`). Then this service
/// - fails at once with [`Aborted`](crate::error::Aborted) if the signal has already fired
///   or the deadline has passed, without calling the inner service;
/// - writes the remaining time as `grpc-timeout` (and/or a header of your choice), keeping
///   a header already set to a shorter time, so the next hop gives up when we do. The time
///   is rounded down to the format's unit, except that less than one unit goes out as one
///   unit (`1` ms, `0.001` s; `grpc-timeout` has nanoseconds), never as zero, which some
///   servers read as "no time" and others as "no deadline"; the call itself is still
///   dropped at our deadline (next point), so it never outlives it;
/// - drops the inner call as soon as the signal fires (hyper then closes the HTTP/1
///   connection, or resets the HTTP/2 stream) and fails with
///   [`Aborted`](crate::error::Aborted).
///
/// Requests without a signal pass through untouched. Errors are boxed
/// ([`BoxError`]); detect ours with `err.is::<tower_abort::error::Aborted>()`.
///
/// # Examples
///
/// ```
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_abort::{AbortSignal, PropagateAbortLayer};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // Stands in for a hyper-util client.
/// let client = service_fn(|req: http::Request<()>| async move {
///     Ok::<_, std::convert::Infallible>(req.headers().get("grpc-timeout").cloned())
/// });
/// let client = ServiceBuilder::new().layer(PropagateAbortLayer::new()).service(client);
///
/// let signal = AbortSignal::new(); // in a handler: the request's signal
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(signal.clone());
/// assert_eq!(client.oneshot(req).await.unwrap(), None); // no deadline to send
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PropagateAbort<S> {
    inner: S,
    layer: PropagateAbortLayer,
}

impl<S> PropagateAbort<S> {
    /// Wraps `inner` with [`PropagateAbortLayer::new`].
    pub fn new(inner: S) -> Self {
        PropagateAbortLayer::new().layer(inner)
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for PropagateAbort<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = PropagateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(signal) = req.extensions().get::<AbortSignal>().cloned() else {
            return PropagateFuture::call(self.inner.call(req), None);
        };
        if let Some(reason) = signal.reason() {
            return PropagateFuture::failed(reason);
        }
        if let Some(remaining) = signal.remaining() {
            if remaining.is_zero() {
                return PropagateFuture::failed(AbortReason::DeadlineExceeded);
            }
            let headers = req.headers_mut();
            let mut emit = |name: &HeaderName, format: TimeoutFormat| {
                let shorter = headers
                    .get(name)
                    .and_then(|v| format.parse(v.as_bytes()).ok())
                    .is_some_and(|existing| existing <= remaining);
                if !shorter {
                    headers.insert(name.clone(), format.encode(remaining));
                }
            };
            if self.layer.grpc_timeout {
                emit(&GRPC_TIMEOUT, TimeoutFormat::Grpc);
            }
            if let Some((name, format)) = &self.layer.header {
                emit(name, *format);
            }
        }
        PropagateFuture::call(self.inner.call(req), Some(signal.aborted()))
    }
}

pin_project! {
    /// Response future of [`PropagateAbort`].
    #[must_use = "futures do nothing unless polled"]
    pub struct PropagateFuture<F> {
        #[pin]
        inner: Option<F>,
        #[pin]
        aborted: Option<Aborted>,
        failed: Option<AbortReason>,
    }
}

impl<F> PropagateFuture<F> {
    fn call(inner: F, aborted: Option<Aborted>) -> Self {
        PropagateFuture {
            inner: Some(inner),
            aborted,
            failed: None,
        }
    }

    fn failed(reason: AbortReason) -> Self {
        PropagateFuture {
            inner: None,
            aborted: None,
            failed: Some(reason),
        }
    }
}

impl<F, T, E> Future for PropagateFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(reason) = this.failed.take() {
            return Poll::Ready(Err(AbortedError::new(reason).into()));
        }
        let inner = this
            .inner
            .as_mut()
            .as_pin_mut()
            .expect("polled after completion");
        if let Poll::Ready(result) = inner.poll(cx) {
            this.inner.set(None);
            return Poll::Ready(result.map_err(Into::into));
        }
        if let Some(aborted) = this.aborted.as_pin_mut() {
            if let Poll::Ready(reason) = aborted.poll(cx) {
                // Cancel the outgoing call now, not whenever the caller drops us.
                this.inner.set(None);
                return Poll::Ready(Err(AbortedError::new(reason).into()));
            }
        }
        Poll::Pending
    }
}

impl<F> fmt::Debug for PropagateFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropagateFuture")
            .field("aborted", &self.aborted)
            .field("failed", &self.failed)
            .finish()
    }
}
