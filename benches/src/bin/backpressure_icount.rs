//! Per-request instruction counts of tower-backpressure and tower's `ConcurrencyLimit`,
//! for a machine too noisy for wall-clock numbers. Runs one case `N` times:
//!
//! ```sh
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/backpressure_icount CASE N
//! ```
//!
//! Run it with `N` and `2N` and divide the difference of the totals by `N` to cancel
//! start-up. Cases: `none`, `tower`, `typed` (any request type), `http-none`, `http-tower`,
//! `http` (permit held to the end of the response body), `http-head` (permit released at
//! the response head), `http-bypass` (`http` with a health-check bypass function), and `contended-tower` / `contended-typed` (64 tasks on a two-worker
//! runtime sharing a limit of 8; measure these with `perf stat -e task-clock`, not callgrind,
//! which runs one thread at a time). `sizes` prints the sizes of the response futures and bodies (futures
//! up to 128 bytes are moved with register stores, larger ones with `memcpy`).

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceExt};
use tower_backpressure::BackpressureLayer;

#[derive(Clone, Copy)]
struct Echo;

impl Service<u64> for Echo {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, x: u64) -> Self::Future {
        ready(Ok(x))
    }
}

#[derive(Clone, Copy)]
struct HttpEcho;

impl Service<Request<Empty<Bytes>>> for HttpEcho {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Empty<Bytes>>, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<Empty<Bytes>>) -> Self::Future {
        ready(Ok(Response::new(Empty::new())))
    }
}

async fn typed<S: Service<u64> + Clone>(svc: S, n: u64) {
    for i in 0..n {
        let _ = svc.clone().oneshot(i).await;
    }
}

async fn http<S, B>(svc: S, n: u64)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    for _ in 0..n {
        let response = svc
            .clone()
            .oneshot(Request::new(Empty::new()))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
    }
}

/// An inner service that yields once, so concurrent requests overlap.
#[derive(Clone, Copy)]
struct Yield;

impl Service<u64> for Yield {
    type Response = u64;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, Infallible>> + Send>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, x: u64) -> Self::Future {
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(x)
        })
    }
}

/// 64 tasks on a two-worker runtime share `n` requests through `svc` (limit 8 in the cases).
fn contended<S>(svc: S, n: u64)
where
    S: Service<u64> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    for i in 0..n / 64 {
                        svc.clone().oneshot(i).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let case = args.get(1).map_or("typed", String::as_str);
    if case == "sizes" {
        sizes();
        return;
    }
    let n: u64 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    match case {
        "contended-tower" => {
            return contended(
                tower::limit::GlobalConcurrencyLimitLayer::new(8).layer(Yield),
                n,
            )
        }
        "contended-typed" => {
            return contended(
                BackpressureLayer::builder(8)
                    .max_queued(64)
                    .no_queue_timeout()
                    .build_typed()
                    .layer(Yield),
                n,
            )
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match case {
            "none" => typed(Echo, n).await,
            "tower" => typed(ConcurrencyLimitLayer::new(1024).layer(Echo), n).await,
            "typed" => {
                typed(
                    BackpressureLayer::builder(1024).build_typed().layer(Echo),
                    n,
                )
                .await
            }
            "http-tower" => http(ConcurrencyLimitLayer::new(1024).layer(HttpEcho), n).await,
            "http" => http(BackpressureLayer::new(1024).layer(HttpEcho), n).await,
            "http-head" => {
                http(
                    BackpressureLayer::builder(1024)
                        .permit_release(tower_backpressure::PermitRelease::Head)
                        .build()
                        .layer(HttpEcho),
                    n,
                )
                .await
            }
            "http-bypass" => {
                http(
                    BackpressureLayer::builder(1024)
                        .bypass(|head| head.uri().path() == "/healthz")
                        .build()
                        .layer(HttpEcho),
                    n,
                )
                .await
            }
            "http-none" => http(HttpEcho, n).await,
            other => panic!("unknown case {other}"),
        }
    });
}

fn sizes() {
    type Ours =
        <tower_backpressure::Backpressure<HttpEcho> as Service<Request<Empty<Bytes>>>>::Future;
    type Tower =
        <tower::limit::ConcurrencyLimit<HttpEcho> as Service<Request<Empty<Bytes>>>>::Future;
    println!(
        "response future: ours {} B, tower {} B; request {} B; response {} B; ours wraps its body in {} B \
         (an axum body in {} B, itself {} B)",
        std::mem::size_of::<Ours>(),
        std::mem::size_of::<Tower>(),
        std::mem::size_of::<Request<Empty<Bytes>>>(),
        std::mem::size_of::<Response<Empty<Bytes>>>(),
        std::mem::size_of::<tower_backpressure::ResponseBody<Empty<Bytes>>>(),
        std::mem::size_of::<tower_backpressure::ResponseBody<axum::body::Body>>(),
        std::mem::size_of::<axum::body::Body>(),
    );
}
