//! The HTTP layer: every "must hold" property of the issue, and the safety rules.

mod support;

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use futures::future::join_all;
use http::{header, Request, Response, StatusCode};
use http_body::Frame;
use support::{channel, collect, full, get, payload, until, Backend, Body};
use tokio::sync::watch;
use tower::{service_fn, Layer, ServiceExt};
use tower_singleflight::{
    error::{BoxError, Lagged, SharedError},
    BypassReason, CredentialPolicy, ErrorPolicy, HeaderPolicy, SingleflightLayer, Stats,
    WaitTimeoutPolicy,
};

/// A gate the backend waits on, opened by the test.
fn gate() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

async fn wait_open(mut gate: watch::Receiver<bool>) {
    gate.wait_for(|open| *open).await.unwrap();
}

/// A backend that counts itself active in `backend`, waits for the gate, then answers
/// `body`.
fn gated_backend(
    backend: &Arc<Backend>,
    gate_rx: watch::Receiver<bool>,
    body: &'static str,
) -> impl tower::Service<
    Request<()>,
    Response = Response<Body>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static {
    let backend = Arc::clone(backend);
    service_fn(move |_req: Request<()>| {
        let (backend, gate_rx) = (Arc::clone(&backend), gate_rx.clone());
        async move {
            let _active = backend.enter();
            wait_open(gate_rx).await;
            Ok::<_, Infallible>(Response::new(full(body)))
        }
    })
}

fn assert_clean(stats: &Stats) {
    assert_eq!(
        stats.in_flight(),
        0,
        "no flight outlives its requests: {stats:?}"
    );
}

type Sender = futures::channel::mpsc::UnboundedSender<Result<Frame<Bytes>, std::io::Error>>;

/// `n` concurrent requests sharing one streamed response whose body the test feeds
/// through the returned sender. The head is held back until all `n` have joined.
async fn shared_stream(
    layer: SingleflightLayer,
    n: usize,
) -> (
    Vec<Response<tower_singleflight::SingleflightBody<Body>>>,
    Sender,
    Stats,
) {
    let (tx, body) = channel();
    let body = Arc::new(std::sync::Mutex::new(Some(body)));
    let (open, gate_rx) = gate();
    let inner = service_fn(move |_req: Request<()>| {
        let body = body.lock().unwrap().take().expect("called once");
        let gate_rx = gate_rx.clone();
        async move {
            wait_open(gate_rx).await;
            Ok::<_, Infallible>(Response::new(body))
        }
    });
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/stream"))))
        .collect();
    until(|| (stats.leaders() + stats.followers()) as usize == n).await;
    assert_eq!(stats.leaders(), 1);
    open.send(true).unwrap();
    let mut responses = Vec::new();
    for t in tasks {
        responses.push(t.await.unwrap().unwrap());
    }
    (responses, tx, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_identical_requests_call_the_inner_service_once() {
    let backend = Backend::new();
    let (open, gate_rx) = gate();
    let body = payload(64 * 1024);
    let inner = {
        let (backend, body) = (Arc::clone(&backend), body.clone());
        service_fn(move |_req: Request<()>| {
            let (backend, body, gate_rx) = (Arc::clone(&backend), body.clone(), gate_rx.clone());
            async move {
                let _active = backend.enter();
                wait_open(gate_rx).await;
                Ok::<_, Infallible>(Response::new(full(body)))
            }
        })
    };
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { collect(svc.oneshot(get("/big?x=1")).await.unwrap()).await })
        })
        .collect();
    until(|| stats.leaders() + stats.followers() == 1000).await;
    open.send(true).unwrap();
    for result in join_all(tasks).await {
        assert_eq!(result.unwrap().unwrap(), body, "byte-identical bodies");
    }
    assert_eq!(backend.calls(), 1);
    assert_eq!((stats.leaders(), stats.followers()), (1, 999));
    assert_clean(&stats);
}

#[tokio::test]
async fn leader_disconnecting_before_the_head_does_not_stop_the_work() {
    let backend = Backend::new();
    let (open, gate_rx) = gate();
    let inner = {
        let backend = Arc::clone(&backend);
        service_fn(move |_req: Request<()>| {
            let (backend, gate_rx) = (Arc::clone(&backend), gate_rx.clone());
            async move {
                let _active = backend.enter();
                wait_open(gate_rx).await;
                Ok::<_, Infallible>(Response::new(full(payload(300_000))))
            }
        })
    };
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let leader = tokio::spawn(svc.clone().oneshot(get("/x")));
    until(|| stats.leaders() == 1).await;
    let followers: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/x"))))
        .collect();
    until(|| stats.followers() == 5).await;
    tokio::task::yield_now().await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    open.send(true).unwrap();
    for f in followers {
        let response = f.await.unwrap().unwrap();
        assert_eq!(collect(response).await.unwrap(), payload(300_000));
    }
    assert_eq!(backend.calls(), 1);
    assert_clean(&stats);
}

#[tokio::test]
async fn leader_disconnecting_mid_body_leaves_followers_the_full_body() {
    let (mut responses, tx, stats) = shared_stream(SingleflightLayer::new(), 4).await;
    let mut leader = responses.remove(0);
    tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"first "))))
        .unwrap();
    let first = http_body_util::BodyExt::frame(leader.body_mut())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first ");
    drop(leader); // the leader's client goes away mid-body
    tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"second"))))
        .unwrap();
    drop(tx);
    for f in responses {
        assert_eq!(collect(f).await.unwrap(), "first second");
    }
    assert_clean(&stats);
}

#[tokio::test]
async fn all_waiters_leaving_drops_the_inner_future_and_frees_the_key() {
    let backend = Backend::new();
    let dropped = Arc::new(AtomicUsize::new(0));
    struct Flag(Arc<AtomicUsize>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }
    let inner = {
        let (backend, dropped) = (Arc::clone(&backend), Arc::clone(&dropped));
        service_fn(move |_req: Request<()>| {
            let flag = Flag(Arc::clone(&dropped));
            let backend = Arc::clone(&backend);
            async move {
                let _flag = flag;
                let _active = backend.enter();
                std::future::pending::<()>().await;
                Ok::<_, Infallible>(Response::new(full("never")))
            }
        })
    };
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let waiters: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/slow"))))
        .collect();
    until(|| backend.active() == 1 && stats.followers() == 3).await;
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        assert!(w.await.unwrap_err().is_cancelled());
    }
    assert_eq!(dropped.load(SeqCst), 1, "the work stopped");
    assert_eq!(backend.active(), 0);
    assert_clean(&stats);
    // The key is free: the next request leads a new flight.
    let next = tokio::spawn(svc.clone().oneshot(get("/slow")));
    until(|| stats.leaders() == 2).await;
    next.abort();
    let _ = next.await;
    assert_clean(&stats);
}

#[tokio::test]
async fn a_leader_panic_reaches_every_waiter_as_an_error() {
    let (open, gate_rx) = gate();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = {
        let calls = Arc::clone(&calls);
        service_fn(move |_req: Request<()>| {
            let gate_rx = gate_rx.clone();
            let n = calls.fetch_add(1, SeqCst);
            async move {
                if n == 0 {
                    wait_open(gate_rx).await;
                    panic!("handler bug");
                }
                Ok::<_, Infallible>(Response::new(full("recovered")))
            }
        })
    };
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let waiters: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/boom"))))
        .collect();
    until(|| stats.leaders() + stats.followers() == 10).await;
    open.send(true).unwrap();
    for w in waiters {
        let err = w.await.expect("no task panicked").unwrap_err();
        let err = err
            .downcast_ref::<tower_singleflight::FlightError>()
            .unwrap();
        assert!(err.is_panic());
    }
    assert_clean(&stats);
    let after = svc.oneshot(get("/boom")).await.unwrap();
    assert_eq!(collect(after).await.unwrap(), "recovered");
    assert_eq!(calls.load(SeqCst), 2);
}

/// Two requests held in flight together, so they coalesce if they may.
async fn two_concurrent(layer: SingleflightLayer, a: Request<()>, b: Request<()>) -> usize {
    let backend = Backend::new();
    let (open, gate_rx) = gate();
    let inner = gated_backend(&backend, gate_rx, "hi");
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let a = tokio::spawn(svc.clone().oneshot(a));
    let b = tokio::spawn(svc.clone().oneshot(b));
    until(|| {
        let seen = stats.leaders() + stats.followers() + stats.bypassed(BypassReason::Credentials);
        seen == 2 || backend.calls() == 2
    })
    .await;
    open.send(true).unwrap();
    for r in [a, b] {
        assert_eq!(collect(r.await.unwrap().unwrap()).await.unwrap(), "hi");
    }
    assert_clean(&stats);
    backend.calls()
}

fn with_auth(token: &str) -> Request<()> {
    Request::get("/me")
        .header("host", "example.com")
        .header(header::AUTHORIZATION, token)
        .body(())
        .unwrap()
}

#[tokio::test]
async fn credentials_are_not_coalesced_unless_partitioned() {
    let calls = two_concurrent(
        SingleflightLayer::new(),
        with_auth("Bearer a"),
        with_auth("Bearer b"),
    )
    .await;
    assert_eq!(calls, 2, "different Authorization: two calls");
    let calls = two_concurrent(
        SingleflightLayer::new(),
        with_auth("Bearer a"),
        with_auth("Bearer a"),
    )
    .await;
    assert_eq!(calls, 2, "credentials bypass by default");
    let partitioned = || SingleflightLayer::new().credentials(CredentialPolicy::Partition);
    let calls = two_concurrent(partitioned(), with_auth("Bearer a"), with_auth("Bearer a")).await;
    assert_eq!(calls, 1, "partitioning on, equal credentials: one call");
    let calls = two_concurrent(partitioned(), with_auth("Bearer a"), with_auth("Bearer b")).await;
    assert_eq!(
        calls, 2,
        "partitioning on, different credentials: two calls"
    );
    let cookie = |c: &str| {
        Request::get("/me")
            .header("host", "example.com")
            .header(header::COOKIE, c)
            .body(())
            .unwrap()
    };
    let calls = two_concurrent(SingleflightLayer::new(), cookie("sid=1"), cookie("sid=1")).await;
    assert_eq!(calls, 2, "cookies bypass by default");
}

#[tokio::test]
async fn set_cookie_is_not_shared_and_followers_run_in_parallel() {
    const FOLLOWERS: usize = 8;
    let backend = Backend::new();
    let (open_leader, leader_gate) = gate();
    let (open_rest, rest_gate) = gate();
    let inner = {
        let backend = Arc::clone(&backend);
        service_fn(move |_req: Request<()>| {
            let backend = Arc::clone(&backend);
            let (leader_gate, rest_gate) = (leader_gate.clone(), rest_gate.clone());
            async move {
                let first = backend.calls() == 0;
                let _active = backend.enter();
                let n = backend.calls();
                if first {
                    wait_open(leader_gate).await;
                } else {
                    // Held until every follower's own call has started.
                    wait_open(rest_gate).await;
                }
                let response = Response::builder()
                    .header(header::SET_COOKIE, format!("sid={n}"))
                    .body(full(format!("user {n}")))
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let leader = tokio::spawn(svc.clone().oneshot(get("/login")));
    until(|| backend.calls() == 1).await;
    let followers: Vec<_> = (0..FOLLOWERS)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/login"))))
        .collect();
    until(|| stats.followers() == FOLLOWERS as u64).await;
    open_leader.send(true).unwrap();
    let leader = leader.await.unwrap().unwrap();
    assert_eq!(leader.headers()[header::SET_COOKIE], "sid=1");
    // Every follower's own call is in progress at the same time: parallel, not serial.
    until(|| backend.active() == FOLLOWERS).await;
    assert_eq!(backend.max_active(), FOLLOWERS);
    open_rest.send(true).unwrap();
    let mut cookies = Vec::new();
    for f in followers {
        let response = f.await.unwrap().unwrap();
        cookies.push(
            response.headers()[header::SET_COOKIE]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    cookies.sort();
    cookies.dedup();
    assert_eq!(cookies.len(), FOLLOWERS, "nobody got someone else's cookie");
    assert!(!cookies.contains(&"sid=1".to_owned()));
    assert_eq!(stats.bypassed(BypassReason::SetCookie), 1);
    assert_eq!(stats.fallbacks(), FOLLOWERS as u64);
    assert_eq!(backend.calls(), FOLLOWERS + 1);
    assert_clean(&stats);
}

#[tokio::test]
async fn private_or_uncacheable_responses_are_not_shared() {
    for (name, value, reason) in [
        (
            header::CACHE_CONTROL,
            "max-age=0, Private",
            BypassReason::CacheControl,
        ),
        (
            header::CACHE_CONTROL,
            "no-store",
            BypassReason::CacheControl,
        ),
        (
            header::CACHE_CONTROL,
            "no-cache=\"x\"",
            BypassReason::CacheControl,
        ),
        (header::VARY, "accept, *", BypassReason::VaryStar),
    ] {
        let backend = Backend::new();
        let (open, gate_rx) = gate();
        let inner = {
            let backend = Arc::clone(&backend);
            let name = name.clone();
            service_fn(move |_req: Request<()>| {
                let (backend, gate_rx, name) =
                    (Arc::clone(&backend), gate_rx.clone(), name.clone());
                async move {
                    let _active = backend.enter();
                    wait_open(gate_rx).await;
                    let response = Response::builder()
                        .header(name, value)
                        .body(full("x"))
                        .unwrap();
                    Ok::<_, Infallible>(response)
                }
            })
        };
        let layer = SingleflightLayer::new();
        let stats = layer.stats();
        let svc = layer.layer(inner);
        let a = tokio::spawn(svc.clone().oneshot(get("/p")));
        let b = tokio::spawn(svc.clone().oneshot(get("/p")));
        until(|| stats.followers() == 1).await;
        open.send(true).unwrap();
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        assert_eq!(backend.calls(), 2, "{value}");
        assert_eq!(stats.bypassed(reason), 1);
        assert_clean(&stats);
    }
}

#[tokio::test]
async fn disallowed_status_is_not_shared() {
    let backend = Backend::new();
    let inner = {
        let backend = Arc::clone(&backend);
        service_fn(move |_req: Request<()>| {
            let backend = Arc::clone(&backend);
            async move {
                let _active = backend.enter();
                tokio::task::yield_now().await;
                let mut response = Response::new(full("oops"));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                Ok::<_, Infallible>(response)
            }
        })
    };
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let (a, b) = tokio::join!(
        svc.clone().oneshot(get("/e")),
        svc.clone().oneshot(get("/e"))
    );
    assert_eq!(a.unwrap().status(), 500);
    assert_eq!(b.unwrap().status(), 500);
    assert_eq!(backend.calls(), 2);
    assert_eq!(stats.bypassed(BypassReason::Status), 1);
    assert_clean(&stats);
}

#[tokio::test]
async fn a_body_error_after_one_mebibyte_reaches_every_follower() {
    let (responses, tx, stats) = shared_stream(SingleflightLayer::new(), 6).await;
    let readers: Vec<_> = responses
        .into_iter()
        .map(|r| tokio::spawn(collect(r)))
        .collect();
    for _ in 0..16 {
        tx.unbounded_send(Ok(Frame::data(payload(64 * 1024))))
            .unwrap();
        tokio::task::yield_now().await;
    }
    tx.unbounded_send(Err(std::io::Error::other("upstream reset")))
        .unwrap();
    for r in readers {
        let err = r.await.unwrap().expect_err("an error, never a clean end");
        let shared = err.downcast_ref::<SharedError>().expect("the shared error");
        assert_eq!(
            std::error::Error::source(shared).unwrap().to_string(),
            "upstream reset"
        );
    }
    assert_clean(&stats);
}

#[tokio::test(start_paused = true)]
async fn a_slow_follower_cannot_stall_the_leader_or_other_followers() {
    const MAX: usize = 256 * 1024;
    const CHUNK: usize = 32 * 1024;
    const CHUNKS: usize = 64; // 2 MiB, eight times the buffer
    let (mut responses, tx, stats) =
        shared_stream(SingleflightLayer::new().max_shared_body(MAX), 4).await;
    // One follower reads its first frame, then stops reading (a slow client).
    let mut slow = responses.pop().unwrap();
    let fast: Vec<_> = responses
        .into_iter()
        .map(|r| tokio::spawn(collect(r)))
        .collect();
    tx.unbounded_send(Ok(Frame::data(payload(CHUNK)))).unwrap();
    let first = http_body_util::BodyExt::frame(slow.body_mut())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap().len(), CHUNK);
    let started = tokio::time::Instant::now();
    for _ in 1..CHUNKS {
        tx.unbounded_send(Ok(Frame::data(payload(CHUNK)))).unwrap();
    }
    drop(tx);
    // The leader and the other followers finish, whole, while the slow one sleeps.
    for f in fast {
        assert_eq!(f.await.unwrap().unwrap().len(), CHUNK * CHUNKS);
    }
    // They waited for the slow one at most the lag timeout (virtual time), once.
    assert!(started.elapsed() <= tower_singleflight::DEFAULT_LAG_TIMEOUT);
    // The slow follower was cut off: an error, not a truncated clean end.
    let err = collect(slow).await.unwrap_err();
    assert!(err.is::<Lagged>(), "{err}");
    assert_eq!(stats.lagged(), 1);
    assert_clean(&stats);
}

#[tokio::test]
async fn a_follower_within_the_buffer_gets_everything() {
    let layer = SingleflightLayer::new().max_shared_body(1024 * 1024);
    let (mut responses, tx, stats) = shared_stream(layer, 2).await;
    let (b, a) = (responses.pop().unwrap(), responses.pop().unwrap());
    let fast = tokio::spawn(collect(a));
    for _ in 0..8 {
        tx.unbounded_send(Ok(Frame::data(payload(64 * 1024))))
            .unwrap();
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "42".parse().unwrap());
    tx.unbounded_send(Ok(Frame::trailers(trailers))).unwrap();
    drop(tx);
    assert_eq!(fast.await.unwrap().unwrap().len(), 512 * 1024);
    // Read late, but within the buffer: the whole body and the trailers.
    let collected = http_body_util::BodyExt::collect(b.into_body())
        .await
        .unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "42");
    assert_eq!(collected.to_bytes().len(), 512 * 1024);
    assert_clean(&stats);
}

#[tokio::test]
async fn head_joins_a_get_flight_and_gets_the_head_only() {
    let backend = Backend::new();
    let (open, gate_rx) = gate();
    let inner = {
        let backend = Arc::clone(&backend);
        service_fn(move |req: Request<()>| {
            let (backend, gate_rx) = (Arc::clone(&backend), gate_rx.clone());
            async move {
                assert_eq!(req.method(), http::Method::GET);
                let _active = backend.enter();
                wait_open(gate_rx).await;
                let response = Response::builder()
                    .header(header::CONTENT_LENGTH, "5")
                    .body(full("hello"))
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let layer = SingleflightLayer::new().debug_header(true);
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let get_req = tokio::spawn(svc.clone().oneshot(get("/h")));
    until(|| stats.leaders() == 1).await;
    let head = Request::head("/h")
        .header("host", "example.com")
        .body(())
        .unwrap();
    let head = tokio::spawn(svc.clone().oneshot(head));
    until(|| stats.followers() == 1).await;
    open.send(true).unwrap();
    let got = get_req.await.unwrap().unwrap();
    assert_eq!(got.headers()["x-singleflight"], "leader");
    assert_eq!(collect(got).await.unwrap(), "hello");
    let head = head.await.unwrap().unwrap();
    assert_eq!(head.headers()["x-singleflight"], "follower");
    assert_eq!(head.headers()[header::CONTENT_LENGTH], "5");
    assert_eq!(collect(head).await.unwrap(), "");
    assert_eq!(backend.calls(), 1);
    assert_clean(&stats);
}

#[tokio::test]
async fn other_methods_range_and_conditional_requests_bypass_by_default() {
    let backend = Backend::new();
    let inner = {
        let backend = Arc::clone(&backend);
        service_fn(move |_req: Request<()>| {
            let _active = backend.enter();
            async move { Ok::<_, Infallible>(Response::new(full("x"))) }
        })
    };
    let layer = SingleflightLayer::new().debug_header(true);
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let post = Request::post("/x").body(()).unwrap();
    let range = Request::get("/x")
        .header(header::RANGE, "bytes=0-1")
        .body(())
        .unwrap();
    let cond = Request::get("/x")
        .header(header::IF_NONE_MATCH, "\"v1\"")
        .body(())
        .unwrap();
    for req in [post, range, cond] {
        let response = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(response.headers()["x-singleflight"], "bypass");
    }
    assert_eq!(stats.bypassed(BypassReason::Method), 1);
    assert_eq!(stats.bypassed(BypassReason::Range), 1);
    assert_eq!(stats.bypassed(BypassReason::Conditional), 1);
    assert_eq!(stats.leaders(), 0);
}

#[tokio::test]
async fn keyed_range_requests_coalesce_only_when_identical() {
    let range = |r: &str| {
        Request::get("/r")
            .header("host", "example.com")
            .header(header::RANGE, r)
            .body(())
            .unwrap()
    };
    let layer = || SingleflightLayer::new().range(HeaderPolicy::Key);
    assert_eq!(
        two_concurrent(layer(), range("bytes=0-9"), range("bytes=0-9")).await,
        1
    );
    assert_eq!(
        two_concurrent(layer(), range("bytes=0-9"), range("bytes=10-19")).await,
        2
    );
}

#[tokio::test]
async fn a_follower_differing_in_a_vary_header_makes_its_own_call() {
    let backend = Backend::new();
    let (open, gate_rx) = gate();
    let inner = {
        let backend = Arc::clone(&backend);
        service_fn(move |req: Request<()>| {
            let (backend, gate_rx) = (Arc::clone(&backend), gate_rx.clone());
            async move {
                let _active = backend.enter();
                wait_open(gate_rx).await;
                let lang = req.headers()[header::ACCEPT_LANGUAGE]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let response = Response::builder()
                    .header(header::VARY, "Accept-Language")
                    .body(full(lang))
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let lang = |l: &str| {
        Request::get("/v")
            .header("host", "example.com")
            .header(header::ACCEPT_LANGUAGE, l)
            .body(())
            .unwrap()
    };
    let en = tokio::spawn(svc.clone().oneshot(lang("en")));
    until(|| stats.leaders() == 1).await;
    let en2 = tokio::spawn(svc.clone().oneshot(lang("en")));
    let fr = tokio::spawn(svc.clone().oneshot(lang("fr")));
    until(|| stats.followers() == 2).await;
    open.send(true).unwrap();
    assert_eq!(collect(en.await.unwrap().unwrap()).await.unwrap(), "en");
    assert_eq!(collect(en2.await.unwrap().unwrap()).await.unwrap(), "en");
    assert_eq!(collect(fr.await.unwrap().unwrap()).await.unwrap(), "fr");
    assert_eq!(backend.calls(), 2);
    assert_eq!(stats.bypassed(BypassReason::VaryMismatch), 1);
    assert_clean(&stats);
}

fn stuck_then_ok(
    backend: &Arc<Backend>,
) -> impl tower::Service<
    Request<()>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    let backend = Arc::clone(backend);
    service_fn(move |_req: Request<()>| {
        let backend = Arc::clone(&backend);
        async move {
            let first = backend.calls() == 0;
            let _active = backend.enter();
            if first {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, Infallible>(Response::new(full(if first { "slow" } else { "own" })))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_follower_past_its_max_wait_makes_its_own_call_or_gets_504() {
    for (policy, expect) in [
        (WaitTimeoutPolicy::OwnCall, StatusCode::OK),
        (
            WaitTimeoutPolicy::GatewayTimeout,
            StatusCode::GATEWAY_TIMEOUT,
        ),
    ] {
        let backend = Backend::new();
        let layer = SingleflightLayer::new().max_wait(Duration::from_secs(2), policy);
        let stats = layer.stats();
        let svc = layer.layer(stuck_then_ok(&backend));
        let leader = tokio::spawn(svc.clone().oneshot(get("/w")));
        until(|| backend.calls() == 1).await;
        let started = tokio::time::Instant::now();
        let follower = svc.clone().oneshot(get("/w")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(follower.status(), expect);
        if policy == WaitTimeoutPolicy::OwnCall {
            assert_eq!(collect(follower).await.unwrap(), "own");
        }
        assert_eq!(stats.wait_timeouts(), 1);
        assert_eq!(
            collect(leader.await.unwrap().unwrap()).await.unwrap(),
            "slow"
        );
        assert_clean(&stats);
    }
}

#[tokio::test(start_paused = true)]
async fn a_flight_past_max_age_lets_a_new_leader_start() {
    let backend = Backend::new();
    let layer = SingleflightLayer::new().max_age(Duration::from_secs(5));
    let stats = layer.stats();
    let svc = layer.layer(stuck_then_ok(&backend));
    let old = tokio::spawn(svc.clone().oneshot(get("/a")));
    until(|| backend.calls() == 1).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    let fresh = svc.clone().oneshot(get("/a")).await.unwrap();
    assert_eq!(collect(fresh).await.unwrap(), "own");
    assert_eq!(stats.leaders(), 2);
    assert_eq!(collect(old.await.unwrap().unwrap()).await.unwrap(), "slow");
    assert_clean(&stats);
}

#[tokio::test]
async fn overflow_runs_alone_or_rejects_with_503() {
    use tower_singleflight::OverflowPolicy;
    for (policy, status) in [
        (OverflowPolicy::RunAlone, StatusCode::OK),
        (OverflowPolicy::Reject, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let backend = Backend::new();
        let (open, gate_rx) = gate();
        let inner = {
            let backend = Arc::clone(&backend);
            service_fn(move |_req: Request<()>| {
                let (backend, gate_rx) = (Arc::clone(&backend), gate_rx.clone());
                async move {
                    let _active = backend.enter();
                    wait_open(gate_rx).await;
                    Ok::<_, Infallible>(Response::new(full("x")))
                }
            })
        };
        let layer = SingleflightLayer::new()
            .max_followers(1)
            .max_keys(1)
            .overflow(policy);
        let stats = layer.stats();
        let svc = layer.layer(inner);
        let leader = tokio::spawn(svc.clone().oneshot(get("/o")));
        let follower = tokio::spawn(svc.clone().oneshot(get("/o")));
        until(|| stats.followers() == 1).await;
        let extra_follower = tokio::spawn(svc.clone().oneshot(get("/o")));
        let other_key = tokio::spawn(svc.clone().oneshot(get("/other")));
        until(|| stats.bypassed(BypassReason::Overflow) == 2).await;
        open.send(true).unwrap();
        assert_eq!(leader.await.unwrap().unwrap().status(), 200);
        assert_eq!(follower.await.unwrap().unwrap().status(), 200);
        assert_eq!(extra_follower.await.unwrap().unwrap().status(), status);
        assert_eq!(other_key.await.unwrap().unwrap().status(), status);
        assert_clean(&stats);
    }
}

fn failing_first(
    backend: &Arc<Backend>,
    gate_rx: watch::Receiver<bool>,
) -> impl tower::Service<Request<()>, Response = Response<Body>, Error = BoxError, Future = impl Send>
       + Clone {
    let backend = Arc::clone(backend);
    service_fn(move |_req: Request<()>| {
        let (backend, gate_rx) = (Arc::clone(&backend), gate_rx.clone());
        async move {
            let first = backend.calls() == 0;
            let _active = backend.enter();
            if first {
                wait_open(gate_rx).await;
                return Err::<Response<Body>, BoxError>("database down".into());
            }
            Ok(Response::new(full("retried")))
        }
    })
}

#[tokio::test]
async fn the_leaders_error_is_shared_or_retried_with_a_cap() {
    for (policy, retried) in [(ErrorPolicy::Share, 0), (ErrorPolicy::Retry { max: 2 }, 2)] {
        let backend = Backend::new();
        let (open, gate_rx) = gate();
        let layer = SingleflightLayer::new().errors(policy);
        let stats = layer.stats();
        let svc = layer.layer(failing_first(&backend, gate_rx));
        let tasks: Vec<_> = (0..5)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("/db"))))
            .collect();
        until(|| stats.leaders() + stats.followers() == 5).await;
        open.send(true).unwrap();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(response) => {
                    assert_eq!(collect(response).await.unwrap(), "retried");
                    ok += 1;
                }
                Err(err) => {
                    let shared = err.downcast_ref::<SharedError>().expect("shared error");
                    assert_eq!(
                        std::error::Error::source(shared).unwrap().to_string(),
                        "database down"
                    );
                }
            }
        }
        assert_eq!(ok, retried);
        assert_eq!(backend.calls(), 1 + retried);
        assert_clean(&stats);
    }
}

#[tokio::test]
async fn clones_of_the_layer_and_service_share_one_map() {
    let backend = Backend::new();
    let (open, gate_rx) = gate();
    let inner = gated_backend(&backend, gate_rx, "one");
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let a = layer.clone().layer(inner.clone());
    let b = layer.layer(inner);
    let ra = tokio::spawn(a.oneshot(get("/s")));
    let rb = tokio::spawn(b.oneshot(get("/s")));
    until(|| stats.followers() == 1).await;
    open.send(true).unwrap();
    assert_eq!(collect(ra.await.unwrap().unwrap()).await.unwrap(), "one");
    assert_eq!(collect(rb.await.unwrap().unwrap()).await.unwrap(), "one");
    assert_eq!(backend.calls(), 1);
    assert_clean(&stats);
}

#[tokio::test]
async fn a_custom_key_function_decides_what_is_the_same_resource() {
    // Ignore the query string: `/k?a` and `/k?b` are one resource here.
    let key_fn = |uri: &http::Uri, _: &http::HeaderMap| Some(uri.path().to_owned());
    let layer = SingleflightLayer::new().key_fn(key_fn);
    let backend = Backend::new();
    let (open, gate_rx) = gate();
    let inner = gated_backend(&backend, gate_rx, "k");
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let a = tokio::spawn(svc.clone().oneshot(get("/k?a")));
    let b = tokio::spawn(svc.clone().oneshot(get("/k?b")));
    until(|| stats.followers() == 1).await;
    open.send(true).unwrap();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(backend.calls(), 1);
    assert_clean(&stats);
}

#[tokio::test]
async fn a_lone_leader_gets_its_response_untouched_and_sharers_get_exact_hints() {
    use http_body::Body as _;
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let (open, gate_rx) = gate();
    let inner = service_fn(move |_req: Request<()>| {
        let gate_rx = gate_rx.clone();
        async move {
            wait_open(gate_rx).await;
            Ok::<_, Infallible>(Response::new(full(payload(1000))))
        }
    });
    let svc = layer.layer(inner);
    open.send(true).unwrap();
    let alone = svc.clone().oneshot(get("/l")).await.unwrap();
    assert!(
        format!("{:?}", alone.body()).contains("inner"),
        "no fan-out for one waiter"
    );
    assert_eq!(alone.body().size_hint().exact(), Some(1000));

    open.send(false).unwrap();
    let a = tokio::spawn(svc.clone().oneshot(get("/l")));
    let b = tokio::spawn(svc.clone().oneshot(get("/l")));
    until(|| stats.followers() == 1).await;
    open.send(true).unwrap();
    for response in [a.await.unwrap().unwrap(), b.await.unwrap().unwrap()] {
        assert!(format!("{:?}", response.body()).contains("shared"));
        assert_eq!(response.body().size_hint().exact(), Some(1000));
        assert!(!response.body().is_end_stream());
        assert_eq!(collect(response).await.unwrap(), payload(1000));
    }
    assert_clean(&stats);
}

#[tokio::test]
async fn http_followers_are_woken_exactly_once() {
    use futures_test::task::new_count_waker;
    use std::{future::Future, task::Context};
    let (open, gate_rx) = gate();
    let inner = service_fn(move |_req: Request<()>| {
        let gate_rx = gate_rx.clone();
        async move {
            wait_open(gate_rx).await;
            Ok::<_, Infallible>(Response::new(full("once")))
        }
    });
    let layer = SingleflightLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(inner);
    let mut leader = Box::pin(svc.clone().oneshot(get("/wake")));
    let (leader_waker, leader_wakes) = new_count_waker();
    assert!(leader
        .as_mut()
        .poll(&mut Context::from_waker(&leader_waker))
        .is_pending());
    let mut followers: Vec<_> = (0..3)
        .map(|_| {
            let (waker, count) = new_count_waker();
            (Box::pin(svc.clone().oneshot(get("/wake"))), waker, count)
        })
        .collect();
    for (f, waker, _) in &mut followers {
        assert!(f
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending());
    }
    assert_eq!(stats.followers(), 3);
    open.send(true).unwrap();
    assert_eq!(
        leader_wakes.get(),
        1,
        "only the driver is woken by the work"
    );
    for (_, _, count) in &followers {
        assert_eq!(count.get(), 0);
    }
    let leader = match leader
        .as_mut()
        .poll(&mut Context::from_waker(&leader_waker))
    {
        std::task::Poll::Ready(r) => r.unwrap(),
        std::task::Poll::Pending => panic!("the leader finishes when woken"),
    };
    for (f, waker, count) in &mut followers {
        assert_eq!(count.get(), 1, "each follower woken exactly once");
        match f.as_mut().poll(&mut Context::from_waker(waker)) {
            std::task::Poll::Ready(r) => assert_eq!(collect(r.unwrap()).await.unwrap(), "once"),
            std::task::Poll::Pending => panic!("a woken follower is ready"),
        }
    }
    assert_eq!(collect(leader).await.unwrap(), "once");
    assert_clean(&stats);
}
