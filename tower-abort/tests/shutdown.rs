//! Shutting down the root fires `Shutdown` in every in-flight request, once.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{answer, cooperative, get, hang, read_to_end, Seen, TestBody};
use tokio_test::{assert_pending, assert_ready_ok, task};
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service, ServiceExt};
use tower_abort::{AbortLayer, AbortReason, AbortRoot};

#[tokio::test(flavor = "current_thread")]
async fn shutdown_fires_in_every_in_flight_request_once() {
    let seen = Seen::default();
    let (layer, root) = AbortLayer::pair();
    let layer = layer.with_timeout(Duration::from_secs(3600));
    let mut waiting = layer.layer(cooperative(seen.clone()));
    let mut busy = layer.layer(hang(seen.clone()));
    let streaming = layer.layer(answer(seen.clone(), TestBody::endless(&["tick"])));

    let mut waiting_fut = task::spawn(waiting.ready().await.unwrap().call(get("/wait")));
    let mut busy_fut = task::spawn(busy.ready().await.unwrap().call(get("/busy")));
    assert_pending!(waiting_fut.poll());
    assert_pending!(busy_fut.poll());
    let stream = streaming.oneshot(get("/events")).await.unwrap();
    let mut stream = task::spawn(read_to_end(stream.into_body()));
    assert_pending!(stream.poll());
    let signals = seen.all();
    assert_eq!(signals.len(), 3);
    assert!(signals.iter().all(|s| !s.is_aborted()));

    root.shutdown();
    assert!(root.is_shutdown());
    // The cooperative handler was woken and answers on its own (not a timeout: no 504).
    assert!(waiting_fut.is_woken());
    let response = assert_ready_ok!(waiting_fut.poll());
    assert_eq!(response.status(), StatusCode::OK);
    let (body, _) = read_to_end(response.into_body()).await;
    assert_eq!(body, b"stopped: server shutting down");
    // Every signal reports Shutdown, including the ones nobody was waiting on.
    for signal in &signals {
        assert_eq!(signal.reason(), Some(AbortReason::Shutdown));
    }
    assert_eq!(root.stats().get(AbortReason::Shutdown), 3);

    // Nothing fires again afterwards: the server dropping the rest is not a ClientGone.
    drop(busy_fut);
    drop(stream);
    root.shutdown();
    for signal in &signals {
        assert_eq!(signal.reason(), Some(AbortReason::Shutdown));
        assert!(!signal.abort());
    }
    let stats = root.stats();
    assert_eq!(stats.get(AbortReason::Shutdown), 3);
    assert_eq!(stats.total(), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn requests_after_shutdown_start_aborted() {
    let seen = Seen::default();
    let (layer, root) = AbortLayer::pair();
    root.shutdown();
    let svc = layer.layer(cooperative(seen.clone()));
    let response = svc.oneshot(get("/")).await.unwrap();
    assert_eq!(
        read_to_end(response.into_body()).await.0,
        b"stopped: server shutting down"
    );
    assert_eq!(seen.only().reason(), Some(AbortReason::Shutdown));
}

#[tokio::test(flavor = "current_thread")]
async fn two_clones_and_two_layered_services_share_one_root() {
    let seen = Seen::default();
    let layer = AbortLayer::new();
    let mut a = layer.layer(hang(seen.clone()));
    let mut b = a.clone();
    let mut c = layer.layer(hang(seen.clone()));
    let mut futs = Vec::new();
    for svc in [&mut a, &mut b, &mut c] {
        let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
        assert_pending!(fut.poll());
        futs.push(fut);
    }
    b.root().shutdown();
    assert!(a.root().is_shutdown() && c.root().is_shutdown() && layer.root().is_shutdown());
    let signals = seen.all();
    assert_eq!(signals.len(), 3);
    for signal in signals {
        assert_eq!(signal.reason(), Some(AbortReason::Shutdown));
    }
    assert_eq!(layer.root().stats().get(AbortReason::Shutdown), 3);
}

#[tokio::test(flavor = "current_thread")]
async fn a_root_from_an_existing_token_follows_it() {
    let server_token = CancellationToken::new();
    let seen = Seen::default();
    let layer = AbortLayer::with_root(AbortRoot::from_token(server_token.clone()));
    let mut svc = layer.layer(cooperative(seen.clone()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    server_token.cancel();
    assert!(fut.is_woken());
    assert_ready_ok!(fut.poll());
    assert_eq!(seen.only().reason(), Some(AbortReason::Shutdown));
    assert!(layer.root().is_shutdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_racing_with_arriving_requests_wakes_every_waiter() {
    for _ in 0..20 {
        let seen = Seen::default();
        let (layer, root) = AbortLayer::pair();
        let svc = layer.layer(cooperative(seen.clone()));
        let requests: Vec<_> = (0..50)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("/"))))
            .collect();
        tokio::task::yield_now().await;
        root.shutdown();
        for request in requests {
            let response = tokio::time::timeout(Duration::from_secs(10), request)
                .await
                .expect("every handler was woken")
                .unwrap()
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
        }
        let signals = seen.all();
        assert_eq!(signals.len(), 50);
        assert!(signals
            .iter()
            .all(|s| s.reason() == Some(AbortReason::Shutdown)));
        assert_eq!(root.stats().get(AbortReason::Shutdown), 50);
        assert_eq!(root.stats().total(), 50);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_thousands_of_waiting_requests_and_a_deep_chain_of_children() {
    const REQUESTS: usize = 10_000;
    let seen = Seen::default();
    let (layer, root) = AbortLayer::pair();
    let svc = layer.layer(cooperative(seen.clone()));
    let requests: Vec<_> = (0..REQUESTS)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/"))))
        .collect();
    tokio::time::timeout(Duration::from_secs(30), async {
        while seen.all().len() < REQUESTS {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("every request reached its handler");
    // A task waiting at the bottom of a long chain of children of one request.
    let mut deep = seen.all()[0].child();
    for _ in 0..1_000 {
        deep = deep.child();
    }
    let bottom = tokio::spawn(async move { deep.aborted().await });
    tokio::task::yield_now().await;

    root.shutdown();
    for request in requests {
        let response = tokio::time::timeout(Duration::from_secs(30), request)
            .await
            .expect("every handler was woken")
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(bottom.await.unwrap(), AbortReason::Shutdown);
    assert_eq!(root.stats().get(AbortReason::Shutdown), REQUESTS as u64);
    assert_eq!(root.stats().total(), REQUESTS as u64);
}
