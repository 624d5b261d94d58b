//! `DefaultKey` never panics on any URI and headers, and its key is structured data: two
//! keys are equal exactly when their parts are (scheme and authority ignoring ASCII case;
//! path, query and the chosen headers' values exactly), and equal keys hash equal, also
//! when they differ in the case of the scheme or the authority.
#![no_main]

use std::hash::{DefaultHasher, Hash, Hasher};

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use tower_singleflight::{DefaultKey, KeyFn, RequestKey};

/// Headers the key is built from (the last two are chosen) and others it must ignore.
const NAMES: [&str; 5] = ["host", "accept", "x-other", "accept-language", "x-variant"];

#[derive(Debug, Arbitrary)]
struct Request {
    scheme: u8,
    authority: Option<String>,
    path: String,
    query: Option<String>,
    headers: Vec<(u8, Vec<u8>)>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    a: Request,
    b: Request,
    /// Compare `a` with a copy of itself whose scheme, authority and `Host` have their
    /// ASCII case flipped, instead of with `b`.
    twin: bool,
}

impl Request {
    fn uri(&self) -> Option<Uri> {
        let scheme =
            ["", "http://", "https://", "HTTP://", "foo+bar://"][usize::from(self.scheme % 5)];
        let mut uri = String::new();
        if let Some(authority) = self.authority.as_ref().filter(|_| !scheme.is_empty()) {
            uri.push_str(scheme);
            uri.push_str(authority);
        }
        if !self.path.starts_with('/') {
            uri.push('/');
        }
        uri.push_str(&self.path);
        if let Some(query) = &self.query {
            uri.push('?');
            uri.push_str(query);
        }
        uri.parse().ok()
    }

    fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let name = HeaderName::from_static(NAMES[usize::from(name % 5)]);
            if let Ok(value) = HeaderValue::from_bytes(value) {
                headers.append(name, value);
            }
        }
        headers
    }

    fn flip_case(&self) -> Request {
        let flip = |s: &str| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_lowercase() {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect::<String>()
        };
        Request {
            scheme: if self.scheme % 5 == 1 { 3 } else { self.scheme },
            authority: self.authority.as_deref().map(flip),
            path: self.path.clone(),
            query: self.query.clone(),
            headers: self
                .headers
                .iter()
                .map(|(name, value)| {
                    let mut value = value.clone();
                    if NAMES[usize::from(name % 5)] == "host" {
                        for byte in &mut value {
                            *byte = if byte.is_ascii_lowercase() {
                                byte.to_ascii_uppercase()
                            } else {
                                byte.to_ascii_lowercase()
                            };
                        }
                    }
                    (*name, value)
                })
                .collect(),
        }
    }
}

fn hash(key: &RequestKey) -> u64 {
    // Fixed keys, so equal keys must give equal values.
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// The parts of a key, normalised the way its equality is defined.
fn parts(key: &RequestKey) -> impl PartialEq + std::fmt::Debug + '_ {
    (
        key.scheme().map(|s| s.as_str().to_ascii_lowercase()),
        key.authority().map(|a| a.as_str().to_ascii_lowercase()),
        key.path(),
        key.query(),
        key.headers(),
    )
}

fuzz_target!(|input: Input| {
    let key_fn = DefaultKey::with_headers([
        HeaderName::from_static("accept-language"),
        HeaderName::from_static("x-variant"),
    ]);
    let key = |request: &Request| {
        let uri = request.uri()?;
        let headers = request.headers();
        let key = key_fn.key(&uri, &headers);
        // Deterministic, and the authority comes from the URI, else from `Host`.
        assert_eq!(key, key_fn.key(&uri, &headers));
        if let (Some(key), Some(authority)) = (&key, uri.authority()) {
            assert_eq!(key.authority(), Some(authority));
        }
        if let Some(key) = &key {
            assert_eq!(key.path(), uri.path());
            assert_eq!(key.query(), uri.query());
        }
        key
    };
    // An "authority" holding `/`, `?` or `#` spills into the path, whose case matters.
    let twin = input.twin
        && !input
            .a
            .authority
            .as_deref()
            .is_some_and(|a| a.contains(['/', '?', '#']));
    let b = if twin { input.a.flip_case() } else { input.b };
    let (Some(ka), Some(kb)) = (key(&input.a), key(&b)) else {
        return;
    };
    assert_eq!(ka == kb, parts(&ka) == parts(&kb), "{ka:?} vs {kb:?}");
    if ka == kb {
        assert_eq!(hash(&ka), hash(&kb), "{ka:?} vs {kb:?}");
    }
    if twin {
        assert_eq!(ka, kb, "case of scheme or authority changed the key");
    }
});
