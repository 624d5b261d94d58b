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

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

const SHARDS: usize = 16;

#[derive(Debug, Clone)]
struct Region {
    end: usize,
    file: Arc<File>,
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

/// Registers `[start, start + len)` as bytes of `file` starting at `file_offset`.
pub(crate) fn insert(start: usize, len: usize, file: Arc<File>, file_offset: u64) {
    let region = Region {
        end: start + len,
        file,
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
pub(crate) fn lookup(ptr: usize, len: usize) -> Option<(Arc<File>, u64)> {
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
        region.file.clone(),
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
        let file = Arc::new(File::open("/proc/self/exe").unwrap());
        let base = 0x7000_0000_0000usize;
        insert(base, 4096, file, 100);
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
}
