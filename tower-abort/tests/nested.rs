//! Nested `AbortLayer`s (say one around the app and one on a route): one request is
//! counted and reported once, whichever layer's signal fires first.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{get, hang, Seen};
use tokio_test::{assert_pending, task};
use tower::{Layer, Service, ServiceExt};
use tower_abort::{AbortLayer, AbortReason, AbortRoot, TimeoutMode};

/// Two layers under `root`, each with an `on_abort` callback adding to `calls`.
fn nested(root: &AbortRoot, calls: &Arc<AtomicUsize>) -> (AbortLayer, AbortLayer) {
    let count = |calls: &Arc<AtomicUsize>| {
        let calls = calls.clone();
        move |_: &tower_abort::AbortEvent<'_>| {
            calls.fetch_add(1, Ordering::SeqCst);
        }
    };
    (
        AbortLayer::with_root(root.clone()).on_abort(count(calls)),
        AbortLayer::with_root(root.clone()).on_abort(count(calls)),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn a_disconnect_and_a_shutdown_are_counted_once_per_request() {
    let seen = Seen::default();
    let root = AbortRoot::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (outer, inner) = nested(&root, &calls);
    let mut svc = outer.layer(inner.layer(hang(seen.clone())));

    // Dropping the outer response future drops the inner one: both signals fire.
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/gone")));
    assert_pending!(fut.poll());
    drop(fut);
    assert_eq!(seen.all()[0].reason(), Some(AbortReason::ClientGone));
    assert_eq!(root.stats().get(AbortReason::ClientGone), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A shutdown reaches both signals of the next request; both look, and the server then
    // drops the request.
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/drained")));
    assert_pending!(fut.poll());
    root.shutdown();
    let inner_signal = seen.all()[1].clone();
    assert_eq!(inner_signal.reason(), Some(AbortReason::Shutdown));
    assert_pending!(fut.poll());
    drop(fut);
    let stats = root.stats();
    assert_eq!(stats.get(AbortReason::Shutdown), 1);
    assert_eq!(stats.total(), 2, "{stats:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_inner_deadline_then_a_disconnect_count_once_as_the_deadline() {
    let seen = Seen::default();
    let root = AbortRoot::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (outer, inner) = nested(&root, &calls);
    let inner = inner
        .with_timeout(Duration::from_secs(1))
        .with_mode(TimeoutMode::Cooperative {
            grace: Duration::from_secs(5),
        });
    let svc = outer.layer(inner.layer(hang(seen.clone())));
    let mut fut = task::spawn(svc.oneshot(get("/slow")));
    assert_pending!(fut.poll());
    tokio::time::advance(Duration::from_secs(1)).await;
    // The inner layer's deadline fires; the handler is in its grace period.
    assert_pending!(fut.poll());
    assert_eq!(seen.only().reason(), Some(AbortReason::DeadlineExceeded));
    // Then the client leaves: the outer signal fires ClientGone, but this is the same
    // request, already counted.
    drop(fut);
    let stats = root.stats();
    assert_eq!(stats.get(AbortReason::DeadlineExceeded), 1);
    assert_eq!(stats.total(), 1, "{stats:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
