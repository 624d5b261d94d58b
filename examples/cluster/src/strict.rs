//! Request checks hyper leaves to the application, for requests whose framing or target
//! another HTTP hop could read differently (RFC 9112 §3.2, §6.1):
//!
//! - an HTTP/1.1 request without exactly one `Host` (HTTP/1.0: at most one) is `400`;
//! - `Transfer-Encoding` that applies `chunked` more than once (`chunked, chunked`, or two
//!   headers), which hyper reads as one chunked coding, is `400` and the connection closes.
//!
//! (`Transfer-Encoding` together with `Content-Length` needs no check here: hyper frames by
//! the former, removes the latter from the request and closes the connection after the
//! response, as RFC 9112 §6.1 allows.)
//!
//! Generic over the inner service's body, so it sits outside tower-singleflight (a rejected
//! request must not share another request's answer). A rejected request's body is never read; `Connection: close` makes hyper close the
//! connection after the answer instead of trying to find the next request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use tower::{Layer, Service};

/// Rejects ambiguous requests before the routes see them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StrictLayer;

impl<S> Layer<S> for StrictLayer {
    type Service = Strict<S>;

    fn layer(&self, inner: S) -> Strict<S> {
        Strict { inner }
    }
}

/// See [the module docs](self).
#[derive(Debug, Clone)]
pub(crate) struct Strict<S> {
    inner: S,
}

/// Why a request is rejected, or `None`.
fn check<B>(req: &Request<B>) -> Option<&'static str> {
    let headers = req.headers();
    let hosts = headers.get_all(HOST).iter().count();
    match req.version() {
        Version::HTTP_11 if hosts != 1 => return Some("exactly one Host header required\n"),
        Version::HTTP_10 if hosts > 1 => return Some("more than one Host header\n"),
        _ => {}
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let chunked = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
            .count();
        if chunked > 1 {
            return Some("chunked applied more than once\n");
        }
    }
    None
}

/// The inner service's body, or the short text of a rejection.
pub(crate) type StrictBody<B> = Either<B, Full<Bytes>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for Strict<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<StrictBody<ResB>>;
    type Error = S::Error;
    type Future = StrictFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        match check(&req) {
            None => StrictFuture::Inner {
                fut: self.inner.call(req),
            },
            Some(why) => {
                let mut res = Response::new(Full::new(Bytes::from_static(why.as_bytes())));
                *res.status_mut() = StatusCode::BAD_REQUEST;
                let headers = res.headers_mut();
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
                StrictFuture::Rejected { res: Some(res) }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`Strict`].
    #[project = StrictProj]
    #[must_use = "futures do nothing unless polled"]
    pub(crate) enum StrictFuture<F> {
        Inner { #[pin] fut: F },
        Rejected { res: Option<Response<Full<Bytes>>> },
    }
}

impl<F, B, E> Future for StrictFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<StrictBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            StrictProj::Inner { fut } => {
                fut.poll(cx).map(|res| res.map(|res| res.map(Either::Left)))
            }
            StrictProj::Rejected { res } => {
                let res = res.take().expect("polled after completion");
                Poll::Ready(Ok(res.map(Either::Right)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_rules() {
        assert_eq!(check(&req(Version::HTTP_11, &[("host", "a")])), None);
        assert!(check(&req(Version::HTTP_11, &[])).is_some());
        assert!(check(&req(Version::HTTP_11, &[("host", "a"), ("host", "b")])).is_some());
        assert_eq!(check(&req(Version::HTTP_10, &[])), None);
        assert!(check(&req(Version::HTTP_10, &[("host", "a"), ("host", "a")])).is_some());
        // HTTP/2 carries the authority in `:authority`.
        assert_eq!(check(&req(Version::HTTP_2, &[])), None);
    }

    #[test]
    fn framing_rules() {
        let h = ("host", "a");
        let te = |v| ("transfer-encoding", v);
        assert_eq!(check(&req(Version::HTTP_11, &[h, te("chunked")])), None);
        assert_eq!(
            check(&req(Version::HTTP_11, &[h, te("gzip, Chunked")])),
            None
        );
        assert!(check(&req(Version::HTTP_11, &[h, te("chunked, chunked")])).is_some());
        assert!(check(&req(Version::HTTP_11, &[h, te("chunked"), te(" chunked")])).is_some());
        assert_eq!(
            check(&req(Version::HTTP_11, &[h, ("content-length", "3")])),
            None
        );
    }
}
