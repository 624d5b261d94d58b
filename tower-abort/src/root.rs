use std::fmt;

use slab::Slab;
use tokio_util::sync::CancellationToken;

use crate::sync::{lock, Arc, AtomicBool, AtomicU64, Mutex, Ordering};
use crate::wait::{self, WaitCell};
use crate::AbortReason;

/// The server-wide parent of every request's [`AbortSignal`](crate::AbortSignal).
///
/// Get it from [`AbortLayer::pair`](crate::AbortLayer::pair) or
/// [`AbortLayer::root`](crate::AbortLayer::root), keep it next to your graceful-shutdown
/// code, and call [`shutdown`](Self::shutdown) when the drain grace period runs out: every
/// in-flight request's signal then reports [`AbortReason::Shutdown`], and so does every
/// request that arrives afterwards.
///
/// It also holds the per-reason counters of every layer built from it; see
/// [`stats`](Self::stats).
///
/// Cloning is cheap and every clone refers to the same root.
///
/// # Examples
///
/// ```
/// use tower_abort::{AbortLayer, AbortReason};
///
/// let (layer, root) = AbortLayer::pair();
/// # let _ = layer;
/// // ... serve with `layer`; when the drain grace has passed:
/// root.shutdown();
/// assert!(root.is_shutdown());
/// assert_eq!(root.stats().get(AbortReason::Shutdown), 0); // no request was in flight
/// ```
#[derive(Clone)]
pub struct AbortRoot {
    pub(crate) inner: Arc<RootInner>,
}

pub(crate) struct RootInner {
    pub(crate) token: CancellationToken,
    // Checked on every observation of a request signal: an atomic load, where
    // `CancellationToken::is_cancelled` would take the root's mutex that every in-flight
    // request shares.
    shutdown: AtomicBool,
    // Where the first `shutdown` falls in the order of firings (`0` if the external token
    // was cancelled directly); written before `shutdown` is set.
    shutdown_order: AtomicU64,
    // The token came from the user, who may cancel it without going through `shutdown`.
    external: bool,
    counters: [AtomicU64; 4],
    // The wait cells of request signals somebody waits on, fired on shutdown. Sharded, so
    // that requests on different threads starting to wait (or finishing) do not queue on
    // one lock; a request that never waits never touches them.
    shards: Box<[Shard]>,
}

/// One lock's worth of linked wait cells, on its own cache line.
#[repr(align(128))]
struct Shard {
    cells: Mutex<ShardCells>,
}

#[derive(Default)]
struct ShardCells {
    /// Set by the shutdown that fired the cells; later cells are not linked.
    closed: bool,
    cells: Slab<Arc<WaitCell>>,
}

impl AbortRoot {
    /// A new root, not shut down, with all counters at zero.
    pub fn new() -> Self {
        Self::build(CancellationToken::new(), false)
    }

    /// A root that shuts down when `token` is cancelled, for servers that already have a
    /// server-wide [`CancellationToken`].
    ///
    /// Cancelling `token` directly has the same effect as [`shutdown`](Self::shutdown),
    /// but every check of a request signal then has to lock the token, where a root made
    /// with [`new`](Self::new) needs one atomic load.
    pub fn from_token(token: CancellationToken) -> Self {
        Self::build(token, true)
    }

    fn build(token: CancellationToken, external: bool) -> Self {
        AbortRoot {
            inner: Arc::new(RootInner {
                token,
                shutdown: AtomicBool::new(false),
                shutdown_order: AtomicU64::new(0),
                external,
                counters: Default::default(),
                shards: (0..shard_count())
                    .map(|_| Shard {
                        cells: Mutex::new(ShardCells::default()),
                    })
                    .collect(),
            }),
        }
    }

    /// Fires [`AbortReason::Shutdown`] in every request signal under this root: the ones
    /// in flight now and every later one. Idempotent.
    pub fn shutdown(&self) {
        let order = crate::signal::next_firing();
        let _ = self.inner.shutdown_order.compare_exchange(
            0,
            order,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        if !self.inner.shutdown.swap(true, Ordering::AcqRel) {
            crate::event::root_shutdown();
        }
        self.inner.token.cancel();
        self.inner.fire_waiters();
    }

    /// Whether [`shutdown`](Self::shutdown) was called (or the token given to
    /// [`from_token`](Self::from_token) was cancelled).
    pub fn is_shutdown(&self) -> bool {
        self.inner.is_shutdown()
    }

    /// A snapshot of how many request signals fired, per reason, in every layer built from
    /// this root.
    pub fn stats(&self) -> AbortStats {
        AbortStats {
            counts: [0, 1, 2, 3].map(|i| self.inner.counters[i].load(Ordering::Relaxed)),
        }
    }

    /// A child of the root's token, for code that wants a plain [`CancellationToken`] that
    /// is cancelled on shutdown.
    pub fn child_token(&self) -> CancellationToken {
        self.inner.token.child_token()
    }
}

impl RootInner {
    pub(crate) fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::Acquire) || (self.external && self.token.is_cancelled())
    }

    /// Where the shutdown falls in the order of firings, if the root is shut down.
    pub(crate) fn shutdown_order(&self) -> Option<u64> {
        self.is_shutdown()
            .then(|| self.shutdown_order.load(Ordering::Relaxed))
    }

    pub(crate) fn count(&self, reason: AbortReason) {
        self.counters[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the root's token came from [`AbortRoot::from_token`], and so can be cancelled
    /// without [`AbortRoot::shutdown`] firing the linked cells: waiters watch it themselves.
    pub(crate) fn external_token(&self) -> Option<&CancellationToken> {
        self.external.then_some(&self.token)
    }

    /// Links a request signal's wait cell, so shutdown fires it; `None` once the root has
    /// shut down (the caller then sees `Shutdown` by looking at the root).
    pub(crate) fn link(&self, cell: &Arc<WaitCell>) -> Option<(usize, usize)> {
        let shard = shard_index(self.shards.len());
        let mut cells = lock(&self.shards[shard].cells);
        (!cells.closed).then(|| (shard, cells.cells.insert(Arc::clone(cell))))
    }

    /// How many wait cells are linked, for tests.
    #[cfg(test)]
    pub(crate) fn linked(&self) -> usize {
        self.shards.iter().map(|s| lock(&s.cells).cells.len()).sum()
    }

    /// Undoes [`link`](Self::link); a no-op after shutdown.
    pub(crate) fn unlink(&self, (shard, key): (usize, usize)) {
        let cell = {
            let mut cells = lock(&self.shards[shard].cells);
            if cells.closed {
                return;
            }
            cells.cells.try_remove(key)
        };
        drop(cell);
    }

    /// Closes every shard and fires the cells linked so far. Called by `shutdown` after the
    /// flag is set, and by a waiter that saw an external token cancelled.
    pub(crate) fn fire_waiters(&self) {
        for shard in self.shards.iter() {
            let cells = {
                let mut cells = lock(&shard.cells);
                if cells.closed {
                    continue;
                }
                cells.closed = true;
                std::mem::take(&mut cells.cells)
            };
            let mut cells = cells.into_iter().map(|(_, cell)| cell);
            if let Some(first) = cells.next() {
                wait::fire_all(first, cells.collect());
            }
        }
    }
}

/// How many shards a root gets: a few per CPU, so that threads rarely share one.
fn shard_count() -> usize {
    #[cfg(all(test, loom))]
    return 2;
    #[cfg(not(all(test, loom)))]
    {
        let cpus = std::thread::available_parallelism().map_or(4, usize::from);
        (cpus * 4).next_power_of_two().clamp(4, 64)
    }
}

/// The shard this thread links into: threads are spread round-robin over the shards.
fn shard_index(shards: usize) -> usize {
    #[cfg(all(test, loom))]
    return shards - 1;
    #[cfg(not(all(test, loom)))]
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        SHARD.try_with(|s| *s).unwrap_or(0) % shards
    }
}

impl Default for AbortRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for AbortRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AbortRoot")
            .field("is_shutdown", &self.is_shutdown())
            .field("stats", &self.stats())
            .finish()
    }
}

/// How many request signals fired, per [`AbortReason`]; from [`AbortRoot::stats`].
///
/// Each request is counted once, for the reason its signal fired with (with nested layers,
/// the signal that fired first). A
/// [`Shutdown`](AbortReason::Shutdown) is counted when a request first observes it: when
/// its handler checks or awaits the signal, or at the latest when the request's response
/// future or body is dropped unfinished. A request that completes normally after the
/// root was shut down without ever looking is not counted.
///
/// # Examples
///
/// Exporting `abort_total{reason=...}`:
///
/// ```
/// use tower_abort::AbortRoot;
///
/// let root = AbortRoot::new();
/// for (reason, count) in root.stats().iter() {
///     println!("abort_total{{reason=\"{}\"}} {count}", reason.as_str());
/// }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbortStats {
    counts: [u64; 4],
}

impl AbortStats {
    /// The count for one reason.
    pub fn get(&self, reason: AbortReason) -> u64 {
        self.counts[reason.index()]
    }

    /// The sum over all reasons.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Every reason with its count, in [`AbortReason::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (AbortReason, u64)> + '_ {
        AbortReason::ALL.into_iter().map(|r| (r, self.get(r)))
    }
}
