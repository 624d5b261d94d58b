//! Benchmarks of the tower-scale crates: criterion micro-benchmarks in `benches/` and the
//! side-by-side comparison harness. See `README.md`.
