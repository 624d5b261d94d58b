//! The service for any request type: typed `Overloaded` errors with reasons, priorities,
//! bypass and leak-freedom.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};
use tower_backpressure::{
    BackpressureLayer, BoxError, Overloaded, Priority, RequestClass, ShedReason,
};

/// Echoes its request once the gate lets it through; fails on `u32::MAX`.
fn gated(
    gate: Arc<Semaphore>,
) -> impl Service<u32, Response = u32, Error = BoxError, Future = impl Send> + Clone {
    tower::service_fn(move |x: u32| {
        let gate = gate.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            if x == u32::MAX {
                Err::<u32, BoxError>("inner failure".into())
            } else {
                Ok(x)
            }
        }
    })
}

fn reason(err: BoxError) -> ShedReason {
    err.downcast_ref::<Overloaded>()
        .unwrap_or_else(|| panic!("not Overloaded: {err}"))
        .reason()
}

#[tokio::test(start_paused = true)]
async fn shed_requests_fail_with_a_typed_reason() {
    let layer = BackpressureLayer::builder(1)
        .max_queued(1)
        .queue_timeout(Duration::from_millis(50))
        .build_typed();
    let handle = layer.handle();
    let gate = Arc::new(Semaphore::new(0));
    let svc = layer.layer(gated(gate.clone()));
    let first = tokio::spawn(svc.clone().oneshot(1));
    tokio::task::yield_now().await;
    let second = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    let err = svc.clone().oneshot(3).await.unwrap_err();
    assert!(err.is::<Overloaded>());
    let overloaded = err.downcast_ref::<Overloaded>().unwrap();
    assert_eq!(overloaded.reason(), ShedReason::QueueFull);
    assert_eq!(overloaded.limit(), 1);
    assert!(overloaded.retry_after() >= Duration::from_secs(1));
    assert_eq!(
        reason(second.await.unwrap().unwrap_err()),
        ShedReason::QueueTimeout
    );
    handle.close();
    assert_eq!(
        reason(svc.clone().oneshot(4).await.unwrap_err()),
        ShedReason::Closed
    );
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
}

#[tokio::test]
async fn constructors_without_a_layer() {
    let svc = tower_backpressure::TypedBackpressure::new(gated(Arc::new(Semaphore::new(1))), 1);
    assert_eq!(svc.handle().limit(), 1);
    assert_eq!(svc.oneshot(5).await.unwrap(), 5);
}

#[tokio::test]
async fn inner_errors_pass_through_and_release_the_permit() {
    let layer = BackpressureLayer::builder(1).build_typed();
    let handle = layer.handle();
    let svc = layer.layer(gated(Arc::new(Semaphore::new(10))));
    let err = svc.clone().oneshot(u32::MAX).await.unwrap_err();
    assert!(!err.is::<Overloaded>());
    assert_eq!(err.to_string(), "inner failure");
    assert_eq!(handle.in_flight(), 0);
    assert_eq!(svc.oneshot(7).await.unwrap(), 7);
}

#[tokio::test]
async fn high_priority_and_bypass_through_a_classifier() {
    let layer = BackpressureLayer::builder(2)
        .max_queued(1)
        .high_priority_share(0.5)
        .unwrap()
        .build_typed_with(|x: &u32| match x {
            0 => RequestClass::bypass(),
            100.. => RequestClass::normal().with_priority(Priority::High),
            _ => RequestClass::normal(),
        });
    let handle = layer.handle();
    let gate = Arc::new(Semaphore::new(0));
    let svc = layer.layer(gated(gate.clone()));
    let normal = tokio::spawn(svc.clone().oneshot(1));
    tokio::task::yield_now().await;
    // Normal traffic may use only one of the two slots.
    let queued_normal = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    assert_eq!((handle.in_flight(), handle.queued()), (1, 1));
    let high = tokio::spawn(svc.clone().oneshot(100));
    tokio::task::yield_now().await;
    assert_eq!(
        handle.in_flight(),
        2,
        "the reserved slot took the high-priority request"
    );
    // A bypassed request is not counted at all.
    let bypass = tokio::spawn(svc.clone().oneshot(0));
    tokio::task::yield_now().await;
    assert_eq!((handle.in_flight(), handle.queued()), (2, 1));
    gate.add_permits(4);
    assert_eq!(high.await.unwrap().unwrap(), 100);
    assert_eq!(bypass.await.unwrap().unwrap(), 0);
    assert_eq!(normal.await.unwrap().unwrap(), 1);
    assert_eq!(queued_normal.await.unwrap().unwrap(), 2);
    assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_queue_timeout_too_long_for_the_clock_waits_instead_of_panicking() {
    // `Duration::MAX` reads as "wait as long as it takes"; adding it to an instant overflows.
    let layer = BackpressureLayer::builder(1)
        .max_queued(1)
        .queue_timeout(Duration::MAX)
        .build_typed();
    let handle = layer.handle();
    let gate = Arc::new(Semaphore::new(0));
    let svc = layer.layer(gated(gate.clone()));
    let first = tokio::spawn(svc.clone().oneshot(1));
    tokio::task::yield_now().await;
    let second = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    assert_eq!((handle.in_flight(), handle.queued()), (1, 1));
    gate.add_permits(2);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    assert_eq!(second.await.unwrap().unwrap(), 2);
    assert_eq!((handle.in_flight(), handle.queued()), (0, 0));
}

#[test]
fn a_high_priority_share_outside_zero_to_one_is_a_clear_error() {
    for share in [1.0, 1.5, -0.1, f64::NAN, f64::INFINITY] {
        let err = BackpressureLayer::builder(10)
            .high_priority_share(share)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.setting(), "high_priority_share");
        assert_eq!(
            err.to_string(),
            format!("invalid high_priority_share: {share} (must be at least 0 and below 1)")
        );
    }
    for share in [0.0, 0.2, 0.999] {
        assert!(BackpressureLayer::builder(10)
            .high_priority_share(share)
            .is_ok());
    }
}
