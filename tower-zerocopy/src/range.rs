//! `Range: bytes=…` parsing (RFC 9110 §14.1.2, §14.2).
//!
//! The parser is total: any input yields [`RangeOutcome`], never a panic. Numbers too large for
//! a `u64` saturate, which makes a first position unsatisfiable and a last position "to the end".

use std::ops::Range;

/// What a `Range` header asks of a representation of a given length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Serve the whole representation with `200`: the header is malformed, uses a unit other
    /// than `bytes`, or lists more ranges than allowed (RFC 9110 lets a server ignore it).
    Ignore,
    /// Serve these byte ranges with `206`, in this order, none empty, each within the length.
    /// Overlapping or adjacent ranges have been coalesced.
    Satisfiable(Vec<Range<u64>>),
    /// No range overlaps the representation: answer `416` with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Parses a `Range` header value against a representation of `len` bytes.
///
/// At most `max_ranges` ranges are honoured; a header with more is ignored (served whole), the
/// way nginx's `max_ranges` behaves, so a client cannot make one request cost thousands of parts.
///
/// ```
/// use tower_zerocopy::range::{parse_range, RangeOutcome};
///
/// assert_eq!(parse_range(b"bytes=0-9", 100, 16), RangeOutcome::Satisfiable(vec![0..10]));
/// assert_eq!(parse_range(b"bytes=-10", 100, 16), RangeOutcome::Satisfiable(vec![90..100]));
/// assert_eq!(parse_range(b"bytes=200-", 100, 16), RangeOutcome::Unsatisfiable);
/// assert_eq!(parse_range(b"bytes=5-2", 100, 16), RangeOutcome::Ignore);
/// ```
pub fn parse_range(header: &[u8], len: u64, max_ranges: usize) -> RangeOutcome {
    let Some(spec) = strip_unit(header) else {
        return RangeOutcome::Ignore;
    };
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut count = 0usize;
    let mut any_syntactic = false;
    for item in spec.split(|&b| b == b',') {
        let item = trim(item);
        if item.is_empty() {
            // RFC 9110 list syntax tolerates empty elements ("bytes=0-1,,2-3").
            continue;
        }
        count += 1;
        if count > max_ranges {
            return RangeOutcome::Ignore;
        }
        let Some(parsed) = parse_spec(item) else {
            return RangeOutcome::Ignore;
        };
        any_syntactic = true;
        if let Some(r) = resolve(parsed, len) {
            ranges.push(r);
        }
    }
    if !any_syntactic {
        return RangeOutcome::Ignore;
    }
    if ranges.is_empty() {
        return RangeOutcome::Unsatisfiable;
    }
    RangeOutcome::Satisfiable(coalesce(ranges))
}

fn strip_unit(header: &[u8]) -> Option<&[u8]> {
    let header = trim(header);
    let (unit, rest) = header.split_at(header.iter().position(|&b| b == b'=')?);
    if !unit.eq_ignore_ascii_case(b"bytes") {
        return None;
    }
    Some(&rest[1..])
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

enum Spec {
    /// `first-last` or `first-`.
    Int(u64, Option<u64>),
    /// `-suffix`.
    Suffix(u64),
}

fn parse_spec(item: &[u8]) -> Option<Spec> {
    let dash = item.iter().position(|&b| b == b'-')?;
    let (first, last) = (trim(&item[..dash]), trim(&item[dash + 1..]));
    if first.is_empty() {
        return Some(Spec::Suffix(parse_num(last)?));
    }
    let first = parse_num(first)?;
    if last.is_empty() {
        return Some(Spec::Int(first, None));
    }
    let last = parse_num(last)?;
    if last < first {
        // RFC 9110 §14.1.1: a last-pos below first-pos makes the whole header invalid.
        return None;
    }
    Some(Spec::Int(first, Some(last)))
}

/// Decimal digits only, saturating at `u64::MAX`.
fn parse_num(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |acc, &d| {
        acc.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

fn resolve(spec: Spec, len: u64) -> Option<Range<u64>> {
    match spec {
        Spec::Int(first, last) => {
            if first >= len {
                return None;
            }
            let end = last.map_or(len, |l| l.saturating_add(1).min(len));
            Some(first..end)
        }
        // A zero-length suffix selects nothing (RFC 9110 §14.1.3).
        Spec::Suffix(0) => None,
        Spec::Suffix(_) if len == 0 => None,
        Spec::Suffix(n) => Some(len.saturating_sub(n)..len),
    }
}

/// Merges overlapping or adjacent ranges (RFC 9110 §14.2 lets a server coalesce them), keeping
/// the client's order when nothing overlaps.
fn coalesce(ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    if ranges.len() < 2 {
        return ranges;
    }
    let mut sorted = ranges.clone();
    sorted.sort_by_key(|r| r.start);
    let overlaps = sorted.windows(2).any(|w| w[1].start <= w[0].end);
    if !overlaps {
        return ranges;
    }
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        use RangeOutcome::*;
        let cases: &[(&str, u64, RangeOutcome)] = &[
            ("bytes=0-0", 10, Satisfiable(vec![0..1])),
            ("bytes=0-", 10, Satisfiable(vec![0..10])),
            ("bytes=9-", 10, Satisfiable(vec![9..10])),
            ("bytes=10-", 10, Unsatisfiable),
            ("bytes=-3", 10, Satisfiable(vec![7..10])),
            ("bytes=-30", 10, Satisfiable(vec![0..10])),
            ("bytes=-0", 10, Unsatisfiable),
            ("bytes=", 10, Ignore),
            ("bytes=5-2", 10, Ignore),
            ("bytes=a-b", 10, Ignore),
            ("bytes=1-2-3", 10, Ignore),
            ("items=0-1", 10, Ignore),
            ("0-1", 10, Ignore),
            ("BYTES = 0-1", 10, Ignore),
            ("Bytes=0-1", 10, Satisfiable(vec![0..2])),
            ("bytes= 0-1 , 4-5", 10, Satisfiable(vec![0..2, 4..6])),
            ("bytes=4-5,0-1", 10, Satisfiable(vec![4..6, 0..2])),
            ("bytes=0-5,3-8", 10, Satisfiable(vec![0..9])),
            ("bytes=0-1,2-3", 10, Satisfiable(vec![0..4])),
            ("bytes=0-1,,2-3", 10, Satisfiable(vec![0..4])),
            ("bytes=,", 10, Ignore),
            ("bytes=0-1,20-30", 10, Satisfiable(vec![0..2])),
            ("bytes=20-30,40-", 10, Unsatisfiable),
            ("bytes=99999999999999999999999999-", 10, Unsatisfiable),
            (
                "bytes=0-99999999999999999999999999",
                10,
                Satisfiable(vec![0..10]),
            ),
            (
                "bytes=-99999999999999999999999999",
                10,
                Satisfiable(vec![0..10]),
            ),
            ("bytes=0-0", 0, Unsatisfiable),
            ("bytes=-1", 0, Unsatisfiable),
            ("bytes=+1-2", 10, Ignore),
            ("bytes=0x1-2", 10, Ignore),
        ];
        for (header, len, want) in cases {
            assert_eq!(
                &parse_range(header.as_bytes(), *len, 16),
                want,
                "{header:?} len {len}"
            );
        }
    }

    #[test]
    fn too_many_ranges_are_ignored() {
        let many: Vec<String> = (0..1000).map(|i| format!("{}-{}", i * 2, i * 2)).collect();
        let header = format!("bytes={}", many.join(","));
        assert_eq!(
            parse_range(header.as_bytes(), 1 << 20, 16),
            RangeOutcome::Ignore
        );
        let ok = format!("bytes={}", many[..16].join(","));
        match parse_range(ok.as_bytes(), 1 << 20, 16) {
            RangeOutcome::Satisfiable(r) => assert_eq!(r.len(), 16),
            other => panic!("{other:?}"),
        }
    }
}
