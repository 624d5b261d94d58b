//! The application: the public routes, and [`app`], the one place where the tower stack
//! that serves them is assembled.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /` | `200 text/plain` `Hello, World!` |
//! | `GET /healthz` | `200 text/plain` `ok` |
//! | `GET /sleep?ms=N` | waits `N` ms (at most `--max-sleep`) then `200`; a missing, malformed or too large `N` gets `400` |
//! | anything else | `404` (`405` with `Allow` for another method on a known path) |
//!
//! `HEAD` is accepted wherever `GET` is. Malformed requests (`400`) and oversized heads
//! (`431`) are answered by hyper before a request reaches this service.

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
use http_body_util::Full;
use hyper::body::Incoming;
use tower::Service;

/// Response body of every route.
pub(crate) type RouteBody = Full<Bytes>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// Settings of the routes.
#[derive(Debug, Clone)]
pub(crate) struct RouteConfig {
    /// Upper bound of `/sleep?ms=N`.
    pub(crate) max_sleep: Duration,
}

/// Builds the service every connection of a worker clones.
///
/// Later layers (abort, backpressure, singleflight, zerocopy) are added here, around
/// [`Routes`], with `tower::ServiceBuilder`; the connection code only needs a cloneable
/// `Service<Request<Incoming>>` with a `Send` future, any `Bytes` body and any boxable error
/// (answered with a logged `500`, the connection kept), so a layer that changes the body or
/// error type needs no change here or in the connection code.
pub(crate) fn app(
    config: RouteConfig,
) -> impl Service<
    Request<Incoming>,
    Response = Response<impl Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static>,
    Error: Into<BoxError>,
    Future: Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::ServiceBuilder::new().service(Routes::new(config))
}

/// The router: a plain tower [`Service`] whose future does not allocate.
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    config: Arc<RouteConfig>,
}

impl Routes {
    pub(crate) fn new(config: RouteConfig) -> Self {
        Routes {
            config: Arc::new(config),
        }
    }

    fn route<B>(&self, req: &Request<B>) -> Route {
        let path = req.uri().path();
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
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
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
            Route::Sleep(d) => RouteFuture {
                state: State::Sleep {
                    sleep: tokio::time::sleep(d),
                },
            },
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
        Sleep { #[pin] sleep: tokio::time::Sleep },
    }
}

impl Future for RouteFuture {
    type Output = Result<Response<RouteBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Ready { res } => {
                Poll::Ready(Ok(res.take().expect("RouteFuture polled after completion")))
            }
            StateProj::Sleep { sleep } => {
                std::task::ready!(sleep.poll(cx));
                Poll::Ready(Ok(text(StatusCode::OK, "slept\n")))
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
        Routes::new(RouteConfig {
            max_sleep: Duration::from_secs(5),
        })
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
            Response::from_parts(parts, Full::new(bytes)),
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
}
