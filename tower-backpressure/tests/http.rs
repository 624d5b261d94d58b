//! Semantics of the HTTP service: permits across the body, cancellation, timeouts, queue
//! order, leaks, byte budget, deadlines, bypass, Retry-After.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready, task};
use tower::{Layer, Service, ServiceExt};
use tower_backpressure::{
    channel_body, Backpressure, BackpressureHandle, BackpressureLayer, PermitRelease, QueueOrder,
    ShedReason,
};

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An inner service that logs the `id` header of each call and then holds the request
/// until the gate lets it go.
#[derive(Clone)]
struct Gated {
    order: Arc<Mutex<Vec<u32>>>,
    gate: Arc<Semaphore>,
}

impl Gated {
    fn new() -> Self {
        Gated {
            order: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
    fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }
    fn order(&self) -> Vec<u32> {
        self.order.lock().unwrap().clone()
    }
}

impl Service<Request<Body>> for Gated {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFut<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let id = req
            .headers()
            .get("id")
            .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
        let order = self.order.clone();
        let gate = self.gate.clone();
        Box::pin(async move {
            order.lock().unwrap().push(id);
            gate.acquire().await.unwrap().forget();
            Ok(Response::new(Body::from("done")))
        })
    }
}

fn req(id: u32) -> Request<Body> {
    req_to("/", id)
}

fn req_to(path: &str, id: u32) -> Request<Body> {
    Request::get(path)
        .header("id", id.to_string())
        .body(Body::empty())
        .unwrap()
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn assert_idle(handle: &BackpressureHandle) {
    assert_eq!(handle.in_flight(), 0, "leaked permit");
    assert_eq!(handle.queued(), 0, "leaked waiter");
    assert_eq!(handle.bytes_in_flight(), 0, "leaked byte reservation");
}

type Spawned = tokio::task::JoinHandle<Response<Bytes>>;

fn spawn_call<S>(svc: &S, request: Request<Body>) -> Spawned
where
    S: Service<
            Request<Body>,
            Response = Response<tower_backpressure::ResponseBody<Body>>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let svc = svc.clone();
    tokio::spawn(async move {
        let response = svc.oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        // Read the body so the permit is released, keep the status.
        let bytes = body.collect().await.unwrap().to_bytes();
        Response::from_parts(parts, bytes)
    })
}

#[tokio::test]
async fn two_clones_of_the_layer_share_one_budget() {
    let layer = BackpressureLayer::builder(1).max_queued(0).build();
    let other = layer.clone();
    let gated = Gated::new();
    let a = layer.layer(gated.clone());
    let b = other.layer(gated.clone());
    let first = spawn_call(&a, req(1));
    settle().await;
    let second = b.clone().oneshot(req(2)).await.unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(layer.handle().shed_count(ShedReason::QueueFull), 1);
    gated.release(1);
    assert_eq!(first.await.unwrap().status(), StatusCode::OK);
    assert_idle(&layer.handle());
}

#[tokio::test]
async fn streaming_body_holds_its_permit_until_it_ends() {
    let layer = BackpressureLayer::new(1);
    let handle = layer.handle();
    let (tx_slot, rx_slot) = std::sync::mpsc::channel();
    let svc = layer.layer(tower::service_fn(move |_: Request<Body>| {
        let (tx, body) = channel_body(1024);
        tx_slot.send(tx).unwrap();
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    let response = svc.clone().oneshot(req(1)).await.unwrap();
    let mut tx = rx_slot.recv().unwrap();
    assert!(response.body().holds_permit());
    assert_eq!(
        handle.in_flight(),
        1,
        "head sent, body streaming: still inside"
    );
    let mut body = response.into_body();
    tx.send(Bytes::from_static(b"chunk")).await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "chunk");
    assert_eq!(handle.in_flight(), 1);
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(handle.in_flight(), 0, "released at the end of the body");

    // Dropping the body mid-stream releases the permit and stops the producer.
    let response = svc.clone().oneshot(req(2)).await.unwrap();
    let mut tx = rx_slot.recv().unwrap();
    assert_eq!(handle.in_flight(), 1);
    drop(response);
    assert_eq!(handle.in_flight(), 0, "released when the body is dropped");
    assert!(tx.send(Bytes::from_static(b"late")).await.is_err());
    assert_idle(&handle);
}

#[tokio::test]
async fn head_only_release_frees_the_permit_with_the_head() {
    let layer = BackpressureLayer::builder(1)
        .permit_release(PermitRelease::Head)
        .build();
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|_: Request<Body>| async {
        let (_tx, body) = channel_body(1024);
        Ok::<_, Infallible>(Response::new(body))
    }));
    let response = svc.oneshot(req(1)).await.unwrap();
    assert!(!response.body().holds_permit());
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test]
async fn dropping_a_queued_future_leaves_the_queue_at_once() {
    let layer = BackpressureLayer::builder(1).max_queued(3).build();
    let handle = layer.handle();
    let gated = Gated::new();
    let mut svc = layer.layer(gated.clone());
    let mut first = task::spawn(svc.call(req(0)));
    assert_pending!(first.poll());
    let mut waiters: Vec<_> = (1..=3).map(|i| task::spawn(svc.call(req(i)))).collect();
    for w in &mut waiters {
        assert_pending!(w.poll());
    }
    assert_eq!(handle.queued(), 3);
    // A fourth is shed: the queue is full.
    let shed = svc.call(req(4)).await.unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Drop the middle waiter: counted out immediately, no time passes.
    drop(waiters.remove(1));
    assert_eq!(handle.queued(), 2);
    // ...and its place is usable at once.
    let mut again = task::spawn(svc.call(req(5)));
    assert_pending!(again.poll());
    assert_eq!(handle.queued(), 3);
    drop(again);
    drop(waiters);
    assert_eq!(handle.queued(), 0);
    drop(first);
    assert_idle(&handle);
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_sheds_at_the_right_moment() {
    let layer = BackpressureLayer::builder(1)
        .queue_timeout(Duration::from_millis(100))
        .build();
    let handle = layer.handle();
    let gated = Gated::new();
    let mut svc = layer.layer(gated.clone());
    let mut first = task::spawn(svc.call(req(0)));
    assert_pending!(first.poll());
    let mut waiter = task::spawn(svc.call(req(1)));
    assert_pending!(waiter.poll());
    tokio::time::advance(Duration::from_millis(99)).await;
    assert_pending!(waiter.poll());
    assert_eq!(handle.queued(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(waiter.is_woken(), "the timer wakes the waiter");
    let response = assert_ready!(waiter.poll()).unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(handle.shed_count(ShedReason::QueueTimeout), 1);
    assert_eq!(handle.queued(), 0);
    drop(first);
    assert_idle(&handle);
}

async fn served_order(order: QueueOrder) -> Vec<u32> {
    let layer = BackpressureLayer::builder(1)
        .max_queued(10)
        .queue_order(order)
        .build();
    let gated = Gated::new();
    let svc = layer.layer(gated.clone());
    let mut tasks = vec![spawn_call(&svc, req(0))];
    settle().await;
    for i in 1..=4 {
        tasks.push(spawn_call(&svc, req(i)));
        settle().await;
    }
    for _ in 0..5 {
        gated.release(1);
        settle().await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status(), StatusCode::OK);
    }
    assert_idle(&layer.handle());
    gated.order()
}

#[tokio::test]
async fn fifo_serves_oldest_first() {
    assert_eq!(served_order(QueueOrder::Fifo).await, vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn lifo_serves_newest_first() {
    assert_eq!(served_order(QueueOrder::Lifo).await, vec![0, 4, 3, 2, 1]);
}

#[tokio::test(start_paused = true)]
async fn adaptive_is_fifo_until_a_standing_queue_then_lifo_with_a_short_bound() {
    let layer = BackpressureLayer::builder(1)
        .max_queued(10)
        .queue_timeout(Duration::from_secs(10))
        .queue_order(QueueOrder::adaptive())
        .build();
    let handle = layer.handle();
    let gated = Gated::new();
    let svc = layer.layer(gated.clone());
    let start = Instant::now();
    let mut tasks = vec![spawn_call(&svc, req(0))];
    settle().await;
    for i in 1..=3 {
        tasks.push(spawn_call(&svc, req(i)));
    }
    settle().await;
    // 10 ms in: the queue has not stood for 100 ms yet, so FIFO.
    tokio::time::advance(Duration::from_millis(10)).await;
    gated.release(1);
    settle().await;
    assert_eq!(gated.order(), vec![0, 1]);
    // 150 ms in, the queue has not been empty since t=0: a standing queue. New arrivals
    // are served newest first, and 2 and 3 (queued 150 ms > 5 ms target) are shed.
    tokio::time::advance(Duration::from_millis(140)).await;
    tasks.push(spawn_call(&svc, req(4)));
    settle().await;
    tasks.push(spawn_call(&svc, req(5)));
    settle().await;
    assert_eq!(handle.shed_count(ShedReason::QueueTimeout), 2);
    gated.release(1);
    settle().await;
    gated.release(1);
    settle().await;
    gated.release(1);
    settle().await;
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(150),
        "no time passed"
    );
    assert_eq!(gated.order(), vec![0, 1, 5, 4]);
    let statuses: Vec<StatusCode> = {
        let mut v = Vec::new();
        for t in tasks {
            v.push(t.await.unwrap().status());
        }
        v
    };
    assert_eq!(
        statuses,
        [200, 200, 503, 503, 200, 200].map(|s| StatusCode::from_u16(s).unwrap())
    );
    assert_idle(&handle);
}

#[tokio::test]
async fn no_leak_when_the_inner_service_errors() {
    let layer = BackpressureLayer::builder(1)
        .max_request_bytes(1000)
        .build();
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|_: Request<Body>| async {
        Err::<Response<Body>, _>(std::io::Error::other("boom"))
    }));
    let request = Request::post("/")
        .header("content-length", "10")
        .body(Body::from("0123456789"))
        .unwrap();
    assert!(svc.oneshot(request).await.is_err());
    assert_idle(&handle);
}

#[tokio::test]
async fn no_leak_when_the_inner_future_panics() {
    let layer = BackpressureLayer::builder(1)
        .max_request_bytes(1000)
        .max_queued(1)
        .build();
    let handle = layer.handle();
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let svc = layer.layer(tower::service_fn(move |_: Request<Body>| {
        let g = g.clone();
        async move {
            g.acquire().await.unwrap().forget();
            panic!("handler bug");
            #[allow(unreachable_code)]
            Ok::<Response<Body>, Infallible>(Response::new(Body::empty()))
        }
    }));
    let sized = || {
        Request::post("/")
            .header("content-length", "10")
            .body(Body::from("0123456789"))
            .unwrap()
    };
    let a = tokio::spawn(AssertUnwindSafe(svc.clone().oneshot(sized())).catch_unwind());
    settle().await;
    let b = tokio::spawn(AssertUnwindSafe(svc.clone().oneshot(sized())).catch_unwind());
    settle().await;
    assert_eq!((handle.in_flight(), handle.queued()), (1, 1));
    gate.add_permits(2);
    assert!(a.await.unwrap().is_err(), "the panic reaches the caller");
    assert!(
        b.await.unwrap().is_err(),
        "the waiter was admitted, then panicked too"
    );
    assert_idle(&handle);
}

/// An inner service whose readiness is controlled by the test.
#[derive(Clone)]
struct Readiness {
    ready: Arc<std::sync::atomic::AtomicBool>,
    inner: Gated,
}

impl Service<Request<Body>> for Readiness {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFut<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.ready.load(std::sync::atomic::Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.inner.call(req)
    }
}

#[tokio::test]
async fn no_leak_when_dropped_at_any_await_point() {
    let layer = BackpressureLayer::builder(1)
        .max_queued(2)
        .max_request_bytes(100)
        .build();
    let handle = layer.handle();
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gated = Gated::new();
    let mut svc: Backpressure<Readiness> = layer.layer(Readiness {
        ready: ready.clone(),
        inner: gated.clone(),
    });
    let sized = |id: u32| {
        Request::post("/")
            .header("id", id.to_string())
            .header("content-length", "10")
            .body(Body::from("0123456789"))
            .unwrap()
    };

    ready.store(true, std::sync::atomic::Ordering::SeqCst);

    // 1. Queued, dropped while waiting.
    let mut holder = task::spawn(svc.call(sized(1)));
    assert_pending!(holder.poll());
    assert_eq!((handle.in_flight(), handle.bytes_in_flight()), (1, 10));
    let mut queued = task::spawn(svc.call(sized(2)));
    assert_pending!(queued.poll());
    assert_eq!(handle.queued(), 1);
    drop(queued);
    assert_eq!(handle.queued(), 0);

    // 2. Granted a permit by the hand-off but dropped before it was polled again, and
    // 3. dropped inside the inner call future (the holder).
    let mut granted = task::spawn(svc.call(sized(3)));
    assert_pending!(granted.poll());
    drop(holder);
    assert_eq!(handle.in_flight(), 1, "handed to the waiter");
    assert_eq!(handle.queued(), 0);
    drop(granted);
    assert_idle(&handle);

    // 4. Admitted from the queue, dropped while the inner service is not ready.
    let mut holder = task::spawn(svc.call(sized(4)));
    assert_pending!(holder.poll());
    let mut waiting = task::spawn(svc.call(sized(5)));
    assert_pending!(waiting.poll());
    ready.store(false, std::sync::atomic::Ordering::SeqCst);
    drop(holder);
    assert_pending!(waiting.poll());
    assert_eq!(
        (handle.in_flight(), handle.queued()),
        (1, 0),
        "admitted, awaiting readiness"
    );
    drop(waiting);
    assert_idle(&handle);
    ready.store(true, std::sync::atomic::Ordering::SeqCst);

    // 5. Dropped with the response body unread.
    gated.release(1);
    let response = svc.call(sized(6)).await.unwrap();
    assert_eq!(handle.in_flight(), 1);
    drop(response);
    assert_idle(&handle);
}

#[tokio::test]
async fn streamed_request_bytes_count_against_the_budget() {
    let layer = BackpressureLayer::builder(10)
        .max_request_bytes(100)
        .meter_bodies_with(Body::new)
        .build();
    let handle = layer.handle();
    let h = handle.clone();
    let svc = layer.layer(tower::service_fn(move |req: Request<Body>| {
        let h = h.clone();
        async move {
            let mut body = req.into_body();
            let mut seen = Vec::new();
            let mut failed = None;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Ok(d) = f.into_data() {
                            seen.push((d.len(), h.bytes_in_flight()));
                        }
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            let text = format!("{seen:?} {failed:?}");
            Ok::<_, Infallible>(Response::new(Body::from(text)))
        }
    }));
    // A chunked body with no Content-Length: 3 x 40 bytes, the third passes 100.
    let chunks =
        futures::stream::iter((0..3).map(|_| Ok::<_, Infallible>(Bytes::from(vec![b'x'; 40]))));
    let request = Request::post("/").body(Body::from_stream(chunks)).unwrap();
    let response = svc.clone().oneshot(request).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(text.to_vec()).unwrap();
    assert!(text.starts_with("[(40, 40), (40, 80)]"), "{text}");
    assert!(text.contains("byte budget of 100 bytes"), "{text}");
    assert_idle(&handle);

    // A declared size larger than the whole budget is refused with 413.
    let too_big = Request::post("/")
        .header("content-length", "101")
        .body(Body::empty())
        .unwrap();
    let response = svc.oneshot(too_big).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        !response.headers().contains_key("retry-after"),
        "retrying the same body cannot succeed"
    );
    assert_eq!(handle.shed_count(ShedReason::TooLarge), 1);
}

#[derive(Clone, Copy)]
struct Deadline(Instant);

#[tokio::test(start_paused = true)]
async fn deadlines_shed_early() {
    let layer = BackpressureLayer::builder(1)
        .max_queued(10)
        .queue_timeout(Duration::from_secs(10))
        .deadline(|head| head.extensions().get::<Deadline>().map(|d| d.0))
        .build();
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|_: Request<Body>| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, Infallible>(Response::new(Body::from("ok")))
    }));
    let with_deadline = |d: Instant| {
        let mut r = req(0);
        r.extensions_mut().insert(Deadline(d));
        r
    };
    // Already past: shed without running.
    let r = svc
        .clone()
        .oneshot(with_deadline(Instant::now()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handle.shed_count(ShedReason::DeadlineUnreachable), 1);
    // Teach the limiter that a request takes 1 s.
    let r = svc.clone().oneshot(req(0)).await.unwrap();
    r.into_body().collect().await.unwrap();
    // One in flight for 1 s: a request that must finish within 500 ms cannot make it.
    let busy = spawn_call(&svc, req(0));
    settle().await;
    let started = Instant::now();
    let r = svc
        .clone()
        .oneshot(with_deadline(Instant::now() + Duration::from_millis(500)))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(started.elapsed(), Duration::ZERO, "shed on arrival");
    assert_eq!(handle.shed_count(ShedReason::DeadlineUnreachable), 2);
    // One with 1.5 s to spare queues, and is served.
    let r = svc
        .clone()
        .oneshot(with_deadline(Instant::now() + Duration::from_millis(1500)))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    drop(r);
    busy.await.unwrap();
    assert_idle(&handle);
}

#[tokio::test(start_paused = true)]
async fn retry_after_follows_the_drain_rate() {
    let layer = BackpressureLayer::builder(1)
        .max_queued(2)
        .queue_timeout(Duration::from_secs(60))
        .build();
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|_: Request<Body>| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, Infallible>(Response::new(Body::from("ok")))
    }));
    assert_eq!(
        handle.retry_after(),
        Duration::from_secs(1),
        "no data yet: 1 s"
    );
    let r = svc.clone().oneshot(req(0)).await.unwrap();
    r.into_body().collect().await.unwrap();
    assert_eq!(handle.service_time().count, 1);
    let tasks: Vec<_> = (0..3).map(|i| spawn_call(&svc, req(i))).collect();
    settle().await;
    assert_eq!(handle.queued(), 2);
    // Two waiting, one slot at 5 s each: the next request could start in 15 s.
    let shed = svc.clone().oneshot(req(9)).await.unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()["retry-after"], "15");
    for t in tasks {
        t.await.unwrap();
    }
    assert_idle(&handle);
}

#[tokio::test]
async fn bypassed_requests_are_never_limited_and_status_is_configurable() {
    let layer = BackpressureLayer::builder(1)
        .max_queued(0)
        .shed_status(StatusCode::TOO_MANY_REQUESTS)
        .bypass(|head| head.uri().path() == "/healthz")
        .build();
    let handle = layer.handle();
    let gated = Gated::new();
    let svc = layer.layer(gated.clone());
    let busy = spawn_call(&svc, req(1));
    settle().await;
    let shed = svc.clone().oneshot(req(2)).await.unwrap();
    assert_eq!(shed.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(shed.headers().contains_key("retry-after"));
    let health = spawn_call(&svc, req_to("/healthz", 3));
    settle().await;
    assert_eq!(
        gated.order(),
        vec![1, 3],
        "the health check went straight in"
    );
    assert_eq!(handle.in_flight(), 1, "and is not counted");
    gated.release(2);
    assert_eq!(health.await.unwrap().status(), StatusCode::OK);
    busy.await.unwrap();
    assert_idle(&handle);
}

#[tokio::test]
async fn the_bypass_function_is_asked_once_per_request_on_every_path() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let layer = BackpressureLayer::builder(1)
        .max_queued(1)
        .bypass(move |head| {
            counter.fetch_add(1, Ordering::SeqCst);
            head.uri().path() == "/healthz"
        })
        .build();
    let handle = layer.handle();
    let gated = Gated::new();
    let svc = layer.layer(gated.clone());
    // Admitted by the lock-free path.
    let first = spawn_call(&svc, req(1));
    settle().await;
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    // Not admitted at once: queued by the locked path, which must not ask again.
    let second = spawn_call(&svc, req(2));
    settle().await;
    assert_eq!(handle.queued(), 1);
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    // Shed: the queue is full.
    let shed = svc.clone().oneshot(req(3)).await.unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    // Bypassed while the limit is full.
    let health = spawn_call(&svc, req_to("/healthz", 4));
    settle().await;
    assert_eq!(asked.load(Ordering::SeqCst), 4);
    assert_eq!(gated.order(), vec![1, 4]);
    gated.release(3);
    for t in [first, second, health] {
        assert_eq!(t.await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        asked.load(Ordering::SeqCst),
        4,
        "admitting from the queue asks nothing"
    );
    assert_idle(&handle);
}

#[tokio::test]
async fn resizing_at_run_time_admits_waiters() {
    let layer = BackpressureLayer::builder(1).max_queued(5).build();
    let handle = layer.handle();
    let gated = Gated::new();
    let svc = layer.layer(gated.clone());
    let tasks: Vec<_> = (0..4).map(|i| spawn_call(&svc, req(i))).collect();
    settle().await;
    assert_eq!((handle.in_flight(), handle.queued()), (1, 3));
    handle.set_limit(3);
    settle().await;
    assert_eq!((handle.in_flight(), handle.queued()), (3, 1));
    assert_eq!(handle.limit(), 3);
    gated.release(4);
    for t in tasks {
        assert_eq!(t.await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(handle.admitted_total(), 4);
    assert_eq!(handle.queue_wait().count, 4);
    assert_idle(&handle);
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_counts_5xx_and_429_as_overload_and_ignores_4xx_and_cancels() {
    use tower_backpressure::{Aimd, LimitStrategy};
    let layer = BackpressureLayer::builder(10)
        .limit_strategy(LimitStrategy::Aimd(Aimd::new().limits(1, 100)))
        .build();
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|req: Request<Body>| async move {
        let status: u16 = req.uri().path()[1..].parse().unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let body = if status == 299 {
            // A streaming 200 whose body never ends: the client will drop it.
            let (tx, body) = channel_body(16);
            std::mem::forget(tx);
            Body::new(body)
        } else {
            Body::from("x")
        };
        let mut response = Response::new(body);
        *response.status_mut() =
            StatusCode::from_u16(if status == 299 { 200 } else { status }).unwrap();
        Ok::<_, Infallible>(response)
    }));
    let hit = |status: u16| {
        let svc = svc.clone();
        async move {
            let response = svc
                .oneshot(
                    Request::get(format!("/{status}"))
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            if status != 299 {
                response.into_body().collect().await.unwrap();
            }
            // 299: dropped with the body unread, like a client that went away.
            tokio::time::advance(Duration::from_secs(1)).await;
        }
    };
    hit(404).await;
    hit(400).await;
    assert_eq!(handle.limit(), 10, "4xx says nothing about capacity");
    hit(299).await;
    assert_eq!(
        handle.limit(),
        10,
        "a client cancel says nothing about capacity"
    );
    hit(503).await;
    assert_eq!(handle.limit(), 9, "5xx backs off");
    hit(429).await;
    assert_eq!(handle.limit(), 8, "429 backs off");
    hit(504).await;
    assert_eq!(handle.limit(), 7, "a gateway timeout backs off");
    assert_idle(&handle);
}

/// One data frame, then trailers; it only reports its end when polled once more (like
/// `http_body_util::StreamBody` or a gRPC encoder).
struct DataThenTrailers(u8);

impl http_body::Body for DataThenTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0 += 1;
        Poll::Ready(match self.0 {
            1 => Some(Ok(http_body::Frame::data(Bytes::from_static(b"x")))),
            2 => Some(Ok(http_body::Frame::trailers(http::HeaderMap::new()))),
            _ => None,
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_ending_with_trailers_counts_as_completed() {
    // hyper sends the trailers and drops the body without polling it again: the request
    // finished normally and its service time must be sampled (adaptive limits, Retry-After).
    let layer = BackpressureLayer::builder(1).build();
    let handle = layer.handle();
    let svc = layer.layer(tower::service_fn(|_: Request<Body>| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, Infallible>(Response::new(DataThenTrailers(0)))
    }));
    let mut body = Box::pin(svc.oneshot(req(0)).await.unwrap().into_body());
    let data = body.frame().await;
    assert!(data.unwrap().unwrap().is_data());
    let trailers = body.frame().await;
    assert!(trailers.unwrap().unwrap().is_trailers());
    assert!(
        !body.holds_permit(),
        "the permit is returned with the trailers"
    );
    drop(body);
    assert_eq!(handle.service_time().count, 1);
    assert_idle(&handle);
}

/// Limit 1, queue 2, five requests one after another (`0` runs, the rest queue or are
/// shed): the order the served ones reach the inner service, and who was shed.
async fn full_queue(order: QueueOrder) -> (Vec<u32>, Vec<u32>) {
    let layer = BackpressureLayer::builder(1)
        .max_queued(2)
        .no_queue_timeout()
        .queue_order(order)
        .build();
    let gated = Gated::new();
    let svc = layer.layer(gated.clone());
    let mut tasks = Vec::new();
    for i in 0..5 {
        tasks.push((i, spawn_call(&svc, req(i))));
        settle().await;
    }
    for _ in 0..3 {
        gated.release(1);
        settle().await;
    }
    let mut shed = Vec::new();
    for (i, task) in tasks {
        let response = task.await.unwrap();
        match response.status() {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => shed.push(i),
            other => panic!("request {i}: {other}"),
        }
    }
    assert_eq!(layer.handle().shed_count(ShedReason::QueueFull), 2);
    assert_idle(&layer.handle());
    (gated.order(), shed)
}

#[tokio::test]
async fn a_full_fifo_queue_sheds_the_newcomer() {
    // In FIFO order a newcomer would be served after everyone queued: it is the one shed.
    assert_eq!(
        full_queue(QueueOrder::Fifo).await,
        (vec![0, 1, 2], vec![3, 4])
    );
}

#[tokio::test]
async fn a_full_lifo_queue_sheds_its_oldest_waiter() {
    // In LIFO order a newcomer is served first and the oldest waiter last: the newcomer
    // takes the oldest waiter's place (3 displaces 1, 4 displaces 2), so the queue keeps
    // the requests most likely to still have a client.
    assert_eq!(
        full_queue(QueueOrder::Lifo).await,
        (vec![0, 4, 3], vec![1, 2])
    );
}

/// An inner service whose readiness can be switched off: its `poll_ready` then stays
/// pending (as a service behind its own limit or a saturated connection pool would).
#[derive(Clone)]
struct Switchable {
    gated: Gated,
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Service<Request<Body>> for Switchable {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFut<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.ready.load(std::sync::atomic::Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.gated.call(req)
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_for_the_inner_service_after_admission_is_bounded_by_the_queue_timeout() {
    let layer = BackpressureLayer::builder(1)
        .max_queued(1)
        .queue_timeout(Duration::from_millis(100))
        .build();
    let handle = layer.handle();
    let inner = Switchable {
        gated: Gated::new(),
        ready: Arc::default(),
    };
    inner.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let svc = layer.layer(inner.clone());
    let first = spawn_call(&svc, req(1));
    settle().await;
    let queued_at = Instant::now();
    let second = spawn_call(&svc, req(2));
    settle().await;
    assert_eq!(handle.queued(), 1);
    // The inner service stops being ready; the first request ends after 50 ms and its
    // permit goes to the second, which now waits for readiness while holding it.
    inner
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    inner.gated.release(1);
    assert_eq!(first.await.unwrap().status(), StatusCode::OK);
    settle().await;
    assert_eq!((handle.in_flight(), handle.queued()), (1, 0));
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the wait for readiness is bounded")
        .unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(second.headers().contains_key(http::header::RETRY_AFTER));
    // Shed when its queue timeout, counted from when it queued, ran out.
    assert_eq!(queued_at.elapsed(), Duration::from_millis(100));
    assert_eq!(handle.shed_count(ShedReason::QueueTimeout), 1);
    assert_idle(&handle);
    assert_eq!(inner.gated.order(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_request_waiting_for_readiness_returns_its_permit() {
    let layer = BackpressureLayer::builder(1).max_queued(1).build();
    let handle = layer.handle();
    let inner = Switchable {
        gated: Gated::new(),
        ready: Arc::default(),
    };
    inner.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut svc = layer.layer(inner.clone());
    let first = spawn_call(&svc, req(1));
    settle().await;
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let mut second = task::spawn(svc.call(req(2)));
    assert_pending!(second.poll());
    inner
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    inner.gated.release(1);
    assert_eq!(first.await.unwrap().status(), StatusCode::OK);
    // Granted the permit, waiting for its service to be ready.
    assert!(second.is_woken());
    assert_pending!(second.poll());
    assert_eq!((handle.in_flight(), handle.queued()), (1, 0));
    drop(second);
    assert_idle(&handle);
}

fn sized(id: u32, bytes: u64) -> Request<Body> {
    Request::post("/")
        .header("id", id.to_string())
        .header(http::header::CONTENT_LENGTH, bytes)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn a_request_held_up_by_the_byte_budget_holds_up_only_requests_that_need_bytes() {
    let layer = BackpressureLayer::builder(10)
        .max_queued(10)
        .max_request_bytes(100)
        .build();
    let handle = layer.handle();
    let gated = Gated::new();
    let svc = layer.layer(gated.clone());
    let a = spawn_call(&svc, sized(1, 80));
    settle().await;
    // 60 bytes do not fit next to 80: it waits for them.
    let b = spawn_call(&svc, sized(2, 60));
    settle().await;
    // Without a body it needs only a slot, and slots are free: it is not held up.
    let c = spawn_call(&svc, req(3));
    settle().await;
    assert_eq!(gated.order(), vec![1, 3]);
    // 10 bytes would fit, but bytes go in order: it waits behind the 60, which is never
    // starved by smaller bodies.
    let d = spawn_call(&svc, sized(4, 10));
    settle().await;
    assert_eq!(gated.order(), vec![1, 3]);
    assert_eq!((handle.in_flight(), handle.queued()), (2, 2));
    gated.release(2);
    settle().await;
    // 80 bytes and a slot are back: the 60 goes first, then the 10 fits beside it.
    assert_eq!(gated.order(), vec![1, 3, 2, 4]);
    gated.release(2);
    for task in [a, b, c, d] {
        assert_eq!(task.await.unwrap().status(), StatusCode::OK);
    }
    assert_idle(&handle);
}
