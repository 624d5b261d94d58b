//! The synchronisation primitives the core uses: std's normally, loom's when the loom
//! models run (`RUSTFLAGS="--cfg loom"`), so the models exercise the real state machine.

#[cfg(all(test, loom))]
pub(crate) use loom::sync::{
    atomic::{AtomicUsize, Ordering},
    Mutex, MutexGuard,
};
#[cfg(not(all(test, loom)))]
pub(crate) use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Mutex, MutexGuard,
};

/// Locks `mutex`, ignoring poisoning: the state behind every lock in this crate is updated
/// before any user code runs (user futures are polled with the lock released and under
/// `catch_unwind`), so a poisoned lock still guards consistent state.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
