//! tower-singleflight: the core's per-call overhead for unique keys against a direct call,
//! `async_singleflight` and moka's `get_with`; 10,000 waiters on one key; and the HTTP
//! layer's overhead for unique URLs against the bare service.
//!
//! Run with `cargo bench -p benches --bench singleflight`.

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::{
    convert::Infallible,
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    task::Poll,
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::{stream::FuturesUnordered, StreamExt};
use http::{Request, Response};
use http_body_util::Full;
use tokio::{runtime::Runtime, sync::watch};
use tower::{service_fn, Layer, ServiceExt};
use tower_singleflight::{Group, SingleflightLayer};

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One call per iteration, each with a key never used before: pure bookkeeping overhead.
fn unique_keys(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("singleflight/unique_key");
    g.throughput(Throughput::Elements(1));

    g.bench_function("direct", |b| {
        let next = AtomicU64::new(0);
        b.to_async(&rt).iter(|| {
            let k = next.fetch_add(1, Ordering::Relaxed);
            async move { black_box(async move { k }.await) }
        })
    });

    g.bench_function("tower_singleflight", |b| {
        let group: Group<u64, u64> = Group::new();
        let next = AtomicU64::new(0);
        b.to_async(&rt).iter(|| {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let run = group.run(k, move || async move { k });
            async move { black_box(run.await.unwrap()) }
        });
        assert!(group.is_empty());
    });

    g.bench_function("async_singleflight", |b| {
        let group: async_singleflight::UnaryGroup<u64, u64> = async_singleflight::UnaryGroup::new();
        let next = AtomicU64::new(0);
        b.to_async(&rt).iter(|| {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let group = &group;
            async move { black_box(group.work(&k, async move { k }).await) }
        })
    });

    g.bench_function("moka_get_with", |b| {
        // A cache, so it also stores each value; bounded so it evicts like one in use.
        let cache: moka::future::Cache<u64, u64> = moka::future::Cache::new(10_000);
        let next = AtomicU64::new(0);
        b.to_async(&rt).iter(|| {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let cache = &cache;
            async move { black_box(cache.get_with(k, async move { k }).await) }
        })
    });
    g.finish();
}

/// Polls every future in `set` once (registering each as a waiter), then releases the work
/// and drains the set.
async fn wait_all<F: std::future::Future>(
    set: &mut FuturesUnordered<F>,
    open: &watch::Sender<bool>,
) -> usize {
    futures::future::poll_fn(|cx| {
        let _ = set.poll_next_unpin(cx);
        Poll::Ready(())
    })
    .await;
    open.send_replace(true);
    let mut n = 0;
    while set.next().await.is_some() {
        n += 1;
    }
    n
}

/// 10,000 waiters on one key: one execution, then every waiter woken and served.
fn many_waiters(c: &mut Criterion) {
    const WAITERS: usize = 10_000;
    let rt = current_thread();
    let mut g = c.benchmark_group("singleflight/one_key");
    g.throughput(Throughput::Elements(WAITERS as u64));
    g.sample_size(20);

    g.bench_function(BenchmarkId::new("tower_singleflight", WAITERS), |b| {
        let group: Group<u64, u64> = Group::new();
        b.to_async(&rt).iter(|| {
            let (open, gate) = watch::channel(false);
            let mut set: FuturesUnordered<_> = (0..WAITERS)
                .map(|_| {
                    let mut gate = gate.clone();
                    group.run(0, move || async move {
                        gate.wait_for(|o| *o).await.unwrap();
                        7
                    })
                })
                .collect();
            async move { assert_eq!(wait_all(&mut set, &open).await, WAITERS) }
        });
        assert!(group.is_empty());
    });

    g.bench_function(BenchmarkId::new("async_singleflight", WAITERS), |b| {
        let group: async_singleflight::UnaryGroup<u64, u64> = async_singleflight::UnaryGroup::new();
        b.to_async(&rt).iter(|| {
            let (open, gate) = watch::channel(false);
            let group = &group;
            let mut set: FuturesUnordered<_> = (0..WAITERS)
                .map(|_| {
                    let mut gate = gate.clone();
                    group.work(&0, async move {
                        gate.wait_for(|o| *o).await.unwrap();
                        7
                    })
                })
                .collect();
            async move { assert_eq!(wait_all(&mut set, &open).await, WAITERS) }
        });
    });

    g.bench_function(BenchmarkId::new("moka_get_with", WAITERS), |b| {
        let cache: moka::future::Cache<u64, u64> = moka::future::Cache::new(10_000);
        b.to_async(&rt).iter(|| {
            let (open, gate) = watch::channel(false);
            let cache = &cache;
            async move {
                cache.invalidate(&0).await;
                let mut set: FuturesUnordered<_> = (0..WAITERS)
                    .map(|_| {
                        let mut gate = gate.clone();
                        cache.get_with(0, async move {
                            gate.wait_for(|o| *o).await.unwrap();
                            7
                        })
                    })
                    .collect();
                assert_eq!(wait_all(&mut set, &open).await, WAITERS)
            }
        });
    });
    g.finish();
}

/// The HTTP layer on unique URLs (nothing to coalesce) against the bare service.
fn http_unique(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("singleflight/http_unique_url");
    g.throughput(Throughput::Elements(1));
    let inner = service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
    });
    let uris: Vec<String> = (0..4096).map(|i| format!("/item/{i}?v=1")).collect();

    g.bench_function("bare", |b| {
        let mut i = 0usize;
        b.to_async(&rt).iter(|| {
            i = (i + 1) % uris.len();
            let req = Request::get(uris[i].as_str())
                .header("host", "bench")
                .body(())
                .unwrap();
            let svc = inner;
            async move {
                let response = svc.oneshot(req).await.unwrap();
                black_box(
                    http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .unwrap(),
                )
            }
        })
    });

    g.bench_function("singleflight", |b| {
        let layer = SingleflightLayer::new();
        let stats = layer.stats();
        let svc = layer.layer(inner);
        let mut i = 0usize;
        b.to_async(&rt).iter(|| {
            i = (i + 1) % uris.len();
            let req = Request::get(uris[i].as_str())
                .header("host", "bench")
                .body(())
                .unwrap();
            let svc = svc.clone();
            async move {
                let response = svc.oneshot(req).await.unwrap();
                black_box(
                    http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .unwrap(),
                )
            }
        });
        assert_eq!(stats.in_flight(), 0);
    });
    g.finish();
}

/// End to end in process: bursts of 100 identical requests to a backend that takes 1 ms,
/// with and without the layer. Prints the backend calls per burst; criterion reports the
/// latency of a whole burst (the slowest request's).
fn http_burst(c: &mut Criterion) {
    use std::sync::{atomic::AtomicUsize, Arc};
    use std::time::Duration;
    const BURST: usize = 100;
    let rt = current_thread();
    let mut g = c.benchmark_group("singleflight/http_burst_100x1ms");
    g.throughput(Throughput::Elements(BURST as u64));
    let calls = Arc::new(AtomicUsize::new(0));
    let backend = {
        let calls = Arc::clone(&calls);
        service_fn(move |_req: Request<()>| {
            calls.fetch_add(1, Ordering::Relaxed);
            async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(&[7; 4096]))))
            }
        })
    };
    let burst = || {
        Request::get("/expensive")
            .header("host", "bench")
            .body(())
            .unwrap()
    };

    let bursts = AtomicUsize::new(0);
    g.bench_function("without_layer", |b| {
        b.to_async(&rt).iter(|| {
            bursts.fetch_add(1, Ordering::Relaxed);
            let all = (0..BURST).map(|_| {
                let svc = backend.clone();
                async move {
                    let response = svc.oneshot(burst()).await.unwrap();
                    http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .unwrap()
                }
            });
            futures::future::join_all(all)
        })
    });
    let n = bursts.swap(0, Ordering::Relaxed).max(1);
    eprintln!(
        "without_layer: {:.1} backend calls per burst of {BURST}",
        calls.swap(0, Ordering::Relaxed) as f64 / n as f64
    );

    let svc = SingleflightLayer::new().layer(backend.clone());
    g.bench_function("with_layer", |b| {
        b.to_async(&rt).iter(|| {
            bursts.fetch_add(1, Ordering::Relaxed);
            let all = (0..BURST).map(|_| {
                let svc = svc.clone();
                async move {
                    let response = svc.oneshot(burst()).await.unwrap();
                    http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .unwrap()
                }
            });
            futures::future::join_all(all)
        })
    });
    let n = bursts.swap(0, Ordering::Relaxed).max(1);
    eprintln!(
        "with_layer: {:.1} backend calls per burst of {BURST}",
        calls.swap(0, Ordering::Relaxed) as f64 / n as f64
    );
    g.finish();
}

criterion_group!(benches, unique_keys, many_waiters, http_unique, http_burst);
criterion_main!(benches);
