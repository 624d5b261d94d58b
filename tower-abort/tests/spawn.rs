//! Work started through the helpers follows the signal, and nothing is left behind.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use support::{get, DropFlag, Seen, TestBody};
use tokio_test::{assert_pending, task};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_abort::{AbortLayer, AbortReason, AbortSignal};

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Lets the runtime run other tasks until `done`, for a bounded number of turns.
async fn settle(done: impl Fn() -> bool) -> bool {
    for _ in 0..1_000 {
        if done() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    done()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn spawned_task_is_aborted_when_the_client_leaves_and_nothing_leaks() {
    let baseline = alive_tasks();
    let seen = Seen::default();
    let work = DropFlag::default();
    let mut svc = AbortLayer::new().layer(service_fn({
        let seen = seen.clone();
        let work = work.clone();
        move |req: Request<()>| {
            let signal = seen.record(&req);
            let guard = work.guard();
            async move {
                // Detached work: a long timer that holds a resource.
                let _detached = signal.spawn(async move {
                    let _guard = guard;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                });
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(Response::new(TestBody::empty()))
            }
        }
    }));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    assert!(
        settle(|| alive_tasks() == baseline + 1).await,
        "the work task runs"
    );

    drop(fut); // the client goes away; the handler (and the task's handle) are dropped
    assert_eq!(seen.only().reason(), Some(AbortReason::ClientGone));
    assert!(
        settle(|| alive_tasks() == baseline).await,
        "the task was aborted"
    );
    assert!(
        work.is_dropped(),
        "its future, timer and resources were dropped"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn spawned_task_completes_normally_and_is_joined() {
    let baseline = alive_tasks();
    let signal = AbortSignal::new();
    let handle = signal.spawn(async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        7
    });
    assert_eq!(handle.await, Ok(7));
    assert!(settle(|| alive_tasks() == baseline).await);
    assert!(!signal.is_aborted());
}

#[tokio::test(flavor = "current_thread")]
async fn awaited_handle_reports_the_reason() {
    let signal = AbortSignal::new();
    let work = DropFlag::default();
    let handle = signal.spawn({
        let guard = work.guard();
        async move {
            let _guard = guard;
            std::future::pending::<()>().await
        }
    });
    tokio::task::yield_now().await;
    signal.child().abort(); // a child does not reach the parent's task
    tokio::task::yield_now().await;
    assert!(!handle.is_finished());
    signal.abort();
    assert_eq!(handle.await, Err(AbortReason::Explicit));
    assert!(work.is_dropped());
}

#[tokio::test(flavor = "current_thread")]
async fn task_handle_abort_and_panics() {
    let signal = AbortSignal::new();
    let handle = signal.spawn(std::future::pending::<()>());
    handle.abort();
    assert_eq!(handle.await, Err(AbortReason::Explicit));
    assert!(
        !signal.is_aborted(),
        "stopping one task does not fire the signal"
    );

    let panicking = signal.spawn(async { panic!("boom") });
    let joined = tokio::spawn(panicking);
    let err = joined.await.unwrap_err();
    assert!(err.is_panic(), "the task's panic is resumed in the joiner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_blocking_receives_the_signal_and_stops_at_a_safe_point() {
    let signal = AbortSignal::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let handle = signal.spawn_blocking(move |signal| {
        let _ = started_tx.send(());
        let mut steps = 0u32;
        // Bounded: 10 s at most even if the signal never came.
        while !signal.is_aborted() && steps < 10_000 {
            std::thread::sleep(Duration::from_millis(1));
            steps += 1;
        }
        (signal.reason(), steps)
    });
    started_rx.await.unwrap();
    signal.abort();
    let (reason, steps) = handle.await.unwrap();
    assert_eq!(reason, Some(AbortReason::Explicit));
    assert!(steps < 10_000);
}

#[tokio::test(flavor = "current_thread")]
async fn run_until_aborted_resolves_with_the_reason_or_the_output() {
    let signal = AbortSignal::new();
    assert_eq!(signal.run_until_aborted(async { 1 }).await, Ok(1));
    let mut pending = task::spawn(signal.run_until_aborted(std::future::pending::<()>()));
    assert_pending!(pending.poll());
    signal.abort();
    assert!(pending.is_woken());
    assert_eq!(pending.await, Err(AbortReason::Explicit));
    // Work that is ready wins over a signal that already fired.
    assert_eq!(signal.run_until_aborted(async { 2 }).await, Ok(2));
}
