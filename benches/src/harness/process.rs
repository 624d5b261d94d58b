//! Child processes that are always stopped, by their own pid: on drop, on error, and on Ctrl-C.
//!
//! Every server starts in a new process group whose id is its own pid, so its workers (Node's
//! cluster, nginx, our cluster) can be stopped through that one id even if the root dies first.
//! Stopping sends `SIGTERM` to the root, waits a bounded time, then `SIGKILL`s the group.
//! [`install_signal_handler`] makes Ctrl-C, `SIGTERM` and `SIGHUP` stop every registered group
//! before the harness exits, since a signal would otherwise skip the drop guards.

use std::collections::BTreeSet;
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustix::process::{kill_process, kill_process_group, Pid, Signal};

/// Process groups started by this harness and not yet stopped.
static LIVE: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Scratch directories to remove if a signal ends the harness (drop guards do not run then).
static SCRATCH: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());

/// Registers a directory that [`install_signal_handler`]'s handler removes before exiting.
pub fn remove_on_signal(dir: std::path::PathBuf) {
    SCRATCH.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
}

/// How long a server gets to exit after `SIGTERM` before its group is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// A started process; dropping it stops the process and its group.
#[derive(Debug)]
pub struct Guarded {
    child: Child,
    name: String,
    stopped: bool,
}

impl Guarded {
    /// Starts `cmd` in a new process group and registers it for [`stop_all`].
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Guarded> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        // Register under the lock before the child exists, so a Ctrl-C arriving in between
        // cannot miss it (the handler takes the same lock).
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        live.insert(child.id() as i32);
        drop(live);
        Ok(Guarded {
            child,
            name: name.to_owned(),
            stopped: false,
        })
    }

    /// The root process id (also the process group id).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The child's standard output, if it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status if the process has already exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit by itself, up to `limit`; on timeout it is stopped and an
    /// error returned.
    pub fn wait_timeout(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait()? {
                self.finish();
                return Ok(st);
            }
            if Instant::now() >= deadline {
                self.stop();
                anyhow::bail!("{} did not finish within {:?}", self.name, limit);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the process: `SIGTERM`, up to [`STOP_GRACE`] to exit, then `SIGKILL` to the group
    /// (which also takes any worker the root left behind). Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        let pid = self.pid();
        if self.child.try_wait().ok().flatten().is_none() {
            if let Some(p) = Pid::from_raw(pid) {
                let _ = kill_process(p, Signal::TERM);
            }
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
                thread::sleep(Duration::from_millis(10));
            }
        }
        self.finish();
    }

    /// Kills whatever is left of the group, reaps the root and unregisters it.
    fn finish(&mut self) {
        if let Some(p) = Pid::from_raw(self.pid()) {
            // ESRCH (group already empty) is the normal case.
            let _ = kill_process_group(p, Signal::KILL);
        }
        let _ = self.child.wait();
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pid());
        self.stopped = true;
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `SIGKILL`s every process group this harness started and has not stopped yet.
pub fn stop_all() {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for &pid in live.iter() {
        if let Some(p) = Pid::from_raw(pid) {
            let _ = kill_process_group(p, Signal::TERM);
        }
    }
    thread::sleep(Duration::from_millis(300));
    for &pid in live.iter() {
        if let Some(p) = Pid::from_raw(pid) {
            let _ = kill_process_group(p, Signal::KILL);
        }
    }
}

/// Makes `SIGINT`, `SIGTERM` and `SIGHUP` stop every started process group, then exit with
/// status 130. Call once, early in `main`.
pub fn install_signal_handler() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    thread::Builder::new()
        .name("stop-on-signal".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("compare: signal {sig}, stopping every server started");
                stop_all();
                for dir in SCRATCH.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                std::process::exit(130);
            }
        })?;
    Ok(())
}

/// The number of process groups currently registered (for tests and a final sanity check).
pub fn live_count() -> usize {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    #[test]
    fn drop_stops_the_whole_group() {
        // A parent that ignores SIGTERM and leaves a child behind: only the group kill ends both.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; sleep 30 & echo $! ; wait"])
            .stdout(std::process::Stdio::piped());
        let mut g = Guarded::spawn("test-group", &mut cmd).unwrap();
        let root = g.pid();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(g.child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        assert!(alive(root) && alive(grandchild));
        drop(g);
        // The grandchild is reparented and reaped by init; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(root));
        assert!(!alive(grandchild));
    }

    #[test]
    fn wait_timeout_returns_status_or_stops() {
        let mut ok = Guarded::spawn("true", &mut Command::new("true")).unwrap();
        assert!(ok.wait_timeout(Duration::from_secs(5)).unwrap().success());
        let mut slow = Command::new("sleep");
        slow.arg("30");
        let mut slow = Guarded::spawn("sleep", &mut slow).unwrap();
        let pid = slow.pid();
        assert!(slow.wait_timeout(Duration::from_millis(50)).is_err());
        assert!(!alive(pid));
    }
}
