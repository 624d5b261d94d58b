//! The shared admission state: a counting limit, a bounded queue of waiters with direct
//! hand-off, a byte budget, and the statistics behind the handle.
//!
//! Everything lives behind one mutex held for a few dozen instructions at a time; wakers
//! are collected under the lock and woken after it is released. A released permit is
//! handed straight to the waiter chosen by the queue order (its status becomes `Granted`),
//! so a newcomer can never steal a slot that a waiter was promised, and a waiter that is
//! dropped after being granted passes its slot on at once.

use std::collections::VecDeque;
#[cfg(test)]
use std::task::Poll;
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::time::Instant;

use crate::adaptive::{AdaptiveState, LimitStrategy, Outcome};
use crate::error::{Overloaded, ShedReason};
use crate::order::{Priority, QueueOrder};
use crate::stats::{Histogram, Summary};
use crate::sync::{lock, Arc, AtomicBool, AtomicU64, Mutex};

/// Everything about a limiter that does not change after it is built.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) max_in_flight: usize,
    pub(crate) max_queued: usize,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) order: QueueOrder,
    pub(crate) high_priority_share: f64,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) strategy: LimitStrategy,
}

impl Config {
    pub(crate) fn new(max_in_flight: usize) -> Self {
        let max_in_flight = max_in_flight.max(1);
        Config {
            max_in_flight,
            max_queued: max_in_flight,
            queue_timeout: Some(Duration::from_secs(1)),
            order: QueueOrder::Fifo,
            high_priority_share: 0.0,
            max_bytes: None,
            strategy: LimitStrategy::Fixed,
        }
    }
}

/// What a request asks of the limiter.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    pub(crate) priority: Priority,
    pub(crate) bytes: u64,
    pub(crate) deadline: Option<Instant>,
}

/// The limiter's answer to a request.
#[derive(Debug)]
pub(crate) enum Admission {
    Admitted(Permit),
    Queued(Waiter),
    Shed(Overloaded),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Waiting,
    Granted,
    Shed(ShedReason),
}

#[derive(Debug)]
struct Slot {
    status: Status,
    waker: Option<Waker>,
    enqueued: Instant,
    /// When the hand-off happened; the permit's service time starts here.
    granted_at: Instant,
    bytes: u64,
    deadline: Option<Instant>,
    retry_after: Duration,
}

#[derive(Debug)]
struct State {
    limit: usize,
    max_queued: usize,
    in_flight: usize,
    bytes: u64,
    /// Waiter ids per priority class, oldest first; index by `Priority::index`.
    queues: [VecDeque<u64>; 2],
    slots: Slab,
    queued: usize,
    /// Adaptive order: since when the queue has not been empty, and whether that has
    /// lasted a full interval (a standing queue).
    nonempty_since: Option<Instant>,
    standing: bool,
    closed: bool,
    /// Requests admitted at low load since the last timed one.
    untimed: u32,
    // Statistics.
    admitted: u64,
    shed: [u64; ShedReason::ALL.len()],
    peak_in_flight: usize,
    peak_queued: usize,
    queue_wait: Histogram,
    service_time: Histogram,
    /// Exponentially weighted mean service time, seconds; drives `Retry-After` and the
    /// deadline estimate.
    mean_service: Option<f64>,
    adaptive: AdaptiveState,
}

#[derive(Debug)]
pub(crate) struct Shared {
    config: Config,
    state: Mutex<State>,
}

/// A cheap handle to the shared state; every clone of a layer and service holds one.
#[derive(Clone, Debug)]
pub(crate) struct Limiter {
    shared: Arc<Shared>,
}

/// Wakers collected under the lock and woken after it; the first one needs no allocation,
/// and a hand-off wakes exactly one.
#[derive(Default)]
struct Wakers {
    first: Option<Waker>,
    rest: Vec<Waker>,
}

impl Wakers {
    fn new() -> Self {
        Wakers::default()
    }

    fn push(&mut self, waker: Waker) {
        if self.first.is_none() {
            self.first = Some(waker);
        } else {
            self.rest.push(waker);
        }
    }
}

#[inline]
fn wake_all(wakers: Wakers) {
    // The common case, nobody to wake, must cost nothing.
    let Some(first) = wakers.first else {
        return;
    };
    first.wake();
    for w in wakers.rest {
        w.wake();
    }
}

/// Waiter slots by id. Only a slot's own waiter removes it, so an id is never reused
/// while someone still holds it.
#[derive(Debug, Default)]
struct Slab {
    entries: Vec<Option<Slot>>,
    free: Vec<usize>,
    len: usize,
}

impl Slab {
    fn insert(&mut self, slot: Slot) -> u64 {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(slot);
                i as u64
            }
            None => {
                self.entries.push(Some(slot));
                (self.entries.len() - 1) as u64
            }
        }
    }

    fn get_mut(&mut self, id: &u64) -> Option<&mut Slot> {
        self.entries.get_mut(*id as usize).and_then(Option::as_mut)
    }

    fn remove(&mut self, id: &u64) -> Option<Slot> {
        let slot = self.entries.get_mut(*id as usize)?.take()?;
        self.free.push(*id as usize);
        self.len -= 1;
        Some(slot)
    }

    fn values(&self) -> impl Iterator<Item = &Slot> {
        self.entries.iter().flatten()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Index<&u64> for Slab {
    type Output = Slot;

    fn index(&self, id: &u64) -> &Slot {
        self.entries[*id as usize]
            .as_ref()
            .expect("a live waiter id has a slot")
    }
}

impl State {
    /// The limit a class may fill: high priority the whole limit, normal priority the limit
    /// less the reserved share (always leaving it at least one slot).
    #[inline]
    fn class_limit(&self, config: &Config, priority: Priority) -> usize {
        if config.high_priority_share == 0.0 {
            return self.limit;
        }
        match priority {
            Priority::High => self.limit,
            Priority::Normal => {
                let reserved = ((self.limit as f64) * config.high_priority_share).floor() as usize;
                self.limit - reserved.min(self.limit.saturating_sub(1))
            }
        }
    }

    #[inline]
    fn fits(&self, config: &Config, priority: Priority, bytes: u64) -> bool {
        let bytes_fit = match config.max_bytes {
            Some(max) => self.bytes.saturating_add(bytes) <= max,
            None => true,
        };
        bytes_fit && self.in_flight < self.class_limit(config, priority)
    }

    fn waiters_at_or_above(&self, priority: Priority) -> usize {
        match priority {
            Priority::High => self.queues[Priority::High.index()].len(),
            Priority::Normal => self.queued,
        }
    }

    fn lifo_now(&self, config: &Config) -> bool {
        match config.order {
            QueueOrder::Fifo => false,
            QueueOrder::Lifo => true,
            QueueOrder::Adaptive { .. } => self.standing,
        }
    }

    fn retry_after(&self) -> Duration {
        let secs = match self.mean_service {
            Some(mean) => ((self.queued + 1) as f64 * mean / self.limit.max(1) as f64).ceil(),
            None => 1.0,
        };
        Duration::from_secs(secs.clamp(1.0, 3600.0) as u64)
    }

    fn overloaded(&mut self, reason: ShedReason) -> Overloaded {
        self.shed[reason.index()] += 1;
        Overloaded::new(reason, self.limit, self.retry_after())
    }

    /// When a waiting slot must give up, and why.
    fn give_up_at(&self, config: &Config, slot: &Slot) -> Option<(Instant, ShedReason)> {
        let mut timeout = config.queue_timeout;
        if let QueueOrder::Adaptive { target, .. } = config.order {
            if self.standing {
                timeout = Some(timeout.map_or(target, |t| t.min(target)));
            }
        }
        // A timeout too long for the clock (`Duration::MAX`) never expires.
        let queue = timeout
            .and_then(|t| slot.enqueued.checked_add(t))
            .map(|at| (at, ShedReason::QueueTimeout));
        let own = slot.deadline.map(|d| (d, ShedReason::DeadlineUnreachable));
        match (queue, own) {
            (Some(q), Some(o)) => Some(if o.0 <= q.0 { o } else { q }),
            (q, o) => q.or(o),
        }
    }

    fn unlink(&mut self, id: u64, priority: Priority) {
        let queue = &mut self.queues[priority.index()];
        // Newest waiters are the likeliest to leave (client timeouts), so search from the back.
        if let Some(pos) = queue.iter().rposition(|&x| x == id) {
            queue.remove(pos);
            self.queued -= 1;
        }
    }

    /// Tracks whether a standing queue has formed (adaptive order only). On the transition
    /// every waiter is woken, because its give-up time just became shorter.
    fn observe_queue(&mut self, config: &Config, now: Instant, wakers: &mut Wakers) {
        let QueueOrder::Adaptive { interval, .. } = config.order else {
            return;
        };
        if self.queued == 0 {
            self.nonempty_since = None;
            self.standing = false;
            return;
        }
        let since = *self.nonempty_since.get_or_insert(now);
        if !self.standing && now.saturating_duration_since(since) >= interval {
            self.standing = true;
            for slot in self.slots.values() {
                if slot.status == Status::Waiting {
                    if let Some(w) = &slot.waker {
                        wakers.push(w.clone());
                    }
                }
            }
        }
    }

    /// Hands free capacity to waiters, highest class first, in queue order.
    fn dispatch(&mut self, config: &Config, now: Instant, wakers: &mut Wakers) {
        loop {
            let lifo = self.lifo_now(config);
            let mut granted = false;
            for priority in [Priority::High, Priority::Normal] {
                let queue = &self.queues[priority.index()];
                let id = match if lifo { queue.back() } else { queue.front() } {
                    Some(&id) => id,
                    None => continue,
                };
                let bytes = self.slots[&id].bytes;
                if !self.fits(config, priority, bytes) {
                    continue;
                }
                if lifo {
                    self.queues[priority.index()].pop_back();
                } else {
                    self.queues[priority.index()].pop_front();
                }
                self.queued -= 1;
                self.in_flight += 1;
                self.bytes += bytes;
                self.admitted += 1;
                self.peak_in_flight = self.peak_in_flight.max(self.in_flight);
                let slot = self.slots.get_mut(&id).expect("queued id has a slot");
                slot.status = Status::Granted;
                slot.granted_at = now;
                self.queue_wait
                    .record(now.saturating_duration_since(slot.enqueued));
                if let Some(w) = slot.waker.take() {
                    wakers.push(w);
                }
                granted = true;
                break;
            }
            if !granted {
                break;
            }
        }
        self.observe_queue(config, now, wakers);
    }

    /// Returns a slot's resources after its permit ends. The clock is read only if
    /// someone is waiting for them.
    fn release(&mut self, config: &Config, bytes: u64, now: Option<Instant>, wakers: &mut Wakers) {
        self.in_flight -= 1;
        self.bytes -= bytes;
        if self.queued == 0 {
            self.nonempty_since = None;
            self.standing = false;
            return;
        }
        self.dispatch(config, now.unwrap_or_else(Instant::now), wakers);
    }

    /// Whether a request admitted now has its service time measured. Under load (half the
    /// limit in use, or anyone queued), with an adaptive strategy or a deadline, always;
    /// otherwise one request in [`UNTIMED_SAMPLE`], so the uncontended fast path rarely pays
    /// for reading the clock.
    fn times(&mut self, config: &Config, ticket: &Ticket) -> bool {
        if self.in_flight * 2 >= self.limit
            || self.queued > 0
            || ticket.deadline.is_some()
            || !matches!(config.strategy, LimitStrategy::Fixed)
        {
            return true;
        }
        self.untimed = self.untimed.wrapping_add(1);
        self.untimed % UNTIMED_SAMPLE == 0
    }
}

impl Limiter {
    pub(crate) fn new(config: Config) -> Self {
        let limit = match config.strategy {
            LimitStrategy::Fixed => config.max_in_flight,
            LimitStrategy::Aimd(a) => config.max_in_flight.clamp(a.min_limit, a.max_limit),
            LimitStrategy::Gradient(g) => config.max_in_flight.clamp(g.min_limit, g.max_limit),
        };
        let state = State {
            limit,
            max_queued: config.max_queued,
            in_flight: 0,
            bytes: 0,
            queues: [VecDeque::new(), VecDeque::new()],
            slots: Slab::default(),
            queued: 0,
            nonempty_since: None,
            standing: false,
            closed: false,
            untimed: 0,
            admitted: 0,
            shed: [0; ShedReason::ALL.len()],
            peak_in_flight: 0,
            peak_queued: 0,
            queue_wait: Histogram::new(),
            service_time: Histogram::new(),
            mean_service: None,
            adaptive: AdaptiveState::new(limit),
        };
        Limiter {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(state),
            }),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Admits the request now, queues it, or sheds it, reading `clock` only if it must.
    pub(crate) fn admit_with(&self, ticket: Ticket, clock: impl FnMut() -> Instant) -> Admission {
        let config = &self.shared.config;
        let mut wakers = Wakers::new();
        let mut now = LazyNow { clock, now: None };
        let admission = {
            let mut state = lock(&self.shared.state);
            self.admit_locked(&mut state, config, ticket, &mut now, &mut wakers)
        };
        wake_all(wakers);
        admission
    }

    /// [`admit_with`](Self::admit_with) at a known instant.
    #[cfg(test)]
    pub(crate) fn admit(&self, ticket: Ticket, now: Instant) -> Admission {
        self.admit_with(ticket, || now)
    }

    fn admit_locked(
        &self,
        state: &mut State,
        config: &Config,
        ticket: Ticket,
        now: &mut LazyNow<impl FnMut() -> Instant>,
        wakers: &mut Wakers,
    ) -> Admission {
        if state.closed {
            return Admission::Shed(state.overloaded(ShedReason::Closed));
        }
        if config.max_bytes.is_some_and(|max| ticket.bytes > max) {
            return Admission::Shed(state.overloaded(ShedReason::TooLarge));
        }
        if ticket.deadline.is_some_and(|d| d <= now.get()) {
            return Admission::Shed(state.overloaded(ShedReason::DeadlineUnreachable));
        }
        if state.waiters_at_or_above(ticket.priority) == 0
            && state.fits(config, ticket.priority, ticket.bytes)
        {
            state.in_flight += 1;
            state.bytes += ticket.bytes;
            state.admitted += 1;
            state.peak_in_flight = state.peak_in_flight.max(state.in_flight);
            state.queue_wait.record(Duration::ZERO);
            let admitted_at = state.times(config, &ticket).then(|| now.get());
            return Admission::Admitted(Permit::new(self.clone(), ticket, admitted_at));
        }
        if config.queue_timeout == Some(Duration::ZERO) {
            return Admission::Shed(state.overloaded(ShedReason::QueueFull));
        }
        // A high-priority request finding the queue full takes the slot of the newest
        // normal waiter.
        let victim = if state.queued >= state.max_queued {
            let victim = match ticket.priority {
                Priority::High => state.queues[Priority::Normal.index()].back().copied(),
                Priority::Normal => None,
            };
            if victim.is_none() {
                return Admission::Shed(state.overloaded(ShedReason::QueueFull));
            }
            victim
        } else {
            None
        };
        // Before the eviction: a request shed for its deadline must not cost a waiter its place.
        if let (Some(deadline), Some(mean)) = (ticket.deadline, state.mean_service) {
            let ahead = if state.lifo_now(config) {
                match ticket.priority {
                    Priority::High => 0,
                    Priority::Normal => state.queues[Priority::High.index()].len(),
                }
            } else {
                state.waiters_at_or_above(ticket.priority)
            };
            let expected = (ahead + 1) as f64 * mean / state.limit.max(1) as f64;
            if now.get() + Duration::from_secs_f64(expected.min(1e6)) > deadline {
                return Admission::Shed(state.overloaded(ShedReason::DeadlineUnreachable));
            }
        }
        if let Some(victim) = victim {
            state.queues[Priority::Normal.index()].pop_back();
            state.queued -= 1;
            let overloaded = state.overloaded(ShedReason::QueueFull);
            let slot = state.slots.get_mut(&victim).expect("queued id has a slot");
            slot.status = Status::Shed(ShedReason::QueueFull);
            slot.retry_after = overloaded.retry_after();
            if let Some(w) = slot.waker.take() {
                wakers.push(w);
            }
        }
        let now = now.get();
        let id = state.slots.insert(Slot {
            status: Status::Waiting,
            waker: None,
            enqueued: now,
            granted_at: now,
            bytes: ticket.bytes,
            deadline: ticket.deadline,
            retry_after: Duration::ZERO,
        });
        state.queues[ticket.priority.index()].push_back(id);
        state.queued += 1;
        state.peak_queued = state.peak_queued.max(state.queued);
        state.observe_queue(config, now, wakers);
        Admission::Queued(Waiter {
            limiter: self.clone(),
            id,
            ticket,
            done: false,
        })
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State, &Config, &mut Wakers) -> T) -> T {
        let mut wakers = Wakers::new();
        let out = {
            let mut state = lock(&self.shared.state);
            f(&mut state, &self.shared.config, &mut wakers)
        };
        wake_all(wakers);
        out
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let state = lock(&self.shared.state);
        Snapshot {
            in_flight: state.in_flight,
            queued: state.queued,
            limit: state.limit,
            max_queued: state.max_queued,
            bytes_in_flight: state.bytes,
            admitted: state.admitted,
            shed: state.shed,
            peak_in_flight: state.peak_in_flight,
            peak_queued: state.peak_queued,
            queue_wait: state.queue_wait.summary(),
            service_time: state.service_time.summary(),
            closed: state.closed,
        }
    }

    pub(crate) fn set_limit(&self, limit: usize) {
        let limit = limit.max(1);
        self.with_state(|state, config, wakers| {
            state.limit = limit;
            state.adaptive.set(limit);
            state.dispatch(config, Instant::now(), wakers);
        });
    }

    pub(crate) fn set_max_queued(&self, max_queued: usize) {
        self.with_state(|state, _, _| state.max_queued = max_queued);
    }

    pub(crate) fn reset_peaks(&self) {
        self.with_state(|state, _, _| {
            state.peak_in_flight = state.in_flight;
            state.peak_queued = state.queued;
        });
    }

    pub(crate) fn retry_after(&self) -> Duration {
        lock(&self.shared.state).retry_after()
    }

    /// Sheds every waiter with `Closed` and refuses new requests; in-flight requests finish.
    pub(crate) fn close(&self) {
        self.with_state(|state, _, wakers| {
            state.closed = true;
            let ids: Vec<u64> = state.queues.iter_mut().flat_map(|q| q.drain(..)).collect();
            for id in ids {
                state.queued -= 1;
                let overloaded = state.overloaded(ShedReason::Closed);
                let slot = state.slots.get_mut(&id).expect("queued id has a slot");
                slot.status = Status::Shed(ShedReason::Closed);
                slot.retry_after = overloaded.retry_after();
                if let Some(w) = slot.waker.take() {
                    wakers.push(w);
                }
            }
            state.nonempty_since = None;
            state.standing = false;
        });
    }

    /// Charges streamed request-body bytes beyond a permit's reservation; `false` (and no
    /// charge) if they would exceed the budget.
    pub(crate) fn charge_bytes(&self, meter: &MeterState, n: u64) -> bool {
        let mut state = lock(&self.shared.state);
        if meter.released() {
            // The request is over; its bytes no longer count as in flight.
            return true;
        }
        let max = self.shared.config.max_bytes.unwrap_or(u64::MAX);
        if state.bytes.saturating_add(n) > max {
            return false;
        }
        state.bytes += n;
        meter.add(n);
        true
    }
}

/// A point-in-time copy of the counters, read under one lock.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub(crate) in_flight: usize,
    pub(crate) queued: usize,
    pub(crate) limit: usize,
    pub(crate) max_queued: usize,
    pub(crate) bytes_in_flight: u64,
    pub(crate) admitted: u64,
    pub(crate) shed: [u64; ShedReason::ALL.len()],
    pub(crate) peak_in_flight: usize,
    pub(crate) peak_queued: usize,
    pub(crate) queue_wait: Summary,
    pub(crate) service_time: Summary,
    pub(crate) closed: bool,
}

/// Streamed bytes charged to one permit. Only read or written under the limiter's lock;
/// atomics only because it is shared between the permit and the request body.
#[derive(Debug, Default)]
pub(crate) struct MeterState {
    charged: AtomicU64,
    released: AtomicBool,
}

impl MeterState {
    fn released(&self) -> bool {
        self.released.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn add(&self, n: u64) {
        self.charged
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
    fn release(&self) -> u64 {
        self.released
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.charged.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A place in the queue. Polling it resolves to a permit or a shed; dropping it leaves the
/// queue at once (or, if a permit was already handed to it, passes the permit on).
#[derive(Debug)]
pub(crate) struct Waiter {
    limiter: Limiter,
    id: u64,
    ticket: Ticket,
    done: bool,
}

/// What polling a waiter gave.
#[derive(Debug)]
pub(crate) enum WaitPoll {
    Ready(Result<Permit, Overloaded>),
    /// Still queued; poll again when woken or at this instant (if any).
    Pending(Option<Instant>),
}

impl Waiter {
    /// `clock` is read only if the waiter has a give-up time to check.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, clock: impl Fn() -> Instant) -> WaitPoll {
        assert!(!self.done, "waiter polled after completion");
        let limiter = self.limiter.clone();
        let mut wakers = Wakers::new();
        let result = {
            let mut guard = lock(&limiter.shared.state);
            let state = &mut *guard;
            let config = &limiter.shared.config;
            let slot = state
                .slots
                .get_mut(&self.id)
                .expect("a waiter's slot lives until the waiter completes");
            match slot.status {
                Status::Granted => {
                    let granted_at = slot.granted_at;
                    state.slots.remove(&self.id);
                    self.done = true;
                    WaitPoll::Ready(Ok(Permit::new(
                        limiter.clone(),
                        self.ticket,
                        Some(granted_at),
                    )))
                }
                Status::Shed(reason) => {
                    let retry_after = slot.retry_after;
                    state.slots.remove(&self.id);
                    self.done = true;
                    WaitPoll::Ready(Err(Overloaded::new(reason, state.limit, retry_after)))
                }
                Status::Waiting => {
                    let give_up = state.give_up_at(config, &state.slots[&self.id]);
                    let now = give_up.map(|_| clock());
                    match give_up {
                        Some((at, reason)) if now.is_some_and(|now| at <= now) => {
                            let now = now.expect("checked by the guard");
                            state.slots.remove(&self.id);
                            state.unlink(self.id, self.ticket.priority);
                            self.done = true;
                            let overloaded = state.overloaded(reason);
                            state.dispatch(config, now, &mut wakers);
                            WaitPoll::Ready(Err(overloaded))
                        }
                        _ => {
                            let slot = state.slots.get_mut(&self.id).expect("checked above");
                            match &mut slot.waker {
                                Some(w) if w.will_wake(cx.waker()) => {}
                                w => *w = Some(cx.waker().clone()),
                            }
                            WaitPoll::Pending(give_up.map(|(at, _)| at))
                        }
                    }
                }
            }
        };
        wake_all(wakers);
        result
    }

    /// Convenience for callers without a timer (tests, loom models).
    #[cfg(test)]
    pub(crate) fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<Result<Permit, Overloaded>> {
        match self.poll(cx, Instant::now) {
            WaitPoll::Ready(r) => Poll::Ready(r),
            WaitPoll::Pending(_) => Poll::Pending,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let id = self.id;
        let priority = self.ticket.priority;
        self.limiter.with_state(|state, config, wakers| {
            let Some(slot) = state.slots.remove(&id) else {
                return;
            };
            let now = Instant::now();
            match slot.status {
                Status::Waiting => {
                    state.unlink(id, priority);
                    // Leaving may unblock a smaller request stuck behind this one's bytes.
                    state.dispatch(config, now, wakers);
                }
                Status::Granted => state.release(config, slot.bytes, Some(now), wakers),
                Status::Shed(_) => {}
            }
        });
    }
}

/// The right to be inside the inner service. Dropping it returns the slot (and the bytes)
/// and hands them to the next waiter.
#[derive(Debug)]
pub(crate) struct Permit {
    limiter: Limiter,
    bytes: u64,
    /// Set when this request's service time is measured (see `State::times`).
    admitted_at: Option<Instant>,
    outcome: Outcome,
    completed: bool,
    meter: Option<Arc<MeterState>>,
}

impl Permit {
    fn new(limiter: Limiter, ticket: Ticket, admitted_at: Option<Instant>) -> Self {
        Permit {
            limiter,
            bytes: ticket.bytes,
            admitted_at,
            outcome: Outcome::Ignore,
            completed: false,
            meter: None,
        }
    }

    pub(crate) fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Records how the request went; used by adaptive limits when the permit is released.
    pub(crate) fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    /// Marks the work covered by this permit as finished (rather than abandoned), so its
    /// outcome is sampled.
    pub(crate) fn complete(&mut self) {
        self.completed = true;
    }

    /// Shares a streamed-bytes meter with the request body.
    pub(crate) fn meter(&mut self) -> Arc<MeterState> {
        self.meter
            .get_or_insert_with(|| Arc::new(MeterState::default()))
            .clone()
    }

    pub(crate) fn reserved_bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let timing = self.admitted_at.map(|at| {
            let now = Instant::now();
            (now, now.saturating_duration_since(at))
        });
        let outcome = if self.completed {
            self.outcome
        } else {
            Outcome::Ignore
        };
        let meter = self.meter.take();
        let reserved = self.bytes;
        self.limiter.with_state(|state, config, wakers| {
            // Under the lock, like `charge_bytes`: a charge is either counted here or sees
            // the meter released and skipped, never both missed.
            let bytes = reserved + meter.as_ref().map_or(0, |m| m.release());
            if let Some((now, elapsed)) = timing {
                if outcome == Outcome::Success {
                    state.service_time.record(elapsed);
                    let secs = elapsed.as_secs_f64();
                    state.mean_service = Some(match state.mean_service {
                        Some(m) => m * 0.9 + secs * 0.1,
                        None => secs,
                    });
                }
                let in_flight = state.in_flight;
                if let Some(limit) =
                    state
                        .adaptive
                        .sample(&config.strategy, now, elapsed, outcome, in_flight)
                {
                    state.limit = limit;
                }
            }
            state.release(config, bytes, timing.map(|(now, _)| now), wakers);
        });
    }
}

/// Reads the clock at most once, and only when asked.
struct LazyNow<F> {
    clock: F,
    now: Option<Instant>,
}

impl<F: FnMut() -> Instant> LazyNow<F> {
    fn get(&mut self) -> Instant {
        match self.now {
            Some(now) => now,
            None => *self.now.insert((self.clock)()),
        }
    }
}

/// At low load, one request in this many has its service time measured.
const UNTIMED_SAMPLE: u32 = 16;

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::task::Context;

    fn ticket() -> Ticket {
        Ticket {
            priority: Priority::Normal,
            bytes: 0,
            deadline: None,
        }
    }

    fn queued(a: Admission) -> Waiter {
        match a {
            Admission::Queued(w) => w,
            other => panic!("expected queued, got {other:?}"),
        }
    }

    fn admitted(a: Admission) -> Permit {
        match a {
            Admission::Admitted(p) => p,
            other => panic!("expected admitted, got {other:?}"),
        }
    }

    fn shed(a: Admission) -> Overloaded {
        match a {
            Admission::Shed(o) => o,
            other => panic!("expected shed, got {other:?}"),
        }
    }

    #[test]
    fn dropping_a_queued_waiter_frees_its_slot_at_once() {
        let mut config = Config::new(1);
        config.max_queued = 2;
        let limiter = Limiter::new(config);
        let now = Instant::now();
        let permit = admitted(limiter.admit(ticket(), now));
        let a = queued(limiter.admit(ticket(), now));
        let b = queued(limiter.admit(ticket(), now));
        shed(limiter.admit(ticket(), now));
        assert_eq!(limiter.snapshot().queued, 2);
        drop(a);
        assert_eq!(limiter.snapshot().queued, 1);
        // The freed slot is usable straight away.
        let c = queued(limiter.admit(ticket(), now));
        drop(b);
        drop(c);
        drop(permit);
        let s = limiter.snapshot();
        assert_eq!((s.in_flight, s.queued), (0, 0));
        assert!(limiter.shared.state.lock().unwrap().slots.is_empty());
    }

    #[test]
    fn a_granted_waiter_that_is_dropped_passes_its_permit_on() {
        let limiter = Limiter::new(Config::new(1));
        let now = Instant::now();
        let permit = admitted(limiter.admit(ticket(), now));
        let first = queued(limiter.admit(ticket(), now));
        drop(permit);
        // `first` now owns the slot without having observed it.
        assert_eq!(limiter.snapshot().in_flight, 1);
        let mut second = queued(limiter.admit(ticket(), now));
        drop(first);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let permit = match second.poll_permit(&mut cx) {
            Poll::Ready(Ok(p)) => p,
            other => panic!("{other:?}"),
        };
        drop(permit);
        let s = limiter.snapshot();
        assert_eq!((s.in_flight, s.queued), (0, 0));
    }

    #[test]
    fn high_priority_takes_reserved_share_and_evicts_normal_waiters() {
        let mut config = Config::new(4);
        config.high_priority_share = 0.5;
        config.max_queued = 1;
        let limiter = Limiter::new(config);
        let now = Instant::now();
        let high = Ticket {
            priority: Priority::High,
            ..ticket()
        };
        let _n1 = admitted(limiter.admit(ticket(), now));
        let _n2 = admitted(limiter.admit(ticket(), now));
        // Normal requests may only use 4 - 2 slots.
        let mut normal_waiter = queued(limiter.admit(ticket(), now));
        let _h1 = admitted(limiter.admit(high, now));
        let _h2 = admitted(limiter.admit(high, now));
        // Queue full of a normal waiter: a high-priority request evicts it.
        let _h3 = queued(limiter.admit(high, now));
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match normal_waiter.poll_permit(&mut cx) {
            Poll::Ready(Err(o)) => assert_eq!(o.reason(), ShedReason::QueueFull),
            other => panic!("{other:?}"),
        }
        // And a normal request finds the queue full.
        assert_eq!(
            shed(limiter.admit(ticket(), now)).reason(),
            ShedReason::QueueFull
        );
    }

    #[test]
    fn a_high_priority_request_shed_for_its_deadline_evicts_nobody() {
        let mut config = Config::new(1);
        config.max_queued = 1;
        let limiter = Limiter::new(config);
        let now = Instant::now();
        // Each request takes 10 s at the current drain rate.
        lock(&limiter.shared.state).mean_service = Some(10.0);
        let _busy = admitted(limiter.admit(ticket(), now));
        let mut normal = queued(limiter.admit(ticket(), now));
        let hurried = Ticket {
            priority: Priority::High,
            deadline: Some(now + Duration::from_secs(1)),
            ..ticket()
        };
        assert_eq!(
            shed(limiter.admit(hurried, now)).reason(),
            ShedReason::DeadlineUnreachable
        );
        // The normal waiter keeps its place: nobody took it.
        assert_eq!(limiter.snapshot().queued, 1);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(normal.poll_permit(&mut cx).is_pending());
        assert_eq!(limiter.snapshot().shed[ShedReason::QueueFull.index()], 0);
    }

    #[test]
    fn byte_budget_admits_by_declared_size() {
        let mut config = Config::new(10);
        config.max_bytes = Some(100);
        let limiter = Limiter::new(config);
        let now = Instant::now();
        let sized = |bytes| Ticket { bytes, ..ticket() };
        assert_eq!(
            shed(limiter.admit(sized(101), now)).reason(),
            ShedReason::TooLarge
        );
        let a = admitted(limiter.admit(sized(60), now));
        let mut b = queued(limiter.admit(sized(60), now));
        assert_eq!(limiter.snapshot().bytes_in_flight, 60);
        drop(a);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let b = match b.poll_permit(&mut cx) {
            Poll::Ready(Ok(p)) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(b.reserved_bytes(), 60);
        drop(b);
        assert_eq!(limiter.snapshot().bytes_in_flight, 0);
    }

    #[test]
    fn closing_sheds_waiters_and_newcomers() {
        let limiter = Limiter::new(Config::new(1));
        let now = Instant::now();
        let permit = admitted(limiter.admit(ticket(), now));
        let mut w = queued(limiter.admit(ticket(), now));
        limiter.close();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match w.poll_permit(&mut cx) {
            Poll::Ready(Err(o)) => assert_eq!(o.reason(), ShedReason::Closed),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            shed(limiter.admit(ticket(), now)).reason(),
            ShedReason::Closed
        );
        drop(permit);
        assert_eq!(limiter.snapshot().in_flight, 0);
    }
}
