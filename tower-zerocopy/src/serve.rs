//! [`ServeDir`] and [`ServeFile`]: static files with full HTTP semantics.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use tokio::task::JoinHandle;
use tower_service::Service;

use crate::body::{Part, Strategy, DEFAULT_MAP_WINDOW, DEFAULT_READ_CHUNK};
use crate::cache::{FileCache, Lookup, OpenFile};
use crate::conditional::{evaluate, if_range_allows, Precondition};
use crate::path::{parse_path, SafePath};
use crate::range::{parse_range, RangeOutcome};
use crate::sys::{OpenFailure, RootDir};
use crate::{FileBody, SendfileCapability};

/// What to do with symlinks met while resolving a request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SymlinkPolicy {
    /// Follow symlinks that stay inside the root; refuse (`403`) those that leave it. The
    /// default. On Linux ≥ 5.6 the kernel enforces it race-free (`openat2` with
    /// `RESOLVE_BENEATH`); older kernels get a component-by-component `O_NOFOLLOW` walk that is
    /// also race-free; other systems check canonical paths (not race-free).
    #[default]
    RefuseEscaping,
    /// Refuse every symlink (`403`).
    RefuseAll,
    /// Follow every symlink, wherever it points (tower-http's behaviour). Lexical checks
    /// (`..`, encoded separators, …) still apply.
    FollowAll,
}

/// A precompressed sibling encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Br,
    Zstd,
    Gzip,
}

impl Encoding {
    fn token(self) -> &'static str {
        match self {
            Encoding::Br => "br",
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Encoding::Br => ".br",
            Encoding::Zstd => ".zst",
            Encoding::Gzip => ".gz",
        }
    }
}

/// Default cap on the number of ranges in one request (more are ignored: served `200`).
pub const DEFAULT_MAX_RANGES: usize = 16;

/// Default smallest response (file bytes) that takes the sendfile path: 64 KiB.
///
/// Measured (wrk, 16 keep-alive connections, `ZC_BENCH=tuning`): at 16 KiB the sendfile path
/// used half the CPU per GB but delivered 0.18 GB/s against the portable path's 0.25; at 64 KiB
/// both delivered 0.59 GB/s with 0.22 vs 0.42 CPU-s/GB; at 256 KiB 0.11 vs 0.28 CPU-s/GB. Small
/// keep-alive responses are also where Go and fasthttp saw sendfile stalls.
pub const DEFAULT_SENDFILE_MIN_LEN: u64 = 64 * 1024;

#[derive(Debug, Clone)]
struct Config {
    /// Normalised: starts with `/`, no trailing `/`, never just `/`.
    strip_prefix: Option<String>,
    precompressed: Vec<Encoding>,
    index_file: Option<String>,
    redirect_directories: bool,
    cache_control: Option<HeaderValue>,
    serve_hidden: bool,
    symlinks: SymlinkPolicy,
    max_ranges: usize,
    sendfile_min_len: u64,
    read_chunk: usize,
    map_window: usize,
    residency_recheck: Duration,
    check_truncation: bool,
    cache_capacity: usize,
    cache_validity: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            strip_prefix: None,
            precompressed: Vec::new(),
            index_file: Some("index.html".to_owned()),
            redirect_directories: true,
            cache_control: None,
            serve_hidden: false,
            symlinks: SymlinkPolicy::RefuseEscaping,
            max_ranges: DEFAULT_MAX_RANGES,
            sendfile_min_len: DEFAULT_SENDFILE_MIN_LEN,
            read_chunk: DEFAULT_READ_CHUNK,
            map_window: DEFAULT_MAP_WINDOW,
            residency_recheck: crate::DEFAULT_RESIDENCY_RECHECK,
            check_truncation: true,
            cache_capacity: 1024,
            cache_validity: Duration::from_secs(2),
        }
    }
}

struct State {
    root_path: PathBuf,
    root: OnceLock<Arc<RootDir>>,
    cache: FileCache,
    /// `ServeFile`: the one path served, whatever the request path.
    fixed: Option<String>,
}

impl State {
    fn new(root_path: PathBuf, fixed: Option<String>, cfg: &Config) -> Arc<Self> {
        Arc::new(State {
            root_path,
            root: OnceLock::new(),
            cache: FileCache::new(cfg.cache_capacity, cfg.cache_validity),
            fixed,
        })
    }

    /// The root directory, opened on first use (blocking).
    fn root_blocking(&self) -> Option<Arc<RootDir>> {
        if let Some(r) = self.root.get() {
            return Some(r.clone());
        }
        match RootDir::open(&self.root_path) {
            Ok(r) => Some(self.root.get_or_init(|| Arc::new(r)).clone()),
            Err(e) => {
                tracing::warn!(root = %self.root_path.display(), "cannot open root: {e}");
                None
            }
        }
    }
}

/// Serves files from a directory.
///
/// * `GET` and `HEAD` (other methods: `405` with `Allow`);
/// * `Content-Type` from the extension, strong `ETag`, `Last-Modified`, `Accept-Ranges`;
/// * RFC 9110 preconditions in order (`If-Match`, `If-Unmodified-Since`, `If-None-Match`,
///   `If-Modified-Since`, then `If-Range` with strong comparison);
/// * one range → `206`; several → `206 multipart/byteranges` whose parts are file slices
///   (so they still go through sendfile); none satisfiable → `416` with
///   `Content-Range: bytes */len`; malformed or more than [`max_ranges`](Self::max_ranges) →
///   the whole file;
/// * precompressed `.br`/`.zst`/`.gz` siblings when enabled, chosen by `Accept-Encoding`, with
///   `Vary: Accept-Encoding`;
/// * `index.html` for directories and a `308` redirect from `/dir` to `/dir/` (a relative
///   `Location: dir/`, so it stays right under a router prefix);
/// * configurable `Cache-Control`; hidden files (any component starting with `.`) answer `404`
///   unless [`serve_hidden`](Self::serve_hidden);
/// * path confinement: `..` (also encoded), encoded `/`, backslashes, `:`, NUL and control
///   characters, invalid UTF-8 and Windows device names answer `400`; symlinks per
///   [`SymlinkPolicy`] (`403` when refused);
/// * a bounded cache of open descriptors, metadata and memory maps, revalidated with `fstat` on
///   every hit and reopened after [`cache_validity`](Self::cache_validity);
/// * [`strip_prefix`](Self::strip_prefix) for a router that hands over the whole path.
///
/// On a connection marked with [`SendfileCapability`] (see [`MarkSendfile`](crate::MarkSendfile)
/// and [`WithSendfile`](crate)), HTTP/1.x responses of at least
/// [`sendfile_min_len`](Self::sendfile_min_len) file bytes go out through `sendfile(2)`;
/// everything else takes the portable path (see [`FileBody`]).
///
/// ```
/// use std::time::Duration;
/// use tower_zerocopy::{ServeDir, SymlinkPolicy};
///
/// let service = ServeDir::new("assets")
///     .precompressed_br()
///     .precompressed_gzip()
///     .cache_control(http::HeaderValue::from_static("public, max-age=3600"))
///     .symlinks(SymlinkPolicy::RefuseAll)
///     .cache_validity(Duration::from_secs(5));
/// # let _ = service;
/// ```
#[derive(Clone)]
pub struct ServeDir {
    cfg: Arc<Config>,
    state: Arc<State>,
}

impl fmt::Debug for ServeDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeDir")
            .field("root", &self.state.root_path)
            .field("fixed", &self.state.fixed)
            .field("config", &self.cfg)
            .finish()
    }
}

impl ServeDir {
    /// Serves the directory `root`. It is opened on the first request (a missing root answers
    /// `500` and is retried on the next request).
    pub fn new(root: impl AsRef<Path>) -> Self {
        let cfg = Config::default();
        let state = State::new(root.as_ref().to_path_buf(), None, &cfg);
        ServeDir {
            cfg: Arc::new(cfg),
            state,
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.cfg));
        self
    }

    fn rebuild_cache(mut self) -> Self {
        self.state = State::new(
            self.state.root_path.clone(),
            self.state.fixed.clone(),
            &self.cfg,
        );
        self
    }

    /// Serves `<file>.br` to clients accepting `br`, if it exists.
    pub fn precompressed_br(self) -> Self {
        self.with(|c| push_unique(&mut c.precompressed, Encoding::Br))
    }

    /// Serves `<file>.zst` to clients accepting `zstd`, if it exists.
    pub fn precompressed_zstd(self) -> Self {
        self.with(|c| push_unique(&mut c.precompressed, Encoding::Zstd))
    }

    /// Serves `<file>.gz` to clients accepting `gzip`, if it exists.
    pub fn precompressed_gzip(self) -> Self {
        self.with(|c| push_unique(&mut c.precompressed, Encoding::Gzip))
    }

    /// Serves only request paths under `prefix` (a path such as `/static`), naming files by
    /// the rest of the path: `/static/css/a.css` is `css/a.css` under the root, `/static`
    /// itself the root directory (so it redirects to `static/`), and any other path, like
    /// `/staticfoo`, answers `404`. Default: none, the whole request path names the file.
    ///
    /// For a router that hands over the whole path, such as a hand-written hyper service;
    /// one that strips the prefix itself (axum's `nest_service`) needs no setting. Matching
    /// is on the raw path, byte for byte, so write the prefix as it appears in a request
    /// (percent-encoded); slashes around it are ignored. A path outside the prefix is `404`
    /// whatever its method.
    ///
    /// ```
    /// let service = tower_zerocopy::ServeDir::new("assets").strip_prefix("/static");
    /// # let _ = service;
    /// ```
    pub fn strip_prefix(self, prefix: &str) -> Self {
        let trimmed = prefix.trim_matches('/');
        let prefix = (!trimmed.is_empty()).then(|| format!("/{trimmed}"));
        self.with(|c| c.strip_prefix = prefix)
    }

    /// The file served for a directory request ending in `/` (default `index.html`; `None`
    /// answers `404`).
    pub fn index_file(self, name: Option<&str>) -> Self {
        let name = name.map(str::to_owned);
        self.with(|c| c.index_file = name)
    }

    /// Whether `/dir` redirects to `/dir/` with `308` (default `true`; else `404`).
    pub fn redirect_directories(self, redirect: bool) -> Self {
        self.with(|c| c.redirect_directories = redirect)
    }

    /// `Cache-Control` for every file response (default none).
    pub fn cache_control(self, value: HeaderValue) -> Self {
        self.with(|c| c.cache_control = Some(value))
    }

    /// Whether paths with a component starting with `.` are served (default `false`: `404`).
    pub fn serve_hidden(self, serve: bool) -> Self {
        self.with(|c| c.serve_hidden = serve)
    }

    /// Symlink handling (default [`SymlinkPolicy::RefuseEscaping`]).
    pub fn symlinks(self, policy: SymlinkPolicy) -> Self {
        self.with(|c| c.symlinks = policy)
    }

    /// Most ranges honoured in one request (default [`DEFAULT_MAX_RANGES`]); a request with
    /// more gets the whole file.
    pub fn max_ranges(self, max: usize) -> Self {
        self.with(|c| c.max_ranges = max.max(1))
    }

    /// Smallest number of file bytes in a response for the sendfile path (default
    /// [`DEFAULT_SENDFILE_MIN_LEN`]).
    pub fn sendfile_min_len(self, bytes: u64) -> Self {
        self.with(|c| c.sendfile_min_len = bytes)
    }

    /// Bytes per read on the portable path (default [`DEFAULT_READ_CHUNK`], minimum 4 KiB).
    pub fn read_chunk(self, bytes: usize) -> Self {
        self.with(|c| c.read_chunk = bytes.max(4096))
    }

    /// Bytes per memory-mapped window on the sendfile path (default [`DEFAULT_MAP_WINDOW`]).
    pub fn map_window(self, bytes: usize) -> Self {
        self.with(|c| c.map_window = bytes.max(4096))
    }

    /// How long a map window found wholly in the page cache is trusted to stay there before
    /// the sendfile path asks the kernel again (default
    /// [`DEFAULT_RESIDENCY_RECHECK`](crate::DEFAULT_RESIDENCY_RECHECK), 1 s).
    ///
    /// Before `sendfile` each map window ([`map_window`](Self::map_window) bytes, or the whole
    /// of a smaller file) is checked for pages missing from the page cache (`cachestat(2)`,
    /// then `mincore(2)`), and missing pages are read in on the blocking pool first, so a
    /// worker thread never waits for the disk. That check walks every cached page: measured
    /// here 4–5 µs for 1 MiB (more than any other system call of a response but `sendfile`)
    /// and 14–58 µs per 8 MiB window (2–7 ms of CPU per GB sent, 4–14% of nginx's). Within
    /// this interval after a check found a whole window (from a multiple of the window size)
    /// resident, responses skip that window's check; a check that finds pages missing ends
    /// the trust, and other ranges are always checked, as are windows past the first 1,024 of
    /// a file (the trust costs 8 bytes per window of a cached file). Pages evicted inside the interval are
    /// read by `sendfile` on the worker, as nginx always does without `aio`.
    /// `Duration::ZERO` checks every window of every response.
    pub fn residency_recheck(self, interval: Duration) -> Self {
        self.with(|c| c.residency_recheck = interval)
    }

    /// Whether a sendfile response holds its last byte back until the peer has the rest and
    /// the file is checked to still hold every byte sent (default `true`; see
    /// [`SendfileStream`](crate::SendfileStream)). That check is what turns a file truncated
    /// mid-response into a short response instead of one complete by `Content-Length` with
    /// zeros in it; over a network it delays each response's last byte by about one round
    /// trip. Turn it off only for files that are never truncated in place (published by
    /// `rename`, or immutable), to save that round trip.
    pub fn check_truncation(self, check: bool) -> Self {
        self.with(|c| c.check_truncation = check)
    }

    /// Most paths whose open descriptors and metadata are cached (default 1024; 0 disables the
    /// cache, so every request opens the file again).
    pub fn cache_capacity(self, entries: usize) -> Self {
        self.with(|c| c.cache_capacity = entries).rebuild_cache()
    }

    /// How long a cached entry is trusted before the path is opened again (default 2 s): a
    /// file replaced by rename, deleted, or created where there was none (negative entries are
    /// cached too) is noticed within this period. In-place changes of size or mtime are noticed
    /// at once (every hit `fstat`s the cached descriptor).
    pub fn cache_validity(self, validity: Duration) -> Self {
        self.with(|c| c.cache_validity = validity).rebuild_cache()
    }

    /// Drops every cached descriptor and memory map.
    pub fn clear_cache(&self) {
        self.state.cache.clear();
    }

    fn prepare<B>(&self, req: Request<B>) -> Result<Ctx, Box<Response<FileBody>>> {
        let (parts, _body) = req.into_parts();
        let full = parts.uri.path();
        let below = match &self.cfg.strip_prefix {
            None => full,
            Some(prefix) => match full.strip_prefix(prefix.as_str()) {
                Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
                _ => return Err(Box::new(status(StatusCode::NOT_FOUND))),
            },
        };
        if parts.method != Method::GET && parts.method != Method::HEAD {
            let mut res = status(StatusCode::METHOD_NOT_ALLOWED);
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Err(Box::new(res));
        }
        let bare_prefix = below.is_empty();
        let parsed = if bare_prefix {
            // The prefix itself: the root, asked for without its `/`.
            parse_path("/").map(SafePath::without_trailing_slash)
        } else {
            parse_path(below)
        };
        let path = match parsed {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(path = full, "rejected: {e}");
                return Err(Box::new(status(StatusCode::BAD_REQUEST)));
            }
        };
        if self.state.fixed.is_none() && !self.cfg.serve_hidden && path.is_hidden() {
            return Err(Box::new(status(StatusCode::NOT_FOUND)));
        }
        let sendfile = crate::sys::HAS_SENDFILE
            && parts.extensions.get::<SendfileCapability>().is_some()
            && matches!(parts.version, Version::HTTP_10 | Version::HTTP_11);
        let encodings = accepted_encodings(&parts.headers, &self.cfg.precompressed);
        Ok(Ctx {
            method: parts.method,
            headers: parts.headers,
            path,
            bare_prefix,
            uri: parts.uri,
            sendfile,
            encodings,
        })
    }
}

fn push_unique(v: &mut Vec<Encoding>, e: Encoding) {
    if !v.contains(&e) {
        v.push(e);
    }
}

/// Serves one file for every request path (with the same semantics as [`ServeDir`]).
///
/// Symlinks are followed ([`SymlinkPolicy::FollowAll`]): the file was named by the
/// application, not by the client.
///
/// ```
/// use tower_zerocopy::ServeFile;
/// let service = ServeFile::new("assets/index.html").precompressed_gzip();
/// # let _ = service;
/// ```
#[derive(Clone, Debug)]
pub struct ServeFile(ServeDir);

impl ServeFile {
    /// Serves `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut dir = ServeDir::new(&parent)
            .symlinks(SymlinkPolicy::FollowAll)
            .index_file(None)
            .redirect_directories(false);
        dir.state = State::new(parent, Some(name), &dir.cfg);
        ServeFile(dir)
    }

    fn map(self, f: impl FnOnce(ServeDir) -> ServeDir) -> Self {
        let fixed = self.0.state.fixed.clone();
        let mut dir = f(self.0);
        if dir.state.fixed.is_none() {
            dir.state = State::new(dir.state.root_path.clone(), fixed, &dir.cfg);
        }
        ServeFile(dir)
    }

    /// See [`ServeDir::precompressed_br`].
    pub fn precompressed_br(self) -> Self {
        self.map(ServeDir::precompressed_br)
    }

    /// See [`ServeDir::precompressed_zstd`].
    pub fn precompressed_zstd(self) -> Self {
        self.map(ServeDir::precompressed_zstd)
    }

    /// See [`ServeDir::precompressed_gzip`].
    pub fn precompressed_gzip(self) -> Self {
        self.map(ServeDir::precompressed_gzip)
    }

    /// See [`ServeDir::cache_control`].
    pub fn cache_control(self, value: HeaderValue) -> Self {
        self.map(|d| d.cache_control(value))
    }

    /// See [`ServeDir::max_ranges`].
    pub fn max_ranges(self, max: usize) -> Self {
        self.map(|d| d.max_ranges(max))
    }

    /// See [`ServeDir::sendfile_min_len`].
    pub fn sendfile_min_len(self, bytes: u64) -> Self {
        self.map(|d| d.sendfile_min_len(bytes))
    }

    /// See [`ServeDir::check_truncation`].
    pub fn check_truncation(self, check: bool) -> Self {
        self.map(|d| d.check_truncation(check))
    }

    /// See [`ServeDir::read_chunk`].
    pub fn read_chunk(self, bytes: usize) -> Self {
        self.map(|d| d.read_chunk(bytes))
    }

    /// See [`ServeDir::residency_recheck`].
    pub fn residency_recheck(self, interval: Duration) -> Self {
        self.map(|d| d.residency_recheck(interval))
    }

    /// See [`ServeDir::cache_capacity`].
    pub fn cache_capacity(self, entries: usize) -> Self {
        self.map(|d| d.cache_capacity(entries))
    }
}

impl<B> Service<Request<B>> for ServeFile {
    type Response = Response<FileBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        self.0.call(req)
    }
}

/// Everything about a request that the response depends on.
#[derive(Debug)]
struct Ctx {
    method: Method,
    headers: HeaderMap,
    uri: Uri,
    path: SafePath,
    /// The request path was the stripped prefix itself (`/static`, not `/static/`).
    bare_prefix: bool,
    sendfile: bool,
    encodings: Vec<Encoding>,
}

/// What a request path resolved to.
#[derive(Debug)]
enum Resolved {
    File {
        file: Arc<OpenFile>,
        encoding: Option<Encoding>,
        content_type: HeaderValue,
    },
    Redirect,
    Status(StatusCode),
}

/// The cache had no fresh answer; resolve on the blocking pool.
struct Miss;

fn failure_status(f: OpenFailure) -> StatusCode {
    match f {
        OpenFailure::NotFound => StatusCode::NOT_FOUND,
        OpenFailure::Forbidden => StatusCode::FORBIDDEN,
        OpenFailure::Other => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn resolve(
    ctx: &Ctx,
    state: &State,
    cfg: &Config,
    lookup: &mut dyn FnMut(&str) -> Result<Lookup, Miss>,
) -> Result<Resolved, Miss> {
    let mut rel = Cow::Borrowed(match &state.fixed {
        Some(name) => name.as_str(),
        None => ctx.path.relative(),
    });
    let mut file = match lookup(&rel)? {
        Ok(f) => f,
        Err(e) => return Ok(Resolved::Status(failure_status(e))),
    };
    if file.is_dir {
        if state.fixed.is_some() {
            return Ok(Resolved::Status(StatusCode::NOT_FOUND));
        }
        // The root asked for as `/.` is served; as a bare prefix, it redirects like a directory.
        if !ctx.path.has_trailing_slash() && (!ctx.path.is_root() || ctx.bare_prefix) {
            return Ok(if cfg.redirect_directories {
                Resolved::Redirect
            } else {
                Resolved::Status(StatusCode::NOT_FOUND)
            });
        }
        let Some(index) = &cfg.index_file else {
            return Ok(Resolved::Status(StatusCode::NOT_FOUND));
        };
        rel = if rel.is_empty() {
            Cow::Borrowed(index.as_str())
        } else {
            Cow::Owned(format!("{rel}/{index}"))
        };
        file = match lookup(&rel)? {
            Ok(f) if !f.is_dir => f,
            Ok(_) => return Ok(Resolved::Status(StatusCode::NOT_FOUND)),
            Err(e) => return Ok(Resolved::Status(failure_status(e))),
        };
    }
    let content_type = file.content_type(&rel);
    for &enc in &ctx.encodings {
        if let Ok(variant) = lookup(&format!("{rel}{}", enc.extension()))? {
            if !variant.is_dir {
                return Ok(Resolved::File {
                    file: variant,
                    encoding: Some(enc),
                    content_type,
                });
            }
        }
    }
    Ok(Resolved::File {
        file,
        encoding: None,
        content_type,
    })
}

/// Encodings we may serve, best first: the client's q-values, then our configured order.
fn accepted_encodings(headers: &HeaderMap, ours: &[Encoding]) -> Vec<Encoding> {
    if ours.is_empty() {
        return Vec::new();
    }
    let q_of = |token: &str| -> Option<u32> {
        let mut star = None;
        let mut exact = None;
        for value in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut params = item.split(';');
                let name = params.next().unwrap_or("").trim();
                let q = params
                    .find_map(|p| {
                        p.trim()
                            .strip_prefix("q=")
                            .or_else(|| p.trim().strip_prefix("Q="))
                    })
                    .map_or(Some(1000), parse_q);
                let Some(q) = q else { continue };
                if name.eq_ignore_ascii_case(token) {
                    exact = Some(q);
                } else if name == "*" {
                    star = Some(q);
                }
            }
        }
        exact.or(star)
    };
    let mut found: Vec<(u32, usize, Encoding)> = ours
        .iter()
        .enumerate()
        .filter_map(|(i, &e)| q_of(e.token()).filter(|&q| q > 0).map(|q| (q, i, e)))
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    found.into_iter().map(|(_, _, e)| e).collect()
}

/// A q-value in thousandths; `None` if malformed.
fn parse_q(s: &str) -> Option<u32> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: u32 = match int {
        "0" => 0,
        "1" => 1,
        _ => return None,
    };
    let mut frac_val = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_val += u32::from(b - b'0') * [100, 10, 1][i];
    }
    let q = int * 1000 + frac_val;
    (q <= 1000).then_some(q)
}

fn status(code: StatusCode) -> Response<FileBody> {
    let mut res = Response::new(FileBody::empty());
    *res.status_mut() = code;
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    res
}

fn respond(ctx: Ctx, resolved: Resolved, cfg: &Config) -> Response<FileBody> {
    let (file, encoding, content_type) = match resolved {
        Resolved::Status(code) => return status(code),
        Resolved::Redirect => {
            // A relative reference ("docs/" for "/static/docs"): correct even when a router
            // stripped a prefix before us, and it can never point at another host.
            let last = ctx.uri.path().rsplit('/').next().unwrap_or_default();
            let mut location = format!("{last}/");
            if let Some(q) = ctx.uri.query() {
                location.push('?');
                location.push_str(q);
            }
            let mut res = status(StatusCode::PERMANENT_REDIRECT);
            match HeaderValue::from_str(&location) {
                Ok(v) => {
                    res.headers_mut().insert(header::LOCATION, v);
                }
                Err(_) => return status(StatusCode::BAD_REQUEST),
            }
            return res;
        }
        Resolved::File {
            file,
            encoding,
            content_type,
        } => (file, encoding, content_type),
    };
    let v = &file.validators;
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, v.etag.clone());
    if let Some(lm) = &v.last_modified_header {
        headers.insert(header::LAST_MODIFIED, lm.clone());
    }
    if let Some(cc) = &cfg.cache_control {
        headers.insert(header::CACHE_CONTROL, cc.clone());
    }
    if !cfg.precompressed.is_empty() {
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    match evaluate(&ctx.method, &ctx.headers, v) {
        Precondition::Proceed => {}
        Precondition::NotModified => {
            let mut res = Response::new(FileBody::empty());
            *res.status_mut() = StatusCode::NOT_MODIFIED;
            *res.headers_mut() = headers;
            return res;
        }
        Precondition::Failed => return status(StatusCode::PRECONDITION_FAILED),
    }
    if let Some(enc) = encoding {
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(enc.token()),
        );
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let len = file.len;
    let mut code = StatusCode::OK;
    let mut parts = vec![Part::File(0..len)];
    let mut body_ct = content_type.clone();
    let range = ctx.headers.get(header::RANGE);
    if let (true, Some(range)) = (ctx.method == Method::GET, range) {
        if if_range_allows(&ctx.headers, v) {
            match parse_range(range.as_bytes(), len, cfg.max_ranges) {
                RangeOutcome::Ignore => {}
                RangeOutcome::Unsatisfiable => {
                    let mut res = status(StatusCode::RANGE_NOT_SATISFIABLE);
                    res.headers_mut().extend(headers);
                    res.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes */{len}")).expect("ASCII"),
                    );
                    return res;
                }
                RangeOutcome::Satisfiable(ranges) if ranges.len() == 1 => {
                    let r = &ranges[0];
                    code = StatusCode::PARTIAL_CONTENT;
                    headers.insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&format!("bytes {}-{}/{len}", r.start, r.end - 1))
                            .expect("ASCII"),
                    );
                    parts = vec![Part::File(r.clone())];
                }
                RangeOutcome::Satisfiable(ranges) => {
                    code = StatusCode::PARTIAL_CONTENT;
                    let boundary = boundary();
                    body_ct = HeaderValue::from_str(&format!(
                        "multipart/byteranges; boundary={boundary}"
                    ))
                    .expect("ASCII");
                    parts = multipart(&ranges, len, &boundary, &content_type);
                }
            }
        }
    }
    headers.insert(header::CONTENT_TYPE, body_ct);
    let total: u64 = parts
        .iter()
        .map(|p| match p {
            Part::Static(b) => b.len() as u64,
            Part::File(r) => r.end - r.start,
        })
        .sum();
    let content_length = if total == len {
        file.len_header.clone()
    } else {
        HeaderValue::from(total)
    };
    headers.insert(header::CONTENT_LENGTH, content_length);
    let body = if ctx.method == Method::HEAD {
        FileBody::empty()
    } else {
        let file_bytes: u64 = parts
            .iter()
            .map(|p| {
                if let Part::File(r) = p {
                    r.end - r.start
                } else {
                    0
                }
            })
            .sum();
        let strategy = choose_strategy(&ctx, cfg, &file, file_bytes);
        FileBody::from_parts(file.file.clone(), parts, strategy)
    };
    let mut res = Response::new(body);
    *res.status_mut() = code;
    *res.headers_mut() = headers;
    res
}

fn choose_strategy(ctx: &Ctx, cfg: &Config, file: &OpenFile, file_bytes: u64) -> Strategy {
    #[cfg(target_os = "linux")]
    if ctx.sendfile && file_bytes >= cfg.sendfile_min_len {
        if let Some(mapping) = file.mapping() {
            return Strategy::Mapped {
                mapping,
                window: cfg.map_window,
                fence_end: cfg.check_truncation,
                recheck: cfg.residency_recheck,
            };
        }
    }
    // Elsewhere only the portable path exists.
    let _ = (ctx.sendfile, file, file_bytes);
    Strategy::Portable {
        chunk: cfg.read_chunk,
    }
}

fn boundary() -> String {
    use std::hash::{BuildHasher, Hasher};
    let s = std::collections::hash_map::RandomState::new();
    let mut a = s.build_hasher();
    a.write_u64(0x5eed);
    let mut b = s.build_hasher();
    b.write_u64(a.finish());
    format!("{:016x}{:016x}", a.finish(), b.finish())
}

fn multipart(
    ranges: &[std::ops::Range<u64>],
    len: u64,
    boundary: &str,
    ct: &HeaderValue,
) -> Vec<Part> {
    let ct = ct.to_str().unwrap_or("application/octet-stream");
    let mut parts = Vec::with_capacity(ranges.len() * 2 + 1);
    for (i, r) in ranges.iter().enumerate() {
        let lead = if i == 0 { "" } else { "\r\n" };
        let head = format!(
            "{lead}--{boundary}\r\nContent-Type: {ct}\r\nContent-Range: bytes {}-{}/{len}\r\n\r\n",
            r.start,
            r.end - 1
        );
        parts.push(Part::Static(Bytes::from(head)));
        parts.push(Part::File(r.clone()));
    }
    parts.push(Part::Static(Bytes::from(format!("\r\n--{boundary}--\r\n"))));
    parts
}

impl<B> Service<Request<B>> for ServeDir {
    type Response = Response<FileBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        let ctx = match self.prepare(req) {
            Ok(ctx) => ctx,
            Err(res) => return ResponseFuture::ready(*res),
        };
        // Fast path: everything the request needs is in the cache (no blocking-pool hop).
        if self.state.root.get().is_some() {
            let cache = &self.state.cache;
            if let Ok(resolved) = resolve(&ctx, &self.state, &self.cfg, &mut |rel| {
                cache.get(rel).ok_or(Miss)
            }) {
                return ResponseFuture::ready(respond(ctx, resolved, &self.cfg));
            }
        }
        let (state, cfg) = (self.state.clone(), self.cfg.clone());
        let handle = tokio::task::spawn_blocking(move || {
            let resolved = match state.root_blocking() {
                None => Resolved::Status(StatusCode::INTERNAL_SERVER_ERROR),
                Some(root) => {
                    let mut open = |rel: &str| Ok(state.cache.open(&root, rel, cfg.symlinks));
                    match resolve(&ctx, &state, &cfg, &mut open) {
                        Ok(r) => r,
                        Err(Miss) => unreachable!("the blocking lookup never misses"),
                    }
                }
            };
            respond(ctx, resolved, &cfg)
        });
        ResponseFuture {
            state: FutState::Blocking(handle),
        }
    }
}

/// Response future of [`ServeDir`] and [`ServeFile`]: ready at once on a cache hit, otherwise
/// waiting for the open on the blocking pool.
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture {
    state: FutState,
}

enum FutState {
    Ready(Option<Response<FileBody>>),
    Blocking(JoinHandle<Response<FileBody>>),
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            FutState::Ready(_) => "ready",
            FutState::Blocking(_) => "opening",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl ResponseFuture {
    fn ready(res: Response<FileBody>) -> Self {
        ResponseFuture {
            state: FutState::Ready(Some(res)),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<FileBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            FutState::Ready(res) => Poll::Ready(Ok(res.take().expect("polled after completion"))),
            FutState::Blocking(handle) => match std::task::ready!(Pin::new(handle).poll(cx)) {
                Ok(res) => Poll::Ready(Ok(res)),
                Err(e) => {
                    tracing::error!("static file task failed: {e}");
                    Poll::Ready(Ok(status(StatusCode::INTERNAL_SERVER_ERROR)))
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_values() {
        assert_eq!(parse_q("1"), Some(1000));
        assert_eq!(parse_q("0.5"), Some(500));
        assert_eq!(parse_q("0.001"), Some(1));
        assert_eq!(parse_q("1.5"), None);
        assert_eq!(parse_q("0.0001"), None);
        let mut h = HeaderMap::new();
        let ours = [Encoding::Br, Encoding::Zstd, Encoding::Gzip];
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, br;q=0.5, zstd;q=0"),
        );
        assert_eq!(
            accepted_encodings(&h, &ours),
            vec![Encoding::Gzip, Encoding::Br]
        );
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("*;q=0.1, gzip;q=0"),
        );
        assert_eq!(
            accepted_encodings(&h, &ours),
            vec![Encoding::Br, Encoding::Zstd]
        );
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert!(accepted_encodings(&h, &ours).is_empty());
    }
}
