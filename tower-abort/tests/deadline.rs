//! Deadlines: the server default, client headers, the two timeout modes, and 504.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use support::{answer, cooperative, get, hang, read_to_end, DropFlag, Seen, TestBody};
use tokio::time::{advance, Instant};
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{service_fn, Layer, ServiceExt};
use tower_abort::{AbortLayer, AbortReason, TimeoutFormat, TimeoutMode};

const MS: Duration = Duration::from_millis(1);

fn with_header(name: &'static str, value: &[u8]) -> Request<()> {
    let mut req = get("/");
    req.headers_mut()
        .append(name, HeaderValue::from_bytes(value).unwrap());
    req
}

#[tokio::test(start_paused = true)]
async fn deadline_fires_on_time_the_handler_returns_and_the_client_gets_504() {
    let start = Instant::now();
    let seen = Seen::default();
    let finished = DropFlag::default();
    let (layer, root) = AbortLayer::pair();
    let svc = layer
        .with_timeout(Duration::from_secs(2))
        .layer(service_fn({
            let seen = seen.clone();
            let finished = finished.clone();
            move |req: Request<()>| {
                let signal = seen.record(&req);
                let finished = finished.guard();
                async move {
                    let reason = signal.aborted().await;
                    // Cooperative: the handler sees the reason and answers on its own.
                    assert_eq!(reason, AbortReason::DeadlineExceeded);
                    assert_eq!(Instant::now(), start + Duration::from_secs(2));
                    drop(finished);
                    Ok::<_, Infallible>(Response::new(TestBody::full("partial result")))
                }
            }
        }));
    let mut fut = task::spawn(svc.oneshot(get("/")));
    assert_pending!(fut.poll());
    let signal = seen.only();
    assert_eq!(signal.deadline(), Some(start + Duration::from_secs(2)));
    assert_eq!(signal.remaining(), Some(Duration::from_secs(2)));

    advance(Duration::from_secs(2) - MS).await;
    assert_pending!(fut.poll());
    assert!(!signal.is_aborted());
    assert_eq!(signal.remaining(), Some(MS));

    advance(MS).await;
    let response = assert_ready_ok!(fut.poll());
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(finished.is_dropped(), "the handler returned by itself");
    assert_eq!(signal.reason(), Some(AbortReason::DeadlineExceeded));
    assert_eq!(signal.remaining(), Some(Duration::ZERO));
    assert_eq!(read_to_end(response.into_body()).await, (Vec::new(), None));
    assert_eq!(root.stats().get(AbortReason::DeadlineExceeded), 1);
    assert_eq!(root.stats().total(), 1);
}

#[tokio::test(start_paused = true)]
async fn grpc_timeout_100m_shortens_a_10s_default() {
    let start = Instant::now();
    let seen = Seen::default();
    let layer = AbortLayer::new()
        .with_timeout(Duration::from_secs(10))
        .with_grpc_timeout(true);
    let svc = layer.layer(cooperative(seen.clone()));
    let mut fut = task::spawn(svc.oneshot(with_header("grpc-timeout", b"100m")));
    assert_pending!(fut.poll());
    assert_eq!(
        seen.only().deadline(),
        Some(start + Duration::from_millis(100))
    );
    advance(Duration::from_millis(99)).await;
    assert_pending!(fut.poll());
    advance(MS).await;
    assert_eq!(
        assert_ready_ok!(fut.poll()).status(),
        StatusCode::GATEWAY_TIMEOUT
    );
    assert_eq!(seen.only().reason(), Some(AbortReason::DeadlineExceeded));
}

#[tokio::test(start_paused = true)]
async fn client_deadlines_only_shorten_and_the_soonest_wins() {
    let start = Instant::now();
    let layer = AbortLayer::new()
        .with_timeout(Duration::from_secs(10))
        .with_grpc_timeout(true)
        .with_timeout_header(
            http::HeaderName::from_static("request-timeout"),
            TimeoutFormat::Milliseconds,
        );
    let cases: Vec<(Request<()>, Duration)> = vec![
        (with_header("grpc-timeout", b"1H"), Duration::from_secs(10)),
        (
            with_header("request-timeout", b"1500"),
            Duration::from_millis(1500),
        ),
        (
            {
                let mut r = with_header("request-timeout", b"700");
                r.headers_mut()
                    .append("grpc-timeout", HeaderValue::from_static("2S"));
                r.headers_mut()
                    .append("grpc-timeout", HeaderValue::from_static("300m"));
                r
            },
            Duration::from_millis(300),
        ),
        (get("/"), Duration::from_secs(10)),
    ];
    for (req, expected) in cases {
        let seen = Seen::default();
        let svc = layer.clone().layer(answer(seen.clone(), TestBody::empty()));
        drop(svc.oneshot(req).await.unwrap());
        assert_eq!(seen.only().deadline(), Some(start + expected));
    }
}

#[tokio::test(start_paused = true)]
async fn client_headers_are_ignored_unless_enabled() {
    let seen = Seen::default();
    let svc = AbortLayer::new().layer(answer(seen.clone(), TestBody::empty()));
    drop(
        svc.oneshot(with_header("grpc-timeout", b"1m"))
            .await
            .unwrap(),
    );
    assert_eq!(seen.only().deadline(), None);
}

#[tokio::test(start_paused = true)]
async fn bad_deadline_headers_are_ignored_with_a_debug_log() {
    let (_guard, logs) = support::capture_logs();
    let start = Instant::now();
    let layer = AbortLayer::new()
        .with_timeout(Duration::from_secs(10))
        .with_grpc_timeout(true)
        .with_timeout_header(
            http::HeaderName::from_static("request-timeout"),
            TimeoutFormat::Seconds,
        );
    let bad: &[(&str, &[u8])] = &[
        ("grpc-timeout", b"garbage"),
        ("grpc-timeout", b"-5S"),
        ("grpc-timeout", b"+5S"),
        ("grpc-timeout", b"123456789m"), // nine digits
        ("grpc-timeout", b"99999999999999999999999999n"), // overflows u64
        ("grpc-timeout", b"5"),          // no unit
        ("grpc-timeout", b"5x"),         // unknown unit
        ("grpc-timeout", b""),
        ("grpc-timeout", b"\xff1S"), // not ASCII
        ("request-timeout", b"-1"),
        ("request-timeout", b"1e9"),
        ("request-timeout", b"18446744073709551616"), // overflows u64
        ("request-timeout", b"1.5.1"),
        ("request-timeout", b"NaN"),
    ];
    for (name, value) in bad {
        let seen = Seen::default();
        let svc = layer.clone().layer(answer(seen.clone(), TestBody::empty()));
        let response = svc.oneshot(with_header(name, value)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            seen.only().deadline(),
            Some(start + Duration::from_secs(10)),
            "{name}: {value:?} must be ignored"
        );
    }
    if cfg!(feature = "tracing") {
        let logs = logs.contents();
        assert_eq!(
            logs.matches("ignoring deadline header").count(),
            bad.len(),
            "{logs}"
        );
        assert!(logs.contains("DEBUG"), "{logs}");
    }

    // The longest valid values neither panic nor overflow the clock, with no server default.
    for value in [&b"99999999H"[..], b"99999999n"] {
        let seen = Seen::default();
        let svc = AbortLayer::new()
            .with_grpc_timeout(true)
            .layer(answer(seen.clone(), TestBody::empty()));
        drop(
            svc.oneshot(with_header("grpc-timeout", value))
                .await
                .unwrap(),
        );
        assert!(seen.only().deadline().is_some());
    }
}

#[tokio::test(start_paused = true)]
async fn drop_mode_drops_the_handler_at_the_deadline() {
    let dropped = DropFlag::default();
    let seen = Seen::default();
    let layer = AbortLayer::new()
        .with_timeout(Duration::from_secs(1))
        .with_mode(TimeoutMode::Drop);
    let svc = layer.layer(service_fn({
        let seen = seen.clone();
        let dropped = dropped.clone();
        move |req: Request<()>| {
            seen.record(&req);
            let guard = dropped.guard();
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(Response::new(TestBody::empty()))
            }
        }
    }));
    let mut fut = task::spawn(svc.oneshot(get("/")));
    assert_pending!(fut.poll());
    advance(Duration::from_secs(1) - MS).await;
    assert_pending!(fut.poll());
    assert!(!dropped.is_dropped());
    advance(MS).await;
    let response = assert_ready_ok!(fut.poll());
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(dropped.is_dropped());
    assert_eq!(seen.only().reason(), Some(AbortReason::DeadlineExceeded));
}

#[tokio::test(start_paused = true)]
async fn cooperative_mode_drops_a_handler_that_ignores_the_signal_after_the_grace() {
    let seen = Seen::default();
    let layer = AbortLayer::new()
        .with_timeout(Duration::from_secs(1))
        .with_mode(TimeoutMode::Cooperative {
            grace: Duration::from_millis(500),
        })
        .with_timeout_status(StatusCode::SERVICE_UNAVAILABLE);
    let svc = layer.layer(hang(seen.clone()));
    let mut fut = task::spawn(svc.oneshot(get("/")));
    assert_pending!(fut.poll());
    advance(Duration::from_secs(1)).await;
    assert_pending!(fut.poll());
    assert_eq!(
        seen.only().reason(),
        Some(AbortReason::DeadlineExceeded),
        "fired at the deadline"
    );
    advance(Duration::from_millis(499)).await;
    assert_pending!(fut.poll());
    advance(MS).await;
    assert_eq!(
        assert_ready_ok!(fut.poll()).status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(start_paused = true)]
async fn deadline_after_headers_ends_the_body_with_an_error() {
    for mode in [
        TimeoutMode::Drop,
        TimeoutMode::Cooperative {
            grace: Duration::from_millis(200),
        },
    ] {
        let seen = Seen::default();
        let layer = AbortLayer::new()
            .with_timeout(Duration::from_secs(1))
            .with_mode(mode);
        let svc = layer.layer(answer(seen.clone(), TestBody::endless(&["data: 1\n\n"])));
        let response = svc.oneshot(get("/events")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut read = task::spawn(read_to_end(response.into_body()));
        assert_pending!(read.poll());
        advance(Duration::from_secs(1)).await;
        let signal = seen.only();
        if let TimeoutMode::Cooperative { grace } = mode {
            assert_pending!(read.poll());
            assert_eq!(signal.reason(), Some(AbortReason::DeadlineExceeded));
            advance(grace).await;
        }
        let (data, error) = match read.poll() {
            std::task::Poll::Ready(out) => out,
            std::task::Poll::Pending => panic!("{mode:?}: body still open after the deadline"),
        };
        assert_eq!(data, b"data: 1\n\n");
        assert_eq!(error.as_deref(), Some("request aborted: deadline exceeded"));
        assert_eq!(signal.reason(), Some(AbortReason::DeadlineExceeded));
    }
}

#[tokio::test(start_paused = true)]
async fn completed_request_leaves_no_timer_behind() {
    let seen = Seen::default();
    let (layer, root) = AbortLayer::pair();
    let svc = layer
        .with_timeout(Duration::from_secs(1))
        .layer(answer(seen.clone(), TestBody::full("ok")));
    let response = svc.oneshot(get("/")).await.unwrap();
    assert_eq!(read_to_end(response.into_body()).await.1, None);
    advance(Duration::from_secs(5)).await;
    assert!(!seen.only().is_aborted());
    assert_eq!(root.stats().total(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_grpc_call_past_its_deadline_gets_grpc_status_4() {
    let seen = Seen::default();
    let layer = AbortLayer::new()
        .with_timeout(Duration::from_secs(10))
        .with_grpc_timeout(true);
    let svc = layer.layer(hang(seen.clone()));
    let mut req = with_header("grpc-timeout", b"100m");
    req.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/grpc+proto"),
    );
    let mut fut = task::spawn(svc.clone().oneshot(req));
    assert_pending!(fut.poll());
    advance(Duration::from_millis(100) + TimeoutMode::DEFAULT_GRACE).await;
    let response = assert_ready_ok!(fut.poll());
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "4");
    assert_eq!(response.headers()["content-type"], "application/grpc");
    assert_eq!(seen.only().reason(), Some(AbortReason::DeadlineExceeded));

    // Plain HTTP requests keep the HTTP status.
    let mut fut = task::spawn(svc.oneshot(with_header("grpc-timeout", b"100m")));
    assert_pending!(fut.poll());
    advance(Duration::from_millis(100) + TimeoutMode::DEFAULT_GRACE).await;
    assert_eq!(
        assert_ready_ok!(fut.poll()).status(),
        StatusCode::GATEWAY_TIMEOUT
    );
}

/// A stream whose next frame is always ready (a fast producer): it never returns `Pending`.
struct AlwaysReady;

impl http_body::Body for AlwaysReady {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"x",
        )))))
    }
}

#[tokio::test(start_paused = true)]
async fn deadline_ends_a_body_whose_frames_are_always_ready() {
    use http_body_util::BodyExt;
    let seen = Seen::default();
    let layer = AbortLayer::new()
        .with_timeout(Duration::from_secs(1))
        .with_mode(TimeoutMode::Drop);
    let svc = layer.layer(service_fn({
        let seen = seen.clone();
        move |req: Request<()>| {
            seen.record(&req);
            async { Ok::<_, Infallible>(Response::new(AlwaysReady)) }
        }
    }));
    let mut body = svc.oneshot(get("/download")).await.unwrap().into_body();
    assert!(body.frame().await.unwrap().is_ok());
    advance(Duration::from_secs(1)).await;
    // Bounded: the next poll after the deadline must end the body.
    let mut ended = None;
    for _ in 0..3 {
        if let Err(e) = body.frame().await.unwrap() {
            ended = Some(e.to_string());
            break;
        }
    }
    assert_eq!(ended.as_deref(), Some("request aborted: deadline exceeded"));
    assert_eq!(seen.only().reason(), Some(AbortReason::DeadlineExceeded));
}
