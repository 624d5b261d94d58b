//! Request coalescing for tower services.
//!
//! Concurrent identical requests run the inner service once and every waiter gets the
//! result, streamed as it arrives. Safe by default: a response that belongs to one user is
//! never shared with another. A runtime-agnostic core works without HTTP too.
//!
//! This crate is being built; its API lands with its tracking issue. See the
//! [workspace README](https://github.com/tower-scale/tower-scale) for the plan.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]
