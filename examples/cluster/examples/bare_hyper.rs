//! The baseline for `cluster`'s speed target: a bare hyper hello world.
//!
//! One tokio multi-thread runtime (one thread per core), one listener, hyper's HTTP/1
//! server and a `service_fn`: the shape of hyper's own examples, with nothing the
//! `cluster` server adds (no supervisor, timeouts, metrics or HTTP/2 sniffing).
//!
//! ```sh
//! cargo run --release -p cluster --example bare_hyper -- 127.0.0.1:3001
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3001".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bare hyper listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                let mut res = Response::new(Full::new(Bytes::from_static(b"Hello, World!")));
                res.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                Ok::<_, Infallible>(res)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
