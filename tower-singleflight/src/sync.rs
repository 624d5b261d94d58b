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

/// The lag timer of a shared body: tokio's normally; under loom, a timer the model fires
/// (`loom_tests::timer`), so the models can race the timeout against the readers.
#[cfg(not(all(test, loom)))]
pub(crate) use tokio::time::{sleep, Sleep};

#[cfg(all(test, loom))]
pub(crate) use crate::loom_tests::timer::{sleep, Sleep};

/// Locks `mutex`, ignoring poisoning: the state behind every lock in this crate is updated
/// before any user code runs (user futures are polled with the lock released and under
/// `catch_unwind`), so a poisoned lock still guards consistent state.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
