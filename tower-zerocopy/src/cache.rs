//! The open-file cache: descriptors and metadata of recently served paths (like nginx's
//! `open_file_cache`), including negative entries, bounded and invalidated on change.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fs::File;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::conditional::Validators;
use crate::sys::{self, OpenFailure, RootDir};
use crate::SymlinkPolicy;

#[cfg(target_os = "linux")]
use crate::mapping::Mapping;

/// An open file (or directory) with the metadata read right after opening it.
#[derive(Debug)]
pub(crate) struct OpenFile {
    pub(crate) file: Arc<File>,
    pub(crate) len: u64,
    /// `Content-Length` of a whole-file response (formatted once per cached entry).
    pub(crate) len_header: http::HeaderValue,
    pub(crate) is_dir: bool,
    identity: (u64, u64, u64, Option<SystemTime>),
    pub(crate) validators: Validators,
    /// The `Content-Type` guessed from the path it was opened by (cached with the entry).
    content_type: std::sync::OnceLock<http::HeaderValue>,
    #[cfg(target_os = "linux")]
    mapping: std::sync::OnceLock<Option<Arc<Mapping>>>,
}

pub(crate) type Lookup = Result<Arc<OpenFile>, OpenFailure>;

impl OpenFile {
    /// Opens `rel` beneath `root` and reads its metadata. Blocking.
    pub(crate) fn open(root: &RootDir, rel: &str, policy: SymlinkPolicy) -> Lookup {
        let file = root
            .open_beneath(rel, policy)
            .map_err(|e| sys::classify(&e))?;
        Self::from_file(file).map_err(|e| sys::classify(&e))
    }

    fn from_file(file: File) -> std::io::Result<Arc<Self>> {
        let meta = file.metadata()?;
        if !meta.is_file() && !meta.is_dir() {
            // FIFOs, sockets and devices are never served.
            return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
        }
        let (dev, ino) = dev_ino(&meta);
        let mtime = meta.modified().ok();
        let len = meta.len();
        Ok(Arc::new(OpenFile {
            file: Arc::new(file),
            len,
            len_header: http::HeaderValue::from(len),
            is_dir: meta.is_dir(),
            identity: (dev, ino, len, mtime),
            validators: Validators::new(ino, len, mtime, ""),
            content_type: std::sync::OnceLock::new(),
            #[cfg(target_os = "linux")]
            mapping: std::sync::OnceLock::new(),
        }))
    }

    /// Whether the open descriptor still describes the same version (size and mtime).
    fn unchanged(&self) -> bool {
        match self.file.metadata() {
            Ok(meta) => meta.len() == self.identity.2 && meta.modified().ok() == self.identity.3,
            Err(_) => false,
        }
    }

    /// The `Content-Type` for `rel`, the path this entry was opened by (guessed from its
    /// extension on first use; the cache keys entries by that path).
    pub(crate) fn content_type(&self, rel: &str) -> http::HeaderValue {
        self.content_type
            .get_or_init(|| {
                mime_guess::from_path(rel).first_raw().map_or(
                    http::HeaderValue::from_static("application/octet-stream"),
                    http::HeaderValue::from_static,
                )
            })
            .clone()
    }

    /// The file's registered memory map, created on first use and shared by later responses.
    #[cfg(target_os = "linux")]
    pub(crate) fn mapping(&self) -> Option<Arc<Mapping>> {
        self.mapping
            .get_or_init(|| {
                if self.len == 0 || self.is_dir {
                    return None;
                }
                Mapping::new(self.file.clone(), self.len)
                    .map_err(|e| tracing::debug!("mmap failed, using the portable path: {e}"))
                    .ok()
            })
            .clone()
    }
}

#[cfg(unix)]
fn dev_ino(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn dev_ino(_meta: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

const SHARDS: usize = 8;

/// A bounded, sharded map from relative path to the outcome of opening it.
#[derive(Debug)]
pub(crate) struct FileCache {
    shards: Vec<Mutex<HashMap<String, Cached>>>,
    per_shard: usize,
    validity: Duration,
    hasher: RandomState,
}

#[derive(Debug)]
struct Cached {
    value: Lookup,
    checked: Instant,
}

impl FileCache {
    pub(crate) fn new(capacity: usize, validity: Duration) -> Self {
        FileCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS),
            validity,
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, rel: &str) -> &Mutex<HashMap<String, Cached>> {
        &self.shards[self.hasher.hash_one(rel) as usize % SHARDS]
    }

    /// A fresh cached outcome for `rel`: younger than the validity period and, for a file, with
    /// unchanged size and mtime (one `fstat`, no disk I/O). `None` means "open it".
    pub(crate) fn get(&self, rel: &str) -> Option<Lookup> {
        if self.per_shard == 0 {
            return None;
        }
        let value = {
            let map = self.shard(rel).lock().unwrap_or_else(|e| e.into_inner());
            let cached = map.get(rel)?;
            if cached.checked.elapsed() > self.validity {
                return None;
            }
            cached.value.clone()
        };
        match &value {
            Ok(f) if !f.is_dir && !f.unchanged() => None,
            _ => Some(value),
        }
    }

    /// Opens `rel` and caches the outcome. If the cache held the same version (same device,
    /// inode, size and mtime), that entry is kept — with its memory map — and the new
    /// descriptor is closed. Blocking.
    pub(crate) fn open(&self, root: &RootDir, rel: &str, policy: SymlinkPolicy) -> Lookup {
        if let Some(hit) = self.get(rel) {
            return hit;
        }
        let fresh = OpenFile::open(root, rel, policy);
        if self.per_shard == 0 {
            return fresh;
        }
        let mut map = self.shard(rel).lock().unwrap_or_else(|e| e.into_inner());
        let value = match (map.get(rel).map(|c| &c.value), &fresh) {
            (Some(Ok(old)), Ok(new)) if old.identity == new.identity && !old.is_dir => {
                Ok(old.clone())
            }
            _ => fresh,
        };
        if map.len() >= self.per_shard && !map.contains_key(rel) {
            // Evict the entry checked longest ago.
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, c)| c.checked)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            rel.to_owned(),
            Cached {
                value: value.clone(),
                checked: Instant::now(),
            },
        );
        value
    }

    /// Drops every entry (closing descriptors and unmapping files no response still uses).
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}
