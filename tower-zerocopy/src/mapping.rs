//! Read-only memory maps of files, the carriers of the sendfile path, and the one socket query
//! that tells when a socket no longer holds references to their pages. The only module with
//! `unsafe` code.
//!
//! A [`Mapping`] maps a whole file read-only and shared, and registers its address range in
//! [`registry`](crate::registry) with the file descriptor. Body chunks are `Bytes` whose owner
//! keeps the mapping alive ([`Mapping::slice`]); [`SendfileStream`](crate::SendfileStream)
//! recognises their addresses and sends them with `sendfile(2)`, so in the intended setup the
//! mapped pages are **never read by this process**: no page faults on the worker, and no
//! `SIGBUS` when the file is truncated under us (sendfile just returns short).
//!
//! The mapping is only handed out where a sendfile-capable connection will consume it (see
//! [`SendfileCapability`](crate::SendfileCapability)). If another layer does read the bytes
//! (compression, TLS, HTTP/2), it reads the file's current page-cache contents — correct data —
//! but a concurrent truncation of the file then raises `SIGBUS`, the documented hazard of every
//! file mapping.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};

use crate::registry::{self, Target};

/// A read-only shared mapping of a whole file, registered for sendfile while it lives.
#[derive(Debug)]
pub(crate) struct Mapping {
    map: Mmap,
    target: Arc<Target>,
}

impl Mapping {
    /// Maps the first `len` bytes of `file` (which must be at least 1).
    pub(crate) fn new(file: Arc<File>, len: u64) -> io::Result<Arc<Mapping>> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
        // SAFETY: the mapping is PROT_READ and MAP_SHARED, so this process cannot change the file
        // through it. Its contents may change if another process writes the file; `Mmap` hands
        // out `&[u8]` anyway, which is why this crate never reads the bytes itself: they are
        // only ever passed by address to `sendfile` via the registry (see the module docs for
        // the layers that might read them, and the consequences).
        let map = unsafe { MmapOptions::new().len(len).map(&*file)? };
        let target = Target::new(file);
        registry::insert(map.as_ptr() as usize, map.len(), target.clone(), 0);
        Ok(Arc::new(Mapping { map, target }))
    }

    /// Length of the mapping in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// A `Bytes` over `range` of the file that keeps this mapping alive.
    pub(crate) fn slice(self: &Arc<Self>, range: Range<u64>) -> Bytes {
        self.make_slice(range, false)
    }

    /// As [`Self::slice`], for the last file bytes of a response: while the `Bytes` lives,
    /// `range.end` is a fence of the file (see [`Target::is_fence`]), so the stream checks the
    /// file before it sends the response's last byte.
    pub(crate) fn fenced_slice(self: &Arc<Self>, range: Range<u64>) -> Bytes {
        self.make_slice(range, true)
    }

    fn make_slice(self: &Arc<Self>, range: Range<u64>, fence: bool) -> Bytes {
        let start = usize::try_from(range.start).expect("range lies within the mapping");
        let end = usize::try_from(range.end).expect("range lies within the mapping");
        assert!(
            start <= end && end <= self.map.len(),
            "range lies within the mapping"
        );
        if fence {
            self.target.add_fence(range.end);
        }
        Bytes::from_owner(MappedSlice {
            mapping: self.clone(),
            start,
            end,
            fence,
        })
    }

    /// The span (file offsets) from the first to the last page of `range` that is not in the
    /// page cache, or `None` if all of it is resident. Uses `mincore(2)`, which inspects the
    /// page tables of the cache without touching the pages.
    pub(crate) fn non_resident(&self, range: Range<u64>) -> io::Result<Option<Range<u64>>> {
        if range.start >= range.end {
            return Ok(None);
        }
        let page = rustix::param::page_size() as u64;
        let first = range.start / page * page;
        let len = (range.end - first) as usize;
        let pages = len.div_ceil(page as usize);
        let mut vec = vec![0u8; pages];
        // SAFETY: `first` is page-aligned and `[first, first + len)` lies within this live
        // mapping (`range.end <= self.len()` is checked by the caller and by `slice`); `vec` has
        // one byte per page of that span as mincore(2) requires. mincore only reads page tables.
        let rc = unsafe {
            libc::mincore(
                self.map.as_ptr().add(first as usize) as *mut libc::c_void,
                len,
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let lo = vec.iter().position(|b| b & 1 == 0);
        let hi = vec.iter().rposition(|b| b & 1 == 0);
        Ok(match (lo, hi) {
            (Some(lo), Some(hi)) => Some(
                (first + lo as u64 * page).max(range.start)
                    ..(first + (hi as u64 + 1) * page).min(range.end),
            ),
            _ => None,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Deregister first: once this returns no writer can find the range, and the `Mmap`
        // field is unmapped only after `drop` returns.
        registry::remove(self.map.as_ptr() as usize);
    }
}

/// The owner behind a mapped `Bytes`.
struct MappedSlice {
    mapping: Arc<Mapping>,
    start: usize,
    end: usize,
    /// `end` is a fence of the file while this slice lives.
    fence: bool,
}

impl Drop for MappedSlice {
    fn drop(&mut self) {
        if self.fence {
            self.mapping.target.remove_fence(self.end as u64);
        }
    }
}

impl AsRef<[u8]> for MappedSlice {
    fn as_ref(&self) -> &[u8] {
        // `Bytes::from_owner` calls this once to learn the pointer and length; it does not read.
        &self.mapping.map[self.start..self.end]
    }
}

// ===== socket queue =====

/// Bytes the TCP socket `fd` holds that it has not sent yet (`SIOCOUTQNSD`).
pub(crate) fn socket_unsent(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut out: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD on a TCP socket writes one `int` through the pointer, which points at
    // `out`, a live `c_int`. `fd` is a valid descriptor for the duration of the borrow.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCOUTQNSD as _,
            &mut out as *mut libc::c_int,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(out).unwrap_or(0))
}

/// Bytes the socket `fd` still holds for its peer (`SIOCOUTQ`): for TCP, bytes not yet
/// acknowledged by the peer (sent or not); for a Unix stream socket, bytes the peer has not read
/// yet. While it is non-zero, the socket may still hold references to page-cache pages handed to
/// it by `sendfile(2)`.
pub(crate) fn socket_outq(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut out: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) on a socket writes one `int` through the pointer, which
    // points at `out`, a live `c_int`. `fd` is a valid descriptor for the duration of the borrow.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut out as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(out).unwrap_or(0))
}
