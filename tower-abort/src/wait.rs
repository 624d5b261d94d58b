//! The waiting side of a signal: a cell that wakes its waiters, and the cells linked below
//! it, exactly once.
//!
//! A signal's reason lives in its node (`signal.rs`) and is resolved by walking up to the
//! parents; a cell only says "something above you or you yourself fired, look again". Cells
//! exist only for signals somebody waits on, so a request whose handler never waits costs
//! no cell, no lock and no registration with the root.
//!
//! Links point down only (a cell holds the cells below it, never the one above), so they
//! form no reference cycle: a node holds its own cell and, to unlink itself when it is
//! dropped, the cells (or root shard) it is registered with.

use std::task::Waker;

use slab::Slab;
use tokio_util::sync::CancellationToken;

use crate::sync::{lock, Arc, Mutex};

pub(crate) struct WaitCell {
    state: Mutex<CellState>,
}

#[derive(Default)]
struct CellState {
    /// Set once, by `fire`; afterwards nothing registers and nothing is left to wake.
    fired: bool,
    /// The wakers of the `Aborted` futures waiting on this signal.
    wakers: Slots<Waker>,
    /// The cells of signals below this one (children, `any` signals) that have waiters.
    below: Slots<Arc<WaitCell>>,
    /// The signal's [`CancellationToken`], made by the first
    /// [`AbortSignal::cancellation_token`](crate::AbortSignal::cancellation_token) call and
    /// cancelled when the cell fires. Kept after firing, so later calls get the same token.
    token: Option<CancellationToken>,
}

/// A slab whose first entry lives inline: most signals have one waiter and at most one
/// waiting child, which then cost no allocation. Key `0` is the inline slot.
struct Slots<T> {
    first: Option<T>,
    rest: Slab<T>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            first: None,
            rest: Slab::new(),
        }
    }
}

impl<T> Slots<T> {
    fn insert(&mut self, value: T) -> usize {
        if self.first.is_none() {
            self.first = Some(value);
            0
        } else {
            self.rest.insert(value) + 1
        }
    }

    fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        match key {
            0 => self.first.as_mut(),
            _ => self.rest.get_mut(key - 1),
        }
    }

    fn try_remove(&mut self, key: usize) -> Option<T> {
        match key {
            0 => self.first.take(),
            _ => self.rest.try_remove(key - 1),
        }
    }

    fn into_values(self) -> impl Iterator<Item = T> {
        self.first
            .into_iter()
            .chain(self.rest.into_iter().map(|(_, value)| value))
    }
}

impl WaitCell {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(WaitCell {
            state: Mutex::new(CellState::default()),
        })
    }

    /// Registers a waker; `None` if the cell already fired (the caller looks at the signal
    /// again instead).
    pub(crate) fn register(&self, waker: &Waker) -> Option<usize> {
        let waker = waker.clone();
        let mut state = lock(&self.state);
        (!state.fired).then(|| state.wakers.insert(waker))
    }

    /// Replaces the waker registered under `key`, if it is still registered.
    pub(crate) fn update(&self, key: usize, waker: &Waker) {
        let mut waker = waker.clone();
        {
            let mut state = lock(&self.state);
            if let Some(slot) = state.wakers.get_mut(key) {
                std::mem::swap(slot, &mut waker);
            }
        }
        // The old waker is dropped outside the lock: its drop is executor code.
        drop(waker);
    }

    /// Removes the waker registered under `key`; a no-op once the cell has fired.
    pub(crate) fn deregister(&self, key: usize) {
        let waker = {
            let mut state = lock(&self.state);
            if state.fired {
                return;
            }
            state.wakers.try_remove(key)
        };
        // Dropped outside the lock: a waker's drop is executor code.
        drop(waker);
    }

    /// Links `cell` below this one, so it fires when this one does; `None` if this one
    /// already fired.
    pub(crate) fn link(&self, cell: &Arc<WaitCell>) -> Option<usize> {
        let mut state = lock(&self.state);
        (!state.fired).then(|| state.below.insert(Arc::clone(cell)))
    }

    /// Undoes [`link`](Self::link); a no-op once the cell has fired.
    pub(crate) fn unlink(&self, key: usize) {
        let cell = {
            let mut state = lock(&self.state);
            if state.fired {
                return;
            }
            state.below.try_remove(key)
        };
        drop(cell);
    }

    /// Fires this cell and every cell linked below it: each waker is woken once, after the
    /// lock is released. Idempotent.
    pub(crate) fn fire(this: &Arc<Self>) {
        fire_all(Arc::clone(this), Vec::new());
    }

    /// The token stored in this cell, storing one made by `make` first if there is none yet.
    /// `make` runs with no lock held (it may lock a parent token); if another call stored a
    /// token meanwhile, the one made is dropped unused. If the cell has already fired, the
    /// token is cancelled before it is returned; otherwise [`fire`](Self::fire) cancels it.
    pub(crate) fn token(&self, make: impl FnOnce() -> CancellationToken) -> CancellationToken {
        let stored = {
            let state = lock(&self.state);
            state.token.clone().map(|token| (token, state.fired))
        };
        let mut unused = None;
        let (token, fired) = match stored {
            Some(stored) => stored,
            None => {
                let fresh = make();
                let mut state = lock(&self.state);
                let fired = state.fired;
                let token = match &state.token {
                    Some(token) => {
                        unused = Some(fresh);
                        token.clone()
                    }
                    None => state.token.insert(fresh).clone(),
                };
                (token, fired)
            }
        };
        // Outside the lock: dropping a child token locks its parent, and cancelling one
        // wakes its waiters.
        drop(unused);
        if fired {
            token.cancel();
        }
        token
    }

    /// Takes the wakers and the cells below, marking the cell fired; `None` if it already was.
    fn take(&self) -> Option<Fired> {
        let mut state = lock(&self.state);
        if state.fired {
            return None;
        }
        state.fired = true;
        Some(Fired {
            wakers: std::mem::take(&mut state.wakers),
            below: std::mem::take(&mut state.below),
            token: state.token.clone(),
        })
    }
}

/// What a cell's firing has to reach, taken out under its lock and used after.
struct Fired {
    wakers: Slots<Waker>,
    below: Slots<Arc<WaitCell>>,
    token: Option<CancellationToken>,
}

/// Fires `first`, the cells in `rest` and everything below them, without recursion (a chain
/// of children can be arbitrarily deep) and without allocating for a single chain.
pub(crate) fn fire_all(first: Arc<WaitCell>, mut rest: Vec<Arc<WaitCell>>) {
    let mut next = Some(first);
    while let Some(cell) = next.take().or_else(|| rest.pop()) {
        let Some(Fired {
            wakers,
            below,
            token,
        }) = cell.take()
        else {
            continue;
        };
        if let Some(token) = token {
            token.cancel();
        }
        for waker in wakers.into_values() {
            waker.wake();
        }
        let mut below = below.into_values();
        next = below.next();
        rest.extend(below);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_test::task::new_count_waker;

    #[test]
    fn fire_wakes_each_waiter_once_and_everything_below() {
        let top = WaitCell::new();
        let below = WaitCell::new();
        let (waker, count) = new_count_waker();
        top.register(&waker).unwrap();
        below.register(&waker).unwrap();
        let gone = below.register(&waker).unwrap();
        below.deregister(gone);
        top.link(&below).unwrap();
        WaitCell::fire(&top);
        assert_eq!(count.get(), 2);
        WaitCell::fire(&top);
        WaitCell::fire(&below);
        assert_eq!(count.get(), 2);
        assert!(top.register(&waker).is_none());
        assert!(below.link(&WaitCell::new()).is_none());
    }

    #[test]
    fn the_inline_slot_is_reused_and_every_live_waker_fires_once() {
        let cell = WaitCell::new();
        let (a, a_count) = new_count_waker();
        let (b, b_count) = new_count_waker();
        let (c, c_count) = new_count_waker();
        let first = cell.register(&a).unwrap();
        let second = cell.register(&b).unwrap();
        assert_ne!(first, second);
        cell.deregister(first);
        let third = cell.register(&c).unwrap();
        cell.update(third, &c);
        WaitCell::fire(&cell);
        assert_eq!((a_count.get(), b_count.get(), c_count.get()), (0, 1, 1));
    }

    #[test]
    fn unlinked_cells_do_not_fire() {
        let top = WaitCell::new();
        let below = WaitCell::new();
        let key = top.link(&below).unwrap();
        top.unlink(key);
        WaitCell::fire(&top);
        assert!(below.register(&futures_test::task::noop_waker()).is_some());
    }
}
