//! tower-backpressure against tower's `ConcurrencyLimit` and no limit at all.
//!
//! - `uncontended`: one request at a time on a current-thread runtime; the cost of
//!   admitting and releasing (goal: no slower than `ConcurrencyLimit`).
//! - `contended`: 64 tasks on the multi-thread runtime sharing a limit of 8 around an inner
//!   service that yields once, so requests really wait and hand permits on.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::time::{Duration, Instant};

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use tower::limit::{ConcurrencyLimitLayer, GlobalConcurrencyLimitLayer};
use tower::{Layer, Service, ServiceExt};
use tower_backpressure::BackpressureLayer;

/// The cheapest possible inner service.
#[derive(Clone, Copy)]
struct Echo;

impl Service<u64> for Echo {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, x: u64) -> Self::Future {
        ready(Ok(x))
    }
}

type HttpBody = Empty<bytes::Bytes>;

#[derive(Clone, Copy)]
struct HttpEcho;

impl Service<Request<HttpBody>> for HttpEcho {
    type Response = Response<HttpBody>;
    type Error = Infallible;
    type Future = Ready<Result<Response<HttpBody>, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<HttpBody>) -> Self::Future {
        ready(Ok(Response::new(Empty::new())))
    }
}

async fn once<S: Service<u64>>(svc: &mut S) {
    let _ = svc.ready().await.ok().unwrap().call(1).await;
}

fn uncontended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("backpressure/uncontended");
    group.throughput(Throughput::Elements(1));

    group.bench_function("none", |b| {
        let svc = Echo;
        b.to_async(&rt).iter(|| {
            let mut svc = svc;
            async move { once(&mut svc).await }
        });
    });
    group.bench_function("tower_concurrency_limit", |b| {
        let svc = ConcurrencyLimitLayer::new(1024).layer(Echo);
        b.to_async(&rt).iter(|| {
            let mut svc = svc.clone();
            async move { once(&mut svc).await }
        });
    });
    group.bench_function("backpressure_typed", |b| {
        let svc = BackpressureLayer::builder(1024).build_typed().layer(Echo);
        b.to_async(&rt).iter(|| {
            let mut svc = svc.clone();
            async move { once(&mut svc).await }
        });
    });

    // HTTP: the permit travels in the response body and is released when it ends.
    group.bench_function("http/tower_concurrency_limit", |b| {
        let svc = ConcurrencyLimitLayer::new(1024).layer(HttpEcho);
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move {
                let r = svc.oneshot(Request::new(Empty::new())).await.unwrap();
                r.into_body().collect().await.unwrap();
            }
        });
    });
    group.bench_function("http/backpressure", |b| {
        let svc = BackpressureLayer::new(1024).layer(HttpEcho);
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move {
                let r = svc.oneshot(Request::new(Empty::new())).await.unwrap();
                r.into_body().collect().await.unwrap();
            }
        });
    });
    group.finish();
}

/// An inner service that yields once, so concurrent requests overlap.
#[derive(Clone, Copy)]
struct Yield;

impl Service<u64> for Yield {
    type Response = u64;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, Infallible>> + Send>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, x: u64) -> Self::Future {
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(x)
        })
    }
}

const TASKS: usize = 64;
const PER_TASK: usize = 200;

async fn storm<S>(svc: S) -> Duration
where
    S: Service<u64> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    svc.ready().await.unwrap().call(i as u64).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn contended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("backpressure/contended");
    group.throughput(Throughput::Elements((TASKS * PER_TASK) as u64));
    group.sample_size(20);
    let limit = 8;
    group.bench_function(
        BenchmarkId::new("tower_global_concurrency_limit", limit),
        |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += storm(GlobalConcurrencyLimitLayer::new(limit).layer(Yield)).await;
                }
                total
            });
        },
    );
    group.bench_function(BenchmarkId::new("backpressure_typed", limit), |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let svc = BackpressureLayer::builder(limit)
                    .max_queued(TASKS)
                    .no_queue_timeout()
                    .build_typed()
                    .layer(Yield);
                total += storm(svc).await;
            }
            total
        });
    });
    group.finish();
}

/// Private, so the `pub fn` the macro generates needs no docs.
mod group {
    use super::{contended, uncontended};
    criterion::criterion_group!(benches, uncontended, contended);
}
criterion_main!(group::benches);
