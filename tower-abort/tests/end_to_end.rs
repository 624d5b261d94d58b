//! A request's signal crossing a real hop: front signal -> `PropagateAbort` around a hyper
//! client -> upstream hyper server with its own `AbortLayer`.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use support::{Seen, TestBody};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::{service_fn, Layer, ServiceExt};
use tower_abort::error::Aborted;
use tower_abort::{AbortLayer, AbortReason, AbortSignal, PropagateAbortLayer};

const BOUND: Duration = Duration::from_secs(10);

/// An upstream that honours `grpc-timeout` and waits for its signal.
async fn upstream() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<AbortSignal>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let svc = AbortLayer::new()
        .with_timeout(Duration::from_secs(60))
        .with_grpc_timeout(true)
        .layer(service_fn(move |req: Request<Incoming>| {
            let signal = req.extensions().get::<AbortSignal>().unwrap().clone();
            let _ = tx.send(signal.clone());
            async move {
                let _ = timeout(BOUND, signal.aborted()).await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"late"))))
            }
        }));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    (addr, rx)
}

/// The signal of a request that went through an `AbortLayer` with a 20 s deadline.
async fn front_signal() -> AbortSignal {
    let seen = Seen::default();
    let svc = AbortLayer::new()
        .with_timeout(Duration::from_secs(20))
        .layer(support::answer(seen.clone(), TestBody::empty()));
    drop(svc.oneshot(Request::new(())).await.unwrap());
    seen.only()
}

#[tokio::test]
async fn deadline_travels_and_an_abort_cancels_the_upstream_work() {
    let (addr, mut upstream_started) = upstream().await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
    let client = PropagateAbortLayer::new().layer(service_fn(move |req: Request<Full<Bytes>>| {
        let sender = sender.clone();
        async move { sender.lock().await.send_request(req).await }
    }));

    let front = front_signal().await;
    let mut req = Request::get(format!("http://{addr}/work"))
        .body(Full::default())
        .unwrap();
    req.extensions_mut().insert(front.clone());
    let call = tokio::spawn(client.oneshot(req));

    let upstream_signal = timeout(BOUND, upstream_started.recv())
        .await
        .unwrap()
        .unwrap();
    let remaining = upstream_signal
        .remaining()
        .expect("grpc-timeout gave it a deadline");
    assert!(
        remaining <= Duration::from_secs(20),
        "upstream deadline {remaining:?} is later than ours"
    );
    assert!(
        remaining > Duration::from_secs(10),
        "upstream deadline {remaining:?} lost too much"
    );

    front.abort(); // the front request is abandoned
    let err = timeout(BOUND, call).await.unwrap().unwrap().unwrap_err();
    assert_eq!(
        err.downcast_ref::<Aborted>().map(Aborted::reason),
        Some(AbortReason::Explicit)
    );
    // Dropping the HTTP/1 call closed its connection: the upstream work stops too.
    let reason = timeout(BOUND, upstream_signal.aborted())
        .await
        .expect("upstream saw the cancel");
    assert_eq!(reason, AbortReason::ClientGone);
}
