//! `POST /upload`: a route that reads the request body (counting it, keeping nothing), so
//! the `--max-body-size` limit is exercised on streamed bodies and not only on
//! `Content-Length`.
//!
//! A declared `Content-Length` above the limit is answered `413` by [`crate::strict`]
//! before any route runs. This route reads the body through `http_body_util::Limited`, and
//! turns its error into `413` when a chunked (or HTTP/2) body grows past the limit. Routes
//! that do not read bodies never buffer one: hyper discards a little of an unread body
//! after the response and closes the connection rather than read more.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_zerocopy::FileBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The future of one `POST /upload`.
pub(crate) type UploadFuture = Pin<Box<dyn Future<Output = Response<FileBody>> + Send>>;

/// Answers `POST /upload` with the number of body bytes received, at most `limit`.
///
/// Only this route allocates its future: it is the one that waits on a client body.
pub(crate) fn upload<B>(body: B, limit: usize) -> UploadFuture
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Box::pin(count_body(Limited::new(body, limit)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    async fn run<B>(body: B, limit: usize) -> (StatusCode, String)
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let res = upload(body, limit).await;
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn counts_a_body_within_the_limit() {
        let body = Full::new(Bytes::from(vec![7u8; 1000]));
        assert_eq!(
            run(body, 1000).await,
            (StatusCode::OK, "received 1000 bytes\n".into())
        );
    }

    #[tokio::test]
    async fn a_streamed_body_past_the_limit_is_413() {
        let chunks = (0..10).map(|_| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![1u8; 100])))
        });
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        assert_eq!(run(body, 999).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_failing_body_is_400() {
        let chunks = [
            Ok(http_body::Frame::data(Bytes::from_static(b"abc"))),
            Err(std::io::Error::other("client went away")),
        ];
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        assert_eq!(run(body, 999).await.0, StatusCode::BAD_REQUEST);
    }
}
