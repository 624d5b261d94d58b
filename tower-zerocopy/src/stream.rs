//! [`SendfileStream`]: the connection wrapper that sends registered file slices with
//! `sendfile(2)`, and the counters and capability it hands out.

use std::fmt;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Default fairness cap: at most this many bytes leave in one write call (nginx's
/// `sendfile_max_chunk` default), so one fast client cannot monopolise a worker thread.
pub const DEFAULT_MAX_CHUNK: usize = 2 * 1024 * 1024;

/// Byte counters of one or more [`SendfileStream`]s (cheap to clone; clones share counts).
///
/// Every byte a stream writes is counted once: file bytes sent with `sendfile(2)` in
/// [`sendfile_bytes`](Self::sendfile_bytes), everything else (response heads, chunk framing,
/// bytes of bodies that are not mapped files) in [`copied_bytes`](Self::copied_bytes). Export
/// them as metrics, e.g. `zerocopy_sendfile_bytes_total` and `zerocopy_copied_bytes_total`.
#[derive(Clone, Default)]
pub struct SendfileStats {
    inner: Arc<StatsInner>,
}

#[derive(Default)]
struct StatsInner {
    sendfile_bytes: AtomicU64,
    copied_bytes: AtomicU64,
    sendfile_calls: AtomicU64,
    truncations: AtomicU64,
}

impl SendfileStats {
    /// New counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes sent with `sendfile(2)` (never copied through user space).
    pub fn sendfile_bytes(&self) -> u64 {
        self.inner.sendfile_bytes.load(Ordering::Relaxed)
    }

    /// Bytes written from user-space buffers with `writev`/`sendmsg`.
    pub fn copied_bytes(&self) -> u64 {
        self.inner.copied_bytes.load(Ordering::Relaxed)
    }

    /// Number of successful `sendfile(2)` calls.
    pub fn sendfile_calls(&self) -> u64 {
        self.inner.sendfile_calls.load(Ordering::Relaxed)
    }

    /// Connections failed because a file was shorter than its mapped slice (truncated in flight).
    pub fn truncations(&self) -> u64 {
        self.inner.truncations.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for SendfileStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendfileStats")
            .field("sendfile_bytes", &self.sendfile_bytes())
            .field("copied_bytes", &self.copied_bytes())
            .field("sendfile_calls", &self.sendfile_calls())
            .field("truncations", &self.truncations())
            .finish()
    }
}

/// Request extension saying "this request arrived on a [`SendfileStream`]".
///
/// Only a stream can create one ([`SendfileStream::capability`]); [`MarkSendfile`](crate::MarkSendfile) inserts it
/// into every request of that connection. [`ServeDir`](crate::ServeDir) takes the sendfile path
/// only when the extension is present **and** the request is HTTP/1.x; HTTP/2 on the same
/// listener gets the portable path, because h2 frames and copies data itself.
#[derive(Debug, Clone, Copy)]
pub struct SendfileCapability {
    _private: (),
}

/// Sockets a [`SendfileStream`] can drive (sealed): tokio's `TcpStream` and `UnixStream`.
pub trait SendfileSocket: AsyncRead + AsyncWrite + Unpin + sealed::Sealed {}

mod sealed {
    use std::io;
    use std::task::{Context, Poll};

    pub trait Sealed {
        fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
        fn try_write<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
        #[cfg(target_os = "linux")]
        fn fd(&self) -> std::os::fd::BorrowedFd<'_>;
    }
}

macro_rules! impl_socket {
    ($t:ty) => {
        impl sealed::Sealed for $t {
            fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.poll_write_ready(cx)
            }
            fn try_write<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
                self.try_io(tokio::io::Interest::WRITABLE, f)
            }
            #[cfg(target_os = "linux")]
            fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
                std::os::fd::AsFd::as_fd(self)
            }
        }
        impl SendfileSocket for $t {}
    };
}

impl_socket!(tokio::net::TcpStream);
#[cfg(unix)]
impl_socket!(tokio::net::UnixStream);

/// A socket wrapper that sends slices of mapped files with `sendfile(2)`.
///
/// Put it between the socket and hyper (`TokioIo::new(SendfileStream::new(tcp))`, or use
/// [`SendfileListener`](crate::SendfileListener) with `axum::serve`). It reports
/// `is_write_vectored() == true`, so hyper's HTTP/1 writer queues body `Bytes` without copying
/// and hands them over as `IoSlice`s. In `poll_write_vectored` the wrapper walks those slices:
///
/// * ordinary slices go out with one `sendmsg` (with `MSG_MORE` when file data follows, so the
///   head and the first file bytes share packets);
/// * a slice lying in a registered file mapping goes out with `sendfile(2)` from the file
///   descriptor; the mapped memory is never read;
/// * at most [`max_chunk`](Self::max_chunk) bytes per call (fairness), partial writes and
///   `EAGAIN` are reported exactly (`Ok(n)` once anything was written, `Pending` otherwise);
/// * a `sendfile` that returns 0 before the slice is done (the file was truncated) is an
///   [`io::ErrorKind::UnexpectedEof`] error, so hyper closes the connection short of its
///   `Content-Length`.
///
/// Reads, flushes and shutdown pass through. On targets other than Linux it is a plain
/// pass-through and [`ServeDir`](crate::ServeDir) never maps files.
///
/// **Do not** configure hyper with `writev(false)` or `pipeline_flush(true)` on these
/// connections: hyper would then copy every body frame into its own buffer, reading the mapping.
pub struct SendfileStream<S> {
    io: S,
    stats: SendfileStats,
    max_chunk: usize,
}

impl<S: fmt::Debug> fmt::Debug for SendfileStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendfileStream")
            .field("io", &self.io)
            .field("stats", &self.stats)
            .field("max_chunk", &self.max_chunk)
            .finish()
    }
}

impl<S: SendfileSocket> SendfileStream<S> {
    /// Wraps `io` with fresh counters and the default fairness cap.
    pub fn new(io: S) -> Self {
        Self::with_stats(io, SendfileStats::new())
    }

    /// Wraps `io`, adding its byte counts to `stats` (share one across a listener).
    pub fn with_stats(io: S, stats: SendfileStats) -> Self {
        SendfileStream {
            io,
            stats,
            max_chunk: DEFAULT_MAX_CHUNK,
        }
    }

    /// Sets the most bytes one write call sends (default [`DEFAULT_MAX_CHUNK`], minimum 4 KiB).
    pub fn max_chunk(mut self, bytes: usize) -> Self {
        self.max_chunk = bytes.max(4096);
        self
    }

    /// This stream's counters.
    pub fn stats(&self) -> &SendfileStats {
        &self.stats
    }

    /// The capability to put into this connection's requests (see [`MarkSendfile`](crate::MarkSendfile)).
    pub fn capability(&self) -> SendfileCapability {
        SendfileCapability { _private: () }
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The wrapped socket, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Unwraps the socket.
    pub fn into_inner(self) -> S {
        self.io
    }

    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.io.poll_ready(cx))?;
            let (io, stats, cap) = (&self.io, &self.stats, self.max_chunk);
            match io.try_write(|| write_slices(io, stats, cap, bufs)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn write_slices<S: SendfileSocket>(
    io: &S,
    stats: &SendfileStats,
    cap: usize,
    bufs: &[IoSlice<'_>],
) -> io::Result<usize> {
    use crate::{registry, sys};
    let fd = io.fd();
    let mut total = 0usize;
    let mut i = 0;
    // Any error after progress is reported as that progress; the error recurs on the next call.
    let partial = |total: usize, e: io::Error| {
        if total > 0 && e.kind() == io::ErrorKind::WouldBlock {
            Ok(total)
        } else {
            Err(e)
        }
    };
    while i < bufs.len() && total < cap {
        let run_start = i;
        let mut file_slice = None;
        while i < bufs.len() {
            if let Some(hit) = registry::lookup(bufs[i].as_ptr() as usize, bufs[i].len()) {
                file_slice = Some(hit);
                break;
            }
            i += 1;
        }
        let run = &bufs[run_start..i];
        let run_len: usize = run.iter().map(|b| b.len()).sum();
        if run_len > 0 {
            match sys::send_vectored(fd, run, file_slice.is_some()) {
                Ok(n) => {
                    stats
                        .inner
                        .copied_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                    total += n;
                    if n < run_len {
                        return Ok(total);
                    }
                }
                Err(e) => return partial(total, e),
            }
        }
        let Some((file, mut offset)) = file_slice else {
            break;
        };
        let len = bufs[i].len();
        let mut sent = 0;
        while sent < len && total < cap {
            let want = (len - sent).min(cap - total);
            match sys::send_file(fd, &file, &mut offset, want) {
                // Report what was written; the next call meets the short file again.
                Ok(0) if total > 0 => return Ok(total),
                Ok(0) => {
                    stats.inner.truncations.fetch_add(1, Ordering::Relaxed);
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while it was being sent",
                    ));
                }
                Ok(n) => {
                    stats
                        .inner
                        .sendfile_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                    stats.inner.sendfile_calls.fetch_add(1, Ordering::Relaxed);
                    sent += n;
                    total += n;
                }
                Err(e) => return partial(total, e),
            }
        }
        if sent < len {
            return Ok(total);
        }
        i += 1;
    }
    Ok(total)
}

#[cfg(not(target_os = "linux"))]
fn write_slices<S: SendfileSocket>(
    _io: &S,
    _stats: &SendfileStats,
    _cap: usize,
    _bufs: &[IoSlice<'_>],
) -> io::Result<usize> {
    unreachable!("only called on Linux")
}

impl<S: SendfileSocket> AsyncRead for SendfileStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: SendfileSocket> AsyncWrite for SendfileStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if cfg!(target_os = "linux") {
            this.poll_write_slices(cx, bufs)
        } else {
            let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
            if let Poll::Ready(Ok(n)) = &res {
                this.stats
                    .inner
                    .copied_bytes
                    .fetch_add(*n as u64, Ordering::Relaxed);
            }
            res
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
