//! Command-line and environment configuration.
//!
//! Every option can also be given through the environment variable named in `--help`
//! (`CLUSTER_*`); a flag on the command line wins over the environment.

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Smallest head buffer hyper accepts (`http1::Builder::max_buf_size` asserts on anything smaller).
const MIN_HEAD_SIZE: usize = 8192;

/// A clustered HTTP/1.1 + HTTP/2 (prior knowledge) server: a supervisor process, one worker
/// process per core sharing the port, keep-alive and header timeouts, rolling restarts on
/// SIGHUP, a staged drain on SIGTERM/SIGINT and cluster-wide Prometheus metrics.
///
/// Durations are written like `500ms`, `5s`, `2m`.
#[derive(Debug, Clone, Parser)]
#[command(name = "cluster", version, about, long_about)]
pub(crate) struct Cli {
    /// Number of worker processes; 0 runs a single process without a supervisor (for
    /// debugging). [default: number of CPU cores]
    #[arg(long, env = "CLUSTER_WORKERS")]
    pub(crate) workers: Option<usize>,

    /// Address the HTTP server listens on; port 0 picks a free port (printed at start-up).
    #[arg(long, env = "CLUSTER_LISTEN", default_value = "127.0.0.1:3000")]
    pub(crate) listen: SocketAddr,

    /// Address of the admin server (`GET /metrics`, `GET /healthz`), or `off`.
    #[arg(long, env = "CLUSTER_ADMIN", default_value = "127.0.0.1:9000", value_parser = parse_admin)]
    pub(crate) admin: Admin,

    /// How long a connection may stay idle between two requests before it is closed.
    /// Advertised to HTTP/1.1 clients as `Keep-Alive: timeout=N`. `0s` disables keep-alive.
    #[arg(long, env = "CLUSTER_KEEP_ALIVE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) keep_alive_timeout: Duration,

    /// Time a client has to send a complete request head, counted from the connection's
    /// accept (also bounding a connection that sends nothing) or from the first byte of
    /// the next request on a kept-alive connection.
    #[arg(long, env = "CLUSTER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub(crate) header_timeout: Duration,

    /// Requests served on one connection before it is closed (`Connection: close` on the
    /// last HTTP/1 response, GOAWAY on HTTP/2). [default: unlimited]
    #[arg(long, env = "CLUSTER_MAX_REQUESTS_PER_CONNECTION")]
    pub(crate) max_requests_per_connection: Option<NonZeroU64>,

    /// On SIGTERM/SIGINT (and for a worker replaced by a rolling restart): how long
    /// in-flight requests may run before their connections are closed.
    #[arg(long, env = "CLUSTER_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) shutdown_grace: Duration,

    /// On SIGTERM/SIGINT: the idle timeout of HTTP/1 keep-alive connections while draining
    /// (at most `--keep-alive-timeout`), counted from when each connection went idle. Every
    /// answer given while draining carries `Connection: close`, so a client still using its
    /// connection sends its next request within this time and is told to go, instead of
    /// racing the close of a connection it believes open (which loses the request). A
    /// connection idle for longer is closed at once. It also bounds the wait for a request
    /// head (at most `--header-timeout`, counted from accept or from the head's first byte).
    /// `0s`: close idle connections at once.
    #[arg(long, env = "CLUSTER_SHUTDOWN_IDLE_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) shutdown_idle_timeout: Duration,

    /// Directory served under `GET /static/{*path}` (through sendfile on Linux, plaintext
    /// HTTP/1). Default: the demo folder shipped with the example.
    #[arg(long, env = "CLUSTER_ROOT", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/static"))]
    pub(crate) root: std::path::PathBuf,

    /// Turn request coalescing off: every `/expensive/{key}` request runs its own backend
    /// call (they still pass through the layer, counted as bypasses). For comparisons such
    /// as the benches' `herd` suite.
    #[arg(long, env = "CLUSTER_NO_SINGLEFLIGHT")]
    pub(crate) no_singleflight: bool,

    /// Largest `ms` accepted by `GET /sleep?ms=N`; larger values get `400`.
    #[arg(long, env = "CLUSTER_MAX_SLEEP", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) max_sleep: Duration,

    /// Largest request head in bytes (request line + headers); larger heads get `431`.
    /// At least 8192.
    #[arg(long, env = "CLUSTER_MAX_HEAD_SIZE", default_value_t = 64 * 1024, value_parser = parse_head_size)]
    pub(crate) max_head_size: usize,

    /// Most header fields in one request; more get `431`.
    #[arg(long, env = "CLUSTER_MAX_HEADERS", default_value_t = 100, value_parser = parse_at_least_one)]
    pub(crate) max_headers: usize,

    /// Length of each listening socket's accept queue.
    #[arg(long, env = "CLUSTER_BACKLOG", default_value_t = 1024, value_parser = clap::value_parser!(i32).range(1..))]
    pub(crate) backlog: i32,

    /// Tokio runtime of each worker process (see the README for the measurement behind the
    /// default). `--workers 0` always uses `multi-thread`.
    #[arg(long, env = "CLUSTER_WORKER_RUNTIME", value_enum, default_value_t = RuntimeFlavor::CurrentThread)]
    pub(crate) worker_runtime: RuntimeFlavor,

    /// How often each worker reports its metrics to the supervisor.
    #[arg(long, env = "CLUSTER_METRICS_INTERVAL", default_value = "1s", value_parser = parse_positive_duration)]
    pub(crate) metrics_interval: Duration,

    /// First delay before a crashed worker is restarted; doubles with each crash of the
    /// same slot inside `--crash-window`.
    #[arg(long, env = "CLUSTER_RESTART_BACKOFF", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub(crate) restart_backoff: Duration,

    /// Upper bound of the restart delay.
    #[arg(long, env = "CLUSTER_RESTART_BACKOFF_MAX", default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) restart_backoff_max: Duration,

    /// Crashes of one worker slot inside `--crash-window` after which the whole server
    /// stops (exit code 1) instead of restarting the worker again.
    #[arg(long, env = "CLUSTER_CRASH_LIMIT", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) crash_limit: u32,

    /// Window for `--crash-limit`.
    #[arg(long, env = "CLUSTER_CRASH_WINDOW", default_value = "60s", value_parser = parse_positive_duration)]
    pub(crate) crash_window: Duration,

    /// How long a new worker may take to report ready during a rolling restart before the
    /// restart is abandoned (the old workers keep serving).
    #[arg(long, env = "CLUSTER_READY_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub(crate) ready_timeout: Duration,

    /// Most requests each worker process runs at once (tower-backpressure); more wait in
    /// its queue. The cluster-wide limit is this times the number of workers.
    #[arg(long, env = "CLUSTER_MAX_IN_FLIGHT", default_value_t = 1024, value_parser = parse_at_least_one)]
    pub(crate) max_in_flight: usize,

    /// Most requests each worker process queues beyond `--max-in-flight`; more are answered
    /// `503` with `Retry-After` at once. `0` sheds as soon as the limit is reached.
    #[arg(long, env = "CLUSTER_MAX_QUEUED", default_value_t = 1024)]
    pub(crate) max_queued: usize,

    /// Longest a request may wait in the queue before it is answered `503`.
    #[arg(long, env = "CLUSTER_QUEUE_TIMEOUT", default_value = "1s", value_parser = parse_positive_duration)]
    pub(crate) queue_timeout: Duration,

    /// Most connections each worker process keeps open at once. Beyond it a new connection
    /// is accepted, answered `503 Service Unavailable` with `Connection: close` (best effort,
    /// without reading its request) and closed at once, so a flood can neither exhaust file
    /// descriptors nor make accept fail in a loop. Lowered at start-up, with a warning, to
    /// what the process's file-descriptor limit (`RLIMIT_NOFILE`, raised from its soft to its
    /// hard value at start-up) leaves room for.
    #[arg(long, env = "CLUSTER_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = parse_at_least_one)]
    pub(crate) max_connections: usize,

    /// Largest request body in bytes: a larger `Content-Length` is answered `413` before any
    /// route runs, and a streamed (chunked, HTTP/2) body is cut off with `413` once it
    /// grows past it.
    #[arg(long, env = "CLUSTER_MAX_BODY_SIZE", default_value_t = 1024 * 1024)]
    pub(crate) max_body_size: usize,

    /// Most HTTP/2 streams a client may have open at once on one connection (advertised in
    /// SETTINGS_MAX_CONCURRENT_STREAMS; hyper's default, made explicit).
    #[arg(long, env = "CLUSTER_H2_MAX_CONCURRENT_STREAMS", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) h2_max_concurrent_streams: u32,

    /// Internal: run as a worker of a supervisor (`SLOT:GENERATION:LISTEN_FD:CONTROL_FD`).
    /// Deliberately not readable from the environment.
    #[arg(long, hide = true)]
    pub(crate) internal_worker: Option<WorkerArgs>,
}

/// Where the admin server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admin {
    /// No admin server.
    Off,
    /// Serve `/metrics` on this address.
    On(SocketAddr),
}

/// A worker process's runtime flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RuntimeFlavor {
    /// One thread: no work stealing, no cross-thread wake-ups.
    CurrentThread,
    /// Tokio's work-stealing scheduler with one thread per core.
    MultiThread,
}

/// What the supervisor hands a worker process on its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkerArgs {
    pub(crate) slot: usize,
    pub(crate) generation: u64,
    pub(crate) listen_fd: i32,
    pub(crate) control_fd: i32,
}

impl std::str::FromStr for WorkerArgs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let [slot, generation, listen_fd, control_fd] = parts[..] else {
            return Err(format!(
                "expected SLOT:GENERATION:LISTEN_FD:CONTROL_FD, got {s:?}"
            ));
        };
        let num = |v: &str| v.parse::<i64>().map_err(|e| format!("{v:?}: {e}"));
        let fd = |v: &str| -> Result<i32, String> {
            let n = num(v)?;
            // 0-2 are stdio: never a listener or control socket handed to us.
            i32::try_from(n)
                .ok()
                .filter(|fd| *fd > 2)
                .ok_or_else(|| format!("bad file descriptor {v}"))
        };
        Ok(WorkerArgs {
            slot: usize::try_from(num(slot)?).map_err(|e| e.to_string())?,
            generation: u64::try_from(num(generation)?).map_err(|e| e.to_string())?,
            listen_fd: fd(listen_fd)?,
            control_fd: fd(control_fd)?,
        })
    }
}

impl std::fmt::Display for WorkerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.slot, self.generation, self.listen_fd, self.control_fd
        )
    }
}

fn parse_admin(s: &str) -> Result<Admin, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Admin::Off);
    }
    s.parse()
        .map(Admin::On)
        .map_err(|e| format!("{e}: expected ADDR:PORT or `off`"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

fn parse_at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_head_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n < MIN_HEAD_SIZE {
        return Err(format!("must be at least {MIN_HEAD_SIZE}"));
    }
    Ok(n)
}

/// The per-connection settings shared by every worker.
#[derive(Debug, Clone)]
pub(crate) struct ConnConfig {
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) header_timeout: Duration,
    pub(crate) shutdown_idle_timeout: Duration,
    pub(crate) max_requests_per_connection: Option<NonZeroU64>,
    pub(crate) max_head_size: usize,
    pub(crate) max_headers: usize,
    pub(crate) h2_max_concurrent_streams: u32,
}

impl Cli {
    /// Number of workers to run, resolving the "number of cores" default.
    pub(crate) fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    pub(crate) fn conn_config(&self) -> ConnConfig {
        ConnConfig {
            keep_alive_timeout: self.keep_alive_timeout,
            header_timeout: self.header_timeout,
            shutdown_idle_timeout: self.shutdown_idle_timeout,
            max_requests_per_connection: self.max_requests_per_connection,
            max_head_size: self.max_head_size,
            max_headers: self.max_headers,
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_contract() {
        let cli = Cli::try_parse_from(["cluster"]).unwrap();
        assert_eq!(cli.listen, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(cli.admin, Admin::On("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(cli.keep_alive_timeout, Duration::from_secs(5));
        assert_eq!(cli.header_timeout, Duration::from_secs(10));
        assert_eq!(cli.shutdown_grace, Duration::from_secs(10));
        assert_eq!(cli.shutdown_idle_timeout, Duration::from_secs(1));
        assert_eq!(cli.max_requests_per_connection, None);
        assert_eq!(cli.max_in_flight, 1024);
        assert_eq!(cli.max_queued, 1024);
        assert_eq!(cli.queue_timeout, Duration::from_secs(1));
        assert_eq!(cli.max_connections, 10_000);
        assert_eq!(cli.max_body_size, 1024 * 1024);
        assert!(Cli::try_parse_from(["cluster", "--max-connections", "0"]).is_err());
        assert!(Cli::try_parse_from(["cluster", "--max-in-flight", "0"]).is_err());
        assert!(Cli::try_parse_from(["cluster", "--queue-timeout", "0s"]).is_err());
        assert!(cli.worker_count() >= 1);
        assert_eq!(cli.internal_worker, None);
    }

    #[test]
    fn durations_are_human_readable() {
        let cli = Cli::try_parse_from([
            "cluster",
            "--keep-alive-timeout",
            "500ms",
            "--header-timeout",
            "2m",
            "--workers",
            "0",
            "--admin",
            "off",
        ])
        .unwrap();
        assert_eq!(cli.keep_alive_timeout, Duration::from_millis(500));
        assert_eq!(cli.header_timeout, Duration::from_secs(120));
        assert_eq!(cli.worker_count(), 0);
        assert_eq!(cli.admin, Admin::Off);
    }

    #[test]
    fn bad_values_are_rejected_with_an_error() {
        for args in [
            &["cluster", "--header-timeout", "0s"][..],
            &["cluster", "--header-timeout", "soon"],
            &["cluster", "--max-head-size", "100"],
            &["cluster", "--max-requests-per-connection", "0"],
            &["cluster", "--admin", "nowhere"],
            &["cluster", "--internal-worker", "1:2:1:5"],
            &["cluster", "--crash-limit", "0"],
            &["cluster", "--backlog", "-1"],
            &["cluster", "--max-headers", "0"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn help_documents_every_default_and_env_variable() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "[default: number of CPU cores]",
            "[default: 127.0.0.1:3000]",
            "[default: 127.0.0.1:9000]",
            "[default: 5s]",
            "[default: 10s]",
            "[default: unlimited]",
            "CLUSTER_WORKERS",
            "CLUSTER_KEEP_ALIVE_TIMEOUT",
            "CLUSTER_HEADER_TIMEOUT",
            "CLUSTER_MAX_REQUESTS_PER_CONNECTION",
            "CLUSTER_SHUTDOWN_GRACE",
            "CLUSTER_SHUTDOWN_IDLE_TIMEOUT",
        ] {
            assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
        }
        assert!(
            !help.contains("internal-worker"),
            "the worker mode is hidden"
        );
    }

    #[test]
    fn options_are_read_from_the_environment() {
        // Parsed through clap's `env` support; set on a private command to avoid touching
        // this test process's environment.
        let cmd = <Cli as clap::CommandFactory>::command();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "keep_alive_timeout")
            .unwrap();
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some("CLUSTER_KEEP_ALIVE_TIMEOUT")
        );
        let without_env: Vec<_> = cmd
            .get_arguments()
            .filter(|a| {
                a.get_env().is_none()
                    && !matches!(a.get_id().as_str(), "internal_worker" | "help" | "version")
            })
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(without_env.is_empty(), "no env variable: {without_env:?}");
    }

    #[test]
    fn worker_args_round_trip() {
        let w = WorkerArgs {
            slot: 3,
            generation: 7,
            listen_fd: 10,
            control_fd: 11,
        };
        assert_eq!(w.to_string().parse::<WorkerArgs>().unwrap(), w);
    }
}
