#![doc = include_str!("docs.md")]
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]

mod body;
mod cache;
mod conditional;
#[cfg(feature = "axum")]
mod listener;
#[cfg(target_os = "linux")]
mod mapping;
mod mark;
pub mod path;
pub mod range;
#[cfg(target_os = "linux")]
mod registry;
mod serve;
mod stream;
mod sys;

pub use body::{
    live_mappings, warmed_bytes, FileBody, DEFAULT_MAP_WINDOW, DEFAULT_READ_CHUNK,
    DEFAULT_RESIDENCY_RECHECK,
};
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use listener::{MakeFuture, SendfileListener, WithSendfile};
pub use mark::MarkSendfile;
pub use serve::{
    ResponseFuture, ServeDir, ServeFile, SymlinkPolicy, DEFAULT_MAX_RANGES,
    DEFAULT_SENDFILE_MIN_LEN,
};
pub use stream::{
    SendfileCapability, SendfileSocket, SendfileStats, SendfileStream, DEFAULT_DRAIN_POLL_MAX,
    DEFAULT_MAX_CHUNK, DEFAULT_MAX_COPIED_TAIL,
};
