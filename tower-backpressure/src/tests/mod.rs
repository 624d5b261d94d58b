//! Loom models of the queue (run with `RUSTFLAGS="--cfg loom" cargo test --lib --release -- loom`).

mod loom_queue;
