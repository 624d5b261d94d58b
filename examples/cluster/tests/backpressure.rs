//! tower-backpressure in the real binary: `--max-in-flight`, `--max-queued`,
//! `--queue-timeout`, `503` + `Retry-After`, the `/healthz` bypass and the
//! `backpressure_*` metrics summed by the supervisor.

mod support;

use support::{get, metric, Server};

#[test]
fn sheds_beyond_the_limit_bypasses_healthz_and_exports_metrics() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--max-in-flight",
        "1",
        "--max-queued",
        "1",
        "--queue-timeout",
        "1500ms",
        "--metrics-interval",
        "50ms",
    ]);
    let text = server.wait_metrics("backpressure_limit", |t| {
        metric(t, "backpressure_limit") == Some(1.0)
    });
    assert_eq!(metric(&text, "backpressure_in_flight"), Some(0.0), "{text}");
    assert_eq!(
        metric(&text, "backpressure_shed_total{reason=\"queue_full\"}"),
        Some(0.0),
        "{text}"
    );

    // One request holds the only slot for 4 s.
    let addr = server.addr;
    let holder = std::thread::spawn(move || get(addr, "/sleep?ms=4000").unwrap());
    server.wait_metrics("one request in flight", |t| {
        metric(t, "backpressure_in_flight") == Some(1.0)
    });
    // A second waits in the queue and times out after 1.5 s (the slot is still held); a
    // third, sent while the second waits, finds the queue full and is shed at once.
    let waiter = std::thread::spawn(move || get(addr, "/sleep?ms=10").unwrap());
    server.wait_metrics("one request queued", |t| {
        metric(t, "backpressure_queued") == Some(1.0)
    });
    let shed = get(addr, "/").unwrap();
    assert_eq!(shed.status, 503);
    let retry: u64 = shed.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    let timed_out = waiter.join().unwrap();
    assert_eq!(timed_out.status, 503);
    assert!(timed_out.header("retry-after").is_some());
    // Health checks are never limited.
    assert_eq!(get(addr, "/healthz").unwrap().status, 200);
    let text = server.wait_metrics("shed counters", |t| {
        metric(t, "backpressure_shed_total{reason=\"queue_timeout\"}") == Some(1.0)
    });
    assert_eq!(
        metric(&text, "backpressure_shed_total{reason=\"queue_full\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(holder.join().unwrap().status, 200);
    server.wait_metrics("idle again", |t| {
        metric(t, "backpressure_in_flight") == Some(0.0)
            && metric(t, "backpressure_queued") == Some(0.0)
    });
}
