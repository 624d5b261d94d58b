//! [`Singleflight`]: the request-time checks and the choice of role.

use std::{
    fmt, mem,
    sync::Arc,
    task::{Context, Poll},
};

use http::{
    header::{
        AUTHORIZATION, COOKIE, IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE,
        IF_UNMODIFIED_SINCE, RANGE,
    },
    HeaderName, Method, Request, Response,
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

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let shared = &self.shared;
        let config = &shared.config;
        let counters = &shared.counters;

        let key = match self.request_key(&req) {
            Ok(key) => key,
            Err(reason) => {
                counters.bypass(reason);
                return ResponseFuture::direct(self.inner.call(req), shared, "bypass");
            }
        };

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
                ResponseFuture::lead(run, shared, "leader")
            }
            Role::Alone => {
                counters.bypass(BypassReason::Overflow);
                ResponseFuture::lead(run, shared, "bypass")
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
                ResponseFuture::rejected(shared)
            }
        }
    }
}

impl<S, K: KeyFn> Singleflight<S, K> {
    /// The request-time safety checks, then the key.
    fn request_key<B>(&self, req: &Request<B>) -> Result<FlightKey<K::Key>, BypassReason> {
        let config = &self.shared.config;
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Err(BypassReason::Method),
        };
        let headers = req.headers();
        let credentials = if headers.contains_key(AUTHORIZATION) || headers.contains_key(COOKIE) {
            match config.credentials {
                CredentialPolicy::Bypass => return Err(BypassReason::Credentials),
                CredentialPolicy::Partition => Some(self.shared.credentials.hash(headers)),
            }
        } else {
            None
        };
        let mut conditional = Vec::new();
        for (names, policy, reason) in [
            (&[RANGE, IF_RANGE][..], config.range, BypassReason::Range),
            (
                &CONDITIONAL[..],
                config.conditional,
                BypassReason::Conditional,
            ),
        ] {
            for name in names {
                let values = headers.get_all(name);
                if values.iter().next().is_none() {
                    continue;
                }
                match policy {
                    HeaderPolicy::Bypass => return Err(reason),
                    HeaderPolicy::Key => {
                        conditional.extend(values.iter().map(|v| (name.clone(), v.clone())))
                    }
                }
            }
        }
        let resource = self
            .key_fn
            .key(req.uri(), headers)
            .ok_or(BypassReason::NoKey)?;
        Ok(FlightKey {
            head,
            credentials,
            conditional,
            resource,
        })
    }
}
