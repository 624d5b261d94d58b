//! Process lifecycle of the real binary: crashes, rolling restart, shutdown, metrics.

mod support;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use support::{alive, get, metric, Server, PATIENCE};

const WORKERS_2: &str = "cluster_workers 2";

#[test]
fn kill_9_of_a_worker_is_replaced_and_requests_still_succeed() {
    let server = Server::start(&["--workers", "2", "--metrics-interval", "100ms"]);
    let before = server.workers();
    assert_eq!(before.len(), 2, "{before:?}");
    let killed = Instant::now();
    support::signal(before[0], "KILL");
    // Fresh connections right away: the ones the kernel queues on the dead worker's socket
    // wait in its backlog for the replacement instead of being refused.
    for i in 0..50 {
        let res = get(server.addr, "/").unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(res.status, 200);
    }
    let text = server.wait_metrics("worker count restored", |t| {
        metric(t, "cluster_workers") == Some(2.0)
            && metric(t, "cluster_worker_restarts_total") == Some(1.0)
    });
    assert!(text.contains(WORKERS_2));
    // Restarted after 100 ms by design; the bound is generous for a loaded machine (it also
    // covers the 50 requests above, each on a fresh connection, and a debug build starting).
    let restored = killed.elapsed();
    assert!(
        restored < Duration::from_secs(10),
        "restored after {restored:?}"
    );
    let after = server.workers();
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(!after.contains(&before[0]));
    assert!(after.contains(&before[1]));
    // Logged by the supervisor; read from its stderr by a thread of ours, maybe a moment
    // after the metrics above.
    server.wait_log("the crash logged", |log| {
        log.contains("worker exited unexpectedly")
    });
}

#[test]
fn crash_loop_stops_the_server_with_a_clear_message() {
    let mut server = Server::start(&[
        "--workers",
        "1",
        "--crash-limit",
        "3",
        "--restart-backoff",
        "10ms",
    ]);
    for round in 0..3 {
        let deadline = Instant::now() + PATIENCE;
        let pid = loop {
            if let Some(pid) = server.workers().first().copied() {
                break pid;
            }
            assert!(Instant::now() < deadline, "no worker in round {round}");
            std::thread::sleep(Duration::from_millis(20));
        };
        support::signal(pid, "KILL");
        let deadline = Instant::now() + PATIENCE;
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if round < 2 {
            // Wait for the replacement before killing it again.
            let deadline = Instant::now() + PATIENCE;
            while server.workers().first().map_or(true, |p| *p == pid) {
                assert!(Instant::now() < deadline, "not restarted in round {round}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let status = server.wait_exit(PATIENCE).expect("server stopped");
    assert_eq!(status.code(), Some(1));
    assert!(server.log().contains("crash-looping"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_constant_load_fails_no_request() {
    let server = Server::start(&["--workers", "2", "--metrics-interval", "100ms"]);
    let old = server.workers();
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    // Four keep-alive clients and two that open a connection per request (these exercise
    // the hand-over of connections queued on a socket between the old and new worker).
    for client in 0..6 {
        let fresh = client >= 4;
        let (stop, ok) = (stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut sender = None;
            let mut reconnects = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if sender.is_none() {
                    reconnects += 1;
                    let stream = match tokio::net::TcpStream::connect(addr).await {
                        Ok(s) => s,
                        Err(e) => {
                            failures.push(format!("connect: {e}"));
                            continue;
                        }
                    };
                    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    sender = Some(s);
                }
                let s = sender.as_mut().unwrap();
                let req = http::Request::get("/")
                    .header("host", "test")
                    .header("connection", if fresh { "close" } else { "keep-alive" })
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                match s.send_request(req).await {
                    Ok(res) => {
                        let close = res
                            .headers()
                            .get("connection")
                            .is_some_and(|v| v == "close");
                        let status = res.status();
                        match res.into_body().collect().await.map(|b| b.to_bytes()) {
                            Ok(b) if status == 200 && &b[..] == b"Hello, World!" => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => failures.push(format!("{status}: {other:?}")),
                        }
                        // A client honouring `Connection: close` opens a new connection.
                        if close {
                            sender = None;
                        }
                    }
                    Err(e) => {
                        failures.push(format!("request: {e}"));
                        sender = None;
                    }
                }
            }
            (failures, reconnects)
        }));
    }
    // Load before, during and after two rolling restarts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("HUP");
    let deadline = Instant::now() + PATIENCE;
    let rolled = |n: f64| {
        let text = server.metrics();
        metric(&text, "cluster_rolling_restarts_total") == Some(n)
            && metric(&text, "cluster_workers") == Some(2.0)
    };
    while !rolled(1.0) {
        assert!(Instant::now() < deadline, "rolling restart did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("HUP");
    while !rolled(2.0) {
        assert!(
            Instant::now() < deadline,
            "second rolling restart did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut reconnects = 0;
    for c in clients {
        let (f, r) = c.await.unwrap();
        failures.extend(f);
        reconnects += r;
    }
    let served = ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        served,
        &failures[..failures.len().min(5)]
    );
    assert!(served > 100, "only {served} requests");
    // Every keep-alive client was moved off the old workers by `Connection: close`.
    assert!(reconnects >= 6 + 4, "reconnects {reconnects}");
    let new = server.workers();
    assert_eq!(new.len(), 2);
    assert!(
        new.iter().all(|p| !old.contains(p)),
        "old {old:?} new {new:?}"
    );
    assert_eq!(
        metric(&server.metrics(), "cluster_worker_restarts_total"),
        Some(0.0)
    );
}

/// Waits until a request is inside the handler: admitted by tower-backpressure, which
/// `/sleep` passes through. An open connection is not enough: its request may not have
/// been read yet when the test acts.
fn wait_request_in_handler(server: &Server) {
    server.wait_metrics("request in the handler", |t| {
        metric(t, "backpressure_in_flight").unwrap_or(0.0) >= 1.0
    });
}

#[test]
fn sigterm_lets_the_in_flight_request_finish_and_exits_0() {
    let mut server = Server::start(&["--workers", "2", "--shutdown-grace", "10s"]);
    let addr = server.addr;
    let slow = std::thread::spawn(move || {
        let start = Instant::now();
        let res = get(addr, "/sleep?ms=1000");
        (res, start.elapsed())
    });
    wait_request_in_handler(&server);
    let signalled = Instant::now();
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(10 + 3))
        .expect("exited within the grace");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", server.log());
    let (res, elapsed) = slow.join().unwrap();
    let res = res.expect("in-flight request answered");
    assert_eq!(res.status, 200);
    assert_eq!(res.body, b"slept\n");
    assert_eq!(res.header("connection"), Some("close"));
    assert!(elapsed >= Duration::from_millis(1000));
    // Once the request is done, not at the end of the 10 s grace.
    assert!(took < Duration::from_secs(8), "took {took:?}");
    // New connections are refused once it is gone.
    assert!(get(addr, "/").is_err());
}

/// On SIGTERM a kept-alive connection whose client comes back within
/// `--shutdown-idle-timeout` gets its answer, with `Connection: close`; one that stays idle is
/// closed once idle that long.
#[test]
fn sigterm_answers_a_returning_keep_alive_client_with_close_and_closes_idle_connections() {
    let mut server = Server::start(&[
        "--workers",
        "2",
        "--keep-alive-timeout",
        "30s",
        "--shutdown-grace",
        "20s",
        "--shutdown-idle-timeout",
        "5s",
    ]);
    let mut returning = support::connect(server.addr);
    let mut idle = support::connect(server.addr);
    for s in [&mut returning, &mut idle] {
        std::io::Write::write_all(s, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let res = support::read_response(s).unwrap();
        assert_eq!(res.status, 200);
        assert_eq!(res.header("keep-alive"), Some("timeout=30"));
    }
    let signalled = Instant::now();
    server.signal("TERM");
    // Come back once both workers are draining (whichever holds `returning`), well within
    // the idle allowance, which counts from when the connection went idle, before the signal.
    server.wait_log("both workers draining", |log| {
        log.lines()
            .filter(|l| l.contains("draining") && l.contains("level=Immediate"))
            .count()
            == 2
    });
    std::io::Write::write_all(&mut returning, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let res = support::read_response(&mut returning).expect("answered while draining");
    assert_eq!(res.status, 200);
    assert_eq!(res.header("connection"), Some("close"));
    assert_eq!(res.header("keep-alive"), None);
    support::time_until_closed(&mut returning);
    support::time_until_closed(&mut idle);
    // Closed once idle for the 5 s allowance, not at the end of the 20 s grace.
    let t = signalled.elapsed();
    assert!(
        t < Duration::from_secs(15),
        "idle connection closed after {t:?}"
    );
    let status = server.wait_exit(PATIENCE).expect("exited");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sigterm_aborts_what_exceeds_the_grace_period() {
    let mut server = Server::start(&["--workers", "1", "--shutdown-grace", "500ms"]);
    let addr = server.addr;
    let slow = std::thread::spawn(move || get(addr, "/sleep?ms=30000"));
    wait_request_in_handler(&server);
    let signalled = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(PATIENCE).expect("exited");
    assert_eq!(status.code(), Some(0));
    // At the grace (500 ms, plus the abort grace), far before the request's 30 s.
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "{:?}",
        signalled.elapsed()
    );
    // When the grace ran out the request's AbortSignal fired: `/sleep` stopped and
    // answered instead of being cut off mid-request.
    let res = slow
        .join()
        .unwrap()
        .expect("the overlong request was stopped and answered");
    assert_eq!(res.status, 503);
    assert_eq!(res.body, b"stopped: server shutting down\n");
}

#[test]
fn a_client_that_disconnects_frees_its_work_at_once() {
    let server = Server::start(&["--workers", "1", "--metrics-interval", "100ms"]);
    let mut stream = support::connect(server.addr);
    // A first request on the connection: once it is answered the worker is serving it.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(support::read_response(&mut stream).unwrap().status, 200);
    stream
        .write_all(b"GET /sleep?ms=30000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    wait_request_in_handler(&server);
    let left = Instant::now();
    drop(stream);
    // The connection's gauge drops when its task ends, after the request's future (and
    // with it the work) was dropped: wait for all three, not just the counters.
    let text = server.wait_metrics("work cancelled and connection closed", |t| {
        metric(t, "demo_work_cancelled_total") == Some(1.0)
            && metric(t, "abort_total{reason=\"client_gone\"}") == Some(1.0)
            && metric(t, "http_connections_open") == Some(0.0)
    });
    assert!(
        left.elapsed() < Duration::from_secs(10),
        "{:?}",
        left.elapsed()
    );
    assert!(text.contains("# TYPE abort counter"), "{text}");
    assert_eq!(metric(&text, "abort_total{reason=\"shutdown\"}"), Some(0.0));
    assert_eq!(metric(&text, "http_connections_open"), Some(0.0));
}

#[test]
fn workers_exit_when_the_supervisor_dies() {
    let server = Server::start(&["--workers", "2", "--shutdown-grace", "1s"]);
    let workers = server.workers();
    assert_eq!(workers.len(), 2);
    support::signal(server.pid, "KILL");
    let deadline = Instant::now() + PATIENCE;
    while workers.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "orphaned workers {workers:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_sum_over_workers_and_survive_restarts() {
    let server = Server::start(&["--workers", "2", "--metrics-interval", "100ms"]);
    // Fresh connections are spread over both workers' sockets by the kernel.
    for _ in 0..100 {
        assert_eq!(get(server.addr, "/").unwrap().status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(server.addr, "/missing").unwrap().status, 404);
    }
    let expect = |t: &str, ok: f64| {
        metric(t, "http_requests_total{status=\"200\"}") == Some(ok)
            && metric(t, "http_requests_total{status=\"404\"}") == Some(3.0)
    };
    let text = server.wait_metrics("summed counters", |t| expect(t, 100.0));
    assert!(text.contains("# TYPE http_requests counter"));
    assert!(text.contains("# TYPE http_connections_open gauge"));
    assert!(text.contains("# TYPE cluster_worker_restarts counter"));
    assert_eq!(metric(&text, "cluster_workers"), Some(2.0));
    // Counters do not go backwards when the workers are replaced.
    server.signal("HUP");
    server.wait_metrics("rolled", |t| {
        metric(t, "cluster_rolling_restarts_total") == Some(1.0)
    });
    for _ in 0..10 {
        assert_eq!(get(server.addr, "/").unwrap().status, 200);
    }
    server.wait_metrics("counters kept across the restart", |t| expect(t, 110.0));
}

#[test]
fn metrics_are_fresh_at_scrape_time() {
    // Periodic reports are an hour apart: only scrape-on-demand can show these requests.
    let server = Server::start(&["--workers", "2", "--metrics-interval", "1h"]);
    for _ in 0..20 {
        assert_eq!(get(server.addr, "/").unwrap().status, 200);
    }
    let text = server.metrics();
    assert_eq!(
        metric(&text, "http_requests_total{status=\"200\"}"),
        Some(20.0),
        "{text}"
    );
}

#[test]
fn a_second_server_on_the_same_port_is_refused() {
    // SO_REUSEPORT would let it join the port and take a share of the traffic silently.
    let first = Server::start(&["--workers", "1"]);
    for workers in ["2", "0"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cluster"))
            .args(["--listen", &first.addr.to_string(), "--admin", "off"])
            .args(["--workers", workers])
            .output()
            .expect("run a second server");
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("already in use"), "{stderr}");
    }
    assert_eq!(get(first.addr, "/").unwrap().status, 200);
}

#[test]
fn single_process_mode() {
    let mut server = Server::start(&["--workers", "0", "--shutdown-grace", "2s"]);
    assert!(server.workers().is_empty(), "no worker processes");
    assert_eq!(get(server.addr, "/").unwrap().body, b"Hello, World!");
    server.wait_metrics("own metrics", |t| {
        metric(t, "http_requests_total{status=\"200\"}") == Some(1.0)
    });
    server.signal("INT");
    assert_eq!(server.wait_exit(PATIENCE).unwrap().code(), Some(0));
}
