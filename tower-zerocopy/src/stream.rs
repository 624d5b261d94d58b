//! [`SendfileStream`]: the connection wrapper that sends registered file slices with
//! `sendfile(2)`, and the counters and capability it hands out.

use std::fmt;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Default fairness cap: at most this many bytes leave in one write call (nginx's
/// `sendfile_max_chunk` default), so one fast client cannot monopolise a worker thread.
pub const DEFAULT_MAX_CHUNK: usize = 2 * 1024 * 1024;

/// Default longest interval between two checks of whether the peer has received everything
/// before a response's last byte (see [`SendfileStream::drain_poll_max`]): 10 ms.
pub const DEFAULT_DRAIN_POLL_MAX: Duration = Duration::from_millis(10);

/// The first re-check waits for the runtime's next timer tick (tokio's timer has 1 ms ticks).
const FIRST_DRAIN_POLL: Duration = Duration::from_micros(1);

/// Default most file bytes at the end of a response that are copied so that the response ends
/// without a wait and without a segment of its own (see [`SendfileStream::max_copied_tail`]):
/// 16 KiB.
pub const DEFAULT_MAX_COPIED_TAIL: usize = 16 * 1024;

/// File bytes at the end of each response held back until the check (and then copied) when the
/// end is not aligned (see "Truncation and the last byte of a response").
#[cfg(target_os = "linux")]
const HELD_BACK: usize = 1;

#[cfg(target_os = "linux")]
thread_local! {
    /// The copy of a response's held-back bytes, between `pread` and `sendmsg` (one per thread,
    /// not per connection: it is used only inside one write call).
    static TAIL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Byte counters of one or more [`SendfileStream`]s (cheap to clone; clones share counts).
///
/// Every byte a stream writes is counted once: file bytes sent with `sendfile(2)` in
/// [`sendfile_bytes`](Self::sendfile_bytes), everything else (response heads, chunk framing,
/// bytes of bodies that are not mapped files, the held-back bytes at response ends) in
/// [`copied_bytes`](Self::copied_bytes). Export
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
    checked_ends: AtomicU64,
    held_back_bytes: AtomicU64,
    aligned_ends: AtomicU64,
    aligned_fallbacks: AtomicU64,
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

    /// Responses whose last file bytes were sent only after the peer had received everything
    /// before them and the file was checked (see [`SendfileStream`], "Truncation and the last
    /// byte of a response").
    pub fn checked_ends(&self) -> u64 {
        self.inner.checked_ends.load(Ordering::Relaxed)
    }

    /// File bytes held back at response ends and copied after the check: one per response
    /// that waited, the last partial segment's bytes per [aligned end](Self::aligned_ends).
    /// They are also counted in [`copied_bytes`](Self::copied_bytes): the file bytes of
    /// sendfile-path responses are `sendfile_bytes() + held_back_bytes()`.
    pub fn held_back_bytes(&self) -> u64 {
        self.inner.held_back_bytes.load(Ordering::Relaxed)
    }

    /// Of the [`checked_ends`](Self::checked_ends), those checked right after the file data
    /// without a wait: `sendfile` stopped at a segment boundary of the corked socket, nothing
    /// was left unsent, and the tail (at most
    /// [`max_copied_tail`](SendfileStream::max_copied_tail) bytes) was copied.
    pub fn aligned_ends(&self) -> u64 {
        self.inner.aligned_ends.load(Ordering::Relaxed)
    }

    /// Response ends that tried the aligned end but found bytes still unsent (a closed peer
    /// window, congestion, or a segment size other than expected) and waited instead (still
    /// holding back, and then copying, the last partial segment).
    pub fn aligned_fallbacks(&self) -> u64 {
        self.inner.aligned_fallbacks.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for SendfileStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendfileStats")
            .field("sendfile_bytes", &self.sendfile_bytes())
            .field("copied_bytes", &self.copied_bytes())
            .field("sendfile_calls", &self.sendfile_calls())
            .field("truncations", &self.truncations())
            .field("checked_ends", &self.checked_ends())
            .field("held_back_bytes", &self.held_back_bytes())
            .field("aligned_ends", &self.aligned_ends())
            .field("aligned_fallbacks", &self.aligned_fallbacks())
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
/// * over TCP the socket is corked (`TCP_CORK`, like nginx's `tcp_nopush`) from a response's
///   first file slice — before its head leaves — until its file data is in the socket, so only
///   full segments go out meanwhile;
/// * at most [`max_chunk`](Self::max_chunk) bytes per call (fairness), partial writes and
///   `EAGAIN` are reported exactly (`Ok(n)` once anything was written, `Pending` otherwise);
/// * after a write the full socket cut short, the next call waits until the socket polls
///   writable again (for TCP about a third of its buffer free), as nginx does, instead of
///   sending the one or two segments a reading peer has freed meanwhile;
/// * a `sendfile` that returns 0 before the slice is done (the file was truncated) is an
///   [`io::ErrorKind::UnexpectedEof`] error, so hyper closes the connection short of its
///   `Content-Length`; the socket is then reset (`SO_LINGER` 0), which discards what it still
///   holds instead of delivering it.
///
/// # Truncation and the last byte of a response
///
/// `sendfile(2)` hands the socket *references* to page-cache pages, not copies. Truncating a
/// file zeroes, in place, the part of the page-cache folio (up to 2 MiB with large folios) that
/// lies past the new end of file — including pages the socket still holds. Bytes that were
/// queued before the truncation can therefore reach the peer as zeros, after `sendfile`
/// reported them sent. So the end of each response's file data is held back (its last byte, or
/// on loopback its last partial segment: see "Aligned ends" below): once everything before it
/// has been handed to the kernel, the stream waits until the peer has received all of it, then
/// checks that every file sent since the previous check still holds the bytes sent of it, and
/// only then copies the held-back bytes with `pread` and `sendmsg`. If a file shrank,
/// the write fails with [`io::ErrorKind::UnexpectedEof`] and the socket is reset: the peer gets
/// fewer bytes than `Content-Length`, never a complete response with wrong bytes.
///
/// "Received" means, for a TCP peer on a loopback address, that nothing is left unsent (sent
/// bytes are then in the same kernel, queued for the peer: waiting for their acknowledgement as
/// well would cost a timer tick per response and not shrink the same-host window described
/// below); for any other TCP peer,
/// that every byte is acknowledged (`SIOCOUTQ` is 0), which costs the response one more round
/// trip; for a Unix socket, that the peer has read every byte. Waiting for the send queue to
/// empty needs no timer: `TCP_NOTSENT_LOWAT` is lowered to 1 for the wait, so the socket polls
/// writable exactly when nothing is unsent, and restored afterwards. Acknowledgements and
/// Unix-socket reads are polled on tokio's timer (first at the next tick, then at doubling
/// intervals up to [`drain_poll_max`](Self::drain_poll_max)), so the runtime must have timers
/// enabled.
///
/// ## Aligned ends (loopback TCP)
///
/// Waiting costs a loopback response about two microseconds and the last byte a segment of its
/// own. So on a corked socket to a loopback peer the stream first tries to *align* the end:
/// with `TCP_CORK` set, Linux sends only whole segments, so `sendfile` stops at the last
/// segment boundary (from the socket's `TCP_MAXSEG` and the bytes written since the cork),
/// and the rest of the response's file data — the last partial segment, if it is at most
/// [`max_copied_tail`](Self::max_copied_tail) bytes (default [`DEFAULT_MAX_COPIED_TAIL`]) —
/// is held back instead of one byte. Right after that `sendfile` the stream asks the kernel
/// whether anything is unsent (`SIOCOUTQNSD`). If nothing is, the gate is open without a wait
/// (the same condition the wait ends on for a loopback peer): the files are checked, the tail
/// is read with `pread` and copied with `sendmsg`, and the uncork sends it as the response's
/// last, partial segment, as nginx's responses end. If anything is unsent (a closed peer window,
/// congestion, or a segment size other than expected), the response ends the waiting way with
/// the same tail held back: uncork, wait until nothing is unsent, check, copy the tail. Safety
/// never depends on the segment arithmetic, only on the kernel's count of unsent bytes.
/// [`SendfileStats::aligned_ends`] and [`SendfileStats::aligned_fallbacks`] count both
/// outcomes, [`SendfileStats::held_back_bytes`] the bytes copied.
///
/// What remains: a peer on the **same host** (loopback, a veth pair between containers) holds
/// received bytes in its receive queue, where they still reference the same pages until the
/// peer application reads them. A truncation after the check and before that read can still
/// zero them (at most the peer's receive buffer, and on loopback the segment that left with
/// the last byte); no sender-side call can observe the peer's reads, and a reset does not
/// retract them (Linux keeps queued data readable after an RST). Over a real network an
/// acknowledged byte is a copy in the peer's memory, and over a Unix socket the check waits
/// for the reads themselves, so there the guarantee is complete.
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
    max_tail: usize,
    drain: DrainWait,
    #[cfg(target_os = "linux")]
    unchecked: Unchecked,
}

impl<S: fmt::Debug> fmt::Debug for SendfileStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendfileStream")
            .field("io", &self.io)
            .field("stats", &self.stats)
            .field("max_chunk", &self.max_chunk)
            .field("max_copied_tail", &self.max_tail)
            .field("drain_poll_max", &self.drain.max)
            .finish()
    }
}

/// The timer between checks of the socket's queue before a response's last byte.
struct DrainWait {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    next: Duration,
    max: Duration,
}

impl DrainWait {
    fn new(max: Duration) -> Self {
        DrainWait {
            sleep: None,
            armed: false,
            next: FIRST_DRAIN_POLL,
            max,
        }
    }

    /// Ready when it is time to check again.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use std::future::Future;
        let sleep = match &mut self.sleep {
            Some(sleep) if self.armed => sleep,
            slot => {
                let deadline = tokio::time::Instant::now() + self.next;
                self.armed = true;
                match slot {
                    Some(sleep) => {
                        sleep.as_mut().reset(deadline);
                        sleep
                    }
                    None => slot.insert(Box::pin(tokio::time::sleep_until(deadline))),
                }
            }
        };
        std::task::ready!(sleep.as_mut().poll(cx));
        self.armed = false;
        self.next = (self.next * 2).min(self.max);
        Poll::Ready(())
    }

    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    fn reset(&mut self) {
        self.armed = false;
        self.next = FIRST_DRAIN_POLL;
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
            max_tail: DEFAULT_MAX_COPIED_TAIL,
            drain: DrainWait::new(DEFAULT_DRAIN_POLL_MAX),
            #[cfg(target_os = "linux")]
            unchecked: Unchecked::default(),
        }
    }

    /// Sets the most bytes one write call sends (default [`DEFAULT_MAX_CHUNK`], minimum 4 KiB).
    pub fn max_chunk(mut self, bytes: usize) -> Self {
        self.max_chunk = bytes.max(4096);
        self
    }

    /// Sets the longest interval between two checks of whether the peer has received everything
    /// before a response's last byte (default [`DEFAULT_DRAIN_POLL_MAX`], at least 1 ms; see
    /// "Truncation and the last byte of a response" above). Checks start at the next timer tick
    /// and back off by doubling up to this; a larger value costs slow peers more latency at the
    /// end of each response, a smaller one costs more wake-ups while they read.
    pub fn drain_poll_max(mut self, interval: Duration) -> Self {
        self.drain = DrainWait::new(interval.max(Duration::from_millis(1)));
        self
    }

    /// Sets the most file bytes at the end of a response that may be copied so that the
    /// response ends without a wait (default [`DEFAULT_MAX_COPIED_TAIL`]; 0: always wait; see
    /// "Truncation and the last byte of a response" above). On loopback TCP the last partial
    /// segment of a response (its bytes past the last whole segment) is copied instead of sent
    /// with `sendfile` when it is at most this long; a larger value copies more bytes for more
    /// responses, a smaller one lets more responses wait for the send queue and end with a
    /// one-byte segment.
    pub fn max_copied_tail(mut self, bytes: usize) -> Self {
        self.max_tail = bytes;
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

    #[cfg(target_os = "linux")]
    fn poll_write_slices(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.io.poll_ready(cx))?;
            let res = {
                let (io, stats) = (&self.io, &self.stats);
                let limits = Limits {
                    cap: self.max_chunk,
                    max_tail: self.max_tail,
                };
                let unchecked = &mut self.unchecked;
                io.try_write(|| write_slices(io, stats, limits, bufs, unchecked))
            };
            match res {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(Written::Drain) => std::task::ready!(self.drain.poll_wait(cx)),
                Ok(Written::Bytes(n)) => {
                    self.drain.reset();
                    return Poll::Ready(Ok(n));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// What one write call achieved.
#[cfg(target_os = "linux")]
enum Written {
    /// Bytes written (at least one, unless `bufs` was empty).
    Bytes(usize),
    /// Nothing written: the next byte is a response's last one, and the socket still holds bytes
    /// for the peer. Check again later.
    Drain,
}

/// File data sent with `sendfile` whose check is still due (see [`SendfileStream`]).
#[cfg(target_os = "linux")]
#[derive(Default)]
struct Unchecked {
    /// Each file sent from since the last check, and the end of the furthest byte sent of it.
    files: Vec<(Arc<crate::registry::Target>, u64)>,
    /// End address of the fenced slice whose check passed, while its held-back bytes go out.
    passed: Option<usize>,
    /// The socket's peer, learnt at the first response end.
    peer: Option<crate::sys::Peer>,
    /// The socket's own `TCP_NOTSENT_LOWAT`, read the first time it is lowered.
    lowat: Option<u32>,
    /// Whether `TCP_NOTSENT_LOWAT` is lowered right now (to wait for the send queue).
    lowered: bool,
    /// Whether this stream has set `TCP_CORK` (from a response's first file bytes to its end).
    corked: bool,
    /// Bytes written since the cork was set, while known to be whole segments plus the corked
    /// tail (`None` after a short write, when the kernel may have pushed a partial segment).
    queued: Option<u64>,
    /// The socket's segment size (`TCP_MAXSEG`), read at the first aligned end (and again
    /// after one missed).
    mss: Option<u64>,
    /// The fenced slice (end address) whose aligned end found bytes unsent, and the bytes it
    /// holds back: it ends the waiting way, with the same bytes held back.
    waiting: Option<(usize, usize)>,
    /// The last write was cut short by a full socket (see [`write_slices`]).
    socket_full: bool,
}

/// The per-call limits of [`write_slices`].
#[cfg(target_os = "linux")]
#[derive(Clone, Copy)]
struct Limits {
    /// Fairness cap: bytes per call.
    cap: usize,
    /// Most bytes copied for an aligned end.
    max_tail: usize,
}

/// Whether a response's last byte may be checked and sent now.
#[cfg(target_os = "linux")]
enum Gate {
    /// The peer has everything before it.
    Open,
    /// Not yet; the kernel signals writability when it is (`TCP_NOTSENT_LOWAT` armed).
    Writable,
    /// Not yet; look again on the timer.
    Later,
}

#[cfg(target_os = "linux")]
impl Unchecked {
    /// Corks a TCP socket before a response's head and file data (as nginx's `tcp_nopush`):
    /// only full segments leave until [`Self::uncork`]. (nginx on this project's machine spent
    /// 1.3x more CPU per GB on 256 MiB files with `tcp_nopush off`.)
    fn cork(&mut self, fd: std::os::fd::BorrowedFd<'_>) {
        use crate::sys::{self, Peer};
        if self.corked {
            return;
        }
        if *self.peer.get_or_insert_with(|| sys::peer(fd)) != Peer::Other {
            // Best effort: without the cork the bytes still go out, in more segments.
            self.corked = rustix::net::sockopt::set_tcp_cork(fd, true).is_ok();
            self.queued = Some(0);
        }
    }

    /// Records `n` bytes handed to the socket, `whole` if that was all that was asked for.
    fn wrote(&mut self, n: usize, whole: bool) {
        // A write the socket cut short may have made the kernel push a partial segment
        // (`tcp_sendmsg_locked` pushes with `TCP_NAGLE_PUSH` before it waits for memory, cork
        // or not): from then on the count no longer tells where segments end.
        self.queued = match self.queued {
            Some(q) if whole => Some(q + n as u64),
            _ => None,
        };
        // Cut short after some bytes: the socket is full (or a file ended, which the next
        // call finds out once there is room).
        self.socket_full |= n > 0 && !whole;
    }

    /// How many of the last `len` file bytes of a response (a fenced slice ending at
    /// `end_addr`) to hold back for the check, and whether that end is *aligned*.
    ///
    /// Aligned (corked loopback TCP only): hold back the bytes past the last segment boundary,
    /// if at most `max_tail`. With `TCP_CORK` set, `tcp_write_xmit` sends the last skb of the
    /// queue only in whole segments (`tcp_nagle_check` refuses a partial one while
    /// `TCP_NAGLE_CORK` is set, and `tcp_mss_split_point` splits a larger skb at the last
    /// `mss_now` boundary), while skbs before it are sent whole. The bytes queued since the cork
    /// was set fill skbs of `size_goal`, a multiple of `mss_now` (on loopback one segment: 64
    /// KiB of page fragments fits in `MAX_SKB_FRAGS`). So once every byte before the tail is
    /// queued, and the peer window and congestion window are open, nothing should be left
    /// unsent. Nothing here relies on that: the caller asks the kernel (`SIOCOUTQNSD`) and
    /// waits the usual way unless it is 0.
    fn held_back(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        end_addr: usize,
        len: usize,
        max_tail: usize,
    ) -> (usize, bool) {
        use crate::sys::Peer;
        if self.passed == Some(end_addr) {
            // Checked: what is left of the slice is copied.
            return (len, false);
        }
        if let Some((end, held)) = self.waiting {
            if end == end_addr {
                return (held.min(len), false);
            }
        }
        let waiting = (len.min(HELD_BACK), false);
        if !self.corked || max_tail == 0 || self.peer != Some(Peer::TcpLoopback) {
            return waiting;
        }
        let mss = match self.mss {
            Some(mss) => mss,
            None => match socket2::SockRef::from(&fd).tcp_mss() {
                Ok(mss) if mss > 0 => *self.mss.insert(u64::from(mss)),
                _ => return waiting,
            },
        };
        let queued = match self.queued {
            Some(q) => q,
            // After a short write: the unsent bytes are the corked tail if the window is open
            // (if it is not, the check below finds bytes unsent and the end waits).
            None => match crate::mapping::socket_unsent(fd) {
                Ok(unsent) => *self.queued.insert(unsent as u64),
                Err(_) => return waiting,
            },
        };
        let tail = match (queued + len as u64) % mss {
            0 => mss,
            t => t,
        };
        if tail > max_tail as u64 || tail > len as u64 {
            return waiting;
        }
        (tail as usize, true)
    }

    /// Removes the cork set by [`Self::cork`], sending what it held back.
    fn uncork(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        if self.corked {
            self.corked = false;
            rustix::net::sockopt::set_tcp_cork(fd, false)?;
        }
        Ok(())
    }

    /// Whether the peer has received everything sent so far.
    ///
    /// TCP: first everything must have left the send queue. `TCP_NOTSENT_LOWAT` is lowered to 1
    /// while bytes are unsent, so the socket polls writable exactly when none is left, and the
    /// task waits for that `EPOLLOUT` instead of a timer. For a loopback peer that is enough (a
    /// sent byte is in the peer's receive queue, as close as a sender can know); any other peer
    /// must also have acknowledged everything (`SIOCOUTQ` 0), which is polled on the timer (one
    /// round trip). Unix sockets: `SIOCOUTQ` counts the bytes the peer has not read, polled on
    /// the timer.
    fn gate(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Gate> {
        use crate::sys::{self, Peer};
        let peer = *self.peer.get_or_insert_with(|| sys::peer(fd));
        if peer != Peer::Other {
            if crate::mapping::socket_unsent(fd)? > 0 {
                if !self.lowered {
                    let own = match self.lowat {
                        Some(own) => Ok(own),
                        None => sys::notsent_lowat(fd),
                    };
                    match own.and_then(|own| sys::set_notsent_lowat(fd, 1).map(|()| own)) {
                        Ok(own) => {
                            self.lowat = Some(own);
                            self.lowered = true;
                        }
                        Err(_) => return Ok(Gate::Later),
                    }
                }
                if !sys::poll_writable_now(fd)? {
                    return Ok(Gate::Writable);
                }
                // Writable although bytes were unsent: they left just now, or an error is pending.
                if crate::mapping::socket_unsent(fd)? > 0 {
                    return Ok(Gate::Later);
                }
            }
            if self.lowered {
                sys::set_notsent_lowat(fd, self.lowat.unwrap_or(0))?;
                self.lowered = false;
            }
            if peer == Peer::TcpLoopback {
                return Ok(Gate::Open);
            }
        }
        Ok(if crate::mapping::socket_outq(fd)? > 0 {
            Gate::Later
        } else {
            Gate::Open
        })
    }

    fn sent(&mut self, target: &Arc<crate::registry::Target>, upto: u64) {
        match self.files.iter_mut().find(|(t, _)| Arc::ptr_eq(t, target)) {
            Some((_, end)) => *end = (*end).max(upto),
            None => self.files.push((target.clone(), upto)),
        }
    }

    /// Run when the peer has everything sent so far: whether every file still holds all bytes
    /// sent of it. `fenced` is checked up to `end` by the caller (it reads the held-back bytes).
    fn check(&mut self, fenced: &Arc<crate::registry::Target>, end: u64) -> io::Result<bool> {
        for (target, upto) in &self.files {
            if Arc::ptr_eq(target, fenced) && *upto <= end {
                continue;
            }
            if target.file.metadata()?.len() < *upto {
                return Ok(false);
            }
        }
        self.files.clear();
        Ok(true)
    }
}

/// The error for a file that no longer holds bytes promised to the peer. Resets the socket on
/// close (`SO_LINGER` 0), so whatever it still holds is discarded rather than delivered.
#[cfg(target_os = "linux")]
fn truncated(fd: std::os::fd::BorrowedFd<'_>, stats: &SendfileStats) -> io::Error {
    stats.inner.truncations.fetch_add(1, Ordering::Relaxed);
    let _ = rustix::net::sockopt::set_socket_linger(fd, Some(Duration::ZERO));
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "file shrank while it was being sent",
    )
}

/// More unsent bytes than any TCP segment (the largest MSS, on loopback, is just under 64 KiB):
/// neither the cork nor Nagle holds that many back, only a closed peer window.
#[cfg(target_os = "linux")]
const MORE_THAN_A_SEGMENT: usize = 64 * 1024;

/// Whether a socket that polls not writable will free room by itself. TCP frees room on an
/// acknowledgement: either a sent byte is unacknowledged, or more than a segment is unsent,
/// which only a closed peer window holds back (its reopening sends them,
/// and their acknowledgements follow). Otherwise the unsent bytes can be a partial segment
/// held by the cork, with nothing to acknowledge, and the write that asked goes ahead
/// instead: it adds to the queue or meets `EAGAIN`, as any write would. Unix sockets free
/// room whenever the peer reads.
#[cfg(target_os = "linux")]
fn room_will_come(fd: std::os::fd::BorrowedFd<'_>, unchecked: &mut Unchecked) -> bool {
    use crate::sys::{self, Peer};
    if *unchecked.peer.get_or_insert_with(|| sys::peer(fd)) == Peer::Other {
        return true;
    }
    match (
        crate::mapping::socket_outq(fd),
        crate::mapping::socket_unsent(fd),
    ) {
        (Ok(queued), Ok(unsent)) => queued > unsent || unsent >= MORE_THAN_A_SEGMENT,
        _ => false,
    }
}

#[cfg(target_os = "linux")]
fn write_slices<S: SendfileSocket>(
    io: &S,
    stats: &SendfileStats,
    limits: Limits,
    bufs: &[IoSlice<'_>],
    unchecked: &mut Unchecked,
) -> io::Result<Written> {
    use crate::{registry, sys};
    let fd = io.fd();
    if unchecked.socket_full {
        // The last write was cut short: the socket had no room. hyper asks again at once, and
        // by then the peer has freed a segment or two, so writing now would send a few
        // segments per call for as long as the peer keeps reading. Like nginx, wait instead
        // until the socket polls writable (for TCP about a third of its buffer free). The
        // kernel arms the wake-up when poll reports "not writable" (`SOCK_NOSPACE`, or a
        // Unix socket's every freed buffer), and `WouldBlock` inside `try_io` clears tokio's
        // readiness only if no event arrived since this call began, so the `EPOLLOUT` that
        // follows is never lost. That event is the room: the call it wakes writes without
        // asking again.
        unchecked.socket_full = false;
        if !sys::poll_writable_now(fd)? && room_will_come(fd, unchecked) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
    }
    let cap = limits.cap;
    let mut total = 0usize;
    let mut i = 0;
    // `WouldBlock` after progress is reported as that progress (the next call waits for
    // room); any other error ends the connection anyway, so it is returned at once.
    let partial = |unchecked: &mut Unchecked, total: usize, e: io::Error| {
        if total > 0 && e.kind() == io::ErrorKind::WouldBlock {
            unchecked.socket_full = true;
            Ok(Written::Bytes(total))
        } else {
            Err(e)
        }
    };
    // Bytes sent from user-space buffers: counted as copied.
    let send_copied = |bufs: &[IoSlice<'_>], more: bool| {
        let n = sys::send_vectored(fd, bufs, more)?;
        stats
            .inner
            .copied_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok::<usize, io::Error>(n)
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
        // A slice that ends a response keeps its last bytes back for the check.
        let fence = match &file_slice {
            Some((target, offset)) if target.is_fence(offset + bufs[i].len() as u64) => {
                Some(bufs[i].as_ptr() as usize + bufs[i].len())
            }
            _ => None,
        };
        if file_slice.is_some() {
            // Cork unless all this call can send of the slice is copied held-back bytes.
            let only_held = fence.is_some_and(|end_addr| {
                let held = match unchecked.waiting {
                    Some((end, held)) if end == end_addr => held,
                    _ => HELD_BACK,
                };
                unchecked.passed == Some(end_addr) || bufs[i].len() <= held
            });
            if !only_held {
                unchecked.cork(fd);
            }
        }
        let run = &bufs[run_start..i];
        let run_len: usize = run.iter().map(|b| b.len()).sum();
        if run_len > 0 {
            match send_copied(run, file_slice.is_some()) {
                Ok(n) => {
                    total += n;
                    unchecked.wrote(n, n == run_len);
                    if n < run_len {
                        return Ok(Written::Bytes(total));
                    }
                }
                Err(e) => {
                    unchecked.wrote(0, false);
                    return partial(unchecked, total, e);
                }
            }
        }
        let Some((target, offset)) = file_slice else {
            break;
        };
        let len = bufs[i].len();
        let (held, aligned) = match fence {
            Some(end_addr) => unchecked.held_back(fd, end_addr, len, limits.max_tail),
            None => (0, false),
        };
        let end = offset + len as u64;
        let direct = len - held;
        let mut sent = 0;
        while sent < direct && total < cap {
            let want = (direct - sent).min(cap - total);
            let mut at = offset + sent as u64;
            match sys::send_file(fd, &target.file, &mut at, want) {
                // Report what was written; the next call meets the short file again.
                Ok(0) if total > 0 => return Ok(Written::Bytes(total)),
                Ok(0) => return Err(truncated(fd, stats)),
                Ok(n) => {
                    stats
                        .inner
                        .sendfile_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                    stats.inner.sendfile_calls.fetch_add(1, Ordering::Relaxed);
                    sent += n;
                    total += n;
                    unchecked.wrote(n, n == want);
                    unchecked.sent(&target, offset + sent as u64);
                    if n < want {
                        // The socket is full (or the file ended): see `Unchecked::wrote`.
                        return Ok(Written::Bytes(total));
                    }
                }
                Err(e) => {
                    unchecked.wrote(0, false);
                    return partial(unchecked, total, e);
                }
            }
        }
        if sent < direct {
            return Ok(Written::Bytes(total));
        }
        if let Some(end_addr) = fence {
            if unchecked.passed != Some(end_addr) {
                // Every byte before the tail is in the corked socket. If none is unsent, the
                // gate is open without waiting (as `gate` finds for a loopback peer), and the
                // response ends like nginx's: the tail leaves with the uncork, in the last
                // partial segment.
                let at_once = aligned && matches!(crate::mapping::socket_unsent(fd), Ok(0));
                if at_once {
                    stats.inner.aligned_ends.fetch_add(1, Ordering::Relaxed);
                } else {
                    if aligned {
                        // A closed window, congestion, or another segment size: the waiting
                        // way, still holding back the same bytes (the segment size is read
                        // again for the next response).
                        stats
                            .inner
                            .aligned_fallbacks
                            .fetch_add(1, Ordering::Relaxed);
                        unchecked.waiting = Some((end_addr, held));
                        unchecked.mss = None;
                    }
                    // Only once every byte before it has left the send queue: bytes still in
                    // it (held by the cork, or by a peer window that is closed) are page-cache
                    // pages a truncation would zero. A byte count alone cannot tell the cork's
                    // tail from bytes the window holds, so the wait is taken even when little
                    // is unsent.
                    if total > 0 {
                        return Ok(Written::Bytes(total));
                    }
                    // The response's file data is in the socket: let its last segment go.
                    unchecked.uncork(fd)?;
                    match unchecked.gate(fd)? {
                        Gate::Open => {}
                        // Inside `try_io`, `WouldBlock` clears the readiness: wait for `EPOLLOUT`.
                        Gate::Writable => return Err(io::ErrorKind::WouldBlock.into()),
                        Gate::Later => return Ok(Written::Drain),
                    }
                }
                if !unchecked.check(&target, end)? {
                    return Err(truncated(fd, stats));
                }
                unchecked.passed = Some(end_addr);
            }
            let sent_held = TAIL.with(|buf| {
                let mut buf = buf.borrow_mut();
                if buf.len() < held {
                    buf.resize(held, 0);
                }
                let tail = &mut buf[..held];
                // Reading them proves the file still reaches `end`; the copy cannot change
                // later.
                if sys::read_at(&target.file, tail, end - held as u64)? < held {
                    return Err(truncated(fd, stats));
                }
                send_copied(&[IoSlice::new(tail)], false)
            });
            match sent_held {
                Ok(n) => {
                    total += n;
                    unchecked.wrote(n, n == held);
                    stats
                        .inner
                        .held_back_bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                    if n < held {
                        return Ok(Written::Bytes(total));
                    }
                }
                Err(e) => {
                    unchecked.wrote(0, false);
                    return partial(unchecked, total, e);
                }
            }
            stats.inner.checked_ends.fetch_add(1, Ordering::Relaxed);
            unchecked.passed = None;
            unchecked.waiting = None;
        }
        i += 1;
    }
    if i == bufs.len() && unchecked.corked {
        // Everything hyper has queued is in the socket: nothing follows at once, so let the
        // last partial segment go (with the check off, a response ends here too).
        if let Err(e) = unchecked.uncork(fd) {
            return partial(unchecked, total, e);
        }
    }
    Ok(Written::Bytes(total))
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
        #[cfg(target_os = "linux")]
        {
            this.poll_write_slices(cx, bufs)
        }
        #[cfg(not(target_os = "linux"))]
        {
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
