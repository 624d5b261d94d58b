//! Peer: tower-http `ServeDir` with its defaults (64 KiB reads through `tokio::fs`), mounted at
//! `/static/` in axum 0.8, as a user would serve a folder.
//!
//! `peer-servedir --listen 127.0.0.1:8080 --root DIR`

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use clap::Parser;
use tower_http::services::ServeDir;

/// tower-http ServeDir.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3003")]
    listen: SocketAddr,
    /// Directory served under `/static/`.
    #[arg(long)]
    root: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.root.is_dir(),
        "{} is not a directory",
        args.root.display()
    );
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest_service("/static", ServeDir::new(&args.root));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    axum::serve(listener, app).await?;
    Ok(())
}
