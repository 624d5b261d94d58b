//! A file that is not in the page cache is read in on the blocking pool before `sendfile`
//! (so `sendfile` never waits for the disk on a worker), and the bytes are still exact.
#![cfg(target_os = "linux")]

mod support;

use http::{StatusCode, Version};
use rustix::fs::{fadvise, Advice};
use support::*;
use tower_zerocopy::{warmed_bytes, ServeDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_file_is_warmed_then_sent_with_sendfile() {
    let dir = TempDir::new("cold");
    let path = dir.path().join("cold.bin");
    let len = 16u64 << 20;
    write_pattern(&path, len);
    let file = std::fs::File::open(&path).unwrap();
    file.sync_all().unwrap();
    // Drop the clean pages from the page cache.
    fadvise(&file, 0, None, Advice::DontNeed).unwrap();
    drop(file);

    let server = spawn(ServeDir::new(dir.path()), Mode::Sendfile).await;
    let before = warmed_bytes();
    let res = fetch(server.addr, Version::HTTP_11, "/cold.bin", &[]).await;
    assert_eq!(res.status, StatusCode::OK);
    let want: Vec<u8> = (0..len).map(pattern).collect();
    assert_eq!(hash(&res.body), hash(&want));
    let stats = server.settled().await;
    assert_eq!(
        stats.sendfile_bytes() + stats.held_back_bytes(),
        len,
        "{:?}",
        stats
    );
    assert_eq!(stats.checked_ends(), 1);
    let warmed = warmed_bytes() - before;
    assert!(
        warmed > 0,
        "the evicted file must be warmed before sendfile"
    );
    assert!(
        warmed <= len + (1 << 20),
        "only the file is read ({warmed})"
    );

    // Now resident: a second request needs no warming.
    let before = warmed_bytes();
    let res = fetch(server.addr, Version::HTTP_11, "/cold.bin", &[]).await;
    assert_eq!(hash(&res.body), hash(&want));
    assert_eq!(warmed_bytes() - before, 0);
}
