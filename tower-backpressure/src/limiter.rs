//! The shared admission state: a counting limit with a lock-free fast path, a bounded queue
//! of waiters with direct hand-off, a byte budget, and the statistics behind the handle.
//!
//! The number of permits out lives in one atomic word together with a `LOCKED` flag (and
//! the number of admissions, so counting them costs nothing more). While the flag is clear,
//! a request is admitted and released with one compare-and-swap each and never touches the
//! mutex: that is the uncontended path. The flag is set, under the mutex, whenever that
//! would be wrong: someone is queued (a released permit must be handed to
//! them), the limiter is closed, or the configuration needs every admission under the lock
//! (bytes are counted, or the limit is adaptive). While it is set the count only changes
//! under the mutex.
//!
//! A request that finds no free slot sets the flag in the same compare-and-swap that observes
//! the count, before it queues. A permit released concurrently therefore either frees the
//! slot first (the compare-and-swap fails, and the request takes the slot) or sees the flag
//! and releases under the mutex, handing the slot straight to the waiter chosen by the queue
//! order (its status becomes `Granted`): no wake-up is lost, a newcomer can never steal a slot
//! a waiter was promised, and a waiter dropped after being granted passes its slot on.
//!
//! Everything else (the queue, the byte budget, shed counts, latency histograms) lives behind
//! the mutex, held for a few dozen instructions at a time; wakers are collected under the
//! lock and woken after it is released.

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

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};

// The layout of `Shared::word`, low to high: 31 bits of permits out, the `LOCKED` flag, and
// 32 bits counting admissions (wrapping; `Shared::admission_epochs` counts the wraps).
/// The flag bit: admissions and releases must take the mutex.
const LOCKED: u64 = 1 << 31;
/// The count bits: permits out.
const COUNT: u64 = LOCKED - 1;
/// The count and the flag: compared with a limit, this is at least the limit whenever the
/// flag is set, so one comparison tests both.
const LOW: u64 = u32::MAX as u64;
/// One admission in the counting bits.
const ADMISSION: u64 = 1 << 32;
/// The largest limit; far beyond any real one, and it keeps the count clear of the flag.
const MAX_LIMIT: usize = 1 << 30;

/// Everything about a limiter that does not change after it is built.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) max_in_flight: usize,
    pub(crate) max_queued: usize,
    pub(crate) queue_timeout: Option<Duration>,
    pub(crate) order: QueueOrder,
    pub(crate) high_priority_share: f64,
    pub(crate) max_bytes: Option<u64>,
    /// Whether bytes are counted: a byte budget, or request bodies metered without one.
    pub(crate) track_bytes: bool,
    pub(crate) strategy: LimitStrategy,
    /// How HTTP responses are answered and classified (unused by the typed service).
    pub(crate) http: HttpResponse,
}

/// The HTTP settings a response future needs, reached through its permit's limiter so the
/// future itself carries none.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HttpResponse {
    pub(crate) shed_status: http::StatusCode,
    pub(crate) release: crate::builder::PermitRelease,
    pub(crate) classify: fn(http::StatusCode) -> Outcome,
}

impl Config {
    pub(crate) fn new(max_in_flight: usize) -> Self {
        let max_in_flight = max_in_flight.clamp(1, MAX_LIMIT);
        Config {
            max_in_flight,
            max_queued: max_in_flight,
            queue_timeout: Some(Duration::from_secs(1)),
            order: QueueOrder::Fifo,
            high_priority_share: 0.0,
            max_bytes: None,
            track_bytes: false,
            strategy: LimitStrategy::Fixed,
            http: HttpResponse {
                shed_status: http::StatusCode::SERVICE_UNAVAILABLE,
                release: crate::builder::PermitRelease::BodyEnd,
                classify: crate::adaptive::classify_status,
            },
        }
    }

    fn adaptive(&self) -> bool {
        !matches!(self.strategy, LimitStrategy::Fixed)
    }

    /// The limit a class may fill: high priority the whole limit, normal priority the limit
    /// less the reserved share (always leaving it at least one slot).
    #[inline]
    fn class_limit(&self, limit: usize, priority: Priority) -> usize {
        if self.high_priority_share == 0.0 {
            return limit;
        }
        match priority {
            Priority::High => limit,
            Priority::Normal => {
                let reserved = ((limit as f64) * self.high_priority_share).floor() as usize;
                limit - reserved.min(limit.saturating_sub(1))
            }
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
    bytes: u64,
    /// Waiter ids per priority class, oldest first; index by `Priority::index`.
    queues: [VecDeque<u64>; 2],
    /// Waiters per class that reserve no bytes: they may pass a waiter held up by the byte
    /// budget (see `State::next_to_serve`).
    zero_byte_waiters: [usize; 2],
    slots: Slab<Slot>,
    /// The permits of a byte-tracking limiter (see `Config::track_bytes`).
    reservations: Slab<Reservation>,
    queued: usize,
    /// Adaptive order: since when the queue has not been empty, and whether that has
    /// lasted a full interval (a standing queue).
    nonempty_since: Option<Instant>,
    standing: bool,
    closed: bool,
    // Statistics.
    shed: [u64; ShedReason::ALL.len()],
    peak_queued: usize,
    /// Waits of requests admitted from the queue; those admitted at once are counted as
    /// zeros when the summary is read.
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
    /// Whether every admission must take the mutex: a byte budget or an adaptive limit.
    always_locked: bool,
    /// Permits out, the `LOCKED` flag and admissions; see the module docs.
    word: AtomicU64,
    /// How many times the admissions in `word` wrapped.
    admission_epochs: AtomicU64,
    /// The count below which a request may be admitted without the lock: the limit less
    /// the high-priority reserve. Written under the mutex whenever the limit changes.
    fast_limit: AtomicU64,
    peak_in_flight: AtomicU64,
    /// When the limiter was built; permits store their admission time relative to it.
    epoch: Instant,
    state: Mutex<State>,
}

impl Shared {
    #[inline]
    fn in_flight(&self) -> usize {
        (self.word.load(Acquire) & COUNT) as usize
    }

    /// Requests admitted so far (a hair low for the instant the counting bits wrap).
    fn admitted(&self) -> u64 {
        let epochs = self.admission_epochs.load(Acquire);
        (epochs << 32) + (self.word.load(Acquire) >> 32)
    }

    /// Takes a permit without the lock if the flag is clear and a slot is free.
    #[inline]
    fn try_acquire_fast(&self) -> Option<Admitted> {
        let limit = self.fast_limit.load(Relaxed);
        let mut word = self.word.load(Relaxed);
        loop {
            // With the flag set this exceeds every limit, so one test covers both.
            if word & LOW >= limit {
                return None;
            }
            match self.word.compare_exchange(
                word,
                word.wrapping_add(ADMISSION + 1),
                AcqRel,
                Relaxed,
            ) {
                Ok(_) => return Some(self.admitted_from(word)),
                Err(actual) => word = actual,
            }
        }
    }

    /// Book-keeping for the admission that found `word` and added one permit and one
    /// admission to it.
    #[inline]
    fn admitted_from(&self, word: u64) -> Admitted {
        let number = word >> 32;
        if number == u64::from(u32::MAX) {
            self.admission_epochs.fetch_add(1, AcqRel);
        }
        let in_flight = (word & COUNT) + 1;
        if in_flight > self.peak_in_flight.load(Relaxed) {
            self.peak_in_flight.fetch_max(in_flight, Relaxed);
        }
        Admitted { number }
    }

    /// Returns a permit without the lock if the flag is clear.
    #[inline]
    fn release_fast(&self) -> bool {
        let mut word = self.word.load(Relaxed);
        loop {
            if word & LOCKED != 0 {
                return false;
            }
            match self.word.compare_exchange(word, word - 1, AcqRel, Relaxed) {
                Ok(_) => return true,
                Err(actual) => word = actual,
            }
        }
    }

    /// Under the lock: takes a permit if fewer than `limit` are out (returning the new
    /// count), or sets the flag in the same step that saw them all taken, so that every
    /// release from now on goes through the lock and finds whoever queues next.
    fn acquire_or_lock(&self, limit: usize) -> Option<Admitted> {
        let mut word = self.word.load(Acquire);
        loop {
            let take = word & COUNT < limit as u64;
            let next = if take {
                word.wrapping_add(ADMISSION + 1)
            } else if word & LOCKED != 0 {
                return None;
            } else {
                word | LOCKED
            };
            match self.word.compare_exchange(word, next, AcqRel, Acquire) {
                Ok(_) if take => return Some(self.admitted_from(word)),
                Ok(_) => return None,
                Err(actual) => word = actual,
            }
        }
    }

    /// Under the lock, with the flag set: adds one permit and one admission. Nobody else
    /// changes the word then (the lock-free paths only compare-and-swap a word without the
    /// flag), so a load and a store do.
    fn acquire_locked(&self) -> Admitted {
        let word = self.word.load(Acquire);
        debug_assert!(
            word & LOCKED != 0,
            "the count is ours only while the flag is set"
        );
        self.word.store(word.wrapping_add(ADMISSION + 1), Release);
        self.admitted_from(word)
    }

    /// Under the lock: returns one permit.
    fn release_locked(&self) {
        let word = self.word.load(Acquire);
        if word & LOCKED != 0 {
            // Ours alone, as in `acquire_locked`.
            self.word.store(word - 1, Release);
        } else {
            self.word.fetch_sub(1, AcqRel);
        }
    }

    /// Under the lock, after every change: the flag is set exactly while someone is queued,
    /// the limiter is closed, or the configuration needs the lock for every request.
    fn sync_flag(&self, state: &State) {
        let want = state.queued > 0 || state.closed || self.always_locked;
        let locked = self.word.load(Acquire) & LOCKED != 0;
        if want && !locked {
            self.word.fetch_or(LOCKED, AcqRel);
        } else if !want && locked {
            self.word.fetch_and(!LOCKED, AcqRel);
        }
    }

    /// Whether a request admitted at once has its service time measured: always with an
    /// adaptive strategy (it needs every sample), otherwise one in [`TIMING_SAMPLE`], so
    /// the lock-free path rarely reads the clock or takes the lock. (Requests admitted from
    /// the queue are always measured: their release takes the lock anyway.)
    #[inline]
    fn times(&self, admitted: Admitted) -> bool {
        admitted.number % TIMING_SAMPLE == 0 || self.config.adaptive()
    }
}

/// One admission, numbered modulo 2^32.
#[derive(Clone, Copy, Debug)]
struct Admitted {
    number: u64,
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

/// Entries by id: waiter slots, and the byte reservations of permits. Only an entry's owner
/// removes it, so an id is never reused while someone still holds it.
#[derive(Debug)]
struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, entry: T) -> u64 {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(entry);
                i as u64
            }
            None => {
                self.entries.push(Some(entry));
                (self.entries.len() - 1) as u64
            }
        }
    }

    fn get_mut(&mut self, id: &u64) -> Option<&mut T> {
        self.entries.get_mut(*id as usize).and_then(Option::as_mut)
    }

    fn remove(&mut self, id: &u64) -> Option<T> {
        let entry = self.entries.get_mut(*id as usize)?.take()?;
        self.free.push(*id as usize);
        self.len -= 1;
        Some(entry)
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().flatten()
    }

    #[cfg(all(test, not(loom)))]
    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> std::ops::Index<&u64> for Slab<T> {
    type Output = T;

    fn index(&self, id: &u64) -> &T {
        self.entries[*id as usize]
            .as_ref()
            .expect("a live id has an entry")
    }
}

/// What a permit of a byte-tracking limiter holds, kept in the limiter (under its lock)
/// so that every permit is two words.
#[derive(Debug)]
struct Reservation {
    bytes: u64,
    meter: Option<Arc<MeterState>>,
    /// Set when this request's service time is measured.
    admitted_at: Option<Instant>,
}

impl State {
    #[inline]
    fn bytes_fit(&self, config: &Config, bytes: u64) -> bool {
        match config.max_bytes {
            Some(max) => self.bytes.saturating_add(bytes) <= max,
            None => true,
        }
    }

    fn waiters_at_or_above(&self, priority: Priority) -> usize {
        match priority {
            Priority::High => self.queues[Priority::High.index()].len(),
            Priority::Normal => self.queued,
        }
    }

    /// Whether a newcomer may be admitted while requests of its class (or higher) wait.
    /// Waiters are only ever left waiting while nothing can be handed to them, so when a
    /// slot is free for the newcomer, everyone ahead of it is held up by the byte budget,
    /// and a request that reserves no bytes may pass them (see `next_to_serve`).
    fn may_pass_waiters(&self, config: &Config, ticket: &Ticket) -> bool {
        self.waiters_at_or_above(ticket.priority) == 0
            || (config.max_bytes.is_some() && ticket.bytes == 0)
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

    fn set_limit(&mut self, shared: &Shared, limit: usize) {
        let limit = limit.clamp(1, MAX_LIMIT);
        self.limit = limit;
        let fast_limit = shared.config.class_limit(limit, Priority::Normal);
        shared.fast_limit.store(fast_limit as u64, Relaxed);
    }

    /// When a waiting slot must give up, and why.
    fn give_up_at(&self, config: &Config, slot: &Slot) -> Option<(Instant, ShedReason)> {
        let mut timeout = config.queue_timeout;
        if let QueueOrder::Adaptive { target, .. } = config.order {
            if self.standing {
                timeout = Some(timeout.map_or(target, |t| t.min(target)));
            }
        }
        give_up(timeout, slot)
    }

    /// The waiter that a newcomer finding the queue full displaces: the one that would be
    /// served last, provided the newcomer would be served before it. So in FIFO order a
    /// newcomer only displaces a lower class (its newest waiter); in LIFO order, where the
    /// newcomer is served first, it displaces the oldest waiter of its own class or below.
    fn eviction_victim(&self, priority: Priority, lifo: bool) -> Option<(Priority, u64)> {
        let lowest = [Priority::Normal, Priority::High]
            .into_iter()
            .find(|p| !self.queues[p.index()].is_empty())?;
        let queue = &self.queues[lowest.index()];
        let last_served = if lifo { queue.front() } else { queue.back() };
        let newcomer_first = lowest < priority || (lowest == priority && lifo);
        newcomer_first.then(|| (lowest, *last_served.expect("queue is not empty")))
    }

    fn unlink(&mut self, id: u64, priority: Priority, bytes: u64) {
        let queue = &mut self.queues[priority.index()];
        // Newest waiters are the likeliest to leave (client timeouts), so search from the back.
        if let Some(pos) = queue.iter().rposition(|&x| x == id) {
            queue.remove(pos);
            self.queued -= 1;
            if bytes == 0 {
                self.zero_byte_waiters[priority.index()] -= 1;
            }
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

    /// The waiter to admit next, if any can be: the highest class first, in queue order.
    ///
    /// The byte budget is handed out strictly in that order, so a request with a large
    /// body is never starved by smaller ones: a waiter that reserves bytes and does not fit
    /// holds up every later waiter that reserves bytes. It does not hold up waiters that
    /// reserve none, since they cannot delay it; they are admitted past it while slots are
    /// free.
    fn next_to_serve(&self, shared: &Shared) -> Option<(Priority, usize)> {
        let config = &shared.config;
        let in_flight = shared.in_flight();
        let lifo = self.lifo_now(config);
        let mut bytes_held = false;
        for priority in [Priority::High, Priority::Normal] {
            let queue = &self.queues[priority.index()];
            if queue.is_empty() || in_flight >= config.class_limit(self.limit, priority) {
                continue;
            }
            let n = queue.len();
            for i in 0..n {
                let pos = if lifo { n - 1 - i } else { i };
                let bytes = self.slots[&queue[pos]].bytes;
                if bytes == 0 || (!bytes_held && self.bytes_fit(config, bytes)) {
                    return Some((priority, pos));
                }
                bytes_held = true;
                if self.zero_byte_waiters[priority.index()] == 0 {
                    break;
                }
            }
        }
        None
    }

    /// Hands free capacity to waiters (see `next_to_serve`). Only called while someone is
    /// queued, so the flag is set and the count is ours to change.
    fn dispatch(&mut self, shared: &Shared, now: Instant, wakers: &mut Wakers) {
        while let Some((priority, pos)) = self.next_to_serve(shared) {
            let id = self.queues[priority.index()]
                .remove(pos)
                .expect("position from next_to_serve");
            self.queued -= 1;
            let slot = self.slots.get_mut(&id).expect("queued id has a slot");
            if slot.bytes == 0 {
                self.zero_byte_waiters[priority.index()] -= 1;
            }
            slot.status = Status::Granted;
            slot.granted_at = now;
            let (bytes, enqueued, waker) = (slot.bytes, slot.enqueued, slot.waker.take());
            self.bytes += bytes;
            shared.acquire_locked();
            self.queue_wait
                .record(now.saturating_duration_since(enqueued));
            if let Some(w) = waker {
                wakers.push(w);
            }
        }
        self.observe_queue(&shared.config, now, wakers);
    }

    /// Returns a slot's resources after its permit ends. The clock is read only if
    /// someone is waiting for them.
    fn release(&mut self, shared: &Shared, bytes: u64, now: Option<Instant>, wakers: &mut Wakers) {
        self.bytes -= bytes;
        shared.release_locked();
        if self.queued == 0 {
            self.nonempty_since = None;
            self.standing = false;
            return;
        }
        self.dispatch(shared, now.unwrap_or_else(Instant::now), wakers);
    }
}

/// The earlier of the queue timeout (from when the slot was queued) and the request's own
/// deadline, with the reason for giving up at it.
fn give_up(timeout: Option<Duration>, slot: &Slot) -> Option<(Instant, ShedReason)> {
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

impl Limiter {
    pub(crate) fn new(mut config: Config) -> Self {
        config.track_bytes |= config.max_bytes.is_some();
        let limit = match config.strategy {
            LimitStrategy::Fixed => config.max_in_flight,
            LimitStrategy::Aimd(a) => config.max_in_flight.clamp(a.min_limit, a.max_limit),
            LimitStrategy::Gradient(g) => config.max_in_flight.clamp(g.min_limit, g.max_limit),
        }
        .clamp(1, MAX_LIMIT);
        let always_locked = config.track_bytes || config.adaptive();
        let state = State {
            limit,
            max_queued: config.max_queued,
            bytes: 0,
            queues: [VecDeque::new(), VecDeque::new()],
            zero_byte_waiters: [0; 2],
            slots: Slab::default(),
            reservations: Slab::default(),
            queued: 0,
            nonempty_since: None,
            standing: false,
            closed: false,
            shed: [0; ShedReason::ALL.len()],
            peak_queued: 0,
            queue_wait: Histogram::new(),
            service_time: Histogram::new(),
            mean_service: None,
            adaptive: AdaptiveState::new(limit),
        };
        Limiter {
            shared: Arc::new(Shared {
                fast_limit: AtomicU64::new(config.class_limit(limit, Priority::Normal) as u64),
                word: AtomicU64::new(if always_locked { LOCKED } else { 0 }),
                admission_epochs: AtomicU64::new(0),
                peak_in_flight: AtomicU64::new(0),
                epoch: Instant::now(),
                always_locked,
                config,
                state: Mutex::new(state),
            }),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Admits the request now, queues it, or sheds it, reading `clock` only if it must.
    #[inline(always)]
    pub(crate) fn admit_with(
        &self,
        mut ticket: Ticket,
        clock: impl FnMut() -> Instant,
    ) -> Admission {
        let shared = &*self.shared;
        if !shared.config.track_bytes {
            ticket.bytes = 0;
        }
        let mut now = LazyNow { clock, now: None };
        // The lock-free path; a request whose deadline has passed goes on to be shed.
        if !ticket.deadline.is_some_and(|d| d <= now.get()) {
            if let Some(admitted) = shared.try_acquire_fast() {
                return Admission::Admitted(self.permit(admitted, &mut now));
            }
        }
        self.admit_slow(ticket, &mut now)
    }

    /// The lock-free path alone, for a normal-priority request with no deadline and no
    /// bytes to reserve: a permit if one is free and nobody waits.
    #[inline(always)]
    pub(crate) fn try_admit(&self) -> Option<Permit> {
        let admitted = self.shared.try_acquire_fast()?;
        Some(self.permit(
            admitted,
            &mut LazyNow {
                clock: Instant::now,
                now: None,
            },
        ))
    }

    #[inline(never)]
    fn admit_slow(&self, ticket: Ticket, now: &mut LazyNow<impl FnMut() -> Instant>) -> Admission {
        self.with_state(|state, _, wakers| self.admit_locked(state, ticket, now, wakers))
    }

    /// The permit of an admission by a limiter that does not count bytes.
    #[inline(always)]
    fn permit(&self, admitted: Admitted, now: &mut LazyNow<impl FnMut() -> Instant>) -> Permit {
        let word = if self.shared.times(admitted) {
            PermitWord::timed(self.shared.epoch, now.get())
        } else {
            PermitWord::UNTIMED
        };
        Permit {
            limiter: self.clone(),
            word,
        }
    }

    /// A permit of a byte-tracking limiter: its reservation stays with the limiter.
    fn reserved_permit(
        &self,
        state: &mut State,
        bytes: u64,
        admitted_at: Option<Instant>,
    ) -> Permit {
        let id = state.reservations.insert(Reservation {
            bytes,
            meter: None,
            admitted_at,
        });
        Permit {
            limiter: self.clone(),
            word: PermitWord::reservation(id),
        }
    }

    /// [`admit_with`](Self::admit_with) at a known instant.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn admit(&self, ticket: Ticket, now: Instant) -> Admission {
        self.admit_with(ticket, || now)
    }

    fn admit_locked(
        &self,
        state: &mut State,
        ticket: Ticket,
        now: &mut LazyNow<impl FnMut() -> Instant>,
        wakers: &mut Wakers,
    ) -> Admission {
        let shared = &*self.shared;
        let config = &shared.config;
        if state.closed {
            return Admission::Shed(state.overloaded(ShedReason::Closed));
        }
        if config.max_bytes.is_some_and(|max| ticket.bytes > max) {
            return Admission::Shed(state.overloaded(ShedReason::TooLarge));
        }
        if ticket.deadline.is_some_and(|d| d <= now.get()) {
            return Admission::Shed(state.overloaded(ShedReason::DeadlineUnreachable));
        }
        if state.may_pass_waiters(config, &ticket) && state.bytes_fit(config, ticket.bytes) {
            let limit = config.class_limit(state.limit, ticket.priority);
            // Either takes a slot or sets the flag, so no release can be missed from here on.
            if let Some(admitted) = shared.acquire_or_lock(limit) {
                if !config.track_bytes {
                    return Admission::Admitted(self.permit(admitted, now));
                }
                state.bytes += ticket.bytes;
                let timed = shared.times(admitted);
                let permit = self.reserved_permit(state, ticket.bytes, timed.then(|| now.get()));
                return Admission::Admitted(permit);
            }
        }
        if config.queue_timeout == Some(Duration::ZERO) {
            return Admission::Shed(state.overloaded(ShedReason::QueueFull));
        }
        // A full queue sheds whoever would be served last: the newcomer, or the waiter it
        // would be served before (see `eviction_victim`).
        let lifo = state.lifo_now(config);
        let victim = if state.queued >= state.max_queued {
            match state.eviction_victim(ticket.priority, lifo) {
                Some(victim) => Some(victim),
                None => return Admission::Shed(state.overloaded(ShedReason::QueueFull)),
            }
        } else {
            None
        };
        // Before the eviction: a request shed for its deadline must not cost a waiter its place.
        if let (Some(deadline), Some(mean)) = (ticket.deadline, state.mean_service) {
            let ahead = if lifo {
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
        if let Some((priority, victim)) = victim {
            let bytes = state.slots[&victim].bytes;
            state.unlink(victim, priority, bytes);
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
        if ticket.bytes == 0 {
            state.zero_byte_waiters[ticket.priority.index()] += 1;
        }
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

    /// Runs `f` under the lock, brings the flag up to date, then wakes whoever `f` chose.
    fn with_state<T>(&self, f: impl FnOnce(&mut State, &Shared, &mut Wakers) -> T) -> T {
        let mut wakers = Wakers::new();
        let out = {
            let mut state = lock(&self.shared.state);
            let out = f(&mut state, &self.shared, &mut wakers);
            self.shared.sync_flag(&state);
            out
        };
        wake_all(wakers);
        out
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let shared = &*self.shared;
        let state = lock(&shared.state);
        let admitted = shared.admitted();
        let queued_admissions = state.queue_wait.count();
        Snapshot {
            in_flight: shared.in_flight(),
            queued: state.queued,
            limit: state.limit,
            max_queued: state.max_queued,
            bytes_in_flight: state.bytes,
            admitted,
            shed: state.shed,
            peak_in_flight: shared.peak_in_flight.load(Relaxed) as usize,
            peak_queued: state.peak_queued,
            queue_wait: state
                .queue_wait
                .summary_with_zeros(admitted.saturating_sub(queued_admissions)),
            service_time: state.service_time.summary(),
            closed: state.closed,
        }
    }

    pub(crate) fn set_limit(&self, limit: usize) {
        self.with_state(|state, shared, wakers| {
            state.set_limit(shared, limit);
            state.adaptive.set(state.limit);
            if state.queued > 0 {
                state.dispatch(shared, Instant::now(), wakers);
            }
        });
    }

    pub(crate) fn set_max_queued(&self, max_queued: usize) {
        self.with_state(|state, _, _| state.max_queued = max_queued);
    }

    pub(crate) fn reset_peaks(&self) {
        self.with_state(|state, shared, _| {
            shared
                .peak_in_flight
                .store(shared.in_flight() as u64, Relaxed);
            state.peak_queued = state.queued;
        });
    }

    pub(crate) fn retry_after(&self) -> Duration {
        lock(&self.shared.state).retry_after()
    }

    /// Counts a request shed after it was admitted (its inner service did not become ready
    /// in time) and describes it.
    pub(crate) fn shed_admitted(&self, reason: ShedReason) -> Overloaded {
        self.with_state(|state, _, _| state.overloaded(reason))
    }

    /// Sheds every waiter with `Closed` and refuses new requests; in-flight requests finish.
    pub(crate) fn close(&self) {
        self.with_state(|state, _, wakers| {
            state.closed = true;
            let ids: Vec<u64> = state.queues.iter_mut().flat_map(|q| q.drain(..)).collect();
            state.zero_byte_waiters = [0; 2];
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

/// A point-in-time copy of the counters.
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
        self.released.load(Relaxed)
    }
    fn add(&self, n: u64) {
        self.charged.fetch_add(n, Relaxed);
    }
    fn release(&self) -> u64 {
        self.released.store(true, Relaxed);
        self.charged.load(Relaxed)
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

/// A permit handed to a waiter, and when the request must give up if the inner service is
/// still not ready by then (its queue timeout or its own deadline, whichever is first).
#[derive(Debug)]
pub(crate) struct Granted {
    pub(crate) permit: Permit,
    pub(crate) ready_by: Option<(Instant, ShedReason)>,
}

/// What polling a waiter gave.
#[derive(Debug)]
pub(crate) enum WaitPoll {
    Ready(Result<Granted, Overloaded>),
    /// Still queued; poll again when woken or at this instant (if any).
    Pending(Option<Instant>),
}

impl Waiter {
    /// `clock` is read only if the waiter has a give-up time to check.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, clock: impl Fn() -> Instant) -> WaitPoll {
        assert!(!self.done, "waiter polled after completion");
        let (id, ticket) = (self.id, self.ticket);
        let result = self.limiter.with_state(|state, shared, wakers| {
            let config = &shared.config;
            let slot = state
                .slots
                .get_mut(&id)
                .expect("a waiter's slot lives until the waiter completes");
            match slot.status {
                Status::Granted => {
                    let granted_at = slot.granted_at;
                    let ready_by = give_up(config.queue_timeout, slot);
                    state.slots.remove(&id);
                    let permit = if config.track_bytes {
                        self.limiter
                            .reserved_permit(state, ticket.bytes, Some(granted_at))
                    } else {
                        Permit {
                            limiter: self.limiter.clone(),
                            word: PermitWord::timed(shared.epoch, granted_at),
                        }
                    };
                    WaitPoll::Ready(Ok(Granted { permit, ready_by }))
                }
                Status::Shed(reason) => {
                    let retry_after = slot.retry_after;
                    state.slots.remove(&id);
                    WaitPoll::Ready(Err(Overloaded::new(reason, state.limit, retry_after)))
                }
                Status::Waiting => {
                    let give_up = state.give_up_at(config, &state.slots[&id]);
                    let now = give_up.map(|_| clock());
                    match give_up {
                        Some((at, reason)) if now.is_some_and(|now| at <= now) => {
                            let now = now.expect("checked by the guard");
                            state.slots.remove(&id);
                            state.unlink(id, ticket.priority, ticket.bytes);
                            let overloaded = state.overloaded(reason);
                            state.dispatch(shared, now, wakers);
                            WaitPoll::Ready(Err(overloaded))
                        }
                        _ => {
                            let slot = state.slots.get_mut(&id).expect("checked above");
                            match &mut slot.waker {
                                Some(w) if w.will_wake(cx.waker()) => {}
                                w => *w = Some(cx.waker().clone()),
                            }
                            WaitPoll::Pending(give_up.map(|(at, _)| at))
                        }
                    }
                }
            }
        });
        self.done = matches!(result, WaitPoll::Ready(_));
        result
    }

    /// Convenience for callers without a timer (tests, loom models).
    #[cfg(test)]
    pub(crate) fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<Result<Permit, Overloaded>> {
        match self.poll(cx, Instant::now) {
            WaitPoll::Ready(r) => Poll::Ready(r.map(|g| g.permit)),
            WaitPoll::Pending(_) => Poll::Pending,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (id, ticket) = (self.id, self.ticket);
        self.limiter.with_state(|state, shared, wakers| {
            let Some(slot) = state.slots.remove(&id) else {
                return;
            };
            let now = Instant::now();
            match slot.status {
                Status::Waiting => {
                    state.unlink(id, ticket.priority, ticket.bytes);
                    // Leaving may unblock a request held up behind this one's bytes.
                    state.dispatch(shared, now, wakers);
                }
                Status::Granted => state.release(shared, slot.bytes, Some(now), wakers),
                Status::Shed(_) => {}
            }
        });
    }
}

/// The right to be inside the inner service. Dropping it returns the slot (and the bytes)
/// and hands them to the next waiter.
///
/// Two words, so that a response future and body stay small: the limiter, and a
/// [`PermitWord`].
#[derive(Debug)]
pub(crate) struct Permit {
    limiter: Limiter,
    word: PermitWord,
}

/// A permit's second word. Bit 62 says the request finished (rather than being abandoned)
/// and bits 60 and 61 hold its outcome. With bit 63 set (a byte-tracking limiter) the low
/// bits are the id of the permit's `Reservation`, which holds its bytes, meter and
/// admission time; otherwise they are the admission time as nanoseconds since the limiter
/// was built, plus one, or zero if the permit is not measured (see `Shared::times`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PermitWord(u64);

impl PermitWord {
    const UNTIMED: PermitWord = PermitWord(0);
    const RESERVATION: u64 = 1 << 63;
    const COMPLETED: u64 = 1 << 62;
    const OUTCOME_SHIFT: u32 = 60;
    const OUTCOME: u64 = 0b11 << Self::OUTCOME_SHIFT;
    const LOW: u64 = (1 << Self::OUTCOME_SHIFT) - 1;

    fn since(epoch: Instant, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(epoch).as_nanos();
        nanos.min(u128::from(Self::LOW - 1)) as u64
    }

    #[inline(never)]
    fn timed(epoch: Instant, at: Instant) -> Self {
        PermitWord(Self::since(epoch, at) + 1)
    }

    fn reservation(id: u64) -> Self {
        PermitWord(Self::RESERVATION | id)
    }

    /// Whether releasing this permit can be done without the lock.
    #[inline]
    fn is_plain(self) -> bool {
        self.0 & (Self::RESERVATION | Self::LOW) == 0
    }

    fn reservation_id(self) -> Option<u64> {
        (self.0 & Self::RESERVATION != 0).then_some(self.0 & Self::LOW)
    }

    /// When a measured permit without a reservation was admitted.
    fn admitted_at(self, epoch: Instant) -> Option<Instant> {
        let stamp = self.0 & Self::LOW;
        (self.0 & Self::RESERVATION == 0 && stamp != 0)
            .then(|| epoch + Duration::from_nanos(stamp - 1))
    }

    /// The outcome to sample: `Ignore` unless the request finished.
    fn outcome(self) -> Outcome {
        if self.0 & Self::COMPLETED == 0 {
            return Outcome::Ignore;
        }
        match (self.0 & Self::OUTCOME) >> Self::OUTCOME_SHIFT {
            1 => Outcome::Success,
            2 => Outcome::Overload,
            _ => Outcome::Ignore,
        }
    }

    fn set_outcome(&mut self, outcome: Outcome) {
        let bits = match outcome {
            Outcome::Ignore => 0,
            Outcome::Success => 1,
            Outcome::Overload => 2,
        };
        self.0 = (self.0 & !Self::OUTCOME) | (bits << Self::OUTCOME_SHIFT);
    }
}

impl Permit {
    pub(crate) fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Records how the request went, for adaptive limits and the service-time statistics.
    /// Only a measured permit feeds them, so otherwise `outcome` is not called.
    #[inline]
    pub(crate) fn set_outcome(&mut self, outcome: impl FnOnce() -> Outcome) {
        if !self.word.is_plain() {
            self.word.set_outcome(outcome());
        }
    }

    /// Marks the work covered by this permit as finished (rather than abandoned), so its
    /// outcome is sampled.
    #[inline]
    pub(crate) fn complete(&mut self) {
        if !self.word.is_plain() {
            self.word.0 |= PermitWord::COMPLETED;
        }
    }

    /// [`set_outcome`](Self::set_outcome) and [`complete`](Self::complete).
    #[inline]
    pub(crate) fn finish(&mut self, outcome: impl FnOnce() -> Outcome) {
        self.set_outcome(outcome);
        self.complete();
    }

    /// The streamed-bytes meter shared with the request body, and the bytes reserved up
    /// front; `None` if the limiter does not count bytes.
    pub(crate) fn meter(&mut self) -> Option<(Arc<MeterState>, u64)> {
        let id = self.word.reservation_id()?;
        self.limiter.with_state(|state, _, _| {
            let reservation = state.reservations.get_mut(&id)?;
            let meter = reservation
                .meter
                .get_or_insert_with(|| Arc::new(MeterState::default()));
            Some((meter.clone(), reservation.bytes))
        })
    }

    /// The bytes reserved for this permit's request.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn reserved_bytes(&self) -> u64 {
        let Some(id) = self.word.reservation_id() else {
            return 0;
        };
        lock(&self.limiter.shared.state)
            .reservations
            .get_mut(&id)
            .map_or(0, |r| r.bytes)
    }

    /// The release that needs the lock: statistics, bytes, or someone to hand the slot to.
    #[inline(never)]
    fn release_locked(&mut self) {
        let word = self.word;
        let plain_admitted = word.admitted_at(self.limiter.shared.epoch);
        let plain_now = plain_admitted.map(|_| Instant::now());
        self.limiter.with_state(|state, shared, wakers| {
            let (bytes, timing) = match word.reservation_id() {
                Some(id) => {
                    let r = state
                        .reservations
                        .remove(&id)
                        .expect("a permit's reservation lives until it is released");
                    // Under the lock, like `charge_bytes`: a charge is either counted here or
                    // sees the meter released and skipped, never both missed.
                    let charged = r.meter.as_ref().map_or(0, |m| m.release());
                    let timing = r.admitted_at.map(|at| (at, Instant::now()));
                    (r.bytes + charged, timing)
                }
                None => (0, plain_admitted.zip(plain_now)),
            };
            let outcome = word.outcome();
            if let Some((admitted_at, now)) = timing {
                let elapsed = now.saturating_duration_since(admitted_at);
                if outcome == Outcome::Success {
                    state.service_time.record(elapsed);
                    let secs = elapsed.as_secs_f64();
                    state.mean_service = Some(match state.mean_service {
                        Some(m) => m * 0.9 + secs * 0.1,
                        None => secs,
                    });
                }
                let in_flight = shared.in_flight();
                if let Some(limit) =
                    state
                        .adaptive
                        .sample(&shared.config.strategy, now, elapsed, outcome, in_flight)
                {
                    state.set_limit(shared, limit);
                }
            }
            state.release(shared, bytes, timing.map(|(_, now)| now), wakers);
        });
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if self.word.is_plain() && self.limiter.shared.release_fast() {
            return;
        }
        self.release_locked();
    }
}

/// Reads the clock at most once, and only when asked.
struct LazyNow<F> {
    clock: F,
    now: Option<Instant>,
}

impl<F: FnMut() -> Instant> LazyNow<F> {
    #[inline]
    fn get(&mut self) -> Instant {
        match self.now {
            Some(now) => now,
            None => *self.now.insert((self.clock)()),
        }
    }
}

/// One request in this many admitted at once has its service time measured.
const TIMING_SAMPLE: u64 = 64;

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
    fn a_full_lifo_queue_sheds_whoever_would_be_served_last() {
        let mut config = Config::new(1);
        config.max_queued = 2;
        config.order = QueueOrder::Lifo;
        let limiter = Limiter::new(config);
        let now = Instant::now();
        let high = Ticket {
            priority: Priority::High,
            ..ticket()
        };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let _busy = admitted(limiter.admit(ticket(), now));
        let mut oldest = queued(limiter.admit(ticket(), now));
        let mut newer = queued(limiter.admit(ticket(), now));
        // A high-priority newcomer displaces the normal waiter served last: the oldest.
        let mut h1 = queued(limiter.admit(high, now));
        match oldest.poll_permit(&mut cx) {
            Poll::Ready(Err(o)) => assert_eq!(o.reason(), ShedReason::QueueFull),
            other => panic!("{other:?}"),
        }
        assert!(newer.poll_permit(&mut cx).is_pending());
        let mut h2 = queued(limiter.admit(high, now));
        match newer.poll_permit(&mut cx) {
            Poll::Ready(Err(o)) => assert_eq!(o.reason(), ShedReason::QueueFull),
            other => panic!("{other:?}"),
        }
        // Only high-priority waiters left: a normal newcomer cannot displace them...
        assert_eq!(
            shed(limiter.admit(ticket(), now)).reason(),
            ShedReason::QueueFull
        );
        // ...but a high-priority one displaces the oldest of them.
        let _h3 = queued(limiter.admit(high, now));
        match h1.poll_permit(&mut cx) {
            Poll::Ready(Err(o)) => assert_eq!(o.reason(), ShedReason::QueueFull),
            other => panic!("{other:?}"),
        }
        assert!(h2.poll_permit(&mut cx).is_pending());
        assert_eq!(limiter.snapshot().queued, 2);
        assert_eq!(limiter.snapshot().shed[ShedReason::QueueFull.index()], 4);
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
    fn queued_requests_without_bytes_pass_a_waiter_held_up_by_bytes() {
        let mut config = Config::new(2);
        config.max_bytes = Some(100);
        config.max_queued = 10;
        let limiter = Limiter::new(config);
        let now = Instant::now();
        let sized = |bytes| Ticket { bytes, ..ticket() };
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let _large = admitted(limiter.admit(sized(80), now));
        let small = admitted(limiter.admit(sized(0), now));
        // Both slots taken: everyone queues, in order.
        let mut held = queued(limiter.admit(sized(60), now));
        let mut sized_behind = queued(limiter.admit(sized(10), now));
        let mut bodiless = queued(limiter.admit(sized(0), now));
        // A slot frees but the bytes do not: the bodiless request passes both.
        drop(small);
        assert!(held.poll_permit(&mut cx).is_pending());
        assert!(sized_behind.poll_permit(&mut cx).is_pending());
        let bodiless = match bodiless.poll_permit(&mut cx) {
            Poll::Ready(Ok(p)) => p,
            other => panic!("{other:?}"),
        };
        drop(bodiless);
        // A slot again: the 10 bytes would fit, but the 60 are ahead of them.
        assert!(sized_behind.poll_permit(&mut cx).is_pending());
        assert_eq!(limiter.snapshot().queued, 2);
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
