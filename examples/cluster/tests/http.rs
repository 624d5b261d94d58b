//! HTTP behaviour of the real binary: routes, status codes, keep-alive, timeouts, HTTP/2.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{connect, get, metric, read_response, time_until_closed, Server};

#[test]
fn routes_and_status_codes() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--max-head-size",
        "16384",
        "--metrics-interval",
        "100ms",
    ]);
    let res = get(server.addr, "/").unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.body, b"Hello, World!");
    assert!(res
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let res = get(server.addr, "/healthz").unwrap();
    assert_eq!((res.status, &res.body[..]), (200, &b"ok"[..]));
    assert_eq!(get(server.addr, "/sleep?ms=20").unwrap().status, 200);
    assert_eq!(get(server.addr, "/nope").unwrap().status, 404);
    for bad in [
        "/sleep",
        "/sleep?ms=abc",
        "/sleep?ms=-5",
        "/sleep?ms=99999999",
    ] {
        assert_eq!(get(server.addr, bad).unwrap().status, 400, "{bad}");
    }

    // Oversized head -> 431.
    let mut s = connect(server.addr);
    let big = "a".repeat(32 * 1024);
    write!(s, "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 431);

    // Too many header fields -> 431.
    let mut s = connect(server.addr);
    let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    write!(s, "GET / HTTP/1.1\r\nHost: t\r\n{many}\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 431);

    // Malformed requests -> 400.
    for junk in [
        "GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n",
        "GET /\u{1} HTTP/1.1\r\n\r\n",
        "GET / HTTP/9.9\r\n\r\n",
    ] {
        let mut s = connect(server.addr);
        s.write_all(junk.as_bytes()).unwrap();
        assert_eq!(read_response(&mut s).unwrap().status, 400, "{junk:?}");
    }

    // The server is still fine.
    assert_eq!(get(server.addr, "/").unwrap().status, 200);

    // hyper's automatic answers are counted too.
    server.wait_metrics("every status counted", |t| {
        let n = |s: u16| metric(t, &format!("http_requests_total{{status=\"{s}\"}}"));
        n(200) == Some(4.0) && n(400) == Some(7.0) && n(404) == Some(1.0) && n(431) == Some(2.0)
    });
}

#[tokio::test]
async fn thousand_requests_over_one_keep_alive_connection() {
    let server = Server::start(&["--workers", "2"]);
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for i in 0..1000 {
        let req = http::Request::get("/")
            .header("host", "test")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = sender.send_request(req).await.unwrap_or_else(|e| {
            panic!("request {i} failed: {e}");
        });
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["keep-alive"], "timeout=5", "request {i}");
        assert!(!res.headers().contains_key("connection"));
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Hello, World!");
    }
    // Still the same, still open connection.
    assert!(!conn.is_finished());
    drop(sender);
    conn.await.unwrap().unwrap();
}

#[test]
fn idle_connection_closed_after_keep_alive_timeout_not_header_timeout() {
    // keep-alive 1 s, header 6 s: the idle limit is the keep-alive timeout.
    let server = Server::start(&[
        "--workers",
        "1",
        "--keep-alive-timeout",
        "1s",
        "--header-timeout",
        "6s",
    ]);
    let mut s = connect(server.addr);
    // The server's idle timer starts between these two instants (once the answer is
    // written): the upper bound is timed from the first, the lower from the second, so a
    // slow machine can make neither pass wrongly.
    let before = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let res = read_response(&mut s).unwrap();
    let after = Instant::now();
    assert_eq!(res.header("keep-alive"), Some("timeout=1"));
    time_until_closed(&mut s);
    let (at_least, at_most) = (after.elapsed(), before.elapsed());
    assert!(
        at_least >= Duration::from_millis(500) && at_most < Duration::from_millis(5500),
        "closed {at_least:?} after the answer, {at_most:?} after the request"
    );
}

#[test]
fn idle_connection_outlives_a_shorter_header_timeout() {
    // header 1 s, keep-alive 10 s: hyper alone would close the idle connection at 1 s. The
    // client comes back after 2 s, far from the keep-alive deadline however late it runs.
    let server = Server::start(&[
        "--workers",
        "1",
        "--keep-alive-timeout",
        "10s",
        "--header-timeout",
        "1s",
    ]);
    let mut s = connect(server.addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(2000));
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let res = read_response(&mut s).expect("idle connection closed before the keep-alive timeout");
    assert_eq!(res.status, 200);
}

#[test]
fn silent_connection_closed_after_header_timeout() {
    let server = Server::start(&["--workers", "1", "--header-timeout", "1s"]);
    // The header timer starts at accept, between these two instants (see `idle_connection_…`).
    let before = Instant::now();
    let mut s = connect(server.addr);
    let after = Instant::now();
    time_until_closed(&mut s);
    let (at_least, at_most) = (after.elapsed(), before.elapsed());
    assert!(
        at_least >= Duration::from_millis(500) && at_most < Duration::from_secs(6),
        "closed {at_least:?} after connecting, {at_most:?} after starting to"
    );
}

#[test]
fn half_a_head_closed_after_header_timeout() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--header-timeout",
        "1s",
        "--keep-alive-timeout",
        "10s",
    ]);
    // On a fresh connection (the timer starts at accept, between these two instants)...
    let before = Instant::now();
    let mut s = connect(server.addr);
    let after = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    time_until_closed(&mut s);
    let (at_least, at_most) = (after.elapsed(), before.elapsed());
    assert!(
        at_least >= Duration::from_millis(500) && at_most < Duration::from_secs(6),
        "closed {at_least:?} after connecting, {at_most:?} after starting to"
    );
    // ...and on a kept-alive one, counted from the first byte of the second request.
    let mut s = connect(server.addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    // Idle longer than the header timeout, then half a head: the header timer starts at its
    // first byte, when the server reads it (after this write returns, so timed from before
    // the write the lower bound could only be met early by a server that read very late).
    std::thread::sleep(Duration::from_millis(1500));
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHos").unwrap();
    time_until_closed(&mut s);
    let t = start.elapsed();
    assert!(
        t >= Duration::from_millis(800) && t < Duration::from_secs(6),
        "closed after {t:?}"
    );
    // A half-written HTTP/2 preface is covered too (version sniffing has no timeout in hyper-util).
    let mut s = connect(server.addr);
    s.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    let t = time_until_closed(&mut s);
    assert!(t < Duration::from_secs(6), "closed after {t:?}");
}

#[test]
fn keep_alive_can_be_disabled() {
    let server = Server::start(&["--workers", "1", "--keep-alive-timeout", "0s"]);
    let mut s = connect(server.addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let res = read_response(&mut s).unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.header("connection"), Some("close"));
    assert_eq!(res.header("keep-alive"), None);
    // Closed right after the answer, not at a timeout (header timeout: 10 s).
    let t = time_until_closed(&mut s);
    assert!(t < Duration::from_secs(4), "closed after {t:?}");
    // A slow request is not disturbed by a zero keep-alive timeout.
    let res = get(server.addr, "/sleep?ms=300").unwrap();
    assert_eq!(res.status, 200);
}

#[test]
fn max_requests_per_connection_closes_after_the_last() {
    let server = Server::start(&["--workers", "1", "--max-requests-per-connection", "3"]);
    let mut s = connect(server.addr);
    for i in 1..=3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let res = read_response(&mut s).unwrap();
        assert_eq!(res.status, 200);
        if i < 3 {
            assert_eq!(res.header("keep-alive"), Some("timeout=5"));
            assert_eq!(res.header("connection"), None);
        } else {
            assert_eq!(res.header("connection"), Some("close"));
            assert_eq!(res.header("keep-alive"), None);
        }
    }
    // Closed right after the last answer, not at the keep-alive timeout (5 s).
    let t = time_until_closed(&mut s);
    assert!(t < Duration::from_secs(4), "closed after {t:?}");
}

#[tokio::test]
async fn http2_prior_knowledge() {
    let server = Server::start(&["--workers", "2", "--max-requests-per-connection", "50"]);
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // Concurrent streams on one connection, one of them slow.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let path = if i == 0 { "/sleep?ms=300" } else { "/" };
            let req = http::Request::get(format!("http://test{path}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let res = sender.send_request(req).await.unwrap();
            assert_eq!(res.version(), http::Version::HTTP_2);
            assert_eq!(res.status(), 200);
            // Connection-specific headers are forbidden in HTTP/2.
            assert!(!res.headers().contains_key("keep-alive"));
            res.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let body = t.await.unwrap();
        if i > 0 {
            assert_eq!(&body[..], b"Hello, World!");
        }
    }
    // The 50-request limit ends the connection with GOAWAY; streams in flight finish.
    let mut sender2 = sender.clone();
    let mut ok = 20;
    let mut refused = false;
    for _ in 0..40 {
        let req = http::Request::get("http://test/healthz")
            .body(Empty::<Bytes>::new())
            .unwrap();
        match sender2.send_request(req).await {
            Ok(res) => {
                assert_eq!(res.status(), 200);
                ok += 1;
            }
            Err(_) => {
                refused = true;
                break;
            }
        }
    }
    // hyper's graceful GOAWAY first advertises the maximum stream id and the final one a
    // round trip later, so a request or two sent in between may still be served.
    assert!(
        refused && (50..=55).contains(&ok),
        "served {ok}, refused {refused}"
    );
    drop((sender, sender2));
    tokio::time::timeout(support::PATIENCE, conn)
        .await
        .expect("connection closed after GOAWAY")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn http2_idle_connection_closed_after_keep_alive_timeout() {
    let server = Server::start(&[
        "--workers",
        "1",
        "--keep-alive-timeout",
        "1s",
        "--header-timeout",
        "10s",
    ]);
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://test/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    // Timed from the end of the answer, which the server's idle timer starts a little before:
    // what is measured is at most the idle time, so the lower bound below cannot be met by a
    // server that closes at once on a slow machine; it keeps a margin for the client's delay.
    let idle = Instant::now();
    // The server sends GOAWAY once idle for the keep-alive timeout; the connection ends.
    tokio::time::timeout(Duration::from_secs(8), conn)
        .await
        .expect("idle HTTP/2 connection closed by the server")
        .unwrap()
        .unwrap();
    let t = idle.elapsed();
    assert!(t >= Duration::from_millis(500), "closed after {t:?}");
}

/// `GET /static/{*path}` serves `--root`; large files go out with sendfile(2), which the
/// cluster-wide `/metrics` reports as `zerocopy_sendfile_bytes_total`.
#[test]
fn static_files_go_through_sendfile() {
    let root = std::env::temp_dir().join(format!("cluster-static-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("big.bin"), &data).unwrap();
    std::fs::write(root.join("small.txt"), "small").unwrap();
    let server = Server::start(&[
        "--workers",
        "1",
        "--metrics-interval",
        "100ms",
        "--root",
        root.to_str().unwrap(),
    ]);
    let res = get(server.addr, "/static/big.bin").unwrap();
    assert_eq!(res.status, 200);
    assert!(res.body == data, "byte-exact static file");
    assert!(res.header("etag").is_some());
    let res = get(server.addr, "/static/small.txt").unwrap();
    assert_eq!((res.status, &res.body[..]), (200, &b"small"[..]));
    assert_eq!(get(server.addr, "/static/missing").unwrap().status, 404);
    assert_eq!(
        get(server.addr, "/static/%2e%2e/Cargo.toml")
            .unwrap()
            .status,
        400
    );
    // All but the response's last byte, which tower-zerocopy copies after checking the file.
    let text = server.wait_metrics("zerocopy counters", |t| {
        metric(t, "zerocopy_sendfile_bytes_total").is_some_and(|v| v >= (data.len() - 1) as f64)
    });
    // The small file and the heads were copied; the large body was not.
    let copied = metric(&text, "zerocopy_copied_bytes_total").unwrap();
    assert!(copied > 5.0 && copied < data.len() as f64, "{copied}");
    std::fs::remove_dir_all(&root).unwrap();
}
