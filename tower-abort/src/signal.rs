use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Method, Uri};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::event::{self, AbortEvent};
use crate::future::UntilAborted;
use crate::layer::Shared;
use crate::root::AbortRoot;
use crate::sync::{lock, Arc, AtomicBool, AtomicU64, Mutex, Ordering};
use crate::wait::WaitCell;
use crate::{AbortReason, TimeoutMode};

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
    node: Arc<Node>,
}

/// A signal's state: one allocation per signal (recycled, see [`pool`]).
pub(crate) struct Node {
    /// `0` while armed, then the fired reason's code and, above it, its place in the order
    /// of firings (see [`next_firing`]); written once, by compare-exchange.
    state: AtomicU64,
    /// Created when somebody first waits on this signal or on one below it: a request whose
    /// handler never waits costs no cell and no lock.
    wait: Mutex<Option<Linked>>,
    /// Set when the wait cell is made, so a completed request that somebody waited on is
    /// dropped (and unlinked) at once rather than pooled. A hint: `build` checks `wait`.
    waited: AtomicBool,
    parent: Parent,
    deadline: Option<Instant>,
    request: Option<RequestInfo>,
    /// The layer that made the signal (meaningful only with `request`). Kept when the node is
    /// pooled: the next request of the same layer then needs no reference-count update on
    /// the layer's shared state, a cache line every thread would otherwise write.
    // std's `Arc` even under loom: the layer makes it.
    layer: Option<std::sync::Arc<Shared>>,
}

/// A node's wait cell and where it is linked, so it can be unlinked when the node goes.
struct Linked {
    cell: Arc<WaitCell>,
    up: Up,
}

enum Up {
    /// No parent, or every parent had fired already when the cell was created.
    Nothing,
    /// A root shard and the key in it.
    Root(AbortRoot, (usize, usize)),
    Signal(Arc<WaitCell>, usize),
    Any(Box<[(Arc<WaitCell>, usize)]>),
}

enum Parent {
    None,
    /// The layer's root, reached through `Node::layer`.
    Root,
    Signal(AbortSignal),
    Any(Box<[AbortSignal]>),
    /// [`AbortSignal::detached`]: only this root (if any) and the node's own deadline,
    /// which the node enforces itself.
    Detached(Option<AbortRoot>),
    /// [`AbortSignal::from_token`]: fires (`Explicit`) when the token is cancelled. Nothing
    /// in this crate cancels it, so it is checked when the signal is looked at, and waiters
    /// watch it themselves.
    Token(CancellationToken),
}

/// Present on signals the layer created: where to count and report the firing.
struct RequestInfo {
    /// `None` when the layer had no use for the clock (no deadline, no events).
    started: Option<Instant>,
    method: Method,
    // Boxed: kept only with an `on_abort` callback; inline it would grow every signal.
    uri: Option<Box<Uri>>,
    /// Set by the first report of this request. With nested layers every request signal of
    /// one request uses the outermost one's flag, so the request is reported (and counted)
    /// once.
    reported: AtomicBool,
}

impl AbortSignal {
    /// A signal with no parent and no deadline, that fires only through
    /// [`abort`](Self::abort). Useful outside a server and in tests.
    pub fn new() -> Self {
        Self::build(Parent::None, None, None, None)
    }

    /// A signal on a pooled node if this thread has one (the request fast path, inlined),
    /// otherwise on a new one.
    #[inline(always)]
    fn build(
        parent: Parent,
        deadline: Option<Instant>,
        request: Option<RequestInfo>,
        layer: Option<&std::sync::Arc<Shared>>,
    ) -> Self {
        #[cfg(not(all(test, loom)))]
        if let Some(mut node) = pool::take() {
            if let Some(slot) = Arc::get_mut(&mut node) {
                if lock_mut(&mut slot.wait).is_none() {
                    // Field by field: the node is unlinked, its parent was the root (which
                    // holds nothing: no drop glue), its request data is dropped here.
                    *slot.state.get_mut() = 0;
                    slot.deadline = deadline;
                    debug_assert!(matches!(slot.parent, Parent::Root));
                    std::mem::forget(std::mem::replace(&mut slot.parent, parent));
                    slot.request = request;
                    if let Some(layer) = layer {
                        let kept = slot.layer.as_ref();
                        if !kept.is_some_and(|kept| std::sync::Arc::ptr_eq(kept, layer)) {
                            slot.layer = Some(std::sync::Arc::clone(layer));
                        }
                    }
                    return AbortSignal { node };
                }
                // Somebody waited on it after all: drop it normally (unlinking it).
            }
        }
        Self::fresh(parent, deadline, request, layer)
    }

    #[inline(never)]
    fn fresh(
        parent: Parent,
        deadline: Option<Instant>,
        request: Option<RequestInfo>,
        layer: Option<&std::sync::Arc<Shared>>,
    ) -> Self {
        AbortSignal {
            node: Arc::new(Node {
                state: AtomicU64::new(0),
                wait: Mutex::new(None),
                waited: AtomicBool::new(false),
                parent,
                deadline,
                request,
                layer: layer.cloned(),
            }),
        }
    }

    /// The layer that made this signal, if one did.
    #[inline]
    fn layer(&self) -> Option<&Shared> {
        match &self.node.request {
            Some(_) => self.node.layer.as_deref(),
            None => None,
        }
    }

    /// The layer's per-request signal: a child of `outer` when an outer layer already put
    /// a signal in the request, otherwise of the layer's root.
    #[inline(always)]
    pub(crate) fn for_request(
        layer: &std::sync::Arc<Shared>,
        outer: Option<&AbortSignal>,
        deadline: Option<Instant>,
        started: Option<Instant>,
        method: Method,
        uri: Option<Box<Uri>>,
    ) -> Self {
        let (parent, deadline) = match outer {
            Some(outer) => (
                Parent::Signal(outer.clone()),
                min_deadline(deadline, outer.deadline()),
            ),
            None => (Parent::Root, deadline),
        };
        let request = RequestInfo {
            started,
            method,
            uri,
            reported: AtomicBool::new(false),
        };
        Self::build(parent, deadline, Some(request), Some(layer))
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
    /// `select!` loop. The returned future owns a clone of the signal. A waiting future is
    /// woken once, when the signal fires; it is never polled or woken for the firing of
    /// signals it does not descend from.
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
            waiting: None,
        }
    }

    /// The absolute deadline of this request, if it has one: the sooner of the layer's
    /// timeout and a deadline the client sent.
    ///
    /// It is a [`tokio::time::Instant`], so it follows `tokio::time::pause` and `advance`
    /// in tests. Children inherit it; an [`any`](Self::any) signal takes the soonest of its
    /// sources.
    pub fn deadline(&self) -> Option<Instant> {
        self.node.deadline
    }

    /// Time left until [`deadline`](Self::deadline): zero once it has passed, `None` when
    /// there is no deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.node
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
        Self::build(Parent::Signal(self.clone()), self.node.deadline, None, None)
    }

    /// A signal for work started on this request's behalf that must not stop because this
    /// request does: it ignores this signal's [`ClientGone`](AbortReason::ClientGone) and
    /// [`abort`](Self::abort), and fires only when
    ///
    /// - the server shuts down (the [`AbortRoot`](crate::AbortRoot) this signal descends
    ///   from, if any), or
    /// - its [`deadline`](Self::deadline), the same as this signal's, passes. Nothing else
    ///   watches that deadline once the request is gone, so the detached signal enforces it
    ///   itself: [`is_aborted`](Self::is_aborted) reads the clock, and a waiter arms a tokio
    ///   timer (so wait on it inside a tokio runtime), or
    /// - somebody [`abort`](Self::abort)s it (or a signal it was combined with fires).
    ///
    /// This is Go's `context.WithoutCancel`, keeping the deadline. The case it is for:
    /// shared work, such as the call a `tower-singleflight` leader makes while other
    /// requests wait for its result. With the leader's own signal, the leader's client going
    /// away would cancel the work for every follower; with a detached one it runs on, bounded
    /// by the deadline and shutdown. Detached work outlives its request: give it a deadline
    /// (the layer's [`with_timeout`](crate::AbortLayer::with_timeout) does).
    ///
    /// ```
    /// # use tower_abort::AbortSignal;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let request = AbortSignal::new(); // in a handler: the request's signal
    /// let shared = request.detached();
    /// let work = shared.spawn(async { 42 }); // the shared call
    /// request.abort(); // the client went away
    /// assert!(!shared.is_aborted());
    /// assert_eq!(work.await, Ok(42));
    /// # }
    /// ```
    pub fn detached(&self) -> AbortSignal {
        Self::build(
            Parent::Detached(self.find_root()),
            self.node.deadline,
            None,
            None,
        )
    }

    /// A signal that fires as soon as any of `signals` fires, with that signal's reason,
    /// like the web's `AbortSignal.any`. It is already fired if one of them already is.
    /// Its deadline is the soonest of theirs. With no signals it fires only through
    /// [`abort`](Self::abort).
    ///
    /// Waiting on it costs one registration with each source, made when the first waiter
    /// polls; the sources are not polled, and each waiter is woken once, by whichever
    /// source fires first.
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
        Self::build(Parent::Any(sources), deadline, None, None)
    }

    /// A [`CancellationToken`] that is cancelled when this signal fires, for any reason,
    /// for code that takes a token: tokio-util's `run_until_cancelled` and
    /// `with_cancellation_token`, and libraries built on them.
    ///
    /// The signal itself is not a `CancellationToken` (its per-request state is a pooled
    /// node; see the [crate docs](crate#cost)), so the token is made on the first call and
    /// kept with the signal: every later call, on any clone, returns a clone of the same
    /// token. It is cancelled by whatever fires the signal (the client going away, the
    /// deadline, the root's shutdown, [`abort`](Self::abort), a parent or a source of
    /// [`any`](Self::any)), at the moment it fires, by the code that fires it: no task
    /// watches it. Cancelling the token does **not** fire the signal: it is an observer
    /// (use [`from_token`](Self::from_token) for the other direction). If the signal has
    /// already fired, the token returned is already cancelled.
    ///
    /// A request that never calls this pays nothing. The first call costs what the first
    /// wait on [`aborted`](Self::aborted) costs (the signal's wait cell, linked into the
    /// root) plus the token; the token is dropped with the signal, so it leaves nothing
    /// behind once the request and your clones of the token are gone.
    ///
    /// When the signal descends from a token that can be cancelled without this crate
    /// seeing it (a root made with [`AbortRoot::from_token`], or a signal made with
    /// [`from_token`](Self::from_token)), the token is a child of that token, so
    /// cancelling it directly reaches this one at once. If it descends from several (an
    /// [`any`](Self::any) over signals with different such sources), it is a child of the
    /// first, and the others reach it when the signal is next looked at
    /// ([`is_aborted`](Self::is_aborted), a waiter): a token has only one parent. Likewise
    /// the deadline of a [`detached`](Self::detached) signal, which nothing watches, cancels
    /// the token when the signal is looked at after it passed.
    ///
    /// ```
    /// # use tower_abort::AbortSignal;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let signal = AbortSignal::new(); // in a handler: the request's signal
    /// let token = signal.cancellation_token();
    /// assert!(!token.is_cancelled());
    /// signal.abort();
    /// assert!(token.is_cancelled());
    /// let r = token.run_until_cancelled(std::future::pending::<()>()).await;
    /// assert_eq!(r, None);
    /// # }
    /// ```
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cell().token(|| match self.external_token() {
            Some(parent) => parent.child_token(),
            None => CancellationToken::new(),
        })
    }

    /// A signal that fires with [`AbortReason::Explicit`] when `token` is cancelled (or
    /// through [`abort`](Self::abort)), for work that is already cancelled by a
    /// [`CancellationToken`] of your own. Combine it with a request's signal through
    /// [`any`](Self::any) to stop work when either fires.
    ///
    /// No task watches the token: [`is_aborted`](Self::is_aborted) checks it (which locks
    /// the token, where checking other signals is an atomic load), and each waiter on
    /// [`aborted`](Self::aborted) (or on a child or an `any` of it) also waits on the token.
    /// [`cancellation_token`](Self::cancellation_token) of such a signal is a child of
    /// `token`. Firing the signal does not cancel `token`.
    ///
    /// ```
    /// # use tower_abort::{AbortReason, AbortSignal};
    /// # use tokio_util::sync::CancellationToken;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let job = CancellationToken::new();
    /// let request = AbortSignal::new(); // in a handler: the request's signal
    /// let either = AbortSignal::any([request.clone(), AbortSignal::from_token(job.clone())]);
    /// job.cancel();
    /// assert_eq!(either.aborted().await, AbortReason::Explicit);
    /// assert!(!request.is_aborted());
    /// # }
    /// ```
    pub fn from_token(token: CancellationToken) -> AbortSignal {
        Self::build(Parent::Token(token), None, None, None)
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
        self.node.request.as_ref().map(|r| &r.method)
    }

    /// The server timeout of the layer that created this signal.
    pub(crate) fn server_timeout(&self) -> Option<Duration> {
        self.layer().and_then(|layer| layer.config.timeout)
    }

    /// The timeout mode of the layer that created this signal.
    pub(crate) fn mode(&self) -> TimeoutMode {
        self.layer()
            .map_or(TimeoutMode::Drop, |layer| layer.config.mode)
    }

    /// Whether `self` and `other` are clones of the same signal.
    pub fn same_signal(&self, other: &AbortSignal) -> bool {
        Arc::ptr_eq(&self.node, &other.node)
    }

    /// Drops a request signal whose response completed (or was dropped): if this was its
    /// last handle, its node goes back to this thread's pool, so the next request's signal
    /// costs no allocation. Nothing atomic happens here; `build` checks, with the `&mut`
    /// that `Arc::get_mut` gives, that a pooled node is really unused and unlinked.
    #[inline]
    pub(crate) fn release(self) {
        let AbortSignal { node } = self;
        // Only request signals directly under the root: their parent holds nothing, and a
        // pooled node's request data is harmless to keep until reuse.
        if Arc::strong_count(&node) == 1
            && matches!(node.parent, Parent::Root)
            && !node.waited.load(Ordering::Relaxed)
        {
            pool::recycle(node);
        }
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
        if let Some(fired) = unpack(self.node.state.load(Ordering::Acquire)) {
            return Some(fired);
        }
        let inherited = match &self.node.parent {
            Parent::None => None,
            Parent::Root => self
                .root()
                .and_then(|root| root.inner.shutdown_order())
                .map(|order| (AbortReason::Shutdown, order)),
            Parent::Signal(parent) => parent.observe_ordered(),
            Parent::Any(sources) => sources
                .iter()
                .filter_map(AbortSignal::observe_ordered)
                .min_by_key(|&(_, order)| order),
            Parent::Detached(root) => root
                .as_ref()
                .and_then(|root| root.inner.shutdown_order())
                .map(|order| (AbortReason::Shutdown, order))
                .or_else(|| {
                    let deadline = self.node.deadline?;
                    (Instant::now() >= deadline)
                        .then(|| (AbortReason::DeadlineExceeded, next_firing()))
                }),
            Parent::Token(token) => token
                .is_cancelled()
                .then(|| (AbortReason::Explicit, next_firing())),
        }?;
        Some(match self.set(inherited.0, inherited.1) {
            Ok(()) => inherited,
            Err(earlier) => earlier,
        })
    }

    fn root(&self) -> Option<&AbortRoot> {
        self.layer().map(|layer| &layer.root)
    }

    /// The root this signal is directly under, if any: its layer's, or a detached one's.
    fn parent_root(&self) -> Option<&AbortRoot> {
        match &self.node.parent {
            Parent::Root => self.root(),
            Parent::Detached(root) => root.as_ref(),
            _ => None,
        }
    }

    /// The root shutdown reaches this signal through, searching up its parents.
    fn find_root(&self) -> Option<AbortRoot> {
        match &self.node.parent {
            Parent::None | Parent::Token(_) => None,
            Parent::Root | Parent::Detached(_) => self.parent_root().cloned(),
            Parent::Signal(parent) => parent.find_root(),
            Parent::Any(sources) => sources.iter().find_map(AbortSignal::find_root),
        }
    }

    /// The soonest deadline of a detached signal this one descends from: nobody fires it
    /// (no layer watches it), so a waiter needs its own timer.
    fn self_timed_deadline(&self) -> Option<Instant> {
        match &self.node.parent {
            Parent::None | Parent::Root | Parent::Token(_) => None,
            Parent::Detached(_) => self.node.deadline,
            Parent::Signal(parent) => parent.self_timed_deadline(),
            Parent::Any(sources) => sources
                .iter()
                .filter_map(AbortSignal::self_timed_deadline)
                .min(),
        }
    }

    fn set(&self, reason: AbortReason, order: u64) -> Result<(), (AbortReason, u64)> {
        let node = &*self.node;
        let packed = order << 8 | u64::from(reason.code());
        if let Err(current) =
            node.state
                .compare_exchange(0, packed, Ordering::AcqRel, Ordering::Acquire)
        {
            return Err(unpack(current).unwrap_or((reason, order)));
        }
        // A waiter that creates the cell after this point sees the state (see `cell`), so
        // nobody misses the firing.
        let cell = lock(&node.wait)
            .as_ref()
            .map(|linked| Arc::clone(&linked.cell));
        if let Some(cell) = cell {
            WaitCell::fire(&cell);
        }
        self.report(reason);
        Ok(())
    }

    /// Counts the firing, emits the tracing event and calls the `on_abort` callback: once
    /// per request, by the first of its request signals to fire (nested layers share the
    /// outermost one's flag). A panic in the callback (or a tracing subscriber) is caught:
    /// this may run inside a `Drop`, where a panic would abort the process.
    fn report(&self, reason: AbortReason) {
        let (Some(request), Some(layer)) = (&self.node.request, self.layer()) else {
            return;
        };
        let mut outermost = request;
        let mut current = self;
        while let Parent::Signal(parent) = &current.node.parent {
            current = parent;
            if let Some(outer) = &current.node.request {
                outermost = outer;
            }
        }
        if outermost.reported.swap(true, Ordering::AcqRel) {
            return;
        }
        layer.root.inner.count(reason);
        let event = AbortEvent {
            reason,
            method: &request.method,
            uri: request.uri.as_deref(),
            elapsed: request.started.map(|s| s.elapsed()),
            deadline: self.node.deadline,
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            event::fired(&event);
            if let Some(hook) = &layer.config.on_abort {
                hook(&event);
            }
        }));
        if let Err(payload) = outcome {
            event::callback_panicked(reason);
            // Even the payload's drop is foreign code.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
        }
    }

    /// This signal's wait cell, created (and linked below its parents' cells, or to the
    /// root) on first use. It fires when the signal does, including through a parent, the
    /// root or a source of `any`.
    fn cell(&self) -> Arc<WaitCell> {
        if let Some(linked) = lock(&self.node.wait).as_ref() {
            return Arc::clone(&linked.cell);
        }
        // The parents' cells first, with no lock held: creating one may find its signal
        // fired and report it, which runs the `on_abort` callback.
        let above: Vec<Arc<WaitCell>> = match &self.node.parent {
            Parent::None | Parent::Root | Parent::Detached(_) | Parent::Token(_) => Vec::new(),
            Parent::Signal(parent) => vec![parent.cell()],
            Parent::Any(sources) => sources.iter().map(AbortSignal::cell).collect(),
        };
        let cell = {
            let mut wait = lock(&self.node.wait);
            if let Some(linked) = wait.as_ref() {
                // Another waiter linked one meanwhile.
                return Arc::clone(&linked.cell);
            }
            let cell = WaitCell::new();
            // Cells' and root shards' locks are never held while taking another lock.
            let up = match &self.node.parent {
                Parent::None | Parent::Detached(None) | Parent::Token(_) => Up::Nothing,
                Parent::Root | Parent::Detached(Some(_)) => {
                    let root = self.parent_root().expect("a root parent");
                    match root.inner.link(&cell) {
                        Some(at) => Up::Root(root.clone(), at),
                        None => Up::Nothing,
                    }
                }
                Parent::Signal(_) => match above[0].link(&cell) {
                    Some(key) => Up::Signal(Arc::clone(&above[0]), key),
                    None => Up::Nothing,
                },
                Parent::Any(_) => Up::Any(
                    above
                        .into_iter()
                        .filter_map(|a| a.link(&cell).map(|key| (a, key)))
                        .collect(),
                ),
            };
            *wait = Some(Linked {
                cell: Arc::clone(&cell),
                up,
            });
            self.node.waited.store(true, Ordering::Relaxed);
            cell
        };
        // `set` stores the state before it takes the lock; we took the lock before this
        // load. Either `set` saw our cell, or we see its state. A parent that fired before
        // we linked (its cell refused the link) is seen here too.
        if self.observe().is_some() {
            WaitCell::fire(&cell);
        }
        cell
    }

    /// The tokens this signal descends from that can be cancelled without this crate
    /// seeing it (roots made with [`AbortRoot::from_token`], signals made with
    /// [`from_token`](Self::from_token)): waiters watch them themselves.
    fn external_sources(&self, found: &mut Vec<External>) {
        match &self.node.parent {
            Parent::None => {}
            Parent::Root | Parent::Detached(_) => {
                if let Some(root) = self.parent_root() {
                    if root.inner.external_token().is_some()
                        && !found.iter().any(|f| match f {
                            External::Root(r) => Arc::ptr_eq(&r.inner, &root.inner),
                            External::Signal(_) => false,
                        })
                    {
                        found.push(External::Root(root.clone()));
                    }
                }
            }
            Parent::Token(_) => {
                if !found.iter().any(|f| match f {
                    External::Signal(s) => s.same_signal(self),
                    External::Root(_) => false,
                }) {
                    found.push(External::Signal(self.clone()));
                }
            }
            Parent::Signal(parent) => parent.external_sources(found),
            Parent::Any(sources) => sources.iter().for_each(|s| s.external_sources(found)),
        }
    }

    /// The first token found up this signal's parents that can be cancelled from outside
    /// this crate (see [`external_sources`](Self::external_sources)).
    fn external_token(&self) -> Option<CancellationToken> {
        match &self.node.parent {
            Parent::None => None,
            Parent::Root | Parent::Detached(_) => self
                .parent_root()
                .and_then(|root| root.inner.external_token().cloned()),
            Parent::Token(token) => Some(token.clone()),
            Parent::Signal(parent) => parent.external_token(),
            Parent::Any(sources) => sources.iter().find_map(AbortSignal::external_token),
        }
    }

    /// The token's cancellation, for a waiter to watch.
    fn external_wait(source: &External) -> Option<Pin<Box<WaitForCancellationFutureOwned>>> {
        let token = match source {
            External::Root(root) => root.inner.external_token()?.clone(),
            External::Signal(signal) => match &signal.node.parent {
                Parent::Token(token) => token.clone(),
                _ => return None,
            },
        };
        Some(Box::pin(token.cancelled_owned()))
    }
}

/// A source of firing that a waiter watches itself (see `AbortSignal::external_sources`).
enum External {
    /// A root made with [`AbortRoot::from_token`]: on cancellation its waiters are fired.
    Root(AbortRoot),
    /// A signal made with [`AbortSignal::from_token`]: on cancellation it is fired.
    Signal(AbortSignal),
}

impl External {
    /// The token was cancelled: fire what hangs below it (which wakes every waiter).
    fn fire(&self) {
        match self {
            External::Root(root) => root.inner.fire_waiters(),
            External::Signal(signal) => {
                let fired = signal.observe();
                debug_assert!(fired.is_some(), "a cancelled token's signal did not fire");
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let Some(linked) = lock_mut(&mut self.wait).take() else {
            return;
        };
        match linked.up {
            Up::Nothing => {}
            Up::Root(root, at) => root.inner.unlink(at),
            Up::Signal(above, key) => above.unlink(key),
            Up::Any(links) => {
                for (above, key) in links.iter() {
                    above.unlink(*key);
                }
            }
        }
    }
}

fn lock_mut<T>(mutex: &mut Mutex<T>) -> &mut T {
    mutex
        .get_mut()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A small per-thread pool of signal nodes, so that a request's signal reuses the memory of
/// an earlier one instead of allocating: the layer's one allocation per request is then the
/// box the `http` crate makes for the extension.
///
/// Only request signals under the root are pooled, when their response completes and
/// nobody else holds them; one that somebody waited on (it has links) is dropped normally
/// instead of reused. At most [`CAPACITY`](pool::CAPACITY) per thread, freed when the thread
/// exits. A pooled node keeps the layer that last used it and its request data until reused,
/// so a dropped layer's configuration (and `on_abort` callback) may live until those nodes
/// are reused or their thread exits.
mod pool {
    use super::Node;
    use crate::sync::Arc;

    /// Nodes kept per thread: enough for the requests one thread completes in a burst.
    #[cfg_attr(all(test, loom), allow(dead_code))]
    pub(super) const CAPACITY: usize = 64;

    /// The last node recycled, then the others: a thread serving one request at a time
    /// takes and returns the same node through `last` alone.
    #[cfg(not(all(test, loom)))]
    struct Free {
        last: std::cell::Cell<Option<Arc<Node>>>,
        rest: std::cell::RefCell<Vec<Arc<Node>>>,
    }

    #[cfg(not(all(test, loom)))]
    thread_local! {
        static FREE: Free = const {
            Free {
                last: std::cell::Cell::new(None),
                rest: std::cell::RefCell::new(Vec::new()),
            }
        };
    }

    /// A free node, if this thread has one.
    #[cfg(not(all(test, loom)))]
    #[inline]
    pub(super) fn take() -> Option<Arc<Node>> {
        FREE.try_with(|free| {
            free.last
                .take()
                .or_else(|| free.rest.try_borrow_mut().ok().and_then(|mut f| f.pop()))
        })
        .ok()
        .flatten()
    }

    /// Keeps `node` for reuse if this thread's pool has room (otherwise it is dropped).
    #[inline]
    pub(super) fn recycle(node: Arc<Node>) {
        #[cfg(not(all(test, loom)))]
        {
            let _ = FREE.try_with(move |free| {
                if let Some(older) = free.last.replace(Some(node)) {
                    if let Ok(mut rest) = free.rest.try_borrow_mut() {
                        if rest.len() < CAPACITY - 1 {
                            rest.push(older);
                        }
                    }
                }
            });
        }
        #[cfg(all(test, loom))]
        drop(node);
    }
}

/// Numbers firings in the order they happen (shared by every signal and root).
static FIRINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The next place in the order of firings.
pub(crate) fn next_firing() -> u64 {
    FIRINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A signal's state: the fired reason and its place in the order, or `None` while armed.
fn unpack(state: u64) -> Option<(AbortReason, u64)> {
    AbortReason::from_code((state & 0xff) as u8).map(|reason| (reason, state >> 8))
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
            .field("deadline", &self.node.deadline)
            .finish()
    }
}

/// Future returned by [`AbortSignal::aborted`]: resolves with the reason once the signal
/// fires. Cancel safe.
///
/// It registers its waker with the signal on its first pending poll, is woken exactly once
/// when the signal fires (through a parent, the root or a source of `any` too), and
/// deregisters when dropped.
#[must_use = "futures do nothing unless polled"]
pub struct Aborted {
    signal: AbortSignal,
    waiting: Option<Waiting>,
}

struct Waiting {
    cell: Arc<WaitCell>,
    key: usize,
    /// The registered waker, to skip re-registering an unchanged one.
    waker: Waker,
    /// Tokens of roots made with [`AbortRoot::from_token`] and of signals made with
    /// [`AbortSignal::from_token`]: cancelling one directly does not go through this
    /// crate, so we watch it (boxed: rare, and not `Unpin`).
    external: Vec<(External, Pin<Box<WaitForCancellationFutureOwned>>)>,
    /// The deadline of a detached signal above us, which only its waiters watch.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Aborted {
    fn finish(&mut self, reason: AbortReason) -> Poll<AbortReason> {
        if let Some(waiting) = self.waiting.take() {
            waiting.cell.deregister(waiting.key);
        }
        Poll::Ready(reason)
    }
}

impl Future for Aborted {
    type Output = AbortReason;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AbortReason> {
        let this = &mut *self;
        if let Some(reason) = this.signal.observe() {
            return this.finish(reason);
        }
        match &mut this.waiting {
            None => {
                let cell = this.signal.cell();
                let Some(key) = cell.register(cx.waker()) else {
                    // The cell fired: so did the signal (see `WaitCell`'s callers).
                    let reason = this.signal.observe();
                    debug_assert!(reason.is_some(), "a wait cell fired without a reason");
                    return this.finish(reason.unwrap_or(AbortReason::Explicit));
                };
                let mut sources = Vec::new();
                this.signal.external_sources(&mut sources);
                let external = sources
                    .into_iter()
                    .filter_map(|source| {
                        let wait = AbortSignal::external_wait(&source)?;
                        Some((source, wait))
                    })
                    .collect();
                let deadline = this
                    .signal
                    .self_timed_deadline()
                    .map(|at| Box::pin(tokio::time::sleep_until(at)));
                this.waiting = Some(Waiting {
                    cell,
                    key,
                    waker: cx.waker().clone(),
                    external,
                    deadline,
                });
            }
            Some(waiting) => {
                if !waiting.waker.will_wake(cx.waker()) {
                    waiting.cell.update(waiting.key, cx.waker());
                    waiting.waker.clone_from(cx.waker());
                }
            }
        }
        let waiting = this.waiting.as_mut().expect("registered above");
        let mut external_fired = false;
        for (source, cancelled) in waiting.external.iter_mut() {
            if cancelled.as_mut().poll(cx).is_ready() {
                source.fire();
                external_fired = true;
            }
        }
        let deadline_passed = waiting
            .deadline
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
        if external_fired || deadline_passed {
            // A detached signal's deadline is seen by `observe` (it reads the clock), and
            // firing it wakes every other waiter through its cell.
            if let Some(reason) = this.signal.observe() {
                return this.finish(reason);
            }
        }
        Poll::Pending
    }
}

impl Drop for Aborted {
    fn drop(&mut self) {
        if let Some(waiting) = self.waiting.take() {
            waiting.cell.deregister(waiting.key);
        }
    }
}

impl fmt::Debug for Aborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aborted")
            .field("signal", &self.signal)
            .field("waiting", &self.waiting.is_some())
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
            assert_eq!(count.get(), 2);
            // The other source firing too wakes nobody again.
            [&a, &b][1 - which].fire(AbortReason::Explicit);
            assert_eq!(count.get(), 2);
            assert_eq!(wait_any.as_mut().poll(&mut cx), Poll::Ready(reason));
            assert_eq!(wait_below.as_mut().poll(&mut cx), Poll::Ready(reason));
        }
        let none = AbortSignal::any([]);
        assert!(!none.is_aborted());
        assert!(none.abort());
    }

    #[test]
    fn any_waiters_are_woken_exactly_once_and_never_by_polling() {
        let sources: Vec<AbortSignal> = (0..8).map(|_| AbortSignal::new()).collect();
        let any = AbortSignal::any(sources.iter().cloned());
        let (waker, count) = new_count_waker();
        let mut cx = Context::from_waker(&waker);
        let mut waits: Vec<_> = (0..3).map(|_| Box::pin(any.aborted())).collect();
        // Polling while nothing fired wakes nobody (no self-wake, no busy loop).
        for _ in 0..5 {
            for wait in waits.iter_mut() {
                assert!(wait.as_mut().poll(&mut cx).is_pending());
            }
        }
        assert_eq!(count.get(), 0);
        // Every source fires before anyone polls again: one wake per waiter.
        for (i, source) in sources.iter().enumerate() {
            let reason = if i == 3 {
                AbortReason::DeadlineExceeded
            } else {
                AbortReason::Explicit
            };
            if i == 3 || i > 5 {
                source.fire(reason);
            }
        }
        assert_eq!(count.get(), 3);
        for wait in waits.iter_mut() {
            assert_eq!(
                wait.as_mut().poll(&mut cx),
                Poll::Ready(AbortReason::DeadlineExceeded)
            );
        }
        for source in &sources {
            source.abort();
        }
        assert_eq!(count.get(), 3);
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
    fn completed_requests_leave_nothing_linked_and_reused_nodes_start_clean() {
        let layer = crate::AbortLayer::new();
        let shared = layer.shared();
        let root = layer.root();
        let request = || AbortSignal::for_request(&shared, None, None, None, Method::GET, None);
        let waker = futures_test::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for i in 0..300 {
            let signal = request();
            assert_eq!(signal.reason(), None, "a reused node starts armed");
            if i % 3 == 0 {
                // The handler waited (its cell is linked into the root), then answered.
                let mut wait = Box::pin(signal.aborted());
                assert!(wait.as_mut().poll(&mut cx).is_pending());
                assert_eq!(root.inner.linked(), 1);
            } else if i % 3 == 1 {
                signal.fire(AbortReason::ClientGone);
            }
            signal.release();
            assert_eq!(root.inner.linked(), 0);
        }
        root.shutdown();
        assert_eq!(request().reason(), Some(AbortReason::Shutdown));
        assert_eq!(root.stats().get(AbortReason::ClientGone), 100);
    }

    // `Weak` (to see the node and cell freed) does not exist under loom.
    #[cfg(not(loom))]
    #[test]
    fn tokens_leave_nothing_behind() {
        for external in [false, true] {
            let server = CancellationToken::new();
            let layer = if external {
                crate::AbortLayer::with_root(AbortRoot::from_token(server.clone()))
            } else {
                crate::AbortLayer::new()
            };
            let shared = layer.shared();
            let root = layer.root();
            for i in 0..300 {
                let signal = AbortSignal::for_request(&shared, None, None, None, Method::GET, None);
                let token = signal.cancellation_token();
                assert!(!token.is_cancelled(), "a reused node starts armed");
                let node = Arc::downgrade(&signal.node);
                let cell = Arc::downgrade(&signal.cell());
                assert_eq!(root.inner.linked(), 1);
                match i % 3 {
                    0 => {}
                    1 => assert!(signal.fire(AbortReason::ClientGone)),
                    // The handler cancels the token: that does not fire the signal.
                    _ => token.cancel(),
                }
                assert_eq!(token.is_cancelled(), i % 3 != 0, "request {i}");
                assert_eq!(signal.is_aborted(), i % 3 == 1, "request {i}");
                signal.release();
                drop(token);
                // The node is not pooled (it has a cell) but freed, with its cell and token.
                assert_eq!(node.strong_count(), 0);
                assert_eq!(cell.strong_count(), 0);
                assert_eq!(root.inner.linked(), 0);
            }
            // Shutdown still reaches the tokens of the requests in flight.
            let signal = AbortSignal::for_request(&shared, None, None, None, Method::GET, None);
            let token = signal.cancellation_token();
            if external {
                server.cancel();
            } else {
                root.shutdown();
            }
            assert!(token.is_cancelled());
            assert_eq!(signal.reason(), Some(AbortReason::Shutdown));
            assert_eq!(root.stats().get(AbortReason::ClientGone), 100);
        }
    }

    #[test]
    fn detached_ignores_the_original_and_fires_on_its_own() {
        let original = AbortSignal::new();
        let detached = original.detached();
        let child = detached.child();
        let (waker, count) = new_count_waker();
        let mut cx = Context::from_waker(&waker);
        let mut wait = Box::pin(child.aborted());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        original.abort();
        assert!(!detached.is_aborted() && !child.is_aborted());
        assert_eq!(count.get(), 0);
        assert!(detached.abort());
        assert_eq!(count.get(), 1);
        assert_eq!(
            wait.as_mut().poll(&mut cx),
            Poll::Ready(AbortReason::Explicit)
        );
        // Detaching from a fired signal gives an armed one.
        assert!(!original.detached().is_aborted());
        // A deadline that has passed is seen by looking.
        let now = Instant::now();
        let timed = AbortSignal::build(Parent::None, Some(now), None, None);
        assert_eq!(
            timed.detached().reason(),
            Some(AbortReason::DeadlineExceeded)
        );
        assert_eq!(timed.reason(), None);
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
        let mk =
            |d: Option<Duration>| AbortSignal::build(Parent::None, d.map(|d| now + d), None, None);
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
