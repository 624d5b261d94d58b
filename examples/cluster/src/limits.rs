//! Process limits that decide how much hostile traffic a worker survives: the
//! file-descriptor limit and the connection cap derived from it.

/// Descriptors a serving process needs besides its connections: stdio, the listener, the
/// control socket, the epoll and event descriptors, files open for `/static`, the admin
/// listener and its connections.
pub(crate) const RESERVED_FDS: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (many distributions start processes at
/// a soft 1024, far below what a server needs) and returns the soft limit now in force, or
/// `None` if it cannot be read. Workers inherit the raised limit.
pub(crate) fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let current = getrlimit(Resource::Nofile);
    let Some(soft) = current.current else {
        return None; // unlimited
    };
    if current.maximum.is_some_and(|hard| hard <= soft) {
        return Some(soft);
    }
    let raised = Rlimit {
        current: current.maximum,
        maximum: current.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => current.maximum.or(Some(soft)),
        Err(e) => {
            tracing::warn!(soft, error = %e, "cannot raise RLIMIT_NOFILE to its hard limit");
            Some(soft)
        }
    }
}

/// The connection cap a worker enforces: `requested`, lowered so that the connections and
/// [`RESERVED_FDS`] fit in the descriptor limit `nofile` (`None`: unlimited or unknown).
pub(crate) fn connection_cap(requested: usize, nofile: Option<u64>) -> usize {
    let Some(nofile) = nofile else {
        return requested;
    };
    let room = usize::try_from(nofile.saturating_sub(RESERVED_FDS))
        .unwrap_or(usize::MAX)
        .max(1);
    if requested > room {
        tracing::warn!(
            requested,
            nofile,
            cap = room,
            "--max-connections lowered to fit the file-descriptor limit (RLIMIT_NOFILE)"
        );
        return room;
    }
    requested
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_in_the_descriptor_limit() {
        assert_eq!(connection_cap(10_000, None), 10_000);
        assert_eq!(connection_cap(10_000, Some(1_000_000)), 10_000);
        assert_eq!(connection_cap(10_000, Some(1024)), 1024 - 256);
        assert_eq!(connection_cap(10_000, Some(10)), 1);
    }

    #[test]
    fn raising_the_limit_never_lowers_it() {
        let before = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let after = raise_nofile_limit();
        if let (Some(before), Some(after)) = (before, after) {
            assert!(after >= before);
        }
    }
}
