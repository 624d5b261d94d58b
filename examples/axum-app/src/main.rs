//! An ordinary axum application, the kind our users already have, that adds the
//! tower-scale layers one at a time. Each layer is added in [`app`] with a comment saying
//! why it sits where it does; see README.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::{routing::get, BoxError, Router};
use serde::Deserialize;
use tower::ServiceBuilder;
use tower_abort::{AbortLayer, AbortReason, AbortRoot, AbortSignal};
use tower_backpressure::BackpressureLayer;
use tower_singleflight::{SingleflightLayer, WaitTimeoutPolicy};
use tower_zerocopy::{SendfileListener, ServeDir, WithSendfile};

/// How long in-flight requests may keep running after a shutdown signal before their
/// `AbortSignal`s fire with `Shutdown`.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The directory served under `/static` (`AXUM_APP_STATIC_ROOT`, default: the shipped demo folder).
fn static_root() -> PathBuf {
    std::env::var_os("AXUM_APP_STATIC_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/static").into())
}

/// Builds the application: plain handlers first, then our layers, outermost last.
///
/// `abort_root` is the server-wide parent of every request's cancellation signal; `main`
/// shuts it down when the drain grace runs out.
fn app(abort_root: &AbortRoot) -> Router {
    app_with(abort_root, backpressure(256, 512), Arc::default())
}

/// tower-backpressure: one concurrency budget for the whole app, a bounded queue, and
/// `503` + `Retry-After` beyond it. `Router::layer` is enough: the layer's state is shared
/// by every route and every connection, and it needs no `HandleErrorLayer`. Health checks
/// bypass it so an overloaded instance is not also declared dead. It reads each request's
/// deadline from tower-abort's signal, so a request that cannot finish in time is shed
/// before it waits.
fn backpressure(max_in_flight: usize, max_queued: usize) -> BackpressureLayer {
    BackpressureLayer::builder(max_in_flight)
        .max_queued(max_queued)
        .queue_timeout(Duration::from_secs(1))
        .bypass(|head| head.uri().path() == "/healthz")
        .deadline(|head| head.extensions().get::<AbortSignal>()?.deadline())
        .build()
}

/// [`app`] with the given backpressure layer, counting the computations of `/summary` in
/// `summary_generations`.
fn app_with(
    abort_root: &AbortRoot,
    backpressure: BackpressureLayer,
    summary_generations: Arc<AtomicU64>,
) -> Router {
    Router::new()
        .route("/", get(|| async { "Hello, World!" }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/report", get(report))
        .route("/summary", get(summary).with_state(summary_generations))
        // Inside tower-abort (layers added later wrap earlier ones), so the signal and its
        // deadline are in the request's extensions when the limiter looks.
        .layer(backpressure)
        // tower-singleflight: concurrent identical GETs run the handler once and share the
        // streamed response. Outside the limiter, so followers wait without holding a
        // permit: a burst of identical requests costs one slot. Safe by default: requests
        // with credentials and responses with Set-Cookie or Cache-Control: private are never
        // shared. Its errors (a shared upstream error, a panicking handler) become 502s.
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|err: BoxError| async move {
                    (StatusCode::BAD_GATEWAY, err.to_string())
                }))
                .layer(
                    SingleflightLayer::new()
                        .max_wait(Duration::from_secs(10), WaitTimeoutPolicy::OwnCall)
                        .max_followers(10_000)
                        .max_keys(100_000),
                ),
        )
        // tower-abort: every request gets an `AbortSignal` that fires when the client goes
        // away, after 10 s (or sooner if the client sent `grpc-timeout`), or on shutdown.
        // `Router::layer` wraps each route, so 404s cost nothing; every route shares the
        // one root. Disconnects are logged as 499, the status nginx uses for them.
        .layer(
            AbortLayer::with_root(abort_root.clone())
                .with_timeout(Duration::from_secs(10))
                .with_grpc_timeout(true)
                .on_abort(|event| {
                    tracing::info!(
                        status = event.status(),
                        method = %event.method(),
                        uri = ?event.uri(),
                        elapsed = ?event.elapsed(),
                        reason = %event.reason(),
                        "request aborted"
                    );
                }),
        )
        // tower-zerocopy: static files with ranges, validators and path confinement. Large
        // files go out with sendfile(2) when served through `SendfileListener` (see `main`).
        // Added after the layers on purpose: `Router::layer` wraps only the routes added before
        // it, and singleflight must not replay a sendfile-mapped body to other connections
        // (an HTTP/2 follower would read the mapped pages).
        .nest_service("/static", ServeDir::new(static_root()))
}

#[derive(Deserialize)]
struct ReportParams {
    rows: Option<u32>,
}

/// Builds a "report" one row per millisecond, stopping at once when the request's signal
/// fires: a client that hangs up frees the work instead of leaving it running.
async fn report(signal: AbortSignal, Query(params): Query<ReportParams>) -> (StatusCode, String) {
    let rows = params.rows.unwrap_or(100);
    for done in 0..rows {
        tokio::select! {
            reason = signal.aborted() => {
                let status = match reason {
                    AbortReason::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
                    // A timeout becomes a 504 in the layer; a client that left reads nothing.
                    _ => StatusCode::GATEWAY_TIMEOUT,
                };
                return (status, format!("stopped after {done} rows: {reason}\n"));
            }
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
    }
    (StatusCode::OK, format!("{rows} rows\n"))
}

/// An expensive handler: many clients asking at once should cost one computation. The
/// state counts how many times it was actually computed.
async fn summary(State(generations): State<Arc<AtomicU64>>) -> String {
    let generation = generations.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(200)).await;
    format!("summary generation {generation}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let addr: SocketAddr = std::env::var("AXUM_APP_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:3001".to_owned())
        .parse()?;
    // tower-zerocopy: a listener whose connections send file slices with sendfile(2), and
    // `WithSendfile` to tell the static-file service which requests may use it.
    let listener = SendfileListener::bind(addr).await?;
    tracing::info!(%addr, "axum-app listening");
    let abort_root = AbortRoot::new();
    let root = abort_root.clone();
    axum::serve(listener, WithSendfile::new(app(&abort_root)))
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            // axum now stops accepting and waits for in-flight requests; those still
            // running after the grace are told to stop (they see `Shutdown`).
            tokio::spawn(async move {
                tokio::time::sleep(DRAIN_GRACE).await;
                root.shutdown();
            });
        })
        .await?;
    let stats = abort_root.stats();
    for (reason, count) in stats.iter() {
        tracing::info!(reason = reason.as_str(), count, "abort_total");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tokio_test::{assert_pending, task};
    use tower::{Service, ServiceExt};

    #[tokio::test]
    async fn hello_world() {
        let response = app(&AbortRoot::new())
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Hello, World!");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_summaries_are_computed_once() {
        let generations = Arc::new(AtomicU64::new(0));
        let app = app_with(
            &AbortRoot::new(),
            backpressure(256, 512),
            Arc::clone(&generations),
        );
        let requests: Vec<_> = (0..50)
            .map(|_| {
                let app = app.clone();
                tokio::spawn(async move {
                    let response = app
                        .oneshot(Request::get("/summary").body(Body::empty()).unwrap())
                        .await
                        .unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    response.into_body().collect().await.unwrap().to_bytes()
                })
            })
            .collect();
        for request in requests {
            assert_eq!(request.await.unwrap(), "summary generation 1".as_bytes());
        }
        assert_eq!(generations.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn summaries_with_credentials_are_not_coalesced() {
        let generations = Arc::new(AtomicU64::new(0));
        let app = app_with(
            &AbortRoot::new(),
            backpressure(256, 512),
            Arc::clone(&generations),
        );
        let ask = |token: &'static str| {
            let app = app.clone();
            tokio::spawn(async move {
                let request = Request::get("/summary")
                    .header("authorization", token)
                    .body(Body::empty())
                    .unwrap();
                app.oneshot(request).await.unwrap().status()
            })
        };
        let (a, b) = (ask("Bearer alice"), ask("Bearer bob"));
        assert_eq!(a.await.unwrap(), StatusCode::OK);
        assert_eq!(b.await.unwrap(), StatusCode::OK);
        assert_eq!(generations.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn backpressure_sheds_beyond_the_limit_but_not_health_checks() {
        let layer = backpressure(1, 0);
        let handle = layer.handle();
        let app = app_with(&AbortRoot::new(), layer, Arc::default());
        let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
        // The permit is held until the response body is read, so an unread body keeps
        // the one slot busy.
        let first = app.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(handle.in_flight(), 1);
        let shed = app.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(shed.headers().contains_key("retry-after"));
        let health = app.clone().oneshot(get("/healthz")).await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Hello, World!");
        assert_eq!(handle.in_flight(), 0);
        let again = app.oneshot(get("/")).await.unwrap();
        assert_eq!(again.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn backpressure_sheds_requests_whose_abort_deadline_has_passed() {
        let layer = backpressure(4, 4);
        let handle = layer.handle();
        let app = app_with(&AbortRoot::new(), layer, Arc::default());
        // tower-abort turns `grpc-timeout` into the signal's deadline; the limiter reads it
        // and does not start work that cannot finish in time.
        let request = Request::get("/")
            .header("grpc-timeout", "0m")
            .body(Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            handle.shed_count(tower_backpressure::ShedReason::DeadlineUnreachable),
            1
        );
    }

    #[tokio::test]
    async fn static_files_are_served() {
        let response = app(&AbortRoot::new())
            .oneshot(
                Request::get("/static/index.html")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/html");
        assert!(response.headers().contains_key("etag"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            &std::fs::read(static_root().join("index.html")).unwrap()[..]
        );
        let response = app(&AbortRoot::new())
            .oneshot(
                Request::get("/static/../Cargo.toml")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }

    /// Through the real listener a large file goes out with sendfile(2).
    #[tokio::test]
    async fn large_static_file_uses_sendfile() {
        let dir = std::env::temp_dir().join(format!("axum-app-static-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("big.bin"), &data).unwrap();
        let app = Router::new().nest_service("/static", ServeDir::new(&dir));
        let listener = SendfileListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, stats) = (listener.local_addr().unwrap(), listener.stats());
        let server =
            tokio::spawn(async move { axum::serve(listener, WithSendfile::new(app)).await });

        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/static/big.bin")
            .header("host", "localhost")
            .body(http_body_util::Empty::<axum::body::Bytes>::new())
            .unwrap();
        let response = send.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], &data[..]);
        // All but the last bytes, which are copied after checking the file (`checked_ends`).
        assert_eq!(
            stats.sendfile_bytes() + stats.held_back_bytes(),
            data.len() as u64,
            "{stats:?}"
        );
        assert!(stats.held_back_bytes() < data.len() as u64, "{stats:?}");
        assert_eq!(stats.checked_ends(), 1, "{stats:?}");
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn unknown_path_is_404() {
        let response = app(&AbortRoot::new())
            .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test(start_paused = true)]
    async fn report_completes_without_aborting() {
        let root = AbortRoot::new();
        let response = app(&root)
            .oneshot(Request::get("/report?rows=5").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"5 rows\n");
        assert_eq!(root.stats().total(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn client_deadline_ends_the_report_with_504() {
        let root = AbortRoot::new();
        let request = Request::get("/report?rows=100000")
            .header("grpc-timeout", "50m")
            .body(Body::empty())
            .unwrap();
        let response = app(&root).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(root.stats().get(AbortReason::DeadlineExceeded), 1);
    }

    /// Starts a `/report` long enough to still be running when the test acts on it.
    async fn start_long_report(
        root: &AbortRoot,
    ) -> task::Spawn<
        impl std::future::Future<Output = Result<axum::response::Response, std::convert::Infallible>>,
    > {
        let mut app = app(root);
        let request = Request::get("/report?rows=100000")
            .body(Body::empty())
            .unwrap();
        task::spawn(
            ServiceExt::<Request<Body>>::ready(&mut app)
                .await
                .unwrap()
                .call(request),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn client_that_leaves_frees_the_work_and_is_counted() {
        let root = AbortRoot::new();
        let mut call = start_long_report(&root).await;
        assert_pending!(call.poll());
        drop(call);
        assert_eq!(root.stats().get(AbortReason::ClientGone), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_a_running_report_with_503() {
        let root = AbortRoot::new();
        let mut call = start_long_report(&root).await;
        assert_pending!(call.poll());
        root.shutdown();
        let response = call.await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(root.stats().get(AbortReason::Shutdown), 1);
    }
}
