//! The servers a suite compares: ours (the `cluster` example) and the peers of `benches/peers/`,
//! each started on a free loopback port in its own process group, with its output in a log file.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::ports::PortAllocator;
use super::probe;
use super::process::Guarded;

/// Everything a suite needs to start servers and load tools.
#[derive(Debug)]
pub struct Env {
    /// The workspace root.
    pub repo: PathBuf,
    /// Where the peer binaries (`peer-hyper`, `peer-axum`, `peer-servedir`, `loadgen`) are.
    pub bin_dir: PathBuf,
    /// Our server binary (`cluster`).
    pub ours_bin: PathBuf,
    /// Extra arguments for every start of ours (`--ours-arg`).
    pub ours_extra: Vec<String>,
    /// A scratch directory for this run: logs, nginx prefix, generated files, wrk script.
    pub work: PathBuf,
    /// Free ports.
    pub ports: PortAllocator,
    /// Pin servers to CPU 1 and load generators to CPU 0 (`taskset`).
    pub pin: bool,
    /// wrk threads (`-t`).
    pub wrk_threads: u32,
}

impl Env {
    /// Wraps `program` in `taskset -c <cpus>` when pinning.
    pub fn command(&self, program: &Path, cpus: &str) -> Command {
        if self.pin {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// The `benches/peers` directory.
    pub fn peers_dir(&self) -> PathBuf {
        self.repo.join("benches").join("peers")
    }
}

/// Which program a server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Our `cluster` example, with these extra arguments.
    Ours(Vec<String>),
    /// `peer-hyper`: bare hyper 1 hello-world.
    Hyper,
    /// `peer-axum`: axum 0.8 with stock tower 0.5 layers, with these arguments.
    Axum(Vec<String>),
    /// `peers/node/server.js`: one process with `workers: 0`, else Node's `cluster` with that
    /// many workers; `root` is served under `/static/`.
    Node {
        /// Worker processes (0: a single process).
        workers: u32,
        /// Directory served under `/static/`.
        root: Option<PathBuf>,
    },
    /// `peer-servedir`: tower-http `ServeDir` over this directory.
    ServeDir(PathBuf),
    /// nginx with `sendfile on` serving this directory under `/static/`.
    Nginx(PathBuf),
}

/// A server of a suite.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// Short id used in case ids and JSON (`ours`, `hyper`, ...).
    pub id: String,
    /// What the table shows.
    pub label: String,
    /// The program.
    pub kind: Kind,
    /// Flags our binary must list in `--help` for this server to be available.
    pub needs_flags: Vec<String>,
    /// A path that must not answer 404 once started (a route that has not landed yet).
    pub needs_route: Option<String>,
    /// A Prometheus series that must appear on the admin address's `/metrics` once started.
    pub needs_metric: Option<String>,
    /// A path and the exact body it must answer with `200` (so a misconfigured server is never
    /// measured serving an error page fast).
    pub expect: Option<(String, String)>,
}

impl ServerSpec {
    /// A server with no requirements.
    pub fn new(id: &str, label: &str, kind: Kind) -> ServerSpec {
        ServerSpec {
            id: id.into(),
            label: label.into(),
            kind,
            needs_flags: Vec::new(),
            needs_route: None,
            needs_metric: None,
            expect: None,
        }
    }

    /// Requires flags of our binary.
    pub fn flags(mut self, flags: &[&str]) -> ServerSpec {
        self.needs_flags = flags.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Requires a route.
    pub fn route(mut self, path: &str) -> ServerSpec {
        self.needs_route = Some(path.into());
        self
    }

    /// Requires `GET path` to answer `200` with exactly `body`.
    pub fn expect(mut self, path: &str, body: &str) -> ServerSpec {
        self.expect = Some((path.into(), body.into()));
        self
    }

    /// Requires a metric on the admin `/metrics`.
    pub fn metric(mut self, name: &str) -> ServerSpec {
        self.needs_metric = Some(name.into());
        self
    }

    /// Whether the program exists and offers what this server needs, without starting it.
    pub fn check(&self, env: &Env) -> Result<(), String> {
        match &self.kind {
            Kind::Ours(_) => {
                if !env.ours_bin.is_file() {
                    return Err(format!("{} not built", env.ours_bin.display()));
                }
                if !self.needs_flags.is_empty() {
                    let help = Command::new(&env.ours_bin)
                        .arg("--help")
                        .stdin(Stdio::null())
                        .output()
                        .map_err(|e| format!("{} --help: {e}", env.ours_bin.display()))?;
                    let help = String::from_utf8_lossy(&help.stdout);
                    let missing = missing_flags(&help, &self.needs_flags);
                    if !missing.is_empty() {
                        return Err(format!("cluster has no {}", missing.join(", ")));
                    }
                }
                Ok(())
            }
            Kind::Node { .. } if !super::tools::on_path("node") => Err("node not installed".into()),
            Kind::Nginx(_) if !super::tools::on_path("nginx") => Err("nginx not installed".into()),
            _ => Ok(()),
        }
    }

    /// Starts the server and waits until it answers.
    ///
    /// Its ports are free when picked, but the server binds them a moment later, so another
    /// process on the machine may take one first: a server that exits because its address is
    /// in use is started again on fresh ports, up to `START_ATTEMPTS` times in all.
    pub fn start(&self, env: &Env) -> Result<Running> {
        let log_path = env.work.join(format!("{}.log", self.id));
        let mut attempt = 1;
        loop {
            match self.start_once(env, &log_path) {
                Err(e)
                    if attempt < START_ATTEMPTS
                        && lost_port_race(&fs::read_to_string(&log_path).unwrap_or_default()) =>
                {
                    eprintln!(
                        "{}: a port was taken before the server bound it; retrying on fresh ports ({e:#})",
                        self.id
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    fn start_once(&self, env: &Env, log_path: &Path) -> Result<Running> {
        let log_path = log_path.to_path_buf();
        let addr = env.ports.addr()?;
        let admin = env.ports.addr()?;
        let log = fs::File::create(&log_path)?;
        let mut cmd = self.command(env, addr, admin)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let shown = format!("{cmd:?}");
        let mut guard = Guarded::spawn(&self.id, &mut cmd)?;
        let ready_path = match self.kind {
            Kind::Hyper => "/",
            _ => "/healthz",
        };
        let ready = probe::wait_ready(addr, ready_path, Duration::from_secs(30), || {
            match guard.try_exited() {
                Some(st) => bail!(
                    "{} exited with {st} before answering; log:\n{}",
                    self.id,
                    tail(&log_path, 20)
                ),
                None => Ok(()),
            }
        });
        if let Err(e) = ready {
            return Err(e.context(format!("starting {}: {shown}", self.id)));
        }
        Ok(Running {
            spec: self.clone(),
            guard,
            addr,
            admin,
            command: shown,
        })
    }

    fn command(&self, env: &Env, addr: SocketAddr, admin: SocketAddr) -> Result<Command> {
        let server_cpus = "1";
        Ok(match &self.kind {
            Kind::Ours(args) => {
                let mut c = env.command(&env.ours_bin, server_cpus);
                c.arg("--listen")
                    .arg(addr.to_string())
                    .arg("--admin")
                    .arg(admin.to_string())
                    .args(args)
                    .args(&env.ours_extra)
                    .env("RUST_LOG", "warn");
                c
            }
            Kind::Hyper => {
                let mut c = env.command(&env.bin_dir.join("peer-hyper"), server_cpus);
                c.arg("--listen").arg(addr.to_string());
                c
            }
            Kind::Axum(args) => {
                let mut c = env.command(&env.bin_dir.join("peer-axum"), server_cpus);
                c.arg("--listen").arg(addr.to_string()).args(args);
                c
            }
            Kind::Node { workers, root } => {
                let mut c = env.command(Path::new("node"), server_cpus);
                c.arg(env.peers_dir().join("node").join("server.js"))
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg("--admin")
                    .arg(admin.to_string())
                    .arg("--workers")
                    .arg(workers.to_string());
                if let Some(root) = root {
                    c.arg("--root").arg(root);
                }
                c
            }
            Kind::ServeDir(root) => {
                let mut c = env.command(&env.bin_dir.join("peer-servedir"), server_cpus);
                c.arg("--listen")
                    .arg(addr.to_string())
                    .arg("--root")
                    .arg(root);
                c
            }
            Kind::Nginx(root) => {
                let prefix = env.work.join(format!("nginx-{}", self.id));
                fs::create_dir_all(prefix.join("logs"))?;
                let template = fs::read_to_string(env.peers_dir().join("nginx").join("nginx.conf"))
                    .context("reading benches/peers/nginx/nginx.conf")?;
                let conf = render_nginx_conf(&template, addr, root, &prefix);
                let conf_path = prefix.join("nginx.conf");
                fs::write(&conf_path, conf)?;
                let mut c = env.command(Path::new("nginx"), server_cpus);
                // -p/-c: everything lives in our temp prefix; `daemon off` keeps the master in
                // the foreground as our child, so its pid is the one we stop.
                c.arg("-p")
                    .arg(&prefix)
                    .arg("-c")
                    .arg(&conf_path)
                    .arg("-e")
                    .arg(prefix.join("logs").join("error.log"));
                c
            }
        })
    }
}

/// Flags from `needed` that do not appear in a `--help` text.
pub fn missing_flags(help: &str, needed: &[String]) -> Vec<String> {
    needed
        .iter()
        .filter(|f| {
            !help
                .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[')
                .any(|w| w == f.as_str())
        })
        .cloned()
        .collect()
}

/// Fills the placeholders of our nginx config template.
pub fn render_nginx_conf(template: &str, addr: SocketAddr, root: &Path, prefix: &Path) -> String {
    template
        .replace("{{LISTEN}}", &addr.to_string())
        .replace("{{ROOT}}", &root.display().to_string())
        .replace("{{PREFIX}}", &prefix.display().to_string())
}

/// How many times [`ServerSpec::start`] tries when a port is taken under it.
const START_ATTEMPTS: u32 = 3;

/// Whether the server's log says it could not bind its address: "Address already in use"
/// (the OS error, as Rust and nginx print it), cluster's "... is already in use", Node's
/// `EADDRINUSE`.
fn lost_port_race(log: &str) -> bool {
    log.contains("already in use") || log.contains("EADDRINUSE")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &all[all.len().saturating_sub(lines)..] {
        let _ = writeln!(out, "  {l}");
    }
    out
}

/// A started server. Dropping it stops it.
#[derive(Debug)]
pub struct Running {
    /// What was started.
    pub spec: ServerSpec,
    /// The process guard.
    pub guard: Guarded,
    /// The address it serves on.
    pub addr: SocketAddr,
    /// The admin address it was given (ours and Node serve counters there).
    pub admin: SocketAddr,
    /// The command line, for the results.
    pub command: String,
}

impl Running {
    /// `Err` with a reason if the server lacks the route or metric its spec needs.
    pub fn check_route(&self) -> Result<(), String> {
        if let Some(path) = &self.spec.needs_route {
            match probe::get(self.addr, path, Duration::from_secs(10)) {
                Ok(r) if r.status == 404 => return Err(format!("no route {path} (404)")),
                Ok(r) if r.status >= 500 => return Err(format!("{path} answers {}", r.status)),
                Ok(_) => {}
                Err(e) => return Err(format!("{path}: {e}")),
            }
        }
        if let Some((path, body)) = &self.spec.expect {
            match probe::get(self.addr, path, Duration::from_secs(10)) {
                Ok(r) if r.status == 200 && r.body == *body => {}
                Ok(r) => {
                    return Err(format!(
                        "{path} answered {} {:?}, expected 200 {body:?}",
                        r.status,
                        r.body.chars().take(60).collect::<String>()
                    ))
                }
                Err(e) => return Err(format!("{path}: {e}")),
            }
        }
        if let Some(name) = &self.spec.needs_metric {
            let r = probe::get(self.admin, "/metrics", Duration::from_secs(10))
                .map_err(|e| format!("admin /metrics: {e}"))?;
            if probe::prometheus_sum(&r.body, name).is_none() {
                return Err(format!("no metric {name}"));
            }
        }
        Ok(())
    }

    /// `http://addr` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_a_lost_port_race_in_each_servers_words() {
        for log in [
            "Error: 127.0.0.1:4000 is already in use (another server, or another cluster, listens there)",
            "Error: Address already in use (os error 98)",
            "nginx: [emerg] bind() to 127.0.0.1:4000 failed (98: Address already in use)",
            "Error: listen EADDRINUSE: address already in use 127.0.0.1:4000",
        ] {
            assert!(lost_port_race(log), "{log}");
        }
        assert!(!lost_port_race(""));
        assert!(!lost_port_race("Error: Permission denied (os error 13)"));
    }

    #[test]
    fn finds_missing_flags_in_help() {
        let help = "Options:\n  --workers <N>  workers [default: 2]\n  --max-in-flight=<N>\n  -l, --listen <ADDR>\n";
        let need = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            missing_flags(help, &need(&["--workers", "--listen", "--max-in-flight"])).is_empty()
        );
        assert_eq!(
            missing_flags(help, &need(&["--max-queued", "--workers"])),
            vec!["--max-queued".to_string()]
        );
        // A prefix of a longer flag does not count.
        assert_eq!(
            missing_flags(help, &need(&["--max"])),
            vec!["--max".to_string()]
        );
    }

    #[test]
    fn renders_nginx_template() {
        let t = "listen {{LISTEN}}; root {{ROOT}}; pid {{PREFIX}}/nginx.pid;";
        let out = render_nginx_conf(
            t,
            "127.0.0.1:8080".parse().unwrap(),
            Path::new("/srv/files"),
            Path::new("/tmp/p"),
        );
        assert_eq!(
            out,
            "listen 127.0.0.1:8080; root /srv/files; pid /tmp/p/nginx.pid;"
        );
    }
}
