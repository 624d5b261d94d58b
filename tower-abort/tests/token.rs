//! `AbortSignal::cancellation_token`: the token is cancelled exactly when the request's
//! signal fires, for every reason and at every point of the request, never on normal
//! completion; and `AbortSignal::from_token` in the other direction.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use support::{get, read_to_end, TestBody};
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_abort::{AbortLayer, AbortReason, AbortRoot, AbortSignal};

/// What a handler took from its request: the signal and its token.
#[derive(Clone, Default)]
struct Taken(Arc<Mutex<Vec<(AbortSignal, CancellationToken)>>>);

impl Taken {
    fn only(&self) -> (AbortSignal, CancellationToken) {
        let all = self.0.lock().unwrap();
        assert_eq!(all.len(), 1, "expected exactly one request");
        all[0].clone()
    }
}

/// A handler that takes its signal's token at once, then waits `wait` (forever if `None`)
/// and answers with `body`.
fn handler(
    taken: Taken,
    wait: Option<Duration>,
    body: TestBody,
) -> impl Service<
    Request<()>,
    Response = Response<TestBody>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<TestBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req: Request<()>| {
        let signal = req.extensions().get::<AbortSignal>().unwrap().clone();
        let token = signal.cancellation_token();
        assert!(!token.is_cancelled());
        taken.0.lock().unwrap().push((signal, token));
        let body = body.clone();
        async move {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
            Ok::<_, Infallible>(Response::new(body))
        }
    })
}

fn assert_fired(signal: &AbortSignal, token: &CancellationToken, reason: AbortReason) {
    assert_eq!(signal.reason(), Some(reason));
    assert!(token.is_cancelled(), "the token missed {reason:?}");
    // Every later call gives the same, cancelled, token.
    assert_eq!(&signal.cancellation_token(), token);
}

#[tokio::test(flavor = "current_thread")]
async fn completed_requests_leave_the_token_alone() {
    for body in [
        TestBody::empty(),
        TestBody::full("hello"),
        TestBody::chunks(&["a", "b"]),
    ] {
        let taken = Taken::default();
        let svc = AbortLayer::new().layer(handler(taken.clone(), Some(Duration::ZERO), body));
        let response = svc.oneshot(get("/")).await.unwrap();
        let (_, error) = read_to_end(response.into_body()).await;
        assert_eq!(error, None);
        let (signal, token) = taken.only();
        assert!(!signal.is_aborted());
        assert!(!token.is_cancelled(), "cancelled for a completed response");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn client_gone_cancels_the_token_at_every_point() {
    // The response future dropped while the handler is pending.
    let taken = Taken::default();
    let mut svc = AbortLayer::new().layer(handler(taken.clone(), None, TestBody::empty()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    let (signal, token) = taken.only();
    let mut cancelled = task::spawn(token.clone().cancelled_owned());
    assert_pending!(cancelled.poll());
    drop(fut);
    assert!(cancelled.is_woken());
    assert_ready!(cancelled.poll());
    assert_fired(&signal, &token, AbortReason::ClientGone);

    // The response future dropped before it was ever polled (the handler ran in `call`).
    let taken = Taken::default();
    let mut svc = AbortLayer::new().layer(handler(taken.clone(), None, TestBody::empty()));
    drop(svc.ready().await.unwrap().call(get("/")));
    let (signal, token) = taken.only();
    assert_fired(&signal, &token, AbortReason::ClientGone);

    // The body dropped after its first frame, before its end.
    let taken = Taken::default();
    let body = TestBody::endless(&["data: 1\n\n"]);
    let svc = AbortLayer::new().layer(handler(taken.clone(), Some(Duration::ZERO), body));
    let response = svc.oneshot(get("/events")).await.unwrap();
    let mut body = Box::pin(response.into_body());
    let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
    assert!(frame.unwrap().is_ok());
    let (signal, token) = taken.only();
    assert!(!token.is_cancelled());
    drop(body);
    assert_fired(&signal, &token, AbortReason::ClientGone);

    // The body dropped before its first poll.
    let taken = Taken::default();
    let body = TestBody::endless(&["data: 1\n\n"]);
    let svc = AbortLayer::new().layer(handler(taken.clone(), Some(Duration::ZERO), body));
    drop(svc.oneshot(get("/events")).await.unwrap());
    let (signal, token) = taken.only();
    assert_fired(&signal, &token, AbortReason::ClientGone);
}

#[tokio::test(start_paused = true)]
async fn deadline_cancels_the_token_on_time() {
    let taken = Taken::default();
    let layer = AbortLayer::new().with_timeout(Duration::from_secs(2));
    let svc = layer.layer(handler(taken.clone(), None, TestBody::empty()));
    let mut fut = task::spawn(svc.oneshot(get("/")));
    assert_pending!(fut.poll());
    let (signal, token) = taken.only();
    advance(Duration::from_millis(1999)).await;
    assert_pending!(fut.poll());
    assert!(!token.is_cancelled());
    advance(Duration::from_millis(1)).await;
    // Cooperative: the handler is still running, in its grace period.
    assert_pending!(fut.poll());
    assert_fired(&signal, &token, AbortReason::DeadlineExceeded);
    advance(Duration::from_secs(1)).await;
    let response = assert_ready_ok!(fut.poll());
    assert_eq!(response.status(), http::StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_and_explicit_abort_cancel_the_token() {
    let taken = Taken::default();
    let (layer, root) = AbortLayer::pair();
    let mut svc = layer.layer(handler(taken.clone(), None, TestBody::empty()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    let (signal, token) = taken.only();
    root.shutdown();
    assert_fired(&signal, &token, AbortReason::Shutdown);
    drop(fut);
    assert_eq!(signal.reason(), Some(AbortReason::Shutdown));

    // A root made from the server's own token, cancelled directly: the request's token
    // is a child of it, so nobody has to look at the signal first.
    let server = CancellationToken::new();
    let layer = AbortLayer::with_root(AbortRoot::from_token(server.clone()));
    let taken = Taken::default();
    let mut svc = layer.layer(handler(taken.clone(), None, TestBody::empty()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    let (signal, token) = taken.only();
    server.cancel();
    assert!(token.is_cancelled());
    assert_fired(&signal, &token, AbortReason::Shutdown);
    drop(fut);

    let taken = Taken::default();
    let mut svc = AbortLayer::new().layer(handler(taken.clone(), None, TestBody::empty()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    let (signal, token) = taken.only();
    assert!(signal.abort());
    assert_fired(&signal, &token, AbortReason::Explicit);
    // The handler is not dropped by an explicit abort; the client leaving later changes
    // nothing.
    drop(fut);
    assert_eq!(signal.reason(), Some(AbortReason::Explicit));
}

#[tokio::test(flavor = "current_thread")]
async fn tokens_of_children_and_any_follow_their_parents() {
    let request = AbortSignal::new();
    let child = request.child();
    let other = AbortSignal::new();
    let either = AbortSignal::any([other.clone(), child.clone()]);
    let (t_child, t_either, t_other) = (
        child.cancellation_token(),
        either.cancellation_token(),
        other.cancellation_token(),
    );
    assert!(request.abort());
    assert!(t_child.is_cancelled() && t_either.is_cancelled());
    assert!(!t_other.is_cancelled());
    // Cancelling a token does not fire its signal: it only observes.
    t_other.cancel();
    assert!(!other.is_aborted());
    // Asked for after firing: already cancelled.
    let late = AbortSignal::new();
    late.abort();
    assert!(late.cancellation_token().is_cancelled());
}

#[tokio::test(flavor = "current_thread")]
async fn from_token_fires_when_the_token_is_cancelled() {
    let job = CancellationToken::new();
    let signal = AbortSignal::from_token(job.clone());
    let below = signal.child();
    let request = AbortSignal::new();
    let either = AbortSignal::any([request.clone(), signal.clone()]);
    let mut waits = [
        task::spawn(signal.aborted()),
        task::spawn(below.aborted()),
        task::spawn(either.aborted()),
    ];
    for wait in waits.iter_mut() {
        assert_pending!(wait.poll());
    }
    let token = either.cancellation_token();
    assert!(!signal.is_aborted() && !token.is_cancelled());
    job.cancel();
    // Its own token is a child of `job`: cancelled without anybody looking.
    assert!(token.is_cancelled());
    for wait in waits.iter_mut() {
        assert!(wait.is_woken());
        assert_eq!(assert_ready!(wait.poll()), AbortReason::Explicit);
    }
    assert_eq!(either.reason(), Some(AbortReason::Explicit));
    assert!(!request.is_aborted());

    // Firing the signal does not cancel the token it came from.
    let job = CancellationToken::new();
    let signal = AbortSignal::from_token(job.clone());
    assert!(signal.abort());
    assert!(!job.is_cancelled());
    // Already cancelled: fired at once.
    let job = CancellationToken::new();
    job.cancel();
    assert_eq!(
        AbortSignal::from_token(job).aborted().await,
        AbortReason::Explicit
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_asked_for_while_the_signal_fires_on_another_thread() {
    for _ in 0..2_000 {
        let parent = AbortSignal::new();
        let signal = parent.child();
        let parent_fires = tokio::spawn(async move { parent.abort() });
        let token = signal.cancellation_token();
        assert!(parent_fires.await.unwrap());
        tokio::time::timeout(Duration::from_secs(5), token.cancelled())
            .await
            .expect("the token missed the firing");
    }
}
