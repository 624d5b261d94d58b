//! Side-by-side static-file serving: tower-zerocopy (sendfile path and portable path),
//! tower-http `ServeDir`, and nginx with `sendfile on`.
//!
//! Not a criterion bench: it drives real servers with external clients (wrk for 1 MiB files,
//! curl for one 256 MiB file) and reports GB/s and server CPU seconds per GB (utime + stime
//! from /proc). Runs are interleaved so that noise from other work on the machine spreads over
//! every server alike. Needs `nginx`, `wrk`, `curl` and `taskset` on PATH (servers on CPU 0,
//! clients on CPU 1):
//!
//! ```text
//! taskset -c 0 cargo bench -p benches --bench zerocopy            # the comparison
//! ZC_BENCH=tuning taskset -c 0 cargo bench -p benches --bench zerocopy  # threshold / chunk size
//! ```
//! `ZC_SECS` (default 5) sets the wrk duration, `ZC_ROUNDS` (default 2) the interleaved rounds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower_zerocopy::{MarkSendfile, SendfileStats, SendfileStream, ServeDir};

const MIB: u64 = 1 << 20;

fn clock_ticks() -> f64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100.0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let utime: f64 = fields[11].parse().unwrap();
    let stime: f64 = fields[12].parse().unwrap();
    (utime + stime) / clock_ticks()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Server {
    ZeroCopy,
    Portable,
    TowerHttp,
    Nginx,
}

struct Running {
    addr: SocketAddr,
    pid: u32,
    child: Option<Child>,
    rt: Option<tokio::runtime::Runtime>,
    stats: SendfileStats,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn start(server: Server, root: &Path, work: &Path, tune: Option<(u64, usize)>) -> Running {
    if server == Server::Nginx {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let prefix = work.join("nginx");
        std::fs::create_dir_all(&prefix).unwrap();
        let conf = include_str!("../zerocopy/nginx.conf.in")
            .replace("@PORT@", &port.to_string())
            .replace("@ROOT@", root.to_str().unwrap())
            .replace("@PREFIX@", prefix.to_str().unwrap());
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new("nginx")
            .args([
                "-p",
                prefix.to_str().unwrap(),
                "-c",
                conf_path.to_str().unwrap(),
            ])
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx (apt-get install nginx)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        return Running {
            addr,
            pid: child.id(),
            child: Some(child),
            rt: None,
            stats: SendfileStats::new(),
        };
    }
    // One worker thread (plus tokio's blocking pool), like nginx's single worker.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stats = SendfileStats::new();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let root = root.to_path_buf();
    let st = stats.clone();
    rt.spawn(async move {
        let mut ours = ServeDir::new(&root);
        if let Some((min, chunk)) = tune {
            ours = ours.sendfile_min_len(min).read_chunk(chunk);
        }
        let theirs = tower_http::services::ServeDir::new(&root);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let builder = hyper::server::conn::http1::Builder::new();
            match server {
                Server::ZeroCopy | Server::Portable => {
                    let stream = SendfileStream::with_stats(tcp, st.clone());
                    let cap = stream.capability();
                    let ours = ours.clone();
                    tokio::spawn(async move {
                        let io = TokioIo::new(stream);
                        let _ = if server == Server::ZeroCopy {
                            let svc = TowerToHyperService::new(MarkSendfile::new(ours, cap));
                            builder.serve_connection(io, svc).await
                        } else {
                            builder
                                .serve_connection(io, TowerToHyperService::new(ours))
                                .await
                        };
                    });
                }
                Server::TowerHttp => {
                    let svc = TowerToHyperService::new(theirs.clone());
                    tokio::spawn(async move {
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    });
                }
                Server::Nginx => unreachable!(),
            }
        }
    });
    Running {
        addr,
        pid: std::process::id(),
        child: None,
        rt: Some(rt),
        stats,
    }
}

struct Sample {
    bytes: f64,
    secs: f64,
    cpu: f64,
}

/// wrk, 16 connections on CPU 1; bytes = requests × file size.
fn run_wrk(addr: SocketAddr, path: &str, size: u64, secs: u64) -> (f64, f64) {
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", "-c16", &format!("-d{secs}s")])
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    // "  12345 requests in 5.00s, 12.06GB read"
    let line = text
        .lines()
        .find(|l| l.contains("requests in"))
        .unwrap_or_else(|| panic!("wrk: {text}"));
    let mut words = line.split_whitespace();
    let requests: f64 = words.next().unwrap().parse().unwrap();
    let secs: f64 = words
        .nth(2)
        .unwrap()
        .trim_end_matches(',')
        .trim_end_matches('s')
        .parse()
        .unwrap();
    (requests * size as f64, secs)
}

/// curl, one connection on CPU 1, the whole file `times` times.
fn run_curl(addr: SocketAddr, path: &str, times: usize) -> (f64, f64) {
    let mut bytes = 0.0;
    let started = Instant::now();
    for _ in 0..times {
        let out = Command::new("taskset")
            .args([
                "-c",
                "1",
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
            ])
            .arg(format!("http://{addr}{path}"))
            .output()
            .expect("curl");
        bytes += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<f64>()
            .unwrap();
    }
    (bytes, started.elapsed().as_secs_f64())
}

fn measure(
    server: Server,
    root: &Path,
    work: &Path,
    tune: Option<(u64, usize)>,
    load: &dyn Fn(SocketAddr) -> (f64, f64),
) -> Sample {
    let running = start(server, root, work, tune);
    // Warm-up: page cache, open-file caches, connection setup.
    let _ = run_curl(running.addr, "/f1m.bin", 2);
    let cpu0 = cpu_seconds(running.pid);
    let (bytes, secs) = load(running.addr);
    let cpu = cpu_seconds(running.pid) - cpu0;
    if server == Server::ZeroCopy || server == Server::Portable {
        eprintln!("    {server:?} counters: {:?}", running.stats);
    }
    Sample { bytes, secs, cpu }
}

fn write_file(path: &Path, len: u64) {
    if std::fs::metadata(path)
        .map(|m| m.len() == len)
        .unwrap_or(false)
    {
        return;
    }
    let chunk: Vec<u8> = (0..MIB).map(|i| (i * 31 % 251) as u8).collect();
    let mut f = std::fs::File::create(path).unwrap();
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        std::io::Write::write_all(&mut f, &chunk[..n]).unwrap();
        left -= n as u64;
    }
}

fn report(label: &str, samples: &[Sample]) {
    let bytes: f64 = samples.iter().map(|s| s.bytes).sum();
    let secs: f64 = samples.iter().map(|s| s.secs).sum();
    let cpu: f64 = samples.iter().map(|s| s.cpu).sum();
    let gb = bytes / 1e9;
    println!(
        "{label:<40} {:>7.2} GB/s {:>7.3} CPU-s/GB",
        gb / secs,
        cpu / gb
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` / `cargo bench -- --list`: nothing to run here.
    }
    let secs: u64 = std::env::var("ZC_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rounds: usize = std::env::var("ZC_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let work = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/zerocopy-bench");
    let root = work.join("root");
    std::fs::create_dir_all(&root).unwrap();
    write_file(&root.join("f1m.bin"), MIB);
    write_file(&root.join("f256m.bin"), 256 * MIB);
    for kib in [16, 64, 256] {
        write_file(&root.join(format!("f{kib}k.bin")), kib * 1024);
    }

    if std::env::var("ZC_BENCH").as_deref() == Ok("tuning") {
        // Sendfile threshold: the same small files through each path.
        for kib in [16u64, 64, 256] {
            let path = format!("/f{kib}k.bin");
            let load = |a: SocketAddr| run_wrk(a, &path, kib * 1024, secs);
            let (mut sf, mut pt) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                sf.push(measure(
                    Server::ZeroCopy,
                    &root,
                    &work,
                    Some((0, 512 * 1024)),
                    &load,
                ));
                pt.push(measure(
                    Server::Portable,
                    &root,
                    &work,
                    Some((0, 512 * 1024)),
                    &load,
                ));
            }
            report(&format!("{kib} KiB sendfile path"), &sf);
            report(&format!("{kib} KiB portable path"), &pt);
        }
        // Portable read size on 1 MiB files.
        let load = |a: SocketAddr| run_wrk(a, "/f1m.bin", MIB, secs);
        let chunks = [64 * 1024usize, 256 * 1024, 512 * 1024, 1024 * 1024];
        let mut samples: Vec<Vec<Sample>> = chunks.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (i, &c) in chunks.iter().enumerate() {
                samples[i].push(measure(
                    Server::Portable,
                    &root,
                    &work,
                    Some((u64::MAX, c)),
                    &load,
                ));
            }
        }
        for (i, c) in chunks.iter().enumerate() {
            report(
                &format!("portable, {} KiB reads, 1 MiB files", c / 1024),
                &samples[i],
            );
        }
        return;
    }

    let servers = [
        Server::ZeroCopy,
        Server::Portable,
        Server::TowerHttp,
        Server::Nginx,
    ];
    let mut small: Vec<Vec<Sample>> = servers.iter().map(|_| Vec::new()).collect();
    let mut large: Vec<Vec<Sample>> = servers.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        eprintln!("round {round}");
        for (i, &s) in servers.iter().enumerate() {
            small[i].push(measure(s, &root, &work, None, &|a| {
                run_wrk(a, "/f1m.bin", MIB, secs)
            }));
            large[i].push(measure(s, &root, &work, None, &|a| {
                run_curl(a, "/f256m.bin", 4)
            }));
        }
    }
    println!("1 MiB files, wrk -t1 -c16 -d{secs}s, {rounds} interleaved rounds:");
    for (i, s) in servers.iter().enumerate() {
        report(&format!("  {s:?}"), &small[i]);
    }
    println!("256 MiB file, curl x4 per round, {rounds} interleaved rounds:");
    for (i, s) in servers.iter().enumerate() {
        report(&format!("  {s:?}"), &large[i]);
    }
}
