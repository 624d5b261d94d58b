//! File bodies that go out through `sendfile(2)` under hyper, and a static-file service.
//!
//! On Linux over plaintext HTTP/1 the file's bytes never enter user space; everywhere else a
//! portable path reads straight into large buffers. The static-file service implements
//! ranges, preconditions and precompressed variants with path confinement.
//!
//! This crate is being built; its API lands with its tracking issue. See the
//! [workspace README](https://github.com/tower-scale/tower-scale) for the plan.

#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]
