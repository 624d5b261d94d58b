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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};

use crate::registry::{self, Target};

/// At most this many windows of one mapping have a residency slot (8 bytes each): the first
/// 8 GiB of a file at the default 8 MiB window. Windows past them are checked every time, so
/// a huge file or a tiny window cannot make a cached file's slots grow with its length.
const RESIDENCY_SLOTS: usize = 1024;

/// A read-only shared mapping of a whole file, registered for sendfile while it lives.
#[derive(Debug)]
pub(crate) struct Mapping {
    map: Mmap,
    target: Arc<Target>,
    /// Per map window (of the size fixed at the first check): when a check last found all of
    /// it in the page cache ([`now`]; 0: never).
    resident_at: std::sync::OnceLock<(u64, Box<[AtomicU64]>)>,
}

/// Nanoseconds since the first call in this process, plus one (so never 0).
fn now() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let nanos = BASE.get_or_init(Instant::now).elapsed().as_nanos();
    u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1
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
        Ok(Arc::new(Mapping {
            map,
            target,
            resident_at: std::sync::OnceLock::new(),
        }))
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
    /// page cache, or `None` if all of it is resident. Asks `cachestat(2)` first (one step per
    /// cached folio); only a range that is not all cached (or a kernel without `cachestat`) goes
    /// on to `mincore(2)`, which looks every page of an untouched mapping up on its own (a
    /// quarter of the worker's CPU on 256 MiB files) but says which pages are missing. Neither
    /// touches the pages.
    ///
    /// A range that is one whole `window` of the file (`[k * window, (k + 1) * window)`, the
    /// last one cut at the end of the file) is not checked again within `recheck` of a check
    /// that found all of it cached (see
    /// [`ServeDir::residency_recheck`](crate::ServeDir::residency_recheck)).
    pub(crate) fn non_resident(
        &self,
        range: Range<u64>,
        window: u64,
        recheck: Duration,
    ) -> io::Result<Option<Range<u64>>> {
        if range.start >= range.end {
            return Ok(None);
        }
        let slot = self.window_slot(&range, window);
        if let Some(slot) = slot {
            let at = slot.load(Ordering::Relaxed);
            if !recheck.is_zero()
                && at != 0
                && u128::from(now().saturating_sub(at)) < recheck.as_nanos()
            {
                return Ok(None);
            }
        }
        let page = rustix::param::page_size() as u64;
        let first = range.start / page * page;
        let last = (range.end - 1) / page * page;
        if cached_pages(&self.target.file, first..last + page) == Some((last - first) / page + 1) {
            if let Some(slot) = slot {
                slot.store(now(), Ordering::Relaxed);
            }
            return Ok(None);
        }
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
        let missing = match (lo, hi) {
            (Some(lo), Some(hi)) => Some(
                (first + lo as u64 * page).max(range.start)
                    ..(first + (hi as u64 + 1) * page).min(range.end),
            ),
            _ => None,
        };
        if let Some(slot) = slot {
            // Trusted from now if all of it is cached; a miss ends the trust.
            slot.store(if missing.is_none() { now() } else { 0 }, Ordering::Relaxed);
        }
        Ok(missing)
    }

    /// The residency slot of `range` if it is exactly one window of `window` bytes (the window
    /// size of the first call fixes the slots; other sizes get none).
    fn window_slot(&self, range: &Range<u64>, window: u64) -> Option<&AtomicU64> {
        if window == 0 || range.start % window != 0 {
            return None;
        }
        if range.end != (range.start + window).min(self.len()) {
            return None;
        }
        let (size, slots) = self.resident_at.get_or_init(|| {
            let n = usize::try_from(self.len().div_ceil(window))
                .unwrap_or(usize::MAX)
                .min(RESIDENCY_SLOTS);
            (window, (0..n).map(|_| AtomicU64::new(0)).collect())
        });
        if *size != window {
            return None;
        }
        slots.get(usize::try_from(range.start / window).ok()?)
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

// ===== cachestat =====

/// `cachestat(2)` (Linux 6.5): 451 on every architecture with the unified system call table;
/// elsewhere the residency check goes straight to `mincore(2)`.
const SYS_CACHESTAT: Option<libc::c_long> = if cfg!(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "riscv32",
    target_arch = "loongarch64",
    target_arch = "powerpc64",
    target_arch = "powerpc",
    target_arch = "s390x"
)) {
    Some(451)
} else {
    None
};

/// Pages of `range` (page-aligned file offsets) of `file` in the page cache, or `None` if the
/// kernel cannot tell cheaply.
fn cached_pages(file: &File, range: Range<u64>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    #[repr(C)]
    struct CachestatRange {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Cachestat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// Set once `cachestat(2)` turned out to be missing (older kernel, or refused by a filter).
    static NO_CACHESTAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let nr = SYS_CACHESTAT?;
    if NO_CACHESTAT.load(Ordering::Relaxed) || range.start >= range.end {
        return None;
    }
    let req = CachestatRange {
        off: range.start,
        len: range.end - range.start,
    };
    let mut out = Cachestat::default();
    // SAFETY: cachestat(fd, const struct cachestat_range *, struct cachestat *, unsigned flags)
    // reads `req` and writes one `struct cachestat` into `out`; both are live, `#[repr(C)]`
    // with the kernel's layout (two and five `__u64`). `file` keeps the descriptor open.
    let rc = unsafe {
        libc::syscall(
            nr,
            file.as_raw_fd(),
            &req as *const CachestatRange,
            &mut out as *mut Cachestat,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        if matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
        ) {
            NO_CACHESTAT.store(true, Ordering::Relaxed);
        }
        return None;
    }
    Some(out.nr_cache)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A file of `len` bytes under the temp dir, written and synced (so its pages are cached
    /// and clean), opened again for reading; the caller removes `path`.
    fn cached_file(name: &str, len: u64) -> (std::path::PathBuf, Arc<File>) {
        let path = std::env::temp_dir().join(format!("tzc-{name}-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; len as usize]).unwrap();
        f.sync_all().unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        (path, file)
    }

    #[test]
    fn residency_of_cached_and_evicted_ranges() {
        let len = 4u64 << 20;
        let (path, file) = cached_file("resident", len);
        let map = Mapping::new(file.clone(), len).unwrap();
        // Just written: cached (cachestat, where the kernel has it, agrees with mincore).
        assert_eq!(
            map.non_resident(100..len - 100, len, Duration::ZERO)
                .unwrap(),
            None
        );
        let pages = len / rustix::param::page_size() as u64;
        if let Some(n) = cached_pages(&file, 0..len) {
            assert_eq!(n, pages);
        }
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let cold = map
            .non_resident(0..len, len, Duration::ZERO)
            .unwrap()
            .expect("evicted pages are found");
        assert!(cold.end > cold.start, "{cold:?}");
        // Read the first 1 MiB back in without read-ahead: the end stays evicted.
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::Random).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, 0).unwrap();
        assert_eq!(
            map.non_resident(0..1 << 20, len, Duration::ZERO).unwrap(),
            None
        );
        assert!(map
            .non_resident(len - 4096..len, len, Duration::ZERO)
            .unwrap()
            .is_some());
        drop(map);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_window_found_resident_is_trusted_for_the_recheck_interval() {
        let len = 1u64 << 20;
        let (path, file) = cached_file("recheck", len);
        let map = Mapping::new(file.clone(), len).unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(map.non_resident(0..len, len, hour).unwrap(), None);
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        // Within the interval the whole file is not asked about again ...
        assert_eq!(map.non_resident(0..len, len, hour).unwrap(), None);
        // ... but a part of it is, and so is the whole file without an interval.
        assert!(map.non_resident(0..len / 2, len, hour).unwrap().is_some());
        assert!(map
            .non_resident(0..len, len, Duration::ZERO)
            .unwrap()
            .is_some());
        // A check of the whole file that found pages missing ends the trust.
        assert!(map.non_resident(0..len, len, hour).unwrap().is_some());
        // Read back in: found resident again, and trusted until the interval expires.
        let mut buf = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, 0).unwrap();
        let ms = Duration::from_millis(1);
        assert_eq!(map.non_resident(0..len, len, ms).unwrap(), None);
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            map.non_resident(0..len, len, ms).unwrap().is_some(),
            "expired"
        );
        // Windows of a larger file each have their own trust; other ranges are always checked.
        // (The first check of a map fixes its window size.)
        let map = Mapping::new(file.clone(), len).unwrap();
        let w = len / 4;
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, 0).unwrap();
        assert_eq!(map.non_resident(w..2 * w, w, hour).unwrap(), None);
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert_eq!(
            map.non_resident(w..2 * w, w, hour).unwrap(),
            None,
            "trusted"
        );
        assert!(
            map.non_resident(0..w, w, hour).unwrap().is_some(),
            "never checked"
        );
        assert!(map
            .non_resident(w..2 * w - 4096, w, hour)
            .unwrap()
            .is_some());
        assert!(
            map.non_resident(w..2 * w, w / 2, hour).unwrap().is_some(),
            "other size"
        );
        drop(map);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn residency_slots_are_capped_whatever_the_file_and_window() {
        let path = std::env::temp_dir().join(format!("tzc-slots-{}", std::process::id()));
        // Sparse: 1 GiB of holes, 262,144 windows of 4 KiB.
        let len = 1u64 << 30;
        File::create(&path).unwrap().set_len(len).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let map = Mapping::new(file, len).unwrap();
        let hour = Duration::from_secs(3600);
        // A hole is not in the page cache either way; what matters is the slots it sets up.
        let _ = map.non_resident(0..4096, 4096, hour).unwrap();
        let (window, slots) = map
            .resident_at
            .get()
            .expect("the first check fixes the slots");
        assert_eq!((*window, slots.len()), (4096, RESIDENCY_SLOTS));
        // A window past the last slot has none (it is checked every time), and no panic.
        let past = len - 4096;
        assert!(map.window_slot(&(past..len), 4096).is_none());
        assert!(map.non_resident(past..len, 4096, hour).unwrap().is_some());
        drop(map);
        std::fs::remove_file(&path).unwrap();
    }
}
