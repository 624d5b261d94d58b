//! Deadline timers for response futures.
//!
//! Most requests get the server's timeout (`with_timeout`), so their deadlines arrive in the
//! order the requests did. Rather than a tokio timer entry per request (created, registered,
//! deregistered and freed: several hundred instructions and an allocation), requests whose
//! deadline is "start + the server timeout" are queued, per thread and per timeout length,
//! in first-in-first-out lists; one task per thread and runtime (the *driver*) sleeps until
//! the earliest head and wakes whatever expired. Queueing and leaving are a lock that only
//! the thread's own requests and its driver take, and a slab slot.
//!
//! A deadline shortened by a client header or an outer layer, a grace-period backstop, or a
//! future polled outside a tokio runtime uses a tokio `Sleep` of its own, as before.
//!
//! A queued future also compares the clock with its deadline whenever it is polled, so a
//! deadline is never seen late because the driver has not run yet.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use slab::Slab;
use tokio::time::{sleep_until, Instant, Sleep};

/// A deadline timer: unarmed, queued in this thread's shared lists, or a `Sleep` of its own.
pub(crate) struct DeadlineTimer {
    state: TimerState,
}

enum TimerState {
    Unarmed,
    Queued(Arc<Timers>, usize),
    Own(Pin<Box<Sleep>>),
}

impl DeadlineTimer {
    pub(crate) const fn new() -> Self {
        DeadlineTimer {
            state: TimerState::Unarmed,
        }
    }

    /// Ready once `deadline` has passed. `server_timeout` is `Some` when the deadline is the
    /// request's start plus that timeout, which lets it join the shared lists.
    pub(crate) fn poll_until(
        &mut self,
        cx: &mut Context<'_>,
        deadline: Instant,
        server_timeout: Option<Duration>,
    ) -> Poll<()> {
        loop {
            match &mut self.state {
                TimerState::Unarmed => {
                    if let Some(timeout) = server_timeout {
                        if let Some((timers, key)) = Timers::enqueue(timeout, deadline, cx.waker())
                        {
                            // The driver fires it at once if it has already passed.
                            self.state = TimerState::Queued(timers, key);
                            return Poll::Pending;
                        }
                    }
                    self.state = TimerState::Own(Box::pin(sleep_until(deadline)));
                }
                TimerState::Queued(timers, key) => {
                    return match timers.poll(*key, cx.waker()) {
                        Queued::Fired => {
                            self.clear();
                            Poll::Ready(())
                        }
                        Queued::Waiting if Instant::now() >= deadline => {
                            self.clear();
                            Poll::Ready(())
                        }
                        Queued::Waiting => Poll::Pending,
                        Queued::Closed => {
                            // The driver is gone (its runtime is shutting down): fall back.
                            self.state = TimerState::Own(Box::pin(sleep_until(deadline)));
                            continue;
                        }
                    };
                }
                TimerState::Own(sleep) => return sleep.as_mut().poll(cx),
            }
        }
    }

    /// Re-arms the timer for `at` on a `Sleep` of its own (the grace-period backstop).
    pub(crate) fn reset(&mut self, at: Instant) {
        match &mut self.state {
            TimerState::Own(sleep) => sleep.as_mut().reset(at),
            _ => self.state = TimerState::Own(Box::pin(sleep_until(at))),
        }
    }

    /// Disarms the timer, releasing its queue slot or timer entry.
    #[inline]
    pub(crate) fn clear(&mut self) {
        if !matches!(self.state, TimerState::Unarmed) {
            self.state = TimerState::Unarmed;
        }
    }
}

impl Drop for TimerState {
    #[inline]
    fn drop(&mut self) {
        if let TimerState::Queued(timers, key) = self {
            timers.remove(*key);
        }
    }
}

// ===== the shared lists =====

/// Locks `mutex`, ignoring poisoning (std's `Mutex` even under loom: the timer is not part
/// of the loom models). No user code runs under this lock; wakers are woken after it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One thread's deadline lists within one runtime, and the state of their driver.
pub(crate) struct Timers {
    state: Mutex<State>,
}

struct State {
    /// One first-in-first-out list per timeout length.
    lists: Vec<List>,
    entries: Slab<Entry>,
    /// The driver's waker, and the instant its sleep is set for (`None`: nothing queued).
    driver: Option<Waker>,
    armed: Option<Instant>,
    /// The driver is gone: nothing is queued any more; queued futures fall back.
    closed: bool,
    /// The owning thread exited: the driver leaves once the lists are empty.
    orphaned: bool,
}

struct List {
    timeout: Duration,
    head: Option<usize>,
    tail: Option<usize>,
}

struct Entry {
    deadline: Instant,
    list: usize,
    prev: Option<usize>,
    next: Option<usize>,
    /// Taken when the entry fires or the driver goes.
    waker: Option<Waker>,
    fired: bool,
}

enum Queued {
    Waiting,
    Fired,
    Closed,
}

/// What the driver does next.
enum Next {
    Sleep(Instant),
    Idle,
    Exit,
}

/// This thread's lists, with the runtime they belong to. Dropped when the thread exits.
struct Local {
    runtime: tokio::runtime::Id,
    timers: Arc<Timers>,
}

impl Drop for Local {
    fn drop(&mut self) {
        self.timers.orphan();
    }
}

thread_local! {
    static LOCAL: std::cell::RefCell<Option<Local>> = const { std::cell::RefCell::new(None) };
}

impl Timers {
    /// Queues a deadline in this thread's lists, starting their driver in the current
    /// runtime if needed. `None` outside a tokio runtime (or while the thread exits).
    fn enqueue(
        timeout: Duration,
        deadline: Instant,
        waker: &Waker,
    ) -> Option<(Arc<Timers>, usize)> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let runtime = handle.id();
        LOCAL
            .try_with(|local| {
                let mut local = local.try_borrow_mut().ok()?;
                if let Some(current) = local.as_ref().filter(|l| l.runtime == runtime) {
                    if let Some(key) = current.timers.insert(timeout, deadline, waker) {
                        return Some((Arc::clone(&current.timers), key));
                    }
                    // Closed: its driver is gone; start over below.
                }
                let timers = Arc::new(Timers {
                    state: Mutex::new(State {
                        lists: Vec::new(),
                        entries: Slab::new(),
                        driver: None,
                        armed: None,
                        closed: false,
                        orphaned: false,
                    }),
                });
                // Replacing another runtime's lists orphans them, so their driver leaves.
                let old = local.replace(Local {
                    runtime,
                    timers: Arc::clone(&timers),
                });
                drop(local);
                drop(old);
                drop(handle.spawn(drive(Arc::clone(&timers))));
                let key = timers.insert(timeout, deadline, waker)?;
                Some((timers, key))
            })
            .ok()
            .flatten()
    }

    fn insert(&self, timeout: Duration, deadline: Instant, waker: &Waker) -> Option<usize> {
        let waker = waker.clone();
        let (key, driver) = {
            let mut state = lock(&self.state);
            if state.closed {
                return None;
            }
            let list = match state.lists.iter().position(|l| l.timeout == timeout) {
                Some(list) => list,
                None => {
                    state.lists.push(List {
                        timeout,
                        head: None,
                        tail: None,
                    });
                    state.lists.len() - 1
                }
            };
            let key = state.entries.insert(Entry {
                deadline,
                list,
                prev: None,
                next: None,
                waker: Some(waker),
                fired: false,
            });
            state.link(list, key);
            // The driver sleeps until `armed`: wake it if this deadline is sooner.
            let driver = if state.armed.map_or(true, |armed| deadline < armed) {
                state.armed = Some(deadline);
                state.driver.take()
            } else {
                None
            };
            (key, driver)
        };
        if let Some(driver) = driver {
            driver.wake();
        }
        Some(key)
    }

    fn poll(&self, key: usize, waker: &Waker) -> Queued {
        let mut state = lock(&self.state);
        let closed = state.closed;
        let Some(entry) = state.entries.get_mut(key) else {
            return Queued::Closed;
        };
        if entry.fired {
            return Queued::Fired;
        }
        if closed {
            return Queued::Closed;
        }
        match &mut entry.waker {
            Some(current) if current.will_wake(waker) => {}
            slot => {
                let old = slot.replace(waker.clone());
                drop(state);
                drop(old);
            }
        }
        Queued::Waiting
    }

    fn remove(&self, key: usize) {
        let entry = {
            let mut state = lock(&self.state);
            let Some(entry) = state.entries.try_remove(key) else {
                return;
            };
            if !entry.fired {
                state.unlink(&entry);
            }
            entry
        };
        // The waker is dropped outside the lock.
        drop(entry);
    }

    /// Fires every expired entry (their wakers go to `wake`), records the driver's waker
    /// and says what it does next.
    fn expire(&self, now: Instant, driver: &Waker, wake: &mut Vec<Waker>) -> Next {
        let mut state = lock(&self.state);
        for list in 0..state.lists.len() {
            while let Some(head) = state.lists[list].head {
                if state.entries[head].deadline > now {
                    break;
                }
                let next = state.entries[head].next;
                state.lists[list].head = next;
                match next {
                    Some(next) => state.entries[next].prev = None,
                    None => state.lists[list].tail = None,
                }
                let entry = &mut state.entries[head];
                entry.fired = true;
                entry.next = None;
                wake.extend(entry.waker.take());
            }
        }
        if state.orphaned && state.entries.is_empty() {
            return Next::Exit;
        }
        let next = state
            .lists
            .iter()
            .filter_map(|l| l.head.map(|h| state.entries[h].deadline))
            .min();
        state.armed = next;
        match &state.driver {
            Some(current) if current.will_wake(driver) => {}
            _ => state.driver = Some(driver.clone()),
        }
        next.map_or(Next::Idle, Next::Sleep)
    }

    /// The driver is gone: wake everything still queued, so it falls back to its own timer.
    fn close(&self) {
        let wakers: Vec<Waker> = {
            let mut state = lock(&self.state);
            state.closed = true;
            state.driver = None;
            state
                .entries
                .iter_mut()
                .filter_map(|(_, e)| e.waker.take())
                .collect()
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The owning thread exited: the driver leaves once nothing is queued.
    fn orphan(&self) {
        let driver = {
            let mut state = lock(&self.state);
            state.orphaned = true;
            state.driver.take()
        };
        if let Some(driver) = driver {
            driver.wake();
        }
    }
}

impl State {
    /// Appends `key` to `list`, walking back past later deadlines (a request may reach its
    /// first wait after one that started later).
    fn link(&mut self, list: usize, key: usize) {
        let deadline = self.entries[key].deadline;
        let mut after = self.lists[list].tail;
        while let Some(at) = after {
            if self.entries[at].deadline <= deadline {
                break;
            }
            after = self.entries[at].prev;
        }
        let before = match after {
            Some(at) => self.entries[at].next.replace(key),
            None => self.lists[list].head.replace(key),
        };
        match before {
            Some(b) => self.entries[b].prev = Some(key),
            None => self.lists[list].tail = Some(key),
        }
        let entry = &mut self.entries[key];
        entry.prev = after;
        entry.next = before;
    }

    fn unlink(&mut self, entry: &Entry) {
        match entry.prev {
            Some(p) => self.entries[p].next = entry.next,
            None => self.lists[entry.list].head = entry.next,
        }
        match entry.next {
            Some(n) => self.entries[n].prev = entry.prev,
            None => self.lists[entry.list].tail = entry.prev,
        }
    }
}

/// Closes the lists when the driver ends (returns, panics, or is dropped with its runtime).
struct CloseOnDrop(Arc<Timers>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The driver: sleeps until the earliest queued deadline and wakes what expired.
async fn drive(timers: Arc<Timers>) {
    let _close = CloseOnDrop(Arc::clone(&timers));
    let mut sleep: Option<Pin<Box<Sleep>>> = None;
    let mut wake = Vec::new();
    std::future::poll_fn(move |cx| loop {
        let next = timers.expire(Instant::now(), cx.waker(), &mut wake);
        wake.drain(..).for_each(Waker::wake);
        match next {
            Next::Exit => return Poll::Ready(()),
            Next::Idle => return Poll::Pending,
            Next::Sleep(at) => {
                let sleep = match &mut sleep {
                    Some(sleep) => {
                        if sleep.deadline() != at {
                            sleep.as_mut().reset(at);
                        }
                        sleep
                    }
                    None => sleep.insert(Box::pin(sleep_until(at))),
                };
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_test::task::new_count_waker;

    fn poll(timer: &mut DeadlineTimer, deadline: Instant, waker: &Waker) -> Poll<()> {
        timer.poll_until(
            &mut Context::from_waker(waker),
            deadline,
            Some(Duration::from_secs(1)),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn queued_deadlines_fire_in_order_each_waking_once() {
        let start = Instant::now();
        let (waker, count) = new_count_waker();
        let mut timers: Vec<DeadlineTimer> = (0..3).map(|_| DeadlineTimer::new()).collect();
        // Queued out of order: 2, 1, 3 seconds.
        for (timer, secs) in timers.iter_mut().zip([2, 1, 3]) {
            let deadline = start + Duration::from_secs(secs);
            assert!(poll(timer, deadline, &waker).is_pending());
            assert!(matches!(timer.state, TimerState::Queued(..)));
        }
        for expect in 1..=3 {
            tokio::time::sleep_until(start + Duration::from_secs(expect)).await;
            tokio::task::yield_now().await;
            assert_eq!(count.get(), expect as usize);
        }
        for (timer, secs) in timers.iter_mut().zip([2, 1, 3]) {
            let deadline = start + Duration::from_secs(secs);
            assert!(poll(timer, deadline, &waker).is_ready());
            assert!(matches!(timer.state, TimerState::Unarmed));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_entry_never_wakes_and_the_clock_is_checked_on_poll() {
        let start = Instant::now();
        let (waker, count) = new_count_waker();
        let mut gone = DeadlineTimer::new();
        let mut late = DeadlineTimer::new();
        assert!(poll(&mut gone, start + Duration::from_secs(1), &waker).is_pending());
        assert!(poll(&mut late, start + Duration::from_secs(2), &waker).is_pending());
        drop(gone);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(count.get(), 0);
        // Past the deadline, a poll sees it even before the driver ran.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(poll(&mut late, start + Duration::from_secs(2), &waker).is_ready());
    }

    #[test]
    fn a_runtime_shutting_down_wakes_queued_futures_and_the_next_runtime_starts_over() {
        let (waker, count) = new_count_waker();
        let mut timer = DeadlineTimer::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(3600);
            assert!(poll(&mut timer, deadline, &waker).is_pending());
            tokio::task::yield_now().await; // the driver starts
        });
        drop(rt);
        assert_eq!(count.get(), 1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut fresh = DeadlineTimer::new();
            let deadline = Instant::now() + Duration::from_secs(1);
            assert!(poll(&mut fresh, deadline, &waker).is_pending());
            assert!(matches!(fresh.state, TimerState::Queued(..)));
            tokio::time::sleep(Duration::from_secs(1)).await;
            tokio::task::yield_now().await;
            assert!(poll(&mut fresh, deadline, &waker).is_ready());
        });
        // The old timer's lists are closed: it is not polled again here, only dropped.
        drop(timer);
    }

    #[test]
    fn outside_a_runtime_nothing_is_queued() {
        assert!(Timers::enqueue(
            Duration::from_secs(1),
            Instant::now(),
            &futures_test::task::noop_waker()
        )
        .is_none());
    }
}
