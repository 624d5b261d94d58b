//! [`MarkSendfile`]: puts a connection's [`SendfileCapability`] into each of its requests.

use std::task::{Context, Poll};

use http::Request;
use tower_service::Service;

use crate::SendfileCapability;

/// Inserts a connection's [`SendfileCapability`] into every request, so that
/// [`ServeDir`](crate::ServeDir) may take the sendfile path.
///
/// Build one per connection, from the connection's stream:
///
/// ```no_run
/// use hyper_util::rt::{TokioExecutor, TokioIo};
/// use hyper_util::server::conn::auto;
/// use hyper_util::service::TowerToHyperService;
/// use tower_zerocopy::{MarkSendfile, SendfileStats, SendfileStream, ServeDir};
///
/// # async fn run() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let stats = SendfileStats::new();
/// let service = ServeDir::new("assets");
/// loop {
///     let (tcp, _) = listener.accept().await?;
///     let stream = SendfileStream::with_stats(tcp, stats.clone());
///     let svc = MarkSendfile::new(service.clone(), stream.capability());
///     tokio::spawn(async move {
///         let _ = auto::Builder::new(TokioExecutor::new())
///             .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
///             .await;
///     });
/// }
/// # }
/// # let _ = run;
/// ```
#[derive(Debug, Clone)]
pub struct MarkSendfile<S> {
    inner: S,
    capability: SendfileCapability,
}

impl<S> MarkSendfile<S> {
    /// Wraps `inner` for one connection that holds `capability`.
    pub fn new(inner: S, capability: SendfileCapability) -> Self {
        MarkSendfile { inner, capability }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for MarkSendfile<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.capability);
        self.inner.call(req)
    }
}
