//! Taking ownership of the file descriptors a supervisor hands its workers.
//!
//! This is the crate's only `unsafe`: turning a descriptor number from the command line
//! into an owned descriptor. It is checked as far as the kernel lets us: the descriptor
//! must be open, and the caller then checks it is the expected kind of socket.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Takes ownership of an inherited descriptor.
///
/// Must be called at most once per number, early in `main` before this process opens
/// anything (so an open descriptor at that number can only be the inherited one).
pub(crate) fn take_inherited(fd: RawFd) -> io::Result<OwnedFd> {
    if fd <= 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is stdio, not an inherited socket"),
        ));
    }
    // SAFETY: `fd` is not stdio and is only borrowed for the duration of this call, to ask
    // the kernel whether it is open (`EBADF` otherwise).
    rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).map_err(|e| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("inherited descriptor {fd} is not open: {e}"),
        )
    })?;
    // SAFETY: the descriptor is open (checked above), was created for this process by the
    // supervisor (a `dup` without close-on-exec), and nothing else in this process refers
    // to it: the caller takes each number once, before opening any file.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
