//! Request coalescing for tower services.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]

pub mod error;
mod flight;
mod group;
mod sync;

#[cfg(all(test, loom))]
mod loom_tests;

pub use crate::error::FlightError;
pub use crate::group::{Group, GroupBuilder, OverflowPolicy, Role, Run};
