//! Loom models of the flight state machine (joins, drives, hand-offs, cancellation,
//! completion, and a flight replaced after `max_age` racing its own end) and of the body
//! fan-out (readers on several threads, a reader leaving, and the lag timer racing a slow
//! reader). Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p tower-singleflight --lib --release -- loom`.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use loom::{
    future::block_on,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        Mutex,
    },
    thread,
};

use crate::{Group, Role};

/// A one-shot event another thread fires; the work waits on it.
struct Signal {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Signal {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            fired: AtomicBool::new(false),
            waker: Mutex::new(None),
        })
    }

    fn fire(&self) {
        self.fired.store(true, SeqCst);
        let waker = self.waker.lock().unwrap().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn wait(self: Arc<Self>) -> Wait {
        Wait(self)
    }
}

struct Wait(Arc<Signal>);

impl Future for Wait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut waker = self.0.waker.lock().unwrap();
        if self.0.fired.load(SeqCst) {
            return Poll::Ready(());
        }
        *waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Counts how often the work ran and was dropped.
struct Probe {
    runs: AtomicUsize,
    drops: AtomicUsize,
}

struct DropProbe(Arc<Probe>);
impl Drop for DropProbe {
    fn drop(&mut self) {
        self.0.drops.fetch_add(1, SeqCst);
    }
}

fn work(probe: &Arc<Probe>, signal: &Arc<Signal>) -> impl Future<Output = u32> + Send + 'static {
    probe.runs.fetch_add(1, SeqCst);
    let guard = DropProbe(Arc::clone(probe));
    let wait = Arc::clone(signal).wait();
    async move {
        let _guard = guard;
        wait.await;
        7
    }
}

fn probe() -> Arc<Probe> {
    Arc::new(Probe {
        runs: AtomicUsize::new(0),
        drops: AtomicUsize::new(0),
    })
}

#[test]
fn loom_leader_and_follower_on_two_threads() {
    loom::model(|| {
        let group: Group<u8, u32> = Group::builder().shards(1).build();
        let probe = probe();
        let signal = Signal::new();
        let leader = group.run(1, || work(&probe, &signal));
        let follower = group.run(1, || work(&probe, &signal));
        let a = thread::spawn(move || block_on(leader).unwrap());
        let b = thread::spawn(move || block_on(follower).unwrap());
        signal.fire();
        assert_eq!(a.join().unwrap(), 7);
        assert_eq!(b.join().unwrap(), 7);
        assert_eq!(probe.runs.load(SeqCst), 1);
        assert_eq!(probe.drops.load(SeqCst), 1);
        assert!(group.is_empty());
    });
}

#[test]
fn loom_driver_leaves_while_work_wakes() {
    loom::model(|| {
        let group: Group<u8, u32> = Group::builder().shards(1).build();
        let probe = probe();
        let signal = Signal::new();
        let mut leader = group.run(1, || work(&probe, &signal));
        let follower = group.run(1, || work(&probe, &signal));
        // The leader drives once (registering the work's waker), then leaves on another
        // thread while the event fires: the follower must take over and finish.
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut leader).poll(&mut cx).is_pending());
        let dropper = thread::spawn(move || drop(leader));
        let firer = {
            let signal = Arc::clone(&signal);
            thread::spawn(move || signal.fire())
        };
        assert_eq!(block_on(follower).unwrap(), 7);
        dropper.join().unwrap();
        firer.join().unwrap();
        assert_eq!(probe.runs.load(SeqCst), 1);
        assert_eq!(probe.drops.load(SeqCst), 1);
        assert!(group.is_empty());
    });
}

#[test]
fn loom_last_waiters_leave_concurrently() {
    loom::model(|| {
        let group: Group<u8, u32> = Group::builder().shards(1).build();
        let probe = probe();
        let signal = Signal::new();
        let mut leader = group.run(1, || work(&probe, &signal));
        let follower = group.run(1, || work(&probe, &signal));
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut leader).poll(&mut cx).is_pending());
        let a = thread::spawn(move || drop(leader));
        let b = thread::spawn(move || drop(follower));
        signal.fire();
        a.join().unwrap();
        b.join().unwrap();
        // The work was dropped exactly once, and the key is free for a new leader.
        assert_eq!(probe.drops.load(SeqCst), 1);
        assert!(group.is_empty());
        let again = group.run(1, || async { 8 });
        assert!(again.is_leader());
        assert_eq!(block_on(again).unwrap(), 8);
        assert!(group.is_empty());
    });
}

#[test]
fn loom_join_races_completion() {
    loom::model(|| {
        let group: Group<u8, u32> = Group::builder().shards(1).build();
        let probe = probe();
        let signal = Signal::new();
        signal.fire();
        let leader = group.run(1, || work(&probe, &signal));
        let joiner = {
            let group = group.clone();
            let probe = Arc::clone(&probe);
            let signal = Arc::clone(&signal);
            thread::spawn(move || block_on(group.run(1, || work(&probe, &signal))).unwrap())
        };
        assert_eq!(block_on(leader).unwrap(), 7);
        assert_eq!(joiner.join().unwrap(), 7);
        // The joiner either shared the flight or came after it and led its own.
        let runs = probe.runs.load(SeqCst);
        assert!(runs == 1 || runs == 2);
        assert_eq!(probe.drops.load(SeqCst), runs);
        assert!(group.is_empty());
    });
}

#[test]
fn loom_panic_reaches_follower_on_other_thread() {
    loom::model(|| {
        let group: Group<u8, u32> = Group::builder().shards(1).build();
        let signal = Signal::new();
        let wait = Arc::clone(&signal).wait();
        let leader = group.run(1, move || async move {
            wait.await;
            panic!("boom")
        });
        let follower = group.run(1, || async { 0 });
        let a = thread::spawn(move || block_on(leader).unwrap_err().is_panic());
        signal.fire();
        assert!(block_on(follower).unwrap_err().is_panic());
        assert!(a.join().unwrap());
        assert!(group.is_empty());
    });
}

/// A clock the max-age model sets by hand (`GroupBuilder::clock` takes a `fn`).
mod clock {
    use std::{
        sync::{
            atomic::{AtomicU64, Ordering::SeqCst},
            OnceLock,
        },
        time::{Duration, Instant},
    };

    static BASE: OnceLock<Instant> = OnceLock::new();
    static OFFSET_MS: AtomicU64 = AtomicU64::new(0);

    /// Sets the time; called before the model's threads start, so they all see it.
    pub(super) fn set(ms: u64) {
        OFFSET_MS.store(ms, SeqCst);
    }

    pub(super) fn now() -> Instant {
        *BASE.get_or_init(Instant::now) + Duration::from_millis(OFFSET_MS.load(SeqCst))
    }
}

#[test]
fn loom_a_flight_replaced_after_max_age_races_its_own_end() {
    loom::model(|| {
        clock::set(0);
        let group: Group<u8, u32> = Group::builder()
            .shards(1)
            .max_age(std::time::Duration::from_secs(1))
            .clock(clock::now)
            .build();
        let probe = probe();
        let signal = Signal::new();
        let old_leader = group.run(1, || work(&probe, &signal));
        let old_follower = group.run(1, || work(&probe, &signal));
        assert_eq!(old_follower.role(), Role::Follower);
        // The old flight is now too old: the next caller leads a new flight, while the old
        // one finishes for its own waiters on another thread.
        clock::set(2_000);
        let old = thread::spawn(move || block_on(old_leader).unwrap());
        let newer = {
            let group = group.clone();
            thread::spawn(move || {
                let run = group.run(1, || async { 8 });
                let role = run.role();
                (role, block_on(run).unwrap())
            })
        };
        signal.fire();
        assert_eq!(block_on(old_follower).unwrap(), 7);
        assert_eq!(old.join().unwrap(), 7);
        // Whether it replaced the old flight or came after it ended, it led its own.
        assert_eq!(newer.join().unwrap(), (Role::Leader, 8));
        assert_eq!(probe.runs.load(SeqCst), 1);
        assert_eq!(probe.drops.load(SeqCst), 1);
        // Neither flight's end removed the other's entry or left its own behind.
        assert!(group.is_empty());
    });
}

fn futures_task_noop() -> Waker {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    Waker::from(Arc::new(Noop))
}

// ===== the lag timer =====

/// The timer the fan-out uses under loom (see `crate::sync`): it fires only when a model
/// calls [`fire_all`](timer::fire_all).
pub(crate) mod timer {
    use std::{
        future::Future,
        pin::Pin,
        sync::Arc,
        task::{Context, Poll, Waker},
        time::Duration,
    };

    use loom::sync::{
        atomic::{AtomicBool, Ordering::SeqCst},
        Mutex,
    };

    struct Timer {
        fired: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    loom::lazy_static! {
        static ref TIMERS: Mutex<Vec<Arc<Timer>>> = Mutex::new(Vec::new());
    }

    /// A started timer; ready once fired.
    pub(crate) struct Sleep(Arc<Timer>);

    pub(crate) fn sleep(_: Duration) -> Sleep {
        let timer = Arc::new(Timer {
            fired: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        TIMERS.lock().unwrap().push(Arc::clone(&timer));
        Sleep(timer)
    }

    impl Future for Sleep {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let mut waker = self.0.waker.lock().unwrap();
            if self.0.fired.load(SeqCst) {
                return Poll::Ready(());
            }
            *waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Fires every timer started so far (dropped ones included); returns how many.
    pub(crate) fn fire_all() -> usize {
        let timers = std::mem::take(&mut *TIMERS.lock().unwrap());
        for timer in &timers {
            timer.fired.store(true, SeqCst);
            let waker = timer.waker.lock().unwrap().take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
        timers.len()
    }
}

// ===== the body fan-out =====

mod fanout {
    use std::{future::poll_fn, time::Duration};

    use bytes::Bytes;
    use http_body::{Body, Frame};

    use super::*;
    use crate::{
        body::{Fanout, Reader},
        error::BoxError,
    };

    /// Yields `a`, then `b` once the signal fires, then ends.
    struct SignalBody {
        signal: Arc<Signal>,
        step: u8,
    }

    impl Body for SignalBody {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.step {
                0 => {
                    self.step = 1;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))))
                }
                1 => {
                    let mut wait = Arc::clone(&self.signal).wait();
                    match Pin::new(&mut wait).poll(cx) {
                        Poll::Ready(()) => {
                            self.step = 2;
                            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"b")))))
                        }
                        Poll::Pending => Poll::Pending,
                    }
                }
                _ => Poll::Ready(None),
            }
        }
    }

    fn fanout(signal: &Arc<Signal>) -> Arc<Fanout> {
        let body = SignalBody {
            signal: Arc::clone(signal),
            step: 0,
        };
        Fanout::new(
            Box::pin(body),
            1 << 20,
            Duration::from_secs(1),
            Arc::default(),
        )
    }

    fn read_all(reader: &mut Reader) -> Vec<u8> {
        read_until_error(reader).unwrap()
    }

    /// Reads to the end; an error comes back with what was read before it.
    fn read_until_error(reader: &mut Reader) -> Result<Vec<u8>, (Vec<u8>, BoxError)> {
        block_on(async {
            let mut out = Vec::new();
            while let Some(frame) = poll_fn(|cx| reader.poll_frame(cx)).await {
                match frame {
                    Ok(frame) => out.extend_from_slice(&frame.into_data().unwrap()),
                    Err(err) => return Err((out, err)),
                }
            }
            Ok(out)
        })
    }

    /// Yields `a` then `b` at once, then ends.
    struct TwoFrames(u8);

    impl Body for TwoFrames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0 += 1;
            Poll::Ready(match self.0 {
                1 => Some(Ok(Frame::data(Bytes::from_static(b"a")))),
                2 => Some(Ok(Frame::data(Bytes::from_static(b"b")))),
                _ => None,
            })
        }
    }

    /// A fan-out whose buffer is full with one frame: a reader one frame ahead of another
    /// waits for it (until the lag timer fires).
    fn one_frame_buffer() -> Arc<Fanout> {
        Fanout::new(
            Box::pin(TwoFrames(0)),
            1,
            Duration::from_secs(1),
            Arc::default(),
        )
    }

    #[test]
    fn loom_two_readers_race_the_lag_timer() {
        loom::model(|| {
            let fanout = one_frame_buffer();
            let mut first = fanout.reader();
            let mut second = fanout.reader();
            let second = thread::spawn(move || read_until_error(&mut second));
            let firer = thread::spawn(timer::fire_all);
            let outcomes = [read_until_error(&mut first), second.join().unwrap()];
            firer.join().unwrap();
            for outcome in &outcomes {
                match outcome {
                    Ok(all) => assert_eq!(all, b"ab"),
                    // Cut off while behind: an error after a prefix, never a clean
                    // truncated end.
                    Err((prefix, err)) => {
                        assert!(err.is::<crate::error::Lagged>(), "{err}");
                        assert!(b"ab".starts_with(prefix));
                    }
                }
            }
            // The timer only ever cuts off the reader that holds the other up.
            assert!(
                outcomes.iter().any(Result::is_ok),
                "both readers were cut off"
            );
        });
    }

    #[test]
    fn loom_a_stalled_reader_is_cut_off_when_the_lag_timer_fires() {
        loom::model(|| {
            let fanout = one_frame_buffer();
            let mut fast = fanout.reader();
            let mut stalled = fanout.reader();
            // Fires once the fast reader has started waiting (the timer exists only then).
            let firer = thread::spawn(|| {
                while timer::fire_all() == 0 {
                    thread::yield_now();
                }
            });
            assert_eq!(read_all(&mut fast), b"ab");
            firer.join().unwrap();
            let (prefix, err) = read_until_error(&mut stalled).unwrap_err();
            assert!(prefix.is_empty());
            assert!(err.is::<crate::error::Lagged>(), "{err}");
        });
    }

    #[test]
    fn loom_two_readers_on_two_threads_get_the_whole_body() {
        loom::model(|| {
            let signal = Signal::new();
            let fanout = fanout(&signal);
            let mut first = fanout.reader();
            let mut second = fanout.reader();
            let other = thread::spawn(move || read_all(&mut second));
            let firer = {
                let signal = Arc::clone(&signal);
                thread::spawn(move || signal.fire())
            };
            assert_eq!(read_all(&mut first), b"ab");
            assert_eq!(other.join().unwrap(), b"ab");
            firer.join().unwrap();
        });
    }

    #[test]
    fn loom_a_reader_leaving_hands_the_body_to_another() {
        loom::model(|| {
            let signal = Signal::new();
            let fanout = fanout(&signal);
            let mut leaving = fanout.reader();
            let mut staying = fanout.reader();
            // The leaving reader drives once (it reads `a` and polls for `b`), then goes.
            let a = block_on(poll_fn(|cx| leaving.poll_frame(cx)));
            assert_eq!(a.unwrap().unwrap().into_data().unwrap(), "a");
            let waker = futures_task_noop();
            assert!(leaving
                .poll_frame(&mut Context::from_waker(&waker))
                .is_pending());
            let dropper = thread::spawn(move || drop(leaving));
            let firer = {
                let signal = Arc::clone(&signal);
                thread::spawn(move || signal.fire())
            };
            assert_eq!(read_all(&mut staying), b"ab");
            dropper.join().unwrap();
            firer.join().unwrap();
        });
    }
}
