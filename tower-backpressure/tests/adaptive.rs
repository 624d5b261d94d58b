//! Adaptive limits against simulated services under paused time: a latency knee and a
//! capacity drop. Closed-loop clients keep the limiter saturated; the assertions are on the
//! range the limit settles into, as in Vector's adaptive-concurrency scenarios.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_backpressure::{
    Aimd, BackpressureHandle, BackpressureLayer, BoxError, Gradient, LimitStrategy,
};

#[derive(Clone)]
struct Sim {
    active: Arc<AtomicUsize>,
    /// Concurrency the service handles at base latency.
    knee: usize,
    /// Above this concurrency the service fails fast with an overload error.
    capacity: Arc<AtomicUsize>,
    base: Duration,
}

impl Sim {
    fn new(knee: usize, capacity: usize) -> Self {
        Sim {
            active: Arc::default(),
            knee,
            capacity: Arc::new(AtomicUsize::new(capacity)),
            base: Duration::from_millis(10),
        }
    }
}

impl Service<u32> for Sim {
    type Response = ();
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: u32) -> Self::Future {
        let sim = self.clone();
        Box::pin(async move {
            let active = sim.active.fetch_add(1, Ordering::SeqCst) + 1;
            let result = if active > sim.capacity.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Err("overloaded".into())
            } else {
                // Past the knee, latency grows with the square of the excess.
                let factor = (active as f64 / sim.knee as f64).max(1.0).powi(2);
                tokio::time::sleep(sim.base.mul_f64(factor)).await;
                Ok(())
            };
            sim.active.fetch_sub(1, Ordering::SeqCst);
            result
        })
    }
}

/// Runs `clients` closed-loop clients for `duration`, returning the limit sampled every
/// 100 ms, with `at(t)` hooks applied on the way.
async fn run(
    strategy: LimitStrategy,
    sim: Sim,
    clients: usize,
    duration: Duration,
    on_second: impl Fn(u64, &Sim),
) -> (Vec<usize>, BackpressureHandle) {
    let layer = BackpressureLayer::builder(10)
        .max_queued(clients)
        .no_queue_timeout()
        .limit_strategy(strategy)
        .build_typed();
    let handle = layer.handle();
    let svc = layer.layer(sim.clone());
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let _ = svc.clone().oneshot(0).await;
            }
        }));
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let elapsed = start.elapsed();
        if elapsed.subsec_millis() < 100 {
            on_second(elapsed.as_secs(), &sim);
        }
        samples.push(handle.limit());
    }
    for t in tasks {
        t.await.unwrap();
    }
    (samples, handle)
}

fn mean(xs: &[usize]) -> f64 {
    let m = xs.iter().sum::<usize>() as f64 / xs.len() as f64;
    eprintln!(
        "limit over the window: min {} max {} mean {m:.1}",
        xs.iter().min().unwrap(),
        xs.iter().max().unwrap()
    );
    m
}

#[tokio::test(start_paused = true)]
async fn aimd_settles_below_the_latency_knee_threshold() {
    let strategy = LimitStrategy::Aimd(
        Aimd::new()
            .limits(1, 200)
            .latency_threshold(Duration::from_millis(20)),
    );
    let (samples, handle) = run(
        strategy,
        Sim::new(10, 1000),
        60,
        Duration::from_secs(20),
        |_, _| {},
    )
    .await;
    // Latency passes 20 ms above ~14 in flight (10 * sqrt 2).
    let tail = &samples[100..];
    let (lo, hi) = (*tail.iter().min().unwrap(), *tail.iter().max().unwrap());
    assert!(lo >= 8 && hi <= 20, "limit ranged {lo}..={hi}: {tail:?}");
    assert!((10.0..=17.0).contains(&mean(tail)), "mean {}", mean(tail));
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn gradient_finds_the_latency_knee_without_a_threshold() {
    let strategy = LimitStrategy::Gradient(Gradient::new().limits(1, 200));
    let (samples, handle) = run(
        strategy,
        Sim::new(10, 1000),
        60,
        Duration::from_secs(20),
        |_, _| {},
    )
    .await;
    let tail = &samples[100..];
    assert!((10.0..=18.0).contains(&mean(tail)), "mean {}", mean(tail));
    let (lo, hi) = (*tail.iter().min().unwrap(), *tail.iter().max().unwrap());
    assert!(lo >= 9 && hi <= 20, "limit ranged {lo}..={hi}: {tail:?}");
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn aimd_follows_a_capacity_drop() {
    let strategy = LimitStrategy::Aimd(Aimd::new().limits(1, 100));
    let (samples, _) = run(
        strategy,
        Sim::new(1000, 20),
        60,
        Duration::from_secs(20),
        |second, sim| {
            if second == 10 {
                sim.capacity.store(5, Ordering::SeqCst);
            }
        },
    )
    .await;
    let before = &samples[50..100];
    let after = &samples[130..];
    assert!((15.0..=22.0).contains(&mean(before)), "before: {before:?}");
    let (lo, hi) = (*after.iter().min().unwrap(), *after.iter().max().unwrap());
    assert!(
        lo >= 3 && hi <= 8,
        "after the drop the limit ranged {lo}..={hi}: {after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn gradient_follows_a_capacity_drop() {
    let strategy = LimitStrategy::Gradient(Gradient::new().limits(1, 100));
    let (samples, _) = run(
        strategy,
        Sim::new(1000, 20),
        60,
        Duration::from_secs(20),
        |second, sim| {
            if second == 10 {
                sim.capacity.store(5, Ordering::SeqCst);
            }
        },
    )
    .await;
    let after = &samples[130..];
    mean(after);
    let (lo, hi) = (*after.iter().min().unwrap(), *after.iter().max().unwrap());
    assert!(
        lo >= 2 && hi <= 10,
        "after the drop the limit ranged {lo}..={hi}: {after:?}"
    );
}
