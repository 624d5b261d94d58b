//! An ordinary axum application, the kind our users already have, that adds the
//! tower-scale layers one at a time. Each layer is added in [`app`] with a comment saying
//! why it sits where it does; see README.md.

use std::net::SocketAddr;
use std::time::Duration;

use axum::{routing::get, Router};
use tower_backpressure::BackpressureLayer;

/// Builds the application: plain handlers first, then our layers, outermost last.
fn app() -> Router {
    app_with(backpressure(256, 512))
}

/// tower-backpressure: one concurrency budget for the whole app, a bounded queue, and
/// `503` + `Retry-After` beyond it. `Router::layer` is enough: the layer's state is shared
/// by every route and every connection, and it needs no `HandleErrorLayer`. Health checks
/// bypass it so an overloaded instance is not also declared dead.
fn backpressure(max_in_flight: usize, max_queued: usize) -> BackpressureLayer {
    BackpressureLayer::builder(max_in_flight)
        .max_queued(max_queued)
        .queue_timeout(Duration::from_secs(1))
        .bypass(|head| head.uri().path() == "/healthz")
        .build()
}

fn app_with(backpressure: BackpressureLayer) -> Router {
    Router::new()
        .route("/", get(|| async { "Hello, World!" }))
        .route("/healthz", get(|| async { "ok" }))
        .layer(backpressure)
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

    #[tokio::test]
    async fn backpressure_sheds_beyond_the_limit_but_not_health_checks() {
        let layer = backpressure(1, 0);
        let handle = layer.handle();
        let app = app_with(layer);
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

    #[tokio::test]
    async fn unknown_path_is_404() {
        let response = app()
            .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
}
