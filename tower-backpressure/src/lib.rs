//! A shared concurrency limit with a bounded queue and load shedding for tower services.
//!
//! Requests beyond the limit wait in a bounded queue; beyond that, or past their queue
//! timeout, they are shed at once with `503 Service Unavailable` and `Retry-After`. Permits
//! are held until the response body ends, so memory stays bounded under any overload.
//!
//! This crate is being built; its API lands with its tracking issue. See the
//! [workspace README](https://github.com/tower-scale/tower-scale) for the plan.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]
