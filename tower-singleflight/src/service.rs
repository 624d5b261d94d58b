//! [`Singleflight`]: the request-time checks and the choice of role.

use std::{
    fmt, mem,
    sync::Arc,
    task::{Context, Poll},
};

use http::{
    header::{IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, RANGE},
    HeaderMap, HeaderName, Method, Request, Response,
};
use http_body::Body;
use tower_service::Service;

use crate::{
    body::SingleflightBody,
    error::BoxError,
    future::ResponseFuture,
    group::Role,
    key::{DefaultKey, FlightKey, KeyFn},
    layer::{CredentialPolicy, HeaderPolicy, Shared, SingleflightLayer},
    share,
    stats::BypassReason,
};

const CONDITIONAL: [HeaderName; 4] = [
    IF_NONE_MATCH,
    IF_MODIFIED_SINCE,
    IF_MATCH,
    IF_UNMODIFIED_SINCE,
];

/// Coalesces concurrent identical requests into one call of the inner service, and
/// streams its response to every waiter. See the [crate documentation](crate).
///
/// Made by [`SingleflightLayer`]; clones share the flight map.
pub struct Singleflight<S, K: KeyFn = DefaultKey> {
    inner: S,
    key_fn: K,
    shared: Arc<Shared<K::Key>>,
}

impl<S> Singleflight<S, DefaultKey> {
    /// Wraps `inner` with the default configuration (see [`SingleflightLayer::new`]).
    pub fn new(inner: S) -> Self {
        SingleflightLayer::new().layer_service(inner)
    }

    /// A [`SingleflightLayer`] with the default configuration.
    pub fn layer() -> SingleflightLayer {
        SingleflightLayer::new()
    }
}

impl SingleflightLayer<DefaultKey> {
    fn layer_service<S>(&self, inner: S) -> Singleflight<S, DefaultKey> {
        Singleflight::from_parts(inner, self.key_fn_ref().clone(), self.shared_ref())
    }
}

impl<S, K: KeyFn> Singleflight<S, K> {
    pub(crate) fn from_parts(inner: S, key_fn: K, shared: Arc<Shared<K::Key>>) -> Self {
        Self {
            inner,
            key_fn,
            shared,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, K: KeyFn + Clone> Clone for Singleflight<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            key_fn: self.key_fn.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, K: KeyFn + fmt::Debug> fmt::Debug for Singleflight<S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Singleflight")
            .field("inner", &self.inner)
            .field("key_fn", &self.key_fn)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, K, ReqB, ResB> Service<Request<ReqB>> for Singleflight<S, K>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + 'static,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
    K: KeyFn,
{
    type Response = Response<SingleflightBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqB, K::Key>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The bypass is kept small enough to inline: a request the layer lets through
        // (another method, a route the key function leaves out) costs next to nothing.
        match self.request_key(&req) {
            Ok(key) => self.call_keyed(req, key),
            Err(reason) => {
                self.shared.counters.bypass(reason);
                ResponseFuture::direct(self.inner.call(req), &self.shared.config, "bypass")
            }
        }
    }
}

impl<S, K: KeyFn> Singleflight<S, K> {
    /// A request that may coalesce: the micro-cache, then a flight.
    #[inline(never)]
    fn call_keyed<ReqB, ResB>(
        &mut self,
        req: Request<ReqB>,
        key: FlightKey<K::Key>,
    ) -> ResponseFuture<S, ReqB, K::Key>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError> + 'static,
        ResB: Body + Send + 'static,
        ResB::Data: Send,
        ResB::Error: Into<BoxError>,
    {
        let shared = &self.shared;
        let config = &shared.config;
        let counters = &shared.counters;

        #[cfg(feature = "micro-cache")]
        if let Some(cache) = &shared.cache {
            if let Some(hit) = crate::cache::lookup(cache, &key, req.headers()) {
                counters.cache_hit();
                return ResponseFuture::cached(hit, key.head, shared);
            }
        }
        #[cfg(feature = "micro-cache")]
        let store_key = shared.cache.as_ref().map(|_| key.clone());

        // A HEAD may join a GET flight: it gets the head only.
        if key.head {
            let get_key = FlightKey {
                head: false,
                ..key.clone()
            };
            if let Some(run) = shared.group.join(&get_key) {
                counters.follower();
                return ResponseFuture::follow(run, self.inner.clone(), req, true, shared);
            }
        }

        let mut pending_req = Some(req);
        let inner = &mut self.inner;
        let run = shared.group.run(key, || {
            let req = pending_req.take().expect("the flight is made at most once");
            let leader_headers = req.headers().clone();
            // Call the service `poll_ready` prepared; keep a fresh clone for later calls.
            let clone = inner.clone();
            let mut ready = mem::replace(inner, clone);
            #[cfg(feature = "tracing")]
            let span = tracing::debug_span!("singleflight.flight");
            let work = share::work(
                ready.call(req),
                leader_headers,
                Arc::clone(config),
                Arc::clone(counters),
                #[cfg(feature = "tracing")]
                span.clone(),
                #[cfg(feature = "micro-cache")]
                shared.cache.clone().zip(store_key).map(|(cache, key)| {
                    Box::new(move |cached| cache.insert(key, cached)) as share::CacheStore
                }),
            );
            #[cfg(feature = "tracing")]
            let work = tracing::Instrument::instrument(work, span);
            work
        });
        match run.role() {
            Role::Leader => {
                counters.leader();
                ResponseFuture::lead(run, config, "leader")
            }
            Role::Alone => {
                counters.bypass(BypassReason::Overflow);
                ResponseFuture::lead(run, config, "bypass")
            }
            Role::Follower => {
                counters.follower();
                let req = pending_req
                    .take()
                    .expect("a follower's request is not used");
                ResponseFuture::follow(run, self.inner.clone(), req, false, shared)
            }
            Role::Rejected => {
                counters.bypass(BypassReason::Overflow);
                ResponseFuture::rejected(config)
            }
        }
    }
}

impl<S, K: KeyFn> Singleflight<S, K> {
    /// The request-time checks and the key: the method, then the key function (so a
    /// route it leaves out costs no more), then the safety rules on the headers.
    #[inline]
    fn request_key<B>(&self, req: &Request<B>) -> Result<FlightKey<K::Key>, BypassReason> {
        let config = &self.shared.config;
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Err(BypassReason::Method),
        };
        let headers = req.headers();
        let resource = self
            .key_fn
            .key(req.uri(), headers)
            .ok_or(BypassReason::NoKey)?;
        let found = Found::scan(headers);
        let credentials = if found.credentials {
            match config.credentials {
                CredentialPolicy::Bypass => return Err(BypassReason::Credentials),
                CredentialPolicy::Partition => Some(self.shared.credentials.hash(headers)),
            }
        } else {
            None
        };
        let mut conditional = Vec::new();
        for (present, names, policy, reason) in [
            (
                found.range,
                &[RANGE, IF_RANGE][..],
                config.range,
                BypassReason::Range,
            ),
            (
                found.conditional,
                &CONDITIONAL[..],
                config.conditional,
                BypassReason::Conditional,
            ),
        ] {
            if !present {
                continue;
            }
            if policy == HeaderPolicy::Bypass {
                return Err(reason);
            }
            for name in names {
                let values = headers.get_all(name);
                conditional.extend(values.iter().map(|v| (name.clone(), v.clone())));
            }
        }
        Ok(FlightKey {
            head,
            credentials,
            conditional,
            resource,
        })
    }
}

/// Which kinds of header the request-time rules look at a request has.
#[derive(Debug, Default, PartialEq, Eq)]
struct Found {
    /// `Authorization` or `Cookie`.
    credentials: bool,
    /// `Range` or `If-Range`.
    range: bool,
    /// `If-None-Match`, `If-Modified-Since`, `If-Match` or `If-Unmodified-Since`.
    conditional: bool,
}

impl Found {
    /// One pass over the header names: usually none of these is present, and a pass over a
    /// request's few names costs much less than a map lookup for each of eight.
    fn scan(headers: &HeaderMap) -> Self {
        let mut found = Found::default();
        for name in headers.keys() {
            // Names are lowercase; the length rules out nearly every other name at once.
            let name = name.as_str();
            match name.len() {
                5 if name == "range" => found.range = true,
                6 if name == "cookie" => found.credentials = true,
                8 if name == "if-range" => found.range = true,
                8 if name == "if-match" => found.conditional = true,
                13 if name == "authorization" => found.credentials = true,
                13 if name == "if-none-match" => found.conditional = true,
                17 if name == "if-modified-since" => found.conditional = true,
                19 if name == "if-unmodified-since" => found.conditional = true,
                _ => {}
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use http::{header, HeaderValue};

    use super::*;

    #[test]
    fn the_scan_finds_exactly_the_headers_the_rules_name() {
        let scan = |names: &[HeaderName]| {
            let mut headers = HeaderMap::new();
            for name in names {
                headers.append(name.clone(), HeaderValue::from_static("x"));
            }
            Found::scan(&headers)
        };
        let none = Found::default();
        assert_eq!(scan(&[]), none);
        assert_eq!(
            scan(&[
                header::HOST,
                header::ACCEPT,
                header::CACHE_CONTROL,
                header::CONTENT_RANGE,
                header::IF_MATCH,
            ]),
            Found {
                conditional: true,
                ..Found::default()
            }
        );
        for name in [header::AUTHORIZATION, header::COOKIE] {
            assert!(scan(&[header::HOST, name]).credentials);
        }
        for name in [RANGE, IF_RANGE] {
            assert_eq!(
                scan(&[name]),
                Found {
                    range: true,
                    ..Found::default()
                }
            );
        }
        for name in CONDITIONAL {
            assert_eq!(
                scan(&[name]),
                Found {
                    conditional: true,
                    ..Found::default()
                }
            );
        }
        // Names that only share a length, or a custom header with a similar name.
        let similar = [
            HeaderName::from_static("x-rng"),
            HeaderName::from_static("cookie2"),
            HeaderName::from_static("if-rangex"),
            HeaderName::from_static("authorisation"),
            header::PROXY_AUTHORIZATION,
            header::SET_COOKIE,
        ];
        assert_eq!(scan(&similar), none);
    }
}
