//! Shared helpers: start the real binary on ephemeral ports, talk raw HTTP/1.1, read
//! `/metrics`, find and signal worker processes. Every process a test starts is killed by
//! pid when its guard drops, so a failing test leaves nothing running.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Generous bound for anything that should take well under a second on an idle machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A running `cluster` process (supervisor or single process).
pub struct Server {
    child: Option<Child>,
    pub pid: u32,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
    /// Set once stderr reached EOF: every line the process (and its workers, which share
    /// the pipe) wrote is in `log`.
    log_complete: Arc<AtomicBool>,
}

impl Server {
    /// Starts `cluster --listen 127.0.0.1:0 --admin 127.0.0.1:0 ARGS` and waits for its
    /// start-up line.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cluster"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the cluster binary");
        let pid = child.id();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_complete = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (log, log_complete) = (log.clone(), log_complete.clone());
            // Keeps draining stderr so the server never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("listening") {
                        let _ = tx.send(line.clone());
                    }
                    log.lock().unwrap().push(line);
                }
                log_complete.store(true, Ordering::SeqCst);
            });
        }
        let mut server = Server {
            child: Some(child),
            pid,
            addr: "127.0.0.1:0".parse().unwrap(),
            admin: None,
            log,
            log_complete,
        };
        let line = match rx.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(_) => panic!("no start-up line; log:\n{}", server.log()),
        };
        server.addr = field(&line, "addr=")
            .parse()
            .expect("addr in start-up line");
        server.admin = field(&line, "admin=").parse().ok();
        assert!(line.contains(&format!("pid={pid}")), "{line}");
        server
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: &str) {
        signal(self.pid, sig);
    }

    /// Waits for the process to exit, at most `limit`. Once it has, also waits (at most
    /// `PATIENCE`, for workers still holding the pipe) until its last stderr lines have been
    /// read into [`Server::log`]: the reader thread may still be behind when the process ends.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                let deadline = Instant::now() + PATIENCE;
                while !self.log_complete.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn workers(&self) -> Vec<u32> {
        children_of(self.pid)
    }

    pub fn metrics(&self) -> String {
        let admin = self.admin.expect("admin server enabled");
        let res = get(admin, "/metrics").expect("GET /metrics");
        assert_eq!(res.status, 200);
        String::from_utf8(res.body).unwrap()
    }

    /// Polls `/metrics` until `cond` holds, at most `PATIENCE`.
    pub fn wait_metrics(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = self.metrics();
            if cond(&text) {
                return text;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; metrics:\n{text}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Server {
    /// Polls the captured log (the supervisor's and the workers' stderr) until `cond` holds,
    /// at most `PATIENCE`.
    pub fn wait_log(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = self.log();
            if cond(&log) {
                return log;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for pid in children_of(self.pid) {
            signal(pid, "KILL");
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or("")
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Live (non-zombie) processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((ppid, state)) = stat(child) {
            if ppid == pid && state != 'Z' {
                out.push(child);
            }
        }
    }
    out.sort_unstable();
    out
}

/// `(ppid, state)` of a process, from /proc/PID/stat.
pub fn stat(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, state)| state != 'Z')
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect");
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.set_write_timeout(Some(PATIENCE)).unwrap();
    s
}

/// Reads one response with a `Content-Length` body (all our routes have one).
pub fn read_response(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    read_response_from(stream)
}

/// [`read_response`] from any reader (e.g. one that counts the bytes it saw).
pub fn read_response_from(stream: &mut impl Read) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes of head", buf.len()),
            ));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// One `GET` on a fresh connection with `Connection: close`.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<RawResponse> {
    let mut s = TcpStream::connect_timeout(&addr, PATIENCE)?;
    s.set_read_timeout(Some(PATIENCE))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    read_response(&mut s)
}

/// Waits until the peer closes `stream` (EOF or reset); returns how long that took.
/// Panics if any response bytes arrive or nothing happens within `PATIENCE`.
pub fn time_until_closed(stream: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    match stream.read(&mut buf) {
        Ok(0) => start.elapsed(),
        Ok(n) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => start.elapsed(),
        Err(e) => panic!("connection not closed within {PATIENCE:?}: {e}"),
    }
}

/// The value of one sample line (`name` includes labels, e.g. `x_total{status="200"}`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok())?
    })
}
