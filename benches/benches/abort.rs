//! tower-abort: per-request overhead of `AbortLayer` against no layer
//! (`tower::layer::util::Identity`), on a trivial service.
//!
//! Goal (issue 4): under 150 ns and at most one allocation per request on the fast path
//! (no deadline fires, the response completes). Before the timed runs, the number of heap
//! allocations per request is counted with a counting global allocator and printed:
//!
//! ```text
//! cargo bench -p benches --bench abort
//! ```
//!
//! `ABORT_BENCH_INTERLEAVED=<rounds>` times the cases interleaved instead (see
//! [`interleaved`]), and `ABORT_BENCH_ONLY=<case>` runs one case for callgrind (see
//! [`run_only`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use http::{HeaderValue, Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Body;
use tower::layer::util::Identity;
use tower::{service_fn, Layer, Service};
use tower_abort::{AbortLayer, AbortSignal};

// ===== allocation counting =====

struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; we only count.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

// ===== the services =====

struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

/// A future that is pending once (waking itself), then ready: a handler that awaits once,
/// so the layer's deadline timer is armed.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = Result<Response<Empty<Bytes>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.0 {
            return Poll::Ready(Ok(Response::new(Empty::new())));
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

fn ready_service() -> impl Service<
    Request<()>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<Empty<Bytes>>, Infallible>>,
> + Clone {
    service_fn(|_req: Request<()>| std::future::ready(Ok(Response::new(Empty::new()))))
}

/// A handler that answers at once with a small body, which the caller reads to its end.
fn body_service() -> impl Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>,
> + Clone {
    service_fn(|_req: Request<()>| {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(
            b"hello, world",
        )))))
    })
}

fn pending_once_service() -> impl Service<
    Request<()>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future = YieldOnce,
> + Clone {
    service_fn(|_req: Request<()>| YieldOnce(false))
}

/// What servers hand to services: hyper and axum put their own extensions into requests,
/// so the extensions map usually exists before our layer adds to it.
#[derive(Clone)]
struct ServerExtension;

#[derive(Clone, Copy)]
enum Req {
    Bare,
    WithExtension,
    WithGrpcTimeout,
}

fn request(kind: Req) -> Request<()> {
    let mut req = Request::new(());
    match kind {
        Req::Bare => {}
        Req::WithExtension => {
            req.extensions_mut().insert(ServerExtension);
        }
        Req::WithGrpcTimeout => {
            req.headers_mut()
                .insert("grpc-timeout", HeaderValue::from_static("100m"));
        }
    }
    req
}

/// One request through `svc`, polled by hand to completion; the response is dropped
/// (an empty body: complete, so no signal fires).
fn one_request<S, B>(svc: &mut S, req: Request<()>, cx: &mut Context<'_>)
where
    S: Service<Request<()>, Response = Response<B>>,
{
    assert!(svc.poll_ready(cx).is_ready());
    let mut fut = pin!(svc.call(req));
    loop {
        if let Poll::Ready(response) = fut.as_mut().poll(cx) {
            black_box(response.ok());
            return;
        }
    }
}

/// One request through `svc` whose response body is then read to its end the way hyper
/// does: frames until `is_end_stream` (or the end), then the body is dropped.
fn one_request_read<S, B>(svc: &mut S, req: Request<()>, cx: &mut Context<'_>)
where
    S: Service<Request<()>, Response = Response<B>>,
    B: Body,
{
    assert!(svc.poll_ready(cx).is_ready());
    let mut fut = pin!(svc.call(req));
    let response = loop {
        if let Poll::Ready(response) = fut.as_mut().poll(cx) {
            break response;
        }
    };
    let Ok(response) = response else {
        panic!("the service failed");
    };
    let mut body = pin!(response.into_body());
    while !body.is_end_stream() {
        match body.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                black_box(frame);
            }
            Poll::Ready(None) => break,
            Poll::Ready(Some(Err(_))) => panic!("the body failed"),
            Poll::Pending => {}
        }
    }
}

fn waker() -> Waker {
    Waker::from(Arc::new(NoopWake))
}

// ===== allocations per request =====

fn allocations_per_request<S>(
    name: &str,
    mut svc: S,
    kind: Req,
    mut one: impl FnMut(&mut S, Request<()>, &mut Context<'_>),
) {
    const N: u64 = 10_000;
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    for _ in 0..100 {
        one(&mut svc, request(kind), &mut cx);
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..N {
        one(&mut svc, request(kind), &mut cx);
    }
    let per_request = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / N as f64;
    println!("allocations per request: {name:<45} {per_request:.2}");
}

fn report_allocations() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let timeout = AbortLayer::new().with_timeout(Duration::from_secs(10));
    let kinds = [
        ("bare request (no extensions map yet)", Req::Bare),
        ("request that already has an extension", Req::WithExtension),
        ("request with grpc-timeout", Req::WithGrpcTimeout),
    ];
    for (what, kind) in kinds {
        println!("-- {what}");
        let identity = Identity::new();
        allocations_per_request(
            "identity / ready",
            identity.layer(ready_service()),
            kind,
            one_request,
        );
        allocations_per_request(
            "abort / ready",
            AbortLayer::new().layer(ready_service()),
            kind,
            one_request,
        );
        let svc = timeout.clone().layer(ready_service());
        allocations_per_request("abort+timeout / ready", svc, kind, one_request);
        let svc = timeout
            .clone()
            .with_grpc_timeout(true)
            .layer(ready_service());
        allocations_per_request("abort+timeout+grpc-timeout / ready", svc, kind, one_request);
        let svc = identity.layer(pending_once_service());
        allocations_per_request("identity / pending once", svc, kind, one_request);
        let svc = timeout.clone().layer(pending_once_service());
        allocations_per_request(
            "abort+timeout / pending once (timer armed)",
            svc,
            kind,
            one_request,
        );
        let svc = identity.layer(body_service());
        allocations_per_request(
            "identity / body read to its end",
            svc,
            kind,
            one_request_read,
        );
        let svc = timeout.clone().layer(body_service());
        allocations_per_request(
            "abort+timeout / body read to its end",
            svc,
            kind,
            one_request_read,
        );
    }
}

// ===== timings =====

fn bench_single_thread(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let waker = waker();
    let timeout = AbortLayer::new().with_timeout(Duration::from_secs(10));

    let mut group = c.benchmark_group("abort/current_thread");
    macro_rules! case {
        ($name:expr, $svc:expr, $kind:expr) => {{
            let mut svc = $svc;
            group.bench_function($name, |b| {
                let mut cx = Context::from_waker(&waker);
                b.iter(|| one_request(&mut svc, request($kind), &mut cx))
            });
        }};
    }
    let identity = Identity::new();
    case!("identity/ready", identity.layer(ready_service()), Req::Bare);
    case!(
        "abort/ready",
        AbortLayer::new().layer(ready_service()),
        Req::Bare
    );
    case!(
        "abort+timeout/ready",
        timeout.clone().layer(ready_service()),
        Req::Bare
    );
    case!(
        "identity/ready+extension",
        identity.layer(ready_service()),
        Req::WithExtension
    );
    case!(
        "abort/ready+extension",
        AbortLayer::new().layer(ready_service()),
        Req::WithExtension
    );
    let svc = timeout.clone().layer(ready_service());
    case!("abort+timeout/ready+extension", svc, Req::WithExtension);
    macro_rules! case_read {
        ($name:expr, $svc:expr, $kind:expr) => {{
            let mut svc = $svc;
            group.bench_function($name, |b| {
                let mut cx = Context::from_waker(&waker);
                b.iter(|| one_request_read(&mut svc, request($kind), &mut cx))
            });
        }};
    }
    case_read!(
        "identity/body+extension",
        identity.layer(body_service()),
        Req::WithExtension
    );
    case_read!(
        "abort/body+extension",
        AbortLayer::new().layer(body_service()),
        Req::WithExtension
    );
    let svc = timeout.clone().layer(body_service());
    case_read!("abort+timeout/body+extension", svc, Req::WithExtension);
    case!(
        "identity/ready+grpc-timeout",
        identity.layer(ready_service()),
        Req::WithGrpcTimeout
    );
    let svc = timeout
        .clone()
        .with_grpc_timeout(true)
        .layer(ready_service());
    case!(
        "abort+timeout+grpc-timeout/ready+grpc-timeout",
        svc,
        Req::WithGrpcTimeout
    );
    case!(
        "identity/pending_once",
        identity.layer(pending_once_service()),
        Req::Bare
    );
    case!(
        "abort+timeout/pending_once",
        timeout.layer(pending_once_service()),
        Req::Bare
    );
    group.finish();
}

/// Two threads sending requests through clones of one service: the shared root and
/// configuration are touched from both.
fn bench_contended(c: &mut Criterion) {
    fn run<S, B>(svc: S, iters: u64) -> Duration
    where
        S: Service<Request<()>, Response = Response<B>> + Clone + Send + 'static,
    {
        const THREADS: u64 = 2;
        let start = Instant::now();
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let mut svc = svc.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        .build()
                        .unwrap();
                    let _enter = rt.enter();
                    let waker = waker();
                    let mut cx = Context::from_waker(&waker);
                    for _ in 0..iters.div_ceil(THREADS) {
                        one_request(&mut svc, request(Req::WithExtension), &mut cx);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        start.elapsed()
    }

    let mut group = c.benchmark_group("abort/two_threads");
    group.bench_function("identity/ready", |b| {
        b.iter_custom(|iters| run(Identity::new().layer(ready_service()), iters))
    });
    let abort = AbortLayer::new().with_timeout(Duration::from_secs(10));
    group.bench_function("abort+timeout/ready", |b| {
        b.iter_custom(|iters| run(abort.layer(ready_service()), iters))
    });
    group.finish();
}

/// A handler that starts waiting on its signal (which links the signal's wait cell into a
/// shard of the root: the contended step), optionally on `children` children of it too,
/// then answers on the next poll.
struct WaitOnce {
    // Boxed so the same bench builds against versions whose `Aborted` is not `Unpin`.
    waits: Vec<Pin<Box<tower_abort::future::Aborted>>>,
    polled: bool,
}

impl Future for WaitOnce {
    type Output = Result<Response<Empty<Bytes>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.polled {
            self.waits.clear();
            return Poll::Ready(Ok(Response::new(Empty::new())));
        }
        self.polled = true;
        for wait in self.waits.iter_mut() {
            assert!(wait.as_mut().poll(cx).is_pending());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

fn waiting_service(
    children: usize,
) -> impl Service<
    Request<()>,
    Response = Response<Empty<Bytes>>,
    Error = Infallible,
    Future = WaitOnce,
> + Clone {
    service_fn(move |req: Request<()>| {
        let signal = req.extensions().get::<AbortSignal>().expect("AbortLayer");
        let mut waits = vec![Box::pin(signal.aborted())];
        waits.extend((0..children).map(|_| Box::pin(signal.child().aborted())));
        WaitOnce {
            waits,
            polled: false,
        }
    })
}

/// Tasks on a multi-thread runtime (two workers, four tasks) sending requests through
/// clones of one service: root shards, signal pool and timer lists under contention.
fn bench_multi_thread(c: &mut Criterion) {
    const TASKS: u64 = 4;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    fn run<S, B>(rt: &tokio::runtime::Runtime, svc: S, iters: u64) -> Duration
    where
        S: Service<Request<()>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: std::fmt::Debug,
        B: Send + 'static,
    {
        rt.block_on(async {
            let start = Instant::now();
            let tasks: Vec<_> = (0..TASKS)
                .map(|_| {
                    let mut svc = svc.clone();
                    tokio::spawn(async move {
                        for _ in 0..iters.div_ceil(TASKS) {
                            std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
                            let response = svc.call(request(Req::WithExtension)).await;
                            black_box(response.ok());
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            start.elapsed()
        })
    }

    let mut group = c.benchmark_group("abort/multi_thread");
    group.bench_function("identity/ready", |b| {
        b.iter_custom(|iters| run(&rt, Identity::new().layer(ready_service()), iters))
    });
    group.bench_function("abort/ready", |b| {
        b.iter_custom(|iters| run(&rt, AbortLayer::new().layer(ready_service()), iters))
    });
    let timeout = AbortLayer::new().with_timeout(Duration::from_secs(10));
    group.bench_function("identity/pending_once", |b| {
        b.iter_custom(|iters| run(&rt, Identity::new().layer(pending_once_service()), iters))
    });
    group.bench_function("abort/pending_once", |b| {
        b.iter_custom(|iters| run(&rt, AbortLayer::new().layer(pending_once_service()), iters))
    });
    group.bench_function("abort+timeout/pending_once", |b| {
        b.iter_custom(|iters| run(&rt, timeout.layer(pending_once_service()), iters))
    });
    group.bench_function("abort/handler_waits", |b| {
        b.iter_custom(|iters| run(&rt, AbortLayer::new().layer(waiting_service(0)), iters))
    });
    group.bench_function("abort/handler_waits_on_4_children", |b| {
        b.iter_custom(|iters| run(&rt, AbortLayer::new().layer(waiting_service(4)), iters))
    });
    group.finish();

    // Shutting down a root with 10,000 requests waiting on their signals, until every
    // handler has answered.
    let mut group = c.benchmark_group("abort/shutdown");
    group.sample_size(10);
    group.bench_function("10000_waiting_requests", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (layer, root) = AbortLayer::pair();
                let svc = layer.layer(service_fn(|req: Request<()>| {
                    let signal = req.extensions().get::<AbortSignal>().unwrap().clone();
                    async move {
                        signal.aborted().await;
                        Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                    }
                }));
                total += rt.block_on(async {
                    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(64);
                    let handlers: Vec<_> = (0..10_000)
                        .map(|_| {
                            let mut svc = svc.clone();
                            let ready_tx = ready_tx.clone();
                            tokio::spawn(async move {
                                let mut fut = std::pin::pin!(svc.call(request(Req::Bare)));
                                // Poll once, so the handler is waiting, then report in.
                                std::future::poll_fn(|cx| {
                                    let _ = fut.as_mut().poll(cx);
                                    Poll::Ready(())
                                })
                                .await;
                                ready_tx.send(()).await.unwrap();
                                drop(ready_tx);
                                black_box(fut.await.ok());
                            })
                        })
                        .collect();
                    drop(ready_tx);
                    while ready_rx.recv().await.is_some() {}
                    let start = Instant::now();
                    root.shutdown();
                    for handler in handlers {
                        handler.await.unwrap();
                    }
                    start.elapsed()
                });
            }
            total
        })
    });
    group.finish();
}

/// For instruction counts that do not depend on the machine's load, run one case `N`
/// times and nothing else, under `valgrind --tool=callgrind` for two values of `N`:
///
/// ```text
/// ABORT_BENCH_ONLY=abort ABORT_BENCH_N=100000 valgrind --tool=callgrind target/release/deps/abort-*
/// ```
///
/// Cases: `identity`, `abort`, `abort+timeout`, each on a request that already has an
/// extension (as requests from hyper and axum do), with a handler that is ready at once;
/// the same with `/pending` appended for a handler that is pending once (so a deadline's
/// timer is armed), and with `/body` for a response with a small body that is read to its
/// end.
fn run_only(case: &str, n: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    fn drive<S, B>(mut svc: S, n: u64, cx: &mut Context<'_>)
    where
        S: Service<Request<()>, Response = Response<B>>,
    {
        for _ in 0..n {
            one_request(&mut svc, request(Req::WithExtension), cx);
        }
    }
    fn drive_read<S, B>(mut svc: S, n: u64, cx: &mut Context<'_>)
    where
        S: Service<Request<()>, Response = Response<B>>,
        B: Body,
    {
        for _ in 0..n {
            one_request_read(&mut svc, request(Req::WithExtension), cx);
        }
    }
    let timeout = AbortLayer::new().with_timeout(Duration::from_secs(10));
    match case {
        "identity" => drive(Identity::new().layer(ready_service()), n, &mut cx),
        "abort" => drive(AbortLayer::new().layer(ready_service()), n, &mut cx),
        "abort+timeout" => drive(timeout.layer(ready_service()), n, &mut cx),
        "identity/pending" => drive(Identity::new().layer(pending_once_service()), n, &mut cx),
        "abort/pending" => drive(AbortLayer::new().layer(pending_once_service()), n, &mut cx),
        "abort+timeout/pending" => drive(timeout.layer(pending_once_service()), n, &mut cx),
        "identity/body" => drive_read(Identity::new().layer(body_service()), n, &mut cx),
        "abort/body" => drive_read(AbortLayer::new().layer(body_service()), n, &mut cx),
        "abort+timeout/body" => drive_read(timeout.layer(body_service()), n, &mut cx),
        other => panic!("unknown case {other:?}"),
    }
}

/// Wall-clock cost per request on a noisy machine: every case runs `BATCH` requests per
/// round, the cases interleaved in an order that rotates each round, and the fastest round
/// of each case is kept (the one least disturbed by other processes). Overheads are against
/// the `identity` case of the same kind, measured in the same rounds:
///
/// ```text
/// ABORT_BENCH_INTERLEAVED=30 cargo bench -p benches --bench abort
/// ```
fn interleaved(rounds: usize) {
    const BATCH: u64 = 100_000;
    type Driver = Box<dyn FnMut(&mut Context<'_>, u64)>;
    fn ready<S, B>(mut svc: S) -> Driver
    where
        S: Service<Request<()>, Response = Response<B>> + 'static,
    {
        Box::new(move |cx, n| {
            for _ in 0..n {
                one_request(&mut svc, request(Req::WithExtension), cx);
            }
        })
    }
    fn read<S, B>(mut svc: S) -> Driver
    where
        S: Service<Request<()>, Response = Response<B>> + 'static,
        B: Body,
    {
        Box::new(move |cx, n| {
            for _ in 0..n {
                one_request_read(&mut svc, request(Req::WithExtension), cx);
            }
        })
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    let timeout = AbortLayer::new().with_timeout(Duration::from_secs(10));
    // (name, index of its baseline, driver)
    let mut cases: Vec<(&str, usize, Driver)> = vec![
        (
            "identity/ready",
            0,
            ready(Identity::new().layer(ready_service())),
        ),
        (
            "abort/ready",
            0,
            ready(AbortLayer::new().layer(ready_service())),
        ),
        (
            "abort+timeout/ready",
            0,
            ready(timeout.layer(ready_service())),
        ),
        (
            "identity/body",
            3,
            read(Identity::new().layer(body_service())),
        ),
        (
            "abort/body",
            3,
            read(AbortLayer::new().layer(body_service())),
        ),
        ("abort+timeout/body", 3, read(timeout.layer(body_service()))),
    ];
    let mut best = vec![Duration::MAX; cases.len()];
    for (_, _, drive) in cases.iter_mut() {
        drive(&mut cx, BATCH / 10); // warm up: pools, caches
    }
    for round in 0..rounds {
        for i in 0..cases.len() {
            let i = (i + round) % cases.len();
            let start = Instant::now();
            (cases[i].2)(&mut cx, BATCH);
            best[i] = best[i].min(start.elapsed());
        }
    }
    let per_request = |d: Duration| d.as_nanos() as f64 / BATCH as f64;
    println!("fastest of {rounds} interleaved rounds of {BATCH} requests:");
    for (i, (name, baseline, _)) in cases.iter().enumerate() {
        let ns = per_request(best[i]);
        let base = per_request(best[*baseline]);
        println!(
            "{name:<22} {ns:8.1} ns/request  {:+7.1} ns ({:.2}x) vs {}",
            ns - base,
            ns / base,
            cases[*baseline].0
        );
    }
}

/// Prints the allocation counts, then runs the criterion benchmarks.
fn main() {
    if let Some(rounds) = std::env::var("ABORT_BENCH_INTERLEAVED")
        .ok()
        .and_then(|r| r.parse().ok())
    {
        interleaved(rounds);
        return;
    }
    if let Ok(case) = std::env::var("ABORT_BENCH_ONLY") {
        let n = std::env::var("ABORT_BENCH_N")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        run_only(&case, n);
        return;
    }
    report_allocations();
    let mut c = Criterion::default().configure_from_args();
    bench_single_thread(&mut c);
    bench_contended(&mut c);
    bench_multi_thread(&mut c);
    c.final_summary();
}
