//! `overload`: an open-loop load at 3× capacity against `/sleep`. A fixed arrival rate, latency
//! measured from each request's intended send time, so queueing shows up instead of being hidden
//! by a client that waits (coordinated omission).

use std::time::Duration;

use anyhow::Result;

use super::{ours_label, owned, CaseDef, LoadDef, Options, SuiteDef};
use crate::harness::report::{ChartMetric, Headline};
use crate::harness::servers::{Env, Kind, ServerSpec};

/// Requests allowed in flight (the capacity of the stand-in backend).
pub const LIMIT: u32 = 64;
/// Backend latency.
pub const SLEEP_MS: u32 = 50;
/// Arrival rate as a multiple of capacity.
pub const OVERLOAD: u32 = 3;

/// Capacity in requests per second: `LIMIT` slots each busy for `SLEEP_MS`.
pub const fn capacity_rps() -> u32 {
    LIMIT * 1000 / SLEEP_MS
}

/// The suite.
pub fn define(_env: &Env, opts: &Options) -> Result<SuiteDef> {
    let per_worker = (LIMIT / 2).to_string();
    let ours = vec![
        "--workers".to_string(),
        "2".into(),
        "--max-in-flight".into(),
        per_worker.clone(),
        "--max-queued".into(),
        per_worker,
        "--queue-timeout".into(),
        "100ms".into(),
    ];
    let limit = LIMIT.to_string();
    let servers = vec![
        ServerSpec::new("ours", &ours_label(&ours), Kind::Ours(ours)).flags(&[
            "--max-in-flight",
            "--max-queued",
            "--queue-timeout",
        ]),
        ServerSpec::new(
            "tower-limit",
            &format!("axum + tower ConcurrencyLimit({LIMIT})"),
            Kind::Axum(owned(&["--concurrency-limit", &limit])),
        ),
        ServerSpec::new(
            "tower-shed",
            &format!("axum + tower LoadShed + ConcurrencyLimit({LIMIT})"),
            Kind::Axum(owned(&["--concurrency-limit", &limit, "--load-shed"])),
        ),
        ServerSpec::new("no-limit", "axum, no limit", Kind::Axum(Vec::new())),
    ];
    let run_for = opts.duration(Duration::from_secs(3), Duration::from_secs(10));
    let rate = capacity_rps() * OVERLOAD;
    let cases = servers
        .iter()
        .map(|s| CaseDef {
            group: format!("{rate} req/s"),
            server: s.id.clone(),
            baseline: s.id == "tower-limit",
            load: LoadDef::open_loop(
                format!("/sleep?ms={SLEEP_MS}"),
                rate,
                run_for,
                "5s",
                &["--max-connections", "8000"],
            ),
            counter: None,
            settle: Duration::ZERO,
        })
        .collect();
    Ok(SuiteDef {
        name: "overload".into(),
        title: format!("open-loop overload: {OVERLOAD}× capacity on /sleep?ms={SLEEP_MS}"),
        about: format!(
            "A fixed arrival rate of {rate} req/s ({OVERLOAD}× the capacity of {LIMIT} slots × \
             {SLEEP_MS} ms = {} req/s), each latency measured from the request's intended send \
             time. p50/p99 are of 2xx answers only; a request not answered within 5 s counts as a \
             timeout. With a limit but no shedding the queue grows for the whole run; with no \
             limit everything is admitted (a `/sleep` costs no CPU, so it shows memory, not \
             collapse). Baseline: tower `ConcurrencyLimit`.",
            capacity_rps()
        ),
        headline: Headline::Rps,
        counter_name: None,
        show_success: true,
        chart: vec![
            ChartMetric::SuccessPct,
            ChartMetric::P99,
            ChartMetric::PeakRss,
        ],
        servers,
        cases,
        rounds: opts.rounds(1, 3),
        run_for,
        warmup: Duration::from_millis(500),
        load: format!(
            "loadgen open: {rate} req/s for {}, up to 8000 connections, 5 s timeout",
            humantime::format_duration(run_for)
        ),
        tools: vec!["rustc", "kernel"],
        notes: vec![],
        files: Vec::new(),
    })
}
