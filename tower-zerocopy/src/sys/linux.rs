//! Linux system calls, all through rustix (no `unsafe` here).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{openat, openat2, statat, AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendFlags};

use super::OpenFailure;
use crate::SymlinkPolicy;

/// Whether this target can send file bytes with `sendfile(2)`.
pub(crate) const HAS_SENDFILE: bool = true;

pub(crate) fn classify_os(err: &io::Error) -> OpenFailure {
    match err.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::NOENT | Errno::NOTDIR | Errno::NAMETOOLONG) => OpenFailure::NotFound,
        Some(Errno::XDEV | Errno::LOOP | Errno::ACCESS | Errno::PERM) => OpenFailure::Forbidden,
        _ => OpenFailure::Other,
    }
}

/// The served directory, held open so every lookup is relative to its descriptor.
#[derive(Debug)]
pub(crate) struct RootDir(File);

impl RootDir {
    pub(crate) fn open(root: &std::path::Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(RootDir(File::from(fd)))
    }

    pub(crate) fn open_beneath(&self, rel: &str, policy: SymlinkPolicy) -> io::Result<File> {
        open_beneath(&self.0, rel, policy)
    }
}

const FILE_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOCTTY)
    // A FIFO would block an open for reading; non-blocking has no effect on regular files.
    .union(OFlags::NONBLOCK);

/// Opens `rel` (already lexically checked: no `..`, no absolute part) beneath `root`.
///
/// With `openat2` the kernel resolves the whole path with `RESOLVE_BENEATH`, which is immune to
/// concurrent renames and symlink swaps. Kernels without it (before 5.6, or a seccomp filter
/// answering `ENOSYS`/`EPERM`) get [`walk`], which opens one component at a time.
fn open_beneath(root: &File, rel: &str, policy: SymlinkPolicy) -> io::Result<File> {
    let rel = if rel.is_empty() { "." } else { rel };
    let resolve = match policy {
        SymlinkPolicy::FollowAll => {
            return Ok(File::from(openat(root, rel, FILE_FLAGS, Mode::empty())?));
        }
        SymlinkPolicy::RefuseEscaping => ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        SymlinkPolicy::RefuseAll => ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
    };
    match openat2(root, rel, FILE_FLAGS, Mode::empty(), resolve) {
        Ok(fd) => Ok(File::from(fd)),
        Err(Errno::NOSYS | Errno::PERM) => walk(root.as_fd(), rel, policy).map(File::from),
        // openat2 reports a transient change under resolution as EAGAIN; retry once by walking.
        Err(Errno::AGAIN) => walk(root.as_fd(), rel, policy).map(File::from),
        Err(e) => Err(e.into()),
    }
}

/// Most symlinks followed in one lookup, as the kernel's own limit.
const MAX_SYMLINK_HOPS: usize = 40;

/// A component-by-component walk that never lets the kernel follow a symlink: each step opens
/// the next name relative to the previous directory's descriptor with `O_NOFOLLOW`, symlinks are
/// read and spliced into the remaining components by us, and `..` pops our own stack, so the
/// walk cannot climb above the root even if directories are renamed meanwhile.
pub(crate) fn walk(root: BorrowedFd<'_>, rel: &str, policy: SymlinkPolicy) -> io::Result<OwnedFd> {
    let mut pending: VecDeque<String> = rel.split('/').map(str::to_owned).collect();
    let mut stack: Vec<OwnedFd> = Vec::new();
    let mut hops = 0;
    while let Some(name) = pending.pop_front() {
        let cur = stack.last().map_or(root, |fd| fd.as_fd());
        match name.as_str() {
            "" | "." => {
                if pending.is_empty() {
                    return Ok(openat(
                        cur,
                        ".",
                        FILE_FLAGS | OFlags::DIRECTORY,
                        Mode::empty(),
                    )?);
                }
                continue;
            }
            ".." => {
                if stack.pop().is_none() {
                    return Err(Errno::XDEV.into());
                }
                if pending.is_empty() {
                    pending.push_back(".".to_owned());
                }
                continue;
            }
            _ => {}
        }
        let st = statat(cur, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            if policy == SymlinkPolicy::RefuseAll {
                return Err(Errno::LOOP.into());
            }
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(Errno::LOOP.into());
            }
            let target = rustix::fs::readlinkat(cur, name.as_str(), Vec::new())?;
            let target = target.to_str().map_err(|_| io::Error::from(Errno::NOENT))?;
            if target.starts_with('/') {
                // An absolute target names a place outside the root's namespace.
                return Err(Errno::XDEV.into());
            }
            for part in target.rsplit('/') {
                pending.push_front(part.to_owned());
            }
            continue;
        }
        if pending.is_empty() {
            // O_NOFOLLOW: if the name was swapped for a symlink since statat, this fails (ELOOP).
            return Ok(openat(
                cur,
                name.as_str(),
                FILE_FLAGS | OFlags::NOFOLLOW,
                Mode::empty(),
            )?);
        }
        let dir = openat(
            cur,
            name.as_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        stack.push(dir);
    }
    Ok(openat(
        root,
        ".",
        FILE_FLAGS | OFlags::DIRECTORY,
        Mode::empty(),
    )?)
}

/// `pread` into `buf`'s spare capacity (no zero-fill), up to `buf.capacity()`.
pub(crate) fn read_at_into(
    file: &File,
    buf: &mut Vec<u8>,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    let want = len - buf.len();
    if buf.capacity() - buf.len() < want {
        buf.reserve_exact(want);
    }
    loop {
        let before = buf.len();
        match rustix::io::pread(file, rustix::buffer::spare_capacity(buf), offset) {
            Ok(_) => {
                // The reservation may exceed `len`; never keep bytes past it.
                buf.truncate(len.max(before));
                return Ok(buf.len() - before);
            }
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `pread` into `buf` until it is full or the file ends; returns the bytes read.
pub(crate) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(file, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// `sendmsg` of ordinary slices; `more` sets `MSG_MORE` because file data follows.
pub(crate) fn send_vectored(
    sock: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    more: bool,
) -> io::Result<usize> {
    let mut flags = SendFlags::NOSIGNAL;
    if more {
        flags |= SendFlags::MORE;
    }
    loop {
        match rustix::net::sendmsg(sock, bufs, &mut SendAncillaryBuffer::default(), flags) {
            Err(Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

/// What the peer of a socket is, for the wait before a response's last byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// TCP to a loopback address: sent bytes are in the peer's receive queue at once.
    TcpLoopback,
    /// TCP to any other address.
    Tcp,
    /// Anything else (a Unix socket).
    Other,
}

pub(crate) fn peer(sock: BorrowedFd<'_>) -> Peer {
    match socket2::SockRef::from(&sock)
        .peer_addr()
        .map(|a| a.as_socket())
    {
        Ok(Some(addr)) => {
            let loopback = match addr.ip() {
                std::net::IpAddr::V4(ip) => ip.is_loopback(),
                std::net::IpAddr::V6(ip) => {
                    ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
                }
            };
            if loopback {
                Peer::TcpLoopback
            } else {
                Peer::Tcp
            }
        }
        _ => Peer::Other,
    }
}

/// `TCP_NOTSENT_LOWAT` of `sock` (0: the system default).
pub(crate) fn notsent_lowat(sock: BorrowedFd<'_>) -> io::Result<u32> {
    socket2::SockRef::from(&sock).tcp_notsent_lowat()
}

/// Sets `TCP_NOTSENT_LOWAT`: the socket polls writable only while fewer than about half this
/// many bytes are unsent (0: the system default).
pub(crate) fn set_notsent_lowat(sock: BorrowedFd<'_>, bytes: u32) -> io::Result<()> {
    socket2::SockRef::from(&sock).set_tcp_notsent_lowat(bytes)
}

/// Whether `sock` polls writable (or failed) right now. As a side effect, a socket found not
/// writable is marked so that the kernel signals `EPOLLOUT` when it becomes writable.
pub(crate) fn poll_writable_now(sock: BorrowedFd<'_>) -> io::Result<bool> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&sock, PollFlags::OUT)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match poll(&mut fds, Some(&zero)) {
            Ok(n) => return Ok(n > 0),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// `sendfile(2)` of up to `count` bytes of `file` at `*offset`, advancing it.
pub(crate) fn send_file(
    sock: BorrowedFd<'_>,
    file: &File,
    offset: &mut u64,
    count: usize,
) -> io::Result<usize> {
    loop {
        match rustix::fs::sendfile(sock, file, Some(offset), count) {
            Err(Errno::INTR) => continue,
            r => return r.map_err(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn walk_confines_symlinks() {
        let dir = std::env::temp_dir().join(format!("tzc-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/sub")).unwrap();
        std::fs::write(dir.join("secret"), b"secret").unwrap();
        std::fs::write(dir.join("root/sub/ok.txt"), b"ok").unwrap();
        std::os::unix::fs::symlink("sub/ok.txt", dir.join("root/inside")).unwrap();
        std::os::unix::fs::symlink("../secret", dir.join("root/outside")).unwrap();
        std::os::unix::fs::symlink("../../secret", dir.join("root/sub/up2")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("root/abs")).unwrap();
        std::os::unix::fs::symlink("loop", dir.join("root/loop")).unwrap();
        let root = RootDir::open(&dir.join("root")).unwrap().0;
        let read = |fd: OwnedFd| {
            let mut s = String::new();
            File::from(fd).read_to_string(&mut s).unwrap();
            s
        };
        let p = SymlinkPolicy::RefuseEscaping;
        assert_eq!(read(walk(root.as_fd(), "sub/ok.txt", p).unwrap()), "ok");
        assert_eq!(read(walk(root.as_fd(), "inside", p).unwrap()), "ok");
        for bad in ["outside", "sub/up2", "abs"] {
            let err = walk(root.as_fd(), bad, p).unwrap_err();
            assert_eq!(classify_os(&err), OpenFailure::Forbidden, "{bad}: {err}");
        }
        assert_eq!(
            classify_os(&walk(root.as_fd(), "loop", p).unwrap_err()),
            OpenFailure::Forbidden
        );
        let err = walk(root.as_fd(), "inside", SymlinkPolicy::RefuseAll).unwrap_err();
        assert_eq!(classify_os(&err), OpenFailure::Forbidden);
        assert_eq!(
            super::super::classify(&walk(root.as_fd(), "nope", p).unwrap_err()),
            OpenFailure::NotFound
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
