//! Overload soak for tower-backpressure: 50,000 requests at 10x the concurrency limit
//! against a real axum server on 127.0.0.1, once with `BackpressureLayer` and once with
//! stock tower `ConcurrencyLimit` wrapping the whole app (the placement where tower's limit
//! is shared). Reports peak RSS, answer statuses, and the p99 latency of admitted requests
//! against the unloaded p99 measured first at half the limit.
//!
//! Each layer runs in its own child process so peak RSS is per layer:
//!
//! ```sh
//! cargo run --release -p benches --bin backpressure_soak -- [requests] [limit] [service_ms]
//! ```
//!
//! Defaults: 50,000 requests, limit 50, 50 ms handler. Clients are closed-loop keep-alive
//! HTTP/1.1 connections, 10 x limit of them; a client answered `503` retries after one
//! handler time (`[retry_ms]`, 4th argument). Server and clients run on separate runtimes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tower::ServiceBuilder;
use tower_backpressure::{BackpressureLayer, QueueOrder};

#[derive(Clone, Copy, Debug)]
struct Params {
    requests: usize,
    limit: usize,
    service: Duration,
    retry: Duration,
}

fn params() -> Params {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize, default: u64| {
        args.get(i)
            .and_then(|a| a.parse::<u64>().ok())
            .unwrap_or(default)
    };
    Params {
        requests: num(1, 50_000) as usize,
        limit: num(2, 50) as usize,
        service: Duration::from_millis(num(3, 50)),
        retry: Duration::from_millis(num(4, num(3, 50))),
    }
}

fn app(
    layer: &str,
    p: Params,
) -> (
    axum::routing::IntoMakeService<Router>,
    Option<tower_backpressure::BackpressureHandle>,
) {
    let service = p.service;
    let router = Router::new().route(
        "/",
        get(move || async move {
            tokio::time::sleep(service).await;
            "ok"
        }),
    );
    match layer {
        "backpressure" => {
            // Sized as the crate docs advise: `max_in_flight x (extra latency accepted /
            // service time)`; half a service time of queueing keeps admitted latency
            // within 1.5x of unloaded by construction.
            let layer = BackpressureLayer::builder(p.limit)
                .max_queued(p.limit / 2)
                .queue_order(QueueOrder::adaptive())
                .build();
            let handle = layer.handle();
            (router.layer(layer).into_make_service(), Some(handle))
        }
        "tower" => {
            // Wrapping the whole app is the one placement where tower's limit is shared.
            let limited = ServiceBuilder::new()
                .map_response(IntoResponse::into_response)
                .concurrency_limit(p.limit)
                .service(router);
            let app = Router::new().fallback_service(limited).into_make_service();
            (app, None)
        }
        other => panic!("unknown layer {other}"),
    }
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Tally {
    ok: Vec<Duration>,
    shed: usize,
    other: usize,
}

/// `connections` closed-loop clients sharing a budget of `total` requests.
async fn load(addr: SocketAddr, connections: usize, total: usize, retry: Duration) -> Tally {
    let remaining = Arc::new(AtomicUsize::new(total));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let remaining = remaining.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            'connect: loop {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    continue;
                };
                tokio::spawn(conn);
                loop {
                    if remaining
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_err()
                    {
                        return tally;
                    }
                    let request = http::Request::get("/")
                        .header("host", "soak")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let started = Instant::now();
                    if sender.ready().await.is_err() {
                        tally.other += 1;
                        continue 'connect;
                    }
                    match sender.send_request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            let _ = response.into_body().collect().await;
                            match status.as_u16() {
                                200 => tally.ok.push(started.elapsed()),
                                503 => {
                                    tally.shed += 1;
                                    tokio::time::sleep(retry).await;
                                }
                                _ => tally.other += 1,
                            }
                        }
                        Err(_) => {
                            tally.other += 1;
                            continue 'connect;
                        }
                    }
                }
            }
        }));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await.unwrap();
        all.ok.extend(t.ok);
        all.shed += t.shed;
        all.other += t.other;
    }
    all
}

/// The `q` quantile (nearest rank) of `latencies`, which must be sorted.
fn quantile(latencies: &[Duration], q: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((latencies.len() as f64) * q).ceil() as usize;
    latencies[rank.saturating_sub(1)]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn run_one(layer: &str, p: Params) {
    // The server gets its own runtime so client scheduling does not show up as its latency.
    let server_rt = runtime();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (make, handle) = app(layer, p);
    let server = server_rt.spawn(async move { axum::serve(listener, make).await.unwrap() });
    runtime().block_on(async {
        // Unloaded: half the limit, so nothing ever waits.
        let mut unloaded = load(addr, (p.limit / 2).max(1), 2_000, p.retry).await;
        unloaded.ok.sort();
        let unloaded_p99 = quantile(&unloaded.ok, 0.99);
        let unloaded_p50 = quantile(&unloaded.ok, 0.50);
        let rss_before = rss_kib("VmRSS:");

        let started = Instant::now();
        let mut loaded = load(addr, p.limit * 10, p.requests, p.retry).await;
        let elapsed = started.elapsed();
        loaded.ok.sort();
        let loaded_p99 = quantile(&loaded.ok, 0.99);
        let loaded_p50 = quantile(&loaded.ok, 0.50);
        server.abort();
        println!(
            "{layer:>12}: {} requests at {} connections (limit {}, {:?} handler) in {:.1}s: \
             200={} 503={} other={}; admitted p50 {:.1} ms (unloaded {:.1} ms); \
             p99 admitted {:.1} ms vs unloaded {:.1} ms ({:.2}x); \
             RSS before load {} KiB, peak {} KiB",
            p.requests,
            p.limit * 10,
            p.limit,
            p.service,
            elapsed.as_secs_f64(),
            loaded.ok.len(),
            loaded.shed,
            loaded.other,
            loaded_p50.as_secs_f64() * 1e3,
            unloaded_p50.as_secs_f64() * 1e3,
            loaded_p99.as_secs_f64() * 1e3,
            unloaded_p99.as_secs_f64() * 1e3,
            loaded_p99.as_secs_f64() / unloaded_p99.as_secs_f64().max(1e-9),
            rss_before,
            rss_kib("VmHWM:"),
        );
        if let Some(h) = handle {
            let (wait, service) = (h.queue_wait(), h.service_time());
            println!(
                "{:>12}  server side: queue wait p50 {:?} p99 {:?} max {:?}; \
                 service time p50 {:?} p99 {:?}; shed queue_full={} queue_timeout={}",
                "",
                wait.p50,
                wait.p99,
                wait.max,
                service.p50,
                service.p99,
                h.shed_count(tower_backpressure::ShedReason::QueueFull),
                h.shed_count(tower_backpressure::ShedReason::QueueTimeout),
            );
        }
    });
}

fn main() -> Result<(), Infallible> {
    let p = params();
    if let Ok(layer) = std::env::var("BACKPRESSURE_SOAK_LAYER") {
        run_one(&layer, p);
        return Ok(());
    }
    let exe = std::env::current_exe().expect("own executable");
    for layer in ["backpressure", "tower"] {
        let status = std::process::Command::new(&exe)
            .args(std::env::args().skip(1))
            .env("BACKPRESSURE_SOAK_LAYER", layer)
            .status()
            .expect("run the soak child");
        assert!(status.success(), "{layer} soak failed");
    }
    Ok(())
}
