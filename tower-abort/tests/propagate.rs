//! The client-side layer: deadline re-emission and cancellation of outgoing calls.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use support::{get, DropFlag, Seen, TestBody};
use tokio::time::advance;
use tokio_test::{assert_pending, task};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_abort::error::Aborted;
use tower_abort::{AbortLayer, AbortReason, AbortSignal, PropagateAbortLayer, TimeoutFormat};

/// An upstream that answers with the headers it received.
fn echo_headers(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<()>, Response = HeaderMap, Error = Infallible, Future = impl Send> + Clone
{
    service_fn(move |req: Request<()>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Infallible>(req.headers().clone()) }
    })
}

fn outgoing(signal: &AbortSignal) -> Request<()> {
    let mut req = get("http://upstream/");
    req.extensions_mut().insert(signal.clone());
    req
}

/// The signal a server request got from an `AbortLayer` with `timeout`.
async fn server_signal(timeout: Duration) -> AbortSignal {
    let seen = Seen::default();
    let svc = AbortLayer::new()
        .with_timeout(timeout)
        .layer(support::answer(seen.clone(), TestBody::empty()));
    drop(svc.oneshot(get("/")).await.unwrap());
    seen.only()
}

#[tokio::test(start_paused = true)]
async fn remaining_time_is_re_emitted_as_grpc_timeout_and_a_custom_header() {
    let signal = server_signal(Duration::from_secs(2)).await;
    advance(Duration::from_millis(500)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let client = PropagateAbortLayer::new()
        .with_timeout_header(
            HeaderName::from_static("request-timeout"),
            TimeoutFormat::Milliseconds,
        )
        .layer(echo_headers(calls.clone()));
    let headers = client.oneshot(outgoing(&signal)).await.unwrap();
    assert_eq!(headers["grpc-timeout"], "1500000u");
    assert_eq!(headers["request-timeout"], "1500");
}

#[tokio::test(start_paused = true)]
async fn a_shorter_header_already_set_is_kept() {
    let signal = server_signal(Duration::from_secs(2)).await;
    let client = PropagateAbortLayer::new().layer(echo_headers(Arc::default()));
    let mut req = outgoing(&signal);
    req.headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("100m"));
    assert_eq!(
        client.clone().oneshot(req).await.unwrap()["grpc-timeout"],
        "100m"
    );
    let mut req = outgoing(&signal);
    req.headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static("1H"));
    assert_eq!(
        client.oneshot(req).await.unwrap()["grpc-timeout"],
        "2000000u"
    );
}

#[tokio::test(start_paused = true)]
async fn fails_fast_without_calling_upstream_when_fired_or_expired() {
    let calls = Arc::new(AtomicUsize::new(0));
    let client = PropagateAbortLayer::new().layer(echo_headers(calls.clone()));

    let fired = AbortSignal::new();
    fired.abort();
    let err = client.clone().oneshot(outgoing(&fired)).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<Aborted>().map(Aborted::reason),
        Some(AbortReason::Explicit)
    );

    let expired = server_signal(Duration::from_secs(1)).await;
    advance(Duration::from_secs(1)).await;
    let err = client
        .clone()
        .oneshot(outgoing(&expired))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<Aborted>().map(Aborted::reason),
        Some(AbortReason::DeadlineExceeded)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // Without a signal the request passes through untouched.
    let headers = client.oneshot(get("/")).await.unwrap();
    assert!(headers.get("grpc-timeout").is_none());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn the_outgoing_call_is_dropped_as_soon_as_the_signal_fires() {
    let in_flight = DropFlag::default();
    let mut client = PropagateAbortLayer::new().layer(service_fn({
        let in_flight = in_flight.clone();
        move |_req: Request<()>| {
            let guard = in_flight.guard();
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(())
            }
        }
    }));
    let signal = AbortSignal::new();
    let mut call = task::spawn(client.ready().await.unwrap().call(outgoing(&signal)));
    assert_pending!(call.poll());
    signal.child(); // unrelated signals change nothing
    assert_pending!(call.poll());
    signal.abort();
    assert!(call.is_woken());
    let err = match call.poll() {
        std::task::Poll::Ready(result) => result.unwrap_err(),
        std::task::Poll::Pending => panic!("still waiting for upstream"),
    };
    assert!(err.is::<Aborted>());
    assert!(
        in_flight.is_dropped(),
        "the upstream call was cancelled before the caller dropped us"
    );
}

#[tokio::test(start_paused = true)]
async fn less_than_one_unit_left_is_sent_as_one_unit_never_as_zero() {
    // 0.4 ms left: "0" (or "0.000") would tell the next hop there is no time at all, and
    // some servers read a zero timeout as "no deadline". One unit is sent instead; our own
    // call is still cancelled at our deadline, so it never runs later than that.
    let signal = server_signal(Duration::from_secs(1)).await;
    advance(Duration::from_micros(999_600)).await;
    let client = PropagateAbortLayer::new()
        .with_timeout_header(
            HeaderName::from_static("request-timeout"),
            TimeoutFormat::Milliseconds,
        )
        .layer(echo_headers(Arc::default()));
    let headers = client.oneshot(outgoing(&signal)).await.unwrap();
    assert_eq!(headers["request-timeout"], "1");
    assert_eq!(headers["grpc-timeout"], "400000n");

    let client = PropagateAbortLayer::new()
        .with_grpc_timeout(false)
        .with_timeout_header(
            HeaderName::from_static("request-timeout"),
            TimeoutFormat::Seconds,
        )
        .layer(echo_headers(Arc::default()));
    let headers = client.oneshot(outgoing(&signal)).await.unwrap();
    assert_eq!(headers["request-timeout"], "0.001");
    assert!(headers.get("grpc-timeout").is_none());
}
