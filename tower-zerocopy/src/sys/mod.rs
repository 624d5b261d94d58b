//! Operating-system primitives. Linux gets `openat2`, `sendfile` and `sendmsg(MSG_MORE)`; every
//! other target gets the portable implementations in `fallback.rs`.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub(crate) use linux::*;

#[cfg(not(target_os = "linux"))]
mod fallback;
#[cfg(not(target_os = "linux"))]
pub(crate) use fallback::*;

use std::io;

/// How an open failure maps onto an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenFailure {
    /// `404`: no such file, or a component is not a directory.
    NotFound,
    /// `403`: the path leaves the root through a symlink, or permission denied.
    Forbidden,
    /// `500`: anything else.
    Other,
}

pub(crate) fn classify(err: &io::Error) -> OpenFailure {
    match err.kind() {
        io::ErrorKind::NotFound => OpenFailure::NotFound,
        io::ErrorKind::PermissionDenied => OpenFailure::Forbidden,
        _ => classify_os(err),
    }
}

/// Reads up to `len` bytes at `offset` into a fresh buffer, retrying short reads until `len`
/// bytes or end of file. Runs on the blocking pool.
pub(crate) fn read_exact_at(file: &std::fs::File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        let n = read_at_into(file, &mut buf, at, len)?;
        if n == 0 {
            break;
        }
    }
    Ok(buf)
}
