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
        // An empty path is `/` (RFC 9110 section 4.2.3); `PathAndQuery` reports it so,
        // but compares its raw bytes.
        let path_and_query = uri.path_and_query().map(|pq| match pq.as_str() {
            "/" => PathAndQuery::from_static("/"),
            _ => pq.clone(),
        });
        Some(RequestKey {
            scheme: uri.scheme().cloned(),
            authority,
            path_and_query,
            headers: chosen,
        })
    }
}

/// The key [`DefaultKey`] computes. Authorities compare case-insensitively; paths and
/// queries exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// Hashes like the derived impl would, consistently with the derived `PartialEq`, but feeds
/// the hasher a few large writes instead of one per byte of the authority (http's
/// `Authority` hashes byte by byte to fold case, which costs far more than the rest of a
/// request's key with a keyed SipHash).
impl Hash for RequestKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.scheme.hash(state);
        match &self.authority {
            None => state.write_u8(0),
            Some(authority) => {
                state.write_u8(1);
                // `Authority`'s `PartialEq` ignores ASCII case: hash the lowercase form.
                write_lowercase(authority.as_str().as_bytes(), state);
            }
        }
        self.path_and_query
            .as_ref()
            .map(PathAndQuery::as_str)
            .hash(state);
        self.headers.hash(state);
    }
}

/// Writes `bytes` lowercased, with their length first (so that keys stay prefix-free), a
/// stack buffer's worth at a time.
fn write_lowercase<H: Hasher>(bytes: &[u8], state: &mut H) {
    state.write_usize(bytes.len());
    let mut buf = [0u8; 64];
    for chunk in bytes.chunks(buf.len()) {
        let buf = &mut buf[..chunk.len()];
        buf.copy_from_slice(chunk);
        buf.make_ascii_lowercase();
        state.write(buf);
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

#[cfg(test)]
mod tests {
    use std::hash::DefaultHasher;

    use super::*;

    fn hash_of<T: Hash>(value: &T) -> u64 {
        let mut hasher = DefaultHasher::new();
        value.hash(&mut hasher);
        hasher.finish()
    }

    fn key_of(uri: &str, host: Option<&str>) -> RequestKey {
        let mut headers = HeaderMap::new();
        if let Some(host) = host {
            headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        DefaultKey::new()
            .key(&uri.parse().unwrap(), &headers)
            .unwrap()
    }

    #[test]
    fn equal_keys_hash_equal_whatever_the_authoritys_case() {
        // Longer than the 64-byte buffer, so several chunks are lowercased and written.
        let host = format!("{}.Example.COM:8080", "Sub".repeat(40));
        let a = key_of("/p?q=1", Some(&host));
        let b = key_of("/p?q=1", Some(&host.to_ascii_lowercase()));
        assert_eq!(a, b);
        assert_eq!(hash_of(&a), hash_of(&b));
        let c = key_of(&format!("http://{host}/p?q=1"), None);
        let d = key_of(&format!("HTTP://{}/p?q=1", host.to_ascii_uppercase()), None);
        assert_eq!(c, d);
        assert_eq!(hash_of(&c), hash_of(&d));
    }

    #[test]
    fn an_empty_path_is_the_same_resource_as_slash() {
        // Found by the `default_key` fuzz target: `https://a#f` has an empty path, which
        // `path()` reports as `/`, but keys compared the raw bytes, so it was not the
        // same key as `https://a/`.
        let bare = key_of("http://example.com", None);
        let slash = key_of("http://example.com/", None);
        assert_eq!(bare.path(), slash.path());
        assert_eq!(bare, slash);
        assert_eq!(hash_of(&bare), hash_of(&slash));
        assert_ne!(bare, key_of("http://example.com/?", None));
        // A fragment right after the authority leaves the path empty.
        let fragment = key_of("https://a#A/", None);
        let plain = key_of("https://A/", None);
        assert_eq!(fragment, plain);
        assert_eq!(hash_of(&fragment), hash_of(&plain));
    }

    #[test]
    fn keys_differing_in_any_part_differ() {
        let base = key_of("/p?q=1", Some("example.com"));
        for other in [
            key_of("/p?q=2", Some("example.com")),
            key_of("/P?q=1", Some("example.com")),
            key_of("/p", Some("example.com")),
            key_of("/p?q=1", Some("example.org")),
            key_of("/p?q=1", None),
            key_of("https://example.com/p?q=1", None),
        ] {
            assert_ne!(base, other);
            assert_ne!(hash_of(&base), hash_of(&other), "{other:?}");
        }
    }
}
