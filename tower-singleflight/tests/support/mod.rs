//! Shared helpers of the HTTP tests: a counting backend and body plumbing.
#![allow(dead_code, unreachable_pub)]

use std::io;
use std::sync::{
    atomic::{AtomicUsize, Ordering::SeqCst},
    Arc,
};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use tower_singleflight::error::BoxError;

/// The backend's body. Its error type is concrete, as with hyper's and axum's bodies.
pub type Body = BoxBody<Bytes, io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// A body the test feeds frame by frame.
pub fn channel() -> (mpsc::UnboundedSender<Result<Frame<Bytes>, io::Error>>, Body) {
    let (tx, rx) = mpsc::unbounded();
    (tx, StreamBody::new(rx).boxed())
}

pub fn get(path: &str) -> Request<()> {
    Request::get(path)
        .header("host", "example.com")
        .body(())
        .unwrap()
}

pub async fn collect<B>(response: Response<B>) -> Result<Bytes, BoxError>
where
    B: http_body::Body<Data = Bytes, Error = BoxError>,
{
    response.into_body().collect().await.map(|c| c.to_bytes())
}

/// Counts calls of the inner service and how many run at once.
#[derive(Default)]
pub struct Backend {
    pub calls: AtomicUsize,
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
}

impl Backend {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Marks a call started; the guard marks it finished when dropped.
    pub fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.calls.fetch_add(1, SeqCst);
        let now = self.active.fetch_add(1, SeqCst) + 1;
        self.max_active.fetch_max(now, SeqCst);
        ActiveGuard(Arc::clone(self))
    }

    pub fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
    pub fn active(&self) -> usize {
        self.active.load(SeqCst)
    }
    pub fn max_active(&self) -> usize {
        self.max_active.load(SeqCst)
    }
}

pub struct ActiveGuard(Arc<Backend>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, SeqCst);
    }
}

/// Deterministic, non-repeating test content.
pub fn payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect::<Vec<u8>>()
        .into()
}

/// Waits until `cond` holds; panics (instead of hanging) if it never does.
///
/// On a current-thread runtime every other task runs between two yields, so a bounded
/// number of rounds is deterministic (and works under paused time). On a multi-thread
/// runtime the tasks run on worker threads the OS may not schedule for a while on a loaded
/// machine, so the bound there is wall-clock time, not a number of rounds.
pub async fn until(mut cond: impl FnMut() -> bool) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::CurrentThread {
        for _ in 0..100_000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
