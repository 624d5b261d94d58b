//! [`FileBody`]: a response body of file regions and literal bytes, sent either by `sendfile(2)`
//! (through a memory map the process never reads) or by the portable path (positional reads on
//! the blocking pool into large buffers of our own).

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;

#[cfg(target_os = "linux")]
use crate::mapping::Mapping;

/// Default size of one portable read (and of one buffer): 256 KiB.
///
/// Measured on this project's loopback bench (1 MiB files, wrk, `ZC_BENCH=tuning`): server CPU
/// per GB was 0.34 s with 64 KiB reads, 0.30 s with 256 KiB, 0.35 s with 512 KiB and 0.36 s with
/// 1 MiB; larger buffers only hold more memory per connection.
pub const DEFAULT_READ_CHUNK: usize = 256 * 1024;

/// Default size of one memory-mapped window handed to hyper on the sendfile path: 8 MiB.
/// Each window is checked for page-cache residency before it is yielded.
pub const DEFAULT_MAP_WINDOW: usize = 8 * 1024 * 1024;

/// Default of [`ServeDir::residency_recheck`](crate::ServeDir::residency_recheck): a file's
/// map window found wholly in the page cache is not asked about again for 1 s.
pub const DEFAULT_RESIDENCY_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// One piece of a body: literal bytes (e.g. a multipart boundary) or a region of the file.
#[derive(Debug, Clone)]
pub(crate) enum Part {
    Static(Bytes),
    File(Range<u64>),
}

impl Part {
    fn len(&self) -> u64 {
        match self {
            Part::Static(b) => b.len() as u64,
            Part::File(r) => r.end - r.start,
        }
    }
}

/// How file regions become `Bytes`.
#[derive(Debug, Clone)]
pub(crate) enum Strategy {
    /// `pread` on the blocking pool into fresh buffers of `chunk` bytes, one read ahead.
    Portable { chunk: usize },
    /// Slices of a registered memory map, for [`SendfileStream`](crate::SendfileStream).
    #[cfg(target_os = "linux")]
    Mapped {
        mapping: Arc<Mapping>,
        window: usize,
        /// Whether the response's last byte waits for the file check (see
        /// [`ServeDir::check_truncation`](crate::ServeDir::check_truncation)).
        fence_end: bool,
        /// See [`ServeDir::residency_recheck`](crate::ServeDir::residency_recheck).
        recheck: std::time::Duration,
    },
}

/// The response body of [`ServeDir`](crate::ServeDir) and [`ServeFile`](crate::ServeFile).
///
/// It reports its exact length in [`size_hint`](Body::size_hint) and yields file data in one of
/// two ways, chosen per response by the service:
///
/// * **sendfile path** (Linux, plaintext HTTP/1 through a [`SendfileStream`](crate::SendfileStream),
///   region at least [`ServeDir::sendfile_min_len`](crate::ServeDir::sendfile_min_len)):
///   windows of a read-only memory map, each checked with `mincore(2)` and warmed on the
///   blocking pool if not in the page cache, so `sendfile` does not block a worker on disk;
/// * **portable path** (everything else): `pread` on the blocking pool straight into buffers of
///   [`ServeDir::read_chunk`](crate::ServeDir::read_chunk) bytes, with the next read already in
///   flight while hyper writes the current one.
///
/// A file that shrinks while it is being sent makes the body (portable path) or the connection
/// (sendfile path) fail with an I/O error, so hyper closes the connection short of the promised
/// `Content-Length` rather than presenting wrong bytes as complete.
pub struct FileBody {
    kind: Kind,
}

enum Kind {
    Empty,
    Once(Option<Bytes>),
    File(Box<FileState>),
}

struct FileState {
    file: Arc<File>,
    parts: VecDeque<Part>,
    /// Bytes not yet yielded, including `inflight`.
    remaining: u64,
    strategy: Strategy,
    /// A read (portable) or a warm-up (mapped) on the blocking pool, and the bytes it will yield.
    inflight: Option<JoinHandle<io::Result<Bytes>>>,
}

impl fmt::Debug for FileBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("FileBody");
        match &self.kind {
            Kind::Empty => d.field("kind", &"empty"),
            Kind::Once(b) => d.field("bytes", &b.as_ref().map(Bytes::len)),
            Kind::File(s) => d
                .field("remaining", &s.remaining)
                .field("strategy", &s.strategy)
                .field("parts", &s.parts.len()),
        };
        d.finish()
    }
}

impl FileBody {
    /// An empty body (`HEAD`, `304`, `412`, …).
    pub fn empty() -> Self {
        FileBody { kind: Kind::Empty }
    }

    /// A body of literal bytes (error pages).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        let b = bytes.into();
        if b.is_empty() {
            return Self::empty();
        }
        FileBody {
            kind: Kind::Once(Some(b)),
        }
    }

    /// A body of `range` of `file`, sent by the portable path with reads of `chunk` bytes.
    ///
    /// The range must lie within the file; if the file is shorter when read, the body fails
    /// with [`io::ErrorKind::UnexpectedEof`].
    ///
    /// ```no_run
    /// # async fn f() -> std::io::Result<()> {
    /// use tower_zerocopy::FileBody;
    /// let file = std::fs::File::open("/etc/hostname")?;
    /// let len = file.metadata()?.len();
    /// let body = FileBody::portable(file, 0..len, 256 * 1024);
    /// # let _ = body; Ok(()) }
    /// # let _ = f;
    /// ```
    pub fn portable(file: File, range: Range<u64>, chunk: usize) -> Self {
        Self::from_parts(
            Arc::new(file),
            vec![Part::File(range)],
            Strategy::Portable {
                chunk: chunk.max(4096),
            },
        )
    }

    /// A body of `range` of `file` for the request described by `version` and `extensions`,
    /// choosing the path the way [`ServeDir`](crate::ServeDir) does: the sendfile path when the
    /// target is Linux, `extensions` hold a [`SendfileCapability`](crate::SendfileCapability),
    /// `version` is HTTP/1.x and the range has at least
    /// [`DEFAULT_SENDFILE_MIN_LEN`](crate::DEFAULT_SENDFILE_MIN_LEN) bytes; the portable path with
    /// [`DEFAULT_READ_CHUNK`] reads otherwise. The file is mapped for this body alone (no cache).
    ///
    /// Fails with [`io::ErrorKind::InvalidInput`] if `range` does not lie within the file.
    ///
    /// ```
    /// use http::Request;
    /// use tower_zerocopy::FileBody;
    ///
    /// async fn handler(req: Request<()>) -> std::io::Result<http::Response<FileBody>> {
    ///     let file = std::fs::File::open("/etc/hostname")?; // use spawn_blocking in real code
    ///     let len = file.metadata()?.len();
    ///     let body = FileBody::for_request(file, 0..len, req.version(), req.extensions())?;
    ///     Ok(http::Response::new(body))
    /// }
    /// # let _ = handler;
    /// ```
    pub fn for_request(
        file: File,
        range: Range<u64>,
        version: http::Version,
        extensions: &http::Extensions,
    ) -> io::Result<Self> {
        let len = file.metadata()?.len();
        if range.start > range.end || range.end > len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside the file",
            ));
        }
        let file = Arc::new(file);
        let sendfile = crate::sys::HAS_SENDFILE
            && extensions.get::<crate::SendfileCapability>().is_some()
            && matches!(version, http::Version::HTTP_10 | http::Version::HTTP_11)
            && range.end - range.start >= crate::DEFAULT_SENDFILE_MIN_LEN;
        #[cfg(target_os = "linux")]
        if sendfile {
            let mapping = Mapping::new(file.clone(), len)?;
            return Ok(Self::from_parts(
                file,
                vec![Part::File(range)],
                Strategy::Mapped {
                    mapping,
                    window: DEFAULT_MAP_WINDOW,
                    fence_end: true,
                    recheck: DEFAULT_RESIDENCY_RECHECK,
                },
            ));
        }
        let _ = sendfile;
        Ok(Self::from_parts(
            file,
            vec![Part::File(range)],
            Strategy::Portable {
                chunk: DEFAULT_READ_CHUNK,
            },
        ))
    }

    pub(crate) fn from_parts(file: Arc<File>, parts: Vec<Part>, strategy: Strategy) -> Self {
        let mut parts = parts;
        parts.retain(|p| p.len() > 0);
        // Reuses the vector's buffer.
        let parts = VecDeque::from(parts);
        let remaining = parts.iter().map(Part::len).sum();
        if remaining == 0 {
            return Self::empty();
        }
        FileBody {
            kind: Kind::File(Box::new(FileState {
                file,
                parts,
                remaining,
                strategy,
                inflight: None,
            })),
        }
    }

    /// Whether file data goes out through the sendfile path.
    pub fn is_sendfile(&self) -> bool {
        match &self.kind {
            #[cfg(target_os = "linux")]
            Kind::File(s) => matches!(s.strategy, Strategy::Mapped { .. }),
            _ => false,
        }
    }
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "file shrank while it was being sent",
    )
}

impl FileState {
    /// Starts the blocking-pool work for the next file chunk, if the next part is file data.
    fn start_next(&mut self) -> Option<Bytes> {
        // Whether a file part follows the current one (the last one ends the response's file data).
        #[cfg(target_os = "linux")]
        let more_file = self
            .parts
            .iter()
            .skip(1)
            .any(|p| matches!(p, Part::File(r) if r.start < r.end));
        let Some(Part::File(range)) = self.parts.front_mut() else {
            return None;
        };
        match &self.strategy {
            Strategy::Portable { chunk } => {
                let len = (range.end - range.start).min(*chunk as u64);
                let offset = range.start;
                range.start += len;
                let file = self.file.clone();
                self.inflight = Some(tokio::task::spawn_blocking(move || {
                    let buf = crate::sys::read_exact_at(&file, offset, len as usize)?;
                    if (buf.len() as u64) < len {
                        return Err(truncated());
                    }
                    Ok(Bytes::from(buf))
                }));
                None
            }
            #[cfg(target_os = "linux")]
            Strategy::Mapped {
                mapping,
                window,
                fence_end,
                recheck,
            } => {
                let end = range.end.min(range.start + *window as u64);
                let win = range.start..end;
                range.start = end;
                debug_assert!(
                    win.end <= mapping.len(),
                    "ranges are checked against the mapping"
                );
                // The response's last file bytes carry a fence: the stream checks that the file
                // still holds them before it sends the last byte (see `SendfileStream`).
                let bytes = if *fence_end && end == range.end && !more_file {
                    mapping.fenced_slice(win.clone())
                } else {
                    mapping.slice(win.clone())
                };
                match mapping.non_resident(win, *window as u64, *recheck) {
                    Ok(None) => Some(bytes),
                    Ok(Some(cold)) => {
                        let file = self.file.clone();
                        self.inflight = Some(tokio::task::spawn_blocking(move || {
                            warm(&file, cold)?;
                            Ok(bytes)
                        }));
                        None
                    }
                    // Residency unknown: yield it; at worst sendfile waits for the disk.
                    Err(_) => Some(bytes),
                }
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        loop {
            if let Some(handle) = &mut self.inflight {
                let res = ready!(Pin::new(handle).poll(cx));
                self.inflight = None;
                let bytes = match res {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => return Poll::Ready(Some(Err(e))),
                    Err(join) => return Poll::Ready(Some(Err(io::Error::other(join)))),
                };
                self.remaining -= bytes.len() as u64;
                if matches!(self.strategy, Strategy::Portable { .. }) {
                    // Read ahead: the next chunk is read while hyper writes this one.
                    self.pop_empty();
                    if let Some(b) = self.start_next() {
                        unreachable_bytes(b);
                    }
                }
                return Poll::Ready(Some(Ok(bytes)));
            }
            self.pop_empty();
            match self.parts.front_mut() {
                None => return Poll::Ready(None),
                Some(Part::Static(_)) => {
                    let Some(Part::Static(b)) = self.parts.pop_front() else {
                        unreachable!("front was a static part")
                    };
                    self.remaining -= b.len() as u64;
                    return Poll::Ready(Some(Ok(b)));
                }
                Some(Part::File(_)) => {
                    if let Some(b) = self.start_next() {
                        self.remaining -= b.len() as u64;
                        return Poll::Ready(Some(Ok(b)));
                    }
                }
            }
        }
    }

    fn pop_empty(&mut self) {
        while matches!(self.parts.front(), Some(Part::File(r)) if r.start >= r.end) {
            self.parts.pop_front();
        }
    }
}

/// The portable strategy never yields synchronously; this documents that invariant.
fn unreachable_bytes(_b: Bytes) {
    debug_assert!(false, "portable reads complete on the blocking pool");
}

/// Bytes read into the page cache by the sendfile path before sending (see [`warmed_bytes`]).
static WARMED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes that the sendfile path found missing from the page cache (`mincore`) and read in on the
/// blocking pool before handing them to `sendfile`, process-wide. A high rate means the working
/// set does not fit in memory.
pub fn warmed_bytes() -> u64 {
    WARMED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Number of file memory maps alive in this process (each registered for sendfile). Always 0
/// on targets other than Linux. Useful for leak checks.
pub fn live_mappings() -> usize {
    #[cfg(target_os = "linux")]
    {
        crate::registry::live_mappings()
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// Brings `range` of `file` into the page cache by reading it into a scratch buffer, like
/// nginx's `aio threads`. Runs on the blocking pool.
#[cfg(target_os = "linux")]
fn warm(file: &File, range: Range<u64>) -> io::Result<()> {
    const SCRATCH: usize = 1024 * 1024;
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(SCRATCH));
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let mut off = range.start;
        while off < range.end {
            buf.clear();
            let n = ((range.end - off) as usize).min(SCRATCH);
            let got = crate::sys::read_at_into(file, &mut buf, off, n)?;
            if got == 0 {
                return Err(truncated());
            }
            off += got as u64;
            WARMED.fetch_add(got as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    })
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Once(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::File(state) => {
                let res = ready!(state.poll_next(cx));
                match res {
                    Some(Ok(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
                    Some(Err(e)) => {
                        // Fail once, then end: never yield more after an error.
                        this.kind = Kind::Empty;
                        Poll::Ready(Some(Err(e)))
                    }
                    None => {
                        this.kind = Kind::Empty;
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Once(b) => b.is_none(),
            Kind::File(s) => s.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Once(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::File(s) => SizeHint::with_exact(s.remaining),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::Write;

    #[tokio::test]
    async fn portable_reads_exact_bytes_in_chunks() {
        let path = std::env::temp_dir().join(format!("tzc-body-{}", std::process::id()));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let file = File::open(&path).unwrap();
        let mut body = FileBody::portable(file, 10..290_010, 65536);
        assert_eq!(body.size_hint().exact(), Some(290_000));
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            assert!(chunk.len() <= 65536);
            got.extend_from_slice(&chunk);
            frames += 1;
            assert_eq!(body.size_hint().exact(), Some(290_000 - got.len() as u64));
        }
        assert!(body.is_end_stream());
        assert_eq!(frames, 5);
        assert_eq!(&got[..], &data[10..290_010]);
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn portable_reports_truncation() {
        let path = std::env::temp_dir().join(format!("tzc-trunc-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 10_000]).unwrap();
        let file = File::open(&path).unwrap();
        let mut body = FileBody::portable(file, 0..20_000, 4096);
        let mut err = None;
        while let Some(frame) = body.frame().await {
            if let Err(e) = frame {
                err = Some(e);
            }
        }
        assert_eq!(err.unwrap().kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(&path).unwrap();
    }
}
