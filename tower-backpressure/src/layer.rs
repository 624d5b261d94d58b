//! The layers; they own the shared state.

use std::sync::Arc;

use tower_layer::Layer;

use crate::builder::{BackpressureBuilder, HttpPolicy};
use crate::handle::BackpressureHandle;
use crate::limiter::Limiter;
use crate::service::{Backpressure, TypedBackpressure};

/// What every HTTP service made by one layer shares.
#[derive(Debug)]
pub(crate) struct HttpShared {
    pub(crate) limiter: Limiter,
    pub(crate) policy: HttpPolicy,
    /// How much of a request the lock-free path must look at.
    pub(crate) fast: FastPath,
}

/// What a request needs before the lock-free path may admit it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FastPath {
    /// Nothing: no bypass, priority or deadline function, and no bytes to count.
    Blind,
    /// Only the bypass function (the common health-check setup), asked once.
    Bypass,
    /// A priority or deadline function, or byte counting: the locked path decides.
    Slow,
}

/// Applies [`Backpressure`] to HTTP services; see the [crate docs](crate) for semantics and
/// placement in axum.
///
/// The layer creates the shared state once. Every service it makes, however many times
/// and wherever axum applies it (per route, per connection, per request), and every clone
/// of the layer, shares one limit, one queue and one byte budget.
#[derive(Clone, Debug)]
pub struct BackpressureLayer {
    shared: Arc<HttpShared>,
}

impl BackpressureLayer {
    /// A layer admitting `max_in_flight` requests at once (at least 1) with every other
    /// setting at its default (see [`BackpressureBuilder`]).
    pub fn new(max_in_flight: usize) -> Self {
        Self::builder(max_in_flight).build()
    }

    /// Starts configuring a layer admitting `max_in_flight` requests at once.
    pub fn builder(max_in_flight: usize) -> BackpressureBuilder {
        BackpressureBuilder::new(max_in_flight)
    }

    pub(crate) fn from_parts(limiter: Limiter, policy: HttpPolicy) -> Self {
        let fast = if limiter.config().track_bytes
            || policy.priority.is_some()
            || policy.deadline.is_some()
        {
            FastPath::Slow
        } else if policy.bypass.is_some() {
            FastPath::Bypass
        } else {
            FastPath::Blind
        };
        BackpressureLayer {
            shared: Arc::new(HttpShared {
                limiter,
                policy,
                fast,
            }),
        }
    }

    /// A handle on the shared state: gauges, counters, resizing.
    pub fn handle(&self) -> BackpressureHandle {
        BackpressureHandle {
            limiter: self.shared.limiter.clone(),
        }
    }
}

impl<S> Layer<S> for BackpressureLayer {
    type Service = Backpressure<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Backpressure::from_shared(inner, self.shared.clone())
    }
}

/// Applies [`TypedBackpressure`] to services of any request type; build it with
/// [`BackpressureBuilder::build_typed`].
#[derive(Clone, Debug)]
pub struct TypedBackpressureLayer<C> {
    limiter: Limiter,
    classify: C,
}

impl<C> TypedBackpressureLayer<C> {
    pub(crate) fn from_parts(limiter: Limiter, classify: C) -> Self {
        TypedBackpressureLayer { limiter, classify }
    }

    /// A handle on the shared state: gauges, counters, resizing.
    pub fn handle(&self) -> BackpressureHandle {
        BackpressureHandle {
            limiter: self.limiter.clone(),
        }
    }
}

impl<S, C: Clone> Layer<S> for TypedBackpressureLayer<C> {
    type Service = TypedBackpressure<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        TypedBackpressure::from_parts(inner, self.limiter.clone(), self.classify.clone())
    }
}
