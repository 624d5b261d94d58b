//! The layer under axum: `Router::layer`, `route_layer`, around a whole app, and the
//! extractor.
#![cfg(feature = "axum")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::Router;
use tokio_test::{assert_pending, task};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_abort::{AbortLayer, AbortReason, AbortRoot, AbortSignal};

type Signals = Arc<Mutex<Vec<AbortSignal>>>;

/// Two routes whose handlers record their signal and wait for it.
fn routes(signals: Signals) -> Router {
    let handler = move |signal: AbortSignal| {
        let signals = signals.clone();
        async move {
            signals.lock().unwrap().push(signal.clone());
            let reason = signal.aborted().await;
            format!("stopped: {reason}")
        }
    };
    Router::new()
        .route("/a", get(handler.clone()))
        .route("/b", get(handler))
}

fn req(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

/// Starts one request per path, shuts the root down, checks every handler saw it.
async fn shutdown_reaches_every_route<S, B>(app: S, root: AbortRoot, signals: Signals)
where
    S: Service<Request<Body>, Response = axum::http::Response<B>> + Clone,
    B: std::fmt::Debug,
    S::Error: std::fmt::Debug,
{
    let mut futs = Vec::new();
    for path in ["/a", "/b", "/a"] {
        let mut app = app.clone();
        let mut fut = task::spawn(async move { app.ready().await.unwrap().call(req(path)).await });
        assert_pending!(fut.poll());
        futs.push(fut);
    }
    assert_eq!(signals.lock().unwrap().len(), 3);
    root.shutdown();
    for fut in futs {
        let response = fut.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    for signal in signals.lock().unwrap().iter() {
        assert_eq!(signal.reason(), Some(AbortReason::Shutdown));
    }
    assert_eq!(root.stats().get(AbortReason::Shutdown), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn under_router_layer() {
    let signals = Signals::default();
    let (layer, root) = AbortLayer::pair();
    let app = routes(signals.clone()).layer(layer);
    shutdown_reaches_every_route(app, root, signals).await;
}

#[tokio::test(flavor = "current_thread")]
async fn under_route_layer() {
    let signals = Signals::default();
    let (layer, root) = AbortLayer::pair();
    let app = routes(signals.clone()).route_layer(layer);
    // Unmatched paths bypass a route layer entirely.
    let response = app.clone().oneshot(req("/nope")).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    shutdown_reaches_every_route(app, root, signals).await;
}

#[tokio::test(flavor = "current_thread")]
async fn around_the_whole_app() {
    let signals = Signals::default();
    let (layer, root) = AbortLayer::pair();
    let app = ServiceBuilder::new()
        .layer(layer)
        .service(routes(signals.clone()));
    let response = app.clone().oneshot(req("/nope")).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    shutdown_reaches_every_route(app, root, signals).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn deadline_and_disconnect_through_axum() {
    let signals = Signals::default();
    let app = routes(signals.clone()).layer(AbortLayer::new().with_timeout(Duration::from_secs(1)));
    let response = app.clone().oneshot(req("/a")).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        signals.lock().unwrap()[0].reason(),
        Some(AbortReason::DeadlineExceeded)
    );

    let mut app = app;
    let mut fut = task::spawn(
        ServiceExt::<Request<Body>>::ready(&mut app)
            .await
            .unwrap()
            .call(req("/b")),
    );
    assert_pending!(fut.poll());
    drop(fut);
    assert_eq!(
        signals.lock().unwrap()[1].reason(),
        Some(AbortReason::ClientGone)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn extractor_without_the_layer() {
    let app = Router::new()
        .route(
            "/required",
            get(|_signal: AbortSignal| async { "unreachable" }),
        )
        .route(
            "/optional",
            get(|signal: Option<AbortSignal>| async move { format!("{}", signal.is_some()) }),
        );
    let response = app.clone().oneshot(req("/required")).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let response = app.oneshot(req("/optional")).await.unwrap();
    let body = axum::body::to_bytes(response.into_body(), 1024)
        .await
        .unwrap();
    assert_eq!(&body[..], b"false");
}

// Paused: the deadline is read back as a remaining time, which real time would shrink by
// however long a loaded machine takes between the call and the check.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn nested_layers_make_the_inner_signal_a_child_with_the_sooner_deadline() {
    let signals = Signals::default();
    let (outer, outer_root) = AbortLayer::pair();
    let outer = outer.with_timeout(Duration::from_secs(30));
    let (inner, inner_root) = AbortLayer::pair();
    let app = outer
        .layer(routes(signals.clone()).route_layer(inner.with_timeout(Duration::from_secs(5))));
    let mut app = app;
    let mut fut = task::spawn(
        ServiceExt::<Request<Body>>::ready(&mut app)
            .await
            .unwrap()
            .call(req("/a")),
    );
    assert_pending!(fut.poll());
    let signal = signals.lock().unwrap()[0].clone();
    let remaining = signal.remaining().unwrap();
    assert!(remaining <= Duration::from_secs(5) && remaining > Duration::from_secs(4));
    drop(fut);
    assert_eq!(signal.reason(), Some(AbortReason::ClientGone));
    // One request, counted once: by the outer layer, whose signal fired first.
    assert_eq!(outer_root.stats().get(AbortReason::ClientGone), 1);
    assert_eq!(inner_root.stats().total(), 0);
}
