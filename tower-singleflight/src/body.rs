//! Response bodies: the inner body passed through, a reader of a shared body, or empty.
//!
//! A shared body is pulled from the leader's response once and fanned out as `Bytes`
//! frames (cloning one is a reference-count increment) to every reader through a replay
//! buffer. See the crate docs, "Streaming to every waiter", for the policy.

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    panic::{catch_unwind, AssertUnwindSafe},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, Bytes};
use futures_task::{waker_ref, ArcWake};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use slab::Slab;

use crate::{
    error::{BoxError, Lagged, SharedError},
    stats::Counters,
    sync::{lock, sleep, Mutex, Sleep},
};

pub(crate) type BoxBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

pin_project! {
    /// The response body of [`Singleflight`](crate::Singleflight).
    ///
    /// Either the inner service's own body (a bypass, the leader of an unshared response or
    /// a follower's own call), a reader of a shared body, or empty (a `HEAD` follower, or
    /// a response the layer made itself, such as `504` or `503`).
    ///
    /// Errors of a shared body are [`SharedError`] (the leader's body failed; every reader
    /// sees it, none sees a clean end) or [`Lagged`] (this reader fell too far behind).
    pub struct SingleflightBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // `poll` is `poll_inner::<B>`, taken where `B::Error: Into<BoxError>` is known, so
        // that the `Body` impl itself needs no such bound: with a `BoxError` body error,
        // rustc fails to prove it for the erased lifetimes of a `Send` async block holding
        // this body, such as hyper's connection (rust-lang/rust#64552).
        Inner { #[pin] body: B, poll: PollInner<B> },
        Shared { reader: Reader },
        Empty,
    }
}

/// Polls an inner body, converting its frames to `Bytes` and its error to `BoxError`.
type PollInner<B> =
    fn(Pin<&mut B>, &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>;

fn poll_inner<B>(
    body: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    body.poll_frame(cx).map(|frame| {
        frame.map(|r| {
            r.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))
                .map_err(Into::into)
        })
    })
}

impl<B> SingleflightBody<B> {
    /// Wraps a body of the inner service's type, for responses built outside the layer
    /// (an error handler's, say) that must have the layer's body type.
    pub fn new(body: B) -> Self
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        Self::inner(body)
    }

    pub(crate) fn inner(body: B) -> Self
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        Self {
            kind: Kind::Inner {
                body,
                poll: poll_inner::<B>,
            },
        }
    }
    pub(crate) fn shared(reader: Reader) -> Self {
        Self {
            kind: Kind::Shared { reader },
        }
    }
    pub(crate) fn empty() -> Self {
        Self { kind: Kind::Empty }
    }
}

impl<B> fmt::Debug for SingleflightBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Inner { .. } => "inner",
            Kind::Shared { .. } => "shared",
            Kind::Empty => "empty",
        };
        f.debug_struct("SingleflightBody")
            .field("kind", &kind)
            .finish()
    }
}

impl<B: Body> Body for SingleflightBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Inner { body, poll } => poll(body, cx),
            KindProj::Shared { reader } => reader.poll_frame(cx),
            KindProj::Empty => Poll::Ready(None),
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Shared { reader } => reader.is_end_stream(),
            Kind::Empty => true,
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Shared { reader } => reader.size_hint(),
            Kind::Empty => SizeHint::with_exact(0),
        }
    }
}

// ===== impl IntoBytes =====

pin_project! {
    /// Adapts a body to `Bytes` data and boxed errors, for the fan-out.
    pub(crate) struct IntoBytes<B> {
        #[pin]
        body: B,
    }
}

impl<B> IntoBytes<B> {
    pub(crate) fn new(body: B) -> Self {
        Self { body }
    }
}

impl<B> Body for IntoBytes<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().body.poll_frame(cx).map(|frame| {
            frame.map(|r| {
                r.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))
                    .map_err(Into::into)
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

// ===== the fan-out =====

/// The leader's body, pulled once and replayed to every reader.
pub(crate) struct Fanout {
    state: Mutex<FanoutState>,
    max_buffer: usize,
    lag_timeout: Duration,
    hint: SizeHint,
    counters: Arc<Counters>,
}

struct FanoutState {
    /// `None` while a reader polls it (with the lock released) or after it ended.
    body: Option<BoxBody>,
    polling: bool,
    /// The body asked to be polled (or never was) and no reader has polled it since.
    needs_poll: bool,
    /// Data frames still buffered; `chunks[0]` is frame number `base`.
    chunks: VecDeque<Bytes>,
    base: u64,
    buffered: usize,
    end: Option<End>,
    readers: Slab<ReaderSlot>,
    /// Running while the buffer is full and the slowest reader holds it up.
    lag_deadline: Option<Pin<Box<Sleep>>>,
    /// Called once with the whole body if it ends cleanly with nothing evicted.
    #[cfg(feature = "micro-cache")]
    on_complete: Option<OnComplete>,
}

#[cfg(feature = "micro-cache")]
pub(crate) type OnComplete = Box<dyn FnOnce(Vec<Bytes>, Option<HeaderMap>) + Send>;

#[derive(Clone)]
enum End {
    Complete(Option<HeaderMap>),
    Failed(SharedError),
}

struct ReaderSlot {
    /// Number of the next frame to read.
    next: u64,
    /// Set while parked at the tail waiting for the next frame.
    waker: Option<Waker>,
    lagged: bool,
    finished: bool,
    read: u64,
}

impl Fanout {
    pub(crate) fn new(
        body: BoxBody,
        max_buffer: usize,
        lag_timeout: Duration,
        counters: Arc<Counters>,
    ) -> Arc<Self> {
        let hint = body.size_hint();
        let done = body.is_end_stream();
        Arc::new(Self {
            state: Mutex::new(FanoutState {
                body: if done { None } else { Some(body) },
                polling: false,
                needs_poll: true,
                chunks: VecDeque::new(),
                base: 0,
                buffered: 0,
                end: done.then_some(End::Complete(None)),
                readers: Slab::new(),
                lag_deadline: None,
                #[cfg(feature = "micro-cache")]
                on_complete: None,
            }),
            max_buffer,
            lag_timeout,
            hint,
            counters,
        })
    }

    /// A fan-out of a body already complete (a micro-cache hit).
    #[cfg(feature = "micro-cache")]
    pub(crate) fn completed(
        chunks: &[Bytes],
        trailers: Option<HeaderMap>,
        counters: Arc<Counters>,
    ) -> Arc<Self> {
        let len: usize = chunks.iter().map(Bytes::len).sum();
        Arc::new(Self {
            state: Mutex::new(FanoutState {
                body: None,
                polling: false,
                needs_poll: false,
                chunks: chunks.iter().cloned().collect(),
                base: 0,
                buffered: len,
                end: Some(End::Complete(trailers)),
                readers: Slab::new(),
                lag_deadline: None,
                on_complete: None,
            }),
            max_buffer: usize::MAX,
            lag_timeout: Duration::MAX,
            hint: SizeHint::with_exact(len as u64),
            counters,
        })
    }

    /// Registers `hook` to receive the whole body once it has ended cleanly, provided no
    /// frame was evicted from the buffer by then.
    #[cfg(feature = "micro-cache")]
    pub(crate) fn on_complete(&self, hook: OnComplete) {
        let mut st = lock(&self.state);
        st.on_complete = Some(hook);
        let ready = Self::take_completion(&mut st);
        drop(st);
        if let Some(call) = ready {
            call();
        }
    }

    #[cfg(feature = "micro-cache")]
    fn take_completion(st: &mut FanoutState) -> Option<impl FnOnce()> {
        let Some(End::Complete(trailers)) = &st.end else {
            return None;
        };
        if st.base != 0 {
            st.on_complete = None;
            return None;
        }
        let hook = st.on_complete.take()?;
        let chunks: Vec<Bytes> = st.chunks.iter().cloned().collect();
        let trailers = trailers.clone();
        Some(move || hook(chunks, trailers))
    }

    /// A new reader, starting at the first frame. If that frame was already dropped from
    /// the buffer, the reader reports [`Lagged`] on its first poll.
    pub(crate) fn reader(self: &Arc<Self>) -> Reader {
        let slot = lock(&self.state).readers.insert(ReaderSlot {
            next: 0,
            waker: None,
            lagged: false,
            finished: false,
            read: 0,
        });
        Reader {
            fanout: Arc::clone(self),
            slot,
        }
    }

    /// Drops the frames every active reader has read, while the buffer is at its bound
    /// (below it, frames are kept for readers that have not started yet). Returns whether
    /// room was made.
    fn evict_read(&self, st: &mut FanoutState) -> bool {
        if st.buffered < self.max_buffer {
            return false;
        }
        let slowest = st
            .readers
            .iter()
            .filter(|(_, r)| !r.lagged && !r.finished)
            .map(|(_, r)| r.next)
            .min()
            .unwrap_or(st.base + st.chunks.len() as u64);
        let before = st.buffered;
        while st.base < slowest && st.buffered >= self.max_buffer {
            let Some(front) = st.chunks.pop_front() else {
                break;
            };
            st.buffered -= front.len();
            st.base += 1;
        }
        st.buffered < before
    }

    /// The lag timeout expired: cuts off every reader still needing the front frame.
    fn cut_slowest(&self, st: &mut FanoutState, to_wake: &mut Vec<Waker>) {
        let front = st.base;
        for (_, r) in st.readers.iter_mut() {
            if !r.lagged && !r.finished && r.next <= front {
                r.lagged = true;
                self.counters.lagged();
                to_wake.extend(r.waker.take());
            }
        }
        self.evict_read(st);
    }
}

fn parked(st: &mut FanoutState, except: Option<usize>) -> Vec<Waker> {
    st.readers
        .iter_mut()
        .filter(|(slot, _)| Some(*slot) != except)
        .filter_map(|(_, r)| r.waker.take())
        .collect()
}

impl ArcWake for Fanout {
    fn wake_by_ref(this: &Arc<Self>) {
        let mut state = lock(&this.state);
        if state.needs_poll {
            return;
        }
        state.needs_poll = true;
        if state.polling {
            return;
        }
        // Wake one reader parked at the tail: it will poll the body.
        let waker = state.readers.iter_mut().find_map(|(_, r)| r.waker.take());
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// One reader of a shared body. Dropping it leaves the fan-out.
pub(crate) struct Reader {
    fanout: Arc<Fanout>,
    slot: usize,
}

impl Reader {
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let fanout = &self.fanout;
        let mut state = lock(&fanout.state);
        loop {
            let st = &mut *state;
            let reader = &mut st.readers[self.slot];
            if reader.finished {
                return Poll::Ready(None);
            }
            if reader.lagged || reader.next < st.base {
                reader.lagged = true;
                reader.finished = true;
                return Poll::Ready(Some(Err(Lagged::new(fanout.max_buffer).into())));
            }
            let index = (reader.next - st.base) as usize;
            if let Some(chunk) = st.chunks.get(index) {
                let chunk = chunk.clone();
                reader.next += 1;
                reader.read += chunk.len() as u64;
                reader.waker = None;
                // Reading the front frame of a full buffer makes room: let the others on.
                let mut to_wake = Vec::new();
                if index == 0 && fanout.evict_read(st) && st.buffered < fanout.max_buffer {
                    st.lag_deadline = None;
                    to_wake = parked(st, Some(self.slot));
                }
                drop(state);
                to_wake.into_iter().for_each(Waker::wake);
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if let Some(end) = &st.end {
                reader.finished = true;
                reader.waker = None;
                return Poll::Ready(match end.clone() {
                    End::Complete(None) => None,
                    End::Complete(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
                    End::Failed(err) => Some(Err(err.into())),
                });
            }
            // At the tail: park, and drive the body if it is idle and asked to be polled.
            match &mut reader.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                w => *w = Some(cx.waker().clone()),
            }
            if st.polling || !st.needs_poll || st.body.is_none() {
                return Poll::Pending;
            }
            if st.buffered >= fanout.max_buffer && !fanout.evict_read(st) {
                // Full, and the slowest reader holds the front frame: wait for it, but
                // only for `lag_timeout`; then cut it off.
                let timeout = fanout.lag_timeout;
                let deadline = st
                    .lag_deadline
                    .get_or_insert_with(|| Box::pin(sleep(timeout)));
                if deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                st.lag_deadline = None;
                let mut to_wake = Vec::new();
                fanout.cut_slowest(st, &mut to_wake);
                drop(state);
                to_wake.into_iter().for_each(Waker::wake);
                state = lock(&fanout.state);
                continue;
            }
            let Some(mut body) = st.body.take() else {
                return Poll::Pending;
            };
            st.polling = true;
            st.needs_poll = false;
            drop(state);

            let waker = waker_ref(fanout);
            let polled = catch_unwind(AssertUnwindSafe(|| {
                body.as_mut().poll_frame(&mut Context::from_waker(&waker))
            }));

            state = lock(&fanout.state);
            let st = &mut *state;
            st.polling = false;
            match polled {
                Ok(Poll::Pending) => {
                    st.body = Some(body);
                    let woken_meanwhile = st.needs_poll;
                    drop(state);
                    if woken_meanwhile {
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
                Ok(Poll::Ready(Some(Ok(frame)))) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            st.buffered += data.len();
                            st.chunks.push_back(data);
                        }
                        if body.is_end_stream() {
                            st.end = Some(End::Complete(None));
                        } else {
                            st.body = Some(body);
                            // Pull the next frame as soon as a reader reaches the tail.
                            st.needs_poll = true;
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body; other frame kinds are skipped.
                        if let Ok(trailers) = frame.into_trailers() {
                            st.end = Some(End::Complete(Some(trailers)));
                        } else {
                            st.body = Some(body);
                            st.needs_poll = true;
                        }
                    }
                },
                Ok(Poll::Ready(None)) => st.end = Some(End::Complete(None)),
                Ok(Poll::Ready(Some(Err(err)))) => {
                    st.end = Some(End::Failed(SharedError::new(err)));
                }
                Err(_panic) => {
                    st.end = Some(End::Failed(SharedError::new(
                        "response body panicked while being shared".into(),
                    )));
                }
            }
            #[cfg(feature = "micro-cache")]
            let completion = Fanout::take_completion(st);
            #[cfg(not(feature = "micro-cache"))]
            let completion: Option<fn()> = None;
            // Something new for every parked reader: wake each once.
            let to_wake = parked(st, Some(self.slot));
            if !to_wake.is_empty() || completion.is_some() {
                drop(state);
                to_wake.into_iter().for_each(Waker::wake);
                if let Some(call) = completion {
                    call();
                }
                state = lock(&fanout.state);
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = lock(&self.fanout.state);
        let reader = &state.readers[self.slot];
        reader.finished
            || (matches!(state.end, Some(End::Complete(None)))
                && !reader.lagged
                && reader.next >= state.base
                && reader.next == state.base + state.chunks.len() as u64)
    }

    fn size_hint(&self) -> SizeHint {
        let state = lock(&self.fanout.state);
        let read = state.readers[self.slot].read;
        let mut hint = SizeHint::new();
        let total = &self.fanout.hint;
        hint.set_lower(total.lower().saturating_sub(read));
        if let Some(upper) = total.upper() {
            hint.set_upper(upper.saturating_sub(read));
        }
        hint
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let fanout = &self.fanout;
        let mut state = lock(&fanout.state);
        let st = &mut *state;
        if st.readers.try_remove(self.slot).is_none() {
            return;
        }
        let to_wake = if fanout.evict_read(st) && st.buffered < fanout.max_buffer {
            // This reader held the buffer up: everyone waiting for room may go on.
            st.lag_deadline = None;
            parked(st, None)
        } else if (st.needs_poll && !st.polling && st.body.is_some()) || st.lag_deadline.is_some() {
            // This reader may have been the one woken to poll the body, or the one the
            // lag timer would wake: pass that on to one parked reader.
            st.readers
                .iter_mut()
                .find_map(|(_, r)| r.waker.take())
                .into_iter()
                .collect()
        } else {
            Vec::new()
        };
        drop(state);
        to_wake.into_iter().for_each(Waker::wake);
    }
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").field("slot", &self.slot).finish()
    }
}
