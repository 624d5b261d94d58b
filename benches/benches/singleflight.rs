//! tower-singleflight: the core's per-call overhead for unique keys against a direct call,
//! `async_singleflight` and moka's `get_with`; 10,000 waiters on one key; and the HTTP
//! layer's overhead against the bare service for unique URLs and for requests that bypass
//! it (a `POST`, and a `GET` the key function leaves out).
//!
//! Run with `cargo bench -p benches --bench singleflight`.
//!
//! The same binary also counts instructions per call under callgrind, which a noisy machine
//! does not disturb: `SINGLEFLIGHT_ICOUNT=<case>` runs one case `SINGLEFLIGHT_ICOUNT_N` times
//! (default 100,000; the `one_key` cases run N / 10,000 rounds of 10,000 waiters) inside
//! `icount_loop` instead of the criterion suite:
//!
//! ```sh
//! SINGLEFLIGHT_ICOUNT=core/tower_singleflight valgrind --tool=callgrind \
//!     --callgrind-out-file=/dev/null --toggle-collect='*icount_loop*' \
//!     target/release/deps/singleflight-<hash>
//! ```
//!
//! and divide the reported `Collected` count by N. `SINGLEFLIGHT_ICOUNT=list` lists the cases.

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::{
    convert::Infallible,
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    task::Poll,
};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use futures::{stream::FuturesUnordered, StreamExt};
use http::{Method, Request, Response};
use http_body_util::Full;
use tokio::{runtime::Runtime, sync::watch};
use tower::{service_fn, Layer, ServiceExt};
use tower_singleflight::{DefaultKey, Group, KeyFn, RequestKey, SingleflightLayer};

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

/// The inner service of the HTTP benches: a small fixed body, no work.
fn hello_service() -> impl tower::Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
    })
}

/// Shared bytes, as hyper hands a request's parts over: slices of its read buffer, so a
/// clone is a reference-count increment, not a copy.
fn shared(text: &str) -> Bytes {
    let bytes = Bytes::from(text.as_bytes().to_vec());
    // The first clone turns a `Vec`-backed `Bytes` into a shared one; later clones count.
    drop(bytes.clone());
    bytes
}

/// The parts of the requests the HTTP benches send, made once.
struct Wire {
    uris: Vec<Bytes>,
    post: Bytes,
    no_key: Bytes,
    host: Bytes,
    user_agent: Bytes,
    accept: Bytes,
    accept_encoding: Bytes,
}

impl Wire {
    fn new() -> Self {
        Self {
            uris: (0..4096)
                .map(|i| shared(&format!("/item/{i}?v=1")))
                .collect(),
            post: shared("/items"),
            no_key: shared("/sleep?ms=0"),
            host: shared("bench"),
            user_agent: shared("bench/1.0"),
            accept: shared("*/*"),
            accept_encoding: shared("gzip, br"),
        }
    }

    /// A request as a plain client sends it (`Host` and a few common headers), built the
    /// way hyper builds one from its read buffer.
    fn request(&self, method: Method, uri: &Bytes) -> Request<()> {
        let value = |v: &Bytes| http::HeaderValue::from_maybe_shared(v.clone()).unwrap();
        let mut req = Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = http::Uri::from_maybe_shared(uri.clone()).unwrap();
        let headers = req.headers_mut();
        headers.reserve(4);
        headers.insert(http::header::HOST, value(&self.host));
        headers.insert(http::header::USER_AGENT, value(&self.user_agent));
        headers.insert(http::header::ACCEPT, value(&self.accept));
        headers.insert(http::header::ACCEPT_ENCODING, value(&self.accept_encoding));
        req
    }
}

/// The example server's key function: only `/expensive/...` coalesces.
fn expensive_only(uri: &http::Uri, headers: &http::HeaderMap) -> Option<RequestKey> {
    if !uri.path().starts_with("/expensive/") {
        return None;
    }
    DefaultKey::new().key(uri, headers)
}

/// Sends one request through `svc` and reads the whole response body.
async fn send<S, B>(svc: S, req: Request<()>) -> Bytes
where
    S: tower::Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let response = svc.oneshot(req).await.unwrap();
    http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes()
}

/// The HTTP layer on unique URLs (nothing to coalesce) against the bare service.
fn http_unique(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("singleflight/http_unique_url");
    g.throughput(Throughput::Elements(1));
    let inner = hello_service();
    let wire = Wire::new();
    let uris = &wire.uris;

    g.bench_function("bare", |b| {
        let mut i = 0usize;
        b.to_async(&rt).iter(|| {
            i = (i + 1) % uris.len();
            black_box(send(inner.clone(), wire.request(Method::GET, &uris[i])))
        })
    });

    g.bench_function("singleflight", |b| {
        let layer = SingleflightLayer::new();
        let stats = layer.stats();
        let svc = layer.layer(inner.clone());
        let mut i = 0usize;
        b.to_async(&rt).iter(|| {
            i = (i + 1) % uris.len();
            black_box(send(svc.clone(), wire.request(Method::GET, &uris[i])))
        });
        assert_eq!(stats.in_flight(), 0);
    });
    g.finish();
}

/// Requests the layer lets through untouched: a `POST`, and a `GET` of a route the key
/// function leaves out (as in the example server, which puts the layer on every request
/// and keys only `/expensive/...`). Each against the bare service in the same run.
fn http_bypass(c: &mut Criterion) {
    let rt = current_thread();
    let mut g = c.benchmark_group("singleflight/http_bypass");
    g.throughput(Throughput::Elements(1));
    let inner = hello_service();
    let plain = SingleflightLayer::new().layer(inner.clone());
    let keyed = SingleflightLayer::new()
        .key_fn(expensive_only as fn(&http::Uri, &http::HeaderMap) -> Option<RequestKey>)
        .layer(inner.clone());

    let wire = Wire::new();
    let post = || wire.request(Method::POST, &wire.post);
    let no_key = || wire.request(Method::GET, &wire.no_key);

    g.bench_function("bare_post", |b| {
        b.to_async(&rt)
            .iter(|| black_box(send(inner.clone(), post())))
    });
    g.bench_function("singleflight_post", |b| {
        b.to_async(&rt)
            .iter(|| black_box(send(plain.clone(), post())))
    });
    g.bench_function("bare_get", |b| {
        b.to_async(&rt)
            .iter(|| black_box(send(inner.clone(), no_key())))
    });
    g.bench_function("singleflight_get_no_key", |b| {
        b.to_async(&rt)
            .iter(|| black_box(send(keyed.clone(), no_key())))
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

criterion_group!(
    benches,
    unique_keys,
    many_waiters,
    http_unique,
    http_bypass,
    http_burst
);

fn main() {
    if let Ok(case) = std::env::var("SINGLEFLIGHT_ICOUNT") {
        let n = std::env::var("SINGLEFLIGHT_ICOUNT_N")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(100_000);
        icount::run(&case, n);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

/// The callgrind cases (see the module docs): each runs `n` calls inside `icount_loop`,
/// the only function whose instructions callgrind collects.
mod icount {
    use super::*;

    const CASES: &[&str] = &[
        "core/direct",
        "core/tower_singleflight",
        "core/async_singleflight",
        "core/moka_get_with",
        "one_key/tower_singleflight",
        "one_key/async_singleflight",
        "one_key/moka_get_with",
        "http/bare_get_unique",
        "http/singleflight_get_unique",
        "http/bare_post",
        "http/singleflight_post",
        "http/bare_get_no_key",
        "http/singleflight_get_no_key",
    ];

    pub(super) fn run(case: &str, n: u64) {
        if case == "list" {
            CASES.iter().for_each(|case| println!("{case}"));
            return;
        }
        assert!(CASES.contains(&case), "unknown case {case:?}; try `list`");
        let rt = current_thread();
        let wire = Wire::new();
        let inner = hello_service();
        // Built outside the counted loop, as a server builds its stack once.
        let plain = SingleflightLayer::new().layer(inner.clone());
        let keyed = SingleflightLayer::new()
            .key_fn(expensive_only as fn(&http::Uri, &http::HeaderMap) -> Option<RequestKey>)
            .layer(inner.clone());
        let group: Group<u64, u64> = Group::new();
        let async_group: async_singleflight::UnaryGroup<u64, u64> =
            async_singleflight::UnaryGroup::new();
        let cache: moka::future::Cache<u64, u64> = moka::future::Cache::new(10_000);
        let n = if case.starts_with("one_key/") {
            (n / ONE_KEY_WAITERS as u64).max(1)
        } else {
            n
        };
        let calls = icount_loop(&rt, n, |i| {
            let uri = &wire.uris[i as usize % wire.uris.len()];
            let wire = &wire;
            let (group, async_group, cache) = (&group, &async_group, &cache);
            let (inner, plain, keyed) = (inner.clone(), plain.clone(), keyed.clone());
            async move {
                match case {
                    "core/direct" => black_box(async move { i }.await),
                    "core/tower_singleflight" => {
                        black_box(group.run(i, move || async move { i }).await.unwrap())
                    }
                    "core/async_singleflight" => {
                        black_box(async_group.work(&i, async move { i }).await)
                    }
                    "core/moka_get_with" => black_box(cache.get_with(i, async move { i }).await),
                    "one_key/tower_singleflight" => {
                        one_key(|mut gate| {
                            group.run(0, move || async move {
                                gate.wait_for(|o| *o).await.unwrap();
                                7
                            })
                        })
                        .await
                    }
                    "one_key/async_singleflight" => {
                        one_key(|mut gate| {
                            async_group.work(&0, async move {
                                gate.wait_for(|o| *o).await.unwrap();
                                7
                            })
                        })
                        .await
                    }
                    "one_key/moka_get_with" => {
                        cache.invalidate(&0).await;
                        one_key(|mut gate| {
                            cache.get_with(0, async move {
                                gate.wait_for(|o| *o).await.unwrap();
                                7
                            })
                        })
                        .await
                    }
                    "http/bare_get_unique" => {
                        send(inner, wire.request(Method::GET, uri)).await.len() as u64
                    }
                    "http/singleflight_get_unique" => {
                        send(plain, wire.request(Method::GET, uri)).await.len() as u64
                    }
                    "http/bare_post" => send(inner, wire.request(Method::POST, &wire.post))
                        .await
                        .len() as u64,
                    "http/singleflight_post" => send(plain, wire.request(Method::POST, &wire.post))
                        .await
                        .len() as u64,
                    "http/bare_get_no_key" => send(inner, wire.request(Method::GET, &wire.no_key))
                        .await
                        .len() as u64,
                    "http/singleflight_get_no_key" => {
                        send(keyed, wire.request(Method::GET, &wire.no_key))
                            .await
                            .len() as u64
                    }
                    _ => unreachable!("checked above"),
                }
            }
        });
        assert!(group.is_empty());
        let per = if case.starts_with("one_key/") {
            format!("{} rounds of {ONE_KEY_WAITERS} waiters", calls)
        } else {
            format!("{calls} calls")
        };
        eprintln!("{case}: {per}");
    }

    const ONE_KEY_WAITERS: usize = 10_000;

    /// One round of `ONE_KEY_WAITERS` waiters on one key.
    async fn one_key<F, Fut, T>(mut make: F) -> u64
    where
        F: FnMut(watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let (open, gate) = watch::channel(false);
        let mut set: FuturesUnordered<_> =
            (0..ONE_KEY_WAITERS).map(|_| make(gate.clone())).collect();
        assert_eq!(wait_all(&mut set, &open).await, ONE_KEY_WAITERS);
        1
    }

    /// Runs `call` `n` times on `rt`.
    #[inline(never)]
    fn icount_loop<F, Fut>(rt: &Runtime, n: u64, mut call: F) -> u64
    where
        F: FnMut(u64) -> Fut,
        Fut: std::future::Future<Output = u64>,
    {
        rt.block_on(async {
            let mut done = 0;
            for i in 0..n {
                black_box(call(i).await);
                done += 1;
            }
            done
        })
    }
}
