//! An ordinary axum application, the kind our users already have, that adds the
//! tower-scale layers one at a time. Each layer is added in [`app`] with a comment saying
//! why it sits where it does; see README.md.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    error_handling::HandleErrorLayer, extract::State, http::StatusCode, routing::get, BoxError,
    Router,
};
use tower::ServiceBuilder;
use tower_singleflight::{SingleflightLayer, WaitTimeoutPolicy};

/// An expensive handler: many clients asking at once should cost one computation. The
/// state counts how many times it was actually computed.
async fn report(State(generations): State<Arc<AtomicU64>>) -> String {
    let generation = generations.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(200)).await;
    format!("report generation {generation}")
}

/// Builds the application: plain handlers first, then our layers, outermost last.
fn app() -> Router {
    app_with(Arc::default())
}

/// [`app`], counting report computations in `report_generations`.
fn app_with(report_generations: Arc<AtomicU64>) -> Router {
    Router::new()
        .route("/", get(|| async { "Hello, World!" }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/report", get(report).with_state(report_generations))
        // tower-singleflight: concurrent identical GETs run the handler once and share the
        // streamed response. It sits outermost among our layers so coalesced requests
        // skip the work of every layer inside it. Safe by default: requests with
        // credentials and responses with Set-Cookie or Cache-Control: private are never
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
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "axum-app listening");
    axum::serve(listener, app())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn hello_world() {
        let response = app()
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Hello, World!");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_reports_are_computed_once() {
        let generations = Arc::new(AtomicU64::new(0));
        let app = app_with(Arc::clone(&generations));
        let requests = (0..50).map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let response = app
                    .oneshot(Request::get("/report").body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                response.into_body().collect().await.unwrap().to_bytes()
            })
        });
        let bodies: Vec<_> = futures_join_all(requests).await;
        assert_eq!(generations.load(Ordering::SeqCst), 1);
        let expected = "report generation 1";
        for body in bodies {
            assert_eq!(body, expected.as_bytes());
        }
    }

    #[tokio::test]
    async fn requests_with_credentials_are_not_coalesced() {
        let generations = Arc::new(AtomicU64::new(0));
        let app = app_with(Arc::clone(&generations));
        let ask = |token: &'static str| {
            let app = app.clone();
            tokio::spawn(async move {
                let request = Request::get("/report")
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

    async fn futures_join_all<T>(
        handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
    ) -> Vec<T> {
        let handles: Vec<_> = handles.collect();
        let mut out = Vec::with_capacity(handles.len());
        for handle in handles {
            out.push(handle.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn unknown_path_is_404() {
        let response = app()
            .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
}
