//! Reading and writing client deadline headers.

use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::InvalidTimeout;

/// The `grpc-timeout` header name.
pub(crate) static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// How a deadline header encodes the time the client is willing to wait.
///
/// Values are relative; the layer converts them to an absolute deadline on arrival.
/// Malformed values (not digits, a sign, too many digits, an unknown unit, a value that
/// overflows) are ignored, with a `debug` event when the `tracing` feature is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutFormat {
    /// gRPC's format: 1 to 8 ASCII digits followed by a unit, `H` hours, `M` minutes,
    /// `S` seconds, `m` milliseconds, `u` microseconds or `n` nanoseconds (`100m` is
    /// 100 ms).
    Grpc,
    /// Whole milliseconds, 1 to 18 ASCII digits (`1500`).
    Milliseconds,
    /// Seconds, 1 to 12 ASCII digits with an optional fraction of 1 to 9 digits (`1.5`).
    Seconds,
}

impl TimeoutFormat {
    /// Parses one header value in this format (what the layer does with deadline headers);
    /// the error says why a value is rejected.
    ///
    /// Strict: ASCII digits only (no sign, space or `+`), at most the format's number of
    /// digits, so every accepted value fits a [`Duration`] without overflow.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_abort::TimeoutFormat;
    ///
    /// assert_eq!(TimeoutFormat::Grpc.parse(b"100m"), Ok(Duration::from_millis(100)));
    /// assert_eq!(TimeoutFormat::Seconds.parse(b"1.5"), Ok(Duration::from_millis(1500)));
    /// assert!(TimeoutFormat::Milliseconds.parse(b"-1").is_err());
    /// ```
    pub fn parse(self, value: &[u8]) -> Result<Duration, InvalidTimeout> {
        match self {
            TimeoutFormat::Grpc => parse_grpc(value),
            TimeoutFormat::Milliseconds => digits(value, 18)
                .map(Duration::from_millis)
                .ok_or("expected 1 to 18 digits"),
            TimeoutFormat::Seconds => parse_seconds(value),
        }
        .map_err(InvalidTimeout::new)
    }

    /// Encodes `remaining`, rounding down so a downstream deadline is never later than
    /// ours, except that less than one unit (zero too) is sent as one unit (`1`, `0.001`):
    /// zero would mean "no time at all" to some servers and "no deadline" to others. The
    /// outgoing call is still cancelled at our own deadline, so it never runs past it.
    ///
    /// This is what [`PropagateAbort`](crate::PropagateAbort) sends.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_abort::TimeoutFormat;
    ///
    /// assert_eq!(TimeoutFormat::Grpc.encode(Duration::from_millis(100)), "100000u");
    /// assert_eq!(TimeoutFormat::Milliseconds.encode(Duration::from_micros(300)), "1");
    /// ```
    pub fn encode(self, remaining: Duration) -> HeaderValue {
        let text = match self {
            TimeoutFormat::Grpc => encode_grpc(remaining),
            TimeoutFormat::Milliseconds => remaining.as_millis().max(1).to_string(),
            TimeoutFormat::Seconds => {
                let millis = remaining.as_millis().max(1);
                format!("{}.{:03}", millis / 1000, millis % 1000)
            }
        };
        HeaderValue::try_from(text).expect("digits, '.' and a unit letter are valid header bytes")
    }
}

/// Parses `1..=max` ASCII digits; no sign, no spaces (unlike `str::parse`, which takes `+`).
fn digits(value: &[u8], max: usize) -> Option<u64> {
    if value.is_empty() || value.len() > max || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 18 digits: fits in u64 without overflow.
    Some(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

fn parse_grpc(value: &[u8]) -> Result<Duration, &'static str> {
    let (unit, number) = value.split_last().ok_or("empty")?;
    let n = digits(number, 8).ok_or("expected 1 to 8 digits and a unit")?;
    Ok(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return Err("unknown unit"),
    })
}

fn parse_seconds(value: &[u8]) -> Result<Duration, &'static str> {
    const WHY: &str = "expected seconds: up to 12 digits, optionally '.' and up to 9 digits";
    let (whole, fraction) = match value.iter().position(|&b| b == b'.') {
        Some(dot) => (&value[..dot], Some(&value[dot + 1..])),
        None => (value, None),
    };
    let secs = digits(whole, 12).ok_or(WHY)?;
    let nanos = match fraction {
        None => 0,
        Some(f) => {
            let n = digits(f, 9).ok_or(WHY)?;
            // Scale "5" to 500_000_000 ns; at most 9 digits, so the exponent is >= 0.
            n * 10u64.pow(9 - f.len() as u32)
        }
    };
    Ok(Duration::new(secs, nanos as u32))
}

fn encode_grpc(d: Duration) -> String {
    const MAX: u128 = 99_999_999;
    // The finest unit that fits in 8 digits, so rounding down loses under 1e-7 of it. A
    // non-zero duration is at least `1n`.
    let d = d.max(Duration::from_nanos(1));
    let candidates: [(u128, char); 6] = [
        (d.as_nanos(), 'n'),
        (d.as_micros(), 'u'),
        (d.as_millis(), 'm'),
        (u128::from(d.as_secs()), 'S'),
        (u128::from(d.as_secs() / 60), 'M'),
        (u128::from(d.as_secs() / 3600), 'H'),
    ];
    let (n, unit) = candidates
        .into_iter()
        .find(|&(n, _)| n <= MAX)
        .unwrap_or((MAX, 'H'));
    format!("{n}{unit}")
}

/// What the request's headers say about its deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FromHeaders {
    /// The shortest valid time among the configured deadline headers. Relative, so that
    /// the caller reads the clock only when a deadline applies.
    pub(crate) timeout: Option<Duration>,
    /// With `grpc`: the request is a gRPC call (its first `content-type` is
    /// `application/grpc[+proto|...]`), so a passed deadline is answered the gRPC way.
    pub(crate) grpc_call: bool,
}

/// Reads the configured deadline headers (and, with `grpc`, whether the request is a gRPC
/// call) in one pass over the headers.
pub(crate) fn from_headers(
    headers: &HeaderMap,
    grpc: bool,
    custom: Option<&(HeaderName, TimeoutFormat)>,
) -> FromHeaders {
    let mut best: Option<Duration> = None;
    let mut consider = |name: &HeaderName, value: &HeaderValue, format: TimeoutFormat| match format
        .parse(value.as_bytes())
    {
        Ok(d) => best = Some(best.map_or(d, |b| b.min(d))),
        Err(err) => crate::event::bad_deadline_header(name, value, err.why()),
    };
    let mut content_type = None;
    if headers.len() <= SCAN_HEADERS {
        // One pass comparing names: for the few headers most requests carry this is cheaper
        // than hashing each configured name for the map's index (about 300 instructions
        // per request under callgrind in the example server).
        for (name, value) in headers {
            if grpc {
                if *name == GRPC_TIMEOUT {
                    consider(name, value, TimeoutFormat::Grpc);
                } else if content_type.is_none() && name == CONTENT_TYPE {
                    content_type = Some(value);
                }
            }
            if let Some((custom, format)) = custom {
                if name == custom {
                    consider(name, value, *format);
                }
            }
        }
    } else {
        if grpc {
            for value in headers.get_all(&GRPC_TIMEOUT) {
                consider(&GRPC_TIMEOUT, value, TimeoutFormat::Grpc);
            }
            content_type = headers.get(CONTENT_TYPE);
        }
        if let Some((name, format)) = custom {
            for value in headers.get_all(name) {
                consider(name, value, *format);
            }
        }
    }
    FromHeaders {
        timeout: best,
        grpc_call: content_type.is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
    }
}

/// Up to this many header values [`from_headers`] scans them instead of looking names up.
const SCAN_HEADERS: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    /// A map with `filler` unrelated headers first, then the deadline headers.
    fn headers(filler: usize, deadlines: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for i in 0..filler {
            let name = HeaderName::try_from(format!("x-filler-{i}")).unwrap();
            map.insert(name, HeaderValue::from_static("1"));
        }
        for (name, value) in deadlines {
            map.append(
                HeaderName::try_from(*name).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn from_headers_takes_the_shortest_valid_value_by_scan_and_by_index() {
        let custom = (
            HeaderName::from_static("request-timeout"),
            TimeoutFormat::Milliseconds,
        );
        let deadlines = [
            ("grpc-timeout", "3S"),
            ("request-timeout", "2500"),
            ("grpc-timeout", "garbage"),
            ("grpc-timeout", "2S"),
            ("request-timeout", "-1"),
        ];
        // 0 and 3 filler headers are scanned (at most SCAN_HEADERS values); 20 use the index.
        for filler in [0, SCAN_HEADERS - deadlines.len(), 20] {
            let map = headers(filler, &deadlines);
            let ms = Duration::from_millis;
            let timeout = |grpc, custom| from_headers(&map, grpc, custom).timeout;
            assert_eq!(timeout(true, Some(&custom)), Some(ms(2000)), "{filler}");
            assert_eq!(timeout(false, Some(&custom)), Some(ms(2500)), "{filler}");
            assert_eq!(timeout(true, None), Some(ms(2000)), "{filler}");
            assert_eq!(timeout(false, None), None, "{filler}");
            let none = headers(filler, &[]);
            assert_eq!(
                from_headers(&none, true, Some(&custom)),
                FromHeaders::default(),
                "{filler}"
            );
        }
    }

    #[test]
    fn a_grpc_call_is_told_by_its_first_content_type_by_scan_and_by_index() {
        let cases: [(&[(&str, &str)], bool); 5] = [
            (&[("content-type", "application/grpc")], true),
            (&[("content-type", "application/grpc+proto")], true),
            (&[("content-type", "application/json")], false),
            // `HeaderMap::get` answers with the first value.
            (
                &[
                    ("content-type", "text/plain"),
                    ("content-type", "application/grpc"),
                ],
                false,
            ),
            (&[("grpc-timeout", "1S")], false),
        ];
        for (deadlines, grpc_call) in cases {
            for filler in [0, 3, 20] {
                let map = headers(filler, deadlines);
                let read = from_headers(&map, true, None);
                assert_eq!(read.grpc_call, grpc_call, "{deadlines:?} after {filler}");
                assert!(
                    !from_headers(&map, false, None).grpc_call,
                    "only asked with grpc: {deadlines:?}"
                );
            }
        }
    }

    #[test]
    fn grpc_units() {
        let p = |s: &str| TimeoutFormat::Grpc.parse(s.as_bytes());
        assert_eq!(p("100m"), Ok(Duration::from_millis(100)));
        assert_eq!(p("2S"), Ok(Duration::from_secs(2)));
        assert_eq!(p("3M"), Ok(Duration::from_secs(180)));
        assert_eq!(p("1H"), Ok(Duration::from_secs(3600)));
        assert_eq!(p("7u"), Ok(Duration::from_micros(7)));
        assert_eq!(p("9n"), Ok(Duration::from_nanos(9)));
        assert_eq!(p("99999999H"), Ok(Duration::from_secs(99_999_999 * 3600)));
        for bad in [
            "",
            "m",
            "100",
            "100x",
            "-1S",
            "+1S",
            " 1S",
            "1 S",
            "123456789S",
            "1.5S",
            "١S",
        ] {
            assert!(p(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn milliseconds_and_seconds() {
        let ms = |s: &str| TimeoutFormat::Milliseconds.parse(s.as_bytes());
        let secs = |s: &str| TimeoutFormat::Seconds.parse(s.as_bytes());
        assert_eq!(ms("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(
            ms("999999999999999999"),
            Ok(Duration::from_millis(999_999_999_999_999_999))
        );
        assert_eq!(secs("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(secs("2"), Ok(Duration::from_secs(2)));
        assert_eq!(secs("0.000000001"), Ok(Duration::from_nanos(1)));
        for bad in [
            "",
            "-5",
            "1e3",
            "18446744073709551616",
            "1234567890123456789",
            "0x10",
        ] {
            assert!(ms(bad).is_err(), "{bad:?} must be rejected");
        }
        for bad in [
            "",
            ".",
            "1.",
            ".5",
            "-1",
            "1.2.3",
            "1.0000000001",
            "9999999999999",
        ] {
            assert!(secs(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn grpc_encoding_round_trips_without_growing() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(100),
            Duration::from_millis(12_345),
            Duration::from_secs(3 * 86_400),
            Duration::from_secs(u64::MAX),
        ] {
            let v = TimeoutFormat::Grpc.encode(d);
            let back = TimeoutFormat::Grpc.parse(v.as_bytes()).unwrap();
            assert!(back <= d, "{v:?} encodes more than {d:?}");
            assert!(
                d.as_secs_f64() - back.as_secs_f64() <= d.as_secs_f64() * 1e-7 + 1e-9
                    || d.as_secs() > 99_999_999 * 3600
            );
        }
        assert_eq!(
            TimeoutFormat::Grpc.encode(Duration::from_millis(100)),
            "100000u"
        );
        assert_eq!(
            TimeoutFormat::Milliseconds.encode(Duration::from_millis(1500)),
            "1500"
        );
        assert_eq!(
            TimeoutFormat::Seconds.encode(Duration::from_millis(1500)),
            "1.500"
        );
        // Never zero: under one unit is sent as one unit.
        for tiny in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(999),
        ] {
            assert_eq!(TimeoutFormat::Milliseconds.encode(tiny), "1");
            assert_eq!(TimeoutFormat::Seconds.encode(tiny), "0.001");
            assert_ne!(TimeoutFormat::Grpc.encode(tiny).as_bytes()[0], b'0');
        }
    }
}
