//! Loom models of the queue and the channel body (run with
//! `RUSTFLAGS="--cfg loom" cargo test --lib --release -- loom`).

mod loom_channel;
mod loom_queue;
