//! `cluster`: a clustered HTTP server, our answer to Node's `cluster` module.
//!
//! See `README.md` next to this crate for the process model, the flags and the
//! measurements. Module map:
//!
//! - [`cli`]: flags and environment variables;
//! - [`supervisor`]: worker processes, restarts, signals, cluster metrics;
//! - [`worker`]: a serving process (a supervisor's worker, or `--workers 0`);
//! - [`server`]: listeners, accept loop, staged drain, admin server;
//! - [`conn`]: one connection: HTTP/1.1 + HTTP/2, header/idle timeouts, max requests;
//! - [`routes`]: the application and the one place its tower stack is built;
//! - [`strict`]: `400` for requests hyper accepts but another hop could read differently,
//!   `413` for a declared body over `--max-body-size`;
//! - [`upload`]: `POST /upload`, the route that reads bodies (under `--max-body-size`);
//! - [`metrics`]: per-worker registry and the supervisor's sum over workers;
//! - [`control`]: the supervisor <-> worker control channel;
//! - [`limits`]: the file-descriptor limit and the connection cap;
//! - [`fds`]: taking ownership of inherited descriptors (the only `unsafe`).

#![deny(unsafe_code)]

mod cli;
mod conn;
mod control;
mod fds;
mod limits;
mod metrics;
mod routes;
mod server;
mod strict;
mod supervisor;
mod upload;
mod worker;

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = cli::Cli::parse();
    let worker = cli.internal_worker;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Before anything opens descriptors in earnest; workers inherit the raised limit.
    let nofile = limits::raise_nofile_limit();
    tracing::debug!(?nofile, "RLIMIT_NOFILE");

    let result = match worker {
        Some(args) => {
            let span = tracing::info_span!("worker", slot = args.slot, pid = std::process::id());
            let _enter = span.enter();
            worker::run_child(cli, args).map(|()| 0)
        }
        None => match cli.worker_count() {
            0 => worker::run_standalone(cli).map(|()| 0),
            n => supervisor::run(cli, n),
        },
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::exit(1);
        }
    }
}
