//! External tools: installing the missing ones through apt-get, and recording versions and the
//! machine for the results.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Whether `program` is on `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Makes sure `program` exists, installing Debian `package` with apt-get (through sudo when not
/// root) if it does not. Never starts a service: nginx is only ever run in the foreground by the
/// harness, and the package's own service is left as the package leaves it.
pub fn ensure(program: &str, package: &str) -> Result<()> {
    if on_path(program) {
        return Ok(());
    }
    eprintln!("compare: {program} not found, installing the Debian package {package}");
    let root = rustix::process::geteuid().is_root();
    let run = |args: &[&str]| -> Result<()> {
        let mut c = if root {
            Command::new(args[0])
        } else {
            let mut c = Command::new("sudo");
            c.arg(args[0]);
            c
        };
        c.args(&args[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        let st = c.status().with_context(|| format!("running {args:?}"))?;
        if !st.success() {
            bail!("{args:?} failed with {st}");
        }
        Ok(())
    };
    // Debian starts a packaged service (nginx) on install unless policy-rc.d says no; we only
    // ever run nginx in the foreground ourselves, so deny it for the install if nothing does.
    const POLICY: &str = "/usr/sbin/policy-rc.d";
    let add_policy = !std::path::Path::new(POLICY).exists();
    if add_policy {
        let script = format!("printf '#!/bin/sh\\nexit 101\\n' > {POLICY} && chmod 755 {POLICY}");
        run(&["sh", "-c", &script])?;
    }
    let installed = run(&["apt-get", "update", "-qq"]).and_then(|()| {
        run(&[
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            package,
        ])
    });
    if add_policy {
        run(&["rm", "-f", POLICY])?;
    }
    installed?;
    if !on_path(program) {
        bail!("installed {package} but {program} is still not on PATH");
    }
    Ok(())
}

/// The first line of a command's output (stdout, else stderr), for version strings.
pub fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// Versions of the tools a suite used, by name; absent tools are left out.
pub fn versions(names: &[&str]) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    for &n in names {
        let line = match n {
            "wrk" => first_line("wrk", &["-v"]).map(|l| short_version(&l, "Copyright")),
            "nginx" => first_line("nginx", &["-v"]),
            "node" => first_line("node", &["--version"]).map(|s| format!("node {s}")),
            "curl" => first_line("curl", &["--version"]).map(|l| short_version(&l, "(")),
            "rustc" => first_line("rustc", &["--version"]),
            "kernel" => first_line("uname", &["-sr"]),
            _ => None,
        };
        if let Some(l) = line {
            v.insert(n.to_owned(), l);
        }
    }
    v
}

/// `line` up to `stop` (version banners go on to list copyrights and libraries).
pub fn short_version(line: &str, stop: &str) -> String {
    line.split(stop).next().unwrap_or(line).trim().to_owned()
}

/// A one-line description of the machine: CPU model, online CPUs, memory.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    describe_machine(
        &cpuinfo,
        &meminfo,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    )
}

/// [`machine`] from the texts of `/proc/cpuinfo` and `/proc/meminfo`.
pub fn describe_machine(cpuinfo: &str, meminfo: &str, cpus: usize) -> String {
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|r| r.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0);
    match mem_gib {
        Some(g) => format!("{model}, {cpus} CPUs, {g:.1} GiB RAM"),
        None => format!("{model}, {cpus} CPUs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_machine() {
        let cpu = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        let mem = "MemTotal:        8152812 kB\nMemFree: 1 kB\n";
        assert_eq!(
            describe_machine(cpu, mem, 2),
            "AMD EPYC 7B13, 2 CPUs, 7.8 GiB RAM"
        );
        assert_eq!(describe_machine("", "", 1), "unknown CPU, 1 CPUs");
    }

    #[test]
    fn shortens_version_banners() {
        assert_eq!(
            short_version(
                "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer",
                "Copyright"
            ),
            "wrk debian/4.1.0-3+b2 [epoll]"
        );
        assert_eq!(
            short_version("curl 7.88.1 (x86_64-pc-linux-gnu) libcurl/7.88.1", "("),
            "curl 7.88.1"
        );
        assert_eq!(short_version("node v20", "("), "node v20");
    }

    #[test]
    fn finds_programs_on_path() {
        assert!(on_path("sh"));
        assert!(!on_path("surely-no-such-program-here"));
    }
}
