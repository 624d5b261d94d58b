//! `POST /upload`: a route that reads the request body (counting it, keeping nothing), so
//! the `--max-body-size` limit is exercised on streamed bodies and not only on
//! `Content-Length`.
//!
//! The limit itself is tower-http's `RequestBodyLimitLayer`, outside this layer: a declared
//! `Content-Length` above the limit is answered `413` before any route runs, and every
//! body is wrapped in `http_body_util::Limited`, whose error this route turns into `413`
//! when a chunked (or HTTP/2) body grows past the limit. Routes that do not read bodies
//! never buffer one: hyper discards a little of an unread body after the response and
//! closes the connection rather than read more.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError};
use tower::{Layer, Service};
use tower_zerocopy::FileBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Adds `POST /upload` in front of the routes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UploadLayer;

impl<S> Layer<S> for UploadLayer {
    type Service = Upload<S>;

    fn layer(&self, inner: S) -> Upload<S> {
        Upload { inner }
    }
}

/// Answers `POST /upload` with the number of body bytes received; everything else goes to
/// the inner service.
#[derive(Debug, Clone)]
pub(crate) struct Upload<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Upload<S>
where
    S: Service<Request<B>, Response = Response<FileBody>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<FileBody>;
    type Error = S::Error;
    type Future = UploadFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.uri().path() != "/upload" || req.method() != Method::POST {
            return UploadFuture::Inner {
                fut: self.inner.call(req),
            };
        }
        // Only this route allocates its future: it is the one that waits on a client body.
        UploadFuture::Upload {
            fut: Box::pin(count_body(req.into_body())),
        }
    }
}

async fn count_body<B>(body: B) -> Response<FileBody>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    received += bytes::Buf::remaining(data) as u64;
                }
            }
            Err(e) => {
                let e: BoxError = e.into();
                return if e.downcast_ref::<LengthLimitError>().is_some() {
                    text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n".into())
                } else {
                    // A malformed chunked body or a client that stopped mid-body.
                    text(StatusCode::BAD_REQUEST, "bad body\n".into())
                };
            }
        }
    }
    text(StatusCode::OK, format!("received {received} bytes\n"))
}

fn text(status: StatusCode, body: String) -> Response<FileBody> {
    let mut res = Response::new(FileBody::from_bytes(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

pin_project_lite::pin_project! {
    /// Response future of [`Upload`].
    #[project = UploadProj]
    #[must_use = "futures do nothing unless polled"]
    pub(crate) enum UploadFuture<F> {
        Inner { #[pin] fut: F },
        Upload { fut: Pin<Box<dyn Future<Output = Response<FileBody>> + Send>> },
    }
}

impl<F, E> Future for UploadFuture<F>
where
    F: Future<Output = Result<Response<FileBody>, E>>,
{
    type Output = Result<Response<FileBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            UploadProj::Inner { fut } => fut.poll(cx),
            UploadProj::Upload { fut } => fut.as_mut().poll(cx).map(Ok),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, Limited, StreamBody};

    async fn upload<B>(body: B) -> (StatusCode, String)
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let inner = tower::service_fn(|_req: Request<B>| async {
            Ok::<_, std::convert::Infallible>(text(StatusCode::NOT_FOUND, String::new()))
        });
        let req = Request::post("/upload").body(body).unwrap();
        let res = UploadLayer.layer(inner).call(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn counts_a_body_within_the_limit() {
        let body = Limited::new(Full::new(Bytes::from(vec![7u8; 1000])), 1000);
        assert_eq!(
            upload(body).await,
            (StatusCode::OK, "received 1000 bytes\n".into())
        );
    }

    #[tokio::test]
    async fn a_streamed_body_past_the_limit_is_413() {
        let chunks = (0..10).map(|_| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![1u8; 100])))
        });
        let body = Limited::new(StreamBody::new(futures_util::stream::iter(chunks)), 999);
        assert_eq!(upload(body).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn other_requests_reach_the_inner_service() {
        let inner = tower::service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, std::convert::Infallible>(text(StatusCode::NOT_FOUND, String::new()))
        });
        let req = Request::get("/upload").body(Full::default()).unwrap();
        let res = UploadLayer.layer(inner).call(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
    }
}
