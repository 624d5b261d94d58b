//! Shared helpers for the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use tower::service_fn;
use tower_abort::AbortSignal;

/// Captures what `tracing` writes on this thread until the guard is dropped.
///
/// One global subscriber writes to the buffer of the thread an event happens on. A scoped
/// subscriber per test (`set_default`) is not enough: tracing caches each callsite's
/// interest process-wide, and a test on another thread that reaches a callsite while no
/// subscriber wants it can leave it disabled for this one (CI saw the abort event missing).
pub fn capture_logs() -> (CaptureGuard, Logs) {
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| ThisThread)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in the integration tests");
    });
    let logs = Logs::default();
    CAPTURE.with(|c| *c.borrow_mut() = Some(logs.clone()));
    (CaptureGuard(()), logs)
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
}

/// Stops this thread's capture when dropped.
pub struct CaptureGuard(());

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|c| *c.borrow_mut() = None);
    }
}

/// The global subscriber's writer: this thread's capture buffer, if any.
struct ThisThread;

impl std::io::Write for ThisThread {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| match &mut *c.borrow_mut() {
            Some(logs) => logs.write(buf),
            None => Ok(buf.len()),
        })
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A shared log buffer.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where handlers leave a clone of their request's signal for the test to inspect.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<AbortSignal>>>);

impl Seen {
    pub fn record<B>(&self, req: &Request<B>) -> AbortSignal {
        let signal = req
            .extensions()
            .get::<AbortSignal>()
            .expect("AbortLayer puts a signal in every request")
            .clone();
        self.0.lock().unwrap().push(signal.clone());
        signal
    }

    pub fn all(&self) -> Vec<AbortSignal> {
        self.0.lock().unwrap().clone()
    }

    pub fn only(&self) -> AbortSignal {
        let all = self.all();
        assert_eq!(all.len(), 1, "expected exactly one request");
        all[0].clone()
    }
}

/// A handler that answers at once with a fixed body.
pub fn answer(
    seen: Seen,
    body: TestBody,
) -> impl tower::Service<
    Request<()>,
    Response = Response<TestBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<TestBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req: Request<()>| {
        seen.record(&req);
        let body = body.clone();
        async move { Ok::<_, Infallible>(Response::new(body)) }
    })
}

/// A handler that never answers.
pub fn hang(
    seen: Seen,
) -> impl tower::Service<
    Request<()>,
    Response = Response<TestBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<TestBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req: Request<()>| {
        seen.record(&req);
        async move {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(TestBody::empty()))
        }
    })
}

/// A handler that waits for its signal, then answers `200 stopped: <reason>`.
pub fn cooperative(
    seen: Seen,
) -> impl tower::Service<
    Request<()>,
    Response = Response<TestBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<TestBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req: Request<()>| {
        let signal = seen.record(&req);
        async move {
            let reason = signal.aborted().await;
            Ok::<_, Infallible>(Response::new(TestBody::full(format!("stopped: {reason}"))))
        }
    })
}

/// A body made of fixed chunks that either ends or, like an SSE stream, stays open.
#[derive(Clone, Debug)]
pub struct TestBody {
    chunks: VecDeque<Bytes>,
    open: bool,
}

impl TestBody {
    pub fn empty() -> Self {
        TestBody {
            chunks: VecDeque::new(),
            open: false,
        }
    }

    pub fn full(text: impl Into<String>) -> Self {
        TestBody {
            chunks: VecDeque::from([Bytes::from(text.into())]),
            open: false,
        }
    }

    pub fn chunks(chunks: &[&'static str]) -> Self {
        TestBody {
            chunks: chunks
                .iter()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect(),
            open: false,
        }
    }

    /// Yields `chunks`, then stays pending forever.
    pub fn endless(chunks: &[&'static str]) -> Self {
        TestBody {
            open: true,
            ..Self::chunks(chunks)
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunks.pop_front() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None if self.open => Poll::Pending,
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && !self.open
    }
}

/// Reads a body to its end (or first error), returning the data and the error.
pub async fn read_to_end<B>(body: B) -> (Vec<u8>, Option<String>)
where
    B: Body,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    let mut body = std::pin::pin!(body);
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(mut chunk) = frame.into_data() {
                    while bytes::Buf::has_remaining(&chunk) {
                        let part = bytes::Buf::chunk(&chunk);
                        let n = part.len();
                        data.extend_from_slice(part);
                        bytes::Buf::advance(&mut chunk, n);
                    }
                }
            }
            Err(err) => return (data, Some(err.to_string())),
        }
    }
    (data, None)
}

pub fn get(path: &str) -> Request<()> {
    Request::get(path).body(()).unwrap()
}

/// Set when the value holding it is dropped: proves a handler's future was dropped.
#[derive(Clone, Default)]
pub struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl DropFlag {
    pub fn guard(&self) -> DropFlagGuard {
        DropFlagGuard(self.clone())
    }

    pub fn is_dropped(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub struct DropFlagGuard(DropFlag);

impl Drop for DropFlagGuard {
    fn drop(&mut self) {
        (self.0).0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
