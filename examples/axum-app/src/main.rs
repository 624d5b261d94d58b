//! An ordinary axum application, the kind our users already have, that adds the
//! tower-scale layers one at a time. Each layer is added in [`app`] with a comment saying
//! why it sits where it does; see README.md.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::{routing::get, Router};
use tower_zerocopy::{SendfileListener, ServeDir, WithSendfile};

/// The directory served under `/static` (`AXUM_APP_STATIC_ROOT`, default: the shipped demo folder).
fn static_root() -> PathBuf {
    std::env::var_os("AXUM_APP_STATIC_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/static").into())
}

/// Builds the application: plain handlers first, then our layers, outermost last.
fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "Hello, World!" }))
        .route("/healthz", get(|| async { "ok" }))
        // tower-zerocopy: static files with ranges, validators and path confinement. Large
        // files go out with sendfile(2) when served through `SendfileListener` (see `main`).
        .nest_service("/static", ServeDir::new(static_root()))
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
    axum::serve(listener, WithSendfile::new(app()))
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
    async fn static_files_are_served() {
        let response = app()
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
        let response = app()
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
        assert_eq!(stats.sendfile_bytes(), data.len() as u64, "{stats:?}");
        server.abort();
        std::fs::remove_dir_all(&dir).unwrap();
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
