//! The axum extractor (feature `axum`).

use std::convert::Infallible;
use std::fmt;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;
use http::StatusCode;

use crate::AbortSignal;

/// Takes the request's [`AbortSignal`] in an axum handler.
///
/// Rejects with [`MissingAbortSignal`] (`500`) when no [`AbortLayer`](crate::AbortLayer)
/// ran; take `Option<AbortSignal>` to make it optional.
///
/// ```
/// use axum::{routing::get, Router};
/// use tower_abort::{AbortLayer, AbortSignal};
///
/// async fn report(signal: AbortSignal) -> &'static str {
///     tokio::select! {
///         _ = signal.aborted() => "stopped", // the client never sees this if it left
///         _ = tokio::time::sleep(std::time::Duration::from_millis(10)) => "done",
///     }
/// }
///
/// let app = Router::new().route("/report", get(report)).layer(AbortLayer::new());
/// # let _: Router = app;
/// ```
impl<S: Send + Sync> FromRequestParts<S> for AbortSignal {
    type Rejection = MissingAbortSignal;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<AbortSignal>()
            .cloned()
            .ok_or(MissingAbortSignal(()))
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for AbortSignal {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<AbortSignal>().cloned())
    }
}

/// Rejection of the [`AbortSignal`] extractor: no [`AbortLayer`](crate::AbortLayer) ran
/// for this request. Answers `500 Internal Server Error`, as it is a wiring mistake.
pub struct MissingAbortSignal(());

impl fmt::Debug for MissingAbortSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MissingAbortSignal")
    }
}

impl fmt::Display for MissingAbortSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no AbortSignal in the request: is tower_abort::AbortLayer applied?")
    }
}

impl std::error::Error for MissingAbortSignal {}

impl IntoResponse for MissingAbortSignal {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}
