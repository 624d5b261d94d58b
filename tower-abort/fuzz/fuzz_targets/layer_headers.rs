//! Whole requests through `AbortLayer` with `grpc-timeout` and a `request-timeout` header
//! made of fuzzed bytes (several values each): the layer never panics, always answers, and
//! the request's deadline is the soonest valid header value (or the server's timeout).
#![no_main]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response};
use libfuzzer_sys::fuzz_target;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service};
use tower_abort::{AbortLayer, AbortSignal, TimeoutFormat};

const SERVER_TIMEOUT: Duration = Duration::from_secs(3600);

thread_local! {
    static SEEN: std::cell::RefCell<Option<AbortSignal>> = const { std::cell::RefCell::new(None) };
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let format = if selector & 1 == 0 {
        TimeoutFormat::Milliseconds
    } else {
        TimeoutFormat::Seconds
    };
    let custom = HeaderName::from_static("request-timeout");
    let mut req = Request::new(());
    let mut expected: Option<Duration> = Some(SERVER_TIMEOUT);
    // Values separated by 0xff; even ones go to grpc-timeout, odd ones to request-timeout.
    for (i, value) in rest.split(|&b| b == 0xff).enumerate().take(8) {
        let Ok(header) = HeaderValue::from_bytes(value) else {
            continue;
        };
        let (name, parsed) = if i % 2 == 0 {
            (
                HeaderName::from_static("grpc-timeout"),
                TimeoutFormat::Grpc.parse(value),
            )
        } else {
            (custom.clone(), format.parse(value))
        };
        if let Ok(d) = parsed {
            expected = expected.map(|e| e.min(d));
        }
        req.headers_mut().append(name, header);
    }

    let _enter = runtime().enter();
    let mut svc = AbortLayer::new()
        .with_timeout(SERVER_TIMEOUT)
        .with_grpc_timeout(true)
        .with_timeout_header(custom, format)
        .layer(service_fn(|req: Request<()>| {
            let signal = req.extensions().get::<AbortSignal>().unwrap().clone();
            SEEN.with(|seen| *seen.borrow_mut() = Some(signal));
            std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
        }));
    let before = Instant::now();
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let mut fut = pin!(svc.call(req));
    let Poll::Ready(Ok(_response)) = fut.as_mut().poll(&mut cx) else {
        panic!("a ready handler is answered at once");
    };
    let signal = SEEN
        .with(|seen| seen.borrow_mut().take())
        .expect("the handler ran");
    let deadline = signal.deadline().expect("the server timeout applies");
    let expected = before + expected.unwrap();
    assert_eq!(deadline, expected, "time is paused");
});
