//! Load generators: wrk (closed loop, many connections), curl (a few huge downloads on one
//! connection), and our `loadgen` (open loop, bursts, and clients that give up). Each run yields
//! one [`Sample`].

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What one load run measured on the client side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Completed responses (any status).
    pub requests: u64,
    /// Wall time of the run, seconds.
    pub duration_s: f64,
    /// Response bytes received (head and body).
    pub bytes: u64,
    /// Responses with status >= 400 (for `loadgen`: every non-2xx status).
    pub status_errors: u64,
    /// Connect, read and write errors.
    pub socket_errors: u64,
    /// Requests that hit the client's timeout.
    pub timeouts: u64,
    /// Requests the client gave up on on purpose (`loadgen abandon`).
    #[serde(default)]
    pub abandoned: u64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Largest latency, microseconds.
    pub max_us: f64,
}

impl Sample {
    /// Completed requests per second.
    pub fn rps(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.requests as f64 / self.duration_s
        } else {
            0.0
        }
    }

    /// Received gigabytes (10^9 bytes) per second.
    pub fn gbps(&self) -> f64 {
        if self.duration_s > 0.0 {
            self.bytes as f64 / 1e9 / self.duration_s
        } else {
            0.0
        }
    }
}

/// The wrk script that prints wrk's own summary as one JSON line after the run; wrk's text output
/// rounds and changes units, this does not. Written next to the results of a run.
pub const WRK_REPORT_LUA: &str = r#"-- Written by the benches harness: report wrk's summary as JSON.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"#;

/// One wrk run.
#[derive(Debug, Clone)]
pub struct Wrk {
    /// Full URL.
    pub url: String,
    /// Open connections (`-c`).
    pub connections: u32,
    /// Threads (`-t`).
    pub threads: u32,
    /// Run length (`-d`).
    pub duration: Duration,
    /// Extra request headers, `Name: value`.
    pub headers: Vec<String>,
    /// Per-request timeout (`--timeout`).
    pub timeout: Duration,
}

impl Wrk {
    /// The command line, given where [`WRK_REPORT_LUA`] was written.
    pub fn args(&self, script: &Path) -> Vec<String> {
        let mut a = vec![
            format!("-t{}", self.threads.max(1)),
            format!("-c{}", self.connections.max(self.threads.max(1))),
            // wrk's time arguments take whole units (s, m, h), not milliseconds.
            format!("-d{}s", whole_seconds(self.duration)),
            format!("--timeout={}s", whole_seconds(self.timeout)),
            "-s".into(),
            script.display().to_string(),
        ];
        for h in &self.headers {
            a.push("-H".into());
            a.push(h.clone());
        }
        a.push(self.url.clone());
        a
    }
}

/// A duration rounded to whole seconds, at least one.
pub fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs_f64().round() as u64).max(1)
}

#[derive(Deserialize)]
struct WrkJson {
    requests: u64,
    duration_us: u64,
    bytes: u64,
    connect: u64,
    read: u64,
    write: u64,
    status: u64,
    timeout: u64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

/// Reads the `WRK_JSON` line of wrk's output.
pub fn parse_wrk(stdout: &str) -> Result<Sample> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("WRK_JSON "))
        .context("wrk printed no WRK_JSON line (did the report script load?)")?;
    let j: WrkJson = serde_json::from_str(line).with_context(|| format!("parsing {line}"))?;
    Ok(Sample {
        requests: j.requests,
        duration_s: j.duration_us as f64 / 1e6,
        bytes: j.bytes,
        status_errors: j.status,
        socket_errors: j.connect + j.read + j.write,
        timeouts: j.timeout,
        abandoned: 0,
        p50_us: j.p50_us,
        p99_us: j.p99_us,
        max_us: j.max_us,
    })
}

/// The curl command line that fetches `url` `count` times over one connection, printing one
/// `status bytes seconds` line per transfer.
pub fn curl_args(url: &str, count: usize) -> Vec<String> {
    let mut a: Vec<String> = [
        "-s",
        "--fail-early",
        "-w",
        "%{http_code} %{size_download} %{time_total}\\n",
    ]
    .map(String::from)
    .to_vec();
    for _ in 0..count {
        a.push("-o".into());
        a.push("/dev/null".into());
        a.push(url.to_owned());
    }
    a
}

/// Folds curl's per-transfer lines into one sample; `wall_s` is the measured wall time.
pub fn parse_curl(stdout: &str, wall_s: f64) -> Result<Sample> {
    let mut s = Sample {
        duration_s: wall_s,
        ..Sample::default()
    };
    let mut lat = Vec::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [code, size, secs] = f[..] else {
            bail!("unexpected curl line {line:?}");
        };
        let code: u16 = code.parse()?;
        match code {
            0 => s.socket_errors += 1,
            200..=299 => {}
            _ => s.status_errors += 1,
        }
        s.requests += 1;
        s.bytes += size.parse::<u64>()?;
        lat.push(secs.parse::<f64>()? * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    s.p50_us = crate::harness::stats::quantile_sorted(&lat, 0.5).unwrap_or(0.0);
    s.p99_us = crate::harness::stats::quantile_sorted(&lat, 0.99).unwrap_or(0.0);
    s.max_us = lat.last().copied().unwrap_or(0.0);
    Ok(s)
}

/// The JSON report the `loadgen` binary prints on its last line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadgenReport {
    /// Mode that produced it (`open`, `burst`, `abandon`).
    pub mode: String,
    /// Requests started.
    pub sent: u64,
    /// 2xx responses.
    pub ok: u64,
    /// 503 responses (shed).
    pub shed: u64,
    /// Other non-2xx responses.
    pub other_status: u64,
    /// Connect and I/O errors.
    pub errors: u64,
    /// Requests that hit the client timeout.
    pub timeouts: u64,
    /// Requests the client abandoned on purpose (`abandon` mode).
    pub abandoned: u64,
    /// Wall time from the first intended send to the last completion, seconds.
    pub duration_s: f64,
    /// Response body bytes received.
    pub bytes: u64,
    /// Latency of 2xx responses from the *intended* send time, microseconds: p50.
    pub ok_p50_us: f64,
    /// As above, p99.
    pub ok_p99_us: f64,
    /// As above, max.
    pub ok_max_us: f64,
    /// Latency of every completed response (any status), p99, microseconds.
    pub all_p99_us: f64,
    /// Highest number of requests in flight at once on the client.
    pub peak_in_flight: u64,
}

impl LoadgenReport {
    /// Reads the last line of `loadgen`'s output.
    pub fn parse(stdout: &str) -> Result<LoadgenReport> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .context("loadgen printed no JSON report")?;
        Ok(serde_json::from_str(line)?)
    }

    /// As a [`Sample`]: 2xx latencies, all completed responses as requests.
    pub fn to_sample(&self) -> Sample {
        Sample {
            requests: self.ok + self.shed + self.other_status,
            duration_s: self.duration_s,
            bytes: self.bytes,
            status_errors: self.shed + self.other_status,
            socket_errors: self.errors,
            timeouts: self.timeouts,
            abandoned: self.abandoned,
            p50_us: self.ok_p50_us,
            p99_us: self.ok_p99_us,
            max_us: self.ok_max_us,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_args_and_report() {
        let w = Wrk {
            url: "http://127.0.0.1:1/".into(),
            connections: 64,
            threads: 1,
            duration: Duration::from_secs(2),
            headers: vec!["Connection: close".into()],
            timeout: Duration::from_secs(5),
        };
        let a = w.args(Path::new("/tmp/r.lua"));
        assert_eq!(
            a,
            [
                "-t1",
                "-c64",
                "-d2s",
                "--timeout=5s",
                "-s",
                "/tmp/r.lua",
                "-H",
                "Connection: close",
                "http://127.0.0.1:1/"
            ]
        );
        let out = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n\
                   WRK_JSON {\"requests\":200000,\"duration_us\":2000000,\"bytes\":25000000,\
                   \"connect\":1,\"read\":2,\"write\":3,\"status\":4,\"timeout\":5,\
                   \"p50_us\":450,\"p99_us\":3100,\"max_us\":9000}\n";
        let s = parse_wrk(out).unwrap();
        assert_eq!(s.rps(), 100_000.0);
        assert_eq!((s.socket_errors, s.status_errors, s.timeouts), (6, 4, 5));
        assert_eq!((s.p50_us, s.p99_us), (450.0, 3100.0));
        assert!((s.gbps() - 0.0125).abs() < 1e-12);
        assert!(parse_wrk("Running 2s test\n").is_err());
        assert_eq!(whole_seconds(Duration::from_millis(400)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(2600)), 3);
    }

    #[test]
    fn curl_lines_fold_into_a_sample() {
        let a = curl_args("http://h/f", 2);
        assert_eq!(a.iter().filter(|x| *x == "http://h/f").count(), 2);
        let s = parse_curl("200 1000 0.5\n200 1000 1.5\n404 10 0.1\n000 0 0.0\n", 4.0).unwrap();
        assert_eq!(
            (s.requests, s.bytes, s.status_errors, s.socket_errors),
            (4, 2010, 1, 1)
        );
        assert_eq!(s.p50_us, 100_000.0);
        assert_eq!(s.max_us, 1_500_000.0);
        assert!(parse_curl("200 x\n", 1.0).is_err());
    }

    #[test]
    fn loadgen_report_round_trips() {
        let r = LoadgenReport {
            mode: "open".into(),
            sent: 10,
            ok: 7,
            shed: 2,
            other_status: 1,
            abandoned: 4,
            duration_s: 2.0,
            ok_p99_us: 1234.0,
            ..Default::default()
        };
        let out = format!("warming up\n{}\n", serde_json::to_string(&r).unwrap());
        let back = LoadgenReport::parse(&out).unwrap();
        assert_eq!(back, r);
        let s = back.to_sample();
        assert_eq!((s.requests, s.status_errors, s.p99_us), (10, 3, 1234.0));
        assert_eq!(s.abandoned, 4);
        assert_eq!(s.rps(), 5.0);
    }
}
