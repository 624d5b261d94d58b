//! Which client disconnects reach the signal through a real hyper 1.x server on
//! 127.0.0.1: the table in the crate docs, checked rather than repeated.
//!
//! "Seen" cases wait up to 10 s for the signal (they fire in milliseconds). "Not seen"
//! cases wait 800 ms after the client has closed and check that the handler is still
//! running and its signal has not fired: hyper cannot see those closes, so the margin is
//! not a race.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use support::TestBody;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::{service_fn, Layer};
use tower_abort::{AbortLayer, AbortReason, AbortSignal};

const SEEN_WITHIN: Duration = Duration::from_secs(10);
const QUIET_FOR: Duration = Duration::from_millis(800);
/// How long a `WaitQuietly` handler runs, far beyond `QUIET_FOR` plus the client's writes
/// and a loaded machine's delays: the handler ending on its own would read as a close seen.
/// It costs nothing, as the test ends (and its runtime drops the handler) long before.
const HANDLER_RUNS: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
}

#[derive(Clone, Copy)]
enum Handler {
    /// Waits up to `HANDLER_RUNS` for the signal without touching the request body, then
    /// reports whether it fired.
    WaitQuietly,
    /// Waits for the signal (bounded by `SEEN_WITHIN`).
    WaitForSignal,
    /// Answers at once with an endless streaming body.
    Stream,
}

struct Server {
    addr: SocketAddr,
    started: mpsc::UnboundedReceiver<AbortSignal>,
    /// Whether the signal fired while the handler ran.
    reports: mpsc::UnboundedReceiver<bool>,
}

impl Server {
    async fn start(protocol: Protocol, handler: Handler) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (started_tx, started) = mpsc::unbounded_channel();
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let svc = AbortLayer::new().layer(service_fn(move |req: Request<Incoming>| {
            let signal = req.extensions().get::<AbortSignal>().unwrap().clone();
            let _ = started_tx.send(signal.clone());
            let reports = reports_tx.clone();
            async move {
                let body = match handler {
                    Handler::Stream => TestBody::endless(&["data: hello\n\n"]),
                    Handler::WaitQuietly | Handler::WaitForSignal => {
                        let wait = match handler {
                            Handler::WaitQuietly => HANDLER_RUNS,
                            _ => SEEN_WITHIN,
                        };
                        let fired = timeout(wait, signal.aborted()).await.is_ok();
                        let _ = reports.send(fired);
                        drop(req); // the request body stays unread until here
                        TestBody::full("done")
                    }
                };
                Ok::<_, Infallible>(Response::new(body))
            }
        }));
        // The accept loop ends with the test's runtime.
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let io = TokioIo::new(stream);
                let svc = TowerToHyperService::new(svc.clone());
                tokio::spawn(async move {
                    let _ = match protocol {
                        Protocol::Http1 => {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .await
                        }
                        Protocol::Http2 => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await
                        }
                    };
                });
            }
        });
        Server {
            addr,
            started,
            reports,
        }
    }

    async fn handler_started(&mut self) -> AbortSignal {
        timeout(SEEN_WITHIN, self.started.recv())
            .await
            .expect("handler started")
            .unwrap()
    }

    /// Connects over plain TCP, writes `bytes` and waits for the handler to start.
    async fn send_raw(&mut self, bytes: &[u8]) -> (TcpStream, AbortSignal) {
        let mut client = TcpStream::connect(self.addr).await.unwrap();
        client.write_all(bytes).await.unwrap();
        (client, self.handler_started().await)
    }
}

/// The client has closed: `QUIET_FOR` later the handler still runs, its signal quiet.
async fn assert_not_seen(server: &mut Server, signal: &AbortSignal) {
    tokio::time::sleep(QUIET_FOR).await;
    assert!(
        !signal.is_aborted(),
        "hyper saw a close it should not be able to see: {:?}",
        signal.reason()
    );
    assert!(
        server.reports.try_recv().is_err(),
        "the handler is still running"
    );
}

async fn assert_seen(signal: &AbortSignal) {
    let reason = timeout(SEEN_WITHIN, signal.aborted())
        .await
        .expect("disconnect seen");
    assert_eq!(reason, AbortReason::ClientGone);
}

#[tokio::test]
async fn http1_get_then_close_is_seen() {
    let mut server = Server::start(Protocol::Http1, Handler::WaitForSignal).await;
    let (client, signal) = server
        .send_raw(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .await;
    drop(client);
    assert_seen(&signal).await;
}

#[tokio::test]
async fn http1_small_post_fully_sent_then_close_is_seen() {
    let mut server = Server::start(Protocol::Http1, Handler::WaitForSignal).await;
    let (client, signal) = server
        .send_raw(b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: 5\r\n\r\nhello")
        .await;
    drop(client);
    assert_seen(&signal).await;
}

#[tokio::test]
async fn http1_half_close_is_seen_as_a_disconnect() {
    let mut server = Server::start(Protocol::Http1, Handler::WaitForSignal).await;
    let (mut client, signal) = server
        .send_raw(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .await;
    client.shutdown().await.unwrap(); // FIN, but still reading
    assert_seen(&signal).await;
    let mut rest = Vec::new();
    let _ = timeout(SEEN_WITHIN, client.read_to_end(&mut rest)).await;
    assert!(
        rest.is_empty(),
        "no response is sent to a half-closed HTTP/1 client"
    );
}

#[tokio::test]
async fn http1_streaming_response_then_close_is_seen() {
    let mut server = Server::start(Protocol::Http1, Handler::Stream).await;
    let (mut client, signal) = server
        .send_raw(b"GET /events HTTP/1.1\r\nhost: test\r\n\r\n")
        .await;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("data: hello") {
        let n = timeout(SEEN_WITHIN, client.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "server closed early");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!signal.is_aborted(), "streaming, client still there");
    drop(client);
    assert_seen(&signal).await;
}

#[tokio::test]
async fn http1_large_unread_request_body_then_close_is_not_seen() {
    let mut server = Server::start(Protocol::Http1, Handler::WaitQuietly).await;
    let mut client = TcpStream::connect(server.addr).await.unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 1048576\r\n\r\n")
        .await
        .unwrap();
    // Half of the declared body; the server's buffers may not take it all, so bound it.
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..8 {
        if timeout(Duration::from_millis(200), client.write_all(&chunk))
            .await
            .is_err()
        {
            break;
        }
    }
    let signal = server.handler_started().await;
    drop(client);
    assert_not_seen(&mut server, &signal).await;
}

#[tokio::test]
async fn http1_close_behind_a_pipelined_request_is_not_seen() {
    let mut server = Server::start(Protocol::Http1, Handler::WaitQuietly).await;
    let mut client = TcpStream::connect(server.addr).await.unwrap();
    client
        .write_all(b"GET /1 HTTP/1.1\r\nhost: test\r\n\r\nGET /2 HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let first = server.handler_started().await;
    drop(client);
    assert_not_seen(&mut server, &first).await;
}

/// An HTTP/2 client connection; returns the request sender and a handle on its socket.
///
/// hyper drives the client connection on tasks of its own, so dropping our handles does
/// not close it: the test closes the socket itself through the cloned handle.
async fn h2_client(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    std::net::TcpStream,
) {
    let stream = TcpStream::connect(addr).await.unwrap().into_std().unwrap();
    let socket = stream.try_clone().unwrap();
    let stream = TcpStream::from_std(stream).unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, socket)
}

fn large_post() -> Request<Full<Bytes>> {
    // Far more than the 64 KiB stream window: the handler never reads it.
    Request::post("http://test/upload")
        .body(Full::new(Bytes::from(vec![b'x'; 1 << 20])))
        .unwrap()
}

#[tokio::test]
async fn http2_reset_stream_is_seen_even_with_a_large_unread_body() {
    let mut server = Server::start(Protocol::Http2, Handler::WaitForSignal).await;
    let (mut sender, _conn) = h2_client(server.addr).await;
    let response = tokio::spawn(sender.send_request(large_post()));
    let signal = server.handler_started().await;
    response.abort(); // drops the response future: RST_STREAM(CANCEL)
    assert_seen(&signal).await;
    // The connection stays usable for the next request.
    let next_response = tokio::spawn(
        sender.send_request(Request::get("http://test/").body(Full::default()).unwrap()),
    );
    let next = server.handler_started().await;
    next.abort();
    let response = timeout(SEEN_WITHIN, next_response)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "done"
    );
}

#[tokio::test]
async fn http2_connection_closed_is_seen_even_with_a_large_unread_body() {
    let mut server = Server::start(Protocol::Http2, Handler::WaitForSignal).await;
    let (mut sender, socket) = h2_client(server.addr).await;
    let _response = tokio::spawn(sender.send_request(large_post()));
    let signal = server.handler_started().await;
    socket.shutdown(std::net::Shutdown::Both).unwrap(); // the connection closes
    assert_seen(&signal).await;
}

#[tokio::test]
async fn http2_connection_closed_is_seen_for_a_get() {
    let mut server = Server::start(Protocol::Http2, Handler::WaitForSignal).await;
    let (mut sender, socket) = h2_client(server.addr).await;
    let get = Request::get("http://test/").body(Full::default()).unwrap();
    let _response = tokio::spawn(sender.send_request(get));
    let signal = server.handler_started().await;
    socket.shutdown(std::net::Shutdown::Both).unwrap(); // the connection closes
    assert_seen(&signal).await;
}

#[tokio::test]
async fn http2_streaming_response_dropped_by_the_client_is_seen() {
    let mut server = Server::start(Protocol::Http2, Handler::Stream).await;
    let (mut sender, _socket) = h2_client(server.addr).await;
    let get = Request::get("http://test/events")
        .body(Full::default())
        .unwrap();
    let response = timeout(SEEN_WITHIN, sender.send_request(get))
        .await
        .unwrap()
        .unwrap();
    let signal = server.handler_started().await;
    let mut body = response.into_body();
    let frame = timeout(SEEN_WITHIN, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "data: hello\n\n");
    assert!(!signal.is_aborted(), "streaming, client still reading");
    drop(body); // RST_STREAM(CANCEL) for this stream only
    assert_seen(&signal).await;
}
