//! Overload soak for tower-backpressure: an open-loop load at 10x what the concurrency limit
//! can serve, against a real axum server on 127.0.0.1, once with `BackpressureLayer` and once
//! with stock tower `ConcurrencyLimit` around the whole app (the one placement where tower's
//! limit is shared by every connection).
//!
//! ```sh
//! cargo build --release -p benches --bin backpressure_soak --bin loadgen
//! target/release/backpressure_soak            # 50,000 requests, limit 50, 50 ms handler
//! target/release/backpressure_soak --help     # every option
//! ```
//!
//! For each layer it starts a server process (this binary with `--serve`), then drives it with
//! `loadgen open` (a fixed arrival rate; each latency measured from the request's *intended*
//! send time, so queueing inside the server is charged to it):
//!
//! 1. **unloaded**: `--unloaded` x capacity (default 0.2 x), `--unloaded-requests` requests,
//!    so nothing waits; its p99 of `200`s is the reference;
//! 2. **loaded**: `--overload` x capacity (default 10 x: 10,000 req/s for a limit of 50 and a
//!    50 ms handler), `--requests` requests, while the server's resident memory is sampled
//!    every 100 ms.
//!
//! It reports, per layer: the answer classes (200, 503, other statuses, connection errors,
//! client timeouts), p50/p99 of admitted (`200`) requests loaded and unloaded and their ratio,
//! the server's RSS before the loaded run, the highest sampled RSS and its peak (`VmHWM`), and
//! for this layer the server-side queue and shed counters. It measures; it asserts nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use benches::harness::load::LoadgenReport;
use benches::harness::process::{install_signal_handler, Guarded};
use clap::Parser;
use tower::ServiceBuilder;
use tower_backpressure::{BackpressureHandle, BackpressureLayer, QueueOrder, ShedReason};

/// Open-loop overload soak: tower-backpressure vs tower `ConcurrencyLimit`.
#[derive(Debug, Parser)]
struct Args {
    /// Requests in the loaded run.
    #[arg(long, default_value_t = 50_000)]
    requests: u64,
    /// Concurrency limit of both layers.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Handler time (`/` sleeps this long).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    service: Duration,
    /// Loaded arrival rate as a multiple of capacity (`limit / service`).
    #[arg(long, default_value_t = 10.0)]
    overload: f64,
    /// Unloaded arrival rate as a multiple of capacity.
    #[arg(long, default_value_t = 0.2)]
    unloaded: f64,
    /// Requests in the unloaded run.
    #[arg(long, default_value_t = 1_000)]
    unloaded_requests: u64,
    /// tower-backpressure's queue bound (default: half the limit). The crate docs size it as
    /// `limit x (extra latency accepted / handler time)`; the default accepts half a
    /// handler time on top.
    #[arg(long)]
    max_queued: Option<usize>,
    /// tower-backpressure's queue timeout (default: half the handler time, the extra
    /// latency the default queue bound accepts). With a constant handler time the slots
    /// free up in bursts one handler time apart, so it is the timeout, not the queue bound,
    /// that caps a waiter's wait.
    #[arg(long, value_parser = humantime::parse_duration)]
    queue_timeout: Option<Duration>,
    /// Client timeout, from each request's intended send time.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Most connections the client opens (= most requests in flight from the client).
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Layers to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "backpressure,tower")]
    layers: Vec<Layer>,
    /// The `loadgen` binary (default: next to this one).
    #[arg(long)]
    loadgen: Option<PathBuf>,
    /// Internal: run as the server for this layer.
    #[arg(long, hide = true)]
    serve: Option<Layer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Layer {
    /// `BackpressureLayer` via `Router::layer`, adaptive LIFO queue.
    Backpressure,
    /// tower `ConcurrencyLimit` around the whole app.
    Tower,
}

impl Layer {
    fn name(self) -> &'static str {
        match self {
            Layer::Backpressure => "backpressure",
            Layer::Tower => "tower",
        }
    }
}

impl Args {
    fn capacity(&self) -> f64 {
        self.limit as f64 / self.service.as_secs_f64()
    }

    fn max_queued(&self) -> usize {
        self.max_queued.unwrap_or(self.limit / 2)
    }

    fn queue_timeout(&self) -> Duration {
        self.queue_timeout.unwrap_or(self.service / 2)
    }

    fn describe(&self, layer: Layer) -> String {
        match layer {
            Layer::Backpressure => format!(
                "BackpressureLayer::builder({}).max_queued({}).queue_timeout({:?})\
                 .queue_order(QueueOrder::adaptive()) via Router::layer",
                self.limit,
                self.max_queued(),
                self.queue_timeout(),
            ),
            Layer::Tower => format!(
                "ServiceBuilder::new().concurrency_limit({}).service(router) (whole app)",
                self.limit
            ),
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.limit == 0 || args.service.is_zero() || args.requests == 0 {
        bail!("--limit, --service and --requests must be positive");
    }
    if !(args.overload > 0.0 && args.unloaded > 0.0) {
        bail!("--overload and --unloaded must be positive");
    }
    if let Some(layer) = args.serve {
        return serve(&args, layer);
    }
    install_signal_handler()?;
    let loadgen = match &args.loadgen {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("loadgen"),
    };
    if !loadgen.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p benches --bin loadgen` \
             (or pass --loadgen PATH)",
            loadgen.display()
        );
    }
    println!(
        "open-loop soak: limit {}, handler {:?}, capacity {:.0} req/s; unloaded {} requests at \
         {:.0} req/s, loaded {} requests at {:.0} req/s ({}x); client timeout {:?}, up to {} \
         connections",
        args.limit,
        args.service,
        args.capacity(),
        args.unloaded_requests,
        args.unloaded * args.capacity(),
        args.requests,
        args.overload * args.capacity(),
        args.overload,
        args.timeout,
        args.max_connections,
    );
    let mut results = Vec::new();
    for &layer in &args.layers {
        println!("\n{}: {}", layer.name(), args.describe(layer));
        let result = run_layer(&args, layer, &loadgen)?;
        result.print();
        results.push(result);
    }
    println!("\n| layer | sent | 200 | 503 | other | errors | timeouts | admitted p99 unloaded → loaded | ratio | RSS before → peak |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &results {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} → {:.1} ms | {:.2}x | {:.1} → {:.1} MiB |",
            r.layer.name(),
            r.loaded.sent,
            r.loaded.ok,
            r.loaded.shed,
            r.loaded.other_status,
            r.loaded.errors,
            r.loaded.timeouts,
            r.unloaded.ok_p99_us / 1e3,
            r.loaded.ok_p99_us / 1e3,
            r.p99_ratio(),
            mib(r.rss_before_kib),
            mib(r.peak_kib),
        );
    }
    Ok(())
}

/// What one layer did.
struct LayerResult {
    layer: Layer,
    unloaded: LoadgenReport,
    loaded: LoadgenReport,
    rss_before_kib: u64,
    rss_max_sampled_kib: u64,
    rss_after_kib: u64,
    peak_kib: u64,
    server_stats: Option<String>,
}

impl LayerResult {
    fn p99_ratio(&self) -> f64 {
        self.loaded.ok_p99_us / self.unloaded.ok_p99_us.max(1.0)
    }

    fn print(&self) {
        for (name, r) in [("unloaded", &self.unloaded), ("loaded", &self.loaded)] {
            println!(
                "  {name:>8}: sent {} in {:.1} s: 200={} 503={} other={} errors={} timeouts={}; \
                 admitted p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; client peak in flight {}",
                r.sent,
                r.duration_s,
                r.ok,
                r.shed,
                r.other_status,
                r.errors,
                r.timeouts,
                r.ok_p50_us / 1e3,
                r.ok_p99_us / 1e3,
                r.ok_max_us / 1e3,
                r.peak_in_flight,
            );
        }
        let answered = self.loaded.ok + self.loaded.shed;
        println!(
            "  answers: {} of {} sent were 200 or 503 ({}); admitted p99 {:.2}x unloaded",
            answered,
            self.loaded.sent,
            if answered == self.loaded.sent {
                "all"
            } else {
                "not all"
            },
            self.p99_ratio(),
        );
        println!(
            "  server RSS: {:.1} MiB before the loaded run, {:.1} MiB highest sample during it, \
             {:.1} MiB after; peak (VmHWM) {:.1} MiB",
            mib(self.rss_before_kib),
            mib(self.rss_max_sampled_kib),
            mib(self.rss_after_kib),
            mib(self.peak_kib),
        );
        if let Some(stats) = &self.server_stats {
            println!("  server side: {stats}");
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn run_layer(args: &Args, layer: Layer, loadgen: &PathBuf) -> Result<LayerResult> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .args(["--serve", layer.name()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut server = Guarded::spawn(&format!("{} server", layer.name()), &mut cmd)?;
    let addr = read_addr(&mut server)?;
    let pid = server.pid();
    let url = format!("http://{addr}/");
    let run = |rate: f64, requests: u64| -> Result<(LoadgenReport, u64, u64)> {
        let duration_ms = (requests as f64 / rate * 1e3).ceil() as u64;
        let mut cmd = Command::new(loadgen);
        cmd.args(["--url", &url])
            .args([
                "--timeout",
                &humantime::format_duration(args.timeout).to_string(),
            ])
            .args(["open", "--rate", &rate.to_string()])
            .args(["--duration", &format!("{duration_ms}ms")])
            .args(["--max-connections", &args.max_connections.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut client = Guarded::spawn("loadgen", &mut cmd)?;
        let mut stdout = client.take_stdout().context("loadgen stdout")?;
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            stdout.read_to_string(&mut out).map(|_| out)
        });
        // Sample the server's resident memory until the client is done.
        let (mut max_kib, mut last_kib) = (0, 0);
        while client.try_exited().is_none() {
            if let Some(kib) = vm_kib(pid, "VmRSS:") {
                max_kib = max_kib.max(kib);
                last_kib = kib;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = reader.join().expect("reader thread")?;
        Ok((LoadgenReport::parse(&out)?, max_kib, last_kib))
    };
    let capacity = args.capacity();
    let (unloaded, _, _) = run(args.unloaded * capacity, args.unloaded_requests)?;
    let rss_before_kib = vm_kib(pid, "VmRSS:").unwrap_or(0);
    let (loaded, rss_max_sampled_kib, _) = run(args.overload * capacity, args.requests)?;
    let rss_after_kib = vm_kib(pid, "VmRSS:").unwrap_or(0);
    let peak_kib = vm_kib(pid, "VmHWM:").unwrap_or(0);
    let server_stats = match layer {
        Layer::Backpressure => Some(get_text(addr, "/stats")?),
        Layer::Tower => None,
    };
    server.stop();
    Ok(LayerResult {
        layer,
        unloaded,
        loaded,
        rss_before_kib,
        rss_max_sampled_kib,
        rss_after_kib,
        peak_kib,
        server_stats,
    })
}

/// Reads the `listening ADDR` line the server prints first.
fn read_addr(server: &mut Guarded) -> Result<SocketAddr> {
    let stdout = server.take_stdout().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("server did not start (printed {line:?})"))?;
    Ok(addr.parse()?)
}

/// A field of `/proc/<pid>/status`, KiB.
fn vm_kib(pid: i32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// A plain HTTP/1.1 GET with `Connection: close`; the body as text.
fn get_text(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    Ok(body.trim().to_string())
}

// ===== the server =====

fn serve(args: &Args, layer: Layer) -> Result<()> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let service = args.service;
        let router = Router::new().route(
            "/",
            get(move || async move {
                tokio::time::sleep(service).await;
                "ok"
            }),
        );
        match layer {
            Layer::Backpressure => {
                let backpressure = BackpressureLayer::builder(args.limit)
                    .max_queued(args.max_queued())
                    .queue_timeout(args.queue_timeout())
                    .queue_order(QueueOrder::adaptive())
                    .bypass(|head| head.uri().path() == "/stats")
                    .build();
                let handle = backpressure.handle();
                let app = router
                    .route("/stats", get(move || async move { stats(&handle) }))
                    .layer(backpressure);
                axum::serve(listener, app).await?;
            }
            Layer::Tower => {
                let app = ServiceBuilder::new()
                    .map_response(IntoResponse::into_response)
                    .concurrency_limit(args.limit)
                    .service(router);
                axum::serve(listener, Router::new().fallback_service(app)).await?;
            }
        }
        anyhow::Ok(())
    })
}

fn stats(h: &BackpressureHandle) -> String {
    let (wait, service) = (h.queue_wait(), h.service_time());
    format!(
        "admitted {}, peak in flight {}, peak queued {}; shed queue_full={} queue_timeout={} \
         deadline={} closed={}; queue wait p50 {:?} p99 {:?} max {:?}; service time (sampled) \
         p50 {:?} p99 {:?}",
        h.admitted_total(),
        h.peak_in_flight(),
        h.peak_queued(),
        h.shed_count(ShedReason::QueueFull),
        h.shed_count(ShedReason::QueueTimeout),
        h.shed_count(ShedReason::DeadlineUnreachable),
        h.shed_count(ShedReason::Closed),
        wait.p50,
        wait.p99,
        wait.max,
        service.p50,
        service.p99,
    )
}

/// Raises the open-files limit to its hard maximum: every queued request is a socket.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
}
