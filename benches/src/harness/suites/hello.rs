//! `hello`: `GET /` answering `Hello, World!`, keep-alive and `Connection: close`, 64 connections.
//!
//! The per-request cost of the server itself: accept, parse, route, the layers, respond. On a
//! 2-core loopback machine wrk needs about one core, so every fast server saturates the client at
//! a similar req/s; server CPU per request and p99 are what separate them.

use std::time::Duration;

use anyhow::Result;

use super::{ours_label, owned, CaseDef, LoadDef, Options, SuiteDef};
use crate::harness::report::{ChartMetric, Headline};
use crate::harness::servers::{Env, Kind, ServerSpec};

/// Flags ours runs with in this suite (our example turns its layers on by default).
pub const OURS_ARGS: [&str; 2] = ["--workers", "2"];

/// The stock-tower stack of the axum peer: shed when 1024 requests are in flight, 30 s timeout.
pub const AXUM_ARGS: [&str; 5] = [
    "--concurrency-limit",
    "1024",
    "--load-shed",
    "--timeout",
    "30s",
];

/// Connections wrk keeps open.
pub const CONNECTIONS: u32 = 64;

/// The suite.
pub fn define(_env: &Env, opts: &Options) -> Result<SuiteDef> {
    let ours_args = owned(&OURS_ARGS);
    let servers: Vec<ServerSpec> = vec![
        ServerSpec::new("ours", &ours_label(&ours_args), Kind::Ours(ours_args)).flags(&[
            "--workers",
            "--listen",
            "--admin",
        ]),
        ServerSpec::new("hyper", "bare hyper 1 + service_fn", Kind::Hyper),
        ServerSpec::new(
            "axum",
            "axum 0.8 + tower LoadShed + ConcurrencyLimit(1024) + Timeout(30s)",
            Kind::Axum(owned(&AXUM_ARGS)),
        ),
        ServerSpec::new(
            "node",
            "Node http, 1 process",
            Kind::Node {
                workers: 0,
                root: None,
            },
        ),
        ServerSpec::new(
            "node-cluster",
            "Node cluster, 2 workers",
            Kind::Node {
                workers: 2,
                root: None,
            },
        ),
    ]
    .into_iter()
    .map(|s| s.expect("/", "Hello, World!"))
    .collect();
    let mut cases = Vec::new();
    for (group, close) in [("keep-alive", false), ("close", true)] {
        for s in &servers {
            cases.push(CaseDef {
                group: group.into(),
                server: s.id.clone(),
                baseline: s.id == "node",
                load: LoadDef::Wrk {
                    path: "/".into(),
                    connections: CONNECTIONS,
                    close,
                },
                counter: None,
                settle: Duration::ZERO,
            });
        }
    }
    let run_for = opts.duration(Duration::from_secs(1), Duration::from_secs(3));
    Ok(SuiteDef {
        name: "hello".into(),
        title: "hello world, keep-alive and Connection: close, 64 connections".into(),
        about: "`GET /` → `Hello, World!`: the fixed cost a server adds to every request (accept, \
                parse, route, layers, respond). Baseline: Node's `http` module, one process. \
                Ratios are computed round by round against the baseline of the same group."
            .into(),
        headline: Headline::Rps,
        counter_name: None,
        show_success: false,
        chart: vec![ChartMetric::Headline, ChartMetric::CpuPerUnit, ChartMetric::P99],
        servers,
        cases,
        rounds: opts.rounds(3, 10),
        run_for,
        warmup: opts.duration(Duration::from_millis(500), Duration::from_secs(2)).min(run_for),
        load: format!(
            "wrk {CONNECTIONS} connections for {}, `Connection: close` sent as a header in the close group",
            humantime::format_duration(run_for)
        ),
        tools: vec!["wrk", "node", "rustc", "kernel"],
        notes: vec![
            "The machine is shared (other builds may run during the measurement): absolute numbers \
             drift 10–25% between runs; quote the ratios, which pair runs made back to back."
                .into(),
        ],
        files: Vec::new(),
    })
}
