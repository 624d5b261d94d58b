//! Portable implementations for targets without `openat2`/`sendfile`: lookups are checked by
//! canonicalising (not race-free against concurrent symlink swaps; see the crate docs), reads use
//! positional reads, and the sendfile path is never taken.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use super::OpenFailure;
use crate::SymlinkPolicy;

/// Whether this target can send file bytes with `sendfile(2)`.
pub(crate) const HAS_SENDFILE: bool = false;

pub(crate) fn classify_os(_err: &io::Error) -> OpenFailure {
    OpenFailure::Other
}

/// The served directory, kept as a canonical path (no descriptor-relative lookups here).
#[derive(Debug)]
pub(crate) struct RootDir(PathBuf);

impl RootDir {
    pub(crate) fn open(root: &Path) -> io::Result<Self> {
        Ok(RootDir(root.canonicalize()?))
    }

    pub(crate) fn open_beneath(&self, rel: &str, policy: SymlinkPolicy) -> io::Result<File> {
        open_beneath_path(&self.0, rel, policy)
    }
}

fn open_beneath_path(root: &Path, rel: &str, policy: SymlinkPolicy) -> io::Result<File> {
    let mut path = root.to_path_buf();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        path.push(part);
        if policy == SymlinkPolicy::RefuseAll && path.symlink_metadata()?.file_type().is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "symlink refused",
            ));
        }
    }
    if policy != SymlinkPolicy::FollowAll && !path.canonicalize()?.starts_with(root) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "path leaves the root",
        ));
    }
    open_any(&path)
}

/// Opens a file or a directory for reading (metadata of a directory is needed for index files
/// and redirects).
#[cfg(windows)]
fn open_any(path: &Path) -> io::Result<File> {
    use std::os::windows::fs::OpenOptionsExt;
    // FILE_FLAG_BACKUP_SEMANTICS: without it Windows refuses to open a directory handle.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0x0200_0000)
        .open(path)
}

#[cfg(not(windows))]
fn open_any(path: &Path) -> io::Result<File> {
    File::open(path)
}

pub(crate) fn read_at_into(
    file: &File,
    buf: &mut Vec<u8>,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(len, 0);
    let n = read_at(file, &mut buf[start..], offset);
    match n {
        Ok(n) => {
            buf.truncate(start + n);
            Ok(n)
        }
        Err(e) => {
            buf.truncate(start);
            Err(e)
        }
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

#[cfg(not(any(unix, windows)))]
fn read_at(_file: &File, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "positional reads are not supported",
    ))
}
