//! Hostile traffic against the real binary on 127.0.0.1 (issue 8): connection floods,
//! slowloris, malformed heads, oversized bodies. Loads are scaled down to stay quick on a
//! shared 2-core machine; the full-size versions are `#[ignore]`d soak tests:
//!
//! ```sh
//! cargo test -p cluster --release --test hostile -- --ignored --nocapture
//! ```
//!
//! Timing is reported (`--nocapture`), never asserted beyond generous bounds.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// Open descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn fd_total(pids: &[u32]) -> usize {
    pids.iter().map(|&p| fd_count(p)).sum()
}

/// Waits (at most `PATIENCE`) until the workers' descriptors are back within `slack` of
/// `baseline`; returns the final count.
fn wait_fds_back(pids: &[u32], baseline: usize, slack: usize) -> usize {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = fd_total(pids);
        if now <= baseline + slack {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "worker descriptors stayed at {now} (baseline {baseline})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `n` ready workers and returns their pids.
fn ready_workers(server: &Server, n: usize) -> Vec<u32> {
    server.wait_metrics("workers ready", |m| {
        metric(m, "cluster_workers") == Some(n as f64)
    });
    let pids = server.workers();
    assert_eq!(pids.len(), n, "{pids:?}");
    pids
}

fn restarts(server: &Server) -> f64 {
    metric(&server.metrics(), "cluster_worker_restarts_total").unwrap_or(0.0)
}

/// Raises this test process's own descriptor limit (floods open thousands of sockets).
fn raise_own_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

// ===== 1. connection cap =====

#[test]
fn connections_beyond_the_cap_are_refused_at_once_and_descriptors_come_back() {
    const CAP: usize = 40;
    const EXTRA: usize = 30;
    let server = Server::start(&[
        "--workers",
        "1",
        "--max-connections",
        &CAP.to_string(),
        "--header-timeout",
        "60s",
        "--keep-alive-timeout",
        "60s",
    ]);
    let pids = ready_workers(&server, 1);
    assert_eq!(get(server.addr, "/").unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = fd_total(&pids);

    // Fill the cap with keep-alive clients, each of which got one answer.
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut s = connect(server.addr);
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut s).unwrap().status, 200);
        held.push(s);
    }
    server.wait_metrics("cap reached", |m| {
        metric(m, "http_connections_open") == Some(CAP as f64)
    });

    // Beyond the cap: answered 503 (or reset) and closed at once, never left hanging.
    let mut slowest = Duration::ZERO;
    let mut saw_503 = 0;
    for _ in 0..EXTRA {
        let start = Instant::now();
        let mut s = connect(server.addr);
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("over-cap connection not closed: {e}"),
        }
        slowest = slowest.max(start.elapsed());
        if !got.is_empty() {
            let text = String::from_utf8_lossy(&got);
            assert!(
                text.starts_with("HTTP/1.1 503 ") && text.contains("Connection: close"),
                "{text}"
            );
            saw_503 += 1;
        }
    }
    eprintln!("{EXTRA} over-cap connections: {saw_503} got 503, slowest closed in {slowest:?}");
    assert!(saw_503 > 0, "no over-cap client got the 503");

    // The connections inside the cap are still served.
    for s in held.iter_mut().take(5) {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let res = read_response(s).unwrap();
        assert_eq!((res.status, &res.body[..]), (200, &b"ok"[..]));
    }
    let m = server.metrics();
    assert_eq!(
        metric(&m, "http_connections_refused_total"),
        Some(EXTRA as f64),
        "{m}"
    );

    // Closing the flood frees everything; new clients are served again.
    drop(held);
    let after = wait_fds_back(&pids, baseline, 2);
    eprintln!("worker descriptors: baseline {baseline}, after {after}");
    assert_eq!(get(server.addr, "/").unwrap().status, 200);
    assert_eq!(server.workers(), pids, "the worker was not replaced");
    assert_eq!(restarts(&server), 0.0);
}

// ===== 2. idle flood and slowloris =====

/// What a flood connection saw.
#[derive(Debug)]
enum FloodEnd {
    /// Closed by the server (EOF or reset) with no response, after this long.
    Closed(Duration),
    /// Connecting failed (counted; the server's backlog may be full under a huge flood).
    ConnectFailed,
    /// Anything else: response bytes, still open at the bound, a write error before close.
    Wrong(String),
}

/// A connection that sends nothing (`drip == None`) or a never-ending request head one
/// byte per `drip`; returns how it ended. Bounded by `bound`.
async fn flood_connection(addr: SocketAddr, drip: Option<Duration>, bound: Duration) -> FloodEnd {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let Ok(Ok(mut s)) = tokio::time::timeout(bound, tokio::net::TcpStream::connect(addr)).await
    else {
        return FloodEnd::ConnectFailed;
    };
    // Long enough that the head can never complete within the bound.
    let head: Vec<u8> = b"GET / HTTP/1.1\r\nHost: t\r\n"
        .iter()
        .copied()
        .chain(std::iter::repeat(b'x'))
        .take(100_000)
        .collect();
    let mut buf = [0u8; 256];
    let mut next = 0;
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let tick = async {
            match drip {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = s.read(&mut buf) => return match read {
                Ok(0) => FloodEnd::Closed(start.elapsed()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    FloodEnd::Closed(start.elapsed())
                }
                Ok(n) => FloodEnd::Wrong(format!("response bytes: {:?}", String::from_utf8_lossy(&buf[..n]))),
                Err(e) => FloodEnd::Wrong(format!("read error: {e}")),
            },
            _ = tick => {
                // A failed write means the server closed: the read arm reports it next.
                let _ = s.write_all(&head[next..next + 1]).await;
                next += 1;
            }
            _ = tokio::time::sleep_until(deadline) => {
                return FloodEnd::Wrong(format!("still open after {bound:?}"));
            }
        }
    }
}

/// Normal clients on their own thread (so the flood's runtime does not slow them): one
/// `GET /` per fresh connection, back to back, until `stop`; returns (successes, failures,
/// latencies).
fn normal_clients(
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, Vec<String>, Vec<Duration>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failed, mut lat) = (0, Vec::new(), Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let start = Instant::now();
            match get(addr, "/") {
                Ok(res) if res.status == 200 && res.body == b"Hello, World!" => {
                    ok += 1;
                    lat.push(start.elapsed());
                }
                Ok(res) => failed.push(format!("{res:?}")),
                Err(e) => failed.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (ok, failed, lat)
    })
}

/// Floods a fresh two-worker server with `idle` silent connections and `slow` slowloris
/// connections (one byte per `drip`) under `--header-timeout header_timeout`, while normal
/// clients keep asking; checks every flood connection is closed without an answer well
/// before `bound`, every normal request succeeds, and the workers' descriptors come back.
fn flood(idle: usize, slow: usize, drip: Duration, header_timeout: &str, bound: Duration) {
    let own = raise_own_nofile();
    assert!(
        own as usize > idle + slow + 256,
        "this process may open only {own} descriptors"
    );
    let server = Server::start(&["--workers", "2", "--header-timeout", header_timeout]);
    let pids = ready_workers(&server, 2);
    assert_eq!(get(server.addr, "/").unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = fd_total(&pids);
    let addr = server.addr;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let watched = pids.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let normal = normal_clients(addr, stop.clone());
    let (ends, peak) = rt.block_on(async move {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..idle + slow {
            let drip = (i >= idle).then_some(drip);
            set.spawn(flood_connection(addr, drip, bound));
            if i % 100 == 99 {
                // Spread the connects a little so the flood is not all SYNs in one tick.
                tokio::task::yield_now().await;
            }
        }
        // Peak descriptors while the flood is open (sampled once, shortly after).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let peak = fd_total(&watched);
        let mut ends = Vec::new();
        while let Some(end) = set.join_next().await {
            ends.push(end.unwrap());
        }
        (ends, peak)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let normal = normal.join().unwrap();

    let mut closed: Vec<Duration> = ends
        .iter()
        .filter_map(|e| match e {
            FloodEnd::Closed(d) => Some(*d),
            _ => None,
        })
        .collect();
    closed.sort();
    let connect_failed = ends
        .iter()
        .filter(|e| matches!(e, FloodEnd::ConnectFailed))
        .count();
    let wrong: Vec<&str> = ends
        .iter()
        .filter_map(|e| match e {
            FloodEnd::Wrong(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    let (ok, failed, mut lat) = normal;
    lat.sort();
    let after = wait_fds_back(&server.workers(), baseline, 4);
    eprintln!(
        "flood: {idle} idle + {slow} slowloris (1 byte / {drip:?}), --header-timeout {header_timeout}: \
         {} closed without an answer (min {:?}, median {:?}, max {:?}), {connect_failed} connects failed, \
         {} wrong; worker fds baseline {baseline}, peak {peak}, after {after}; normal clients \
         {ok} ok / {} failed, latency p50 {:?} p99 {:?} max {:?}",
        closed.len(),
        closed.first(),
        percentile(&closed, 0.5),
        closed.last(),
        wrong.len(),
        failed.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last(),
    );
    assert!(wrong.is_empty(), "{:?}", &wrong[..wrong.len().min(5)]);
    assert_eq!(connect_failed, 0);
    assert!(
        failed.is_empty(),
        "normal clients failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 0, "no normal request completed");
    assert_eq!(server.workers(), pids, "no worker was replaced");
    assert_eq!(restarts(&server), 0.0);
}

#[test]
fn idle_flood_and_slowloris_are_closed_at_the_header_timeout() {
    // The heads would need 100,000 bytes at 5 bytes/s: only the timeout closes them.
    flood(
        400,
        200,
        Duration::from_millis(200),
        "1s",
        Duration::from_secs(30),
    );
}

/// The issue's full size: 10,000 silent connections and 2,000 slowloris at one byte per
/// second, default `--header-timeout 10s`. Run with
/// `cargo test -p cluster --release --test hostile -- --ignored --nocapture`.
#[test]
#[ignore = "soak: 12,000 connections, about 15 s"]
fn soak_idle_flood_10000_and_slowloris_2000() {
    flood(
        10_000,
        2_000,
        Duration::from_secs(1),
        "10s",
        Duration::from_secs(60),
    );
}
