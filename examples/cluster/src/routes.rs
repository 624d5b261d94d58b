//! The application: the public routes, and [`app`], the one place where the tower stack
//! that serves them is assembled.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /` | `200 text/plain` `Hello, World!` |
//! | `GET /healthz` | `200 text/plain` `ok` |
//! | `GET /sleep?ms=N` | waits `N` ms (at most `--max-sleep`) then `200`; a missing, malformed or too large `N` gets `400`; stops at once when the request's `AbortSignal` fires (`503` on shutdown, `504` past a deadline; a client that left gets nothing), counted in `demo_work_cancelled_total` |
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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tower::Service;
use tower_abort::future::Aborted;
use tower_abort::{AbortLayer, AbortReason, AbortSignal, TimeoutFormat};
use tower_backpressure::BackpressureLayer;
use tower_zerocopy::{FileBody, ServeDir};

/// Response body of every route: literal bytes, or a file for `/static` (tower-zerocopy's
/// body, which goes out through sendfile on a capable connection).
pub(crate) type RouteBody = FileBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// Settings of the routes.
#[derive(Debug, Clone)]
pub(crate) struct RouteConfig {
    /// Upper bound of `/sleep?ms=N`.
    pub(crate) max_sleep: Duration,
    /// The service behind `GET /static/{*path}` (`None`: that prefix is `404`).
    pub(crate) static_files: Option<ServeDir>,
    /// Largest request body (`--max-body-size`): `413` above it (see [`crate::upload`]).
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

/// Builds the service every connection of a worker clones.
///
/// `AbortLayer` is outermost, so every request (404s included) gets its signal and the
/// signal fires whatever the inner layers do. tower-backpressure comes next, so a shed
/// request costs no routing work and the permit covers the whole response body. Later
/// layers go between them and [`Routes`]. The connection code only needs a cloneable
/// `Service<Request<Incoming>>` with a `Send` future, any `Bytes` body and any boxable error
/// (answered with a logged `500`, the connection kept), so a layer that changes the body or
/// error type needs no change here or in the connection code.
///
/// `work_cancelled` counts `/sleep` requests stopped by their signal.
pub(crate) fn app(
    config: RouteConfig,
    abort: AbortLayer,
    work_cancelled: Counter,
    backpressure: BackpressureLayer,
) -> impl Service<
    Request<Incoming>,
    Response = Response<impl Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static>,
    Error: Into<BoxError>,
    Future: Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::ServiceBuilder::new()
        .layer(abort_layer(abort))
        // A declared Content-Length over `--max-body-size` is a 413 that costs nothing;
        // streamed bodies are cut off by the route that reads them (`crate::upload`).
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            config.max_body_size,
        ))
        // Outermost of the working layers: a shed request costs no routing work, and the
        // permit covers the whole response body.
        .layer(backpressure)
        // Before anything that could share or start work for an ambiguous request.
        .layer(crate::strict::StrictLayer)
        .layer(crate::upload::UploadLayer)
        .service(Routes::new(config, work_cancelled))
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

/// The router: a plain tower [`Service`] whose future does not allocate.
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    config: Arc<RouteConfig>,
    work_cancelled: Counter,
}

impl Routes {
    pub(crate) fn new(config: RouteConfig, work_cancelled: Counter) -> Self {
        Routes {
            config: Arc::new(config),
            work_cancelled,
        }
    }

    fn route<B>(&self, req: &Request<B>) -> Route {
        let path = req.uri().path();
        if let Some(rest) = path.strip_prefix("/static/") {
            if let Some(files) = &self.config.static_files {
                // ServeDir sees the path below the prefix, and checks method and path itself.
                let mut target = format!("/{rest}");
                if let Some(q) = req.uri().query() {
                    target.push('?');
                    target.push_str(q);
                }
                return match target.parse::<http::Uri>() {
                    Ok(uri) => Route::Static(files.clone(), uri),
                    Err(_) => Route::Respond(text(StatusCode::BAD_REQUEST, "bad path\n")),
                };
            }
        }
        let known = matches!(path, "/" | "/healthz" | "/sleep");
        if !known {
            return Route::Respond(text(StatusCode::NOT_FOUND, "not found\n"));
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            res.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Route::Respond(res);
        }
        match path {
            "/" => Route::Respond(text(StatusCode::OK, "Hello, World!")),
            "/healthz" => Route::Respond(text(StatusCode::OK, "ok")),
            _ => match parse_sleep(req.uri().query(), self.config.max_sleep) {
                Ok(d) => Route::Sleep(d),
                Err(msg) => Route::Respond(text(StatusCode::BAD_REQUEST, msg)),
            },
        }
    }
}

/// What a request resolves to.
enum Route {
    Respond(Response<RouteBody>),
    Sleep(Duration),
    Static(ServeDir, http::Uri),
}

/// Parses the `ms` parameter of `/sleep`: exactly one, decimal, at most `max`.
fn parse_sleep(query: Option<&str>, max: Duration) -> Result<Duration, &'static str> {
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
    let ms = ms.ok_or("missing `ms` query parameter\n")?;
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

fn text(status: StatusCode, body: &'static str) -> Response<RouteBody> {
    let mut res = Response::new(FileBody::from_bytes(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
    res
}

impl<B> Service<Request<B>> for Routes {
    type Response = Response<RouteBody>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.route(&req) {
            Route::Respond(res) => RouteFuture {
                state: State::Ready { res: Some(res) },
            },
            Route::Static(mut files, uri) => {
                let (mut parts, _body) = req.into_parts();
                parts.uri = uri;
                RouteFuture {
                    state: State::Static {
                        fut: files.call(Request::from_parts(parts, ())),
                    },
                }
            }
            Route::Sleep(d) => {
                let signal = req.extensions().get::<AbortSignal>().cloned();
                RouteFuture {
                    state: State::Sleep {
                        sleep: tokio::time::sleep(d),
                        aborted: signal.as_ref().map(AbortSignal::aborted),
                        work: WorkGuard {
                            signal,
                            counter: self.work_cancelled.clone(),
                            done: false,
                        },
                    },
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Future of [`Routes`]: either an immediate response or `/sleep`'s timer.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub(crate) struct RouteFuture {
        #[pin]
        state: State,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State {
        Ready { res: Option<Response<RouteBody>> },
        Static { fut: tower_zerocopy::ResponseFuture },
        Sleep {
            #[pin]
            sleep: tokio::time::Sleep,
            #[pin]
            aborted: Option<Aborted>,
            work: WorkGuard,
        },
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

impl Future for RouteFuture {
    type Output = Result<Response<RouteBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Ready { res } => {
                Poll::Ready(Ok(res.take().expect("RouteFuture polled after completion")))
            }
            StateProj::Static { fut } => Pin::new(fut).poll(cx),
            StateProj::Sleep {
                sleep,
                aborted,
                work,
            } => {
                // The work first: a sleep that is over is not cancelled.
                if sleep.poll(cx).is_ready() {
                    work.finish(false);
                    return Poll::Ready(Ok(text(StatusCode::OK, "slept\n")));
                }
                let Some(aborted) = aborted.as_pin_mut() else {
                    return Poll::Pending;
                };
                let reason = std::task::ready!(aborted.poll(cx));
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
                Poll::Ready(Ok(text(status, body)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn routes() -> Routes {
        Routes::new(
            RouteConfig {
                max_sleep: Duration::from_secs(5),
                static_files: None,
                max_body_size: 1024,
            },
            Counter::default(),
        )
    }

    async fn get(method: Method, uri: &str) -> (StatusCode, Bytes, Response<RouteBody>) {
        let req = Request::builder().method(method).uri(uri).body(()).unwrap();
        let res = routes().oneshot(req).await.unwrap();
        let status = res.status();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            status,
            bytes.clone(),
            Response::from_parts(parts, FileBody::from_bytes(bytes)),
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
    /// tests cannot build, so they drive the same stack over `()`.
    fn stack(root: &tower_abort::AbortRoot, cancelled: &Counter) -> tower_abort::Abort<Routes> {
        tower::ServiceBuilder::new()
            .layer(abort_layer(AbortLayer::with_root(root.clone())))
            .service(Routes::new(
                RouteConfig {
                    max_sleep: Duration::from_secs(60),
                    static_files: None,
                    max_body_size: 1024,
                },
                cancelled.clone(),
            ))
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_stops_on_shutdown_and_counts_the_cancelled_work() {
        let root = tower_abort::AbortRoot::new();
        let cancelled = Counter::default();
        let svc = stack(&root, &cancelled);
        let req = Request::get("/sleep?ms=10000").body(()).unwrap();
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
            .body(())
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
        let req = Request::get("/sleep?ms=10000").body(()).unwrap();
        let fut = ServiceExt::<Request<()>>::ready(&mut svc)
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
        let req = Request::get("/sleep?ms=10").body(()).unwrap();
        let res = stack(&root, &cancelled).oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"slept\n");
        assert_eq!(cancelled.get(), 0);
        assert_eq!(root.stats().total(), 0);
    }
}
