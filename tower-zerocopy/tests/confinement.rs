//! Traversal and symlink-escape attempts never reach a file outside the root.
// The fixture is built with Unix symlinks.
#![cfg(unix)]

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_zerocopy::{ServeDir, SymlinkPolicy};

const MARKER: &str = "TOPSECRET-OUTSIDE-ROOT";

fn fixture(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(dir.path().join("outside")).unwrap();
    std::fs::write(dir.path().join("secret"), MARKER).unwrap();
    std::fs::write(dir.path().join("outside/secret"), MARKER).unwrap();
    std::fs::write(root.join("ok.txt"), "fine").unwrap();
    std::fs::write(root.join("sub/inner.txt"), "inner").unwrap();
    std::fs::write(root.join(".hidden"), MARKER).unwrap();
    let link =
        |target: &str, name: &str| std::os::unix::fs::symlink(target, root.join(name)).unwrap();
    link("../secret", "link_out");
    link("/etc/passwd", "link_abs");
    link("../outside", "dir_out");
    link("../../secret", "sub/up2");
    link("sub/inner.txt", "link_in");
    link("sub", "dir_in");
    link("link_out", "chain_out");
    dir
}

async fn raw(addr: std::net::SocketAddr, target: &[u8]) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tcp.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nasty_paths_never_leave_the_root() {
    let dir = fixture(concat!(module_path!(), line!()));
    let server = spawn(ServeDir::new(dir.path().join("root")), Mode::Sendfile).await;
    let nasty: &[&[u8]] = &[
        b"/../secret",
        b"/sub/../../secret",
        b"/./../secret",
        b"/%2e%2e/secret",
        b"/%2E%2E/secret",
        b"/.%2e/secret",
        b"/%2e%2e%2fsecret",
        b"/..%2fsecret",
        b"/..%5csecret",
        b"/..\\secret",
        b"/sub\\..\\..\\secret",
        b"/%252e%252e/secret",
        b"/%c0%ae%c0%ae/secret",
        b"/...",
        b"/%00../secret",
        b"/secret%00.txt",
        b"//etc/passwd",
        b"/%2fetc%2fpasswd",
        b"/C:/Windows/win.ini",
        b"/C%3a%5cWindows%5cwin.ini",
        b"/CON",
        b"/aux.txt",
        b"/link_out",
        b"/link_abs",
        b"/dir_out/secret",
        b"/sub/up2",
        b"/chain_out",
        b"/.hidden",
        b"/sub/%2e%2e/%2e%2e/secret",
        b"/..;/secret",
        b"/ok.txt/../../secret",
        b"http://localhost/../secret",
        b"/proc/self/environ",
    ];
    assert!(nasty.len() >= 20);
    for target in nasty {
        let (code, text) = raw(server.addr, target).await;
        let shown = String::from_utf8_lossy(target);
        assert!(
            [400, 403, 404].contains(&code),
            "{shown}: got {code}\n{text}"
        );
        assert!(!text.contains(MARKER), "{shown} leaked the secret");
    }
    // Symlinks inside the root still work, and ordinary files are served.
    for (target, body) in [
        (&b"/link_in"[..], "inner"),
        (b"/dir_in/inner.txt", "inner"),
        (b"/ok.txt", "fine"),
    ] {
        let (code, text) = raw(server.addr, target).await;
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(target));
        assert!(text.ends_with(body));
    }
    // The escape attempts are 403, not 404: the policy refused them.
    assert_eq!(raw(server.addr, b"/link_out").await.0, 403);
    assert_eq!(raw(server.addr, b"/dir_out/secret").await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlink_policies() {
    let dir = fixture(concat!(module_path!(), line!()));
    let root = dir.path().join("root");
    let refuse_all = spawn(
        ServeDir::new(&root).symlinks(SymlinkPolicy::RefuseAll),
        Mode::Portable,
    )
    .await;
    assert_eq!(raw(refuse_all.addr, b"/link_in").await.0, 403);
    assert_eq!(raw(refuse_all.addr, b"/ok.txt").await.0, 200);
    let follow = spawn(
        ServeDir::new(&root).symlinks(SymlinkPolicy::FollowAll),
        Mode::Portable,
    )
    .await;
    let (code, text) = raw(follow.addr, b"/link_out").await;
    assert_eq!(code, 200, "FollowAll follows escaping links, as documented");
    assert!(text.ends_with(MARKER));
    // Lexical traversal is refused whatever the policy.
    assert_eq!(raw(follow.addr, b"/../secret").await.0, 400);
}
