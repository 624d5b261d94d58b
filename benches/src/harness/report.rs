//! Results: per-case summaries, ratios against the baseline computed round by round, and their
//! rendering as Markdown, JSON and the `BENCHMARKS.md` section of a suite.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::load::Sample;
use super::stats::{paired_ratios, Spread};

/// One measured load run of a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The round (all cases run once per round, in rotating order).
    pub round: usize,
    /// What the client measured.
    pub sample: Sample,
    /// CPU seconds the server's process tree spent during the run.
    pub cpu_s: f64,
    /// Change of the suite's server-side counter during the run, if the suite reads one.
    pub counter: Option<f64>,
}

/// The number a suite leads with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Headline {
    /// Requests per second; CPU per request.
    Rps,
    /// Gigabytes per second; CPU seconds per gigabyte.
    Gbps,
}

/// A metric drawn as one panel of a suite's chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChartMetric {
    /// The headline (req/s or GB/s).
    Headline,
    /// Server CPU per request or per GB.
    CpuPerUnit,
    /// p99 latency.
    P99,
    /// Share of 2xx answers.
    SuccessPct,
    /// The suite's server-side counter.
    Counter,
    /// Peak resident memory.
    PeakRss,
}

/// Results of one case (a server under one load).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// `group/server`.
    pub id: String,
    /// The group (e.g. `keep-alive`); ratios compare cases of one group.
    pub group: String,
    /// The server's id.
    pub server: String,
    /// The server's label.
    pub label: String,
    /// Whether this case is its group's baseline.
    pub baseline: bool,
    /// `ok`, `not available: ...` or `failed: ...`.
    pub status: String,
    /// The load command of one run.
    pub load_command: String,
    /// Every measured run.
    pub runs: Vec<Run>,
    /// Requests per second.
    pub rps: Option<Spread>,
    /// Gigabytes per second.
    pub gbps: Option<Spread>,
    /// Median latency, µs (spread over runs).
    pub p50_us: Option<Spread>,
    /// 99th percentile latency, µs (spread over runs).
    pub p99_us: Option<Spread>,
    /// Server CPU µs per request.
    pub cpu_us_per_req: Option<Spread>,
    /// Server CPU seconds per GB.
    pub cpu_s_per_gb: Option<Spread>,
    /// Share of requests answered 2xx, percent.
    pub success_pct: Option<Spread>,
    /// The suite's server-side counter per run.
    pub counter: Option<Spread>,
    /// Peak resident memory of the server's processes (sum of VmHWM), MiB.
    pub peak_rss_mib: Option<f64>,
    /// Responses with an error status, over all runs.
    pub status_errors: u64,
    /// Socket errors, over all runs.
    pub socket_errors: u64,
    /// Client timeouts, over all runs.
    pub timeouts: u64,
    /// Headline (req/s or GB/s) divided by the baseline's, round by round.
    pub ratio: Option<Spread>,
    /// CPU per unit divided by the baseline's, round by round.
    pub cpu_ratio: Option<Spread>,
}

impl CaseResult {
    /// The headline value of each round (`None` where the run is missing).
    pub fn per_round(&self, h: Headline, rounds: usize) -> Vec<Option<f64>> {
        self.per_round_with(rounds, |r| match h {
            Headline::Rps => r.sample.rps(),
            Headline::Gbps => r.sample.gbps(),
        })
    }

    /// CPU per unit of each round.
    pub fn cpu_per_round(&self, h: Headline, rounds: usize) -> Vec<Option<f64>> {
        self.per_round_with(rounds, |r| cpu_per_unit(h, r))
    }

    fn per_round_with(&self, rounds: usize, f: impl Fn(&Run) -> f64) -> Vec<Option<f64>> {
        let mut v = vec![None; rounds];
        for r in &self.runs {
            if r.round < rounds {
                v[r.round] = Some(f(r));
            }
        }
        v
    }

    /// Fills the summaries from `runs`.
    pub fn summarise(&mut self, h: Headline) {
        let col =
            |f: &dyn Fn(&Run) -> f64| Spread::of(&self.runs.iter().map(f).collect::<Vec<_>>());
        self.rps = col(&|r| r.sample.rps());
        self.gbps = col(&|r| r.sample.gbps());
        self.p50_us = col(&|r| r.sample.p50_us);
        self.p99_us = col(&|r| r.sample.p99_us);
        match h {
            Headline::Rps => self.cpu_us_per_req = col(&|r| cpu_per_unit(h, r)),
            Headline::Gbps => self.cpu_s_per_gb = col(&|r| cpu_per_unit(h, r)),
        }
        self.success_pct = col(&|r| {
            let s = &r.sample;
            let attempted = s.requests + s.socket_errors + s.timeouts;
            if attempted == 0 {
                f64::NAN
            } else {
                100.0 * (s.requests - s.status_errors.min(s.requests)) as f64 / attempted as f64
            }
        });
        let counters: Vec<f64> = self.runs.iter().filter_map(|r| r.counter).collect();
        self.counter = Spread::of(&counters);
        self.status_errors = self.runs.iter().map(|r| r.sample.status_errors).sum();
        self.socket_errors = self.runs.iter().map(|r| r.sample.socket_errors).sum();
        self.timeouts = self.runs.iter().map(|r| r.sample.timeouts).sum();
    }
}

/// Server CPU µs per request, or CPU seconds per GB. NaN when the run did no work.
pub fn cpu_per_unit(h: Headline, r: &Run) -> f64 {
    match h {
        Headline::Rps if r.sample.requests > 0 => r.cpu_s * 1e6 / r.sample.requests as f64,
        Headline::Gbps if r.sample.bytes > 0 => r.cpu_s / (r.sample.bytes as f64 / 1e9),
        _ => f64::NAN,
    }
}

/// Sets `ratio` and `cpu_ratio` of every case against the baseline case of its group, pairing
/// the runs of the same round.
pub fn compute_ratios(cases: &mut [CaseResult], h: Headline, rounds: usize) {
    let baselines: BTreeMap<String, (Vec<Option<f64>>, Vec<Option<f64>>)> = cases
        .iter()
        .filter(|c| c.baseline && !c.runs.is_empty())
        .map(|c| {
            (
                c.group.clone(),
                (c.per_round(h, rounds), c.cpu_per_round(h, rounds)),
            )
        })
        .collect();
    for c in cases.iter_mut() {
        let Some((base, base_cpu)) = baselines.get(&c.group) else {
            continue;
        };
        c.ratio = Spread::of(&paired_ratios(&c.per_round(h, rounds), base));
        c.cpu_ratio = Spread::of(&paired_ratios(&c.cpu_per_round(h, rounds), base_cpu));
    }
}

/// Everything one suite run produced.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SuiteResult {
    /// Suite name (`hello`, ...).
    pub suite: String,
    /// One-line title.
    pub title: String,
    /// What the suite measures.
    pub about: String,
    /// Start time, RFC 3339 UTC.
    pub started_utc: String,
    /// Whether this was a `--quick` smoke run.
    pub quick: bool,
    /// Rounds (runs per case).
    pub rounds: usize,
    /// The load of one run, in words.
    pub load: String,
    /// The machine.
    pub machine: String,
    /// Tool versions.
    pub tools: BTreeMap<String, String>,
    /// Headline metric.
    pub headline: Option<Headline>,
    /// Name of the server-side counter column, if any.
    pub counter_name: Option<String>,
    /// Whether to show the success rate column.
    pub show_success: bool,
    /// The panels of the chart, left to right.
    pub chart: Vec<ChartMetric>,
    /// The harness command that produced this.
    pub command: String,
    /// Each server's start command (or why it did not start), by id.
    pub servers: BTreeMap<String, String>,
    /// Case results in table order.
    pub cases: Vec<CaseResult>,
    /// Remarks (noise, what is missing).
    pub notes: Vec<String>,
}

/// `1234567.0` → `1.23M`, `98765.0` → `98.8k`, `950.0` → `950`.
pub fn fmt_count(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.2}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Microseconds as `850 µs`, `3.10 ms`, `1.20 s`.
pub fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.0} µs")
    }
}

/// A number with three significant digits.
pub fn fmt_sig(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

fn spread_with(s: &Option<Spread>, f: impl Fn(f64) -> String) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{} ({}–{})", f(s.median), f(s.min), f(s.max)),
        Some(s) => f(s.median),
        None => "–".into(),
    }
}

fn ratio_cell(s: &Option<Spread>, baseline: bool) -> String {
    if baseline {
        return "1 (baseline)".into();
    }
    spread_with(s, |v| format!("{v:.2}"))
}

/// Text made safe for one Markdown table cell: one line, no `|`, at most 160 characters.
pub fn table_cell(s: &str) -> String {
    let one_line = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|");
    if one_line.chars().count() > 160 {
        let cut: String = one_line.chars().take(157).collect();
        format!("{cut}...")
    } else {
        one_line
    }
}

/// The suite's Markdown table (no heading).
pub fn markdown_table(r: &SuiteResult) -> String {
    let h = r.headline.unwrap_or(Headline::Rps);
    let (unit, cpu_unit) = match h {
        Headline::Rps => ("req/s", "server CPU µs/req"),
        Headline::Gbps => ("GB/s", "server CPU s/GB"),
    };
    let mut head = vec![
        "group".to_string(),
        "server".into(),
        format!("{unit} median (min–max)"),
        format!("{unit} × baseline"),
        "p50".into(),
        "p99".into(),
        cpu_unit.into(),
        "CPU × baseline".into(),
    ];
    if r.show_success {
        head.push("2xx %".into());
    }
    if let Some(c) = &r.counter_name {
        head.push(c.clone());
    }
    head.extend(["peak RSS".into(), "errors ≥400 / socket / timeout".into()]);
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let align: Vec<&str> = head
        .iter()
        .enumerate()
        .map(|(i, _)| if i < 2 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "| {} |", align.join(" | "));
    for c in &r.cases {
        let mut row = vec![c.group.clone(), c.label.clone()];
        if c.status != "ok" {
            row.push(table_cell(&c.status));
            row.resize(head.len(), String::new());
            let _ = writeln!(out, "| {} |", row.join(" | "));
            continue;
        }
        let headline = match h {
            Headline::Rps => spread_with(&c.rps, fmt_count),
            Headline::Gbps => spread_with(&c.gbps, |v| format!("{v:.2}")),
        };
        row.push(headline);
        row.push(ratio_cell(&c.ratio, c.baseline));
        row.push(c.p50_us.map_or("–".into(), |s| fmt_us(s.median)));
        row.push(c.p99_us.map_or("–".into(), |s| fmt_us(s.median)));
        let cpu = match h {
            Headline::Rps => &c.cpu_us_per_req,
            Headline::Gbps => &c.cpu_s_per_gb,
        };
        row.push(spread_with(cpu, fmt_sig));
        row.push(ratio_cell(&c.cpu_ratio, c.baseline));
        if r.show_success {
            row.push(spread_with(&c.success_pct, |v| format!("{v:.1}")));
        }
        if r.counter_name.is_some() {
            row.push(spread_with(&c.counter, fmt_sig));
        }
        row.push(c.peak_rss_mib.map_or("–".into(), |m| format!("{m:.1} MiB")));
        row.push(format!(
            "{} / {} / {}",
            c.status_errors, c.socket_errors, c.timeouts
        ));
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// The Markdown of a suite run: title, what it measures, table, chart, conditions, commands.
/// `chart` is the chart's path relative to where the Markdown is read from.
pub fn markdown(r: &SuiteResult, chart: Option<&str>, heading: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{heading} `{}`: {}\n", r.suite, r.title);
    let _ = writeln!(out, "{}\n", r.about);
    let _ = writeln!(
        out,
        "Run {}{}; {} rounds, cases interleaved; load per run: {}.\n",
        r.started_utc,
        if r.quick {
            " (`--quick` smoke run: too short to quote)"
        } else {
            ""
        },
        r.rounds,
        r.load
    );
    out.push_str(&markdown_table(r));
    out.push('\n');
    if let Some(chart) = chart {
        let _ = writeln!(out, "![{} chart]({chart})\n", r.suite);
    }
    let _ = writeln!(out, "Machine: {}.  ", r.machine);
    let tools: Vec<String> = r.tools.values().cloned().collect();
    let _ = writeln!(out, "Tools: {}.\n", tools.join("; "));
    for n in &r.notes {
        let _ = writeln!(out, "- {n}");
    }
    if !r.notes.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(out, "Command: `{}`\n", r.command);
    out.push_str("<details><summary>Server and load commands</summary>\n\n");
    for (id, cmd) in &r.servers {
        let _ = writeln!(out, "- `{id}`: `{}`", cmd.replace('`', "'"));
    }
    let mut seen = Vec::new();
    for c in &r.cases {
        if !c.load_command.is_empty() && !seen.contains(&c.load_command) {
            let _ = writeln!(out, "- load `{}`: `{}`", c.id, c.load_command);
            seen.push(c.load_command.clone());
        }
    }
    out.push_str("\n</details>\n");
    out
}

/// Replaces (or appends) the section of `suite` in the text of `BENCHMARKS.md`. Sections are
/// delimited by HTML comments so each suite's latest results replace only its own.
pub fn update_benchmarks(existing: &str, suite: &str, section: &str) -> String {
    let start = format!("<!-- suite:{suite}:start -->");
    let end = format!("<!-- suite:{suite}:end -->");
    let block = format!("{start}\n{}\n{end}", section.trim_end());
    if let (Some(s), Some(e)) = (existing.find(&start), existing.find(&end)) {
        if s < e {
            let mut out = String::with_capacity(existing.len() + block.len());
            out.push_str(&existing[..s]);
            out.push_str(&block);
            out.push_str(&existing[e + end.len()..]);
            return out;
        }
    }
    let mut out = existing.trim_end().to_string();
    out.push_str("\n\n");
    out.push_str(&block);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: usize, requests: u64, cpu_s: f64) -> Run {
        Run {
            round,
            sample: Sample {
                requests,
                duration_s: 1.0,
                bytes: requests * 100,
                p50_us: 100.0,
                p99_us: 1000.0,
                ..Sample::default()
            },
            cpu_s,
            counter: None,
        }
    }

    fn case(group: &str, server: &str, baseline: bool, runs: Vec<Run>) -> CaseResult {
        let mut c = CaseResult {
            id: format!("{group}/{server}"),
            group: group.into(),
            server: server.into(),
            label: server.into(),
            baseline,
            status: "ok".into(),
            runs,
            ..CaseResult::default()
        };
        c.summarise(Headline::Rps);
        c
    }

    #[test]
    fn summarises_runs() {
        let c = case(
            "ka",
            "x",
            false,
            vec![run(0, 1000, 0.01), run(1, 3000, 0.03), run(2, 2000, 0.01)],
        );
        let rps = c.rps.unwrap();
        assert_eq!((rps.median, rps.min, rps.max), (2000.0, 1000.0, 3000.0));
        // 10 µs, 10 µs, 5 µs per request.
        let cpu = c.cpu_us_per_req.unwrap();
        assert!((cpu.median - 10.0).abs() < 1e-9 && (cpu.min - 5.0).abs() < 1e-9);
        assert_eq!(c.success_pct.unwrap().median, 100.0);
    }

    #[test]
    fn ratios_pair_rounds_within_groups() {
        let mut cases = vec![
            case(
                "ka",
                "node",
                true,
                vec![run(0, 100, 0.001), run(1, 50, 0.001)],
            ),
            case(
                "ka",
                "ours",
                false,
                vec![run(0, 210, 0.001), run(1, 100, 0.001)],
            ),
            case("close", "node", true, vec![run(0, 10, 0.001)]),
            case("close", "ours", false, vec![run(1, 30, 0.001)]),
        ];
        compute_ratios(&mut cases, Headline::Rps, 2);
        let r = cases[1].ratio.unwrap();
        assert_eq!((r.min, r.max, r.n), (2.0, 2.1, 2));
        // CPU per request: ours does twice the requests on the same CPU.
        let c = cases[1].cpu_ratio.unwrap();
        assert!((c.max - 0.5).abs() < 1e-9);
        assert_eq!(cases[0].ratio.unwrap().median, 1.0);
        // No common round between close/ours and its baseline: no ratio rather than a wrong one.
        assert_eq!(cases[3].ratio, None);
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(fmt_count(128_700.0), "128.7k");
        assert_eq!(fmt_count(1_234_567.0), "1.23M");
        assert_eq!(fmt_count(1_500.0), "1.50k");
        assert_eq!(fmt_count(950.0), "950");
        assert_eq!(fmt_us(850.0), "850 µs");
        assert_eq!(fmt_us(3_100.0), "3.10 ms");
        assert_eq!(fmt_us(1_200_000.0), "1.20 s");
        assert_eq!(fmt_sig(7.4567), "7.46");
        assert_eq!(fmt_sig(0.33333), "0.333");
        assert_eq!(fmt_sig(123.4), "123");
    }

    #[test]
    fn renders_table_rows_for_every_case() {
        let mut cases = vec![
            case("ka", "node", true, vec![run(0, 100, 0.001)]),
            case("ka", "ours", false, vec![run(0, 200, 0.001)]),
            CaseResult {
                id: "ka/gone".into(),
                group: "ka".into(),
                label: "gone".into(),
                status: "not available: no route /x (404)".into(),
                ..CaseResult::default()
            },
        ];
        compute_ratios(&mut cases, Headline::Rps, 1);
        cases[1].peak_rss_mib = Some(12.5);
        let r = SuiteResult {
            suite: "hello".into(),
            headline: Some(Headline::Rps),
            cases,
            rounds: 1,
            ..SuiteResult::default()
        };
        let t = markdown_table(&r);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[0].starts_with("| group | server | req/s median"));
        assert!(lines[2].contains("1 (baseline)"));
        assert!(lines[3].contains("| 200 | 2.00 |"), "{}", lines[3]);
        assert!(lines[3].contains("12.5 MiB"));
        assert!(lines[4].contains("not available: no route /x (404)"));
        // Every row has as many cells as the header.
        let cells = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cells(l) == cells(lines[0])));
        let md = markdown(&r, Some("hello.svg"), "##");
        assert!(md.contains("![hello chart](hello.svg)"));
    }

    #[test]
    fn table_cells_stay_on_one_line() {
        assert_eq!(table_cell("failed: a\n  b | c"), "failed: a b \\| c");
        assert_eq!(table_cell(&"x".repeat(500)).chars().count(), 160);
    }

    #[test]
    fn benchmarks_sections_are_replaced_in_place() {
        let doc = "# Benchmarks\n\nintro\n";
        let one = update_benchmarks(doc, "hello", "hello v1");
        assert!(one.starts_with("# Benchmarks\n\nintro\n\n<!-- suite:hello:start -->\nhello v1\n"));
        let two = update_benchmarks(&one, "files", "files v1");
        let three = update_benchmarks(&two, "hello", "hello v2\n");
        assert!(three.contains("hello v2") && !three.contains("hello v1"));
        assert!(three.find("hello v2").unwrap() < three.find("files v1").unwrap());
        assert_eq!(three.matches("suite:hello:start").count(), 1);
    }
}
