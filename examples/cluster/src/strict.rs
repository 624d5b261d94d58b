//! Request checks hyper leaves to the application, for requests whose framing or target
//! another HTTP hop could read differently (RFC 9112 §3.2, §6.1):
//!
//! - an HTTP/1.1 request without exactly one `Host` (HTTP/1.0: at most one) is `400`;
//! - `Transfer-Encoding` that applies `chunked` more than once (`chunked, chunked`, or two
//!   headers), which hyper reads as one chunked coding, is `400` and the connection closes;
//! - a declared `Content-Length` above `--max-body-size` is `413` before any route runs
//!   (a body that grows past the limit while streamed is cut off by the one route that
//!   reads bodies, [`crate::upload`]).
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
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use tower::{Layer, Service};

/// Rejects ambiguous and oversized requests before the routes see them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StrictLayer {
    max_body_size: u64,
}

impl StrictLayer {
    /// Requests declaring a body over `max_body_size` bytes are answered `413`.
    pub(crate) fn new(max_body_size: usize) -> Self {
        StrictLayer {
            max_body_size: u64::try_from(max_body_size).unwrap_or(u64::MAX),
        }
    }
}

impl<S> Layer<S> for StrictLayer {
    type Service = Strict<S>;

    fn layer(&self, inner: S) -> Strict<S> {
        Strict {
            inner,
            max_body_size: self.max_body_size,
        }
    }
}

/// See [the module docs](self).
#[derive(Debug, Clone)]
pub(crate) struct Strict<S> {
    inner: S,
    max_body_size: u64,
}

/// Why a request is rejected, or `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejection {
    /// `400` and the connection closes.
    Ambiguous(&'static str),
    /// `413`: the declared body is over the limit.
    TooLarge,
}

fn check<B>(req: &Request<B>, max_body_size: u64) -> Option<Rejection> {
    // One pass over the few headers of a typical request costs less than three lookups,
    // each of which hashes its name.
    let (mut hosts, mut chunked) = (0usize, 0usize);
    for (name, value) in req.headers() {
        if name == HOST {
            hosts += 1;
        } else if name == CONTENT_LENGTH {
            // hyper has already refused a malformed or conflicting `Content-Length`.
            let declared = value.to_str().ok().and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|len| len > max_body_size) {
                return Some(Rejection::TooLarge);
            }
        } else if name == TRANSFER_ENCODING {
            chunked += value
                .as_bytes()
                .split(|&b| b == b',')
                .filter(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
                .count();
        }
    }
    match req.version() {
        Version::HTTP_11 if hosts != 1 => {
            Some(Rejection::Ambiguous("exactly one Host header required\n"))
        }
        Version::HTTP_10 if hosts > 1 => Some(Rejection::Ambiguous("more than one Host header\n")),
        _ if chunked > 1 => Some(Rejection::Ambiguous("chunked applied more than once\n")),
        _ => None,
    }
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

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let (status, why) = match check(&req, self.max_body_size) {
            None => {
                return StrictFuture::Inner {
                    fut: self.inner.call(req),
                }
            }
            Some(Rejection::Ambiguous(why)) => (StatusCode::BAD_REQUEST, why),
            Some(Rejection::TooLarge) => (StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
        };
        let mut res = Response::new(Full::new(Bytes::from_static(why.as_bytes())));
        *res.status_mut() = status;
        let headers = res.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        // The body is never read, so hyper could not find the next request reliably.
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        StrictFuture::Rejected { res: Some(res) }
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

    #[inline]
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

    const MAX: u64 = 1024;

    fn rejected(req: &Request<()>) -> bool {
        check(req, MAX).is_some()
    }

    #[test]
    fn declared_bodies_over_the_limit_are_413() {
        let h = ("host", "a");
        let cl = |v| ("content-length", v);
        assert_eq!(check(&req(Version::HTTP_11, &[h, cl("1024")]), MAX), None);
        assert_eq!(
            check(&req(Version::HTTP_11, &[h, cl("1025")]), MAX),
            Some(Rejection::TooLarge)
        );
        assert_eq!(
            check(&req(Version::HTTP_2, &[cl("99999999999999999999")]), MAX),
            None,
            "hyper refuses an unparsable length before this layer; it is not ours to judge"
        );
    }

    #[test]
    fn host_rules() {
        assert!(!rejected(&req(Version::HTTP_11, &[("host", "a")])));
        assert!(rejected(&req(Version::HTTP_11, &[])));
        assert!(rejected(&req(
            Version::HTTP_11,
            &[("host", "a"), ("host", "b")]
        )));
        assert!(!rejected(&req(Version::HTTP_10, &[])));
        assert!(rejected(&req(
            Version::HTTP_10,
            &[("host", "a"), ("host", "a")]
        )));
        // HTTP/2 carries the authority in `:authority`.
        assert!(!rejected(&req(Version::HTTP_2, &[])));
    }

    #[test]
    fn framing_rules() {
        let h = ("host", "a");
        let te = |v| ("transfer-encoding", v);
        assert!(!rejected(&req(Version::HTTP_11, &[h, te("chunked")])));
        assert!(!rejected(&req(Version::HTTP_11, &[h, te("gzip, Chunked")])));
        assert!(rejected(&req(
            Version::HTTP_11,
            &[h, te("chunked, chunked")]
        )));
        assert!(rejected(&req(
            Version::HTTP_11,
            &[h, te("chunked"), te(" chunked")]
        )));
        assert!(!rejected(&req(
            Version::HTTP_11,
            &[h, ("content-length", "3")]
        )));
    }
}
