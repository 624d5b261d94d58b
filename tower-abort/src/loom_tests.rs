//! Loom models of the signal tree: firing racing with the first wait (which creates and
//! links the wait cells), through a parent, an `any` and the root; and with the lazy
//! creation of a signal's `CancellationToken`. Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR=target/loom cargo test -p tower-abort --lib --release -- loom`.
//!
//! `block_on` parks until woken: a lost wake-up is reported by loom as a deadlock.

use std::future::Future;

use loom::future::block_on;
use loom::thread;

use crate::{AbortLayer, AbortReason, AbortSignal};

#[test]
fn loom_fire_races_with_the_first_wait() {
    loom::model(|| {
        let signal = AbortSignal::new();
        let firer = {
            let signal = signal.clone();
            thread::spawn(move || signal.abort())
        };
        assert_eq!(block_on(signal.aborted()), AbortReason::Explicit);
        assert!(firer.join().unwrap());
    });
}

#[test]
fn loom_parent_fires_while_a_grandchild_links() {
    loom::model(|| {
        let parent = AbortSignal::new();
        let grandchild = parent.child().child();
        let firer = {
            let parent = parent.clone();
            thread::spawn(move || parent.abort())
        };
        assert_eq!(block_on(grandchild.aborted()), AbortReason::Explicit);
        firer.join().unwrap();
    });
}

#[test]
fn loom_two_sources_of_any_fire_on_two_threads() {
    loom::model(|| {
        let a = AbortSignal::new();
        let b = AbortSignal::new();
        let any = AbortSignal::any([a.clone(), b.clone()]);
        let fire_a = thread::spawn(move || a.abort());
        let fire_b = thread::spawn(move || b.abort());
        assert_eq!(block_on(any.aborted()), AbortReason::Explicit);
        fire_a.join().unwrap();
        fire_b.join().unwrap();
    });
}

#[test]
fn loom_shutdown_races_with_a_request_starting_to_wait() {
    loom::model(|| {
        let layer = AbortLayer::new();
        let root = layer.root();
        let shared = layer.shared();
        let signal = AbortSignal::for_request(&shared, None, None, None, http::Method::GET, None);
        let stopper = thread::spawn(move || root.shutdown());
        assert_eq!(block_on(signal.aborted()), AbortReason::Shutdown);
        stopper.join().unwrap();
        assert_eq!(layer.root().stats().get(AbortReason::Shutdown), 1);
    });
}

#[test]
fn loom_a_waiter_leaves_while_the_signal_fires() {
    loom::model(|| {
        let signal = AbortSignal::new();
        let child = signal.child();
        // One waiter registers, then is dropped on another thread while the parent fires;
        // a second waiter must still be woken, and nothing is left registered.
        let mut first = Box::pin(child.aborted());
        let waker = futures_test::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let _ = first.as_mut().poll(&mut cx);
        let dropper = thread::spawn(move || drop(first));
        let firer = {
            let signal = signal.clone();
            thread::spawn(move || signal.abort())
        };
        assert_eq!(block_on(child.aborted()), AbortReason::Explicit);
        dropper.join().unwrap();
        firer.join().unwrap();
    });
}

#[test]
fn loom_fire_races_with_the_token_being_made() {
    loom::model(|| {
        let parent = AbortSignal::new();
        let signal = parent.child();
        let firer = {
            let parent = parent.clone();
            thread::spawn(move || parent.abort())
        };
        let token = signal.cancellation_token();
        // A lost cancellation parks this thread for good: loom reports the deadlock.
        block_on(token.cancelled());
        assert!(firer.join().unwrap());
        assert_eq!(signal.reason(), Some(AbortReason::Explicit));
        assert_eq!(signal.cancellation_token(), token);
    });
}

#[test]
fn loom_two_threads_ask_for_the_token_while_it_fires() {
    loom::model(|| {
        let signal = AbortSignal::new();
        let other = {
            let signal = signal.clone();
            thread::spawn(move || signal.cancellation_token())
        };
        let firer = {
            let signal = signal.clone();
            thread::spawn(move || signal.abort())
        };
        let token = signal.cancellation_token();
        let theirs = other.join().unwrap();
        assert!(firer.join().unwrap());
        assert_eq!(token, theirs, "one token per signal");
        assert!(token.is_cancelled());
    });
}
