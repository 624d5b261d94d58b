//! Shared test helpers: a real hyper server on 127.0.0.1 and clients for it.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_zerocopy::{FileBody, MarkSendfile, SendfileStats, SendfileStream, ServeDir};

/// How the test server is put together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `SendfileStream` + `MarkSendfile`, HTTP/1 and HTTP/2 (auto builder).
    Sendfile,
    /// As `Sendfile`, but responses lose their length, so hyper uses chunked encoding.
    Chunked,
    /// `SendfileStream` (it counts bytes) but no capability: the portable path.
    Portable,
}

pub struct Server {
    pub addr: SocketAddr,
    pub stats: SendfileStats,
    live_connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Waits (bounded) until every accepted connection has ended. The counters are bumped
    /// after each write returns, so a client can hold the whole body before the server has
    /// counted its last bytes; once the connection task has ended, everything is counted.
    pub async fn settled(&self) -> &SendfileStats {
        for _ in 0..400 {
            if self.live_connections.load(Ordering::SeqCst) == 0 {
                return &self.stats;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!(
            "{} connections still open after 10 s",
            self.live_connections.load(Ordering::SeqCst)
        );
    }
}

/// Counts a connection task as live until it ends (or is dropped with the server).
struct LiveConnection(Arc<AtomicUsize>);

impl LiveConnection {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        LiveConnection(count.clone())
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A body that hides its length, forcing chunked transfer encoding.
pub struct HideSize(pub FileBody);

impl Body for HideSize {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.get_mut().0).poll_frame(cx)
    }
}

pub async fn spawn(svc: ServeDir, mode: Mode) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = SendfileStats::new();
    let st = stats.clone();
    let live_connections = Arc::new(AtomicUsize::new(0));
    let live = live_connections.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(x) => x,
                Err(_) => continue,
            };
            tcp.set_nodelay(true).unwrap();
            let stream = SendfileStream::with_stats(tcp, st.clone());
            let cap = stream.capability();
            let svc = svc.clone();
            let live = LiveConnection::new(&live);
            conns.spawn(async move {
                let _live = live;
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let io = TokioIo::new(stream);
                let _ = match mode {
                    Mode::Sendfile => {
                        let svc = TowerToHyperService::new(MarkSendfile::new(svc, cap));
                        builder.serve_connection(io, svc).await
                    }
                    Mode::Portable => {
                        builder
                            .serve_connection(io, TowerToHyperService::new(svc))
                            .await
                    }
                    Mode::Chunked => {
                        let marked = MarkSendfile::new(svc, cap);
                        let svc = tower::ServiceExt::<Request<hyper::body::Incoming>>::map_response(
                            marked,
                            |res: Response<FileBody>| {
                                let (mut parts, body) = res.into_parts();
                                parts.headers.remove(header::CONTENT_LENGTH);
                                Response::from_parts(parts, HideSize(body))
                            },
                        );
                        builder
                            .serve_connection(io, TowerToHyperService::new(svc))
                            .await
                    }
                };
            });
        }
    });
    Server {
        addr,
        stats,
        live_connections,
        task,
    }
}

pub struct Fetched {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub version: Version,
    pub body: Vec<u8>,
}

/// One request on a fresh connection, HTTP/1.1 or HTTP/2 (prior knowledge).
pub async fn fetch(
    addr: SocketAddr,
    version: Version,
    path: &str,
    headers: &[(&str, &str)],
) -> Fetched {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let io = TokioIo::new(tcp);
    let mut req = Request::get(format!("http://{addr}{path}")).version(version);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let res = if version == Version::HTTP_2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes().to_vec();
    Fetched {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body,
    }
}

/// A raw HTTP/1.1 request; returns the status code (0 if the server closed without a response).
pub async fn raw_status(addr: SocketAddr, target: &[u8]) -> u16 {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// FNV-1a, 64 bit.
pub fn hash(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Deterministic content: byte `i` of a file.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i as u8)
}

pub fn write_pattern(path: &Path, len: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = Vec::with_capacity(1 << 20);
    let mut i = 0;
    while i < len {
        buf.clear();
        let n = (len - i).min(1 << 20);
        buf.extend((i..i + n).map(pattern));
        f.write_all(&buf).unwrap();
        i += n;
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("tzc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Open descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn _infallible(_: Infallible) {}
