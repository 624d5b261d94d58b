//! Byte-exact bodies over HTTP/1 with sendfile, HTTP/1 chunked, HTTP/2 and the portable path,
//! with the wrapper's counters proving which path carried the file bytes.

mod support;

use std::io::{Seek, SeekFrom, Write};

use http::{StatusCode, Version};
use support::*;
use tower_zerocopy::ServeDir;

const SIZES: &[u64] = &[0, 1, 4095, 4096, 65_537, 8 * 1024 * 1024 + 3];
/// The sparse file: 4 GiB + 3 MiB, data only in the last 3 MiB.
const SPARSE_LEN: u64 = (4 << 30) + (3 << 20);
const SPARSE_DATA_AT: u64 = 4 << 30;

fn fixture(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    for &len in SIZES {
        write_pattern(&dir.path().join(format!("f{len}.bin")), len);
    }
    let mut f = std::fs::File::create(dir.path().join("sparse.bin")).unwrap();
    f.set_len(SPARSE_LEN).unwrap();
    f.seek(SeekFrom::Start(SPARSE_DATA_AT)).unwrap();
    let data: Vec<u8> = (SPARSE_DATA_AT..SPARSE_LEN).map(pattern).collect();
    f.write_all(&data).unwrap();
    dir
}

fn expected(start: u64, end: u64) -> u64 {
    let bytes: Vec<u8> = (start..end)
        .map(|i| if i >= SPARSE_DATA_AT { pattern(i) } else { 0 })
        .collect();
    hash(&bytes)
}

/// Fetches every size and a range of the sparse file past 4 GiB; returns the body bytes seen.
async fn fetch_all(addr: std::net::SocketAddr, version: Version, chunked: bool) -> u64 {
    let mut total = 0;
    for &len in SIZES {
        let res = fetch(addr, version, &format!("/f{len}.bin"), &[]).await;
        assert_eq!(res.status, StatusCode::OK, "size {len}");
        assert_eq!(res.version, version);
        assert_eq!(res.body.len() as u64, len, "size {len}");
        let want: Vec<u8> = (0..len).map(pattern).collect();
        assert_eq!(hash(&res.body), hash(&want), "size {len} over {version:?}");
        if chunked && version == Version::HTTP_11 && len > 0 {
            assert_eq!(res.headers["transfer-encoding"], "chunked");
        } else if version == Version::HTTP_11 && !chunked {
            assert_eq!(res.headers["content-length"], len.to_string().as_str());
        }
        total += len;
    }
    // A range straddling the hole/data boundary, past 4 GiB.
    let (start, end) = (SPARSE_DATA_AT - 70_000, SPARSE_DATA_AT + (2 << 20) + 17);
    let range = format!("bytes={}-{}", start, end - 1);
    let res = fetch(addr, version, "/sparse.bin", &[("range", &range)]).await;
    assert_eq!(res.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(res.body.len() as u64, end - start);
    assert_eq!(
        hash(&res.body),
        expected(start, end),
        "sparse over {version:?}"
    );
    total += end - start;
    // And the very end of the sparse file, by suffix.
    let res = fetch(addr, version, "/sparse.bin", &[("range", "bytes=-100000")]).await;
    assert_eq!(res.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(hash(&res.body), expected(SPARSE_LEN - 100_000, SPARSE_LEN));
    total + 100_000
}

/// Every file byte went out with sendfile, except the last ones of each response, which are
/// copied after the check (`held_back_bytes`; `checked_ends`: one per non-empty response, at
/// most `RESPONSES`).
fn assert_sendfile_bytes(stats: &tower_zerocopy::SendfileStats, file_bytes: u64) {
    assert_eq!(
        stats.sendfile_bytes() + stats.held_back_bytes(),
        file_bytes,
        "{stats:?}"
    );
    assert!((1..=RESPONSES).contains(&stats.checked_ends()), "{stats:?}");
    assert!(
        stats.held_back_bytes()
            <= stats.checked_ends()
                + (stats.aligned_ends() + stats.aligned_fallbacks())
                    * tower_zerocopy::DEFAULT_MAX_COPIED_TAIL as u64,
        "{stats:?}"
    );
}

/// Response heads are small; everything above this per response is body.
const HEAD_ALLOWANCE: u64 = 512;
const RESPONSES: u64 = SIZES.len() as u64 + 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_sendfile_is_byte_exact_and_uses_sendfile() {
    let dir = fixture("h1sf");
    let server = spawn(
        ServeDir::new(dir.path()).sendfile_min_len(1),
        Mode::Sendfile,
    )
    .await;
    let body_bytes = fetch_all(server.addr, Version::HTTP_11, false).await;
    let stats = server.settled().await;
    assert_sendfile_bytes(stats, body_bytes);
    assert!(
        stats.copied_bytes() - stats.held_back_bytes() < RESPONSES * HEAD_ALLOWANCE,
        "{:?}",
        stats
    );
    assert_eq!(stats.truncations(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_truncation_check_every_file_byte_goes_through_sendfile() {
    let dir = fixture("h1nocheck");
    let server = spawn(
        ServeDir::new(dir.path())
            .sendfile_min_len(1)
            .check_truncation(false),
        Mode::Sendfile,
    )
    .await;
    let body_bytes = fetch_all(server.addr, Version::HTTP_11, false).await;
    let stats = server.settled().await;
    assert_eq!(stats.checked_ends(), 0, "{:?}", stats);
    assert_eq!(stats.sendfile_bytes(), body_bytes, "{:?}", stats);
    assert!(
        stats.copied_bytes() < RESPONSES * HEAD_ALLOWANCE,
        "{:?}",
        stats
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_default_threshold_copies_small_files() {
    let dir = fixture("h1thr");
    let server = spawn(ServeDir::new(dir.path()), Mode::Sendfile).await;
    let body_bytes = fetch_all(server.addr, Version::HTTP_11, false).await;
    // Only the responses of at least 64 KiB went through sendfile.
    let small: u64 = SIZES
        .iter()
        .filter(|&&s| s < tower_zerocopy::DEFAULT_SENDFILE_MIN_LEN)
        .sum();
    let stats = server.settled().await;
    assert_sendfile_bytes(stats, body_bytes - small);
    assert!(stats.copied_bytes() >= small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_chunked_is_byte_exact_and_uses_sendfile() {
    let dir = fixture("h1ch");
    let server = spawn(ServeDir::new(dir.path()).sendfile_min_len(1), Mode::Chunked).await;
    let body_bytes = fetch_all(server.addr, Version::HTTP_11, true).await;
    let stats = server.settled().await;
    assert_sendfile_bytes(stats, body_bytes);
    // Heads plus chunk framing only.
    assert!(
        stats.copied_bytes() - stats.held_back_bytes() < RESPONSES * HEAD_ALLOWANCE + 4096,
        "{:?}",
        stats
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_byte_exact_and_never_uses_sendfile() {
    let dir = fixture("h2");
    let server = spawn(
        ServeDir::new(dir.path()).sendfile_min_len(1),
        Mode::Sendfile,
    )
    .await;
    let body_bytes = fetch_all(server.addr, Version::HTTP_2, false).await;
    let stats = server.settled().await;
    assert_eq!(stats.sendfile_bytes(), 0, "{:?}", stats);
    assert!(stats.copied_bytes() >= body_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portable_path_is_byte_exact_and_never_uses_sendfile() {
    let dir = fixture("port");
    let server = spawn(
        ServeDir::new(dir.path()).sendfile_min_len(1),
        Mode::Portable,
    )
    .await;
    let body_bytes = fetch_all(server.addr, Version::HTTP_11, false).await;
    let stats = server.settled().await;
    assert_eq!(stats.sendfile_bytes(), 0, "{:?}", stats);
    assert!(stats.copied_bytes() >= body_bytes);
    // Small read chunks exercise the read-ahead across many chunks.
    let server = spawn(ServeDir::new(dir.path()).read_chunk(4096), Mode::Portable).await;
    fetch_all(server.addr, Version::HTTP_11, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_parts_go_through_sendfile() {
    let dir = TempDir::new("multisf");
    let len = 8 * 1024 * 1024 + 3;
    write_pattern(&dir.path().join("f.bin"), len);
    let server = spawn(ServeDir::new(dir.path()), Mode::Sendfile).await;
    let ranges = [(0u64, 100_000u64), (4_000_000, 5_000_000), (len - 77, len)];
    let header = "bytes=0-99999,4000000-4999999,-77";
    let res = fetch(
        server.addr,
        Version::HTTP_11,
        "/f.bin",
        &[("range", header)],
    )
    .await;
    assert_eq!(res.status, StatusCode::PARTIAL_CONTENT);
    let ct = res.headers["content-type"].to_str().unwrap().to_owned();
    let boundary = ct.strip_prefix("multipart/byteranges; boundary=").unwrap();
    let mut expected = Vec::new();
    for (i, &(a, b)) in ranges.iter().enumerate() {
        if i > 0 {
            expected.extend_from_slice(b"\r\n");
        }
        let head = format!(
            "--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{}/{len}\r\n\r\n",
            b - 1
        );
        expected.extend_from_slice(head.as_bytes());
        expected.extend((a..b).map(pattern));
    }
    expected.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    assert_eq!(res.body.len(), expected.len());
    assert_eq!(hash(&res.body), hash(&expected));
    // Every file byte of every part went through sendfile but the response's last ones
    // (checked, then copied); boundaries were copied.
    let file_bytes: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    let stats = server.settled().await;
    assert_eq!(stats.checked_ends(), 1, "{:?}", stats);
    assert_eq!(
        stats.sendfile_bytes() + stats.held_back_bytes(),
        file_bytes,
        "{:?}",
        stats
    );
    assert!(
        stats.copied_bytes() - stats.held_back_bytes() < 1024,
        "{:?}",
        stats
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_over_http1_has_length_and_no_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new("head");
    write_pattern(&dir.path().join("f.bin"), 200_000);
    let server = spawn(ServeDir::new(dir.path()), Mode::Sendfile).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"HEAD /f.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-length: 200000\r\n"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\n"), "no body after the head: {text}");
    let stats = server.settled().await;
    assert_eq!(stats.sendfile_bytes(), 0);
}
