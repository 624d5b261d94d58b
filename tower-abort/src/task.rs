use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};

use tokio::task::JoinHandle;

use crate::{AbortReason, AbortSignal};

impl AbortSignal {
    /// Spawns `future` on the current tokio runtime, tied to this signal: when the signal
    /// fires, the task stops at its current `.await` and is dropped, even if nobody awaits
    /// the handle.
    ///
    /// Await the [`TaskHandle`] to join it: `Ok(output)` when it completed, `Err(reason)`
    /// when the signal stopped it. Dropping the handle detaches the task: it then runs until
    /// it completes or the signal fires, so a client that goes away frees the work it
    /// started. A signal does not fire when its response completes normally, so detached
    /// work may outlive a successful request; keep the handle and await it (or call
    /// [`TaskHandle::abort`]) to bound the task by the handler.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like [`tokio::spawn`]. A panic inside the task is resumed
    /// in whoever awaits the handle.
    ///
    /// # Examples
    ///
    /// ```
    /// # use tower_abort::{AbortReason, AbortSignal};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let signal = AbortSignal::new();
    /// let slow = signal.spawn(std::future::pending::<()>());
    /// signal.abort();
    /// assert_eq!(slow.await, Err(AbortReason::Explicit));
    ///
    /// let signal = AbortSignal::new();
    /// assert_eq!(signal.spawn(async { 7 }).await, Ok(7));
    /// # }
    /// ```
    pub fn spawn<F>(&self, future: F) -> TaskHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        TaskHandle {
            join: tokio::spawn(self.run_until_aborted(future)),
            stopped: AtomicBool::new(false),
        }
    }

    /// Runs `f` on tokio's blocking pool and hands it a clone of this signal.
    ///
    /// A blocking closure cannot be interrupted from outside; it must check
    /// [`is_aborted`](Self::is_aborted) between steps and return early. The returned
    /// handle joins it.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like [`tokio::task::spawn_blocking`].
    ///
    /// # Examples
    ///
    /// ```
    /// # use tower_abort::AbortSignal;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let signal = AbortSignal::new();
    /// let rows = signal.spawn_blocking(|signal| {
    ///     let mut rows = 0;
    ///     for _ in 0..1_000 {
    ///         if signal.is_aborted() {
    ///             break; // leave the file, the transaction, ... in a clean state
    ///         }
    ///         rows += 1;
    ///     }
    ///     rows
    /// });
    /// assert_eq!(rows.await.unwrap(), 1_000);
    /// # }
    /// ```
    pub fn spawn_blocking<F, T>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce(AbortSignal) -> T + Send + 'static,
        T: Send + 'static,
    {
        let signal = self.clone();
        tokio::task::spawn_blocking(move || f(signal))
    }
}

/// A task started with [`AbortSignal::spawn`]; await it to join.
///
/// Resolves to `Ok(output)` or `Err(reason)` if the signal stopped the task. If the
/// runtime shut down under the task (or [`abort`](Self::abort) was called), the error is
/// [`AbortReason::Shutdown`] (respectively [`AbortReason::Explicit`]).
#[must_use = "dropping the handle detaches the task; it still stops when the signal fires"]
pub struct TaskHandle<T> {
    join: JoinHandle<Result<T, AbortReason>>,
    stopped: AtomicBool,
}

impl<T> TaskHandle<T> {
    /// Stops the task now, regardless of the signal.
    pub fn abort(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.join.abort();
    }

    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

impl<T> Future for TaskHandle<T> {
    type Output = Result<T, AbortReason>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match ready!(Pin::new(&mut self.join).poll(cx)) {
            Ok(result) => result,
            Err(err) => match err.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) if self.stopped.load(Ordering::Relaxed) => Err(AbortReason::Explicit),
                Err(_) => Err(AbortReason::Shutdown),
            },
        })
    }
}

impl<T> fmt::Debug for TaskHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}
