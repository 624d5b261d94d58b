//! The application: the public routes, and [`app`], the one place where the tower stack
//! that serves them is assembled.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /` | `200 text/plain` `Hello, World!` |
//! | `GET /healthz` | `200 text/plain` `ok` |
//! | `GET /sleep?ms=N` | waits `N` ms (at most `--max-sleep`) then `200`; a missing, malformed or too large `N` gets `400`; stops at once when the request's `AbortSignal` fires (`503` on shutdown, `504` past a deadline; a client that left gets nothing), counted in `demo_work_cancelled_total` |
//! | `GET /expensive/{key}?ms=N` | a simulated expensive backend call behind tower-singleflight: waits `N` ms (default 200, at most `--max-sleep`), then `200 application/json` `{"key":"…","generation":G}` where `G` numbers this worker's backend calls; concurrent identical requests share one call (`demo_backend_calls_total` counts the calls). `key` is 1-64 of `[A-Za-z0-9_.-]`, else `400`. Stops on shutdown (`503`) or a passed deadline (`504`); a leader whose client leaves does not stop the shared call, which is dropped when the last waiting client has left |
//! | anything else | `404` (`405` with `Allow` for another method on a known path) |
//!
//! `HEAD` is accepted wherever `GET` is. Malformed requests (`400`) and oversized heads
//! (`431`) are answered by hyper before a request reaches this service.
//!
//! Every request carries a `tower_abort::AbortSignal` (the `AbortLayer` is outermost). It
//! fires when the client disconnects, when a deadline the client sent (`grpc-timeout`, or
//! `request-timeout` in milliseconds) passes, or when the drain's grace period runs out.
//!
//! Every route except `/healthz` (and `/metrics`, which lives on the admin server) sits
//! behind tower-backpressure: at most `--max-in-flight` requests run at once per worker,
//! `--max-queued` more wait at most `--queue-timeout`, and the rest get `503` with
//! `Retry-After`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Either;
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service, ServiceExt};
use tower_abort::future::Aborted;
use tower_abort::{AbortLayer, AbortReason, AbortSignal, TimeoutFormat};
use tower_backpressure::BackpressureLayer;
use tower_singleflight::{
    DefaultKey, KeyFn, RequestKey, Singleflight, SingleflightBody, SingleflightLayer,
};
use tower_zerocopy::{FileBody, ServeDir};

/// Response body of every route: literal bytes or a file for `/static` (tower-zerocopy's
/// body, which goes out through sendfile on a capable connection), or for `/expensive` the
/// body tower-singleflight streams to every waiter.
pub(crate) type RouteBody = Either<FileBody, SingleflightBody<FileBody>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// Settings of the routes.
#[derive(Debug, Clone)]
pub(crate) struct RouteConfig {
    /// Upper bound of `/sleep?ms=N`.
    pub(crate) max_sleep: Duration,
    /// The service behind `GET /static/{*path}` (`None`: that prefix is `404`).
    pub(crate) static_files: Option<ServeDir>,
    /// Largest request body (`--max-body-size`): `413` above it (see [`crate::strict`] and
    /// [`crate::upload`]).
    pub(crate) max_body_size: usize,
}

/// The backpressure layer of one worker: its state (limit, queue, counters) is created
/// here, once, and shared by every connection's clone of the stack.
pub(crate) fn backpressure(
    max_in_flight: usize,
    max_queued: usize,
    queue_timeout: Duration,
) -> BackpressureLayer {
    BackpressureLayer::builder(max_in_flight)
        .max_queued(max_queued)
        .queue_timeout(queue_timeout)
        // Probes must see a live process even when it is saturated.
        .bypass(|head| matches!(head.uri().path(), "/healthz" | "/metrics"))
        .build()
}

/// The key function of [`singleflight`], which only `/expensive/{key}` goes through: the
/// default key (scheme, authority, path, query). Other routes never reach the layer, so
/// `/sleep` keeps one call per request and its own cancellation semantics.
pub(crate) type ExpensiveKey = fn(&http::Uri, &http::HeaderMap) -> Option<RequestKey>;

fn expensive_key(uri: &http::Uri, headers: &http::HeaderMap) -> Option<RequestKey> {
    if !uri.path().starts_with("/expensive/") {
        return None;
    }
    DefaultKey::new().key(uri, headers)
}

/// The key function of `--no-singleflight`: no request coalesces.
fn no_key(_: &http::Uri, _: &http::HeaderMap) -> Option<RequestKey> {
    None
}

/// The singleflight layer of one worker: its flight map and counters are created here,
/// once, and shared by every connection's clone of the stack. Responses carry
/// `x-singleflight: leader | follower | ...` so the demo shows who shared what.
pub(crate) fn singleflight() -> SingleflightLayer<ExpensiveKey> {
    SingleflightLayer::new()
        .debug_header(true)
        .key_fn(expensive_key as ExpensiveKey)
}

/// [`singleflight`], or with `enabled == false` the same layer with a key function that
/// never coalesces (`--no-singleflight`), so both cases run the same stack.
pub(crate) fn singleflight_if(enabled: bool) -> SingleflightLayer<ExpensiveKey> {
    let layer = singleflight();
    if enabled {
        layer
    } else {
        layer.key_fn(no_key as ExpensiveKey)
    }
}

/// Builds the service every connection of a worker clones.
///
/// `AbortLayer` is outermost, so every request (404s included) gets its signal and the
/// signal fires whatever the inner layers do. The request checks of [`crate::strict`]
/// (ambiguous framing, a declared body over `--max-body-size`) come next, so a rejected
/// request never takes a permit. tower-backpressure is next, so a shed request costs no
/// routing work and the permit covers the whole response body. The connection code only
/// needs a cloneable `Service<Request<Incoming>>` with a `Send` future, any `Bytes` body
/// and any boxable error (answered with a logged `500`, the connection kept), so a layer
/// that changes the body or error type needs no change here or in the connection code.
///
/// tower-singleflight is a route layer: [`Routes`] sends only `GET`/`HEAD
/// /expensive/{key}` through it (as axum's `route_layer` would), after validating the
/// key, so other routes pay nothing for it. Only requests admitted by backpressure
/// coalesce, and the leader's permit covers the shared work. Its errors (a panicking
/// handler; routes never fail otherwise) reach the connection code, which answers a
/// logged `500`.
///
/// `work_cancelled` counts `/sleep` requests stopped by their signal; `backend_calls`
/// counts `/expensive` backend calls.
pub(crate) fn app(
    config: RouteConfig,
    abort: AbortLayer,
    work_cancelled: Counter,
    backpressure: BackpressureLayer,
    singleflight: SingleflightLayer<ExpensiveKey>,
    backend_calls: Counter,
) -> impl Service<
    Request<Incoming>,
    Response = Response<impl Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static>,
    Error: Into<BoxError>,
    Future: Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    let strict = crate::strict::StrictLayer::new(config.max_body_size);
    tower::ServiceBuilder::new()
        .layer(abort_layer(abort))
        .layer(strict)
        .layer(backpressure)
        .service(Routes::new(
            config,
            work_cancelled,
            backend_calls,
            &singleflight,
        ))
}

/// The application with test defaults (no static files, 1 KiB bodies, 64 in flight and 64
/// queued, a fresh abort root and counters) and `/sleep` up to `max_sleep`.
#[cfg(test)]
pub(crate) fn test_app(
    max_sleep: Duration,
) -> impl Service<
    Request<Incoming>,
    Response = Response<impl Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static>,
    Error: Into<BoxError>,
    Future: Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    app(
        RouteConfig {
            max_sleep,
            static_files: None,
            max_body_size: 1024,
        },
        AbortLayer::new(),
        Counter::default(),
        backpressure(64, 64, Duration::from_secs(1)),
        singleflight(),
        Counter::default(),
    )
}

/// The abort layer's settings: clients may shorten their own requests with `grpc-timeout`
/// or `request-timeout` (milliseconds). There is no server-wide default deadline: `/sleep`
/// is bounded by `--max-sleep`.
fn abort_layer(abort: AbortLayer) -> AbortLayer {
    abort.with_grpc_timeout(true).with_timeout_header(
        http::HeaderName::from_static("request-timeout"),
        TimeoutFormat::Milliseconds,
    )
}

/// The router: a plain tower [`Service`] whose future does not allocate, except on the
/// routes that wait for a client body (`/upload`) or share work (`/expensive`).
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    work: Work,
    /// The backend call of `/expensive/{key}`, behind tower-singleflight.
    expensive: Singleflight<Backend, ExpensiveKey>,
}

impl Routes {
    pub(crate) fn new(
        config: RouteConfig,
        work_cancelled: Counter,
        backend_calls: Counter,
        singleflight: &SingleflightLayer<ExpensiveKey>,
    ) -> Self {
        let work = Work {
            config: Arc::new(config),
            work_cancelled,
            backend_calls,
            generations: Arc::default(),
        };
        Routes {
            expensive: singleflight.layer(Backend(work.clone())),
            work,
        }
    }
}

/// What the routes share: settings, counters and the simulated work.
#[derive(Debug, Clone)]
struct Work {
    config: Arc<RouteConfig>,
    work_cancelled: Counter,
    backend_calls: Counter,
    generations: Arc<AtomicU64>,
}

impl Work {
    fn route<B>(&self, req: &Request<B>) -> Route {
        let path = req.uri().path();
        if path.starts_with("/static/") {
            if let Some(files) = &self.config.static_files {
                // ServeDir strips the prefix itself, and checks method and path.
                return Route::Static(files.clone());
            }
        }
        if path == "/upload" {
            if req.method() == Method::POST {
                return Route::Upload;
            }
            return Route::Respond(Answer::method_not_allowed("POST"));
        }
        let expensive = path.strip_prefix("/expensive/");
        let known = expensive.is_some() || matches!(path, "/" | "/healthz" | "/sleep");
        if !known {
            return Route::Respond(Answer::text(StatusCode::NOT_FOUND, "not found\n"));
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Route::Respond(Answer::method_not_allowed("GET, HEAD"));
        }
        if let Some(key) = expensive {
            return match self.expensive_call(key, req.uri().query()) {
                Ok(_) => Route::Expensive,
                Err(msg) => Route::Respond(Answer::text(StatusCode::BAD_REQUEST, msg)),
            };
        }
        match path {
            "/" => Route::Respond(Answer::text(StatusCode::OK, "Hello, World!")),
            "/healthz" => Route::Respond(Answer::text(StatusCode::OK, "ok")),
            _ => match parse_ms(req.uri().query(), self.config.max_sleep, None) {
                Ok(d) => Route::Sleep(d),
                Err(msg) => Route::Respond(Answer::text(StatusCode::BAD_REQUEST, msg)),
            },
        }
    }

    /// The key and duration of `/expensive/{key}?ms=N`, or why the request is a `400`.
    fn expensive_call<'k>(
        &self,
        key: &'k str,
        query: Option<&str>,
    ) -> Result<(&'k str, Duration), &'static str> {
        let valid = !key.is_empty()
            && key.len() <= 64
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid {
            return Err("`key` must be 1-64 of [A-Za-z0-9_.-]\n");
        }
        Ok((
            key,
            parse_ms(query, self.config.max_sleep, DEFAULT_EXPENSIVE)?,
        ))
    }
}

/// What a request resolves to.
enum Route {
    Respond(Answer),
    Sleep(Duration),
    /// A valid `/expensive/{key}`: through tower-singleflight to [`Backend`].
    Expensive,
    Static(ServeDir),
    Upload,
}

/// How long `/expensive/{key}` takes without `ms`.
const DEFAULT_EXPENSIVE: Option<Duration> = Some(Duration::from_millis(200));

/// Parses the `ms` parameter: at most one, decimal, at most `max`; `default` when absent
/// (required when `None`).
fn parse_ms(
    query: Option<&str>,
    max: Duration,
    default: Option<Duration>,
) -> Result<Duration, &'static str> {
    let mut ms = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "ms" {
            if ms.is_some() {
                return Err("`ms` given more than once\n");
            }
            ms = Some(value);
        }
    }
    let ms = match (ms, default) {
        (Some(ms), _) => ms,
        (None, Some(default)) => return Ok(default.min(max)),
        (None, None) => return Err("missing `ms` query parameter\n"),
    };
    // `u64::from_str` accepts a leading `+`; a strict parser keeps the contract simple.
    if ms.is_empty() || ms.len() > 20 || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return Err("`ms` must be a non-negative integer\n");
    }
    let ms: u64 = ms
        .parse()
        .map_err(|_| "`ms` must be a non-negative integer\n")?;
    let d = Duration::from_millis(ms);
    if d > max {
        return Err("`ms` is larger than the configured maximum (--max-sleep)\n");
    }
    Ok(d)
}

fn json(done: &Expensive) -> Response<FileBody> {
    // The key is restricted to characters that need no escaping in JSON.
    let body = format!(
        "{{\"key\":\"{}\",\"generation\":{}}}\n",
        done.key, done.generation
    );
    let mut res = Response::new(FileBody::from_bytes(Bytes::from(body)));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn text(status: StatusCode, body: &'static str) -> Response<FileBody> {
    let mut res = Response::new(FileBody::from_bytes(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
    res
}

/// An answer decided from the request head alone, built into a response when polled.
#[derive(Debug, Clone, Copy)]
struct Answer {
    status: StatusCode,
    body: &'static str,
    allow: Option<&'static str>,
}

impl Answer {
    fn text(status: StatusCode, body: &'static str) -> Self {
        Answer {
            status,
            body,
            allow: None,
        }
    }

    fn method_not_allowed(allow: &'static str) -> Self {
        Answer {
            status: StatusCode::METHOD_NOT_ALLOWED,
            body: "method not allowed\n",
            allow: Some(allow),
        }
    }

    fn response(self) -> Response<FileBody> {
        let mut res = text(self.status, self.body);
        if let Some(allow) = self.allow {
            res.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        res
    }
}

impl Work {
    fn sleep<B>(&self, req: &Request<B>, d: Duration, expensive: Option<Expensive>) -> SleepFuture {
        let signal = req.extensions().get::<AbortSignal>().cloned();
        SleepFuture {
            sleep: tokio::time::sleep(d),
            aborted: signal.as_ref().map(AbortSignal::aborted),
            work: WorkGuard {
                signal,
                counter: self.work_cancelled.clone(),
                done: false,
            },
            expensive,
        }
    }
}

/// The answer `/expensive/{key}` will give.
#[derive(Debug)]
struct Expensive {
    key: String,
    generation: u64,
}

/// The simulated backend call of `/expensive/{key}`, which tower-singleflight shares.
#[derive(Debug, Clone)]
struct Backend(Work);

impl<B> Service<Request<B>> for Backend {
    type Response = Response<FileBody>;
    type Error = Infallible;
    type Future = BackendFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let key = req.uri().path().strip_prefix("/expensive/").unwrap_or("");
        match self.0.expensive_call(key, req.uri().query()) {
            Ok((key, d)) => {
                // The backend call starts here: one per flight, thanks to the layer.
                self.0.backend_calls.inc();
                let generation = self.0.generations.fetch_add(1, Ordering::Relaxed) + 1;
                let done = Expensive {
                    key: key.to_owned(),
                    generation,
                };
                BackendFuture::Sleep {
                    fut: self.0.sleep(&req, d, Some(done)),
                }
            }
            // `Routes` validated the request before it reached the layer.
            Err(msg) => BackendFuture::Ready {
                res: Some(text(StatusCode::BAD_REQUEST, msg)),
            },
        }
    }
}

impl<B> Service<Request<B>> for Routes
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<RouteBody>;
    type Error = BoxError;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let state = match self.work.route(&req) {
            Route::Respond(answer) => State::Ready {
                answer: Some(answer),
            },
            Route::Static(mut files) => {
                let (parts, _body) = req.into_parts();
                State::Static {
                    fut: Box::new(files.call(Request::from_parts(parts, ()))),
                }
            }
            Route::Sleep(d) => State::Sleep {
                fut: Box::pin(self.work.sleep(&req, d, None)),
            },
            Route::Upload => State::Upload {
                fut: crate::upload::upload(req.into_body(), self.work.config.max_body_size),
            },
            Route::Expensive => State::Shared {
                fut: Box::pin(self.expensive.clone().oneshot(req)),
            },
        };
        RouteFuture { state }
    }
}

/// The future of a shared `/expensive` call.
type SharedFuture =
    Pin<Box<dyn Future<Output = Result<Response<SingleflightBody<FileBody>>, BoxError>> + Send>>;

pin_project_lite::pin_project! {
    /// Future of [`Routes`].
    #[must_use = "futures do nothing unless polled"]
    pub(crate) struct RouteFuture {
        #[pin]
        state: State,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    // Small (the large `/sleep` and `/static` futures boxed: an allocation beside a timer
    // or a file open; an immediate answer built when polled), so that every layer wrapping
    // it moves a few words instead of calling `memcpy`.
    enum State {
        Ready { answer: Option<Answer> },
        Static { fut: Box<tower_zerocopy::ResponseFuture> },
        Sleep { fut: Pin<Box<SleepFuture>> },
        Upload { fut: crate::upload::UploadFuture },
        Shared { fut: SharedFuture },
    }
}

impl std::fmt::Debug for RouteFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteFuture").finish_non_exhaustive()
    }
}

impl Future for RouteFuture {
    type Output = Result<Response<RouteBody>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = match self.project().state.project() {
            StateProj::Ready { answer } => answer
                .take()
                .expect("RouteFuture polled after completion")
                .response(),
            StateProj::Static { fut } => match std::task::ready!(Pin::new(&mut **fut).poll(cx)) {
                Ok(res) => res,
                Err(never) => match never {},
            },
            StateProj::Sleep { fut } => std::task::ready!(fut.as_mut().poll(cx)),
            StateProj::Upload { fut } => std::task::ready!(fut.as_mut().poll(cx)),
            StateProj::Shared { fut } => {
                let res = std::task::ready!(fut.as_mut().poll(cx))?;
                return Poll::Ready(Ok(res.map(Either::Right)));
            }
        };
        Poll::Ready(Ok(res.map(Either::Left)))
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Backend`]: the simulated call, or a `400` it should never see.
    #[project = BackendProj]
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub(crate) enum BackendFuture {
        Ready { res: Option<Response<FileBody>> },
        Sleep { #[pin] fut: SleepFuture },
    }
}

impl Future for BackendFuture {
    type Output = Result<Response<FileBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BackendProj::Ready { res } => Poll::Ready(Ok(res
                .take()
                .expect("BackendFuture polled after completion"))),
            BackendProj::Sleep { fut } => fut.poll(cx).map(Ok),
        }
    }
}

pin_project_lite::pin_project! {
    /// `/sleep` and the `/expensive` backend call: a timer that stops when the request's
    /// signal fires.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub(crate) struct SleepFuture {
        #[pin]
        sleep: tokio::time::Sleep,
        #[pin]
        aborted: Option<Aborted>,
        work: WorkGuard,
        expensive: Option<Expensive>,
    }
}

/// Counts a `/sleep` that ends because its signal fired: when the future sees the signal
/// and answers, or when it is dropped after the signal fired (a client that went away:
/// `AbortLayer` fires `ClientGone` before it drops the handler).
#[derive(Debug)]
struct WorkGuard {
    signal: Option<AbortSignal>,
    counter: Counter,
    done: bool,
}

impl WorkGuard {
    fn finish(&mut self, cancelled: bool) {
        if !self.done && cancelled {
            self.counter.inc();
        }
        self.done = true;
    }
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        let cancelled = self.signal.as_ref().is_some_and(AbortSignal::is_aborted);
        self.finish(cancelled);
    }
}

impl Future for SleepFuture {
    type Output = Response<FileBody>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (mut aborted, work, expensive) = (this.aborted, this.work, this.expensive);
        // The work first: a sleep that is over is not cancelled.
        if this.sleep.poll(cx).is_ready() {
            work.finish(false);
            return Poll::Ready(match expensive.take() {
                Some(done) => json(&done),
                None => text(StatusCode::OK, "slept\n"),
            });
        }
        let Some(signal) = aborted.as_mut().as_pin_mut() else {
            return Poll::Pending;
        };
        let reason = std::task::ready!(signal.poll(cx));
        if expensive.is_some() && reason == AbortReason::ClientGone {
            // Shared work outlives the client that started it: tower-singleflight
            // drops it when the last waiting client has gone.
            aborted.set(None);
            return Poll::Pending;
        }
        work.finish(true);
        let (status, body) = match reason {
            AbortReason::Shutdown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "stopped: server shutting down\n",
            ),
            // The layer answers a passed deadline with its own 504.
            AbortReason::DeadlineExceeded => {
                (StatusCode::GATEWAY_TIMEOUT, "stopped: deadline exceeded\n")
            }
            // Nobody is left to read it.
            _ => (StatusCode::SERVICE_UNAVAILABLE, "stopped\n"),
        };
        Poll::Ready(text(status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tower_abort::AbortBody;

    /// Tests drive the stack with an empty body: hyper's `Incoming` cannot be built.
    type TestBody = Empty<Bytes>;

    fn request(uri: &str) -> Request<TestBody> {
        Request::get(uri).body(TestBody::new()).unwrap()
    }

    /// `n` concurrent `GET uri` through `svc`, each on its own task.
    fn spawn_gets<S>(
        svc: &S,
        uri: &str,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<S::Response, S::Error>>>
    where
        S: Service<Request<TestBody>> + Clone + Send + 'static,
        S::Future: Send,
        S::Response: Send + 'static,
        S::Error: Send + 'static,
    {
        (0..n)
            .map(|_| tokio::spawn(svc.clone().oneshot(request(uri))))
            .collect()
    }

    fn config(max_sleep: Duration) -> RouteConfig {
        RouteConfig {
            max_sleep,
            static_files: None,
            max_body_size: 1024,
        }
    }

    fn routes() -> Routes {
        Routes::new(
            config(Duration::from_secs(5)),
            Counter::default(),
            Counter::default(),
            &singleflight(),
        )
    }

    async fn get(method: Method, uri: &str) -> (StatusCode, Bytes, Response<RouteBody>) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(TestBody::new())
            .unwrap();
        let res = routes().oneshot(req).await.unwrap();
        let status = res.status();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            status,
            bytes.clone(),
            Response::from_parts(parts, Either::Left(FileBody::from_bytes(bytes))),
        )
    }

    #[tokio::test]
    async fn contract_routes() {
        let (s, b, res) = get(Method::GET, "/").await;
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"Hello, World!"[..]));
        assert!(res.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        let (s, b, _) = get(Method::GET, "/healthz").await;
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok"[..]));
        assert_eq!(get(Method::GET, "/nope").await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(Method::HEAD, "/").await.0, StatusCode::OK);
        let (s, _, res) = get(Method::POST, "/").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(res.headers()[ALLOW], "GET, HEAD");
        let (s, _, res) = get(Method::GET, "/upload").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(res.headers()[ALLOW], "POST");
        let (s, b, _) = get(Method::POST, "/upload").await;
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"received 0 bytes\n"[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_waits_the_requested_time() {
        let start = tokio::time::Instant::now();
        let (s, _, _) = get(Method::GET, "/sleep?ms=1500").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn bad_sleep_values_are_400() {
        for uri in [
            "/sleep",
            "/sleep?ms=",
            "/sleep?ms=abc",
            "/sleep?ms=-1",
            "/sleep?ms=+5",
            "/sleep?ms=1.5",
            "/sleep?ms=5001",
            "/sleep?ms=99999999999999999999999",
            "/sleep?ms=1&ms=2",
        ] {
            assert_eq!(
                get(Method::GET, uri).await.0,
                StatusCode::BAD_REQUEST,
                "{uri}"
            );
        }
        assert_eq!(get(Method::GET, "/sleep?x=1&ms=0").await.0, StatusCode::OK);
    }

    /// `Routes` is generic over the request body; the app takes hyper's `Incoming`, which
    /// tests cannot build, so they drive the same stack over [`TestBody`].
    fn stack(root: &tower_abort::AbortRoot, cancelled: &Counter) -> tower_abort::Abort<Routes> {
        tower::ServiceBuilder::new()
            .layer(abort_layer(AbortLayer::with_root(root.clone())))
            .service(Routes::new(
                config(Duration::from_secs(60)),
                cancelled.clone(),
                Counter::default(),
                &singleflight(),
            ))
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_stops_on_shutdown_and_counts_the_cancelled_work() {
        let root = tower_abort::AbortRoot::new();
        let cancelled = Counter::default();
        let svc = stack(&root, &cancelled);
        let req = request("/sleep?ms=10000");
        let call = tokio::spawn(svc.oneshot(req));
        tokio::time::sleep(Duration::from_millis(100)).await;
        root.shutdown();
        let res = call.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"stopped: server shutting down\n");
        assert_eq!(cancelled.get(), 1);
        assert_eq!(root.stats().get(AbortReason::Shutdown), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn client_deadline_header_stops_sleep_with_504() {
        let root = tower_abort::AbortRoot::new();
        let cancelled = Counter::default();
        let start = tokio::time::Instant::now();
        let req = Request::get("/sleep?ms=10000")
            .header("request-timeout", "250")
            .body(TestBody::new())
            .unwrap();
        let res = stack(&root, &cancelled).oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        assert_eq!(cancelled.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_frees_the_sleep_and_is_counted() {
        let root = tower_abort::AbortRoot::new();
        let cancelled = Counter::default();
        let mut svc = stack(&root, &cancelled);
        let req = request("/sleep?ms=10000");
        let fut = ServiceExt::<Request<TestBody>>::ready(&mut svc)
            .await
            .unwrap()
            .call(req);
        let mut fut = Box::pin(fut);
        assert!(futures_util::poll!(fut.as_mut()).is_pending());
        drop(fut);
        assert_eq!(cancelled.get(), 1);
        assert_eq!(root.stats().get(AbortReason::ClientGone), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn completed_sleep_is_not_counted() {
        let root = tower_abort::AbortRoot::new();
        let cancelled = Counter::default();
        let req = request("/sleep?ms=10");
        let res = stack(&root, &cancelled).oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"slept\n");
        assert_eq!(cancelled.get(), 0);
        assert_eq!(root.stats().total(), 0);
    }

    fn expensive_stack(
        root: &tower_abort::AbortRoot,
        backend_calls: &Counter,
        work_cancelled: &Counter,
        singleflight: SingleflightLayer<ExpensiveKey>,
    ) -> impl Service<
        Request<TestBody>,
        Response = Response<AbortBody<RouteBody>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone {
        tower::ServiceBuilder::new()
            .layer(abort_layer(AbortLayer::with_root(root.clone())))
            .service(Routes::new(
                config(Duration::from_secs(60)),
                work_cancelled.clone(),
                backend_calls.clone(),
                &singleflight,
            ))
    }

    async fn until(mut cond: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached");
    }

    #[tokio::test(start_paused = true)]
    async fn no_singleflight_runs_every_expensive_request_on_its_own() {
        let root = tower_abort::AbortRoot::new();
        let (calls, cancelled) = (Counter::default(), Counter::default());
        let layer = singleflight_if(false);
        let stats = layer.stats();
        let svc = expensive_stack(&root, &calls, &cancelled, layer);
        let tasks = spawn_gets(&svc, "/expensive/report-7?ms=500", 20);
        let mut generations = Vec::new();
        for t in tasks {
            let res = t.await.unwrap().unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            generations.push(body);
        }
        generations.sort();
        generations.dedup();
        assert_eq!(
            generations.len(),
            20,
            "every request got its own backend call"
        );
        assert_eq!(calls.get(), 20);
        assert_eq!((stats.leaders(), stats.followers()), (0, 0));
        assert_eq!(stats.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_expensive_requests_share_one_backend_call() {
        let root = tower_abort::AbortRoot::new();
        let (calls, cancelled) = (Counter::default(), Counter::default());
        let layer = singleflight();
        let stats = layer.stats();
        let svc = expensive_stack(&root, &calls, &cancelled, layer);
        let start = tokio::time::Instant::now();
        let tasks = spawn_gets(&svc, "/expensive/report-7?ms=500", 20);
        let mut roles = Vec::new();
        for t in tasks {
            let res = t.await.unwrap().unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
            roles.push(res.headers()["x-singleflight"].to_str().unwrap().to_owned());
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"{\"key\":\"report-7\",\"generation\":1}\n");
        }
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        assert_eq!(calls.get(), 1);
        assert_eq!(roles.iter().filter(|r| *r == "leader").count(), 1);
        assert_eq!((stats.leaders(), stats.followers()), (1, 19));
        assert_eq!(stats.in_flight(), 0);
        // A different key is a different call.
        let req = request("/expensive/other?ms=1");
        let body = svc
            .oneshot(req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            &body.to_bytes()[..],
            b"{\"key\":\"other\",\"generation\":2}\n"
        );
        assert_eq!(calls.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_leader_leaving_does_not_stop_the_shared_call() {
        let root = tower_abort::AbortRoot::new();
        let (calls, cancelled) = (Counter::default(), Counter::default());
        let layer = singleflight();
        let stats = layer.stats();
        let svc = expensive_stack(&root, &calls, &cancelled, layer);
        let get = || request("/expensive/k?ms=1000");
        let leader = tokio::spawn(svc.clone().oneshot(get()));
        until(|| stats.leaders() == 1).await;
        let followers: Vec<_> = (0..3)
            .map(|_| tokio::spawn(svc.clone().oneshot(get())))
            .collect();
        until(|| stats.followers() == 3).await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        for f in followers {
            let res = f.await.unwrap().unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"{\"key\":\"k\",\"generation\":1}\n");
        }
        assert_eq!(calls.get(), 1);
        assert_eq!(cancelled.get(), 0, "the shared call ran to its end");
        assert_eq!(root.stats().get(AbortReason::ClientGone), 1);
        assert_eq!(stats.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn other_routes_never_reach_the_singleflight_layer() {
        let root = tower_abort::AbortRoot::new();
        let (calls, cancelled) = (Counter::default(), Counter::default());
        let layer = singleflight();
        let stats = layer.stats();
        let svc = expensive_stack(&root, &calls, &cancelled, layer);
        let a = tokio::spawn(svc.clone().oneshot(request("/sleep?ms=100")));
        let b = tokio::spawn(svc.clone().oneshot(request("/sleep?ms=100")));
        assert_eq!(a.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(b.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!((stats.leaders(), stats.followers()), (0, 0));
        assert_eq!(stats.bypassed(tower_singleflight::BypassReason::NoKey), 0);
        // A rejected `/expensive` request is answered before the layer too.
        let res = svc.clone().oneshot(request("/expensive/a?ms=x"));
        assert_eq!(res.await.unwrap().status(), StatusCode::BAD_REQUEST);
        assert_eq!(stats.bypassed(tower_singleflight::BypassReason::NoKey), 0);
        assert_eq!(calls.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn expensive_takes_200ms_by_default_and_validates_its_input() {
        let root = tower_abort::AbortRoot::new();
        let (calls, cancelled) = (Counter::default(), Counter::default());
        let svc = expensive_stack(&root, &calls, &cancelled, singleflight());
        let start = tokio::time::Instant::now();
        let res = svc.clone().oneshot(request("/expensive/a"));
        assert_eq!(res.await.unwrap().status(), StatusCode::OK);
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        for uri in [
            "/expensive/",
            "/expensive/a/b",
            "/expensive/a%22b",
            "/expensive/a?ms=x",
            "/expensive/a?ms=999999",
        ] {
            let res = svc.clone().oneshot(request(uri)).await;
            assert_eq!(res.unwrap().status(), StatusCode::BAD_REQUEST, "{uri}");
        }
        assert_eq!(calls.get(), 1);
    }
}
