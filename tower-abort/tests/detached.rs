//! `AbortSignal::detached`: work shared with other requests (the pattern behind
//! tower-singleflight) outlives the client of the request that started it, but not the
//! deadline or a shutdown.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use support::{get, read_to_end, Seen, TestBody};
use tokio::sync::watch;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_abort::future::TaskHandle;
use tower_abort::{AbortLayer, AbortReason, AbortSignal};

/// One shared "flight": the first request starts the work, every request waits for its
/// result. `detach` chooses which signal the work follows.
fn flight_service(
    detach: bool,
    seen: Seen,
) -> impl Service<
    Request<()>,
    Response = Response<TestBody>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<TestBody>, Infallible>> + Send,
> + Clone {
    let flight: Arc<Mutex<Option<watch::Receiver<Option<u32>>>>> = Arc::default();
    service_fn(move |req: Request<()>| {
        let signal = seen.record(&req);
        let mut result = flight
            .lock()
            .unwrap()
            .get_or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                let work = if detach { signal.detached() } else { signal };
                drop(work.spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = tx.send(Some(7));
                }));
                rx
            })
            .clone();
        async move {
            let body = match result.wait_for(Option::is_some).await {
                Ok(value) => value.unwrap().to_string(),
                Err(_) => "the shared work was cancelled".to_owned(),
            };
            Ok(Response::new(TestBody::full(body)))
        }
    })
}

async fn leader_leaves_follower_waits(detach: bool) -> String {
    let seen = Seen::default();
    let mut svc = AbortLayer::new()
        .with_timeout(Duration::from_secs(10))
        .layer(flight_service(detach, seen.clone()));
    let mut leader = task::spawn(svc.ready().await.unwrap().call(get("/report")));
    let mut follower = task::spawn(svc.ready().await.unwrap().call(get("/report")));
    assert_pending!(leader.poll());
    assert_pending!(follower.poll());
    drop(leader);
    assert_eq!(seen.all()[0].reason(), Some(AbortReason::ClientGone));
    // Past the shared work's one second.
    tokio::time::sleep(Duration::from_millis(1_001)).await;
    let response = assert_ready_ok!(follower.poll());
    let (body, _) = read_to_end(response.into_body()).await;
    assert_eq!(seen.all()[1].reason(), None);
    String::from_utf8(body).unwrap()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn shared_work_on_a_detached_signal_survives_the_leaders_client() {
    assert_eq!(leader_leaves_follower_waits(true).await, "7");
    // With the leader's own signal, its client leaving cancels the work for everyone.
    assert_eq!(
        leader_leaves_follower_waits(false).await,
        "the shared work was cancelled"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn detached_work_still_stops_at_the_deadline() {
    let work: Arc<Mutex<Option<TaskHandle<()>>>> = Arc::default();
    let mut svc = AbortLayer::new()
        .with_timeout(Duration::from_secs(1))
        .layer(service_fn({
            let work = work.clone();
            move |req: Request<()>| {
                let signal = req.extensions().get::<AbortSignal>().unwrap();
                let detached = signal.detached();
                assert_eq!(detached.deadline(), signal.deadline());
                *work.lock().unwrap() = Some(detached.spawn(std::future::pending()));
                std::future::pending::<Result<Response<TestBody>, Infallible>>()
            }
        }));
    let mut request = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(request.poll());
    drop(request); // the client leaves; nothing watches the deadline but the detached work
    tokio::time::sleep(Duration::from_millis(999)).await;
    let handle = work.lock().unwrap().take().unwrap();
    assert!(!handle.is_finished());
    assert_eq!(handle.await, Err(AbortReason::DeadlineExceeded));
}

#[tokio::test(flavor = "current_thread")]
async fn detached_work_stops_on_shutdown() {
    let seen = Seen::default();
    let (layer, root) = AbortLayer::pair();
    let svc = layer.layer(support::answer(seen.clone(), TestBody::empty()));
    drop(svc.oneshot(get("/")).await.unwrap());
    let detached = seen.only().detached();
    let child = detached.child();
    let mut wait = task::spawn(child.aborted());
    assert_pending!(wait.poll());
    seen.only().abort();
    assert_pending!(wait.poll());
    root.shutdown();
    assert!(wait.is_woken());
    assert_eq!(wait.await, AbortReason::Shutdown);
    assert_eq!(detached.reason(), Some(AbortReason::Shutdown));
    // The request itself was counted once (its explicit abort); detached work is not a
    // request.
    assert_eq!(root.stats().total(), 1);
}
