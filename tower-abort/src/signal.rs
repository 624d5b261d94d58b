use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Uri};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::event::{self, AbortEvent};
use crate::future::UntilAborted;
use crate::layer::Shared;
use crate::AbortReason;

/// A request-scoped cancellation signal that fires exactly once, with an [`AbortReason`].
///
/// [`AbortLayer`](crate::AbortLayer) puts one into every request's extensions. Take it out
/// (`req.extensions().get::<AbortSignal>()`, or the axum extractor with the `axum`
/// feature), and pass clones to whatever works on the request's behalf: spawned tasks,
/// blocking closures, outgoing calls. They check [`is_aborted`](Self::is_aborted) at safe
/// points, or `select!` on [`aborted`](Self::aborted), and stop cleanly.
///
/// A signal fires when the client goes away, when the request's deadline passes, when the
/// server-wide [`AbortRoot`](crate::AbortRoot) shuts down, or when someone calls
/// [`abort`](Self::abort). Whichever comes first sets the reason; later causes change
/// nothing. It never fires because a response completed normally.
///
/// Clones share one state. Signals form a tree: a [`child`](Self::child) fires when its
/// parent does (with the parent's reason) but can also be aborted on its own, and
/// [`any`](Self::any) fires when any of several signals does.
///
/// # Examples
///
/// ```
/// use tower_abort::{AbortReason, AbortSignal};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let signal = AbortSignal::new();
/// let worker = signal.clone();
/// let task = tokio::spawn(async move {
///     let mut done = 0;
///     while !worker.is_aborted() {
///         done += 1; // one unit of work, then a safe point
///         tokio::task::yield_now().await;
///     }
///     done
/// });
/// signal.abort();
/// let _units = task.await.unwrap();
/// assert_eq!(signal.reason(), Some(AbortReason::Explicit));
/// # }
/// ```
#[derive(Clone)]
pub struct AbortSignal {
    inner: Arc<Inner>,
}

struct Inner {
    /// `0` while armed, then the fired reason's code and, above it, its place in the order
    /// of firings (see [`next_firing`]); written once, by compare-exchange.
    state: AtomicU64,
    /// Created on first need (an `aborted()` wait, a child): a request whose handler never
    /// waits costs no token, so the layer allocates once per request, not twice.
    token: Mutex<Option<CancellationToken>>,
    parent: Parent,
    deadline: Option<Instant>,
    request: Option<RequestInfo>,
}

enum Parent {
    None,
    /// The layer's root, reached through `RequestInfo::layer`.
    Root,
    Signal(AbortSignal),
    Any(Box<[AbortSignal]>),
}

/// Present on signals the layer created: where to count and report the firing.
struct RequestInfo {
    layer: Arc<Shared>,
    /// `None` when the layer had no use for the clock (no deadline, no events).
    started: Option<Instant>,
    method: Method,
    // Boxed: kept only with an `on_abort` callback; inline it would grow every signal.
    uri: Option<Box<Uri>>,
}

impl AbortSignal {
    /// A signal with no parent and no deadline, that fires only through
    /// [`abort`](Self::abort). Useful outside a server and in tests.
    pub fn new() -> Self {
        Self::build(Parent::None, None, None)
    }

    fn build(parent: Parent, deadline: Option<Instant>, request: Option<RequestInfo>) -> Self {
        AbortSignal {
            inner: Arc::new(Inner {
                state: AtomicU64::new(0),
                token: Mutex::new(None),
                parent,
                deadline,
                request,
            }),
        }
    }

    /// The layer's per-request signal: a child of `outer` when an outer layer already put
    /// a signal in the request, otherwise of the layer's root.
    pub(crate) fn for_request(
        layer: &Arc<Shared>,
        outer: Option<&AbortSignal>,
        deadline: Option<Instant>,
        started: Option<Instant>,
        method: Method,
        uri: Option<Uri>,
    ) -> Self {
        let (parent, deadline) = match outer {
            Some(outer) => (
                Parent::Signal(outer.clone()),
                min_deadline(deadline, outer.deadline()),
            ),
            None => (Parent::Root, deadline),
        };
        let request = RequestInfo {
            layer: layer.clone(),
            started,
            method,
            uri: uri.map(Box::new),
        };
        Self::build(parent, deadline, Some(request))
    }

    /// Whether the signal has fired.
    ///
    /// Cheap (atomic loads) and never blocks; call it at every safe point of long work.
    pub fn is_aborted(&self) -> bool {
        self.observe().is_some()
    }

    /// Why the signal fired, or `None` while it has not.
    ///
    /// Once `Some`, the answer never changes.
    pub fn reason(&self) -> Option<AbortReason> {
        self.observe()
    }

    /// Waits until the signal fires and returns the reason; at once if it already has.
    ///
    /// Cancel safe: dropping the future has no effect on the signal, so it can sit in a
    /// `select!` loop. The returned future owns a clone of the signal.
    ///
    /// ```
    /// # use tower_abort::{AbortReason, AbortSignal};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let signal = AbortSignal::new();
    /// signal.abort();
    /// let outcome = tokio::select! {
    ///     reason = signal.aborted() => Err(reason),
    ///     value = async { 42 } => Ok(value),
    /// };
    /// assert!(matches!(outcome, Err(AbortReason::Explicit) | Ok(42)));
    /// # }
    /// ```
    pub fn aborted(&self) -> Aborted {
        Aborted {
            signal: self.clone(),
            wait: None,
            sources: Vec::new(),
        }
    }

    /// The absolute deadline of this request, if it has one: the sooner of the layer's
    /// timeout and a deadline the client sent.
    ///
    /// It is a [`tokio::time::Instant`], so it follows `tokio::time::pause` and `advance`
    /// in tests. Children inherit it; an [`any`](Self::any) signal takes the soonest of its
    /// sources.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// Time left until [`deadline`](Self::deadline): zero once it has passed, `None` when
    /// there is no deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.inner
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Fires the signal with [`AbortReason::Explicit`].
    ///
    /// Returns `true` if this call fired it, `false` if it had already fired (the earlier
    /// reason stays). Aborting a child never affects its parent.
    pub fn abort(&self) -> bool {
        self.fire(AbortReason::Explicit)
    }

    /// A new signal that fires when this one does, with the same reason, and that can also
    /// be aborted on its own without affecting this one. It has the same deadline.
    ///
    /// ```
    /// # use tower_abort::{AbortReason, AbortSignal};
    /// let request = AbortSignal::new();
    /// let step = request.child();
    /// step.abort();
    /// assert!(!request.is_aborted());
    ///
    /// let other = request.child();
    /// request.abort();
    /// assert_eq!(other.reason(), Some(AbortReason::Explicit));
    /// ```
    pub fn child(&self) -> AbortSignal {
        Self::build(Parent::Signal(self.clone()), self.inner.deadline, None)
    }

    /// A signal that fires as soon as any of `signals` fires, with that signal's reason,
    /// like the web's `AbortSignal.any`. It is already fired if one of them already is.
    /// Its deadline is the soonest of theirs. With no signals it fires only through
    /// [`abort`](Self::abort).
    ///
    /// ```
    /// # use tower_abort::{AbortReason, AbortSignal};
    /// let request = AbortSignal::new();
    /// let job = AbortSignal::new();
    /// let either = AbortSignal::any([request.clone(), job.clone()]);
    /// job.abort();
    /// assert_eq!(either.reason(), Some(AbortReason::Explicit));
    /// assert!(!request.is_aborted());
    /// ```
    pub fn any<I>(signals: I) -> AbortSignal
    where
        I: IntoIterator<Item = AbortSignal>,
    {
        let sources: Box<[AbortSignal]> = signals.into_iter().collect();
        let deadline = sources
            .iter()
            .fold(None, |d, s| min_deadline(d, s.deadline()));
        Self::build(Parent::Any(sources), deadline, None)
    }

    /// Runs `future` until it completes or the signal fires, whichever comes first.
    ///
    /// Resolves to `Ok(output)` or `Err(reason)`; on `Err` the future is abandoned at its
    /// current `.await` (it is dropped along with the returned future). The future is
    /// polled before the signal, so work that is ready is never thrown away.
    ///
    /// ```
    /// # use tower_abort::{AbortReason, AbortSignal};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let signal = AbortSignal::new();
    /// signal.abort();
    /// let r = signal.run_until_aborted(std::future::pending::<()>()).await;
    /// assert_eq!(r, Err(AbortReason::Explicit));
    /// # }
    /// ```
    pub fn run_until_aborted<F: Future>(&self, future: F) -> UntilAborted<F> {
        UntilAborted::new(future, self.aborted())
    }

    /// The method of the request this signal was created for by the layer.
    pub(crate) fn request_method(&self) -> Option<&Method> {
        self.inner.request.as_ref().map(|r| &r.method)
    }

    /// Whether `self` and `other` are clones of the same signal.
    pub fn same_signal(&self, other: &AbortSignal) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Fires with `reason` unless the signal already fired (directly or through a parent).
    pub(crate) fn fire(&self, reason: AbortReason) -> bool {
        self.observe().is_none() && self.set(reason, next_firing()).is_ok()
    }

    /// The fired reason, resolving one inherited from a parent (root, parent signal, or a
    /// source of `any`) into this signal's own state, so it is reported and stays stable.
    fn observe(&self) -> Option<AbortReason> {
        self.observe_ordered().map(|(reason, _)| reason)
    }

    /// [`observe`](Self::observe) with the firing's place in the order of firings. An
    /// inherited reason keeps its origin's place, so `any` picks the source that fired
    /// first even when nobody looked at it in between.
    fn observe_ordered(&self) -> Option<(AbortReason, u64)> {
        if let Some(fired) = unpack(self.inner.state.load(Ordering::Acquire)) {
            return Some(fired);
        }
        let inherited = match &self.inner.parent {
            Parent::None => None,
            Parent::Root => self
                .inner
                .request
                .as_ref()
                .and_then(|r| r.layer.root.inner.shutdown_order())
                .map(|order| (AbortReason::Shutdown, order)),
            Parent::Signal(parent) => parent.observe_ordered(),
            Parent::Any(sources) => sources
                .iter()
                .filter_map(AbortSignal::observe_ordered)
                .min_by_key(|&(_, order)| order),
        }?;
        Some(match self.set(inherited.0, inherited.1) {
            Ok(()) => inherited,
            Err(earlier) => earlier,
        })
    }

    fn set(&self, reason: AbortReason, order: u64) -> Result<(), (AbortReason, u64)> {
        let inner = &*self.inner;
        let packed = order << 8 | u64::from(reason.code());
        if let Err(current) =
            inner
                .state
                .compare_exchange(0, packed, Ordering::AcqRel, Ordering::Acquire)
        {
            return Err(unpack(current).unwrap_or((reason, order)));
        }
        // A waiter that creates the token after this point sees the state under the same
        // lock order (see `token`), so nobody misses the cancellation.
        if let Some(token) = lock(&inner.token).as_ref() {
            token.cancel();
        }
        if let Some(request) = &inner.request {
            request.layer.root.inner.count(reason);
            let event = AbortEvent {
                reason,
                method: &request.method,
                uri: request.uri.as_deref(),
                elapsed: request.started.map(|s| s.elapsed()),
                deadline: inner.deadline,
            };
            event::fired(&event);
            if let Some(hook) = &request.layer.config.on_abort {
                hook(&event);
            }
        }
        Ok(())
    }

    /// This signal's token, created on first use, linked to its parent's token. It is
    /// cancelled when the signal fires, except that a source of an `any` ancestor firing
    /// does not reach it: `Aborted` watches those sources itself.
    fn token(&self) -> CancellationToken {
        let token = {
            let mut slot = lock(&self.inner.token);
            slot.get_or_insert_with(|| match &self.inner.parent {
                Parent::None | Parent::Any(_) => CancellationToken::new(),
                Parent::Root => match &self.inner.request {
                    Some(request) => request.layer.root.inner.token.child_token(),
                    None => CancellationToken::new(),
                },
                Parent::Signal(parent) => parent.token().child_token(),
            })
            .clone()
        };
        // `set` stores the state before it takes the lock; we took the lock before this
        // load. Either `set` saw our token, or we see its state.
        if self.observe().is_some() {
            token.cancel();
        }
        token
    }

    /// The sources of the nearest `any` ancestor, whose firing does not cancel our token.
    fn any_sources(&self) -> Option<&[AbortSignal]> {
        let mut current = self;
        loop {
            match &current.inner.parent {
                Parent::Signal(parent) => current = parent,
                Parent::Any(sources) => return Some(sources),
                Parent::None | Parent::Root => return None,
            }
        }
    }
}

/// Numbers firings in the order they happen (shared by every signal and root).
static FIRINGS: AtomicU64 = AtomicU64::new(1);

/// The next place in the order of firings.
pub(crate) fn next_firing() -> u64 {
    FIRINGS.fetch_add(1, Ordering::Relaxed)
}

/// A signal's state: the fired reason and its place in the order, or `None` while armed.
fn unpack(state: u64) -> Option<(AbortReason, u64)> {
    AbortReason::from_code((state & 0xff) as u8).map(|reason| (reason, state >> 8))
}

fn lock(mutex: &Mutex<Option<CancellationToken>>) -> MutexGuard<'_, Option<CancellationToken>> {
    // Nothing panics while holding this lock, but a poisoned `Option` is still valid.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn min_deadline(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Default for AbortSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for AbortSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AbortSignal")
            .field("reason", &self.reason())
            .field("deadline", &self.inner.deadline)
            .finish()
    }
}

pin_project! {
    /// Future returned by [`AbortSignal::aborted`]: resolves with the reason once the
    /// signal fires. Cancel safe.
    #[must_use = "futures do nothing unless polled"]
    pub struct Aborted {
        signal: AbortSignal,
        #[pin]
        wait: Option<WaitForCancellationFutureOwned>,
        // Waits on the sources of an `any` ancestor; boxed, as `any` is not a hot path.
        sources: Vec<Pin<Box<Aborted>>>,
    }
}

impl Future for Aborted {
    type Output = AbortReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AbortReason> {
        let mut this = self.project();
        if let Some(reason) = this.signal.observe() {
            return Poll::Ready(reason);
        }
        if this.wait.is_none() {
            this.wait.set(Some(this.signal.token().cancelled_owned()));
            if let Some(sources) = this.signal.any_sources() {
                *this.sources = sources.iter().map(|s| Box::pin(s.aborted())).collect();
            }
        }
        let mut woke = false;
        if let Some(wait) = this.wait.as_mut().as_pin_mut() {
            woke |= wait.poll(cx).is_ready();
        }
        for source in this.sources.iter_mut() {
            woke |= source.as_mut().poll(cx).is_ready();
        }
        if woke {
            // The token is cancelled only by `set` (state stored first) or by a parent
            // (found by `observe`), and a source's firing is found by `observe` too.
            if let Some(reason) = this.signal.observe() {
                return Poll::Ready(reason);
            }
            debug_assert!(false, "an AbortSignal woke without a reason");
            return Poll::Ready(AbortReason::Explicit);
        }
        Poll::Pending
    }
}

impl fmt::Debug for Aborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aborted")
            .field("signal", &self.signal)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_test::task::new_count_waker;

    #[test]
    fn fires_once_and_keeps_the_first_reason() {
        let signal = AbortSignal::new();
        assert!(!signal.is_aborted());
        assert!(signal.fire(AbortReason::DeadlineExceeded));
        assert!(!signal.fire(AbortReason::ClientGone));
        assert!(!signal.abort());
        assert_eq!(signal.reason(), Some(AbortReason::DeadlineExceeded));
    }

    #[test]
    fn waiter_created_before_and_after_firing_both_wake() {
        let signal = AbortSignal::new();
        let (waker, count) = new_count_waker();
        let mut cx = Context::from_waker(&waker);
        let mut early = Box::pin(signal.aborted());
        assert!(early.as_mut().poll(&mut cx).is_pending());
        signal.abort();
        assert_eq!(count.get(), 1);
        assert_eq!(
            early.as_mut().poll(&mut cx),
            Poll::Ready(AbortReason::Explicit)
        );
        let mut late = Box::pin(signal.aborted());
        assert_eq!(
            late.as_mut().poll(&mut cx),
            Poll::Ready(AbortReason::Explicit)
        );
    }

    #[test]
    fn child_inherits_parent_reason_but_not_the_other_way() {
        let parent = AbortSignal::new();
        let child = parent.child();
        let grandchild = child.child();
        let (waker, count) = new_count_waker();
        let mut cx = Context::from_waker(&waker);
        let mut wait = Box::pin(grandchild.aborted());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        parent.fire(AbortReason::ClientGone);
        assert_eq!(count.get(), 1);
        assert_eq!(
            wait.as_mut().poll(&mut cx),
            Poll::Ready(AbortReason::ClientGone)
        );
        assert_eq!(child.reason(), Some(AbortReason::ClientGone));
        // A child fired first keeps its own reason.
        let parent = AbortSignal::new();
        let child = parent.child();
        child.abort();
        parent.fire(AbortReason::DeadlineExceeded);
        assert_eq!(child.reason(), Some(AbortReason::Explicit));
    }

    #[test]
    fn any_wakes_on_each_source_and_through_its_children() {
        for which in 0..2 {
            let a = AbortSignal::new();
            let b = AbortSignal::new();
            let either = AbortSignal::any([a.clone(), b.clone()]);
            let below = either.child();
            let (waker, count) = new_count_waker();
            let mut cx = Context::from_waker(&waker);
            let mut wait_any = Box::pin(either.aborted());
            let mut wait_below = Box::pin(below.aborted());
            assert!(wait_any.as_mut().poll(&mut cx).is_pending());
            assert!(wait_below.as_mut().poll(&mut cx).is_pending());
            let reason = if which == 0 {
                AbortReason::ClientGone
            } else {
                AbortReason::Shutdown
            };
            [&a, &b][which].fire(reason);
            assert!(count.get() >= 2);
            assert_eq!(wait_any.as_mut().poll(&mut cx), Poll::Ready(reason));
            assert_eq!(wait_below.as_mut().poll(&mut cx), Poll::Ready(reason));
            assert!(![&a, &b][1 - which].is_aborted());
        }
        let none = AbortSignal::any([]);
        assert!(!none.is_aborted());
        assert!(none.abort());
    }

    #[test]
    fn any_reports_the_source_that_fired_first_not_the_first_listed() {
        // Nobody looks at `either` until both sources have fired.
        let a = AbortSignal::new();
        let b = AbortSignal::new();
        let either = AbortSignal::any([a.clone(), b.clone()]);
        let below = either.child();
        b.fire(AbortReason::ClientGone);
        a.fire(AbortReason::Shutdown);
        assert_eq!(below.reason(), Some(AbortReason::ClientGone));
        assert_eq!(either.reason(), Some(AbortReason::ClientGone));
        // The same through a source that inherits its reason from a parent.
        let parent = AbortSignal::new();
        let c = parent.child();
        let d = AbortSignal::new();
        let either = AbortSignal::any([d.clone(), c]);
        parent.fire(AbortReason::DeadlineExceeded);
        d.abort();
        assert_eq!(either.reason(), Some(AbortReason::DeadlineExceeded));
    }

    #[test]
    fn any_of_an_already_fired_signal_is_fired() {
        let a = AbortSignal::new();
        a.abort();
        assert!(AbortSignal::any([AbortSignal::new(), a]).is_aborted());
    }

    #[test]
    fn any_takes_the_soonest_deadline() {
        let now = Instant::now();
        let mk = |d: Option<Duration>| AbortSignal::build(Parent::None, d.map(|d| now + d), None);
        let any = AbortSignal::any([
            mk(Some(Duration::from_secs(5))),
            mk(None),
            mk(Some(Duration::from_secs(2))),
        ]);
        assert_eq!(any.deadline(), Some(now + Duration::from_secs(2)));
        assert_eq!(any.child().deadline(), any.deadline());
    }

    #[test]
    fn concurrent_fire_and_wait_never_lose_the_wakeup() {
        // The lazily created token races with `set`; hammer the interleavings.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            for _ in 0..2_000 {
                let signal = AbortSignal::new();
                let waiter = tokio::spawn(signal.aborted());
                let firer = {
                    let signal = signal.clone();
                    tokio::spawn(async move { signal.fire(AbortReason::ClientGone) })
                };
                assert!(firer.await.unwrap());
                assert_eq!(waiter.await.unwrap(), AbortReason::ClientGone);
            }
        });
    }
}
