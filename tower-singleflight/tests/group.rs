//! The runtime-agnostic core: coalescing, wake-ups, cancellation, panics and bounds.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering::SeqCst},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_test::task::new_count_waker;
use tokio::sync::oneshot;
use tower_singleflight::{Group, OverflowPolicy, Role};

fn poll<F: Future + Unpin>(fut: &mut F, waker: &std::task::Waker) -> Poll<F::Output> {
    Pin::new(fut).poll(&mut Context::from_waker(waker))
}

/// Sets a flag when the work is dropped, finished or not.
struct DropFlag(Arc<AtomicUsize>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_callers_run_once() {
    let group: Group<&'static str, Arc<Vec<u8>>> = Group::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (release, gate) = tokio::sync::watch::channel(false);
    // Callers whose `run` has registered them with the flight (as leader or follower).
    let joined = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let group = group.clone();
        let calls = Arc::clone(&calls);
        let joined = Arc::clone(&joined);
        let mut gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let run = group.run("k", move || async move {
                calls.fetch_add(1, SeqCst);
                gate.wait_for(|open| *open).await.unwrap();
                Arc::new(vec![7u8; 4096])
            });
            joined.fetch_add(1, SeqCst);
            run.await.unwrap()
        }));
    }
    // Every caller has registered before the work may finish: a caller arriving after it
    // would rightly start a second flight. Bounded, however slowly the workers run.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while joined.load(SeqCst) < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of 1000 callers joined",
            joined.load(SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    release.send(true).unwrap();
    let first = tasks.pop().unwrap().await.unwrap();
    for task in tasks {
        assert_eq!(task.await.unwrap(), first);
    }
    assert_eq!(calls.load(SeqCst), 1);
    assert!(group.is_empty());
}

#[test]
fn followers_are_woken_exactly_once() {
    let group: Group<u8, u32> = Group::new();
    let (tx, rx) = oneshot::channel::<u32>();
    let mut leader = group.run(1, || async move { rx.await.unwrap() });
    assert_eq!(leader.role(), Role::Leader);
    let (leader_waker, leader_wakes) = new_count_waker();
    assert!(poll(&mut leader, &leader_waker).is_pending());

    let mut followers: Vec<_> = (0..5)
        .map(|_| {
            let run = group.run(1, || async { unreachable!("joined") });
            assert_eq!(run.role(), Role::Follower);
            let (waker, count) = new_count_waker();
            (run, waker, count)
        })
        .collect();
    for (run, waker, _) in &mut followers {
        assert!(poll(run, waker).is_pending());
        // A spurious re-poll neither drives the work nor registers twice.
        assert!(poll(run, waker).is_pending());
    }
    tx.send(5).unwrap();
    assert_eq!(leader_wakes.get(), 1);
    for (_, _, count) in &followers {
        assert_eq!(
            count.get(),
            0,
            "followers are not woken by the work's progress"
        );
    }
    assert_eq!(
        poll(&mut leader, &leader_waker).map(Result::unwrap),
        Poll::Ready(5)
    );
    for (run, waker, count) in &mut followers {
        assert_eq!(count.get(), 1, "each follower is woken exactly once");
        assert_eq!(poll(run, waker).map(Result::unwrap), Poll::Ready(5));
    }
    assert!(group.is_empty());
}

#[test]
fn leader_leaving_hands_the_work_to_a_follower() {
    let group: Group<u8, u32> = Group::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = oneshot::channel::<u32>();
    let r = Arc::clone(&runs);
    let mut leader = group.run(1, move || {
        r.fetch_add(1, SeqCst);
        async move { rx.await.unwrap() }
    });
    let (lw, _) = new_count_waker();
    assert!(poll(&mut leader, &lw).is_pending());
    let mut follower = group.run(1, || async { unreachable!() });
    let (fw, fwakes) = new_count_waker();
    assert!(poll(&mut follower, &fw).is_pending());
    drop(leader);
    assert_eq!(
        fwakes.get(),
        0,
        "no wake-up is pending, so none is passed on"
    );
    tx.send(9).unwrap();
    assert_eq!(fwakes.get(), 1, "the follower now drives");
    assert_eq!(poll(&mut follower, &fw).map(Result::unwrap), Poll::Ready(9));
    assert_eq!(runs.load(SeqCst), 1, "the work was not re-run");
    assert!(group.is_empty());
}

#[test]
fn pending_wake_is_handed_over_when_the_driver_leaves() {
    let group: Group<u8, u32> = Group::new();
    let (tx, rx) = oneshot::channel::<u32>();
    let mut leader = group.run(1, || async move { rx.await.unwrap() });
    let (lw, lwakes) = new_count_waker();
    assert!(poll(&mut leader, &lw).is_pending());
    let mut follower = group.run(1, || async { unreachable!() });
    let (fw, fwakes) = new_count_waker();
    assert!(poll(&mut follower, &fw).is_pending());
    tx.send(3).unwrap();
    assert_eq!(lwakes.get(), 1);
    // The leader was woken but leaves before polling: the wake-up moves to the follower.
    drop(leader);
    assert_eq!(fwakes.get(), 1);
    assert_eq!(poll(&mut follower, &fw).map(Result::unwrap), Poll::Ready(3));
    assert!(group.is_empty());
}

#[test]
fn all_waiters_leaving_drops_the_work_and_frees_the_key() {
    let group: Group<u8, u32> = Group::new();
    let dropped = Arc::new(AtomicUsize::new(0));
    let flag = DropFlag(Arc::clone(&dropped));
    let mut leader = group.run(1, move || async move {
        let _flag = flag;
        std::future::pending::<u32>().await
    });
    let (w, _) = new_count_waker();
    assert!(poll(&mut leader, &w).is_pending());
    let mut follower = group.run(1, || async { unreachable!() });
    assert!(poll(&mut follower, &w).is_pending());
    drop(leader);
    assert_eq!(dropped.load(SeqCst), 0, "a follower still waits");
    assert_eq!(group.len(), 1);
    drop(follower);
    assert_eq!(dropped.load(SeqCst), 1, "the last one out drops the work");
    assert!(group.is_empty());
    let mut next = group.run(1, || async { 4 });
    assert!(next.is_leader());
    assert_eq!(poll(&mut next, &w).map(Result::unwrap), Poll::Ready(4));
}

#[test]
fn callers_dropped_before_their_first_poll_leave_cleanly() {
    let group: Group<u8, u32> = Group::new();
    let dropped = Arc::new(AtomicUsize::new(0));
    let flag = DropFlag(Arc::clone(&dropped));
    let leader = group.run(1, move || async move {
        let _flag = flag;
        1
    });
    let follower = group.run(1, || async { unreachable!() });
    drop(follower);
    drop(leader);
    assert_eq!(dropped.load(SeqCst), 1);
    assert!(group.is_empty());
}

#[test]
fn a_panic_fails_every_waiter_and_frees_the_key() {
    let group: Group<u8, u32> = Group::new();
    let (tx, rx) = oneshot::channel::<()>();
    let mut leader = group.run(1, || async move {
        rx.await.unwrap();
        panic!("backend exploded")
    });
    let (w, _) = new_count_waker();
    assert!(poll(&mut leader, &w).is_pending());
    let mut followers: Vec<_> = (0..3)
        .map(|_| group.run(1, || async { unreachable!() }))
        .collect();
    let (fw, fwakes) = new_count_waker();
    for f in &mut followers {
        assert!(poll(f, &fw).is_pending());
    }
    tx.send(()).unwrap();
    let err = match poll(&mut leader, &w) {
        Poll::Ready(Err(err)) => err,
        other => panic!("expected an error, got {:?}", other.map(|r| r.is_ok())),
    };
    assert!(err.is_panic());
    assert_eq!(err.panic_message(), Some("backend exploded"));
    assert_eq!(fwakes.get(), 3, "every follower woken once, promptly");
    for f in &mut followers {
        match poll(f, &fw) {
            Poll::Ready(Err(e)) => assert!(e.is_panic()),
            _ => panic!("follower must see the panic as an error"),
        }
    }
    assert!(group.is_empty());
}

#[test]
fn a_panic_creating_the_work_fails_the_flight() {
    let group: Group<u8, u32> = Group::new();
    let mut leader = group.run(1, || -> std::future::Ready<u32> { panic!("no future") });
    let (w, _) = new_count_waker();
    assert!(matches!(poll(&mut leader, &w), Poll::Ready(Err(e)) if e.is_panic()));
    assert!(group.is_empty());
}

#[test]
fn unrelated_keys_do_not_share() {
    let group: Group<u8, u8> = Group::new();
    let a = group.run(1, || async { 1 });
    let b = group.run(2, || async { 2 });
    assert!(a.is_leader() && b.is_leader());
    assert_eq!(group.len(), 2);
    let (a, b) = futures::executor::block_on(async { futures::join!(a, b) });
    assert_eq!((a.unwrap(), b.unwrap()), (1, 2));
    assert!(group.is_empty());
}

/// A key whose hash ignores its value: every key collides with every other.
#[derive(Clone, PartialEq, Eq)]
struct Colliding(u8);
impl std::hash::Hash for Colliding {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

#[test]
fn keys_with_equal_hashes_are_still_separate_flights() {
    let group: Group<Colliding, u8> = Group::builder().shards(1).build();
    let w = futures::task::noop_waker();
    let mut a = group.run(Colliding(1), || async { 1 });
    let mut b = group.run(Colliding(2), || async { 2 });
    let mut c = group.run(Colliding(3), || async { 3 });
    assert!(a.is_leader() && b.is_leader() && c.is_leader());
    let mut b2 = group.run(Colliding(2), || async { unreachable!("joins b") });
    assert_eq!(b2.role(), Role::Follower);
    assert_eq!(group.len(), 3);
    // Finishing the middle one leaves the others in place and joinable.
    assert_eq!(poll(&mut b, &w).map(Result::unwrap), Poll::Ready(2));
    assert_eq!(poll(&mut b2, &w).map(Result::unwrap), Poll::Ready(2));
    assert_eq!(group.len(), 2);
    let mut a2 = group.join(&Colliding(1)).expect("a is still in flight");
    assert!(group.join(&Colliding(2)).is_none());
    assert_eq!(poll(&mut c, &w).map(Result::unwrap), Poll::Ready(3));
    assert_eq!(poll(&mut a, &w).map(Result::unwrap), Poll::Ready(1));
    assert_eq!(poll(&mut a2, &w).map(Result::unwrap), Poll::Ready(1));
    assert!(group.is_empty());
    // Leaving unpolled frees the keys too.
    let d = group.run(Colliding(4), || async { 4 });
    let e = group.run(Colliding(5), || async { 5 });
    drop((d, e));
    assert!(group.is_empty());
}

#[test]
fn max_waiters_per_key_runs_the_overflow_alone() {
    let group: Group<u8, u8> = Group::builder().max_waiters_per_key(2).build();
    let a = group.run(1, std::future::pending);
    let b = group.run(1, std::future::pending);
    let c = group.run(1, || async { 3 });
    assert_eq!(
        (a.role(), b.role(), c.role()),
        (Role::Leader, Role::Follower, Role::Alone)
    );
    assert_eq!(futures::executor::block_on(c).unwrap(), 3);
    drop((a, b));
    assert!(group.is_empty());
}

#[test]
fn max_keys_rejects_by_policy() {
    let group: Group<u8, u8> = Group::builder()
        .max_keys(1)
        .overflow(OverflowPolicy::Reject)
        .build();
    let a = group.run(1, std::future::pending);
    let joined = group.run(1, std::future::pending);
    assert_eq!(joined.role(), Role::Follower, "joining needs no new key");
    let b = group.run(2, || async { 2 });
    assert_eq!(b.role(), Role::Rejected);
    assert!(futures::executor::block_on(b).unwrap_err().is_overflow());
    drop((a, joined));
    assert!(group.is_empty());
    assert!(group.run(2, || async { 2 }).is_leader());
}

#[tokio::test(start_paused = true)]
async fn a_flight_older_than_max_age_takes_no_followers() {
    let group: Group<u8, u8> = Group::builder()
        .max_age(Duration::from_secs(5))
        .clock(|| tokio::time::Instant::now().into_std())
        .build();
    let (tx, rx) = oneshot::channel::<u8>();
    let old = group.run(1, || async move { rx.await.unwrap() });
    tokio::time::advance(Duration::from_secs(4)).await;
    let young_follower = group.run(1, || async { unreachable!() });
    assert_eq!(young_follower.role(), Role::Follower);
    tokio::time::advance(Duration::from_secs(2)).await;
    let new_leader = group.run(1, || async { 2 });
    assert_eq!(new_leader.role(), Role::Leader);
    assert_eq!(group.len(), 1);
    assert_eq!(new_leader.await.unwrap(), 2);
    tx.send(1).unwrap();
    let (a, b) = futures::join!(old, young_follower);
    assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
    assert!(group.is_empty());
}

#[test]
fn join_never_starts_a_flight() {
    let group: Group<u8, u8> = Group::new();
    assert!(group.join(&1).is_none());
    let leader = group.run(1, std::future::pending);
    let joined = group.join(&1).expect("flight exists");
    assert_eq!(joined.role(), Role::Follower);
    drop((leader, joined));
    assert!(group.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_keep_the_work_alive_across_tasks() {
    let group: Group<u8, u8> = Group::new();
    let (tx, rx) = oneshot::channel::<u8>();
    let leader = tokio::spawn({
        let group = group.clone();
        async move { group.run(1, || async move { rx.await.unwrap() }).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while group.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the leader never ran");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (joined_tx, joined) = oneshot::channel();
    let follower = tokio::spawn({
        let group = group.clone();
        async move {
            let run = group.run(1, || async { unreachable!() });
            joined_tx.send(run.role()).unwrap();
            run.await
        }
    });
    assert_eq!(joined.await.unwrap(), Role::Follower);
    leader.abort();
    let _ = leader.await;
    tx.send(6).unwrap();
    assert_eq!(follower.await.unwrap().unwrap(), 6);
    assert!(group.is_empty());
}
