//! `disconnect`: clients that give up after 50 ms on 1 s of work. Measures the backend work that
//! still ran to completion for nobody (wasted), with and without cancellation on disconnect.

use std::time::Duration;

use anyhow::Result;

use super::{ours_label, owned, CaseDef, Counter, LoadDef, Options, SuiteDef};
use crate::harness::report::{ChartMetric, Headline};
use crate::harness::servers::{Env, Kind, ServerSpec};

/// How long each request's work takes.
pub const WORK_MS: u32 = 1000;
/// When the client gives up.
pub const GIVE_UP_MS: u32 = 50;
/// Clients giving up concurrently.
pub const CLIENTS: u32 = 64;
/// The counter of `/sleep` work ours cancelled (client gone, deadline, shutdown), on its admin
/// `/metrics` (the case is "not available" until the example exports it).
pub const OURS_CANCELLED: &str = "demo_work_cancelled_total";

/// The suite.
pub fn define(_env: &Env, opts: &Options) -> Result<SuiteDef> {
    let ours = owned(&["--workers", "2"]);
    let servers = vec![
        ServerSpec::new("ours", &ours_label(&ours), Kind::Ours(ours)).metric(OURS_CANCELLED),
        ServerSpec::new(
            "axum-spawned",
            "axum, work in a spawned task (no abort signal)",
            Kind::Axum(Vec::new()),
        ),
        ServerSpec::new(
            "node",
            "Node http (no abort handling)",
            Kind::Node {
                workers: 0,
                root: None,
            },
        ),
    ];
    let run_for = opts.duration(Duration::from_secs(2), Duration::from_secs(5));
    let cases = servers
        .iter()
        .map(|s| CaseDef {
            group: format!("give up after {GIVE_UP_MS} ms"),
            server: s.id.clone(),
            baseline: s.id == "axum-spawned",
            load: LoadDef::Loadgen {
                path: match s.kind {
                    Kind::Axum(_) => format!("/spawned-sleep?ms={WORK_MS}"),
                    _ => format!("/sleep?ms={WORK_MS}"),
                },
                args: vec![
                    "abandon".into(),
                    "--concurrency".into(),
                    CLIENTS.to_string(),
                    "--give-up".into(),
                    format!("{GIVE_UP_MS}ms"),
                    "--duration".into(),
                    humantime::format_duration(run_for).to_string(),
                ],
            },
            counter: Some(match s.kind {
                Kind::Ours(_) => Counter::WastedFromCancelled {
                    metric: OURS_CANCELLED.into(),
                    work_ms: WORK_MS.into(),
                },
                Kind::Node { .. } => Counter::AdminJson("wasted_ms".into()),
                _ => Counter::MainJson("wasted_ms".into()),
            }),
            // Work started just before the end of the run finishes up to WORK_MS later, and our
            // workers report their counters to the admin endpoint once a second.
            settle: Duration::from_millis(u64::from(WORK_MS) + 1500),
        })
        .collect();
    Ok(SuiteDef {
        name: "disconnect".into(),
        title: format!("clients giving up after {GIVE_UP_MS} ms on {WORK_MS} ms of work"),
        about: format!(
            "{CLIENTS} clients each send `GET /sleep?ms={WORK_MS}` and close the connection after \
             {GIVE_UP_MS} ms, over and over. The counter is the work (ms) that ran to the end after \
             its client had gone; cancellation on disconnect should bring it near zero. Ours counts the \
             work it cancelled; every other abandoned request is counted as wasted for it, which \
             errs against ours. Baseline: axum with the work in a spawned task, which dropping \
             the handler does not stop."
        ),
        headline: Headline::Rps,
        counter_name: Some("wasted work ms".into()),
        show_success: false,
        chart: vec![ChartMetric::Counter],
        servers,
        cases,
        rounds: opts.rounds(1, 3),
        run_for,
        warmup: Duration::from_millis(300),
        load: format!(
            "loadgen abandon: {CLIENTS} clients, give up after {GIVE_UP_MS} ms, for {}",
            humantime::format_duration(run_for)
        ),
        tools: vec!["node", "rustc", "kernel"],
        notes: vec![],
        files: Vec::new(),
    })
}
