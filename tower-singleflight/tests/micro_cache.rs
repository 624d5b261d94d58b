//! The optional micro-cache: bursts just after a flight ends are served from it.
#![cfg(feature = "micro-cache")]

mod support;

use std::{convert::Infallible, sync::Arc, time::Duration};

use http::{header, Request, Response};
use support::{collect, full, get, Backend};
use tower::{service_fn, Layer, ServiceExt};
use tower_singleflight::{MicroCache, SingleflightLayer};

/// What a test backend answers with.
#[derive(Clone, Copy)]
enum Answer {
    /// `generation N`, N the number of calls so far: tells apart a cached answer.
    Generation,
    /// `len` bytes of `support::payload`.
    Sized(usize),
}

/// A backend answering every path with `answer` and the given headers.
fn backend_with(
    backend: &Arc<Backend>,
    headers: &'static [(&'static str, &'static str)],
    answer: Answer,
) -> impl tower::Service<
    Request<()>,
    Response = Response<support::Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    let backend = Arc::clone(backend);
    service_fn(move |_req: Request<()>| {
        let backend = Arc::clone(&backend);
        async move {
            let _active = backend.enter();
            let mut response = Response::builder();
            for (name, value) in headers {
                response = response.header(*name, *value);
            }
            let body = match answer {
                Answer::Generation => full(format!("generation {}", backend.calls())),
                Answer::Sized(len) => full(support::payload(len)),
            };
            Ok::<_, Infallible>(response.body(body).unwrap())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_burst_just_after_a_flight_is_served_from_the_cache_until_linger_ends() {
    let backend = Backend::new();
    let layer = SingleflightLayer::new()
        .micro_cache(MicroCache::new(Duration::from_secs(1)))
        .debug_header(true);
    let stats = layer.stats();
    let svc = layer.layer(backend_with(&backend, &[], Answer::Generation));
    let first = svc.clone().oneshot(get("/c")).await.unwrap();
    assert_eq!(collect(first).await.unwrap(), "generation 1");
    for _ in 0..3 {
        let again = svc.clone().oneshot(get("/c")).await.unwrap();
        assert_eq!(again.headers()["x-singleflight"], "cache");
        assert_eq!(collect(again).await.unwrap(), "generation 1");
    }
    let head = Request::head("/c")
        .header("host", "example.com")
        .body(())
        .unwrap();
    let head = svc.clone().oneshot(head).await.unwrap();
    assert_eq!(head.headers()["x-singleflight"], "cache");
    assert_eq!(collect(head).await.unwrap(), "");
    assert_eq!(backend.calls(), 1);
    assert_eq!(stats.cache_hits(), 4);
    tokio::time::advance(Duration::from_millis(1001)).await;
    let later = svc.clone().oneshot(get("/c")).await.unwrap();
    assert_eq!(collect(later).await.unwrap(), "generation 2");
    assert_eq!(stats.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn max_age_caps_the_linger_and_zero_disables_it() {
    for (cache_control, fresh_ms) in [("max-age=0", 0u64), ("public, max-age=1", 1000)] {
        let backend = Backend::new();
        let headers: &'static [(&'static str, &'static str)] = if fresh_ms == 0 {
            &[("cache-control", "max-age=0")]
        } else {
            &[("cache-control", "public, max-age=1")]
        };
        let layer = SingleflightLayer::new().micro_cache(MicroCache::new(Duration::from_secs(10)));
        let svc = layer.layer(backend_with(&backend, headers, Answer::Generation));
        collect(svc.clone().oneshot(get("/m")).await.unwrap())
            .await
            .unwrap();
        collect(svc.clone().oneshot(get("/m")).await.unwrap())
            .await
            .unwrap();
        let expected = if fresh_ms == 0 { 2 } else { 1 };
        assert_eq!(backend.calls(), expected, "{cache_control}");
        tokio::time::advance(Duration::from_millis(fresh_ms + 1)).await;
        collect(svc.clone().oneshot(get("/m")).await.unwrap())
            .await
            .unwrap();
        assert_eq!(backend.calls(), expected + 1, "{cache_control}: expired");
    }
}

#[tokio::test(start_paused = true)]
async fn unshareable_or_vary_mismatched_responses_are_not_served_from_the_cache() {
    let backend = Backend::new();
    let layer = SingleflightLayer::new().micro_cache(MicroCache::new(Duration::from_secs(1)));
    let svc = layer.layer(backend_with(
        &backend,
        &[("set-cookie", "sid=1")],
        Answer::Generation,
    ));
    collect(svc.clone().oneshot(get("/s")).await.unwrap())
        .await
        .unwrap();
    collect(svc.clone().oneshot(get("/s")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(backend.calls(), 2, "Set-Cookie is never cached");

    let backend = Backend::new();
    let layer = SingleflightLayer::new().micro_cache(MicroCache::new(Duration::from_secs(1)));
    let svc = layer.layer(backend_with(
        &backend,
        &[("vary", "accept-language")],
        Answer::Generation,
    ));
    let lang = |l: &str| {
        Request::get("/v")
            .header("host", "example.com")
            .header(header::ACCEPT_LANGUAGE, l)
            .body(())
            .unwrap()
    };
    collect(svc.clone().oneshot(lang("en")).await.unwrap())
        .await
        .unwrap();
    collect(svc.clone().oneshot(lang("en")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(backend.calls(), 1, "the same Accept-Language is a hit");
    collect(svc.clone().oneshot(lang("fr")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(backend.calls(), 2, "a different one is a miss");
}

/// Requests `/k/{i}` for each `i` in `keys`, reading each body; returns how many were served
/// from the cache.
async fn fetch_all<S>(svc: &S, keys: std::ops::Range<usize>) -> usize
where
    S: tower::Service<
            Request<()>,
            Response = Response<tower_singleflight::SingleflightBody<support::Body>>,
            Error = tower_singleflight::error::BoxError,
        > + Clone,
{
    let mut hits = 0;
    for i in keys {
        let response = svc.clone().oneshot(get(&format!("/k/{i}"))).await.unwrap();
        hits += usize::from(response.headers()["x-singleflight"] == "cache");
        collect(response).await.unwrap();
    }
    hits
}

#[tokio::test(start_paused = true)]
async fn many_keys_never_hold_more_than_max_entries() {
    let backend = Backend::new();
    let layer = SingleflightLayer::new()
        .micro_cache(MicroCache::new(Duration::from_secs(60)).max_entries(10))
        .debug_header(true);
    let stats = layer.stats();
    let svc = layer.layer(backend_with(&backend, &[], Answer::Sized(100)));
    assert_eq!(fetch_all(&svc, 0..500).await, 0);
    assert_eq!(backend.calls(), 500);
    // Whatever the eviction order, at most ten of the 500 can still be there.
    let hits = fetch_all(&svc, 0..500).await;
    assert!(hits <= 10, "{hits} hits with at most 10 entries");
    assert_eq!(backend.calls(), 1000 - hits);
    assert_eq!(stats.cache_hits(), hits as u64);
    assert_eq!(stats.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn large_bodies_never_hold_more_than_max_bytes() {
    let backend = Backend::new();
    // Room for three 30 KiB bodies in 100 KiB (the entry count does not bind).
    let layer = SingleflightLayer::new()
        .micro_cache(
            MicroCache::new(Duration::from_secs(60))
                .max_entries(1_000)
                .max_bytes(100 * 1024),
        )
        .debug_header(true);
    let svc = layer.layer(backend_with(&backend, &[], Answer::Sized(30 * 1024)));
    fetch_all(&svc, 0..200).await;
    let hits = fetch_all(&svc, 0..200).await;
    assert!(hits <= 3, "{hits} hits of 30 KiB with 100 KiB");
    // The most recent ones are still useful: the bound is not met by caching nothing.
    let again = fetch_all(&svc, 199..200).await + fetch_all(&svc, 199..200).await;
    assert!(again >= 1, "a just-fetched body that fits is cached");
}

#[tokio::test(start_paused = true)]
async fn a_body_larger_than_max_bytes_is_not_cached() {
    let backend = Backend::new();
    let layer = SingleflightLayer::new()
        .micro_cache(MicroCache::new(Duration::from_secs(60)).max_bytes(10 * 1024))
        .debug_header(true);
    let svc = layer.layer(backend_with(&backend, &[], Answer::Sized(64 * 1024)));
    let hits = fetch_all(&svc, 0..1).await + fetch_all(&svc, 0..1).await;
    assert_eq!(hits, 0);
    assert_eq!(backend.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn no_store_and_s_maxage_are_honoured() {
    for (headers, cached) in [
        (&[("cache-control", "no-store")][..], false),
        (
            &[("cache-control", "public, no-store, max-age=60")][..],
            false,
        ),
        (&[("cache-control", "max-age=60, s-maxage=0")][..], false),
        (&[("cache-control", "max-age=0, s-maxage=60")][..], true),
        (&[("cache-control", "max-age=\"60\"")][..], true),
        (&[("cache-control", "max-age=soon")][..], false),
        (&[("cache-control", "public")][..], true),
    ] {
        let backend = Backend::new();
        let layer = SingleflightLayer::new()
            .micro_cache(MicroCache::new(Duration::from_secs(1)))
            .debug_header(true);
        let headers: &'static [(&'static str, &'static str)] = headers;
        let svc = layer.layer(backend_with(&backend, headers, Answer::Sized(10)));
        let hits = fetch_all(&svc, 0..1).await + fetch_all(&svc, 0..1).await;
        assert_eq!(hits == 1, cached, "{headers:?}");
        assert_eq!(backend.calls(), if cached { 1 } else { 2 }, "{headers:?}");
    }
}
