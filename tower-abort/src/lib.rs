//! A per-request cancellation signal for tower services, like the web's `AbortSignal`.
//!
//! The signal fires exactly once, with a reason, when the client goes away, a deadline
//! passes or the server shuts down; handlers, the work they spawn and their outgoing calls
//! observe it.
//!
//! This crate is being built; its API lands with its tracking issue. See the
//! [workspace README](https://github.com/tower-scale/tower-scale) for the plan.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]
