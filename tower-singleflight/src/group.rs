//! The runtime-agnostic core: [`Group`], its builder and the [`Run`] future.

use std::{
    collections::{hash_map::Entry, HashMap},
    fmt,
    future::Future,
    hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState},
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
    /// Each shard files flights by the hash of their key, computed once per call.
    shards: Box<[Mutex<Shard<K, V>>]>,
    /// Keyed SipHash (std's `RandomState`): keys are often attacker-chosen (URLs), and
    /// nobody can craft collisions without the random keys.
    hasher: RandomState,
    /// Keys in flight over all shards, kept only when `max_keys` bounds them: a counter
    /// every call updates would be the one thing unrelated keys contend on.
    bounded_keys: AtomicUsize,
    config: Config,
}

struct Shard<K, V> {
    map: HashMap<u64, Bucket<K, V>, BuildHasherDefault<HashIsKey>>,
    /// Keys in flight in this shard (a bucket may hold several).
    keys: usize,
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
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::default(),
                    keys: 0,
                })
            })
            .collect();
        Group {
            inner: Arc::new(GroupInner {
                shards,
                hasher: RandomState::new(),
                bounded_keys: AtomicUsize::new(0),
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
            .field("in_flight", &self.len())
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
        let hash = inner.hash(key);
        let shard = lock(inner.shard(hash));
        let flight = shard.map.get(&hash)?.get(key)?;
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
        drop(shard);
        Some(Run {
            waiter: Waiter {
                flight,
                group: Some((Arc::clone(inner), hash)),
                slot,
                finished: false,
                alone: false,
            },
            role: Role::Follower,
        })
    }

    fn run_boxed(&self, key: K, make: impl FnOnce() -> BoxWork<V>) -> Run<K, V> {
        let inner = &self.inner;
        let hash = inner.hash(&key);
        let mut shard = lock(inner.shard(hash));
        let Shard { map, keys } = &mut *shard;
        let (flight, slot) = match map.entry(hash) {
            Entry::Occupied(mut entry) => {
                let bucket = entry.get_mut();
                match bucket.get_mut(&key) {
                    Some(flight) => {
                        let mut state = lock(&flight.state);
                        if Flight::joinable(&state) && !inner.too_old(flight) {
                            if state.waiters.len() >= inner.config.max_waiters {
                                drop(state);
                                drop(shard);
                                return self.overflow(make);
                            }
                            let slot = state.add_waiter();
                            let flight = Arc::clone(flight);
                            drop(state);
                            drop(shard);
                            return Run {
                                waiter: Waiter {
                                    flight,
                                    group: Some((Arc::clone(inner), hash)),
                                    slot,
                                    finished: false,
                                    alone: false,
                                },
                                role: Role::Follower,
                            };
                        }
                        drop(state);
                        // Finished, cancelled or too old: a new flight replaces it (the old
                        // one goes on for its own waiters). The number of keys does not change.
                        let (new, slot) = Flight::starting(inner.now());
                        let new = Arc::new(new);
                        *flight = Arc::clone(&new);
                        (new, slot)
                    }
                    None => {
                        // Another key with the same 64-bit hash is in flight.
                        if !inner.add_key() {
                            drop(shard);
                            return self.overflow(make);
                        }
                        let (new, slot) = Flight::starting(inner.now());
                        let new = Arc::new(new);
                        bucket.push(key, Arc::clone(&new));
                        *keys += 1;
                        (new, slot)
                    }
                }
            }
            Entry::Vacant(entry) => {
                if !inner.add_key() {
                    drop(shard);
                    return self.overflow(make);
                }
                let (new, slot) = Flight::starting(inner.now());
                let new = Arc::new(new);
                entry.insert(Bucket::One(key, Arc::clone(&new)));
                *keys += 1;
                (new, slot)
            }
        };
        drop(shard);
        let mut waiter = Waiter {
            flight,
            group: Some((Arc::clone(inner), hash)),
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
    /// The number of keys in flight now (a sum over the shards, each read under its lock).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|shard| lock(shard).keys).sum()
    }

    /// Whether no key is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq, V> GroupInner<K, V> {
    /// The hash a key is filed under: keyed SipHash, fed through a buffer (see
    /// [`Buffered`]).
    fn hash(&self, key: &K) -> u64 {
        let mut hasher = Buffered::new(self.hasher.build_hasher());
        key.hash(&mut hasher);
        hasher.finish_buffered()
    }

    /// Counts one more key in flight if `max_keys` allows it.
    fn add_key(&self) -> bool {
        let max = self.config.max_keys;
        if max == usize::MAX {
            return true;
        }
        // Checked then added: concurrent callers in different shards may overshoot by a
        // few; the bound is on memory, not an exact quota.
        if self.bounded_keys.load(Ordering::Relaxed) >= max {
            return false;
        }
        self.bounded_keys.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The shard of a key hash. The shard maps use the hash's low bits (bucket) and top
    /// seven bits (tag); the shard takes bits from 32 up, so it does not skew them.
    fn shard(&self, hash: u64) -> &Mutex<Shard<K, V>> {
        &self.shards[(hash >> 32) as usize & (self.shards.len() - 1)]
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

    /// Removes `flight`, filed under the key hash `hash`, from the map if it is still
    /// there (a newer flight may have replaced it after `max_age`: that one stays).
    pub(crate) fn forget(&self, hash: u64, flight: &Arc<Flight<V>>) {
        let mut shard = lock(self.shard(hash));
        let Shard { map, keys } = &mut *shard;
        let Entry::Occupied(mut entry) = map.entry(hash) else {
            return;
        };
        let (removed, empty) = entry.get_mut().remove(flight);
        if empty {
            entry.remove();
        }
        if removed {
            *keys -= 1;
        }
        drop(shard);
        if removed && self.config.max_keys != usize::MAX {
            self.bounded_keys.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

// ===== impl Bucket =====

/// The flights whose keys have one 64-bit hash: one, but for a (random) collision.
enum Bucket<K, V> {
    One(K, Arc<Flight<V>>),
    Many(Vec<(K, Arc<Flight<V>>)>),
}

impl<K: Eq, V> Bucket<K, V> {
    fn get(&self, key: &K) -> Option<&Arc<Flight<V>>> {
        match self {
            Bucket::One(k, flight) => (k == key).then_some(flight),
            Bucket::Many(all) => all.iter().find(|(k, _)| k == key).map(|(_, f)| f),
        }
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut Arc<Flight<V>>> {
        match self {
            Bucket::One(k, flight) => (k == key).then_some(flight),
            Bucket::Many(all) => all.iter_mut().find(|(k, _)| k == key).map(|(_, f)| f),
        }
    }

    /// Adds a flight for a key not in the bucket.
    fn push(&mut self, key: K, flight: Arc<Flight<V>>) {
        match self {
            Bucket::Many(all) => all.push((key, flight)),
            Bucket::One(..) => {
                let placeholder = Bucket::Many(Vec::with_capacity(2));
                let Bucket::One(k, f) = std::mem::replace(self, placeholder) else {
                    unreachable!("matched above")
                };
                let Bucket::Many(all) = self else {
                    unreachable!("just set")
                };
                all.push((k, f));
                all.push((key, flight));
            }
        }
    }

    /// Removes `flight`; returns whether it was there and whether the bucket is now empty.
    fn remove(&mut self, flight: &Arc<Flight<V>>) -> (bool, bool) {
        match self {
            Bucket::One(_, f) => {
                let removed = Arc::ptr_eq(f, flight);
                (removed, removed)
            }
            Bucket::Many(all) => {
                let before = all.len();
                all.retain(|(_, f)| !Arc::ptr_eq(f, flight));
                (all.len() < before, all.is_empty())
            }
        }
    }
}

/// The buffer of [`Buffered`].
const HASH_BUF: usize = 128;

/// Feeds a hasher in writes of up to `HASH_BUF` bytes. Keyed SipHash costs far more per `write`
/// call than per byte, and a derived `Hash` of a structured key (a request's) makes a dozen
/// small writes. The byte stream is the same, so equal keys still hash equal.
struct Buffered<H> {
    inner: H,
    buf: [u8; HASH_BUF],
    len: usize,
}

impl<H: Hasher> Buffered<H> {
    fn new(inner: H) -> Self {
        Self {
            inner,
            buf: [0; HASH_BUF],
            len: 0,
        }
    }

    fn flush(&mut self) {
        self.inner.write(&self.buf[..self.len]);
        self.len = 0;
    }

    fn finish_buffered(mut self) -> u64 {
        self.flush();
        self.inner.finish()
    }
}

impl<H: Hasher> Hasher for Buffered<H> {
    fn finish(&self) -> u64 {
        unreachable!("call `finish_buffered`")
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > HASH_BUF {
            self.flush();
            if bytes.len() > HASH_BUF / 2 {
                self.inner.write(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// The hasher of the shard maps, whose keys are already SipHash values: it passes them on.
#[derive(Default)]
pub(crate) struct HashIsKey(u64);

impl Hasher for HashIsKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the keys are `u64`); fold anything else in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
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
