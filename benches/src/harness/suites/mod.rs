//! The suites, and the runner they share: start every server once, warm each case up, then run
//! the cases in interleaved rounds (the order rotates each round), sampling each server's CPU time
//! around every run, and stop everything at the end (or on error, through the drop guards).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::load::{self, LoadgenReport, Sample, Wrk};
use super::probe;
use super::process::Guarded;
use super::procfs;
use super::report::{compute_ratios, CaseResult, ChartMetric, Headline, Run, SuiteResult};
use super::servers::{Env, Running, ServerSpec};

pub mod disconnect;
pub mod files;
pub mod hello;
pub mod herd;
pub mod overload;

/// The names `compare` accepts, in the order `all` runs them.
pub const SUITES: [&str; 5] = ["hello", "files", "herd", "overload", "disconnect"];

/// Run-length options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// Smoke-test sizes: the whole suite in under a minute.
    pub quick: bool,
    /// Override of the number of rounds.
    pub rounds: Option<usize>,
    /// Override of the length of one run.
    pub duration: Option<Duration>,
}

impl Options {
    /// Rounds: the override, else `quick` or `full`.
    pub fn rounds(&self, quick: usize, full: usize) -> usize {
        self.rounds
            .unwrap_or(if self.quick { quick } else { full })
            .max(1)
    }

    /// Run length: the override, else `quick` or `full`.
    pub fn duration(&self, quick: Duration, full: Duration) -> Duration {
        self.duration
            .unwrap_or(if self.quick { quick } else { full })
    }
}

/// How a case loads its server.
#[derive(Debug, Clone)]
pub enum LoadDef {
    /// wrk on `path` for the suite's run length.
    Wrk {
        /// Request path.
        path: String,
        /// Connections.
        connections: u32,
        /// Send `Connection: close` (a new connection per request).
        close: bool,
    },
    /// curl fetching `path` `count` times over one connection.
    Curl {
        /// Request path.
        path: String,
        /// Downloads per run.
        count: usize,
    },
    /// Our `loadgen` with these arguments (`--url` is added).
    Loadgen {
        /// Request path.
        path: String,
        /// Mode and options.
        args: Vec<String>,
    },
}

impl LoadDef {
    /// `loadgen open`: `rate` requests per second on `path` for `run_for`, each request given
    /// `timeout`, then `extra` options.
    pub fn open_loop(
        path: String,
        rate: impl std::fmt::Display,
        run_for: Duration,
        timeout: &str,
        extra: &[&str],
    ) -> LoadDef {
        let mut args = owned(&["open", "--rate"]);
        args.push(rate.to_string());
        args.push("--duration".into());
        args.push(humantime::format_duration(run_for).to_string());
        args.extend(owned(&["--timeout", timeout]));
        args.extend(owned(extra));
        LoadDef::Loadgen { path, args }
    }
}

/// A server-side counter read before and after each run.
#[derive(Debug, Clone)]
pub enum Counter {
    /// A Prometheus series on the admin address's `/metrics` (summed over labels).
    AdminPrometheus(String),
    /// A numeric field of the JSON at the admin address's `/stats` (the Node peer).
    AdminJson(String),
    /// A numeric field of the JSON at the server's own `/stats` (the Rust peers).
    MainJson(String),
    /// Work wasted on abandoned requests, for a server that counts the work it *cancelled*
    /// (a Prometheus series on the admin `/metrics`): every abandoned request whose work was not
    /// cancelled is counted as `work_ms` wasted. Requests abandoned before the server even saw
    /// them count as wasted too, so this errs against the server measured.
    WastedFromCancelled {
        /// The counter of cancelled work.
        metric: String,
        /// The work of one request, ms.
        work_ms: u64,
    },
}

/// Wasted work (ms) from the requests abandoned in a run and the work the server cancelled.
pub fn wasted_from_cancelled(abandoned: u64, cancelled: f64, work_ms: u64) -> f64 {
    (abandoned as f64 - cancelled).max(0.0) * work_ms as f64
}

impl Counter {
    fn read(&self, s: &Running) -> Result<f64> {
        let t = Duration::from_secs(5);
        match self {
            Counter::AdminPrometheus(name) | Counter::WastedFromCancelled { metric: name, .. } => {
                let r = probe::get(s.admin, "/metrics", t)?;
                probe::prometheus_sum(&r.body, name)
                    .with_context(|| format!("{name} not in {}'s /metrics", s.spec.id))
            }
            Counter::AdminJson(field) | Counter::MainJson(field) => {
                let addr = if matches!(self, Counter::AdminJson(_)) {
                    s.admin
                } else {
                    s.addr
                };
                let r = probe::get(addr, "/stats", t)?;
                let v: serde_json::Value = serde_json::from_str(&r.body)
                    .with_context(|| format!("{}'s /stats: {}", s.spec.id, r.body))?;
                v.get(field)
                    .and_then(serde_json::Value::as_f64)
                    .with_context(|| format!("no {field} in {}'s /stats", s.spec.id))
            }
        }
    }
}

/// One case: a server under one load.
#[derive(Debug, Clone)]
pub struct CaseDef {
    /// Group (ratios compare the cases of one group against its baseline).
    pub group: String,
    /// The server's id.
    pub server: String,
    /// Whether this case is the group's baseline.
    pub baseline: bool,
    /// The load.
    pub load: LoadDef,
    /// A server-side counter to report per run.
    pub counter: Option<Counter>,
    /// How long to wait after the load before reading the counter (work still finishing).
    pub settle: Duration,
}

/// A suite ready to run.
#[derive(Debug, Clone)]
pub struct SuiteDef {
    /// Name.
    pub name: String,
    /// One-line title.
    pub title: String,
    /// What it measures and why.
    pub about: String,
    /// Headline metric.
    pub headline: Headline,
    /// Name of the counter column.
    pub counter_name: Option<String>,
    /// Show the success-rate column.
    pub show_success: bool,
    /// The chart's panels.
    pub chart: Vec<ChartMetric>,
    /// Servers, started once each.
    pub servers: Vec<ServerSpec>,
    /// Cases in table order.
    pub cases: Vec<CaseDef>,
    /// Rounds.
    pub rounds: usize,
    /// Length of one wrk run.
    pub run_for: Duration,
    /// Length of the warm-up run of each case.
    pub warmup: Duration,
    /// The load in words.
    pub load: String,
    /// Tools whose versions the results record.
    pub tools: Vec<&'static str>,
    /// Remarks for the results.
    pub notes: Vec<String>,
    /// Files to create (path, size) before the servers start.
    pub files: Vec<(PathBuf, u64)>,
}

impl SuiteDef {
    /// About how long the measuring takes (warm-ups and rounds, not start-up or builds): every
    /// run is bounded by its own arguments, so this is what `--quick` promises to keep short.
    pub fn estimated_duration(&self) -> Duration {
        let whole = |d: Duration| Duration::from_secs(load::whole_seconds(d));
        self.cases
            .iter()
            .map(|c| {
                let (warmup, run) = match c.load {
                    // wrk rounds its duration to whole seconds.
                    LoadDef::Wrk { .. } => (whole(self.warmup), whole(self.run_for)),
                    LoadDef::Curl { .. } => (self.warmup, self.run_for),
                    LoadDef::Loadgen { .. } => (Duration::ZERO, self.run_for),
                };
                warmup + (run + c.settle) * self.rounds as u32
            })
            .sum()
    }
}

/// Builds the named suite.
pub fn define(name: &str, env: &Env, opts: &Options) -> Result<SuiteDef> {
    match name {
        "hello" => hello::define(env, opts),
        "files" => files::define(env, opts),
        "herd" => herd::define(env, opts),
        "overload" => overload::define(env, opts),
        "disconnect" => disconnect::define(env, opts),
        _ => bail!("unknown suite {name:?}; suites: {}", SUITES.join(", ")),
    }
}

/// Runs a tool to completion within `limit`, its output going to a file; returns stdout.
pub fn run_tool(
    env: &Env,
    name: &str,
    program: &Path,
    args: &[String],
    limit: Duration,
) -> Result<String> {
    let out_path = env.work.join(format!("{name}.out"));
    let err_path = env.work.join(format!("{name}.err"));
    let mut cmd = env.command(program, "0");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?);
    let mut g = Guarded::spawn(name, &mut cmd)?;
    let st = g.wait_timeout(limit)?;
    let out = fs::read_to_string(&out_path)?;
    if !st.success() {
        let err = fs::read_to_string(&err_path).unwrap_or_default();
        bail!("{name} exited with {st}: {}{}", err.trim(), out.trim());
    }
    Ok(out)
}

/// The command line of one run, for the results, and the run itself.
fn run_load(
    env: &Env,
    load: &LoadDef,
    server: &Running,
    length: Duration,
) -> Result<(String, Sample)> {
    match load {
        LoadDef::Wrk {
            path,
            connections,
            close,
        } => {
            let wrk = Wrk {
                url: server.url(path),
                connections: *connections,
                threads: env.wrk_threads,
                duration: length,
                headers: if *close {
                    vec!["Connection: close".into()]
                } else {
                    Vec::new()
                },
                timeout: Duration::from_secs(5),
            };
            let script = env.work.join("report.lua");
            if !script.exists() {
                fs::write(&script, load::WRK_REPORT_LUA)?;
            }
            let args = wrk.args(&script);
            let shown = format!("wrk {}", args.join(" "));
            let out = run_tool(
                env,
                "wrk",
                Path::new("wrk"),
                &args,
                length + Duration::from_secs(30),
            )?;
            Ok((shown, load::parse_wrk(&out)?))
        }
        LoadDef::Curl { path, count } => {
            let args = load::curl_args(&server.url(path), *count);
            let shown = format!("curl {}", shown_curl(&args, *count));
            let t = Instant::now();
            let out = run_tool(
                env,
                "curl",
                Path::new("curl"),
                &args,
                Duration::from_secs(600),
            )?;
            Ok((shown, load::parse_curl(&out, t.elapsed().as_secs_f64())?))
        }
        LoadDef::Loadgen { path, args } => {
            let mut a = args.clone();
            a.push("--url".into());
            a.push(server.url(path));
            let shown = format!("loadgen {}", a.join(" "));
            let out = run_tool(
                env,
                "loadgen",
                &env.bin_dir.join("loadgen"),
                &a,
                length + Duration::from_secs(120),
            )?;
            Ok((shown, LoadgenReport::parse(&out)?.to_sample()))
        }
    }
}

fn shown_curl(args: &[String], count: usize) -> String {
    let head: Vec<&str> = args.iter().take(4).map(String::as_str).collect();
    let one: Vec<&str> = args.iter().skip(4).take(3).map(String::as_str).collect();
    format!(
        "{} {}  (the last three arguments {count} times)",
        head.join(" "),
        one.join(" ")
    )
}

/// Runs a suite: see the module docs.
pub fn run(def: &SuiteDef, env: &Env, opts: &Options, command: &str) -> Result<SuiteResult> {
    let started_utc = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut result = SuiteResult {
        suite: def.name.clone(),
        title: def.title.clone(),
        about: def.about.clone(),
        started_utc,
        quick: opts.quick,
        rounds: def.rounds,
        load: def.load.clone(),
        machine: super::tools::machine(),
        tools: super::tools::versions(&def.tools),
        headline: Some(def.headline),
        counter_name: def.counter_name.clone(),
        show_success: def.show_success,
        chart: def.chart.clone(),
        command: command.to_owned(),
        notes: def.notes.clone(),
        ..SuiteResult::default()
    };

    for (path, len) in &def.files {
        files::make_file(path, *len)?;
    }

    // Start every server; one that is missing or broken is reported, not fatal.
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut unavailable: BTreeMap<String, String> = BTreeMap::new();
    for spec in &def.servers {
        eprintln!("compare: starting {}", spec.id);
        let state = spec.check(env).map_err(|r| format!("not available: {r}"));
        let started = state.and_then(|()| spec.start(env).map_err(|e| format!("failed: {e:#}")));
        match started {
            Ok(s) => match s.check_route() {
                Ok(()) => {
                    result.servers.insert(spec.id.clone(), s.command.clone());
                    running.insert(spec.id.clone(), s);
                }
                Err(r) => {
                    result.servers.insert(spec.id.clone(), s.command.clone());
                    unavailable.insert(spec.id.clone(), format!("not available: {r}"));
                }
            },
            Err(reason) => {
                eprintln!("compare: {}: {reason}", spec.id);
                result.servers.insert(spec.id.clone(), reason.clone());
                unavailable.insert(spec.id.clone(), reason);
            }
        }
    }

    let mut cases: Vec<CaseResult> = def
        .cases
        .iter()
        .map(|c| {
            let spec = def.servers.iter().find(|s| s.id == c.server);
            CaseResult {
                id: format!("{}/{}", c.group, c.server),
                group: c.group.clone(),
                server: c.server.clone(),
                label: spec.map_or(c.server.clone(), |s| s.label.clone()),
                baseline: c.baseline,
                status: unavailable
                    .get(&c.server)
                    .cloned()
                    .unwrap_or_else(|| "ok".into()),
                ..CaseResult::default()
            }
        })
        .collect();

    // Warm up each case once.
    for (i, c) in def.cases.iter().enumerate() {
        let Some(s) = running.get(&c.server) else {
            continue;
        };
        if let LoadDef::Loadgen { path, args } = &c.load {
            // Its runs are bounded by their own arguments; warm the route with one request.
            cases[i].load_command = format!("loadgen {} --url {}", args.join(" "), s.url(path));
            let _ = probe::get(s.addr, path, Duration::from_secs(5));
            continue;
        }
        eprintln!("compare: warming up {}", cases[i].id);
        match run_load(env, &c.load, s, def.warmup) {
            Ok((shown, _)) => cases[i].load_command = shown,
            Err(e) => cases[i].status = format!("failed: warm-up: {e:#}"),
        }
    }

    // Interleaved rounds; the starting case rotates so no case always follows the same one.
    let n = def.cases.len();
    for round in 0..def.rounds {
        for k in 0..n {
            let i = (k + round) % n;
            let c = &def.cases[i];
            if cases[i].status != "ok" {
                continue;
            }
            let Some(s) = running.get_mut(&c.server) else {
                continue;
            };
            if let Some(st) = s.guard.try_exited() {
                cases[i].status = format!("failed: server exited with {st}");
                continue;
            }
            eprintln!(
                "compare: round {}/{} {}",
                round + 1,
                def.rounds,
                cases[i].id
            );
            match measure(env, c, s, def.run_for) {
                Ok(mut run) => {
                    run.round = round;
                    cases[i].runs.push(run);
                }
                Err(e) => {
                    eprintln!("compare: {}: {e:#}", cases[i].id);
                    result.notes.push(format!(
                        "round {} of {} failed: {e:#}",
                        round + 1,
                        cases[i].id
                    ));
                }
            }
        }
    }

    // Peak memory over the whole suite, then stop everything.
    let mut rss = BTreeMap::new();
    for (id, s) in &running {
        if let Ok(kib) = procfs::peak_rss_kib(s.guard.pid()) {
            rss.insert(id.clone(), kib as f64 / 1024.0);
        }
    }
    drop(running);

    for c in &mut cases {
        if c.status == "ok" && c.runs.is_empty() {
            c.status = "failed: no run completed".into();
        }
        c.peak_rss_mib = rss.get(&c.server).copied();
        c.summarise(def.headline);
    }
    compute_ratios(&mut cases, def.headline, def.rounds);
    result.cases = cases;
    Ok(result)
}

fn measure(env: &Env, c: &CaseDef, s: &Running, length: Duration) -> Result<Run> {
    let pid = s.guard.pid();
    let counter_before = c.counter.as_ref().map(|k| k.read(s)).transpose()?;
    let before = procfs::snapshot(pid)?;
    let (_, sample) = run_load(env, &c.load, s, length)?;
    let after = procfs::snapshot(pid)?;
    // Counters may trail the load (work still finishing, workers reporting periodically).
    std::thread::sleep(c.settle);
    let counter_after = c.counter.as_ref().map(|k| k.read(s)).transpose()?;
    let cpu_s = procfs::cpu_seconds_between(&before, &after, procfs::ticks_per_second());
    let counter = match (counter_before, counter_after, &c.counter) {
        (Some(b), Some(a), Some(Counter::WastedFromCancelled { work_ms, .. })) => {
            Some(wasted_from_cancelled(sample.abandoned, a - b, *work_ms))
        }
        (Some(b), Some(a), _) => Some(a - b),
        _ => None,
    };
    Ok(Run {
        round: 0,
        sample,
        cpu_s,
        counter,
    })
}

/// Our server's label with its flags.
pub fn ours_label(args: &[String]) -> String {
    if args.is_empty() {
        "ours: cluster".into()
    } else {
        format!("ours: cluster {}", args.join(" "))
    }
}

/// `strings` as owned strings.
pub fn owned(strings: &[&str]) -> Vec<String> {
    strings.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_prefer_overrides() {
        let o = Options {
            quick: true,
            rounds: None,
            duration: None,
        };
        assert_eq!(o.rounds(3, 10), 3);
        assert_eq!(
            o.duration(Duration::from_secs(1), Duration::from_secs(5)),
            Duration::from_secs(1)
        );
        let o = Options {
            quick: false,
            rounds: Some(0),
            duration: Some(Duration::from_millis(1500)),
        };
        assert_eq!(o.rounds(3, 10), 1);
        assert_eq!(
            o.duration(Duration::from_secs(1), Duration::from_secs(5)),
            Duration::from_millis(1500)
        );
    }

    fn test_env() -> Env {
        let work = std::env::temp_dir().join(format!("benches-suites-{}", std::process::id()));
        std::fs::create_dir_all(&work).unwrap();
        Env {
            repo: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
            bin_dir: PathBuf::from("/nonexistent"),
            ours_bin: PathBuf::from("/nonexistent/cluster"),
            ours_extra: Vec::new(),
            work,
            ports: crate::harness::ports::PortAllocator::new(),
            pin: false,
            wrk_threads: 1,
        }
    }

    #[test]
    fn every_suite_is_well_formed_and_quick_is_quick() {
        let env = test_env();
        for quick in [true, false] {
            let opts = Options {
                quick,
                rounds: None,
                duration: None,
            };
            for name in SUITES {
                let def = define(name, &env, &opts).unwrap();
                assert_eq!(def.name, name);
                let ids: Vec<&str> = def.servers.iter().map(|s| s.id.as_str()).collect();
                let mut groups: BTreeMap<&str, usize> = BTreeMap::new();
                for c in &def.cases {
                    assert!(
                        ids.contains(&c.server.as_str()),
                        "{name}: unknown server {}",
                        c.server
                    );
                    *groups.entry(c.group.as_str()).or_default() += usize::from(c.baseline);
                }
                assert!(
                    groups.values().all(|&n| n == 1),
                    "{name}: one baseline per group: {groups:?}"
                );
                assert!(
                    def.servers.iter().any(|s| s.id.starts_with("ours")),
                    "{name} has no ours"
                );
                if quick {
                    let t = def.estimated_duration();
                    assert!(
                        t <= Duration::from_secs(50),
                        "{name} --quick takes about {t:?}"
                    );
                } else {
                    assert!(def.rounds >= 3, "{name}: medians need at least 3 runs");
                }
            }
        }
        // The peers and configs the suites start are in the repository.
        for f in [
            "node/server.js",
            "nginx/nginx.conf",
            "hyper_hello.rs",
            "axum_tower.rs",
            "servedir.rs",
        ] {
            assert!(env.peers_dir().join(f).is_file(), "missing peers/{f}");
        }
        std::fs::remove_dir_all(&env.work).unwrap();
    }

    #[test]
    fn wasted_work_from_cancelled_work() {
        assert_eq!(wasted_from_cancelled(100, 97.0, 1000), 3000.0);
        // The counter may include cancellations of requests from before the run: never negative.
        assert_eq!(wasted_from_cancelled(10, 12.0, 1000), 0.0);
    }

    #[test]
    fn curl_command_is_shown_once() {
        let a = load::curl_args("http://h/f", 3);
        let s = shown_curl(&a, 3);
        assert_eq!(s.matches("http://h/f").count(), 1);
        assert!(s.ends_with("3 times)"));
    }
}
