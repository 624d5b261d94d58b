//! Bodies: the response body that carries the permit, and the metered request body that
//! counts streamed bytes against the byte budget.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::BudgetExceeded;
use crate::limiter::{Limiter, MeterState, Permit};
use crate::sync::Arc;

pin_project! {
    /// The response body of [`Backpressure`](crate::Backpressure).
    ///
    /// It holds the request's permit until the inner body reports its end (or an error),
    /// or until it is dropped, whichever comes first; shed responses carry a short text
    /// body. `is_end_stream` and `size_hint` are forwarded.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
        permit: Option<Permit>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        // Boxed, and empty once read (a shed message never is before): shed responses are
        // rare, and a non-null box lets this variant share the inner body's space.
        Shed { data: Box<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn shed(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Shed {
                data: Box::new(data),
            },
            permit: None,
        }
    }

    pub(crate) fn unlimited(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
            permit: None,
        }
    }

    /// Wraps `body`, releasing `permit` when it ends; an already finished body releases
    /// it at once.
    pub(crate) fn limited(body: B, mut permit: Permit) -> Self
    where
        B: Body,
    {
        if body.is_end_stream() {
            permit.complete();
            return Self::unlimited(body);
        }
        ResponseBody {
            kind: Kind::Inner { body },
            permit: Some(permit),
        }
    }

    /// Whether this body still holds a permit.
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("holds_permit", &self.permit.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Shed { data } => Poll::Ready(
                (!data.is_empty()).then(|| Ok(Frame::data(std::mem::take(&mut **data)))),
            ),
            KindProj::Inner { mut body } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                let finished = match &frame {
                    None => true,
                    Some(Err(_)) => true,
                    // Trailers are the last frame; servers drop the body after them.
                    Some(Ok(frame)) => frame.is_trailers() || body.is_end_stream(),
                };
                if finished {
                    if let Some(mut permit) = this.permit.take() {
                        // An error mid-stream is the server failing, not the client leaving.
                        if matches!(frame, Some(Err(_))) {
                            permit.set_outcome(|| crate::adaptive::Outcome::Overload);
                        }
                        permit.complete();
                    }
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Shed { data } => data.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Shed { data } => SizeHint::with_exact(data.len() as u64),
        }
    }
}

/// The link between a metered request body and its request's permit.
#[derive(Debug)]
pub struct BodyMeter {
    limiter: Limiter,
    state: Arc<MeterState>,
    reserved: u64,
    max_bytes: u64,
}

impl BodyMeter {
    /// The meter of `permit`'s request body; `None` if its limiter does not count bytes.
    pub(crate) fn new(permit: &mut Permit) -> Option<Self> {
        let (state, reserved) = permit.meter()?;
        Some(BodyMeter {
            limiter: permit.limiter().clone(),
            state,
            reserved,
            max_bytes: permit.limiter().config().max_bytes.unwrap_or(u64::MAX),
        })
    }
}

pin_project! {
    /// A request body whose bytes are counted against the byte budget as they are read
    /// (see [`BackpressureBuilder::meter_bodies_with`](crate::BackpressureBuilder::meter_bodies_with)).
    ///
    /// Bytes up to the request's reservation (its `Content-Length`) are already counted;
    /// bytes beyond it are charged as they stream, and a frame that would take the bytes in
    /// flight past the budget fails the body with [`BudgetExceeded`]. Counted bytes are
    /// returned when the request's permit is.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        meter: BodyMeter,
        seen: u64,
        failed: bool,
    }
}

impl<B> MeteredBody<B> {
    pub(crate) fn new(inner: B, meter: BodyMeter) -> Self {
        MeteredBody {
            inner,
            meter,
            seen: 0,
            failed: false,
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("inner", &self.inner)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body,
    B::Error: Into<crate::BoxError>,
{
    type Data = B::Data;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        match ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.remaining() as u64;
                    let before = this.seen.saturating_sub(this.meter.reserved);
                    *this.seen += len;
                    let after = this.seen.saturating_sub(this.meter.reserved);
                    let extra = after - before;
                    if extra > 0 && !this.meter.limiter.charge_bytes(&this.meter.state, extra) {
                        *this.failed = true;
                        return Poll::Ready(Some(Err(Box::new(BudgetExceeded {
                            max_bytes: this.meter.max_bytes,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
