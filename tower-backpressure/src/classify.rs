//! Reading what the limiter needs from a request: bypass, priority, deadline, bytes.

use http::{Extensions, HeaderMap, Method, Request, Uri, Version};
use tokio::time::Instant;

use crate::order::Priority;

/// A borrowed view of an HTTP request's head, given to the bypass, priority and deadline
/// functions of [`BackpressureBuilder`](crate::BackpressureBuilder).
///
/// It exists so those functions can be plain closures that work for every body type.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    version: Version,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
}

impl<'a> RequestHead<'a> {
    /// Borrows the head of `request`.
    pub fn new<B>(request: &'a Request<B>) -> Self {
        RequestHead {
            method: request.method(),
            uri: request.uri(),
            version: request.version(),
            headers: request.headers(),
            extensions: request.extensions(),
        }
    }

    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The request headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The request extensions (where a cancellation or deadline signal usually lives).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
}

/// How a [`TypedBackpressure`](crate::TypedBackpressure) service treats one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestClass {
    /// Never limited, queued or shed.
    pub bypass: bool,
    /// Priority class.
    pub priority: Priority,
    /// When the caller stops waiting; a request that cannot be served before it is shed
    /// with [`ShedReason::DeadlineUnreachable`](crate::ShedReason::DeadlineUnreachable).
    pub deadline: Option<Instant>,
    /// Bytes to reserve against the byte budget.
    pub bytes: u64,
}

impl RequestClass {
    /// A normal-priority request with no deadline and no bytes.
    pub const fn normal() -> Self {
        RequestClass {
            bypass: false,
            priority: Priority::Normal,
            deadline: None,
            bytes: 0,
        }
    }

    /// A request that skips the limiter entirely.
    pub const fn bypass() -> Self {
        RequestClass {
            bypass: true,
            ..RequestClass::normal()
        }
    }

    /// Sets the priority class.
    pub const fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the caller's deadline.
    pub const fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the bytes to reserve.
    pub const fn with_bytes(mut self, bytes: u64) -> Self {
        self.bytes = bytes;
        self
    }
}

/// Classifies requests for [`TypedBackpressure`](crate::TypedBackpressure).
///
/// Implemented for [`DefaultClassify`] (every request normal) and for any
/// `Fn(&Req) -> RequestClass`.
pub trait Classify<Req> {
    /// How to treat `request`.
    fn classify(&self, request: &Req) -> RequestClass;
}

/// Treats every request as [`RequestClass::normal`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultClassify;

impl<Req> Classify<Req> for DefaultClassify {
    fn classify(&self, _: &Req) -> RequestClass {
        RequestClass::normal()
    }
}

impl<Req, F> Classify<Req> for F
where
    F: Fn(&Req) -> RequestClass,
{
    fn classify(&self, request: &Req) -> RequestClass {
        self(request)
    }
}
