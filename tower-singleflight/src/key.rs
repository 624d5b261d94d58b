//! Flight keys: structured data, never a delimited string or a sum of hashes.

use std::{
    fmt,
    hash::{BuildHasher, Hash, Hasher, RandomState},
    sync::Arc,
};

use http::{
    header::{self, HeaderName},
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, HeaderValue, Uri,
};

/// Computes the part of a flight key that identifies the resource.
///
/// The layer always adds to it what safety needs: whether the request is `HEAD`, the
/// credential partition, and the `Range`/conditional headers when those are keyed. A key
/// function can therefore only merge requests for what it considers the same resource; it
/// cannot merge two users or a `GET` with a `HEAD`.
///
/// Implemented by [`DefaultKey`] and by closures `Fn(&Uri, &HeaderMap) -> Option<K>`. Returning
/// `None` makes the request bypass ([`BypassReason::NoKey`](crate::BypassReason::NoKey)).
pub trait KeyFn {
    /// The key type.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// The key of a request, or `None` to bypass coalescing for it.
    fn key(&self, uri: &Uri, headers: &HeaderMap) -> Option<Self::Key>;
}

impl<F, K> KeyFn for F
where
    F: Fn(&Uri, &HeaderMap) -> Option<K>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;

    fn key(&self, uri: &Uri, headers: &HeaderMap) -> Option<K> {
        self(uri, headers)
    }
}

/// The default key: scheme, authority (from the URI or else `Host`), path, query, and the
/// values of the headers chosen with [`DefaultKey::with_headers`].
#[derive(Clone, Default)]
pub struct DefaultKey {
    headers: Arc<[HeaderName]>,
}

impl fmt::Debug for DefaultKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DefaultKey")
            .field("headers", &self.headers)
            .finish()
    }
}

impl DefaultKey {
    /// Scheme, authority, path and query only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also key on these request headers (say `accept-encoding` or `accept-language` when
    /// the inner service varies on them): requests coalesce only if their values are equal.
    pub fn with_headers<I>(headers: I) -> Self
    where
        I: IntoIterator<Item = HeaderName>,
    {
        Self {
            headers: headers.into_iter().collect(),
        }
    }
}

impl KeyFn for DefaultKey {
    type Key = RequestKey;

    fn key(&self, uri: &Uri, headers: &HeaderMap) -> Option<RequestKey> {
        let authority = match uri.authority() {
            Some(authority) => Some(authority.clone()),
            None => match headers.get(header::HOST) {
                // An unparsable Host is not guessed at: such requests do not coalesce.
                Some(host) => Some(Authority::try_from(host.as_bytes()).ok()?),
                None => None,
            },
        };
        let chosen = self
            .headers
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    headers.get_all(name).iter().cloned().collect(),
                )
            })
            .collect();
        Some(RequestKey {
            scheme: uri.scheme().cloned(),
            authority,
            path_and_query: uri.path_and_query().cloned(),
            headers: chosen,
        })
    }
}

/// The key [`DefaultKey`] computes. Authorities compare case-insensitively; paths and
/// queries exactly.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestKey {
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    path_and_query: Option<PathAndQuery>,
    headers: Vec<(HeaderName, Vec<HeaderValue>)>,
}

impl RequestKey {
    /// The scheme, when the request URI has one.
    pub fn scheme(&self) -> Option<&Scheme> {
        self.scheme.as_ref()
    }
    /// The authority, from the URI or the `Host` header.
    pub fn authority(&self) -> Option<&Authority> {
        self.authority.as_ref()
    }
    /// The path.
    pub fn path(&self) -> &str {
        self.path_and_query.as_ref().map_or("/", PathAndQuery::path)
    }
    /// The query, without `?`.
    pub fn query(&self) -> Option<&str> {
        self.path_and_query.as_ref().and_then(PathAndQuery::query)
    }
    /// The chosen headers and their values.
    pub fn headers(&self) -> &[(HeaderName, Vec<HeaderValue>)] {
        &self.headers
    }
}

/// The full key of a flight: what the layer adds for safety, and the resource key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FlightKey<K> {
    pub(crate) head: bool,
    pub(crate) credentials: Option<CredentialHash>,
    pub(crate) conditional: Vec<(HeaderName, HeaderValue)>,
    pub(crate) resource: K,
}

/// A 128-bit keyed hash of a request's `Authorization` and `Cookie` values. The keys are
/// random per layer, so nobody can craft a collision, and credentials are never stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CredentialHash([u64; 2]);

pub(crate) struct CredentialHasher([RandomState; 2]);

impl CredentialHasher {
    pub(crate) fn new() -> Self {
        Self([RandomState::new(), RandomState::new()])
    }

    pub(crate) fn hash(&self, headers: &HeaderMap) -> CredentialHash {
        let one = |state: &RandomState| {
            let mut h = state.build_hasher();
            for name in [header::AUTHORIZATION, header::COOKIE] {
                let values = headers.get_all(&name);
                h.write_usize(values.iter().count());
                for value in values {
                    h.write(value.as_bytes());
                    h.write_usize(value.len());
                }
            }
            h.finish()
        };
        CredentialHash([one(&self.0[0]), one(&self.0[1])])
    }
}

impl fmt::Debug for CredentialHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialHasher")
    }
}
