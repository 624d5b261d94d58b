//! Free loopback ports for the servers of a run.
//!
//! The kernel picks a free ephemeral port when we bind port 0; the harness releases it right away
//! for the server to bind. Two ports handed out in one run are never the same (the kernel can hand
//! a just-released port out again), and a server that still loses the race fails its readiness
//! check with a clear error rather than measuring the wrong process.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Mutex;

/// Hands out distinct free ports on 127.0.0.1.
#[derive(Debug, Default)]
pub struct PortAllocator {
    given: Mutex<HashSet<u16>>,
}

impl PortAllocator {
    /// A new allocator that has handed out nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// A port that is free right now and was not handed out before by this allocator.
    pub fn next(&self) -> io::Result<u16> {
        self.next_with(|| {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            Ok(l.local_addr()?.port())
        })
    }

    /// A free loopback address (see [`PortAllocator::next`]).
    pub fn addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, self.next()?)))
    }

    /// [`PortAllocator::next`] with the kernel's choice injected, for tests.
    fn next_with(&self, mut probe: impl FnMut() -> io::Result<u16>) -> io::Result<u16> {
        let mut given = self.given.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..64 {
            let port = probe()?;
            if port != 0 && given.insert(port) {
                return Ok(port);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "the kernel kept offering ports this run already uses",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_a_port_twice() {
        let a = PortAllocator::new();
        let mut offers = [4000u16, 4000, 4000, 4001].into_iter();
        assert_eq!(a.next_with(|| Ok(offers.next().unwrap())).unwrap(), 4000);
        assert_eq!(a.next_with(|| Ok(offers.next().unwrap())).unwrap(), 4001);
    }

    #[test]
    fn gives_up_when_the_kernel_repeats_itself() {
        let a = PortAllocator::new();
        a.next_with(|| Ok(5000)).unwrap();
        let err = a.next_with(|| Ok(5000)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrNotAvailable);
    }

    #[test]
    fn real_ports_are_distinct_and_bindable() {
        let a = PortAllocator::new();
        let p1 = a.next().unwrap();
        let p2 = a.next().unwrap();
        assert_ne!(p1, p2);
        TcpListener::bind((Ipv4Addr::LOCALHOST, p1)).unwrap();
        assert!(a.addr().unwrap().ip().is_loopback());
    }
}
