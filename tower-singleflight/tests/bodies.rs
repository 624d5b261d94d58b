//! Inner body and error types: axum's `Body`, and a boxed body whose error is `BoxError`
//! itself, behind a service whose error is `BoxError`, in spawned tasks and under hyper.
#![cfg(not(loom))]

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use tower::{service_fn, Layer, ServiceExt};
use tower_singleflight::{error::BoxError, SingleflightLayer};

fn get(path: &str) -> Request<axum::body::Body> {
    Request::get(path)
        .header("host", "example.com")
        .body(axum::body::Body::empty())
        .unwrap()
}

#[tokio::test]
async fn a_boxed_body_with_the_boxed_error_can_be_spawned() {
    let inner = service_fn(|_req: Request<axum::body::Body>| async {
        let body: BoxBody<Bytes, BoxError> = Full::new(Bytes::from_static(b"boxed"))
            .map_err(|never| match never {})
            .boxed();
        Ok::<_, Infallible>(Response::new(body))
    });
    let svc = SingleflightLayer::new().layer(inner);
    let task = tokio::spawn(svc.oneshot(get("/b")));
    let response = task.await.unwrap().unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "boxed");
}

#[tokio::test]
async fn axum_bodies_can_be_spawned_and_shared() {
    let inner = service_fn(|_req: Request<axum::body::Body>| async {
        Ok::<_, Infallible>(Response::new(axum::body::Body::from("axum")))
    });
    let svc = SingleflightLayer::new().layer(inner);
    let (a, b) = (
        tokio::spawn(svc.clone().oneshot(get("/a"))),
        tokio::spawn(svc.oneshot(get("/a"))),
    );
    for task in [a, b] {
        let body = task.await.unwrap().unwrap().into_body();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "axum");
    }
}

#[tokio::test]
async fn an_axum_router_behind_the_layer_serves_through_a_spawned_task() {
    use axum::{routing::get as route, Router};
    let app = Router::new().route("/r", route(|| async { "routed" }));
    let svc = tower::ServiceBuilder::new()
        .layer(SingleflightLayer::new())
        .service(app);
    let task = tokio::spawn(svc.oneshot(get("/r")));
    let body = task.await.unwrap().unwrap().into_body();
    assert_eq!(body.collect().await.unwrap().to_bytes(), "routed");
}

// With a `BoxError` service error or body error, awaiting the layer's future in an `async`
// block that must be `Send` (a spawned task, hyper's connection) can hit a rustc limitation
// (rust-lang/rust#64552): it cannot prove `BoxError: Into<BoxError>` for the block's erased
// lifetimes. tower's own `Timeout` fails the same way. It bites only where the block's
// types name those errors: an inner service of a nameable type (a `ServiceFn` of a
// closure). An opaque inner service (`impl Service`), or the stack boxed first
// (`BoxCloneService`), works; both async-block tests below failed to compile while the
// response body's `Body` impl required `B::Error: Into<BoxError>`.

/// An inner service whose error and body error are both `BoxError`.
fn boxed_everything<ReqB>() -> impl tower::Service<
    Request<ReqB>,
    Response = Response<BoxBody<Bytes, BoxError>>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    service_fn(|_req: Request<ReqB>| async {
        let body: BoxBody<Bytes, BoxError> = Full::new(Bytes::from_static(b"boxed"))
            .map_err(|never| match never {})
            .boxed();
        Ok::<_, BoxError>(Response::new(body))
    })
}

#[tokio::test]
async fn boxed_errors_inside_a_spawned_async_block_through_box_clone_service() {
    let svc = tower::util::BoxCloneService::new(SingleflightLayer::new().layer(boxed_everything()));
    let task = tokio::spawn(async move {
        let (a, b) = tokio::join!(svc.clone().oneshot(get("/b")), svc.oneshot(get("/b")));
        let a = a.unwrap().into_body().collect().await.unwrap().to_bytes();
        let b = b.unwrap().into_body().collect().await.unwrap().to_bytes();
        (a, b)
    });
    assert_eq!(
        task.await.unwrap(),
        (Bytes::from("boxed"), Bytes::from("boxed"))
    );
}

#[tokio::test]
async fn hyper_serves_boxed_errors_from_an_opaque_service() {
    use hyper_util::{rt::TokioIo, service::TowerToHyperService};
    let svc = TowerToHyperService::new(
        SingleflightLayer::new().layer(boxed_everything::<hyper::body::Incoming>()),
    );
    let (client, server) = tokio::io::duplex(4096);
    let conn = tokio::spawn(async move {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(server), svc)
            .await
    });
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut client = client;
    client
        .write_all(b"GET /h HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    client.read_to_end(&mut response).await.unwrap();
    assert!(
        response.ends_with(b"boxed"),
        "{:?}",
        String::from_utf8_lossy(&response)
    );
    conn.await.unwrap().unwrap();
}

#[tokio::test]
async fn boxed_errors_from_an_opaque_service_inside_a_spawned_async_block() {
    let svc = SingleflightLayer::new().layer(boxed_everything());
    let task = tokio::spawn(async move {
        let response = svc.oneshot(get("/b")).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    });
    assert_eq!(task.await.unwrap(), Bytes::from("boxed"));
}
