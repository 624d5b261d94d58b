//! The signal fires `ClientGone` when the response future or an unfinished body is dropped,
//! and never for a response that completed.

mod support;

use std::task::Poll;

use http::{Method, Request, StatusCode};
use http_body::Body;
use support::{answer, get, hang, read_to_end, Seen, TestBody};
use tokio_test::{assert_pending, task};
use tower::{Layer, Service, ServiceExt};
use tower_abort::{AbortLayer, AbortReason, AbortSignal};

#[tokio::test(flavor = "current_thread")]
async fn complete_response_read_to_the_end_does_not_fire() {
    for body in [
        TestBody::full("hello"),
        TestBody::chunks(&["a", "b", "c"]),
        TestBody::empty(),
    ] {
        let seen = Seen::default();
        let (layer, root) = AbortLayer::pair();
        let svc = layer.layer(answer(seen.clone(), body));
        let response = svc.oneshot(get("/")).await.unwrap();
        let (_, error) = read_to_end(response.into_body()).await;
        assert_eq!(error, None);
        let signal = seen.only();
        assert!(!signal.is_aborted(), "fired for a completed response");
        assert_eq!(root.stats().total(), 0);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn body_ending_without_a_final_poll_does_not_fire() {
    // hyper stops polling once `is_end_stream` is true; the body is dropped after its last
    // frame, before a `None` is ever returned.
    let seen = Seen::default();
    let svc = AbortLayer::new().layer(answer(seen.clone(), TestBody::chunks(&["x", "y"])));
    let mut body = Box::pin(svc.oneshot(get("/")).await.unwrap().into_body());
    let mut frames = 0;
    while !body.is_end_stream() {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert!(frame.unwrap().is_ok());
        frames += 1;
    }
    assert_eq!(frames, 2);
    drop(body);
    assert!(!seen.only().is_aborted());
}

#[tokio::test(flavor = "current_thread")]
async fn dropped_response_future_fires_client_gone() {
    let seen = Seen::default();
    let (layer, root) = AbortLayer::pair();
    let mut svc = layer.layer(hang(seen.clone()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    let signal = seen.only();
    let mut waiting = task::spawn(signal.aborted());
    assert_pending!(waiting.poll());
    assert!(!signal.is_aborted());

    drop(fut);
    assert!(waiting.is_woken());
    assert_eq!(waiting.poll(), Poll::Ready(AbortReason::ClientGone));
    assert_eq!(signal.reason(), Some(AbortReason::ClientGone));
    assert_eq!(root.stats().get(AbortReason::ClientGone), 1);
    assert_eq!(root.stats().total(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn body_dropped_before_its_end_fires_client_gone() {
    let seen = Seen::default();
    let (layer, root) = AbortLayer::pair();
    let svc = layer.layer(answer(seen.clone(), TestBody::endless(&["data: 1\n\n"])));
    let response = svc.oneshot(get("/events")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = Box::pin(response.into_body());
    let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
    assert!(frame.unwrap().is_ok());
    let signal = seen.only();
    assert!(
        !signal.is_aborted(),
        "headers and a frame sent: still running"
    );

    drop(body);
    assert_eq!(signal.reason(), Some(AbortReason::ClientGone));
    assert_eq!(root.stats().get(AbortReason::ClientGone), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn unpolled_body_with_data_left_fires_client_gone() {
    let seen = Seen::default();
    let svc = AbortLayer::new().layer(answer(seen.clone(), TestBody::full("never read")));
    let response = svc.oneshot(get("/")).await.unwrap();
    drop(response);
    assert_eq!(seen.only().reason(), Some(AbortReason::ClientGone));
}

#[tokio::test(flavor = "current_thread")]
async fn bodiless_responses_dropped_unread_do_not_fire() {
    // hyper never sends (or polls) the body of a HEAD, 204 or 304 response.
    let seen = Seen::default();
    let svc = AbortLayer::new().layer(answer(seen.clone(), TestBody::full("for HEAD")));
    let head = Request::builder()
        .method(Method::HEAD)
        .uri("/")
        .body(())
        .unwrap();
    drop(svc.clone().oneshot(head).await.unwrap());
    for status in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
        let seen = seen.clone();
        let svc = AbortLayer::new().layer(tower::service_fn(move |req: Request<()>| {
            seen.record(&req);
            async move {
                let mut response = http::Response::new(TestBody::full("ignored"));
                *response.status_mut() = status;
                Ok::<_, std::convert::Infallible>(response)
            }
        }));
        drop(svc.oneshot(get("/")).await.unwrap());
    }
    let all = seen.all();
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|s| !s.is_aborted()));
}

#[tokio::test(flavor = "current_thread")]
async fn inner_error_does_not_fire() {
    let seen = Seen::default();
    let svc = AbortLayer::new().layer(tower::service_fn({
        let seen = seen.clone();
        move |req: Request<()>| {
            seen.record(&req);
            async { Err::<http::Response<TestBody>, _>("boom") }
        }
    }));
    assert_eq!(svc.oneshot(get("/")).await.unwrap_err(), "boom");
    assert!(!seen.only().is_aborted());
}

#[tokio::test(flavor = "current_thread")]
async fn explicit_abort_is_reported_once_and_not_overwritten_by_the_drop() {
    let seen = Seen::default();
    let (layer, root) = AbortLayer::pair();
    let mut svc = layer.layer(hang(seen.clone()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    let signal = seen.only();
    assert!(signal.abort());
    drop(fut);
    assert_eq!(signal.reason(), Some(AbortReason::Explicit));
    let stats = root.stats();
    assert_eq!(stats.get(AbortReason::Explicit), 1);
    assert_eq!(stats.total(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn on_abort_sees_499_with_the_request_line() {
    let seen = Seen::default();
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let layer = AbortLayer::new().on_abort({
        let events = events.clone();
        move |e| {
            events.lock().unwrap().push((
                e.status(),
                e.reason(),
                e.method().clone(),
                e.uri().unwrap().to_string(),
            ))
        }
    });
    let mut svc = layer.layer(hang(seen.clone()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/slow?x=1")));
    assert_pending!(fut.poll());
    drop(fut);
    assert_eq!(
        *events.lock().unwrap(),
        vec![(
            499,
            AbortReason::ClientGone,
            Method::GET,
            "/slow?x=1".to_owned()
        )]
    );
}

#[cfg(feature = "tracing")]
#[tokio::test(flavor = "current_thread")]
async fn tracing_event_at_the_moment_it_fires() {
    let (_guard, logs) = support::capture_logs();
    let seen = Seen::default();
    let mut svc = AbortLayer::new().layer(hang(seen.clone()));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    assert!(!logs.contents().contains("request aborted"));
    drop(fut);
    let logs = logs.contents();
    assert!(logs.contains("request aborted"), "{logs}");
    assert!(
        logs.contains("reason=\"client_gone\"") && logs.contains("status=499"),
        "{logs}"
    );
}

/// Records the signal's reason at the moment it is dropped.
struct ReasonOnDrop(
    AbortSignal,
    std::sync::Arc<std::sync::Mutex<Option<Option<AbortReason>>>>,
);

impl Drop for ReasonOnDrop {
    fn drop(&mut self) {
        *self.1.lock().unwrap() = Some(self.0.reason());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_signal_fires_before_the_handler_and_the_body_are_dropped() {
    // Drop code in the handler (a transaction guard, a cleanup) sees why it is dropped.
    let at_drop = std::sync::Arc::new(std::sync::Mutex::new(None));
    let mut svc = AbortLayer::new().layer(tower::service_fn({
        let at_drop = at_drop.clone();
        move |req: Request<()>| {
            let witness = ReasonOnDrop(
                req.extensions().get::<AbortSignal>().unwrap().clone(),
                at_drop.clone(),
            );
            async move {
                let _witness = witness;
                std::future::pending::<()>().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(TestBody::empty()))
            }
        }
    }));
    let mut fut = task::spawn(svc.ready().await.unwrap().call(get("/")));
    assert_pending!(fut.poll());
    drop(fut);
    assert_eq!(
        *at_drop.lock().unwrap(),
        Some(Some(AbortReason::ClientGone))
    );
}

/// A body that sends one data frame and then trailers, and only learns it has ended when
/// polled once more (like `http_body_util::StreamBody` or a gRPC encoder).
struct DataThenTrailers(u8);

impl Body for DataThenTrailers {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0 += 1;
        Poll::Ready(match self.0 {
            1 => Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"x")))),
            2 => Some(Ok(http_body::Frame::trailers(http::HeaderMap::new()))),
            _ => None,
        })
    }
}

#[tokio::test(flavor = "current_thread")]
async fn body_dropped_right_after_its_trailers_does_not_fire() {
    // Trailers are a body's last frame: hyper (HTTP/1 and HTTP/2) sends them and drops the
    // body without polling it again.
    let seen = Seen::default();
    let svc = AbortLayer::new().layer(tower::service_fn({
        let seen = seen.clone();
        move |req: Request<()>| {
            seen.record(&req);
            async { Ok::<_, std::convert::Infallible>(http::Response::new(DataThenTrailers(0))) }
        }
    }));
    let mut body = Box::pin(svc.oneshot(get("/")).await.unwrap().into_body());
    let data = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
    assert!(data.unwrap().unwrap().is_data());
    let trailers = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
    assert!(trailers.unwrap().unwrap().is_trailers());
    drop(body);
    assert_eq!(
        seen.only().reason(),
        None,
        "fired after the trailers were sent"
    );
}
