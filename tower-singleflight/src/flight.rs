//! One flight: the shared future, its waiters and the rule deciding who drives it.
//!
//! The shared future lives in the flight, not in any caller. Whichever waiter is the
//! *driver* polls it, with a waker of the flight's own: when the future wakes that waker,
//! the flight wakes the current driver only. When the driver leaves, another waiter
//! becomes driver (woken only if a wake-up is pending). When the future completes, every
//! other waiter is woken exactly once. When the last waiter leaves, the future is dropped.

use std::{
    future::Future,
    hash::Hash,
    mem,
    panic::{catch_unwind, AssertUnwindSafe},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::Instant,
};

use futures_task::{waker_ref, ArcWake};
use slab::Slab;

use crate::{
    error::{Failure, FlightError},
    group::GroupInner,
    sync::{lock, Mutex},
};

pub(crate) type BoxWork<V> = Pin<Box<dyn Future<Output = V> + Send>>;

pub(crate) struct Flight<V> {
    pub(crate) state: Mutex<State<V>>,
    /// When it started; only read (and only taken) when the group has a `max_age`.
    pub(crate) started: Option<Instant>,
}

pub(crate) struct State<V> {
    pub(crate) stage: Stage<V>,
    /// One slot per waiter: its latest waker, `None` until it is first polled.
    pub(crate) waiters: Waiters,
    /// The waiter woken when the shared future asks to be polled again.
    driver: Option<usize>,
    /// The shared future asked to be polled (or was never polled) and no waiter has yet.
    needs_poll: bool,
}

pub(crate) enum Stage<V> {
    /// Between the flight's creation and the leader's closure returning the future.
    Starting,
    /// Waiting for a waiter to poll it.
    Idle(BoxWork<V>),
    /// A waiter is polling it right now, with the lock released.
    Polling,
    /// Finished; every waiter clones the outcome.
    Done(Result<V, Failure>),
    /// Finished with no other waiter registered: the one that finished it took the value.
    Taken,
    /// Every waiter left before it finished; the future was dropped.
    Cancelled,
}

impl<V> Flight<V> {
    /// A flight in the `Starting` stage whose first waiter (the leader) is slot 0.
    pub(crate) fn starting(started: Option<Instant>) -> (Self, usize) {
        let mut waiters = Waiters::new();
        let leader = waiters.insert();
        let flight = Flight {
            state: Mutex::new(State {
                stage: Stage::Starting,
                waiters,
                driver: Some(leader),
                needs_poll: true,
            }),
            started,
        };
        (flight, leader)
    }

    /// Whether a new caller may join: not finished, and younger than `max_age`.
    pub(crate) fn joinable(state: &State<V>) -> bool {
        !matches!(
            state.stage,
            Stage::Done(_) | Stage::Taken | Stage::Cancelled
        )
    }
}

impl<V> State<V> {
    pub(crate) fn add_waiter(&mut self) -> usize {
        self.waiters.insert()
    }
}

impl<V: Send> ArcWake for Flight<V> {
    fn wake_by_ref(this: &Arc<Self>) {
        let mut state = lock(&this.state);
        if state.needs_poll {
            // Already pending: the driver was woken, or the poller will see the flag.
            return;
        }
        state.needs_poll = true;
        if !matches!(state.stage, Stage::Idle(_)) {
            // Polling: the poller re-schedules itself when it sees the flag.
            return;
        }
        let waker = state
            .driver
            .and_then(|driver| state.waiters.waker(driver))
            .cloned();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Registration of one waiter in one flight. Dropping it leaves the flight.
pub(crate) struct Waiter<K: Hash + Eq, V> {
    pub(crate) flight: Arc<Flight<V>>,
    /// The group to leave when the flight ends, and the hash of the key the flight is
    /// filed under; `None` for a flight running alone after an overflow.
    pub(crate) group: Option<(Arc<GroupInner<K, V>>, u64)>,
    pub(crate) slot: usize,
    pub(crate) finished: bool,
    /// Set when this waiter finished the work with no other waiter registered.
    pub(crate) alone: bool,
}

impl<K, V> Waiter<K, V>
where
    K: Hash + Eq,
    V: Clone + Send + 'static,
{
    /// Installs the leader's future (or its panic) into a `Starting` flight.
    pub(crate) fn start(&mut self, make: impl FnOnce() -> BoxWork<V>) {
        match catch_unwind(AssertUnwindSafe(make)) {
            Ok(work) => {
                let mut state = lock(&self.flight.state);
                debug_assert!(matches!(state.stage, Stage::Starting));
                state.stage = Stage::Idle(work);
            }
            Err(payload) => {
                // The leader stays registered and reads the failure when polled.
                let mut state = lock(&self.flight.state);
                state.stage = Stage::Done(Err(Failure::from_panic(payload)));
                let wakers = state.waiters.take_wakers();
                drop(state);
                self.forget();
                wakers.into_iter().for_each(Waker::wake);
            }
        }
    }

    pub(crate) fn poll_flight(&mut self, cx: &mut Context<'_>) -> Poll<Result<V, FlightError>> {
        assert!(!self.finished, "singleflight `Run` polled after completion");
        let mut state = lock(&self.flight.state);
        match &state.stage {
            Stage::Done(outcome) => {
                let outcome = outcome.clone();
                state.waiters.remove(self.slot);
                self.finished = true;
                return Poll::Ready(outcome.map_err(FlightError::new));
            }
            Stage::Taken | Stage::Cancelled => {
                // Unreachable while this waiter is registered; fail rather than hang.
                self.finished = true;
                return Poll::Ready(Err(FlightError::new(Failure::Panicked(Arc::from(
                    "flight cancelled while a waiter was registered",
                )))));
            }
            Stage::Starting | Stage::Polling => {
                state.waiters.store_waker(self.slot, cx.waker());
                return Poll::Pending;
            }
            Stage::Idle(_) if !state.needs_poll => {
                state.waiters.store_waker(self.slot, cx.waker());
                return Poll::Pending;
            }
            Stage::Idle(_) => {}
        }
        // Drive it: become the driver, take the future out, poll it with the lock released.
        // The driver's waker is needed only while the future is idle: it is stored after
        // the poll, if the future is still pending.
        state.driver = Some(self.slot);
        state.needs_poll = false;
        let Stage::Idle(mut work) = mem::replace(&mut state.stage, Stage::Polling) else {
            unreachable!("checked above")
        };
        drop(state);

        let flight_waker = waker_ref(&self.flight);
        let mut flight_cx = Context::from_waker(&flight_waker);
        match catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(&mut flight_cx))) {
            Ok(Poll::Pending) => {
                let mut state = lock(&self.flight.state);
                state.waiters.store_waker(self.slot, cx.waker());
                state.stage = Stage::Idle(work);
                let woken_meanwhile = state.needs_poll;
                drop(state);
                if woken_meanwhile {
                    // The future woke itself while being polled: honour it once.
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
            Ok(Poll::Ready(value)) => {
                drop_quietly(work);
                self.complete(Ok(value))
                    .map(|r| r.map_err(FlightError::new))
            }
            Err(payload) => {
                drop_quietly(work);
                self.complete(Err(Failure::from_panic(payload)))
                    .map(|r| r.map_err(FlightError::new))
            }
        }
    }

    /// Stores the outcome, wakes every other waiter once, and frees the key.
    fn complete(&mut self, outcome: Result<V, Failure>) -> Poll<Result<V, Failure>> {
        let mut state = lock(&self.flight.state);
        state.waiters.remove(self.slot);
        self.finished = true;
        self.alone = state.waiters.is_empty();
        if self.alone {
            // Nobody else can ever read it (the flight takes no new waiters from now on):
            // hand the value over without a copy.
            state.stage = Stage::Taken;
            drop(state);
            self.forget();
            return Poll::Ready(outcome);
        }
        let mine = outcome.clone();
        state.stage = Stage::Done(outcome);
        let wakers = state.waiters.take_wakers();
        drop(state);
        self.forget();
        for waker in wakers {
            waker.wake();
        }
        Poll::Ready(mine)
    }
}

impl<K: Hash + Eq, V> Waiter<K, V> {
    fn forget(&self) {
        if let Some((group, hash)) = &self.group {
            group.forget(*hash, &self.flight);
        }
    }
}

impl<K: Hash + Eq, V> Drop for Waiter<K, V> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut state = lock(&self.flight.state);
        state.waiters.remove(self.slot);
        if !matches!(state.stage, Stage::Idle(_)) {
            // Done/Cancelled: nothing to do. Starting/Polling: another waiter is active.
            return;
        }
        if state.waiters.is_empty() {
            let Stage::Idle(work) = mem::replace(&mut state.stage, Stage::Cancelled) else {
                unreachable!("checked above")
            };
            drop(state);
            drop_quietly(work);
            self.forget();
            return;
        }
        if state.driver == Some(self.slot) {
            let next = state.waiters.first();
            state.driver = next;
            if state.needs_poll {
                let waker = next.and_then(|slot| state.waiters.waker(slot)).cloned();
                drop(state);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        }
    }
}

// ===== impl Waiters =====

/// The waiters of one flight, each a slot holding its latest waker (`None` until it is
/// first polled). Slot 0, the leader's, is stored inline, so a flight nobody joins
/// allocates nothing for its waiters; the others go in a slab, allocated on the first join.
pub(crate) struct Waiters {
    /// Slot 0: `None` when vacant.
    first: Option<Option<Waker>>,
    /// Slot `i + 1` is `rest[i]`.
    rest: Slab<Option<Waker>>,
}

impl Waiters {
    pub(crate) fn new() -> Self {
        Self {
            first: None,
            rest: Slab::new(),
        }
    }

    /// Registers a waiter; returns its slot.
    pub(crate) fn insert(&mut self) -> usize {
        if self.first.is_none() {
            self.first = Some(None);
            0
        } else {
            self.rest.insert(None) + 1
        }
    }

    /// Unregisters the waiter in `slot`, if it is registered.
    pub(crate) fn remove(&mut self, slot: usize) {
        match slot {
            0 => self.first = None,
            _ => {
                self.rest.try_remove(slot - 1);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    /// The lowest registered slot.
    fn first(&self) -> Option<usize> {
        if self.first.is_some() {
            return Some(0);
        }
        self.rest.iter().next().map(|(slot, _)| slot + 1)
    }

    fn slot_mut(&mut self, slot: usize) -> Option<&mut Option<Waker>> {
        match slot {
            0 => self.first.as_mut(),
            _ => self.rest.get_mut(slot - 1),
        }
    }

    /// The waker of the waiter in `slot`, if it is registered and was polled.
    fn waker(&self, slot: usize) -> Option<&Waker> {
        match slot {
            0 => self.first.as_ref()?.as_ref(),
            _ => self.rest.get(slot - 1)?.as_ref(),
        }
    }

    /// Keeps `waker` as the latest of the registered waiter in `slot`.
    fn store_waker(&mut self, slot: usize, waker: &Waker) {
        let slot = self
            .slot_mut(slot)
            .expect("a waiter polls only while registered");
        match slot {
            Some(current) if current.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }

    /// Takes every stored waker, to wake each once (the waiters stay registered).
    fn take_wakers(&mut self) -> Vec<Waker> {
        let first = self.first.as_mut().and_then(Option::take);
        if self.rest.is_empty() {
            return first.into_iter().collect();
        }
        first
            .into_iter()
            .chain(self.rest.iter_mut().filter_map(|(_, waker)| waker.take()))
            .collect()
    }
}

/// Drops the shared future; a panic in its destructor must not escape into an unrelated
/// waiter's poll or drop.
fn drop_quietly<T>(value: T) {
    let _ = catch_unwind(AssertUnwindSafe(move || drop(value)));
}
