use crate::{AbortReason, AbortSignal};

/// Fires [`AbortReason::ClientGone`] when dropped while armed: carried by the response
/// future, then by the response body until its end.
#[derive(Debug)]
pub(crate) struct ClientGoneGuard {
    signal: Option<AbortSignal>,
}

impl ClientGoneGuard {
    pub(crate) fn armed(signal: AbortSignal) -> Self {
        ClientGoneGuard {
            signal: Some(signal),
        }
    }

    pub(crate) fn disarmed() -> Self {
        ClientGoneGuard { signal: None }
    }

    #[inline]
    pub(crate) fn signal(&self) -> Option<&AbortSignal> {
        self.signal.as_ref()
    }

    /// Disarms the guard, returning the signal it held.
    #[inline]
    pub(crate) fn take(&mut self) -> Option<AbortSignal> {
        self.signal.take()
    }

    /// Disarms the guard: the request completed. Its signal may go back to the pool.
    #[inline]
    pub(crate) fn disarm(&mut self) {
        if let Some(signal) = self.signal.take() {
            signal.release();
        }
    }
}

impl Drop for ClientGoneGuard {
    #[inline]
    fn drop(&mut self) {
        // Only the check is inlined: a completed request drops a disarmed guard.
        if let Some(signal) = self.signal.take() {
            client_gone(signal);
        }
    }
}

#[cold]
#[inline(never)]
fn client_gone(signal: AbortSignal) {
    signal.fire(AbortReason::ClientGone);
    signal.release();
}
