//! The synchronisation primitives the signal tree uses: std's normally, loom's when the loom
//! models run (`RUSTFLAGS="--cfg loom"`), so the models exercise the real state machine.

#[cfg(all(test, loom))]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc, Mutex, MutexGuard,
};
#[cfg(not(all(test, loom)))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc, Mutex, MutexGuard,
};

/// Locks `mutex`, ignoring poisoning: no user code runs while one of this crate's locks is
/// held (wakers are woken and callbacks called after unlocking), so the state behind a
/// poisoned lock is still consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
