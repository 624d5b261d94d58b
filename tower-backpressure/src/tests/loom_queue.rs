//! Every interleaving of admission, hand-off, cancellation and closing on a limit of one
//! with a queue of one: no permit, waiter slot or byte reservation may leak, and no waiter
//! may be left unwoken while a slot is free. Limiters without a byte budget admit and
//! release on the lock-free path while nobody waits, so those models also cover the
//! `LOCKED` flag racing the compare-and-swaps.

use std::future::poll_fn;

use loom::thread;
use tokio::time::Instant;

use crate::limiter::{Admission, Config, Limiter, Ticket};
use crate::order::Priority;

fn limiter(max_queued: usize, max_bytes: Option<u64>) -> Limiter {
    let mut config = Config::new(1);
    config.max_queued = max_queued;
    config.queue_timeout = None;
    config.max_bytes = max_bytes;
    Limiter::new(config)
}

fn ticket(bytes: u64) -> Ticket {
    Ticket {
        priority: Priority::Normal,
        bytes,
        deadline: None,
    }
}

/// Takes a slot (waiting if queued) and gives it back; returns whether it was served.
fn serve(limiter: &Limiter, bytes: u64) -> bool {
    match limiter.admit_with(ticket(bytes), Instant::now) {
        Admission::Admitted(permit) => {
            drop(permit);
            true
        }
        Admission::Queued(mut waiter) => {
            match loom::future::block_on(poll_fn(|cx| waiter.poll_permit(cx))) {
                Ok(permit) => {
                    drop(permit);
                    true
                }
                Err(_) => false,
            }
        }
        Admission::Shed(_) => false,
    }
}

/// A limiter without a byte budget whose next admissions are not sampled for timing, so
/// their permits are released on the lock-free path (admission 0 is always sampled).
fn lock_free_limiter() -> Limiter {
    let l = limiter(1, None);
    assert!(serve(&l, 0));
    l
}

fn assert_idle(limiter: &Limiter) {
    let s = limiter.snapshot();
    assert_eq!(s.in_flight, 0, "leaked permit");
    assert_eq!(s.queued, 0, "leaked queue entry");
    assert_eq!(s.bytes_in_flight, 0, "leaked byte reservation");
}

#[test]
fn loom_two_requests_hand_off_without_leaks() {
    loom::model(|| {
        let l = limiter(1, Some(10));
        let l2 = l.clone();
        let t = thread::spawn(move || serve(&l2, 5));
        let a = serve(&l, 5);
        let b = t.join().unwrap();
        // With one slot and one queue place, both are always served.
        assert!(a && b);
        assert_idle(&l);
    });
}

#[test]
fn loom_waiter_dropped_while_permit_is_released() {
    loom::model(|| {
        // The permit is released on the lock-free path unless the waiter set the flag.
        let l = lock_free_limiter();
        let permit = match l.admit_with(ticket(0), Instant::now) {
            Admission::Admitted(p) => p,
            other => panic!("{other:?}"),
        };
        let waiter = match l.admit_with(ticket(0), Instant::now) {
            Admission::Queued(w) => w,
            other => panic!("{other:?}"),
        };
        // The permit is released (and maybe handed to the waiter) while the waiter's
        // client leaves.
        let t = thread::spawn(move || drop(permit));
        drop(waiter);
        t.join().unwrap();
        assert_idle(&l);
        // The slot is usable afterwards.
        assert!(matches!(
            l.admit_with(ticket(0), Instant::now),
            Admission::Admitted(_)
        ));
    });
}

#[test]
fn loom_close_races_a_waiter() {
    loom::model(|| {
        let l = limiter(1, None);
        let permit = match l.admit_with(ticket(0), Instant::now) {
            Admission::Admitted(p) => p,
            other => panic!("{other:?}"),
        };
        let l2 = l.clone();
        let t = thread::spawn(move || serve(&l2, 0));
        l.close();
        drop(permit);
        // The waiter is either served before the close or shed by it; it never hangs.
        let _ = t.join().unwrap();
        assert_idle(&l);
    });
}

#[test]
fn loom_release_hand_off_and_cancel_race_three_ways() {
    loom::model(|| {
        let l = limiter(2, Some(10));
        let permit = match l.admit_with(ticket(4), Instant::now) {
            Admission::Admitted(p) => p,
            other => panic!("{other:?}"),
        };
        // A waiter that will be served, racing a waiter that gives up, racing the release.
        let served = {
            let l = l.clone();
            thread::spawn(move || serve(&l, 4))
        };
        let leaver = {
            let l = l.clone();
            thread::spawn(move || {
                if let Admission::Queued(waiter) = l.admit_with(ticket(4), Instant::now) {
                    drop(waiter);
                }
            })
        };
        drop(permit);
        leaver.join().unwrap();
        assert!(served.join().unwrap(), "a queued waiter is never stranded");
        assert_idle(&l);
    });
}

#[test]
fn loom_high_priority_eviction_races_release() {
    loom::model(|| {
        let mut config = Config::new(1);
        config.max_queued = 1;
        config.queue_timeout = None;
        let l = Limiter::new(config);
        let permit = match l.admit_with(ticket(0), Instant::now) {
            Admission::Admitted(p) => p,
            other => panic!("{other:?}"),
        };
        let normal = match l.admit_with(ticket(0), Instant::now) {
            Admission::Queued(w) => w,
            other => panic!("{other:?}"),
        };
        let high = {
            let l = l.clone();
            thread::spawn(move || {
                let t = Ticket {
                    priority: Priority::High,
                    ..ticket(0)
                };
                match l.admit_with(t, Instant::now) {
                    Admission::Admitted(p) => drop(p),
                    Admission::Queued(mut w) => {
                        let r = loom::future::block_on(poll_fn(|cx| w.poll_permit(cx)));
                        drop(r);
                    }
                    Admission::Shed(_) => {}
                }
            })
        };
        drop(permit);
        let mut normal = normal;
        // Either served (the release came first) or evicted by the high-priority request.
        let _ = loom::future::block_on(poll_fn(|cx| normal.poll_permit(cx)));
        drop(normal);
        high.join().unwrap();
        assert_idle(&l);
    });
}

#[test]
fn loom_streamed_bytes_charged_while_the_permit_is_released_do_not_leak() {
    loom::model(|| {
        let l = limiter(1, Some(100));
        let mut permit = match l.admit_with(ticket(0), Instant::now) {
            Admission::Admitted(p) => p,
            other => panic!("{other:?}"),
        };
        // The request body (read by another task) charges streamed bytes while the
        // response body, and with it the permit, is dropped.
        let (meter, _) = permit.meter().expect("a byte budget counts bytes");
        let body = {
            let l = l.clone();
            thread::spawn(move || {
                let _ = l.charge_bytes(&meter, 10);
            })
        };
        drop(permit);
        body.join().unwrap();
        assert_idle(&l);
    });
}

#[test]
fn loom_lock_free_release_never_strands_a_queueing_request() {
    loom::model(|| {
        // No byte budget: the first request is admitted and released without the lock,
        // racing the second one, which finds the slot taken and queues.
        let l = lock_free_limiter();
        let l2 = l.clone();
        let t = thread::spawn(move || serve(&l2, 0));
        let a = serve(&l, 0);
        let b = t.join().unwrap();
        assert!(a && b, "with one slot and one queue place both are served");
        assert_idle(&l);
        // Nobody waits, so the next request takes the lock-free path again.
        assert!(matches!(
            l.admit_with(ticket(0), Instant::now),
            Admission::Admitted(_)
        ));
    });
}

#[test]
fn loom_lock_free_requests_and_close() {
    loom::model(|| {
        let l = lock_free_limiter();
        let l2 = l.clone();
        let t = thread::spawn(move || serve(&l2, 0));
        let a = serve(&l, 0);
        l.close();
        let _ = t.join().unwrap();
        let _ = a;
        assert_idle(&l);
        assert!(matches!(
            l.admit_with(ticket(0), Instant::now),
            Admission::Shed(_)
        ));
    });
}
