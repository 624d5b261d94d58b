//! A server's CPU time and peak memory, read from `/proc` for its whole process tree.
//!
//! CPU time is `utime + stime` plus `cutime + cstime` (the time of children already reaped, so a
//! worker that exits mid-run still counts), summed over the root process and every descendant.
//! On loopback it includes kernel receive work charged to the sending side, which is part of what
//! a server costs. Peak memory is the sum of each process's `VmHWM` (peak resident set): an upper
//! bound of the tree's simultaneous peak, exact for a single process.

use std::collections::HashMap;
use std::fs;
use std::io;

/// The fields of `/proc/<pid>/stat` the harness uses; times are in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
    /// User time of the process itself.
    pub utime: u64,
    /// System time of the process itself.
    pub stime: u64,
    /// User time of waited-for children.
    pub cutime: u64,
    /// System time of waited-for children.
    pub cstime: u64,
}

impl ProcStat {
    /// Own plus reaped children's CPU time, in clock ticks.
    pub fn total_ticks(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses one `/proc/<pid>/stat` line. The command name sits in parentheses and may itself contain
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let pid = line[..open].trim().parse().ok()?;
    // After ")": field 3 (state) is index 0, so field N is index N - 3.
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).copied();
    Some(ProcStat {
        pid,
        ppid: field(4)?.parse().ok()?,
        utime: field(14)?.parse().ok()?,
        stime: field(15)?.parse().ok()?,
        cutime: field(16)?.parse().ok()?,
        cstime: field(17)?.parse().ok()?,
    })
}

/// `VmHWM` (peak resident set size) in KiB from the text of `/proc/<pid>/status`.
pub fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix("VmHWM:")?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// `root` and all its descendants among `procs` (a snapshot of every process).
pub fn tree(root: i32, procs: &[ProcStat]) -> Vec<ProcStat> {
    let mut children: HashMap<i32, Vec<&ProcStat>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out: Vec<ProcStat> = procs.iter().filter(|p| p.pid == root).copied().collect();
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i].pid) {
            // A pid cycle is impossible in /proc, but a snapshot is not atomic: guard anyway.
            for k in kids {
                if !out.iter().any(|o| o.pid == k.pid) {
                    out.push(**k);
                }
            }
        }
        i += 1;
    }
    out
}

/// CPU ticks spent by a tree between two of its snapshots: per-process deltas for processes in
/// both, and the whole time of processes that appeared in between. A process that exited and was
/// reaped shows up with its whole lifetime in its parent's `cutime`/`cstime`, so the part it had
/// already spent at the first snapshot is taken off again.
pub fn ticks_between(before: &[ProcStat], after: &[ProcStat]) -> u64 {
    let gained: u64 = after
        .iter()
        .map(|a| match before.iter().find(|b| b.pid == a.pid) {
            Some(b) => a.total_ticks().saturating_sub(b.total_ticks()),
            None => a.total_ticks(),
        })
        .sum();
    let vanished: u64 = before
        .iter()
        .filter(|b| !after.iter().any(|a| a.pid == b.pid))
        .map(ProcStat::total_ticks)
        .sum();
    gained.saturating_sub(vanished)
}

/// Every process currently in `/proc` (processes that vanish while being read are skipped).
pub fn all_processes() -> io::Result<Vec<ProcStat>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let name = entry?.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(line) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(st) = parse_stat(&line) {
                out.push(st);
            }
        }
    }
    Ok(out)
}

/// A snapshot of the process tree rooted at `root`.
pub fn snapshot(root: i32) -> io::Result<Vec<ProcStat>> {
    Ok(tree(root, &all_processes()?))
}

/// Sum of `VmHWM` over the tree rooted at `root`, in KiB.
pub fn peak_rss_kib(root: i32) -> io::Result<u64> {
    let mut sum = 0;
    for p in snapshot(root)? {
        if let Ok(s) = fs::read_to_string(format!("/proc/{}/status", p.pid)) {
            sum += parse_vm_hwm_kib(&s).unwrap_or(0);
        }
    }
    Ok(sum)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), to turn ticks into seconds.
pub fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(pid: i32, ppid: i32, u: u64, s: u64, cu: u64, cs: u64) -> ProcStat {
        ProcStat {
            pid,
            ppid,
            utime: u,
            stime: s,
            cutime: cu,
            cstime: cs,
        }
    }

    #[test]
    fn parses_stat_with_awkward_command_name() {
        let line = "4242 (node ) (worker)) S 4200 4242 4200 0 -1 4194560 1024 0 0 0 \
                    150 37 9 4 20 0 11 0 123456 1000000 2500 18446744073709551615";
        assert_eq!(parse_stat(line), Some(st(4242, 4200, 150, 37, 9, 4)));
    }

    #[test]
    fn rejects_truncated_stat() {
        assert_eq!(parse_stat("17 (x) S 1 2 3"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_vm_hwm() {
        let status = "Name:\tnginx\nVmPeak:\t   20000 kB\nVmHWM:\t    5120 kB\nVmRSS:\t 4000 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(5120));
        assert_eq!(parse_vm_hwm_kib("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn tree_collects_grandchildren_only() {
        let procs = [
            st(1, 0, 0, 0, 0, 0),
            st(10, 1, 0, 0, 0, 0),
            st(11, 10, 0, 0, 0, 0),
            st(12, 11, 0, 0, 0, 0),
            st(13, 1, 0, 0, 0, 0),
        ];
        let mut pids: Vec<i32> = tree(10, &procs).iter().map(|p| p.pid).collect();
        pids.sort();
        assert_eq!(pids, vec![10, 11, 12]);
        assert!(tree(99, &procs).is_empty());
    }

    #[test]
    fn ticks_between_counts_new_and_reaped_processes() {
        let before = [st(10, 1, 100, 50, 0, 0), st(11, 10, 10, 10, 0, 0)];
        // 11 spent 10 more ticks, exited, and was reaped into 10's cutime/cstime with its whole
        // 30; 12 is a new worker. Spent in between: 10 (parent) + 10 (11) + 10 (12).
        let after = [st(10, 1, 105, 55, 25, 5), st(12, 10, 7, 3, 0, 0)];
        assert_eq!(ticks_between(&before, &after), 30);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        let snap = snapshot(me).unwrap();
        assert_eq!(snap[0].pid, me);
        assert!(peak_rss_kib(me).unwrap() > 0);
        assert!(ticks_per_second() > 0);
    }
}
