//! `SendfileStream` write semantics driven by hand: partial writes, `Pending` on a full
//! socket, the fairness cap, and exact bytes across all of them.
#![cfg(target_os = "linux")]

mod support;

use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::UnixStream;
use tower::ServiceExt;
use tower_zerocopy::{MarkSendfile, SendfileStream, ServeDir};

/// `live_mappings()` counts the maps of the whole process, and the tests of this file run on
/// parallel threads: every test that maps a file holds this lock shared, and the test that
/// checks the count holds it alone, so no other test's maps are alive while it looks.
static MAPS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A connected loopback TCP pair: (server side with `TCP_NODELAY`, client side), the client's
/// receive buffer set before connecting when given (it sizes the window the server sees).
async fn tcp_pair(
    client_receive_buffer: Option<u32>,
) -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(bytes) = client_receive_buffer {
        socket.set_recv_buffer_size(bytes).unwrap();
    }
    let client = socket
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    server.set_nodelay(true).unwrap();
    (server, client)
}

/// A response as hyper hands it over: a head, then the file chunks `svc` makes for `stream`.
async fn head_and_file<S: tower_zerocopy::SendfileSocket>(
    svc: ServeDir,
    stream: &SendfileStream<S>,
) -> Vec<Bytes> {
    let mut queue = vec![Bytes::from_static(b"HEAD\r\n")];
    queue.extend(sendfile_chunks_of(svc, stream.capability()).await);
    queue
}

#[tokio::test]
async fn partial_writes_pending_and_cap_are_exact() {
    let _maps = MAPS.read().await;
    let dir = TempDir::new("stream");
    let len = 6u64 << 20;
    write_pattern(&dir.path().join("f.bin"), len);
    let (server, mut client) = UnixStream::pair().unwrap();
    let mut stream = SendfileStream::new(server).max_chunk(1 << 20);
    let svc = MarkSendfile::new(ServeDir::new(dir.path()), stream.capability());
    let res = svc
        .oneshot(Request::get("/f.bin").body(()).unwrap())
        .await
        .unwrap();
    let mut body = res.into_body();
    assert!(body.is_sendfile());
    let mut file_chunks: Vec<Bytes> = Vec::new();
    while let Some(frame) = body.frame().await {
        file_chunks.push(frame.unwrap().into_data().unwrap());
    }
    let head = Bytes::from_static(b"HEAD-BYTES\r\n");
    let tail = Bytes::from_static(b"\r\nTAIL");
    let mut queue: Vec<Bytes> = vec![head.clone()];
    queue.extend(file_chunks.iter().cloned());
    queue.push(tail.clone());
    let mut expected = head.to_vec();
    expected.extend((0..len).map(pattern));
    expected.extend_from_slice(&tail);

    // The peer reads slowly on its own task, so the socket fills and writes go Pending.
    let reader = tokio::spawn(async move {
        let mut received = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return received,
                Ok(k) => received.extend_from_slice(&buf[..k]),
            }
            tokio::task::yield_now().await;
        }
    });
    let mut saw_pending = false;
    let mut calls = 0;
    while !queue.is_empty() {
        let slices: Vec<IoSlice<'_>> = queue.iter().map(|b| IoSlice::new(b)).collect();
        let r = poll_fn(|cx| {
            let r = Pin::new(&mut stream).poll_write_vectored(cx, &slices);
            saw_pending |= r.is_pending();
            r
        })
        .await;
        calls += 1;
        let n = r.expect("write");
        assert!(n > 0);
        // The fairness cap bounds one call (plus the small ordinary slices).
        assert!(n <= (1 << 20) + head.len() + tail.len(), "{n}");
        advance(&mut queue, n);
    }
    assert!(
        calls >= 6,
        "the 1 MiB cap splits 6 MiB into at least 6 calls ({calls})"
    );
    // The file's last byte waited until the reader had everything before it, then was copied.
    assert_eq!(stream.stats().sendfile_bytes(), len - 1);
    assert_eq!(stream.stats().checked_ends(), 1);
    assert_eq!(
        stream.stats().copied_bytes(),
        (head.len() + tail.len() + 1) as u64
    );
    drop(stream);
    let received = reader.await.unwrap();
    assert!(saw_pending, "a 6 MiB write must fill a unix socket buffer");
    assert_eq!(received.len(), expected.len());
    assert_eq!(hash(&received), hash(&expected));
}

#[tokio::test]
async fn truncated_file_is_an_error_not_a_hang() {
    let _maps = MAPS.read().await;
    let dir = TempDir::new("stream-trunc");
    let path = dir.path().join("f.bin");
    write_pattern(&path, 1 << 20);
    let (server, client) = UnixStream::pair().unwrap();
    let mut stream = SendfileStream::new(server);
    let svc = MarkSendfile::new(
        ServeDir::new(dir.path()).cache_capacity(0),
        stream.capability(),
    );
    let res = svc
        .oneshot(Request::get("/f.bin").body(()).unwrap())
        .await
        .unwrap();
    let chunk = res
        .into_body()
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let mut reader = tokio::spawn(async move {
        let mut client = client;
        let mut v = Vec::new();
        let _ = client.read_to_end(&mut v).await;
        v.len()
    });
    let mut offset = 0;
    let err = loop {
        let slice = [IoSlice::new(&chunk[offset..])];
        match poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, &slice)).await {
            Ok(n) => offset += n,
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(
        offset, 1000,
        "exactly the bytes that still existed were sent"
    );
    assert_eq!(stream.stats().truncations(), 1);
    drop(stream);
    assert_eq!((&mut reader).await.unwrap(), 1000);
}

#[tokio::test]
async fn for_request_picks_the_path_by_capability_and_version() {
    let _maps = MAPS.write().await;
    let dir = TempDir::new("forreq");
    let path = dir.path().join("f.bin");
    write_pattern(&path, 300_000);
    let (server, _client) = UnixStream::pair().unwrap();
    let stream = SendfileStream::new(server);
    let mut marked = http::Extensions::new();
    marked.insert(stream.capability());
    let plain = http::Extensions::new();
    let open = || std::fs::File::open(&path).unwrap();
    let cases = [
        (http::Version::HTTP_11, &marked, 0..300_000u64, true),
        (http::Version::HTTP_2, &marked, 0..300_000, false),
        (http::Version::HTTP_11, &plain, 0..300_000, false),
        (http::Version::HTTP_11, &marked, 10..1000, false),
    ];
    for (version, ext, range, want) in cases {
        let mut body =
            tower_zerocopy::FileBody::for_request(open(), range.clone(), version, ext).unwrap();
        assert_eq!(body.is_sendfile(), want, "{version:?} {range:?}");
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        let want_bytes: Vec<u8> = range.clone().map(pattern).collect();
        assert_eq!(hash(&got), hash(&want_bytes));
    }
    let err =
        tower_zerocopy::FileBody::for_request(open(), 0..300_001, http::Version::HTTP_11, &plain)
            .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(
        tower_zerocopy::live_mappings(),
        0,
        "bodies dropped, maps released"
    );
}

/// The mapped chunks of a sendfile-path response for `/f.bin`, for a stream's capability.
async fn sendfile_chunks(dir: &TempDir, cap: tower_zerocopy::SendfileCapability) -> Vec<Bytes> {
    sendfile_chunks_of(ServeDir::new(dir.path()).cache_capacity(0), cap).await
}

async fn sendfile_chunks_of(svc: ServeDir, cap: tower_zerocopy::SendfileCapability) -> Vec<Bytes> {
    let svc = MarkSendfile::new(svc, cap);
    let res = svc
        .oneshot(Request::get("/f.bin").body(()).unwrap())
        .await
        .unwrap();
    let mut body = res.into_body();
    assert!(body.is_sendfile());
    let mut chunks = Vec::new();
    while let Some(frame) = body.frame().await {
        chunks.push(frame.unwrap().into_data().unwrap());
    }
    chunks
}

/// Writes `queue` until the stream stays `Pending` for 200 ms (the peer is not reading) or
/// fails; returns the bytes written and the error, if any.
async fn write_until_stuck<S: tower_zerocopy::SendfileSocket>(
    stream: &mut SendfileStream<S>,
    queue: &mut Vec<Bytes>,
) -> (usize, Option<std::io::Error>) {
    write_until_stalled(stream, queue, Duration::from_millis(200)).await
}

/// Writes `queue` until the stream stays `Pending` for `stall` or fails; returns the bytes
/// written and the error, if any.
async fn write_until_stalled<S: tower_zerocopy::SendfileSocket>(
    stream: &mut SendfileStream<S>,
    queue: &mut Vec<Bytes>,
    stall: Duration,
) -> (usize, Option<std::io::Error>) {
    let mut written = 0;
    while !queue.is_empty() {
        let slices: Vec<IoSlice<'_>> = queue.iter().map(|b| IoSlice::new(b)).collect();
        let call = poll_fn(|cx| Pin::new(&mut *stream).poll_write_vectored(cx, &slices));
        let n = match tokio::time::timeout(stall, call).await {
            Err(_stuck) => break,
            Ok(Err(e)) => return (written, Some(e)),
            Ok(Ok(n)) => n,
        };
        written += n;
        advance(queue, n);
    }
    (written, None)
}

/// A truncation after the whole response was handed to the kernel (the socket still holds
/// it: the peer is not reading) is caught before the last byte: the peer gets fewer bytes than
/// the file had, and the write fails. Over a Unix socket and over TCP loopback.
async fn truncation_after_queueing<S: tower_zerocopy::SendfileSocket + Send + 'static>(
    server: S,
    mut client: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    name: &str,
) {
    let dir = TempDir::new(name);
    let path = dir.path().join("f.bin");
    let len = 160 * 1024;
    write_pattern(&path, len);
    let mut stream = SendfileStream::new(server);
    let mut queue = sendfile_chunks(&dir, stream.capability()).await;
    let (written, err) = write_until_stuck(&mut stream, &mut queue).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        written as u64,
        len - 1,
        "everything but the last byte is queued; it waits for the peer"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        got.len()
    });
    let (more, err) = write_until_stuck(&mut stream, &mut queue).await;
    let err = err.expect("the write must fail, not wait or complete");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(more, 0);
    assert_eq!(stream.stats().truncations(), 1);
    assert_eq!(stream.stats().checked_ends(), 0);
    drop(stream);
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
        .await
        .expect("the peer sees the end")
        .unwrap();
    assert!((got as u64) < len, "{name}: {got} of {len} bytes");
}

#[tokio::test]
async fn truncation_after_queueing_is_caught_before_the_last_byte_unix() {
    let _maps = MAPS.read().await;
    let (server, client) = UnixStream::pair().unwrap();
    truncation_after_queueing(server, client, "queued-unix").await;
}

#[tokio::test]
async fn truncation_after_queueing_is_caught_before_the_last_byte_tcp() {
    let _maps = MAPS.read().await;
    let (server, client) = tcp_pair(None).await;
    truncation_after_queueing(server, client, "queued-tcp").await;
}

/// A peer that goes away while the last byte waits for it ends the wait with an error.
#[tokio::test]
async fn peer_gone_during_the_wait_is_an_error_not_a_hang() {
    let _maps = MAPS.read().await;
    let dir = TempDir::new("gone");
    write_pattern(&dir.path().join("f.bin"), 160 * 1024);
    let (server, client) = UnixStream::pair().unwrap();
    let mut stream = SendfileStream::new(server);
    let mut queue = sendfile_chunks(&dir, stream.capability()).await;
    let (written, err) = write_until_stuck(&mut stream, &mut queue).await;
    assert!(
        err.is_none() && written == 160 * 1024 - 1,
        "{written} {err:?}"
    );
    drop(client);
    let (more, err) = write_until_stuck(&mut stream, &mut queue).await;
    assert_eq!(more, 0);
    let err = err.expect("an error, not a hang");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{err:?}"
    );
    assert_eq!(stream.stats().truncations(), 0);
}

/// Over TCP a response's head and file data go out corked (`TCP_CORK`, like nginx's
/// `tcp_nopush`), and the cork is gone once the response is written, so nothing is held back.
#[tokio::test]
async fn tcp_cork_spans_the_file_data_and_is_removed_at_the_end() {
    cork_spans_the_file_data(true).await;
}

/// The same without the truncation check: no byte is held back, and the cork still goes
/// once the response is written (it used to stay, holding each response's last partial
/// segment until the kernel's 200 ms cork timer).
#[tokio::test]
async fn tcp_cork_is_removed_without_the_truncation_check_too() {
    cork_spans_the_file_data(false).await;
}

async fn cork_spans_the_file_data(check: bool) {
    let _maps = MAPS.read().await;
    let dir = TempDir::new(if check { "cork" } else { "cork-nocheck" });
    // More than the socket buffers hold while the client does not read.
    let len = 24u64 << 20;
    write_pattern(&dir.path().join("f.bin"), len);
    let (server, mut client) = tcp_pair(None).await;
    let mut stream = SendfileStream::new(server);
    let svc = ServeDir::new(dir.path())
        .cache_capacity(0)
        .check_truncation(check);
    let mut queue = head_and_file(svc, &stream).await;
    let corked = |s: &SendfileStream<tokio::net::TcpStream>| {
        rustix::net::sockopt::tcp_cork(s.get_ref()).unwrap()
    };
    assert!(!corked(&stream));
    // The client does not read yet: the socket fills before the response is written.
    let (written, err) = write_until_stuck(&mut stream, &mut queue).await;
    assert!(err.is_none(), "{err:?}");
    assert!((written as u64) < len - 1, "{written}");
    assert!(corked(&stream), "corked while file data is being written");
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < 6 + len as usize {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    });
    let (more, err) = write_until_stuck(&mut stream, &mut queue).await;
    assert!(err.is_none() && queue.is_empty(), "{err:?}");
    assert_eq!((written + more) as u64, 6 + len);
    assert!(!corked(&stream), "uncorked at the end of the response");
    assert_eq!(stream.stats().checked_ends(), u64::from(check));
    let got = reader.await.unwrap();
    let mut want = b"HEAD\r\n".to_vec();
    want.extend((0..len).map(pattern));
    assert_eq!(hash(&got), hash(&want));
}

/// A loopback client with a small window that does not read yet: after the file data, a few
/// bytes (less than a segment) are still in the server's send queue because the window is
/// closed, not because of the cork. The file is truncated then. Those queued bytes are page-cache
/// pages the truncation zeroes, so the check must wait until they have left: the client gets a
/// reset, never a response complete by `Content-Length` with zeros in it. (A shortcut that
/// checked at once when less than a segment was unsent delivered such responses.)
#[tokio::test]
async fn truncation_while_a_closed_window_holds_the_tail_is_caught() {
    // Without the aligned end (`max_copied_tail(0)`) the file data but the last byte is
    // queued at once; with it, a response far larger than the window finds bytes unsent
    // after `sendfile` and waits the same way (a response that fits the window is checked at
    // once: nothing is unsent then, which is what the wait would find).
    for (receive_buffer, len, max_tail) in [
        (4096u32, 6000u64, 0),
        (16384, 30000, 0),
        (4096, 60000, tower_zerocopy::DEFAULT_MAX_COPIED_TAIL),
        (16384, 300_000, tower_zerocopy::DEFAULT_MAX_COPIED_TAIL),
    ] {
        let _maps = MAPS.read().await;
        let dir = TempDir::new(&format!("window-{len}"));
        let path = dir.path().join("f.bin");
        write_pattern(&path, len);
        let (server, mut client) = tcp_pair(Some(receive_buffer)).await;
        socket2::SockRef::from(&server)
            .set_send_buffer_size(1 << 20)
            .unwrap();
        let mut stream = SendfileStream::new(server).max_copied_tail(max_tail);
        let stats = stream.stats().clone();
        let svc = ServeDir::new(dir.path())
            .cache_capacity(0)
            .sendfile_min_len(1);
        let queue = head_and_file(svc, &stream).await;
        let slices: Vec<IoSlice<'_>> = queue.iter().map(|b| IoSlice::new(b)).collect();
        let n = poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, &slices))
            .await
            .unwrap();
        drop(slices);
        assert_eq!(stream.stats().checked_ends(), 0, "{len}: checked too early");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1000)
            .unwrap();
        // The rest of the response, written as hyper would, while the client reads.
        // The same `Bytes` (the stream knows file data by its address), advanced past what
        // was written.
        let writer = tokio::spawn(async move {
            let mut rest = queue;
            let mut written = n;
            loop {
                while written > 0 {
                    let k = rest[0].len().min(written);
                    bytes::Buf::advance(&mut rest[0], k);
                    written -= k;
                    if rest[0].is_empty() {
                        rest.remove(0);
                    }
                }
                if rest.is_empty() {
                    return Ok::<_, std::io::Error>(());
                }
                let slices: Vec<IoSlice<'_>> = rest.iter().map(|b| IoSlice::new(b)).collect();
                written =
                    poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, &slices)).await?;
            }
        });
        let mut got = vec![0u8; 6 + len as usize];
        let read = tokio::time::timeout(Duration::from_secs(20), client.read_exact(&mut got))
            .await
            .expect("the client must not hang");
        assert!(
            read.is_err(),
            "{len}: the client read a complete response from a truncated file"
        );
        let written = tokio::time::timeout(Duration::from_secs(20), writer)
            .await
            .expect("the writer must not hang")
            .unwrap();
        assert_eq!(
            written.unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof,
            "{len}"
        );
        // The closed window kept the end from being aligned, too.
        assert_eq!(stats.aligned_ends(), 0, "{len}: {stats:?}");
    }
}

/// The segment size the server side of a loopback pair sends with (`TCP_MAXSEG`).
fn segment_size(server: &tokio::net::TcpStream) -> u64 {
    u64::from(socket2::SockRef::from(server).tcp_mss().unwrap())
}

/// Writes `queue` (a response for `stream`) while a client reads it all; returns the bytes the
/// client got.
async fn write_while_reading(
    stream: &mut SendfileStream<tokio::net::TcpStream>,
    mut queue: Vec<Bytes>,
    mut client: tokio::net::TcpStream,
) -> Vec<u8> {
    let total: usize = queue.iter().map(|b| b.len()).sum();
    let reader = tokio::spawn(async move {
        let mut got = vec![0u8; total];
        client.read_exact(&mut got).await.map(|_| got)
    });
    write_rest_and_read(stream, &mut queue, reader).await
}

/// Writes the rest of `queue` while `reader` (the client's task) reads; returns what it got.
/// (The reader is expected to keep up: only a stall of seconds, not a busy machine's
/// scheduling delay, counts as stuck.)
async fn write_rest_and_read<S: tower_zerocopy::SendfileSocket>(
    stream: &mut SendfileStream<S>,
    queue: &mut Vec<Bytes>,
    reader: tokio::task::JoinHandle<std::io::Result<Vec<u8>>>,
) -> Vec<u8> {
    let (written, err) = write_until_stalled(stream, queue, Duration::from_secs(10)).await;
    assert!(err.is_none() && queue.is_empty(), "{written} {err:?}");
    tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the client must not hang")
        .unwrap()
        .unwrap()
}

/// On loopback with the client's window open, a response ends without a wait and without a
/// segment of its own for its last byte: `sendfile` stops at the last segment boundary of the
/// corked socket, nothing is left unsent, the file is checked, and the bytes of the last
/// partial segment are copied (an *aligned* end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligned_end_copies_the_last_partial_segment_at_once() {
    let _maps = MAPS.read().await;
    let dir = TempDir::new("aligned");
    // A window far larger than the response, so nothing waits for the client.
    let (server, client) = tcp_pair(Some(8 << 20)).await;
    let mss = segment_size(&server);
    // The 6-byte head and the file fill two segments and 1000 bytes of a third.
    let len = 2 * mss + 1000 - 6;
    write_pattern(&dir.path().join("f.bin"), len);
    let mut stream = SendfileStream::new(server);
    let svc = ServeDir::new(dir.path()).cache_capacity(0);
    let queue = head_and_file(svc, &stream).await;
    let got = write_while_reading(&mut stream, queue, client).await;
    let mut want = b"HEAD\r\n".to_vec();
    want.extend((0..len).map(pattern));
    assert_eq!(hash(&got), hash(&want));
    let stats = stream.stats();
    assert_eq!(stats.checked_ends(), 1, "{stats:?}");
    assert_eq!(stats.aligned_ends(), 1, "mss {mss}: {stats:?}");
    assert_eq!(stats.aligned_fallbacks(), 0, "{stats:?}");
    assert_eq!(stats.held_back_bytes(), 1000, "{stats:?}");
    assert_eq!(stats.sendfile_bytes(), len - 1000, "{stats:?}");
    assert_eq!(stats.copied_bytes(), 6 + 1000, "{stats:?}");
    assert!(!rustix::net::sockopt::tcp_cork(stream.get_ref()).unwrap());
}

/// `max_copied_tail(0)` turns the aligned end off: the last byte waits, as over a network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_copied_tail_the_last_byte_waits() {
    let _maps = MAPS.read().await;
    let dir = TempDir::new("aligned-off");
    let (server, client) = tcp_pair(Some(8 << 20)).await;
    let len = 2 * segment_size(&server) + 1000 - 6;
    write_pattern(&dir.path().join("f.bin"), len);
    let mut stream = SendfileStream::new(server).max_copied_tail(0);
    let svc = ServeDir::new(dir.path()).cache_capacity(0);
    let queue = head_and_file(svc, &stream).await;
    write_while_reading(&mut stream, queue, client).await;
    let stats = stream.stats();
    assert_eq!(stats.checked_ends(), 1, "{stats:?}");
    assert_eq!(
        (stats.aligned_ends(), stats.aligned_fallbacks()),
        (0, 0),
        "{stats:?}"
    );
    assert_eq!(stats.held_back_bytes(), 1, "{stats:?}");
    assert_eq!(stats.sendfile_bytes(), len - 1, "{stats:?}");
}

/// With the client's window closed, the aligned end finds bytes unsent after `sendfile` and
/// falls back to the wait, still holding back the last partial segment: it is checked and
/// copied once the client has read the rest. The response is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligned_end_falls_back_to_the_wait_when_the_window_is_closed() {
    let _maps = MAPS.read().await;
    let dir = TempDir::new("aligned-closed");
    let (server, client) = tcp_pair(Some(4096)).await;
    // Room for the whole response in the server's socket, none in the client's window.
    socket2::SockRef::from(&server)
        .set_send_buffer_size(1 << 20)
        .unwrap();
    // A small window also makes the segments small: the head and file end 100 bytes into a
    // segment, several windows after the start.
    let mss = segment_size(&server);
    let len = 16 * mss + 100 - 6;
    write_pattern(&dir.path().join("f.bin"), len);
    let mut stream = SendfileStream::new(server);
    let svc = ServeDir::new(dir.path())
        .cache_capacity(0)
        .sendfile_min_len(1);
    let mut queue = head_and_file(svc, &stream).await;
    // The client does not read yet.
    let (written, err) = write_until_stuck(&mut stream, &mut queue).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        written as u64,
        6 + len - 100,
        "mss {mss}: all but the last partial segment, which waits"
    );
    let stats = stream.stats().clone();
    assert_eq!(
        (stats.aligned_fallbacks(), stats.checked_ends()),
        (1, 0),
        "{stats:?}"
    );
    let reader = tokio::spawn(async move {
        let mut client = client;
        let mut got = vec![0u8; 6 + len as usize];
        client.read_exact(&mut got).await.map(|_| got)
    });
    let got = write_rest_and_read(&mut stream, &mut queue, reader).await;
    let mut want = b"HEAD\r\n".to_vec();
    want.extend((0..len).map(pattern));
    assert_eq!(hash(&got), hash(&want));
    assert_eq!(stats.checked_ends(), 1, "{stats:?}");
    assert_eq!(stats.aligned_ends(), 0, "{stats:?}");
    assert_eq!(stats.held_back_bytes(), 100, "{stats:?}");
    assert_eq!(stats.sendfile_bytes(), len - 100, "{stats:?}");
}

/// After a write that the full socket cut short, the next call waits until the socket polls
/// writable (about a third of its buffer free) instead of sending the few segments that a
/// reading peer has freed in the meantime: like nginx, a few large `sendfile` calls per buffer
/// rather than one per freed segment. The wait ends when the peer reads, and every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_short_write_the_next_call_waits_for_room() {
    let _maps = MAPS.read().await;
    let dir = TempDir::new("room");
    let len = 8u64 << 20;
    write_pattern(&dir.path().join("f.bin"), len);
    // A small receive buffer keeps what reading 64 KiB frees (the window it reopens) far
    // below a third of the 1 MiB send buffer.
    let (server, mut client) = tcp_pair(Some(64 * 1024)).await;
    socket2::SockRef::from(&server)
        .set_send_buffer_size(512 * 1024)
        .unwrap();
    let mut stream = SendfileStream::new(server);
    let mut queue = sendfile_chunks(&dir, stream.capability()).await;
    let total: usize = queue.iter().map(|b| b.len()).sum();

    // The peer is not reading: the first write fills the socket and comes back short.
    let slices: Vec<IoSlice<'_>> = queue.iter().map(|b| IoSlice::new(b)).collect();
    let first = poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, &slices))
        .await
        .unwrap();
    drop(slices);
    assert!(
        first > 0 && first < tower_zerocopy::DEFAULT_MAX_CHUNK,
        "{first}"
    );
    advance(&mut queue, first);

    // The peer frees a little: 64 KiB of a buffer of a megabyte or more.
    let mut got = vec![0u8; 64 * 1024];
    client.read_exact(&mut got).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let calls = stream.stats().sendfile_calls();
    let slices: Vec<IoSlice<'_>> = queue.iter().map(|b| IoSlice::new(b)).collect();
    let now = poll_fn(|cx| {
        std::task::Poll::Ready(Pin::new(&mut stream).poll_write_vectored(cx, &slices))
    })
    .await;
    drop(slices);
    assert!(
        now.is_pending(),
        "a socket with 64 KiB free is not written to again: {now:?}"
    );
    assert_eq!(stream.stats().sendfile_calls(), calls);

    // The peer reads everything: the wait ends, with room for a large write.
    let reader = tokio::spawn(async move {
        let mut rest = vec![0u8; total - got.len()];
        client.read_exact(&mut rest).await.map(|_| {
            got.extend_from_slice(&rest);
            got
        })
    });
    let slices: Vec<IoSlice<'_>> = queue.iter().map(|b| IoSlice::new(b)).collect();
    let next = tokio::time::timeout(
        Duration::from_secs(10),
        poll_fn(|cx| Pin::new(&mut stream).poll_write_vectored(cx, &slices)),
    )
    .await
    .expect("the wait ends when the peer reads")
    .unwrap();
    drop(slices);
    assert!(next >= 128 * 1024, "one write per freed segment: {next}");
    advance(&mut queue, next);
    let received = write_rest_and_read(&mut stream, &mut queue, reader).await;
    let expected: Vec<u8> = (0..len).map(pattern).collect();
    assert_eq!(hash(&received), hash(&expected));
}

/// Drops the first `n` bytes of `queue`.
fn advance(queue: &mut Vec<Bytes>, mut n: usize) {
    while n > 0 {
        if n >= queue[0].len() {
            n -= queue[0].len();
            queue.remove(0);
        } else {
            let _ = queue[0].split_to(n);
            n = 0;
        }
    }
}
