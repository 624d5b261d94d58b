//! Peer: axum 0.8 with stock tower 0.5 layers around the whole app, the way the axum docs place a
//! global limit: `HandleErrorLayer` → `LoadShed` → `ConcurrencyLimit` → `Timeout` → `Router`.
//! Each layer is optional, so the same binary is "no limit", "stock `ConcurrencyLimit`" (queues
//! without bound) and "`LoadShed` + `ConcurrencyLimit` + `Timeout`".
//!
//! Routes: `/` (hello), `/healthz`, `/sleep?ms=N`, `/expensive/{key}?ms=N` (a backend call per
//! request, no single-flight), `/spawned-sleep?ms=N` (the work runs in a spawned task that a
//! disconnect does not stop, as with a non-cancellable backend call), `/stats` (JSON counters).
//!
//! `peer-axum --listen 127.0.0.1:8080 [--concurrency-limit N] [--load-shed] [--timeout 30s]`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use clap::Parser;
use tower::limit::ConcurrencyLimitLayer;
use tower::load_shed::error::Overloaded;
use tower::load_shed::LoadShedLayer;
use tower::timeout::error::Elapsed;
use tower::timeout::TimeoutLayer;
use tower::{BoxError, ServiceBuilder};

#[path = "common.rs"]
mod common;

/// Longest `ms` accepted.
const MAX_MS: u64 = 60_000;

/// axum + stock tower layers.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3002")]
    listen: SocketAddr,
    /// tower `ConcurrencyLimit` around the app (0: none).
    #[arg(long, default_value_t = 0)]
    concurrency_limit: usize,
    /// tower `LoadShed` outside the limit: answer 503 instead of queueing.
    #[arg(long)]
    load_shed: bool,
    /// tower `Timeout` inside the limit (e.g. `30s`); none by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Debug, Default)]
struct Stats {
    backend_calls: AtomicU64,
    wasted_ms: AtomicU64,
    completed_ms: AtomicU64,
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, msg).into_response()
}

async fn sleep(uri: Uri) -> Response {
    match common::ms_param(uri.query(), 0, MAX_MS) {
        Ok(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            "slept".into_response()
        }
        Err(e) => bad_request(e),
    }
}

async fn expensive(State(stats): State<Arc<Stats>>, Path(key): Path<String>, uri: Uri) -> Response {
    match common::ms_param(uri.query(), 200, MAX_MS) {
        Ok(ms) => {
            let generation = stats.backend_calls.fetch_add(1, Ordering::Relaxed) + 1;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (
                [("content-type", "application/json")],
                format!("{{\"key\":{key:?},\"generation\":{generation}}}"),
            )
                .into_response()
        }
        Err(e) => bad_request(e),
    }
}

/// Marks the request as abandoned when the handler future is dropped before it finished.
struct LeftGuard(Option<Arc<AtomicBool>>);

impl Drop for LeftGuard {
    fn drop(&mut self) {
        if let Some(left) = self.0.take() {
            left.store(true, Ordering::Relaxed);
        }
    }
}

async fn spawned_sleep(State(stats): State<Arc<Stats>>, uri: Uri) -> Response {
    let ms = match common::ms_param(uri.query(), 0, MAX_MS) {
        Ok(ms) => ms,
        Err(e) => return bad_request(e),
    };
    let left = Arc::new(AtomicBool::new(false));
    let mut guard = LeftGuard(Some(left.clone()));
    let work = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        stats.completed_ms.fetch_add(ms, Ordering::Relaxed);
        if left.load(Ordering::Relaxed) {
            stats.wasted_ms.fetch_add(ms, Ordering::Relaxed);
        }
    });
    let _ = work.await;
    // Finished with the client still there: disarm.
    guard.0 = None;
    "slept".into_response()
}

async fn stats(State(stats): State<Arc<Stats>>) -> Response {
    (
        [("content-type", "application/json")],
        format!(
            "{{\"backend_calls\":{},\"wasted_ms\":{},\"completed_ms\":{}}}",
            stats.backend_calls.load(Ordering::Relaxed),
            stats.wasted_ms.load(Ordering::Relaxed),
            stats.completed_ms.load(Ordering::Relaxed)
        ),
    )
        .into_response()
}

async fn handle_error(err: BoxError) -> (StatusCode, &'static str) {
    if err.is::<Overloaded>() {
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
    } else if err.is::<Elapsed>() {
        (StatusCode::GATEWAY_TIMEOUT, "timed out")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/", get(|| async { "Hello, World!" }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/sleep", get(sleep))
        .route("/expensive/{key}", get(expensive))
        .route("/spawned-sleep", get(spawned_sleep))
        .route("/stats", get(stats))
        .with_state(Arc::new(Stats::default()));
    let svc = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(handle_error))
        .option_layer(args.load_shed.then(LoadShedLayer::new))
        .option_layer(
            (args.concurrency_limit > 0)
                .then(|| ConcurrencyLimitLayer::new(args.concurrency_limit)),
        )
        .option_layer(args.timeout.map(TimeoutLayer::new))
        .map_err(|never: Infallible| -> BoxError { match never {} })
        .service(app);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    axum::serve(listener, tower::make::Shared::new(svc)).await?;
    Ok(())
}
