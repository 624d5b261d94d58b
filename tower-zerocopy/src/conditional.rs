//! Validators and RFC 9110 §13.2.2 precondition evaluation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, HeaderValue, Method};

/// The validators of one file version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Validators {
    /// Strong entity tag, quoted: `"<ino>-<len>-<mtime ns>"` in hex.
    pub(crate) etag: HeaderValue,
    /// Modification time truncated to whole seconds (HTTP-date precision).
    pub(crate) last_modified: Option<SystemTime>,
    /// `Last-Modified` header value.
    pub(crate) last_modified_header: Option<HeaderValue>,
}

impl Validators {
    pub(crate) fn new(ino: u64, len: u64, mtime: Option<SystemTime>, tag: &str) -> Self {
        let nanos = mtime
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let etag = HeaderValue::from_str(&format!("\"{ino:x}-{len:x}-{nanos:x}{tag}\""))
            .expect("hex digits and dashes form a valid header value");
        let last_modified = mtime
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| UNIX_EPOCH + Duration::from_secs(d.as_secs()));
        let last_modified_header = last_modified.map(|t| {
            HeaderValue::from_str(&httpdate::fmt_http_date(t)).expect("HTTP-date is ASCII")
        });
        Validators {
            etag,
            last_modified,
            last_modified_header,
        }
    }
}

/// The result of evaluating preconditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Precondition {
    /// Proceed with the request.
    Proceed,
    /// `304 Not Modified`.
    NotModified,
    /// `412 Precondition Failed`.
    Failed,
}

/// RFC 9110 §13.2.2 steps 1–4 for a `GET`/`HEAD`.
pub(crate) fn evaluate(method: &Method, headers: &HeaderMap, v: &Validators) -> Precondition {
    // Most requests carry no precondition: one pass over the few names a request has costs
    // less than four hashed lookups. (Names are stored lower-case.)
    if !headers.keys().any(|name| name.as_str().starts_with("if-")) {
        return Precondition::Proceed;
    }
    // Step 1 / 2.
    if let Some(im) = list_header(headers, header::IF_MATCH) {
        if !etag_list_matches(&im, &v.etag, true) {
            return Precondition::Failed;
        }
    } else if let Some(since) = date_header(headers, header::IF_UNMODIFIED_SINCE) {
        match v.last_modified {
            Some(lm) if lm <= since => {}
            _ => return Precondition::Failed,
        }
    }
    // Step 3 / 4.
    let safe = method == Method::GET || method == Method::HEAD;
    if let Some(inm) = list_header(headers, header::IF_NONE_MATCH) {
        if etag_list_matches(&inm, &v.etag, false) {
            return if safe {
                Precondition::NotModified
            } else {
                Precondition::Failed
            };
        }
    } else if safe {
        if let Some(since) = date_header(headers, header::IF_MODIFIED_SINCE) {
            if let Some(lm) = v.last_modified {
                if lm <= since {
                    return Precondition::NotModified;
                }
            }
        }
    }
    Precondition::Proceed
}

/// RFC 9110 §13.1.5: whether a `Range` may be honoured given `If-Range` (absent means yes).
/// An entity tag must match strongly; a date must equal `Last-Modified` exactly.
pub(crate) fn if_range_allows(headers: &HeaderMap, v: &Validators) -> bool {
    let Some(value) = headers.get(header::IF_RANGE) else {
        return true;
    };
    let Ok(s) = value.to_str() else {
        return false;
    };
    let s = s.trim();
    if s.starts_with('"') || s.starts_with("W/") {
        return !s.starts_with("W/") && s.as_bytes() == v.etag.as_bytes();
    }
    match (httpdate::parse_http_date(s), v.last_modified) {
        (Ok(date), Some(lm)) => date == lm,
        _ => false,
    }
}

/// Joins every field line of a list header; `None` when absent.
fn list_header(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    values.peek()?;
    let mut out = String::new();
    for v in values {
        if !out.is_empty() {
            out.push(',');
        }
        // A field line that is not visible ASCII cannot hold a valid entity tag.
        out.push_str(v.to_str().unwrap_or("\u{0}"));
    }
    Some(out)
}

fn date_header(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    // RFC 9110: an invalid date, or more than one, means the header is ignored.
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    httpdate::parse_http_date(first.to_str().ok()?.trim()).ok()
}

/// Whether a comma-separated list of entity tags (or `*`) matches `ours` (a strong tag).
fn etag_list_matches(list: &str, ours: &HeaderValue, strong: bool) -> bool {
    let list = list.trim();
    if list == "*" {
        return true;
    }
    let ours = ours.as_bytes();
    let mut rest = list;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return false;
        }
        let weak = rest.starts_with("W/");
        let tag_start = if weak { &rest[2..] } else { rest };
        if !tag_start.starts_with('"') {
            // Malformed element: skip to the next comma.
            match rest.find(',') {
                Some(i) => {
                    rest = &rest[i + 1..];
                    continue;
                }
                None => return false,
            }
        }
        let Some(close) = tag_start[1..].find('"') else {
            return false;
        };
        let tag = &tag_start[..close + 2];
        if tag.as_bytes() == ours && !(strong && weak) {
            return true;
        }
        rest = &tag_start[close + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_lists() {
        let ours = HeaderValue::from_static("\"abc\"");
        assert!(etag_list_matches("\"abc\"", &ours, true));
        assert!(etag_list_matches("\"x\", \"abc\"", &ours, true));
        assert!(!etag_list_matches("W/\"abc\"", &ours, true));
        assert!(etag_list_matches("W/\"abc\"", &ours, false));
        assert!(etag_list_matches("*", &ours, true));
        assert!(!etag_list_matches("\"abcd\"", &ours, false));
        assert!(!etag_list_matches("garbage, \"ab", &ours, false));
        assert!(etag_list_matches("garbage, \"abc\"", &ours, false));
    }
}
