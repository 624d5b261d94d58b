//! Request coalescing for tower services.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]

mod body;
pub mod error;
mod flight;
pub mod future;
mod group;
mod key;
mod layer;
mod service;
mod share;
mod stats;
mod sync;

#[cfg(all(test, loom))]
mod loom_tests;

pub use crate::body::SingleflightBody;
pub use crate::error::FlightError;
pub use crate::group::{Group, GroupBuilder, OverflowPolicy, Role, Run};
pub use crate::key::{DefaultKey, KeyFn, RequestKey};
pub use crate::layer::{
    CredentialPolicy, ErrorPolicy, HeaderPolicy, SingleflightLayer, WaitTimeoutPolicy,
    DEFAULT_LAG_TIMEOUT, DEFAULT_MAX_SHARED_BODY,
};
pub use crate::service::Singleflight;
pub use crate::stats::{BypassReason, Stats};
