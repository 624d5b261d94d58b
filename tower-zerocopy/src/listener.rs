//! [`SendfileListener`] and [`WithSendfile`]: the sendfile path for `axum::serve`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tower_service::Service;

use crate::{
    MarkSendfile, SendfileStats, SendfileStream, DEFAULT_MAX_CHUNK, DEFAULT_MAX_COPIED_TAIL,
};

/// A TCP listener for `axum::serve` whose connections are [`SendfileStream`]s.
///
/// Pair it with [`WithSendfile`] so requests carry the
/// [`SendfileCapability`](crate::SendfileCapability):
///
/// ```no_run
/// use axum::Router;
/// use tower_zerocopy::{SendfileListener, ServeDir, WithSendfile};
///
/// # async fn run() -> std::io::Result<()> {
/// let app = Router::new().nest_service("/static", ServeDir::new("assets"));
/// let listener = SendfileListener::bind("127.0.0.1:3000").await?;
/// let stats = listener.stats(); // export these counters as metrics
/// tokio::spawn(async move {
///     println!("{} bytes by sendfile", stats.sendfile_bytes());
/// });
/// axum::serve(listener, WithSendfile::new(app)).await?;
/// # Ok(()) }
/// # let _ = run;
/// ```
#[derive(Debug)]
pub struct SendfileListener {
    inner: TcpListener,
    stats: SendfileStats,
    max_chunk: usize,
    max_copied_tail: usize,
    nodelay: bool,
}

impl SendfileListener {
    /// Binds a TCP listener.
    pub async fn bind(addr: impl tokio::net::ToSocketAddrs) -> io::Result<Self> {
        Ok(Self::from_tokio(TcpListener::bind(addr).await?))
    }

    /// Wraps a bound tokio listener.
    pub fn from_tokio(inner: TcpListener) -> Self {
        SendfileListener {
            inner,
            stats: SendfileStats::new(),
            max_chunk: DEFAULT_MAX_CHUNK,
            max_copied_tail: DEFAULT_MAX_COPIED_TAIL,
            nodelay: true,
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The counters shared by every accepted connection.
    pub fn stats(&self) -> SendfileStats {
        self.stats.clone()
    }

    /// Uses `stats` for every accepted connection (e.g. counters shared with other listeners).
    pub fn with_stats(mut self, stats: SendfileStats) -> Self {
        self.stats = stats;
        self
    }

    /// Per-write fairness cap of each connection (see [`SendfileStream::max_chunk`]).
    pub fn max_chunk(mut self, bytes: usize) -> Self {
        self.max_chunk = bytes;
        self
    }

    /// Most bytes copied at an aligned response end of each connection (see
    /// [`SendfileStream::max_copied_tail`]).
    pub fn max_copied_tail(mut self, bytes: usize) -> Self {
        self.max_copied_tail = bytes;
        self
    }

    /// Whether accepted sockets get `TCP_NODELAY` (default `true`: the stream already batches
    /// head and file data with `MSG_MORE`, and small responses should not wait for Nagle).
    pub fn nodelay(mut self, nodelay: bool) -> Self {
        self.nodelay = nodelay;
        self
    }
}

impl Listener for SendfileListener {
    type Io = SendfileStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, addr)) => {
                    if self.nodelay {
                        let _ = tcp.set_nodelay(true);
                    }
                    let io = SendfileStream::with_stats(tcp, self.stats.clone())
                        .max_chunk(self.max_chunk)
                        .max_copied_tail(self.max_copied_tail);
                    return (io, addr);
                }
                Err(e) => {
                    // As axum does: connection errors are per-connection, others (EMFILE) need
                    // a pause so the loop does not spin.
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) {
                        tracing::error!("accept error: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Makes an axum app (anything `axum::serve` accepts) mark each request of a
/// [`SendfileListener`] connection with its capability (see [`MarkSendfile`]).
#[derive(Debug, Clone)]
pub struct WithSendfile<M> {
    inner: M,
}

impl<M> WithSendfile<M> {
    /// Wraps `make_service` (a `Router`, or `Router::into_make_service()` etc.).
    pub fn new(make_service: M) -> Self {
        WithSendfile {
            inner: make_service,
        }
    }
}

impl<'a, M, S> Service<IncomingStream<'a, SendfileListener>> for WithSendfile<M>
where
    M: Service<IncomingStream<'a, SendfileListener>, Response = S, Error = Infallible>,
{
    type Response = MarkSendfile<S>;
    type Error = Infallible;
    type Future = MakeFuture<M::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, stream: IncomingStream<'a, SendfileListener>) -> Self::Future {
        let capability = stream.io().capability();
        MakeFuture {
            inner: self.inner.call(stream),
            capability: Some(capability),
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`WithSendfile`]'s per-connection call.
    #[must_use = "futures do nothing unless polled"]
    #[derive(Debug)]
    pub struct MakeFuture<F> {
        #[pin]
        inner: F,
        capability: Option<crate::SendfileCapability>,
    }
}

impl<F, S> Future for MakeFuture<F>
where
    F: Future<Output = Result<S, Infallible>>,
{
    type Output = Result<MarkSendfile<S>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let svc = std::task::ready!(this.inner.poll(cx))?;
        let capability = this.capability.take().expect("polled after completion");
        Poll::Ready(Ok(MarkSendfile::new(svc, capability)))
    }
}
