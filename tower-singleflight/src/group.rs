//! The runtime-agnostic core: [`Group`], its builder and the [`Run`] future.

use std::{
    collections::{hash_map::Entry, HashMap},
    fmt,
    future::Future,
    hash::{BuildHasher, Hash, RandomState},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use crate::{
    error::{Failure, FlightError},
    flight::{BoxWork, Flight, Stage, Waiter},
    sync::{lock, AtomicUsize, Mutex, Ordering},
};

/// Coalesces concurrent calls with an equal key into one execution of shared work.
///
/// See the [crate documentation](crate#the-core-group) for the model. In short:
///
/// - [`run`](Group::run) with a key that has no flight makes the caller the **leader**: its
///   closure creates the work. Calls with an equal key made before the work finishes are
///   **followers** and get a clone of its output.
/// - The work belongs to the flight, not to the leader: it keeps running while at least one
///   caller waits (leader or follower) and is dropped when the last one leaves.
/// - The work is driven by the callers themselves: one of them (the *driver*) polls it
///   when it wakes; when the driver leaves, another takes over. No task is spawned, so the
///   group works on any executor. Every other caller is woken exactly once, when the work
///   finishes.
/// - A panic in the work becomes a [`FlightError`] for every caller, and the key is free.
///
/// `Group` is a cheap handle: clones share one map.
///
/// # Examples
///
/// ```
/// use tower_singleflight::Group;
///
/// # futures::executor::block_on(async {
/// let group: Group<String, u64> = Group::new();
/// let (a, b) = futures::join!(
///     group.run("answer".to_owned(), || async { 42 }),
///     group.run("answer".to_owned(), || async { unreachable!("joined the first call") }),
/// );
/// assert_eq!((a.unwrap(), b.unwrap()), (42, 42));
/// assert!(group.is_empty());
/// # });
/// ```
pub struct Group<K, V> {
    inner: Arc<GroupInner<K, V>>,
}

pub(crate) struct GroupInner<K, V> {
    shards: Box<[Mutex<HashMap<K, Arc<Flight<V>>>>]>,
    hasher: RandomState,
    flights: AtomicUsize,
    config: Config,
}

#[derive(Clone, Copy)]
struct Config {
    max_age: Option<Duration>,
    max_waiters: usize,
    max_keys: usize,
    overflow: OverflowPolicy,
    clock: fn() -> Instant,
}

/// What [`Group::run`] does when a bound set on the [`GroupBuilder`] is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Run the caller's own work, unshared (its [`Role`] is [`Role::Alone`]). The default:
    /// bounds then limit memory and fan-out without failing anyone.
    #[default]
    RunAlone,
    /// Fail the call at once with a [`FlightError`] for which
    /// [`is_overflow`](FlightError::is_overflow) is true.
    Reject,
}

/// How a call to [`Group::run`] takes part in its flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// It started the flight: its closure created the work.
    Leader,
    /// It joined a flight already running.
    Follower,
    /// A bound was reached; it runs its own work, shared with nobody.
    Alone,
    /// A bound was reached and the overflow policy rejects; it fails at once.
    Rejected,
}

/// Builds a [`Group`] with bounds. Every bound is off by default.
#[derive(Clone, Copy)]
pub struct GroupBuilder {
    shards: usize,
    config: Config,
}

impl fmt::Debug for GroupBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupBuilder")
            .field("shards", &self.shards)
            .field("max_age", &self.config.max_age)
            .field("max_waiters", &self.config.max_waiters)
            .field("max_keys", &self.config.max_keys)
            .field("overflow", &self.config.overflow)
            .finish()
    }
}

impl Default for GroupBuilder {
    fn default() -> Self {
        let parallelism = std::thread::available_parallelism().map_or(4, usize::from);
        Self {
            shards: (parallelism * 4).next_power_of_two(),
            config: Config {
                max_age: None,
                max_waiters: usize::MAX,
                max_keys: usize::MAX,
                overflow: OverflowPolicy::RunAlone,
                clock: Instant::now,
            },
        }
    }
}

impl GroupBuilder {
    /// The number of independently locked shards of the key map, rounded up to a power of
    /// two. Default: four per available CPU. Unrelated keys contend only within a shard.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards.max(1).next_power_of_two();
        self
    }

    /// A flight older than `max_age` takes no new followers: the next caller starts a new
    /// flight (a new leader) for the key, while the old one goes on for its own waiters.
    /// Bounds how long a stuck call can hold a key. Default: no limit.
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.config.max_age = Some(max_age);
        self
    }

    /// At most `max` callers (leader included) wait on one flight; the overflow policy
    /// applies to the next. Default: no limit.
    pub fn max_waiters_per_key(mut self, max: usize) -> Self {
        self.config.max_waiters = max.max(1);
        self
    }

    /// At most `max` keys are in flight at once; the overflow policy applies to a caller
    /// that would start another. Default: no limit.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.config.max_keys = max;
        self
    }

    /// What happens to a caller when a bound is reached. Default:
    /// [`OverflowPolicy::RunAlone`].
    pub fn overflow(mut self, policy: OverflowPolicy) -> Self {
        self.config.overflow = policy;
        self
    }

    /// The clock `max_age` is measured with. Default: [`Instant::now`]. Under tokio, pass
    /// `|| tokio::time::Instant::now().into_std()` so paused test time applies.
    pub fn clock(mut self, now: fn() -> Instant) -> Self {
        self.config.clock = now;
        self
    }

    /// Builds the group.
    pub fn build<K, V>(self) -> Group<K, V> {
        let shards = (0..self.shards)
            .map(|_| Mutex::new(HashMap::new()))
            .collect();
        Group {
            inner: Arc::new(GroupInner {
                shards,
                hasher: RandomState::new(),
                flights: AtomicUsize::new(0),
                config: self.config,
            }),
        }
    }
}

impl<K, V> Clone for Group<K, V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K, V> fmt::Debug for Group<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("in_flight", &self.inner.flights.load(Ordering::Relaxed))
            .field("shards", &self.inner.shards.len())
            .finish()
    }
}

impl<K, V> Default for Group<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> Group<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + 'static,
{
    /// A group without bounds.
    pub fn new() -> Self {
        GroupBuilder::default().build()
    }

    /// Joins the flight for `key`, or starts one with the future `make` returns.
    ///
    /// The call registers at once (its [`Role`] is known immediately); the work runs only
    /// while some caller polls its [`Run`]. `make` runs at most once, outside every lock,
    /// only for the leader (or for a caller running alone after an overflow); a panic in
    /// it fails the flight like a panic in the work.
    pub fn run<F, Fut>(&self, key: K, make: F) -> Run<K, V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V> + Send + 'static,
    {
        self.run_boxed(key, move || Box::pin(make()) as BoxWork<V>)
    }

    /// Joins the flight for `key` if there is one; never starts one.
    pub fn join(&self, key: &K) -> Option<Run<K, V>> {
        let inner = &self.inner;
        let shard = inner.shard_index(key);
        let map = lock(&inner.shards[shard]);
        let flight = map.get(key)?;
        let mut state = lock(&flight.state);
        if !Flight::joinable(&state) || inner.too_old(flight) {
            return None;
        }
        if state.waiters.len() >= inner.config.max_waiters {
            return None;
        }
        let slot = state.add_waiter();
        let flight = Arc::clone(flight);
        drop(state);
        drop(map);
        Some(Run {
            waiter: Waiter {
                flight,
                group: Some((Arc::clone(inner), key.clone(), shard)),
                slot,
                finished: false,
                alone: false,
            },
            role: Role::Follower,
        })
    }

    fn run_boxed(&self, key: K, make: impl FnOnce() -> BoxWork<V>) -> Run<K, V> {
        let inner = &self.inner;
        let shard = inner.shard_index(&key);
        let mut map = lock(&inner.shards[shard]);
        let own_key = key.clone();
        let entry = match map.entry(key) {
            Entry::Occupied(mut entry) => {
                let flight = entry.get();
                let mut state = lock(&flight.state);
                if Flight::joinable(&state) && !inner.too_old(flight) {
                    if state.waiters.len() >= inner.config.max_waiters {
                        drop(state);
                        drop(map);
                        return self.overflow(make);
                    }
                    let slot = state.add_waiter();
                    let flight = Arc::clone(flight);
                    drop(state);
                    drop(map);
                    return Run {
                        waiter: Waiter {
                            flight,
                            group: Some((Arc::clone(inner), own_key, shard)),
                            slot,
                            finished: false,
                            alone: false,
                        },
                        role: Role::Follower,
                    };
                }
                drop(state);
                // Finished, cancelled or too old: a new flight replaces it (the old one
                // goes on for its own waiters). The number of keys does not change.
                let (flight, slot) = Flight::starting(inner.now());
                let flight = Arc::new(flight);
                entry.insert(Arc::clone(&flight));
                (flight, slot)
            }
            Entry::Vacant(entry) => {
                if inner.flights.load(Ordering::Relaxed) >= inner.config.max_keys {
                    drop(map);
                    return self.overflow(make);
                }
                let (flight, slot) = Flight::starting(inner.now());
                let flight = Arc::new(flight);
                entry.insert(Arc::clone(&flight));
                inner.flights.fetch_add(1, Ordering::Relaxed);
                (flight, slot)
            }
        };
        drop(map);
        let (flight, slot) = entry;
        let mut waiter = Waiter {
            flight,
            group: Some((Arc::clone(inner), own_key, shard)),
            slot,
            finished: false,
            alone: false,
        };
        waiter.start(make);
        Run {
            waiter,
            role: Role::Leader,
        }
    }

    fn overflow(&self, make: impl FnOnce() -> BoxWork<V>) -> Run<K, V> {
        let (flight, slot) = Flight::starting(self.inner.now());
        let mut waiter = Waiter {
            flight: Arc::new(flight),
            group: None,
            slot,
            finished: false,
            alone: false,
        };
        match self.inner.config.overflow {
            OverflowPolicy::RunAlone => {
                waiter.start(make);
                Run {
                    waiter,
                    role: Role::Alone,
                }
            }
            OverflowPolicy::Reject => {
                let mut state = lock(&waiter.flight.state);
                state.stage = Stage::Done(Err(Failure::Overflow));
                drop(state);
                Run {
                    waiter,
                    role: Role::Rejected,
                }
            }
        }
    }
}

impl Group<(), ()> {
    /// A builder to set bounds and the number of shards; [`GroupBuilder::build`] picks the
    /// key and value types.
    pub fn builder() -> GroupBuilder {
        GroupBuilder::default()
    }
}

impl<K, V> Group<K, V> {
    /// The number of keys in flight now.
    pub fn len(&self) -> usize {
        self.inner.flights.load(Ordering::Relaxed)
    }

    /// Whether no key is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq, V> GroupInner<K, V> {
    fn shard_index(&self, key: &K) -> usize {
        let hash = self.hasher.hash_one(key);
        // Each shard's map hashes with its own random keys, so picking the shard with this
        // independent hash does not skew the maps.
        (hash >> 32) as usize & (self.shards.len() - 1)
    }

    fn too_old(&self, flight: &Flight<V>) -> bool {
        self.config.max_age.is_some_and(|max| {
            flight.started.is_some_and(|started| {
                (self.config.clock)().saturating_duration_since(started) >= max
            })
        })
    }

    /// The start time to record for a new flight: only needed to enforce `max_age`.
    fn now(&self) -> Option<Instant> {
        self.config.max_age.map(|_| (self.config.clock)())
    }

    /// Removes `flight` from the map if it is still the entry for `key`.
    pub(crate) fn forget(&self, key: &K, shard: usize, flight: &Arc<Flight<V>>) {
        let mut map = lock(&self.shards[shard]);
        if let Some((key, current)) = map.remove_entry(key) {
            if Arc::ptr_eq(&current, flight) {
                self.flights.fetch_sub(1, Ordering::Relaxed);
            } else {
                // A newer flight replaced this one (max age): it stays.
                map.insert(key, current);
            }
        }
    }
}

/// The future [`Group::run`] returns: resolves to the flight's output.
///
/// Dropping it leaves the flight; the last caller to leave drops the shared work.
///
/// # Panics
///
/// Polling it again after it returned `Ready` panics.
#[must_use = "futures do nothing unless polled"]
pub struct Run<K: Hash + Eq, V> {
    pub(crate) waiter: Waiter<K, V>,
    role: Role,
}

impl<K: Hash + Eq, V> Run<K, V> {
    /// How this call takes part in its flight.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether this call finished the shared work itself while no other caller was
    /// waiting for it: then nobody else can see its output, which it may use exclusively.
    /// Meaningful once the future has returned `Ready`.
    pub fn was_alone(&self) -> bool {
        self.waiter.alone
    }

    /// Whether this call started the flight.
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
}

impl<K: Hash + Eq, V> fmt::Debug for Run<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("role", &self.role)
            .field("finished", &self.waiter.finished)
            .finish()
    }
}

// Nothing in a `Run` is structurally pinned: the shared work sits boxed in the flight.
impl<K: Hash + Eq, V> Unpin for Run<K, V> {}

impl<K, V> Future for Run<K, V>
where
    K: Hash + Eq,
    V: Clone + Send + 'static,
{
    type Output = Result<V, FlightError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.waiter.poll_flight(cx)
    }
}
