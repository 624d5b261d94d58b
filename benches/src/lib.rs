//! Benchmarks of the tower-scale crates: criterion micro-benchmarks in `benches/` and the
//! side-by-side comparison harness in [`harness`], started with
//! `cargo run --release -p benches --bin compare -- <suite>`. See `README.md`.

pub mod harness;
