//! A response body fed by a producer through a buffer bounded in bytes, so producing a
//! streamed response slows down to the pace the client reads it, like Node's `pipe()`.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::sync::{lock, Arc, Mutex};

/// Creates a body and its sender. The sender may buffer up to `high_water_mark` bytes
/// (at least 1) ahead of the reader; a chunk is always accepted when the buffer is below
/// the mark, so one chunk larger than the mark still goes through on its own.
///
/// Dropping the sender ends the body; dropping the body makes every send fail with
/// [`Closed`], so the producer stops as soon as the client is gone.
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::BodyExt;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let (mut tx, body) = tower_backpressure::channel_body(64 * 1024);
/// tokio::spawn(async move {
///     for i in 0..3 {
///         // Waits while 64 KiB are already buffered and unread.
///         if tx.send(Bytes::from(format!("line {i}\n"))).await.is_err() {
///             return; // the client went away
///         }
///     }
/// });
/// let text = body.collect().await.unwrap().to_bytes();
/// assert_eq!(&text[..], b"line 0\nline 1\nline 2\n");
/// # }
/// ```
pub fn channel_body(high_water_mark: usize) -> (BodySender, ChannelBody) {
    let shared = Arc::new(Mutex::new(Channel {
        frames: VecDeque::new(),
        buffered: 0,
        high_water_mark: high_water_mark.max(1),
        sender_alive: true,
        receiver_alive: true,
        error: None,
        reader: None,
        writer: None,
    }));
    (
        BodySender {
            shared: shared.clone(),
        },
        ChannelBody { shared },
    )
}

struct Channel {
    frames: VecDeque<Frame<Bytes>>,
    buffered: usize,
    high_water_mark: usize,
    sender_alive: bool,
    receiver_alive: bool,
    error: Option<crate::BoxError>,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// The error of a send to a [`ChannelBody`] that was dropped (the client went away).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the response body was dropped")
    }
}

impl std::error::Error for Closed {}

/// The producing half of [`channel_body`].
pub struct BodySender {
    shared: Arc<Mutex<Channel>>,
}

impl fmt::Debug for BodySender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodySender").finish_non_exhaustive()
    }
}

impl BodySender {
    /// Ready when the buffer is below the high-water mark (or the body is gone: then
    /// `Err(Closed)`). Like Node's `'drain'` event.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Closed>> {
        let mut ch = lock(&self.shared);
        if !ch.receiver_alive {
            return Poll::Ready(Err(Closed));
        }
        if ch.buffered < ch.high_water_mark {
            return Poll::Ready(Ok(()));
        }
        ch.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Queues `item` as a frame of `len` bytes unless the body is gone, or (with
    /// `respect_mark`) the buffer is at its high-water mark, in which cases `item` comes
    /// back with whether the body is gone. The check and the push happen under one lock,
    /// so an item is either queued or handed back, whatever the reader does meanwhile.
    fn push<T>(
        &mut self,
        item: T,
        len: usize,
        into_frame: impl FnOnce(T) -> Frame<Bytes>,
        respect_mark: bool,
    ) -> Result<(), (T, bool)> {
        let reader = {
            let mut ch = lock(&self.shared);
            if !ch.receiver_alive {
                return Err((item, true));
            }
            if respect_mark && ch.buffered >= ch.high_water_mark {
                return Err((item, false));
            }
            ch.buffered += len;
            ch.frames.push_back(into_frame(item));
            ch.reader.take()
        };
        if let Some(w) = reader {
            w.wake();
        }
        Ok(())
    }

    /// Waits for room below the high-water mark, then queues `data`.
    pub async fn send(&mut self, data: Bytes) -> Result<(), Closed> {
        poll_fn(|cx| self.poll_ready(cx)).await?;
        // Only this sender adds to the buffer, so the room found above is still there;
        // only the body leaving can intervene.
        let len = data.len();
        self.push(data, len, Frame::data, false).map_err(|_| Closed)
    }

    /// Queues `data` without waiting if the buffer is below the high-water mark; otherwise
    /// hands it back. Like Node's `write()` returning `false`, without the buffering.
    pub fn try_send(&mut self, data: Bytes) -> Result<(), TrySendError> {
        let len = data.len();
        self.push(data, len, Frame::data, true)
            .map_err(|(data, closed)| {
                if closed {
                    TrySendError::Closed(data)
                } else {
                    TrySendError::Full(data)
                }
            })
    }

    /// Waits for room, then queues trailers; the body ends after them.
    pub async fn send_trailers(mut self, trailers: http::HeaderMap) -> Result<(), Closed> {
        poll_fn(|cx| self.poll_ready(cx)).await?;
        self.push(trailers, 0, Frame::trailers, false)
            .map_err(|_| Closed)
    }

    /// Ends the body with an error after the frames already queued (the connection is
    /// reset rather than the response looking complete).
    pub fn abort(self, error: impl Into<crate::BoxError>) {
        let reader = {
            let mut ch = lock(&self.shared);
            ch.error = Some(error.into());
            ch.reader.take()
        };
        if let Some(w) = reader {
            w.wake();
        }
    }

    /// Bytes queued and not yet read.
    pub fn buffered(&self) -> usize {
        lock(&self.shared).buffered
    }

    /// Whether the body was dropped.
    pub fn is_closed(&self) -> bool {
        !lock(&self.shared).receiver_alive
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        let reader = {
            let mut ch = lock(&self.shared);
            ch.sender_alive = false;
            ch.reader.take()
        };
        if let Some(w) = reader {
            w.wake();
        }
    }
}

/// A [`try_send`](BodySender::try_send) that did not queue its data.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// The buffer is at its high-water mark; the data is handed back.
    Full(Bytes),
    /// The body was dropped.
    Closed(Bytes),
}

impl fmt::Display for TrySendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("the body buffer is full"),
            TrySendError::Closed(_) => f.write_str("the response body was dropped"),
        }
    }
}

impl std::error::Error for TrySendError {}

/// The body half of [`channel_body`].
pub struct ChannelBody {
    shared: Arc<Mutex<Channel>>,
}

impl fmt::Debug for ChannelBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBody").finish_non_exhaustive()
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let (result, writer) = {
            let mut ch = lock(&self.shared);
            if let Some(frame) = ch.frames.pop_front() {
                let was_full = ch.buffered >= ch.high_water_mark;
                ch.buffered -= frame.data_ref().map_or(0, |d| d.len());
                let writer = if was_full && ch.buffered < ch.high_water_mark {
                    ch.writer.take()
                } else {
                    None
                };
                (Poll::Ready(Some(Ok(frame))), writer)
            } else if let Some(e) = ch.error.take() {
                (Poll::Ready(Some(Err(e))), None)
            } else if !ch.sender_alive {
                (Poll::Ready(None), None)
            } else {
                ch.reader = Some(cx.waker().clone());
                (Poll::Pending, None)
            }
        };
        if let Some(w) = writer {
            w.wake();
        }
        result
    }

    fn is_end_stream(&self) -> bool {
        let ch = lock(&self.shared);
        ch.frames.is_empty() && ch.error.is_none() && !ch.sender_alive
    }

    fn size_hint(&self) -> SizeHint {
        let ch = lock(&self.shared);
        let mut hint = SizeHint::new();
        hint.set_lower(ch.buffered as u64);
        if !ch.sender_alive && ch.error.is_none() {
            hint.set_upper(ch.buffered as u64);
        }
        hint
    }
}

impl Drop for ChannelBody {
    fn drop(&mut self) {
        let writer = {
            let mut ch = lock(&self.shared);
            ch.receiver_alive = false;
            ch.frames.clear();
            ch.buffered = 0;
            ch.writer.take()
        };
        if let Some(w) = writer {
            w.wake();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio_test::{assert_pending, assert_ready_ok, task};

    #[tokio::test]
    async fn producer_waits_at_the_high_water_mark_and_resumes_on_read() {
        let (mut tx, mut body) = channel_body(10);
        assert_eq!(tx.try_send(Bytes::from_static(b"123456")), Ok(()));
        // Still below the mark: accepted even though it crosses it.
        assert_eq!(tx.try_send(Bytes::from_static(b"789abc")), Ok(()));
        assert_eq!(tx.buffered(), 12);
        assert!(matches!(
            tx.try_send(Bytes::from_static(b"x")),
            Err(TrySendError::Full(_))
        ));
        let mut send = task::spawn(tx.send(Bytes::from_static(b"def")));
        assert_pending!(send.poll());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "123456");
        assert!(send.is_woken(), "reading below the mark wakes the producer");
        assert_ready_ok!(send.poll());
        drop(send);
        drop(tx);
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(&rest[..], b"789abcdef");
    }

    #[tokio::test]
    async fn dropping_the_body_fails_the_producer() {
        let (mut tx, body) = channel_body(1);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        let mut send = task::spawn(tx.send(Bytes::from_static(b"b")));
        assert_pending!(send.poll());
        drop(body);
        assert!(send.is_woken());
        assert_eq!(send.poll(), Poll::Ready(Err(Closed)));
    }

    #[tokio::test]
    async fn abort_fails_the_body_after_queued_frames() {
        let (mut tx, mut body) = channel_body(100);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        tx.abort("producer failed");
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_err());
    }
}
