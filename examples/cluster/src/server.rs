//! What every serving process runs: listening sockets, the accept loop, the staged drain,
//! and the small admin server.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_zerocopy::{MarkSendfile, SendfileStream};

use crate::conn::{self, DrainLevel, Settings, Signal};

/// Binds a listening socket that shares its port with the other workers' sockets
/// (`SO_REUSEPORT`: the kernel spreads new connections over the group).
pub(crate) fn bind_listener(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY on Linux; `accept_loop` sets it anyway.
    socket.set_tcp_nodelay(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Fails if something already listens on `addr`.
///
/// `SO_REUSEPORT` would otherwise let a second server (say, a second `cluster` started by
/// mistake) join the port and silently take a share of the connections. A plain bind fails
/// on any listening socket, reuse-port or not; the probe is closed before the real sockets
/// are bound.
pub(crate) fn ensure_port_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind(addr) {
        Ok(probe) => {
            drop(probe);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            e.kind(),
            format!("{addr} is already in use (another server, or another cluster, listens there)"),
        )),
        Err(e) => Err(io::Error::new(e.kind(), format!("cannot bind {addr}: {e}"))),
    }
}

/// Converts a (possibly inherited) std listener for tokio.
pub(crate) fn into_tokio(listener: std::net::TcpListener) -> io::Result<TcpListener> {
    // An inherited descriptor may be in blocking mode; tokio needs non-blocking or the
    // accept loop (and so graceful shutdown) blocks (tokio-rs/axum#3560).
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// What a connection beyond `--max-connections` is told before it is closed. It is written
/// without reading the request (the client may not even have sent one yet), so a client
/// that already wrote its request may see a reset instead; either way it learns at once.
const OVER_CAPACITY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n";

/// Most connections taken from the accept queue when an immediate drain stops accepting
/// (see [`accept_loop`]): the queue holds at most `--backlog` (capped by
/// `net.core.somaxconn`, at most 65,535) plus what arrives meanwhile; this bounds the loop.
const MAX_ACCEPTED_AT_STOP: usize = 65_536;

/// Accepts connections until `stop` is cancelled, serving each on its own task; beyond
/// `max_connections` open ones, a new connection is answered [`OVER_CAPACITY`] and closed.
///
/// When it stops for an immediate drain (SIGTERM/SIGINT) it first takes what is already in
/// the accept queue, without waiting for more: closing the listening socket (when no other
/// process holds it) would reset those connections, whose clients connected before the
/// drain and may have sent a request. They are served like the others (every answer while
/// draining carries `Connection: close`). A rolling restart's gentle drain does not: the
/// socket stays open and the successor accepts them.
pub(crate) async fn accept_loop<S, B>(
    listener: TcpListener,
    app: S,
    settings: &'static Settings,
    max_connections: usize,
    tracker: TaskTracker,
    stop: CancellationToken,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let serve = |stream: tokio::net::TcpStream, peer: SocketAddr| {
        // Every task of `tracker` is a connection.
        if tracker.len() >= max_connections {
            // Counted first: a client that has read the 503 finds it in the metrics.
            settings.metrics().connections_refused.inc();
            refuse(stream);
            tracing::debug!(%peer, max_connections, "connection refused: at capacity");
            return;
        }
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "TCP_NODELAY failed");
        }
        // tower-zerocopy: file slices leave this socket through sendfile(2), and
        // requests of this connection carry the capability that lets `/static` use it.
        let stream = SendfileStream::with_stats(stream, settings.metrics().sendfile.clone());
        let app = MarkSendfile::new(app.clone(), stream.capability());
        tracker.spawn(async move {
            let outcome = conn::serve_connection(stream, app, settings).await;
            tracing::trace!(%peer, ?outcome, "connection ended");
        });
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => serve(stream, peer),
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %e, "accept: connection error");
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning; the
                // connection stays in the backlog meanwhile.
                tracing::warn!(error = %e, "accept failed; retrying in 100ms");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    if settings.signal_level() >= DrainLevel::Immediate {
        let queued = accept_queued(listener, serve);
        tracing::debug!(queued, "accepted the queued connections before closing");
    }
    // Dropping the listener: this process stops accepting. In a rolling restart the socket
    // itself stays open (the supervisor and the successor worker hold it), so no queued
    // connection is lost.
}

/// Takes every connection already in `listener`'s accept queue (non-blocking accepts until
/// the queue is empty, at most [`MAX_ACCEPTED_AT_STOP`]) and hands it to `serve`; returns
/// how many. The listener is closed when this returns.
fn accept_queued(
    listener: TcpListener,
    serve: impl Fn(tokio::net::TcpStream, SocketAddr),
) -> usize {
    // tokio only tries `accept` when its reactor has seen the socket readable; the std
    // listener (non-blocking) asks the kernel directly.
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "cannot take the queued connections");
            return 0;
        }
    };
    let mut taken = 0;
    for _ in 0..MAX_ACCEPTED_AT_STOP {
        match listener.accept() {
            Ok((stream, peer)) => {
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(stream));
                match stream {
                    Ok(stream) => {
                        taken += 1;
                        serve(stream, peer);
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "queued connection dropped"),
                }
            }
            Err(e) if is_connection_error(&e) => {}
            // `WouldBlock`: the queue is empty; anything else: give up on the rest.
            Err(_) => break,
        }
    }
    taken
}

/// Answers an over-capacity connection without waiting on it: one non-blocking write
/// (a fresh socket's send buffer always has room for it), then close.
fn refuse(stream: tokio::net::TcpStream) {
    let _ = stream.try_write(OVER_CAPACITY);
    // `drop` closes the descriptor now; no task, timer or buffer stays behind.
    drop(stream);
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// How long requests still running at the end of the grace period get, after their
/// `AbortSignal`s fired with `Shutdown`, to answer before their connections are dropped.
const ABORT_GRACE: Duration = Duration::from_millis(500);

/// Drains a serving process: the first level received starts the drain, later ones may
/// escalate it. When `grace` ends, every in-flight request's signal fires (`abort_root`)
/// so handlers can stop cleanly; whatever is still open [`ABORT_GRACE`] later is dropped.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn drain(
    first: DrainLevel,
    mut more: mpsc::UnboundedReceiver<DrainLevel>,
    signal: &Signal,
    stop: &CancellationToken,
    accept_loop: tokio::task::JoinHandle<()>,
    tracker: &TaskTracker,
    grace: Duration,
    abort_root: &tower_abort::AbortRoot,
) {
    let deadline = Instant::now() + grace;
    // The level first: the accept loop reads it when it stops.
    signal.raise(first);
    stop.cancel();
    // The accept loop may still take queued connections (see `accept_loop`); the tracker
    // is closed once it has ended, so the wait below covers those connections too.
    if !accept_loop.is_finished() {
        let _ = tokio::time::timeout_at(deadline, accept_loop).await;
    }
    tracker.close();
    tracing::info!(
        level = ?first,
        connections = tracker.len(),
        grace = %humantime::format_duration(grace),
        "draining"
    );
    let mut more_open = true;
    loop {
        tokio::select! {
            _ = tracker.wait() => {
                tracing::info!("drained");
                return;
            }
            level = more.recv(), if more_open => match level {
                Some(level) => signal.raise(level),
                None => more_open = false,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    tracing::warn!(
        connections = tracker.len(),
        "shutdown grace period over: aborting the requests still running"
    );
    abort_root.shutdown();
    if tokio::time::timeout(ABORT_GRACE, tracker.wait())
        .await
        .is_ok()
    {
        tracing::info!("drained after aborting");
        return;
    }
    tracing::warn!(
        connections = tracker.len(),
        "closing the remaining connections"
    );
    signal.raise(DrainLevel::Force);
    if tokio::time::timeout(Duration::from_secs(1), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = tracker.len(),
            "connections still open at exit"
        );
    }
}

/// Serves `GET /metrics` (from `render`) and `GET /healthz` until `stop` is cancelled.
pub(crate) async fn admin_server<F, Fut>(listener: TcpListener, render: F, stop: CancellationToken)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move {
                    let res = match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => admin_response(
                            StatusCode::OK,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            render().await,
                        ),
                        (&Method::GET, "/healthz") => {
                            admin_response(StatusCode::OK, "text/plain", "ok".to_owned())
                        }
                        _ => admin_response(
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found\n".to_owned(),
                        ),
                    };
                    Ok::<_, std::convert::Infallible>(res)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            // The admin port is for scrapers on a trusted network; still, bound each
            // connection so a stuck client cannot pin a task forever.
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
    conns.abort_all();
}

fn admin_response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Forwards SIGTERM and SIGINT to `tx` as `Immediate` drains; SIGHUP runs `on_hup`.
pub(crate) fn spawn_signal_handlers<H, Fut>(
    tx: mpsc::UnboundedSender<DrainLevel>,
    on_hup: H,
) -> io::Result<()>
where
    H: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = term.recv() => {
                    tracing::info!("SIGTERM received");
                    let _ = tx.send(DrainLevel::Immediate);
                }
                Some(()) = int.recv() => {
                    tracing::info!("SIGINT received");
                    let _ = tx.send(DrainLevel::Immediate);
                }
                Some(()) = hup.recv() => on_hup().await,
                else => break,
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::cli::ConnConfig;
    use crate::metrics::WorkerMetrics;

    const QUEUED: usize = 5;

    /// A listener with `QUEUED` connections waiting in its accept queue, each with a request
    /// written; the drain `level` already raised and `stop` cancelled before the accept loop
    /// runs (so its biased `select!` sees `stop` first). Returns the clients and how many
    /// connections the loop took.
    async fn stop_with_a_full_queue(level: DrainLevel) -> (Vec<tokio::net::TcpStream>, usize) {
        let signal = Arc::new(Signal::default());
        let config = ConnConfig {
            keep_alive_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(5),
            shutdown_idle_timeout: Duration::from_secs(1),
            max_requests_per_connection: None,
            max_head_size: 16 * 1024,
            max_headers: 100,
            h2_max_concurrent_streams: 200,
        };
        let settings: &'static Settings = Box::leak(Box::new(Settings::new(
            config,
            signal.clone(),
            Arc::new(WorkerMetrics::new()),
        )));
        let app = crate::routes::test_app(Duration::from_secs(1));
        let listener =
            into_tokio(bind_listener("127.0.0.1:0".parse().unwrap(), 64).unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..QUEUED {
            // The kernel completes the handshake; nobody has accepted yet.
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            clients.push(c);
        }
        signal.raise(level);
        let stop = CancellationToken::new();
        stop.cancel();
        let tracker = TaskTracker::new();
        accept_loop(listener, app, settings, 100, tracker.clone(), stop).await;
        let taken = tracker.len();
        tracker.close();
        (clients, taken)
    }

    #[tokio::test]
    async fn an_immediate_drain_serves_the_connections_waiting_in_the_accept_queue() {
        let (clients, taken) = stop_with_a_full_queue(DrainLevel::Immediate).await;
        assert_eq!(taken, QUEUED);
        for mut c in clients {
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
            assert!(out.contains("connection: close\r\n"), "{out}");
            assert!(out.ends_with("Hello, World!"), "{out}");
        }
    }

    #[tokio::test]
    async fn a_gentle_drain_leaves_the_accept_queue_to_the_successor() {
        // In a rolling restart the socket stays open (the supervisor and the new worker
        // hold it), so the old worker must not take connections it would only close.
        let (_clients, taken) = stop_with_a_full_queue(DrainLevel::Gentle).await;
        assert_eq!(taken, 0);
    }
}
