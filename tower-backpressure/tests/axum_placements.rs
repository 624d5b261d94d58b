//! The acceptance test, for every way axum applies a layer: limit 2 + queue 3 and
//! 20 simultaneous 300 ms requests give at most 2 inside the handler, at most 3 waiting,
//! exactly 5 successes and 15 immediate `503`s with `Retry-After`.
//!
//! Each placement runs twice: in-process under paused time (each request through a fresh
//! `oneshot` of the router, as axum re-applies layers per connection), and through
//! `axum::serve` over real 127.0.0.1 sockets, measuring with counters, not timing.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Router, ServiceExt as _};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_backpressure::{BackpressureHandle, BackpressureLayer, ShedReason};

use support::Gauge;

const REQUESTS: usize = 20;

#[derive(Clone, Copy, Debug)]
enum Placement {
    RouterLayer,
    RouteLayer,
    MethodRouterLayer,
    WholeApp,
}

const ALL: [Placement; 4] = [
    Placement::RouterLayer,
    Placement::RouteLayer,
    Placement::MethodRouterLayer,
    Placement::WholeApp,
];

fn layer() -> BackpressureLayer {
    BackpressureLayer::builder(2)
        .max_queued(3)
        // Long enough that no waiter times out even on a slow, shared machine.
        .queue_timeout(Duration::from_secs(30))
        .build()
}

/// A handler that takes 300 ms, then also waits (bounded) until all 20 requests have
/// reached the limiter, so "simultaneous" holds however slowly the clients connect.
fn handler(
    gauge: Gauge,
    handle: BackpressureHandle,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = &'static str> + Send>>
       + Clone
       + Send
       + Sync
       + 'static {
    move || {
        let gauge = gauge.clone();
        let handle = handle.clone();
        Box::pin(async move {
            let _inside = gauge.enter();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let arrived = || {
                handle.admitted_total() as usize + handle.queued() + handle.shed_total() as usize
            };
            // Up to 30 s: the 20 clients of the `axum::serve` runs connect over real sockets,
            // and a loaded machine may take a while; a handler giving up early would admit a
            // sixth request.
            for _ in 0..3000 {
                if arrived() >= REQUESTS {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            "done"
        })
    }
}

/// The app under a placement, as a service answering axum responses.
fn app(
    placement: Placement,
    layer: BackpressureLayer,
    gauge: Gauge,
) -> axum::routing::IntoMakeService<
    tower::util::BoxCloneSyncService<
        Request<Body>,
        axum::response::Response,
        std::convert::Infallible,
    >,
> {
    let handle = layer.handle();
    let h = handler(gauge, handle);
    let svc = match placement {
        Placement::RouterLayer => {
            tower::util::BoxCloneSyncService::new(Router::new().route("/", get(h)).layer(layer))
        }
        Placement::RouteLayer => tower::util::BoxCloneSyncService::new(
            Router::new().route("/", get(h)).route_layer(layer),
        ),
        Placement::MethodRouterLayer => {
            tower::util::BoxCloneSyncService::new(Router::new().route("/", get(h).layer(layer)))
        }
        Placement::WholeApp => tower::util::BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_response(IntoResponse::into_response)
                .layer(layer)
                .service(Router::new().route("/", get(h))),
        ),
    };
    svc.into_make_service()
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    retry_after: Option<u64>,
    elapsed: Duration,
}

fn check(
    placement: Placement,
    answers: &[Answer],
    gauge: &Gauge,
    handle: &BackpressureHandle,
    paused: bool,
) {
    let ok = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    let shed: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!(ok, 5, "{placement:?}: {answers:?}");
    assert_eq!(shed.len(), 15, "{placement:?}: {answers:?}");
    for a in &shed {
        let secs = a.retry_after.expect("503 carries Retry-After");
        assert!(secs >= 1, "{placement:?}: {a:?}");
        if paused {
            assert_eq!(
                a.elapsed,
                Duration::ZERO,
                "{placement:?}: shed at once: {a:?}"
            );
        }
    }
    assert!(
        gauge.max() <= 2,
        "{placement:?}: {} inside at once",
        gauge.max()
    );
    assert_eq!(gauge.max(), 2, "{placement:?}: the limit was used");
    assert_eq!(gauge.total(), 5, "{placement:?}");
    assert!(
        handle.peak_queued() <= 3,
        "{placement:?}: {} waited",
        handle.peak_queued()
    );
    assert_eq!(
        handle.shed_count(ShedReason::QueueFull),
        15,
        "{placement:?}"
    );
    assert_eq!(
        (handle.in_flight(), handle.queued()),
        (0, 0),
        "{placement:?}: no leak"
    );
}

#[tokio::test(start_paused = true)]
async fn every_placement_shares_one_budget_in_process() {
    for placement in ALL {
        let layer = layer();
        let handle = layer.handle();
        let gauge = Gauge::default();
        let mut make = app(placement, layer, gauge.clone());
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..REQUESTS {
            // A fresh service per request, the way axum::serve makes one per connection.
            let svc = make.call(()).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let response = svc
                    .oneshot(Request::get("/").body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                let status = response.status();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().parse().unwrap());
                response.into_body().collect().await.unwrap();
                Answer {
                    status,
                    retry_after,
                    elapsed: started.elapsed(),
                }
            }));
        }
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        check(placement, &answers, &gauge, &handle, true);
        // Two served at 300 ms, two at 600 ms, the last at 900 ms.
        let mut served: Vec<Duration> = answers
            .iter()
            .filter(|a| a.status == StatusCode::OK)
            .map(|a| a.elapsed)
            .collect();
        served.sort();
        assert_eq!(served[1], Duration::from_millis(300), "{placement:?}");
        assert_eq!(served[3], Duration::from_millis(600), "{placement:?}");
        assert_eq!(served[4], Duration::from_millis(900), "{placement:?}");
    }
}

use tower::Service as _;

async fn raw_get(addr: std::net::SocketAddr) -> Answer {
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status_line = text.lines().next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {text:?}"));
    let retry_after = text.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().parse().ok())
            .flatten()
    });
    Answer {
        status: StatusCode::from_u16(code).unwrap(),
        retry_after,
        elapsed: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_placement_shares_one_budget_under_axum_serve() {
    for placement in ALL {
        let layer = layer();
        let handle = layer.handle();
        let gauge = Gauge::default();
        let make = app(placement, layer, gauge.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, make).await.unwrap() });
        let clients: Vec<_> = (0..REQUESTS).map(|_| tokio::spawn(raw_get(addr))).collect();
        let mut answers = Vec::new();
        for c in clients {
            answers.push(c.await.unwrap());
        }
        server.abort();
        let _ = server.await;
        check(placement, &answers, &gauge, &handle, false);
    }
}

/// The plain `Router` handed straight to `axum::serve`, the setup where tower's
/// `ConcurrencyLimitLayer` lets every request through (one semaphore per connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_layer_under_axum_serve_router() {
    let layer = layer();
    let handle = layer.handle();
    let gauge = Gauge::default();
    let router = Router::new()
        .route("/", get(handler(gauge.clone(), handle.clone())))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let clients: Vec<_> = (0..REQUESTS).map(|_| tokio::spawn(raw_get(addr))).collect();
    let mut answers = Vec::new();
    for c in clients {
        answers.push(c.await.unwrap());
    }
    server.abort();
    let _ = server.await;
    check(Placement::RouterLayer, &answers, &gauge, &handle, false);
}
