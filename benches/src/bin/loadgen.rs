//! `loadgen`: the load generator for what wrk cannot do, printing one JSON report
//! ([`benches::harness::load::LoadgenReport`]) as its last line.
//!
//! - `open`: an open-loop load. Request *i* is due at `start + i / rate`, whatever happened to the
//!   earlier ones, and its latency is measured from that intended send time, so a server that
//!   stalls is charged for the whole queue it builds (no coordinated omission). wrk2 does this,
//!   but it is not packaged for Debian; this is the same idea in a few hundred lines. Connections
//!   are reused when idle and opened when none is (up to `--max-connections`; beyond that a request
//!   waits, and the wait counts in its latency). A request not finished `--timeout` after its
//!   intended send time counts as a timeout.
//! - `burst`: `--concurrency` identical requests at the same instant (each on its own, already
//!   open connection), `--bursts` times, `--pause` apart; latency from the burst's start.
//! - `abandon`: `--concurrency` clients each send a request on a fresh connection and close it
//!   after `--give-up` without waiting for the answer, over and over for `--duration`.
//!
//! Only `http://` URLs, HTTP/1.1, `GET`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::harness::load::LoadgenReport;
use benches::harness::stats::quantile_sorted;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Load generator for the benches harness.
#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
    /// Target, `http://host:port/path?query`.
    #[arg(long, global = true, default_value = "http://127.0.0.1:3000/")]
    url: String,
    /// Per-request timeout (from the intended send time in `open` mode).
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Fixed arrival rate, latency from the intended send time.
    Open {
        /// Requests per second.
        #[arg(long)]
        rate: f64,
        /// How long to keep sending.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Most connections open at once (= most requests in flight).
        #[arg(long, default_value_t = 8000)]
        max_connections: usize,
    },
    /// Bursts of identical concurrent requests.
    Burst {
        /// Requests per burst.
        #[arg(long)]
        concurrency: usize,
        /// Number of bursts.
        #[arg(long, default_value_t = 1)]
        bursts: usize,
        /// Pause between bursts.
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        pause: Duration,
    },
    /// Clients that give up early and close the connection.
    Abandon {
        /// Concurrent clients.
        #[arg(long)]
        concurrency: usize,
        /// When each client gives up.
        #[arg(long, value_parser = humantime::parse_duration)]
        give_up: Duration,
        /// How long to keep going.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
    },
}

/// Where to connect and what to send.
#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target> {
        let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("only http:// URLs are supported: {url}");
        }
        let host = uri.authority().context("URL has no host")?.to_string();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(
            uri.host().unwrap_or("127.0.0.1"),
            uri.port_u16().unwrap_or(80),
        ))?
        .next()
        .context("host resolves to nothing")?;
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        Ok(Target { addr, host, path })
    }
}

type Sender = SendRequest<Empty<Bytes>>;

async fn connect(t: &Target) -> Result<(Sender, tokio::task::JoinHandle<()>)> {
    let stream = TcpStream::connect(t.addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, driver))
}

/// Sends one GET and reads the whole body: (status, body bytes).
async fn send(sender: &mut Sender, t: &Target) -> Result<(u16, u64)> {
    sender.ready().await?;
    let req = http::Request::get(t.path.as_str())
        .header(http::header::HOST, t.host.as_str())
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
        }
    }
    Ok((status, n))
}

/// Outcome of one request.
enum Outcome {
    Answered {
        status: u16,
        bytes: u64,
        latency_us: u64,
    },
    Error,
    Timeout,
    Abandoned,
}

#[derive(Default)]
struct Tally {
    report: LoadgenReport,
    ok_lat: Vec<u64>,
    all_lat: Vec<u64>,
}

impl Tally {
    fn add(&mut self, o: Outcome) {
        let r = &mut self.report;
        match o {
            Outcome::Answered {
                status,
                bytes,
                latency_us,
            } => {
                r.bytes += bytes;
                self.all_lat.push(latency_us);
                match status {
                    200..=299 => {
                        r.ok += 1;
                        self.ok_lat.push(latency_us);
                    }
                    503 => r.shed += 1,
                    _ => r.other_status += 1,
                }
            }
            Outcome::Error => r.errors += 1,
            Outcome::Timeout => r.timeouts += 1,
            Outcome::Abandoned => r.abandoned += 1,
        }
    }

    fn finish(mut self, mode: &str, sent: u64, duration: Duration, peak: u64) -> LoadgenReport {
        self.ok_lat.sort_unstable();
        self.all_lat.sort_unstable();
        let q = |v: &[u64], p: f64| quantile_sorted(v, p).unwrap_or(0) as f64;
        let r = &mut self.report;
        r.mode = mode.into();
        r.sent = sent;
        r.duration_s = duration.as_secs_f64();
        r.ok_p50_us = q(&self.ok_lat, 0.5);
        r.ok_p99_us = q(&self.ok_lat, 0.99);
        r.ok_max_us = q(&self.ok_lat, 1.0);
        r.all_p99_us = q(&self.all_lat, 0.99);
        r.peak_in_flight = peak;
        self.report
    }
}

/// Counts requests in flight and remembers the peak.
#[derive(Default)]
struct InFlight {
    now: AtomicU64,
    peak: AtomicU64,
}

impl InFlight {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn open_loop(
    t: Target,
    rate: f64,
    duration: Duration,
    max_connections: usize,
    timeout: Duration,
) -> Result<LoadgenReport> {
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be a positive number");
    }
    let t = Arc::new(t);
    let idle: Arc<Mutex<Vec<Sender>>> = Arc::default();
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let inflight = Arc::new(InFlight::default());
    let mut tasks = JoinSet::new();
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let intended = start + Duration::from_secs_f64(sent as f64 / rate);
        if intended >= start + duration {
            break;
        }
        tokio::time::sleep_until(intended).await;
        sent += 1;
        let (t, idle, slots, inflight) = (t.clone(), idle.clone(), slots.clone(), inflight.clone());
        tasks.spawn(async move {
            inflight.enter();
            let work = async {
                let _slot = slots
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                let pooled = {
                    let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
                    // Skip connections the server closed while they sat idle.
                    std::iter::from_fn(|| idle.pop()).find(|s| !s.is_closed())
                };
                let mut sender = match pooled {
                    Some(s) => s,
                    None => connect(&t).await?.0,
                };
                let r = send(&mut sender, &t).await?;
                if !sender.is_closed() {
                    idle.lock().unwrap_or_else(|e| e.into_inner()).push(sender);
                }
                anyhow::Ok(r)
            };
            let out = match tokio::time::timeout_at(intended + timeout, work).await {
                Ok(Ok((status, bytes))) => Outcome::Answered {
                    status,
                    bytes,
                    latency_us: intended.elapsed().as_micros() as u64,
                },
                Ok(Err(_)) => Outcome::Error,
                Err(_) => Outcome::Timeout,
            };
            inflight.leave();
            out
        });
        // Collect finished ones as we go so memory stays proportional to what is in flight.
        while let Some(done) = tasks.try_join_next() {
            tally.add(done.unwrap_or(Outcome::Error));
        }
    }
    while let Some(done) = tasks.join_next().await {
        tally.add(done.unwrap_or(Outcome::Error));
    }
    let peak = inflight.peak.load(Ordering::Relaxed);
    Ok(tally.finish("open", sent, start.elapsed(), peak))
}

async fn bursts(
    t: Target,
    concurrency: usize,
    bursts: usize,
    pause: Duration,
    timeout: Duration,
) -> Result<LoadgenReport> {
    let t = Arc::new(t);
    // Open every connection first: the burst measures the server, not connection setup.
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(Some(connect(&t).await?.0));
    }
    let mut tally = Tally::default();
    let mut busy = Duration::ZERO;
    let mut sent = 0u64;
    for b in 0..bursts {
        if b > 0 {
            tokio::time::sleep(pause).await;
        }
        let start = Instant::now();
        let mut tasks = JoinSet::new();
        for (i, slot) in conns.iter_mut().enumerate() {
            let t = t.clone();
            let conn = slot.take();
            sent += 1;
            tasks.spawn(async move {
                let work = async {
                    let mut s = match conn {
                        Some(s) if !s.is_closed() => s,
                        _ => connect(&t).await?.0,
                    };
                    let r = send(&mut s, &t).await?;
                    anyhow::Ok((r, s))
                };
                match tokio::time::timeout(timeout, work).await {
                    Ok(Ok(((status, bytes), s))) => (
                        i,
                        Some(s),
                        Outcome::Answered {
                            status,
                            bytes,
                            latency_us: start.elapsed().as_micros() as u64,
                        },
                    ),
                    Ok(Err(_)) => (i, None, Outcome::Error),
                    Err(_) => (i, None, Outcome::Timeout),
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((i, conn, out)) => {
                    conns[i] = conn;
                    tally.add(out);
                }
                Err(_) => tally.add(Outcome::Error),
            }
        }
        busy += start.elapsed();
    }
    Ok(tally.finish("burst", sent, busy, concurrency as u64))
}

async fn abandon(
    t: Target,
    concurrency: usize,
    give_up: Duration,
    duration: Duration,
) -> Result<LoadgenReport> {
    let t = Arc::new(t);
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;
    let mut clients = JoinSet::new();
    for _ in 0..concurrency {
        let (t, sent) = (t.clone(), sent.clone());
        clients.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < end {
                sent.fetch_add(1, Ordering::Relaxed);
                let began = Instant::now();
                let (mut s, driver) = match connect(&t).await {
                    Ok(c) => c,
                    Err(_) => {
                        tally.add(Outcome::Error);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let out = match tokio::time::timeout(give_up, send(&mut s, &t)).await {
                    Ok(Ok((status, bytes))) => Outcome::Answered {
                        status,
                        bytes,
                        latency_us: began.elapsed().as_micros() as u64,
                    },
                    Ok(Err(_)) => Outcome::Error,
                    Err(_) => Outcome::Abandoned,
                };
                // Closing the socket is the disconnect the server should notice.
                drop(s);
                driver.abort();
                let _ = driver.await;
                tally.add(out);
            }
            tally
        });
    }
    let mut all = Tally::default();
    while let Some(done) = clients.join_next().await {
        let part = done.context("a client task panicked")?;
        let r = part.report;
        all.report.ok += r.ok;
        all.report.shed += r.shed;
        all.report.other_status += r.other_status;
        all.report.errors += r.errors;
        all.report.timeouts += r.timeouts;
        all.report.abandoned += r.abandoned;
        all.report.bytes += r.bytes;
        all.ok_lat.extend(part.ok_lat);
        all.all_lat.extend(part.all_lat);
    }
    Ok(all.finish(
        "abandon",
        sent.load(Ordering::Relaxed),
        start.elapsed(),
        concurrency as u64,
    ))
}

/// Raises the open-files limit to its hard maximum: every request in flight is a socket.
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

fn main() -> Result<()> {
    let args = Args::parse();
    raise_fd_limit();
    let t = Target::parse(&args.url)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async move {
        match args.mode {
            Mode::Open {
                rate,
                duration,
                max_connections,
            } => open_loop(t, rate, duration, max_connections, args.timeout).await,
            Mode::Burst {
                concurrency,
                bursts: n,
                pause,
            } => bursts(t, concurrency, n, pause, args.timeout).await,
            Mode::Abandon {
                concurrency,
                give_up,
                duration,
            } => abandon(t, concurrency, give_up, duration).await,
        }
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::service::service_fn;

    /// A server that answers every request after `delay`, with 503 for paths under `/shed`.
    async fn server(delay: Duration) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(
                        move |req: http::Request<hyper::body::Incoming>| async move {
                            tokio::time::sleep(delay).await;
                            let status = if req.uri().path().starts_with("/shed") {
                                503
                            } else {
                                200
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"hello")))
                                    .unwrap(),
                            )
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn target(addr: SocketAddr, path: &str) -> Target {
        Target::parse(&format!("http://{addr}{path}")).unwrap()
    }

    #[test]
    fn parses_targets() {
        let t = Target::parse("http://127.0.0.1:8080/sleep?ms=5").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            (t.host.as_str(), t.path.as_str()),
            ("127.0.0.1:8080", "/sleep?ms=5")
        );
        assert!(Target::parse("https://127.0.0.1/").is_err());
        assert!(Target::parse("not a url").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_loop_sends_at_the_rate_and_counts_answers() {
        let addr = server(Duration::from_millis(1)).await;
        let r = open_loop(
            target(addr, "/"),
            200.0,
            Duration::from_millis(250),
            100,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        // 250 ms at 200/s: due times 0, 5, ..., 245 ms.
        assert_eq!(r.sent, 50);
        assert_eq!((r.ok, r.errors, r.timeouts), (50, 0, 0));
        assert_eq!(r.bytes, 50 * 5);
        let r = open_loop(
            target(addr, "/shed"),
            100.0,
            Duration::from_millis(100),
            100,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!((r.sent, r.shed, r.ok), (10, 10, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_loop_charges_queueing_to_latency() {
        // One connection, 100 ms per answer, a request due every 25 ms: request i waits for the
        // i answers before it, so it completes about (i + 1) × 100 ms after start although it was
        // due at i × 25 ms. A closed-loop client would report 100 ms for every one of them.
        let addr = server(Duration::from_millis(100)).await;
        let r = open_loop(
            target(addr, "/"),
            40.0,
            Duration::from_millis(200),
            1,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!((r.sent, r.ok), (8, 8));
        // At 175 ms only the first has been answered.
        assert!(r.peak_in_flight >= 5, "peak {}", r.peak_in_flight);
        // The last one was due at 175 ms and answered no earlier than 800 ms.
        assert!(r.ok_max_us >= 600_000.0, "max latency {} µs", r.ok_max_us);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn open_loop_times_out_from_the_due_time() {
        let addr = server(Duration::from_millis(300)).await;
        let r = open_loop(
            target(addr, "/"),
            20.0,
            Duration::from_millis(100),
            10,
            Duration::from_millis(50),
        )
        .await
        .unwrap();
        assert_eq!((r.sent, r.timeouts, r.ok), (2, 2, 0));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bursts_and_abandon() {
        let addr = server(Duration::from_millis(20)).await;
        let r = bursts(
            target(addr, "/"),
            20,
            3,
            Duration::from_millis(5),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!((r.sent, r.ok, r.errors), (60, 60, 0));
        let slow = server(Duration::from_secs(5)).await;
        let r = abandon(
            target(slow, "/"),
            4,
            Duration::from_millis(20),
            Duration::from_millis(100),
        )
        .await
        .unwrap();
        assert!(r.abandoned >= 4, "{r:?}");
        assert_eq!(r.abandoned, r.sent);
        assert_eq!(r.ok, 0);
    }
}
