//! Hostile traffic against the real binary on 127.0.0.1 (issue 8): connection floods,
//! slowloris, malformed heads, oversized bodies. Loads are scaled down to stay quick on a
//! shared 2-core machine; the full-size versions are `#[ignore]`d soak tests:
//!
//! ```sh
//! cargo test -p cluster --test hostile -- --ignored --nocapture soak_
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

/// `"10s"` / `"1s"` as seconds (the flood's header timeouts are whole seconds).
fn humantime_secs(s: &str) -> f64 {
    s.trim_end_matches('s').parse().expect("whole seconds")
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
    // A refusal is counted before its connection is closed; waiting for the count rather
    // than reading it once keeps the test independent of that order.
    server.wait_metrics("every over-cap connection counted as refused", |m| {
        metric(m, "http_connections_refused_total") == Some(EXTRA as f64)
    });

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
    /// Closed by the server with no response, this long after the client started to connect
    /// (the server's header timer starts later, at accept: a connection may first wait in
    /// the listen backlog, or for SYN retries when the backlog overflows).
    Closed(Duration),
    /// Reset by the peer, this long after connect (counted apart from orderly closes).
    Reset(Duration),
    /// Connecting failed (counted; the server's backlog may be full under a huge flood).
    ConnectFailed,
    /// Anything else: response bytes, still open at the bound, a write error before close.
    Wrong(String),
}

/// A connection that sends nothing (`drip == None`) or a never-ending request head one
/// byte per `drip`; returns how it ended. Bounded by `bound`.
async fn flood_connection(addr: SocketAddr, drip: Option<Duration>, bound: Duration) -> FloodEnd {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Measured from before connect: an upper bound of the time since the server's accept
    // (where its header timer starts), so a close "before the timeout" is really early.
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
                    FloodEnd::Reset(start.elapsed())
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
    let server = Server::start(&[
        "--workers",
        "2",
        "--header-timeout",
        header_timeout,
        // The kernel caps it at net.core.somaxconn (4096 here).
        "--backlog",
        "4096",
    ]);
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
        // Peak of the workers' descriptors while the flood is open, sampled every 100 ms.
        let mut peak = 0;
        let mut ends = Vec::new();
        let mut sample = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                end = set.join_next() => match end {
                    Some(end) => ends.push(end.unwrap()),
                    None => break,
                },
                _ = sample.tick() => peak = peak.max(fd_total(&watched)),
            }
        }
        (ends, peak)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let normal = normal.join().unwrap();

    let mut closed: Vec<Duration> = ends
        .iter()
        .filter_map(|e| match e {
            FloodEnd::Closed(d) | FloodEnd::Reset(d) => Some(*d),
            _ => None,
        })
        .collect();
    closed.sort();
    let resets = ends
        .iter()
        .filter(|e| matches!(e, FloodEnd::Reset(_)))
        .count();
    let timeout = humantime_secs(header_timeout);
    let early = closed
        .iter()
        .filter(|d| d.as_secs_f64() < timeout * 0.9)
        .count();
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
         {} closed without an answer ({resets} of them by reset; {early} before 0.9 x the timeout; \
         min {:?}, median {:?}, max {:?} after connect started), {connect_failed} connects failed, \
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
    // Closes are timed from before connect, so none may come before the header timeout.
    assert_eq!(early, 0, "connections closed before the header timeout");
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
/// `cargo test -p cluster --test hostile -- --ignored --nocapture soak_`.
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

// ===== 3. malformed requests =====

/// What a malformed request must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A 4xx, or the connection closed without an answer.
    Reject,
    /// Exactly this status, or the connection closed without an answer.
    Status(u16),
    /// Tolerated by RFC 9112 (a recipient MAY accept it): any answer below 500, or a close.
    MayAccept,
    /// Exactly this status and then the connection closed (or closed without an answer).
    StatusThenClose(u16),
    /// Ambiguous framing (RFC 9112 §6.1: `Transfer-Encoding` with `Content-Length`): a 4xx,
    /// or an answer after which the connection is closed. hyper frames by
    /// `Transfer-Encoding`, drops `Content-Length` from the request and closes after the
    /// response, which the RFC allows.
    MustClose,
}

/// How the connection behaved after one malformed request.
#[derive(Debug)]
enum Seen {
    /// Closed (EOF or reset) before any answer.
    Closed,
    /// Answered with `status`; `then` says what happened to a valid request sent next on the
    /// same connection.
    Answered { status: u16, then: FollowUp },
}

#[derive(Debug, PartialEq)]
enum FollowUp {
    /// Exactly one correct answer (`200 ok`), nothing after it.
    Served,
    /// The server had closed the connection.
    Closed,
}

const FOLLOW_UP: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted
    )
}

/// Sends `bytes` on a fresh connection, then (if it lives on) a valid request.
fn try_malformed(addr: SocketAddr, bytes: &[u8]) -> Result<Seen, String> {
    let mut s = connect(addr);
    if let Err(e) = s.write_all(bytes) {
        return if is_closed(&e) {
            Ok(Seen::Closed)
        } else {
            Err(format!("write: {e}"))
        };
    }
    let first = match read_response(&mut s) {
        Ok(res) => res,
        Err(e) if is_closed(&e) && e.to_string().contains("after 0 bytes") => {
            return Ok(Seen::Closed)
        }
        Err(e) if is_closed(&e) => return Err(format!("closed in the middle of an answer: {e}")),
        Err(e) => return Err(format!("no answer and not closed: {e}")),
    };
    if first.status >= 500 || first.status < 100 {
        return Err(format!("answered {}: {first:?}", first.status));
    }
    let then = match s.write_all(FOLLOW_UP).and_then(|()| read_response(&mut s)) {
        Err(e) if is_closed(&e) && !e.to_string().contains("head") => FollowUp::Closed,
        Err(e) if is_closed(&e) && e.to_string().contains("after 0 bytes") => FollowUp::Closed,
        Err(e) => return Err(format!("follow-up: {e}")),
        Ok(res) if res.status == 200 && res.body == b"ok" => {
            // Exactly one answer: nothing else may arrive (a desynchronised connection
            // would answer the smuggled remainder too).
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut extra = [0u8; 512];
            match s.read(&mut extra) {
                Ok(0) => {}
                Ok(n) => {
                    return Err(format!(
                        "extra bytes after the follow-up: {:?}",
                        String::from_utf8_lossy(&extra[..n])
                    ))
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) || is_closed(&e) => {}
                Err(e) => return Err(format!("after the follow-up: {e}")),
            }
            FollowUp::Served
        }
        Ok(res) => return Err(format!("follow-up desynchronised: {res:?}")),
    };
    Ok(Seen::Answered {
        status: first.status,
        then,
    })
}

fn judge(expect: Expect, seen: &Seen) -> Result<(), String> {
    let Seen::Answered { status, then } = seen else {
        return Ok(()); // a close is acceptable for every bad request
    };
    let ok = match expect {
        Expect::Reject => (400..500).contains(status),
        Expect::Status(want) => status == &want,
        Expect::StatusThenClose(want) => status == &want && then == &FollowUp::Closed,
        Expect::MayAccept => true,
        Expect::MustClose => (400..500).contains(status) || then == &FollowUp::Closed,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {expect:?}, saw {seen:?}"))
    }
}

/// The corpus: (name, bytes, expectation). Requests are on `/` (a `GET`/`HEAD` route that
/// ignores bodies, so body-framing cases exercise hyper's framing, not a handler).
fn corpus() -> Vec<(&'static str, Vec<u8>, Expect)> {
    fn head(request_line: &str, headers: &str) -> Vec<u8> {
        format!("{request_line}\r\nHost: t\r\n{headers}\r\n").into_bytes()
    }
    fn post(headers: &str, body: &str) -> Vec<u8> {
        format!("POST / HTTP/1.1\r\nHost: t\r\n{headers}\r\n{body}").into_bytes()
    }
    fn raw(bytes: &[u8]) -> Vec<u8> {
        bytes.to_vec()
    }
    let long = |n: usize| "a".repeat(n);
    use Expect::*;
    vec![
        // --- methods
        ("space inside method", head("G ET / HTTP/1.1", ""), Reject),
        ("separator in method", head("GE(T / HTTP/1.1", ""), Reject),
        ("NUL in method", raw(b"GE\0T / HTTP/1.1\r\nHost: t\r\n\r\n"), Reject),
        ("leading space", head(" GET / HTTP/1.1", ""), Reject),
        ("non-ASCII method", raw(b"G\x80T / HTTP/1.1\r\nHost: t\r\n\r\n"), Reject),
        ("unknown method", head("FOO / HTTP/1.1", ""), Status(405)),
        ("lower-case method", head("get / HTTP/1.1", ""), Status(405)),
        ("empty method", head("/ HTTP/1.1", ""), Reject),
        ("8 KiB method", head(&format!("{} / HTTP/1.1", "X".repeat(8192)), ""), Reject),
        ("CONNECT authority-form", head("CONNECT t:80 HTTP/1.1", ""), Reject),
        // --- versions
        ("HTTP/1.2", head("GET / HTTP/1.2", ""), Reject),
        ("HTTP/2.0 request line", head("GET / HTTP/2.0", ""), Reject),
        ("HTTP/1.1x", head("GET / HTTP/1.1x", ""), Reject),
        ("lower-case version", head("GET / http/1.1", ""), Reject),
        ("HTTP/01.1", head("GET / HTTP/01.1", ""), Reject),
        ("HTTP/0.9", raw(b"GET /\r\n\r\n"), Reject),
        ("extra token after version", head("GET / HTTP/1.1 x", ""), Reject),
        ("HTTP/ without digits", head("GET / HTTP/", ""), Reject),
        ("no version", head("GET /", ""), Reject),
        // --- header syntax
        ("header without colon", head("GET / HTTP/1.1", "Xyz t\r\n"), Reject),
        ("space before colon", head("GET / HTTP/1.1", "X-A : b\r\n"), Reject),
        ("empty header name", head("GET / HTTP/1.1", ": b\r\n"), Reject),
        ("obs-fold", head("GET / HTTP/1.1", "X-A: a\r\n b\r\n"), Reject),
        ("NUL in header value", raw(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\0b\r\n\r\n"), Reject),
        ("CR in header value", raw(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n"), Reject),
        ("DEL in header value", raw(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x7fb\r\n\r\n"), Reject),
        ("separator in header name", head("GET / HTTP/1.1", "X(y): z\r\n"), Reject),
        ("non-ASCII header name", raw(b"GET / HTTP/1.1\r\nHost: t\r\nX\xc3\xa9: z\r\n\r\n"), Reject),
        ("bare LF line endings", raw(b"GET / HTTP/1.1\nHost: t\n\n"), MayAccept),
        ("mixed CRLF and LF", raw(b"GET / HTTP/1.1\r\nHost: t\n\r\n"), MayAccept),
        ("bare CR line ending", raw(b"GET / HTTP/1.1\rHost: t\r\n\r\n"), Reject),
        ("leading empty lines", raw(b"\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n"), MayAccept),
        ("missing Host", raw(b"GET / HTTP/1.1\r\n\r\n"), Status(400)),
        ("two Host headers", head("GET / HTTP/1.1", "Host: u\r\n"), Status(400)),
        ("two identical Host headers", head("GET / HTTP/1.1", "Host: t\r\n"), Status(400)),
        // Rejected before tower-singleflight: it must not share another request's answer.
        ("two Host headers on /expensive", head("GET /expensive/k HTTP/1.1", "Host: u\r\n"), StatusThenClose(400)),
        ("two Host headers on HTTP/1.0", head("GET / HTTP/1.0", "Host: u\r\nConnection: keep-alive\r\n"), Status(400)),
        // --- sizes
        ("101 headers", head("GET / HTTP/1.1", &"X-A: b\r\n".repeat(101)), Status(431)),
        ("70 KB header value", head("GET / HTTP/1.1", &format!("X-A: {}\r\n", long(70_000))), Status(431)),
        ("70 KB header name", head("GET / HTTP/1.1", &format!("{}: b\r\n", long(70_000))), Status(431)),
        ("70 KB URI", head(&format!("GET /{} HTTP/1.1", long(70_000)), ""), Status(431)),
        ("60 KB URI", head(&format!("GET /{} HTTP/1.1", long(60_000)), ""), Reject),
        // --- Content-Length
        ("two different Content-Lengths", post("Content-Length: 1\r\nContent-Length: 2\r\n", "ab"), Reject),
        ("Content-Length list", post("Content-Length: 1, 2\r\n", "ab"), Reject),
        ("negative Content-Length", post("Content-Length: -1\r\n", ""), Reject),
        ("non-numeric Content-Length", post("Content-Length: abc\r\n", ""), Reject),
        ("Content-Length with plus sign", post("Content-Length: +1\r\n", "a"), Reject),
        ("Content-Length overflow", post("Content-Length: 99999999999999999999999\r\n", ""), Reject),
        ("Content-Length hex", post("Content-Length: 0x1\r\n", "a"), Reject),
        ("empty Content-Length", post("Content-Length: \r\n", ""), Reject),
        // --- Transfer-Encoding
        ("TE gzip only", post("Transfer-Encoding: gzip\r\n", "0\r\n\r\n"), Reject),
        ("TE chunked, chunked", post("Transfer-Encoding: chunked, chunked\r\n", "0\r\n\r\n"), StatusThenClose(400)),
        ("TE chunked then gzip", post("Transfer-Encoding: chunked, gzip\r\n", "0\r\n\r\n"), Reject),
        ("TE xchunked", post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"), Reject),
        ("TE chunked twice as headers", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\n"), StatusThenClose(400)),
        ("TE chunked then identity header", post("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", "0\r\n\r\n"), Reject),
        ("TE on HTTP/1.0", raw(b"POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), MustClose),
        // --- smuggling shapes
        ("CL.TE", post("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", "0\r\n\r\nG"), MustClose),
        ("TE.CL", post("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", "8\r\nSMUGGLED\r\n0\r\n\r\n"), MustClose),
        ("CL.TE with tab", post("Content-Length: 5\r\nTransfer-Encoding:\tchunked\r\n", "0\r\n\r\n"), MustClose),
        ("TE with space before colon", post("Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", "0\r\n\r\n"), Reject),
        ("CL.CL smuggling", post("Content-Length: 0\r\nContent-Length: 44\r\n", "GET /x HTTP/1.1\r\nHost: t\r\n\r\n"), Reject),
        // --- chunked bodies
        ("chunk size not hex", post("Transfer-Encoding: chunked\r\n", "zz\r\nab\r\n0\r\n\r\n"), Reject),
        ("negative chunk size", post("Transfer-Encoding: chunked\r\n", "-1\r\na\r\n0\r\n\r\n"), Reject),
        ("chunk size overflow", post("Transfer-Encoding: chunked\r\n", "ffffffffffffffffff\r\na\r\n0\r\n\r\n"), Reject),
        ("chunk size 0x prefix", post("Transfer-Encoding: chunked\r\n", "0x1\r\na\r\n0\r\n\r\n"), Reject),
        ("chunk data longer than size", post("Transfer-Encoding: chunked\r\n", "1\r\nabc\r\n0\r\n\r\n"), Reject),
        ("chunk size with LF only", post("Transfer-Encoding: chunked\r\n", "1\na\r\n0\r\n\r\n"), MayAccept),
        // --- targets
        ("non-UTF-8 path", raw(b"GET /\xff\xfe HTTP/1.1\r\nHost: t\r\n\r\n"), Reject),
        ("percent-encoded non-UTF-8 path", head("GET /%ff%fe HTTP/1.1", ""), Status(404)),
        ("static non-UTF-8", head("GET /static/%ff HTTP/1.1", ""), Reject),
        ("static traversal", head("GET /static/../../../etc/passwd HTTP/1.1", ""), Reject),
        ("static encoded traversal", head("GET /static/%2e%2e/%2e%2e/etc/passwd HTTP/1.1", ""), Reject),
        ("static NUL", head("GET /static/a%00b HTTP/1.1", ""), Reject),
        ("space in target", head("GET /a b HTTP/1.1", ""), Reject),
        ("sleep with two ms", head("GET /sleep?ms=1&ms=2 HTTP/1.1", ""), Status(400)),
        ("sleep with huge ms", head("GET /sleep?ms=999999999999999999999 HTTP/1.1", ""), Status(400)),
        // --- not HTTP at all
        ("TLS ClientHello", raw(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03abcdefghijklmnopqrstuvwxyzABCDEF\r\n\r\n"), Reject),
        ("binary junk", (0u8..=255).chain(b"\r\n\r\n".iter().copied()).collect(), Reject),
    ]
}

#[test]
fn malformed_request_corpus_gets_4xx_or_close_and_never_desynchronises() {
    let server = Server::start(&["--workers", "1", "--header-timeout", "5s"]);
    let pids = ready_workers(&server, 1);
    let cases = corpus();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (name, bytes, expect) in &cases {
        let seen = try_malformed(server.addr, bytes).and_then(|seen| {
            judge(*expect, &seen)?;
            Ok(seen)
        });
        eprintln!("{name:40} {seen:?}");
        if let Err(e) = seen {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(get(server.addr, "/").unwrap().status, 200);
    assert_eq!(server.workers(), pids, "a worker died");
    assert_eq!(restarts(&server), 0.0);
}

// ===== 4. request body limit =====

/// Writes `parts` on a clone of `s` from another thread (the server may answer and stop
/// reading before the body is complete, so writing must not block the reader).
fn write_in_background(
    s: &std::net::TcpStream,
    parts: Vec<Vec<u8>>,
) -> std::thread::JoinHandle<()> {
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        for p in parts {
            if w.write_all(&p).is_err() {
                return; // the server answered and closed: expected past the limit
            }
        }
    })
}

fn chunked(total: usize, chunk: usize) -> Vec<Vec<u8>> {
    let mut parts =
        vec![b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk);
        let mut p = format!("{n:x}\r\n").into_bytes();
        p.extend(std::iter::repeat(b'x').take(n));
        p.extend_from_slice(b"\r\n");
        parts.push(p);
        left -= n;
    }
    parts.push(b"0\r\n\r\n".to_vec());
    parts
}

#[test]
fn bodies_over_max_body_size_get_413_declared_or_streamed() {
    const LIMIT: usize = 64 * 1024;
    let server = Server::start(&["--workers", "1", "--max-body-size", &LIMIT.to_string()]);
    let pids = ready_workers(&server, 1);

    // Within the limit, declared and streamed: counted, connection kept.
    let mut s = connect(server.addr);
    let mut req =
        format!("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {LIMIT}\r\n\r\n").into_bytes();
    req.extend(std::iter::repeat(b'x').take(LIMIT));
    s.write_all(&req).unwrap();
    let res = read_response(&mut s).unwrap();
    assert_eq!(
        (res.status, String::from_utf8_lossy(&res.body).into_owned()),
        (200, format!("received {LIMIT} bytes\n"))
    );
    for p in chunked(LIMIT, 4096) {
        s.write_all(&p).unwrap();
    }
    let res = read_response(&mut s).unwrap();
    assert_eq!(
        (res.status, String::from_utf8_lossy(&res.body).into_owned()),
        (200, format!("received {LIMIT} bytes\n"))
    );

    // A declared Content-Length over the limit: 413 before a byte of body is sent, on the
    // upload route and on a route that never reads bodies.
    for path in ["/upload", "/"] {
        let mut s = connect(server.addr);
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            LIMIT + 1
        )
        .unwrap();
        let res = read_response(&mut s).unwrap();
        assert_eq!(res.status, 413, "{path}: {res:?}");
    }

    // A chunked body that grows past the limit (4 MiB offered, 64 KiB allowed): 413.
    let mut s = connect(server.addr);
    let writer = write_in_background(&s, chunked(4 * 1024 * 1024, 16 * 1024));
    let res = read_response(&mut s).unwrap();
    assert_eq!(res.status, 413, "{res:?}");
    drop(s);
    writer.join().unwrap();

    let m = server.metrics();
    assert_eq!(
        metric(&m, "http_requests_total{status=\"413\"}"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(server.workers(), pids);
    assert_eq!(restarts(&server), 0.0);
}

// ===== 5. HTTP/2 rapid reset and CONTINUATION flood =====

/// One HTTP/2 `GET /` on a fresh prior-knowledge connection.
async fn h2_get(addr: SocketAddr) -> Result<http::StatusCode, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/"))
        .body(())
        .unwrap();
    let (res, _) = client.send_request(req, true).map_err(|e| e.to_string())?;
    let status = res.await.map_err(|e| e.to_string())?.status();
    driver.abort();
    Ok(status)
}

#[test]
fn http2_rapid_reset_is_cut_off_and_the_server_stays_responsive() {
    const STREAMS: usize = 5_000;
    let server = Server::start(&["--workers", "1"]);
    let pids = ready_workers(&server, 1);
    let addr = server.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (sent, ended) = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(conn);
        let mut client = client;
        let mut sent = 0;
        let attack = async {
            for _ in 0..STREAMS {
                client = match client.ready().await {
                    Ok(c) => c,
                    Err(_) => break,
                };
                // Each stream asks for expensive-looking work and is cancelled at once.
                let req = http::Request::get(format!("http://{addr}/sleep?ms=1000"))
                    .body(())
                    .unwrap();
                match client.send_request(req, true) {
                    Ok((_res, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
                    Err(_) => break,
                }
                sent += 1;
            }
        };
        tokio::time::timeout(PATIENCE, attack)
            .await
            .expect("the attack loop is bounded");
        // The server must end the connection (GOAWAY ENHANCE_YOUR_CALM) or survive it.
        let ended = tokio::time::timeout(PATIENCE, driver).await;
        (sent, format!("{ended:?}"))
    });
    eprintln!("rapid reset: {sent} streams opened and reset; connection: {ended}");
    // Whatever the attacked connection saw, a new client is served at once.
    let status = rt.block_on(async { tokio::time::timeout(PATIENCE, h2_get(addr)).await });
    assert_eq!(status, Ok(Ok(http::StatusCode::OK)));
    assert_eq!(get(addr, "/").unwrap().status, 200);
    assert!(
        ended.contains("ENHANCE_YOUR_CALM") || sent == STREAMS,
        "the attack connection was neither cut off nor fully served: sent {sent}, {ended}"
    );
    assert_eq!(server.workers(), pids);
    assert_eq!(restarts(&server), 0.0);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn http2_continuation_flood_is_cut_off_and_the_server_stays_responsive() {
    const FRAME: usize = 16 * 1024;
    const MAX_SENT: usize = 64 * 1024 * 1024;
    let server = Server::start(&["--workers", "1"]);
    let pids = ready_workers(&server, 1);
    let mut s = connect(server.addr);
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                         // HEADERS without END_HEADERS: `:method GET` (indexed), then a literal header whose
                                         // value claims 100 MB and continues over CONTINUATION frames that never end.
    let mut block = vec![0x82, 0x00, 0x03];
    block.extend_from_slice(b"x-a");
    // Value length 100,000,000 as an HPACK integer with a 7-bit prefix.
    let mut n: u64 = 100_000_000 - 127;
    block.push(0x7f);
    while n >= 128 {
        block.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    block.push(n as u8);
    start.extend(frame(0x1, 0x1, 1, &block)); // HEADERS, END_STREAM, no END_HEADERS
    s.write_all(&start).unwrap();
    let continuation = frame(0x9, 0, 1, &vec![b'a'; FRAME]);
    let reader = {
        let mut r = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut got = Vec::new();
            let end = r.read_to_end(&mut got);
            (started.elapsed(), got.len(), end.map_err(|e| e.kind()))
        })
    };
    let mut sent = start.len();
    let write_end = loop {
        if sent >= MAX_SENT {
            break None;
        }
        match s.write_all(&continuation) {
            Ok(()) => sent += continuation.len(),
            Err(e) => break Some(e.kind()),
        }
    };
    let (took, read, read_end) = reader.join().unwrap();
    eprintln!(
        "CONTINUATION flood: {} KiB sent before the write failed ({write_end:?}); server sent \
         {read} bytes then closed ({read_end:?}) after {took:?}",
        sent / 1024
    );
    assert!(
        write_end.is_some(),
        "{MAX_SENT} bytes of CONTINUATION frames accepted without closing"
    );
    assert_eq!(get(server.addr, "/").unwrap().status, 200);
    assert_eq!(server.workers(), pids);
    assert_eq!(restarts(&server), 0.0);
}

// ===== 6. worker crash under load =====

/// 64 keep-alive clients hammer `GET /` for `duration`; after `duration / 3` one worker is
/// killed with SIGKILL. Only requests in flight on that worker's connections may fail (each
/// client has at most one in flight and reconnects after a failure; new connections wait in
/// the slot's backlog, which the supervisor keeps open, until the replacement accepts).
fn crash_under_load(duration: Duration) {
    const CLIENTS: usize = 64;
    let server = Server::start(&["--workers", "2"]);
    let pids = ready_workers(&server, 2);
    let addr = server.addr;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut conn: Option<std::net::TcpStream> = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let s = match conn.as_mut() {
                        Some(s) => s,
                        None => conn.insert(connect(addr)),
                    };
                    let res = s
                        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                        .and_then(|()| read_response(s));
                    match res {
                        Ok(res) if res.status == 200 => ok += 1,
                        _ => {
                            failed += 1;
                            conn = None;
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(duration / 3);
    let victim = pids[0];
    signal(victim, "KILL");
    let killed = Instant::now();
    server.wait_metrics("replacement ready", |m| {
        metric(m, "cluster_workers") == Some(2.0)
            && metric(m, "cluster_worker_restarts_total") == Some(1.0)
    });
    let back = killed.elapsed();
    std::thread::sleep(duration.saturating_sub(duration / 3 + back));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    eprintln!(
        "kill -9 under load ({CLIENTS} keep-alive clients, {duration:?}): {ok} ok, {failed} failed; \
         replacement ready after {back:?} (metrics polled every 50 ms)"
    );
    assert!(
        failed <= CLIENTS as u64,
        "{failed} failures: more than the one in-flight request per connection"
    );
    assert!(ok > 0);
    let now = server.workers();
    assert_eq!(now.len(), 2);
    assert!(now.contains(&pids[1]) && !now.contains(&victim), "{now:?}");
}

#[test]
fn kill_9_of_a_worker_under_load_fails_only_its_in_flight_requests() {
    crash_under_load(Duration::from_secs(3));
}

/// The issue's 60 s version.
#[test]
#[ignore = "soak: 60 s of load"]
fn soak_kill_9_under_load_60s() {
    crash_under_load(Duration::from_secs(60));
}

#[test]
fn http2_streamed_body_over_max_body_size_gets_413() {
    const LIMIT: usize = 64 * 1024;
    let server = Server::start(&["--workers", "1", "--max-body-size", &LIMIT.to_string()]);
    let addr = server.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let statuses = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(conn);
        let mut statuses = Vec::new();
        // No content-length: the body is only known as it streams.
        for total in [LIMIT, 4 * LIMIT] {
            let mut client = client.clone().ready().await.unwrap();
            let req = http::Request::post(format!("http://{addr}/upload"))
                .body(())
                .unwrap();
            let (res, mut body) = client.send_request(req, false).unwrap();
            let send = async {
                let mut left = total;
                while left > 0 {
                    let n = left.min(8 * 1024);
                    body.reserve_capacity(n);
                    // Wait for flow-control capacity; stop if the server answered already.
                    let Some(Ok(cap)) = std::future::poll_fn(|cx| body.poll_capacity(cx)).await
                    else {
                        return;
                    };
                    let n = n.min(cap);
                    if body
                        .send_data(bytes::Bytes::from(vec![b'x'; n]), false)
                        .is_err()
                    {
                        return;
                    }
                    left -= n;
                }
                let _ = body.send_data(bytes::Bytes::new(), true);
            };
            let (res, ()) = tokio::time::timeout(PATIENCE, async { tokio::join!(res, send) })
                .await
                .expect("bounded");
            statuses.push(res.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
        }
        driver.abort();
        statuses
    });
    assert_eq!(statuses, vec![Ok(200), Ok(413)]);
}

// ===== 7. files mutated while served =====

/// A 4 MiB file whose every 8-byte word is its own offset: any misplaced, zeroed or
/// foreign byte is detectable.
fn pattern(len: usize, salt: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| ((i as u64 * 8) ^ salt).to_le_bytes())
        .collect()
}

/// Starts `GET /static/{name}`, reads the head and the first 64 KiB, runs `mutate`, then
/// reads the rest. Returns (declared length, body bytes received, closed early).
fn fetch_while(addr: SocketAddr, name: &str, mutate: impl FnOnce()) -> (usize, Vec<u8>) {
    // A small receive buffer (set before connecting, so it is also the advertised window) keeps
    // most of the file on the server side when we mutate it: the server cannot have handed the
    // whole response to this socket before the mutation.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    sock.connect_timeout(&addr.into(), PATIENCE)
        .expect("connect");
    let mut s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    write!(
        s,
        "GET /static/{name} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed inside the head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let declared: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("content-length");
    let mut body = vec![0u8; 64 * 1024];
    s.read_exact(&mut body).unwrap();
    mutate();
    // Until the server closes (EOF or reset): it must never send more than it declared.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    body.extend(rest);
    (declared, body)
}

/// Serves a 4 MiB file (through sendfile: plaintext HTTP/1, ≥ 64 KiB) and, 64 KiB into each
/// response, truncates it to 1 MiB (`truncate`) or replaces it by rename and deletes it.
fn file_mutation(truncate: bool) {
    const LEN: usize = 4 * 1024 * 1024;
    let root =
        std::env::temp_dir().join(format!("cluster-hostile-{}-{truncate}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let _cleanup = {
        struct Rm(std::path::PathBuf);
        impl Drop for Rm {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        Rm(root.clone())
    };
    let original = pattern(LEN, 0);
    let server = Server::start(&["--workers", "1", "--root", root.to_str().unwrap()]);
    let pids = ready_workers(&server, 1);
    let file = root.join("f.bin");
    std::fs::write(&file, &original).unwrap();
    assert_eq!(get(server.addr, "/static/f.bin").unwrap().body, original);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = fd_total(&pids);

    let mut report = Vec::new();
    let mut short_with_wrong_tail = Vec::new();
    for round in 0..5 {
        if !truncate {
            replace_and_delete(round, &root, &file, &original, server.addr, &mut report);
            continue;
        }
        // Truncated mid-transfer: the response must end short (not padded, not complete).
        std::fs::write(&file, &original).unwrap();
        let (declared, body) = fetch_while(server.addr, "f.bin", || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .unwrap()
                .set_len(1024 * 1024)
                .unwrap();
        });
        assert_eq!(declared, LEN);
        assert!(body.len() <= declared, "more bytes than declared");
        // Complete means identical. A short response is visibly incomplete (the connection
        // closed before `Content-Length` bytes); its tail may still differ from the old file:
        // sendfile(2) queues page-cache pages, not copies, so bytes already queued when the
        // file is truncated can reach the client changed. Counted and reported.
        let first_wrong = body.iter().zip(&original).position(|(a, b)| a != b);
        if body.len() == declared {
            assert!(
                first_wrong.is_none(),
                "round {round}: complete response with wrong bytes at {first_wrong:?}"
            );
        } else if let Some(at) = first_wrong {
            short_with_wrong_tail.push((
                body.len(),
                at,
                body[at..(at + 16).min(body.len())].to_vec(),
            ));
        }
        report.push(format!(
            "truncate: {} of {declared} bytes then closed",
            body.len()
        ));
    }
    eprintln!(
        "file mutation: {}; short responses whose tail differed from the old file \
         (received, first differing offset, bytes there): {short_with_wrong_tail:?}",
        report.join("; ")
    );
    let after = wait_fds_back(&pids, baseline, 2);
    eprintln!("worker descriptors: baseline {baseline}, after {after}");
    assert_eq!(get(server.addr, "/").unwrap().status, 200);
    assert_eq!(server.workers(), pids);
    assert_eq!(restarts(&server), 0.0);
}

/// Replaced (rename over it) and deleted mid-transfer: the open file is unaffected, so the
/// original bytes arrive complete.
fn replace_and_delete(
    round: usize,
    root: &std::path::Path,
    file: &std::path::Path,
    original: &[u8],
    addr: SocketAddr,
    report: &mut Vec<String>,
) {
    const LEN: usize = 4 * 1024 * 1024;
    // Replaced (rename over it) and deleted mid-transfer: the open file is unaffected,
    // so the original bytes arrive complete.
    for (what, mutate) in [
        (
            "replace",
            Box::new(|| {
                let tmp = root.join("f.tmp");
                std::fs::write(&tmp, pattern(LEN, 0xdead_beef)).unwrap();
                std::fs::rename(&tmp, file).unwrap();
            }) as Box<dyn FnOnce()>,
        ),
        ("delete", Box::new(|| std::fs::remove_file(file).unwrap())),
    ] {
        std::fs::write(file, original).unwrap();
        let (declared, body) = fetch_while(addr, "f.bin", mutate);
        assert_eq!(declared, LEN);
        assert!(
            body == original,
            "round {round}, {what}: {} bytes, not the original file",
            body.len()
        );
        if round == 0 {
            report.push(format!(
                "{what}: {} of {declared} bytes, original content",
                body.len()
            ));
        }
    }
}

#[test]
fn files_replaced_or_deleted_while_served_arrive_intact() {
    file_mutation(false);
}

/// sendfile(2) queues page-cache pages by reference and truncation zeroes the page-cache folio
/// past the new end in place, so bytes queued before the truncation can arrive as zeros.
/// tower-zerocopy holds each response's last byte back until the client has everything before
/// it and the file is checked (see RELIABILITY.md): the response must end short, never complete
/// with wrong bytes.
#[test]
fn file_truncated_while_served_is_never_complete_with_wrong_bytes() {
    file_mutation(true);
}

// ===== 8. drain under load =====

/// One kind of load: `clients` keep-alive clients, each looping on `GET path`.
#[derive(Debug, Clone, Copy)]
struct Load {
    path: &'static str,
    clients: usize,
}

/// `/sleep?ms=100`: every client always has a request in flight or is about to send one.
const SLEEPERS: Load = Load {
    path: "/sleep?ms=100",
    clients: 32,
};

/// A 4 MiB static file (sendfile): the server hands the whole body to the kernel long
/// before the client has read it.
const READERS: Load = Load {
    path: "/static/f.bin",
    clients: 8,
};

/// What one load client saw. Every request it wrote ends in exactly one of `ok`, `told_503`,
/// `race`, `lost_fresh`, `incomplete` or `other`; `told_close` counts answers (already in
/// `ok`/`told_503`) that carried `Connection: close`.
#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    told_503: u64,
    told_close: u64,
    /// Kept-alive connections the server had already closed, noticed (EOF or reset on a
    /// non-blocking peek) before the next request was written on them; the client then
    /// reconnects instead, as pooled clients (hyper-util's, Go's, browsers') do. No request
    /// is written, so none is lost.
    stale: u64,
    /// Requests written on a reused connection that then closed without one byte of
    /// answer: the HTTP/1.1 keep-alive race (a request crossing the server's close). RFC
    /// 9112 §9.3.1 lets a client retry such a request automatically (browsers and Go do, for
    /// idempotent ones); this client does, on a new connection.
    race: u64,
    /// Requests written on a fresh connection that then closed without an answer.
    lost_fresh: u64,
    /// Answers that started but did not complete.
    incomplete: u64,
    /// Connects refused (the server stopped listening); the client stops at the first.
    refused: u64,
    /// Requests without a complete answer: (what, when).
    failures: Vec<(String, Instant)>,
    other: Vec<String>,
}

/// The sum of every client's tally.
fn total<'a>(tallies: impl IntoIterator<Item = &'a Tally>) -> Tally {
    let mut t = Tally::default();
    for x in tallies {
        t.ok += x.ok;
        t.told_503 += x.told_503;
        t.told_close += x.told_close;
        t.stale += x.stale;
        t.race += x.race;
        t.lost_fresh += x.lost_fresh;
        t.incomplete += x.incomplete;
        t.refused += x.refused;
        t.failures.extend(x.failures.iter().cloned());
        t.other.extend(x.other.iter().cloned());
    }
    t
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} x 200, {} x 503, {} told Connection: close; {} stale connections noticed before \
             reuse; no answer: {} keep-alive races (reused connection, no byte of answer), {} on a \
             fresh connection, {} incomplete; {} connects refused; other {:?}",
            self.ok,
            self.told_503,
            self.told_close,
            self.stale,
            self.race,
            self.lost_fresh,
            self.incomplete,
            self.refused,
            self.other
        )
    }
}

/// True if the peer has closed `s` (EOF or an error is waiting), without blocking.
fn closed_by_peer(s: &std::net::TcpStream) -> bool {
    s.set_nonblocking(true).expect("non-blocking");
    let seen = s.peek(&mut [0u8; 1]);
    s.set_nonblocking(false).expect("blocking");
    match seen {
        Ok(0) => true,
        Ok(_) => false, // bytes nobody asked for: the next read reports them
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Counts the bytes read through it.
struct Counting<'a> {
    inner: &'a mut std::net::TcpStream,
    read: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

/// What the test is doing, as the load clients file their outcomes.
const SERVING: usize = 0;
const ROLLING: usize = 1;
const DRAINING: usize = 2;
const PHASES: usize = 3;
const PHASE_NAMES: [&str; PHASES] = ["before the signals", "rolling restarts", "drain"];

/// How long a load client runs at most: a guard against a hang, far beyond any scenario
/// (warm-up, each rolling restart waited for up to `PATIENCE`, the drain), however loaded
/// the machine is.
const LOAD_CLIENT_BOUND: Duration = Duration::from_secs(120);

/// Starts the keep-alive clients of `loads`; each runs until `stop`, a refused connect, or
/// `LOAD_CLIENT_BOUND`, and files each outcome under the `phase` current when it happened.
fn load_clients(
    addr: SocketAddr,
    loads: &[Load],
    stop: &Arc<std::sync::atomic::AtomicBool>,
    phase: &Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<std::thread::JoinHandle<Vec<Tally>>> {
    let paths = loads
        .iter()
        .flat_map(|l| std::iter::repeat(l.path).take(l.clients));
    paths
        .map(|path| {
            let (stop, phase) = (stop.clone(), phase.clone());
            std::thread::spawn(move || load_client(addr, path, &stop, &phase))
        })
        .collect()
}

fn load_client(
    addr: SocketAddr,
    path: &str,
    stop: &std::sync::atomic::AtomicBool,
    phase: &std::sync::atomic::AtomicUsize,
) -> Vec<Tally> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tallies: Vec<Tally> = (0..PHASES).map(|_| Tally::default()).collect();
    let deadline = Instant::now() + LOAD_CLIENT_BOUND;
    let mut conn: Option<std::net::TcpStream> = None;
    while Instant::now() < deadline {
        if stop.load(Relaxed) {
            return tallies;
        }
        let t = &mut tallies[phase.load(Relaxed)];
        let reused = conn.is_some();
        if let Some(s) = &conn {
            if closed_by_peer(s) {
                t.stale += 1;
                conn = None;
                continue;
            }
        }
        let s = match conn.as_mut() {
            Some(s) => s,
            None => match std::net::TcpStream::connect(addr) {
                Ok(s) => {
                    s.set_read_timeout(Some(PATIENCE)).unwrap();
                    conn.insert(s)
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    t.refused += 1;
                    return tallies;
                }
                Err(e) => {
                    t.other.push(format!("connect: {e}"));
                    return tallies;
                }
            },
        };
        let mut counting = Counting { inner: s, read: 0 };
        let res = write!(counting.inner, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n")
            .and_then(|()| read_response_from(&mut counting));
        let got = counting.read;
        // Filed under the phase in which the answer (or its absence) was seen.
        let t = &mut tallies[phase.load(Relaxed)];
        match res {
            Ok(res) => {
                match res.status {
                    200 => t.ok += 1,
                    503 => t.told_503 += 1,
                    other => t.other.push(format!("status {other}")),
                }
                if res.header("connection") == Some("close") {
                    t.told_close += 1;
                    conn = None;
                }
            }
            Err(e) if is_closed(&e) => {
                let what = if got > 0 {
                    t.incomplete += 1;
                    "incomplete"
                } else if reused {
                    t.race += 1;
                    "keep-alive race"
                } else {
                    t.lost_fresh += 1;
                    "lost on a fresh connection"
                };
                t.failures.push((
                    format!("{path}: {what} after {got} bytes ({e})"),
                    Instant::now(),
                ));
                conn = None;
            }
            Err(e) => {
                t.other.push(format!("{path}: {e}"));
                conn = None;
            }
        }
    }
    tallies[phase.load(Relaxed)]
        .other
        .push("still running at the bound".into());
    tallies
}

/// A directory with `f.bin`, the 4 MiB file of [`READERS`]; removed on drop.
struct FileRoot(std::path::PathBuf);

impl FileRoot {
    fn new(what: &str) -> FileRoot {
        let root =
            std::env::temp_dir().join(format!("cluster-hostile-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("f.bin"), pattern(4 * 1024 * 1024, 0)).unwrap();
        FileRoot(root)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for FileRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Prints each failure with its time relative to `signalled`.
fn print_failures(t: &Tally, signalled: Instant) {
    for (what, when) in &t.failures {
        let ms = if *when >= signalled {
            format!("+{:.1} ms", (*when - signalled).as_secs_f64() * 1e3)
        } else {
            format!("-{:.1} ms", (signalled - *when).as_secs_f64() * 1e3)
        };
        eprintln!("  {ms}: {what}");
    }
}

/// One run of a load through rolling restarts and a drain.
struct Scenario<'a> {
    name: &'a str,
    /// Flags besides `--workers 2 --root DIR --shutdown-grace 5s`.
    args: &'a [&'a str],
    loads: &'a [Load],
    /// Load before the first signal.
    warm_up: Duration,
    /// `SIGHUP`s, each sent once the previous rolling restart completed and `between`
    /// passed.
    hups: usize,
    between: Duration,
    /// Send `SIGTERM` at the end (else the load just stops).
    term: bool,
}

/// The totals of each phase.
struct Outcome {
    phases: Vec<Tally>,
}

impl Scenario<'_> {
    fn run(&self) -> Outcome {
        use std::sync::atomic::Ordering::Relaxed;
        const GRACE: Duration = Duration::from_secs(5);
        let root = FileRoot::new(self.name);
        let mut args = vec![
            "--workers",
            "2",
            "--shutdown-grace",
            "5s",
            "--root",
            root.arg(),
        ];
        args.extend_from_slice(self.args);
        let mut server = Server::start(&args);
        ready_workers(&server, 2);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let phase = Arc::new(std::sync::atomic::AtomicUsize::new(SERVING));
        let clients = load_clients(server.addr, self.loads, &stop, &phase);
        let describe: Vec<String> = self
            .loads
            .iter()
            .map(|l| format!("{} x {}", l.clients, l.path))
            .collect();
        let describe = describe.join(" + ");
        std::thread::sleep(self.warm_up);
        let mut restart_times = Vec::new();
        for n in 1..=self.hups {
            phase.store(ROLLING, Relaxed);
            let signalled = Instant::now();
            server.signal("HUP");
            server.wait_metrics("rolling restart done", |m| {
                metric(m, "cluster_rolling_restarts_total") == Some(n as f64)
            });
            restart_times.push(signalled.elapsed());
            std::thread::sleep(self.between);
        }
        let mut exit = None;
        let signalled = Instant::now();
        if self.term {
            phase.store(DRAINING, Relaxed);
            server.signal("TERM");
            let status = server.wait_exit(GRACE + Duration::from_secs(3));
            exit = Some((status, signalled.elapsed()));
        } else {
            stop.store(true, Relaxed);
        }
        let per_client: Vec<Vec<Tally>> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        let phases: Vec<Tally> = (0..PHASES)
            .map(|p| total(per_client.iter().map(|c| &c[p])))
            .collect();
        eprintln!("{} ({describe}; --workers 2 {:?}):", self.name, self.args);
        if self.hups > 0 {
            eprintln!(
                "  {} rolling restarts, each done after {restart_times:?}",
                self.hups
            );
        }
        for (p, t) in phases.iter().enumerate() {
            if p == ROLLING && self.hups == 0 || p == DRAINING && !self.term {
                continue;
            }
            eprintln!("  {}: {t}", PHASE_NAMES[p]);
            print_failures(t, signalled);
        }
        if let Some((status, took)) = exit {
            eprintln!("  exit {status:?} after {took:?}");
            assert!(
                status.is_some_and(|s| s.success()),
                "exit: {status:?}\n{}",
                server.log()
            );
            assert!(took < GRACE, "took {took:?}");
        }
        for t in &phases {
            assert!(t.other.is_empty(), "{:?}", t.other);
            assert_eq!(
                t.failures.len(),
                0,
                "requests without a complete answer: {t}"
            );
        }
        let all = total(&phases);
        let clients: usize = self.loads.iter().map(|l| l.clients).sum();
        if self.term {
            // Each client ends at a refused connect, after its connection was told to close
            // (or found closed before the next request was written).
            assert_eq!(all.refused, clients as u64, "{all}");
        } else {
            assert_eq!(all.refused, 0, "{all}");
            assert_eq!(restarts(&server), 0.0);
        }
        assert!(all.ok > 0);
        Outcome { phases }
    }
}

/// Keep-alive clients loop on [`SLEEPERS`] and [`READERS`] until the server goes away;
/// SIGTERM after 1 s. The process must exit 0 within the grace period, and every request
/// written must get a complete answer; answers given during the drain carry
/// `Connection: close`. A kept-alive connection a client finds closed before it writes is
/// counted (`stale`), not lost: nothing was sent on it.
#[test]
fn sigterm_under_load_answers_or_closes_and_exits_within_the_grace() {
    Scenario {
        name: "SIGTERM under load",
        args: &[],
        loads: &[SLEEPERS, READERS],
        warm_up: Duration::from_secs(1),
        hups: 0,
        between: Duration::ZERO,
        term: true,
    }
    .run();
}

/// A rolling restart (`SIGHUP`) under the same load: the old workers drain gently (HTTP/1:
/// `Connection: close` on the next answer, idle connections closed at their advertised
/// keep-alive deadline), so no request may fail.
#[test]
fn sighup_under_sleep_and_file_load_fails_no_request() {
    let out = Scenario {
        name: "SIGHUP under load",
        args: &[],
        loads: &[SLEEPERS, READERS],
        warm_up: Duration::from_secs(1),
        hups: 1,
        between: Duration::from_secs(1),
        term: false,
    }
    .run();
    assert_eq!(total(&out.phases).told_503, 0);
}

/// More `/sleep` clients than the cluster admits: per worker `--max-in-flight 8`,
/// `--max-queued 8`, `--queue-timeout 100ms`, so 64 clients on `/sleep?ms=100` against
/// 2 x (8 + 8) places.
const OVERLOAD_ARGS: &[&str] = &[
    "--max-in-flight",
    "8",
    "--max-queued",
    "8",
    "--queue-timeout",
    "100ms",
];

const OVERLOAD: Load = Load {
    path: "/sleep?ms=100",
    clients: 64,
};

/// The issue's case: the `overload` load (`503`s expected: they are answers, not failures)
/// plus the `files` load, `SIGHUP`, then `SIGTERM`. No request may go without a complete
/// answer, in the rolling restart or in the drain.
#[test]
fn sighup_then_sigterm_under_overload_and_file_load_fails_no_request() {
    let out = Scenario {
        name: "SIGHUP then SIGTERM under overload",
        args: OVERLOAD_ARGS,
        loads: &[OVERLOAD, READERS],
        warm_up: Duration::from_secs(1),
        hups: 1,
        between: Duration::from_millis(500),
        term: true,
    }
    .run();
    let all = total(&out.phases);
    assert!(
        all.told_503 > 0,
        "the load did not exceed the capacity: {all}"
    );
}

/// The long version: 256 overload clients and 16 file readers, five rolling restarts 2 s
/// apart, then SIGTERM.
#[test]
#[ignore = "soak: about 20 s of load"]
fn soak_sighup_x5_then_sigterm_under_overload_and_file_load() {
    let out = Scenario {
        name: "soak: 5 x SIGHUP then SIGTERM under overload",
        args: OVERLOAD_ARGS,
        loads: &[
            Load {
                clients: 256,
                ..OVERLOAD
            },
            Load {
                clients: 16,
                ..READERS
            },
        ],
        warm_up: Duration::from_secs(2),
        hups: 5,
        between: Duration::from_secs(2),
        term: true,
    }
    .run();
    let all = total(&out.phases);
    assert!(
        all.told_503 > 0,
        "the load did not exceed the capacity: {all}"
    );
}

/// Rapid reset in its sharpest form: 1,000 HEADERS + RST_STREAM pairs in one write, so h2
/// sees the resets before hyper can accept the streams. Past
/// `H2_MAX_PENDING_ACCEPT_RESET_STREAMS` (20) the connection must get GOAWAY with
/// `ENHANCE_YOUR_CALM`, and the server must keep answering other clients.
#[test]
fn http2_rapid_reset_burst_gets_goaway_enhance_your_calm() {
    let server = Server::start(&["--workers", "1"]);
    let pids = ready_workers(&server, 1);
    // The server closes with our frames still unread, so its kernel may answer with a reset
    // that discards the GOAWAY before we read it: a few attempts, one GOAWAY needed.
    let mut seen = Vec::new();
    for _ in 0..5 {
        let goaway = rapid_reset_burst(server.addr);
        seen.push(goaway);
        if goaway.is_some() {
            break;
        }
    }
    eprintln!("rapid reset burst: GOAWAY error codes per attempt {seen:?}");
    assert_eq!(
        seen.last(),
        Some(&Some(0xb)),
        "expected GOAWAY ENHANCE_YOUR_CALM"
    );
    assert_eq!(get(server.addr, "/").unwrap().status, 200);
    assert_eq!(server.workers(), pids);
    assert_eq!(restarts(&server), 0.0);
}

/// One burst on a fresh connection; the GOAWAY error code the server sent, if one was read.
fn rapid_reset_burst(addr: SocketAddr) -> Option<u32> {
    let mut s = connect(addr);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
                                       // :method GET, :scheme http, :path /, :authority t
    let block = [0x82, 0x86, 0x84, 0x41, 0x01, b't'];
    for i in 0..1_000u32 {
        let id = 1 + 2 * i;
        out.extend(frame(0x1, 0x5, id, &block)); // HEADERS, END_STREAM | END_HEADERS
        out.extend(frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    // The server may close mid-write: that is one of the outcomes we accept.
    let _ = s.write_all(&out);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    // Walk the server's frames looking for GOAWAY (type 7) and its error code.
    let mut goaway = None;
    let mut at = 0;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        if got[at + 3] == 0x7 && at + 9 + 8 <= got.len() {
            let p = &got[at + 9..];
            goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        at += 9 + len;
    }
    goaway
}
