//! `compare`: runs a side-by-side suite and records the results.
//!
//! ```text
//! cargo run --release -p benches --bin compare -- hello            # full run, results committed
//! cargo run --release -p benches --bin compare -- hello --quick    # smoke run, under a minute
//! cargo run --release -p benches --bin compare -- all
//! ```
//!
//! It builds the peers and our `cluster` server (release), installs wrk/nginx/curl/node through
//! apt-get when missing, starts every server on a free 127.0.0.1 port, warms up, runs interleaved
//! rounds, stops every process it started (also on error and Ctrl-C), then writes
//! `benches/results/<date>-<suite>.{md,json,svg}` and the suite's section of `BENCHMARKS.md`.
//! Quick runs write to `target/bench-results/` and leave the repository alone unless `--save`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::harness::ports::PortAllocator;
use benches::harness::process::{self, Guarded};
use benches::harness::servers::Env;
use benches::harness::suites::{self, Options, SUITES};
use benches::harness::{chart, report, tools};
use clap::Parser;

/// Side-by-side benchmarks of tower-scale against the peers users would pick instead.
#[derive(Debug, Parser)]
#[command(
    after_help = "Suites: hello, files, herd, overload, disconnect, all. See benches/README.md."
)]
struct Args {
    /// The suite to run, or `all`.
    suite: String,
    /// Smoke-test sizes: each suite finishes in under a minute (once built). Results go to
    /// target/bench-results/ unless --save.
    #[arg(long)]
    quick: bool,
    /// Write results to benches/results/ and BENCHMARKS.md even for a quick run.
    #[arg(long)]
    save: bool,
    /// Do not write BENCHMARKS.md.
    #[arg(long)]
    no_benchmarks_md: bool,
    /// Rounds per case (default: 3 quick, 10 or fewer full, per suite).
    #[arg(long)]
    rounds: Option<usize>,
    /// Length of one run (e.g. `5s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    wrk_threads: u32,
    /// Our server binary. Default: target/release/cluster of this workspace, built first.
    #[arg(long)]
    ours_bin: Option<PathBuf>,
    /// An extra argument for every start of ours (repeatable), e.g. `--ours-arg=--keep-alive-timeout=10s`.
    #[arg(long, allow_hyphen_values = true)]
    ours_arg: Vec<String>,
    /// Pin servers to CPU 1 and load generators to CPU 0 with taskset.
    #[arg(long)]
    pin: bool,
    /// Skip `cargo build` (use the binaries already built).
    #[arg(long)]
    no_build: bool,
    /// Keep the scratch directory (logs, configs, generated files).
    #[arg(long)]
    keep_work: bool,
}

/// The workspace root (this package lives in `<root>/benches`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches is inside the workspace")
        .to_path_buf()
}

/// The target directory the running binary was built into (`<target>/<profile>/compare`).
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().context("exe has no directory")?;
    Ok(profile_dir
        .parent()
        .context("exe is not in a target/<profile> directory")?
        .to_path_buf())
}

fn cargo_build(repo: &Path, target: &Path, package: &str, bins: bool) -> Result<()> {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(repo)
        .env("CARGO_TARGET_DIR", target)
        .args(["build", "--release", "-p", package]);
    if bins {
        c.arg("--bins");
    }
    eprintln!("compare: cargo build --release -p {package}");
    let mut g = Guarded::spawn("cargo", &mut c)?;
    let st = g.wait_timeout(Duration::from_secs(3600))?;
    if !st.success() {
        bail!("cargo build --release -p {package} failed ({st})");
    }
    Ok(())
}

/// The scratch directory under the system temp dir (world-readable, for nginx's workers).
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("compare: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn stamp_now() -> (String, String) {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    // 2026-11-26T10:12:00Z -> 2026-11-26T1012Z
    let stamp = format!("{}{}Z", &t[..13], &t[14..16]);
    (t, stamp)
}

fn main() -> Result<()> {
    let args = Args::parse();
    process::install_signal_handler()?;
    let names: Vec<&str> = if args.suite == "all" {
        SUITES.to_vec()
    } else if SUITES.contains(&args.suite.as_str()) {
        vec![args.suite.as_str()]
    } else {
        bail!(
            "unknown suite {:?}; suites: {}, all",
            args.suite,
            SUITES.join(", ")
        );
    };
    let repo = repo_root();
    let target = target_dir()?;
    let bin_dir = target.join("release");

    // Tools: wrk for most suites, nginx and curl for files, node for the Node peers.
    tools::ensure("wrk", "wrk")?;
    tools::ensure("node", "nodejs")?;
    if names.contains(&"files") {
        tools::ensure("nginx", "nginx")?;
        tools::ensure("curl", "curl")?;
    }
    if args.pin {
        tools::ensure("taskset", "util-linux")?;
    }

    let mut notes = Vec::new();
    let ours_bin = match &args.ours_bin {
        Some(p) => p.clone(),
        None => {
            if !args.no_build {
                if let Err(e) = cargo_build(&repo, &target, "cluster", false) {
                    // Ours is then reported as not available; the peers still run.
                    eprintln!("compare: {e:#}");
                    notes.push(format!("building ours failed: {e:#}"));
                }
            }
            bin_dir.join("cluster")
        }
    };
    if !args.no_build {
        cargo_build(&repo, &target, "benches", true)?;
    }

    let (_, stamp) = stamp_now();
    let scratch = Scratch {
        path: std::env::temp_dir().join(format!("benches-{stamp}-{}", std::process::id())),
        keep: args.keep_work,
    };
    std::fs::create_dir_all(&scratch.path)?;
    if !args.keep_work {
        process::remove_on_signal(scratch.path.clone());
    }
    let ours_bin = std::fs::canonicalize(&ours_bin).unwrap_or(ours_bin);
    let env = Env {
        repo: repo.clone(),
        bin_dir,
        ours_bin,
        ours_extra: args.ours_arg.clone(),
        work: scratch.path.clone(),
        ports: PortAllocator::new(),
        pin: args.pin,
        wrk_threads: args.wrk_threads,
    };
    let opts = Options {
        quick: args.quick,
        rounds: args.rounds,
        duration: args.duration,
    };
    let command = std::iter::once("cargo run --release -p benches --bin compare --".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let save = !args.quick || args.save;
    let out_dir = if save {
        repo.join("benches").join("results")
    } else {
        target.join("bench-results")
    };
    std::fs::create_dir_all(&out_dir)?;

    let mut failed = Vec::new();
    for name in names {
        let def = suites::define(name, &env, &opts)?;
        let started = std::time::Instant::now();
        let load_before = loadavg();
        let mut result = suites::run(&def, &env, &opts, &command)?;
        result.notes.extend(notes.iter().cloned());
        result.notes.push(format!(
            "Load average (1 min) at start and end: {load_before} → {}; above 2 on this 2-core \
             machine means other work competed with the benchmark.",
            loadavg()
        ));
        if env.ours_bin.components().any(|c| c.as_os_str() == "debug") {
            result
                .notes
                .push("ours is a debug build: its numbers are not representative.".into());
        }
        if env.ours_bin != target.join("release").join("cluster") {
            result
                .notes
                .push(format!("ours from --ours-bin {}", env.ours_bin.display()));
        }
        let (_, stamp) = stamp_now();
        let stem = format!("{stamp}-{name}{}", if args.quick { "-quick" } else { "" });
        let svg = chart::svg(
            &format!("{name}: {}", def.title),
            &chart::suite_panels(&result),
        )?;
        std::fs::write(out_dir.join(format!("{stem}.svg")), svg)?;
        std::fs::write(
            out_dir.join(format!("{stem}.json")),
            serde_json::to_string_pretty(&result)?,
        )?;
        let md = report::markdown(&result, Some(&format!("{stem}.svg")), "#");
        std::fs::write(out_dir.join(format!("{stem}.md")), &md)?;
        eprintln!(
            "compare: {name} done in {:.0?}; results in {}",
            started.elapsed(),
            out_dir.join(format!("{stem}.md")).display()
        );
        println!("{}", report::markdown_table(&result));
        failed.extend(
            result
                .cases
                .iter()
                .filter(|c| c.status.starts_with("failed"))
                .map(|c| format!("{name} {}: {}", c.id, c.status)),
        );
        if save && !args.no_benchmarks_md {
            let bm = repo.join("BENCHMARKS.md");
            let existing =
                std::fs::read_to_string(&bm).unwrap_or_else(|_| BENCHMARKS_HEADER.into());
            let rel = out_dir
                .strip_prefix(&repo)
                .unwrap_or(&out_dir)
                .join(format!("{stem}.svg"));
            let section = report::markdown(&result, Some(&rel.display().to_string()), "##");
            std::fs::write(&bm, report::update_benchmarks(&existing, name, &section))?;
        }
    }
    if !failed.is_empty() {
        // "not available" is expected while crates land; "failed" means a server or the harness
        // broke, which CI's smoke run must notice (it asserts nothing about speed).
        bail!("cases failed: {}", failed.join("; "));
    }
    if process::live_count() != 0 {
        bail!(
            "{} started process groups were not stopped",
            process::live_count()
        );
    }
    Ok(())
}

/// The 1-minute load average from `/proc/loadavg`.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

const BENCHMARKS_HEADER: &str =
    "# Benchmarks\n\nSide-by-side results of `benches` (see benches/README.md).\n";
