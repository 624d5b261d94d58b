//! Truncation mid-response and client disconnects: the connection closes short, the server
//! stays up, and descriptors and mappings are released.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::{StatusCode, Version};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_zerocopy::{live_mappings, ServeDir};

/// These tests count process-wide descriptors and mappings: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `test` alone, on a runtime of its own built and dropped under [`SERIAL`]: a runtime
/// holds descriptors too (its epoll instance and waker), so another test's runtime starting
/// or stopping between a baseline and its check would move the count.
fn serial<F: std::future::Future<Output = ()>>(test: F) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(test);
}

const BIG: u64 = 64 << 20;

/// Sends a GET and reads the head; returns the stream, Content-Length and body bytes read so far.
async fn start_get(addr: SocketAddr, path: &str) -> (TcpStream, u64, usize) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    (tcp, len, 0)
}

/// Reads until EOF or error (bounded by a timeout); returns the number of bytes read.
async fn drain(tcp: &mut TcpStream, limit: Option<usize>) -> usize {
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    let read = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
            if limit.is_some_and(|l| n >= l) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the connection must not hang");
    n
}

/// Waits (bounded) until descriptors and mappings are back to `fds`/0.
async fn settles(fds: usize) {
    for _ in 0..200 {
        if fd_count() <= fds && live_mappings() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "leak: {} fds (baseline {fds}), {} mappings",
        fd_count(),
        live_mappings()
    );
}

async fn truncate_mid_response(mode: Mode) {
    let dir = TempDir::new(&format!("trunc-{mode:?}"));
    let path = dir.path().join("big.bin");
    write_pattern(&path, BIG);
    std::fs::write(dir.path().join("small.txt"), "still up").unwrap();
    let server = spawn(ServeDir::new(dir.path()).cache_capacity(0), mode).await;
    // One request first: the service holds the root directory open from then on.
    fetch(server.addr, Version::HTTP_11, "/small.txt", &[]).await;
    let baseline = fd_count();

    let (mut tcp, len, _) = start_get(server.addr, "/big.bin").await;
    assert_eq!(len, BIG);
    let mut got = drain(&mut tcp, Some(1 << 20)).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    got += drain(&mut tcp, None).await;
    assert!(
        (got as u64) < len,
        "the connection must close short of Content-Length ({got} of {len})"
    );
    drop(tcp);
    if mode == Mode::Sendfile {
        assert!(server.stats.truncations() >= 1, "{:?}", server.stats);
        assert!(server.stats.sendfile_bytes() > 0);
    } else {
        assert_eq!(server.stats.sendfile_bytes(), 0);
    }

    // The server is still up.
    let res = fetch(server.addr, Version::HTTP_11, "/small.txt", &[]).await;
    assert_eq!(
        (res.status, &res.body[..]),
        (StatusCode::OK, &b"still up"[..])
    );
    settles(baseline).await;
}

#[test]
fn truncation_on_the_sendfile_path_closes_the_connection() {
    serial(truncate_mid_response(Mode::Sendfile));
}

#[test]
fn truncation_on_the_portable_path_closes_the_connection() {
    serial(truncate_mid_response(Mode::Portable));
}

async fn disconnect_mid_body(mode: Mode, cache: bool) {
    let dir = TempDir::new(&format!("disc-{mode:?}-{cache}"));
    write_pattern(&dir.path().join("big.bin"), BIG);
    let svc = ServeDir::new(dir.path()).cache_capacity(if cache { 64 } else { 0 });
    let server = spawn(svc.clone(), mode).await;
    fetch(server.addr, Version::HTTP_11, "/missing", &[]).await;
    let baseline = fd_count();
    for _ in 0..3 {
        let (mut tcp, _, _) = start_get(server.addr, "/big.bin").await;
        drain(&mut tcp, Some(100 * 1024)).await;
        drop(tcp);
    }
    if cache {
        // The cache keeps the descriptor (and map) for the next request until cleared.
        tokio::time::sleep(Duration::from_millis(100)).await;
        svc.clear_cache();
    }
    settles(baseline).await;
}

#[test]
fn disconnect_releases_fds_and_mappings_sendfile() {
    serial(async {
        disconnect_mid_body(Mode::Sendfile, false).await;
        disconnect_mid_body(Mode::Sendfile, true).await;
    });
}

#[test]
fn disconnect_releases_fds_portable() {
    serial(disconnect_mid_body(Mode::Portable, false));
}
