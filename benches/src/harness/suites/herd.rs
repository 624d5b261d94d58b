//! `herd`: 500 concurrent identical requests to a 200 ms backend, repeated. Counts backend calls
//! (how many times the expensive work ran) and latency, with and without single-flight.

use std::time::Duration;

use anyhow::Result;

use super::{ours_label, owned, CaseDef, Counter, LoadDef, Options, SuiteDef};
use crate::harness::report::{ChartMetric, Headline};
use crate::harness::servers::{Env, Kind, ServerSpec};

/// Concurrent identical requests per burst.
pub const CONCURRENCY: u32 = 500;
/// The backend's latency.
pub const BACKEND_MS: u32 = 200;
/// The counter of backend calls ours exports on the admin `/metrics`.
pub const OURS_BACKEND_CALLS: &str = "demo_backend_calls_total";
/// The flag that turns single-flight off in ours (the case is "not available" until it exists).
pub const OURS_NO_SINGLEFLIGHT: &str = "--no-singleflight";

/// The suite.
pub fn define(_env: &Env, opts: &Options) -> Result<SuiteDef> {
    let path = format!("/expensive/herd?ms={BACKEND_MS}");
    let probe = "/expensive/probe?ms=1";
    let sf = owned(&["--workers", "2"]);
    let nosf = owned(&["--workers", "2", OURS_NO_SINGLEFLIGHT]);
    let servers = vec![
        ServerSpec::new("ours", &ours_label(&sf), Kind::Ours(sf))
            .route(probe)
            .metric(OURS_BACKEND_CALLS),
        ServerSpec::new("ours-no-sf", &ours_label(&nosf), Kind::Ours(nosf))
            .flags(&[OURS_NO_SINGLEFLIGHT])
            .route(probe)
            .metric(OURS_BACKEND_CALLS),
        ServerSpec::new("axum", "axum 0.8, no single-flight", Kind::Axum(Vec::new())),
        ServerSpec::new(
            "node",
            "Node http, in-process single-flight",
            Kind::Node {
                workers: 0,
                root: None,
            },
        ),
        ServerSpec::new(
            "node-cluster",
            "Node cluster (2 workers), single-flight per worker",
            Kind::Node {
                workers: 2,
                root: None,
            },
        ),
    ];
    let bursts = if opts.quick { 2 } else { 5 };
    let cases = servers
        .iter()
        .map(|s| CaseDef {
            group: format!("{CONCURRENCY} × {BACKEND_MS} ms"),
            server: s.id.clone(),
            baseline: s.id == "axum",
            load: LoadDef::Loadgen {
                path: path.clone(),
                args: vec![
                    "burst".into(),
                    "--concurrency".into(),
                    CONCURRENCY.to_string(),
                    "--bursts".into(),
                    bursts.to_string(),
                    "--pause".into(),
                    "100ms".into(),
                ],
            },
            counter: Some(match s.kind {
                Kind::Ours(_) => Counter::AdminPrometheus(OURS_BACKEND_CALLS.into()),
                Kind::Node { .. } => Counter::AdminJson("backend_calls".into()),
                _ => Counter::MainJson("backend_calls".into()),
            }),
            // Our workers report their counters to the admin endpoint once a second.
            settle: Duration::from_millis(1500),
        })
        .collect();
    Ok(SuiteDef {
        name: "herd".into(),
        title: format!("thundering herd: {CONCURRENCY} identical requests to a {BACKEND_MS} ms backend"),
        about: format!(
            "Bursts of {CONCURRENCY} concurrent `GET {path}` (one key). The counter is how many times \
             the backend ran per run of {bursts} bursts: {bursts} is perfect coalescing, \
             {} is none. Baseline: axum without single-flight.",
            bursts * CONCURRENCY as usize
        ),
        headline: Headline::Rps,
        counter_name: Some("backend calls".into()),
        show_success: true,
        chart: vec![ChartMetric::Counter, ChartMetric::P99],
        servers,
        cases,
        rounds: opts.rounds(3, 5),
        // Each burst lasts about one backend call; bursts are 100 ms apart.
        run_for: Duration::from_millis(bursts as u64 * (u64::from(BACKEND_MS) + 100)),
        warmup: Duration::from_millis(300),
        load: format!("loadgen burst: {bursts} bursts of {CONCURRENCY} concurrent requests, 100 ms apart"),
        tools: vec!["node", "rustc", "kernel"],
        notes: vec![],
        files: Vec::new(),
    })
}
