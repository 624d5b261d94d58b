//! The side-by-side comparison harness behind the `compare` binary.
//!
//! It starts our `cluster` server and the peers of `benches/peers/` on free loopback ports, drives
//! them with a load generator (wrk, curl, or our own open-loop `loadgen`), samples each server's
//! CPU time and peak memory from `/proc`, and writes the results as Markdown, JSON and SVG.
//!
//! The modules with no side effects ([`stats`], [`procfs`] parsing, [`ports`], [`report`],
//! [`load`] output parsing) are unit-tested; the rest is exercised by running a suite.

pub mod chart;
pub mod load;
pub mod ports;
pub mod probe;
pub mod process;
pub mod procfs;
pub mod report;
pub mod servers;
pub mod stats;
pub mod suites;
pub mod tools;
