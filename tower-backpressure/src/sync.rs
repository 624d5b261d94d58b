//! The synchronisation primitives the queue is built on: `std`'s normally, loom's when the
//! crate is compiled with `--cfg loom` so the models in `tests/loom_*.rs` can explore every
//! interleaving of the real code.

#[cfg(not(all(test, loom)))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicU64},
    Arc, Mutex, MutexGuard,
};

#[cfg(all(test, loom))]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, AtomicU64},
    Arc, Mutex, MutexGuard,
};

/// Locks `mutex`, recovering the guard if a panicking thread poisoned it.
///
/// The state behind our locks is only ever mutated by short, non-panicking sections, so a
/// poisoned lock still holds consistent data; refusing it would turn one caller's panic
/// into a permanently wedged limiter for every other caller.
#[cfg(not(all(test, loom)))]
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(all(test, loom))]
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap()
}
