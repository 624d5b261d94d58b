//! The address-range registry: which memory belongs to which file region.
//!
//! A [`Mapping`](crate::mapping) registers its address range here when it is created and removes
//! it in `Drop` *before* unmapping. [`SendfileStream`](crate::SendfileStream) looks up every
//! slice hyper hands it; a slice inside a registered range is sent with `sendfile(2)` from the
//! file descriptor instead of being read.
//!
//! Lookups run on every vectored write of every connection, registrations only when a file is
//! mapped (mappings are cached with the open file). So the registry is a "big-reader" lock: one
//! copy of the map per shard, a reader touches only its thread's shard (no shared cache line
//! between cores), and a writer updates every shard.
//!
//! Each registered range points at a [`Target`]: the file, and the *fences* of that file — the
//! file offsets at which a response's file data ends (see [`Target::is_fence`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

const SHARDS: usize = 16;

/// The file behind a registered range, shared by every shard's copy of the range.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) file: Arc<File>,
    /// Number of entries in `fences` (read without the lock on every lookup).
    fence_count: AtomicUsize,
    /// End offsets of responses in flight (a multiset: two responses may end at the same offset).
    fences: Mutex<Vec<u64>>,
}

impl Target {
    pub(crate) fn new(file: Arc<File>) -> Arc<Self> {
        Arc::new(Target {
            file,
            fence_count: AtomicUsize::new(0),
            fences: Mutex::new(Vec::new()),
        })
    }

    /// Marks file offset `end` as the end of a response's file data, until [`Self::remove_fence`].
    pub(crate) fn add_fence(&self, end: u64) {
        let mut fences = self.fences.lock().unwrap_or_else(|e| e.into_inner());
        fences.push(end);
        self.fence_count.store(fences.len(), Ordering::Release);
    }

    /// Removes one mark added by [`Self::add_fence`].
    pub(crate) fn remove_fence(&self, end: u64) {
        let mut fences = self.fences.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = fences.iter().position(|&e| e == end) {
            fences.swap_remove(i);
        }
        self.fence_count.store(fences.len(), Ordering::Release);
    }

    /// Whether a slice whose file data ends at `end` ends a response: then
    /// [`SendfileStream`](crate::SendfileStream) checks the file before sending its last byte.
    pub(crate) fn is_fence(&self, end: u64) -> bool {
        if self.fence_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.fences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&end)
    }
}

#[derive(Debug, Clone)]
struct Region {
    end: usize,
    target: Arc<Target>,
    file_offset: u64,
}

type Shard = RwLock<BTreeMap<usize, Region>>;

static REGISTRY: [Shard; SHARDS] = [const { RwLock::new(BTreeMap::new()) }; SHARDS];
static LIVE: AtomicUsize = AtomicUsize::new(0);
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static MY_SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

fn shard() -> &'static Shard {
    &REGISTRY[MY_SHARD.with(|s| *s)]
}

/// Registers `[start, start + len)` as bytes of `target`'s file starting at `file_offset`.
pub(crate) fn insert(start: usize, len: usize, target: Arc<Target>, file_offset: u64) {
    let region = Region {
        end: start + len,
        target,
        file_offset,
    };
    for shard in &REGISTRY {
        shard
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(start, region.clone());
    }
    LIVE.fetch_add(1, Ordering::Release);
}

/// Removes the range starting at `start`. Must run before the memory is unmapped.
pub(crate) fn remove(start: usize) {
    for shard in &REGISTRY {
        shard
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&start);
    }
    LIVE.fetch_sub(1, Ordering::Release);
}

/// The file and offset behind `[ptr, ptr + len)`, if that whole span lies in one registered range.
pub(crate) fn lookup(ptr: usize, len: usize) -> Option<(Arc<Target>, u64)> {
    if LIVE.load(Ordering::Acquire) == 0 || len == 0 {
        return None;
    }
    let map = shard().read().unwrap_or_else(|e| e.into_inner());
    let (&start, region) = map.range(..=ptr).next_back()?;
    let end = ptr.checked_add(len)?;
    if end > region.end {
        return None;
    }
    Some((
        region.target.clone(),
        region.file_offset + (ptr - start) as u64,
    ))
}

/// Number of registered mappings alive right now (for tests and leak checks).
pub(crate) fn live_mappings() -> usize {
    LIVE.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_needs_containment() {
        let target = Target::new(Arc::new(File::open("/proc/self/exe").unwrap()));
        let base = 0x7000_0000_0000usize;
        insert(base, 4096, target, 100);
        assert_eq!(lookup(base, 4096).map(|r| r.1), Some(100));
        assert_eq!(lookup(base + 10, 6).map(|r| r.1), Some(110));
        assert!(lookup(base + 10, 4096).is_none());
        assert!(lookup(base - 1, 1).is_none());
        assert!(lookup(base + 4096, 1).is_none());
        let other = std::thread::spawn(move || lookup(base + 1, 1).map(|r| r.1))
            .join()
            .unwrap();
        assert_eq!(other, Some(101));
        remove(base);
        assert!(lookup(base, 1).is_none());
    }

    #[test]
    fn fences_are_a_multiset() {
        let target = Target::new(Arc::new(File::open("/proc/self/exe").unwrap()));
        assert!(!target.is_fence(10));
        target.add_fence(10);
        target.add_fence(10);
        target.add_fence(20);
        assert!(target.is_fence(10) && target.is_fence(20) && !target.is_fence(15));
        target.remove_fence(10);
        assert!(target.is_fence(10), "one response still ends at 10");
        target.remove_fence(10);
        target.remove_fence(20);
        assert!(!target.is_fence(10) && !target.is_fence(20));
        target.remove_fence(99);
        assert!(!target.is_fence(99));
    }
}
