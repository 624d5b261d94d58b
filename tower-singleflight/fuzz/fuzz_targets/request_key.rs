//! The layer's flight key, built from the method, the resource key and the headers the
//! safety rules look at, with credentials bypassing or partitioned: for two requests made
//! one after the other while the first is in flight, the second joins the first's flight
//! exactly when the rules say it may. Never panics; no flight outlives its requests.
#![no_main]

use std::{
    convert::Infallible,
    future::{pending, Pending},
    task::{Context, Poll, Waker},
};

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use tower_layer::Layer;
use tower_service::Service;
use tower_singleflight::{
    BypassReason, CredentialPolicy, DefaultKey, HeaderPolicy, KeyFn, SingleflightLayer,
};

/// An inner service whose calls never finish: flights stay open while both requests exist.
#[derive(Clone)]
struct Never;

impl Service<Request<()>> for Never {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pending<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        pending()
    }
}

const NAMES: [&str; 12] = [
    "host",
    "authorization",
    "cookie",
    "range",
    "if-range",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "accept-language",
    "accept",
    "x-other",
];
const CREDENTIALS: [&str; 2] = ["authorization", "cookie"];
const RANGE: [&str; 2] = ["range", "if-range"];
const CONDITIONAL: [&str; 4] = [
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
];

#[derive(Debug, Clone, Arbitrary)]
struct Req {
    method: u8,
    uri: String,
    headers: Vec<(u8, Vec<u8>)>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    a: Req,
    /// `None`: `b` is `a` with `edit` applied, so that equal keys are common.
    b: Option<Req>,
    edit: Option<(u8, Vec<u8>)>,
    partition: bool,
    key_range: bool,
    key_conditional: bool,
}

fn method(m: u8) -> Method {
    match m % 6 {
        0 | 1 => Method::GET,
        2 => Method::HEAD,
        3 => Method::POST,
        4 => Method::OPTIONS,
        _ => Method::from_bytes(b"PURGE").unwrap(),
    }
}

fn build(req: &Req) -> Option<Request<()>> {
    let uri: Uri = req.uri.parse().ok()?;
    let mut request = Request::builder().method(method(req.method)).uri(uri);
    for (name, value) in &req.headers {
        let value = HeaderValue::from_bytes(value).ok()?;
        request = request.header(NAMES[usize::from(name % 12)], value);
    }
    request.body(()).ok()
}

/// The values of `names`, name by name, in order.
fn values(headers: &HeaderMap, names: &[&str]) -> Vec<Vec<HeaderValue>> {
    names
        .iter()
        .map(|name| headers.get_all(*name).iter().cloned().collect())
        .collect()
}

fn has_any(headers: &HeaderMap, names: &[&str]) -> bool {
    names.iter().any(|name| headers.contains_key(*name))
}

fuzz_target!(|input: Input| {
    let mut b_req = input.b.clone().unwrap_or_else(|| {
        let mut b = input.a.clone();
        if let Some(edit) = &input.edit {
            b.headers.push(edit.clone());
        }
        b
    });
    if input.b.is_none() && input.edit.is_none() {
        // A twin with the other method of the pair, so HEAD-joins-GET is exercised.
        b_req.method = input.a.method.wrapping_add(2);
    }
    let (Some(a), Some(b)) = (build(&input.a), build(&b_req)) else {
        return;
    };

    let key_fn = DefaultKey::with_headers([HeaderName::from_static("accept-language")]);
    let policy = |on: bool| {
        if on {
            HeaderPolicy::Key
        } else {
            HeaderPolicy::Bypass
        }
    };
    let layer = SingleflightLayer::new()
        .credentials(if input.partition {
            CredentialPolicy::Partition
        } else {
            CredentialPolicy::Bypass
        })
        .range(policy(input.key_range))
        .conditional(policy(input.key_conditional))
        .key_fn(key_fn.clone());
    let stats = layer.stats();
    let mut svc = layer.layer(Never);

    // The expected outcome, from the documented rules.
    let joins = |r: &Request<()>| -> Result<(), BypassReason> {
        let (m, h) = (r.method(), r.headers());
        if m != Method::GET && m != Method::HEAD {
            return Err(BypassReason::Method);
        }
        if key_fn.key(r.uri(), h).is_none() {
            return Err(BypassReason::NoKey);
        }
        if !input.partition && has_any(h, &CREDENTIALS) {
            return Err(BypassReason::Credentials);
        }
        if !input.key_range && has_any(h, &RANGE) {
            return Err(BypassReason::Range);
        }
        if !input.key_conditional && has_any(h, &CONDITIONAL) {
            return Err(BypassReason::Conditional);
        }
        Ok(())
    };
    let (ja, jb) = (joins(&a), joins(&b));
    let same_flight = ja.is_ok()
        && jb.is_ok()
        && key_fn.key(a.uri(), a.headers()) == key_fn.key(b.uri(), b.headers())
        && values(a.headers(), &CREDENTIALS) == values(b.headers(), &CREDENTIALS)
        && values(a.headers(), &RANGE) == values(b.headers(), &RANGE)
        && values(a.headers(), &CONDITIONAL) == values(b.headers(), &CONDITIONAL)
        // A HEAD may join a GET flight; a GET never joins a HEAD one.
        && !(a.method() == Method::HEAD && b.method() == Method::GET);

    let mut cx = Context::from_waker(Waker::noop());
    let mut call = |req| {
        assert!(Service::poll_ready(&mut svc, &mut cx).is_ready());
        svc.call(req)
    };
    let fa = call(a);
    assert_eq!(stats.leaders(), u64::from(ja.is_ok()), "{ja:?}");
    if let Err(reason) = ja {
        assert_eq!(stats.bypassed(reason), 1, "{reason:?}");
    }
    let fb = call(b);
    assert_eq!(
        stats.followers(),
        u64::from(same_flight),
        "a {ja:?}, b {jb:?}"
    );
    match jb {
        Err(reason) => assert!(stats.bypassed(reason) >= 1, "{reason:?}"),
        Ok(()) => assert_eq!(
            stats.leaders() + stats.followers(),
            u64::from(ja.is_ok()) + 1
        ),
    }
    // Leaving cancels the flights: nothing stays in the map.
    drop((fa, fb));
    assert_eq!(stats.in_flight(), 0);
});
