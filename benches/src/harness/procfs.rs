//! A server's CPU time and peak memory, read from `/proc` for its whole process tree.
//!
//! CPU time is `utime + stime` plus `cutime + cstime` (the time of children already reaped, so a
//! worker that exits mid-run still counts), summed over the root process and every descendant.
//! Those fields count whole clock ticks (10 ms), which is coarse for a case of a few tenths of a
//! CPU second; so a process whose threads and reaped children stayed the same between two
//! snapshots is measured instead by its threads' run time in nanoseconds (the first field of
//! `/proc/<pid>/task/<tid>/schedstat`, the same clock the tick fields are scaled to). On
//! loopback it includes kernel receive work charged to the sending side, which is part of what
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

/// A process tree's CPU counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The processes, from `/proc/<pid>/stat`.
    pub procs: Vec<ProcStat>,
    /// Per process, each live thread's id and run time in ns, sorted by thread id; missing when
    /// unreadable (a kernel without schedstats, or a process gone meanwhile).
    pub threads: HashMap<i32, Vec<(i32, u64)>>,
}

/// Each live thread of `pid` with its run time in ns, sorted by thread id.
pub fn thread_runtimes(pid: i32) -> Option<Vec<(i32, u64)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let name = entry.ok()?.file_name();
        let tid: i32 = name.to_str()?.parse().ok()?;
        let line = fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
        out.push((tid, parse_schedstat_ns(&line)?));
    }
    out.sort_unstable();
    Some(out)
}

/// The run time in ns: the first field of a `schedstat` line.
pub fn parse_schedstat_ns(line: &str) -> Option<u64> {
    line.split_whitespace().next()?.parse().ok()
}

/// CPU seconds spent by a tree between two of its snapshots. Per process: the nanosecond run
/// times of its threads when the same threads were there at both snapshots and it reaped no
/// child in between; otherwise its tick delta (see [`ticks_between`]). A thread that both
/// started and ended between the snapshots is missing from the nanoseconds, so they are used
/// only while the tick delta agrees with them (within a tick per thread, the rounding).
pub fn cpu_seconds_between(before: &Snapshot, after: &Snapshot, ticks_per_second: u64) -> f64 {
    let tick = 1.0 / ticks_per_second as f64;
    let mut ticks_before = Vec::new();
    let mut ticks_after = Vec::new();
    let mut precise_ns = 0u64;
    for a in &after.procs {
        let b = before.procs.iter().find(|b| b.pid == a.pid);
        let precise = b.and_then(|b| {
            let same_children = (a.cutime, a.cstime) == (b.cutime, b.cstime);
            let (tb, ta) = (before.threads.get(&a.pid)?, after.threads.get(&a.pid)?);
            let same_threads = tb.len() == ta.len() && tb.iter().zip(ta).all(|(x, y)| x.0 == y.0);
            if !(same_children && same_threads) {
                return None;
            }
            let ns: u64 = tb
                .iter()
                .zip(ta)
                .map(|(x, y)| y.1.saturating_sub(x.1))
                .sum();
            let ticks = a.total_ticks().saturating_sub(b.total_ticks());
            let rounding = ta.len() as u64 + 1;
            (ticks as f64 * tick <= ns as f64 / 1e9 + rounding as f64 * tick).then_some(ns)
        });
        match (precise, b) {
            (Some(ns), _) => precise_ns += ns,
            (None, Some(b)) => {
                ticks_before.push(*b);
                ticks_after.push(*a);
            }
            (None, None) => ticks_after.push(*a),
        }
    }
    // Processes gone by the second snapshot, for the reaped-children correction.
    ticks_before.extend(
        before
            .procs
            .iter()
            .filter(|b| !after.procs.iter().any(|a| a.pid == b.pid)),
    );
    precise_ns as f64 / 1e9 + ticks_between(&ticks_before, &ticks_after) as f64 * tick
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
pub fn snapshot(root: i32) -> io::Result<Snapshot> {
    let procs = tree(root, &all_processes()?);
    let threads = procs
        .iter()
        .filter_map(|p| Some((p.pid, thread_runtimes(p.pid)?)))
        .collect();
    Ok(Snapshot { procs, threads })
}

/// Sum of `VmHWM` over the tree rooted at `root`, in KiB.
pub fn peak_rss_kib(root: i32) -> io::Result<u64> {
    let mut sum = 0;
    for p in snapshot(root)?.procs {
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

    fn snap(procs: &[ProcStat], threads: &[(i32, &[(i32, u64)])]) -> Snapshot {
        Snapshot {
            procs: procs.to_vec(),
            threads: threads.iter().map(|(p, t)| (*p, t.to_vec())).collect(),
        }
    }

    #[test]
    fn cpu_between_prefers_thread_nanoseconds() {
        // 10 keeps its two threads: 1.5 ms + 2.5 ms, though its ticks did not move.
        let before = snap(
            &[st(10, 1, 100, 50, 0, 0)],
            &[(10, &[(10, 1_000_000), (12, 5_000_000)])],
        );
        let after = snap(
            &[st(10, 1, 100, 50, 0, 0)],
            &[(10, &[(10, 2_500_000), (12, 7_500_000)])],
        );
        let s = cpu_seconds_between(&before, &after, 100);
        assert!((s - 0.004).abs() < 1e-9, "{s}");
    }

    #[test]
    fn cpu_between_falls_back_to_ticks() {
        // 10 gained a thread (12 → 13), so its 5 ticks count; 20 has no thread data, 3 ticks;
        // 30 is new, 2 ticks; 40 kept its thread, 1 ms.
        let before = snap(
            &[
                st(10, 1, 100, 50, 0, 0),
                st(20, 10, 10, 0, 0, 0),
                st(40, 10, 0, 0, 0, 0),
            ],
            &[(10, &[(10, 0), (12, 0)]), (40, &[(40, 0)])],
        );
        let after = snap(
            &[
                st(10, 1, 103, 52, 0, 0),
                st(20, 10, 13, 0, 0, 0),
                st(30, 10, 1, 1, 0, 0),
                st(40, 10, 0, 0, 0, 0),
            ],
            &[
                (10, &[(10, 0), (12, 0), (13, 0)]),
                (30, &[(30, 0)]),
                (40, &[(40, 1_000_000)]),
            ],
        );
        let s = cpu_seconds_between(&before, &after, 100);
        assert!((s - 0.101).abs() < 1e-9, "{s}");
        // A reaped child moves time into its parent's cutime: the parent is counted in ticks,
        // with the child's earlier ticks taken off (as ticks_between does).
        let before = snap(
            &[st(10, 1, 100, 50, 0, 0), st(11, 10, 10, 10, 0, 0)],
            &[(10, &[(10, 0)]), (11, &[(11, 0)])],
        );
        let after = snap(&[st(10, 1, 105, 55, 25, 5)], &[(10, &[(10, 9_999_999)])]);
        let s = cpu_seconds_between(&before, &after, 100);
        assert!((s - 0.2).abs() < 1e-9, "{s}");
    }

    #[test]
    fn cpu_between_notices_a_thread_that_came_and_went() {
        // Same thread ids at both ends, but 50 ticks against 1 ms of thread time: a thread
        // that lived only in between did the work, so the ticks count.
        let before = snap(&[st(10, 1, 100, 0, 0, 0)], &[(10, &[(10, 0)])]);
        let after = snap(&[st(10, 1, 150, 0, 0, 0)], &[(10, &[(10, 1_000_000)])]);
        let s = cpu_seconds_between(&before, &after, 100);
        assert!((s - 0.5).abs() < 1e-9, "{s}");
        // Two ticks against 1 ms is rounding: the nanoseconds count.
        let after = snap(&[st(10, 1, 102, 0, 0, 0)], &[(10, &[(10, 1_000_000)])]);
        let s = cpu_seconds_between(&before, &after, 100);
        assert!((s - 0.001).abs() < 1e-9, "{s}");
    }

    #[test]
    fn parses_schedstat() {
        assert_eq!(
            parse_schedstat_ns("326214753 38231950 660\n"),
            Some(326_214_753)
        );
        assert_eq!(parse_schedstat_ns(""), None);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        let snap = snapshot(me).unwrap();
        assert_eq!(snap.procs[0].pid, me);
        let threads = &snap.threads[&me];
        assert!(threads.iter().any(|&(tid, ns)| tid == me && ns > 0));
        assert!(peak_rss_kib(me).unwrap() > 0);
        assert!(ticks_per_second() > 0);
    }
}
