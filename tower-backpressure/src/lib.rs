//! A shared concurrency limit with a bounded queue and load shedding for tower services.
//!
//! DOCS_PLACEHOLDER

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]

mod acquire;
pub mod adaptive;
mod body;
mod builder;
mod channel;
mod classify;
pub mod error;
pub mod future;
mod handle;
mod layer;
mod limiter;
mod order;
mod service;
mod stats;
mod sync;

#[cfg(all(test, loom))]
mod tests;

pub use adaptive::{Aimd, Gradient, LimitStrategy, Outcome};
pub use body::{BodyMeter, MeteredBody, ResponseBody};
pub use builder::{BackpressureBuilder, PermitRelease};
pub use channel::{channel_body, BodySender, ChannelBody, Closed, TrySendError};
pub use classify::{Classify, DefaultClassify, RequestClass, RequestHead};
pub use error::{BudgetExceeded, Overloaded, ShedReason};
pub use handle::BackpressureHandle;
pub use layer::{BackpressureLayer, TypedBackpressureLayer};
pub use order::{Priority, QueueOrder};
pub use service::{Backpressure, TypedBackpressure};
pub use stats::Summary;

/// The boxed error type of [`TypedBackpressure`], as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
