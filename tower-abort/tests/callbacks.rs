//! A panicking `on_abort` callback never escapes: signals fire from `Drop`, where a panic
//! would tear down the connection task, or abort the process during unwinding.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{get, hang, Seen};
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{Layer, Service, ServiceExt};
use tower_abort::{AbortLayer, AbortReason, TimeoutMode};

fn panicking() -> AbortLayer {
    AbortLayer::new().on_abort(|event| panic!("on_abort callback panics on {}", event.reason()))
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_callback_does_not_panic_the_drop_that_fired_the_signal() {
    let seen = Seen::default();
    let layer = panicking();
    let root = layer.root();
    let mut svc = layer.layer(hang(seen.clone()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    drop(fut);
    assert_eq!(seen.only().reason(), Some(AbortReason::ClientGone));
    assert_eq!(root.stats().get(AbortReason::ClientGone), 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_callback_does_not_panic_the_poll_that_fired_the_signal() {
    let seen = Seen::default();
    let layer = panicking()
        .with_timeout(Duration::from_secs(1))
        .with_mode(TimeoutMode::Drop);
    let root = layer.root();
    let svc = layer.layer(hang(seen.clone()));
    let mut fut = task::spawn(svc.oneshot(get("/")));
    assert_pending!(fut.poll());
    tokio::time::advance(Duration::from_secs(1)).await;
    let response = assert_ready_ok!(fut.poll());
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(root.stats().get(AbortReason::DeadlineExceeded), 1);
}

#[test]
fn a_panicking_callback_during_unwinding_does_not_abort_the_process() {
    // A request in flight on a thread that panics: its response future is dropped while
    // the thread unwinds, which fires ClientGone and runs the callback. A second panic
    // escaping that drop would abort the whole process (and this test binary with it).
    let seen = Seen::default();
    let layer = panicking();
    let root = layer.root();
    let thread = std::thread::spawn({
        let seen = seen.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut svc = layer.layer(hang(seen));
                let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
                assert_pending!(fut.poll());
                panic!("the handler's thread panics with the request in flight");
            })
        }
    });
    assert!(thread.join().is_err());
    assert_eq!(seen.only().reason(), Some(AbortReason::ClientGone));
    assert_eq!(root.stats().get(AbortReason::ClientGone), 1);
}
